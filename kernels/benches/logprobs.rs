//! `logprobs`' per-token cost: one row of 49,152 logits (SmolLM2's vocabulary) to the
//! sampled token's log-probability and the top alternatives'.
//!
//! `cargo bench -p kernels --bench logprobs`

use criterion::{criterion_group, criterion_main, Criterion};
use kernels::logprobs::token_logprobs;

fn bench(c: &mut Criterion) {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let logits: Vec<f32> = (0..49152)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 30.0 - 15.0
        })
        .collect();
    for top in [0usize, 5, 20] {
        c.bench_function(&format!("logprobs of 49152 logits, top {top}"), |b| {
            b.iter(|| token_logprobs(&logits, 123, top).logprob)
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
