//! The Batch API's database (SQLite, WAL): tenants' files (their bytes in the row), batches,
//! and each batch's results so far, one row a request, committed as each request ends —
//! so a gateway that stops, cleanly or not, loses no finished request, and the next start
//! runs only those not done. A batch's end writes its output and error files and drops
//! its result rows in one transaction. Every row belongs to one tenant: another tenant's
//! id reads as not found. Files and ended batches expire after `retention_hours`.
//!
//! Every call blocks: callers run them from the blocking pool.

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum BatchStoreError {
    #[error("batch store: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("batch store: no connection: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("batch store: a blocking task failed: {0}")]
    Join(String),
}

type Result<T> = std::result::Result<T, BatchStoreError>;

/// Seconds since the Unix epoch (the API's timestamps).
pub fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    content BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_tenant ON files (tenant);
CREATE INDEX IF NOT EXISTS files_expiry ON files (expires_at);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    -- When an ended batch is purged (a running one: far ahead).
    purge_at INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    metadata TEXT,
    errors TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    expires_at INTEGER NOT NULL,
    in_progress_at INTEGER,
    finalizing_at INTEGER,
    completed_at INTEGER,
    failed_at INTEGER,
    expired_at INTEGER,
    cancelling_at INTEGER,
    cancelled_at INTEGER,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    -- How long its output and error files are kept (seconds), where the request said.
    output_keep_s INTEGER,
    -- The model its requests ask for, where they all ask for one.
    model TEXT
);
CREATE INDEX IF NOT EXISTS batches_by_tenant ON batches (tenant);
CREATE INDEX IF NOT EXISTS batches_by_status ON batches (status);
-- A running batch's finished requests (by their line in its input file).
CREATE TABLE IF NOT EXISTS batch_results (
    batch TEXT NOT NULL,
    line INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    output TEXT NOT NULL,
    PRIMARY KEY (batch, line)
);
";

/// A stored file, without its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRow {
    pub id: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub filename: String,
    pub purpose: String,
    pub bytes: i64,
}

/// A batch as stored.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchRow {
    pub id: String,
    pub tenant: String,
    pub created_at: i64,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: String,
    /// JSON object, as the request gave it.
    pub metadata: Option<String>,
    /// JSON array of the input file's faults (a batch that failed validation).
    pub errors: Option<String>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub expires_at: i64,
    pub in_progress_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
    pub input_tokens: i64,
    pub cached_tokens: i64,
    pub output_tokens: i64,
    /// How long its output and error files are kept, in seconds (else `retention_hours`).
    pub output_keep_s: Option<i64>,
    /// The model its requests ask for, where they all ask for the same (once checked).
    pub model: Option<String>,
}

/// What one tenant keeps (`GET /admin/batches`).
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct TenantBatches {
    pub tenant: String,
    pub files: u64,
    /// The files' bytes (a batch's output files included).
    pub file_bytes: u64,
    pub batches: u64,
    /// Of them, those that have not ended.
    pub running: u64,
}

/// One finished request of a running batch.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LineResult {
    pub line: usize,
    /// Answered with a 2xx (its line goes to the output file, else to the error file).
    pub ok: bool,
    /// Its line of the output or error file (JSON, no newline).
    pub output: String,
    pub input_tokens: i64,
    pub cached_tokens: i64,
    pub output_tokens: i64,
}

/// How a batch ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Completed,
    Cancelled,
    Expired,
}

impl Ending {
    fn status(self) -> &'static str {
        match self {
            Ending::Completed => "completed",
            Ending::Cancelled => "cancelled",
            Ending::Expired => "expired",
        }
    }
}

/// A page of a tenant's rows, newest first (or oldest first), after a cursor.
#[derive(Debug, Clone)]
pub struct Listing<'a> {
    pub after: Option<&'a str>,
    pub limit: usize,
    pub oldest_first: bool,
    /// Files only: of this purpose.
    pub purpose: Option<&'a str>,
}

const BATCH_COLUMNS: &str =
    "id, tenant, created_at, endpoint, input_file_id, completion_window, status,
    metadata, errors, output_file_id, error_file_id, expires_at, in_progress_at, finalizing_at,
    completed_at, failed_at, expired_at, cancelling_at, cancelled_at, total, completed, failed,
    input_tokens, cached_tokens, output_tokens, output_keep_s, model";

