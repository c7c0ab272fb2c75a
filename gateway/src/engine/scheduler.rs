//! The continuous-batching policy: which sequences run in the next step, and how many
//! tokens each, under a per-step token budget (chunked prefill) and the KV blocks free.
//!
//! Order of service each step: running sequences in admission order (a decode costs one
//! token, a prefill in progress takes a chunk of what budget is left), then waiting
//! sequences are admitted while budget, sequence slots and blocks allow — the least
//! served tenant's first ([`super::fair`]). When a running sequence needs a block and
//! none is free, a sequence not yet served this step is preempted — the most served
//! tenant's, its most recently admitted: its blocks are freed and it goes back to the
//! head of the queue, to be recomputed later (its generated tokens become part of its
//! prefill). Every token planned is charged to its tenant's counter. While a step is in
//! flight (planned ahead, [`Limits::preempt`] off) nobody is preempted: a sequence short
//! of a block ends the step's running part, and the plan says so ([`Plan::starved`]).

use super::fair::{Fair, Tenanted};
use super::kv_pools::{KvPools, Tables};
use std::collections::VecDeque;
use std::hash::RandomState;

/// What the scheduler needs to know of a sequence.
pub trait Schedulable: Tenanted {
    /// Tokens whose keys and values are not yet in the cache.
    fn pending(&self) -> usize;
    /// Tokens already in the cache.
    fn computed(&self) -> usize;
    /// Its KV blocks ([`Tables`]).
    fn blocks_mut(&mut self) -> &mut Tables;
    /// Forget the cache (after preemption): everything is pending again.
    fn reset(&mut self);
    /// The content hashes of the full blocks of its tokens ([`super::blocks::chain`]),
    /// and its tokens.
    fn cache_keys(&mut self, hasher: &RandomState, block_size: usize) -> (&[u64], &[u32]);
    /// Its first `n` tokens (whole blocks, now at the head of its block table) were found
    /// in the prefix cache: they count as computed.
    fn skip(&mut self, n: usize, block_size: usize);
    /// Rows of logits computing its next `n` tokens returns: its last row's, when that
    /// reaches its end (to draw the next token from).
    fn logit_rows(&self, n: usize) -> usize {
        usize::from(n > 0 && n == self.pending())
    }
    /// Whether it may take its prompt's beginning from the prefix cache (not when every
    /// prompt row's logits are wanted).
    fn reuses_prefix(&self) -> bool {
        true
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_batch_tokens: usize,
    pub max_seqs: usize,
    pub block_size: usize,
    /// Whether full blocks are cached and shared by prompts that start alike (the engine
    /// makes its block pool with it; the scheduler asks the pool either way).
    pub prefix_caching: bool,
    /// Logits rows a step may return (the backend's); a chunk that wants more is cut.
    pub max_logit_rows: usize,
    /// Whether a running sequence short of a block may preempt another (not while the
    /// step before is still running on the device, which reads their blocks).
    pub preempt: bool,
    /// Most lowest-weight sequences (batches, spot, best effort) in a step that carries
    /// others (`None`: no cap): the rest keep their place and blocks and wait for a step
    /// without interactive work, so that on a backend whose step time grows with its rows
    /// (the CPU) bulk work does not slow interactive answers down.
    pub lowest_rows: Option<usize>,
    /// Most draft tokens a decoding sequence proposes a step (speculative decoding,
    /// [`super::speculate`]; the engine's, not the scheduler's: drafts reach it as pending
    /// tokens); 0: none.
    pub speculate: usize,
    /// Most draft tokens a sequence with a prediction takes from it a step
    /// ([`super::prediction`]); 0: none.
    pub predict: usize,
}

/// Whether `s` is lowest-weight work.
fn lowest<S: Tenanted>(s: &S) -> bool {
    s.weight() <= crate::worker::LOWEST_WEIGHT
}

/// The step's plan: `(index in running, tokens to compute)`, how many sequences were
/// preempted while making it, whether a running sequence went without for want of a
/// block while preemption was off, and how many lowest-weight running sequences were held
/// out beside interactive ones ([`Limits::lowest_rows`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub items: Vec<(usize, usize)>,
    pub preempted: usize,
    pub starved: bool,
    pub held: usize,
}

