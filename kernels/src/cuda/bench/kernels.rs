//! The memory-bound kernels' benchmarks (add_rmsnorm, head_rmsnorm, rope_kv_write, swiglu,
//! moe_gemv) and the sampling kernel's (greedy, and with top-k and top-p cuts).

use super::{cfg, i, time, time_launch, Row};
use crate::cuda::exec::{Arg, DevBuf, Exec, ExecError};
use cudarc::driver::LaunchConfig;
use half::f16;

/// add_rmsnorm over `t` rows of 576 (read x, delta; write x, out f16).
pub(super) fn norm<E: Exec>(
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
    let secs = time_launch(e, iters, "add_rmsnorm", crate::cuda::norm_launch(t), &args)?;
    Ok(Row {
        name: format!("add_rmsnorm {t}×{d}"),
        secs,
        bytes: (t * d) as f64 * (4.0 + 4.0 + 4.0 + 2.0),
        in_step,
    })
}

/// head_rmsnorm over `t` rows of Qwen3-0.6B's QKV (16 q + 8 k + 8 v heads of 128): each q
/// and k head read and written in place (f32); the v heads not touched.
pub(super) fn head_norm<E: Exec>(e: &E, t: usize, iters: u32) -> Result<Row, ExecError> {
    let (nh, nkv, hd) = (16usize, 8usize, 128usize);
    let width = (nh + 2 * nkv) * hd;
    let qkv = e.zeros::<f32>(t * width)?;
    let (qw, kw) = (e.zeros::<f32>(hd)?, e.zeros::<f32>(hd)?);
    let args = [
        qkv.arg(),
        i(width),
        i(t),
        i(nh),
        i(nkv),
        i(hd),
        qw.arg(),
        kw.arg(),
        Arg::F32(1e-6),
    ];
    let launch = crate::cuda::norm_launch(t * (nh + nkv));
    let secs = time_launch(e, iters, "head_rmsnorm", launch, &args)?;
    Ok(Row {
        name: format!("head_rmsnorm {t} rows"),
        secs,
        bytes: (t * (nh + nkv) * hd) as f64 * 8.0,
        in_step: None,
    })
}

/// rope_kv_write over `t` rows of SmolLM2's QKV (9 q + 3 k + 3 v heads of 64): q and k
/// rotated in place (read + write), k and v written to the cache in f16.
pub(super) fn rope<E: Exec>(
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
    let inv_freq = e.upload(&crate::ops::rope_inv_freq(hd, 100_000.0))?;
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
        inv_freq.arg(),
        i(hd / 2),
        Arg::F32(1.0),
        Arg::Null,
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

/// How the experts' timed product holds them ([`moe_gemv`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoeForm {
    /// f16 rows, `moe_gemv`.
    F16,
    /// Q8_0's values, `moe_gemv_q8`.
    Q8,
    /// Q4_K's blocks (integers under factored scales), the tensor cores' `moe_tc_q4f`.
    Q4K,
}

