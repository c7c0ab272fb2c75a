//! Quantized blocks: GGML's Q4_0, Q4_1 and Q8_0 layouts, their (de)quantization, and the
//! dot products the CPU matmul runs straight on the weight blocks against activations
//! quantized to 8 bits (as llama.cpp does), with an AVX2 path and a scalar twin.
//!
//! Block layouts (32 elements each; `d`, `m` are f16):
//! - Q4_0: `d, qs[16]`; element j = d·(nibble_j − 8)
//! - Q4_1: `d, m, qs[16]`; element j = d·nibble_j + m
//! - Q8_0: `d, qs[32] (i8)`; element j = d·qs_j
//!
//! with nibble_j = `qs[j] & 15` for j < 16 and `qs[j − 16] >> 4` for j ≥ 16.

use crate::gguf::GgmlType;
use half::{bf16, f16};

pub const QK: usize = 32;

/// One block of 32 activations quantized to i8: value j = `d · qs[j]`; `s = d · Σ qs`.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(16))]
pub struct Q8Block {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

impl Default for Q8Block {
    fn default() -> Self {
        Self {
            d: 0.0,
            s: 0.0,
            qs: [0; QK],
        }
    }
}

/// Quantizes `x` (length a multiple of 32) into `out`: value j of a block is
/// `round(x_j / d)` (half away from zero), clamped to ±127, with `d` = the block's largest
/// magnitude / 127.
pub fn quantize_row_q8(x: &[f32], out: &mut [Q8Block]) {
    debug_assert_eq!(x.len(), out.len() * QK);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F/BW detected.
        return unsafe { quantize_row_q8_avx512(x, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2/FMA detected.
        return unsafe { quantize_row_q8_avx2(x, out) };
    }
    quantize_row_q8_body(x, out)
}

/// [`quantize_row_q8`] compiled for AVX2: rounding is an instruction, not a call a value.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_q8_avx2(x: &[f32], out: &mut [Q8Block]) {
    quantize_row_q8_body(x, out)
}

/// The same loops 16 lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn quantize_row_q8_avx512(x: &[f32], out: &mut [Q8Block]) {
    quantize_row_q8_body(x, out)
}

/// A block's largest magnitude (0 for none; NaNs passed over, as `f32::max` does), eight
/// lanes at a time so that it vectorizes (the maximum does not depend on the order).
#[inline(always)]
fn block_amax(c: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for k in 0..QK / 8 {
        for j in 0..8 {
            let a = c[8 * k + j].abs();
            lanes[j] = if a > lanes[j] { a } else { lanes[j] };
        }
    }
    lanes.iter().fold(0f32, |m, &a| if a > m { a } else { m })
}

#[inline(always)]
fn quantize_row_q8_body(x: &[f32], out: &mut [Q8Block]) {
    for (chunk, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let d = block_amax(chunk) / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in b.qs.iter_mut().zip(chunk) {
            // `(v · id).round() as i32` clamped to ±127, in a form that vectorizes (NaN →
            // 0 as `as` makes it; clamping before the conversion saturates as it does).
            let r = round_away(v * id).clamp(-127.0, 127.0);
            let r = if r.is_nan() { 0.0 } else { r };
            // SAFETY: `r` is finite and within ±127.
            *q = unsafe { r.to_int_unchecked::<i32>() } as i8;
            sum += *q as i32;
        }
        b.d = d;
        b.s = d * sum as f32;
    }
}

#[inline]
fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// One quantized block as integers: element j = `d · q[j] + m`.
pub(crate) fn unpack(ty: GgmlType, b: &[u8]) -> ([i32; QK], f32, f32) {
    let mut q = [0i32; QK];
    let d = h(b, 0);
    let m = match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let off = if ty == GgmlType::Q4_1 { 4 } else { 2 };
            for j in 0..16 {
                q[j] = (b[off + j] & 15) as i32;
                q[j + 16] = (b[off + j] >> 4) as i32;
            }
            if ty == GgmlType::Q4_1 {
                h(b, 2)
            } else {
                -8.0 * d
            }
        }
        GgmlType::Q8_0 => {
            for j in 0..QK {
                q[j] = (b[2 + j] as i8) as i32;
            }
            0.0
        }
        other => unreachable!("{other:?} is not a kernel layout"),
    };
    (q, d, m)
}

