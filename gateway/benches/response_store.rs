//! Reading a long chain of stored answers: the whole conversation of the last of a chain
//! of 1,000 (what a request continuing it is prefixed with), alone and two at once (on
//! two threads: a time per pair; the same as alone where reads run side by side, twice
//! it where they wait for each other), and the newest page of its input items
//! (`limit=20`), from a store on disk.
//!
//! `cargo bench -p gateway --bench response_store`

use criterion::{criterion_group, criterion_main, Criterion};
use gateway::response_store::{ItemsPage, Parent, ResponseStore, Stored};
use serde_json::{json, Value};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TURNS: usize = 1000;

fn chain() -> Arc<ResponseStore> {
    let dir = std::env::temp_dir().join(format!("tollgate-bench-chain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a folder");
    let store = ResponseStore::open(&dir.join("r.db"), Duration::from_secs(3600)).expect("opened");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let mut whole: Vec<Value> = Vec::new();
    let text = "a message of about a hundred bytes, ".repeat(3);
    for i in 0..TURNS {
        let own = vec![
            json!({"id": format!("msg_{i}_in"), "type": "message", "role": "user", "status": "completed",
                   "content": [{"type": "input_text", "text": text}]}),
            json!({"id": format!("msg_{i}_out"), "type": "message", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}),
        ];
        let s = Stored {
            id: format!("resp_{i}"),
            tenant: "bench".into(),
            response: json!({"id": format!("resp_{i}"), "output": [own[1]]}).to_string(),
            conversation: Value::Array(own.clone()).to_string(),
            parent: (i > 0).then(|| Parent {
                id: format!("resp_{}", i - 1),
                inherits: whole.len(),
                prefix: Arc::new(Vec::new()),
            }),
        };
        rt.block_on(store.save(s)).expect("saved");
        whole.extend(own);
    }
    store
}

fn reads(c: &mut Criterion) {
    let store = chain();
    let last = format!("resp_{}", TURNS - 1);
    let mut g = c.benchmark_group("chain_of_1000");
    g.bench_function("conversation", |b| {
        b.iter(|| {
            let items = store
                .conversation("bench", &last)
                .expect("read")
                .expect("there");
            assert_eq!(items.len(), 2 * TURNS);
            black_box(items)
        })
    });
    g.bench_function("conversation_two_at_once", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..iters {
                            black_box(store.conversation("bench", &last).expect("read"));
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    let page = ItemsPage {
        limit: 20,
        desc: true,
        after: None,
        before: None,
    };
    g.bench_function("newest_input_items_page", |b| {
        b.iter(|| black_box(store.input_items_page("bench", &last, page).expect("read")))
    });
    g.finish();
}

criterion_group!(benches, reads);
criterion_main!(benches);
