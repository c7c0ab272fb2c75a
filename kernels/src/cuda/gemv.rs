//! The `gemv` kernels' launches (`kernels/cuda/gemv.cu`): the step's product for a few
//! rows, a candidate against cuBLAS at decode batch 1–16: the backend times whole decode
//! steps each way at load and keeps the fastest (`step::SmallProducts`). The product's
//! input is f16 rows ([`Input::Rows`]), or is made in the product's own blocks by the
//! kernel that would otherwise run before it ([`Input::Norm`], [`Input::Swiglu`]): one
//! launch instead of two, with the same bits. The QKV product can also do `rope_kv_write`'s
//! work in its epilogue ([`gemv_rope`]). The weights are f16 rows (`gemv_f16*`), or the
//! file's own blocks ([`Weights::Quant`], laid out by [`QuantRows`]: `gemv_q4*`,
//! `gemv_q8*` for Q4_0, Q4_1, Q8_0 and the 8-bit layouts of the same values; `gemv_q5*`
//! for 5-bit integers, `gemv_iq4*` for IQ4's levels; under their scales alone where the
//! offsets are none, `gemv_q4s*`, `gemv_q5s*`, `gemv_q8s*`, `gemv_iq4s*`; under factored scales, staged in
//! shared memory, `gemv_q4f*`, `gemv_q5f*`, `gemv_q8f*`, `gemv_q8h*`, `gemv_iq4f*` for the
//! K-quants', `gemv_q6h*` for Q6_K's integers at 6 bits, `gemv_q4h*` for Q3_K's at 4,
//! `gemv_q2h*` for Q2_K's at 2 with their offsets per 16 ([`QuantRows::from_offsets`]), or
//! f32 ones, `gemv_q4f32*`, ...), a fifth to a half of the bytes to read; a
//! stack whose parts are of different layouts (Q4_K_M's QKV, its V
//! rows Q6_K) is a launch a part, each writing its columns ([`QuantRows::stack`]). Either
//! way the products run on tensor cores (`mma.m16n8k16`, 16 columns by 8 rows, twice past
//! 8), a block of 8 warps per group of 16 columns at a time, as many blocks as the SMs
//! hold, with the input rows staged in shared memory: rows too wide for it are read in
//! runs of their columns, a launch a run adding its sums ([`column_run`]).

use super::exec::{check_gemm, Arg, DevBuf, Exec, ExecError};
use cudarc::driver::LaunchConfig;
use half::f16;

/// The most rows a product takes (`GEMV_MAX_ROWS` in gemv.cu: two `mma`s of 8 columns).
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
/// (`gemv_shared` in gemv.cu): the 8 warps' sums, the rows staged as f16 (`k` halves
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

impl<E: Exec> QuantBuf<E> {
    /// The entry points' weights part (`q4`, `q8`, `q4f`, `q8f`, `q8h`, `q6h`, `iq4`,
    /// `iq4f`, ...); `None` for a layout no kernel reads.
    pub fn kind(&self) -> Option<&'static str> {
        if self.iq4 {
            return match (self.bits, self.scales) {
                (4, Scales::F16Pairs) => Some("iq4"),
                (4, Scales::F16Scales) => Some("iq4s"),
                (4, Scales::Factored) => Some("iq4f"),
                _ => None,
            };
        }
        Some(match (self.bits, self.scales) {
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
        if have < need {
            Err(ExecError::Bounds(format!(
                "gemv_{kind} of {rows}×{k}: {what} holds {have} elements, not {need}"
            )))
        } else {
            Ok(())
        }
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

/// A matrix in its file's own quantized blocks, laid out for `gemv_q4` / `gemv_q5` /
/// `gemv_q8` / `gemv_iq4` (`kernels/cuda/gemv.cu`): a candidate against `gemv_f16` for
/// products of a few rows, which read 4.5 (Q4_0, IQ4_NL), 5 (Q4_1), 5.5 (Q5_0), 6 (Q5_1)
/// or 8.5 (Q8_0) bits a weight where the f16 rows take 16. Each weight is `d · q + m` of its block of 32 in f32,
/// the value the file's block dequantizes to (`quant::dequantize_row`). The K-quant layouts' scales, which f16 would
/// round, are held factored as the file holds them, an f16 a super-block of 256 times a
/// signed byte a block ([`Scales::Factored`]: `gemv_q4f`, `gemv_q8f`, `gemv_q6h`), or as
/// f32 pairs (`gemv_q4f32`, ...) where asked or where they do not factor, so that they
/// too are the file's own values.
///
/// The layout is the tensor cores' fragments: tiles of 16 rows (an `mma`'s columns) by a
/// block of 32, each lane's part of a tile (rows `g`, `g + 8`, weights `8t .. 8t + 8` for
/// lane `4g + t`; with a scale per 16, weights `4t .. 4t + 4` and `16 + 4t .. 16 + 4t + 4`,
/// so that the block's first `mma` takes its first 16) in one load. Rows past the last up
/// to a multiple of 16 are zeros.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantRows {
    /// 2 (Q2_K's `q` in 0..4, with a scale and an offset per 16:
    /// [`Scales::FactoredHalfPairs`]), 4 (Q4_0, Q4_1, Q4_K: `q` in 0..16, Q4_0's `m = −8d`;
    /// Q3_K's `q + 8` with a scale per 16; IQ4's indices), 5 (Q5_1,
    /// Q5_K: `q` in 0..32), 6 (Q6_K's integers −32..32 as `q − 32`, `q` in 0..64, with a
    /// scale per 16: [`Scales::FactoredHalves`]) or 8 (Q8_0 and the 8-bit layouts the
    /// others become: `q` signed).
    pub bits: u32,
    pub scales: Scales,
    /// The 4-bit fields are indices into IQ4's 16 levels (−127..=113), the integers the
    /// scales multiply (`gemv_iq4`, `gemv_iq4f`): IQ4_NL's and IQ4_XS's 8-bit values at 4
    /// bits. A piece's weights `e < 4` in bits `4e`, the others in `16 + 4(e − 4)`.
    pub iq4: bool,
    /// Per tile (group of 16 rows, then block of 32), per lane: at 2 bits, a word for rows
    /// `g` and `g + 8` (row `g + 8`'s fields 8 bits past row `g`'s); at 4 bits, a word for row
    /// `g` and one for `g + 8`, weights `2p`, `2p + 1` of a piece in bits `4p`, `16 + 4p`
    /// (IQ4 indices: see `iq4`); at 5 and 6 bits the same low 4 bits, then the tile's
    /// fifth bits or high two (`place_high`); at 8 bits, two words for row `g` and two for `g + 8`, weight `h` the
    /// signed byte `h`.
    pub q: Vec<u32>,
    /// Per group of 16 rows, its scales ([`Scales`]: [`Scales::group_words`] a group).
    pub s: Vec<u32>,
    pub rows: usize,
    pub k: usize,
}

/// How a group of 16 rows holds its scales, a pair (`d`, `m`) a row and block of 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scales {
    /// `d` (low half) and `m` (high half) as f16 bits, a word a row and block, the
    /// blocks' 16 words in order: Q4_0, Q4_1, Q8_0 and the layouts converted to them with
    /// the same values (`gemv_q4`, `gemv_q8`; Q5_1's integers and offsets, `gemv_q5`;
    /// IQ4_NL's levels, `gemv_iq4`).
    F16Pairs,
    /// Factored as the K-quants hold them (`gemv_q4f`, `gemv_q8f`): `d = D · n_d`,
    /// `m = M · n_m` (exact in f32), with `n_d`, `n_m` a row's signed bytes for the block
    /// and `D`, `M` its f16 pair for the block's super-block of 8 (256 weights). A group's
    /// words: 8 a block (word `g` holds rows `g` and `g + 8`'s bytes: `n_d`, `n_m` of `g`,
    /// then of `g + 8`), then 16 a super-block (words `2g`, `2g + 1`: rows `g` and `g + 8`'s
    /// `D | M << 16`).
    Factored,
    /// As [`Scales::Factored`], the two halves' scales of each block in place of `d` and
    /// `m` (a scale per 16, no offset: Q6_K's, `gemv_q6h` at 6 bits, `gemv_q8h` at 8;
    /// Q3_K's, `gemv_q4h` at 4), each factored on its own.
    FactoredHalves,
    /// `d` and `m` as f32, two words a row and block, the blocks' 32 in order: the
    /// K-quants' unfactored (`gemv_q4f32`, `gemv_q8f32`), 2 bits a weight where factored
    /// they take 0.625: any scales that neither f16 nor factoring holds
    /// ([`QuantRows::from_packed`]), and `TOLLGATE_KQUANT_SCALES=f32`.
    F32Pairs,
    /// `d` alone as f16 bits, a half a row and block, the blocks' 16 in order (half
    /// the bytes of [`Scales::F16Pairs`]: 0.5 bits a weight), where every offset `m` is
    /// `−c · d` for the centre `c` the kernel subtracts from the integers ([`center`]: 8 at
    /// 4 bits, 16 at 5, 0 at 8 and for IQ4's levels): Q4_0, Q5_0, Q8_0, IQ4_NL (`gemv_q4s`,
    /// `gemv_q5s`, `gemv_q8s`, `gemv_iq4s`; no offsets, so no inputs' sums either).
    F16Scales,
    /// As [`Scales::F32Pairs`], the halves' scales (`gemv_q8h32`).
    F32Halves,
    /// A scale and an offset a half (16 weights), factored (Q2_K's `d · sc` and `−dmin ·
    /// m`, `gemv_q2h` at 2 bits): a group's words are 16 a block (words `2g`, `2g + 1`
    /// hold rows `g`'s and `g + 8`'s signed bytes: the halves' `n_d`, then their `n_m`),
    /// then 16 a super-block as [`Scales::Factored`]'s (`D | M << 16` a row); each half's
    /// `d = D · n_d`, `m = M · n_m`.
    FactoredHalfPairs,
}

impl Scales {
    /// Words a group of 16 rows' scales take, for `nb` blocks of 32.
    pub fn group_words(self, nb: usize) -> usize {
        match self {
            Scales::F16Pairs => nb * GROUP,
            Scales::F16Scales => nb * GROUP / 2,
            Scales::F32Pairs | Scales::F32Halves => nb * GROUP * 2,
            Scales::Factored | Scales::FactoredHalves => nb * 8 + nb.div_ceil(SUPER) * 16,
            Scales::FactoredHalfPairs => nb * 16 + nb.div_ceil(SUPER) * 16,
        }
    }

