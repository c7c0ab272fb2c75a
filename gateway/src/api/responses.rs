//! `POST /v1/responses` (OpenAI's Responses API), read: a body is translated into the chat
//! request it means and validated by the chat validator ([`validate::chat`]), so that both
//! endpoints hold the same rules; an error found there is named in the Responses body's
//! terms (`max_output_tokens`, `input[2]`, `text.format`). What the response must repeat
//! of the request (instructions, sampling, tools, metadata) travels with it
//! ([`InferenceRequest::responses`]) to [`super::render_responses`].
//!
//! Taken: `input` (a string, or items: messages with text parts, `function_call` and
//! `function_call_output`, and `reasoning` items, left out of the prompt),
//! `instructions`, `max_output_tokens`, `temperature`, `top_p`, `stream`, `text.format` (`text`, `json_object`, `json_schema`), function `tools`,
//! `tool_choice`, `parallel_tool_calls`, `include: ["message.output_text.logprobs"]` with
//! `top_logprobs`, `metadata`, `user`, `store`, `truncation` (`auto`: see
//! [`crate::truncate`]), and
//! the chat endpoint's other sampling options (`seed`, `top_k`, `stop`, penalties,
//! `logit_bias`) as extensions, and, where the gateway stores answers,
//! `previous_response_id` or `conversation` (its items, looked up by the caller, come
//! first: [`validate_map`]).
//! `background` is taken by the caller (it needs the store: [`super::background`]).
//! `item_reference` inputs are replaced by the items they name before this (where the
//! gateway stores answers: [`super::item_reference`]); refused with a 400 that names them:
//! item references where nothing is stored, prompt templates, reasoning options, non-text inputs, built-in
//! tools.

use super::error::ApiError;
use super::input_items;
use super::validate::{self, Endpoint, InferenceRequest, ResponsesInfo};
use crate::config::ServerConfig;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// What `include` may ask for.
const LOGPROBS: &str = "message.output_text.logprobs";

/// The sampling options of the chat endpoint taken here too (vLLM's extensions).
const EXTENSIONS: &[&str] = &[
    "seed",
    "top_k",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "min_p",
    "repetition_penalty",
    "allowed_token_ids",
    "include_stop_str_in_output",
    "truncate_prompt_tokens",
    "bad_words",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "use_beam_search",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_whitespace_pattern",
    "guided_decoding_backend",
    "structured_outputs",
];

/// Validates a `/v1/responses` body that continues no stored response.
pub fn validate(body: &[u8], server: &ServerConfig) -> Result<InferenceRequest, ApiError> {
    validate_map(read(body)?, server, None)
}

/// A `/v1/responses` body as a JSON object.
pub fn read(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let req: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("Request body is not valid JSON: {e}"), None))?;
    match req {
        Value::Object(req) => Ok(req),
        _ => Err(ApiError::bad("Request body must be a JSON object.", None)),
    }
}

/// What a request continues.
#[derive(Debug, Clone, PartialEq)]
pub enum Prior {
    /// A stored response (`previous_response_id`), by id.
    Response(String),
    /// A conversation (`conversation`), by id.
    Conversation(String),
}

impl Prior {
    /// The request field that names it.
    fn field(&self) -> &'static str {
        match self {
            Prior::Response(_) => "previous_response_id",
            Prior::Conversation(_) => "conversation",
        }
    }
}

/// What a request continues, and the input items it was given (they come first).
#[derive(Debug, Clone, PartialEq)]
pub struct Previous {
    pub prior: Prior,
    pub items: Vec<Value>,
    /// The stored answer whose conversation `items` start with, and how many of them are
    /// its (see [`ResponsesInfo::continues`]).
    pub continues: Option<(String, usize)>,
    /// The conversation's version when its items were read.
    pub version: i64,
}

