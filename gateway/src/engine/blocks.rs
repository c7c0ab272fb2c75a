//! KV block bookkeeping, with prefix caching: which blocks are free, how many sequences
//! hold each, and which full blocks hold the keys and values of a known token prefix.
//! Which sequence holds which block is recorded in the sequence's block table; this pool
//! hands blocks out, takes them back, and finds cached ones.
//!
//! **Prefix caching.** A block that a sequence has filled (all its positions computed)
//! is registered under its content hash: a hash chained over every token from the start
//! of the sequence to the block's end, seeded by the tenant ([`chain`]). A later sequence
//! whose prompt starts with the same blocks' worth of tokens takes those blocks instead of
//! computing them again (vLLM's automatic prefix caching). A full block is never written
//! again, so sequences share it safely. When the last holder lets go of a cached block it
//! stays cached but idle, and is handed out for new work only when no plain free block
//! is left, least recently used first (its hash forgotten then).
//!
//! Tenants never share cached blocks: the hash chain starts from the tenant, so one
//! tenant cannot learn from another's time to first token which prompts it sent.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};

pub struct BlockPool {
    /// Blocks with nothing worth keeping, handed out first.
    free: Vec<u32>,
    /// Per block: how many sequences hold it.
    refs: Vec<u32>,
    /// Per block: its content hash, while it is cached.
    hash: Vec<Option<u64>>,
    /// Cached blocks by content hash.
    by_hash: HashMap<u64, u32>,
    /// Cached blocks nobody holds, by when they were let go (oldest first).
    idle: BTreeMap<u64, u32>,
    /// Per block: its key in `idle`, while it is there.
    idle_at: Vec<u64>,
    tick: u64,
    /// Keys the content hashes (per process: the hashes cannot be predicted from outside).
    hasher: RandomState,
    caching: bool,
}

/// The content hashes of `tokens`' full blocks, continuing `hashes` (those of its first
/// blocks, already known): each one hashes the previous one (or the tenant, for the
/// first) and the block's tokens.
pub fn chain(
    hasher: &RandomState,
    tenant: &str,
    tokens: &[u32],
    block_size: usize,
    hashes: &mut Vec<u64>,
) {
    let full = tokens.len() / block_size;
    while hashes.len() < full {
        let b = hashes.len();
        let prev = match b {
            0 => hasher.hash_one(tenant),
            _ => hashes[b - 1],
        };
        let block = &tokens[b * block_size..(b + 1) * block_size];
        hashes.push(hasher.hash_one((prev, block)));
    }
}

impl BlockPool {
    /// A pool of `total` blocks; `caching` turns prefix caching on.
    pub fn new(total: usize, caching: bool) -> Self {
        Self {
            // Pop from the end: low block ids first.
            free: (0..total as u32).rev().collect(),
            refs: vec![0; total],
            hash: vec![None; total],
            by_hash: HashMap::new(),
            idle: BTreeMap::new(),
            idle_at: vec![0; total],
            tick: 0,
            hasher: RandomState::new(),
            caching,
        }
    }

    /// What keys this pool's content hashes (for [`chain`]).
    pub fn hasher(&self) -> &RandomState {
        &self.hasher
    }

