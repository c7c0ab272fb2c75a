//! `POST /v1/embeddings`: read ([`validate`]) into the pipeline's request — one prompt per
//! input, each its own worker request ([`crate::worker::WorkerRequest::embed`]), held to
//! the tenant's contract by its input tokens alone (nothing is generated) — and answered
//! ([`body`]) as OpenAI answers: `{object: "list", data: [{object: "embedding", index,
//! embedding}], model, usage: {prompt_tokens, total_tokens}}`, each vector as floats or, with
//! `encoding_format: "base64"` (what the OpenAI SDKs ask for), as the base64 of its
//! little-endian `f32`s.
//!
//! Taken: `model`, `input` (a string, token ids, or a list of either: at most
//! [`MAX_EMBEDDING_INPUTS`] inputs, none empty), `encoding_format`, `dimensions` (a
//! positive integer: passed to an upstream pool's workers; a pool whose workers make the
//! model's own vectors refuses it, 400 naming it), vLLM's `truncate_prompt_tokens` (each
//! input's last k tokens, −1: the context's worth); `user` and other fields are ignored.

use super::error::ApiError;
use super::validate::{Endpoint, InferenceRequest, MAX_EMBEDDING_INPUTS};
use crate::config::ServerConfig;
use crate::worker::{Prompt, SamplingParams, Usage};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: Value,
    encoding_format: Option<String>,
    dimensions: Option<Value>,
    truncate_prompt_tokens: Option<i64>,
}

/// The largest `dimensions` taken (an upstream checks its own model's).
const MAX_DIMENSIONS: u64 = 65_536;

/// Validates a `/v1/embeddings` body.
pub fn validate(body: &[u8], _server: &ServerConfig) -> Result<InferenceRequest, ApiError> {
    let req: EmbeddingsRequest = super::validate::typed(body)?;
    if req.model.is_empty() {
        return Err(ApiError::bad(
            "`model` must not be empty.",
            Some("model".into()),
        ));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad(
                format!("`encoding_format` must be \"float\" or \"base64\", got {other:?}."),
                Some("encoding_format".into()),
            ))
        }
    };
    let dimensions = match req.dimensions {
        None | Some(Value::Null) => None,
        Some(d) => match d.as_u64() {
            Some(n @ 1..=MAX_DIMENSIONS) => Some(n as u32),
            _ => {
                return Err(ApiError::bad(
                    format!("`dimensions` must be an integer from 1 to {MAX_DIMENSIONS}, got {d}."),
                    Some("dimensions".into()),
                ))
            }
        },
    };
    let mut params = SamplingParams::greedy(0);
    params.truncate_prompt_tokens =
        super::validate::truncate_prompt_tokens(req.truncate_prompt_tokens)?;
    Ok(InferenceRequest {
        endpoint: Endpoint::Embeddings { base64, dimensions },
        model: req.model,
        prompts: inputs(req.input)?,
        params,
        stream: false,
        include_usage: true,
        echo: false,
        n: 1,
        best_of: 1,
        tool_calls: false,
        responses: None,
    })
}

