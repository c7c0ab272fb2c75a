//! Validation: request bytes → a typed [`InferenceRequest`], or a 400 that names the field.
//!
//! Unknown fields are ignored (SDKs add new ones); known options this gateway cannot honour
//! (`functions`, `suffix`, schema keywords its structured output cannot follow, …) are refused
//! with a 400 that says so rather than silently dropped.

use super::error::ApiError;
use super::tools;
use super::types::{ChatRequest, CommonParams, CompletionRequest, Content, ContentPart, OneOrMany};
use crate::config::ServerConfig;
use crate::worker::{ChatMessage, OutputFormat, Prompt, SamplingParams};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::sync::Arc;

/// Which endpoint a request came in on (decides the response shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
    /// `/v1/responses`: validated as the chat request it means ([`super::responses`]).
    Responses,
    /// `/v1/embeddings` ([`super::embeddings`]): vectors as base64, or as floats.
    Embeddings {
        base64: bool,
        /// `dimensions`: vectors of this size, where the pool's workers make them so (an
        /// upstream is asked for them).
        dimensions: Option<u32>,
    },
}

/// A validated request, ready for the pipeline.
#[derive(Debug, Clone)]
pub struct InferenceRequest {
    pub endpoint: Endpoint,
    pub model: String,
    /// One prompt; completions may send several, each with its `n` choices.
    pub prompts: Vec<Prompt>,
    pub params: SamplingParams,
    pub stream: bool,
    pub include_usage: bool,
    /// Completions with `echo`: the prompt, sent back before the completion.
    pub echo: bool,
    /// Choices to return (`n`), each on its own sequence.
    pub n: u32,
    /// Choices to generate per prompt (`best_of`, at least `n`): the `n` with the highest
    /// mean log-probability per token are returned.
    pub best_of: u32,
    /// The answer is a tool call (or, with `tool_choice: "auto"`, words) in the JSON
    /// shape of [`tools`], to be rendered as `tool_calls`.
    pub tool_calls: bool,
    /// `/v1/responses`: what its answer needs of the request.
    pub responses: Option<ResponsesInfo>,
}

/// What a `/v1/responses` answer needs of its request.
#[derive(Debug, Clone)]
pub struct ResponsesInfo {
    /// What the answer repeats of the request: JSON object members, without the braces.
    pub echo: Arc<str>,
    /// The request lets its answer be stored (it did not say `store: false`).
    pub store: bool,
    /// Its conversation through its own input, as input items (a stored answer's).
    pub conversation: Arc<Vec<Value>>,
    /// Where its own input starts in `conversation` (after what it continues).
    pub own_from: usize,
    /// The stored answer whose conversation `conversation` starts with, and how many of
    /// its items are that one's: the answer `previous_response_id` names (all of them
    /// but the request's own input); in a conversation, the last answer stored in it
    /// (where only additions changed it since). A stored answer stores what follows.
    pub continues: Option<(String, usize)>,
    /// The conversation's version when its items were read (`conversation_id`).
    pub conversation_version: i64,
    /// The Conversations API conversation it is in (its input and output are added).
    pub conversation_id: Option<String>,
    /// `truncation: "auto"`: the oldest turns may be dropped to fit the context
    /// ([`crate::truncate`]).
    pub truncate: bool,
    /// `background: true`: answered at once, run to the end apart from the request
    /// ([`super::background`]).
    pub background: bool,
}

/// The most choices a request may ask for (`n`).
pub const MAX_N: u32 = 16;

/// The most choices a completions request may make in all (prompts × `n`).
pub const MAX_CHOICES: usize = 128;

/// Most inputs one `/v1/embeddings` request takes (OpenAI's limit too); routed a pool's
/// capacity at a time.
pub const MAX_EMBEDDING_INPUTS: usize = 2048;

/// Deserializes `body` as `T`; a failure names the field (`messages[0].content`).
pub(super) fn typed<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad(format!("Request body is not valid JSON: {inner}"), None)
        } else if path == "." || path.is_empty() {
            ApiError::bad(format!("Invalid request body: {inner}"), None)
        } else {
            ApiError::bad(format!("Invalid value for `{path}`: {inner}"), Some(path))
        }
    })
}

fn not_null(v: &Option<Value>) -> bool {
    matches!(v, Some(x) if !x.is_null())
}

fn range(name: &str, v: f32, lo: f32, hi: f32) -> Result<f32, ApiError> {
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::bad(
            format!("`{name}` must be between {lo} and {hi}, got {v}."),
            Some(name.to_string()),
        ))
    }
}

/// The most alternatives per token: `top_logprobs` (chat) and `logprobs` (completions, as
/// OpenAI's legacy endpoint allows).
const MAX_TOP_LOGPROBS: u64 = kernels::logprobs::MAX_TOP as u64;
const MAX_COMPLETION_LOGPROBS: u64 = 5;

/// A count of alternatives from 0 to `max`, or a 400 naming `name`.
fn alternatives(name: &str, v: &Value, max: u64) -> Result<u8, ApiError> {
    match v.as_u64() {
        Some(n) if n <= max => Ok(n as u8),
        _ => Err(ApiError::bad(
            format!("`{name}` must be an integer from 0 to {max}, got {v}."),
            Some(name.to_string()),
        )),
    }
}

/// Chat: `logprobs` (a boolean) and `top_logprobs` (0 to 20, only with `logprobs`).
fn chat_logprobs(logprobs: &Option<Value>, top: &Option<Value>) -> Result<Option<u8>, ApiError> {
    let on = match logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(v) => {
            return Err(ApiError::bad(
                format!("`logprobs` must be a boolean, got {v}."),
                Some("logprobs".into()),
            ))
        }
    };
    match (on, top) {
        (_, None | Some(Value::Null)) => Ok(on.then_some(0)),
        (true, Some(v)) => alternatives("top_logprobs", v, MAX_TOP_LOGPROBS).map(Some),
        (false, Some(_)) => Err(ApiError::bad(
            "`top_logprobs` requires `logprobs` to be true.",
            Some("top_logprobs".into()),
        )),
    }
}

