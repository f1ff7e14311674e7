//! Media on the simulated cluster: RTP-shaped packets that say who sent
//! them ([`Payload`]), the publishers' sources, the network's record of
//! every packet, sending through `send_media` and receiving through
//! `handle_datagram`, and the quiet phase that measures repair.

use crate::events::Ev;
use crate::network::{Fate, MAX_DELAY_MS};
use crate::{Sim, ms, stat};
use rand::Rng;
use std::collections::BTreeSet;
use std::time::Duration;
use trunk::proto::wire::{self, Datagram};
use trunk::proto::{
    ConnId, Layer, Metrics, NodeId, ParticipantId, RoomName, Time, TrackId, WireId,
};

/// Media: one packet per published track per tick (tick drawn per seed).
pub(crate) const MEDIA_TICK_MS: std::ops::RangeInclusive<u64> = 20..=40;

/// The quiet phase's measured window (media keeps flowing after it).
pub(crate) const QUIET_WINDOW: Duration = Duration::from_secs(2);

/// Bytes of [`Payload`] on the wire: a 12-byte RTP header, then the rest.
pub(crate) const RTP_LEN: usize = 12 + 2 + 8 + 8 + 8 + 4 + 4 + 8 + 1;
pub(crate) const RTP_MAGIC: &[u8; 2] = b"SB";

/// What a simulated RTP packet says about itself, so a receiver can check
/// that what it got is what the origin sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Payload {
    pub(crate) node: NodeId,
    pub(crate) track: TrackId,
    pub(crate) participant: ParticipantId,
    pub(crate) wire: WireId,
    /// Extended sequence number; the RTP header carries its low 16 bits.
    pub(crate) seq: u32,
    /// Virtual time it was sent (every receiver's clock).
    pub(crate) sent: Time,
    pub(crate) video: bool,
}

impl Payload {
    /// The packet as the publisher sends it.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(RTP_LEN);
        p.push(0x80);
        p.push(if self.video { 96 } else { 111 });
        p.extend_from_slice(&(self.seq as u16).to_be_bytes());
        p.extend_from_slice(&((self.sent.0 / 1000 * 90) as u32).to_be_bytes());
        p.extend_from_slice(&(self.track.0 as u32).to_be_bytes());
        p.extend_from_slice(RTP_MAGIC);
        p.extend_from_slice(&self.node.0.to_be_bytes());
        p.extend_from_slice(&self.track.0.to_be_bytes());
        p.extend_from_slice(&self.participant.0.to_be_bytes());
        p.extend_from_slice(&self.wire.0.to_be_bytes());
        p.extend_from_slice(&self.seq.to_be_bytes());
        p.extend_from_slice(&self.sent.0.to_be_bytes());
        p.push(u8::from(self.video));
        p
    }

    /// What a received packet says, if it is one the simulation made.
    pub(crate) fn decode(p: &[u8]) -> Option<Self> {
        if p.len() != RTP_LEN || p[0] != 0x80 || &p[12..14] != RTP_MAGIC {
            return None;
        }
        let u64_at = |i: usize| Some(u64::from_be_bytes(p.get(i..i + 8)?.try_into().ok()?));
        let u32_at = |i: usize| Some(u32::from_be_bytes(p.get(i..i + 4)?.try_into().ok()?));
        let out = Payload {
            node: NodeId(u64_at(14)?),
            track: TrackId(u64_at(22)?),
            participant: ParticipantId(u64_at(30)?),
            wire: WireId(u32_at(38)?),
            seq: u32_at(42)?,
            sent: Time(u64_at(46)?),
            video: p[54] == 1,
        };
        let header_ok = u16::from_be_bytes([p[2], p[3]]) == out.seq as u16
            && p[1] == if out.video { 96 } else { 111 };
        header_ok.then_some(out)
    }
}

/// The network's record of one packet of one track towards one node.
#[derive(Debug, Default)]
pub(crate) struct NetRec {
    /// Originals sent (must stay ≤ 1).
    pub(crate) sent: u16,
    /// Retransmissions sent.
    pub(crate) retx: u16,
    pub(crate) delivered: u16,
    /// Subscription generation (see `Sim::sub_gen`) of the last delivery.
    pub(crate) sub: Option<u64>,
}

