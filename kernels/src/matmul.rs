//! Matrix products on the CPU: `out[b][n] = Σ_k x[b][k] · W[n][k]` for a weight matrix in
//! its file format (quantized blocks, or f32) and a batch of activation rows, split over
//! output rows across the thread pool.

use crate::gguf::GgmlType;
use crate::packed::{self, Packed, LANES};
use crate::quant::{self, Q8Block, QK};
use rayon::prelude::*;
use std::array::from_fn;
use std::sync::OnceLock;

/// A weight matrix: `rows` outputs × `cols` inputs, each row contiguous.
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: MatData,
    /// The same weights repacked for the VNNI kernel ([`crate::packed`]), made on first
    /// use where the CPU has it (about 1.2× the quantized size, beside it).
    packed: OnceLock<Option<Packed>>,
    /// Offsets added to the weights, where they come from a layout with offsets that the
    /// kernels' own do not hold (Q5_1, Q5_K, Q2_K: [`crate::kquant`]).
    offsets: Option<HeldOffsets>,
    /// Whether the packed form holds the weights' own values and `data` an approximation
    /// ([`Matrix::with_exact_packed`]).
    packed_exact: bool,
}

/// [`Offsets`] as a matrix holds them: run by run (`by_run[j · rows + n]`, run `j` of row
/// `n`), so that a product adds them in passes along the output rows.
struct HeldOffsets {
    run: usize,
    by_run: Vec<f32>,
}

/// A constant added to every weight of each run of `run` in a row (`rows × cols / run`,
/// row by row). A product adds `Σ offset · (the run's inputs summed)` to the kernels':
/// in the packed kernels, as their mins, where the run is a block (Q5_1's, Q5_K's); in a
/// pass of its own otherwise (Q2_K's runs of 16, weights not packed, f32 activations).
#[derive(Clone, Debug, PartialEq)]
pub struct Offsets {
    /// Weights one offset covers: 16 or 32 (a divisor of [`QK`]).
    pub run: usize,
    pub values: Vec<f32>,
}

impl Offsets {
    /// The same offsets for runs of `run` (a divisor of `self.run`).
    fn split(&self, run: usize) -> Vec<f32> {
        let k = self.run / run;
        self.values
            .iter()
            .flat_map(|&v| std::iter::repeat_n(v, k))
            .collect()
    }
}

pub enum MatData {
    /// Rows of quantized blocks, as in the file.
    Quant(GgmlType, Vec<u8>),
    /// Plain f32 rows (F32, F16 and BF16 tensors are widened at load).
    F32(Vec<f32>),
}

impl Matrix {
    pub fn new(rows: usize, cols: usize, data: MatData) -> Self {
        Self {
            rows,
            cols,
            data,
            packed: OnceLock::new(),
            offsets: None,
            packed_exact: false,
        }
    }

    /// The same matrix whose values are `pk`'s, which only the packed layout holds: f32
    /// scales that `data`'s blocks round to f16 (K-quant sub-blocks', with the offsets of
    /// a block each as `pk`'s mins where the matrix has them), or a scale per 16 (Q6_K's,
    /// [`Packed::from_i8_runs16`]) that `data` holds requantized to Q8_0. `data` serves
    /// the products that do not read the packed form (f32 activations); rows
    /// ([`Matrix::row_f32`]) and the 16- and 8-bit products read `pk`.
    pub fn with_exact_packed(mut self, pk: Packed) -> Self {
        assert_eq!((pk.rows, pk.cols), (self.rows, self.cols));
        assert!(matches!(self.data, MatData::Quant(ty, _) if ty == pk.ty()));
        self.packed = OnceLock::from(Some(pk));
        self.packed_exact = true;
        self
    }

