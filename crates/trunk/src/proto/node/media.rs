//! The media fast path and loss repair. Outgoing: `send_media` encodes a
//! local track's packet once and returns its targets (kept per track by
//! `refresh_targets`, never computed per packet). Incoming:
//! `handle_datagram` is where every datagram from a peer lands — media for
//! a known wire id is returned (gap detection, lateness bound), a NACK is
//! answered from the send history (`on_nack`), anything else is dropped
//! and counted. NACKs and retransmissions leave through `poll_datagram`.

use super::{Event, KfKey, Node};
use crate::proto::link::ConnState;
use crate::proto::repair::{Arrival, rtp_seq};
use crate::proto::time::Time;
use crate::proto::types::{ConnId, Layer, NodeId, RoomName, TrackId, TrackKind, WireId};
use crate::proto::wire::{self, Datagram, DatagramMessage};

/// A media datagram accepted from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteDatagram<'a> {
    pub node: NodeId,
    pub wire_id: WireId,
    pub packet: &'a [u8],
    /// When the origin received the packet from its publisher, mapped onto
    /// our clock (never later than now). Every track of one origin is
    /// mapped alike, so using it as the packet's wallclock keeps the
    /// origin's audio/video timing (lip sync) whatever the trunk's jitter.
    pub origin: Time,
    /// It filled a hole under repair (a retransmission or a late original).
    pub repaired: bool,
}

/// Where one media packet goes ([`Node::send_media`]); derefs to the
/// (node, connection) pairs, empty when nobody subscribes.
#[derive(Debug, Clone, Copy)]
pub struct MediaTargets<'a> {
    /// A video track: the driver holds video back when a trunk lacks
    /// bandwidth, and keeps audio.
    pub video: bool,
    pub targets: &'a [(NodeId, ConnId)],
}

impl std::ops::Deref for MediaTargets<'_> {
    type Target = [(NodeId, ConnId)];
    fn deref(&self) -> &Self::Target {
        self.targets
    }
}

/// A datagram the core wants sent (a NACK, or a retransmission answering one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatagramOut {
    pub conn: ConnId,
    pub node: NodeId,
    pub bytes: Vec<u8>,
    /// A retransmitted packet (the driver holds it back, like video, when
    /// the trunk lacks bandwidth), or else a NACK.
    pub retransmit: bool,
}

impl Node {
    /// Next datagram to send (NACKs, retransmissions).
    pub fn poll_datagram(&mut self) -> Option<DatagramOut> {
        self.datagrams.pop_front()
    }

    /// Should media of `layer` of local `track` go to `node`? If so, on which
    /// connection and with which wire id.
    pub fn should_send(
        &self,
        node: NodeId,
        track: TrackId,
        layer: Layer,
    ) -> Option<(ConnId, WireId)> {
        let room = self.track_rooms.get(&track)?;
        let t = self.rooms.get(room)?.tracks.get(&track)?;
        if !t.subscribers.get(&node)?.contains(&layer) {
            return None;
        }
        Some((self.peers.get(&node)?.conn?, t.wire_id))
    }

