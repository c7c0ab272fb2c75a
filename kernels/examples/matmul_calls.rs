//! A fixed number of CPU products at SmolLM2's FFN shape (1536 × 576, Q4_1), the same
//! weights and activations as `benches/matmul.rs`, for counting what one product costs
//! where timing it means nothing (under an emulator: `bench/aarch64_instructions.sh`):
//!
//!     cargo run --release -p kernels --example matmul_calls -- ROWS i16|q8|f32 CALLS
//!
//! Prints the kernel in use and a checksum of the last output (so that runs on different
//! paths can be seen to agree).

use kernels::gguf::GgmlType;
use kernels::matmul::{matmul, ActPrecision, Acts, MatData, Matrix};
use kernels::quant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: matmul_calls ROWS i16|q8|f32 CALLS";
    let rows: usize = args.get(1).ok_or(usage)?.parse()?;
    let prec = match args.get(2).map(String::as_str) {
        Some("i16") => ActPrecision::I16,
        Some("q8") => ActPrecision::Q8,
        Some("f32") => ActPrecision::F32,
        _ => return Err(usage.into()),
    };
    let calls: usize = args.get(3).ok_or(usage)?.parse()?;
    let (n, k) = (1536, 576);
    let mut s = 1u64;
    let w: Vec<f32> = (0..n * k)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let mut data = Vec::new();
    quant::quantize_row_q4_1(&w, &mut data);
    let m = Matrix::new(n, k, MatData::Quant(GgmlType::Q4_1, data));
    m.prepare(prec);
    let mut x = Acts::default();
    x.resize(rows, k);
    x.f32
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = (i % 7) as f32 * 0.1);
    let mut out = vec![0f32; rows * n];
    for _ in 0..calls {
        x.touched();
        matmul(&m, &mut x, &mut out, prec);
    }
    let sum: f64 = out.iter().map(|&v| v as f64).sum();
    println!(
        "kernel {:?} ({}), {rows} rows, {calls} calls, checksum {sum:.6}",
        kernels::packed::kernel(),
        kernels::quant::simd_path()
    );
    Ok(())
}
