//! One node's trunk protocol: every peer link, every room link, the track
//! directory and subscriptions, behind a sans-IO API.
//!
//! [`Node`] is one state machine. This file holds the struct, its
//! constructor and the output queues; its methods are spread by job over
//! the files next to it, each a further `impl Node` block:
//!
//! | file | what |
//! |---|---|
//! | `config.rs` | [`Config`], `PlantedBugs` (test builds only) |
//! | `outputs.rs` | [`Transmit`] and [`Event`]: what the node asks of the driver and tells the SFU |
//! | `conns.rs` | connections: `handle_connected`, `handle_frame`, Hello, duplicates, restarts, link down, redial, `shutdown` |
//! | `discover.rs` | discovered addresses: `set_dial_addrs`, dialing by address, node ids learned from Hello, self, forgetting |
//! | `rooms.rs` | room links (up, down, resync, broadcast) and every control message a peer sends (`on_message`) |
//! | `api.rs` | the local SFU's calls: `open_room`, `close_room`, participants, `publish_track`, `subscribe`, `request_keyframe`, `send_data` |
//! | `media.rs` | the media fast path and loss repair: `send_media`, `handle_datagram`, NACKs and retransmissions, `poll_datagram` |
//! | `timers.rs` | `handle_timeout` (heartbeats, redials, keyframe and repair timers) and the cached `poll_timeout` |
//! | `inspect.rs` | read-only views: `snapshot`, `check_structure`, the snapshot types |

mod api;
mod config;
mod conns;
mod discover;
mod inspect;
mod media;
mod outputs;
mod rooms;
mod timers;

pub use config::Config;
#[cfg(feature = "planted-bugs")]
pub use config::PlantedBugs;
pub use inspect::{DialAddrSnapshot, NodeSnapshot, PeerMediaStats, PeerSnapshot};
pub use media::{DatagramOut, MediaTargets, RemoteDatagram};
pub use outputs::{Event, Refusal, Transmit};

use super::directory::{LocalRoom, TrackMedia};
use super::link::{AddrTarget, Conn, Peer, SplitMix};
use super::metrics::Metrics;
use super::time::Time;
use super::types::{ConnId, Incarnation, NodeId, RoomName, TrackId, WireId};
use super::wire::{self, Message};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;

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
    /// Discovered addresses to dial, whose node ids come with their Hello
    /// (`set_dial_addrs`; see `conns.rs`).
    addrs: BTreeMap<SocketAddr, AddrTarget>,
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
    /// Planted bug `deliver_removed_tracks`: removed remote tracks whose
    /// media is still delivered.
    #[cfg(feature = "planted-bugs")]
    tombstones: BTreeSet<(NodeId, WireId)>,
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
            addrs: BTreeMap::new(),
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
            #[cfg(feature = "planted-bugs")]
            tombstones: BTreeSet::new(),
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

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}