    /// The same matrix with `offsets` added to its weights.
    pub fn with_offsets(mut self, offsets: Offsets) -> Self {
        let run = offsets.run;
        assert!(run > 0 && QK.is_multiple_of(run));
        assert_eq!(offsets.values.len(), self.rows * self.cols / run);
        let runs = self.cols / run;
        let mut by_run = vec![0f32; offsets.values.len()];
        for (n, row) in offsets.values.chunks_exact(runs).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                by_run[j * self.rows + n] = v;
            }
        }
        self.offsets = Some(HeldOffsets { run, by_run });
        self
    }

    /// The blocks as the file holds them, where products may read them as they are: a
    /// quantized matrix with no offsets beside it and no more exact packed form (the GPU's
    /// products of few rows over the file's blocks, `cuda::gemv::QuantRows`).
    pub fn file_blocks(&self) -> Option<(GgmlType, &[u8])> {
        match &self.data {
            MatData::Quant(ty, d) if self.offsets.is_none() && !self.packed_exact => Some((*ty, d)),
            _ => None,
        }
    }

    /// The blocks with the offsets beside them, where the matrix has offsets and its blocks
    /// hold the rest of its values (Q2_K's Q8_0 blocks and offsets per 16: the GPU's
    /// products of few rows read them as `cuda::gemv::QuantRows::from_offsets` lays them
    /// out).
    pub fn blocks_with_offsets(&self) -> Option<(GgmlType, &[u8], Offsets)> {
        match &self.data {
            MatData::Quant(ty, d) if !self.packed_exact => Some((*ty, d, self.offsets()?)),
            _ => None,
        }
    }

    /// The packed form where it holds the matrix's values and its file blocks do not:
    /// scales the blocks round or cannot hold ([`Matrix::with_exact_packed`]), or offsets
    /// of a block each beside 8-bit blocks, which the packed form holds as its mins (the
    /// GPU's products of few rows read these where [`Matrix::file_blocks`] gives nothing).
    pub fn packed_values(&self) -> Option<&Packed> {
        if self.packed_exact || self.offsets_in_packed() {
            self.packed()
        } else {
            None
        }
    }

    /// The offsets added to the weights, if any (row by row).
    pub fn offsets(&self) -> Option<Offsets> {
        let o = self.offsets.as_ref()?;
        let runs = self.cols / o.run;
        let values = (0..self.rows * runs)
            .map(|i| o.by_run[(i % runs) * self.rows + i / runs])
            .collect();
        Some(Offsets { run: o.run, values })
    }

    /// The packed form, where the CPU runs the packed kernel and the type and shape allow.
    pub fn packed(&self) -> Option<&Packed> {
        self.packed
            .get_or_init(|| match &self.data {
                MatData::Quant(ty, d) if packed::available() => {
                    let pk = Packed::new(*ty, self.rows, self.cols, d)?;
                    // Offsets of a block each go in as the packed kernels' mins.
                    Some(match self.offsets() {
                        Some(o) if o.run == QK && *ty == GgmlType::Q8_0 => pk.with_mins(&o.values),
                        _ => pk,
                    })
                }
                _ => None,
            })
            .as_ref()
    }

    /// Whether a product at `prec` adds the offsets in the packed kernels (as their mins)
    /// rather than in a pass of its own.
    fn offsets_in_kernels(&self, prec: ActPrecision) -> bool {
        prec != ActPrecision::F32 && self.offsets_in_packed()
    }

    /// Whether the packed form holds the offsets (as the mins of 8-bit weights).
    fn offsets_in_packed(&self) -> bool {
        matches!(self.data, MatData::Quant(GgmlType::Q8_0, _))
            && self.offsets.as_ref().is_some_and(|o| o.run == QK)
            && self.packed().is_some_and(Packed::has_mins)
    }

    /// Prepares what products at `prec` will use (the packed form, for 16- and 8-bit
    /// activations), so that the first step does not pay for it.
    pub fn prepare(&self, prec: ActPrecision) {
        if prec != ActPrecision::F32 {
            self.packed();
        }
    }

    /// Bytes of one row in storage.
    fn row_bytes(&self) -> usize {
        match &self.data {
            MatData::Quant(ty, _) => self.cols / QK * ty.block_bytes(),
            MatData::F32(_) => self.cols * 4,
        }
    }

    /// Dequantizes row `r` into `out`.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        match &self.data {
            _ if self.packed_exact => match self.packed.get() {
                Some(Some(pk)) => pk.row_f32(r, out),
                _ => unreachable!("set with the flag"),
            },
            MatData::Quant(ty, d) => {
                let rb = self.row_bytes();
                quant::dequantize_row(*ty, &d[r * rb..(r + 1) * rb], out)
            }
            MatData::F32(d) => out.copy_from_slice(&d[r * self.cols..(r + 1) * self.cols]),
        }
        let added = self.packed_exact && self.offsets_in_packed();
        if let Some(off) = self.offsets.as_ref().filter(|_| !added) {
            for (j, o) in out[..self.cols].chunks_exact_mut(off.run).enumerate() {
                let v = off.by_run[j * self.rows + r];
                o.iter_mut().for_each(|o| *o += v);
            }
        }
    }

    /// Stacks matrices with the same input width and storage type into one (rows of the
    /// first, then the second, ...), so that one product computes all of them. Gives the
    /// parts back when they cannot be stacked. Where a part's packed form holds its values
    /// ([`Matrix::with_exact_packed`]), so does the stack's: the others' (in groups of 16
    /// rows, and, beside a scale per 16, with their block scales taken for each 16) packed
    /// beside it; not where any part has offsets.
    pub fn stack(parts: Vec<Matrix>) -> Result<Matrix, Vec<Matrix>> {
        let Some(first) = parts.first() else {
            return Err(parts);
        };
        let cols = first.cols;
        let same = parts.iter().all(|m| {
            m.cols == cols
                && match (&m.data, &first.data) {
                    (MatData::Quant(a, _), MatData::Quant(b, _)) => a == b,
                    (MatData::F32(_), MatData::F32(_)) => true,
                    _ => false,
                }
        });
        let exact = parts.iter().any(|m| m.packed_exact);
        let packable = |m: &Matrix| {
            m.offsets.is_none()
                && (m.packed_exact
                    || matches!(m.data, MatData::Quant(..)) && m.rows.is_multiple_of(LANES))
        };
        let runs = parts
            .iter()
            .filter_map(|m| m.packed.get().and_then(Option::as_ref).map(Packed::runs))
            .max()
            .unwrap_or(1);
        if !same || exact && !parts.iter().all(packable) {
            return Err(parts);
        }
        let rows = parts.iter().map(|m| m.rows).sum();
        // Offsets for all rows where a part has them (zero for the others), in the
        // shortest run of the parts'.
        let run = parts
            .iter()
            .filter_map(|m| m.offsets.as_ref().map(|o| o.run))
            .min();
        let offsets = run.map(|run| Offsets {
            run,
            values: parts
                .iter()
                .flat_map(|m| match m.offsets() {
                    Some(o) => o.split(run),
                    None => vec![0.0; m.rows * cols / run],
                })
                .collect(),
        });
        let mut packs = Vec::new();
        let mut data: Option<MatData> = None;
        for m in parts {
            if exact {
                let pk = match (m.packed.into_inner().flatten(), &m.data) {
                    (Some(pk), _) if m.packed_exact => pk,
                    (_, MatData::Quant(ty, d)) => {
                        Packed::new(*ty, m.rows, m.cols, d).expect("checked above")
                    }
                    _ => unreachable!("checked above"),
                };
                packs.push(if runs == 2 { pk.with_runs16() } else { pk });
            }
            match (&mut data, m.data) {
                (None, d) => data = Some(d),
                (Some(MatData::Quant(_, v)), MatData::Quant(_, d)) => v.extend_from_slice(&d),
                (Some(MatData::F32(v)), MatData::F32(d)) => v.extend_from_slice(&d),
                _ => unreachable!("checked above"),
            }
        }
        let data = data.unwrap_or_else(|| unreachable!("there is a first part"));
        let mut m = Matrix::new(rows, cols, data);
        if exact {
            let pk = Packed::concat(&packs).expect("same type, width and runs");
            m = m.with_exact_packed(pk);
        }
        Ok(match offsets {
            Some(o) => m.with_offsets(o),
            None => m,
        })
    }
}