fn batch_row(r: &Row<'_>) -> rusqlite::Result<BatchRow> {
    Ok(BatchRow {
        id: r.get(0)?,
        tenant: r.get(1)?,
        created_at: r.get(2)?,
        endpoint: r.get(3)?,
        input_file_id: r.get(4)?,
        completion_window: r.get(5)?,
        status: r.get(6)?,
        metadata: r.get(7)?,
        errors: r.get(8)?,
        output_file_id: r.get(9)?,
        error_file_id: r.get(10)?,
        expires_at: r.get(11)?,
        in_progress_at: r.get(12)?,
        finalizing_at: r.get(13)?,
        completed_at: r.get(14)?,
        failed_at: r.get(15)?,
        expired_at: r.get(16)?,
        cancelling_at: r.get(17)?,
        cancelled_at: r.get(18)?,
        total: r.get(19)?,
        completed: r.get(20)?,
        failed: r.get(21)?,
        input_tokens: r.get(22)?,
        cached_tokens: r.get(23)?,
        output_tokens: r.get(24)?,
        output_keep_s: r.get(25)?,
        model: r.get(26)?,
    })
}

/// The statuses of a batch that has not ended (what a start resumes).
const RUNNING: &str = "('validating', 'in_progress', 'finalizing', 'cancelling')";

const FILE_COLUMNS: &str = "id, created_at, expires_at, filename, purpose, bytes";

fn file_row(r: &Row<'_>) -> rusqlite::Result<FileRow> {
    Ok(FileRow {
        id: r.get(0)?,
        created_at: r.get(1)?,
        expires_at: r.get(2)?,
        filename: r.get(3)?,
        purpose: r.get(4)?,
        bytes: r.get(5)?,
    })
}

/// A new id: `prefix` and 32 hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

pub struct BatchStore {
    pool: r2d2::Pool<SqliteConnectionManager>,
    retention: Duration,
}

impl BatchStore {
    /// Opens (creating) the database at `path`; files and ended batches are kept for
    /// `retention`.
    pub fn open(path: &Path, retention: Duration) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let manager = SqliteConnectionManager::file(path).with_init(|c| {
            c.busy_timeout(Duration::from_secs(10))?;
            c.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
        });
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let pool = r2d2::Pool::builder()
            .max_size(cores.clamp(2, 8) as u32)
            .build(manager)?;
        pool.get()?.execute_batch(SCHEMA)?;
        Ok(Self { pool, retention })
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>> {
        Ok(self.pool.get()?)
    }

    fn kept_until(&self, from: i64) -> i64 {
        from.saturating_add(self.retention.as_secs() as i64)
    }

    /// What `tenant`'s unexpired files take, in bytes.
    pub fn stored_bytes(&self, tenant: &str) -> Result<u64> {
        let conn = self.conn()?;
        held(&conn, tenant)
    }

    /// Stores a file of `tenant`'s.
    pub fn put_file(
        &self,
        tenant: &str,
        filename: &str,
        purpose: &str,
        content: &[u8],
    ) -> Result<FileRow> {
        let conn = self.conn()?;
        let until = self.kept_until(now_s());
        put_file(&conn, tenant, filename, purpose, content, until)
    }

