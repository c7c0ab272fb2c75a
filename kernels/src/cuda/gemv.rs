//! The `gemv_f16` kernels' launches (`kernels/cuda/gemv.cu`): the step's product for a few
//! rows, a candidate against cuBLAS at decode batch 1–8: the backend times whole decode
//! steps both ways at load and keeps the faster (`step::SmallProducts`). The product's
//! input is f16 rows ([`Input::Rows`]), or is made in the product's own blocks by the
//! kernel that would otherwise run before it ([`Input::Norm`], [`Input::Swiglu`]): one
//! launch instead of two, with the same bits. The QKV product can also do `rope_kv_write`'s
//! work in its epilogue ([`gemv_rope`]).

use super::exec::{check_gemm, Arg, DevBuf, Exec, ExecError};
use cudarc::driver::LaunchConfig;
use half::f16;

/// The kernel's limits (`GEMV_MAX_ROWS`, `GEMV_MAX_K`, `GEMV_MAX_ELEMS` in gemv.cu): the
/// staged rows fill at most 48 KB of shared memory.
pub const MAX_ROWS: usize = 8;
pub const MAX_K: usize = 2048;
pub const MAX_ELEMS: usize = 12288;

/// Whether `gemv_f16` takes a product of `rows` rows over `k` (16-byte weight rows).
pub fn fits(rows: usize, k: usize) -> bool {
    (1..=MAX_ROWS).contains(&rows) && k <= MAX_K && rows * k <= MAX_ELEMS && k.is_multiple_of(8)
}

