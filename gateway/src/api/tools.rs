//! Tool calling (`tools`, `tool_choice`) on any worker that honours structured output.
//!
//! The model is told the functions (a system message) and its answer is constrained to one
//! JSON document (structured output, [`crate::worker::OutputFormat`]):
//! `{"name": <a tool's name>, "arguments": <that tool's parameters schema>}` for a call;
//! unless `parallel_tool_calls` is `false` (or `tool_choice` names one function), also an
//! array of 2 to [`MAX_CALLS`] such objects for several calls at once; and, with
//! `tool_choice: "auto"`, also `{"content": "<text>"}` for an answer in words.
//! So a call's arguments always validate against the tool's schema, whatever the model,
//! and no model-specific tool-call format needs parsing. The renderer turns the document
//! back into the OpenAI shape (`message.tool_calls` and `finish_reason: "tool_calls"`, or
//! `message.content`); streamed, [`AnswerStream`] reads the document as it is written, so
//! that each call's name goes out as soon as it is complete and its arguments (or the
//! words) as they come, each call under its own `index`.
//!
//! Earlier turns (assistant messages with `tool_calls`, `tool` messages with results) are
//! written into the conversation as text in the same JSON shape, so that every chat
//! template takes them.

use super::error::ApiError;
use serde_json::{json, Value};

/// What a request's tools add to it: the system message that describes them, and the
/// schema of the answer.
pub struct ToolPlan {
    pub instructions: String,
    pub schema: Value,
}

/// The most tools a request may declare.
const MAX_TOOLS: usize = 128;
/// The most calls one answer may make (`parallel_tool_calls`).
pub const MAX_CALLS: usize = 16;

fn bad(message: String, param: &str) -> ApiError {
    ApiError::bad(message, Some(param.to_string()))
}

