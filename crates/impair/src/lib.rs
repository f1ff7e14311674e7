//! A deterministic user-space UDP impairment proxy.
//!
//! # Why
//!
//! Switchboard's trunks (QUIC between nodes) and media paths must be tested
//! and benchmarked over bad networks: loss, burst loss, delay, jitter and
//! bandwidth caps. The usual tool is Linux `tc netem`, but the kernel this
//! project is developed and benchmarked on has no netem (nor the privileges
//! to load it). This crate does the same job in user space, for UDP only:
//! point a client at the proxy instead of the real server.
//!
//! # What
//!
//! [`Proxy`] listens on [`ProxyConfig::listen`]. Every datagram from a client
//! address `C` is forwarded to [`ProxyConfig::upstream`] from a socket owned
//! by that client (NAT style: one upstream socket per client address, bound
//! to an ephemeral port), and every datagram coming back on that socket is
//! forwarded to `C` from the listen socket. Each [`Direction`] has its own
//! [`Impairment`], applied in this order:
//!
//! 1. random loss: independent loss with probability [`Impairment::loss`],
//!    plus Gilbert-Elliott burst loss ([`Burst`]) on top;
//! 2. bottleneck: a rate cap ([`Impairment::rate_bps`]) modelled as a
//!    serialization queue with a drop-tail byte limit
//!    ([`Impairment::queue_bytes`]);
//! 3. propagation: a fixed [`Impairment::delay`] plus a uniform random extra
//!    delay in `[0, jitter]` drawn independently per packet, so packets are
//!    reordered when the jitter exceeds the gap between them (not FIFO).
//!
//! # Determinism
//!
//! Loss and jitter decisions come from a ChaCha RNG seeded with
//! [`ProxyConfig::seed`] (one stream per direction) and exactly four draws are
//! made per packet, so the n-th packet of a direction always gets the same
//! random fate. Drops by the rate-cap queue depend on real arrival times and
//! so are only as deterministic as the sender's timing. Timing is real:
//! packets are scheduled on a heap per direction and sent by a thread that
//! sleeps until the next one is due (sub-millisecond accuracy).
//!
//! Nothing that can fail on the network panics: errors are counted in
//! [`Stats`] and logged with `tracing`.

mod shaper;

use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;

use shaper::{Fate, Shaper};

/// Default drop-tail queue limit of the rate cap: 64 KiB.
pub const DEFAULT_QUEUE_BYTES: usize = 64 * 1024;
/// At most this many packets wait in one direction's delay stage; beyond it
/// packets are dropped and counted in [`DirectionStats::dropped_overflow`].
pub const MAX_SCHEDULED_PACKETS: usize = 100_000;
/// At most this many bytes wait in one direction's delay stage.
pub const MAX_SCHEDULED_BYTES: usize = 64 * 1024 * 1024;
/// At most this many client addresses are served at once; datagrams from
/// further clients are dropped and counted as overflow.
pub const MAX_CLIENTS: usize = 4096;
/// A client (and its upstream socket) is forgotten after this long without a
/// datagram in either direction.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How often blocked receive calls wake up to check for shutdown.
const POLL: Duration = Duration::from_millis(50);
/// Socket buffer size asked for (best effort; the kernel may cap it).
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Gilbert-Elliott burst loss: a two-state Markov chain evaluated once per
/// packet. In the "good" state no burst loss happens; each packet the chain
/// enters the "bad" state with probability `p_enter`, and leaves it with
/// probability `p_leave`. In the bad state a packet is lost with probability
/// `loss_in_burst`. Mean burst length is `1 / p_leave` packets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Burst {
    pub p_enter: f64,
    pub p_leave: f64,
    pub loss_in_burst: f64,
}

/// Parses `p_enter,p_leave,loss_in_burst`, e.g. `0.01,0.3,0.8`.
impl FromStr for Burst {
    type Err = InvalidImpairment;