/// Validates a `/v1/responses` body read by [`read`]; `previous`: the stored response its
/// `previous_response_id` or the conversation its `conversation` names, looked up by the
/// caller (without it, those fields are refused).
pub fn validate_map(
    mut req: Map<String, Value>,
    server: &ServerConfig,
    previous: Option<Previous>,
) -> Result<InferenceRequest, ApiError> {
    let (prior, prefix, continues, conversation_version) = match previous {
        Some(p) => {
            req.remove(p.prior.field());
            (Some(p.prior), p.items, p.continues, p.version)
        }
        None => (None, Vec::new(), None, 0),
    };
    let own_from = prefix.len();
    let (chat, origin) = translate(&req, &prefix)?;
    let bytes = serde_json::to_vec(&Value::Object(chat))
        .map_err(|e| ApiError::Internal(format!("encoding the chat request: {e}")))?;
    let earlier = prior.as_ref().map_or("previous_response_id", Prior::field);
    let mut out = validate::chat(&bytes, server).map_err(|e| rename(e, &origin, earlier))?;
    out.endpoint = Endpoint::Responses;
    out.include_usage = true;
    // The conversation through this request's input: what a stored answer continues. Its
    // own items in their stored shape, ids given once (a background response's stored
    // start and end list them alike).
    let mut conversation = prefix;
    let own = |item: &Value| input_items::stored(item, input_items::fresh_id);
    match req.get("input") {
        Some(Value::String(s)) => conversation.push(own(&json!({"role": "user", "content": s}))),
        Some(Value::Array(items)) => conversation.extend(items.iter().map(own)),
        _ => {}
    }
    out.responses = Some(ResponsesInfo {
        echo: echo(&req, prior.as_ref()),
        store: req.get("store") != Some(&Value::Bool(false)),
        conversation: Arc::new(conversation),
        own_from,
        continues,
        conversation_version,
        truncate: present(&req, "truncation").and_then(Value::as_str) == Some("auto"),
        background: req.get("background") == Some(&Value::Bool(true)),
        conversation_id: match prior {
            Some(Prior::Conversation(id)) => Some(id),
            _ => None,
        },
    });
    Ok(out)
}

/// Where a chat message came from.
#[derive(Debug, Clone, Copy)]
enum From {
    Instructions,
    /// `input[i]`.
    Input(usize),
    /// The stored response or the conversation the request continues.
    Previous,
}

type Origin = Vec<From>;

/// The fields `keys` of `from` that it has, as they are.
fn pick<'a>(
    from: &Map<String, Value>,
    keys: impl IntoIterator<Item = &'a &'a str>,
) -> Map<String, Value> {
    keys.into_iter()
        .filter_map(|&k| from.get(k).map(|v| (k.to_string(), v.clone())))
        .collect()
}

/// [`pick`] from a JSON value (nothing from one that is not an object).
fn pick_from(from: &Value, keys: &[&str]) -> Map<String, Value> {
    from.as_object().map(|o| pick(o, keys)).unwrap_or_default()
}

fn present<'a>(req: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    req.get(k).filter(|v| !v.is_null())
}

