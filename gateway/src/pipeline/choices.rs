//! A routed request's choices, from their workers' events to the client: gathered into
//! one JSON body (the best `n` of `best_of`, usage counted once per prompt), or sent as
//! SSE frames as the client reads them; the concurrency slot and the worker leases live
//! here until the last choice ends or the client goes.

use super::{apart_if, broke};
use crate::api::error::ApiError;
use crate::api::render::{ChoiceOut, Renderer};
use crate::limits::ConcurrencySlot;
use crate::metrics::Meter;
use crate::route::Lease;
use crate::worker::{EventStream, WorkerEvent};
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures::StreamExt;
use tokio::time::Instant as TokioInstant;
use tracing::Instrument;

/// Whole answers of about this many bytes of JSON or more are rendered on the runtime's
/// blocking threads (a megabyte takes a millisecond or more: `n` long choices, or
/// log-probabilities with alternatives for every token).
const RENDER_APART_BYTES: usize = 1 << 20;

/// One choice of a routed request: its worker's events, and what it has produced.
pub(super) struct Choice {
    pub(super) lease: Lease,
    pub(super) events: EventStream,
    pub(super) first: Option<WorkerEvent>,
    /// Which of the request's prompts it completes, and that prompt's `echo` (`None` with
    /// `echo` where the worker echoes it: [`WorkerEvent::Prompt`]'s text).
    pub(super) prompt: usize,
    pub(super) echo: Option<String>,
    pub(super) text: String,
    /// A reasoning model's thinking, apart from its answer `text`.
    pub(super) reasoning: String,
    pub(super) logprobs: Vec<crate::worker::TokenLogprob>,
    /// Its completion tokens' log-probabilities added up, and how many (`best_of`).
    pub(super) score: (f64, u32),
    /// How it finished, once it has.
    pub(super) done: Option<(crate::worker::FinishReason, crate::worker::Usage)>,
    /// An embeddings request's answer.
    pub(super) embedding: Vec<f32>,
    /// vLLM's `prompt_logprobs`, rendered, once the worker scored the prompt.
    pub(super) prompt_logprobs: Option<serde_json::Value>,
}

/// Stores a finished `/v1/responses` answer when it is to be stored (through the store's
/// writer thread, committed with others); a failure is logged, and the answer still goes
/// out.
async fn store_answer(renderer: &mut Renderer) {
    let Some((saver, answer)) = renderer.take_stored() else {
        return;
    };
    if let Err(e) = saver.store.save(answer).await {
        tracing::error!(error = %e, "storing the response failed");
    }
}

/// A routed request's remaining life: its choices' events, rendered.
pub(super) struct SseStream {
    pub(super) renderer: Renderer,
    pub(super) choices: Vec<Choice>,
    pub(super) _concurrency_slot: ConcurrencySlot,
    pub(super) deadline: TokioInstant,
    /// `echo` with `logprobs`: streamed, the prompt goes out with its tokens'
    /// log-probabilities when the worker sends them ([`WorkerEvent::Prompt`]).
    pub(super) prompt_logprobs: bool,
    /// With it, the alternatives each of the prompt's tokens shows (`logprobs`); vLLM's
    /// `prompt_logprobs`, where asked (the worker scores the prompt with the larger).
    pub(super) echo_top: usize,
    pub(super) prompt_top: Option<u8>,
    /// Choices returned per prompt (`n`); the others (`best_of` past `n`) are dropped
    /// once all have ended (whole answers only).
    pub(super) keep: usize,
}

enum Step {
    /// Choice `usize`'s next event.
    Event(usize, WorkerEvent),
    Failed(ApiError),
}

/// The choices to return: of each prompt's (consecutive, as routed), the `keep` with the
/// highest mean log-probability per completion token, best first (ties: the earlier
/// choice); all of them, in order, when each prompt has no more than `keep`.
fn best(choices: &[Choice], keep: usize) -> impl Iterator<Item = &Choice> {
    let mean = |c: &Choice| match c.score.1 {
        0 => 0.0,
        k => c.score.0 / k as f64,
    };
    let mut picked = Vec::with_capacity(choices.len());
    for group in choices.chunk_by(|a, b| a.prompt == b.prompt) {
        let mut order: Vec<&Choice> = group.iter().collect();
        if order.len() > keep {
            order.sort_by(|a, b| mean(b).total_cmp(&mean(a)));
            order.truncate(keep);
        }
        picked.extend(order);
    }
    picked.into_iter()
}

