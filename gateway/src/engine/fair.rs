//! Fair share of the engine between tenants: weighted virtual token counters (Sheng et
//! al., "Fairness in Serving Large Language Models", OSDI 2024).
//!
//! Each tenant has a counter of the weighted tokens the engine has computed for it (input
//! tokens count 1, output tokens — decodes, and generated tokens recomputed after a
//! preemption — count the model's `output_weight`, as in the tenant's contract), divided
//! by its weight (its purchased rate). When batch slots or KV blocks are
//! contended, the scheduler admits the waiting sequence of the tenant with the smallest
//! counter, and preempts from the tenant with the largest. A tenant that comes back from
//! idle has its counter lifted to the smallest counter among the tenants with work, so it
//! cannot bank credit while away, yet it is first in line at the next scheduling step.
//! When the engine has no work at all, every counter is forgotten.
//! Nothing is held back when there is no contention: the policy only orders.
//!
//! Weights: a request's `weight` (the tenant's `tokens_per_second`, or what a trusted
//! gateway sent); requests without one count as weight 1. Spot-tier, best-effort and batch
//! requests carry the lowest weight (`worker::LOWEST_WEIGHT`), so they are admitted last
//! and preempted first. They are counted in an account of their own per tenant (see
//! [`Tenanted::share`]): a tenant's batch, run on what is left, does not put the tenant's
//! own interactive requests behind other tenants'.

use std::collections::HashMap;
use std::sync::Arc;

/// Sequences running per tenant.
pub type InRun = HashMap<Arc<str>, usize>;

/// The account work of `tenant` with `weight` is counted in: the tenant's, or for
/// lowest-weight work (spot, best effort, batches) an account of the tenant's own for it,
/// so that such work — charged heavily, being of the lowest weight — does not put the
/// tenant's contracted requests behind other tenants'.
pub fn account(tenant: &Arc<str>, weight: f64) -> Arc<str> {
    match weight <= crate::worker::LOWEST_WEIGHT {
        true => format!("{tenant}\u{0}lowest").into(),
        false => tenant.clone(),
    }
}

/// Weights below this are treated as this (no division by zero or by a negative).
const MIN_WEIGHT: f64 = 1e-6;

/// A sequence as the fair-share policy sees it.
pub trait Tenanted {
    fn tenant(&self) -> &Arc<str>;
    /// The account its fair share is counted in (default: its tenant's).
    fn share(&self) -> &Arc<str> {
        self.tenant()
    }
    fn weight(&self) -> f64;
    /// The weighted tokens of computing its next `n` tokens (default: `n`).
    fn token_cost(&self, n: usize) -> f64 {
        n as f64
    }
}

/// The tenants' virtual token counters.
#[derive(Debug, Default)]
pub struct Fair {
    counters: HashMap<Arc<str>, f64>,
}

impl Fair {
    pub fn counter(&self, tenant: &str) -> f64 {
        self.counters.get(tenant).copied().unwrap_or(0.0)
    }

    /// Forgets every counter: for when the engine has no work at all (fairness is only
    /// between tenants that wait; none carries credit or debt through an idle engine).
    pub fn reset(&mut self) {
        self.counters.clear();
    }

    /// `cost` weighted tokens computed for a sequence of `tenant` with `weight`.
    pub fn charge(&mut self, tenant: &Arc<str>, cost: f64, weight: f64) {
        let add = cost / weight.max(MIN_WEIGHT);
        // Every step charges every running sequence: look up by name, and copy the name
        // only for a tenant's first charge.
        match self.counters.get_mut(tenant.as_ref()) {
            Some(c) => *c += add,
            None => {
                self.counters.insert(tenant.clone(), add);
            }
        }
    }

    /// A sequence of `tenant` arrives; `backlogged` are the tenants with sequences running
    /// or waiting (before this one). If `tenant` was not among them, its counter is lifted
    /// to the smallest of theirs.
    pub fn arrive<'a>(
        &mut self,
        tenant: &Arc<str>,
        backlogged: impl IntoIterator<Item = &'a Arc<str>>,
    ) {
        let mut min: Option<f64> = None;
        for t in backlogged {
            if t == tenant {
                return;
            }
            let c = self.counter(t);
            min = Some(min.map_or(c, |m: f64| m.min(c)));
        }
        if let Some(m) = min {
            let c = self.counters.entry(tenant.clone()).or_insert(0.0);
            *c = c.max(m);
        }
    }

    /// Sequences per tenant in `running` (for [`Fair::pick`]'s ties).
    pub fn count(running: &[impl Tenanted]) -> InRun {
        let mut n = InRun::new();
        for r in running {
            *n.entry(r.share().clone()).or_default() += 1;
        }
        n
    }

    /// Which waiting sequence to admit next: the tenant with the smallest counter; on a
    /// tie the one with fewer sequences running (`in_run`, from [`Fair::count`], kept up to
    /// date by the caller as it admits); then the earliest in the queue.
    pub fn pick<S: Tenanted>(
        &self,
        waiting: impl IntoIterator<Item = S>,
        in_run: &InRun,
    ) -> Option<usize> {
        let mut best: Option<(usize, f64, usize)> = None;
        for (i, s) in waiting.into_iter().enumerate() {
            let c = self.counter(s.share());
            let n = in_run.get(s.share()).copied().unwrap_or(0);
            if best.is_none_or(|(_, bc, bn)| c < bc || (c == bc && n < bn)) {
                best = Some((i, c, n));
            }
        }
        best.map(|(i, _, _)| i)
    }

    /// Which of `candidates` to preempt: the tenant with the largest counter; on a tie the
    /// latest (the most recently admitted).
    pub fn victim<S: Tenanted>(&self, candidates: impl IntoIterator<Item = S>) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (i, s) in candidates.into_iter().enumerate() {
            let c = self.counter(s.share());
            if best.is_none_or(|(_, bc)| c >= bc) {
                best = Some((i, c));
            }
        }
        best.map(|(i, _)| i)
    }
}

