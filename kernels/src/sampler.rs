//! Sampling the next token from a row of logits, one rule for every backend: the CPU
//! engine draws with it, and it is the CPU twin of the GPU's `sample` kernel
//! (`kernels/cuda/sample.cu`), whose answer it matches bit for bit. Greedy (temperature
//! 0: the lowest index among the largest logits), or temperature with exact top-k and
//! top-p cuts over integer masses and a draw from (seed, step): the same request seed
//! gives the same tokens, on any backend, for the same logits. The probabilities come from
//! one `exp` written in fused multiply-adds, and every sum is of integers, so no order of
//! addition matters. Also OpenAI's penalties ([`Penalties`]).

#[derive(Debug, Clone, Copy)]
pub struct SamplingConfig {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = no top-k cut.
    pub top_k: usize,
    /// vLLM's `min_p` (0 = no cut): tokens less likely than this times the most likely
    /// one's probability are cut.
    pub min_p: f32,
}

/// A sequence's sampling parameters for one draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    /// <= 0: greedy.
    pub temperature: f32,
    /// 0: no cut.
    pub top_k: i32,
    pub top_p: f32,
    /// 0: no cut. Else the tokens whose probability is below `min_p` × the most likely
    /// one's are cut, before the top-k and top-p cuts (vLLM's order).
    pub min_p: f32,
    pub seed: u64,
    pub step: u32,
}

impl SampleParams {
    /// Greedy (the lowest index among the largest logits).
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        seed: 0,
        step: 0,
    };
}

/// e^z for z <= 0 (0 below about e^-86.6, and for NaN), as the `sample` kernel computes it:
/// z = n·ln 2 + r (Cody and Waite's two-part ln 2), then Cephes' expf polynomial for e^r,
/// all in fused multiply-adds, times 2^n.
#[inline(always)]
#[allow(clippy::excessive_precision)] // the kernel's literals, digit for digit
pub fn sample_exp(z: f32) -> f32 {
    let t = z * std::f32::consts::LOG2_E;
    // Below the range (or NaN): 0, chosen at the end rather than by a branch, so that a
    // loop of these vectorizes.
    let inside = t >= -125.0;
    let (z, t) = if inside { (z, t) } else { (0.0, 0.0) };
    let n = t.round_ties_even();
    let r = n.mul_add(-0.693_359_375, z);
    let r = n.mul_add(2.121_944_40e-4, r);
    let mut p = 1.987_569_150_0e-4_f32;
    for c in [
        1.398_199_950_7e-3_f32,
        8.333_451_907_3e-3,
        4.166_579_589_4e-2,
        1.666_666_545_9e-1,
        5.000_000_120_1e-1,
    ] {
        p = p.mul_add(r, c);
    }
    let e = p.mul_add(r * r, r) + 1.0;
    // n: an integer in [−125, 0].
    let v = e * f32::from_bits(((crate::ops::small_int(n) + 127) << 23) as u32);
    if inside {
        v
    } else {
        0.0
    }
}

/// Each token's probability (unnormalized): `sample_exp((x − mx) · inv_t)`. Where the
/// CPU has FMA, the fused multiply-adds are its instructions rather than libm's `fmaf`
/// (the same bits, several times faster).
fn probabilities(x: &[f32], mx: f32, inv_t: f32) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has both features, as just checked.
        return unsafe { probabilities_fma(x, mx, inv_t) };
    }
    x.iter().map(|&v| sample_exp((v - mx) * inv_t)).collect()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn probabilities_fma(x: &[f32], mx: f32, inv_t: f32) -> Vec<f32> {
    let mut p = vec![0.0; x.len()];
    for (p, &v) in p.iter_mut().zip(x) {
        *p = sample_exp((v - mx) * inv_t);
    }
    p
}

/// A token's mass in the draw: floor(p · 2^40).
pub fn mass(p: f32) -> u64 {
    // p <= 1, so the product is below 2^41: the signed conversion is exact and quicker.
    (p * (1u64 << 40) as f32) as i64 as u64
}

/// The draw's 24 random bits: SplitMix64 of (seed, step).
pub fn draw24(seed: u64, step: u32) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15u64.wrapping_mul(step as u64 + 1));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z >> 40
}