/// The chat request a Responses body means, and where its messages came from.
fn translate(
    req: &Map<String, Value>,
    prefix: &[Value],
) -> Result<(Map<String, Value>, Origin), ApiError> {
    const NOT_STORED: &str = "this gateway stores no answers (`[responses] store = false`): send the whole conversation as `input`";
    for (k, what) in [
        ("previous_response_id", "continuing a stored response"),
        ("conversation", "conversations"),
    ] {
        if present(req, k).is_some() {
            return Err(ApiError::turned_off(k, what, NOT_STORED));
        }
    }
    for (k, what) in [
        ("prompt", "prompt templates"),
        ("max_tool_calls", "`max_tool_calls`"),
    ] {
        if present(req, k).is_some() {
            return Err(ApiError::unsupported(k, what));
        }
    }
    metadata(req.get("metadata"))?;
    match present(req, "background") {
        None | Some(Value::Bool(_)) => {}
        Some(_) => {
            return Err(ApiError::bad(
                "`background` must be a boolean.",
                Some("background".into()),
            ))
        }
    }
    if let Some(r) = present(req, "reasoning") {
        let set = r
            .as_object()
            .is_none_or(|o| o.values().any(|v| !v.is_null()));
        if set {
            return Err(ApiError::unsupported(
                "reasoning",
                "reasoning options (a reasoning model's thinking, where it has any, comes as a `reasoning` item; its effort and summaries are not set per request)",
            ));
        }
    }
    match present(req, "truncation").map(|t| t.as_str()) {
        None | Some(Some("disabled" | "auto")) => {}
        Some(_) => {
            return Err(ApiError::bad(
                "`truncation` must be \"disabled\" or \"auto\".",
                Some("truncation".into()),
            ))
        }
    }
    let same = [
        "model",
        "temperature",
        "top_p",
        "stream",
        "user",
        "parallel_tool_calls",
    ];
    let mut chat = pick(req, same.iter().chain(EXTENSIONS));
    if !chat.contains_key("model") {
        return Err(ApiError::bad("`model` is required.", Some("model".into())));
    }
    if let Some(v) = req.get("max_output_tokens") {
        chat.insert("max_completion_tokens".into(), v.clone());
    }
    let (mut messages, mut origin) = messages(req)?;
    if !prefix.is_empty() {
        // After the instructions (which a continued response does not carry over).
        let at = usize::from(matches!(origin.first(), Some(From::Instructions)));
        let (mut before, mut from) = (Vec::new(), Vec::new());
        items(prefix, &mut before, &mut from)?;
        from.iter_mut().for_each(|f| *f = From::Previous);
        messages.splice(at..at, before);
        origin.splice(at..at, from);
    }
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(f) = present(req, "text").and_then(|t| t.get("format")) {
        chat.insert("response_format".into(), format(f)?);
    }
    if let Some(t) = present(req, "tools") {
        chat.insert("tools".into(), tools(t)?);
    }
    if let Some(c) = present(req, "tool_choice") {
        chat.insert("tool_choice".into(), tool_choice(c));
    }
    if logprobs(req)? {
        chat.insert("logprobs".into(), Value::Bool(true));
        if let Some(t) = req.get("top_logprobs") {
            chat.insert("top_logprobs".into(), t.clone());
        }
    }
    Ok((chat, origin))
}

/// `metadata`: at most 16 pairs, keys up to 64 characters, string values up to 512.
pub fn metadata(v: Option<&Value>) -> Result<Map<String, Value>, ApiError> {
    let bad = |m: String| ApiError::bad(m, Some("metadata".into()));
    let m = match v {
        None | Some(Value::Null) => return Ok(Map::new()),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(bad("`metadata` must be an object.".into())),
    };
    if m.len() > 16 {
        return Err(bad(format!(
            "`metadata` may have at most 16 pairs, got {}.",
            m.len()
        )));
    }
    for (k, v) in m {
        if k.chars().count() > 64 {
            return Err(bad(format!("`metadata` key {k:?} is over 64 characters.")));
        }
        match v.as_str() {
            Some(s) if s.chars().count() <= 512 => {}
            Some(_) => return Err(bad(format!("`metadata.{k}` is over 512 characters."))),
            None => return Err(bad(format!("`metadata.{k}` must be a string."))),
        }
    }
    Ok(m.clone())
}

/// Whether the answer's log-probabilities are asked for: `include` names them, or
/// `top_logprobs` asks for alternatives.
fn logprobs(req: &Map<String, Value>) -> Result<bool, ApiError> {
    let mut on = false;
    if let Some(inc) = present(req, "include") {
        let items = inc.as_array().ok_or_else(|| {
            ApiError::bad(
                "`include` must be an array of strings.",
                Some("include".into()),
            )
        })?;
        for (i, item) in items.iter().enumerate() {
            match item.as_str() {
                Some(LOGPROBS) => on = true,
                Some(other) => {
                    return Err(ApiError::unsupported(
                        &format!("include[{i}]"),
                        &format!("including {other:?}"),
                    ))
                }
                None => {
                    return Err(ApiError::bad(
                        "`include` must be an array of strings.",
                        Some(format!("include[{i}]")),
                    ))
                }
            }
        }
    }
    Ok(on || present(req, "top_logprobs").is_some_and(|t| t.as_u64() != Some(0)))
}

/// The chat messages of `instructions` and `input`.
fn messages(req: &Map<String, Value>) -> Result<(Vec<Value>, Origin), ApiError> {
    let mut out = Vec::new();
    let mut origin = Vec::new();
    match present(req, "instructions") {
        None => {}
        Some(Value::String(s)) => {
            out.push(json!({"role": "system", "content": s}));
            origin.push(From::Instructions);
        }
        Some(_) => {
            return Err(ApiError::bad(
                "`instructions` must be a string.",
                Some("instructions".into()),
            ))
        }
    }
    let items = match present(req, "input") {
        None => return Err(ApiError::bad("`input` is required.", Some("input".into()))),
        Some(Value::String(s)) => {
            out.push(json!({"role": "user", "content": s}));
            origin.push(From::Input(0));
            return Ok((out, origin));
        }
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(_) => {
            return Err(ApiError::bad(
                "`input` must be a string or a non-empty array of items.",
                Some("input".into()),
            ))
        }
    };
    self::items(items, &mut out, &mut origin)?;
    Ok((out, origin))
}

