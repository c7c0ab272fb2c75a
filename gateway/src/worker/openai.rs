//! A worker that is any OpenAI-compatible upstream (vLLM, SGLang, llama.cpp's server,
//! another tollgate), over a pooled HTTP/1.1 or HTTP/2 (h2c) client.
//!
//! Streaming requests are sent upstream with `stream_options.include_usage`, and the
//! upstream's SSE body is parsed chunk by chunk as the gateway's client reads (so a slow
//! client slows the upstream: backpressure end to end). Dropping the event stream drops
//! the upstream response, which closes that connection: the upstream sees the cancel.
//!
//! A prompt to score (completions' `echo` with `logprobs`) is sent with `echo: true` and
//! never streamed upstream: the whole answer says (`usage.prompt_tokens`) which of its
//! items are the prompt's, and they go out first ([`WorkerEvent::Prompt`], with the
//! echoed text), then the completion.

use super::sse_parse::SseParser;
use super::{estimate_prompt_tokens, ChatMessage};
use super::{
    EventStream, FinishReason, Load, Prompt, TokenLogprob, TopLogprob, Usage, Worker, WorkerError,
    WorkerEvent, WorkerRequest,
};
use crate::config::OpenAiConfig;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thread_local::ThreadLocal;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Largest non-streamed upstream answer accepted.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Non-streamed upstream answers of this many bytes or more are parsed on the runtime's
/// blocking threads (a megabyte of JSON numbers takes milliseconds).
const PARSE_APART_BYTES: usize = 1 << 20;

pub struct OpenAiWorker {
    name: String,
    base: String,
    model: Option<String>,
    auth: Option<http::HeaderValue>,
    /// One connection pool per thread, so that a request's upstream connection is driven
    /// by the thread that serves it (no cross-thread wakeups: [`crate::server`]'s
    /// thread-per-core serving).
    clients: ThreadLocal<HttpClient>,
    cfg: OpenAiConfig,
    in_flight: Arc<AtomicU64>,
}

impl OpenAiWorker {
    pub fn new(name: String, cfg: OpenAiConfig) -> Result<Self, String> {
        let auth = match &cfg.api_key {
            Some(k) => Some(
                http::HeaderValue::from_str(&format!("Bearer {k}"))
                    .map_err(|_| "api_key has characters not allowed in a header".to_string())?,
            ),
            None => None,
        };
        Ok(Self {
            name,
            base: cfg.url.trim_end_matches('/').to_string(),
            model: cfg.model.clone(),
            auth,
            clients: ThreadLocal::new(),
            cfg,
            in_flight: Arc::new(AtomicU64::new(0)),
        })
    }

