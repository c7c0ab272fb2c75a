//! Quantized weights repacked for wide integer dot products: 16 output rows side by side,
//! so that one 512-bit register holds one pair of inputs for 16 rows and one `vpdpwssd`
//! (AVX-512 VNNI) adds 32 products into 16 per-row integer sums. Where the CPU has AVX2
//! but not AVX-512 VNNI, the `avx2` kernels read the same layout 8 rows at a time; on
//! aarch64 the `neon` kernels, 4 rows a register.
//!
//! The file's layout (one row after the other, [`crate::quant`]) makes every 32-value
//! block end in a horizontal sum and a float conversion per activation row. Here a block's
//! integer sums for 16 rows build up in one register over 16 instructions — each taking
//! its activation pair as a broadcast — and are converted and scaled once, for 16 rows at
//! a time. Weights stay 4-bit in memory (a byte holds one input pair of one row) and are
//! unpacked once per pair and used for every activation row of a tile.
//!
//! Layout, for group `g` (rows `16g .. 16g + 16`) and block `i` (inputs `32i .. 32i + 32`),
//! pair `p` (inputs `32i + 2p`, `+1`), lane `l` (row `16g + l`):
//! - Q4_0 / Q4_1: byte `(g·nb + i)·256 + 16p + l` = `v[2p] | v[2p + 1] << 4` (raw nibbles)
//! - Q8_0: bytes `(g·nb + i)·512 + 32p + 2l`, `+1` = `q[2p]`, `q[2p + 1]` (i8)
//! - `scales[(g·nb + i)·16 + l]` = the block's `d`; `mins[...]` = `m` (Q4_1), `−8d` (Q4_0)
//!   (for Q8_0 none, or the block's offset where the matrix has offsets of a block each:
//!   [`Packed::with_mins`])
//! - Q8_0 with a scale per 16 ([`Packed::from_i8_runs16`], Q6_K's layout: `d·sc` for each
//!   16 values): `scales[((g·nb + i)·2 + h)·16 + l]` for half `h` (pairs `8h .. 8h + 8`)
//!
//! Against activations quantized to 16-bit blocks (`q`, `d`, f32 block sums `xsum`, as
//! [`crate::quant::quantize_row_i16`] makes them), output `l` of an activation row is
//! `Σ_i fma(float(Σ_k v_k q_k) · d_i, scale_il, ·)` then `fma(min_il, xsum_i, ·)`, block by
//! block in that order, on the CPU kernel and its scalar twin alike (bit for bit); with a
//! scale per 16, one such `fma` per half (its 16 products' sum), in order, then the min. The
//! `q8` submodule runs 8-bit activations against the same packed 4-bit weights; the `amx`
//! one runs batches 16 activation rows at a time on AMX's tiles, where the CPU has them,
//! with the same results.

use crate::gguf::GgmlType;
use crate::quant::QK;
use half::f16;

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;
mod q8;

/// Output rows per group.
pub const LANES: usize = 16;

/// A quantized matrix in the interleaved layout.
pub struct Packed {
    ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    nb: usize,
    /// Scales per block and row: 1, or 2 (a scale per 16 values, 8-bit weights only).
    runs: usize,
    vals: Vec<u8>,
    scales: Vec<f32>,
    mins: Vec<f32>,
}

