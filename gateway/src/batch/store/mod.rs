//! The Batch API's database (SQLite, WAL): tenants' files (their bytes in the row), batches,
//! and each batch's results so far, one row a request, committed as each request ends —
//! so a gateway that stops, cleanly or not, loses no finished request, and the next start
//! runs only those not done. A batch's end writes its output and error files and drops
//! its result rows in one transaction. Every row belongs to one tenant: another tenant's
//! id reads as not found. Files and ended batches expire after `retention_hours`.
//!
//! Every call blocks: callers run them from the blocking pool.
//!
//! Here the schema, the rows and what spans both tables (per-tenant summaries, a tenant's
//! deletion, expiry); a tenant's files in `files`, batches and their results in `batches`.

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
    model TEXT,
    -- Of output_tokens, a reasoning model's thinking.
    reasoning_tokens INTEGER NOT NULL DEFAULT 0
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

/// Brings a database made by an earlier tollgate to [`SCHEMA`]: the columns added since,
/// each with its default (`CREATE TABLE IF NOT EXISTS` leaves an existing table as it is).
fn upgrade(conn: &rusqlite::Connection) -> Result<()> {
    const ADDED: &[(&str, &str)] = &[("reasoning_tokens", "INTEGER NOT NULL DEFAULT 0")];
    let mut have = Vec::new();
    {
        let mut q = conn.prepare("SELECT name FROM pragma_table_info('batches')")?;
        let names = q.query_map([], |r| r.get::<_, String>(0))?;
        for n in names {
            have.push(n?);
        }
    }
    for (name, decl) in ADDED {
        if !have.iter().any(|h| h == name) {
            conn.execute_batch(&format!("ALTER TABLE batches ADD COLUMN {name} {decl}"))?;
        }
    }
    Ok(())
}

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
    /// Of `output_tokens`, a reasoning model's thinking.
    pub reasoning_tokens: i64,
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
    pub reasoning_tokens: i64,
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
    input_tokens, cached_tokens, output_tokens, output_keep_s, model, reasoning_tokens";

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
        reasoning_tokens: r.get(27)?,
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
        let conn = pool.get()?;
        conn.execute_batch(SCHEMA)?;
        upgrade(&conn)?;
        drop(conn);
        Ok(Self { pool, retention })
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>> {
        Ok(self.pool.get()?)
    }

    fn kept_until(&self, from: i64) -> i64 {
        from.saturating_add(self.retention.as_secs() as i64)
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

mod batches;
mod files;
#[cfg(test)]
mod tests;