    /// Send one RTP packet of `layer` of local `track`: encodes the
    /// datagram into `datagram` (the same bytes go to every target: wire
    /// ids are per origin), remembers video packets for retransmission,
    /// and returns the (node, connection) pairs to send it on — empty when
    /// nobody subscribes (then nothing is recorded). `origin` is when the
    /// packet reached this node (receivers bound lateness and keep lip sync
    /// with it). One hash lookup, no allocation.
    pub fn send_media(
        &mut self,
        track: TrackId,
        layer: Layer,
        packet: &[u8],
        origin: Time,
        now: Time,
        datagram: &mut Vec<u8>,
    ) -> MediaTargets<'_> {
        let none = MediaTargets {
            video: false,
            targets: &[],
        };
        let Some(m) = self.media.get_mut(&track) else {
            return none;
        };
        let Some(i) = m
            .targets
            .iter()
            .position(|(l, t)| *l == layer && !t.is_empty())
        else {
            return none;
        };
        wire::encode_datagram(m.wire_id, origin.0, packet, datagram);
        if let Some(seq) = rtp_seq(packet) {
            m.history.record(seq, origin.0, packet, now);
        }
        let targets = &m.targets[i].1;
        self.metrics.datagrams_out += targets.len() as u64;
        MediaTargets {
            video: m.kind == TrackKind::Video,
            targets,
        }
    }

    /// Ask the publisher of a local track for a keyframe (rate-limited like
    /// a peer's request): the driver does so when video to a peer resumes
    /// after it had to drop some for lack of bandwidth.
    pub fn request_local_keyframe(&mut self, track: TrackId, now: Time) {
        self.timers_changed();
        if let Some(room) = self.track_rooms.get(&track).cloned() {
            self.local_keyframe(room, track, now);
        }
    }

    /// A keyframe of local `track` in `room` is wanted: ask the SFU now, or
    /// coalesce into the limiter's next slot. `false`: no such track there.
    pub(super) fn local_keyframe(&mut self, room: RoomName, track: TrackId, now: Time) -> bool {
        let Some(t) = self
            .rooms
            .get_mut(&room)
            .and_then(|r| r.tracks.get_mut(&track))
        else {
            return false;
        };
        if t.keyframes.request(now) {
            self.events
                .push_back(Event::KeyframeRequested { room, track });
        } else {
            self.metrics.keyframes_coalesced += 1;
            self.kf_pending.insert(KfKey::Local(track));
        }
        true
    }

    /// Rebuild the media fast path's targets of a local track from its
    /// subscribers (on subscription and link changes, never per packet).
    pub(super) fn refresh_targets(&mut self, track: TrackId) {
        let Some(t) = self
            .track_rooms
            .get(&track)
            .and_then(|room| self.rooms.get(room))
            .and_then(|r| r.tracks.get(&track))
        else {
            return;
        };
        let mut targets: Vec<(Layer, Vec<(NodeId, ConnId)>)> = Vec::new();
        for (node, layers) in &t.subscribers {
            let Some(conn) = self.peers.get(node).and_then(|p| p.conn) else {
                continue;
            };
            for layer in layers {
                match targets.iter_mut().find(|(l, _)| l == layer) {
                    Some((_, v)) => v.push((*node, conn)),
                    None => targets.push((*layer, vec![(*node, conn)])),
                }
            }
        }
        if let Some(m) = self.media.get_mut(&track) {
            m.targets = targets;
        }
    }

    /// A datagram. Media is returned only if its wire id belongs to an up
    /// room link on this connection's peer and it is not later than the
    /// lateness bound; anything else is dropped and counted — nothing is
    /// ever created by a datagram. A NACK queues retransmissions
    /// ([`Self::poll_datagram`]) of what the asking peer subscribes to.
    pub fn handle_datagram<'a>(
        &mut self,
        conn: ConnId,
        datagram: &'a [u8],
        now: Time,
    ) -> Option<RemoteDatagram<'a>> {
        self.metrics.datagrams_in += 1;
        let node = match self.conns.get(&conn).map(|c| c.state) {
            Some(ConnState::Active(node)) => node,
            _ => {
                self.metrics.unknown_wire_drops += 1;
                return None;
            }
        };
        let (wire_id, origin, packet) = match wire::decode_datagram(datagram) {
            Ok(Datagram::Media {
                wire_id,
                origin,
                packet,
            }) => (wire_id, origin, packet),
            Ok(Datagram::Control(DatagramMessage::Nack { wire_id, seqs })) => {
                self.on_nack(conn, node, wire_id, &seqs, now);
                return None;
            }
            Err(_) => {
                self.metrics.unknown_wire_drops += 1;
                return None;
            }
        };
        let cfg = self.config.repair;
        let peer = self.peers.get_mut(&node)?;
        let Some(w) = peer.wires.get_mut(&wire_id) else {
            #[cfg(feature = "planted-bugs")]
            if self.config.bugs.deliver_removed_tracks && self.tombstones.contains(&(node, wire_id))
            {
                return Some(RemoteDatagram {
                    node,
                    wire_id,
                    packet,
                    origin: peer.clock.to_local(origin, now),
                    repaired: false,
                });
            }
            self.metrics.unknown_wire_drops += 1;
            return None;
        };
        peer.stats.datagrams_in += 1;
        let late = peer.clock.sample(now, origin) > cfg.late_bound;
        let mut repaired = false;
        if let (Some(r), Some(seq)) = (w.repair.as_mut(), rtp_seq(packet)) {
            match r.on_packet(seq, now, &cfg) {
                Arrival::New { gap, dropped } => {
                    let lost = u64::from(gap) + u64::from(dropped);
                    peer.stats.lost += lost;
                    self.metrics.media_lost += lost;
                    peer.stats.given_up += u64::from(dropped);
                    self.metrics.media_given_up += u64::from(dropped);
                    if gap > 0 {
                        self.repairing.insert((node, wire_id));
                        self.timeout.set(None);
                    }
                }
                // Filled too late to be of use: given up after all.
                Arrival::Repaired if late => {
                    peer.stats.given_up += 1;
                    self.metrics.media_given_up += 1;
                }
                Arrival::Repaired => {
                    repaired = true;
                    peer.stats.repaired += 1;
                    self.metrics.media_repaired += 1;
                }
                Arrival::Stale => {
                    // Already delivered (a retransmission crossing a late
                    // original) or already given up: never twice, never late.
                    peer.stats.duplicates += 1;
                    self.metrics.media_duplicates += 1;
                    return None;
                }
            }
        }
        if late {
            peer.stats.late_drops += 1;
            self.metrics.late_drops += 1;
            return None;
        }
        Some(RemoteDatagram {
            node,
            wire_id,
            packet,
            origin: peer.clock.to_local(origin, now),
            repaired,
        })
    }

    /// A peer misses packets of one of our tracks: resend what we still
    /// hold, if it subscribes to the track and within its budget.
    fn on_nack(&mut self, conn: ConnId, node: NodeId, wire_id: WireId, seqs: &[u16], now: Time) {
        let cfg = self.config.repair;
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        peer.stats.nacks_received += 1;
        peer.stats.nack_seqs_received += seqs.len() as u64;
        self.metrics.nacks_received += 1;
        let Some(track) = self.local_wires.get(&wire_id).copied() else {
            self.metrics.unknown_wire_drops += 1;
            return;
        };
        let Some(m) = self.media.get(&track) else {
            return;
        };
        let subscribed = m
            .targets
            .iter()
            .any(|(_, t)| t.iter().any(|(n, c)| *n == node && *c == conn));
        #[cfg(feature = "planted-bugs")]
        let subscribed = subscribed || self.config.bugs.retransmit_unsubscribed;
        if !subscribed {
            peer.stats.retransmits_refused += seqs.len() as u64;
            self.metrics.retransmits_refused += seqs.len() as u64;
            return;
        }
        for &seq in seqs {
            let Some((origin, packet)) = m.history.get(seq, now, cfg.history) else {
                peer.stats.retransmits_missed += 1;
                self.metrics.retransmits_missed += 1;
                continue;
            };
            if !peer.retransmit_budget.take(now, cfg.retransmit_rate) {
                peer.stats.retransmits_refused += 1;
                self.metrics.retransmits_refused += 1;
                continue;
            }
            let mut bytes = Vec::with_capacity(packet.len() + wire::MAX_DATAGRAM_HEADER);
            wire::encode_datagram(m.wire_id, origin, packet, &mut bytes);
            peer.stats.retransmits_sent += 1;
            self.metrics.retransmits_sent += 1;
            self.metrics.datagrams_out += 1;
            self.datagrams.push_back(DatagramOut {
                conn,
                node,
                bytes,
                retransmit: true,
            });
        }
    }
}
