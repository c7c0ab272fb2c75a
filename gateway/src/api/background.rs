//! Background responses (`background: true`, where the gateway stores answers): the
//! request is admitted and routed as any other (a refusal — a 429, a 404 — is answered
//! at once, and nothing is stored), then answered with the `response` object as it
//! starts (`status: "in_progress"`, stored), or with its event stream where it asked to
//! stream, while a task of its own runs it to the end apart from the client (a client
//! that drops its stream does not stop it). The finished answer replaces the stored one
//! (`completed`, `incomplete`, or `failed` with its error), so a client polls
//! `GET /v1/responses/{id}`, or follows its events again with
//! `GET /v1/responses/{id}?stream=true&starting_after=N` ([`super::event_log`]);
//! `POST /v1/responses/{id}/cancel` stops it (`cancelled`).
//!
//! The task runs the request streamed, and reads its events into the response's log: the
//! first one's `response` is stored at once; a failure's `response` is stored by the task
//! (a finished answer is stored by the pipeline, as every stored answer is). An answer
//! still running when the gateway stops is stored as `failed` when it starts again
//! ([`crate::response_store::ResponseStore::open`]).

use super::error::ApiError;
use super::event_log::{EventLog, LINGER};
use super::render::event_stream;
use super::stored_responses::on_store;
use crate::response_store::{Kept, Parent, ResponseStore, Revised, Stored};
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use serde_json::Value;
use std::sync::Arc;
use tracing::Instrument;

/// What a background response needs of its request.
pub struct Background {
    pub store: Arc<ResponseStore>,
    /// The tenant it belongs to.
    pub owner: String,
    /// Its conversation through its input (a JSON array of input items): after its
    /// parent's, if it continues a stored answer.
    pub conversation: String,
    /// The stored answer it continues.
    pub parent: Option<Parent>,
    /// The client asked for the event stream (else the `response` object).
    pub stream: bool,
}

/// The events of a Responses stream, one at a time (read whole, parsed only where needed:
/// [`data`]).
struct Events {
    body: Body,
    buf: BytesMut,
}

impl Events {
    /// The next event (with a `data:` line), whole; `None` at the end of the stream.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let event = self.buf.split_to(end + 2).freeze();
                if data_line(&event).is_some() {
                    return Some(event);
                }
                continue;
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(_)) | None => return None,
            }
        }
    }
}

/// An SSE event's `data:` line.
fn data_line(event: &[u8]) -> Option<&[u8]> {
    event
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"data: "))
}

/// An SSE event's data, parsed.
fn data(event: &[u8]) -> Option<Value> {
    serde_json::from_slice(data_line(event)?).ok()
}

/// Starts a background response from the pipeline's answer to its (streamed) request:
/// answers with its first `response` object, stored, and runs the rest in a task.
pub async fn start(bg: Background, answer: Response) -> Response {
    if !answer.status().is_success() {
        return answer;
    }
    let (parts, body) = answer.into_parts();
    let mut events = Events {
        body,
        buf: BytesMut::new(),
    };
    let Some(raw) = events.next().await else {
        return ApiError::Internal("a background response's stream did not start".into())
            .into_response();
    };
    let first = data(&raw).map_or(Value::Null, |e| e["response"].clone());
    let Some(id) = first["id"].as_str().map(str::to_string) else {
        return ApiError::Internal("a background response without an id".into()).into_response();
    };
    let stored = |response: &Value| Stored {
        id: id.clone(),
        tenant: bg.owner.clone(),
        response: response.to_string(),
        conversation: bg.conversation.clone(),
        parent: bg.parent.clone(),
    };
    let started = Kept {
        stored: Some(stored(&first)),
        unfinished: true,
        ..Kept::default()
    };
    if let Err(e) = bg.store.save(started).await {
        return ApiError::Internal(e.to_string()).into_response();
    }
    let (go, ready) = tokio::sync::oneshot::channel::<()>();
    let store = bg.store.clone();
    let key = (bg.owner.clone(), id.clone());
    let failed = stored(&Value::Null);
    let started = first.clone();
    let log = Arc::new(EventLog::default());
    log.push(raw);
    let events_log = log.clone();
    let task = tokio::spawn(
        async move {
            // Not before it is registered (so that it is there to cancel, and gone after).
            let _ = ready.await;
            // Only the last event is read: how the answer ended.
            let mut last = None;
            while let Some(raw) = events.next().await {
                last = Some(raw.clone());
                events_log.push(raw);
            }
            let last = last.as_deref().and_then(data);
            let end = last.as_ref().and_then(|e| e["type"].as_str());
            if end != Some("response.completed") && end != Some("response.incomplete") {
                let response = last
                    .as_ref()
                    .and_then(|e| e.get("response"))
                    .filter(|r| r["status"] == "failed")
                    .cloned()
                    .unwrap_or_else(|| {
                        let r = failure(&started, "the response's stream ended early");
                        events_log.push(failed_event(&r, events_log.count()));
                        r
                    });
                let failed = Stored {
                    response: response.to_string(),
                    ..failed
                };
                if let Err(e) = store.save(failed).await {
                    tracing::error!(error = %e, "storing a failed background response");
                }
            }
            events_log.finish();
            store.unregister(&key);
            tokio::spawn(linger(store, key, events_log));
        }
        .instrument(tracing::Span::current()),
    );
    let key = (bg.owner, id);
    bg.store.streams.insert(key.clone(), log.clone());
    bg.store.run(key, task);
    let _ = go.send(());
    let mut resp = if bg.stream {
        event_stream(log.follow(0))
    } else {
        axum::Json(first).into_response()
    };
    for (k, v) in &parts.headers {
        if k.as_str().starts_with("x-ratelimit") || k.as_str() == "x-request-id" {
            resp.headers_mut().insert(k.clone(), v.clone());
        }
    }
    resp
}

