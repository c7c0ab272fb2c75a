//! The simulated GPU worker: a latency model, not a language model.
//!
//! It exists so that the gateway, its router and `loadtest` can run fleets of thousands of
//! GPUs on one machine (as llm-d's inference simulator is used). It reproduces what a
//! continuously batching engine looks like from outside:
//!
//! - admission: at most `max_batch` running sequences, and `prompt + max_tokens` reserved
//!   out of `kv_tokens` of KV cache; others wait inside the worker in FIFO order (`queued`);
//! - time to first token: `prompt_tokens / prefill_tokens_per_s` after admission;
//! - each later token after one decode step of `decode_step_ms + decode_step_ms_per_seq ×
//!   running` milliseconds;
//! - output: deterministic filler words, one "token" each, chosen from a hash of the prompt
//!   and `seed`; the natural length lies in `[min_output_tokens, max_output_tokens]`
//!   (finish `stop`; at least the request's `min_tokens`, and none with `ignore_eos`), cut
//!   by `max_tokens` (finish `length`) or a `stop` string.
//!
//! Prompt tokens are estimated as one per 4 bytes of prompt text (at least 1). An
//! embeddings request is answered after its prefill time with a unit vector of
//! [`SIM_EMBEDDING_DIM`] numbers from the prompt's hash (the same prompt, the same vector).

use super::{
    estimate_prompt_tokens, EventStream, FinishReason, Load, Prompt, Usage, Worker, WorkerError,
    WorkerEvent, WorkerRequest,
};
use crate::config::SimConfig;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const WORDS: &[&str] = &[
    "the",
    "gateway",
    "routes",
    "tokens",
    "to",
    "a",
    "worker",
    "that",
    "batches",
    "many",
    "sequences",
    "on",
    "one",
    "GPU",
    "and",
    "each",
    "tenant",
    "gets",
    "what",
    "it",
    "bought",
    "simulated",
    "decode",
    "step",
    "prefill",
    "cache",
    "block",
    "fair",
    "share",
    "of",
    "capacity",
    "while",
    "latency",
    "stays",
    "low",
    "under",
    "load",
    "with",
    "streams",
    "in",
    "flight",
    "across",
    "fleet",
    "model",
    "weights",
    "are",
    "read",
    "once",
    "per",
];

/// A simulated GPU worker.
pub struct SimWorker {
    name: String,
    cfg: SimConfig,
    batch: Arc<Semaphore>,
    kv: Arc<Semaphore>,
    running: Arc<AtomicU64>,
    queued: Arc<AtomicU64>,
}

impl SimWorker {
    pub fn new(name: String, cfg: SimConfig) -> Self {
        let kv_permits = cfg.kv_tokens.min(Semaphore::MAX_PERMITS);
        Self {
            name,
            batch: Arc::new(Semaphore::new(cfg.max_batch)),
            kv: Arc::new(Semaphore::new(kv_permits)),
            running: Arc::new(AtomicU64::new(0)),
            queued: Arc::new(AtomicU64::new(0)),
            cfg,
        }
    }
}

/// The size of a simulated embedding.
pub const SIM_EMBEDDING_DIM: usize = 256;

fn prompt_hash(req: &WorkerRequest) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match &req.prompt {
        Prompt::Text(t) => t.hash(&mut h),
        Prompt::Tokens(ids) => ids.hash(&mut h),
        Prompt::Chat(msgs, _) => {
            for m in msgs {
                m.role.hash(&mut h);
                m.content.hash(&mut h);
            }
        }
    }
    req.params.seed.hash(&mut h);
    h.finish()
}

/// splitmix64: a small, good, deterministic generator for the filler text.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Running-sequence bookkeeping that undoes itself on drop (finish or cancel).
struct Admitted {
    _batch: OwnedSemaphorePermit,
    _kv: OwnedSemaphorePermit,
    running: Arc<AtomicU64>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.running.fetch_sub(1, Ordering::Relaxed);
    }
}

struct QueuedGuard(Arc<AtomicU64>);
impl Drop for QueuedGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Gen {
    req: Arc<WorkerRequest>,
    cfg: SimConfig,
    running: Arc<AtomicU64>,
    _admitted: Admitted,
    rng: u64,
    natural_len: u32,
    produced: u32,
    text: String,
    prompt_tokens: u32,
    /// A `Done` held back behind the last delta.
    pending: Option<WorkerEvent>,
    finished: bool,
}

impl Gen {
    fn step_delay(&self) -> Duration {
        let b = self.running.load(Ordering::Relaxed) as f64;
        let ms = self.cfg.decode_step_ms + self.cfg.decode_step_ms_per_seq * b;
        Duration::from_secs_f64(ms / 1000.0)
    }

