//! Strays: what no peer sent, injected at random times (and after everyone
//! left). Datagrams on a node's connections — NACKs for its live tracks
//! (answered only if the asking peer subscribes there), NACKs for wire ids
//! it published once or never, media for wire ids it does not know from
//! that peer: ones it was told of and saw removed (its last real datagram
//! replayed), ones the peer published that never reached it, random ones —
//! and frames: room-scoped messages it accepted earlier, replayed on the
//! sender's current trunk once their generation is stale. Each kind is
//! drawn by weight from [`STRAYS`].

use crate::actions::weighted;
use crate::events::Ev;
use crate::invariants::{FOREIGN_DATA_INVARIANT, stale_verdict, strip};
use crate::media::Payload;
use crate::network::pair;
use crate::{Sim, ms, stat};
use rand::Rng;
use std::collections::BTreeSet;
use trunk::proto::wire::{self, DatagramMessage, Message};
use trunk::proto::{ConnId, NodeId, ParticipantId, Time, TrackId, WireId};

/// One kind of stray.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stray {
    /// A NACK for one of the node's live tracks.
    NackLive,
    /// A NACK for a wire id the node published once (retired) or never.
    NackUnknown,
    /// Media for a wire id the node does not know from that peer.
    MediaUnknown,
    /// A room-scoped frame the node accepted earlier, now stale.
    StaleFrame,
    /// A current `Data` frame the node accepted, sent again on the same
    /// trunk naming a participant the sender did not announce in that room.
    ForgedData,
}

/// How often each kind of stray is injected, relative to the others.
pub(crate) const STRAYS: &[(Stray, u32)] = &[
    (Stray::NackLive, 3),
    (Stray::NackUnknown, 3),
    (Stray::MediaUnknown, 4),
    (Stray::StaleFrame, 3),
    (Stray::ForgedData, 3),
];

impl Sim {
    /// Stray datagrams at random times from now to `until`.
    pub(crate) fn schedule_strays(&mut self, until: Time) {
        for _ in 0..self.mrng.random_range(0..=25) {
            let at = Time(self.mrng.random_range(self.now.0..=until.0));
            self.at(at, Ev::Stray);
        }
    }

