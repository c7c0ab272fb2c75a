//! Quantized matmul on the CPU at SmolLM2's shapes: f32 activations (default) versus Q8
//! activations, batch 1 to 64.
//!
//!     cargo bench -p kernels --bench matmul

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kernels::matmul::{matmul, ActPrecision};

#[path = "common/ffn.rs"]
mod ffn;

fn bench(c: &mut Criterion) {
    let w = ffn::weights();
    let mut g = c.benchmark_group("matmul_q4_1_1536x576");
    for b in [1usize, 16, 64] {
        let mut x = ffn::acts(b);
        let mut out = vec![0f32; b * ffn::ROWS];
        g.throughput(Throughput::Elements((b * ffn::ROWS * ffn::COLS) as u64));
        for (name, p) in [
            ("i16", ActPrecision::I16),
            ("f32", ActPrecision::F32),
            ("q8", ActPrecision::Q8),
        ] {
            g.bench_with_input(BenchmarkId::new(name, b), &b, |bn, _| {
                bn.iter(|| {
                    x.touched();
                    matmul(&w, &mut x, &mut out, p)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