    fn from_str(s: &str) -> Result<Burst, InvalidImpairment> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let [a, b, c] = parts.as_slice() else {
            return Err(InvalidImpairment::BurstSyntax(s.to_owned()));
        };
        let num = |x: &str| {
            x.parse::<f64>()
                .map_err(|_| InvalidImpairment::BurstSyntax(s.to_owned()))
        };
        let burst = Burst {
            p_enter: num(a)?,
            p_leave: num(b)?,
            loss_in_burst: num(c)?,
        };
        burst.validate()?;
        Ok(burst)
    }
}

impl Burst {
    fn validate(&self) -> Result<(), InvalidImpairment> {
        probability("burst p_enter", self.p_enter)?;
        probability("burst p_leave", self.p_leave)?;
        probability("burst loss_in_burst", self.loss_in_burst)
    }
}

/// The impairment of one direction. [`Impairment::default`] is a perfect
/// link (no loss, no delay, no cap) with a [`DEFAULT_QUEUE_BYTES`] queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Impairment {
    /// Independent random loss probability, 0..=1.
    pub loss: f64,
    /// Gilbert-Elliott burst loss on top of `loss`.
    pub burst: Option<Burst>,
    /// Base one-way delay.
    pub delay: Duration,
    /// Uniform extra delay in `[0, jitter]`, drawn per packet independently
    /// (packets are reordered when it exceeds the inter-packet gap).
    pub jitter: Duration,
    /// Bandwidth cap in bits per second; `None` is unlimited. `Some(0)` is
    /// invalid.
    pub rate_bps: Option<u64>,
    /// Drop-tail limit of the rate cap's queue in bytes (packets admitted but
    /// not yet serialized). Only used with `rate_bps`. A packet arriving on an
    /// idle link is always accepted, even if larger.
    pub queue_bytes: usize,
}

impl Default for Impairment {
    fn default() -> Impairment {
        Impairment {
            loss: 0.0,
            burst: None,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            rate_bps: None,
            queue_bytes: DEFAULT_QUEUE_BYTES,
        }
    }
}

impl Impairment {
    /// A perfect link; same as [`Impairment::default`].
    pub fn none() -> Impairment {
        Impairment::default()
    }

    /// Checks that probabilities are within 0..=1 and the rate is not zero.
    pub fn validate(&self) -> Result<(), InvalidImpairment> {
        probability("loss", self.loss)?;
        if let Some(b) = &self.burst {
            b.validate()?;
        }
        if self.rate_bps == Some(0) {
            return Err(InvalidImpairment::ZeroRate);
        }
        Ok(())
    }

    /// Returns a copy with every out-of-range value clamped into range
    /// (probabilities to 0..=1, NaN to 0, a zero rate to "no cap").
    pub fn sanitized(&self) -> Impairment {
        let clamp = |p: f64| if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        Impairment {
            loss: clamp(self.loss),
            burst: self.burst.map(|b| Burst {
                p_enter: clamp(b.p_enter),
                p_leave: clamp(b.p_leave),
                loss_in_burst: clamp(b.loss_in_burst),
            }),
            rate_bps: self.rate_bps.filter(|&r| r > 0),
            ..self.clone()
        }
    }
}

/// A rejected [`Impairment`] or [`Burst`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidImpairment {
    #[error("{name} must be a probability in 0..=1, got {value}")]
    Probability { name: &'static str, value: f64 },
    #[error("rate_bps must be > 0 (use None for no cap)")]
    ZeroRate,
    #[error("burst must be `p_enter,p_leave,loss_in_burst`, got {0:?}")]
    BurstSyntax(String),
}

fn probability(name: &'static str, value: f64) -> Result<(), InvalidImpairment> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(InvalidImpairment::Probability { name, value })
    }
}

/// The two directions through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client -> proxy -> upstream.
    ToUpstream,
    /// Upstream -> proxy -> client.
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToUpstream => 0,
            Direction::ToClient => 1,
        }
    }
}

/// What [`Proxy::start`] needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// Where clients send to. Port 0 picks a free port; see
    /// [`Proxy::local_addr`].
    pub listen: SocketAddr,
    /// Where datagrams are forwarded to.
    pub upstream: SocketAddr,
    pub to_upstream: Impairment,
    pub to_client: Impairment,
    /// Seeds the loss and jitter decisions (one RNG stream per direction).
    pub seed: u64,
}