/// One original sent during the quiet phase's window.
#[derive(Debug)]
pub(crate) struct QuietPkt {
    pub(crate) to: usize,
    pub(crate) track: TrackId,
    pub(crate) seq: u32,
    pub(crate) lost: bool,
}

impl Sim {
    /// Media flows from now on (the first tick at a random offset).
    pub(crate) fn start_media(&mut self) {
        self.media_on = true;
        if !self.tick_pending {
            self.tick_pending = true;
            let first = self.now + ms(self.mrng.random_range(0..=self.tick.as_millis() as u64));
            self.at(first, Ev::MediaTick);
        }
    }

    /// The publisher behind local `track` hands its next packet to the node.
    pub(crate) fn send_packet(&mut self, i: usize, track: TrackId) {
        let now = self.now;
        let n = &mut self.nodes[i];
        let Some(src) = n.sources.get_mut(&track) else {
            return;
        };
        let p = Payload {
            node: n.id,
            track,
            participant: src.participant,
            wire: src.wire,
            seq: src.seq,
            sent: now,
            video: src.video,
        };
        src.seq = src.seq.wrapping_add(1);
        let packet = p.encode();
        let origin = Time(now.0.saturating_add_signed(n.skew));
        let targets: Vec<(NodeId, ConnId)> = n
            .node
            .send_media(track, Layer(0), &packet, origin, now, &mut self.scratch)
            .to_vec();
        if targets.is_empty() {
            return;
        }
        src.last_sent = Some((p.seq, now));
        let encoded = matches!(
            wire::decode_datagram(&self.scratch),
            Ok(Datagram::Media { wire_id, origin: o, packet: body })
                if wire_id == p.wire && o == origin.0 && body == &packet[..]
        );
        if !encoded {
            return self.fail(format!(
                "node {}: send_media encoded another datagram",
                i + 1
            ));
        }
        let bytes = self.scratch.clone();
        let window = self.window.is_some_and(|(a, b)| a <= now && now < b);
        let mut seen = BTreeSet::new();
        for (node, conn) in targets {
            let to = (node.0 as usize).wrapping_sub(1);
            let subscribed =
                self.nodes[i].node.should_send(node, track, Layer(0)) == Some((conn, p.wire));
            let linked = self.conns.get(&conn.0).is_some_and(|c| {
                c.ends.contains(&(i, self.nodes[i].epoch)) && c.ends.iter().any(|e| e.0 == to)
            });
            if !subscribed || !linked || !seen.insert(node) {
                return self.fail(format!(
                    "media only to subscribers: node {} sent {:?} to {node:?} on conn {} (subscribed: {subscribed}, on its trunk: {linked})",
                    i + 1,
                    p.wire,
                    conn.0
                ));
            }
            self.net.entry((to, track, p.seq)).or_default().sent += 1;
            stat(6, 1);
            let fate = self.send_dgram(i, conn.0, bytes.clone());
            if fate == Fate::Lost {
                stat(8, 1);
            }
            if window && fate != Fate::Blocked {
                self.quiet.push(QuietPkt {
                    to,
                    track,
                    seq: p.seq,
                    lost: fate == Fate::Lost,
                });
            }
        }
    }