fn f16_le(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

impl Packed {
    /// Bytes of packed values per group and block.
    fn vb(ty: GgmlType) -> usize {
        if ty == GgmlType::Q8_0 {
            2 * QK * LANES / 2
        } else {
            QK * LANES / 2
        }
    }

    /// Repacks `rows × cols` quantized weights in the file's layout; `None` for types it
    /// does not cover or a row count that is not a multiple of 16.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &[u8]) -> Option<Self> {
        if !matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
            || !rows.is_multiple_of(LANES)
            || !cols.is_multiple_of(QK)
        {
            return None;
        }
        let (nb, bb) = (cols / QK, ty.block_bytes());
        if data.len() != rows * nb * bb {
            return None;
        }
        let groups = rows / LANES;
        let vb = Self::vb(ty);
        let mut vals = vec![0u8; groups * nb * vb];
        let mut scales = vec![0f32; groups * nb * LANES];
        let mut mins = if ty == GgmlType::Q8_0 {
            Vec::new()
        } else {
            vec![0f32; groups * nb * LANES]
        };
        for n in 0..rows {
            let (g, l) = (n / LANES, n % LANES);
            for i in 0..nb {
                let b = &data[(n * nb + i) * bb..(n * nb + i + 1) * bb];
                let gi = g * nb + i;
                let d = f16_le(b, 0);
                scales[gi * LANES + l] = d;
                let v = &mut vals[gi * vb..(gi + 1) * vb];
                match ty {
                    GgmlType::Q8_0 => {
                        for p in 0..QK / 2 {
                            v[32 * p + 2 * l] = b[2 + 2 * p];
                            v[32 * p + 2 * l + 1] = b[2 + 2 * p + 1];
                        }
                    }
                    _ => {
                        let (qs, m) = if ty == GgmlType::Q4_1 {
                            (&b[4..20], f16_le(b, 2))
                        } else {
                            (&b[2..18], -8.0 * d)
                        };
                        mins[gi * LANES + l] = m;
                        let nib = |k: usize| {
                            if k < 16 {
                                qs[k] & 15
                            } else {
                                qs[k - 16] >> 4
                            }
                        };
                        for p in 0..QK / 2 {
                            v[16 * p + l] = nib(2 * p) | nib(2 * p + 1) << 4;
                        }
                    }
                }
            }
        }
        Some(Self {
            ty,
            rows,
            cols,
            nb,
            runs: 1,
            vals,
            scales,
            mins,
        })
    }

    /// `rows × cols` 8-bit weights with a scale per 16 of a row (Q6_K's layout): `values`
    /// row by row, and `scales[n · cols / 16 + j]` for values `16j .. 16j + 16` of row `n`.
    /// `None` for a shape the layout does not take (as [`Packed::new`]).
    pub fn from_i8_runs16(rows: usize, cols: usize, values: &[i8], scales: &[f32]) -> Option<Self> {
        if values.len() != rows * cols || scales.len() * 16 != rows * cols {
            return None;
        }
        // Q8_0 blocks of scale 1 packed, then each 16's own scale put in.
        let one = f16::ONE.to_le_bytes();
        let blocks: Vec<u8> = values
            .chunks(QK)
            .flat_map(|c| one.iter().copied().chain(c.iter().map(|&v| v as u8)))
            .collect();
        let pk = Self::new(GgmlType::Q8_0, rows, cols, &blocks)?;
        Some(pk.with_runs16().with_exact_scales(scales, &[]))
    }

    /// The same 8-bit weights with a scale per 16 (each block's, twice), so that they
    /// stack with weights that have one ([`Packed::concat`]).
    pub fn with_runs16(mut self) -> Self {
        assert_eq!(self.ty, GgmlType::Q8_0);
        if self.runs == 1 {
            self.scales = self
                .scales
                .chunks_exact(LANES)
                .flat_map(|c| c.iter().chain(c).copied())
                .collect();
            self.runs = 2;
        }
        self
    }

    /// The layout of the weights' integers (Q4_0, Q4_1 or Q8_0).
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Scales per block and row (2: a scale per 16 values).
    pub fn runs(&self) -> usize {
        self.runs
    }

    /// The rows of `parts` one after the other, as one matrix: they have the same type,
    /// width and scales per block; mins where any part has them (zero for the others).
    pub fn concat(parts: &[Packed]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.ty != first.ty || p.cols != first.cols || p.runs != first.runs)
        {
            return None;
        }
        let mins = parts.iter().any(Packed::has_mins);
        let vals = parts.iter().flat_map(|p| &p.vals).copied().collect();
        let scales = parts.iter().flat_map(|p| &p.scales).copied().collect();
        let mins = match mins {
            true => parts
                .iter()
                .flat_map(|p| match p.has_mins() {
                    true => p.mins.clone(),
                    false => vec![0.0; p.rows * p.nb],
                })
                .collect(),
            false => Vec::new(),
        };
        Some(Self {
            ty: first.ty,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            nb: first.nb,
            runs: first.runs,
            vals,
            scales,
            mins,
        })
    }

    /// The same integers under other scales, and other mins where `mins` is not empty:
    /// `scales[(n · nb + i) · runs + h]` (and `mins[n · nb + i]`) for row `n`, block `i`,
    /// its scale `h` — the f32 values of scales that the file's blocks round (a K-quant
    /// sub-block's `d·sc`) or cannot hold (Q6_K's per 16).
    pub fn with_exact_scales(mut self, scales: &[f32], mins: &[f32]) -> Self {
        let runs = self.runs;
        assert_eq!(scales.len(), self.rows * self.nb * runs);
        assert!(mins.is_empty() || mins.len() * runs == scales.len() && self.has_mins());
        for (n, row) in scales.chunks_exact(self.nb * runs).enumerate() {
            let (g, l) = (n / LANES, n % LANES);
            for (k, &v) in row.iter().enumerate() {
                let (gi, h) = (g * self.nb + k / runs, k % runs);
                let at = self.scale_at(gi, h) + l;
                self.scales[at] = v;
                if let Some(&m) = mins.get(n * self.nb + k / runs) {
                    self.mins[gi * LANES + l] = m;
                }
            }
        }
        self
    }

    /// The same Q8_0 weights with a min per row and block added (`mins[n · nb + i]`, row
    /// by row): the offsets a [`crate::matmul::Matrix`] holds for Q5_1 and Q5_K, which the
    /// kernels then add as Q4_1's, `min · block sum`.
    pub fn with_mins(mut self, mins: &[f32]) -> Self {
        assert_eq!(self.ty, GgmlType::Q8_0);
        assert_eq!(mins.len(), self.rows * self.nb);
        let mut held = vec![0f32; self.rows * self.nb];
        for (n, row) in mins.chunks_exact(self.nb).enumerate() {
            let (g, l) = (n / LANES, n % LANES);
            for (i, &m) in row.iter().enumerate() {
                held[(g * self.nb + i) * LANES + l] = m;
            }
        }
        self.mins = held;
        self
    }

    /// Whether the weights have mins (Q4_0, Q4_1, and Q8_0 given them).
    pub fn has_mins(&self) -> bool {
        !self.mins.is_empty()
    }

    /// Weight `k` of row `n` as an integer (before scale and min).
    fn int(&self, n: usize, k: usize) -> i32 {
        let (g, l, i, j) = (n / LANES, n % LANES, k / QK, k % QK);
        let vb = Self::vb(self.ty);
        Self::int_in(self.ty, &self.vals[(g * self.nb + i) * vb..], l, j)
    }

    /// Weight `j` of lane `l`'s row in a group's block `v`: at 8 bits its byte, at 4 its
    /// pair's byte (the low nibble for even `j`), the pairs `l` apart in their pieces.
    #[inline(always)]
    fn int_in(ty: GgmlType, v: &[u8], l: usize, j: usize) -> i32 {
        let p = j / 2;
        if ty == GgmlType::Q8_0 {
            v[32 * p + 2 * l + j % 2] as i8 as i32
        } else {
            let byte = v[16 * p + l];
            (if j.is_multiple_of(2) {
                byte & 15
            } else {
                byte >> 4
            }) as i32
        }
    }

    /// Where the 16 rows' scales `h` (0 where a block has one) of block `gi` (of all
    /// groups') begin in `scales`.
    #[inline(always)]
    fn scale_at(&self, gi: usize, h: usize) -> usize {
        (gi * self.runs + h) * LANES
    }

    /// Row `n`'s scale for block `gi` (of all groups'), half `h` (0 where a block has one).
    fn scale(&self, gi: usize, h: usize, l: usize) -> f32 {
        self.scales[self.scale_at(gi, h.min(self.runs - 1)) + l]
    }

    /// Block `i` of row `n`: its 32 integers (0..16 at 4 bits, signed at 8), its scales
    /// (the block's, twice, where it has one; the halves' with a scale per 16) and its min
    /// (0 where the weights have none): weight `c` is `scales[c / 16] · int[c] + min`.
    pub fn block(&self, n: usize, i: usize) -> ([i32; QK], [f32; 2], f32) {
        let (g, l) = (n / LANES, n % LANES);
        let gi = g * self.nb + i;
        let ints = self.block_ints(n, i);
        let scales = [self.scale(gi, 0, l), self.scale(gi, 1, l)];
        let min = self.mins.get(gi * LANES + l).copied().unwrap_or(0.0);
        (ints, scales, min)
    }

    /// Block `i` of row `n`'s 32 integers ([`Packed::int`]'s, the block found once).
    fn block_ints(&self, n: usize, i: usize) -> [i32; QK] {
        let (g, l) = (n / LANES, n % LANES);
        let vb = Self::vb(self.ty);
        let v = &self.vals[(g * self.nb + i) * vb..][..vb];
        std::array::from_fn(|j| Self::int_in(self.ty, v, l, j))
    }

    /// Dequantizes row `n` into `out`, a block at a time.
    pub fn row_f32(&self, n: usize, out: &mut [f32]) {
        let (g, l) = (n / LANES, n % LANES);
        for (i, o) in out[..self.cols].chunks_exact_mut(QK).enumerate() {
            let gi = g * self.nb + i;
            let m = self.mins.get(gi * LANES + l).copied().unwrap_or(0.0);
            let scales = [self.scale(gi, 0, l), self.scale(gi, 1, l)];
            for (j, (o, q)) in o.iter_mut().zip(self.block_ints(n, i)).enumerate() {
                *o = scales[j / (QK / 2)] * q as f32 + m;
            }
        }
    }

    /// Scalar twin of [`Packed::dot_rows`], with the same rounding.
    pub fn dot_rows_scalar<const R: usize>(
        &self,
        g: usize,
        q: [&[i16]; R],
        d: [&[f32]; R],
        xsum: [&[f32]; R],
    ) -> [[f32; LANES]; R] {
        let mut out = [[0f32; LANES]; R];
        for i in 0..self.nb {
            let gi = g * self.nb + i;
            for r in 0..R {
                for l in 0..LANES {
                    let n = g * LANES + l;
                    let run = QK / self.runs;
                    let mut o = out[r][l];
                    for h in 0..self.runs {
                        let s: i32 = (h * run..(h + 1) * run)
                            .map(|j| self.int(n, i * QK + j) * q[r][i * QK + j] as i32)
                            .sum();
                        o = (s as f32 * d[r][i]).mul_add(self.scale(gi, h, l), o);
                    }
                    if let Some(&m) = self.mins.get(gi * LANES + l) {
                        o = m.mul_add(xsum[r][i], o);
                    }
                    out[r][l] = o;
                }
            }
        }
        out
    }

    /// Rows `16g .. 16g + 16` against R rows of 16-bit activations (row `r`: values `q`,
    /// block scales `d`, f32 block sums `xsum`): `out[r][l]` = row `16g + l` · activation
    /// row `r`.
    pub fn dot_rows<const R: usize>(
        &self,
        g: usize,
        q: [&[i16]; R],
        d: [&[f32]; R],
        xsum: [&[f32]; R],
    ) -> [[f32; LANES]; R] {
        self.dot_rows_on(kernel(), g, q, d, xsum)
    }

    /// [`Packed::dot_rows`] on `kernel` (`None`: the scalar twin); `kernel` must run here.
    pub(crate) fn dot_rows_on<const R: usize>(
        &self,
        kernel: Option<Kernel>,
        g: usize,
        q: [&[i16]; R],
        d: [&[f32]; R],
        xsum: [&[f32]; R],
    ) -> [[f32; LANES]; R] {
        let mut out = [[0f32; LANES]; R];
        self.dot_rows_groups_on(kernel, g..g + 1, q, d, xsum, &mut |_, r| out = *r);
        out
    }

    /// [`Packed::dot_rows`] for each group of `groups` in turn, handing each result to
    /// `put(group, result)`: the activation rows are set up once for all of them.
    #[inline]
    pub fn dot_rows_groups<const R: usize>(
        &self,
        groups: std::ops::Range<usize>,
        q: [&[i16]; R],
        d: [&[f32]; R],
        xsum: [&[f32]; R],
        put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
    ) {
        self.dot_rows_groups_on(kernel(), groups, q, d, xsum, put)
    }

    #[inline]
    fn dot_rows_groups_on<const R: usize>(
        &self,
        kernel: Option<Kernel>,
        groups: std::ops::Range<usize>,
        q: [&[i16]; R],
        d: [&[f32]; R],
        xsum: [&[f32]; R],
        put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
    ) {
        assert!(groups.end <= self.rows / LANES);
        assert!(q.iter().all(|x| x.len() >= self.cols));
        assert!(d.iter().chain(xsum.iter()).all(|s| s.len() >= self.nb));
        assert!(
            kernel.is_none_or(Kernel::runs_here),
            "{kernel:?} does not run here"
        );
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        if let Some(k) = kernel {
            // SAFETY: the kernel's instructions exist here (asserted); reads stay within
            // the packed arrays (the groups exist) and `q`, `d`, `xsum` (asserted).
            unsafe {
                match (self.ty == GgmlType::Q8_0, self.runs) {
                    (true, 2) => on_kernel::<R, true, 2>(k, self, groups, q, d, xsum, put),
                    (true, _) => on_kernel::<R, true, 1>(k, self, groups, q, d, xsum, put),
                    (false, _) => on_kernel::<R, false, 1>(k, self, groups, q, d, xsum, put),
                }
            }
            return;
        }
        for g in groups {
            put(g, &self.dot_rows_scalar(g, q, d, xsum));
        }
    }
}

