//! How [`QuantRows`] lays a quantized matrix out for the `gemv` kernels: the tensor
//! cores' fragments, tile by tile, and the scales of each group of 16 rows ([`Scales`]);
//! where each weight lies in them and the value the kernels read for it
//! ([`QuantRows::weight`]). What builds the layout from a file's blocks or a packed
//! matrix is `convert.rs`.

use super::{Staged, BLOCK, GROUP};
use half::f16;

/// A matrix in its file's own quantized blocks, laid out for `gemv_q4` / `gemv_q5` / `gemv_q8`
/// / `gemv_iq4` (`kernels/cuda/gemv_blocks.cuh`): a candidate against `gemv_f16` for products
/// of a few rows, which read 4.5 (Q4_0, IQ4_NL), 5 (Q4_1), 5.5 (Q5_0), 6 (Q5_1) or 8.5 (Q8_0)
/// bits a weight where the f16 rows take 16. Each weight is `d · q + m` of its block of 32 in
/// f32, the value the file's block dequantizes to (`quant::dequantize_row`). The K-quant
/// layouts' scales, which f16 would round, are held factored as the file holds them, an f16 a
/// super-block of 256 times a signed byte a block ([`Scales::Factored`]: `gemv_q4f`,
/// `gemv_q8f`, `gemv_q6h`), or as f32 pairs (`gemv_q4f32`, ...) where asked or where they do
/// not factor, so that they too are the file's own values.
///
/// The layout is the tensor cores' fragments: tiles of 16 rows (an `mma`'s columns) by a
/// block of 32, each lane's part of a tile (rows `g`, `g + 8`, weights `8t .. 8t + 8` for
/// lane `4g + t`; with a scale per 16, weights `4t .. 4t + 4` and `16 + 4t .. 16 + 4t + 4`,
/// so that the block's first `mma` takes its first 16) in one load. Rows past the last up
/// to a multiple of 16 are zeros.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantRows {
    /// 2 (Q2_K's `q` in 0..4, with a scale and an offset per 16:
    /// [`Scales::FactoredHalfPairs`]), 4 (Q4_0, Q4_1, Q4_K: `q` in 0..16, Q4_0's `m = −8d`;
    /// Q3_K's `q + 8` with a scale per 16; IQ4's indices), 5 (Q5_1,
    /// Q5_K: `q` in 0..32), 6 (Q6_K's integers −32..32 as `q − 32`, `q` in 0..64, with a
    /// scale per 16: [`Scales::FactoredHalves`]) or 8 (Q8_0 and the 8-bit layouts the
    /// others become: `q` signed).
    pub bits: u32,
    pub scales: Scales,
    /// The 4-bit fields are indices into IQ4's 16 levels (−127..=113), the integers the
    /// scales multiply (`gemv_iq4`, `gemv_iq4f`): IQ4_NL's and IQ4_XS's 8-bit values at 4
    /// bits. A piece's weights `e < 4` in bits `4e`, the others in `16 + 4(e − 4)`.
    pub iq4: bool,
    /// Per tile (group of 16 rows, then block of 32), per lane: at 2 bits, a word for rows `g`
    /// and `g + 8` (row `g + 8`'s fields 8 bits past row `g`'s); at 4 bits, a word for row `g`
    /// and one for `g + 8`, weights `2p`, `2p + 1` of a piece in bits `4p`, `16 + 4p` (IQ4
    /// indices: see `iq4`); at 5 and 6 bits the same low 4 bits, then the tile's fifth bits or
    /// high two (`place_high`); at 8 bits, two words for row `g` and two for `g + 8`, weight
    /// `h` the signed byte `h`.
    pub q: Vec<u32>,
    /// Per group of 16 rows, its scales ([`Scales`]: [`Scales::group_words`] a group).
    pub s: Vec<u32>,
    pub rows: usize,
    pub k: usize,
}

