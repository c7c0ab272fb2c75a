//! The forward step's device work, enqueued on the GPU's stream: the CPU twins' chain
//! ([`super::twins::TwinModel::forward`]) launched kernel for kernel, with cuBLAS for the
//! matrix products. [`Device::enqueue`] only enqueues (no allocation, no copy, no
//! synchronization), so the same call runs eagerly or is captured into a CUDA graph.
//!
//! Weights are dequantized once at load to f16 (matrices) and f32 (norms) and stay on the
//! device; products run as `cublasGemmEx` with f16 inputs, f32 accumulation and output.
//! The KV cache is f16, paged, `[block][kv_head][slot][dim]` per layer, with one spare
//! block past the engine's (the `trash` block padded rows write into). Per layer (T rows):
//!
//! ```text
//! h[T,D]f16  = add_rmsnorm(x += previous layer's down output)
//! qkv[T,Q+2K] = gemm(h, Wq|Wk|Wv)                           f32, one product
//! rope_kv_write(qkv): rotate q, k in place; k, v → cache[slot_mapping]
//! a[T,Q]f16  = attention(q = qkv rows) over the paged cache
//! o[T,D]     = gemm(a, Wo);  h = add_rmsnorm(x += o)
//! gu[T,2F]   = gemm(h, Wgate|up);  g[T,F]f16 = swiglu(gu);  d[T,D] = gemm(g, Wdown)
//! ```
//!
//! then the final norm of the logits rows, the LM head, and (when asked) the `sample`
//! kernel over the logits rows with the parameters and adjustments from the staging
//! buffer, and the `logprobs` kernel over the rows whose log-probabilities are asked for.
//!
//! A step of few rows whose products run on `gemv_f16` ([`SmallProducts`]) fuses each
//! norm and swiglu into the product after it (`gemv_f16_norm`, `gemv_f16_swiglu`) and
//! RoPE with the cache write into the QKV product (`gemv_f16_norm_rope`): 5 launches a
//! layer instead of 9, with the same bits. Those products read the file's own blocks
//! (`gemv_q4*`, `gemv_q8*`; the K-quants' `gemv_q4f*`, `gemv_q5f*`, `gemv_q6h*`; IQ4's
//! `gemv_iq4*`, `gemv_iq4f*`)
//! instead of the f16 rows where the matrix has them and [`Device::quant_small`] says so
//! for the step's row count.

use super::device::{attention_max_warps, attention_splits, attention_warps, ATTENTION_CHUNK_KEYS};
use super::exec::{Arg, DevBuf, Exec, ExecError};
use super::gemv::{self, Input, QuantBuf, RopeKv, Weights};
use super::staging::{adjust_room, score_room, Layout};
use super::twins::TwinModel;
use super::{norm_launch, swiglu_launch};
use crate::logprobs::SCORE_WORDS;
use crate::model::LlamaConfig;
use cudarc::driver::LaunchConfig;
use half::f16;

struct Layer<E: Exec> {
    attn_norm: E::Buf<f32>,
    wqkv: E::Buf<f16>,
    wo: E::Buf<f16>,
    ffn_norm: E::Buf<f32>,
    w_gate_up: E::Buf<f16>,
    w_down: E::Buf<f16>,
    /// The four matrices in the file's own blocks, where they have them: a stack's parts
    /// one after the other (one a layout: `gemv::QuantRows::stack`), none where not.
    wqkv_q: Vec<QuantBuf<E>>,
    wo_q: Vec<QuantBuf<E>>,
    w_gate_up_q: Vec<QuantBuf<E>>,
    w_down_q: Vec<QuantBuf<E>>,
    k_cache: E::Buf<f16>,
    v_cache: E::Buf<f16>,
}

/// Per-step buffers, sized once.
pub(super) struct Bufs<E: Exec> {
    pub staging: E::Buf<u32>,
    tokens: E::Buf<u32>,
    positions: E::Buf<u32>,
    slots: E::Buf<i32>,
    seq_of_row: E::Buf<i32>,
    tables: E::Buf<i32>,
    logit_rows: E::Buf<i32>,
    x: E::Buf<f32>,
    /// The residual's other copy: fused products of few rows write the sums x + delta
    /// here rather than over x, which their other blocks still read.
    x2: E::Buf<f32>,
    h: E::Buf<f16>,
    qkv: E::Buf<f32>,
    att: E::Buf<f16>,
    o: E::Buf<f32>,
    gu: E::Buf<f32>,
    g: E::Buf<f16>,
    pub logits: E::Buf<f32>,
    /// The rows the `sample` kernel adjusts (penalties, a grammar's mask), as it samples
    /// them: `logits` stays the model's, for the rows read back.
    adjusted: E::Buf<f32>,
    pub sampled: E::Buf<u32>,
    /// The `logprobs` kernel's answers, [`SCORE_WORDS`] words per scored row.
    pub scores: E::Buf<u32>,
    /// Split attention's partial states, `[row < part.rows][kv head][chunk][element][3]`,
    /// and arrival counts per (row, KV head) (see `kernels/cuda/attention.cu`).
    part: E::Buf<f32>,
    arrive: E::Buf<i32>,
}

