//! Cost of one routing decision (pick + release) by pool size: flat from 10 to 10,000
//! workers, because power-of-two-choices looks at two workers, not the pool.
//!
//!     cargo bench -p gateway --bench route_pick

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use gateway::config::{PoolConfig, SimConfig, WorkerConfig};
use gateway::route::Pool;

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
}

criterion_group!(benches, bench);
criterion_main!(benches);
