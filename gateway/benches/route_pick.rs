//! Cost of one routing decision (pick + release) by pool size: flat from 10 to 10,000
//! workers, because power-of-two-choices looks at two workers, not the pool.
//!
//!     cargo bench -p gateway --bench route_pick

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use gateway::config::{PoolConfig, SimConfig, WorkerConfig};
use gateway::route::{affinity_key, Pool};
use gateway::worker::{ChatMessage, Prompt};

fn pool(n: usize) -> Pool {
    Pool::from_config(
        &PoolConfig {
            name: "bench".into(),
            model: "m".into(),
            workers: vec![WorkerConfig::Sim(SimConfig {
                count: n,
                ..SimConfig::default()
            })],
            health_interval_secs: 5.0,
            breaker_failures: 3,
            breaker_cooldown_secs: 5.0,
            affinity: None,
        },
        None,
    )
    .expect("pool")
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("route_pick");
    for n in [10usize, 1_000, 10_000] {
        let p = pool(n);
        // Some standing load so comparisons are real.
        let _held: Vec<_> = (0..n).map(|_| p.pick(100, &[]).expect("pick")).collect();
        g.bench_with_input(BenchmarkId::from_parameter(n), &p, |b, p| {
            b.iter(|| drop(black_box(p.pick(black_box(300), &[]).expect("pick"))))
        });
    }
    g.finish();
    // Prefix affinity: the key of a chat prompt (its first 1 KB), then a pick with it.
    let mut g = c.benchmark_group("route_pick_affinity");
    let prompt = Prompt::Chat(
        vec![ChatMessage {
            role: "user".into(),
            content: "a system prompt shared by many requests. ".repeat(40),
            open: false,
        }],
        None,
    );
    g.bench_function("key of a 1 KB prompt start", |b| {
        b.iter(|| black_box(affinity_key(black_box("tenant"), black_box(&prompt), None)))
    });
    let ids: Vec<u32> = (0..600).collect();
    g.bench_function("key of 256 token ids", |b| {
        b.iter(|| {
            black_box(affinity_key(
                black_box("tenant"),
                &prompt,
                Some(black_box(&ids)),
            ))
        })
    });
    let p = pool(1_000);
    let _held: Vec<_> = (0..1_000)
        .map(|_| p.pick(100, &[]).expect("pick"))
        .collect();
    g.bench_function("pick with a key, 1,000 workers", |b| {
        b.iter(|| {
            drop(black_box(
                p.pick_for(black_box(300), &[], Some(black_box(77)))
                    .expect("pick"),
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