    /// Blocks that can be handed out: free ones, and cached ones nobody holds.
    pub fn free_count(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Cached blocks (held or idle).
    pub fn cached_count(&self) -> usize {
        self.by_hash.len()
    }

    /// Takes `n` blocks, or none if fewer can be handed out: free ones first, then the
    /// least recently used idle cached ones.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free_count() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let b = match self.free.pop() {
                Some(b) => b,
                None => {
                    let (_, b) = self.idle.pop_first()?;
                    if let Some(h) = self.hash[b as usize].take() {
                        self.by_hash.remove(&h);
                    }
                    b
                }
            };
            self.refs[b as usize] = 1;
            out.push(b);
        }
        Some(out)
    }

    /// Lets go of `blocks` (emptying the vector): a block nobody holds any more becomes
    /// free, or idle if it is cached.
    pub fn release(&mut self, blocks: &mut Vec<u32>) {
        // Last blocks first: a sequence's tail goes before its prefix, so that the prefix,
        // which other prompts are likelier to share, is evicted last.
        for b in blocks.drain(..).rev() {
            let i = b as usize;
            self.refs[i] = self.refs[i].saturating_sub(1);
            if self.refs[i] > 0 {
                continue;
            }
            if self.hash[i].is_some() {
                self.tick += 1;
                self.idle_at[i] = self.tick;
                self.idle.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// The cached blocks that hold the longest prefix of `hashes` (a sequence's first
    /// blocks), each now also held by the caller.
    pub fn lookup(&mut self, hashes: &[u64]) -> Vec<u32> {
        let mut out = Vec::new();
        if !self.caching {
            return out;
        }
        for h in hashes {
            let Some(&b) = self.by_hash.get(h) else {
                break;
            };
            let i = b as usize;
            if self.refs[i] == 0 {
                self.idle.remove(&self.idle_at[i]);
            }
            self.refs[i] += 1;
            out.push(b);
        }
        out
    }

    /// Records that `block` (held by the caller, every position computed) holds the
    /// prefix whose hash is `hash`. Where another block already holds that prefix (two
    /// sequences computed it side by side), that one stays the cached one.
    pub fn register(&mut self, block: u32, hash: u64) {
        let i = block as usize;
        if !self.caching || self.hash[i].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.hash[i] = Some(hash);
        self.by_hash.insert(hash, block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_release_conserves_blocks() {
        let mut p = BlockPool::new(8, true);
        let mut a = p.alloc(5).unwrap();
        assert!(p.alloc(4).is_none());
        let mut b = p.alloc(3).unwrap();
        assert_eq!(p.free_count(), 0);
        p.release(&mut a);
        p.release(&mut b);
        assert_eq!(p.free_count(), 8);
        let mut all = p.alloc(8).unwrap();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn the_hash_chain_covers_the_whole_prefix_and_the_tenant() {
        let h = RandomState::new();
        let (mut a, mut b, mut c, mut d) = (vec![], vec![], vec![], vec![]);
        chain(&h, "t", &[1, 2, 3, 4, 5, 6, 7], 2, &mut a);
        assert_eq!(a.len(), 3, "full blocks only");
        // Same second block after a different first one: another hash.
        chain(&h, "t", &[9, 2, 3, 4], 2, &mut b);
        assert_eq!(b.len(), 2);
        assert_ne!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        // Another tenant, same tokens: nothing shared.
        chain(&h, "u", &[1, 2, 3, 4], 2, &mut c);
        assert!(c.iter().all(|x| !a.contains(x)));
        // Extending a chain gives what hashing the longer sequence at once gives.
        chain(&h, "t", &[1, 2, 3, 4], 2, &mut d);
        chain(&h, "t", &[1, 2, 3, 4, 5, 6, 7, 8], 2, &mut d);
        assert_eq!(&d[..3], &a[..]);
        assert_eq!(d.len(), 4);
    }

    #[test]
    fn cached_blocks_are_shared_kept_while_idle_and_evicted_oldest_first() {
        let mut p = BlockPool::new(4, true);
        let mut a = p.alloc(3).unwrap();
        p.register(a[0], 10);
        p.register(a[1], 11);
        // A second sequence with the same first two blocks shares them.
        let mut b = p.lookup(&[10, 11, 12]);
        assert_eq!(b, a[..2]);
        assert_eq!(p.free_count(), 1);
        // a lets go: its uncached block is free, its cached ones stay held by b.
        p.release(&mut a);
        assert_eq!(p.free_count(), 2);
        // b lets go too: both cached blocks idle, still found.
        p.release(&mut b);
        assert_eq!(p.free_count(), 4);
        assert_eq!(p.cached_count(), 2);
        let mut c = p.lookup(&[10]);
        assert_eq!(c.len(), 1);
        p.release(&mut c);
        // Plain free blocks go first; then idle cached ones, least recently used first:
        // block of hash 11 (let go before 10 was looked up and let go again).
        let mut d = p.alloc(3).unwrap();
        assert_eq!(p.cached_count(), 1);
        assert!(p.lookup(&[11]).is_empty(), "11 was evicted");
        let mut e = p.lookup(&[10]);
        assert_eq!(e.len(), 1, "10 is still cached");
        assert!(p.alloc(1).is_none());
        p.release(&mut d);
        p.release(&mut e);
        assert_eq!(p.free_count(), 4);
    }

    #[test]
    fn a_prefix_computed_twice_keeps_one_cached_copy_and_caching_can_be_off() {
        let mut p = BlockPool::new(4, true);
        let mut a = p.alloc(2).unwrap();
        p.register(a[0], 7);
        p.register(a[1], 7);
        assert_eq!(p.cached_count(), 1);
        p.release(&mut a);
        assert_eq!(p.lookup(&[7]).len(), 1);
        let mut off = BlockPool::new(4, false);
        let b = off.alloc(1).unwrap();
        off.register(b[0], 7);
        assert!(off.lookup(&[7]).is_empty());
        assert_eq!(off.cached_count(), 0);
    }
}
