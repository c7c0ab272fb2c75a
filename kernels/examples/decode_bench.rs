//! Decode step time of the forward step at batch 1, 16, 64 and 256 (SmolLM2-135M's shape,
//! synthetic weights), against the floor of reading the weights (and the batch's KV) once
//! at the card's measured copy bandwidth; CUDA graphs on and off, graphs with each step
//! sent while the one before runs (the engine's steps planned ahead: the device does not
//! wait for the host between steps), and graphs without programmatic dependent launches
//! (Hopper on; the default there). Prints one table; then,
//! for the batches of 1–16 rows, a second: the step with its products on cuBLAS, on
//! `gemv_f16` with the norms and swiglu launched apart, and on `gemv_f16` with them fused,
//! and the same two over the file's own blocks (`gemv_q4`, `gemv_q8`, ...), beside the
//! floors of reading the f16 rows and the blocks once.
//!
//!     cargo build --release -p kernels --example decode_bench   # here; run by gpu-check.sh
//!     decode_bench [MODEL.gguf] [--cpu | --emu] [--ctx N] [--batches 1,16,64,256] [--tensor]
//!
//! `--tensor`: the steps launch the tensor-core attention kernel (`attention_tc`).
//!
//! A mixture of experts' floors count its router and shared expert whole and, of its
//! experts, the share a step's rows are expected to choose under uniform routing (of E
//! experts, k a row: E·(1 − (1 − k/E)ⁿ) for n rows).
//!
//! Without a model path it writes the synthetic SmolLM2-shaped model to a temporary
//! folder. `--cpu` runs the same harness on the CPU backend, `--emu` on the CUDA backend
//! over the CPU emulator (checks of the harness, not GPU numbers; use a small model). Each step is the engine's decode step: one token per sequence at
//! position `ctx`, sampled on the device (greedy).

use kernels::backend::{Backend, CpuBackend, ReadBack, FROM_LAST};
use kernels::cuda::backend::{AttentionKernel, CudaBackend, KvCapacity, SmallProducts};
use kernels::cuda::emu::Emu;
use kernels::cuda::exec::Exec;
use kernels::cuda::gemv::QuantRows;
use kernels::cuda::twins::{SampleParams, TwinModel};
use kernels::forward::Batch;
use kernels::synth::{write_model, SynthSpec};
use std::time::Instant;

const BLOCK: usize = 16;

struct Args {
    model: Option<String>,
    cpu: bool,
    emu: bool,
    ctx: usize,
    batches: Vec<usize>,
    tensor: bool,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        model: None,
        cpu: false,
        emu: false,
        ctx: 256,
        batches: vec![1, 16, 64, 256],
        tensor: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--cpu" => a.cpu = true,
            "--emu" => a.emu = true,
            "--tensor" => a.tensor = true,
            "--ctx" => a.ctx = it.next().and_then(|v| v.parse().ok()).ok_or("--ctx N")?,
            "--batches" => {
                a.batches = it
                    .next()
                    .ok_or("--batches 1,16,...")?
                    .split(',')
                    .map(|v| v.parse().map_err(|_| format!("bad batch size {v}")))
                    .collect::<Result<_, _>>()?
            }
            _ if !x.starts_with('-') => a.model = Some(x),
            _ => return Err(format!("unknown argument {x}")),
        }
    }
    Ok(a)
}

/// Sequence `s` of a batch owns blocks `[s·per, (s+1)·per)`.
fn table(s: usize, per: usize) -> Vec<u32> {
    ((s * per) as u32..((s + 1) * per) as u32).collect()
}

/// Fills the cache of `n` sequences up to position `ctx` (prefill chunks of up to
/// `max_tokens` rows).
fn prefill(b: &mut dyn Backend, n: usize, ctx: usize, per: usize, max_tokens: usize) {
    let vocab = b.config().vocab as u32;
    let chunk = max_tokens.min(ctx);
    for s in 0..n {
        let mut pos = 0;
        while pos < ctx {
            let len = chunk.min(ctx - pos);
            let toks: Vec<u32> = (0..len)
                .map(|i| ((pos + i) as u32 * 31 + s as u32) % vocab)
                .collect();
            let mut batch = Batch::default();
            batch.push(&toks, pos, table(s, per), false);
            b.step(&batch).expect("prefill step");
            pos += len;
        }
    }
}

