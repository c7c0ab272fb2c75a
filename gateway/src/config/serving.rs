//! What serves the models: `[[models]]`, `[[pools]]` and each pool's workers (the
//! in-process engine, simulated workers, an OpenAI-compatible upstream), with their
//! defaults and each worker's own checks (the whole file's are in [`super::Config`]).

use super::{invalid, positive, ConfigError};
use serde::Deserialize;

/// `[[models]]`: a model id tenants may ask for.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub id: String,
    /// Where the weights come from (a known name or a `.gguf` path); used by the in-process
    /// engine. Pools of `sim` and `openai` workers do not read it.
    #[serde(default)]
    pub source: Option<String>,
    /// Weight of one output token against one input token in a tenant's token rate.
    #[serde(default = "default_output_weight")]
    pub output_weight: f64,
    /// Weight of a prompt token the worker served from its prefix cache, in [0, 1]:
    /// settled at the end of the request (admission reserves it as a full input token).
    #[serde(default = "default_cached_input_weight")]
    pub cached_input_weight: f64,
    /// Variables for the model's chat template on every chat request (Qwen3's
    /// `enable_thinking = false`), under those a request sends in its own
    /// `chat_template_kwargs` (which win, name by name).
    #[serde(default)]
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

fn default_cached_input_weight() -> f64 {
    1.0
}

fn default_output_weight() -> f64 {
    3.0
}

/// `[[pools]]`: workers that serve one model, and how requests are routed among them.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    pub model: String,
    pub workers: Vec<WorkerConfig>,
    /// Seconds between active health probes of each worker.
    #[serde(default = "default_health_interval")]
    pub health_interval_secs: f64,
    /// Consecutive failures that open a worker's circuit breaker (passive ejection).
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker keeps a worker out before a trial request.
    #[serde(default = "default_breaker_cooldown")]
    pub breaker_cooldown_secs: f64,
    /// Whether requests whose prompts start alike go to the same worker (to hit its
    /// prefix cache); unset: `prefix` for pools of engine workers, else `none`.
    #[serde(default)]
    pub affinity: Option<Affinity>,
}

/// A pool's routing affinity.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// Power of two choices on outstanding work alone.
    None,
    /// A request's tenant and prompt start pick one of the two candidates.
    Prefix,
}

fn default_health_interval() -> f64 {
    5.0
}
fn default_breaker_failures() -> u32 {
    3
}
fn default_breaker_cooldown() -> f64 {
    5.0
}

/// One entry of a pool's `workers`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum WorkerConfig {
    /// A simulated GPU worker (see `gateway::worker::sim`). Not a model: it produces
    /// deterministic filler text on a latency model, to test and load-test the gateway.
    Sim(SimConfig),
    /// Any OpenAI-compatible upstream: vLLM, SGLang, llama.cpp server, another tollgate.
    Openai(OpenAiConfig),
    /// The in-process engine: the pool's model, continuously batched.
    Engine(EngineConfig),
}

/// Which compute backend an engine uses.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// CUDA where a driver and device are present, else the CPU (with a log line).
    #[default]
    Auto,
    Cpu,
    Cuda,
    /// The CUDA backend on the CPU emulator: the GPU code path (kernel sources, launches,
    /// graphs, sampling on the device) without a GPU. Orders of magnitude slower; for
    /// development and tests.
    Emulator,
}

/// Which attention kernel the CUDA backend launches.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// f32 arithmetic on the CUDA cores, one block per (row, KV head).
    #[default]
    Simt,
    /// Tensor cores (f16 operands, f32 sums) over tiles of a prompt's rows: each key is
    /// read once per tile instead of once per row, for long prompts.
    Tensor,
}

/// How the CPU backend's activations meet quantized weights.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Activations {
    /// 16-bit activation blocks: matches an f32 reference to ~1e-5 (the default); on
    /// CPUs with AVX-512 VNNI also the fastest (weights repacked 16 rows wide).
    #[default]
    I16,
    /// 8-bit activation blocks (llama.cpp's way): ~1e-2 relative error, about 10–15 % faster
    /// than i16 in aggregate with AVX-512 VNNI (8-bit weights still meet 16-bit
    /// activations there).
    Q8,
    /// f32 activations, weights unpacked in registers.
    F32,
}

