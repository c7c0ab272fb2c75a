//! The packed weights against 16 activation rows at a time on AMX (Intel's tile registers
//! and 8-bit matrix unit, Xeon since Sapphire Rapids): one `tdpb*d` multiplies a 16 × 32
//! tile of activation bytes by a block of 16 weight rows (32 inputs each) into 16 × 16
//! integer sums — 8,192 products an instruction, where `vpdpwssd` does 32.
//!
//! AMX multiplies bytes only. 16-bit activations ([`crate::quant::quantize_row_i16`]) go
//! in as two byte planes, `a = 256·hi + lo` (`hi` signed, `lo` unsigned), each its own
//! product, and a block's sum is `256·Σ w·hi + Σ w·lo`: the very integer the VNNI kernel
//! sums, so the results are the scalar twin's bit for bit ([`Packed::dot_rows_scalar`]),
//! as are those of 8-bit activations ([`Packed::dot_rows_q8_scalar`], one product) — a
//! row's outputs do not depend on whether it met the weights on tiles or in registers.
//! Per block, the integer sums leave the tiles through memory and are scaled and added on
//! AVX-512 in the twins' order: `fma(float(s) · d, scale, ·)`, then `fma(min, xsum, ·)`.
//!
//! Weights are the tile product's second operand: 8 rows of 64 bytes a block, row `q`
//! holding inputs `4q .. 4q + 4` of each of the 16 weight rows, unpacked from the packed
//! layout once per call and group into a buffer that every activation tile of the call
//! reads.
//! Linux hands a process the tile registers only once it asks (`arch_prctl`), which
//! [`usable`] does.

use super::{Packed, LANES};
use crate::gguf::GgmlType;
use crate::quant::{Q8Block, QK};
use rayon::prelude::*;
use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Activation rows for the tile kernel, `16 · tiles` of them from the first, their values
/// laid out as the tiles load them ([`tile_i16`], [`tile_q8`]).
pub(crate) enum Rows<'a> {
    /// 16-bit activations as byte planes, with their block scales and f32 block sums
    /// (rows × blocks).
    I16 {
        tiled: &'a [u8],
        d: &'a [f32],
        sums: &'a [f32],
    },
    /// 8-bit blocks (llama.cpp's, rows × blocks), their values tiled.
    Q8 { tiled: &'a [u8], a: &'a [Q8Block] },
}

/// Takes a group's results for a tile of activation rows: `(group, first row, results)`.
pub(crate) type TilePut<'a> = dyn FnMut(usize, usize, &[[f32; LANES]; LANES]) + 'a;

/// Bytes of one tile of activation values (16 rows × a block of 32).
const TILE: usize = LANES * QK;

/// The first `rows / 16 · 16` rows of 16-bit activations (`cols` wide) as the tiles load
/// them, into `out`: for each tile of 16 rows and block of 32 inputs, the 16 rows' high
/// bytes (signed) then their low bytes (unsigned), 32 a row — `value = 256·hi + lo` —
/// so that a tile's loads read 1 KiB in a row.
pub(crate) fn tile_i16(q: &[i16], rows: usize, cols: usize, out: &mut Vec<u8>) {
    let (tiles, nb) = (rows / LANES, cols / QK);
    out.resize(tiles * nb * 2 * TILE, 0);
    out.par_chunks_exact_mut(nb * 2 * TILE)
        .enumerate()
        .for_each(|(t, chunk)| {
            for (i, planes) in chunk.chunks_exact_mut(2 * TILE).enumerate() {
                let (hi, lo) = planes.split_at_mut(TILE);
                for r in 0..LANES {
                    let x = &q[(LANES * t + r) * cols + i * QK..][..QK];
                    for (k, &v) in x.iter().enumerate() {
                        hi[r * QK + k] = (v >> 8) as u8;
                        lo[r * QK + k] = v as u8;
                    }
                }
            }
        });
}

