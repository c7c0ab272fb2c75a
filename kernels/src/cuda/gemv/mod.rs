//! The `gemv` kernels' launches (`kernels/cuda/gemv.cu`, `gemv*.cuh`): the step's product for a
//! few rows, a candidate against cuBLAS at decode batch 1–16: the backend times whole decode
//! steps each way at load and keeps the fastest (`step::SmallProducts`). The product's input is
//! f16 rows ([`Input::Rows`]), or is made in the product's own blocks by the kernel that would
//! otherwise run before it ([`Input::Norm`], [`Input::Swiglu`]): one launch instead of two,
//! with the same bits. The QKV product can also do `rope_kv_write`'s work in its epilogue
//! ([`gemv_rope`]). The weights are f16 rows (`gemv_f16*`), or the file's own blocks
//! ([`Weights::Quant`], laid out by [`QuantRows`]: `gemv_q4*`, `gemv_q8*` for Q4_0, Q4_1, Q8_0
//! and the 8-bit layouts of the same values; `gemv_q5*` for 5-bit integers, `gemv_iq4*` for
//! IQ4's levels; under their scales alone where the offsets are none, `gemv_q4s*`, `gemv_q5s*`,
//! `gemv_q8s*`, `gemv_iq4s*`; under factored scales, staged in shared memory, `gemv_q4f*`,
//! `gemv_q5f*`, `gemv_q8f*`, `gemv_q8h*`, `gemv_iq4f*` for the K-quants', `gemv_q6h*` for
//! Q6_K's integers at 6 bits, `gemv_q4h*` for Q3_K's at 4, `gemv_q2h*` for Q2_K's at 2 with
//! their offsets per 16 ([`QuantRows::from_offsets`]), or f32 ones, `gemv_q4f32*`, ...), a
//! fifth to a half of the bytes to read; a stack whose parts are of different layouts (Q4_K_M's
//! QKV, its V rows Q6_K) is a launch a part, each writing its columns ([`QuantRows::stack`]).
//! Either way the products run on tensor cores (`mma.m16n8k16`, 16 columns by 8 rows, twice
//! past 8), a block of 8 warps per group of 16 columns at a time, as many blocks as the SMs
//! hold, with the input rows staged in shared memory: rows too wide for it are read in runs of
//! their columns, a launch a run adding its sums ([`column_run`]).
//!
//! This file owns the launches and their sizes; the quantized weights' layout is
//! `layout.rs` (where each weight and scale lies), built by `convert.rs` from a file's
//! blocks or a packed matrix, its scales factored exactly by `factor.rs`; a mixture's
//! experts' products on the same kernels' product are `experts.rs`.

use super::exec::{check_gemm, Arg, DevBuf, Exec, ExecError};
use cudarc::driver::LaunchConfig;
use half::f16;

mod convert;
mod experts;
mod factor;
mod layout;
#[cfg(test)]
mod tests;

pub use experts::{expert_products, readable, ExpertBuf, ExpertInput, Routing};
pub use layout::{QuantRows, Scales};

/// The most rows a product takes (`GEMV_MAX_ROWS` in gemv.cuh: two `mma`s of 8 columns).
pub const MAX_ROWS: usize = 16;
/// Columns an `mma` takes (a group), and weights a block of the inner dimension.
const GROUP: usize = 16;
const BLOCK: usize = 32;
/// Warps a block of the kernels, and the blocks an SM holds (`__launch_bounds__`).
const WARPS: u32 = 8;
const BLOCKS_PER_SM: usize = 3;

/// What a `gemv` kernel stages in shared memory beside its input rows, by how much it
/// takes ([`shared_bytes`]; [`Scales::staged`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Staged {
    /// The rows' sums over each block of 32 (f16 rows; scales the tiles carry).
    Sums,
    /// And a column group's factored scales ([`Scales::Factored`], ...), 16 bytes a
    /// block of 32 and pair of columns.
    Scales,
    /// The rows' sums over each 16, and twice the scales: a scale and an offset a half
    /// ([`Scales::FactoredHalfPairs`], `gemv_q2h`).
    HalfPairs,
}

