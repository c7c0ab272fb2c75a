//! The engine when its device fails mid-generation (on the CUDA backend over the CPU
//! emulator, with the emulator's fault injection standing in for a sticky CUDA error):
//! the sequences in flight end with an error instead of hanging, the engine leaves
//! rotation (its probe fails, new requests are refused at once, so the gateway retries
//! them elsewhere), it builds its backend again, retrying while the device cannot be
//! opened, and then serves the same greedy tokens as before the fault.
//!
//! The fault injection is process-wide, so this test has a binary of its own.

#[path = "suite/common/mod.rs"]
mod common;
use common::worker_req as req;
use futures::StreamExt;
use gateway::config::{BackendKind, EngineConfig};
use gateway::engine::EngineWorker;
use gateway::worker::{Worker, WorkerError, WorkerEvent};
use kernels::cuda::emu;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The text of a request run to its end.
async fn greedy(w: &EngineWorker, prompt: &str) -> String {
    let mut s = w.submit(req(prompt, 24)).await.unwrap();
    let mut text = String::new();
    while let Some(ev) = s.next().await {
        match ev.unwrap() {
            WorkerEvent::Prompt { .. } | WorkerEvent::Embedding(_) => {}
            WorkerEvent::Delta { text: t, .. } => text.push_str(&t),
            WorkerEvent::Done { .. } => return text,
        }
    }
    panic!("no Done event");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_fault_fails_the_sequences_in_flight_takes_the_engine_out_of_rotation_and_it_recovers(
) {
    if !common::emulator_present() {
        return;
    }
    let (_dir, loaded) = common::synthetic_model();
    let cfg = EngineConfig {
        backend: BackendKind::Emulator,
        threads: 2,
        kv_tokens: Some(2048),
        ..EngineConfig::default()
    };
    let e = Arc::new(EngineWorker::start("faulty".into(), &loaded, &cfg, 0).unwrap());
    let before = greedy(&e, "the same prompt before and after").await;
    assert!(e.probe().await.is_ok());

    // A long generation is under way when the device fails.
    let mut long = e.submit(req("a long answer", 500)).await.unwrap();
    for _ in 0..3 {
        assert!(matches!(
            long.next().await,
            Some(Ok(WorkerEvent::Delta { .. }))
        ));
    }
    // While the device cannot be opened again, the engine stays out of service.
    emu::refuse_opens(true);
    emu::fault_open_devices();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match long.next().await {
                Some(Ok(WorkerEvent::Delta { .. })) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the sequence in flight must end, not hang");
    match ended {
        Some(Err(WorkerError::Protocol(m))) => assert!(m.contains("injected"), "{m}"),
        other => panic!("expected the step's error, got {other:?}"),
    }
    assert_eq!(e.stats().faults.load(Ordering::Relaxed), 1);
    match e.probe().await {
        Err(WorkerError::Unreachable(m)) => assert!(m.contains("device failed"), "{m}"),
        other => panic!("a faulted engine must fail its probe, got {other:?}"),
    }
    // New work is refused at once (retryable elsewhere), not queued behind the rebuild.
    let t = Instant::now();
    match e.submit(req("refused", 8)).await {
        Err(w @ WorkerError::Unreachable(_)) => assert!(w.retryable() && w.counts_against_worker()),
        Err(other) => panic!("expected Unreachable, got {other:?}"),
        Ok(_) => panic!("a faulted engine must refuse new work"),
    }
    assert!(t.elapsed() < Duration::from_secs(1));
    // At least one rebuild fails (the device is refused) before it is let back.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        e.probe().await.is_err(),
        "still out while the device is refused"
    );
    emu::refuse_opens(false);
    let t = Instant::now();
    while e.probe().await.is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the engine did not recover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(e.stats().kv_blocks_used.load(Ordering::Relaxed), 0);
    // The rebuilt backend gives the same greedy tokens as the one before the fault.
    assert_eq!(greedy(&e, "the same prompt before and after").await, before);
    assert_eq!(e.engine_counters().unwrap().device_faults, 1);
}