/// Seconds per decode step of `n` sequences at position `ctx` (each step rewrites the same
/// position's keys and values, so the state stays the same).
fn time_decode(b: &mut dyn Backend, n: usize, ctx: usize, per: usize, iters: usize) -> f64 {
    let mut batch = Batch::default();
    for s in 0..n {
        batch.push(&[(s as u32 * 7) % 100], ctx, table(s, per), true);
    }
    let params = vec![SampleParams::GREEDY; n];
    for _ in 0..3 {
        b.step_sample(&batch, &params, &[]).expect("decode step");
    }
    let t = Instant::now();
    for _ in 0..iters {
        b.step_sample(&batch, &params, &[]).expect("decode step");
    }
    t.elapsed().as_secs_f64() / iters as f64
}

/// Seconds per decode step as the engine runs them on a backend that overlaps steps: each
/// sent before the one before is collected, its tokens that one's (read on the device), so
/// the device never waits for the host between two steps.
fn time_overlapped(b: &mut dyn Backend, n: usize, ctx: usize, per: usize, iters: usize) -> f64 {
    let mut first = Batch::default();
    let mut next = Batch::default();
    for s in 0..n {
        first.push(&[(s as u32 * 7) % 100], ctx, table(s, per), true);
        next.push(&[FROM_LAST | s as u32], ctx, table(s, per), true);
    }
    let params = vec![SampleParams::GREEDY; n];
    b.submit(&first, &params, &[], &ReadBack::default())
        .expect("decode step");
    for _ in 0..3 {
        b.submit(&next, &params, &[], &ReadBack::default())
            .expect("decode step");
        b.collect().expect("decode step");
    }
    let t = Instant::now();
    for _ in 0..iters {
        b.submit(&next, &params, &[], &ReadBack::default())
            .expect("decode step");
        b.collect().expect("decode step");
    }
    b.collect().expect("decode step");
    t.elapsed().as_secs_f64() / iters as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args()?;
    if !a.cpu && !a.emu {
        if let Err(e) = kernels::cuda::available() {
            println!("SKIPPED: decode_bench needs a GPU ({e}); --cpu checks the harness");
            return Ok(());
        }
    }
    let path = match &a.model {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let dir = std::env::temp_dir().join(format!("tollgate-decode-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let p = dir.join("smollm2-shape.gguf");
            write_model(&p, &SynthSpec::default())?;
            p
        }
    };
    let load = std::time::Instant::now();
    let model = kernels::load::load(&path)?.model.clone();
    let load_secs = load.elapsed().as_secs_f64();
    let c = model.config.clone();
    let max_n = a.batches.iter().copied().max().unwrap_or(1);
    let per = (a.ctx + 1).div_ceil(BLOCK);
    // Prefill chunks of up to 2,048 rows (256 on the emulator, which is slow).
    let (n_blocks, max_tokens) = (max_n * per, if a.emu { 256 } else { 2048 });
    // The load-time conversion for the GPU (f16 rows and the file's blocks in tiles).
    let convert = std::time::Instant::now();
    let twin = TwinModel::from_model(&model);
    let convert_secs = convert.elapsed().as_secs_f64();
    // A mixture's router and shared expert (f16 elements) are read whole every step; of
    // its experts (bytes as held),
    // those the step's rows choose: of E experts, k a row, E·(1 − (1 − k/E)ⁿ) for n rows
    // under uniform routing (the floors below count that share of the experts' bytes).
    let moe_bytes = |l: &kernels::cuda::twins::TwinLayer| {
        l.moe.as_ref().map_or((0, 0), |m| {
            let shared = m
                .shared
                .as_ref()
                .map_or(0, |s| s.gate_up.len() + s.down.len());
            (m.router.len() + shared, m.gate_up.bytes() + m.down.bytes())
        })
    };
    let weight_bytes = 2.0
        * (twin.output.len()
            + twin
                .layers
                .iter()
                .map(|l| {
                    l.wqkv.len() + l.wo.len() + l.w_gate_up.len() + l.w_down.len() + moe_bytes(l).0
                })
                .sum::<usize>()) as f64;
    let expert_bytes = twin.layers.iter().map(|l| moe_bytes(l).1).sum::<usize>() as f64;
    let experts_read = |n: usize| {
        c.moe.map_or(0.0, |m| {
            expert_bytes * (1.0 - (1.0 - m.used as f64 / m.count as f64).powi(n as i32))
        })
    };
    // What a step of few rows reads where the products take the file's blocks: each
    // matrix's blocks (a stack's parts), or its f16 rows where it has none.
    let block_bytes = {
        let read = |q: &[QuantRows], f16s: usize| -> usize {
            if q.is_empty() {
                2 * f16s
            } else {
                q.iter().map(QuantRows::bytes).sum()
            }
        };
        let layers: usize = twin
            .layers
            .iter()
            .map(|l| {
                let q = &l.quant;
                read(&q.wqkv, l.wqkv.len())
                    + read(q.wo.as_slice(), l.wo.len())
                    + read(&q.w_gate_up, l.w_gate_up.len())
                    + read(q.w_down.as_slice(), l.w_down.len())
            })
            .sum();
        (layers + read(twin.output_q.as_slice(), twin.output.len())) as f64
    };
    let (mut which, copy_gbs) = if a.cpu {
        let b = CpuBackend::new(model.clone(), BLOCK, n_blocks, 0)?;
        (Which::Cpu(Box::new(b)), f64::NAN)
    } else if a.emu {
        let e = Emu::open_for(&c)?;
        let name = e.describe();
        let kv = KvCapacity::Blocks(n_blocks);
        let mut b = CudaBackend::on(e, name, &twin, BLOCK, kv, max_tokens, max_n)?;
        if a.tensor {
            b.set_attention(AttentionKernel::Tensor)?;
        }
        (Which::Emu(Box::new(b)), f64::NAN)
    } else {
        let bw = kernels::cuda::device::Gpu::open(0)?.copy_bandwidth()?.1;
        let mut b = CudaBackend::with_capacity(
            &twin,
            0,
            BLOCK,
            KvCapacity::Blocks(n_blocks),
            max_tokens,
            max_n,
        )?;
        // The load-time choice between cuBLAS, gemv_f16 and the file's blocks for products
        // of few rows, the last two fused or apart.
        let us = |s: Option<f64>| s.map_or("(none)".to_string(), |s| format!("{:.1} µs", s * 1e6));
        for t in b.small_product_timings() {
            println!(
                "decode step of {}: products on cuBLAS {}, on gemv_f16 {} (apart {}), over the file's blocks {} (apart {})",
                t.bucket,
                us(Some(t.cublas_secs)),
                us(Some(t.gemv_secs)),
                us(Some(t.gemv_apart_secs)),
                us(t.quant_secs),
                us(t.quant_apart_secs),
            );
        }
        println!(
            "gemv {:?}, file blocks {:?}, fused {:?} (held: {})",
            b.small_products(),
            b.quant_small(),
            b.fused_small(),
            b.quant_summary()
        );
        if a.tensor {
            b.set_attention(AttentionKernel::Tensor)?;
        }
        (Which::Cuda(Box::new(b)), bw)
    };
    drop(twin);
    let backend = which.backend();
    println!(
        "{}{} | model {} ({} layers, dim {}) | weights {:.1} MB as held (f16; a mixture's experts as held: the file's blocks, Q8_0's values or f16) ({:.1} MB as the file's blocks), loaded in {:.2} s and converted in {:.2} s on {} threads | copy {:.0} GB/s | context {}",
        backend.name(),
        if a.tensor { " (attention_tc)" } else { "" },
        path.display(),
        c.n_layers,
        c.dim,
        (weight_bytes + expert_bytes) / 1e6,
        (block_bytes + expert_bytes) / 1e6,
        load_secs,
        convert_secs,
        rayon::current_num_threads(),
        copy_gbs,
        a.ctx
    );
    prefill(backend, max_n, a.ctx, per, max_tokens);
    println!(
        "| batch | step (graphs) | graphs, overlapped | step (direct) | graphs, plain launches | floor: weights | floor: +KV | tokens/s (best) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &a.batches {
        let iters = if a.cpu || a.emu { 3 } else { 200 };
        let kv_bytes = (n * (a.ctx + 1) * c.n_layers * c.kv_dim() * 2 * 2) as f64;
        let weights = weight_bytes + experts_read(n);
        let floor_w = weights / (copy_gbs * 1e9);
        let floor_kv = (weights + kv_bytes) / (copy_gbs * 1e9);
        let (graphs, ahead, direct, plain) = match &mut which {
            Which::Cuda(cuda) => graphs_and_direct(cuda.as_mut(), n, a.ctx, per, iters)?,
            Which::Emu(emu) => graphs_and_direct(emu.as_mut(), n, a.ctx, per, iters)?,
            Which::Cpu(cpu) => (
                f64::NAN,
                f64::NAN,
                time_decode(cpu.as_mut(), n, a.ctx, per, iters),
                f64::NAN,
            ),
        };
        println!(
            "| {n} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs | {:.0} |",
            graphs * 1e6,
            ahead * 1e6,
            direct * 1e6,
            plain * 1e6,
            floor_w * 1e6,
            floor_kv * 1e6,
            n as f64
                / if graphs.is_nan() {
                    direct
                } else {
                    graphs.min(direct).min(ahead)
                }
        );
    }
    let iters = if a.emu { 3 } else { 200 };
    // The floors of a step of few rows: reading the f16 rows once, or the blocks.
    let floor = |n: usize| {
        (
            (weight_bytes + experts_read(n)) / (copy_gbs * 1e9),
            (block_bytes + experts_read(n)) / (copy_gbs * 1e9),
        )
    };
    match &mut which {
        Which::Cuda(cuda) => small_products(cuda.as_mut(), &a, per, iters, floor)?,
        Which::Emu(emu) => small_products(emu.as_mut(), &a, per, iters, floor)?,
        Which::Cpu(_) => {}
    }
    Ok(())
}

/// The decode steps of at most `gemv::MAX_ROWS` sequences among `batches`, from graphs,
/// with their products on cuBLAS, on `gemv_f16` with the norms and swiglu apart, and on
/// `gemv_f16` with them fused; the same two over the file's own blocks (`gemv_q4`,
/// `gemv_q8`) where the model has them; then the backend's own choice again.
fn small_products<E: Exec>(
    cuda: &mut CudaBackend<E>,
    a: &Args,
    per: usize,
    iters: usize,
    floor: impl Fn(usize) -> (f64, f64),
) -> Result<(), String> {
    let ctx = a.ctx;
    let small: Vec<usize> = a
        .batches
        .iter()
        .copied()
        .filter(|&n| n <= kernels::cuda::gemv::MAX_ROWS)
        .collect();
    if small.is_empty() {
        return Ok(());
    }
    let chosen = (
        cuda.small_products(),
        cuda.fused_small(),
        cuda.quant_small(),
    );
    let set = |cuda: &mut CudaBackend<E>,
               (small, fused, quant): (SmallProducts, SmallProducts, SmallProducts)| {
        cuda.set_small_products(small)
            .and_then(|_| cuda.set_fused_small(fused))
            .and_then(|_| cuda.set_quant_small(quant))
            .map_err(|e| e.to_string())
    };
    let (none, all) = (SmallProducts(0), SmallProducts::ALL);
    let mut ways = vec![(none, all, none), (all, none, none), (all, all, none)];
    if cuda.has_quant() {
        ways.extend([(all, none, all), (all, all, all)]);
    }
    println!();
    println!(
        "| batch | products on cuBLAS | gemv_f16, norms and swiglu apart | gemv_f16, fused | file blocks, apart | file blocks, fused | floor: f16 | floor: blocks |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    cuda.set_graphs(true)?;
    for n in small {
        let mut row = Vec::new();
        for &w in &ways {
            set(cuda, w)?;
            row.push(format!(
                "{:.1} µs",
                time_decode(cuda, n, ctx, per, iters) * 1e6
            ));
        }
        row.resize(5, "(none)".into());
        let (floor_f16, floor_blocks) = floor(n);
        row.push(format!("{:.1} µs", floor_f16 * 1e6));
        row.push(format!("{:.1} µs", floor_blocks * 1e6));
        println!("| {n} | {} |", row.join(" | "));
    }
    set(cuda, chosen)
}

/// Seconds per decode step with CUDA graphs (each step waited for, then each sent while
/// the one before runs), with direct launches, and with graphs of plain launches where
/// the kernels launch as dependent launches (else NaN).
fn graphs_and_direct<E: Exec>(
    cuda: &mut CudaBackend<E>,
    n: usize,
    ctx: usize,
    per: usize,
    iters: usize,
) -> Result<(f64, f64, f64, f64), String> {
    cuda.set_graphs(true)?;
    let g = time_decode(cuda, n, ctx, per, iters);
    let ahead = time_overlapped(cuda, n, ctx, per, iters);
    cuda.set_graphs(false)?;
    let d = time_decode(cuda, n, ctx, per, iters);
    cuda.set_graphs(true)?;
    let mut plain = f64::NAN;
    if cuda.dependent_launch() {
        let off = |cuda: &mut CudaBackend<E>, on| {
            cuda.set_dependent_launch(on).map_err(|e| e.to_string())
        };
        off(cuda, false)?;
        plain = time_decode(cuda, n, ctx, per, iters);
        off(cuda, true)?;
    }
    Ok((g, ahead, d, plain))
}

enum Which {
    Cpu(Box<CpuBackend>),
    Cuda(Box<CudaBackend>),
    Emu(Box<CudaBackend<Emu>>),
}

impl Which {
    fn backend(&mut self) -> &mut dyn Backend {
        match self {
            Which::Cpu(b) => b.as_mut(),
            Which::Cuda(b) => b.as_mut(),
            Which::Emu(b) => b.as_mut(),
        }
    }
}
