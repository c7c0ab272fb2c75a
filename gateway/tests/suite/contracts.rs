//! Capacity contracts over HTTP: conformance to the purchased rate, honest `retry-after`,
//! rate-limit headers, the concurrency cap, 503 versus 429, requests larger than the burst,
//! best-effort overflow, live reloads (file watch and admin API) under load, and the admin
//! API's auth.
//!
//! Sim workers make token counts exact: a prompt of 12 bytes is 3 tokens, and FAST_SIM
//! answers 8 tokens, so one request costs 3 + 3 × 8 = 27 weighted tokens.

use crate::common;

use common::*;
use futures::future::join_all;
use std::time::{Duration, Instant};

/// A completion of 12 prompt bytes (3 tokens) and 8 output tokens: 27 weighted tokens.
const BODY: &str = r#"{"model":"m","prompt":"hello world!","max_tokens":8}"#;
const STREAM_BODY: &str = r#"{"model":"m","prompt":"hello world!","max_tokens":8,"stream":true,"stream_options":{"include_usage":true}}"#;
const COST: f64 = 27.0;

fn slow_sim(step_ms: u32, cap: u32) -> String {
    format!(
        r#"{{ kind = "sim", prefill_tokens_per_s = 0.0, decode_step_ms = {step_ms}.0, decode_step_ms_per_seq = 0.0, min_output_tokens = 8, max_output_tokens = 8, max_concurrency = {cap} }}"#
    )
}