/// The key below which `min_p` cuts (0: none): `min_p`'s own bits, as the most likely
/// token's probability is 1 (`sample_exp(0)`), so that p ≥ `min_p` × the largest exactly
/// where p's key is at least this.
pub fn min_p_key(min_p: f32) -> u32 {
    if min_p > 0.0 {
        min_p.min(1.0).to_bits()
    } else {
        0
    }
}

/// The smallest key (bits of a probability, which order as the probabilities do) the cuts
/// keep among `probs` (the most likely's 1): first `min_p`'s ([`min_p_key`]); then with
/// `top_k` in 1..len, the k-th largest key among those (ties kept; all of them where
/// fewer are left); then with `top_p` < 1, among the keys at or above that, the largest
/// key t whose kept mass at or above t reaches `top_p` × their total (at least 1). 0 when
/// nothing is cut.
pub fn kept_key(probs: &[f32], top_k: i32, top_p: f32, min_p: f32) -> u32 {
    let floor = min_p_key(min_p);
    let cut_k = top_k > 0 && (top_k as usize) < probs.len();
    if !cut_k && top_p >= 1.0 {
        return floor;
    }
    let keys: Vec<u32> = probs.iter().map(|p| p.to_bits()).collect();
    let mut keep = floor;
    if cut_k {
        keep = select(&keys, |_| 1, floor, |_| top_k as u64).max(floor);
    }
    if top_p < 1.0 {
        let want = |total: u64| ((top_p.max(0.0) as f64 * total as f64) as u64).max(1);
        keep = select(&keys, |k| mass(f32::from_bits(k)), keep, want).max(keep);
    }
    keep
}

/// The largest key t among `keys` >= `floor` whose weight at or above t reaches `want`
/// (given the first level's total): by radix, four 8-bit digits from the top, as the
/// kernel finds it (digit 0 where no bin reaches `want`: fewer than k keys at or above
/// a `min_p` floor, which the callers raise to the floor). After the first level only the keys in its chosen bin are looked at again.
fn select(keys: &[u32], weight: impl Fn(u32) -> u64, floor: u32, want: impl Fn(u64) -> u64) -> u32 {
    let mut want_left = 0;
    let (mut prefix, mut mask) = (0u32, 0u32);
    let mut left: Vec<u32> = Vec::new();
    for shift in [24, 16, 8, 0] {
        let mut bins = [0u64; 256];
        let among = if shift == 24 { keys } else { &left[..] };
        for &k in among {
            if k >= floor && k & mask == prefix {
                bins[(k >> shift) as usize & 255] += weight(k);
            }
        }
        if shift == 24 {
            want_left = want(bins.iter().sum());
        }
        let mut d = 255;
        while d > 0 && bins[d] < want_left {
            want_left -= bins[d];
            d -= 1;
        }
        prefix |= (d as u32) << shift;
        mask |= 255 << shift;
        if shift == 24 {
            left = keys
                .iter()
                .copied()
                .filter(|&k| k >= floor && k & mask == prefix)
                .collect();
        }
    }
    prefix
}

/// The token drawn from one sequence's (adjusted) logits: the `sample` kernel's rule.
pub fn sample(x: &[f32], p: SampleParams) -> u32 {
    let best = argmax(x) as usize;
    let mx = x.get(best).copied().unwrap_or(f32::NEG_INFINITY);
    if p.temperature <= 0.0 || mx.is_nan() || mx == f32::NEG_INFINITY {
        return best as u32;
    }
    let inv_t = 1.0 / p.temperature;
    let probs = probabilities(x, mx, inv_t);
    let keep = kept_key(&probs, p.top_k, p.top_p, p.min_p);
    let masses: Vec<u64> = probs
        .iter()
        .map(|&q| if q.to_bits() >= keep { mass(q) } else { 0 })
        .collect();
    let total: u64 = masses.iter().sum();
    let u = draw24(p.seed, p.step);
    let r = (total >> 24) * u + (((total & 0xFF_FFFF) * u) >> 24);
    let mut run = 0u64;
    for (i, &m) in masses.iter().enumerate() {
        run += m;
        if run > r {
            return i as u32;
        }
    }
    best as u32
}