/// Dequantizes one row (`n` elements) of type `ty` from `src` into `out`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
            for (o, b) in out
                .chunks_exact_mut(QK)
                .zip(src.chunks_exact(ty.block_bytes()))
            {
                let (q, d, m) = unpack(ty, b);
                for (o, q) in o.iter_mut().zip(q) {
                    *o = d * q as f32 + m;
                }
            }
        }
        // Q5_x, the K-quants and IQ4: `kquant`'s layouts.
        _ => crate::kquant::dequantize(ty, src, out),
    }
}

/// Quantizes a row to Q4_1 bytes (used by the synthetic model writer).
pub fn quantize_row_q4_1(x: &[f32], out: &mut Vec<u8>) {
    for c in x.chunks_exact(QK) {
        let (mn, mx) = c
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let d = (mx - mn) / 15.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(mn).to_le_bytes());
        for j in 0..16 {
            let lo = (((c[j] - mn) * id).round() as i32).clamp(0, 15) as u8;
            let hi = (((c[j + 16] - mn) * id).round() as i32).clamp(0, 15) as u8;
            out.push(lo | (hi << 4));
        }
    }
}

/// Quantizes a row to Q8_0 bytes.
pub fn quantize_row_q8_0(x: &[f32], out: &mut Vec<u8>) {
    for c in x.chunks_exact(QK) {
        let amax = c.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        for v in c {
            out.push(((v * id).round() as i32).clamp(-127, 127) as i8 as u8);
        }
    }
}

