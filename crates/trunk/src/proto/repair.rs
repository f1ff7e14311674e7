//! Loss repair and freshness for media across a trunk.
//!
//! Each node terminates its browsers' RTCP, so a packet lost *between two
//! nodes* can only be repaired between them (DESIGN, "Loss repair and
//! freshness"). Three small pieces, all sans-IO:
//!
//! - [`SendHistory`] (origin side, one per local track): the last
//!   packets sent to the trunk, bounded by slot count (so by bytes) and by
//!   age, looked up by RTP sequence number to answer a NACK.
//! - [`RecvRepair`] (receiving side, one per subscribed remote track):
//!   notices sequence gaps, schedules NACKs after a short reordering wait,
//!   retries them at the link's RTT, and gives a packet up once it could
//!   only arrive later than the lateness bound.
//! - [`ClockOffset`] (receiving side, one per peer): maps the origin's
//!   clock onto ours from the datagrams' origin times. Its minimum one-way
//!   offset is the fastest path seen, so `now - origin - offset` is how much
//!   later than that a datagram arrived: what the lateness bound checks, and
//!   what lets every track of one origin keep the origin's timing (lip sync).
//!
//! RTP sequence numbers are handled as 16-bit values with wrapping
//! differences: a NACK names the low 16 bits, as RTCP does.

use super::time::Time;
use std::collections::VecDeque;
use std::time::Duration;

/// Tuning of the repair path (part of [`super::Config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairConfig {
    /// A media datagram that arrives more than this after the fastest path
    /// would have brought it is dropped (counted), never delivered late. A
    /// retransmission counts from the original's origin time, so this also
    /// bounds how long a lost packet is worth repairing.
    pub late_bound: Duration,
    /// How long the origin keeps sent packets for retransmission.
    pub history: Duration,
    /// Wait this long after a gap is seen before the first NACK: a packet
    /// only reordered arrives meanwhile and costs nothing.
    pub nack_delay: Duration,
    /// Least spacing of NACKs for one sequence number (the RTT is used when
    /// it is longer).
    pub nack_retry_min: Duration,
    /// NACKs per sequence number before waiting for the give-up.
    pub nack_tries: u8,
    /// Most sequence numbers under repair per track; a longer outage is
    /// left to a keyframe.
    pub max_missing: usize,
    /// Retransmissions one peer may ask of us per second (token bucket, the
    /// same as its burst), so a lying or broken peer cannot turn us into an
    /// amplifier.
    pub retransmit_rate: u32,
}

impl Default for RepairConfig {
    fn default() -> Self {
        Self {
            late_bound: Duration::from_millis(250),
            history: Duration::from_millis(1000),
            nack_delay: Duration::from_millis(10),
            nack_retry_min: Duration::from_millis(20),
            nack_tries: 4,
            max_missing: 256,
            retransmit_rate: 2000,
        }
    }
}

/// The RTP sequence number of a packet (bytes 2–3), if it looks like RTP
/// version 2. The trunk carries RTP untouched, so the core can read it
/// without an RTP library.
pub fn rtp_seq(packet: &[u8]) -> Option<u16> {
    if packet.len() < 12 || packet[0] >> 6 != 2 {
        return None;
    }
    Some(u16::from_be_bytes([packet[2], packet[3]]))
}

/// Slots in a [`SendHistory`]: at 1,200-byte packets ~600 KiB at most per
/// video track; ~2 s of a 2.5 Mbit/s stream, more of slower ones (the age
/// bound then decides).
pub const HISTORY_SLOTS: usize = 512;

#[derive(Debug, Default)]
struct Slot {
    seq: u16,
    origin: u64,
    sent: Time,
    used: bool,
    packet: Vec<u8>,
}

/// The origin's record of what it sent for one track, indexed by sequence
/// number modulo the slot count. A slot is overwritten by the packet
/// `HISTORY_SLOTS` later, so memory is fixed once warm (slots keep their
/// buffers: no allocation per packet in steady state).
#[derive(Debug)]
pub struct SendHistory {
    slots: Vec<Slot>,
}

impl Default for SendHistory {
    fn default() -> Self {
        Self::new()
    }
}

impl SendHistory {
    pub fn new() -> Self {
        Self {
            slots: (0..HISTORY_SLOTS).map(|_| Slot::default()).collect(),
        }
    }

    /// Remember a packet sent at `now` (origin time `origin`).
    pub fn record(&mut self, seq: u16, origin: u64, packet: &[u8], now: Time) {
        let slot = &mut self.slots[usize::from(seq) % HISTORY_SLOTS];
        slot.seq = seq;
        slot.origin = origin;
        slot.sent = now;
        slot.used = true;
        slot.packet.clear();
        slot.packet.extend_from_slice(packet);
    }