/// Index of the largest logit (the lowest index on ties).
/// The lowest index holding the largest value (NaNs are passed over; 0 if all are NaN or
/// `x` is empty). Two passes that vectorize: the maximum ([`crate::ops::max`]), then its
/// first position.
pub fn argmax(x: &[f32]) -> u32 {
    let m = crate::ops::max(x);
    x.iter().position(|&v| v == m).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sample_exp`'s exponent as first written (`n as i32`): the vectorizing form gives
    /// its bits for every input, on the plain and the FMA builds of `probabilities`.
    #[test]
    fn sample_exp_gives_the_bits_of_its_first_form() {
        #[allow(clippy::excessive_precision)]
        fn first(z: f32) -> f32 {
            let t = z * std::f32::consts::LOG2_E;
            let inside = t >= -125.0;
            let (z, t) = if inside { (z, t) } else { (0.0, 0.0) };
            let n = t.round_ties_even();
            let r = n.mul_add(-0.693_359_375, z);
            let r = n.mul_add(2.121_944_40e-4, r);
            let mut p = 1.987_569_150_0e-4_f32;
            for c in [
                1.398_199_950_7e-3_f32,
                8.333_451_907_3e-3,
                4.166_579_589_4e-2,
                1.666_666_545_9e-1,
                5.000_000_120_1e-1,
            ] {
                p = p.mul_add(r, c);
            }
            let e = p.mul_add(r * r, r) + 1.0;
            let v = e * f32::from_bits(((n as i32 + 127) << 23) as u32);
            if inside {
                v
            } else {
                0.0
            }
        }
        let mut z: Vec<f32> = (0..400_000).map(|i| -(i as f32) * 0.000_23).collect();
        z.extend([0.0, -0.0, -86.6, -86.7, -1e30, f32::NEG_INFINITY, f32::NAN]);
        let want: Vec<u32> = z.iter().map(|&v| first(v).to_bits()).collect();
        let got: Vec<u32> = z.iter().map(|&v| sample_exp(v).to_bits()).collect();
        assert_eq!(got, want);
        let built: Vec<u32> = probabilities(&z, 0.0, 1.0)
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(built, want);
    }

    /// vLLM's `min_p`: a token less likely than `min_p` × the most likely one is never
    /// drawn, every other one is; before top-k, which keeps every token left where fewer
    /// than k are.
    #[test]
    fn min_p_cuts_the_unlikely_tokens_first() {
        let x = [0.0f32, 0.5f32.ln(), 0.2f32.ln(), 0.05f32.ln(), 0.01f32.ln()];
        let drawn = |min_p: f32, top_k: i32| {
            let mut seen = [false; 5];
            for seed in 0..4000 {
                let p = SampleParams {
                    temperature: 1.0,
                    top_k,
                    top_p: 1.0,
                    min_p,
                    seed,
                    step: 0,
                };
                seen[sample(&x, p) as usize] = true;
            }
            seen
        };
        assert_eq!(drawn(0.0, 0), [true; 5]);
        assert_eq!(drawn(0.1, 0), [true, true, true, false, false]);
        assert_eq!(drawn(0.3, 0), [true, true, false, false, false]);
        assert_eq!(drawn(0.1, 2), [true, true, false, false, false]);
        // One token at or above the floor, k = 3: it alone.
        assert_eq!(drawn(0.6, 3), [true, false, false, false, false]);
        assert_eq!(drawn(1.0, 0), [true, false, false, false, false]);
        assert_eq!(min_p_key(0.0), 0);
        assert_eq!(kept_key(&[1.0, 0.5, 0.2], 0, 1.0, 0.3), 0.3f32.to_bits());
    }

    #[test]
    fn argmax_is_the_first_largest() {
        let naive = |x: &[f32]| {
            let mut best = 0;
            for (i, &v) in x.iter().enumerate() {
                if v > x[best] {
                    best = i;
                }
            }
            best as u32
        };
        let mut s = 7u64;
        for n in [1usize, 15, 16, 17, 100, 49152] {
            let x: Vec<f32> = (0..n)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((s >> 52) as f32) - 2048.0 // many ties
                })
                .collect();
            assert_eq!(argmax(&x), naive(&x), "n = {n}");
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
        assert_eq!(argmax(&[1.0, f32::NAN, 3.0, 3.0]), 2);
        assert_eq!(argmax(&[]), 0);
    }
}

/// OpenAI's presence and frequency penalties and logit bias, and vLLM's repetition
/// penalty: what a sequence's tokens and its request do to a row of logits before
/// sampling.
#[derive(Debug, Clone, PartialEq)]
pub struct Penalties {
    /// Subtracted once from every token already generated.
    pub presence: f32,
    /// Subtracted from every token once per time it was generated.
    pub frequency: f32,
    /// Added to these tokens' logits.
    pub bias: Vec<(u32, f32)>,
    /// vLLM's `repetition_penalty` (1: none; > 0): the logit x of every token in the
    /// prompt or generated becomes x / it where x > 0, else x × it, before the rest
    /// ([`crate::adjust::Repeat`]).
    pub repetition: f32,
}

impl Default for Penalties {
    fn default() -> Self {
        Self {
            presence: 0.0,
            frequency: 0.0,
            bias: Vec::new(),
            repetition: 1.0,
        }
    }
}

impl Penalties {
    /// Whether they change nothing.
    pub fn is_empty(&self) -> bool {
        self.presence == 0.0
            && self.frequency == 0.0
            && self.bias.iter().all(|b| b.1 == 0.0)
            && self.repetition == 1.0
    }

    /// The repetition penalty of a row (none where its factor is 1): on the prompt's
    /// tokens `seen` (sorted, each once) and those generated (`counts`' keys), and with
    /// `last`, on the row's input token, not known yet; for rows of `vocab` logits (a
    /// list of the tokens or a bitmask, the shorter: [`crate::adjust::Repeat::new`]).
    pub fn repeat(
        &self,
        seen: &[u32],
        counts: &std::collections::HashMap<u32, u32>,
        last: bool,
        vocab: usize,
    ) -> Option<crate::adjust::Repeat> {
        if self.repetition == 1.0 {
            return None;
        }
        // The generated tokens not in the prompt (few), sorted, merged with the prompt's.
        let mut more: Vec<u32> = counts
            .keys()
            .copied()
            .filter(|t| seen.binary_search(t).is_err())
            .collect();
        more.sort_unstable();
        let mut tokens = Vec::with_capacity(seen.len() + more.len());
        let mut i = 0;
        for t in more {
            while seen.get(i).is_some_and(|&s| s < t) {
                tokens.push(seen[i]);
                i += 1;
            }
            tokens.push(t);
        }
        tokens.extend_from_slice(&seen[i..]);
        Some(crate::adjust::Repeat::new(
            self.repetition,
            tokens,
            last,
            vocab,
        ))
    }

    /// `logits[t] += bias[t] − frequency·count[t] − presence·[count[t] > 0]`, with
    /// `counts` the generated tokens' counts (ids past the row are passed over).
    pub fn apply(&self, logits: &mut [f32], counts: &std::collections::HashMap<u32, u32>) {
        for (t, d) in self.deltas(counts) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += d;
            }
        }
    }

    /// What [`Penalties::apply`] adds, one delta per token, sorted by token (the form the
    /// GPU's `sample` kernel takes, see [`crate::adjust::Adjust`]).
    pub fn deltas(&self, counts: &std::collections::HashMap<u32, u32>) -> Vec<(u32, f32)> {
        let penalties = (self.presence != 0.0 || self.frequency != 0.0)
            .then_some(counts)
            .into_iter()
            .flatten()
            .map(|(&t, &c)| {
                let p = if c > 0 { self.presence } else { 0.0 };
                (t, -(self.frequency * c as f32 + p))
            });
        crate::adjust::Adjust::merged(self.bias.iter().copied().chain(penalties))
    }

    /// For a row whose input token is not known yet (drawn by a step still running): what
    /// [`Penalties::deltas`]`(counts)` becomes with that token counted once more, by the
    /// same float operations: one alternative per delta of `deltas` (which must be that
    /// list), and the delta of a token not in it. None when no token's count matters.
    pub fn carry(
        &self,
        counts: &std::collections::HashMap<u32, u32>,
        deltas: &[(u32, f32)],
    ) -> Option<crate::adjust::Carry> {
        if self.presence == 0.0 && self.frequency == 0.0 {
            return None;
        }
        let pen = |c: u32| -(self.frequency * c as f32 + self.presence);
        // `merged` sums a token's biases in order, then adds its penalty.
        let biased = crate::adjust::Adjust::merged(self.bias.iter().copied());
        let alt = deltas
            .iter()
            .map(|&(t, _)| {
                let c = counts.get(&t).copied().unwrap_or(0) + 1;
                match biased.binary_search_by_key(&t, |b| b.0) {
                    Ok(i) => biased[i].1 + pen(c),
                    Err(_) => pen(c),
                }
            })
            .collect();
        Some(crate::adjust::Carry { fresh: pen(1), alt })
    }
}

#[cfg(test)]
mod penalty_tests {
    use super::*;

    #[test]
    fn penalties_follow_openais_rule() {
        let p = Penalties {
            presence: 0.5,
            frequency: 0.25,
            bias: vec![(1, 3.0), (9, 1.0)],
            ..Penalties::default()
        };
        let counts = std::collections::HashMap::from([(0u32, 4u32), (2, 1), (7, 2)]);
        let mut l = [1.0f32, 1.0, 1.0, 1.0];
        p.apply(&mut l, &counts);
        assert_eq!(l, [1.0 - 0.5 - 1.0, 4.0, 1.0 - 0.5 - 0.25, 1.0]);
        assert!(!p.is_empty());
        assert!(Penalties::default().is_empty());
        assert!(Penalties {
            bias: vec![(3, 0.0)],
            ..Default::default()
        }
        .is_empty());
        assert!(!Penalties {
            repetition: 1.2,
            ..Default::default()
        }
        .is_empty());
    }

    /// Counting the input token on the device gives the bits of counting it on the host:
    /// every token of a small vocabulary as the unknown one, listed (counted, biased,
    /// seen in the prompt) or not; with a repetition penalty too.
    #[test]
    fn a_carried_token_gives_the_deltas_of_counting_it_here() {
        use crate::adjust::Adjust;
        let p = Penalties {
            presence: 0.3,
            frequency: 0.7,
            bias: vec![(1, 3.1), (9, 1.3), (4, -0.9), (1, 0.45)],
            repetition: 1.7,
        };
        let seen = [3u32, 4, 13];
        let counts = std::collections::HashMap::from([(0u32, 4u32), (4, 1), (7, 3), (11, 2)]);
        let deltas = p.deltas(&counts);
        let carry = p.carry(&counts, &deltas);
        // The seen tokens listed (a vocabulary of 1,024 has 32 words of bits), and as bits
        // (16 tokens, one word).
        for vocab in [1024, 16] {
            let a = Adjust {
                repeat: p.repeat(&seen, &counts, true, vocab),
                deltas: deltas.clone(),
                mask: None,
                carry: carry.clone(),
            };
            assert!(a.is_well_formed());
            let r = a.repeat.as_ref().expect("a repetition penalty");
            if vocab == 1024 {
                assert_eq!((&r.tokens[..], r.bits), (&[0, 3, 4, 7, 11, 13][..], false));
            } else {
                assert_eq!((&r.tokens[..], r.bits), (&[0b10_1000_1001_1001][..], true));
            }
            let row: Vec<f32> = (0..16).map(|i| 0.37 * i as f32 - 2.0).collect();
            for t in 0..16u32 {
                let mut got = row.clone();
                a.apply_after(&mut got, t);
                let mut more = counts.clone();
                *more.entry(t).or_insert(0) += 1;
                let mut want = row.clone();
                let here = Adjust {
                    repeat: p.repeat(&seen, &more, false, vocab),
                    deltas: p.deltas(&more),
                    ..Adjust::default()
                };
                here.apply(&mut want);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "carried token {t}, vocabulary {vocab}"
                );
            }
        }
        let bias_only = Penalties {
            bias: vec![(2, 1.0)],
            ..Default::default()
        };
        assert_eq!(bias_only.carry(&counts, &bias_only.deltas(&counts)), None);
    }
}
