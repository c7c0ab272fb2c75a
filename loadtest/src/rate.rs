//! Open-loop load at a fixed rate over a pool of keep-alive HTTP/1.1 connections.
//!
//! A pacer thread releases request tickets at their intended times (an OS thread with 1 ns
//! timer slack: tokio's timers tick in whole milliseconds, too coarse for this); connection
//! tasks take tickets in order, send, and read the whole answer. Latency = answer
//! complete − intended time. When every connection is busy, tickets wait, and that wait
//! counts as latency.

use crate::exchange::connect;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use std::time::Duration;
use tokio::time::Instant;

#[derive(clap::Args, Clone)]
pub struct RateArgs {
    /// Target URL, e.g. http://127.0.0.1:8080/v1/chat/completions
    #[arg(long)]
    url: String,
    /// Requests per second to offer.
    #[arg(long)]
    rate: f64,
    /// Seconds of measured load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of unmeasured load first.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Bearer API key.
    #[arg(long)]
    key: Option<String>,
    /// JSON request body (POST); without it, GET.
    #[arg(long)]
    body: Option<String>,
    /// Label printed with the result.
    #[arg(long, default_value = "run")]
    label: String,
}

struct Outcome {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
}

pub async fn run(a: RateArgs) -> Result<(), String> {
    let uri: http::Uri = a.url.parse().map_err(|e| format!("--url: {e}"))?;
    let authority = uri.authority().ok_or("--url needs host:port")?.to_string();
    if a.rate.is_nan() || a.rate <= 0.0 {
        return Err("--rate must be > 0".into());
    }
    let (tx, rx) = async_channel::unbounded::<(Instant, bool)>();
    let mut tasks = Vec::new();
    for _ in 0..a.connections {
        let rx = rx.clone();
        let (authority, uri, a) = (authority.clone(), uri.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome {
                hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
                ok: 0,
                errors: 0,
            };
            let mut conn = None;
            while let Ok((intended, measured)) = rx.recv().await {
                if conn.is_none() {
                    conn = connect(&authority).await.ok();
                }
                let Some(send) = conn.as_mut() else {
                    if measured {
                        out.errors += 1;
                    }
                    continue;
                };
                let mut b = http::Request::builder()
                    .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
                    .header("host", &authority);
                if let Some(k) = &a.key {
                    b = b.header("authorization", format!("Bearer {k}"));
                }
                let req = match &a.body {
                    Some(body) => b
                        .method("POST")
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body.clone()))),
                    None => b.method("GET").body(Full::new(Bytes::new())),
                }
                .expect("request");
                // Only once the last exchange is over (see `exchange`).
                let sent = match send.ready().await {
                    Ok(()) => send.send_request(req).await.ok(),
                    Err(_) => None,
                };
                let ok = match sent {
                    Some(resp) => {
                        let good = resp.status().is_success();
                        good && resp.into_body().collect().await.is_ok()
                    }
                    None => {
                        conn = None;
                        false
                    }
                };
                if measured {
                    let us = intended.elapsed().as_micros().max(1) as u64;
                    let _ = out.hist.record(us.min(60_000_000));
                    if ok {
                        out.ok += 1;
                    } else {
                        out.errors += 1;
                    }
                }
            }
            out
        }));
    }
    drop(rx);
    // Pacer: release tickets at their intended times.
    let start = Instant::now() + Duration::from_millis(50);
    let total = ((a.warmup + a.duration) * a.rate) as u64;
    let warm = (a.warmup * a.rate) as u64;
    let interval = 1.0 / a.rate;
    let pacer = std::thread::spawn(move || {
        // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64);
        }
        for i in 0..total {
            let t = start + Duration::from_secs_f64(i as f64 * interval);
            let now = Instant::now();
            if t > now {
                std::thread::sleep(t - now);
            }
            if tx.send_blocking((t, i >= warm)).is_err() {
                break;
            }
        }
    });
    let measure_start = start + Duration::from_secs_f64(a.warmup);
    tokio::task::spawn_blocking(move || pacer.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "pacer thread panicked".to_string())?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let (mut ok, mut errors) = (0, 0);
    for t in tasks {
        let o = t.await.map_err(|e| e.to_string())?;
        hist.add(&o.hist).map_err(|e| e.to_string())?;
        ok += o.ok;
        errors += o.errors;
    }
    let elapsed = measure_start.elapsed().as_secs_f64();
    let achieved = ok as f64 / elapsed.max(a.duration);
    let q = |p: f64| hist.value_at_quantile(p);
    println!(
        "{{\"label\":\"{}\",\"offered_rps\":{},\"achieved_rps\":{:.0},\"ok\":{ok},\"errors\":{errors},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{}}}",
        a.label,
        a.rate,
        achieved,
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        hist.max()
    );
    Ok(())
}
