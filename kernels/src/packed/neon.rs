//! The packed kernels on aarch64 ([`super::Kernel::Neon`], [`super::Kernel::NeonDot`]): the
//! same interleaved layout and the same results, bit for bit, as the x86 kernels and the
//! scalar twins, for ARM servers (AWS Graviton, Ampere, NVIDIA Grace beside a GPU).
//!
//! A 128-bit register holds 4 of a group's 16 rows as 32-bit sums, so a tile's integer
//! sums take 4 registers per activation row; at 4 activation rows (16 sums, the unpacked
//! weights and the activations) the tile fits NEON's 32 registers ([`super::Kernel::tiles`]).
//! The float outputs are updated once a block.
//!
//! - 16-bit activations (and, without the dot-product extension, 8-bit ones widened to 16
//!   bits): a pair's weights unpack to 16-bit lanes (nibbles: `and`/`ushr` then `uxtl`; i8
//!   pairs: `ld2` then `sxtl`) and each is multiplied by one activation, taken from a
//!   register by lane (`smlal`/`smlal2` by element): 4 products an instruction.
//! - 8-bit activations with the dot-product extension (ARMv8.2 `dotprod`: Graviton 2 and
//!   later, Neoverse, Grace, Apple M1 and later): two pairs' nibbles are zipped into one
//!   byte quad per row and `sdot` by element multiplies 4 rows' quads by one activation
//!   quad: 16 products an instruction. Its intrinsics are not stable in Rust, so `sdot` is
//!   written as inline assembly.
//!
//! The integer sums are exact either way (at most 32 · 15 · 32767, or 32 · 128 · 32767 for
//! 8-bit weights), and the block's epilogue is the scalar twins':
//! `out = fma(float(acc) · d, scale, out)`, then `fma(min, s, ·)` (`fmla`, fused).

use super::{Packed, LANES};
use crate::quant::{Q8Block, QK};
use std::arch::aarch64::*;
use std::array::from_fn;

/// A block's integer sums for a group's 16 rows, 4 rows a register, per activation row.
type Sums<const R: usize> = [[int32x4_t; 4]; R];

/// See [`Packed::dot_rows_groups`]: 16-bit activations (`Q8W`: 8-bit weight pairs, else
/// nibble pairs; `RUNS` scales a block).
#[target_feature(enable = "neon")]
pub unsafe fn dot_rows<const R: usize, const Q8W: bool, const RUNS: usize>(
    pk: &Packed,
    groups: std::ops::Range<usize>,
    q: [&[i16]; R],
    d: [&[f32]; R],
    xsum: [&[f32]; R],
    put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
) {
    each_block::<R, RUNS>(pk, groups, put, |i, v, h| {
        // Inputs 8k .. 8k + 8 of this scale's 32 (or 16).
        let ks = h * 4 / RUNS..(h + 1) * 4 / RUNS;
        let acc = block_i16::<R, Q8W>(v, ks, |r, k| vld1q_s16(q[r].as_ptr().add(i * QK + 8 * k)));
        let dr = from_fn(|r| *d[r].get_unchecked(i));
        let mins = (!Q8W || pk.has_mins()).then(|| from_fn(|r| *xsum[r].get_unchecked(i)));
        (acc, dr, mins)
    })
}

/// See [`Packed::dot_rows_q8_groups`], without the dot-product extension: the activation
/// bytes widened to 16 bits, then as [`dot_rows`].
#[target_feature(enable = "neon")]
pub unsafe fn dot_rows_q8<const R: usize>(
    pk: &Packed,
    groups: std::ops::Range<usize>,
    a: [&[Q8Block]; R],
    put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
) {
    each_block::<R, 1>(pk, groups, put, |i, v, _| {
        let acc = block_i16::<R, false>(v, 0..QK / 8, |r, k| {
            vmovl_s8(vld1_s8(a[r].get_unchecked(i).qs.as_ptr().add(8 * k)))
        });
        q8_block_result(a, i, acc)
    })
}

/// See [`Packed::dot_rows_q8_groups`], with the dot-product extension (`sdot`).
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn dot_rows_q8_dot<const R: usize>(
    pk: &Packed,
    groups: std::ops::Range<usize>,
    a: [&[Q8Block]; R],
    put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
) {
    each_block::<R, 1>(pk, groups, put, |i, v, _| {
        // Activation quads 0..4 and 4..8 of each row's block.
        let x: [[int8x16_t; 2]; R] = from_fn(|r| {
            let qs = a[r].get_unchecked(i).qs.as_ptr();
            [vld1q_s8(qs), vld1q_s8(qs.add(16))]
        });
        let mut acc = [[vdupq_n_s32(0); 4]; R];
        quad_dot::<0, R>(&mut acc, v, 0, &x);
        quad_dot::<1, R>(&mut acc, v, 1, &x);
        quad_dot::<2, R>(&mut acc, v, 2, &x);
        quad_dot::<3, R>(&mut acc, v, 3, &x);
        quad_dot::<0, R>(&mut acc, v, 4, &x);
        quad_dot::<1, R>(&mut acc, v, 5, &x);
        quad_dot::<2, R>(&mut acc, v, 6, &x);
        quad_dot::<3, R>(&mut acc, v, 7, &x);
        q8_block_result(a, i, acc)
    })
}