/// Validates `tools`, `tool_choice` and `parallel_tool_calls`; `None` when no tool may be
/// called (no tools, or `tool_choice: "none"`).
pub fn plan(
    tools: Option<&Value>,
    choice: Option<&Value>,
    parallel: Option<&Value>,
) -> Result<Option<ToolPlan>, ApiError> {
    let parallel = match parallel {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(bad(
                "`parallel_tool_calls` must be a boolean.".into(),
                "parallel_tool_calls",
            ))
        }
    };
    let tools: &[Value] = match tools {
        None | Some(Value::Null) => &[],
        Some(Value::Array(t)) => t,
        Some(_) => return Err(bad("`tools` must be an array.".into(), "tools")),
    };
    if tools.len() > MAX_TOOLS {
        return Err(bad(format!("At most {MAX_TOOLS} tools."), "tools"));
    }
    let mut declared: Vec<(&str, &Value)> = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        if t["type"] != "function" {
            return Err(bad(
                format!("`{param}.type` must be \"function\"."),
                &format!("{param}.type"),
            ));
        }
        let f = &t["function"];
        let name = f["name"].as_str().unwrap_or_default();
        let valid = (1..=64).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(bad(
                format!("`{param}.function.name` must be 1 to 64 letters, digits, `_` or `-`."),
                &format!("{param}.function.name"),
            ));
        }
        if declared.iter().any(|(n, _)| *n == name) {
            return Err(bad(
                format!("Two tools are named {name:?}."),
                &format!("{param}.function.name"),
            ));
        }
        // Each tool's parameters are checked alone, so that an error names the tool.
        let params = parameters(f);
        kernels::json_schema::Schema::compile(&params).map_err(|e| {
            bad(
                format!("`{param}.function.parameters`: {e}."),
                &format!("{param}.function.parameters"),
            )
        })?;
        declared.push((name, f));
    }
    // A named function is called once.
    let (callable, auto, parallel): (Vec<&(&str, &Value)>, bool, bool) = match choice {
        None | Some(Value::Null) => (declared.iter().collect(), true, parallel),
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => (declared.iter().collect(), true, parallel),
            "required" => (declared.iter().collect(), false, parallel),
            other => {
                return Err(bad(
                    format!(
                        "`tool_choice` must be \"none\", \"auto\", \"required\" or a named function, got {other:?}."
                    ),
                    "tool_choice",
                ))
            }
        },
        Some(v) => {
            let name = v["function"]["name"].as_str().unwrap_or_default();
            let named: Vec<_> = declared.iter().filter(|(n, _)| *n == name).collect();
            if v["type"] != "function" || named.is_empty() {
                return Err(bad(
                    format!("`tool_choice` names no declared function ({name:?})."),
                    "tool_choice",
                ));
            }
            (named, false, false)
        }
    };
    if callable.is_empty() {
        return match auto {
            true => Ok(None),
            false => Err(bad(
                "`tool_choice` requires a tool, and `tools` is empty.".into(),
                "tool_choice",
            )),
        };
    }
    let mut alternatives: Vec<Value> = callable
        .iter()
        .enumerate()
        .map(|(i, (name, f))| {
            let mut params = parameters(f);
            rebase_refs(&mut params, &format!("#/anyOf/{i}/properties/arguments"));
            json!({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": false
            })
        })
        .collect();
    if parallel {
        // Several calls: an array whose items are the calls above.
        let calls: Vec<Value> = (0..alternatives.len())
            .map(|i| json!({"$ref": format!("#/anyOf/{i}")}))
            .collect();
        alternatives.push(json!({
            "type": "array",
            "items": {"anyOf": calls},
            "minItems": 2,
            "maxItems": MAX_CALLS
        }));
    }
    if auto {
        alternatives.push(json!({
            "type": "object",
            "properties": {"content": {"type": "string"}},
            "required": ["content"],
            "additionalProperties": false
        }));
    }
    let listed: Vec<Value> = callable
        .iter()
        .map(|(name, f)| json!({"name": name, "description": f["description"], "parameters": parameters(f)}))
        .collect();
    let mut instructions = String::from(
        "You can call these functions. Each is given with a JSON Schema of its arguments:\n",
    );
    for t in &listed {
        instructions.push_str(&t.to_string());
        instructions.push('\n');
    }
    instructions.push_str(match (auto, parallel) {
        (true, false) => "Answer with one JSON object: {\"name\": <function name>, \"arguments\": <its arguments>} to call a function, or {\"content\": <your answer>} to answer without one.",
        (true, true) => "Answer with one JSON object: {\"name\": <function name>, \"arguments\": <its arguments>} to call a function, a JSON array of such objects to call several at once, or {\"content\": <your answer>} to answer without one.",
        (false, false) => "Answer with one JSON object that calls a function: {\"name\": <function name>, \"arguments\": <its arguments>}.",
        (false, true) => "Answer with one JSON object that calls a function: {\"name\": <function name>, \"arguments\": <its arguments>}, or a JSON array of such objects to call several at once.",
    });
    Ok(Some(ToolPlan {
        instructions,
        schema: json!({"anyOf": alternatives}),
    }))
}

/// A function's parameters schema; none declared: no arguments (`{}`).
fn parameters(f: &Value) -> Value {
    match &f["parameters"] {
        Value::Null => json!({"type": "object", "properties": {}, "additionalProperties": false}),
        p => p.clone(),
    }
}

/// Points the local `$ref`s of a schema that will sit at `base` in a larger document
/// there (`#/$defs/X` → `base/$defs/X`).
fn rebase_refs(v: &mut Value, base: &str) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                match (k.as_str(), x) {
                    ("$ref", Value::String(r)) if r.starts_with('#') => {
                        *r = format!("{base}{}", &r[1..]);
                    }
                    (_, x) => rebase_refs(x, base),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rebase_refs(x, base)),
        _ => {}
    }
}

