//! The packed kernels on AVX2 ([`super::Kernel::Avx2`], [`super::Kernel::AvxVnni`]): the
//! same interleaved layout and the same results, bit for bit, as the AVX-512 VNNI kernel
//! and the scalar twins, for CPUs without AVX-512 (AMD before Zen 4, Intel client cores).
//!
//! A 256-bit register holds 8 of a group's 16 rows, so a group is computed in two halves
//! (rows `16g .. 16g + 8`, then `+ 8 .. + 16`), each a pass over the group's blocks: its
//! bytes are read from memory on the first pass and from L1 on the second. Per half, a
//! tile's integer sums (one register per activation row) and its float outputs (one per
//! row) fit AVX2's 16 registers up to 6 activation rows; with AVX-VNNI (no temporaries)
//! tiles of 8 measured faster, their float outputs spilled to L1 once a block
//! ([`super::Kernel::tiles`]).
//!
//! The integer sums are exact either way: with AVX-VNNI one `vpdpwssd` (16-bit
//! activations) or `vpdpbusd` (8-bit) adds a pair's (a quad's) products into each row's sum;
//! on plain AVX2 `vpmaddwd` makes the pair sums and `vpaddd` adds them (for 8-bit
//! activations `vpmaddubsw` first makes pair sums of at most 2 · 15 · 127, which do not
//! saturate, and `vpmaddwd` by ones the quad sums).

use super::{Packed, LANES};
use crate::quant::{Q8Block, QK};
use std::arch::x86_64::*;
use std::array::from_fn;

/// Rows a register holds.
const HALF: usize = LANES / 2;

/// See [`Packed::dot_rows_groups`]; plain AVX2 (`RUNS` scales a block).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_rows<const R: usize, const Q8W: bool, const RUNS: usize>(
    pk: &Packed,
    groups: std::ops::Range<usize>,
    q: [&[i16]; R],
    d: [&[f32]; R],
    xsum: [&[f32]; R],
    put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
) {
    i16_rows::<R, Q8W, RUNS, false>(pk, groups, q, d, xsum, put)
}

/// See [`Packed::dot_rows_groups`]; AVX2 with AVX-VNNI (`RUNS` scales a block).
#[target_feature(enable = "avx2,fma,avxvnni")]
pub unsafe fn dot_rows_vnni<const R: usize, const Q8W: bool, const RUNS: usize>(
    pk: &Packed,
    groups: std::ops::Range<usize>,
    q: [&[i16]; R],
    d: [&[f32]; R],
    xsum: [&[f32]; R],
    put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
) {
    i16_rows::<R, Q8W, RUNS, true>(pk, groups, q, d, xsum, put)
}

/// See [`Packed::dot_rows_q8_groups`]; plain AVX2.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_rows_q8<const R: usize>(
    pk: &Packed,
    groups: std::ops::Range<usize>,
    a: [&[Q8Block]; R],
    put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
) {
    q8_rows::<R, false>(pk, groups, a, put)
}

/// See [`Packed::dot_rows_q8_groups`]; AVX2 with AVX-VNNI.
#[target_feature(enable = "avx2,fma,avxvnni")]
pub unsafe fn dot_rows_q8_vnni<const R: usize>(
    pk: &Packed,
    groups: std::ops::Range<usize>,
    a: [&[Q8Block]; R],
    put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
) {
    q8_rows::<R, true>(pk, groups, a, put)
}

/// 16-bit activations against nibble pairs (or, `Q8W`, i8 pairs) with `RUNS` scales a
/// block; `VNNI`: with `vpdpwssd`. Inlined into the entry points above, which enable the
/// instructions.
#[inline(always)]
unsafe fn i16_rows<const R: usize, const Q8W: bool, const RUNS: usize, const VNNI: bool>(
    pk: &Packed,
    groups: std::ops::Range<usize>,
    q: [&[i16]; R],
    d: [&[f32]; R],
    xsum: [&[f32]; R],
    put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
) {
    let nb = pk.nb;
    let vb = Packed::vb(pk.ty);
    let nibbles = _mm256_set1_epi32(0x000F_000F);
    for g in groups {
        let mut res = [[0f32; LANES]; R];
        for h in 0..2 {
            let mut out = [_mm256_setzero_ps(); R];
            for i in 0..nb {
                let gi = g * nb + i;
                let v = pk.vals.as_ptr().add(gi * vb);
                let dr = from_fn(|r| *d[r].get_unchecked(i));
                // Pairs of each scale (all 16, or 8 and 8), then the mins once.
                let pairs = QK / 2 / RUNS;
                for run in 0..RUNS {
                    let mut acc = [_mm256_setzero_si256(); R];
                    for pp in 0..pairs {
                        let p = run * pairs + pp;
                        let w = if Q8W {
                            // Lane l: bytes 2l, 2l + 1 of the pair's 32 → i16 pair.
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(
                                v.add(32 * p + 2 * HALF * h) as *const __m128i
                            ))
                        } else {
                            // Lane l: byte b = v0 | v1 << 4 → i16 pair (v0, v1).
                            let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                v.add(16 * p + HALF * h) as *const __m128i
                            ));
                            _mm256_and_si256(
                                _mm256_or_si256(b, _mm256_slli_epi32::<12>(b)),
                                nibbles,
                            )
                        };
                        for r in 0..R {
                            let pair =
                                (q[r].as_ptr().add(i * QK + 2 * p) as *const i32).read_unaligned();
                            let x = _mm256_set1_epi32(pair);
                            acc[r] = if VNNI {
                                _mm256_dpwssd_avx_epi32(acc[r], w, x)
                            } else {
                                _mm256_add_epi32(acc[r], _mm256_madd_epi16(w, x))
                            };
                        }
                    }
                    let mins = (run + 1 == RUNS && (!Q8W || pk.has_mins()))
                        .then(|| from_fn(|r| *xsum[r].get_unchecked(i)));
                    let sc = pk.scale_at(gi, run) + HALF * h;
                    add_block(pk, sc, gi * LANES + HALF * h, &mut out, &acc, dr, mins);
                }
            }
            for r in 0..R {
                _mm256_storeu_ps(res[r].as_mut_ptr().add(HALF * h), out[r]);
            }
        }
        put(g, &res);
    }
}

