//! The Batch API through the real binary: files uploaded, read, listed and deleted; a
//! batch's requests run through the pipeline and their answers in its output and error
//! files; a faulty input file refused with each fault; cancel; a gateway killed or drained
//! mid-batch resumes it at its next start and runs each request once; tenants apart.

use crate::common;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// `[batches]` on, its database at `db` (so that a restarted gateway finds it).
fn batch_config(workers: &str, tenant: &str, db: &std::path::Path, concurrency: usize) -> String {
    config(workers, tenant, "")
        + &format!(
            "{}\n[batches]\nenabled = true\npath = \"{}\"\nconcurrency = {concurrency}\n",
            other_tenant(),
            db.display()
        )
}

/// Uploads `content` as a file for `purpose` with `key`.
async fn upload(gw: &Gateway, key: &str, purpose: &str, content: &[u8]) -> reqwest::Response {
    upload_with(gw, key, purpose, content, &[]).await
}

/// [`upload`], with more form fields.
async fn upload_with(
    gw: &Gateway,
    key: &str,
    purpose: &str,
    content: &[u8],
    fields: &[(&str, &str)],
) -> reqwest::Response {
    let boundary = "tollgate-test-boundary-7d1f";
    let mut body = String::new();
    for (name, value) in [("purpose", purpose)].iter().chain(fields) {
        body += &format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        );
    }
    body += &format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"requests.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n"
    );
    let mut body = body.into_bytes();
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    client()
        .post(gw.url("/v1/files"))
        .bearer_auth(key)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .expect("sent")
}

/// The JSON Lines of `n` chat requests (`r0`, `r1`, ...), then `extra` lines.
fn requests(n: usize, extra: &[Value]) -> Vec<u8> {
    let mut lines: Vec<String> = (0..n)
        .map(|i| {
            json!({
                "custom_id": format!("r{i}"),
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": format!("question {i}")}], "max_tokens": 8},
            })
            .to_string()
        })
        .collect();
    lines.extend(extra.iter().map(Value::to_string));
    lines.join("\n").into_bytes()
}

/// Uploads `content` and starts a batch of it; the batch as created.
async fn start_batch(gw: &Gateway, content: &[u8]) -> Value {
    start_batch_on(gw, content, "/v1/chat/completions").await
}

/// [`start_batch`] for `endpoint`.
async fn start_batch_on(gw: &Gateway, content: &[u8], endpoint: &str) -> Value {
    let r = upload(gw, KEY, "batch", content).await;
    assert_eq!(r.status(), 200);
    let file: Value = r.json().await.expect("file");
    let body = json!({"input_file_id": file["id"], "endpoint": endpoint, "completion_window": "24h", "metadata": {"job": "test"},
        "output_expires_after": {"anchor": "created_at", "seconds": 86_400}});
    let batch = post_json(gw, "/v1/batches", &body.to_string()).await;
    assert_eq!(batch["status"], "validating", "{batch}");
    batch
}

/// `method` on `url` with bearer `key`.
async fn send(method: reqwest::Method, url: String, key: &str) -> reqwest::Response {
    client()
        .request(method, url)
        .bearer_auth(key)
        .send()
        .await
        .expect("sent")
}

