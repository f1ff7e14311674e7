//! The I/O driver: runs one [`proto::Node`] over quinn.
//!
//! Thin on purpose (quinn's split of `quinn-proto` from `quinn`): every
//! decision is the core's. One task owns the `Node` and is the only place
//! it is touched; it takes inputs from a channel (connections established,
//! control-stream frames, datagrams, local calls, media to send) and a
//! single timer at `poll_timeout()`, and after every input carries out what
//! the core asks (`poll_transmit`, `poll_event`). Per connection, one task
//! reads the control stream and datagrams, and one writes frames in order.

use super::conn_io::{accept_loop, close_conn, peer_node_id, reader, sleep_until, writer};
use super::gate::VideoGate;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use super::identity::{Identity, IdentityError, SERVER_NAME};
use crate::proto::{
    CloseCode, ConnId, Event, Layer, Node, NodeId, NodeSnapshot, Refusal, Time, TrackId, Transmit,
    WireId,
};

/// How long a dial may take before it counts as failed (the core then
/// schedules the next attempt with backoff).
pub(super) const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// QUIC keep-alive and idle timeout: the backstop under the core's own
/// heartbeat (DESIGN measured 1 s / 3 s noticing a killed peer in 3.2–4 s).
const KEEP_ALIVE: Duration = Duration::from_secs(1);
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// First datagram size limit before path-MTU discovery: large enough that
/// a 1200-byte RTP packet plus the wire id fits from the start (DESIGN).
const INITIAL_MTU: u16 = 1452;
/// Most time `shutdown` waits for peers to acknowledge the close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Loss detection: QUIC declares a packet lost when this many later ones
/// were acknowledged (RFC 9002 uses 3). Media over a jittery path arrives
/// reordered by tens of packets; at 3 every reordering looked like loss
/// and made the congestion controller throttle below the media rate
/// (issue 6 measured 37–39 % of datagrams never delivered at 40 ± 10 ms
/// jitter). Datagrams are never retransmitted by QUIC, so a late loss
/// verdict costs nothing but a later cwnd reaction. See ARCHITECTURE.md.
const PACKET_THRESHOLD: u32 = 1000;
/// Time-based loss detection, as a multiple of the RTT (RFC 9002: 9/8).
const TIME_THRESHOLD: f32 = 1.5;
/// Datagrams quinn may hold while the congestion window is full. The
/// default (1 MiB) is ~11 s of one 750 kbit/s video and queued media for
/// seconds; real-time media is better dropped (quinn drops the oldest when
/// full). Big enough for a keyframe burst (~100 KB at 720p); how long media
/// may wait in it is `VideoGate`'s business.
const DATAGRAM_SEND_BUFFER: usize = 256 * 1024;
/// Incoming datagrams queued for the core before new ones are dropped
/// (counted): ~50 ms at the measured 80k packets/s.
const DATAGRAM_IN_QUEUE: usize = 4096;
/// Media events queued for the user before new ones are dropped (counted).
const MEDIA_EVENT_QUEUE: usize = 4096;
/// Control inputs (frames, calls, connections) queued for the core; the
/// readers wait when it is full, so QUIC flow control slows the peer.
const INPUT_QUEUE: usize = 1024;
/// Frames queued for one connection's writer. A peer that does not read
/// its control stream fills it; the trunk is then closed as dead rather
/// than buffering without bound.
const WRITER_QUEUE: usize = 4096;

/// QUIC loss detection and buffering of a trunk (defaults: the constants
/// above, chosen by measurement; the fields exist so benchmarks can compare).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    pub packet_threshold: u32,
    pub time_threshold: f32,
    pub datagram_send_buffer: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            packet_threshold: PACKET_THRESHOLD,
            time_threshold: TIME_THRESHOLD,
            datagram_send_buffer: DATAGRAM_SEND_BUFFER,
        }
    }
}

/// Which QUIC congestion controller the trunk uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// quinn's default; halves the window on every loss event.
    Cubic,
    NewReno,
    /// Model-based (bandwidth and RTT), not loss-based: random loss does not
    /// shrink the window. The default (see ARCHITECTURE.md, measured).
    #[default]
    Bbr,
}