    /// This thread's client (made on first use).
    fn client(&self) -> HttpClient {
        self.clients
            .get_or(|| {
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                connector.set_connect_timeout(Some(Duration::from_secs(5)));
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(90))
                    .pool_max_idle_per_host(self.cfg.max_concurrency)
                    .http2_only(self.cfg.http2)
                    .build(connector)
            })
            .clone()
    }

    fn body(&self, req: &WorkerRequest) -> (&'static str, Vec<u8>) {
        let model = self.model.as_deref().unwrap_or(&req.model);
        if req.embed {
            let one = |p: &Prompt| match p {
                Prompt::Text(t) => serde_json::json!(t),
                Prompt::Tokens(ids) => serde_json::json!(ids),
                Prompt::Chat(m) => serde_json::json!(m
                    .iter()
                    .map(|m| m.content.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")),
            };
            // Several inputs: a list (of strings, or of token lists: the pipeline never
            // mixes the two in one call, as OpenAI's API does not take them mixed).
            let input = match req.more_inputs.is_empty() {
                true => one(&req.prompt),
                false => Value::Array(
                    std::iter::once(&req.prompt)
                        .chain(&req.more_inputs)
                        .map(one)
                        .collect(),
                ),
            };
            let encoding = self.cfg.embed_encoding.as_str();
            let mut body =
                serde_json::json!({"model": model, "input": input, "encoding_format": encoding});
            if let Some(d) = req.dimensions {
                body["dimensions"] = d.into();
            }
            return (
                "/v1/embeddings",
                serde_json::to_vec(&body).unwrap_or_default(),
            );
        }
        let p = &req.params;
        let (path, messages, prompt) = match &req.prompt {
            Prompt::Chat(m) => ("/v1/chat/completions", Some(m.as_slice()), None),
            Prompt::Text(t) => ("/v1/completions", None, Some(UpstreamPrompt::Text(t))),
            Prompt::Tokens(ids) => ("/v1/completions", None, Some(UpstreamPrompt::Tokens(ids))),
        };
        // A scored prompt's answer is read whole (see the module's doc).
        let stream = req.stream && !p.prompt_logprobs;
        let body = UpstreamRequest {
            model,
            messages,
            prompt,
            max_tokens: p.max_tokens,
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: (p.top_k > 0).then_some(p.top_k),
            seed: p.seed,
            stop: (!p.stop.is_empty()).then_some(p.stop.as_slice()),
            stream,
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
            echo: p.prompt_logprobs.then_some(true),
            // Chat: `logprobs: true` and `top_logprobs`; completions: `logprobs: n`.
            logprobs: p.logprobs.map(|n| match messages {
                Some(_) => Value::Bool(true),
                None => Value::from(n),
            }),
            top_logprobs: p.logprobs.filter(|_| messages.is_some()),
            presence_penalty: (p.presence_penalty != 0.0).then_some(p.presence_penalty),
            frequency_penalty: (p.frequency_penalty != 0.0).then_some(p.frequency_penalty),
            response_format: p.json.as_ref().map(|j| j.response_format()),
            logit_bias: (!p.logit_bias.is_empty()).then(|| {
                p.logit_bias
                    .iter()
                    .map(|&(id, b)| (id.to_string(), b))
                    .collect()
            }),
        };
        (path, serde_json::to_vec(&body).unwrap_or_default())
    }
}

/// A completions prompt as the upstream takes it: text, or token ids.
#[derive(Serialize)]
#[serde(untagged)]
enum UpstreamPrompt<'a> {
    Text(&'a str),
    Tokens(&'a [u32]),
}

#[derive(Serialize)]
struct UpstreamRequest<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    messages: Option<&'a [ChatMessage]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<UpstreamPrompt<'a>>,
    max_tokens: u32,
    temperature: f32,
    top_p: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop: Option<&'a [String]>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    echo: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logit_bias: Option<std::collections::BTreeMap<String, f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// The parts of an upstream answer (whole or chunk) that tollgate reads.
#[derive(Deserialize)]
struct UpstreamAnswer<'a> {
    #[serde(default, borrow)]
    choices: Vec<UpstreamChoice<'a>>,
    #[serde(default)]
    usage: Option<UpstreamUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct UpstreamChoice<'a> {
    #[serde(default, borrow)]
    message: Option<UpstreamText<'a>>,
    #[serde(default, borrow)]
    delta: Option<UpstreamText<'a>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(default)]
    logprobs: Option<UpstreamLogprobs>,
}

/// A choice's log-probabilities: the chat shape (`content`: one item per token) or the
/// legacy completions shape (parallel lists, alternatives as `{token: logprob}` maps).
#[derive(Deserialize, Default)]
struct UpstreamLogprobs {
    #[serde(default)]
    content: Option<Vec<UpstreamTokenLogprob>>,
    #[serde(default)]
    tokens: Option<Vec<String>>,
    #[serde(default)]
    token_logprobs: Option<Vec<Option<f32>>>,
    #[serde(default)]
    top_logprobs: Option<Vec<Option<std::collections::BTreeMap<String, f32>>>>,
    /// Where each token's text starts in the choice's text, in characters.
    #[serde(default)]
    text_offset: Option<Vec<usize>>,
}

#[derive(Deserialize)]
struct UpstreamTokenLogprob {
    token: String,
    logprob: f32,
    #[serde(default)]
    bytes: Option<Vec<u8>>,
    #[serde(default)]
    top_logprobs: Vec<UpstreamTop>,
}

#[derive(Deserialize)]
struct UpstreamTop {
    token: String,
    logprob: f32,
    #[serde(default)]
    bytes: Option<Vec<u8>>,
}

impl UpstreamLogprobs {
    /// As the gateway's items (bytes from the token text where the upstream gave none; a
    /// `null` log-probability, an echoed prompt's first, as NaN).
    fn items(self) -> Vec<TokenLogprob> {
        if let Some(content) = self.content {
            return content
                .into_iter()
                .map(|t| TokenLogprob {
                    bytes: t.bytes.unwrap_or_else(|| t.token.as_bytes().to_vec()),
                    token: t.token,
                    logprob: t.logprob,
                    top_logprobs: t
                        .top_logprobs
                        .into_iter()
                        .map(|a| TopLogprob {
                            bytes: a.bytes.unwrap_or_else(|| a.token.as_bytes().to_vec()),
                            token: a.token,
                            logprob: a.logprob,
                        })
                        .collect(),
                })
                .collect();
        }
        let tokens = self.tokens.unwrap_or_default();
        let lps = self.token_logprobs.unwrap_or_default();
        let mut tops = self.top_logprobs.unwrap_or_default().into_iter();
        tokens
            .into_iter()
            .zip(lps)
            .map(|(token, lp)| {
                let mut top: Vec<TopLogprob> = tops
                    .next()
                    .flatten()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(token, logprob)| TopLogprob {
                        bytes: token.as_bytes().to_vec(),
                        token,
                        logprob,
                    })
                    .collect();
                top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
                TokenLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob: lp.unwrap_or(f32::NAN),
                    top_logprobs: top,
                }
            })
            .collect()
    }
}

