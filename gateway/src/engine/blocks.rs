//! KV block bookkeeping: a free list over the backend's cache blocks. Which sequence holds
//! which block is recorded in the sequence's block table; this pool only hands blocks out
//! and takes them back.

pub struct BlockPool {
    free: Vec<u32>,
    total: usize,
}

impl BlockPool {
    pub fn new(total: usize) -> Self {
        Self {
            // Pop from the end: low block ids first.
            free: (0..total as u32).rev().collect(),
            total,
        }
    }
    pub fn free_count(&self) -> usize {
        self.free.len()
    }
    pub fn total(&self) -> usize {
        self.total
    }
    /// Takes `n` blocks, or none if fewer are free.
    pub fn alloc(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n))
    }
    pub fn release(&mut self, blocks: &mut Vec<u32>) {
        self.free.append(blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_release_conserves_blocks() {
        let mut p = BlockPool::new(8);
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
}