/// How activations meet quantized weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ActPrecision {
    /// Activations quantized to 16-bit blocks, integer products (`madd_epi16`) on the
    /// weight blocks: ~1e-5 relative error, the speed of integer math. The default.
    #[default]
    I16,
    /// f32 activations against weights unpacked from their blocks in registers: the
    /// closest to an f32 reference.
    F32,
    /// Activations quantized to 8-bit blocks, integer dot products (llama.cpp's way):
    /// faster when compute-bound, ~1e-2 relative error.
    Q8,
}

/// A batch of activation rows, in f32 and (once asked for) quantized to Q8 blocks or
/// summed per block.
#[derive(Default)]
pub struct Acts {
    pub rows: usize,
    pub cols: usize,
    pub f32: Vec<f32>,
    q8: Vec<Q8Block>,
    q8_valid: bool,
    sums: Vec<f32>,
    sums_valid: bool,
    i16: Vec<i16>,
    i16_d: Vec<f32>,
    i16_valid: bool,
}

impl Acts {
    pub fn resize(&mut self, rows: usize, cols: usize) {
        self.rows = rows;
        self.cols = cols;
        self.f32.resize(rows * cols, 0.0);
        self.touched();
    }
    pub fn row(&self, r: usize) -> &[f32] {
        &self.f32[r * self.cols..(r + 1) * self.cols]
    }
    pub fn row_mut(&mut self, r: usize) -> &mut [f32] {
        self.touched();
        &mut self.f32[r * self.cols..(r + 1) * self.cols]
    }
    /// Marks the f32 data as changed (re-quantize on next use).
    pub fn touched(&mut self) {
        self.q8_valid = false;
        self.sums_valid = false;
        self.i16_valid = false;
    }
    fn quantize_i16(&mut self) {
        if !self.i16_valid {
            let n = self.rows * self.cols;
            self.i16.resize(n, 0);
            self.i16_d.resize(n / QK, 0.0);
            let cols = self.cols;
            self.i16
                .par_chunks_mut(cols)
                .zip(self.i16_d.par_chunks_mut(cols / QK))
                .zip(self.f32[..n].par_chunks(cols))
                .for_each(|((q, d), x)| quant::quantize_row_i16(x, q, d));
            self.i16_valid = true;
        }
    }
    fn block_sums(&mut self) -> &[f32] {
        if !self.sums_valid {
            let n = self.rows * self.cols;
            self.sums.clear();
            self.sums.extend(
                self.f32[..n]
                    .chunks_exact(QK)
                    .map(|c| c.iter().sum::<f32>()),
            );
            self.sums_valid = true;
        }
        &self.sums
    }
    fn quantized(&mut self) -> &[Q8Block] {
        if !self.q8_valid {
            let nb = self.cols / QK;
            self.q8.resize(self.rows * nb, Q8Block::default());
            let cols = self.cols;
            self.q8
                .par_chunks_mut(nb)
                .zip(self.f32.par_chunks(cols))
                .for_each(|(q, x)| quant::quantize_row_q8(x, q));
            self.q8_valid = true;
        }
        &self.q8
    }
}

/// Writes to disjoint parts of one output buffer from several threads.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of indices (its own output columns).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Pointer to element `i` (a method, so closures capture the whole `Sync` wrapper).
    #[inline]
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers pass indices inside the output buffer (asserted by `matmul`).
        unsafe { self.0.add(i) }
    }
}

