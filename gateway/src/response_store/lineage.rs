//! Chains of stored answers: an answer that continues another (`previous_response_id`,
//! or the last answer stored in its conversation) stores only its own items and a link to it (`parent`, and `inherits`: how many of the
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

use super::{now_ms, StoreError, Stored};
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
    super::add_columns(
        conn,
        "responses",
        &[
            ("parent", "TEXT"),
            ("inherits", "INTEGER NOT NULL DEFAULT 0"),
            ("hidden", "INTEGER NOT NULL DEFAULT 0"),
        ],
    )?;
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

/// Walks the input items of `tenant`'s answer `id` (unexpired, not deleted) newest
/// first: its conversation without its own output (its `response`'s `output` items, the
/// last of its own), each item with its place in the conversation, given to `take` until
/// it answers false. Reads only the answers it walks into: a page of the newest items
/// costs the page, not the chain. Whether there is such an answer.
pub(super) fn inputs_newest_first(
    conn: &Connection,
    tenant: &str,
    id: &str,
    mut take: impl FnMut(usize, Value) -> bool,
) -> Result<bool, StoreError> {
    let mut first = conn.prepare_cached(
        "SELECT parent, inherits, conversation,
                COALESCE(json_array_length(response, '$.output'), 0)
         FROM responses WHERE id = ?1 AND tenant = ?2 AND expires_ms > ?3 AND hidden = 0",
    )?;
    let mut up = conn.prepare_cached(
        "SELECT parent, inherits, conversation, 0 FROM responses WHERE id = ?1 AND tenant = ?2",
    )?;
    type Row = (Option<String>, i64, String, i64);
    let row = |r: &rusqlite::Row<'_>| -> rusqlite::Result<Row> {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    };
    let Some(mut at) = first
        .query_row(params![id, tenant, now_ms()], row)
        .optional()?
    else {
        return Ok(false);
    };
    let skip = at.3.max(0) as usize;
    // The end (exclusive) of what is seen of the answer walked into, in its
    // conversation's places: all of the first but `skip`, then what its child took.
    let mut end: Option<usize> = None;
    for _ in 0..MAX_DEPTH {
        let (parent, inherits, own, _) = at;
        let inherits = inherits.max(0) as usize;
        let own: Vec<Value> = serde_json::from_str(&own)?;
        let end_here = match end {
            None => (inherits + own.len()).saturating_sub(skip),
            Some(e) => e.min(inherits + own.len()),
        };
        let seen = end_here.saturating_sub(inherits);
        for (k, item) in own.into_iter().take(seen).enumerate().rev() {
            if !take(inherits + k, item) {
                return Ok(true);
            }
        }
        end = Some(end_here.min(inherits));
        let Some(parent) = parent else {
            return Ok(true);
        };
        at = up
            .query_row(params![parent, tenant], row)
            .optional()?
            .ok_or_else(|| StoreError::Broken(format!("an answer that {id} continues is gone")))?;
    }
    Err(StoreError::Broken(format!(
        "the chain of answers through {id} loops"
    )))
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

#[cfg(test)]
mod tests {
    use super::super::tests::{fresh_path, store};
    use super::super::{Kept, ResponseStore};
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn msg(id: &str, text: &str) -> Value {
        json!({"id": id, "type": "message", "role": "user", "content": text})
    }

    /// `id`'s answer continuing `parent` (whose conversation is `before`), adding `own`.
    fn child(id: &str, parent: Option<&str>, before: &[Value], own: &[Value]) -> Stored {
        Stored {
            id: id.into(),
            tenant: "a".into(),
            response: json!({"id": id, "output": []}).to_string(),
            conversation: Value::Array(own.to_vec()).to_string(),
            parent: parent.map(|p| Parent {
                id: p.into(),
                inherits: before.len(),
                prefix: Arc::new(before.to_vec()),
            }),
        }
    }

    /// A chain `resp_0` … `resp_{n-1}`, each adding two items to the last; the
    /// conversation of the last.
    async fn chain(s: &ResponseStore, n: usize, text: &str) -> Vec<Value> {
        let mut whole: Vec<Value> = Vec::new();
        for i in 0..n {
            let own = [
                msg(&format!("msg_{i}_in"), text),
                msg(&format!("msg_{i}_out"), text),
            ];
            let parent = (i > 0).then(|| format!("resp_{}", i - 1));
            s.save(child(&format!("resp_{i}"), parent.as_deref(), &whole, &own))
                .await
                .expect("saved");
            whole.extend(own);
        }
        whole
    }

    fn ids(items: &[Value]) -> Vec<&str> {
        items.iter().filter_map(|i| i["id"].as_str()).collect()
    }

    fn set(s: &ResponseStore, sql: &str) {
        s.conn()
            .expect("a connection")
            .execute_batch(sql)
            .expect("ran");
    }

    #[tokio::test]
    async fn a_chain_stores_each_item_once_and_reads_whole() {
        let s = store("chain", Duration::from_secs(60));
        let text = "x".repeat(100);
        let whole = chain(&s, 60, &text).await;
        for (i, at) in [(0, 2), (30, 62), (59, 120)] {
            let read = s.conversation("a", &format!("resp_{i}")).expect("read");
            assert_eq!(read.as_deref(), Some(&whole[..at]), "resp_{i}");
        }
        // Each answer's own items and its response: linear in the chain, where whole
        // copies would be 30 times as much.
        let item_bytes = serde_json::to_string(&whole).expect("json").len() as u64;
        let bytes = s.stored_bytes("a").expect("counted");
        assert!(bytes < item_bytes + 60 * 40, "{bytes} for {item_bytes}");
        assert_eq!(
            s.input_items("a", "resp_59")
                .expect("read")
                .expect("there")
                .len(),
            120
        );
    }

    #[tokio::test]
    async fn a_deleted_answer_is_kept_hidden_while_an_answer_continues_it() {
        let s = store("hidden", Duration::from_secs(60));
        let whole = chain(&s, 3, "hi").await;
        assert!(s.delete("a", "resp_1").expect("deleted"));
        assert_eq!(s.response("a", "resp_1").expect("read"), None);
        assert_eq!(s.conversation("a", "resp_1").expect("read"), None);
        assert!(!s.delete("a", "resp_1").expect("read"), "deleted once");
        assert_eq!(
            s.conversation("a", "resp_2").expect("read"),
            Some(whole.clone())
        );
        // Its items are found while the answer that took them lives.
        let found = s.items("a", &["msg_1_out".into()]).expect("read");
        assert_eq!(found["msg_1_out"], whole[3]);
        let sum = s.summary().expect("summed");
        assert_eq!(sum[0].answers, 2, "the hidden one is not an answer");
        // The last answer that needed it goes: it goes too, its parent stays.
        assert!(s.delete("a", "resp_2").expect("deleted"));
        let left: i64 = s
            .conn()
            .expect("a connection")
            .query_row("SELECT COUNT(*) FROM responses", [], |r| r.get(0))
            .expect("counted");
        assert_eq!(left, 1);
        assert!(s
            .items("a", &["msg_1_out".into()])
            .expect("read")
            .is_empty());
        assert_eq!(
            s.conversation("a", "resp_0").expect("read"),
            Some(whole[..2].to_vec())
        );
    }

    #[tokio::test]
    async fn an_expired_answer_stays_while_an_answer_that_continues_it_lives() {
        let s = store("expired", Duration::from_secs(60));
        let whole = chain(&s, 3, "hi").await;
        set(
            &s,
            "UPDATE responses SET expires_ms = 0 WHERE id IN ('resp_0', 'resp_1')",
        );
        assert_eq!(s.purge().expect("purged"), 0, "resp_2 needs both");
        assert_eq!(s.response("a", "resp_0").expect("read"), None, "expired");
        assert_eq!(s.conversation("a", "resp_2").expect("read"), Some(whole));
        let found = s.items("a", &["msg_0_in".into()]).expect("read");
        assert_eq!(found.len(), 1, "found through resp_2");
        set(
            &s,
            "UPDATE responses SET expires_ms = 0 WHERE id = 'resp_2'",
        );
        assert!(s.items("a", &["msg_0_in".into()]).expect("read").is_empty());
        assert_eq!(s.purge().expect("purged"), 3);
        assert_eq!(s.stored_bytes("a").expect("counted"), 0);
    }

    #[tokio::test]
    async fn a_parent_stored_again_is_read_as_its_child_took_it() {
        let s = store("again", Duration::from_secs(60));
        // A background response, continued while it ran (its input only), then finished.
        let input = [msg("msg_in", "question")];
        s.save(child("resp_0", None, &[], &input))
            .await
            .expect("saved");
        let more = [msg("msg_more", "and?")];
        s.save(child("resp_1", Some("resp_0"), &input, &more))
            .await
            .expect("saved");
        let answered = [input[0].clone(), msg("msg_out", "answer")];
        s.save(child("resp_0", None, &[], &answered))
            .await
            .expect("saved");
        let read = s.conversation("a", "resp_1").expect("read").expect("there");
        assert_eq!(ids(&read), ["msg_in", "msg_more"]);
        // The output it did not take is found only through resp_0 itself.
        set(&s, "UPDATE responses SET hidden = 1 WHERE id = 'resp_0'");
        let found = s
            .items("a", &["msg_in".into(), "msg_out".into()])
            .expect("read");
        assert_eq!(found.keys().collect::<Vec<_>>(), ["msg_in"]);
    }

    #[tokio::test]
    async fn an_answer_whose_parent_is_gone_by_its_commit_is_stored_whole() {
        let s = store("orphan", Duration::from_secs(60));
        let whole = chain(&s, 1, "hi").await;
        assert!(s.delete("a", "resp_0").expect("deleted"));
        let own = [msg("msg_1_in", "still here")];
        s.save(child("resp_1", Some("resp_0"), &whole, &own))
            .await
            .expect("saved");
        let read = s.conversation("a", "resp_1").expect("read").expect("there");
        assert_eq!(ids(&read), ["msg_0_in", "msg_0_out", "msg_1_in"]);
        let parent: Option<String> = s
            .conn()
            .expect("a connection")
            .query_row(
                "SELECT parent FROM responses WHERE id = 'resp_1'",
                [],
                |r| r.get(0),
            )
            .expect("read");
        assert_eq!(parent, None);
    }

    #[tokio::test]
    async fn another_tenant_neither_reads_nor_continues_a_chain() {
        let s = store("tenants", Duration::from_secs(60));
        chain(&s, 2, "hi").await;
        assert_eq!(s.conversation("b", "resp_1").expect("read"), None);
        let mut theirs = child("resp_b", Some("resp_1"), &[], &[msg("msg_b", "mine")]);
        theirs.tenant = "b".into();
        s.save(theirs).await.expect("saved");
        let read = s.conversation("b", "resp_b").expect("read").expect("there");
        assert_eq!(ids(&read), ["msg_b"], "not linked to a's answer");
    }

    #[tokio::test]
    async fn a_store_from_before_the_links_reads_its_answers_and_links_new_ones() {
        let path = fresh_path("lineage-migrate");
        {
            let conn = Connection::open(&path).expect("opened");
            conn.execute_batch(
                "CREATE TABLE responses (id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
                     created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
                     response TEXT NOT NULL, conversation TEXT NOT NULL);
                 INSERT INTO responses VALUES ('resp_0', 'a', 0, 9999999999999, '{}',
                     '[{\"id\":\"msg_0\",\"content\":\"old\"}]');
                 CREATE TABLE conversations (id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
                     created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
                     metadata TEXT NOT NULL);
                 INSERT INTO conversations VALUES ('conv_0', 'a', 0, 9999999999999, '{}');",
            )
            .expect("an older store");
        }
        let s = ResponseStore::open(&path, Duration::from_secs(60)).expect("opened");
        let old = s.conversation("a", "resp_0").expect("read").expect("there");
        assert_eq!(ids(&old), ["msg_0"]);
        s.save(Kept::from(child(
            "resp_1",
            Some("resp_0"),
            &old,
            &[msg("msg_1", "new")],
        )))
        .await
        .expect("saved");
        let read = s.conversation("a", "resp_1").expect("read").expect("there");
        assert_eq!(ids(&read), ["msg_0", "msg_1"]);
        assert_eq!(s.items("a", &["msg_0".into()]).expect("read").len(), 1);
        // Its conversations are read as ones no answer is linked in yet.
        let c = s
            .in_conversation("a", "conv_0")
            .expect("read")
            .expect("there");
        assert_eq!((c.items.len(), c.answer), (0, None));
        assert!(s
            .add_items("a", "conv_0", &[msg("msg_2", "added")])
            .expect("added"));
        let c = s
            .in_conversation("a", "conv_0")
            .expect("read")
            .expect("there");
        assert_eq!((ids(&c.items), c.version), (vec!["msg_2"], 1));
    }
}

