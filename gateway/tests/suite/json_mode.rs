//! JSON mode (`response_format: {"type": "json_object"}`) and structured output
//! (`{"type": "json_schema"}`): the engine's output is one JSON object (one document of
//! the schema), on the CPU backend and on the GPU path (the CUDA emulator: such rows go
//! to the `sample` kernel with the mask's bits, and only their tokens come back), greedy
//! and sampled;
//! complete when the engine stops, a valid beginning of one when it runs out of tokens.
//! Through the API, and through a gateway in front of a remote `gateway worker`.

use crate::common;
use common::*;
use gateway::engine::EngineWorker;
use gateway::worker::{FinishReason, OutputFormat, Worker};
use kernels::json_mode::JsonState;
use kernels::json_schema::Schema;
use serde_json::Value;
use std::sync::Arc;

async fn run(
    w: &EngineWorker,
    json: OutputFormat,
    temperature: f32,
    seed: u64,
    max_tokens: u32,
    bias: Vec<(u32, f32)>,
) -> (String, FinishReason) {
    let mut r = (*worker_req("a json object:", max_tokens)).clone();
    r.params.format = Some(json);
    r.params.temperature = temperature;
    r.params.seed = Some(seed);
    r.params.logit_bias = bias;
    text_and_finish(w.submit(Arc::new(r)).await.unwrap()).await
}

/// Five draws (greedy and sampled) of `format` on `w`: each must be a valid beginning of a
/// document (`state` follows it), complete exactly when the engine stopped, and then
/// `valid`. Returns how many completed.
async fn draws(
    w: &EngineWorker,
    kind: gateway::config::BackendKind,
    format: impl Fn() -> OutputFormat,
    state: impl Fn() -> JsonState,
    max_tokens: u32,
    valid: impl Fn(&Value) -> bool,
) -> usize {
    let mut complete = 0;
    for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2), (1.3, 3), (0.7, 4)] {
        let (text, finish) = run(w, format(), temperature, seed, max_tokens, vec![]).await;
        let mut st = state();
        assert!(
            st.advance(text.as_bytes()),
            "{kind:?}, temperature {temperature}: not the format's: {text:?}"
        );
        match finish {
            FinishReason::Stop => {
                complete += 1;
                assert!(st.done(), "{kind:?}: stopped inside the document: {text:?}");
                let v: Value = serde_json::from_str(&text).unwrap();
                assert!(valid(&v), "{kind:?}: {text}");
            }
            _ => assert!(!st.done(), "{kind:?}: complete but not stopped: {text:?}"),
        }
    }
    complete
}

#[tokio::test(flavor = "multi_thread")]
async fn the_engine_writes_json_objects_on_the_cpu_and_on_the_gpu_path() {
    let (_dir, loaded) = synthetic_model();
    let tok = loaded.tokenizer.clone();
    // The token `}` alone: a bias on it makes the shortest object, `{}`.
    let close = (0..tok.vocab_size() as u32)
        .find(|&i| tok.token_bytes(i) == b"}")
        .expect("a `}` token");
    for kind in engine_backends() {
        let w = engine_on(&loaded, kind);
        let stopped = draws(
            &w,
            kind,
            || OutputFormat::Object,
            JsonState::new,
            48,
            Value::is_object,
        )
        .await;
        eprintln!("{kind:?}: {stopped} of 5 objects complete within 48 tokens");
        // Pushed to close at once, it closes, then stops: `{}` and nothing after.
        let (text, finish) = run(&w, OutputFormat::Object, 0.0, 0, 16, vec![(close, 30.0)]).await;
        assert_eq!(text.trim(), "{}", "{kind:?}");
        assert_eq!(finish, FinishReason::Stop, "{kind:?}: {text:?}");
        // On the GPU path every row was masked on the device; none was read back.
        let c = w.engine_counters().unwrap();
        if kind == gateway::config::BackendKind::Cpu {
            assert_eq!((c.rows_adjusted_on_device, c.rows_read_back), (0, 0));
        } else {
            assert!(c.rows_adjusted_on_device > 10, "{kind:?}: {c:?}");
            assert_eq!(c.rows_read_back, 0, "{kind:?}");
        }
    }
}

fn schema_format(schema: Value) -> OutputFormat {
    OutputFormat::schema(serde_json::json!({"name": "t", "schema": schema})).unwrap()
}

/// A schema with fixed keys, an enum, an integer, a boolean and an optional array of
/// strings; checked here by hand, apart from the recognizer.
fn pet() -> Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "kind": {"enum": ["cat", "dog"]},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
            "ok": {"type": "boolean"}
        },
        "required": ["kind", "age", "ok"],
        "additionalProperties": false
    })
}

