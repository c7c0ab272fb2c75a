//! The Llama-family model: hyperparameters from GGUF metadata (architecture `llama`;
//! `qwen2`: Llama's with biases on Q, K and V and RoPE over each head's halves; `qwen3`:
//! Qwen2's without the biases, with an RMSNorm over each Q and K head; `phi3`: Llama's with
//! Q, K and V in one matrix and the gate and up projections in one, RoPE over each head's
//! halves; `qwen2moe`, `qwen3moe` and Mixtral's `llama` with experts: a mixture of experts
//! in place of the feed-forward block, [`Ffn::Experts`]; `smollm3`: Llama's with every
//! fourth layer's RoPE left out, [`LlamaConfig::no_rope_period`]), and weights checked against them
//! (a tensor whose shape disagrees with the metadata is an error).

use crate::gguf::{GgmlType, Gguf, GgufError, TensorInfo};
use crate::kquant;
use crate::matmul::{MatData, Matrix};
use crate::quant;

/// Hyperparameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layers: usize,
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub vocab: usize,
    pub rope_base: f32,
    /// RoPE's frequency factors, one per rotation pair (`rope_freqs.weight`: Llama 3.1's
    /// scaling, which divides each pair's frequency by its factor), where the file has them.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// RoPE's linear scaling (`llama.rope.scaling.type = "linear"`): each frequency times
    /// this, 1 / the file's factor; 1 where there is none.
    pub rope_freq_scale: f32,
    pub rms_eps: f32,
    pub context_len: usize,
    /// How the file says an embedding is made from the tokens' final hidden states.
    pub pooling: Pooling,
    /// The file's Q and K rows rotate each head's halves together (NEOX's RoPE: pair
    /// (i, i + head_dim/2); Qwen2's), not adjacent pairs (2i, 2i + 1) as GGUF's Llama
    /// files. Load permutes those rows (and their biases) to adjacent pairs — q·k is the
    /// same under one permutation of both — so every RoPE here rotates adjacent pairs.
    pub neox: bool,
    /// The dimensions of each head that RoPE turns (`rope.dimension_count`), where fewer
    /// than `head_dim` (`None`: all of them): partial RoPE's files (Phi-4-mini's 96 of
    /// 128), whose first `rope_dims` (after load's permutation, [`neox_row`]) turn, pairs
    /// of frequency `base^(−2i/rope_dims)`, and the rest pass as they are
    /// ([`LlamaConfig::rope_pass`]).
    pub rope_dims: Option<usize>,
    /// What multiplies the attention's scores beside `1/√head_dim`: YaRN's `mscale²`
    /// (`(1 + 0.1·ln factor)²`: YaRN scales each rotated q and k by `mscale`, which is this
    /// on q·k); LongRoPE's factor squared; Gemma's 27B models' `√(head_dim / (dim/heads))`
    /// (their `query_pre_attn_scalar`); 1 otherwise.
    pub attn_scale: f32,
    /// A mixture of experts in place of each layer's feed-forward block (Qwen3-MoE's,
    /// Qwen2-MoE's, Mixtral's), where the file has one.
    pub moe: Option<MoeConfig>,
    /// Sliding-window attention on some layers (Gemma 2's and Gemma 3's), where the file
    /// has it: [`LlamaConfig::window_at`].
    pub window: Option<SlidingWindow>,
    /// What each token's embedding is multiplied by as it is read: Gemma's `√dim`; 1
    /// otherwise.
    pub embed_scale: f32,
    /// The feed-forward block's activation of its gate.
    pub act: Activation,
    /// Gemma 2's soft caps: each attention score (after its scale) and each logit become
    /// `cap · tanh(x / cap)`.
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    /// SmolLM3's NoPE layers: the last layer of each run of this many (SmolLM3's 4: layers
    /// 3, 7, 11, …) turns none of its q's and k's pairs, which pass as they are
    /// ([`LlamaConfig::ropes_at`], [`LlamaConfig::rope_pass_at`]). llama.cpp's
    /// `n_no_rope_layer_step`, which its `smollm3` sets to 4: no GGUF key carries it.
    pub no_rope_period: Option<usize>,
}

/// The activation of a feed-forward block's gate, multiplied by its up projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// `x · sigmoid(x)` (SwiGLU: Llama's, Qwen's, Phi's).
    #[default]
    Silu,
    /// GELU's tanh form, `x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))` (GeGLU: Gemma's).
    GeluTanh,
}

/// Sliding-window attention: a windowed layer's query at position `p` attends to
/// positions `p − size + 1 ..= p` only (Hugging Face's and llama.cpp's `n_swa`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlidingWindow {
    pub size: usize,
    /// Every layer is windowed but the last of each run of this many (llama.cpp's
    /// `swa_pattern`: Gemma 3's 6, five windowed layers then a global one; Gemma 2's 2);
    /// 0: every layer.
    pub period: usize,
    /// The windowed layers' RoPE base, their frequencies unscaled (Gemma 3's 10,000
    /// beside its global layers' 1,000,000 and linear scaling); `None`: the model's.
    pub rope_base: Option<f32>,
}

/// A mixture of experts: each token's block is the weighted sum of the `used` experts of
/// `count` its router scores highest, each expert a SwiGLU block `ffn` wide.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeConfig {
    pub count: usize,
    pub used: usize,
    pub ffn: usize,
    /// The chosen experts' weights sum to 1 (their softmax probabilities over the sum of
    /// theirs: Qwen3-MoE's `norm_topk_prob`, Mixtral's softmax over the chosen); else each
    /// keeps its probability among all `count` (Qwen2-MoE's).
    pub norm: bool,
    /// Qwen2-MoE's shared expert: a SwiGLU block this wide on every token, its output
    /// weighted by a sigmoid gate of its own.
    pub shared_ffn: Option<usize>,
}

/// The architectures the engine computes (`qwen2`: `llama`'s with biases on Q, K and V and
/// NEOX's RoPE, [`LlamaConfig::neox`]; `qwen3`: NEOX's RoPE, no biases, and each Q and K
/// head RMS-normed before it, [`Layer::qk_norm`]; `phi3`: NEOX's RoPE, Q, K and V fused in
/// `attn_qkv` and the gate and up projections in `ffn_up`, split at load: [`fused_rows`];
/// `qwen2moe` and `qwen3moe`: Qwen2's and Qwen3's attention with a mixture of experts,
/// [`MoeConfig`]; a `llama` file with experts is Mixtral's; `gemma`: NEOX's RoPE, GeGLU
/// ([`Activation::GeluTanh`]) and the embeddings scaled by `√dim`; `gemma2`: Gemma's with
/// each block's output RMS-normed before the residual add ([`Layer::post_norms`]), every
/// other layer windowed ([`SlidingWindow`]) and soft caps; `gemma3`: Gemma 2's without the
/// caps, with Qwen3's Q and K norms, five windowed layers of six, those on their own RoPE
/// base; `smollm3`: Llama's, with no RoPE on every fourth layer, [`LlamaConfig::no_rope_period`]).
const ARCHITECTURES: &[&str] = &[
    "llama", "qwen2", "qwen3", "phi3", "qwen2moe", "qwen3moe", "gemma", "gemma2", "gemma3",
    "smollm3",
];

