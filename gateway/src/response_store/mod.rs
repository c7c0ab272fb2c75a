//! Stored answers of the Responses API (`[responses] store = true`), in SQLite: each
//! answer's `response` object as it was sent, and its conversation as input items (the
//! items of the responses it continued, its own input, its output), so that a request
//! with `previous_response_id` continues it; and the Conversations API's conversations
//! ([`conversations`]), whose items answers in them add to. Every row belongs to one
//! tenant: another tenant's id reads as not found. Rows expire after `retention_hours`
//! (a conversation: after its last use); expired rows are purged at start and then hourly.
//!
//! An answer that continues another stores only its own items (its input, its output)
//! and which answer it continues (`parent`) with how many of that one's items it took
//! (`inherits`): a chain of n answers stores each item once, not n times ([`lineage`]);
//! an answer in a conversation continues the last one stored in it ([`conversations`]).
//! An answer deleted or expired while an answer that continues it lives is kept hidden
//! (not found by its id) for as long as that one needs it.
//!
//! Reads and the Conversations API's writes are blocking, made from the blocking pool on
//! a pool of connections (one a core, at most 16; WAL, so reads run side by side and
//! beside the writer). Answers are written by a thread of their own
//! ([`ResponseStore::save`]) in one transaction for all that arrived meanwhile (a group
//! commit); a request awaits its answer's commit before its last bytes are sent, so a
//! client that reads an answer whole may continue it at once.

pub mod conversations;
mod items;
mod lineage;
mod pages;
mod quota;

pub use conversations::InConversation;
pub use lineage::Parent;
pub use pages::{ItemsPage, Paged};

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde_json::Value;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("response store: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("response store: a stored conversation is not JSON: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("response store: its lock was poisoned by a panic")]
    Poisoned,
    #[error("response store: {0}")]
    Thread(String),
    #[error("response store: {0}")]
    Broken(String),
    #[error("response store: no connection: {0}")]
    Pool(#[from] r2d2::Error),
}

/// Writes `answers` in one transaction (an answer with an id already there replaces it;
/// items for a conversation gone meanwhile are dropped).
fn insert(conn: &mut Connection, retention: Duration, answers: &[&Kept]) -> Result<(), StoreError> {
    let now = now_ms();
    let expires = now.saturating_add(retention.as_millis() as i64);
    // Immediate: a deferred transaction that reads before it writes cannot wait for
    // another writer (SQLite answers "database is locked" at once).
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        // An upsert, not a REPLACE: the update fires the byte count's trigger.
        let mut put = tx.prepare_cached(
            "INSERT INTO responses (id, tenant, created_ms, expires_ms, response, conversation,
                                    parent, inherits, hidden)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0)
             ON CONFLICT (id) DO UPDATE SET created_ms = excluded.created_ms, expires_ms = excluded.expires_ms,
                 response = excluded.response, conversation = excluded.conversation,
                 parent = excluded.parent, inherits = excluded.inherits, hidden = 0",
        )?;
        let mut running = tx.prepare_cached("INSERT OR IGNORE INTO unfinished VALUES (?1)")?;
        let mut ended = tx.prepare_cached("DELETE FROM unfinished WHERE id = ?1")?;
        let mut revise =
            tx.prepare_cached("UPDATE responses SET response = ?3 WHERE id = ?1 AND tenant = ?2")?;
        for a in answers {
            if let Some(r) = &a.revised {
                revise.execute(params![r.id, r.tenant, r.response])?;
            }
            let Some(s) = &a.stored else { continue };
            let (parent, inherits, whole) = lineage::link(&tx, s)?;
            let conversation = whole.as_deref().unwrap_or(&s.conversation);
            put.execute(params![
                s.id,
                s.tenant,
                now,
                expires,
                s.response,
                conversation,
                parent,
                inherits,
            ])?;
            items::index(&tx, &s.id, &s.tenant, conversation)?;
            match a.unfinished {
                true => running.execute([&s.id])?,
                false => ended.execute([&s.id])?,
            };
        }
    }
    for a in answers.iter().filter_map(|a| a.append.as_ref()) {
        conversations::append(&tx, a, expires)?;
    }
    tx.commit()?;
    Ok(())
}

