//! The step's choices that can change on a loaded backend: where products of few rows run
//! (cuBLAS, `gemv_f16`, or `gemv_q4`/`gemv_q8` over the file's own blocks: timed per decode
//! bucket at load), dependent launches, the fused small products and the attention
//! kernel. Each change captures the decode graphs again.

use super::enqueue::{logits, Sampling};
use super::{AttentionKernel, CudaBackend, SmallProducts};
use crate::cuda::exec::{Exec, ExecError};
use crate::cuda::gemv;
use crate::forward::Batch;

/// Where `TOLLGATE_SMALL_PRODUCTS` fixes the products of few rows, instead of the
/// load-time timing ([`CudaBackend::choose_small_products`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixedSmall {
    /// `cublas`: cuBLAS for all.
    Cublas,
    /// `gemv`: `gemv_f16` for all.
    Gemv,
    /// `quant`: the `gemv` kernels over the file's blocks, where a matrix has them.
    Quant,
}

impl FixedSmall {
    /// The operator's choice, if `TOLLGATE_SMALL_PRODUCTS` names one.
    pub fn from_env() -> Option<Self> {
        match std::env::var("TOLLGATE_SMALL_PRODUCTS").as_deref() {
            Ok("cublas") => Some(Self::Cublas),
            Ok("gemv") => Some(Self::Gemv),
            Ok("quant") => Some(Self::Quant),
            _ => None,
        }
    }
}

/// Decode steps timed per choice when choosing the small products at load.
const TUNE_STEPS: usize = 30;

/// A decode bucket's step time with its products on cuBLAS, on `gemv_f16`, and on the
/// `gemv` kernels over the file's own blocks (where the model has them); on `gemv`, with
/// the norms, swiglu and RoPE fused into the products, and launched apart (`_apart`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmallProductTiming {
    pub bucket: usize,
    pub cublas_secs: f64,
    pub gemv_secs: f64,
    pub gemv_apart_secs: f64,
    pub quant_secs: Option<f64>,
    pub quant_apart_secs: Option<f64>,
}

impl<E: Exec> CudaBackend<E> {
    /// Chooses where products of a few rows run, by `TOLLGATE_SMALL_PRODUCTS`: `cublas`,
    /// `gemv` (f16 rows) or `quant` (the file's blocks, where the model has them) for all,
    /// else (the default) whichever gives the fastest decode step here
    /// ([`CudaBackend::tune_small_products`]). A failure leaves cuBLAS for all, logged.
    pub fn choose_small_products(&mut self) {
        let chosen = match FixedSmall::from_env() {
            Some(FixedSmall::Cublas) => Ok(()),
            Some(FixedSmall::Gemv) => self.set_small_products(SmallProducts::ALL),
            Some(FixedSmall::Quant) => self
                .set_quant_small(SmallProducts::ALL)
                .and_then(|()| self.set_small_products(SmallProducts::ALL)),
            None => self.tune_small_products(TUNE_STEPS).map(|t| {
                tracing::info!(backend = %self.name, timings = ?t, gemv = ?self.dev.small,
                    quant = ?self.dev.quant_small, fused = ?self.dev.fused,
                    blocks = %self.dev.quant_summary(),
                    "products of few rows: cuBLAS, gemv_f16 or the file's blocks, fused or apart, by decode step time");
            }),
        };
        if let Err(e) = chosen {
            tracing::warn!(backend = %self.name,
                "choosing the small products failed ({e}); cuBLAS for all");
            self.dev.quant_small = SmallProducts::default();
            let _ = self.set_small_products(SmallProducts::default());
        }
    }

    /// Which products of few rows run on `gemv_f16` rather than cuBLAS.
    pub fn small_products(&self) -> SmallProducts {
        self.dev.small
    }

    /// Which of those read the file's own blocks (`gemv_q4*`, `gemv_q8*`) where a matrix
    /// has them.
    pub fn quant_small(&self) -> SmallProducts {
        self.dev.quant_small
    }

    /// Whether any matrix is held in the file's own blocks too.
    pub fn has_quant(&self) -> bool {
        self.dev.has_quant()
    }

    /// The matrices held in the file's own blocks, counted by the `gemv` kernels that
    /// read them (e.g. `"60 q8, 30 q8h"`).
    pub fn quant_summary(&self) -> String {
        self.dev.quant_summary()
    }

    /// Products of few rows on `gemv` read the file's blocks for the row counts `quant`
    /// says, from the next step on (the decode graphs are captured again).
    pub fn set_quant_small(&mut self, quant: SmallProducts) -> Result<(), ExecError> {
        self.dev.quant_small = quant;
        self.recapture_all()?;
        Ok(())
    }

    /// The timings behind [`CudaBackend::small_products`], when it was tuned.
    pub fn small_product_timings(&self) -> &[SmallProductTiming] {
        &self.tuned
    }

    /// Runs products of few rows as `small` says, from the next step on (the decode
    /// graphs are captured again).
    pub fn set_small_products(&mut self, small: SmallProducts) -> Result<(), ExecError> {
        self.dev.small = small;
        self.recapture_all()?;
        Ok(())
    }

