//! An embeddings request's inputs: grouped into the requests a pool's workers take
//! (`embed_batch`), routed at most the pool's capacity at a time, and their vectors
//! gathered in input order into one metered JSON answer.

use super::{apart_if, broke, PromptPart};
use crate::api::error::ApiError;
use crate::api::render::{ChoiceOut, Renderer};
use crate::api::validate::MAX_CHOICES;
use crate::metrics::Meter;
use crate::route::{Lease, Pool};
use crate::worker::{EventStream, WorkerError, WorkerEvent};
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, TryStreamExt};
use std::ops::Range;
use tokio::time::Instant as TokioInstant;

/// An embeddings request's answers: each input's vector, in input order, and their usage.
pub(super) struct Embedded {
    vectors: Vec<Vec<f32>>,
    usage: crate::worker::Usage,
    /// The worker that answered the first input (for the meter).
    worker: String,
}

/// `parts` cut into runs of consecutive inputs that one routed request may carry: at most
/// `batch.inputs`, at most `batch.tokens` in all (an input longer than that alone), and all
/// text or all token ids (OpenAI's API takes a list of either, not both).
fn embed_groups(parts: &[PromptPart], batch: crate::worker::EmbedBatch) -> Vec<Range<usize>> {
    let ids = |p: &PromptPart| matches!(p.prompt, crate::worker::Prompt::Tokens(_));
    let mut groups: Vec<Range<usize>> = Vec::new();
    let mut tokens = 0u64;
    for (i, p) in parts.iter().enumerate() {
        let t = p.tokens as u64;
        match groups.last_mut() {
            Some(g)
                if g.len() < batch.inputs
                    && tokens + t <= batch.tokens
                    && ids(&parts[g.start]) == ids(p) =>
            {
                g.end = i + 1;
                tokens += t;
            }
            _ => {
                groups.push(i..i + 1);
                tokens = t;
            }
        }
    }
    groups
}

impl Embedded {
    /// Routes `parts` (through `route`), as many at a time as the pool's workers take in
    /// one request ([`Pool::embed_batch`]: one, unless they all take more), with at most
    /// the pool's capacity (and [`MAX_CHOICES`]) of those requests in flight at once, the
    /// next as one ends: a request of many inputs (up to
    /// [`crate::api::validate::MAX_EMBEDDING_INPUTS`]) neither fills the pool's wait room
    /// nor holds more of its slots than the pool has. The first failure fails the request
    /// (the requests still running are dropped, so cancelled).
    pub(super) async fn gather<'p, F, Fut>(
        pool: &Pool,
        parts: &'p [PromptPart],
        route: F,
        deadline: TokioInstant,
    ) -> Result<Self, ApiError>
    where
        F: Fn(&'p [PromptPart]) -> Fut,
        Fut: std::future::Future<Output = Result<(Lease, EventStream, WorkerEvent), ApiError>>,
    {
        let in_flight = (pool.capacity().max(1) as usize).min(MAX_CHOICES);
        // Made up front (futures do nothing until polled): a stream that maps as it goes
        // would keep a closure over borrowed parts in this future, which then is not
        // `Send` for every lifetime.
        let requests: Vec<_> = embed_groups(parts, pool.embed_batch())
            .into_iter()
            .map(|group| {
                let routed = route(&parts[group.clone()]);
                async move {
                    let (lease, events, first) = routed.await?;
                    let (vectors, usage, worker) =
                        embeddings_of(lease, events, first, group.len(), deadline).await?;
                    Ok::<_, ApiError>((group.start, vectors, usage, worker))
                }
            })
            .collect();
        let mut answers: Vec<(usize, Vec<Vec<f32>>, crate::worker::Usage, String)> =
            futures::stream::iter(requests)
                .buffer_unordered(in_flight)
                .try_collect()
                .await?;
        answers.sort_unstable_by_key(|a| a.0);
        let worker = answers.first().map(|a| a.3.clone()).unwrap_or_default();
        let usage = answers
            .iter()
            .fold(crate::worker::Usage::default(), |mut t, a| {
                t.prompt_tokens = t.prompt_tokens.saturating_add(a.2.prompt_tokens);
                t.cached_tokens = t.cached_tokens.saturating_add(a.2.cached_tokens);
                t
            });
        Ok(Self {
            vectors: answers.into_iter().flat_map(|a| a.1).collect(),
            usage,
            worker,
        })
    }

    /// Metered, then one JSON body: rendered on the runtime's blocking threads when it
    /// is large ([`RENDER_APART_FLOATS`]).
    pub(super) async fn answer(
        self,
        mut renderer: Renderer,
        meter: &mut Meter,
    ) -> Result<Response, ApiError> {
        meter.worker = self.worker;
        let usage = self.usage;
        meter.success(usage).await;
        let floats: usize = self.vectors.iter().map(Vec::len).sum();
        let vectors = self.vectors;
        let render = move || {
            let out: Vec<ChoiceOut<'_>> = vectors
                .iter()
                .map(|v| ChoiceOut {
                    text: "",
                    reasoning: "",
                    logprobs: &[],
                    finish: crate::worker::FinishReason::Stop,
                    embedding: v,
                    prompt_logprobs: None,
                })
                .collect();
            renderer.full(&out, usage)
        };
        let body = apart_if(
            floats >= RENDER_APART_FLOATS,
            "rendering the answer",
            render,
        )
        .await?;
        Ok(([(http::header::CONTENT_TYPE, "application/json")], body).into_response())
    }
}

