//! The forward step on one GPU, as a [`Backend`]: a step's inputs go from one pinned host
//! staging buffer to the device in one copy ([`super::staging`]), the device work is
//! enqueued by `Device::enqueue`, and only the sampled tokens (or, when asked, the logits)
//! come back.
//!
//! **CUDA graphs.** Decode steps (every sequence one row, every row wanting logits) are
//! replayed from a graph captured per batch-size bucket at load: the step is padded to the
//! smallest bucket that holds it with dummy rows that read the cache's spare block and
//! write nothing to the cache ([`super::staging::READ_ONLY`]).
//! A graph's launches read everything from the fixed device buffers, so one capture
//! serves every step of its bucket. A step of one sequence whose rows all want logits (its
//! last token and the drafts after it: speculative decoding) is replayed from a graph of
//! its row count, captured the first time that count comes. Other steps (prefill chunks,
//! mixed batches) launch their kernels directly. If a capture fails, graphs are turned off with one log line and
//! every step launches directly; `TOLLGATE_CUDA_GRAPHS=0` turns them off from the start.
//!
//! **Products of few rows.** At load on a GPU, each decode graph of up to 16 sequences is
//! timed with its matrix products on cuBLAS, on our `gemv_f16`, and on our `gemv_q4` /
//! `gemv_q8` over the file's own blocks (where the model's matrices hold the file's
//! values in them: Q4_0, Q4_1, Q8_0 and the 8-bit layouts of the same values, or the
//! K-quants' under their scales, `gemv_q4f` / `gemv_q5f` / `gemv_q6h` / `gemv_q2h`, IQ4's
//! levels from 4-bit indices, `gemv_iq4` / `gemv_iq4f`: a fifth to a
//! half of the bytes), the last two with the norms, swiglu and RoPE fused into the products and
//! launched apart, and the fastest is kept for that many rows
//! ([`CudaBackend::tune_small_products`]; `TOLLGATE_SMALL_PRODUCTS=cublas|gemv|quant`
//! fixes it instead).
//!
//! **Dependent launches.** On Hopper and later, every kernel launches as a programmatic
//! dependent launch ([`super::launch`]), so that its launch and start overlap the end of
//! the kernel before it; the load-time self-check ([`CudaBackend::verify`]) falls back to
//! plain launches if it fails with them, and `TOLLGATE_DEPENDENT_LAUNCH=0` turns them off.
//!
//! **Overlapped steps.** [`Backend::submit`] sends a sampled step and returns; its tokens
//! come back by a copy into page-locked memory that [`Backend::collect`] waits for. A
//! step sent while the one before still runs may take that one's tokens without the host
//! seeing them ([`FROM_LAST`](crate::backend::FROM_LAST): `build_batch` reads them from the device's `sampled`
//! buffer). Staging and answer buffers alternate between two, so the host writes the next
//! step's while the device copies the last one's. A step may also be sent in two parts
//! ([`Backend::submit_forward`], then [`Backend::submit_sample`]): its batch and forward
//! pass first (a decode step replays its bucket's graph captured without the `sample`
//! kernel), and its sampling part of the staging words (from a second host buffer) and
//! `sample` kernel once the host has made adjustments that need the step before's tokens.
//!
//! **Sampling on the device.** [`Backend::step_sample`] runs the `sample` kernel on the
//! logits rows (greedy, temperature, top-k, top-p, per-sequence seeds) with the parameters
//! sent in the same staging copy; a step returns one `u32` per sequence. Rows may carry
//! adjustments in that copy too (penalties, logit bias, a grammar's mask: [`Adjust`]),
//! which the kernel applies before it draws, up to [`Backend::adjust_room`] words a step,
//! to a copy of the row: the logits rows read back are the model's, and a row with
//! penalties or a grammar that wants its log-probabilities keeps the device's draw.
//!
//! **Log-probabilities on the device.** Rows whose log-probabilities are asked for
//! ([`ReadBack::scores`]: a drawn token's, or a prompt's next token's) are reduced after
//! the draw by the `logprobs` kernel, launched outside any graph: [`SCORE_WORDS`] words
//! come back for each instead of its logits.
//!
//! **Hidden states.** An embeddings request's answer is its last row's final hidden state
//! ([`ReadBack::hidden`]): a submitted step copies back that row of the residual (and,
//! where the final norm was fused into the output head, of the last down output still to
//! add) with its tokens, and [`Backend::collect`] normalizes it on the host
//! ([`Device::receive_hidden`], [`Device::hidden_from`]); after a step taken at once,
//! [`Backend::hidden_rows`] reads the same from the device.
//!
//! Here the backend and its [`Backend`] methods; a step's trip through the device (its
//! host memory, its words sent, its work enqueued, its answers copied back) in `enqueue`,
//! what is checked before it in `checks`, the decode graphs in `graphs`, the load-time
//! choice of the small products in `tuning` and the load-time check against the CPU twin
//! in `self_check`.