/// What a product's rows are made from.
pub enum Input<'a, E: Exec> {
    /// f16 rows, `rows × k` (`gemv_f16`).
    Rows(&'a E::Buf<f16>),
    /// `add_rmsnorm`'s output, made in the product (`gemv_f16_norm`): row i normalizes
    /// row `rows[i]` of `x` (row i when `rows` is `None`; a negative entry gives zeros)
    /// plus the same row of `delta`, scaled by `weight`; the sums are written to `x_out`
    /// when given (another buffer than `x`, as its `&mut` makes sure: the product's other
    /// blocks still read `x`).
    Norm {
        x: &'a E::Buf<f32>,
        delta: Option<&'a E::Buf<f32>>,
        weight: &'a E::Buf<f32>,
        x_out: Option<&'a mut E::Buf<f32>>,
        rows: Option<&'a E::Buf<i32>>,
        eps: f32,
    },
    /// `swiglu`'s output over rows of `2k` (gate, then up), made in the product
    /// (`gemv_f16_swiglu`).
    Swiglu(&'a E::Buf<f32>),
}

/// `y[rows × n] = x[rows × k] · w[n × k]ᵀ` with `w` starting `w_row0` rows in, as
/// [`Exec::gemm`], by `gemv_f16`: 8 warps per block, one output column per warp at a time.
#[allow(clippy::too_many_arguments)]
pub fn gemv<E: Exec>(
    e: &E,
    x: &E::Buf<f16>,
    w: &E::Buf<f16>,
    w_row0: usize,
    y: &mut E::Buf<f32>,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<(), ExecError> {
    gemv_from(e, Input::Rows(x), w, w_row0, y, rows, k, n)
}

/// `y[rows × n] = input · w[n × k]ᵀ` with `w` starting `w_row0` rows in: [`gemv`] over
/// rows that [`Input`] says how to make.
#[allow(clippy::too_many_arguments)]
pub fn gemv_from<E: Exec>(
    e: &E,
    input: Input<'_, E>,
    w: &E::Buf<f16>,
    w_row0: usize,
    y: &mut E::Buf<f32>,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<(), ExecError> {
    product(e, input, None, w, w_row0, y, rows, k, n)
}

/// `rope_kv_write`'s work, done in the QKV product's epilogue (`gemv_f16_norm_rope`):
/// output row i is rotated at `positions[i]`, and its keys and values go to the caches at
/// `slots[i]` (one layer's, `[block][kv head][slot][head_dim]`).
pub struct RopeKv<'a, E: Exec> {
    pub positions: &'a E::Buf<u32>,
    pub slots: &'a E::Buf<i32>,
    pub k_cache: &'a mut E::Buf<f16>,
    pub v_cache: &'a mut E::Buf<f16>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub base: f32,
}

/// The QKV product of normalized rows (`input` must be [`Input::Norm`]) into `qkv`
/// (`rows × (n_heads + 2 · n_kv_heads) · head_dim`), with RoPE and the KV-cache write in
/// its epilogue: one launch for `add_rmsnorm`, the product and `rope_kv_write`, with
/// their bits.
pub fn gemv_rope<E: Exec>(
    e: &E,
    input: Input<'_, E>,
    w: &E::Buf<f16>,
    qkv: &mut E::Buf<f32>,
    rows: usize,
    k: usize,
    rope: RopeKv<'_, E>,
) -> Result<(), ExecError> {
    let n = (rope.n_heads + 2 * rope.n_kv_heads) * rope.head_dim;
    product(e, input, Some(rope), w, 0, qkv, rows, k, n)
}

#[allow(clippy::too_many_arguments)]
fn product<E: Exec>(
    e: &E,
    input: Input<'_, E>,
    rope: Option<RopeKv<'_, E>>,
    w: &E::Buf<f16>,
    w_row0: usize,
    y: &mut E::Buf<f32>,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<(), ExecError> {
    if !fits(rows, k) {
        return Err(ExecError::Bounds(format!(
            "gemv_f16 takes 1 to {MAX_ROWS} rows, k a multiple of 8 up to {MAX_K} and at \
             most {MAX_ELEMS} inputs, not {rows} rows of {k}"
        )));
    }
    let short = |what: &str, have: usize, need: usize| {
        if have < need {
            Err(ExecError::Bounds(format!(
                "gemv_f16 of {rows}×{k}: {what} holds {have} elements, not {need}"
            )))
        } else {
            Ok(())
        }
    };
    // RoPE goes into the epilogue of the product of normalized rows only.
    if let Some(r) = &rope {
        if !matches!(input, Input::Norm { .. }) || r.head_dim % 2 != 0 {
            return Err(ExecError::Bounds(format!(
                "RoPE fuses into the product of normalized rows of even heads, not this \
                 input with heads of {}",
                r.head_dim
            )));
        }
    }
    // The input's check and its arguments ahead of the product's own.
    let (entry, mut args) = match input {
        Input::Rows(x) => {
            short("x", x.elems(), rows * k)?;
            ("gemv_f16", vec![x.arg()])
        }
        Input::Norm {
            x,
            delta,
            weight,
            x_out,
            rows: at,
            eps,
        } => {
            // Rows picked by `at` may be any of x's; without it, the first `rows`.
            let need = if at.is_some() { k } else { rows * k };
            short("x", x.elems(), need)?;
            short("the norm's weight", weight.elems(), k)?;
            if let Some(d) = delta {
                short("delta", d.elems(), x.elems())?;
            }
            if let Some(o) = &x_out {
                short("x_out", o.elems(), x.elems())?;
            }
            if let Some(r) = at {
                short("rows", r.elems(), rows)?;
            }
            let opt = |b: Option<Arg>| b.unwrap_or(Arg::Null);
            (
                "gemv_f16_norm",
                vec![
                    x.arg(),
                    opt(delta.map(|d| d.arg())),
                    weight.arg(),
                    opt(x_out.map(|o| o.arg())),
                    opt(at.map(|r| r.arg())),
                    Arg::F32(eps),
                ],
            )
        }
        Input::Swiglu(gu) => {
            short("gate|up", gu.elems(), rows * 2 * k)?;
            ("gemv_f16_swiglu", vec![gu.arg()])
        }
    };
    check_gemm((rows * k, w.elems(), y.elems()), w_row0, rows, k, n)?;
    args.extend([
        w.arg_at(w_row0 * k..(w_row0 + n) * k)?,
        y.arg(),
        Arg::I32(rows as i32),
        Arg::I32(k as i32),
        Arg::I32(n as i32),
    ]);
    // Columns a warp takes at a time: a rotation pair with RoPE, else one.
    let mut cols = 1u32;
    let entry = match rope {
        None => entry,
        Some(r) => {
            short("positions", r.positions.elems(), rows)?;
            short("slots", r.slots.elems(), rows)?;
            let kvd = r.n_kv_heads * r.head_dim;
            short("the key cache", r.k_cache.elems(), kvd)?;
            short("the value cache", r.v_cache.elems(), kvd)?;
            let i = |v: usize| Arg::I32(v as i32);
            args.extend([
                r.positions.arg(),
                r.slots.arg(),
                r.k_cache.arg(),
                r.v_cache.arg(),
                i(r.n_heads),
                i(r.n_kv_heads),
                i(r.head_dim),
                i(r.block_size),
                Arg::F32(r.base),
            ]);
            cols = 2;
            "gemv_f16_norm_rope"
        }
    };
    let warps = 8u32;
    let cfg = LaunchConfig {
        grid_dim: ((n as u32 / cols).div_ceil(warps).clamp(1, 4096), 1, 1),
        block_dim: (32 * warps, 1, 1),
        shared_mem_bytes: 0,
    };
    e.launch(entry, cfg, &args)
}