impl Staged {
    /// The most any kernel stages: what fits it fits every kernel.
    pub const MOST: Staged = Staged::HalfPairs;
}

/// The dynamic shared memory a block of the `gemv` kernels takes for `rows` rows of `k`
/// (`gemv_shared` in gemv.cuh): the 8 warps' sums, the rows staged as f16 (`k` halves
/// apart, `k + 32` where `k` is a multiple of 64), their sums over each block of 32 (each
/// 16 with [`Staged::HalfPairs`]), and with staged scales (factored: [`Scales::staged`])
/// a column group's, 16 bytes a block of 32 and pair of columns (32 a half's pairs).
pub fn shared_bytes(rows: usize, k: usize, staged: Staged) -> usize {
    let stride = if k.is_multiple_of(64) { k + 32 } else { k };
    let per16 = if staged == Staged::HalfPairs { 2 } else { 1 };
    let scales = if staged == Staged::Sums {
        0
    } else {
        k / BLOCK * 8 * 16 * per16
    };
    WARPS as usize * 8 * 32 * 4
        + rows * stride * 2
        + (rows * (k / BLOCK) * 4 * per16).next_multiple_of(16)
        + scales
}

/// Whether the `gemv` kernels take a product of `rows` rows over `k` (blocks of 32) on a
/// device whose blocks may have `max_shared` bytes of shared memory
/// ([`Exec::max_shared_bytes`]), in one launch: its rows staged whole (and, `staged`,
/// factored scales).
pub fn fits(rows: usize, k: usize, max_shared: usize, staged: Staged) -> bool {
    column_run(rows, k, max_shared, staged) == Some(k)
}

/// The most launches a product over rows too wide for the shared memory takes.
pub const MAX_RUNS: usize = 8;

/// How many of the rows' `k` columns a launch of a product of `rows` rows takes: `k`
/// where the staged rows fit in `max_shared` bytes, else the fewest equal runs (whole
/// blocks of 32, at most [`MAX_RUNS`]) that fit, each a launch adding its sums to the
/// last's (e.g. Llama-3-8B's `ffn_down`, 14,336 wide, at 8–16 rows on Hopper's 227 KB);
/// `None` where no run does, or `rows`, `k` are no product the kernels take. `staged`:
/// what the kernel stages beside the rows ([`Staged::MOST`]: what fits it fits all).
pub fn column_run(rows: usize, k: usize, max_shared: usize, staged: Staged) -> Option<usize> {
    if !(1..=MAX_ROWS).contains(&rows) || k == 0 || !k.is_multiple_of(BLOCK) {
        return None;
    }
    (1..=MAX_RUNS)
        .map(|runs| (k / BLOCK).div_ceil(runs) * BLOCK)
        .find(|&run| shared_bytes(rows, run, staged) <= max_shared)
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

/// A matrix's weights as a product of few rows reads them.
pub enum Weights<'a, E: Exec> {
    /// f16 rows (`gemv_f16*`), starting this many rows in.
    F16(&'a E::Buf<f16>, usize),
    /// The file's own blocks (`gemv_q4*`, `gemv_q8*`, ...): one matrix's, or a stack's
    /// parts of different layouts one after the other in its rows ([`QuantRows::stack`]),
    /// one launch a part, each writing its columns of the output rows.
    Quant(&'a [QuantBuf<E>]),
}

// References only: copied whatever E is (a derive would ask E: Copy).
impl<E: Exec> Clone for Weights<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E: Exec> Copy for Weights<'_, E> {}

impl<E: Exec> Weights<'_, E> {
    /// The entry points' weights part for each launch: `f16`, `q4`, `q8`, with factored
    /// scales `q4f`, `q8f` or (a scale per 16) `q8h`, `q6h`, with f32 ones `q4f32`,
    /// `q8f32`, `q8h32` (and `q5`, `q5f`, `iq4`, `iq4f`); refused for a layout no kernel
    /// reads, or no part at all.
    fn kinds(&self) -> Result<Vec<&'static str>, ExecError> {
        match self {
            Weights::F16(..) => Ok(vec!["f16"]),
            Weights::Quant([]) => Err(ExecError::Bounds("gemv over no blocks".into())),
            Weights::Quant(parts) => parts
                .iter()
                .map(|q| {
                    q.kind().ok_or_else(|| {
                        ExecError::Bounds(format!(
                            "no gemv kernel reads quantized rows of {} bits under {:?}",
                            q.bits, q.scales
                        ))
                    })
                })
                .collect(),
        }
    }

    /// What a kernel of these weights stages in shared memory (the most of a stack's
    /// parts').
    pub fn staged(&self) -> Staged {
        match self {
            Weights::F16(..) => Staged::Sums,
            Weights::Quant(parts) => parts
                .iter()
                .map(|q| q.scales.staged())
                .max()
                .unwrap_or(Staged::Sums),
        }
    }
}

