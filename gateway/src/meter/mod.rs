//! Metering: a durable usage record for every finished request, and the operators' audit
//! log, in an embedded SQLite database (WAL mode).
//!
//! A request appends its own record to the usage journal (`journal`: files of this
//! process's in a folder beside the database, one `write(2)` per record, no other thread
//! woken); the
//! ledger's thread copies the journal into SQLite every few milliseconds, in one
//! transaction per pass that also stores how far it has read, so every record lands in
//! the database exactly once, also across crashes (the next ledger on the same database,
//! or `gateway usage`, copies what a dead process left).
//!
//! **What is durable when.** A completed request's record is written *before* its last
//! bytes are sent: for a streamed answer, before the final SSE frames (the usage chunk and
//! `data: [DONE]`); for a whole JSON answer, before the body. So every answer a client
//! received in full is on record, and survives a `kill -9` of the gateway that follows
//! (with `metering.synchronous = "normal"`, the record is in the OS's page cache: it
//! survives the process, not a power loss; with `"full"` the request also waits for an
//! `fdatasync` of the journal, one shared by every record appended meanwhile, and survives
//! both). Requests that end otherwise (refused, failed, cancelled by the client) are
//! recorded the same way without waiting for the disk. Requests refused before the
//! pipeline (bad JSON, unknown key) are not metered. With `metering.wait_for_commit =
//! false` no request waits for the disk, also under `"full"`.

pub mod export;
mod journal;
mod ledger;

pub use ledger::{recover, AuditEntry, Ledger, LedgerError};

/// One finished request.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UsageRecord {
    /// When it ended, Unix milliseconds.
    pub ts_ms: i64,
    pub request_id: String,
    pub tenant: String,
    pub model: String,
    /// The worker that served it (empty when none did).
    pub worker: String,
    pub input_tokens: u32,
    /// Of the input tokens, those the worker served from its prefix cache.
    pub cached_tokens: u32,
    pub output_tokens: u32,
    /// `input + output_weight × output` (the cached input tokens at the model's
    /// `cached_input_weight`), as charged to the tenant's contract.
    pub weighted_tokens: f64,
    /// `"200"`, `"429"`, `"503"`, `"cancelled"`, `"stream_error"`, …
    pub status: String,
    pub ttft_ms: Option<f64>,
    pub duration_ms: f64,
    /// Admitted past contract under `overflow = "best_effort"`.
    pub best_effort: bool,
}

/// Unix milliseconds now.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
