//! A row's adjustments before it is sampled, in the one form that both the host and the
//! GPU's `sample` kernel apply: first a repetition penalty's factor on the tokens already
//! seen ([`Repeat`]: vLLM's `repetition_penalty`), then additive deltas (logit bias,
//! presence and frequency penalties, merged to one per token) and then, when a grammar
//! constrains the row, a bitmask of the tokens that may come next (the others become −∞).
//!
//! On the GPU path an adjusted row travels in the step's staging copy
//! ([`crate::cuda::staging`]) as words: `[n_deltas | CARRIED | REPEATED, mask_words,
//! (token, delta bits) × n_deltas, mask…, (fresh, alt × n_deltas when carried), (factor
//! bits, n | LAST | BITS, n words of seen tokens when repeated: a list, or a bitmask where
//! that is shorter)]`, and only its sampled token
//! comes back, instead of its whole row of logits. [`Adjust::apply_after`] is the
//! kernel's CPU twin.
//!
//! **A carried token.** A step planned while the one before still runs does not know the
//! token that step draws, which is its row's input token and which the penalties must
//! count. Its [`Carry`] says what to add instead once the device knows it (the token at
//! the row's position in the step's batch): a listed token gets its alternative delta
//! (the host's delta with that token counted once more), any other token `fresh`.

/// What to do to a row of logits before sampling it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Adjust {
    /// `(token, delta)`, sorted by token, one per token: added to the token's logit.
    pub deltas: Vec<(u32, f32)>,
    /// When present: bit `i % 32` of word `i / 32` set when token `i` may come; every
    /// other token (also any past the words) becomes −∞, after the deltas.
    pub mask: Option<Vec<u32>>,
    /// When present: the row's input token is counted by the penalties too.
    pub carry: Option<Carry>,
    /// When present: a repetition penalty, applied before the deltas.
    pub repeat: Option<Repeat>,
}

/// A repetition penalty (vLLM's and Hugging Face's `repetition_penalty`): each seen
/// token's logit x becomes x / `factor` where x > 0, else x × `factor`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Repeat {
    pub factor: f32,
    /// The tokens seen (the prompt's and those generated): sorted, each once; or with
    /// `bits`, a bitmask (bit `i % 32` of word `i / 32` set for token i).
    pub tokens: Vec<u32>,
    pub bits: bool,
    /// The row's input token (not known on the host yet: drawn by a step still running)
    /// is penalized too, where it is not seen.
    pub last: bool,
}

impl Repeat {
    /// The penalty on `seen` (sorted, each once) in the shorter of its two forms for a
    /// vocabulary of `vocab` tokens: a list, or a bitmask (a long prompt's, whose words
    /// would not fit a step's room as a list).
    pub fn new(factor: f32, seen: Vec<u32>, last: bool, vocab: usize) -> Self {
        let words = vocab.div_ceil(32);
        if seen.len() <= words {
            return Self {
                factor,
                tokens: seen,
                bits: false,
                last,
            };
        }
        Self {
            factor,
            tokens: bitmask(&seen, vocab),
            bits: true,
            last,
        }
    }

    /// Whether token `t` is seen.
    pub fn has(&self, t: u32) -> bool {
        if self.bits {
            allowed(&self.tokens, t as usize)
        } else {
            self.tokens.binary_search(&t).is_ok()
        }
    }

    /// The penalized logit: a number's division or product, as the kernel computes it.
    #[inline]
    pub fn of(factor: f32, x: f32) -> f32 {
        if x > 0.0 {
            x / factor
        } else {
            x * factor
        }
    }
}

/// The deltas of an [`Adjust`] with the row's input token `t` counted once more: `t`'s
/// delta becomes `alt[j]` where `deltas[j]` is `t`'s, and `fresh` is added to `t` where
/// no delta is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Carry {
    pub fresh: f32,
    /// One per delta, in the same order.
    pub alt: Vec<f32>,
}

/// The bit of an adjustment's first word that says a [`Carry`] follows its mask.
pub const CARRIED: u32 = 1 << 31;

/// The bit of an adjustment's first word that says a [`Repeat`] comes last.
pub const REPEATED: u32 = 1 << 30;

/// The bit of a [`Repeat`]'s count word that says the row's input token is penalized too.
pub const LAST: u32 = 1 << 31;

