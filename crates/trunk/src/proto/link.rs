//! Connections and per-peer link state, and the redial schedule.

use super::directory::{RemoteRoom, WireIn};
use super::heartbeat::Heartbeat;
use super::node::PeerMediaStats;
use super::repair::ClockOffset;
use super::time::Time;
use super::types::{ConnId, Generation, Incarnation, NodeId, RoomName, WireId};
use super::wire::Message;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Connected; waiting for the peer's Hello (our Hello is sent).
    Handshaking,
    /// The peer's Hello names `node` with a new `incarnation` while `node`
    /// has a live trunk (`old`): a restart, a second process with that id,
    /// or a stale Hello from a process already gone? We sent a Ping on
    /// `old` (`seq`) and one on this connection (`own_seq`), and hold what
    /// this connection sends meanwhile (`Conn::held`).
    /// - both answer ⇒ two live processes claim the id: this one (the
    ///   later) is refused, `NodeIdInUse`;
    /// - `old` ends, or is silent by `until` ⇒ the peer restarted: this
    ///   connection replaces `old`;
    /// - only `old` answers by `until` ⇒ this connection's process is gone
    ///   (its Hello came late): closed quietly.
    Probing {
        node: NodeId,
        incarnation: Incarnation,
        old: ConnId,
        seq: u64,
        own_seq: u64,
        until: Time,
        old_alive: bool,
        alive: bool,
    },
    /// Hello exchanged; the peer's one live trunk.
    Active(NodeId),
}

/// What we dialed when we opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialed {
    /// A configured peer, by node id (`add_peer`).
    Node(NodeId),
    /// A discovered address (`set_dial_addrs`): whose it is, the Hello says.
    Addr(SocketAddr),
}

#[derive(Debug)]
pub(crate) struct Conn {
    /// `Some(..)` if we dialed it.
    pub dialed: Option<Dialed>,
    pub state: ConnState,
    pub heartbeat: Heartbeat,
    /// Order of creation, for tie-breaking duplicates (newest wins).
    pub serial: u64,
    /// The transport's own RTT estimate of the path (the driver's), if
    /// given: it follows the datagram path, unlike Ping/Pong on the stream,
    /// which head-of-line blocking inflates exactly when the path is lossy.
    pub path_rtt: Option<std::time::Duration>,
    /// The node id the connection's certificate names, when the driver
    /// checks certificates (operator CA files): `Some(None)` if it names
    /// none. `None`: not checked (shared secret: any holder mints any).
    pub certified: Option<Option<NodeId>>,
    /// Messages received while `Probing`, delivered in order if the
    /// connection becomes active (bounded by `held_bytes`).
    pub held: Vec<Message>,
    pub held_bytes: usize,
}

/// Redial state of a peer we were configured to dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DialState {
    /// Not configured to dial, or connected.
    Idle,
    /// A dial is scheduled at this time.
    Scheduled(Time),
    /// The driver is dialing (Redial event emitted), result pending.
    Dialing,
}

/// A discovered address to dial (`Node::set_dial_addrs`). The node behind
/// it is learned from the Hello on a connection we dialed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AddrTarget {
    /// In the latest discovered set. An address no longer listed is
    /// forgotten once nothing of it is in flight and its node's trunk is
    /// down; it is never torn down for that.
    pub listed: bool,
    /// The node that answered there (its Hello), if any yet.
    pub node: Option<NodeId>,
    /// We reached ourselves there (our own id and incarnation came back):
    /// never dialed again while listed.
    pub is_self: bool,
    pub dial: DialState,
    pub attempts: u32,
}

impl AddrTarget {
    pub fn new() -> Self {
        Self {
            listed: true,
            node: None,
            is_self: false,
            dial: DialState::Idle,
            attempts: 0,
        }
    }
}