/// 8-bit activation blocks against nibble pairs; `VNNI`: with `vpdpbusd`.
#[inline(always)]
unsafe fn q8_rows<const R: usize, const VNNI: bool>(
    pk: &Packed,
    groups: std::ops::Range<usize>,
    a: [&[Q8Block]; R],
    put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
) {
    let nb = pk.nb;
    let vb = Packed::vb(pk.ty);
    let nibbles = _mm256_set1_epi32(0x0F0F_0F0F);
    let ones = _mm256_set1_epi16(1);
    for g in groups {
        let mut res = [[0f32; LANES]; R];
        for h in 0..2 {
            let mut out = [_mm256_setzero_ps(); R];
            for i in 0..nb {
                let gi = g * nb + i;
                let v = pk.vals.as_ptr().add(gi * vb);
                let mut acc = [_mm256_setzero_si256(); R];
                for k in 0..QK / 4 {
                    // Lane l: bytes A = v0 | v1 << 4 and B = v2 | v3 << 4 → bytes (v0, v1, v2, v3).
                    let lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        v.add(32 * k + HALF * h) as *const __m128i
                    ));
                    let hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        v.add(32 * k + 16 + HALF * h) as *const __m128i
                    ));
                    let x = _mm256_or_si256(lo, _mm256_slli_epi32::<16>(hi));
                    let w =
                        _mm256_and_si256(_mm256_or_si256(x, _mm256_slli_epi32::<4>(x)), nibbles);
                    for r in 0..R {
                        let quad = (a[r].get_unchecked(i).qs.as_ptr().add(4 * k) as *const i32)
                            .read_unaligned();
                        let x = _mm256_set1_epi32(quad);
                        acc[r] = if VNNI {
                            _mm256_dpbusd_avx_epi32(acc[r], w, x)
                        } else {
                            let pairs = _mm256_maddubs_epi16(w, x);
                            _mm256_add_epi32(acc[r], _mm256_madd_epi16(pairs, ones))
                        };
                    }
                }
                let d = from_fn(|r| a[r].get_unchecked(i).d);
                let s = from_fn(|r| a[r].get_unchecked(i).s);
                let at = gi * LANES + HALF * h;
                add_block(pk, at, at, &mut out, &acc, d, Some(s));
            }
            for r in 0..R {
                _mm256_storeu_ps(res[r].as_mut_ptr().add(HALF * h), out[r]);
            }
        }
        put(g, &res);
    }
}

/// Adds a block's integer sums for 8 rows into the outputs, in the order of the scalar
/// twins: `out[r] = fma(float(acc[r]) · d[r], scale, out[r])` with the rows' scales at
/// `scales[sc..]`, then `fma(min, s[r], ·)` with their mins at `mins[mn..]`.
#[inline(always)]
unsafe fn add_block<const R: usize>(
    pk: &Packed,
    sc: usize,
    mn: usize,
    out: &mut [__m256; R],
    acc: &[__m256i; R],
    d: [f32; R],
    s: Option<[f32; R]>,
) {
    let sc = _mm256_loadu_ps(pk.scales.as_ptr().add(sc));
    for r in 0..R {
        let f = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(d[r]));
        out[r] = _mm256_fmadd_ps(f, sc, out[r]);
    }
    if let Some(s) = s {
        let mn = _mm256_loadu_ps(pk.mins.as_ptr().add(mn));
        for r in 0..R {
            out[r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(s[r]), out[r]);
        }
    }
}
