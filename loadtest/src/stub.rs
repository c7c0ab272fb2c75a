//! A fixed-answer OpenAI-compatible upstream (HTTP/1.1 and h2c).
//!
//! Answers `/v1/chat/completions` and `/v1/completions` (streamed or not) with `--tokens`
//! copies of the word "tok", one SSE chunk each, `--token-delay-ms` apart;
//! `/v1/embeddings` with one vector per input (`[n, 1, 0, 0]` for input `n` of the call, not
//! normalized: an upstream's vectors pass through as they are; `dimensions` numbers each,
//! cut or padded with zeros; as base64 when `encoding_format` asks; listed last input
//! first, each with its `index`; 7 prompt tokens an input); `/v1/models`;
//! `/health`; and `/stats` (JSON counters: requests, streams completed and cancelled).
//! `--fail-status` makes every inference request fail with that status.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Clone, Debug)]
pub struct StubArgs {
    /// Address to listen on (port 0 picks one; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub listen: std::net::SocketAddr,
    /// Tokens in every answer.
    #[arg(long, default_value_t = 4)]
    pub tokens: u32,
    /// Delay between streamed tokens, milliseconds.
    #[arg(long, default_value_t = 0)]
    pub token_delay_ms: u64,
    /// Fail every inference request with this HTTP status.
    #[arg(long)]
    pub fail_status: Option<u16>,
}

impl Default for StubArgs {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            tokens: 4,
            token_delay_ms: 0,
            fail_status: None,
        }
    }
}

/// What the stub has seen (also served as JSON on `/stats`).
#[derive(Default, Debug)]
pub struct Stats {
    pub requests: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub active: AtomicU64,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: u16, ctype: &str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("static response")
}

