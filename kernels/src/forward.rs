//! The forward step over a *packed batch*: many sequences, each a run of consecutive
//! positions (a prefill chunk, or one decode token), concatenated into one token list.
//! Each sequence reads and writes its keys and values through its own block table.
//!
//! Shapes (T = tokens in the batch, D = dim, Q = heads·head_dim, K = kv heads·head_dim,
//! F = ffn dim, V = vocab, S = sequences that want logits):
//!
//! ```text
//! x[T,D]   = embed(tokens)
//! per layer:
//!   h      = rmsnorm(x) · attn_norm
//!   q[T,Q], k[T,K], v[T,K] = h·Wqᵀ, h·Wkᵀ, h·Wvᵀ ; rope(q, k) at each token's position
//!   cache[seq, pos] ← k, v
//!   a[T,Q] = causal GQA attention of q over its sequence's cache
//!   x     += a·Woᵀ
//!   h      = rmsnorm(x) · ffn_norm
//!   x     += (silu(h·Wgateᵀ) ⊙ h·Wupᵀ)·Wdownᵀ
//! logits[S,V] = rmsnorm(x[last row of each seq]) · output_norm · Woutᵀ
//! ```

use crate::kv::KvCache;
use crate::matmul::{matmul, ActPrecision, Acts};
use crate::model::{LlamaConfig, Projections, Weights};
use crate::ops;
use rayon::prelude::*;

/// One sequence's part of a packed batch.
#[derive(Debug, Clone)]
pub struct BatchSeq {
    /// First row of this sequence in `Batch::tokens`.
    pub start: usize,
    /// Rows (consecutive positions).
    pub len: usize,
    /// KV blocks of this sequence, covering every position up to its last row.
    pub block_table: Vec<u32>,
    /// Whether to return logits for the last row.
    pub logits: bool,
}

/// A packed batch.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub seqs: Vec<BatchSeq>,
}

impl Batch {
    /// Appends a sequence's run of tokens starting at position `pos0`.
    pub fn push(&mut self, tokens: &[u32], pos0: usize, block_table: Vec<u32>, logits: bool) {
        let start = self.tokens.len();
        self.tokens.extend_from_slice(tokens);
        self.positions
            .extend((0..tokens.len()).map(|i| (pos0 + i) as u32));
        self.seqs.push(BatchSeq {
            start,
            len: tokens.len(),
            block_table,
            logits,
        });
    }

    pub fn n_logits(&self) -> usize {
        self.seqs.iter().filter(|s| s.logits).count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("bad batch: {0}")]
    BadBatch(String),
    /// The device failed the step (CUDA driver or cuBLAS error).
    #[error("device: {0}")]
    Device(String),
}

/// A loaded model and its precomputed tables.
pub struct Model {
    pub config: LlamaConfig,
    pub weights: Weights,
    inv_freq: Vec<f32>,
}

/// Reusable buffers of one forward step.
#[derive(Default)]
pub struct Scratch {
    x: Acts,
    h: Acts,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Acts,
    o: Vec<f32>,
    gate: Acts,
    up: Vec<f32>,
    last: Acts,
    fused: Vec<f32>,
    /// Each row's rotary (cos, sin) pairs: positions are the same in every layer.
    rope: Vec<f32>,
}

/// `outs[i] = h · parts[i]ᵀ` for every projection, with one product when they are stacked
/// (then each row of the stacked result is split into the outputs).
fn project(
    p: &Projections,
    h: &mut Acts,
    fused: &mut Vec<f32>,
    outs: &mut [&mut Vec<f32>],
    prec: ActPrecision,
) {
    let rows = h.rows;
    match p {
        Projections::Stacked { m, widths } => {
            fused.resize(rows * m.rows, 0.0);
            matmul(m, h, fused, prec);
            for r in 0..rows {
                let mut off = r * m.rows;
                for (dst, &w) in outs.iter_mut().zip(widths) {
                    dst[r * w..(r + 1) * w].copy_from_slice(&fused[off..off + w]);
                    off += w;
                }
            }
        }
        Projections::Separate(parts) => {
            for (m, dst) in parts.iter().zip(outs.iter_mut()) {
                matmul(m, h, dst, prec);
            }
        }
    }
}

impl Model {
    pub fn new(config: LlamaConfig, weights: Weights) -> Self {
        let inv_freq = ops::rope_inv_freq(config.head_dim, config.rope_base);
        Self {
            config,
            weights,
            inv_freq,
        }
    }

