//! The synthetic model writer: a GGUF file of the Llama architecture with random weights
//! from a seed (SmolLM2-135M's shape by default), a real byte-level BPE vocabulary and the
//! ChatML template. Tests that need no real weights, and GPU checks, use it. Also a row of
//! synthetic logits ([`logits`]) for the sampling and log-probability benchmarks.

use crate::chat::CHATML;
use crate::gguf::write::{self, Tensor};
use crate::gguf::{GgmlType, Value};
use crate::quant;
use crate::tokenizer::byte_to_char;
use std::io::{self, BufWriter};
use std::path::Path;

/// `n` logits spread evenly over [lo, hi) by a fixed xorshift sequence: the same row on
/// every run.
pub fn logits(n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * (hi - lo) + lo
        })
        .collect()
}

/// Shape and seed of a synthetic model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub n_layers: usize,
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub ffn_dim: usize,
    pub vocab: usize,
    pub context_len: usize,
    pub seed: u64,
    /// Type of the projection matrices (the embedding is Q8_0, norms F32).
    pub matrix_type: GgmlType,
    /// Types by tensor role over `matrix_type` and the embedding's Q8_0: `attn_q`,
    /// `attn_k`, `attn_v`, `attn_output`, `ffn_gate`, `ffn_up`, `ffn_down`, `token_embd`,
    /// and `output` (which writes an output head of its own; tied to the embedding
    /// otherwise). A K-quant on rows whose length is not a multiple of 256 falls back as
    /// llama.cpp's quantizer does (Q2_K, Q3_K → Q4_0; Q4_K → Q5_0, Q5_K → Q5_1, Q6_K →
    /// Q8_0, IQ4_XS → IQ4_NL).
    pub types: Vec<(&'static str, GgmlType)>,
    /// `llama.pooling_type`, written when set (embedding models' files carry it).
    pub pooling_type: Option<u32>,
    /// RoPE's scaling: Llama 3.1's frequency factors (`rope_freqs.weight`, from its
    /// formula) or a linear factor (`llama.rope.scaling.*`); none by default.
    pub rope_scaling: SynthRope,
    /// Another file's `tokenizer.*` metadata to write instead of the synthetic byte-level
    /// BPE (its token count is the model's vocabulary): a SentencePiece or Llama 3
    /// vocabulary under random weights.
    pub vocabulary: Option<Vec<(String, Value)>>,
    /// The architecture the file names (`llama` by default).
    pub arch: SynthArch,
    /// Each head's width, written as `attention.key_length`/`value_length` (Qwen3's 128
    /// under a 1,024-wide model); `dim / n_heads`, unwritten, where `None`.
    pub head_dim: Option<usize>,
    /// A mixture's experts and how many a token uses, where the architecture has them
    /// ([`SynthArch::Qwen3Moe`] and the others): [`SYNTH_EXPERTS`] and 2 by default.
    pub experts: (usize, usize),
    /// The experts' matrices as one tensor each (`ffn_gate.E.weight`: Mixtral's files
    /// before llama.cpp stacked them) rather than one 3-D tensor per role.
    pub experts_apart: bool,
    /// The dimensions of each head RoPE turns (`rope.dimension_count`), where fewer than
    /// the head's: partial RoPE (Phi-4-mini's 96 of 128); the RoPE factors a scaling
    /// writes are then one per turned pair.
    pub rope_dims: Option<usize>,
    /// `attention.sliding_window`, where set: Gemma 2's and 3's windowed layers
    /// ([`SynthArch::Gemma2`], [`SynthArch::Gemma3`]).
    pub window: Option<usize>,
    /// Gemma 2's soft caps on the attention's scores and on the logits
    /// (`attn_logit_softcapping`, `final_logit_softcapping`), where set.
    pub softcaps: Option<(f32, f32)>,
}

