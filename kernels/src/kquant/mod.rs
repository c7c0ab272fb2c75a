//! The GGUF block layouts the matrix kernels do not read as they are: Q5_0, Q5_1, the
//! K-quants Q2_K … Q6_K and the non-linear IQ4_NL, IQ4_XS (llama.cpp's Q2_K, Q3_K_x,
//! Q4_K_x, Q5_K_x, Q6_K and IQ4 files are made of them, with Q4_0, Q5_0, Q5_1, Q8_0 and
//! IQ4_NL for rows whose length is not a multiple of 256). This module owns their
//! dequantization (ggml's layouts and arithmetic), their conversion at load into the
//! layouts the kernels read ([`to_kernel_layout`]), and quantizers for the synthetic model
//! writer. This file has the layouts and their dequantization; `convert.rs` the conversion,
//! `quantize.rs` the quantizers.
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

mod convert;
mod quantize;
#[cfg(test)]
mod tests;

pub use convert::{
    exact_packed, fidelity, kernel_layout, offset_run, packs_exactly, to_kernel_layout, Converted,
    Fidelity,
};
pub use quantize::quantize_row;

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