/// Activations prepared for one product with quantized weights, in the chosen precision.
enum Prepared<'a> {
    Q8 {
        q8: &'a [Q8Block],
        nb: usize,
    },
    I16 {
        q: &'a [i16],
        d: &'a [f32],
        sums: &'a [f32],
        cols: usize,
        nb: usize,
    },
    F32 {
        x: &'a [f32],
        sums: &'a [f32],
        cols: usize,
        nb: usize,
    },
}

impl Prepared<'_> {
    /// Weight row `wr` · activation rows `b0 .. b0 + R`.
    #[inline]
    fn tile<const R: usize>(&self, ty: GgmlType, wr: &[u8], b0: usize) -> [f32; R] {
        let rows: [usize; R] = std::array::from_fn(|k| b0 + k);
        match *self {
            Prepared::Q8 { q8, nb } => {
                quant::dot_q8_rows(ty, wr, rows.map(|b| &q8[b * nb..(b + 1) * nb]))
            }
            Prepared::I16 {
                q,
                d,
                sums,
                cols,
                nb,
            } => quant::dot_i16_rows(
                ty,
                wr,
                rows.map(|b| &q[b * cols..(b + 1) * cols]),
                rows.map(|b| &d[b * nb..(b + 1) * nb]),
                rows.map(|b| &sums[b * nb..(b + 1) * nb]),
            ),
            Prepared::F32 { x, sums, cols, nb } => quant::dot_f32_rows(
                ty,
                wr,
                rows.map(|b| &x[b * cols..(b + 1) * cols]),
                rows.map(|b| &sums[b * nb..(b + 1) * nb]),
            ),
        }
    }
}

/// `out[b * w.rows + n] = x[b] · W[n]` for all rows b of `x` and n of `w`.
///
/// Weight rows are split across the thread pool; each weight row meets the activation
/// rows in tiles of 8, then 4, then 1, so a weight block is unpacked once per tile. Every
/// output element is computed the same way whatever the tile, so a sequence's results do
/// not depend on what it is batched with.
pub fn matmul(w: &Matrix, x: &mut Acts, out: &mut [f32], prec: ActPrecision) {
    assert_eq!(x.cols, w.cols, "matmul: inner dimensions differ");
    assert!(out.len() >= x.rows * w.rows, "matmul: output too small");
    weights_product(w, x, out, prec);
    if let Some(off) = w.offsets.as_ref().filter(|_| !w.offsets_in_kernels(prec)) {
        add_offsets(off, w.rows, x, out);
    }
}

/// `out[b · rows + n] += Σ_j offsets[n][j] · (x[b]'s inputs of run j summed)`: the weights'
/// offsets, in f32, over spans of output rows split across the thread pool (each output
/// the same way whatever the batch or the path: a multiply then an add, run after run).
fn add_offsets(off: &HeldOffsets, n_rows: usize, x: &Acts, out: &mut [f32]) {
    let (b_rows, runs) = (x.rows, x.cols / off.run);
    let sums: Vec<f32> = x.f32[..b_rows * x.cols]
        .chunks_exact(off.run)
        .map(|c| c.iter().sum())
        .collect();
    let ptr = OutPtr(out.as_mut_ptr());
    let span = |n0: usize, n1: usize| {
        for b in 0..b_rows {
            // SAFETY: outputs (b, n0..n1) belong to this span's task only, and lie inside
            // `out` (asserted by `matmul`).
            let o = unsafe { std::slice::from_raw_parts_mut(ptr.at(b * n_rows + n0), n1 - n0) };
            let by_run = &off.by_run[n0..];
            offsets_into(o, by_run, n_rows, &sums[b * runs..(b + 1) * runs]);
        }
    };
    // Small products in one task (a thread pool hand-off costs more than their work).
    const SPAN: usize = 256;
    if n_rows * runs * b_rows < 1 << 12 {
        span(0, n_rows);
    } else {
        (0..n_rows.div_ceil(SPAN))
            .into_par_iter()
            .for_each(|c| span(c * SPAN, ((c + 1) * SPAN).min(n_rows)));
    }
}

