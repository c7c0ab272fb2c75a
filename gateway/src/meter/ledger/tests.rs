//! The ledger's tests: records from many threads through rotating shards land exactly once;
//! dead and live processes' segments at start; `full` durability; schema migration.

use super::copier::commit;
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
