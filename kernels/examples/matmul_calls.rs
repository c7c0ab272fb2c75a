//! A fixed number of CPU products at SmolLM2's FFN shape (1536 × 576, Q4_1), the same
//! weights and activations as `benches/matmul.rs`, for counting what one product costs
//! where timing it means nothing (under an emulator: `bench/aarch64_instructions.sh`):
//!
//!     cargo run --release -p kernels --example matmul_calls -- ROWS i16|q8|f32 CALLS
//!
//! Prints the kernel in use and a checksum of the last output (so that runs on different
//! paths can be seen to agree).

use kernels::matmul::{matmul, ActPrecision};

#[path = "../benches/common/ffn.rs"]
mod ffn;

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
    let m = ffn::weights();
    m.prepare(prec);
    let mut x = ffn::acts(rows);
    let mut out = vec![0f32; rows * ffn::ROWS];
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