#[derive(Deserialize)]
struct UpstreamText<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Clone, Copy)]
struct UpstreamUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    #[serde(default)]
    prompt_tokens_details: Option<UpstreamPromptDetails>,
}

/// vLLM, SGLang and tollgate workers report prompt tokens served from their prefix cache.
#[derive(Deserialize, Clone, Copy)]
struct UpstreamPromptDetails {
    #[serde(default)]
    cached_tokens: Option<u32>,
}

impl From<UpstreamUsage> for Usage {
    fn from(u: UpstreamUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
        }
    }
}

impl<'a> UpstreamChoice<'a> {
    /// The generated text in this choice, whatever the endpoint.
    fn text(&self, chat: bool) -> Option<&str> {
        if chat {
            self.message
                .as_ref()
                .or(self.delta.as_ref())
                .and_then(|m| m.content.as_deref())
        } else {
            self.text.as_deref()
        }
    }

    fn finish(&self) -> Option<FinishReason> {
        self.finish_reason
            .as_deref()
            .map(|s| FinishReason::parse(s).unwrap_or(FinishReason::Stop))
    }
}

/// Decrements the in-flight count when the request's stream ends or is dropped.
struct InFlight(Arc<AtomicU64>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned())
}

impl Worker for OpenAiWorker {
    fn name(&self) -> &str {
        &self.name
    }