    /// Inject one stray at a random live node.
    pub(crate) fn stray(&mut self) {
        let alive = self.alive();
        if alive.is_empty() {
            return;
        }
        let i = alive[self.mrng.random_range(0..alive.len())];
        let kind = weighted(&mut self.mrng, STRAYS);
        if kind == Stray::StaleFrame {
            self.replay_stale_frames(i, 1);
            return;
        }
        if kind == Stray::ForgedData {
            return self.forge_data(i);
        }
        let me = (i, self.nodes[i].epoch);
        // Mostly a peer's active trunk; sometimes any connection of the
        // node (handshaking, replaced, closed).
        let active: BTreeSet<u64> = self
            .nodes
            .iter()
            .filter_map(|p| self.nodes[i].node.peer_conn(p.id))
            .map(|c| c.0)
            .collect();
        let any = self.mrng.random_bool(0.2);
        let mut conns: Vec<(u64, usize)> = self
            .conns
            .iter()
            .filter(|(id, _)| any || active.contains(id))
            .filter_map(|(id, c)| {
                let side = c.ends.iter().position(|e| *e == me)?;
                Some((*id, c.ends[1 - side].0))
            })
            .collect();
        conns.sort_unstable();
        if conns.is_empty() {
            return;
        }
        let (conn, j) = conns[self.mrng.random_range(0..conns.len())];
        stat(13, 1);
        let mut bytes = Vec::new();
        let nack = |wire_id, seqs: Vec<u16>, bytes: &mut Vec<u8>| {
            wire::encode_control_datagram(&DatagramMessage::Nack { wire_id, seqs }, bytes)
        };
        let current: BTreeSet<WireId> = self.nodes[i].tracks.values().map(|t| t.2).collect();
        match kind {
            Stray::NackLive => {
                // Packets sent lately, so still in the origin's history.
                let now = self.now;
                let live: Vec<(WireId, u32)> = self.nodes[i]
                    .sources
                    .values()
                    .filter_map(|s| s.last_sent.map(|(seq, at)| (s.wire, seq, at)))
                    .filter(|(_, _, at)| now.since(*at) < ms(500))
                    .map(|(w, seq, _)| (w, seq))
                    .collect();
                if live.is_empty() {
                    return;
                }
                let (wire, last) = live[self.mrng.random_range(0..live.len())];
                let n = self.mrng.random_range(1..=4u32);
                let seqs = (0..n).map(|k| last.wrapping_sub(2 * k) as u16).collect();
                nack(wire, seqs, &mut bytes);
                let before = self.nodes[i].node.snapshot();
                let now = self.now;
                if self.nodes[i]
                    .node
                    .handle_datagram(ConnId(conn), &bytes, now)
                    .is_some()
                {
                    return self.fail("a NACK was delivered as media".into());
                }
                // Retransmissions it queued are checked here (invariant:
                // no retransmission to a non-subscriber).
                self.in_stray = true;
                self.pump(i);
                self.in_stray = false;
                if strip(&self.nodes[i].node.snapshot()) != strip(&before) {
                    self.fail(format!(
                        "nothing from a NACK: node {} changed state on a NACK for {wire:?}",
                        i + 1
                    ));
                }
            }
            Stray::NackUnknown => {
                let old: Vec<WireId> = self.nodes[i]
                    .old_wires
                    .difference(&current)
                    .copied()
                    .collect();
                let wire = if !old.is_empty() && self.mrng.random_bool(0.7) {
                    old[self.mrng.random_range(0..old.len())]
                } else {
                    WireId(self.mrng.random_range(1..=u32::MAX))
                };
                if current.contains(&wire) {
                    return;
                }
                let seqs = (0..self.mrng.random_range(1..=8))
                    .map(|_| self.mrng.random())
                    .collect();
                nack(wire, seqs, &mut bytes);
                let once_valid = self.nodes[i].old_wires.contains(&wire);
                self.stray_unknown(i, conn, &bytes, wire, once_valid);
            }
            Stray::MediaUnknown => {
                let peer = self.nodes[j].id;
                let known: BTreeSet<WireId> = self.nodes[i]
                    .node
                    .snapshot()
                    .peers
                    .get(&peer)
                    .map(|p| {
                        p.rooms
                            .values()
                            .flat_map(|r| r.tracks.keys().copied())
                            .collect()
                    })
                    .unwrap_or_default();
                // Wire ids it was told of by this peer and saw removed: the
                // last datagram it got of one, replayed as it was.
                let retired: Vec<(WireId, Option<Vec<u8>>)> = self.nodes[i]
                    .retired
                    .iter()
                    .filter(|((n, w), _)| *n == peer && !known.contains(w))
                    .map(|((_, w), last)| (*w, last.clone()))
                    .collect();
                if !retired.is_empty() && self.mrng.random_bool(0.5) {
                    let (wire, last) = retired[self.mrng.random_range(0..retired.len())].clone();
                    stat(18, 1);
                    let bytes = last.unwrap_or_else(|| {
                        let mut bytes = Vec::new();
                        let p = Payload {
                            node: peer,
                            track: TrackId(0),
                            participant: ParticipantId(0),
                            wire,
                            seq: self.mrng.random(),
                            sent: self.now,
                            video: true,
                        };
                        wire::encode_datagram(wire, self.mrng.random(), &p.encode(), &mut bytes);
                        bytes
                    });
                    return self.stray_unknown(i, conn, &bytes, wire, true);
                }
                let mut candidates: Vec<WireId> = self.nodes[j]
                    .old_wires
                    .iter()
                    .copied()
                    .filter(|w| !known.contains(w))
                    .collect();
                candidates.push(WireId(self.mrng.random_range(1..=u32::MAX)));
                let wire = candidates[self.mrng.random_range(0..candidates.len())];
                if known.contains(&wire) {
                    return;
                }
                let p = Payload {
                    node: peer,
                    track: TrackId(0),
                    participant: ParticipantId(0),
                    wire,
                    seq: self.mrng.random(),
                    sent: self.now,
                    video: true,
                };
                let origin = self.mrng.random();
                wire::encode_datagram(wire, origin, &p.encode(), &mut bytes);
                let once_valid = self.nodes[j].old_wires.contains(&wire);
                self.stray_unknown(i, conn, &bytes, wire, once_valid);
            }
            Stray::StaleFrame | Stray::ForgedData => unreachable!("handled above"),
        }
    }

    /// Node `i`'s active trunk to `from`, if `from` is alive at its other
    /// end and the path is whole: only then can a frame from it arrive (a
    /// frame is a sign of life, so a replay must not come from the dead).
    fn live_trunk(&self, i: usize, from: NodeId) -> Option<u64> {
        let conn = self.nodes[i].node.peer_conn(from)?.0;
        let c = self.conns.get(&conn)?;
        let side = c.ends.iter().position(|e| e.0 != i)?;
        let j = self.end_alive(conn, side)?;
        (!c.broken && !self.cuts.contains(&pair(i, j))).then_some(conn)
    }

