//! The kernel benchmarks' launches (`examples/gpu_bench.rs` times them on a GPU): the
//! memory-bound kernels (add_rmsnorm, rope_kv_write, build_batch, swiglu) at engine and
//! large sizes, paged decode attention at several batch sizes, the sampling kernel
//! (greedy, and with top-k and top-p cuts), and the step's matrix products at decode batch
//! sizes (cuBLAS, and our `gemv_f16` where it applies, with `gemv_q4` / `gemv_q8` over the
//! file's blocks beside it), each with the bytes it must move
//! (for the products: the weights, read once).
//! Written against [`Exec`], so a test runs the same launches on the emulator at small
//! sizes: a benchmark that would fail on the GPU fails in CI first.

use super::device::{attention_splits, ATTENTION_CHUNK_KEYS};
use super::exec::{Arg, DevBuf, Exec, ExecError};
use super::gemv;
use super::step::AttentionKernel;
use cudarc::driver::LaunchConfig;
use half::f16;
use std::time::Instant;

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

/// The fused forms of one product of `m` rows by `w` (`n × k`): its input normalized in its
/// blocks (`gemv_f16_norm`: the bytes of x, delta and the sums counted), made by SwiGLU
/// from rows of 2k (`gemv_f16_swiglu`), and, where `n` is the QKV width of `heads`, with
/// RoPE and the cache write (`gemv_f16_norm_rope`). Rows of no step's sum.
fn fused_products<E: Exec>(
    e: &E,
    (name, k, n): (&str, usize, usize),
    m: usize,
    heads: (usize, usize, usize),
    w: &E::Buf<f16>,
    iters: u32,
) -> Result<Vec<Row>, ExecError> {
    use super::gemv::{gemv_from, gemv_rope, Input, RopeKv, Weights};
    let (x, delta, norm) = (e.zeros::<f32>(m * k)?, e.zeros::<f32>(m * k)?, e.zeros(k)?);
    let mut x_out = e.zeros::<f32>(m * k)?;
    let mut y = e.zeros::<f32>(m * n)?;
    let weights = (n * k * 2 + m * n * 4) as f64;
    // The normalized input: x + delta (to x_out) by the norm's weight.
    fn input<'a, E: Exec>(
        x: &'a E::Buf<f32>,
        delta: &'a E::Buf<f32>,
        weight: &'a E::Buf<f32>,
        x_out: &'a mut E::Buf<f32>,
    ) -> Input<'a, E> {
        Input::Norm {
            x,
            delta: Some(delta),
            weight,
            x_out: Some(x_out),
            rows: None,
            eps: 1e-5,
        }
    }
    let mut rows = Vec::new();
    let secs = time(e, iters, || {
        gemv_from(
            e,
            input::<E>(&x, &delta, &norm, &mut x_out),
            Weights::F16(w, 0),
            &mut y,
            m,
            k,
            n,
        )
    })?;
    rows.push(Row {
        name: format!("gemv_f16_norm {name} {m}×{k}·{k}×{n}"),
        secs,
        bytes: weights + (3 * m * k * 4) as f64,
        in_step: None,
    });
    let gu = e.zeros::<f32>(m * 2 * k)?;
    let secs = time(e, iters, || {
        gemv_from(e, Input::Swiglu(&gu), Weights::F16(w, 0), &mut y, m, k, n)
    })?;
    rows.push(Row {
        name: format!("gemv_f16_swiglu {name} {m}×{k}·{k}×{n}"),
        secs,
        bytes: weights + (m * 2 * k * 4) as f64,
        in_step: None,
    });
    let (nh, nkv, hd) = heads;
    if n == (nh + 2 * nkv) * hd {
        // Every row to slot 0 of a one-block cache: the timing's writes, not a step's.
        let block = 16;
        let (positions, slots) = (e.zeros::<u32>(m)?, e.zeros::<i32>(m)?);
        let (mut kc, mut vc) = (e.zeros(nkv * hd * block)?, e.zeros(nkv * hd * block)?);
        let secs = time(e, iters, || {
            let rope = RopeKv {
                positions: &positions,
                slots: &slots,
                k_cache: &mut kc,
                v_cache: &mut vc,
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                block_size: block,
                base: 10_000.0,
            };
            let normed = input::<E>(&x, &delta, &norm, &mut x_out);
            gemv_rope(e, normed, Weights::F16(w, 0), &mut y, m, k, rope)
        })?;
        rows.push(Row {
            name: format!("gemv_f16_norm_rope {name} {m}×{k}·{k}×{n}"),
            secs,
            bytes: weights + (3 * m * k * 4 + m * 2 * nkv * hd * 2) as f64,
            in_step: None,
        });
    }
    Ok(rows)
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