/// Everything about one remote node.
#[derive(Debug)]
pub(crate) struct Peer {
    /// We dial this peer (from config) and redial after losses.
    pub configured: bool,
    pub conn: Option<ConnId>,
    pub incarnation: Option<Incarnation>,
    /// The peer's interest set: rooms it has open and their generations.
    pub remote_open: BTreeMap<RoomName, Generation>,
    /// Up room links (local open ∧ remote open ∧ link active).
    pub rooms: BTreeMap<RoomName, RemoteRoom>,
    /// Datagram demultiplexing: wire id → room and repair state, for up
    /// room links only.
    pub wires: HashMap<WireId, WireIn>,
    /// The peer's clock against ours, from its media datagrams.
    pub clock: ClockOffset,
    /// Retransmissions it may still ask of us (token bucket).
    pub retransmit_budget: Budget,
    /// Room re-`Open`s it may still send (`Config::max_reopens_per_sec`).
    pub reopen_budget: Budget,
    pub stats: PeerMediaStats,
    pub dial: DialState,
    pub attempts: u32,
    pub ever_up: bool,
}

impl Peer {
    pub fn new(configured: bool) -> Self {
        Self {
            configured,
            conn: None,
            incarnation: None,
            remote_open: BTreeMap::new(),
            rooms: BTreeMap::new(),
            wires: HashMap::new(),
            clock: ClockOffset::default(),
            retransmit_budget: Budget::default(),
            reopen_budget: Budget::default(),
            stats: PeerMediaStats::default(),
            dial: DialState::Idle,
            attempts: 0,
            ever_up: false,
        }
    }
}

/// A token bucket of whole tokens refilled at `rate` per second, holding at
/// most `rate` (one second's worth).
#[derive(Debug, Clone, Default)]
pub(crate) struct Budget {
    /// Tokens in millionths, so refills of a few microseconds are not lost.
    micro: u64,
    last: Option<Time>,
}

impl Budget {
    /// Take one token at `now` if there is one.
    pub fn take(&mut self, now: Time, rate: u32) -> bool {
        let cap = u64::from(rate) * 1_000_000;
        let refill = match self.last {
            None => cap,
            Some(t) => now.since(t).as_micros() as u64 * u64::from(rate),
        };
        self.last = Some(now);
        self.micro = self.micro.saturating_add(refill).min(cap);
        if self.micro >= 1_000_000 {
            self.micro -= 1_000_000;
            true
        } else {
            false
        }
    }
}

/// Exponential backoff with jitter: `base × 2^attempts`, capped, then
/// scaled by a random factor in [0.5, 1.0] so a cluster that lost a node
/// does not redial it in lockstep.
pub(crate) fn backoff(base: Duration, cap: Duration, attempts: u32, rand: u64) -> Duration {
    let exp = base.saturating_mul(1u32 << attempts.min(20));
    let d = exp.min(cap);
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let half = micros / 2;
    let jitter = if half == 0 { 0 } else { rand % (half + 1) };
    Duration::from_micros(half + jitter)
}

/// SplitMix64: the injected randomness (incarnation, jitter) comes from the
/// seed given at construction, so runs are reproducible.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_refills_at_its_rate() {
        let mut b = Budget::default();
        let taken = (0..50).filter(|_| b.take(Time(0), 10)).count();
        assert_eq!(taken, 10, "a full second's burst at start");
        assert!(!b.take(Time(50_000), 10), "0.5 token after 50 ms");
        assert!(b.take(Time(100_000), 10));
        assert!(!b.take(Time(100_000), 10));
    }

    #[test]
    fn backoff_grows_and_caps() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(10);
        for a in 0..30 {
            for r in [0u64, 1, 12345, u64::MAX] {
                let d = backoff(base, cap, a, r);
                assert!(d <= cap);
                let full = base.saturating_mul(1 << a.min(20)).min(cap);
                assert!(d >= full / 2, "attempt {a}: {d:?} < half of {full:?}");
            }
        }
        assert_eq!(backoff(base, cap, 0, 0), Duration::from_millis(50));
    }
}
