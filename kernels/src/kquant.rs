//! The GGUF block layouts the matrix kernels do not read as they are: Q5_0, Q5_1, the
//! K-quants Q2_K … Q6_K and the non-linear IQ4_NL, IQ4_XS (llama.cpp's Q2_K, Q3_K_x,
//! Q4_K_x, Q5_K_x, Q6_K and IQ4 files are made of them, with Q4_0, Q5_0, Q5_1, Q8_0 and
//! IQ4_NL for rows whose length is not a multiple of 256). This module owns their
//! dequantization (ggml's layouts and arithmetic), their conversion at load into the
//! layouts the kernels read ([`to_kernel_layout`]), and quantizers for the synthetic model
//! writer.
//!
//! Conversion keeps the values wherever a kernel layout, with offsets beside it
//! ([`Offsets`]: a constant added to each run of 16 or 32 weights of a row, which the
//! product adds as `offset · Σ inputs`), can hold them:
//! - Q4_K → Q4_1: each 32-element sub-block is `d·sc·q − dmin·m` with a 4-bit `q`, which is
//!   a Q4_1 block with `d = d·sc` and `m = −dmin·m` (rounded to f16: ≤ 2⁻¹¹ relative).
//! - Q5_0 → Q8_0: `d·(q − 16)` is `(d/4)·4(q − 16)`, exact (`(d/2)·2(q − 16)` where `d/4`
//!   is not an exact f16, else `d·(q − 16)` itself: always exact).
//! - Q5_1 → Q8_0 of `d` and `q` (0..32), offset `m` per 32: exact. Q5_K likewise per
//!   sub-block: scale `d·sc` (rounded to f16), offset `−dmin·m`.
//! - Q2_K → Q8_0 of `d` and `sc·q` (0..46), offset `−dmin·m` per 16: exact.
//! - Q3_K → Q8_0 of `d` and `sc·q` (−124..=128): exact; a block holding 128 (−32·−4, which
//!   ggml's quantizer makes in most super-blocks) is stored negated, under `−d`, as −128.
//! - IQ4_NL → Q8_0 of `d` and the 16 levels (−127..=113): exact. IQ4_XS likewise per
//!   sub-block, of scale `d·(ls − 32)` (rounded to f16).
//! - Q6_K → Q8_0, requantized: `sc·q` up to 4,096 fits no 8-bit block; the added error is
//!   at most half a Q8_0 step (the block's largest |value| / 254), about a quarter of the
//!   file's own step (its 16 values' largest / 31).
//!
//! Where the CPU runs the packed kernels ([`crate::packed`]), whose scales are f32, the
//! packed form keeps what the blocks round or cannot hold ([`exact_packed`], [`fidelity`]):
//! Q4_K's, Q5_K's and IQ4_XS's sub-block scales `d·sc` (and Q4_K's min) in f32 — an f16
//! times a 6-bit integer, exact — and Q6_K as 8-bit `q − 32` with its scale per 16, which
//! those kernels apply 16 products at a time. So every layout here keeps the file's values
//! there, for the 16- and 8-bit activation products and the rows (embeddings); the blocks
//! above serve f32 activations and CPUs without packed kernels. What each costs, measured
//! against the numpy reference on the file's own values, is in BENCHMARKS.md ("GGUF
//! layouts").
//!
//! Layouts (`d`, `dmin`, `m` f16; 32-element blocks for Q5_x and IQ4_NL, 256-element
//! super-blocks of 8 sub-blocks of 32 (Q4_K, Q5_K, IQ4_XS) or 16 of 16 (Q2_K, Q3_K,
//! Q6_K)); "element e = (half, shift, l)" is e = 128·half + 32·shift + l:
//! - Q5_0: `d, qh: u32, qs[16]`; element j = d·(q_j − 16), q_j's fifth bit bit j of `qh`
//! - Q5_1: `d, m, qh: u32, qs[16]`; element j = d·q_j + m
//! - Q2_K: `scales[16], qs[64], d, dmin`; 16 i: `d·(s_i & 15)·q − dmin·(s_i >> 4)`, element
//!   (half, shift, l)'s 2 bits at bit 2·shift of `qs[32·half + l]`
//! - Q3_K: `hmask[32], qs[64], scales[12], d`; 16 i: `d·(sc_i − 32)·q`, `sc` 6-bit (low 4 in
//!   nibble i / 8 of byte i % 8, high 2 in byte 8 + i % 4 at bit 2(i / 4)); q's 2 low bits as
//!   Q2_K's, minus 4 where bit e / 32 of `hmask[e % 32]` is clear
//! - Q4_K: `d, dmin, scales[12], qs[128]`; sub-block i: `d·sc_i·q − dmin·m_i`, `sc`, `m`
//!   6-bit in `scales`, the nibbles of sub-blocks 2p and 2p+1 in the low and high halves
//!   of bytes 32p..32p+32
//! - Q5_K: `d, dmin, scales[12], qh[32], qs[128]`; as Q4_K, the fifth bit of element l of
//!   sub-block i bit i of `qh[l]`
//! - Q6_K: `ql[128], qh[64], scales[16]: i8, d`; element = d·sc·(q − 32), 6-bit q
//! - IQ4_NL: `d, qs[16]`; element j = d·L(index), indices as Q4_0's nibbles, L ggml's 16
//!   levels −127..=113
//! - IQ4_XS: `d, scales_h: u16, scales_l[4], qs[128]`; sub-block i: `d·(ls_i − 32)·L(index)`,
//!   `ls` 6-bit (low 4 in nibble i % 2 of `scales_l[i / 2]`, high 2 at bit 2i of
//!   `scales_h`), its indices as IQ4_NL's in `qs[16i..16i + 16]`

use crate::gguf::GgmlType;
use crate::matmul::Offsets;
use crate::packed::Packed;
use crate::quant::QK;
use half::f16;
use rayon::prelude::*;

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;

