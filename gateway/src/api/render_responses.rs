//! Rendering an answer as OpenAI's Responses API does: a whole `response` object, or its
//! stream of typed events (`event: <type>` / `data: {…, "sequence_number"}`): the
//! response created and in progress, each output item (a `message` with one `output_text`
//! part, or a `function_call`) added, its text or arguments in deltas, done, and the
//! response `completed` (or `incomplete` when `max_output_tokens` cut it) with its usage.
//! A stream that fails ends with an `error` event and `response.failed`.
//!
//! Tool-calling answers arrive as [`Piece`]s ([`super::tools::AnswerStream`]); each call
//! becomes its own `function_call` item, words a `message` item.

use super::error::ApiError;
use super::tools::{self, Answer, Piece};
use crate::worker::{FinishReason, TokenLogprob, Usage};
use bytes::{BufMut, BytesMut};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// One output item as it is built.
enum Item {
    Message {
        id: String,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        /// The call's index in the answer (what its pieces name).
        index: u32,
    },
}

/// The most frequent event, typed so that a token's delta costs no JSON tree.
#[derive(Serialize)]
struct TextDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    sequence_number: u64,
    item_id: &'a str,
    output_index: usize,
    content_index: u32,
    delta: &'a str,
    logprobs: &'a [TokenLogprob],
}

/// The Responses renderer of one answer (the endpoint has one choice).
pub struct ResponsesRender {
    id: String,
    model: String,
    created: u64,
    /// What the response repeats of the request (see [`super::responses`]).
    echo: Arc<Map<String, Value>>,
    /// Tokens' log-probabilities go into the output text.
    logprobs: bool,
    seq: u64,
    items: Vec<Item>,
    /// How the answer ended, once it has.
    finish: Option<FinishReason>,
}

fn item_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

