//! Routing to workers over HTTP against the real binary: OpenAI-compatible upstreams,
//! failures mid-stream, retries before the first byte, cancellation, ejection, big pools.

use crate::common;
use common::*;
use loadtest::stub::StubArgs;
use serde_json::Value;
use std::time::Duration;

const STREAM: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#;

#[tokio::test(flavor = "multi_thread")]
async fn openai_upstream_non_streamed_and_streamed_with_upstream_usage() {
    let stub = Stub::start(StubArgs {
        tokens: 6,
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(&config(&stub.worker(), "", ""));
    let v: Value = post(
        &gw,
        "/v1/chat/completions",
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "tok tok tok tok tok tok"
    );
    assert_eq!(
        v["usage"]["prompt_tokens"], 7,
        "usage comes from the upstream"
    );
    assert_eq!(v["usage"]["completion_tokens"], 6);
    let events = sse_events(post(&gw, "/v1/chat/completions", STREAM).await).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"], 7);
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    let v: Value = post(
        &gw,
        "/v1/completions",
        r#"{"model":"m","prompt":"x","max_tokens":2}"#,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["choices"][0]["text"], "tok tok");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // The Responses API, asked of the upstream as the chat request it means.
    let v: Value = post(
        &gw,
        "/v1/responses",
        r#"{"model":"m","input":"hi","max_output_tokens":3,"metadata":{"k":"v"}}"#,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "incomplete", "{v}");
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(v["output"][0]["content"][0]["text"], "tok tok tok");
    assert_eq!(
        v["usage"]["input_tokens"], 7,
        "usage comes from the upstream"
    );
    assert_eq!(v["usage"]["output_tokens"], 3);
    assert_eq!(v["usage"]["total_tokens"], 10);
    assert_eq!(v["metadata"]["k"], "v");
}

/// Embeddings asked of an OpenAI-compatible upstream (as JSON numbers here; as base64 by
/// default, below): its vectors (as it sent them) in input order, its token counts. Text
/// and token ids go in separate calls.
#[tokio::test(flavor = "multi_thread")]
async fn embeddings_from_an_openai_upstream() {
    let stub = Stub::start(StubArgs::default()).await;
    let worker = stub.worker_with(r#"embed_encoding = "float""#);
    let gw = Gateway::start(&config(&worker, "", ""));
    let v = post_json(
        &gw,
        "/v1/embeddings",
        r#"{"model":"m","input":["a",[1,2,3]]}"#,
    )
    .await;
    assert_eq!(
        v["data"][0]["embedding"],
        serde_json::json!([0.0, 1.0, 0.0, 0.0]),
        "{v}"
    );
    assert_eq!(
        v["data"][1]["embedding"],
        serde_json::json!([0.0, 1.0, 0.0, 0.0])
    );
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(
        v["usage"]["prompt_tokens"], 14,
        "each input's count, from the upstream"
    );
}

/// An OpenAI-compatible upstream is sent a request's embeddings inputs `embed_batch` at a
/// time (one call each), text and token ids apart, and its vectors come back in input
/// order (the stub lists them last first, each with its index).
#[tokio::test(flavor = "multi_thread")]
async fn embeddings_to_an_openai_upstream_go_in_batches() {
    let stub = Stub::start(StubArgs::default()).await;
    let worker = stub.worker_with("embed_batch = 4");
    let gw = Gateway::start(&config(&worker, "", ""));
    let inputs: Vec<String> = (0..10).map(|i| format!("input {i}")).collect();
    let body = serde_json::json!({"model": "m", "input": inputs}).to_string();
    let v = post_json(&gw, "/v1/embeddings", &body).await;
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 10, "{v}");
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i);
        // Calls of inputs 0–3, 4–7, 8–9: the stub's vector says where in its call.
        assert_eq!(
            d["embedding"],
            serde_json::json!([(i % 4) as f32, 1.0, 0.0, 0.0]),
            "input {i}"
        );
    }
    assert_eq!(v["usage"]["prompt_tokens"], 70, "the upstream's counts");
    assert_eq!(stub.get(&stub.stats.requests), 3, "three upstream calls");
    let v = post_json(
        &gw,
        "/v1/embeddings",
        r#"{"model":"m","input":[[1],[2],[3]]}"#,
    )
    .await;
    let firsts: Vec<&Value> = (0..3).map(|i| &v["data"][i]["embedding"][0]).collect();
    assert_eq!(firsts, [0.0, 1.0, 2.0], "{v}");
    assert_eq!(stub.get(&stub.stats.requests), 4, "token ids: one call");
    // `dimensions` is the upstream's to honour.
    let v = post_json(
        &gw,
        "/v1/embeddings",
        r#"{"model":"m","input":["a","b"],"dimensions":2}"#,
    )
    .await;
    assert_eq!(
        v["data"][1]["embedding"],
        serde_json::json!([1.0, 1.0]),
        "{v}"
    );
}

/// Streams `body` to `path` from a slow upstream killed after the first token: what the
/// client got, and the gateway's metrics after.
async fn killed_mid_stream(path: &str, body: &str) -> (String, String) {
    let stub = Stub::start(StubArgs {
        tokens: 1000,
        token_delay_ms: 20,
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(&config(&stub.worker(), "", ""));
    let mut r = post(&gw, path, body).await;
    assert_eq!(r.status(), 200);
    let mut seen = String::new();
    while !seen.contains("tok") {
        seen.push_str(&String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()));
    }
    stub.kill();
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(c)) = r.chunk().await {
            seen.push_str(&String::from_utf8_lossy(&c));
        }
    })
    .await;
    assert!(rest.is_ok(), "stream hung after the worker died");
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"tollgate_requests_total{tenant="demo",model="m",status="stream_error"}"#
        ),
        Some(1.0)
    );
    (seen, m)
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_killed_mid_stream_ends_the_stream_with_an_error_event() {
    let (seen, _) = killed_mid_stream("/v1/chat/completions", STREAM).await;
    let last = seen.trim_end().rsplit("\n\n").next().unwrap();
    let v: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(v["error"]["type"], "server_error", "{seen}");
    assert!(!seen.contains("[DONE]"));
}

