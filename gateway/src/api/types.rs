//! OpenAI wire types: what tenants send (requests) and what they get back (responses,
//! stream chunks). Parsing only; checking ranges and support lives in `validate`.

use crate::worker::{FinishReason, TokenLogprob, Usage};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Options shared by both endpoints.
#[derive(Debug, Deserialize)]
pub struct CommonParams {
    pub model: String,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Not in OpenAI's API; accepted as vLLM and llama.cpp accept it (0 = off).
    pub top_k: Option<u32>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<OneOrMany>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<Value>,
    pub logprobs: Option<Value>,
    pub user: Option<String>,
    /// Not in OpenAI's API; vLLM's: the model's end-of-sequence tokens do not end the
    /// answer, the most tokens generated before one may, and further tokens that end it.
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<u32>,
    pub stop_token_ids: Option<Vec<u32>>,
    /// Not in OpenAI's API; vLLM's: a cut below a share of the most likely token's
    /// probability, and a penalty on every token already in the prompt or answer.
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Not in OpenAI's API; vLLM's: the only tokens the answer may have, and whether a
    /// stop string that ends it is in its text.
    pub allowed_token_ids: Option<Vec<u32>>,
    pub include_stop_str_in_output: Option<bool>,
    /// Not in OpenAI's API; vLLM's: texts the answer never has (as token sequences).
    pub bad_words: Option<Vec<String>>,
    /// Not in OpenAI's API; vLLM's: whether special tokens in the answer have no text
    /// (true, the default), and how its slow tokenizers space them (taken, no effect).
    pub skip_special_tokens: Option<bool>,
    pub spaces_between_special_tokens: Option<bool>,
    /// Not in OpenAI's API; vLLM's beam search: refused where true.
    pub use_beam_search: Option<bool>,
    /// Not in OpenAI's API; vLLM's: only the prompt's last k tokens are read (−1: as many
    /// as the model's context holds).
    pub truncate_prompt_tokens: Option<i64>,
    /// Not in OpenAI's API; vLLM's: each prompt token's log-probability, id and rank,
    /// with this many most likely alternatives' (0 to 20).
    pub prompt_logprobs: Option<i64>,
}

/// Not in OpenAI's API; vLLM's structured outputs (chat and completions): the older
/// `guided_*` fields and the newer `structured_outputs` object (see `guided`).
#[derive(Debug, Deserialize)]
pub struct GuidedParams {
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub guided_whitespace_pattern: Option<Value>,
    pub guided_decoding_backend: Option<Value>,
    pub structured_outputs: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub max_completion_tokens: Option<u32>,
    pub top_logprobs: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub response_format: Option<Value>,
    pub parallel_tool_calls: Option<Value>,
    /// Not in OpenAI's API; accepted as vLLM and SGLang accept it: further variables for
    /// the model's chat template (Qwen3's `enable_thinking`).
    pub chat_template_kwargs: Option<Value>,
    /// OpenAI's Predicted Outputs: `{"type": "content", "content": text or text parts}`.
    pub prediction: Option<Value>,
    /// Not in OpenAI's API; vLLM's: the answer goes on with the final (assistant) message,
    /// whose turn is left open; and whether the assistant's turn is opened after the
    /// messages (only as `continue_final_message` needs: false with it).
    pub continue_final_message: Option<bool>,
    pub add_generation_prompt: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    pub name: Option<String>,
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Value,
    /// vLLM takes it on completions too: JSON mode or a schema's structured output.
    pub response_format: Option<Value>,
    pub echo: Option<bool>,
    pub best_of: Option<u32>,
    pub suffix: Option<Value>,
}

// ---- responses ----

#[derive(Debug, Serialize)]
pub struct UsageOut {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
    pub completion_tokens_details: CompletionTokensDetails,
}

/// OpenAI's breakdown of the completion tokens: a reasoning model's thinking, and a
/// `prediction`'s tokens kept in the answer and drafted but not kept.
#[derive(Debug, Serialize)]
pub struct CompletionTokensDetails {
    pub reasoning_tokens: u32,
    pub accepted_prediction_tokens: u32,
    pub rejected_prediction_tokens: u32,
}

