//! The worker seam: one trait for everything that generates tokens.
//!
//! A worker takes a [`WorkerRequest`] and answers with a stream of [`WorkerEvent`]s that
//! ends with exactly one [`WorkerEvent::Done`] (or an error). Dropping the stream cancels
//! the request: the worker frees its slot and stops generating (for an upstream, the
//! connection is closed). Workers report their own load; the router keeps its own
//! outstanding-work counters on top (see `route`).
//!
//! Kinds: [`sim::SimWorker`] (simulated GPU), [`openai::OpenAiWorker`] (any
//! OpenAI-compatible upstream). The in-process engine implements the same trait.

pub mod openai;
pub mod sim;
mod sse_parse;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What the client asked to have completed.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// `/v1/chat/completions`: the messages, already validated, and the request's own
    /// variables for the model's chat template, if any.
    Chat(Vec<ChatMessage>, TemplateArgs),
    /// `/v1/completions`: a plain prompt.
    Text(String),
    /// `/v1/completions`: a prompt of token ids (the model's vocabulary; checked by the
    /// worker that runs it).
    Tokens(Vec<u32>),
}

/// A chat request's `chat_template_kwargs` (as vLLM and SGLang take them): further
/// variables for the model's chat template, such as Qwen3's `enable_thinking`; checked by
/// the API layer (an object naming none of the variables tollgate sets itself). `None`
/// where the request sends none.
pub type TemplateArgs = Option<Arc<serde_json::Map<String, serde_json::Value>>>;

/// Variables the chat template's renderer sets itself (`kernels::chat`), or that come from
/// a request's own fields (`tools`): neither a request's `chat_template_kwargs` nor a
/// model's defaults may name them.
pub const TEMPLATE_OWN: &[&str] = &[
    "messages",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "tools",
];