    /// What the kernels stage in shared memory for these scales ([`shared_bytes`]): the
    /// factored ones, a column group's at a time, each pair made once a block instead of
    /// once a lane (with offsets per 16, the inputs' sums per 16 too).
    pub fn staged(self) -> Staged {
        match self {
            Scales::Factored | Scales::FactoredHalves => Staged::Scales,
            Scales::FactoredHalfPairs => Staged::HalfPairs,
            _ => Staged::Sums,
        }
    }
}

/// Blocks of 32 a super-block of the factored scales: 256 weights, a K-quant's.
const SUPER: usize = 8;

/// What the kernels subtract from `bits`-bit integers before the tensor cores take them
/// where there are no offsets (under a scale alone, [`Scales::F16Scales`], or a scale per
/// 16): 8 at 4 bits, 16 at 5, 32 at 6 (Q4_0's and Q3_K's `q − 8`, Q5_0's `q − 16`, Q6_K's
/// `q − 32`), 0 at 8 bits and for IQ4's levels. (At 2 bits, Q2_K's, 2: its offsets take
/// `2d` more.)
fn center(bits: u32, iq4: bool) -> f32 {
    match (bits, iq4) {
        (2, _) => 2.0,
        (4, false) => 8.0,
        (5, _) => 16.0,
        (6, _) => 32.0,
        _ => 0.0,
    }
}

/// A block's integers `v` as `times · (q − 16)` with `q` in 0..32, `times` the largest of
/// 4, 2, 1 that holds them all (Q5_0's as the CPU holds them); `None` where none does.
fn five_bits(v: &[i32; BLOCK]) -> Option<([i32; BLOCK], i32)> {
    let times = [4, 2, 1].into_iter().find(|&t| {
        v.iter()
            .all(|&x| x % t == 0 && (-16..16).contains(&(x / t)))
    })?;
    Some((v.map(|x| x / times + 16), times))
}

/// A block's integers as indices into IQ4's levels; `None` unless each is one of them.
fn iq4_indices(ints: &[i32; BLOCK]) -> Option<[i32; BLOCK]> {
    let mut out = [0; BLOCK];
    for (o, &v) in out.iter_mut().zip(ints) {
        let i = crate::kquant::IQ4_LEVELS
            .binary_search(&i8::try_from(v).ok()?)
            .ok()?;
        *o = i as i32;
    }
    Some(out)
}

/// `vals` as `D · n`, `D` an f16 and `n` in −128..128, exactly in f32 arithmetic (into
/// `n`); `None` where they are no such multiples (or not finite). First the largest `D`
/// whose multiples they can be (their odd significands' greatest common divisor at their
/// least exponent: a K-quant's 6-bit scales' `d` where one of them is odd), then, where
/// that is no f16 or leaves multiples past a byte, `a / top` for their largest magnitude
/// `a` and `top` from 1 up.
fn factor(vals: &[f32], n: &mut [i8]) -> Option<f16> {
    let a = vals.iter().fold(0f32, |a, v| a.max(v.abs()));
    if !a.is_finite() {
        return None;
    }
    if a == 0.0 {
        n.fill(0);
        return Some(f16::ZERO);
    }
    // v = ±s · 2^e, s odd.
    let odd_parts = |v: f32| {
        let (bits, e) = (v.to_bits(), ((v.to_bits() >> 23) & 0xff) as i32);
        let sig = bits & 0x7f_ffff | if e > 0 { 0x80_0000 } else { 0 };
        let tz = sig.trailing_zeros();
        (sig >> tz, e.max(1) - 150 + tz as i32)
    };
    let (mut g, mut e) = (0u32, i32::MAX);
    for &v in vals.iter().filter(|v| **v != 0.0) {
        let (s, ev) = odd_parts(v);
        g = gcd(g, s);
        e = e.min(ev);
    }
    let d = (f64::from(g) * 2f64.powi(e)) as f32;
    if let Some(dh) = multiples_of(d, vals, n) {
        return Some(dh);
    }
    // D = a / top is an f16 only where top's odd part divides a's odd significand to
    // under 11 bits: a test in integers before the floats'.
    let (odd, _) = odd_parts(a);
    (1..=128u8)
        .filter(|top| {
            let t = u32::from(top >> top.trailing_zeros());
            odd.is_multiple_of(t) && odd / t < 1 << 11
        })
        .find_map(|top| multiples_of(a / f32::from(top), vals, n))
}

/// `d` as an f16, where it is one and every value is `d` times an integer in −128..128
/// exactly (into `n`).
fn multiples_of(d: f32, vals: &[f32], n: &mut [i8]) -> Option<f16> {
    let dh = f16::from_f32(d);
    if d == 0.0 || dh.to_f32() != d {
        return None;
    }
    for (v, n) in vals.iter().zip(n.iter_mut()) {
        let q = v / d;
        // Truncated: an integer quotient is exact, and d · (a byte) is exact in f32, so
        // the product is v only where q was that integer.
        if !(-128.0..128.0).contains(&q) || d * (q as i32) as f32 != *v {
            return None;
        }
        *n = q as i8;
    }
    Some(dh)
}

/// Row `j`'s block `blk` of `rows` rows of `k` weights in `ty`'s blocks (`data`), as
/// `quant::unpack` gives it (its integers, `d`, `m`); `None` where `k` is no multiple of a
/// block or `data` not that many blocks.
fn unpacker(
    ty: crate::gguf::GgmlType,
    data: &[u8],
    rows: usize,
    k: usize,
) -> Option<impl Fn(usize, usize) -> ([i32; BLOCK], f32, f32) + Sync + '_> {
    let (nb, bytes) = (k / BLOCK, ty.block_bytes());
    (k.is_multiple_of(BLOCK) && data.len() == rows * nb * bytes).then_some(
        move |j: usize, blk: usize| crate::quant::unpack(ty, &data[(j * nb + blk) * bytes..]),
    )
}