/// The bit of a [`Repeat`]'s count word that says its words are a bitmask.
pub const BITS: u32 = 1 << 30;

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
        self.mask.is_none()
            && self.carry.is_none()
            && self.repeat.is_none()
            && self.deltas.iter().all(|d| d.1 == 0.0)
    }

    /// Whether its words can be written: a mask has words (none would refuse every
    /// token, which the kernel reads as no mask), and a carry one alternative per delta.
    pub fn is_well_formed(&self) -> bool {
        self.mask.as_ref().is_none_or(|m| !m.is_empty())
            && self
                .carry
                .as_ref()
                .is_none_or(|c| c.alt.len() == self.deltas.len())
            && self.deltas.len() < REPEATED as usize
            && self.repeat.as_ref().is_none_or(|r| {
                r.tokens.len() < BITS as usize
                    && (r.bits || r.tokens.windows(2).all(|w| w[0] < w[1]))
            })
    }

    /// Its length in staging words.
    pub fn words(&self) -> usize {
        2 + 2 * self.deltas.len()
            + self.mask.as_ref().map_or(0, Vec::len)
            + self.carry.as_ref().map_or(0, |c| 1 + c.alt.len())
            + self.repeat.as_ref().map_or(0, |r| 2 + r.tokens.len())
    }

    /// Appends its staging words to `out` (it must be [well formed](Adjust::is_well_formed)).
    pub fn write(&self, out: &mut Vec<u32>) {
        let mask = self.mask.as_deref().unwrap_or_default();
        let carried = if self.carry.is_some() { CARRIED } else { 0 };
        let repeated = if self.repeat.is_some() { REPEATED } else { 0 };
        out.push(self.deltas.len() as u32 | carried | repeated);
        out.push(mask.len() as u32);
        for &(t, d) in &self.deltas {
            out.push(t);
            out.push(d.to_bits());
        }
        out.extend_from_slice(mask);
        if let Some(c) = &self.carry {
            out.push(c.fresh.to_bits());
            out.extend(c.alt.iter().map(|a| a.to_bits()));
        }
        if let Some(r) = &self.repeat {
            out.push(r.factor.to_bits());
            let flags = if r.last { LAST } else { 0 } | if r.bits { BITS } else { 0 };
            out.push(r.tokens.len() as u32 | flags);
            out.extend_from_slice(&r.tokens);
        }
    }

    /// Applies it to `row`, which must have no [`Carry`] nor a [`Repeat`] of the input
    /// token (the host's adjustment of a row whose tokens are all known).
    pub fn apply(&self, row: &mut [f32]) {
        debug_assert!(
            self.carry.is_none() && !self.repeat.as_ref().is_some_and(|r| r.last),
            "a carried adjustment needs its token"
        );
        self.apply_after(row, 0);
    }

    /// Applies it to `row` (the `sample` kernel's adjustment, on the CPU), `last` being the
    /// row's input token (counted by a [`Carry`] and a [`Repeat`], if any): the repetition
    /// penalty, the deltas (tokens past the row are passed over), then the mask.
    pub fn apply_after(&self, row: &mut [f32], last: u32) {
        if let Some(r) = &self.repeat {
            if r.bits {
                for (i, l) in row.iter_mut().enumerate() {
                    if allowed(&r.tokens, i) {
                        *l = Repeat::of(r.factor, *l);
                    }
                }
            } else {
                for &t in &r.tokens {
                    if let Some(l) = row.get_mut(t as usize) {
                        *l = Repeat::of(r.factor, *l);
                    }
                }
            }
            if r.last && !r.has(last) {
                if let Some(l) = row.get_mut(last as usize) {
                    *l = Repeat::of(r.factor, *l);
                }
            }
        }
        let carry = self.carry.as_ref();
        let mut listed = false;
        for (j, &(t, d)) in self.deltas.iter().enumerate() {
            let d = match carry {
                Some(c) if t == last => {
                    listed = true;
                    c.alt.get(j).copied().unwrap_or(d)
                }
                _ => d,
            };
            if let Some(l) = row.get_mut(t as usize) {
                *l += d;
            }
        }
        if let Some(c) = carry.filter(|_| !listed) {
            if let Some(l) = row.get_mut(last as usize) {
                *l += c.fresh;
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

/// The bitmask of `ids` over a vocabulary of `n` tokens (bit `i % 32` of word `i / 32`;
/// ids past it are passed over): what [`allowed`] reads.
pub fn bitmask(ids: &[u32], n: usize) -> Vec<u32> {
    let mut bits = vec![0u32; n.div_ceil(32)];
    for &id in ids.iter().filter(|&&id| (id as usize) < n) {
        bits[id as usize / 32] |= 1 << (id % 32);
    }
    bits
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
            repeat: None,
            deltas: vec![(1, 2.0), (3, -1.0), (40, 5.0), (99, 1.0)],
            // Tokens 1, 3 and 33 kept; 40 refused despite its delta; 99 past the words.
            mask: Some(vec![0b1010, 0b10]),
            carry: None,
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

    #[test]
    fn a_carried_token_takes_its_alternative_or_the_fresh_delta() {
        let a = Adjust {
            repeat: None,
            deltas: vec![(2, -1.0), (5, -2.0)],
            mask: None,
            carry: Some(Carry {
                fresh: -0.75,
                alt: vec![-1.5, -2.5],
            }),
        };
        let run = |last: u32| {
            let mut row = vec![0.0f32; 8];
            a.apply_after(&mut row, last);
            row
        };
        // Listed: its alternative instead of its delta, and nothing else changes.
        assert_eq!(run(5), [0.0, 0.0, -1.0, 0.0, 0.0, -2.5, 0.0, 0.0]);
        // Not listed: the deltas, and the fresh delta on it.
        assert_eq!(run(6), [0.0, 0.0, -1.0, 0.0, 0.0, -2.0, -0.75, 0.0]);
        // Past the row: passed over.
        assert_eq!(run(40), [0.0, 0.0, -1.0, 0.0, 0.0, -2.0, 0.0, 0.0]);
        let mut w = Vec::new();
        a.write(&mut w);
        assert_eq!(w.len(), a.words());
        assert_eq!(w[0], 2 | CARRIED);
        assert_eq!(
            &w[6..],
            &[
                (-0.75f32).to_bits(),
                (-1.5f32).to_bits(),
                (-2.5f32).to_bits()
            ]
        );
        assert!(a.is_well_formed() && !a.is_empty());
        let bad = Adjust {
            carry: Some(Carry::default()),
            ..a.clone()
        };
        assert!(!bad.is_well_formed());
        // A mask of no words would refuse every token on the host and none on the device.
        let empty = Adjust {
            mask: Some(Vec::new()),
            ..Adjust::default()
        };
        assert!(!empty.is_well_formed());
    }

    /// A repetition penalty divides a positive logit and multiplies any other, once per
    /// token, before the deltas; the input token too where it says so, once; its words
    /// come last.
    #[test]
    fn a_repetition_penalty_scales_seen_tokens_before_the_deltas() {
        let a = Adjust {
            deltas: vec![(1, 1.0), (3, -1.0)],
            mask: None,
            carry: None,
            repeat: Some(Repeat::new(2.0, vec![1, 2, 3, 40], true, 1024)),
        };
        let run = |a: &Adjust, last: u32| {
            let mut row = vec![4.0f32, 4.0, -4.0, 0.0, 4.0, 4.0];
            a.apply_after(&mut row, last);
            row
        };
        // Listed (2): scaled once. Not listed (5): scaled. Past the row (40): passed over.
        assert_eq!(run(&a, 2), [4.0, 3.0, -8.0, -1.0, 4.0, 4.0]);
        assert_eq!(run(&a, 5), [4.0, 3.0, -8.0, -1.0, 4.0, 2.0]);
        assert_eq!(run(&a, 40), [4.0, 3.0, -8.0, -1.0, 4.0, 4.0]);
        let mut w = Vec::new();
        a.write(&mut w);
        assert_eq!(w.len(), a.words());
        assert_eq!(w[0], 2 | REPEATED);
        assert_eq!(&w[6..], &[2.0f32.to_bits(), 4 | LAST, 1, 2, 3, 40]);
        assert!(a.is_well_formed() && !a.is_empty());
        // In a vocabulary of 48 (2 words), 4 seen tokens are a bitmask: the same rows.
        let as_bits = Adjust {
            repeat: Some(Repeat::new(2.0, vec![1, 2, 3, 40], true, 48)),
            ..a.clone()
        };
        assert!(
            !a.repeat.as_ref().unwrap().bits,
            "4 tokens listed, not 32 words"
        );
        let r = as_bits.repeat.as_ref().unwrap();
        assert!(r.bits && r.has(40) && !r.has(5));
        assert_eq!(r.tokens, [0b1110, 1 << 8]);
        for last in [2, 5, 40] {
            assert_eq!(run(&as_bits, last), run(&a, last), "input token {last}");
        }
        w.clear();
        as_bits.write(&mut w);
        assert_eq!(
            &w[6..],
            &[2.0f32.to_bits(), 2 | LAST | BITS, 0b1110, 1 << 8]
        );
        assert!(as_bits.is_well_formed());
        let unsorted = Adjust {
            repeat: Some(Repeat {
                factor: 2.0,
                tokens: vec![3, 1],
                bits: false,
                last: false,
            }),
            ..Adjust::default()
        };
        assert!(!unsorted.is_well_formed());
    }
}
