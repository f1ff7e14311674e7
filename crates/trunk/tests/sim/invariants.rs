//! Invariants on the cluster's state (numbered as in DESIGN.md,
//! "Invariants"): convergence, exactly once and the subscriptions on a
//! settled cluster, the SFU model against the core by identity
//! (`check_settled`); no ghosts (`check_ghosts`); no leaks once everyone
//! left and after every unpublish (`check_empty`, `check_track_gone`); no
//! creation from data — every frame is judged stale or current before it
//! arrives and a stale one must only count a stale drop (`deliver_frame`),
//! and a stray datagram for an unknown or once-valid wire id only counts an
//! unknown-wire drop (`stray_unknown`). "No orphans" is the node's own
//! `check_structure`, run after every step (`pump`).

use crate::model::HEARD;
use crate::{Sim, stat};
use std::collections::{BTreeMap, BTreeSet};
use trunk::proto::wire::{self, Message};
use trunk::proto::{
    ConnId, Incarnation, Layer, Metrics, Node, NodeId, NodeSnapshot, ParticipantId,
    ParticipantInfo, RoomName, TrackId, TrackInfo, WireId,
};

/// How a violation of invariant 6 by a stale room-scoped message starts.
pub(crate) const STALE_INVARIANT: &str = "no creation from data: stale message";
/// How a violation by `Data` speaking for a participant its sender did
/// not announce in that room starts (invariant 6's sibling: no node speaks
/// for another's participants).
pub(crate) const FOREIGN_DATA_INVARIANT: &str = "no speaking for others: data from";
/// How a violation of invariant 6 by a datagram naming a wire id that
/// existed once (a removed track's) starts.
pub(crate) const ONCE_VALID_INVARIANT: &str = "no creation from data: once-valid wire id";

/// Whether the generation gate of `node` must refuse `msg` from `from`,
/// judged from what it knows before the message arrives (DESIGN.md: a
/// room-scoped message is accepted only if the room is open here with
/// generation `to`, the sender's last `Open` named `from`, and the room
/// link is up; a `Close` only if it names the sender's announced
/// generation). `None`: not room-scoped, never a stale drop.
pub(crate) fn stale_verdict(node: &Node, from: NodeId, msg: &Message) -> Option<bool> {
    let (room, gens) = match msg {
        Message::Close { room, generation } => {
            let (_, remote, _) = node.room_link_gens(from, room);
            return Some(remote != Some(*generation));
        }
        Message::ParticipantJoined { room, gens, .. }
        | Message::ParticipantLeft { room, gens, .. }
        | Message::TrackAdded { room, gens, .. }
        | Message::TrackRemoved { room, gens, .. }
        | Message::Subscribe { room, gens, .. }
        | Message::Unsubscribe { room, gens, .. }
        | Message::KeyframeRequest { room, gens, .. }
        | Message::Data { room, gens, .. } => (room, gens),
        Message::Hello { .. }
        | Message::Ping { .. }
        | Message::Pong { .. }
        | Message::Open { .. }
        | Message::Goodbye { .. } => return None,
    };
    let (local, remote, up) = node.room_link_gens(from, room);
    Some(!(local == Some(gens.to) && remote == Some(gens.from) && up))
}

impl Sim {
    /// Hand node `i` a frame body from `from` on `conn`, checking invariant
    /// 6 for it: on the sender's active trunk, a room-scoped message the
    /// generation gate must refuse changes no state, emits nothing and
    /// counts exactly one stale drop; any other message counts none. Fresh
    /// room-scoped frames are remembered for replay.
    pub(crate) fn deliver_frame(&mut self, i: usize, from: NodeId, conn: u64, body: &[u8]) {
        let now = self.now;
        let n = &self.nodes[i];
        let judged = (n.node.peer_conn(from) == Some(ConnId(conn)))
            .then(|| wire::decode_body(body).ok())
            .flatten()
            .and_then(|msg| Some((stale_verdict(&n.node, from, &msg)?, msg)));
        let drops = n.node.metrics().stale_drops;
        let before = matches!(judged, Some((true, _))).then(|| strip(&n.node.snapshot()));
        let node = &mut self.nodes[i].node;
        node.handle_frame(ConnId(conn), body, now);
        let counted = node.metrics().stale_drops - drops;
        let Some((stale, msg)) = judged else {
            if counted != 0 {
                self.fail(format!(
                    "{STALE_INVARIANT}: node {} counted {counted} stale drops for a message that is not room-scoped",
                    i + 1
                ));
            }
            return;
        };
        if !stale {
            if counted != 0 {
                return self.fail(format!(
                    "stale drops count only stale messages: node {} counted a current {msg:?} from {from:?}",
                    i + 1
                ));
            }
            let heard = &mut self.nodes[i].heard;
            if heard.len() == HEARD {
                heard.pop_front();
            }
            heard.push_back((from, body.to_vec()));
            return;
        }
        stat(16, 1);
        let why = if counted != 1 {
            Some(format!("counted {counted} stale drops"))
        } else if before.as_ref() != Some(&strip(&node.snapshot())) {
            Some("state changed".to_string())
        } else if let Some(ev) = node.poll_event() {
            Some(format!("emitted {ev:?}"))
        } else {
            node.poll_transmit().map(|t| format!("answered {t:?}"))
        };
        if let Some(why) = why {
            self.fail(format!(
                "{STALE_INVARIANT} not only dropped and counted: node {} given {msg:?} from {from:?}: {why}",
                i + 1
            ));
        }
    }

