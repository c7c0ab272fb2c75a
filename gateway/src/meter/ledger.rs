//! The ledger: the request path's handle on the usage journal (`journal`), and the thread
//! that copies the journal into SQLite together with the operators' audit entries.
//!
//! A request appends its record itself (one `write(2)`, no other thread involved); with
//! `synchronous = "full"` it then waits for the ledger thread's next `fdatasync` of the
//! segment, shared by every record appended meanwhile. Every `TICK` the thread reads what
//! was appended since its last pass and commits it in one transaction with the new read
//! position; a segment past `SEGMENT_BYTES` is swapped for a new one and removed once it is
//! copied whole.

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

/// Copies into `db` the journal segments whose writers are gone (for `gateway usage`):
/// the records copied.
pub fn recover(db: &Path) -> Result<u64, LedgerError> {
    let mut conn = open(db, Synchronous::Normal)?;
    Ok(recover_with(&mut conn, db)?.0)
}

/// Copies and removes every segment of `db` that no live process holds: (records copied,
/// damaged frames skipped).
fn recover_with(conn: &mut Connection, db: &Path) -> Result<(u64, u64), LedgerError> {
    let (mut written, mut damaged) = (0, 0);
    for (name, path) in journal::segments(db)? {
        // Held while it is copied and removed, so that no one else copies it too.
        let Some(mut file) = journal::claim(&path)? else {
            continue;
        };
        let copied: u64 = conn
            .query_row(
                "SELECT copied FROM usage_log WHERE segment = ?1",
                [&name],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let mut buf = Vec::new();
        file.seek(SeekFrom::Start(copied))?;
        file.read_to_end(&mut buf)?;
        let p = journal::parse(&buf, true);
        commit(
            conn,
            &p.records,
            &[],
            &[(name.clone(), copied + p.used as u64)],
        )?;
        written += p.records.len() as u64;
        damaged += p.damaged;
        remove_copied(conn, &name, &path)?;
    }
    // Rows left by a process that removed its segment but ended before its row.
    let names: Vec<String> = conn
        .prepare("SELECT segment FROM usage_log")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let dir = journal::folder(db);
    for name in names {
        if !dir.join(&name).exists() {
            conn.execute("DELETE FROM usage_log WHERE segment = ?1", [&name])?;
        }
    }
    Ok((written, damaged))
}

/// Removes a segment copied whole, then its position's row: in this order, since a row
/// without its file is only cleaned up later, while a file without its row would be copied
/// again from its start. The caller holds the segment's lock until this returns.
fn remove_copied(conn: &Connection, name: &str, path: &Path) -> Result<(), LedgerError> {
    match std::fs::remove_file(path) {
        // Gone already (an operator cleaned up): what it held is copied either way.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    conn.execute("DELETE FROM usage_log WHERE segment = ?1", [name])?;
    Ok(())
}

/// A segment being copied: a reader of its own, the position committed, and bytes read
/// past it that are not a whole frame yet.
struct Tail {
    seg: Arc<Segment>,
    reader: File,
    copied: u64,
    pending: Vec<u8>,
    /// The shard it is the live segment of, until retired.
    shard: usize,
    /// No more appends are coming: copied whole, it is removed.
    retired: bool,
}

impl Tail {
    fn new(seg: Arc<Segment>, shard: usize) -> std::io::Result<Self> {
        let reader = File::open(&seg.path)?;
        Ok(Self {
            seg,
            reader,
            copied: 0,
            pending: Vec::new(),
            shard,
            retired: false,
        })
    }

    /// Whether appends may still be under way into it (handles the ledger does not own).
    fn in_use(&self) -> bool {
        !self.retired || Arc::strong_count(&self.seg) > 1
    }
}

/// The ledger thread's state.
struct Copier {
    conn: Connection,
    db: PathBuf,
    rx: mpsc::Receiver<Msg>,
    counters: Arc<Counters>,
    shards: Shards,
    /// Segments being copied: the shards' live ones and retired ones.
    tails: Vec<Tail>,
    audits: Vec<AuditEntry>,
    segment_bytes: u64,
    next_segment: u64,
}

impl Copier {
    fn run(&mut self) {
        let mut next = Instant::now() + TICK;
        loop {
            let mut msgs = Vec::new();
            match self
                .rx
                .recv_timeout(next.saturating_duration_since(Instant::now()))
            {
                Ok(m) => {
                    msgs.push(m);
                    msgs.extend(self.rx.try_iter());
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Every handle is gone.
                Err(RecvTimeoutError::Disconnected) => {
                    self.copy();
                    return;
                }
            }
            let (mut syncs, mut flushes, mut closes) = (Vec::new(), Vec::new(), Vec::new());
            for m in msgs {
                match m {
                    Msg::Audit(e) => self.audits.push(e),
                    Msg::Sync(seg, ack) => syncs.push((seg, ack)),
                    Msg::Flush(ack) => flushes.push(ack),
                    Msg::Close(ack) => closes.push(ack),
                }
            }
            // First the fsyncs: requests' last bytes wait for them.
            sync(syncs);
            if Instant::now() < next && flushes.is_empty() && closes.is_empty() {
                continue;
            }
            if !closes.is_empty() {
                for shard in self.shards.iter() {
                    shard.store(None);
                }
                for t in &mut self.tails {
                    t.retired = true;
                }
            }
            let mut ok = self.copy();
            if !closes.is_empty() {
                let deadline = Instant::now() + CLOSE_WAIT;
                while ok && !self.tails.is_empty() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                    ok = self.copy();
                }
                ok &= self.tails.is_empty();
            }
            for ack in flushes.into_iter().chain(closes) {
                let _ = ack.send(ok);
            }
            let full: Vec<usize> = self
                .tails
                .iter()
                .filter(|t| !t.retired && t.copied >= self.segment_bytes)
                .map(|t| t.shard)
                .collect();
            for shard in full {
                self.rotate(shard);
            }
            next = Instant::now() + TICK;
        }
    }

    /// Reads what was appended since the last pass and commits it with the audit entries
    /// and the new positions; removes the retired segments copied whole. `false`: the
    /// commit failed (retried next pass).
    fn copy(&mut self) -> bool {
        let mut records = Vec::new();
        let mut positions = Vec::new();
        // Per tail: (bytes parsed, damaged frames, copied whole).
        let mut parsed = Vec::with_capacity(self.tails.len());
        for t in &mut self.tails {
            // A retired segment is read to its end once no append can be under way.
            let complete = !t.in_use();
            if let Err(e) = t.reader.read_to_end(&mut t.pending) {
                tracing::error!(error = %e, segment = %t.seg.name, "usage journal: read failed");
                parsed.push((0, 0, false));
                continue;
            }
            let p = journal::parse(&t.pending, complete);
            if p.used > 0 {
                positions.push((t.seg.name.clone(), t.copied + p.used as u64));
            }
            records.extend(p.records);
            parsed.push((p.used, p.damaged, complete));
        }
        if !records.is_empty() || !self.audits.is_empty() || !positions.is_empty() {
            if let Err(e) = commit(&mut self.conn, &records, &self.audits, &positions) {
                tracing::error!(error = %e, records = records.len(), "usage ledger: commit failed");
                return false;
            }
            self.audits.clear();
            self.counters
                .written
                .fetch_add(records.len() as u64, Ordering::Relaxed);
        }
        let mut keep = Vec::with_capacity(self.tails.len());
        for (mut t, (used, damaged, complete)) in self.tails.drain(..).zip(parsed) {
            t.pending.drain(..used);
            t.copied += used as u64;
            if damaged > 0 {
                self.counters.failed.fetch_add(damaged, Ordering::Relaxed);
                tracing::error!(
                    damaged,
                    segment = %t.seg.name,
                    "usage journal: damaged records skipped"
                );
            }
            if !complete {
                keep.push(t);
                continue;
            }
            // Copied whole: removed (the lock, held until `t` drops, keeps others off it
            // meanwhile).
            if let Err(e) = remove_copied(&self.conn, &t.seg.name, &t.seg.path) {
                tracing::error!(error = %e, segment = %t.seg.name, "usage journal: a copied segment or its row stays");
            }
        }
        self.tails = keep;
        true
    }

    /// Swaps `shard`'s live segment for a new one; the old one is copied to its end and
    /// removed by the passes that follow, once its last appends are done.
    fn rotate(&mut self, shard: usize) {
        let seg = match Segment::create(&self.db, super::unix_ms(), self.next_segment) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!(error = %e, "usage journal: cannot start a new segment; the old one goes on");
                return;
            }
        };
        self.next_segment += 1;
        let tail = match Tail::new(seg.clone(), shard) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "usage journal: cannot read a new segment; the old one goes on");
                return;
            }
        };
        for t in &mut self.tails {
            if t.shard == shard {
                t.retired = true;
            }
        }
        self.shards[shard].store(Some(seg));
        self.tails.push(tail);
    }
}

