//! The Responses API on the engine (synthetic model, a 256-token context):
//! `truncation: "auto"` drops a long conversation's oldest turns until it and its answer
//! fit, where `"disabled"` (the default) refuses it for its length.

mod common;
use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread")]
async fn a_conversation_past_the_context_is_truncated_only_when_asked() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ", kv_tokens = 256"));
    // 24 turns of about 20 tokens each: well past 256 in all.
    let turns: Vec<Value> = (0..24)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            json!({"role": role, "content": format!("turn {i}: {}", "lorem ipsum dolor ".repeat(5))})
        })
        .collect();
    let body = |truncation: &str| {
        json!({"model": "m", "instructions": "Be brief.", "input": turns,
               "max_output_tokens": 8, "temperature": 0, "truncation": truncation})
        .to_string()
    };
    let r = post(&gw, "/v1/responses", &body("disabled")).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("maximum context length is 256"), "{v}");
    let r = post(&gw, "/v1/responses", &body("auto")).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["truncation"], "auto", "{v}");
    let input = v["usage"]["input_tokens"].as_u64().expect("usage");
    // Fits with its answer, and no more was dropped than needed: one turn more would not
    // have fit (a turn is about 20 tokens).
    assert!(input + 8 <= 256, "{v}");
    assert!(input + 8 > 256 - 40, "{v}");
    // The default is `disabled`, and says so.
    let r = post(
        &gw,
        "/v1/responses",
        r#"{"model":"m","input":"hi","max_output_tokens":2}"#,
    )
    .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["truncation"], "disabled", "{v}");
}
