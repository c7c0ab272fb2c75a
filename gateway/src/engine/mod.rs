//! The in-process engine: a real model served with continuous batching, as a [`Worker`].
//!
//! Requests are tokenized (chat requests through the model's own chat template) on the
//! caller's task, then handed to the engine thread. That thread loops: take new arrivals,
//! drop cancelled sequences, let the [`scheduler`] plan a step (decodes first, chunked
//! prefill under a token budget, free slots to the least-served tenant by weighted virtual
//! token counters ([`fair`]), preemption when KV blocks run out), run it on the
//! backend, sample each finished row, and stream text deltas back. A sequence leaves the
//! batch — and frees its blocks — the step it finishes or its client goes away.
//!
//! A step the device fails ([`StepError::Device`]) takes the engine out of service: its
//! sequences fail, its probe fails and it refuses new work while it builds its backend
//! again (the failed one dropped first, then a fresh one until one passes its self-check).

pub mod blocks;
mod draw;
pub mod fair;
pub mod outbox;
pub mod output;
pub mod scheduler;

use crate::config::{BackendKind, EngineConfig, EngineSizes};
use crate::worker::{
    EngineCounters, EventStream, FinishReason, JsonFormat, Load, Prompt, TokenLogprob, TopLogprob,
    Usage, Worker, WorkerError, WorkerEvent, WorkerRequest,
};
use blocks::{chain, BlockPool};
use fair::{Fair, Tenanted};
use futures::future::BoxFuture;
use futures::FutureExt;
use kernels::adjust::Adjust;
use kernels::backend::{Backend, CpuBackend};
use kernels::chat::{ChatTemplate, Message};
use kernels::cuda::backend::{gpu_name, CudaBackend, KvCapacity};
use kernels::cuda::device::Gpu;
use kernels::cuda::emu::Emu;
use kernels::cuda::exec::Exec;
use kernels::cuda::twins::{SampleParams, TwinModel};
use kernels::forward::{Batch, Model, StepError};
use kernels::json_mode::{JsonState, JsonVocab};
use kernels::load::Loaded;
use kernels::logprobs::{token_logprobs, TokenLogprobs};
use kernels::matmul::ActPrecision;
use kernels::sampler::{Penalties, Sampler, SamplingConfig};
use kernels::tokenizer::Tokenizer;
use outbox::{Events, Outbox};
use output::TextOut;
use scheduler::{Limits, Schedulable};
use std::collections::{HashMap, VecDeque};
use std::hash::RandomState;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use tokio::sync::mpsc as tmpsc;

/// Counters the engine publishes for the router and metrics.
#[derive(Default)]
pub struct EngineStats {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    /// Blocks held in the prefix cache (in use or idle).
    pub kv_blocks_cached: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub steps: AtomicU64,
    pub preemptions: AtomicU64,
    /// GPU path: rows adjusted on the device before their draw, and rows whose logits
    /// were read back (log-probabilities, or adjustments past a step's room).
    pub rows_adjusted_on_device: AtomicU64,
    pub rows_read_back: AtomicU64,
    /// Nanoseconds the engine thread spent in the backend's steps.
    pub backend_ns: AtomicU64,
    /// Nanoseconds it spent around them on steps: arrivals, scheduling, building the
    /// batch, sampling on the CPU, detokenizing and sending (the host's share of a step).
    pub host_ns: AtomicU64,
    pub alive: AtomicBool,
    /// Device faults so far: steps the device failed, each followed by a rebuild.
    pub faults: AtomicU64,
    /// Prompt tokens of the requests finished so far, and those of them served from the
    /// prefix cache.
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    /// When the step in progress began ([`now_ms`]), or 0 between steps.
    pub step_since_ms: AtomicU64,
    /// While the engine rebuilds its backend after a device fault: why. It takes no work
    /// then, and its probe fails, so the pool routes around it.
    pub fault: std::sync::Mutex<Option<String>>,
}

/// Milliseconds since the first call in this process, plus one (so never 0).
fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

impl EngineStats {
    /// Why the engine is out of service after a device fault, if it is.
    pub fn fault(&self) -> Option<String> {
        self.fault.lock().ok().and_then(|f| f.clone())
    }

    /// Why the engine is out of service: a device fault, or a step running past
    /// `limit` (the device may be stuck; the engine is back once the step returns).
    fn out_of_service(&self, limit: std::time::Duration) -> Option<String> {
        let since = self.step_since_ms.load(Ordering::Relaxed);
        let running = now_ms().saturating_sub(since);
        if since != 0 && running as u128 > limit.as_millis() {
            return Some(format!(
                "the engine's step has run for {:.1} s (step_timeout_secs {:.1}): the device may be stuck",
                running as f64 / 1e3,
                limit.as_secs_f64()
            ));
        }
        self.fault()
    }

    fn set_fault(&self, why: Option<String>) {
        if let Ok(mut f) = self.fault.lock() {
            *f = why;
        }
    }
}

struct NewSeq {
    tenant: Arc<str>,
    weight: f64,
    output_weight: f64,
    prompt: Vec<u32>,
    max_tokens: u32,
    sampling: SamplingConfig,
    seed: u64,
    stop: Vec<String>,
    /// Log-probabilities asked for: this many alternatives per token.
    logprobs: Option<u8>,
    /// The prompt's log-probabilities too (`echo` with `logprobs`).
    prompt_logprobs: bool,
    penalties: Option<Penalties>,
    /// JSON mode or structured output: where the document starts.
    json: Option<JsonState>,
    tx: Events,
}