/// An earlier assistant turn's `tool_calls`, as the text the model would have written.
pub fn calls_as_text(calls: &Value, param: &str) -> Result<String, ApiError> {
    let calls = calls
        .as_array()
        .ok_or_else(|| bad(format!("`{param}` must be an array."), param))?;
    let mut written = Vec::with_capacity(calls.len());
    for (j, c) in calls.iter().enumerate() {
        let f = &c["function"];
        let name = f["name"].as_str().ok_or_else(|| {
            bad(
                format!("`{param}[{j}].function.name` must be a string."),
                &format!("{param}[{j}].function.name"),
            )
        })?;
        // Arguments come as a JSON string; one that does not parse is kept as a string.
        let arguments = match &f["arguments"] {
            Value::String(s) => {
                serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))
            }
            other => other.clone(),
        };
        written.push(json!({"name": name, "arguments": arguments}));
    }
    // As the model writes them: one call as its object, several as an array.
    Ok(match written.len() {
        1 => written[0].to_string(),
        _ => Value::Array(written).to_string(),
    })
}

/// A `tool` message's result, as the text the model reads.
pub fn result_as_text(content: &str, call_id: Option<&str>) -> String {
    match call_id {
        Some(id) => format!("Result of function call {id}: {content}"),
        None => format!("Function result: {content}"),
    }
}

/// A call of an answer: the function's name and its arguments as JSON text.
#[derive(Debug, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: String,
}

/// What a tool-calling answer turned out to be.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// One call, or several (`parallel_tool_calls`), in the order written.
    Calls(Vec<Call>),
    /// An answer in words (`tool_choice: "auto"`).
    Content(String),
}

/// Reads a complete answer document; `None` if it is not one (cut short by `max_tokens`).
pub fn answer(text: &str) -> Option<Answer> {
    fn call(v: &Value) -> Option<Call> {
        Some(Call {
            name: v.get("name")?.as_str()?.to_string(),
            arguments: v.get("arguments")?.to_string(),
        })
    }
    let v: Value = serde_json::from_str(text).ok()?;
    if let Some(c) = v.get("content").and_then(Value::as_str) {
        return Some(Answer::Content(c.to_string()));
    }
    Some(Answer::Calls(match &v {
        Value::Array(calls) => calls.iter().map(call).collect::<Option<_>>()?,
        one => vec![call(one)?],
    }))
}