/// Which attention launches split their rows over several blocks, and the scratch for it.
#[derive(Debug, Clone, Copy)]
struct Split {
    /// The device's multiprocessors.
    sms: usize,
    /// Rows that may split (fewer rows than this leave SMs idle with one block per row
    /// and KV head); rows at or past it keep one block.
    rows: usize,
    /// A row's most chunks.
    chunks: usize,
}

/// A model on one device (a GPU, or the emulator), with its KV cache and step buffers.
pub struct Device<E: Exec> {
    pub exec: E,
    pub config: LlamaConfig,
    embed: E::Buf<f16>,
    layers: Vec<Layer<E>>,
    output_norm: E::Buf<f32>,
    /// The output norm's weights on the host too (hidden states are normalized there).
    output_norm_host: Vec<f32>,
    output: E::Buf<f16>,
    /// The output head in the file's own blocks, where it has them.
    output_q: Vec<QuantBuf<E>>,
    pub block_size: usize,
    /// KV blocks the engine may use (the cache holds one more, the spare).
    pub n_blocks: usize,
    /// The most warps per attention block this build allows (`MAX_WARPS`).
    att_warps: usize,
    split: Split,
    /// Which products of few rows run on `gemv_f16` rather than cuBLAS.
    pub small: SmallProducts,
    /// Of those, which read the file's own blocks (`gemv_q4*`, `gemv_q8*`) where a matrix
    /// has them ([`Device::has_quant`]); the others read the f16 rows.
    pub quant_small: SmallProducts,
    /// Of those, the row counts whose products make their input themselves and whose
    /// QKV product does RoPE and the cache write (`gemv_f16_norm`, `gemv_f16_norm_rope`,
    /// `gemv_f16_swiglu`: 5 launches a layer instead of 9, the same bits; each block
    /// makes the rows it reads, so the inputs are read once a block, not once).
    pub fused: SmallProducts,
    /// Which attention kernel the step launches.
    pub attention: AttentionKernel,
    /// The most shared memory a block may have (the `gemv` kernels' staged rows).
    max_shared: usize,
    pub max_blocks: usize,
    /// Logits rows a step may have: one per sequence, and [`PROMPT_LOGIT_ROWS`] more.
    pub max_logits: usize,
    pub(super) bufs: Bufs<E>,
}

/// The attention kernel a step launches. Each gives a row the same bits whatever the
/// batch around it (a prompt's row and the same row decoded alike); the two differ from
/// each other in rounding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttentionKernel {
    /// `attention_prefill`: f32 arithmetic, one block per (row, KV head); a prompt's keys
    /// are read once per row.
    #[default]
    Simt,
    /// `attention_tc`: tensor cores (f16 operands, f32 sums) over tiles of a sequence's
    /// consecutive rows, each key block read once per tile.
    Tensor,
}

impl AttentionKernel {
    /// The kernel's entry point.
    pub fn entry(self) -> &'static str {
        match self {
            Self::Simt => "attention_prefill",
            Self::Tensor => "attention_tc",
        }
    }

    /// Warps per block for a step of `rows` rows on a build allowing `max`: the SIMT
    /// kernel's more when rows are few ([`attention_warps`]); the tensor-core kernel's
    /// four, one per 16 rows of its tile's matrix.
    pub fn warps(self, rows: usize, max: usize) -> usize {
        match self {
            Self::Simt => attention_warps(rows, max),
            Self::Tensor => 4,
        }
    }
}

/// Logits rows a step may have beyond one per sequence: rows of prompts whose
/// log-probabilities are asked for (`echo` with `logprobs`), 50 MB of logits buffer for
/// SmolLM2's vocabulary.
pub const PROMPT_LOGIT_ROWS: usize = 256;