/// Adds `columns` (name, declaration) to `table` of a store written before them, in one
/// transaction; nothing where the first is there.
fn add_columns(
    conn: &mut Connection,
    table: &str,
    columns: &[(&str, &str)],
) -> Result<(), StoreError> {
    let Some((first, _)) = columns.first() else {
        return Ok(());
    };
    let has: i64 = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
        params![table, first],
        |r| r.get(0),
    )?;
    if has > 0 {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for (name, decl) in columns {
        tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {decl};"))?;
    }
    tx.commit()?;
    Ok(())
}

/// Whether `tenant` has the conversation `id` (unexpired), in `tx`.
fn owns(tx: &Transaction<'_>, tenant: &str, id: &str) -> Result<bool, StoreError> {
    Ok(tx
        .query_row(
            "SELECT 1 FROM conversations WHERE id = ?1 AND tenant = ?2 AND expires_ms > ?3",
            params![id, tenant, now_ms()],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    response TEXT NOT NULL,
    -- Its own items (a JSON array): all its conversation without a parent, else what
    -- follows the parent's first `inherits` items.
    conversation TEXT NOT NULL,
    parent TEXT,
    inherits INTEGER NOT NULL DEFAULT 0,
    -- Deleted or expired but kept for an answer that continues it ([`lineage`]).
    hidden INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS responses_expiry ON responses (expires_ms);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    -- Counts every change of its items.
    version INTEGER NOT NULL DEFAULT 0,
    -- The stored answer whose conversation is its first `answer_len` items, if any: the
    -- answer the next one in it continues ([`conversations`]).
    answer TEXT,
    answer_len INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS conversations_expiry ON conversations (expires_ms);
CREATE TABLE IF NOT EXISTS conversation_items (
    conversation TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (conversation, seq)
);
-- An item's place by its id (cursors, reads, deletes) in one seek: the index holds seq.
DROP INDEX IF EXISTS conversation_item_ids;
CREATE INDEX IF NOT EXISTS conversation_item_id_seqs ON conversation_items (conversation, id, seq);
CREATE TABLE IF NOT EXISTS unfinished (id TEXT PRIMARY KEY);
";

/// One stored answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub id: String,
    pub tenant: String,
    /// The `response` object as sent (JSON).
    pub response: String,
    /// Its own items, as Responses input items (a JSON array): without a `parent`, the
    /// whole conversation through this answer (what a request continuing it is prefixed
    /// with); with one, what follows the items it takes of that one's.
    pub conversation: String,
    /// The stored answer it continues, if any.
    pub parent: Option<Parent>,
}

/// A new `response` object for a stored answer (its conversation kept).
#[derive(Debug, Clone, PartialEq)]
pub struct Revised {
    pub id: String,
    pub tenant: String,
    pub response: String,
}

/// Items to add to the end of a tenant's conversation (each with its `id`).
#[derive(Debug, Clone, PartialEq)]
pub struct Append {
    pub conversation: String,
    pub tenant: String,
    pub items: Vec<Value>,
    /// The answer whose input and output these are, where it is stored: its conversation
    /// is the conversation as it read it, then these items.
    pub by: Option<ReadBy>,
}

/// A stored answer in a conversation, and the conversation as it read it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadBy {
    pub answer: String,
    /// The conversation's version then.
    pub version: i64,
    /// How many items it had then.
    pub len: usize,
}

/// What a finished answer leaves: itself stored, and its input and output added to the
/// conversation it is in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Kept {
    pub stored: Option<Stored>,
    pub append: Option<Append>,
    /// The stored answer is a background response as it starts (its end replaces it;
    /// stored as failed if the gateway stops first).
    pub unfinished: bool,
    /// A stored answer's `response` replaced (a background response cancelled), in
    /// order with the answers saved before it.
    pub revised: Option<Revised>,
}

impl From<Stored> for Kept {
    fn from(s: Stored) -> Self {
        Kept {
            stored: Some(s),
            ..Kept::default()
        }
    }
}

/// The writer thread's counts: answers committed and failed, and commits (each holds all
/// the answers that waited).
#[derive(Debug, Default)]
pub struct Writes {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub commits: AtomicU64,
}

