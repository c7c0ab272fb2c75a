//! The OpenAI wire shapes an upstream is sent and answers in: the request body, and the
//! parts of an answer (whole or one streamed chunk) that tollgate reads.

use crate::worker::{ChatMessage, FinishReason, TokenLogprob, TopLogprob, Usage};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// A completions prompt as the upstream takes it: text, or token ids.
#[derive(Serialize)]
#[serde(untagged)]
pub(super) enum UpstreamPrompt<'a> {
    Text(&'a str),
    Tokens(&'a [u32]),
}

#[derive(Serialize)]
pub(super) struct UpstreamRequest<'a> {
    pub(super) model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) messages: Option<&'a [ChatMessage]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) prompt: Option<UpstreamPrompt<'a>>,
    /// The client's variables for the upstream's chat template (vLLM's and SGLang's
    /// `chat_template_kwargs`), passed on as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) chat_template_kwargs: Option<&'a serde_json::Map<String, Value>>,
    pub(super) max_tokens: u32,
    pub(super) temperature: f32,
    pub(super) top_p: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) stop: Option<&'a [String]>,
    pub(super) stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) echo: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) logprobs: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) top_logprobs: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) presence_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) frequency_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) logit_bias: Option<BTreeMap<String, f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) response_format: Option<Value>,
    /// vLLM's `structured_outputs` (`regex`, `choice`), where the request has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) structured_outputs: Option<Value>,
    /// Chat `prediction` (Predicted Outputs), passed on as the text it came as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) prediction: Option<Value>,
    /// vLLM's `ignore_eos`, `min_tokens` and `stop_token_ids`, where the request sets them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) ignore_eos: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) min_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) stop_token_ids: Option<&'a [u32]>,
    /// vLLM's `min_p` and `repetition_penalty`, where the request sets them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) min_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) repetition_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) allowed_token_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) include_stop_str_in_output: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) bad_words: Option<&'a [String]>,
    /// vLLM's `continue_final_message` (with `add_generation_prompt` false), where the
    /// final message is left open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) continue_final_message: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) add_generation_prompt: Option<bool>,
    /// vLLM's `skip_special_tokens`, where the request turns it off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) skip_special_tokens: Option<bool>,
    /// vLLM's −1 for [`crate::worker::KEEP_CONTEXT`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) truncate_prompt_tokens: Option<i64>,
}

#[derive(Serialize)]
pub(super) struct StreamOptions {
    pub(super) include_usage: bool,
}

/// The parts of an upstream answer (whole or chunk) that tollgate reads.
#[derive(Deserialize)]
pub(super) struct UpstreamAnswer<'a> {
    #[serde(default, borrow)]
    pub(super) choices: Vec<UpstreamChoice<'a>>,
    #[serde(default)]
    pub(super) usage: Option<UpstreamUsage>,
    #[serde(default)]
    pub(super) error: Option<Value>,
}

#[derive(Deserialize)]
pub(super) struct UpstreamChoice<'a> {
    #[serde(default, borrow)]
    pub(super) message: Option<UpstreamText<'a>>,
    #[serde(default, borrow)]
    pub(super) delta: Option<UpstreamText<'a>>,
    #[serde(default, borrow)]
    pub(super) text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub(super) finish_reason: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(super) logprobs: Option<UpstreamLogprobs>,
}

/// A choice's log-probabilities: the chat shape (`content`: one item per token) or the
/// legacy completions shape (parallel lists, alternatives as `{token: logprob}` maps).
#[derive(Deserialize, Default)]
pub(super) struct UpstreamLogprobs {
    #[serde(default)]
    pub(super) content: Option<Vec<UpstreamTokenLogprob>>,
    #[serde(default)]
    pub(super) tokens: Option<Vec<String>>,
    #[serde(default)]
    pub(super) token_logprobs: Option<Vec<Option<f32>>>,
    #[serde(default)]
    pub(super) top_logprobs: Option<Vec<Option<BTreeMap<String, f32>>>>,
    /// Where each token's text starts in the choice's text, in characters.
    #[serde(default)]
    pub(super) text_offset: Option<Vec<usize>>,
}

#[derive(Deserialize)]
pub(super) struct UpstreamTokenLogprob {
    pub(super) token: String,
    pub(super) logprob: f32,
    #[serde(default)]
    pub(super) bytes: Option<Vec<u8>>,
    #[serde(default)]
    pub(super) top_logprobs: Vec<UpstreamTop>,
}

#[derive(Deserialize)]
pub(super) struct UpstreamTop {
    pub(super) token: String,
    pub(super) logprob: f32,
    #[serde(default)]
    pub(super) bytes: Option<Vec<u8>>,
}

