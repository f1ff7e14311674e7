//! The video gate of one trunk connection: when the trunk lacks bandwidth,
//! video is held back (audio always passes) and comes back in one piece,
//! with a keyframe, once there is room again. Used by `driver.rs` per
//! connection; see docs/ARCHITECTURE.md "The driver, as built".

use std::time::{Duration, Instant};

use quinn::Connection;
use tracing::debug;

/// Whether a trunk has room for video now. A trunk short of bandwidth
/// shows it two ways, and either closes the gate:
/// - media waits in quinn's own datagram buffer (the congestion window is
///   full): how long it would wait is the queued bytes over the rate the
///   connection actually gets out (quinn's UDP counters);
/// - the path's queue grows (quinn's congestion window is open but a
///   bottleneck further on holds the packets): the smoothed RTT rises over
///   the path's minimum.
///
/// Video does not pass a closed gate; audio always does. The gate stays
/// closed for a hold time (1 s, doubling while congestion recurs within
/// 10 s, up to 8 s) and reopens only once the queue has drained, so video
/// comes back in one piece (with a keyframe) instead of flapping. Written
/// here because quinn's controllers do not tell a datagram user when to
/// shed load, and no crate does this for QUIC datagrams.
#[derive(Debug)]
pub(super) struct VideoGate {
    /// When the rate and RTT were last sampled.
    sampled: Instant,
    tx_bytes: u64,
    /// Bytes per second the connection got out, smoothed.
    rate: f64,
    /// Smoothed RTT over the path's minimum, at the last sample.
    queuing: Duration,
    closed_until: Option<Instant>,
    hold: Duration,
    /// Since when the queue has been over the limit (gate still open).
    congested_since: Option<Instant>,
    /// When the gate last reopened: video sent before it was held back, so
    /// the receiver NACKs the gap; resending it would flood the trunk just
    /// when it recovers, and is useless (a keyframe was asked for).
    reopened: Option<Instant>,
}

/// After the gate reopens, no retransmissions for this long (the packets
/// NACKed then are older than the reopening, see `VideoGate::reopened`;
/// a little over the lateness bound, after which none is asked for).
const RETRANSMIT_QUIET: Duration = Duration::from_millis(300);

/// Below this many bytes in quinn's buffer video always goes (a keyframe burst).
const QUEUE_SMALL: usize = 8 * 1024;
/// Video is held back when what is queued would wait longer than this in
/// quinn's buffer, or the path's RTT is this much over its minimum.
const QUEUE_DELAY_MAX: Duration = Duration::from_millis(80);
/// ... and let through again once the path's queue is below this.
const QUEUE_DELAY_OK: Duration = Duration::from_millis(30);
const HOLD_MIN: Duration = Duration::from_secs(1);
const HOLD_MAX: Duration = Duration::from_secs(8);
/// A close within this long after the gate reopened doubles the hold.
const HOLD_RESET: Duration = Duration::from_secs(3);
/// How long the queue must stay over the limit before the gate closes.
const CONGESTION_PERSISTS: Duration = Duration::from_millis(100);
/// How often rate and RTT are resampled (quinn's stats take a lock).
const GATE_SAMPLE: Duration = Duration::from_millis(20);

impl VideoGate {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            sampled: now,
            tx_bytes: 0,
            // Optimistic start (10 Mbit/s) so the first bursts pass.
            rate: 1_250_000.0,
            queuing: Duration::ZERO,
            closed_until: None,
            hold: HOLD_MIN,
            congested_since: None,
            reopened: None,
        }
    }

    /// May a retransmission go now? Like video, and not right after the
    /// gate reopened.
    pub(super) fn allow_retransmit(
        &mut self,
        conn: &Connection,
        buffer: usize,
        now: Instant,
    ) -> bool {
        self.allow(conn, buffer, now)
            && self
                .reopened
                .is_none_or(|t| now.saturating_duration_since(t) >= RETRANSMIT_QUIET)
    }

    /// May a video packet go on `conn` now? `buffer`: quinn's datagram
    /// send buffer size.
    pub(super) fn allow(&mut self, conn: &Connection, buffer: usize, now: Instant) -> bool {
        let queued = buffer.saturating_sub(conn.datagram_send_buffer_space());
        let since = now.saturating_duration_since(self.sampled);
        if since >= GATE_SAMPLE {
            let stats = conn.stats();
            let tx = stats.udp_tx.bytes;
            let sample = tx.saturating_sub(self.tx_bytes) as f64 / since.as_secs_f64();
            // Only a busy link shows its capacity; an idle one keeps the
            // previous estimate.
            if queued >= QUEUE_SMALL || sample > self.rate {
                self.rate = 0.7 * self.rate + 0.3 * sample;
            }
            self.tx_bytes = tx;
            self.sampled = now;
            self.queuing = stats.path.rtt.saturating_sub(stats.path.min_rtt);
        }
        let buffer_wait = if queued < QUEUE_SMALL {
            Duration::ZERO
        } else if queued >= buffer / 2 {
            Duration::MAX
        } else {
            Duration::from_secs_f64(queued as f64 / self.rate.max(1.0))
        };
        if let Some(until) = self.closed_until {
            if now < until || self.queuing > QUEUE_DELAY_OK || buffer_wait > QUEUE_DELAY_OK {
                return false;
            }
            self.closed_until = None;
            self.reopened = Some(now);
            debug!(
                queuing_ms = self.queuing.as_millis() as u64,
                queued, "trunk has room for video again"
            );
            return true;
        }
        if buffer_wait <= QUEUE_DELAY_MAX && self.queuing <= QUEUE_DELAY_MAX {
            self.congested_since = None;
            return true;
        }
        // Only a queue that lasts closes the gate: a loss burst or one slow
        // ACK makes a brief spike (measured: 1 run in 4 at 3 % loss + 40 ±
        // 10 ms closed it for seconds without this).
        let since = *self.congested_since.get_or_insert(now);
        if now.saturating_duration_since(since) < CONGESTION_PERSISTS {
            return true;
        }
        {
            self.congested_since = None;
            // Doubling only when the queue came back soon after reopening
            // (the trunk really lacks bandwidth); a new episode starts short.
            self.hold = match self.reopened {
                Some(t) if now.saturating_duration_since(t) < HOLD_RESET => {
                    (self.hold * 2).min(HOLD_MAX)
                }
                _ => HOLD_MIN,
            };
            self.closed_until = Some(now + self.hold);
            debug!(
                queuing_ms = self.queuing.as_millis() as u64,
                queued,
                rate_kbps = (self.rate * 8.0 / 1000.0) as u64,
                hold_ms = self.hold.as_millis() as u64,
                "trunk short of bandwidth: video held back"
            );
            false
        }
    }
}
