//! Read-only views of a node, for the status API and for tests: per-peer
//! media counters, `snapshot` (a copy of the whole state), small accessors
//! the simulation's checks use (`local_track_kind`, `local_track_room`,
//! `room_link_gens`) and `check_structure` (the self-check it runs after
//! every step). Nothing here changes the node.

use super::Node;
use crate::proto::link::{ConnState, DialState, Dialed};
use crate::proto::types::{
    Generation, Incarnation, Layer, NodeId, ParticipantId, ParticipantInfo, RoomName, TrackId,
    TrackInfo, TrackKind, WireId,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

/// Media repair counters of one peer (both directions), for `/metrics` and
/// the status API. Reset when a peer that dialed us is forgotten.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerMediaStats {
    /// Media datagrams accepted from the peer.
    pub datagrams_in: u64,
    /// Sequence numbers of its tracks seen missing (gaps).
    pub lost: u64,
    /// Of those, filled later (by a retransmission or a late original).
    pub repaired: u64,
    /// Of those, given up (would arrive after the lateness bound, or the
    /// gap was longer than can be repaired).
    pub given_up: u64,
    /// Datagrams that arrived later than the lateness bound: dropped.
    pub late_drops: u64,
    /// Packets that arrived again (or after being given up): dropped.
    pub duplicates: u64,
    /// NACK datagrams we sent it, and the sequence numbers they named.
    pub nacks_sent: u64,
    pub nack_seqs_sent: u64,
    /// NACK datagrams it sent us, and the sequence numbers they named.
    pub nacks_received: u64,
    pub nack_seqs_received: u64,
    /// Packets we resent to it.
    pub retransmits_sent: u64,
    /// NACKed packets no longer (or never) in our history.
    pub retransmits_missed: u64,
    /// NACKs refused: it does not subscribe to the track, or asked for more
    /// than its retransmission budget.
    pub retransmits_refused: u64,
}

/// A read-only copy of a node's state, for invariant checks and the status API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSnapshot {
    pub incarnation: Option<Incarnation>,
    /// Local rooms: generation, participants, tracks (wire id, info) and subscribers.
    pub local_rooms: BTreeMap<RoomName, LocalRoomSnapshot>,
    pub peers: BTreeMap<NodeId, PeerSnapshot>,
    pub connections: usize,
    /// Discovered addresses (`set_dial_addrs`) still known.
    pub dial_addrs: BTreeMap<SocketAddr, DialAddrSnapshot>,
}