/// The architecture a synthetic file names, and the tensors that go with it
/// ([`SynthSpec::arch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SynthArch {
    #[default]
    Llama,
    /// `qwen2`: Qwen2's keys, biases on Q, K and V, and Q and K rows a reader takes as
    /// NEOX's halves.
    Qwen2,
    /// `qwen3`: Qwen3's keys, no biases, a norm of each Q and K head (`attn_q_norm`,
    /// `attn_k_norm`), NEOX's halves.
    Qwen3,
    /// `phi3`: Phi-3's keys, Q, K and V in one matrix (`attn_qkv`), the gate and up
    /// projections in one (`ffn_up`, the gate's rows first), NEOX's halves.
    Phi3,
    /// `qwen3moe`: Qwen3's attention, and in each layer a mixture of [`SYNTH_EXPERTS`]
    /// experts (each half `ffn_dim` wide, 2 chosen a token, their weights normalized).
    Qwen3Moe,
    /// `qwen2moe`: Qwen2's attention (biases), the mixture of experts (weights not
    /// normalized) and a shared expert (half `ffn_dim` wide) behind a sigmoid gate.
    Qwen2Moe,
    /// Mixtral's: a `llama` file with `expert_count`, the mixture as Qwen3-MoE's (weights
    /// normalized), Llama's attention.
    Mixtral,
    /// `gemma`: NEOX's halves, GeGLU, the embeddings scaled by `√dim` as they are read.
    Gemma,
    /// `gemma2`: Gemma's, with each block's output normed (`post_attention_norm`,
    /// `post_ffw_norm`), every other layer windowed ([`SynthSpec::window`]) and the soft
    /// caps ([`SynthSpec::softcaps`]).
    Gemma2,
    /// `gemma3`: Gemma 2's without caps, Qwen3's Q and K norms, five windowed layers of six
    /// on RoPE base 10,000.
    Gemma3,
    /// `smollm3`: Llama's tensors and layout; a reader leaves RoPE out of every fourth
    /// layer (SmolLM3's NoPE layers).
    SmolLM3,
}

/// Experts in a synthetic mixture ([`SynthArch::Qwen3Moe`], [`SynthArch::Qwen2Moe`],
/// [`SynthArch::Mixtral`]).
pub const SYNTH_EXPERTS: usize = 4;

impl SynthArch {
    fn name(self) -> &'static str {
        match self {
            SynthArch::Llama => "llama",
            SynthArch::Qwen2 => "qwen2",
            SynthArch::Qwen3 => "qwen3",
            SynthArch::Phi3 => "phi3",
            SynthArch::Qwen3Moe => "qwen3moe",
            SynthArch::Qwen2Moe => "qwen2moe",
            SynthArch::Mixtral => "llama",
            SynthArch::Gemma => "gemma",
            SynthArch::Gemma2 => "gemma2",
            SynthArch::Gemma3 => "gemma3",
            SynthArch::SmolLM3 => "smollm3",
        }
    }

    fn experts(self) -> bool {
        matches!(
            self,
            SynthArch::Qwen3Moe | SynthArch::Qwen2Moe | SynthArch::Mixtral
        )
    }
}

/// How a synthetic model's RoPE frequencies are scaled ([`SynthSpec::rope_scaling`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SynthRope {
    None,
    /// `rope_freqs.weight` as Llama 3.1's conversion writes it (factor 8, low- and
    /// high-frequency factors 1 and 4) for an original context of this many tokens —
    /// small, so that a short prompt meets pairs of every kind: unscaled, scaled by 8,
    /// and between.
    Llama3 {
        original_context: usize,
    },
    /// `llama.rope.scaling.type = "linear"` with this factor.
    Linear(f32),
    /// `llama.rope.scaling.type = "yarn"` with this factor over an original context of
    /// this many tokens (Qwen's long-context files: factor 4 over 32,768) — small, so
    /// that a short prompt meets pairs kept, interpolated and between.
    Yarn {
        factor: f32,
        original_context: usize,
    },
    /// Phi-3's LongRoPE (`rope_factors_long.weight`, `rope_factors_short.weight`): long
    /// factors from 1 to 8 over the pairs, short ones from 1 to 1.5, for an original
    /// context of this many tokens (past it, a reader takes the long ones); with
    /// `rope.scaling.attn_factor` where given (else a reader computes it).
    LongRope {
        original_context: usize,
        attn_factor: Option<f32>,
    },
}

