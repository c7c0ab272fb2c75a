//! The engine when a step does not return (on the CUDA backend over the CPU emulator, whose
//! launches are made to wait, as a GPU stuck in a kernel): past `step_timeout_secs` the
//! engine leaves rotation (its probe fails and it refuses new work, so the gateway sends
//! requests elsewhere); when the step returns it is back, and the request in flight ends
//! normally.
//!
//! The stall is injected process-wide, so this test has a binary of its own.

#[path = "suite/common/mod.rs"]
mod common;
use common::worker_req;
use futures::StreamExt;
use gateway::config::{BackendKind, EngineConfig};
use gateway::engine::EngineWorker;
use gateway::worker::{Worker, WorkerError, WorkerEvent};
use kernels::cuda::emu;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn a_step_past_its_timeout_takes_the_engine_out_of_rotation_until_it_returns() {
    if !common::emulator_present() {
        return;
    }
    let (_dir, loaded) = common::synthetic_model();
    let cfg = EngineConfig {
        backend: BackendKind::Emulator,
        threads: 2,
        kv_tokens: Some(1024),
        step_timeout_secs: 0.3,
        ..EngineConfig::default()
    };
    let e = Arc::new(EngineWorker::start("stuck".into(), &loaded, &cfg, 0).unwrap());
    assert!(e.probe().await.is_ok());
    // Each launch now waits 100 ms: a step (dozens of launches) runs for seconds.
    emu::stall_launches(Duration::from_millis(100));
    let mut s = e.submit(worker_req("a prompt", 2)).await.unwrap();
    let t = Instant::now();
    let why = loop {
        match e.probe().await {
            Err(WorkerError::Unreachable(m)) => break m,
            Err(other) => panic!("unexpected probe error {other:?}"),
            Ok(()) => {}
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the stuck step never took the engine out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(why.contains("may be stuck"), "{why}");
    match e.submit(worker_req("a prompt", 2)).await {
        Err(WorkerError::Unreachable(_)) => {}
        Err(other) => panic!("expected Unreachable, got {other:?}"),
        Ok(_) => panic!("an engine out of rotation must refuse new work"),
    }
    // The step returns: the engine is back, and the request in flight ends as usual.
    emu::stall_launches(Duration::ZERO);
    let mut done = false;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(60), s.next())
        .await
        .expect("the request in flight must end")
    {
        if let WorkerEvent::Done { .. } = ev.unwrap() {
            done = true;
        }
    }
    assert!(done);
    assert!(
        e.probe().await.is_ok(),
        "back in rotation once the step returned"
    );
}