    /// Replay the last datagram node `i` got of up to `n` remote tracks it
    /// saw removed, on their origin's current trunk: the wire id was valid
    /// once, so the datagram must create nothing (`stray_unknown`).
    pub(crate) fn replay_retired_media(&mut self, i: usize, n: usize) {
        let node = &self.nodes[i].node;
        let snap = node.snapshot();
        let replays: Vec<(u64, WireId, Vec<u8>)> = self.nodes[i]
            .retired
            .iter()
            .filter_map(|((origin, wire), last)| {
                let conn = node.peer_conn(*origin)?;
                let known = snap
                    .peers
                    .get(origin)
                    .is_some_and(|p| p.rooms.values().any(|r| r.tracks.contains_key(wire)));
                let bytes = last.as_ref().filter(|_| !known)?;
                Some((conn.0, *wire, bytes.clone()))
            })
            .take(n)
            .collect();
        for (conn, wire, bytes) in replays {
            stat(18, 1);
            self.stray_unknown(i, conn, &bytes, wire, true);
        }
    }

    /// Replay up to `n` room-scoped frames node `i` accepted earlier, each
    /// on its sender's current trunk and only if the generation gate must
    /// now refuse it (`deliver_frame` checks that it does, and counts it).
    /// A `Data` frame node `i` accepted from a peer, still current, sent
    /// again naming as its sender someone that peer has not announced in
    /// that room: a participant of another node there, one of node `i`'s
    /// own, or nobody. It must be dropped and counted (the model fails the
    /// run if it is delivered).
    pub(crate) fn forge_data(&mut self, i: usize) {
        let node = &self.nodes[i].node;
        let current: Vec<(NodeId, Message)> = self.nodes[i]
            .heard
            .iter()
            .filter(|(from, _)| self.live_trunk(i, *from).is_some())
            .filter_map(|(from, body)| Some((*from, wire::decode_body(body).ok()?)))
            .filter(|(from, msg)| {
                matches!(msg, Message::Data { .. })
                    && stale_verdict(node, *from, msg) == Some(false)
            })
            .collect();
        if current.is_empty() {
            return;
        }
        let (from, mut msg) = current[self.mrng.random_range(0..current.len())].clone();
        let Message::Data {
            room, from: sender, ..
        } = &mut msg
        else {
            return;
        };
        let announced = |p: ParticipantId| {
            self.nodes[i]
                .remote_participants
                .contains_key(&(room.clone(), from, p))
        };
        let mut others: Vec<ParticipantId> = self.nodes[i]
            .remote_participants
            .keys()
            .filter(|(r, n, _)| r == room && *n != from)
            .map(|k| k.2)
            .chain(self.nodes[i].participants.keys().copied())
            .filter(|p| !announced(*p))
            .collect();
        others.push(ParticipantId(self.mrng.random_range(1 << 40..u64::MAX)));
        *sender = others[self.mrng.random_range(0..others.len())];
        let Some(conn) = self.live_trunk(i, from) else {
            return;
        };
        let Ok(frame) = wire::encode_frame(&msg) else {
            return self.fail(format!("forged data does not encode: {msg:?}"));
        };
        let Ok(Some((body, _))) = wire::split_frame(&frame) else {
            return self.fail("forged data does not split".into());
        };
        let body = body.to_vec();
        stat(19, 1);
        let drops = self.nodes[i].node.metrics().foreign_data_drops;
        self.deliver_frame(i, from, conn, &body);
        self.pump(i);
        if self.nodes[i].node.metrics().foreign_data_drops != drops + 1 {
            self.fail(format!(
                "{FOREIGN_DATA_INVARIANT}: node {} did not count forged {msg:?} from {from:?}",
                i + 1
            ));
        }
    }

    pub(crate) fn replay_stale_frames(&mut self, i: usize, n: usize) {
        let node = &self.nodes[i].node;
        let stale: Vec<usize> = (0..self.nodes[i].heard.len())
            .filter(|&k| {
                let (from, body) = &self.nodes[i].heard[k];
                self.live_trunk(i, *from).is_some()
                    && wire::decode_body(body)
                        .is_ok_and(|msg| stale_verdict(node, *from, &msg) == Some(true))
            })
            .collect();
        for _ in 0..n.min(stale.len()) {
            let k = stale[self.mrng.random_range(0..stale.len())];
            let (from, body) = self.nodes[i].heard[k].clone();
            // An earlier replay may have closed the trunk or changed state.
            let Some(conn) = self.live_trunk(i, from) else {
                continue;
            };
            let node = &self.nodes[i].node;
            if !wire::decode_body(&body)
                .is_ok_and(|msg| stale_verdict(node, from, &msg) == Some(true))
            {
                continue;
            }
            if self.trace {
                eprintln!(
                    "[{}ms] replay to node {} from {from:?} on conn {}: {:?}",
                    self.now.0 / 1000,
                    i + 1,
                    conn,
                    wire::decode_body(&body)
                );
            }
            stat(17, 1);
            self.deliver_frame(i, from, conn, &body);
            self.pump(i);
        }
    }
}
