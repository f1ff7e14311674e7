//! Keyframe-request coalescing, one limiter per published video track.
//!
//! Every subscriber may ask for a keyframe (PLI/FIR) at any time; passing
//! each one to the publisher would make it emit a storm of large frames. A
//! limiter lets one request through per `interval` and remembers that another
//! was asked for meanwhile, so the last asker is still served, late but once.

use std::time::{Duration, Instant};

/// Default spacing of keyframe requests sent to one publisher track.
pub const KEYFRAME_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct KeyframeLimiter {
    interval: Duration,
    last_sent: Option<Instant>,
    pending: bool,
}

impl KeyframeLimiter {
    pub fn new(interval: Duration) -> Self {
        KeyframeLimiter {
            interval,
            last_sent: None,
            pending: false,
        }
    }

    /// A subscriber asked. True: send a request to the publisher now.
    pub fn request(&mut self, now: Instant) -> bool {
        match self.last_sent {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.pending = true;
                false
            }
            _ => {
                self.last_sent = Some(now);
                self.pending = false;
                true
            }
        }
    }

    /// When a deferred request is due, if any.
    pub fn deadline(&self) -> Option<Instant> {
        match (self.pending, self.last_sent) {
            (true, Some(last)) => Some(last + self.interval),
            _ => None,
        }
    }

    /// Called at or after [`Self::deadline`]. True: send the deferred request now.
    pub fn poll(&mut self, now: Instant) -> bool {
        match self.deadline() {
            Some(due) if now >= due => {
                self.pending = false;
                self.last_sent = Some(now);
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
    fn burst_is_coalesced_into_one_now_and_one_later() {
        let mut k = KeyframeLimiter::new(KEYFRAME_INTERVAL);
        let t0 = Instant::now();
        assert!(k.request(t0));
        for i in 1..10 {
            assert!(!k.request(t0 + Duration::from_millis(i * 10)));
        }
        let due = k.deadline().expect("a deferred request");
        assert_eq!(due, t0 + KEYFRAME_INTERVAL);
        assert!(!k.poll(due - Duration::from_millis(1)));
        assert!(k.poll(due));
        assert_eq!(k.deadline(), None);
        assert!(!k.poll(due + Duration::from_secs(5)));
    }

    #[test]
    fn spaced_requests_all_pass() {
        let mut k = KeyframeLimiter::new(KEYFRAME_INTERVAL);
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(k.request(t0 + KEYFRAME_INTERVAL * i));
        }
        assert_eq!(k.deadline(), None);
    }
}