fn usage_json(u: Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

impl ResponsesRender {
    pub fn new(model: &str, created: u64, echo: Arc<Map<String, Value>>, logprobs: bool) -> Self {
        Self {
            id: item_id("resp"),
            model: model.to_string(),
            created,
            echo,
            logprobs,
            seq: 0,
            items: Vec::new(),
            finish: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// One SSE event: `event: <type>` and its data with the next sequence number.
    fn event<T: Serialize>(&mut self, out: &mut BytesMut, kind: &str, data: &T) {
        out.put_slice(b"event: ");
        out.put_slice(kind.as_bytes());
        out.put_slice(b"\ndata: ");
        // Serializing these plain values cannot fail; an empty event would be the worst case.
        let _ = serde_json::to_writer((&mut *out).writer(), data);
        out.put_slice(b"\n\n");
        self.seq += 1;
    }

    /// An event whose data is `fields` with its type and sequence number.
    fn event_with(&mut self, out: &mut BytesMut, kind: &str, fields: Value) {
        let mut data = json!({"type": kind, "sequence_number": self.seq});
        if let (Some(d), Value::Object(f)) = (data.as_object_mut(), fields) {
            d.extend(f);
        }
        self.event(out, kind, &data);
    }

    fn status(&self) -> &'static str {
        match self.finish {
            None => "in_progress",
            Some(FinishReason::Length) => "incomplete",
            Some(_) => "completed",
        }
    }

    /// An item as JSON, with `status`.
    fn item_json(&self, item: &Item, status: &str) -> Value {
        match item {
            Item::Message { id, text, logprobs } => json!({
                "id": id,
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": [self.part_json(text, logprobs)],
            }),
            Item::Call {
                id,
                call_id,
                name,
                arguments,
                ..
            } => json!({
                "id": id,
                "type": "function_call",
                "status": status,
                "call_id": call_id,
                "name": name,
                "arguments": arguments,
            }),
        }
    }

    fn part_json(&self, text: &str, logprobs: &[TokenLogprob]) -> Value {
        json!({
            "type": "output_text",
            "text": text,
            "annotations": [],
            "logprobs": if self.logprobs { logprobs } else { &[] },
        })
    }

    /// The whole `response` object: its items `status` as the response's own
    /// (`in_progress` before the end), `usage` once known, `error` when it failed.
    fn response_json(&self, usage: Option<Usage>, error: Option<Value>) -> Value {
        let status = match (&error, self.finish) {
            (Some(_), _) => "failed",
            _ => self.status(),
        };
        let item_status = if status == "failed" {
            "incomplete"
        } else {
            status
        };
        let mut r = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": error,
            "incomplete_details": (status == "incomplete")
                .then(|| json!({"reason": "max_output_tokens"})),
            "model": self.model,
            "output": self.items.iter().map(|i| self.item_json(i, item_status))
                .collect::<Vec<_>>(),
            "usage": usage.map(usage_json),
        });
        if let Some(o) = r.as_object_mut() {
            o.extend(self.echo.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        r
    }

    /// The stream's first events; a plain answer's message item starts at once.
    pub fn start(&mut self, out: &mut BytesMut, tools: bool) {
        let r = self.response_json(None, None);
        self.event_with(out, "response.created", json!({ "response": r }));
        self.event_with(out, "response.in_progress", json!({ "response": r }));
        if !tools {
            self.open_message(out);
        }
    }

    /// Adds a message item (its `output_item.added` and `content_part.added`).
    fn open_message(&mut self, out: &mut BytesMut) -> usize {
        let item = Item::Message {
            id: item_id("msg"),
            text: String::new(),
            logprobs: Vec::new(),
        };
        let added = self.item_json(&item, "in_progress");
        let id = added["id"].clone();
        self.items.push(item);
        let index = self.items.len() - 1;
        self.event_with(
            out,
            "response.output_item.added",
            json!({"output_index": index, "item": added}),
        );
        let part = self.part_json("", &[]);
        self.event_with(
            out,
            "response.content_part.added",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
        );
        index
    }

    /// More of the answer's words (into its last message item, opened if need be).
    pub fn text(&mut self, out: &mut BytesMut, text: &str, logprobs: &[TokenLogprob]) {
        let index = match self.items.last() {
            Some(Item::Message { .. }) => self.items.len() - 1,
            _ => self.open_message(out),
        };
        let seq = self.seq;
        let shown = if self.logprobs { logprobs } else { &[] };
        let Some(Item::Message {
            id,
            text: all,
            logprobs: kept,
        }) = self.items.get_mut(index)
        else {
            return;
        };
        all.push_str(text);
        kept.extend_from_slice(shown);
        let delta = TextDelta {
            kind: "response.output_text.delta",
            sequence_number: seq,
            item_id: id,
            output_index: index,
            content_index: 0,
            delta: text,
            logprobs: shown,
        };
        out.put_slice(b"event: response.output_text.delta\ndata: ");
        let _ = serde_json::to_writer((&mut *out).writer(), &delta);
        out.put_slice(b"\n\n");
        self.seq += 1;
    }

    /// A piece of a tool-calling answer.
    pub fn piece(&mut self, out: &mut BytesMut, piece: Piece) {
        match piece {
            Piece::Call { index, name } => {
                let item = Item::Call {
                    id: item_id("fc"),
                    call_id: tools::call_id(),
                    name,
                    arguments: String::new(),
                    index,
                };
                let added = self.item_json(&item, "in_progress");
                self.items.push(item);
                let output_index = self.items.len() - 1;
                self.event_with(
                    out,
                    "response.output_item.added",
                    json!({"output_index": output_index, "item": added}),
                );
            }
            Piece::Arguments { index, text } => {
                let found = self
                    .items
                    .iter_mut()
                    .enumerate()
                    .find_map(|(k, it)| match it {
                        Item::Call {
                            id,
                            arguments,
                            index: i,
                            ..
                        } if *i == index => {
                            arguments.push_str(&text);
                            Some((k, id.clone()))
                        }
                        _ => None,
                    });
                if let Some((output_index, id)) = found {
                    self.event_with(
                        out,
                        "response.function_call_arguments.delta",
                        json!({"item_id": id, "output_index": output_index, "delta": text}),
                    );
                }
            }
            Piece::Content(text) => self.text(out, &text, &[]),
        }
    }

    /// The answer ended: every item's closing events.
    pub fn finish(&mut self, out: &mut BytesMut, finish: FinishReason) {
        self.finish = Some(finish);
        let status = self.status();
        for k in 0..self.items.len() {
            let done = self.item_json(&self.items[k], status);
            match &self.items[k] {
                Item::Message { id, text, logprobs } => {
                    let id = id.clone();
                    let part = self.part_json(text, logprobs);
                    let shown = part["logprobs"].clone();
                    let text = text.clone();
                    self.event_with(
                        out,
                        "response.output_text.done",
                        json!({"item_id": id, "output_index": k, "content_index": 0,
                            "text": text, "logprobs": shown}),
                    );
                    self.event_with(
                        out,
                        "response.content_part.done",
                        json!({"item_id": id, "output_index": k, "content_index": 0,
                            "part": part}),
                    );
                }
                Item::Call {
                    id,
                    name,
                    arguments,
                    ..
                } => {
                    let fields = json!({"item_id": id, "output_index": k, "name": name,
                        "arguments": arguments});
                    self.event_with(out, "response.function_call_arguments.done", fields);
                }
            }
            self.event_with(
                out,
                "response.output_item.done",
                json!({"output_index": k, "item": done}),
            );
        }
    }

    /// The last event: the whole response with its usage.
    pub fn end(&mut self, out: &mut BytesMut, usage: Usage) {
        let r = self.response_json(Some(usage), None);
        let kind = match self.status() {
            "incomplete" => "response.incomplete",
            _ => "response.completed",
        };
        self.event_with(out, kind, json!({ "response": r }));
    }

    /// A mid-stream failure: an `error` event, then `response.failed`.
    pub fn error(&mut self, out: &mut BytesMut, err: &ApiError) {
        let e: Value = serde_json::from_str(&err.to_json()).unwrap_or_default();
        let e = &e["error"];
        let code = e["code"].clone();
        let message = e["message"].clone();
        self.event_with(
            out,
            "error",
            json!({"code": code, "message": message, "param": e["param"]}),
        );
        let r = self.response_json(None, Some(json!({"code": code, "message": message})));
        self.event_with(out, "response.failed", json!({ "response": r }));
    }

    /// The whole (non-streamed) body of a finished answer: `text`, read as a tool-calling
    /// answer when `tools`.
    pub fn full(
        &mut self,
        text: &str,
        logprobs: &[TokenLogprob],
        finish: FinishReason,
        tools: bool,
        usage: Usage,
    ) -> Vec<u8> {
        self.finish = Some(finish);
        let answer = (tools && finish == FinishReason::Stop)
            .then(|| tools::answer(text))
            .flatten();
        let message = |text: &str, logprobs: &[TokenLogprob]| Item::Message {
            id: item_id("msg"),
            text: text.to_string(),
            logprobs: logprobs.to_vec(),
        };
        self.items = match answer {
            Some(Answer::Calls(calls)) => calls
                .into_iter()
                .enumerate()
                .map(|(i, c)| Item::Call {
                    id: item_id("fc"),
                    call_id: tools::call_id(),
                    name: c.name,
                    arguments: c.arguments,
                    index: i as u32,
                })
                .collect(),
            Some(Answer::Content(words)) => vec![message(&words, &[])],
            None => vec![message(text, logprobs)],
        };
        serde_json::to_vec(&self.response_json(Some(usage), None)).unwrap_or_default()
    }
}
