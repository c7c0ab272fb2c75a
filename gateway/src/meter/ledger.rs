//! The ledger: the request path's handle on the usage journal (`journal`), and the thread
//! that copies the journal into SQLite together with the operators' audit entries.
//!
//! A request appends its record itself (one `write(2)`, no other thread involved); with
//! `synchronous = "full"` it then waits for the ledger thread's next `fdatasync` of the
//! segment, shared by every record appended meanwhile. Every `TICK` the thread reads what
//! was appended since its last pass and commits it in one transaction with the new read
//! position; a segment past `SEGMENT_BYTES` is swapped for a new one and removed once it is
//! copied whole.

mod copier;
mod recovery;

use copier::{checkpoints, Copier, Tail};
pub use recovery::recover;
use recovery::recover_with;

use super::journal::{self, Segment};
use super::UsageRecord;
use crate::config::Synchronous;
use arc_swap::ArcSwapOption;
use rusqlite::{params, Connection, OptionalExtension};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How often the journal is copied into the database.
const TICK: Duration = Duration::from_millis(10);
/// A segment this long is swapped for a new one.
const SEGMENT_BYTES: u64 = 16 << 20;
/// Most segments appended to at once (one per CPU up to this).
const MAX_SHARDS: usize = 16;
/// How long closing waits for appends in flight into the last segment.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("usage database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("usage database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("usage journal: {0}")]
    Journal(#[from] std::io::Error),
    #[error("cannot start the ledger thread: {0}")]
    Thread(std::io::Error),
}

/// One change an operator applied (config reload), for the audit log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditEntry {
    pub ts_ms: i64,
    /// Who asked: `"admin-api"`, `"sighup"`, `"file-watch"`.
    pub actor: String,
    pub action: String,
    pub detail: String,
}

enum Msg {
    Audit(AuditEntry),
    /// Put what was appended to this segment on the disk, then answer.
    Sync(Arc<Segment>, oneshot::Sender<bool>),
    /// Copy everything appended so far into the database, then answer.
    Flush(oneshot::Sender<bool>),
    /// Take no more appends; copy the last segment whole and remove it, then answer.
    Close(oneshot::Sender<bool>),
}

#[derive(Default)]
struct Counters {
    journaled: AtomicU64,
    written: AtomicU64,
    failed: AtomicU64,
}

/// The live segments, one per shard (`None` once closed).
type Shards = Arc<[ArcSwapOption<Segment>]>;

/// Handle to the journal and the ledger thread (cheap to clone).
#[derive(Clone)]
pub struct Ledger {
    shards: Shards,
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
    sync: Synchronous,
}

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage (
    ts_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    worker TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    weighted_tokens REAL NOT NULL,
    status TEXT NOT NULL,
    ttft_ms REAL,
    duration_ms REAL NOT NULL,
    best_effort INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts_ms, tenant);
-- How far each journal segment has been copied (bytes), committed with what it copied.
CREATE TABLE IF NOT EXISTS usage_log (
    segment TEXT PRIMARY KEY,
    copied INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    ts_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
";

/// Opens (creating) the database with the ledger's schema and pragmas.
pub fn open(path: &Path, sync: Synchronous) -> Result<Connection, LedgerError> {
    let conn = Connection::open(path).map_err(|source| LedgerError::Open {
        path: path.display().to_string(),
        source,
    })?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match sync {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        },
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA)?;
    migrate(&conn)?;
    Ok(conn)
}