/// How a group of 16 rows holds its scales, a pair (`d`, `m`) a row and block of 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scales {
    /// `d` (low half) and `m` (high half) as f16 bits, a word a row and block, the
    /// blocks' 16 words in order: Q4_0, Q4_1, Q8_0 and the layouts converted to them with
    /// the same values (`gemv_q4`, `gemv_q8`; Q5_1's integers and offsets, `gemv_q5`;
    /// IQ4_NL's levels, `gemv_iq4`).
    F16Pairs,
    /// Factored as the K-quants hold them (`gemv_q4f`, `gemv_q8f`): `d = D · n_d`,
    /// `m = M · n_m` (exact in f32), with `n_d`, `n_m` a row's signed bytes for the block
    /// and `D`, `M` its f16 pair for the block's super-block of 8 (256 weights). A group's
    /// words: 8 a block (word `g` holds rows `g` and `g + 8`'s bytes: `n_d`, `n_m` of `g`,
    /// then of `g + 8`), then 16 a super-block (words `2g`, `2g + 1`: rows `g` and `g + 8`'s
    /// `D | M << 16`).
    Factored,
    /// As [`Scales::Factored`], the two halves' scales of each block in place of `d` and
    /// `m` (a scale per 16, no offset: Q6_K's, `gemv_q6h` at 6 bits, `gemv_q8h` at 8;
    /// Q3_K's, `gemv_q4h` at 4), each factored on its own.
    FactoredHalves,
    /// `d` and `m` as f32, two words a row and block, the blocks' 32 in order: the
    /// K-quants' unfactored (`gemv_q4f32`, `gemv_q8f32`), 2 bits a weight where factored
    /// they take 0.625: any scales that neither f16 nor factoring holds
    /// ([`QuantRows::from_packed`]), and `TOLLGATE_KQUANT_SCALES=f32`.
    F32Pairs,
    /// `d` alone as f16 bits, a half a row and block, the blocks' 16 in order (half
    /// the bytes of [`Scales::F16Pairs`]: 0.5 bits a weight), where every offset `m` is
    /// `−c · d` for the centre `c` the kernel subtracts from the integers ([`center`]: 8 at
    /// 4 bits, 16 at 5, 0 at 8 and for IQ4's levels): Q4_0, Q5_0, Q8_0, IQ4_NL (`gemv_q4s`,
    /// `gemv_q5s`, `gemv_q8s`, `gemv_iq4s`; no offsets, so no inputs' sums either).
    F16Scales,
    /// As [`Scales::F32Pairs`], the halves' scales (`gemv_q8h32`).
    F32Halves,
    /// A scale and an offset a half (16 weights), factored (Q2_K's `d · sc` and `−dmin ·
    /// m`, `gemv_q2h` at 2 bits): a group's words are 16 a block (words `2g`, `2g + 1`
    /// hold rows `g`'s and `g + 8`'s signed bytes: the halves' `n_d`, then their `n_m`),
    /// then 16 a super-block as [`Scales::Factored`]'s (`D | M << 16` a row); each half's
    /// `d = D · n_d`, `m = M · n_m`.
    FactoredHalfPairs,
}

impl Scales {
    /// Words a group of 16 rows' scales take, for `nb` blocks of 32.
    pub fn group_words(self, nb: usize) -> usize {
        match self {
            Scales::F16Pairs => nb * GROUP,
            Scales::F16Scales => nb * GROUP / 2,
            Scales::F32Pairs | Scales::F32Halves => nb * GROUP * 2,
            Scales::Factored | Scales::FactoredHalves => nb * 8 + nb.div_ceil(SUPER) * 16,
            Scales::FactoredHalfPairs => nb * 16 + nb.div_ceil(SUPER) * 16,
        }
    }

