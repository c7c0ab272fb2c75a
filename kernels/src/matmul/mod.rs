//! Matrix products on the CPU: `out[b][n] = Σ_k x[b][k] · W[n][k]` for a weight matrix in
//! its file format (quantized blocks, or f32) and a batch of activation rows, split over
//! output rows across the thread pool. This file has the weight matrices ([`Matrix`]);
//! `acts.rs` the activation rows, `product.rs` the products.

use crate::gguf::GgmlType;
use crate::packed::{self, Packed, LANES};
use crate::quant::{self, Q8Block, QK};
use rayon::prelude::*;
use std::array::from_fn;
use std::sync::OnceLock;

mod acts;
mod product;
#[cfg(test)]
mod tests;

pub use acts::{ActPrecision, Acts};
pub use product::{dot_f32, matmul, matmul_reference};

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