/// A [`QuantRows`] on a device.
pub struct QuantBuf<E: Exec> {
    pub q: E::Buf<u32>,
    pub s: E::Buf<u32>,
    /// 2, 4, 5, 6 or 8.
    pub bits: u32,
    pub scales: Scales,
    /// The 4-bit fields index IQ4's levels ([`QuantRows::iq4`]).
    pub iq4: bool,
    /// The matrix's rows (the layout pads them to a multiple of 16) and their length.
    pub rows: usize,
    pub k: usize,
}

/// The `gemv` entry points' weights part for a layout (`q4`, `q8`, `q4f`, ...: see
/// [`QuantBuf::kind`]); `None` for a layout no kernel reads.
pub fn kind_of(bits: u32, scales: Scales, iq4: bool) -> Option<&'static str> {
    if iq4 {
        return match (bits, scales) {
            (4, Scales::F16Pairs) => Some("iq4"),
            (4, Scales::F16Scales) => Some("iq4s"),
            (4, Scales::Factored) => Some("iq4f"),
            _ => None,
        };
    }
    Some(match (bits, scales) {
        (4, Scales::F16Pairs) => "q4",
        (4, Scales::F16Scales) => "q4s",
        (5, Scales::F16Scales) => "q5s",
        (8, Scales::F16Scales) => "q8s",
        (4, Scales::Factored) => "q4f",
        (5, Scales::F16Pairs) => "q5",
        (5, Scales::Factored) => "q5f",
        (6, Scales::FactoredHalves) => "q6h",
        (8, Scales::F16Pairs) => "q8",
        (8, Scales::Factored) => "q8f",
        (8, Scales::FactoredHalves) => "q8h",
        (4, Scales::FactoredHalves) => "q4h",
        (2, Scales::FactoredHalfPairs) => "q2h",
        (4, Scales::F32Pairs) => "q4f32",
        (8, Scales::F32Pairs) => "q8f32",
        (8, Scales::F32Halves) => "q8h32",
        _ => return None,
    })
}

impl<E: Exec> QuantBuf<E> {
    /// The entry points' weights part (`q4`, `q8`, `q4f`, `q8f`, `q8h`, `q6h`, `iq4`,
    /// `iq4f`, ...); `None` for a layout no kernel reads.
    pub fn kind(&self) -> Option<&'static str> {
        kind_of(self.bits, self.scales, self.iq4)
    }

    /// The bytes a product reads of them: the tiles and their scales.
    pub fn bytes(&self) -> usize {
        4 * (self.q.elems() + self.s.elems())
    }

    pub fn upload(e: &E, r: &QuantRows) -> Result<Self, ExecError> {
        Ok(Self {
            q: e.upload(&r.q)?,
            s: e.upload(&r.s)?,
            bits: r.bits,
            scales: r.scales,
            iq4: r.iq4,
            rows: r.rows,
            k: r.k,
        })
    }
}

/// `y[rows × n] = x[rows × k] · w[n × k]ᵀ` with `w` starting `w_row0` rows in, as
/// [`Exec::gemm`], by `gemv_f16`: on tensor cores, 16 columns a block of 8 warps at a time.
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
    product(
        e,
        Input::Rows(x),
        None,
        Weights::F16(w, w_row0),
        y,
        rows,
        k,
        n,
    )
}