/// What one tenant has stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TenantStored {
    pub tenant: String,
    pub answers: u64,
    pub conversations: u64,
    pub conversation_items: u64,
    /// The stored JSON's bytes.
    pub bytes: u64,
    /// What its quota is held against: `bytes`, and what expired but is not purged yet.
    pub held_bytes: u64,
}

/// Where a request's answer is to be stored: the store, and the tenant it belongs to.
#[derive(Clone)]
pub struct Saver {
    pub store: Arc<ResponseStore>,
    pub tenant: String,
}

pub struct ResponseStore {
    /// Connections for reads and the API's own writes (WAL: readers run side by side,
    /// and with the writer thread's commits).
    pool: r2d2::Pool<SqliteConnectionManager>,
    /// How long an answer is kept, and a conversation after its last use.
    retention: Duration,
    /// The background responses running now, by tenant and id (see
    /// [`crate::api::background`]), and how many (for a draining server to wait on).
    running: dashmap::DashMap<(String, String), tokio::task::JoinHandle<()>>,
    running_count: tokio::sync::watch::Sender<usize>,
    /// What the writer thread has committed.
    pub writes: Arc<Writes>,
    /// Their events, for readers to follow (kept a while after they end).
    pub streams: dashmap::DashMap<(String, String), Arc<crate::api::event_log::EventLog>>,
    /// To the writer thread: an answer, and who waits for its commit.
    writer: Mutex<std::sync::mpsc::Sender<Job>>,
}

type Job = (Kept, tokio::sync::oneshot::Sender<Result<(), String>>);

/// Most answers committed in one transaction.
const MAX_BATCH: usize = 256;