    /// The packet with `seq` and its origin time, if it was sent no longer
    /// than `max_age` ago.
    pub fn get(&self, seq: u16, now: Time, max_age: Duration) -> Option<(u64, &[u8])> {
        let slot = &self.slots[usize::from(seq) % HISTORY_SLOTS];
        (slot.used && slot.seq == seq && now.since(slot.sent) <= max_age)
            .then_some((slot.origin, &slot.packet[..]))
    }

    /// Bytes held (for status and the memory bound's test).
    pub fn bytes(&self) -> usize {
        self.slots.iter().map(|s| s.packet.capacity()).sum()
    }
}

#[derive(Debug, Clone, Copy)]
struct Missing {
    seq: u16,
    since: Time,
    next_nack: Time,
    tries: u8,
}

/// What one received packet meant for the repair state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// In order or ahead; `gap` sequence numbers were skipped and are now
    /// under repair (`dropped` more were skipped than can be repaired).
    New { gap: u16, dropped: u16 },
    /// Filled a hole that was under repair.
    Repaired,
    /// Older than the newest, not under repair: a duplicate or a packet
    /// already given up.
    Stale,
}

/// Gap detection and NACK scheduling for one remote track.
#[derive(Debug, Default)]
pub struct RecvRepair {
    max: Option<u16>,
    /// The oldest packet delivered, and when the first one arrived: while
    /// the stream is young a packet from before the first one is not stale
    /// but reordered (see [`START_SPAN`]).
    lowest: u16,
    started: Option<Time>,
    /// Sequence numbers under repair, oldest first.
    missing: VecDeque<Missing>,
    /// How late a packet that was only reordered (it filled its hole before
    /// any NACK went out) arrived after its hole was seen: the largest
    /// recently, decaying. The first NACK waits this long (×1.25), so a
    /// path that reorders by 20 ms does not get every late packet resent.
    reorder: Duration,
}

/// The adaptive reorder wait never exceeds this: real losses must still be
/// repaired well inside the lateness bound.
pub const MAX_REORDER_WAIT: Duration = Duration::from_millis(50);

/// How far back from the first packet of a stream a reordered packet is
/// still taken, within the lateness bound of that first arrival. Without
/// this the first packets of a new subscription, often a keyframe sent as a
/// burst, were dropped as stale whenever jitter let a later one arrive
/// first (measured: 1 run in 4 at 40 ± 10 ms, the subscriber then waited
/// 500 ms for another keyframe).
pub const START_SPAN: u16 = 128;

impl RecvRepair {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sequence numbers under repair.
    pub fn missing(&self) -> usize {
        self.missing.len()
    }

    /// A packet with `seq` arrived at `now`.
    pub fn on_packet(&mut self, seq: u16, now: Time, cfg: &RepairConfig) -> Arrival {
        let Some(max) = self.max else {
            self.max = Some(seq);
            self.lowest = seq;
            self.started = Some(now);
            return Arrival::New { gap: 0, dropped: 0 };
        };
        let d = seq.wrapping_sub(max) as i16;
        if d > 0 {
            self.max = Some(seq);
            return self.gap_before(seq, (d - 1) as u16, false, now, cfg);
        }
        match self.missing.iter().position(|m| m.seq == seq) {
            Some(i) => {
                if let Some(m) = self.missing.remove(i)
                    && m.tries == 0
                {
                    // Only reordered: learn how late such packets come.
                    let late = now.since(m.since).min(MAX_REORDER_WAIT);
                    self.reorder = self.reorder.max(late);
                }
                Arrival::Repaired
            }
            None => self.before_start(seq, now, cfg),
        }
    }

    /// A packet older than every packet seen and not under repair: stale,
    /// unless the stream is young and it is from just before the first one
    /// (reordered at the start); then it is new, and the packets between it
    /// and the oldest seen are under repair like any gap.
    fn before_start(&mut self, seq: u16, now: Time, cfg: &RepairConfig) -> Arrival {
        let young = self.started.is_some_and(|t| now.since(t) < cfg.late_bound);
        let back = self.lowest.wrapping_sub(seq);
        if !young || back == 0 || back > START_SPAN {
            return Arrival::Stale;
        }
        let arrival = self.gap_before(self.lowest, back - 1, true, now, cfg);
        self.lowest = seq;
        arrival
    }