#[inline]
fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Sub-block `j`'s 6-bit scale and min from a Q4_K/Q5_K block's 12 scale bytes.
#[inline]
fn scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Sub-block `j`'s integers (0..16 or 0..32), scale and offset: element l = `d·q[l] − m`.
fn k_sub_block(ty: GgmlType, b: &[u8], j: usize) -> ([u8; QK], f32, f32) {
    let (d, dmin) = (h(b, 0), h(b, 2));
    let (sc, m) = scale_min(j, &b[4..16]);
    let (p, high) = (j / 2, j % 2 == 1);
    let mut q = [0u8; QK];
    let qs = match ty {
        GgmlType::Q4_K => &b[16 + 32 * p..16 + 32 * (p + 1)],
        _ => &b[48 + 32 * p..48 + 32 * (p + 1)],
    };
    for (l, q) in q.iter_mut().enumerate() {
        *q = if high { qs[l] >> 4 } else { qs[l] & 0xF };
        if ty == GgmlType::Q5_K && b[16 + l] & (1 << j) != 0 {
            *q += 16;
        }
    }
    (q, d * sc as f32, dmin * m as f32)
}

/// Q5_0 / Q5_1 block integers (0..32): element j = `d·(q_j − 16)` or `d·q_j + m`.
fn q5_block(ty: GgmlType, b: &[u8]) -> ([u8; QK], f32, f32) {
    let (d, at) = (h(b, 0), if ty == GgmlType::Q5_1 { 4 } else { 2 });
    let m = if ty == GgmlType::Q5_1 { h(b, 2) } else { 0.0 };
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let qs = &b[at + 4..at + 20];
    let mut q = [0u8; QK];
    for j in 0..16 {
        q[j] = (qs[j] & 0xF) | ((((qh >> j) & 1) as u8) << 4);
        q[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    (q, d, m)
}

/// Dequantizes blocks of a layout this module owns (`src` whole blocks, `out` their
/// elements), with ggml's arithmetic.
pub fn dequantize(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    for (o, b) in out.chunks_exact_mut(be).zip(src.chunks_exact(bb)) {
        match ty {
            GgmlType::Q5_0 => {
                let (q, d, _) = q5_block(ty, b);
                for (o, q) in o.iter_mut().zip(q) {
                    *o = (q as i32 - 16) as f32 * d;
                }
            }
            GgmlType::Q5_1 => {
                let (q, d, m) = q5_block(ty, b);
                for (o, q) in o.iter_mut().zip(q) {
                    *o = q as f32 * d + m;
                }
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                for (j, o) in o.chunks_exact_mut(QK).enumerate() {
                    let (q, d1, m1) = k_sub_block(ty, b, j);
                    for (o, q) in o.iter_mut().zip(q) {
                        *o = d1 * q as f32 - m1;
                    }
                }
            }
            GgmlType::Q6_K => {
                let q = q6_values(b);
                let d = h(b, 208);
                for (i, o) in o.iter_mut().enumerate() {
                    let sc = b[192 + i / 16] as i8;
                    *o = d * sc as f32 * q[i] as f32;
                }
            }
            GgmlType::Q2_K => {
                let (q, d, dmin) = (q2_values(b), h(b, 80), h(b, 82));
                for (i, o) in o.iter_mut().enumerate() {
                    let sc = b[i / 16];
                    *o = d * (sc & 0xF) as f32 * q[i] as f32 - dmin * (sc >> 4) as f32;
                }
            }
            GgmlType::Q3_K => {
                let (q, sc, d) = (q3_values(b), q3_scales(b), h(b, 108));
                for (i, o) in o.iter_mut().enumerate() {
                    *o = d * sc[i / 16] as f32 * q[i] as f32;
                }
            }
            GgmlType::IQ4_NL => {
                let (q, d) = (iq4_values(&b[2..18]), h(b, 0));
                for (o, q) in o.iter_mut().zip(q) {
                    *o = d * q as f32;
                }
            }
            GgmlType::IQ4_XS => {
                for (j, o) in o.chunks_exact_mut(QK).enumerate() {
                    let (q, dl) = iq4_xs_sub_block(b, j);
                    for (o, q) in o.iter_mut().zip(q) {
                        *o = dl * q as f32;
                    }
                }
            }
            other => unreachable!("{other:?} is not a layout of this module"),
        }
    }
}

/// A Q6_K block's 256 integers, −32..32, in element order.
fn q6_values(b: &[u8]) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for half in 0..2 {
        let (ql, qh) = (&b[64 * half..], &b[128 + 32 * half..]);
        let y = &mut q[128 * half..];
        for l in 0..32 {
            let six = |low: u8, shift: u32| (low | (((qh[l] >> shift) & 3) << 4)) as i8 - 32;
            y[l] = six(ql[l] & 0xF, 0);
            y[l + 32] = six(ql[l + 32] & 0xF, 2);
            y[l + 64] = six(ql[l] >> 4, 4);
            y[l + 96] = six(ql[l + 32] >> 4, 6);
        }
    }
    q
}

/// A Q2_K block's 256 integers, 0..4, in element order.
fn q2_values(b: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for (e, q) in q.iter_mut().enumerate() {
        let (half, shift, l) = (e / 128, (e / 32) % 4, e % 32);
        *q = (b[16 + 32 * half + l] >> (2 * shift)) & 3;
    }
    q
}

/// A Q3_K block's 256 integers, −4..4, in element order: two bits in `qs`, and 4 taken
/// away where the element's bit in `hmask` is clear.
fn q3_values(b: &[u8]) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for (e, q) in q.iter_mut().enumerate() {
        let (half, shift, l) = (e / 128, (e / 32) % 4, e % 32);
        let low = ((b[32 + 32 * half + l] >> (2 * shift)) & 3) as i8;
        let high = (b[l] >> (e / 32)) & 1;
        *q = if high == 1 { low } else { low - 4 };
    }
    q
}

/// A Q3_K block's 16 scales, −32..32: 6 bits, the low 4 of scale k in byte k (k < 8, low
/// nibble) or k − 8 (high nibble) of `scales`, the high 2 in byte 8 + k % 4 at bit 2(k / 4).
fn q3_scales(b: &[u8]) -> [i8; 16] {
    let s = &b[96..108];
    std::array::from_fn(|k| {
        let low = if k < 8 { s[k] & 0xF } else { s[k - 8] >> 4 };
        let high = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
        (low | (high << 4)) as i8 - 32
    })
}

/// The 16 levels of the IQ4 layouts (ggml's `kvalues_iq4nl`).
pub(crate) const IQ4_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// 32 elements' levels from 16 bytes of indices: element j's in the low nibble of byte
/// j, element j + 16's in its high nibble.
fn iq4_values(qs: &[u8]) -> [i8; QK] {
    std::array::from_fn(|j| {
        let i = if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
        IQ4_LEVELS[i as usize]
    })
}

