//! Rendering a response in the OpenAI shape: whole JSON bodies and SSE frames
//! (`data: {json}\n\n`, ending with `data: [DONE]\n\n`) for chat and completions; the
//! Responses API's shapes are [`super::render_responses`]'s, behind the same methods.

use super::error::ApiError;
use super::render_responses::ResponsesRender;
use super::tools::{self, Answer, AnswerStream, Piece};
use super::types::*;
use super::validate::{Endpoint, ResponsesInfo};
use crate::response_store::{Kept, Saver};
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
    /// Per choice: characters of completion text rendered so far (the legacy
    /// `text_offset`).
    offsets: Vec<usize>,
    /// The answers are tool calls (see [`tools`]): streamed, each choice's text is read
    /// as it comes, and sent as a call's name then its arguments (or as words).
    tools: bool,
    answers: Vec<AnswerStream>,
    /// `/v1/responses`: its renderer (every method hands over to it).
    responses: Option<Box<ResponsesRender>>,
}

/// A tool call of the response (`index`: in a stream's delta).
fn tool_call<'a>(name: &'a str, arguments: &'a str, index: Option<u32>) -> ToolCallOut<'a> {
    ToolCallOut {
        index,
        id: Some(tools::call_id()),
        kind: Some("function"),
        function: FunctionOut {
            name: Some(name),
            arguments,
        },
    }
}

/// One finished choice of a whole response.
pub struct ChoiceOut<'a> {
    pub text: &'a str,
    /// A reasoning model's thinking (empty where there was none).
    pub reasoning: &'a str,
    pub logprobs: &'a [TokenLogprob],
    pub finish: FinishReason,
    /// An embeddings request's: the input's vector.
    pub embedding: &'a [f32],
    /// vLLM's `prompt_logprobs`, where asked ([`super::prompt_logprobs`]).
    pub prompt_logprobs: Option<&'a serde_json::Value>,
}

fn frame<T: Serialize>(out: &mut BytesMut, v: &T) {
    out.put_slice(b"data: ");
    // Serializing these plain structs cannot fail; an empty frame would be the worst case.
    let _ = serde_json::to_writer((&mut *out).writer(), v);
    out.put_slice(b"\n\n");
}

impl Renderer {
    /// A renderer of `n` choices (`tools`: answers are tool calls; `responses`: what a
    /// `/v1/responses` answer needs of its request, and where it is stored if it is).
    pub fn new(
        endpoint: Endpoint,
        model: &str,
        include_usage: bool,
        logprobs: bool,
        n: usize,
        tools: bool,
        responses: Option<(ResponsesInfo, Option<Saver>)>,
    ) -> Self {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let responses = match (endpoint, responses) {
            (Endpoint::Responses, Some((info, saver))) => Some(Box::new(ResponsesRender::new(
                model, created, info, saver, logprobs,
            ))),
            _ => None,
        };
        let id = match (endpoint, &responses) {
            (_, Some(r)) => r.id().to_string(),
            (Endpoint::Completion, _) => format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
            _ => format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        };
        Self {
            endpoint,
            id,
            model: model.to_string(),
            created,
            include_usage,
            logprobs,
            offsets: vec![0; n.max(1)],
            tools,
            answers: (0..if tools { n.max(1) } else { 0 })
                .map(|_| AnswerStream::default())
                .collect(),
            responses,
        }
    }

    fn usage_field(&self) -> Option<Option<UsageOut>> {
        self.include_usage.then_some(None)
    }