/// `defaults` under `args` (a model's `chat_template_kwargs` under a request's, which
/// win name by name); `args` as they are where there are no defaults.
pub fn with_template_defaults(
    args: TemplateArgs,
    defaults: Option<&Arc<serde_json::Map<String, serde_json::Value>>>,
) -> TemplateArgs {
    let Some(defaults) = defaults.filter(|d| !d.is_empty()) else {
        return args;
    };
    let Some(args) = args else {
        return Some(defaults.clone());
    };
    let mut merged = (**defaults).clone();
    merged.extend(args.iter().map(|(k, v)| (k.clone(), v.clone())));
    Some(Arc::new(merged))
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The final assistant message, left open: the answer continues its text (vLLM's
    /// `continue_final_message`). Not sent as a message field: upstreams are asked with
    /// the request's own fields.
    #[serde(skip)]
    pub open: bool,
}

/// Estimated prompt tokens, for workers that do not tokenize (the simulator) and until an
/// upstream reports its usage: one per 4 bytes, at least one.
pub fn estimate_prompt_tokens(prompt: &Prompt) -> u32 {
    let bytes: usize = match prompt {
        Prompt::Text(t) => t.len(),
        Prompt::Tokens(ids) => return (ids.len().max(1)).min(u32::MAX as usize) as u32,
        Prompt::Chat(msgs, _) => msgs
            .iter()
            .map(|m| m.content.len() + m.role.len() + 4)
            .sum(),
    };
    (bytes.div_ceil(4).max(1)).min(u32::MAX as usize) as u32
}

/// Sampling and stopping parameters, validated by the API layer.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = no cut).
    pub top_k: u32,
    /// vLLM's `min_p` (0 = no cut): keep only the tokens at least this times as likely as
    /// the most likely one.
    pub min_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Return each generated token's log-probability and this many most likely
    /// alternatives' (0 to 20); `None`: no log-probabilities.
    pub logprobs: Option<u8>,
    /// Completions' `echo` with `logprobs`: the prompt's tokens' log-probabilities too
    /// (with `logprobs` alternatives each), sent as one [`WorkerEvent::Prompt`] before the
    /// first generated text.
    pub prompt_logprobs: bool,
    /// vLLM's `prompt_logprobs` (0 to 20): the prompt's tokens' log-probabilities, each
    /// with its id and rank and this many most likely alternatives', sent as one
    /// [`WorkerEvent::Prompt`] (with `prompt_logprobs` above too, each item has as many
    /// alternatives as the larger asks).
    pub prompt_top: Option<u8>,
    /// OpenAI's `presence_penalty` and `frequency_penalty` (−2 to 2).
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// `logit_bias`: added to these token ids' logits (−100 to 100).
    pub logit_bias: Vec<(u32, f32)>,
    /// vLLM's `repetition_penalty` (1 = none, > 0): the logits of the tokens in the prompt
    /// or generated are divided by it where positive, else multiplied.
    pub repetition_penalty: f32,
    /// `response_format` `json_object` or `json_schema`: the output is one JSON object, or
    /// one document of a schema; vLLM's `guided_regex` and `guided_choice` (or
    /// `structured_outputs`): a text a regular expression matches, or one of a list.
    pub format: Option<OutputFormat>,
    /// Chat `prediction` (OpenAI's Predicted Outputs): text much of the answer is expected
    /// to repeat (a file edited in place). Engines draft from it (speculative decoding):
    /// the answer is the same with it or without, sooner where it agrees.
    pub prediction: Option<Arc<str>>,
    /// vLLM's `ignore_eos`: the model's end-of-sequence tokens do not end the answer (they
    /// are generated as tokens without text), so it runs to `max_tokens` or a stop.
    pub ignore_eos: bool,
    /// vLLM's `min_tokens`: none of the tokens that would end the answer is drawn before
    /// this many are generated.
    pub min_tokens: u32,
    /// vLLM's `stop_token_ids`: tokens that end the answer when drawn (their text sent).
    pub stop_token_ids: Vec<u32>,
    /// vLLM's `allowed_token_ids`: the only tokens drawn (empty: any). The model's end of
    /// sequence too: an answer without it among them runs to `max_tokens` or a stop.
    pub allowed_token_ids: Vec<u32>,
    /// vLLM's `bad_words`: texts whose token sequences the answer never has (each as
    /// written and, as vLLM tokenizes it, after a space).
    pub bad_words: Vec<String>,
    /// vLLM's `include_stop_str_in_output`: the stop string that ends the answer is the
    /// end of its text (by default it is cut off).
    pub include_stop_str_in_output: bool,
    /// vLLM's `skip_special_tokens` (its default, true): special tokens drawn in the answer
    /// (control tokens, other than those that end it) have no text; false: their text is
    /// written.
    pub skip_special_tokens: bool,
    /// vLLM's `truncate_prompt_tokens`: only the prompt's last this many tokens are read
    /// ([`KEEP_CONTEXT`]: as many as the model's context holds).
    pub truncate_prompt_tokens: Option<u32>,
}

/// [`SamplingParams::truncate_prompt_tokens`]'s "as many as the context holds" (vLLM's −1).
pub const KEEP_CONTEXT: u32 = u32::MAX;

/// A [`SamplingParams::truncate_prompt_tokens`] as vLLM writes it (−1 for
/// [`KEEP_CONTEXT`]).
pub fn vllm_truncate(keep: u32) -> i64 {
    match keep {
        KEEP_CONTEXT => -1,
        k => i64::from(k),
    }
}

/// `ids` cut to their last `keep` (`KEEP_CONTEXT`: `context`, where known).
pub fn keep_last(ids: &mut Vec<u32>, keep: u32, context: Option<usize>) {
    let keep = match keep {
        KEEP_CONTEXT => match context {
            Some(c) => c,
            None => return,
        },
        k => k as usize,
    };
    if ids.len() > keep {
        ids.drain(..ids.len() - keep);
    }
}

/// What shape a request's output must have: JSON (an object, or a schema's document) or
/// a text of a regular expression (or of a list of choices).
#[derive(Debug, Clone)]
pub enum OutputFormat {
    /// `{"type": "json_object"}`: one JSON object.
    Object,
    /// `{"type": "json_schema", "json_schema": spec}`: a document of `spec.schema`,
    /// compiled when the request was validated; `spec` is passed on to upstreams as it
    /// came.
    Schema {
        spec: Arc<serde_json::Value>,
        compiled: Arc<kernels::json_schema::Schema>,
    },
    /// vLLM's `guided_regex`: a text `regex` matches whole, its DFA compiled when the
    /// request was validated.
    Regex {
        regex: Arc<str>,
        dfa: Arc<kernels::json_schema::Dfa>,
    },
    /// vLLM's `guided_choice`: exactly one of `choices`.
    Choice {
        choices: Arc<[String]>,
        dfa: Arc<kernels::json_schema::Dfa>,
    },
    /// vLLM's `guided_grammar`: a text of the context-free grammar `grammar` (EBNF),
    /// compiled when the request was validated.
    Grammar {
        grammar: Arc<str>,
        program: Arc<kernels::ebnf::Program>,
    },
}

