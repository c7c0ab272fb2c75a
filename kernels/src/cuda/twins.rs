//! The CPU twin of every CUDA kernel: the same inputs, layouts, precisions (f16 storage,
//! f32 arithmetic) and algorithm, written plainly. Parity tests compare each kernel with
//! its twin on fresh random inputs; [`TwinModel::forward`] chains the twins in the order
//! the CUDA backend launches the kernels, and is itself checked against the CPU engine.
//! The sampling kernel's twin is the engine's sampling rule, [`crate::sampler::sample`].
//!
//! Layouts (T rows, S sequences, B max blocks per sequence):
//! - staging (u32): S × {start, len, pos0, want_logits}, T token ids, S × B block ids
//! - KV cache of one layer, keys and values alike: `[block][kv_head][slot][dim]`, f16

use super::backend::FixedSmall;
use super::gemv::QuantRows;
use super::staging::READ_ONLY;
use crate::backend::FROM_LAST;
use crate::forward::Batch;
use crate::model::{LlamaConfig, QkNorm};
use half::f16;

/// The packed inputs of one step, as `build_batch` makes them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepInputs {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub slot_mapping: Vec<i32>,
    pub seq_of_row: Vec<i32>,
    pub block_tables: Vec<i32>,
    /// Last row of each sequence that wants logits, in order; then −1.
    pub logit_rows: Vec<i32>,
    /// The slots and tables in the windowed layers' own pool, where the staging has
    /// their tables (empty where not).
    pub slot_mapping_w: Vec<i32>,
    pub block_tables_w: Vec<i32>,
}

/// The part of a batch's staging words that `build_batch` reads (`max_blocks` table
/// entries per sequence; [`super::staging`] has the whole layout).
pub fn stage(batch: &Batch, max_blocks: usize) -> Vec<u32> {
    stage_windowed(batch, max_blocks, None)
}

/// The same, with the sequences' window tables after theirs where `trash_w` (the windowed
/// layers' own pool's spare block) is given.
pub fn stage_windowed(batch: &Batch, max_blocks: usize, trash_w: Option<u32>) -> Vec<u32> {
    let (n, t) = (batch.seqs.len(), batch.tokens.len());
    let windowed = trash_w.is_some();
    let lay = super::staging::Layout::with_window(n, t, max_blocks, batch.n_logits(), windowed);
    let mut out = vec![0; lay.len];
    super::staging::write(&mut out, batch, 0, max_blocks, 0, trash_w, &[], &[], &[]);
    out.truncate(4 * n + t + (1 + windowed as usize) * n * max_blocks);
    out
}

/// Largest |a − b| relative to the largest |b|: how far a GPU result is from its twin's
/// (infinity when the lengths differ or a value is NaN).
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() {
            f32::INFINITY
        } else {
            m.max(d)
        }
    }) / scale
}

/// Twin of `build_batch` (`sampled`: the step before's sampled tokens, which a token word
/// `FROM_LAST | r` stands for the r-th of; a block-table entry with [`READ_ONLY`] is the
/// block, and a row that reads it at its position writes no slot: −1).
pub fn build_batch(
    staging: &[u32],
    sampled: &[u32],
    n_seqs: usize,
    n_tokens: usize,
    max_blocks: usize,
    block_size: usize,
) -> StepInputs {
    build_batch_windowed(
        staging, sampled, n_seqs, n_tokens, max_blocks, block_size, false,
    )
}

/// Twin of `build_batch` with its `windowed` flag: the window tables follow the tables in
/// `staging`, and their slots and tables come out too.
pub fn build_batch_windowed(
    staging: &[u32],
    sampled: &[u32],
    n_seqs: usize,
    n_tokens: usize,
    max_blocks: usize,
    block_size: usize,
    windowed: bool,
) -> StepInputs {
    let heads = &staging[..4 * n_seqs];
    let toks = &staging[4 * n_seqs..4 * n_seqs + n_tokens];
    let tables = &staging[4 * n_seqs + n_tokens..];
    let mut o = StepInputs {
        tokens: toks
            .iter()
            .map(|&t| {
                if t & FROM_LAST != 0 {
                    sampled[(t & !FROM_LAST) as usize]
                } else {
                    t
                }
            })
            .collect(),
        positions: vec![0; n_tokens],
        slot_mapping: vec![0; n_tokens],
        seq_of_row: vec![0; n_tokens],
        block_tables: tables[..n_seqs * max_blocks]
            .iter()
            .map(|&b| (b & !READ_ONLY) as i32)
            .collect(),
        logit_rows: Vec::new(),
        slot_mapping_w: Vec::new(),
        block_tables_w: Vec::new(),
    };
    let slot = |blk: u32, pos: u32| {
        if blk & READ_ONLY != 0 {
            -1
        } else {
            blk as i32 * block_size as i32 + (pos as usize % block_size) as i32
        }
    };
    let tables_w = &tables[n_seqs * max_blocks..];
    if windowed {
        o.block_tables_w = tables_w[..n_seqs * max_blocks]
            .iter()
            .map(|&b| (b & !READ_ONLY) as i32)
            .collect();
    }
    for i in 0..n_tokens {
        let s = (0..n_seqs)
            .rev()
            .find(|&s| heads[4 * s] as usize <= i)
            .unwrap_or(0);
        let pos = heads[4 * s + 2] + (i as u32 - heads[4 * s]);
        o.positions[i] = pos;
        o.seq_of_row[i] = s as i32;
        o.slot_mapping[i] = slot(tables[s * max_blocks + pos as usize / block_size], pos);
        if windowed {
            let blk = tables_w[s * max_blocks + pos as usize / block_size];
            o.slot_mapping_w.push(slot(blk, pos));
        }
    }
    for s in 0..n_seqs {
        let end = heads[4 * s] + heads[4 * s + 1];
        o.logit_rows
            .extend((end - heads[4 * s + 3]..end).map(|r| r as i32));
    }
    // Entries past the last wanted one (up to one per sequence) are unused.
    let n = o.logit_rows.len().max(n_seqs);
    o.logit_rows.resize(n, -1);
    o
}

/// Twin of `embed` (each row times `scale`: Gemma's √dim, else 1).
pub fn embed(table: &[f16], tokens: &[u32], dim: usize, scale: f32) -> Vec<f32> {
    tokens
        .iter()
        .flat_map(|&t| table[t as usize * dim..(t as usize + 1) * dim].iter())
        .map(|h| h.to_f32() * scale)
        .collect()
}

