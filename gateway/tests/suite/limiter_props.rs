//! Property tests of the GCRA limiter, on a virtual clock (nanoseconds passed in).
//!
//! - Over any window `[a, b]`, the units taken net of refunds never exceed
//!   `rate × (b − a) + burst`.
//! - Refunds never give back more than was reserved: a tenant that reserves and refunds
//!   everything can still take at most one burst at once.
//! - Concurrent takes from many threads keep the same bound.
//! - A denial's `retry_after` is exact.

use gateway::limits::gcra::{Gcra, Rate};
use proptest::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const S: f64 = 1e9;
/// Rounding slack: each take's span is rounded up to whole nanoseconds.
const EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
enum Op {
    /// Advance the clock, then try to take `cost`.
    Take { dt_us: u64, cost: f64 },
    /// Advance the clock, then refund `frac` of one earlier successful take.
    Refund { dt_us: u64, pick: usize, frac: f64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..200_000, 0.1f64..500.0).prop_map(|(dt_us, cost)| Op::Take { dt_us, cost }),
        1 => (0u64..200_000, any::<usize>(), 0.0f64..=1.0)
            .prop_map(|(dt_us, pick, frac)| Op::Refund { dt_us, pick, frac }),
    ]
}

/// (time ns, signed units): takes positive, refunds negative.
fn run(rate: Rate, ops: &[Op]) -> Vec<(u64, f64)> {
    let b = Gcra::new(rate);
    let mut now = 1_000_000_000u64;
    let mut taken: Vec<f64> = Vec::new();
    let mut log = Vec::new();
    for op in ops {
        match *op {
            Op::Take { dt_us, cost } => {
                now += dt_us * 1000;
                if b.try_take(cost, now).is_ok() {
                    taken.push(cost);
                    log.push((now, cost));
                }
            }
            Op::Refund { dt_us, pick, frac } => {
                now += dt_us * 1000;
                if taken.is_empty() {
                    continue;
                }
                let i = pick % taken.len();
                // Refund part of a reservation, at most once (as reconciliation does).
                let amount = taken.swap_remove(i) * frac;
                b.refund(amount, now);
                log.push((now, -amount));
            }
        }
    }
    log
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_window_admits_at_most_rate_times_window_plus_burst(
        per_sec in 10.0f64..5000.0,
        burst_s in 0.1f64..10.0,
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let rate = Rate { per_sec, burst: per_sec * burst_s };
        let log = run(rate, &ops);
        // Every window that starts and ends at an event.
        for i in 0..log.len() {
            let mut net = 0.0;
            for j in i..log.len() {
                net += log[j].1;
                let window = (log[j].0 - log[i].0) as f64 / S;
                let bound = rate.per_sec * window + rate.burst;
                prop_assert!(
                    net <= bound * (1.0 + EPS) + EPS,
                    "window {window}s: net {net} > bound {bound}"
                );
            }
        }
    }

    #[test]
    fn refunds_never_exceed_reservations(
        per_sec in 1.0f64..1000.0,
        burst in 1.0f64..1000.0,
        costs in prop::collection::vec(0.5f64..100.0, 1..50),
    ) {
        let b = Gcra::new(Rate { per_sec, burst });
        let now = 5_000_000_000u64;
        let mut reserved = Vec::new();
        for c in &costs {
            if b.try_take(*c, now).is_ok() {
                reserved.push(*c);
            }
        }
        // Refund everything, twice over: the bucket is full, never fuller.
        for c in reserved.iter().chain(reserved.iter()) {
            b.refund(*c, now);
        }
        let s = b.snapshot(now);
        prop_assert!(s.remaining <= burst + EPS);
        prop_assert!(b.try_take(burst, now).is_ok());
        prop_assert!(b.try_take(burst * 1e-3 + 1e-3, now).is_err());
    }

    #[test]
    fn retry_after_is_exact(
        per_sec in 1.0f64..10000.0,
        burst_s in 0.01f64..10.0,
        first in 0.0f64..=1.0,
        cost_frac in 0.01f64..=1.0,
    ) {
        let burst = per_sec * burst_s;
        let b = Gcra::new(Rate { per_sec, burst });
        let now = 7_000_000_000u64;
        b.try_take(burst * first, now).ok();
        let cost = burst * cost_frac;
        if let Err(d) = b.try_take(cost, now) {
            let later = now + d.retry_after_ns;
            prop_assert!(d.retry_after_ns == 0 || b.check(cost, later - 1).is_err());
            prop_assert!(b.try_take(cost, later).is_ok());
        }
    }
}

#[test]
fn concurrent_takes_keep_the_bound() {
    // 8 threads hammer one bucket while a shared virtual clock advances 1 ms per step.
    let rate = Rate {
        per_sec: 10_000.0,
        burst: 2_000.0,
    };
    let b = Arc::new(Gcra::new(rate));
    let clock = Arc::new(AtomicU64::new(1_000_000_000));
    let admitted_milli = Arc::new(AtomicU64::new(0));
    let steps = 2000u64;
    std::thread::scope(|s| {
        for k in 0..8u64 {
            let (b, clock, admitted) = (b.clone(), clock.clone(), admitted_milli.clone());
            s.spawn(move || {
                for i in 0..steps {
                    if k == 0 {
                        clock.fetch_add(1_000_000, Ordering::SeqCst);
                    }
                    let cost = 1.0 + ((i * 7 + k * 13) % 37) as f64;
                    let now = clock.load(Ordering::SeqCst);
                    if b.try_take(cost, now).is_ok() {
                        admitted.fetch_add((cost * 1000.0) as u64, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let elapsed_s = (clock.load(Ordering::SeqCst) - 1_000_000_000) as f64 / S;
    let admitted = admitted_milli.load(Ordering::Relaxed) as f64 / 1000.0;
    let bound = rate.per_sec * elapsed_s + rate.burst;
    assert!(
        admitted <= bound + 1e-3,
        "admitted {admitted} > bound {bound}"
    );
    // And the limiter is not starving anyone: offered far more, it admits close to the bound.
    assert!(admitted >= 0.9 * bound, "admitted {admitted} of {bound}");
}
