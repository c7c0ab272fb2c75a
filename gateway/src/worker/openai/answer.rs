//! A non-streamed upstream answer, read whole: a completion or chat answer (a scored
//! prompt's echo split off its front) and an embeddings answer.

use super::wire::UpstreamAnswer;
use crate::worker::{
    estimate_prompt_tokens, FinishReason, Prompt, TokenLogprob, Usage, WorkerError, WorkerEvent,
    WorkerRequest,
};
use serde::Deserialize;

/// An upstream's `/v1/embeddings` answer: each input's vector (in input order, by their
/// `index`), then the end, whose usage counts them all (the upstream's count, else an
/// estimate).
pub(super) fn parse_embedding(
    body: &[u8],
    req: &WorkerRequest,
) -> Result<Vec<WorkerEvent>, WorkerError> {
    #[derive(Deserialize)]
    struct Answer {
        data: Vec<Item>,
        usage: Option<Counted>,
    }
    #[derive(Deserialize)]
    struct Item {
        index: Option<usize>,
        embedding: Vector,
    }
    #[derive(Deserialize)]
    struct Counted {
        prompt_tokens: u32,
    }
    let v: Answer = serde_json::from_slice(body).map_err(|e| {
        WorkerError::Protocol(format!(
            "upstream embeddings answer is not as expected: {e}"
        ))
    })?;
    let inputs = 1 + req.more_inputs.len();
    let mut data = v.data;
    if data.len() != inputs {
        return Err(WorkerError::Protocol(format!(
            "upstream embeddings answer has {} vectors for {inputs} inputs",
            data.len()
        )));
    }
    // In input order: by `index` where each says its own (a permutation of 0..n).
    if data.iter().all(|d| d.index.is_some()) {
        data.sort_unstable_by_key(|d| d.index);
        if data.iter().enumerate().any(|(i, d)| d.index != Some(i)) {
            return Err(WorkerError::Protocol(
                "upstream embeddings answer's indexes are not one per input".into(),
            ));
        }
    }
    let prompt_tokens = v.usage.map_or_else(
        || {
            std::iter::once(&req.prompt)
                .chain(&req.more_inputs)
                .map(estimate_prompt_tokens)
                .fold(0u32, u32::saturating_add)
        },
        |u| u.prompt_tokens,
    );
    let usage = Usage {
        prompt_tokens,
        ..Usage::default()
    };
    let mut events = Vec::with_capacity(inputs + 1);
    for d in data {
        events.push(WorkerEvent::Embedding(d.embedding.0));
    }
    events.push(WorkerEvent::Done {
        finish_reason: FinishReason::Stop,
        usage,
    });
    Ok(events)
}

/// An upstream's vector: JSON numbers, or (`encoding_format: "base64"`) the base64 of
/// little-endian `f32`s, read as it comes (no copy of the string, no trial of one form
/// before the other).
struct Vector(Vec<f32>);

impl<'de> Deserialize<'de> for Vector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = Vector;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of numbers or a base64 string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Vector, E> {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(E::custom)?;
                if bytes.len() % 4 != 0 {
                    return Err(E::custom(format!(
                        "a base64 vector of {} bytes is no whole number of f32s",
                        bytes.len()
                    )));
                }
                Ok(Vector(
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<Vector, A::Error> {
                let mut v = Vec::with_capacity(a.size_hint().unwrap_or(0));
                while let Some(x) = a.next_element::<f32>()? {
                    v.push(x);
                }
                Ok(Vector(v))
            }
        }
        d.deserialize_any(Either)
    }
}

/// A non-streamed upstream answer as events.
pub(super) fn parse_full(
    body: &[u8],
    req: &WorkerRequest,
) -> Result<Vec<WorkerEvent>, WorkerError> {
    let v: UpstreamAnswer = serde_json::from_slice(body)
        .map_err(|e| WorkerError::Protocol(format!("upstream answer is not JSON: {e}")))?;
    let chat = matches!(req.prompt, Prompt::Chat(..));
    let choice = v
        .choices
        .first()
        .ok_or_else(|| WorkerError::Protocol("upstream answer has no choices".into()))?;
    let reasoning = choice.reasoning().map(str::to_string);
    // A reasoning model's answer cut off while thinking has no content.
    let text = match choice.text(chat) {
        Some(t) => t,
        None if reasoning.is_some() => "",
        None => {
            return Err(WorkerError::Protocol(
                "upstream answer has no choices[0] text".into(),
            ))
        }
    };
    let usage = v.usage.map(Usage::from).unwrap_or(Usage {
        prompt_tokens: estimate_prompt_tokens(&req.prompt),
        ..Usage::default()
    });
    let mut text = text.to_string();
    let finish_reason = choice.finish().unwrap_or(FinishReason::Stop);
    let mut lp = v
        .choices
        .into_iter()
        .next()
        .and_then(|c| c.logprobs)
        .unwrap_or_default();
    let offsets = lp.text_offset.take().unwrap_or_default();
    let mut logprobs = lp.items();
    let mut events = Vec::with_capacity(4);
    if let Some(text) = reasoning {
        events.push(WorkerEvent::Delta {
            text,
            tokens: usage.reasoning_tokens,
            logprobs: Vec::new(),
            reasoning: true,
        });
    }
    if req.params.prompt_logprobs {
        let prompt_tokens = v.usage.map(|u| u.prompt_tokens as usize).ok_or_else(|| {
            WorkerError::Protocol("upstream echoed a prompt without `usage`, so its tokens cannot be told from the completion's".into())
        })?;
        let (prompt, echoed) = split_echo(&mut text, &mut logprobs, &offsets, prompt_tokens)?;
        events.push(WorkerEvent::Prompt {
            logprobs: prompt,
            text: Some(echoed),
        });
    }
    if req.params.max_tokens == 0 {
        // No completion: what the upstream sent back (asked with `echo`) is the prompt,
        // which the gateway echoes itself where it was not scored.
        text.clear();
        logprobs.clear();
    }
    events.push(WorkerEvent::Delta {
        text,
        tokens: usage
            .completion_tokens
            .saturating_sub(usage.reasoning_tokens),
        logprobs,
        reasoning: false,
    });
    events.push(WorkerEvent::Done {
        finish_reason,
        usage,
    });
    Ok(events)
}

/// Splits an echoed answer: takes the prompt's items (the first `prompt_tokens`) and
/// text (up to the first completion token's `text_offset`, in characters; without
/// offsets, the prompt tokens' texts) off the front of `items` and `text`.
pub(super) fn split_echo(
    text: &mut String,
    items: &mut Vec<TokenLogprob>,
    offsets: &[usize],
    prompt_tokens: usize,
) -> Result<(Vec<TokenLogprob>, String), WorkerError> {
    if items.len() < prompt_tokens {
        return Err(WorkerError::Protocol(format!(
            "upstream scored {} tokens of a {prompt_tokens}-token prompt",
            items.len()
        )));
    }
    let rest = items.split_off(prompt_tokens);
    let prompt = std::mem::replace(items, rest);
    let chars = match offsets.get(prompt_tokens) {
        _ if items.is_empty() => usize::MAX,
        Some(&at) => at,
        None => prompt.iter().map(|t| t.token.chars().count()).sum(),
    };
    let at = text
        .char_indices()
        .nth(chars)
        .map_or(text.len(), |(i, _)| i);
    let completion = text.split_off(at);
    Ok((prompt, std::mem::replace(text, completion)))
}