/// The in-process engine's settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    pub backend: BackendKind,
    /// CPU backend threads (0 = one per CPU).
    pub threads: usize,
    /// CPU backend activation precision.
    pub activations: Activations,
    /// CUDA backend attention kernel: `"simt"` (the default) or `"tensor"`.
    pub attention: AttentionKind,
    /// Most tokens computed in one step (prefill chunks + decodes); unset: the backend's
    /// default ([`EngineConfig::sizes`]).
    pub max_batch_tokens: Option<usize>,
    /// Most sequences running at once; unset: the backend's default.
    pub max_seqs: Option<usize>,
    /// KV-cache capacity in tokens (all sequences together); unset: 65,536 on the CPU, and
    /// on a GPU `gpu_memory_fraction` of the memory left after the weights.
    pub kv_tokens: Option<usize>,
    /// A model with sliding-window layers (Gemma 2 and 3, Phi-3-mini-4k), on either
    /// backend: tokens its windowed layers' own KV pool holds, all sequences together
    /// (they read a window's positions only, so the blocks before each sequence's window
    /// go back); unset: every sequence slot's window and a step's rows, at most
    /// `kv_tokens`; 0: no pool of their own (every position kept on every layer).
    pub window_kv_tokens: Option<usize>,
    /// CUDA with `kv_tokens` unset: the share of the GPU memory free after loading the
    /// weights and step buffers that the KV cache takes (capped at every sequence slot at
    /// full context).
    pub gpu_memory_fraction: f64,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most requests the router sends this engine at once (running + waiting); unset: four
    /// times `max_seqs`, so that contended slots are shared inside the engine by its fair
    /// share (the gateway's pool queue holds the rest).
    pub max_concurrency: Option<usize>,
    /// GPUs to run on (CUDA backend): one engine per device, each its own pool member.
    pub devices: Vec<usize>,
    /// A step running longer than this takes the engine out of rotation until it ends
    /// (a device stuck in a kernel never returns from it).
    pub step_timeout_secs: f64,
    /// Keep the KV blocks of finished prompts and share them with later prompts of the
    /// same tenant that start with the same tokens.
    pub prefix_caching: bool,
    /// Plan and send each step while the one before still runs on the device (CUDA), its
    /// drawn tokens read there; off: every step waits for the one before.
    pub overlap_steps: bool,
    /// Most lowest-weight sequences (batch requests, spot and best-effort work) in a step
    /// that carries interactive ones; the others keep their place and wait for steps
    /// without interactive work. Unset: the backend's default ([`EngineConfig::sizes`]).
    pub lowest_weight_rows: Option<usize>,
    /// Speculative decoding by prompt lookup: most tokens a decoding
    /// sequence proposes after its last one, from where its last tokens occurred earlier
    /// in its context, checked by its own draws in the next step; 0: off.
    pub speculative_tokens: usize,
    /// Most tokens a sequence with a `prediction` (Predicted Outputs) drafts from it a
    /// step, checked as prompt lookup's are; 0: predictions are taken and not drafted from.
    pub prediction_tokens: usize,
}

/// Most draft tokens a sequence may propose a step (`speculative_tokens`,
/// `prediction_tokens`): each is a row of the step's compute, and prompt lookup's runs
/// seldom hold longer.
pub const MAX_SPECULATIVE_TOKENS: usize = 16;

/// An engine's step and cache sizes, once its backend is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineSizes {
    pub max_batch_tokens: usize,
    pub max_seqs: usize,
    /// `None`: sized from the GPU's free memory (`gpu_memory_fraction`).
    pub kv_tokens: Option<usize>,
    pub max_concurrency: usize,
    /// `None`: no cap.
    pub lowest_rows: Option<usize>,
}