#[derive(Debug, thiserror::Error)]
pub enum TrunkError {
    #[error("trunk identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("cannot bind the trunk on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the trunk has stopped")]
    Stopped,
}

/// Everything a trunk needs at start.
#[derive(Debug, Clone)]
pub struct TrunkConfig {
    /// The core's configuration (node id, cluster name, heartbeat, ...).
    pub proto: crate::proto::Config,
    pub identity: Identity,
    /// UDP address to listen on (port 0: any).
    pub bind: SocketAddr,
    /// Peers this node dials (and redials); others may dial us.
    pub peers: Vec<(NodeId, SocketAddr)>,
    /// QUIC congestion controller.
    pub congestion: Congestion,
    /// Loss detection and buffers (use `Tuning::default()`).
    pub tuning: Tuning,
}

/// What the trunk reports to the node it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrunkEvent {
    /// An event of the protocol core (`Redial` and `Dial` are handled here,
    /// not passed on).
    Proto(Event),
    /// A media packet of a remote track we subscribed to.
    Media {
        node: NodeId,
        wire_id: WireId,
        packet: Bytes,
        /// When the origin received it, on our clock (lip sync: use it as
        /// the packet's wallclock).
        origin: Instant,
        /// It filled a gap under repair.
        repaired: bool,
    },
}

/// Counters of the driver itself (the core keeps its own, see `Metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverMetrics {
    /// Media packets that did not fit in one datagram on that path.
    pub datagrams_too_large: u64,
    /// Media packets quinn refused (connection gone, datagrams unsupported).
    pub datagrams_failed: u64,
    /// Incoming connections whose handshake failed (unauthenticated nodes,
    /// garbage, timeouts).
    pub handshakes_failed: u64,
    /// Media packets refused because the driver's media queue was full
    /// (the caller sends faster than the trunk can carry).
    pub media_queue_drops: u64,
    /// Incoming datagrams dropped because the core's queue was full.
    pub datagrams_in_dropped: u64,
    /// Incoming media dropped because the user's media event queue was full.
    pub media_events_dropped: u64,
    /// Video packets not sent because the trunk lacked bandwidth (quinn's
    /// datagram buffer was short of room): audio kept going.
    pub video_dropped_congestion: u64,
    /// Keyframes asked for when video resumed after such drops.
    pub video_resumed: u64,
    /// Connections closed because their writer queue overflowed (the peer
    /// stopped reading its control stream).
    pub writer_overflows: u64,
}

/// quinn's view of one trunk's path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathStatus {
    pub rtt: Duration,
    pub cwnd: u64,
    pub lost_packets: u64,
    pub congestion_events: u64,
    pub sent_packets: u64,
    pub current_mtu: u16,
}

/// Media packets waiting for the core task before `send_media` drops new
/// ones: at ~80k packets/s per trunk (BENCHMARKS.md) this is ~50 ms.
const MEDIA_QUEUE: usize = 4096;

/// What `Trunk::status` returns.
#[derive(Debug, Clone)]
pub struct TrunkStatus {
    pub node: NodeSnapshot,
    pub metrics: crate::proto::Metrics,
    pub driver: DriverMetrics,
    pub rtt: HashMap<NodeId, Duration>,
    /// quinn's path statistics of each peer's active connection.
    pub paths: HashMap<NodeId, PathStatus>,
}

type Call = Box<dyn FnOnce(&mut Node, Time) + Send>;

/// What a dial was for: a configured peer (`Event::Redial`) or a
/// discovered address (`Event::Dial`).
#[derive(Debug, Clone, Copy)]
pub(super) enum Target {
    Node(NodeId),
    Addr(SocketAddr),
}

pub(super) enum Input {
    Connected {
        conn: Connection,
        send: SendStream,
        recv: RecvStream,
        dialed: Option<Target>,
    },
    DialFailed(Target),
    HandshakeFailed,
    Frame(ConnId, Vec<u8>),
    Corrupt(ConnId),
    Lost(ConnId),
    Call(Call),
    Status(oneshot::Sender<TrunkStatus>),
    Shutdown(oneshot::Sender<()>),
}

