//! One node's trunk protocol: every peer link, every room link, the track
//! directory and subscriptions, behind a sans-IO API.

use super::directory::{LocalRoom, LocalTrack, RemoteRoom, RemoteTrack};
use super::error::{DecodeError, LocalError};
use super::heartbeat::{Heartbeat, HeartbeatAction};
use super::link::{Conn, ConnState, DialState, Peer, SplitMix, backoff};
use super::metrics::Metrics;
use super::ratelimit::RateLimiter;
use super::time::Time;
use super::types::{
    CloseCode, ConnId, Generation, Gens, Incarnation, Layer, NodeId, ParticipantId,
    ParticipantInfo, RoomName, TrackId, TrackInfo, WireId,
};
use super::wire::{self, MAX_DATA_PAYLOAD, Message, PROTOCOL_VERSION};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

/// Static configuration of a node's trunk protocol.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: NodeId,
    /// Cluster name; a Hello naming another cluster is refused.
    pub cluster: String,
    /// Ping interval.
    pub heartbeat: Duration,
    /// Silent heartbeats before a trunk is declared dead.
    pub misses: u32,
    /// First redial delay (before jitter); doubles per failed attempt.
    pub redial_base: Duration,
    /// Redial delay cap.
    pub redial_cap: Duration,
    /// Minimum spacing of keyframe requests per track.
    pub keyframe_interval: Duration,
    /// Test-only switches that plant known bugs (see `tests/sim.rs`).
    #[cfg(feature = "planted-bugs")]
    pub bugs: PlantedBugs,
}

impl Config {
    pub fn new(node_id: NodeId, cluster: impl Into<String>) -> Self {
        Self {
            node_id,
            cluster: cluster.into(),
            heartbeat: Duration::from_secs(1),
            misses: 3,
            redial_base: Duration::from_millis(100),
            redial_cap: Duration::from_secs(10),
            keyframe_interval: Duration::from_millis(500),
            #[cfg(feature = "planted-bugs")]
            bugs: PlantedBugs::default(),
        }
    }
}

/// Known bugs the simulation must be able to find. Only compiled with the
/// `planted-bugs` feature, which only the crate's own tests enable.
#[cfg(feature = "planted-bugs")]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlantedBugs {
    /// Accept room-scoped messages whatever their generations, creating
    /// room-link state when missing (the earlier design's recreation bug).
    pub ignore_generations: bool,
    /// Do not send `Open` for local rooms after a *re*connect.
    pub skip_resync: bool,
    /// Keep what a peer taught us when it comes back with a new incarnation.
    pub keep_state_on_restart: bool,
}

/// Something for the driver to send or do on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// Write these bytes (one or more complete frames) on the control stream.
    Frame { conn: ConnId, bytes: Vec<u8> },
    /// Close the connection with this code, after flushing earlier frames.
    /// The core has already forgotten it: do not report it lost.
    Close { conn: ConnId, code: CloseCode },
}

/// What happened, for the local SFU (and the driver, for `Redial`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    LinkUp {
        node: NodeId,
        incarnation: Incarnation,
    },
    LinkDown {
        node: NodeId,
        reason: CloseCode,
    },
    RemoteParticipantAdded {
        room: RoomName,
        node: NodeId,
        participant: ParticipantInfo,
    },
    RemoteParticipantRemoved {
        room: RoomName,
        node: NodeId,
        participant: ParticipantId,
    },
    RemoteTrackAdded {
        room: RoomName,
        node: NodeId,
        wire_id: WireId,
        track: TrackInfo,
    },
    /// Also implies every local subscription to it is gone.
    RemoteTrackRemoved {
        room: RoomName,
        node: NodeId,
        wire_id: WireId,
    },
    /// A peer wants this layer of a local track: start sending its media there.
    SubscribeRequested {
        room: RoomName,
        node: NodeId,
        track: TrackId,
        layer: Layer,
    },
    SubscribeCancelled {
        room: RoomName,
        node: NodeId,
        track: TrackId,
        layer: Layer,
    },
    /// Ask the publisher of this local track for a keyframe (already rate-limited).
    KeyframeRequested {
        room: RoomName,
        track: TrackId,
    },
    DataReceived {
        room: RoomName,
        node: NodeId,
        from: ParticipantId,
        payload: Vec<u8>,
    },
    /// Dial this node now; report with `handle_connected` or `handle_dial_failed`.
    Redial {
        node: NodeId,
    },
}

/// A media datagram accepted from a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteDatagram<'a> {
    pub node: NodeId,
    pub wire_id: WireId,
    pub packet: &'a [u8],
}

/// A read-only copy of a node's state, for invariant checks and the status API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSnapshot {
    pub incarnation: Option<Incarnation>,
    /// Local rooms: generation, participants, tracks (wire id, info) and subscribers.
    pub local_rooms: BTreeMap<RoomName, LocalRoomSnapshot>,
    pub peers: BTreeMap<NodeId, PeerSnapshot>,
    pub connections: usize,
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
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteRoomSnapshot {
    pub participants: BTreeMap<ParticipantId, ParticipantInfo>,
    pub tracks: BTreeMap<WireId, TrackInfo>,
    pub subscribed: BTreeMap<WireId, BTreeSet<Layer>>,
}