/// An IQ4_XS block's sub-block `j` (of 8): its levels and its scale `d·(ls − 32)`, `ls`
/// 6-bit (low 4 bits in `scales_l`, high 2 in `scales_h`).
fn iq4_xs_sub_block(b: &[u8], j: usize) -> ([i8; QK], f32) {
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let low = (b[4 + j / 2] >> (4 * (j % 2))) & 0xF;
    let ls = low | ((((scales_h >> (2 * j)) & 3) as u8) << 4);
    (
        iq4_values(&b[8 + 16 * j..8 + 16 * (j + 1)]),
        h(b, 0) * (ls as i32 - 32) as f32,
    )
}

/// How close a converted layout's values are to the file's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fidelity {
    /// The same values.
    Exact,
    /// The same integers; scales that are products of two of the file's (a K-quant
    /// sub-block's `d·sc`) rounded to f16, ≤ 2⁻¹¹ relative, as the GPU path's f16 weights.
    ScalesToF16,
    /// Requantized: each value within half a Q8_0 step.
    Requantized,
}

/// What a layout becomes in memory for the kernels, and how close its values stay.
pub fn kernel_layout(ty: GgmlType) -> (GgmlType, Fidelity) {
    match ty {
        GgmlType::Q4_K => (GgmlType::Q4_1, Fidelity::ScalesToF16),
        GgmlType::Q5_K | GgmlType::IQ4_XS => (GgmlType::Q8_0, Fidelity::ScalesToF16),
        GgmlType::Q6_K => (GgmlType::Q8_0, Fidelity::Requantized),
        _ => (GgmlType::Q8_0, Fidelity::Exact),
    }
}

/// How close a `rows`-row matrix of `ty` stays to the file's values on this CPU (for the
/// 16- and 8-bit activation products and its rows): as its kernel layout keeps them
/// ([`kernel_layout`]), or exactly where it is packed with its own values
/// ([`packs_exactly`]).
pub fn fidelity(ty: GgmlType, rows: usize) -> Fidelity {
    match packs_exactly(ty, rows) {
        true => Fidelity::Exact,
        false => kernel_layout(ty).1,
    }
}

/// Whether a `rows`-row matrix of `ty` keeps its exact values in the packed kernels'
/// layout ([`exact_packed`]) on this CPU: the layouts whose scales the kernel blocks round
/// (Q4_K, Q5_K, IQ4_XS) or cannot hold (Q6_K), where the packed kernels run and rows come
/// in groups of 16.
pub fn packs_exactly(ty: GgmlType, rows: usize) -> bool {
    matches!(
        ty,
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::IQ4_XS | GgmlType::Q6_K
    ) && crate::packed::available()
        && rows.is_multiple_of(crate::packed::LANES)
}

/// A `rows × cols` matrix of `ty` (`src`, the file's blocks; `converted`, them in the
/// kernel layout) in the packed kernels' layout with its own values, where
/// [`packs_exactly`] says so (else `None`):
/// - Q4_K, Q5_K, IQ4_XS: the converted blocks' integers under each sub-block's scale
///   `d·sc` (and Q4_K's min `−dmin·m`, Q5_K's offset as the kernels' min) in f32 — the
///   product of an f16 and a 6-bit integer, exact — where the blocks round them to f16.
/// - Q6_K: 8-bit `q − 32` and a scale `d·sc` per 16 (an f16 times an i8, exact in f32).
pub fn exact_packed(
    ty: GgmlType,
    rows: usize,
    cols: usize,
    src: &[u8],
    converted: &Converted,
) -> Option<Packed> {
    if !packs_exactly(ty, rows) || src.len() != rows * cols / QK_K * ty.block_bytes() {
        return None;
    }
    if ty != GgmlType::Q6_K {
        // Per 32-element sub-block, in order: its scale, and its min (Q4_K's; kept for it).
        let (scales, mins): (Vec<f32>, Vec<f32>) = src
            .chunks(ty.block_bytes())
            .flat_map(|b| {
                (0..QK_K / QK).map(move |j| match ty {
                    GgmlType::IQ4_XS => (iq4_xs_sub_block(b, j).1, 0.0),
                    _ => {
                        let (_, d1, m1) = k_sub_block(ty, b, j);
                        (d1, -m1)
                    }
                })
            })
            .unzip();
        let mins = if ty == GgmlType::Q4_K {
            mins
        } else {
            Vec::new()
        };
        let pk = Packed::new(converted.ty, rows, cols, &converted.data)?
            .with_exact_scales(&scales, &mins);
        // Q5_K's offsets, as the kernels' mins (as `Matrix::packed` would add them).
        return Some(match &converted.offsets {
            Some(o) if o.run == QK => pk.with_mins(&o.values),
            _ => pk,
        });
    }
    let mut values = vec![0i8; rows * cols];
    let mut scales = vec![0f32; rows * cols / 16];
    values
        .par_chunks_mut(QK_K)
        .zip(scales.par_chunks_mut(QK_K / 16))
        .zip(src.par_chunks(ty.block_bytes()))
        .for_each(|((v, sc), b)| {
            v.copy_from_slice(&q6_values(b));
            let d = h(b, 208);
            for (j, sc) in sc.iter_mut().enumerate() {
                *sc = d * b[192 + j] as i8 as f32;
            }
        });
    Packed::from_i8_runs16(rows, cols, &values, &scales)
}

/// The weights a converted offset covers, for the layouts whose conversion keeps their
/// offsets beside the kernels' blocks ([`Offsets`]): Q5_1 and Q5_K per 32, Q2_K per 16.
pub fn offset_run(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::Q5_1 | GgmlType::Q5_K => Some(QK),
        GgmlType::Q2_K => Some(16),
        _ => None,
    }
}

/// Blocks converted into a kernel layout, and the offsets that go beside them.
pub struct Converted {
    pub ty: GgmlType,
    pub data: Vec<u8>,
    pub offsets: Option<Offsets>,
}