    /// Stores a file of `tenant`'s, kept `keep_s` seconds (else `retention_hours`), unless
    /// `tenant`'s files would then take more than `quota` bytes: then the bytes they take
    /// now (checked and written in one transaction, so that uploads side by side cannot
    /// pass the quota together).
    pub fn put_file_within(
        &self,
        tenant: &str,
        filename: &str,
        purpose: &str,
        content: &[u8],
        keep_s: Option<i64>,
        quota: u64,
    ) -> Result<std::result::Result<FileRow, u64>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stored = held(&tx, tenant)?;
        if stored.saturating_add(content.len() as u64) > quota {
            return Ok(Err(stored));
        }
        let now = now_s();
        let until = keep_s.map_or_else(|| self.kept_until(now), |k| now.saturating_add(k));
        let row = put_file(&tx, tenant, filename, purpose, content, until)?;
        tx.commit()?;
        Ok(Ok(row))
    }

    /// One of `tenant`'s files (unexpired).
    pub fn file(&self, tenant: &str, id: &str) -> Result<Option<FileRow>> {
        Ok(self
            .conn()?
            .query_row(
                &format!(
                    "SELECT {FILE_COLUMNS} FROM files WHERE id = ?1 AND tenant = ?2 AND expires_at > ?3"
                ),
                params![id, tenant, now_s()],
                file_row,
            )
            .optional()?)
    }

    /// The bytes of one of `tenant`'s files.
    pub fn content(&self, tenant: &str, id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT content FROM files WHERE id = ?1 AND tenant = ?2 AND expires_at > ?3",
                params![id, tenant, now_s()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// A page of `tenant`'s files, and whether more follow.
    pub fn files(&self, tenant: &str, page: &Listing<'_>) -> Result<(Vec<FileRow>, bool)> {
        let conn = self.conn()?;
        let purpose = page.purpose.unwrap_or("");
        listed(
            &conn,
            &format!(
                "SELECT {FILE_COLUMNS} FROM files WHERE tenant = ?1 AND expires_at > ?2
                 AND (?3 = '' OR purpose = ?3)"
            ),
            "files",
            tenant,
            page,
            purpose,
            file_row,
        )
    }

    /// Deletes one of `tenant`'s files: whether it had it, or the batch that has not
    /// ended and reads it (then it stays).
    pub fn delete_file(&self, tenant: &str, id: &str) -> Result<std::result::Result<bool, String>> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let reader: Option<String> = tx
            .query_row(
                &format!(
                    "SELECT id FROM batches WHERE input_file_id = ?1 AND tenant = ?2
                     AND status IN {RUNNING}"
                ),
                params![id, tenant],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(batch) = reader {
            return Ok(Err(batch));
        }
        let n = tx.execute(
            "DELETE FROM files WHERE id = ?1 AND tenant = ?2 AND expires_at > ?3",
            params![id, tenant, now_s()],
        )?;
        tx.commit()?;
        Ok(Ok(n > 0))
    }

    /// Records a new batch (its `id`, `tenant`, `created_at` and request fields set); its
    /// input file is kept at least as long as the batch may run.
    pub fn create_batch(&self, b: &BatchRow) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE files SET expires_at = MAX(expires_at, ?3) WHERE id = ?1 AND tenant = ?2",
            params![b.input_file_id, b.tenant, b.expires_at],
        )?;
        tx.execute(
            "INSERT INTO batches (id, tenant, created_at, purge_at, endpoint, input_file_id,
                 completion_window, status, metadata, expires_at, output_keep_s)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                b.id,
                b.tenant,
                b.created_at,
                i64::MAX,
                b.endpoint,
                b.input_file_id,
                b.completion_window,
                b.status,
                b.metadata,
                b.expires_at,
                b.output_keep_s
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// One of `tenant`'s batches.
    pub fn batch(&self, tenant: &str, id: &str) -> Result<Option<BatchRow>> {
        Ok(self
            .conn()?
            .query_row(
                &format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1 AND tenant = ?2"),
                params![id, tenant],
                batch_row,
            )
            .optional()?)
    }

    /// A page of `tenant`'s batches, and whether more follow.
    pub fn batches(&self, tenant: &str, page: &Listing<'_>) -> Result<(Vec<BatchRow>, bool)> {
        let conn = self.conn()?;
        listed(
            &conn,
            &format!(
                "SELECT {BATCH_COLUMNS} FROM batches WHERE tenant = ?1 AND purge_at > ?2
                 AND ?3 = ''"
            ),
            "batches",
            tenant,
            page,
            "",
            batch_row,
        )
    }

    /// Batches that have not ended, oldest first (to resume at start).
    pub fn unfinished(&self) -> Result<Vec<BatchRow>> {
        let conn = self.conn()?;
        let mut q = conn.prepare(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE status IN {RUNNING} ORDER BY created_at, id"
        ))?;
        let rows = q.query_map([], batch_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Its input checked: `total` requests, run from now (`in_progress`, unless it was
    /// cancelled meanwhile).
    pub fn start(&self, id: &str, total: usize, model: Option<&str>) -> Result<()> {
        self.conn()?.execute(
            "UPDATE batches SET total = ?2, model = ?4,
                 status = CASE status WHEN 'validating' THEN 'in_progress' ELSE status END,
                 in_progress_at = CASE status WHEN 'validating' THEN ?3 ELSE in_progress_at END
             WHERE id = ?1",
            params![id, total as i64, now_s(), model],
        )?;
        Ok(())
    }

    /// Its input refused: `errors` (a JSON array) says why.
    pub fn fail(&self, id: &str, errors: &str) -> Result<()> {
        let now = now_s();
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE batches SET status = 'failed', errors = ?2, failed_at = ?3, purge_at = ?4
             WHERE id = ?1",
            params![id, errors, now, self.kept_until(now)],
        )?;
        tx.execute("DELETE FROM batch_results WHERE batch = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    /// Asks `tenant`'s batch `id` to stop: `cancelling` where it runs (the batch as it is
    /// now, after the change; `None` where there is none).
    pub fn cancel(&self, tenant: &str, id: &str) -> Result<Option<BatchRow>> {
        let conn = self.conn()?;
        conn.execute(
            "UPDATE batches SET status = 'cancelling', cancelling_at = ?3
             WHERE id = ?1 AND tenant = ?2 AND status IN ('validating', 'in_progress')",
            params![id, tenant, now_s()],
        )?;
        Ok(conn
            .query_row(
                &format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1 AND tenant = ?2"),
                params![id, tenant],
                batch_row,
            )
            .optional()?)
    }

    /// The status of batch `id` now.
    pub fn status(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .conn()?
            .query_row("SELECT status FROM batches WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// The lines of batch `id` already done.
    pub fn done_lines(&self, id: &str) -> Result<Vec<usize>> {
        let conn = self.conn()?;
        let mut q = conn.prepare("SELECT line FROM batch_results WHERE batch = ?1")?;
        let rows = q.query_map([id], |r| r.get::<_, i64>(0))?;
        Ok(rows
            .map(|l| l.map(|l| l as usize))
            .collect::<rusqlite::Result<_>>()?)
    }

    /// Records one finished request of batch `id`, and counts it (once: a line recorded
    /// again is ignored).
    pub fn record(&self, id: &str, r: &LineResult) -> Result<()> {
        self.record_all(&[(id, r)])
    }

    /// Records finished requests (each of its batch), in one transaction.
    pub fn record_all(&self, results: &[(&str, &LineResult)]) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut put = tx.prepare_cached(
                "INSERT OR IGNORE INTO batch_results (batch, line, ok, output) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut count = tx.prepare_cached(
                "UPDATE batches SET completed = completed + ?2, failed = failed + ?3,
                     input_tokens = input_tokens + ?4, cached_tokens = cached_tokens + ?5,
                     output_tokens = output_tokens + ?6
                 WHERE id = ?1",
            )?;
            for (id, r) in results {
                if put.execute(params![id, r.line as i64, r.ok, r.output])? > 0 {
                    count.execute(params![
                        id,
                        r.ok as i64,
                        !r.ok as i64,
                        r.input_tokens,
                        r.cached_tokens,
                        r.output_tokens
                    ])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks batch `id` as writing its files (`finalizing`).
    pub fn finalizing(&self, id: &str) -> Result<()> {
        self.conn()?.execute(
            "UPDATE batches SET finalizing_at = COALESCE(finalizing_at, ?2),
                 status = CASE status WHEN 'in_progress' THEN 'finalizing' ELSE status END
             WHERE id = ?1",
            params![id, now_s()],
        )?;
        Ok(())
    }

    /// Ends batch `id`: its results (output lines in line order) become its output file
    /// and its error file (each only where it has lines), its result rows go, and its
    /// status becomes `ending`'s; all in one transaction.
    pub fn finish(&self, id: &str, ending: Ending) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some((tenant, keep_s)) = tx
            .query_row(
                "SELECT tenant, output_keep_s FROM batches WHERE id = ?1",
                [id],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?)),
            )
            .optional()?
        else {
            // Deleted while it ran (its tenant's data deleted): what it did since goes too.
            tx.execute("DELETE FROM batch_results WHERE batch = ?1", [id])?;
            tx.commit()?;
            return Ok(());
        };
        let now = now_s();
        let kept = self.kept_until(now);
        let outputs_kept = keep_s.map_or(kept, |k| now.saturating_add(k));
        let file_of = |ok: bool| -> Result<Option<String>> {
            let mut q = tx.prepare(
                "SELECT output FROM batch_results WHERE batch = ?1 AND ok = ?2 ORDER BY line",
            )?;
            let mut content = Vec::new();
            for line in q.query_map(params![id, ok], |r| r.get::<_, String>(0))? {
                content.extend_from_slice(line?.as_bytes());
                content.push(b'\n');
            }
            if content.is_empty() {
                return Ok(None);
            }
            let (name, purpose) = match ok {
                true => (format!("{id}_output.jsonl"), "batch_output"),
                false => (format!("{id}_error.jsonl"), "batch_output"),
            };
            Ok(Some(
                put_file(&tx, &tenant, &name, purpose, &content, outputs_kept)?.id,
            ))
        };
        let output = file_of(true)?;
        let errors = file_of(false)?;
        let at = match ending {
            Ending::Completed => "completed_at",
            Ending::Cancelled => "cancelled_at",
            Ending::Expired => "expired_at",
        };
        tx.execute(
            &format!(
                "UPDATE batches SET status = ?2, output_file_id = ?3, error_file_id = ?4,
                     {at} = ?5, finalizing_at = COALESCE(finalizing_at, ?5), purge_at = ?6
                 WHERE id = ?1"
            ),
            params![id, ending.status(), output, errors, now, kept],
        )?;
        tx.execute("DELETE FROM batch_results WHERE batch = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    /// What each tenant keeps: files (unexpired) and batches.
    pub fn summary(&self) -> Result<Vec<TenantBatches>> {
        let conn = self.conn()?;
        let mut by: std::collections::BTreeMap<String, TenantBatches> = Default::default();
        fn at(
            by: &mut std::collections::BTreeMap<String, TenantBatches>,
            t: String,
        ) -> &mut TenantBatches {
            by.entry(t.clone()).or_insert_with(|| TenantBatches {
                tenant: t,
                ..TenantBatches::default()
            })
        }
        let mut q = conn.prepare(
            "SELECT tenant, COUNT(*), COALESCE(SUM(bytes), 0) FROM files WHERE expires_at > ?1
             GROUP BY tenant",
        )?;
        let files = q.query_map([now_s()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let files = files.collect::<rusqlite::Result<Vec<_>>>()?;
        let mut q = conn.prepare(&format!(
            "SELECT tenant, COUNT(*), COALESCE(SUM(status IN {RUNNING}), 0) FROM batches
             GROUP BY tenant"
        ))?;
        let batches = q.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let batches = batches.collect::<rusqlite::Result<Vec<_>>>()?;
        for (t, n, bytes) in files {
            let e = at(&mut by, t);
            e.files = n as u64;
            e.file_bytes = bytes as u64;
        }
        for (t, n, running) in batches {
            let e = at(&mut by, t);
            e.batches = n as u64;
            e.running = running as u64;
        }
        Ok(by.into_values().collect())
    }

    /// Deletes all `tenant` keeps: its files, its batches and their results. Returns how
    /// many files and batches went, and the ids of those that had not ended (for the
    /// caller to stop).
    pub fn delete_tenant(&self, tenant: &str) -> Result<(u64, u64, Vec<String>)> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let running = {
            let mut q = tx.prepare(&format!(
                "SELECT id FROM batches WHERE tenant = ?1 AND status IN {RUNNING}"
            ))?;
            let ids = q.query_map([tenant], |r| r.get::<_, String>(0))?;
            ids.collect::<rusqlite::Result<Vec<_>>>()?
        };
        tx.execute(
            "DELETE FROM batch_results WHERE batch IN (SELECT id FROM batches WHERE tenant = ?1)",
            [tenant],
        )?;
        let batches = tx.execute("DELETE FROM batches WHERE tenant = ?1", [tenant])?;
        let files = tx.execute("DELETE FROM files WHERE tenant = ?1", [tenant])?;
        tx.commit()?;
        Ok((files as u64, batches as u64, running))
    }

    /// Removes expired files and batches ended long enough ago; how many rows went.
    pub fn purge(&self) -> Result<usize> {
        let conn = self.conn()?;
        let now = now_s();
        let files = conn.execute("DELETE FROM files WHERE expires_at <= ?1", [now])?;
        let batches = conn.execute("DELETE FROM batches WHERE purge_at <= ?1", [now])?;
        Ok(files + batches)
    }
}

/// What `tenant`'s unexpired files take, in bytes.
fn held(conn: &Connection, tenant: &str) -> Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT COALESCE(SUM(bytes), 0) FROM files WHERE tenant = ?1 AND expires_at > ?2",
        params![tenant, now_s()],
        |r| r.get(0),
    )?;
    Ok(n.max(0) as u64)
}

fn put_file(
    conn: &Connection,
    tenant: &str,
    filename: &str,
    purpose: &str,
    content: &[u8],
    expires_at: i64,
) -> Result<FileRow> {
    let row = FileRow {
        id: new_id("file-"),
        created_at: now_s(),
        expires_at,
        filename: filename.to_string(),
        purpose: purpose.to_string(),
        bytes: content.len() as i64,
    };
    conn.execute(
        "INSERT INTO files (id, tenant, created_at, expires_at, filename, purpose, bytes, content)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            row.id,
            tenant,
            row.created_at,
            row.expires_at,
            row.filename,
            row.purpose,
            row.bytes,
            content
        ],
    )?;
    Ok(row)
}

/// A page of rows from `select` (which binds the tenant as ?1, now as ?2 and `extra` as
/// ?3), in the order they were written, after the row `page.after` of `table`.
fn listed<T>(
    conn: &Connection,
    select: &str,
    table: &str,
    tenant: &str,
    page: &Listing<'_>,
    extra: &str,
    row: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<(Vec<T>, bool)> {
    let (cmp, dir) = match page.oldest_first {
        true => (">", "ASC"),
        false => ("<", "DESC"),
    };
    // The cursor's place (its rowid: rows are numbered as written); an unknown cursor
    // starts nowhere.
    let cursor = match page.after {
        Some(after) => {
            let at: Option<i64> = conn
                .query_row(
                    &format!("SELECT rowid FROM {table} WHERE id = ?1 AND tenant = ?2"),
                    params![after, tenant],
                    |r| r.get(0),
                )
                .optional()?;
            match at {
                Some(at) => Some(at),
                None => return Ok((Vec::new(), false)),
            }
        }
        None => None,
    };
    let sql = format!("{select} AND (?4 = 0 OR rowid {cmp} ?5) ORDER BY rowid {dir} LIMIT ?6");
    let mut q = conn.prepare(&sql)?;
    let rows = q.query_map(
        params![
            tenant,
            now_s(),
            extra,
            cursor.is_some() as i64,
            cursor.unwrap_or(0),
            page.limit as i64 + 1
        ],
        row,
    )?;
    let mut out = rows.collect::<rusqlite::Result<Vec<T>>>()?;
    let more = out.len() > page.limit;
    out.truncate(page.limit);
    Ok((out, more))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch folder, removed on drop.
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn store() -> (Dir, BatchStore) {
        let dir = Dir(std::env::temp_dir().join(new_id("tollgate-batches-")));
        let s = BatchStore::open(&dir.0.join("b.db"), Duration::from_secs(3600)).expect("open");
        (dir, s)
    }

    fn batch(id: &str, tenant: &str) -> BatchRow {
        BatchRow {
            id: id.into(),
            tenant: tenant.into(),
            created_at: now_s(),
            endpoint: "/v1/chat/completions".into(),
            input_file_id: "file-x".into(),
            completion_window: "24h".into(),
            status: "validating".into(),
            expires_at: now_s() + 86_400,
            ..BatchRow::default()
        }
    }

    #[test]
    fn files_belong_to_their_tenant() {
        let (_d, s) = store();
        let f = s.put_file("a", "in.jsonl", "batch", b"{}\n").expect("put");
        assert_eq!(f.bytes, 3);
        assert_eq!(s.file("a", &f.id).expect("read"), Some(f.clone()));
        assert_eq!(s.file("b", &f.id).expect("read"), None);
        assert_eq!(s.content("b", &f.id).expect("read"), None);
        assert_eq!(s.delete_file("b", &f.id).expect("delete"), Ok(false));
        assert_eq!(s.stored_bytes("a").expect("bytes"), 3);
        assert_eq!(
            s.content("a", &f.id).expect("read").as_deref(),
            Some(&b"{}\n"[..])
        );
        assert_eq!(s.delete_file("a", &f.id).expect("delete"), Ok(true));
        assert_eq!(s.file("a", &f.id).expect("read"), None);
        assert_eq!(s.stored_bytes("a").expect("bytes"), 0);
        // Within a quota: stored while it fits, else the bytes already held.
        let put = |bytes: &[u8]| {
            s.put_file_within("a", "f", "user_data", bytes, Some(3600), 5)
                .expect("put")
        };
        let first = put(b"abc").expect("fits");
        assert_eq!(first.expires_at - first.created_at, 3600);
        assert_eq!(put(b"abc").map(|_| ()), Err(3));
        assert!(put(b"ab").is_ok());
    }

    #[test]
    fn pages_walk_every_file_once_in_order() {
        let (_d, s) = store();
        let ids: Vec<String> = (0..7)
            .map(|i| {
                let purpose = if i % 2 == 0 { "batch" } else { "user_data" };
                s.put_file("a", "f", purpose, b"x").expect("put").id
            })
            .collect();
        s.put_file("b", "f", "batch", b"x").expect("put");
        for oldest_first in [true, false] {
            let mut seen = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = Listing {
                    after: after.as_deref(),
                    limit: 3,
                    oldest_first,
                    purpose: None,
                };
                let (rows, more) = s.files("a", &page).expect("page");
                seen.extend(rows.iter().map(|r| r.id.clone()));
                after = rows.last().map(|r| r.id.clone());
                if !more {
                    break;
                }
            }
            let mut want = ids.clone();
            if !oldest_first {
                want.reverse();
            }
            assert_eq!(seen, want);
        }
        let batch_only = Listing {
            after: None,
            limit: 100,
            oldest_first: true,
            purpose: Some("batch"),
        };
        assert_eq!(s.files("a", &batch_only).expect("page").0.len(), 4);
    }

    #[test]
    fn results_are_counted_once_and_become_files_in_line_order() {
        let (_d, s) = store();
        s.create_batch(&batch("batch_1", "a")).expect("create");
        s.start("batch_1", 3, Some("m")).expect("start");
        let line = |line: usize, ok: bool| LineResult {
            line,
            ok,
            output: format!("{{\"line\":{line}}}"),
            input_tokens: 10,
            output_tokens: 2,
            ..LineResult::default()
        };
        s.record("batch_1", &line(2, true)).expect("record");
        s.record("batch_1", &line(0, true)).expect("record");
        s.record("batch_1", &line(0, true)).expect("again");
        s.record("batch_1", &line(1, false)).expect("record");
        let mut done = s.done_lines("batch_1").expect("done");
        done.sort();
        assert_eq!(done, [0, 1, 2]);
        s.finish("batch_1", Ending::Completed).expect("finish");
        let b = s.batch("a", "batch_1").expect("read").expect("there");
        assert_eq!(b.status, "completed");
        assert_eq!((b.total, b.completed, b.failed), (3, 2, 1));
        assert_eq!((b.input_tokens, b.output_tokens), (30, 6));
        let out = s
            .content("a", b.output_file_id.as_deref().expect("output"))
            .expect("read")
            .expect("there");
        assert_eq!(out, b"{\"line\":0}\n{\"line\":2}\n");
        let err = s
            .content("a", b.error_file_id.as_deref().expect("errors"))
            .expect("read")
            .expect("there");
        assert_eq!(err, b"{\"line\":1}\n");
        assert!(s.done_lines("batch_1").expect("done").is_empty());
        assert!(s.unfinished().expect("unfinished").is_empty());
        assert_eq!(s.batch("b", "batch_1").expect("read"), None);
    }

    #[test]
    fn a_batch_keeps_its_input_file_while_it_may_run() {
        let (_d, s) = store();
        let f = s.put_file("a", "in.jsonl", "batch", b"{}\n").expect("put");
        let mut b = batch("batch_1", "a");
        b.input_file_id = f.id.clone();
        b.expires_at = f.expires_at + 7200;
        s.create_batch(&b).expect("create");
        let kept = s.file("a", &f.id).expect("read").expect("there");
        assert_eq!(kept.expires_at, b.expires_at);
    }

    #[test]
    fn only_a_running_batch_is_cancelled() {
        let (_d, s) = store();
        s.create_batch(&batch("batch_1", "a")).expect("create");
        assert_eq!(s.cancel("b", "batch_1").expect("cancel"), None);
        let b = s.cancel("a", "batch_1").expect("cancel").expect("there");
        assert_eq!(b.status, "cancelling");
        assert!(b.cancelling_at.is_some());
        // Its input checked after the cancel: counted, not run.
        s.start("batch_1", 5, None).expect("start");
        let b = s.batch("a", "batch_1").expect("read").expect("there");
        assert_eq!(
            (b.status.as_str(), b.total, b.in_progress_at),
            ("cancelling", 5, None)
        );
        s.finish("batch_1", Ending::Cancelled).expect("finish");
        let b = s.cancel("a", "batch_1").expect("cancel").expect("there");
        assert_eq!(b.status, "cancelled");
        assert_eq!(b.output_file_id, None, "nothing ran: no output file");
    }
}