/// Twin of `add_rmsnorm` (one output row per entry of `rows`, or per row of `x`; `delta`'s
/// row is added to each normalized row of `x` first).
pub fn add_rmsnorm(
    x: &mut [f32],
    delta: Option<&[f32]>,
    w: &[f32],
    rows: Option<&[i32]>,
    dim: usize,
    eps: f32,
) -> Vec<f16> {
    let n_out = rows.map_or(x.len() / dim, |r| r.len());
    let mut out = vec![f16::ZERO; n_out * dim];
    for i in 0..n_out {
        let r = rows.map_or(i as i32, |r| r[i]);
        if r < 0 {
            continue;
        }
        let xr = &mut x[r as usize * dim..(r as usize + 1) * dim];
        if let Some(d) = delta {
            for (a, b) in xr.iter_mut().zip(&d[r as usize * dim..]) {
                *a += b;
            }
        }
        let ss: f32 = xr.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / dim as f32 + eps).sqrt();
        for d in 0..dim {
            out[i * dim + d] = f16::from_f32(xr[d] * inv * w[d]);
        }
    }
    out
}

/// Twin of `head_rmsnorm`: the RMSNorm of each Q head (by `norm.q`) and each K head (by
/// `norm.k`) of each of `qkv`'s rows (`stride` floats a row: q heads, k heads, v heads) in
/// place.
pub fn head_rmsnorm(qkv: &mut [f32], stride: usize, n_rows: usize, c: &LlamaConfig, norm: &QkNorm) {
    let (qd, kvd) = (c.n_heads * c.head_dim, c.kv_dim());
    for row in qkv.chunks_mut(stride).take(n_rows) {
        crate::ops::head_rmsnorm(&mut row[..qd], &norm.q, c.rms_eps);
        crate::ops::head_rmsnorm(&mut row[qd..qd + kvd], &norm.k, c.rms_eps);
    }
}

/// Twin of `rope_kv_write` into layer `layer`'s cache: adds `bias` (q|k|v, where the model
/// has one) to each row of `qkv` in place (`stride` floats per row: q heads, k heads, v
/// heads), rotates its q and k heads in place (by the windowed layers' own frequencies
/// on a windowed layer that has them: [`LlamaConfig::rope_inv_freq_local`]; the pairs past
/// the turned ones, partial RoPE's and all of a NoPE layer's, multiplied by
/// [`LlamaConfig::rope_pass_at`]'s scale instead) and writes the rotated keys and the
/// values to the paged cache at the row's slot (none where it is −1).
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_write(
    qkv: &mut [f32],
    stride: usize,
    positions: &[u32],
    slot_mapping: &[i32],
    kc: &mut [f16],
    vc: &mut [f16],
    c: &LlamaConfig,
    block_size: usize,
    bias: Option<&[f32]>,
    layer: usize,
) {
    let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
    let inv_freq = c.rope_inv_freq_at(layer);
    let (turned, pass) = c.rope_pass_at(layer);
    for (r, (&pos, &sm)) in positions.iter().zip(slot_mapping).enumerate() {
        let row = &mut qkv[r * stride..][..(nh + 2 * nkv) * hd];
        if let Some(b) = bias {
            row.iter_mut().zip(b).for_each(|(x, b)| *x += b);
        }
        for h in 0..nh + nkv {
            let x = &mut row[h * hd..][..hd];
            for (p, &f) in inv_freq.iter().enumerate() {
                let (s, co) = match p < turned {
                    true => (pos as f32 * f).sin_cos(),
                    false => (0.0, pass),
                };
                let (a, b) = (x[2 * p], x[2 * p + 1]);
                x[2 * p] = a * co - b * s;
                x[2 * p + 1] = a * s + b * co;
            }
        }
        if sm < 0 {
            continue;
        }
        let (blk, slot) = (sm as usize / block_size, sm as usize % block_size);
        for kvh in 0..nkv {
            let at = ((blk * nkv + kvh) * block_size + slot) * hd;
            for d in 0..hd {
                kc[at + d] = f16::from_f32(row[(nh + kvh) * hd + d]);
                vc[at + d] = f16::from_f32(row[(nh + nkv + kvh) * hd + d]);
            }
        }
    }
}

/// Twin of `attention_prefill` (and of `attention_decode`, with `seq_of_row[r] = r`) for
/// layer `layer` (its sliding window, [`LlamaConfig::window_at`], and the model's soft cap
/// on the scores, where it has them).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    q_stride: usize,
    kc: &[f16],
    vc: &[f16],
    block_tables: &[i32],
    seq_of_row: &[i32],
    positions: &[u32],
    max_blocks: usize,
    c: &LlamaConfig,
    layer: usize,
    block_size: usize,
) -> Vec<f16> {
    let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
    let group = nh / nkv;
    let scale = c.attention_scale();
    let mut out = vec![f16::ZERO; positions.len() * nh * hd];
    let mut scores = Vec::new();
    for (r, &pos) in positions.iter().enumerate() {
        let table = &block_tables[seq_of_row[r] as usize * max_blocks..][..max_blocks];
        let n = pos as usize + 1;
        let lo = c.window_at(layer).map_or(0, |w| n.saturating_sub(w));
        for h in 0..nh {
            let kvh = h / group;
            let qh = &q[r * q_stride + h * hd..][..hd];
            let at = |j: usize| {
                let blk = table[j / block_size] as usize;
                ((blk * nkv + kvh) * block_size + j % block_size) * hd
            };
            scores.clear();
            scores.extend((lo..n).map(|j| {
                let kb = &kc[at(j)..][..hd];
                let s = qh
                    .iter()
                    .zip(kb)
                    .map(|(a, b)| a * scale * b.to_f32())
                    .sum::<f32>();
                c.attn_softcap.map_or(s, |cap| cap * (s / cap).tanh())
            }));
            crate::ops::softmax(&mut scores);
            for d in 0..hd {
                let s: f32 = (lo..n)
                    .zip(&scores)
                    .map(|(j, p)| p * vc[at(j) + d].to_f32())
                    .sum();
                out[(r * nh + h) * hd + d] = f16::from_f32(s);
            }
        }
    }
    out
}