/// The trunk protocol state machine of one node.
#[derive(Debug)]
pub struct Node {
    config: Config,
    incarnation: Incarnation,
    rng: SplitMix,
    shut_down: bool,
    next_gen: u64,
    next_wire: u32,
    next_serial: u64,
    conns: HashMap<ConnId, Conn>,
    peers: BTreeMap<NodeId, Peer>,
    rooms: BTreeMap<RoomName, LocalRoom>,
    /// Local track → room, for the media fast path.
    track_rooms: HashMap<TrackId, RoomName>,
    out: VecDeque<Transmit>,
    events: VecDeque<Event>,
    metrics: Metrics,
}

/// Queue one message on a connection.
fn send(out: &mut VecDeque<Transmit>, metrics: &mut Metrics, conn: ConnId, msg: &Message) {
    match wire::encode_frame(msg) {
        Ok(bytes) => {
            metrics.frames_out += 1;
            metrics.bytes_out += bytes.len() as u64;
            out.push_back(Transmit::Frame { conn, bytes });
        }
        // Only oversized local input can fail; the local API bounds it, so
        // this is unreachable in practice. Count rather than panic.
        Err(_) => metrics.protocol_errors += 1,
    }
}

impl Node {
    /// A node at start. `seed` must be random per start (it draws the
    /// incarnation and the redial jitter); tests pass fixed seeds.
    pub fn new(config: Config, seed: u64) -> Self {
        let mut rng = SplitMix::new(seed);
        let incarnation = Incarnation(rng.next_u64());
        Self {
            config,
            incarnation,
            rng,
            shut_down: false,
            next_gen: 1,
            next_wire: 1,
            next_serial: 0,
            conns: HashMap::new(),
            peers: BTreeMap::new(),
            rooms: BTreeMap::new(),
            track_rooms: HashMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            metrics: Metrics::default(),
        }
    }

    pub fn node_id(&self) -> NodeId {
        self.config.node_id
    }

    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Smoothed-enough RTT of the trunk to `node` (last Ping/Pong).
    pub fn rtt(&self, node: NodeId) -> Option<Duration> {
        let conn = self.peers.get(&node)?.conn?;
        self.conns.get(&conn)?.heartbeat.rtt()
    }

    pub fn is_link_up(&self, node: NodeId) -> bool {
        self.peers.get(&node).is_some_and(|p| p.conn.is_some())
    }