/// [`tile_i16`] for 8-bit blocks (`nb` a row): each tile's 16 rows' values of a block.
pub(crate) fn tile_q8(a: &[Q8Block], rows: usize, nb: usize, out: &mut Vec<u8>) {
    let tiles = rows / LANES;
    out.resize(tiles * nb * TILE, 0);
    out.par_chunks_exact_mut(nb * TILE)
        .enumerate()
        .for_each(|(t, chunk)| {
            for (i, tile) in chunk.chunks_exact_mut(TILE).enumerate() {
                for (r, row) in tile.chunks_exact_mut(QK).enumerate() {
                    let qs = &a[(LANES * t + r) * nb + i].qs;
                    for (o, &v) in row.iter_mut().zip(qs) {
                        *o = v as u8;
                    }
                }
            }
        });
}

/// Whether this CPU has AMX-INT8 and the OS lets this process use it (asked once), and
/// AVX-512 VNNI around it; whatever the environment says.
pub fn runs_here() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let id = __cpuid_count(7, 0);
        let (tile, int8) = (id.edx >> 24 & 1 == 1, id.edx >> 25 & 1 == 1);
        tile && int8 && super::Kernel::Avx512Vnni.runs_here() && request_tiles()
    })
}

/// Whether products use the tiles: [`runs_here`], the packed kernel is AVX-512 VNNI's
/// ([`super::kernel`]), and `TOLLGATE_NO_AMX` is not set (to 1).
pub fn usable() -> bool {
    static USE: OnceLock<bool> = OnceLock::new();
    *USE.get_or_init(|| {
        let off = std::env::var("TOLLGATE_NO_AMX").is_ok_and(|v| v != "0");
        !off && super::kernel() == Some(super::Kernel::Avx512Vnni) && runs_here()
    })
}

/// Asks Linux for the tile registers' state (`ARCH_REQ_XCOMP_PERM`, `XFEATURE_XTILEDATA`):
/// every thread of the process may use them after.
fn request_tiles() -> bool {
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    if !cfg!(target_os = "linux") {
        return false;
    }
    let ret: i64;
    // SAFETY: the `arch_prctl` system call (158 on x86-64 Linux) with these arguments
    // changes nothing but the permission asked for; the kernel clobbers rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") 158i64 => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

/// The tile registers' shapes (`ldtilecfg`'s 64 bytes, palette 1): tmm0 – tmm3 the 16 × 16
/// integer sums (two groups' sums of `hi` and `lo`), tmm4, tmm5 the activations (16 rows
/// × 32 bytes), tmm6, tmm7 two groups' blocks of weights (8 rows × 64 bytes).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = {
    let mut c = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    let shapes: [(u16, u8); 8] = [
        (64, 16),
        (64, 16),
        (64, 16),
        (64, 16),
        (32, 16),
        (32, 16),
        (64, 8),
        (64, 8),
    ];
    let mut t = 0;
    while t < shapes.len() {
        c.colsb[t] = shapes[t].0;
        c.rows[t] = shapes[t].1;
        t += 1;
    }
    c
};

/// Bytes of a block of weights as the tile product takes them.
const BLOCK: usize = 8 * 64;

impl Packed {
    /// Whether [`Packed::dot_tiles_amx`] takes these weights (a scale per block).
    pub(crate) fn takes_amx(&self) -> bool {
        self.runs == 1
    }

