//! A model onto a device: its weights uploaded (f16 matrices, f32 norms, the file's own
//! blocks where products of few rows read them), the KV cache and the step's buffers
//! sized once.

use super::{
    moe, AttentionKernel, Bufs, Device, Ffn, KvCapacity, KvRequest, Layer, SmallProducts, Split,
    PROMPT_LOGIT_ROWS,
};
use crate::cuda::device::{attention_max_warps, ATTENTION_CHUNK_KEYS};
use crate::cuda::exec::{Exec, ExecError};
use crate::cuda::gemv::{self, QuantBuf};
use crate::cuda::staging::{adjust_room, score_room, Layout};
use crate::cuda::twins::TwinModel;
use crate::logprobs::SCORE_WORDS;
use half::f16;

impl<E: Exec> Device<E> {
    /// Uploads `twin`'s weights to `exec`; a KV cache of `kv` blocks (plus the spare) of
    /// `block_size` tokens; buffers for `max_tokens` rows and `max_seqs` sequences. `exec`
    /// must have the kernels built for the model's attention shape.
    pub fn new(
        exec: E,
        twin: &TwinModel,
        block_size: usize,
        kv: KvRequest,
        max_tokens: usize,
        max_seqs: usize,
    ) -> Result<Self, ExecError> {
        let e = &exec;
        let c = twin.config.clone();
        let KvRequest {
            capacity: kv,
            window_blocks,
        } = kv;
        let mut window_blocks = window_blocks.filter(|_| c.window_size().is_some());
        let has_pool = window_blocks.is_some();
        let own = |li: usize| has_pool && c.window_at(li).is_some();
        let windowed = (0..c.n_layers).filter(|&l| own(l)).count();
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
                        match &l.moe {
                            Some(m) => Ffn::Experts(Box::new(moe::Experts::upload(e, m, c.dim)?)),
                            None => Ffn::Dense {
                                w_gate_up: e.upload(&l.w_gate_up)?,
                                w_down: e.upload(&l.w_down)?,
                            },
                        },
                        l.qkv_bias.as_ref().map(|b| e.upload(b)).transpose()?,
                        l.qk_norm
                            .as_ref()
                            .map(|n| Ok::<_, ExecError>((e.upload(&n.q)?, e.upload(&n.k)?)))
                            .transpose()?,
                    ),
                    quant,
                    l.post_norms
                        .as_ref()
                        .map(|(a, f)| Ok::<_, ExecError>((e.upload(a)?, e.upload(f)?)))
                        .transpose()?,
                ))
            })
            .collect::<Result<Vec<_>, ExecError>>()?;
        let max_blocks = c.context_len.div_ceil(block_size);
        let max_logits = max_seqs + PROMPT_LOGIT_ROWS.min(max_tokens);
        // The dense block's width; with experts, the shared expert's (its products use
        // the dense block's buffers).
        let f = match &c.moe {
            Some(m) => m.shared_ffn.unwrap_or(1),
            None => c.ffn_dim,
        };
        let (t, d, qd, kvd) = (max_tokens, c.dim, c.n_heads * c.head_dim, c.kv_dim());
        // Split attention: rows up to one block per SM and KV head may spread their chunks.
        let sms = e.multiprocessors()?;
        let split = Split {
            sms,
            rows: sms.div_ceil(c.n_kv_heads).min(t),
            chunks: (max_blocks * block_size).div_ceil(ATTENTION_CHUNK_KEYS),
        };
        let bufs = Bufs {
            staging: e.zeros(
                Layout::with_window(max_seqs, t, max_blocks, max_logits, window_blocks.is_some())
                    .len
                    + adjust_room(max_logits, c.vocab)
                    + score_room(max_logits),
            )?,
            tokens: e.zeros(t)?,
            positions: e.zeros(t)?,
            slots: e.zeros(t)?,
            seq_of_row: e.zeros(t)?,
            tables: e.zeros(max_seqs * max_blocks)?,
            slots_w: e.zeros(if windowed > 0 { t } else { 1 })?,
            tables_w: e.zeros(if windowed > 0 {
                max_seqs * max_blocks
            } else {
                1
            })?,
            logit_rows: e.zeros(max_logits)?,
            x: e.zeros(t * d)?,
            x2: e.zeros(t * d)?,
            h: e.zeros(t * d)?,
            qkv: e.zeros(t * (qd + 2 * kvd))?,
            att: e.zeros(t * qd)?,
            o: e.zeros(t * d)?,
            gu: e.zeros(t * 2 * f)?,
            g: e.zeros(t * f)?,
            moe: c
                .moe
                .as_ref()
                .map(|m| {
                    // The CUDA-core products' scratch only where some layer takes them.
                    let cuda_cores = twin
                        .layers
                        .iter()
                        .filter_map(|l| l.moe.as_ref())
                        .any(|x| !matches!(x.down, crate::cuda::twins::ExpertRows::Blocks(_)));
                    moe::Scratch::new(e, m, t, d, cuda_cores)
                })
                .transpose()?,
            logits: e.zeros(max_logits * c.vocab)?,
            adjusted: e.zeros(max_logits * c.vocab)?,
            sampled: e.zeros(max_logits)?,
            scores: e.zeros(max_logits * SCORE_WORDS)?,
            part: e.zeros((split.rows * split.chunks * qd * 3).max(1))?,
            arrive: e.zeros((split.rows * c.n_kv_heads).max(1))?,
        };
        let embed = e.upload(&twin.embed)?;
        let output_norm = e.upload(&twin.output_norm)?;
        let rope_inv_freq = e.upload(&c.rope_inv_freq())?;
        let rope_inv_freq_local = c.rope_inv_freq_local().map(|f| e.upload(&f)).transpose()?;
        let output = e.upload(&twin.output)?;
        let output_q = twin
            .output_q
            .iter()
            .map(|r| QuantBuf::upload(e, r))
            .collect::<Result<Vec<_>, _>>()?;
        // The KV cache last, from what is left: one spare block past the engine's (and
        // past the windowed layers' own pool's, where they keep one).
        let layer_block = 2 * block_size * c.kv_dim() * std::mem::size_of::<f16>();
        let n_blocks = match kv {
            KvCapacity::Blocks(n) => n,
            KvCapacity::FreeMemory {
                fraction,
                max_blocks,
            } => {
                let free = e.free_memory()?;
                let budget = (free as f64 * fraction) as usize;
                let (n, w) = split_memory(
                    budget,
                    (c.n_layers, windowed),
                    layer_block,
                    window_blocks,
                    max_blocks,
                );
                window_blocks = w;
                if n == 0 {
                    return Err(ExecError::Bounds(format!(
                        "no device memory left for the KV cache ({free} bytes free after the weights)"
                    )));
                }
                n.min(max_blocks)
            }
        };
        let kv_len = |li: usize| {
            let blocks = match own(li) {
                true => window_blocks.unwrap_or(0),
                false => n_blocks,
            };
            (blocks + 1) * block_size * c.kv_dim()
        };
        let layers = weights
            .into_iter()
            .enumerate()
            .map(
                |(li, ((attn_norm, wqkv, wo, ffn_norm, ffn, bqkv, qk_norm), quant, post_norms))| {
                    let [wqkv_q, wo_q, w_gate_up_q, w_down_q] = quant;
                    Ok(Layer {
                        attn_norm,
                        wqkv,
                        bqkv,
                        qk_norm,
                        wo,
                        ffn_norm,
                        ffn,
                        wqkv_q,
                        wo_q,
                        w_gate_up_q,
                        w_down_q,
                        k_cache: e.zeros(kv_len(li))?,
                        v_cache: e.zeros(kv_len(li))?,
                        post_norms,
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
            rope_inv_freq,
            rope_inv_freq_local,
            output_norm_host: twin.output_norm.clone(),
            output,
            output_q,
            n_blocks,
            window_blocks,
            exec,
            config: c,
            layers,
            block_size,
            max_blocks,
            max_logits,
            bufs,
        })
    }
}

