//! The kernel benchmarks' launches (`examples/gpu_bench.rs` times them on a GPU): the
//! memory-bound kernels (add_rmsnorm, head_rmsnorm, rope_kv_write, build_batch, swiglu) at engine and
//! large sizes, paged decode attention at several batch sizes, the sampling kernel
//! (greedy, and with top-k and top-p cuts), and the step's matrix products at decode batch
//! sizes (cuBLAS, and our `gemv_f16` where it applies, with `gemv_q4` / `gemv_q8` over the
//! file's blocks beside it), each with the bytes it must move
//! (for the products: the weights, read once).
//! Written against [`Exec`], so a test runs the same launches on the emulator at small
//! sizes: a benchmark that would fail on the GPU fails in CI first.
//!
//! Here the sizes, the rows and [`run`]; the memory-bound kernels and sampling in
//! `kernels`, attention in `attention`, the matrix products in `products`.

use super::device::ATTENTION_CHUNK_KEYS;
use super::exec::{Arg, DevBuf, Exec, ExecError};
use super::gemv;
use super::step::AttentionKernel;
use cudarc::driver::LaunchConfig;
use std::time::Instant;

mod attention;
mod kernels;
mod products;

pub use attention::{attention, attention_packed, attention_split};
use kernels::{head_norm, moe_gemv, norm, rope, sample, swiglu, MoeForm};

/// How big each benchmark is.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// Rows for add_rmsnorm and rope_kv_write.
    pub rows: usize,
    /// build_batch steps: (sequences, tokens each, block-table entries each).
    pub steps: Vec<(usize, usize, usize)>,
    /// Decode attention batch sizes, and the context of every sequence (a decode step's);
    /// then a long context, one block per row and with the rows' chunks spread over blocks.
    pub decode: Vec<usize>,
    pub ctx: usize,
    pub long_ctx: usize,
    /// A long prompt's tokens, prefilled in one launch by each attention kernel.
    pub prompt: usize,
    /// Sampling: rows, and the vocabulary.
    pub sample: (usize, usize),
    /// Matrix products: (name, k, n, how often a step runs it) weight shapes, each at
    /// these row counts.
    pub products: Vec<(&'static str, usize, usize, InStep)>,
    pub product_rows: Vec<usize>,
    /// The QKV product's heads (query heads, KV heads, head dimension): the product of
    /// that width is also timed with RoPE and the cache write fused in.
    pub qkv_heads: (usize, usize, usize),
    /// Layers of the model whose decode step the parts add up to.
    pub layers: usize,
    /// A mixture of experts' shape (experts, used a row, width, expert width): its
    /// `moe_gemv`, `moe_gemv_q8` and `moe_tc_q4f` over the gate|up rows at each decode
    /// batch.
    pub moe: (usize, usize, usize, usize),
}

/// How often a decode step of the model runs a product ([`Sizes::products`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InStep {
    PerLayer,
    /// Once a step (the LM head).
    Once,
    /// Not at all: another model's shape, timed for itself.
    No,
}

impl Sizes {
    /// The sizes the GPU table reports.
    pub fn full() -> Self {
        Self {
            rows: 32768,
            // The engine's size, then one that moves ~270 MB: several times the L2 (50 MB
            // on an H100, 60 MB on an H200), so that the large sizes measure the memory.
            steps: vec![(256, 64, 512), (4096, 64, 8192)],
            decode: vec![1, 16, 64, 256],
            ctx: 512,
            long_ctx: 4096,
            prompt: 4096,
            sample: (256, 49152),
            // SmolLM2-135M's: QKV, output, gate|up, down, and the LM head.
            products: vec![
                ("qkv", 576, 960, InStep::PerLayer),
                ("o", 576, 576, InStep::PerLayer),
                ("gate|up", 576, 3072, InStep::PerLayer),
                ("down", 1536, 576, InStep::PerLayer),
                ("lm head", 576, 49152, InStep::Once),
                // Llama-3-8B's ffn_down: at 8-16 rows too wide to stage whole, so `gemv`
                // reads it in runs of its columns.
                ("8B down", 14336, 4096, InStep::No),
            ],
            product_rows: vec![1, 4, 8, 16, 64, 256],
            qkv_heads: (9, 3, 64),
            layers: 30,
            // Qwen3-30B-A3B's.
            moe: (128, 8, 2048, 768),
        }
    }

