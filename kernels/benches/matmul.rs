//! Quantized matmul on the CPU at SmolLM2's shapes: f32 activations (default) versus Q8
//! activations, batch 1 to 64.
//!
//!     cargo bench -p kernels --bench matmul

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kernels::gguf::GgmlType;
use kernels::matmul::{matmul, ActPrecision, Acts, MatData, Matrix};
use kernels::quant;

fn weights(rows: usize, cols: usize) -> Matrix {
    let mut data = Vec::new();
    let mut s = 1u64;
    let x: Vec<f32> = (0..rows * cols)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    quant::quantize_row_q4_1(&x, &mut data);
    Matrix::new(rows, cols, MatData::Quant(GgmlType::Q4_1, data))
}

fn bench(c: &mut Criterion) {
    let w = weights(1536, 576);
    let mut g = c.benchmark_group("matmul_q4_1_1536x576");
    for b in [1usize, 16, 64] {
        let mut x = Acts::default();
        x.resize(b, 576);
        x.f32
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = (i % 7) as f32 * 0.1);
        let mut out = vec![0f32; b * 1536];
        g.throughput(Throughput::Elements((b * 1536 * 576) as u64));
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
