//! Log-probabilities of a sampled token and of the most likely alternatives, from a step's
//! raw logits: the model's own distribution (before temperature, top-k or top-p), as the
//! OpenAI API reports `logprobs`. [`token_logprobs`] is the host's, and the CPU twin of the
//! `logprobs` kernel (`kernels/cuda/sample.cu`), which computes them on the GPU for the
//! rows a step names ([`Score`]) and writes [`SCORE_WORDS`] words a row ([`from_words`]).

/// The most alternatives a request may ask for (`top_logprobs`).
pub const MAX_TOP: usize = 20;

/// One sampled token's log-probability, and the `top` most likely tokens' (most likely
/// first; equal logits by lower id).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub id: u32,
    pub logprob: f32,
    /// How many tokens are at least as likely, itself included (vLLM's `rank`: 1 for the
    /// most likely); 0 for a token with no logit (past the row, or NaN).
    pub rank: u32,
    pub top: Vec<(u32, f32)>,
}

/// `id`'s log-softmax in `logits`, and the `top` (at most [`MAX_TOP`]) largest entries'.
/// The normalizer is summed in f64, so a row of 49,152 logits loses nothing to rounding.
/// NaN logits count as impossible.
pub fn token_logprobs(logits: &[f32], id: u32, top: usize) -> TokenLogprobs {
    let top = top.min(MAX_TOP).min(logits.len());
    let max = crate::ops::max(logits);
    let lse = if max.is_finite() {
        max as f64 + sum_exp(logits, max).ln()
    } else {
        max as f64
    };
    let lp = |x: f32| {
        if x.is_nan() {
            f32::NEG_INFINITY
        } else {
            (x as f64 - lse) as f32
        }
    };
    // The `top` largest, kept sorted (largest first); a later equal logit goes after.
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &x) in logits.iter().enumerate() {
            if x.is_nan() || (best.len() == top && x <= best[top - 1].1) {
                continue;
            }
            let at = best.partition_point(|&(_, y)| y >= x);
            best.insert(at, (i as u32, x));
            best.truncate(top);
        }
    }
    let own = logits.get(id as usize).copied();
    TokenLogprobs {
        id,
        logprob: own.map_or(f32::NEG_INFINITY, lp),
        rank: own.map_or(0, |t| logits.iter().filter(|&&x| x >= t).count() as u32),
        top: best.into_iter().map(|(i, x)| (i, lp(x))).collect(),
    }
}