    fn check(&self, batch: &Batch, kv: &KvCache) -> Result<(), StepError> {
        let bad = |m: String| Err(StepError::BadBatch(m));
        if batch.tokens.len() != batch.positions.len() {
            return bad("tokens and positions differ in length".into());
        }
        if let Some(t) = batch
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab)
        {
            return bad(format!("token id {t} is outside the vocabulary"));
        }
        let mut next = 0;
        for s in &batch.seqs {
            if s.start != next || s.len == 0 || s.start + s.len > batch.tokens.len() {
                return bad("sequences must tile the token list in order".into());
            }
            next = s.start + s.len;
            let pos0 = batch.positions[s.start] as usize;
            for i in 0..s.len {
                if batch.positions[s.start + i] as usize != pos0 + i {
                    return bad("a sequence's positions must be consecutive".into());
                }
            }
            let last = pos0 + s.len - 1;
            if last >= self.config.context_len {
                return bad(format!(
                    "position {last} is past the model's context of {} tokens",
                    self.config.context_len
                ));
            }
            let need = last / kv.block_size + 1;
            if s.block_table.len() < need {
                return bad(format!(
                    "block table covers {} blocks, needs {need}",
                    s.block_table.len()
                ));
            }
            if s.block_table[..need]
                .iter()
                .any(|&b| b as usize >= kv.n_blocks)
            {
                return bad("block table names a block outside the cache".into());
            }
        }
        if next != batch.tokens.len() {
            return bad("sequences must cover every token".into());
        }
        Ok(())
    }

    /// Runs one step with activations meeting the weights at `prec`. Returns logits
    /// (`n_logits × vocab`, in sequence order).
    pub fn forward(
        &self,
        batch: &Batch,
        kv: &mut KvCache,
        s: &mut Scratch,
        prec: ActPrecision,
    ) -> Result<Vec<f32>, StepError> {
        self.check(batch, kv)?;
        let c = &self.config;
        let w = &self.weights;
        let t = batch.tokens.len();
        let (d, qd, kvd, hd) = (c.dim, c.n_heads * c.head_dim, c.kv_dim(), c.head_dim);
        if t == 0 {
            return Ok(Vec::new());
        }
        // Row → its sequence.
        let mut row_seq = vec![0usize; t];
        for (i, sq) in batch.seqs.iter().enumerate() {
            row_seq[sq.start..sq.start + sq.len].fill(i);
        }

        s.x.resize(t, d);
        for (r, &tok) in batch.tokens.iter().enumerate() {
            w.token_embd.row_f32(tok as usize, s.x.row_mut(r));
        }
        s.h.resize(t, d);
        s.att.resize(t, qd);
        s.gate.resize(t, c.ffn_dim);
        s.q.resize(t * qd, 0.0);
        s.k.resize(t * kvd, 0.0);
        s.v.resize(t * kvd, 0.0);
        s.o.resize(t * d, 0.0);
        let half = hd / 2;
        s.rope.resize(t * hd, 0.0);
        for (r, cs) in s.rope.chunks_exact_mut(hd).enumerate() {
            ops::rope_table(batch.positions[r], &self.inv_freq[..half], cs);
        }
        s.up.resize(t * c.ffn_dim, 0.0);

        for (li, l) in w.layers.iter().enumerate() {
            // Attention block.
            norm_rows(&s.x, &l.attn_norm, c.rms_eps, &mut s.h);
            project(
                &l.qkv,
                &mut s.h,
                &mut s.fused,
                &mut [&mut s.q, &mut s.k, &mut s.v],
                prec,
            );
            for r in 0..t {
                let pos = batch.positions[r];
                let cs = &s.rope[r * hd..(r + 1) * hd];
                ops::rope_with(&mut s.q[r * qd..(r + 1) * qd], cs);
                ops::rope_with(&mut s.k[r * kvd..(r + 1) * kvd], cs);
                let table = &batch.seqs[row_seq[r]].block_table;
                kv.write(
                    li,
                    table,
                    pos as usize,
                    &s.k[r * kvd..(r + 1) * kvd],
                    &s.v[r * kvd..(r + 1) * kvd],
                );
            }
            attention(c, li, batch, &row_seq, &s.q, kv, &mut s.att);
            matmul(&l.wo, &mut s.att, &mut s.o, prec);
            add_rows(&mut s.x, &s.o);

            // Feed-forward block.
            norm_rows(&s.x, &l.ffn_norm, c.rms_eps, &mut s.h);
            project(
                &l.gate_up,
                &mut s.h,
                &mut s.fused,
                &mut [&mut s.gate.f32, &mut s.up],
                prec,
            );
            if t < PAR_ROWS {
                ops::swiglu(&mut s.gate.f32[..t * c.ffn_dim], &s.up[..t * c.ffn_dim]);
            } else {
                s.gate
                    .f32
                    .par_chunks_mut(c.ffn_dim)
                    .zip(s.up.par_chunks(c.ffn_dim))
                    .for_each(|(g, u)| ops::swiglu(g, u));
            }
            s.gate.touched();
            matmul(&l.w_down, &mut s.gate, &mut s.o, prec);
            add_rows(&mut s.x, &s.o);
        }

        // Logits for the last row of each sequence that asks.
        let rows: Vec<usize> = batch
            .seqs
            .iter()
            .filter(|sq| sq.logits)
            .map(|sq| sq.start + sq.len - 1)
            .collect();
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        s.last.resize(rows.len(), d);
        for (i, &r) in rows.iter().enumerate() {
            ops::rmsnorm(s.x.row(r), &w.output_norm, c.rms_eps, s.last.row_mut(i));
        }
        let mut logits = vec![0f32; rows.len() * c.vocab];
        matmul(w.output(), &mut s.last, &mut logits, prec);
        Ok(logits)
    }
}

