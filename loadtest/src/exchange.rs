//! One request and its whole answer over a keep-alive HTTP/1.1 connection, timed: the
//! status, when the first generated text came and the gaps between later pieces (SSE
//! streams), the `usage` the answer reported, and the contract the gateway stated in its
//! `RateLimit-Policy` header.

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::time::Instant;

/// A connection's sending half.
pub type Conn = http1::SendRequest<Full<Bytes>>;

/// Opens a keep-alive connection to `addr` (`host:port`).
pub async fn connect(addr: &str) -> Result<Conn, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (send, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

/// Token counts from an answer's `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tokens {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
}

impl Tokens {
    pub fn add(&mut self, o: Tokens) {
        self.prompt += o.prompt;
        self.completion += o.completion;
        self.cached += o.cached;
    }
}

/// What one request met.
#[derive(Debug, Default)]
pub struct Exchange {
    /// The answer's status; `None`: no answer (the connection failed).
    pub status: Option<u16>,
    /// When the first piece of generated text arrived.
    pub first: Option<Instant>,
    /// Microseconds between successive pieces of a stream.
    pub gaps_us: Vec<u64>,
    /// When the answer was complete.
    pub end: Option<Instant>,
    pub usage: Option<Tokens>,
    /// A stream that carried an error event, or broke off.
    pub stream_error: bool,
    /// `RateLimit-Policy`'s tokens quota and window (seconds).
    pub policy: Option<(f64, f64)>,
    /// The answer's text (a tool call's arguments included), for the next turn.
    pub answer: String,
    /// The answer's id where the gateway stored it (a Responses answer with `store:
    /// true`): what the next turn continues.
    pub stored_id: Option<String>,
}