    fn submit(
        &self,
        req: Arc<WorkerRequest>,
    ) -> BoxFuture<'static, Result<EventStream, WorkerError>> {
        let (path, body) = self.body(&req);
        let mut builder = http::Request::post(format!("{}{}", self.base, path))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("x-request-id", &*req.request_id);
        if let Some(a) = &self.auth {
            builder = builder.header(http::header::AUTHORIZATION, a.clone());
        }
        if self.cfg.forward_tenant {
            builder = builder.header("x-tollgate-tenant", &*req.tenant);
            if let Some(w) = req.weight {
                builder = builder.header("x-tollgate-weight", w.to_string());
            }
        }
        let request = builder.body(Full::new(Bytes::from(body)));
        let client = self.client();
        let timeout = Duration::from_secs_f64(self.cfg.timeout_secs);
        let in_flight = self.in_flight.clone();
        async move {
            let request = request.map_err(|e| WorkerError::Protocol(e.to_string()))?;
            in_flight.fetch_add(1, Ordering::Relaxed);
            let guard = InFlight(in_flight);
            let resp = tokio::time::timeout(timeout, client.request(request))
                .await
                .map_err(|_| {
                    WorkerError::Unreachable("timed out waiting for upstream headers".into())
                })?
                .map_err(|e| WorkerError::Unreachable(format!("{e:#}")))?;
            let status = resp.status();
            if !status.is_success() {
                let body = Limited::new(resp.into_body(), 1 << 20)
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let message = error_message(&body);
                let status = status.as_u16();
                return Err(if status == 429 || status >= 500 {
                    WorkerError::Failed { status, message }
                } else {
                    WorkerError::Rejected { status, message }
                });
            }
            if req.stream && !req.params.prompt_logprobs && !req.embed {
                Ok(stream_events(resp.into_body(), req, guard))
            } else {
                let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                    .collect()
                    .await
                    .map_err(|e| WorkerError::Protocol(format!("reading upstream body: {e}")))?
                    .to_bytes();
                let len = body.len();
                let parse = move || match req.embed {
                    true => parse_embedding(&body, &req),
                    false => parse_full(&body, &req),
                };
                // A large answer (a batch of long vectors) is read on the runtime's
                // blocking threads, not on the serving thread that drives its connection.
                let events = if len < PARSE_APART_BYTES {
                    parse()?
                } else {
                    tokio::task::spawn_blocking(parse).await.map_err(|e| {
                        WorkerError::Protocol(format!("reading the upstream's answer: {e}"))
                    })??
                };
                drop(guard);
                Ok(futures::stream::iter(events.into_iter().map(Ok)).boxed())
            }
        }
        .boxed()
    }

    fn load(&self) -> Load {
        Load {
            running: self.in_flight.load(Ordering::Relaxed),
            queued: 0,
            kv_blocks: None,
        }
    }

    fn probe(&self) -> BoxFuture<'static, Result<(), WorkerError>> {
        let uri = format!("{}{}", self.base, self.cfg.health_path);
        let client = self.client();
        let auth = self.auth.clone();
        async move {
            let mut b = http::Request::get(uri);
            if let Some(a) = auth {
                b = b.header(http::header::AUTHORIZATION, a);
            }
            let req = b
                .body(Full::new(Bytes::new()))
                .map_err(|e| WorkerError::Protocol(e.to_string()))?;
            let resp = tokio::time::timeout(Duration::from_secs(2), client.request(req))
                .await
                .map_err(|_| WorkerError::Unreachable("health probe timed out".into()))?
                .map_err(|e| WorkerError::Unreachable(format!("{e:#}")))?;
            let status = resp.status();
            // Drain so the connection goes back to the pool.
            let _ = Limited::new(resp.into_body(), 1 << 20).collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(WorkerError::Failed {
                    status: status.as_u16(),
                    message: "health probe failed".into(),
                })
            }
        }
        .boxed()
    }

    fn max_concurrency(&self) -> usize {
        self.cfg.max_concurrency
    }

    fn sets_dimensions(&self) -> bool {
        true
    }

    fn embed_batch(&self) -> super::EmbedBatch {
        super::EmbedBatch {
            inputs: self.cfg.embed_batch.max(1),
            tokens: self.cfg.embed_batch_tokens.max(1),
        }
    }
}