/// A piece of a tool-calling answer that can be streamed as soon as it is generated.
#[derive(Debug, PartialEq)]
pub enum Piece {
    /// Call `index` (0, 1, … in the answer) begins: the function's name (its arguments
    /// follow).
    Call { index: u32, name: String },
    /// More of call `index`'s arguments (JSON text).
    Arguments { index: u32, text: String },
    /// More of an answer in words (decoded from its JSON string).
    Content(String),
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum Phase {
    /// Before the document's first byte: `[` opens several calls.
    #[default]
    Start,
    /// Before an object's first key's value: `{`, the key, `:`.
    Head,
    /// In the name's string.
    Name,
    /// Between the name and the arguments' first byte: `,`, `"arguments"`, `:`.
    BeforeArguments,
    /// In the arguments: their containers' depth, inside a string, after a backslash.
    Arguments {
        depth: u32,
        string: bool,
        escape: bool,
    },
    /// After a call in an array: its `}`, then `,` (another call) or `]`.
    AfterCall,
    /// In the words' string.
    Content,
    /// The part to stream is over (what is left closes the document).
    Done,
}

/// Reads a tool-calling answer (the document of [`plan`]'s schema) as it is generated,
/// so that a stream can send each call's name as soon as it is written, then its
/// arguments as they come (or the words, decoded, as they come). The schema fixes the
/// order: the first key is `name` or `content`, and `arguments` follows `name`; several
/// calls are an array of such objects.
#[derive(Debug, Default)]
pub struct AnswerStream {
    text: String,
    /// How far `text` is read.
    at: usize,
    phase: Phase,
    /// The calls are an array.
    array: bool,
    /// Calls begun so far.
    calls: u32,
    /// Whether anything was sent.
    sent: bool,
}

impl AnswerStream {
    /// Takes the next piece of generated text; returns what can be sent now.
    pub fn push(&mut self, more: &str) -> Vec<Piece> {
        self.text.push_str(more);
        let mut out = Vec::new();
        loop {
            let rest = &self.text[self.at..];
            match self.phase {
                Phase::Start => {
                    let Some(first) = rest.find(|c: char| !c.is_whitespace()) else {
                        break;
                    };
                    if rest[first..].starts_with('[') {
                        self.array = true;
                        self.at += first + 1;
                    }
                    self.phase = Phase::Head;
                }
                Phase::Head => {
                    // `{`, whitespace, the key, whitespace, `:`, whitespace, `"`.
                    let Some(q) = rest.find(':') else { break };
                    let Some(open) = rest[q..].find('"').map(|i| q + i) else {
                        break;
                    };
                    let key = rest[..q].trim_matches(|c: char| c == '{' || c.is_whitespace());
                    self.at += open + 1;
                    self.phase = if key == "\"content\"" {
                        Phase::Content
                    } else {
                        Phase::Name
                    };
                }
                Phase::Name => {
                    let Some((name, used)) = json_string(rest) else {
                        break;
                    };
                    self.at += used;
                    out.push(Piece::Call {
                        index: self.calls,
                        name,
                    });
                    self.calls += 1;
                    self.phase = Phase::BeforeArguments;
                }
                Phase::BeforeArguments => {
                    let Some(colon) = rest.find(':') else { break };
                    let after = &rest[colon + 1..];
                    let Some(start) = after.find(|c: char| !c.is_whitespace()) else {
                        break;
                    };
                    self.at += colon + 1 + start;
                    self.phase = Phase::Arguments {
                        depth: 0,
                        string: false,
                        escape: false,
                    };
                }
                Phase::Arguments {
                    mut depth,
                    mut string,
                    mut escape,
                } => {
                    // The arguments end with their outer container or string, or, for a
                    // number or word, at the first byte after it.
                    let mut end = None;
                    for (i, b) in rest.bytes().enumerate() {
                        if string {
                            match (escape, b) {
                                (true, _) => escape = false,
                                (false, b'\\') => escape = true,
                                (false, b'"') => {
                                    string = false;
                                    if depth == 0 {
                                        end = Some(i + 1);
                                        break;
                                    }
                                }
                                _ => {}
                            }
                            continue;
                        }
                        match b {
                            b'"' => string = true,
                            b'{' | b'[' => depth += 1,
                            b'}' | b']' if depth > 0 => {
                                depth -= 1;
                                if depth == 0 {
                                    end = Some(i + 1);
                                    break;
                                }
                            }
                            b'}' | b']' | b',' if depth == 0 => {
                                end = Some(i);
                                break;
                            }
                            b if depth == 0 && b.is_ascii_whitespace() => {
                                end = Some(i);
                                break;
                            }
                            _ => {}
                        }
                    }
                    let take = end.unwrap_or(rest.len());
                    if take > 0 {
                        out.push(Piece::Arguments {
                            index: self.calls.saturating_sub(1),
                            text: rest[..take].to_string(),
                        });
                    }
                    self.at += take;
                    if end.is_none() {
                        self.phase = Phase::Arguments {
                            depth,
                            string,
                            escape,
                        };
                        break;
                    }
                    self.phase = match self.array {
                        true => Phase::AfterCall,
                        false => Phase::Done,
                    };
                }
                Phase::AfterCall => {
                    let Some(at) = rest.find([',', ']']) else {
                        break;
                    };
                    self.at += at + 1;
                    self.phase = match rest.as_bytes()[at] {
                        b',' => Phase::Head,
                        _ => Phase::Done,
                    };
                }
                Phase::Content => {
                    let (value, used) = match json_string(rest) {
                        Some((v, used)) => {
                            self.phase = Phase::Done;
                            (v, used)
                        }
                        None => match decode_prefix(rest) {
                            (v, used) if used > 0 => (v, used),
                            _ => break,
                        },
                    };
                    self.at += used;
                    if !value.is_empty() {
                        out.push(Piece::Content(value));
                    }
                    if self.phase != Phase::Done {
                        break;
                    }
                }
                Phase::Done => break,
            }
        }
        self.sent |= !out.is_empty();
        out
    }