/// `input`: a string, token ids, or a non-empty list of either; none empty.
fn inputs(v: Value) -> Result<Vec<Prompt>, ApiError> {
    let bad = |m: String, at: String| ApiError::bad(m, Some(at));
    let one = |v: Value, at: String| -> Result<Prompt, ApiError> {
        match v {
            Value::String(s) if s.is_empty() => Err(bad(format!("`{at}` is empty."), at)),
            Value::String(s) => Ok(Prompt::Text(s)),
            Value::Array(ids) if ids.is_empty() => Err(bad(format!("`{at}` is empty."), at)),
            Value::Array(ids) => ids
                .iter()
                .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                .collect::<Option<Vec<u32>>>()
                .map(Prompt::Tokens)
                .ok_or_else(|| {
                    bad(
                        format!("`{at}`: token ids are integers from 0."),
                        at.clone(),
                    )
                }),
            _ => Err(bad(
                format!("`{at}` must be a string or an array of token ids."),
                at,
            )),
        }
    };
    let prompts = match v {
        Value::Array(list) if list.iter().all(|p| p.is_string() || p.is_array()) => {
            if list.is_empty() {
                return Err(bad("`input` is empty.".into(), "input".into()));
            }
            list.into_iter()
                .enumerate()
                .map(|(i, p)| one(p, format!("input[{i}]")))
                .collect::<Result<Vec<_>, _>>()?
        }
        v => vec![one(v, "input".into())?],
    };
    if prompts.len() > MAX_EMBEDDING_INPUTS {
        return Err(bad(
            format!(
                "`input` holds {} inputs; this gateway takes at most {MAX_EMBEDDING_INPUTS} per request.",
                prompts.len()
            ),
            "input".into(),
        ));
    }
    Ok(prompts)
}

