//! Drawing a token on the host from one row of 49,152 logits (SmolLM2's vocabulary) with
//! the `sample` kernel's twin: what the engine pays per row it reads back from the device
//! (a row that also wants log-probabilities) and draws itself.
//!
//! `cargo bench -p kernels --bench sample_row`

use criterion::{criterion_group, criterion_main, Criterion};
use kernels::cuda::twins::{sample, SampleParams};

fn bench(c: &mut Criterion) {
    let logits = kernels::synth::logits(49152, -15.0, 15.0);
    let settings = [
        ("greedy", 0.0, 0, 1.0),
        ("temperature 0.8", 0.8, 0, 1.0),
        ("top-p 0.9", 0.8, 0, 0.9),
        ("top-k 50, top-p 0.9", 0.8, 50, 0.9),
    ];
    for (label, temperature, top_k, top_p) in settings {
        let p = SampleParams {
            min_p: 0.0,
            temperature,
            top_k,
            top_p,
            seed: 7,
            step: 3,
        };
        c.bench_function(&format!("sample a row of 49152 logits, {label}"), |b| {
            b.iter(|| sample(&logits, p))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
