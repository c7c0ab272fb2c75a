//! A row's adjustments before it is sampled, in the one form that both the host and the
//! GPU's `sample` kernel apply: additive deltas (logit bias, presence and frequency
//! penalties, merged to one per token) and then, when a grammar constrains the row, a
//! bitmask of the tokens that may come next (the others become −∞).
//!
//! On the GPU path an adjusted row travels in the step's staging copy
//! ([`crate::cuda::staging`]) as words: `[n_deltas, mask_words, (token, delta bits) ×
//! n_deltas, mask…]`, and only its sampled token comes back, instead of its whole row of
//! logits. [`Adjust::apply`] is the kernel's CPU twin.

/// What to do to a row of logits before sampling it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Adjust {
    /// `(token, delta)`, sorted by token, one per token: added to the token's logit.
    pub deltas: Vec<(u32, f32)>,
    /// When present: bit `i % 32` of word `i / 32` set when token `i` may come; every
    /// other token (also any past the words) becomes −∞, after the deltas.
    pub mask: Option<Vec<u32>>,
}

impl Adjust {
    /// Deltas from any number of `(token, delta)` pairs: summed per token, in the order
    /// given, and sorted by token.
    pub fn merged(pairs: impl IntoIterator<Item = (u32, f32)>) -> Vec<(u32, f32)> {
        let mut v: Vec<(u32, f32)> = pairs.into_iter().collect();
        // Stable: a token's deltas are summed in the order given.
        v.sort_by_key(|&(t, _)| t);
        let mut out: Vec<(u32, f32)> = Vec::with_capacity(v.len());
        for (t, d) in v {
            match out.last_mut() {
                Some(last) if last.0 == t => last.1 += d,
                _ => out.push((t, d)),
            }
        }
        out
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.mask.is_none() && self.deltas.iter().all(|d| d.1 == 0.0)
    }

    /// Its length in staging words.
    pub fn words(&self) -> usize {
        2 + 2 * self.deltas.len() + self.mask.as_ref().map_or(0, Vec::len)
    }

    /// Appends its staging words to `out`.
    pub fn write(&self, out: &mut Vec<u32>) {
        let mask = self.mask.as_deref().unwrap_or_default();
        out.push(self.deltas.len() as u32);
        out.push(mask.len() as u32);
        for &(t, d) in &self.deltas {
            out.push(t);
            out.push(d.to_bits());
        }
        out.extend_from_slice(mask);
    }

    /// Applies it to `row` (the `sample` kernel's adjustment, on the CPU): the deltas
    /// (tokens past the row are passed over), then the mask.
    pub fn apply(&self, row: &mut [f32]) {
        for &(t, d) in &self.deltas {
            if let Some(l) = row.get_mut(t as usize) {
                *l += d;
            }
        }
        if let Some(mask) = &self.mask {
            // A word at a time: most words of a grammar's mask keep all or none.
            for (w, chunk) in row.chunks_mut(32).enumerate() {
                match mask.get(w).copied().unwrap_or(0) {
                    u32::MAX => {}
                    0 => chunk.fill(f32::NEG_INFINITY),
                    bits => {
                        for (b, l) in chunk.iter_mut().enumerate() {
                            if bits >> b & 1 == 0 {
                                *l = f32::NEG_INFINITY;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Whether `mask` keeps token `i`.
pub fn allowed(mask: &[u32], i: usize) -> bool {
    mask.get(i / 32).is_some_and(|w| w >> (i % 32) & 1 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_merge_per_token_and_sort() {
        let d = Adjust::merged([(7, 1.0), (2, -0.5), (7, -3.0), (2, 0.25), (9, 0.0)]);
        assert_eq!(d, vec![(2, -0.25), (7, -2.0), (9, 0.0)]);
    }

    #[test]
    fn apply_adds_deltas_then_masks_and_writes_its_words() {
        let a = Adjust {
            deltas: vec![(1, 2.0), (3, -1.0), (40, 5.0), (99, 1.0)],
            // Tokens 1, 3 and 33 kept; 40 refused despite its delta; 99 past the words.
            mask: Some(vec![0b1010, 0b10]),
        };
        let mut row = vec![1.0f32; 48];
        a.apply(&mut row);
        for (i, &l) in row.iter().enumerate() {
            let want = match i {
                1 => 3.0,
                3 => 0.0,
                33 => 1.0,
                _ => f32::NEG_INFINITY,
            };
            assert_eq!(l, want, "token {i}");
        }
        let mut w = Vec::new();
        a.write(&mut w);
        assert_eq!(w.len(), a.words());
        assert_eq!(&w[..4], &[4, 2, 1, 2.0f32.to_bits()]);
        assert_eq!(&w[w.len() - 2..], &[0b1010, 0b10]);
        assert!(Adjust::default().is_empty());
        assert!(!a.is_empty());
    }
}