/// Converts whole blocks of `ty` (one of this module's layouts) into the layout the
/// kernels read ([`kernel_layout`]), with offsets where the layout has them
/// ([`offset_run`]); in parallel on the current rayon pool.
pub fn to_kernel_layout(ty: GgmlType, src: &[u8]) -> Converted {
    let (to, _) = kernel_layout(ty);
    let (bb, be) = (ty.block_bytes(), ty.block_elems());
    let (out_bb, per) = (to.block_bytes(), be / QK);
    let n = src.len() / bb;
    let run = offset_run(ty);
    let per_off = run.map_or(0, |r| be / r);
    let mut out = vec![0u8; n * per * out_bb];
    // A slot a block at least, so that the three walk in step (dropped where unused).
    let stride = per_off.max(1);
    let mut off = vec![0f32; n * stride];
    const BLOCKS: usize = 64;
    out.par_chunks_mut(out_bb * per * BLOCKS)
        .zip(src.par_chunks(bb * BLOCKS))
        .zip(off.par_chunks_mut(stride * BLOCKS))
        .for_each(|((o, s), f)| {
            let blocks = o.chunks_exact_mut(out_bb * per).zip(s.chunks_exact(bb));
            for ((o, b), f) in blocks.zip(f.chunks_exact_mut(stride)) {
                convert_block(ty, b, o, &mut f[..per_off]);
            }
        });
    Converted {
        ty: to,
        data: out,
        offsets: run.map(|run| Offsets { run, values: off }),
    }
}

/// One block of `ty` into `out` (kernel blocks) and `off` (its offsets, if it has them).
fn convert_block(ty: GgmlType, b: &[u8], out: &mut [u8], off: &mut [f32]) {
    match ty {
        GgmlType::Q4_K => {
            for (j, o) in out.chunks_exact_mut(20).enumerate() {
                let (q, d1, m1) = k_sub_block(ty, b, j);
                o[0..2].copy_from_slice(&f16::from_f32(d1).to_le_bytes());
                o[2..4].copy_from_slice(&f16::from_f32(-m1).to_le_bytes());
                for i in 0..16 {
                    o[4 + i] = q[i] | (q[i + 16] << 4);
                }
            }
        }
        GgmlType::Q5_0 => {
            let (q, d, _) = q5_block(ty, b);
            // The widest of ×4, ×2 and ×1 whose scale d/k is an exact f16 (d itself is).
            let (k, scale) = [4i32, 2]
                .into_iter()
                .map(|k| (k, f16::from_f32(d / k as f32)))
                .find(|&(k, s)| s.to_f32() * k as f32 == d)
                .unwrap_or((1, f16::from_f32(d)));
            out[0..2].copy_from_slice(&scale.to_le_bytes());
            for (o, q) in out[2..].iter_mut().zip(q) {
                *o = (k * (q as i32 - 16)) as i8 as u8;
            }
        }
        GgmlType::Q3_K => {
            let (q, sc) = (q3_values(b), q3_scales(b));
            let d = f16::from_le_bytes([b[108], b[109]]);
            for (k, o) in out.chunks_exact_mut(34).enumerate() {
                // `sc·q` is −124..=128: 128 (−32·−4) only fits as −128, under `−d`.
                let v: [i32; QK] =
                    std::array::from_fn(|l| sc[(QK * k + l) / 16] as i32 * q[QK * k + l] as i32);
                let flip = v.contains(&128);
                o[0..2].copy_from_slice(&(if flip { -d } else { d }).to_le_bytes());
                for (o, v) in o[2..].iter_mut().zip(v) {
                    *o = (if flip { -v } else { v }) as i8 as u8;
                }
            }
        }
        GgmlType::IQ4_NL => {
            out[0..2].copy_from_slice(&b[0..2]);
            for (o, q) in out[2..].iter_mut().zip(iq4_values(&b[2..18])) {
                *o = q as u8;
            }
        }
        GgmlType::IQ4_XS => {
            for (j, o) in out.chunks_exact_mut(34).enumerate() {
                // The sub-block's scale `d·(ls − 32)` rounded to f16 (≤ 2⁻¹¹ relative).
                let (q, dl) = iq4_xs_sub_block(b, j);
                o[0..2].copy_from_slice(&f16::from_f32(dl).to_le_bytes());
                for (o, q) in o[2..].iter_mut().zip(q) {
                    *o = q as u8;
                }
            }
        }
        GgmlType::Q5_1 => {
            // d·q + m: Q8_0 of scale `d` (an f16, exact) and integers 0..32, offset m.
            let (q, _, m) = q5_block(ty, b);
            out[0..2].copy_from_slice(&b[0..2]);
            for (o, q) in out[2..].iter_mut().zip(q) {
                *o = q;
            }
            off[0] = m;
        }
        GgmlType::Q5_K => {
            for (j, o) in out.chunks_exact_mut(34).enumerate() {
                // d·sc·q − dmin·m: the sub-block's scale rounded to f16 (≤ 2⁻¹¹ relative).
                let (q, d1, m1) = k_sub_block(ty, b, j);
                o[0..2].copy_from_slice(&f16::from_f32(d1).to_le_bytes());
                o[2..].copy_from_slice(&q);
                off[j] = -m1;
            }
        }
        GgmlType::Q2_K => {
            // d·sc·q − dmin·m per 16: Q8_0 of scale `d` and integers sc·q (0..46), the
            // 16's offset −dmin·m. `d·(sc·q)` is `(d·sc)·q` exactly (17 bits at most).
            let q = q2_values(b);
            for (k, o) in out.chunks_exact_mut(34).enumerate() {
                o[0..2].copy_from_slice(&b[80..82]);
                for (l, o) in o[2..].iter_mut().enumerate() {
                    let e = QK * k + l;
                    *o = (b[e / 16] & 0xF) * q[e];
                }
            }
            for (f, sc) in off.iter_mut().zip(&b[..16]) {
                *f = -(h(b, 82) * (sc >> 4) as f32);
            }
        }
        _ => requantize(ty, b, out),
    }
}

/// Dequantizes one block and quantizes it again as Q8_0 blocks.
fn requantize(ty: GgmlType, b: &[u8], out: &mut [u8]) {
    let mut x = [0f32; QK_K];
    let x = &mut x[..ty.block_elems()];
    dequantize(ty, b, x);
    for (c, o) in x.chunks_exact(QK).zip(out.chunks_exact_mut(34)) {
        q8_0_block(c, o);
    }
}

/// One Q8_0 block of `c`, each value at its nearest level under the scale as stored (f16).
fn q8_0_block(c: &[f32], out: &mut [u8]) {
    let amax = c.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = f16::from_f32(amax / 127.0);
    let id = if d.to_f32() > 0.0 {
        1.0 / d.to_f32()
    } else {
        0.0
    };
    out[0..2].copy_from_slice(&d.to_le_bytes());
    for (o, &v) in out[2..].iter_mut().zip(c) {
        *o = ((v * id).round() as i32).clamp(-127, 127) as i8 as u8;
    }
}

