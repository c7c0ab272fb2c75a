//! The forward step's device work, enqueued on the GPU's stream: the CPU twins' chain
//! ([`super::twins::TwinModel::forward`]) launched kernel for kernel, with cuBLAS for the
//! matrix products. [`Device::enqueue`] only enqueues (no allocation, no copy, no
//! synchronization), so the same call runs eagerly or is captured into a CUDA graph.
//!
//! Weights are dequantized once at load to f16 (matrices) and f32 (norms) and stay on the
//! device; products run as `cublasGemmEx` with f16 inputs, f32 accumulation and output.
//! The KV cache is f16, paged, `[block][kv_head][slot][dim]` per layer, with one spare
//! block past the engine's (the `trash` block padded rows read, never written). Per layer
//! (T rows):
//!
//! ```text
//! h[T,D]f16  = add_rmsnorm(x += previous layer's down output)
//! qkv[T,Q+2K] = gemm(h, Wq|Wk|Wv)                           f32, one product
//! rope_kv_write(qkv): (+ Q/K/V biases) rotate q, k in place; k, v → cache[slot_mapping]
//! a[T,Q]f16  = attention(q = qkv rows) over the paged cache (a windowed layer's rows
//!              over their last `window` positions)
//! o[T,D]     = gemm(a, Wo);  h = add_rmsnorm(x += o)
//! gu[T,2F]   = gemm(h, Wgate|up);  g[T,F]f16 = swiglu(gu);  d[T,D] = gemm(g, Wdown)
//! ```
//!
//! (Gemma's: `embed` scales by √D, `geglu` for `swiglu`, and Gemma 2's and 3's post-norms,
//! `head_rmsnorm` over o's and d's rows before each is added; Gemma 2's `softcap` over the
//! logits.)
//!
//! (a mixture of experts' layer: the last line is `moe`'s router product, routing,
//! sorting, the experts' products and their weighted sum into d).
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
//!
//! Here the step's enqueueing; the model's upload and the buffers' sizes in `load`, where
//! products of few rows run in `small`, the final hidden states read back in `hidden`.

use super::device::{attention_splits, attention_warps};
use super::exec::{Arg, DevBuf, Exec, ExecError};
use super::gemv::{self, Input, QuantBuf, RopeKv};
use super::staging::Layout;
use super::{norm_launch, swiglu_launch};
use crate::model::{Activation, LlamaConfig};
use cudarc::driver::LaunchConfig;
use half::f16;
pub use moe::MAX_EXPERTS;
pub use small::SmallProducts;
use small::{fuses, product, Small};

struct Layer<E: Exec> {
    attn_norm: E::Buf<f32>,
    wqkv: E::Buf<f16>,
    /// Q's, K's and V's biases (Qwen2's), where the model has them: `rope_kv_write` adds
    /// them.
    bqkv: Option<E::Buf<f32>>,
    /// The Q and K heads' norms' weights (Qwen3's), where the model has them:
    /// `head_rmsnorm` applies them before `rope_kv_write`.
    qk_norm: Option<(E::Buf<f32>, E::Buf<f32>)>,
    wo: E::Buf<f16>,
    ffn_norm: E::Buf<f32>,
    ffn: Ffn<E>,
    /// The four matrices in the file's own blocks, where they have them: a stack's parts
    /// one after the other (one a layout: `gemv::QuantRows::stack`), none where not.
    wqkv_q: Vec<QuantBuf<E>>,
    wo_q: Vec<QuantBuf<E>>,
    w_gate_up_q: Vec<QuantBuf<E>>,
    w_down_q: Vec<QuantBuf<E>>,
    k_cache: E::Buf<f16>,
    v_cache: E::Buf<f16>,
    /// The norms of the attention's and the feed-forward block's outputs (Gemma 2's and
    /// 3's), where the model has them: `head_rmsnorm` over each output row, in place.
    post_norms: Option<(E::Buf<f32>, E::Buf<f32>)>,
}

/// A layer's feed-forward block on the device.
enum Ffn<E: Exec> {
    /// Stacked gate|up rows, and down.
    Dense {
        w_gate_up: E::Buf<f16>,
        w_down: E::Buf<f16>,
    },
    /// A mixture of experts (`moe`).
    Experts(Box<moe::Experts<E>>),
}