/// How many output items the answer `id` has (its `response`'s `output`): the last of
/// its conversation.
fn outputs(conn: &Connection, id: &str) -> Result<usize, StoreError> {
    let n: Option<i64> = conn
        .query_row(
            "SELECT json_array_length(response, '$.output') FROM responses WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    Ok(n.unwrap_or(0).max(0) as usize)
}

/// Gives `item` the id `item_{i}` if it has none (`i`: its place in its conversation).
fn named(item: &mut Value, i: usize) {
    if let Some(o) = item.as_object_mut() {
        if !matches!(o.get("id"), Some(Value::String(_))) {
            o.insert("id".into(), Value::String(format!("item_{i}")));
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl ResponseStore {
    /// Opens (or creates) the store at `path`, purging what has expired.
    pub fn open(path: &Path, retention: Duration) -> Result<Arc<Self>, StoreError> {
        // Per connection; WAL is the file's own, set once here.
        let init = |c: &mut Connection| -> rusqlite::Result<()> {
            c.pragma_update(None, "synchronous", "normal")?;
            c.busy_timeout(Duration::from_secs(5))
        };
        let open = || -> Result<Connection, StoreError> {
            let mut conn = Connection::open(path)?;
            conn.pragma_update(None, "journal_mode", "wal")?;
            init(&mut conn)?;
            Ok(conn)
        };
        let mut conn = open()?;
        conn.execute_batch(SCHEMA)?;
        lineage::migrate(&mut conn)?;
        conversations::migrate(&mut conn)?;
        conn.execute_batch(items::SCHEMA)?;
        conn.execute_batch(quota::SCHEMA)?;
        // Stores written before: their answers indexed (schema version 1), then their
        // bytes counted (2), in that order.
        items::backfill(&mut conn)?;
        quota::recount(&mut conn)?;
        drop(conn);
        let readers = std::thread::available_parallelism().map_or(4, |n| n.get());
        let pool = r2d2::Pool::builder()
            .max_size(readers.clamp(2, 16) as u32)
            .min_idle(Some(1))
            .test_on_check_out(false)
            .build(SqliteConnectionManager::file(path).with_init(init))?;
        let mut writes = open()?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let writes_done = Arc::new(Writes::default());
        let counts = writes_done.clone();
        std::thread::Builder::new()
            .name("response-store".into())
            .spawn(move || {
                // Until every sender is gone: the first answer, then all that wait.
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    jobs.extend(rx.try_iter().take(MAX_BATCH - 1));
                    let stored: Vec<&Kept> = jobs.iter().map(|j| &j.0).collect();
                    let r = insert(&mut writes, retention, &stored).map_err(|e| e.to_string());
                    let (n, of) = (jobs.len() as u64, &counts);
                    match &r {
                        Ok(()) => of.ok.fetch_add(n, Ordering::Relaxed),
                        Err(e) => {
                            tracing::error!(error = %e, answers = n, "response store: a commit failed");
                            of.failed.fetch_add(n, Ordering::Relaxed)
                        }
                    };
                    of.commits.fetch_add(1, Ordering::Relaxed);
                    for (_, done) in jobs {
                        let _ = done.send(r.clone());
                    }
                }
            })
            .map_err(|e| StoreError::Thread(e.to_string()))?;
        let store = Arc::new(Self {
            pool,
            retention,
            running: dashmap::DashMap::new(),
            running_count: tokio::sync::watch::Sender::new(0),
            streams: dashmap::DashMap::new(),
            writes: writes_done,
            writer: Mutex::new(tx),
        });
        store.purge()?;
        let stopped = store.fail_unfinished()?;
        if stopped > 0 {
            tracing::warn!(
                responses = stopped,
                "background responses still running when the gateway stopped are stored as failed"
            );
        }
        Ok(store)
    }

    /// Stores an answer through the writer thread, committed with the others that
    /// arrived meanwhile; done once committed.
    pub async fn save(&self, s: impl Into<Kept>) -> Result<(), StoreError> {
        let s = s.into();
        let (done, committed) = tokio::sync::oneshot::channel();
        self.writer
            .lock()
            .map_err(|_| StoreError::Poisoned)?
            .send((s, done))
            .map_err(|_| StoreError::Thread("the writer thread is gone".into()))?;
        match committed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Thread(e)),
            Err(_) => Err(StoreError::Thread("the writer thread is gone".into())),
        }
    }

    /// Registers a running background response's task.
    pub fn run(&self, key: (String, String), task: tokio::task::JoinHandle<()>) {
        self.running.insert(key, task);
        self.running_count.send_replace(self.running.len());
    }

    /// Takes a background response's task off the register (it ended, or is to be
    /// stopped): the task, if it was there.
    pub fn unregister(&self, key: &(String, String)) -> Option<tokio::task::JoinHandle<()>> {
        let task = self.running.remove(key).map(|(_, t)| t);
        self.running_count.send_replace(self.running.len());
        task
    }

    /// The keys of `tenant`'s running background responses.
    pub fn running_of(&self, tenant: &str) -> Vec<(String, String)> {
        self.running
            .iter()
            .filter(|e| e.key().0 == tenant)
            .map(|e| e.key().clone())
            .collect()
    }

    /// How many background responses run now.
    pub fn running_now(&self) -> usize {
        *self.running_count.borrow()
    }

    /// How many background responses run, as it changes.
    pub fn running_count(&self) -> tokio::sync::watch::Receiver<usize> {
        self.running_count.subscribe()
    }

    /// A connection of the pool (waiting while all are in use).
    fn conn(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>, StoreError> {
        Ok(self.pool.get()?)
    }

    /// The `response` object of `tenant`'s answer `id` (JSON, as sent), unless it expired
    /// or was deleted.
    pub fn response(&self, tenant: &str, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT response FROM responses
                 WHERE id = ?1 AND tenant = ?2 AND expires_ms > ?3 AND hidden = 0",
                params![id, tenant, now_ms()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The conversation items of `tenant`'s answer `id` (those of the answers it
    /// continues, then its own).
    pub fn conversation(&self, tenant: &str, id: &str) -> Result<Option<Vec<Value>>, StoreError> {
        let conn = self.conn()?;
        lineage::conversation(&conn, tenant, id)
    }

    /// The input items of `tenant`'s answer `id`: its conversation without its own
    /// output (the items of its `response`'s `output`). An item without an id (stored
    /// before ids were given) is given `item_{its place}`.
    pub fn input_items(&self, tenant: &str, id: &str) -> Result<Option<Vec<Value>>, StoreError> {
        let conn = self.conn()?;
        let Some(mut items) = lineage::conversation(&conn, tenant, id)? else {
            return Ok(None);
        };
        items.truncate(items.len().saturating_sub(outputs(&conn, id)?));
        for (i, item) in items.iter_mut().enumerate() {
            named(item, i);
        }
        Ok(Some(items))
    }

    /// A page of [`input_items`](Self::input_items): newest first (but `before` an item)
    /// read from the end of the chain of answers only as far as the page goes; otherwise
    /// from them all.
    pub fn input_items_page(
        &self,
        tenant: &str,
        id: &str,
        page: ItemsPage<'_>,
    ) -> Result<Option<Paged>, StoreError> {
        if !page.desc || page.before.is_some() {
            return Ok(self
                .input_items(tenant, id)?
                .map(|all| Paged::of(all, page)));
        }
        let conn = self.conn()?;
        let mut found = page.after.is_none();
        let mut items = Vec::with_capacity(page.limit + 1);
        let there = lineage::inputs_newest_first(&conn, tenant, id, |i, mut item| {
            named(&mut item, i);
            if !found {
                found = item.get("id").and_then(Value::as_str) == page.after;
                return true;
            }
            items.push(item);
            items.len() <= page.limit
        })?;
        if !there {
            return Ok(None);
        }
        if !found {
            return Ok(Some(Paged::NoSuchItem { param: "after" }));
        }
        let has_more = items.len() > page.limit;
        items.truncate(page.limit);
        Ok(Some(Paged::Items { items, has_more }))
    }

    /// Deletes `tenant`'s answer `id`; whether there was one. One that an answer still
    /// stored continues is hidden until that one no longer needs it.
    pub fn delete(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found = lineage::delete(&tx, tenant, id)?;
        tx.commit()?;
        Ok(found)
    }

    /// Stores every answer still running (a background response of a gateway that
    /// stopped) as `failed`; how many.
    fn fail_unfinished(&self) -> Result<usize, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE responses SET response = json_set(response, '$.status', 'failed',
                 '$.error', json('{\"code\":\"server_error\",\"message\":\"the gateway stopped before the response finished\"}'))
             WHERE id IN (SELECT id FROM unfinished)",
            [],
        )?;
        tx.execute("DELETE FROM unfinished", [])?;
        tx.commit()?;
        Ok(n)
    }

    /// What each tenant has stored (unexpired): answers, conversations, their items, and
    /// the bytes of their JSON; by tenant id.
    pub fn summary(&self) -> Result<Vec<TenantStored>, StoreError> {
        let conn = self.conn()?;
        let now = now_ms();
        // Each row an answer, a conversation or an item, with its bytes; summed by tenant.
        let mut q = conn.prepare(
            "SELECT s.tenant, SUM(s.answer), SUM(s.conv), SUM(s.item), SUM(s.bytes),
                    COALESCE(MAX(h.bytes), 0)
             FROM (
                 SELECT tenant, 1 AS answer, 0 AS conv, 0 AS item,
                        octet_length(response) + octet_length(conversation) AS bytes
                 FROM responses WHERE expires_ms > ?1 AND hidden = 0
                 UNION ALL
                 SELECT tenant, 0, 1, 0, octet_length(metadata)
                 FROM conversations WHERE expires_ms > ?1
                 UNION ALL
                 SELECT c.tenant, 0, 0, 1, octet_length(i.item)
                 FROM conversation_items i JOIN conversations c ON c.id = i.conversation
                 WHERE c.expires_ms > ?1
             ) s LEFT JOIN stored_bytes h ON h.tenant = s.tenant
             GROUP BY s.tenant ORDER BY s.tenant",
        )?;
        let rows = q.query_map([now], |r| {
            Ok(TenantStored {
                tenant: r.get(0)?,
                answers: r.get(1)?,
                conversations: r.get(2)?,
                conversation_items: r.get(3)?,
                bytes: r.get(4)?,
                held_bytes: r.get::<_, i64>(5)?.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes everything `tenant` has stored (answers, conversations and their items);
    /// how many answers and conversations.
    pub fn delete_tenant(&self, tenant: &str) -> Result<(usize, usize), StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let answers = tx.execute("DELETE FROM responses WHERE tenant = ?1", [tenant])?;
        tx.execute("DELETE FROM item_index WHERE tenant = ?1", [tenant])?;
        tx.execute(
            "DELETE FROM conversation_items WHERE conversation IN
             (SELECT id FROM conversations WHERE tenant = ?1)",
            [tenant],
        )?;
        let conversations = tx.execute("DELETE FROM conversations WHERE tenant = ?1", [tenant])?;
        tx.commit()?;
        Ok((answers, conversations))
    }

    /// Deletes what has expired (answers no answer stored continues, conversations with
    /// their items); how many answers and conversations.
    pub fn purge(&self) -> Result<usize, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = now_ms();
        let answers = lineage::purge(&tx, now)?;
        items::prune(&tx)?;
        tx.execute(
            "DELETE FROM conversation_items WHERE conversation IN
             (SELECT id FROM conversations WHERE expires_ms <= ?1)",
            [now],
        )?;
        let conversations =
            tx.execute("DELETE FROM conversations WHERE expires_ms <= ?1", [now])?;
        tx.commit()?;
        Ok(answers + conversations)
    }

    /// Purges expired answers every hour, on a thread of its own, for as long as the
    /// process runs.
    pub fn purge_hourly(self: &Arc<Self>) {
        let store = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("response-store-purge".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(3600));
                let Some(s) = store.upgrade() else { return };
                if let Err(e) = s.purge() {
                    tracing::warn!(error = %e, "purging expired responses failed");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no purge thread for the response store");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn store(name: &str, retention: Duration) -> Arc<ResponseStore> {
        ResponseStore::open(&fresh_path(name), retention).unwrap()
    }

    /// `s` (at `path`) closed, `sql` run on its file (to make it as an older gateway left
    /// it), and opened again.
    pub(super) fn reopened(s: Arc<ResponseStore>, path: &Path, sql: &str) -> Arc<ResponseStore> {
        drop(s);
        Connection::open(path)
            .expect("opened")
            .execute_batch(sql)
            .expect("made older");
        ResponseStore::open(path, Duration::from_secs(60)).expect("opened again")
    }

    /// Where a store of a test's own goes (nothing there yet).
    pub(super) fn fresh_path(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tollgate-rs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("r.db")
    }

    fn answer(id: &str, tenant: &str) -> Stored {
        Stored {
            id: id.into(),
            tenant: tenant.into(),
            response: format!(r#"{{"id":"{id}"}}"#),
            conversation: r#"[{"role":"user","content":"hi"}]"#.into(),
            parent: None,
        }
    }

    #[tokio::test]
    async fn an_answer_is_its_tenants_until_deleted() {
        let s = store("own", Duration::from_secs(60));
        s.save(answer("resp_1", "a")).await.unwrap();
        assert_eq!(
            s.response("a", "resp_1").unwrap(),
            Some(answer("resp_1", "a").response)
        );
        assert_eq!(s.response("b", "resp_1").unwrap(), None, "another tenant's");
        assert!(!s.delete("b", "resp_1").unwrap());
        let items = s.conversation("a", "resp_1").unwrap().unwrap();
        assert_eq!(items[0]["content"], "hi");
        // Listed, an item stored without an id has its place for one.
        let mut named = items.clone();
        named[0]["id"] = "item_0".into();
        assert_eq!(s.input_items("a", "resp_1").unwrap().unwrap(), named);
        assert_eq!(s.input_items("b", "resp_1").unwrap(), None);
        assert!(s.delete("a", "resp_1").unwrap());
        assert_eq!(s.response("a", "resp_1").unwrap(), None);
    }

    #[tokio::test]
    async fn input_items_are_the_conversation_without_the_output() {
        let s = store("inputs", Duration::from_secs(60));
        let mut a = answer("resp_2", "a");
        a.response = r#"{"id":"resp_2","output":[{"type":"message"}]}"#.into();
        a.conversation = r#"[{"id":"msg_1"},{"id":"msg_2"},{"id":"msg_3"}]"#.into();
        s.save(a).await.unwrap();
        let items = s.input_items("a", "resp_2").unwrap().unwrap();
        let ids: Vec<&str> = items.iter().filter_map(|i| i["id"].as_str()).collect();
        assert_eq!(ids, ["msg_1", "msg_2"]);
    }

    #[tokio::test]
    async fn answers_saved_at_once_are_all_committed() {
        let s = store("group", Duration::from_secs(60));
        let saves = (0..300).map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.save(answer(&format!("resp_{i}"), "a")).await })
        });
        for r in futures::future::join_all(saves).await {
            r.unwrap().unwrap();
        }
        for i in 0..300 {
            assert!(
                s.response("a", &format!("resp_{i}")).unwrap().is_some(),
                "resp_{i}"
            );
        }
    }

    #[tokio::test]
    async fn answers_left_running_are_failed_when_the_store_opens_again() {
        let path = fresh_path("reopen");
        let s = ResponseStore::open(&path, Duration::from_secs(60)).unwrap();
        let mut running = answer("resp_1", "a");
        running.response = r#"{"id":"resp_1","status":"in_progress","background":true}"#.into();
        s.save(Kept {
            stored: Some(running),
            unfinished: true,
            ..Kept::default()
        })
        .await
        .unwrap();
        // One that started and ended: as it ended.
        let mut ended = answer("resp_3", "a");
        ended.response = r#"{"id":"resp_3","status":"in_progress","background":true}"#.into();
        s.save(Kept {
            stored: Some(ended.clone()),
            unfinished: true,
            ..Kept::default()
        })
        .await
        .unwrap();
        ended.response = r#"{"id":"resp_3","status":"completed","background":true}"#.into();
        s.save(ended.clone()).await.unwrap();
        let mut done = answer("resp_2", "a");
        done.response = r#"{"id":"resp_2","status":"completed"}"#.into();
        s.save(done.clone()).await.unwrap();
        drop(s);
        let s = ResponseStore::open(&path, Duration::from_secs(60)).unwrap();
        let r: Value = serde_json::from_str(&s.response("a", "resp_1").unwrap().unwrap()).unwrap();
        assert_eq!(r["status"], "failed");
        assert_eq!(r["background"], true);
        assert!(r["error"]["message"].as_str().unwrap().contains("stopped"));
        assert_eq!(
            s.response("a", "resp_2").unwrap(),
            Some(done.response),
            "a finished one as it was"
        );
        assert_eq!(
            s.response("a", "resp_3").unwrap(),
            Some(ended.response),
            "ended before the stop"
        );
        // Failed once: opened again, nothing more to fail.
        drop(s);
        let s = ResponseStore::open(&path, Duration::from_secs(60)).unwrap();
        assert_eq!(s.fail_unfinished().unwrap(), 0);
    }

    #[tokio::test]
    async fn a_tenants_stored_data_is_summed_and_deleted_whole() {
        let s = store("tenants", Duration::from_secs(60));
        s.save(answer("resp_1", "a")).await.unwrap();
        s.save(answer("resp_2", "a")).await.unwrap();
        s.save(answer("resp_3", "b")).await.unwrap();
        let items = [
            serde_json::json!({"id": "msg_1"}),
            serde_json::json!({"id": "msg_2"}),
        ];
        let meta = [("topic".to_string(), serde_json::json!("counted once"))];
        let c = s
            .create_conversation("a", meta.into_iter().collect(), &items)
            .unwrap();
        let sum = s.summary().unwrap();
        let a = &sum[0];
        assert_eq!(
            (
                a.tenant.as_str(),
                a.answers,
                a.conversations,
                a.conversation_items
            ),
            ("a", 2, 1, 2)
        );
        // The metadata counted once, not once per item: what the triggers keep.
        assert_eq!(a.bytes, s.stored_bytes("a").unwrap());
        assert_eq!((sum[1].tenant.as_str(), sum[1].answers), ("b", 1));
        assert_eq!(s.delete_tenant("a").unwrap(), (2, 1));
        assert_eq!(s.response("a", "resp_1").unwrap(), None);
        assert_eq!(s.conversation_items("a", &c.id).unwrap(), None);
        let sum = s.summary().unwrap();
        assert_eq!(sum.len(), 1, "only b's: {sum:?}");
    }

    #[tokio::test]
    async fn expired_answers_are_gone_and_purged() {
        let s = store("expiry", Duration::from_millis(30));
        s.save(answer("resp_1", "a")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(s.response("a", "resp_1").unwrap(), None);
        assert_eq!(s.purge().unwrap(), 1);
    }
}