    /// Groups `groups` against activation rows `0 .. 16 · tiles` of `rows` on the tiles,
    /// each group's results handed 16 rows at a time to `put(group, first row, results)`:
    /// `results[r][l]` = weight row `16g + l` · activation row `first + r`, the scalar
    /// twin's bits. 8-bit activations take 4-bit weights only ([`Packed::takes_q8`]).
    pub(crate) fn dot_tiles_amx(
        &self,
        groups: std::ops::Range<usize>,
        rows: &Rows,
        tiles: usize,
        put: &mut TilePut,
    ) {
        assert!(runs_here(), "AMX does not run here");
        assert!(
            self.takes_amx(),
            "weights with a scale per 16 take the VNNI kernel"
        );
        assert!(groups.end <= self.rows / LANES);
        let (n, nb) = (LANES * tiles, self.nb);
        match rows {
            Rows::I16 { tiled, d, sums } => {
                assert!(tiled.len() >= tiles * nb * 2 * TILE);
                assert!(d.len() >= n * nb && sums.len() >= n * nb);
            }
            Rows::Q8 { tiled, a } => {
                assert!(self.takes_q8(), "8-bit weights meet 16-bit activations");
                assert!(tiled.len() >= tiles * nb * TILE && a.len() >= n * nb);
            }
        }
        // SAFETY: the CPU has AMX-INT8 and AVX-512 VNNI and the process may use the tiles
        // (`runs_here`); reads stay within the packed arrays (the groups exist) and the
        // activation rows (asserted).
        unsafe {
            match (rows, self.ty == GgmlType::Q8_0) {
                (Rows::I16 { .. }, true) => run::<true, true>(self, groups, rows, tiles, put),
                (Rows::I16 { .. }, false) => run::<true, false>(self, groups, rows, tiles, put),
                (Rows::Q8 { .. }, _) => run::<false, false>(self, groups, rows, tiles, put),
            }
        }
    }
}

/// Where a tile of 16 activation rows lies: its values (`hi` plane, or 8-bit values)
/// and `lo` plane (null for 8-bit values), rows 32 bytes apart, block `i` at `+ i · step`;
/// its scales and block sums, rows `dstride` bytes apart, block `i` at `+ i · dstep`.
#[derive(Clone, Copy)]
struct Src {
    x: *const u8,
    lo: *const u8,
    step: usize,
    d: *const u8,
    s: *const u8,
    dstride: usize,
    dstep: usize,
}

impl Src {
    /// Tile `t` of `rows`, for weights `cols` wide.
    fn new(rows: &Rows, t: usize, cols: usize) -> Self {
        let nb = cols / QK;
        let r0 = LANES * t;
        match rows {
            Rows::I16 { tiled, d, sums } => {
                let x = tiled[t * nb * 2 * TILE..].as_ptr();
                Src {
                    x,
                    lo: x.wrapping_add(TILE),
                    step: 2 * TILE,
                    d: d[r0 * nb..].as_ptr() as *const u8,
                    s: sums[r0 * nb..].as_ptr() as *const u8,
                    dstride: 4 * nb,
                    dstep: 4,
                }
            }
            Rows::Q8 { tiled, a } => {
                let at = a[r0 * nb..].as_ptr() as *const u8;
                let size = std::mem::size_of::<Q8Block>();
                Src {
                    x: tiled[t * nb * TILE..].as_ptr(),
                    lo: std::ptr::null(),
                    step: TILE,
                    d: at.wrapping_add(std::mem::offset_of!(Q8Block, d)),
                    s: at.wrapping_add(std::mem::offset_of!(Q8Block, s)),
                    dstride: nb * size,
                    dstep: size,
                }
            }
        }
    }

    /// Row `r`'s scale and block sum of block `i`.
    #[inline(always)]
    unsafe fn scale_sum(&self, r: usize, i: usize) -> (f32, f32) {
        let at = r * self.dstride + i * self.dstep;
        (
            (self.d.add(at) as *const f32).read_unaligned(),
            (self.s.add(at) as *const f32).read_unaligned(),
        )
    }
}

