//! The paged KV cache's storage: `n_blocks` blocks of `block_size` token slots, per layer,
//! for keys and values. Which block belongs to which sequence (block tables, the free
//! list) is the engine's bookkeeping, not this module's.

pub struct KvCache {
    pub block_size: usize,
    pub n_blocks: usize,
    n_layers: usize,
    kv_dim: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvCache {
    pub fn new(n_layers: usize, kv_dim: usize, block_size: usize, n_blocks: usize) -> Self {
        let n = n_layers * n_blocks * block_size * kv_dim;
        Self {
            block_size,
            n_blocks,
            n_layers,
            kv_dim,
            k: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// Bytes one token takes across all layers (keys and values).
    pub fn bytes_per_token(n_layers: usize, kv_dim: usize) -> usize {
        n_layers * kv_dim * 2 * 4
    }

    #[inline]
    fn at(&self, layer: usize, block: usize, slot: usize) -> usize {
        debug_assert!(layer < self.n_layers && block < self.n_blocks && slot < self.block_size);
        ((layer * self.n_blocks + block) * self.block_size + slot) * self.kv_dim
    }

    /// Slot of position `pos` under a block table.
    #[inline]
    pub fn locate(&self, table: &[u32], pos: usize) -> (usize, usize) {
        (table[pos / self.block_size] as usize, pos % self.block_size)
    }

    pub fn write(&mut self, layer: usize, table: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let (b, s) = self.locate(table, pos);
        let i = self.at(layer, b, s);
        self.k[i..i + self.kv_dim].copy_from_slice(k);
        self.v[i..i + self.kv_dim].copy_from_slice(v);
    }

    /// Keys and values of one whole block (`block_size × kv_dim` each, slot-major).
    #[inline]
    pub fn block(&self, layer: usize, block: u32) -> (&[f32], &[f32]) {
        let i = self.at(layer, block as usize, 0);
        let n = self.block_size * self.kv_dim;
        (&self.k[i..i + n], &self.v[i..i + n])
    }

    /// Keys and values (all KV heads) at `pos`.
    #[inline]
    pub fn read(&self, layer: usize, table: &[u32], pos: usize) -> (&[f32], &[f32]) {
        let (b, s) = self.locate(table, pos);
        let i = self.at(layer, b, s);
        (&self.k[i..i + self.kv_dim], &self.v[i..i + self.kv_dim])
    }
}