/// Quantizes a row to Q4_0 bytes.
pub fn quantize_row_q4_0(x: &[f32], out: &mut Vec<u8>) {
    for c in x.chunks_exact(QK) {
        let max = c
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        for j in 0..16 {
            let lo = ((c[j] * id + 8.5) as i32).clamp(0, 15) as u8;
            let hi = ((c[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
            out.push(lo | (hi << 4));
        }
    }
}

// ---------------------------------------------------------------- dot products

/// Scalar reference: one weight row (`ty` blocks) · one activation row (Q8 blocks).
pub fn dot_scalar(ty: GgmlType, w: &[u8], a: &[Q8Block]) -> f32 {
    let mut acc = 0f32;
    for (b, x) in w.chunks_exact(ty.block_bytes()).zip(a) {
        let (q, d, m) = unpack(ty, b);
        let s: i32 = q.iter().zip(&x.qs).map(|(w, a)| w * *a as i32).sum();
        acc += d * x.d * s as f32 + m * x.s;
    }
    acc
}

/// Scalar reference: one weight row (`ty` blocks) · `R` f32 activation rows at once.
/// `xsum[r][i]` is the sum of row r's block i.
pub fn dot_f32_rows_scalar<const R: usize>(
    ty: GgmlType,
    w: &[u8],
    xs: [&[f32]; R],
    xsum: [&[f32]; R],
) -> [f32; R] {
    let mut acc = [0f32; R];
    for (i, b) in w.chunks_exact(ty.block_bytes()).enumerate() {
        let (q, d, m) = unpack(ty, b);
        for r in 0..R {
            let x = &xs[r][i * QK..(i + 1) * QK];
            let s: f32 = q.iter().zip(x).map(|(a, b)| *a as f32 * b).sum();
            acc[r] += d * s + m * xsum[r][i];
        }
    }
    acc
}

/// Quantizes one row to 16-bit blocks: value j of block i = `d[i] · q[32i + j]` (rounded
/// half away from zero, as `f32::round`).
pub fn quantize_row_i16(x: &[f32], q: &mut [i16], d: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F/BW detected.
        return unsafe { quantize_row_i16_avx512(x, q, d) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2/FMA detected.
        return unsafe { quantize_row_i16_avx2(x, q, d) };
    }
    quantize_row_i16_body(x, q, d)
}

/// [`quantize_row_i16`] compiled for AVX2, where rounding is an instruction (`vroundps`)
/// rather than a call per value.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_i16_avx2(x: &[f32], q: &mut [i16], d: &mut [f32]) {
    quantize_row_i16_body(x, q, d)
}

/// The same loops 16 lanes wide (each value's operations, and so its bits, unchanged).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
unsafe fn quantize_row_i16_avx512(x: &[f32], q: &mut [i16], d: &mut [f32]) {
    quantize_row_i16_body(x, q, d)
}

/// `x.round()` (half away from zero) from `trunc`, which vectorizes: `x − trunc(x)` is
/// exact, so the result is the same bit for bit.
#[inline(always)]
fn round_away(x: f32) -> f32 {
    let t = x.trunc();
    if (x - t).abs() >= 0.5 {
        t + 1f32.copysign(x)
    } else {
        t
    }
}

#[inline(always)]
fn quantize_row_i16_body(x: &[f32], q: &mut [i16], d: &mut [f32]) {
    for ((c, qb), db) in x
        .chunks_exact(QK)
        .zip(q.chunks_exact_mut(QK))
        .zip(d.iter_mut())
    {
        let s = block_amax(c) / 32767.0;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for (o, v) in qb.iter_mut().zip(c) {
            let r = round_away(v * inv).clamp(-32767.0, 32767.0);
            // What `as` does (NaN → 0), in a form that vectorizes.
            let r = if r.is_nan() { 0.0 } else { r };
            // SAFETY: `r` is finite and within i16's range.
            *o = unsafe { r.to_int_unchecked::<i32>() } as i16;
        }
        *db = s;
    }
}

/// Scalar reference: one weight row · R rows of 16-bit activations (`q`, block scales
/// `d`, f32 block sums `xsum`).
pub fn dot_i16_rows_scalar<const R: usize>(
    ty: GgmlType,
    w: &[u8],
    q: [&[i16]; R],
    d: [&[f32]; R],
    xsum: [&[f32]; R],
) -> [f32; R] {
    let mut acc = [0f32; R];
    for (i, b) in w.chunks_exact(ty.block_bytes()).enumerate() {
        let (wq, dw, m) = unpack(ty, b);
        for r in 0..R {
            let a = &q[r][i * QK..(i + 1) * QK];
            let s: i32 = wq.iter().zip(a).map(|(x, y)| x * *y as i32).sum();
            acc[r] += dw * d[r][i] * s as f32 + m * xsum[r][i];
        }
    }
    acc
}

/// An f16 (little-endian bytes at `p`) to f32 with the F16C instruction.
///
/// # Safety
/// `p..p+2` must be readable and the CPU must have F16C (callers are `f16c` kernels).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    use std::arch::x86_64::*;
    let bits = (p.read_unaligned() as u32) | ((p.add(1).read_unaligned() as u32) << 8);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{f16_at, h, Q8Block};
    use crate::gguf::GgmlType;
    use std::arch::x86_64::*;

    /// One weight row · R rows of Q8 activations; each weight block is unpacked once and
    /// used for all R rows (`maddubs`: 32 products per instruction).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_rows<const R: usize>(
        ty: GgmlType,
        w: &[u8],
        a: [&[Q8Block]; R],
    ) -> [f32; R] {
        let bb = ty.block_bytes();
        let n = w.len() / bb;
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_min = [0f32; R];
        let low = _mm256_set1_epi8(15);
        let ones = _mm256_set1_epi16(1);
        let p = w.as_ptr();
        for i in 0..n {
            let b = p.add(i * bb);
            let dw = f16_at(b);
            match ty {
                GgmlType::Q8_0 => {
                    let qw = _mm256_loadu_si256(b.add(2) as *const __m256i);
                    let aw = _mm256_sign_epi8(qw, qw);
                    for r in 0..R {
                        let x = a[r].get_unchecked(i);
                        let xa = _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i);
                        let p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xa, qw));
                        let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x.d), s, acc[r]);
                    }
                }
                _ => {
                    let (off, m) = if ty == GgmlType::Q4_1 {
                        (4, f16_at(b.add(2)))
                    } else {
                        (2, -8.0 * dw)
                    };
                    let q = _mm_loadu_si128(b.add(off) as *const __m128i);
                    let qw = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), low);
                    for r in 0..R {
                        let x = a[r].get_unchecked(i);
                        let xa = _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i);
                        let p16 = _mm256_maddubs_epi16(qw, xa);
                        let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                        acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x.d), s, acc[r]);
                        acc_min[r] += m * x.s;
                    }
                }
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum(acc[r]) + acc_min[r];
        }
        out
    }

    /// One weight row · R rows of 16-bit activations; each weight block is widened to i16
    /// once and used for all R rows (`madd_epi16`: 16 products per instruction).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_i16_rows<const R: usize>(
        ty: GgmlType,
        w: &[u8],
        q: [&[i16]; R],
        d: [&[f32]; R],
        xsum: [&[f32]; R],
    ) -> [f32; R] {
        let bb = ty.block_bytes();
        let n = w.len() / bb;
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_min = [0f32; R];
        let low = _mm_set1_epi8(15);
        let p = w.as_ptr();
        for i in 0..n {
            let b = p.add(i * bb);
            let dw = f16_at(b);
            let (w0, w1, m) = match ty {
                GgmlType::Q8_0 => (
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(2) as *const __m128i)),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(18) as *const __m128i)),
                    0.0,
                ),
                _ => {
                    let (off, m) = if ty == GgmlType::Q4_1 {
                        (4, f16_at(b.add(2)))
                    } else {
                        (2, -8.0 * dw)
                    };
                    let raw = _mm_loadu_si128(b.add(off) as *const __m128i);
                    (
                        _mm256_cvtepu8_epi16(_mm_and_si128(raw, low)),
                        _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low)),
                        m,
                    )
                }
            };
            for r in 0..R {
                let a = q[r].as_ptr().add(i * 32);
                let a0 = _mm256_loadu_si256(a as *const __m256i);
                let a1 = _mm256_loadu_si256(a.add(16) as *const __m256i);
                let s = _mm256_add_epi32(_mm256_madd_epi16(w0, a0), _mm256_madd_epi16(w1, a1));
                let scale = _mm256_set1_ps(dw * *d[r].get_unchecked(i));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[r]);
                acc_min[r] += m * *xsum[r].get_unchecked(i);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum(acc[r]) + acc_min[r];
        }
        out
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// One weight row · R f32 rows: each weight block is unpacked to f32 once and used
    /// for all R rows.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32_rows<const R: usize>(
        ty: GgmlType,
        w: &[u8],
        xs: [&[f32]; R],
        xsum: [&[f32]; R],
    ) -> [f32; R] {
        let bb = ty.block_bytes();
        let n = w.len() / bb;
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_min = [0f32; R];
        let low = _mm_set1_epi8(15);
        let p = w.as_ptr();
        for i in 0..n {
            let b = p.add(i * bb);
            let d = h(std::slice::from_raw_parts(b, 2), 0);
            let (w0, w1, w2, w3, m) = match ty {
                GgmlType::Q8_0 => {
                    let q = b.add(2);
                    let c = |o: usize| {
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                            q.add(o) as *const __m128i
                        )))
                    };
                    (c(0), c(8), c(16), c(24), 0.0)
                }
                _ => {
                    let (off, m) = if ty == GgmlType::Q4_1 {
                        (4, h(std::slice::from_raw_parts(b.add(2), 2), 0))
                    } else {
                        (2, -8.0 * d)
                    };
                    let q = _mm_loadu_si128(b.add(off) as *const __m128i);
                    let lo = _mm_and_si128(q, low);
                    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
                    let c = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                    (
                        c(lo),
                        c(_mm_srli_si128(lo, 8)),
                        c(hi),
                        c(_mm_srli_si128(hi, 8)),
                        m,
                    )
                }
            };
            let dv = _mm256_set1_ps(d);
            for r in 0..R {
                let x = xs[r].as_ptr().add(i * 32);
                let mut t = _mm256_mul_ps(w0, _mm256_loadu_ps(x));
                t = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), t);
                t = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x.add(16)), t);
                t = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x.add(24)), t);
                acc[r] = _mm256_fmadd_ps(dv, t, acc[r]);
                acc_min[r] += m * *xsum[r].get_unchecked(i);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = hsum(acc[r]) + acc_min[r];
        }
        out
    }
}