impl ProxyConfig {
    /// A config with no impairment in either direction and seed 0.
    pub fn new(listen: SocketAddr, upstream: SocketAddr) -> ProxyConfig {
        ProxyConfig {
            listen,
            upstream,
            to_upstream: Impairment::default(),
            to_client: Impairment::default(),
            seed: 0,
        }
    }
}

/// Counters of one direction, since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DirectionStats {
    /// Datagrams received by the proxy in this direction.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Datagrams sent on successfully.
    pub forwarded: u64,
    pub bytes_forwarded: u64,
    /// Dropped by random or burst loss.
    pub dropped_loss: u64,
    /// Dropped by the rate cap's full queue (drop-tail).
    pub dropped_queue: u64,
    /// Dropped because a memory bound was hit ([`MAX_SCHEDULED_PACKETS`],
    /// [`MAX_SCHEDULED_BYTES`], [`MAX_CLIENTS`]) or no upstream socket could
    /// be opened for a new client.
    pub dropped_overflow: u64,
    /// Sends that failed (e.g. `ECONNREFUSED` from a closed port).
    pub send_errors: u64,
    /// Datagrams currently waiting to be sent (gauge, not a counter).
    pub pending: u64,
}

/// A snapshot of the proxy's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub to_upstream: DirectionStats,
    pub to_client: DirectionStats,
    /// Client addresses currently served.
    pub clients: u64,
    /// Failed receive calls (other than timeouts), both sockets kinds.
    pub recv_errors: u64,
}

impl Stats {
    /// The counters of one direction.
    pub fn dir(&self, dir: Direction) -> &DirectionStats {
        match dir {
            Direction::ToUpstream => &self.to_upstream,
            Direction::ToClient => &self.to_client,
        }
    }
}

impl fmt::Display for DirectionStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "in={} fwd={} bytes={} loss={} queue={} overflow={} send_err={} pending={}",
            self.packets_in,
            self.forwarded,
            self.bytes_forwarded,
            self.dropped_loss,
            self.dropped_queue,
            self.dropped_overflow,
            self.send_errors,
            self.pending,
        )
    }
}

/// One line: `up[...] down[...] clients=N recv_err=N`.
impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "up[{}] down[{}] clients={} recv_err={}",
            self.to_upstream, self.to_client, self.clients, self.recv_errors
        )
    }
}

#[derive(Default)]
struct Counters {
    packets_in: AtomicU64,
    bytes_in: AtomicU64,
    forwarded: AtomicU64,
    bytes_forwarded: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_overflow: AtomicU64,
    send_errors: AtomicU64,
    pending: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> DirectionStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DirectionStats {
            packets_in: get(&self.packets_in),
            bytes_in: get(&self.bytes_in),
            forwarded: get(&self.forwarded),
            bytes_forwarded: get(&self.bytes_forwarded),
            dropped_loss: get(&self.dropped_loss),
            dropped_queue: get(&self.dropped_queue),
            dropped_overflow: get(&self.dropped_overflow),
            send_errors: get(&self.send_errors),
            pending: get(&self.pending),
        }
    }
}

/// Where a scheduled datagram goes.
enum Target {
    /// A client's upstream socket, connected to the upstream address.
    Connected(Arc<UdpSocket>),
    /// The listen socket, to a client address.
    To(Arc<UdpSocket>, SocketAddr),
}

struct Scheduled {
    due: Instant,
    seq: u64,
    data: Vec<u8>,
    target: Target,
}

// Min-heap on (due, seq): `BinaryHeap` is a max-heap, so order reversed.
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Scheduled {}

struct LaneState {
    shaper: Shaper,
    heap: BinaryHeap<Scheduled>,
    heap_bytes: usize,
    next_seq: u64,
}

