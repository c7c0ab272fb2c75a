//! The Conversations API's conversations in the response store: a conversation (its
//! tenant, creation time, metadata) and its items in order (each as stored: an input
//! item with its id, in the shape `api::input_items` stores). Answers in a conversation
//! add their input and output through the store's writer ([`append`]); the API's own
//! writes go through the store's connection, each in one immediate transaction (so two
//! writers never number items alike). A conversation expires `retention_hours` after its
//! last write.

use super::{now_ms, owns, Append, ItemsPage, Paged, ResponseStore, StoreError};
use rusqlite::{params, OptionalExtension, Transaction, TransactionBehavior};
use serde_json::{json, Map, Value};

/// A conversation (without its items).
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub id: String,
    pub created_ms: i64,
    pub metadata: Map<String, Value>,
}

impl Conversation {
    /// The API's `conversation` object.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "conversation",
            "created_at": self.created_ms / 1000,
            "metadata": self.metadata,
        })
    }
}

/// Adds an answer's items to the end of its conversation, unless the conversation is
/// gone (deleted meanwhile), and keeps the conversation until `expires`.
pub(super) fn append(tx: &Transaction<'_>, a: &Append, expires: i64) -> Result<(), StoreError> {
    if !owns(tx, &a.tenant, &a.conversation)? {
        return Ok(());
    }
    add(tx, &a.conversation, &a.items)?;
    touch(tx, &a.conversation, expires)
}

fn touch(tx: &Transaction<'_>, id: &str, expires: i64) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE conversations SET expires_ms = ?2 WHERE id = ?1",
        params![id, expires],
    )?;
    Ok(())
}

/// Adds `items` after the conversation's last.
fn add(tx: &Transaction<'_>, id: &str, items: &[Value]) -> Result<(), StoreError> {
    let last: i64 = tx.query_row(
        "SELECT COALESCE(MAX(seq), 0) FROM conversation_items WHERE conversation = ?1",
        [id],
        |r| r.get(0),
    )?;
    let mut put = tx.prepare_cached("INSERT INTO conversation_items VALUES (?1, ?2, ?3, ?4)")?;
    for (i, item) in items.iter().enumerate() {
        let item_id = item.get("id").and_then(Value::as_str).unwrap_or_default();
        put.execute(params![id, last + 1 + i as i64, item_id, item.to_string()])?;
    }
    Ok(())
}

fn read(tx: &Transaction<'_>, tenant: &str, id: &str) -> Result<Option<Conversation>, StoreError> {
    let row = tx
        .query_row(
            "SELECT created_ms, metadata FROM conversations
             WHERE id = ?1 AND tenant = ?2 AND expires_ms > ?3",
            params![id, tenant, now_ms()],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
        )
        .optional()?;
    match row {
        None => Ok(None),
        Some((created_ms, metadata)) => Ok(Some(Conversation {
            id: id.to_string(),
            created_ms,
            metadata: serde_json::from_str(&metadata)?,
        })),
    }
}

impl ResponseStore {
    /// When a conversation written now expires.
    fn expires(&self) -> i64 {
        now_ms().saturating_add(self.retention.as_millis() as i64)
    }

    /// Runs `f` in one transaction on the store's connection (`write`: an immediate one,
    /// which waits for other writers), committed if it succeeds.
    fn in_tx<T>(
        &self,
        write: bool,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(if write {
            TransactionBehavior::Immediate
        } else {
            TransactionBehavior::Deferred
        })?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// A new conversation of `tenant`'s with `metadata` and, in order, `items`.
    pub fn create_conversation(
        &self,
        tenant: &str,
        metadata: Map<String, Value>,
        items: &[Value],
    ) -> Result<Conversation, StoreError> {
        let c = Conversation {
            id: format!("conv_{}", uuid::Uuid::new_v4().simple()),
            created_ms: now_ms(),
            metadata,
        };
        let expires = self.expires();
        self.in_tx(true, |tx| {
            tx.execute(
                "INSERT INTO conversations VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    c.id,
                    tenant,
                    c.created_ms,
                    expires,
                    Value::Object(c.metadata.clone()).to_string()
                ],
            )?;
            add(tx, &c.id, items)
        })?;
        Ok(c)
    }

