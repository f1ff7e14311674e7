//! One node's trunk protocol: every peer link, every room link, the track
//! directory and subscriptions, behind a sans-IO API.

use super::directory::{LocalRoom, LocalTrack, RemoteRoom, RemoteTrack, TrackMedia, WireIn};
use super::error::{DecodeError, LocalError};
use super::heartbeat::{Heartbeat, HeartbeatAction};
use super::link::{Conn, ConnState, DialState, Peer, SplitMix, backoff};
use super::metrics::Metrics;
use super::ratelimit::RateLimiter;
use super::repair::{Arrival, RecvRepair, RepairConfig, SendHistory, rtp_seq};
use super::time::Time;
use super::types::{
    CloseCode, ConnId, Generation, Gens, Incarnation, Layer, NodeId, ParticipantId,
    ParticipantInfo, RoomName, TrackId, TrackInfo, TrackKind, WireId,
};
use super::wire::{
    self, Datagram, DatagramMessage, MAX_DATA_PAYLOAD, MAX_NACK_SEQS, Message, PROTOCOL_VERSION,
};
use std::cell::Cell;
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
    /// Loss repair and the lateness bound for media (see `repair.rs`).
    pub repair: RepairConfig,
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
            // Only a guard against a flooding peer: the SFUs on both sides
            // space keyframe requests per track already, and a second 500 ms
            // window here delayed a new cross-node subscriber's first frame.
            keyframe_interval: Duration::from_millis(100),
            repair: RepairConfig::default(),
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
    /// Answer a NACK with retransmissions without checking that the asking
    /// node still subscribes to the track.
    pub retransmit_unsubscribed: bool,
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