/// The file's mixture of experts (`{arch}.expert_count` over 0), if any: Qwen3-MoE's and
/// Mixtral's (`llama`) chosen experts' weights normalized, Qwen2-MoE's not, and its shared
/// expert's width.
fn moe_config(g: &Gguf, arch: &str) -> Result<Option<MoeConfig>, GgufError> {
    let u = |k: &str| g.get_u64(&format!("{arch}.{k}")).map(|v| v as usize);
    let count = match u("expert_count") {
        Ok(n) if n > 0 => n,
        _ if arch.ends_with("moe") => {
            return Err(GgufError::Metadata(format!(
                "{arch} without {arch}.expert_count"
            )))
        }
        _ => return Ok(None),
    };
    let used = u("expert_used_count")?;
    if used == 0 || used > count {
        return Err(GgufError::Metadata(format!(
            "{used} experts used of {count}: from 1 to all of them"
        )));
    }
    let ffn = u("expert_feed_forward_length").or_else(|_| u("feed_forward_length"))?;
    // llama.cpp's gating functions: 1 softmax (these models'), 2 sigmoid (DeepSeek-V3's).
    if let Ok(f) = u("expert_gating_func") {
        if f != 1 {
            return Err(GgufError::Metadata(format!(
                "expert gating function {f} is not supported (a softmax over the experts only)"
            )));
        }
    }
    let norm = match g.get(&format!("{arch}.expert_weights_norm")) {
        Some(crate::gguf::Value::Bool(b)) => *b,
        _ => arch != "qwen2moe",
    };
    let shared_ffn = match arch {
        "qwen2moe" => Some(u("expert_shared_feed_forward_length")?),
        _ => None,
    };
    Ok(Some(MoeConfig {
        count,
        used,
        ffn,
        norm,
        shared_ffn,
    }))
}

/// RoPE's per-pair factors in `t` (an f32 tensor of `rope_dims / 2` values, one per pair
/// that turns: Llama 3.1's `rope_freqs.weight`, Phi-3's LongRoPE factors), each dividing
/// its pair's frequency.
fn pair_factors(g: &Gguf, t: &TensorInfo, rope_dims: usize) -> Result<Vec<f32>, GgufError> {
    if t.ty != GgmlType::F32 || t.n_elems() != rope_dims / 2 {
        return Err(GgufError::Metadata(format!(
            "{} is {:?} × {}; RoPE's factors are {} f32 values",
            t.name,
            t.ty,
            t.n_elems(),
            rope_dims / 2
        )));
    }
    Ok(g.data(t)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Phi-3's LongRoPE (its 128k files: `rope_factors_long.weight` and
/// `rope_factors_short.weight`, each pair's frequency over its factor): the long factors
/// where the model is served past its original context (`rope.scaling.
/// original_context_length`), else the short ones — the choice llama.cpp makes by its
/// context (Hugging Face makes it by each sequence's length, the same below the original
/// context) — and the attention factor that scales the rotated q and k
/// (`rope.scaling.attn_factor`, else Hugging Face's `√(1 + ln(s) / ln original)` for the
/// file's context `s` times the original one); `None` where the file has no factors.
fn long_rope(
    g: &Gguf,
    arch: &str,
    rope_dims: usize,
    context: usize,
    file_context: usize,
) -> Result<Option<(Vec<f32>, f32)>, GgufError> {
    let (long, short) = (
        g.tensor("rope_factors_long.weight"),
        g.tensor("rope_factors_short.weight"),
    );
    let (long, short) =
        match (long, short) {
            (None, None) => return Ok(None),
            (Some(l), Some(s)) => (l, s),
            _ => return Err(GgufError::Metadata(
                "one of rope_factors_long.weight and rope_factors_short.weight without the other"
                    .into(),
            )),
        };
    let orig = g
        .get_u64(&format!("{arch}.rope.scaling.original_context_length"))
        .map_err(|_| {
            GgufError::Metadata(format!(
                "LongRoPE factors without {arch}.rope.scaling.original_context_length"
            ))
        })? as usize;
    let factors = pair_factors(g, if context > orig { long } else { short }, rope_dims)?;
    let attn = match g.get_f64(&format!("{arch}.rope.scaling.attn_factor")) {
        Ok(a) if a > 0.0 => a as f32,
        _ if file_context > orig && orig > 1 => {
            let scale = file_context as f64 / orig as f64;
            (1.0 + scale.ln() / (orig as f64).ln()).sqrt() as f32
        }
        _ => 1.0,
    };
    Ok(Some((factors, attn)))
}

/// Another file's sliding window (not Gemma's: Phi-3-mini-4k's 2,047 positions of its
/// 4,096, Mistral's), on every layer, where it is shorter than the file's context: each
/// row attends to its last `size` positions, as Hugging Face's Phi-3 and Mistral attend and
/// as they were trained (llama.cpp leaves Phi-3's window off and attends over the whole
/// context). The context served stays the file's.
fn every_layer_window(file_context: usize, window: Option<usize>) -> Option<SlidingWindow> {
    let size = window.filter(|&w| w > 0 && w < file_context)?;
    tracing::info!(
        context = file_context,
        sliding_window = size,
        "the model attends over a sliding window on every layer"
    );
    Some(SlidingWindow {
        size,
        period: 0,
        rope_base: None,
    })
}

/// A head's width and the dimensions of it that RoPE turns ([`LlamaConfig::rope_dims`]):
/// how NEOX's rows are reordered to adjacent pairs ([`neox_row`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadRows {
    pub head_dim: usize,
    pub rope_dims: usize,
}

impl HeadRows {
    pub fn of(c: &LlamaConfig) -> Self {
        Self {
            head_dim: c.head_dim,
            rope_dims: c.turned_dims(),
        }
    }
}

/// Row `j` of a head of Llama's adjacent RoPE pairs is this row of NEOX's halves:
/// (2i, 2i + 1) ← (i, i + rope_dims/2) for the pairs that turn; the rows past `rope_dims`,
/// which pass unturned (partial RoPE), stay where they are.
pub fn neox_row(j: usize, h: HeadRows) -> usize {
    if j >= h.rope_dims {
        return j;
    }
    j / 2 + (j % 2) * (h.rope_dims / 2)
}

/// `rows`' rows (each `rows.len() / n` long) with every `head_dim` of them, a head,
/// reordered from NEOX's halves to adjacent pairs ([`neox_row`]).
pub fn neox_to_pairs<T: Copy>(rows: &[T], n: usize, h: HeadRows) -> Vec<T> {
    let len = rows.len() / n;
    let mut out = Vec::with_capacity(rows.len());
    for r in 0..n {
        let (head, j) = (r / h.head_dim, r % h.head_dim);
        let src = head * h.head_dim + neox_row(j, h);
        out.extend_from_slice(&rows[src * len..(src + 1) * len]);
    }
    out
}

/// How a sequence's embedding is made from its tokens' final hidden states, as the file
/// says (`llama.pooling_type`, llama.cpp's numbering). Engines make the last token's
/// (what a causal model's embedding is), and refuse embeddings from a file that asks
/// for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The last token's state (3; also when the file says nothing, or "unspecified").
    Last,
    /// Every token's state, none pooled (0).
    None,
    /// The mean over the tokens (1).
    Mean,
    /// The first token's state (2: BERT's `[CLS]`).
    Cls,
    /// A reranker's score from the states (4).
    Rank,
    /// A number llama.cpp does not define.
    Other(u64),
}

impl Pooling {
    /// From the file's `llama.pooling_type` (its architecture's key): absent, negative (-1, "unspecified") or a
    /// value that is no integer leave the engine's own, the last token.
    fn from_gguf(g: &Gguf, arch: &str) -> Self {
        match g
            .get(&format!("{arch}.pooling_type"))
            .and_then(|v| v.as_u64())
        {
            None | Some(3) => Pooling::Last,
            Some(0) => Pooling::None,
            Some(1) => Pooling::Mean,
            Some(2) => Pooling::Cls,
            Some(4) => Pooling::Rank,
            Some(n) => Pooling::Other(n),
        }
    }
}