/// Weights of a block per 16.
const HALF: usize = BLOCK / 2;

/// A 16's integers as `g · q` with every `q` in `range`: `g` their greatest common divisor
/// times the first of `signs` that holds them (0, and `q` all 0, where they are all 0);
/// `None` where none does.
fn over_divisor(
    half: &[i32],
    range: std::ops::Range<i32>,
    signs: &[i32],
) -> Option<(i32, [i32; HALF])> {
    let g = half.iter().fold(0, |g, v| gcd(g, v.unsigned_abs())) as i32;
    if g == 0 {
        return Some((0, [0; HALF]));
    }
    signs.iter().find_map(|s| {
        let mut q = [0; HALF];
        for (o, v) in q.iter_mut().zip(half) {
            *o = v / (s * g);
            if !range.contains(o) {
                return None;
            }
        }
        Some((s * g, q))
    })
}

/// The greatest common divisor (0 with anything is that thing).
fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl QuantRows {
    /// The bytes a product reads of them once uploaded ([`QuantBuf::bytes`]).
    pub fn bytes(&self) -> usize {
        4 * (self.q.len() + self.s.len())
    }

    /// `rows` rows of `k` weights in `ty`'s blocks (Q4_0, Q4_1 or Q8_0; Q8_0 whose
    /// integers are all IQ4's levels, IQ4_NL's, as their 4-bit indices, or all Q5_0's
    /// `times · (q − 16)`, as `q` at 5 bits); `None` for other types, or where `data` is
    /// not that many blocks.
    /// Their scales alone ([`Scales::F16Scales`]) where every offset is the kernel's
    /// centre's (Q4_0's `−8d`, Q8_0's 0: half the scales' bytes, no inputs' sums), else
    /// f16 pairs; first, Q8_0 blocks whose every 16 integers are a factor times 4-bit ones
    /// (Q3_K's: [`QuantRows::by_sixteens`]).
    pub fn from_blocks(
        ty: crate::gguf::GgmlType,
        data: &[u8],
        rows: usize,
        k: usize,
    ) -> Option<Self> {
        Self::by_sixteens(ty, data, rows, k).or_else(|| {
            [Scales::F16Scales, Scales::F16Pairs]
                .into_iter()
                .find_map(|scales| Self::from_blocks_as(ty, data, rows, k, scales))
        })
    }

    /// Q8_0 blocks whose every 16 integers are a common factor times 4-bit ones (−8..8):
    /// Q3_K's, which the CPU holds as Q8_0 of `d` and `sc · q` (`q` in −4..4), as those
    /// 4-bit integers (+ 8) under the halves' scales `d · g` (`g` the 16's greatest common
    /// divisor, signed so that the integers fit), factored ([`Scales::FactoredHalves`],
    /// `gemv_q4h`: 4.625 bits a weight where the blocks take 8.5). `None` for other
    /// types, or at the first 16 that are no such multiples (a Q8_0 file's, in its first
    /// block).
    fn by_sixteens(ty: crate::gguf::GgmlType, data: &[u8], rows: usize, k: usize) -> Option<Self> {
        if ty != crate::gguf::GgmlType::Q8_0 {
            return None;
        }
        let unpack = unpacker(ty, data, rows, k)?;
        Self::build(4, Scales::FactoredHalves, false, rows, k, |j, blk| {
            let (vals, d, _) = unpack(j, blk);
            let mut q = [0; BLOCK];
            let mut sc = [0f32; 2];
            for (h, (half, out)) in vals
                .chunks_exact(HALF)
                .zip(q.chunks_exact_mut(HALF))
                .enumerate()
            {
                // 8 · g fits only negated.
                let (g, x) = over_divisor(half, -8..8, &[1, -1])?;
                for (o, x) in out.iter_mut().zip(x) {
                    *o = x + 8;
                }
                sc[h] = d * g as f32;
            }
            Some((q, sc))
        })
    }

    /// Q8_0 blocks with an offset per 16 beside them ([`crate::matmul::Offsets`]) whose
    /// every 16 integers are a common factor times 2-bit ones (0..4): Q2_K's, which the CPU
    /// holds as Q8_0 of `d` and `sc · q` and offsets `−dmin · m`, as those 2-bit integers
    /// under each 16's scale `d · g` (`g` the 16's greatest common divisor) and offset,
    /// factored ([`Scales::FactoredHalfPairs`], `gemv_q2h`: 3.125 bits a weight where the
    /// f16 rows take 16). `None` for other types and offsets, or at the first 16 that are
    /// no such multiples.
    pub fn from_offsets(
        ty: crate::gguf::GgmlType,
        data: &[u8],
        offsets: &crate::matmul::Offsets,
        rows: usize,
        k: usize,
    ) -> Option<Self> {
        let unpack = unpacker(ty, data, rows, k)?;
        if ty != crate::gguf::GgmlType::Q8_0
            || offsets.run != HALF
            || offsets.values.len() != rows * k / HALF
        {
            return None;
        }
        Self::build(2, Scales::FactoredHalfPairs, false, rows, k, |j, blk| {
            let (vals, d, _) = unpack(j, blk);
            let mut q = [0; BLOCK];
            let mut pair = [0f32; 4];
            for (h, (half, out)) in vals
                .chunks_exact(HALF)
                .zip(q.chunks_exact_mut(HALF))
                .enumerate()
            {
                let (g, x) = over_divisor(half, 0..4, &[1])?;
                out.copy_from_slice(&x);
                pair[h] = d * g as f32;
                pair[2 + h] = offsets.values[(j * k + blk * BLOCK) / HALF + h];
            }
            Some((q, pair))
        })
    }

    /// [`QuantRows::from_blocks`] with the scales held as `scales` says (f16 pairs or
    /// scales alone); `None` where they cannot be.
    pub fn from_blocks_as(
        ty: crate::gguf::GgmlType,
        data: &[u8],
        rows: usize,
        k: usize,
        scales: Scales,
    ) -> Option<Self> {
        use crate::gguf::GgmlType;
        let bits = match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => 4,
            GgmlType::Q8_0 => 8,
            _ => return None,
        };
        if !matches!(scales, Scales::F16Pairs | Scales::F16Scales) {
            return None;
        }
        let unpack = unpacker(ty, data, rows, k)?;
        // d and m are f16 values (m = −8d exactly for Q4_0, unless it overflows; 0 for
        // Q8_0).
        let block = |j: usize, blk: usize| {
            let (vals, d, m) = unpack(j, blk);
            (vals, [d, m])
        };
        if bits == 4 {
            return Self::build(bits, scales, false, rows, k, |j, blk| Some(block(j, blk)));
        }
        // Q5_0's values, which the CPU holds as Q8_0 of `d/4` and `4(q − 16)` (or `d/2`,
        // `d`): at 5 bits, `q` under `d` and the offset `−16d`.
        Self::narrowest(scales, true, rows, k, block, |vals, [d, _]| {
            let (q, times) = five_bits(&vals)?;
            let d = d * times as f32;
            Some((q, [d, -16.0 * d]))
        })
    }

    /// A matrix's packed form where it holds values its file blocks do not
    /// ([`crate::matmul::Matrix::packed_values`]: the K-quant sub-blocks' f32 scales,
    /// Q6_K's scale per 16, offsets of a block each beside 8-bit blocks): the same
    /// integers under the same scales (at 5 bits where they are 0..32, Q5_1's and Q5_K's;
    /// IQ4_XS's levels as their 4-bit indices), held as f16 pairs where they are f16 values
    /// (Q5_1's), else factored ([`Scales::Factored`]: Q4_K's, Q5_K's, IQ4_XS's, Q6_K's; the kernels
    /// stage their pairs in shared memory, so that they take fewer instructions a block
    /// than f32 pairs as well as fewer bytes — BENCHMARKS.md, "Factored scales staged"),
    /// else as f32 pairs. `None` where the packed form has both a scale per 16 and mins.
    pub fn from_packed(p: &crate::packed::Packed) -> Option<Self> {
        [Scales::F16Pairs, Scales::Factored, Scales::F32Pairs]
            .into_iter()
            .find_map(|s| Self::from_packed_as(p, s))
    }

    /// [`QuantRows::from_packed`] with its scales held as `scales` says (its halves' form
    /// where the packed form has a scale per 16; under f16 pairs or factored, 8-bit
    /// integers that are all IQ4's levels, IQ4_XS's, as their 4-bit indices); `None` where
    /// they cannot be.
    pub fn from_packed_as(p: &crate::packed::Packed, scales: Scales) -> Option<Self> {
        use crate::gguf::GgmlType;
        let bits = if p.ty() == GgmlType::Q8_0 { 8 } else { 4 };
        let (rows, k) = (p.rows, p.cols);
        if p.runs() == 2 {
            let halves = match scales {
                Scales::Factored | Scales::FactoredHalves => Scales::FactoredHalves,
                Scales::F32Pairs | Scales::F32Halves => Scales::F32Halves,
                Scales::F16Pairs | Scales::F16Scales | Scales::FactoredHalfPairs => return None,
            };
            if bits != 8 || p.has_mins() {
                return None;
            }
            // Q6_K's integers −32..32 at 6 bits (as `q − 32`) where a kernel reads them
            // (factored), else at 8.
            let six = (halves == Scales::FactoredHalves)
                .then(|| {
                    Self::build(6, halves, false, rows, k, |j, i| {
                        let (ints, sc, _) = p.block(j, i);
                        ints.iter()
                            .all(|v| (-32..32).contains(v))
                            .then(|| (ints.map(|v| v + 32), sc))
                    })
                })
                .flatten();
            return six.or_else(|| {
                Self::build(bits, halves, false, rows, k, |j, i| {
                    let (ints, sc, _) = p.block(j, i);
                    Some((ints, sc))
                })
            });
        }
        let pairs = match scales {
            Scales::FactoredHalves => Scales::Factored,
            Scales::F32Halves => Scales::F32Pairs,
            // The file blocks' forms ([`QuantRows::from_blocks`],
            // [`QuantRows::from_offsets`]), not the packed one's.
            Scales::F16Scales | Scales::FactoredHalfPairs => return None,
            s => s,
        };
        let block = |j: usize, i: usize| {
            let (ints, sc, min) = p.block(j, i);
            (ints, [sc[0], min])
        };
        // Fewer bits where a kernel reads them (f16 pairs, factored): integers 0..32
        // (Q5_1's, Q5_K's) at 5 bits.
        if bits == 8 && matches!(pairs, Scales::F16Pairs | Scales::Factored) {
            return Self::narrowest(pairs, !p.has_mins(), rows, k, block, |ints, pair| {
                ints.iter()
                    .all(|v| (0..32).contains(v))
                    .then_some((ints, pair))
            });
        }
        Self::build(bits, pairs, false, rows, k, |j, i| Some(block(j, i)))
    }

    /// 8-bit integers (`block(j, i)`: row `j`'s block `i` and its pair) in the fewest bits
    /// a kernel reads them in under `scales`: where `iq4` and every integer is one of IQ4's
    /// levels, their 4-bit indices; else where `five` makes every block 5-bit integers
    /// (0..32) and their pair, those; else 8 bits. Each attempt stops at the first block it
    /// cannot hold.
    fn narrowest(
        scales: Scales,
        iq4: bool,
        rows: usize,
        k: usize,
        block: impl Fn(usize, usize) -> ([i32; BLOCK], [f32; 2]) + Sync,
        five: impl Fn([i32; BLOCK], [f32; 2]) -> Option<([i32; BLOCK], [f32; 2])> + Sync,
    ) -> Option<Self> {
        let levels = iq4
            .then(|| {
                Self::build(4, scales, true, rows, k, |j, i| {
                    let (ints, pair) = block(j, i);
                    Some((iq4_indices(&ints)?, pair))
                })
            })
            .flatten();
        levels
            .or_else(|| {
                Self::build(5, scales, false, rows, k, |j, i| {
                    let (ints, pair) = block(j, i);
                    five(ints, pair)
                })
            })
            .or_else(|| Self::build(8, scales, false, rows, k, |j, i| Some(block(j, i))))
    }

    /// A stack of projections (Q, K, V; gate, up) as the products read it: its parts one
    /// after the other, those of one layout as one matrix (as a stack the CPU holds apart
    /// because of its offsets), a part of another layout (Q4_K_M's Q6_K V rows after its
    /// Q4_K Q and K) or after one ending inside a tile (rows no multiple of 16) starting
    /// the next. The products launch a kernel for each, writing its columns of the output.
    pub fn stack(parts: Vec<QuantRows>) -> Vec<QuantRows> {
        let mut out: Vec<QuantRows> = Vec::new();
        for p in parts {
            let joins = |l: &&mut QuantRows| {
                (l.bits, l.scales, l.iq4, l.k) == (p.bits, p.scales, p.iq4, p.k)
                    && l.rows.is_multiple_of(GROUP)
            };
            match out.last_mut().filter(joins) {
                Some(l) => {
                    l.q.extend(p.q);
                    l.s.extend(p.s);
                    l.rows += p.rows;
                }
                None => out.push(p),
            }
        }
        out
    }

    /// The layout of `rows` rows of `k`, `block(j, i)` giving row `j`'s block `i`: its 32
    /// integers (0..4 at 2 bits, 0..16 at 4 — with `iq4`, indices into IQ4's levels —,
    /// 0..32 at 5, 0..64 at 6, −128..128 at 8) and its scale pair (`d`, `m`; the halves'
    /// scales; or, `P` 4, the halves' scales then their offsets), or `None` where the
    /// layout cannot hold them; `None` then, or where `scales` cannot hold the pairs
    /// exactly (f16 values, or factored: [`factor`]).
    fn build<const P: usize>(
        bits: u32,
        scales: Scales,
        iq4: bool,
        rows: usize,
        k: usize,
        block: impl Fn(usize, usize) -> Option<([i32; BLOCK], [f32; P])> + Sync,
    ) -> Option<Self> {
        use rayon::prelude::*;
        let nb = k / BLOCK;
        // Each group of 16 rows is its own run of tiles (and of scales): built in parallel.
        let (q_group, s_group) = (
            nb * BLOCK * GROUP * bits as usize / 32,
            scales.group_words(nb),
        );
        let groups = rows.div_ceil(GROUP);
        let mut r = Self {
            bits,
            scales,
            iq4,
            q: vec![0; groups * q_group],
            s: vec![0; groups * s_group],
            rows,
            k,
        };
        let (mut q, mut s) = (std::mem::take(&mut r.q), std::mem::take(&mut r.s));
        let layout = &r;
        let places = r.block_places();
        let highs = [r.high_places(0), r.high_places(1)];
        q.par_chunks_mut(q_group)
            .zip(s.par_chunks_mut(s_group))
            .enumerate()
            .try_for_each(|(g, (q, s))| {
                // The group's pairs, row by row (rows past the last: zeros).
                let mut pairs = vec![[0f32; 4]; GROUP * nb];
                for j in g * GROUP..rows.min((g + 1) * GROUP) {
                    for blk in 0..nb {
                        let (vals, pair) = block(j, blk)?;
                        pairs[(j % GROUP) * nb + blk][..P].copy_from_slice(&pair);
                        let base = layout.block_base(j, blk) - g * q_group;
                        let mask = match bits {
                            2 => 3,
                            8 => 255,
                            _ => 15,
                        };
                        let row = layout.row_shift(j);
                        for (&v, &(word, shift)) in vals.iter().zip(&places) {
                            q[base + word] |= (v as u32 & mask) << (shift + row);
                        }
                        if bits == 5 || bits == 6 {
                            let high = (1 << (bits - 4)) - 1;
                            let base = layout.high_base(j, blk) - g * q_group;
                            for (&v, &(word, bit)) in vals.iter().zip(&highs[(j % GROUP) / 8]) {
                                q[base + word] |= (v as u32 >> 4 & high) << bit;
                            }
                        }
                    }
                }
                Self::scale_words(scales, center(bits, iq4), nb, &pairs, s)
            })?;
        (r.q, r.s) = (q, s);
        Some(r)
    }

    /// A group's scale words (`out`, [`Scales`]' layout) from its 16 rows' pairs
    /// (`pairs[row · nb + block]`: `d`, `m` or the halves' scales, then with
    /// [`Scales::FactoredHalfPairs`] the halves' offsets); `None` where `scales` cannot hold
    /// them exactly (with [`Scales::F16Scales`], where an offset is not `−c · d`, `c` the
    /// kernel's `center`).
    fn scale_words(
        scales: Scales,
        center: f32,
        nb: usize,
        pairs: &[[f32; 4]],
        out: &mut [u32],
    ) -> Option<()> {
        let bits16 = |v: f32| {
            let h = f16::from_f32(v);
            (h.to_f32() == v).then_some(u32::from(h.to_bits()))
        };
        match scales {
            Scales::F16Pairs => {
                for (r, row) in pairs.chunks_exact(nb).enumerate() {
                    for (blk, &[d, m, ..]) in row.iter().enumerate() {
                        out[blk * GROUP + r] = bits16(d)? | bits16(m)? << 16;
                    }
                }
            }
            Scales::F16Scales => {
                for (r, row) in pairs.chunks_exact(nb).enumerate() {
                    for (blk, &[d, m, ..]) in row.iter().enumerate() {
                        if m != -center * d {
                            return None;
                        }
                        let at = blk * GROUP + r;
                        out[at / 2] |= bits16(d)? << (16 * (at % 2));
                    }
                }
            }
            Scales::F32Pairs | Scales::F32Halves => {
                for (r, row) in pairs.chunks_exact(nb).enumerate() {
                    for (blk, &[d, m, ..]) in row.iter().enumerate() {
                        let at = (blk * GROUP + r) * 2;
                        (out[at], out[at + 1]) = (d.to_bits(), m.to_bits());
                    }
                }
            }
            Scales::Factored | Scales::FactoredHalves => {
                let (blocks, supers) = out.split_at_mut(nb * 8);
                let mut n = [0i8; SUPER];
                let mut vals = [0f32; SUPER];
                for (r, row) in pairs.chunks_exact(nb).enumerate() {
                    for (sb, run) in row.chunks(SUPER).enumerate() {
                        let mut sup = 0u32;
                        for half in 0..2 {
                            for (v, p) in vals.iter_mut().zip(run) {
                                *v = p[half];
                            }
                            let d = factor(&vals[..run.len()], &mut n[..run.len()])?;
                            sup |= u32::from(d.to_bits()) << (16 * half);
                            for (i, &n) in n[..run.len()].iter().enumerate() {
                                let byte = 8 * (2 * (r / 8) + half);
                                blocks[(sb * SUPER + i) * 8 + r % 8] |= u32::from(n as u8) << byte;
                            }
                        }
                        supers[sb * 16 + 2 * (r % 8) + r / 8] = sup;
                    }
                }
            }
            Scales::FactoredHalfPairs => {
                let (blocks, supers) = out.split_at_mut(nb * 16);
                let mut n = [0i8; 2 * SUPER];
                let mut vals = [0f32; 2 * SUPER];
                for (r, row) in pairs.chunks_exact(nb).enumerate() {
                    for (sb, run) in row.chunks(SUPER).enumerate() {
                        let mut sup = 0u32;
                        // The halves' scales (D), then their offsets (M): each a super-block's
                        // 16 values factored together.
                        for part in 0..2 {
                            for (i, p) in run.iter().enumerate() {
                                vals[2 * i] = p[2 * part];
                                vals[2 * i + 1] = p[2 * part + 1];
                            }
                            let len = 2 * run.len();
                            let d = factor(&vals[..len], &mut n[..len])?;
                            sup |= u32::from(d.to_bits()) << (16 * part);
                            for (i, h) in n[..len].chunks_exact(2).enumerate() {
                                let bytes = u32::from(h[0] as u8) | u32::from(h[1] as u8) << 8;
                                let word = (sb * SUPER + i) * 16 + 2 * (r % 8) + r / 8;
                                blocks[word] |= bytes << (16 * part);
                            }
                        }
                        supers[sb * 16 + 2 * (r % 8) + r / 8] = sup;
                    }
                }
            }
        }
        Some(())
    }

    /// Where weight `c` of row `j` lies in `q`: its word, and the bit its field starts at.
    fn place(&self, j: usize, c: usize) -> (usize, u32) {
        let (word, shift) = self.block_places()[c % BLOCK];
        (
            self.block_base(j, c / BLOCK) + word,
            shift + self.row_shift(j),
        )
    }

    /// The bits past [`QuantRows::block_places`]' that row `j`'s fields start at: at 2
    /// bits, 8 for rows `g + 8` (which share their lane's word with rows `g`); else 0.
    fn row_shift(&self, j: usize) -> u32 {
        if self.bits == 2 {
            8 * ((j % GROUP) / 8) as u32
        } else {
            0
        }
    }

    /// Where row `j`'s block `blk` starts in `q`: its tile's first word, plus the words
    /// of the lanes and rows before row `j`'s in it (lane `4g + t`'s words for rows `g`,
    /// `g + 8`: [`QuantRows::block_places`] adds `t`'s part).
    fn block_base(&self, j: usize, blk: usize) -> usize {
        let tile = self.tile_start(j, blk);
        let (g, hi) = (j % 8, (j % GROUP) / 8);
        match self.bits {
            2 => tile + 4 * g,
            4..=6 => tile + 8 * g + hi,
            _ => tile + 16 * g + 2 * hi,
        }
    }

    /// The first word of row `j`'s tile for block `blk`: a tile is 16 rows by 32 weights
    /// of `bits` each, `16 · bits` words (at 5 and 6 bits, the 64 of low bits first).
    fn tile_start(&self, j: usize, blk: usize) -> usize {
        ((j / GROUP) * (self.k / BLOCK) + blk) * GROUP * self.bits as usize
    }

    /// For each weight `o` of a block: its word past [`QuantRows::block_base`] and the bit
    /// its field starts at (the same for every row and block of the layout). Lane `4g + t`
    /// holds weights `8t .. 8t + 8`, or with a scale per 16 `4t .. 4t + 4` then `16 + 4t ..
    /// 16 + 4t + 4`, as its piece's `e = 0 .. 8`: at 2 bits in its word `t`, `e` at bits
    /// `2(e / 2) + 16(e % 2)` (8 more for row `g + 8`: [`QuantRows::row_shift`]); at 4, 5 and
    /// 6 bits in its words `2t` (row `g`) and `2t + 1` (`g + 8`), `e` at bits `4(e / 2) +
    /// 16(e % 2)` (IQ4's indices: `4(e % 4) + 16(e / 4)`); at 8 bits in words `4t + e / 4`
    /// (and 2 more for `g + 8`), byte `e % 4`.
    fn block_places(&self) -> [(usize, u32); BLOCK] {
        std::array::from_fn(|o| {
            let (t, e) = self.piece_of(o);
            match self.bits {
                2 => (t, (16 * (e % 2) + 2 * (e / 2)) as u32),
                4..=6 => {
                    let shift = if self.iq4 {
                        16 * (e / 4) + 4 * (e % 4)
                    } else {
                        16 * (e % 2) + 4 * (e / 2)
                    };
                    (2 * t, shift as u32)
                }
                _ => (4 * t + e / 4, 8 * (e % 4) as u32),
            }
        })
    }

    /// Weight `o` of a block as a lane's piece holds it: lane `4g + t`'s (with `g` its
    /// row's) element `e` (see [`QuantRows::block_places`]).
    fn piece_of(&self, o: usize) -> (usize, usize) {
        match self.scales {
            Scales::FactoredHalves | Scales::F32Halves | Scales::FactoredHalfPairs => {
                ((o % 16) / 4, 4 * (o / 16) + o % 4)
            }
            _ => (o / 8, o % 8),
        }
    }

    /// At 5 and 6 bits, where weight `c` of row `j`'s bits past the low 4 start in `q`. At
    /// 5: the 16 words after a tile's 64 of low bits, lane `l`'s in word `l / 2` (bits 0 ..
    /// 8 and 16 .. 24, 8 more for an odd lane), weights `2p + s` (`s` 0, 1) at `p + 16s`
    /// for row `g` and at `4 + p + 16s` for `g + 8`. At 6: the 32 words after them, lane
    /// `l`'s word `l`, weights `2p + s` two bits at `4 + 2p + 16s` for row `g` and at
    /// `[12, 14, 0, 2][p] + 16s` for `g + 8`. (The shifts `gemv_q5*` and `gemv_q6h` make:
    /// `kernels/cuda/gemv.cu`'s WeightsHighT.)
    fn place_high(&self, j: usize, c: usize) -> (usize, u32) {
        let (word, bit) = self.high_places((j % GROUP) / 8)[c % BLOCK];
        (self.high_base(j, c / BLOCK) + word, bit)
    }

    /// Where row `j`'s block `blk`'s high bits start in `q` ([`QuantRows::place_high`]):
    /// its lanes' first word (lane `4g`'s, `g` the row's), which
    /// [`QuantRows::high_places`] adds `t`'s part to.
    fn high_base(&self, j: usize, blk: usize) -> usize {
        // A lane's high bits: half a word at 5 bits, a word at 6.
        self.tile_start(j, blk) + 64 + 4 * (j % 8) * (self.bits as usize - 4) / 2
    }

    /// For each weight `o` of a block of a row `g` (`hi` 0) or `g + 8` (`hi` 1): its high
    /// bits' word past [`QuantRows::high_base`] and the bit they start at.
    fn high_places(&self, hi: usize) -> [(usize, u32); BLOCK] {
        std::array::from_fn(|o| {
            let (t, e) = self.piece_of(o);
            let (p, s) = (e / 2, e % 2);
            if self.bits == 6 {
                let at = if hi == 0 {
                    4 + 2 * p
                } else {
                    [12, 14, 0, 2][p]
                };
                (t, (at + 16 * s) as u32)
            } else {
                (t / 2, (8 * (t % 2) + 4 * hi + p + 16 * s) as u32)
            }
        })
    }

    /// Weight `c` of row `j` as the kernels read it: `d · q + m`, one rounding (the
    /// kernels add `d · Σ q·x` and `m · Σ x` over a block, the same sum in exact
    /// arithmetic); with a scale per 16, its half's scale times `q` (and with an offset per
    /// 16, its half's `d · q + m`).
    pub fn weight(&self, j: usize, c: usize) -> f32 {
        let nb = self.k / BLOCK;
        let (r, blk) = (j % GROUP, c / BLOCK);
        let group = &self.s[(j / GROUP) * self.scales.group_words(nb)..];
        let half = |b: u32| f16::from_bits(b as u16).to_f32();
        let (word, shift) = self.place(j, c);
        let field = self.q[word] >> shift;
        let q = if self.iq4 {
            f32::from(crate::kquant::IQ4_LEVELS[(field & 15) as usize])
        } else if self.bits == 2 {
            (field & 3) as f32
        } else if self.bits == 4 {
            (field & 15) as f32
        } else if self.bits == 5 || self.bits == 6 {
            let (word, bit) = self.place_high(j, c);
            let high = self.q[word] >> bit & ((1 << (self.bits - 4)) - 1);
            ((field & 15) | high << 4) as f32
        } else {
            field as u8 as i8 as f32
        };
        // The pair (d, m), or the halves' scales: as the kernels make them.
        let pair = |i: usize| match self.scales {
            Scales::F16Pairs => half(group[blk * GROUP + r] >> (16 * i)),
            Scales::F16Scales => {
                let at = blk * GROUP + r;
                [half(group[at / 2] >> (16 * (at % 2))), 0.0][i]
            }
            Scales::F32Pairs | Scales::F32Halves => {
                f32::from_bits(group[(blk * GROUP + r) * 2 + i])
            }
            Scales::Factored | Scales::FactoredHalves => {
                let sup = group[nb * 8 + (blk / SUPER) * 16 + 2 * (r % 8) + r / 8];
                let n = (group[blk * 8 + r % 8] >> (8 * (2 * (r / 8) + i))) as u8 as i8;
                half(sup >> (16 * i)) * f32::from(n)
            }
            // The halves' scales (i 0, 1), then their offsets (2, 3).
            Scales::FactoredHalfPairs => {
                let at = 2 * (r % 8) + r / 8;
                let sup = group[nb * 16 + (blk / SUPER) * 16 + at];
                let n = (group[blk * 16 + at] >> (8 * i)) as u8 as i8;
                half(sup >> (16 * (i / 2))) * f32::from(n)
            }
        };
        // Without offsets the tensor cores take `q − c` (Q6_K's `q − 32`, ...), under `d`
        // or the half's scale.
        let taken = q - center(self.bits, self.iq4);
        let h = (c % BLOCK) / 16;
        match self.scales {
            Scales::FactoredHalves | Scales::F32Halves => pair(h) * taken,
            Scales::FactoredHalfPairs => pair(h).mul_add(q, pair(2 + h)),
            Scales::F16Scales => pair(0) * taken,
            _ => pair(0).mul_add(q, pair(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{factor, QuantRows, Scales};
    use half::f16;

    /// Values that are an f16's multiples by signed bytes factor back into them exactly
    /// (a K-quant's `d · sc`, `−dmin · m`); others, or values f16 cannot hold as `D`, do
    /// not.
    #[test]
    fn scales_factor_exactly_or_not_at_all() {
        let mut n = [0i8; 8];
        let d = f16::from_f32(0.0123).to_f32();
        let sc = [63, 0, 17, -5, 1, 42, -128, 9];
        let vals = sc.map(|s| d * s as f32);
        let dh = factor(&vals, &mut n).expect("multiples of an f16");
        for (&v, &n) in vals.iter().zip(&n) {
            assert_eq!(dh.to_f32() * f32::from(n), v);
        }
        // Zeros (a row of padding), and a part of a super-block.
        assert_eq!(factor(&[0.0, -0.0], &mut n[..2]), Some(f16::ZERO));
        assert_eq!(n[..2], [0, 0]);
        assert!(factor(&vals[..3], &mut n[..3]).is_some());
        // Multiples 3 and 9 of 683/1024: their odd parts' divisor, 2,049, is no f16's; the
        // search from their largest finds 683/1024 (at 9).
        let x = 683.0 / 1024.0;
        assert_eq!(
            factor(&[3.0 * x, 9.0 * x], &mut n[..2]),
            Some(f16::from_f32(x))
        );
        assert_eq!(n[..2], [3, 9]);
        // 1/3 is no f16 times a byte with 2; an f32 with 24 significant bits is none either;
        // nor a scale past 127 times the smallest one's step, nor what is not finite.
        assert_eq!(factor(&[1.0 / 3.0, 2.0], &mut n[..2]), None);
        assert_eq!(factor(&[1.0 + f32::EPSILON], &mut n[..1]), None);
        assert_eq!(factor(&[d, d * 255.0], &mut n[..2]), None);
        assert_eq!(factor(&[f32::NAN, 1.0], &mut n[..2]), None);
        assert_eq!(factor(&[f32::INFINITY], &mut n[..1]), None);
    }
    use crate::gguf::GgmlType;
    use crate::quant;

    /// Each weight read back from the layout as the kernels read it (`d · q + m` in f32,
    /// one rounding; `d · (q − c)` under a scale alone) is the value the file's block
    /// dequantizes to.
    #[test]
    fn quantized_rows_hold_the_files_values() {
        let (rows, k) = (3, 96);
        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let mut blocks = Vec::new();
            match ty {
                GgmlType::Q4_0 => quant::quantize_row_q4_0(&x, &mut blocks),
                GgmlType::Q4_1 => quant::quantize_row_q4_1(&x, &mut blocks),
                _ => quant::quantize_row_q8_0(&x, &mut blocks),
            }
            let mut want = vec![0f32; rows * k];
            quant::dequantize_row(ty, &blocks, &mut want);
            let r = QuantRows::from_blocks(ty, &blocks, rows, k).expect("a kernel layout");
            // Q4_0's and Q8_0's scales alone (their offsets the kernels' centres': −8d, 0),
            // Q4_1's pairs. Rows padded to a tile of 16.
            let (scales, words) = match ty {
                GgmlType::Q4_1 => (Scales::F16Pairs, 16 * k / 32),
                _ => (Scales::F16Scales, 16 * k / 64),
            };
            assert_eq!(
                (r.scales, r.q.len(), r.s.len()),
                (scales, 16 * k * r.bits as usize / 32, words),
                "{ty:?}"
            );
            for (i, &want) in want.iter().enumerate() {
                // Equal as numbers: Q4_0's `d · (q − 8)` is −0 at `q = 8` under a negative
                // `d`, where the file's arithmetic gives 0.
                assert_eq!(r.weight(i / k, i % k), want, "{ty:?} {i}");
            }
        }
        // IQ4_NL, Q5_0 and Q3_K, which the CPU holds as Q8_0 blocks (of IQ4's levels; of
        // `4(q − 16)` under `d/4`; of `sc · q`): IQ4's 4-bit indices under the same scales
        // alone (4.5 bits a weight, where the Q8_0 blocks take 8.5), Q5_0's `q` at 5 bits
        // under `d` alone, the kernel taking `q − 16` (5.5 bits), Q3_K's `q` at 4 bits
        // under its scales per 16, factored (4.625).
        for (ty, bits, iq4, scales, per_weight) in [
            (GgmlType::IQ4_NL, 4, true, Scales::F16Scales, 4.5),
            (GgmlType::Q5_0, 5, false, Scales::F16Scales, 5.5),
            (GgmlType::Q3_K, 4, false, Scales::FactoredHalves, 4.625),
        ] {
            let (rows, k) = (16, 512);
            let mut blocks = Vec::new();
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 37) % 101) as f32 / 25.0 - 2.0)
                .collect();
            crate::kquant::quantize_row(ty, &x, &mut blocks);
            let mut want = vec![0f32; rows * k];
            quant::dequantize_row(ty, &blocks, &mut want);
            let m = crate::model::matrix_of(ty, rows, k, &blocks);
            let (held, data) = m.file_blocks().expect("Q8_0 blocks");
            assert_eq!(held, GgmlType::Q8_0);
            let r = QuantRows::from_blocks(held, data, rows, k).expect("a kernel layout");
            assert_eq!((r.iq4, r.bits, r.scales), (iq4, bits, scales), "{ty:?}");
            assert_eq!(
                r.bytes() as f64 * 8.0,
                (rows * k) as f64 * per_weight,
                "{ty:?}"
            );
            for (i, &want) in want.iter().enumerate() {
                assert_eq!(r.weight(i / k, i % k), want, "{ty:?} {i}");
            }
        }
        // Q2_K, which the CPU holds as Q8_0 blocks of `sc · q` and offsets `−dmin · m` per
        // 16: its 2-bit `q` under each 16's scale and offset, factored (3.125 bits a
        // weight); the same blocks without their offsets, or offsets of a block each, no
        // such layout.
        {
            let (rows, k) = (24, 768);
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 37) % 101) as f32 / 25.0 - 1.5)
                .collect();
            let mut blocks = Vec::new();
            crate::kquant::quantize_row(GgmlType::Q2_K, &x, &mut blocks);
            let mut want = vec![0f32; rows * k];
            quant::dequantize_row(GgmlType::Q2_K, &blocks, &mut want);
            let m = crate::model::matrix_of(GgmlType::Q2_K, rows, k, &blocks);
            assert!(m.file_blocks().is_none() && m.packed_values().is_none());
            let (held, data, offsets) = m.blocks_with_offsets().expect("blocks and offsets");
            let r = QuantRows::from_offsets(held, data, &offsets, rows, k).expect("a layout");
            assert_eq!((r.bits, r.scales), (2, Scales::FactoredHalfPairs));
            // Rows padded to a tile of 16: 32 rows' worth.
            assert_eq!(r.bytes() as f64 * 8.0, (32 * k) as f64 * 3.125);
            for (i, &want) in want.iter().enumerate() {
                assert_eq!(r.weight(i / k, i % k), want, "Q2_K {i}");
            }
            let halves = crate::matmul::Offsets {
                run: 32,
                values: vec![0.0; rows * k / 32],
            };
            assert!(QuantRows::from_offsets(held, data, &halves, rows, k).is_none());
            let q4 = crate::matmul::Offsets {
                run: 16,
                values: offsets.values.clone(),
            };
            let mut q4_0 = Vec::new();
            quant::quantize_row_q4_0(&x, &mut q4_0);
            assert!(QuantRows::from_offsets(GgmlType::Q4_0, &q4_0, &q4, rows, k).is_none());
            // A 16 whose integers are no multiple of 2-bit ones (a Q8_0 file's): none.
            let mut q8 = Vec::new();
            quant::quantize_row_q8_0(&x, &mut q8);
            assert!(QuantRows::from_offsets(GgmlType::Q8_0, &q8, &q4, rows, k).is_none());
        }
        // The K-quant layouts through the packed form, where the CPU makes it, as the
        // backend holds them: factored (Q4_K; Q5_K at 5 bits; Q6_K's scale per 16; IQ4_XS's
        // levels from 4-bit indices); Q5_1's integers at 5 bits and offsets, f16 values, as
        // f16 pairs. What a product reads of them, in bits a weight: factored, the
        // integers' and 5/8 (Q4_K's 4.625 where the file's are 4.5), as f32 pairs 2 more
        // (IQ4_XS's levels and Q5_K's integers then at 8 bits).
        if crate::packed::available() {
            let (rows, k) = (32, 512);
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
                .collect();
            for (ty, scales, bits) in [
                (GgmlType::Q4_K, Scales::Factored, 4.625),
                (GgmlType::Q5_K, Scales::Factored, 5.625),
                (GgmlType::IQ4_XS, Scales::Factored, 4.625),
                (GgmlType::Q6_K, Scales::FactoredHalves, 6.625),
                (GgmlType::Q5_1, Scales::F16Pairs, 6.0),
            ] {
                let mut blocks = Vec::new();
                crate::kquant::quantize_row(ty, &x, &mut blocks);
                let mut want = vec![0f32; rows * k];
                quant::dequantize_row(ty, &blocks, &mut want);
                let m = crate::model::matrix_of(ty, rows, k, &blocks);
                let r = QuantRows::from_packed(m.packed_values().expect("packed values"))
                    .expect("a kernel layout");
                assert_eq!(r.scales, scales, "{ty:?}");
                assert_eq!(r.bytes() as f64 * 8.0 / (rows * k) as f64, bits, "{ty:?}");
                // Both ways: factored, the integers' bits and 5/8; as f32 pairs, 2 more.
                let p = m.packed_values().unwrap();
                let f = QuantRows::from_packed_as(p, Scales::F32Pairs).expect("f32 pairs");
                assert_eq!(f.bytes() * 8, (rows * k) * (f.bits as usize + 2), "{ty:?}");
                assert_eq!((r.iq4, f.iq4), (ty == GgmlType::IQ4_XS, false), "{ty:?}");
                let fac = QuantRows::from_packed_as(p, Scales::Factored);
                if ty != GgmlType::Q5_1 {
                    let fac = fac.as_ref().expect("factored");
                    assert_eq!(
                        fac.bytes() * 8,
                        (rows * k) * r.bits as usize + rows * k * 5 / 8
                    );
                }
                for (i, &want) in want.iter().enumerate() {
                    // Equal as numbers (0 · a negative scale is −0 in the file's arithmetic).
                    assert_eq!(r.weight(i / k, i % k), want, "{ty:?} {i}");
                    assert_eq!(f.weight(i / k, i % k), want, "{ty:?} {i}");
                    if let Some(fac) = &fac {
                        assert_eq!(fac.weight(i / k, i % k), want, "{ty:?} {i}");
                    }
                }
            }
            // Scales neither f16 values nor factored: as f32 pairs, the last resort.
            let mut blocks = Vec::new();
            quant::quantize_row_q8_0(&x, &mut blocks);
            let odd: Vec<f32> = (0..rows * k / 32).map(|i| 1.0 / (3 + i) as f32).collect();
            let p = crate::packed::Packed::new(GgmlType::Q8_0, rows, k, &blocks)
                .expect("packs")
                .with_exact_scales(&odd, &[]);
            assert!(QuantRows::from_packed_as(&p, Scales::Factored).is_none());
            assert!(QuantRows::from_packed_as(&p, Scales::F16Pairs).is_none());
            let f = QuantRows::from_packed(&p).expect("f32 pairs");
            assert_eq!(f.scales, Scales::F32Pairs);
            for (j, c) in [(0, 0), (5, 37), (31, 511)] {
                let (ints, sc, _) = p.block(j, c / 32);
                assert_eq!(f.weight(j, c), sc[0] * ints[c % 32] as f32, "({j}, {c})");
            }
        }
        // Parts one after the other: those of a layout joined where the one before ends a
        // tile, each row's weights as in its part; a part after one ending inside a tile,
        // or of another layout, starts the next launch's.
        let part = |ty, n: usize| {
            let v: Vec<f32> = (0..n * k)
                .map(|i| ((i * 31) % 97) as f32 / 24.0 - 2.0)
                .collect();
            let mut blocks = Vec::new();
            match ty {
                GgmlType::Q4_1 => quant::quantize_row_q4_1(&v, &mut blocks),
                _ => quant::quantize_row_q8_0(&v, &mut blocks),
            }
            QuantRows::from_blocks(ty, &blocks, n, k).expect("a kernel layout")
        };
        let (a, b) = (part(GgmlType::Q8_0, 16), part(GgmlType::Q8_0, 3));
        let c4 = part(GgmlType::Q4_1, 5);
        let parts = [a.clone(), b.clone(), a.clone(), c4.clone(), c4.clone()];
        let stack = QuantRows::stack(parts.to_vec());
        let shapes: Vec<(u32, usize)> = stack.iter().map(|p| (p.bits, p.rows)).collect();
        // 16 + 3 (8 bits), 16 (after a part ending inside a tile), 5 (4 bits), 5.
        assert_eq!(shapes, [(8, 19), (8, 16), (4, 5), (4, 5)]);
        // Row by row, the stack's rows are the parts', bit for bit.
        let weights = |ps: &[QuantRows]| -> Vec<u32> {
            ps.iter()
                .flat_map(|p| (0..p.rows * k).map(|i| p.weight(i / k, i % k).to_bits()))
                .collect()
        };
        assert_eq!(weights(&stack), weights(&parts));
        assert!(QuantRows::stack(vec![]).is_empty());
        let q5 = vec![0u8; rows * k / 32 * GgmlType::Q5_0.block_bytes()];
        assert!(QuantRows::from_blocks(GgmlType::Q5_0, &q5, rows, k).is_none());
        assert!(QuantRows::from_blocks(GgmlType::Q4_1, &[0; 7], rows, k).is_none());
    }
}