/// Twin of `geglu` (GELU's tanh form, as `x / (1 + e^(−2y))`), or of `swiglu` for
/// [`Activation::Silu`](crate::model::Activation::Silu).
pub fn glu(act: crate::model::Activation, gu: &[f32], rows: usize, ffn: usize) -> Vec<f16> {
    if act == crate::model::Activation::Silu {
        return swiglu(gu, rows, ffn);
    }
    let mut out = Vec::with_capacity(rows * ffn);
    for r in 0..rows {
        let (g, u) = gu[r * 2 * ffn..(r + 1) * 2 * ffn].split_at(ffn);
        out.extend(g.iter().zip(u).map(|(&x, &u)| {
            let y = 0.797_884_6 * (x + 0.044_715 * x * x * x);
            f16::from_f32(x / (1.0 + (-2.0 * y).exp()) * u)
        }));
    }
    out
}

/// Twin of `softcap`.
pub fn softcap(x: &mut [f32], cap: f32) {
    x.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
}

/// Twin of `head_rmsnorm` over a block's output rows (`dim` wide, one "head" a row, in
/// place): Gemma's post-norms.
pub fn post_norm(x: &mut [f32], w: &[f32], eps: f32) {
    crate::ops::head_rmsnorm(x, w, eps);
}

/// Twin of `swiglu`.
pub fn swiglu(gu: &[f32], rows: usize, ffn: usize) -> Vec<f16> {
    let mut out = Vec::with_capacity(rows * ffn);
    for r in 0..rows {
        let (g, u) = gu[r * 2 * ffn..(r + 1) * 2 * ffn].split_at(ffn);
        out.extend(
            g.iter()
                .zip(u)
                .map(|(&g, &u)| f16::from_f32(g / (1.0 + (-g).exp()) * u)),
        );
    }
    out
}

/// Twin of `moe_route`: each of `rows` rows' `used` choices among `n_experts` router
/// `logits` (greatest first, the lower index on a tie) and their weights (softmax
/// probabilities, over the chosen ones' sum where `norm`), `used` entries a row.
pub fn moe_route(
    logits: &[f32],
    rows: usize,
    n_experts: usize,
    used: usize,
    norm: bool,
) -> (Vec<i32>, Vec<f32>) {
    let (mut expert, mut weight) = (Vec::new(), Vec::new());
    for l in logits.chunks(n_experts).take(rows) {
        let mx = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = l.iter().map(|&v| (v - mx).exp()).sum();
        let order = crate::moe::choice_order(l);
        let p: Vec<f32> = order[..used].iter().map(|&e| (l[e] - mx).exp()).collect();
        let over = if norm { p.iter().sum() } else { total };
        expert.extend(order[..used].iter().map(|&e| e as i32));
        weight.extend(p.iter().map(|p| p / over));
    }
    (expert, weight)
}

/// The places of a step's expert entries, by expert (`moe_sort`'s output).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MoePlaces {
    /// `n_experts + 1`: where each expert's places start (the last: the entries' count).
    pub offsets: Vec<i32>,
    /// The entry at each place.
    pub order: Vec<i32>,
    /// Each entry's place.
    pub slot: Vec<i32>,
    /// `n_experts`: the experts with places in index order, then −1s (the experts'
    /// products' slots).
    pub active: Vec<i32>,
}

/// Twin of `moe_sort`: `expert`'s entries placed by expert, each expert's in entry order.
pub fn moe_sort(expert: &[i32], n_experts: usize) -> MoePlaces {
    let mut order: Vec<i32> = (0..expert.len() as i32).collect();
    order.sort_by_key(|&i| expert[i as usize]);
    let mut slot = vec![0; expert.len()];
    for (p, &i) in order.iter().enumerate() {
        slot[i as usize] = p as i32;
    }
    let offsets: Vec<i32> = (0..=n_experts as i32)
        .map(|e| expert.iter().filter(|&&x| x < e).count() as i32)
        .collect();
    let mut active: Vec<i32> = (0..n_experts)
        .filter(|&e| offsets[e + 1] > offsets[e])
        .map(|e| e as i32)
        .collect();
    active.resize(n_experts, -1);
    MoePlaces {
        offsets,
        order,
        slot,
        active,
    }
}

/// Twin of `moe_gemv`, `moe_gemv_q8` and `moe_tc_*` (the weights as [`ExpertRows`] holds
/// them, the sums in f32 in order): `y[p] = x[row(p)] · w[e]ᵀ` for each place p of
/// expert e (`w`: `[E][n][k]`), row(p) = `order[p] / gather` where `gather` > 0, else p.
pub fn moe_gemv(
    x: &[f16],
    places: &MoePlaces,
    gather: usize,
    w: &ExpertRows,
    k: usize,
    n: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    let total = places.order.len();
    let mut y = vec![0f32; total * n];
    // Experts no place chose are not read (a step's twin reads what the kernel reads).
    let chosen = places
        .offsets
        .windows(2)
        .enumerate()
        .filter(|(_, p)| p[1] > p[0]);
    for (e, pair) in chosen {
        let (p0, p1) = (pair[0] as usize, pair[1] as usize);
        let rows: Vec<Vec<f32>> = (p0..p1)
            .map(|p| {
                let row = match gather {
                    0 => p,
                    g => places.order[p] as usize / g,
                };
                x[row * k..(row + 1) * k]
                    .iter()
                    .map(|v| v.to_f32())
                    .collect()
            })
            .collect();
        // The expert's columns in parallel, each weight row made once for its places.
        let cols: Vec<Vec<f32>> = (0..n)
            .into_par_iter()
            .map_init(
                || vec![0f32; k],
                |wr, c| {
                    w.row_f32(e * n + c, k, wr);
                    let dot = |xr: &Vec<f32>| xr.iter().zip(wr.iter()).map(|(a, b)| a * b).sum();
                    rows.iter().map(dot).collect()
                },
            )
            .collect();
        for (c, col) in cols.iter().enumerate() {
            for (i, &v) in col.iter().enumerate() {
                y[(p0 + i) * n + c] = v;
            }
        }
    }
    y
}

/// The experts' matrices as the CUDA backend holds them: f16, signed bytes under an f16
/// scale per 32 (Q8_0's values: about half the bytes), or the file's own blocks as the
/// `gemv` kernels lay them out (a Q4_K expert in about a quarter of f16's bytes).
#[derive(Debug, Clone, PartialEq)]
pub enum ExpertRows {
    F16(Vec<f16>),
    Q8(Q8Rows),
    Blocks(ExpertBlocks),
}

/// Every expert's matrix of one role in its file's own blocks: `parts[i][e]` is expert
/// e's part i (its rows whole, or its gate's rows then its up's where their layouts
/// differ), each part of one layout `moe_tc` reads for every expert.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertBlocks {
    pub parts: Vec<Vec<QuantRows>>,
}

