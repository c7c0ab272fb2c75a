//! JSON mode (`response_format: {"type": "json_object"}`): the engine's output is one JSON
//! object, on the CPU backend and on the GPU path (the CUDA emulator: such rows are read
//! back and drawn on the host from their masked logits), greedy and sampled; complete
//! when the engine stops, a valid beginning of one when it runs out of tokens.

mod common;
use common::*;
use futures::StreamExt;
use gateway::engine::EngineWorker;
use gateway::worker::{FinishReason, Worker, WorkerEvent};
use kernels::json_mode::JsonState;
use serde_json::Value;
use std::sync::Arc;

async fn run(
    w: &EngineWorker,
    temperature: f32,
    seed: u64,
    max_tokens: u32,
    bias: Vec<(u32, f32)>,
) -> (String, FinishReason) {
    let mut r = (*worker_req("a json object:", max_tokens)).clone();
    r.params.json_object = true;
    r.params.temperature = temperature;
    r.params.seed = Some(seed);
    r.params.logit_bias = bias;
    let mut s = w.submit(Arc::new(r)).await.unwrap();
    let mut text = String::new();
    while let Some(ev) = s.next().await {
        match ev.unwrap() {
            WorkerEvent::Delta { text: t, .. } => text.push_str(&t),
            WorkerEvent::Done { finish_reason, .. } => return (text, finish_reason),
        }
    }
    panic!("no Done event");
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
        let mut stopped = 0;
        for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2), (1.3, 3), (0.7, 4)] {
            let (text, finish) = run(&w, temperature, seed, 48, vec![]).await;
            let mut st = JsonState::new();
            assert!(
                st.advance(text.as_bytes()),
                "{kind:?}, temperature {temperature}: not JSON: {text:?}"
            );
            match finish {
                FinishReason::Stop => {
                    stopped += 1;
                    assert!(st.done(), "{kind:?}: stopped inside the object: {text:?}");
                    let v: Value = serde_json::from_str(&text).unwrap();
                    assert!(v.is_object(), "{text}");
                }
                _ => assert!(!st.done(), "{kind:?}: complete but not stopped: {text:?}"),
            }
        }
        eprintln!("{kind:?}: {stopped} of 5 objects complete within 48 tokens");
        // Pushed to close at once, it closes, then stops: `{}` and nothing after.
        let (text, finish) = run(&w, 0.0, 0, 16, vec![(close, 30.0)]).await;
        assert_eq!(text.trim(), "{}", "{kind:?}");
        assert_eq!(finish, FinishReason::Stop, "{kind:?}: {text:?}");
    }
}

/// Through the gateway: `json_object` is honoured, `json_schema` refused, and simulated
/// workers refuse JSON mode.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_takes_json_object_and_refuses_what_it_cannot_honour() {
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
    let schema = body.replace(
        r#"{"type":"json_object"}"#,
        r#"{"type":"json_schema","json_schema":{"name":"x","schema":{}}}"#,
    );
    let r = post(&gw, "/v1/chat/completions", &schema).await;
    assert_eq!(r.status(), 400);
    let bad = body.replace(r#"{"type":"json_object"}"#, r#"{"type":"xml"}"#);
    let r = post(&gw, "/v1/chat/completions", &bad).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "response_format", "{v}");
    let sim = Gateway::start(&config(FAST_SIM, "", ""));
    let r = post(&sim, "/v1/chat/completions", body).await;
    assert_eq!(r.status(), 400);
}
