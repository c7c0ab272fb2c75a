//! Rendering a response in the OpenAI shape: whole JSON bodies and SSE frames
//! (`data: {json}\n\n`, ending with `data: [DONE]\n\n`), for both endpoints.

use super::error::ApiError;
use super::types::*;
use super::validate::Endpoint;
use crate::worker::{FinishReason, TokenLogprob, Usage};
use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

/// Renders one response (one completion id) for one endpoint.
pub struct Renderer {
    pub endpoint: Endpoint,
    pub id: String,
    pub model: String,
    pub created: u64,
    pub include_usage: bool,
    /// The request asked for log-probabilities.
    pub logprobs: bool,
    /// Characters of completion text rendered so far (the legacy `text_offset`).
    offset: usize,
}

fn frame<T: Serialize>(out: &mut BytesMut, v: &T) {
    out.put_slice(b"data: ");
    // Serializing these plain structs cannot fail; an empty frame would be the worst case.
    let _ = serde_json::to_writer((&mut *out).writer(), v);
    out.put_slice(b"\n\n");
}

impl Renderer {
    pub fn new(endpoint: Endpoint, model: &str, include_usage: bool, logprobs: bool) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl-",
            Endpoint::Completion => "cmpl-",
        };
        Self {
            endpoint,
            id: format!("{prefix}{}", uuid::Uuid::new_v4().simple()),
            model: model.to_string(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            include_usage,
            logprobs,
            offset: 0,
        }
    }

    fn usage_field(&self) -> Option<Option<UsageOut>> {
        self.include_usage.then_some(None)
    }

    fn chunk(
        &self,
        out: &mut BytesMut,
        delta: Delta<'_>,
        text: &str,
        logprobs: Option<&[TokenLogprob]>,
        finish: Option<FinishReason>,
    ) {
        match self.endpoint {
            Endpoint::Chat => frame(
                out,
                &ChatChunk {
                    id: &self.id,
                    object: "chat.completion.chunk",
                    created: self.created,
                    model: &self.model,
                    choices: vec![ChunkChoice {
                        index: 0,
                        delta,
                        logprobs: logprobs.map(|content| ChatLogprobs {
                            content,
                            refusal: None,
                        }),
                        finish_reason: finish,
                    }],
                    usage: self.usage_field(),
                },
            ),
            Endpoint::Completion => frame(
                out,
                &TextChunk {
                    id: &self.id,
                    object: "text_completion",
                    created: self.created,
                    model: &self.model,
                    choices: vec![TextChoice {
                        index: 0,
                        text,
                        logprobs: logprobs.map(|items| TextLogprobs::new(items, self.offset)),
                        finish_reason: finish,
                    }],
                    usage: self.usage_field(),
                },
            ),
        }
    }

    /// The first frame of a chat stream announces the assistant role.
    pub fn role_frame(&self, out: &mut BytesMut) {
        if self.endpoint == Endpoint::Chat {
            let delta = Delta {
                role: Some("assistant"),
                content: Some(""),
            };
            self.chunk(out, delta, "", None, None);
        }
    }

    /// A piece of text, with its tokens' log-probabilities when the request asked.
    pub fn delta_frame(&mut self, out: &mut BytesMut, text: &str, logprobs: &[TokenLogprob]) {
        let delta = Delta {
            role: None,
            content: Some(text),
        };
        self.chunk(out, delta, text, self.logprobs.then_some(logprobs), None);
        self.offset += logprobs
            .iter()
            .map(|t| t.token.chars().count())
            .sum::<usize>();
    }

    /// The finish frame, the usage frame (when asked for) and `[DONE]`.
    pub fn final_frames(&self, out: &mut BytesMut, finish: FinishReason, usage: Usage) {
        self.chunk(out, Delta::default(), "", None, Some(finish));
        if self.include_usage {
            let usage = Some(Some(UsageOut::from(usage)));
            match self.endpoint {
                Endpoint::Chat => frame(
                    out,
                    &ChatChunk {
                        id: &self.id,
                        object: "chat.completion.chunk",
                        created: self.created,
                        model: &self.model,
                        choices: vec![],
                        usage,
                    },
                ),
                Endpoint::Completion => frame(
                    out,
                    &TextChunk {
                        id: &self.id,
                        object: "text_completion",
                        created: self.created,
                        model: &self.model,
                        choices: vec![],
                        usage,
                    },
                ),
            }
        }
        out.put_slice(b"data: [DONE]\n\n");
    }

    /// A mid-stream failure: an error event in the OpenAI shape; the stream then ends.
    pub fn error_frame(&self, out: &mut BytesMut, err: &ApiError) {
        out.put_slice(b"data: ");
        out.put_slice(err.to_json().as_bytes());
        out.put_slice(b"\n\n");
    }

    /// A whole (non-streamed) response body, with its tokens' log-probabilities when the
    /// request asked.
    pub fn full(
        &self,
        text: &str,
        logprobs: &[TokenLogprob],
        finish: FinishReason,
        usage: Usage,
    ) -> Bytes {
        let logprobs = self.logprobs.then_some(logprobs);
        let body = match self.endpoint {
            Endpoint::Chat => serde_json::to_vec(&ChatCompletion {
                id: &self.id,
                object: "chat.completion",
                created: self.created,
                model: &self.model,
                choices: [ChatChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant",
                        content: text,
                    },
                    logprobs: logprobs.map(|content| ChatLogprobs {
                        content,
                        refusal: None,
                    }),
                    finish_reason: finish,
                }],
                usage: usage.into(),
                system_fingerprint: None,
            }),
            Endpoint::Completion => serde_json::to_vec(&TextCompletion {
                id: &self.id,
                object: "text_completion",
                created: self.created,
                model: &self.model,
                choices: [TextChoice {
                    index: 0,
                    text,
                    logprobs: logprobs.map(|items| TextLogprobs::new(items, 0)),
                    finish_reason: Some(finish),
                }],
                usage: usage.into(),
            }),
        };
        Bytes::from(body.unwrap_or_default())
    }
}