/// [`Packed::dot_rows_groups`] on kernel `k`; `Q8W`: 8-bit weights; `RUNS`: scales per
/// block ([`Packed::runs`]).
///
/// # Safety
/// `k` runs on this CPU, and the arguments are as `dot_rows_groups` asserts them, `RUNS`
/// as the weights'.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[inline]
unsafe fn on_kernel<const R: usize, const Q8W: bool, const RUNS: usize>(
    k: Kernel,
    pk: &Packed,
    groups: std::ops::Range<usize>,
    q: [&[i16]; R],
    d: [&[f32]; R],
    xsum: [&[f32]; R],
    put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
) {
    match k {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => vnni::dot_rows::<R, Q8W, RUNS>(pk, groups, q, d, xsum, put),
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni => avx2::dot_rows_vnni::<R, Q8W, RUNS>(pk, groups, q, d, xsum, put),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => avx2::dot_rows::<R, Q8W, RUNS>(pk, groups, q, d, xsum, put),
        // The 16-bit path needs no dot-product instruction.
        #[cfg(target_arch = "aarch64")]
        Kernel::NeonDot | Kernel::Neon => {
            neon::dot_rows::<R, Q8W, RUNS>(pk, groups, q, d, xsum, put)
        }
    }
}

/// The packed kernels, by the instructions they need (those of this CPU architecture).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 with VNNI: 16 rows a register, one instruction per product pair (or quad).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// AVX2 with AVX-VNNI (the 256-bit `vpdpwssd`/`vpdpbusd`): 8 rows a register.
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    /// AVX2 alone: `vpmaddwd` (and `vpmaddubsw`) then an add, 8 rows a register.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// NEON with the dot-product extension (`sdot`, for 8-bit activations): 4 rows a
    /// register.
    #[cfg(target_arch = "aarch64")]
    NeonDot,
    /// NEON alone (every aarch64 CPU): `smlal` by element, 4 rows a register.
    #[cfg(target_arch = "aarch64")]
    Neon,
}