    /// A datagram arrives at node `i` from node `from`: deliver it and check
    /// what the node made of it.
    pub(crate) fn receive_dgram(&mut self, i: usize, from: usize, conn: u64, bytes: &[u8]) {
        let now = self.now;
        let (sent, packet) = match wire::decode_datagram(bytes) {
            Ok(Datagram::Media {
                wire_id, packet, ..
            }) => match Payload::decode(packet) {
                Some(p) if p.wire == wire_id => (Some(p), packet),
                _ => return self.fail("the network carried media no origin sent".into()),
            },
            Ok(Datagram::Control(_)) => (None, &[][..]),
            Err(e) => return self.fail(format!("the network carried a bad datagram: {e}")),
        };
        let before = self.nodes[i].node.metrics().clone();
        let got = self.nodes[i]
            .node
            .handle_datagram(ConnId(conn), bytes, now)
            .map(|d| (d.node, d.wire_id, d.origin, d.repaired, d.packet == packet));
        let after = self.nodes[i].node.metrics();
        let repaired = after.media_repaired - before.media_repaired;
        stat(12, after.late_drops - before.late_drops);
        if repaired > 0 && !got.is_some_and(|g| g.3) {
            return self.fail(format!(
                "repair counted but not delivered: node {} counted {:?} seq {} from node {} repaired, then dropped it (late drops {} -> {})",
                i + 1,
                sent.map(|p| p.wire),
                sent.map_or(0, |p| p.seq as u16),
                from + 1,
                before.late_drops,
                after.late_drops
            ));
        }
        match (sent, got) {
            (None, Some(_)) => self.fail(format!("node {}: a NACK was delivered as media", i + 1)),
            (Some(p), Some((node, wire, origin, repaired, same))) => {
                stat(7, 1);
                stat(11, u64::from(repaired));
                let id = self.nodes[from].id;
                if !same || wire != p.wire || node != id || p.node != id {
                    return self.fail(format!(
                        "delivered media is not what the origin sent: node {} got {p:?} from node {} as {node:?}/{wire:?}",
                        i + 1,
                        from + 1
                    ));
                }
                self.check_delivery(i, p, origin, repaired);
                // Replayed as a stray once the track is gone (`strays.rs`).
                self.nodes[i]
                    .last_media
                    .insert((p.node, p.wire), bytes.to_vec());
            }
            _ => {}
        }
    }

    /// Repair works: on the healed cluster, some nodes publish video, most
    /// video tracks get a layer-0 subscriber, and then nothing changes for
    /// a while but datagram loss. Every packet the network delivered must
    /// be delivered on time, and most lost video packets repaired.
    pub(crate) fn quiet_phase(&mut self) {
        for i in 0..self.nodes.len() {
            let pids: Vec<ParticipantId> = self.nodes[i].participants.keys().copied().collect();
            if pids.is_empty() || !self.mrng.random_bool(0.6) {
                continue;
            }
            let p = pids[self.mrng.random_range(0..pids.len())];
            let tid = TrackId(self.new_id());
            self.publish(i, p, tid, 3);
        }
        let t = self.now + ms(4 * MAX_DELAY_MS + 10);
        self.run_until(t);
        for i in 0..self.nodes.len() {
            let remote: Vec<(RoomName, NodeId, WireId)> =
                self.nodes[i].remote_tracks.keys().cloned().collect();
            for key in remote {
                let has = self.nodes[i]
                    .wanted
                    .get(&key)
                    .is_some_and(|l| l.contains(&Layer(0)));
                if !has && self.mrng.random_bool(0.7) {
                    self.subscribe(i, key, Layer(0));
                }
            }
        }
        let t = self.now + ms(4 * MAX_DELAY_MS + 10);
        self.run_until(t);
        let before: Vec<Metrics> = self
            .nodes
            .iter()
            .map(|n| n.node.metrics().clone())
            .collect();
        let start = self.now;
        self.quiet.clear();
        self.window = Some((start, start + QUIET_WINDOW));
        self.run_until(start + QUIET_WINDOW);
        self.window = None;
        // Media goes on: every gap of the window is seen, then repaired or
        // given up (the lateness bound is 250 ms).
        let t = self.now + ms(600);
        self.run_until(t);
        if self.violation.is_none() {
            self.check_quiet(&before);
        }
        if self.violation.is_none() {
            self.check_settled();
        }
        // Churn on the lossy media: every subscription is dropped at some
        // moment in the next 500 ms (NACKs already in flight then reach an
        // origin that no longer serves the asker), with strays meanwhile.
        let end = self.now + ms(500);
        for i in 0..self.nodes.len() {
            let subs: Vec<((RoomName, NodeId, WireId), Layer)> = self.nodes[i]
                .wanted
                .iter()
                .flat_map(|(k, ls)| ls.iter().map(move |l| (k.clone(), *l)))
                .collect();
            for (key, layer) in subs {
                let at = Time(self.mrng.random_range(self.now.0..end.0));
                self.at(
                    at,
                    Ev::Unsubscribe {
                        node: i,
                        key,
                        layer,
                    },
                );
            }
        }
        self.schedule_strays(end);
        self.run_until(end + ms(4 * MAX_DELAY_MS + 10));
    }
}