/// Posts `body` as the demo tenant in a task of its own.
fn spawn_post(url: String, body: &'static str) -> tokio::task::JoinHandle<reqwest::Response> {
    tokio::spawn(async move {
        client()
            .post(url)
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    })
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

fn header_f64(r: &reqwest::Response, name: &str) -> f64 {
    header(r, name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .parse()
        .unwrap()
}

/// Weighted tokens of a whole JSON answer.
async fn weighted(r: reqwest::Response) -> f64 {
    let v: serde_json::Value = r.json().await.unwrap();
    let u = &v["usage"];
    u["prompt_tokens"].as_f64().unwrap() + 3.0 * u["completion_tokens"].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_three_times_the_contract_for_20s() {
    // 500 weighted tokens/s, 2 s burst (1,000). Offered 3x: 1,500 tokens/s.
    let gw = Gateway::start(&config(
        FAST_SIM,
        "tokens_per_second = 500.0\nburst_seconds = 2.0",
        "",
    ));
    let per_request = Duration::from_secs_f64(COST / 1500.0);
    let duration = Duration::from_secs(20);
    let mut tick = tokio::time::interval(per_request);
    let start = Instant::now();
    let mut tasks = Vec::new();
    while start.elapsed() < duration {
        tick.tick().await;
        let sent = Instant::now();
        let request = spawn_post(gw.url("/v1/completions"), BODY);
        tasks.push(tokio::spawn(async move {
            let r = request.await.expect("request task");
            let status = r.status().as_u16();
            assert!(status == 200 || status == 429, "only 200 and 429: {status}");
            let weighted = if status == 200 {
                weighted(r).await
            } else {
                0.0
            };
            Offered {
                admitted: status == 200,
                weighted,
                sent,
                done: Instant::now(),
            }
        }));
    }
    let window = start.elapsed().as_secs_f64();
    let offered: Vec<Offered> = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("request task"))
        .collect();
    let admitted: f64 = offered.iter().map(|o| o.weighted).sum();
    let ok = offered.iter().filter(|o| o.admitted).count();
    // The bucket admits its burst plus the rate over the span it was drawn on: never more,
    // and (offered 3x) within 2% of it.
    let (least, most) = admission_bounds(500.0, 1000.0, COST, &offered);
    eprintln!(
        "offered {} requests over {window:.2}s; admitted {ok} ({admitted} weighted tokens), bounds [{least:.0}, {most:.0}]",
        offered.len(),
    );
    assert!(
        admitted <= most,
        "admitted {admitted}, more than the bucket allows ({most:.0})"
    );
    assert!(
        admitted >= 0.98 * least,
        "admitted {admitted}, more than 2% under the bucket's {least:.0}"
    );
    // The gateway's own books agree with what the client saw.
    let m = gw.metrics().await;
    let charged = metric(
        &m,
        "tollgate_weighted_tokens_total{tenant=\"demo\",model=\"m\"}",
    )
    .unwrap();
    assert_eq!(charged, admitted);
}

#[tokio::test]
async fn retry_after_is_honest_and_headers_describe_the_bucket() {
    // 10 tokens/s, 4 s burst = 40 tokens: one request (27) fits, then 13 remain.
    let gw = Gateway::start(&config(
        FAST_SIM,
        "tokens_per_second = 10.0\nburst_seconds = 4.0\nrequests_per_minute = 600",
        "",
    ));
    let r = post(&gw, "/v1/completions", BODY).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("40"));
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), Some("13"));
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("40"));
    assert_eq!(
        header(&r, "ratelimit-policy"),
        Some("\"requests\";q=40;w=4, \"tokens\";q=40;w=4")
    );
    assert!(header(&r, "ratelimit")
        .unwrap()
        .contains("\"tokens\";r=13;t=3"));
    assert!(header(&r, "x-ratelimit-reset-tokens")
        .unwrap()
        .ends_with('s'));

    let r = post(&gw, "/v1/completions", BODY).await;
    assert_eq!(r.status(), 429);
    let wait_ms = header_f64(&r, "retry-after-ms");
    // 14 tokens short at 10/s: 1.4 s (less what refilled since the first request).
    assert!(
        (700.0..=1400.0).contains(&wait_ms),
        "retry-after-ms {wait_ms}"
    );
    let secs = ((wait_ms / 1000.0).ceil() as u64).to_string();
    assert_eq!(header(&r, "retry-after"), Some(secs.as_str()));
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "rate_limit_error");

    // Early: still refused (and a refusal costs nothing), with the rest of the wait.
    let half = (wait_ms / 2.0) as u64;
    tokio::time::sleep(Duration::from_millis(half)).await;
    let r = post(&gw, "/v1/completions", BODY).await;
    assert_eq!(r.status(), 429);
    let rest = header_f64(&r, "retry-after-ms");
    assert!(
        rest <= wait_ms - half as f64 + 1.0,
        "{rest} after {half} of {wait_ms}"
    );
    let wait_ms = rest;
    // On time: admitted.
    tokio::time::sleep(Duration::from_millis(wait_ms as u64)).await;
    let r = post(&gw, "/v1/completions", BODY).await;
    assert_eq!(r.status(), 200, "a retry at retry-after must be admitted");

    // Headers on every response of the tenant API: a 400 and /v1/models too.
    let r = post(&gw, "/v1/completions", "{").await;
    assert_eq!(r.status(), 400);
    assert!(header(&r, "x-ratelimit-remaining-tokens").is_some());
    let r = client()
        .get(gw.url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert!(header(&r, "ratelimit-policy").is_some());
}

#[tokio::test]
async fn a_request_larger_than_the_burst_is_a_400_not_endless_429s() {
    let gw = Gateway::start(&config(
        FAST_SIM,
        "tokens_per_second = 10.0\nburst_seconds = 10.0",
        "",
    ));
    // 3 + 3 × 40 = 123 > 100.
    let r = post(
        &gw,
        "/v1/completions",
        r#"{"model":"m","prompt":"hello world!","max_tokens":40}"#,
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "request_exceeds_contract");
    assert!(v["error"]["message"].as_str().unwrap().contains("burst"));
    assert_eq!(v["error"]["param"], "max_tokens");
    // And it cost nothing: a request that fits still passes.
    assert_eq!(post(&gw, "/v1/completions", BODY).await.status(), 200);
    // Embeddings: their inputs alone, and the advice is about them (30 inputs of 4
    // tokens: 120 > 100).
    let inputs = vec!["four token input"; 30];
    let body = serde_json::json!({"model": "m", "input": inputs}).to_string();
    let r = post(&gw, "/v1/embeddings", &body).await;
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "request_exceeds_contract");
    assert_eq!(v["error"]["param"], "input", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("fewer or shorter inputs"), "{message}");
    let fits = serde_json::json!({"model": "m", "input": &inputs[..5]}).to_string();
    assert_eq!(post(&gw, "/v1/embeddings", &fits).await.status(), 200);
}