/// A keyframe limiter holding a coalesced request.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum KfKey {
    /// A local track's (requests from peers).
    Local(TrackId),
    /// A remote track's (our requests to its origin).
    Remote(NodeId, WireId),
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
    /// Local track → room.
    track_rooms: HashMap<TrackId, RoomName>,
    /// Local track → what the media fast path needs (wire id, targets,
    /// history): one hash lookup per packet, whatever the number of rooms.
    media: HashMap<TrackId, TrackMedia>,
    /// Local wire id → track (NACKs, subscriptions, keyframe requests).
    local_wires: HashMap<WireId, TrackId>,
    /// Remote tracks with sequence numbers under repair: the only ones the
    /// repair timer visits.
    repairing: BTreeSet<(NodeId, WireId)>,
    /// Keyframe limiters holding a coalesced request: the only ones the
    /// keyframe timer visits.
    kf_pending: BTreeSet<KfKey>,
    /// `poll_timeout`'s answer while no timer moved (`None`: recompute).
    timeout: Cell<Option<Option<Time>>>,
    out: VecDeque<Transmit>,
    datagrams: VecDeque<DatagramOut>,
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
            media: HashMap::new(),
            local_wires: HashMap::new(),
            repairing: BTreeSet::new(),
            kf_pending: BTreeSet::new(),
            timeout: Cell::new(None),
            out: VecDeque::new(),
            datagrams: VecDeque::new(),
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

    /// The transport's RTT estimate of a connection's path (the driver
    /// reports it before timers; NACK retries are spaced by it, falling
    /// back to the heartbeat's RTT).
    pub fn set_path_rtt(&mut self, conn: ConnId, rtt: Duration) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.path_rtt = Some(rtt);
        }
    }

    /// RTT for spacing NACK retries to `node`.
    fn repair_rtt(&self, node: NodeId) -> Option<Duration> {
        let conn = self.peers.get(&node)?.conn?;
        let c = self.conns.get(&conn)?;
        c.path_rtt.or_else(|| c.heartbeat.rtt())
    }

    /// The active connection to `node`, if the link is up.
    pub fn peer_conn(&self, node: NodeId) -> Option<ConnId> {
        self.peers.get(&node)?.conn
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

    /// Next datagram to send (NACKs, retransmissions).
    pub fn poll_datagram(&mut self) -> Option<DatagramOut> {
        self.datagrams.pop_front()
    }

    /// The earliest time [`Self::handle_timeout`] has work to do. Cached:
    /// recomputed only after a call that can bring a timer forward (the
    /// media fast path, `send_media` and a gap-free `handle_datagram`, never
    /// does), so a driver may ask after every packet. It may be early (a
    /// timer went away since: `handle_timeout` then finds nothing to do),
    /// never late. The computation visits
    /// connections and peers, and only the tracks that hold a coalesced
    /// keyframe request or a gap under repair — never every track.
    pub fn poll_timeout(&self) -> Option<Time> {
        if let Some(t) = self.timeout.get() {
            return t;
        }
        let t = self.compute_timeout();
        self.timeout.set(Some(t));
        t
    }

    /// Forget the cached [`Self::poll_timeout`].
    fn timers_changed(&self) {
        self.timeout.set(None);
    }

    fn compute_timeout(&self) -> Option<Time> {
        let mut t: Option<Time> = None;
        let mut min = |x: Time| t = Some(t.map_or(x, |y| y.min(x)));
        for c in self.conns.values() {
            min(c.heartbeat.poll_timeout());
        }
        for p in self.peers.values() {
            if let DialState::Scheduled(at) = p.dial {
                min(at);
            }
        }
        for key in &self.kf_pending {
            if let Some(at) = self.limiter(key).and_then(|l| l.poll_timeout()) {
                min(at);
            }
        }
        for (node, wire) in &self.repairing {
            let due = self
                .peers
                .get(node)
                .and_then(|p| p.wires.get(wire))
                .and_then(|w| w.repair.as_ref())
                .and_then(|r| r.next_due(&self.config.repair));
            if let Some(at) = due {
                min(at);
            }
        }
        t
    }

    fn limiter(&self, key: &KfKey) -> Option<&RateLimiter> {
        match key {
            KfKey::Local(track) => {
                let room = self.track_rooms.get(track)?;
                Some(&self.rooms.get(room)?.tracks.get(track)?.keyframes)
            }
            KfKey::Remote(node, wire) => {
                let peer = self.peers.get(node)?;
                let room = &peer.wires.get(wire)?.room;
                Some(&peer.rooms.get(room)?.tracks.get(wire)?.keyframes)
            }
        }
    }

    // ----- driver inputs -------------------------------------------------

    /// Configure a peer to dial (and redial whenever the link is lost).
    pub fn add_peer(&mut self, node: NodeId, now: Time) {
        self.timers_changed();
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
        self.timers_changed();
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
                path_rtt: None,
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
        self.timers_changed();
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
        self.timers_changed();
        self.drop_conn(conn, None, CloseCode::Timeout, now);
    }

    /// One frame body from the control stream (see [`wire::split_frame`]).
    /// A malformed frame closes the trunk with a protocol error.
    pub fn handle_frame(&mut self, conn: ConnId, body: &[u8], now: Time) {
        self.timers_changed();
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

    /// Timers: heartbeats, dead trunks, redials, coalesced keyframe requests.
    pub fn handle_timeout(&mut self, now: Time) {
        self.timers_changed();
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
        self.keyframe_timers(now);
        self.repair_timers(now);
    }

    /// Coalesced keyframe requests whose interval has passed.
    fn keyframe_timers(&mut self, now: Time) {
        let keys: Vec<KfKey> = self.kf_pending.iter().cloned().collect();
        for key in keys {
            match &key {
                KfKey::Local(track) => {
                    let fired = self.track_rooms.get(track).cloned().and_then(|room| {
                        let t = self.rooms.get_mut(&room)?.tracks.get_mut(track)?;
                        Some((
                            room,
                            t.keyframes.handle_timeout(now),
                            t.keyframes.poll_timeout(),
                        ))
                    });
                    match fired {
                        Some((room, fired, pending)) => {
                            if fired {
                                self.events.push_back(Event::KeyframeRequested {
                                    room,
                                    track: *track,
                                });
                            }
                            if pending.is_none() {
                                self.kf_pending.remove(&key);
                            }
                        }
                        None => {
                            self.kf_pending.remove(&key);
                        }
                    }
                }
                KfKey::Remote(node, wire) => {
                    let (node, wire) = (*node, *wire);
                    let Some(peer) = self.peers.get_mut(&node) else {
                        self.kf_pending.remove(&key);
                        continue;
                    };
                    let (Some(conn), Some(room)) =
                        (peer.conn, peer.wires.get(&wire).map(|w| w.room.clone()))
                    else {
                        self.kf_pending.remove(&key);
                        continue;
                    };
                    let (Some(local), Some(to)) =
                        (self.rooms.get(&room), peer.remote_open.get(&room))
                    else {
                        self.kf_pending.remove(&key);
                        continue;
                    };
                    let gens = Gens {
                        from: local.generation,
                        to: *to,
                    };
                    let Some(t) = peer
                        .rooms
                        .get_mut(&room)
                        .and_then(|r| r.tracks.get_mut(&wire))
                    else {
                        self.kf_pending.remove(&key);
                        continue;
                    };
                    if t.keyframes.handle_timeout(now) {
                        let msg = Message::KeyframeRequest {
                            room,
                            gens,
                            wire_id: wire,
                        };
                        send(&mut self.out, &mut self.metrics, conn, &msg);
                    }
                    if t.keyframes.poll_timeout().is_none() {
                        self.kf_pending.remove(&key);
                    }
                }
            }
        }
    }

    /// NACK what is due and give up what can no longer arrive in time, for
    /// the remote tracks with gaps only.
    fn repair_timers(&mut self, now: Time) {
        let cfg = self.config.repair;
        let due: Vec<(NodeId, WireId)> = self.repairing.iter().copied().collect();
        let mut seqs = Vec::new();
        for (node, wire) in due {
            let rtt = self.repair_rtt(node);
            let Some(peer) = self.peers.get_mut(&node) else {
                self.repairing.remove(&(node, wire));
                continue;
            };
            let conn = peer.conn;
            let Some(r) = peer.wires.get_mut(&wire).and_then(|w| w.repair.as_mut()) else {
                self.repairing.remove(&(node, wire));
                continue;
            };
            seqs.clear();
            let given_up = r.poll(now, rtt, &cfg, &mut seqs, MAX_NACK_SEQS);
            if r.missing() == 0 {
                self.repairing.remove(&(node, wire));
            }
            peer.stats.given_up += given_up;
            self.metrics.media_given_up += given_up;
            let (Some(conn), false) = (conn, seqs.is_empty()) else {
                continue;
            };
            let msg = DatagramMessage::Nack {
                wire_id: wire,
                seqs: seqs.clone(),
            };
            let mut bytes = Vec::with_capacity(8 + 3 * seqs.len());
            wire::encode_control_datagram(&msg, &mut bytes);
            peer.stats.nacks_sent += 1;
            peer.stats.nack_seqs_sent += seqs.len() as u64;
            self.metrics.nacks_sent += 1;
            self.datagrams.push_back(DatagramOut {
                conn,
                node,
                bytes,
                retransmit: false,
            });
        }
    }

    /// Say Goodbye on every trunk and stop: no more dialing or accepting.
    pub fn shutdown(&mut self, now: Time) {
        self.timers_changed();
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
        self.timers_changed();
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
        self.timers_changed();
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
            for (id, t) in &local.tracks {
                self.track_rooms.remove(id);
                self.media.remove(id);
                self.local_wires.remove(&t.wire_id);
                self.kf_pending.remove(&KfKey::Local(*id));
            }
        }
        Ok(())
    }

    pub fn participant_joined(
        &mut self,
        room: &RoomName,
        info: ParticipantInfo,
    ) -> Result<(), LocalError> {
        self.timers_changed();
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
        self.timers_changed();
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
        self.timers_changed();
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
        self.local_wires.insert(wire_id, track);
        self.media.insert(
            track,
            TrackMedia {
                wire_id,
                kind: info.kind,
                targets: Vec::new(),
                history: SendHistory::new(),
            },
        );
        self.broadcast(room, |gens| Message::TrackAdded {
            room: room.clone(),
            gens,
            wire_id,
            track: info.clone(),
        });
        Ok(wire_id)
    }

    pub fn unpublish_track(&mut self, room: &RoomName, track: TrackId) -> Result<(), LocalError> {
        self.timers_changed();
        let local = self
            .rooms
            .get_mut(room)
            .ok_or_else(|| LocalError::RoomNotOpen(room.clone()))?;
        let t = local
            .tracks
            .remove(&track)
            .ok_or(LocalError::UnknownTrack)?;
        self.track_rooms.remove(&track);
        self.media.remove(&track);
        self.local_wires.remove(&t.wire_id);
        self.kf_pending.remove(&KfKey::Local(track));
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
        self.timers_changed();
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
        let subscribed = !track.layers.is_empty();
        if let Some(w) = peer.wires.get_mut(&wire_id) {
            match (subscribed, w.repair.is_some()) {
                (true, false) => w.repair = Some(RecvRepair::new()),
                (false, true) => {
                    w.repair = None;
                    self.repairing.remove(&(node, wire_id));
                }
                _ => {}
            }
        }
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
        self.timers_changed();
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
            self.kf_pending.insert(KfKey::Remote(node, wire_id));
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
        self.timers_changed();
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
    fn local_keyframe(&mut self, room: RoomName, track: TrackId, now: Time) -> bool {
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

    // ----- inspection ----------------------------------------------------

    /// The kind of a local track the media fast path still knows (checks:
    /// nothing of a track survives its unpublishing).
    pub fn local_track_kind(&self, track: TrackId) -> Option<TrackKind> {
        self.media.get(&track).map(|m| m.kind)
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
        self.repairing.retain(|(n, _)| *n != node);
        self.kf_pending
            .retain(|k| !matches!(k, KfKey::Remote(n, _) if *n == node));
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
        // A restarted peer has a new clock; learn its offset afresh.
        peer.clock = Default::default();
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
            self.repairing.remove(&(node, *wire_id));
            self.kf_pending.remove(&KfKey::Remote(node, *wire_id));
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
        let mut changed = Vec::new();
        if let Some(local) = self.rooms.get_mut(room) {
            for (tid, t) in local.tracks.iter_mut() {
                if let Some(layers) = t.subscribers.remove(&node) {
                    changed.push(*tid);
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
        for tid in changed {
            self.refresh_targets(tid);
        }
    }

    /// Rebuild the media fast path's targets of a local track from its
    /// subscribers (on subscription and link changes, never per packet).
    fn refresh_targets(&mut self, track: TrackId) {
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
                peer.wires.insert(
                    wire_id,
                    WireIn {
                        room: room.clone(),
                        repair: None,
                    },
                );
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
                    self.repairing.remove(&(node, wire_id));
                    self.kf_pending.remove(&KfKey::Remote(node, wire_id));
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
                let known = match self.local_wires.get(&wire_id).copied() {
                    Some(track) => self.local_keyframe(room, track, now),
                    None => false,
                };
                if !known {
                    self.metrics.unknown_wire_drops += 1;
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
        let Some((track, t)) = self
            .local_wires
            .get(&wire_id)
            .and_then(|id| Some((*id, local.tracks.get_mut(id)?)))
        else {
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
            self.refresh_targets(track);
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