struct Seq {
    tenant: Arc<str>,
    /// Fair-share weight (the tenant's purchased rate).
    weight: f64,
    output_weight: f64,
    tokens: Vec<u32>,
    prompt_len: usize,
    computed: usize,
    blocks: Vec<u32>,
    /// Content hashes of the full blocks of `tokens` known so far (prefix caching).
    hashes: Vec<u64>,
    /// Blocks registered in the pool's prefix cache (the first ones of `blocks`).
    registered: usize,
    /// Prompt tokens taken from the prefix cache (reported in the usage).
    cached: usize,
    max_tokens: u32,
    /// The CPU sampler (its own random state), for backends that return logits.
    sampler: Sampler,
    /// What a device sampler needs: the request's settings and seed.
    sampling: SamplingConfig,
    seed: u64,
    out: TextOut,
    /// Log-probabilities asked for (alternatives per token), and those of the tokens whose
    /// text is not sent yet.
    logprobs: Option<u8>,
    pending_logprobs: Vec<TokenLogprob>,
    /// While its prompt is being scored (`echo` with `logprobs`): the next prompt token to
    /// score (from 1: each row's logits score the next row's token), and the prompt's
    /// tokens scored so far, its first unscored. Sent once all are, before any text.
    prompt_next: Option<usize>,
    prompt_scored: Vec<TokenLogprob>,
    /// Its prompt is scored (`echo` with `logprobs`): a stop token gets an item too.
    scored: bool,
    /// Presence and frequency penalties and logit bias, when the request has any; and
    /// how often each token has been generated.
    penalties: Option<Penalties>,
    counts: HashMap<u32, u32>,
    /// JSON mode or structured output: where the document generated so far stands.
    json: Option<JsonState>,
    tx: Events,
}

impl Tenanted for Seq {
    fn tenant(&self) -> &Arc<str> {
        &self.tenant
    }
    fn weight(&self) -> f64 {
        self.weight
    }
    /// Prompt positions count 1, generated ones (decodes, or recomputed after a
    /// preemption) `output_weight`.
    fn token_cost(&self, n: usize) -> f64 {
        let input = self
            .prompt_len
            .min(self.computed + n)
            .saturating_sub(self.computed);
        input as f64 + (n - input) as f64 * self.output_weight
    }
}

impl Schedulable for Seq {
    fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }
    fn computed(&self) -> usize {
        self.computed
    }
    fn blocks_mut(&mut self) -> &mut Vec<u32> {
        &mut self.blocks
    }
    fn reset(&mut self) {
        self.computed = 0;
        self.registered = 0;
        if self.generated() == 0 {
            self.cached = 0;
        }
    }
    fn cache_keys(&mut self, hasher: &RandomState, block_size: usize) -> (&[u64], &[u32]) {
        chain(
            hasher,
            &self.tenant,
            &self.tokens,
            block_size,
            &mut self.hashes,
        );
        (&self.hashes, &self.tokens)
    }
    fn skip(&mut self, n: usize, block_size: usize) {
        self.computed = n;
        self.registered = n / block_size;
        if self.generated() == 0 {
            self.cached = n.min(self.prompt_len);
        }
    }
    /// Its last row when it reaches its end; while its prompt is scored, also every row
    /// from the first that scores a prompt token not yet scored (a run to its end, as
    /// the batch takes them: rows after the prompt's that a recomputation after a
    /// preemption passes over are computed and dropped).
    fn logit_rows(&self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let end = self.computed + n;
        let last = usize::from(end == self.tokens.len());
        match self.prompt_next {
            // Row p scores prompt token p + 1.
            Some(next) if next < self.prompt_len => {
                let first = (next - 1).max(self.computed);
                if first < end.min(self.prompt_len - 1) {
                    end - first
                } else {
                    last
                }
            }
            _ => last,
        }
    }
    fn reuses_prefix(&self) -> bool {
        self.prompt_next.is_none()
    }
}

impl Seq {
    fn generated(&self) -> u32 {
        (self.tokens.len() - self.prompt_len) as u32
    }
    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len as u32,
            completion_tokens: self.generated(),
            cached_tokens: self.cached as u32,
        }
    }
    fn send(&self, out: &mut Outbox, ev: WorkerEvent) {
        out.push(&self.tx, Ok(ev));
    }
    /// Takes its next token `id`, with its log-probabilities when asked: counted for the
    /// penalties, fed to JSON mode, its item queued for the next text sent (a stop token
    /// is counted only).
    fn take(&mut self, id: u32, lp: Option<TokenLogprobs>, tok: &Tokenizer) {
        if self.penalties.is_some() {
            *self.counts.entry(id).or_insert(0) += 1;
        }
        if !tok.stop_tokens.contains(&id) {
            if let Some(json) = &mut self.json {
                json.advance(tok.token_bytes(id));
            }
            if let Some(lp) = lp {
                self.pending_logprobs.push(logprob_item(tok, &lp));
            }
        } else if let Some(lp) = lp.filter(|_| self.scored) {
            // A scored prompt's lists end with every generated token, the stop token too
            // (with no text): harnesses cut the last entry off as the generated one.
            let mut item = logprob_item(tok, &lp);
            item.token.clear();
            item.bytes.clear();
            self.pending_logprobs.push(item);
        }
        self.tokens.push(id);
    }
    /// Whether its next token is drawn from adjusted logits (penalties, JSON mode).
    fn constrained(&self) -> bool {
        self.penalties.is_some() || self.json.is_some()
    }
    /// Its penalties and JSON mode, applied to a row of logits.
    fn adjust(&self, logits: &mut [f32], tok: &Tokenizer, json_vocab: Option<&JsonVocab>) {
        self.adjustment(tok, json_vocab, logits.len()).apply(logits);
    }
    /// Its penalties and JSON mode as an adjustment of its next row of `n` logits (what
    /// the GPU's `sample` kernel applies, and [`Seq::adjust`] on the host). A JSON mask
    /// that would leave no token (a vocabulary without the bytes the object needs) leaves
    /// the stop tokens.
    fn adjustment(&self, tok: &Tokenizer, json_vocab: Option<&JsonVocab>, n: usize) -> Adjust {
        let deltas = self
            .penalties
            .as_ref()
            .map(|p| p.deltas(&self.counts))
            .unwrap_or_default();
        let mask = self.json.as_ref().zip(json_vocab).map(|(json, vocab)| {
            let mut bits = json.allowed(vocab, n);
            if bits.iter().all(|&w| w == 0) {
                for &id in tok.stop_tokens.iter().filter(|&&id| (id as usize) < n) {
                    bits[id as usize / 32] |= 1 << (id % 32);
                }
            }
            bits
        });
        Adjust { deltas, mask }
    }
    /// An upper bound of [`Seq::adjustment`]'s words, for rows of `n` logits.
    fn adjustment_words(&self, n: usize) -> usize {
        let deltas = self
            .penalties
            .as_ref()
            .map_or(0, |p| p.bias.len() + self.counts.len());
        let mask = if self.json.is_some() {
            n.div_ceil(32)
        } else {
            0
        };
        2 + 2 * deltas + mask
    }
}

