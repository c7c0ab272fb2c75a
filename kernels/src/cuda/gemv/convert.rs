//! [`QuantRows`]' constructors: a file's blocks (Q4_0, Q4_1, Q8_0 and the 8-bit forms
//! the CPU holds Q5_0, IQ4_NL, Q3_K and Q2_K in), or a packed matrix's integers and
//! scales (the K-quants', IQ4_XS's), each in the fewest bits a kernel reads them in,
//! their scales held as exactly as the file does; and stacks of them.

use super::factor::{factor, gcd};
use super::layout::{center, QuantRows, Scales, SUPER};
use super::{BLOCK, GROUP};
use half::f16;

/// A block's integers `v` as `times · (q − 16)` with `q` in 0..32, `times` the largest of
/// 4, 2, 1 that holds them all (Q5_0's as the CPU holds them); `None` where none does.
fn five_bits(v: &[i32; BLOCK]) -> Option<([i32; BLOCK], i32)> {
    let times = [4, 2, 1].into_iter().find(|&t| {
        v.iter()
            .all(|&x| x % t == 0 && (-16..16).contains(&(x / t)))
    })?;
    Some((v.map(|x| x / times + 16), times))
}

/// A block's integers as indices into IQ4's levels; `None` unless each is one of them.
fn iq4_indices(ints: &[i32; BLOCK]) -> Option<[i32; BLOCK]> {
    let mut out = [0; BLOCK];
    for (o, &v) in out.iter_mut().zip(ints) {
        let i = crate::kquant::IQ4_LEVELS
            .binary_search(&i8::try_from(v).ok()?)
            .ok()?;
        *o = i as i32;
    }
    Some(out)
}

/// Row `j`'s block `blk` of `rows` rows of `k` weights in `ty`'s blocks (`data`), as
/// `quant::unpack` gives it (its integers, `d`, `m`); `None` where `k` is no multiple of a
/// block or `data` not that many blocks.
fn unpacker(
    ty: crate::gguf::GgmlType,
    data: &[u8],
    rows: usize,
    k: usize,
) -> Option<impl Fn(usize, usize) -> ([i32; BLOCK], f32, f32) + Sync + '_> {
    let (nb, bytes) = (k / BLOCK, ty.block_bytes());
    (k.is_multiple_of(BLOCK) && data.len() == rows * nb * bytes).then_some(
        move |j: usize, blk: usize| crate::quant::unpack(ty, &data[(j * nb + blk) * bytes..]),
    )
}

/// Weights of a block per 16.
const HALF: usize = BLOCK / 2;

/// A block's integers, each 16 as `g · q` with every `q` in `range`: `g` the 16's greatest
/// common divisor times the first of `signs` that holds them (0, and `q` all 0, where they
/// are all 0); the quotients and each 16's `g`, `None` where a 16 has none.
fn over_divisors(
    vals: &[i32; BLOCK],
    range: std::ops::Range<i32>,
    signs: &[i32],
) -> Option<([i32; BLOCK], [i32; 2])> {
    let mut q = [0; BLOCK];
    let mut gs = [0; 2];
    for ((half, out), gh) in vals
        .chunks_exact(HALF)
        .zip(q.chunks_exact_mut(HALF))
        .zip(&mut gs)
    {
        let g = half.iter().fold(0, |g, v| gcd(g, v.unsigned_abs())) as i32;
        if g == 0 {
            continue;
        }
        *gh = signs.iter().map(|s| s * g).find(|sg| {
            for (o, v) in out.iter_mut().zip(half) {
                *o = v / sg;
                if !range.contains(o) {
                    return false;
                }
            }
            true
        })?;
    }
    Some((q, gs))
}

impl QuantRows {
    /// `rows` rows of `k` weights in `ty`'s blocks (Q4_0, Q4_1 or Q8_0; Q8_0 whose
    /// integers are all IQ4's levels, IQ4_NL's, as their 4-bit indices, or all Q5_0's
    /// `times · (q − 16)`, as `q` at 5 bits); `None` for other types, or where `data` is
    /// not that many blocks.
    /// Their scales alone ([`Scales::F16Scales`]) where every offset is the kernel's
    /// centre's (Q4_0's `−8d`, Q8_0's 0: half the scales' bytes, no inputs' sums), else
    /// f16 pairs; first, Q8_0 blocks whose every 16 integers are a factor times 4-bit ones
    /// (Q3_K's: [`QuantRows::by_sixteens`]).
    pub fn from_blocks(
        ty: crate::gguf::GgmlType,
        data: &[u8],
        rows: usize,
        k: usize,
    ) -> Option<Self> {
        Self::by_sixteens(ty, data, rows, k).or_else(|| {
            [Scales::F16Scales, Scales::F16Pairs]
                .into_iter()
                .find_map(|scales| Self::from_blocks_as(ty, data, rows, k, scales))
        })
    }