    /// No leaks: nothing of an unpublished local track survives (its room
    /// index `track_rooms`, its media fast path).
    pub(crate) fn check_track_gone(&mut self, i: usize, t: TrackId) {
        let node = &self.nodes[i].node;
        if let Some(room) = node.local_track_room(t) {
            let room = room.clone();
            return self.fail(format!(
                "no leaks: node {} still indexes unpublished {t:?} under room {room}",
                i + 1
            ));
        }
        if node.local_track_kind(t).is_some() {
            self.fail(format!(
                "no leaks: node {} still has the media fast path of unpublished {t:?}",
                i + 1
            ));
        }
    }

    /// Invariant 3, no ghosts: none of `among` (alive) still holds a trunk
    /// to `node`'s dead `incarnation`.
    pub(crate) fn check_ghosts(&mut self, node: usize, incarnation: Incarnation, among: &[usize]) {
        let id = self.nodes[node].id;
        for (j, other) in self.nodes.iter().enumerate() {
            if !other.alive || j == node || !among.contains(&j) {
                continue;
            }
            let snap = other.node.snapshot();
            if let Some(p) = snap.peers.get(&id)
                && p.up
                && p.incarnation == Some(incarnation)
            {
                let msg = format!(
                    "no ghosts: node {} still holds dead node {}'s old trunk",
                    j + 1,
                    node + 1
                );
                self.fail(msg);
                return;
            }
        }
    }

