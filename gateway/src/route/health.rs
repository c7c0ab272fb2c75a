//! Worker health: the per-worker circuit breaker (passive ejection) and the active probe
//! loop. Lock-free: the breaker is three atomics.
//!
//! Breaker states: *closed* (routable); *open* after `threshold` consecutive failures
//! (not routable for `cooldown`); then *half-open*: exactly one trial request is let
//! through; its success closes the breaker, its failure opens it for another cooldown.

use super::Pool;
use futures::StreamExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn millis(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_millis() as u64 + 1
}

pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: AtomicU32,
    /// 0 = closed; otherwise the epoch-millisecond until which the breaker is open.
    open_until: AtomicU64,
    trial_taken: AtomicBool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        epoch();
        Self {
            threshold,
            cooldown,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            trial_taken: AtomicBool::new(false),
        }
    }

    pub fn is_open(&self, now: Instant) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        until != 0 && millis(now) < until
    }

    /// Whether a request could be let through now (closed, or half-open with no trial yet).
    pub fn allows(&self, now: Instant) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        until == 0 || (millis(now) >= until && !self.trial_taken.load(Ordering::Acquire))
    }

    /// Lets a request through: `Some(false)` when closed, `Some(true)` for the half-open
    /// trial, `None` when it must not pass.
    pub fn admit(&self, now: Instant) -> Option<bool> {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Some(false);
        }
        if millis(now) < until {
            return None;
        }
        self.trial_taken
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| true)
    }

    pub fn record_success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            self.trial_taken.store(false, Ordering::Release);
        }
    }

    /// Returns true when this failure opened (or re-opened) the breaker.
    pub fn record_failure(&self, now: Instant) -> bool {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let half_open = self.open_until.load(Ordering::Acquire) != 0;
        if n >= self.threshold || half_open {
            let prev = self
                .open_until
                .swap(millis(now + self.cooldown).max(1), Ordering::AcqRel);
            self.trial_taken.store(false, Ordering::Release);
            // Newly opened (it was closed, or half-open after its cooldown), not merely
            // extended by another request that was already in flight when it opened.
            return prev == 0 || prev <= millis(now);
        }
        false
    }

    /// The half-open trial ended without a verdict (client cancelled): allow another.
    pub fn abandon_trial(&self) {
        self.trial_taken.store(false, Ordering::Release);
    }

    /// An active probe succeeded: a worker that answers probes gets its trial at once.
    pub fn probe_ok(&self, now: Instant) {
        let until = self.open_until.load(Ordering::Acquire);
        if until != 0 && millis(now) < until {
            self.open_until.store(millis(now), Ordering::Release);
        }
    }
}

/// Probes every worker of `pool` each `health_interval`, forever (up to 64 at once).
/// A failed probe takes the worker out of rotation until a probe succeeds.
pub async fn probe_loop(pool: Arc<Pool>) {
    let mut tick = tokio::time::interval(pool.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        futures::stream::iter(pool.slots.iter().cloned())
            .for_each_concurrent(64, |slot| async move {
                let result = slot.worker.probe().await;
                let ok = result.is_ok();
                if ok != slot.healthy() {
                    match &result {
                        Ok(()) => tracing::info!(worker = slot.worker.name(), "health probe ok: worker back in rotation"),
                        Err(e) => tracing::warn!(worker = slot.worker.name(), error = %e, "health probe failed: worker out of rotation"),
                    }
                }
                slot.set_healthy(ok);
                if ok {
                    slot.breaker.probe_ok(Instant::now());
                }
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_half_opens_and_closes() {
        let b = Breaker::new(2, Duration::from_millis(50));
        let t0 = Instant::now();
        assert_eq!(b.admit(t0), Some(false));
        assert!(!b.record_failure(t0));
        assert!(b.record_failure(t0));
        // Requests already in flight that fail now extend it, but did not open it.
        assert!(!b.record_failure(t0));
        assert!(!b.allows(t0) && b.admit(t0).is_none());
        let t1 = t0 + Duration::from_millis(60);
        assert!(b.allows(t1));
        assert_eq!(b.admit(t1), Some(true), "one trial");
        assert_eq!(b.admit(t1), None, "only one trial");
        assert!(b.record_failure(t1), "failed trial re-opens");
        assert!(b.is_open(t1));
        let t2 = t1 + Duration::from_millis(60);
        assert_eq!(b.admit(t2), Some(true));
        b.record_success();
        assert_eq!(b.admit(t2), Some(false), "closed again");
    }
}