    fn chunk(
        &self,
        out: &mut BytesMut,
        index: usize,
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
                        index: index as u32,
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
                        index: index as u32,
                        text,
                        logprobs: logprobs.map(|items| {
                            TextLogprobs::new(items, self.offsets.get(index).copied().unwrap_or(0))
                        }),
                        finish_reason: finish,
                        prompt_logprobs: None,
                    }],
                    usage: self.usage_field(),
                },
            ),
            // Neither streams its own way here (embeddings never stream).
            Endpoint::Responses | Endpoint::Embeddings { .. } => {}
        }
    }

    /// The first frames of a chat stream announce the assistant role, one per choice.
    pub fn role_frame(&mut self, out: &mut BytesMut) {
        if let Some(r) = &mut self.responses {
            r.start(out, self.tools);
            return;
        }
        if self.endpoint == Endpoint::Chat {
            for index in 0..self.offsets.len() {
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(""),
                    ..Delta::default()
                };
                self.chunk(out, index, delta, "", None, None);
            }
        }
    }

    /// A piece of choice `index`'s text, with its tokens' log-probabilities when the
    /// request asked.
    pub fn delta_frame(
        &mut self,
        out: &mut BytesMut,
        index: usize,
        text: &str,
        logprobs: &[TokenLogprob],
    ) {
        if self.tools {
            let pieces = match self.answers.get_mut(index) {
                Some(a) => a.push(text),
                None => Vec::new(),
            };
            for p in pieces {
                match &mut self.responses {
                    Some(r) => r.piece(out, p),
                    None => self.piece_frame(out, index, &p),
                }
            }
            return;
        }
        if let Some(r) = &mut self.responses {
            r.text(out, text, logprobs);
            return;
        }
        let delta = Delta {
            content: Some(text),
            ..Delta::default()
        };
        self.text_chunk(out, index, delta, text, logprobs);
        if let Some(o) = self.offsets.get_mut(index) {
            *o += logprobs
                .iter()
                .map(|t| t.token.chars().count())
                .sum::<usize>();
        }
    }

    /// A piece of choice `index`'s thinking (a reasoning model's), with its tokens'
    /// log-probabilities when the request asked: a chat delta's `reasoning_content`, the
    /// Responses API's reasoning item; a completion's text (no completion is split; an
    /// upstream's thinking is its text there).
    pub fn reasoning_frame(
        &mut self,
        out: &mut BytesMut,
        index: usize,
        text: &str,
        logprobs: &[TokenLogprob],
    ) {
        if let Some(r) = &mut self.responses {
            r.reasoning(out, text);
            return;
        }
        if self.endpoint != Endpoint::Chat {
            return self.delta_frame(out, index, text, logprobs);
        }
        let delta = Delta {
            reasoning_content: Some(text),
            ..Delta::default()
        };
        self.text_chunk(out, index, delta, text, logprobs);
    }

    /// A chunk of generated `text` (as `delta`), with its tokens' log-probabilities when
    /// the request asked.
    fn text_chunk(
        &self,
        out: &mut BytesMut,
        index: usize,
        delta: Delta<'_>,
        text: &str,
        logprobs: &[TokenLogprob],
    ) {
        let shown = self.logprobs.then_some(logprobs);
        self.chunk(out, index, delta, text, shown, None);
    }

    /// A piece of a tool-calling answer, as a chat delta.
    fn piece_frame(&self, out: &mut BytesMut, index: usize, piece: &Piece) {
        let delta = match piece {
            Piece::Call { index, name } => Delta {
                tool_calls: Some(vec![tool_call(name, "", Some(*index))]),
                ..Delta::default()
            },
            Piece::Arguments { index, text } => Delta {
                tool_calls: Some(vec![ToolCallOut {
                    index: Some(*index),
                    id: None,
                    kind: None,
                    function: FunctionOut {
                        name: None,
                        arguments: text,
                    },
                }]),
                ..Delta::default()
            },
            Piece::Content(text) => Delta {
                content: Some(text),
                ..Delta::default()
            },
        };
        self.chunk(out, index, delta, "", None, None);
    }

    /// Choice `index`'s finish frame (for tool calls, after what was still held).
    pub fn finish_frame(&mut self, out: &mut BytesMut, index: usize, finish: FinishReason) {
        let mut finish = finish;
        if self.tools {
            let (pieces, called) = match self.answers.get_mut(index) {
                Some(a) => a.finish(),
                None => (Vec::new(), false),
            };
            for p in pieces {
                match &mut self.responses {
                    Some(r) => r.piece(out, p),
                    None => self.piece_frame(out, index, &p),
                }
            }
            if called && finish == FinishReason::Stop {
                finish = FinishReason::ToolCalls;
            }
        }
        match &mut self.responses {
            Some(r) => r.finish(out, finish),
            None => self.chunk(out, index, Delta::default(), "", None, Some(finish)),
        }
    }

    /// The usage frame (when asked for) and `[DONE]`, once every choice has finished.
    pub fn end_frames(&mut self, out: &mut BytesMut, usage: Usage) {
        if let Some(r) = &mut self.responses {
            r.end(out, usage);
            return;
        }
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
                Endpoint::Responses | Endpoint::Embeddings { .. } => {}
            }
        }
        out.put_slice(b"data: [DONE]\n\n");
    }

    /// A stored `/v1/responses` answer, once finished: its record and where it goes.
    pub fn take_stored(&mut self) -> Option<(Saver, Kept)> {
        self.responses.as_mut()?.take_stored()
    }

    /// A mid-stream failure: an error event in the OpenAI shape; the stream then ends.
    pub fn error_frame(&mut self, out: &mut BytesMut, err: &ApiError) {
        if let Some(r) = &mut self.responses {
            r.error(out, err);
            return;
        }
        out.put_slice(b"data: ");
        out.put_slice(err.to_json().as_bytes());
        out.put_slice(b"\n\n");
    }

    /// A whole (non-streamed) response body, with each choice's tokens' log-probabilities
    /// when the request asked.
    pub fn full(&mut self, choices: &[ChoiceOut<'_>], usage: Usage) -> Bytes {
        if let (Some(r), Some(c)) = (&mut self.responses, choices.first()) {
            return r
                .full(c.reasoning, c.text, c.logprobs, c.finish, self.tools, usage)
                .freeze();
        }
        // With tool calls, each choice's answer document, when it ended complete.
        let answers: Vec<Option<Answer>> = choices
            .iter()
            .map(|c| {
                (self.tools && c.finish == FinishReason::Stop)
                    .then(|| tools::answer(c.text))
                    .flatten()
            })
            .collect();
        fn reasoning<'b>(c: &ChoiceOut<'b>) -> Option<&'b str> {
            Some(c.reasoning).filter(|r| !r.is_empty())
        }
        let body = match self.endpoint {
            Endpoint::Chat => serde_json::to_vec(&ChatCompletion {
                id: &self.id,
                object: "chat.completion",
                created: self.created,
                model: &self.model,
                choices: choices
                    .iter()
                    .enumerate()
                    .zip(&answers)
                    .map(|((i, c), answer)| ChatChoice {
                        index: i as u32,
                        message: match answer {
                            Some(Answer::Calls(calls)) => AssistantMessage {
                                role: "assistant",
                                content: None,
                                reasoning_content: reasoning(c),
                                tool_calls: Some(
                                    calls
                                        .iter()
                                        .map(|c| tool_call(&c.name, &c.arguments, None))
                                        .collect(),
                                ),
                            },
                            Some(Answer::Content(text)) => AssistantMessage {
                                role: "assistant",
                                content: Some(text),
                                reasoning_content: reasoning(c),
                                tool_calls: None,
                            },
                            None => AssistantMessage {
                                role: "assistant",
                                content: Some(c.text),
                                reasoning_content: reasoning(c),
                                tool_calls: None,
                            },
                        },
                        logprobs: self
                            .logprobs
                            .then_some(c.logprobs)
                            .map(|content| ChatLogprobs {
                                content,
                                refusal: None,
                            }),
                        finish_reason: match answer {
                            Some(Answer::Calls(_)) => FinishReason::ToolCalls,
                            _ => c.finish,
                        },
                    })
                    .collect(),
                usage: usage.into(),
                system_fingerprint: None,
                // One prompt, whichever choice: vLLM's is the response's.
                prompt_logprobs: choices.first().and_then(|c| c.prompt_logprobs),
            }),
            Endpoint::Completion => serde_json::to_vec(&TextCompletion {
                id: &self.id,
                object: "text_completion",
                created: self.created,
                model: &self.model,
                choices: choices
                    .iter()
                    .enumerate()
                    .map(|(i, c)| TextChoice {
                        index: i as u32,
                        text: c.text,
                        logprobs: self
                            .logprobs
                            .then_some(c.logprobs)
                            .map(|items| TextLogprobs::new(items, 0)),
                        finish_reason: Some(c.finish),
                        prompt_logprobs: c.prompt_logprobs,
                    })
                    .collect(),
                usage: usage.into(),
            }),
            Endpoint::Responses => Ok(Vec::new()),
            Endpoint::Embeddings { base64, .. } => {
                let vectors: Vec<&[f32]> = choices.iter().map(|c| c.embedding).collect();
                Ok(super::embeddings::body(
                    &self.model,
                    &vectors,
                    usage,
                    base64,
                ))
            }
        };
        Bytes::from(body.unwrap_or_default())
    }
}

/// An SSE response of `body` (its events as they come, not cached on the way).
pub fn event_stream(body: axum::body::Body) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [
            (http::header::CONTENT_TYPE, "text/event-stream"),
            (http::header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