impl ExpertBlocks {
    /// `experts`' stacks (each expert's parts, [`QuantRows::stack`]) as one role's blocks;
    /// `None` unless every expert has the same parts, each of one layout and shape that
    /// `moe_tc` reads (an expert's words under 2³¹).
    pub fn new(experts: Vec<Vec<QuantRows>>) -> Option<Self> {
        let n_parts = experts.first()?.len();
        let mut parts: Vec<Vec<QuantRows>> = vec![Vec::with_capacity(experts.len()); n_parts];
        for stack in experts {
            if stack.len() != n_parts {
                return None;
            }
            for (part, q) in parts.iter_mut().zip(stack) {
                part.push(q);
            }
        }
        let readable = n_parts > 0 && parts.iter().all(|p| super::gemv::readable(p));
        readable.then_some(Self { parts })
    }

    /// Rows of one expert (its parts').
    pub fn rows(&self) -> usize {
        self.parts.iter().map(|p| p[0].rows).sum()
    }
}

/// Rows of signed bytes (`q`, as u8) under an f16 scale per 32 consecutive values
/// (`scales`), the rows' length a multiple of 32.
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Rows {
    pub q: Vec<u8>,
    pub scales: Vec<f16>,
}

impl Q8Rows {
    /// `v` as Q8_0 quantizes it: each 32 values' greatest magnitude over 127 the scale (in
    /// f16), each value rounded to the nearest multiple of it.
    pub fn quantize(v: &[f16]) -> Self {
        use rayon::prelude::*;
        // Runs of blocks side by side, written in place.
        const RUN: usize = 2048;
        let mut q = vec![0u8; v.len()];
        let mut scales = vec![f16::ZERO; v.len().div_ceil(32)];
        q.par_chunks_mut(32 * RUN)
            .zip(scales.par_chunks_mut(RUN))
            .zip(v.par_chunks(32 * RUN))
            .for_each(|((q, s), v)| {
                for ((qb, d), vb) in q.chunks_mut(32).zip(s.iter_mut()).zip(v.chunks(32)) {
                    let mut x = [0f32; 32];
                    for (o, h) in x.iter_mut().zip(vb) {
                        *o = h.to_f32();
                    }
                    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                    *d = f16::from_f32(amax / 127.0);
                    let inv = if d.to_f32() > 0.0 {
                        1.0 / d.to_f32()
                    } else {
                        0.0
                    };
                    for (o, v) in qb.iter_mut().zip(&x) {
                        *o = (v * inv).round().clamp(-127.0, 127.0) as i8 as u8;
                    }
                }
            });
        Self { q, scales }
    }
}

impl ExpertRows {
    /// Row `r` (of `k` values) in f32.
    pub fn row_f32(&self, r: usize, k: usize, out: &mut [f32]) {
        match self {
            Self::F16(w) => {
                for (o, v) in out.iter_mut().zip(&w[r * k..(r + 1) * k]) {
                    *o = v.to_f32();
                }
            }
            Self::Q8(m) => {
                for (j, o) in out.iter_mut().enumerate().take(k) {
                    let at = r * k + j;
                    *o = m.q[at] as i8 as f32 * m.scales[at / 32].to_f32();
                }
            }
            Self::Blocks(b) => {
                let n = b.rows();
                let (e, mut c) = (r / n, r % n);
                for part in &b.parts {
                    let q = &part[e];
                    if c < q.rows {
                        return q.row_f32(c, &mut out[..k]);
                    }
                    c -= q.rows;
                }
            }
        }
    }

    /// Bytes on the device.
    pub fn bytes(&self) -> usize {
        match self {
            Self::F16(w) => 2 * w.len(),
            Self::Q8(m) => m.q.len() + 2 * m.scales.len(),
            Self::Blocks(b) => b.parts.iter().flatten().map(QuantRows::bytes).sum(),
        }
    }
}

/// Twin of `moe_combine`: each of `rows` rows the weighted sum of its `used` entries'
/// rows of `y` (at their places), plus `σ(h[r]·gate) · s[r]` where `shared` is
/// `(h, gate, s)`.
pub fn moe_combine(
    y: &[f32],
    places: &MoePlaces,
    weight: &[f32],
    used: usize,
    shared: Option<(&[f16], &[f32], &[f32])>,
    rows: usize,
    d: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * d];
    for r in 0..rows {
        let g = shared.map(|(h, gate, _)| {
            let v: f32 = h[r * d..(r + 1) * d]
                .iter()
                .zip(gate)
                .map(|(a, b)| a.to_f32() * b)
                .sum();
            1.0 / (1.0 + (-v).exp())
        });
        for i in 0..d {
            let mut acc = 0f32;
            for j in 0..used {
                let at = places.slot[r * used + j] as usize;
                acc += weight[r * used + j] * y[at * d + i];
            }
            if let (Some(g), Some((_, _, s))) = (g, shared) {
                acc += g * s[r * d + i];
            }
            out[r * d + i] = acc;
        }
    }
    out
}

/// The `sample` kernel's twin: the engine's sampling rule ([`crate::sampler`]).
pub use crate::sampler::{sample, SampleParams};

/// Threads per block of the `sample` kernel.
pub const SAMPLE_THREADS: usize = 1024;

/// A model's weights as the CUDA backend holds them: f16 matrices (dequantized once at
/// load), f32 norms.
pub struct TwinModel {
    pub config: LlamaConfig,
    pub embed: Vec<f16>,
    pub layers: Vec<TwinLayer>,
    pub output_norm: Vec<f32>,
    /// `vocab × dim`.
    pub output: Vec<f16>,
    /// The output head in the file's own blocks, where the CPU holds them with the file's
    /// values (the products of few rows may read them: `gemv_q4*`, `gemv_q8*`).
    pub output_q: Option<QuantRows>,
}

pub struct TwinLayer {
    pub attn_norm: Vec<f32>,
    /// Stacked Q|K|V rows: `(q_dim + 2·kv_dim) × dim`.
    pub wqkv: Vec<f16>,
    /// Q's, K's and V's biases, one after the other, where the model has them.
    pub qkv_bias: Option<Vec<f32>>,
    /// The Q and K heads' norms, where the model has them.
    pub qk_norm: Option<QkNorm>,
    /// `dim × q_dim`.
    pub wo: Vec<f16>,
    pub ffn_norm: Vec<f32>,
    /// Stacked gate|up rows: `2·ffn × dim`.
    pub w_gate_up: Vec<f16>,
    /// `dim × ffn`.
    pub w_down: Vec<f16>,
    /// A mixture of experts in place of the dense block, where the model has one (its
    /// `w_gate_up` and `w_down` then empty).
    pub moe: Option<TwinMoe>,
    /// The same four matrices in the file's own blocks, each where the CPU holds them
    /// with the file's values (a stack where its parts are one matrix there).
    pub quant: LayerQuant,
    /// The norms of the attention's and the feed-forward block's outputs (Gemma 2's and
    /// 3's), where the model has them.
    pub post_norms: Option<(Vec<f32>, Vec<f32>)>,
}

