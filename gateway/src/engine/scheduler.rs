//! The continuous-batching policy: which sequences run in the next step, and how many
//! tokens each, under a per-step token budget (chunked prefill) and the KV blocks free.
//!
//! Order of service each step: running sequences in admission order (a decode costs one
//! token, a prefill in progress takes a chunk of what budget is left), then waiting
//! sequences are admitted while budget, sequence slots and blocks allow. When a running
//! sequence needs a block and none is free, the most recently admitted sequence is
//! preempted: its blocks are freed and it goes back to the head of the queue, to be
//! recomputed later (its generated tokens become part of its prefill).

use super::blocks::BlockPool;
use std::collections::VecDeque;

/// What the scheduler needs to know of a sequence.
pub trait Schedulable {
    /// Tokens whose keys and values are not yet in the cache.
    fn pending(&self) -> usize;
    /// Tokens already in the cache.
    fn computed(&self) -> usize;
    fn blocks_mut(&mut self) -> &mut Vec<u32>;
    /// Forget the cache (after preemption): everything is pending again.
    fn reset(&mut self);
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_batch_tokens: usize,
    pub max_seqs: usize,
    pub block_size: usize,
}

/// The step's plan: `(index in running, tokens to compute)`, and how many sequences were
/// preempted while making it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub items: Vec<(usize, usize)>,
    pub preempted: usize,
}

fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// Gives `s` enough blocks to hold `tokens` positions, if the pool has them.
fn grow<S: Schedulable>(s: &mut S, tokens: usize, pool: &mut BlockPool, bs: usize) -> bool {
    let need = blocks_for(tokens, bs).saturating_sub(s.blocks_mut().len());
    if need == 0 {
        return true;
    }
    match pool.alloc(need) {
        Some(mut b) => {
            s.blocks_mut().append(&mut b);
            true
        }
        None => false,
    }
}

fn preempt<S: Schedulable>(mut s: S, pool: &mut BlockPool, waiting: &mut VecDeque<S>) {
    pool.release(s.blocks_mut());
    s.reset();
    waiting.push_front(s);
}

pub fn schedule<S: Schedulable>(
    running: &mut Vec<S>,
    waiting: &mut VecDeque<S>,
    pool: &mut BlockPool,
    lim: Limits,
) -> Plan {
    let mut plan = Plan::default();
    let mut budget = lim.max_batch_tokens;
    let mut i = 0;
    while i < running.len() && budget > 0 {
        let n = running[i].pending().min(budget);
        let target = running[i].computed() + n;
        let mut ok = grow(&mut running[i], target, pool, lim.block_size);
        while !ok && running.len() > i + 1 {
            let victim = running.pop().expect("len > i + 1");
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
        plan.items.push((i, n));
        budget -= n;
        i += 1;
    }
    while budget > 0 && running.len() < lim.max_seqs {
        let Some(front) = waiting.front_mut() else {
            break;
        };
        let n = front.pending().min(budget);
        if !grow(front, front.computed() + n, pool, lim.block_size) {
            break;
        }
        let s = waiting.pop_front().expect("front exists");
        running.push(s);
        plan.items.push((running.len() - 1, n));
        budget -= n;
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct S {
        total: usize,
        computed: usize,
        blocks: Vec<u32>,
    }
    impl Schedulable for S {
        fn pending(&self) -> usize {
            self.total - self.computed
        }
        fn computed(&self) -> usize {
            self.computed
        }
        fn blocks_mut(&mut self) -> &mut Vec<u32> {
            &mut self.blocks
        }
        fn reset(&mut self) {
            self.computed = 0;
        }
    }
    fn s(total: usize) -> S {
        S {
            total,
            computed: 0,
            blocks: vec![],
        }
    }
    const L: Limits = Limits {
        max_batch_tokens: 8,
        max_seqs: 4,
        block_size: 4,
    };

    #[test]
    fn chunked_prefill_under_the_budget_and_decodes_first() {
        let mut pool = BlockPool::new(100);
        let (mut run, mut wait) = (vec![], VecDeque::from(vec![s(20), s(3)]));
        let p = schedule(&mut run, &mut wait, &mut pool, L);
        assert_eq!(
            p.items,
            vec![(0, 8)],
            "a long prompt is chunked to the budget"
        );
        run[0].computed += 8;
        let p = schedule(&mut run, &mut wait, &mut pool, L);
        assert_eq!(p.items, vec![(0, 8)]);
        run[0].computed += 8;
        let p = schedule(&mut run, &mut wait, &mut pool, L);
        assert_eq!(
            p.items,
            vec![(0, 4), (1, 3)],
            "the rest, then a new arrival joins"
        );
        run[0].computed = 20;
        run[0].total = 21; // decoding
        run[1].computed = 3;
        run[1].total = 4;
        let p = schedule(&mut run, &mut wait, &mut pool, L);
        assert_eq!(p.items, vec![(0, 1), (1, 1)]);
    }

    #[test]
    fn preempts_the_youngest_when_blocks_run_out() {
        let mut pool = BlockPool::new(3);
        let (mut run, mut wait) = (vec![], VecDeque::from(vec![s(4), s(4)]));
        let p = schedule(
            &mut run,
            &mut wait,
            &mut pool,
            Limits {
                max_batch_tokens: 16,
                ..L
            },
        );
        assert_eq!(p.items.len(), 2);
        for r in &mut run {
            r.computed = 4;
            r.total = 5; // next token needs a second block each: only one left
        }
        let p = schedule(&mut run, &mut wait, &mut pool, L);
        assert_eq!(p.items, vec![(0, 1)]);
        assert_eq!(p.preempted, 1);
        assert_eq!(run.len(), 1);
        assert_eq!(wait.len(), 1);
        assert_eq!(wait[0].computed, 0, "preempted sequences recompute");
        assert_eq!(pool.free_count(), 1);
    }
}
