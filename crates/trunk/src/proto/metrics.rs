//! Plain counters; the binary exports them (Prometheus) — the core only counts.

/// Monotonic counters of one node's trunk activity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    /// Room-scoped messages for a generation (or room) that is not current here.
    pub stale_drops: u64,
    /// Trunks cut because the peer re-opened rooms too fast or opened too
    /// many (`Config::max_reopens_per_sec`, `max_remote_rooms`).
    pub open_floods: u64,
    /// Datagrams or messages naming a wire id we do not know.
    pub unknown_wire_drops: u64,
    /// `Data` naming as its sender a participant the peer has not announced
    /// in that room (another node's, or nobody's): dropped, so a node
    /// cannot speak for another's participants.
    pub foreign_data_drops: u64,
    /// Frames that failed to decode or broke the protocol (trunk closed).
    pub protocol_errors: u64,
    pub link_ups: u64,
    pub link_downs: u64,
    /// Trunks closed by the duplicate rule.
    pub duplicates_closed: u64,
    /// Discovered addresses that turned out to be this node (our own Hello
    /// came back); they are not dialed again while listed.
    pub self_dials: u64,
    /// Hellos with a new incarnation while that node's trunk was live: the
    /// old trunk was probed (a restart, or a second process with the id?).
    pub incarnation_probes: u64,
    /// Connections refused because a second live process claimed a node
    /// id: a peer's id whose live trunk answered the probe, or our own.
    pub node_id_conflicts: u64,
    /// Connections refused because the Hello's node id is not the one the
    /// certificate names (operator CA files).
    pub identity_refused: u64,
    /// Keyframe requests merged by rate limiting.
    pub keyframes_coalesced: u64,
    /// Media repair, summed over peers (per peer: `PeerMediaStats`).
    pub media_lost: u64,
    pub media_repaired: u64,
    pub media_given_up: u64,
    /// Media datagrams dropped for arriving after the lateness bound.
    pub late_drops: u64,
    /// Media packets received twice (or after being given up): dropped.
    pub media_duplicates: u64,
    pub nacks_sent: u64,
    pub nacks_received: u64,
    pub retransmits_sent: u64,
    pub retransmits_missed: u64,
    pub retransmits_refused: u64,
}