/// Llama 3.1's RoPE factors for `head_dim`-wide heads at `base` (Hugging Face's
/// `_compute_llama3_parameters`, as llama.cpp's converter writes them into
/// `rope_freqs.weight`): 1 for pairs whose wavelength is under `original_context / 4`, 8
/// over `original_context`, and between them a smooth step.
pub fn llama3_rope_factors(head_dim: usize, base: f32, original_context: usize) -> Vec<f32> {
    let (factor, low, high) = (8.0f64, 1.0f64, 4.0f64);
    let old = original_context as f64;
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / (base as f64).powf(2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < old / high {
                1.0
            } else if wavelen > old / low {
                factor as f32
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

impl Default for SynthSpec {
    /// SmolLM2-135M's shape.
    fn default() -> Self {
        Self {
            n_layers: 30,
            dim: 576,
            n_heads: 9,
            n_kv_heads: 3,
            ffn_dim: 1536,
            vocab: 49152,
            context_len: 8192,
            seed: 42,
            matrix_type: GgmlType::Q4_1,
            types: Vec::new(),
            pooling_type: None,
            rope_scaling: SynthRope::None,
            vocabulary: None,
            arch: SynthArch::Llama,
            head_dim: None,
            experts: (SYNTH_EXPERTS, 2),
            experts_apart: false,
            rope_dims: None,
            window: None,
            softcaps: None,
        }
    }
}

impl SynthSpec {
    /// A small model for fast tests (same architecture, fewer and narrower layers).
    pub fn tiny() -> Self {
        Self {
            n_layers: 2,
            dim: 128,
            n_heads: 4,
            n_kv_heads: 2,
            ffn_dim: 256,
            vocab: 2048,
            context_len: 2048,
            seed: 7,
            matrix_type: GgmlType::Q4_1,
            types: Vec::new(),
            pooling_type: None,
            rope_scaling: SynthRope::None,
            vocabulary: None,
            arch: SynthArch::Llama,
            head_dim: None,
            experts: (SYNTH_EXPERTS, 2),
            experts_apart: false,
            rope_dims: None,
            window: None,
            softcaps: None,
        }
    }

    /// Qwen2.5-0.5B's shape in Q4_1 (896 wide, 24 layers, 14 query heads on 2 KV heads of
    /// 64: groups of 7; a feed-forward of 4,864), on SmolLM2's vocabulary and as a `llama`
    /// file (`arch: SynthArch::Qwen2` adds Qwen2's biases and RoPE): what the CPU's attention
    /// does with groups of more than 4 heads.
    pub fn groups_of_7() -> Self {
        Self {
            n_layers: 24,
            dim: 896,
            n_heads: 14,
            n_kv_heads: 2,
            ffn_dim: 4864,
            seed: 48,
            ..Self::default()
        }
    }

    /// Qwen3-0.6B's shape in Q4_1 as a `qwen3` file (1,024 wide, 28 layers, 16 query heads
    /// of 128 on 8 KV heads: Q's rows twice the model's width; a feed-forward of 3,072;
    /// each Q and K head normed), on SmolLM2's vocabulary.
    pub fn qwen3_0_6b() -> Self {
        Self {
            n_layers: 28,
            dim: 1024,
            n_heads: 16,
            n_kv_heads: 8,
            head_dim: Some(128),
            ffn_dim: 3072,
            seed: 49,
            arch: SynthArch::Qwen3,
            ..Self::default()
        }
    }

    /// A small model of every layout that is converted at load (Q5_0, Q5_1, Q4_K, Q5_K,
    /// Q6_K), with an output head of its own: as [`SynthSpec::tiny`], 256 wide (K-quant
    /// rows are multiples of 256) in 8 heads.
    pub fn tiny_k_quants() -> Self {
        Self {
            dim: 256,
            // Heads of 32 in pairs, as `tiny`'s: the CUDA emulator has that build.
            n_heads: 8,
            n_kv_heads: 4,
            ffn_dim: 512,
            seed: 11,
            types: vec![
                ("token_embd", GgmlType::Q4_K),
                ("attn_q", GgmlType::Q4_K),
                ("attn_k", GgmlType::Q5_K),
                ("attn_v", GgmlType::Q6_K),
                ("attn_output", GgmlType::Q5_0),
                ("ffn_gate", GgmlType::Q4_K),
                ("ffn_up", GgmlType::Q5_1),
                ("ffn_down", GgmlType::Q6_K),
                ("output", GgmlType::Q6_K),
            ],
            ..Self::tiny()
        }
    }

    /// llama.cpp's Q4_K_M mix on SmolLM2-135M's shape (as `llama-quantize` makes it of
    /// SmolLM2: Q4_K, with Q6_K for attn_v, ffn_down and the head; rows of 576 are no
    /// multiple of 256, so Q5_0 for Q4_K's and Q8_0 for Q6_K's there): every matrix but
    /// ffn_down in 8-bit blocks of the file's values, ffn_down Q6_K with its scale per 16.
    pub fn q4_k_m() -> Self {
        Self {
            seed: 45,
            types: vec![
                ("attn_q", GgmlType::Q4_K),
                ("attn_k", GgmlType::Q4_K),
                ("attn_v", GgmlType::Q6_K),
                ("attn_output", GgmlType::Q4_K),
                ("ffn_gate", GgmlType::Q4_K),
                ("ffn_up", GgmlType::Q4_K),
                ("ffn_down", GgmlType::Q6_K),
                ("output", GgmlType::Q6_K),
            ],
            ..Self::default()
        }
    }

    /// One of Qwen3-30B-A3B's layers as a `qwen3moe` file (2,048 wide, 32 query heads over
    /// 4 KV heads of 128, each Q and K head normed; 8 of 128 experts a token, each 768
    /// wide; ~620 M weights) and a vocabulary of 4,096: what the GPU's expert kernels do at
    /// a real mixture's widths and counts, without the whole model.
    pub fn qwen3moe_30b_layer() -> Self {
        Self {
            n_layers: 1,
            dim: 2048,
            n_heads: 32,
            n_kv_heads: 4,
            head_dim: Some(128),
            ffn_dim: 1536,
            vocab: 4096,
            seed: 50,
            arch: SynthArch::Qwen3Moe,
            experts: (128, 8),
            ..Self::default()
        }
    }

    /// Llama-3-8B's layer shape (4,096 wide, 32 query heads over 8 KV heads of 128, a
    /// feed-forward of 14,336) in llama.cpp's Q4_K_M mix ([`SynthSpec::q4_k_m`]), 2 layers
    /// and a vocabulary of 4,096 (~470 M weights, a file of ~310 MB): what the GPU products and
    /// steps of an 8B model are at its own widths (its `ffn_down` read in runs of columns
    /// at 8–16 rows, its QKV a stack of two layouts), without the whole model.
    pub fn llama8b_layers() -> Self {
        Self {
            n_layers: 2,
            dim: 4096,
            n_heads: 32,
            n_kv_heads: 8,
            ffn_dim: 14336,
            vocab: 4096,
            seed: 46,
            ..Self::q4_k_m()
        }
    }

    /// Llama-3-8B's two layers ([`SynthSpec::llama8b_layers`]) in llama.cpp's Q2_K mix: Q2_K
    /// Q, K, gate and up, Q4_K V (its grouped-query ratio is 4), Q3_K attn_output and
    /// ffn_down, a Q6_K head.
    pub fn llama8b_q2_k() -> Self {
        Self {
            seed: 47,
            types: vec![
                ("attn_q", GgmlType::Q2_K),
                ("attn_k", GgmlType::Q2_K),
                ("attn_v", GgmlType::Q4_K),
                ("attn_output", GgmlType::Q3_K),
                ("ffn_gate", GgmlType::Q2_K),
                ("ffn_up", GgmlType::Q2_K),
                ("ffn_down", GgmlType::Q3_K),
                ("output", GgmlType::Q6_K),
            ],
            ..Self::llama8b_layers()
        }
    }

    /// [`SynthSpec::tiny_k_quants`] with the other layouts converted at load: Q2_K, Q3_K
    /// and the non-linear IQ4_NL, IQ4_XS (llama.cpp's Q2_K, Q3_K_x and IQ4 files).
    pub fn tiny_low_bits() -> Self {
        Self {
            seed: 12,
            types: vec![
                ("token_embd", GgmlType::IQ4_NL),
                ("attn_q", GgmlType::Q3_K),
                ("attn_k", GgmlType::IQ4_XS),
                ("attn_v", GgmlType::Q2_K),
                ("attn_output", GgmlType::IQ4_NL),
                ("ffn_gate", GgmlType::IQ4_XS),
                ("ffn_up", GgmlType::Q3_K),
                ("ffn_down", GgmlType::Q3_K),
                ("output", GgmlType::IQ4_XS),
            ],
            ..Self::tiny_k_quants()
        }
    }

    /// The type of tensor `role`, with rows of `cols`.
    fn type_of(&self, role: &str, cols: usize) -> GgmlType {
        let default = if role == "token_embd" {
            GgmlType::Q8_0
        } else {
            self.matrix_type
        };
        let ty = self
            .types
            .iter()
            .find(|(r, _)| *r == role)
            .map_or(default, |&(_, t)| t);
        if cols.is_multiple_of(ty.block_elems()) {
            return ty;
        }
        match ty {
            GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q5_K => GgmlType::Q5_1,
            GgmlType::IQ4_XS => GgmlType::IQ4_NL,
            _ => GgmlType::Q8_0,
        }
    }
}

struct Rng(u64);

/// What [`Rng`]'s state moves on by a uniform draw (splitmix64's).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// The uniform draws a normal one sums.
const UNIFORMS: u64 = 4;

impl Rng {
    /// Approximately normal (sum of 4 uniforms), standard deviation `std`.
    fn normal(&mut self, std: f32) -> f32 {
        let mut s = 0.0;
        for _ in 0..UNIFORMS {
            self.0 = self.0.wrapping_add(GOLDEN);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            s += ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        }
        s * std * 1.732
    }

    /// `n` of [`Rng::normal`]'s draws, in order: runs of them in parallel, each from the
    /// state it starts at (the state moves on by one constant a uniform), so the values
    /// are those drawn one after the other.
    fn normals(&mut self, n: usize, std: f32) -> Vec<f32> {
        use rayon::prelude::*;
        const RUN: usize = 1 << 18;
        let start = self.0;
        let out = (0..n.div_ceil(RUN))
            .into_par_iter()
            .flat_map_iter(|r| {
                let skip = UNIFORMS * (r * RUN) as u64;
                let mut rng = Rng(start.wrapping_add(GOLDEN.wrapping_mul(skip)));
                let len = RUN.min(n - r * RUN);
                (0..len).map(move |_| rng.normal(std))
            })
            .collect();
        self.0 = start.wrapping_add(GOLDEN.wrapping_mul(UNIFORMS * n as u64));
        out
    }
}

fn encode(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    // Large matrices in runs of whole blocks in parallel (the same bytes: every layout
    // encodes a block of 32 or 256 on its own).
    const RUN: usize = 1 << 20;
    if x.len() > RUN && x.len().is_multiple_of(256) {
        use rayon::prelude::*;
        let runs: Vec<Vec<u8>> = x.par_chunks(RUN).map(|c| encode_run(ty, c)).collect();
        return runs.concat();
    }
    encode_run(ty, x)
}

fn encode_run(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len());
    match ty {
        GgmlType::Q4_1 => quant::quantize_row_q4_1(x, &mut out),
        GgmlType::Q4_0 => quant::quantize_row_q4_0(x, &mut out),
        GgmlType::Q8_0 => quant::quantize_row_q8_0(x, &mut out),
        GgmlType::F16 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        GgmlType::F32 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        // Q5_x, the K-quants and IQ4: `kquant`'s layouts.
        _ => crate::kquant::quantize_row(ty, x, &mut out),
    }
    out
}

/// The vocabulary: 3 special tokens, 256 byte tokens, then merged pairs and triples of
/// printable characters (with their merges), up to `vocab` tokens.
fn vocabulary(vocab: usize) -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3, 3, 3];
    let table = byte_to_char();
    for c in table {
        tokens.push(c.to_string());
        types.push(1);
    }
    let printable: Vec<String> = (b' '..=b'~')
        .map(|b| table[b as usize].to_string())
        .collect();
    let mut merges = Vec::new();
    'fill: for a in &printable {
        for b in &printable {
            if tokens.len() >= vocab {
                break 'fill;
            }
            merges.push(format!("{a} {b}"));
            tokens.push(format!("{a}{b}"));
            types.push(1);
        }
    }
    'fill3: for a in &printable {
        for b in &printable {
            for c in &printable {
                if tokens.len() >= vocab {
                    break 'fill3;
                }
                merges.push(format!("{a}{b} {c}"));
                tokens.push(format!("{a}{b}{c}"));
                types.push(1);
            }
        }
    }
    tokens.truncate(vocab);
    types.truncate(vocab);
    (tokens, types, merges)
}