    /// Whether the kernels launch as programmatic dependent launches (Hopper on: each may
    /// be scheduled while the one before it runs: [`crate::cuda::launch`]).
    pub fn dependent_launch(&self) -> bool {
        self.dev.exec.dependent_launch()
    }

    /// Turns dependent launches on or off from the next step on (the decode graphs are
    /// captured again); says whether they are on (never where the device lacks them).
    pub fn set_dependent_launch(&mut self, on: bool) -> Result<bool, ExecError> {
        let on = self.dev.exec.set_dependent_launch(on);
        self.recapture_all()?;
        Ok(on)
    }

    /// For which row counts products of few rows on `gemv` make their input themselves
    /// (the norms and swiglu fused in, and RoPE with the cache write into the QKV product;
    /// all, until the load-time timing chooses per decode bucket).
    pub fn fused_small(&self) -> SmallProducts {
        self.dev.fused
    }

    /// Fuses the norms, swiglu and RoPE with the cache write into the products of few
    /// rows on `gemv` for the row counts `fused` says, and launches them apart for the
    /// others (the same bits either way), from the next step on (the decode graphs are
    /// captured again).
    pub fn set_fused_small(&mut self, fused: SmallProducts) -> Result<(), ExecError> {
        self.dev.fused = fused;
        self.recapture_all()?;
        Ok(())
    }

    /// The attention kernel the steps launch.
    pub fn attention(&self) -> AttentionKernel {
        self.dev.attention
    }

    /// Launches `kernel` for attention from the next step on (the decode graphs are
    /// captured again).
    pub fn set_attention(&mut self, kernel: AttentionKernel) -> Result<(), ExecError> {
        let hd = self.dev.config.head_dim;
        if kernel == AttentionKernel::Tensor && hd > crate::cuda::device::MAX_TC_HEAD_DIM {
            return Err(ExecError::Bounds(format!(
                "attention = \"tensor\" takes heads up to {} wide; this model's are {hd} \
                 (attention = \"simt\" takes them)",
                crate::cuda::device::MAX_TC_HEAD_DIM
            )));
        }
        self.dev.attention = kernel;
        self.recapture_all()?;
        Ok(())
    }

    /// Times each decode graph of at most [`gemv::MAX_ROWS`] sequences over `steps`
    /// replays with its products on cuBLAS, on `gemv_f16` and (where the model has them)
    /// on the file's own blocks, the last two with the kernels around the products fused
    /// in and launched apart, and keeps the fastest for the row counts that bucket serves
    /// (direct launches of as many rows follow it). Nothing changes when graphs are off.
    pub fn tune_small_products(
        &mut self,
        steps: usize,
    ) -> Result<Vec<SmallProductTiming>, ExecError> {
        let mut out = Vec::new();
        let mut below = 0;
        for i in 0..self.graphs.len() {
            let bucket = self.graphs[i].bucket;
            if bucket > gemv::MAX_ROWS {
                break;
            }
            let rows = below + 1..=bucket;
            below = bucket;
            // (on gemv, over the file's blocks, fused): cuBLAS, gemv_f16 fused and apart,
            // the blocks fused and apart.
            const WAYS: [(bool, bool, bool); 5] = [
                (false, false, true),
                (true, false, true),
                (true, false, false),
                (true, true, true),
                (true, true, false),
            ];
            let ways = &WAYS[..if self.dev.has_quant() { 5 } else { 3 }];
            let mut secs = Vec::with_capacity(ways.len());
            for &(on, quant, fused) in ways {
                self.set_rows(rows.clone(), on, quant, fused);
                self.recapture(i)?;
                let t = std::time::Instant::now();
                for _ in 0..steps {
                    self.run(&Batch::default(), 0, Some(i), Sampling::No, logits)?;
                }
                secs.push(t.elapsed().as_secs_f64() / steps.max(1) as f64);
            }
            let best = (0..secs.len()).fold(0, |b, k| if secs[k] < secs[b] { k } else { b });
            let (on, quant, fused) = ways[best];
            self.set_rows(rows, on, quant, fused);
            self.recapture(i)?;
            out.push(SmallProductTiming {
                bucket,
                cublas_secs: secs[0],
                gemv_secs: secs[1],
                gemv_apart_secs: secs[2],
                quant_secs: secs.get(3).copied(),
                quant_apart_secs: secs.get(4).copied(),
            });
        }
        self.tuned = out.clone();
        Ok(out)
    }

    /// Row counts `rows` on `gemv` (`on`), over the file's blocks (`quant`), with the
    /// kernels around the products fused in (`fused`).
    fn set_rows(
        &mut self,
        rows: std::ops::RangeInclusive<usize>,
        on: bool,
        quant: bool,
        fused: bool,
    ) {
        for r in rows {
            self.dev.small = self.dev.small.with(r, on);
            self.dev.quant_small = self.dev.quant_small.with(r, on && quant);
            self.dev.fused = self.dev.fused.with(r, fused);
        }
    }
}
