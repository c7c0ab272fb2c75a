//! Rendering an answer as OpenAI's Responses API does: a whole `response` object, or its
//! stream of typed events (`event: <type>` / `data: {…, "sequence_number"}`): the
//! response created and in progress, each output item (a `message` with one `output_text`
//! part, or a `function_call`) added, its text or arguments in deltas, done, and the
//! response `completed` (or `incomplete` when `max_output_tokens` cut it) with its usage.
//! A stream that fails ends with an `error` event and `response.failed`.
//!
//! Tool-calling answers arrive as [`Piece`]s ([`super::tools::AnswerStream`]); each call
//! becomes its own `function_call` item, words a `message` item.
//!
//! Everything is written from borrowed, typed values; what a response repeats of its
//! request was serialized once, at validation ([`super::responses`]), and is spliced in.

use super::error::ApiError;
use super::input_items;
use super::tools::{self, Answer, Piece};
use super::validate::ResponsesInfo;
use crate::response_store::{Append, Kept, ReadBy, Saver, Stored};
use crate::worker::{FinishReason, TokenLogprob, Usage};
use bytes::{BufMut, BytesMut};
use serde::Serialize;
use serde_json::{json, Value};

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
    /// A reasoning model's thinking (before the answer's items).
    Reasoning { id: String, text: String },
}

impl Item {
    fn id(&self) -> &str {
        match self {
            Item::Message { id, .. } | Item::Call { id, .. } | Item::Reasoning { id, .. } => id,
        }
    }
}

/// A `reasoning_text` content part (of a `reasoning` item).
#[derive(Serialize)]
struct ReasoningPart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

fn reasoning_part(text: &str) -> ReasoningPart<'_> {
    ReasoningPart {
        kind: "reasoning_text",
        text,
    }
}

/// An `output_text` content part.
#[derive(Serialize)]
struct PartOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    annotations: [(); 0],
    logprobs: &'a [TokenLogprob],
}

/// An output item.
#[derive(Serialize)]
#[serde(untagged)]
enum ItemOut<'a> {
    Message {
        id: &'a str,
        #[serde(rename = "type")]
        kind: &'static str,
        status: &'a str,
        role: &'static str,
        content: [PartOut<'a>; 1],
    },
    Call {
        id: &'a str,
        #[serde(rename = "type")]
        kind: &'static str,
        status: &'a str,
        call_id: &'a str,
        name: &'a str,
        arguments: &'a str,
    },
    Reasoning {
        id: &'a str,
        #[serde(rename = "type")]
        kind: &'static str,
        status: &'a str,
        summary: [(); 0],
        content: [ReasoningPart<'a>; 1],
    },
}

#[derive(Serialize)]
struct TokensDetails {
    cached_tokens: u32,
}

#[derive(Serialize)]
struct OutputDetails {
    reasoning_tokens: u32,
}

#[derive(Serialize)]
struct UsageOut {
    input_tokens: u32,
    input_tokens_details: TokensDetails,
    output_tokens: u32,
    output_tokens_details: OutputDetails,
    total_tokens: u32,
}

impl From<Usage> for UsageOut {
    fn from(u: Usage) -> Self {
        Self {
            input_tokens: u.prompt_tokens,
            input_tokens_details: TokensDetails {
                cached_tokens: u.cached_tokens,
            },
            output_tokens: u.completion_tokens,
            output_tokens_details: OutputDetails {
                reasoning_tokens: u.reasoning_tokens,
            },
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

#[derive(Serialize)]
struct Incomplete {
    reason: &'static str,
}

#[derive(Serialize)]
struct Failure<'a> {
    code: Option<&'a str>,
    message: &'a str,
}

/// A `response` object but for what it repeats of the request.
#[derive(Serialize)]
struct ResponseOut<'a> {
    id: &'a str,
    object: &'static str,
    created_at: u64,
    status: &'a str,
    error: Option<Failure<'a>>,
    incomplete_details: Option<Incomplete>,
    model: &'a str,
    output: Vec<ItemOut<'a>>,
    usage: Option<UsageOut>,
    store: bool,
}

/// An event's own fields after its type and sequence number.
#[derive(Serialize)]
#[serde(untagged)]
enum Fields<'a> {
    Item {
        output_index: usize,
        item: ItemOut<'a>,
    },
    Part {
        item_id: &'a str,
        output_index: usize,
        content_index: u32,
        part: PartOut<'a>,
    },
    TextDelta {
        item_id: &'a str,
        output_index: usize,
        content_index: u32,
        delta: &'a str,
        logprobs: &'a [TokenLogprob],
    },
    TextDone {
        item_id: &'a str,
        output_index: usize,
        content_index: u32,
        text: &'a str,
        logprobs: &'a [TokenLogprob],
    },
    ReasoningPart {
        item_id: &'a str,
        output_index: usize,
        content_index: u32,
        part: ReasoningPart<'a>,
    },
    ReasoningDelta {
        item_id: &'a str,
        output_index: usize,
        content_index: u32,
        delta: &'a str,
    },
    ReasoningDone {
        item_id: &'a str,
        output_index: usize,
        content_index: u32,
        text: &'a str,
    },
    ArgumentsDelta {
        item_id: &'a str,
        output_index: usize,
        delta: &'a str,
    },
    ArgumentsDone {
        item_id: &'a str,
        output_index: usize,
        name: &'a str,
        arguments: &'a str,
    },
    Error {
        code: Option<&'a str>,
        message: &'a str,
        param: Option<&'a str>,
    },
}

#[derive(Serialize)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    sequence_number: u64,
    #[serde(flatten)]
    fields: Fields<'a>,
}