/// Checks input `items` (a conversation's: errors name `field[i]`, not `input[i]`).
pub fn check_items(items: &[Value], field: &str) -> Result<(), ApiError> {
    let (mut out, mut origin) = (Vec::new(), Vec::new());
    self::items(items, &mut out, &mut origin).map_err(|e| match e {
        ApiError::BadRequest {
            message,
            param,
            code,
        } => {
            let to = format!("{field}[");
            ApiError::BadRequest {
                message: message.replace("input[", &to),
                param: param.map(|p| p.replace("input[", &to)),
                code,
            }
        }
        e => e,
    })
}

/// The chat messages of input `items` (appended to `out`, each one's origin to `origin`).
fn items(items: &[Value], out: &mut Vec<Value>, origin: &mut Origin) -> Result<(), ApiError> {
    for (i, item) in items.iter().enumerate() {
        let at = |f: &str| format!("input[{i}]{f}");
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        let field = |k: &str| -> Result<&str, ApiError> {
            item.get(k).and_then(Value::as_str).ok_or_else(|| {
                ApiError::bad(
                    format!("`{}` must be a string.", at(&format!(".{k}"))),
                    Some(at(&format!(".{k}"))),
                )
            })
        };
        match kind {
            "message" => {
                let role = field("role")?;
                if !matches!(role, "user" | "system" | "developer" | "assistant") {
                    return Err(ApiError::bad(
                        format!("Invalid role {role:?} in `{}`.", at(".role")),
                        Some(at(".role")),
                    ));
                }
                let content = text(item.get("content"), &at(".content"))?;
                out.push(json!({"role": role, "content": content}));
            }
            "function_call" => {
                let call = json!({
                    "id": field("call_id")?,
                    "type": "function",
                    "function": {"name": field("name")?, "arguments": field("arguments")?},
                });
                // Calls one after another are one turn's calls (parallel ones).
                let last = out
                    .last_mut()
                    .filter(|m| m["role"] == "assistant" && m.get("tool_calls").is_some());
                match last.and_then(|m| m["tool_calls"].as_array_mut()) {
                    Some(calls) => {
                        calls.push(call);
                        continue;
                    }
                    None => out.push(json!({"role": "assistant", "tool_calls": [call]})),
                }
            }
            "function_call_output" => {
                let output = text(item.get("output"), &at(".output"))?;
                out.push(json!({
                    "role": "tool",
                    "tool_call_id": field("call_id")?,
                    "content": output,
                }));
            }
            // A reasoning model's earlier thinking (an answer's `reasoning` item sent
            // back): not part of the prompt, as the models' own templates drop past
            // turns' thinking.
            "reasoning" => {
                if !matches!(
                    item.get("content"),
                    None | Some(Value::Null | Value::Array(_))
                ) {
                    return Err(ApiError::bad(
                        format!("`{}` must be an array of parts.", at(".content")),
                        Some(at(".content")),
                    ));
                }
                continue;
            }
            "item_reference" => {
                return Err(ApiError::unsupported(
                    &at(""),
                    "item references where nothing is stored (send the item itself)",
                ))
            }
            other => {
                return Err(ApiError::unsupported(
                    &at(".type"),
                    &format!("input items of type {other:?}"),
                ))
            }
        }
        origin.push(From::Input(i));
    }
    Ok(())
}