    /// Invariants 1, 2 and 4 on a settled cluster; returns the first violation.
    pub(crate) fn check_settled(&mut self) {
        // Honest peers, however fast they join and leave, are never cut as
        // flooders (`max_reopens_per_sec`, `max_remote_rooms`).
        for (i, n) in self.nodes.iter().enumerate() {
            let floods = n.node.metrics().open_floods;
            if floods > 0 {
                return self.fail(format!(
                    "convergence: node {} cut an honest peer {floods} time(s) for re-opening rooms",
                    i + 1
                ));
            }
        }
        let snaps: Vec<_> = self.nodes.iter().map(|n| n.node.snapshot()).collect();
        for (a, sa) in snaps.iter().enumerate() {
            let na = &self.nodes[a];
            for (b, sb) in snaps.iter().enumerate() {
                if a == b {
                    continue;
                }
                let idb = self.nodes[b].id;
                let Some(pa) = sa.peers.get(&idb).filter(|p| p.up) else {
                    return self.fail(format!(
                        "convergence: trunk {}->{} not up after settling",
                        a + 1,
                        b + 1
                    ));
                };
                if pa.incarnation != sb.incarnation {
                    return self.fail(format!(
                        "convergence: node {} holds a stale incarnation of {}",
                        a + 1,
                        b + 1
                    ));
                }
                let b_open: BTreeMap<_, _> = sb
                    .local_rooms
                    .iter()
                    .map(|(r, l)| (r.clone(), l.generation))
                    .collect();
                if pa.remote_open != b_open {
                    return self.fail(format!(
                        "convergence: node {} thinks {} has {:?}, it has {:?}",
                        a + 1,
                        b + 1,
                        pa.remote_open,
                        b_open
                    ));
                }
                for (room, la) in &sa.local_rooms {
                    let link = pa.rooms.get(room);
                    match sb.local_rooms.get(room) {
                        Some(lb) => {
                            let Some(link) = link else {
                                return self.fail(format!(
                                    "convergence: room link {room} {}->{} down",
                                    a + 1,
                                    b + 1
                                ));
                            };
                            if link.tracks != lb.tracks || link.participants != lb.participants {
                                return self.fail(format!(
                                    "convergence: node {} view of {}'s room {room} differs",
                                    a + 1,
                                    b + 1
                                ));
                            }
                            // The SFU model (from events) agrees with the core.
                            let ev_tracks: BTreeMap<WireId, TrackInfo> = na
                                .remote_tracks
                                .iter()
                                .filter(|(k, _)| k.0 == *room && k.1 == idb)
                                .map(|(k, v)| (k.2, v.clone()))
                                .collect();
                            stat(0, ev_tracks.len() as u64);
                            if ev_tracks != lb.tracks {
                                return self.fail(format!(
                                    "exactly once: node {} events for {}'s tracks in {room} differ",
                                    a + 1,
                                    b + 1
                                ));
                            }
                            // By identity, not count: the participants A's
                            // SFU was told of are exactly B's, as B knows them.
                            let ev_parts: BTreeMap<ParticipantId, ParticipantInfo> = na
                                .remote_participants
                                .iter()
                                .filter(|(k, _)| k.0 == *room && k.1 == idb)
                                .map(|(k, v)| (k.2, v.clone()))
                                .collect();
                            if ev_parts != lb.participants {
                                return self.fail(format!(
                                    "convergence: node {} roster of {}'s {room} differs: told of {:?}, {} has {:?}",
                                    a + 1,
                                    b + 1,
                                    ev_parts.keys().collect::<Vec<_>>(),
                                    b + 1,
                                    lb.participants.keys().collect::<Vec<_>>()
                                ));
                            }
                            // Subscriptions: what A wants is what B serves.
                            let want: BTreeMap<WireId, BTreeSet<Layer>> = na
                                .wanted
                                .iter()
                                .filter(|(k, l)| k.0 == *room && k.1 == idb && !l.is_empty())
                                .map(|(k, v)| (k.2, v.clone()))
                                .collect();
                            stat(5, want.len() as u64);
                            if link.subscribed != want {
                                return self.fail(format!(
                                    "subscriptions: node {} core {:?} != sfu {:?}",
                                    a + 1,
                                    link.subscribed,
                                    want
                                ));
                            }
                            let served: BTreeMap<WireId, BTreeSet<Layer>> = lb
                                .subscribers
                                .iter()
                                .filter(|(k, _)| k.1 == na.id)
                                .map(|(k, v)| (k.0, v.clone()))
                                .collect();
                            if served != want {
                                return self.fail(format!(
                                    "subscriptions: node {} wants {want:?} of {}, which serves {served:?}",
                                    a + 1,
                                    b + 1
                                ));
                            }
                            let _ = la;
                        }
                        None => {
                            if link.is_some() {
                                return self.fail(format!(
                                    "room link {room} {}->{} up but {} has it closed",
                                    a + 1,
                                    b + 1,
                                    b + 1
                                ));
                            }
                        }
                    }
                }
            }
            // The SFU's own participants and tracks are the core's, by
            // identity: same ids in the same rooms, same wire ids.
            let mut model_local: BTreeMap<RoomName, BTreeSet<ParticipantId>> = BTreeMap::new();
            for (pid, room) in &na.participants {
                model_local.entry(room.clone()).or_default().insert(*pid);
            }
            let core_local: BTreeMap<RoomName, BTreeSet<ParticipantId>> = sa
                .local_rooms
                .iter()
                .map(|(r, l)| (r.clone(), l.participants.keys().copied().collect()))
                .collect();
            if model_local != core_local {
                return self.fail(format!(
                    "convergence: node {} local participants {model_local:?} != core {core_local:?}",
                    a + 1
                ));
            }
            let model_tracks: BTreeSet<(RoomName, WireId, ParticipantId)> = na
                .tracks
                .values()
                .map(|(r, p, w)| (r.clone(), *w, *p))
                .collect();
            let core_tracks: BTreeSet<(RoomName, WireId, ParticipantId)> = sa
                .local_rooms
                .iter()
                .flat_map(|(r, l)| l.tracks.iter().map(|(w, t)| (r.clone(), *w, t.participant)))
                .collect();
            if model_tracks != core_tracks {
                return self.fail(format!(
                    "convergence: node {} local tracks {model_tracks:?} != core {core_tracks:?}",
                    a + 1
                ));
            }
            for (t, (room, _, _)) in &na.tracks {
                if na.node.local_track_room(*t) != Some(room) {
                    return self.fail(format!(
                        "convergence: node {} indexes local {t:?} under {:?}, not {room}",
                        a + 1,
                        na.node.local_track_room(*t)
                    ));
                }
            }
            // Origin-side event model matches the core.
            let ev_subs: BTreeMap<(WireId, NodeId), BTreeSet<Layer>> = na
                .subscribers
                .iter()
                .filter_map(|((_, node, tid), l)| Some(((na.tracks.get(tid)?.2, *node), l.clone())))
                .collect();
            let core_subs: BTreeMap<(WireId, NodeId), BTreeSet<Layer>> = sa
                .local_rooms
                .values()
                .flat_map(|r| r.subscribers.clone())
                .collect();
            if ev_subs != core_subs {
                return self.fail(format!(
                    "subscriptions: node {} events {ev_subs:?} != core {core_subs:?}",
                    a + 1
                ));
            }
        }
    }