#[cfg(test)]
mod page_tests {
    use super::super::tests::store;
    use super::super::{ItemsPage, Paged, Stored};
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    /// Newest-first pages read from the end of a chain equal the pages of the whole list,
    /// for every answer of a branching chain (a parent stored again with more items after
    /// a child took fewer, outputs at the end, items without ids), every limit and every
    /// `after` cursor (and one that names nothing).
    #[tokio::test]
    async fn pages_read_from_the_end_of_a_chain_are_the_pages_of_the_whole_list() {
        let s = store("chain-pages", Duration::from_secs(60));
        let item = |id: &str| match id {
            "" => json!({"role": "user", "content": "no id"}),
            _ => json!({"id": id, "type": "message", "role": "user", "content": id}),
        };
        let mut whole: std::collections::HashMap<String, Vec<Value>> = Default::default();
        // (answer, parent, own inputs, outputs)
        type Answer<'a> = (&'a str, Option<&'a str>, &'a [&'a str], &'a [&'a str]);
        let answers: [Answer<'_>; 6] = [
            ("r0", None, &["a", "", "b"], &["o0"]),
            ("r1", Some("r0"), &["c"], &["o1", "o1b"]),
            ("r2", Some("r1"), &["d", "e"], &["o2"]),
            ("r3", Some("r1"), &["f"], &[]),
            ("r4", Some("r2"), &[], &["o4"]),
            ("r5", Some("r4"), &["g", "", "h", "i"], &["o5"]),
        ];
        for (id, parent, inputs, outputs) in answers {
            let before = parent.map(|p| whole[p].clone()).unwrap_or_default();
            let own: Vec<Value> = inputs.iter().chain(outputs).map(|i| item(i)).collect();
            let output: Vec<Value> = outputs.iter().map(|i| item(i)).collect();
            s.save(Stored {
                id: id.into(),
                tenant: "a".into(),
                response: json!({"id": id, "output": output}).to_string(),
                conversation: Value::Array(own.clone()).to_string(),
                parent: parent.map(|p| Parent {
                    id: p.into(),
                    inherits: before.len(),
                    prefix: Arc::new(before.clone()),
                }),
            })
            .await
            .expect("saved");
            whole.insert(id.into(), before.into_iter().chain(own).collect());
        }
        // r2 stored again with one more output, after r4 took its conversation.
        let r2_own: Vec<Value> = ["d", "e", "o2", "o2b"].iter().map(|i| item(i)).collect();
        let r1 = whole["r1"].clone();
        s.save(Stored {
            id: "r2".into(),
            tenant: "a".into(),
            response: json!({"id": "r2", "output": [item("o2"), item("o2b")]}).to_string(),
            conversation: Value::Array(r2_own).to_string(),
            parent: Some(Parent {
                id: "r1".into(),
                inherits: r1.len(),
                prefix: Arc::new(r1),
            }),
        })
        .await
        .expect("saved again");
        let r4 = s.input_items("a", "r4").expect("read").expect("there");
        assert!(
            r4.iter().all(|i| i["id"] != "o2b"),
            "r4 took r2 before: {r4:?}"
        );
        let r2 = s.input_items("a", "r2").expect("read").expect("there");
        assert_eq!(r2.last().map(|i| &i["id"]), Some(&json!("e")));
        let mut cases = 0;
        for (id, ..) in answers {
            let all = s.input_items("a", id).expect("read").expect("there");
            let mut cursors: Vec<Option<String>> = vec![None, Some("nothing".into())];
            cursors.extend(all.iter().map(|i| i["id"].as_str().map(str::to_string)));
            for limit in [1, 2, 3, 5, 100] {
                for after in &cursors {
                    let page = ItemsPage {
                        limit,
                        desc: true,
                        after: after.as_deref(),
                        before: None,
                    };
                    let read = s.input_items_page("a", id, page).expect("read");
                    assert_eq!(
                        read,
                        Some(Paged::of(all.clone(), page)),
                        "{id} {limit} {after:?}"
                    );
                    cases += 1;
                }
            }
        }
        assert!(cases > 200, "{cases}");
        // Ids given to items without: their place in the conversation.
        let r5 = s.input_items("a", "r5").expect("read").expect("there");
        assert_eq!(r5[1]["id"], "item_1");
        assert_eq!(r5[12]["id"], "item_12", "{r5:?}");
        let unknown = ItemsPage {
            limit: 5,
            desc: true,
            after: None,
            before: None,
        };
        assert_eq!(s.input_items_page("b", "r5", unknown).expect("read"), None);
    }
}