impl std::fmt::Display for Pooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pooling::Last => f.write_str("last-token"),
            Pooling::None => f.write_str("per-token (no pooling)"),
            Pooling::Mean => f.write_str("mean"),
            Pooling::Cls => f.write_str("first-token (CLS)"),
            Pooling::Rank => f.write_str("rank (a reranker)"),
            Pooling::Other(n) => write!(f, "pooling type {n}"),
        }
    }
}

impl LlamaConfig {
    /// SmolLM2-135M's shape (the default model; what benchmarks and GPU tests size for).
    pub fn smollm2_135m() -> Self {
        Self {
            n_layers: 30,
            dim: 576,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            ffn_dim: 1536,
            vocab: 49152,
            rope_base: 100000.0,
            rope_freq_factors: None,
            rope_freq_scale: 1.0,
            rms_eps: 1e-5,
            context_len: 8192,
            pooling: Pooling::Last,
            neox: false,
            rope_dims: None,
            attn_scale: 1.0,
            moe: None,
            window: None,
            embed_scale: 1.0,
            act: Activation::Silu,
            attn_softcap: None,
            final_softcap: None,
            no_rope_period: None,
        }
    }

    pub fn from_gguf(g: &Gguf) -> Result<Self, GgufError> {
        let arch = g.get_str("general.architecture")?;
        if !ARCHITECTURES.contains(&arch) {
            return Err(GgufError::Metadata(format!(
                "architecture {arch:?} is not supported ({})",
                ARCHITECTURES.join(", ")
            )));
        }
        let u = |k: &str| g.get_u64(&format!("{arch}.{k}")).map(|v| v as usize);
        let f = |k: &str| g.get_f64(&format!("{arch}.{k}"));
        let dim = u("embedding_length")?;
        let n_heads = u("attention.head_count")?;
        let n_kv_heads = u("attention.head_count_kv").unwrap_or(n_heads);
        // A head's width: the file's `attention.key_length` where it writes one (Qwen3's
        // 128 under a 1,024-wide model: Q's rows need not be the model's width), else
        // the model's width over the heads.
        let key_length = u("attention.key_length").ok();
        let fits = key_length.is_some() || dim.is_multiple_of(n_heads.max(1));
        if n_heads == 0 || n_kv_heads == 0 || !fits || n_heads % n_kv_heads != 0 {
            return Err(GgufError::Metadata(format!(
                "inconsistent heads: dim {dim}, heads {n_heads}, kv heads {n_kv_heads}"
            )));
        }
        let head_dim = key_length.unwrap_or(dim / n_heads);
        if let Ok(v) = u("attention.value_length") {
            if v != head_dim {
                return Err(GgufError::Metadata(format!(
                    "value heads of {v} beside key heads of {head_dim} are not supported (equal widths only)"
                )));
            }
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(GgufError::Metadata(format!(
                "odd head dimension {head_dim}"
            )));
        }
        let rope_dims = u("rope.dimension_count").unwrap_or(head_dim);
        if rope_dims == 0 || rope_dims > head_dim || rope_dims % 2 != 0 {
            return Err(GgufError::Metadata(format!(
                "RoPE over {rope_dims} of each head's {head_dim} dimensions (an even count, at most the head's)"
            )));
        }
        let (rope_freq_scale, yarn) = match rope_scaling(g, arch)? {
            Scaling::Linear(s) => (s, None),
            Scaling::Yarn {
                factor,
                original_context,
            } => (1.0, Some((factor, original_context))),
        };
        let rope_base = f("rope.freq_base").unwrap_or(10000.0) as f32;
        let file_context = u("context_length").unwrap_or(2048);
        let gemma = arch.starts_with("gemma");
        let window = match arch {
            "gemma2" | "gemma3" => sliding_window(g, arch)?,
            "gemma" => None,
            _ => match every_layer_window(file_context, u("attention.sliding_window").ok()) {
                Some(_)
                    if g.get(&format!("{arch}.attention.sliding_window_pattern"))
                        .is_some() =>
                {
                    return Err(GgufError::Metadata(format!(
                        "{arch}.attention.sliding_window_pattern: a sliding window on some \
                         layers only is supported for Gemma 2 and 3, not for {arch}"
                    )))
                }
                w => w,
            },
        };
        let context_len = file_context;
        let long_rope = long_rope(g, arch, rope_dims, context_len, file_context)?;
        if long_rope.is_some() && (yarn.is_some() || g.tensor("rope_freqs.weight").is_some()) {
            return Err(GgufError::Metadata(
                "LongRoPE factors beside YaRN or rope_freqs.weight are not supported".into(),
            ));
        }
        let rope_freq_factors = match g.tensor("rope_freqs.weight") {
            None => match &long_rope {
                Some((factors, _)) => Some(factors.clone()),
                None => yarn.map(|(factor, orig)| yarn_factors(rope_dims, rope_base, factor, orig)),
            },
            Some(_) if yarn.is_some() => {
                return Err(GgufError::Metadata(
                    "YaRN scaling beside rope_freqs.weight factors is not supported".into(),
                ))
            }
            Some(t) => Some(pair_factors(g, t, rope_dims)?),
        };
        let vocab = match u("vocab_size") {
            Ok(v) => v,
            Err(_) => g.get_strings("tokenizer.ggml.tokens")?.len(),
        };
        Ok(Self {
            n_layers: u("block_count")?,
            dim,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim: u("feed_forward_length")?,
            vocab,
            rope_base,
            rope_freq_factors,
            rope_freq_scale,
            rms_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
            context_len,
            pooling: Pooling::from_gguf(g, arch),
            neox: matches!(arch, "qwen2" | "qwen3" | "phi3" | "qwen2moe" | "qwen3moe") || gemma,
            rope_dims: (rope_dims < head_dim).then_some(rope_dims),
            attn_scale: match (yarn, &long_rope) {
                (Some((factor, _)), _) => {
                    let mscale = 1.0 + 0.1 * factor.ln();
                    (mscale * mscale) as f32
                }
                (None, Some((_, attn))) => attn * attn,
                (None, None) if gemma => gemma_attn_scale(g, arch, dim, n_heads, head_dim),
                (None, None) => 1.0,
            },
            moe: moe_config(g, arch)?,
            window,
            embed_scale: if gemma { (dim as f32).sqrt() } else { 1.0 },
            act: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            attn_softcap: softcap(g, arch, "attn_logit_softcapping"),
            final_softcap: softcap(g, arch, "final_logit_softcapping"),
            no_rope_period: (arch == "smollm3").then_some(4),
        })
    }

    /// The sliding window of layer `layer`'s attention, if it has one.
    pub fn window_at(&self, layer: usize) -> Option<usize> {
        let w = self.window.as_ref()?;
        (w.period == 0 || layer % w.period < w.period - 1).then_some(w.size)
    }

    /// The windowed layers' window, where some layer has one (each has the same).
    pub fn window_size(&self) -> Option<usize> {
        self.window.as_ref().map(|w| w.size)
    }

    /// Whether layer `layer` turns its queries and keys by the windowed layers' own RoPE
    /// frequencies ([`SlidingWindow::rope_base`], [`LlamaConfig::rope_inv_freq_local`]).
    pub fn local_rope_at(&self, layer: usize) -> bool {
        self.window_at(layer).is_some() && self.window.is_some_and(|w| w.rope_base.is_some())
    }