/// Rows below which elementwise work stays on the calling thread (cheaper than waking
/// the pool).
const PAR_ROWS: usize = 16;

fn norm_rows(x: &Acts, w: &[f32], eps: f32, out: &mut Acts) {
    let cols = x.cols;
    if x.rows < PAR_ROWS {
        for (o, r) in out
            .f32
            .chunks_mut(cols)
            .zip(x.f32.chunks(cols))
            .take(x.rows)
        {
            ops::rmsnorm(r, w, eps, o);
        }
    } else {
        out.f32
            .par_chunks_mut(cols)
            .zip(x.f32.par_chunks(cols))
            .for_each(|(o, r)| ops::rmsnorm(r, w, eps, o));
    }
    out.touched();
}

fn add_rows(x: &mut Acts, o: &[f32]) {
    let n = x.rows * x.cols;
    for (a, b) in x.f32[..n].iter_mut().zip(&o[..n]) {
        *a += b;
    }
    x.touched();
}

/// Causal grouped-query attention of every row's query over its sequence's cached keys
/// and values (positions 0..=its own). One task per (row, KV head): the query heads that
/// share a KV head read its keys and values once.
/// One block's attention scores for one query head (unscaled): `out[s] = q · k_s` for its
/// first `out.len()` slots; keys dim-major (`kb[d·BS + s]`). The block's scores stay in
/// registers across the key dimensions.
#[inline(always)]
fn block_scores<const BS: usize>(q: &[f32], kb: &[f32], out: &mut [f32]) {
    let mut acc = [0f32; BS];
    for (d, &qv) in q.iter().enumerate() {
        let kd = &kb[d * BS..(d + 1) * BS];
        for s in 0..BS {
            acc[s] = qv.mul_add(kd[s], acc[s]);
        }
    }
    let n = out.len();
    out.copy_from_slice(&acc[..n]);
}

/// [`block_scores`] for any block size.
fn block_scores_any(q: &[f32], kb: &[f32], bs: usize, out: &mut [f32]) {
    out.fill(0.0);
    let n = out.len();
    for (d, &qv) in q.iter().enumerate() {
        for (o, k) in out.iter_mut().zip(&kb[d * bs..d * bs + n]) {
            *o = qv.mul_add(*k, *o);
        }
    }
}

/// `out = Σ p_s · v_s` over `(values, weights)` blocks (values slot-major, `HD` per slot),
/// slot by slot in order; the sum stays in registers.
#[inline(always)]
fn weighted_values<'a, const HD: usize>(
    blocks: impl Iterator<Item = (&'a [f32], &'a [f32])>,
    out: &mut [f32],
) {
    let mut acc = [0f32; HD];
    for (vb, p) in blocks {
        for (s, &w) in p.iter().enumerate() {
            let v = &vb[s * HD..(s + 1) * HD];
            for i in 0..HD {
                acc[i] = w.mul_add(v[i], acc[i]);
            }
        }
    }
    out.copy_from_slice(&acc);
}