    /// Q8_0 blocks whose every 16 integers are a common factor times 4-bit ones (−8..8):
    /// Q3_K's, which the CPU holds as Q8_0 of `d` and `sc · q` (`q` in −4..4), as those
    /// 4-bit integers (+ 8) under the halves' scales `d · g` (`g` the 16's greatest common
    /// divisor, signed so that the integers fit), factored ([`Scales::FactoredHalves`],
    /// `gemv_q4h`: 4.625 bits a weight where the blocks take 8.5). `None` for other
    /// types, or at the first 16 that are no such multiples (a Q8_0 file's, in its first
    /// block).
    fn by_sixteens(ty: crate::gguf::GgmlType, data: &[u8], rows: usize, k: usize) -> Option<Self> {
        if ty != crate::gguf::GgmlType::Q8_0 {
            return None;
        }
        let unpack = unpacker(ty, data, rows, k)?;
        Self::build(4, Scales::FactoredHalves, false, rows, k, |j, blk| {
            let (vals, d, _) = unpack(j, blk);
            // 8 · g fits only negated.
            let (q, g) = over_divisors(&vals, -8..8, &[1, -1])?;
            Some((q.map(|x| x + 8), g.map(|g| d * g as f32)))
        })
    }

    /// Q8_0 blocks with an offset per 16 beside them ([`crate::matmul::Offsets`]) whose
    /// every 16 integers are a common factor times 2-bit ones (0..4): Q2_K's, which the CPU
    /// holds as Q8_0 of `d` and `sc · q` and offsets `−dmin · m`, as those 2-bit integers
    /// under each 16's scale `d · g` (`g` the 16's greatest common divisor) and offset,
    /// factored ([`Scales::FactoredHalfPairs`], `gemv_q2h`: 3.125 bits a weight where the
    /// f16 rows take 16). `None` for other types and offsets, or at the first 16 that are
    /// no such multiples.
    pub fn from_offsets(
        ty: crate::gguf::GgmlType,
        data: &[u8],
        offsets: &crate::matmul::Offsets,
        rows: usize,
        k: usize,
    ) -> Option<Self> {
        let unpack = unpacker(ty, data, rows, k)?;
        if ty != crate::gguf::GgmlType::Q8_0
            || offsets.run != HALF
            || offsets.values.len() != rows * k / HALF
        {
            return None;
        }
        Self::build(2, Scales::FactoredHalfPairs, false, rows, k, |j, blk| {
            let (vals, d, _) = unpack(j, blk);
            let (q, g) = over_divisors(&vals, 0..4, &[1])?;
            let m = &offsets.values[(j * k + blk * BLOCK) / HALF..];
            Some((q, [d * g[0] as f32, d * g[1] as f32, m[0], m[1]]))
        })
    }

