//! Property tests of request validation, for every inference endpoint (chat, completions,
//! responses): whatever JSON a client sends — any shape, any value in any known field, a
//! valid body with one field replaced — validation returns a request or a 400 that names
//! a field or the body; it never panics and never fails as the server's fault.

use gateway::api::error::ApiError;
use gateway::api::{responses, validate};
use gateway::config::ServerConfig;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

type Validate = fn(&[u8], &ServerConfig) -> Result<validate::InferenceRequest, ApiError>;

const ENDPOINTS: [(&str, Validate); 3] = [
    ("chat", validate::chat),
    ("completions", validate::completion),
    ("responses", responses::validate),
];

/// Field names any endpoint reads (and a few it does not).
const KEYS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "input",
    "instructions",
    "role",
    "content",
    "type",
    "text",
    "name",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "best_of",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "include_usage",
    "logprobs",
    "top_logprobs",
    "echo",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "json_schema",
    "schema",
    "format",
    "tools",
    "tool_choice",
    "function",
    "parameters",
    "arguments",
    "call_id",
    "output",
    "tool_calls",
    "tool_call_id",
    "parallel_tool_calls",
    "include",
    "metadata",
    "user",
    "store",
    "reasoning",
    "truncation",
    "previous_response_id",
    "conversation",
    "background",
    "properties",
    "required",
    "items",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "anyOf",
    "$ref",
    "other",
];

/// Strings that mean something somewhere (roles, types, formats) and some that do not.
const WORDS: &[&str] = &[
    "",
    "m",
    "user",
    "system",
    "assistant",
    "developer",
    "tool",
    "function",
    "message",
    "text",
    "input_text",
    "output_text",
    "input_image",
    "function_call",
    "function_call_output",
    "json_object",
    "json_schema",
    "object",
    "string",
    "integer",
    "array",
    "auto",
    "none",
    "required",
    "date",
    "^[a-z]+$",
    "(",
    "\u{1F600}",
    "a\u{0}b",
    "#/$defs/x",
    "message.output_text.logprobs",
    "disabled",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        prop::sample::select(vec![0.0, -0.0, 1e300, -1e300, 0.5, 2.0, 65536.0])
            .prop_map(Value::from),
        prop::sample::select(WORDS).prop_map(Value::from),
        "[a-z0-9 ]{0,12}".prop_map(Value::from),
    ]
}

/// Any JSON value, up to a few levels deep, its objects' keys mostly known ones.
fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            }),
        ]
    })
}

/// A valid body of each endpoint.
fn valid() -> [Value; 3] {
    [
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
        json!({"model": "m", "prompt": "hi", "max_tokens": 4}),
        json!({"model": "m", "input": "hi", "max_output_tokens": 4}),
    ]
}

/// Validation's answer is a request or a 400 (never a panic, never a server error).
fn check(endpoint: &str, validate: Validate, body: &[u8]) -> Result<(), TestCaseError> {
    let server = ServerConfig::default();
    match validate(body, &server) {
        Ok(_) => Ok(()),
        Err(e @ ApiError::BadRequest { .. }) => {
            prop_assert!(!e.to_string().is_empty());
            Ok(())
        }
        Err(e) => Err(TestCaseError::fail(format!(
            "{endpoint}: {e:?} for {}",
            String::from_utf8_lossy(body)
        ))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Any JSON at all.
    #[test]
    fn any_json_is_a_request_or_a_400(v in value()) {
        let body = v.to_string();
        for (name, validate) in ENDPOINTS {
            check(name, validate, body.as_bytes())?;
        }
    }

    /// A valid body with one field set to anything (or removed: `null`).
    #[test]
    fn a_valid_body_with_one_field_changed_is_a_request_or_a_400(
        key in prop::sample::select(KEYS),
        v in value(),
    ) {
        for ((name, validate), body) in ENDPOINTS.into_iter().zip(valid()) {
            let mut body: Map<String, Value> = body.as_object().cloned().unwrap_or_default();
            body.insert(key.to_string(), v.clone());
            check(name, validate, Value::Object(body).to_string().as_bytes())?;
        }
    }

    /// Bytes that are not JSON, or are cut short.
    #[test]
    fn broken_bodies_are_400s(cut in 0usize..80, junk in prop::collection::vec(any::<u8>(), 0..16)) {
        for ((name, validate), body) in ENDPOINTS.into_iter().zip(valid()) {
            let mut bytes = body.to_string().into_bytes();
            bytes.truncate(cut.min(bytes.len()));
            bytes.extend_from_slice(&junk);
            check(name, validate, &bytes)?;
        }
    }
}