/// The usage of a request's choices together: each prompt once (each of its choices'
/// sequences computed it, possibly from the prefix cache; the least cached counts), the
/// completions added up.
fn total_usage(choices: &[Choice]) -> crate::worker::Usage {
    // Per prompt: its prompt tokens and the fewest of them cached.
    let mut prompts: Vec<Option<(u32, u32)>> = Vec::new();
    let mut sum = crate::worker::Usage::default();
    for c in choices {
        let Some((_, u)) = c.done else { continue };
        sum.completion_tokens += u.completion_tokens;
        sum.reasoning_tokens += u.reasoning_tokens;
        sum.accepted_prediction_tokens += u.accepted_prediction_tokens;
        sum.rejected_prediction_tokens += u.rejected_prediction_tokens;
        if prompts.len() <= c.prompt {
            prompts.resize(c.prompt + 1, None);
        }
        let (p, cached) = prompts[c.prompt].get_or_insert((u.prompt_tokens, u.cached_tokens));
        *p = (*p).max(u.prompt_tokens);
        *cached = (*cached).min(u.cached_tokens);
    }
    let prompts = prompts.iter().flatten();
    crate::worker::Usage {
        prompt_tokens: prompts.clone().map(|p| p.0).sum(),
        cached_tokens: prompts.map(|p| p.1).sum(),
        ..sum
    }
}

impl SseStream {
    /// The next event of any unfinished choice (first events first, in choice order).
    async fn next_step(&mut self) -> Step {
        for (i, c) in self.choices.iter_mut().enumerate() {
            if let Some(ev) = c.first.take() {
                return Step::Event(i, ev);
            }
        }
        let next = if self.choices.len() == 1 {
            let e = &mut self.choices[0].events;
            tokio::time::timeout_at(self.deadline, async { (0, e.next().await) }).await
        } else {
            let pending = self
                .choices
                .iter_mut()
                .enumerate()
                .filter(|(_, c)| c.done.is_none())
                .map(|(i, c)| Box::pin(async move { (i, c.events.next().await) }));
            tokio::time::timeout_at(self.deadline, futures::future::select_all(pending))
                .await
                .map(|(got, _, _)| got)
        };
        let (i, ev) = match next {
            Err(_) => return Step::Failed(ApiError::Timeout),
            Ok(got) => got,
        };
        match ev {
            Some(Ok(ev)) => Step::Event(i, ev),
            Some(Err(e)) => Step::Failed(broke(&mut self.choices[i].lease, Some(e))),
            None => Step::Failed(broke(&mut self.choices[i].lease, None)),
        }
    }

    /// Takes choice `i`'s end; true once every choice has ended.
    fn finish(
        &mut self,
        i: usize,
        finish: crate::worker::FinishReason,
        usage: crate::worker::Usage,
    ) -> bool {
        let c = &mut self.choices[i];
        c.lease.success();
        c.done = Some((finish, usage));
        self.choices.iter().all(|c| c.done.is_some())
    }

    /// The whole answer's JSON body (the best `keep` choices of each prompt).
    fn render(&mut self, usage: crate::worker::Usage) -> bytes::Bytes {
        let out: Vec<ChoiceOut<'_>> = best(&self.choices, self.keep)
            .map(|c| ChoiceOut {
                text: &c.text,
                reasoning: &c.reasoning,
                logprobs: &c.logprobs,
                finish: c.done.map_or(crate::worker::FinishReason::Stop, |d| d.0),
                embedding: &c.embedding,
                prompt_logprobs: c.prompt_logprobs.as_ref(),
            })
            .collect();
        self.renderer.full(&out, usage)
    }

    /// About how many bytes of JSON the whole answer takes: its texts, and ~100 for each
    /// token's log-probability and for each alternative's.
    fn answer_bytes(&self) -> usize {
        self.choices
            .iter()
            .map(|c| {
                let scored: usize = c.logprobs.iter().map(|t| 1 + t.top_logprobs.len()).sum();
                c.text.len() + c.reasoning.len() + 100 * scored
            })
            .sum()
    }

