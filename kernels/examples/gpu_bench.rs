//! Memory-bound kernel bandwidth on a GPU (add_rmsnorm, rope_kv_write, build_batch), against the card's measured device-to-device
//! copy bandwidth; and paged decode attention at batch 1, 16, 64, 256. Prints one table.
//!
//! `cargo build --release -p kernels --example gpu_bench` here; run by
//! `kernels/gpu-check.sh` on a GPU machine.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::f16;
use kernels::cuda::device::Gpu;
use std::time::Instant;

const ITERS: u32 = 50;

fn cfg(grid: (u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Seconds per call of `f` (after a warm-up), synchronizing at the end.
fn time(g: &Gpu, mut f: impl FnMut()) -> f64 {
    f();
    g.stream.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..ITERS {
        f();
    }
    g.stream.synchronize().unwrap();
    t.elapsed().as_secs_f64() / ITERS as f64
}

fn row(name: &str, bytes: f64, secs: f64, copy: f64) {
    let gbs = bytes / secs / 1e9;
    println!(
        "| {name:<34} | {:>9.1} µs | {gbs:>8.0} GB/s | {:>5.0} % |",
        secs * 1e6,
        100.0 * gbs / copy
    );
}

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
    let s = &g.stream;
    let (secs, copy) = g.copy_bandwidth().unwrap();
    println!("| kernel                             |   time      |  achieved    | of copy |");
    println!("|---|---:|---:|---:|");
    println!(
        "| device-to-device copy (1 GiB)      | {:>9.1} µs | {copy:>8.0} GB/s |   100 % |",
        secs * 1e6
    );

    // add_rmsnorm: 32k rows of 576 (read x, delta; write x, out f16).
    let (t, d) = (32768usize, 576usize);
    let mut x: CudaSlice<f32> = s.alloc_zeros(t * d).unwrap();
    let delta: CudaSlice<f32> = s.alloc_zeros(t * d).unwrap();
    let w: CudaSlice<f32> = s.alloc_zeros(d).unwrap();
    let mut out: CudaSlice<f16> = s.alloc_zeros(t * d).unwrap();
    let (di, eps) = (d as i32, 1e-5f32);
    let f = g.kernel("add_rmsnorm").unwrap();
    let secs = time(&g, || {
        let mut l = s.launch_builder(f);
        l.arg(&mut x)
            .arg(&delta)
            .arg(&w)
            .arg(&mut out)
            .arg(&0u64)
            .arg(&di)
            .arg(&eps);
        unsafe { l.launch(cfg((t as u32, 1), 256)) }.unwrap();
    });
    row(
        "add_rmsnorm 32768×576",
        (t * d) as f64 * (4.0 + 4.0 + 4.0 + 2.0),
        secs,
        copy,
    );

    // rope_kv_write: 32k rows of SmolLM2's QKV (9 q + 3 k + 3 v heads of 64): q and k
    // rotated in place (read + write), k and v written to the cache in f16.
    let (nh, nkv, hd) = (9i32, 3i32, 64i32);
    let w = 576 + 2 * 192;
    let mut qkv: CudaSlice<f32> = s.alloc_zeros(t * w).unwrap();
    let pos: CudaSlice<u32> = s.alloc_zeros(t).unwrap();
    let slots = s.memcpy_stod(&(0..t as i32).collect::<Vec<_>>()).unwrap();
    let mut kc: CudaSlice<f16> = s.alloc_zeros(t * 192).unwrap();
    let mut vc: CudaSlice<f16> = s.alloc_zeros(t * 192).unwrap();
    let (wi, ti, bsi, base) = (w as i32, t as i32, 16i32, 100000f32);
    let threads = (t * 12 * 32) as u32;
    let f = g.kernel("rope_kv_write").unwrap();
    let secs = time(&g, || {
        let mut l = s.launch_builder(f);
        l.arg(&mut qkv)
            .arg(&wi)
            .arg(&pos)
            .arg(&slots)
            .arg(&mut kc)
            .arg(&mut vc)
            .arg(&ti)
            .arg(&nh)
            .arg(&nkv)
            .arg(&hd)
            .arg(&bsi)
            .arg(&base);
        unsafe { l.launch(cfg((threads.div_ceil(256), 1), 256)) }.unwrap();
    });
    drop((qkv, kc, vc));
    // q, k read and written (f32); v read (f32); k, v written (f16); positions, slots.
    let bytes = (t * 768) as f64 * 8.0 + (t * 192) as f64 * (4.0 + 2.0 * 2.0) + t as f64 * 8.0;
    row("rope_kv_write 32768 rows", bytes, secs, copy);

    // build_batch: an engine-sized step (256 sequences × 64 tokens, 512 table entries
    // each), then a large one (2048 × 32 tokens, 2048 entries each: 32 MB of tables).
    for (ns, per, mb) in [(256usize, 64usize, 512usize), (2048, 32, 2048)] {
        let bs = 16i32;
        let tt = ns * per;
        let mut staging = Vec::with_capacity(4 * ns + tt + ns * mb);
        for i in 0..ns {
            staging.extend([(i * per) as u32, per as u32, 100, (i % 2) as u32]);
        }
        staging.extend((0..tt as u32).map(|i| i % 49152));
        staging.extend((0..(ns * mb) as u32).map(|i| i % 60000));
        let st = s.memcpy_stod(&staging).unwrap();
        let mut o_tok: CudaSlice<u32> = s.alloc_zeros(tt).unwrap();
        let mut o_pos: CudaSlice<u32> = s.alloc_zeros(tt).unwrap();
        let mut o_slot: CudaSlice<i32> = s.alloc_zeros(tt).unwrap();
        let mut o_seq: CudaSlice<i32> = s.alloc_zeros(tt).unwrap();
        let mut o_tab: CudaSlice<i32> = s.alloc_zeros(ns * mb).unwrap();
        let mut o_log: CudaSlice<i32> = s.alloc_zeros(ns).unwrap();
        let (nsi, tti, mbi) = (ns as i32, tt as i32, mb as i32);
        let f = g.kernel("build_batch").unwrap();
        let n_threads = (ns * mb).max(tt) as u32;
        let secs = time(&g, || {
            let mut l = s.launch_builder(f);
            l.arg(&st).arg(&nsi).arg(&tti).arg(&mbi).arg(&bs);
            l.arg(&mut o_tok)
                .arg(&mut o_pos)
                .arg(&mut o_slot)
                .arg(&mut o_seq)
                .arg(&mut o_tab)
                .arg(&mut o_log);
            unsafe { l.launch(cfg((n_threads.div_ceil(256), 1), 256)) }.unwrap();
        });
        let bytes = staging.len() as f64 * 4.0 + (tt * 16 + ns * mb * 4 + ns * 4) as f64;
        row(
            &format!("build_batch {ns} seqs × {per} tok, {mb} blk"),
            bytes,
            secs,
            copy,
        );
    }

    let bs = 16i32;
    // Paged decode attention: context 512 per sequence, SmolLM2 heads, one layer.
    let ctx = 512usize;
    for batch in [1usize, 16, 64, 256] {
        let blocks = batch * ctx / 16;
        let kc: CudaSlice<f16> = s.alloc_zeros(blocks * 16 * 192).unwrap();
        let vc: CudaSlice<f16> = s.alloc_zeros(blocks * 16 * 192).unwrap();
        let tables: Vec<i32> = (0..blocks as i32).collect();
        let tb = s.memcpy_stod(&tables).unwrap();
        let pos = s.memcpy_stod(&vec![(ctx - 1) as u32; batch]).unwrap();
        let qd: CudaSlice<f32> = s.alloc_zeros(batch * 576).unwrap();
        let q_stride = 576i32;
        let mut out: CudaSlice<f16> = s.alloc_zeros(batch * 576).unwrap();
        let (mbi, scale) = ((ctx / 16) as i32, 0.125f32);
        let f = g.kernel("attention_decode").unwrap();
        let secs = time(&g, || {
            let mut l = s.launch_builder(f);
            l.arg(&qd)
                .arg(&q_stride)
                .arg(&kc)
                .arg(&vc)
                .arg(&tb)
                .arg(&pos)
                .arg(&mut out);
            l.arg(&mbi).arg(&nh).arg(&nkv).arg(&hd).arg(&bs).arg(&scale);
            // As the backend launches it: more warps per row at small batch.
            let threads = 32 * kernels::cuda::device::attention_warps(batch, 16) as u32;
            unsafe { l.launch(cfg((batch as u32, 3), threads)) }.unwrap();
        });
        let bytes = (batch * ctx * 192 * 2 * 2) as f64;
        row(
            &format!("attention_decode batch {batch}, ctx {ctx}"),
            bytes,
            secs,
            copy,
        );
    }
}