/// `o[i] += Σ_j by_run[j · stride + i] · sums[j]`, 16 outputs at a time in registers, on
/// the widest vectors here.
#[inline]
fn offsets_into(o: &mut [f32], by_run: &[f32], stride: usize, sums: &[f32]) {
    #[inline(always)]
    fn plain(o: &mut [f32], by_run: &[f32], stride: usize, sums: &[f32]) {
        const W: usize = 16;
        let done = o.len() - o.len() % W;
        for (t, o) in o[..done].chunks_exact_mut(W).enumerate() {
            let mut acc: [f32; W] = from_fn(|i| o[i]);
            for (j, &s) in sums.iter().enumerate() {
                let w = &by_run[j * stride + W * t..j * stride + W * t + W];
                for i in 0..W {
                    acc[i] += w[i] * s;
                }
            }
            o.copy_from_slice(&acc);
        }
        for (i, o) in o[done..].iter_mut().enumerate() {
            for (j, &s) in sums.iter().enumerate() {
                *o += by_run[j * stride + done + i] * s;
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(o: &mut [f32], by_run: &[f32], stride: usize, sums: &[f32]) {
            plain(o, by_run, stride, sums)
        }
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(o: &mut [f32], by_run: &[f32], stride: usize, sums: &[f32]) {
            plain(o, by_run, stride, sums)
        }
        if quant::has_avx512() {
            // SAFETY: the CPU has AVX-512F (detected).
            return unsafe { avx512(o, by_run, stride, sums) };
        }
        if quant::has_avx2() {
            // SAFETY: the CPU has AVX2 (detected).
            return unsafe { avx2(o, by_run, stride, sums) };
        }
    }
    plain(o, by_run, stride, sums)
}

/// The product of the weights as the kernels hold them (offsets aside).
fn weights_product(w: &Matrix, x: &mut Acts, out: &mut [f32], prec: ActPrecision) {
    let (b_rows, n_rows, cols) = (x.rows, w.rows, w.cols);
    let threads = rayon::current_num_threads().max(1);
    let chunk = (n_rows / (threads * 4)).clamp(4, 256);
    let ptr = OutPtr(out.as_mut_ptr());
    let (ty, data) = match &w.data {
        MatData::Quant(ty, data) => (*ty, data),
        MatData::F32(data) => {
            let xs = &x.f32;
            (0..n_rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
                for n in c * chunk..((c + 1) * chunk).min(n_rows) {
                    let wr = &data[n * cols..(n + 1) * cols];
                    for b in 0..b_rows {
                        let v = dot_f32(wr, &xs[b * cols..(b + 1) * cols]);
                        // SAFETY: (b, n) is written by this task only; in bounds (asserted).
                        unsafe { *ptr.at(b * n_rows + n) = v };
                    }
                }
            });
            return;
        }
    };
    let nb = cols / QK;
    let packed = match prec {
        ActPrecision::F32 => None,
        _ => w.packed(),
    };
    if let Some(pk) = packed {
        // 8-bit weights have no 8-bit packed kernel: they meet 16-bit activations (more
        // precise, and as fast).
        let prec = if pk.takes_q8() {
            prec
        } else {
            ActPrecision::I16
        };
        matmul_packed(pk, x, prec, ptr, threads);
        return;
    }
    let prepared = match prec {
        ActPrecision::Q8 => Prepared::Q8 {
            q8: x.quantized(),
            nb,
        },
        ActPrecision::I16 => {
            x.block_sums();
            x.quantize_i16();
            Prepared::I16 {
                q: &x.i16,
                d: &x.i16_d,
                sums: &x.sums,
                cols,
                nb,
            }
        }
        ActPrecision::F32 => {
            x.block_sums();
            Prepared::F32 {
                x: &x.f32,
                sums: &x.sums,
                cols,
                nb,
            }
        }
    };
    let rb = w.row_bytes();
    (0..n_rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
        for n in c * chunk..((c + 1) * chunk).min(n_rows) {
            let wr = &data[n * rb..(n + 1) * rb];
            let put = |b0: usize, vals: &[f32]| {
                for (k, v) in vals.iter().enumerate() {
                    // SAFETY: (b, n) is written by this task only; in bounds (asserted).
                    unsafe { *ptr.at((b0 + k) * n_rows + n) = *v };
                }
            };
            let mut b = 0;
            while b + 8 <= b_rows {
                put(b, &prepared.tile::<8>(ty, wr, b));
                b += 8;
            }
            while b + 4 <= b_rows {
                put(b, &prepared.tile::<4>(ty, wr, b));
                b += 4;
            }
            while b < b_rows {
                put(b, &prepared.tile::<1>(ty, wr, b));
                b += 1;
            }
        }
    });
}

/// The product on packed weights ([`crate::packed`]) at 16-bit (`I16`) or 8-bit (`Q8`)
/// activations: groups of 16 weight rows split across the thread pool, each meeting the
/// activation rows in tiles of as many as the kernel holds in registers (12, 8, 4, then 1
/// with AVX-512 VNNI; 6, 4, 1 on AVX2), every output computed the same way whatever its
/// tile.
fn matmul_packed(pk: &Packed, x: &mut Acts, prec: ActPrecision, ptr: OutPtr, threads: usize) {
    let (b_rows, n_rows) = (x.rows, pk.rows);
    let put = |b0: usize| {
        move |g: usize, vals: &[[f32; LANES]]| {
            for (k, v) in vals.iter().enumerate() {
                // SAFETY: row b0 + k, columns 16g .. 16g + 16 are written by this task
                // only; in bounds (asserted by `matmul`).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        v.as_ptr(),
                        ptr.at((b0 + k) * n_rows + g * LANES),
                        LANES,
                    )
                }
            }
        }
    };
    if prec == ActPrecision::Q8 {
        let a = x.quantized();
        packed_tiles(pk, b_rows, threads, tiles(true), |gs, b0, n| {
            let p = put(b0);
            match n {
                8 => q8_tile::<8>(pk, gs, b0, a, &p),
                6 => q8_tile::<6>(pk, gs, b0, a, &p),
                4 => q8_tile::<4>(pk, gs, b0, a, &p),
                _ => q8_tile::<1>(pk, gs, b0, a, &p),
            }
        });
        return;
    }
    x.block_sums();
    x.quantize_i16();
    let acts = (&x.i16[..], &x.i16_d[..], &x.sums[..]);
    packed_tiles(pk, b_rows, threads, tiles(false), |gs, b0, n| {
        let p = put(b0);
        match n {
            12 => i16_tile::<12>(pk, gs, b0, acts, &p),
            8 => i16_tile::<8>(pk, gs, b0, acts, &p),
            6 => i16_tile::<6>(pk, gs, b0, acts, &p),
            4 => i16_tile::<4>(pk, gs, b0, acts, &p),
            _ => i16_tile::<1>(pk, gs, b0, acts, &p),
        }
    });
}