/// Sends `body` to `path` and reads the whole answer. On a connection failure the
/// connection should be dropped (`status: None`).
pub async fn exchange(
    conn: &mut Conn,
    authority: &str,
    path: &str,
    key: &str,
    body: Vec<u8>,
) -> Exchange {
    let mut out = Exchange::default();
    let req = http::Request::post(path)
        .header("host", authority)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)));
    let Ok(req) = req else { return out };
    // The connection takes its next request only once its task has finished the last
    // exchange; sending before that fails ("connection was not ready"), which under load
    // counted a kept-alive connection as broken.
    if conn.ready().await.is_err() {
        return out;
    }
    let resp = match conn.send_request(req).await {
        Ok(r) => r,
        Err(_) => return out,
    };
    out.status = Some(resp.status().as_u16());
    out.policy = resp
        .headers()
        .get("ratelimit-policy")
        .and_then(|v| v.to_str().ok())
        .and_then(tokens_policy);
    let stream = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    let mut last: Option<Instant> = None;
    let mut done = false;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(_)) => {
                out.stream_error = true;
                break;
            }
            Some(Ok(frame)) => {
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                buf.extend_from_slice(data);
                if !stream {
                    continue;
                }
                let now = Instant::now();
                // Whole events: `data: …` blocks ending with a blank line (after an
                // `event: <type>` line in the Responses API's streams).
                while let Some(at) = find(&buf, b"\n\n") {
                    let event = buf.split_to(at + 2);
                    let data = match event.strip_prefix(b"event: ") {
                        Some(typed) => find(typed, b"\ndata: ").map(|i| &typed[i + 7..]),
                        None => event.strip_prefix(b"data: "),
                    };
                    let Some(data) = data else {
                        continue;
                    };
                    let data = &data[..data.len() - 2];
                    if data == b"[DONE]" {
                        done = true;
                        continue;
                    }
                    let event = stream_event(data);
                    if let Event::Text(text) = &event {
                        out.answer.push_str(text);
                    }
                    match event {
                        Event::Text(_) | Event::Thinking => {
                            match last {
                                None => out.first = Some(now),
                                Some(t) => out.gaps_us.push((now - t).as_micros() as u64),
                            }
                            last = Some(now);
                        }
                        Event::Usage(u) => out.usage = Some(u),
                        Event::End(u) => {
                            out.usage = Some(u);
                            done = true;
                        }
                        Event::Error => out.stream_error = true,
                        Event::Started(id) => out.stored_id = id,
                        Event::Other => {}
                    }
                }
            }
        }
    }
    out.end = Some(Instant::now());
    if stream {
        out.stream_error |= !done;
    } else if out.status == Some(200) {
        let v: Value = serde_json::from_slice(&buf).unwrap_or(Value::Null);
        out.usage = usage(&v["usage"]);
        out.first = out.end;
        out.answer = answer_text(&v);
        out.stored_id = stored_id(&v);
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A whole answer's text: a chat message's, a completion's, or a response's output items'.
fn answer_text(v: &Value) -> String {
    let c = &v["choices"][0];
    if let Some(t) = c["message"]["content"].as_str().or(c["text"].as_str()) {
        return t.to_string();
    }
    let mut out = String::new();
    for item in v["output"].as_array().into_iter().flatten() {
        for part in item["content"].as_array().into_iter().flatten() {
            out.push_str(part["text"].as_str().unwrap_or_default());
        }
        out.push_str(item["arguments"].as_str().unwrap_or_default());
    }
    out
}

/// A `response` object's id, where it says it is stored.
fn stored_id(response: &Value) -> Option<String> {
    (response["store"] == true)
        .then(|| response["id"].as_str().map(str::to_string))
        .flatten()
}

enum Event {
    /// Generated text (or a tool call's piece).
    Text(String),
    /// A reasoning model's thinking (`reasoning_content`, the Responses API's
    /// `reasoning_text`): generated tokens, timed as the answer's are, but not part of the
    /// answer a conversation carries on with.
    Thinking,
    /// The Responses API's first event: the answer's id, where it is stored.
    Started(Option<String>),
    Usage(Tokens),
    /// The Responses API's last event (`response.completed` or `.incomplete`): usage, and
    /// the end of the stream.
    End(Tokens),
    Error,
    Other,
}

fn stream_event(data: &[u8]) -> Event {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return Event::Error;
    };
    if !v["error"].is_null() {
        return Event::Error;
    }
    // The Responses API's typed events.
    if let Some(kind) = v["type"].as_str() {
        return match kind {
            "response.output_text.delta" | "response.function_call_arguments.delta" => {
                Event::Text(v["delta"].as_str().unwrap_or_default().to_string())
            }
            "response.reasoning_text.delta" => Event::Thinking,
            "response.created" => Event::Started(stored_id(&v["response"])),
            "response.completed" | "response.incomplete" => match usage(&v["response"]["usage"]) {
                Some(u) => Event::End(u),
                None => Event::Error,
            },
            "error" | "response.failed" => Event::Error,
            _ => Event::Other,
        };
    }
    let c = &v["choices"][0];
    fn text(x: &Value) -> Option<&str> {
        x.as_str().filter(|s| !s.is_empty())
    }
    if let Some(t) = text(&c["text"]).or(text(&c["delta"]["content"])) {
        return Event::Text(t.to_string());
    }
    let d = &c["delta"];
    if text(&d["reasoning_content"])
        .or(text(&d["reasoning"]))
        .is_some()
    {
        return Event::Thinking;
    }
    if let Some(calls) = c["delta"]["tool_calls"].as_array() {
        let args = calls
            .iter()
            .filter_map(|t| t["function"]["arguments"].as_str());
        return Event::Text(args.collect());
    }
    match usage(&v["usage"]) {
        Some(u) => Event::Usage(u),
        None => Event::Other,
    }
}

/// An answer's `usage`, in chat's and completions' names or in the Responses API's.
fn usage(u: &Value) -> Option<Tokens> {
    let (prompt, completion, details) = match u.get("input_tokens") {
        Some(input) => (input, &u["output_tokens"], &u["input_tokens_details"]),
        None => (
            &u["prompt_tokens"],
            &u["completion_tokens"],
            &u["prompt_tokens_details"],
        ),
    };
    Some(Tokens {
        prompt: prompt.as_u64()?,
        // Embeddings generate nothing (their usage has no completion count).
        completion: completion.as_u64().unwrap_or(0),
        cached: details["cached_tokens"].as_u64().unwrap_or(0),
    })
}

