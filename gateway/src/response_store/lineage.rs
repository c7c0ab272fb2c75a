//! Chains of stored answers: an answer that continues another (`previous_response_id`)
//! stores only its own items and a link to it (`parent`, and `inherits`: how many of the
//! parent's conversation items it took, so that a parent stored again with more items, a
//! background response that finished, is read as the child saw it). A conversation is
//! read by walking the links to the first answer ([`conversation`]): a chain of n answers
//! stores n answers' items, not the n² of each holding the whole conversation.
//!
//! What a child needs of its ancestors stays while it lives: an answer deleted while an
//! answer continues it is hidden (found by no id, its items still read through the
//! child), and the purge takes an expired or hidden answer only once no live answer
//! descends from it ([`purge`]); deleting the last child of a hidden or expired answer
//! takes it too ([`delete`]). A parent gone before its child is committed (deleted
//! meanwhile) leaves the child stored whole ([`link`]).

use super::{now_ms, Stored, StoreError};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::Value;
use std::sync::Arc;

/// The stored answer an answer continues.
#[derive(Debug, Clone, PartialEq)]
pub struct Parent {
    /// Its id.
    pub id: String,
    /// How many of its conversation's items the answer's conversation starts with.
    pub inherits: usize,
    /// The conversation the answer was given (its first `inherits` items are the
    /// parent's): stored whole with the answer's own items if the parent is gone by the
    /// time the answer is committed.
    pub prefix: Arc<Vec<Value>>,
}

/// The deepest chain read (a guard against a cycle, which no write makes).
const MAX_DEPTH: i64 = 1_000_000;

/// Adds the lineage columns to a store written before them (its answers each hold their
/// whole conversation: read as chains of one), and their index.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let has: i64 = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('responses') WHERE name = 'parent'",
        [],
        |r| r.get(0),
    )?;
    if has == 0 {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "ALTER TABLE responses ADD COLUMN parent TEXT;
             ALTER TABLE responses ADD COLUMN inherits INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE responses ADD COLUMN hidden INTEGER NOT NULL DEFAULT 0;",
        )?;
        tx.commit()?;
    }
    conn.execute_batch("CREATE INDEX IF NOT EXISTS responses_parent ON responses (parent)")?;
    Ok(())
}

/// How `s` is written, in `tx`: its parent's id and `inherits` where its parent is
/// stored; else no parent, and its whole conversation (the parent's items it took, then
/// its own) to store instead of its own items.
pub(super) fn link<'a>(
    tx: &Transaction<'_>,
    s: &'a Stored,
) -> Result<(Option<&'a str>, i64, Option<String>), StoreError> {
    let Some(p) = &s.parent else {
        return Ok((None, 0, None));
    };
    let there = tx
        .prepare_cached("SELECT 1 FROM responses WHERE id = ?1 AND tenant = ?2")?
        .query_row(params![p.id, s.tenant], |_| Ok(()))
        .optional()?
        .is_some();
    if there {
        return Ok((Some(&p.id), p.inherits as i64, None));
    }
    let own: Vec<Value> = serde_json::from_str(&s.conversation)?;
    let taken = p.prefix.get(..p.inherits).unwrap_or(&p.prefix);
    let whole: Vec<&Value> = taken.iter().chain(own.iter()).collect();
    Ok((None, 0, Some(serde_json::to_string(&whole)?)))
}

/// The conversation of `tenant`'s answer `id` (unexpired, not deleted): its ancestors'
/// items, each as far as its child took them, then its own.
pub(super) fn conversation(
    conn: &Connection,
    tenant: &str,
    id: &str,
) -> Result<Option<Vec<Value>>, StoreError> {
    let mut q = conn.prepare_cached(
        "WITH RECURSIVE chain (id, parent, inherits, conversation, depth) AS (
             SELECT id, parent, inherits, conversation, 0 FROM responses
             WHERE id = ?1 AND tenant = ?2 AND expires_ms > ?3 AND hidden = 0
             UNION ALL
             SELECT r.id, r.parent, r.inherits, r.conversation, c.depth + 1
             FROM responses r JOIN chain c ON r.id = c.parent
             WHERE r.tenant = ?2 AND c.depth < ?4
         )
         SELECT parent IS NULL, inherits, conversation FROM chain ORDER BY depth DESC",
    )?;
    let mut rows = q.query(params![id, tenant, now_ms(), MAX_DEPTH])?;
    let mut items: Vec<Value> = Vec::new();
    let mut first = true;
    while let Some(r) = rows.next()? {
        if first && !r.get::<_, bool>(0)? {
            return Err(StoreError::Broken(format!(
                "an answer that {id} continues is gone"
            )));
        }
        first = false;
        items.truncate(r.get::<_, i64>(1)?.max(0) as usize);
        let own: Vec<Value> = serde_json::from_str(&r.get::<_, String>(2)?)?;
        items.extend(own);
    }
    Ok((!first).then_some(items))
}