/// The most entries a `logit_bias` may have (OpenAI's limit).
const MAX_LOGIT_BIAS: usize = 300;

/// Most `stop_token_ids` a request may name.
const MAX_STOP_TOKEN_IDS: usize = 64;

/// Most `bad_words` a request may list, and the longest.
const MAX_BAD_WORDS: usize = 256;
const MAX_BAD_WORD_BYTES: usize = 1024;

/// Most `allowed_token_ids` a request may name (a large vocabulary's).
const MAX_ALLOWED_TOKEN_IDS: usize = 262_144;

/// `logit_bias`: `{"token id": bias}` with biases from −100 to 100, at most 300 entries
/// (whether an id is in the vocabulary is the worker's to say).
fn logit_bias(v: &Option<Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad = |m: String| Err(ApiError::bad(m, Some("logit_bias".into())));
    let map = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return bad(format!(
                "`logit_bias` must map token ids to biases, got {other}."
            ))
        }
    };
    if map.len() > MAX_LOGIT_BIAS {
        return bad(format!(
            "`logit_bias` takes at most {MAX_LOGIT_BIAS} tokens, got {}.",
            map.len()
        ));
    }
    let mut out = Vec::with_capacity(map.len());
    for (k, b) in map {
        let Ok(id) = k.parse::<u32>() else {
            return bad(format!("`logit_bias` key {k:?} is not a token id."));
        };
        match b.as_f64() {
            Some(b) if (-100.0..=100.0).contains(&b) => out.push((id, b as f32)),
            _ => {
                return bad(format!(
                    "`logit_bias` for token {id} must be a number from -100 to 100, got {b}."
                ))
            }
        }
    }
    out.sort_by_key(|e| e.0);
    Ok(out)
}

/// Completions: `logprobs`, the number of alternatives (0 to 5).
fn completion_logprobs(logprobs: &Option<Value>) -> Result<Option<u8>, ApiError> {
    match logprobs {
        None | Some(Value::Null) => Ok(None),
        Some(v) => alternatives("logprobs", v, MAX_COMPLETION_LOGPROBS).map(Some),
    }
}

/// `n`: 1 when absent, else from 1 to [`MAX_N`].
fn choices(n: Option<u32>) -> Result<u32, ApiError> {
    match n {
        None => Ok(1),
        Some(n) if (1..=MAX_N).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad(
            format!("`n` must be from 1 to {MAX_N}, got {n}."),
            Some("n".into()),
        )),
    }
}

/// The parameters chat and completions share. `max_tokens` is the endpoint's own name for
/// it where it has one (`max_completion_tokens`), before `max_tokens`; `least` its least
/// (0 where the prompt alone may be the answer: completions' `echo`, to score a prompt).
fn common(
    c: CommonParams,
    max_tokens: Option<u32>,
    least: u32,
    logprobs: Option<u8>,
    server: &ServerConfig,
) -> Result<(String, SamplingParams, bool, bool), ApiError> {
    if c.model.is_empty() {
        return Err(ApiError::bad(
            "`model` must not be empty.",
            Some("model".into()),
        ));
    }
    let max_tokens = max_tokens
        .or(c.max_tokens)
        .unwrap_or(server.default_max_tokens);
    if max_tokens < least || max_tokens > server.max_tokens_limit {
        return Err(ApiError::bad(
            format!(
                "`max_tokens` must be between {least} and {}, got {max_tokens}.",
                server.max_tokens_limit
            ),
            Some("max_tokens".into()),
        ));
    }
    let temperature = range("temperature", c.temperature.unwrap_or(1.0), 0.0, 2.0)?;
    let top_p = range("top_p", c.top_p.unwrap_or(1.0), 0.0, 1.0)?;
    let presence_penalty = range(
        "presence_penalty",
        c.presence_penalty.unwrap_or(0.0),
        -2.0,
        2.0,
    )?;
    let frequency_penalty = range(
        "frequency_penalty",
        c.frequency_penalty.unwrap_or(0.0),
        -2.0,
        2.0,
    )?;
    let logit_bias = logit_bias(&c.logit_bias)?;
    let min_p = range("min_p", c.min_p.unwrap_or(0.0), 0.0, 1.0)?;
    let repetition_penalty = c.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
        return Err(ApiError::bad(
            format!("`repetition_penalty` must be a number above 0, got {repetition_penalty}."),
            Some("repetition_penalty".into()),
        ));
    }
    let stop = match c.stop {
        None => vec![],
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::bad(
            "`stop` takes at most 4 non-empty strings.",
            Some("stop".into()),
        ));
    }
    let stream = c.stream.unwrap_or(false);
    if c.stream_options.is_some() && !stream {
        return Err(ApiError::bad(
            "`stream_options` is only allowed when `stream` is true.",
            Some("stream_options".into()),
        ));
    }
    let include_usage = c.stream_options.map(|o| o.include_usage).unwrap_or(false);
    let min_tokens = c.min_tokens.unwrap_or(0);
    if min_tokens > max_tokens {
        return Err(ApiError::bad(
            format!("`min_tokens` ({min_tokens}) must not exceed `max_tokens` ({max_tokens})."),
            Some("min_tokens".into()),
        ));
    }
    let stop_token_ids = c.stop_token_ids.unwrap_or_default();
    if stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(ApiError::bad(
            format!("`stop_token_ids` takes at most {MAX_STOP_TOKEN_IDS} tokens."),
            Some("stop_token_ids".into()),
        ));
    }
    let allowed_token_ids = match c.allowed_token_ids {
        Some(ids) if ids.is_empty() || ids.len() > MAX_ALLOWED_TOKEN_IDS => {
            return Err(ApiError::bad(
                format!("`allowed_token_ids` takes 1 to {MAX_ALLOWED_TOKEN_IDS} tokens."),
                Some("allowed_token_ids".into()),
            ));
        }
        ids => ids.unwrap_or_default(),
    };
    let bad_words = c.bad_words.unwrap_or_default();
    if bad_words.len() > MAX_BAD_WORDS
        || bad_words
            .iter()
            .any(|w| w.trim_start().is_empty() || w.len() > MAX_BAD_WORD_BYTES)
    {
        return Err(ApiError::bad(
            format!("`bad_words` takes at most {MAX_BAD_WORDS} words, each of 1 to {MAX_BAD_WORD_BYTES} bytes and not only spaces."),
            Some("bad_words".into()),
        ));
    }
    let truncate_prompt_tokens = truncate_prompt_tokens(c.truncate_prompt_tokens)?;
    let prompt_top = match c.prompt_logprobs {
        None => None,
        Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as u8),
        Some(k) => {
            return Err(ApiError::bad(
                format!("`prompt_logprobs` takes 0 to {MAX_TOP_LOGPROBS} (the most likely tokens shown at each prompt position), got {k}."),
                Some("prompt_logprobs".into()),
            ))
        }
    };
    if prompt_top.is_some() && stream {
        return Err(ApiError::bad(
            "`prompt_logprobs` is not available when `stream` is true (as in vLLM).",
            Some("prompt_logprobs".into()),
        ));
    }
    let _ = c.user; // accepted for SDK compatibility; tenants are identified by key
                    // vLLM's spacing of special tokens by its slow tokenizers (its fast ones, and tollgate,
                    // write each token's own text).
    let _ = c.spaces_between_special_tokens;
    if c.use_beam_search == Some(true) {
        return Err(ApiError::unsupported(
            "use_beam_search",
            "beam search (sample `n` or `best_of` choices instead)",
        ));
    }
    Ok((
        c.model,
        SamplingParams {
            max_tokens,
            temperature,
            top_p,
            top_k: c.top_k.unwrap_or(0),
            min_p,
            seed: c.seed.map(|s| s as u64),
            stop,
            logprobs,
            prompt_logprobs: false,
            prompt_top,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            repetition_penalty,
            format: None,
            prediction: None,
            ignore_eos: c.ignore_eos.unwrap_or(false),
            min_tokens,
            stop_token_ids,
            allowed_token_ids,
            bad_words,
            include_stop_str_in_output: c.include_stop_str_in_output.unwrap_or(false),
            skip_special_tokens: c.skip_special_tokens.unwrap_or(true),
            truncate_prompt_tokens,
        },
        stream,
        include_usage,
    ))
}