// ------------------------------------------------------------ quantizers (synthetic model)

/// Quantizes a row (length a multiple of the block) to `ty`, one of this module's layouts.
pub fn quantize_row(ty: GgmlType, x: &[f32], out: &mut Vec<u8>) {
    for c in x.chunks_exact(ty.block_elems()) {
        match ty {
            GgmlType::Q5_0 | GgmlType::Q5_1 => quantize_q5(ty, c, out),
            GgmlType::Q4_K | GgmlType::Q5_K => quantize_k(ty, c, out),
            GgmlType::Q6_K => quantize_q6_k(c, out),
            GgmlType::Q2_K => quantize_q2_k(c, out),
            GgmlType::Q3_K => quantize_q3_k(c, out),
            GgmlType::IQ4_NL => quantize_iq4_nl(c, out),
            GgmlType::IQ4_XS => quantize_iq4_xs(c, out),
            other => unreachable!("{other:?} is not a layout of this module"),
        }
    }
}

fn quantize_q5(ty: GgmlType, c: &[f32], out: &mut Vec<u8>) {
    let (mn, mx) = c
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (d, m) = if ty == GgmlType::Q5_1 {
        ((mx - mn) / 31.0, mn)
    } else {
        // The value of largest magnitude maps to −16 (ggml's choice).
        let big = if mx.abs() > mn.abs() { mx } else { mn };
        (big / -16.0, 0.0)
    };
    let (d16, m16) = (f16::from_f32(d), f16::from_f32(m));
    let (dr, mr) = (d16.to_f32(), m16.to_f32());
    let id = if dr != 0.0 { 1.0 / dr } else { 0.0 };
    let q: Vec<u32> = c
        .iter()
        .map(|&v| {
            let r = if ty == GgmlType::Q5_1 {
                (v - mr) * id
            } else {
                v * id + 16.0
            };
            (r.round() as i32).clamp(0, 31) as u32
        })
        .collect();
    out.extend_from_slice(&d16.to_le_bytes());
    if ty == GgmlType::Q5_1 {
        out.extend_from_slice(&m16.to_le_bytes());
    }
    let qh = (0..QK).fold(0u32, |a, j| a | ((q[j] >> 4) << j));
    out.extend_from_slice(&qh.to_le_bytes());
    out.extend((0..16).map(|j| ((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4)) as u8));
}

/// A K-quant super-block's sub-blocks of `run` with a scale and a min (Q2_K, Q4_K, Q5_K):
/// `d` and `dmin`, each sub-block's scale and min as integers 0..=`most` of them (rounded
/// up, so that they cover its values), and its elements' integers 0..=`top` (in order).
fn scales_and_mins(
    c: &[f32],
    run: usize,
    top: i32,
    most: i32,
) -> (f16, f16, Vec<u8>, Vec<u8>, Vec<u8>) {
    let topf = top as f32;
    let (mut scales, mut mins) = (Vec::new(), Vec::new());
    for s in c.chunks_exact(run) {
        let mn = s.iter().fold(0f32, |a, &v| a.min(v));
        let mx = s.iter().fold(f32::MIN, |a, &v| a.max(v));
        scales.push((mx - mn) / topf);
        mins.push(-mn);
    }
    let dmin = f16::from_f32(mins.iter().fold(0f32, |a, &v| a.max(v)) / most as f32);
    // The largest scale once the mins are rounded up (by at most one `dmin`).
    let widest = scales.iter().fold(0f32, |a, &v| a.max(v)) + dmin.to_f32() / topf;
    let d = f16::from_f32(widest / most as f32);
    let units = |v: f32, unit: f16| {
        let u = unit.to_f32();
        if u > 0.0 {
            ((v / u).ceil() as i32).clamp(0, most) as u8
        } else {
            0
        }
    };
    let lm: Vec<u8> = mins.iter().map(|&m| units(m, dmin)).collect();
    // Each sub-block's scale from the range its rounded min leaves.
    let mut ls = Vec::with_capacity(lm.len());
    let mut q = Vec::with_capacity(c.len());
    for (s, &lm) in c.chunks_exact(run).zip(&lm) {
        let mx = s.iter().fold(f32::MIN, |a, &v| a.max(v));
        let m1 = dmin.to_f32() * lm as f32;
        let l = units((mx + m1) / topf, d);
        ls.push(l);
        let d1 = d.to_f32() * l as f32;
        let id = if d1 > 0.0 { 1.0 / d1 } else { 0.0 };
        q.extend(
            s.iter()
                .map(|&v| (((v + m1) * id).round() as i32).clamp(0, top) as u8),
        );
    }
    (d, dmin, ls, lm, q)
}

/// Q4_K and Q5_K: per sub-block a scale and a min (≤ 0), both in 6 bits of the block's
/// `d` and `dmin`.
fn quantize_k(ty: GgmlType, c: &[f32], out: &mut Vec<u8>) {
    let top = if ty == GgmlType::Q4_K { 15 } else { 31 };
    let (d, dmin, ls, lm, q) = scales_and_mins(c, QK, top, 63);
    let packed = pack_scale_mins(&ls, &lm);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&packed);
    if ty == GgmlType::Q5_K {
        let mut qh = [0u8; 32];
        for j in 0..8 {
            for l in 0..QK {
                qh[l] |= (q[QK * j + l] >> 4) << j;
            }
        }
        out.extend_from_slice(&qh);
    }
    for p in 0..4 {
        let (lo, hi) = (&q[64 * p..64 * p + 32], &q[64 * p + 32..64 * p + 64]);
        out.extend((0..32).map(|l| (lo[l] & 0xF) | ((hi[l] & 0xF) << 4)));
    }
}

/// The 12 scale bytes of a Q4_K/Q5_K block from its sub-blocks' 6-bit scales and mins
/// (what [`scale_min`] reads).
fn pack_scale_mins(ls: &[u8], lm: &[u8]) -> [u8; 12] {
    let mut packed = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            packed[j] = ls[j];
            packed[j + 4] = lm[j];
        } else {
            packed[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            packed[j - 4] |= (ls[j] >> 4) << 6;
            packed[j] |= (lm[j] >> 4) << 6;
        }
    }
    packed
}