    /// Put the `gap` sequence numbers just before `end` under repair (the
    /// newest of them if there is no room for all), oldest first in the
    /// queue: at its back for a gap after the newest packet, at its front
    /// for one before the oldest (`front`).
    fn gap_before(
        &mut self,
        end: u16,
        gap: u16,
        front: bool,
        now: Time,
        cfg: &RepairConfig,
    ) -> Arrival {
        let room = cfg.max_missing.saturating_sub(self.missing.len());
        // Keep the newest of a long gap: they are the ones still worth
        // repairing before the lateness bound.
        let keep = usize::from(gap).min(room) as u16;
        let wait = if keep > 0 {
            self.nack_wait(cfg)
        } else {
            cfg.nack_delay
        };
        let missing = |seq| Missing {
            seq,
            since: now,
            next_nack: now + wait,
            tries: 0,
        };
        for i in 1..=keep {
            if front {
                self.missing.push_front(missing(end.wrapping_sub(i)));
            } else {
                self.missing
                    .push_back(missing(end.wrapping_sub(keep + 1 - i)));
            }
        }
        Arrival::New {
            gap: keep,
            dropped: gap - keep,
        }
    }

    /// How long a new gap waits before its first NACK: the configured
    /// minimum, or the reordering seen lately (decaying by 1/64 per gap),
    /// capped at [`MAX_REORDER_WAIT`].
    fn nack_wait(&mut self, cfg: &RepairConfig) -> Duration {
        self.reorder -= self.reorder / 64;
        (self.reorder + self.reorder / 4)
            .clamp(cfg.nack_delay, MAX_REORDER_WAIT.max(cfg.nack_delay))
    }

    /// When [`Self::poll`] has work next.
    pub fn next_due(&self, cfg: &RepairConfig) -> Option<Time> {
        self.missing
            .iter()
            .map(|m| {
                if m.tries < cfg.nack_tries {
                    m.next_nack.min(m.since + cfg.late_bound)
                } else {
                    m.since + cfg.late_bound
                }
            })
            .min()
    }

    /// At `now`: give up what can no longer arrive in time (returns how
    /// many) and push the sequence numbers due for a NACK into `nack`
    /// (at most `limit`). `rtt` spaces the retries.
    pub fn poll(
        &mut self,
        now: Time,
        rtt: Option<Duration>,
        cfg: &RepairConfig,
        nack: &mut Vec<u16>,
        limit: usize,
    ) -> u64 {
        let before = self.missing.len();
        self.missing.retain(|m| now < m.since + cfg.late_bound);
        let given_up = (before - self.missing.len()) as u64;
        let retry = rtt
            .map(|r| r + r / 4)
            .unwrap_or_default()
            .max(cfg.nack_retry_min);
        for m in self.missing.iter_mut() {
            if nack.len() >= limit {
                break;
            }
            if m.tries < cfg.nack_tries && m.next_nack <= now {
                nack.push(m.seq);
                m.tries += 1;
                m.next_nack = now + retry;
            }
        }
        given_up
    }
}

/// Estimate of `our clock − origin's clock` for one peer: the smallest
/// difference seen over the last one or two windows (the fastest path).
/// Windows let the estimate follow clock drift (a few ms per minute) while
/// a standing queue still shows as lateness for at least one window.
#[derive(Debug, Clone, Default)]
pub struct ClockOffset {
    current: Option<i64>,
    previous: Option<i64>,
    window_start: Time,
}

/// Length of one [`ClockOffset`] window.
pub const OFFSET_WINDOW: Duration = Duration::from_secs(30);

impl ClockOffset {
    /// A datagram with origin time `origin` (µs, origin's clock) arrived at
    /// `now`. Returns how late it is compared to the fastest path.
    pub fn sample(&mut self, now: Time, origin: u64) -> Duration {
        let diff = (now.0 as i64).wrapping_sub(origin as i64);
        if now.since(self.window_start) >= OFFSET_WINDOW {
            self.previous = self.current.take();
            self.window_start = now;
        }
        self.current = Some(self.current.map_or(diff, |c| c.min(diff)));
        let best = self.estimate().unwrap_or(diff);
        Duration::from_micros(diff.saturating_sub(best).max(0) as u64)
    }

