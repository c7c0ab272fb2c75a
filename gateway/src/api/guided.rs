//! vLLM's structured outputs, as its clients send them: the `guided_json`,
//! `guided_regex`, `guided_choice` and `guided_grammar` fields, and their newer form, the
//! `structured_outputs` object (`json`, `regex`, `choice`, `grammar`, `json_object`).
//! Each becomes the output format the engine follows ([`OutputFormat`]), checked here so
//! that an expression, grammar or schema the engine cannot follow is a 400 before
//! anything is admitted. What vLLM takes and tollgate cannot follow (a `structural_tag`,
//! a whitespace pattern) is refused by name, never ignored.

use super::error::ApiError;
use super::types::GuidedParams;
use crate::worker::OutputFormat;
use serde_json::Value;

/// What a field asks for.
#[derive(Clone, Copy)]
enum Kind {
    Json,
    JsonObject,
    Regex,
    Choice,
    Grammar,
}

/// The longest grammar text `guided_grammar` takes, in bytes.
pub const MAX_GRAMMAR_BYTES: usize = 64 << 10;

/// Most choices a `guided_choice` may list.
pub const MAX_CHOICES: usize = 1024;

/// The output format a request's vLLM fields ask for, with the field that asks (for the
/// 400s of what it cannot be combined with); `None` where none does.
pub fn format(g: GuidedParams) -> Result<Option<(OutputFormat, String)>, ApiError> {
    let refused = |param: &str, what: &str| Err(ApiError::unsupported(param, what));
    let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
    if set(&g.guided_whitespace_pattern) {
        return refused(
            "guided_whitespace_pattern",
            "a whitespace pattern (JSON is generated with at most one space, or a newline and indentation, between tokens)",
        );
    }
    // The implementation vLLM should use: tollgate has one.
    if let Some(b) = g.guided_decoding_backend.as_ref().filter(|b| !b.is_null()) {
        if !b.is_string() {
            return Err(ApiError::bad(
                "`guided_decoding_backend` must be a string.",
                Some("guided_decoding_backend".into()),
            ));
        }
    }
    let mut asked: Vec<(String, Kind, Value)> = [
        ("guided_json", Kind::Json, g.guided_json),
        ("guided_regex", Kind::Regex, g.guided_regex),
        ("guided_choice", Kind::Choice, g.guided_choice),
        ("guided_grammar", Kind::Grammar, g.guided_grammar),
    ]
    .into_iter()
    .filter_map(|(k, kind, v)| v.filter(|v| !v.is_null()).map(|v| (k.to_string(), kind, v)))
    .collect();
    match g.structured_outputs {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            for (k, v) in o {
                let param = format!("structured_outputs.{k}");
                match k.as_str() {
                    _ if v.is_null() => {}
                    "json" => asked.push((param, Kind::Json, v)),
                    "regex" => asked.push((param, Kind::Regex, v)),
                    "choice" => asked.push((param, Kind::Choice, v)),
                    "json_object" => match v {
                        Value::Bool(true) => asked.push((param, Kind::JsonObject, v)),
                        Value::Bool(false) => {}
                        _ => {
                            return Err(ApiError::bad(
                                format!("`{param}` must be a boolean."),
                                Some(param),
                            ))
                        }
                    },
                    "grammar" => asked.push((param, Kind::Grammar, v)),
                    "structural_tag" => return refused(&param, "a structural tag"),
                    "whitespace_pattern" => return refused(&param, "a whitespace pattern"),
                    // Options of vLLM's implementations: where set, tollgate's JSON is
                    // not what they ask for.
                    "disable_any_whitespace" | "disable_additional_properties" => match v {
                        Value::Bool(false) => {}
                        _ => return refused(&param, "this option"),
                    },
                    "disable_fallback" | "backend" => {}
                    _ => return Err(ApiError::unknown(&param)),
                }
            }
        }
        Some(_) => {
            return Err(ApiError::bad(
                "`structured_outputs` must be an object.",
                Some("structured_outputs".into()),
            ))
        }
    }
    if asked.len() > 1 {
        return Err(ApiError::bad(
            format!(
                "Only one kind of structured output at a time: `{}` and `{}` are both set.",
                asked[0].0, asked[1].0
            ),
            Some(asked[1].0.clone()),
        ));
    }
    let Some((param, kind, v)) = asked.pop() else {
        return Ok(None);
    };
    let bad = |m: String| ApiError::bad(m, Some(param.clone()));
    let format = match kind {
        Kind::JsonObject => OutputFormat::Object,
        Kind::Json => {
            // A schema, or its JSON text.
            let schema = match v {
                Value::String(s) => serde_json::from_str(&s)
                    .map_err(|e| bad(format!("`{param}` is not a JSON schema: {e}.")))?,
                v @ (Value::Object(_) | Value::Bool(_)) => v,
                _ => return Err(bad(format!("`{param}` must be a JSON schema (an object)."))),
            };
            OutputFormat::schema(serde_json::json!({"name": "guided_json", "schema": schema}))
                .map_err(|e| {
                    let mut err = ApiError::from(e);
                    if let ApiError::BadRequest {
                        message, param: p, ..
                    } = &mut err
                    {
                        *message = message.replace("response_format.json_schema.schema", &param);
                        *p = Some(param.clone());
                    }
                    err
                })?
        }
        Kind::Regex => {
            let Value::String(re) = v else {
                return Err(bad(format!(
                    "`{param}` must be a string (a regular expression)."
                )));
            };
            OutputFormat::regex(&re).map_err(|e| {
                bad(format!(
                    "`{param}` is not a regular expression tollgate can follow: {e}"
                ))
            })?
        }
        Kind::Grammar => match v {
            Value::String(g) if g.len() <= MAX_GRAMMAR_BYTES => OutputFormat::ebnf(&g)
                .map_err(|e| {
                    bad(format!(
                        "`{param}` is not a grammar tollgate can follow (EBNF, as `root ::= …`): {e}."
                    ))
                })?,
            _ => {
                return Err(bad(format!(
                    "`{param}` must be a string of at most {MAX_GRAMMAR_BYTES} bytes (an EBNF grammar)."
                )))
            }
        },
        Kind::Choice => {
            let choices: Option<Vec<String>> = match v {
                Value::Array(a) => a
                    .into_iter()
                    .map(|c| c.as_str().map(String::from))
                    .collect(),
                _ => None,
            };
            match choices {
                Some(c) if !c.is_empty() && c.len() <= MAX_CHOICES => OutputFormat::choice(c)
                    .map_err(|e| bad(format!("`{param}` cannot be followed: {e}")))?,
                _ => {
                    return Err(bad(format!(
                        "`{param}` must be a list of 1 to {MAX_CHOICES} strings."
                    )))
                }
            }
        }
    };
    Ok(Some((format, param)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Option<(OutputFormat, String)>, ApiError> {
        format(serde_json::from_str(body).expect("test body"))
    }

    #[test]
    fn each_form_names_its_field() {
        let cases = [
            (r#"{"guided_regex":"a+"}"#, "guided_regex"),
            (
                r#"{"guided_choice":["x","y"],"guided_decoding_backend":"xgrammar"}"#,
                "guided_choice",
            ),
            (r#"{"guided_json":{"type":"object"}}"#, "guided_json"),
            (r#"{"guided_grammar":"root ::= \"a\"+"}"#, "guided_grammar"),
            (
                r#"{"structured_outputs":{"grammar":"root ::= \"a\"+"}}"#,
                "structured_outputs.grammar",
            ),
            (
                r#"{"structured_outputs":{"regex":"a+","disable_fallback":true}}"#,
                "structured_outputs.regex",
            ),
            (
                r#"{"structured_outputs":{"json_object":true,"disable_any_whitespace":false}}"#,
                "structured_outputs.json_object",
            ),
            (
                r#"{"guided_regex":null,"structured_outputs":{"choice":["x"],"json":null}}"#,
                "structured_outputs.choice",
            ),
        ];
        for (body, field) in cases {
            let (format, param) = parse(body).expect(body).expect(body);
            assert_eq!(param, field, "{body}");
            match (field, format) {
                (f, OutputFormat::Regex { regex, .. }) if f.ends_with("regex") => {
                    assert_eq!(&*regex, "a+")
                }
                (f, OutputFormat::Choice { .. }) if f.ends_with("choice") => {}
                (f, OutputFormat::Grammar { grammar, .. }) if f.ends_with("grammar") => {
                    assert_eq!(&*grammar, r#"root ::= "a"+"#)
                }
                (f, OutputFormat::Schema { spec, .. }) if f.ends_with("json") => {
                    assert_eq!(spec["schema"]["type"], "object")
                }
                (f, OutputFormat::Object) if f.ends_with("json_object") => {}
                (f, other) => panic!("{f}: {other:?}"),
            }
        }
        for none in [
            r#"{}"#,
            r#"{"structured_outputs":{"json_object":false}}"#,
            r#"{"guided_json":null}"#,
        ] {
            assert!(parse(none).expect(none).is_none(), "{none}");
        }
    }

    #[test]
    fn a_grammar_that_cannot_be_followed_is_a_400_with_its_reason() {
        for (body, field, why) in [
            (
                r#"{"guided_grammar":"start: \"a\""}"#,
                "guided_grammar",
                "expected `::=`",
            ),
            (
                r#"{"structured_outputs":{"grammar":"root ::= root \"a\""}}"#,
                "structured_outputs.grammar",
                "left recursion",
            ),
            (
                r#"{"guided_grammar":{"root":"a"}}"#,
                "guided_grammar",
                "must be a string",
            ),
        ] {
            match parse(body).expect_err(body) {
                ApiError::BadRequest { message, param, .. } => {
                    assert_eq!(param.as_deref(), Some(field), "{body}");
                    assert!(message.contains(why), "{body}: {message}");
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        let long = format!("root ::= \"{}\"", "a".repeat(MAX_GRAMMAR_BYTES));
        let body = serde_json::json!({ "guided_grammar": long }).to_string();
        assert!(parse(&body).is_err());
    }

    #[test]
    fn a_schema_error_names_the_guided_field() {
        let e = parse(r#"{"structured_outputs":{"json":{"type":"object","not":{}}}}"#)
            .expect_err("unsupported keyword");
        match e {
            ApiError::BadRequest { message, param, .. } => {
                assert_eq!(param.as_deref(), Some("structured_outputs.json"));
                assert!(
                    message.starts_with("`structured_outputs.json`") && message.contains("not"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
