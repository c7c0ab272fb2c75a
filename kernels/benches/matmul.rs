//! Quantized matmul on the CPU at SmolLM2's shapes: f32 activations (default) versus Q8
//! activations, batch 1 to 64; and Q6_K weights (16-bit activations) packed with their
//! own scale per 16 against the same weights requantized to Q8_0 (one scale per 32); and
//! the output head's product, too large for the cache.
//!
//!     cargo bench -p kernels --bench matmul

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kernels::gguf::GgmlType;
use kernels::kquant;
use kernels::matmul::{matmul, ActPrecision, MatData, Matrix};

#[path = "common/ffn.rs"]
mod ffn;

fn bench(c: &mut Criterion) {
    let w = ffn::weights();
    let mut g = c.benchmark_group("matmul_q4_1_1536x576");
    for b in [1usize, 4, 8, 16, 64, 512] {
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

    // The FFN's weights as Q6_K: requantized to Q8_0 (what a CPU without packed kernels
    // reads) and with their own scale per 16.
    let mut row = vec![0f32; ffn::COLS];
    let x: Vec<f32> = (0..ffn::ROWS)
        .flat_map(|n| {
            w.row_f32(n, &mut row);
            row.clone()
        })
        .collect();
    let mut q6 = Vec::new();
    kquant::quantize_row(GgmlType::Q6_K, &x, &mut q6);
    let q8 = |q6: &[u8]| {
        let c = kquant::to_kernel_layout(GgmlType::Q6_K, q6);
        Matrix::new(ffn::ROWS, ffn::COLS, MatData::Quant(c.ty, c.data))
    };
    let converted = kquant::to_kernel_layout(GgmlType::Q6_K, &q6);
    let Some(pk) = kquant::exact_packed(GgmlType::Q6_K, ffn::ROWS, ffn::COLS, &q6, &converted)
    else {
        eprintln!("no packed kernels here: no Q6_K comparison");
        return;
    };
    let per_16 = q8(&q6).with_exact_packed(pk);
    let mut g = c.benchmark_group("matmul_q6_k_1536x576");
    for b in [1usize, 16, 64, 512] {
        let mut x = ffn::acts(b);
        let mut out = vec![0f32; b * ffn::ROWS];
        g.throughput(Throughput::Elements((b * ffn::ROWS * ffn::COLS) as u64));
        for (name, m) in [("q8_0_requantized", &q8(&q6)), ("scale_per_16", &per_16)] {
            m.prepare(ActPrecision::I16);
            g.bench_with_input(BenchmarkId::new(name, b), &b, |bn, _| {
                bn.iter(|| {
                    x.touched();
                    matmul(m, &mut x, &mut out, ActPrecision::I16)
                })
            });
        }
    }
    g.finish();

    // SmolLM2's output head (the tied embedding, 49,152 × 576 at Q8_0: 30 MB packed), the
    // one product of a step whose weights do not stay in the cache between calls.
    let (rows, cols) = (49_152, ffn::COLS);
    let mut data = Vec::new();
    kernels::quant::quantize_row_q8_0(&ffn::values(rows * cols, 7), &mut data);
    let head = Matrix::new(rows, cols, MatData::Quant(GgmlType::Q8_0, data));
    head.prepare(ActPrecision::I16);
    let mut g = c.benchmark_group("matmul_head_q8_0_49152x576");
    for b in [1usize, 16, 64] {
        let mut x = ffn::acts(b);
        let mut out = vec![0f32; b * rows];
        g.throughput(Throughput::Elements((b * rows * cols) as u64));
        g.bench_with_input(BenchmarkId::new("i16", b), &b, |bn, _| {
            bn.iter(|| {
                x.touched();
                matmul(&head, &mut x, &mut out, ActPrecision::I16)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
