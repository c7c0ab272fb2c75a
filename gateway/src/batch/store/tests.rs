//! The store's rows per tenant, pages, results and endings, on a scratch database.

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
        reasoning_tokens: 1,
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
    assert_eq!(b.reasoning_tokens, 3);
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

/// A database an earlier tollgate made (its `batches` table without the columns added
/// since) is brought up to date when opened: its rows read, with the new counts at 0, and
/// count on.
#[test]
fn a_database_from_before_the_reasoning_count_is_upgraded_in_place() {
    let dir = Dir(std::env::temp_dir().join(new_id("tollgate-batches-")));
    std::fs::create_dir_all(&dir.0).expect("dir");
    let path = dir.0.join("old.db");
    {
        let old = SCHEMA.replace(
            ",\n    -- Of output_tokens, a reasoning model's thinking.\n    reasoning_tokens INTEGER NOT NULL DEFAULT 0",
            "",
        );
        assert_ne!(old, SCHEMA, "the old schema lacks the column");
        let conn = rusqlite::Connection::open(&path).expect("open");
        conn.execute_batch(&old).expect("the old schema");
        conn.execute_batch(
            "INSERT INTO batches (id, tenant, created_at, purge_at, endpoint, input_file_id,
             completion_window, status, expires_at, total, output_tokens)
             VALUES ('batch_old', 'a', 1, 9999999999, '/v1/chat/completions', 'file-x', '24h',
             'in_progress', 9999999999, 2, 5)",
        )
        .expect("an old row");
    }
    let s = BatchStore::open(&path, Duration::from_secs(3600)).expect("opens and upgrades");
    let b = s.batch("a", "batch_old").expect("read").expect("there");
    assert_eq!((b.output_tokens, b.reasoning_tokens), (5, 0));
    let r = LineResult {
        line: 0,
        ok: true,
        output: "{}".into(),
        output_tokens: 4,
        reasoning_tokens: 3,
        ..LineResult::default()
    };
    s.record("batch_old", &r).expect("record");
    let b = s.batch("a", "batch_old").expect("read").expect("there");
    assert_eq!((b.output_tokens, b.reasoning_tokens), (9, 3));
    drop(s);
    // Opened again: nothing more to do.
    BatchStore::open(&path, Duration::from_secs(3600)).expect("opens again");
}
