//! Attention's benchmarks: paged decode attention split as the step launches it, and
//! both kernels (SIMT, tensor cores) over packed rows and a long prompt.

use super::{i, time_launch, Row};
use crate::cuda::device::{attention_splits, ATTENTION_CHUNK_KEYS};
use crate::cuda::exec::{Arg, DevBuf, Exec, ExecError};
use crate::cuda::step::AttentionKernel;
use cudarc::driver::LaunchConfig;
use half::f16;

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
        i(0),
        Arg::F32(0.0),
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
