//! The usage ledger: what `meter` says is durable, tested with `kill -9`, and the
//! `gateway usage` export.
//!
//! Statement under test: a request whose answer the client received in full (JSON body, or
//! SSE through `data: [DONE]`) has its usage record written to the journal first, so it
//! survives a SIGKILL of the gateway right after: the export (or the next start) copies what
//! the killed gateway left into the database.

use crate::common;

use common::*;
use futures::future::join_all;
use std::collections::HashMap;
use std::time::Duration;

const BODY: &str = r#"{"model":"m","prompt":"hello world!","max_tokens":8}"#;
const STREAM_BODY: &str = r#"{"model":"m","prompt":"hello world!","max_tokens":8,"stream":true}"#;

/// Rows in the usage table (0 while the database cannot be read).
fn usage_rows(db: &std::path::Path) -> i64 {
    rusqlite::Connection::open(db)
        .and_then(|c| c.query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0)))
        .unwrap_or(0)
}

/// Sends one request; the request id if its answer arrived in full.
async fn complete(gw_url: String, stream: bool) -> Option<String> {
    let r = client()
        .post(gw_url)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(if stream { STREAM_BODY } else { BODY })
        .send()
        .await
        .ok()?;
    let id = r.headers().get("x-request-id")?.to_str().ok()?.to_string();
    if r.status() != 200 {
        return None;
    }
    let text = r.text().await.ok()?;
    let whole = if stream {
        text.ends_with("data: [DONE]\n\n")
    } else {
        serde_json::from_str::<serde_json::Value>(&text).is_ok()
    };
    whole.then_some(id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_requests_survive_kill_9_and_export_per_minute_totals() {
    let mut gw = Gateway::start(&config(FAST_SIM, "tokens_per_second = 1000000.0", ""));
    let db = gw.dir().join("tollgate-usage.db");
    // Keep requests flowing, and kill -9 the gateway in the middle of them.
    let url = gw.url("/v1/completions");
    let load = tokio::spawn(async move {
        let mut done = Vec::new();
        for round in 0..60 {
            let batch = (0..8).map(|i| complete(url.clone(), (round + i) % 2 == 0));
            let ids = join_all(batch).await;
            done.extend(ids.into_iter().flatten());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        done
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    gw.child.kill().unwrap(); // SIGKILL
    gw.child.wait().unwrap();
    let completed = load.await.unwrap();
    assert!(
        completed.len() >= 20,
        "only {} completed before the kill",
        completed.len()
    );

    let left = journal_segments(&db);
    assert!(left >= 1, "the killed gateway left its journal segments");
    // The export first copies what the killed gateway left in its journal.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["usage", "--since", "1h", "--format", "json", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(journal_segments(&db), 0, "copied and removed");

    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut stmt = conn
        .prepare("SELECT request_id, status, input_tokens, output_tokens, weighted_tokens, tenant, worker FROM usage")
        .unwrap();
    let rows: HashMap<String, (String, u32, u32, f64, String, String)> = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                (
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ),
            ))
        })
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    for id in &completed {
        let (status, input, output, weighted, tenant, worker) = rows
            .get(id)
            .unwrap_or_else(|| panic!("completed request {id} has no usage record after kill -9"));
        assert_eq!(status, "200");
        assert_eq!((*input, *output, *weighted), (3, 8, 27.0));
        assert_eq!(tenant, "demo");
        assert!(worker.starts_with("p/"), "{worker}");
    }
    eprintln!(
        "{} requests completed before kill -9; {} records in the ledger",
        completed.len(),
        rows.len()
    );
    drop(stmt);
    drop(conn);

    // The export: per-tenant, per-minute totals that add up to the records.
    let totals: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let completed_total: u64 = totals
        .iter()
        .map(|t| t["completed"].as_u64().unwrap())
        .sum();
    let weighted_total: f64 = totals
        .iter()
        .map(|t| t["weighted_tokens"].as_f64().unwrap())
        .sum();
    let ok_rows = rows.values().filter(|r| r.0 == "200").count() as u64;
    assert_eq!(completed_total, ok_rows);
    assert_eq!(weighted_total, 27.0 * ok_rows as f64);
    assert!(totals
        .iter()
        .all(|t| t["tenant"] == "demo" && t["minute"].as_str().unwrap().ends_with(":00Z")));

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "usage",
            "--since",
            "2020-01-01T00:00:00Z",
            "--tenant",
            "nobody",
            "--db",
        ])
        .arg(&db)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "minute,tenant,requests,completed,input_tokens,output_tokens,weighted_tokens,cached_tokens\n"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["usage", "--since", "last tuesday", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("RFC 3339"));
}