/// The tokens quota and window of a `RateLimit-Policy` header (`"tokens";q=Q;w=W`).
pub fn tokens_policy(header: &str) -> Option<(f64, f64)> {
    header.split(',').find_map(|item| {
        let mut parts = item.trim().split(';');
        if parts.next()?.trim() != "\"tokens\"" {
            return None;
        }
        let (mut q, mut w) = (None, None);
        for p in parts {
            match p.trim().split_once('=') {
                Some(("q", v)) => q = v.parse().ok(),
                Some(("w", v)) => w = v.parse().ok(),
                _ => {}
            }
        }
        Some((q?, w?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tokens_policy_is_read_from_the_header() {
        assert_eq!(
            tokens_policy(r#""requests";q=10;w=10, "tokens";q=20000;w=10"#),
            Some((20000.0, 10.0))
        );
        assert_eq!(tokens_policy(r#""requests";q=10;w=10"#), None);
        assert_eq!(tokens_policy(r#""tokens";q=x;w=10"#), None);
    }

    #[test]
    fn stream_events_are_told_apart() {
        assert!(matches!(
            stream_event(br#"{"choices":[{"delta":{"content":"hi"}}]}"#),
            Event::Text(t) if t == "hi"
        ));
        assert!(matches!(
            stream_event(br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#),
            Event::Other
        ));
        assert!(matches!(
            stream_event(br#"{"choices":[{"text":"x"}]}"#),
            Event::Text(t) if t == "x"
        ));
        // A reasoning model's thinking: tokens, not the answer's text.
        assert!(matches!(
            stream_event(br#"{"choices":[{"delta":{"reasoning_content":"hm"}}]}"#),
            Event::Thinking
        ));
        assert!(matches!(
            stream_event(br#"{"type":"response.reasoning_text.delta","delta":"hm"}"#),
            Event::Thinking
        ));
        assert!(matches!(
            stream_event(br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":1}}}"#),
            Event::Usage(Tokens { prompt: 3, completion: 2, cached: 1 })
        ));
        assert!(matches!(
            stream_event(br#"{"error":{"message":"x"}}"#),
            Event::Error
        ));
        // The Responses API's.
        assert!(matches!(
            stream_event(br#"{"type":"response.output_text.delta","delta":"hi"}"#),
            Event::Text(t) if t == "hi"
        ));
        assert!(matches!(
            stream_event(br#"{"type":"response.created","response":{"usage":null}}"#),
            Event::Started(None)
        ));
        assert!(matches!(
            stream_event(br#"{"type":"response.created","response":{"id":"resp_1","store":true}}"#),
            Event::Started(Some(id)) if id == "resp_1"
        ));
        assert!(matches!(
            stream_event(br#"{"type":"response.in_progress","response":{}}"#),
            Event::Other
        ));
        assert!(matches!(
            stream_event(br#"{"type":"response.incomplete","response":{"usage":{"input_tokens":3,"output_tokens":2,"input_tokens_details":{"cached_tokens":1}}}}"#),
            Event::End(Tokens { prompt: 3, completion: 2, cached: 1 })
        ));
        assert!(matches!(
            stream_event(br#"{"type":"response.failed","response":{}}"#),
            Event::Error
        ));
    }

    #[test]
    fn whole_answers_give_their_text_and_stored_id() {
        let chat = serde_json::json!({"choices": [{"message": {"content": "hello"}}]});
        assert_eq!(answer_text(&chat), "hello");
        let completion = serde_json::json!({"choices": [{"text": "more"}]});
        assert_eq!(answer_text(&completion), "more");
        let response = serde_json::json!({"id": "resp_9", "store": true, "output": [
            {"type": "message", "content": [{"type": "output_text", "text": "a"},
                                            {"type": "output_text", "text": "b"}]}]});
        assert_eq!(answer_text(&response), "ab");
        assert_eq!(stored_id(&response).as_deref(), Some("resp_9"));
        assert_eq!(
            stored_id(&serde_json::json!({"id": "resp_9", "store": false})),
            None
        );
    }
}
