//! Metering: a durable usage record for every finished request, and the operators' audit
//! log, in an embedded SQLite database (WAL mode).
//!
//! Records go over a bounded channel to one writer thread, which commits whatever has
//! queued up in one transaction (group commit) and then acknowledges each record. The
//! request path never touches SQLite.
//!
//! **What is durable when.** A completed request's record is committed *before* its last
//! bytes are sent: for a streamed answer, before the final SSE frames (the usage chunk and
//! `data: [DONE]`); for a whole JSON answer, before the body. So every answer a client
//! received in full has its record in the database, and survives a `kill -9` of the gateway
//! that follows (with `metering.synchronous = "normal"`, the commit is in the OS's page
//! cache: it survives the process, not a power loss; `"full"` fsyncs each batch and
//! survives both). Requests that end otherwise (refused, failed, cancelled by the client)
//! are recorded without waiting: a crash in the milliseconds after may lose those records.
//! Requests refused before the pipeline (bad JSON, unknown key) are not metered. With
//! `metering.wait_for_commit = false` no record is waited for (lower latency; a crash
//! loses the last few milliseconds of records).

pub mod export;
mod ledger;

pub use ledger::{AuditEntry, Ledger, LedgerError};

/// One finished request.
#[derive(Debug, Clone)]
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
