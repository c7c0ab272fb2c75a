//! A device fault: the failed step's sequences fail, and with a fault every other one; the
//! backend is dropped and built again until one passes its self-check, while arrivals fail
//! at once.

use super::kv_pools::KvPools;
use super::outbox::Outbox;
use super::run::{Engine, Turn};
use super::seq::NewSeq;
use crate::worker::WorkerError;
use kernels::backend::Backend;
use kernels::forward::StepError;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

impl Engine {
    /// A failed step: its sequences (`failed`, indices in `running`) fail. A device fault
    /// fails every other sequence too, and the backend is to be built again.
    pub(super) fn fail(&mut self, e: StepError, mut failed: Vec<usize>) -> Turn {
        tracing::error!(error = %e, "engine step failed; failing its sequences");
        self.flight = None;
        self.plan_after = false;
        // Out of service before any client hears of the failure.
        let fault = match &e {
            StepError::Device(why) => {
                let why = format!("the engine's device failed ({why}); rebuilding it");
                self.stats.faults.fetch_add(1, Ordering::Relaxed);
                self.stats.set_fault(Some(why.clone()));
                Some(why)
            }
            StepError::BadBatch(_) => None,
        };
        failed.sort_unstable_by(|a, b| b.cmp(a));
        failed.dedup();
        for i in failed {
            let mut s = self.running.remove(i);
            self.outbox.push(
                &s.tx,
                Err(WorkerError::Protocol(format!("engine step failed: {e}"))),
            );
            self.pool.release(&mut s.blocks);
        }
        self.outbox.flush();
        let Some(why) = fault else {
            return Turn::Go;
        };
        // The device is in doubt (a CUDA error is sticky: every later call fails too):
        // nothing more runs on it. The engine's other sequences fail now (the gateway
        // retries those that sent nothing yet on another worker), and the backend is built
        // again from scratch.
        for s in self.running.drain(..).chain(self.waiting.drain(..)) {
            self.outbox
                .push(&s.tx, Err(WorkerError::Unreachable(why.clone())));
        }
        self.outbox.flush();
        self.publish();
        Turn::Fault(why)
    }

    /// After the backend was built again: a fresh cache, and back in service.
    pub(super) fn rebuilt(&mut self, backend: &dyn Backend) {
        self.on_device = backend.samples_on_device();
        self.pool = KvPools::for_backend(backend, self.limits.prefix_caching);
        self.fair.reset();
        self.stats.set_fault(None);
        self.publish();
        tracing::info!(
            backend = backend.name(),
            "engine rebuilt after a device fault; serving again"
        );
    }
}

/// Builds the engine's backend again (after a device fault).
pub(super) type Rebuild = Box<dyn FnMut() -> Result<Box<dyn Backend>, String> + Send>;

/// After a device fault: drops the failed backend (its device memory and context with
/// it), then builds a new one until one passes its self-check, waiting 0.5 s, 1 s, 2 s, …
/// (at most 30 s) between tries. Requests that arrive meanwhile fail at once. `None` when
/// every submitter is gone.
pub(super) fn recover(
    failed: Box<dyn Backend>,
    rebuild: &mut Rebuild,
    rx: &mpsc::Receiver<NewSeq>,
    outbox: &mut Outbox,
    why: &str,
) -> Option<Box<dyn Backend>> {
    // A library may panic tearing down after a device fault (cudarc unwraps
    // cublasDestroy's status): that must not end the engine thread.
    let teardown = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(failed)));
    if teardown.is_err() {
        tracing::error!("tearing down the failed backend panicked; building a new one anyway");
    }
    let mut wait = std::time::Duration::from_millis(500);
    for attempt in 1u32.. {
        match rebuild() {
            Ok(b) => return Some(b),
            Err(e) => {
                tracing::error!(attempt, error = %e, retry_in = ?wait, "rebuilding the engine's backend failed");
            }
        }
        let until = std::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(n) => {
                    outbox.push(&n.tx, Err(WorkerError::Unreachable(why.to_string())));
                    outbox.flush();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
        wait = (wait * 2).min(std::time::Duration::from_secs(30));
    }
    None
}
