//! The tenant API over HTTP against the real binary: responses, streaming, usage, errors,
//! auth, request ids, models, ops endpoints.

mod common;
use common::*;
use futures::StreamExt;
use serde_json::Value;

const CHAT: &str =
    r#"{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":5}"#;

#[tokio::test]
async fn chat_and_completion_non_streamed_with_usage() {
    let gw = Gateway::start(&config(FAST_SIM, "", ""));
    let r = post(&gw, "/v1/chat/completions", CHAT).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-request-id").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "m");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(text.split(' ').count(), 5);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(
        v["usage"]["total_tokens"].as_u64().unwrap(),
        v["usage"]["prompt_tokens"].as_u64().unwrap() + 5
    );
    // Natural end before max_tokens: finish_reason stop.
    let r = post(
        &gw,
        "/v1/completions",
        r#"{"model":"m","prompt":"once upon","max_tokens":50}"#,
    )
    .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    assert_eq!(
        v["choices"][0]["text"].as_str().unwrap().split(' ').count(),
        8
    );
    // Metering saw both.
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"tollgate_requests_total{tenant="demo",model="m",status="200"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"tollgate_output_tokens_total{tenant="demo",model="m"}"#
        ),
        Some(13.0)
    );
}

#[tokio::test]
async fn streamed_chat_matches_non_streamed_and_reports_usage() {
    let gw = Gateway::start(&config(FAST_SIM, "", ""));
    let whole: Value = post_json(&gw, "/v1/chat/completions", CHAT).await;
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":5,"stream":true,"stream_options":{"include_usage":true}}"#;
    let r = post(&gw, "/v1/chat/completions", body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let events = sse_events(r).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(chunks
        .iter()
        .all(|c| c["id"] == id && c["object"] == "chat.completion.chunk"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let fin = &chunks[chunks.len() - 2];
    assert_eq!(fin["choices"][0]["finish_reason"], "length");
    let usage = &chunks[chunks.len() - 1];
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"], whole["usage"]);
    // One chunk per token, token by token.
    assert_eq!(chunks.len(), 1 + 5 + 1 + 1);

    // Without include_usage: no usage chunk.
    let body = r#"{"model":"m","prompt":"x","max_tokens":3,"stream":true}"#;
    let events = sse_events(post(&gw, "/v1/completions", body).await).await;
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c.get("usage").is_none() && c["object"] == "text_completion"));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(chunks.len(), 3 + 1);
}

async fn expect_error(
    gw: &Gateway,
    path: &str,
    body: &str,
    status: u16,
    param: Option<&str>,
) -> Value {
    let r = post(gw, path, body).await;
    assert_eq!(r.status(), status, "{body}");
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("code").is_some() && e.get("param").is_some(), "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body}: {v}");
    }
    v
}

