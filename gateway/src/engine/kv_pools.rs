//! The engine's KV block pools: the model's layers' blocks ([`BlockPool`]) and, where the
//! backend gives a model's windowed layers blocks of their own
//! ([`kernels::backend::Backend::kv_window_blocks`]: Gemma 2 and 3, Phi-3-mini-4k, on the
//! CPU and the GPU), those layers' pool. A sequence holds a block table in each
//! ([`Tables`]).
//!
//! A windowed layer's row at position `p` reads positions `p − window + 1 ..= p` only, so
//! a sequence's windowed blocks wholly before its next row's window go back to their pool
//! as it moves on ([`KvPools::grow`]): the pool needs each running sequence's window, not
//! its whole context (vLLM's sliding-window manager, llama.cpp's SWA cache). Such a block
//! that was full joins the prefix cache as the other layers' blocks do, under the same
//! content hash and tied to the other pool's cached block at the same place; a prompt's
//! cached prefix is taken only as far as the windowed blocks its next row reads are
//! cached too ([`KvPools::lookup`]).

use super::blocks::BlockPool;
use kernels::backend::Backend;
use kernels::kv::first_window_block;
use std::hash::RandomState;
use std::sync::Arc;

/// A window table's entry for a block let go (before the sequence's window).
pub const NO_BLOCK: u32 = u32::MAX;

/// A sequence's block tables: its blocks for the model's layers (its whole context), and,
/// where the windowed layers have a pool of their own, its blocks there (entries before
/// its window [`NO_BLOCK`]; empty where there is no such pool).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    pub full: Vec<u32>,
    pub window: Vec<u32>,
}

impl Tables {
    /// Whether it holds no block.
    pub fn is_empty(&self) -> bool {
        self.full.is_empty() && self.window.iter().all(|&b| b == NO_BLOCK)
    }
}

/// The windowed layers' own pool, and their window (in positions).
struct Window {
    pool: BlockPool,
    size: usize,
}

pub struct KvPools {
    pub full: BlockPool,
    window: Option<Window>,
}

impl KvPools {
    /// Pools for `backend`'s cache: its blocks, and its windowed layers' own where it has
    /// them; `caching` turns prefix caching on.
    pub fn for_backend(backend: &dyn Backend, caching: bool) -> Self {
        let window = backend
            .kv_window_blocks()
            .zip(backend.config().window_size());
        Self::new(backend.kv_geometry().1, caching, window)
    }

    /// `full` blocks, and where `window` is given (`(blocks, window)`) a pool of that many
    /// blocks for windowed layers that see `window` positions.
    pub fn new(full: usize, caching: bool, window: Option<(usize, usize)>) -> Self {
        Self {
            full: BlockPool::new(full, caching),
            window: window.map(|(blocks, size)| Window {
                pool: BlockPool::new(blocks, caching),
                size,
            }),
        }
    }

    pub fn caching(&self) -> bool {
        self.full.caching()
    }

    pub fn hasher(&self) -> &RandomState {
        self.full.hasher()
    }

    /// The windowed layers' pool: its blocks in use (held, or cached and idle ones not
    /// counted) and in all, where it has one.
    pub fn window_use(&self) -> Option<(usize, usize)> {
        let w = &self.window.as_ref()?.pool;
        Some((w.total() - w.free_count(), w.total()))
    }

