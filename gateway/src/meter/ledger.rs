//! The ledger's writer thread and its handle.

use super::UsageRecord;
use crate::config::Synchronous;
use rusqlite::{params, Connection};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Most records committed in one transaction.
const MAX_BATCH: usize = 4096;
/// How long records nobody waits for may gather before a commit.
const GATHER: std::time::Duration = std::time::Duration::from_millis(5);
/// Records that may wait for the writer before senders wait too.
const QUEUE: usize = 65536;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("usage database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("usage database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("cannot start the ledger writer: {0}")]
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
    Usage(UsageRecord, Option<oneshot::Sender<bool>>),
    Audit(AuditEntry),
}

struct Counters {
    written: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

/// Handle to the writer (cheap to clone).
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
    pub path: PathBuf,
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
    /// Opens the database and starts the writer thread.
    pub fn start(path: &Path, sync: Synchronous) -> Result<Self, LedgerError> {
        let conn = open(path, sync)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters {
            written: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        // Checkpoints (which fsync the database file) run on their own connection and
        // thread, so that the writer's commits never wait behind one.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let checkpointer = Connection::open(path).map_err(|source| LedgerError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let c = counters.clone();
        std::thread::Builder::new()
            .name("ledger".into())
            .spawn(move || writer(conn, rx, &c))
            .map_err(LedgerError::Thread)?;
        std::thread::Builder::new()
            .name("ledger-checkpoint".into())
            .spawn(move || checkpoints(checkpointer))
            .map_err(LedgerError::Thread)?;
        Ok(Self {
            tx,
            counters,
            path: path.to_path_buf(),
        })
    }

    /// Records and waits until the record is committed (`false`: it could not be).
    pub async fn record_durable(&self, r: UsageRecord) -> bool {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Usage(r, Some(ack))).await.is_err() {
            return false;
        }
        done.await.unwrap_or(false)
    }

    /// Queues a record, waiting only for room in the queue (not for the commit).
    pub async fn record_queued(&self, r: UsageRecord) {
        if self.tx.send(Msg::Usage(r, None)).await.is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records without waiting (from places that cannot wait: drops).
    pub fn record(&self, r: UsageRecord) {
        if self.tx.try_send(Msg::Usage(r, None)).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!("usage ledger queue full: a usage record was dropped");
        }
    }

    pub fn audit(&self, e: AuditEntry) {
        if self.tx.try_send(Msg::Audit(e)).is_err() {
            tracing::error!("usage ledger queue full: an audit entry was dropped");
        }
    }

    /// (written, failed to write, dropped) records so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.counters.written.load(Ordering::Relaxed),
            self.counters.failed.load(Ordering::Relaxed),
            self.counters.dropped.load(Ordering::Relaxed),
        )
    }
}

fn drain(rx: &mut mpsc::Receiver<Msg>, batch: &mut Vec<Msg>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(m) => batch.push(m),
            Err(_) => break,
        }
    }
}

fn writer(mut conn: Connection, mut rx: mpsc::Receiver<Msg>, counters: &Counters) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        drain(&mut rx, &mut batch);
        let waited_for = batch.iter().any(|m| matches!(m, Msg::Usage(_, Some(_))));
        if !waited_for && batch.len() < MAX_BATCH {
            // Nobody waits on this batch: let more records gather, so that a busy gateway
            // commits a few hundred times a second rather than once per record.
            std::thread::sleep(GATHER);
            drain(&mut rx, &mut batch);
        }
        let n = batch.len() as u64;
        let ok = match commit(&mut conn, &batch) {
            Ok(()) => {
                counters.written.fetch_add(n, Ordering::Relaxed);
                true
            }
            Err(e) => {
                counters.failed.fetch_add(n, Ordering::Relaxed);
                tracing::error!(error = %e, records = n, "usage ledger: commit failed");
                false
            }
        };
        for m in batch.drain(..) {
            if let Msg::Usage(_, Some(ack)) = m {
                let _ = ack.send(ok);
            }
        }
    }
}

/// A passive checkpoint every second (it never blocks the writer), for as long as the
/// process runs.
fn checkpoints(conn: Connection) {
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "usage ledger: checkpoint failed");
        }
    }
}

fn commit(conn: &mut Connection, batch: &[Msg]) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction()?;
    {
        let mut usage = tx.prepare_cached(
            "INSERT INTO usage (ts_ms, request_id, tenant, model, worker, input_tokens, output_tokens, weighted_tokens, status, ttft_ms, duration_ms, best_effort, cached_tokens)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?;
        let mut audit = tx.prepare_cached(
            "INSERT INTO audit (ts_ms, actor, action, detail) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for m in batch {
            match m {
                Msg::Usage(r, _) => {
                    usage.execute(params![
                        r.ts_ms,
                        r.request_id,
                        r.tenant,
                        r.model,
                        r.worker,
                        r.input_tokens,
                        r.output_tokens,
                        r.weighted_tokens,
                        r.status,
                        r.ttft_ms,
                        r.duration_ms,
                        r.best_effort,
                        r.cached_tokens,
                    ])?;
                }
                Msg::Audit(e) => {
                    audit.execute(params![e.ts_ms, e.actor, e.action, e.detail])?;
                }
            }
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_from_before_cached_tokens_gains_the_column() {
        let dir = std::env::temp_dir().join(format!("tollgate-migrate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("old.db");
        let _ = std::fs::remove_file(&path);
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE usage (ts_ms INTEGER NOT NULL, request_id TEXT NOT NULL,
                    tenant TEXT NOT NULL, model TEXT NOT NULL, worker TEXT NOT NULL,
                    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
                    weighted_tokens REAL NOT NULL, status TEXT NOT NULL, ttft_ms REAL,
                    duration_ms REAL NOT NULL, best_effort INTEGER NOT NULL);
                 INSERT INTO usage VALUES (1, 'old', 't', 'm', 'w', 5, 1, 8.0, '200', NULL, 1.0, 0);",
            )
            .unwrap();
        }
        let c = open(&path, Synchronous::Normal).unwrap();
        let old: i64 = c
            .query_row(
                "SELECT cached_tokens FROM usage WHERE request_id = 'old'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 0, "rows from before read as nothing cached");
        drop(c);
        // Opened again, it is left as it is.
        let c = open(&path, Synchronous::Normal).unwrap();
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
        drop(c);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