/// A mixture of experts as the CUDA backend holds it: the router in f16, the experts'
/// matrices as [`ExpertHolding`] says, each expert's after the one before.
pub struct TwinMoe {
    pub config: crate::model::MoeConfig,
    /// `count × dim`.
    pub router: Vec<f16>,
    /// Each expert's stacked gate|up rows: `count × 2·ffn × dim`.
    pub gate_up: ExpertRows,
    /// `count × dim × ffn`.
    pub down: ExpertRows,
    /// Qwen2-MoE's shared expert, where the model has one.
    pub shared: Option<TwinShared>,
}

/// A shared expert: its gate's weights (`dim`, f32), stacked gate|up rows
/// (`2·shared_ffn × dim`) and down (`dim × shared_ffn`).
pub struct TwinShared {
    pub gate: Vec<f32>,
    pub gate_up: Vec<f16>,
    pub down: Vec<f16>,
}

impl TwinMoe {
    /// The block's output for `t` rows of `h` (normed, `dim` wide), kernel by kernel in the
    /// CUDA backend's order.
    pub fn forward(&self, h: &[f16], t: usize, d: usize) -> Vec<f32> {
        let c = &self.config;
        let (ne, k, f) = (c.count, c.used, c.ffn);
        let logits = gemm(h, &self.router, t, d, ne);
        let (expert, weight) = moe_route(&logits, t, ne, k, c.norm);
        let places = moe_sort(&expert, ne);
        let gu = moe_gemv(h, &places, k, &self.gate_up, d, 2 * f);
        let g = swiglu(&gu, t * k, f);
        let y = moe_gemv(&g, &places, 0, &self.down, f, d);
        let shared = self.shared.as_ref().map(|s| {
            let sf = s.down.len() / d;
            let g = swiglu(&gemm(h, &s.gate_up, t, d, 2 * sf), t, sf);
            (s, gemm(&g, &s.down, t, sf, d))
        });
        let shared = shared.as_ref().map(|(s, y)| (h, &s.gate[..], &y[..]));
        moe_combine(&y, &places, &weight, k, shared, t, d)
    }
}

/// A layer's matrices in the file's own blocks, where they have them: a stack's parts,
/// one after the other ([`QuantRows::stack`]: one where they are of one layout), none
/// where a part has no blocks the kernels read.
#[derive(Default)]
pub struct LayerQuant {
    pub wqkv: Vec<QuantRows>,
    pub wo: Option<QuantRows>,
    pub w_gate_up: Vec<QuantRows>,
    pub w_down: Option<QuantRows>,
}

/// `m` in its file's own blocks, where products may read them as they are; else, where
/// the CPU's packed form holds values the blocks do not (a K-quant's f32 scales, Q6_K's
/// per 16, offsets of a block each), the same integers under those scales
/// ([`QuantRows::from_packed`]); else the blocks and their offsets per 16 (Q2_K's,
/// [`QuantRows::from_offsets`]); `TOLLGATE_KQUANT_SCALES=f32` or `=factored` holds every
/// such matrix's scales that way instead, to time whole steps each way (f32 pairs: more
/// bytes, carried in the tiles; factored: staged in shared memory).
fn quant_rows(m: &crate::matmul::Matrix) -> Option<QuantRows> {
    use super::gemv::Scales;
    match m.file_blocks() {
        Some((ty, data)) => QuantRows::from_blocks(ty, data, m.rows, m.cols),
        None => match m.packed_values() {
            Some(p) => {
                let forced = match std::env::var("TOLLGATE_KQUANT_SCALES").as_deref() {
                    Ok("f32") => Some(Scales::F32Pairs),
                    Ok("factored") => Some(Scales::Factored),
                    _ => None,
                };
                forced
                    .and_then(|s| QuantRows::from_packed_as(p, s))
                    .or_else(|| QuantRows::from_packed(p))
            }
            None => {
                let (ty, data, offsets) = m.blocks_with_offsets()?;
                QuantRows::from_offsets(ty, data, &offsets, m.rows, m.cols)
            }
        },
    }
}

/// A stack of projections in its file's own blocks: one matrix of them, or the parts the
/// CPU holds apart (e.g. Q5_K's, whose offsets keep them from stacking there; Q4_K_M's
/// Q4_K Q and K and Q6_K V), those of one layout joined.
fn quant_stack(p: &crate::model::Projections) -> Vec<QuantRows> {
    match p {
        // Blocks with offsets beside them (Q2_K's) are laid out part by part, once: a part
        // may be of another layout (a Q3_K V beside Q2_K's Q and K, its offsets zero).
        crate::model::Projections::Stacked { m, widths } => {
            match (m.file_blocks(), m.packed_values()) {
                (None, None) => quant_parts(m, widths).map(QuantRows::stack),
                _ => quant_rows(m).map(|r| vec![r]),
            }
            .unwrap_or_default()
        }
        crate::model::Projections::Separate(parts) => parts
            .iter()
            .map(quant_rows)
            .collect::<Option<Vec<QuantRows>>>()
            .map(QuantRows::stack)
            .unwrap_or_default(),
    }
}

/// A stacked matrix with offsets, its parts (`widths` rows each) each in its own layout:
/// the CPU stacks blocks of one type with the parts' offsets (zeros for a part without:
/// Q2_K's Q and K beside Q3_K's V in llama.cpp's Q2_K mix, all Q8_0 there), where the
/// kernels read each part at its own bits ([`QuantRows::from_offsets`], or the blocks
/// alone where its offsets are all zero; [`QuantRows::stack`] joins those of one layout).
/// `None` where a part has no layout.
fn quant_parts(m: &crate::matmul::Matrix, widths: &[usize]) -> Option<Vec<QuantRows>> {
    let (ty, data, offsets) = m.blocks_with_offsets()?;
    let (row_bytes, row_offsets) = (data.len() / m.rows, offsets.values.len() / m.rows);
    let mut r0 = 0;
    let mut parts = Vec::with_capacity(widths.len());
    for &w in widths {
        let d = &data[r0 * row_bytes..(r0 + w) * row_bytes];
        let values = offsets.values[r0 * row_offsets..(r0 + w) * row_offsets].to_vec();
        r0 += w;
        parts.push(if values.iter().all(|&v| v == 0.0) {
            QuantRows::from_blocks(ty, d, w, m.cols)?
        } else {
            let o = crate::matmul::Offsets {
                run: offsets.run,
                values,
            };
            QuantRows::from_offsets(ty, d, &o, w, m.cols)?
        });
    }
    Some(parts)
}

