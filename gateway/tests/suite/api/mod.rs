//! The tenant API over HTTP against the real binary: responses, streaming, usage, errors,
//! auth, request ids, models, ops endpoints.

use crate::common::{self, *};
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

// The APIs with more cases than fit here, a file each.
mod conversations;
mod embeddings;
mod responses;
