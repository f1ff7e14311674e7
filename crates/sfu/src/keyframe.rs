//! Keyframe-request coalescing, one limiter per published video track.
//!
//! Every subscriber may ask for a keyframe (PLI/FIR) at any time; passing
//! each one to the publisher would make it emit a storm of large frames. A
//! limiter lets one request through per `interval` and remembers that another
//! was asked for meanwhile, so the last asker is still served, late but once.

use std::time::{Duration, Instant};

/// Default spacing of keyframe requests sent to one publisher track.
pub const KEYFRAME_INTERVAL: Duration = Duration::from_millis(500);
/// Spacing for a request that starts a subscription (a subscriber that has
/// nothing to show yet, here or on another node): a keyframe asked for by
/// someone else 100 ms ago may well have passed before this subscription
/// was forwarded anything, and waiting out the full interval would leave
/// the new subscriber black for half a second (measured across a 40 ms
/// trunk: first frame 600 ms later than on the origin node).
pub const NEW_SUBSCRIBER_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct KeyframeLimiter {
    interval: Duration,
    last_sent: Option<Instant>,
    pending: Option<Duration>,
}

impl KeyframeLimiter {
    pub fn new(interval: Duration) -> Self {
        KeyframeLimiter {
            interval,
            last_sent: None,
            pending: None,
        }
    }

    /// A subscriber asked. True: send a request to the publisher now.
    pub fn request(&mut self, now: Instant) -> bool {
        self.request_within(now, self.interval)
    }

    /// A new subscription asked (see [`NEW_SUBSCRIBER_INTERVAL`]).
    pub fn request_new_subscriber(&mut self, now: Instant) -> bool {
        self.request_within(now, NEW_SUBSCRIBER_INTERVAL.min(self.interval))
    }

    fn request_within(&mut self, now: Instant, spacing: Duration) -> bool {
        match self.last_sent {
            Some(last) if now.saturating_duration_since(last) < spacing => {
                self.pending = Some(self.pending.map_or(spacing, |p| p.min(spacing)));
                false
            }
            _ => {
                self.last_sent = Some(now);
                self.pending = None;
                true
            }
        }
    }

    /// When a deferred request is due, if any.
    pub fn deadline(&self) -> Option<Instant> {
        match (self.pending, self.last_sent) {
            (Some(spacing), Some(last)) => Some(last + spacing),
            _ => None,
        }
    }

    /// Called at or after [`Self::deadline`]. True: send the deferred request now.
    pub fn poll(&mut self, now: Instant) -> bool {
        match self.deadline() {
            Some(due) if now >= due => {
                self.pending = None;
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
    fn a_new_subscriber_waits_at_most_the_short_interval() {
        let mut k = KeyframeLimiter::new(KEYFRAME_INTERVAL);
        let t0 = Instant::now();
        assert!(k.request(t0));
        assert!(!k.request(t0 + Duration::from_millis(20)));
        assert_eq!(k.deadline(), Some(t0 + KEYFRAME_INTERVAL));
        // A new subscriber 50 ms later: served 100 ms after the last one.
        assert!(!k.request_new_subscriber(t0 + Duration::from_millis(50)));
        assert_eq!(k.deadline(), Some(t0 + NEW_SUBSCRIBER_INTERVAL));
        assert!(k.poll(t0 + NEW_SUBSCRIBER_INTERVAL));
        // Once the short interval has passed, at once.
        let t1 = t0 + NEW_SUBSCRIBER_INTERVAL * 2;
        assert!(k.request_new_subscriber(t1));
        assert!(!k.request(t1 + Duration::from_millis(10)));
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