    /// Gives `t` blocks for positions up to `tokens` (exclusive) in each pool, if both
    /// have them (else takes none), for rows from position `from`; its windowed blocks
    /// before the window of the row at `from` go back first. (A step still in flight may
    /// read those: a GPU runs its steps in order on one stream, so the step that writes
    /// them again for another sequence runs after it. One let go before the step that
    /// filled it was collected is not registered in the prefix cache: its entry is
    /// [`NO_BLOCK`] by then.)
    pub fn grow(&mut self, t: &mut Tables, from: usize, tokens: usize, bs: usize) -> bool {
        let blocks = tokens.div_ceil(bs);
        let need = blocks.saturating_sub(t.full.len());
        let Some(w) = &mut self.window else {
            return match self.full.alloc(need) {
                Some(mut b) => {
                    t.full.append(&mut b);
                    true
                }
                None => need == 0,
            };
        };
        let lo = first_window_block(w.size, from, bs).min(t.window.len());
        let mut gone: Vec<u32> = t.window[..lo]
            .iter_mut()
            .filter(|b| **b != NO_BLOCK)
            .map(|b| std::mem::replace(b, NO_BLOCK))
            .collect();
        w.pool.release(&mut gone);
        let need_w = blocks.saturating_sub(t.window.len());
        if need > self.full.free_count() || need_w > w.pool.free_count() {
            return false;
        }
        if let (Some(mut f), Some(mut b)) = (self.full.alloc(need), w.pool.alloc(need_w)) {
            t.full.append(&mut f);
            t.window.append(&mut b);
        }
        true
    }

    /// Lets go of every block of `t` (emptying it).
    pub fn release(&mut self, t: &mut Tables) {
        self.full.release(&mut t.full);
        if let Some(w) = &mut self.window {
            t.window.retain(|&b| b != NO_BLOCK);
            w.pool.release(&mut t.window);
        }
        t.window.clear();
    }

    /// The tables of the longest cached prefix of `hashes` (the content hashes of
    /// `tenant`'s `tokens`' first blocks), its blocks now also held by the caller: the
    /// other layers' blocks as [`BlockPool::lookup`] finds them, cut to where the windowed
    /// layers' blocks that the next row reads are cached too.
    pub fn lookup(&mut self, hashes: &[u64], tokens: &[u32], tenant: &str, bs: usize) -> Tables {
        let mut found = self.full.lookup(hashes, tokens, tenant, bs);
        let Some(w) = &mut self.window else {
            return Tables {
                full: found,
                window: Vec::new(),
            };
        };
        // Each place's windowed block, where cached as the twin of the block found there.
        let twins: Vec<Option<u32>> = found
            .iter()
            .enumerate()
            .map(|(k, &b)| {
                let twin = self.full.cached(hashes[k]).filter(|&(c, _)| c == b)?;
                w.pool
                    .find_twin(hashes[k], &tokens[k * bs..(k + 1) * bs], twin)
            })
            .collect();
        let mut n = found.len();
        while n > 0 {
            let lo = first_window_block(w.size, n * bs, bs);
            if twins[lo..n].iter().all(Option::is_some) {
                break;
            }
            n -= 1;
        }
        let mut rest = found.split_off(n);
        self.full.release(&mut rest);
        let lo = first_window_block(w.size, n * bs, bs).min(n);
        let mut window = vec![NO_BLOCK; lo];
        for &b in twins[lo..n].iter().flatten() {
            w.pool.hold(b);
            window.push(b);
        }
        Tables {
            full: found,
            window,
        }
    }