/// One quantized weight row · R rows of Q8 activations.
#[inline]
pub fn dot_q8_rows<const R: usize>(ty: GgmlType, w: &[u8], a: [&[Q8Block]; R]) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let nb = w.len() / ty.block_bytes();
        assert!(a.iter().all(|x| x.len() >= nb));
        // SAFETY: AVX2/FMA/F16C detected; reads stay within `w` and `a` (asserted).
        return unsafe { avx2::dot_q8_rows(ty, w, a) };
    }
    a.map(|x| dot_scalar(ty, w, x))
}

/// One quantized weight row · R rows of 16-bit activations (see [`dot_i16_rows_scalar`]).
#[inline]
pub fn dot_i16_rows<const R: usize>(
    ty: GgmlType,
    w: &[u8],
    q: [&[i16]; R],
    d: [&[f32]; R],
    xsum: [&[f32]; R],
) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let nb = w.len() / ty.block_bytes();
        assert!(q.iter().all(|x| x.len() >= nb * QK));
        assert!(d.iter().chain(xsum.iter()).all(|s| s.len() >= nb));
        if has_avx512() {
            // SAFETY: AVX-512F/BW (and AVX2/FMA/F16C) detected; reads stay within `w`,
            // `q`, `d`, `xsum` (asserted).
            return unsafe { avx512::dot_i16_rows(ty, w, q, d, xsum) };
        }
        // SAFETY: AVX2/FMA/F16C detected; reads stay within `w`, `q`, `d`, `xsum` (asserted).
        return unsafe { avx2::dot_i16_rows(ty, w, q, d, xsum) };
    }
    dot_i16_rows_scalar(ty, w, q, d, xsum)
}