/// One discovered address as the core knows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DialAddrSnapshot {
    /// In the latest discovered set (an unlisted one is kept until its
    /// node's trunk is down).
    pub listed: bool,
    /// The node that answered there, if any yet.
    pub node: Option<NodeId>,
    /// This node's own address (our own Hello came back): not dialed.
    pub is_self: bool,
    /// A dial of it is under way (scheduled or connecting).
    pub dialing: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalRoomSnapshot {
    pub generation: Generation,
    pub participants: BTreeMap<ParticipantId, ParticipantInfo>,
    pub tracks: BTreeMap<WireId, TrackInfo>,
    /// (wire id, node) → layers
    pub subscribers: BTreeMap<(WireId, NodeId), BTreeSet<Layer>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSnapshot {
    pub up: bool,
    pub incarnation: Option<Incarnation>,
    pub remote_open: BTreeMap<RoomName, Generation>,
    /// Up room links: participants and tracks learned.
    pub rooms: BTreeMap<RoomName, RemoteRoomSnapshot>,
    pub wires: usize,
    pub rtt: Option<Duration>,
    pub media: PeerMediaStats,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteRoomSnapshot {
    pub participants: BTreeMap<ParticipantId, ParticipantInfo>,
    pub tracks: BTreeMap<WireId, TrackInfo>,
    pub subscribed: BTreeMap<WireId, BTreeSet<Layer>>,
}

impl Node {
    /// The kind of a local track the media fast path still knows (checks:
    /// nothing of a track survives its unpublishing).
    pub fn local_track_kind(&self, track: TrackId) -> Option<TrackKind> {
        self.media.get(&track).map(|m| m.kind)
    }

    /// The room a local track is indexed under (`track_rooms`), if any
    /// (checks: nothing of a track survives its unpublishing).
    pub fn local_track_room(&self, track: TrackId) -> Option<&RoomName> {
        self.track_rooms.get(&track)
    }

    /// What the generation gate knows of `room` with `node`: our generation
    /// of the room (if open here), the generation `node` last announced for
    /// it (if it has the room open), and whether the room link is up.
    /// Inspection only: tests predict from it which room-scoped messages
    /// are stale (dropped and counted in `stale_drops`).
    pub fn room_link_gens(
        &self,
        node: NodeId,
        room: &RoomName,
    ) -> (Option<Generation>, Option<Generation>, bool) {
        let local = self.rooms.get(room).map(|r| r.generation);
        let peer = self.peers.get(&node);
        let remote = peer.and_then(|p| p.remote_open.get(room).copied());
        let up = peer.is_some_and(|p| p.rooms.contains_key(room));
        (local, remote, up)
    }

    /// A copy of the whole state, for invariant checks and status pages.
    pub fn snapshot(&self) -> NodeSnapshot {
        let local_rooms = self
            .rooms
            .iter()
            .map(|(name, r)| {
                let mut subscribers = BTreeMap::new();
                for t in r.tracks.values() {
                    for (n, layers) in &t.subscribers {
                        subscribers.insert((t.wire_id, *n), layers.clone());
                    }
                }
                let snap = LocalRoomSnapshot {
                    generation: r.generation,
                    participants: r.participants.clone(),
                    tracks: r
                        .tracks
                        .values()
                        .map(|t| (t.wire_id, t.info.clone()))
                        .collect(),
                    subscribers,
                };
                (name.clone(), snap)
            })
            .collect();
        let peers = self
            .peers
            .iter()
            .map(|(node, p)| {
                let rooms = p
                    .rooms
                    .iter()
                    .map(|(name, r)| {
                        let snap = RemoteRoomSnapshot {
                            participants: r.participants.clone(),
                            tracks: r.tracks.iter().map(|(w, t)| (*w, t.info.clone())).collect(),
                            subscribed: r
                                .tracks
                                .iter()
                                .filter(|(_, t)| !t.layers.is_empty())
                                .map(|(w, t)| (*w, t.layers.clone()))
                                .collect(),
                        };
                        (name.clone(), snap)
                    })
                    .collect();
                let snap = PeerSnapshot {
                    up: p.conn.is_some(),
                    incarnation: p.incarnation,
                    remote_open: p.remote_open.clone(),
                    rooms,
                    wires: p.wires.len(),
                    rtt: self.rtt(*node),
                    media: p.stats,
                };
                (*node, snap)
            })
            .collect();
        NodeSnapshot {
            incarnation: Some(self.incarnation),
            local_rooms,
            peers,
            connections: self.conns.len(),
            dial_addrs: self
                .addrs
                .iter()
                .map(|(a, t)| {
                    let snap = DialAddrSnapshot {
                        listed: t.listed,
                        node: t.node,
                        is_self: t.is_self,
                        dialing: t.dial != DialState::Idle,
                    };
                    (*a, snap)
                })
                .collect(),
        }
    }

    /// Structural self-check (cheap; the simulation calls it after every
    /// step): room-link state only for rooms open here and there, on up
    /// links, the wire index matching the tracks, and every index of local
    /// tracks (`track_rooms`, the media fast path, local wire ids) holding
    /// exactly the tracks of the open rooms.
    pub fn check_structure(&self) -> Result<(), String> {
        for (node, p) in &self.peers {
            if p.conn.is_none()
                && (!p.rooms.is_empty() || !p.remote_open.is_empty() || !p.wires.is_empty())
            {
                return Err(format!("peer {node:?}: state kept while link is down"));
            }
            for name in p.rooms.keys() {
                if !self.rooms.contains_key(name) {
                    return Err(format!(
                        "orphan: room link {name} to {node:?} but room not open locally"
                    ));
                }
                if !p.remote_open.contains_key(name) {
                    return Err(format!(
                        "room link {name} to {node:?} but peer has not opened it"
                    ));
                }
            }
            let wires: usize = p.rooms.values().map(|r| r.tracks.len()).sum();
            if wires != p.wires.len() {
                return Err(format!("peer {node:?}: wire index out of sync"));
            }
        }
        // The cache may be early (a timer went away: one spurious wake-up),
        // never late (a timer would fire late).
        if let Some(cached) = self.timeout.get() {
            let fresh = self.compute_timeout();
            let late = match (cached, fresh) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(c), Some(f)) => c > f,
            };
            if late {
                return Err(format!("cached timeout {cached:?} later than {fresh:?}"));
            }
        }
        for (node, wire) in &self.repairing {
            let ok = self
                .peers
                .get(node)
                .and_then(|p| p.wires.get(wire))
                .is_some_and(|w| w.repair.is_some());
            if !ok {
                return Err(format!(
                    "repair timer for {node:?} {wire:?} without its track"
                ));
            }
        }
        // Every local track is indexed under its own room, and nothing
        // else is: an entry left behind by an unpublish or a closed room
        // is a leak.
        let mut local_tracks = 0;
        for (name, r) in &self.rooms {
            for (track, t) in &r.tracks {
                local_tracks += 1;
                if self.track_rooms.get(track) != Some(name) {
                    return Err(format!(
                        "track_rooms: local track {track:?} of room {name} indexed under {:?}",
                        self.track_rooms.get(track)
                    ));
                }
                if self.media.get(track).map(|m| m.wire_id) != Some(t.wire_id) {
                    return Err(format!("media fast path lost local track {track:?}"));
                }
            }
        }
        if self.track_rooms.len() != local_tracks {
            let leaked: Vec<_> = self
                .track_rooms
                .iter()
                .filter(|(t, room)| {
                    !self
                        .rooms
                        .get(*room)
                        .is_some_and(|r| r.tracks.contains_key(t))
                })
                .collect();
            return Err(format!(
                "track_rooms: {} entries for {local_tracks} local tracks, leaked {leaked:?}",
                self.track_rooms.len()
            ));
        }
        if self.media.len() != self.track_rooms.len() || self.local_wires.len() != self.media.len()
        {
            return Err("media fast path out of sync with local tracks".into());
        }
        for (track, m) in &self.media {
            if self.local_wires.get(&m.wire_id) != Some(track) {
                return Err(format!("wire index of {track:?} out of sync"));
            }
            for (_, targets) in &m.targets {
                for (node, conn) in targets {
                    if self.peers.get(node).and_then(|p| p.conn) != Some(*conn) {
                        return Err(format!("{track:?}: media target {node:?} not linked"));
                    }
                }
            }
        }
        for (addr, t) in &self.addrs {
            if matches!(t.dial, DialState::Scheduled(_)) && (!t.listed || t.is_self) {
                return Err(format!("{addr}: dial scheduled but unlisted or self"));
            }
            let in_flight = t.dial == DialState::Dialing
                || self
                    .conns
                    .values()
                    .any(|c| c.dialed == Some(Dialed::Addr(*addr)));
            if !t.listed && !in_flight && !t.node.is_some_and(|n| self.is_link_up(n)) {
                return Err(format!("{addr}: unlisted, its trunk down, yet kept"));
            }
        }
        for (node, p) in &self.peers {
            if !p.configured
                && p.conn.is_none()
                && !self.addrs.values().any(|t| t.node == Some(*node))
            {
                return Err(format!(
                    "peer {node:?}: kept with no link, config or address"
                ));
            }
        }
        for (node, p) in &self.peers {
            let Some(conn) = p.conn else { continue };
            match self.conns.get(&conn).map(|c| c.state) {
                Some(ConnState::Active(n)) if n == *node => {}
                _ => return Err(format!("peer {node:?}: active conn not active")),
            }
        }
        for (id, c) in &self.conns {
            if let ConnState::Probing { node, old, .. } = c.state
                && self.peers.get(&node).and_then(|p| p.conn) != Some(old)
            {
                return Err(format!(
                    "{id:?} probes {old:?}, not {node:?}'s active trunk"
                ));
            }
        }
        Ok(())
    }
}