/// Q6_K: per 16 elements an 8-bit scale of the block's `d`.
fn quantize_q6_k(c: &[f32], out: &mut Vec<u8>) {
    let scales: Vec<f32> = c
        .chunks_exact(16)
        .map(|s| s.iter().fold(0f32, |a, &v| a.max(v.abs())) / 31.0)
        .collect();
    let d = f16::from_f32(scales.iter().fold(0f32, |a, &v| a.max(v)) / 127.0);
    // Rounded up, so that each 16's scale covers its values.
    let sc: Vec<i8> = scales
        .iter()
        .map(|&s| {
            if d.to_f32() > 0.0 {
                ((s / d.to_f32()).ceil() as i32).clamp(-128, 127) as i8
            } else {
                0
            }
        })
        .collect();
    let mut q = [0u8; QK_K];
    for (i, &v) in c.iter().enumerate() {
        let step = d.to_f32() * sc[i / 16] as f32;
        let r = if step != 0.0 { (v / step).round() } else { 0.0 };
        q[i] = (r as i32 + 32).clamp(0, 63) as u8;
    }
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for half in 0..2 {
        let y = &q[128 * half..];
        for l in 0..32 {
            ql[64 * half + l] = (y[l] & 0xF) | ((y[l + 64] & 0xF) << 4);
            ql[64 * half + l + 32] = (y[l + 32] & 0xF) | ((y[l + 96] & 0xF) << 4);
            qh[32 * half + l] = (y[l] >> 4)
                | ((y[l + 32] >> 4) << 2)
                | ((y[l + 64] >> 4) << 4)
                | ((y[l + 96] >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&d.to_le_bytes());
}

/// Q2_K: per 16 elements a 4-bit scale of `d` and a 4-bit min of `dmin` (as Q4_K's, in
/// 4 bits, and 2-bit integers).
fn quantize_q2_k(c: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, ls, lm, q) = scales_and_mins(c, 16, 3, 15);
    out.extend((0..16).map(|j| ls[j] | (lm[j] << 4)));
    out.extend((0..64).map(|i| {
        let (half, l) = (i / 32, i % 32);
        (0..4).fold(0u8, |a, shift| {
            a | (q[128 * half + 32 * shift + l] << (2 * shift))
        })
    }));
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
}

/// The value of largest magnitude, with its sign (the first of equals; 0 for none).
fn signed_max(s: &[f32]) -> f32 {
    s.iter()
        .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a })
}

/// Q3_K: per 16 elements a 6-bit signed scale of `d`, 3-bit integers −4..4. As ggml's, the
/// 16 of largest magnitude gets scale −32 and its value of largest magnitude −4, so the
/// products `sc·q` reach 128 (what the conversion to Q8_0 must hold).
fn quantize_q3_k(c: &[f32], out: &mut Vec<u8>) {
    let scales: Vec<f32> = c.chunks_exact(16).map(|s| signed_max(s) / -4.0).collect();
    let d = f16::from_f32(signed_max(&scales) / -32.0);
    // Rounded away from zero, so that each 16's scale covers its values.
    let sc: Vec<i32> = scales
        .iter()
        .map(|&s| {
            let r = if d.to_f32() != 0.0 {
                s / d.to_f32()
            } else {
                0.0
            };
            (r.abs().ceil().copysign(r) as i32).clamp(-32, 31)
        })
        .collect();
    let mut q = [0i32; QK_K];
    for (i, &v) in c.iter().enumerate() {
        let step = d.to_f32() * sc[i / 16] as f32;
        let r = if step != 0.0 { (v / step).round() } else { 0.0 };
        q[i] = (r as i32).clamp(-4, 3);
    }
    let mut hmask = [0u8; 32];
    for (e, &q) in q.iter().enumerate() {
        if q >= 0 {
            hmask[e % 32] |= 1 << (e / 32);
        }
    }
    out.extend_from_slice(&hmask);
    out.extend((0..64).map(|i| {
        let (half, l) = (i / 32, i % 32);
        (0..4).fold(0u8, |a, shift| {
            a | (((q[128 * half + 32 * shift + l] & 3) as u8) << (2 * shift))
        })
    }));
    let ls: Vec<u8> = sc.iter().map(|&s| (s + 32) as u8).collect();
    let mut packed = [0u8; 12];
    for (k, &l) in ls.iter().enumerate() {
        packed[k % 8] |= (l & 0xF) << (4 * (k / 8));
        packed[8 + k % 4] |= (l >> 4) << (2 * (k / 4));
    }
    out.extend_from_slice(&packed);
    out.extend_from_slice(&d.to_le_bytes());
}

/// The index of the IQ4 level nearest `v`.
fn nearest_iq4(v: f32) -> u8 {
    (0..16)
        .min_by(|&a, &b| {
            let da = (v - IQ4_LEVELS[a] as f32).abs();
            let db = (v - IQ4_LEVELS[b] as f32).abs();
            da.total_cmp(&db)
        })
        .unwrap_or(0) as u8
}

/// One IQ4_NL block: `d` the value of largest magnitude over −127 (as ggml's).
fn quantize_iq4_nl(c: &[f32], out: &mut Vec<u8>) {
    let d = f16::from_f32(signed_max(c) / -127.0);
    out.extend_from_slice(&d.to_le_bytes());
    iq4_indices(c, d.to_f32(), out);
}

/// 32 elements' nearest IQ4 levels under `step`, as 16 bytes of index pairs.
fn iq4_indices(c: &[f32], step: f32, out: &mut Vec<u8>) {
    let inv = if step != 0.0 { 1.0 / step } else { 0.0 };
    let idx: Vec<u8> = c.iter().map(|&v| nearest_iq4(v * inv)).collect();
    out.extend((0..16).map(|j| idx[j] | (idx[j + 16] << 4)));
}