/// Which row counts of a step's matrix products (1 to [`gemv::MAX_ROWS`]) run on our
/// `gemv_f16` kernel instead of cuBLAS: bit r − 1 for r rows. cuBLAS for all by default;
/// the backend sets it from timings of whole decode steps on the device
/// (`CudaBackend::tune_small_products`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SmallProducts(pub u16);

impl SmallProducts {
    /// Every row count on `gemv`.
    pub const ALL: Self = Self(u16::MAX);

    /// Whether a product of `rows` rows runs on `gemv_f16`.
    pub fn gemv(self, rows: usize) -> bool {
        (1..=gemv::MAX_ROWS).contains(&rows) && self.0 & (1 << (rows - 1)) != 0
    }

    /// The same, with `rows` rows' choice set to `on`.
    pub fn with(self, rows: usize, on: bool) -> Self {
        if !(1..=gemv::MAX_ROWS).contains(&rows) {
            return self;
        }
        let bit = 1u16 << (rows - 1);
        Self(if on { self.0 | bit } else { self.0 & !bit })
    }
}

/// Whether a product of `rows` rows over `k` runs on `gemv` with the kernel before it (a
/// norm or swiglu; and after it, RoPE) made in it: `fused` and `small` say so for the row
/// count and the staged rows fit in `max_shared` bytes, whole or in runs of their columns
/// ([`gemv::column_run`]; [`Device::enqueue`] and what reads its results back).
fn fuses(
    fused: SmallProducts,
    small: SmallProducts,
    rows: usize,
    k: usize,
    max_shared: usize,
) -> bool {
    fused.gemv(rows)
        && small.gemv(rows)
        && gemv::column_run(rows, k, max_shared, gemv::Staged::MOST).is_some()
}

/// Where a step's products of few rows run: which row counts on our `gemv` kernels
/// (`gemv`), and of those which over the file's own blocks (`quant`).
#[derive(Clone, Copy)]
struct Small {
    gemv: SmallProducts,
    quant: SmallProducts,
    /// The most shared memory a block may have (what `gemv`'s staged rows may take).
    shared: usize,
}

impl Small {
    /// A matrix's weights for a `gemv` product of `rows` rows: its file blocks (`q`) where
    /// it has them and `quant` says so, else its f16 rows `w`.
    fn weights<'a, E: Exec>(
        self,
        rows: usize,
        w: &'a E::Buf<f16>,
        q: &'a [QuantBuf<E>],
    ) -> Weights<'a, E> {
        if !q.is_empty() && self.quant.gemv(rows) {
            Weights::Quant(q)
        } else {
            Weights::F16(w, 0)
        }
    }
}

/// `y = x · wᵀ` for `rows` rows: `gemv` where `small` says so and the shape fits (in runs
/// of columns where the rows are too wide to stage whole: `gemv::column_run`; over the
/// file's blocks `q` where `small` says so too), else cuBLAS.
#[allow(clippy::too_many_arguments)]
fn product<E: Exec>(
    e: &E,
    small: Small,
    x: &E::Buf<f16>,
    (w, q): (&E::Buf<f16>, &[QuantBuf<E>]),
    y: &mut E::Buf<f32>,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<(), ExecError> {
    let weights = small.weights(rows, w, q);
    if small.gemv.gemv(rows) && gemv::column_run(rows, k, small.shared, weights.staged()).is_some()
    {
        gemv::gemv_from(e, Input::Rows(x), weights, y, rows, k, n)
    } else {
        e.gemm(x, w, 0, y, rows, k, n)
    }
}

/// How big the KV cache is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCapacity {
    /// This many blocks.
    Blocks(usize),
    /// This share of the device memory free once the weights and step buffers are
    /// loaded, at most `max_blocks` blocks.
    FreeMemory { fraction: f64, max_blocks: usize },
}