/// An upstream's `/v1/embeddings` answer: each input's vector (in input order, by their
/// `index`), then the end, whose usage counts them all (the upstream's count, else an
/// estimate).
fn parse_embedding(body: &[u8], req: &WorkerRequest) -> Result<Vec<WorkerEvent>, WorkerError> {
    #[derive(Deserialize)]
    struct Answer {
        data: Vec<Item>,
        usage: Option<Counted>,
    }
    #[derive(Deserialize)]
    struct Item {
        index: Option<usize>,
        embedding: Vector,
    }
    #[derive(Deserialize)]
    struct Counted {
        prompt_tokens: u32,
    }
    let v: Answer = serde_json::from_slice(body).map_err(|e| {
        WorkerError::Protocol(format!(
            "upstream embeddings answer is not as expected: {e}"
        ))
    })?;
    let inputs = 1 + req.more_inputs.len();
    let mut data = v.data;
    if data.len() != inputs {
        return Err(WorkerError::Protocol(format!(
            "upstream embeddings answer has {} vectors for {inputs} inputs",
            data.len()
        )));
    }
    // In input order: by `index` where each says its own (a permutation of 0..n).
    if data.iter().all(|d| d.index.is_some()) {
        data.sort_unstable_by_key(|d| d.index);
        if data.iter().enumerate().any(|(i, d)| d.index != Some(i)) {
            return Err(WorkerError::Protocol(
                "upstream embeddings answer's indexes are not one per input".into(),
            ));
        }
    }
    let prompt_tokens = v.usage.map_or_else(
        || {
            std::iter::once(&req.prompt)
                .chain(&req.more_inputs)
                .map(estimate_prompt_tokens)
                .fold(0u32, u32::saturating_add)
        },
        |u| u.prompt_tokens,
    );
    let usage = Usage {
        prompt_tokens,
        completion_tokens: 0,
        cached_tokens: 0,
    };
    let mut events = Vec::with_capacity(inputs + 1);
    for d in data {
        events.push(WorkerEvent::Embedding(d.embedding.0));
    }
    events.push(WorkerEvent::Done {
        finish_reason: FinishReason::Stop,
        usage,
    });
    Ok(events)
}

/// An upstream's vector: JSON numbers, or (`encoding_format: "base64"`) the base64 of
/// little-endian `f32`s, read as it comes (no copy of the string, no trial of one form
/// before the other).
struct Vector(Vec<f32>);

impl<'de> Deserialize<'de> for Vector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = Vector;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of numbers or a base64 string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Vector, E> {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(E::custom)?;
                if bytes.len() % 4 != 0 {
                    return Err(E::custom(format!(
                        "a base64 vector of {} bytes is no whole number of f32s",
                        bytes.len()
                    )));
                }
                Ok(Vector(
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Vector, A::Error> {
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0));
                while let Some(x) = a.next_element::<f32>()? {
                    v.push(x);
                }
                Ok(Vector(v))
            }
        }
        d.deserialize_any(Either)
    }
}

/// A non-streamed upstream answer as events.
fn parse_full(body: &[u8], req: &WorkerRequest) -> Result<Vec<WorkerEvent>, WorkerError> {
    let v: UpstreamAnswer = serde_json::from_slice(body)
        .map_err(|e| WorkerError::Protocol(format!("upstream answer is not JSON: {e}")))?;
    let chat = matches!(req.prompt, Prompt::Chat(_));
    let choice = v
        .choices
        .first()
        .ok_or_else(|| WorkerError::Protocol("upstream answer has no choices".into()))?;
    let text = choice
        .text(chat)
        .ok_or_else(|| WorkerError::Protocol("upstream answer has no choices[0] text".into()))?;
    let usage = v.usage.map(Usage::from).unwrap_or(Usage {
        prompt_tokens: estimate_prompt_tokens(&req.prompt),
        completion_tokens: 0,
        cached_tokens: 0,
    });
    let mut text = text.to_string();
    let finish_reason = choice.finish().unwrap_or(FinishReason::Stop);
    let mut lp = v
        .choices
        .into_iter()
        .next()
        .and_then(|c| c.logprobs)
        .unwrap_or_default();
    let offsets = lp.text_offset.take().unwrap_or_default();
    let mut logprobs = lp.items();
    let mut events = Vec::with_capacity(3);
    if req.params.prompt_logprobs {
        let prompt_tokens = v.usage.map(|u| u.prompt_tokens as usize).ok_or_else(|| {
            WorkerError::Protocol("upstream echoed a prompt without `usage`, so its tokens cannot be told from the completion's".into())
        })?;
        let (prompt, echoed) = split_echo(&mut text, &mut logprobs, &offsets, prompt_tokens)?;
        events.push(WorkerEvent::Prompt {
            logprobs: prompt,
            text: Some(echoed),
        });
    }
    events.push(WorkerEvent::Delta {
        text,
        tokens: usage.completion_tokens,
        logprobs,
    });
    events.push(WorkerEvent::Done {
        finish_reason,
        usage,
    });
    Ok(events)
}