    /// Non-streamed: gather the whole answer, then one JSON body (rendered on the
    /// runtime's blocking threads when it is large: [`RENDER_APART_BYTES`]).
    pub(super) async fn collect(mut self, meter: &mut Meter) -> Result<Response, ApiError> {
        for c in &mut self.choices {
            c.text = c.echo.clone().unwrap_or_default();
        }
        loop {
            match self.next_step().await {
                Step::Event(
                    i,
                    WorkerEvent::Delta {
                        text,
                        tokens,
                        logprobs,
                        reasoning,
                    },
                ) => {
                    meter.tokens(tokens);
                    let c = &mut self.choices[i];
                    match reasoning {
                        true => c.reasoning.push_str(&text),
                        false => c.text.push_str(&text),
                    }
                    for t in logprobs.iter().filter(|t| t.logprob.is_finite()) {
                        c.score.0 += t.logprob as f64;
                        c.score.1 += 1;
                    }
                    c.logprobs.extend(logprobs);
                }
                Step::Event(i, WorkerEvent::Embedding(v)) => self.choices[i].embedding = v,
                Step::Event(i, WorkerEvent::Prompt { mut logprobs, text }) => {
                    let c = &mut self.choices[i];
                    if let Some(k) = self.prompt_top {
                        c.prompt_logprobs =
                            Some(crate::api::prompt_logprobs::vllm(&logprobs, k as usize));
                    }
                    // For `echo`: the prompt's tokens come first, before the completion's.
                    if self.prompt_logprobs || self.prompt_top.is_none() {
                        for t in &mut logprobs {
                            t.top_logprobs.truncate(self.echo_top);
                        }
                        c.logprobs.splice(0..0, logprobs);
                        if let (None, Some(text)) = (&c.echo, text) {
                            c.text.insert_str(0, &text);
                        }
                    }
                }
                Step::Event(
                    i,
                    WorkerEvent::Done {
                        finish_reason,
                        usage,
                    },
                ) => {
                    if !self.finish(i, finish_reason, usage) {
                        continue;
                    }
                    let usage = total_usage(&self.choices);
                    meter.success(usage).await;
                    let apart = self.answer_bytes() >= RENDER_APART_BYTES;
                    let (body, mut done) = apart_if(apart, "rendering the answer", move || {
                        (self.render(usage), self)
                    })
                    .await?;
                    store_answer(&mut done.renderer).await;
                    return Ok(
                        ([(http::header::CONTENT_TYPE, "application/json")], body).into_response()
                    );
                }
                Step::Failed(e) => return Err(e),
            }
        }
    }

    /// Streamed: SSE frames produced as the client reads them.
    pub(super) fn into_response(mut self, meter: Meter) -> Response {
        let mut head = BytesMut::new();
        self.renderer.role_frame(&mut head);
        if !self.prompt_logprobs {
            for (i, c) in self.choices.iter_mut().enumerate() {
                if let Some(prompt) = c.echo.take() {
                    self.renderer.delta_frame(&mut head, i, &prompt, &[]);
                }
            }
        }
        let state = (self, meter, Some(head), false);
        // The request's span outlives its handler: keep it on the body's work too.
        let span = tracing::Span::current();
        let body = futures::stream::unfold(state, move |(mut s, mut meter, head, ended)| {
            let span = span.clone();
            async move {
                if ended {
                    return None;
                }
                let mut out = head.unwrap_or_default();
                let ended = match s.next_step().await {
                    Step::Event(
                        i,
                        WorkerEvent::Delta {
                            text,
                            tokens,
                            logprobs,
                            reasoning,
                        },
                    ) => {
                        meter.tokens(tokens);
                        match reasoning {
                            true => s.renderer.reasoning_frame(&mut out, i, &text, &logprobs),
                            false => s.renderer.delta_frame(&mut out, i, &text, &logprobs),
                        }
                        false
                    }
                    // Embeddings are never streamed.
                    Step::Event(_, WorkerEvent::Embedding(_)) => false,
                    Step::Event(i, WorkerEvent::Prompt { logprobs, text }) => {
                        let prompt = s.choices[i].echo.take().or(text).unwrap_or_default();
                        s.renderer.delta_frame(&mut out, i, &prompt, &logprobs);
                        false
                    }
                    Step::Event(
                        i,
                        WorkerEvent::Done {
                            finish_reason,
                            usage,
                        },
                    ) => {
                        let all = s.finish(i, finish_reason, usage);
                        let total = all.then(|| total_usage(&s.choices));
                        if let Some(total) = total {
                            // Durable before the final frames go out (see `meter`).
                            meter.success(total).await;
                        }
                        s.renderer.finish_frame(&mut out, i, finish_reason);
                        if let Some(total) = total {
                            s.renderer.end_frames(&mut out, total);
                            // Stored before its last bytes go out (see `response_store`).
                            store_answer(&mut s.renderer).await;
                        }
                        all
                    }
                    Step::Failed(e) => {
                        meter.failure("stream_error");
                        s.renderer.error_frame(&mut out, &e);
                        true
                    }
                };
                Some((
                    Ok::<_, std::convert::Infallible>(out.freeze()),
                    (s, meter, None, ended),
                ))
            }
            .instrument(span)
        });
        crate::api::render::event_stream(Body::from_stream(body))
    }
}