    /// Records that block `k` of `t` (every position computed) holds `tokens` after the
    /// prefix whose last block's hash is `after` (none: a sequence's first block), under
    /// `hash` ([`BlockPool::register`]); its windowed block too, where it still holds one.
    pub fn register(
        &mut self,
        t: &Tables,
        k: usize,
        hash: u64,
        after: Option<u64>,
        tokens: &[u32],
        tenant: &Arc<str>,
    ) {
        self.full.register(t.full[k], hash, after, tokens, tenant);
        let Some(w) = &mut self.window else {
            return;
        };
        let (Some(&b), Some(twin)) = (t.window.get(k), self.full.cached(hash)) else {
            return;
        };
        if b != NO_BLOCK {
            w.pool.register_twin(b, hash, tokens, twin);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::blocks::chain;

    /// A prompt of `n` tokens of `tenant`, and its content hashes (blocks of 2).
    fn prompt(p: &KvPools, tenant: &str, n: u32) -> (Vec<u32>, Vec<u64>) {
        let tokens: Vec<u32> = (0..n).collect();
        let mut hashes = vec![];
        chain(p.hasher(), tenant, &tokens, 2, &mut hashes);
        (tokens, hashes)
    }

    #[test]
    fn windowed_blocks_before_the_window_go_back_as_a_sequence_moves_on() {
        // Blocks of 2, a window of 3: the row at position p reads p − 2 ..= p.
        let mut p = KvPools::new(20, false, Some((4, 3)));
        let mut t = Tables::default();
        assert!(p.grow(&mut t, 0, 7, 2), "a prompt of 7");
        assert_eq!((t.full.len(), t.window.len()), (4, 4));
        assert_eq!(p.window_use(), Some((4, 4)));
        // The row at 7 reads 5 ..= 7: blocks 2 and 3 of the window table.
        assert!(p.grow(&mut t, 7, 8, 2));
        assert_eq!(t.window[..2], [NO_BLOCK, NO_BLOCK]);
        assert_eq!(p.window_use(), Some((2, 4)));
        // At 8 (reads 6 ..= 8): block 2 goes back too, and block 4 comes from those let
        // go.
        assert!(p.grow(&mut t, 8, 9, 2));
        assert_eq!(t.window.len(), 5);
        assert_eq!(t.window[..3], [NO_BLOCK; 3]);
        assert_eq!(p.window_use(), Some((2, 4)));
        // A pool short of blocks says no, and takes none from either pool.
        let mut u = Tables::default();
        assert!(!p.grow(&mut u, 0, 6, 2));
        assert!(u.is_empty());
        assert_eq!(p.full.free_count(), 15);
        p.release(&mut t);
        assert!(t.is_empty());
        assert_eq!(p.window_use(), Some((0, 4)));
        assert_eq!(p.full.free_count(), 20);
        // Without a window pool, only the full one.
        let mut q = KvPools::new(3, false, None);
        assert!(q.grow(&mut u, 0, 6, 2));
        assert_eq!((u.full.len(), u.window.len()), (3, 0));
        assert!(!q.grow(&mut u, 6, 7, 2));
        assert_eq!(q.window_use(), None);
    }

    #[test]
    fn a_cached_prefix_is_taken_as_far_as_its_windowed_blocks_are_cached() {
        let tenant: Arc<str> = "a".into();
        // Blocks of 2, a window of 3.
        let mut p = KvPools::new(20, true, Some((8, 3)));
        let (tokens, hashes) = prompt(&p, "a", 12);
        // A first sequence computes 12 tokens, letting go of its windowed blocks as it
        // goes (trimmed before its row at 10: blocks 0..4 go back, cached).
        let mut t = Tables::default();
        assert!(p.grow(&mut t, 0, 10, 2));
        for k in 0..5usize {
            let after = k.checked_sub(1).map(|j| hashes[j]);
            p.register(&t, k, hashes[k], after, &tokens[2 * k..2 * k + 2], &tenant);
        }
        assert!(p.grow(&mut t, 10, 12, 2));
        assert_eq!(t.window[..4], [NO_BLOCK; 4]);
        p.register(&t, 5, hashes[5], Some(hashes[4]), &tokens[10..], &tenant);
        p.release(&mut t);
        // All 6 blocks are cached in both pools: a prompt of the same 12 tokens and more
        // takes the whole prefix, its window table from the block its next row reads.
        let hit = p.lookup(&hashes, &tokens, "a", 2);
        assert_eq!(hit.full.len(), 6);
        assert_eq!(hit.window.len(), 6);
        assert_eq!(hit.window[..5], [NO_BLOCK; 5], "row 12 reads 10 ..= 12");
        assert_ne!(hit.window[5], NO_BLOCK);
        let mut hit = hit;
        p.release(&mut hit);
        // Its windowed blocks evicted (a pool's worth taken by another sequence), the
        // prefix is taken only up to where they are still cached: none here.
        let mut other = Tables::default();
        assert!(p.grow(&mut other, 0, 16, 2));
        let miss = p.lookup(&hashes, &tokens, "a", 2);
        assert!(miss.is_empty(), "{miss:?}");
        assert_eq!(
            p.full.free_count(),
            20 - 8,
            "the full blocks found went back"
        );
        p.release(&mut other);
        // Another tenant never finds them.
        let (t2, h2) = prompt(&p, "b", 12);
        assert!(p.lookup(&h2, &t2, "b", 2).is_empty());
    }
}
