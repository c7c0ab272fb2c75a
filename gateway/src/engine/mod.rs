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
//! A step the device fails ([`kernels::forward::StepError::Device`]) takes the engine out of service: its
//! sequences fail, its probe fails and it refuses new work while it builds its backend
//! again (the failed one dropped first, then a fresh one until one passes its self-check).
//!
//! Here: the worker (tokenizing, handing requests to the thread) and its counters. The
//! thread's loop is [`run`]; steps sent without waiting and collected, [`flight`]; a
//! sequence's state and what it sends, [`seq`]; drawing the step's tokens, [`draw`];
//! a prompt's scored tokens and embedding, [`prompts`]; a device fault and the backend
//! built again, [`recover`]; building the backend, [`factory`].

mod bad_words;
pub mod blocks;
mod draw;
mod factory;
pub mod fair;
pub(super) mod flight;
pub mod kv_pools;
pub mod outbox;
pub mod output;
mod prediction;
mod prompts;
pub mod reasoning;
mod recover;
mod run;
pub mod scheduler;
mod seq;
mod speculate;

use crate::config::{BackendKind, EngineConfig};
use crate::worker::{
    EngineCounters, EventStream, Load, OutputFormat, Prompt, Worker, WorkerError, WorkerRequest,
};
use factory::Factory;
use futures::future::BoxFuture;
use futures::FutureExt;
use kernels::chat::{ChatTemplate, Message};
use kernels::load::Loaded;
use kernels::model::Pooling;
use kernels::sampler::{Penalties, SamplingConfig};
use kernels::tokenizer::Tokenizer;
use outbox::{Events, Outbox};
use run::run_engine;
use scheduler::Limits;
use seq::NewSeq;
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
    /// The windowed layers' own pool ([`kv_pools`]): blocks held, and in all (0: none).
    pub kv_window_blocks_used: AtomicU64,
    pub kv_window_blocks_total: AtomicU64,
    pub steps: AtomicU64,
    /// Steps sent while the step before was still running (planned ahead).
    pub steps_ahead: AtomicU64,
    pub preemptions: AtomicU64,
    /// Lowest-weight running sequences held out of a step beside interactive ones, summed
    /// over steps (`lowest_weight_rows`).
    pub rows_held: AtomicU64,
    /// GPU path: rows adjusted on the device before their draw, and rows whose logits
    /// were read back (their adjustments past a step's room: drawn again on the host).
    pub rows_adjusted_on_device: AtomicU64,
    pub rows_read_back: AtomicU64,
    /// GPU path: rows whose log-probabilities were computed on the device (a few words
    /// read back instead of a row of logits).
    pub rows_scored_on_device: AtomicU64,
    /// Speculative decoding ([`speculate`]): tokens proposed, and those of them the
    /// sequences' own draws kept.
    pub draft_tokens: AtomicU64,
    pub draft_tokens_accepted: AtomicU64,
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

    /// A finished sequence's prompt tokens, and those of them from the prefix cache.
    pub(super) fn count_prompt(&self, usage: &crate::worker::Usage) {
        self.prompt_tokens
            .fetch_add(usage.prompt_tokens as u64, Ordering::Relaxed);
        self.cached_tokens
            .fetch_add(usage.cached_tokens as u64, Ordering::Relaxed);
    }

    fn set_fault(&self, why: Option<String>) {
        if let Ok(mut f) = self.fault.lock() {
            *f = why;
        }
    }
}

