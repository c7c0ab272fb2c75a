//! One limiter check: a tenant's token and request buckets taken (and refunded, so the
//! bucket never runs dry) on the lock-free GCRA. Uncontended, then 1/2/4/8 threads each on
//! its own tenant (scaling) and all on one tenant (contention on one atomic).
//!
//! `cargo bench -p gateway --bench limiter`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gateway::config::Config;
use gateway::limits::{now_ns, take_local, Limiter, TenantLimits};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn tenants(n: usize) -> (Limiter, Vec<TenantLimits>) {
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "[[tenants]]\nid = \"t{i}\"\nkeys_sha256 = [\"{:064x}\"]\ntokens_per_second = 1e12\nrequests_per_minute = 4000000000\n",
            i + 1
        ));
    }
    let cfg = Config::from_toml(&text).expect("bench config");
    let limiter = Limiter::local();
    let t = cfg.tenants.iter().map(|t| limiter.tenant(t)).collect();
    (limiter, t)
}

fn check(t: &TenantLimits) {
    let (c, scope) = (&t.default.0, &t.default.1);
    let now = now_ns();
    black_box(take_local(scope, c, black_box(700.0), now)).ok();
}

fn run_threads(tenants: &[Arc<TenantLimits>], threads: usize, iters: u64) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for k in 0..threads {
            let t = tenants[k % tenants.len()].clone();
            s.spawn(move || {
                for _ in 0..iters {
                    check(&t);
                }
            });
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let (_l, one) = tenants(1);
    let mut g = c.benchmark_group("limiter_check");
    g.throughput(Throughput::Elements(1));
    g.bench_function("uncontended", |b| b.iter(|| check(&one[0])));
    g.finish();

    let (_l, many) = tenants(8);
    let many: Vec<Arc<TenantLimits>> = many.into_iter().map(Arc::new).collect();
    let shared = vec![many[0].clone()];
    let mut g = c.benchmark_group("limiter_threads");
    for threads in [1usize, 2, 4, 8] {
        g.throughput(Throughput::Elements(threads as u64));
        g.bench_with_input(
            BenchmarkId::new("own_tenant", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| run_threads(&many, n, iters)),
        );
        g.bench_with_input(
            BenchmarkId::new("one_tenant", threads),
            &threads,
            |b, &n| b.iter_custom(|iters| run_threads(&shared, n, iters)),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