mod checks;
mod enqueue;
mod graphs;
mod self_check;
mod tuning;

use crate::adjust::Adjust;
use crate::backend::{check_sample, Backend, Collected, ReadBack};
use crate::cuda::device::{Gpu, GpuError};
use crate::cuda::exec::{Exec, ExecError};
use crate::cuda::staging::{self, Layout};
use crate::cuda::step::{runs, Device};
pub use crate::cuda::step::{AttentionKernel, KvCapacity, KvRequest, SmallProducts};
use crate::cuda::twins::{SampleParams, TwinModel};
use crate::forward::{Batch, Model, StepError};
use crate::logprobs::{from_words, Score, TokenLogprobs, SCORE_WORDS};
use crate::model::LlamaConfig;
use checks::{check_back, check_scores};
use enqueue::{logits, tokens, Read, Sample, Sampling, Slot};
use graphs::Graph;
use std::collections::VecDeque;
pub use tuning::{FixedSmall, SmallProductTiming};

/// The CUDA backend: on a GPU, or (for tests without one) on the CPU emulator, which runs
/// the same kernel sources, launches and graph logic.
pub struct CudaBackend<E: Exec = Gpu> {
    dev: Device<E>,
    /// Host memory of two steps, used in turn, so that a step's words are written while
    /// the step before may still be copying its own.
    slots: [Slot<E>; 2],
    /// The slot the next step uses.
    turn: usize,
    /// Steps submitted and not collected, oldest first.
    flight: VecDeque<InFlight>,
    /// Tokens the last submitted step samples (what [`FROM_LAST`](crate::backend::FROM_LAST) may refer to; 0 after
    /// any other step).
    last_sampled: usize,
    graphs: Vec<Graph<E>>,
    /// Graphs of one sequence's rows that all want logits (its last token and drafts,
    /// speculative decoding), captured as each shape first comes ([`graphs`]); indexed
    /// after the decode graphs.
    draft_graphs: Vec<Graph<E>>,
    /// Why graphs are off, when they are.
    graphs_off: Option<String>,
    /// Why drafts' graphs are off (a capture failed): their steps launch directly.
    draft_graphs_off: Option<String>,
    max_tokens: usize,
    max_seqs: usize,
    name: String,
    /// The last [`CudaBackend::tune_small_products`]'s timings.
    tuned: Vec<SmallProductTiming>,
    /// Logits rows the last step left in the logits buffer.
    last_rows: usize,
    /// Whether the last step drew its rows' tokens (what [`Backend::scores`] may report).
    last_drew: bool,
    /// Logits rows the last step taken at once ([`CudaBackend::run`]) enqueued, with its
    /// padding (0 after a submitted one): what [`Backend::hidden_rows`] reads.
    last_padded: usize,
}

/// A step submitted and not collected: its slot, its staging layout, its logits rows
/// (`tokens` its own, `rows` with its padding), whether it is sampled yet, the logits
/// rows asked for (they come back in that order), how many rows are scored, and how many
/// final hidden states come back (and whether with the last down output to add:
/// [`Device::receive_hidden`]). A step sent for its forward pass alone keeps its logits
/// rows' token rows (`positions`), for the hidden states its sampling may ask for.
struct InFlight {
    turn: usize,
    lay: Layout,
    tokens: usize,
    rows: usize,
    sampled: bool,
    want: Vec<usize>,
    scored: usize,
    hidden: (usize, bool),
    positions: Vec<usize>,
}

/// The backend's name on GPU `device` (logs, `Backend::name`).
pub fn gpu_name(device: usize, gpu: &Gpu) -> String {
    format!("cuda:{device} {}", gpu.describe())
}

impl CudaBackend<Gpu> {
    /// Loads `model` onto GPU `device`, with a KV cache of `n_blocks` blocks of
    /// `block_size` tokens, for steps of up to `max_tokens` rows and `max_seqs` sequences.
    pub fn new(
        model: &Model,
        device: usize,
        block_size: usize,
        n_blocks: usize,
        max_tokens: usize,
        max_seqs: usize,
    ) -> Result<Self, GpuError> {
        let twin = TwinModel::from_model(model);
        let kv = KvCapacity::Blocks(n_blocks);
        Self::with_capacity(&twin, device, block_size, kv, max_tokens, max_seqs)
    }