    fn done(&mut self, finish_reason: FinishReason) -> WorkerEvent {
        self.finished = true;
        WorkerEvent::Done {
            finish_reason,
            usage: Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.produced,
                ..Usage::default()
            },
        }
    }

    /// Produces the next event, or `None` after `Done`.
    fn next_event(&mut self) -> Option<WorkerEvent> {
        if let Some(ev) = self.pending.take() {
            return Some(ev);
        }
        if self.finished {
            return None;
        }
        if self.req.embed {
            // A vector of the prompt's hash, then the end: nothing is generated.
            let v = (0..SIM_EMBEDDING_DIM)
                .map(|_| (splitmix(&mut self.rng) >> 11) as f32 / (1u64 << 53) as f32 - 0.5)
                .collect();
            self.pending = Some(self.done(FinishReason::Stop));
            return Some(WorkerEvent::Embedding(crate::api::embeddings::normalized(
                v,
            )));
        }
        if self.produced >= self.natural_len && self.natural_len < self.req.params.max_tokens {
            return Some(self.done(FinishReason::Stop));
        }
        if self.produced >= self.req.params.max_tokens {
            return Some(self.done(FinishReason::Length));
        }
        let word = WORDS[(splitmix(&mut self.rng) % WORDS.len() as u64) as usize];
        let before = self.text.len();
        if self.produced > 0 {
            self.text.push(' ');
        }
        self.text.push_str(word);
        self.produced += 1;
        // A stop string is matched across piece boundaries; text from its start is dropped.
        let from = before.saturating_sub(
            self.req
                .params
                .stop
                .iter()
                .map(|s| s.len())
                .max()
                .unwrap_or(0),
        );
        let cut = self
            .req
            .params
            .stop
            .iter()
            .filter_map(|stop| self.text[from..].find(stop.as_str()).map(|p| from + p))
            .min();
        if let Some(cut) = cut {
            let emit = self.text[before.min(cut)..cut].to_string();
            self.text.truncate(cut);
            let done = self.done(FinishReason::Stop);
            if emit.is_empty() {
                return Some(done);
            }
            self.pending = Some(done);
            return Some(WorkerEvent::Delta {
                text: emit,
                tokens: 1,
                logprobs: Vec::new(),
                reasoning: false,
            });
        }
        Some(WorkerEvent::Delta {
            text: self.text[before..].to_string(),
            tokens: 1,
            logprobs: Vec::new(),
            reasoning: false,
        })
    }
}

impl Worker for SimWorker {
    fn name(&self) -> &str {
        &self.name
    }