/// vLLM's `truncate_prompt_tokens`: k ≥ 1, or −1 ([`crate::worker::KEEP_CONTEXT`]).
pub(super) fn truncate_prompt_tokens(v: Option<i64>) -> Result<Option<u32>, ApiError> {
    match v {
        None => Ok(None),
        Some(-1) => Ok(Some(crate::worker::KEEP_CONTEXT)),
        Some(k) if k >= 1 && k < crate::worker::KEEP_CONTEXT as i64 => Ok(Some(k as u32)),
        Some(k) => {
            let why = format!("`truncate_prompt_tokens` must be −1 (the context) or ≥ 1, got {k}.");
            Err(ApiError::bad(why, Some("truncate_prompt_tokens".into())))
        }
    }
}

/// The output format a chat or completions body asks for, and the field that asks
/// (`response_format` where none does): `response_format`, or one of vLLM's structured
/// outputs ([`super::guided`]), not both.
fn output_format(
    body: &[u8],
    rf: Option<&Value>,
) -> Result<(Option<OutputFormat>, String), ApiError> {
    let json = response_format(rf)?;
    match super::guided::format(typed(body)?)? {
        Some((_, param)) if json.is_some() => Err(ApiError::bad(
            format!(
                "`{param}` cannot be combined with `response_format`: one output format at a time."
            ),
            Some(param),
        )),
        Some((format, param)) => Ok((Some(format), param)),
        None => Ok((json, "response_format".to_string())),
    }
}

/// Refuses the options a grammar's output cannot keep (`what`: what asks for the
/// grammar): its grammar chooses the answer's tokens and where it ends.
fn grammar_holds(params: &SamplingParams, what: &str) -> Result<(), ApiError> {
    let held = [
        ("ignore_eos", params.ignore_eos),
        ("min_tokens", params.min_tokens > 0),
        ("allowed_token_ids", !params.allowed_token_ids.is_empty()),
    ];
    match held.iter().find(|h| h.1) {
        Some((field, _)) => Err(ApiError::bad(
            format!("`{field}` cannot be combined with {what}: its grammar chooses the answer's tokens and its end."),
            Some(field.to_string()),
        )),
        None => Ok(()),
    }
}

/// `response_format`: text (`None`), JSON mode, or structured output with its schema
/// compiled here, so that a schema the engine cannot follow is refused before it is
/// admitted.
fn response_format(rf: Option<&Value>) -> Result<Option<OutputFormat>, ApiError> {
    let Some(rf) = rf.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match rf["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputFormat::Object)),
        Some("json_schema") => {
            let param = "response_format.json_schema";
            let spec = rf
                .get("json_schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| {
                    ApiError::bad(
                        "`response_format.json_schema` must be an object with the `schema`.",
                        Some(param.into()),
                    )
                })?;
            if spec.get("name").is_some_and(|n| !n.is_string()) {
                return Err(ApiError::bad(
                    "`response_format.json_schema.name` must be a string.",
                    Some(format!("{param}.name")),
                ));
            }
            Ok(Some(OutputFormat::schema(spec.clone())?))
        }
        _ => Err(ApiError::bad(
            format!(
                "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\", got {}.",
                rf["type"]
            ),
            Some("response_format".into()),
        )),
    }
}