impl OutputFormat {
    /// Structured output for a `json_schema` object (`name`, `schema`, …), its schema
    /// compiled (no `schema`: any JSON value, the empty schema).
    pub fn schema(spec: serde_json::Value) -> Result<Self, kernels::json_schema::SchemaError> {
        let schema = spec
            .get("schema")
            .cloned()
            .unwrap_or(serde_json::Value::Bool(true));
        let compiled = kernels::json_schema::Schema::compile(&schema)?;
        Ok(Self::Schema {
            spec: Arc::new(spec),
            compiled: Arc::new(compiled),
        })
    }

    /// A text `regex` matches whole; `Err`: why it cannot be followed (not an expression,
    /// or one whose DFA is past the size limit).
    pub fn regex(regex: &str) -> Result<Self, String> {
        Ok(Self::Regex {
            dfa: kernels::regex_mode::compile(regex)?,
            regex: regex.into(),
        })
    }

    /// One of `choices`, as written.
    pub fn choice(choices: Vec<String>) -> Result<Self, String> {
        Ok(Self::Choice {
            dfa: kernels::regex_mode::compile(&kernels::regex_mode::choice_regex(&choices))?,
            choices: choices.into(),
        })
    }

    /// A text of the EBNF grammar `grammar` (its rule `root`); `Err`: why it cannot be
    /// followed.
    pub fn ebnf(grammar: &str) -> Result<Self, String> {
        Ok(Self::Grammar {
            program: kernels::ebnf::compile(grammar)?,
            grammar: grammar.into(),
        })
    }

    /// The grammar an engine follows for it, where the output starts.
    pub fn grammar(&self) -> kernels::grammar::Grammar {
        use kernels::grammar::Grammar;
        use kernels::json_mode::JsonState;
        match self {
            Self::Object => Grammar::Json(JsonState::new()),
            Self::Schema { compiled, .. } => {
                Grammar::Json(JsonState::with_schema(compiled.clone()))
            }
            Self::Regex { dfa, .. } | Self::Choice { dfa, .. } => {
                Grammar::Regex(kernels::regex_mode::RegexState::new(dfa.clone()))
            }
            Self::Grammar { program, .. } => {
                Grammar::Ebnf(kernels::ebnf::EbnfState::new(program.clone()))
            }
        }
    }

    /// Whether it is a JSON document's (`response_format`).
    pub fn is_json(&self) -> bool {
        matches!(self, Self::Object | Self::Schema { .. })
    }

    /// The `response_format` object that asks an OpenAI-compatible server for it (a JSON
    /// format's).
    pub fn response_format(&self) -> Option<serde_json::Value> {
        match self {
            Self::Object => Some(serde_json::json!({"type": "json_object"})),
            Self::Schema { spec, .. } => {
                Some(serde_json::json!({"type": "json_schema", "json_schema": spec.as_ref()}))
            }
            Self::Regex { .. } | Self::Choice { .. } | Self::Grammar { .. } => None,
        }
    }