/// The in-process engine worker.
pub struct EngineWorker {
    name: String,
    tx: mpsc::Sender<NewSeq>,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    max_context: usize,
    stats: Arc<EngineStats>,
    max_concurrency: usize,
    /// A step running longer takes the engine out of rotation (`step_timeout_secs`).
    step_timeout: std::time::Duration,
}

impl EngineWorker {
    /// Starts the engine thread for a loaded model, on `device` (a GPU ordinal) when the
    /// backend is CUDA.
    pub fn start(
        name: String,
        loaded: &Loaded,
        cfg: &EngineConfig,
        device: usize,
    ) -> Result<Self, String> {
        let mut factory = Factory {
            model: loaded.model.clone(),
            cfg: cfg.clone(),
            device,
            name: name.clone(),
            kv_blocks: None,
        };
        let (kind, (backend, sizes)) = match cfg.backend {
            // `available` checks the libraries before any CUDA call (a missing one would
            // panic).
            BackendKind::Auto => match kernels::cuda::available() {
                Ok(_) => match factory.build(BackendKind::Cuda) {
                    Ok(b) => (BackendKind::Cuda, b),
                    Err(e) => {
                        tracing::error!(worker = %name, error = %e, "backend auto: the GPU is not usable; using the CPU");
                        (BackendKind::Cpu, factory.build(BackendKind::Cpu)?)
                    }
                },
                Err(why) => {
                    tracing::info!(worker = %name, reason = %why, "backend auto: no usable GPU; using the CPU");
                    (BackendKind::Cpu, factory.build(BackendKind::Cpu)?)
                }
            },
            kind => (kind, factory.build(kind)?),
        };
        let (bs, n_blocks) = backend.kv_geometry();
        // A backend built again after a device fault gets the same KV cache.
        factory.kv_blocks = Some(n_blocks);
        let model_ctx = loaded.model.config.context_len;
        let max_context = model_ctx.min(bs * n_blocks);
        let stats = Arc::new(EngineStats::default());
        stats
            .kv_blocks_total
            .store(n_blocks as u64, Ordering::Relaxed);
        stats.alive.store(true, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let limits = Limits {
            max_batch_tokens: sizes.max_batch_tokens,
            max_seqs: sizes.max_seqs,
            block_size: bs,
            prefix_caching: cfg.prefix_caching,
            // The backend's, each step (see `run_engine`).
            max_logit_rows: usize::MAX,
        };
        let (tok, st) = (loaded.tokenizer.clone(), stats.clone());
        let outbox = Outbox::start(format!("deliver-{name}")).map_err(|e| e.to_string())?;
        std::thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || {
                // Marks the engine gone when its thread ends, by return or by panic.
                struct Gone(Arc<EngineStats>);
                impl Drop for Gone {
                    fn drop(&mut self) {
                        self.0.alive.store(false, Ordering::Relaxed);
                    }
                }
                let _gone = Gone(st.clone());
                let rebuild = move || factory.build(kind).map(|(b, _)| b);
                run_engine(backend, Box::new(rebuild), tok, rx, limits, st, outbox);
            })
            .map_err(|e| e.to_string())?;
        Ok(Self {
            name,
            tx,
            tokenizer: loaded.tokenizer.clone(),
            template: loaded.template.clone(),
            max_context,
            stats,
            max_concurrency: sizes.max_concurrency,
            step_timeout: std::time::Duration::from_secs_f64(cfg.step_timeout_secs),
        })
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The prompt's token ids: as given, or its text as the model sees it (chat requests
    /// through the chat template) tokenized.
    fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, WorkerError> {
        let reject = |message: String| WorkerError::Rejected {
            status: 400,
            message,
        };
        let text = match prompt {
            Prompt::Tokens(ids) => {
                return match self.unknown_token(ids) {
                    Some(id) => Err(reject(format!(
                        "The prompt has token {id}; this model's vocabulary has {} tokens.",
                        self.tokenizer.vocab_size()
                    ))),
                    None => Ok(ids.clone()),
                };
            }
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(msgs) => {
                let m: Vec<Message> = msgs
                    .iter()
                    .map(|m| Message {
                        role: &m.role,
                        content: &m.content,
                    })
                    .collect();
                self.template
                    .render(&m)
                    .map_err(|e| reject(format!("cannot apply the chat template: {e}")))?
            }
        };
        self.tokenizer
            .encode(&text)
            .map_err(|e| reject(format!("cannot tokenize the prompt: {e}")))
    }

    /// The first of `ids` outside the model's vocabulary, if any.
    fn unknown_token(&self, ids: &[u32]) -> Option<u32> {
        let vocab = self.tokenizer.vocab_size();
        ids.iter().copied().find(|&id| id as usize >= vocab)
    }

    /// Tokenizes and checks a request; its events will go to `tx`.
    fn prepare(&self, req: &WorkerRequest, tx: Events) -> Result<NewSeq, WorkerError> {
        let reject = |message: String| WorkerError::Rejected {
            status: 400,
            message,
        };
        // Ids the gateway made with this model's tokenizer (`tokenize_prompt`), checked
        // there.
        let prompt = match &req.prompt_ids {
            Some(ids) => ids.to_vec(),
            None => self.prompt_ids(&req.prompt)?,
        };
        if prompt.is_empty() {
            return Err(reject("The prompt is empty.".into()));
        }
        let vocab = self.tokenizer.vocab_size();
        if let Some(&(id, _)) = req.params.logit_bias.iter().find(|b| b.0 as usize >= vocab) {
            return Err(reject(format!(
                "`logit_bias` names token {id}; this model's vocabulary has {vocab} tokens."
            )));
        }
        let need = prompt.len() + req.params.max_tokens as usize;
        if need > self.max_context {
            return Err(reject(format!(
                "This model's maximum context length is {} tokens; the prompt has {} tokens and max_tokens is {}.",
                self.max_context,
                prompt.len(),
                req.params.max_tokens
            )));
        }
        let p = &req.params;
        Ok(NewSeq {
            tenant: req.tenant.clone(),
            weight: req.weight.unwrap_or(1.0),
            output_weight: req.output_weight,
            prompt,
            max_tokens: p.max_tokens,
            sampling: SamplingConfig {
                temperature: p.temperature,
                top_p: if p.top_p <= 0.0 { 1e-6 } else { p.top_p },
                top_k: p.top_k as usize,
            },
            seed: p.seed.unwrap_or_else(rand::random),
            stop: p.stop.clone(),
            logprobs: p.logprobs,
            prompt_logprobs: p.prompt_logprobs && p.logprobs.is_some(),
            penalties: Some(Penalties {
                presence: p.presence_penalty,
                frequency: p.frequency_penalty,
                bias: p.logit_bias.clone(),
            })
            .filter(|p| !p.is_empty()),
            json: p.json.as_ref().map(|j| match j {
                JsonFormat::Object => JsonState::new(),
                JsonFormat::Schema { compiled, .. } => JsonState::with_schema(compiled.clone()),
            }),
            tx,
        })
    }
}

impl Worker for EngineWorker {
    fn name(&self) -> &str {
        &self.name
    }