    /// The current estimate, if any datagram was seen.
    pub fn estimate(&self) -> Option<i64> {
        match (self.current, self.previous) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// `origin` (origin's clock) on our clock, never later than `now`.
    pub fn to_local(&self, origin: u64, now: Time) -> Time {
        match self.estimate() {
            Some(off) => Time((origin as i64).saturating_add(off).max(0) as u64).min(now),
            None => now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Time {
        Time(n * 1000)
    }

    fn rtp(seq: u16) -> Vec<u8> {
        let mut p = vec![0x80, 96, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7, 0xaa];
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p
    }

    #[test]
    fn rtp_seq_reads_only_rtp() {
        assert_eq!(rtp_seq(&rtp(4711)), Some(4711));
        assert_eq!(rtp_seq(&[0x80; 11]), None);
        assert_eq!(rtp_seq(&[0x40; 20]), None);
    }

    #[test]
    fn history_answers_recent_packets_only() {
        let mut h = SendHistory::new();
        let max_age = Duration::from_millis(1000);
        h.record(65_535, 7, &rtp(65_535), ms(0));
        h.record(0, 8, &rtp(0), ms(10));
        assert_eq!(h.get(65_535, ms(500), max_age), Some((7, &rtp(65_535)[..])));
        assert_eq!(h.get(0, ms(500), max_age).map(|x| x.0), Some(8));
        assert_eq!(h.get(1, ms(500), max_age), None, "never sent");
        assert_eq!(h.get(65_535, ms(1001), max_age), None, "too old");
        // Overwritten by the packet one lap later.
        let lap = HISTORY_SLOTS as u16;
        h.record(lap, 9, &rtp(lap), ms(20));
        assert_eq!(h.get(0, ms(30), max_age), None);
        assert_eq!(h.get(lap, ms(30), max_age).map(|x| x.0), Some(9));
    }

    #[test]
    fn history_memory_is_bounded() {
        let mut h = SendHistory::new();
        let big = vec![0x80u8; 1400];
        for i in 0..10_000u32 {
            h.record(i as u16, 0, &big, ms(u64::from(i)));
        }
        assert!(h.bytes() <= HISTORY_SLOTS * 1400 * 2, "{}", h.bytes());
    }

    #[test]
    fn gaps_are_nacked_after_the_reorder_wait_then_retried_then_given_up() {
        let cfg = RepairConfig::default();
        let mut r = RecvRepair::new();
        assert_eq!(
            r.on_packet(10, ms(0), &cfg),
            Arrival::New { gap: 0, dropped: 0 }
        );
        assert_eq!(
            r.on_packet(13, ms(1), &cfg),
            Arrival::New { gap: 2, dropped: 0 }
        );
        let mut nack = Vec::new();
        assert_eq!(r.poll(ms(5), None, &cfg, &mut nack, 64), 0);
        assert!(nack.is_empty(), "inside the reorder wait");
        assert_eq!(r.next_due(&cfg), Some(ms(11)));
        let rtt = Some(Duration::from_millis(40));
        r.poll(ms(11), rtt, &cfg, &mut nack, 64);
        assert_eq!(nack, vec![11, 12]);
        // 11 arrives (repaired); 12 is retried at the retry interval.
        assert_eq!(r.on_packet(11, ms(15), &cfg), Arrival::Repaired);
        assert_eq!(r.on_packet(11, ms(16), &cfg), Arrival::Stale);
        nack.clear();
        r.poll(ms(20), rtt, &cfg, &mut nack, 64);
        assert!(nack.is_empty());
        r.poll(ms(60), rtt, &cfg, &mut nack, 64);
        assert!(nack.is_empty(), "retry waits 1.25 × RTT = 50 ms");
        r.poll(ms(61), rtt, &cfg, &mut nack, 64);
        assert_eq!(nack, vec![12]);
        // Past the late bound it is given up.
        assert_eq!(r.poll(ms(251), None, &cfg, &mut Vec::new(), 64), 1);
        assert_eq!(r.missing(), 0);
        assert_eq!(r.next_due(&cfg), None);
    }

    #[test]
    fn packets_reordered_before_the_first_are_delivered_while_the_stream_is_young() {
        let cfg = RepairConfig::default();
        let mut r = RecvRepair::new();
        // A keyframe burst 100..=104 arrives 102 first.
        assert_eq!(
            r.on_packet(102, ms(0), &cfg),
            Arrival::New { gap: 0, dropped: 0 }
        );
        assert_eq!(
            r.on_packet(100, ms(2), &cfg),
            Arrival::New { gap: 1, dropped: 0 },
            "older than the first: new, and 101 is now missing"
        );
        assert_eq!(r.missing(), 1);
        assert_eq!(r.on_packet(101, ms(3), &cfg), Arrival::Repaired);
        assert_eq!(r.on_packet(100, ms(4), &cfg), Arrival::Stale, "twice");
        assert_eq!(
            r.on_packet(103, ms(5), &cfg),
            Arrival::New { gap: 0, dropped: 0 }
        );
        // Too far back, or once the stream is older than the lateness
        // bound: stale as before.
        assert_eq!(
            r.on_packet(100u16.wrapping_sub(START_SPAN + 1), ms(6), &cfg),
            Arrival::Stale
        );
        assert_eq!(r.on_packet(99, ms(250), &cfg), Arrival::Stale);
        assert_eq!(r.missing(), 0);
        // A packet between the oldest and the newest that a long gap left
        // out of repair is not mistaken for one from before the start.
        let mut r = RecvRepair::new();
        r.on_packet(10, ms(0), &cfg);
        assert_eq!(
            r.on_packet(400, ms(1), &cfg),
            Arrival::New {
                gap: 256,
                dropped: 133
            }
        );
        assert_eq!(r.on_packet(11, ms(2), &cfg), Arrival::Stale);
        assert_eq!(
            r.on_packet(9, ms(3), &cfg),
            Arrival::New { gap: 0, dropped: 0 }
        );
    }

    #[test]
    fn the_first_nack_waits_for_the_reordering_seen() {
        let cfg = RepairConfig::default();
        let mut r = RecvRepair::new();
        r.on_packet(0, ms(0), &cfg);
        // Packet 1 comes 20 ms after its gap was seen: reordered, not lost.
        r.on_packet(2, ms(1), &cfg);
        assert_eq!(r.on_packet(1, ms(21), &cfg), Arrival::Repaired);
        // The next gap waits ~1.25 × 20 ms before its NACK, not 10 ms.
        r.on_packet(4, ms(30), &cfg);
        let mut nack = Vec::new();
        r.poll(ms(45), None, &cfg, &mut nack, 64);
        assert!(nack.is_empty(), "still inside the learned reorder wait");
        r.poll(ms(56), None, &cfg, &mut nack, 64);
        assert_eq!(nack, vec![3]);
        // Never beyond the cap, however late a reordered packet was.
        let mut r = RecvRepair::new();
        r.on_packet(0, ms(0), &cfg);
        r.on_packet(2, ms(1), &cfg);
        r.on_packet(1, ms(200), &cfg);
        r.on_packet(4, ms(300), &cfg);
        assert!(r.next_due(&cfg) <= Some(ms(300) + MAX_REORDER_WAIT));
    }

    #[test]
    fn wrap_and_long_gaps_are_handled() {
        let cfg = RepairConfig::default();
        let mut r = RecvRepair::new();
        r.on_packet(65_534, ms(0), &cfg);
        assert_eq!(
            r.on_packet(1, ms(1), &cfg),
            Arrival::New { gap: 2, dropped: 0 }
        );
        assert_eq!(r.on_packet(65_535, ms(2), &cfg), Arrival::Repaired);
        assert_eq!(r.on_packet(0, ms(2), &cfg), Arrival::Repaired);
        // A gap longer than max_missing keeps only the newest.
        let Arrival::New { gap, dropped } = r.on_packet(1001, ms(3), &cfg) else {
            panic!("ahead");
        };
        assert_eq!(usize::from(gap), cfg.max_missing);
        assert_eq!(gap + dropped, 999);
        let mut nack = Vec::new();
        r.poll(ms(20), None, &cfg, &mut nack, 8);
        assert_eq!(nack.len(), 8, "limit per NACK respected");
        assert_eq!(nack[0], 1001 - cfg.max_missing as u16);
    }

    #[test]
    fn clock_offset_tracks_the_fastest_path() {
        let mut c = ClockOffset::default();
        // Origin clock is 5 s behind ours, path 20 ms, then a 100 ms spike.
        let off = 5_000_000;
        assert_eq!(c.sample(Time(off + 20_000), 0), Duration::ZERO);
        assert_eq!(
            c.sample(Time(off + 1_000_000 + 120_000), 1_000_000),
            Duration::from_millis(100)
        );
        assert_eq!(
            c.to_local(1_000_000, Time(off + 1_200_000)),
            Time(off + 1_020_000)
        );
        // A faster packet lowers the baseline.
        assert_eq!(
            c.sample(Time(off + 2_000_000 + 10_000), 2_000_000),
            Duration::ZERO
        );
        // Never maps into the future.
        assert_eq!(c.to_local(9_000_000, Time(off)), Time(off));
    }

    #[test]
    fn clock_offset_follows_drift_across_windows() {
        let mut c = ClockOffset::default();
        c.sample(Time(1_000), 0);
        // Our clock runs fast by 1 ms per window: without windows every
        // datagram would look later and later.
        let mut late = Duration::ZERO;
        for w in 1..10u64 {
            let t = w * OFFSET_WINDOW.as_micros() as u64;
            late = c.sample(Time(t + 1_000 + w * 1_000), t);
        }
        assert!(late <= Duration::from_millis(2), "{late:?}");
    }
}
