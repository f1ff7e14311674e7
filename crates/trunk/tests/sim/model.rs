//! The model of each node's local SFU: what it has (participants, tracks,
//! the publishers' media sources) and what it believes about the rest of
//! the cluster, built only from the events its node emitted (`on_event`),
//! plus the SFU's calls into the node (join, leave, publish, subscribe).
//! The invariants compare this model with the nodes' snapshots.

use crate::Sim;
use crate::invariants::FOREIGN_DATA_INVARIANT;
use crate::network::sim_addr;
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use trunk::proto::{
    CodecParams, Event, Layer, Node, NodeId, ParticipantId, ParticipantInfo, RoomName, Time,
    TrackId, TrackInfo, TrackKind, TrackSource, WireId,
};

/// A local track's media source (the publisher behind the local SFU).
#[derive(Debug)]
pub(crate) struct Source {
    pub(crate) wire: WireId,
    pub(crate) participant: ParticipantId,
    pub(crate) video: bool,
    /// Next extended sequence number.
    pub(crate) seq: u32,
    /// The last one that went to at least one subscriber, and when.
    pub(crate) last_sent: Option<(u32, Time)>,
}

/// One node: the protocol state machine plus a model of its local SFU,
/// built only from the events the node emitted.
pub(crate) struct SimNode {
    pub(crate) id: NodeId,
    pub(crate) alive: bool,
    pub(crate) epoch: u64,
    pub(crate) node: Node,
    pub(crate) timer: Option<Time>,
    pub(crate) participants: BTreeMap<ParticipantId, RoomName>,
    pub(crate) tracks: BTreeMap<TrackId, (RoomName, ParticipantId, WireId)>,
    pub(crate) remote_tracks: BTreeMap<(RoomName, NodeId, WireId), TrackInfo>,
    pub(crate) remote_participants: BTreeMap<(RoomName, NodeId, ParticipantId), ParticipantInfo>,
    /// What the local SFU subscribed to.
    pub(crate) wanted: BTreeMap<(RoomName, NodeId, WireId), BTreeSet<Layer>>,
    /// What peers asked of our tracks (from Subscribe events).
    pub(crate) subscribers: BTreeMap<(RoomName, NodeId, TrackId), BTreeSet<Layer>>,
    pub(crate) data_seen: BTreeMap<(NodeId, ParticipantId), u64>,
    /// Media sources of the local tracks.
    pub(crate) sources: BTreeMap<TrackId, Source>,
    /// Every wire id this node ever published, in any incarnation.
    pub(crate) old_wires: BTreeSet<WireId>,
    /// Every track it ever published, in any incarnation.
    pub(crate) old_tracks: Vec<TrackId>,
    /// Origin clock: virtual time plus this (µs). A restart starts it at
    /// zero, like the driver's clock (time since the process started).
    pub(crate) skew: i64,
    /// The last media datagram delivered per remote track (origin, wire).
    pub(crate) last_media: BTreeMap<(NodeId, WireId), Vec<u8>>,
    /// Once-valid wire ids: remote tracks this incarnation was told of and
    /// then saw removed (and not announced again since), with the last
    /// datagram it got of each. Datagrams naming them must create nothing.
    pub(crate) retired: BTreeMap<(NodeId, WireId), Option<Vec<u8>>>,
    /// Room-scoped frames it accepted lately (sender, body), replayed once
    /// stale (`strays.rs`).
    pub(crate) heard: VecDeque<(NodeId, Vec<u8>)>,
}

/// How many accepted frames a node remembers for replay.
pub(crate) const HEARD: usize = 64;

impl SimNode {
    pub(crate) fn new(id: NodeId, node: Node, skew: i64) -> Self {
        SimNode {
            id,
            alive: true,
            epoch: 0,
            node,
            timer: None,
            participants: BTreeMap::new(),
            tracks: BTreeMap::new(),
            remote_tracks: BTreeMap::new(),
            remote_participants: BTreeMap::new(),
            wanted: BTreeMap::new(),
            subscribers: BTreeMap::new(),
            data_seen: BTreeMap::new(),
            sources: BTreeMap::new(),
            old_wires: BTreeSet::new(),
            old_tracks: Vec::new(),
            skew,
            last_media: BTreeMap::new(),
            retired: BTreeMap::new(),
            heard: VecDeque::new(),
        }
    }