pub(super) enum Write {
    Frame(Vec<u8>),
    Close(CloseCode),
}

pub(super) struct ConnHandle {
    pub(super) conn: Connection,
    pub(super) remote: SocketAddr,
    pub(super) writer: mpsc::Sender<Write>,
    pub(super) gate: VideoGate,
}

/// Media waiting for the core task: track, layer, RTP packet, and when it
/// reached this node.
type MediaIn = (TrackId, Layer, Bytes, Instant);

/// Shared drop counters of the queues that never block.
#[derive(Debug, Default)]
pub(super) struct QueueDrops {
    pub(super) media: std::sync::atomic::AtomicU64,
    pub(super) datagrams_in: std::sync::atomic::AtomicU64,
}

/// A running trunk. Dropping it without [`Trunk::shutdown`] stops the
/// driver task abruptly (peers notice by heartbeat).
pub struct Trunk {
    tx: mpsc::Sender<Input>,
    media: mpsc::Sender<MediaIn>,
    drops: Arc<QueueDrops>,
    local_addr: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Trunk {
    /// Bind, start dialing the configured peers and accepting others.
    /// Returns the handle and the stream of events.
    /// Control events come unbounded (the core must never wait for the
    /// user, who waits for the core in [`Trunk::call`]; they are as many as
    /// the peers' control frames, which QUIC flow control paces), media
    /// events bounded, dropped and counted when the user falls behind.
    pub fn start(config: TrunkConfig) -> Result<(Trunk, TrunkEvents), TrunkError> {
        // Operator files: this node's certificate must name its id.
        config.identity.check_node_id(config.proto.node_id)?;
        let mut transport = quinn::TransportConfig::default();
        match config.congestion {
            Congestion::Cubic => {}
            Congestion::NewReno => {
                transport.congestion_controller_factory(Arc::new(
                    quinn::congestion::NewRenoConfig::default(),
                ));
            }
            Congestion::Bbr => {
                transport.congestion_controller_factory(Arc::new(
                    quinn::congestion::BbrConfig::default(),
                ));
            }
        }
        transport
            .packet_threshold(config.tuning.packet_threshold)
            .time_threshold(config.tuning.time_threshold)
            .datagram_send_buffer_size(config.tuning.datagram_send_buffer)
            .keep_alive_interval(Some(KEEP_ALIVE))
            .max_idle_timeout(Some(
                IDLE_TIMEOUT
                    .try_into()
                    .expect("idle timeout is a small constant"),
            ))
            .initial_mtu(INITIAL_MTU)
            // One control stream, opened by the dialer; nothing else.
            .max_concurrent_bidi_streams(VarInt::from_u32(1))
            .max_concurrent_uni_streams(VarInt::from_u32(0));
        let transport = Arc::new(transport);
        let server_crypto = QuicServerConfig::try_from(config.identity.server_config()?)
            .map_err(|e| IdentityError::Tls(rustls::Error::General(e.to_string())))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        let client_crypto = QuicClientConfig::try_from(config.identity.client_config()?)
            .map_err(|e| IdentityError::Tls(rustls::Error::General(e.to_string())))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);
        let endpoint =
            Endpoint::server(server, config.bind).map_err(|source| TrunkError::Bind {
                addr: config.bind,
                source,
            })?;
        let local_addr = endpoint.local_addr().map_err(|source| TrunkError::Bind {
            addr: config.bind,
            source,
        })?;
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        let (etx, erx) = mpsc::unbounded_channel();
        let (metx, merx) = mpsc::channel(MEDIA_EVENT_QUEUE);
        let (mtx, mrx) = mpsc::channel(MEDIA_QUEUE);
        let (dtx, drx) = mpsc::channel(DATAGRAM_IN_QUEUE);
        let drops = Arc::new(QueueDrops::default());
        let start = Instant::now();
        let mut node = Node::new(config.proto.clone(), rand_seed());
        let mut peers = HashMap::new();
        for (id, addr) in &config.peers {
            peers.insert(*id, *addr);
            node.add_peer(*id, Time(0));
        }
        tokio::spawn(accept_loop(endpoint.clone(), tx.clone()));
        let core = Core {
            node,
            start,
            endpoint,
            client,
            peers,
            conns: HashMap::new(),
            next_conn: 1,
            tx: tx.clone(),
            datagrams_tx: dtx,
            events: etx,
            media_events: metx,
            scratch: Vec::with_capacity(1500),
            driver: DriverMetrics::default(),
            writers: Vec::new(),
            drops: drops.clone(),
            starved: HashSet::new(),
            send_buffer: config.tuning.datagram_send_buffer,
            binds_node_id: config.identity.binds_node_id(),
            closed: HashMap::new(),
        };
        info!(node = config.proto.node_id.0, addr = %local_addr, "trunk listening");
        let task = tokio::spawn(core.run(rx, mrx, drx));
        Ok((
            Trunk {
                tx,
                media: mtx,
                drops,
                local_addr,
                task: Some(task),
            },
            TrunkEvents {
                control: erx,
                media: merx,
            },
        ))
    }