    /// The windowed layers' RoPE frequencies where they have a base of their own
    /// ([`SlidingWindow::rope_base`]: unscaled, over every pair); `None` where they turn
    /// by the model's ([`LlamaConfig::rope_inv_freq`]).
    pub fn rope_inv_freq_local(&self) -> Option<Vec<f32>> {
        let base = self.window?.rope_base?;
        let mut f = crate::ops::rope_inv_freq(self.turned_dims(), base);
        f.resize(self.head_dim / 2, 0.0);
        Some(f)
    }

    /// Whether layer `layer` turns its queries and keys by RoPE: all but SmolLM3's NoPE
    /// layers ([`LlamaConfig::no_rope_period`]: llama.cpp's `(il + 1) % step != 0`).
    pub fn ropes_at(&self, layer: usize) -> bool {
        self.no_rope_period
            .is_none_or(|p| !(layer + 1).is_multiple_of(p))
    }

    /// [`LlamaConfig::rope_pass`] for layer `layer`: a NoPE layer ([`LlamaConfig::ropes_at`])
    /// turns no pair, and every pair passes, divided by `√attn_scale` as partial RoPE's
    /// passing pairs are (YaRN's attention factor belongs to the turned q and k alone:
    /// Hugging Face's and llama.cpp's NoPE layers leave it out); 1 where there is none.
    pub fn rope_pass_at(&self, layer: usize) -> (usize, f32) {
        match self.ropes_at(layer) {
            true => self.rope_pass(),
            false => (0, self.attn_scale.sqrt().recip()),
        }
    }

    /// Layer `layer`'s RoPE frequencies: a windowed layer's own where it has them
    /// ([`LlamaConfig::rope_inv_freq_local`]), else the model's ([`LlamaConfig::rope_inv_freq`]).
    pub fn rope_inv_freq_at(&self, layer: usize) -> Vec<f32> {
        match self
            .rope_inv_freq_local()
            .filter(|_| self.local_rope_at(layer))
        {
            Some(f) => f,
            None => self.rope_inv_freq(),
        }
    }

    /// The attention's score scale: `1/√head_dim`, times [`LlamaConfig::attn_scale`].
    pub fn attention_scale(&self) -> f32 {
        self.attn_scale / (self.head_dim as f32).sqrt()
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// RoPE's frequency for each of a head's `head_dim / 2` pairs: `base^(−2i/rope_dims)`,
    /// divided by the pair's factor where the file has them, times the linear scale where
    /// it has one (llama.cpp's `freq_scale · θ / factor`); 0 for the pairs past
    /// `rope_dims`, which do not turn ([`LlamaConfig::rope_pass`]).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let mut f = crate::ops::rope_inv_freq(self.turned_dims(), self.rope_base);
        if let Some(ff) = &self.rope_freq_factors {
            f.iter_mut().zip(ff).for_each(|(f, ff)| *f /= ff);
        }
        if self.rope_freq_scale != 1.0 {
            f.iter_mut().for_each(|f| *f *= self.rope_freq_scale);
        }
        f.resize(self.head_dim / 2, 0.0);
        f
    }

    /// The pairs RoPE turns (`rope_dims / 2`), and what the pairs past them are
    /// multiplied by instead: `1/√attn_scale`. The attention factor of YaRN's and
    /// LongRoPE's files scales only the turned q and k (Hugging Face multiplies their
    /// cosines and sines by it); here every score is multiplied by its square
    /// ([`LlamaConfig::attn_scale`]), so the q and k that pass unturned are divided by it
    /// once each to keep their part of q·k as it is. (1 where every pair turns.)
    pub fn rope_pass(&self) -> (usize, f32) {
        let scale = match self.rope_dims {
            Some(_) => self.attn_scale.sqrt().recip(),
            None => 1.0,
        };
        (self.turned_dims() / 2, scale)
    }

    /// The dimensions of each head that RoPE turns ([`LlamaConfig::rope_dims`]).
    pub fn turned_dims(&self) -> usize {
        self.rope_dims.unwrap_or(self.head_dim).min(self.head_dim)
    }

    /// Whether RoPE's frequencies are other than `base^(−2i/head_dim)` over every pair
    /// of every layer (factors, a linear scale, pairs that do not turn, or layers that turn
    /// none): the GPU's QKV product then leaves RoPE to `rope_kv_write`, which reads them
    /// from the table and takes each layer's turned pairs.
    pub fn rope_scaled(&self) -> bool {
        self.rope_freq_factors.is_some()
            || self.rope_freq_scale != 1.0
            || self.rope_dims.is_some()
            || self.no_rope_period.is_some()
    }
}

/// Gemma 2's and Gemma 3's sliding window (`{arch}.attention.sliding_window`; the
/// period of windowed layers from `attention.sliding_window_pattern` where the file writes
/// one, else llama.cpp's for the architecture: Gemma 2's 2, Gemma 3's 6). Gemma 3's
/// windowed layers turn by RoPE base 10,000 (`rope.freq_base_swa` where written).
fn sliding_window(g: &Gguf, arch: &str) -> Result<Option<SlidingWindow>, GgufError> {
    let Ok(size) = g.get_u64(&format!("{arch}.attention.sliding_window")) else {
        return Ok(None);
    };
    if size == 0 {
        return Ok(None);
    }
    let key = format!("{arch}.attention.sliding_window_pattern");
    let period = match g.get(&key) {
        None => match arch {
            "gemma2" => 2,
            _ => 6,
        },
        // A list of the layers that are windowed (newer converters'): read as the period
        // it follows.
        Some(crate::gguf::Value::Array(layers)) => {
            let windowed: Vec<bool> = layers
                .iter()
                .map(|v| matches!(v, crate::gguf::Value::Bool(true)))
                .collect();
            window_period(&windowed).ok_or_else(|| {
                GgufError::Metadata(format!(
                    "{key}: windowed layers in no period (every layer but the last of each run \
                     of n) are not supported"
                ))
            })?
        }
        Some(_) => g.get_u64(&key)? as usize,
    };
    let rope_base = match arch {
        "gemma3" => Some(
            g.get_f64(&format!("{arch}.rope.freq_base_swa"))
                .unwrap_or(10000.0) as f32,
        ),
        _ => None,
    };
    Ok(Some(SlidingWindow {
        size: size as usize,
        period,
        rope_base,
    }))
}

/// The period of a list of windowed layers ([`SlidingWindow::period`]): 0 where every layer
/// is windowed, else the smallest `p` under which layer `i` is windowed just when
/// `i % p < p − 1`; `None` where no period gives the list.
fn window_period(windowed: &[bool]) -> Option<usize> {
    if windowed.iter().all(|&w| w) {
        return Some(0);
    }
    (1..=windowed.len()).find(|&p| {
        windowed
            .iter()
            .enumerate()
            .all(|(i, &w)| w == (i % p < p - 1))
    })
}

/// Gemma 2's and 3's scale beside `1/√head_dim` ([`LlamaConfig::attn_scale`]): their
/// queries are scaled by `1/√query_pre_attn_scalar`, which GGUF files do not carry.
/// llama.cpp's rule: the 27B models' (Gemma 2's 46 layers, Gemma 3's 62) is `dim / heads`,
/// the others' the head's width (1). `{arch}.attention.scale` overrides it where written.
fn gemma_attn_scale(g: &Gguf, arch: &str, dim: usize, heads: usize, head_dim: usize) -> f32 {
    if let Ok(s) = g.get_f64(&format!("{arch}.attention.scale")) {
        return (s * (head_dim as f64).sqrt()) as f32;
    }
    let layers = g.get_u64(&format!("{arch}.block_count")).unwrap_or(0);
    match (arch, layers) {
        ("gemma2", 46) | ("gemma3", 62) => (head_dim as f64 / (dim / heads) as f64).sqrt() as f32,
        _ => 1.0,
    }
}