/// `m`'s rows in f16, as the CPU holds them (rows in parallel).
fn rows_f16(m: &crate::matmul::Matrix) -> Vec<f16> {
    use rayon::prelude::*;
    let mut out = vec![f16::ZERO; m.rows * m.cols];
    out.par_chunks_mut(m.cols.max(1)).enumerate().for_each_init(
        || vec![0f32; m.cols],
        |row, (r, o)| {
            m.row_f32(r, row);
            for (o, &v) in o.iter_mut().zip(row.iter()) {
                *o = f16::from_f32(v);
            }
        },
    );
    out
}

fn stacked_f16(p: &crate::model::Projections) -> Vec<f16> {
    match p {
        crate::model::Projections::Stacked { m, .. } => rows_f16(m),
        crate::model::Projections::Separate(parts) => parts.iter().flat_map(rows_f16).collect(),
    }
}

/// `y[rows × n] = x[rows × k] · w[n × k]ᵀ`, f16 inputs, f32 accumulation (cuBLAS's
/// `GemmEx` with f16 A/B, f32 C and compute).
pub fn gemm(x: &[f16], w: &[f16], rows: usize, k: usize, n: usize) -> Vec<f32> {
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let mut y = vec![0f32; rows * n];
    let mut wrow = vec![0f32; k];
    for j in 0..n {
        for (a, b) in wrow.iter_mut().zip(&w[j * k..(j + 1) * k]) {
            *a = b.to_f32();
        }
        for r in 0..rows {
            y[r * n + j] = xf[r * k..(r + 1) * k]
                .iter()
                .zip(&wrow)
                .map(|(a, b)| a * b)
                .sum();
        }
    }
    y
}

/// One layer's f16 KV cache (keys and values).
pub struct TwinKv {
    pub k: Vec<Vec<f16>>,
    pub v: Vec<Vec<f16>>,
    pub block_size: usize,
    pub n_blocks: usize,
}

/// The file's own values of tensors `names`, stacked, in f16 (as one matrix of their
/// rows), each tensor's rows split and permuted as load reads the CPU's
/// ([`crate::model::row_runs`]: Q's and K's, where the file's RoPE is NEOX's, within
/// Phi-3's fused `attn_qkv` too).
fn file_f16(g: &crate::gguf::Gguf, names: &[String], c: &LlamaConfig) -> Option<Vec<f16>> {
    let mut out = Vec::new();
    for name in names {
        let t = g.tensor(name)?;
        let mut at = out.len();
        file_f16_into(g, t, &mut out);
        let (cols, rows) = (t.dims[0], t.n_elems() / t.dims[0].max(1));
        for (n, neox) in crate::model::row_runs(c, name, rows) {
            let run = out.get_mut(at..at + n * cols)?;
            if let Some(h) = neox {
                let pairs = crate::model::neox_to_pairs(run, n, h);
                run.copy_from_slice(&pairs);
            }
            at += n * cols;
        }
    }
    Some(out)
}

/// How a mixture's experts are held on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertHolding {
    /// In the file's own blocks ([`ExpertRows::Blocks`]: the fewest bytes, read by the
    /// tensor-core `moe_tc_*`) where the CPU holds the file's values and every expert's
    /// matrices are of a layout `moe_tc` reads; else as Q8_0's values (half the bytes of
    /// f16, read at half the cost) where the file's experts are quantized and both their
    /// widths are multiples of 32; else f16.
    #[default]
    Auto,
    F16,
    /// As Q8_0's values wherever the widths allow.
    Q8,
    /// In the file's blocks wherever they can be (else as `Auto` goes on).
    Blocks,
}

impl ExpertHolding {
    /// `TOLLGATE_EXPERTS=f16`, `=q8` or `=blocks`; else `Auto`.
    pub fn from_env() -> Self {
        match std::env::var("TOLLGATE_EXPERTS").as_deref() {
            Ok("f16") => Self::F16,
            Ok("q8") => Self::Q8,
            Ok("blocks") => Self::Blocks,
            _ => Self::Auto,
        }
    }

    /// Whether the experts may be held in the file's own blocks.
    fn blocks(self) -> bool {
        matches!(self, Self::Auto | Self::Blocks)
    }

    /// Whether `x`'s experts (in a model `dim` wide) are held as Q8_0's values.
    pub fn q8(self, x: &crate::model::Experts, dim: usize) -> bool {
        let widths = dim.is_multiple_of(32) && x.config.ffn.is_multiple_of(32);
        let quant = |m: &crate::matmul::Matrix| matches!(m.data, crate::matmul::MatData::Quant(..));
        let quantized = x.experts.iter().all(|e| {
            quant(&e.down)
                && match &e.gate_up {
                    crate::model::Projections::Stacked { m, .. } => quant(m),
                    crate::model::Projections::Separate(parts) => parts.iter().all(quant),
                }
        });
        match self {
            Self::F16 => false,
            Self::Q8 => widths,
            Self::Auto | Self::Blocks => widths && quantized,
        }
    }
}

/// `x`'s experts in the file's own blocks (each expert's gate|up stack, [`quant_stack`],
/// and its down rows), where every one is of a layout `moe_tc` reads (the experts in
/// parallel).
fn expert_blocks(x: &crate::model::Experts) -> Option<(ExpertBlocks, ExpertBlocks)> {
    use rayon::prelude::*;
    let each: Vec<(Vec<QuantRows>, QuantRows)> = x
        .experts
        .par_iter()
        .map(|e| Some((quant_stack(&e.gate_up), quant_rows(&e.down)?)))
        .collect::<Option<_>>()?;
    let (gate_up, down): (Vec<_>, Vec<_>) = each.into_iter().map(|(g, d)| (g, vec![d])).unzip();
    Some((ExpertBlocks::new(gate_up)?, ExpertBlocks::new(down)?))
}