impl UpstreamLogprobs {
    /// As the gateway's items (bytes from the token text where the upstream gave none; a
    /// `null` log-probability, an echoed prompt's first, as NaN).
    pub(super) fn items(self) -> Vec<TokenLogprob> {
        if let Some(content) = self.content {
            return content
                .into_iter()
                .map(|t| TokenLogprob {
                    bytes: t.bytes.unwrap_or_else(|| t.token.as_bytes().to_vec()),
                    token: t.token,
                    logprob: t.logprob,
                    id: None,
                    rank: None,
                    top_logprobs: t
                        .top_logprobs
                        .into_iter()
                        .map(|a| TopLogprob {
                            bytes: a.bytes.unwrap_or_else(|| a.token.as_bytes().to_vec()),
                            token: a.token,
                            logprob: a.logprob,
                            id: None,
                        })
                        .collect(),
                })
                .collect();
        }
        let tokens = self.tokens.unwrap_or_default();
        let lps = self.token_logprobs.unwrap_or_default();
        let mut tops = self.top_logprobs.unwrap_or_default().into_iter();
        tokens
            .into_iter()
            .zip(lps)
            .map(|(token, lp)| {
                let mut top: Vec<TopLogprob> = tops
                    .next()
                    .flatten()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(token, logprob)| TopLogprob {
                        bytes: token.as_bytes().to_vec(),
                        token,
                        logprob,
                        id: None,
                    })
                    .collect();
                top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
                TokenLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob: lp.unwrap_or(f32::NAN),
                    top_logprobs: top,
                    id: None,
                    rank: None,
                }
            })
            .collect()
    }
}

#[derive(Deserialize)]
pub(super) struct UpstreamText<'a> {
    #[serde(default, borrow)]
    pub(super) content: Option<Cow<'a, str>>,
    /// A reasoning model's thinking: `reasoning_content` (DeepSeek's API, vLLM's and
    /// SGLang's reasoning parsers, tollgate workers), or `reasoning` (vLLM's newer name).
    #[serde(default, borrow)]
    pub(super) reasoning_content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub(super) reasoning: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Clone, Copy)]
pub(super) struct UpstreamUsage {
    pub(super) prompt_tokens: u32,
    pub(super) completion_tokens: u32,
    #[serde(default)]
    pub(super) prompt_tokens_details: Option<UpstreamPromptDetails>,
    #[serde(default)]
    pub(super) completion_tokens_details: Option<UpstreamCompletionDetails>,
}

/// Reasoning models' upstreams report their thinking's tokens.
#[derive(Deserialize, Clone, Copy)]
pub(super) struct UpstreamCompletionDetails {
    #[serde(default)]
    pub(super) reasoning_tokens: Option<u32>,
    #[serde(default)]
    pub(super) accepted_prediction_tokens: Option<u32>,
    #[serde(default)]
    pub(super) rejected_prediction_tokens: Option<u32>,
}

/// vLLM, SGLang and tollgate workers report prompt tokens served from their prefix cache.
#[derive(Deserialize, Clone, Copy)]
pub(super) struct UpstreamPromptDetails {
    #[serde(default)]
    pub(super) cached_tokens: Option<u32>,
}

impl From<UpstreamUsage> for Usage {
    fn from(u: UpstreamUsage) -> Self {
        let details = |f: fn(&UpstreamCompletionDetails) -> Option<u32>| {
            u.completion_tokens_details
                .as_ref()
                .and_then(f)
                .unwrap_or(0)
        };
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
            reasoning_tokens: details(|d| d.reasoning_tokens),
            accepted_prediction_tokens: details(|d| d.accepted_prediction_tokens),
            rejected_prediction_tokens: details(|d| d.rejected_prediction_tokens),
        }
    }
}

impl<'a> UpstreamChoice<'a> {
    /// The generated text in this choice, whatever the endpoint.
    pub(super) fn text(&self, chat: bool) -> Option<&str> {
        if chat {
            self.message
                .as_ref()
                .or(self.delta.as_ref())
                .and_then(|m| m.content.as_deref())
        } else {
            self.text.as_deref()
        }
    }

    /// A chat choice's thinking, where the upstream sent it apart from the answer (a
    /// completion's choice has no message to carry it).
    pub(super) fn reasoning(&self) -> Option<&str> {
        let m = self.message.as_ref().or(self.delta.as_ref())?;
        m.reasoning_content
            .as_deref()
            .or(m.reasoning.as_deref())
            .filter(|r| !r.is_empty())
    }

    pub(super) fn finish(&self) -> Option<FinishReason> {
        self.finish_reason
            .as_deref()
            .map(|s| FinishReason::parse(s).unwrap_or(FinishReason::Stop))
    }
}