/// A soft cap `{arch}.{key}` (Gemma 2's), where the file has one above 0.
fn softcap(g: &Gguf, arch: &str, key: &str) -> Option<f32> {
    g.get_f64(&format!("{arch}.{key}"))
        .ok()
        .filter(|c| *c > 0.0)
        .map(|c| c as f32)
}

/// How the file scales RoPE's frequencies ([`rope_scaling`]).
enum Scaling {
    /// Each frequency times this (1: none).
    Linear(f32),
    /// YaRN (Qwen2.5's and Qwen3's long-context files): pairs of short wavelength kept,
    /// long ones interpolated by `factor`, a ramp between ([`yarn_factors`]), and the
    /// scores scaled ([`LlamaConfig::attn_scale`]).
    Yarn {
        factor: f64,
        original_context: usize,
    },
}

/// The RoPE scaling the file asks for (`llama.rope.scaling.type`/`.factor`, or the older
/// `llama.rope.scale_linear`; `arch`'s keys): linear (1 / factor; 1 for none) or YaRN
/// (with `rope.scaling.original_context_length`, no attention factor or log multiplier of
/// its own). Other kinds are refused, not approximated.
fn rope_scaling(g: &Gguf, arch: &str) -> Result<Scaling, GgufError> {
    let factor = |k: &str| {
        g.get_f64(&format!("{arch}.{k}"))
            .ok()
            .filter(|f| *f > 0.0 && *f != 1.0)
    };
    let linear = |k: &str| Scaling::Linear(factor(k).map_or(1.0, |f| (1.0 / f) as f32));
    match g.get_str(&format!("{arch}.rope.scaling.type")) {
        Err(_) | Ok("none") => Ok(linear("rope.scale_linear")),
        Ok("linear") => Ok(linear("rope.scaling.factor")),
        Ok("yarn") => {
            let Some(f) = factor("rope.scaling.factor") else {
                return Ok(Scaling::Linear(1.0));
            };
            // YaRN's own attention factor (neutral at 1) and DeepSeek's log multiplier
            // (neutral at 0), each read as written: `factor` would take a multiplier of 1
            // for none.
            let own = [
                ("rope.scaling.attn_factor", 1.0),
                ("rope.scaling.yarn_log_multiplier", 0.0),
            ];
            let set = |(k, neutral): &(&str, f64)| {
                g.get_f64(&format!("{arch}.{k}"))
                    .is_ok_and(|v| v != *neutral)
            };
            if let Some((k, _)) = own.iter().find(|o| set(o)) {
                return Err(GgufError::Metadata(format!(
                    "YaRN with {arch}.{k} is not supported (Qwen's YaRN: factor and original context only)"
                )));
            }
            let orig = g
                .get_u64(&format!("{arch}.rope.scaling.original_context_length"))
                .map_err(|_| {
                    GgufError::Metadata(format!(
                        "YaRN scaling without {arch}.rope.scaling.original_context_length"
                    ))
                })?;
            Ok(Scaling::Yarn {
                factor: f,
                original_context: orig as usize,
            })
        }
        Ok(other) => Err(GgufError::Metadata(format!(
            "RoPE scaling {other:?} is not supported (linear, YaRN, or frequency factors)"
        ))),
    }
}

/// YaRN's frequencies as factors that divide each pair's (what `rope_freqs.weight` holds,
/// [`LlamaConfig::rope_freq_factors`]): pair i's frequency is interpolated (over `factor`)
/// where its wavelength is long against `original_context`, kept where short, and mixed
/// along a linear ramp between the pairs that turn 32 and 1 times over the original context
/// (`beta_fast`, `beta_slow`), as llama.cpp's `rope_yarn` and Hugging Face's
/// `_compute_yarn_parameters` make them.
pub fn yarn_factors(head_dim: usize, base: f32, factor: f64, original_context: usize) -> Vec<f32> {
    let dim = head_dim as f64;
    let corr = |rotations: f64| {
        dim * (original_context as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
            / (2.0 * (base as f64).ln())
    };
    let low = corr(32.0).floor().max(0.0);
    let high = corr(1.0).ceil().min(dim - 1.0);
    (0..head_dim / 2)
        .map(|i| {
            let ramp = ((i as f64 - low) / (high - low).max(0.001)).clamp(0.0, 1.0);
            // The extrapolated (unscaled) share of the pair's frequency.
            let keep = 1.0 - ramp;
            (1.0 / ((1.0 - keep) / factor + keep)) as f32
        })
        .collect()
}

/// Several projections of the same input: stacked into one matrix (one product for all)
/// when their storage types agree, else kept apart. Held once either way.
pub enum Projections {
    Stacked { m: Box<Matrix>, widths: Vec<usize> },
    Separate(Vec<Matrix>),
}

impl Projections {
    pub fn new(parts: Vec<Matrix>) -> Self {
        let widths = parts.iter().map(|m| m.rows).collect();
        match Matrix::stack(parts) {
            Ok(m) => Projections::Stacked {
                m: Box::new(m),
                widths,
            },
            Err(parts) => Projections::Separate(parts),
        }
    }
}

pub struct Layer {
    pub attn_norm: Vec<f32>,
    /// Q, K and V.
    pub qkv: Projections,
    /// Q's, K's and V's biases, one after the other (Qwen2's), where the file has them.
    pub qkv_bias: Option<Vec<f32>>,
    /// The RMSNorm of each Q and each K head, after the product and before RoPE (Qwen3's),
    /// where the file has them.
    pub qk_norm: Option<QkNorm>,
    pub wo: Matrix,
    pub ffn_norm: Vec<f32>,
    pub ffn: Ffn,
    /// The RMSNorms of the attention's and the feed-forward block's outputs before each is
    /// added to the residual (Gemma 2's and 3's `post_attention_norm`, `post_ffw_norm`),
    /// where the file has them.
    pub post_norms: Option<PostNorms>,
}

/// A layer's norms of its blocks' outputs ([`Layer::post_norms`]).
pub struct PostNorms {
    pub attn: Vec<f32>,
    pub ffn: Vec<f32>,
}

/// A layer's feed-forward block. (The dense variant is larger than the boxed experts; one
/// a layer, it is kept in place rather than behind another indirection.)
#[allow(clippy::large_enum_variant)]
pub enum Ffn {
    /// One SwiGLU block: gate and up, then down.
    Dense {
        gate_up: Projections,
        w_down: Matrix,
    },
    /// A mixture of experts ([`MoeConfig`]).
    Experts(Box<Experts>),
}

/// A mixture of experts: how tokens are routed ([`LlamaConfig::moe`]), its router's
/// weights (a row per expert), each expert's SwiGLU block, and Qwen2-MoE's shared expert
/// with its gate.
pub struct Experts {
    pub config: MoeConfig,
    pub router: Matrix,
    pub experts: Vec<Expert>,
    pub shared: Option<(Vec<f32>, Expert)>,
}

/// One expert: gate and up, then down.
pub struct Expert {
    pub gate_up: Projections,
    pub down: Matrix,
}

impl Layer {
    /// The dense block's gate-and-up and down matrices; `None` for a mixture of experts.
    pub fn dense(&self) -> Option<(&Projections, &Matrix)> {
        match &self.ffn {
            Ffn::Dense { gate_up, w_down } => Some((gate_up, w_down)),
            Ffn::Experts(_) => None,
        }
    }
}

/// The weights of the RMSNorm over each Q head and each K head (`attn_q_norm`,
/// `attn_k_norm`: `head_dim` each, one for every head of their kind), permuted as Q's and
/// K's rows ([`neox_rows`]). The norm's sum of squares is over a whole head, so the
/// permutation moves only the weights.
#[derive(Debug, Clone, PartialEq)]
pub struct QkNorm {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
}

pub struct Weights {
    pub token_embd: Matrix,
    pub layers: Vec<Layer>,
    pub output_norm: Vec<f32>,
    /// `None` when the output head is tied to the embedding.
    pub output: Option<Matrix>,
    /// The file, where converting a layout for the CPU kernels moved some matrix's values
    /// (scales rounded to f16, or requantized: `kquant::Fidelity`): the GPU path, whose
    /// f16 weights can hold the file's own values, reads them from it.
    pub inexact_from: Option<std::path::PathBuf>,
}

impl Weights {
    pub fn output(&self) -> &Matrix {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }

    /// Every matrix a step multiplies by.
    pub fn matrices(&self) -> impl Iterator<Item = &Matrix> {
        fn proj(p: &Projections) -> Vec<&Matrix> {
            match p {
                Projections::Stacked { m, .. } => vec![m],
                Projections::Separate(ms) => ms.iter().collect(),
            }
        }
        self.layers
            .iter()
            .flat_map(move |l| {
                let mut v = proj(&l.qkv);
                v.push(&l.wo);
                match &l.ffn {
                    Ffn::Dense { gate_up, w_down } => {
                        v.extend(proj(gate_up));
                        v.push(w_down);
                    }
                    Ffn::Experts(x) => {
                        v.push(&x.router);
                        for e in x.experts.iter().chain(x.shared.iter().map(|s| &s.1)) {
                            v.extend(proj(&e.gate_up));
                            v.push(&e.down);
                        }
                    }
                }
                v
            })
            .chain(std::iter::once(self.output()))
    }

    /// Prepares every matrix for products at `prec` (in parallel on the current pool).
    pub fn prepare(&self, prec: crate::matmul::ActPrecision) {
        use rayon::prelude::*;
        let all: Vec<&Matrix> = self.matrices().collect();
        all.par_iter().for_each(|m| m.prepare(prec));
    }
}

fn find<'a>(g: &'a Gguf, name: &str) -> Result<&'a TensorInfo, GgufError> {
    g.tensor(name).ok_or_else(|| GgufError::Tensor {
        name: name.into(),
        why: "missing".into(),
    })
}