/// A message's or a tool output's text: a string, or text parts (`input_text`,
/// `output_text`) joined.
fn text(content: Option<&Value>, at: &str) -> Result<String, ApiError> {
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut s = String::new();
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
                match (kind, p.get("text").and_then(Value::as_str)) {
                    ("input_text" | "output_text", Some(t)) => s.push_str(t),
                    ("input_text" | "output_text", None) => {
                        return Err(ApiError::bad(
                            format!("`{at}[{j}].text` must be a string."),
                            Some(format!("{at}[{j}].text")),
                        ))
                    }
                    _ => {
                        return Err(ApiError::unsupported(
                            &format!("{at}[{j}]"),
                            &format!("content of type {kind:?}"),
                        ))
                    }
                }
            }
            Ok(s)
        }
        _ => Err(ApiError::bad(
            format!("`{at}` must be a string or an array of text parts."),
            Some(at.to_string()),
        )),
    }
}

/// `text.format` as the chat endpoint's `response_format`.
fn format(f: &Value) -> Result<Value, ApiError> {
    match f.get("type").and_then(Value::as_str) {
        Some("json_schema") => {
            let spec = pick_from(f, &["name", "schema", "strict", "description"]);
            if !spec.contains_key("schema") {
                return Err(ApiError::bad(
                    "`text.format.schema` is required with `type: \"json_schema\"`.",
                    Some("text.format.schema".into()),
                ));
            }
            Ok(json!({"type": "json_schema", "json_schema": spec}))
        }
        Some(t @ ("text" | "json_object")) => Ok(json!({ "type": t })),
        _ => Err(ApiError::bad(
            format!(
                "`text.format.type` must be \"text\", \"json_object\" or \"json_schema\", got {}.",
                f.get("type").unwrap_or(&Value::Null)
            ),
            Some("text.format.type".into()),
        )),
    }
}

/// Function tools as the chat endpoint's (`{type, function: {name, …}}`).
fn tools(t: &Value) -> Result<Value, ApiError> {
    let list = t
        .as_array()
        .ok_or_else(|| ApiError::bad("`tools` must be an array.", Some("tools".into())))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => {
                let f = pick_from(tool, &["name", "description", "parameters", "strict"]);
                out.push(json!({"type": "function", "function": f}));
            }
            other => {
                return Err(ApiError::unsupported(
                    &format!("tools[{i}].type"),
                    &format!("tools of type {}", other.unwrap_or("(none)")),
                ))
            }
        }
    }
    Ok(Value::Array(out))
}

/// `tool_choice` as the chat endpoint's (a named function nests its name).
fn tool_choice(c: &Value) -> Value {
    match (c.get("type").and_then(Value::as_str), c.get("name")) {
        (Some("function"), Some(name)) => json!({"type": "function", "function": {"name": name}}),
        _ => c.clone(),
    }
}

/// A chat validation error in the Responses body's terms.
/// (`earlier`: the field that named what the request continues.)
fn rename(e: ApiError, origin: &Origin, earlier: &str) -> ApiError {
    let ApiError::BadRequest {
        message,
        param,
        code,
    } = e
    else {
        return e;
    };
    let fix = |s: &str| -> String {
        let mut s = s
            .replace("response_format.json_schema.schema", "text.format.schema")
            .replace("response_format.json_schema", "text.format")
            .replace("response_format", "text.format")
            .replace("max_completion_tokens", "max_output_tokens")
            .replace("max_tokens", "max_output_tokens")
            .replace("].function.", "].");
        // `messages[k]…` → the item it came from.
        while let Some(at) = s.find("messages[") {
            let rest = &s[at + "messages[".len()..];
            let Some(end) = rest.find(']') else { break };
            let k: Option<usize> = rest[..end].parse().ok();
            let to = match k.and_then(|k| origin.get(k).copied()) {
                Some(From::Input(i)) => format!("input[{i}]"),
                Some(From::Instructions) => "instructions".to_string(),
                Some(From::Previous) => earlier.to_string(),
                None => "input".to_string(),
            };
            s.replace_range(at..at + "messages[".len() + end + 1, &to);
        }
        s
    };
    ApiError::BadRequest {
        message: fix(&message),
        param: param.map(|p| fix(&p)),
        code,
    }
}