    fn submit(
        &self,
        req: Arc<WorkerRequest>,
    ) -> BoxFuture<'static, Result<EventStream, WorkerError>> {
        let cfg = self.cfg.clone();
        let batch = self.batch.clone();
        let kv = self.kv.clone();
        let running = self.running.clone();
        let queued = self.queued.clone();
        async move {
            super::one_plain_input(&req)?;
            super::no_prompt_logprobs(&req, "simulated")?;
            if req.params.logprobs.is_some() || req.params.format.is_some() {
                // Its text is made up: it has no distribution to report or constrain.
                let what = if req.params.format.is_some() {
                    "JSON mode, structured output or a regular expression (`response_format`, `guided_*`)"
                } else {
                    "log-probabilities (`logprobs`, or `best_of` past `n`, which ranks by them)"
                };
                return Err(WorkerError::Rejected {
                    status: 400,
                    message: format!("this pool's workers are simulated: no {what}"),
                    code: None,
                    param: None,
                });
            }
            let prompt_tokens = estimate_prompt_tokens(&req.prompt);
            let need = prompt_tokens as usize + req.params.max_tokens as usize;
            if need > cfg.kv_tokens.min(Semaphore::MAX_PERMITS) {
                return Err(WorkerError::Rejected {
                    status: 400,
                    message: format!(
                        "prompt ({prompt_tokens} tokens) plus max_tokens ({}) exceeds the model's context of {} tokens",
                        req.params.max_tokens, cfg.kv_tokens
                    ),
                    code: Some(super::CONTEXT_LENGTH_EXCEEDED),
                    param: None,
                });
            }
            queued.fetch_add(1, Ordering::Relaxed);
            let q = QueuedGuard(queued);
            let closed = |_| WorkerError::Unreachable("simulated worker shut down".into());
            let batch_permit = batch.acquire_owned().await.map_err(closed)?;
            let kv_permit = kv.acquire_many_owned(need as u32).await.map_err(closed)?;
            drop(q);
            running.fetch_add(1, Ordering::Relaxed);
            let admitted = Admitted {
                _batch: batch_permit,
                _kv: kv_permit,
                running: running.clone(),
            };
            let mut rng = prompt_hash(&req);
            let span = (cfg.max_output_tokens - cfg.min_output_tokens) as u64 + 1;
            // `ignore_eos`: no natural end (only `max_tokens` or a stop string); `min_tokens`:
            // none before it.
            let natural_len = match req.params.ignore_eos {
                true => u32::MAX,
                false => (cfg.min_output_tokens + (splitmix(&mut rng) % span) as u32)
                    .max(req.params.min_tokens),
            };
            let prefill = if cfg.prefill_tokens_per_s > 0.0 {
                Duration::from_secs_f64(prompt_tokens as f64 / cfg.prefill_tokens_per_s)
            } else {
                Duration::ZERO
            };
            let gen = Gen {
                req,
                cfg,
                running,
                _admitted: admitted,
                rng,
                natural_len,
                produced: 0,
                text: String::new(),
                prompt_tokens,
                pending: None,
                finished: false,
            };
            let stream = futures::stream::unfold((gen, Some(prefill)), |(mut g, first)| async move {
                let delay = first.unwrap_or_else(|| g.step_delay());
                let ev = g.next_event()?;
                let timed = matches!(ev, WorkerEvent::Delta { .. } | WorkerEvent::Embedding(_));
                if timed && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Some((Ok(ev), (g, None)))
            });
            Ok(stream.boxed())
        }
        .boxed()
    }

    fn load(&self) -> Load {
        Load {
            running: self.running.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            kv_blocks: None,
        }
    }

    fn probe(&self) -> BoxFuture<'static, Result<(), WorkerError>> {
        futures::future::ready(Ok(())).boxed()
    }

    fn max_concurrency(&self) -> usize {
        self.cfg.max_concurrency
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::SamplingParams;

    fn req(prompt: &str, max_tokens: u32, stop: Vec<String>) -> Arc<WorkerRequest> {
        Arc::new(WorkerRequest {
            request_id: "r".into(),
            tenant: "t".into(),
            weight: None,
            output_weight: 3.0,
            model: "m".into(),
            prompt: Prompt::Text(prompt.into()),
            prompt_ids: None,
            params: SamplingParams {
                temperature: 1.0,
                stop,
                ..SamplingParams::greedy(max_tokens)
            },
            stream: true,
            embed: false,
            more_inputs: Vec::new(),
            dimensions: None,
        })
    }

    fn fast() -> SimConfig {
        SimConfig {
            prefill_tokens_per_s: 0.0,
            decode_step_ms: 0.0,
            decode_step_ms_per_seq: 0.0,
            min_output_tokens: 8,
            max_output_tokens: 8,
            ..SimConfig::default()
        }
    }

    async fn collect(w: &SimWorker, r: Arc<WorkerRequest>) -> (String, WorkerEvent) {
        let mut s = w.submit(r).await.unwrap();
        let mut text = String::new();
        while let Some(ev) = s.next().await {
            match ev.unwrap() {
                WorkerEvent::Delta { text: t, .. } => text.push_str(&t),
                done => return (text, done),
            }
        }
        panic!("stream ended without Done");
    }

    #[tokio::test]
    async fn deterministic_lengths_and_finish_reasons() {
        let w = SimWorker::new("s".into(), fast());
        let (a, da) = collect(&w, req("hello", 100, vec![])).await;
        let (b, _) = collect(&w, req("hello", 100, vec![])).await;
        assert_eq!(a, b, "same prompt, same text");
        assert_eq!(a.split(' ').count(), 8);
        assert!(
            matches!(da, WorkerEvent::Done { finish_reason: FinishReason::Stop, usage } if usage.completion_tokens == 8 && usage.prompt_tokens == 2)
        );
        let (c, dc) = collect(&w, req("hello", 3, vec![])).await;
        assert_eq!(c.split(' ').count(), 3);
        assert!(a.starts_with(&c));
        assert!(matches!(
            dc,
            WorkerEvent::Done {
                finish_reason: FinishReason::Length,
                ..
            }
        ));
        // A stop string cuts the text before it.
        let third = a.split(' ').nth(2).unwrap().to_string();
        let stop = format!(" {third}");
        let (d, dd) = collect(&w, req("hello", 100, vec![stop.clone()])).await;
        assert_eq!(d, &a[..a.find(&stop).unwrap()]);
        assert!(matches!(
            dd,
            WorkerEvent::Done {
                finish_reason: FinishReason::Stop,
                ..
            }
        ));
        assert_eq!(w.load().running, 0, "finished sequences leave the batch");
    }

    #[tokio::test]
    async fn kv_and_batch_limits_queue_and_cancel_frees() {
        let cfg = SimConfig {
            max_batch: 1,
            ..fast()
        };
        let w = Arc::new(SimWorker::new("s".into(), cfg));
        let s1 = w.submit(req("a", 10, vec![])).await.unwrap();
        assert_eq!(w.load().running, 1);
        let w2 = w.clone();
        let pending =
            tokio::spawn(async move { w2.submit(req("b", 10, vec![])).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(w.load().queued, 1, "second request waits for a batch slot");
        drop(s1); // cancel frees the slot
        pending.await.unwrap().unwrap();
        assert_eq!(w.load().queued, 0);
        let too_big = w.submit(req("a", 10_000_000, vec![])).await;
        assert!(matches!(
            too_big,
            Err(WorkerError::Rejected { status: 400, .. })
        ));
    }
}