#[tokio::test]
async fn every_error_path_answers_in_the_openai_shape() {
    let gw = Gateway::start(&config(FAST_SIM, "", ""));
    let c = "/v1/chat/completions";
    expect_error(&gw, c, "{not json", 400, None).await;
    expect_error(
        &gw,
        c,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":"ten"}"#,
        400,
        Some("max_tokens"),
    )
    .await;
    expect_error(
        &gw,
        c,
        r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
        400,
        Some("stream"),
    )
    .await;
    expect_error(
        &gw,
        c,
        r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
        400,
        Some("messages[0].role"),
    )
    .await;
    let v = expect_error(
        &gw,
        c,
        r#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#,
        404,
        Some("model"),
    )
    .await;
    assert_eq!(v["error"]["code"], "model_not_found");
    let big = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(8000)
    );
    expect_error(&gw, c, &big, 413, None).await;
    for (extra, param) in [
        (r#""max_tokens":0"#, "max_tokens"),
        (r#""max_tokens":1000000"#, "max_tokens"),
        (r#""temperature":-1"#, "temperature"),
        (r#""temperature":3"#, "temperature"),
        (r#""top_p":2"#, "top_p"),
        (r#""n":17"#, "n"),
        (
            r#""tools":[{"type":"function","function":{"name":"f g"}}]"#,
            "tools[0].function.name",
        ),
        (r#""functions":[{"name":"f"}]"#, "functions"),
        (r#""top_logprobs":2"#, "top_logprobs"),
        (r#""logprobs":"yes""#, "logprobs"),
    ] {
        let body =
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],{extra}}}"#);
        let v = expect_error(&gw, c, &body, 400, Some(param)).await;
        if param == "functions" {
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not supported"));
        }
    }
    expect_error(
        &gw,
        "/v1/completions",
        r#"{"model":"m","prompt":["a",{"b":1}]}"#,
        400,
        Some("prompt"),
    )
    .await;
    expect_error(&gw, "/v1/nothing", "{}", 404, None).await;
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            r#"tollgate_requests_total{tenant="demo",model="",status="400"}"#
        )
        .unwrap()
            >= 10.0
    );
}

#[tokio::test]
async fn auth_failures_are_401_and_keys_are_not_logged() {
    let gw = Gateway::start_with_log(&config(FAST_SIM, "", ""), "debug");
    let c = client();
    for auth in [
        None,
        Some("Bearer sk-wrong"),
        Some("Basic abc"),
        Some("Bearer "),
    ] {
        let mut req = c.post(gw.url("/v1/chat/completions")).body(CHAT);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let r = c.get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "tollgate_auth_failures_total"), Some(5.0));
    post(&gw, "/v1/chat/completions", CHAT).await;
    let log = gw.log();
    assert!(log.contains("unknown API key"), "{log}");
    assert!(
        !log.contains("sk-wrong") && !log.contains(KEY),
        "a key reached the log:\n{log}"
    );
}

#[tokio::test]
async fn request_ids_models_and_ops_endpoints() {
    let gw = Gateway::start(&config(FAST_SIM, "", ""));
    let c = client();
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-request-id", "client-chosen-42")
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "client-chosen-42");
    let v: Value = c
        .get(gw.url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "m");
    let one = |id: &str| {
        c.get(gw.url(&format!("/v1/models/{id}")))
            .bearer_auth(KEY)
            .send()
    };
    let r = one("m").await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (&v["object"], &v["id"]),
        (&Value::from("model"), &Value::from("m"))
    );
    let r = one("org/other").await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    assert_eq!(c.get(gw.url("/health")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(gw.url("/ready")).send().await.unwrap().status(), 200);
    let m = gw.metrics().await;
    for name in [
        "tollgate_time_to_first_token_seconds_count",
        "tollgate_request_duration_seconds_count",
        "tollgate_in_flight_requests",
        "tollgate_worker_healthy{pool=\"p\",worker=\"p/0-sim\"} 1",
        "tollgate_worker_in_flight{pool=\"p\",worker=\"p/0-sim\"} 0",
        "tollgate_worker_queued",
    ] {
        assert!(m.contains(name), "{name} missing from\n{m}");
    }
}

#[tokio::test]
async fn tenant_concurrency_cap_gives_429() {
    let slow = r#"{ kind = "sim", decode_step_ms = 50.0, min_output_tokens = 20, max_output_tokens = 20 }"#;
    let gw = Gateway::start(&config(slow, "max_concurrency = 2", ""));
    let body = r#"{"model":"m","prompt":"x","max_tokens":20,"stream":true}"#;
    let a = post(&gw, "/v1/completions", body).await;
    let b = post(&gw, "/v1/completions", body).await;
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let r = post(&gw, "/v1/completions", body).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after") && r.headers().contains_key("retry-after-ms"));
    drop((a, b));
    assert!(
        eventually(std::time::Duration::from_secs(3), async || post(
            &gw,
            "/v1/completions",
            body
        )
        .await
        .status()
            == 200)
        .await
    );
}

/// Completions' `echo`: the prompt first, in the body and as the stream's first text.
#[tokio::test]
async fn completions_echo_the_prompt_first() {
    let gw = Gateway::start(&config(FAST_SIM, "", ""));
    let plain = r#"{"model":"m","prompt":"once upon","max_tokens":4}"#;
    let echoed = r#"{"model":"m","prompt":"once upon","max_tokens":4,"echo":true}"#;
    let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    let a: Value = post_json(&gw, "/v1/completions", plain).await;
    let b: Value = post_json(&gw, "/v1/completions", echoed).await;
    assert_eq!(text(&b), format!("once upon{}", text(&a)));
    assert_eq!(a["usage"], b["usage"], "the echo is not generated");
    let body = echoed.replace(r#""echo":true"#, r#""echo":true,"stream":true"#);
    let events = sse_events(post(&gw, "/v1/completions", &body).await).await;
    let texts: Vec<String> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| text(&serde_json::from_str(e).unwrap()))
        .collect();
    assert_eq!(texts[0], "once upon");
    assert_eq!(texts.concat(), text(&b));
}

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

/// Simulated workers that answer 400 tokens, 20 ms apiece (background responses that run
/// a while).
const SLOW_SIM: &str = r#"{ kind = "sim", prefill_tokens_per_s = 0.0, decode_step_ms = 20.0, decode_step_ms_per_seq = 0.0, min_output_tokens = 400, max_output_tokens = 400 }"#;

/// `method` on `path` of `gw` with `key`, and a JSON body where given.
async fn call(
    gw: &Gateway,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> reqwest::Result<reqwest::Response> {
    let mut r = client().request(method, gw.url(path)).bearer_auth(key);
    if let Some(b) = body {
        r = r.json(&b);
    }
    r.send().await
}

/// [`call`]'s answer, as JSON.
async fn call_json(
    gw: &Gateway,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let r = call(gw, key, method, path, body).await.expect("sent");
    r.json().await.expect("JSON")
}

/// A fresh folder for a test's response store, and the `[responses]` lines that keep the
/// store there.
fn response_store(name: &str) -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("tollgate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a test folder");
    let lines = format!(
        "\n[responses]\nstore = true\npath = {:?}\n",
        dir.join("responses.db").display().to_string()
    );
    (dir, lines)
}

/// Stored answers of the Responses API (`[responses] store = true`): continued with
/// `previous_response_id` (the conversation comes back as the prompt), read back and
/// deleted by their tenant only, never stored when the request says `store: false`, and
/// still there after the gateway is killed and started again.
#[tokio::test]
async fn stored_responses_are_their_tenants_and_survive_a_kill() {
    let (dir, stored) = response_store("stored");
    let cfg = config(FAST_SIM, &other_tenant(), "") + &stored;
    let c = client();
    let send =
        |gw: &Gateway, key: &str, method: reqwest::Method, path: &str, body: Option<&str>| {
            let mut r = c.request(method, gw.url(path)).bearer_auth(key);
            if let Some(b) = body {
                r = r
                    .header("content-type", "application/json")
                    .body(b.to_string());
            }
            r.send()
        };
    let mut gw = Gateway::start(&cfg);
    let post = reqwest::Method::POST;
    let r = send(
        &gw,
        KEY,
        post.clone(),
        "/v1/responses",
        Some(r#"{"model":"m","input":"hello there"}"#),
    )
    .await
    .unwrap();
    let first: Value = r.json().await.unwrap();
    assert_eq!(first["store"], true, "{first}");
    let id = first["id"].as_str().unwrap().to_string();
    // Continued: the stored conversation is the new request's prompt.
    let body = format!(r#"{{"model":"m","input":"and again","previous_response_id":"{id}"}}"#);
    let second: Value = send(&gw, KEY, post.clone(), "/v1/responses", Some(&body))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(second["previous_response_id"], id.as_str(), "{second}");
    let tokens = |v: &Value| v["usage"]["input_tokens"].as_u64().unwrap();
    assert!(
        tokens(&second) > tokens(&first) + first["usage"]["output_tokens"].as_u64().unwrap(),
        "{first}\n{second}"
    );
    // Its input items: the first answer's conversation, then its own input; the first
    // answer's output under the id it was sent with.
    let get = reqwest::Method::GET;
    let second_id = second["id"].as_str().unwrap().to_string();
    let items = format!("/v1/responses/{second_id}/input_items");
    let listed: Value = send(&gw, KEY, get.clone(), &format!("{items}?order=asc"), None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let data = listed["data"].as_array().expect("data");
    let said: Vec<(&str, &str)> = data
        .iter()
        .map(|i| {
            (
                i["role"].as_str().unwrap(),
                i["content"][0]["text"].as_str().unwrap(),
            )
        })
        .collect();
    let answer = first["output"][0]["content"][0]["text"].as_str().unwrap();
    assert_eq!(
        said,
        [
            ("user", "hello there"),
            ("assistant", answer),
            ("user", "and again")
        ],
        "{listed}"
    );
    assert_eq!(data[1]["id"], first["output"][0]["id"]);
    assert_eq!(listed["has_more"], false);
    let newest: Value = send(&gw, KEY, get.clone(), &format!("{items}?limit=1"), None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(newest["data"][0]["id"], data[2]["id"], "newest first");
    assert_eq!(newest["has_more"], true);
    let r = send(&gw, KEY, get.clone(), &format!("{items}?limit=500"), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let first_items = format!("/v1/responses/{id}/input_items");
    let r = send(&gw, OTHER, get.clone(), &first_items, None)
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "another tenant's");
    // Another tenant cannot read, continue or delete it.
    let path = format!("/v1/responses/{id}");
    assert_eq!(
        send(&gw, OTHER, get.clone(), &path, None)
            .await
            .unwrap()
            .status(),
        404
    );
    let r = send(&gw, OTHER, post.clone(), "/v1/responses", Some(&body))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "previous_response_id");
    assert_eq!(v["error"]["code"], "previous_response_not_found");
    let delete = reqwest::Method::DELETE;
    assert_eq!(
        send(&gw, OTHER, delete.clone(), &path, None)
            .await
            .unwrap()
            .status(),
        404
    );
    // `store: false`: answered, not kept.
    let unkept: Value = send(
        &gw,
        KEY,
        post.clone(),
        "/v1/responses",
        Some(r#"{"model":"m","input":"x","store":false}"#),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(unkept["store"], false);
    let unkept_path = format!("/v1/responses/{}", unkept["id"].as_str().unwrap());
    assert_eq!(
        send(&gw, KEY, get.clone(), &unkept_path, None)
            .await
            .unwrap()
            .status(),
        404
    );
    // Killed and started again: the answer is there, as it was sent.
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    drop(gw);
    let gw = Gateway::start(&cfg);
    let r = send(&gw, KEY, get.clone(), &path, None).await.unwrap();
    assert_eq!(r.status(), 200);
    let again: Value = r.json().await.unwrap();
    assert_eq!(again, first);
    let r = send(&gw, KEY, get.clone(), &format!("{items}?order=asc"), None)
        .await
        .unwrap();
    let relisted: Value = r.json().await.unwrap();
    assert_eq!(relisted, listed, "the same items under the same ids");
    let r = send(&gw, KEY, delete.clone(), &path, None).await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (&v["id"], &v["deleted"]),
        (&Value::from(id.as_str()), &Value::from(true))
    );
    assert_eq!(
        send(&gw, KEY, get.clone(), &path, None)
            .await
            .unwrap()
            .status(),
        404
    );
    // The answer that continued it still holds the whole conversation, and is continued.
    let r = send(&gw, KEY, get.clone(), &format!("{items}?order=asc"), None)
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        listed,
        "after the first went"
    );
    let body = format!(r#"{{"model":"m","input":"more","previous_response_id":"{second_id}"}}"#);
    let third: Value = send(&gw, KEY, post.clone(), "/v1/responses", Some(&body))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(tokens(&third) > tokens(&second), "{second}\n{third}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `item_reference` inputs: a tenant's stored items (an answer's output, its input) stand
/// in a new request's input, and in a conversation's items, as copies with ids of their
/// own; an id the tenant has no item under is a 400 naming the reference. Without a store
/// they are refused.
#[tokio::test]
async fn item_references_stand_for_the_tenants_stored_items() {
    let (dir, stored) = response_store("item-refs");
    let gw = Gateway::start(&(config(FAST_SIM, &other_tenant(), "") + &stored));
    let (get, post) = (reqwest::Method::GET, reqwest::Method::POST);
    let ask = |body: Value| call_json(&gw, KEY, post.clone(), "/v1/responses", Some(body));
    let first = ask(serde_json::json!({"model": "m", "input": "hello there"})).await;
    let out = &first["output"][0];
    let out_id = out["id"].as_str().expect("an output id");
    let answer = out["content"][0]["text"].as_str().expect("text");
    let items = |id: &Value| {
        format!(
            "/v1/responses/{}/input_items?order=asc",
            id.as_str().expect("an id")
        )
    };
    let inputs = call_json(&gw, KEY, get.clone(), &items(&first["id"]), None).await;
    let in_id = inputs["data"][0]["id"].as_str().expect("an input id");

    // Both items referenced (typed, and as a bare id), then a new turn.
    let body = serde_json::json!({"model": "m", "input": [
        {"type": "item_reference", "id": in_id}, {"id": out_id},
        {"role": "user", "content": "and again"}]});
    let second = ask(body.clone()).await;
    // Counted ahead the same way.
    let path = "/v1/responses/input_tokens";
    let counted = call_json(&gw, KEY, post.clone(), path, Some(body.clone())).await;
    assert_eq!(
        counted["input_tokens"], second["usage"]["input_tokens"],
        "{counted}"
    );
    let tokens = |v: &Value, k: &str| v["usage"][k].as_u64().expect("usage");
    assert!(
        tokens(&second, "input_tokens")
            > tokens(&first, "input_tokens") + tokens(&first, "output_tokens"),
        "the referenced items are in the prompt: {first}\n{second}"
    );
    let listed = call_json(&gw, KEY, get.clone(), &items(&second["id"]), None).await;
    let data = listed["data"].as_array().expect("data");
    let said: Vec<(&str, &str)> = data
        .iter()
        .map(|i| {
            (
                i["role"].as_str().expect("role"),
                i["content"][0]["text"].as_str().expect("text"),
            )
        })
        .collect();
    assert_eq!(
        said,
        [
            ("user", "hello there"),
            ("assistant", answer),
            ("user", "and again")
        ]
    );
    assert!(
        data[0]["id"] != in_id && data[1]["id"] != out_id,
        "copies: {listed}"
    );

    // Another tenant's item, and no item at all: 400s naming the reference.
    for (key, id) in [(OTHER, out_id), (KEY, "msg_nothing")] {
        let body = serde_json::json!({"model": "m", "input": [
            {"role": "user", "content": "x"}, {"type": "item_reference", "id": id}]});
        let r = call(&gw, key, post.clone(), "/v1/responses", Some(body))
            .await
            .expect("sent");
        assert_eq!(r.status(), 400, "{key} {id}");
        let e: Value = r.json().await.expect("JSON");
        assert_eq!(e["error"]["param"], "input[1].id", "{e}");
        assert_eq!(e["error"]["code"], "item_not_found", "{e}");
    }

    // A conversation made of a referenced item.
    let made = serde_json::json!({"items": [{"type": "item_reference", "id": out_id}]});
    let conv = call_json(&gw, KEY, post.clone(), "/v1/conversations", Some(made)).await;
    let path = format!(
        "/v1/conversations/{}/items",
        conv["id"].as_str().expect("id")
    );
    let items = call_json(&gw, KEY, get, &path, None).await;
    assert_eq!(items["data"][0]["content"][0]["text"], answer, "{items}");
    assert_eq!(items["data"][0]["role"], "assistant");
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);

    // Without a store: refused, naming the item.
    let gw = Gateway::start(&config(FAST_SIM, "", ""));
    let r = common::post(&gw, "/v1/responses", &body.to_string()).await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.expect("JSON");
    assert_eq!(e["error"]["param"], "input[0]", "{e}");
}

/// A tenant at its storage quota (`max_stored_mib`) is refused what would store more
/// (403 `storage_quota_exceeded`: answers, conversations, items) but not what stores
/// nothing; deleting makes room again; other tenants are not held to its quota.
#[tokio::test]
async fn a_tenant_at_its_storage_quota_stores_no_more() {
    let (dir, stored) = response_store("quota");
    // About 500 bytes: one answer takes it past.
    let other = other_tenant() + "max_stored_mib = 0.0005\n";
    let gw = Gateway::start(&(config(FAST_SIM, &other, ADMIN_SERVER) + &stored));
    let post = reqwest::Method::POST;
    let status = async |key: &str, path: &str, body: Value| {
        let r = call(&gw, key, post.clone(), path, Some(body))
            .await
            .expect("sent");
        (r.status(), r.json::<Value>().await.expect("JSON"))
    };
    let ask = |store: bool| serde_json::json!({"model": "m", "input": "hello", "store": store});
    let (code, first) = status(OTHER, "/v1/responses", ask(true)).await;
    assert_eq!(code, 200, "under its quota");
    for (path, body) in [
        ("/v1/responses", ask(true)),
        ("/v1/conversations", serde_json::json!({})),
    ] {
        let (code, e) = status(OTHER, path, body).await;
        assert_eq!(code, 403, "{path}");
        assert_eq!(e["error"]["code"], "storage_quota_exceeded", "{e}");
        let message = e["error"]["message"].as_str().expect("a message");
        assert!(message.contains("quota of 524 bytes"), "{e}");
    }
    let (code, _) = status(OTHER, "/v1/responses", ask(false)).await;
    assert_eq!(code, 200, "storing nothing is not held to the quota");
    let (code, _) = status(KEY, "/v1/responses", ask(true)).await;
    assert_eq!(code, 200, "another tenant's quota is its own");
    // The operator sees it at its quota.
    let stored = get_json(gw.admin_url("/admin/stored"), ADMIN_TOKEN).await;
    let at = stored["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .find(|t| t["tenant"] == "other")
        .expect("other's");
    assert_eq!(at["quota_bytes"], 524, "{stored}");
    assert!(
        at["held_bytes"].as_u64() >= Some(524) && at["held_bytes"] == at["bytes"],
        "{stored}"
    );
    // Deleted: room again.
    let path = format!("/v1/responses/{}", first["id"].as_str().expect("an id"));
    let r = call(&gw, OTHER, reqwest::Method::DELETE, &path, None)
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let (code, _) = status(OTHER, "/v1/conversations", serde_json::json!({})).await;
    assert_eq!(code, 200);
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Conversations API (`[responses] store = true`): a conversation is its tenant's;
/// a response in it, streamed, reads its items first and adds its input and output; its
/// items survive the gateway being killed and started again.
#[tokio::test]
async fn conversations_are_their_tenants_and_answers_add_to_them() {
    let (dir, stored) = response_store("conv");
    let cfg = config(FAST_SIM, &other_tenant(), ADMIN_SERVER) + &stored;
    let c = client();
    let (get, post) = (reqwest::Method::GET, reqwest::Method::POST);
    let mut gw = Gateway::start(&cfg);
    let conv: Value = call(
        &gw,
        KEY,
        post.clone(),
        "/v1/conversations",
        Some(serde_json::json!({"items": [{"role": "user", "content": "I am Ada."}]})),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let id = conv["id"].as_str().expect("an id").to_string();
    assert_eq!(conv["object"], "conversation", "{conv}");
    let path = format!("/v1/conversations/{id}");
    let items = format!("{path}/items?order=asc");
    for (key, status) in [(KEY, 200), (OTHER, 404)] {
        let r = call(&gw, key, get.clone(), &path, None).await.unwrap();
        assert_eq!(r.status(), status, "{key}");
        let r = call(&gw, key, get.clone(), &items, None).await.unwrap();
        assert_eq!(r.status(), status, "{key}");
    }
    // Another tenant's response cannot be in it.
    let ask = serde_json::json!({"model": "m", "input": "Who am I?", "conversation": id,
                                 "stream": true, "max_output_tokens": 4});
    let r = call(&gw, OTHER, post.clone(), "/v1/responses", Some(ask.clone()))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Streamed in it: the answer's events, then its input and output are its items.
    let r = call(&gw, KEY, post.clone(), "/v1/responses", Some(ask))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let events = r.text().await.unwrap();
    let done = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|e| e["type"] == "response.completed" || e["type"] == "response.incomplete")
        .expect("a last event");
    let answer = &done["response"];
    assert_eq!(answer["conversation"]["id"], id.as_str(), "{answer}");
    let listed: Value = call(&gw, KEY, get.clone(), &items, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let data = listed["data"].as_array().expect("data");
    let roles: Vec<&str> = data.iter().filter_map(|i| i["role"].as_str()).collect();
    assert_eq!(roles, ["user", "user", "assistant"], "{listed}");
    assert_eq!(data[2]["id"], answer["output"][0]["id"]);
    assert_eq!(
        data[2]["content"][0]["text"],
        answer["output"][0]["content"][0]["text"]
    );
    // Killed and started again: the same items.
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    drop(gw);
    let gw = Gateway::start(&cfg);
    let again: Value = call(&gw, KEY, get.clone(), &items, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again, listed);
    // A second answer in it (it continues the first): its input items are the
    // conversation's items before it, then its input.
    let ask = serde_json::json!({"model": "m", "input": "And now?", "conversation": id,
                                 "max_output_tokens": 4});
    let second: Value = call(&gw, KEY, post.clone(), "/v1/responses", Some(ask))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let second_items = format!(
        "/v1/responses/{}/input_items?order=asc",
        second["id"].as_str().expect("an id")
    );
    let given: Value = call(&gw, KEY, get.clone(), &second_items, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let given = given["data"].as_array().expect("data");
    assert_eq!(&given[..3], &data[..], "{given:?}");
    assert_eq!(given[3]["content"][0]["text"], "And now?");
    assert_eq!(given.len(), 4);
    let r = call(&gw, OTHER, reqwest::Method::DELETE, &path, None)
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // The operator sees what each tenant stores, and deletes all of one tenant's.
    let admin = |method: reqwest::Method, path: &str| {
        c.request(method, gw.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
            .send()
    };
    let stored: Value = admin(get.clone(), "/admin/stored")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let demo = &stored["tenants"][0];
    assert_eq!(
        (
            &demo["tenant"],
            &demo["answers"],
            &demo["conversations"],
            &demo["conversation_items"]
        ),
        (
            &Value::from("demo"),
            &Value::from(2),
            &Value::from(1),
            &Value::from(5)
        ),
        "{stored}"
    );
    let r = admin(reqwest::Method::DELETE, "/admin/stored/demo")
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["deleted"],
        serde_json::json!({"answers": 2, "conversations": 1}),
        "{v}"
    );
    let r = call(&gw, KEY, get.clone(), &path, None).await.unwrap();
    assert_eq!(r.status(), 404);
    let r = call(&gw, KEY, reqwest::Method::DELETE, &path, None)
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let stored: Value = admin(get, "/admin/stored")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored["tenants"], serde_json::json!([]), "{stored}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Background responses (`background: true`, with the store): answered at once
/// `in_progress`, run to the end apart from the client (polled with `GET`), cancelled
/// with `POST …/cancel` (the worker's sequence stops; the answer stays `cancelled`);
/// streamed, it runs on when its client drops the stream, whose events are followed
/// again with `GET …?stream=true&starting_after=N`; refused with `store: false`.
#[tokio::test]
async fn background_responses_run_apart_and_can_be_cancelled() {
    let (dir, stored) = response_store("bg");
    let cfg = config(SLOW_SIM, "", "") + &stored;
    let gw = Gateway::start(&cfg);
    let c = client();
    let post =
        |path: String, body: Value| c.post(gw.url(&path)).bearer_auth(KEY).json(&body).send();
    let get = |path: String| c.get(gw.url(&path)).bearer_auth(KEY).send();
    let ask = |tokens: u32| {
        serde_json::json!({"model": "m", "input": "hi", "background": true,
                           "max_output_tokens": tokens})
    };
    // Polled until it is no longer in progress (2 s at most).
    let ended = |id: String| async move {
        let mut done = Value::Null;
        for _ in 0..200 {
            done = get(format!("/v1/responses/{id}"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if done["status"] != "in_progress" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        done
    };
    let started = std::time::Instant::now();
    let r = post("/v1/responses".into(), ask(5)).await.unwrap();
    assert_eq!(r.status(), 200);
    let first: Value = r.json().await.unwrap();
    assert_eq!(
        (first["status"].as_str(), first["background"].as_bool()),
        (Some("in_progress"), Some(true)),
        "{first}"
    );
    let id = first["id"].as_str().expect("an id").to_string();
    let input_ids = |id: String| async move {
        let listed: Value = get(format!("/v1/responses/{id}/input_items"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        listed["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|i| i["id"].clone())
            .collect::<Vec<_>>()
    };
    let while_running = input_ids(id.clone()).await;
    let done = ended(id.clone()).await;
    assert_eq!(done["status"], "incomplete", "{done}");
    assert_eq!(
        input_ids(id.clone()).await,
        while_running,
        "its input's ids, start to end"
    );
    assert_eq!(done["usage"]["output_tokens"], 5, "{done}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(80));
    // A long one, cancelled: stored `cancelled`, and it stays so.
    let long: Value = post("/v1/responses".into(), ask(400))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = long["id"].as_str().expect("an id").to_string();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let r = post(format!("/v1/responses/{id}/cancel"), Value::Null)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cancelled: Value = r.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let again: Value = get(format!("/v1/responses/{id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["status"], "cancelled", "{again}");
    // Its request is over (not served on to its 400 tokens).
    let m = gw.metrics().await;
    let inflight = r#"tollgate_in_flight_requests{tenant="demo",model="m"}"#;
    assert_eq!(metric(&m, inflight), Some(0.0), "{m}");
    assert_eq!(
        metric(&m, "tollgate_background_responses_running"),
        Some(0.0)
    );
    // Stored: the first answer as it started and as it ended, the second as it started,
    // and cancelled.
    let ok = metric(&m, r#"tollgate_stored_answers_total{result="ok"}"#);
    assert_eq!(ok, Some(4.0), "{m}");
    // Cancelling again answers it as it is; a response that is not a background one is
    // refused.
    let r = post(format!("/v1/responses/{id}/cancel"), Value::Null)
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "cancelled", "{v}");
    // Refused: not stored.
    let mut body = ask(5);
    body["store"] = Value::Bool(false);
    let r = post("/v1/responses".into(), body).await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "store", "{v}");
    // Streamed: the client drops its stream after two events; the answer runs on, and
    // its events are followed again from where the client left them.
    let mut body = ask(8);
    body["stream"] = Value::Bool(true);
    let r = post("/v1/responses".into(), body).await.unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut got = Vec::new();
    while got.windows(2).filter(|w| w == b"\n\n").count() < 2 {
        got.extend_from_slice(&stream.next().await.expect("more events").expect("bytes"));
    }
    drop(stream);
    let data = |text: &str| -> Vec<Value> {
        text.split("\n\n")
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .map(|d| serde_json::from_str(d).expect("JSON"))
            .collect()
    };
    let first = &data(&String::from_utf8_lossy(&got))[0];
    assert_eq!(first["type"], "response.created", "{first}");
    assert_eq!(first["sequence_number"], 0);
    let id = first["response"]["id"].as_str().expect("an id").to_string();
    let done = ended(id.clone()).await;
    assert_eq!(
        (&done["status"], &done["usage"]["output_tokens"]),
        (&Value::from("incomplete"), &Value::from(8)),
        "run to its end without its client: {done}"
    );
    let r = get(format!("/v1/responses/{id}?stream=true&starting_after=1"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rest = data(&r.text().await.unwrap());
    let numbers: Vec<u64> = rest
        .iter()
        .filter_map(|e| e["sequence_number"].as_u64())
        .collect();
    assert_eq!(numbers, (2..2 + rest.len() as u64).collect::<Vec<_>>());
    let last = rest.last().expect("events");
    assert_eq!(last["type"], "response.incomplete", "{last}");
    assert_eq!(last["response"], done);
    let r = get(format!("/v1/responses/{id}?stream=maybe"))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Deleted while it runs: stopped, and its end does not store it again.
    let running: Value = post("/v1/responses".into(), ask(12))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let path = format!("/v1/responses/{}", running["id"].as_str().expect("an id"));
    let r = c
        .delete(gw.url(&path))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(
        get(path.clone()).await.unwrap().status(),
        404,
        "stays deleted"
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_background_responses_running"),
        Some(0.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A background response cut off by a crash (kill -9) is stored `failed` when the gateway
/// starts again, not left `in_progress` for ever.
#[tokio::test]
async fn a_background_response_cut_off_by_a_crash_is_stored_failed() {
    let (dir, stored) = response_store("crash");
    let cfg = config(SLOW_SIM, "", "") + &stored;
    let mut gw = Gateway::start(&cfg);
    let body = r#"{"model":"m","input":"hi","background":true,"max_output_tokens":400}"#;
    let started: Value = post(&gw, "/v1/responses", body).await.json().await.unwrap();
    assert_eq!(started["status"], "in_progress", "{started}");
    gw.child.kill().unwrap();
    gw.child.wait().unwrap();
    drop(gw);
    let gw = Gateway::start(&cfg);
    let path = format!("/v1/responses/{}", started["id"].as_str().unwrap());
    let r = client()
        .get(gw.url(&path))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["error"]["code"], "server_error", "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bodies of 64 KiB or more are parsed on the runtime's blocking threads: the answers are
/// those of a small body (a conversation of 1,000 items made and paged, a large response
/// input answered, large bad JSON refused alike).
#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_are_answered_as_small_ones() {
    let (dir, stored) = response_store("large-bodies");
    let cfg = config(FAST_SIM, "", "").replace("max_body_bytes = 4096", "max_body_bytes = 1048576");
    let gw = Gateway::start(&(cfg + &stored));
    let items: Vec<Value> = (0..1000)
        .map(|i| serde_json::json!({"role": "user", "content": format!("message {i} of a long, long conversation")}))
        .collect();
    let body = serde_json::json!({ "items": items }).to_string();
    assert!(body.len() >= 64 << 10, "{} bytes", body.len());
    let conv = post_json(&gw, "/v1/conversations", &body).await;
    let id = conv["id"]
        .as_str()
        .unwrap_or_else(|| panic!("a conversation: {conv}"));
    let mut seen = 0;
    let mut after = String::new();
    loop {
        let url = gw.url(&format!(
            "/v1/conversations/{id}/items?order=asc&limit=100{after}"
        ));
        let page = get_json(url, KEY).await;
        let data = page["data"].as_array().expect("data");
        assert_eq!(
            data[0]["content"][0]["text"],
            format!("message {seen} of a long, long conversation")
        );
        seen += data.len();
        if page["has_more"] != true {
            break;
        }
        after = format!("&after={}", page["last_id"].as_str().expect("last id"));
    }
    assert_eq!(seen, 1000);
    let long = "word ".repeat(20_000);
    let answer = post_json(
        &gw,
        "/v1/responses",
        &serde_json::json!({"model": "m", "input": long, "max_output_tokens": 4}).to_string(),
    )
    .await;
    assert_eq!(answer["object"], "response", "{answer}");
    for path in ["/v1/chat/completions", "/v1/responses", "/v1/conversations"] {
        let bad = format!("{{\"model\": \"m\", \"input\": \"{}", "x".repeat(70_000));
        let r = post(&gw, path, &bad).await;
        assert_eq!(r.status(), 400, "{path}");
        let e: Value = r.json().await.expect("JSON");
        assert!(
            e["error"]["message"]
                .as_str()
                .expect("message")
                .contains("JSON"),
            "{path}: {e}"
        );
    }
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}
