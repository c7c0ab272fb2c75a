//! vLLM's structured outputs in the engine: `guided_regex` (the answer is a text the
//! expression matches whole), `guided_choice` (exactly one of a list) and
//! `guided_grammar` (a text of a context-free grammar), on the CPU
//! backend and on the GPU path (the CUDA emulator: such rows go to the `sample` kernel
//! with the mask's bits, and only their tokens come back), greedy and sampled; checked
//! with the `regex` crate, which shares no code with the engine's DFA walk. Through the
//! API: the fields vLLM's clients send, and what is refused.

use crate::common;
use common::*;
use gateway::config::BackendKind;
use gateway::engine::EngineWorker;
use gateway::worker::{FinishReason, OutputFormat, Worker};
use serde_json::Value;
use std::sync::Arc;

/// The text and finish of `format` on `w` from a short prompt.
async fn run(
    w: &EngineWorker,
    format: OutputFormat,
    temperature: f32,
    seed: u64,
    max_tokens: u32,
) -> (String, FinishReason) {
    let mut r = (*worker_req("the answer is", max_tokens)).clone();
    r.params.format = Some(format);
    r.params.temperature = temperature;
    r.params.seed = Some(seed);
    text_and_finish(w.submit(Arc::new(r)).await.unwrap()).await
}

const DRAWS: [(f32, u64); 5] = [(0.0, 0), (1.0, 1), (1.5, 2), (1.8, 3), (0.7, 4)];

#[tokio::test(flavor = "multi_thread")]
async fn answers_match_their_regular_expression_whole_on_the_cpu_and_on_the_gpu_path() {
    let (_dir, loaded) = synthetic_model();
    // Bounded expressions: every answer ends within its token budget (a token is at least
    // one byte), so each must stop, matched.
    let patterns = [
        r"[a-e]{3}-[0-9]{2,4}",
        r"(?:yes|no|maybe)\.",
        r"\(\d{3}\) \d{3}-\d{4}",
        r"[A-Z][a-z]{1,6}(?: [a-z]{1,6}){0,2}!",
    ];
    for kind in engine_backends() {
        let w = engine_on(&loaded, kind);
        for re in patterns {
            let whole = regex::Regex::new(&format!("^(?:{re})$")).unwrap();
            let mut seen = std::collections::BTreeSet::new();
            for (temperature, seed) in DRAWS {
                let format = OutputFormat::regex(re).unwrap();
                let (text, finish) = run(&w, format, temperature, seed, 32).await;
                assert!(
                    whole.is_match(&text),
                    "{kind:?} {re}, temperature {temperature}: {text:?}"
                );
                assert_eq!(finish, FinishReason::Stop, "{kind:?} {re}: {text:?}");
                seen.insert(text);
            }
            eprintln!("{kind:?} {re}: {seen:?}");
        }
        // On the GPU path every row was masked on the device; none was read back.
        let c = w.engine_counters().unwrap();
        if kind == BackendKind::Cpu {
            assert_eq!((c.rows_adjusted_on_device, c.rows_read_back), (0, 0));
        } else {
            assert!(c.rows_adjusted_on_device > 20, "{kind:?}: {c:?}");
            assert_eq!(c.rows_read_back, 0, "{kind:?}");
        }
    }
}