/// Writes the synthetic model to `path`.
pub fn write_model(path: &Path, spec: &SynthSpec) -> io::Result<()> {
    let s = spec;
    let head_dim = s.head_dim.unwrap_or(s.dim / s.n_heads);
    let rot = s.rope_dims.unwrap_or(head_dim);
    let (q_dim, kv_dim) = (s.n_heads * head_dim, s.n_kv_heads * head_dim);
    let (tokens, types, merges) = vocabulary(s.vocab.max(259));
    let vocab = match &s.vocabulary {
        Some(meta) => meta
            .iter()
            .find(|(k, _)| k == "tokenizer.ggml.tokens")
            .and_then(|(_, v)| v.as_array())
            .map_or(0, <[Value]>::len),
        None => tokens.len(),
    };
    let u32v = |v: usize| Value::U32(v as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        (
            "general.name".into(),
            Value::String(format!("tollgate-synthetic-seed{}", s.seed)),
        ),
        ("llama.block_count".into(), u32v(s.n_layers)),
        ("llama.context_length".into(), u32v(s.context_len)),
        ("llama.embedding_length".into(), u32v(s.dim)),
        ("llama.feed_forward_length".into(), u32v(s.ffn_dim)),
        ("llama.attention.head_count".into(), u32v(s.n_heads)),
        ("llama.attention.head_count_kv".into(), u32v(s.n_kv_heads)),
        ("llama.rope.freq_base".into(), Value::F32(100000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.vocab_size".into(), u32v(vocab)),
        ("llama.rope.dimension_count".into(), u32v(rot)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHATML.into()),
        ),
    ];
    if let Some(own) = &s.vocabulary {
        meta.retain(|(k, _)| !k.starts_with("tokenizer."));
        meta.extend(own.iter().cloned());
    }
    if let Some(hd) = s.head_dim {
        meta.push(("llama.attention.key_length".into(), u32v(hd)));
        meta.push(("llama.attention.value_length".into(), u32v(hd)));
    }
    if let Some(p) = s.pooling_type {
        meta.push(("llama.pooling_type".into(), Value::U32(p)));
    }
    if let SynthRope::Linear(f) = s.rope_scaling {
        meta.push((
            "llama.rope.scaling.type".into(),
            Value::String("linear".into()),
        ));
        meta.push(("llama.rope.scaling.factor".into(), Value::F32(f)));
    }
    if let SynthRope::LongRope {
        original_context,
        attn_factor,
    } = s.rope_scaling
    {
        meta.push((
            "llama.rope.scaling.original_context_length".into(),
            u32v(original_context),
        ));
        if let Some(a) = attn_factor {
            meta.push(("llama.rope.scaling.attn_factor".into(), Value::F32(a)));
        }
    }
    if let SynthRope::Yarn {
        factor,
        original_context,
    } = s.rope_scaling
    {
        meta.push((
            "llama.rope.scaling.type".into(),
            Value::String("yarn".into()),
        ));
        meta.push(("llama.rope.scaling.factor".into(), Value::F32(factor)));
        meta.push((
            "llama.rope.scaling.original_context_length".into(),
            u32v(original_context),
        ));
    }
    if let Some(w) = s.window {
        meta.push(("llama.attention.sliding_window".into(), u32v(w)));
    }
    if let Some((attn, logits)) = s.softcaps {
        meta.push(("llama.attn_logit_softcapping".into(), Value::F32(attn)));
        meta.push(("llama.final_logit_softcapping".into(), Value::F32(logits)));
    }
    if s.arch.experts() {
        meta.push(("llama.expert_count".into(), u32v(s.experts.0)));
        meta.push(("llama.expert_used_count".into(), u32v(s.experts.1)));
        meta.push((
            "llama.expert_feed_forward_length".into(),
            u32v(s.ffn_dim / 2),
        ));
        if s.arch == SynthArch::Qwen2Moe {
            meta.push((
                "llama.expert_shared_feed_forward_length".into(),
                u32v(s.ffn_dim / 2),
            ));
        }
    }
    let mut rng = Rng(s.seed);
    let mut mat = |name: String, cols: usize, rows: usize, std: f32| {
        let x = rng.normals(rows * cols, std);
        let role = name
            .trim_end_matches(".weight")
            .rsplit('.')
            .next()
            .unwrap_or("");
        let ty = s.type_of(role, cols);
        Tensor {
            name,
            dims: vec![cols, rows],
            ty,
            data: encode(ty, &x),
        }
    };
    let mut tensors = vec![mat("token_embd.weight".into(), s.dim, vocab, 1.0)];
    if let SynthRope::Llama3 { original_context } = s.rope_scaling {
        let f = llama3_rope_factors(rot, 100000.0, original_context);
        tensors.push(Tensor {
            name: "rope_freqs.weight".into(),
            dims: vec![f.len()],
            ty: GgmlType::F32,
            data: encode(GgmlType::F32, &f),
        });
    }
    if let SynthRope::LongRope { .. } = s.rope_scaling {
        let half = rot / 2;
        let ramp = |to: f32| -> Vec<f32> {
            (0..half)
                .map(|i| 1.0 + (to - 1.0) * i as f32 / (half - 1).max(1) as f32)
                .collect()
        };
        for (name, to) in [("rope_factors_long", 8.0), ("rope_factors_short", 1.5)] {
            tensors.push(Tensor {
                name: format!("{name}.weight"),
                dims: vec![half],
                ty: GgmlType::F32,
                data: encode(GgmlType::F32, &ramp(to)),
            });
        }
    }
    let norm = |name: String, n: usize, r: &mut Rng| Tensor {
        name,
        dims: vec![n],
        ty: GgmlType::F32,
        data: encode(
            GgmlType::F32,
            &(0..n).map(|_| 1.0 + r.normal(0.1)).collect::<Vec<_>>(),
        ),
    };
    let std_in = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
    for i in 0..s.n_layers {
        let n = |x: &str| format!("blk.{i}.{x}.weight");
        let mut r2 = Rng(s.seed ^ ((i as u64 + 1) * 0x1234_5678));
        tensors.push(norm(n("attn_norm"), s.dim, &mut r2));
        let phi3 = s.arch == SynthArch::Phi3;
        if phi3 {
            let rows = q_dim + 2 * kv_dim;
            tensors.push(mat(n("attn_qkv"), s.dim, rows, std_in(s.dim)));
        } else {
            tensors.push(mat(n("attn_q"), s.dim, q_dim, std_in(s.dim)));
            tensors.push(mat(n("attn_k"), s.dim, kv_dim, std_in(s.dim)));
            tensors.push(mat(n("attn_v"), s.dim, kv_dim, std_in(s.dim)));
        }
        if matches!(
            s.arch,
            SynthArch::Qwen3 | SynthArch::Qwen3Moe | SynthArch::Gemma3
        ) {
            tensors.push(norm(n("attn_q_norm"), head_dim, &mut r2));
            tensors.push(norm(n("attn_k_norm"), head_dim, &mut r2));
        }
        if matches!(s.arch, SynthArch::Qwen2 | SynthArch::Qwen2Moe) {
            for (name, len) in [("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)] {
                let b: Vec<f32> = (0..len).map(|_| r2.normal(0.5)).collect();
                tensors.push(Tensor {
                    name: format!("blk.{i}.{name}.bias"),
                    dims: vec![len],
                    ty: GgmlType::F32,
                    data: encode(GgmlType::F32, &b),
                });
            }
        }
        tensors.push(mat(n("attn_output"), q_dim, s.dim, 2.0 * std_in(q_dim)));
        tensors.push(norm(n("ffn_norm"), s.dim, &mut r2));
        if matches!(s.arch, SynthArch::Gemma2 | SynthArch::Gemma3) {
            tensors.push(norm(n("post_attention_norm"), s.dim, &mut r2));
            tensors.push(norm(n("post_ffw_norm"), s.dim, &mut r2));
        }
        if s.arch.experts() {
            let (e, f) = (s.experts.0, s.ffn_dim / 2);
            // The router in f32, as llama.cpp's quantizer leaves it.
            let router: Vec<f32> = (0..e * s.dim).map(|_| r2.normal(std_in(s.dim))).collect();
            tensors.push(Tensor {
                name: n("ffn_gate_inp"),
                dims: vec![s.dim, e],
                ty: GgmlType::F32,
                data: encode(GgmlType::F32, &router),
            });
            for (name, cols, rows, std) in [
                ("ffn_gate_exps", s.dim, f, std_in(s.dim)),
                ("ffn_up_exps", s.dim, f, std_in(s.dim)),
                ("ffn_down_exps", f, s.dim, 2.0 * std_in(f)),
            ] {
                let each: Vec<Tensor> = (0..e).map(|_| mat(n(name), cols, rows, std)).collect();
                if s.experts_apart {
                    let role = name.trim_end_matches("_exps");
                    for (x, mut t) in each.into_iter().enumerate() {
                        t.name = format!("blk.{i}.{role}.{x}.weight");
                        tensors.push(t);
                    }
                } else {
                    tensors.push(Tensor {
                        name: n(name),
                        dims: vec![cols, rows, e],
                        ty: each[0].ty,
                        data: each.into_iter().flat_map(|t| t.data).collect(),
                    });
                }
            }
            if s.arch == SynthArch::Qwen2Moe {
                let gate: Vec<f32> = (0..s.dim).map(|_| r2.normal(std_in(s.dim))).collect();
                tensors.push(Tensor {
                    name: n("ffn_gate_inp_shexp"),
                    dims: vec![s.dim],
                    ty: GgmlType::F32,
                    data: encode(GgmlType::F32, &gate),
                });
                tensors.push(mat(n("ffn_gate_shexp"), s.dim, f, std_in(s.dim)));
                tensors.push(mat(n("ffn_up_shexp"), s.dim, f, std_in(s.dim)));
                tensors.push(mat(n("ffn_down_shexp"), f, s.dim, 2.0 * std_in(f)));
            }
        } else if phi3 {
            tensors.push(mat(n("ffn_up"), s.dim, 2 * s.ffn_dim, std_in(s.dim)));
        } else {
            tensors.push(mat(n("ffn_gate"), s.dim, s.ffn_dim, std_in(s.dim)));
            tensors.push(mat(n("ffn_up"), s.dim, s.ffn_dim, std_in(s.dim)));
        }
        if !s.arch.experts() {
            tensors.push(mat(
                n("ffn_down"),
                s.ffn_dim,
                s.dim,
                2.0 * std_in(s.ffn_dim),
            ));
        }
    }
    // A small final norm keeps logits in a realistic range (a few units apart), so that
    // sampling has a real distribution to draw from.
    let mut r3 = Rng(s.seed ^ 0xABCD);
    let mut out_norm = norm("output_norm.weight".into(), s.dim, &mut r3);
    let scaled: Vec<f32> = (0..s.dim).map(|_| 0.1 * (1.0 + r3.normal(0.1))).collect();
    out_norm.data = encode(GgmlType::F32, &scaled);
    tensors.push(out_norm);
    if s.types.iter().any(|(r, _)| *r == "output") {
        tensors.push(mat("output.weight".into(), s.dim, vocab, 1.0));
    }
    let arch = s.arch.name();
    if arch != "llama" {
        for (k, v) in meta.iter_mut() {
            if let Some(rest) = k.strip_prefix("llama.") {
                *k = format!("{arch}.{rest}");
            } else if k == "general.architecture" {
                *v = Value::String(arch.into());
            }
        }
    }
    let tmp = path.with_extension("gguf.partial");
    {
        let mut f = BufWriter::new(std::fs::File::create(&tmp)?);
        write::gguf(&mut f, &meta, &tensors)?;
        std::io::Write::flush(&mut f)?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_and_blocks_made_in_parallel_are_those_made_in_order() {
        // Three runs and a part: the values drawn one after the other, and the state
        // where those leave it.
        let n = 3 * (1 << 18) + 5;
        let (mut a, mut b) = (Rng(9), Rng(9));
        let seq: Vec<f32> = (0..n).map(|_| a.normal(0.5)).collect();
        let par = b.normals(n, 0.5);
        assert!(seq
            .iter()
            .zip(&par)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
        assert_eq!(seq.len(), par.len());
        assert_eq!(a.0, b.0);
        // A matrix past one run of blocks, as one run and in parallel runs.
        let x = Rng(3).normals(2 * (1 << 20) + 4096, 1.0);
        for ty in [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q8_0] {
            assert_eq!(encode(ty, &x), encode_run(ty, &x), "{ty:?}");
        }
    }
}