/// The packed kernel's tiles of activation rows (`q8`: 8-bit activations), largest first.
fn tiles(q8: bool) -> &'static [usize] {
    packed::kernel().map_or(&[1], |k| k.tiles(q8))
}

/// Activation rows `b0 .. b0 + R` at 16 bits (values, block scales, f32 block sums of all
/// rows) against the packed groups `gs`, each result handed to `put(group, rows)`.
fn i16_tile<const R: usize>(
    pk: &Packed,
    gs: std::ops::Range<usize>,
    b0: usize,
    (q, d, sums): (&[i16], &[f32], &[f32]),
    put: &dyn Fn(usize, &[[f32; LANES]]),
) {
    let (cols, nb) = (pk.cols, pk.cols / QK);
    pk.dot_rows_groups::<R>(
        gs,
        from_fn(|k| &q[(b0 + k) * cols..(b0 + k + 1) * cols]),
        from_fn(|k| &d[(b0 + k) * nb..(b0 + k + 1) * nb]),
        from_fn(|k| &sums[(b0 + k) * nb..(b0 + k + 1) * nb]),
        &mut |g, r| put(g, r),
    )
}

/// [`i16_tile`] for 8-bit activation blocks `a` (of all rows).
fn q8_tile<const R: usize>(
    pk: &Packed,
    gs: std::ops::Range<usize>,
    b0: usize,
    a: &[Q8Block],
    put: &dyn Fn(usize, &[[f32; LANES]]),
) {
    let nb = pk.cols / QK;
    pk.dot_rows_q8_groups::<R>(
        gs,
        from_fn(|k| &a[(b0 + k) * nb..(b0 + k + 1) * nb]),
        &mut |g, r| put(g, r),
    )
}

/// Runs `tile(groups, first activation row, rows)` over chunks of `pk`'s groups split
/// across the thread pool, and within a chunk over every activation row, in tiles of
/// `sizes` rows (largest first, ending in 1): a tile of activations meets every group of
/// its chunk in one call.
fn packed_tiles(
    pk: &Packed,
    b_rows: usize,
    threads: usize,
    sizes: &[usize],
    tile: impl Fn(std::ops::Range<usize>, usize, usize) + Sync + Send,
) {
    let groups = pk.rows / LANES;
    let chunk = (groups / (threads * 4)).clamp(1, 16);
    (0..groups.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let gs = c * chunk..((c + 1) * chunk).min(groups);
        let mut b = 0;
        for &n in sizes {
            while b + n <= b_rows {
                tile(gs.clone(), b, n);
                b += n;
            }
        }
    });
}

/// f32 dot product, written so that it vectorizes: four independent 8-lane accumulators
/// hide the FMA latency.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let (ca, cb) = (a.chunks_exact(32), b.chunks_exact(32));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..32 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut lanes = [0f32; 8];
    for (i, v) in acc.iter().enumerate() {
        lanes[i % 8] += v;
    }
    let mut s: f32 = lanes.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Reference: the same product from dequantized f32 weights (for tests).