/// `guided_grammar`: nested lists, a grammar of calls and repetitions whose answers are
/// bounded (every one must stop within its budget), checked against a regular
/// expression of the same language with the `regex` crate.
#[tokio::test(flavor = "multi_thread")]
async fn answers_are_texts_of_their_context_free_grammar_on_the_cpu_and_on_the_gpu_path() {
    let (_dir, loaded) = synthetic_model();
    let grammar = r#"
        root ::= list "."
        list ::= "[" ( item ( ", " item ){0,2} )? "]"
        item ::= letter | "[" ( letter ( "," letter ){0,2} )? "]"
        letter ::= [a-c] | "é"
    "#;
    let item = r"(?:[a-c]|é|\[(?:(?:[a-c]|é)(?:,(?:[a-c]|é)){0,2})?\])";
    let whole = regex::Regex::new(&format!(r"^\[(?:{item}(?:, {item}){{0,2}})?\]\.$")).unwrap();
    for kind in engine_backends() {
        let w = engine_on(&loaded, kind);
        let mut seen = std::collections::BTreeSet::new();
        for (temperature, seed) in DRAWS.into_iter().chain([(1.3, 5), (1.6, 6), (2.0, 7)]) {
            let format = OutputFormat::ebnf(grammar).unwrap();
            let (text, finish) = run(&w, format, temperature, seed, 48).await;
            assert!(
                whole.is_match(&text),
                "{kind:?}, temperature {temperature}: {text:?}"
            );
            assert_eq!(finish, FinishReason::Stop, "{kind:?}: {text:?}");
            seen.insert(text);
        }
        eprintln!("{kind:?}: {seen:?}");
        assert!(seen.len() > 2, "{kind:?}: {seen:?}");
        let c = w.engine_counters().unwrap();
        if kind != BackendKind::Cpu {
            assert!(c.rows_adjusted_on_device > 20, "{kind:?}: {c:?}");
            assert_eq!(c.rows_read_back, 0, "{kind:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_answer_is_exactly_one_of_the_choices() {
    let (_dir, loaded) = synthetic_model();
    // Choices that share beginnings and hold an expression's metacharacters, taken as
    // written.
    let choices: Vec<String> = ["positive", "negative", "neutral", "n/a (none)", "1.5+"]
        .map(String::from)
        .to_vec();
    for kind in engine_backends() {
        let w = engine_on(&loaded, kind);
        for (temperature, seed) in DRAWS {
            let format = OutputFormat::choice(choices.clone()).unwrap();
            let (text, finish) = run(&w, format, temperature, seed, 16).await;
            assert!(
                choices.contains(&text),
                "{kind:?}, temperature {temperature}: {text:?} is none of {choices:?}"
            );
            assert_eq!(finish, FinishReason::Stop, "{kind:?}: {text:?}");
        }
        // Cut short, an answer is a beginning of a choice, and says so.
        let format = OutputFormat::choice(vec!["abcdefghijklmnopqrstuvwxyz".into()]).unwrap();
        let (text, finish) = run(&w, format, 0.0, 0, 3).await;
        assert_eq!(finish, FinishReason::Length, "{kind:?}: {text:?}");
        assert!(
            "abcdefghijklmnopqrstuvwxyz".starts_with(&text) && !text.is_empty(),
            "{kind:?}: {text:?}"
        );
    }
}

/// vLLM's example of `guided_grammar`, and an expression of the same language.
const SQL: &str = include_str!("../../../kernels/testdata/vllm_sql.gbnf");
const SQL_RE: &str = "^SELECT col_[12]  from table_[12]  where col_[12] = [12] $";

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn vllms_fields_reach_the_engine_and_what_it_cannot_follow_is_refused() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ""));
    let chat = |extra: &str| {
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hello"}}],"max_tokens":40,{extra}}}"#
        )
    };
    let completion =
        |extra: &str| format!(r#"{{"model":"m","prompt":"hello","max_tokens":40,{extra}}}"#);
    // The old fields and the new object, on both endpoints.
    let asked = [
        (
            chat(r#""guided_choice":["red","green","blue"]"#),
            "^(?:red|green|blue)$",
        ),
        (
            completion(r#""guided_regex":"[0-9]{3}-[a-z]{2}""#),
            "^[0-9]{3}-[a-z]{2}$",
        ),
        (
            chat(r#""structured_outputs":{"regex":"(?:up|down)!"},"temperature":1.5,"seed":7"#),
            "^(?:up|down)!$",
        ),
        (
            completion(r#""structured_outputs":{"choice":["a.b","c"]},"temperature":1.2,"seed":3"#),
            r"^(?:a\.b|c)$",
        ),
        // A context-free grammar (vLLM's SQL example), in both forms: its texts are 44
        // bytes, so 64 tokens leave room for one a byte and the end.
        (
            chat(&format!(
                r#""guided_grammar":{},"temperature":1.0,"seed":5"#,
                json_str(SQL)
            ))
            .replace(r#""max_tokens":40"#, r#""max_tokens":64"#),
            SQL_RE,
        ),
        (
            completion(&format!(
                r#""structured_outputs":{{"grammar":{}}},"seed":6"#,
                json_str(SQL)
            ))
            .replace(r#""max_tokens":40"#, r#""max_tokens":64"#),
            SQL_RE,
        ),
    ];
    for (body, re) in &asked {
        let (path, pick) = if body.contains("messages") {
            ("/v1/chat/completions", "/choices/0/message/content")
        } else {
            ("/v1/completions", "/choices/0/text")
        };
        let r = post(&gw, path, body).await;
        assert_eq!(r.status(), 200, "{body}");
        let v: Value = r.json().await.unwrap();
        let text = v.pointer(pick).and_then(Value::as_str).unwrap_or_default();
        assert!(regex::Regex::new(re).unwrap().is_match(text), "{body}: {v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{body}: {v}");
    }
    // `guided_json` and `structured_outputs.json`: a document of the schema.
    let schema = r#"{"type":"object","properties":{"ok":{"type":"boolean"}},"required":["ok"],"additionalProperties":false}"#;
    for extra in [
        format!(r#""guided_json":{schema}"#),
        format!(
            r#""guided_json":{}"#,
            serde_json::to_string(schema).unwrap()
        ),
        format!(r#""structured_outputs":{{"json":{schema}}}"#),
    ] {
        let body = chat(&extra);
        let r = post(&gw, "/v1/chat/completions", &body).await;
        assert_eq!(r.status(), 200, "{body}");
        let v: Value = r.json().await.unwrap();
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default();
        if v["choices"][0]["finish_reason"] == "stop" {
            let doc: Value = serde_json::from_str(text).unwrap();
            assert!(
                doc["ok"].is_boolean() && doc.as_object().unwrap().len() == 1,
                "{text}"
            );
        } else {
            assert!(text.starts_with('{'), "{text}");
        }
    }
    // The Responses API takes them as chat does.
    let body =
        r#"{"model":"m","input":"hello","max_output_tokens":16,"guided_choice":["left","right"]}"#;
    let v: Value = post_json(&gw, "/v1/responses", body).await;
    let text = v["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap_or_default();
    assert!(text == "left" || text == "right", "{v}");
    // vLLM takes `response_format` on completions too.
    let body = completion(r#""response_format":{"type":"json_object"},"temperature":0"#);
    let v: Value = post_json(&gw, "/v1/completions", &body).await;
    let text = v["choices"][0]["text"].as_str().unwrap_or_default();
    assert!(text.starts_with('{'), "{v}");
    // Refused by name, never ignored.
    let refused = [
        (chat(r#""guided_grammar":"start: \"a\"""#), "guided_grammar"),
        (
            chat(r#""structured_outputs":{"grammar":"root ::= x"}"#),
            "structured_outputs.grammar",
        ),
        (
            chat(r#""structured_outputs":{"structural_tag":"{}"}"#),
            "structured_outputs.structural_tag",
        ),
        (
            chat(r#""guided_whitespace_pattern":" ?""#),
            "guided_whitespace_pattern",
        ),
        (chat(r#""guided_regex":"(unclosed""#), "guided_regex"),
        (chat(r#""guided_regex":5"#), "guided_regex"),
        (chat(r#""guided_choice":[]"#), "guided_choice"),
        (chat(r#""guided_choice":["a",1]"#), "guided_choice"),
        (chat(r#""guided_json":"not json""#), "guided_json"),
        (
            chat(r#""guided_json":{"type":"object","patternProperties":{"a":{}}}"#),
            "guided_json",
        ),
        (
            chat(r#""guided_choice":["a"],"guided_regex":"b""#),
            "guided_choice",
        ),
        (
            chat(r#""guided_choice":["a"],"response_format":{"type":"json_object"}"#),
            "guided_choice",
        ),
        (
            chat(r#""guided_choice":["a"],"min_tokens":2"#),
            "min_tokens",
        ),
        (
            chat(
                r#""guided_choice":["a"],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"tool_choice":"required""#,
            ),
            "guided_choice",
        ),
        (
            chat(r#""structured_outputs":{"regex":"a","choice":["b"]}"#),
            "structured_outputs.choice",
        ),
        (
            chat(r#""structured_outputs":{"disable_any_whitespace":true,"json":{}}"#),
            "structured_outputs.disable_any_whitespace",
        ),
        (
            chat(r#""structured_outputs":{"colour":"red"}"#),
            "structured_outputs.colour",
        ),
        (
            chat(r#""structured_outputs":"regex""#),
            "structured_outputs",
        ),
        (
            completion(r#""guided_choice":["a"],"ignore_eos":true"#),
            "ignore_eos",
        ),
        // Refused by the engine, which names the field too.
        (chat(r#""stop_token_ids":[999999]"#), "stop_token_ids"),
        (
            completion(r#""allowed_token_ids":[7,999999]"#),
            "allowed_token_ids",
        ),
        (completion(r#""logit_bias":{"999999":5}"#), "logit_bias"),
    ];
    for (body, param) in &refused {
        let path = if body.contains("messages") {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let r = post(&gw, path, body).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], *param, "{body}: {v}");
    }
}