/// One direction: shaper + schedule + counters, served by one sender thread.
struct Lane {
    dir: Direction,
    state: Mutex<LaneState>,
    wake: Condvar,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the proxy down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Lane {
    fn new(dir: Direction, imp: Impairment, seed: u64) -> Lane {
        Lane {
            dir,
            state: Mutex::new(LaneState {
                shaper: Shaper::new(imp, seed, dir),
                heap: BinaryHeap::new(),
                heap_bytes: 0,
                next_seq: 0,
            }),
            wake: Condvar::new(),
            counters: Counters::default(),
        }
    }

    /// Takes one received datagram: decides its fate and schedules it.
    fn push(&self, now: Instant, data: Vec<u8>, target: Target) {
        let len = data.len();
        bump(&self.counters.packets_in, 1);
        bump(&self.counters.bytes_in, len as u64);
        let mut st = lock(&self.state);
        match st.shaper.admit(now, len) {
            Fate::Lost => bump(&self.counters.dropped_loss, 1),
            Fate::QueueFull => bump(&self.counters.dropped_queue, 1),
            Fate::Deliver(due) => {
                if st.heap.len() >= MAX_SCHEDULED_PACKETS
                    || st.heap_bytes + len > MAX_SCHEDULED_BYTES
                {
                    bump(&self.counters.dropped_overflow, 1);
                    return;
                }
                let seq = st.next_seq;
                st.next_seq += 1;
                st.heap_bytes += len;
                st.heap.push(Scheduled {
                    due,
                    seq,
                    data,
                    target,
                });
                bump(&self.counters.pending, 1);
                if st.heap.peek().is_some_and(|top| top.seq == seq) {
                    // New earliest deadline: the sender must re-arm its wait.
                    self.wake.notify_one();
                }
            }
        }
    }

    /// The sender thread: sends each datagram when it is due.
    fn run_sender(&self, stop: &AtomicBool) {
        let mut batch: Vec<Scheduled> = Vec::new();
        let mut st = lock(&self.state);
        loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            let Some(next_due) = st.heap.peek().map(|s| s.due) else {
                st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            let now = Instant::now();
            if next_due > now {
                st = self
                    .wake
                    .wait_timeout(st, next_due - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            while st.heap.peek().is_some_and(|s| s.due <= now) {
                if let Some(s) = st.heap.pop() {
                    st.heap_bytes -= s.data.len();
                    batch.push(s);
                }
            }
            drop(st);
            for s in batch.drain(..) {
                self.send(s);
            }
            st = lock(&self.state);
        }
    }

    fn send(&self, s: Scheduled) {
        self.counters.pending.fetch_sub(1, Ordering::Relaxed);
        let result = match &s.target {
            Target::Connected(sock) => sock.send(&s.data),
            Target::To(sock, addr) => sock.send_to(&s.data, addr),
        };
        match result {
            Ok(_) => {
                bump(&self.counters.forwarded, 1);
                bump(&self.counters.bytes_forwarded, s.data.len() as u64);
            }
            Err(e) => {
                let n = self.counters.send_errors.fetch_add(1, Ordering::Relaxed);
                if n == 0 {
                    tracing::warn!(dir = ?self.dir, error = %e, "impair: send failed (further failures logged at debug)");
                } else {
                    tracing::debug!(dir = ?self.dir, error = %e, "impair: send failed");
                }
            }
        }
    }
}

struct Shared {
    stop: AtomicBool,
    lanes: [Lane; 2],
    clients: AtomicU64,
    recv_errors: AtomicU64,
    /// Reference point for the clients' last-activity timestamps.
    epoch: Instant,
}

impl Shared {
    fn lane(&self, dir: Direction) -> &Lane {
        &self.lanes[dir.index()]
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn millis_since_epoch(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn recv_error(&self, what: &str, e: &io::Error) {
        let n = self.recv_errors.fetch_add(1, Ordering::Relaxed);
        if n == 0 {
            tracing::warn!(error = %e, "impair: {what} receive failed (further failures logged at debug)");
        } else {
            tracing::debug!(error = %e, "impair: {what} receive failed");
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let sock = UdpSocket::bind(addr)?;
    let sref = socket2::SockRef::from(&sock);
    // Best effort: bursts at high rates would otherwise overflow the default
    // kernel buffers before the proxy sees them.
    let _ = sref.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sref.set_send_buffer_size(SOCKET_BUFFER);
    sock.set_read_timeout(Some(POLL))?;
    Ok(sock)
}

/// One client address and its upstream socket.
struct Client {
    socket: Arc<UdpSocket>,
    last_active: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Client {
    fn open(
        shared: &Arc<Shared>,
        listen: &Arc<UdpSocket>,
        addr: SocketAddr,
        upstream: SocketAddr,
    ) -> io::Result<Client> {
        let ip: IpAddr = match (upstream.ip().is_loopback(), upstream) {
            (true, SocketAddr::V4(_)) => Ipv4Addr::LOCALHOST.into(),
            (true, SocketAddr::V6(_)) => Ipv6Addr::LOCALHOST.into(),
            (false, SocketAddr::V4(_)) => Ipv4Addr::UNSPECIFIED.into(),
            (false, SocketAddr::V6(_)) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let socket = bind_udp(SocketAddr::new(ip, 0))?;
        socket.connect(upstream)?;
        let socket = Arc::new(socket);
        let last_active = Arc::new(AtomicU64::new(shared.millis_since_epoch(Instant::now())));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (shared, listen, socket, last_active, stop) = (
                shared.clone(),
                listen.clone(),
                socket.clone(),
                last_active.clone(),
                stop.clone(),
            );
            thread::Builder::new()
                .name("impair-client".into())
                .spawn(move || {
                    let mut buf = vec![0u8; 65_536];
                    let lane = shared.lane(Direction::ToClient);
                    while !shared.stopping() && !stop.load(Ordering::Acquire) {
                        match socket.recv(&mut buf) {
                            Ok(n) => {
                                let now = Instant::now();
                                last_active
                                    .store(shared.millis_since_epoch(now), Ordering::Relaxed);
                                lane.push(now, buf[..n].to_vec(), Target::To(listen.clone(), addr));
                            }
                            Err(e) if is_timeout(&e) => {}
                            Err(e) => {
                                // E.g. ECONNREFUSED after an ICMP port
                                // unreachable: upstream not listening (yet).
                                shared.recv_error("upstream", &e);
                                thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                })?
        };
        Ok(Client {
            socket,
            last_active,
            stop,
            thread,
        })
    }
}

/// The listen thread: receives from clients, opens per-client upstream
/// sockets, expires idle clients.
fn run_listener(shared: Arc<Shared>, listen: Arc<UdpSocket>, upstream: SocketAddr) {
    let mut clients: HashMap<SocketAddr, Client> = HashMap::new();
    let mut retired: Vec<JoinHandle<()>> = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let mut last_sweep = Instant::now();
    let lane = shared.lane(Direction::ToUpstream);
    while !shared.stopping() {
        match listen.recv_from(&mut buf) {
            Ok((n, from)) => {
                let now = Instant::now();
                let client = match clients.entry(from) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => {
                        if shared.clients.load(Ordering::Relaxed) as usize >= MAX_CLIENTS {
                            bump(&lane.counters.packets_in, 1);
                            bump(&lane.counters.bytes_in, n as u64);
                            bump(&lane.counters.dropped_overflow, 1);
                            continue;
                        }
                        match Client::open(&shared, &listen, from, upstream) {
                            Ok(c) => {
                                bump(&shared.clients, 1);
                                tracing::debug!(client = %from, "impair: new client");
                                e.insert(c)
                            }
                            Err(err) => {
                                tracing::warn!(client = %from, error = %err, "impair: cannot open upstream socket");
                                bump(&lane.counters.packets_in, 1);
                                bump(&lane.counters.bytes_in, n as u64);
                                bump(&lane.counters.dropped_overflow, 1);
                                continue;
                            }
                        }
                    }
                };
                client
                    .last_active
                    .store(shared.millis_since_epoch(now), Ordering::Relaxed);
                lane.push(
                    now,
                    buf[..n].to_vec(),
                    Target::Connected(client.socket.clone()),
                );
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                shared.recv_error("listen", &e);
                thread::sleep(Duration::from_millis(1));
            }
        }
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            last_sweep = Instant::now();
            let now_ms = shared.millis_since_epoch(last_sweep);
            let idle_ms = CLIENT_IDLE_TIMEOUT.as_millis() as u64;
            let idle: Vec<SocketAddr> = clients
                .iter()
                .filter(|(_, c)| {
                    now_ms.saturating_sub(c.last_active.load(Ordering::Relaxed)) > idle_ms
                })
                .map(|(addr, _)| *addr)
                .collect();
            for addr in idle {
                if let Some(c) = clients.remove(&addr) {
                    tracing::debug!(client = %addr, "impair: client idle, forgotten");
                    c.stop.store(true, Ordering::Release);
                    shared.clients.fetch_sub(1, Ordering::Relaxed);
                    retired.push(c.thread);
                }
            }
            // Reap the threads of forgotten clients once they have exited.
            let (done, running): (Vec<_>, Vec<_>) =
                retired.drain(..).partition(|h| h.is_finished());
            retired = running;
            for h in done {
                let _ = h.join();
            }
        }
    }
    for (_, c) in clients.drain() {
        let _ = c.thread.join();
    }
    for h in retired {
        let _ = h.join();
    }
}

/// A running impairment proxy. Dropping it (or [`Proxy::stop`]) stops and
/// joins its threads; datagrams still scheduled are discarded.
pub struct Proxy {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Binds the listen socket, spawns the threads (one listener, one sender
    /// per direction, one receiver per client) and returns once bound.
    /// An invalid impairment is an [`io::ErrorKind::InvalidInput`] error.
    pub fn start(config: ProxyConfig) -> io::Result<Proxy> {
        for imp in [&config.to_upstream, &config.to_client] {
            imp.validate()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        }
        let listen = Arc::new(bind_udp(config.listen)?);
        let local_addr = listen.local_addr()?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            lanes: [
                Lane::new(Direction::ToUpstream, config.to_upstream, config.seed),
                Lane::new(Direction::ToClient, config.to_client, config.seed),
            ],
            clients: AtomicU64::new(0),
            recv_errors: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let mut proxy = Proxy {
            local_addr,
            shared: shared.clone(),
            threads: Vec::new(),
        };
        for dir in [Direction::ToUpstream, Direction::ToClient] {
            let shared = shared.clone();
            let name = match dir {
                Direction::ToUpstream => "impair-send-up",
                Direction::ToClient => "impair-send-down",
            };
            // On error `proxy` is dropped, which stops what was spawned.
            proxy.threads.push(
                thread::Builder::new()
                    .name(name.into())
                    .spawn(move || shared.lane(dir).run_sender(&shared.stop))?,
            );
        }
        let upstream = config.upstream;
        proxy.threads.push(
            thread::Builder::new()
                .name("impair-listen".into())
                .spawn(move || run_listener(shared, listen, upstream))?,
        );
        Ok(proxy)
    }

    /// The bound listen address (the real port when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Changes one direction's impairment at runtime; applies to datagrams
    /// received from now on (those already scheduled keep their send time).
    /// Out-of-range values are clamped (see [`Impairment::sanitized`]).
    pub fn set(&self, dir: Direction, imp: Impairment) {
        if let Err(e) = imp.validate() {
            tracing::warn!(error = %e, "impair: invalid impairment clamped");
        }
        lock(&self.shared.lane(dir).state)
            .shaper
            .set(imp.sanitized());
    }

    /// The current impairment of one direction.
    pub fn impairment(&self, dir: Direction) -> Impairment {
        lock(&self.shared.lane(dir).state)
            .shaper
            .impairment()
            .clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        Stats {
            to_upstream: self.shared.lane(Direction::ToUpstream).counters.snapshot(),
            to_client: self.shared.lane(Direction::ToClient).counters.snapshot(),
            clients: self.shared.clients.load(Ordering::Relaxed),
            recv_errors: self.shared.recv_errors.load(Ordering::Relaxed),
        }
    }

    /// Stops and joins all threads (also done on drop).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for lane in &self.shared.lanes {
            // Take the lock so a sender between its stop check and its wait
            // cannot miss the wake-up.
            let _guard = lock(&lane.state);
            lane.wake.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}