fn is_pet(v: &Value) -> bool {
    let Some(o) = v.as_object() else { return false };
    let keys: Vec<&str> = o.keys().map(|k| k.as_str()).collect();
    (keys == ["kind", "age", "ok"] || keys == ["kind", "age", "tags", "ok"])
        && (o["kind"] == "cat" || o["kind"] == "dog")
        && (o["age"].is_i64()
            || o["age"].is_u64()
            || o["age"].as_f64().is_some_and(|f| f.fract() == 0.0))
        && o.get("tags").is_none_or(|t| {
            t.as_array()
                .is_some_and(|t| t.len() <= 2 && t.iter().all(Value::is_string))
        })
        && o["ok"].is_boolean()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_engine_writes_documents_of_a_schema_on_the_cpu_and_on_the_gpu_path() {
    let (_dir, loaded) = synthetic_model();
    let kind_only = serde_json::json!({
        "type": "object",
        "properties": {"kind": {"enum": ["cat", "dog"]}},
        "required": ["kind"],
        "additionalProperties": false
    });
    for kind in engine_backends() {
        let w = engine_on(&loaded, kind);
        let complete = draws(
            &w,
            kind,
            || schema_format(pet()),
            || JsonState::with_schema(Arc::new(Schema::compile(&pet()).unwrap())),
            96,
            is_pet,
        )
        .await;
        eprintln!("{kind:?}: {complete} of 5 documents complete within 96 tokens");
        // Strings held to a format and a pattern, a bounded number: short, so every draw
        // completes.
        let held = serde_json::json!({
            "type": "object",
            "properties": {
                "born": {"type": "string", "format": "date"},
                "tag": {"type": "string", "pattern": "^[a-z]{2}-[0-9]{2}$"},
                "score": {"type": "number", "minimum": -1, "exclusiveMaximum": 1}
            },
            "required": ["born", "tag", "score"],
            "additionalProperties": false
        });
        for seed in 0..3 {
            let (text, finish) = run(&w, schema_format(held.clone()), 1.0, seed, 100, vec![]).await;
            assert_eq!(finish, FinishReason::Stop, "{kind:?}: {text:?}");
            let v: Value = serde_json::from_str(&text).unwrap();
            let born = v["born"].as_str().unwrap().as_bytes();
            let tag = v["tag"].as_str().unwrap().as_bytes();
            let score = v["score"].as_f64().unwrap();
            assert!((-1.0..1.0).contains(&score), "{text}");
            let digits = |b: &[u8]| b.iter().all(u8::is_ascii_digit);
            assert!(
                born.len() == 10 && born[4] == b'-' && born[7] == b'-' && digits(&born[..4]),
                "{text}"
            );
            assert!(
                tag.len() == 5
                    && tag[..2].iter().all(u8::is_ascii_lowercase)
                    && tag[2] == b'-'
                    && digits(&tag[3..]),
                "{text}"
            );
        }
        // Only two documents exist (whitespace aside): every draw ends in one of them.
        for seed in 0..3 {
            let (text, finish) =
                run(&w, schema_format(kind_only.clone()), 1.0, seed, 100, vec![]).await;
            assert_eq!(finish, FinishReason::Stop, "{kind:?}: {text:?}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(
                v == serde_json::json!({"kind": "cat"}) || v == serde_json::json!({"kind": "dog"}),
                "{text}"
            );
        }
    }
}

/// Through the gateway: `json_object` and `json_schema` are honoured (by the engine, and
/// by a remote worker the gateway passes the schema to), schemas the engine cannot follow
/// are refused by name, and simulated workers refuse JSON output.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_takes_json_object_and_json_schema_and_refuses_what_it_cannot_honour() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ""));
    let body = r#"{"model":"m","messages":[{"role":"user","content":"json"}],"max_tokens":40,"temperature":0,"response_format":{"type":"json_object"}}"#;
    let v: Value = post_json(&gw, "/v1/chat/completions", body).await;
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    let mut st = JsonState::new();
    assert!(st.advance(text.as_bytes()), "{v}");
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(serde_json::from_str::<Value>(text).unwrap().is_object());
    }
    let with_schema = |schema: &Value, max_tokens: u32| {
        body.replace(r#""max_tokens":40"#, &format!(r#""max_tokens":{max_tokens}"#))
            .replace(
                r#"{"type":"json_object"}"#,
                &serde_json::json!({"type": "json_schema", "json_schema": {"name": "pet", "strict": true, "schema": schema}}).to_string(),
            )
    };
    let worker = remote_worker(&model);
    let front = Gateway::start(&config(&remote_upstream(&worker), "", ""));
    for g in [&gw, &front] {
        let v: Value = post_json(g, "/v1/chat/completions", &with_schema(&pet(), 120)).await;
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        let mut st = JsonState::with_schema(Arc::new(Schema::compile(&pet()).unwrap()));
        assert!(st.advance(text.as_bytes()), "{v}");
        if v["choices"][0]["finish_reason"] == "stop" {
            assert!(is_pet(&serde_json::from_str(text).unwrap()), "{text}");
        }
    }
    for (schema, word) in [
        (
            serde_json::json!({"type": "string", "format": "hostname"}),
            "hostname",
        ),
        (
            serde_json::json!({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 2}}}),
            "multipleOf",
        ),
    ] {
        let r = post(&gw, "/v1/chat/completions", &with_schema(&schema, 8)).await;
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["error"]["param"], "response_format.json_schema.schema",
            "{v}"
        );
        assert_eq!(v["error"]["code"], "unsupported_parameter", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(word),
            "{v}"
        );
    }
    let bad = body.replace(r#"{"type":"json_object"}"#, r#"{"type":"xml"}"#);
    let r = post(&gw, "/v1/chat/completions", &bad).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "response_format", "{v}");
    let sim = Gateway::start(&config(FAST_SIM, "", ""));
    for b in [body.to_string(), with_schema(&pet(), 8)] {
        let r = post(&sim, "/v1/chat/completions", &b).await;
        assert_eq!(r.status(), 400);
    }
}