pub fn matmul_reference(w: &Matrix, x: &Acts, out: &mut [f32]) {
    let mut row = vec![0f32; w.cols];
    for n in 0..w.rows {
        w.row_f32(n, &mut row);
        for b in 0..x.rows {
            out[b * w.rows + n] = x.row(b).iter().zip(&row).map(|(a, c)| a * c).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::rand;

    fn matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Matrix {
        let w = rand(rows * cols, seed);
        let mut data = Vec::new();
        match ty {
            GgmlType::Q4_0 => quant::quantize_row_q4_0(&w, &mut data),
            GgmlType::Q4_1 => quant::quantize_row_q4_1(&w, &mut data),
            _ => {
                quant::quantize_row_q8_0(&w, &mut data);
                crate::testutil::with_q8_0_minimum(&mut data);
            }
        }
        Matrix::new(rows, cols, MatData::Quant(ty, data))
    }

    fn acts(rows: usize, cols: usize, seed: u64) -> Acts {
        let mut x = Acts::default();
        x.resize(rows, cols);
        x.f32.copy_from_slice(&rand(rows * cols, seed));
        x
    }

    /// `w` with offsets of `run` (what Q5_1, Q5_K and Q2_K are converted to).
    fn offset(w: Matrix, run: Option<usize>, seed: u64) -> Matrix {
        match run {
            Some(run) => {
                let values = rand(w.rows * w.cols / run, seed);
                w.with_offsets(Offsets { run, values })
            }
            None => w,
        }
    }

    /// `w · x` at `prec`, each output within `tol` of Σ|w·x| (+ 1e-6) of the reference's
    /// (`what` names the case): the outputs, and the largest error relative to Σ|w·x|.
    fn near_reference(
        w: &Matrix,
        x: &mut Acts,
        prec: ActPrecision,
        tol: f32,
        what: &str,
    ) -> (Vec<f32>, f32) {
        let (b, rows) = (x.rows, w.rows);
        let mut out = vec![0f32; b * rows];
        matmul(w, x, &mut out, prec);
        let mut want = vec![0f32; b * rows];
        matmul_reference(w, x, &mut want);
        let mut row = vec![0f32; w.cols];
        let mut worst = 0f32;
        for n in 0..rows {
            w.row_f32(n, &mut row);
            for r in 0..b {
                let size: f32 = row.iter().zip(x.row(r)).map(|(p, q)| (p * q).abs()).sum();
                let (got, exp) = (out[r * rows + n], want[r * rows + n]);
                worst = worst.max((got - exp).abs() / size);
                assert!(
                    (got - exp).abs() <= tol * size + 1e-6,
                    "{what} ({r},{n}): {got} vs {exp}"
                );
            }
        }
        (out, worst)
    }

    /// Every precision, weight type and layout (48 and 640 rows pack — 640 in calls over
    /// several groups — 40 do not), with and without offsets, at batch sizes that use every
    /// tile: close to the f32 product of the dequantized weights, and a row's result the
    /// same alone as in any batch.
    #[test]
    fn every_path_is_close_to_the_reference_and_independent_of_its_batch() {
        let cols = 96;
        let cases = [
            (GgmlType::Q4_0, None),
            (GgmlType::Q4_1, None),
            (GgmlType::Q8_0, None),
            (GgmlType::Q8_0, Some(16)),
            (GgmlType::Q8_0, Some(32)),
        ];
        for (ty, run) in cases {
            for rows in [48, 640, 40] {
                let w = offset(matrix(ty, rows, cols, 5), run, 6);
                for prec in [ActPrecision::I16, ActPrecision::Q8, ActPrecision::F32] {
                    // Relative to Σ|w·x|: 8-bit activations err by up to 1/254 of a block's
                    // largest value, 16-bit ones by 1/65534 (bounds about 8 standard
                    // deviations of the summed rounding errors; a wrong kernel is off by
                    // the whole size).
                    let tol = match prec {
                        ActPrecision::Q8 => 4e-3,
                        ActPrecision::I16 => 4e-5,
                        ActPrecision::F32 => 1e-6,
                    };
                    for b in [1usize, 5, 13, 30] {
                        let mut x = acts(b, cols, 9);
                        let what = format!("{ty:?} {run:?} {rows}×{cols} {prec:?} b={b}");
                        let (out, _) = near_reference(&w, &mut x, prec, tol, &what);
                        // Each row alone gives the same bits as in the batch.
                        for r in [0, b - 1] {
                            let mut one = acts(1, cols, 0);
                            one.f32.copy_from_slice(x.row(r));
                            let mut o1 = vec![0f32; rows];
                            matmul(&w, &mut one, &mut o1, prec);
                            assert_eq!(
                                o1[..],
                                out[r * rows..(r + 1) * rows],
                                "{ty:?} {rows} rows {prec:?}: row {r} of {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Weights with a scale per 16 (Q6_K's), which only the packed form holds, beside
    /// them requantized to Q8_0 ([`Matrix::with_exact_packed`]).
    fn exact16(rows: usize, cols: usize, seed: u64) -> Matrix {
        let (values, scales) = crate::testutil::runs16_weights(rows * cols, seed, 0.05);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| values[i] as f32 * scales[i / 16])
            .collect();
        let mut data = Vec::new();
        quant::quantize_row_q8_0(&w, &mut data);
        let pk = Packed::from_i8_runs16(rows, cols, &values, &scales).expect("packs");
        Matrix::new(rows, cols, MatData::Quant(GgmlType::Q8_0, data)).with_exact_packed(pk)
    }

    /// A scale per 16: the 16- and 8-bit products are as close to the weights' own
    /// product as any packed kernel's, with or without offsets, and independent of the
    /// batch; f32 activations meet the requantized Q8_0 (within its half step).
    #[test]
    fn weights_with_a_scale_per_16_give_their_own_product() {
        let cols = 96;
        for run in [None, Some(16), Some(32)] {
            for rows in [48, 640] {
                let w = offset(exact16(rows, cols, 5), run, 6);
                for prec in [ActPrecision::I16, ActPrecision::Q8, ActPrecision::F32] {
                    let tol = match prec {
                        // 8-bit weights meet 16-bit activations at either.
                        ActPrecision::Q8 | ActPrecision::I16 => 4e-5,
                        // Half a Q8_0 step of a block's largest, against Σ|w·x|.
                        ActPrecision::F32 => 2e-2,
                    };
                    for b in [1usize, 13] {
                        let mut x = acts(b, cols, 9);
                        let what = format!("{run:?} {rows} {prec:?} b={b}");
                        let (out, worst) = near_reference(&w, &mut x, prec, tol, &what);
                        if prec == ActPrecision::F32 {
                            // The requantized copy is not the weights: the kernels' path is.
                            assert!(worst > 1e-5, "f32 activations read the Q8_0 copy");
                        }
                        let mut one = acts(1, cols, 0);
                        one.f32.copy_from_slice(x.row(b - 1));
                        let mut o1 = vec![0f32; rows];
                        matmul(&w, &mut one, &mut o1, prec);
                        assert_eq!(o1[..], out[(b - 1) * rows..], "{prec:?}: alone as in {b}");
                    }
                }
            }
        }
    }

    /// `stacked`'s product is each of `parts`' (as many rows, in order) but for rounding,
    /// at every precision.
    fn assert_stack_gives_each_parts_product(stacked: &Matrix, parts: &[Matrix], b: usize) {
        let cols = stacked.cols;
        for prec in [ActPrecision::I16, ActPrecision::Q8, ActPrecision::F32] {
            let mut x = acts(b, cols, 9);
            let mut all = vec![0f32; b * stacked.rows];
            matmul(stacked, &mut x, &mut all, prec);
            let mut at = 0;
            for p in parts {
                let mut one = vec![0f32; b * p.rows];
                matmul(p, &mut x, &mut one, prec);
                for r in 0..b {
                    let got = &all[r * stacked.rows + at..r * stacked.rows + at + p.rows];
                    for (g, w) in got.iter().zip(&one[r * p.rows..(r + 1) * p.rows]) {
                        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{prec:?} row {r}");
                    }
                }
                at += p.rows;
            }
        }
    }

    /// A Q4_1 matrix whose packed form has f32 scales and mins other than its blocks'
    /// f16 ones (a K-quant's exact sub-block scales).
    fn exact_q4_1(rows: usize, cols: usize, seed: u64) -> Matrix {
        let m = matrix(GgmlType::Q4_1, rows, cols, seed);
        let MatData::Quant(_, data) = &m.data else {
            unreachable!()
        };
        let nb = rows * cols / QK;
        let scales: Vec<f32> = rand(nb, seed + 1).iter().map(|v| v * 0.03).collect();
        let mins: Vec<f32> = rand(nb, seed + 2).iter().map(|v| v * 0.2).collect();
        let pk = Packed::new(GgmlType::Q4_1, rows, cols, data)
            .expect("packs")
            .with_exact_scales(&scales, &mins);
        m.with_exact_packed(pk)
    }

    /// Parts whose packed form holds their values stack beside plain ones of their
    /// type (8-bit: a scale per 16 beside blocks' scales taken twice; 4-bit: f32 scales
    /// beside the blocks'): each part's rows and products as alone. Not with offsets, nor
    /// beside rows not in groups of 16.
    #[test]
    fn parts_packed_with_their_own_values_stack_beside_plain_ones() {
        let cols = 64;
        let eights = || {
            vec![
                matrix(GgmlType::Q8_0, 48, cols, 5),
                exact16(32, cols, 7),
                matrix(GgmlType::Q8_0, 16, cols, 3),
            ]
        };
        let fours = || vec![exact_q4_1(32, cols, 8), matrix(GgmlType::Q4_1, 16, cols, 9)];
        for parts in [&eights as &dyn Fn() -> Vec<Matrix>, &fours] {
            let Ok(stacked) = Matrix::stack(parts()) else {
                panic!("parts of one type stack");
            };
            assert!(stacked.packed_exact);
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            let mut at = 0;
            for p in parts() {
                for n in 0..p.rows {
                    p.row_f32(n, &mut a);
                    stacked.row_f32(at + n, &mut b);
                    assert_eq!(a, b, "row {n} of a part of {}", p.rows);
                }
                at += p.rows;
            }
            // Equal but for rounding: a block's scale taken for each 16 adds its two
            // halves' sums one after the other.
            assert_stack_gives_each_parts_product(&stacked, &parts(), 5);
        }
        let odd = vec![matrix(GgmlType::Q8_0, 40, cols, 1), exact16(16, cols, 2)];
        assert!(Matrix::stack(odd).is_err(), "rows not in groups of 16");
        let offsets = vec![
            offset(matrix(GgmlType::Q8_0, 32, cols, 1), Some(32), 2),
            exact16(16, cols, 2),
        ];
        assert!(
            Matrix::stack(offsets).is_err(),
            "offsets beside exact values"
        );
    }

    /// Stacked matrices (QKV, gate|up) give each part's product, offsets and all: a part
    /// with offsets of 32, one of 16 and one without.
    #[test]
    fn stacked_parts_with_offsets_give_each_parts_product() {
        let cols = 64;
        let parts = || {
            vec![
                offset(matrix(GgmlType::Q8_0, 32, cols, 1), Some(32), 2),
                offset(matrix(GgmlType::Q8_0, 16, cols, 3), Some(16), 4),
                matrix(GgmlType::Q8_0, 48, cols, 5),
            ]
        };
        let Ok(stacked) = Matrix::stack(parts()) else {
            panic!("Q8_0 parts stack");
        };
        assert_eq!(stacked.offsets().map(|o| o.run), Some(16));
        // Equal but for rounding: offsets of 32 are added as two of 16 once stacked beside
        // a part of 16.
        assert_stack_gives_each_parts_product(&stacked, &parts(), 3);
    }
}