impl Kernel {
    /// Whether this CPU has the kernel's instructions (whatever the environment says).
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            match self {
                Kernel::Avx512Vnni => {
                    is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vnni")
                }
                Kernel::AvxVnni => avx2 && is_x86_feature_detected!("avxvnni"),
                Kernel::Avx2 => avx2,
            }
        }
        #[cfg(target_arch = "aarch64")]
        match self {
            Kernel::NeonDot => std::arch::is_aarch64_feature_detected!("dotprod"),
            Kernel::Neon => std::arch::is_aarch64_feature_detected!("neon"),
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        match self {}
    }

    /// Every kernel this CPU runs, best first (for tests and benchmarks).
    pub fn all_here() -> Vec<Kernel> {
        let all: &[Kernel] = &[
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni,
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2,
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDot,
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon,
        ];
        all.iter().copied().filter(|k| k.runs_here()).collect()
    }

    /// Activation rows a tile takes, largest first (ending in 1): as many as keep a
    /// tile's integer sums in registers.
    pub fn tiles(self, q8: bool) -> &'static [usize] {
        match (self, q8) {
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512Vnni, false) => &[12, 8, 4, 1],
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512Vnni, true) => &[8, 4, 1],
            #[cfg(target_arch = "x86_64")]
            (Kernel::AvxVnni, _) => &[8, 4, 1],
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, _) => &[6, 4, 1],
            #[cfg(target_arch = "aarch64")]
            (Kernel::NeonDot | Kernel::Neon, _) => &[4, 1],
        }
    }
}

