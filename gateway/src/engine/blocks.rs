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
//!
//! A hit does not rest on the hash alone: each cached block also keeps its tokens and its
//! link to the cached block before it (that block's id and registration count, so a link
//! to a block since evicted and reused is seen as broken; the first block keeps its
//! tenant). [`BlockPool::lookup`] checks every link and every token, so a hash collision
//! costs a miss, never another prompt's keys and values.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

/// What a cached block holds, checked on every hit.
struct Content {
    /// The tenant, for a sequence's first block; else the cached block before it and its
    /// registration count then.
    link: Link,
    tokens: Box<[u32]>,
}

enum Link {
    First(Arc<str>),
    After {
        block: u32,
        generation: u64,
    },
    /// A windowed layers' block ([`super::kv_pools`]): the other layers' cached block at
    /// the same place of the same prefix, and its registration count then.
    Twin {
        block: u32,
        generation: u64,
    },
}

pub struct BlockPool {
    /// Blocks with nothing worth keeping, handed out first.
    free: Vec<u32>,
    /// Per block: how many sequences hold it.
    refs: Vec<u32>,
    /// Per block: its content hash, while it is cached.
    hash: Vec<Option<u64>>,
    /// Per block: what it holds, while it is cached.
    content: Vec<Option<Content>>,
    /// Per block: how many times it was registered (links name the registration).
    generation: Vec<u64>,
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
            content: (0..total).map(|_| None).collect(),
            generation: vec![0; total],
            by_hash: HashMap::new(),
            idle: BTreeMap::new(),
            idle_at: vec![0; total],
            tick: 0,
            hasher: RandomState::new(),
            caching,
        }
    }

    /// Whether prefix caching is on.
    pub fn caching(&self) -> bool {
        self.caching
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
                    self.content[b as usize] = None;
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

    /// The cached blocks that hold the longest prefix of `hashes` (the content hashes of
    /// the first blocks of `tenant`'s `tokens`, `block_size` tokens each), each checked
    /// against those tokens and now also held by the caller.
    pub fn lookup(
        &mut self,
        hashes: &[u64],
        tokens: &[u32],
        tenant: &str,
        block_size: usize,
    ) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        if !self.caching {
            return out;
        }
        for (k, h) in hashes.iter().enumerate() {
            let Some(&b) = self.by_hash.get(h) else {
                break;
            };
            let i = b as usize;
            let want = tokens.get(k * block_size..(k + 1) * block_size);
            let holds = self.content[i].as_ref().is_some_and(|c| {
                Some(&*c.tokens) == want
                    && match &c.link {
                        Link::First(t) => k == 0 && **t == *tenant,
                        Link::After { block, generation } => {
                            out.last() == Some(block)
                                && self.generation[*block as usize] == *generation
                        }
                        Link::Twin { .. } => false,
                    }
            });
            if !holds {
                break;
            }
            if self.refs[i] == 0 {
                self.idle.remove(&self.idle_at[i]);
            }
            self.refs[i] += 1;
            out.push(b);
        }
        out
    }

    /// Records that `block` (held by the caller, every position computed) holds `tokens`
    /// after the prefix whose last block's hash is `after` (none: the first block of a
    /// sequence of `tenant`), under the content hash `hash`. Where another block already
    /// holds that prefix (two sequences computed it side by side), that one stays the
    /// cached one; a block whose prefix is not cached is not cached either (no lookup
    /// could reach it).
    pub fn register(
        &mut self,
        block: u32,
        hash: u64,
        after: Option<u64>,
        tokens: &[u32],
        tenant: &Arc<str>,
    ) {
        let i = block as usize;
        if !self.caching || self.hash[i].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        let link = match after {
            None => Link::First(tenant.clone()),
            Some(prev) => match self.by_hash.get(&prev) {
                Some(&p) => Link::After {
                    block: p,
                    generation: self.generation[p as usize],
                },
                None => return,
            },
        };
        self.generation[i] += 1;
        self.content[i] = Some(Content {
            link,
            tokens: tokens.into(),
        });
        self.hash[i] = Some(hash);
        self.by_hash.insert(hash, block);
    }
}

/// The windowed layers' pool's side of prefix caching ([`super::kv_pools`]): its blocks
/// are cached by the same content hashes, each tied to the other layers' cached block at
/// the same place (its twin), since the blocks before a window are let go.
impl BlockPool {
    /// The cached block under `hash` and its registration count.
    pub fn cached(&self, hash: u64) -> Option<(u32, u64)> {
        let &b = self.by_hash.get(&hash)?;
        Some((b, self.generation[b as usize]))
    }

    /// The cached block under `hash` that holds `tokens` and was registered as the twin of
    /// `twin` (a block of the other pool and its registration count), if any.
    pub fn find_twin(&self, hash: u64, tokens: &[u32], twin: (u32, u64)) -> Option<u32> {
        let &b = self.by_hash.get(&hash)?;
        let c = self.content[b as usize].as_ref()?;
        let tied =
            matches!(c.link, Link::Twin { block, generation } if (block, generation) == twin);
        (tied && *c.tokens == *tokens).then_some(b)
    }

    /// Holds cached block `b` for one more sequence.
    pub fn hold(&mut self, b: u32) {
        let i = b as usize;
        if self.refs[i] == 0 {
            self.idle.remove(&self.idle_at[i]);
        }
        self.refs[i] += 1;
    }

