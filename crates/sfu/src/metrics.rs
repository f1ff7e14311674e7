//! Counters the worker updates and the binary exports to Prometheus.

use std::sync::atomic::{AtomicU64, Ordering};

/// Plain atomics: written by the worker, read by `/metrics`.
#[derive(Debug, Default)]
pub struct SfuMetrics {
    pub participants: AtomicU64,
    pub rooms: AtomicU64,
    pub tracks: AtomicU64,
    pub rtp_packets_in: AtomicU64,
    pub rtp_bytes_in: AtomicU64,
    pub rtp_packets_out: AtomicU64,
    pub rtp_bytes_out: AtomicU64,
    pub keyframe_requests_sent: AtomicU64,
    pub participants_reaped: AtomicU64,
    pub udp_packets_dropped: AtomicU64,
    /// Media for remote nodes dropped because a link's queue was full.
    pub remote_media_dropped: AtomicU64,
    /// Media from remote nodes dropped because the worker had
    /// `REMOTE_MEDIA_IN_QUEUE` packets waiting already.
    pub remote_media_in_dropped: AtomicU64,
    /// str0m calls that panicked (the participant concerned is removed with
    /// `error internal`; the worker goes on).
    pub media_panics: AtomicU64,
    /// New subscriptions (here or on another node) started from a track's
    /// cached keyframe and the packets that took.
    pub gop_replays: AtomicU64,
    pub gop_replayed_packets: AtomicU64,
    /// m-lines a participant without the publish permission tried to send
    /// on (ignored; the signaling layer refuses such offers first).
    pub publish_refused: AtomicU64,
    /// ICE-TCP media connections open now (handshaking or bound to a
    /// participant).
    pub tcp_connections_open: AtomicU64,
    /// ICE-TCP media connections accepted.
    pub tcp_connections_accepted: AtomicU64,
    /// ICE-TCP media connections refused or cut: over the connection
    /// limit (overall or per participant), no STUN binding request naming a
    /// participant here as the first frame, or none within the handshake
    /// deadline.
    pub tcp_connections_refused: AtomicU64,
    /// Frames dropped on ICE-TCP connections: outgoing ones that did not
    /// fit a connection's write queue (a slow reader) or had no
    /// connection, incoming ones str0m could not take.
    pub tcp_frames_dropped: AtomicU64,
}

impl SfuMetrics {
    pub fn get(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }
}