    /// What the kernels stage in shared memory for these scales
    /// ([`shared_bytes`](super::shared_bytes)): the factored ones, a column group's at a time,
    /// each pair made once a block instead of once a lane (with offsets per 16, the inputs'
    /// sums per 16 too).
    pub fn staged(self) -> Staged {
        match self {
            Scales::Factored | Scales::FactoredHalves => Staged::Scales,
            Scales::FactoredHalfPairs => Staged::HalfPairs,
            _ => Staged::Sums,
        }
    }
}

/// Blocks of 32 a super-block of the factored scales: 256 weights, a K-quant's.
pub(super) const SUPER: usize = 8;

/// What the kernels subtract from `bits`-bit integers before the tensor cores take them
/// where there are no offsets (under a scale alone, [`Scales::F16Scales`], or a scale per
/// 16): 8 at 4 bits, 16 at 5, 32 at 6 (Q4_0's and Q3_K's `q − 8`, Q5_0's `q − 16`, Q6_K's
/// `q − 32`), 0 at 8 bits and for IQ4's levels. (At 2 bits, Q2_K's, 2: its offsets take
/// `2d` more.)
pub(super) fn center(bits: u32, iq4: bool) -> f32 {
    match (bits, iq4) {
        (2, _) => 2.0,
        (4, false) => 8.0,
        (5, _) => 16.0,
        (6, _) => 32.0,
        _ => 0.0,
    }
}

impl QuantRows {
    /// The bytes a product reads of them once uploaded
    /// ([`QuantBuf::bytes`](super::QuantBuf::bytes)).
    pub fn bytes(&self) -> usize {
        4 * (self.q.len() + self.s.len())
    }

    /// The bits past [`QuantRows::block_places`]' that row `j`'s fields start at: at 2
    /// bits, 8 for rows `g + 8` (which share their lane's word with rows `g`); else 0.
    pub(super) fn row_shift(&self, j: usize) -> u32 {
        if self.bits == 2 {
            8 * ((j % GROUP) / 8) as u32
        } else {
            0
        }
    }

    /// Where row `j`'s block `blk` starts in `q`: its tile's first word, plus the words
    /// of the lanes and rows before row `j`'s in it (lane `4g + t`'s words for rows `g`,
    /// `g + 8`: [`QuantRows::block_places`] adds `t`'s part).
    pub(super) fn block_base(&self, j: usize, blk: usize) -> usize {
        let tile = self.tile_start(j, blk);
        let (g, hi) = (j % 8, (j % GROUP) / 8);
        match self.bits {
            2 => tile + 4 * g,
            4..=6 => tile + 8 * g + hi,
            _ => tile + 16 * g + 2 * hi,
        }
    }

    /// The first word of row `j`'s tile for block `blk`: a tile is 16 rows by 32 weights
    /// of `bits` each, `16 · bits` words (at 5 and 6 bits, the 64 of low bits first).
    fn tile_start(&self, j: usize, blk: usize) -> usize {
        ((j / GROUP) * (self.k / BLOCK) + blk) * GROUP * self.bits as usize
    }

    /// For each weight `o` of a block: its word past [`QuantRows::block_base`] and the bit
    /// its field starts at (the same for every row and block of the layout). Lane `4g + t`
    /// holds weights `8t .. 8t + 8`, or with a scale per 16 `4t .. 4t + 4` then `16 + 4t ..
    /// 16 + 4t + 4`, as its piece's `e = 0 .. 8`: at 2 bits in its word `t`, `e` at bits
    /// `2(e / 2) + 16(e % 2)` (8 more for row `g + 8`: [`QuantRows::row_shift`]); at 4, 5 and
    /// 6 bits in its words `2t` (row `g`) and `2t + 1` (`g + 8`), `e` at bits `4(e / 2) +
    /// 16(e % 2)` (IQ4's indices: `4(e % 4) + 16(e / 4)`); at 8 bits in words `4t + e / 4`
    /// (and 2 more for `g + 8`), byte `e % 4`.
    pub(super) fn block_places(&self) -> [(usize, u32); BLOCK] {
        std::array::from_fn(|o| {
            let (t, e) = self.piece_of(o);
            match self.bits {
                2 => (t, (16 * (e % 2) + 2 * (e / 2)) as u32),
                4..=6 => {
                    let shift = if self.iq4 {
                        16 * (e / 4) + 4 * (e % 4)
                    } else {
                        16 * (e % 2) + 4 * (e / 2)
                    };
                    (2 * t, shift as u32)
                }
                _ => (4 * t + e / 4, 8 * (e % 4) as u32),
            }
        })
    }