/// [`Packed::dot_tiles_amx`]: `I16`, activations in two byte planes (else 8-bit blocks);
/// `Q8W`, 8-bit weights (else 4-bit). Two groups at a time meet a tile of activations
/// (four products in flight, for 16-bit activations), block by block; block `i + 1`'s
/// products go to the tiles before block `i`'s sums are scaled, so that the two could
/// overlap (on Sapphire Rapids they take turns: BENCHMARKS.md).
///
/// # Safety
/// As `dot_tiles_amx` asserts.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn run<const I16: bool, const Q8W: bool>(
    pk: &Packed,
    groups: std::ops::Range<usize>,
    rows: &Rows,
    tiles: usize,
    put: &mut TilePut,
) {
    let (nb, cols) = (pk.nb, pk.cols);
    let vb = Packed::vb(pk.ty);
    let mins = pk.has_mins();
    // Two groups' blocks as tile rows; two blocks' integer sums from the tiles ([block %
    // 2][group · 2 + plane]); the two groups' outputs for a tile of activations.
    let mut weights = vec![_mm512_setzero_si512(); 2 * nb * BLOCK / 64];
    let mut sums = [[[_mm512_setzero_si512(); LANES]; 4]; 2];
    let mut res = [[0f32; LANES]; LANES];
    asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
    let mut g0 = groups.start;
    while g0 < groups.end {
        // A last group alone is paired with itself (its second products not scaled, nor
        // handed over).
        let pair = [g0, (g0 + 1).min(groups.end - 1)];
        let distinct = 1 + (pair[1] != pair[0]) as usize;
        for (j, &g) in pair.iter().enumerate() {
            for i in 0..nb {
                let v = pk.vals.as_ptr().add((g * nb + i) * vb);
                unpack::<Q8W>(v, &mut weights[(j * nb + i) * 8..]);
            }
        }
        let w = weights.as_ptr() as *const u8;
        for t in 0..tiles {
            let src = Src::new(rows, t, cols);
            // Block i's products (zeroed sums, loads, the multiplies) go to the tiles,
            let start = |i: usize| {
                let (w0, w1) = (w.add(i * BLOCK), w.add((nb + i) * BLOCK));
                let x = src.x.add(i * src.step);
                match I16 {
                    true => start_i16::<Q8W>(x, src.lo.add(i * src.step), QK, w0, w1),
                    false => start_q8(x, QK, w0, w1),
                }
            };
            // ... and leave them (stored) after block i - 1's sums are scaled.
            let finish = |s: &mut [[__m512i; LANES]; 4]| match I16 {
                true => finish_tiles::<4>(s),
                false => finish_tiles::<2>(s),
            };
            let mut out = [[_mm512_setzero_ps(); LANES]; 2];
            start(0);
            finish(&mut sums[0]);
            for i in 0..nb {
                if i + 1 < nb {
                    start(i + 1);
                }
                let s = &sums[i % 2];
                for (j, &g) in pair.iter().enumerate().take(distinct) {
                    let gi = g * nb + i;
                    let scale = _mm512_loadu_ps(pk.scales.as_ptr().add(gi * LANES));
                    let min = match mins {
                        true => _mm512_loadu_ps(pk.mins.as_ptr().add(gi * LANES)),
                        false => _mm512_setzero_ps(),
                    };
                    for (r, o) in out[j].iter_mut().enumerate() {
                        let (d, xsum) = src.scale_sum(r, i);
                        let sum = match I16 {
                            true => _mm512_add_epi32(
                                _mm512_slli_epi32::<8>(s[2 * j][r]),
                                s[2 * j + 1][r],
                            ),
                            false => s[j][r],
                        };
                        let f = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(d));
                        *o = _mm512_fmadd_ps(f, scale, *o);
                        if mins {
                            *o = _mm512_fmadd_ps(min, _mm512_set1_ps(xsum), *o);
                        }
                    }
                }
                if i + 1 < nb {
                    finish(&mut sums[(i + 1) % 2]);
                }
            }
            for (j, &g) in pair.iter().enumerate().take(distinct) {
                for (r, o) in out[j].iter().enumerate() {
                    _mm512_storeu_ps(res[r].as_mut_ptr(), *o);
                }
                put(g, LANES * t, &res);
            }
        }
        g0 += 2;
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// A block of 16 packed weight rows (`v`) as 8 tile rows: row `q` holds inputs `4q .. 4q
/// + 4` of each row as 4 bytes (unsigned nibbles, or signed bytes for `Q8W`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn unpack<const Q8W: bool>(v: *const u8, out: &mut [__m512i]) {
    for (q, o) in out[..8].iter_mut().enumerate() {
        *o = if Q8W {
            // Pairs 2q and 2q + 1 (32 bytes each, 2 a row): row l's words l and 16 + l.
            let idx = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
            );
            _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(v.add(64 * q) as *const _))
        } else {
            // Row l: bytes v0 | v1 << 4 and v2 | v3 << 4 → bytes (v0, v1, v2, v3).
            let lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(v.add(32 * q) as *const __m128i));
            let hi = _mm512_cvtepu8_epi32(_mm_loadu_si128(v.add(32 * q + 16) as *const __m128i));
            let x = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
            _mm512_and_si512(
                _mm512_or_si512(x, _mm512_slli_epi32::<4>(x)),
                _mm512_set1_epi32(0x0F0F_0F0F),
            )
        };
    }
}

