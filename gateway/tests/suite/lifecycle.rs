//! Process lifecycle and the CLI: graceful drain on SIGTERM (in-flight streams and
//! background responses; with either way of serving, per core and shared), connections
//! spread over the serving threads, config checking, key making.

use crate::common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// `[server]` lines for each way of serving tenant connections.
const RUNTIMES: [&str; 2] = [
    "runtime = \"per_core\"\nthreads = 2",
    "runtime = \"shared\"",
];

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_accepting_and_drains_in_flight_streams() {
    for runtime in RUNTIMES {
        drains_in_flight_streams(runtime).await;
    }
}

async fn drains_in_flight_streams(runtime: &str) {
    // Each stream takes ~5 × 50 ms; the background response ~20 × 50 ms = 1 s: it outlives
    // the connections.
    let slow = r#"{ kind = "sim", decode_step_ms = 50.0, decode_step_ms_per_seq = 0.0, min_output_tokens = 20, max_output_tokens = 20 }"#;
    let stored = "\n[responses]\nstore = true\n";
    let mut gw = Gateway::start(&(config(slow, "", runtime) + stored));
    // A background response, running apart from any connection.
    let bg = r#"{"model":"m","input":"x","max_output_tokens":20,"background":true}"#;
    let r = post(&gw, "/v1/responses", bg).await;
    let started: serde_json::Value = r.json().await.unwrap();
    assert_eq!(started["status"], "in_progress", "{started}");
    let body = r#"{"model":"m","prompt":"x","max_tokens":5,"stream":true}"#;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut r = post(&gw, "/v1/completions", body).await;
        assert_eq!(r.status(), 200);
        r.chunk().await.unwrap().unwrap();
        streams.push(r);
    }
    let t0 = Instant::now();
    gw.sigterm();
    // New connections are refused once the listener closes.
    let addr = gw.addr;
    assert!(
        eventually(Duration::from_secs(2), async || {
            tokio::net::TcpStream::connect(addr).await.is_err()
        })
        .await,
        "still accepting after SIGTERM"
    );
    // In-flight streams run to their end.
    for r in streams {
        let text = r.text().await.unwrap();
        assert!(
            text.trim_end().ends_with("data: [DONE]"),
            "stream cut short: {text}"
        );
    }
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("gateway did not exit after draining");
    assert!(status.success(), "{status:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // On its way out the ledger copied its journal into the database and removed it.
    let db = gw.dir().join("tollgate-usage.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let done: i64 = conn
        .query_row("SELECT COUNT(*) FROM usage WHERE status = '200'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(
        done, 4,
        "the drained streams and the background response are on record"
    );
    // The background response ran to its end before the gateway exited.
    let conn = rusqlite::Connection::open(gw.dir().join("tollgate-responses.db")).unwrap();
    let response: String = conn
        .query_row(
            "SELECT response FROM responses WHERE id = ?1",
            [started["id"].as_str().unwrap()],
            |r| r.get(0),
        )
        .unwrap();
    let response: serde_json::Value = serde_json::from_str(&response).unwrap();
    assert_eq!(response["usage"]["output_tokens"], 20, "{response}");
    assert_eq!(
        journal_segments(&db),
        0,
        "no journal segment left after a clean exit"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_deadline_bounds_shutdown() {
    for runtime in RUNTIMES {
        deadline_bounds_shutdown(runtime).await;
    }
}

async fn deadline_bounds_shutdown(runtime: &str) {
    let slow = r#"{ kind = "sim", decode_step_ms = 50.0, min_output_tokens = 1000, max_output_tokens = 1000 }"#;
    let cfg =
        config(slow, "", runtime).replace("drain_timeout_secs = 10.0", "drain_timeout_secs = 0.5");
    let mut gw = Gateway::start(&cfg);
    let mut r = post(
        &gw,
        "/v1/completions",
        r#"{"model":"m","prompt":"x","max_tokens":1000,"stream":true}"#,
    )
    .await;
    r.chunk().await.unwrap().unwrap();
    let t0 = Instant::now();
    gw.sigterm();
    let status = gw
        .wait_exit(Duration::from_secs(5))
        .expect("gateway ignored its drain deadline");
    assert!(status.success());
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "exited before the deadline"
    );
}

/// Per core, each new connection goes to the serving thread with the fewest open ones, and
/// leaves its count when it closes.
#[tokio::test(flavor = "multi_thread")]
async fn per_core_serving_spreads_connections_over_its_threads() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::start(&config(FAST_SIM, "", "runtime = \"per_core\"\nthreads = 3"));
    let request =
        format!("GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n\r\n");
    let mut conns = Vec::new();
    for _ in 0..6 {
        let mut c = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        conns.push(c); // kept open
    }
    let open = |text: &str| -> Vec<f64> {
        (0..3)
            .map(|i| {
                let line = format!("tollgate_open_connections{{thread=\"http-{i}\"}}");
                metric(text, &line).unwrap_or_else(|| panic!("no {line} in {text}"))
            })
            .collect()
    };
    // The scrape's own connection is the seventh.
    let during = open(&gw.metrics().await);
    assert_eq!(during.iter().sum::<f64>(), 7.0, "{during:?}");
    assert!(during.iter().all(|&n| n >= 2.0), "unbalanced: {during:?}");
    drop(conns);
    let mut last = Vec::new();
    let closed = eventually(Duration::from_secs(5), async || {
        last = open(&gw.metrics().await);
        last.iter().sum::<f64>() == 1.0
    })
    .await;
    assert!(closed, "closed connections still counted: {last:?}");
}

fn gateway_cmd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_new_makes_a_key_that_authenticates() {
    let out = gateway_cmd(&["keys", "new", "--tenant", "acme"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("sk-tollgate-"))
        .unwrap();
    let key = format!("sk-tollgate-{key}");
    let line = text
        .lines()
        .find(|l| l.contains("keys_sha256"))
        .unwrap()
        .trim();
    let cfg = config(FAST_SIM, "", "") + &format!("\n[[tenants]]\nid = \"acme\"\n{line}\n");
    let gw = Gateway::start(&cfg);
    let r = client()
        .get(gw.url("/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let again =
        String::from_utf8(gateway_cmd(&["keys", "new", "--tenant", "acme"]).stdout).unwrap();
    assert!(!again.contains(&key), "keys are fresh each time");
}

#[test]
fn check_config_accepts_good_and_rejects_bad_files() {
    let dir = tempdir::TempDir::new();
    let good = dir.0.join("good.toml");
    std::fs::write(&good, config(FAST_SIM, "", "")).unwrap();
    let out = gateway_cmd(&["check-config", good.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("ok (1 models, 1 pools, 1 workers, 1 tenants)"));
    for (bad, why) in [
        (
            config(FAST_SIM, "", "").replace("model = \"m\"", "model = \"nope\""),
            "unknown model",
        ),
        (
            config(FAST_SIM, "", "").replace(KEY_SHA256, "abc"),
            "keys_sha256",
        ),
        (config(FAST_SIM, "pool = \"elsewhere\"", ""), "unknown pool"),
        (config(FAST_SIM, "", "bogus_field = 1"), "bogus_field"),
        (
            config(r#"{ kind = "openai", url = "ftp://x" }"#, "", ""),
            "http://",
        ),
        (
            "[[tenants]]\nid = \"a\"\nkeys_sha256 = []\n".to_string(),
            "keys_sha256",
        ),
    ] {
        let f = dir.0.join("bad.toml");
        std::fs::write(&f, &bad).unwrap();
        let out = gateway_cmd(&["check-config", f.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{why}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "expected {why:?} in {err}");
    }
    // The embedded default config is valid, and the shipped file is the same.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/gateway.toml");
    assert!(gateway_cmd(&["check-config", shipped]).status.success());
}
