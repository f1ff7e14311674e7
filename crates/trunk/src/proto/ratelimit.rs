//! Coalescing rate limiter for keyframe requests: at most one per
//! `interval`; requests inside the interval collapse into one that fires
//! when it ends (so the last request is never lost, and a burst of PLIs from
//! many subscribers costs the publisher one keyframe).

use super::time::Time;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct RateLimiter {
    interval: Duration,
    last: Option<Time>,
    pending: bool,
}

impl RateLimiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            pending: false,
        }
    }

    /// A request at `now`: `true` if it should go out now; otherwise it is
    /// remembered and [`Self::handle_timeout`] releases it later.
    pub fn request(&mut self, now: Time) -> bool {
        match self.last {
            Some(last) if now < last + self.interval => {
                self.pending = true;
                false
            }
            _ => {
                self.last = Some(now);
                self.pending = false;
                true
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Time> {
        match (self.pending, self.last) {
            (true, Some(last)) => Some(last + self.interval),
            _ => None,
        }
    }

    /// `true` if a coalesced request is due now.
    pub fn handle_timeout(&mut self, now: Time) -> bool {
        match self.poll_timeout() {
            Some(due) if now >= due => {
                self.pending = false;
                self.last = Some(now);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_burst_into_one_delayed() {
        let mut rl = RateLimiter::new(Duration::from_millis(500));
        assert!(rl.request(Time(0)));
        assert!(!rl.request(Time(100_000)));
        assert!(!rl.request(Time(200_000)));
        assert_eq!(rl.poll_timeout(), Some(Time(500_000)));
        assert!(!rl.handle_timeout(Time(400_000)));
        assert!(rl.handle_timeout(Time(500_000)));
        assert_eq!(rl.poll_timeout(), None);
        assert!(rl.request(Time(1_000_000)));
    }
}