    /// A restart: a new process with nothing local and nothing learned.
    pub(crate) fn restart(&mut self, node: Node, skew: i64) {
        self.alive = true;
        self.node = node;
        self.participants.clear();
        self.tracks.clear();
        self.remote_tracks.clear();
        self.remote_participants.clear();
        self.wanted.clear();
        self.subscribers.clear();
        self.data_seen.clear();
        self.sources.clear();
        self.last_media.clear();
        self.retired.clear();
        self.skew = skew;
    }
}

impl Sim {
    /// The local SFU learns of an event: update the model and check that
    /// the event makes sense (exactly once, in order, for open rooms).
    pub(crate) fn on_event(&mut self, i: usize, ev: Event) {
        if self.trace {
            eprintln!("  [{}ms] node {} event {ev:?}", self.now.0 / 1000, i + 1);
        }
        let open =
            |s: &Self, room: &RoomName| s.nodes[i].node.snapshot().local_rooms.contains_key(room);
        match ev {
            Event::Dial { addr } => {
                let Some(target) = (0..self.nodes.len()).find(|j| sim_addr(*j) == addr) else {
                    self.fail(format!("node {}: dial of unknown address {addr}", i + 1));
                    return;
                };
                self.dial(i, target, Some(addr));
            }
            Event::Redial { node } => {
                let target = (node.0 - 1) as usize;
                self.dial(i, target, None);
            }
            Event::LinkUp { .. } => {}
            // Every simulated process has its own id, and restarts leave
            // their old trunks dead: nothing may be refused for its id.
            Event::Refused { conn, node, why } => self.fail(format!(
                "node {}: refused {conn:?} claiming {node:?} ({why:?}) among distinct ids",
                i + 1
            )),
            Event::LinkDown { node, .. } => {
                let n = &self.nodes[i];
                if n.remote_tracks.keys().any(|k| k.1 == node)
                    || n.remote_participants.keys().any(|k| k.1 == node)
                    || n.subscribers.keys().any(|k| k.1 == node)
                {
                    self.fail(format!(
                        "node {}: link to {node:?} down before its state was removed",
                        i + 1
                    ));
                }
            }
            Event::RemoteParticipantAdded {
                room,
                node,
                participant,
            } => {
                if !open(self, &room) {
                    self.fail(format!(
                        "node {}: participant event for room {room} not open",
                        i + 1
                    ));
                }
                let key = (room, node, participant.id);
                if self.nodes[i]
                    .remote_participants
                    .insert(key.clone(), participant)
                    .is_some()
                {
                    self.fail(format!("node {}: participant {key:?} added twice", i + 1));
                }
            }
            Event::RemoteParticipantRemoved {
                room,
                node,
                participant,
            } => {
                let key = (room, node, participant);
                if self.nodes[i].remote_participants.remove(&key).is_none() {
                    self.fail(format!(
                        "node {}: removal of unknown participant {key:?}",
                        i + 1
                    ));
                }
            }
            Event::RemoteTrackAdded {
                room,
                node,
                wire_id,
                track,
            } => {
                if !open(self, &room) {
                    self.fail(format!(
                        "node {}: track event for room {room} not open",
                        i + 1
                    ));
                }
                // A restarted origin numbers its tracks afresh: the wire id
                // is valid again.
                self.nodes[i].retired.remove(&(node, wire_id));
                let key = (room, node, wire_id);
                if self.nodes[i]
                    .remote_tracks
                    .insert(key.clone(), track)
                    .is_some()
                {
                    self.fail(format!(
                        "node {}: track {key:?} added twice (exactly once)",
                        i + 1
                    ));
                }
            }
            Event::RemoteTrackRemoved {
                room,
                node,
                wire_id,
            } => {
                let key = (room, node, wire_id);
                let n = &mut self.nodes[i];
                if n.remote_tracks.remove(&key).is_none() {
                    self.fail(format!("node {}: removal of unknown track {key:?}", i + 1));
                    return;
                }
                n.wanted.remove(&key);
                let last = n.last_media.remove(&(node, wire_id));
                n.retired.insert((node, wire_id), last);
            }
            Event::SubscribeRequested {
                room,
                node,
                track,
                layer,
            } => {
                if !self.nodes[i].tracks.contains_key(&track) {
                    self.fail(format!(
                        "node {}: subscribe to unknown local track {track:?}",
                        i + 1
                    ));
                }
                let fresh = self.nodes[i]
                    .subscribers
                    .entry((room, node, track))
                    .or_default()
                    .insert(layer);
                if !fresh {
                    self.fail(format!("node {}: duplicate SubscribeRequested", i + 1));
                }
            }
            Event::SubscribeCancelled {
                room,
                node,
                track,
                layer,
            } => {
                let key = (room, node, track);
                let subs = &mut self.nodes[i].subscribers;
                let had = subs.get_mut(&key).is_some_and(|l| l.remove(&layer));
                if subs.get(&key).is_some_and(|l| l.is_empty()) {
                    subs.remove(&key);
                }
                if !had {
                    self.fail(format!(
                        "node {}: SubscribeCancelled without request {key:?}",
                        i + 1
                    ));
                }
            }
            Event::KeyframeRequested { track, .. } => {
                if !self.nodes[i].tracks.contains_key(&track) {
                    self.fail(format!(
                        "node {}: keyframe request for unknown track",
                        i + 1
                    ));
                }
            }
            Event::DataReceived {
                room,
                node,
                from,
                payload,
            } => {
                if !open(self, &room) {
                    self.fail(format!("node {}: data for room {room} not open", i + 1));
                }
                if !self.nodes[i]
                    .remote_participants
                    .contains_key(&(room.clone(), node, from))
                {
                    return self.fail(format!(
                        "{FOREIGN_DATA_INVARIANT}: node {} got data from {from:?} via {node:?} in {room}, not announced there",
                        i + 1
                    ));
                }
                let seq = payload
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes);
                let Some(seq) = seq else {
                    self.fail("bad data payload".into());
                    return;
                };
                let last = self.nodes[i].data_seen.insert((node, from), seq);
                if last.is_some_and(|l| l >= seq) {
                    self.fail(format!(
                        "node {}: data out of order from {node:?}/{from:?}",
                        i + 1
                    ));
                }
            }
        }
    }

    /// A participant joins `room` on node `i` (opening it if it is the first).
    pub(crate) fn join(&mut self, i: usize, room: RoomName) {
        let now = self.now;
        let n = &mut self.nodes[i];
        if !n.participants.values().any(|r| *r == room)
            && let Err(e) = n.node.open_room(room.clone(), now)
        {
            self.fail(format!("open_room: {e}"));
            return;
        }
        let id = ParticipantId(self.new_id());
        let info = ParticipantInfo {
            id,
            display_name: format!("p{}", id.0),
        };
        let n = &mut self.nodes[i];
        let r = n.node.participant_joined(&room, info);
        n.participants.insert(id, room);
        if let Err(e) = r {
            self.fail(format!("participant_joined: {e}"));
        }
        self.pump(i);
    }

    /// A local participant leaves; its tracks go, and its room closes if
    /// it was the last.
    pub(crate) fn leave(&mut self, i: usize, pid: ParticipantId) {
        let now = self.now;
        let n = &mut self.nodes[i];
        let Some(room) = n.participants.remove(&pid) else {
            return;
        };
        let gone: Vec<TrackId> = n
            .tracks
            .iter()
            .filter(|(_, (_, p, _))| *p == pid)
            .map(|(t, _)| *t)
            .collect();
        for t in &gone {
            n.tracks.remove(t);
            n.sources.remove(t);
            n.subscribers.retain(|k, _| k.2 != *t);
        }
        let r = n.node.participant_left(&room, pid);
        let mut err = r.err().map(|e| format!("participant_left: {e}"));
        if !n.participants.values().any(|r| *r == room)
            && let Err(e) = n.node.close_room(&room, now)
        {
            err = Some(format!("close_room: {e}"));
        }
        if let Some(e) = err {
            self.fail(e);
        }
        for t in gone {
            self.check_track_gone(i, t);
        }
        self.pump(i);
        // Closing a room must have told the SFU to drop everything in it.
        let n = &self.nodes[i];
        if !n.participants.values().any(|r| *r == room)
            && (n.remote_tracks.keys().any(|k| k.0 == room)
                || n.remote_participants.keys().any(|k| k.0 == room)
                || n.wanted.keys().any(|k| k.0 == room))
        {
            self.fail(format!(
                "node {}: closed room {room} but remote state remains",
                i + 1
            ));
        }
    }

    /// The SFU unpublishes a local track.
    pub(crate) fn unpublish(&mut self, i: usize, t: TrackId, room: RoomName) {
        self.nodes[i].tracks.remove(&t);
        self.nodes[i].sources.remove(&t);
        self.nodes[i].subscribers.retain(|k, _| k.2 != t);
        if let Err(e) = self.nodes[i].node.unpublish_track(&room, t) {
            self.fail(format!("unpublish_track: {e}"));
        }
        self.check_track_gone(i, t);
        self.pump(i);
    }

    /// A local participant publishes a track (video if it has layers).
    pub(crate) fn publish(&mut self, i: usize, p: ParticipantId, tid: TrackId, layers: usize) {
        let room = self.nodes[i].participants[&p].clone();
        let video = layers > 1;
        let info = TrackInfo {
            participant: p,
            kind: if video {
                TrackKind::Video
            } else {
                TrackKind::Audio
            },
            source: if video {
                TrackSource::Camera
            } else {
                TrackSource::Microphone
            },
            codec: CodecParams {
                mime_type: "video/VP8".into(),
                clock_rate: 90_000,
                channels: None,
                payload_type: 96,
                fmtp: String::new(),
            },
            layers: (0..layers).map(|l| format!("l{l}")).collect(),
        };
        // Sequence numbers start anywhere, often just before the wrap.
        let start: u16 = if self.mrng.random_bool(0.3) {
            u16::MAX - self.mrng.random_range(0..2000)
        } else {
            self.mrng.random()
        };
        match self.nodes[i].node.publish_track(&room, tid, info) {
            Ok(wire) => {
                let n = &mut self.nodes[i];
                n.tracks.insert(tid, (room, p, wire));
                n.sources.insert(
                    tid,
                    Source {
                        wire,
                        participant: p,
                        video,
                        seq: u32::from(start),
                        last_sent: None,
                    },
                );
                n.old_wires.insert(wire);
                n.old_tracks.push(tid);
            }
            Err(e) => self.fail(format!("publish_track: {e}")),
        }
        self.pump(i);
    }

    /// The local SFU subscribes to a layer of a remote track.
    pub(crate) fn subscribe(&mut self, i: usize, key: (RoomName, NodeId, WireId), layer: Layer) {
        let (room, node, wire) = key.clone();
        if let Err(e) = self.nodes[i].node.subscribe(&room, node, wire, layer) {
            self.fail(format!("subscribe to a track the SFU was told about: {e}"));
        }
        let layers = self.nodes[i].wanted.entry(key).or_default();
        if layers.is_empty() {
            // A fresh subscription: the receiver's repair state starts anew.
            self.next_sub_gen += 1;
            self.sub_gen.insert((i, node, wire), self.next_sub_gen);
        }
        layers.insert(layer);
        self.pump(i);
    }

    /// The local SFU drops a layer of a remote track it subscribes.
    pub(crate) fn unsubscribe(&mut self, i: usize, key: (RoomName, NodeId, WireId), layer: Layer) {
        let (room, node, wire) = key.clone();
        if let Err(e) = self.nodes[i].node.unsubscribe(&room, node, wire, layer) {
            self.fail(format!("unsubscribe: {e}"));
        }
        let w = &mut self.nodes[i].wanted;
        if let Some(ls) = w.get_mut(&key) {
            ls.remove(&layer);
            if ls.is_empty() {
                w.remove(&key);
            }
        }
        self.pump(i);
    }
}