    /// Records that `block` (held by the caller, every position computed) holds `tokens`
    /// at the place of `twin` (the other pool's cached block there, and its registration
    /// count), under the content hash `hash`; where another block already has that hash,
    /// that one stays the cached one.
    pub fn register_twin(&mut self, block: u32, hash: u64, tokens: &[u32], twin: (u32, u64)) {
        let i = block as usize;
        if !self.caching || self.hash[i].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.generation[i] += 1;
        self.content[i] = Some(Content {
            link: Link::Twin {
                block: twin.0,
                generation: twin.1,
            },
            tokens: tokens.into(),
        });
        self.hash[i] = Some(hash);
        self.by_hash.insert(hash, block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Registers `blocks` as holding `tenant`'s `tokens` (2 per block) in order; returns
    /// the chain.
    fn fill(p: &mut BlockPool, blocks: &[u32], tenant: &str, tokens: &[u32]) -> Vec<u64> {
        let t: Arc<str> = tenant.into();
        let mut hashes = vec![];
        chain(p.hasher(), tenant, tokens, 2, &mut hashes);
        for (k, &b) in blocks.iter().enumerate() {
            let after = k.checked_sub(1).map(|j| hashes[j]);
            p.register(b, hashes[k], after, &tokens[2 * k..2 * k + 2], &t);
        }
        hashes
    }

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
        let toks = [1, 2, 3, 4, 5, 6];
        let mut a = p.alloc(3).unwrap();
        let h = fill(&mut p, &a[..2], "t", &toks[..4]);
        // A second sequence with the same first two blocks shares them.
        let mut b = p.lookup(&h, &toks, "t", 2);
        assert_eq!(b, a[..2]);
        assert_eq!(p.free_count(), 1);
        // a lets go: its uncached block is free, its cached ones stay held by b.
        p.release(&mut a);
        assert_eq!(p.free_count(), 2);
        // b lets go too: both cached blocks idle, still found.
        p.release(&mut b);
        assert_eq!(p.free_count(), 4);
        assert_eq!(p.cached_count(), 2);
        let mut c = p.lookup(&h[..1], &toks, "t", 2);
        assert_eq!(c.len(), 1);
        p.release(&mut c);
        // Plain free blocks go first; then idle cached ones, least recently used first:
        // the second block (let go before the first was looked up and let go again).
        let mut d = p.alloc(3).unwrap();
        assert_eq!(p.cached_count(), 1);
        let mut e = p.lookup(&h, &toks, "t", 2);
        assert_eq!(
            e.len(),
            1,
            "the first block is still cached, the second is not"
        );
        assert!(p.alloc(1).is_none());
        p.release(&mut d);
        p.release(&mut e);
        assert_eq!(p.free_count(), 4);
    }

    #[test]
    fn a_hit_is_checked_token_by_token_and_link_by_link() {
        let mut p = BlockPool::new(8, true);
        let toks = [1, 2, 3, 4];
        let a = p.alloc(2).unwrap();
        let h = fill(&mut p, &a, "t", &toks);
        // A colliding hash (as if another prompt hashed alike): its tokens differ, a miss.
        assert_eq!(p.lookup(&h, &[1, 2, 9, 9], "t", 2), a[..1]);
        assert!(p.lookup(&h, &[7, 2, 3, 4], "t", 2).is_empty());
        // Another tenant's prompt that collides: a miss.
        assert!(p.lookup(&h, &toks, "u", 2).is_empty());
        // Whole, it hits.
        assert_eq!(p.lookup(&h, &toks, "t", 2), a);
    }

    #[test]
    fn a_link_to_a_block_evicted_and_cached_again_is_broken() {
        let mut p = BlockPool::new(2, true);
        let toks = [1, 2, 3, 4];
        let mut a = p.alloc(2).unwrap();
        let h = fill(&mut p, &a, "t", &toks);
        p.release(&mut a);
        // Another sequence holds both; it lets go of the first only, which is evicted
        // for new work and then cached again (the same tokens, a new registration).
        let held = p.lookup(&h, &toks, "t", 2);
        assert_eq!(held.len(), 2);
        p.release(&mut vec![held[0]]);
        let x = p.alloc(1).unwrap();
        assert_eq!(x, [held[0]]);
        let t: Arc<str> = "t".into();
        p.register(x[0], h[0], None, &toks[..2], &t);
        // The second block's link names the first one's earlier registration: the chain
        // stops after the first block.
        assert_eq!(p.lookup(&h, &toks, "t", 2), [x[0]]);
    }

    #[test]
    fn a_prefix_computed_twice_keeps_one_cached_copy_and_caching_can_be_off() {
        let mut p = BlockPool::new(4, true);
        let t: Arc<str> = "t".into();
        let mut a = p.alloc(2).unwrap();
        p.register(a[0], 7, None, &[1, 2], &t);
        p.register(a[1], 7, None, &[1, 2], &t);
        assert_eq!(p.cached_count(), 1);
        p.release(&mut a);
        assert_eq!(p.lookup(&[7], &[1, 2], "t", 2).len(), 1);
        // A block whose prefix is not cached is not cached either.
        let b = p.alloc(1).unwrap();
        p.register(b[0], 8, Some(99), &[3, 4], &t);
        assert_eq!(p.cached_count(), 1);
        let mut off = BlockPool::new(4, false);
        let b = off.alloc(1).unwrap();
        off.register(b[0], 7, None, &[1, 2], &t);
        assert!(off.lookup(&[7], &[1, 2], "t", 2).is_empty());
        assert_eq!(off.cached_count(), 0);
    }
}
