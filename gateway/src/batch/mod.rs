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

use store::LineResult;

use dashmap::DashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use tokio::sync::{oneshot, watch};

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
    /// To the writer thread: a request's result, and who waits for its commit.
    writer: std::sync::mpsc::Sender<Recorded>,
}

/// A request's result (of a batch, by id), and who waits for its commit.
type Recorded = (String, LineResult, oneshot::Sender<Result<(), String>>);

/// Most results committed in one transaction.
const MAX_GROUP: usize = 256;

/// The writer thread: commits results as they come, all those waiting in one transaction
/// (a group commit: a batch's requests end in bursts, and a commit apiece would hold a
/// blocking thread and a connection each).
fn write_results(store: &BatchStore, rx: std::sync::mpsc::Receiver<Recorded>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        let rows: Vec<(&str, &LineResult)> =
            group.iter().map(|(b, r, _)| (b.as_str(), r)).collect();
        let done = store.record_all(&rows).map_err(|e| e.to_string());
        if let Err(e) = &done {
            tracing::error!(error = %e, results = rows.len(), "batch results not committed");
        }
        for (_, _, waiting) in group {
            let _ = waiting.send(done.clone());
        }
    }
}

impl Batches {
    /// The store, and its writer thread started.
    pub fn new(store: BatchStore) -> Result<Self, String> {
        let store = Arc::new(store);
        let (writer, rx) = std::sync::mpsc::channel();
        let s = store.clone();
        std::thread::Builder::new()
            .name("batch-writer".into())
            .spawn(move || write_results(&s, rx))
            .map_err(|e| format!("batches: no writer thread: {e}"))?;
        Ok(Self {
            store,
            writer,
            running: DashMap::new(),
            running_count: watch::channel(0).0,
            runtime: OnceLock::new(),
            answered: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// Runs `f` on the store from the blocking pool.
    pub async fn on_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&BatchStore) -> Result<T, BatchStoreError> + Send + 'static,
    ) -> Result<T, BatchStoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| BatchStoreError::Join(e.to_string()))?
    }

    /// Records a request's result of batch `batch`; returns once it is committed.
    pub async fn record(&self, batch: String, result: LineResult) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        let gone = || "batches: the writer thread is gone".to_string();
        self.writer.send((batch, result, tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
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