    /// The UDP address the trunk listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Run `f` on the protocol core (open a room, publish a track, ...).
    /// What it causes is carried out before the next input.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Node, Time) -> R + Send + 'static,
    ) -> Result<R, TrunkError> {
        let (tx, rx) = oneshot::channel();
        let call: Call = Box::new(move |node, now| {
            let _ = tx.send(f(node, now));
        });
        self.tx
            .send(Input::Call(call))
            .await
            .map_err(|_| TrunkError::Stopped)?;
        rx.await.map_err(|_| TrunkError::Stopped)
    }

    /// Send one RTP packet of a local track to every node subscribed to
    /// that layer (none: nothing is sent). `arrival` is when the packet
    /// reached this node from its publisher: receivers bound lateness and
    /// keep lip sync with it.
    /// Never blocks: when the queue in front of the core is full the packet
    /// is dropped and counted (`DriverMetrics::media_queue_drops`).
    pub fn send_media(&self, track: TrackId, layer: Layer, packet: Bytes, arrival: Instant) {
        if let Err(mpsc::error::TrySendError::Full(_)) =
            self.media.try_send((track, layer, packet, arrival))
        {
            self.drops
                .media
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Replace the set of discovered addresses to dial (DNS discovery):
    /// each is dialed and redialed while its node has no trunk up, the node
    /// id comes with the Hello, this node's own address is recognised and
    /// skipped, and an address no longer listed is forgotten once its
    /// trunk is down (`Node::set_dial_addrs`).
    /// IPv6 addresses are left out when the trunk listens on IPv4 (its
    /// socket could not reach them; a dual-stack name lists both).
    pub async fn set_dial_addrs(&self, mut addrs: Vec<SocketAddr>) -> Result<(), TrunkError> {
        if self.local_addr.is_ipv4() {
            addrs.retain(SocketAddr::is_ipv4);
        }
        self.call(move |node, now| node.set_dial_addrs(addrs, now))
            .await
    }

    /// State and counters, for `/api/status` and `/metrics`.
    pub async fn status(&self) -> Result<TrunkStatus, TrunkError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Status(tx))
            .await
            .map_err(|_| TrunkError::Stopped)?;
        rx.await.map_err(|_| TrunkError::Stopped)
    }

    /// Say Goodbye on every trunk, close them and wait (briefly) until the
    /// peers have acknowledged.
    pub async fn shutdown(mut self) {
        self.close().await;
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Trunk {
    /// Like [`Trunk::shutdown`] for a trunk shared behind an `Arc`; later
    /// calls return at once.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Input::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

impl Drop for Trunk {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    // Fresh per process (RandomState is randomly keyed): the incarnation
    // and redial jitter must differ across restarts.
    RandomState::new().hash_one(Instant::now())
}

/// The user's side of a trunk's events.
pub struct TrunkEvents {
    /// Protocol events, in order (never dropped).
    pub control: mpsc::UnboundedReceiver<TrunkEvent>,
    /// Media of remote tracks (bounded; what the user does not take in time
    /// is dropped and counted).
    pub media: mpsc::Receiver<TrunkEvent>,
}

impl TrunkEvents {
    /// The next event, control first; `None` once the trunk has stopped.
    pub async fn recv(&mut self) -> Option<TrunkEvent> {
        tokio::select! {
            biased;
            e = self.control.recv() => e,
            Some(m) = self.media.recv() => Some(m),
        }
    }
}

struct Core {
    node: Node,
    start: Instant,
    endpoint: Endpoint,
    client: quinn::ClientConfig,
    peers: HashMap<NodeId, SocketAddr>,
    conns: HashMap<ConnId, ConnHandle>,
    next_conn: u64,
    tx: mpsc::Sender<Input>,
    datagrams_tx: mpsc::Sender<(ConnId, Bytes)>,
    events: mpsc::UnboundedSender<TrunkEvent>,
    media_events: mpsc::Sender<TrunkEvent>,
    scratch: Vec<u8>,
    driver: DriverMetrics,
    /// Writer tasks, awaited at shutdown so Goodbyes are delivered.
    writers: Vec<tokio::task::JoinHandle<()>>,
    drops: Arc<QueueDrops>,
    /// (peer, local video track) pairs whose video was dropped for lack of
    /// bandwidth: a keyframe is asked for when it fits again.
    starved: HashSet<(NodeId, TrackId)>,
    /// quinn's datagram send buffer size (see `VideoGate`: video never
    /// fills more than half of it; the rest is kept for audio).
    send_buffer: usize,
    /// Certificates bind node ids (operator files): each connection's
    /// certified id goes to the core, which checks the Hello against it.
    binds_node_id: bool,
    /// Addresses of connections closed in this `pump`, for the log lines
    /// of the events that follow their close.
    closed: HashMap<ConnId, SocketAddr>,
}

impl Core {
    fn now(&self) -> Time {
        Time(u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX))
    }

    fn instant(&self, t: Time) -> Instant {
        self.start + Duration::from_micros(t.0)
    }

    fn time_of(&self, i: Instant) -> Time {
        Time(u64::try_from(i.saturating_duration_since(self.start).as_micros()).unwrap_or(u64::MAX))
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        mut media: mpsc::Receiver<MediaIn>,
        mut datagrams: mpsc::Receiver<(ConnId, Bytes)>,
    ) {
        self.pump();
        loop {
            let deadline = self.node.poll_timeout().map(|t| self.instant(t));
            let input = tokio::select! {
                i = rx.recv() => i,
                Some((track, layer, packet, arrival)) = media.recv() => {
                    self.send_media(track, layer, &packet, arrival);
                    continue;
                }
                Some((conn, bytes)) = datagrams.recv() => {
                    self.datagram(conn, bytes);
                    self.send_datagrams();
                    continue;
                }
                _ = sleep_until(deadline) => {
                    let now = self.now();
                    for (id, h) in &self.conns {
                        self.node.set_path_rtt(*id, h.conn.rtt());
                    }
                    self.node.handle_timeout(now);
                    self.pump();
                    continue;
                }
            };
            let Some(input) = input else {
                return; // every handle dropped
            };
            if let Input::Shutdown(done) = input {
                self.shutdown().await;
                let _ = done.send(());
                return;
            }
            self.input(input);
            self.pump();
        }
    }

    fn input(&mut self, input: Input) {
        let now = self.now();
        match input {
            Input::Connected {
                conn,
                send,
                recv,
                dialed,
            } => {
                let id = ConnId(self.next_conn);
                self.next_conn += 1;
                let remote = conn.remote_address();
                debug!(conn = id.0, %remote, ?dialed, "trunk connection up");
                let (wtx, wrx) = mpsc::channel(WRITER_QUEUE);
                self.writers.retain(|w| !w.is_finished());
                self.writers
                    .push(tokio::spawn(writer(conn.clone(), send, wrx)));
                tokio::spawn(reader(
                    id,
                    conn.clone(),
                    recv,
                    self.tx.clone(),
                    self.datagrams_tx.clone(),
                    self.drops.clone(),
                ));
                self.conns.insert(
                    id,
                    ConnHandle {
                        conn: conn.clone(),
                        remote,
                        writer: wtx,
                        gate: VideoGate::new(Instant::now()),
                    },
                );
                match dialed {
                    None => self.node.handle_connected(id, None, now),
                    Some(Target::Node(node)) => self.node.handle_connected(id, Some(node), now),
                    Some(Target::Addr(addr)) => self.node.handle_connected_addr(id, addr, now),
                }
                if self.binds_node_id {
                    let certified = peer_node_id(&conn);
                    if let Err(e) = &certified {
                        warn!(%remote, error = %e, "trunk peer's certificate names no usable node id");
                    }
                    self.node.handle_certified(id, certified.ok().flatten());
                }
            }
            Input::DialFailed(Target::Node(node)) => self.node.handle_dial_failed(node, now),
            Input::DialFailed(Target::Addr(addr)) => self.node.handle_addr_dial_failed(addr, now),
            Input::HandshakeFailed => self.driver.handshakes_failed += 1,
            Input::Frame(id, body) => {
                if self.conns.contains_key(&id) {
                    self.node.handle_frame(id, &body, now);
                }
            }
            Input::Corrupt(id) => {
                if let Some(h) = self.conns.remove(&id) {
                    warn!(conn = id.0, "corrupt control stream; closing the trunk");
                    close_conn(&h, CloseCode::ProtocolError);
                    self.node.handle_lost(id, now);
                }
            }
            Input::Lost(id) => {
                // Connections the core closed itself are already gone.
                if self.conns.remove(&id).is_some() {
                    self.node.handle_lost(id, now);
                }
            }
            Input::Call(f) => f(&mut self.node, now),
            Input::Status(reply) => {
                let rtt = self
                    .node
                    .snapshot()
                    .peers
                    .keys()
                    .filter_map(|n| self.node.rtt(*n).map(|r| (*n, r)))
                    .collect();
                let node = self.node.snapshot();
                let paths = node
                    .peers
                    .keys()
                    .filter_map(|n| {
                        let h = self.conns.get(&self.node.peer_conn(*n)?)?;
                        let p = h.conn.stats().path;
                        Some((
                            *n,
                            PathStatus {
                                rtt: p.rtt,
                                cwnd: p.cwnd,
                                lost_packets: p.lost_packets,
                                congestion_events: p.congestion_events,
                                sent_packets: p.sent_packets,
                                current_mtu: p.current_mtu,
                            },
                        ))
                    })
                    .collect();
                let _ = reply.send(TrunkStatus {
                    node,
                    metrics: self.node.metrics().clone(),
                    driver: DriverMetrics {
                        media_queue_drops: self
                            .drops
                            .media
                            .load(std::sync::atomic::Ordering::Relaxed),
                        datagrams_in_dropped: self
                            .drops
                            .datagrams_in
                            .load(std::sync::atomic::Ordering::Relaxed),
                        ..self.driver
                    },
                    rtt,
                    paths,
                });
            }
            Input::Shutdown(_) => {}
        }
    }

    fn send_media(&mut self, track: TrackId, layer: Layer, packet: &[u8], arrival: Instant) {
        let now = self.now();
        let origin = self.time_of(arrival);
        let mut resumed = false;
        // Encoded straight into the buffer that becomes the `Bytes` every
        // target shares (wire ids are per origin, so the datagram is the
        // same bytes on every trunk); kept for the next packet if unused.
        let mut buf = std::mem::take(&mut self.scratch);
        let out = self
            .node
            .send_media(track, layer, packet, origin, now, &mut buf);
        if out.is_empty() {
            self.scratch = buf;
            return;
        }
        let video = out.video;
        let datagram = Bytes::from(buf);
        let at = Instant::now();
        for &(node, conn) in out.targets {
            let Some(h) = self.conns.get_mut(&conn) else {
                continue;
            };
            if video {
                // Keep audio first: when quinn's buffer is short of room the
                // trunk lacks bandwidth; video waits for a keyframe.
                if !h.gate.allow(&h.conn, self.send_buffer, at) {
                    self.driver.video_dropped_congestion += 1;
                    self.starved.insert((node, track));
                    continue;
                }
                if self.starved.remove(&(node, track)) {
                    self.driver.video_resumed += 1;
                    resumed = true;
                }
            }
            // `send_datagram`, not `send_datagram_wait`: the core must never
            // block on one slow trunk. Under congestion quinn drops the
            // oldest queued datagrams, which is what real-time media wants.
            match h.conn.send_datagram(datagram.clone()) {
                Ok(()) => {}
                Err(quinn::SendDatagramError::TooLarge) => {
                    self.driver.datagrams_too_large += 1;
                    debug!(
                        node = node.0,
                        size = datagram.len(),
                        "media packet too large for the path"
                    );
                }
                Err(e) => {
                    self.driver.datagrams_failed += 1;
                    debug!(node = node.0, error = %e, "media datagram not sent");
                }
            }
        }
        if resumed {
            debug!(track = track.0, "trunk has room for video again: keyframe");
            self.node.request_local_keyframe(track, now);
            self.pump();
        }
    }

    /// A datagram from a connection: media goes to the user (bounded),
    /// NACKs make retransmissions.
    fn datagram(&mut self, id: ConnId, bytes: Bytes) {
        if !self.conns.contains_key(&id) {
            return;
        }
        let now = self.now();
        let Some(d) = self.node.handle_datagram(id, &bytes, now) else {
            return;
        };
        let offset = bytes.len() - d.packet.len();
        let event = TrunkEvent::Media {
            node: d.node,
            wire_id: d.wire_id,
            packet: bytes.slice(offset..),
            origin: self.instant(d.origin),
            repaired: d.repaired,
        };
        if self.media_events.try_send(event).is_err() {
            self.driver.media_events_dropped += 1;
        }
    }

    /// Send the datagrams the core asked for (NACKs, retransmissions).
    fn send_datagrams(&mut self) {
        let now = Instant::now();
        while let Some(d) = self.node.poll_datagram() {
            let Some(h) = self.conns.get_mut(&d.conn) else {
                continue;
            };
            if d.retransmit && !h.gate.allow_retransmit(&h.conn, self.send_buffer, now) {
                self.driver.video_dropped_congestion += 1;
                continue;
            }
            if let Err(e) = h.conn.send_datagram(Bytes::from(d.bytes)) {
                self.driver.datagrams_failed += 1;
                debug!(node = d.node.0, error = %e, "repair datagram not sent");
            }
        }
    }

    /// Carry out what the core asked for.
    fn pump(&mut self) {
        while let Some(t) = self.node.poll_transmit() {
            match t {
                Transmit::Frame { conn, bytes } => {
                    let full = match self.conns.get(&conn) {
                        Some(h) => matches!(
                            h.writer.try_send(Write::Frame(bytes)),
                            Err(mpsc::error::TrySendError::Full(_))
                        ),
                        None => false,
                    };
                    if full {
                        // The peer stopped reading its control stream.
                        warn!(conn = conn.0, "trunk writer queue full; closing the trunk");
                        self.driver.writer_overflows += 1;
                        if let Some(h) = self.conns.remove(&conn) {
                            close_conn(&h, CloseCode::Timeout);
                        }
                        let now = self.now();
                        self.node.handle_lost(conn, now);
                    }
                }
                Transmit::Close { conn, code } => {
                    if let Some(h) = self.conns.remove(&conn) {
                        debug!(conn = conn.0, ?code, "closing trunk connection");
                        close_conn(&h, code);
                        self.closed.insert(conn, h.remote);
                    }
                }
            }
        }
        while let Some(e) = self.node.poll_event() {
            match e {
                Event::Redial { node } => self.dial(Target::Node(node)),
                Event::Dial { addr } => self.dial(Target::Addr(addr)),
                e => {
                    match &e {
                        Event::LinkUp { node, .. } => info!(peer = node.0, "trunk link up"),
                        Event::LinkDown {
                            node,
                            reason: CloseCode::NodeIdInUse,
                        } => error!(
                            peer = node.0,
                            me = self.node.node_id().0,
                            "trunk peer {} refused this node: another live node already uses \
                             node id {} (every node needs its own --node-id)",
                            node.0,
                            self.node.node_id().0
                        ),
                        Event::LinkDown {
                            node,
                            reason: CloseCode::NotCertified,
                        } => error!(
                            peer = node.0,
                            "trunk peer {} refused this node: our certificate does not name node id {}",
                            node.0,
                            self.node.node_id().0
                        ),
                        Event::LinkDown { node, reason } => {
                            info!(peer = node.0, ?reason, "trunk link down")
                        }
                        Event::Refused { conn, node, why } => self.log_refusal(*conn, *node, *why),
                        _ => {}
                    }
                    let _ = self.events.send(TrunkEvent::Proto(e));
                }
            }
        }
        self.closed.clear();
        self.send_datagrams();
    }

    /// Say loudly who was refused, with both addresses where two claim one id.
    fn log_refusal(&self, conn: ConnId, node: NodeId, why: Refusal) {
        let addr = |c: ConnId| {
            self.closed
                .get(&c)
                .or_else(|| self.conns.get(&c).map(|h| &h.remote))
                .map_or_else(|| "?".to_owned(), |a| a.to_string())
        };
        let refused = addr(conn);
        match why {
            Refusal::NodeIdInUse { live } => error!(
                node = node.0,
                live = %addr(live),
                refused = %refused,
                "two live nodes claim node id {}: the one at {} was there first and keeps its \
                 trunk; the one at {} is refused. Give every node its own --node-id",
                node.0,
                addr(live),
                refused
            ),
            Refusal::OurNodeId => error!(
                node = node.0,
                peer = %refused,
                "the node at {} claims this node's own id {}: refused. Give every node its own \
                 --node-id",
                refused,
                node.0
            ),
            Refusal::NotCertified { certified } => warn!(
                claimed = node.0,
                certified = ?certified.map(|n| n.0),
                peer = %refused,
                "trunk peer at {} says it is node {} but its certificate names {}: refused",
                refused,
                node.0,
                certified.map_or_else(|| "no node id".to_owned(), |n| format!("node {}", n.0))
            ),
        }
    }

    fn dial(&mut self, target: Target) {
        let tx = self.tx.clone();
        let addr = match target {
            Target::Addr(addr) => addr,
            Target::Node(node) => match self.peers.get(&node) {
                Some(addr) => *addr,
                None => {
                    // A peer that dialed us and went away: we do not know
                    // where it lives, so it must dial again.
                    tokio::spawn(async move {
                        let _ = tx.send(Input::DialFailed(target)).await;
                    });
                    return;
                }
            },
        };
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), addr, SERVER_NAME);
        tokio::spawn(async move {
            let attempt = async {
                let conn = connecting
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                Ok::<_, String>((conn, send, recv))
            };
            match tokio::time::timeout(DIAL_TIMEOUT, attempt).await {
                Ok(Ok((conn, send, recv))) => {
                    let _ = tx
                        .send(Input::Connected {
                            conn,
                            send,
                            recv,
                            dialed: Some(target),
                        })
                        .await;
                }
                Ok(Err(e)) => {
                    debug!(?target, %addr, error = %e, "dial failed");
                    let _ = tx.send(Input::DialFailed(target)).await;
                }
                Err(_) => {
                    debug!(?target, %addr, "dial timed out");
                    let _ = tx.send(Input::DialFailed(target)).await;
                }
            }
        });
    }

    async fn shutdown(&mut self) {
        let now = self.now();
        self.node.shutdown(now);
        self.pump();
        // Writers flush their Goodbye and close; wait until the peers have
        // acknowledged (bounded), so they learn at once rather than by timeout.
        for (_, h) in self.conns.drain() {
            close_conn(&h, CloseCode::Shutdown);
        }
        let writers = std::mem::take(&mut self.writers);
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
            for w in writers {
                let _ = w.await;
            }
        })
        .await;
        self.endpoint.close(
            VarInt::from_u32(CloseCode::Shutdown.code()),
            b"shutting down",
        );
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.endpoint.wait_idle()).await;
        info!("trunk stopped");
    }
}