fn launch(n: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(block), 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn rows(n: u32, block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl<E: Exec> Device<E> {
    /// Uploads `twin`'s weights to `exec`; a KV cache of `kv` blocks (plus the spare) of
    /// `block_size` tokens; buffers for `max_tokens` rows and `max_seqs` sequences. `exec`
    /// must have the kernels built for the model's attention shape.
    pub fn new(
        exec: E,
        twin: &TwinModel,
        block_size: usize,
        kv: KvCapacity,
        max_tokens: usize,
        max_seqs: usize,
    ) -> Result<Self, ExecError> {
        let e = &exec;
        let c = twin.config.clone();
        let weights = twin
            .layers
            .iter()
            .map(|l| {
                let q = |parts: &[gemv::QuantRows]| {
                    parts
                        .iter()
                        .map(|r| QuantBuf::upload(e, r))
                        .collect::<Result<Vec<_>, ExecError>>()
                };
                let quant: [Vec<QuantBuf<E>>; 4] = [
                    q(&l.quant.wqkv)?,
                    q(l.quant.wo.as_slice())?,
                    q(&l.quant.w_gate_up)?,
                    q(l.quant.w_down.as_slice())?,
                ];
                Ok((
                    (
                        e.upload(&l.attn_norm)?,
                        e.upload(&l.wqkv)?,
                        e.upload(&l.wo)?,
                        e.upload(&l.ffn_norm)?,
                        e.upload(&l.w_gate_up)?,
                        e.upload(&l.w_down)?,
                    ),
                    quant,
                ))
            })
            .collect::<Result<Vec<_>, ExecError>>()?;
        let max_blocks = c.context_len.div_ceil(block_size);
        let max_logits = max_seqs + PROMPT_LOGIT_ROWS.min(max_tokens);
        let (t, d, qd, kvd, f) = (
            max_tokens,
            c.dim,
            c.n_heads * c.head_dim,
            c.kv_dim(),
            c.ffn_dim,
        );
        // Split attention: rows up to one block per SM and KV head may spread their chunks.
        let sms = e.multiprocessors()?;
        let split = Split {
            sms,
            rows: sms.div_ceil(c.n_kv_heads).min(t),
            chunks: (max_blocks * block_size).div_ceil(ATTENTION_CHUNK_KEYS),
        };
        let bufs = Bufs {
            staging: e.zeros(
                Layout::new(max_seqs, t, max_blocks, max_logits).len
                    + adjust_room(max_logits, c.vocab)
                    + score_room(max_logits),
            )?,
            tokens: e.zeros(t)?,
            positions: e.zeros(t)?,
            slots: e.zeros(t)?,
            seq_of_row: e.zeros(t)?,
            tables: e.zeros(max_seqs * max_blocks)?,
            logit_rows: e.zeros(max_logits)?,
            x: e.zeros(t * d)?,
            x2: e.zeros(t * d)?,
            h: e.zeros(t * d)?,
            qkv: e.zeros(t * (qd + 2 * kvd))?,
            att: e.zeros(t * qd)?,
            o: e.zeros(t * d)?,
            gu: e.zeros(t * 2 * f)?,
            g: e.zeros(t * f)?,
            logits: e.zeros(max_logits * c.vocab)?,
            adjusted: e.zeros(max_logits * c.vocab)?,
            sampled: e.zeros(max_logits)?,
            scores: e.zeros(max_logits * SCORE_WORDS)?,
            part: e.zeros((split.rows * split.chunks * qd * 3).max(1))?,
            arrive: e.zeros((split.rows * c.n_kv_heads).max(1))?,
        };
        let embed = e.upload(&twin.embed)?;
        let output_norm = e.upload(&twin.output_norm)?;
        let output = e.upload(&twin.output)?;
        let output_q = twin
            .output_q
            .iter()
            .map(|r| QuantBuf::upload(e, r))
            .collect::<Result<Vec<_>, _>>()?;
        // The KV cache last, from what is left: one spare block past the engine's.
        let block_bytes = 2 * c.n_layers * block_size * c.kv_dim() * std::mem::size_of::<f16>();
        let n_blocks = match kv {
            KvCapacity::Blocks(n) => n,
            KvCapacity::FreeMemory {
                fraction,
                max_blocks,
            } => {
                let free = e.free_memory()?;
                let n = ((free as f64 * fraction) as usize / block_bytes).saturating_sub(1);
                if n == 0 {
                    return Err(ExecError::Bounds(format!(
                        "no device memory left for the KV cache ({free} bytes free after the weights)"
                    )));
                }
                n.min(max_blocks)
            }
        };
        let kv_len = (n_blocks + 1) * block_size * c.kv_dim();
        let layers = weights
            .into_iter()
            .map(
                |((attn_norm, wqkv, wo, ffn_norm, w_gate_up, w_down), quant)| {
                    let [wqkv_q, wo_q, w_gate_up_q, w_down_q] = quant;
                    Ok(Layer {
                        attn_norm,
                        wqkv,
                        wo,
                        ffn_norm,
                        w_gate_up,
                        w_down,
                        wqkv_q,
                        wo_q,
                        w_gate_up_q,
                        w_down_q,
                        k_cache: e.zeros(kv_len)?,
                        v_cache: e.zeros(kv_len)?,
                    })
                },
            )
            .collect::<Result<Vec<_>, ExecError>>()?;
        let group = c.n_heads / c.n_kv_heads;
        // The build's slices, within what the kernels' registers allow per block.
        let fit = ["attention_prefill", "attention_decode"]
            .iter()
            .map(|k| exec.max_threads(k))
            .try_fold(usize::MAX, |m, t| t.map(|t| m.min(t / 32)))?;
        Ok(Self {
            att_warps: attention_max_warps(group, c.head_dim / 32).min(fit).max(1),
            split,
            small: SmallProducts::default(),
            quant_small: SmallProducts::default(),
            fused: SmallProducts::ALL,
            attention: AttentionKernel::default(),
            max_shared: exec.max_shared_bytes()?,
            embed,
            output_norm,
            output_norm_host: twin.output_norm.clone(),
            output,
            output_q,
            n_blocks,
            exec,
            config: c,
            layers,
            block_size,
            max_blocks,
            max_logits,
            bufs,
        })
    }

    /// The matrices held in the file's own blocks, counted by the kernels that read them
    /// (e.g. `"60 q8, 30 q8h"`, a stack of two layouts `"q4f+q8h"`; empty where none is).
    pub fn quant_summary(&self) -> String {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        let held = self
            .layers
            .iter()
            .flat_map(|l| [&l.wqkv_q, &l.wo_q, &l.w_gate_up_q, &l.w_down_q]);
        for parts in held.chain([&self.output_q]).filter(|p| !p.is_empty()) {
            let kinds: Vec<&str> = parts.iter().map(|q| q.kind().unwrap_or("?")).collect();
            *counts.entry(kinds.join("+")).or_default() += 1;
        }
        let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
        parts.join(", ")
    }

    /// Whether any matrix is held in the file's own blocks too (products of few rows may
    /// read them: [`Device::quant_small`]).
    pub fn has_quant(&self) -> bool {
        !self.output_q.is_empty()
            || self.layers.iter().any(|l| {
                !(l.wqkv_q.is_empty()
                    && l.wo_q.is_empty()
                    && l.w_gate_up_q.is_empty()
                    && l.w_down_q.is_empty())
            })
    }

    /// Enqueues one step over the staging buffer (already on the device) laid out as
    /// `lay`, with `n_logits` logits rows; samples them when `sample`. Nothing is
    /// allocated, copied or awaited, and every launch's arguments depend only on `lay`,
    /// `n_logits` and `sample`: a captured graph replays it for any staging contents.
    pub fn enqueue(&mut self, lay: Layout, n_logits: usize, sample: bool) -> Result<(), ExecError> {
        let Self {
            exec: e,
            config: c,
            embed,
            layers,
            output_norm,
            output,
            output_q,
            block_size,
            max_blocks,
            att_warps,
            split,
            small,
            quant_small,
            fused,
            attention,
            max_shared,
            bufs: b,
            ..
        } = self;
        let (t, n_seqs) = (lay.n_tokens, lay.n_seqs);
        let (d, qd, kvd, f) = (c.dim, c.n_heads * c.head_dim, c.kv_dim(), c.ffn_dim);
        let (ti, si, mbi, bsi) = (
            Arg::I32(t as i32),
            Arg::I32(n_seqs as i32),
            Arg::I32(*max_blocks as i32),
            Arg::I32(*block_size as i32),
        );
        let n = t.max(n_seqs * *max_blocks) as u32;
        e.launch(
            "build_batch",
            launch(n, 256),
            &[
                b.staging.arg(),
                b.sampled.arg(),
                si,
                ti,
                mbi,
                bsi,
                b.tokens.arg(),
                b.positions.arg(),
                b.slots.arg(),
                b.seq_of_row.arg(),
                b.tables.arg(),
                b.logit_rows.arg(),
            ],
        )?;
        let (di, eps) = (Arg::I32(d as i32), Arg::F32(c.rms_eps));
        e.launch(
            "embed",
            rows(t as u32, 256),
            &[embed.arg(), b.tokens.arg(), b.x.arg(), di],
        )?;
        let (nh, nkv, hd) = (
            Arg::I32(c.n_heads as i32),
            Arg::I32(c.n_kv_heads as i32),
            Arg::I32(c.head_dim as i32),
        );
        let scale = Arg::F32(1.0 / (c.head_dim as f32).sqrt());
        let (fi, base) = (Arg::I32(f as i32), Arg::F32(c.rope_base));
        let qkv_w = qd + 2 * kvd;
        let qkv_wi = Arg::I32(qkv_w as i32);
        // Products of few rows on gemv_f16 make their input rows themselves: the norms
        // and swiglu are not launched, and the QKV product does RoPE and the cache write.
        // x + delta goes to x2 at the attention's norm and back to x at the feed-forward's,
        // so each layer ends with the residual in x.
        let fused = |rows: usize, k: usize| fuses(*fused, *small, rows, k, *max_shared);
        let small = Small {
            gemv: *small,
            quant: *quant_small,
            shared: *max_shared,
        };
        let fuse = fused(t, d) && fused(t, f);
        for (li, w) in layers.iter_mut().enumerate() {
            // h = rmsnorm(x += the previous layer's down output).
            let delta = (li > 0).then_some(&b.o);
            if fuse {
                let input = Input::Norm {
                    x: &b.x,
                    delta,
                    weight: &w.attn_norm,
                    x_out: Some(&mut b.x2),
                    rows: None,
                    eps: c.rms_eps,
                };
                let rope = RopeKv {
                    positions: &b.positions,
                    slots: &b.slots,
                    k_cache: &mut w.k_cache,
                    v_cache: &mut w.v_cache,
                    n_heads: c.n_heads,
                    n_kv_heads: c.n_kv_heads,
                    head_dim: c.head_dim,
                    block_size: *block_size,
                    base: c.rope_base,
                };
                let weights = small.weights(t, &w.wqkv, w.wqkv_q.as_slice());
                gemv::gemv_rope(e, input, weights, &mut b.qkv, t, d, rope)?;
            } else {
                e.launch(
                    "add_rmsnorm",
                    norm_launch(t),
                    &[
                        b.x.arg(),
                        delta.map_or(Arg::Null, |o| o.arg()),
                        w.attn_norm.arg(),
                        b.h.arg(),
                        Arg::Null,
                        ti,
                        di,
                        eps,
                    ],
                )?;
                let weights = (&w.wqkv, w.wqkv_q.as_slice());
                product(e, small, &b.h, weights, &mut b.qkv, t, d, qkv_w)?;
                let n = (t * c.head_dim / 2) as u32;
                e.launch(
                    "rope_kv_write",
                    launch(n, 256),
                    &[
                        b.qkv.arg(),
                        qkv_wi,
                        b.positions.arg(),
                        b.slots.arg(),
                        w.k_cache.arg(),
                        w.v_cache.arg(),
                        ti,
                        nh,
                        nkv,
                        hd,
                        bsi,
                        base,
                    ],
                )?;
            }
            let splits = if t < split.rows {
                attention_splits(t, c.n_kv_heads, split.sms, split.chunks)
            } else {
                1
            };
            let warps = attention.warps(t, *att_warps);
            let cfg = LaunchConfig {
                grid_dim: (t as u32, c.n_kv_heads as u32, splits as u32),
                block_dim: (32 * warps as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            e.launch(
                attention.entry(),
                cfg,
                &[
                    b.qkv.arg(),
                    qkv_wi,
                    w.k_cache.arg(),
                    w.v_cache.arg(),
                    b.tables.arg(),
                    b.seq_of_row.arg(),
                    b.positions.arg(),
                    b.att.arg(),
                    mbi,
                    nh,
                    nkv,
                    hd,
                    bsi,
                    scale,
                    b.part.arg(),
                    b.arrive.arg(),
                    Arg::I32(split.rows as i32),
                    Arg::I32(split.chunks as i32),
                ],
            )?;
            product(
                e,
                small,
                &b.att,
                (&w.wo, w.wo_q.as_slice()),
                &mut b.o,
                t,
                qd,
                d,
            )?;
            if fuse {
                let input = Input::Norm {
                    x: &b.x2,
                    delta: Some(&b.o),
                    weight: &w.ffn_norm,
                    x_out: Some(&mut b.x),
                    rows: None,
                    eps: c.rms_eps,
                };
                let weights = small.weights(t, &w.w_gate_up, w.w_gate_up_q.as_slice());
                gemv::gemv_from(e, input, weights, &mut b.gu, t, d, 2 * f)?;
                let weights = small.weights(t, &w.w_down, w.w_down_q.as_slice());
                gemv::gemv_from(e, Input::Swiglu(&b.gu), weights, &mut b.o, t, f, d)?;
            } else {
                e.launch(
                    "add_rmsnorm",
                    norm_launch(t),
                    &[
                        b.x.arg(),
                        b.o.arg(),
                        w.ffn_norm.arg(),
                        b.h.arg(),
                        Arg::Null,
                        ti,
                        di,
                        eps,
                    ],
                )?;
                let weights = (&w.w_gate_up, w.w_gate_up_q.as_slice());
                product(e, small, &b.h, weights, &mut b.gu, t, d, 2 * f)?;
                e.launch(
                    "swiglu",
                    swiglu_launch(t, f),
                    &[b.gu.arg(), b.g.arg(), ti, fi],
                )?;
                let weights = (&w.w_down, w.w_down_q.as_slice());
                product(e, small, &b.g, weights, &mut b.o, t, f, d)?;
            }
        }
        if n_logits == 0 {
            return Ok(());
        }
        // x += the last down output, then the final norm of the rows that want logits
        // (packed by `logit_rows`).
        if fused(n_logits, d) {
            let input = Input::Norm {
                x: &b.x,
                delta: Some(&b.o),
                weight: output_norm,
                x_out: None,
                rows: Some(&b.logit_rows),
                eps: c.rms_eps,
            };
            let weights = small.weights(n_logits, output, output_q.as_slice());
            gemv::gemv_from(e, input, weights, &mut b.logits, n_logits, d, c.vocab)?;
        } else {
            e.launch(
                "add_rmsnorm",
                norm_launch(n_logits),
                &[
                    b.x.arg(),
                    b.o.arg(),
                    output_norm.arg(),
                    b.h.arg(),
                    b.logit_rows.arg(),
                    Arg::I32(n_logits as i32),
                    di,
                    eps,
                ],
            )?;
            let weights = (&*output, output_q.as_slice());
            product(e, small, &b.h, weights, &mut b.logits, n_logits, d, c.vocab)?;
        }
        if sample {
            self.enqueue_sample(lay, n_logits)?;
        }
        Ok(())
    }

    /// Whether a step enqueued with `padded` logits rows fused its final norm into the
    /// output head's `gemv_f16` ([`Device::enqueue`]): its last residual add is then not in
    /// `x` (the last down output, in `o`, is still to add).
    fn fuses_final_norm(&self, padded: usize) -> bool {
        fuses(
            self.fused,
            self.small,
            padded,
            self.config.dim,
            self.max_shared,
        )
    }

    /// The final hidden states of logits rows `rows` of the step just run (waited for)
    /// with `padded` logits rows enqueued: the residual after the last layer, normalized
    /// by the output norm, `dim` f32s each, computed here from the device's rows. The
    /// step's last residual add went into `x` (`add_rmsnorm`), or (its final norm fused
    /// into the output head's `gemv_f16`, as [`Device::enqueue`] decides from `padded`)
    /// is the last down output in `o` still to add.
    pub fn final_hidden(&self, rows: &[usize], padded: usize) -> Result<Vec<f32>, ExecError> {
        let (e, b, d) = (&self.exec, &self.bufs, self.config.dim);
        let fused = self.fuses_final_norm(padded);
        let token_rows = e.download_at(&b.logit_rows, 0..padded)?;
        let mut out = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            let t = match token_rows.get(r) {
                Some(&t) if t >= 0 => t as usize,
                _ => {
                    return Err(ExecError::Bounds(format!(
                        "hidden state of logits row {r} of a step with {padded}"
                    )))
                }
            };
            let mut x = e.download_at(&b.x, t * d..(t + 1) * d)?;
            if fused {
                let o = e.download_at(&b.o, t * d..(t + 1) * d)?;
                x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            }
            self.normalize(&x, &mut out);
        }
        Ok(out)
    }

    /// Enqueues the copies back of what the final hidden states of the step just
    /// enqueued with `padded` logits rows are made of, for its token rows `tokens` (those
    /// of the logits rows wanted, [`Batch::logit_positions`]): into `h`, the rows of `x`
    /// (`dim` words each, in that order), then those of `o`, for [`Device::hidden_from`];
    /// one copy per run of consecutive token rows. Returns whether `o`'s rows are part of
    /// it (the final norm fused); only `x`'s are copied otherwise.
    ///
    /// [`Batch::logit_positions`]: crate::forward::Batch::logit_positions
    pub fn receive_hidden(
        &self,
        tokens: &[usize],
        padded: usize,
        h: &mut E::Host,
    ) -> Result<bool, ExecError> {
        let (e, b, d) = (&self.exec, &self.bufs, self.config.dim);
        let fused = self.fuses_final_norm(padded);
        let n = tokens.len();
        for (at, first, rows) in runs(tokens) {
            let r = first * d..(first + rows) * d;
            e.receive(&b.x, r.clone(), h, at * d)?;
            if fused {
                e.receive(&b.o, r, h, (n + at) * d)?;
            }
        }
        Ok(fused)
    }

    /// The final hidden states of `n` rows from the words [`Device::receive_hidden`]
    /// copied back (`fused`: what it returned), `dim` f32s each, as
    /// [`Device::final_hidden`] makes them.
    pub fn hidden_from(&self, words: &[u32], n: usize, fused: bool) -> Vec<f32> {
        let d = self.config.dim;
        let mut out = Vec::with_capacity(n * d);
        let mut x = vec![0f32; d];
        for k in 0..n {
            let xs = &words[k * d..(k + 1) * d];
            for (j, v) in x.iter_mut().enumerate() {
                *v = f32::from_bits(xs[j]);
                if fused {
                    *v += f32::from_bits(words[(n + k) * d + j]);
                }
            }
            self.normalize(&x, &mut out);
        }
        out
    }

    /// Appends `x` through the output norm (RMS norm, the model's weights) to `out`.
    fn normalize(&self, x: &[f32], out: &mut Vec<f32>) {
        let d = self.config.dim;
        let ss: f32 = x.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / d as f32 + self.config.rms_eps).sqrt();
        out.extend(
            x.iter()
                .zip(&self.output_norm_host)
                .map(|(v, w)| v * inv * w),
        );
    }

    /// Enqueues the `sample` kernel over a step's `n_logits` logits rows, with the
    /// parameters and adjustments of the staging buffer laid out as `lay` (the end of
    /// [`Device::enqueue`]'s step; or, for a step whose adjustments came later, launched
    /// after their copy).
    pub fn enqueue_sample(&mut self, lay: Layout, n_logits: usize) -> Result<(), ExecError> {
        let Self {
            exec: e,
            config: c,
            bufs: b,
            ..
        } = self;
        {
            let st = &b.staging;
            e.launch(
                "sample",
                rows(n_logits as u32, super::twins::SAMPLE_THREADS as u32),
                &[
                    b.logits.arg(),
                    b.adjusted.arg(),
                    Arg::I32(c.vocab as i32),
                    st.arg_at_as::<f32>(lay.temperature())?,
                    st.arg_at_as::<i32>(lay.top_k())?,
                    st.arg_at_as::<f32>(lay.top_p())?,
                    st.arg_at_as::<u64>(lay.seeds())?,
                    st.arg_at_as::<u32>(lay.steps())?,
                    st.arg_at_as::<u32>(lay.adjust())?,
                    st.arg_at_as::<u32>(lay.len..st.elems())?,
                    b.tokens.arg(),
                    b.logit_rows.arg(),
                    b.sampled.arg(),
                ],
            )?;
        }
        Ok(())
    }

    /// Enqueues the `logprobs` kernel over `n` scored rows of the last step, whose words
    /// ([`crate::logprobs::Score::words`]) start at word `at` of the staging buffer: their
    /// answers go to the first rows of the `scores` buffer. After the step's `sample`
    /// kernel (a row may report the token it drew).
    pub fn enqueue_logprobs(&mut self, at: usize, n: usize) -> Result<(), ExecError> {
        if n == 0 {
            return Ok(());
        }
        let b = &self.bufs;
        self.exec.launch(
            "logprobs",
            rows(n as u32, super::twins::SAMPLE_THREADS as u32),
            &[
                b.logits.arg(),
                Arg::I32(self.config.vocab as i32),
                b.staging.arg_at_as::<u32>(at..at + 3 * n)?,
                b.sampled.arg(),
                b.scores.arg(),
            ],
        )
    }
}

/// `rows` as runs of consecutive rows, in order: (where the run starts among `rows`, its
/// first row, how many).
pub(crate) fn runs(rows: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut out: Vec<(usize, usize, usize)> = Vec::new();
    for (i, &r) in rows.iter().enumerate() {
        match out.last_mut() {
            Some((_, first, n)) if *first + *n == r => *n += 1,
            _ => out.push((i, r, 1)),
        }
    }
    out
}
