//! The compute backend seam: one batched model step. The CPU backend lives here; the CUDA
//! backend implements the same trait.

use crate::adjust::Adjust;
use crate::cuda::twins::{sample, SampleParams};
use crate::forward::{Batch, Model, Scratch, StepError};
use crate::kv::KvCache;
use crate::logprobs::{Score, TokenLogprobs};
use crate::matmul::ActPrecision;
use crate::model::LlamaConfig;
use std::sync::Arc;

/// A token of a [`Backend::submit`]ted batch that stands for the token the step submitted
/// just before it draws for its logits row `r`: `FROM_LAST | r`. The device reads it from
/// that step's answer, so the host plans a step while the one before runs.
pub const FROM_LAST: u32 = 1 << 31;

/// What a [`Backend::submit`]ted step reads back beside its tokens: logits rows (`rows`:
/// indices among its logits rows, as [`Backend::logits_rows`] takes them: the model's),
/// rows whose log-probabilities the device computes (`scores`: a few words each instead
/// of a row of logits), and logits rows whose final hidden states come back (`hidden`, as
/// [`Backend::hidden_rows`] makes them: an embeddings request's last row).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadBack {
    pub rows: Vec<usize>,
    pub scores: Vec<Score>,
    pub hidden: Vec<usize>,
}

impl ReadBack {
    /// Nothing beside the tokens.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.scores.is_empty() && self.hidden.is_empty()
    }

    /// Logits rows `rows` only.
    pub fn rows(rows: Vec<usize>) -> Self {
        Self {
            rows,
            ..Self::default()
        }
    }
}

/// A [`Backend::collect`]ed step: its tokens, the logits rows its [`ReadBack`] asked for
/// (`rows.len() × vocab`, in that order), its scored rows' log-probabilities (in the
/// order asked), and the final hidden states asked for (`hidden.len() × dim`, in that
/// order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Collected {
    pub tokens: Vec<u32>,
    pub logits: Vec<f32>,
    pub scores: Vec<TokenLogprobs>,
    pub hidden: Vec<f32>,
}

/// Runs batched forward steps over its own KV cache.
pub trait Backend: Send {
    fn name(&self) -> &str;
    fn config(&self) -> &LlamaConfig;
    /// Tokens per KV block, and how many blocks the cache holds.
    fn kv_geometry(&self) -> (usize, usize);
    /// Blocks of the windowed layers' own pool, where the cache gives them one: each
    /// sequence of a step then carries its blocks there too
    /// ([`crate::forward::BatchSeq::window_table`]), and only those its window still
    /// covers need be held.
    fn kv_window_blocks(&self) -> Option<usize> {
        None
    }
    /// One step: returns `batch.n_logits() × vocab` logits.
    fn step(&mut self, batch: &Batch) -> Result<Vec<f32>, StepError>;
    /// Whether [`Backend::step_sample`] samples where the logits are (the GPU), so that a
    /// caller should prefer it to [`Backend::step`] plus its own sampler.
    fn samples_on_device(&self) -> bool {
        false
    }
    /// Rows `rows` (indices among the logits rows) of the last step's logits, `vocab`
    /// floats each: the model's, as [`Backend::step_sample`] left them on the device
    /// (before any row's adjustment), read back for the rows the host draws again.
    /// Backends that sample on the host return every row from [`Backend::step`] and keep
    /// none.
    fn logits_rows(&mut self, rows: &[usize]) -> Result<Vec<f32>, StepError> {
        let _ = rows;
        Err(StepError::BadBatch(
            "this backend keeps no logits after a step".into(),
        ))
    }
    /// The model's final hidden states of logits rows `rows` of the last step, `dim` floats
    /// each, in that order: the residual stream after the last layer, normalized by the
    /// output norm (what the output head multiplies; an embedding's source). Read where no
    /// step is in flight (a submitted step's come back with it: [`ReadBack::hidden`]).
    fn hidden_rows(&mut self, rows: &[usize]) -> Result<Vec<f32>, StepError> {
        let _ = rows;
        Err(StepError::BadBatch(
            "this backend keeps no hidden states after a step".into(),
        ))
    }
    /// The log-probabilities of rows of the last step ([`Score`]: a row, its token or the
    /// one [`Backend::step_sample`] drew for it, how many most likely), computed where the
    /// logits are, as [`Backend::submit`] computes them for its scored rows.
    fn scores(&mut self, scores: &[Score]) -> Result<Vec<TokenLogprobs>, StepError> {
        let _ = scores;
        Err(StepError::BadBatch(
            "this backend keeps no logits after a step".into(),
        ))
    }
    /// Logits rows one step may return ([`Batch::n_logits`]).
    fn max_logit_rows(&self) -> usize {
        usize::MAX
    }
    /// Words of adjustments ([`Adjust::words`]) that one [`Backend::step_sample`] may
    /// carry; rows past it are left to the caller.
    fn adjust_room(&self) -> usize {
        usize::MAX
    }
    /// One step, and the next token of each row that wants logits, drawn with `params`
    /// (one per such row, in order) by the `sample` kernel's rule
    /// ([`crate::cuda::twins::sample`]) after its adjustment, if any (`adjust`: none, or one
    /// per such row). The default runs [`Backend::step`] and that rule on the CPU.
    fn step_sample(
        &mut self,
        batch: &Batch,
        params: &[SampleParams],
        adjust: &[Option<Adjust>],
    ) -> Result<Vec<u32>, StepError> {
        check_sample(batch.n_logits(), params, adjust, self.adjust_room())?;
        let mut logits = self.step(batch)?;
        let vocab = self.config().vocab;
        let inputs = batch.logit_tokens();
        Ok(params
            .iter()
            .zip(logits.chunks_exact_mut(vocab))
            .enumerate()
            .map(|(i, (&p, row))| {
                if let Some(Some(a)) = adjust.get(i) {
                    a.apply_after(row, inputs[i]);
                }
                sample(row, p)
            })
            .collect())
    }
    /// Whether [`Backend::submit`] and [`Backend::collect`] overlap the host's work with
    /// the device's: a step is sent without waiting, and the next may be planned and sent
    /// before the first one's tokens are read.
    fn overlaps(&self) -> bool {
        false
    }
    /// Sends [`Backend::step_sample`]'s step without waiting for it; its tokens come from
    /// [`Backend::collect`], in the order the steps were sent, with what `back` asks for.
    /// `batch`'s tokens may be
    /// [`FROM_LAST`]` | r` (row `r` of the step sent just before, collected or not). At
    /// most two steps are sent and not collected; while any is,
    /// [`Backend::step_sample`], [`Backend::step`] and [`Backend::logits_rows`] fail.
    /// After a device error no step is pending; a refused batch leaves those before it.
    fn submit(
        &mut self,
        batch: &Batch,
        params: &[SampleParams],
        adjust: &[Option<Adjust>],
        back: &ReadBack,
    ) -> Result<(), StepError> {
        let _ = (batch, params, adjust, back);
        Err(StepError::BadBatch(
            "this backend does not overlap steps".into(),
        ))
    }
    /// Sends a step's forward pass without waiting for it, as [`Backend::submit`] does,
    /// but not its sampling: its parameters, adjustments and what it reads back come
    /// with [`Backend::submit_sample`], which must follow before any other step is sent;
    /// the step before may be collected in between (so that the adjustments may depend on
    /// its tokens, while the device runs this step's forward pass).
    fn submit_forward(&mut self, batch: &Batch) -> Result<(), StepError> {
        let _ = batch;
        Err(StepError::BadBatch(
            "this backend does not overlap steps".into(),
        ))
    }
    /// Samples the step sent last by [`Backend::submit_forward`] (see [`Backend::submit`]
    /// for the arguments).
    fn submit_sample(
        &mut self,
        params: &[SampleParams],
        adjust: &[Option<Adjust>],
        back: &ReadBack,
    ) -> Result<(), StepError> {
        let _ = (params, adjust, back);
        Err(StepError::BadBatch("no step waits to be sampled".into()))
    }
    /// The tokens of the oldest step sent by [`Backend::submit`] and not collected (waits
    /// for it), and what it was asked to read back. After a device error no step is
    /// pending.
    fn collect(&mut self) -> Result<Collected, StepError> {
        Err(StepError::BadBatch("no step was submitted".into()))
    }
    /// Steps sent by [`Backend::submit`] and not collected.
    fn pending(&self) -> usize {
        0
    }
}