    /// [`QuantRows::from_blocks`] with the scales held as `scales` says (f16 pairs or
    /// scales alone); `None` where they cannot be.
    pub fn from_blocks_as(
        ty: crate::gguf::GgmlType,
        data: &[u8],
        rows: usize,
        k: usize,
        scales: Scales,
    ) -> Option<Self> {
        use crate::gguf::GgmlType;
        let bits = match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => 4,
            GgmlType::Q8_0 => 8,
            _ => return None,
        };
        if !matches!(scales, Scales::F16Pairs | Scales::F16Scales) {
            return None;
        }
        let unpack = unpacker(ty, data, rows, k)?;
        // d and m are f16 values (m = −8d exactly for Q4_0, unless it overflows; 0 for
        // Q8_0).
        let block = |j: usize, blk: usize| {
            let (vals, d, m) = unpack(j, blk);
            (vals, [d, m])
        };
        if bits == 4 {
            return Self::build(bits, scales, false, rows, k, |j, blk| Some(block(j, blk)));
        }
        // Q5_0's values, which the CPU holds as Q8_0 of `d/4` and `4(q − 16)` (or `d/2`,
        // `d`): at 5 bits, `q` under `d` and the offset `−16d`.
        Self::narrowest(scales, true, rows, k, block, |vals, [d, _]| {
            let (q, times) = five_bits(&vals)?;
            let d = d * times as f32;
            Some((q, [d, -16.0 * d]))
        })
    }

    /// A matrix's packed form where it holds values its file blocks do not
    /// ([`crate::matmul::Matrix::packed_values`]: the K-quant sub-blocks' f32 scales,
    /// Q6_K's scale per 16, offsets of a block each beside 8-bit blocks): the same
    /// integers under the same scales (at 5 bits where they are 0..32, Q5_1's and Q5_K's;
    /// IQ4_XS's levels as their 4-bit indices), held as f16 pairs where they are f16 values
    /// (Q5_1's), else factored ([`Scales::Factored`]: Q4_K's, Q5_K's, IQ4_XS's, Q6_K's; the kernels
    /// stage their pairs in shared memory, so that they take fewer instructions a block
    /// than f32 pairs as well as fewer bytes — BENCHMARKS.md, "Factored scales staged"),
    /// else as f32 pairs. `None` where the packed form has both a scale per 16 and mins.
    pub fn from_packed(p: &crate::packed::Packed) -> Option<Self> {
        [Scales::F16Pairs, Scales::Factored, Scales::F32Pairs]
            .into_iter()
            .find_map(|s| Self::from_packed_as(p, s))
    }

    /// [`QuantRows::from_packed`] with its scales held as `scales` says (its halves' form
    /// where the packed form has a scale per 16; under f16 pairs or factored, 8-bit
    /// integers that are all IQ4's levels, IQ4_XS's, as their 4-bit indices); `None` where
    /// they cannot be.
    pub fn from_packed_as(p: &crate::packed::Packed, scales: Scales) -> Option<Self> {
        use crate::gguf::GgmlType;
        let bits = if p.ty() == GgmlType::Q8_0 { 8 } else { 4 };
        let (rows, k) = (p.rows, p.cols);
        if p.runs() == 2 {
            let halves = match scales {
                Scales::Factored | Scales::FactoredHalves => Scales::FactoredHalves,
                Scales::F32Pairs | Scales::F32Halves => Scales::F32Halves,
                Scales::F16Pairs | Scales::F16Scales | Scales::FactoredHalfPairs => return None,
            };
            if bits != 8 || p.has_mins() {
                return None;
            }
            // Q6_K's integers −32..32 at 6 bits (as `q − 32`) where a kernel reads them
            // (factored), else at 8.
            let six = (halves == Scales::FactoredHalves)
                .then(|| {
                    Self::build(6, halves, false, rows, k, |j, i| {
                        let (ints, sc, _) = p.block(j, i);
                        ints.iter()
                            .all(|v| (-32..32).contains(v))
                            .then(|| (ints.map(|v| v + 32), sc))
                    })
                })
                .flatten();
            return six.or_else(|| {
                Self::build(bits, halves, false, rows, k, |j, i| {
                    let (ints, sc, _) = p.block(j, i);
                    Some((ints, sc))
                })
            });
        }
        let pairs = match scales {
            Scales::FactoredHalves => Scales::Factored,
            Scales::F32Halves => Scales::F32Pairs,
            // The file blocks' forms ([`QuantRows::from_blocks`],
            // [`QuantRows::from_offsets`]), not the packed one's.
            Scales::F16Scales | Scales::FactoredHalfPairs => return None,
            s => s,
        };
        let block = |j: usize, i: usize| {
            let (ints, sc, min) = p.block(j, i);
            (ints, [sc[0], min])
        };
        // Fewer bits where a kernel reads them (f16 pairs, factored): integers 0..32
        // (Q5_1's, Q5_K's) at 5 bits.
        if bits == 8 && matches!(pairs, Scales::F16Pairs | Scales::Factored) {
            return Self::narrowest(pairs, !p.has_mins(), rows, k, block, |ints, pair| {
                ints.iter()
                    .all(|v| (0..32).contains(v))
                    .then_some((ints, pair))
            });
        }
        Self::build(bits, pairs, false, rows, k, |j, i| Some(block(j, i)))
    }

    /// 8-bit integers (`block(j, i)`: row `j`'s block `i` and its pair) in the fewest bits
    /// a kernel reads them in under `scales`: where `iq4` and every integer is one of IQ4's
    /// levels, their 4-bit indices; else where `five` makes every block 5-bit integers
    /// (0..32) and their pair, those; else 8 bits. Each attempt stops at the first block it
    /// cannot hold.
    fn narrowest(
        scales: Scales,
        iq4: bool,
        rows: usize,
        k: usize,
        block: impl Fn(usize, usize) -> ([i32; BLOCK], [f32; 2]) + Sync,
        five: impl Fn([i32; BLOCK], [f32; 2]) -> Option<([i32; BLOCK], [f32; 2])> + Sync,
    ) -> Option<Self> {
        let levels = iq4
            .then(|| {
                Self::build(4, scales, true, rows, k, |j, i| {
                    let (ints, pair) = block(j, i);
                    Some((iq4_indices(&ints)?, pair))
                })
            })
            .flatten();
        levels
            .or_else(|| {
                Self::build(5, scales, false, rows, k, |j, i| {
                    let (ints, pair) = block(j, i);
                    five(ints, pair)
                })
            })
            .or_else(|| Self::build(8, scales, false, rows, k, |j, i| Some(block(j, i))))
    }

    /// A stack of projections (Q, K, V; gate, up) as the products read it: its parts one
    /// after the other, those of one layout as one matrix (as a stack the CPU holds apart
    /// because of its offsets), a part of another layout (Q4_K_M's Q6_K V rows after its
    /// Q4_K Q and K) or after one ending inside a tile (rows no multiple of 16) starting
    /// the next. The products launch a kernel for each, writing its columns of the output.
    pub fn stack(parts: Vec<QuantRows>) -> Vec<QuantRows> {
        let mut out: Vec<QuantRows> = Vec::new();
        for p in parts {
            let joins = |l: &&mut QuantRows| {
                (l.bits, l.scales, l.iq4, l.k) == (p.bits, p.scales, p.iq4, p.k)
                    && l.rows.is_multiple_of(GROUP)
            };
            match out.last_mut().filter(joins) {
                Some(l) => {
                    l.q.extend(p.q);
                    l.s.extend(p.s);
                    l.rows += p.rows;
                }
                None => out.push(p),
            }
        }
        out
    }

    /// The layout of `rows` rows of `k`, `block(j, i)` giving row `j`'s block `i`: its 32
    /// integers (0..4 at 2 bits, 0..16 at 4 — with `iq4`, indices into IQ4's levels —,
    /// 0..32 at 5, 0..64 at 6, −128..128 at 8) and its scale pair (`d`, `m`; the halves'
    /// scales; or, `P` 4, the halves' scales then their offsets), or `None` where the
    /// layout cannot hold them; `None` then, or where `scales` cannot hold the pairs
    /// exactly (f16 values, or factored: [`factor`]).
    fn build<const P: usize>(
        bits: u32,
        scales: Scales,
        iq4: bool,
        rows: usize,
        k: usize,
        block: impl Fn(usize, usize) -> Option<([i32; BLOCK], [f32; P])> + Sync,
    ) -> Option<Self> {
        use rayon::prelude::*;
        let nb = k / BLOCK;
        // Each group of 16 rows is its own run of tiles (and of scales): built in parallel.
        let (q_group, s_group) = (
            nb * BLOCK * GROUP * bits as usize / 32,
            scales.group_words(nb),
        );
        let groups = rows.div_ceil(GROUP);
        let mut r = Self {
            bits,
            scales,
            iq4,
            q: vec![0; groups * q_group],
            s: vec![0; groups * s_group],
            rows,
            k,
        };
        let (mut q, mut s) = (std::mem::take(&mut r.q), std::mem::take(&mut r.s));
        let layout = &r;
        let places = r.block_places();
        let highs = [r.high_places(0), r.high_places(1)];
        q.par_chunks_mut(q_group)
            .zip(s.par_chunks_mut(s_group))
            .enumerate()
            .try_for_each(|(g, (q, s))| {
                // The group's pairs, row by row (rows past the last: zeros).
                let mut pairs = vec![[0f32; 4]; GROUP * nb];
                for j in g * GROUP..rows.min((g + 1) * GROUP) {
                    for blk in 0..nb {
                        let (vals, pair) = block(j, blk)?;
                        pairs[(j % GROUP) * nb + blk][..P].copy_from_slice(&pair);
                        let base = layout.block_base(j, blk) - g * q_group;
                        let mask = match bits {
                            2 => 3,
                            8 => 255,
                            _ => 15,
                        };
                        let row = layout.row_shift(j);
                        for (&v, &(word, shift)) in vals.iter().zip(&places) {
                            q[base + word] |= (v as u32 & mask) << (shift + row);
                        }
                        if bits == 5 || bits == 6 {
                            let high = (1 << (bits - 4)) - 1;
                            let base = layout.high_base(j, blk) - g * q_group;
                            for (&v, &(word, bit)) in vals.iter().zip(&highs[(j % GROUP) / 8]) {
                                q[base + word] |= (v as u32 >> 4 & high) << bit;
                            }
                        }
                    }
                }
                Self::scale_words(scales, center(bits, iq4), nb, &pairs, s)
            })?;
        (r.q, r.s) = (q, s);
        Some(r)
    }

    /// A group's scale words (`out`, [`Scales`]' layout) from its 16 rows' pairs
    /// (`pairs[row · nb + block]`: `d`, `m` or the halves' scales, then with
    /// [`Scales::FactoredHalfPairs`] the halves' offsets); `None` where `scales` cannot hold
    /// them exactly (with [`Scales::F16Scales`], where an offset is not `−c · d`, `c` the
    /// kernel's `center`).
    fn scale_words(
        scales: Scales,
        center: f32,
        nb: usize,
        pairs: &[[f32; 4]],
        out: &mut [u32],
    ) -> Option<()> {
        let bits16 = |v: f32| {
            let h = f16::from_f32(v);
            (h.to_f32() == v).then_some(u32::from(h.to_bits()))
        };
        match scales {
            Scales::F16Pairs => {
                for (r, row) in pairs.chunks_exact(nb).enumerate() {
                    for (blk, &[d, m, ..]) in row.iter().enumerate() {
                        out[blk * GROUP + r] = bits16(d)? | bits16(m)? << 16;
                    }
                }
            }
            Scales::F16Scales => {
                for (r, row) in pairs.chunks_exact(nb).enumerate() {
                    for (blk, &[d, m, ..]) in row.iter().enumerate() {
                        if m != -center * d {
                            return None;
                        }
                        let at = blk * GROUP + r;
                        out[at / 2] |= bits16(d)? << (16 * (at % 2));
                    }
                }
            }
            Scales::F32Pairs | Scales::F32Halves => {
                for (r, row) in pairs.chunks_exact(nb).enumerate() {
                    for (blk, &[d, m, ..]) in row.iter().enumerate() {
                        let at = (blk * GROUP + r) * 2;
                        (out[at], out[at + 1]) = (d.to_bits(), m.to_bits());
                    }
                }
            }
            Scales::Factored | Scales::FactoredHalves => {
                let (blocks, supers) = out.split_at_mut(nb * 8);
                let mut n = [0i8; SUPER];
                let mut vals = [0f32; SUPER];
                for (r, row) in pairs.chunks_exact(nb).enumerate() {
                    for (sb, run) in row.chunks(SUPER).enumerate() {
                        let mut sup = 0u32;
                        for half in 0..2 {
                            for (v, p) in vals.iter_mut().zip(run) {
                                *v = p[half];
                            }
                            let d = factor(&vals[..run.len()], &mut n[..run.len()])?;
                            sup |= u32::from(d.to_bits()) << (16 * half);
                            for (i, &n) in n[..run.len()].iter().enumerate() {
                                let byte = 8 * (2 * (r / 8) + half);
                                blocks[(sb * SUPER + i) * 8 + r % 8] |= u32::from(n as u8) << byte;
                            }
                        }
                        supers[sb * 16 + 2 * (r % 8) + r / 8] = sup;
                    }
                }
            }
            Scales::FactoredHalfPairs => {
                let (blocks, supers) = out.split_at_mut(nb * 16);
                let mut n = [0i8; 2 * SUPER];
                let mut vals = [0f32; 2 * SUPER];
                for (r, row) in pairs.chunks_exact(nb).enumerate() {
                    for (sb, run) in row.chunks(SUPER).enumerate() {
                        let mut sup = 0u32;
                        // The halves' scales (D), then their offsets (M): each a super-block's
                        // 16 values factored together.
                        for part in 0..2 {
                            for (i, p) in run.iter().enumerate() {
                                vals[2 * i] = p[2 * part];
                                vals[2 * i + 1] = p[2 * part + 1];
                            }
                            let len = 2 * run.len();
                            let d = factor(&vals[..len], &mut n[..len])?;
                            sup |= u32::from(d.to_bits()) << (16 * part);
                            for (i, h) in n[..len].chunks_exact(2).enumerate() {
                                let bytes = u32::from(h[0] as u8) | u32::from(h[1] as u8) << 8;
                                let word = (sb * SUPER + i) * 16 + 2 * (r % 8) + r / 8;
                                blocks[word] |= bytes << (16 * part);
                            }
                        }
                        supers[sb * 16 + 2 * (r % 8) + r / 8] = sup;
                    }
                }
            }
        }
        Some(())
    }
}
