//! Stored items by id, for a request's `item_reference` inputs: every item a stored
//! answer adds to its conversation (its input, its output; all of it for an answer that
//! continues none) is indexed by its tenant and id (`item_index`: the answer and the
//! item's position in its own items),
//! and a conversation's items are found through `conversation_items`' own id index. The
//! index holds no copy of an item: a lookup reads it from the answer it points to, so an
//! answer deleted or expired takes its items with it (the index rows that point to it are
//! dropped with it, or at the next purge).

use super::{lineage, now_ms, ResponseStore, StoreError};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::Value;
use std::collections::HashMap;

/// The index's tables (created with the store's), and the schema version that has them.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS item_index (
    response TEXT NOT NULL,
    pos INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (response, pos)
);
CREATE INDEX IF NOT EXISTS item_index_ids ON item_index (tenant, id);
CREATE INDEX IF NOT EXISTS conversation_items_ids ON conversation_items (id);
";

/// `PRAGMA user_version` of a store whose answers are all indexed.
const INDEXED: i64 = 1;

/// Indexes the items of the answer `response` (`conversation`: its items, a JSON array)
/// for `tenant`, replacing what the index held for an answer of that id.
pub(super) fn index(
    tx: &Transaction<'_>,
    response: &str,
    tenant: &str,
    conversation: &str,
) -> Result<(), StoreError> {
    tx.prepare_cached("DELETE FROM item_index WHERE response = ?1")?
        .execute([response])?;
    tx.prepare_cached(
        "INSERT INTO item_index (response, pos, tenant, id)
         SELECT ?1, key, ?2, json_extract(value, '$.id') FROM json_each(?3)
         WHERE json_type(value, '$.id') = 'text'",
    )?
    .execute(params![response, tenant, conversation])?;
    Ok(())
}