/// Whether an answer stored continues `id`.
fn continued(tx: &Transaction<'_>, id: &str) -> Result<bool, StoreError> {
    Ok(tx
        .prepare_cached("SELECT 1 FROM responses WHERE parent = ?1 LIMIT 1")?
        .query_row([id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Removes the answer `id` and its items' index rows.
fn remove(tx: &Transaction<'_>, id: &str) -> Result<(), StoreError> {
    tx.prepare_cached("DELETE FROM responses WHERE id = ?1")?
        .execute([id])?;
    tx.prepare_cached("DELETE FROM item_index WHERE response = ?1")?
        .execute([id])?;
    Ok(())
}

/// Deletes `tenant`'s answer `id` (one not deleted yet), in `tx`: hidden while an answer
/// continues it, else removed with the hidden or expired ancestors only it needed.
/// Whether there was one.
pub(super) fn delete(tx: &Transaction<'_>, tenant: &str, id: &str) -> Result<bool, StoreError> {
    let parent: Option<Option<String>> = tx
        .query_row(
            "SELECT parent FROM responses WHERE id = ?1 AND tenant = ?2 AND hidden = 0",
            params![id, tenant],
            |r| r.get(0),
        )
        .optional()?;
    let Some(mut parent) = parent else {
        return Ok(false);
    };
    if continued(tx, id)? {
        tx.execute("UPDATE responses SET hidden = 1 WHERE id = ?1", [id])?;
        return Ok(true);
    }
    remove(tx, id)?;
    let now = now_ms();
    while let Some(p) = parent {
        let row: Option<(Option<String>, bool)> = tx
            .query_row(
                "SELECT parent, hidden = 1 OR expires_ms <= ?2 FROM responses WHERE id = ?1",
                params![p, now],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match row {
            Some((up, true)) if !continued(tx, &p)? => {
                remove(tx, &p)?;
                parent = up;
            }
            _ => break,
        }
    }
    Ok(true)
}

/// Removes the answers expired (at `now`) or hidden that no live answer descends from;
/// how many.
pub(super) fn purge(tx: &Transaction<'_>, now: i64) -> Result<usize, StoreError> {
    Ok(tx.execute(
        "WITH RECURSIVE needed (id) AS (
             SELECT parent FROM responses
             WHERE expires_ms > ?1 AND hidden = 0 AND parent IS NOT NULL
             UNION
             SELECT r.parent FROM responses r JOIN needed n ON r.id = n.id
             WHERE r.parent IS NOT NULL
         )
         DELETE FROM responses
         WHERE (expires_ms <= ?1 OR hidden = 1) AND id NOT IN (SELECT id FROM needed)",
        [now],
    )?)
}

/// Whether a live answer (unexpired at `now`, not deleted) descends from the answer `id`
/// through children that each took its conversation's item at `pos`: whether that item
/// is in a live answer's conversation.
pub(super) fn heir_holds(
    conn: &Connection,
    id: &str,
    pos: i64,
    now: i64,
) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(
            "WITH RECURSIVE heirs (id) AS (
                 SELECT id FROM responses WHERE parent = ?1 AND inherits > ?2
                 UNION
                 SELECT r.id FROM responses r JOIN heirs h ON r.parent = h.id
                 WHERE r.inherits > ?2
             )
             SELECT EXISTS (SELECT 1 FROM heirs h JOIN responses r ON r.id = h.id
                            WHERE r.expires_ms > ?3 AND r.hidden = 0)",
        )?
        .query_row(params![id, pos, now], |r| r.get(0))?)
}