    /// vLLM's `structured_outputs` object that asks it for a text format.
    pub fn structured_outputs(&self) -> Option<serde_json::Value> {
        match self {
            Self::Regex { regex, .. } => Some(serde_json::json!({"regex": regex.as_ref()})),
            Self::Choice { choices, .. } => Some(serde_json::json!({"choice": choices.as_ref()})),
            Self::Grammar { grammar, .. } => Some(serde_json::json!({"grammar": grammar.as_ref()})),
            Self::Object | Self::Schema { .. } => None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of up to `max_tokens` tokens, with no other option set.
    pub fn greedy(max_tokens: u32) -> Self {
        Self {
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            stop: Vec::new(),
            logprobs: None,
            prompt_logprobs: false,
            prompt_top: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            repetition_penalty: 1.0,
            format: None,
            prediction: None,
            ignore_eos: false,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            allowed_token_ids: Vec::new(),
            bad_words: Vec::new(),
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            truncate_prompt_tokens: None,
        }
    }
}

/// The fair-share weight of spot-tier and best-effort requests: below any purchased rate,
/// so an engine admits them last and preempts them first.
pub const LOWEST_WEIGHT: f64 = 1e-3;

/// One request as a worker sees it.
#[derive(Debug, Clone)]
pub struct WorkerRequest {
    pub request_id: Arc<str>,
    /// The tenant the request is for (a trusted gateway's tenant, when it names one).
    pub tenant: Arc<str>,
    /// The tenant's scheduling weight (its purchased rate), when known; [`LOWEST_WEIGHT`]
    /// for spot-tier and best-effort requests.
    pub weight: Option<f64>,
    /// What one output token weighs against an input token (the model's
    /// `output_weight`): engines count a tenant's service in these weighted tokens.
    pub output_weight: f64,
    pub model: Arc<str>,
    pub prompt: Prompt,
    /// The prompt's token ids, when the gateway already tokenized it with the pool's
    /// tokenizer (to count it exactly at admission): an engine uses them as they are.
    pub prompt_ids: Option<Arc<[u32]>>,
    pub params: SamplingParams,
    /// The client streams: upstream workers should stream too.
    pub stream: bool,
    /// `/v1/embeddings`: the prompt's embedding is the answer ([`WorkerEvent::Embedding`]
    /// then `Done`, no tokens generated; `params` unused).
    pub embed: bool,
    /// An embeddings request's further inputs, embedded in the same call, for workers
    /// that take several ([`Worker::embed_batch`]): one [`WorkerEvent::Embedding`] each
    /// after the prompt's, in order, then one `Done` whose usage counts them all. Empty
    /// otherwise.
    pub more_inputs: Vec<Prompt>,
    /// An embeddings request's `dimensions`, for workers that make vectors of a size asked
    /// ([`Worker::sets_dimensions`]).
    pub dimensions: Option<u32>,
}

/// Refuses vLLM's `prompt_logprobs` on a worker that does not score prompts with token ids
/// and ranks (`what`: which it is).
pub fn no_prompt_logprobs(req: &WorkerRequest, what: &str) -> Result<(), WorkerError> {
    match req.params.prompt_top {
        Some(_) => Err(WorkerError::Rejected {
            status: 400,
            message: format!(
                "this pool's workers are {what}: `prompt_logprobs` (token ids and ranks) is served by engine pools"
            ),
            code: None,
            param: Some("prompt_logprobs".into()),
        }),
        None => Ok(()),
    }
}

/// Refuses an embeddings request of several inputs or with `dimensions`, for workers that
/// embed one input at a time into the model's own vectors (the pipeline sends them
/// neither: a pool batches, and takes `dimensions`, only where all its workers do).
pub fn one_plain_input(req: &WorkerRequest) -> Result<(), WorkerError> {
    let refuse = |message: String, param: &str| WorkerError::Rejected {
        status: 400,
        message,
        code: None,
        param: Some(param.into()),
    };
    if !req.more_inputs.is_empty() {
        return Err(refuse(
            format!(
                "this worker embeds one input a request; this one has {}",
                req.more_inputs.len() + 1
            ),
            "input",
        ));
    }
    if req.dimensions.is_some() {
        return Err(refuse(
            "this worker's vectors are the model's own size: no `dimensions`".into(),
            "dimensions",
        ));
    }
    Ok(())
}

/// How many embeddings inputs a worker takes in one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedBatch {
    /// Most inputs a request (1: one at a time).
    pub inputs: usize,
    /// Most prompt tokens in all a request (a single longer input still goes, alone).
    pub tokens: u64,
}

impl EmbedBatch {
    /// One input a request.
    pub const ONE: Self = Self {
        inputs: 1,
        tokens: u64::MAX,
    };

