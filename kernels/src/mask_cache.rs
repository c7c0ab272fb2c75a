//! Masks of the vocabulary already computed for a grammar's states (a regular
//! expression's DFA state: [`crate::regex_mode`]; a context-free grammar's stacks:
//! [`crate::ebnf`]), kept per vocabulary: a state's mask depends on nothing else, so a
//! state met again (a loop in the grammar, the same grammar in the next request) costs a
//! copy of its bits instead of a walk of the vocabulary.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// The most bytes of masks one cache keeps (about 5,000 rows of SmolLM2's 49,152
/// tokens); past it, they are dropped and computed again as needed.
const MAX_MASK_BYTES: usize = 32 << 20;

/// A vocabulary's masks already computed, by what decides them (`K`).
#[derive(Debug)]
pub struct Masks<K>(Mutex<Kept<K>>);

impl<K> Default for Masks<K> {
    fn default() -> Self {
        Self(Mutex::new(Kept {
            masks: HashMap::new(),
            bytes: 0,
        }))
    }
}

/// The masks, and the bytes they take (their keys' too).
#[derive(Debug)]
struct Kept<K> {
    masks: HashMap<K, Arc<[u32]>>,
    bytes: usize,
}

impl<K: Hash + Eq> Masks<K> {
    /// The mask kept for `key`; else `walk`'s, kept.
    pub fn get_or_walk(&self, key: K, walk: impl FnOnce() -> Vec<u32>) -> Vec<u32> {
        if let Some(bits) = self.get(&key) {
            return bits.to_vec();
        }
        let bits = walk();
        self.keep(key, &bits);
        bits
    }

    /// The mask kept for `key`, if any.
    fn get(&self, key: &K) -> Option<Arc<[u32]>> {
        self.0.lock().ok()?.masks.get(key).cloned()
    }

    /// Keeps `bits` for `key`; past [`MAX_MASK_BYTES`], drops all the others first.
    fn keep(&self, key: K, bits: &[u32]) {
        if let Ok(mut m) = self.0.lock() {
            let size = bits.len() * 4 + std::mem::size_of::<K>();
            if m.bytes + size > MAX_MASK_BYTES {
                m.masks.clear();
                m.bytes = 0;
            }
            m.masks.insert(key, bits.into());
            m.bytes += size;
        }
    }
}