/// Keeps a finished response's events [`LINGER`] for readers coming back, then drops
/// them (unless a newer log took the key).
async fn linger(store: Arc<ResponseStore>, key: (String, String), log: Arc<EventLog>) {
    tokio::time::sleep(LINGER).await;
    store.streams.remove_if(&key, |_, l| Arc::ptr_eq(l, &log));
}

/// A `response.failed` event for `response`, numbered `seq`.
fn failed_event(response: &Value, seq: usize) -> Bytes {
    let data = serde_json::json!({
        "type": "response.failed",
        "sequence_number": seq,
        "response": response,
    });
    Bytes::from(format!("event: response.failed\ndata: {data}\n\n"))
}

/// `response` (as stored when it started) `failed` with `why`.
fn failure(response: &Value, why: &str) -> Value {
    let mut r = response.clone();
    r["status"] = "failed".into();
    r["error"] = serde_json::json!({"code": "server_error", "message": why});
    r
}

/// Stops the running background response `key` (owner, id), if it runs: its task aborted
/// (its answer no longer stored when it ends), its readers' events ended where they
/// stopped. `None` where none such runs; else whether it had ended before it was stopped.
pub async fn stop(store: &Arc<ResponseStore>, key: &(String, String)) -> Option<bool> {
    let task = store.unregister(key)?;
    task.abort();
    let finished = task.await.is_ok();
    if let Some(log) = store.streams.get(key).map(|l| l.clone()) {
        log.finish();
        tokio::spawn(linger(store.clone(), key.clone(), log));
    }
    Some(finished)
}

/// Cancels `owner`'s running background response `id`: its task stopped, and it is
/// stored `cancelled` (as it stood when it started). `None` where none such runs (it
/// finished, or never ran here).
pub async fn cancel(
    store: &Arc<ResponseStore>,
    owner: &str,
    id: &str,
) -> Result<Option<Value>, ApiError> {
    let key = (owner.to_string(), id.to_string());
    if stop(store, &key).await != Some(false) {
        // Not running, or it ended before it could be stopped: as it was stored.
        return Ok(None);
    }
    let (owner, id) = key.clone();
    let looked = (owner.clone(), id.clone());
    let Some(stored) = on_store(store, move |s| s.response(&looked.0, &looked.1)).await? else {
        return Ok(None);
    };
    let mut response: Value =
        serde_json::from_str(&stored).map_err(|e| ApiError::Internal(e.to_string()))?;
    response["status"] = "cancelled".into();
    let revised = Revised {
        id,
        tenant: owner,
        response: response.to_string(),
    };
    store
        .save(Kept {
            revised: Some(revised),
            ..Kept::default()
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Some(response))
}

/// `GET /v1/responses/{id}?stream=true&starting_after=N`: the events of `owner`'s
/// background response `id` after the `N`th (all of them without it), followed to its
/// end; `None` where it has no events kept (not a background response, or one that ended
/// more than [`LINGER`] ago).
pub fn follow(
    store: &ResponseStore,
    owner: &str,
    id: &str,
    after: Option<usize>,
) -> Option<Response> {
    let log = store
        .streams
        .get(&(owner.to_string(), id.to_string()))
        .map(|l| l.clone())?;
    Some(event_stream(log.follow(after.map_or(0, |n| n + 1))))
}

/// A body of `data` (for tests of [`Events`]).
#[cfg(test)]
fn body(chunks: Vec<&'static str>) -> Body {
    let stream = futures::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from_static(c.as_bytes()))),
    );
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_are_read_across_chunks() {
        let mut events = Events {
            body: body(vec![
                "event: response.created\ndata: {\"type\":\"response.cr",
                "eated\",\"response\":{\"id\":\"resp_1\"}}\n\nevent: x\ndata: {\"type\":\"x\"}\n",
                "\n",
            ]),
            buf: BytesMut::new(),
        };
        let raw = events.next().await.expect("an event");
        let first = data(&raw).expect("JSON");
        assert_eq!(first["response"]["id"], "resp_1");
        assert!(
            raw.starts_with(b"event: response.created\ndata: {"),
            "{raw:?}"
        );
        assert!(raw.ends_with(b"}}\n\n"), "{raw:?}");
        let second = events.next().await.expect("an event");
        assert_eq!(data(&second).expect("JSON")["type"], "x");
        assert!(events.next().await.is_none());
    }

    #[test]
    fn a_failure_keeps_the_response_and_says_why() {
        let r = failure(
            &serde_json::json!({"id": "resp_1", "status": "in_progress"}),
            "gone",
        );
        assert_eq!(
            (r["id"].as_str(), r["status"].as_str()),
            (Some("resp_1"), Some("failed"))
        );
        assert_eq!(r["error"]["message"], "gone");
    }
}