impl<T: Tenanted> Tenanted for &T {
    fn tenant(&self) -> &Arc<str> {
        (**self).tenant()
    }
    fn share(&self) -> &Arc<str> {
        (**self).share()
    }
    fn weight(&self) -> f64 {
        (**self).weight()
    }
    fn token_cost(&self, n: usize) -> f64 {
        (**self).token_cost(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct S(Arc<str>, f64);
    impl Tenanted for S {
        fn tenant(&self) -> &Arc<str> {
            &self.0
        }
        fn weight(&self) -> f64 {
            self.1
        }
    }
    fn s(t: &str) -> S {
        S(t.into(), 1.0)
    }

    #[test]
    fn the_least_served_tenant_goes_first_by_weight() {
        let mut f = Fair::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        f.charge(&a, 300.0, 3.0); // 100
        f.charge(&b, 150.0, 1.0); // 150
        let waiting = [s("b"), s("a")];
        assert_eq!(f.pick(waiting.iter(), &InRun::new()), Some(1));
        f.charge(&a, 300.0, 3.0); // 200
        assert_eq!(f.pick(waiting.iter(), &InRun::new()), Some(0));
        assert_eq!(f.victim([s("a"), s("b")].iter()), Some(0));
    }

    #[test]
    fn a_tenant_back_from_idle_is_lifted_but_goes_first_on_a_tie() {
        let mut f = Fair::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        f.charge(&a, 1000.0, 1.0);
        // b was idle all along: no banked credit, lifted to a's counter.
        f.arrive(&b, [&a]);
        assert_eq!(f.counter("b"), 1000.0);
        // A tie: b has nothing running, a has a sequence running.
        let waiting = [s("a"), s("b")];
        assert_eq!(f.pick(waiting.iter(), &Fair::count(&[s("a")])), Some(1));
        // Arriving while already backlogged changes nothing; neither does a lower min.
        f.charge(&b, 10.0, 1.0);
        f.arrive(&b, [&a, &b]);
        assert_eq!(f.counter("b"), 1010.0);
        f.arrive(&a, [&b]);
        assert_eq!(f.counter("a"), 1010.0, "lifted to b's");
    }

    #[test]
    fn ties_keep_queue_order_and_preempt_the_youngest() {
        let f = Fair::default();
        let waiting = [s("a"), s("a"), s("b")];
        assert_eq!(f.pick(waiting.iter(), &InRun::new()), Some(0));
        assert_eq!(f.victim([s("a"), s("b"), s("a")].iter()), Some(2));
        assert_eq!(f.pick(std::iter::empty::<&S>(), &InRun::new()), None);
    }

    #[test]
    fn lowest_weight_is_served_last_and_preempted_first() {
        let mut f = Fair::default();
        let (spot, r): (Arc<str>, Arc<str>) = ("spot".into(), "reserved".into());
        f.charge(&spot, 10.0, 1e-3);
        f.charge(&r, 5000.0, 2000.0);
        assert_eq!(
            f.pick([s("spot"), s("reserved")].iter(), &InRun::new()),
            Some(1)
        );
        assert_eq!(f.victim([s("spot"), s("reserved")].iter()), Some(0));
    }

    /// A sequence counted in an account other than its tenant's.
    struct Shared(Arc<str>, Arc<str>, f64);
    impl Tenanted for Shared {
        fn tenant(&self) -> &Arc<str> {
            &self.0
        }
        fn share(&self) -> &Arc<str> {
            &self.1
        }
        fn weight(&self) -> f64 {
            self.2
        }
    }

    #[test]
    fn a_tenants_lowest_weight_work_does_not_put_its_own_requests_behind() {
        let low = crate::worker::LOWEST_WEIGHT;
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let a_low = account(&a, low);
        assert_eq!(account(&a, 1.0), a);
        let mut f = Fair::default();
        // a's batch has had 100 tokens computed; b's requests 50.
        f.charge(&a_low, 100.0, low);
        f.charge(&b, 50.0, 1.0);
        let sq = |t: &Arc<str>, share: &Arc<str>, w| Shared(t.clone(), share.clone(), w);
        let waiting = [sq(&b, &b, 1.0), sq(&a, &a_low, low), sq(&a, &a, 1.0)];
        // a's own request first (its account is untouched), then b's, the batch last.
        assert_eq!(f.pick(waiting.iter(), &InRun::new()), Some(2));
        assert_eq!(f.pick(waiting[..2].iter(), &InRun::new()), Some(0));
        assert_eq!(f.victim(waiting.iter()), Some(1));
    }
}
