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
//! items are the prompt's, and they go out first
//! ([`WorkerEvent::Prompt`](super::WorkerEvent::Prompt), with the echoed text), then the
//! completion. A prompt with no completion (`max_tokens` 0: the prompt alone, to score it)
//! is sent with `echo: true` too, and read whole; its text is all the prompt's.
//!
//! Here the worker and its requests; the wire shapes in `wire`, a whole answer read in
//! `answer`, a streamed one in `stream`.

use super::{
    EventStream, Load, OutputFormat, Prompt, Worker, WorkerError, WorkerRequest,
    CONTEXT_LENGTH_EXCEEDED,
};
use crate::config::OpenAiConfig;
use answer::{parse_embedding, parse_full};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use stream::stream_events;
use thread_local::ThreadLocal;
use wire::{StreamOptions, UpstreamPrompt, UpstreamRequest};

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
                Prompt::Chat(m, _) => serde_json::json!(m
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
            if let Some(k) = req.params.truncate_prompt_tokens {
                body["truncate_prompt_tokens"] = crate::worker::vllm_truncate(k).into();
            }
            return (
                "/v1/embeddings",
                serde_json::to_vec(&body).unwrap_or_default(),
            );
        }
        let p = &req.params;
        let (path, messages, prompt, template_args) = match &req.prompt {
            Prompt::Chat(m, args) => (
                "/v1/chat/completions",
                Some(m.as_slice()),
                None,
                args.as_deref(),
            ),
            Prompt::Text(t) => ("/v1/completions", None, Some(UpstreamPrompt::Text(t)), None),
            Prompt::Tokens(ids) => (
                "/v1/completions",
                None,
                Some(UpstreamPrompt::Tokens(ids)),
                None,
            ),
        };
        // The final message left open: the answer goes on with it.
        let open = messages.and_then(<[_]>::last).is_some_and(|m| m.open);
        let echo = echoed(p);
        let stream = req.stream && !echo;
        let body = UpstreamRequest {
            model,
            messages,
            prompt,
            chat_template_kwargs: template_args,
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
            echo: echo.then_some(true),
            // Chat: `logprobs: true` and `top_logprobs`; completions: `logprobs: n`.
            logprobs: p.logprobs.map(|n| match messages {
                Some(_) => Value::Bool(true),
                None => Value::from(n),
            }),
            top_logprobs: p.logprobs.filter(|_| messages.is_some()),
            presence_penalty: (p.presence_penalty != 0.0).then_some(p.presence_penalty),
            frequency_penalty: (p.frequency_penalty != 0.0).then_some(p.frequency_penalty),
            response_format: p.format.as_ref().and_then(OutputFormat::response_format),
            structured_outputs: p.format.as_ref().and_then(OutputFormat::structured_outputs),
            prediction: p
                .prediction
                .as_ref()
                .filter(|_| messages.is_some())
                .map(|t| serde_json::json!({"type": "content", "content": t.as_ref()})),
            ignore_eos: p.ignore_eos.then_some(true),
            min_tokens: (p.min_tokens > 0).then_some(p.min_tokens),
            stop_token_ids: (!p.stop_token_ids.is_empty()).then_some(p.stop_token_ids.as_slice()),
            min_p: (p.min_p > 0.0).then_some(p.min_p),
            repetition_penalty: (p.repetition_penalty != 1.0).then_some(p.repetition_penalty),
            allowed_token_ids: (!p.allowed_token_ids.is_empty())
                .then_some(p.allowed_token_ids.as_slice()),
            include_stop_str_in_output: p.include_stop_str_in_output.then_some(true),
            bad_words: (!p.bad_words.is_empty()).then_some(p.bad_words.as_slice()),
            skip_special_tokens: (!p.skip_special_tokens).then_some(false),
            continue_final_message: open.then_some(true),
            add_generation_prompt: open.then_some(false),
            truncate_prompt_tokens: p.truncate_prompt_tokens.map(crate::worker::vllm_truncate),
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

/// Whether the upstream is asked with `echo`: for a scored prompt, and for a prompt with no
/// completion (`max_tokens` 0, which an upstream takes with `echo` only). Its answer is then
/// read whole (see the module's doc).
fn echoed(p: &super::SamplingParams) -> bool {
    p.prompt_logprobs || p.max_tokens == 0
}

/// Decrements the in-flight count when the request's stream ends or is dropped.
struct InFlight(Arc<AtomicU64>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The message of an upstream's error body, or the body's first 512 bytes where it has none.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            // OpenAI's `{"error": {"message"}}`, or vLLM's `{"object": "error", "message"}`.
            let m = v["error"]["message"].as_str().or(v["message"].as_str());
            m.map(str::to_string)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned())
}

/// The OpenAI error code of an upstream's rejection that the client is to see: a prompt
/// over the model's context, said by its code (OpenAI, another tollgate) or, where the
/// server sets no such code (vLLM: `"code": 400`), by OpenAI's wording of it, which those
/// servers keep.
/// The field an upstream's error names, if any: OpenAI's `error.param` (vLLM's is at the
/// top level).
fn error_param(body: &[u8]) -> Option<String> {
    let v = serde_json::from_slice::<Value>(body).ok()?;
    let param = v["error"]["param"].as_str().or(v["param"].as_str());
    param.map(String::from)
}

fn error_code(body: &[u8], message: &str) -> Option<&'static str> {
    let code = serde_json::from_slice::<Value>(body).ok();
    let code = code.as_ref().and_then(|v| v["error"]["code"].as_str());
    (code == Some(CONTEXT_LENGTH_EXCEEDED) || message.contains("maximum context length"))
        .then_some(CONTEXT_LENGTH_EXCEEDED)
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
            super::no_prompt_logprobs(&req, "an OpenAI-compatible upstream")?;
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
                    WorkerError::Rejected {
                        status,
                        code: error_code(&body, &message),
                        param: error_param(&body),
                        message,
                    }
                });
            }
            if req.stream && !echoed(&req.params) && !req.embed {
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

mod answer;
mod stream;
#[cfg(test)]
mod tests;
mod wire;