/// Embeddings answers of at least this many numbers in all are rendered on the runtime's
/// blocking threads: 2,048 vectors of 576 take about 40 ms as JSON numbers (7 ms as
/// base64), which on a serving thread would hold up its other connections.
const RENDER_APART_FLOATS: usize = 1 << 16;

/// The vectors of a routed request of `inputs` embeddings inputs, and their usage, from
/// its worker's events (its first one given), and the worker's name. A worker that
/// answers another number of vectors has failed.
async fn embeddings_of(
    mut lease: Lease,
    mut events: EventStream,
    first: WorkerEvent,
    inputs: usize,
    deadline: TokioInstant,
) -> Result<(Vec<Vec<f32>>, crate::worker::Usage, String), ApiError> {
    let mut vectors = Vec::with_capacity(inputs);
    let mut next = Some(Ok(first));
    loop {
        match next {
            Some(Ok(WorkerEvent::Embedding(v))) => vectors.push(v),
            Some(Ok(WorkerEvent::Done { usage, .. })) if vectors.len() == inputs => {
                lease.success();
                return Ok((vectors, usage, lease.worker().name().to_string()));
            }
            Some(Ok(WorkerEvent::Done { .. })) => {
                let e = WorkerError::Protocol(format!(
                    "answered {} vectors for {inputs} inputs",
                    vectors.len()
                ));
                return Err(broke(&mut lease, Some(e)));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(broke(&mut lease, Some(e))),
            None => return Err(broke(&mut lease, None)),
        }
        next = tokio::time::timeout_at(deadline, events.next())
            .await
            .map_err(|_| ApiError::Timeout)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{EmbedBatch, Prompt};

    fn part(prompt: Prompt, tokens: u32) -> PromptPart {
        PromptPart {
            prompt,
            ids: None,
            tokens,
            echo: None,
        }
    }

    #[test]
    fn embeddings_inputs_are_grouped_by_count_tokens_and_kind() {
        let text = |t| part(Prompt::Text("x".into()), t);
        let ids = |t| part(Prompt::Tokens(vec![1]), t);
        let parts = [text(1), text(1), text(1), text(1), text(1)];
        assert_eq!(
            embed_groups(&parts, EmbedBatch::ONE),
            [0..1, 1..2, 2..3, 3..4, 4..5]
        );
        let two = EmbedBatch {
            inputs: 2,
            tokens: u64::MAX,
        };
        assert_eq!(embed_groups(&parts, two), [0..2, 2..4, 4..5]);
        // Tokens in all: at most 10 a group, a longer input alone.
        let by_tokens = EmbedBatch {
            inputs: 100,
            tokens: 10,
        };
        let parts = [
            text(4),
            text(6),
            text(1),
            text(30),
            text(9),
            text(1),
            text(1),
        ];
        assert_eq!(
            embed_groups(&parts, by_tokens),
            [0..2, 2..3, 3..4, 4..6, 6..7]
        );
        // Text and token ids never share a group.
        let parts = [text(1), text(1), ids(1), ids(1), text(1)];
        let many = EmbedBatch {
            inputs: 100,
            tokens: u64::MAX,
        };
        assert_eq!(embed_groups(&parts, many), [0..2, 2..4, 4..5]);
        assert!(embed_groups(&[], many).is_empty());
    }
}
