//! What each tenant has stored, in bytes, kept by the database itself: triggers on every
//! table that holds a tenant's words (answers, conversations' metadata, their items) add
//! and subtract their JSON's bytes in `stored_bytes`, in the same transaction as the write,
//! whatever wrote it (the API, the writer thread, the purge, an operator's deletion). The
//! API holds each tenant to its `max_stored_mib` with it ([`ResponseStore::stored_bytes`]).

use super::{ResponseStore, StoreError};
use rusqlite::{Connection, OptionalExtension};

/// The table and its triggers. A conversation's items go before it (so that each item's
/// bytes are taken from its conversation's tenant, whichever order a deletion takes). No
/// conflict clause inside a trigger: the statement that fires it would impose its own (an
/// `INSERT OR REPLACE` would turn an `INSERT OR IGNORE` of a tenant's row into its reset);
/// and no `REPLACE` on these tables: the row it deletes fires no trigger.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS stored_bytes (tenant TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS stored_answer_in AFTER INSERT ON responses BEGIN
    INSERT INTO stored_bytes SELECT NEW.tenant, 0
        WHERE NOT EXISTS (SELECT 1 FROM stored_bytes WHERE tenant = NEW.tenant);
    UPDATE stored_bytes
        SET bytes = bytes + octet_length(NEW.response) + octet_length(NEW.conversation)
        WHERE tenant = NEW.tenant;
END;
CREATE TRIGGER IF NOT EXISTS stored_answer_changed AFTER UPDATE OF response, conversation
ON responses BEGIN
    UPDATE stored_bytes
        SET bytes = bytes + octet_length(NEW.response) + octet_length(NEW.conversation)
                  - octet_length(OLD.response) - octet_length(OLD.conversation)
        WHERE tenant = NEW.tenant;
END;
CREATE TRIGGER IF NOT EXISTS stored_answer_out AFTER DELETE ON responses BEGIN
    UPDATE stored_bytes
        SET bytes = bytes - octet_length(OLD.response) - octet_length(OLD.conversation)
        WHERE tenant = OLD.tenant;
END;
CREATE TRIGGER IF NOT EXISTS stored_conversation_in AFTER INSERT ON conversations BEGIN
    INSERT INTO stored_bytes SELECT NEW.tenant, 0
        WHERE NOT EXISTS (SELECT 1 FROM stored_bytes WHERE tenant = NEW.tenant);
    UPDATE stored_bytes SET bytes = bytes + octet_length(NEW.metadata)
        WHERE tenant = NEW.tenant;
END;
CREATE TRIGGER IF NOT EXISTS stored_conversation_changed AFTER UPDATE OF metadata
ON conversations BEGIN
    UPDATE stored_bytes
        SET bytes = bytes + octet_length(NEW.metadata) - octet_length(OLD.metadata)
        WHERE tenant = NEW.tenant;
END;
CREATE TRIGGER IF NOT EXISTS stored_conversation_going BEFORE DELETE ON conversations BEGIN
    DELETE FROM conversation_items WHERE conversation = OLD.id;
END;
CREATE TRIGGER IF NOT EXISTS stored_conversation_out AFTER DELETE ON conversations BEGIN
    UPDATE stored_bytes SET bytes = bytes - octet_length(OLD.metadata)
        WHERE tenant = OLD.tenant;
END;
CREATE TRIGGER IF NOT EXISTS stored_item_in AFTER INSERT ON conversation_items BEGIN
    UPDATE stored_bytes SET bytes = bytes + octet_length(NEW.item)
        WHERE tenant = (SELECT tenant FROM conversations WHERE id = NEW.conversation);
END;
CREATE TRIGGER IF NOT EXISTS stored_item_out AFTER DELETE ON conversation_items BEGIN
    UPDATE stored_bytes SET bytes = bytes - octet_length(OLD.item)
        WHERE tenant = (SELECT tenant FROM conversations WHERE id = OLD.conversation);
END;
";

/// `PRAGMA user_version` of a store whose `stored_bytes` the triggers keep.
const COUNTED: i64 = 2;

/// Every tenant's bytes, summed from what is stored.
const RECOUNT: &str = "
DELETE FROM stored_bytes;
INSERT INTO stored_bytes
SELECT tenant, SUM(bytes) FROM (
    SELECT tenant, octet_length(response) + octet_length(conversation) AS bytes FROM responses
    UNION ALL
    SELECT tenant, octet_length(metadata) FROM conversations
    UNION ALL
    SELECT c.tenant, octet_length(i.item)
        FROM conversation_items i JOIN conversations c ON c.id = i.conversation
) GROUP BY tenant;
";

