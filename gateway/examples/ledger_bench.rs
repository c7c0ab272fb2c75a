//! Usage-ledger throughput: records per second appended to the journal and copied into
//! SQLite, from one task (`record`) and from 64 concurrent tasks waiting for durability
//! (`record_durable`, under `synchronous = "normal"` and `"full"`), and the process CPU
//! time per record (the ledger thread's copying included).
//! `cargo run --release -p gateway --example ledger_bench`

use gateway::config::Synchronous;
use gateway::meter::{Ledger, UsageRecord};
use std::time::Instant;

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

async fn durable(ledger: &Ledger, label: &str, m: u64) {
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
    let dt = t0.elapsed().as_secs_f64();
    assert!(ledger.flush().await);
    let dc = cpu_secs() - c0;
    println!(
        "{label}: {:>8.0} records/s, {:>5.1} µs CPU per record (copy included)",
        m as f64 / dt,
        dc * 1e6 / m as f64
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = std::env::temp_dir().join(format!("ledger-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ledger = Ledger::start(&dir.join("usage.db"), Synchronous::Normal).unwrap();
    let n = 200_000u64;
    let (t0, c0) = (Instant::now(), cpu_secs());
    for i in 0..n {
        ledger.record(rec(i));
    }
    let appended = t0.elapsed().as_secs_f64();
    assert!(ledger.flush().await);
    let (dt, dc) = (t0.elapsed().as_secs_f64(), cpu_secs() - c0);
    println!(
        "record:                    {:>8.0} records/s appended ({:.2} µs each), {:>8.0} records/s into SQLite, {:>5.1} µs CPU per record",
        n as f64 / appended,
        appended * 1e6 / n as f64,
        n as f64 / dt,
        dc * 1e6 / n as f64
    );
    // Time per append at a steady 5,000 records/s for 6 s, while the ledger thread copies
    // and checkpoints (its fsyncs share the file system): the request thread's stall.
    let mut took = Vec::with_capacity(30_000);
    let start = Instant::now();
    for i in 0..30_000u64 {
        let due = start + std::time::Duration::from_micros(200 * i);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t = Instant::now();
        ledger.record(rec(n + i));
        took.push(t.elapsed().as_secs_f64() * 1e6);
    }
    took.sort_by(f64::total_cmp);
    let q = |p: f64| took[((took.len() - 1) as f64 * p) as usize];
    println!(
        "append at 5,000/s:         p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.0} µs",
        q(0.5),
        q(0.99),
        q(0.999),
        q(1.0)
    );
    durable(&ledger, "record_durable x64 normal", 40_000).await;
    assert!(ledger.close().await);
    let full = Ledger::start(&dir.join("usage-full.db"), Synchronous::Full).unwrap();
    durable(&full, "record_durable x64 full  ", 20_000).await;
    assert!(full.close().await);
    let _ = std::fs::remove_dir_all(&dir);
}