    /// Small enough for the emulator.
    pub fn smoke() -> Self {
        Self {
            rows: 64,
            steps: vec![(8, 4, 16)],
            decode: vec![1, 3],
            ctx: 48,
            long_ctx: 1100,
            prompt: 80,
            sample: (3, 3000),
            products: vec![("small", 64, 96, InStep::PerLayer)],
            product_rows: vec![1, 3, 9],
            qkv_heads: (1, 1, 32),
            layers: 2,
            moe: (8, 2, 64, 32),
        }
    }
}

/// One benchmark's result: seconds per launch and the bytes it moves.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub secs: f64,
    pub bytes: f64,
    /// Where the launch is one of a decode step's, at that step's size: the batch, and
    /// how many times a step runs it (per layer, or once).
    pub in_step: Option<(usize, usize)>,
}

/// What a decode step's kernels add up to when each is launched alone (so without the
/// gaps between launches that a step's time also holds).
#[derive(Debug, Clone, Default)]
pub struct StepSum {
    pub batch: usize,
    /// Seconds per step in the matrix products, attention, and the other kernels.
    pub products: f64,
    pub attention: f64,
    pub other: f64,
}

impl StepSum {
    pub fn total(&self) -> f64 {
        self.products + self.attention + self.other
    }
}

/// The decode steps' sums, by batch, from `rows`' parts.
pub fn step_sums(rows: &[Row]) -> Vec<StepSum> {
    let mut sums: Vec<StepSum> = Vec::new();
    for r in rows {
        let Some((batch, times)) = r.in_step else {
            continue;
        };
        let at = match sums.iter().position(|s| s.batch == batch) {
            Some(i) => i,
            None => {
                sums.push(StepSum {
                    batch,
                    ..StepSum::default()
                });
                sums.len() - 1
            }
        };
        let secs = r.secs * times as f64;
        let s = &mut sums[at];
        if r.name.starts_with("gemm") {
            s.products += secs;
        } else if r.name.starts_with("attention") {
            s.attention += secs;
        } else {
            s.other += secs;
        }
    }
    sums.sort_by_key(|s| s.batch);
    sums
}