/// Counts a store written before the triggers (once: the schema version says so).
pub(super) fn recount(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version >= COUNTED {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(RECOUNT)?;
    tx.pragma_update(None, "user_version", COUNTED)?;
    tx.commit()?;
    Ok(())
}

impl ResponseStore {
    /// The bytes `tenant` has stored (its answers, conversations and their items, as
    /// JSON; expired ones until they are purged).
    pub fn stored_bytes(&self, tenant: &str) -> Result<u64, StoreError> {
        let bytes: Option<i64> = self
            .conn()?
            .query_row(
                "SELECT bytes FROM stored_bytes WHERE tenant = ?1",
                [tenant],
                |r| r.get(0),
            )
            .optional()?;
        Ok(bytes.unwrap_or(0).max(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::store;
    use super::super::{Append, Kept, Stored};
    use super::*;
    use serde_json::{json, Map, Value};
    use std::time::Duration;

    /// What `tenant` has stored, summed from the tables themselves.
    fn summed(s: &ResponseStore, tenant: &str) -> u64 {
        let conn = s.conn().expect("a connection");
        conn.execute_batch("CREATE TEMP TABLE IF NOT EXISTS recount (tenant TEXT, bytes INTEGER)")
            .expect("a table");
        let q = RECOUNT.replace("stored_bytes", "temp.recount");
        conn.execute_batch(&q).expect("recounted");
        conn.query_row(
            "SELECT COALESCE(SUM(bytes), 0) FROM temp.recount WHERE tenant = ?1",
            [tenant],
            |r| r.get(0),
        )
        .expect("read")
    }

    #[tokio::test]
    async fn every_write_keeps_the_tenants_bytes() {
        let s = store("quota", Duration::from_secs(60));
        let answer = |id: &str, tenant: &str, text: &str| Stored {
            id: id.into(),
            tenant: tenant.into(),
            response: json!({"id": id, "text": text}).to_string(),
            conversation: json!([{"id": "msg_1", "content": text}]).to_string(),
            parent: None,
        };
        let check = |what: &str| {
            for t in ["a", "b"] {
                assert_eq!(
                    s.stored_bytes(t).expect("read"),
                    summed(&s, t),
                    "{t} after {what}"
                );
            }
        };
        // Multi-byte text counts its bytes.
        s.save(answer("resp_0", "a", "first")).await.expect("saved");
        s.save(answer("resp_1", "a", "héllo ✓"))
            .await
            .expect("saved");
        assert!(s.stored_bytes("a").expect("read") > 0);
        check("an answer");
        s.save(answer("resp_1", "a", "replaced, longer than before"))
            .await
            .expect("saved");
        s.save(answer("resp_2", "b", "b's")).await.expect("saved");
        check("an answer replaced");
        let item = |t: &str| json!({"id": format!("msg_{t}"), "content": t});
        let meta: Map<String, Value> = [("k".to_string(), json!("v"))].into_iter().collect();
        let c = s
            .create_conversation("a", meta.clone(), &[item("x"), item("yy")])
            .expect("created");
        check("a conversation");
        s.add_items("a", &c.id, &[item("zzz")]).expect("added");
        check("an item added");
        s.save(Kept {
            stored: Some(answer("resp_3", "a", "in a conversation")),
            append: Some(Append {
                conversation: c.id.clone(),
                tenant: "a".into(),
                items: vec![item("in"), item("out")],
                by: None,
            }),
            ..Kept::default()
        })
        .await
        .expect("saved");
        check("items added");
        let bigger: Map<String, Value> = [("k".to_string(), json!("a longer value"))]
            .into_iter()
            .collect();
        s.update_conversation("a", &c.id, bigger).expect("updated");
        s.delete_item("a", &c.id, "msg_x").expect("deleted");
        check("an item deleted");
        s.delete_conversation("a", &c.id).expect("deleted");
        s.delete("a", "resp_1").expect("deleted");
        check("deletions");
        // A conversation deleted by a statement that leaves its items to the trigger.
        let c = s
            .create_conversation("a", meta, &[item("q")])
            .expect("created");
        s.conn()
            .expect("a connection")
            .execute("DELETE FROM conversations WHERE id = ?1", [&c.id])
            .expect("deleted");
        check("a conversation deleted alone");
        s.delete_tenant("a").expect("deleted");
        assert_eq!(s.stored_bytes("a").expect("read"), 0);
        check("a tenant deleted");
        assert!(s.stored_bytes("b").expect("read") > 0, "b's stay");
    }

    #[tokio::test]
    async fn a_store_from_before_the_triggers_is_counted_when_opened() {
        let path = super::super::tests::fresh_path("recount");
        let s = ResponseStore::open(&path, Duration::from_secs(60)).expect("opened");
        s.create_conversation("a", Map::new(), &[json!({"id": "msg_1", "content": "hi"})])
            .expect("created");
        let before = s.stored_bytes("a").expect("read");
        assert!(before > 0);
        let older = "DELETE FROM stored_bytes; PRAGMA user_version = 1;";
        let s = super::super::tests::reopened(s, &path, older);
        assert_eq!(s.stored_bytes("a").expect("read"), before);
    }
}