/// fsyncs each segment asked for once, then answers every request.
fn sync(syncs: Vec<(Arc<Segment>, oneshot::Sender<bool>)>) {
    let mut done: Vec<(Arc<Segment>, bool)> = Vec::new();
    for (seg, ack) in syncs {
        let ok = match done.iter().find(|(s, _)| Arc::ptr_eq(s, &seg)) {
            Some((_, ok)) => *ok,
            None => {
                let ok = match seg.sync() {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!(error = %e, segment = %seg.name, "usage journal: fsync failed");
                        false
                    }
                };
                done.push((seg, ok));
                ok
            }
        };
        let _ = ack.send(ok);
    }
}

/// A passive checkpoint every second (it never blocks the ledger thread), for as long as
/// the process runs.
fn checkpoints(conn: Connection) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "usage ledger: checkpoint failed");
        }
    }
}

/// One transaction: the records, the audit entries and the segments' new positions.
fn commit(
    conn: &mut Connection,
    records: &[UsageRecord],
    audits: &[AuditEntry],
    positions: &[(String, u64)],
) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction()?;
    {
        let mut usage = tx.prepare_cached(
            "INSERT INTO usage (ts_ms, request_id, tenant, model, worker, input_tokens, output_tokens, weighted_tokens, status, ttft_ms, duration_ms, best_effort, cached_tokens)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?;
        for r in records {
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
        let mut audit = tx.prepare_cached(
            "INSERT INTO audit (ts_ms, actor, action, detail) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for e in audits {
            audit.execute(params![e.ts_ms, e.actor, e.action, e.detail])?;
        }
        let mut position = tx.prepare_cached(
            "INSERT INTO usage_log (segment, copied) VALUES (?1, ?2)
             ON CONFLICT (segment) DO UPDATE SET copied = excluded.copied",
        )?;
        for (name, copied) in positions {
            position.execute(params![name, *copied as i64])?;
        }
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tollgate-ledger-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn rec(id: String) -> UsageRecord {
        UsageRecord {
            ts_ms: 1_700_000_000_000,
            request_id: id,
            tenant: "t".into(),
            model: "m".into(),
            worker: "p/0".into(),
            input_tokens: 3,
            cached_tokens: 0,
            output_tokens: 8,
            weighted_tokens: 27.0,
            status: "200".into(),
            ttft_ms: None,
            duration_ms: 1.0,
            best_effort: false,
        }
    }

    /// Request ids in the database, and how many rows there are.
    fn ids(db: &Path) -> (std::collections::BTreeSet<String>, usize) {
        let c = Connection::open(db).unwrap();
        let ids: Vec<String> = c
            .prepare("SELECT request_id FROM usage")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let n = ids.len();
        (ids.into_iter().collect(), n)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_from_many_threads_land_once_across_segments() {
        let d = dir("threads");
        let db = d.join("u.db");
        // Three shards of segments of 8 KiB: swaps while eight threads append.
        let ledger = Ledger::start_with(&db, Synchronous::Normal, 8 << 10, 3).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let l = ledger.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        l.record(rec(format!("{t}-{i}")));
                        if i % 20 == 0 {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(ledger.flush().await);
        let (ids, n) = ids(&db);
        assert_eq!((ids.len(), n), (4000, 4000), "every record once");
        assert_eq!(ledger.counts(), (4000, 4000, 0));
        let left = journal::segments(&db).unwrap();
        assert!(left.len() <= 6, "copied segments are removed: {left:?}");
        let number = |name: &str| name.rsplit('-').next().unwrap().parse::<u64>().unwrap();
        let made = left.iter().map(|(n, _)| number(n)).max().unwrap() + 1;
        assert!(
            made >= 5,
            "segments were swapped under the appenders: {left:?}"
        );
        eprintln!("{made} segments");
        assert!(ledger.close().await);
        assert!(journal::segments(&db).unwrap().is_empty());
        let c = Connection::open(&db).unwrap();
        let rows: i64 = c
            .query_row("SELECT COUNT(*) FROM usage_log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0, "no position is kept for a removed segment");
        // Closed: a record is lost, and said to be.
        ledger.record(rec("late".into()));
        assert_eq!(ledger.counts().2, 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn what_a_dead_process_left_is_copied_once_and_a_live_ones_is_left_alone() {
        let d = dir("dead");
        let db = d.join("u.db");
        let first = journal::encode(&rec("dead-0".into())).unwrap();
        {
            // A process that died after copying its first record: its segment holds three
            // and a torn fourth, and the database its first and the position after it.
            let c = open(&db, Synchronous::Normal).unwrap();
            let seg = Segment::create(&db, 1, 0).unwrap();
            seg.append(&first).unwrap();
            seg.append(&journal::encode(&rec("dead-1".into())).unwrap())
                .unwrap();
            seg.append(&journal::encode(&rec("dead-2".into())).unwrap())
                .unwrap();
            let torn = journal::encode(&rec("dead-3".into())).unwrap();
            seg.append(&torn[..torn.len() / 2]).unwrap();
            let mut c = c;
            commit(
                &mut c,
                &[rec("dead-0".into())],
                &[],
                &[(seg.name.clone(), first.len() as u64)],
            )
            .unwrap();
        }
        // A process still running, with one record not yet copied.
        let alive = Segment::create(&db, 2, 0).unwrap();
        alive
            .append(&journal::encode(&rec("alive-0".into())).unwrap())
            .unwrap();

        let ledger = Ledger::start(&db, Synchronous::Normal).unwrap();
        let (got, n) = ids(&db);
        assert_eq!(n, 3, "{got:?}");
        assert!(["dead-0", "dead-1", "dead-2"]
            .iter()
            .all(|i| got.contains(*i)));
        assert_eq!(ledger.counts().2, 1, "the torn record is counted");
        let names: Vec<String> = journal::segments(&db)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(
            !names.iter().any(|n| n.starts_with("0000000000001-")),
            "the dead one is removed: {names:?}"
        );
        assert!(names.contains(&alive.name));

        // Once that process is gone, `gateway usage`'s recovery copies its record.
        let path = alive.path.clone();
        drop(alive);
        assert_eq!(recover(&db).unwrap(), 1);
        assert!(!path.exists());
        assert_eq!(recover(&db).unwrap(), 0, "and only once");
        assert!(ledger.close().await);
        let (got, n) = ids(&db);
        assert_eq!(n, 4);
        assert!(got.contains("alive-0"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_full_sync_durable_records_wait_for_a_shared_fsync() {
        let d = dir("full");
        let db = d.join("u.db");
        let ledger = Ledger::start(&db, Synchronous::Full).unwrap();
        let tasks: Vec<_> = (0..32)
            .map(|t| {
                let l = ledger.clone();
                tokio::spawn(async move {
                    for i in 0..20 {
                        assert!(l.record_durable(rec(format!("{t}-{i}"))).await);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(ledger.close().await);
        assert_eq!(ids(&db).1, 640);
        assert_eq!(ledger.counts(), (640, 640, 0));
        std::fs::remove_dir_all(&d).unwrap();
    }

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
