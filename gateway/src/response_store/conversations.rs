//! The Conversations API's conversations in the response store: a conversation (its
//! tenant, creation time, metadata) and its items in order (each as stored: an input
//! item with its id, in the shape `api::input_items` stores). Answers in a conversation
//! add their input and output through the store's writer ([`append`]); the API's own
//! writes go through the store's connection, each in one immediate transaction (so two
//! writers never number items alike). A conversation expires `retention_hours` after its
//! last write.
//!
//! A conversation names the last stored answer in it whose conversation is its first
//! items (`answer`, `answer_len`): set when an answer's items are added and nothing
//! changed the conversation since the answer read it (its `version`), kept while items
//! are only added, dropped when one is deleted. The next answer in the conversation
//! continues that one ([`InConversation`]), storing only the items after it: answers in a
//! conversation store each item once, as a chain of answers does.

use super::{now_ms, owns, Append, ItemsPage, Paged, ResponseStore, StoreError};
use rusqlite::Connection;
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

/// A conversation's items as an answer in it reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct InConversation {
    pub items: Vec<Value>,
    /// The conversation's version.
    pub version: i64,
    /// The stored answer whose conversation is the first of `items`, and how many.
    pub answer: Option<(String, usize)>,
}

/// Adds the answer link's columns to a store written before them.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    super::add_columns(
        conn,
        "conversations",
        &[
            ("version", "INTEGER NOT NULL DEFAULT 0"),
            ("answer", "TEXT"),
            ("answer_len", "INTEGER NOT NULL DEFAULT 0"),
        ],
    )
}