pub(super) fn cfg(grid: (u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Seconds per call of `f` (after a warm-up call), synchronized at the end.
pub(super) fn time<E: Exec>(
    e: &E,
    iters: u32,
    mut f: impl FnMut() -> Result<(), ExecError>,
) -> Result<f64, ExecError> {
    f()?;
    e.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    e.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / iters.max(1) as f64)
}

/// Seconds per launch of `kernel`.
pub(super) fn time_launch<E: Exec>(
    e: &E,
    iters: u32,
    kernel: &str,
    c: LaunchConfig,
    args: &[Arg],
) -> Result<f64, ExecError> {
    time(e, iters, || e.launch(kernel, c, args))
}

pub(super) fn i(v: usize) -> Arg {
    Arg::I32(v as i32)
}

/// Every benchmark at `sizes`, each launched `iters` times, on `e` (which must have the
/// kernels built for SmolLM2's attention shape: 9 query heads over 3 KV heads of 64).
/// Besides the large sizes, the kernels of a decode step are timed at each decode batch
/// (their rows carry `in_step`; [`step_sums`] adds them up).
pub fn run<E: Exec>(e: &E, sizes: &Sizes, iters: u32) -> Result<Vec<Row>, ExecError> {
    let mut rows = Vec::new();
    let t = sizes.rows;
    rows.push(norm(e, t, iters, None)?);
    rows.push(head_norm(e, t, iters)?);
    rows.push(rope(e, t, iters, None)?);

    // build_batch: the staging words of `ns` sequences of `per` tokens, `mb` table entries.
    for &(ns, per, mb) in &sizes.steps {
        let tt = ns * per;
        let mut staging = Vec::with_capacity(4 * ns + tt + ns * mb);
        for s in 0..ns {
            staging.extend([(s * per) as u32, per as u32, 100, (s % 2) as u32]);
        }
        staging.extend((0..tt as u32).map(|v| v % 49152));
        staging.extend((0..(ns * mb) as u32).map(|v| v % 60000));
        // Positions 100 .. 100 + per must fall inside each table.
        debug_assert!((100 + per).div_ceil(16) <= mb);
        let st = e.upload(&staging)?;
        let o_tok = e.zeros::<u32>(tt)?;
        let o_pos = e.zeros::<u32>(tt)?;
        let o_slot = e.zeros::<i32>(tt)?;
        let o_seq = e.zeros::<i32>(tt)?;
        let o_tab = e.zeros::<i32>(ns * mb)?;
        let o_log = e.zeros::<i32>(ns)?;
        let (o_slot_w, o_tab_w) = (e.zeros::<i32>(1)?, e.zeros::<i32>(1)?);
        // The step before's sampled tokens (no token word here stands for one).
        let last = e.zeros::<u32>(ns)?;
        let n_threads = (ns * mb).max(tt) as u32;
        let args = [
            st.arg(),
            last.arg(),
            i(ns),
            i(tt),
            i(mb),
            i(16),
            o_tok.arg(),
            o_pos.arg(),
            o_slot.arg(),
            o_seq.arg(),
            o_tab.arg(),
            o_log.arg(),
            // No windowed layers' own pool (its outputs, buffers of their own, unwritten).
            i(0),
            o_slot_w.arg(),
            o_tab_w.arg(),
        ];
        let secs = time_launch(
            e,
            iters,
            "build_batch",
            cfg((n_threads.div_ceil(256), 1), 256),
            &args,
        )?;
        rows.push(Row {
            name: format!("build_batch {ns} seqs × {per} tok, {mb} blk"),
            secs,
            bytes: staging.len() as f64 * 4.0 + (tt * 16 + ns * mb * 4 + ns * 4) as f64,
            in_step: None,
        });
    }

    // Paged decode attention: one layer, SmolLM2's heads, every sequence at `ctx` (as in
    // the decode step), then at `long_ctx`: split as the step launches it (a row's chunks
    // over several blocks when rows are few), and with one block per row and KV head.
    for &batch in &sizes.decode {
        for ctx in [sizes.ctx, sizes.long_ctx] {
            let split = attention_split(e, batch, ctx, ATTENTION_CHUNK_KEYS)?;
            let mut spreads = vec![split];
            if ctx == sizes.long_ctx && split > 1 {
                spreads.push(1);
            }
            for z in spreads {
                let mut r = attention(e, batch, ctx, ATTENTION_CHUNK_KEYS, z, iters)?;
                r.in_step = (ctx == sizes.ctx).then_some((batch, sizes.layers));
                rows.push(r);
            }
        }
    }
    // The tensor-core kernel at the same decode sizes (one block per row), and both
    // kernels over a long prompt (its rows' keys are read once per row by the SIMT kernel,
    // once per tile of rows by the tensor-core one).
    for &batch in &sizes.decode {
        for ctx in [sizes.ctx, sizes.long_ctx] {
            rows.push(attention_packed(
                e,
                AttentionKernel::Tensor,
                batch,
                ctx,
                None,
                iters,
            )?);
        }
    }
    for kernel in [AttentionKernel::Simt, AttentionKernel::Tensor] {
        let n = sizes.prompt;
        rows.push(attention_packed(e, kernel, 1, n, Some(n), iters)?);
    }
    rows.push(swiglu(e, t, iters, None)?);
    rows.extend(sample(e, sizes.sample, true, iters, None)?);
    for &batch in &sizes.decode {
        for form in [MoeForm::F16, MoeForm::Q8, MoeForm::Q4K] {
            rows.push(moe_gemv(e, sizes.moe, batch, form, iters)?);
        }
    }

    // A decode step's other kernels at its batch: two norms per layer and the final one,
    // RoPE with the cache write, SwiGLU, and sampling (greedy) once.
    for &batch in &sizes.decode {
        let layers = sizes.layers;
        rows.push(norm(e, batch, iters, Some((batch, 2 * layers + 1)))?);
        rows.push(rope(e, batch, iters, Some((batch, layers)))?);
        rows.push(swiglu(e, batch, iters, Some((batch, layers)))?);
        let vocab = sizes.sample.1;
        rows.extend(sample(e, (batch, vocab), false, iters, Some((batch, 1)))?);
    }

    rows.extend(products::products(e, sizes, iters)?);
    Ok(rows)
}