/// Splits an echoed answer: takes the prompt's items (the first `prompt_tokens`) and
/// text (up to the first completion token's `text_offset`, in characters; without
/// offsets, the prompt tokens' texts) off the front of `items` and `text`.
fn split_echo(
    text: &mut String,
    items: &mut Vec<TokenLogprob>,
    offsets: &[usize],
    prompt_tokens: usize,
) -> Result<(Vec<TokenLogprob>, String), WorkerError> {
    if items.len() < prompt_tokens {
        return Err(WorkerError::Protocol(format!(
            "upstream scored {} tokens of a {prompt_tokens}-token prompt",
            items.len()
        )));
    }
    let rest = items.split_off(prompt_tokens);
    let prompt = std::mem::replace(items, rest);
    let chars = match offsets.get(prompt_tokens) {
        _ if items.is_empty() => usize::MAX,
        Some(&at) => at,
        None => prompt.iter().map(|t| t.token.chars().count()).sum(),
    };
    let at = text
        .char_indices()
        .nth(chars)
        .map_or(text.len(), |(i, _)| i);
    let completion = text.split_off(at);
    Ok((prompt, std::mem::replace(text, completion)))
}

struct StreamState {
    body: Incoming,
    parser: SseParser,
    req: Arc<WorkerRequest>,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    deltas: u32,
    ended: bool,
    _guard: InFlight,
}

impl StreamState {
    fn done(&mut self) -> Result<WorkerEvent, WorkerError> {
        self.ended = true;
        let finish_reason = self.finish.ok_or_else(|| {
            WorkerError::Protocol("upstream stream ended without a finish_reason".into())
        })?;
        let usage = self.usage.unwrap_or(Usage {
            prompt_tokens: estimate_prompt_tokens(&self.req.prompt),
            completion_tokens: self.deltas,
            cached_tokens: 0,
        });
        Ok(WorkerEvent::Done {
            finish_reason,
            usage,
        })
    }

    /// Interprets one SSE payload; `Some` when it yields an event.
    fn on_data(&mut self, data: &str) -> Option<Result<WorkerEvent, WorkerError>> {
        if data == "[DONE]" {
            return Some(self.done());
        }
        let v: UpstreamAnswer = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => {
                self.ended = true;
                return Some(Err(WorkerError::Protocol(format!(
                    "bad upstream chunk: {e}"
                ))));
            }
        };
        if let Some(err) = v.error {
            self.ended = true;
            let message = err["message"]
                .as_str()
                .unwrap_or("upstream error")
                .to_string();
            return Some(Err(WorkerError::Failed {
                status: 502,
                message,
            }));
        }
        if let Some(u) = v.usage {
            self.usage = Some(u.into());
        }
        let choice = v.choices.into_iter().next()?;
        if let Some(f) = choice.finish() {
            self.finish = Some(f);
        }
        let chat = matches!(self.req.prompt, Prompt::Chat(_));
        let text = choice.text(chat).unwrap_or_default().to_string();
        let logprobs = choice
            .logprobs
            .map(UpstreamLogprobs::items)
            .unwrap_or_default();
        if text.is_empty() && logprobs.is_empty() {
            return None;
        }
        self.deltas += 1;
        Some(Ok(WorkerEvent::Delta {
            text,
            tokens: 1,
            logprobs,
        }))
    }
}