    // ----- outputs -------------------------------------------------------

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The earliest time [`Self::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> Option<Time> {
        let mut t: Option<Time> = None;
        let mut min = |x: Time| t = Some(t.map_or(x, |y| y.min(x)));
        for c in self.conns.values() {
            min(c.heartbeat.poll_timeout());
        }
        for p in self.peers.values() {
            if let DialState::Scheduled(at) = p.dial {
                min(at);
            }
            for r in p.rooms.values() {
                for tr in r.tracks.values() {
                    if let Some(at) = tr.keyframes.poll_timeout() {
                        min(at);
                    }
                }
            }
        }
        for r in self.rooms.values() {
            for tr in r.tracks.values() {
                if let Some(at) = tr.keyframes.poll_timeout() {
                    min(at);
                }
            }
        }
        t
    }

    // ----- driver inputs -------------------------------------------------

    /// Configure a peer to dial (and redial whenever the link is lost).
    pub fn add_peer(&mut self, node: NodeId, now: Time) {
        if node == self.config.node_id || self.shut_down {
            return;
        }
        let peer = self.peers.entry(node).or_insert_with(|| Peer::new(true));
        peer.configured = true;
        if peer.conn.is_none() && peer.dial == DialState::Idle {
            peer.dial = DialState::Scheduled(now);
        }
    }

    /// A connection is established (`dialed = Some(peer)` if we dialed it).
    /// We send Hello at once; the link is up when the peer's Hello arrives.
    pub fn handle_connected(&mut self, conn: ConnId, dialed: Option<NodeId>, now: Time) {
        if self.shut_down {
            self.out.push_back(Transmit::Close {
                conn,
                code: CloseCode::Shutdown,
            });
            return;
        }
        if let Some(node) = dialed
            && let Some(peer) = self.peers.get_mut(&node)
            && peer.dial == DialState::Dialing
        {
            peer.dial = DialState::Idle;
        }
        self.next_serial += 1;
        self.conns.insert(
            conn,
            Conn {
                dialed,
                state: ConnState::Handshaking,
                heartbeat: Heartbeat::new(self.config.heartbeat, self.config.misses, now),
                serial: self.next_serial,
            },
        );
        let hello = Message::Hello {
            node_id: self.config.node_id,
            incarnation: self.incarnation,
            version: PROTOCOL_VERSION,
            cluster: self.config.cluster.clone(),
        };
        send(&mut self.out, &mut self.metrics, conn, &hello);
    }

    /// A dial requested by [`Event::Redial`] failed.
    pub fn handle_dial_failed(&mut self, node: NodeId, now: Time) {
        if let Some(peer) = self.peers.get_mut(&node)
            && peer.dial == DialState::Dialing
        {
            peer.dial = DialState::Idle;
            peer.attempts = peer.attempts.saturating_add(1);
        }
        self.ensure_redial(node, now);
    }

    /// The driver saw the connection close (peer's close, idle timeout, reset).
    pub fn handle_lost(&mut self, conn: ConnId, now: Time) {
        self.drop_conn(conn, None, CloseCode::Timeout, now);
    }

    /// One frame body from the control stream (see [`wire::split_frame`]).
    /// A malformed frame closes the trunk with a protocol error.
    pub fn handle_frame(&mut self, conn: ConnId, body: &[u8], now: Time) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        self.metrics.frames_in += 1;
        self.metrics.bytes_in += body.len() as u64 + wire::LEN_PREFIX as u64;
        c.heartbeat.on_receive(now);
        let state = c.state;
        let msg = match wire::decode_body(body) {
            Ok(m) => m,
            Err(e) => {
                self.protocol_error(conn, &e, now);
                return;
            }
        };
        match (state, msg) {
            (_, Message::Goodbye { reason }) => self.drop_conn(conn, None, reason, now),
            (
                ConnState::Handshaking,
                Message::Hello {
                    node_id,
                    incarnation,
                    version,
                    cluster,
                },
            ) => self.on_hello(conn, node_id, incarnation, version, &cluster, now),
            (ConnState::Handshaking, _) | (ConnState::Active(_), Message::Hello { .. }) => {
                self.protocol_error(conn, &DecodeError::Malformed("unexpected".into()), now)
            }
            (ConnState::Active(node), msg) => self.on_message(conn, node, msg, now),
        }
    }

    /// A media datagram. Returns it only if its wire id belongs to an up
    /// room link on this connection's peer; anything else is dropped and
    /// counted — nothing is ever created by a datagram.
    pub fn handle_datagram<'a>(
        &mut self,
        conn: ConnId,
        datagram: &'a [u8],
    ) -> Option<RemoteDatagram<'a>> {
        self.metrics.datagrams_in += 1;
        let node = match self.conns.get(&conn).map(|c| c.state) {
            Some(ConnState::Active(node)) => node,
            _ => {
                self.metrics.unknown_wire_drops += 1;
                return None;
            }
        };
        let Ok((wire_id, packet)) = wire::decode_datagram(datagram) else {
            self.metrics.unknown_wire_drops += 1;
            return None;
        };
        let known = self
            .peers
            .get(&node)
            .is_some_and(|p| p.wires.contains_key(&wire_id));
        if !known {
            self.metrics.unknown_wire_drops += 1;
            return None;
        }
        Some(RemoteDatagram {
            node,
            wire_id,
            packet,
        })
    }

    /// Timers: heartbeats, dead trunks, redials, coalesced keyframe requests.
    pub fn handle_timeout(&mut self, now: Time) {
        let mut actions = Vec::new();
        for (&id, c) in self.conns.iter_mut() {
            if let Some(a) = c.heartbeat.handle_timeout(now) {
                actions.push((id, a));
            }
        }
        actions.sort_by_key(|(id, _)| *id);
        for (conn, action) in actions {
            match action {
                HeartbeatAction::Ping(seq) => send(
                    &mut self.out,
                    &mut self.metrics,
                    conn,
                    &Message::Ping { seq },
                ),
                HeartbeatAction::Dead => {
                    self.drop_conn(conn, Some(CloseCode::Timeout), CloseCode::Timeout, now)
                }
            }
        }
        let due: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| matches!(p.dial, DialState::Scheduled(at) if at <= now))
            .map(|(n, _)| *n)
            .collect();
        for node in due {
            if let Some(p) = self.peers.get_mut(&node) {
                p.dial = DialState::Dialing;
                self.events.push_back(Event::Redial { node });
            }
        }
        // Coalesced keyframe requests whose interval has passed.
        for (name, room) in self.rooms.iter_mut() {
            for (id, t) in room.tracks.iter_mut() {
                if t.keyframes.handle_timeout(now) {
                    self.events.push_back(Event::KeyframeRequested {
                        room: name.clone(),
                        track: *id,
                    });
                }
            }
        }
        for peer in self.peers.values_mut() {
            let Some(conn) = peer.conn else { continue };
            for (name, room) in peer.rooms.iter_mut() {
                let (Some(local), Some(to)) = (self.rooms.get(name), peer.remote_open.get(name))
                else {
                    continue;
                };
                let gens = Gens {
                    from: local.generation,
                    to: *to,
                };
                for (wire_id, t) in room.tracks.iter_mut() {
                    if t.keyframes.handle_timeout(now) {
                        let msg = Message::KeyframeRequest {
                            room: name.clone(),
                            gens,
                            wire_id: *wire_id,
                        };
                        send(&mut self.out, &mut self.metrics, conn, &msg);
                    }
                }
            }
        }
    }

    /// Say Goodbye on every trunk and stop: no more dialing or accepting.
    pub fn shutdown(&mut self, now: Time) {
        let mut conns: Vec<ConnId> = self.conns.keys().copied().collect();
        conns.sort();
        for conn in conns {
            self.drop_conn(conn, Some(CloseCode::Shutdown), CloseCode::Shutdown, now);
        }
        self.shut_down = true;
        for p in self.peers.values_mut() {
            p.dial = DialState::Idle;
        }
    }

    // ----- local calls (the SFU adapter) ---------------------------------

    /// The first local participant is about to join `room`: open it.
    pub fn open_room(&mut self, room: RoomName, _now: Time) -> Result<Generation, LocalError> {
        if self.shut_down {
            return Err(LocalError::ShutDown);
        }
        if self.rooms.contains_key(&room) {
            return Err(LocalError::RoomAlreadyOpen(room));
        }
        let generation = Generation(self.next_gen);
        self.next_gen += 1;
        self.rooms.insert(room.clone(), LocalRoom::new(generation));
        let nodes: Vec<NodeId> = self.peers.keys().copied().collect();
        for node in nodes {
            let Some(peer) = self.peers.get(&node) else {
                continue;
            };
            let Some(conn) = peer.conn else { continue };
            let remote_has = peer.remote_open.contains_key(&room);
            let msg = Message::Open {
                room: room.clone(),
                generation,
            };
            send(&mut self.out, &mut self.metrics, conn, &msg);
            if remote_has {
                self.room_link_up(node, &room);
            }
        }
        Ok(generation)
    }

    /// The last local participant left `room`: close it and forget everything
    /// about it (its room links go down on both sides).
    pub fn close_room(&mut self, room: &RoomName, _now: Time) -> Result<(), LocalError> {
        let Some(local) = self.rooms.get(room) else {
            return Err(LocalError::RoomNotOpen(room.clone()));
        };
        let generation = local.generation;
        let nodes: Vec<NodeId> = self.peers.keys().copied().collect();
        for node in nodes {
            self.room_link_down(node, room);
            if let Some(conn) = self.peers.get(&node).and_then(|p| p.conn) {
                let msg = Message::Close {
                    room: room.clone(),
                    generation,
                };
                send(&mut self.out, &mut self.metrics, conn, &msg);
            }
        }
        if let Some(local) = self.rooms.remove(room) {
            for id in local.tracks.keys() {
                self.track_rooms.remove(id);
            }
        }
        Ok(())
    }

    pub fn participant_joined(
        &mut self,
        room: &RoomName,
        info: ParticipantInfo,
    ) -> Result<(), LocalError> {
        let local = self
            .rooms
            .get_mut(room)
            .ok_or_else(|| LocalError::RoomNotOpen(room.clone()))?;
        if local.participants.contains_key(&info.id) {
            return Err(LocalError::ParticipantExists);
        }
        local.participants.insert(info.id, info.clone());
        self.broadcast(room, |gens| Message::ParticipantJoined {
            room: room.clone(),
            gens,
            participant: info.clone(),
        });
        Ok(())
    }

    /// A local participant left; its tracks are unpublished first.
    pub fn participant_left(
        &mut self,
        room: &RoomName,
        id: ParticipantId,
    ) -> Result<(), LocalError> {
        let local = self
            .rooms
            .get_mut(room)
            .ok_or_else(|| LocalError::RoomNotOpen(room.clone()))?;
        if local.participants.remove(&id).is_none() {
            return Err(LocalError::UnknownParticipant);
        }
        let tracks: Vec<TrackId> = local
            .tracks
            .iter()
            .filter(|(_, t)| t.info.participant == id)
            .map(|(tid, _)| *tid)
            .collect();
        for tid in tracks {
            self.unpublish_track(room, tid)?;
        }
        self.broadcast(room, |gens| Message::ParticipantLeft {
            room: room.clone(),
            gens,
            participant: id,
        });
        Ok(())
    }

    /// Publish a local participant's track; announced on every up room link.
    pub fn publish_track(
        &mut self,
        room: &RoomName,
        track: TrackId,
        info: TrackInfo,
    ) -> Result<WireId, LocalError> {
        if self.track_rooms.contains_key(&track) {
            return Err(LocalError::TrackExists);
        }
        let local = self
            .rooms
            .get_mut(room)
            .ok_or_else(|| LocalError::RoomNotOpen(room.clone()))?;
        if !local.participants.contains_key(&info.participant) {
            return Err(LocalError::UnknownParticipant);
        }
        let probe = Message::TrackAdded {
            room: room.clone(),
            gens: Gens {
                from: Generation(0),
                to: Generation(0),
            },
            wire_id: WireId(0),
            track: info.clone(),
        };
        if let Err(DecodeError::TooLarge(n)) = wire::encode_frame(&probe) {
            return Err(LocalError::PayloadTooLarge(n));
        }
        let wire_id = WireId(self.next_wire);
        self.next_wire = self.next_wire.wrapping_add(1).max(1);
        local.tracks.insert(
            track,
            LocalTrack::new(wire_id, info.clone(), self.config.keyframe_interval),
        );
        self.track_rooms.insert(track, room.clone());
        self.broadcast(room, |gens| Message::TrackAdded {
            room: room.clone(),
            gens,
            wire_id,
            track: info.clone(),
        });
        Ok(wire_id)
    }

    pub fn unpublish_track(&mut self, room: &RoomName, track: TrackId) -> Result<(), LocalError> {
        let local = self
            .rooms
            .get_mut(room)
            .ok_or_else(|| LocalError::RoomNotOpen(room.clone()))?;
        let t = local
            .tracks
            .remove(&track)
            .ok_or(LocalError::UnknownTrack)?;
        self.track_rooms.remove(&track);
        let wire_id = t.wire_id;
        self.broadcast(room, |gens| Message::TrackRemoved {
            room: room.clone(),
            gens,
            wire_id,
        });
        Ok(())
    }

    /// The local SFU wants `layer` of a remote track.
    pub fn subscribe(
        &mut self,
        room: &RoomName,
        node: NodeId,
        wire_id: WireId,
        layer: Layer,
    ) -> Result<(), LocalError> {
        self.set_subscription(room, node, wire_id, layer, true)
    }

    pub fn unsubscribe(
        &mut self,
        room: &RoomName,
        node: NodeId,
        wire_id: WireId,
        layer: Layer,
    ) -> Result<(), LocalError> {
        self.set_subscription(room, node, wire_id, layer, false)
    }

    fn set_subscription(
        &mut self,
        room: &RoomName,
        node: NodeId,
        wire_id: WireId,
        layer: Layer,
        on: bool,
    ) -> Result<(), LocalError> {
        let generation = self
            .rooms
            .get(room)
            .ok_or_else(|| LocalError::RoomNotOpen(room.clone()))?
            .generation;
        let peer = self.peers.get_mut(&node).ok_or(LocalError::UnknownTrack)?;
        let (Some(conn), Some(to)) = (peer.conn, peer.remote_open.get(room).copied()) else {
            return Err(LocalError::UnknownTrack);
        };
        let track = peer
            .rooms
            .get_mut(room)
            .and_then(|r| r.tracks.get_mut(&wire_id))
            .ok_or(LocalError::UnknownTrack)?;
        let changed = if on {
            track.layers.insert(layer)
        } else {
            track.layers.remove(&layer)
        };
        if changed {
            let gens = Gens {
                from: generation,
                to,
            };
            let msg = if on {
                Message::Subscribe {
                    room: room.clone(),
                    gens,
                    wire_id,
                    layer,
                }
            } else {
                Message::Unsubscribe {
                    room: room.clone(),
                    gens,
                    wire_id,
                    layer,
                }
            };
            send(&mut self.out, &mut self.metrics, conn, &msg);
        }
        Ok(())
    }

    /// Ask the origin of a remote track for a keyframe (coalesced, rate-limited).
    pub fn request_keyframe(
        &mut self,
        room: &RoomName,
        node: NodeId,
        wire_id: WireId,
        now: Time,
    ) -> Result<(), LocalError> {
        let generation = self
            .rooms
            .get(room)
            .ok_or_else(|| LocalError::RoomNotOpen(room.clone()))?
            .generation;
        let peer = self.peers.get_mut(&node).ok_or(LocalError::UnknownTrack)?;
        let (Some(conn), Some(to)) = (peer.conn, peer.remote_open.get(room).copied()) else {
            return Err(LocalError::UnknownTrack);
        };
        let track = peer
            .rooms
            .get_mut(room)
            .and_then(|r| r.tracks.get_mut(&wire_id))
            .ok_or(LocalError::UnknownTrack)?;
        if track.keyframes.request(now) {
            let msg = Message::KeyframeRequest {
                room: room.clone(),
                gens: Gens {
                    from: generation,
                    to,
                },
                wire_id,
            };
            send(&mut self.out, &mut self.metrics, conn, &msg);
        } else {
            self.metrics.keyframes_coalesced += 1;
        }
        Ok(())
    }

    /// Chat / data-channel message from a local participant to every node
    /// sharing the room (reliable, ordered on each trunk).
    pub fn send_data(
        &mut self,
        room: &RoomName,
        from: ParticipantId,
        payload: &[u8],
    ) -> Result<(), LocalError> {
        if payload.len() > MAX_DATA_PAYLOAD {
            return Err(LocalError::PayloadTooLarge(payload.len()));
        }
        if !self.rooms.contains_key(room) {
            return Err(LocalError::RoomNotOpen(room.clone()));
        }
        self.broadcast(room, |gens| Message::Data {
            room: room.clone(),
            gens,
            from,
            payload: payload.to_vec(),
        });
        Ok(())
    }

    // ----- media fast path -----------------------------------------------

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

    /// Every (node, connection, wire id) that wants `layer` of local `track`.
    pub fn media_targets(&self, track: TrackId, layer: Layer) -> Vec<(NodeId, ConnId, WireId)> {
        let Some(t) = self
            .track_rooms
            .get(&track)
            .and_then(|room| self.rooms.get(room))
            .and_then(|r| r.tracks.get(&track))
        else {
            return Vec::new();
        };
        t.subscribers
            .iter()
            .filter(|(_, layers)| layers.contains(&layer))
            .filter_map(|(node, _)| Some((*node, self.peers.get(node)?.conn?, t.wire_id)))
            .collect()
    }

    /// Count a datagram the driver sent (the core does not see media bytes).
    pub fn count_datagram_out(&mut self) {
        self.metrics.datagrams_out += 1;
    }

    // ----- inspection ----------------------------------------------------

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
                };
                (*node, snap)
            })
            .collect();
        NodeSnapshot {
            incarnation: Some(self.incarnation),
            local_rooms,
            peers,
            connections: self.conns.len(),
        }
    }

    /// Structural self-check (cheap; the simulation calls it after every
    /// step): room-link state only for rooms open here and there, on up
    /// links, and the wire index matching the tracks.
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
        for (node, p) in &self.peers {
            let Some(conn) = p.conn else { continue };
            match self.conns.get(&conn).map(|c| c.state) {
                Some(ConnState::Active(n)) if n == *node => {}
                _ => return Err(format!("peer {node:?}: active conn not active")),
            }
        }
        Ok(())
    }

    // ----- internals -----------------------------------------------------

    fn protocol_error(&mut self, conn: ConnId, _err: &DecodeError, now: Time) {
        self.metrics.protocol_errors += 1;
        self.drop_conn(
            conn,
            Some(CloseCode::ProtocolError),
            CloseCode::ProtocolError,
            now,
        );
    }

    /// Forget a connection. `goodbye = Some(code)` when *we* close it (send
    /// Goodbye, then ask the driver to close); `None` when it is already gone.
    fn drop_conn(
        &mut self,
        conn: ConnId,
        goodbye: Option<CloseCode>,
        reason: CloseCode,
        now: Time,
    ) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(code) = goodbye {
            send(
                &mut self.out,
                &mut self.metrics,
                conn,
                &Message::Goodbye { reason: code },
            );
            self.out.push_back(Transmit::Close { conn, code });
        } else {
            self.out.push_back(Transmit::Close { conn, code: reason });
        }
        match c.state {
            ConnState::Active(node) => {
                self.link_down(node, reason);
                self.ensure_redial(node, now);
            }
            ConnState::Handshaking => {
                if let Some(node) = c.dialed {
                    self.ensure_redial(node, now);
                }
            }
        }
    }

    /// The link to `node` is gone: drop everything it taught us.
    fn link_down(&mut self, node: NodeId, reason: CloseCode) {
        let rooms: Vec<RoomName> = match self.peers.get(&node) {
            Some(p) => p.rooms.keys().cloned().collect(),
            None => return,
        };
        for room in rooms {
            self.room_link_down(node, &room);
        }
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        if peer.conn.take().is_some() {
            self.metrics.link_downs += 1;
            self.events.push_back(Event::LinkDown { node, reason });
        }
        peer.remote_open.clear();
        peer.wires.clear();
        if !peer.configured {
            self.peers.remove(&node);
        }
    }

    /// Schedule a redial if `node` is configured, not connected, not being
    /// dialed and no connection we dialed to it is still handshaking.
    fn ensure_redial(&mut self, node: NodeId, now: Time) {
        if self.shut_down {
            return;
        }
        let handshaking = self
            .conns
            .values()
            .any(|c| c.dialed == Some(node) && c.state == ConnState::Handshaking);
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        if !peer.configured || peer.conn.is_some() || handshaking || peer.dial != DialState::Idle {
            return;
        }
        let delay = backoff(
            self.config.redial_base,
            self.config.redial_cap,
            peer.attempts,
            self.rng.next_u64(),
        );
        peer.dial = DialState::Scheduled(now + delay);
    }

    fn on_hello(
        &mut self,
        conn: ConnId,
        node: NodeId,
        incarnation: Incarnation,
        version: u8,
        cluster: &str,
        now: Time,
    ) {
        if version != PROTOCOL_VERSION {
            self.drop_conn(conn, Some(CloseCode::Version), CloseCode::Version, now);
            return;
        }
        if cluster != self.config.cluster || node == self.config.node_id {
            self.drop_conn(
                conn,
                Some(CloseCode::WrongCluster),
                CloseCode::WrongCluster,
                now,
            );
            return;
        }
        let me = self.config.node_id;
        let preferred_dialer = me.min(node);
        let dialer_of = |c: &Conn| if c.dialed.is_some() { me } else { node };
        let Some(new) = self.conns.get(&conn) else {
            return;
        };
        let new_pref = dialer_of(new) == preferred_dialer;
        let new_serial = new.serial;
        let peer = self.peers.entry(node).or_insert_with(|| Peer::new(false));
        if let Some(old) = peer.conn {
            if peer.incarnation != Some(incarnation) {
                // The peer restarted: the old trunk and all it taught us go now.
                #[cfg(feature = "planted-bugs")]
                if self.config.bugs.keep_state_on_restart {
                    self.conns.remove(&old);
                    self.out.push_back(Transmit::Close {
                        conn: old,
                        code: CloseCode::Replaced,
                    });
                    peer.conn = Some(conn);
                    peer.incarnation = Some(incarnation);
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.state = ConnState::Active(node);
                    }
                    self.send_resync(node, conn);
                    return;
                }
                self.drop_conn(old, Some(CloseCode::Replaced), CloseCode::Replaced, now);
            } else {
                let old_pref = self
                    .conns
                    .get(&old)
                    .is_some_and(|c| dialer_of(c) == preferred_dialer);
                let old_serial = self.conns.get(&old).map_or(0, |c| c.serial);
                let new_wins = match (new_pref, old_pref) {
                    (true, false) => true,
                    (false, true) => false,
                    _ => new_serial > old_serial,
                };
                self.metrics.duplicates_closed += 1;
                if new_wins {
                    self.drop_conn(old, Some(CloseCode::Duplicate), CloseCode::Duplicate, now);
                } else {
                    self.drop_conn(conn, Some(CloseCode::Duplicate), CloseCode::Duplicate, now);
                    return;
                }
            }
        }
        let peer = self.peers.entry(node).or_insert_with(|| Peer::new(false));
        peer.conn = Some(conn);
        peer.incarnation = Some(incarnation);
        peer.attempts = 0;
        peer.dial = DialState::Idle;
        let reconnect = peer.ever_up;
        peer.ever_up = true;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = ConnState::Active(node);
        }
        self.metrics.link_ups += 1;
        self.events.push_back(Event::LinkUp { node, incarnation });
        #[cfg(feature = "planted-bugs")]
        if reconnect && self.config.bugs.skip_resync {
            return;
        }
        let _ = reconnect;
        self.send_resync(node, conn);
    }

    /// Full resync after (re)connect: our whole interest set.
    fn send_resync(&mut self, _node: NodeId, conn: ConnId) {
        for (room, r) in &self.rooms {
            let msg = Message::Open {
                room: room.clone(),
                generation: r.generation,
            };
            send(&mut self.out, &mut self.metrics, conn, &msg);
        }
    }

    /// Send a room-scoped message to every peer whose room link is up.
    fn broadcast(&mut self, room: &RoomName, mut make: impl FnMut(Gens) -> Message) {
        let Some(local) = self.rooms.get(room) else {
            return;
        };
        for peer in self.peers.values() {
            let (Some(conn), true) = (peer.conn, peer.rooms.contains_key(room)) else {
                continue;
            };
            let Some(to) = peer.remote_open.get(room) else {
                continue;
            };
            let msg = make(Gens {
                from: local.generation,
                to: *to,
            });
            send(&mut self.out, &mut self.metrics, conn, &msg);
        }
    }

    /// Both sides have `room` open: create the room link and announce ours.
    fn room_link_up(&mut self, node: NodeId, room: &RoomName) {
        let Some(local) = self.rooms.get(room) else {
            return;
        };
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        let (Some(conn), Some(to)) = (peer.conn, peer.remote_open.get(room).copied()) else {
            return;
        };
        if peer.rooms.contains_key(room) {
            return;
        }
        peer.rooms.insert(room.clone(), RemoteRoom::default());
        let gens = Gens {
            from: local.generation,
            to,
        };
        for p in local.participants.values() {
            let msg = Message::ParticipantJoined {
                room: room.clone(),
                gens,
                participant: p.clone(),
            };
            send(&mut self.out, &mut self.metrics, conn, &msg);
        }
        for t in local.tracks.values() {
            let msg = Message::TrackAdded {
                room: room.clone(),
                gens,
                wire_id: t.wire_id,
                track: t.info.clone(),
            };
            send(&mut self.out, &mut self.metrics, conn, &msg);
        }
    }

    /// The room link is gone: forget what the peer told us about the room
    /// and its subscriptions to our tracks there.
    fn room_link_down(&mut self, node: NodeId, room: &RoomName) {
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        let Some(remote) = peer.rooms.remove(room) else {
            return;
        };
        for wire_id in remote.tracks.keys() {
            peer.wires.remove(wire_id);
            self.events.push_back(Event::RemoteTrackRemoved {
                room: room.clone(),
                node,
                wire_id: *wire_id,
            });
        }
        for pid in remote.participants.keys() {
            self.events.push_back(Event::RemoteParticipantRemoved {
                room: room.clone(),
                node,
                participant: *pid,
            });
        }
        if let Some(local) = self.rooms.get_mut(room) {
            for (tid, t) in local.tracks.iter_mut() {
                if let Some(layers) = t.subscribers.remove(&node) {
                    for layer in layers {
                        self.events.push_back(Event::SubscribeCancelled {
                            room: room.clone(),
                            node,
                            track: *tid,
                            layer,
                        });
                    }
                }
            }
        }
    }

    /// Gate for room-scoped messages: the room must be open here with the
    /// generation the sender names, and the sender's generation must be the
    /// one it last announced. Anything else is stale: dropped and counted.
    fn accept(&mut self, node: NodeId, room: &RoomName, gens: Gens) -> bool {
        #[cfg(feature = "planted-bugs")]
        if self.config.bugs.ignore_generations {
            if let Some(peer) = self.peers.get_mut(&node) {
                peer.rooms.entry(room.clone()).or_default();
            }
            return true;
        }
        let ok = match (self.rooms.get(room), self.peers.get(&node)) {
            (Some(local), Some(peer)) => {
                local.generation == gens.to
                    && peer.remote_open.get(room) == Some(&gens.from)
                    && peer.rooms.contains_key(room)
            }
            _ => false,
        };
        if !ok {
            self.metrics.stale_drops += 1;
        }
        ok
    }

    fn on_message(&mut self, conn: ConnId, node: NodeId, msg: Message, now: Time) {
        match msg {
            Message::Hello { .. } | Message::Goodbye { .. } => {}
            Message::Ping { seq } => send(
                &mut self.out,
                &mut self.metrics,
                conn,
                &Message::Pong { seq },
            ),
            Message::Pong { seq } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.heartbeat.on_pong(seq, now);
                }
            }
            Message::Open { room, generation } => {
                let Some(peer) = self.peers.get_mut(&node) else {
                    return;
                };
                if peer
                    .remote_open
                    .get(&room)
                    .is_some_and(|g| *g != generation)
                {
                    // A new lifetime replaces the old one.
                    self.room_link_down(node, &room);
                }
                if let Some(peer) = self.peers.get_mut(&node) {
                    peer.remote_open.insert(room.clone(), generation);
                }
                if self.rooms.contains_key(&room) {
                    self.room_link_up(node, &room);
                }
            }
            Message::Close { room, generation } => {
                let Some(peer) = self.peers.get_mut(&node) else {
                    return;
                };
                if peer.remote_open.get(&room) == Some(&generation) {
                    self.room_link_down(node, &room);
                    if let Some(peer) = self.peers.get_mut(&node) {
                        peer.remote_open.remove(&room);
                    }
                } else {
                    self.metrics.stale_drops += 1;
                }
            }
            Message::ParticipantJoined {
                room,
                gens,
                participant,
            } => {
                if !self.accept(node, &room, gens) {
                    return;
                }
                let Some(r) = self
                    .peers
                    .get_mut(&node)
                    .and_then(|p| p.rooms.get_mut(&room))
                else {
                    return;
                };
                if r.participants
                    .insert(participant.id, participant.clone())
                    .is_none()
                {
                    self.events.push_back(Event::RemoteParticipantAdded {
                        room,
                        node,
                        participant,
                    });
                }
            }
            Message::ParticipantLeft {
                room,
                gens,
                participant,
            } => {
                if !self.accept(node, &room, gens) {
                    return;
                }
                let Some(r) = self
                    .peers
                    .get_mut(&node)
                    .and_then(|p| p.rooms.get_mut(&room))
                else {
                    return;
                };
                if r.participants.remove(&participant).is_some() {
                    self.events.push_back(Event::RemoteParticipantRemoved {
                        room,
                        node,
                        participant,
                    });
                }
            }
            Message::TrackAdded {
                room,
                gens,
                wire_id,
                track,
            } => {
                if !self.accept(node, &room, gens) {
                    return;
                }
                let interval = self.config.keyframe_interval;
                let Some(peer) = self.peers.get_mut(&node) else {
                    return;
                };
                if peer.wires.contains_key(&wire_id) {
                    return;
                }
                let Some(r) = peer.rooms.get_mut(&room) else {
                    return;
                };
                r.tracks.insert(
                    wire_id,
                    RemoteTrack {
                        info: track.clone(),
                        layers: BTreeSet::new(),
                        keyframes: RateLimiter::new(interval),
                    },
                );
                peer.wires.insert(wire_id, room.clone());
                self.events.push_back(Event::RemoteTrackAdded {
                    room,
                    node,
                    wire_id,
                    track,
                });
            }
            Message::TrackRemoved {
                room,
                gens,
                wire_id,
            } => {
                if !self.accept(node, &room, gens) {
                    return;
                }
                let Some(peer) = self.peers.get_mut(&node) else {
                    return;
                };
                let removed = peer
                    .rooms
                    .get_mut(&room)
                    .and_then(|r| r.tracks.remove(&wire_id));
                if removed.is_some() {
                    peer.wires.remove(&wire_id);
                    self.events.push_back(Event::RemoteTrackRemoved {
                        room,
                        node,
                        wire_id,
                    });
                } else {
                    self.metrics.unknown_wire_drops += 1;
                }
            }
            Message::Subscribe {
                room,
                gens,
                wire_id,
                layer,
            } => self.on_subscribe(node, room, gens, wire_id, layer, true),
            Message::Unsubscribe {
                room,
                gens,
                wire_id,
                layer,
            } => self.on_subscribe(node, room, gens, wire_id, layer, false),
            Message::KeyframeRequest {
                room,
                gens,
                wire_id,
            } => {
                if !self.accept(node, &room, gens) {
                    return;
                }
                let Some(local) = self.rooms.get_mut(&room) else {
                    return;
                };
                match local.track_by_wire(wire_id) {
                    Some((track, t)) => {
                        if t.keyframes.request(now) {
                            self.events
                                .push_back(Event::KeyframeRequested { room, track });
                        } else {
                            self.metrics.keyframes_coalesced += 1;
                        }
                    }
                    None => self.metrics.unknown_wire_drops += 1,
                }
            }
            Message::Data {
                room,
                gens,
                from,
                payload,
            } => {
                if self.accept(node, &room, gens) {
                    self.events.push_back(Event::DataReceived {
                        room,
                        node,
                        from,
                        payload,
                    });
                }
            }
        }
    }

    fn on_subscribe(
        &mut self,
        node: NodeId,
        room: RoomName,
        gens: Gens,
        wire_id: WireId,
        layer: Layer,
        on: bool,
    ) {
        if !self.accept(node, &room, gens) {
            return;
        }
        let Some(local) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some((track, t)) = local.track_by_wire(wire_id) else {
            // Unpublished while the request was in flight.
            self.metrics.unknown_wire_drops += 1;
            return;
        };
        let changed = if on {
            t.subscribers.entry(node).or_default().insert(layer)
        } else {
            let removed = t
                .subscribers
                .get_mut(&node)
                .is_some_and(|l| l.remove(&layer));
            if t.subscribers.get(&node).is_some_and(|l| l.is_empty()) {
                t.subscribers.remove(&node);
            }
            removed
        };
        if changed {
            self.events.push_back(if on {
                Event::SubscribeRequested {
                    room,
                    node,
                    track,
                    layer,
                }
            } else {
                Event::SubscribeCancelled {
                    room,
                    node,
                    track,
                    layer,
                }
            });
        }
    }
}