/// A KV cache in `budget` bytes for `layers` (all, and those in the windowed layers' own
/// pool) of `layer_block` bytes a block: the other layers' blocks (`max_blocks` where every
/// layer is in the pool: theirs are bookkeeping alone) and the pool's. The pool comes
/// first, but never with more blocks than every position on every layer would have had:
/// a large model's slots' windows may not fit, and the pool then holds what fits, as the
/// one pool did. Each count is past one spare block of its caches.
fn split_memory(
    budget: usize,
    layers: (usize, usize),
    layer_block: usize,
    window: Option<usize>,
    max_blocks: usize,
) -> (usize, Option<usize>) {
    let (all_layers, windowed) = layers;
    let all = (budget / (all_layers * layer_block)).saturating_sub(1);
    let window = window.map(|w| w.min(all));
    let window_bytes = windowed * (window.unwrap_or(0) + 1) * layer_block;
    let n = match all_layers - windowed {
        0 => max_blocks,
        others => (budget.saturating_sub(window_bytes) / (others * layer_block)).saturating_sub(1),
    };
    (n, window)
}

#[cfg(test)]
mod tests {
    use super::split_memory;

    #[test]
    fn the_windowed_pool_comes_first_and_never_past_what_one_pool_held() {
        let mib = 1 << 20;
        // 26 layers, 22 windowed (Gemma 3 1B's), 16 KiB a block: 8,000 MiB.
        let (budget, block) = (8000 * mib, 16 << 10);
        let one_pool = budget / (26 * block) - 1;
        assert_eq!(
            split_memory(budget, (26, 0), block, None, 1 << 30),
            (one_pool, None)
        );
        // A pool of 8,832 blocks: the other 4 layers hold what is left.
        let (n, w) = split_memory(budget, (26, 22), block, Some(8832), 1 << 30);
        assert_eq!(w, Some(8832));
        assert_eq!(n, (budget - 22 * 8833 * block) / (4 * block) - 1);
        assert!(n > 3 * one_pool, "{n} against {one_pool}");
        // Slots' windows past what one pool held (a large model's): the pool holds that.
        let (n, w) = split_memory(budget, (26, 22), block, Some(10 * one_pool), 1 << 30);
        assert_eq!(w, Some(one_pool));
        assert!(n >= one_pool);
        // Every layer windowed: the others' blocks are bookkeeping (up to the cap).
        assert_eq!(
            split_memory(budget, (32, 32), block, Some(100), 777),
            (777, Some(100))
        );
        // Nothing left.
        assert_eq!(split_memory(block, (26, 22), block, Some(100), 777).0, 0);
    }
}