/// Starts one block's products on the tiles for 16 activation rows of 16-bit values as
/// byte planes (`hi`, `lo`: the block's first bytes, rows `stride` apart) and two groups'
/// weight tile rows `w0`, `w1`: into tmm0 – tmm3 the sums of `hi`·`w0`, `lo`·`w0`,
/// `hi`·`w1`, `lo`·`w1` (16 rows of 16 each; [`finish_tiles`] stores them).
#[inline(always)]
unsafe fn start_i16<const Q8W: bool>(
    hi: *const u8,
    lo: *const u8,
    stride: usize,
    w0: *const u8,
    w1: *const u8,
) {
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "tileloadd tmm4, [{hi} + {stride}]",
        "tileloadd tmm5, [{lo} + {stride}]",
        "tileloadd tmm6, [{w0} + {ws}]",
        "tileloadd tmm7, [{w1} + {ws}]",
        hi = in(reg) hi,
        lo = in(reg) lo,
        stride = in(reg) stride,
        w0 = in(reg) w0,
        w1 = in(reg) w1,
        ws = in(reg) 64usize,
        options(nostack, readonly),
    );
    if Q8W {
        asm!(
            "tdpbssd tmm0, tmm4, tmm6",
            "tdpbusd tmm1, tmm5, tmm6",
            "tdpbssd tmm2, tmm4, tmm7",
            "tdpbusd tmm3, tmm5, tmm7",
            options(nostack, nomem),
        );
    } else {
        asm!(
            "tdpbsud tmm0, tmm4, tmm6",
            "tdpbuud tmm1, tmm5, tmm6",
            "tdpbsud tmm2, tmm4, tmm7",
            "tdpbuud tmm3, tmm5, tmm7",
            options(nostack, nomem),
        );
    }
}

/// [`start_i16`] for 8-bit activation values (`x`, a block's 32 bytes, rows `stride`
/// apart) and 4-bit weights: one product a group, into tmm0 and tmm1.
#[inline(always)]
unsafe fn start_q8(x: *const u8, stride: usize, w0: *const u8, w1: *const u8) {
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tileloadd tmm4, [{x} + {stride}]",
        "tileloadd tmm6, [{w0} + {ws}]",
        "tileloadd tmm7, [{w1} + {ws}]",
        "tdpbsud tmm0, tmm4, tmm6",
        "tdpbsud tmm1, tmm4, tmm7",
        x = in(reg) x,
        stride = in(reg) stride,
        w0 = in(reg) w0,
        w1 = in(reg) w1,
        ws = in(reg) 64usize,
        options(nostack, readonly),
    );
}