/// Per-step buffers, sized once.
pub(super) struct Bufs<E: Exec> {
    pub staging: E::Buf<u32>,
    tokens: E::Buf<u32>,
    positions: E::Buf<u32>,
    slots: E::Buf<i32>,
    seq_of_row: E::Buf<i32>,
    tables: E::Buf<i32>,
    /// The same two for the windowed layers' own pool, where they keep one (else one
    /// word each, unread).
    slots_w: E::Buf<i32>,
    tables_w: E::Buf<i32>,
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
    /// The `logprobs` kernel's answers, [`SCORE_WORDS`](crate::logprobs::SCORE_WORDS)
    /// words per scored row.
    pub scores: E::Buf<u32>,
    /// Split attention's partial states, `[row < part.rows][kv head][chunk][element][3]`,
    /// and arrival counts per (row, KV head) (see `kernels/cuda/attention.cu`).
    part: E::Buf<f32>,
    arrive: E::Buf<i32>,
    /// The mixtures of experts' scratch, where the model has them.
    moe: Option<moe::Scratch<E>>,
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
    /// RoPE's frequency per rotation pair ([`LlamaConfig::rope_inv_freq`]: the file's
    /// factors or scale applied), which the kernels that rotate read.
    rope_inv_freq: E::Buf<f32>,
    /// The windowed layers' own frequencies, where the model has them (Gemma 3's).
    rope_inv_freq_local: Option<E::Buf<f32>>,
    /// The output norm's weights on the host too (hidden states are normalized there).
    output_norm_host: Vec<f32>,
    output: E::Buf<f16>,
    /// The output head in the file's own blocks, where it has them.
    output_q: Vec<QuantBuf<E>>,
    pub block_size: usize,
    /// KV blocks the engine may use (the cache holds one more, the spare).
    pub n_blocks: usize,
    /// The windowed layers' own pool's blocks, where they keep one ([`KvRequest`]): their
    /// caches hold that many (and a spare), named by the sequences' window tables.
    pub window_blocks: Option<usize>,
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

/// The KV cache a device is loaded with: its size, and where the model's windowed layers
/// keep a pool of their own, its blocks (their caches hold only each sequence's window:
/// [`crate::backend::Backend::kv_window_blocks`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvRequest {
    pub capacity: KvCapacity,
    pub window_blocks: Option<usize>,
}

