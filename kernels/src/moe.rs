//! A mixture of experts on the CPU (Qwen3-MoE's, Qwen2-MoE's, Mixtral's feed-forward
//! block): each token's router scores (in f32), a softmax over every expert, the `used`
//! most probable chosen (their weights renormalized to sum to 1 where the model says so),
//! and the block's output the weighted sum of the chosen experts' SwiGLU blocks; Qwen2-MoE
//! adds its shared expert on every token, weighted by a sigmoid gate of its own. The
//! experts run one after another, each on the rows routed to it (gathered, so that each
//! expert's weights are read once a step).
//!
//! ```text
//! p[T,E]  = softmax(h·Wrouterᵀ)
//! for each row r: its experts e₁…e_k (the k most probable), weights w = p[r,e] (÷ Σ of
//!   theirs where normalized)
//! o[r]    = Σⱼ wⱼ · expert_eⱼ(h[r])  (+ σ(h[r]·g) · shared(h[r]))
//! ```

use crate::forward::glu_block;
use crate::matmul::{matmul, ActPrecision, Acts};
use crate::model::Activation::Silu;
use crate::model::Experts;

/// A step's buffers for its mixtures of experts.
#[derive(Default)]
pub struct MoeScratch {
    logits: Vec<f32>,
    /// Per expert: the rows routed to it and their weights.
    routes: Vec<Vec<(usize, f32)>>,
    xs: Acts,
    fused: Vec<f32>,
    gate: Acts,
    up: Vec<f32>,
    y: Vec<f32>,
}

/// A row's chosen experts and their weights, from its router `logits` (one per expert):
/// the `used` most probable under a softmax over all of them (the first `used` of
/// [`choice_order`]), weighted by their probabilities, renormalized to sum to 1 where
/// `norm`.
pub fn route(logits: &[f32], used: usize, norm: bool) -> Vec<(usize, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let total: f32 = exp.iter().sum();
    let mut order = choice_order(logits);
    order.truncate(used);
    let chosen: f32 = order.iter().map(|&e| exp[e]).sum();
    let over = if norm { chosen } else { total };
    order.into_iter().map(|e| (e, exp[e] / over)).collect()
}

/// The order in which a row's experts are chosen (the GPU's `moe_route`'s): by router
/// logit, greatest first (ties: the lower index), then those whose logit is NaN (a row
/// whose activations overflowed), in index order — each expert once.
pub fn choice_order(logits: &[f32]) -> Vec<usize> {
    use std::cmp::Ordering;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (logits[a], logits[b]);
        match (x.is_nan(), y.is_nan()) {
            (false, false) => y.partial_cmp(&x).unwrap_or(Ordering::Equal),
            (false, true) => Ordering::Less,
            (true, false) => Ordering::Greater,
            (true, true) => Ordering::Equal,
        }
        .then(a.cmp(&b))
    });
    order
}

/// `o = the mixture's output` for `h`'s rows (`o` resized to `h.rows × h.cols`).
pub fn mixture(
    x: &Experts,
    h: &mut Acts,
    s: &mut MoeScratch,
    o: &mut Vec<f32>,
    prec: ActPrecision,
) {
    let moe = &x.config;
    let (t, d, e) = (h.rows, h.cols, moe.count);
    s.logits.resize(t * e, 0.0);
    // Scores in f32: a near tie between two experts is decided as the model's own
    // arithmetic decides it.
    matmul(&x.router, h, &mut s.logits, ActPrecision::F32);
    s.routes.resize(e, Vec::new());
    s.routes.iter_mut().for_each(Vec::clear);
    for r in 0..t {
        for (ex, w) in route(&s.logits[r * e..(r + 1) * e], moe.used, moe.norm) {
            s.routes[ex].push((r, w));
        }
    }
    o.resize(t * d, 0.0);
    o[..t * d].fill(0.0);
    for (ex, rows) in s.routes.iter().enumerate() {
        if rows.is_empty() {
            continue;
        }
        s.xs.resize(rows.len(), d);
        for (i, &(r, _)) in rows.iter().enumerate() {
            s.xs.row_mut(i).copy_from_slice(h.row(r));
        }
        let expert = &x.experts[ex];
        glu_block(
            Silu,
            &expert.gate_up,
            &expert.down,
            &mut s.xs,
            &mut s.fused,
            &mut s.gate,
            &mut s.up,
            &mut s.y,
            prec,
        );
        for (i, &(r, w)) in rows.iter().enumerate() {
            let (dst, src) = (&mut o[r * d..(r + 1) * d], &s.y[i * d..(i + 1) * d]);
            dst.iter_mut().zip(src).for_each(|(a, b)| *a += w * b);
        }
    }
    if let Some((gate, shared)) = &x.shared {
        glu_block(
            Silu,
            &shared.gate_up,
            &shared.down,
            h,
            &mut s.fused,
            &mut s.gate,
            &mut s.up,
            &mut s.y,
            prec,
        );
        for r in 0..t {
            let g: f32 = h.row(r).iter().zip(gate).map(|(a, b)| a * b).sum();
            let g = 1.0 / (1.0 + (-g).exp());
            let (dst, src) = (&mut o[r * d..(r + 1) * d], &s.y[r * d..(r + 1) * d]);
            dst.iter_mut().zip(src).for_each(|(a, b)| *a += g * b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_probable_experts_are_chosen_and_weighted_by_their_probabilities() {
        let logits = [0.0, 2.0, 1.0, 2.0f32.ln() + 2.0];
        // Probabilities ∝ 1, e², e, 2e²: experts 3 then 1.
        let r = route(&logits, 2, true);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [3, 1]);
        assert!((r[0].1 - 2.0 / 3.0).abs() < 1e-6 && (r[1].1 - 1.0 / 3.0).abs() < 1e-6);
        // Not normalized: each keeps its probability among all four.
        let e = std::f32::consts::E;
        let total = 1.0 + e * e + e + 2.0 * e * e;
        let r = route(&logits, 2, false);
        assert!((r[0].1 - 2.0 * e * e / total).abs() < 1e-6, "{r:?}");
        // Ties: the lower index first.
        let r = route(&[1.0, 1.0, 1.0], 1, true);
        assert_eq!(r, [(0, 1.0)]);
    }

    /// Greatest logit first (ties: the lower index; −∞ among the numbers, −0 equal to 0),
    /// then the NaNs in index order: every expert once.
    #[test]
    fn experts_are_chosen_by_logit_then_the_nans_by_index() {
        let nan = f32::NAN;
        let l = [1.0, nan, 3.0, nan, 3.0, f32::NEG_INFINITY, -0.0, 0.0];
        assert_eq!(choice_order(&l), [2, 4, 0, 6, 7, 5, 1, 3]);
        let r = route(&l, 7, true);
        assert_eq!(
            r.iter().map(|x| x.0).collect::<Vec<_>>(),
            [2, 4, 0, 6, 7, 5, 1]
        );
        assert_eq!(choice_order(&[nan, nan, nan]), [0, 1, 2]);
    }
}