/// The experts' product over a mixture's gate|up rows (`(experts, used, dim, ffn)`) for a
/// decode step of `batch` rows, each row's `used` experts drawn at random (a fixed seed),
/// the experts held as `form` says: the experts chosen read once (f16; bytes and a scale
/// per 32; Q4_K's 4.5 bits a weight as laid out, tiles and scales), the rows' inputs once
/// per block (counted once), the outputs written (f32).
pub(super) fn moe_gemv<E: Exec>(
    e: &E,
    (ne, k, d, f): (usize, usize, usize, usize),
    batch: usize,
    form: MoeForm,
    iters: u32,
) -> Result<Row, ExecError> {
    use crate::cuda::gemv::{expert_products, ExpertBuf, ExpertInput, QuantBuf, Routing, Scales};
    // Each row's k distinct experts from an xorshift stream.
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ batch as u64;
    let mut expert = Vec::with_capacity(batch * k);
    for _ in 0..batch {
        let mut row: Vec<i32> = Vec::with_capacity(k);
        while row.len() < k {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let x = (state % ne as u64) as i32;
            if !row.contains(&x) {
                row.push(x);
            }
        }
        expert.extend(row);
    }
    let places = crate::cuda::twins::moe_sort(&expert, ne);
    let hit = places.offsets.windows(2).filter(|w| w[1] > w[0]).count();
    let (order, offsets, active) = (
        e.upload(&places.order)?,
        e.upload(&places.offsets)?,
        e.upload(&places.active)?,
    );
    let x = e.zeros::<f16>(batch * d)?;
    let mut y = e.zeros::<f32>(batch * k * 2 * f)?;
    let weights = ne * 2 * f * d;
    let routing = Routing {
        order: &order,
        offsets: &offsets,
        active: &active,
        rows: batch,
        used: k,
    };
    let (kernel, per, secs) = match form {
        MoeForm::F16 | MoeForm::Q8 => {
            let q8 = form == MoeForm::Q8;
            let (w16, wq, ws) = match q8 {
                false => (Some(e.zeros::<f16>(weights)?), None, None),
                true => (
                    None,
                    Some(e.zeros::<u8>(weights)?),
                    Some(e.zeros::<f16>(weights / 32)?),
                ),
            };
            let mut args = vec![x.arg(), order.arg(), offsets.arg(), active.arg(), i(k)];
            args.extend(w16.iter().map(|w| w.arg()));
            args.extend(wq.iter().map(|w| w.arg()));
            args.extend(ws.iter().map(|w| w.arg()));
            args.extend([y.arg(), i(d), i(2 * f)]);
            let c = LaunchConfig {
                grid_dim: ((2 * f as u32).div_ceil(8), routing.slots(ne) as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let kernel = if q8 { "moe_gemv_q8" } else { "moe_gemv" };
            // Bytes a weight: 2 in f16; 1 and a 2-byte scale per 32 as Q8_0's values.
            let per = if q8 { 1.0 + 2.0 / 32.0 } else { 2.0 };
            (kernel, per, time_launch(e, iters, kernel, c, &args)?)
        }
        MoeForm::Q4K => {
            // One expert's tiles (4 bits a weight) and factored scales.
            let rows = 2 * f;
            let q_stride = rows.next_multiple_of(16) * d / 8;
            let s_stride = rows.div_ceil(16) * Scales::Factored.group_words(d / 32);
            let blocks = ExpertBuf {
                blocks: QuantBuf {
                    q: e.zeros::<u32>(ne * q_stride)?,
                    s: e.zeros::<u32>(ne * s_stride)?,
                    bits: 4,
                    scales: Scales::Factored,
                    iq4: false,
                    rows,
                    k: d,
                },
                q_stride,
                s_stride,
                count: ne,
            };
            let per = 4.0 * (q_stride + s_stride) as f64 / (rows * d) as f64;
            let parts = [blocks];
            let run = || {
                let input = ExpertInput::Rows { x: &x, gather: k };
                expert_products(e, input, &parts, &routing, &mut y, d, rows)
            };
            ("moe_tc_q4f", per, time(e, iters, run)?)
        }
    };
    let bytes = (hit * 2 * f * d) as f64 * per + (batch * d * 2 + batch * k * 2 * f * 4) as f64;
    Ok(Row {
        name: format!("{kernel} gate|up, {batch} rows ({hit} of {ne} experts)"),
        secs,
        bytes,
        in_step: None,
    })
}

/// swiglu over `t` rows of SmolLM2's gate|up product (read 2 × 1536 f32, write 1536 f16).
pub(super) fn swiglu<E: Exec>(
    e: &E,
    t: usize,
    iters: u32,
    in_step: Option<(usize, usize)>,
) -> Result<Row, ExecError> {
    let ffn = 1536usize;
    let gu = e.zeros::<f32>(t * 2 * ffn)?;
    let g = e.zeros::<f16>(t * ffn)?;
    let args = [gu.arg(), g.arg(), i(t), i(ffn)];
    let secs = time_launch(
        e,
        iters,
        "swiglu",
        crate::cuda::swiglu_launch(t, ffn),
        &args,
    )?;
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
pub(super) fn sample<E: Exec>(
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
        repeat: None,
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
        let mv = e.upload(&vec![0.0f32; n_rows])?;
        let args = [
            lg.arg(),
            adjusted.arg(),
            i(vocab),
            tv.arg(),
            kv.arg(),
            pv.arg(),
            mv.arg(),
            seeds.arg(),
            steps.arg(),
            if *masked { all.arg() } else { none.arg() },
            extra.arg(),
            inputs.arg(),
            logit_rows.arg(),
            out.arg(),
        ];
        let c = cfg(
            (n_rows as u32, 1),
            crate::cuda::twins::SAMPLE_THREADS as u32,
        );
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
        let c = cfg(
            (n_rows as u32, 1),
            crate::cuda::twins::SAMPLE_THREADS as u32,
        );
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
