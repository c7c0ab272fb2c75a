//! The activation rows a product takes ([`Acts`]), in f32 and, made once a step where a
//! product asks, quantized to 16- or 8-bit blocks or summed per block, and how they meet
//! quantized weights ([`ActPrecision`]).

use super::*;

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
    pub(super) q8: Vec<Q8Block>,
    q8_valid: bool,
    pub(super) sums: Vec<f32>,
    sums_valid: bool,
    pub(super) i16: Vec<i16>,
    pub(super) i16_d: Vec<f32>,
    i16_valid: bool,
    /// The 16-bit or 8-bit values laid out for AMX's tiles ([`crate::packed::amx`]), and
    /// which they are (`None`: stale).
    #[cfg(target_arch = "x86_64")]
    pub(super) tiled: Vec<u8>,
    #[cfg(target_arch = "x86_64")]
    tiled_as: Option<ActPrecision>,
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
        #[cfg(target_arch = "x86_64")]
        {
            self.tiled_as = None;
        }
    }
    pub(super) fn quantize_i16(&mut self) {
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
    /// The full tiles of 16 rows laid out for AMX at `prec` (16-bit values as byte planes,
    /// or 8-bit values), from the values quantized at `prec` (which must be current).
    #[cfg(target_arch = "x86_64")]
    pub(super) fn tile_for_amx(&mut self, prec: ActPrecision) {
        if self.tiled_as != Some(prec) {
            let (rows, cols) = (self.rows, self.cols);
            match prec {
                ActPrecision::Q8 => {
                    debug_assert!(self.q8_valid);
                    packed::amx::tile_q8(&self.q8, rows, cols / QK, &mut self.tiled)
                }
                _ => {
                    debug_assert!(self.i16_valid);
                    packed::amx::tile_i16(&self.i16, rows, cols, &mut self.tiled)
                }
            }
            self.tiled_as = Some(prec);
        }
    }
    pub(super) fn block_sums(&mut self) -> &[f32] {
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
    pub(super) fn quantized(&mut self) -> &[Q8Block] {
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
