//! Liveness of one connection: Ping every `interval`, dead after
//! `interval × misses` with nothing received, RTT from Pong.

use super::time::Time;
use std::time::Duration;

/// What the heartbeat wants done at a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatAction {
    /// Send `Ping { seq }`.
    Ping(u64),
    /// Nothing heard for too long: the connection is dead.
    Dead,
}

/// Per-connection heartbeat state. Any received frame counts as life, not
/// just Pong, so a busy trunk never looks dead.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    interval: Duration,
    dead_after: Duration,
    last_rx: Time,
    next_ping: Time,
    seq: u64,
    outstanding: Option<(u64, Time)>,
    rtt: Option<Duration>,
}

impl Heartbeat {
    pub fn new(interval: Duration, misses: u32, now: Time) -> Self {
        Self {
            interval,
            dead_after: interval.saturating_mul(misses.max(1)),
            last_rx: now,
            next_ping: now + interval,
            seq: 0,
            outstanding: None,
            rtt: None,
        }
    }

    pub fn on_receive(&mut self, now: Time) {
        self.last_rx = self.last_rx.max(now);
    }

    pub fn on_pong(&mut self, seq: u64, now: Time) {
        if let Some((s, sent)) = self.outstanding
            && s == seq
        {
            self.rtt = Some(now.since(sent));
            self.outstanding = None;
        }
    }

    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// A Ping out of schedule (a liveness probe): its sequence number. Its
    /// Pong also gives an RTT sample unless a scheduled Ping follows first.
    pub fn probe(&mut self, now: Time) -> u64 {
        self.seq = self.seq.wrapping_add(1);
        self.outstanding = Some((self.seq, now));
        self.seq
    }

    /// When this connection is declared dead if nothing arrives.
    pub fn deadline(&self) -> Time {
        self.last_rx + self.dead_after
    }

    pub fn poll_timeout(&self) -> Time {
        self.next_ping.min(self.deadline())
    }

    pub fn handle_timeout(&mut self, now: Time) -> Option<HeartbeatAction> {
        if now >= self.deadline() {
            return Some(HeartbeatAction::Dead);
        }
        if now >= self.next_ping {
            self.seq = self.seq.wrapping_add(1);
            self.outstanding = Some((self.seq, now));
            self.next_ping = now + self.interval;
            return Some(HeartbeatAction::Ping(self.seq));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_then_dies_without_traffic() {
        let t0 = Time(0);
        let mut hb = Heartbeat::new(Duration::from_secs(1), 3, t0);
        assert_eq!(hb.poll_timeout(), Time(1_000_000));
        assert_eq!(
            hb.handle_timeout(Time(1_000_000)),
            Some(HeartbeatAction::Ping(1))
        );
        hb.on_pong(1, Time(1_020_000));
        assert_eq!(hb.rtt(), Some(Duration::from_millis(20)));
        assert_eq!(
            hb.handle_timeout(Time(2_000_000)),
            Some(HeartbeatAction::Ping(2))
        );
        assert_eq!(
            hb.handle_timeout(Time(3_000_000)),
            Some(HeartbeatAction::Dead)
        );
    }

    #[test]
    fn traffic_keeps_alive() {
        let mut hb = Heartbeat::new(Duration::from_secs(1), 3, Time(0));
        hb.on_receive(Time(2_500_000));
        assert_eq!(hb.deadline(), Time(5_500_000));
    }
}