    /// The answer has ended: what is still to send (when nothing could be read as a call
    /// or words, the text as it is), and whether it made a call.
    pub fn finish(&mut self) -> (Vec<Piece>, bool) {
        let mut out = Vec::new();
        if !self.sent && !self.text.is_empty() {
            out.push(Piece::Content(std::mem::take(&mut self.text)));
        }
        self.at = self.text.len();
        (out, self.calls > 0)
    }
}

/// A whole JSON string at the start of `s` (after its opening quote): its value and the
/// bytes it took with the closing quote; `None` until it is complete.
fn json_string(s: &str) -> Option<(String, usize)> {
    let mut escape = false;
    for (i, b) in s.bytes().enumerate() {
        match (escape, b) {
            (true, _) => escape = false,
            (false, b'\\') => escape = true,
            (false, b'"') => {
                let v: String = serde_json::from_str(&format!("\"{}\"", &s[..i])).ok()?;
                return Some((v, i + 1));
            }
            _ => {}
        }
    }
    None
}

/// The longest start of a JSON string's inside (no closing quote yet) that decodes on its
/// own: it stops before an escape whose characters have not all come (a `\uD83D` waits
/// for its low surrogate).
fn decode_prefix(s: &str) -> (String, usize) {
    let b = s.as_bytes();
    let mut end = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
            end = i;
            continue;
        }
        let need = match b.get(i + 1) {
            None => break,
            Some(b'u') => {
                let high = s
                    .get(i + 2..i + 6)
                    .and_then(|h| u16::from_str_radix(h, 16).ok());
                match high {
                    None => break,
                    Some(h) if (0xD800..0xDC00).contains(&h) => 12,
                    Some(_) => 6,
                }
            }
            Some(_) => 2,
        };
        if i + need > b.len() {
            break;
        }
        i += need;
        end = i;
    }
    let value = serde_json::from_str(&format!("\"{}\"", &s[..end])).unwrap_or_default();
    (value, end)
}