/// Gives `s` enough blocks to hold `tokens` positions, if the pools have them (its
/// windowed blocks before its next row's window let go first).
fn grow<S: Schedulable>(s: &mut S, tokens: usize, pool: &mut KvPools, bs: usize) -> bool {
    let from = s.computed();
    pool.grow(s.blocks_mut(), from, tokens, bs)
}

/// Gives a sequence that holds no blocks the cached blocks of its longest cached prefix,
/// leaving at least its last token to compute (its logits are wanted).
fn reuse<S: Schedulable>(s: &mut S, pool: &mut KvPools, bs: usize) {
    if !pool.caching() || s.computed() > 0 || !s.blocks_mut().is_empty() || !s.reuses_prefix() {
        return;
    }
    let total = s.pending();
    let tenant = s.tenant().clone();
    let (hashes, tokens) = s.cache_keys(pool.hasher(), bs);
    let usable = (total.saturating_sub(1) / bs).min(hashes.len());
    let found = pool.lookup(&hashes[..usable], tokens, &tenant, bs);
    if !found.full.is_empty() {
        let n = found.full.len() * bs;
        *s.blocks_mut() = found;
        s.skip(n, bs);
    }
}

/// `n` tokens of `s`, cut so that their logits rows fit in the `left` of the step's (0: none
/// fit); takes those rows from `left`.
fn fit_rows<S: Schedulable>(s: &S, n: usize, left: &mut usize) -> usize {
    let r = s.logit_rows(n);
    // Each row cut from a chunk's end takes one of its logits rows with it.
    let n = if r > *left {
        n.saturating_sub(r - *left)
    } else {
        n
    };
    let r = s.logit_rows(n);
    if r > *left {
        return 0;
    }
    *left -= r;
    n
}

fn preempt<S: Schedulable>(mut s: S, pool: &mut KvPools, waiting: &mut VecDeque<S>) {
    pool.release(s.blocks_mut());
    s.reset();
    waiting.push_front(s);
}

pub fn schedule<S: Schedulable>(
    running: &mut Vec<S>,
    waiting: &mut VecDeque<S>,
    pool: &mut KvPools,
    lim: Limits,
    fair: &mut Fair,
) -> Plan {
    let plan = plan_step(running, waiting, pool, lim, fair);
    if !plan.items.is_empty() || lim.lowest_rows.is_none() {
        return plan;
    }
    // Nothing else could run this step (an interactive sequence waiting for blocks that
    // held-back ones hold, say): lowest-weight work is not held back for nothing.
    let uncapped = Limits {
        lowest_rows: None,
        ..lim
    };
    let mut again = plan_step(running, waiting, pool, uncapped, fair);
    again.preempted += plan.preempted;
    again
}