    /// What both allow.
    pub fn min(self, other: Self) -> Self {
        Self {
            inputs: self.inputs.min(other.inputs),
            tokens: self.tokens.min(other.tokens),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    ContentFilter,
    /// The answer is a tool call (rendered by the API layer; workers end with `Stop`).
    ToolCalls,
}

impl FinishReason {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stop" | "eos" => Some(Self::Stop),
            "length" => Some(Self::Length),
            "content_filter" => Some(Self::ContentFilter),
            "tool_calls" => Some(Self::ToolCalls),
            _ => None,
        }
    }
}

/// Token counts of one finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens whose keys and values came from the worker's prefix cache (counted
    /// in `prompt_tokens` too).
    pub cached_tokens: u32,
    /// Completion tokens of a reasoning model's thinking (counted in `completion_tokens`
    /// too).
    pub reasoning_tokens: u32,
    /// With a `prediction`: its tokens drafted and kept in the answer (counted in
    /// `completion_tokens`), and those drafted and not kept (not counted there).
    pub accepted_prediction_tokens: u32,
    pub rejected_prediction_tokens: u32,
}

/// One generated token's log-probability under the model (before temperature and cuts),
/// with the most likely alternatives' when asked: the OpenAI chat `logprobs.content` item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's bytes (its text may be part of a character).
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
    /// Its id, and how many tokens were at least as likely (itself included), where the
    /// worker knows them (an engine's; vLLM's `prompt_logprobs` shows them). Not in
    /// OpenAI's shape.
    #[serde(skip)]
    pub id: Option<u32>,
    #[serde(skip)]
    pub rank: Option<u32>,
}

/// An alternative token at the same position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    /// Its id, where the worker knows it (not in OpenAI's shape).
    #[serde(skip)]
    pub id: Option<u32>,
}

/// What a worker emits.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerEvent {
    /// The next piece of generated text (one or more tokens), with the log-probabilities
    /// of the tokens it completes when the request asked for them.
    Delta {
        text: String,
        tokens: u32,
        logprobs: Vec<TokenLogprob>,
        /// A reasoning model's thinking, not its answer (the API's `reasoning_content`).
        reasoning: bool,
    },
    /// The prompt's tokens with their log-probabilities, asked for by
    /// [`SamplingParams::prompt_logprobs`]: before any `Delta`. The first token's
    /// `logprob` is NaN (nothing comes before it to score it by) and it has no
    /// alternatives. `text`: the prompt as the worker echoed it (an upstream's `echo`);
    /// engines leave it to the gateway, which has the prompt.
    Prompt {
        logprobs: Vec<TokenLogprob>,
        text: Option<String>,
    },
    /// The prompt's embedding (an [`WorkerRequest::embed`] request's answer, before its
    /// `Done`): unit length from the engine and the simulator, as OpenAI's are; an
    /// upstream's as it sent it.
    Embedding(Vec<f32>),
    /// Generation ended; always the last event.
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
}

/// A worker's answer: events until `Done`. Drop it to cancel.
pub type EventStream = BoxStream<'static, Result<WorkerEvent, WorkerError>>;

/// Failures of a worker, classified for the router.
/// OpenAI's error code for a prompt (with its `max_tokens`) longer than the model's
/// context, which clients match on to shorten it.
pub const CONTEXT_LENGTH_EXCEEDED: &str = "context_length_exceeded";

#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkerError {
    /// Could not reach the worker (refused, reset, DNS, timeout before headers).
    #[error("worker unreachable: {0}")]
    Unreachable(String),
    /// The worker answered with an error status it owns (5xx, 429).
    #[error("worker failed with status {status}: {message}")]
    Failed { status: u16, message: String },
    /// The worker rejected the request itself (4xx other than 429): not the worker's fault.
    /// `code`: the OpenAI error code the client is to see, where one applies (e.g.
    /// [`CONTEXT_LENGTH_EXCEEDED`]).
    #[error("{message}")]
    Rejected {
        status: u16,
        message: String,
        code: Option<&'static str>,
        /// The request's field at fault, where one is (`stop_token_ids`).
        param: Option<String>,
    },
    /// The worker's answer did not follow the protocol, or broke off mid-stream.
    #[error("worker protocol error: {0}")]
    Protocol(String),
}

impl WorkerError {
    /// Whether another worker might succeed where this one failed.
    pub fn retryable(&self) -> bool {
        !matches!(self, WorkerError::Rejected { .. })
    }
    /// Whether this failure counts against the worker's health.
    pub fn counts_against_worker(&self) -> bool {
        matches!(
            self,
            WorkerError::Unreachable(_) | WorkerError::Failed { .. } | WorkerError::Protocol(_)
        )
    }
}

