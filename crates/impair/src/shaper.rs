//! The per-direction decision logic: given a packet's arrival time and size,
//! decide whether it is lost, dropped by the bottleneck queue, or when it is
//! due to leave the proxy. Pure: no sockets, no clocks (time comes in as an
//! argument), so it is unit-tested with virtual time.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Direction, Impairment};

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Dropped by random (independent or burst) loss.
    Lost,
    /// Dropped because the bottleneck queue was full (drop-tail).
    QueueFull,
    /// Delivered at this instant.
    Deliver(Instant),
}

/// One direction's impairment state.
#[derive(Debug)]
pub(crate) struct Shaper {
    imp: Impairment,
    rng: ChaCha8Rng,
    /// Gilbert-Elliott state: `true` while in the "bad" (burst) state.
    in_burst: bool,
    /// When the virtual bottleneck link finishes serializing everything that
    /// was admitted so far.
    link_free: Option<Instant>,
}

impl Shaper {
    pub(crate) fn new(imp: Impairment, seed: u64, dir: Direction) -> Shaper {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // One independent stream per direction from the same seed.
        rng.set_stream(match dir {
            Direction::ToUpstream => 0,
            Direction::ToClient => 1,
        });
        Shaper {
            imp,
            rng,
            in_burst: false,
            link_free: None,
        }
    }

    pub(crate) fn set(&mut self, imp: Impairment) {
        self.imp = imp;
    }

    pub(crate) fn impairment(&self) -> &Impairment {
        &self.imp
    }