/// `y[rows × n] = input · wᵀ` over `weights` (f16 rows, or the file's blocks): [`gemv`]
/// over rows that [`Input`] says how to make.
pub fn gemv_from<E: Exec>(
    e: &E,
    input: Input<'_, E>,
    weights: Weights<'_, E>,
    y: &mut E::Buf<f32>,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<(), ExecError> {
    product(e, input, None, weights, y, rows, k, n)
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

/// The QKV product of normalized rows (`input` must be [`Input::Norm`]) over `weights`
/// into `qkv` (`rows × (n_heads + 2 · n_kv_heads) · head_dim`), with RoPE and the KV-cache
/// write in its epilogue: one launch for `add_rmsnorm`, the product and `rope_kv_write`,
/// with their bits.
pub fn gemv_rope<E: Exec>(
    e: &E,
    input: Input<'_, E>,
    weights: Weights<'_, E>,
    qkv: &mut E::Buf<f32>,
    rows: usize,
    k: usize,
    rope: RopeKv<'_, E>,
) -> Result<(), ExecError> {
    let n = (rope.n_heads + 2 * rope.n_kv_heads) * rope.head_dim;
    product(e, input, Some(rope), weights, qkv, rows, k, n)
}

/// Refuses a buffer (`what`, of a launch `launch` names) that holds fewer elements than the
/// launch reads or writes.
fn holds(
    launch: impl Fn() -> String,
    what: &str,
    have: usize,
    need: usize,
) -> Result<(), ExecError> {
    if have < need {
        return Err(ExecError::Bounds(format!(
            "{}: {what} holds {have} elements, not {need}",
            launch()
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn product<E: Exec>(
    e: &E,
    input: Input<'_, E>,
    rope: Option<RopeKv<'_, E>>,
    weights: Weights<'_, E>,
    y: &mut E::Buf<f32>,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<(), ExecError> {
    let kinds = weights.kinds()?;
    let kind = kinds.join("+");
    let max_shared = e.max_shared_bytes()?;
    // One run for every part of a stack: what fits the largest.
    let staged = weights.staged();
    let Some(run) = column_run(rows, k, max_shared, staged) else {
        return Err(ExecError::Bounds(format!(
            "gemv_{kind} takes 1 to {MAX_ROWS} rows of k a multiple of {BLOCK} whose staging \
             fits in {max_shared} bytes of shared memory in at most {MAX_RUNS} runs of \
             columns, not {rows} rows of {k}"
        )));
    };
    let short = |what: &str, have: usize, need: usize| {
        holds(|| format!("gemv_{kind} of {rows}×{k}"), what, have, need)
    };
    // RoPE goes into the epilogue of the product of normalized rows only (of the last
    // run of columns: the sums whole).
    if let Some(r) = &rope {
        if !matches!(input, Input::Norm { .. }) || r.head_dim % 2 != 0 {
            return Err(ExecError::Bounds(format!(
                "RoPE fuses into the product of normalized rows of even heads, not this input \
                 with heads of {}",
                r.head_dim
            )));
        }
    }
    // The input's check and its arguments ahead of the product's own.
    let norm = matches!(input, Input::Norm { .. });
    let (form, args) = match input {
        Input::Rows(x) => {
            short("x", x.elems(), rows * k)?;
            ("", vec![x.arg()])
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
                "_norm",
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
            ("_swiglu", vec![gu.arg()])
        }
    };
    short("y", y.elems(), rows * n)?;
    let rope_args = match &rope {
        None => vec![],
        Some(r) => {
            short("positions", r.positions.elems(), rows)?;
            short("slots", r.slots.elems(), rows)?;
            let kvd = r.n_kv_heads * r.head_dim;
            short("the key cache", r.k_cache.elems(), kvd)?;
            short("the value cache", r.v_cache.elems(), kvd)?;
            let i = |v: usize| Arg::I32(v as i32);
            vec![
                r.positions.arg(),
                r.slots.arg(),
                r.k_cache.arg(),
                r.v_cache.arg(),
                i(r.n_heads),
                i(r.n_kv_heads),
                i(r.head_dim),
                i(r.block_size),
                Arg::F32(r.base),
            ]
        }
    };
    // A part's launches: its weights' arguments, columns j0 .. j0 + cols of y's n; a
    // launch a run of the rows' columns, the first writing the sums, the others adding
    // theirs in order; with RoPE, the last run's epilogue rotates (the runs before it are
    // the norm's plain product).
    let launch =
        |kind: &str, staged: Staged, weight_args: &[Arg], cols: usize, j0: usize, first: bool| {
            for k0 in (0..k).step_by(run) {
                let rotates = rope.is_some() && k0 + run >= k;
                let form = if rotates { "_norm_rope" } else { form };
                let mut a = args.clone();
                if norm && !(first && k0 == 0) {
                    // x + delta (x_out) is written once, by the first launch.
                    a[3] = Arg::Null;
                }
                a.extend_from_slice(weight_args);
                let i = |v: usize| Arg::I32(v as i32);
                let width = run.min(k - k0);
                a.extend([
                    y.arg(),
                    i(rows),
                    i(width),
                    i(cols),
                    i(n),
                    i(j0),
                    i(k0),
                    i(k),
                ]);
                if rotates {
                    a.extend_from_slice(&rope_args);
                }
                // A block a group of 16 columns, as many as the SMs hold at once (grid-stride
                // beyond).
                let blocks = cols
                    .div_ceil(GROUP)
                    .min(BLOCKS_PER_SM * e.multiprocessors()?)
                    .max(1);
                let cfg = LaunchConfig {
                    grid_dim: (blocks as u32, 1, 1),
                    block_dim: (32 * WARPS, 1, 1),
                    shared_mem_bytes: shared_bytes(rows, width, staged) as u32,
                };
                e.launch(&format!("gemv_{kind}{form}"), cfg, &a)?;
            }
            Ok(())
        };
    match weights {
        Weights::F16(w, w_row0) => {
            check_gemm((rows * k, w.elems(), y.elems()), w_row0, rows, k, n)?;
            let w = w.arg_at(w_row0 * k..(w_row0 + n) * k)?;
            launch("f16", Staged::Sums, &[w], n, 0, true)
        }
        Weights::Quant(parts) => {
            // A matrix's blocks may hold rows past n (its tiles' padding); a stack's parts
            // are its n rows, one after the other.
            let held: usize = parts.iter().map(|q| q.rows).sum();
            if parts.iter().any(|q| q.k != k)
                || (parts.len() == 1 && held < n)
                || (parts.len() > 1 && held != n)
            {
                let shapes: Vec<String> = parts
                    .iter()
                    .map(|q| format!("{}×{}", q.rows, q.k))
                    .collect();
                return Err(ExecError::Bounds(format!(
                    "gemv_{kind}: blocks of {}, not {n} rows of {k}",
                    shapes.join(" + ")
                )));
            }
            let mut j0 = 0;
            for (i, (q, kind)) in parts.iter().zip(&kinds).enumerate() {
                let cols = if parts.len() == 1 { n } else { q.rows };
                if rope.is_some() && j0 % 2 != 0 {
                    return Err(ExecError::Bounds(format!(
                        "gemv_{kind}_norm_rope: a part starting at column {j0}, inside a \
                         rotation pair"
                    )));
                }
                let padded = q.rows.next_multiple_of(GROUP);
                short("q", q.q.elems(), padded * k * q.bits as usize / 32)?;
                short(
                    "s",
                    q.s.elems(),
                    padded / GROUP * q.scales.group_words(k / BLOCK),
                )?;
                launch(
                    kind,
                    q.scales.staged(),
                    &[q.q.arg(), q.s.arg()],
                    cols,
                    j0,
                    i == 0,
                )?;
                j0 += cols;
            }
            Ok(())
        }
    }
}
