//! The paged KV cache's storage: `n_blocks` blocks of `block_size` token slots, per layer,
//! for keys and values. Inside a block the layout is head-major, so attention for one KV
//! head reads each block as one contiguous run: values are `[kv_head][slot][dim]`, keys
//! are transposed to `[kv_head][dim][slot]` so that a query meets a block's keys as
//! `head_dim` vector multiply-adds across slots, with no horizontal sums. Entries are f16
//! (as on the GPU): half the memory per token of f32, and half the bytes attention reads;
//! each is widened to f32 exactly where it is used. Which block belongs to which sequence
//! (block tables, the free list) is the engine's bookkeeping, not this module's.
//!
//! **The windowed layers' own pool.** A model whose layers attend over a sliding window on
//! some layers (Gemma 2 and 3, Phi-3-mini-4k) reads only a window's worth of positions on
//! those layers, so [`KvCache::with_window`] gives them blocks of their own, fewer than
//! the other layers': a sequence has a second block table for them
//! ([`crate::forward::BatchSeq::window_table`]), whose blocks below its window the engine
//! hands back (vLLM's hybrid KV cache, llama.cpp's SWA cache).

use half::f16;
use half::vec::HalfBitsVecExt;

/// The first block (of `block_size` positions) a row at position `pos` reads on a layer
/// whose window is `window` positions: the blocks before it may be let go.
#[inline]
pub fn first_window_block(window: usize, pos: usize, block_size: usize) -> usize {
    (pos + 1).saturating_sub(window) / block_size
}

pub struct KvCache {
    pub block_size: usize,
    pub n_blocks: usize,
    /// The windowed layers' own pool's blocks, where they have one.
    pub window_blocks: Option<usize>,
    /// Per layer: where its blocks start (in entries), and whether it is in the windowed
    /// layers' own pool.
    layers: Vec<(usize, bool)>,
    kv_dim: usize,
    n_heads: usize,
    k: Vec<f16>,
    v: Vec<f16>,
}

impl KvCache {
    /// `kv_dim = n_heads × head_dim`.
    pub fn new(
        n_layers: usize,
        n_heads: usize,
        kv_dim: usize,
        block_size: usize,
        n_blocks: usize,
    ) -> Self {
        Self::with_window(
            &vec![false; n_layers],
            n_heads,
            kv_dim,
            block_size,
            n_blocks,
            None,
        )
    }

    /// A cache for `windowed.len()` layers where the layers `windowed` marks hold
    /// `window_blocks` blocks of their own (`None`: the same `n_blocks` as the others,
    /// under the same block table).
    pub fn with_window(
        windowed: &[bool],
        n_heads: usize,
        kv_dim: usize,
        block_size: usize,
        n_blocks: usize,
        window_blocks: Option<usize>,
    ) -> Self {
        let block = block_size * kv_dim;
        let mut at = 0;
        let mut layers = Vec::with_capacity(windowed.len());
        // The other layers first, then the windowed ones: each layer's blocks in one run.
        for own in [false, true] {
            for (l, &w) in windowed.iter().enumerate() {
                let w = w && window_blocks.is_some();
                if w == own {
                    layers.push((l, at, w));
                    at += block
                        * if w {
                            window_blocks.unwrap_or(0)
                        } else {
                            n_blocks
                        };
                }
            }
        }
        layers.sort_by_key(|&(l, ..)| l);
        // Zeroed by the allocator (f16's zero is all zero bits): pages are backed as
        // blocks are first written, not all at start (a memset of the whole cache took
        // ~0.3 s and made all of it resident at once).
        Self {
            block_size,
            n_blocks,
            window_blocks,
            layers: layers.into_iter().map(|(_, at, w)| (at, w)).collect(),
            kv_dim,
            n_heads,
            k: vec![0u16; at].reinterpret_into(),
            v: vec![0u16; at].reinterpret_into(),
        }
    }

    /// Whether layer `layer` is in the windowed layers' own pool (its blocks are named by
    /// a sequence's window table).
    #[inline]
    pub fn own_pool(&self, layer: usize) -> bool {
        self.layers[layer].1
    }

    /// Blocks in the pool of layer `layer`.
    #[inline]
    pub fn blocks_of(&self, layer: usize) -> usize {
        match self.layers[layer].1 {
            true => self.window_blocks.unwrap_or(0),
            false => self.n_blocks,
        }
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        2 * 2 * self.k.len()
    }

    /// Start of a block (all heads) for a layer.
    #[inline]
    fn block_start(&self, layer: usize, block: usize) -> usize {
        debug_assert!(block < self.blocks_of(layer));
        self.layers[layer].0 + block * self.block_size * self.kv_dim
    }

    /// Slot of position `pos` under a block table.
    #[inline]
    pub fn locate(&self, table: &[u32], pos: usize) -> (usize, usize) {
        (table[pos / self.block_size] as usize, pos % self.block_size)
    }

    /// Stores the keys and values (all KV heads, head after head) of position `pos`,
    /// rounded to f16 (to nearest, ties to even).
    pub fn write(&mut self, layer: usize, table: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let (b, slot) = self.locate(table, pos);
        let base = self.block_start(layer, b);
        let hd = self.kv_dim / self.n_heads;
        let bs = self.block_size;
        for h in 0..self.n_heads {
            let i = base + (h * bs + slot) * hd;
            for (to, &x) in self.v[i..i + hd].iter_mut().zip(&v[h * hd..(h + 1) * hd]) {
                *to = f16::from_f32(x);
            }
            let kt = base + h * bs * hd + slot;
            for d in 0..hd {
                self.k[kt + d * bs] = f16::from_f32(k[h * hd + d]);
            }
        }
    }

    /// Keys (`head_dim × block_size`, dim-major) and values (`block_size × head_dim`,
    /// slot-major) of one KV head across a whole block.
    #[inline]
    pub fn head_block(&self, layer: usize, block: u32, head: usize) -> (&[f16], &[f16]) {
        let hd = self.kv_dim / self.n_heads;
        let i = self.block_start(layer, block as usize) + head * self.block_size * hd;
        let n = self.block_size * hd;
        (&self.k[i..i + n], &self.v[i..i + n])
    }
}
