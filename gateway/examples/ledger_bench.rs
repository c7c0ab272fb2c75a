//! Usage-ledger throughput: records per second through the writer thread, without waiting
//! (`record`) and with 64 concurrent waiters (`record_durable`), and the process CPU time
//! per record. `cargo run --release -p gateway --example ledger_bench`

use gateway::config::Synchronous;
use gateway::meter::{Ledger, UsageRecord};
use std::time::{Duration, Instant};

fn rec(i: u64) -> UsageRecord {
    UsageRecord {
        ts_ms: gateway::meter::unix_ms(),
        request_id: format!("req-{i:016x}"),
        tenant: "bench".into(),
        model: "m".into(),
        worker: "p/0-sim".into(),
        input_tokens: 12,
        cached_tokens: 0,
        output_tokens: 40,
        weighted_tokens: 132.0,
        status: "200".into(),
        ttft_ms: Some(12.5),
        duration_ms: 250.0,
        best_effort: false,
    }
}

fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = std::env::temp_dir().join(format!("ledger-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ledger = Ledger::start(&dir.join("usage.db"), Synchronous::Normal).unwrap();
    let n = 200_000u64;
    let (t0, c0) = (Instant::now(), cpu_secs());
    for i in 0..n {
        ledger.record_queued(rec(i)).await;
    }
    while ledger.counts().0 < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (dt, dc) = (t0.elapsed().as_secs_f64(), cpu_secs() - c0);
    println!(
        "record_queued:      {:>8.0} records/s, {:>5.1} µs CPU per record",
        n as f64 / dt,
        dc * 1e6 / n as f64
    );
    let m = 40_000u64;
    let (t0, c0) = (Instant::now(), cpu_secs());
    let mut tasks = Vec::new();
    for k in 0..64u64 {
        let l = ledger.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..m / 64 {
                assert!(l.record_durable(rec(k * m + i)).await);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (dt, dc) = (t0.elapsed().as_secs_f64(), cpu_secs() - c0);
    println!(
        "record_durable x64: {:>8.0} records/s, {:>5.1} µs CPU per record",
        m as f64 / dt,
        dc * 1e6 / m as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
}