/// IQ4_XS: per 32 elements a 6-bit signed scale `ls − 32` of the block's `d`.
fn quantize_iq4_xs(c: &[f32], out: &mut Vec<u8>) {
    let scales: Vec<f32> = c.chunks_exact(QK).map(|s| signed_max(s) / -127.0).collect();
    let d = f16::from_f32(signed_max(&scales) / -32.0);
    let ls: Vec<u16> = scales
        .iter()
        .map(|&s| {
            let l = if d.to_f32() != 0.0 {
                (s / d.to_f32()).round() as i32
            } else {
                0
            };
            (l.clamp(-32, 31) + 32) as u16
        })
        .collect();
    out.extend_from_slice(&d.to_le_bytes());
    let high = (0..8).fold(0u16, |a, j| a | ((ls[j] >> 4) << (2 * j)));
    out.extend_from_slice(&high.to_le_bytes());
    out.extend((0..4).map(|i| ((ls[2 * i] & 0xF) | ((ls[2 * i + 1] & 0xF) << 4)) as u8));
    for (j, s) in c.chunks_exact(QK).enumerate() {
        iq4_indices(s, d.to_f32() * (ls[j] as i32 - 32) as f32, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::{MatData, Matrix};
    use crate::quant;

    /// The layouts of uniform levels (a step and an offset per block or sub-block).
    const TYPES: [GgmlType; 7] = [
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];
    /// The layouts of 16 non-uniform levels.
    const IQ4: [GgmlType; 2] = [GgmlType::IQ4_NL, GgmlType::IQ4_XS];

    /// Weights-like values: mostly small, a few outliers, some rows all of one sign.
    fn row(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let shift = if (i / 256) % 3 == 2 { 0.6 } else { 0.0 };
                if i % 97 == 0 {
                    4.0 * u
                } else {
                    0.05 * u + shift * 0.05
                }
            })
            .collect()
    }

    fn dequant(ty: GgmlType, b: &[u8], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; n];
        quant::dequantize_row(ty, b, &mut y);
        y
    }

    /// Each element's quantization step in a row of `ty` blocks.
    fn steps(ty: GgmlType, b: &[u8]) -> Vec<f32> {
        let mut out = Vec::new();
        for b in b.chunks_exact(ty.block_bytes()) {
            match ty {
                GgmlType::Q5_0 | GgmlType::Q5_1 => out.extend([q5_block(ty, b).1; QK]),
                GgmlType::Q4_K | GgmlType::Q5_K => {
                    (0..8).for_each(|j| out.extend([k_sub_block(ty, b, j).1; QK]))
                }
                GgmlType::Q2_K => {
                    (0..16).for_each(|i| out.extend([h(b, 80) * (b[i] & 0xF) as f32; 16]))
                }
                GgmlType::Q3_K => q3_scales(b)
                    .iter()
                    .for_each(|&s| out.extend([h(b, 108) * s as f32; 16])),
                _ => (0..16).for_each(|i| out.extend([h(b, 208) * (b[192 + i] as i8) as f32; 16])),
            }
        }
        out
    }

    #[test]
    fn quantizers_round_trip_to_the_nearest_level() {
        for ty in TYPES {
            let x = row(4 * QK_K, ty.id() as u64);
            let mut b = Vec::new();
            quantize_row(ty, &x, &mut b);
            assert_eq!(
                b.len(),
                x.len() / ty.block_elems() * ty.block_bytes(),
                "{ty:?}"
            );
            let y = dequant(ty, &b, x.len());
            // Within half a step of each element's scale (Q5_0, Q3_K: a step, as ggml's:
            // the value of largest magnitude maps to −16 (−4), its opposite may clamp at
            // 15 (3)), so nothing was clamped and the levels are the nearest.
            let half = match ty {
                GgmlType::Q5_0 | GgmlType::Q3_K => 1.0,
                _ => 0.52,
            };
            let mut err = 0f64;
            for (i, ((a, b), step)) in x.iter().zip(&y).zip(steps(ty, &b)).enumerate() {
                assert!(
                    (a - b).abs() <= half * step.abs() + 1e-7,
                    "{ty:?} element {i}: {a} became {b} (step {step})"
                );
                err += ((a - b) as f64).powi(2);
            }
            let rms = (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / err).sqrt();
            // Four levels a 16 (Q2_K) hold these rows' outliers less well.
            let floor = if ty == GgmlType::Q2_K { 2.0 } else { 5.0 };
            assert!(rms > floor, "{ty:?}: signal / error {rms}");
        }
    }

    #[test]
    fn iq4_quantizers_pick_the_nearest_level() {
        for ty in IQ4 {
            let x = row(4 * QK_K, ty.id() as u64);
            let mut b = Vec::new();
            quantize_row(ty, &x, &mut b);
            assert_eq!(b.len(), x.len() / ty.block_elems() * ty.block_bytes());
            let y = dequant(ty, &b, x.len());
            // Each 32's step: the block's `d` (IQ4_NL) or the sub-block's `d·(ls − 32)`.
            let steps: Vec<f32> = b
                .chunks_exact(ty.block_bytes())
                .flat_map(|b| match ty {
                    GgmlType::IQ4_NL => vec![h(b, 0)],
                    _ => (0..8).map(|j| iq4_xs_sub_block(b, j).1).collect(),
                })
                .collect();
            let mut err = 0f64;
            for (i, (&a, &v)) in x.iter().zip(&y).enumerate() {
                let step = steps[i / QK];
                let best = IQ4_LEVELS
                    .iter()
                    .map(|&l| (a - step * l as f32).abs())
                    .fold(f32::MAX, f32::min);
                assert!(
                    (a - v).abs() <= best + 1e-7,
                    "{ty:?} element {i}: {a} became {v}, a level {best} away exists"
                );
                err += ((a - v) as f64).powi(2);
            }
            let rms = (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / err).sqrt();
            assert!(rms > 5.0, "{ty:?}: signal / error {rms}");
        }
    }

    #[test]
    fn conversion_keeps_values_or_stays_within_half_a_q8_step() {
        for ty in TYPES.into_iter().chain(IQ4) {
            let x = row(8 * QK_K, 100 + ty.id() as u64);
            let mut b = Vec::new();
            quantize_row(ty, &x, &mut b);
            let want = dequant(ty, &b, x.len());
            let c = to_kernel_layout(ty, &b);
            assert_eq!(
                (c.ty, c.data.len()),
                (kernel_layout(ty).0, x.len() / QK * c.ty.block_bytes())
            );
            assert_eq!(c.offsets.as_ref().map(|o| o.run), offset_run(ty), "{ty:?}");
            // As the model holds it: the kernels' blocks and the offsets beside them.
            let mut m = Matrix::new(1, x.len(), MatData::Quant(c.ty, c.data));
            if let Some(o) = c.offsets {
                m = m.with_offsets(o);
            }
            let mut got = vec![0f32; x.len()];
            m.row_f32(0, &mut got);
            for (k, (w, g)) in want.chunks(QK).zip(got.chunks(QK)).enumerate() {
                let amax = w.iter().fold(0f32, |a, &v| a.max(v.abs()));
                let tol = match ty {
                    // f16 rounding of the sub-block's scale (and Q4_K's offset).
                    GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::IQ4_XS => amax * 2.0f32.powi(-10),
                    GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q2_K => 0.0,
                    GgmlType::Q3_K | GgmlType::IQ4_NL => 0.0,
                    // Half a Q8_0 step (of the f16 scale, up to 2⁻¹¹ above amax / 127).
                    _ => amax / 127.0 * 0.501,
                };
                for (a, b) in w.iter().zip(g) {
                    assert!((a - b).abs() <= tol, "{ty:?} block {k}: {a} became {b}");
                }
            }
        }
    }

    /// As the model loads them: the kernel blocks, the exact packed form, the offsets.
    fn loaded(ty: GgmlType, rows: usize, cols: usize, b: &[u8]) -> (Matrix, bool) {
        let c = to_kernel_layout(ty, b);
        let pk = exact_packed(ty, rows, cols, b, &c);
        let exact = pk.is_some();
        let mut m = Matrix::new(rows, cols, MatData::Quant(c.ty, c.data));
        if let Some(pk) = pk {
            m = m.with_exact_packed(pk);
        }
        if let Some(o) = c.offsets {
            m = m.with_offsets(o);
        }
        (m, exact)
    }

    #[test]
    fn rounded_and_per_16_scales_pack_with_their_own_values_where_the_packed_kernels_run() {
        let (rows, cols) = (32, 2 * QK_K);
        for ty in [
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::IQ4_XS,
            GgmlType::Q6_K,
        ] {
            let x = row(rows * cols, 61 + ty.id() as u64);
            let mut b = Vec::new();
            quantize_row(ty, &x, &mut b);
            let want = dequant(ty, &b, x.len());
            let (m, exact) = loaded(ty, rows, cols, &b);
            assert_eq!(exact, crate::packed::available(), "{ty:?}");
            assert_eq!(fidelity(ty, rows) == Fidelity::Exact, exact, "{ty:?}");
            // Rows not in groups of 16 keep their conversion.
            let part = &b[..b.len() / 4 * 3];
            assert!(exact_packed(ty, 24, cols, part, &to_kernel_layout(ty, part)).is_none());
            if !exact {
                eprintln!("no packed kernels here: {ty:?} keeps its conversion");
                continue;
            }
            let mut got = vec![0f32; cols];
            for n in 0..rows {
                m.row_f32(n, &mut got);
                assert_eq!(got[..], want[n * cols..(n + 1) * cols], "{ty:?} row {n}");
            }
            // The products: within the 16-bit activations' rounding (1/65534 of a block's
            // largest, against Σ|x|·the row's largest |w|: the Q4_K mins cancel much of
            // `d·sc·q`) of the file's values.
            let mut acts = crate::matmul::Acts::default();
            acts.resize(1, cols);
            acts.row_mut(0).copy_from_slice(&row(cols, 5));
            let mut out = vec![0f32; rows];
            crate::matmul::matmul(&m, &mut acts, &mut out, crate::matmul::ActPrecision::I16);
            let x: Vec<f64> = acts.row(0).iter().map(|&v| v as f64).collect();
            for (n, &o) in out.iter().enumerate() {
                let w = &want[n * cols..(n + 1) * cols];
                let exp: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * b).sum();
                let wmax = w.iter().fold(0f64, |a, &v| a.max(v.abs() as f64));
                let size = wmax * x.iter().map(|v| v.abs()).sum::<f64>();
                assert!(
                    (o as f64 - exp).abs() <= 4e-5 * size,
                    "{ty:?} row {n}: {o} vs {exp}"
                );
            }
        }
        // Other layouts keep theirs.
        let mut b = Vec::new();
        quantize_row(GgmlType::Q3_K, &row(16 * QK_K, 3), &mut b);
        let c = to_kernel_layout(GgmlType::Q3_K, &b);
        assert!(exact_packed(GgmlType::Q3_K, 16, QK_K, &b, &c).is_none());
    }

    #[test]
    fn q3_k_products_of_128_are_held_under_a_negated_scale() {
        // As ggml's, the quantizer gives the largest 16 scale −32 and its largest value
        // −4: the product 128 is no i8, −128 is.
        let x = row(8 * QK_K, 7);
        let mut b = Vec::new();
        quantize_row(GgmlType::Q3_K, &x, &mut b);
        let c = to_kernel_layout(GgmlType::Q3_K, &b).data;
        let flipped: Vec<&[u8]> = c
            .chunks_exact(34)
            .filter(|o| h(o, 0) < 0.0 && o[2..].contains(&0x80))
            .collect();
        assert!(!flipped.is_empty(), "no block held a product of 128");
        assert_eq!(
            dequant(GgmlType::Q8_0, &c, x.len()),
            dequant(GgmlType::Q3_K, &b, x.len())
        );
    }

    #[test]
    fn q5_0_whose_quarter_scale_is_not_an_f16_keeps_its_values() {
        // d = 3·2⁻²⁴ (an f16 subnormal): neither d/4 nor d/2 is an f16, so d itself;
        // d = 6·2⁻²⁴: d/2 is.
        for (bits, k) in [(3u16, 1i32), (6, 2), (0x3c00, 4)] {
            let d = f16::from_bits(bits);
            let mut b = d.to_le_bytes().to_vec();
            b.extend_from_slice(&0xFFFF_0000u32.to_le_bytes());
            b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
            let want = dequant(GgmlType::Q5_0, &b, QK);
            let Converted {
                ty: to, data: c, ..
            } = to_kernel_layout(GgmlType::Q5_0, &b);
            assert_eq!(to, GgmlType::Q8_0);
            let got = dequant(GgmlType::Q8_0, &c, QK);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "d bits {bits}: {got:?} against {want:?}"
            );
            assert_eq!(
                f16::from_le_bytes([c[0], c[1]]).to_f32() * k as f32,
                d.to_f32()
            );
        }
    }

    #[test]
    fn scales_and_mins_pack_as_ggml_reads_them() {
        // Every 6-bit pair packed comes back through scale_min.
        for base in [0u8, 17, 40, 63] {
            let ls: [u8; 8] = std::array::from_fn(|j| (base + 7 * j as u8) % 64);
            let lm: [u8; 8] = std::array::from_fn(|j| (base + 11 * j as u8 + 5) % 64);
            let packed = pack_scale_mins(&ls, &lm);
            for j in 0..8 {
                assert_eq!(scale_min(j, &packed), (ls[j], lm[j]), "sub-block {j}");
            }
        }
    }
}
