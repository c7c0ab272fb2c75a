//! Process lifecycle and the CLI: graceful drain on SIGTERM, config checking, key making.

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_accepting_and_drains_in_flight_streams() {
    // Each stream takes ~20 × 50 ms = 1 s.
    let slow = r#"{ kind = "sim", decode_step_ms = 50.0, decode_step_ms_per_seq = 0.0, min_output_tokens = 20, max_output_tokens = 20 }"#;
    let mut gw = Gateway::start(&config(slow, "", ""));
    let body = r#"{"model":"m","prompt":"x","max_tokens":20,"stream":true}"#;
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
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_deadline_bounds_shutdown() {
    let slow = r#"{ kind = "sim", decode_step_ms = 50.0, min_output_tokens = 1000, max_output_tokens = 1000 }"#;
    let cfg = config(slow, "", "").replace("drain_timeout_secs = 10.0", "drain_timeout_secs = 0.5");
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
