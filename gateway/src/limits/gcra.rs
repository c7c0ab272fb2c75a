//! A lock-free GCRA bucket (generic cell rate algorithm) on one atomic.
//!
//! State is the *theoretical arrival time* `tat` (nanoseconds on the caller's clock). With
//! emission interval `T = 1/rate` and tolerance `τ = burst × T`, taking `c` units succeeds
//! when `max(tat, now) + c·T − now ≤ τ`, and moves `tat` there. This is a token bucket of
//! depth `burst` refilled at `rate`, held in one `u64` and advanced by compare-and-swap:
//! no mutex, no background refill.
//!
//! Guarantees (tested in `tests/suite/limiter_props.rs`): over any window of length `w` the units
//! taken, net of refunds, never exceed `rate × w + burst`; a denial's `retry_after` is
//! exact (taking the same cost at `now + retry_after`, with nothing else changed, succeeds).
//!
//! The rate and burst can change while the bucket is in use ([`Gcra::set_rate`]): the debt
//! in *units* is kept (so a raised rate takes effect at once) and clamped to the new burst.

use std::sync::atomic::{AtomicU64, Ordering};

/// Rate and depth of a bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Units per second.
    pub per_sec: f64,
    /// Bucket depth in units.
    pub burst: f64,
}

/// A bucket's state as headers report it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// Bucket depth (units).
    pub limit: f64,
    /// Units that could be taken now.
    pub remaining: f64,
    /// Nanoseconds until the bucket is full again.
    pub reset_ns: u64,
}

/// Why a take was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    /// Nanoseconds after which the same take succeeds, if nothing else changes.
    pub retry_after_ns: u64,
}

/// One bucket.
#[derive(Debug)]
pub struct Gcra {
    tat: AtomicU64,
    /// Emission interval in ns per unit (f64 bits).
    interval: AtomicU64,
    /// Depth in units (f64 bits).
    burst: AtomicU64,
}

fn interval_of(r: Rate) -> f64 {
    1e9 / r.per_sec
}

impl Gcra {
    pub fn new(rate: Rate) -> Self {
        Self {
            tat: AtomicU64::new(0),
            interval: AtomicU64::new(interval_of(rate).to_bits()),
            burst: AtomicU64::new(rate.burst.to_bits()),
        }
    }

    fn params(&self) -> (f64, f64) {
        (
            f64::from_bits(self.interval.load(Ordering::Relaxed)),
            f64::from_bits(self.burst.load(Ordering::Relaxed)),
        )
    }

    /// Nanoseconds `cost` units occupy. Rounded up, and the same for every call with the same
    /// cost, so that a refund undoes a take exactly.
    fn span(cost: f64, interval: f64) -> u64 {
        (cost * interval).ceil().max(0.0) as u64
    }