#[tokio::test]
async fn concurrency_cap_answers_429() {
    let gw = Gateway::start(&config(&slow_sim(60, 64), "max_concurrency = 2", ""));
    let all = join_all((0..3).map(|_| post(&gw, "/v1/completions", BODY))).await;
    let mut statuses: Vec<u16> = all.iter().map(|r| r.status().as_u16()).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 429]);
    let refused = all.into_iter().find(|r| r.status() == 429).unwrap();
    assert!(header(&refused, "retry-after").is_some());
    let v: serde_json::Value = refused.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("concurrent"));
}

#[tokio::test]
async fn saturated_fleet_is_503_and_not_charged_while_a_short_wait_is_served() {
    // One worker with room for one request; waits of up to 150 ms; the tenant's bucket
    // barely refills (1 token/s), so any charge would show in its headers.
    let cfg = config(
        &slow_sim(100, 1),
        "tokens_per_second = 1.0\nburst_seconds = 1000.0",
        "queue_depth = 1\nqueue_timeout_secs = 0.15",
    );
    let gw = Gateway::start(&cfg);
    let busy = spawn_post(gw.url("/v1/completions"), BODY);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = post(&gw, "/v1/completions", BODY).await;
    assert_eq!(
        r.status(),
        503,
        "the fleet is saturated, the tenant is within contract"
    );
    assert!(header(&r, "retry-after").is_some());
    // 1000 − 27 held by the request in flight: the refused one was not charged.
    let remaining = header_f64(&r, "x-ratelimit-remaining-tokens");
    assert!(
        (973.0..=976.0).contains(&remaining),
        "remaining {remaining}"
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "overloaded");
    assert_eq!(busy.await.unwrap().status(), 200);

    // With a longer wait allowed, a request queued behind a busy worker is served.
    let gw = Gateway::start(&cfg.replace("queue_timeout_secs = 0.15", "queue_timeout_secs = 5.0"));
    let all = join_all((0..2).map(|_| post(&gw, "/v1/completions", BODY))).await;
    assert!(all.iter().all(|r| r.status() == 200));
}

#[tokio::test]
async fn best_effort_overflow_runs_only_on_idle_capacity() {
    // Contract: 30 tokens (one request). Pool: one worker, cap 2; idle while < 1 in flight.
    let gw = Gateway::start(&config(
        &slow_sim(100, 2),
        "tokens_per_second = 1.0\nburst_seconds = 30.0\noverflow = \"best_effort\"",
        "idle_below = 0.5",
    ));
    // Within contract, and it keeps the pool busy for ~800 ms.
    let first = spawn_post(gw.url("/v1/completions"), BODY);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let r = post(&gw, "/v1/completions", BODY).await;
    assert_eq!(r.status(), 429, "past contract and the pool is busy");
    let first = first.await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(header(&first, "x-tollgate-overflow").is_none());
    // Idle again: past contract, but admitted as best effort, and marked.
    let r = post(&gw, "/v1/completions", BODY).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tollgate-overflow"), Some("best_effort"));
}

async fn admin(gw: &Gateway, method: reqwest::Method, path: &str) -> reqwest::Response {
    client()
        .request(method, gw.admin_url(path))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
}

fn tenant_cfg(rate: f64, extra_tenants: &str) -> String {
    config(
        &slow_sim(20, 256),
        &format!("tokens_per_second = {rate}\nburst_seconds = 1.0\n{extra_tenants}"),
        ADMIN_SERVER,
    )
}