/// Adds an answer's items to the end of its conversation, unless the conversation is
/// gone (deleted meanwhile), and keeps the conversation until `expires`. A stored answer
/// that read the conversation as it stands becomes the one the next answer continues.
pub(super) fn append(tx: &Transaction<'_>, a: &Append, expires: i64) -> Result<(), StoreError> {
    if !owns(tx, &a.tenant, &a.conversation)? {
        return Ok(());
    }
    let version: i64 = tx.query_row(
        "SELECT version FROM conversations WHERE id = ?1",
        [&a.conversation],
        |r| r.get(0),
    )?;
    add(tx, &a.conversation, &a.items)?;
    if let Some(by) = a.by.as_ref().filter(|by| by.version == version) {
        tx.execute(
            "UPDATE conversations SET answer = ?2, answer_len = ?3 WHERE id = ?1",
            params![a.conversation, by.answer, (by.len + a.items.len()) as i64],
        )?;
    }
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
    tx.prepare_cached("UPDATE conversations SET version = version + 1 WHERE id = ?1")?
        .execute([id])?;
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
                "INSERT INTO conversations (id, tenant, created_ms, expires_ms, metadata)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
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
        Ok(self.in_conversation(tenant, id)?.map(|c| c.items))
    }

    /// The items of `tenant`'s conversation `id` as an answer in it reads them: with its
    /// version, and the stored answer they start with.
    pub fn in_conversation(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<InConversation>, StoreError> {
        self.in_tx(false, |tx| {
            let head = tx
                .query_row(
                    "SELECT version, answer, answer_len FROM conversations
                     WHERE id = ?1 AND tenant = ?2 AND expires_ms > ?3",
                    params![id, tenant, now_ms()],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, Option<String>>(1)?,
                            r.get::<_, i64>(2)?,
                        ))
                    },
                )
                .optional()?;
            let Some((version, answer, len)) = head else {
                return Ok(None);
            };
            let mut q = tx.prepare_cached(
                "SELECT item FROM conversation_items WHERE conversation = ?1 ORDER BY seq",
            )?;
            let rows = q.query_map([id], |r| r.get::<_, String>(0))?;
            let mut items = Vec::new();
            for row in rows {
                items.push(serde_json::from_str(&row?)?);
            }
            let len = len.max(0) as usize;
            Ok(Some(InConversation {
                answer: answer.filter(|_| len <= items.len()).map(|a| (a, len)),
                items,
                version,
            }))
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
            // The items no longer start with the last answer's conversation.
            tx.execute(
                "UPDATE conversations SET version = version + 1, answer = NULL WHERE id = ?1",
                [id],
            )?;
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
            by: None,
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
                            by: None,
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

#[cfg(test)]
mod concurrency_tests {
    use super::super::tests::store;
    use super::*;
    use std::time::Duration;

    /// The API's writes come from the pool's connections side by side: eight threads
    /// adding to one conversation while four read it lose no item and number none twice,
    /// and every read sees a whole prefix of the additions.
    #[test]
    fn writers_on_several_connections_number_every_item_once() {
        let s = store("conv-concurrent", Duration::from_secs(60));
        let c = s
            .create_conversation("a", Map::new(), &[])
            .expect("created");
        std::thread::scope(|scope| {
            for w in 0..8 {
                let (s, id) = (&s, &c.id);
                scope.spawn(move || {
                    for i in 0..40 {
                        let item =
                            json!({"id": format!("w{w}_{i}"), "role": "user", "content": "x"});
                        assert!(s.add_items("a", id, &[item]).expect("added"));
                    }
                });
            }
            for _ in 0..4 {
                let (s, id) = (&s, &c.id);
                scope.spawn(move || {
                    for _ in 0..40 {
                        let items = s.conversation_items("a", id).expect("read").expect("there");
                        // Each writer's items in its own order: a prefix of them.
                        for w in 0..8 {
                            let mine: Vec<&str> = items
                                .iter()
                                .filter_map(|i| i["id"].as_str())
                                .filter(|i| i.starts_with(&format!("w{w}_")))
                                .collect();
                            let want: Vec<String> =
                                (0..mine.len()).map(|i| format!("w{w}_{i}")).collect();
                            assert_eq!(mine, want);
                        }
                    }
                });
            }
        });
        let items = s
            .conversation_items("a", &c.id)
            .expect("read")
            .expect("there");
        assert_eq!(items.len(), 320);
        let seqs: i64 = s
            .conn()
            .expect("a connection")
            .query_row(
                "SELECT COUNT(DISTINCT seq) FROM conversation_items WHERE conversation = ?1",
                [&c.id],
                |r| r.get(0),
            )
            .expect("counted");
        assert_eq!(seqs, 320);
        let c = s.in_conversation("a", &c.id).expect("read").expect("there");
        assert_eq!(c.version, 321, "created, then one version an addition");
    }
}

#[cfg(test)]
mod chain_tests {
    use super::super::tests::store;
    use super::super::{Kept, Parent, ReadBy, Stored};
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn item(id: &str) -> Value {
        json!({"id": id, "type": "message", "role": "user", "content": id})
    }

    /// What an answer `id` in the conversation `conv` reads, and what it would store:
    /// the items after the answer it continues, then `own` (its input and output).
    async fn read_for(s: &ResponseStore, conv: &str, id: &str, own: &[Value]) -> Kept {
        let c = s.in_conversation("a", conv).expect("read").expect("there");
        let inherits = c.answer.as_ref().map_or(0, |a| a.1);
        let mut mine: Vec<Value> = c.items[inherits..].to_vec();
        mine.extend(own.iter().cloned());
        Kept {
            stored: Some(Stored {
                id: id.into(),
                tenant: "a".into(),
                response: json!({"id": id, "output": []}).to_string(),
                conversation: Value::Array(mine).to_string(),
                parent: c.answer.as_ref().map(|(p, n)| Parent {
                    id: p.clone(),
                    inherits: *n,
                    prefix: Arc::new(c.items.clone()),
                }),
            }),
            append: Some(Append {
                conversation: conv.into(),
                tenant: "a".into(),
                items: own.to_vec(),
                by: Some(ReadBy {
                    answer: id.into(),
                    version: c.version,
                    len: c.items.len(),
                }),
            }),
            ..Kept::default()
        }
    }

    fn ids(items: &[Value]) -> Vec<String> {
        items
            .iter()
            .map(|i| i["id"].as_str().expect("id").to_string())
            .collect()
    }

    /// The ids of the conversation's items now.
    fn held(s: &ResponseStore, conv: &str) -> Vec<String> {
        ids(&s
            .conversation_items("a", conv)
            .expect("read")
            .expect("there"))
    }

    fn parent_of(s: &ResponseStore, id: &str) -> Option<String> {
        s.conn()
            .expect("a connection")
            .query_row("SELECT parent FROM responses WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .expect("read")
    }

    /// Answers in a conversation continue the last one stored in it, storing only what
    /// follows: each reads back as the conversation it was given and its own items, after
    /// items added through the API, answers racing, and an item deleted.
    #[tokio::test]
    async fn answers_in_a_conversation_continue_the_last_one_stored_in_it() {
        let s = store("conv-chain", Duration::from_secs(60));
        let c = s
            .create_conversation("a", Map::new(), &[item("m0"), item("m1")])
            .expect("created");
        // Each answer: what the conversation holds right after it.
        let mut check: Vec<(String, Vec<String>)> = Vec::new();
        let answer = |id: &str, own: &[&str]| {
            (
                id.to_string(),
                own.iter().map(|o| item(o)).collect::<Vec<_>>(),
            )
        };
        for (id, own) in [answer("r1", &["q1", "a1"]), answer("r2", &["q2", "a2"])] {
            let k = read_for(&s, &c.id, &id, &own).await;
            s.save(k).await.expect("saved");
            check.push((id, held(&s, &c.id)));
        }
        assert_eq!(parent_of(&s, "r1"), None, "the first stores it all");
        assert_eq!(parent_of(&s, "r2").as_deref(), Some("r1"));
        // Items added through the API: the next answer still continues r2.
        s.add_items("a", &c.id, &[item("api")]).expect("added");
        let (id, own) = answer("r3", &["q3", "a3"]);
        let k = read_for(&s, &c.id, &id, &own).await;
        s.save(k).await.expect("saved");
        assert_eq!(parent_of(&s, "r3").as_deref(), Some("r2"));
        check.push((id, held(&s, &c.id)));
        // Two answers read the conversation as it stands; the second to commit no longer
        // ends it, so the next continues the first.
        let (ra, own_a) = answer("r4", &["q4", "a4"]);
        let (rb, own_b) = answer("r5", &["q5", "a5"]);
        let ka = read_for(&s, &c.id, &ra, &own_a).await;
        let kb = read_for(&s, &c.id, &rb, &own_b).await;
        s.save(ka).await.expect("saved");
        s.save(kb).await.expect("saved");
        let (id, own) = answer("r6", &["q6"]);
        let k = read_for(&s, &c.id, &id, &own).await;
        assert_eq!(
            k.stored
                .as_ref()
                .and_then(|s| s.parent.as_ref())
                .map(|p| p.id.as_str()),
            Some("r4")
        );
        s.save(k).await.expect("saved");
        // An item deleted: the next answer stores the conversation whole.
        assert!(s.delete_item("a", &c.id, "m1").expect("deleted").is_some());
        let (id, own) = answer("r7", &["q7"]);
        let k = read_for(&s, &c.id, &id, &own).await;
        assert_eq!(k.stored.as_ref().and_then(|s| s.parent.as_ref()), None);
        s.save(k).await.expect("saved");
        let answered = |id: &str| ids(&s.conversation("a", id).expect("read").expect("there"));
        for (id, want) in &check {
            assert_eq!(&answered(id), want, "{id}");
        }
        let (r4, r5) = (answered("r4"), answered("r5"));
        assert_eq!(r4[r4.len() - 2..], ["q4", "a4"]);
        assert_eq!(r5[r5.len() - 2..], ["q5", "a5"]);
        assert!(
            !r5.contains(&"q4".to_string()),
            "r5 read before r4's items: {r5:?}"
        );
        let r6 = answered("r6");
        assert_eq!(
            r6[r6.len() - 5..],
            ["q4", "a4", "q5", "a5", "q6"],
            "r4, r5, then its own"
        );
        let r7 = answered("r7");
        assert!(!r7.contains(&"m1".to_string()) && r7.last().map(String::as_str) == Some("q7"));
    }

    /// Forty answers in one conversation store each item once (with the conversation's
    /// own copy: twice), not forty times.
    #[tokio::test]
    async fn a_long_conversation_stores_its_answers_items_once() {
        let s = store("conv-linear", Duration::from_secs(60));
        let c = s
            .create_conversation("a", Map::new(), &[])
            .expect("created");
        let text = "x".repeat(200);
        for i in 0..40 {
            let own = [
                json!({"id": format!("q{i}"), "role": "user", "content": text}),
                json!({"id": format!("a{i}"), "role": "assistant", "content": text}),
            ];
            let k = read_for(&s, &c.id, &format!("r{i}"), &own).await;
            s.save(k).await.expect("saved");
        }
        let items = s
            .conversation_items("a", &c.id)
            .expect("read")
            .expect("there");
        assert_eq!(items.len(), 80);
        let once = Value::Array(items.clone()).to_string().len() as u64;
        let bytes = s.stored_bytes("a").expect("counted");
        assert!(bytes < 2 * once + 40 * 60, "{bytes} for {once} of items");
        let last = s.conversation("a", "r39").expect("read").expect("there");
        assert_eq!(last, items);
    }
}