impl EngineConfig {
    /// The sizes for a CPU or a GPU backend: what the config sets, else the backend's
    /// defaults (CPU: 128-token steps, 64 sequences, 65,536 KV tokens, 2 lowest-weight
    /// rows beside interactive ones; GPU: 2,048-token steps, 256 sequences, KV from free
    /// memory, no cap on lowest-weight rows; both: 4 × max_seqs in flight).
    pub fn sizes(&self, gpu: bool) -> EngineSizes {
        let (tokens, seqs, kv, lowest) = if gpu {
            // A decode step reads the weights once whatever its rows: bulk rows cost the
            // interactive ones little (to be measured on a GPU, BENCHMARKS.md).
            (2048, 256, None, None)
        } else {
            // Short CPU steps: a new request's prompt waits less for the step in flight,
            // and long prompts stall the others' decoding less; a step's time grows with
            // its rows, so bulk work takes two beside interactive work (BENCHMARKS.md).
            (128, 64, Some(65536), Some(2))
        };
        let max_seqs = self.max_seqs.unwrap_or(seqs);
        EngineSizes {
            max_batch_tokens: self.max_batch_tokens.unwrap_or(tokens),
            max_seqs,
            kv_tokens: self.kv_tokens.or(kv),
            max_concurrency: self.max_concurrency.unwrap_or(4 * max_seqs),
            lowest_rows: self.lowest_weight_rows.or(lowest).filter(|&n| n < max_seqs),
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Auto,
            threads: 0,
            activations: Activations::I16,
            attention: AttentionKind::Simt,
            max_batch_tokens: None,
            max_seqs: None,
            kv_tokens: None,
            window_kv_tokens: None,
            gpu_memory_fraction: 0.85,
            block_size: 16,
            max_concurrency: None,
            devices: vec![0],
            step_timeout_secs: 60.0,
            prefix_caching: true,
            overlap_steps: true,
            lowest_weight_rows: None,
            speculative_tokens: 0,
            prediction_tokens: MAX_SPECULATIVE_TOKENS,
        }
    }
}

/// Parameters of the simulated GPU worker's latency model.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// How many identical simulated workers this entry stands for.
    pub count: usize,
    /// Prefill speed, prompt tokens per second (0 = instantaneous).
    pub prefill_tokens_per_s: f64,
    /// Decode step time at batch size 1, milliseconds.
    pub decode_step_ms: f64,
    /// Extra decode step time per running sequence, milliseconds.
    pub decode_step_ms_per_seq: f64,
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// KV-cache capacity in tokens; a request reserves prompt + max_tokens.
    pub kv_tokens: usize,
    /// Natural answer length range (tokens) before the simulated end-of-sequence.
    pub min_output_tokens: u32,
    pub max_output_tokens: u32,
    /// Most requests the router sends this worker at once (running + queued inside it).
    pub max_concurrency: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            count: 1,
            prefill_tokens_per_s: 20000.0,
            decode_step_ms: 10.0,
            decode_step_ms_per_seq: 0.05,
            max_batch: 64,
            kv_tokens: 262144,
            min_output_tokens: 16,
            max_output_tokens: 128,
            max_concurrency: 256,
        }
    }
}

/// An OpenAI-compatible upstream.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Base URL, e.g. `http://127.0.0.1:8000` (the `/v1/...` paths are appended).
    pub url: String,
    /// Model name to send upstream; defaults to the pool's model id.
    #[serde(default)]
    pub model: Option<String>,
    /// Speak HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    #[serde(default)]
    pub http2: bool,
    /// Most requests in flight to this upstream at once.
    #[serde(default = "default_upstream_concurrency")]
    pub max_concurrency: usize,
    /// Seconds to wait for the upstream's response headers.
    #[serde(default = "default_upstream_timeout")]
    pub timeout_secs: f64,
    /// Path probed by active health checks (expects 2xx).
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// Bearer key sent upstream, if it needs one.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Send the tenant's id and weight upstream (`x-tollgate-tenant`, `x-tollgate-weight`):
    /// for tollgate workers that trust this gateway. Off by default (tenant ids stay here).
    #[serde(default)]
    pub forward_tenant: bool,
    /// Most embeddings inputs sent upstream in one `/v1/embeddings` call (1 to 2,048; 1:
    /// one call an input). A pool batches when all its workers do, by the least of theirs.
    #[serde(default = "default_embed_batch")]
    pub embed_batch: usize,
    /// Most (estimated) input tokens in all in one such call; an input longer than this
    /// goes alone.
    #[serde(default = "default_embed_batch_tokens")]
    pub embed_batch_tokens: u64,
    /// How the upstream is asked to send vectors: `base64` (little-endian `f32`s: a third
    /// of the bytes, far cheaper to read) or `float` (JSON numbers), for an upstream that
    /// does not take base64. Either answer is read.
    #[serde(default)]
    pub embed_encoding: EmbedEncoding,
}