/// OpenAI's breakdown of the prompt tokens: those served from the prefix cache.
#[derive(Debug, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl From<Usage> for UsageOut {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            },
            completion_tokens_details: CompletionTokensDetails {
                reasoning_tokens: u.reasoning_tokens,
                accepted_prediction_tokens: u.accepted_prediction_tokens,
                rejected_prediction_tokens: u.rejected_prediction_tokens,
            },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChatChoice<'a>>,
    pub usage: UsageOut,
    pub system_fingerprint: Option<&'a str>,
    /// vLLM's `prompt_logprobs` (where asked): see [`super::prompt_logprobs`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<&'a serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice<'a> {
    pub index: u32,
    pub message: AssistantMessage<'a>,
    pub logprobs: Option<ChatLogprobs<'a>>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage<'a> {
    pub role: &'static str,
    /// `null` when the answer is a tool call.
    pub content: Option<&'a str>,
    /// A reasoning model's thinking (DeepSeek's, vLLM's and SGLang's field).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut<'a>>>,
}

/// A tool call, whole (`message.tool_calls[]`), or a stream's delta of one (with
/// `index`; `id`, `type` and the name only in its first).
#[derive(Debug, Serialize)]
pub struct ToolCallOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionOut<'a>,
}

#[derive(Debug, Serialize)]
pub struct FunctionOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    /// The arguments as a JSON string (OpenAI's shape); in a delta, more of it.
    pub arguments: &'a str,
}

#[derive(Debug, Serialize)]
pub struct TextCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<TextChoice<'a>>,
    pub usage: UsageOut,
}

#[derive(Debug, Serialize)]
pub struct TextChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    pub logprobs: Option<TextLogprobs<'a>>,
    pub finish_reason: Option<FinishReason>,
    /// vLLM's `prompt_logprobs` (where asked): see [`super::prompt_logprobs`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<&'a serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct ChatChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageOut>>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub logprobs: Option<ChatLogprobs<'a>>,
    pub finish_reason: Option<FinishReason>,
}

/// A chat choice's log-probabilities: one item per generated token.
#[derive(Debug, Serialize)]
pub struct ChatLogprobs<'a> {
    pub content: &'a [TokenLogprob],
    pub refusal: Option<()>,
}

/// A completion choice's log-probabilities, in the legacy shape: parallel lists, each
/// token's alternatives as a `{token: logprob}` map, and where each token starts in the
/// completion's text (in characters). With `echo`, the prompt's tokens come first, the
/// first with `null`s (nothing before it scores it).
#[derive(Debug, Serialize)]
pub struct TextLogprobs<'a> {
    pub tokens: Vec<&'a str>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<BTreeMap<&'a str, f32>>>,
    pub text_offset: Vec<usize>,
}

impl<'a> TextLogprobs<'a> {
    /// `items`, the first starting `offset` characters into the completion.
    pub fn new(items: &'a [TokenLogprob], mut offset: usize) -> Self {
        let mut out = Self {
            tokens: Vec::with_capacity(items.len()),
            token_logprobs: Vec::with_capacity(items.len()),
            top_logprobs: Vec::with_capacity(items.len()),
            text_offset: Vec::with_capacity(items.len()),
        };
        for t in items {
            // A NaN log-probability: a prompt's first token, which nothing scores.
            let scored = !t.logprob.is_nan();
            out.tokens.push(&t.token);
            out.token_logprobs.push(scored.then_some(t.logprob));
            out.top_logprobs.push(scored.then(|| {
                t.top_logprobs
                    .iter()
                    .map(|a| (a.token.as_str(), a.logprob))
                    .collect()
            }));
            out.text_offset.push(offset);
            offset += t.token.chars().count();
        }
        out
    }
}

#[derive(Debug, Serialize, Default)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut<'a>>>,
}

#[derive(Debug, Serialize)]
pub struct TextChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<TextChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageOut>>,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}
