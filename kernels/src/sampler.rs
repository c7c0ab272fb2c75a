//! Sampling the next token from logits, per sequence: greedy (temperature 0), or
//! temperature with top-k and top-p, from a per-sequence generator seeded by the
//! request's `seed` (the same seed gives the same tokens).

#[derive(Debug, Clone, Copy)]
pub struct SamplingConfig {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = no top-k cut.
    pub top_k: usize,
}

/// A sequence's sampler: its configuration and random state.
pub struct Sampler {
    cfg: SamplingConfig,
    state: u64,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig, seed: u64) -> Self {
        Self {
            cfg,
            state: seed ^ 0x5DEE_CE66_D1CE_4E5B,
        }
    }

    fn next_f32(&mut self) -> f32 {
        // splitmix64
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Picks a token. `logits` is used as scratch.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        if self.cfg.temperature < 1e-5 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.cfg.temperature;
        let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        // Candidates: all tokens, cut to top-k if asked, sorted by probability.
        let mut cand: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (((l - max) * inv_t).exp(), i as u32))
            .filter(|(p, _)| *p > 1e-9)
            .collect();
        cand.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        if self.cfg.top_k > 0 && cand.len() > self.cfg.top_k {
            cand.truncate(self.cfg.top_k);
        }
        let total: f32 = cand.iter().map(|c| c.0).sum();
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.0 / total;
                if acc >= self.cfg.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        let total: f32 = cand.iter().map(|c| c.0).sum();
        let mut r = self.next_f32() * total;
        for &(p, id) in &cand {
            r -= p;
            if r <= 0.0 {
                return id;
            }
        }
        cand.last().map(|c| c.1).unwrap_or(0)
    }
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

    #[test]
    fn greedy_seeded_topk_topp() {
        let logits = vec![0.0, 5.0, 1.0, 4.9, -3.0];
        let g = SamplingConfig {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
        };
        assert_eq!(Sampler::new(g, 1).sample(&mut logits.clone()), 1);
        let t = SamplingConfig {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
        };
        let draw = |seed| {
            let mut s = Sampler::new(t, seed);
            (0..50)
                .map(|_| s.sample(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7), "same seed, same tokens");
        assert_ne!(draw(7), draw(8));
        let k2 = SamplingConfig {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 2,
        };
        let mut s = Sampler::new(k2, 3);
        assert!((0..200).all(|_| matches!(s.sample(&mut logits.clone()), 1 | 3)));
        let p = SamplingConfig {
            temperature: 1.0,
            top_p: 0.3,
            top_k: 0,
        };
        let mut s = Sampler::new(p, 3);
        assert!((0..200).all(|_| s.sample(&mut logits.clone()) == 1));
    }
}

/// OpenAI's presence and frequency penalties and logit bias: what a sequence's generated
/// tokens and its request do to a row of logits before sampling.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Penalties {
    /// Subtracted once from every token already generated.
    pub presence: f32,
    /// Subtracted from every token once per time it was generated.
    pub frequency: f32,
    /// Added to these tokens' logits.
    pub bias: Vec<(u32, f32)>,
}

impl Penalties {
    /// Whether they change nothing.
    pub fn is_empty(&self) -> bool {
        self.presence == 0.0 && self.frequency == 0.0 && self.bias.iter().all(|b| b.1 == 0.0)
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
    }
}