fn shape_err(t: &TensorInfo, want: &[usize]) -> GgufError {
    GgufError::Tensor {
        name: t.name.clone(),
        why: format!(
            "shape {:?} does not match the metadata (expected {want:?})",
            t.dims
        ),
    }
}

fn matrix(g: &Gguf, name: &str, cols: usize, rows: usize) -> Result<Matrix, GgufError> {
    let t = find(g, name)?;
    if t.dims != [cols, rows] {
        return Err(shape_err(t, &[cols, rows]));
    }
    Ok(matrix_of(t.ty, rows, cols, g.data(t)))
}

/// The matrices stacked in one tensor `name` (`cols` wide; Phi-3's `attn_qkv`: Q's, K's
/// and V's rows one after the other, and `ffn_up`: the gate's then up's), split at their
/// rows: `parts` are each one's rows and the heads to permute them by ([`row_runs`]), if
/// any.
fn fused_rows(
    g: &Gguf,
    name: &str,
    cols: usize,
    parts: &[(usize, Option<HeadRows>)],
) -> Result<Vec<Matrix>, GgufError> {
    let t = find(g, name)?;
    let rows: usize = parts.iter().map(|p| p.0).sum();
    if t.dims != [cols, rows] || !cols.is_multiple_of(t.ty.block_elems()) {
        return Err(shape_err(t, &[cols, rows]));
    }
    let row_bytes = cols / t.ty.block_elems() * t.ty.block_bytes();
    let data = g.data(t);
    let mut at = 0;
    let mut out = Vec::with_capacity(parts.len());
    for &(n, neox) in parts {
        let bytes = &data[at * row_bytes..(at + n) * row_bytes];
        at += n;
        out.push(match neox {
            Some(h) => matrix_of(t.ty, n, cols, &neox_to_pairs(bytes, n, h)),
            None => matrix_of(t.ty, n, cols, bytes),
        });
    }
    Ok(out)
}

/// Each of a 3-D tensor's (`[cols, rows, n]`: llama.cpp's `ffn_*_exps`, an expert's
/// matrix after another) `n` matrices.
fn stacked_matrices(
    g: &Gguf,
    name: &str,
    cols: usize,
    rows: usize,
    n: usize,
) -> Result<Vec<Matrix>, GgufError> {
    let t = find(g, name)?;
    if t.dims != [cols, rows, n] || !cols.is_multiple_of(t.ty.block_elems()) {
        return Err(shape_err(t, &[cols, rows, n]));
    }
    let each = rows * cols / t.ty.block_elems() * t.ty.block_bytes();
    // The experts converted side by side (a large mixture has thousands of matrices).
    use rayon::prelude::*;
    Ok(g.data(t)
        .par_chunks_exact(each)
        .map(|b| matrix_of(t.ty, rows, cols, b))
        .collect())
}

/// The tensors holding layer `i`'s experts' `role` matrices (`ffn_gate`, `ffn_up`,
/// `ffn_down`), every expert's in order: one 3-D tensor (`{role}_exps`), or, in Mixtral
/// files written before llama.cpp stacked them, one tensor per expert (`{role}.{x}`).
pub fn expert_tensors(g: &Gguf, i: usize, role: &str, count: usize) -> Vec<String> {
    let stacked = format!("blk.{i}.{role}_exps.weight");
    let apart = |x: usize| format!("blk.{i}.{role}.{x}.weight");
    if g.tensor(&stacked).is_none() && g.tensor(&apart(0)).is_some() {
        (0..count).map(apart).collect()
    } else {
        vec![stacked]
    }
}

/// Layer `i`'s experts' `role` matrices (`rows × cols` each), from their tensors
/// ([`expert_tensors`]).
fn expert_matrices(
    g: &Gguf,
    i: usize,
    role: &str,
    cols: usize,
    rows: usize,
    count: usize,
) -> Result<Vec<Matrix>, GgufError> {
    use rayon::prelude::*;
    match expert_tensors(g, i, role, count).as_slice() {
        [stacked] => stacked_matrices(g, stacked, cols, rows, count),
        apart => apart
            .par_iter()
            .map(|name| matrix(g, name, cols, rows))
            .collect(),
    }
}

/// Layer `i`'s mixture of experts (`ffn_gate_inp`, the router; `ffn_{gate,up,down}_exps`,
/// the experts' matrices, or older Mixtral files' tensor per expert; Qwen2-MoE's
/// `ffn_*_shexp` and its gate `ffn_gate_inp_shexp`).
fn experts(g: &Gguf, i: usize, d: usize, moe: &MoeConfig) -> Result<Experts, GgufError> {
    let n = |s: &str| format!("blk.{i}.{s}.weight");
    let (e, f) = (moe.count, moe.ffn);
    let gates = expert_matrices(g, i, "ffn_gate", d, f, e)?;
    let ups = expert_matrices(g, i, "ffn_up", d, f, e)?;
    let downs = expert_matrices(g, i, "ffn_down", f, d, e)?;
    let experts = gates
        .into_iter()
        .zip(ups)
        .zip(downs)
        .map(|((gate, up), down)| Expert {
            gate_up: Projections::new(vec![gate, up]),
            down,
        })
        .collect();
    let shared = match moe.shared_ffn {
        None => None,
        Some(sf) => Some((
            vector(g, &n("ffn_gate_inp_shexp"), d)?,
            Expert {
                gate_up: Projections::new(vec![
                    matrix(g, &n("ffn_gate_shexp"), d, sf)?,
                    matrix(g, &n("ffn_up_shexp"), d, sf)?,
                ]),
                down: matrix(g, &n("ffn_down_shexp"), sf, d)?,
            },
        )),
    };
    Ok(Experts {
        config: *moe,
        router: matrix(g, &n("ffn_gate_inp"), d, e)?,
        experts,
        shared,
    })
}