/// Brings a ledger written by an earlier version up to [`SCHEMA`]: columns added since are
/// added, with their defaults for the rows already there.
fn migrate(conn: &Connection) -> Result<(), rusqlite::Error> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('usage')")?;
    let columns: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if !columns.iter().any(|c| c == "cached_tokens") {
        conn.execute_batch(
            "ALTER TABLE usage ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    Ok(())
}

impl Ledger {
    /// Opens the database, copies into it what earlier processes left in their journals,
    /// and starts the ledger thread on a new segment.
    pub fn start(path: &Path, sync: Synchronous) -> Result<Self, LedgerError> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::start_with(path, sync, SEGMENT_BYTES, cpus.min(MAX_SHARDS))
    }

    /// As [`Ledger::start`], with segments of `segment_bytes` and `shards` segments
    /// appended to at once.
    fn start_with(
        path: &Path,
        sync: Synchronous,
        segment_bytes: u64,
        shards: usize,
    ) -> Result<Self, LedgerError> {
        let mut conn = open(path, sync)?;
        let counters = Arc::new(Counters::default());
        let (written, damaged) = recover_with(&mut conn, path)?;
        counters.failed.fetch_add(damaged, Ordering::Relaxed);
        if written > 0 || damaged > 0 {
            tracing::info!(
                records = written,
                damaged,
                "usage ledger: copied what earlier processes left in their journals"
            );
        }
        // Checkpoints (which fsync the database file) run on their own connection and
        // thread, so that the ledger's commits never wait behind one.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let checkpointer = Connection::open(path).map_err(|source| LedgerError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let mut tails = Vec::new();
        let mut live = Vec::new();
        for shard in 0..shards.max(1) {
            let seg = Arc::new(Segment::create(path, super::unix_ms(), shard as u64)?);
            tails.push(Tail::new(seg.clone(), shard)?);
            live.push(ArcSwapOption::from(Some(seg)));
        }
        let shards: Shards = live.into();
        let (tx, rx) = mpsc::channel();
        let mut copier = Copier {
            conn,
            db: path.to_path_buf(),
            rx,
            counters: counters.clone(),
            shards: shards.clone(),
            next_segment: tails.len() as u64,
            tails,
            audits: Vec::new(),
            segment_bytes,
        };
        std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || copier.run())
            .map_err(LedgerError::Thread)?;
        std::thread::Builder::new()
            .name("ledger-checkpoint".into())
            .spawn(move || checkpoints(checkpointer))
            .map_err(LedgerError::Thread)?;
        Ok(Self {
            shards,
            tx,
            counters,
            sync,
        })
    }

    /// Appends `r` to the journal: the segment it went to, or `None` (logged and counted)
    /// where it could not be written.
    fn append(&self, r: &UsageRecord) -> Option<Arc<Segment>> {
        let shard = &self.shards[thread_shard(self.shards.len())];
        let result = match (journal::encode(r), shard.load_full()) {
            (Ok(frame), Some(seg)) => seg.append(&frame).map(|()| seg),
            (Err(e), _) => Err(std::io::Error::other(e)),
            (_, None) => Err(std::io::Error::other("the ledger is closed")),
        };
        match result {
            Ok(seg) => {
                self.counters.journaled.fetch_add(1, Ordering::Relaxed);
                Some(seg)
            }
            Err(e) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, request_id = %r.request_id, "usage record lost");
                None
            }
        }
    }

    /// Records `r` and returns once it is durable: appended (it survives a crash of the
    /// process), and with `synchronous = "full"` on the disk. `false`: it could not be.
    pub async fn record_durable(&self, r: UsageRecord) -> bool {
        let Some(seg) = self.append(&r) else {
            return false;
        };
        if self.sync == Synchronous::Normal {
            return true;
        }
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Sync(seg, ack)).is_err() {
            return false;
        }
        done.await.unwrap_or(false)
    }

    /// Records `r` without waiting for the disk (it is appended before this returns).
    pub fn record(&self, r: UsageRecord) {
        self.append(&r);
    }

    pub fn audit(&self, e: AuditEntry) {
        if self.tx.send(Msg::Audit(e)).is_err() {
            tracing::error!("usage ledger thread is gone: an audit entry was lost");
        }
    }

    /// Returns once everything recorded so far is in the database (`false`: a commit
    /// failed; the records stay in the journal for the next try).
    pub async fn flush(&self) -> bool {
        let (ack, done) = oneshot::channel();
        self.tx.send(Msg::Flush(ack)).is_ok() && done.await.unwrap_or(false)
    }

    /// Takes no more records (they are counted as failed), copies the last segment into
    /// the database and removes it. For the end of the process.
    pub async fn close(&self) -> bool {
        let (ack, done) = oneshot::channel();
        self.tx.send(Msg::Close(ack)).is_ok() && done.await.unwrap_or(false)
    }

    /// (appended to the journal, written to the database, lost or damaged) records so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.counters.journaled.load(Ordering::Relaxed),
            self.counters.written.load(Ordering::Relaxed),
            self.counters.failed.load(Ordering::Relaxed),
        )
    }
}

/// This thread's shard of `n`: threads take shards in turn, so that few threads share a
/// segment (appends to one file wait for each other on its inode's lock, and a thread
/// descheduled while holding it would hold up the others).
fn thread_shard(n: usize) -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local!(static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed));
    SHARD.with(|s| *s % n)
}

#[cfg(test)]
mod tests;
