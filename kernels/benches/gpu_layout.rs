//! The load-time cost of laying a K-quant matrix out for the GPU's `gemv` kernels
//! (`QuantRows::from_packed`): its scales factored as the file holds them (an f16 a
//! super-block times a byte a block, found and checked exactly for each row's
//! super-block), against the same tiles under f32 scale pairs. One 4,096 × 4,096 matrix
//! (Llama-3-8B's `attn_output`) in Q4_K and in Q6_K, from the CPU's packed form.
//!
//! `cargo bench -p kernels --bench gpu_layout`

use criterion::{criterion_group, criterion_main, Criterion};
use kernels::cuda::gemv::{QuantRows, Scales};
use kernels::gguf::GgmlType;

fn bench(c: &mut Criterion) {
    if !kernels::packed::available() {
        eprintln!("SKIPPED: this CPU has no packed kernels to make the K-quant layouts");
        return;
    }
    let n: usize = 4096;
    let x: Vec<f32> = (0..(n * n) as u64)
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let mut g = c.benchmark_group("gemv layout of 4096×4096");
    g.sample_size(10);
    for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
        let mut blocks = Vec::new();
        kernels::kquant::quantize_row(ty, &x, &mut blocks);
        let m = kernels::model::matrix_of(ty, n, n, &blocks);
        let p = m.packed_values().expect("exact packed values");
        for (what, scales) in [
            ("factored", Scales::Factored),
            ("f32 pairs", Scales::F32Pairs),
        ] {
            g.bench_function(format!("{ty:?}, {what}"), |b| {
                b.iter(|| {
                    QuantRows::from_packed_as(p, scales)
                        .expect("a layout")
                        .bytes()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