/// Streams one request; `Ok(true)` if admitted and finished with `[DONE]`.
async fn stream_one(url: String, key: &'static str) -> Result<bool, String> {
    let r = client()
        .post(url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(STREAM_BODY)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    match r.status().as_u16() {
        429 => Ok(false),
        200 => {
            let text = r.text().await.map_err(|e| e.to_string())?;
            if text.ends_with("data: [DONE]\n\n") && !text.contains("\"error\"") {
                Ok(true)
            } else {
                Err(format!("stream did not finish cleanly: {text}"))
            }
        }
        s => Err(format!("status {s}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_raises_and_lowers_limits_under_load_without_failing_in_flight() {
    let gw = Gateway::start(&tenant_cfg(200.0, ""));
    let limit = |gw: &Gateway| {
        let url = gw.url("/v1/models");
        async move {
            let r = client().get(url).bearer_auth(KEY).send().await.unwrap();
            header_f64(&r, "x-ratelimit-limit-tokens")
        }
    };
    assert_eq!(limit(&gw).await, 200.0);
    // Load: a stream every 15 ms (~1,800 tokens/s offered), each ~160 ms long.
    let url = gw.url("/v1/completions");
    let load = tokio::spawn(async move {
        let mut tasks = Vec::new();
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(15));
        while start.elapsed() < Duration::from_millis(3000) {
            tick.tick().await;
            tasks.push(tokio::spawn(stream_one(url.clone(), KEY)));
        }
        join_all(tasks).await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Raise through the file watcher.
    gw.write_config(&tenant_cfg(5000.0, ""));
    assert!(
        eventually(Duration::from_secs(5), async || limit(&gw).await == 5000.0).await,
        "the file watcher applied the raised limit"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Lower through the admin API.
    gw.write_config(&tenant_cfg(100.0, ""));
    let r = admin(&gw, reqwest::Method::POST, "/admin/reload").await;
    assert_eq!(r.status(), 200);
    assert!(eventually(Duration::from_secs(5), async || limit(&gw).await == 100.0).await);
    let results = load.await.unwrap();
    let mut admitted = 0;
    for r in results {
        match r.unwrap() {
            Ok(true) => admitted += 1,
            Ok(false) => {}
            Err(e) => panic!("an in-flight request failed across reloads: {e}"),
        }
    }
    assert!(admitted > 20, "admitted {admitted}");
    // The audit log names each applied change.
    let a: serde_json::Value = admin(&gw, reqwest::Method::GET, "/admin/audit")
        .await
        .json()
        .await
        .unwrap();
    let details: Vec<String> = a["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["detail"].as_str().unwrap().to_string())
        .collect();
    assert!(
        details
            .iter()
            .any(|d| d.contains("tokens_per_second Some(200.0) -> Some(5000.0)")),
        "{details:?}"
    );
    assert!(
        details
            .iter()
            .any(|d| d.contains("tokens_per_second Some(5000.0) -> Some(100.0)")),
        "{details:?}"
    );
    let m = gw.metrics().await;
    assert!(metric(&m, "tollgate_config_generation").unwrap() >= 3.0);
}

#[tokio::test]
async fn invalid_reload_is_rejected_whole_and_the_old_config_keeps_serving() {
    let gw = Gateway::start_with_log(&tenant_cfg(1000.0, ""), "info");
    let good = tenant_cfg(1000.0, "");
    // Invalid TOML value: rejected by the admin API with the reason.
    gw.write_config(&good.replace("tokens_per_second = 1000", "tokens_per_second = -5"));
    let r = admin(&gw, reqwest::Method::POST, "/admin/reload").await;
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("tokens_per_second must be > 0"), "{msg}");
    assert!(msg.contains("running config stays"), "{msg}");
    // A change that needs a restart is refused too.
    gw.write_config(&good.replace("decode_step_ms = 20.0", "decode_step_ms = 21.0"));
    let r = admin(&gw, reqwest::Method::POST, "/admin/reload").await;
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("need a restart"));
    // The old config still serves, limits unchanged.
    let r = post(&gw, "/v1/completions", BODY).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("1000"));
    let m = gw.metrics().await;
    assert!(metric(&m, "tollgate_config_reloads_total{result=\"error\"}").unwrap() >= 2.0);
    assert_eq!(metric(&m, "tollgate_config_generation"), Some(1.0));
    assert!(gw.log().contains("config reload rejected"));
    // SIGHUP with a good file applies it.
    gw.write_config(&tenant_cfg(1500.0, ""));
    std::process::Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), async || {
            let r = post(&gw, "/v1/completions", BODY).await;
            header(&r, "x-ratelimit-limit-tokens") == Some("1500")
        })
        .await
    );
}

const OTHER_KEY: &str = "sk-tollgate-other";

fn other_tenant() -> String {
    use sha2::Digest;
    let d = hex::encode(sha2::Sha256::digest(OTHER_KEY.as_bytes()));
    format!("\n[[tenants]]\nid = \"other\"\nkeys_sha256 = [\"{d}\"]\n")
}

#[tokio::test]
async fn removed_tenant_finishes_its_streams_and_then_gets_401() {
    let with_other = config(&slow_sim(100, 64), &other_tenant(), ADMIN_SERVER);
    let gw = Gateway::start(&with_other);
    let url = gw.url("/v1/completions");
    let in_flight = tokio::spawn(stream_one(url.clone(), OTHER_KEY));
    tokio::time::sleep(Duration::from_millis(250)).await;
    gw.write_config(&config(&slow_sim(100, 64), "", ADMIN_SERVER));
    let r = admin(&gw, reqwest::Method::POST, "/admin/reload").await;
    assert_eq!(r.status(), 200);
    let applied: serde_json::Value = r.json().await.unwrap();
    assert!(applied["changes"][0]
        .as_str()
        .unwrap()
        .contains("tenant other removed"));
    assert_eq!(in_flight.await.unwrap(), Ok(true), "its stream finished");
    let r = client()
        .post(url)
        .bearer_auth(OTHER_KEY)
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn admin_api_needs_its_token_and_reports_contracts_and_usage() {
    let cfg = config(
        FAST_SIM,
        "tokens_per_second = 100.0\nmax_concurrency = 4\n[tenants.models.m]\ntokens_per_second = 50.0",
        ADMIN_SERVER,
    );
    let gw = Gateway::start(&cfg);
    for token in [None, Some("wrong"), Some(KEY)] {
        let mut req = client().get(gw.admin_url("/admin/contracts"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        assert_eq!(req.send().await.unwrap().status(), 401, "{token:?}");
    }
    // The tenant API does not serve admin routes.
    assert_eq!(
        client()
            .get(gw.url("/admin/contracts"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let c: serde_json::Value = admin(&gw, reqwest::Method::GET, "/admin/contracts")
        .await
        .json()
        .await
        .unwrap();
    let demo = &c["tenants"][0];
    assert_eq!(demo["contract"]["tokens_per_second"], 100.0);
    assert_eq!(demo["contract"]["burst_seconds"], 10.0);
    // The per-model override keeps the tenant's other fields.
    assert_eq!(demo["models"]["m"]["tokens_per_second"], 50.0);
    assert_eq!(demo["models"]["m"]["max_concurrency"], 4);
    // Requests for `m` use the override's bucket: 50 × 10 = 500 deep.
    let sent = Instant::now();
    let r = post(&gw, "/v1/completions", BODY).await;
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("500"));
    let u: serde_json::Value = admin(&gw, reqwest::Method::GET, "/admin/usage")
        .await
        .json()
        .await
        .unwrap();
    let scopes = u["scopes"].as_array().unwrap();
    let m = scopes.iter().find(|s| s["model"] == "m").unwrap();
    assert_eq!(m["admitted"], 1);
    assert_eq!(m["weighted_tokens_charged"], COST);
    // What is left is the bucket less the charge, plus what 50 tokens/s refilled since the
    // request was sent (a token every 20 ms: a slow machine sees some of it).
    let left = m["tokens_remaining"].as_f64().expect("tokens_remaining");
    let refilled = 50.0 * sent.elapsed().as_secs_f64();
    assert!(
        (500.0 - COST..=500.0 - COST + refilled.ceil()).contains(&left),
        "{left} left: 500 less {COST}, plus up to {refilled} refilled"
    );
}
