//! Tool calling (`tools`, `tool_choice`) on any worker that honours structured output.
//!
//! The model is told the functions (a system message) and its answer is constrained to one
//! JSON document (structured output, [`crate::worker::JsonFormat`]):
//! `{"name": <a tool's name>, "arguments": <that tool's parameters schema>}` for a call,
//! or, with `tool_choice: "auto"`, also `{"content": "<text>"}` for an answer in words.
//! So a call's arguments always validate against the tool's schema, whatever the model,
//! and no model-specific tool-call format needs parsing. The renderer turns the document
//! back into the OpenAI shape (`message.tool_calls` and `finish_reason: "tool_calls"`, or
//! `message.content`).
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

fn bad(message: String, param: &str) -> ApiError {
    ApiError::bad(message, Some(param.to_string()))
}

/// Validates `tools` and `tool_choice`; `None` when no tool may be called (no tools, or
/// `tool_choice: "none"`).
pub fn plan(tools: Option<&Value>, choice: Option<&Value>) -> Result<Option<ToolPlan>, ApiError> {
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
    let (callable, auto): (Vec<&(&str, &Value)>, bool) = match choice {
        None | Some(Value::Null) => (declared.iter().collect(), true),
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => (declared.iter().collect(), true),
            "required" => (declared.iter().collect(), false),
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
            (named, false)
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
    instructions.push_str(if auto {
        "Answer with one JSON object: {\"name\": <function name>, \"arguments\": <its arguments>} to call a function, or {\"content\": <your answer>} to answer without one."
    } else {
        "Answer with one JSON object that calls a function: {\"name\": <function name>, \"arguments\": <its arguments>}."
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
    let mut text = String::new();
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
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&json!({"name": name, "arguments": arguments}).to_string());
    }
    Ok(text)
}

/// A `tool` message's result, as the text the model reads.
pub fn result_as_text(content: &str, call_id: Option<&str>) -> String {
    match call_id {
        Some(id) => format!("Result of function call {id}: {content}"),
        None => format!("Function result: {content}"),
    }
}

/// What a tool-calling answer turned out to be.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// A call: the function's name and its arguments as a JSON string.
    Call { name: String, arguments: String },
    /// An answer in words (`tool_choice: "auto"`).
    Content(String),
}

/// Reads a complete answer document; `None` if it is not one (cut short by `max_tokens`).
pub fn answer(text: &str) -> Option<Answer> {
    let v: Value = serde_json::from_str(text).ok()?;
    if let Some(c) = v.get("content").and_then(Value::as_str) {
        return Some(Answer::Content(c.to_string()));
    }
    Some(Answer::Call {
        name: v.get("name")?.as_str()?.to_string(),
        arguments: v.get("arguments")?.to_string(),
    })
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
        let auto = plan(Some(&weather()), None)
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
        let required = plan(Some(&weather()), Some(&json!("required")))
            .expect("test input")
            .expect("test input");
        assert!(!accepts(&required, r#"{"content":"no"}"#));
        let named = plan(
            Some(&weather()),
            Some(&json!({"type": "function", "function": {"name": "now"}})),
        )
        .expect("test input")
        .expect("test input");
        assert!(accepts(&named, r#"{"name":"now","arguments":{}}"#));
        assert!(!accepts(
            &named,
            r#"{"name":"get_weather","arguments":{"city":"Oslo","unit":"c"}}"#
        ));
        assert!(plan(Some(&weather()), Some(&json!("none")))
            .expect("test input")
            .is_none());
        assert!(plan(None, None).expect("test input").is_none());
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
            match plan(Some(&tools), choice) {
                Err(ApiError::BadRequest { param: Some(p), .. }) => assert_eq!(p, param, "{tools}"),
                other => panic!("{tools}: {:?}", other.map(|p| p.map(|p| p.schema))),
            }
        }
    }

    #[test]
    fn answers_and_earlier_turns_read_back() {
        assert_eq!(
            answer(r#"{"name": "now", "arguments": {}}"#),
            Some(Answer::Call {
                name: "now".into(),
                arguments: "{}".into()
            })
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
        assert!(call_id().starts_with("call_") && call_id().len() == 29);
    }
}