fn stream_events(body: Incoming, req: Arc<WorkerRequest>, guard: InFlight) -> EventStream {
    let state = StreamState {
        body,
        parser: SseParser::default(),
        req,
        finish: None,
        usage: None,
        deltas: 0,
        ended: false,
        _guard: guard,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.ended {
                return None;
            }
            match st.parser.next_event() {
                Err(e) => {
                    st.ended = true;
                    return Some((Err(WorkerError::Protocol(e)), st));
                }
                Ok(Some(data)) => {
                    if let Some(ev) = st.on_data(&data) {
                        return Some((ev, st));
                    }
                    continue;
                }
                Ok(None) => {}
            }
            match st.body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        st.parser.push(data);
                    }
                }
                Some(Err(e)) => {
                    st.ended = true;
                    return Some((
                        Err(WorkerError::Protocol(format!("upstream stream broke: {e}"))),
                        st,
                    ));
                }
                None => {
                    // EOF without [DONE]: complete only if the upstream said how it finished.
                    let ev = if st.finish.is_some() {
                        st.done()
                    } else {
                        st.ended = true;
                        Err(WorkerError::Protocol(
                            "upstream stream ended before finishing".into(),
                        ))
                    };
                    return Some((ev, st));
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(tokens: &[&str]) -> Vec<TokenLogprob> {
        tokens
            .iter()
            .map(|t| TokenLogprob {
                token: t.to_string(),
                bytes: t.as_bytes().to_vec(),
                logprob: -1.0,
                top_logprobs: Vec::new(),
            })
            .collect()
    }

    fn embed_req(first: Prompt, more: Vec<Prompt>) -> WorkerRequest {
        WorkerRequest {
            request_id: "r".into(),
            tenant: "t".into(),
            weight: None,
            output_weight: 3.0,
            model: "m".into(),
            prompt: first,
            prompt_ids: None,
            params: super::super::SamplingParams::greedy(0),
            stream: false,
            embed: true,
            more_inputs: more,
            dimensions: None,
        }
    }

    fn vectors(events: &[WorkerEvent]) -> (Vec<f32>, u32) {
        let firsts = events
            .iter()
            .filter_map(|e| match e {
                WorkerEvent::Embedding(v) => Some(v[0]),
                _ => None,
            })
            .collect();
        match events.last() {
            Some(WorkerEvent::Done { usage, .. }) => (firsts, usage.prompt_tokens),
            other => panic!("ends with {other:?}"),
        }
    }

    #[test]
    fn several_embeddings_inputs_are_one_upstream_call_answered_in_input_order() {
        let w = OpenAiWorker::new(
            "w".into(),
            toml::from_str(r#"url = "http://127.0.0.1:1""#).expect("config"),
        )
        .expect("worker");
        let one = embed_req(Prompt::Text("a".into()), vec![]);
        let (_, body) = w.body(&one);
        let v: Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(v["input"], "a", "one input: as it was");
        assert_eq!(v["encoding_format"], "base64", "by default");
        let three = embed_req(
            Prompt::Text("a".into()),
            vec![Prompt::Text("bb".into()), Prompt::Text("ccccc".into())],
        );
        let (path, body) = w.body(&three);
        let v: Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(path, "/v1/embeddings");
        assert_eq!(v["input"], serde_json::json!(["a", "bb", "ccccc"]));
        assert!(v.get("dimensions").is_none());
        let mut ids = embed_req(Prompt::Tokens(vec![1, 2]), vec![Prompt::Tokens(vec![3])]);
        ids.dimensions = Some(64);
        let v: Value = serde_json::from_slice(&w.body(&ids).1).expect("JSON");
        assert_eq!(v["input"], serde_json::json!([[1, 2], [3]]));
        assert_eq!(v["dimensions"], 64, "asked of the upstream");

        // Answered out of order: put back in order by index; the upstream's count.
        let answer = br#"{"data":[{"index":2,"embedding":[2.0]},{"index":0,"embedding":[0.0]},
            {"index":1,"embedding":[1.0]}],"usage":{"prompt_tokens":9}}"#;
        let events = parse_embedding(answer, &three).expect("parsed");
        assert_eq!(vectors(&events), (vec![0.0, 1.0, 2.0], 9));
        // No usage: each input's estimate, added up; no indexes: as listed.
        let answer = br#"{"data":[{"embedding":[5.0]},{"embedding":[6.0]},{"embedding":[7.0]}]}"#;
        let events = parse_embedding(answer, &three).expect("parsed");
        assert_eq!(vectors(&events), (vec![5.0, 6.0, 7.0], 1 + 1 + 2));
        // Base64 of little-endian f32s ([1.5] is 0x3fc00000), beside numbers.
        let answer = br#"{"data":[{"index":0,"embedding":"AADAPw=="},{"index":1,"embedding":[2.0]},
            {"index":2,"embedding":"AADAPwAAwD8="}]}"#;
        let events = parse_embedding(answer, &three).expect("parsed");
        let lens: Vec<usize> = events
            .iter()
            .filter_map(|e| match e {
                WorkerEvent::Embedding(v) => Some(v.len()),
                _ => None,
            })
            .collect();
        assert_eq!(
            (vectors(&events).0, lens),
            (vec![1.5, 2.0, 1.5], vec![1, 1, 2])
        );
        // Another number of vectors, indexes that are not one per input, or base64 that
        // is not whole f32s: refused.
        for bad in [
            &br#"{"data":[{"index":0,"embedding":[0.0]},{"index":1,"embedding":[1.0]}]}"#[..],
            br#"{"data":[{"index":0,"embedding":[0.0]},{"index":0,"embedding":[1.0]},
                {"index":2,"embedding":[2.0]}]}"#,
            br#"{"data":[{"embedding":"AADA"},{"embedding":[1.0]},{"embedding":[2.0]}]}"#,
        ] {
            assert!(
                matches!(parse_embedding(bad, &three), Err(WorkerError::Protocol(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn tokens(items: &[TokenLogprob]) -> Vec<&str> {
        items.iter().map(|t| t.token.as_str()).collect()
    }

    #[test]
    fn an_echoed_answer_splits_into_prompt_and_completion() {
        // By the first completion token's offset (in characters: `é` is two bytes).
        let (mut text, mut all) = (
            "café au lait!".to_string(),
            items(&["caf", "é", " au", " lait", "!"]),
        );
        let (prompt, echoed) = split_echo(&mut text, &mut all, &[0, 3, 4, 7, 12], 4).unwrap();
        assert_eq!((echoed.as_str(), text.as_str()), ("café au lait", "!"));
        assert_eq!(
            (tokens(&prompt), tokens(&all)),
            (vec!["caf", "é", " au", " lait"], vec!["!"])
        );
        // Without offsets, by the prompt tokens' texts.
        let (mut text, mut all) = (
            "café au lait!".to_string(),
            items(&["caf", "é", " au", " lait", "!"]),
        );
        let (_, echoed) = split_echo(&mut text, &mut all, &[], 4).unwrap();
        assert_eq!((echoed.as_str(), text.as_str()), ("café au lait", "!"));
        // No completion token (a stop at once): all of the text is the prompt's.
        let (mut text, mut all) = ("ab".to_string(), items(&["a", "b"]));
        let (prompt, echoed) = split_echo(&mut text, &mut all, &[0, 1], 2).unwrap();
        assert_eq!(
            (echoed.as_str(), text.as_str(), prompt.len(), all.len()),
            ("ab", "", 2, 0)
        );
        // Fewer items than the prompt's tokens: the upstream did not score it.
        let (mut text, mut all) = ("ab".to_string(), items(&["a", "b"]));
        assert!(split_echo(&mut text, &mut all, &[], 3).is_err());
    }
}