/// One quantized weight row · R f32 activation rows (see [`dot_f32_rows_scalar`]).
#[inline]
pub fn dot_f32_rows<const R: usize>(
    ty: GgmlType,
    w: &[u8],
    xs: [&[f32]; R],
    xsum: [&[f32]; R],
) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        let nb = w.len() / ty.block_bytes();
        assert!(xs.iter().all(|x| x.len() >= nb * QK) && xsum.iter().all(|s| s.len() >= nb));
        // SAFETY: AVX2/FMA detected; reads stay within `w`, `xs` and `xsum` (asserted).
        return unsafe { avx2::dot_f32_rows(ty, w, xs, xsum) };
    }
    dot_f32_rows_scalar(ty, w, xs, xsum)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::f16_at;
    use crate::gguf::GgmlType;
    use std::arch::x86_64::*;

    /// [`super::avx2::dot_i16_rows`] on 512-bit registers: a whole weight block (32
    /// values) widened to i16 in one register, one `madd` per row and block.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub unsafe fn dot_i16_rows<const R: usize>(
        ty: GgmlType,
        w: &[u8],
        q: [&[i16]; R],
        d: [&[f32]; R],
        xsum: [&[f32]; R],
    ) -> [f32; R] {
        let bb = ty.block_bytes();
        let n = w.len() / bb;
        let mut acc = [_mm512_setzero_ps(); R];
        let mut acc_min = [0f32; R];
        let low = _mm_set1_epi8(15);
        let p = w.as_ptr();
        for i in 0..n {
            let b = p.add(i * bb);
            let dw = f16_at(b);
            let (wv, m) = match ty {
                GgmlType::Q8_0 => (
                    _mm512_cvtepi8_epi16(_mm256_loadu_si256(b.add(2) as *const __m256i)),
                    0.0,
                ),
                _ => {
                    let (off, m) = if ty == GgmlType::Q4_1 {
                        (4, f16_at(b.add(2)))
                    } else {
                        (2, -8.0 * dw)
                    };
                    let raw = _mm_loadu_si128(b.add(off) as *const __m128i);
                    let lo = _mm_and_si128(raw, low);
                    let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
                    (_mm512_cvtepu8_epi16(_mm256_set_m128i(hi, lo)), m)
                }
            };
            for r in 0..R {
                let a = _mm512_loadu_si512(q[r].as_ptr().add(i * 32) as *const _);
                let s = _mm512_madd_epi16(wv, a);
                let scale = _mm512_set1_ps(dw * *d[r].get_unchecked(i));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[r]);
                acc_min[r] += m * *xsum[r].get_unchecked(i);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = _mm512_reduce_add_ps(acc[r]) + acc_min[r];
        }
        out
    }
}

pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            has_avx2()
                && std::env::var("TOLLGATE_SIMD").as_deref() != Ok("avx2")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("TOLLGATE_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Name of the dot-product path in use (for logs and benchmarks). On aarch64, `neon`
/// (every such CPU has it; `TOLLGATE_NO_SIMD=1` says `scalar`) names the packed kernels
/// ([`crate::packed`]); the row-wise ones there are the portable loops.
pub fn simd_path() -> &'static str {
    if has_avx512() {
        "avx512"
    } else if has_avx2() {
        "avx2"
    } else if cfg!(target_arch = "aarch64") && std::env::var_os("TOLLGATE_NO_SIMD").is_none() {
        "neon"
    } else {
        "scalar"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::rand as rand_vec;

    #[test]
    fn round_away_is_f32_round() {
        let mut v: Vec<f32> = vec![0.5, -0.5, 1.5, -2.5, 0.49999997, -0.49999997, 8388607.5];
        v.extend(rand_vec(10_000, 5).iter().map(|x| x * 40_000.0));
        v.extend((-64..64).map(|i| i as f32 * 0.25));
        for x in v {
            assert_eq!(round_away(x).to_bits(), x.round().to_bits(), "{x}");
        }
    }

    /// The 8-bit quantizer, on every build this CPU runs, gives what it gave as first
    /// written (`round() as i32`, clamped; the maximum by `f32::max`), bit for bit.
    #[test]
    fn the_q8_quantizer_gives_its_first_forms_bits_on_every_build() {
        let first = |x: &[f32]| -> Vec<Q8Block> {
            x.chunks_exact(QK)
                .map(|chunk| {
                    let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                    let mut b = Q8Block::default();
                    let mut sum = 0i32;
                    for (q, v) in b.qs.iter_mut().zip(chunk) {
                        *q = ((v * id).round() as i32).clamp(-127, 127) as i8;
                        sum += *q as i32;
                    }
                    b.d = d;
                    b.s = d * sum as f32;
                    b
                })
                .collect()
        };
        let mut x: Vec<f32> = rand_vec(32 * 60, 13).iter().map(|v| v * 5.0).collect();
        x[..32].fill(0.0);
        x[33] = f32::NAN;
        x[70] = 1e30;
        x[71] = -1e30;
        x[100] = f32::INFINITY;
        // Ties: values whose quotient is exactly k + 0.5.
        for (j, v) in x[128..160].iter_mut().enumerate() {
            *v = (j as f32 - 16.0) + 0.5;
        }
        x[160..192].copy_from_slice(&(0..32).map(|j| j as f32 * 4.0 - 63.5).collect::<Vec<_>>());
        let want = first(&x);
        let key = |b: &[Q8Block]| -> Vec<(u32, u32, [i8; QK])> {
            b.iter()
                .map(|b| (b.d.to_bits(), b.s.to_bits(), b.qs))
                .collect()
        };
        let nb = x.len() / QK;
        let mut got = vec![Q8Block::default(); nb];
        quantize_row_q8(&x, &mut got);
        assert_eq!(key(&got), key(&want), "dispatched");
        let mut body = vec![Q8Block::default(); nb];
        quantize_row_q8_body(&x, &mut body);
        assert_eq!(key(&body), key(&want), "portable");
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            let mut b = vec![Q8Block::default(); nb];
            // SAFETY: AVX2 and FMA detected.
            unsafe { quantize_row_q8_avx2(&x, &mut b) };
            assert_eq!(key(&b), key(&want), "AVX2");
        }
    }

    /// Every build of the 16-bit quantizer this CPU runs gives the portable loop's
    /// values and scales, bit for bit (ties, zeros, NaN and the largest values among them).
    #[test]
    fn the_i16_quantizer_gives_the_portable_bits_on_every_build() {
        let mut x: Vec<f32> = rand_vec(32 * 40, 9).iter().map(|v| v * 3.0).collect();
        x[..32].fill(0.0);
        x[40] = f32::NAN;
        x[70] = 1e30;
        x[100] = -0.5;
        let nb = x.len() / QK;
        let (mut q0, mut d0) = (vec![0i16; x.len()], vec![0f32; nb]);
        quantize_row_i16_body(&x, &mut q0, &mut d0);
        let d0: Vec<u32> = d0.iter().map(|v| v.to_bits()).collect();
        let (mut q, mut d) = (vec![0i16; x.len()], vec![0f32; nb]);
        quantize_row_i16(&x, &mut q, &mut d);
        assert_eq!(q, q0);
        assert_eq!(d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), d0);
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            let (mut q, mut d) = (vec![0i16; x.len()], vec![0f32; nb]);
            // SAFETY: AVX2 and FMA detected.
            unsafe { quantize_row_i16_avx2(&x, &mut q, &mut d) };
            assert_eq!(q, q0);
            assert_eq!(d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), d0);
        }
    }

    #[test]
    fn quantize_dequantize_round_trips_within_step() {
        let x = rand_vec(256, 1);
        for (ty, tol) in [
            (GgmlType::Q4_1, 0.07),
            (GgmlType::Q4_0, 0.15),
            (GgmlType::Q8_0, 0.005),
        ] {
            let mut q = Vec::new();
            match ty {
                GgmlType::Q4_1 => quantize_row_q4_1(&x, &mut q),
                GgmlType::Q4_0 => quantize_row_q4_0(&x, &mut q),
                _ => quantize_row_q8_0(&x, &mut q),
            }
            assert_eq!(q.len(), 256 / 32 * ty.block_bytes());
            let mut y = vec![0.0; 256];
            dequantize_row(ty, &q, &mut y);
            let err = x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < tol, "{ty:?}: max error {err}");
        }
    }

    #[test]
    fn simd_dot_matches_scalar_and_f32() {
        let n = 576;
        let x = rand_vec(n, 7);
        let wf = rand_vec(n, 9);
        let mut a = vec![Q8Block::default(); n / QK];
        quantize_row_q8(&x, &mut a);
        for ty in [GgmlType::Q4_1, GgmlType::Q4_0, GgmlType::Q8_0] {
            let mut w = Vec::new();
            match ty {
                GgmlType::Q4_1 => quantize_row_q4_1(&wf, &mut w),
                GgmlType::Q4_0 => quantize_row_q4_0(&wf, &mut w),
                _ => {
                    quantize_row_q8_0(&wf, &mut w);
                    crate::testutil::with_q8_0_minimum(&mut w);
                }
            }
            let mut wd = vec![0.0; n];
            dequantize_row(ty, &w, &mut wd);
            let exact: f32 = wd.iter().zip(&x).map(|(a, b)| a * b).sum();
            let s = dot_scalar(ty, &w, &a);
            let [f] = dot_q8_rows(ty, &w, [&a]);
            let [t1, t2] = dot_q8_rows(ty, &w, [&a, &a]);
            assert!(
                (t1 - s).abs() <= 1e-3 * (1.0 + s.abs()) && t1 == t2,
                "{ty:?}: tiled q8 {t1} vs {s}"
            );
            assert!(
                (s - f).abs() <= 1e-3 * (1.0 + s.abs()),
                "{ty:?}: scalar {s} vs {} {f}",
                simd_path()
            );
            assert!(
                (s - exact).abs() < 0.05 * (1.0 + exact.abs()),
                "{ty:?}: {s} vs exact {exact}"
            );
        }
    }
}