/// The in-process engine worker.
pub struct EngineWorker {
    name: String,
    tx: mpsc::Sender<NewSeq>,
    tokenizer: Arc<Tokenizer>,
    template: Arc<ChatTemplate>,
    max_context: usize,
    /// How the model's file says its embeddings are made: the engine makes the last
    /// token's, and refuses embeddings where the file asks for another.
    pooling: Pooling,
    /// A reasoning model's `<think>` markers: a chat's thinking is sent apart from its
    /// answer ([`reasoning`]).
    markers: Option<reasoning::Markers>,
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
        let pooling = loaded.model.config.pooling;
        if pooling != Pooling::Last {
            tracing::warn!(
                worker = %name,
                pooling = %pooling,
                "the model's file asks for {pooling} embeddings; the engine makes last-token \
                 ones only, so it refuses embeddings requests (generation is unaffected)"
            );
        }
        let markers = reasoning::Markers::of(&loaded.tokenizer);
        if markers.is_some() {
            tracing::info!(worker = %name, "a reasoning model: chats' thinking is sent as reasoning, apart from the answer");
        }
        let model_ctx = loaded.model.config.context_len;
        let max_context = model_ctx.min(bs * n_blocks);
        let stats = Arc::new(EngineStats::default());
        stats
            .kv_blocks_total
            .store(n_blocks as u64, Ordering::Relaxed);
        stats.alive.store(true, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let overlap = cfg.overlap_steps;
        let limits = Limits {
            max_batch_tokens: sizes.max_batch_tokens,
            max_seqs: sizes.max_seqs,
            block_size: bs,
            prefix_caching: cfg.prefix_caching,
            // The backend's, each step (see `run_engine`).
            max_logit_rows: usize::MAX,
            preempt: true,
            lowest_rows: sizes.lowest_rows,
            speculate: cfg.speculative_tokens,
            predict: cfg.prediction_tokens,
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
                run_engine(
                    backend,
                    Box::new(rebuild),
                    tok,
                    rx,
                    limits,
                    st,
                    outbox,
                    overlap,
                );
            })
            .map_err(|e| e.to_string())?;
        Ok(Self {
            name,
            tx,
            tokenizer: loaded.tokenizer.clone(),
            template: loaded.template.clone(),
            max_context,
            pooling,
            markers,
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
            code: None,
            param: None,
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
            Prompt::Chat(msgs, args) => {
                let m: Vec<Message> = msgs
                    .iter()
                    .map(|m| Message {
                        role: &m.role,
                        content: &m.content,
                    })
                    .collect();
                let rendered = match msgs.last().is_some_and(|m| m.open) {
                    true => self.template.render_continuing(&m, args.as_deref()),
                    false => self.template.render_with(&m, args.as_deref()),
                };
                rendered.map_err(|e| reject(format!("cannot apply the chat template: {e}")))?
            }
        };
        self.tokenizer
            .encode_prompt(&text)
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
            code: None,
            param: None,
        };
        // A 400 that names the field at fault.
        let refuse = |field: &str, message: String| WorkerError::Rejected {
            status: 400,
            message,
            code: None,
            param: Some(field.into()),
        };
        crate::worker::one_plain_input(req)?;
        if req.embed && self.pooling != Pooling::Last {
            return Err(reject(format!(
                "This model's file asks for {} embeddings (`llama.pooling_type`); this \
                 engine makes the last token's only.",
                self.pooling
            )));
        }
        // Ids the gateway made with this model's tokenizer (`tokenize_prompt`), checked
        // there.
        let mut prompt = match &req.prompt_ids {
            Some(ids) => ids.to_vec(),
            None => self.prompt_ids(&req.prompt)?,
        };
        // Cut at the gateway already where it tokenized: the same cut again changes nothing.
        if let Some(keep) = req.params.truncate_prompt_tokens {
            crate::worker::keep_last(&mut prompt, keep, Some(self.max_context));
        }
        if prompt.is_empty() {
            return Err(reject("The prompt is empty.".into()));
        }
        let vocab = self.tokenizer.vocab_size();
        if let Some(&(id, _)) = req.params.logit_bias.iter().find(|b| b.0 as usize >= vocab) {
            return Err(refuse(
                "logit_bias",
                format!(
                    "`logit_bias` names token {id}; this model's vocabulary has {vocab} tokens."
                ),
            ));
        }
        let named = [
            ("stop_token_ids", &req.params.stop_token_ids),
            ("allowed_token_ids", &req.params.allowed_token_ids),
        ];
        for (field, ids) in named {
            if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(refuse(
                    field,
                    format!(
                        "`{field}` names token {id}; this model's vocabulary has {vocab} tokens."
                    ),
                ));
            }
        }
        let need = prompt.len() + req.params.max_tokens as usize;
        let too_long = |message: String| WorkerError::Rejected {
            status: 400,
            message,
            code: Some(crate::worker::CONTEXT_LENGTH_EXCEEDED),
            param: None,
        };
        if req.embed && need > self.max_context {
            return Err(too_long(format!(
                "This model's maximum context length is {} tokens; the input has {} tokens.",
                self.max_context,
                prompt.len()
            )));
        }
        if need > self.max_context {
            return Err(too_long(format!(
                "This model's maximum context length is {} tokens; the prompt has {} tokens and max_tokens is {}.",
                self.max_context,
                prompt.len(),
                req.params.max_tokens
            )));
        }
        let p = &req.params;
        // `echo` with `logprobs` scores the prompt with `logprobs` alternatives.
        let echo_top = p.prompt_logprobs.then_some(p.logprobs).flatten();
        let weight = req.weight.unwrap_or(1.0);
        // Chats only: a completion's text is the model's as it comes.
        let reasoning = self
            .markers
            .filter(|_| matches!(req.prompt, Prompt::Chat(..)) && !req.embed)
            .map(|m| reasoning::Reasoning::after_prompt(m, &prompt));
        // The answer is at most `max_tokens` long: a prediction's tokens past the context
        // are never reached.
        let prediction = match p.prediction.as_deref() {
            Some(text) if !req.embed => {
                let mut ids = self.tokenizer.encode(text).map_err(|e| {
                    refuse("prediction", format!("cannot tokenize `prediction`: {e}"))
                })?;
                ids.truncate(self.max_context);
                Some(ids).filter(|ids| !ids.is_empty())
            }
            _ => None,
        };
        let bad_words = bad_words::BadWords::new(&p.bad_words, &self.tokenizer)
            .map_err(|e| refuse("bad_words", format!("cannot tokenize `bad_words`: {e}")))?
            .map(Arc::new);
        Ok(NewSeq {
            tenant: req.tenant.clone(),
            share: fair::account(&req.tenant, weight),
            weight,
            output_weight: req.output_weight,
            prompt,
            max_tokens: p.max_tokens,
            sampling: SamplingConfig {
                min_p: p.min_p,
                temperature: p.temperature,
                top_p: if p.top_p <= 0.0 { 1e-6 } else { p.top_p },
                top_k: p.top_k as usize,
            },
            seed: p.seed.unwrap_or_else(rand::random),
            stop: p.stop.clone(),
            keep_stop: p.include_stop_str_in_output,
            skip_special: p.skip_special_tokens,
            logprobs: p.logprobs,
            // Scored for `echo` with `logprobs`, for vLLM's `prompt_logprobs`, or both
            // (as many alternatives as the larger asks: `None` is the least).
            prompt_logprobs: echo_top.max(p.prompt_top),
            echo_scored: echo_top.is_some(),
            penalties: Some(Penalties {
                presence: p.presence_penalty,
                frequency: p.frequency_penalty,
                bias: p.logit_bias.clone(),
                repetition: p.repetition_penalty,
            })
            .filter(|p| !p.is_empty()),
            grammar: p.format.as_ref().map(OutputFormat::grammar),
            embed: req.embed,
            reasoning,
            prediction,
            ends: seq::Ends {
                ignore_eos: p.ignore_eos,
                min_tokens: p.min_tokens,
                stop_ids: p.stop_token_ids.clone(),
            },
            allowed: (!p.allowed_token_ids.is_empty()).then(|| {
                kernels::adjust::bitmask(&p.allowed_token_ids, self.tokenizer.vocab_size()).into()
            }),
            bad_words,
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

    fn max_context(&self) -> Option<usize> {
        Some(self.max_context)
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
            rows_held: s.rows_held.load(Ordering::Relaxed),
            rows_adjusted_on_device: s.rows_adjusted_on_device.load(Ordering::Relaxed),
            rows_read_back: s.rows_read_back.load(Ordering::Relaxed),
            rows_scored_on_device: s.rows_scored_on_device.load(Ordering::Relaxed),
            draft_tokens: s.draft_tokens.load(Ordering::Relaxed),
            draft_tokens_accepted: s.draft_tokens_accepted.load(Ordering::Relaxed),
            device_faults: s.faults.load(Ordering::Relaxed),
            prompt_tokens: s.prompt_tokens.load(Ordering::Relaxed),
            cached_tokens: s.cached_tokens.load(Ordering::Relaxed),
            kv_blocks_cached: s.kv_blocks_cached.load(Ordering::Relaxed),
            kv_window_blocks_used: s.kv_window_blocks_used.load(Ordering::Relaxed),
            kv_window_blocks_total: s.kv_window_blocks_total.load(Ordering::Relaxed),
            backend_seconds: secs(&s.backend_ns),
            host_seconds: secs(&s.host_ns),
        })
    }
}
