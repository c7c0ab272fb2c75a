//! Elementwise and row operations of the Llama forward pass, on the CPU.

use crate::model::Activation;

/// `out = x / rms(x) · w`.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// RMSNorm of each `w.len()`-wide head of `x` in place, every head by the same weights
/// (Qwen3's norm of the Q and K heads before RoPE).
pub fn head_rmsnorm(x: &mut [f32], w: &[f32], eps: f32) {
    for head in x.chunks_exact_mut(w.len()) {
        let ss = head.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
        let inv = 1.0 / (ss + eps).sqrt();
        head.iter_mut().zip(w).for_each(|(v, g)| *v = *v * inv * g);
    }
}

/// Rotary embedding over `x` (heads × head_dim) at `pos`, rotating adjacent pairs
/// (`x[2i]`, `x[2i+1]`) by pos·base^(−2i/head_dim): GGUF's Llama layout (the converter
/// permutes Q and K so that this equals the original model's rotation).
pub fn rope(x: &mut [f32], head_dim: usize, pos: u32, inv_freq: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (i, f) in inv_freq.iter().enumerate() {
            let (s, c) = (pos as f32 * f).sin_cos();
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = a * c - b * s;
            head[2 * i + 1] = a * s + b * c;
        }
    }
}

/// [`rope`]'s rotation at `pos` as (cos, sin) pairs, one per inverse frequency; the pairs
/// from `pass.0` on do not turn but are multiplied by `pass.1` (partial RoPE's:
/// [`crate::model::LlamaConfig::rope_pass`]; `(inv_freq.len(), 1.0)` for none).
pub fn rope_table(pos: u32, inv_freq: &[f32], pass: (usize, f32), cs: &mut [f32]) {
    for (i, f) in inv_freq.iter().enumerate() {
        let (s, c) = match i < pass.0 {
            true => (pos as f32 * f).sin_cos(),
            false => (0.0, pass.1),
        };
        cs[2 * i] = c;
        cs[2 * i + 1] = s;
    }
}

/// [`rope`] with its rotation from [`rope_table`] (`cs.len()` = head_dim): the same result.
pub fn rope_with(x: &mut [f32], cs: &[f32]) {
    for head in x.chunks_exact_mut(cs.len()) {
        for (pair, r) in head.chunks_exact_mut(2).zip(cs.chunks_exact(2)) {
            let (a, b, c, s) = (pair[0], pair[1], r[0], r[1]);
            pair[0] = a * c - b * s;
            pair[1] = a * s + b * c;
        }
    }
}

/// Inverse frequencies for [`rope`].
pub fn rope_inv_freq(head_dim: usize, base: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / base.powf(2.0 * i as f32 / head_dim as f32))
        .collect()
}