    fn submit(
        &self,
        req: Arc<WorkerRequest>,
    ) -> BoxFuture<'static, Result<EventStream, WorkerError>> {
        if let Some(why) = self.stats.out_of_service(self.step_timeout) {
            return futures::future::ready(Err(WorkerError::Unreachable(why))).boxed();
        }
        let (etx, erx) = tmpsc::unbounded_channel();
        let prepared = self.prepare(&req, etx);
        let tx = self.tx.clone();
        async move {
            tx.send(prepared?)
                .map_err(|_| WorkerError::Unreachable("the engine thread has stopped".into()))?;
            let stream =
                futures::stream::unfold(
                    erx,
                    |mut rx| async move { rx.recv().await.map(|ev| (ev, rx)) },
                );
            Ok(Box::pin(stream) as EventStream)
        }
        .boxed()
    }

    fn load(&self) -> Load {
        Load {
            running: self.stats.running.load(Ordering::Relaxed),
            queued: self.stats.waiting.load(Ordering::Relaxed),
            kv_blocks: Some((
                self.stats.kv_blocks_used.load(Ordering::Relaxed),
                self.stats.kv_blocks_total.load(Ordering::Relaxed),
            )),
        }
    }

    fn probe(&self) -> BoxFuture<'static, Result<(), WorkerError>> {
        let result = if !self.stats.alive.load(Ordering::Relaxed) {
            Err(WorkerError::Unreachable(
                "the engine thread has stopped".into(),
            ))
        } else if let Some(why) = self.stats.out_of_service(self.step_timeout) {
            Err(WorkerError::Unreachable(why))
        } else {
            Ok(())
        };
        futures::future::ready(result).boxed()
    }

    fn max_concurrency(&self) -> usize {
        self.max_concurrency
    }

    fn tokenize_prompt(&self, prompt: &Prompt) -> Option<Vec<u32>> {
        self.prompt_ids(prompt).ok()
    }

    fn detokenize(&self, ids: &[u32]) -> Option<String> {
        self.unknown_token(ids)
            .is_none()
            .then(|| self.tokenizer.decode(ids))
    }

    fn engine_counters(&self) -> Option<EngineCounters> {
        let s = &self.stats;
        let secs = |ns: &AtomicU64| ns.load(Ordering::Relaxed) as f64 / 1e9;
        Some(EngineCounters {
            steps: s.steps.load(Ordering::Relaxed),
            preemptions: s.preemptions.load(Ordering::Relaxed),
            rows_adjusted_on_device: s.rows_adjusted_on_device.load(Ordering::Relaxed),
            rows_read_back: s.rows_read_back.load(Ordering::Relaxed),
            device_faults: s.faults.load(Ordering::Relaxed),
            prompt_tokens: s.prompt_tokens.load(Ordering::Relaxed),
            cached_tokens: s.cached_tokens.load(Ordering::Relaxed),
            kv_blocks_cached: s.kv_blocks_cached.load(Ordering::Relaxed),
            backend_seconds: secs(&s.backend_ns),
            host_seconds: secs(&s.host_ns),
        })
    }
}

fn admit(n: NewSeq) -> Seq {
    Seq {
        tenant: n.tenant,
        weight: n.weight,
        output_weight: n.output_weight,
        prompt_len: n.prompt.len(),
        tokens: n.prompt,
        computed: 0,
        blocks: Vec::new(),
        hashes: Vec::new(),
        registered: 0,
        cached: 0,
        max_tokens: n.max_tokens,
        sampler: Sampler::new(n.sampling, n.seed),
        sampling: n.sampling,
        seed: n.seed,
        out: TextOut::new(n.stop),
        logprobs: n.logprobs,
        pending_logprobs: Vec::new(),
        prompt_next: n.prompt_logprobs.then_some(1),
        prompt_scored: Vec::new(),
        scored: n.prompt_logprobs,
        penalties: n.penalties,
        counts: HashMap::new(),
        json: n.json,
        tx: n.tx,
    }
}