fn cfg(grid: (u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Seconds per call of `f` (after a warm-up call), synchronized at the end.
fn time<E: Exec>(
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
fn time_launch<E: Exec>(
    e: &E,
    iters: u32,
    kernel: &str,
    c: LaunchConfig,
    args: &[Arg],
) -> Result<f64, ExecError> {
    time(e, iters, || e.launch(kernel, c, args))
}

fn i(v: usize) -> Arg {
    Arg::I32(v as i32)
}

/// add_rmsnorm over `t` rows of 576 (read x, delta; write x, out f16).
fn norm<E: Exec>(
    e: &E,
    t: usize,
    iters: u32,
    in_step: Option<(usize, usize)>,
) -> Result<Row, ExecError> {
    let d = 576usize;
    let x = e.zeros::<f32>(t * d)?;
    let delta = e.zeros::<f32>(t * d)?;
    let w = e.zeros::<f32>(d)?;
    let out = e.zeros::<f16>(t * d)?;
    let args = [
        x.arg(),
        delta.arg(),
        w.arg(),
        out.arg(),
        Arg::Null,
        i(t),
        i(d),
        Arg::F32(1e-5),
    ];
    let secs = time_launch(e, iters, "add_rmsnorm", super::norm_launch(t), &args)?;
    Ok(Row {
        name: format!("add_rmsnorm {t}×{d}"),
        secs,
        bytes: (t * d) as f64 * (4.0 + 4.0 + 4.0 + 2.0),
        in_step,
    })
}

/// rope_kv_write over `t` rows of SmolLM2's QKV (9 q + 3 k + 3 v heads of 64): q and k
/// rotated in place (read + write), k and v written to the cache in f16.
fn rope<E: Exec>(
    e: &E,
    t: usize,
    iters: u32,
    in_step: Option<(usize, usize)>,
) -> Result<Row, ExecError> {
    let (nh, nkv, hd, bs) = (9usize, 3usize, 64usize, 16usize);
    let width = 576 + 2 * 192;
    let qkv = e.zeros::<f32>(t * width)?;
    let pos = e.zeros::<u32>(t)?;
    let slots = e.upload(&(0..t as i32).collect::<Vec<_>>())?;
    // Slot s is in block s / 16: t rows fill t / 16 blocks (plus a partial one).
    let cache = t.div_ceil(bs) * bs * 192;
    let (kc, vc) = (e.zeros::<f16>(cache)?, e.zeros::<f16>(cache)?);
    let threads = (t * hd / 2) as u32;
    let args = [
        qkv.arg(),
        i(width),
        pos.arg(),
        slots.arg(),
        kc.arg(),
        vc.arg(),
        i(t),
        i(nh),
        i(nkv),
        i(hd),
        i(bs),
        Arg::F32(100000.0),
    ];
    let c = cfg((threads.div_ceil(256), 1), 256);
    let secs = time_launch(e, iters, "rope_kv_write", c, &args)?;
    // q, k read and written (f32); v read (f32); k, v written (f16); positions, slots.
    let bytes = (t * 768) as f64 * 8.0 + (t * 192) as f64 * (4.0 + 2.0 * 2.0) + t as f64 * 8.0;
    Ok(Row {
        name: format!("rope_kv_write {t} rows"),
        secs,
        bytes,
        in_step,
    })
}

/// swiglu over `t` rows of SmolLM2's gate|up product (read 2 × 1536 f32, write 1536 f16).
fn swiglu<E: Exec>(
    e: &E,
    t: usize,
    iters: u32,
    in_step: Option<(usize, usize)>,
) -> Result<Row, ExecError> {
    let ffn = 1536usize;
    let gu = e.zeros::<f32>(t * 2 * ffn)?;
    let g = e.zeros::<f16>(t * ffn)?;
    let args = [gu.arg(), g.arg(), i(t), i(ffn)];
    let secs = time_launch(e, iters, "swiglu", super::swiglu_launch(t, ffn), &args)?;
    Ok(Row {
        name: format!("swiglu {t}×{ffn}"),
        secs,
        bytes: (t * ffn) as f64 * (8.0 + 2.0),
        in_step,
    })
}

/// sample: one block per row over the vocabulary; greedy, and (with `cuts`) top-k 50 and
/// top-p 0.9 too (the radix passes), and those after a grammar's mask (every third
/// token kept) and 32 deltas on every row (the adjustment JSON mode sends); then (with
/// `cuts`) `logprobs` over the same rows: the drawn token's and the top 20's.
fn sample<E: Exec>(
    e: &E,
    (n_rows, vocab): (usize, usize),
    cuts: bool,
    iters: u32,
    in_step: Option<(usize, usize)>,
) -> Result<Vec<Row>, ExecError> {
    let logits: Vec<f32> = (0..n_rows * vocab)
        .map(|k| ((k as u64 * 2654435761) % 1000) as f32 * 0.01)
        .collect();
    let lg = e.upload(&logits)?;
    let seeds = e.upload(&(0..n_rows as u64).collect::<Vec<_>>())?;
    let steps = e.zeros::<u32>(n_rows)?;
    let out = e.zeros::<u32>(n_rows)?;
    let adjusted = e.zeros::<f32>(n_rows * vocab)?;
    // Every row's adjustment: the same words, at the extra part's start.
    let adjust = crate::adjust::Adjust {
        deltas: (0..32).map(|t| (t * 97, -0.5)).collect(),
        mask: Some(
            (0..vocab.div_ceil(32))
                .map(|w| 0x4924_9249u32.rotate_left((w % 3) as u32))
                .collect(),
        ),
        carry: None,
    };
    // No row is carried: its input tokens are never read.
    let (inputs, logit_rows) = (e.zeros::<u32>(n_rows)?, e.zeros::<i32>(n_rows)?);
    let mut words = Vec::new();
    adjust.write(&mut words);
    let extra = e.upload(&words)?;
    let none = e.upload(&vec![u32::MAX; n_rows])?;
    let all = e.zeros::<u32>(n_rows)?;
    let mut rows = Vec::new();
    let settings = [
        ("greedy", 0.0f32, 0i32, 1.0f32, false),
        ("top-k 50, top-p 0.9", 0.8, 50, 0.9, false),
        ("greedy, masked", 0.0, 0, 1.0, true),
        ("top-k 50, top-p 0.9, masked", 0.8, 50, 0.9, true),
    ];
    for (label, temp, top_k, top_p, masked) in &settings[..if cuts { 4 } else { 1 }] {
        let tv = e.upload(&vec![*temp; n_rows])?;
        let kv = e.upload(&vec![*top_k; n_rows])?;
        let pv = e.upload(&vec![*top_p; n_rows])?;
        let args = [
            lg.arg(),
            adjusted.arg(),
            i(vocab),
            tv.arg(),
            kv.arg(),
            pv.arg(),
            seeds.arg(),
            steps.arg(),
            if *masked { all.arg() } else { none.arg() },
            extra.arg(),
            inputs.arg(),
            logit_rows.arg(),
            out.arg(),
        ];
        let c = cfg((n_rows as u32, 1), super::twins::SAMPLE_THREADS as u32);
        let secs = time_launch(e, iters, "sample", c, &args)?;
        // The row read; masked, also its bits read and its adjusted copy written.
        let per_token = if *masked { 4.0 + 1.0 / 8.0 + 4.0 } else { 4.0 };
        rows.push(Row {
            name: format!("sample {n_rows}×{vocab}, {label}"),
            secs,
            bytes: (n_rows * vocab) as f64 * per_token,
            in_step: if cuts { None } else { in_step },
        });
    }
    if cuts {
        let spec: Vec<u32> = (0..n_rows as u32)
            .flat_map(|r| [r, u32::MAX, crate::logprobs::MAX_TOP as u32])
            .collect();
        let spec = e.upload(&spec)?;
        let scores = e.zeros::<u32>(n_rows * crate::logprobs::SCORE_WORDS)?;
        let args = [lg.arg(), i(vocab), spec.arg(), out.arg(), scores.arg()];
        let c = cfg((n_rows as u32, 1), super::twins::SAMPLE_THREADS as u32);
        let secs = time_launch(e, iters, "logprobs", c, &args)?;
        rows.push(Row {
            // Bandwidth as one read of each row (it makes about seven passes, mostly from
            // L2); what it saves is that row's copy to the host.
            name: format!("logprobs {n_rows}×{vocab}, drawn token and top 20"),
            secs,
            bytes: (n_rows * vocab) as f64 * 4.0,
            in_step: None,
        });
    }
    Ok(rows)
}

/// The blocks per row the step gives a decode attention of `batch` rows at `ctx` keys
/// (the benchmark's 16-slot KV blocks) with chunks of `chunk_keys`, on `e`.
pub fn attention_split<E: Exec>(
    e: &E,
    batch: usize,
    ctx: usize,
    chunk_keys: usize,
) -> Result<usize, ExecError> {
    let chunks = (ctx.div_ceil(16) * 16).div_ceil(chunk_keys);
    Ok(attention_splits(batch, 3, e.multiprocessors()?, chunks))
}

/// Decode attention over one layer with SmolLM2's heads (9 query heads over 3 KV heads of
/// 64): `batch` sequences at `ctx` keys each, on a build with `CHUNK_KEYS = chunk_keys`,
/// each row's chunks spread over `z` blocks (1: one block per row and KV head).
pub fn attention<E: Exec>(
    e: &E,
    batch: usize,
    ctx: usize,
    chunk_keys: usize,
    z: usize,
    iters: u32,
) -> Result<Row, ExecError> {
    // As the backend launches it: more warps per row at small batch.
    let warps = AttentionKernel::Simt.warps(batch, 16);
    let secs = attention_launch(
        e,
        "attention_decode",
        batch,
        ctx,
        None,
        chunk_keys,
        z,
        warps,
        iters,
    )?;
    let mut name = format!("attention_decode batch {batch}, ctx {ctx}");
    if chunk_keys != ATTENTION_CHUNK_KEYS {
        name += &format!(", chunks of {chunk_keys}");
    }
    if z > 1 {
        name += &format!(", {z} blocks per row");
    }
    Ok(Row {
        name,
        secs,
        bytes: (batch * ctx * 192 * 2 * 2) as f64,
        in_step: None,
    })
}

/// Attention over one layer with SmolLM2's heads on the kernels that take a packed batch
/// (`attention_prefill`, `attention_tc`): `prompt` = `Some(n)`: one sequence's prompt of n
/// tokens, all its rows in one launch (a prefill); `None`: `batch` sequences decoding at
/// `ctx` keys each, one block per row and KV head. Bytes: the keys and values once.
pub fn attention_packed<E: Exec>(
    e: &E,
    kernel: AttentionKernel,
    batch: usize,
    ctx: usize,
    prompt: Option<usize>,
    iters: u32,
) -> Result<Row, ExecError> {
    let (rows, seqs) = match prompt {
        Some(n) => (n, 1),
        None => (batch, batch),
    };
    let warps = kernel.warps(rows, 16);
    let entry = kernel.entry();
    let chunk_keys = ATTENTION_CHUNK_KEYS;
    let secs = attention_launch(e, entry, batch, ctx, prompt, chunk_keys, 1, warps, iters)?;
    let name = match prompt {
        Some(n) => format!("{entry} prefill, prompt {n}"),
        None => format!("{entry} batch {batch}, ctx {ctx}"),
    };
    Ok(Row {
        name,
        secs,
        bytes: (seqs * ctx * 192 * 2 * 2) as f64,
        in_step: None,
    })
}

/// Seconds per launch of attention kernel `entry` over one layer with SmolLM2's heads,
/// with `warps` warps per block and each row's chunks over `z` blocks: `prompt` = `Some(n)`:
/// one sequence's n-token prompt; `None`: `batch` sequences decoding at `ctx` keys each.
/// `attention_decode` takes no `seq_of_row` (row r is sequence r); the others do.
#[allow(clippy::too_many_arguments)]
fn attention_launch<E: Exec>(
    e: &E,
    entry: &str,
    batch: usize,
    ctx: usize,
    prompt: Option<usize>,
    chunk_keys: usize,
    z: usize,
    warps: usize,
    iters: u32,
) -> Result<f64, ExecError> {
    let (nh, nkv, hd, bs) = (9usize, 3usize, 64usize, 16usize);
    let per = ctx.div_ceil(bs);
    let chunks = (per * bs).div_ceil(chunk_keys);
    let (seq_of_row, positions): (Vec<i32>, Vec<u32>) = match prompt {
        Some(n) => (vec![0; n], (0..n as u32).collect()),
        None => ((0..batch as i32).collect(), vec![(ctx - 1) as u32; batch]),
    };
    let seqs = if prompt.is_some() { 1 } else { batch };
    let (rows, blocks) = (positions.len(), seqs * per);
    let kc = e.zeros::<f16>(blocks * bs * 192)?;
    let vc = e.zeros::<f16>(blocks * bs * 192)?;
    let tb = e.upload(&(0..blocks as i32).collect::<Vec<_>>())?;
    let sr = e.upload(&seq_of_row)?;
    let pos = e.upload(&positions)?;
    let q = e.zeros::<f32>(rows * 576)?;
    let out = e.zeros::<f16>(rows * 576)?;
    // Partial states for rows whose chunks are split (decode rows; a prompt's keep z = 1).
    let part_rows = if prompt.is_some() { 0 } else { rows };
    let part = e.zeros::<f32>((part_rows * chunks * 576 * 3).max(3))?;
    let arrive = e.zeros::<i32>(rows * nkv)?;
    let mut args = vec![q.arg(), i(576), kc.arg(), vc.arg(), tb.arg()];
    if entry != "attention_decode" {
        args.push(sr.arg());
    }
    args.extend([
        pos.arg(),
        out.arg(),
        i(per),
        i(nh),
        i(nkv),
        i(hd),
        i(bs),
        Arg::F32(0.125),
        part.arg(),
        arrive.arg(),
        i(part_rows),
        i(chunks),
    ]);
    let c = LaunchConfig {
        grid_dim: (rows as u32, nkv as u32, z as u32),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    time_launch(e, iters, entry, c, &args)
}

/// Every benchmark at `sizes`, each launched `iters` times, on `e` (which must have the
/// kernels built for SmolLM2's attention shape: 9 query heads over 3 KV heads of 64).
/// Besides the large sizes, the kernels of a decode step are timed at each decode batch
/// (their rows carry `in_step`; [`step_sums`] adds them up).
pub fn run<E: Exec>(e: &E, sizes: &Sizes, iters: u32) -> Result<Vec<Row>, ExecError> {
    let mut rows = Vec::new();
    let t = sizes.rows;
    rows.push(norm(e, t, iters, None)?);
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

    // The products at decode batch sizes: the weights read once is the floor.
    for &(name, k, n, in_step) in &sizes.products {
        let w = e.zeros::<f16>(n * k)?;
        // The same weights in the file's 4- and 8-bit blocks (`gemv_q4`, `gemv_q8`), and
        // in the K-quant layouts' both ways (factored scales, as the backend holds them:
        // `gemv_q4f`, `gemv_q8f`; a scale per 16: `gemv_q8h`; as f32 pairs, more bytes:
        // `gemv_q4f32`, `gemv_q8f32`, `gemv_q8h32`), and IQ4's levels from 4-bit indices
        // (`gemv_iq4`, IQ4_NL's; `gemv_iq4f`, IQ4_XS's), and 5-bit integers (`gemv_q5`,
        // Q5_1's; `gemv_q5f`, Q5_K's), and Q6_K's at 6 bits (`gemv_q6h`, against its 8-bit
        // form `gemv_q8h`); a product of the QKV's width also as Q4_K_M's stack of two as
        // the backend holds it (Q4_K Q and K, Q6_K V at 6 bits, factored: a launch each).
        // Where the offsets are the kernels' centres' (Q4_0, Q5_0, Q8_0, IQ4_NL), the file
        // blocks' scales alone too (`gemv_q4s`, `gemv_q5s`, `gemv_q8s`, `gemv_iq4s`); Q3_K's
        // 4-bit integers under their scales per 16 (`gemv_q4h`); Q2_K's 2-bit ones under
        // their scales and offsets per 16 (`gemv_q2h`).
        use gemv::Scales::{
            F16Pairs, F16Scales, F32Halves, F32Pairs, Factored, FactoredHalfPairs, FactoredHalves,
        };
        // The layout pads the rows to a tile of 16.
        let part = |bits: u32, scales: gemv::Scales, iq4: bool, rows: usize| {
            let padded = rows.next_multiple_of(16);
            Ok::<_, ExecError>(gemv::QuantBuf {
                q: e.zeros::<u32>(padded * k * bits as usize / 32)?,
                s: e.zeros::<u32>(padded / 16 * scales.group_words(k / 32))?,
                bits,
                scales,
                iq4,
                rows,
                k,
            })
        };
        let mut quant = [
            (4u32, F16Pairs, false),
            (8, F16Pairs, false),
            (4, Factored, false),
            (8, Factored, false),
            (8, FactoredHalves, false),
            (4, F32Pairs, false),
            (8, F32Pairs, false),
            (8, F32Halves, false),
            (4, F16Pairs, true),
            (4, Factored, true),
            (5, F16Pairs, false),
            (5, Factored, false),
            (6, FactoredHalves, false),
            (4, F16Scales, false),
            (5, F16Scales, false),
            (8, F16Scales, false),
            (4, F16Scales, true),
            (4, FactoredHalves, false),
            (2, FactoredHalfPairs, false),
        ]
        .into_iter()
        .map(|(bits, scales, iq4)| Ok(vec![part(bits, scales, iq4, n)?]))
        .collect::<Result<Vec<_>, ExecError>>()?;
        let (nh, nkv, hd) = sizes.qkv_heads;
        if n == (nh + 2 * nkv) * hd {
            quant.push(vec![
                part(4, Factored, false, n - nkv * hd)?,
                part(6, FactoredHalves, false, nkv * hd)?,
            ]);
        }
        let times = match in_step {
            InStep::PerLayer => Some(sizes.layers),
            InStep::Once => Some(1),
            InStep::No => None,
        };
        for &m in &sizes.product_rows {
            let x = e.zeros::<f16>(m * k)?;
            let mut y = e.zeros::<f32>(m * n)?;
            let bytes = (n * k * 2 + m * k * 2 + m * n * 4) as f64;
            let secs = time(e, iters, || e.gemm(&x, &w, 0, &mut y, m, k, n))?;
            rows.push(Row {
                name: format!("gemm {name} {m}×{k}·{k}×{n}"),
                secs,
                bytes,
                in_step: times.filter(|_| sizes.decode.contains(&m)).map(|t| (m, t)),
            });
            // Our own kernel for a few rows, against cuBLAS's row above (in runs of the
            // columns where the rows are too wide to stage whole), then with the kernel
            // before it made in its blocks (and after it, for the QKV product; in runs too).
            let max_shared = e.max_shared_bytes()?;
            if gemv::column_run(m, k, max_shared, gemv::Staged::MOST).is_some() {
                let secs = time(e, iters, || gemv::gemv(e, &x, &w, 0, &mut y, m, k, n))?;
                rows.push(Row {
                    name: format!("gemv_f16 {name} {m}×{k}·{k}×{n}"),
                    secs,
                    bytes,
                    in_step: None,
                });
                // The candidate over the file's blocks: fewer bytes for the same product.
                for wq in &quant {
                    let secs = time(e, iters, || {
                        let (x, w) = (gemv::Input::Rows(&x), gemv::Weights::Quant(wq));
                        gemv::gemv_from(e, x, w, &mut y, m, k, n)
                    })?;
                    let weights: usize = wq.iter().map(gemv::QuantBuf::bytes).sum();
                    let kinds: Vec<&str> = wq.iter().map(|p| p.kind().unwrap_or("?")).collect();
                    rows.push(Row {
                        name: format!("gemv_{} {name} {m}×{k}·{k}×{n}", kinds.join("+")),
                        secs,
                        bytes: (weights + m * k * 2 + m * n * 4) as f64,
                        in_step: None,
                    });
                }
                rows.extend(fused_products(
                    e,
                    (name, k, n),
                    m,
                    sizes.qkv_heads,
                    &w,
                    iters,
                )?);
            }
        }
    }
    Ok(rows)
}