    /// Weight `o` of a block as a lane's piece holds it: lane `4g + t`'s (with `g` its
    /// row's) element `e` (see [`QuantRows::block_places`]).
    fn piece_of(&self, o: usize) -> (usize, usize) {
        match self.scales {
            Scales::FactoredHalves | Scales::F32Halves | Scales::FactoredHalfPairs => {
                ((o % 16) / 4, 4 * (o / 16) + o % 4)
            }
            _ => (o / 8, o % 8),
        }
    }

    /// At 5 and 6 bits, where row `j`'s block `blk`'s bits past the low 4 start in `q`: its
    /// lanes' first word (lane `4g`'s, `g` the row's), which [`QuantRows::high_places`] adds
    /// `t`'s part to. At 5: the 16 words after a tile's 64 of low bits, lane `l`'s in word
    /// `l / 2` (bits 0 .. 8 and 16 .. 24, 8 more for an odd lane), weights `2p + s` (`s`
    /// 0, 1) at `p + 16s` for row `g` and at `4 + p + 16s` for `g + 8`. At 6: the 32 words
    /// after them, lane `l`'s word `l`, weights `2p + s` two bits at `4 + 2p + 16s` for row
    /// `g` and at `[12, 14, 0, 2][p] + 16s` for `g + 8`. (The shifts `gemv_q5*` and
    /// `gemv_q6h` make: `kernels/cuda/gemv_blocks.cuh`'s WeightsHighT.)
    pub(super) fn high_base(&self, j: usize, blk: usize) -> usize {
        // A lane's high bits: half a word at 5 bits, a word at 6.
        self.tile_start(j, blk) + 64 + 4 * (j % 8) * (self.bits as usize - 4) / 2
    }

    /// For each weight `o` of a block of a row `g` (`hi` 0) or `g + 8` (`hi` 1): its high
    /// bits' word past [`QuantRows::high_base`] and the bit they start at.
    pub(super) fn high_places(&self, hi: usize) -> [(usize, u32); BLOCK] {
        std::array::from_fn(|o| {
            let (t, e) = self.piece_of(o);
            let (p, s) = (e / 2, e % 2);
            if self.bits == 6 {
                let at = if hi == 0 {
                    4 + 2 * p
                } else {
                    [12, 14, 0, 2][p]
                };
                (t, (at + 16 * s) as u32)
            } else {
                (t / 2, (8 * (t % 2) + 4 * hi + p + 16 * s) as u32)
            }
        })
    }

    /// Weight `c` of row `j` as the kernels read it: `d · q + m`, one rounding (the
    /// kernels add `d · Σ q·x` and `m · Σ x` over a block, the same sum in exact
    /// arithmetic); with a scale per 16, its half's scale times `q` (and with an offset per
    /// 16, its half's `d · q + m`).
    pub fn weight(&self, j: usize, c: usize) -> f32 {
        let mut block = [0f32; BLOCK];
        let highs = self.high_places((j % GROUP) / 8);
        self.block_values(j, c / BLOCK, &self.block_places(), &highs, &mut block);
        block[c % BLOCK]
    }