/// A new tool call's id.
pub fn call_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &id[..24])
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::json_mode::JsonState;
    use kernels::json_schema::Schema;
    use std::sync::Arc;

    fn weather() -> Value {
        json!([{"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string"}, "unit": {"$ref": "#/$defs/Unit"}},
                "required": ["city", "unit"], "additionalProperties": false,
                "$defs": {"Unit": {"enum": ["c", "f"]}}}
        }}, {"type": "function", "function": {"name": "now"}}])
    }

    fn accepts(plan: &ToolPlan, doc: &str) -> bool {
        let mut st =
            JsonState::with_schema(Arc::new(Schema::compile(&plan.schema).expect("test input")));
        st.advance(doc.as_bytes()) && st.done()
    }

    #[test]
    fn calls_follow_the_tools_schemas_and_auto_allows_words() {
        let auto = plan(Some(&weather()), None, None)
            .expect("test input")
            .expect("test input");
        assert!(auto.instructions.contains("get_weather") && auto.instructions.contains("\"now\""));
        assert!(accepts(
            &auto,
            r#"{"name":"get_weather","arguments":{"city":"Oslo","unit":"c"}}"#
        ));
        assert!(accepts(&auto, r#"{"name":"now","arguments":{}}"#));
        assert!(accepts(&auto, r#"{"content":"It is sunny."}"#));
        assert!(!accepts(
            &auto,
            r#"{"name":"get_weather","arguments":{"city":"Oslo","unit":"k"}}"#
        ));
        assert!(!accepts(&auto, r#"{"name":"other","arguments":{}}"#));
        let required = plan(Some(&weather()), Some(&json!("required")), None)
            .expect("test input")
            .expect("test input");
        assert!(!accepts(&required, r#"{"content":"no"}"#));
        let named = plan(
            Some(&weather()),
            Some(&json!({"type": "function", "function": {"name": "now"}})),
            None,
        )
        .expect("test input")
        .expect("test input");
        assert!(accepts(&named, r#"{"name":"now","arguments":{}}"#));
        assert!(!accepts(
            &named,
            r#"{"name":"get_weather","arguments":{"city":"Oslo","unit":"c"}}"#
        ));
        assert!(plan(Some(&weather()), Some(&json!("none")), None)
            .expect("test input")
            .is_none());
        assert!(plan(None, None, None).expect("test input").is_none());
    }

    #[test]
    fn several_calls_are_an_array_unless_parallel_calls_are_off() {
        let call = r#"{"name":"get_weather","arguments":{"city":"Oslo","unit":"c"}}"#;
        let now = r#"{"name":"now","arguments":{}}"#;
        let array = |n: usize| format!("[{}]", [call, now].repeat(n)[..n].join(","));
        for (choice, parallel) in [(None, None), (Some(json!("required")), Some(json!(true)))] {
            let p = plan(Some(&weather()), choice.as_ref(), parallel.as_ref())
                .expect("test input")
                .expect("test input");
            assert!(p.instructions.contains("array"), "{}", p.instructions);
            assert!(accepts(&p, call));
            assert!(accepts(&p, &array(2)));
            assert!(accepts(&p, &format!("[ {now} ,\n{call}]")));
            assert!(accepts(&p, &array(MAX_CALLS)));
            // One call is written as its object; no more than MAX_CALLS; no words in it.
            assert!(!accepts(&p, &array(1)));
            assert!(!accepts(&p, &array(MAX_CALLS + 1)));
            assert!(!accepts(&p, r#"[{"content":"x"},{"content":"y"}]"#));
            assert!(!accepts(
                &p,
                r#"[{"name":"now","arguments":{}},{"name":"now","arguments":{"x":1}}]"#
            ));
        }
        // Off, or a named function: one call.
        let named = json!({"type": "function", "function": {"name": "now"}});
        for (choice, parallel) in [(None, json!(false)), (Some(named), json!(null))] {
            let p = plan(Some(&weather()), choice.as_ref(), Some(&parallel))
                .expect("test input")
                .expect("test input");
            assert!(!p.instructions.contains("array"), "{}", p.instructions);
            assert!(!accepts(&p, &format!("[{now},{now}]")));
            assert!(accepts(&p, now));
        }
        match plan(Some(&weather()), None, Some(&json!("yes"))) {
            Err(ApiError::BadRequest { param: Some(p), .. }) => {
                assert_eq!(p, "parallel_tool_calls")
            }
            other => panic!("{:?}", other.map(|p| p.map(|p| p.schema))),
        }
    }

    #[test]
    fn bad_tools_are_refused_by_place() {
        for (tools, choice, param) in [
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                json!(null),
                "tools[0].function.name",
            ),
            (json!([{"type": "retrieval"}]), json!(null), "tools[0].type"),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "integer", "multipleOf": 2}}}]),
                json!(null),
                "tools[0].function.parameters",
            ),
            (
                json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
                json!(null),
                "tools[1].function.name",
            ),
            (
                weather(),
                json!({"type": "function", "function": {"name": "nope"}}),
                "tool_choice",
            ),
            (weather(), json!("sometimes"), "tool_choice"),
            (json!([]), json!("required"), "tool_choice"),
        ] {
            let choice = (!choice.is_null()).then_some(&choice);
            match plan(Some(&tools), choice, None) {
                Err(ApiError::BadRequest { param: Some(p), .. }) => assert_eq!(p, param, "{tools}"),
                other => panic!("{tools}: {:?}", other.map(|p| p.map(|p| p.schema))),
            }
        }
    }

    /// Feeds `text` in pieces of `size` bytes (at character boundaries); returns all
    /// pieces and whether it was a call.
    fn stream(text: &str, size: usize) -> (Vec<Piece>, bool) {
        let mut st = AnswerStream::default();
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut n = size.min(rest.len());
            while !rest.is_char_boundary(n) {
                n += 1;
            }
            out.extend(st.push(&rest[..n]));
            rest = &rest[n..];
        }
        let (tail, called) = st.finish();
        out.extend(tail);
        (out, called)
    }

    /// The pieces merged: the calls' names and arguments, and the words.
    fn merged(pieces: &[Piece]) -> (Vec<(String, String)>, String) {
        let (mut calls, mut words) = (Vec::<(String, String)>::new(), String::new());
        for p in pieces {
            match p {
                Piece::Call { index, name } => {
                    assert_eq!(*index as usize, calls.len(), "{pieces:?}");
                    calls.push((name.clone(), String::new()));
                }
                Piece::Arguments { index, text } => {
                    assert_eq!(*index as usize + 1, calls.len(), "{pieces:?}");
                    calls[*index as usize].1.push_str(text);
                }
                Piece::Content(c) => words.push_str(c),
            }
        }
        (calls, words)
    }

    #[test]
    fn answers_stream_as_they_are_written() {
        let call = "{\"name\": \"get_weather\",\n  \"arguments\": {\"city\": \"Oslo }\\\"\", \"n\": [1, {}]}\n}";
        // Several calls, with arguments of every kind (those that are not a container end
        // at the byte after them).
        let many = " [ {\"name\": \"now\", \"arguments\": {}},{\"name\":\"f\",\"arguments\":12},\n {\"name\": \"g\", \"arguments\": \"a,]} b\"} , {\"name\": \"h\", \"arguments\": [1, [2]]}, {\"name\": \"i\", \"arguments\": true }, {\"name\": \"j\", \"arguments\":-0.5e3}]";
        let words = "{\"content\": \"Hi \\\"you\\\"\\n caf\\u00e9 \u{e9} \\ud83d\\ude00!\"}";
        for size in [1, 2, 3, 7, 100] {
            let (pieces, called) = stream(call, size);
            assert!(called);
            assert!(
                matches!(&pieces[0], Piece::Call { index: 0, name } if name == "get_weather"),
                "{pieces:?}"
            );
            let (calls, _) = merged(&pieces);
            assert_eq!(
                calls,
                [(
                    "get_weather".to_string(),
                    r#"{"city": "Oslo }\"", "n": [1, {}]}"#.to_string()
                )],
                "size {size}"
            );
            let (pieces, called) = stream(many, size);
            assert!(called);
            let expect: Vec<(String, String)> = [
                ("now", "{}"),
                ("f", "12"),
                ("g", r#""a,]} b""#),
                ("h", "[1, [2]]"),
                ("i", "true"),
                ("j", "-0.5e3"),
            ]
            .iter()
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect();
            assert_eq!(merged(&pieces).0, expect, "size {size}");
            let (pieces, called) = stream(words, size);
            assert!(!called);
            assert_eq!(
                merged(&pieces).1,
                "Hi \"you\"\n caf\u{e9} \u{e9} \u{1F600}!",
                "size {size}"
            );
        }
        // A document cut short comes as the text it is.
        let (pieces, called) = stream("{\"na", 2);
        assert_eq!((merged(&pieces).1.as_str(), called), ("{\"na", false));
    }

    #[test]
    fn answers_and_earlier_turns_read_back() {
        let call = |name: &str, arguments: &str| Call {
            name: name.into(),
            arguments: arguments.into(),
        };
        assert_eq!(
            answer(r#"{"name": "now", "arguments": {}}"#),
            Some(Answer::Calls(vec![call("now", "{}")]))
        );
        assert_eq!(
            answer(r#"[{"name": "now", "arguments": {}}, {"name": "f", "arguments": [1, "x"]}]"#),
            Some(Answer::Calls(vec![
                call("now", "{}"),
                call("f", r#"[1,"x"]"#)
            ]))
        );
        assert_eq!(
            answer(r#"{"content": "hi"}"#),
            Some(Answer::Content("hi".into()))
        );
        assert_eq!(answer(r#"{"name": "now", "argu"#), None);
        let calls = json!([{"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{\"tz\":\"UTC\"}"}}]);
        assert_eq!(
            calls_as_text(&calls, "m").expect("test input"),
            r#"{"name":"now","arguments":{"tz":"UTC"}}"#
        );
        // Several calls are written as the array the model would write.
        let two = json!([calls[0], {"function": {"name": "f", "arguments": "not json"}}]);
        assert_eq!(
            calls_as_text(&two, "m").expect("test input"),
            r#"[{"name":"now","arguments":{"tz":"UTC"}},{"name":"f","arguments":"not json"}]"#
        );
        assert!(call_id().starts_with("call_") && call_id().len() == 29);
    }
}