    /// Decides the fate of a packet of `len` bytes arriving at `now`.
    ///
    /// Exactly four random numbers are drawn per packet whatever the
    /// configuration, so the n-th packet of a direction always sees the same
    /// draws for a given seed: the same packet sequence gets the same fate.
    pub(crate) fn admit(&mut self, now: Instant, len: usize) -> Fate {
        let u_loss: f64 = self.rng.random();
        let u_state: f64 = self.rng.random();
        let u_burst: f64 = self.rng.random();
        let u_jitter: f64 = self.rng.random();

        let mut lost = u_loss < self.imp.loss;
        match &self.imp.burst {
            Some(b) => {
                self.in_burst = if self.in_burst {
                    u_state >= b.p_leave
                } else {
                    u_state < b.p_enter
                };
                if self.in_burst && u_burst < b.loss_in_burst {
                    lost = true;
                }
            }
            None => self.in_burst = false,
        }
        if lost {
            return Fate::Lost;
        }

        let departure = match self.imp.rate_bps {
            Some(rate) if rate > 0 => {
                let rate = rate as f64;
                let start = match self.link_free {
                    Some(t) if t > now => t,
                    _ => now,
                };
                // Bytes admitted but not yet serialized (including the
                // packet currently on the wire).
                let backlog = (start - now).as_secs_f64() * rate / 8.0;
                // An idle link always takes a packet, even one larger than
                // the queue; otherwise drop-tail.
                if backlog >= 1.0 && backlog + len as f64 > self.imp.queue_bytes as f64 {
                    return Fate::QueueFull;
                }
                let finish = start + Duration::from_secs_f64(len as f64 * 8.0 / rate);
                self.link_free = Some(finish);
                finish
            }
            _ => now,
        };

        let jitter = self.imp.jitter.mul_f64(u_jitter);
        Fate::Deliver(departure + self.imp.delay + jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Burst;

    fn imp() -> Impairment {
        Impairment::default()
    }

    fn lost_indices(seed: u64, imp: &Impairment, n: usize) -> Vec<usize> {
        let mut s = Shaper::new(imp.clone(), seed, Direction::ToUpstream);
        let t0 = Instant::now();
        (0..n)
            .filter(|&i| s.admit(t0 + Duration::from_millis(i as u64), 100) == Fate::Lost)
            .collect()
    }

    #[test]
    fn no_impairment_delivers_immediately() {
        let mut s = Shaper::new(imp(), 7, Direction::ToUpstream);
        let t0 = Instant::now();
        for i in 0..1000 {
            let now = t0 + Duration::from_micros(i);
            assert_eq!(s.admit(now, 1200), Fate::Deliver(now));
        }
    }

    #[test]
    fn loss_is_seeded_and_near_the_probability() {
        let i = Impairment { loss: 0.1, ..imp() };
        let a = lost_indices(42, &i, 10_000);
        let b = lost_indices(42, &i, 10_000);
        assert_eq!(a, b);
        assert!((800..=1200).contains(&a.len()), "lost {}", a.len());
        let c = lost_indices(43, &i, 10_000);
        assert_ne!(a, c, "different seeds should differ");
    }

    #[test]
    fn directions_use_different_streams() {
        let i = Impairment { loss: 0.5, ..imp() };
        let t0 = Instant::now();
        let mut up = Shaper::new(i.clone(), 1, Direction::ToUpstream);
        let mut down = Shaper::new(i, 1, Direction::ToClient);
        let a: Vec<_> = (0..200).map(|_| up.admit(t0, 10)).collect();
        let b: Vec<_> = (0..200).map(|_| down.admit(t0, 10)).collect();
        assert_ne!(a, b);
    }

    #[test]
    fn burst_loss_makes_runs() {
        let i = Impairment {
            burst: Some(Burst {
                p_enter: 0.02,
                p_leave: 0.2,
                loss_in_burst: 1.0,
            }),
            ..imp()
        };
        let lost = lost_indices(5, &i, 20_000);
        let mut longest = 0;
        let mut run = 0;
        let mut prev = None;
        for &x in &lost {
            run = if prev == Some(x.wrapping_sub(1)) {
                run + 1
            } else {
                1
            };
            longest = longest.max(run);
            prev = Some(x);
        }
        // Stationary bad-state share is p_enter / (p_enter + p_leave) ~ 9 %.
        assert!((900..=2900).contains(&lost.len()), "lost {}", lost.len());
        assert!(longest >= 5, "longest run {longest}");
    }

    #[test]
    fn delay_and_jitter_bounds() {
        let i = Impairment {
            delay: Duration::from_millis(40),
            jitter: Duration::from_millis(20),
            ..imp()
        };
        let mut s = Shaper::new(i, 3, Direction::ToClient);
        let t0 = Instant::now();
        let mut reordered = 0;
        let mut last = t0;
        for k in 0..1000u64 {
            let now = t0 + Duration::from_millis(k);
            let Fate::Deliver(due) = s.admit(now, 100) else {
                panic!("no loss configured")
            };
            assert!(due >= now + Duration::from_millis(40));
            assert!(due <= now + Duration::from_millis(60));
            if due < last {
                reordered += 1;
            }
            last = due;
        }
        assert!(reordered > 100, "reordered {reordered}");
    }

    #[test]
    fn rate_cap_serializes_and_drops_tail() {
        // 1 Mbit/s: a 1250-byte packet takes 10 ms. Queue of 5000 bytes.
        let i = Impairment {
            rate_bps: Some(1_000_000),
            queue_bytes: 5000,
            ..imp()
        };
        let mut s = Shaper::new(i, 3, Direction::ToClient);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Burst of 10 packets at t0: 4 fit (5000 bytes), the rest drop.
        let fates: Vec<_> = (0..10).map(|_| s.admit(t0, 1250)).collect();
        for (k, f) in fates.iter().enumerate().take(4) {
            assert_eq!(
                *f,
                Fate::Deliver(t0 + ms(10 * (k as u64 + 1))),
                "packet {k}"
            );
        }
        assert!(fates[4..].iter().all(|f| *f == Fate::QueueFull));
        // At 40 ms the link is idle again: next packet leaves at 50 ms.
        assert_eq!(s.admit(t0 + ms(40), 1250), Fate::Deliver(t0 + ms(50)));
        // Lifting the cap: immediate delivery.
        s.set(Impairment {
            rate_bps: None,
            ..s.impairment().clone()
        });
        assert_eq!(s.admit(t0 + ms(41), 1250), Fate::Deliver(t0 + ms(41)));
    }

    #[test]
    fn oversized_packet_on_idle_link_is_accepted() {
        let i = Impairment {
            rate_bps: Some(8_000_000),
            queue_bytes: 100,
            ..imp()
        };
        let mut s = Shaper::new(i, 0, Direction::ToUpstream);
        let t0 = Instant::now();
        assert!(matches!(s.admit(t0, 1000), Fate::Deliver(_)));
        assert_eq!(s.admit(t0, 1000), Fate::QueueFull);
    }
}