impl From<KvCapacity> for KvRequest {
    fn from(capacity: KvCapacity) -> Self {
        Self {
            capacity,
            window_blocks: None,
        }
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
            rope_inv_freq,
            rope_inv_freq_local,
            output,
            output_q,
            block_size,
            max_blocks,
            window_blocks,
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
        // The windowed layers' own pool, where they keep one: their tables and slots.
        let own = |li: usize| window_blocks.is_some() && c.window_at(li).is_some();
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
                Arg::I32(lay.windowed as i32),
                b.slots_w.arg(),
                b.tables_w.arg(),
            ],
        )?;
        let (di, eps) = (Arg::I32(d as i32), Arg::F32(c.rms_eps));
        e.launch(
            "embed",
            rows(t as u32, 256),
            &[
                embed.arg(),
                b.tokens.arg(),
                b.x.arg(),
                di,
                Arg::F32(c.embed_scale),
            ],
        )?;
        let (nh, nkv, hd) = (
            Arg::I32(c.n_heads as i32),
            Arg::I32(c.n_kv_heads as i32),
            Arg::I32(c.head_dim as i32),
        );
        let scale = Arg::F32(c.attention_scale());
        let fi = Arg::I32(f as i32);
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
        // The QKV product's fused RoPE computes unscaled frequencies, adds no biases and
        // norms no heads; a model whose file scales them, has biases on Q, K and V or norms
        // its Q and K heads takes rope_kv_write (after head_rmsnorm), which does. The fused
        // products add each block's output to the residual as it is, and gate by silu:
        // Gemma's (post-norms, GELU, a windowed layer's own RoPE base) take the kernels
        // one by one.
        let plain = layers.iter().all(|l| {
            l.bqkv.is_none()
                && l.qk_norm.is_none()
                && l.post_norms.is_none()
                && matches!(l.ffn, Ffn::Dense { .. })
        }) && c.act == Activation::Silu
            && rope_inv_freq_local.is_none();
        let (one_head, no_heads) = (Arg::I32(1), Arg::I32(0));
        // A block's output rows normed in place (Gemma's post-norms): head_rmsnorm with one
        // head the row's width.
        let post_norm = |e: &mut E, o: &E::Buf<f32>, w: &E::Buf<f32>| {
            e.launch(
                "head_rmsnorm",
                norm_launch(t),
                &[
                    o.arg(),
                    di,
                    ti,
                    one_head,
                    no_heads,
                    di,
                    w.arg(),
                    Arg::Null,
                    eps,
                ],
            )
        };
        let fuse = fused(t, d) && fused(t, f) && !c.rope_scaled() && plain;
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
                    slots: if own(li) { &b.slots_w } else { &b.slots },
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
                if let Some((q_w, k_w)) = &w.qk_norm {
                    e.launch(
                        "head_rmsnorm",
                        norm_launch(t * (c.n_heads + c.n_kv_heads)),
                        &[
                            b.qkv.arg(),
                            qkv_wi,
                            ti,
                            nh,
                            nkv,
                            hd,
                            q_w.arg(),
                            k_w.arg(),
                            eps,
                        ],
                    )?;
                }
                let n = (t * c.head_dim / 2) as u32;
                // A NoPE layer's (SmolLM3's) turns no pair: all pass.
                let (turned, pass_scale) = c.rope_pass_at(li);
                e.launch(
                    "rope_kv_write",
                    launch(n, 256),
                    &[
                        b.qkv.arg(),
                        qkv_wi,
                        b.positions.arg(),
                        if own(li) { &b.slots_w } else { &b.slots }.arg(),
                        w.k_cache.arg(),
                        w.v_cache.arg(),
                        ti,
                        nh,
                        nkv,
                        hd,
                        bsi,
                        match (c.local_rope_at(li), &*rope_inv_freq_local) {
                            (true, Some(local)) => local.arg(),
                            _ => rope_inv_freq.arg(),
                        },
                        Arg::I32(turned as i32),
                        Arg::F32(pass_scale),
                        w.bqkv.as_ref().map_or(Arg::Null, |b| b.arg()),
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
                    if own(li) { &b.tables_w } else { &b.tables }.arg(),
                    b.seq_of_row.arg(),
                    b.positions.arg(),
                    b.att.arg(),
                    mbi,
                    nh,
                    nkv,
                    hd,
                    bsi,
                    scale,
                    Arg::I32(c.window_at(li).unwrap_or(0) as i32),
                    Arg::F32(c.attn_softcap.unwrap_or(0.0)),
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
            if let Some((attn, _)) = &w.post_norms {
                post_norm(e, &b.o, attn)?;
            }
            if let (true, Ffn::Dense { w_gate_up, w_down }) = (fuse, &w.ffn) {
                let input = Input::Norm {
                    x: &b.x2,
                    delta: Some(&b.o),
                    weight: &w.ffn_norm,
                    x_out: Some(&mut b.x),
                    rows: None,
                    eps: c.rms_eps,
                };
                let weights = small.weights(t, w_gate_up, w.w_gate_up_q.as_slice());
                gemv::gemv_from(e, input, weights, &mut b.gu, t, d, 2 * f)?;
                let weights = small.weights(t, w_down, w.w_down_q.as_slice());
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
                match (&w.ffn, &mut b.moe) {
                    (Ffn::Dense { w_gate_up, w_down }, _) => {
                        let weights = (w_gate_up, w.w_gate_up_q.as_slice());
                        product(e, small, &b.h, weights, &mut b.gu, t, d, 2 * f)?;
                        let act = match c.act {
                            Activation::Silu => "swiglu",
                            Activation::GeluTanh => "geglu",
                        };
                        e.launch(act, swiglu_launch(t, f), &[b.gu.arg(), b.g.arg(), ti, fi])?;
                        let weights = (w_down, w.w_down_q.as_slice());
                        product(e, small, &b.g, weights, &mut b.o, t, f, d)?;
                    }
                    (Ffn::Experts(x), Some(scratch)) => {
                        let io = moe::Io {
                            h: &b.h,
                            gu: &mut b.gu,
                            g: &mut b.g,
                            out: &mut b.o,
                            t,
                            d,
                        };
                        moe::enqueue(e, small, x, scratch, io)?;
                    }
                    (Ffn::Experts(_), None) => {
                        return Err(ExecError::Bounds(
                            "a mixture of experts without its scratch".into(),
                        ))
                    }
                }
            }
            if let Some((_, ffn)) = &w.post_norms {
                post_norm(e, &b.o, ffn)?;
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
        if let Some(cap) = c.final_softcap {
            e.launch(
                "softcap",
                swiglu_launch(n_logits, c.vocab),
                &[
                    b.logits.arg(),
                    Arg::I32(n_logits as i32),
                    Arg::I32(c.vocab as i32),
                    Arg::F32(cap),
                ],
            )?;
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
                    st.arg_at_as::<f32>(lay.min_p())?,
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

mod hidden;
mod load;
mod moe;
mod small;