/// What builds an engine's backend: at start, and again after a device fault.
struct Factory {
    model: Arc<Model>,
    cfg: EngineConfig,
    /// The GPU ordinal, for the CUDA backend.
    device: usize,
    name: String,
    /// The KV cache's blocks once the first backend is built: a backend built again gets
    /// the same number, so that the engine's limits still hold.
    kv_blocks: Option<usize>,
}

impl Factory {
    /// A backend of `kind` (not `Auto`: the caller chose) and its sizes.
    fn build(&self, kind: BackendKind) -> Result<(Box<dyn Backend>, EngineSizes), String> {
        let cfg = &self.cfg;
        let model = &self.model;
        // The emulator's and the CPU's KV cache: a number of blocks.
        let blocks = |kv_tokens: Option<usize>| {
            let n = kv_tokens.unwrap_or(65536).div_ceil(cfg.block_size);
            self.kv_blocks.unwrap_or(n)
        };
        match kind {
            BackendKind::Cuda | BackendKind::Auto => {
                let device = self.device;
                let fail = |e: String| format!("backend = \"cuda\" on device {device}: {e}");
                let sizes = cfg.sizes(true);
                let kv = match (self.kv_blocks, sizes.kv_tokens) {
                    (Some(n), _) => KvCapacity::Blocks(n),
                    (None, Some(k)) => KvCapacity::Blocks(k.div_ceil(cfg.block_size)),
                    // Enough for every sequence slot at the model's full context, at most.
                    (None, None) => KvCapacity::FreeMemory {
                        fraction: cfg.gpu_memory_fraction,
                        max_blocks: sizes.max_seqs
                            * model.config.context_len.div_ceil(cfg.block_size),
                    },
                };
                let twin = TwinModel::from_model(model);
                let gpu = Gpu::open_for(device, &twin.config).map_err(|e| fail(e.to_string()))?;
                let label = gpu_name(device, &gpu);
                let b = cuda_backend(gpu, label, &twin, cfg, &sizes, kv, &self.name, true)
                    .map_err(fail)?;
                Ok((b, sizes))
            }
            // The CUDA path on the CPU emulator, with the CPU backend's sizes.
            BackendKind::Emulator => {
                let fail = |e: String| format!("backend = \"emulator\": {e}");
                let sizes = cfg.sizes(false);
                let kv = KvCapacity::Blocks(blocks(sizes.kv_tokens));
                let twin = TwinModel::from_model(model);
                let emu = Emu::open_for(&twin.config).map_err(|e| fail(e.to_string()))?;
                let label = emu.describe();
                let b = cuda_backend(emu, label, &twin, cfg, &sizes, kv, &self.name, false)
                    .map_err(fail)?;
                Ok((b, sizes))
            }
            BackendKind::Cpu => {
                let sizes = cfg.sizes(false);
                let n_blocks = blocks(sizes.kv_tokens);
                let precision = match cfg.activations {
                    crate::config::Activations::I16 => ActPrecision::I16,
                    crate::config::Activations::Q8 => ActPrecision::Q8,
                    crate::config::Activations::F32 => ActPrecision::F32,
                };
                let b = CpuBackend::new(model.clone(), cfg.block_size, n_blocks, cfg.threads)?
                    .with_precision(precision);
                Ok((Box::new(b), sizes))
            }
        }
    }
}

/// The CUDA backend on `exec` (a GPU or the emulator), sized by `sizes` and `kv`, with its
/// products of few rows placed by their timings when `timed` (a GPU's timings mean
/// something; the emulator's do not), after its self-check: one prefill and one graph
/// decode step against the CPU twin, before it serves.
#[allow(clippy::too_many_arguments)]
fn cuda_backend<E: Exec + 'static>(
    exec: E,
    label: String,
    twin: &TwinModel,
    cfg: &EngineConfig,
    sizes: &EngineSizes,
    kv: KvCapacity,
    worker: &str,
    timed: bool,
) -> Result<Box<dyn Backend>, String> {
    let (tokens, seqs) = (sizes.max_batch_tokens, sizes.max_seqs);
    let mut b = CudaBackend::on(exec, label, twin, cfg.block_size, kv, tokens, seqs)
        .map_err(|e| e.to_string())?;
    if timed {
        b.choose_small_products();
    }
    let err = b
        .self_check(twin)
        .map_err(|e| format!("self-check against the CPU failed: {e}"))?;
    tracing::info!(
        worker,
        backend = b.name(),
        graphs = ?b.graph_buckets(),
        graphs_off = b.graphs_off().unwrap_or(""),
        small_products_on_gemv = b.small_products().0,
        self_check_rel_err = err,
        kv_blocks = b.kv_geometry().1,
        "engine on the CUDA backend"
    );
    Ok(Box::new(b))
}

