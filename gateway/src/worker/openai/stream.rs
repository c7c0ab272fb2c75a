//! A streamed upstream answer: its SSE body parsed chunk by chunk as the gateway's client
//! reads, each chunk's text and log-probabilities an event.

use super::wire::{UpstreamAnswer, UpstreamLogprobs};
use super::InFlight;
use crate::worker::sse_parse::SseParser;
use crate::worker::{
    estimate_prompt_tokens, EventStream, FinishReason, Prompt, Usage, WorkerError, WorkerEvent,
    WorkerRequest,
};
use futures::StreamExt;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::sync::Arc;

struct StreamState {
    body: Incoming,
    parser: SseParser,
    req: Arc<WorkerRequest>,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
    deltas: u32,
    /// The second event of a chunk that carried both thinking and answer text.
    next: Option<WorkerEvent>,
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
            ..Usage::default()
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
        let chat = matches!(self.req.prompt, Prompt::Chat(..));
        let text = choice.text(chat).unwrap_or_default().to_string();
        // A reasoning model's thinking, apart (before any answer text of the same chunk).
        let thinking = choice.reasoning().map(|r| WorkerEvent::Delta {
            text: r.to_string(),
            tokens: 1,
            logprobs: Vec::new(),
            reasoning: true,
        });
        let logprobs = choice
            .logprobs
            .map(UpstreamLogprobs::items)
            .unwrap_or_default();
        let answer = (!text.is_empty() || !logprobs.is_empty()).then_some(WorkerEvent::Delta {
            text,
            tokens: 1,
            logprobs,
            reasoning: false,
        });
        let (first, second) = match (thinking, answer) {
            (Some(t), a) => (t, a),
            (None, Some(a)) => (a, None),
            (None, None) => return None,
        };
        self.deltas += 1 + second.is_some() as u32;
        self.next = second;
        Some(Ok(first))
    }
}

pub(super) fn stream_events(
    body: Incoming,
    req: Arc<WorkerRequest>,
    guard: InFlight,
) -> EventStream {
    let state = StreamState {
        body,
        parser: SseParser::default(),
        req,
        finish: None,
        usage: None,
        deltas: 0,
        next: None,
        ended: false,
        _guard: guard,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.next.take() {
                return Some((Ok(ev), st));
            }
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