/// Stores the sums of the tiles [`start_i16`] (`N` = 4) or [`start_q8`] (2) began into
/// `out[0 .. N]`.
#[inline(always)]
unsafe fn finish_tiles<const N: usize>(out: &mut [[__m512i; LANES]; 4]) {
    asm!(
        "tilestored [{o0} + {s}], tmm0",
        "tilestored [{o1} + {s}], tmm1",
        o0 = in(reg) out[0].as_mut_ptr(),
        o1 = in(reg) out[1].as_mut_ptr(),
        s = in(reg) 64usize,
        options(nostack),
    );
    if N == 4 {
        asm!(
            "tilestored [{o2} + {s}], tmm2",
            "tilestored [{o3} + {s}], tmm3",
            o2 = in(reg) out[2].as_mut_ptr(),
            o3 = in(reg) out[3].as_mut_ptr(),
            s = in(reg) 64usize,
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant;
    use crate::testutil::rand;

    /// Every layout the tiles take, against activation rows 16 and 32 at a time: each
    /// output the scalar twin's bits, for 16-bit and 8-bit activations.
    #[test]
    fn the_tile_kernel_gives_the_scalar_twins_bits() {
        if !runs_here() {
            eprintln!("skipped: this CPU (or OS) has no AMX-INT8 with AVX-512 VNNI");
            return;
        }
        let (rows, cols, b) = (48, 576, 35);
        let nb = cols / QK;
        let x = rand(b * cols, 29);
        let mut q = vec![0i16; b * cols];
        let mut d = vec![0f32; b * nb];
        let mut a = vec![Q8Block::default(); b * nb];
        for r in 0..b {
            let (xr, span) = (&x[r * cols..(r + 1) * cols], r * cols..(r + 1) * cols);
            quant::quantize_row_i16(xr, &mut q[span], &mut d[r * nb..(r + 1) * nb]);
            quant::quantize_row_q8(xr, &mut a[r * nb..(r + 1) * nb]);
        }
        // Extremes of both planes: the largest magnitudes a block's scale gives.
        q[..4].copy_from_slice(&[32767, -32767, 255, -256]);
        let sums: Vec<f32> = x.chunks_exact(QK).map(|c| c.iter().sum()).collect();
        let (mut tiled, mut tiled8) = (Vec::new(), Vec::new());
        tile_i16(&q, b, cols, &mut tiled);
        tile_q8(&a, b, nb, &mut tiled8);
        let i16_rows = Rows::I16 {
            tiled: &tiled,
            d: &d,
            sums: &sums,
        };
        let q8_rows = Rows::Q8 {
            tiled: &tiled8,
            a: &a,
        };
        let cases = [
            (GgmlType::Q4_0, false),
            (GgmlType::Q4_1, false),
            (GgmlType::Q8_0, false),
            (GgmlType::Q8_0, true),
        ];
        for (ty, with_mins) in cases {
            let mut data = Vec::new();
            match ty {
                GgmlType::Q4_0 => quant::quantize_row_q4_0(&rand(rows * cols, 11), &mut data),
                GgmlType::Q4_1 => quant::quantize_row_q4_1(&rand(rows * cols, 11), &mut data),
                _ => {
                    quant::quantize_row_q8_0(&rand(rows * cols, 11), &mut data);
                    crate::testutil::with_q8_0_minimum(&mut data);
                }
            }
            let mut pk = Packed::new(ty, rows, cols, &data).expect("packs");
            if with_mins {
                pk = pk.with_mins(&rand(rows * nb, 13));
            }
            let acts: &[(&str, &Rows)] = match pk.takes_q8() {
                true => &[("i16", &i16_rows), ("q8", &q8_rows)],
                false => &[("i16", &i16_rows)],
            };
            for &(name, acts) in acts {
                let mut seen = 0;
                pk.dot_tiles_amx(0..3, acts, 2, &mut |g, r0, res| {
                    for (r, got) in res.iter().enumerate() {
                        let row = r0 + r;
                        let (qr, dr) = (row * cols..(row + 1) * cols, row * nb..(row + 1) * nb);
                        let twin = match acts {
                            Rows::I16 { .. } => {
                                pk.dot_rows_scalar::<1>(g, [&q[qr]], [&d[dr.clone()]], [&sums[dr]])
                            }
                            Rows::Q8 { .. } => pk.dot_rows_q8_scalar::<1>(g, [&a[dr]]),
                        };
                        assert_eq!(
                            *got, twin[0],
                            "{ty:?} mins {with_mins} {name}: group {g} row {row}"
                        );
                    }
                    seen += 1;
                });
                assert_eq!(seen, 3 * 2, "every group and tile handed over once");
            }
        }
    }
}
