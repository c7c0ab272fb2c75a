//! `logprobs`' per-token cost: one row of 49,152 logits (SmolLM2's vocabulary) to the
//! sampled token's log-probability and the top alternatives'.
//!
//! `cargo bench -p kernels --bench logprobs`

use criterion::{criterion_group, criterion_main, Criterion};
use kernels::logprobs::token_logprobs;

fn bench(c: &mut Criterion) {
    let logits = kernels::synth::logits(49152, -15.0, 15.0);
    for top in [0usize, 5, 20] {
        c.bench_function(&format!("logprobs of 49152 logits, top {top}"), |b| {
            b.iter(|| token_logprobs(&logits, 123, top).logprob)
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