/// A worker's own view of its load.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Load {
    /// Requests being generated.
    pub running: u64,
    /// Requests accepted but waiting inside the worker (batch or KV full).
    pub queued: u64,
    /// KV-cache blocks in use and in all, for workers that page a KV cache.
    pub kv_blocks: Option<(u64, u64)>,
}

/// An in-process engine's running totals, for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineCounters {
    /// Forward steps run.
    pub steps: u64,
    /// Sequences preempted (their KV cache dropped, to be recomputed) for want of blocks.
    pub preemptions: u64,
    /// Lowest-weight sequences held out of a step beside interactive ones, summed over
    /// steps.
    pub rows_held: u64,
    /// GPU path: rows adjusted on the device before their draw (penalties, logit bias, a
    /// grammar's mask), and rows whose logits were read back to the host (their
    /// adjustments past a step's room: drawn again there).
    pub rows_adjusted_on_device: u64,
    pub rows_read_back: u64,
    /// GPU path: rows whose log-probabilities were computed on the device.
    pub rows_scored_on_device: u64,
    /// Speculative decoding: draft tokens proposed, and those the draws kept.
    pub draft_tokens: u64,
    pub draft_tokens_accepted: u64,
    /// Steps the device failed, each followed by a rebuild of the backend.
    pub device_faults: u64,
    /// Prompt tokens of finished requests, and those of them served from the prefix cache.
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    /// Now (a gauge): KV blocks in the prefix cache, in use or idle.
    pub kv_blocks_cached: u64,
    /// Now (gauges): the windowed layers' own KV pool's blocks held by sequences (cached
    /// idle ones count as free), and its blocks in all; 0 where it has none.
    pub kv_window_blocks_used: u64,
    pub kv_window_blocks_total: u64,
    /// Seconds the engine thread spent in the backend's steps, and around them.
    pub backend_seconds: f64,
    pub host_seconds: f64,
}

/// Everything that generates tokens.
pub trait Worker: Send + Sync + 'static {
    /// Stable name, used in metrics and logs.
    fn name(&self) -> &str;
    /// Starts a request. Resolves once the worker accepted it (an upstream answered with
    /// its headers); failures before then are retryable on another worker.
    fn submit(
        &self,
        req: Arc<WorkerRequest>,
    ) -> BoxFuture<'static, Result<EventStream, WorkerError>>;
    /// The worker's current load.
    fn load(&self) -> Load;
    /// Active health probe.
    fn probe(&self) -> BoxFuture<'static, Result<(), WorkerError>>;
    /// Most requests the router may have in flight on this worker.
    fn max_concurrency(&self) -> usize;
    /// Most tokens a sequence may hold (prompt and answer), for workers that know it.
    fn max_context(&self) -> Option<usize> {
        None
    }
    /// The prompt's token ids, for workers that hold the model's tokenizer.
    fn tokenize_prompt(&self, _prompt: &Prompt) -> Option<Vec<u32>> {
        None
    }
    /// The text of token ids, for workers that hold the model's tokenizer (`echo` of a
    /// prompt of token ids).
    fn detokenize(&self, _ids: &[u32]) -> Option<String> {
        None
    }
    /// The engine's running totals, for workers that run one in-process.
    fn engine_counters(&self) -> Option<EngineCounters> {
        None
    }
    /// How many embeddings inputs it takes in one request ([`WorkerRequest::more_inputs`]).
    fn embed_batch(&self) -> EmbedBatch {
        EmbedBatch::ONE
    }
    /// Whether it makes embeddings of the size a request asks (`dimensions`).
    fn sets_dimensions(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod keep_last_tests {
    use super::*;

    /// The last `keep` ids, or as many as the context holds, or all where there are no more.
    #[test]
    fn a_prompt_keeps_its_last_tokens() {
        let cut = |keep: u32, context: Option<usize>| {
            let mut ids = vec![1, 2, 3, 4, 5];
            keep_last(&mut ids, keep, context);
            ids
        };
        assert_eq!(cut(2, None), [4, 5]);
        assert_eq!(cut(9, None), [1, 2, 3, 4, 5]);
        assert_eq!(cut(KEEP_CONTEXT, Some(3)), [3, 4, 5]);
        assert_eq!(cut(KEEP_CONTEXT, None), [1, 2, 3, 4, 5]);
    }
}
