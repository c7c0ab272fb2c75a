//! Background responses (`background: true`, where the gateway stores answers): the
//! request is admitted and routed as any other (a refusal — a 429, a 404 — is answered
//! at once, and nothing is stored), then answered with the `response` object as it
//! starts (`status: "in_progress"`, stored), while a task of its own runs it to the end
//! apart from the client. The finished answer replaces the stored one (`completed`,
//! `incomplete`, or `failed` with its error), so a client polls
//! `GET /v1/responses/{id}`; `POST /v1/responses/{id}/cancel` stops it (`cancelled`).
//!
//! The task runs the request streamed, and reads its events: the first one's `response`
//! is what the client is answered; a failure's `response` is stored by the task (a
//! finished answer is stored by the pipeline, as every stored answer is). An answer still
//! running when the gateway stops is stored as `failed` when it starts again
//! ([`crate::response_store::ResponseStore::open`]).

use super::error::ApiError;
use crate::response_store::{ResponseStore, Stored};
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use http_body_util::BodyExt;
use serde_json::Value;
use std::sync::Arc;
use tracing::Instrument;

/// What a background response needs of its request.
pub struct Background {
    pub store: Arc<ResponseStore>,
    /// The tenant it belongs to.
    pub owner: String,
    /// Its conversation through its input (a JSON array of input items).
    pub conversation: String,
}

/// The events of a Responses stream, one `data:` payload at a time.
struct Events {
    body: Body,
    buf: BytesMut,
}

impl Events {
    /// The next event's data, parsed; `None` at the end of the stream.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let event = self.buf.split_to(end + 2);
                let data = event[..]
                    .split(|&b| b == b'\n')
                    .find_map(|line| line.strip_prefix(b"data: "));
                if let Some(Ok(v)) = data.map(serde_json::from_slice) {
                    return Some(v);
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
    let Some(first) = events.next().await.and_then(|e| e.get("response").cloned()) else {
        return ApiError::Internal("a background response's stream did not start".into())
            .into_response();
    };
    let Some(id) = first["id"].as_str().map(str::to_string) else {
        return ApiError::Internal("a background response without an id".into()).into_response();
    };
    let stored = |response: &Value| Stored {
        id: id.clone(),
        tenant: bg.owner.clone(),
        response: response.to_string(),
        conversation: bg.conversation.clone(),
    };
    if let Err(e) = bg.store.save(stored(&first)).await {
        return ApiError::Internal(e.to_string()).into_response();
    }
    let (go, ready) = tokio::sync::oneshot::channel::<()>();
    let store = bg.store.clone();
    let key = (bg.owner.clone(), id.clone());
    let failed = stored(&Value::Null);
    let started = first.clone();
    let task = tokio::spawn(
        async move {
            // Not before it is registered (so that it is there to cancel, and gone after).
            let _ = ready.await;
            let mut last = None;
            while let Some(event) = events.next().await {
                last = Some(event);
            }
            let end = last.as_ref().and_then(|e| e["type"].as_str());
            if end != Some("response.completed") && end != Some("response.incomplete") {
                let response = last
                    .as_ref()
                    .and_then(|e| e.get("response"))
                    .filter(|r| r["status"] == "failed")
                    .cloned()
                    .unwrap_or_else(|| failure(&started, "the response's stream ended early"));
                let failed = Stored {
                    response: response.to_string(),
                    ..failed
                };
                if let Err(e) = store.save(failed).await {
                    tracing::error!(error = %e, "storing a failed background response");
                }
            }
            store.running.remove(&key);
        }
        .instrument(tracing::Span::current()),
    );
    bg.store.running.insert((bg.owner, id), task);
    let _ = go.send(());
    let mut resp = axum::Json(first).into_response();
    for (k, v) in &parts.headers {
        if k.as_str().starts_with("x-ratelimit") || k.as_str() == "x-request-id" {
            resp.headers_mut().insert(k.clone(), v.clone());
        }
    }
    resp
}

/// `response` (as stored when it started) `failed` with `why`.
fn failure(response: &Value, why: &str) -> Value {
    let mut r = response.clone();
    r["status"] = "failed".into();
    r["error"] = serde_json::json!({"code": "server_error", "message": why});
    r
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
    let Some((_, task)) = store.running.remove(&key) else {
        return Ok(None);
    };
    task.abort();
    let finished = task.await.is_ok();
    if finished {
        // It ended before it could be stopped: as it was stored.
        return Ok(None);
    }
    let s = {
        let store = store.clone();
        let (owner, id) = key.clone();
        tokio::task::spawn_blocking(move || store.get(&owner, &id))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(e.to_string()))?
    };
    let Some(mut s) = s else {
        return Ok(None);
    };
    let mut response: Value =
        serde_json::from_str(&s.response).map_err(|e| ApiError::Internal(e.to_string()))?;
    response["status"] = "cancelled".into();
    s.response = response.to_string();
    store
        .save(s)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Some(response))
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
        let first = events.next().await.expect("an event");
        assert_eq!(first["response"]["id"], "resp_1");
        assert_eq!(events.next().await.expect("an event")["type"], "x");
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