/// Layer `i`'s experts' own values from the file (stacked tensors or one per expert): each
/// expert's gate rows then its up rows
/// (`count × 2·ffn × dim`), and the down rows (`count × dim × ffn`); `None` where a tensor
/// is missing or of another size.
fn file_experts(
    g: &crate::gguf::Gguf,
    i: usize,
    c: &LlamaConfig,
    moe: &crate::model::MoeConfig,
) -> Option<(Vec<f16>, Vec<f16>)> {
    let len = moe.count * moe.ffn * c.dim;
    let read = |role: &str| {
        let names = crate::model::expert_tensors(g, i, role, moe.count);
        file_f16(g, &names, c).filter(|v| v.len() == len)
    };
    let (gate, up, down) = (read("ffn_gate")?, read("ffn_up")?, read("ffn_down")?);
    let per = moe.ffn * c.dim;
    let gate_up = gate
        .chunks(per)
        .zip(up.chunks(per))
        .flat_map(|(g, u)| g.iter().chain(u))
        .copied()
        .collect();
    Some((gate_up, down))
}

/// Appends tensor `t`'s values to `out` in f16.
fn file_f16_into(g: &crate::gguf::Gguf, t: &crate::gguf::TensorInfo, out: &mut Vec<f16>) {
    use rayon::prelude::*;
    // A run of whole blocks at a time, in parallel.
    const RUN: usize = 4096;
    let (data, at) = (g.data(t), out.len());
    out.resize(at + t.n_elems(), f16::ZERO);
    let (elems, bytes) = (t.ty.block_elems(), t.ty.block_bytes());
    out[at..]
        .par_chunks_mut(RUN * elems)
        .zip(data.par_chunks(RUN * bytes))
        .for_each_init(
            || vec![0f32; RUN * elems],
            |v, (o, src)| {
                let v = &mut v[..o.len()];
                crate::quant::dequantize_row(t.ty, src, v);
                for (o, &x) in o.iter_mut().zip(v.iter()) {
                    *o = f16::from_f32(x);
                }
            },
        );
}

impl TwinModel {
    /// Dequantizes a loaded model's weights to f16 (as the CUDA backend does at load).
    /// Where converting a layout for the CPU kernels moved values (`kquant`), every
    /// matrix is read from the file instead: f16 holds its own values (to 2⁻¹¹).
    pub fn from_model(m: &crate::forward::Model) -> Self {
        Self::holding(m, ExpertHolding::from_env())
    }

    /// [`TwinModel::from_model`] with a mixture's experts held as `experts` says.
    pub fn holding(m: &crate::forward::Model, experts: ExpertHolding) -> Self {
        let start = std::time::Instant::now();
        let twin = Self::convert(m, experts);
        tracing::info!(
            secs = format!("{:.2}", start.elapsed().as_secs_f64()),
            threads = rayon::current_num_threads(),
            "weights converted for the GPU"
        );
        twin
    }

    fn convert(m: &crate::forward::Model, experts: ExpertHolding) -> Self {
        if let Some(path) = &m.weights.inexact_from {
            let exact = crate::gguf::Gguf::open(path)
                .ok()
                .and_then(|g| Self::build(m, Some(&g), experts));
            if let Some(exact) = exact {
                return exact;
            }
            tracing::warn!(file = %path.display(),
                "cannot read the model file again: the GPU path keeps the CPU's converted matrices");
        }
        Self::build(m, None, experts)
            .unwrap_or_else(|| unreachable!("the CPU's matrices are always there"))
    }

    /// The weights in f16: each matrix from `file`'s own values when given (`None` if a
    /// tensor is missing or of another size than the CPU's matrix), else as the CPU
    /// kernels hold them.
    fn build(
        m: &crate::forward::Model,
        file: Option<&crate::gguf::Gguf>,
        experts: ExpertHolding,
    ) -> Option<Self> {
        use crate::model::Projections;
        let w = &m.weights;
        let from_file = |names: &[String], len: usize| {
            file.map(|g| file_f16(g, names, &m.config).filter(|v| v.len() == len))
        };
        let one =
            |names: &[String], x: &crate::matmul::Matrix| match from_file(names, x.rows * x.cols) {
                Some(v) => v,
                None => Some(rows_f16(x)),
            };
        let stacked = |names: &[String], p: &Projections| {
            let len = match p {
                Projections::Stacked { m, .. } => m.rows * m.cols,
                Projections::Separate(parts) => parts.iter().map(|x| x.rows * x.cols).sum(),
            };
            match from_file(names, len) {
                Some(v) => v,
                None => Some(stacked_f16(p)),
            }
        };
        let out_name = match file.and_then(|g| g.tensor("output.weight")) {
            Some(_) => "output.weight",
            None => "token_embd.weight",
        };
        // The file's blocks where the CPU holds them with the file's values (no value
        // moved), unless `TOLLGATE_SMALL_PRODUCTS` fixes products that never read them
        // (the blocks would be made, and take device memory, for nothing).
        let fixed = FixedSmall::from_env();
        let quant = w.inexact_from.is_none()
            && !matches!(fixed, Some(FixedSmall::Cublas | FixedSmall::Gemv));
        // The layers in parallel (and each matrix's rows within them).
        use rayon::prelude::*;
        let layers = w.layers.par_iter().enumerate().map(|(i, l)| {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            // The tensors as load reads them: Phi-3's fused ones hold the same rows,
            // stacked as these are.
            let has = |s: &str| file.is_some_and(|g| g.tensor(&n(s)).is_some());
            let qkv = match has("attn_qkv") {
                true => vec![n("attn_qkv")],
                false => vec![n("attn_q"), n("attn_k"), n("attn_v")],
            };
            let gate_up = match has("ffn_gate") {
                true => vec![n("ffn_gate"), n("ffn_up")],
                false => vec![n("ffn_up")],
            };
            let (w_gate_up, w_down, moe) = match &l.ffn {
                crate::model::Ffn::Dense { gate_up: g, w_down } => {
                    (stacked(&gate_up, g)?, one(&[n("ffn_down")], w_down)?, None)
                }
                crate::model::Ffn::Experts(x) => {
                    // The file's blocks where the CPU holds the file's values.
                    let blocks = (experts.blocks() && w.inexact_from.is_none())
                        .then(|| expert_blocks(x))
                        .flatten();
                    let (gate_up, down) = match blocks {
                        Some((gu, d)) => (ExpertRows::Blocks(gu), ExpertRows::Blocks(d)),
                        None => {
                            let exps = match file {
                                Some(g) => Some(file_experts(g, i, &m.config, &x.config)?),
                                None => None,
                            };
                            let (gate_up, down) = exps.unwrap_or_else(|| {
                                let gu = x.experts.iter().flat_map(|e| stacked_f16(&e.gate_up));
                                let down = x.experts.iter().flat_map(|e| rows_f16(&e.down));
                                (gu.collect(), down.collect())
                            });
                            let q8 = experts.q8(x, m.config.dim);
                            let hold = |v: Vec<f16>| match q8 {
                                true => ExpertRows::Q8(Q8Rows::quantize(&v)),
                                false => ExpertRows::F16(v),
                            };
                            (hold(gate_up), hold(down))
                        }
                    };
                    let shared = match &x.shared {
                        Some((gate, e)) => Some(TwinShared {
                            gate: gate.clone(),
                            gate_up: stacked(
                                &[n("ffn_gate_shexp"), n("ffn_up_shexp")],
                                &e.gate_up,
                            )?,
                            down: one(&[n("ffn_down_shexp")], &e.down)?,
                        }),
                        None => None,
                    };
                    let moe = TwinMoe {
                        config: x.config,
                        router: one(&[n("ffn_gate_inp")], &x.router)?,
                        gate_up,
                        down,
                        shared,
                    };
                    (Vec::new(), Vec::new(), Some(moe))
                }
            };
            Some(TwinLayer {
                attn_norm: l.attn_norm.clone(),
                wqkv: stacked(&qkv, &l.qkv)?,
                qkv_bias: l.qkv_bias.clone(),
                qk_norm: l.qk_norm.clone(),
                wo: one(&[n("attn_output")], &l.wo)?,
                ffn_norm: l.ffn_norm.clone(),
                w_gate_up,
                w_down,
                moe,
                quant: if quant {
                    LayerQuant {
                        wqkv: quant_stack(&l.qkv),
                        wo: quant_rows(&l.wo),
                        w_gate_up: l.dense().map(|d| quant_stack(d.0)).unwrap_or_default(),
                        w_down: l.dense().and_then(|d| quant_rows(d.1)),
                    }
                } else {
                    LayerQuant::default()
                },
                post_norms: l
                    .post_norms
                    .as_ref()
                    .map(|p| (p.attn.clone(), p.ffn.clone())),
            })
        });
        let layers = layers.collect::<Option<Vec<TwinLayer>>>()?;
        Some(Self {
            config: m.config.clone(),
            embed: one(&["token_embd.weight".into()], &w.token_embd)?,
            layers,
            output_norm: w.output_norm.clone(),
            output: one(&[out_name.into()], w.output())?,
            output_q: quant.then(|| quant_rows(w.output())).flatten(),
        })
    }

