//! The Responses API on the engine (synthetic model, a 256-token context):
//! `truncation: "auto"` drops a long conversation's oldest turns until it and its answer
//! fit, where `"disabled"` (the default) refuses it for its length; and
//! `POST /v1/responses/input_tokens` counts what a response's prompt would take.

use crate::common;
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
    // The code OpenAI's clients match on to shorten a prompt.
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
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

/// `POST /v1/responses/input_tokens` on an engine pool counts with the model's tokenizer:
/// the count is what the response to the same body reports, truncated or not.
#[tokio::test(flavor = "multi_thread")]
async fn input_tokens_are_counted_as_the_response_takes_them() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(
        &engine_config(&model, ", kv_tokens = 256")
            .replace("max_body_bytes = 4096", "max_body_bytes = 65536"),
    );
    let count = async |body: &Value| -> Value {
        let r = post(&gw, "/v1/responses/input_tokens", &body.to_string()).await;
        assert_eq!(r.status(), 200, "{body}");
        r.json().await.expect("JSON")
    };
    let long: Vec<Value> = (0..24)
        .map(|i| json!({"role": "user", "content": format!("turn {i}: {}", "lorem ipsum ".repeat(8))}))
        .collect();
    let longer: Vec<Value> = (0..120)
        .map(|i| json!({"role": "user", "content": format!("turn {i}: {}", "lorem ipsum ".repeat(8))}))
        .collect();
    for body in [
        json!({"model": "m", "input": "hello there", "instructions": "Be brief.",
               "max_output_tokens": 4, "temperature": 0}),
        json!({"model": "m", "input": [{"role": "user", "content": "What is 2+2?"},
               {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
               "max_output_tokens": 4, "temperature": 0}),
        json!({"model": "m", "input": long, "truncation": "auto",
               "max_output_tokens": 8, "temperature": 0}),
        // About 12 KB: tokenized off the runtime's threads (and truncated there).
        json!({"model": "m", "input": longer, "truncation": "auto",
               "max_output_tokens": 8, "temperature": 0}),
    ] {
        let counted = count(&body).await;
        assert_eq!(counted["object"], "response.input_tokens", "{counted}");
        let answered = post_json(&gw, "/v1/responses", &body.to_string()).await;
        assert_eq!(
            counted["input_tokens"], answered["usage"]["input_tokens"],
            "{body}\n{answered}"
        );
    }
    // Counting a conversation too long for the model is not an error (it is not run).
    let v = count(&json!({"model": "m", "input": long})).await;
    assert!(v["input_tokens"].as_u64().expect("a count") > 256, "{v}");
    let v = count(&json!({"model": "m", "input": longer})).await;
    let n = v["input_tokens"].as_u64().expect("a count");
    assert!(n > 2048, "{v}");
    // The same whether tokenized on the runtime or off it: 120 turns of the same length
    // are about five times 24 of them.
    let short = count(&json!({"model": "m", "input": long})).await["input_tokens"]
        .as_u64()
        .expect("a count");
    assert!(n.abs_diff(5 * short) < 5 * 24, "{n} vs 5 × {short}");
    // Bad requests are the same 400s and 404s as the Responses endpoint's.
    let r = post(
        &gw,
        "/v1/responses/input_tokens",
        r#"{"model":"nope","input":"x"}"#,
    )
    .await;
    assert_eq!(r.status(), 404);
    let r = post(
        &gw,
        "/v1/responses/input_tokens",
        r#"{"model":"m","input":7}"#,
    )
    .await;
    assert_eq!(r.status(), 400);
}