/// The engine thread's loop; returns when every submitter is gone.
fn run_engine(
    mut backend: Box<dyn Backend>,
    mut rebuild: Rebuild,
    tok: Arc<Tokenizer>,
    rx: mpsc::Receiver<NewSeq>,
    limits: Limits,
    stats: Arc<EngineStats>,
    mut outbox: Outbox,
) {
    let vocab = backend.config().vocab;
    // JSON mode's view of the vocabulary, made on the first request that asks.
    let mut json_vocab: Option<JsonVocab> = None;
    let mut on_device = backend.samples_on_device();
    let mut pool = BlockPool::new(backend.kv_geometry().1, limits.prefix_caching);
    let mut running: Vec<Seq> = Vec::new();
    let mut waiting: VecDeque<Seq> = VecDeque::new();
    let mut fair = Fair::default();
    // A tenant back from idle is lifted to the least served tenant with work.
    let arrive = |n: NewSeq, fair: &mut Fair, running: &[Seq], waiting: &mut VecDeque<Seq>| {
        let backlogged = running.iter().chain(waiting.iter()).map(|s| &s.tenant);
        fair.arrive(&n.tenant, backlogged);
        waiting.push_back(admit(n));
    };
    loop {
        if running.is_empty() && waiting.is_empty() {
            fair.reset();
            match rx.recv() {
                Ok(n) => arrive(n, &mut fair, &running, &mut waiting),
                Err(_) => return,
            }
        }
        let t_loop = std::time::Instant::now();
        while let Ok(n) = rx.try_recv() {
            arrive(n, &mut fair, &running, &mut waiting);
        }
        // Cancelled: the client went away.
        let mut keep = |s: &mut Seq| {
            let gone = s.tx.is_closed();
            if gone {
                pool.release(&mut s.blocks);
            }
            !gone
        };
        running.retain_mut(&mut keep);
        waiting.retain_mut(&mut keep);
        let lim = Limits {
            max_logit_rows: backend.max_logit_rows(),
            ..limits
        };
        let plan = scheduler::schedule(&mut running, &mut waiting, &mut pool, lim, &mut fair);
        stats
            .preemptions
            .fetch_add(plan.preempted as u64, Ordering::Relaxed);
        if plan.items.is_empty() {
            publish(&stats, &running, &waiting, &pool);
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        }
        let mut batch = Batch::default();
        // Each logits row's sequence (by its index in `running`) when the row draws its
        // next token; `None` for a prompt's row that scores the prompt's next token.
        let mut row_seq: Vec<Option<usize>> = Vec::new();
        for &(i, n) in &plan.items {
            let s = &running[i];
            let end = s.computed + n;
            let k = s.logit_rows(n);
            batch.push_rows(&s.tokens[s.computed..end], s.computed, s.blocks.clone(), k);
            let draws = end == s.tokens.len();
            row_seq.extend((0..k).map(|j| (draws && j + 1 == k).then_some(i)));
        }
        let t_step = std::time::Instant::now();
        stats.step_since_ms.store(now_ms(), Ordering::Relaxed);
        let stepped = if on_device {
            let row_seqs: Vec<Option<&Seq>> =
                row_seq.iter().map(|r| r.map(|i| &running[i])).collect();
            let params: Vec<SampleParams> = row_seqs
                .iter()
                .map(|s| s.map_or(SampleParams::GREEDY, device_params))
                .collect();
            // Rows whose token is drawn from adjusted logits (penalties, JSON mode) are
            // adjusted on the device as its room allows. Rows that want log-probabilities
            // (a prompt's rows among them), and adjusted ones past the room, get their
            // logits read back.
            let adjust = draw::adjustments(
                &row_seqs,
                backend.adjust_room(),
                vocab,
                &tok,
                &mut json_vocab,
            );
            let want: Vec<usize> = (0..row_seqs.len())
                .filter(|&r| match row_seqs[r] {
                    None => true,
                    Some(s) => {
                        s.logprobs.is_some()
                            || s.constrained() && adjust.get(r).is_none_or(Option::is_none)
                    }
                })
                .collect();
            stats
                .rows_adjusted_on_device
                .fetch_add(adjust.iter().flatten().count() as u64, Ordering::Relaxed);
            stats
                .rows_read_back
                .fetch_add(want.len() as u64, Ordering::Relaxed);
            backend.step_sample(&batch, &params, &adjust).and_then(|t| {
                let rows = if want.is_empty() {
                    Vec::new()
                } else {
                    backend.logits_rows(&want)?
                };
                Ok(Next::Tokens(t, want, rows))
            })
        } else {
            backend.step(&batch).map(Next::Logits)
        };
        stats.step_since_ms.store(0, Ordering::Relaxed);
        let backend_ns = t_step.elapsed().as_nanos() as u64;
        let rows = batch.n_logits();
        // A backend's answer is checked before any of it reaches a client: the right
        // number of rows, and token ids inside the vocabulary.
        let stepped = stepped.and_then(|next| {
            let bad = |m: String| Err(kernels::forward::StepError::Device(m));
            let got = match &next {
                Next::Tokens(t, ..) => t.len(),
                Next::Logits(l) => l.len() / vocab.max(1),
            };
            if got != rows {
                return bad(format!("the backend returned {got} rows for {rows}"));
            }
            if let Next::Tokens(t, want, logits) = &next {
                if logits.len() != want.len() * vocab {
                    return bad(format!(
                        "the backend returned {} floats for {} logits rows",
                        logits.len(),
                        want.len()
                    ));
                }
                if let Some(id) = t.iter().find(|&&id| id as usize >= vocab) {
                    return bad(format!(
                        "the backend sampled token {id}, past the vocabulary"
                    ));
                }
            }
            Ok(next)
        });
        let mut next = match stepped {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "engine step failed; failing its sequences");
                // Out of service before any client hears of the failure.
                let fault = match &e {
                    StepError::Device(why) => {
                        let why = format!("the engine's device failed ({why}); rebuilding it");
                        stats.faults.fetch_add(1, Ordering::Relaxed);
                        stats.set_fault(Some(why.clone()));
                        Some(why)
                    }
                    StepError::BadBatch(_) => None,
                };
                let mut failed: Vec<usize> = plan.items.iter().map(|&(i, _)| i).collect();
                failed.sort_unstable_by(|a, b| b.cmp(a));
                for i in failed {
                    let mut s = running.remove(i);
                    outbox.push(
                        &s.tx,
                        Err(WorkerError::Protocol(format!("engine step failed: {e}"))),
                    );
                    pool.release(&mut s.blocks);
                }
                outbox.flush();
                if let Some(why) = fault {
                    // The device is in doubt (a CUDA error is sticky: every later call
                    // fails too): nothing more runs on it. The engine's other sequences
                    // fail now (the gateway retries those that sent nothing yet on another
                    // worker), and the backend is built again from scratch.
                    for s in running.drain(..).chain(waiting.drain(..)) {
                        outbox.push(&s.tx, Err(WorkerError::Unreachable(why.clone())));
                    }
                    outbox.flush();
                    publish(&stats, &running, &waiting, &pool);
                    backend = match recover(backend, &mut rebuild, &rx, &mut outbox, &why) {
                        Some(b) => b,
                        None => return,
                    };
                    on_device = backend.samples_on_device();
                    pool = BlockPool::new(backend.kv_geometry().1, limits.prefix_caching);
                    fair.reset();
                    stats.set_fault(None);
                    publish(&stats, &running, &waiting, &pool);
                    tracing::info!(
                        backend = backend.name(),
                        "engine rebuilt after a device fault; serving again"
                    );
                }
                continue;
            }
        };
        stats.steps.fetch_add(1, Ordering::Relaxed);
        // Prompts scored this step: their rows' log-probabilities, before any token drawn.
        let mut row = 0;
        for (&(i, n), b) in plan.items.iter().zip(&batch.seqs) {
            let rows = row..row + b.logits;
            score_prompt(&mut running[i], n, rows, &next, vocab, &tok, &mut outbox);
            row += b.logits;
        }
        // Each sampled sequence's row of the step's answer; every such token drawn at once.
        let mut rows: Vec<Option<usize>> = vec![None; running.len()];
        for (row, i) in row_seq.iter().enumerate() {
            if let Some(i) = *i {
                rows[i] = Some(row);
            }
        }
        let mut drawn = draw::draw(&mut running, &rows, &mut next, vocab, &tok, &mut json_vocab);
        let mut finished = Vec::new();
        for &(i, n) in &plan.items {
            let s = &mut running[i];
            s.computed += n;
            // The blocks this step filled join the prefix cache.
            let full = s.computed / limits.block_size;
            if full > s.registered {
                let done = &s.tokens[..s.computed];
                chain(
                    pool.hasher(),
                    &s.tenant,
                    done,
                    limits.block_size,
                    &mut s.hashes,
                );
                let bs = limits.block_size;
                for b in s.registered..full {
                    let after = b.checked_sub(1).map(|p| s.hashes[p]);
                    let tokens = &s.tokens[b * bs..(b + 1) * bs];
                    pool.register(s.blocks[b], s.hashes[b], after, tokens, &s.tenant);
                }
                s.registered = full;
            }
            if s.computed != s.tokens.len() {
                continue;
            }
            let Some((id, lp)) = drawn.get_mut(i).and_then(Option::take) else {
                continue;
            };
            s.take(id, lp, &tok);
            if let Some(reason) = emit(s, &tok, id, &mut outbox) {
                let tail = s.out.finish();
                let logprobs = std::mem::take(&mut s.pending_logprobs);
                if !tail.is_empty() || !logprobs.is_empty() {
                    s.send(
                        &mut outbox,
                        WorkerEvent::Delta {
                            text: tail,
                            tokens: 0,
                            logprobs,
                        },
                    );
                }
                let usage = s.usage();
                stats
                    .prompt_tokens
                    .fetch_add(usage.prompt_tokens as u64, Ordering::Relaxed);
                stats
                    .cached_tokens
                    .fetch_add(usage.cached_tokens as u64, Ordering::Relaxed);
                s.send(
                    &mut outbox,
                    WorkerEvent::Done {
                        finish_reason: reason,
                        usage,
                    },
                );
                finished.push(i);
            }
        }
        finished.sort_unstable_by(|a, b| b.cmp(a));
        for i in finished {
            let mut s = running.remove(i);
            pool.release(&mut s.blocks);
        }
        outbox.flush();
        publish(&stats, &running, &waiting, &pool);
        let total = t_loop.elapsed().as_nanos() as u64;
        stats.backend_ns.fetch_add(backend_ns, Ordering::Relaxed);
        stats
            .host_ns
            .fetch_add(total.saturating_sub(backend_ns), Ordering::Relaxed);
    }
}