/// vLLM's `continue_final_message` (with `add_generation_prompt` false, or unset): the
/// final message, an assistant's with text, left open for the answer to go on with.
/// `add_generation_prompt` false alone (a prompt with no turn opened) is refused.
fn continue_final(
    messages: &mut [ChatMessage],
    cont: Option<bool>,
    add_generation_prompt: Option<bool>,
    tools: bool,
) -> Result<(), ApiError> {
    let param = Some("continue_final_message".to_string());
    match (cont == Some(true), add_generation_prompt) {
        (true, Some(true)) => Err(ApiError::bad(
            "`continue_final_message` and `add_generation_prompt` cannot both be true.",
            param,
        )),
        (false, Some(false)) => Err(ApiError::unsupported(
            "add_generation_prompt",
            "a chat prompt with no assistant turn opened (`continue_final_message` goes on with an assistant message; `/v1/completions` takes any text)",
        )),
        (false, _) => Ok(()),
        (true, _) if tools => Err(ApiError::bad(
            "`continue_final_message` cannot be combined with tool calls.",
            param,
        )),
        (true, _) => match messages.last_mut() {
            Some(m) if m.role == "assistant" && !m.content.trim().is_empty() => {
                m.open = true;
                Ok(())
            }
            _ => Err(ApiError::bad(
                "`continue_final_message` needs the last message to be the assistant's, with text to go on from.",
                param,
            )),
        },
    }
}

/// A chat request's `chat_template_kwargs` (vLLM's and SGLang's extension: Qwen3's
/// `enable_thinking`, …): an object naming none of [`crate::worker::TEMPLATE_OWN`]; `null` or `{}` as
/// none.
fn template_args(v: Option<Value>) -> Result<crate::worker::TemplateArgs, ApiError> {
    let param = Some("chat_template_kwargs".to_string());
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => {
            if let Some(k) = m
                .keys()
                .find(|k| crate::worker::TEMPLATE_OWN.contains(&k.as_str()))
            {
                let instead = if k == "tools" {
                    " (send `tools` itself)"
                } else {
                    ""
                };
                return Err(ApiError::bad(
                    format!(
                        "`chat_template_kwargs` may not set `{k}`: tollgate sets it from the request{instead}."
                    ),
                    param,
                ));
            }
            Ok((!m.is_empty()).then(|| Arc::new(m)))
        }
        Some(_) => Err(ApiError::bad(
            "`chat_template_kwargs` must be an object.".to_string(),
            param,
        )),
    }
}

/// A chat request's `prediction` (OpenAI's Predicted Outputs): `{"type": "content",
/// "content": …}`, its content a string or text parts (joined); `null` or empty content as
/// none.
fn prediction(v: Option<Value>) -> Result<Option<Arc<str>>, ApiError> {
    let v = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    let shape = || {
        ApiError::bad(
            "`prediction` must be {\"type\": \"content\", \"content\": a string or text parts}.",
            Some("prediction".to_string()),
        )
    };
    if v.get("type").and_then(Value::as_str) != Some("content") {
        return Err(shape());
    }
    let text = match v.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(parts @ Value::Array(_)) => {
            let parts = serde_json::from_value(parts.clone()).map_err(|_| shape())?;
            parts_text(parts, "prediction.content")?
        }
        _ => return Err(shape()),
    };
    Ok((!text.is_empty()).then(|| Arc::from(text)))
}

/// The text of a message's (or a prediction's) content parts, joined; a part of another
/// kind is refused, named `{param}[j]`.
fn parts_text(parts: Vec<ContentPart>, param: &str) -> Result<String, ApiError> {
    let mut text = String::new();
    for (j, p) in parts.into_iter().enumerate() {
        match (p.kind.as_str(), p.text) {
            ("text", Some(t)) => text.push_str(&t),
            (kind, _) => {
                return Err(ApiError::unsupported(
                    &format!("{param}[{j}]"),
                    &format!("content of type {kind:?}"),
                ))
            }
        }
    }
    Ok(text)
}

