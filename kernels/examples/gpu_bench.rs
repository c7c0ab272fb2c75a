//! Memory-bound kernel bandwidth on a GPU (add_rmsnorm, rope_kv_write, build_batch,
//! swiglu), against the card's measured device-to-device copy bandwidth; paged decode
//! attention at batch 1, 16, 64, 256; the sampling kernel; the step's cuBLAS products at
//! decode batch sizes against reading their weights once. Prints one table. The launches are
//! `kernels::cuda::bench`'s (a test runs them on the CPU emulator at small sizes).
//!
//! `cargo build --release -p kernels --example gpu_bench` here; run by
//! `kernels/gpu-check.sh` on a GPU machine.

use kernels::cuda::bench::{self, Sizes};
use kernels::cuda::device::Gpu;

const ITERS: u32 = 50;

fn main() {
    // Kernels as the backend loads them for SmolLM2 (attention fitted to its heads).
    let smol = kernels::model::LlamaConfig::smollm2_135m();
    let g = match Gpu::open_for(0, &smol) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    println!("GPU: {}", g.describe());
    let (secs, copy) = match g.copy_bandwidth() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("FAILED: the copy bandwidth: {e}");
            std::process::exit(1);
        }
    };
    println!("| kernel                             |   time      |  achieved    | of copy |");
    println!("|---|---:|---:|---:|");
    println!(
        "| device-to-device copy (1 GiB)      | {:>9.1} µs | {copy:>8.0} GB/s |   100 % |",
        secs * 1e6
    );
    match bench::run(&g, &Sizes::full(), ITERS) {
        Ok(rows) => {
            for r in &rows {
                let gbs = r.bytes / r.secs / 1e9;
                println!(
                    "| {:<34} | {:>9.1} µs | {gbs:>8.0} GB/s | {:>5.0} % |",
                    r.name,
                    r.secs * 1e6,
                    100.0 * gbs / copy
                );
            }
            // What a decode step's kernels add up to, each launched alone: against the
            // step's own time (decode_bench, below), the rest is launch gaps.
            println!();
            println!("| decode batch (ctx 512) | its kernels, launched alone | products | attention | other kernels |");
            println!("|---:|---:|---:|---:|---:|");
            for s in bench::step_sums(&rows) {
                println!(
                    "| {} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs |",
                    s.batch,
                    s.total() * 1e6,
                    s.products * 1e6,
                    s.attention * 1e6,
                    s.other * 1e6
                );
            }
        }
        Err(e) => {
            eprintln!("FAILED: {e}");
            std::process::exit(1);
        }
    }
    // The attention chunk size (CHUNK_KEYS, 512 in the step's build) against 256 and 1,024,
    // for long rows at small batch, each split as the step would split it.
    println!();
    println!("| attention, 4,096 keys, chunk size | time | achieved | of copy |");
    println!("|---|---:|---:|---:|");
    for chunk in [256usize, 512, 1024] {
        let built = Gpu::open_for_with(0, &smol, &[("CHUNK_KEYS", chunk)]);
        for batch in [1usize, 16] {
            let row = built.as_ref().map_err(|e| e.to_string()).and_then(|b| {
                let z = bench::attention_split(b, batch, 4096, chunk).map_err(|e| e.to_string())?;
                bench::attention(b, batch, 4096, chunk, z, ITERS).map_err(|e| e.to_string())
            });
            match row {
                Ok(r) => {
                    let gbs = r.bytes / r.secs / 1e9;
                    println!(
                        "| {chunk} keys: {} | {:.1} µs | {gbs:.0} GB/s | {:.0} % |",
                        r.name,
                        r.secs * 1e6,
                        100.0 * gbs / copy
                    );
                }
                Err(e) => println!("| chunks of {chunk}, batch {batch} | FAILED: {e} | | |"),
            }
        }
    }
}