/// The Responses API: an `error` event, then `response.failed` with what was written.
#[tokio::test(flavor = "multi_thread")]
async fn worker_killed_mid_response_ends_with_error_and_response_failed() {
    let body = r#"{"model":"m","input":"hi","stream":true}"#;
    let (seen, _) = killed_mid_stream("/v1/responses", body).await;
    let events: Vec<(&str, Value)> = seen
        .trim_end()
        .split("\n\n")
        .map(|e| {
            let (kind, data) = e
                .strip_prefix("event: ")
                .and_then(|e| e.split_once("\ndata: "))
                .unwrap_or_else(|| panic!("not an event: {e:?}"));
            (kind, serde_json::from_str(data).unwrap())
        })
        .collect();
    let n = events.len();
    assert_eq!(events[n - 2].0, "error", "{seen}");
    assert_eq!(events[n - 2].1["code"], "upstream_error", "{seen}");
    let (kind, last) = &events[n - 1];
    assert_eq!(*kind, "response.failed");
    assert_eq!(last["response"]["status"], "failed");
    assert_eq!(last["response"]["error"]["code"], "upstream_error");
    let written = last["response"]["output"][0]["content"][0]["text"]
        .as_str()
        .unwrap();
    assert!(written.starts_with("tok"), "{last}");
    for (i, (kind, v)) in events.iter().enumerate() {
        assert_eq!(v["type"], *kind);
        assert_eq!(v["sequence_number"], i, "{kind}");
    }
    assert!(!seen.contains("[DONE]"));
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_on_another_worker_before_the_first_byte() {
    let bad = Stub::start(StubArgs {
        fail_status: Some(503),
        ..Default::default()
    })
    .await;
    let good = Stub::start(StubArgs::default()).await;
    // A dead port too: connection refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let workers = format!(
        r#"{}, {{ kind = "openai", url = "http://{dead}" }}, {}"#,
        bad.worker(),
        good.worker()
    );
    // Breakers that never open, so every request may meet a failing worker first.
    let cfg = config(&workers, "", "max_retries = 2").replace(
        "health_interval_secs = 0.2",
        "health_interval_secs = 3600.0\nbreaker_failures = 1000000",
    );
    let gw = Gateway::start(&cfg);
    for i in 0..30 {
        let body = if i % 2 == 0 {
            STREAM
        } else {
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#
        };
        let r = post(&gw, "/v1/chat/completions", body).await;
        assert_eq!(r.status(), 200, "request {i}");
        let text = r.text().await.unwrap();
        assert!(text.contains("tok"), "{text}");
    }
    assert!(
        bad.get(&bad.stats.requests) > 0,
        "the failing worker was tried"
    );
    assert_eq!(
        good.get(&good.stats.requests),
        30,
        "every request ended on the good worker"
    );
    // With no healthy worker left and retries spent: 502 in the OpenAI shape.
    let cfg = config(&bad.worker(), "", "max_retries = 1");
    let gw = Gateway::start(&cfg);
    let r = post(&gw, "/v1/chat/completions", STREAM).await;
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_error");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_disconnect_cancels_the_upstream_and_frees_the_slot() {
    let stub = Stub::start(StubArgs {
        tokens: 1000,
        token_delay_ms: 20,
        ..Default::default()
    })
    .await;
    let gw = Gateway::start(&config(&stub.worker(), "", ""));
    let mut r = post(&gw, "/v1/chat/completions", STREAM).await;
    r.chunk().await.unwrap().unwrap();
    assert_eq!(stub.get(&stub.stats.active), 1);
    drop(r);
    assert!(
        eventually(Duration::from_secs(5), async || stub
            .get(&stub.stats.cancelled)
            == 1
            && stub.get(&stub.stats.active) == 0)
        .await,
        "upstream never saw the cancel"
    );
    let worker = format!(
        r#"tollgate_worker_in_flight{{pool="p",worker="p/0-http://{}"}}"#,
        stub.addr
    );
    assert!(
        eventually(Duration::from_secs(5), async || {
            let m = gw.metrics().await;
            metric(&m, &worker) == Some(0.0)
                && metric(
                    &m,
                    r#"tollgate_requests_total{tenant="demo",model="m",status="cancelled"}"#,
                ) == Some(1.0)
        })
        .await
    );
    // The same holds for the simulated worker: its batch slot is freed.
    let slow = r#"{ kind = "sim", decode_step_ms = 20.0, min_output_tokens = 500, max_output_tokens = 500, max_batch = 1 }"#;
    let gw = Gateway::start(&config(slow, "", ""));
    let body = r#"{"model":"m","prompt":"x","max_tokens":500,"stream":true}"#;
    let mut r = post(&gw, "/v1/completions", body).await;
    r.chunk().await.unwrap().unwrap();
    drop(r);
    // max_batch = 1: a second request can only start once the first left the batch.
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        post(
            &gw,
            "/v1/completions",
            r#"{"model":"m","prompt":"x","max_tokens":2}"#,
        ),
    )
    .await;
    assert_eq!(r.expect("batch slot was never freed").status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_worker_is_ejected_by_its_breaker_and_health_probes() {
    let bad = Stub::start(StubArgs {
        fail_status: Some(500),
        ..Default::default()
    })
    .await;
    let good = Stub::start(StubArgs::default()).await;
    let workers = format!("{}, {}", bad.worker(), good.worker());
    let cfg = config(&workers, "", "").replace(
        "health_interval_secs = 0.2",
        "health_interval_secs = 3600.0\nbreaker_failures = 2\nbreaker_cooldown_secs = 3600.0",
    );
    let gw = Gateway::start(&cfg);
    for _ in 0..20 {
        assert_eq!(
            post(&gw, "/v1/chat/completions", STREAM).await.status(),
            200
        );
    }
    assert_eq!(
        bad.get(&bad.stats.requests),
        2,
        "after 2 failures the breaker keeps it out"
    );
    let m = gw.metrics().await;
    let open = format!(
        r#"tollgate_worker_breaker_open{{pool="p",worker="p/0-http://{}"}}"#,
        bad.addr
    );
    assert_eq!(metric(&m, &open), Some(1.0));

    // Active probes: a worker that stops answering is taken out; /ready follows.
    let gw = Gateway::start(&config(&good.worker(), "", ""));
    assert_eq!(
        client()
            .get(gw.url("/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    good.kill();
    assert!(
        eventually(Duration::from_secs(5), async || client()
            .get(gw.url("/ready"))
            .send()
            .await
            .unwrap()
            .status()
            == 503)
        .await
    );
    let r = post(&gw, "/v1/chat/completions", STREAM).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
}

#[tokio::test(flavor = "multi_thread")]
async fn per_worker_concurrency_cap_then_503() {
    let slow = r#"{ kind = "sim", decode_step_ms = 50.0, min_output_tokens = 40, max_output_tokens = 40, max_concurrency = 1 }"#;
    let gw = Gateway::start(&config(&format!("{slow}, {slow}"), "", ""));
    let body = r#"{"model":"m","prompt":"x","max_tokens":40,"stream":true}"#;
    let a = post(&gw, "/v1/completions", body).await;
    let b = post(&gw, "/v1/completions", body).await;
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"tollgate_worker_in_flight{pool="p",worker="p/0-sim"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"tollgate_worker_in_flight{pool="p",worker="p/1-sim"}"#
        ),
        Some(1.0)
    );
    let r = post(&gw, "/v1/completions", body).await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "overloaded");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_of_ten_thousand_simulated_workers() {
    let many = r#"{ kind = "sim", count = 10000, prefill_tokens_per_s = 0.0, decode_step_ms = 0.0, decode_step_ms_per_seq = 0.0, min_output_tokens = 4, max_output_tokens = 4 }"#;
    let gw = Gateway::start(
        &config(many, "", "").replace("health_interval_secs = 0.2", "health_interval_secs = 1.0"),
    );
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let url = gw.url("/v1/completions");
        tasks.push(tokio::spawn(async move {
            client()
                .post(url)
                .bearer_auth(KEY)
                .body(r#"{"model":"m","prompt":"x"}"#)
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    eprintln!(
        "200 requests over 10,000 workers in {:?}",
        started.elapsed()
    );
    let m = gw.metrics().await;
    assert_eq!(m.matches("tollgate_worker_healthy{").count(), 10_000);
}