    /// Row `j`'s `k` weights as the kernels read them ([`QuantRows::weight`] each), into
    /// `out`: the layout's places found once, each block's scales made once.
    pub fn row_f32(&self, j: usize, out: &mut [f32]) {
        let (places, highs) = (self.block_places(), self.high_places((j % GROUP) / 8));
        for (blk, block) in out[..self.k].chunks_exact_mut(BLOCK).enumerate() {
            self.block_values(j, blk, &places, &highs, block);
        }
    }

    /// Row `j`'s block `blk` as the kernels read it, into `out` (32), given the layout's
    /// places ([`QuantRows::block_places`], and at 5 and 6 bits
    /// [`QuantRows::high_places`] for the row's half of its group).
    fn block_values(
        &self,
        j: usize,
        blk: usize,
        places: &[(usize, u32); BLOCK],
        highs: &[(usize, u32); BLOCK],
        out: &mut [f32],
    ) {
        let nb = self.k / BLOCK;
        let r = j % GROUP;
        let group = &self.s[(j / GROUP) * self.scales.group_words(nb)..];
        let half = |b: u32| f16::from_bits(b as u16).to_f32();
        // The pair (d, m), or the halves' scales: as the kernels make them.
        let pair = |i: usize| match self.scales {
            Scales::F16Pairs => half(group[blk * GROUP + r] >> (16 * i)),
            Scales::F16Scales => {
                let at = blk * GROUP + r;
                [half(group[at / 2] >> (16 * (at % 2))), 0.0][i]
            }
            Scales::F32Pairs | Scales::F32Halves => {
                f32::from_bits(group[(blk * GROUP + r) * 2 + i])
            }
            Scales::Factored | Scales::FactoredHalves => {
                let sup = group[nb * 8 + (blk / SUPER) * 16 + 2 * (r % 8) + r / 8];
                let n = (group[blk * 8 + r % 8] >> (8 * (2 * (r / 8) + i))) as u8 as i8;
                half(sup >> (16 * i)) * f32::from(n)
            }
            // The halves' scales (i 0, 1), then their offsets (2, 3).
            Scales::FactoredHalfPairs => {
                let at = 2 * (r % 8) + r / 8;
                let sup = group[nb * 16 + (blk / SUPER) * 16 + at];
                let n = (group[blk * 16 + at] >> (8 * i)) as u8 as i8;
                half(sup >> (16 * (i / 2))) * f32::from(n)
            }
        };
        let pairs: [f32; 4] = match self.scales {
            Scales::FactoredHalfPairs => std::array::from_fn(pair),
            _ => [pair(0), pair(1), 0.0, 0.0],
        };
        let (base, row_shift) = (self.block_base(j, blk), self.row_shift(j));
        let high_base = matches!(self.bits, 5 | 6).then(|| self.high_base(j, blk));
        let centre = center(self.bits, self.iq4);
        for (o, v) in out[..BLOCK].iter_mut().enumerate() {
            let (word, shift) = places[o];
            let field = self.q[base + word] >> (shift + row_shift);
            let q = if self.iq4 {
                f32::from(crate::kquant::IQ4_LEVELS[(field & 15) as usize])
            } else if self.bits == 2 {
                (field & 3) as f32
            } else if self.bits == 4 {
                (field & 15) as f32
            } else if let Some(hb) = high_base {
                let (word, bit) = highs[o];
                let high = self.q[hb + word] >> bit & ((1 << (self.bits - 4)) - 1);
                ((field & 15) | high << 4) as f32
            } else {
                field as u8 as i8 as f32
            };
            // Without offsets the tensor cores take `q − c` (Q6_K's `q − 32`, ...), under
            // `d` or the half's scale.
            let taken = q - centre;
            let h = o / 16;
            *v = match self.scales {
                Scales::FactoredHalves | Scales::F32Halves => pairs[h] * taken,
                Scales::FactoredHalfPairs => pairs[h].mul_add(q, pairs[2 + h]),
                Scales::F16Scales => pairs[0] * taken,
                _ => pairs[0].mul_add(q, pairs[1]),
            };
        }
    }
}