/// Validates a `/v1/chat/completions` body.
pub fn chat(body: &[u8], server: &ServerConfig) -> Result<InferenceRequest, ApiError> {
    let req: ChatRequest = typed(body)?;
    let c: CommonParams = typed(body)?;
    if not_null(&req.functions) || not_null(&req.function_call) {
        return Err(ApiError::unsupported(
            "functions",
            "the deprecated `functions` (use `tools`)",
        ));
    }
    let tool_plan = tools::plan(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls.as_ref(),
    )?;
    let (mut format, format_param) = output_format(body, req.response_format.as_ref())?;
    if let Some(plan) = &tool_plan {
        if format.is_some() {
            return Err(ApiError::bad(
                format!("`{format_param}` cannot be combined with tool calls (the answer is a call's JSON)."),
                Some(format_param),
            ));
        }
        if not_null(&c.logprobs) && c.logprobs != Some(Value::Bool(false)) {
            return Err(ApiError::unsupported(
                "logprobs",
                "`logprobs` with tool calls",
            ));
        }
        format = Some(OutputFormat::schema(
            serde_json::json!({"name": "tool_call", "schema": plan.schema}),
        )?);
    }
    if req.messages.is_empty() {
        return Err(ApiError::bad(
            "`messages` must contain at least one message.",
            Some("messages".into()),
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let param = |f: &str| Some(format!("messages[{i}].{f}"));
        match m.role.as_str() {
            "system" | "developer" | "user" | "assistant" | "tool" => {}
            "function" => {
                return Err(ApiError::unsupported(
                    &format!("messages[{i}].role"),
                    "the deprecated `function` role (use `tool`)",
                ))
            }
            other => {
                return Err(ApiError::bad(
                    format!("Invalid role {other:?} in `messages[{i}].role`."),
                    param("role"),
                ))
            }
        }
        let _ = m.name;
        let content = match m.content {
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => parts_text(parts, &format!("messages[{i}].content"))?,
            None if m.role == "assistant" => String::new(),
            None => {
                return Err(ApiError::bad(
                    format!("`messages[{i}].content` is required."),
                    param("content"),
                ))
            }
        };
        // Tool turns become text every chat template takes (see `tools`).
        let (role, content) = match (m.role.as_str(), &m.tool_calls) {
            ("tool", _) => (
                "user".to_string(),
                tools::result_as_text(&content, m.tool_call_id.as_deref()),
            ),
            ("assistant", Some(calls)) if !calls.is_null() => {
                let calls = tools::calls_as_text(calls, &format!("messages[{i}].tool_calls"))?;
                let sep = if content.is_empty() { "" } else { "\n" };
                (m.role, format!("{content}{sep}{calls}"))
            }
            _ => (m.role, content),
        };
        messages.push(ChatMessage {
            role,
            content,
            open: false,
        });
    }
    if let Some(plan) = &tool_plan {
        match messages.first_mut() {
            Some(m) if m.role == "system" || m.role == "developer" => {
                m.content = format!("{}\n\n{}", m.content, plan.instructions);
            }
            _ => messages.insert(
                0,
                ChatMessage {
                    role: "system".into(),
                    content: plan.instructions.clone(),
                    open: false,
                },
            ),
        }
    }
    continue_final(
        &mut messages,
        req.continue_final_message,
        req.add_generation_prompt,
        tool_plan.is_some(),
    )?;
    let template_args = template_args(req.chat_template_kwargs)?;
    let prediction = prediction(req.prediction)?;
    let logprobs = chat_logprobs(&c.logprobs, &req.top_logprobs)?;
    let n = choices(c.n)?;
    let (model, mut params, stream, include_usage) =
        common(c, req.max_completion_tokens, 1, logprobs, server)?;
    // Tool calls are a document too (`format` holds their schema); its grammar chooses
    // the tokens.
    if format.is_some() {
        let what = match tool_plan {
            Some(_) => "tool calls".to_string(),
            None => format!("`{format_param}`"),
        };
        grammar_holds(&params, &what)?;
    }
    params.format = format;
    params.prediction = prediction;
    Ok(InferenceRequest {
        endpoint: Endpoint::Chat,
        model,
        prompts: vec![Prompt::Chat(messages, template_args)],
        params,
        stream,
        include_usage,
        echo: false,
        n,
        best_of: n,
        tool_calls: tool_plan.is_some(),
        responses: None,
    })
}

/// Validates a `/v1/completions` body.
pub fn completion(body: &[u8], server: &ServerConfig) -> Result<InferenceRequest, ApiError> {
    let req: CompletionRequest = typed(body)?;
    let c: CommonParams = typed(body)?;
    if not_null(&req.suffix) {
        return Err(ApiError::unsupported("suffix", "a suffix (insertion)"));
    }
    let prompts = completion_prompts(req.prompt)?;
    let logprobs = completion_logprobs(&c.logprobs)?;
    let echo = req.echo == Some(true);
    let n = choices(c.n)?;
    let best_of = match req.best_of {
        None => n,
        Some(b) if (n..=MAX_N).contains(&b) => b,
        Some(b) => {
            return Err(ApiError::bad(
                format!("`best_of` must be from `n` ({n}) to {MAX_N}, got {b}."),
                Some("best_of".into()),
            ))
        }
    };
    if best_of > n && c.stream == Some(true) {
        return Err(ApiError::bad(
            "`best_of` greater than `n` cannot be streamed (the best are known only at the end).",
            Some("best_of".into()),
        ));
    }
    if prompts.len() * best_of as usize > MAX_CHOICES {
        return Err(ApiError::bad(
            format!(
                "{} prompts × {best_of} choices each is {}; at most {MAX_CHOICES} per request.",
                prompts.len(),
                prompts.len() * best_of as usize
            ),
            Some(if best_of > n { "best_of" } else { "n" }.into()),
        ));
    }
    if !echo && c.max_tokens == Some(0) {
        return Err(ApiError::bad(
            "`max_tokens` 0 (no completion: the prompt alone, to score it) needs `echo`.",
            Some("max_tokens".into()),
        ));
    }
    let (format, format_param) = output_format(body, req.response_format.as_ref())?;
    let least = u32::from(!echo);
    let (model, mut params, stream, include_usage) = common(c, None, least, logprobs, server)?;
    params.format = format;
    if echo && params.truncate_prompt_tokens.is_some() {
        return Err(ApiError::bad(
            "`truncate_prompt_tokens` cannot be combined with `echo` (the prompt echoed is the one sent).",
            Some("truncate_prompt_tokens".into()),
        ));
    }
    params.prompt_logprobs = echo && logprobs.is_some();
    if params.format.is_some() {
        grammar_holds(&params, &format!("`{format_param}`"))?;
    }
    Ok(InferenceRequest {
        endpoint: Endpoint::Completion,
        model,
        prompts,
        params,
        stream,
        include_usage,
        echo,
        n,
        best_of,
        tool_calls: false,
        responses: None,
    })
}

/// A completions `prompt`: a string, or token ids (`[1, 2, 3]`), or a list of either
/// (`["…", "…"]`, `[[1, 2], [3]]`): at most [`MAX_CHOICES`].
fn completion_prompts(v: Value) -> Result<Vec<Prompt>, ApiError> {
    let bad = |m: &str| ApiError::bad(m, Some("prompt".into()));
    let ids = |a: &[Value]| -> Result<Prompt, ApiError> {
        if a.is_empty() {
            return Err(bad("The prompt is empty."));
        }
        a.iter()
            .map(|t| {
                t.as_u64()
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or_else(|| {
                        bad("Invalid value for `prompt`: token ids are integers from 0.")
                    })
            })
            .collect::<Result<Vec<u32>, _>>()
            .map(Prompt::Tokens)
    };
    let prompts = match v {
        Value::String(s) => vec![Prompt::Text(s)],
        Value::Array(a) if a.iter().all(|p| p.is_string() || p.is_array()) && !a.is_empty() => a
            .into_iter()
            .map(|p| match p {
                Value::String(s) => Ok(Prompt::Text(s)),
                Value::Array(inner) => ids(&inner),
                _ => Err(bad("Invalid value for `prompt`.")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Value::Array(a) => vec![ids(&a)?],
        _ => {
            return Err(bad(
                "Invalid value for `prompt`: expected a string, token ids, or a list of either.",
            ))
        }
    };
    if prompts.len() > MAX_CHOICES {
        return Err(bad(&format!(
            "Too many prompts: {} (at most {MAX_CHOICES}).",
            prompts.len()
        )));
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> ServerConfig {
        ServerConfig::default()
    }

    fn err(body: &str) -> (u16, Option<String>, String) {
        match chat(body.as_bytes(), &server()) {
            Err(e) => {
                let status = e.status().as_u16();
                let v: Value = serde_json::from_str(&e.to_json()).expect("test input");
                (
                    status,
                    v["error"]["param"].as_str().map(str::to_string),
                    v["error"]["message"]
                        .as_str()
                        .expect("test input")
                        .to_string(),
                )
            }
            Ok(r) => panic!("accepted: {r:?}"),
        }
    }

    #[test]
    fn accepts_a_normal_request() {
        let r = chat(
            br#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"stream":true,"stream_options":{"include_usage":true},"stop":"\n","seed":7,"max_tokens":9,"temperature":0}"#,
            &server(),
        )
        .expect("test input");
        assert!(r.stream && r.include_usage);
        assert_eq!(r.params.max_tokens, 9);
        assert_eq!(r.params.stop, vec!["\n"]);
        assert_eq!(r.params.seed, Some(7));
        let [Prompt::Chat(m, args)] = &r.prompts[..] else {
            panic!()
        };
        assert_eq!(m[1].content, "hi");
        assert!(args.is_none());
        assert!(!r.params.ignore_eos && r.params.min_tokens == 0);
        // vLLM's stop and length options, on both endpoints.
        for (body, parse) in [
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"ignore_eos":true,"min_tokens":3,"stop_token_ids":[7,9]}"#,
                chat as fn(&[u8], &ServerConfig) -> Result<InferenceRequest, ApiError>,
            ),
            (
                r#"{"model":"m","prompt":"x","ignore_eos":true,"min_tokens":3,"stop_token_ids":[7,9]}"#,
                completion,
            ),
        ] {
            let p = parse(body.as_bytes(), &server()).expect("accepted").params;
            assert_eq!(
                (p.ignore_eos, p.min_tokens, p.stop_token_ids),
                (true, 3, vec![7, 9])
            );
        }
    }

    /// `chat_template_kwargs` reach the prompt as sent (vLLM's extension); `null` and `{}`
    /// are none.
    #[test]
    fn template_variables_are_taken_as_sent() {
        let base = r#""model":"m","messages":[{"role":"user","content":"x"}]"#;
        let args = |extra: &str| {
            let body = format!("{{{base},{extra}}}");
            let r = chat(body.as_bytes(), &server()).expect("accepted");
            let [Prompt::Chat(_, args)] = &r.prompts[..] else {
                panic!()
            };
            args.clone()
        };
        let on = args(r#""chat_template_kwargs":{"enable_thinking":false,"x":[1]}"#);
        assert_eq!(
            serde_json::to_value(on.as_deref()).expect("json"),
            serde_json::json!({"enable_thinking": false, "x": [1]})
        );
        assert!(args(r#""chat_template_kwargs":null"#).is_none());
        assert!(args(r#""chat_template_kwargs":{}"#).is_none());
    }

    /// `prediction` (Predicted Outputs): its text, from a string or text parts; `null` and
    /// empty content as none; any other shape a 400 naming the field.
    #[test]
    fn a_prediction_is_its_text() {
        let base = r#""model":"m","messages":[{"role":"user","content":"x"}]"#;
        let body = |extra: &str| format!("{{{base},{extra}}}");
        let text = |extra: &str| {
            let r = chat(body(extra).as_bytes(), &server()).expect("accepted");
            r.params.prediction.map(|p| p.to_string())
        };
        assert_eq!(
            text(r#""prediction":{"type":"content","content":"def f():\n"}"#).as_deref(),
            Some("def f():\n")
        );
        assert_eq!(
            text(r#""prediction":{"type":"content","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}"#)
                .as_deref(),
            Some("ab")
        );
        assert_eq!(text(r#""prediction":null"#), None);
        assert_eq!(
            text(r#""prediction":{"type":"content","content":""}"#),
            None
        );
        assert_eq!(text("\"n\":1"), None);
        for (extra, param) in [
            (r#""prediction":"text""#, "prediction"),
            (r#""prediction":{"content":"x"}"#, "prediction"),
            (r#""prediction":{"type":"content"}"#, "prediction"),
            (
                r#""prediction":{"type":"content","content":5}"#,
                "prediction",
            ),
            (
                r#""prediction":{"type":"content","content":[{"type":"text","text":"a"},{"type":"image_url"}]}"#,
                "prediction.content[1]",
            ),
        ] {
            let (s, p, m) = err(&body(extra));
            assert_eq!((s, p.as_deref()), (400, Some(param)), "{extra}: {m}");
        }
    }

    #[test]
    fn names_the_field_of_a_wrong_type() {
        let (s, p, m) =
            err(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#);
        assert_eq!((s, p.as_deref()), (400, Some("temperature")), "{m}");
        let (s, p, _) = err(r#"{"model":"m","messages":[{"role":"user","content":5}]}"#);
        assert_eq!((s, p.as_deref()), (400, Some("messages[0].content")));
        let (s, _, m) = err(r#"{"model":"m","messages":"#);
        assert!(s == 400 && m.contains("not valid JSON"));
        let (s, p, _) = err(r#"{"messages":[]}"#);
        assert_eq!(s, 400, "{p:?}");
    }

    #[test]
    fn continue_final_message_leaves_the_assistants_last_message_open() {
        let body = |extra: &str| {
            format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"x"}},{{"role":"assistant","content":"Sure"}}]{extra}}}"#
            )
        };
        let open = |extra: &str| match chat(body(extra).as_bytes(), &server()) {
            Ok(r) => match &r.prompts[0] {
                Prompt::Chat(ms, _) => Ok(ms.iter().map(|m| m.open).collect::<Vec<_>>()),
                other => panic!("{other:?}"),
            },
            Err(ApiError::BadRequest { param, .. }) => Err(param.unwrap_or_default()),
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(open(""), Ok(vec![false, false]));
        assert_eq!(
            open(r#","continue_final_message":true"#),
            Ok(vec![false, true])
        );
        assert_eq!(
            open(r#","continue_final_message":true,"add_generation_prompt":false"#),
            Ok(vec![false, true])
        );
        for (extra, param) in [
            (
                r#","continue_final_message":true,"add_generation_prompt":true"#,
                "continue_final_message",
            ),
            (r#","add_generation_prompt":false"#, "add_generation_prompt"),
            (
                r#","continue_final_message":true,"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]"#,
                "continue_final_message",
            ),
        ] {
            assert_eq!(open(extra), Err(param.to_string()), "{extra}");
        }
    }

    #[test]
    fn ranges_and_unsupported_options() {
        let base = r#""model":"m","messages":[{"role":"user","content":"x"}]"#;
        for (extra, param) in [
            (r#""max_tokens":0"#, "max_tokens"),
            (r#""max_tokens":100000"#, "max_tokens"),
            (r#""temperature":2.5"#, "temperature"),
            (r#""top_p":1.5"#, "top_p"),
            (r#""n":0"#, "n"),
            (r#""n":17"#, "n"),
            (r#""tools":[{"type":"function"}]"#, "tools[0].function.name"),
            (
                r#""tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"maybe""#,
                "tool_choice",
            ),
            (
                r#""tools":[{"type":"function","function":{"name":"f"}}],"response_format":{"type":"json_object"}"#,
                "response_format",
            ),
            (r#""presence_penalty":2.5"#, "presence_penalty"),
            (r#""frequency_penalty":-3"#, "frequency_penalty"),
            (r#""min_p":1.5"#, "min_p"),
            (r#""min_p":-0.1"#, "min_p"),
            (r#""repetition_penalty":0"#, "repetition_penalty"),
            (r#""repetition_penalty":-1.2"#, "repetition_penalty"),
            (r#""allowed_token_ids":[]"#, "allowed_token_ids"),
            (r#""bad_words":["  "]"#, "bad_words"),
            (r#""bad_words":[""]"#, "bad_words"),
            (r#""use_beam_search":true"#, "use_beam_search"),
            (r#""continue_final_message":true"#, "continue_final_message"),
            (r#""add_generation_prompt":false"#, "add_generation_prompt"),
            (r#""truncate_prompt_tokens":0"#, "truncate_prompt_tokens"),
            (r#""truncate_prompt_tokens":-2"#, "truncate_prompt_tokens"),
            (
                r#""allowed_token_ids":[5],"response_format":{"type":"json_object"}"#,
                "allowed_token_ids",
            ),
            (r#""logit_bias":{"x":1}"#, "logit_bias"),
            (r#""logit_bias":{"5":101}"#, "logit_bias"),
            (r#""logit_bias":[1]"#, "logit_bias"),
            (r#""chat_template_kwargs":true"#, "chat_template_kwargs"),
            (
                r#""chat_template_kwargs":{"add_generation_prompt":false}"#,
                "chat_template_kwargs",
            ),
            (
                r#""chat_template_kwargs":{"tools":[]}"#,
                "chat_template_kwargs",
            ),
            (
                r#""response_format":{"type":"json_schema"}"#,
                "response_format.json_schema",
            ),
            (
                r#""response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"string","format":"hostname"}}}"#,
                "response_format.json_schema.schema",
            ),
            (
                r##""response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"$ref":"#/nowhere"}}}"##,
                "response_format.json_schema.schema",
            ),
            (r#""response_format":{"type":"xml"}"#, "response_format"),
            (r#""logprobs":1"#, "logprobs"),
            (r#""top_logprobs":2"#, "top_logprobs"),
            (r#""logprobs":true,"top_logprobs":21"#, "top_logprobs"),
            (r#""logprobs":true,"top_logprobs":-1"#, "top_logprobs"),
            (
                r#""stream_options":{"include_usage":true}"#,
                "stream_options",
            ),
            (r#""stop":["a","b","c","d","e"]"#, "stop"),
            (r#""max_tokens":5,"min_tokens":6"#, "min_tokens"),
            (r#""stop_token_ids":[1,-2]"#, "stop_token_ids[1]"),
            (
                r#""ignore_eos":true,"response_format":{"type":"json_object"}"#,
                "ignore_eos",
            ),
            (
                r#""min_tokens":2,"tools":[{"type":"function","function":{"name":"f"}}]"#,
                "min_tokens",
            ),
        ] {
            let (s, p, m) = err(&format!("{{{base},{extra}}}"));
            assert_eq!((s, p.as_deref()), (400, Some(param)), "{extra}: {m}");
        }
        let ids: Vec<String> = (0..65).map(|i| i.to_string()).collect();
        let (s, p, _) = err(&format!(
            "{{{base},\"stop_token_ids\":[{}]}}",
            ids.join(",")
        ));
        assert_eq!((s, p.as_deref()), (400, Some("stop_token_ids")));
        let (_, _, m) = err(&format!("{{{base},\"functions\":[{{\"name\":\"f\"}}]}}"));
        assert!(m.contains("not supported"), "{m}");
    }

    #[test]
    fn logprobs_of_each_endpoint() {
        let chat_lp = |extra: &str| {
            let body =
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
            chat(body.as_bytes(), &server()).map(|r| r.params.logprobs)
        };
        assert_eq!(chat_lp("").ok(), Some(None));
        assert_eq!(chat_lp(r#","logprobs":false"#).ok(), Some(None));
        assert_eq!(chat_lp(r#","logprobs":true"#).ok(), Some(Some(0)));
        assert_eq!(
            chat_lp(r#","logprobs":true,"top_logprobs":20"#).ok(),
            Some(Some(20))
        );
        assert_eq!(
            chat_lp(r#","logprobs":false,"top_logprobs":null"#).ok(),
            Some(None)
        );
        let text_lp = |extra: &str| {
            let body = format!(r#"{{"model":"m","prompt":"x"{extra}}}"#);
            completion(body.as_bytes(), &server()).map(|r| r.params.logprobs)
        };
        assert_eq!(text_lp("").ok(), Some(None));
        assert_eq!(text_lp(r#","logprobs":0"#).ok(), Some(Some(0)));
        assert_eq!(text_lp(r#","logprobs":5"#).ok(), Some(Some(5)));
        assert!(text_lp(r#","logprobs":6"#).is_err());
        assert!(text_lp(r#","logprobs":true"#).is_err());
    }

    #[test]
    fn penalties_and_logit_bias() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"x"}],"presence_penalty":0.5,"frequency_penalty":-1,"logit_bias":{"7":-100,"3":2.5}}"#;
        let p = chat(body, &server()).expect("test input").params;
        assert_eq!((p.presence_penalty, p.frequency_penalty), (0.5, -1.0));
        assert_eq!(p.logit_bias, vec![(3, 2.5), (7, -100.0)]);
        assert!(p.format.is_none());
        assert_eq!((p.min_p, p.repetition_penalty), (0.0, 1.0));
        assert!(p.allowed_token_ids.is_empty());
        let body = br#"{"model":"m","prompt":"x","min_p":0.05,"repetition_penalty":1.15,"allowed_token_ids":[9,4]}"#;
        let p = completion(body, &server()).expect("test input").params;
        assert_eq!((p.min_p, p.repetition_penalty), (0.05, 1.15));
        assert_eq!(p.allowed_token_ids, vec![9, 4]);
        let body = br#"{"model":"m","prompt":"x","bad_words":["pie"," cake"]}"#;
        let p = completion(body, &server()).expect("test input").params;
        assert_eq!(p.bad_words, vec!["pie".to_string(), " cake".to_string()]);
        assert!(!p.include_stop_str_in_output);
        assert_eq!(p.truncate_prompt_tokens, None);
        let body = br#"{"model":"m","prompt":"x","truncate_prompt_tokens":-1}"#;
        let p = completion(body, &server()).expect("test input").params;
        assert_eq!(p.truncate_prompt_tokens, Some(crate::worker::KEEP_CONTEXT));
        let body = br#"{"model":"m","prompt":"x","truncate_prompt_tokens":7,"echo":true}"#;
        let e = completion(body, &server()).expect_err("echo");
        assert_eq!(e.param(), Some("truncate_prompt_tokens"));
        let body = br#"{"model":"m","prompt":"x","stop":"y","include_stop_str_in_output":true}"#;
        assert!(
            completion(body, &server())
                .expect("test input")
                .params
                .include_stop_str_in_output
        );
        let body = br#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}"#;
        assert!(matches!(
            chat(body, &server()).expect("test input").params.format,
            Some(OutputFormat::Object)
        ));
        let body = br#"{"model":"m","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"p","strict":true,"schema":{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"],"additionalProperties":false}}}}"#;
        match chat(body, &server()).expect("test input").params.format {
            Some(OutputFormat::Schema { spec, .. }) => assert_eq!(spec["name"], "p"),
            other => panic!("{other:?}"),
        }
        let many: String = (0..301)
            .map(|i| format!("\"{i}\":1"))
            .collect::<Vec<_>>()
            .join(",");
        let body = format!(r#"{{"model":"m","prompt":"x","logit_bias":{{{many}}}}}"#);
        assert!(
            completion(body.as_bytes(), &server()).is_err(),
            "301 entries"
        );
    }

    #[test]
    fn completion_prompts() {
        let ok = completion(br#"{"model":"m","prompt":["once"]}"#, &server()).expect("test input");
        assert!(matches!(&ok.prompts[..], [Prompt::Text(t)] if t == "once"));
        let two = completion(br#"{"model":"m","prompt":["a",[7,8]],"n":2}"#, &server())
            .expect("test input");
        assert!(
            matches!(&two.prompts[..], [Prompt::Text(a), Prompt::Tokens(b)] if a == "a" && b == &[7, 8])
        );
        for body in [
            r#"{"model":"m","prompt":[1,2]}"#,
            r#"{"model":"m","prompt":[[1,2]]}"#,
        ] {
            let ids = completion(body.as_bytes(), &server()).expect("test input");
            assert!(
                matches!(&ids.prompts[..], [Prompt::Tokens(t)] if t == &[1, 2]),
                "{body}"
            );
        }
        for body in [
            r#"{"model":"m","prompt":[[1],[]]}"#,
            r#"{"model":"m","prompt":[]}"#,
            r#"{"model":"m","prompt":["a","b","c","d","e","f","g","h","i"],"n":16}"#,
            r#"{"model":"m","prompt":[1,-2]}"#,
            r#"{"model":"m","prompt":[1,4294967296]}"#,
            r#"{"model":"m","prompt":[1,"a"]}"#,
            r#"{"model":"m","prompt":{"a":1}}"#,
        ] {
            let e = completion(body.as_bytes(), &server()).expect_err(body);
            assert_eq!(e.status().as_u16(), 400, "{body}");
        }
        let echo = completion(br#"{"model":"m","prompt":"x","echo":true}"#, &server());
        let echo = echo.expect("test input");
        assert!(echo.echo && !echo.params.prompt_logprobs);
        let scored = completion(
            br#"{"model":"m","prompt":"x","echo":true,"logprobs":1}"#,
            &server(),
        )
        .expect("test input");
        assert!(scored.params.prompt_logprobs);
        assert_eq!(scored.params.logprobs, Some(1));
        // No completion at all: the prompt alone, with `echo` only (to score it).
        let alone = completion(
            br#"{"model":"m","prompt":"x","echo":true,"logprobs":0,"max_tokens":0}"#,
            &server(),
        )
        .expect("test input");
        assert_eq!(alone.params.max_tokens, 0);
        assert!(alone.params.prompt_logprobs);
        for body in [
            r#"{"model":"m","prompt":"x","max_tokens":0}"#,
            r#"{"model":"m","prompt":"x","echo":false,"max_tokens":0}"#,
        ] {
            let e = completion(body.as_bytes(), &server()).expect_err(body);
            assert_eq!(e.status().as_u16(), 400, "{body}");
            assert!(e.to_string().contains("needs `echo`"), "{body}: {e}");
        }
        let chat = br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#;
        let e = super::chat(chat, &server()).expect_err("max_tokens 0 on chat");
        assert_eq!(e.status().as_u16(), 400);
    }
}
