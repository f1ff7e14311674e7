//! A node's static configuration, and the test-only switches that plant
//! known bugs (kept apart so the state machine's files hold behaviour only).

use crate::proto::repair::RepairConfig;
use crate::proto::types::NodeId;
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
    /// Extra wait before redialing a discovered address whose node has a
    /// smaller id than ours. Both nodes of a pair usually discover each
    /// other; the duplicate rule keeps the trunk the smaller id dialed, so
    /// letting it dial first spares a trunk that would be closed at once
    /// (and, if ours came up first, a link that goes down and up).
    pub yield_to_smaller: Duration,
    /// Minimum spacing of keyframe requests per track.
    pub keyframe_interval: Duration,
    /// Loss repair and the lateness bound for media (see `repair.rs`).
    pub repair: RepairConfig,
    /// Most times per second (and at once) a peer may re-`Open` a room
    /// with a new generation. Each one tears the room link down and up,
    /// which renegotiates every local browser in the room; a legitimate
    /// peer does it when its room empties and fills again. A peer over
    /// this is cut (protocol error) and redials with backoff.
    pub max_reopens_per_sec: u32,
    /// Most rooms one peer may have open towards us (its interest set is
    /// kept per room even where we have none open): past it, cut likewise.
    pub max_remote_rooms: usize,
    /// Test-only switches that plant known bugs (see `tests/sim/`).
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
            yield_to_smaller: Duration::from_secs(1),
            // Only a guard against a flooding peer: the SFUs on both sides
            // space keyframe requests per track already, and a second 500 ms
            // window here delayed a new cross-node subscriber's first frame.
            keyframe_interval: Duration::from_millis(100),
            repair: RepairConfig::default(),
            max_reopens_per_sec: 10,
            max_remote_rooms: 10_000,
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
    /// Keep delivering media of a remote track after it was removed (a
    /// "grace period" for packets in flight) instead of dropping it as an
    /// unknown wire id: a once-valid wire id stays valid.
    pub deliver_removed_tracks: bool,
    /// Deliver `Data` whatever participant it names as its sender (the
    /// check the SFU adapter alone used to make): a node can speak for
    /// another node's participants.
    pub accept_foreign_data: bool,
}