/// `Σ e^(x − max)` over the logits that are not NaN: `ops::exp` in 16 f32 lanes (it
/// vectorizes; each term is at most 1), each 1,024 terms added into an f64.
fn sum_exp(logits: &[f32], max: f32) -> f64 {
    if logits.iter().any(|x| x.is_nan()) {
        return logits
            .iter()
            .filter(|x| !x.is_nan())
            .map(|&x| ((x - max) as f64).exp())
            .sum();
    }
    #[cfg(target_arch = "x86_64")]
    if crate::quant::simd_path() != "scalar" {
        // SAFETY: AVX2 and FMA detected (the SIMD paths require them).
        return unsafe { sum_exp_avx2(logits, max) };
    }
    sum_exp_body(logits, max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_avx2(logits: &[f32], max: f32) -> f64 {
    sum_exp_body(logits, max)
}

#[inline(always)]
fn sum_exp_body(logits: &[f32], max: f32) -> f64 {
    let mut total = 0.0f64;
    for block in logits.chunks(1024) {
        let mut lanes = [0.0f32; 16];
        let mut chunks = block.chunks_exact(16);
        for c in &mut chunks {
            for j in 0..16 {
                lanes[j] += crate::ops::exp(c[j] - max);
            }
        }
        let rest: f32 = chunks
            .remainder()
            .iter()
            .map(|&x| crate::ops::exp(x - max))
            .sum();
        total += lanes.iter().map(|&l| l as f64).sum::<f64>() + rest as f64;
    }
    total
}

/// Words the device writes for one scored row ([`Score`]): the token, its
/// log-probability, how many of the most likely follow, its rank, then (id,
/// log-probability) pairs for up to [`MAX_TOP`] tokens (the `logprobs` kernel's
/// `LOGPROB_WORDS`).
pub const SCORE_WORDS: usize = 4 + 2 * MAX_TOP;

/// A logits row of a sampled step whose log-probabilities the device computes
/// (`kernels/cuda/sample.cu`'s `logprobs`, [`token_logprobs`]'s twin), so that the step
/// reads back [`SCORE_WORDS`] words for it instead of its logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Score {
    /// The row, among the step's logits rows.
    pub row: usize,
    /// The token whose log-probability is reported: a prompt's next token, or `None` for
    /// the token the step draws for the row.
    pub token: Option<u32>,
    /// How many of the most likely tokens (at most [`MAX_TOP`]).
    pub top: usize,
}

impl Score {
    /// Its three words for the kernel: row, token (`u32::MAX`: the drawn one), top.
    pub fn words(&self) -> [u32; 3] {
        [
            self.row as u32,
            self.token.unwrap_or(u32::MAX),
            self.top.min(MAX_TOP) as u32,
        ]
    }
}

/// A scored row's [`TokenLogprobs`] from the [`SCORE_WORDS`] words the device wrote.
pub fn from_words(w: &[u32]) -> TokenLogprobs {
    let n = w.get(2).map_or(0, |&n| (n as usize).min(MAX_TOP));
    let pair = |j: usize| (w[4 + 2 * j], f32::from_bits(w[5 + 2 * j]));
    TokenLogprobs {
        id: w.first().copied().unwrap_or(0),
        logprob: w.get(1).map_or(f32::NAN, |&b| f32::from_bits(b)),
        rank: w.get(3).copied().unwrap_or(0),
        top: (0..n)
            .take_while(|j| 5 + 2 * j < w.len())
            .map(pair)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_the_log_softmax_and_the_top_are_the_largest_in_order() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, 0.5, f32::NAN];
        let r = token_logprobs(&logits, 4, 3);
        let z: f64 = logits[..5].iter().map(|&x| (x as f64).exp()).sum();
        let want = |x: f32| (x as f64 - z.ln()) as f32;
        assert!((r.logprob - want(0.5)).abs() < 1e-6, "{r:?}");
        // 3, 3, 1 and 0.5 are at least 0.5; NaN is nothing.
        assert_eq!(r.rank, 4);
        assert_eq!(
            token_logprobs(&logits, 2, 0).rank,
            2,
            "ties count all equal"
        );
        assert_eq!(token_logprobs(&logits, 5, 0).rank, 0, "a NaN logit");
        assert_eq!(token_logprobs(&logits, 9, 0).rank, 0, "past the row");
        let ids: Vec<u32> = r.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 2, 0], "ties by lower id");
        assert!((r.top[0].1 - want(3.0)).abs() < 1e-6);
        assert!((r.top[2].1 - want(1.0)).abs() < 1e-6);
        // The probabilities sum to 1; none is positive.
        let total: f64 = logits[..5]
            .iter()
            .enumerate()
            .map(|(i, _)| (token_logprobs(&logits, i as u32, 0).logprob as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert_eq!(token_logprobs(&logits, 5, 0).logprob, f32::NEG_INFINITY);
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(
            token_logprobs(&logits, 0, 99).top.len(),
            5,
            "at most the finite ones"
        );
    }

    #[test]
    fn the_fast_normalizer_matches_an_f64_sum() {
        let logits = crate::synth::logits(49157, -25.0, 15.0);
        let max = crate::ops::max(&logits);
        let slow: f64 = logits.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let fast = sum_exp(&logits, max);
        assert!((fast / slow - 1.0).abs() < 1e-6, "{fast} vs {slow}");
    }

    #[test]
    fn a_large_vocabulary_keeps_its_precision() {
        // 49,152 equal logits: each token's probability is exactly 1/49,152.
        let logits = vec![7.25f32; 49152];
        let r = token_logprobs(&logits, 123, 20);
        let want = -(49152f64.ln()) as f32;
        assert!((r.logprob - want).abs() < 1e-5, "{} vs {want}", r.logprob);
        assert_eq!(r.top.len(), 20);
        assert_eq!(r.top[0].0, 0);
        assert_eq!(r.top[19].0, 19);
    }
}
