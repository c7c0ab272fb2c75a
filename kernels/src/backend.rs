//! The compute backend seam: one batched model step. The CPU backend lives here; the CUDA
//! backend implements the same trait.

use crate::cuda::twins::{sample, SampleParams};
use crate::forward::{Batch, Model, Scratch, StepError};
use crate::kv::KvCache;
use crate::matmul::ActPrecision;
use crate::model::LlamaConfig;
use std::sync::Arc;

/// Runs batched forward steps over its own KV cache.
pub trait Backend: Send {
    fn name(&self) -> &str;
    fn config(&self) -> &LlamaConfig;
    /// Tokens per KV block, and how many blocks the cache holds.
    fn kv_geometry(&self) -> (usize, usize);
    /// One step: returns `batch.n_logits() × vocab` logits.
    fn step(&mut self, batch: &Batch) -> Result<Vec<f32>, StepError>;
    /// Whether [`Backend::step_sample`] samples where the logits are (the GPU), so that a
    /// caller should prefer it to [`Backend::step`] plus its own sampler.
    fn samples_on_device(&self) -> bool {
        false
    }
    /// Rows `rows` (indices among the logits rows) of the last step's logits, `vocab`
    /// floats each: what [`Backend::step_sample`] left on the device, read back for the
    /// rows whose log-probabilities are asked for. Backends that sample on the host
    /// return every row from [`Backend::step`] and keep none.
    fn logits_rows(&mut self, rows: &[usize]) -> Result<Vec<f32>, StepError> {
        let _ = rows;
        Err(StepError::BadBatch(
            "this backend keeps no logits after a step".into(),
        ))
    }
    /// One step, and the next token of each row that wants logits, drawn with `params`
    /// (one per such row, in order) by the `sample` kernel's rule
    /// ([`crate::cuda::twins::sample`]). The default runs [`Backend::step`] and that rule
    /// on the CPU.
    fn step_sample(
        &mut self,
        batch: &Batch,
        params: &[SampleParams],
    ) -> Result<Vec<u32>, StepError> {
        if params.len() != batch.n_logits() {
            return Err(StepError::BadBatch(format!(
                "{} sampling parameters for {} logits rows",
                params.len(),
                batch.n_logits()
            )));
        }
        let logits = self.step(batch)?;
        let vocab = self.config().vocab;
        Ok(params
            .iter()
            .zip(logits.chunks_exact(vocab))
            .map(|(&p, row)| sample(row, p))
            .collect())
    }
}

/// The multi-threaded CPU backend.
pub struct CpuBackend {
    model: Arc<Model>,
    kv: KvCache,
    scratch: Scratch,
    pool: rayon::ThreadPool,
    precision: ActPrecision,
}

impl CpuBackend {
    /// `threads = 0`: one per CPU.
    pub fn new(
        model: Arc<Model>,
        block_size: usize,
        n_blocks: usize,
        threads: usize,
    ) -> Result<Self, String> {
        let c = &model.config;
        let kv = KvCache::new(c.n_layers, c.n_kv_heads, c.kv_dim(), block_size, n_blocks);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("cpu-step-{i}"))
            .build()
            .map_err(|e| e.to_string())?;
        let precision = ActPrecision::default();
        pool.install(|| model.weights.prepare(precision));
        Ok(Self {
            model,
            kv,
            scratch: Scratch::default(),
            pool,
            precision,
        })
    }

    /// How activations meet quantized weights (default: 16-bit, see [`ActPrecision`]).
    pub fn with_precision(mut self, p: ActPrecision) -> Self {
        self.precision = p;
        self.pool.install(|| self.model.weights.prepare(p));
        self
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }
    fn config(&self) -> &LlamaConfig {
        &self.model.config
    }
    fn kv_geometry(&self) -> (usize, usize) {
        (self.kv.block_size, self.kv.n_blocks)
    }
    fn step(&mut self, batch: &Batch) -> Result<Vec<f32>, StepError> {
        let (model, kv, scratch, p) =
            (&self.model, &mut self.kv, &mut self.scratch, self.precision);
        self.pool.install(|| model.forward(batch, kv, scratch, p))
    }
}