#[tokio::test]
async fn refused_and_cancelled_requests_are_metered_with_what_they_used() {
    let gw = Gateway::start(&config(
        r#"{ kind = "sim", prefill_tokens_per_s = 0.0, decode_step_ms = 100.0, decode_step_ms_per_seq = 0.0, min_output_tokens = 8, max_output_tokens = 8 }"#,
        "tokens_per_second = 10.0\nburst_seconds = 5.0",
        "",
    ));
    // Streams, and goes away after the first tokens: charged the prompt and what came out.
    let r = client()
        .post(gw.url("/v1/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(STREAM_BODY)
        .send()
        .await
        .unwrap();
    let mut r = r;
    let mut seen = String::new();
    while !seen.contains("\"text\":\"") || seen.matches("data:").count() < 3 {
        let chunk = r.chunk().await.unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(r);
    // Past contract now: of the 50-token bucket, the cancelled stream kept 3 + 3 × (tokens
    // it got), and this asks for 3 + 3 × 15 = 48.
    let refused = post(
        &gw,
        "/v1/completions",
        r#"{"model":"m","prompt":"hello world!","max_tokens":15}"#,
    )
    .await;
    let refused_status = refused.status().as_u16();
    let db = gw.dir().join("tollgate-usage.db");
    assert!(eventually(Duration::from_secs(5), async || usage_rows(&db) >= 2).await);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (input, output, weighted): (u32, u32, f64) = conn
        .query_row(
            "SELECT input_tokens, output_tokens, weighted_tokens FROM usage WHERE status = 'cancelled'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(input, 3);
    assert!((1..8).contains(&output), "{output}");
    assert_eq!(weighted, 3.0 + 3.0 * output as f64);
    let n: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM usage WHERE status = ?1 AND weighted_tokens = 0",
            [refused_status.to_string()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        n, 1,
        "the {refused_status} is recorded, with nothing charged"
    );
}

/// A prompt the engine serves partly from its prefix cache is charged those tokens at the
/// model's `cached_input_weight`; the ledger, the export and `/metrics` say how many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_tokens_from_the_prefix_cache_are_charged_at_the_cached_input_weight() {
    let dir = tempdir::TempDir::new();
    let model = dir.0.join("synthetic.gguf");
    kernels::synth::write_model(&model, &kernels::synth::SynthSpec::tiny()).unwrap();
    let cfg = engine_pool_config(
        &model,
        "cached_input_weight = 0.25",
        r#"{ kind = "engine", backend = "cpu", threads = 2, kv_tokens = 4096 }"#,
        "tokens_per_second = 100000.0",
    );
    let gw = Gateway::start(&cfg);
    let prompt = "a shared instruction that many requests start with. ".repeat(10);
    let body = serde_json::json!({
        "model": "m", "prompt": prompt, "max_tokens": 4, "temperature": 0
    })
    .to_string();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let r = post(&gw, "/v1/completions", &body).await;
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let v: serde_json::Value = r.json().await.unwrap();
        let u = &v["usage"];
        let field = |k: &str| u[k].as_u64().unwrap();
        let cached = u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        seen.push((
            id,
            field("prompt_tokens"),
            cached,
            field("completion_tokens"),
        ));
    }
    let (input, cached) = (seen[1].1, seen[1].2);
    assert_eq!(seen[0].2, 0, "the first request computes its whole prompt");
    assert!(input > 50 && cached > 0 && cached < input, "{seen:?}");
    let db = gw.dir().join("tollgate-usage.db");
    // The ledger copies its journal into the database within milliseconds.
    assert!(eventually(Duration::from_secs(5), async || usage_rows(&db) >= 2).await);
    let conn = rusqlite::Connection::open(&db).unwrap();
    for (id, input, cached, output) in &seen {
        let (c, w): (u32, f64) = conn
            .query_row(
                "SELECT cached_tokens, weighted_tokens FROM usage WHERE request_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(c as u64, *cached);
        let want = (input - cached) as f64 + 0.25 * *cached as f64 + 3.0 * *output as f64;
        assert_eq!(w, want, "{id}");
    }
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"tollgate_cached_input_tokens_total{tenant="demo",model="m"}"#
        ),
        Some(cached as f64),
        "{m}"
    );
    // Both records went through the journal into the database, and none was lost.
    let records = |m: &str, outcome: &str| {
        metric(
            m,
            &format!("tollgate_usage_records_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert!(
        eventually(Duration::from_secs(5), async || {
            records(&gw.metrics().await, "written") == Some(2.0)
        })
        .await,
        "{m}"
    );
    let m = gw.metrics().await;
    assert_eq!(records(&m, "journaled"), Some(2.0), "{m}");
    assert_eq!(records(&m, "failed"), Some(0.0), "{m}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["usage", "--since", "1h", "--format", "json", "--db"])
        .arg(gw.dir().join("tollgate-usage.db"))
        .output()
        .unwrap();
    let totals: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let summed: u64 = totals
        .iter()
        .map(|t| t["cached_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(summed, cached);
}