/// What the response repeats of the request, with the defaults OpenAI answers: JSON
/// object members without the braces, written once here and spliced into each `response`
/// object the answer writes.
fn echo(req: &Map<String, Value>, prior: Option<&Prior>) -> Arc<str> {
    // Each member: what the request says (when it says anything), or the default's JSON.
    const ECHOED: &[(&str, &str)] = &[
        ("instructions", "null"),
        ("max_output_tokens", "null"),
        ("temperature", "1.0"),
        ("top_p", "1.0"),
        ("top_logprobs", "0"),
        ("text", r#"{"format":{"type":"text"}}"#),
        ("tools", "[]"),
        ("tool_choice", r#""auto""#),
        ("parallel_tool_calls", "true"),
        ("metadata", "{}"),
        ("user", "null"),
        ("truncation", r#""disabled""#),
        ("background", "false"),
    ];
    const FIXED: &str = r#""reasoning":{"effort":null,"summary":null},"service_tier":"default""#;
    let mut out = String::with_capacity(512);
    for (k, default) in ECHOED {
        out.push('"');
        out.push_str(k);
        out.push_str("\":");
        match present(req, k).map(|v| v.to_string()) {
            Some(v) => out.push_str(&v),
            None => out.push_str(default),
        }
        out.push(',');
    }
    let (previous, conversation) = match prior {
        Some(Prior::Response(id)) => (Value::from(id.as_str()), Value::Null),
        Some(Prior::Conversation(id)) => (Value::Null, json!({ "id": id })),
        None => (Value::Null, Value::Null),
    };
    out.push_str("\"previous_response_id\":");
    out.push_str(&previous.to_string());
    out.push_str(",\"conversation\":");
    out.push_str(&conversation.to_string());
    out.push(',');
    out.push_str(FIXED);
    Arc::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> ServerConfig {
        ServerConfig::default()
    }

    fn ok(v: Value) -> InferenceRequest {
        validate(v.to_string().as_bytes(), &server()).expect("valid")
    }

    fn err(v: Value) -> (String, Option<String>) {
        match validate(v.to_string().as_bytes(), &server()) {
            Err(ApiError::BadRequest { message, param, .. }) => (message, param),
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn a_string_input_with_instructions_is_a_system_and_a_user_message() {
        let r = ok(
            json!({"model": "m", "input": "Hi", "instructions": "Be brief",
            "max_output_tokens": 7, "temperature": 0}),
        );
        assert_eq!(r.endpoint, Endpoint::Responses);
        assert_eq!(r.params.max_tokens, 7);
        assert_eq!(r.params.temperature, 0.0);
        let crate::worker::Prompt::Chat(m, _) = &r.prompts[0] else {
            panic!("a chat prompt")
        };
        let turns: Vec<(&str, &str)> = m
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        assert_eq!(turns, [("system", "Be brief"), ("user", "Hi")]);
        let echo = format!("{{{}}}", r.responses.expect("the echo").echo);
        let echo: Value = serde_json::from_str(&echo).expect("the echo is JSON object members");
        assert_eq!(echo["instructions"], "Be brief");
        assert_eq!(echo["max_output_tokens"], 7);
        assert_eq!(echo["previous_response_id"], Value::Null);
    }

    #[test]
    fn items_become_turns_and_calls_one_after_another_are_one_turn() {
        let r = ok(json!({"model": "m", "input": [
            {"role": "developer", "content": [{"type": "input_text", "text": "Rules"}]},
            {"type": "message", "role": "user", "content": "Weather?"},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{\"city\":\"A\"}"},
            {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{\"city\":\"B\"}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sun"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]},
        ]}));
        let crate::worker::Prompt::Chat(m, _) = &r.prompts[0] else {
            panic!("a chat prompt")
        };
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        // The tool's output is a user turn in text (as on the chat endpoint).
        assert_eq!(
            roles,
            ["developer", "user", "assistant", "user", "assistant"]
        );
        assert!(
            m[2].content.contains("\"A\"") && m[2].content.contains("\"B\""),
            "{m:?}"
        );
        assert!(m[3].content.contains("sun"), "{m:?}");
    }

    #[test]
    fn formats_tools_and_logprobs_map_onto_the_chat_request() {
        let r = ok(json!({"model": "m", "input": "x",
            "text": {"format": {"type": "json_schema", "name": "p",
                "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}}));
        assert!(r.params.format.is_some());
        let r = ok(json!({"model": "m", "input": "x",
            "tools": [{"type": "function", "name": "w",
                "parameters": {"type": "object", "properties": {}}}],
            "tool_choice": {"type": "function", "name": "w"}}));
        assert!(r.tool_calls);
        let r = ok(json!({"model": "m", "input": "x",
            "include": ["message.output_text.logprobs"], "top_logprobs": 3}));
        assert_eq!(r.params.logprobs, Some(3));
        let r = ok(json!({"model": "m", "input": "x", "seed": 5, "top_k": 4}));
        assert_eq!((r.params.seed, r.params.top_k), (Some(5), 4));
    }

    #[test]
    fn a_conversation_comes_first_and_is_echoed() {
        let req = read(br#"{"model": "m", "input": "and you?"}"#).expect("an object");
        let earlier = vec![json!({"id": "msg_1", "role": "user", "content": "hi"})];
        let previous = Previous {
            prior: Prior::Conversation("conv_1".into()),
            items: earlier,
            continues: Some(("resp_1".into(), 1)),
            version: 7,
        };
        let r = validate_map(req, &server(), Some(previous)).expect("valid");
        let info = r.responses.expect("responses info");
        assert_eq!(info.conversation_id.as_deref(), Some("conv_1"));
        assert_eq!((info.own_from, info.conversation.len()), (1, 2));
        assert_eq!(info.continues, Some(("resp_1".into(), 1)));
        assert_eq!(info.conversation_version, 7);
        let echo: Value = serde_json::from_str(&format!("{{{}}}", info.echo)).expect("JSON");
        assert_eq!(echo["conversation"], json!({"id": "conv_1"}));
        assert_eq!(echo["previous_response_id"], Value::Null);
    }

    #[test]
    fn errors_name_the_responses_fields() {
        let cases = [
            (json!({"model": "m"}), "input"),
            (json!({"model": "m", "input": []}), "input"),
            (json!({"input": "x"}), "model"),
            (
                json!({"model": "m", "input": "x", "max_output_tokens": 0}),
                "max_output_tokens",
            ),
            (
                json!({"model": "m", "input": "x", "temperature": 3}),
                "temperature",
            ),
            (
                json!({"model": "m", "input": [{"role": "user", "content": "a"},
                {"role": "robot", "content": "b"}]}),
                "input[1].role",
            ),
            (
                json!({"model": "m", "input": [{"role": "user",
                "content": [{"type": "input_image", "image_url": "x"}]}]}),
                "input[0].content[0]",
            ),
            (
                json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}),
                "previous_response_id",
            ),
            (
                json!({"model": "m", "input": "x", "reasoning": {"effort": "high"}}),
                "reasoning",
            ),
            (
                json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
                "tools[0].type",
            ),
            (
                json!({"model": "m", "input": "x", "tools": [{"type": "function", "name": "w",
                "parameters": {"type": "object", "multipleOf": 2}}]}),
                "tools[0].parameters",
            ),
            (
                json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema"}}}),
                "text.format.schema",
            ),
            (
                json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema",
                "name": "p", "schema": {"type": "string", "format": "hostname"}}}}),
                "text.format.schema",
            ),
            (
                json!({"model": "m", "input": "x", "include": ["file_search_call.results"]}),
                "include[0]",
            ),
            (
                json!({"model": "m", "input": "x", "truncation": "last"}),
                "truncation",
            ),
            (
                json!({"model": "m", "input": "x", "metadata": {"n": 1}}),
                "metadata",
            ),
            (
                json!({"model": "m", "input": "x", "background": "yes"}),
                "background",
            ),
        ];
        for (body, want) in cases {
            let (message, param) = err(body.clone());
            assert_eq!(param.as_deref(), Some(want), "{body}: {message}");
            assert!(
                !message.contains("messages") && !message.contains("response_format"),
                "{body}: {message}"
            );
        }
    }
    /// Without a store, a request that needs one says so and what to send instead.
    #[test]
    fn without_a_store_continuing_says_what_to_send_instead() {
        for field in ["previous_response_id", "conversation"] {
            let (message, param) = err(json!({"model": "m", "input": "x", field: "resp_1"}));
            assert_eq!(param.as_deref(), Some(field));
            assert_eq!(
                message,
                format!(
                    "`{field}`: {} is turned off on this gateway; this gateway stores no \
                     answers (`[responses] store = false`): send the whole conversation as \
                     `input`.",
                    if field == "conversation" {
                        "conversations"
                    } else {
                        "continuing a stored response"
                    }
                )
            );
        }
    }
}