/// The Responses renderer of one answer (the endpoint has one choice).
pub struct ResponsesRender {
    id: String,
    model: String,
    created: u64,
    /// What the response needs of the request (what it repeats, its conversation).
    info: ResponsesInfo,
    /// Where the finished answer is stored (and its items added to its conversation), if
    /// it is.
    saver: Option<Saver>,
    /// What the finished answer leaves in the store ([`ResponsesRender::take_stored`]).
    stored: Option<Kept>,
    /// Tokens' log-probabilities go into the output text.
    logprobs: bool,
    seq: u64,
    items: Vec<Item>,
    /// The answer is read as tool calls (streamed: no message item is opened before its
    /// words come).
    tools: bool,
    /// How the answer ended, once it has.
    finish: Option<FinishReason>,
}

/// Writes `v` as JSON to `out`. Serializing these plain values cannot fail; an empty
/// value would be the worst case.
fn json<T: Serialize>(out: &mut BytesMut, v: &T) {
    let _ = serde_json::to_writer(out.writer(), v);
}

impl ResponsesRender {
    pub fn new(
        model: &str,
        created: u64,
        info: ResponsesInfo,
        saver: Option<Saver>,
        logprobs: bool,
    ) -> Self {
        Self {
            id: input_items::new_id("resp"),
            model: model.to_string(),
            created,
            info,
            saver,
            stored: None,
            logprobs,
            seq: 0,
            items: Vec::new(),
            tools: false,
            finish: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// One SSE event of `kind` that carries the whole response; where in `out` that
    /// response's JSON is.
    fn response_event(
        &mut self,
        out: &mut BytesMut,
        kind: &str,
        usage: Option<Usage>,
        error: Option<Failure<'_>>,
    ) -> std::ops::Range<usize> {
        out.put_slice(b"event: ");
        out.put_slice(kind.as_bytes());
        out.put_slice(b"\ndata: {\"type\":\"");
        out.put_slice(kind.as_bytes());
        out.put_slice(b"\",\"sequence_number\":");
        out.put_slice(self.seq.to_string().as_bytes());
        out.put_slice(b",\"response\":");
        let start = out.len();
        self.response(out, usage, error);
        let at = start..out.len();
        out.put_slice(b"}\n\n");
        self.seq += 1;
        at
    }

    fn status(&self) -> &'static str {
        match self.finish {
            None => "in_progress",
            Some(FinishReason::Length) => "incomplete",
            Some(_) => "completed",
        }
    }

    fn part<'a>(&self, text: &'a str, logprobs: &'a [TokenLogprob]) -> PartOut<'a> {
        PartOut {
            kind: "output_text",
            text,
            annotations: [],
            logprobs: if self.logprobs { logprobs } else { &[] },
        }
    }

    fn item_out<'a>(&self, item: &'a Item, status: &'a str) -> ItemOut<'a> {
        match item {
            Item::Message { id, text, logprobs } => ItemOut::Message {
                id,
                kind: "message",
                status,
                role: "assistant",
                content: [self.part(text, logprobs)],
            },
            Item::Call {
                id,
                call_id,
                name,
                arguments,
                ..
            } => ItemOut::Call {
                id,
                kind: "function_call",
                status,
                call_id,
                name,
                arguments,
            },
            Item::Reasoning { id, text } => ItemOut::Reasoning {
                id,
                kind: "reasoning",
                status,
                summary: [],
                content: [reasoning_part(text)],
            },
        }
    }

    /// Writes the `response` object: status as the answer stands (`failed` with `error`),
    /// its items, `usage` once known, and what it repeats of the request.
    fn response(&self, out: &mut BytesMut, usage: Option<Usage>, error: Option<Failure<'_>>) {
        let status = match error {
            Some(_) => "failed",
            None => self.status(),
        };
        let item_status = match status {
            "failed" => "incomplete",
            s => s,
        };
        let r = ResponseOut {
            id: &self.id,
            object: "response",
            created_at: self.created,
            status,
            error,
            incomplete_details: (status == "incomplete").then_some(Incomplete {
                reason: "max_output_tokens",
            }),
            model: &self.model,
            output: self
                .items
                .iter()
                .map(|i| self.item_out(i, item_status))
                .collect(),
            usage: usage.map(UsageOut::from),
            store: self.keeps_answer(),
        };
        json(out, &r);
        let echo = &self.info.echo;
        if !echo.is_empty() && out.last() == Some(&b'}') {
            out.truncate(out.len() - 1);
            out.put_u8(b',');
            out.put_slice(echo.as_bytes());
            out.put_u8(b'}');
        }
    }

    /// Whether the answer is stored (the gateway stores answers, the request let it).
    fn keeps_answer(&self) -> bool {
        self.saver.is_some() && self.info.store
    }

    /// Keeps what the finished answer leaves in the store (`response`: its object as
    /// sent): itself with its conversation (the request's, then its output as input
    /// items: after what the answer it continues holds, if any), and its input and output
    /// added to the conversation it is in.
    fn keep(&mut self, response: &[u8]) {
        let Some(saver) = &self.saver else { return };
        // Each with an id, kept by the answers that continue this one.
        let (parent, mut items) = input_items::lineage(&self.info);
        items.extend(self.items.iter().map(|i| match i {
            Item::Message { id, text, .. } => json!({
                "id": id,
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
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
                "status": "completed",
                "call_id": call_id,
                "name": name,
                "arguments": arguments,
            }),
            Item::Reasoning { id, text } => json!({
                "id": id,
                "type": "reasoning",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": text}],
            }),
        }));
        // The request's own input and the output, wherever its conversation starts.
        let own_from = self.info.own_from - parent.as_ref().map_or(0, |p| p.inherits);
        let keeps = self.keeps_answer();
        let append = self.info.conversation_id.as_ref().map(|c| Append {
            conversation: c.clone(),
            tenant: saver.tenant.clone(),
            items: items.get(own_from..).unwrap_or(&[]).to_vec(),
            by: keeps.then(|| ReadBy {
                answer: self.id.clone(),
                version: self.info.conversation_version,
                len: self.info.own_from,
            }),
        });
        let stored = keeps.then(|| Stored {
            id: self.id.clone(),
            tenant: saver.tenant.clone(),
            response: String::from_utf8_lossy(response).into_owned(),
            conversation: Value::Array(items).to_string(),
            parent,
        });
        self.stored = Some(Kept {
            stored,
            append,
            ..Kept::default()
        });
    }

    /// The finished answer to store, and where (once: it is taken).
    pub fn take_stored(&mut self) -> Option<(Saver, Kept)> {
        let stored = self.stored.take()?;
        Some((self.saver.clone()?, stored))
    }

    /// The stream's first events (its items are added as they start: a reasoning model's
    /// thinking before its answer).
    pub fn start(&mut self, out: &mut BytesMut, tools: bool) {
        self.tools = tools;
        self.response_event(out, "response.created", None, None);
        self.response_event(out, "response.in_progress", None, None);
    }

    /// More of a reasoning model's thinking (into its reasoning item, added if need be).
    pub fn reasoning(&mut self, out: &mut BytesMut, text: &str) {
        let k = match self.items.last() {
            Some(Item::Reasoning { .. }) => self.items.len() - 1,
            _ => {
                self.items.push(Item::Reasoning {
                    id: input_items::new_id("rs"),
                    text: String::new(),
                });
                let k = self.items.len() - 1;
                self.item_event(out, "response.output_item.added", k, "in_progress");
                let fields = Fields::ReasoningPart {
                    item_id: self.items[k].id(),
                    output_index: k,
                    content_index: 0,
                    part: reasoning_part(""),
                };
                write_event(out, "response.content_part.added", self.seq, fields);
                self.seq += 1;
                k
            }
        };
        if let Some(Item::Reasoning { text: all, .. }) = self.items.get_mut(k) {
            all.push_str(text);
        }
        let fields = Fields::ReasoningDelta {
            item_id: self.items[k].id(),
            output_index: k,
            content_index: 0,
            delta: text,
        };
        write_event(out, "response.reasoning_text.delta", self.seq, fields);
        self.seq += 1;
    }

    /// Adds a message item (its `output_item.added` and `content_part.added`).
    fn open_message(&mut self, out: &mut BytesMut) -> usize {
        self.items.push(Item::Message {
            id: input_items::new_id("msg"),
            text: String::new(),
            logprobs: Vec::new(),
        });
        let k = self.items.len() - 1;
        self.item_event(out, "response.output_item.added", k, "in_progress");
        let (seq, id) = (self.seq, self.items[k].id());
        let fields = Fields::Part {
            item_id: id,
            output_index: k,
            content_index: 0,
            part: self.part("", &[]),
        };
        write_event(out, "response.content_part.added", seq, fields);
        self.seq += 1;
        k
    }

    /// An event that carries item `k` with `status`.
    fn item_event(&mut self, out: &mut BytesMut, kind: &str, k: usize, status: &str) {
        let fields = Fields::Item {
            output_index: k,
            item: self.item_out(&self.items[k], status),
        };
        write_event(out, kind, self.seq, fields);
        self.seq += 1;
    }

    /// More of the answer's words (into its last message item, opened if need be).
    pub fn text(&mut self, out: &mut BytesMut, text: &str, logprobs: &[TokenLogprob]) {
        let k = match self.items.last() {
            Some(Item::Message { .. }) => self.items.len() - 1,
            _ => self.open_message(out),
        };
        let shown = if self.logprobs { logprobs } else { &[] };
        if let Some(Item::Message {
            text: all,
            logprobs: kept,
            ..
        }) = self.items.get_mut(k)
        {
            all.push_str(text);
            kept.extend_from_slice(shown);
        }
        let fields = Fields::TextDelta {
            item_id: self.items[k].id(),
            output_index: k,
            content_index: 0,
            delta: text,
            logprobs: shown,
        };
        write_event(out, "response.output_text.delta", self.seq, fields);
        self.seq += 1;
    }

    /// A piece of a tool-calling answer.
    pub fn piece(&mut self, out: &mut BytesMut, piece: Piece) {
        match piece {
            Piece::Call { index, name } => {
                self.items.push(Item::Call {
                    id: input_items::new_id("fc"),
                    call_id: tools::call_id(),
                    name,
                    arguments: String::new(),
                    index,
                });
                let k = self.items.len() - 1;
                self.item_event(out, "response.output_item.added", k, "in_progress");
            }
            Piece::Arguments { index, text } => {
                let found = self.items.iter_mut().position(|it| match it {
                    Item::Call {
                        arguments,
                        index: i,
                        ..
                    } if *i == index => {
                        arguments.push_str(&text);
                        true
                    }
                    _ => false,
                });
                if let Some(k) = found {
                    let fields = Fields::ArgumentsDelta {
                        item_id: self.items[k].id(),
                        output_index: k,
                        delta: &text,
                    };
                    write_event(
                        out,
                        "response.function_call_arguments.delta",
                        self.seq,
                        fields,
                    );
                    self.seq += 1;
                }
            }
            Piece::Content(text) => self.text(out, &text, &[]),
        }
    }

    /// The answer ended: every item's closing events.
    pub fn finish(&mut self, out: &mut BytesMut, finish: FinishReason) {
        // A plain answer has its message item, words or none.
        if !self.tools && !self.items.iter().any(|i| matches!(i, Item::Message { .. })) {
            self.open_message(out);
        }
        self.finish = Some(finish);
        let status = self.status();
        for k in 0..self.items.len() {
            match &self.items[k] {
                Item::Reasoning { id, text } => {
                    let fields = Fields::ReasoningDone {
                        item_id: id,
                        output_index: k,
                        content_index: 0,
                        text,
                    };
                    write_event(out, "response.reasoning_text.done", self.seq, fields);
                    let fields = Fields::ReasoningPart {
                        item_id: id,
                        output_index: k,
                        content_index: 0,
                        part: reasoning_part(text),
                    };
                    write_event(out, "response.content_part.done", self.seq + 1, fields);
                    self.seq += 2;
                }
                Item::Message { id, text, logprobs } => {
                    let part = self.part(text, logprobs);
                    let fields = Fields::TextDone {
                        item_id: id,
                        output_index: k,
                        content_index: 0,
                        text,
                        logprobs: part.logprobs,
                    };
                    write_event(out, "response.output_text.done", self.seq, fields);
                    let fields = Fields::Part {
                        item_id: id,
                        output_index: k,
                        content_index: 0,
                        part,
                    };
                    write_event(out, "response.content_part.done", self.seq + 1, fields);
                    self.seq += 2;
                }
                Item::Call {
                    id,
                    name,
                    arguments,
                    ..
                } => {
                    let fields = Fields::ArgumentsDone {
                        item_id: id,
                        output_index: k,
                        name,
                        arguments,
                    };
                    write_event(
                        out,
                        "response.function_call_arguments.done",
                        self.seq,
                        fields,
                    );
                    self.seq += 1;
                }
            }
            self.item_event(out, "response.output_item.done", k, status);
        }
    }

    /// The last event: the whole response with its usage.
    pub fn end(&mut self, out: &mut BytesMut, usage: Usage) {
        let kind = match self.status() {
            "incomplete" => "response.incomplete",
            _ => "response.completed",
        };
        let at = self.response_event(out, kind, Some(usage), None);
        // Stored as it was sent.
        self.keep(&out[at]);
    }

    /// A mid-stream failure: an `error` event, then `response.failed`.
    pub fn error(&mut self, out: &mut BytesMut, err: &ApiError) {
        let (code, message, param) = (err.code(), err.to_string(), err.param());
        let fields = Fields::Error {
            code,
            message: &message,
            param,
        };
        write_event(out, "error", self.seq, fields);
        self.seq += 1;
        let failure = Failure {
            code,
            message: &message,
        };
        self.response_event(out, "response.failed", None, Some(failure));
    }

    /// The whole (non-streamed) body of a finished answer: `reasoning` (a reasoning
    /// model's thinking, if any), then `text`, read as a tool-calling answer when `tools`.
    pub fn full(
        &mut self,
        reasoning: &str,
        text: &str,
        logprobs: &[TokenLogprob],
        finish: FinishReason,
        tools: bool,
        usage: Usage,
    ) -> BytesMut {
        self.finish = Some(finish);
        let answer = (tools && finish == FinishReason::Stop)
            .then(|| tools::answer(text))
            .flatten();
        let message = |text: &str, logprobs: &[TokenLogprob]| Item::Message {
            id: input_items::new_id("msg"),
            text: text.to_string(),
            logprobs: logprobs.to_vec(),
        };
        self.items = match answer {
            Some(Answer::Calls(calls)) => calls
                .into_iter()
                .enumerate()
                .map(|(i, c)| Item::Call {
                    id: input_items::new_id("fc"),
                    call_id: tools::call_id(),
                    name: c.name,
                    arguments: c.arguments,
                    index: i as u32,
                })
                .collect(),
            Some(Answer::Content(words)) => vec![message(&words, &[])],
            None => vec![message(text, logprobs)],
        };
        if !reasoning.is_empty() {
            let thinking = Item::Reasoning {
                id: input_items::new_id("rs"),
                text: reasoning.to_string(),
            };
            self.items.insert(0, thinking);
        }
        let mut out = BytesMut::with_capacity(1024);
        self.response(&mut out, Some(usage), None);
        self.keep(&out);
        out
    }
}

/// Writes one SSE event numbered `seq` (for events whose fields borrow the renderer).
fn write_event(out: &mut BytesMut, kind: &str, seq: u64, fields: Fields<'_>) {
    out.put_slice(b"event: ");
    out.put_slice(kind.as_bytes());
    out.put_slice(b"\ndata: ");
    json(
        out,
        &Event {
            kind,
            sequence_number: seq,
            fields,
        },
    );
    out.put_slice(b"\n\n");
}