/// A `rows × cols` matrix of a file's tensor of type `ty` (`bytes`, its blocks) as the
/// kernels hold it: the file's blocks where the kernels read them as they are; Q5_x,
/// K-quants and IQ4 in the layout the kernels read ([`kquant`]), with offsets beside it
/// where it has them and the packed kernels' form with the file's own values where the
/// blocks would round them; f32 rows for the others.
pub fn matrix_of(ty: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Matrix {
    let data = match ty {
        ty if ty.kernel_native() => MatData::Quant(ty, bytes.to_vec()),
        ty if ty.quantized() => {
            let c = kquant::to_kernel_layout(ty, bytes);
            // The file's own values where the packed kernels hold them (the K-quant
            // scales the blocks round, Q6_K's scale per 16).
            let exact = kquant::exact_packed(ty, rows, cols, bytes, &c);
            let mut m = Matrix::new(rows, cols, MatData::Quant(c.ty, c.data));
            if let Some(pk) = exact {
                m = m.with_exact_packed(pk);
            }
            return match c.offsets {
                Some(o) => m.with_offsets(o),
                None => m,
            };
        }
        ty => {
            let mut v = vec![0f32; rows * cols];
            quant::dequantize_row(ty, bytes, &mut v);
            MatData::F32(v)
        }
    };
    Matrix::new(rows, cols, data)
}

/// The heads by which tensor `name`'s rows are permuted at load from NEOX's halves
/// to adjacent RoPE pairs ([`neox_to_pairs`]): Q's and K's weights, biases and head norms'
/// weights ([`QkNorm`]: one head's worth) where the file's RoPE is NEOX's
/// ([`LlamaConfig::neox`]); `None` for every other tensor. Whatever
/// reads those tensors from the file (the GPU path's exact weights too) permutes by it.
pub fn neox_rows(c: &LlamaConfig, name: &str) -> Option<HeadRows> {
    let rope = [".attn_q.", ".attn_k.", ".attn_q_norm.", ".attn_k_norm."]
        .iter()
        .any(|p| name.contains(p));
    (c.neox && rope).then_some(HeadRows::of(c))
}

/// The runs of weight tensor `name`'s `rows` rows that load reads as matrices of their
/// own, each with the heads its rows are permuted by ([`neox_rows`]): one run, but
/// Phi-3's fused `attn_qkv`, whose Q's, K's and V's rows are three (Q's and K's permuted
/// as their own tensors' would be). Whatever reads the file's matrices (the GPU path's
/// exact weights too) splits and permutes by it.
pub fn row_runs(c: &LlamaConfig, name: &str, rows: usize) -> Vec<(usize, Option<HeadRows>)> {
    if name.contains(".attn_qkv.") {
        let rope = c.neox.then_some(HeadRows::of(c));
        let (q, kv) = (c.n_heads * c.head_dim, c.kv_dim());
        return vec![(q, rope), (kv, rope), (kv, None)];
    }
    vec![(rows, neox_rows(c, name))]
}

/// Weight tensor `name` (`rows × cols`) as the matrices of its [`row_runs`].
fn read_runs(
    g: &Gguf,
    name: &str,
    cols: usize,
    rows: usize,
    c: &LlamaConfig,
) -> Result<Vec<Matrix>, GgufError> {
    fused_rows(g, name, cols, &row_runs(c, name, rows))
}

/// Q's, K's and V's biases (`blk.i.attn_{q,k,v}.bias`) one after the other, permuted as
/// their rows ([`neox_rows`]); `None` where the file has none of them (zeros for one
/// missing beside the others).
fn qkv_bias(g: &Gguf, i: usize, c: &LlamaConfig) -> Result<Option<Vec<f32>>, GgufError> {
    let names = ["attn_q", "attn_k", "attn_v"].map(|s| format!("blk.{i}.{s}.bias"));
    if names.iter().all(|n| g.tensor(n).is_none()) {
        return Ok(None);
    }
    let (q, kv) = (c.n_heads * c.head_dim, c.kv_dim());
    let mut out = Vec::with_capacity(q + 2 * kv);
    for (name, n) in names.iter().zip([q, kv, kv]) {
        let b = match g.tensor(name) {
            Some(_) => vector(g, name, n)?,
            None => vec![0.0; n],
        };
        out.extend(match neox_rows(c, name) {
            Some(h) => neox_to_pairs(&b, n, h),
            None => b,
        });
    }
    Ok(Some(out))
}

/// The Q and K heads' norms (`blk.i.attn_{q,k}_norm.weight`, [`QkNorm`]); `None` where
/// the file has neither. One without the other, or beside biases on Q, K and V (no model
/// has both: which comes first is not settled here), is an error.
fn qk_norm(g: &Gguf, i: usize, c: &LlamaConfig, biased: bool) -> Result<Option<QkNorm>, GgufError> {
    let [q, k] = ["attn_q_norm", "attn_k_norm"].map(|s| format!("blk.{i}.{s}.weight"));
    match (g.tensor(&q).is_some(), g.tensor(&k).is_some()) {
        (false, false) => return Ok(None),
        (true, true) if !biased => {}
        (true, true) => {
            return Err(GgufError::Metadata(format!(
                "layer {i} has Q/K norms and biases on Q, K and V: not supported together"
            )))
        }
        _ => {
            return Err(GgufError::Metadata(format!(
                "layer {i} has one of attn_q_norm and attn_k_norm without the other"
            )))
        }
    }
    let hd = c.head_dim;
    let read = |name: &str| -> Result<Vec<f32>, GgufError> {
        let v = vector(g, name, hd)?;
        Ok(match neox_rows(c, name) {
            Some(h) => neox_to_pairs(&v, hd, h),
            None => v,
        })
    };
    Ok(Some(QkNorm {
        q: read(&q)?,
        k: read(&k)?,
    }))
}

/// Layer `i`'s norms of its blocks' outputs (`post_attention_norm`, `post_ffw_norm`), if the
/// file has them; one without the other is an error.
fn post_norms(g: &Gguf, i: usize, d: usize) -> Result<Option<PostNorms>, GgufError> {
    let [a, f] = ["post_attention_norm", "post_ffw_norm"].map(|s| format!("blk.{i}.{s}.weight"));
    match (g.tensor(&a).is_some(), g.tensor(&f).is_some()) {
        (false, false) => Ok(None),
        (true, true) => Ok(Some(PostNorms {
            attn: vector(g, &a, d)?,
            ffn: vector(g, &f, d)?,
        })),
        _ => Err(GgufError::Metadata(format!(
            "layer {i} has one of post_attention_norm and post_ffw_norm without the other"
        ))),
    }
}

fn vector(g: &Gguf, name: &str, n: usize) -> Result<Vec<f32>, GgufError> {
    let t = find(g, name)?;
    if t.dims != [n] {
        return Err(shape_err(t, &[n]));
    }
    if t.ty.block_elems() != 1 && !n.is_multiple_of(quant::QK) {
        return Err(shape_err(t, &[n]));
    }
    let mut v = vec![0f32; n];
    quant::dequantize_row(t.ty, g.data(t), &mut v);
    Ok(v)
}

/// One log line naming the tensors whose layout was converted at load, if any; whether
/// any one's values moved (`kquant::Fidelity` other than `Exact`).
fn log_conversions(g: &Gguf) -> bool {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    let mut inexact = false;
    for t in &g.tensors {
        if t.dims.len() == 2 && t.ty.quantized() && !t.ty.kernel_native() {
            let (to, fidelity) = kquant::kernel_layout(t.ty);
            // dims = [cols, rows]
            let packs = kquant::packs_exactly(t.ty, t.dims[1]);
            inexact |= fidelity != kquant::Fidelity::Exact && !packs;
            let offsets = kquant::offset_run(t.ty)
                .map(|run| format!(", an offset per {run}"))
                .unwrap_or_default();
            let how = match fidelity {
                kquant::Fidelity::Exact => format!("same values{offsets}"),
                kquant::Fidelity::ScalesToF16 if packs => format!(
                    "same values{offsets}, scales exact in the packed kernels, rounded to f16 \
                     for f32 activations"
                ),
                kquant::Fidelity::ScalesToF16 => {
                    format!("same values, scales rounded to f16{offsets}")
                }
                kquant::Fidelity::Requantized if packs => {
                    "same values, packed with a scale per 16; requantized for f32 activations"
                        .to_string()
                }
                kquant::Fidelity::Requantized => "requantized".to_string(),
            };
            *counts
                .entry(format!("{:?} → {to:?} ({how})", t.ty))
                .or_default() += 1;
        }
    }
    if !counts.is_empty() {
        let what: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
        tracing::info!(
            "matrices converted at load for the kernels: {}",
            what.join(", ")
        );
    }
    inexact
}

impl Weights {
    pub fn from_gguf(g: &Gguf, c: &LlamaConfig) -> Result<Self, GgufError> {
        let (d, q, kv, f) = (c.dim, c.n_heads * c.head_dim, c.kv_dim(), c.ffn_dim);
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let qkv_bias = qkv_bias(g, i, c)?;
            let qk_norm = qk_norm(g, i, c, qkv_bias.is_some())?;
            // Phi-3's are fused in one tensor.
            let qkv = match g.tensor(&n("attn_qkv")) {
                Some(_) => read_runs(g, &n("attn_qkv"), d, q + 2 * kv, c)?,
                None => [(n("attn_q"), q), (n("attn_k"), kv), (n("attn_v"), kv)]
                    .iter()
                    .map(|(name, rows)| read_runs(g, name, d, *rows, c))
                    .collect::<Result<Vec<_>, _>>()?
                    .into_iter()
                    .flatten()
                    .collect(),
            };
            let ffn = match &c.moe {
                Some(moe) => Ffn::Experts(Box::new(experts(g, i, d, moe)?)),
                None => {
                    let gate_up = match g.tensor(&n("ffn_gate")) {
                        Some(_) => vec![
                            matrix(g, &n("ffn_gate"), d, f)?,
                            matrix(g, &n("ffn_up"), d, f)?,
                        ],
                        None => fused_rows(g, &n("ffn_up"), d, &[(f, None), (f, None)])?,
                    };
                    Ffn::Dense {
                        gate_up: Projections::new(gate_up),
                        w_down: matrix(g, &n("ffn_down"), f, d)?,
                    }
                }
            };
            layers.push(Layer {
                attn_norm: vector(g, &n("attn_norm"), d)?,
                qkv: Projections::new(qkv),
                qkv_bias,
                qk_norm,
                wo: matrix(g, &n("attn_output"), q, d)?,
                ffn_norm: vector(g, &n("ffn_norm"), d)?,
                ffn,
                post_norms: post_norms(g, i, d)?,
            });
        }
        let output = if g.tensor("output.weight").is_some() {
            Some(matrix(g, "output.weight", d, c.vocab)?)
        } else {
            None
        };
        let inexact = log_conversions(g);
        Ok(Self {
            inexact_from: g.path.clone().filter(|_| inexact),
            token_embd: matrix(g, "token_embd.weight", d, c.vocab)?,
            layers,
            output_norm: vector(g, "output_norm.weight", d)?,
            output,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_windowed_layers_is_read_as_its_period() {
        let gemma3: Vec<bool> = (0..26).map(|i| i % 6 != 5).collect();
        assert_eq!(window_period(&gemma3), Some(6));
        let gemma2: Vec<bool> = (0..26).map(|i| i % 2 == 0).collect();
        assert_eq!(window_period(&gemma2), Some(2));
        assert_eq!(window_period(&[true; 4]), Some(0));
        assert_eq!(window_period(&[false; 4]), Some(1));
        assert_eq!(window_period(&[true, false, false, true]), None);
        let c = LlamaConfig {
            window: Some(SlidingWindow {
                size: 512,
                period: 6,
                rope_base: Some(1e4),
            }),
            ..LlamaConfig::smollm2_135m()
        };
        let at: Vec<Option<usize>> = (0..7).map(|l| c.window_at(l)).collect();
        assert_eq!(
            at,
            [
                Some(512),
                Some(512),
                Some(512),
                Some(512),
                Some(512),
                None,
                Some(512)
            ]
        );
        assert!(c.local_rope_at(0) && !c.local_rope_at(5));
    }

    #[test]
    fn another_files_sliding_window_is_every_layers_where_shorter_than_the_context() {
        // Phi-3-mini-4k's: each row attends over the 2,047 positions up to its own.
        let w = every_layer_window(4096, Some(2047)).expect("windowed");
        assert_eq!((w.size, w.period, w.rope_base), (2047, 0, None));
        let c = LlamaConfig {
            n_layers: 4,
            window: Some(w),
            ..LlamaConfig::smollm2_135m()
        };
        assert!((0..4).all(|l| c.window_at(l) == Some(2047) && !c.local_rope_at(l)));
        // Phi-3-mini-128k's and Phi-3.5's 262,144: past the context, no window.
        assert_eq!(every_layer_window(131072, Some(262144)), None);
        assert_eq!(every_layer_window(4096, Some(0)), None, "no window");
        assert_eq!(every_layer_window(4096, None), None);
    }

    #[test]
    fn smollm3s_every_fourth_layer_turns_no_pair() {
        // SmolLM3-3B's 36 layers: llama.cpp's `(il + 1) % 4 != 0` leaves 3, 7, …, 35 out.
        let c = LlamaConfig {
            n_layers: 36,
            no_rope_period: Some(4),
            attn_scale: 1.44,
            ..LlamaConfig::smollm2_135m()
        };
        let nope: Vec<usize> = (0..36).filter(|&l| !c.ropes_at(l)).collect();
        assert_eq!(nope, [3, 7, 11, 15, 19, 23, 27, 31, 35]);
        // A NoPE layer's pairs all pass, over YaRN's factor; the others turn every pair.
        assert_eq!(c.rope_pass_at(3), (0, 1.0 / 1.2));
        assert_eq!(c.rope_pass_at(2), (32, 1.0));
        assert!(
            c.rope_scaled(),
            "the fused QKV product leaves it to rope_kv_write"
        );
        let plain = LlamaConfig::smollm2_135m();
        assert!((0..30).all(|l| plain.ropes_at(l) && plain.rope_pass_at(l) == (32, 1.0)));
        assert!(!plain.rope_scaled());
    }
}