/// The packed kernel this CPU runs, if any: the first of [`Kernel::all_here`] (on x86-64
/// AVX-512 VNNI, AVX-VNNI, AVX2; on aarch64 NEON with `dotprod`, NEON) within the
/// instruction set [`crate::quant::simd_path`] allows (`TOLLGATE_SIMD=avx2` caps it at
/// AVX2). With `TOLLGATE_NO_VNNI=1` the VNNI kernels are passed over (and on aarch64 the
/// dot-product one); with `TOLLGATE_PACKED=0` (or, as before, `TOLLGATE_SIMD=avx512`)
/// there is none and the file's layout is used, for comparisons.
pub fn kernel() -> Option<Kernel> {
    use std::sync::OnceLock;
    static KERNEL: OnceLock<Option<Kernel>> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        let path = crate::quant::simd_path();
        let var = |k: &str| std::env::var(k).ok();
        if var("TOLLGATE_PACKED").as_deref() == Some("0")
            || var("TOLLGATE_SIMD").as_deref() == Some("avx512")
            || path == "scalar"
        {
            return None;
        }
        let no_vnni = var("TOLLGATE_NO_VNNI").is_some_and(|v| v != "0");
        Kernel::all_here().into_iter().find(|k| match k {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => path == "avx512" && !no_vnni,
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => !no_vnni,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => true,
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDot => !no_vnni,
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => true,
        })
    })
}

