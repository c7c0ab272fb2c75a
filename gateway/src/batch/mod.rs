//! The Batch API's engine room (`[batches] enabled = true`): tenants' files and batches in
//! SQLite ([`store`]), a batch's input file read and checked ([`input`]), and the runner
//! that sends each of its requests through the same pipeline as a tenant's own
//! ([`runner`]): held to the tenant's contract, at the lowest scheduling weight, waiting
//! out 429s and 503s rather than failing. The HTTP side is `api::files` and `api::batches`.
//!
//! A batch runs apart from any connection, a bounded number of its requests at once, each
//! result committed as it ends; a gateway that stops (drained, or killed) resumes its
//! unfinished batches at the next start and runs only the requests not yet done.

pub mod input;
pub mod runner;
pub mod store;

pub use store::{BatchRow, BatchStore, BatchStoreError, FileRow};

use dashmap::DashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use tokio::sync::watch;

/// Why a running batch is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    /// Run on.
    No,
    /// The tenant cancelled it: its unrun requests are not run.
    Cancel,
    /// The gateway is shutting down: the next start runs what is left.
    Drain,
}

/// The store and the batches running in this process.
pub struct Batches {
    pub store: Arc<BatchStore>,
    /// Running batches by id, and how to stop each.
    running: DashMap<String, watch::Sender<Halt>>,
    /// How many run (for a draining server to wait on).
    running_count: watch::Sender<usize>,
    /// Where batches run: the runtime the server started on (a per-core serving thread's
    /// runtime ends with its connections).
    runtime: OnceLock<tokio::runtime::Handle>,
    /// Batch requests this process ran to a result: answered 2xx, and otherwise.
    pub answered: AtomicU64,
    pub refused: AtomicU64,
}

impl Batches {
    pub fn new(store: BatchStore) -> Self {
        Self {
            store: Arc::new(store),
            running: DashMap::new(),
            running_count: watch::channel(0).0,
            runtime: OnceLock::new(),
            answered: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Asks batch `id`, if it runs here, to stop for `why`.
    pub fn halt(&self, id: &str, why: Halt) {
        if let Some(tx) = self.running.get(id) {
            tx.send_replace(why);
        }
    }

    /// Asks every running batch to stop: the gateway is shutting down.
    pub fn drain(&self) {
        for tx in self.running.iter() {
            tx.send_if_modified(|h| match h {
                Halt::No => {
                    *h = Halt::Drain;
                    true
                }
                _ => false,
            });
        }
    }

    /// How many batches run now.
    pub fn running(&self) -> usize {
        *self.running_count.borrow()
    }

    /// How many batches run, as it changes.
    pub fn running_count(&self) -> watch::Receiver<usize> {
        self.running_count.subscribe()
    }
}

/// Unregisters a batch when its run ends, however it ends.
struct Registered {
    batches: Arc<Batches>,
    id: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.batches.running.remove(&self.id);
        self.batches
            .running_count
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}