/// `g = act(g) · u`, in place: SwiGLU (`silu`) or Gemma's GeGLU (GELU in its tanh form:
/// `x/2 · (1 + tanh(y))` with `y = √(2/π)(x + 0.044715 x³)`, computed as `x / (1 + e^(−2y))`,
/// the same function).
pub fn glu(act: Activation, g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx512() {
        // SAFETY: AVX-512F/BW detected.
        return unsafe { glu_avx512(act, g, u) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::quant::simd_path() != "scalar" {
        // SAFETY: AVX2 and FMA detected (the SIMD paths require them).
        return unsafe { glu_avx2(act, g, u) };
    }
    glu_body(act, g, u)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn glu_avx2(act: Activation, g: &mut [f32], u: &[f32]) {
    glu_body(act, g, u)
}

/// The same loops 16 lanes wide (each lane's operations, and so its bits, unchanged).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn glu_avx512(act: Activation, g: &mut [f32], u: &[f32]) {
    glu_body(act, g, u)
}

#[inline(always)]
fn glu_body(act: Activation, g: &mut [f32], u: &[f32]) {
    match act {
        Activation::Silu => swiglu_body(g, u),
        Activation::GeluTanh => geglu_body(g, u),
    }
}

#[inline(always)]
fn swiglu_body(g: &mut [f32], u: &[f32]) {
    for (a, b) in g.iter_mut().zip(u) {
        *a = *a / (1.0 + exp(-*a)) * b;
    }
}

/// `√(2/π)`, GELU's tanh form's constant.
const GELU_K: f32 = 0.797_884_6;

#[inline(always)]
fn geglu_body(g: &mut [f32], u: &[f32]) {
    for (a, b) in g.iter_mut().zip(u) {
        let x = *a;
        let y = GELU_K * (x + 0.044_715 * x * x * x);
        *a = x / (1.0 + exp(-2.0 * y)) * b;
    }
}

/// `x = cap · tanh(x / cap)` for each element (Gemma 2's soft caps).
pub fn softcap(x: &mut [f32], cap: f32) {
    for v in x.iter_mut() {
        *v = cap * (*v / cap).tanh();
    }
}

/// `e^x` within 2 ulp of `f32::exp` over the range that matters (below −87.3 it returns
/// about 1e-38 rather than a denormal or zero; above 88.7 about 3.4e38 rather than
/// infinity), written so that it vectorizes: `x = n·ln2 + r`, a degree-6 polynomial for
/// `e^r` on |r| ≤ ln2/2, and `2^n` put straight into the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    // ln 2 in two parts (Cody–Waite), so that `r` is accurate.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_66;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // n ∈ [−126, 128]: 2^n as bits (n = 128 only for x at the clamp, where e < 1).
    let scale = f32::from_bits(((small_int(n) + 127).clamp(1, 254) as u32) << 23);
    let e = if n > 127.0 { e * 2.0 } else { e };
    e * scale
}

/// A whole number `n` of magnitude below 2²² (as `exp`s find them) as an integer: the
/// same as `n as i32`, in a form that vectorizes (`as` saturates, and so compiles to a
/// scalar conversion and two checks per lane). Adding 1.5·2²³ puts `n` in the mantissa's
/// low bits.
#[inline(always)]
pub(crate) fn small_int(n: f32) -> i32 {
    (n + 12_582_912.0).to_bits() as i32 - 0x4B40_0000
}

/// The largest value of `x` (NaNs passed over; −∞ for none), in 16 lanes so that it
/// vectorizes (the maximum does not depend on the order).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            lanes[j] = if c[j] > lanes[j] { c[j] } else { lanes[j] };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(lanes.iter())
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx512() {
        // SAFETY: AVX-512F/BW detected.
        return unsafe { softmax_avx512(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::quant::simd_path() != "scalar" {
        // SAFETY: AVX2 and FMA detected (the SIMD paths require them).
        return unsafe { softmax_avx2(x) };
    }
    softmax_body(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(x: &mut [f32]) {
    softmax_body(x)
}

/// The same loops, the element-wise ones 16 lanes wide (the sum keeps its 8 lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn softmax_avx512(x: &mut [f32]) {
    softmax_body(x)
}

#[inline(always)]
fn softmax_body(x: &mut [f32]) {
    // Maximum and sum in lanes, so that every loop vectorizes.
    let m = max(x);
    for v in x.iter_mut() {
        *v = exp(*v - m);
    }
    let mut sums = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            sums[j] += c[j];
        }
    }
    let sum: f32 = sums.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod exp_tests {
    #[test]
    fn exp_is_within_two_ulp_of_the_library_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.5 {
            let (got, want) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert!(super::exp(-1e4) < 1e-37 && super::exp(-1e4) >= 0.0);
        assert!(super::exp(1e4).is_finite() && super::exp(1e4) > 3e38);
        assert_eq!(super::exp(0.0), 1.0);
    }

    /// `exp` as first written, with `n as i32` (scalar conversions): the vectorizing
    /// form must give its bits for every input.
    fn exp_with_as(x: f32) -> f32 {
        let x = x.clamp(-87.3, 88.7);
        let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
        let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
        let p = 1.987_569_1e-4;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 0.166_666_66;
        let p = p * r + 0.5;
        let e = p * r * r + r + 1.0;
        let scale = f32::from_bits((((n as i32) + 127).clamp(1, 254) as u32) << 23);
        let e = if n > 127.0 { e * 2.0 } else { e };
        e * scale
    }

    #[test]
    fn exp_gives_the_bits_of_its_first_form() {
        let mut x = -120.0f32;
        let mut n = 0;
        while x < 120.0 {
            assert_eq!(super::exp(x).to_bits(), exp_with_as(x).to_bits(), "x = {x}");
            x += 0.000_377;
            n += 1;
        }
        assert!(n > 600_000);
        for x in [
            f32::NEG_INFINITY,
            f32::INFINITY,
            -0.0,
            0.0,
            88.7,
            -87.3,
            1e30,
            -1e30,
        ] {
            assert_eq!(super::exp(x).to_bits(), exp_with_as(x).to_bits(), "x = {x}");
        }
        assert!(super::exp(f32::NAN).is_nan());
    }
}

#[cfg(test)]
mod simd_tests {
    use crate::model::Activation::{GeluTanh, Silu};
    use crate::testutil::rand;

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// Softmax and SwiGLU on every SIMD build this CPU runs give the portable loops' bits
    /// (element-wise operations lane by lane; the softmax's sum in the same 8 lanes).
    #[test]
    fn softmax_and_swiglu_give_the_portable_bits_on_every_build() {
        for (i, n) in [1usize, 7, 8, 15, 16, 17, 100, 1000, 4097]
            .into_iter()
            .enumerate()
        {
            // Logits of attention's range and beyond it (both ends of exp's clamp).
            let x: Vec<f32> = rand(n, 3 + i as u64).iter().map(|v| v * 60.0).collect();
            let mut soft = x.clone();
            super::softmax_body(&mut soft);
            let mut got = x.clone();
            super::softmax(&mut got);
            assert_eq!(bits(&got), bits(&soft), "softmax, n = {n}");
            let u = rand(n, 50 + i as u64);
            let g: Vec<f32> = x.iter().map(|v| v * 0.5).collect();
            let mut glu = g.clone();
            super::swiglu_body(&mut glu, &u);
            let mut got = g.clone();
            super::glu(Silu, &mut got, &u);
            assert_eq!(bits(&got), bits(&glu), "swiglu, n = {n}");
            #[cfg(target_arch = "x86_64")]
            if crate::quant::has_avx2() {
                let (mut s, mut w) = (x.clone(), g.clone());
                // SAFETY: AVX2 and FMA detected.
                unsafe {
                    super::softmax_avx2(&mut s);
                    super::glu_avx2(Silu, &mut w, &u);
                }
                assert_eq!(bits(&s), bits(&soft), "softmax on AVX2, n = {n}");
                assert_eq!(bits(&w), bits(&glu), "swiglu on AVX2, n = {n}");
            }
            let mut ge = g.clone();
            super::geglu_body(&mut ge, &u);
            let mut got = g.clone();
            super::glu(GeluTanh, &mut got, &u);
            assert_eq!(bits(&got), bits(&ge), "geglu, n = {n}");
            #[cfg(target_arch = "x86_64")]
            if crate::quant::has_avx2() {
                let mut w = g.clone();
                // SAFETY: AVX2 and FMA detected.
                unsafe { super::glu_avx2(GeluTanh, &mut w, &u) };
                assert_eq!(bits(&w), bits(&ge), "geglu on AVX2, n = {n}");
            }
        }
    }

    #[test]
    fn geglu_is_gelu_in_its_tanh_form_times_up() {
        let xs: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.05).collect();
        let u: Vec<f32> = xs.iter().map(|x| 1.0 + 0.1 * x).collect();
        let mut got = xs.clone();
        super::glu(GeluTanh, &mut got, &u);
        for ((x, u), g) in xs.iter().zip(&u).zip(&got) {
            let x64 = *x as f64;
            let y = (2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3));
            let want = 0.5 * x64 * (1.0 + y.tanh()) * *u as f64;
            assert!(
                (*g as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "gelu({x}) · {u}: {g} vs {want}"
            );
        }
        let mut capped = vec![-100.0f32, -1.0, 0.0, 2.5, 1e6];
        super::softcap(&mut capped, 30.0);
        assert!(capped[0] > -30.0 && capped[0] < -29.0 && capped[4] == 30.0);
        assert!((capped[1] + 30.0 * (1.0f32 / 30.0).tanh()).abs() < 1e-6 && capped[2] == 0.0);
    }
}

#[cfg(test)]
mod rope_tests {
    #[test]
    fn rope_from_a_table_is_rope_bit_for_bit() {
        let inv = super::rope_inv_freq(64, 100_000.0);
        let x: Vec<f32> = (0..576)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.031)
            .collect();
        for pos in [0u32, 1, 17, 511, 8191] {
            let (mut a, mut b) = (x.clone(), x.clone());
            super::rope(&mut a, 64, pos, &inv);
            let mut cs = vec![0f32; 64];
            super::rope_table(pos, &inv, (inv.len(), 1.0), &mut cs);
            super::rope_with(&mut b, &cs);
            assert!(
                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "pos {pos}"
            );
        }
    }
}
