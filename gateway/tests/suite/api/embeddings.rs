//! The Embeddings API on simulated workers: vectors per input, in order, and many inputs
//! routed a pool's capacity at a time.

use super::*;

/// `POST /v1/embeddings` on simulated workers: one unit vector per input, in input order,
/// the same input the same vector, as floats or base64; usage is the inputs' tokens;
/// bad inputs are 400s naming them.
#[tokio::test]
async fn embeddings_are_one_unit_vector_per_input() {
    let gw = Gateway::start(&config(FAST_SIM, "", ""));
    let v: Value = post_json(
        &gw,
        "/v1/embeddings",
        r#"{"model":"m","input":["hello there","another input","hello there"]}"#,
    )
    .await;
    assert_eq!(v["object"], "list", "{v}");
    assert_eq!(v["model"], "m");
    let data = v["data"].as_array().expect("data");
    let vectors: Vec<Vec<f32>> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(
                (&d["object"], &d["index"]),
                (&Value::from("embedding"), &Value::from(i))
            );
            d["embedding"]
                .as_array()
                .expect("floats")
                .iter()
                .map(|x| x.as_f64().expect("a float") as f32)
                .collect()
        })
        .collect();
    assert_eq!(vectors.len(), 3);
    for e in &vectors {
        let norm: f64 = e.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
    assert_eq!(vectors[0], vectors[2], "the same input, the same vector");
    assert_ne!(vectors[0], vectors[1]);
    let tokens = v["usage"]["prompt_tokens"].as_u64().expect("usage");
    assert!(tokens > 0 && v["usage"]["total_tokens"] == tokens, "{v}");
    // base64: the same floats' bytes.
    let b: Value = post_json(
        &gw,
        "/v1/embeddings",
        r#"{"model":"m","input":"hello there","encoding_format":"base64"}"#,
    )
    .await;
    let text = b["data"][0]["embedding"].as_str().expect("base64");
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64");
    let back: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(back, vectors[0]);
    refused(
        &gw,
        "/v1/embeddings",
        r#"{"model":"m","input":["a",""]}"#,
        "input[1]",
    )
    .await;
    refused(
        &gw,
        "/v1/embeddings",
        r#"{"model":"m","input":"a","dimensions":8}"#,
        "dimensions",
    )
    .await;
    let r = post(&gw, "/v1/embeddings", r#"{"model":"nope","input":"a"}"#).await;
    assert_eq!(r.status(), 404);
}

/// An embeddings request of many more inputs than its pool runs at once (3 slots, one
/// request may wait) is routed a pool's capacity at a time: every input answered, in
/// order, each as it is alone. (All routed at once, most would find the wait room full.)
/// Its answer (300 × 256 numbers) is rendered off the serving thread.
#[tokio::test]
async fn embeddings_of_many_inputs_are_routed_a_pool_at_a_time() {
    let sim = r#"{ kind = "sim", prefill_tokens_per_s = 0.0, decode_step_ms = 1.0, decode_step_ms_per_seq = 0.0, max_concurrency = 3 }"#;
    let gw = Gateway::start(&config(sim, "", "queue_depth = 1"));
    let inputs: Vec<String> = (0..300).map(|i| format!("a{i}")).collect();
    let body = serde_json::json!({"model": "m", "input": inputs}).to_string();
    let r = post(&gw, "/v1/embeddings", &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 300);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i, "in input order");
    }
    for i in [0, 7, 299] {
        let one = serde_json::json!({"model": "m", "input": inputs[i]}).to_string();
        let alone: Value = post_json(&gw, "/v1/embeddings", &one).await;
        assert_eq!(
            alone["data"][0]["embedding"], data[i]["embedding"],
            "input {i}"
        );
    }
    let sum: u64 = {
        let mut sum = 0;
        for chunk in inputs.chunks(100) {
            let b = serde_json::json!({"model": "m", "input": chunk}).to_string();
            let part: Value = post_json(&gw, "/v1/embeddings", &b).await;
            sum += part["usage"]["prompt_tokens"].as_u64().expect("usage");
        }
        sum
    };
    assert_eq!(
        v["usage"]["prompt_tokens"], sum,
        "every input's tokens counted once"
    );
}