/// Whether this CPU runs a packed kernel ([`kernel`]).
pub fn available() -> bool {
    kernel().is_some()
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Packed, LANES};
    use crate::quant::QK;
    use std::arch::x86_64::*;
    use std::array::from_fn;

    /// See [`Packed::dot_rows_groups`]; `Q8`: the values are i8 pairs, else nibble pairs;
    /// `RUNS` scales a block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot_rows<const R: usize, const Q8: bool, const RUNS: usize>(
        pk: &Packed,
        groups: std::ops::Range<usize>,
        q: [&[i16]; R],
        d: [&[f32]; R],
        xsum: [&[f32]; R],
        put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
    ) {
        let nb = pk.nb;
        let vb = Packed::vb(pk.ty);
        let nibbles = _mm512_set1_epi32(0x000F_000F);
        for g in groups {
            let mut out = [_mm512_setzero_ps(); R];
            for i in 0..nb {
                let gi = g * nb + i;
                let v = pk.vals.as_ptr().add(gi * vb);
                let dr = from_fn(|r| *d[r].get_unchecked(i));
                // Pairs of each scale (all 16, or 8 and 8), then the mins once.
                let pairs = QK / 2 / RUNS;
                for h in 0..RUNS {
                    let mut acc = [_mm512_setzero_si512(); R];
                    for pp in 0..pairs {
                        let p = h * pairs + pp;
                        let w = if Q8 {
                            _mm512_cvtepi8_epi16(
                                _mm256_loadu_si256(v.add(32 * p) as *const __m256i),
                            )
                        } else {
                            // Lane l: byte b = v0 | v1 << 4 → i16 pair (v0, v1).
                            let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                                v.add(16 * p) as *const __m128i
                            ));
                            _mm512_and_si512(
                                _mm512_or_si512(b, _mm512_slli_epi32::<12>(b)),
                                nibbles,
                            )
                        };
                        for r in 0..R {
                            let pair =
                                (q[r].as_ptr().add(i * QK + 2 * p) as *const i32).read_unaligned();
                            acc[r] = _mm512_dpwssd_epi32(acc[r], w, _mm512_set1_epi32(pair));
                        }
                    }
                    let mins = (h + 1 == RUNS && (!Q8 || pk.has_mins()))
                        .then(|| from_fn(|r| *xsum[r].get_unchecked(i)));
                    add_block(pk, pk.scale_at(gi, h), gi * LANES, &mut out, &acc, dr, mins);
                }
            }
            hand_over(g, &out, put);
        }
    }

    /// Adds a block's integer sums (`acc`, one register of 16 rows per activation row)
    /// into the outputs: `out[r] = fma(float(acc[r]) · d[r], scale, out[r])` with the 16
    /// rows' scales at `scales[sc..]`, then, with the rows' block sums `s`,
    /// `out[r] = fma(min, s[r], out[r])` with the mins at `mins[mn..]` — the order the
    /// scalar twins follow.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn add_block<const R: usize>(
        pk: &Packed,
        sc: usize,
        mn: usize,
        out: &mut [__m512; R],
        acc: &[__m512i; R],
        d: [f32; R],
        s: Option<[f32; R]>,
    ) {
        let sc = _mm512_loadu_ps(pk.scales.as_ptr().add(sc));
        for r in 0..R {
            let f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r]), _mm512_set1_ps(d[r]));
            out[r] = _mm512_fmadd_ps(f, sc, out[r]);
        }
        if let Some(s) = s {
            let mn = _mm512_loadu_ps(pk.mins.as_ptr().add(mn));
            for r in 0..R {
                out[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(s[r]), out[r]);
            }
        }
    }

    /// Stores a group's outputs and hands them to `put`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn hand_over<const R: usize>(
        g: usize,
        out: &[__m512; R],
        put: &mut dyn FnMut(usize, &[[f32; LANES]; R]),
    ) {
        let mut res = [[0f32; LANES]; R];
        for r in 0..R {
            _mm512_storeu_ps(res[r].as_mut_ptr(), out[r]);
        }
        put(g, &res);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant;
    use crate::testutil::rand;
    use std::array::from_fn;

    fn quantized(ty: GgmlType, x: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        match ty {
            GgmlType::Q4_0 => quant::quantize_row_q4_0(x, &mut out),
            GgmlType::Q4_1 => quant::quantize_row_q4_1(x, &mut out),
            _ => {
                quant::quantize_row_q8_0(x, &mut out);
                crate::testutil::with_q8_0_minimum(&mut out);
            }
        }
        out
    }

    #[test]
    fn packed_rows_dequantize_like_the_file_layout() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let (rows, cols) = (48, 96);
            let data = quantized(ty, &rand(rows * cols, 3));
            let pk = Packed::new(ty, rows, cols, &data).expect("packs");
            let rb = cols / QK * ty.block_bytes();
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            for n in 0..rows {
                quant::dequantize_row(ty, &data[n * rb..(n + 1) * rb], &mut a);
                pk.row_f32(n, &mut b);
                assert_eq!(a, b, "{ty:?} row {n}");
            }
        }
        assert!(Packed::new(GgmlType::Q4_1, 40, 64, &[0; 40 * 2 * 20]).is_none());
    }

    #[test]
    fn every_kernel_here_matches_the_scalar_twin_bit_for_bit_and_the_f32_product_closely() {
        let kernels = Kernel::all_here();
        eprintln!("packed kernels on this CPU: {kernels:?}");
        // (type, mins, a scale per 16)
        let cases = [
            (GgmlType::Q4_0, false, false),
            (GgmlType::Q4_1, false, false),
            (GgmlType::Q8_0, false, false),
            (GgmlType::Q8_0, true, false),
            (GgmlType::Q8_0, false, true),
            (GgmlType::Q8_0, true, true),
        ];
        for (ty, mins, runs16) in cases {
            let (rows, cols, b) = (32, 576, 7);
            let mut pk = match runs16 {
                true => runs16_matrix(rows, cols, 11),
                false => {
                    let data = quantized(ty, &rand(rows * cols, 11));
                    Packed::new(ty, rows, cols, &data).expect("packs")
                }
            };
            if mins {
                pk = pk.with_mins(&rand(rows * cols / QK, 13));
            }
            let x = rand(b * cols, 29);
            let nb = cols / QK;
            let mut q = vec![0i16; b * cols];
            let mut d = vec![0f32; b * nb];
            for r in 0..b {
                quant::quantize_row_i16(
                    &x[r * cols..(r + 1) * cols],
                    &mut q[r * cols..(r + 1) * cols],
                    &mut d[r * nb..(r + 1) * nb],
                );
            }
            let sums: Vec<f32> = x.chunks_exact(QK).map(|c| c.iter().sum()).collect();
            let qa = |r: usize| &q[r * cols..(r + 1) * cols];
            let da = |r: usize| &d[r * nb..(r + 1) * nb];
            let sa = |r: usize| &sums[r * nb..(r + 1) * nb];
            let mut w = vec![0f32; cols];
            for g in 0..rows / LANES {
                let twin = pk.dot_rows_scalar::<6>(g, from_fn(qa), from_fn(da), from_fn(sa));
                for &k in &kernels {
                    let six =
                        pk.dot_rows_on::<6>(Some(k), g, from_fn(qa), from_fn(da), from_fn(sa));
                    assert_eq!(six, twin, "{k:?} {ty:?} runs16 {runs16} group {g}");
                    let four = pk.dot_rows_on::<4>(
                        Some(k),
                        g,
                        from_fn(|r| qa(r + 2)),
                        from_fn(|r| da(r + 2)),
                        from_fn(|r| sa(r + 2)),
                    );
                    assert_eq!(
                        four[..],
                        twin[2..],
                        "{k:?}: a row's result does not depend on its tile"
                    );
                    let one = pk.dot_rows_on::<1>(Some(k), g, [qa(6)], [da(6)], [sa(6)]);
                    let one_twin = pk.dot_rows_scalar::<1>(g, [qa(6)], [da(6)], [sa(6)]);
                    assert_eq!(one, one_twin, "{k:?} {ty:?} group {g}, one row");
                }
                for r in 0..b {
                    let one = pk.dot_rows::<1>(g, [qa(r)], [da(r)], [sa(r)]);
                    for l in 0..LANES {
                        pk.row_f32(g * LANES + l, &mut w);
                        let want: f64 = w
                            .iter()
                            .zip(&x[r * cols..(r + 1) * cols])
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum();
                        let got = one[0][l] as f64;
                        assert!(
                            (got - want).abs() <= 1e-3 * (1.0 + want.abs()),
                            "{ty:?} row {} · x{r}: {got} vs {want}",
                            g * LANES + l
                        );
                    }
                }
            }
        }
    }

    /// 8-bit weights −32..32 (Q6_K's) with a scale per 16 of either sign.
    fn runs16_matrix(rows: usize, cols: usize, seed: u64) -> Packed {
        let (values, scales) = crate::testutil::runs16_weights(rows * cols, seed, 0.01);
        Packed::from_i8_runs16(rows, cols, &values, &scales).expect("packs")
    }

    #[test]
    fn weights_with_a_scale_per_16_keep_their_values_and_stack() {
        let (rows, cols) = (32, 96);
        let values: Vec<i8> = (0..rows * cols).map(|i| (i % 64) as i8 - 32).collect();
        let scales: Vec<f32> = (0..rows * cols / 16).map(|j| j as f32 - 50.0).collect();
        let pk = Packed::from_i8_runs16(rows, cols, &values, &scales).expect("packs");
        assert_eq!(pk.runs(), 2);
        let mut row = vec![0f32; cols];
        for n in 0..rows {
            pk.row_f32(n, &mut row);
            for (k, &w) in row.iter().enumerate() {
                let i = n * cols + k;
                assert_eq!(w, values[i] as f32 * scales[i / 16], "row {n} value {k}");
            }
        }
        assert!(Packed::from_i8_runs16(24, cols, &values[..24 * cols], &scales).is_none());
        // Stacked under a Q8_0 matrix whose block scales count for each 16.
        let data = quantized(GgmlType::Q8_0, &rand(16 * cols, 5));
        let q8 = Packed::new(GgmlType::Q8_0, 16, cols, &data).expect("packs");
        assert!(Packed::concat(&[q8, runs16_matrix(16, cols, 1)]).is_none());
        let q8 = Packed::new(GgmlType::Q8_0, 16, cols, &data)
            .expect("packs")
            .with_runs16();
        let both = Packed::concat(&[q8, pk]).expect("same type, width and runs");
        assert_eq!((both.rows, both.runs()), (48, 2));
        let mut want = vec![0f32; cols];
        let rb = cols / QK * GgmlType::Q8_0.block_bytes();
        for n in 0..16 {
            quant::dequantize_row(GgmlType::Q8_0, &data[n * rb..(n + 1) * rb], &mut want);
            both.row_f32(n, &mut row);
            assert_eq!(row, want, "row {n}");
        }
        for n in 0..rows {
            both.row_f32(16 + n, &mut row);
            let want: Vec<f32> = (0..cols)
                .map(|k| values[n * cols + k] as f32 * scales[(n * cols + k) / 16])
                .collect();
            assert_eq!(row, want, "row {}", 16 + n);
        }
    }

    #[test]
    fn the_kernel_in_use_follows_the_environment_s_caps() {
        // Whatever this CPU, the choice is one it runs, and the best of those allowed.
        let k = kernel();
        assert!(k.is_none_or(Kernel::runs_here));
        if std::env::var_os("TOLLGATE_SIMD").is_none()
            && std::env::var_os("TOLLGATE_PACKED").is_none()
            && std::env::var_os("TOLLGATE_NO_VNNI").is_none()
            && std::env::var_os("TOLLGATE_NO_SIMD").is_none()
        {
            assert_eq!(k, Kernel::all_here().first().copied());
        }
    }
}