/// GETs `path` with `key`: its status and JSON body.
async fn get(gw: &Gateway, key: &str, path: &str) -> (u16, Value) {
    let r = send(reqwest::Method::GET, gw.url(path), key).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// DELETEs `path` with `key`.
async fn delete(gw: &Gateway, key: &str, path: &str) -> reqwest::Response {
    send(reqwest::Method::DELETE, gw.url(path), key).await
}

/// The batch `id` once `done` says so (polled for at most `limit`).
async fn wait_batch(
    gw: &Gateway,
    id: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let t0 = Instant::now();
    loop {
        let (status, b) = get(gw, KEY, &format!("/v1/batches/{id}")).await;
        assert_eq!(status, 200, "{b}");
        if done(&b) {
            return b;
        }
        assert!(t0.elapsed() < limit, "batch still {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ended(b: &Value) -> bool {
    ["completed", "failed", "expired", "cancelled"].contains(&b["status"].as_str().unwrap_or(""))
}

/// The lines of file `id` as JSON.
async fn file_lines(gw: &Gateway, id: &Value) -> Vec<Value> {
    let text = send(
        reqwest::Method::GET,
        gw.url(&format!(
            "/v1/files/{}/content",
            id.as_str().expect("file id")
        )),
        KEY,
    )
    .await
    .text()
    .await
    .expect("text");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_runs_its_requests_and_keeps_their_answers_in_files() {
    let dir = tempdir::TempDir::new();
    // A contract whose burst a 6,000-token answer cannot fit: that request fails when it
    // runs (a 400 in the error file), the others succeed.
    let tenant = "tokens_per_second = 1000.0\nburst_seconds = 10.0\nmax_concurrency = 8";
    let gw = Gateway::start(&batch_config(FAST_SIM, tenant, &dir.0.join("b.db"), 4));
    let too_big = json!({"custom_id": "big", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 6000}});
    let created = start_batch(&gw, &requests(12, &[too_big])).await;
    let id = created["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("batch_"));
    assert_eq!(created["metadata"]["job"], "test");
    let b = wait_batch(&gw, &id, Duration::from_secs(20), ended).await;
    assert_eq!(b["status"], "completed", "{b}");
    assert_eq!(
        b["request_counts"],
        json!({"total": 13, "completed": 12, "failed": 1})
    );
    assert_eq!(b["model"], "m");
    for at in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(b[at].as_i64().is_some(), "{at}: {b}");
    }
    // Every answer, in the input's order, each the endpoint's own.
    let out = file_lines(&gw, &b["output_file_id"]).await;
    let ids: Vec<&str> = out
        .iter()
        .map(|l| l["custom_id"].as_str().expect("custom_id"))
        .collect();
    let want: Vec<String> = (0..12).map(|i| format!("r{i}")).collect();
    assert_eq!(ids, want);
    let (mut input, mut output) = (0, 0);
    for l in &out {
        assert_eq!(l["response"]["status_code"], 200);
        assert!(l["error"].is_null());
        let body = &l["response"]["body"];
        assert_eq!(body["object"], "chat.completion", "{l}");
        assert_eq!(body["usage"]["completion_tokens"], 8);
        input += body["usage"]["prompt_tokens"].as_i64().expect("usage");
        output += body["usage"]["completion_tokens"].as_i64().expect("usage");
    }
    assert_eq!(b["usage"]["input_tokens"], input);
    assert_eq!(b["usage"]["output_tokens"], output);
    let errors = file_lines(&gw, &b["error_file_id"]).await;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["custom_id"], "big");
    assert_eq!(errors[0]["response"]["status_code"], 400);
    assert_eq!(
        errors[0]["response"]["body"]["error"]["code"],
        "request_exceeds_contract"
    );
    // Kept as long as the batch asked.
    let output_id = b["output_file_id"].as_str().expect("id");
    let (_, output) = get(&gw, KEY, &format!("/v1/files/{output_id}")).await;
    let kept = output["expires_at"].as_i64().expect("expiry")
        - output["created_at"].as_i64().expect("made");
    assert_eq!(kept, 86_400, "{output}");
    // The output files are the tenant's files, listed with the input.
    let (_, files) = get(&gw, KEY, "/v1/files").await;
    let purposes: Vec<&str> = files["data"]
        .as_array()
        .expect("list")
        .iter()
        .map(|f| f["purpose"].as_str().expect("purpose"))
        .collect();
    assert_eq!(purposes, ["batch_output", "batch_output", "batch"]);
    let (_, only) = get(&gw, KEY, "/v1/files?purpose=batch").await;
    assert_eq!(only["data"].as_array().expect("list").len(), 1);
    let (_, listed) = get(&gw, KEY, "/v1/batches?limit=1").await;
    assert_eq!(listed["data"][0]["id"], id.as_str());
    assert_eq!(listed["has_more"], false);
    // An ended batch cannot be cancelled.
    let r = post(&gw, &format!("/v1/batches/{id}/cancel"), "").await;
    assert_eq!(r.status(), 400);
    // The batch's requests are metered as the tenant's.
    let metrics = gw.metrics().await;
    let served = metric(
        &metrics,
        "tollgate_requests_total{tenant=\"demo\",model=\"m\",status=\"200\"}",
    );
    assert_eq!(served, Some(12.0), "{metrics}");
    let counted = |result: &str| {
        metric(
            &metrics,
            &format!("tollgate_batch_requests_total{{result=\"{result}\"}}"),
        )
    };
    assert_eq!((counted("ok"), counted("failed")), (Some(12.0), Some(1.0)));
    assert_eq!(metric(&metrics, "tollgate_batches_running"), Some(0.0));
    // Another tenant sees none of it.
    for path in [
        format!("/v1/batches/{id}"),
        format!("/v1/files/{}", b["output_file_id"].as_str().expect("id")),
        format!(
            "/v1/files/{}/content",
            b["input_file_id"].as_str().expect("id")
        ),
    ] {
        assert_eq!(get(&gw, OTHER, &path).await.0, 404, "{path}");
    }
    let (_, theirs) = get(&gw, OTHER, "/v1/batches").await;
    assert_eq!(theirs["data"], json!([]));
}

/// A batch's `/v1/responses` requests whose answers the response store would keep are
/// held to the tenant's storage quota as the endpoint holds them (403
/// `storage_quota_exceeded` in the error file); one that stores nothing is not.
#[tokio::test(flavor = "multi_thread")]
async fn a_batchs_stored_answers_are_held_to_the_tenants_storage_quota() {
    let dir = tempdir::TempDir::new();
    // About 500 bytes: the first stored answer takes the tenant past it. One request at a
    // time, so that each is checked after the one before is stored.
    let cfg = batch_config(FAST_SIM, "max_stored_mib = 0.0005", &dir.0.join("b.db"), 1)
        + &format!(
            "\n[responses]\nstore = true\npath = {:?}\n",
            dir.0.join("responses.db").display().to_string()
        );
    let gw = Gateway::start(&cfg);
    let line = |id: &str, store: Option<bool>| {
        let mut body =
            json!({"model": "m", "input": format!("question {id}"), "max_output_tokens": 8});
        if let Some(store) = store {
            body["store"] = json!(store);
        }
        json!({"custom_id": id, "method": "POST", "url": "/v1/responses", "body": body})
    };
    let lines = [
        line("stored", None),
        line("over", Some(true)),
        line("unstored", Some(false)),
        line("over-again", None),
    ];
    let content = lines
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    let created = start_batch_on(&gw, content.as_bytes(), "/v1/responses").await;
    let id = created["id"].as_str().expect("id");
    let b = wait_batch(&gw, id, Duration::from_secs(20), ended).await;
    assert_eq!(
        b["request_counts"],
        json!({"total": 4, "completed": 2, "failed": 2}),
        "{b}"
    );
    let out = file_lines(&gw, &b["output_file_id"]).await;
    let answered: Vec<_> = out
        .iter()
        .map(|l| {
            (
                l["custom_id"].as_str(),
                l["response"]["body"]["store"].as_bool(),
            )
        })
        .collect();
    assert_eq!(
        answered,
        [
            (Some("stored"), Some(true)),
            (Some("unstored"), Some(false))
        ]
    );
    let errors = file_lines(&gw, &b["error_file_id"]).await;
    for (l, want) in errors.iter().zip(["over", "over-again"]) {
        assert_eq!(l["custom_id"], want, "{l}");
        assert_eq!(l["response"]["status_code"], 403, "{l}");
        assert_eq!(
            l["response"]["body"]["error"]["code"], "storage_quota_exceeded",
            "{l}"
        );
    }
    assert_eq!(errors.len(), 2);
    // The answer stored is the tenant's, as any other.
    let stored = out[0]["response"]["body"]["id"].as_str().expect("an id");
    assert_eq!(
        get(&gw, KEY, &format!("/v1/responses/{stored}")).await.0,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_faulty_input_file_fails_its_batch_with_every_fault() {
    let dir = tempdir::TempDir::new();
    let gw = Gateway::start(&batch_config(FAST_SIM, "", &dir.0.join("b.db"), 4));
    let faulty = [
        json!({"custom_id": "r0", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [{"role": "user", "content": "again"}]}}),
        json!({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "x"}}),
        json!({"custom_id": "y", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}}),
    ];
    let created = start_batch(&gw, &requests(2, &faulty)).await;
    let id = created["id"].as_str().expect("id");
    let b = wait_batch(&gw, id, Duration::from_secs(10), ended).await;
    assert_eq!(b["status"], "failed", "{b}");
    assert!(b["failed_at"].as_i64().is_some());
    let faults: Vec<(i64, &str)> = b["errors"]["data"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| {
            (
                e["line"].as_i64().expect("line"),
                e["code"].as_str().expect("code"),
            )
        })
        .collect();
    assert_eq!(
        faults,
        [
            (3, "duplicate_custom_id"),
            (4, "mismatched_url"),
            (5, "model_not_found")
        ]
    );
    assert!(b["output_file_id"].is_null());
    // A file that is not JSON Lines is refused when uploaded; an unknown purpose too.
    let r = upload(&gw, KEY, "batch", b"{\"a\":1}\nnot json\n").await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["code"], "invalid_file_format", "{e}");
    assert_eq!(upload(&gw, KEY, "fine-tune", b"{}").await.status(), 400);
    // A batch needs a file of the tenant's made for batches, and an endpoint it runs.
    let notes = upload(&gw, KEY, "user_data", b"notes").await;
    let notes: Value = notes.json().await.expect("file");
    for (body, status) in [
        (
            json!({"input_file_id": notes["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
            400,
        ),
        (
            json!({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
            404,
        ),
        (
            json!({"input_file_id": notes["id"], "endpoint": "/v1/moderations", "completion_window": "24h"}),
            400,
        ),
        (
            json!({"input_file_id": notes["id"], "endpoint": "/v1/chat/completions", "completion_window": "1h"}),
            400,
        ),
    ] {
        let r = post(&gw, "/v1/batches", &body.to_string()).await;
        assert_eq!(r.status(), status, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_batch_stops_and_keeps_what_it_did() {
    let dir = tempdir::TempDir::new();
    // 20 tokens at 25 ms: half a second a request, one at a time.
    let slow = r#"{ kind = "sim", prefill_tokens_per_s = 0.0, decode_step_ms = 25.0, decode_step_ms_per_seq = 0.0, min_output_tokens = 20, max_output_tokens = 20 }"#;
    let gw = Gateway::start(&batch_config(slow, "", &dir.0.join("b.db"), 1));
    let created = start_batch(&gw, &requests(20, &[])).await;
    let id = created["id"].as_str().expect("id");
    wait_batch(&gw, id, Duration::from_secs(10), |b| {
        b["request_counts"]["completed"].as_i64() >= Some(1)
    })
    .await;
    // Its input cannot go while it runs.
    let input = created["input_file_id"].as_str().expect("id");
    let r = delete(&gw, KEY, &format!("/v1/files/{input}")).await;
    assert_eq!(r.status(), 400);
    let c = post_json(&gw, &format!("/v1/batches/{id}/cancel"), "").await;
    assert_eq!(c["status"], "cancelling", "{c}");
    let b = wait_batch(&gw, id, Duration::from_secs(10), ended).await;
    assert_eq!(b["status"], "cancelled", "{b}");
    let done = b["request_counts"]["completed"].as_i64().expect("count");
    assert!((1..20).contains(&done), "{b}");
    let out = file_lines(&gw, &b["output_file_id"]).await;
    assert_eq!(out.len() as i64, done);
    // Cancelling again answers it as it is; its input may go now.
    let again = post_json(&gw, &format!("/v1/batches/{id}/cancel"), "").await;
    assert_eq!(again["status"], "cancelled", "{again}");
    let r = delete(&gw, KEY, &format!("/v1/files/{input}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(get(&gw, KEY, &format!("/v1/files/{input}")).await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_outlives_its_gateway_and_runs_each_request_once() {
    let dir = tempdir::TempDir::new();
    let db = dir.0.join("b.db");
    // 10 tokens at 20 ms: 0.2 s a request, two at a time: 24 requests take ~2.4 s.
    let slow = r#"{ kind = "sim", prefill_tokens_per_s = 0.0, decode_step_ms = 20.0, decode_step_ms_per_seq = 0.0, min_output_tokens = 10, max_output_tokens = 10 }"#;
    let cfg = batch_config(slow, "", &db, 2);
    let mut gw = Gateway::start(&cfg);
    let created = start_batch(&gw, &requests(24, &[])).await;
    let id = created["id"].as_str().expect("id").to_string();
    let progress = |b: &Value| b["request_counts"]["completed"].as_i64().unwrap_or(0);
    let b = wait_batch(&gw, &id, Duration::from_secs(10), |b| progress(b) >= 4).await;
    // Killed: no drain, requests in flight lost.
    gw.kill();
    let at_kill = progress(&b);
    let mut gw = Gateway::start(&cfg);
    let b = wait_batch(&gw, &id, Duration::from_secs(10), |b| {
        progress(b) >= at_kill + 4
    })
    .await;
    assert_eq!(b["status"], "in_progress", "{b}");
    // Drained: the batch stops sending; those in flight end and are kept.
    gw.sigterm();
    assert!(
        gw.wait_exit(Duration::from_secs(10)).is_some(),
        "no exit on SIGTERM"
    );
    let gw = Gateway::start(&cfg);
    let b = wait_batch(&gw, &id, Duration::from_secs(20), ended).await;
    assert_eq!(b["status"], "completed", "{b}");
    assert_eq!(
        b["request_counts"],
        json!({"total": 24, "completed": 24, "failed": 0})
    );
    let out = file_lines(&gw, &b["output_file_id"]).await;
    let ids: Vec<&str> = out
        .iter()
        .map(|l| l["custom_id"].as_str().expect("id"))
        .collect();
    let want: Vec<String> = (0..24).map(|i| format!("r{i}")).collect();
    assert_eq!(ids, want, "each request once, in order");
    assert!(b["error_file_id"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn files_are_held_to_the_size_limit_and_the_tenant_quota() {
    let dir = tempdir::TempDir::new();
    // `other` has a quota of its own (about 3 KiB).
    let cfg = config(FAST_SIM, "", "")
        + &other_tenant()
        + "max_files_mib = 0.003\n"
        + &format!(
            "\n[batches]\nenabled = true\npath = \"{}\"\nmax_file_mib = 0.001\nmax_stored_mib_per_tenant = 0.0025\n",
            dir.0.join("b.db").display()
        );
    let gw = Gateway::start(&cfg);
    // 1 KiB files (max_file_mib ≈ 1,048 bytes): two fit the 2.5 KiB quota, a third does not.
    let kib = vec![b'x'; 1000];
    let first: Value = upload(&gw, KEY, "user_data", &kib)
        .await
        .json()
        .await
        .expect("file");
    assert_eq!(first["bytes"], 1000);
    assert_eq!(upload(&gw, KEY, "user_data", &kib).await.status(), 200);
    let r = upload(&gw, KEY, "user_data", &kib).await;
    assert_eq!(r.status(), 403);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["code"], "storage_quota_exceeded");
    assert_eq!(
        upload(&gw, KEY, "user_data", &[b'x'; 1100]).await.status(),
        413
    );
    assert_eq!(upload(&gw, KEY, &"x".repeat(100), b"x").await.status(), 400);
    // A file kept two hours; an expiry outside an hour to 30 days is refused.
    let anchor = ("expires_after[anchor]", "created_at");
    let two_hours = [anchor, ("expires_after[seconds]", "7200")];
    let short = upload_with(&gw, OTHER, "user_data", b"x", &two_hours).await;
    let short: Value = short.json().await.expect("file");
    assert_eq!(
        short["expires_at"].as_i64(),
        short["created_at"].as_i64().map(|t| t + 7200),
        "{short}"
    );
    let r = upload_with(
        &gw,
        OTHER,
        "user_data",
        b"x",
        &[anchor, ("expires_after[seconds]", "60")],
    )
    .await;
    assert_eq!(r.status(), 400);
    let r = upload_with(
        &gw,
        OTHER,
        "user_data",
        b"x",
        &[("expires_after[anchor]", "last_used")],
    )
    .await;
    assert_eq!(r.status(), 400);
    // Its own quota: three 1 KiB files beside its 1-byte one, not four.
    for _ in 0..3 {
        assert_eq!(upload(&gw, OTHER, "user_data", &kib).await.status(), 200);
    }
    let r = upload(&gw, OTHER, "user_data", &kib).await;
    assert_eq!(r.status(), 403);
    // Deleting one makes room; its content is the bytes sent.
    let id = first["id"].as_str().expect("id");
    let r = send(
        reqwest::Method::GET,
        gw.url(&format!("/v1/files/{id}/content")),
        KEY,
    )
    .await;
    assert_eq!(r.bytes().await.expect("bytes").as_ref(), &kib[..]);
    let r = delete(&gw, KEY, &format!("/v1/files/{id}")).await;
    let gone: Value = r.json().await.expect("json");
    assert_eq!(gone, json!({"id": id, "object": "file", "deleted": true}));
    assert_eq!(upload(&gw, KEY, "user_data", &kib).await.status(), 200);
    // Without `[batches]` the routes are a 404 that says why.
    let plain = Gateway::start(&config(FAST_SIM, "", ""));
    let (status, e) = get(&plain, KEY, "/v1/batches").await;
    assert_eq!(status, 404);
    assert!(e["error"]["message"]
        .as_str()
        .expect("message")
        .contains("[batches]"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_past_its_window_expires_and_lists_what_did_not_run() {
    use gateway::batch::store::{now_s, BatchRow};
    use gateway::batch::BatchStore;
    let dir = tempdir::TempDir::new();
    let db = dir.0.join("b.db");
    // Batches a gateway left behind: one whose window ended while it was down (two of its
    // three requests done), one cancelled while it ran.
    {
        let store = BatchStore::open(&db, Duration::from_secs(3600)).expect("open");
        let file = store
            .put_file("demo", "in.jsonl", "batch", &requests(3, &[]))
            .expect("file");
        let row = |id: &str, status: &str, expires_at| BatchRow {
            id: id.into(),
            tenant: "demo".into(),
            created_at: now_s() - 86_400,
            endpoint: "/v1/chat/completions".into(),
            input_file_id: file.id.clone(),
            completion_window: "24h".into(),
            status: status.into(),
            expires_at,
            ..BatchRow::default()
        };
        store
            .create_batch(&row("batch_late", "validating", now_s() - 5))
            .expect("create");
        store.start("batch_late", 3, Some("m")).expect("start");
        for line in [0, 2] {
            let done = gateway::batch::store::LineResult {
                line,
                ok: true,
                output: format!(r#"{{"custom_id":"r{line}"}}"#),
                ..Default::default()
            };
            store.record("batch_late", &done).expect("record");
        }
        store
            .create_batch(&row("batch_stopped", "cancelling", now_s() + 3600))
            .expect("create");
    }
    let gw = Gateway::start(&batch_config(FAST_SIM, "", &db, 4));
    let b = wait_batch(&gw, "batch_late", Duration::from_secs(10), ended).await;
    assert_eq!(b["status"], "expired", "{b}");
    assert!(b["expired_at"].as_i64().is_some());
    assert_eq!(
        b["request_counts"],
        json!({"total": 3, "completed": 2, "failed": 1})
    );
    let out = file_lines(&gw, &b["output_file_id"]).await;
    assert_eq!(
        out,
        [json!({"custom_id": "r0"}), json!({"custom_id": "r2"})]
    );
    let errors = file_lines(&gw, &b["error_file_id"]).await;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["custom_id"], "r1");
    assert_eq!(errors[0]["error"]["code"], "batch_expired");
    assert!(errors[0]["response"].is_null());
    let b = wait_batch(&gw, "batch_stopped", Duration::from_secs(10), ended).await;
    assert_eq!(b["status"], "cancelled", "{b}");
    assert_eq!(
        b["request_counts"]["completed"], 0,
        "nothing run after a cancel"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_sees_and_deletes_a_tenants_files_and_batches() {
    let dir = tempdir::TempDir::new();
    let slow = r#"{ kind = "sim", prefill_tokens_per_s = 0.0, decode_step_ms = 25.0, decode_step_ms_per_seq = 0.0, min_output_tokens = 20, max_output_tokens = 20 }"#;
    let cfg = config(slow, "", ADMIN_SERVER)
        + &format!(
            "{}\n[batches]\nenabled = true\npath = \"{}\"\nconcurrency = 1\n",
            other_tenant(),
            dir.0.join("b.db").display()
        );
    let gw = Gateway::start(&cfg);
    let created = start_batch(&gw, &requests(20, &[])).await;
    let id = created["id"].as_str().expect("id");
    assert_eq!(
        upload(&gw, OTHER, "user_data", b"theirs").await.status(),
        200
    );
    wait_batch(&gw, id, Duration::from_secs(10), |b| {
        b["status"] == "in_progress"
    })
    .await;
    let summary = get_json(gw.admin_url("/admin/batches"), ADMIN_TOKEN).await;
    assert_eq!(
        summary["tenants"],
        json!([
            {"tenant": "demo", "files": 1, "file_bytes": requests(20, &[]).len(), "batches": 1, "running": 1,
             "quota_bytes": 2048u64 << 20},
            {"tenant": "other", "files": 1, "file_bytes": 6, "batches": 0, "running": 0,
             "quota_bytes": 2048u64 << 20},
        ])
    );
    let r = send(
        reqwest::Method::DELETE,
        gw.admin_url("/admin/batches/demo"),
        ADMIN_TOKEN,
    )
    .await;
    let deleted: Value = r.json().await.expect("json");
    assert_eq!(
        deleted,
        json!({"tenant": "demo", "deleted": {"files": 1, "batches": 1}, "stopped": 1})
    );
    assert_eq!(get(&gw, KEY, &format!("/v1/batches/{id}")).await.0, 404);
    // The stopped batch leaves nothing behind (its request in flight ends unkept); the
    // other tenant keeps its file.
    let only_theirs = json!([{"tenant": "other", "files": 1, "file_bytes": 6, "batches": 0, "running": 0,
                "quota_bytes": 2048u64 << 20}]);
    let results_left = || {
        let db = rusqlite::Connection::open(dir.0.join("b.db")).expect("db");
        db.query_row("SELECT COUNT(*) FROM batch_results", [], |r| {
            r.get::<_, i64>(0)
        })
        .expect("count")
    };
    let settled = eventually(Duration::from_secs(10), async || {
        let summary = get_json(gw.admin_url("/admin/batches"), ADMIN_TOKEN).await;
        summary["tenants"] == only_theirs && results_left() == 0
    })
    .await;
    assert!(settled, "the stopped batch left something behind");
    // Without the admin token: refused.
    let r = send(reqwest::Method::GET, gw.admin_url("/admin/batches"), KEY).await;
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_waits_while_a_reload_has_taken_its_tenant_out() {
    let dir = tempdir::TempDir::new();
    let db = dir.0.join("b.db");
    // 8 tokens at 20 ms: 0.16 s a request, two at a time.
    let slow = r#"{ kind = "sim", prefill_tokens_per_s = 0.0, decode_step_ms = 20.0, decode_step_ms_per_seq = 0.0, min_output_tokens = 8, max_output_tokens = 8 }"#;
    let cfg = batch_config(slow, "", &db, 2);
    let gw = Gateway::start(&cfg);
    let created = start_batch(&gw, &requests(20, &[])).await;
    let id = created["id"].as_str().expect("id");
    let path = format!("/v1/batches/{id}");
    let progress = |b: &Value| b["request_counts"]["completed"].as_i64().unwrap_or(0);
    wait_batch(&gw, id, Duration::from_secs(10), |b| progress(b) >= 2).await;
    // The same key now names another tenant: `demo` is gone.
    gw.write_config(&cfg.replace("id = \"demo\"", "id = \"renamed\""));
    let gone = eventually(Duration::from_secs(5), async || {
        get(&gw, KEY, &path).await.0 == 404
    })
    .await;
    assert!(gone, "the reload did not apply");
    let completed = || {
        let conn = rusqlite::Connection::open(&db).expect("db");
        conn.query_row("SELECT completed FROM batches WHERE id = ?1", [id], |r| {
            r.get::<_, i64>(0)
        })
        .expect("the batch")
    };
    // Those in flight end; then nothing runs, and nothing fails.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = completed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        completed(),
        held,
        "requests ran for a tenant not in the config"
    );
    assert!(held < 20);
    // Back in the config: the batch goes on to its end.
    gw.write_config(&cfg);
    let back = eventually(Duration::from_secs(5), async || {
        get(&gw, KEY, &path).await.0 == 200
    })
    .await;
    assert!(back, "the reload did not apply");
    let b = wait_batch(&gw, id, Duration::from_secs(20), ended).await;
    assert_eq!(b["status"], "completed", "{b}");
    assert_eq!(
        b["request_counts"],
        json!({"total": 20, "completed": 20, "failed": 0})
    );
}