/// An upstream's `encoding_format` for embeddings.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EmbedEncoding {
    #[default]
    Base64,
    Float,
}

impl EmbedEncoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Base64 => "base64",
            Self::Float => "float",
        }
    }
}

fn default_upstream_concurrency() -> usize {
    1024
}
fn default_embed_batch() -> usize {
    256
}
fn default_embed_batch_tokens() -> u64 {
    100_000
}
fn default_upstream_timeout() -> f64 {
    30.0
}
fn default_health_path() -> String {
    "/v1/models".into()
}

impl WorkerConfig {
    pub(super) fn validate(&self, pool: &str) -> Result<(), ConfigError> {
        match self {
            WorkerConfig::Sim(s) => {
                if s.count == 0 || s.max_batch == 0 || s.max_concurrency == 0 {
                    return invalid(format!(
                        "pools.{pool}: sim count, max_batch and max_concurrency must be >= 1"
                    ));
                }
                if s.min_output_tokens > s.max_output_tokens || s.max_output_tokens == 0 {
                    return invalid(format!(
                        "pools.{pool}: sim needs 0 < min_output_tokens <= max_output_tokens"
                    ));
                }
                for (n, v) in [
                    ("prefill_tokens_per_s", s.prefill_tokens_per_s),
                    ("decode_step_ms", s.decode_step_ms),
                    ("decode_step_ms_per_seq", s.decode_step_ms_per_seq),
                ] {
                    if !(v >= 0.0 && v.is_finite()) {
                        return invalid(format!("pools.{pool}: sim {n} must be >= 0"));
                    }
                }
            }
            WorkerConfig::Engine(e) => {
                if e.devices.is_empty() {
                    return invalid(format!(
                        "pools.{pool}: engine devices must list a GPU (default [0])"
                    ));
                }
                if e.max_batch_tokens == Some(0)
                    || e.max_seqs == Some(0)
                    || e.block_size == 0
                    || e.max_concurrency == Some(0)
                    || e.kv_tokens.is_some_and(|k| k < e.block_size)
                {
                    return invalid(format!(
                        "pools.{pool}: engine max_batch_tokens, max_seqs, block_size and max_concurrency must be >= 1, and kv_tokens >= block_size"
                    ));
                }
                if !(e.gpu_memory_fraction > 0.0 && e.gpu_memory_fraction <= 0.98) {
                    return invalid(format!(
                        "pools.{pool}: engine gpu_memory_fraction must be in (0, 0.98], not {}",
                        e.gpu_memory_fraction
                    ));
                }
                if !positive(e.step_timeout_secs) {
                    return invalid(format!(
                        "pools.{pool}: engine step_timeout_secs must be > 0"
                    ));
                }
                for (field, n) in [
                    ("speculative_tokens", e.speculative_tokens),
                    ("prediction_tokens", e.prediction_tokens),
                ] {
                    if n > MAX_SPECULATIVE_TOKENS {
                        return invalid(format!(
                            "pools.{pool}: engine {field} must be at most {MAX_SPECULATIVE_TOKENS}, not {n}"
                        ));
                    }
                }
            }
            WorkerConfig::Openai(o) => {
                let uri: http::Uri = o
                    .url
                    .parse()
                    .map_err(|e| ConfigError::Invalid(format!("pools.{pool}: url: {e}")))?;
                if uri.scheme_str() != Some("http") || uri.authority().is_none() {
                    return invalid(format!(
                        "pools.{pool}: url {:?} must be http://host:port",
                        o.url
                    ));
                }
                if o.max_concurrency == 0 || !positive(o.timeout_secs) {
                    return invalid(format!(
                        "pools.{pool}: openai max_concurrency and timeout_secs must be > 0"
                    ));
                }
                if !(1..=crate::api::validate::MAX_EMBEDDING_INPUTS).contains(&o.embed_batch)
                    || o.embed_batch_tokens == 0
                {
                    return invalid(format!(
                        "pools.{pool}: openai embed_batch must be from 1 to {} and embed_batch_tokens > 0",
                        crate::api::validate::MAX_EMBEDDING_INPUTS
                    ));
                }
            }
        }
        Ok(())
    }
}