/// Builds the engine's backend again (after a device fault).
type Rebuild = Box<dyn FnMut() -> Result<Box<dyn Backend>, String> + Send>;

/// After a device fault: drops the failed backend (its device memory and context with
/// it), then builds a new one until one passes its self-check, waiting 0.5 s, 1 s, 2 s, …
/// (at most 30 s) between tries. Requests that arrive meanwhile fail at once. `None` when
/// every submitter is gone.
fn recover(
    failed: Box<dyn Backend>,
    rebuild: &mut Rebuild,
    rx: &mpsc::Receiver<NewSeq>,
    outbox: &mut Outbox,
    why: &str,
) -> Option<Box<dyn Backend>> {
    // A library may panic tearing down after a device fault (cudarc unwraps
    // cublasDestroy's status): that must not end the engine thread.
    let teardown = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(failed)));
    if teardown.is_err() {
        tracing::error!("tearing down the failed backend panicked; building a new one anyway");
    }
    let mut wait = std::time::Duration::from_millis(500);
    for attempt in 1u32.. {
        match rebuild() {
            Ok(b) => return Some(b),
            Err(e) => {
                tracing::error!(attempt, error = %e, retry_in = ?wait, "rebuilding the engine's backend failed");
            }
        }
        let until = std::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(n) => {
                    outbox.push(&n.tx, Err(WorkerError::Unreachable(why.to_string())));
                    outbox.flush();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
        wait = (wait * 2).min(std::time::Duration::from_secs(30));
    }
    None
}

/// A step's result: the next tokens (sampled by the backend) or the logits to sample.
enum Next {
    /// Sampled on the device; the rows whose log-probabilities are asked for, and their
    /// logits.
    Tokens(Vec<u32>, Vec<usize>, Vec<f32>),
    Logits(Vec<f32>),
}