fn plan_step<S: Schedulable>(
    running: &mut Vec<S>,
    waiting: &mut VecDeque<S>,
    pool: &mut KvPools,
    lim: Limits,
    fair: &mut Fair,
) -> Plan {
    let mut plan = Plan::default();
    let mut budget = lim.max_batch_tokens;
    let mut rows_left = lim.max_logit_rows;
    // Lowest-weight sequences this step may still take: capped only beside others.
    let mut lowest_left = match lim.lowest_rows {
        Some(cap) if running.iter().chain(waiting.iter()).any(|s| !lowest(s)) => cap,
        _ => usize::MAX,
    };
    let mut i = 0;
    while i < running.len() && budget > 0 {
        if lowest(&running[i]) && lowest_left == 0 {
            // Held out of this step beside interactive work; keeps its blocks.
            plan.held += 1;
            i += 1;
            continue;
        }
        let n = fit_rows(
            &running[i],
            running[i].pending().min(budget),
            &mut rows_left,
        );
        if n == 0 {
            // Its logits rows do not fit this step: it waits for the next.
            i += 1;
            continue;
        }
        let target = running[i].computed() + n;
        let mut ok = grow(&mut running[i], target, pool, lim.block_size);
        if !ok && !lim.preempt {
            plan.starved = true;
            break;
        }
        while !ok && running.len() > i + 1 {
            // Only sequences after i: those before are already in this step's plan.
            let v = i + 1 + fair.victim(running[i + 1..].iter()).unwrap_or(0);
            let victim = running.remove(v);
            preempt(victim, pool, waiting);
            plan.preempted += 1;
            ok = grow(&mut running[i], target, pool, lim.block_size);
        }
        if !ok {
            // Nothing younger left to preempt: this one waits its turn again.
            let s = running.remove(i);
            preempt(s, pool, waiting);
            plan.preempted += 1;
            break;
        }
        fair.charge(
            running[i].share(),
            running[i].token_cost(n),
            running[i].weight(),
        );
        if lowest(&running[i]) {
            lowest_left -= 1;
        }
        plan.items.push((i, n));
        budget -= n;
        i += 1;
    }
    let mut in_run = Fair::count(running);
    while budget > 0 && running.len() < lim.max_seqs {
        let next = if lowest_left == 0 {
            // Past the cap: only others are admitted.
            let others: Vec<usize> = (0..waiting.len())
                .filter(|&k| !lowest(&waiting[k]))
                .collect();
            let j = fair.pick(others.iter().map(|&k| &waiting[k]), &in_run);
            j.map(|j| others[j])
        } else {
            fair.pick(waiting.iter(), &in_run)
        };
        let Some(next) = next else {
            break;
        };
        let s = &mut waiting[next];
        reuse(s, pool, lim.block_size);
        let mut rows = rows_left;
        let n = fit_rows(s, s.pending().min(budget), &mut rows);
        if n == 0 || !grow(s, s.computed() + n, pool, lim.block_size) {
            // Not now: what it took from the cache goes back (and stays cached).
            pool.release(s.blocks_mut());
            s.reset();
            break;
        }
        let Some(s) = waiting.remove(next) else {
            break;
        };
        fair.charge(s.share(), s.token_cost(n), s.weight());
        if lowest(&s) {
            lowest_left -= 1;
        }
        *in_run.entry(s.share().clone()).or_default() += 1;
        running.push(s);
        plan.items.push((running.len() - 1, n));
        budget -= n;
        rows_left = rows;
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Debug)]
    struct S {
        total: usize,
        computed: usize,
        blocks: Tables,
        tenant: Arc<str>,
        hashes: Vec<u64>,
        tokens: Vec<u32>,
        /// Every row's logits wanted (a prompt's log-probabilities).
        every_row: bool,
        weight: f64,
    }
    impl Tenanted for S {
        fn tenant(&self) -> &Arc<str> {
            &self.tenant
        }
        fn weight(&self) -> f64 {
            self.weight
        }
    }
    impl Schedulable for S {
        fn pending(&self) -> usize {
            self.total - self.computed
        }
        fn computed(&self) -> usize {
            self.computed
        }
        fn blocks_mut(&mut self) -> &mut Tables {
            &mut self.blocks
        }
        fn reset(&mut self) {
            self.computed = 0;
        }
        fn cache_keys(&mut self, hasher: &RandomState, block_size: usize) -> (&[u64], &[u32]) {
            self.tokens = (0..self.total as u32).collect();
            super::super::blocks::chain(
                hasher,
                &self.tenant,
                &self.tokens,
                block_size,
                &mut self.hashes,
            );
            (&self.hashes, &self.tokens)
        }
        fn skip(&mut self, n: usize, _block_size: usize) {
            self.computed = n;
        }
        fn logit_rows(&self, n: usize) -> usize {
            if self.every_row {
                n
            } else {
                usize::from(n > 0 && n == self.pending())
            }
        }
        fn reuses_prefix(&self) -> bool {
            !self.every_row
        }
    }
    fn s(total: usize) -> S {
        st(total, "a")
    }
    fn st(total: usize, tenant: &str) -> S {
        S {
            total,
            computed: 0,
            blocks: Tables::default(),
            tenant: tenant.into(),
            hashes: vec![],
            tokens: vec![],
            every_row: false,
            weight: 1.0,
        }
    }
    const L: Limits = Limits {
        max_batch_tokens: 8,
        max_seqs: 4,
        block_size: 4,
        prefix_caching: true,
        max_logit_rows: usize::MAX,
        preempt: true,
        lowest_rows: None,
        speculate: 0,
        predict: 0,
    };

    #[test]
    fn chunks_are_cut_to_the_steps_logits_rows_and_scored_prompts_skip_the_cache() {
        let mut pool = KvPools::new(100, true, None);
        let mut fair = Fair::default();
        let every = |total| S {
            every_row: true,
            weight: 1.0,
            ..s(total)
        };
        // A cached prefix that the scored prompt would otherwise take.
        let tokens: Vec<u32> = (0..8).collect();
        let mut hashes = vec![];
        super::super::blocks::chain(pool.hasher(), "a", &tokens, 4, &mut hashes);
        let mut earlier = pool.full.alloc(1).unwrap();
        let a: Arc<str> = "a".into();
        pool.full
            .register(earlier[0], hashes[0], None, &tokens[..4], &a);
        pool.full.release(&mut earlier);
        let (mut run, mut wait) = (vec![], VecDeque::from(vec![every(6), every(6), s(3)]));
        let lim = Limits {
            max_batch_tokens: 64,
            max_logit_rows: 8,
            ..L
        };
        let p = schedule(&mut run, &mut wait, &mut pool, lim, &mut fair);
        // 6 rows, then 2 of the second's (its chunk cut), then none left for the third:
        // its chunk stops short of its last row.
        assert_eq!(p.items, vec![(0, 6), (1, 2), (2, 2)]);
        assert_eq!(run[0].computed, 0, "a scored prompt computes every row");
        run[0].computed = 6;
        run[0].total = 7; // decoding: one row
        run[1].computed = 2;
        run[2].computed = 2;
        let p = schedule(&mut run, &mut wait, &mut pool, lim, &mut fair);
        assert_eq!(p.items, vec![(0, 1), (1, 4), (2, 1)]);
    }

    #[test]
    fn chunked_prefill_under_the_budget_and_decodes_first() {
        let mut pool = KvPools::new(100, true, None);
        let mut fair = Fair::default();
        let (mut run, mut wait) = (vec![], VecDeque::from(vec![s(20), s(3)]));
        let p = schedule(&mut run, &mut wait, &mut pool, L, &mut fair);
        assert_eq!(
            p.items,
            vec![(0, 8)],
            "a long prompt is chunked to the budget"
        );
        run[0].computed += 8;
        let p = schedule(&mut run, &mut wait, &mut pool, L, &mut fair);
        assert_eq!(p.items, vec![(0, 8)]);
        run[0].computed += 8;
        let p = schedule(&mut run, &mut wait, &mut pool, L, &mut fair);
        assert_eq!(
            p.items,
            vec![(0, 4), (1, 3)],
            "the rest, then a new arrival joins"
        );
        run[0].computed = 20;
        run[0].total = 21; // decoding
        run[1].computed = 3;
        run[1].total = 4;
        let p = schedule(&mut run, &mut wait, &mut pool, L, &mut fair);
        assert_eq!(p.items, vec![(0, 1), (1, 1)]);
    }

    #[test]
    fn a_new_sequence_takes_its_cached_prefix_but_computes_its_last_token() {
        let mut pool = KvPools::new(100, true, None);
        let mut fair = Fair::default();
        // An earlier sequence of tenant a filled blocks 0 and 1 with tokens 0..8.
        let mut hashes = vec![];
        let tokens: Vec<u32> = (0..8).collect();
        super::super::blocks::chain(pool.hasher(), "a", &tokens, 4, &mut hashes);
        let mut earlier = pool.full.alloc(2).unwrap();
        let a: Arc<str> = "a".into();
        pool.full
            .register(earlier[0], hashes[0], None, &tokens[..4], &a);
        pool.full
            .register(earlier[1], hashes[1], Some(hashes[0]), &tokens[4..], &a);
        let ids = earlier.clone();
        pool.full.release(&mut earlier);
        // Tokens 0..10 of tenant a: both blocks cached, 2 tokens to compute. Tokens 0..8:
        // one block, since its last token must be computed. Tenant b: nothing.
        let mut wait = VecDeque::from(vec![s(10), s(8), st(10, "b")]);
        let mut run = vec![];
        let lim = Limits {
            max_batch_tokens: 64,
            ..L
        };
        let p = schedule(&mut run, &mut wait, &mut pool, lim, &mut fair);
        // (b, less served once a's first is charged, is admitted before a's second.)
        assert_eq!(p.items, vec![(0, 2), (1, 10), (2, 4)]);
        assert_eq!(&*run[1].tenant, "b");
        assert_eq!(run[1].computed, 0, "nothing shared across tenants");
        assert_eq!((run[0].computed, run[2].computed), (8, 4));
        assert_eq!(
            run[0].blocks.full[..2],
            ids[..],
            "the cached blocks, shared"
        );
        assert_eq!(run[2].blocks.full[0], ids[0]);
    }

    #[test]
    fn preempts_the_youngest_when_blocks_run_out() {
        let mut pool = KvPools::new(3, true, None);
        let mut fair = Fair::default();
        let (mut run, mut wait) = (vec![], VecDeque::from(vec![s(4), s(4)]));
        let p = schedule(
            &mut run,
            &mut wait,
            &mut pool,
            Limits {
                max_batch_tokens: 16,
                ..L
            },
            &mut fair,
        );
        assert_eq!(p.items.len(), 2);
        for r in &mut run {
            r.computed = 4;
            r.total = 5; // next token needs a second block each: only one left
        }
        let p = schedule(&mut run, &mut wait, &mut pool, L, &mut fair);
        assert_eq!(p.items, vec![(0, 1)]);
        assert_eq!(p.preempted, 1);
        assert_eq!(run.len(), 1);
        assert_eq!(wait.len(), 1);
        assert_eq!(wait[0].computed, 0, "preempted sequences recompute");
        assert_eq!(pool.full.free_count(), 1);
    }

    #[test]
    fn with_preemption_off_a_sequence_short_of_a_block_ends_the_running_part() {
        let mut pool = KvPools::new(3, true, None);
        let mut fair = Fair::default();
        let (mut run, mut wait) = (vec![], VecDeque::from(vec![s(4), s(4)]));
        let lim = Limits {
            max_batch_tokens: 16,
            ..L
        };
        schedule(&mut run, &mut wait, &mut pool, lim, &mut fair);
        for r in &mut run {
            r.computed = 4;
            r.total = 5; // next token needs a second block each: only one left
        }
        let off = Limits {
            preempt: false,
            ..L
        };
        let p = schedule(&mut run, &mut wait, &mut pool, off, &mut fair);
        assert_eq!(p.items, vec![(0, 1)], "the first grows into the last block");
        assert_eq!((p.preempted, p.starved), (0, true));
        assert_eq!((run.len(), wait.len()), (2, 0), "nobody preempted");
        assert_eq!(run[1].blocks.full.len(), 1);
        assert_eq!(pool.full.free_count(), 0);
    }

    #[test]
    fn slots_go_to_the_least_served_tenant_and_preemption_to_the_most_served() {
        let mut pool = KvPools::new(100, true, None);
        let mut fair = Fair::default();
        let lim = Limits {
            max_batch_tokens: 64,
            max_seqs: 2,
            ..L
        };
        // Tenant a queued 4 sequences before b's 2; two slots.
        let mut wait: VecDeque<S> = (0..4).map(|_| st(8, "a")).collect();
        wait.extend((0..2).map(|_| st(8, "b")));
        let mut run = vec![];
        let p = schedule(&mut run, &mut wait, &mut pool, lim, &mut fair);
        // a and b both at counter 0: the first a, then b (fewer running) rather than a's second.
        assert_eq!(p.items, vec![(0, 8), (1, 8)]);
        let tenants: Vec<&str> = run.iter().map(|s| &*s.tenant).collect();
        assert_eq!(tenants, ["a", "b"]);
        // a's finishes; b's decode is charged first (9), so a (8) is the least served.
        let mut done = run.remove(0);
        pool.release(&mut done.blocks);
        run[0].computed = 8;
        run[0].total = 9;
        let p = schedule(&mut run, &mut wait, &mut pool, lim, &mut fair);
        assert_eq!(p.items, vec![(0, 1), (1, 8)]);
        assert_eq!(&*run[1].tenant, "a");
        assert_eq!(fair.counter("a"), 16.0);
        assert_eq!(fair.counter("b"), 9.0);

        // Blocks run out: the victim is the most served tenant's sequence after the one
        // being grown, not simply the youngest.
        let mut pool = KvPools::new(4, true, None);
        let mut fair = Fair::default();
        fair.charge(&"a".into(), 100.0, 1.0);
        let lim = Limits {
            max_batch_tokens: 64,
            max_seqs: 3,
            ..L
        };
        let mut wait: VecDeque<S> = VecDeque::from(vec![st(4, "b"), st(4, "a"), st(4, "b")]);
        let mut run = vec![];
        schedule(&mut run, &mut wait, &mut pool, lim, &mut fair);
        let tenants: Vec<&str> = run.iter().map(|s| &*s.tenant).collect();
        assert_eq!(tenants, ["b", "b", "a"], "b first (a is far ahead)");
        for r in &mut run {
            r.computed = 4;
            r.total = 5; // each needs a second block; one is free
        }
        let p = schedule(&mut run, &mut wait, &mut pool, lim, &mut fair);
        assert_eq!(p.preempted, 1);
        assert_eq!(&*wait[0].tenant, "a", "a's sequence was preempted");
        assert_eq!(p.items, vec![(0, 1), (1, 1)]);
    }

    /// Lowest-weight work (a tenant's batch) beside interactive work: at most
    /// `lowest_rows` of it in a step, the rest keeping their blocks; alone, all of it.
    #[test]
    fn lowest_weight_rows_are_capped_only_beside_interactive_ones() {
        let low = |total: usize| S {
            weight: crate::worker::LOWEST_WEIGHT,
            ..st(total, "a")
        };
        let mut pool = KvPools::new(100, true, None);
        let mut fair = Fair::default();
        let lim = Limits {
            max_batch_tokens: 64,
            max_seqs: 8,
            lowest_rows: Some(2),
            ..L
        };
        // Alone: every batch sequence is admitted and runs.
        let mut wait: VecDeque<S> = (0..4).map(|_| low(4)).collect();
        let mut run = vec![];
        let p = schedule(&mut run, &mut wait, &mut pool, lim, &mut fair);
        assert_eq!(p.items.len(), 4);
        for r in &mut run {
            r.computed = 4;
            r.total = 5;
        }
        // An interactive request arrives: it is admitted, and two batch rows run beside it;
        // the other two keep their blocks for a later step.
        wait.push_back(st(4, "a"));
        let held: Vec<usize> = run.iter().map(|r| r.blocks.full.len()).collect();
        let p = schedule(&mut run, &mut wait, &mut pool, lim, &mut fair);
        assert_eq!(p.items, vec![(0, 1), (1, 1), (4, 4)]);
        assert_eq!(p.held, 2);
        let kept: Vec<usize> = run[2..4].iter().map(|r| r.blocks.full.len()).collect();
        assert_eq!(kept, held[2..4], "the held ones keep their blocks");
        // More batch work waiting is not admitted past the cap while the interactive one
        // runs; an interactive one behind it is.
        for r in &mut run[..2] {
            r.computed = 5;
            r.total = 6;
        }
        run[4].computed = 4;
        run[4].total = 5;
        wait.push_back(low(4));
        wait.push_back(st(4, "b"));
        let p = schedule(&mut run, &mut wait, &mut pool, lim, &mut fair);
        assert_eq!(p.items, vec![(0, 1), (1, 1), (4, 1), (5, 4)]);
        assert_eq!(&*run[5].tenant, "b");
        assert_eq!(wait.len(), 1, "the batch sequence still waits");
        // No cap: every row runs.
        for r in &mut run {
            r.computed = r.total;
            r.total += 1;
        }
        let all = Limits {
            lowest_rows: None,
            ..lim
        };
        let p = schedule(&mut run, &mut wait, &mut pool, all, &mut fair);
        assert_eq!(p.items.len(), 7);

        // Held back for nothing: an interactive request waits for blocks the batch holds
        // (cap 0): the batch runs, and frees them as it ends.
        let mut pool = KvPools::new(2, true, None);
        let mut fair = Fair::default();
        let none = Limits {
            lowest_rows: Some(0),
            ..lim
        };
        let mut wait: VecDeque<S> = VecDeque::from(vec![low(6)]);
        let mut run = vec![];
        let p = schedule(&mut run, &mut wait, &mut pool, none, &mut fair);
        assert_eq!(p.items, [(0, 6)]);
        wait.push_back(st(4, "a"));
        run[0].computed = 6;
        run[0].total = 7;
        let p = schedule(&mut run, &mut wait, &mut pool, none, &mut fair);
        assert_eq!(p.items, [(0, 1)], "{p:?}");
        assert_eq!(wait.len(), 1);
    }
}