    /// Invariant 5: with every participant gone, every map is empty.
    pub(crate) fn check_empty(&mut self) {
        for i in 0..self.nodes.len() {
            let s = self.nodes[i].node.snapshot();
            let n = &self.nodes[i];
            let leaks = !s.local_rooms.is_empty()
                || s.peers
                    .values()
                    .any(|p| !p.remote_open.is_empty() || !p.rooms.is_empty() || p.wires != 0)
                || !n.remote_tracks.is_empty()
                || !n.remote_participants.is_empty()
                || !n.subscribers.is_empty()
                || !n.wanted.is_empty();
            if leaks {
                return self.fail(format!(
                    "no leaks: node {} holds state after everyone left: {s:?}",
                    i + 1
                ));
            }
        }
    }

    /// Nothing is created from a datagram for a wire id the receiver does
    /// not know (or knew once): no output, no state, only drop counters.
    pub(crate) fn stray_unknown(
        &mut self,
        i: usize,
        conn: u64,
        bytes: &[u8],
        wire: WireId,
        once_valid: bool,
    ) {
        let now = self.now;
        let node = &mut self.nodes[i].node;
        let (s0, m0) = (node.snapshot(), node.metrics().clone());
        let accepted = node.handle_datagram(ConnId(conn), bytes, now).is_some();
        let answered = node.poll_datagram().is_some()
            || node.poll_transmit().is_some()
            || node.poll_event().is_some();
        let (s1, m1) = (node.snapshot(), node.metrics().clone());
        let why = if accepted {
            Some("accepted".to_string())
        } else if answered {
            Some("answered it".to_string())
        } else if m1.unknown_wire_drops != m0.unknown_wire_drops + 1 {
            Some(format!(
                "unknown-wire drops {} -> {}, not one more",
                m0.unknown_wire_drops, m1.unknown_wire_drops
            ))
        } else {
            only_drops(&s0, &s1, &m0, &m1)
        };
        if let Some(why) = why {
            let what = if once_valid {
                ONCE_VALID_INVARIANT
            } else {
                "no creation from data: unknown wire id"
            };
            return self.fail(format!(
                "{what} {wire:?}: node {} given a stray datagram on conn {conn}: {why}",
                i + 1
            ));
        }
        self.pump(i);
    }
}

/// A snapshot without the peers' media counters.
pub(crate) fn strip(s: &NodeSnapshot) -> NodeSnapshot {
    let mut s = s.clone();
    for p in s.peers.values_mut() {
        p.media = Default::default();
    }
    s
}

/// Why the change from (`s0`, `m0`) to (`s1`, `m1`) is more than a counted
/// drop of an incoming datagram, if it is.
pub(crate) fn only_drops(
    s0: &NodeSnapshot,
    s1: &NodeSnapshot,
    m0: &Metrics,
    m1: &Metrics,
) -> Option<String> {
    if strip(s0) != strip(s1) {
        return Some(format!("state changed: {s0:?} -> {s1:?}"));
    }
    for (id, p1) in &s1.peers {
        let p0 = &s0.peers[id].media;
        let mut m = p1.media;
        m.nacks_received = p0.nacks_received;
        m.nack_seqs_received = p0.nack_seqs_received;
        m.retransmits_refused = p0.retransmits_refused;
        if m != *p0 {
            return Some(format!(
                "{id:?}'s media counters changed: {p0:?} -> {:?}",
                p1.media
            ));
        }
    }
    let mut m = m1.clone();
    m.datagrams_in = m0.datagrams_in;
    m.nacks_received = m0.nacks_received;
    m.unknown_wire_drops = m0.unknown_wire_drops;
    m.retransmits_refused = m0.retransmits_refused;
    if m != *m0 {
        return Some(format!(
            "counters other than drops changed: {m0:?} -> {m1:?}"
        ));
    }
    if m1.unknown_wire_drops + m1.retransmits_refused
        <= m0.unknown_wire_drops + m0.retransmits_refused
    {
        return Some("the drop was not counted".into());
    }
    None
}