impl Next {
    /// Logits row `row` of the step, if the host has it.
    fn row(&self, row: usize, vocab: usize) -> Option<&[f32]> {
        match self {
            Next::Tokens(_, want, l) => read_back(want, l, row, vocab),
            Next::Logits(l) => l.get(row * vocab..(row + 1) * vocab),
        }
    }
}

/// Logits row `row` among `logits`, the rows `want` read back after sampling on the
/// device, if it is one of them.
fn read_back<'a>(want: &[usize], logits: &'a [f32], row: usize, vocab: usize) -> Option<&'a [f32]> {
    let at = want.iter().position(|&r| r == row)?;
    logits.get(at * vocab..(at + 1) * vocab)
}

/// A token's log-probabilities as the API reports them: token texts from their bytes, and
/// −9999 for an impossible token (JSON has no −∞; OpenAI reports the same).
fn logprob_item(tok: &Tokenizer, lp: &TokenLogprobs) -> TokenLogprob {
    let text = |id: u32| {
        let bytes = tok.token_bytes(id).to_vec();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    };
    let (token, bytes) = text(lp.id);
    TokenLogprob {
        token,
        bytes,
        logprob: lp.logprob.max(-9999.0),
        top_logprobs: lp
            .top
            .iter()
            .map(|&(id, logprob)| {
                let (token, bytes) = text(id);
                TopLogprob {
                    token,
                    bytes,
                    logprob: logprob.max(-9999.0),
                }
            })
            .collect(),
    }
}

/// Scores `s`'s prompt tokens from the step's logits rows `rows` (the last rows of its `n`
/// tokens computed this step, if it is being scored): each row's logits give the next
/// row's token its log-probability. Once every prompt token is scored, sends them
/// ([`WorkerEvent::Prompt`], the first unscored).
fn score_prompt(
    s: &mut Seq,
    n: usize,
    rows: std::ops::Range<usize>,
    next: &Next,
    vocab: usize,
    tok: &Tokenizer,
    outbox: &mut Outbox,
) {
    let Some(mut want) = s.prompt_next else {
        return;
    };
    let top = s.logprobs.unwrap_or(0) as usize;
    let end = s.computed + n;
    for (j, row) in rows.clone().enumerate() {
        // Row `row` is position p; it scores token p + 1.
        let target = end - rows.len() + j + 1;
        if target != want || target >= s.prompt_len {
            continue;
        }
        let Some(raw) = next.row(row, vocab) else {
            continue;
        };
        let lp = token_logprobs(raw, s.tokens[target], top);
        s.prompt_scored.push(logprob_item(tok, &lp));
        want += 1;
    }
    s.prompt_next = Some(want);
    if want < s.prompt_len {
        return;
    }
    s.prompt_next = None;
    let first = s.tokens[0];
    let bytes = tok.token_bytes(first).to_vec();
    let mut logprobs = vec![TokenLogprob {
        token: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
        logprob: f32::NAN,
        top_logprobs: Vec::new(),
    }];
    logprobs.append(&mut s.prompt_scored);
    s.send(
        outbox,
        WorkerEvent::Prompt {
            logprobs,
            text: None,
        },
    );
}

/// A sequence's sampling settings for the device sampler: greedy below the CPU sampler's
/// temperature cut, and the draw for its `generated()`-th token.
fn device_params(s: &Seq) -> SampleParams {
    let c = s.sampling;
    SampleParams {
        temperature: if c.temperature < 1e-5 {
            0.0
        } else {
            c.temperature
        },
        top_k: c.top_k.min(i32::MAX as usize) as i32,
        top_p: c.top_p,
        seed: s.seed,
        step: s.generated(),
    }
}

/// Sends the text of a sampled token; returns why the sequence ends, if it does.
fn emit(s: &mut Seq, tok: &Tokenizer, id: u32, outbox: &mut Outbox) -> Option<FinishReason> {
    if tok.stop_tokens.contains(&id) {
        return Some(FinishReason::Stop);
    }
    let e = s.out.push(tok, id);
    if e.stopped {
        // The token that completed a stop string: its text is not sent, nor its
        // log-probability.
        s.pending_logprobs.pop();
    }
    if !e.text.is_empty() {
        let logprobs = std::mem::take(&mut s.pending_logprobs);
        s.send(
            outbox,
            WorkerEvent::Delta {
                text: e.text,
                tokens: 1,
                logprobs,
            },
        );
    }
    if e.stopped {
        return Some(FinishReason::Stop);
    }
    (s.generated() >= s.max_tokens).then_some(FinishReason::Length)
}

fn publish(stats: &EngineStats, running: &[Seq], waiting: &VecDeque<Seq>, pool: &BlockPool) {
    stats.running.store(running.len() as u64, Ordering::Relaxed);
    stats.waiting.store(waiting.len() as u64, Ordering::Relaxed);
    stats
        .kv_blocks_used
        .store((pool.total() - pool.free_count()) as u64, Ordering::Relaxed);
    stats
        .kv_blocks_cached
        .store(pool.cached_count() as u64, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequence_costs_prompt_tokens_at_one_and_generated_ones_at_output_weight() {
        let (tx, _rx) = tmpsc::unbounded_channel();
        let mut s = admit(NewSeq {
            tenant: "t".into(),
            weight: 1.0,
            output_weight: 3.0,
            prompt: vec![1; 10],
            max_tokens: 8,
            sampling: SamplingConfig {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
            },
            seed: 0,
            stop: vec![],
            logprobs: None,
            prompt_logprobs: false,
            penalties: None,
            json: None,
            tx,
        });
        assert_eq!(s.token_cost(4), 4.0, "a prefill chunk");
        s.computed = 8;
        s.tokens.extend([5, 6]); // two generated tokens, not yet computed
        assert_eq!(
            s.token_cost(4),
            2.0 + 2.0 * 3.0,
            "the prompt's end and two generated"
        );
        s.computed = 11;
        assert_eq!(s.token_cost(1), 3.0, "a decode");
    }
}