/// Runs `block(i, packed bytes, h)` over each group's blocks in order, for each of the
/// block's `RUNS` scales `h` (it gives the integer sums of the scale's values, the
/// activation rows' block scales and, where weights have mins, block sums), adds each into
/// the group's outputs (the mins after the last scale's) and hands them to `put`.
#[inline(always)]
unsafe fn each_block<const R: usize, const RUNS: usize>(
    pk: &Packed,
    groups: std::ops::Range<usize>,
    put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
    mut block: impl FnMut(usize, *const u8, usize) -> (Sums<R>, [f32; R], Option<[f32; R]>),
) {
    let (nb, vb) = (pk.nb, Packed::vb(pk.ty));
    for g in groups {
        let mut out = [[0f32; LANES]; R];
        for i in 0..nb {
            let gi = g * nb + i;
            for h in 0..RUNS {
                let (acc, d, s) = block(i, pk.vals.as_ptr().add(gi * vb), h);
                let s = s.filter(|_| h + 1 == RUNS);
                add_block(pk, pk.scale_at(gi, h), gi * LANES, &mut out, &acc, d, s);
            }
        }
        put(g, &out);
    }
}

/// A block's sums with 8-bit activation block `i`'s scale and scaled sum.
#[inline(always)]
unsafe fn q8_block_result<const R: usize>(
    a: [&[Q8Block]; R],
    i: usize,
    acc: Sums<R>,
) -> (Sums<R>, [f32; R], Option<[f32; R]>) {
    let d = from_fn(|r| a[r].get_unchecked(i).d);
    let s = from_fn(|r| a[r].get_unchecked(i).s);
    (acc, d, Some(s))
}

/// One block's integer sums at 16 bits over inputs `8k .. 8k + 8` for `k` in `ks` (all
/// four, or a scale's two): `xs(r, k)` is those inputs of activation row `r`'s block; pair
/// `4k + j` takes its lanes `2j` and `2j + 1`.
#[inline(always)]
unsafe fn block_i16<const R: usize, const Q8W: bool>(
    v: *const u8,
    ks: std::ops::Range<usize>,
    xs: impl Fn(usize, usize) -> int16x8_t,
) -> Sums<R> {
    let mut acc = [[vdupq_n_s32(0); 4]; R];
    for k in ks {
        let x: [int16x8_t; R] = from_fn(|r| xs(r, k));
        pair_i16::<0, 1, R, Q8W>(&mut acc, v, 4 * k, &x);
        pair_i16::<2, 3, R, Q8W>(&mut acc, v, 4 * k + 1, &x);
        pair_i16::<4, 5, R, Q8W>(&mut acc, v, 4 * k + 2, &x);
        pair_i16::<6, 7, R, Q8W>(&mut acc, v, 4 * k + 3, &x);
    }
    acc
}

/// Pair `p`'s weights for the 16 rows as 16-bit lanes: first inputs of rows 0–7, of rows
/// 8–15, then the second inputs likewise.
#[inline(always)]
unsafe fn pair_weights<const Q8W: bool>(v: *const u8, p: usize) -> [int16x8_t; 4] {
    if Q8W {
        // Row l: bytes 2l, 2l + 1 of the pair's 32 (`ld2` splits firsts from seconds).
        let b = vld2q_s8(v.add(32 * p) as *const i8);
        [
            vmovl_s8(vget_low_s8(b.0)),
            vmovl_high_s8(b.0),
            vmovl_s8(vget_low_s8(b.1)),
            vmovl_high_s8(b.1),
        ]
    } else {
        // Row l: byte l = v0 | v1 << 4.
        let b = vld1q_u8(v.add(16 * p));
        let (lo, hi) = (vandq_u8(b, vdupq_n_u8(15)), vshrq_n_u8::<4>(b));
        [
            vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(lo))),
            vreinterpretq_s16_u16(vmovl_high_u8(lo)),
            vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(hi))),
            vreinterpretq_s16_u16(vmovl_high_u8(hi)),
        ]
    }
}