    /// As [`CudaBackend::new`], from weights already dequantized for the GPU (`twin`), with
    /// the KV cache sized by `kv`: a number of blocks, or from the memory left on the
    /// device.
    pub fn with_capacity(
        twin: &TwinModel,
        device: usize,
        block_size: usize,
        kv: KvCapacity,
        max_tokens: usize,
        max_seqs: usize,
    ) -> Result<Self, GpuError> {
        let gpu = Gpu::open_for(device, &twin.config)?;
        let name = gpu_name(device, &gpu);
        let mut b = Self::on(gpu, name, twin, block_size, kv, max_tokens, max_seqs)
            .map_err(|e| GpuError::Unavailable(e.to_string()))?;
        b.choose_small_products();
        Ok(b)
    }
}

impl<E: Exec> CudaBackend<E> {
    /// Loads `twin`'s weights onto `exec` (which must have the kernels built for the
    /// model's attention shape), sized as [`CudaBackend::with_capacity`]; runs a first
    /// step, then captures the decode graphs (unless turned off) as on a GPU.
    pub fn on(
        exec: E,
        name: String,
        twin: &TwinModel,
        block_size: usize,
        kv: impl Into<KvRequest>,
        max_tokens: usize,
        max_seqs: usize,
    ) -> Result<Self, ExecError> {
        let dev = Device::new(exec, twin, block_size, kv.into(), max_tokens, max_seqs)?;
        let windowed = dev.window_blocks.is_some();
        let cap = Layout::with_window(
            max_seqs,
            max_tokens,
            dev.max_blocks,
            dev.max_logits,
            windowed,
        )
        .len + staging::adjust_room(dev.max_logits, dev.config.vocab)
            + staging::score_room(dev.max_logits);
        let slots = [
            Slot::new(&dev.exec, cap, dev.max_logits)?,
            Slot::new(&dev.exec, cap, dev.max_logits)?,
        ];
        let mut b = Self {
            dev,
            slots,
            turn: 0,
            flight: VecDeque::new(),
            last_sampled: 0,
            graphs: Vec::new(),
            draft_graphs: Vec::new(),
            graphs_off: None,
            draft_graphs_off: None,
            max_tokens,
            max_seqs,
            name,
            tuned: Vec::new(),
            last_rows: 0,
            last_drew: false,
            last_padded: 0,
        };
        // One direct step first (one dummy row, sampled): cuBLAS and the kernels load
        // outside any capture.
        b.run(
            &Batch::default(),
            1,
            None,
            Sampling::Now((&[], &[], &[])),
            tokens,
        )
        .map_err(|e| {
            ExecError::Gpu(GpuError::Unavailable(format!(
                "first step on the device: {e}"
            )))
        })?;
        if std::env::var("TOLLGATE_CUDA_GRAPHS").as_deref() == Ok("0") {
            b.graphs_off = Some("TOLLGATE_CUDA_GRAPHS=0".into());
        } else if let Err(e) = b.capture_all() {
            let why = format!("capturing decode graphs failed ({e}); launching directly");
            tracing::warn!(backend = %b.name, "{why}");
            b.graphs.clear();
            b.graphs_off = Some(why);
        }
        Ok(b)
    }

    /// A step taken at once (nothing in flight), checked, sampled where `sample` says, and
    /// its first rows read back by `read`.
    fn step_checked<T>(
        &mut self,
        batch: &Batch,
        sample: Option<Sample>,
        read: Read<E, T>,
    ) -> Result<Vec<T>, StepError> {
        if !self.flight.is_empty() {
            return Err(StepError::BadBatch(
                "a submitted step waits to be collected".into(),
            ));
        }
        self.check(batch, 0)?;
        if let Some((p, adjust, scores)) = sample {
            check_sample(batch.n_logits(), p, adjust, self.adjust_room())?;
            check_scores(scores, batch.n_logits())?;
        }
        if batch.tokens.is_empty() {
            return Ok(Vec::new());
        }
        self.capture_draft_graph(batch);
        let graph = self.graph_for(batch);
        self.last_rows = 0;
        let sampling = sample.map_or(Sampling::No, Sampling::Now);
        let out = self
            .run(batch, 0, graph, sampling, read)
            .map_err(|e| StepError::Device(e.to_string()))?;
        self.last_rows = batch.n_logits();
        self.last_drew = sample.is_some();
        Ok(out)
    }
}

