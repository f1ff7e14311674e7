//! The protocol's own notion of time.
//!
//! A plain monotonic microsecond count chosen by the driver (a real clock in
//! production, virtual time in the simulation) keeps the core deterministic.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point in monotonic time, in microseconds since an origin the driver picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub u64);

impl Time {
    /// Time since `earlier`, zero if `earlier` is later (never panics).
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Time(self.0.saturating_add(micros))
    }
}

impl Sub<Time> for Time {
    type Output = Duration;
    fn sub(self, rhs: Time) -> Duration {
        self.since(rhs)
    }
}