/// Adds pair `p`'s products into every row's sums: its first input times lane `L0` of each
/// activation register, its second times lane `L1`.
#[inline(always)]
unsafe fn pair_i16<const L0: i32, const L1: i32, const R: usize, const Q8W: bool>(
    acc: &mut Sums<R>,
    v: *const u8,
    p: usize,
    x: &[int16x8_t; R],
) {
    let w = pair_weights::<Q8W>(v, p);
    for r in 0..R {
        let a = &mut acc[r];
        a[0] = vmlal_laneq_s16::<L0>(a[0], vget_low_s16(w[0]), x[r]);
        a[1] = vmlal_high_laneq_s16::<L0>(a[1], w[0], x[r]);
        a[2] = vmlal_laneq_s16::<L0>(a[2], vget_low_s16(w[1]), x[r]);
        a[3] = vmlal_high_laneq_s16::<L0>(a[3], w[1], x[r]);
        a[0] = vmlal_laneq_s16::<L1>(a[0], vget_low_s16(w[2]), x[r]);
        a[1] = vmlal_high_laneq_s16::<L1>(a[1], w[2], x[r]);
        a[2] = vmlal_laneq_s16::<L1>(a[2], vget_low_s16(w[3]), x[r]);
        a[3] = vmlal_high_laneq_s16::<L1>(a[3], w[3], x[r]);
    }
}

/// Adds quad `k`'s products (inputs `4k .. 4k + 4`, nibble pairs `2k` and `2k + 1`) into
/// every row's sums, the activation quad being lane `L` of register `k / 4`.
#[inline(always)]
unsafe fn quad_dot<const L: u32, const R: usize>(
    acc: &mut Sums<R>,
    v: *const u8,
    k: usize,
    x: &[[int8x16_t; 2]; R],
) {
    let (a, b) = (vld1q_u8(v.add(32 * k)), vld1q_u8(v.add(32 * k + 16)));
    let m = vdupq_n_u8(15);
    // Row l: (v0, v1) from byte l of pair 2k, (v2, v3) from byte l of pair 2k + 1.
    let (a0, a1) = (vandq_u8(a, m), vshrq_n_u8::<4>(a));
    let (b0, b1) = (vandq_u8(b, m), vshrq_n_u8::<4>(b));
    let (za, zb) = (
        [vzip1q_u8(a0, a1), vzip2q_u8(a0, a1)],
        [vzip1q_u8(b0, b1), vzip2q_u8(b0, b1)],
    );
    let u16s = vreinterpretq_u16_u8;
    // Rows 4j .. 4j + 4, a quad each: (v0, v1, v2, v3).
    let w: [int8x16_t; 4] = [
        vreinterpretq_s8_u16(vzip1q_u16(u16s(za[0]), u16s(zb[0]))),
        vreinterpretq_s8_u16(vzip2q_u16(u16s(za[0]), u16s(zb[0]))),
        vreinterpretq_s8_u16(vzip1q_u16(u16s(za[1]), u16s(zb[1]))),
        vreinterpretq_s8_u16(vzip2q_u16(u16s(za[1]), u16s(zb[1]))),
    ];
    for r in 0..R {
        for j in 0..4 {
            acc[r][j] = sdot_lane::<L>(acc[r][j], w[j], x[r][k / 4]);
        }
    }
}

/// `acc[i] += Σ_k w[4i + k] · x[4L + k]` (signed bytes): `sdot` by element.
#[inline(always)]
unsafe fn sdot_lane<const L: u32>(mut acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    std::arch::asm!(
        "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{l}]",
        acc = inout(vreg) acc,
        w = in(vreg) w,
        x = in(vreg) x,
        l = const L,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// Adds a block's integer sums into the outputs, in the order of the scalar twins:
/// `out[r] = fma(float(acc[r]) · d[r], scale, out[r])` with the 16 rows' scales at
/// `scales[sc..]`, then `fma(min, s[r], ·)` with their mins at `mins[mn..]`.
#[inline(always)]
unsafe fn add_block<const R: usize>(
    pk: &Packed,
    sc: usize,
    mn: usize,
    out: &mut [[f32; LANES]; R],
    acc: &Sums<R>,
    d: [f32; R],
    s: Option<[f32; R]>,
) {
    let sc: [float32x4_t; 4] = from_fn(|j| vld1q_f32(pk.scales.as_ptr().add(sc + 4 * j)));
    let mins: Option<[float32x4_t; 4]> =
        s.map(|_| from_fn(|j| vld1q_f32(pk.mins.as_ptr().add(mn + 4 * j))));
    for r in 0..R {
        for j in 0..4 {
            let o = out[r].as_mut_ptr().add(4 * j);
            let f = vmulq_n_f32(vcvtq_f32_s32(acc[r][j]), d[r]);
            let mut y = vfmaq_f32(vld1q_f32(o), f, sc[j]);
            if let (Some(mn), Some(s)) = (mins, s) {
                y = vfmaq_n_f32(y, mn[j], s[r]);
            }
            vst1q_f32(o, y);
        }
    }
}