/// [`weighted_values`] for any head size.
fn weighted_values_any<'a>(blocks: impl Iterator<Item = (&'a [f32], &'a [f32])>, out: &mut [f32]) {
    let hd = out.len();
    out.fill(0.0);
    for (vb, p) in blocks {
        for (s, &w) in p.iter().enumerate() {
            for (a, b) in out.iter_mut().zip(&vb[s * hd..(s + 1) * hd]) {
                *a = w.mul_add(*b, *a);
            }
        }
    }
}

/// One (row, KV head) task of [`attention`]: the `group` query heads that share KV head
/// `kvh`, over the row's first `n` positions.
struct HeadTask<'a> {
    layer: usize,
    kvh: usize,
    group: usize,
    hd: usize,
    scale: f32,
    n: usize,
    table: &'a [u32],
}

impl HeadTask<'_> {
    /// [`HeadTask::run`] compiled for AVX2 and FMA (wide registers hold a block's scores
    /// and a head's sum; `mul_add` is one instruction). The arithmetic, and so the
    /// result, is the same as without them (`mul_add` is fused either way).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, kv: &KvCache, qrow: &[f32], o: &mut [f32]) {
        self.run(kv, qrow, o)
    }

    #[inline(always)]
    fn run(&self, kv: &KvCache, qrow: &[f32], o: &mut [f32]) {
        let (layer, kvh, group, hd, scale, n) = (
            self.layer, self.kvh, self.group, self.hd, self.scale, self.n,
        );
        let mut scores = vec![0f32; n * group];
        let bs = kv.block_size;
        // Walk the sequence's blocks: scores of a block's slots are built one key
        // dimension at a time (keys are stored dim-major within a block).
        let blocks = &self.table[..n.div_ceil(bs)];
        for g in 0..group {
            let qg = &qrow[g * hd..(g + 1) * hd];
            let sg = &mut scores[g * n..(g + 1) * n];
            for (bi, &blk) in blocks.iter().enumerate() {
                let (kb, _) = kv.head_block(layer, blk, kvh);
                let j0 = bi * bs;
                let out = &mut sg[j0..j0 + bs.min(n - j0)];
                match bs {
                    16 => block_scores::<16>(qg, kb, out),
                    32 => block_scores::<32>(qg, kb, out),
                    _ => block_scores_any(qg, kb, bs, out),
                }
                for o in out.iter_mut() {
                    *o *= scale;
                }
            }
            ops::softmax(sg);
        }
        for g in 0..group {
            let p = &scores[g * n..(g + 1) * n];
            let og = &mut o[g * hd..(g + 1) * hd];
            let rows = blocks.iter().enumerate().map(|(bi, &blk)| {
                let (_, vb) = kv.head_block(layer, blk, kvh);
                let j0 = bi * bs;
                (vb, &p[j0..j0 + bs.min(n - j0)])
            });
            match hd {
                64 => weighted_values::<64>(rows, og),
                128 => weighted_values::<128>(rows, og),
                _ => weighted_values_any(rows, og),
            }
        }
    }
}

fn attention(
    c: &LlamaConfig,
    layer: usize,
    batch: &Batch,
    row_seq: &[usize],
    q: &[f32],
    kv: &KvCache,
    out: &mut Acts,
) {
    let (hd, qd) = (c.head_dim, c.n_heads * c.head_dim);
    let group = c.n_heads / c.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let gw = group * hd; // output width of one task
    out.f32
        .par_chunks_mut(gw)
        .enumerate()
        .for_each(|(task, o)| {
            let (r, kvh) = (task / c.n_kv_heads, task % c.n_kv_heads);
            let pos = batch.positions[r] as usize;
            let table = &batch.seqs[row_seq[r]].block_table;
            let n = pos + 1;
            let qrow = &q[r * qd + kvh * gw..r * qd + (kvh + 1) * gw];
            let t = HeadTask {
                layer,
                kvh,
                group,
                hd,
                scale,
                n,
                table,
            };
            #[cfg(target_arch = "x86_64")]
            if crate::quant::simd_path() != "scalar" {
                // SAFETY: AVX2 and FMA detected (the SIMD paths require them).
                return unsafe { t.run_avx2(kv, qrow, o) };
            }
            t.run(kv, qrow, o);
        });
    out.touched();
}