    /// Takes `cost` units at `now`, or says when that would succeed.
    #[inline]
    pub fn try_take(&self, cost: f64, now: u64) -> Result<(), Denied> {
        let (interval, burst) = self.params();
        let span = Self::span(cost, interval);
        let tolerance = (burst * interval).ceil() as u64;
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let new = tat.max(now) + span;
            let ahead = new - now;
            if ahead > tolerance {
                return Err(Denied {
                    retry_after_ns: ahead - tolerance,
                });
            }
            match self
                .tat
                .compare_exchange_weak(tat, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }

    /// Whether `cost` units could be taken at `now`, without taking them.
    pub fn check(&self, cost: f64, now: u64) -> Result<(), Denied> {
        let (interval, burst) = self.params();
        let ahead = self.tat.load(Ordering::Acquire).max(now) + Self::span(cost, interval) - now;
        let tolerance = (burst * interval).ceil() as u64;
        if ahead > tolerance {
            Err(Denied {
                retry_after_ns: ahead - tolerance,
            })
        } else {
            Ok(())
        }
    }

    /// Gives back `amount` units taken earlier (never beyond a full bucket).
    pub fn refund(&self, amount: f64, now: u64) {
        let (interval, _) = self.params();
        let span = Self::span(amount, interval);
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(span).max(now.min(tat)))
            });
    }

    /// Takes `amount` units unconditionally (a request used more than it reserved); the
    /// bucket may go into debt, which later takes wait out.
    pub fn charge(&self, amount: f64, now: u64) {
        let (interval, _) = self.params();
        let span = Self::span(amount, interval);
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.max(now) + span)
            });
    }

    /// The bucket as of `now`.
    pub fn snapshot(&self, now: u64) -> Snapshot {
        let (interval, burst) = self.params();
        let reset_ns = self.tat.load(Ordering::Acquire).saturating_sub(now);
        let used = reset_ns as f64 / interval;
        Snapshot {
            limit: burst,
            remaining: (burst - used).max(0.0),
            reset_ns,
        }
    }

    /// Changes rate and depth in place: the debt in units is kept, clamped to the new depth.
    pub fn set_rate(&self, rate: Rate, now: u64) {
        let (old_interval, _) = self.params();
        let new_interval = interval_of(rate);
        self.interval
            .store(new_interval.to_bits(), Ordering::Relaxed);
        self.burst.store(rate.burst.to_bits(), Ordering::Relaxed);
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                let debt = (tat.saturating_sub(now) as f64 / old_interval).min(rate.burst);
                Some(now + Self::span(debt, new_interval))
            });
    }

    pub fn rate(&self) -> Rate {
        let (interval, burst) = self.params();
        Rate {
            per_sec: 1e9 / interval,
            burst,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn bucket(per_sec: f64, burst: f64) -> Gcra {
        Gcra::new(Rate { per_sec, burst })
    }

    #[test]
    fn burst_then_rate() {
        let b = bucket(100.0, 1000.0);
        let t0 = 10 * S;
        b.try_take(1000.0, t0).unwrap();
        let d = b.try_take(50.0, t0).unwrap_err();
        assert_eq!(d.retry_after_ns, S / 2);
        assert!(b.try_take(50.0, t0 + S / 2 - 1).is_err());
        b.try_take(50.0, t0 + S / 2).unwrap();
    }

    #[test]
    fn refund_restores_exactly() {
        let b = bucket(7.0, 30.0);
        let t = 5 * S;
        b.try_take(13.3, t).unwrap();
        b.refund(13.3, t);
        b.try_take(30.0, t).unwrap();
        // Refunds never fill beyond the depth.
        b.refund(1000.0, t);
        assert!(b.try_take(30.1, t).is_err());
    }

    #[test]
    fn raising_the_rate_takes_effect_at_once_and_lowering_clamps() {
        let b = bucket(10.0, 100.0);
        let t = 3 * S;
        b.try_take(100.0, t).unwrap();
        assert_eq!(b.try_take(10.0, t).unwrap_err().retry_after_ns, S);
        b.set_rate(
            Rate {
                per_sec: 100.0,
                burst: 1000.0,
            },
            t,
        );
        // Debt of 100 units at the new rate: 900 units available at once.
        b.try_take(900.0, t).unwrap();
        assert!(b.try_take(1.0, t).is_err());
        b.set_rate(
            Rate {
                per_sec: 1.0,
                burst: 5.0,
            },
            t,
        );
        let s = b.snapshot(t);
        assert_eq!(s.remaining, 0.0);
        assert_eq!(s.reset_ns, 5 * S, "debt clamped to the new depth");
    }

    #[test]
    fn snapshot_reports_remaining_and_reset() {
        let b = bucket(10.0, 100.0);
        let t = S;
        b.try_take(40.0, t).unwrap();
        let s = b.snapshot(t);
        assert_eq!(s.limit, 100.0);
        assert!((s.remaining - 60.0).abs() < 1e-6);
        assert_eq!(s.reset_ns, 4 * S);
    }
}