    /// `tenant`'s conversation `id`.
    pub fn get_conversation(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<Conversation>, StoreError> {
        self.in_tx(false, |tx| read(tx, tenant, id))
    }

    /// Replaces the metadata of `tenant`'s conversation `id`.
    pub fn update_conversation(
        &self,
        tenant: &str,
        id: &str,
        metadata: Map<String, Value>,
    ) -> Result<Option<Conversation>, StoreError> {
        let expires = self.expires();
        self.in_tx(true, |tx| {
            let Some(mut c) = read(tx, tenant, id)? else {
                return Ok(None);
            };
            tx.execute(
                "UPDATE conversations SET metadata = ?2, expires_ms = ?3 WHERE id = ?1",
                params![id, Value::Object(metadata.clone()).to_string(), expires],
            )?;
            c.metadata = metadata;
            Ok(Some(c))
        })
    }

    /// Deletes `tenant`'s conversation `id` with its items; whether there was one.
    pub fn delete_conversation(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        self.in_tx(true, |tx| {
            if !owns(tx, tenant, id)? {
                return Ok(false);
            }
            tx.execute(
                "DELETE FROM conversation_items WHERE conversation = ?1",
                [id],
            )?;
            tx.execute("DELETE FROM conversations WHERE id = ?1", [id])?;
            Ok(true)
        })
    }

    /// The items of `tenant`'s conversation `id`, in order.
    pub fn conversation_items(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<Vec<Value>>, StoreError> {
        self.in_tx(false, |tx| {
            if !owns(tx, tenant, id)? {
                return Ok(None);
            }
            let mut q = tx.prepare_cached(
                "SELECT item FROM conversation_items WHERE conversation = ?1 ORDER BY seq",
            )?;
            let rows = q.query_map([id], |r| r.get::<_, String>(0))?;
            let mut items = Vec::new();
            for row in rows {
                items.push(serde_json::from_str(&row?)?);
            }
            Ok(Some(items))
        })
    }

    /// A page of the items of `tenant`'s conversation `id`, read as a range of the
    /// conversation's sequence numbers (its index): O(page), however long the
    /// conversation. A cursor names the first item of that id in the order asked.
    pub fn conversation_items_page(
        &self,
        tenant: &str,
        id: &str,
        page: ItemsPage<'_>,
    ) -> Result<Option<Paged>, StoreError> {
        self.in_tx(false, |tx| {
            if !owns(tx, tenant, id)? {
                return Ok(None);
            }
            let seq_of = |item: &str| -> Result<Option<i64>, StoreError> {
                let first = match page.desc {
                    true => "SELECT MAX(seq) FROM conversation_items WHERE conversation = ?1 AND id = ?2",
                    false => "SELECT MIN(seq) FROM conversation_items WHERE conversation = ?1 AND id = ?2",
                };
                Ok(tx.query_row(first, params![id, item], |r| r.get::<_, Option<i64>>(0))?)
            };
            type Cursor = Result<Option<i64>, Paged>;
            let cursor = |item: Option<&str>, param| -> Result<Cursor, StoreError> {
                match item {
                    None => Ok(Ok(None)),
                    Some(item) => Ok(seq_of(item)?.map(Some).ok_or(Paged::NoSuchItem { param })),
                }
            };
            let after = match cursor(page.after, "after")? {
                Ok(a) => a,
                Err(missing) => return Ok(Some(missing)),
            };
            let before = match cursor(page.before, "before")? {
                Ok(b) => b,
                Err(missing) => return Ok(Some(missing)),
            };
            // The window between the cursors, as lo < seq < hi.
            let (lo, hi) = match page.desc {
                false => (after, before),
                true => (before, after),
            };
            let (lo, hi) = (lo.unwrap_or(i64::MIN), hi.unwrap_or(i64::MAX));
            // Only `before`: the page just before it, read from that end.
            let from_end = page.before.is_some() && page.after.is_none();
            let ascending = page.desc == from_end;
            let mut q = tx.prepare_cached(match ascending {
                true => "SELECT item FROM conversation_items
                         WHERE conversation = ?1 AND seq > ?2 AND seq < ?3 ORDER BY seq LIMIT ?4",
                false => "SELECT item FROM conversation_items
                          WHERE conversation = ?1 AND seq > ?2 AND seq < ?3 ORDER BY seq DESC LIMIT ?4",
            })?;
            let rows = q.query_map(params![id, lo, hi, page.limit as i64 + 1], |r| {
                r.get::<_, String>(0)
            })?;
            let mut items = Vec::with_capacity(page.limit + 1);
            for row in rows {
                items.push(serde_json::from_str(&row?)?);
            }
            let has_more = items.len() > page.limit;
            items.truncate(page.limit);
            if from_end {
                items.reverse();
            }
            Ok(Some(Paged::Items { items, has_more }))
        })
    }

    /// Adds `items` (each with its id) to the end of `tenant`'s conversation `id`;
    /// whether there is one.
    pub fn add_items(&self, tenant: &str, id: &str, items: &[Value]) -> Result<bool, StoreError> {
        let expires = self.expires();
        self.in_tx(true, |tx| {
            if !owns(tx, tenant, id)? {
                return Ok(false);
            }
            add(tx, id, items)?;
            touch(tx, id, expires)?;
            Ok(true)
        })
    }

    /// The item `item` of `tenant`'s conversation `id`.
    pub fn conversation_item(
        &self,
        tenant: &str,
        id: &str,
        item: &str,
    ) -> Result<Option<Value>, StoreError> {
        self.in_tx(false, |tx| {
            if !owns(tx, tenant, id)? {
                return Ok(None);
            }
            let found = tx
                .query_row(
                    "SELECT item FROM conversation_items WHERE conversation = ?1 AND id = ?2
                     ORDER BY seq LIMIT 1",
                    params![id, item],
                    |r| r.get::<_, String>(0),
                )
                .optional()?;
            Ok(match found {
                Some(s) => Some(serde_json::from_str(&s)?),
                None => None,
            })
        })
    }

    /// Deletes the item `item` of `tenant`'s conversation `id`: the conversation, if it
    /// had that item.
    pub fn delete_item(
        &self,
        tenant: &str,
        id: &str,
        item: &str,
    ) -> Result<Option<Conversation>, StoreError> {
        let expires = self.expires();
        self.in_tx(true, |tx| {
            let Some(c) = read(tx, tenant, id)? else {
                return Ok(None);
            };
            let n = tx.execute(
                "DELETE FROM conversation_items WHERE conversation = ?1 AND id = ?2",
                params![id, item],
            )?;
            if n == 0 {
                return Ok(None);
            }
            touch(tx, id, expires)?;
            Ok(Some(c))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::store;
    use super::*;
    use std::time::Duration;

    fn item(id: &str, text: &str) -> Value {
        json!({"id": id, "type": "message", "role": "user",
               "content": [{"type": "input_text", "text": text}]})
    }

    fn ids(items: &[Value]) -> Vec<&str> {
        items.iter().filter_map(|i| i["id"].as_str()).collect()
    }

    #[tokio::test]
    async fn a_conversation_is_its_tenants_and_keeps_its_items_in_order() {
        let s = store("conv", Duration::from_secs(60));
        let meta: Map<String, Value> = [("topic".to_string(), json!("demo"))].into_iter().collect();
        let c = s
            .create_conversation("a", meta.clone(), &[item("msg_1", "hi")])
            .unwrap();
        assert!(c.id.starts_with("conv_"));
        assert_eq!(s.get_conversation("a", &c.id).unwrap(), Some(c.clone()));
        assert_eq!(s.get_conversation("b", &c.id).unwrap(), None);
        assert!(!s.add_items("b", &c.id, &[item("msg_x", "no")]).unwrap());
        assert!(s
            .add_items("a", &c.id, &[item("msg_2", "two"), item("msg_3", "three")])
            .unwrap());
        // An answer's items, through the writer, after those.
        let append = Append {
            conversation: c.id.clone(),
            tenant: "a".into(),
            items: vec![item("msg_4", "four")],
        };
        let answer = crate::response_store::Kept {
            append: Some(append.clone()),
            ..Default::default()
        };
        s.save(answer).await.unwrap();
        let items = s.conversation_items("a", &c.id).unwrap().unwrap();
        assert_eq!(ids(&items), ["msg_1", "msg_2", "msg_3", "msg_4"]);
        assert_eq!(s.conversation_items("b", &c.id).unwrap(), None);
        assert_eq!(
            s.conversation_item("a", &c.id, "msg_2").unwrap(),
            Some(item("msg_2", "two"))
        );
        assert_eq!(s.delete_item("b", &c.id, "msg_2").unwrap(), None);
        assert_eq!(s.delete_item("a", &c.id, "msg_2").unwrap(), Some(c.clone()));
        assert_eq!(s.delete_item("a", &c.id, "msg_2").unwrap(), None, "gone");
        let items = s.conversation_items("a", &c.id).unwrap().unwrap();
        assert_eq!(ids(&items), ["msg_1", "msg_3", "msg_4"]);
        let meta2: Map<String, Value> = [("topic".to_string(), json!("other"))]
            .into_iter()
            .collect();
        let updated = s.update_conversation("a", &c.id, meta2.clone()).unwrap();
        assert_eq!(updated.map(|u| u.metadata), Some(meta2));
        assert!(!s.delete_conversation("b", &c.id).unwrap());
        assert!(s.delete_conversation("a", &c.id).unwrap());
        assert_eq!(s.conversation_items("a", &c.id).unwrap(), None);
        // An answer for a conversation deleted meanwhile is still committed.
        s.save(crate::response_store::Kept {
            append: Some(append),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(s.conversation_items("a", &c.id).unwrap(), None);
    }

    #[tokio::test]
    async fn concurrent_appends_keep_every_item() {
        let s = store("conv-many", Duration::from_secs(60));
        let c = s.create_conversation("a", Map::new(), &[]).unwrap();
        let writes = (0..50).map(|i| {
            let (s, id) = (s.clone(), c.id.clone());
            tokio::spawn(async move {
                if i % 2 == 0 {
                    let items = [item(&format!("msg_{i}"), "api")];
                    tokio::task::spawn_blocking(move || s.add_items("a", &id, &items))
                        .await
                        .unwrap()
                        .map(|_| ())
                } else {
                    s.save(crate::response_store::Kept {
                        append: Some(Append {
                            conversation: id,
                            tenant: "a".into(),
                            items: vec![item(&format!("msg_{i}"), "answer")],
                        }),
                        ..Default::default()
                    })
                    .await
                }
            })
        });
        for w in futures::future::join_all(writes).await {
            w.unwrap().unwrap();
        }
        let items = s.conversation_items("a", &c.id).unwrap().unwrap();
        let mut got: Vec<&str> = ids(&items);
        got.sort_unstable();
        got.dedup();
        assert_eq!(got.len(), 50);
    }

    /// Paging in the store agrees with paging the whole list in memory ([`Paged::of`]),
    /// for every limit, order and pair of cursors, ids repeated.
    #[test]
    fn pages_read_from_the_store_are_the_pages_of_the_whole_list() {
        let s = store("conv-pages", Duration::from_secs(60));
        let ids: Vec<String> = [0, 1, 2, 3, 2, 5, 6]
            .iter()
            .map(|i| format!("msg_{i}"))
            .collect();
        let all: Vec<Value> = ids.iter().map(|i| item(i, i)).collect();
        let c = s.create_conversation("a", Map::new(), &all).unwrap();
        let cursors: Vec<Option<&str>> = std::iter::once(None)
            .chain(ids.iter().map(|i| Some(i.as_str())))
            .chain([Some("msg_9")])
            .collect();
        let mut checked = 0;
        for limit in [1, 2, 3, 7, 100] {
            for desc in [true, false] {
                for after in &cursors {
                    for before in &cursors {
                        let asked = ItemsPage {
                            limit,
                            desc,
                            after: *after,
                            before: *before,
                        };
                        let got = s
                            .conversation_items_page("a", &c.id, asked)
                            .unwrap()
                            .unwrap();
                        assert_eq!(got, Paged::of(all.clone(), asked), "{asked:?}");
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 5 * 2 * 9 * 9);
        assert_eq!(
            s.conversation_items_page(
                "b",
                &c.id,
                ItemsPage {
                    limit: 1,
                    desc: true,
                    after: None,
                    before: None
                }
            )
            .unwrap(),
            None,
            "another tenant's"
        );
    }

    /// Every query that finds an item by its id seeks it in an index, never scanning the
    /// conversation (a cursor of a 10,000-item conversation took 2.7 ms that way).
    #[test]
    fn items_are_found_by_id_in_one_seek() {
        let s = store("conv-plans", Duration::from_secs(60));
        let conn = s.conn().unwrap();
        for q in [
            "SELECT MAX(seq) FROM conversation_items WHERE conversation = ?1 AND id = ?2",
            "SELECT MIN(seq) FROM conversation_items WHERE conversation = ?1 AND id = ?2",
            "SELECT item FROM conversation_items WHERE conversation = ?1 AND id = ?2
             ORDER BY seq LIMIT 1",
            "DELETE FROM conversation_items WHERE conversation = ?1 AND id = ?2",
        ] {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {q}"))
                .unwrap()
                .query_map(params!["c", "i"], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter()
                    .any(|p| p.contains("conversation_item_id_seqs (conversation=? AND id=?)")),
                "{q}: {plan:?}"
            );
        }
    }

    #[tokio::test]
    async fn expired_conversations_are_gone_and_purged() {
        let s = store("conv-expiry", Duration::from_millis(30));
        let c = s
            .create_conversation("a", Map::new(), &[item("msg_1", "hi")])
            .unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(s.get_conversation("a", &c.id).unwrap(), None);
        assert_eq!(s.purge().unwrap(), 1);
    }
}