/// The answer: each input's vector (in input order), and the tokens they took. Written
/// out by hand (an answer may hold millions of numbers): base64 goes straight into the
/// body, and numbers each in their shortest `f32` form.
pub fn body(model: &str, vectors: &[&[f32]], usage: Usage, base64: bool) -> Vec<u8> {
    use std::io::Write as _;
    let floats: usize = vectors.iter().map(|v| v.len()).sum();
    let per_float = if base64 { 6 } else { 12 };
    let mut out = Vec::with_capacity(128 + 64 * vectors.len() + per_float * floats);
    let mut bytes = Vec::new();
    out.extend_from_slice(br#"{"object":"list","data":["#);
    for (index, v) in vectors.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        // Writes to a Vec do not fail.
        let _ = write!(
            out,
            r#"{{"object":"embedding","index":{index},"embedding":"#
        );
        if base64 {
            bytes.clear();
            bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            out.push(b'"');
            let at = out.len();
            out.resize(at + base64::encoded_len(bytes.len(), true).unwrap_or(0), 0);
            let n = base64::engine::general_purpose::STANDARD
                .encode_slice(&bytes, &mut out[at..])
                .unwrap_or(0);
            out.truncate(at + n);
            out.push(b'"');
        } else {
            let _ = serde_json::to_writer(&mut out, v);
        }
        out.push(b'}');
    }
    out.extend_from_slice(br#"],"model":"#);
    let _ = serde_json::to_writer(&mut out, model);
    let p = usage.prompt_tokens;
    let _ = write!(
        out,
        r#","usage":{{"prompt_tokens":{p},"total_tokens":{p}}}}}"#
    );
    out
}

/// A vector scaled to unit length (all zeros stays so).
pub fn normalized(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> InferenceRequest {
        validate(body.as_bytes(), &ServerConfig::default()).expect("valid")
    }

    fn param(body: &str) -> Option<String> {
        let e = validate(body.as_bytes(), &ServerConfig::default()).expect_err("refused");
        assert_eq!(e.status(), 400, "{body}");
        e.param().map(str::to_string)
    }

    #[test]
    fn inputs_are_strings_or_token_ids_one_prompt_each() {
        let r = ok(r#"{"model":"m","input":"hi"}"#);
        assert!(matches!(&r.prompts[..], [Prompt::Text(t)] if t == "hi"));
        assert_eq!(
            r.endpoint,
            Endpoint::Embeddings {
                base64: false,
                dimensions: None
            }
        );
        assert_eq!(r.params.max_tokens, 0, "nothing is generated");
        let r = ok(
            r#"{"model":"m","input":["a",[1,2],"b"],"encoding_format":"base64","dimensions":256}"#,
        );
        assert!(matches!(&r.prompts[..],
            [Prompt::Text(a), Prompt::Tokens(ids), Prompt::Text(b)]
            if a == "a" && ids == &[1, 2] && b == "b"));
        assert_eq!(
            r.endpoint,
            Endpoint::Embeddings {
                base64: true,
                dimensions: Some(256)
            }
        );
        let r = ok(r#"{"model":"m","input":[5,6]}"#);
        assert!(matches!(&r.prompts[..], [Prompt::Tokens(ids)] if ids == &[5, 6]));
    }

    #[test]
    fn bad_inputs_and_options_are_named() {
        for (body, at) in [
            (r#"{"model":"m","input":""}"#, "input"),
            (r#"{"model":"m","input":[]}"#, "input"),
            (r#"{"model":"m","input":["a",""]}"#, "input[1]"),
            (r#"{"model":"m","input":[[1],[]]}"#, "input[1]"),
            (r#"{"model":"m","input":[-1]}"#, "input"),
            (r#"{"model":"m","input":7}"#, "input"),
            (
                r#"{"model":"m","input":"x","encoding_format":"hex"}"#,
                "encoding_format",
            ),
            (r#"{"model":"m","input":"x","dimensions":0}"#, "dimensions"),
            (r#"{"model":"m","input":"x","dimensions":-3}"#, "dimensions"),
            (
                r#"{"model":"m","input":"x","dimensions":1.5}"#,
                "dimensions",
            ),
            (
                r#"{"model":"m","input":"x","dimensions":"8"}"#,
                "dimensions",
            ),
            (
                r#"{"model":"m","input":"x","dimensions":65537}"#,
                "dimensions",
            ),
            (r#"{"model":"","input":"x"}"#, "model"),
        ] {
            assert_eq!(param(body).as_deref(), Some(at), "{body}");
        }
        let many = serde_json::json!({"model": "m", "input": vec!["x"; MAX_EMBEDDING_INPUTS + 1]});
        assert_eq!(param(&many.to_string()).as_deref(), Some("input"));
    }

    #[test]
    fn vectors_go_out_as_floats_or_their_bytes_in_base64() {
        let usage = Usage {
            prompt_tokens: 7,
            ..Usage::default()
        };
        let v = [1.0f32, -0.5];
        let floats: Value =
            serde_json::from_slice(&body("m", &[&v, &v], usage, false)).expect("JSON");
        assert_eq!(floats["object"], "list");
        assert_eq!(floats["data"][1]["index"], 1);
        assert_eq!(
            floats["data"][0]["embedding"],
            serde_json::json!([1.0, -0.5])
        );
        assert_eq!(
            floats["usage"],
            serde_json::json!({"prompt_tokens": 7, "total_tokens": 7})
        );
        // The whole shape, a model's name escaped.
        let named: Value =
            serde_json::from_slice(&body("m\"1", &[&v, &[]], usage, false)).expect("JSON");
        assert_eq!(
            named,
            serde_json::json!({"object": "list", "data": [
                {"object": "embedding", "index": 0, "embedding": [1.0, -0.5]},
                {"object": "embedding", "index": 1, "embedding": []}],
                "model": "m\"1", "usage": {"prompt_tokens": 7, "total_tokens": 7}})
        );
        let none: Value = serde_json::from_slice(&body("m", &[], usage, true)).expect("JSON");
        assert_eq!(none["data"], serde_json::json!([]));
        let two: Value = serde_json::from_slice(&body("m", &[&v, &v], usage, true)).expect("JSON");
        assert_eq!(two["data"][0]["embedding"], two["data"][1]["embedding"]);
        assert_eq!(two["data"][1]["index"], 1);
        let b64: Value = serde_json::from_slice(&body("m", &[&v], usage, true)).expect("JSON");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64["data"][0]["embedding"].as_str().expect("a string"))
            .expect("base64");
        let back: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(back, v);
        let unit = normalized(vec![3.0, 4.0]);
        assert_eq!(unit, vec![0.6, 0.8]);
        assert_eq!(normalized(vec![0.0; 3]), vec![0.0; 3]);
    }
}