impl<E: Exec> Backend for CudaBackend<E> {
    fn name(&self) -> &str {
        &self.name
    }
    fn config(&self) -> &LlamaConfig {
        &self.dev.config
    }
    fn kv_geometry(&self) -> (usize, usize) {
        (self.dev.block_size, self.dev.n_blocks)
    }
    fn kv_window_blocks(&self) -> Option<usize> {
        self.dev.window_blocks
    }
    fn step(&mut self, batch: &Batch) -> Result<Vec<f32>, StepError> {
        self.step_checked(batch, None, logits)
    }
    fn samples_on_device(&self) -> bool {
        true
    }
    fn logits_rows(&mut self, rows: &[usize]) -> Result<Vec<f32>, StepError> {
        let vocab = self.dev.config.vocab;
        self.last_step_rows(
            rows,
            !self.flight.is_empty(),
            "logits are not kept while steps are in flight",
        )?;
        // One copy per run of consecutive rows.
        let mut out = Vec::with_capacity(rows.len() * vocab);
        for (_, first, n) in runs(rows) {
            let r = first * vocab..(first + n) * vocab;
            let got = self.dev.exec.download_at(&self.dev.bufs.logits, r);
            out.extend(got.map_err(|e| StepError::Device(e.to_string()))?);
        }
        Ok(out)
    }
    fn hidden_rows(&mut self, rows: &[usize]) -> Result<Vec<f32>, StepError> {
        let gone = !self.flight.is_empty() || self.last_padded == 0;
        let why = "hidden states are read after a step taken at once, before any other";
        self.last_step_rows(rows, gone, why)?;
        self.dev
            .final_hidden(rows, self.last_padded)
            .map_err(|e| StepError::Device(e.to_string()))
    }
    fn scores(&mut self, scores: &[Score]) -> Result<Vec<TokenLogprobs>, StepError> {
        if !self.flight.is_empty() {
            return Err(StepError::BadBatch(
                "logits are not kept while steps are in flight".into(),
            ));
        }
        check_scores(scores, self.last_rows)?;
        if !self.last_drew && scores.iter().any(|s| s.token.is_none()) {
            return Err(StepError::BadBatch(
                "the last step drew no tokens to score".into(),
            ));
        }
        if scores.is_empty() {
            return Ok(Vec::new());
        }
        self.score_last(scores).map_err(|err| {
            let _ = self.dev.exec.synchronize();
            StepError::Device(err.to_string())
        })
    }
    fn max_logit_rows(&self) -> usize {
        self.dev.max_logits
    }
    fn adjust_room(&self) -> usize {
        staging::adjust_room(self.dev.max_logits, self.dev.config.vocab)
    }
    fn step_sample(
        &mut self,
        batch: &Batch,
        params: &[SampleParams],
        adjust: &[Option<Adjust>],
    ) -> Result<Vec<u32>, StepError> {
        self.step_checked(batch, Some((params, adjust, &[])), tokens)
    }
    fn overlaps(&self) -> bool {
        true
    }
    fn submit(
        &mut self,
        batch: &Batch,
        params: &[SampleParams],
        adjust: &[Option<Adjust>],
        back: &ReadBack,
    ) -> Result<(), StepError> {
        self.check_submit(batch)?;
        check_sample(batch.n_logits(), params, adjust, self.adjust_room())?;
        check_back(back, batch.n_logits())?;
        let graph = self.graph_for(batch);
        let turn = self.turn;
        let (want, scores) = (&back.rows, &back.scores);
        let hidden = token_rows(&back.hidden, || batch.logit_positions().collect());
        let sent = self
            .launch(batch, 0, graph, Sampling::Now((params, adjust, scores)))
            .and_then(|l| {
                let got = self.receive(turn, l.rows, scores.len(), want, &hidden, l.padded)?;
                Ok((got, l))
            });
        match sent {
            Ok((hidden, l)) => {
                self.flight.push_back(InFlight {
                    turn,
                    lay: l.lay,
                    tokens: l.rows,
                    rows: l.padded,
                    sampled: true,
                    want: want.to_vec(),
                    scored: scores.len(),
                    hidden,
                    positions: Vec::new(),
                });
                self.last_sampled = l.rows;
                Ok(())
            }
            Err(e) => Err(self.abandon(e)),
        }
    }
    fn submit_forward(&mut self, batch: &Batch) -> Result<(), StepError> {
        self.check_submit(batch)?;
        let graph = self.graph_for(batch);
        let turn = self.turn;
        match self.launch(batch, 0, graph, Sampling::Later) {
            Ok(l) => {
                self.flight.push_back(InFlight {
                    turn,
                    lay: l.lay,
                    tokens: l.rows,
                    rows: l.padded,
                    sampled: false,
                    want: Vec::new(),
                    scored: 0,
                    hidden: (0, false),
                    positions: batch.logit_positions().collect(),
                });
                self.last_sampled = 0;
                Ok(())
            }
            Err(e) => Err(self.abandon(e)),
        }
    }
    fn submit_sample(
        &mut self,
        params: &[SampleParams],
        adjust: &[Option<Adjust>],
        back: &ReadBack,
    ) -> Result<(), StepError> {
        let Some(f) = self.flight.back().filter(|f| !f.sampled) else {
            return Err(StepError::BadBatch(
                "no step sent for its forward pass waits to be sampled".into(),
            ));
        };
        let (turn, lay, rows, padded) = (f.turn, f.lay, f.tokens, f.rows);
        check_sample(rows, params, adjust, self.adjust_room())?;
        check_back(back, rows)?;
        let (want, scores) = (&back.rows, &back.scores);
        let hidden = token_rows(&back.hidden, || f.positions.clone());
        let sent = self
            .launch_sample(turn, lay, padded, (params, adjust, scores))
            .and_then(|()| self.receive(turn, rows, scores.len(), want, &hidden, padded));
        match sent {
            Ok(hidden) => {
                if let Some(f) = self.flight.back_mut() {
                    f.sampled = true;
                    f.want = want.to_vec();
                    f.scored = scores.len();
                    f.hidden = hidden;
                    f.positions = Vec::new();
                }
                self.last_sampled = rows;
                Ok(())
            }
            Err(e) => Err(self.abandon(e)),
        }
    }
    fn collect(&mut self) -> Result<Collected, StepError> {
        if self.flight.front().is_some_and(|f| !f.sampled) {
            return Err(StepError::BadBatch(
                "the step in flight waits to be sampled".into(),
            ));
        }
        let Some(f) = self.flight.pop_front() else {
            return Err(StepError::BadBatch("no step is in flight".into()));
        };
        let e = &self.dev.exec;
        let vocab = self.dev.config.vocab;
        let got = e.make_current().and_then(|()| {
            let slot = &mut self.slots[f.turn];
            let tokens = e.host_words(&mut slot.tokens)?[..f.tokens].to_vec();
            let mut logits = Vec::with_capacity(f.want.len() * vocab);
            if let Some((h, _)) = slot.logits.as_mut().filter(|_| !f.want.is_empty()) {
                let rows = &e.host_words(h)?[..f.want.len() * vocab];
                logits.extend(rows.iter().map(|&w| f32::from_bits(w)));
            }
            let scores = if f.scored == 0 {
                Vec::new()
            } else {
                let words = &e.host_words(&mut slot.scores)?[..f.scored * SCORE_WORDS];
                words.chunks_exact(SCORE_WORDS).map(from_words).collect()
            };
            let (n, fused) = f.hidden;
            let hidden = match slot.hidden.as_mut().filter(|_| n > 0) {
                Some((h, _)) => {
                    let words = &e.host_words(h)?[..2 * n * self.dev.config.dim];
                    self.dev.hidden_from(words, n, fused)
                }
                None => Vec::new(),
            };
            Ok(Collected {
                tokens,
                logits,
                scores,
                hidden,
            })
        });
        got.map_err(|e| self.abandon(e))
    }
    fn pending(&self) -> usize {
        self.flight.len()
    }
}

/// The token rows of logits rows `hidden` of a step, from its logits rows' token rows
/// (`positions`, made only when some are asked for).
fn token_rows(hidden: &[usize], positions: impl FnOnce() -> Vec<usize>) -> Vec<usize> {
    if hidden.is_empty() {
        return Vec::new();
    }
    let positions = positions();
    hidden.iter().map(|&r| positions[r]).collect()
}

impl<E: Exec> CudaBackend<E> {
    /// After a failed submit or collect: waits for the stream, and forgets the steps in
    /// flight.
    fn abandon(&mut self, e: ExecError) -> StepError {
        let _ = self.dev.exec.synchronize();
        self.flight.clear();
        self.last_sampled = 0;
        StepError::Device(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rows_are_copied_in_runs_of_consecutive_rows_in_their_order() {
        assert_eq!(super::runs(&[]), []);
        assert_eq!(
            super::runs(&[9, 2, 3, 4, 7, 8, 1]),
            [(0, 9, 1), (1, 2, 3), (4, 7, 2), (6, 1, 1)]
        );
    }
}