/// Counts a stream as cancelled unless it was marked complete before being dropped.
struct StreamGuard {
    stats: Arc<Stats>,
    complete: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
        let c = if self.complete {
            &self.stats.completed
        } else {
            &self.stats.cancelled
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

async fn handle(req: Request<Incoming>, args: Arc<StubArgs>, stats: Arc<Stats>) -> Response<Body> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/health" => return full(200, "text/plain", "ok\n".into()),
        "/v1/models" => {
            return full(
                200,
                "application/json",
                r#"{"object":"list","data":[{"id":"stub","object":"model","created":0,"owned_by":"stub"}]}"#.into(),
            )
        }
        "/stats" => {
            let s = &stats;
            let body = serde_json::json!({
                "requests": s.requests.load(Ordering::Relaxed),
                "completed": s.completed.load(Ordering::Relaxed),
                "cancelled": s.cancelled.load(Ordering::Relaxed),
                "active": s.active.load(Ordering::Relaxed),
            });
            return full(200, "application/json", body.to_string());
        }
        "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings" => {}
        _ => return full(404, "application/json", r#"{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":null}}"#.into()),
    }
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let chat = path == "/v1/chat/completions";
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return full(400, "application/json", "{}".into()),
    };
    if let Some(status) = args.fail_status {
        return full(
            status,
            "application/json",
            format!(
                r#"{{"error":{{"message":"stub told to fail with {status}","type":"server_error","param":null,"code":null}}}}"#
            ),
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if path == "/v1/embeddings" {
        stats.completed.fetch_add(1, Ordering::Relaxed);
        let inputs = match &v["input"] {
            serde_json::Value::Array(a) if a.iter().all(|i| !i.is_number()) => a.len(),
            _ => 1,
        };
        // Last input first: the `index` of each says whose it is. `dimensions` numbers
        // each (the four, cut or padded with zeros).
        let size = v["dimensions"].as_u64().unwrap_or(4) as usize;
        let base64 = v["encoding_format"] == "base64";
        let data: Vec<serde_json::Value> = (0..inputs)
            .rev()
            .map(|i| {
                let mut vector = vec![i as f32, 1.0, 0.0, 0.0];
                vector.resize(size, 0.0);
                let embedding = match base64 {
                    true => {
                        use base64::Engine as _;
                        let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                        serde_json::json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                    }
                    false => serde_json::json!(vector),
                };
                serde_json::json!({"object": "embedding", "index": i, "embedding": embedding})
            })
            .collect();
        let tokens = 7 * inputs;
        let body = serde_json::json!({"object": "list", "data": data, "model": "stub",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}});
        return full(200, "application/json", body.to_string());
    }
    let stream = v["stream"].as_bool().unwrap_or(false);
    let max = v["max_tokens"].as_u64().unwrap_or(u64::MAX) as u32;
    let n = args.tokens.min(max);
    let finish = if n < args.tokens { "length" } else { "stop" };
    let prompt_tokens = 7;
    let usage = format!(
        r#"{{"prompt_tokens":{prompt_tokens},"completion_tokens":{n},"total_tokens":{}}}"#,
        prompt_tokens + n
    );
    if !stream {
        let text = vec!["tok"; n as usize].join(" ");
        let body = if chat {
            format!(
                r#"{{"id":"stub-1","object":"chat.completion","created":0,"model":"stub","choices":[{{"index":0,"message":{{"role":"assistant","content":"{text}"}},"finish_reason":"{finish}"}}],"usage":{usage}}}"#
            )
        } else {
            format!(
                r#"{{"id":"stub-1","object":"text_completion","created":0,"model":"stub","choices":[{{"index":0,"text":"{text}","finish_reason":"{finish}"}}],"usage":{usage}}}"#
            )
        };
        return full(200, "application/json", body);
    }
    let include_usage = v["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let delay = Duration::from_millis(args.token_delay_ms);
    stats.active.fetch_add(1, Ordering::Relaxed);
    let guard = StreamGuard {
        stats: stats.clone(),
        complete: false,
    };
    let chunk = move |content: &str, fin: Option<&str>| -> String {
        let fin = fin.map(|f| format!("\"{f}\"")).unwrap_or("null".into());
        if chat {
            format!("data: {{\"id\":\"stub-1\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"stub\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":{fin}}}]}}\n\n")
        } else {
            format!("data: {{\"id\":\"stub-1\",\"object\":\"text_completion\",\"created\":0,\"model\":\"stub\",\"choices\":[{{\"index\":0,\"text\":\"{content}\",\"finish_reason\":{fin}}}]}}\n\n")
        }
    };
    let frames = futures::stream::unfold((0u32, guard), move |(i, mut guard)| {
        let usage = usage.clone();
        async move {
            if i > n {
                return None;
            }
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let data = if i < n {
                chunk(if i == 0 { "tok" } else { " tok" }, None)
            } else {
                let mut s = chunk("", Some(finish));
                if include_usage {
                    s.push_str(&format!("data: {{\"id\":\"stub-1\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"stub\",\"choices\":[],\"usage\":{usage}}}\n\n"));
                }
                s.push_str("data: [DONE]\n\n");
                guard.complete = true;
                s
            };
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(data))),
                (i + 1, guard),
            ))
        }
    });
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .expect("static response")
}

/// Binds `args.listen`, prints the bound address, and serves forever.
pub async fn run(args: StubArgs) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("stub listening on http://{local}");
    serve(listener, args, Arc::new(Stats::default())).await
}

/// Serves on `listener`. Connections live in this future's task set: dropping or aborting
/// the future closes every connection at once, as if the upstream process died.
pub async fn serve(
    listener: tokio::net::TcpListener,
    args: StubArgs,
    stats: Arc<Stats>,
) -> Result<(), String> {
    let args = Arc::new(args);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => accepted.map_err(|e| e.to_string())?,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let _ = tcp.set_nodelay(true);
        let (args, stats) = (args.clone(), stats.clone());
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (args, stats) = (args.clone(), stats.clone());
                async move { Ok::<_, Infallible>(handle(req, args, stats).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