/// Checks a [`Backend::step_sample`]'s arguments against its batch: parameters for each
/// logits row of a step's `rows`, adjustments for none or each, within `room` words.
pub fn check_sample(
    rows: usize,
    params: &[SampleParams],
    adjust: &[Option<Adjust>],
    room: usize,
) -> Result<(), StepError> {
    let bad = |m: String| Err(StepError::BadBatch(m));
    if params.len() != rows {
        return bad(format!(
            "{} sampling parameters for {rows} logits rows",
            params.len()
        ));
    }
    if !adjust.is_empty() && adjust.len() != rows {
        return bad(format!(
            "{} adjustments for {rows} logits rows",
            adjust.len()
        ));
    }
    if let Some(r) = adjust.iter().flatten().position(|a| !a.is_well_formed()) {
        return bad(format!(
            "adjustment {r}: a mask without words, or a carried token without one \
             alternative per delta"
        ));
    }
    let words: usize = adjust.iter().flatten().map(Adjust::words).sum();
    if words > room {
        return bad(format!("{words} words of adjustments for a room of {room}"));
    }
    Ok(())
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

    /// Gives the model's windowed layers (where it has some) `blocks` blocks of their own
    /// ([`KvCache::with_window`]), fewer than the others' as they hold only a window's
    /// positions a sequence: the engine then sends each sequence's second block table.
    pub fn with_window_blocks(mut self, blocks: usize) -> Self {
        let c = &self.model.config;
        if c.window_size().is_some() {
            let windowed: Vec<bool> = (0..c.n_layers).map(|l| c.window_at(l).is_some()).collect();
            let (bs, n) = (self.kv.block_size, self.kv.n_blocks);
            self.kv =
                KvCache::with_window(&windowed, c.n_kv_heads, c.kv_dim(), bs, n, Some(blocks));
        }
        self
    }

    /// Bytes its KV cache holds (keys and values, every layer).
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
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
    fn kv_window_blocks(&self) -> Option<usize> {
        self.kv.window_blocks
    }
    fn step(&mut self, batch: &Batch) -> Result<Vec<f32>, StepError> {
        let (model, kv, scratch, p) =
            (&self.model, &mut self.kv, &mut self.scratch, self.precision);
        self.pool.install(|| model.forward(batch, kv, scratch, p))
    }
    fn hidden_rows(&mut self, rows: &[usize]) -> Result<Vec<f32>, StepError> {
        let mut out = Vec::with_capacity(rows.len() * self.model.config.dim);
        for &r in rows {
            let row = self.scratch.normed_row(r).ok_or_else(|| {
                StepError::BadBatch(format!("hidden row {r} of a step without it"))
            })?;
            out.extend_from_slice(row);
        }
        Ok(out)
    }
}