    pub fn kv(&self, block_size: usize, n_blocks: usize) -> TwinKv {
        let c = &self.config;
        let n = n_blocks * block_size * c.kv_dim();
        TwinKv {
            k: vec![vec![f16::ZERO; n]; c.n_layers],
            v: vec![vec![f16::ZERO; n]; c.n_layers],
            block_size,
            n_blocks,
        }
    }

    /// One step, kernel by kernel in the CUDA backend's order. Returns logits
    /// (`n_logits × vocab`).
    pub fn forward(&self, batch: &Batch, kv: &mut TwinKv) -> Vec<f32> {
        self.forward_hidden(batch, kv).0
    }

    /// [`TwinModel::forward`], and the logits rows' final hidden states (normalized by
    /// the output norm, `n_logits × dim`, as the output head takes them: in f16).
    pub fn forward_hidden(&self, batch: &Batch, kv: &mut TwinKv) -> (Vec<f32>, Vec<f32>) {
        let c = &self.config;
        let (d, qd, kvd, f) = (c.dim, c.n_heads * c.head_dim, c.kv_dim(), c.ffn_dim);
        let max_blocks = c.context_len.div_ceil(kv.block_size);
        let staging = stage(batch, max_blocks);
        let (s, t) = (batch.seqs.len(), batch.tokens.len());
        let inp = build_batch(&staging, &[], s, t, max_blocks, kv.block_size);
        let mut x = embed(&self.embed, &inp.tokens, d, c.embed_scale);
        let mut delta: Option<Vec<f32>> = None;
        for (li, l) in self.layers.iter().enumerate() {
            let h = add_rmsnorm(&mut x, delta.as_deref(), &l.attn_norm, None, d, c.rms_eps);
            let w = qd + 2 * kvd;
            let mut qkv = gemm(&h, &l.wqkv, t, d, w);
            if let Some(n) = &l.qk_norm {
                head_rmsnorm(&mut qkv, w, t, c, n);
            }
            rope_kv_write(
                &mut qkv,
                w,
                &inp.positions,
                &inp.slot_mapping,
                &mut kv.k[li],
                &mut kv.v[li],
                c,
                kv.block_size,
                l.qkv_bias.as_deref(),
                li,
            );
            let a = attention(
                &qkv,
                w,
                &kv.k[li],
                &kv.v[li],
                &inp.block_tables,
                &inp.seq_of_row,
                &inp.positions,
                max_blocks,
                c,
                li,
                kv.block_size,
            );
            let mut o = gemm(&a, &l.wo, t, qd, d);
            if let Some((attn, _)) = &l.post_norms {
                post_norm(&mut o, attn, c.rms_eps);
            }
            let h = add_rmsnorm(&mut x, Some(&o), &l.ffn_norm, None, d, c.rms_eps);
            let mut out = match &l.moe {
                Some(moe) => moe.forward(&h, t, d),
                None => {
                    let gu = gemm(&h, &l.w_gate_up, t, d, 2 * f);
                    let g = glu(c.act, &gu, t, f);
                    gemm(&g, &l.w_down, t, f, d)
                }
            };
            if let Some((_, ffn)) = &l.post_norms {
                post_norm(&mut out, ffn, c.rms_eps);
            }
            delta = Some(out);
        }
        // The last residual add and the final norm, of the rows that want logits only.
        let n_logits = batch.n_logits();
        let rows: Vec<i32> = inp.logit_rows[..n_logits].to_vec();
        let h = add_rmsnorm(
            &mut x,
            delta.as_deref(),
            &self.output_norm,
            Some(&rows),
            d,
            c.rms_eps,
        );
        let mut logits = gemm(&h, &self.output, n_logits, d, c.vocab);
        if let Some(cap) = c.final_softcap {
            softcap(&mut logits, cap);
        }
        (logits, h.iter().map(|v| v.to_f32()).collect())
    }
}