/// Indexes the answers of a store written before the index existed (once: the schema
/// version says so).
pub(super) fn backfill(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version >= INDEXED {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let n = tx.execute(
        "INSERT OR REPLACE INTO item_index (response, pos, tenant, id)
         SELECT r.id, j.key, r.tenant, json_extract(j.value, '$.id')
         FROM responses r, json_each(r.conversation) j
         WHERE json_type(j.value, '$.id') = 'text'",
        [],
    )?;
    tx.pragma_update(None, "user_version", INDEXED)?;
    tx.commit()?;
    if n > 0 {
        tracing::info!(items = n, "response store: indexed the stored items by id");
    }
    Ok(())
}

/// Drops the index rows of answers no longer stored.
pub(super) fn prune(tx: &Transaction<'_>) -> Result<usize, StoreError> {
    Ok(tx.execute(
        "DELETE FROM item_index WHERE response NOT IN (SELECT id FROM responses)",
        [],
    )?)
}

impl ResponseStore {
    /// `tenant`'s stored items with the ids `ids` (unexpired: in a stored answer's
    /// conversation, or in a conversation), by id; an id found nowhere is left out.
    pub fn items(
        &self,
        tenant: &str,
        ids: &[String],
    ) -> Result<HashMap<String, Value>, StoreError> {
        let conn = self.conn()?;
        let now = now_ms();
        // Every answer that added an item of that id, and the item's place in its
        // conversation: the item is there while the answer lives, or an answer that
        // continues it and took the item does.
        let mut in_answers = conn.prepare_cached(
            "SELECT json_extract(r.conversation, '$[' || i.pos || ']'), r.id, r.inherits + i.pos,
                    r.expires_ms > ?3 AND r.hidden = 0
             FROM item_index i JOIN responses r ON r.id = i.response
             WHERE i.tenant = ?1 AND i.id = ?2 AND r.tenant = ?1",
        )?;
        let mut in_conversations = conn.prepare_cached(
            "SELECT ci.item FROM conversation_items ci
             JOIN conversations c ON c.id = ci.conversation
             WHERE ci.id = ?2 AND c.tenant = ?1 AND c.expires_ms > ?3
             LIMIT 1",
        )?;
        let mut found = HashMap::new();
        for id in ids {
            if found.contains_key(id) {
                continue;
            }
            let args = params![tenant, id, now];
            let mut text: Option<String> = None;
            let mut rows = in_answers.query(args)?;
            while let Some(r) = rows.next()? {
                let (answer, pos): (String, i64) = (r.get(1)?, r.get(2)?);
                if r.get::<_, bool>(3)? || lineage::heir_holds(&conn, &answer, pos, now)? {
                    text = r.get(0)?;
                    break;
                }
            }
            drop(rows);
            if text.is_none() {
                text = in_conversations.query_row(args, |r| r.get(0)).optional()?;
            }
            if let Some(t) = text {
                found.insert(id.clone(), serde_json::from_str(&t)?);
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::store;
    use super::super::{Kept, Stored};
    use super::*;
    use serde_json::{json, Map};
    use std::time::Duration;

    fn answer(id: &str, tenant: &str, items: &[Value]) -> Stored {
        Stored {
            id: id.into(),
            tenant: tenant.into(),
            response: json!({"id": id}).to_string(),
            conversation: Value::Array(items.to_vec()).to_string(),
            parent: None,
        }
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn a_tenants_items_are_found_by_id_in_its_answers_and_conversations() {
        let s = store("items", Duration::from_secs(60));
        let hi = json!({"id": "msg_1", "type": "message", "role": "user", "content": "hi"});
        let out = json!({"id": "msg_2", "type": "message", "role": "assistant", "content": "yo"});
        let no_id = json!({"role": "user", "content": "old"});
        s.save(answer("resp_1", "a", &[hi.clone(), no_id, out.clone()]))
            .await
            .expect("saved");
        // The next answer of the chain holds msg_1 too; its own item is msg_3.
        let more = json!({"id": "msg_3", "type": "message", "role": "user", "content": "more"});
        s.save(answer(
            "resp_2",
            "a",
            &[hi.clone(), out.clone(), more.clone()],
        ))
        .await
        .expect("saved");
        let conv = json!({"id": "msg_4", "type": "message", "role": "user", "content": "c"});
        s.create_conversation("a", Map::new(), std::slice::from_ref(&conv))
            .expect("created");

        let found = s
            .items("a", &ids(&["msg_1", "msg_2", "msg_3", "msg_4", "msg_9"]))
            .expect("read");
        assert_eq!(found.len(), 4, "{found:?}");
        assert_eq!(found["msg_1"], hi);
        assert_eq!(found["msg_2"], out);
        assert_eq!(found["msg_3"], more);
        assert_eq!(found["msg_4"], conv);
        assert!(s
            .items("b", &ids(&["msg_1", "msg_4"]))
            .expect("read")
            .is_empty());

        // msg_1 stays while an answer holds it; msg_3 goes with the one that did.
        assert!(s.delete("a", "resp_2").expect("deleted"));
        let found = s.items("a", &ids(&["msg_1", "msg_3"])).expect("read");
        assert_eq!(found.keys().collect::<Vec<_>>(), ["msg_1"]);
        s.delete_tenant("a").expect("deleted");
        assert!(s
            .items("a", &ids(&["msg_1", "msg_4"]))
            .expect("read")
            .is_empty());
    }

    #[tokio::test]
    async fn an_answer_stored_again_is_indexed_again() {
        let s = store("items-again", Duration::from_secs(60));
        let first = json!({"id": "msg_1", "role": "user", "content": "in progress"});
        s.save(Kept {
            stored: Some(answer("resp_1", "a", std::slice::from_ref(&first))),
            unfinished: true,
            ..Kept::default()
        })
        .await
        .expect("saved");
        let out = json!({"id": "msg_2", "role": "assistant", "content": "done"});
        s.save(answer("resp_1", "a", &[first.clone(), out.clone()]))
            .await
            .expect("saved");
        let found = s.items("a", &ids(&["msg_1", "msg_2"])).expect("read");
        assert_eq!((&found["msg_1"], &found["msg_2"]), (&first, &out));
    }

    #[tokio::test]
    async fn a_store_from_before_the_index_is_indexed_once_when_opened() {
        let path = super::super::tests::fresh_path("backfill");
        let s = ResponseStore::open(&path, Duration::from_secs(60)).expect("opened");
        let item = json!({"id": "msg_1", "role": "user", "content": "hi"});
        s.save(answer("resp_1", "a", std::slice::from_ref(&item)))
            .await
            .expect("saved");
        // As a store written before the index: no rows, schema version 0.
        let older = "DELETE FROM item_index; PRAGMA user_version = 0;";
        let s = super::super::tests::reopened(s, &path, older);
        assert_eq!(s.items("a", &ids(&["msg_1"])).expect("read")["msg_1"], item);
        let version: i64 = s
            .conn()
            .expect("a connection")
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("read");
        assert!(version >= INDEXED, "{version}");
    }
}
