//! What a prompt gives besides generated tokens: its tokens' log-probabilities (`echo`
//! with `logprobs`) and, for an embeddings request, its final hidden state.

use super::outbox::Outbox;
use super::run::Next;
use super::seq::{logprob_item, Seq};
use super::EngineStats;
use crate::worker::{TokenLogprob, WorkerError, WorkerEvent};
use kernels::forward::StepError;
use kernels::logprobs::token_logprobs;
use kernels::tokenizer::Tokenizer;

/// The final hidden states a step's embeddings requests end with, by logits row.
pub(super) type Hidden = std::collections::HashMap<usize, Vec<f32>>;

/// The hidden states `got` (`dim` floats each) of logits rows `rows`, by row; checked to be
/// as many as asked for.
pub(super) fn by_row(rows: &[usize], got: &[f32], dim: usize) -> Result<Hidden, StepError> {
    if got.len() != rows.len() * dim {
        return Err(StepError::Device(format!(
            "the backend returned {} floats for {} hidden rows",
            got.len(),
            rows.len()
        )));
    }
    let each = got.chunks_exact(dim.max(1)).map(<[f32]>::to_vec);
    Ok(rows.iter().copied().zip(each).collect())
}

/// An embeddings request's end: its vector (normalized to unit length) and its usage; or,
/// without one (the backend gave none for its row), an error.
pub(super) fn embedded(
    s: &Seq,
    vector: Option<Vec<f32>>,
    stats: &EngineStats,
    outbox: &mut Outbox,
) {
    let Some(v) = vector else {
        outbox.push(
            &s.tx,
            Err(WorkerError::Protocol(
                "the engine kept no hidden state for an embeddings request".into(),
            )),
        );
        return;
    };
    let usage = s.usage();
    stats.count_prompt(&usage);
    s.send(
        outbox,
        WorkerEvent::Embedding(crate::api::embeddings::normalized(v)),
    );
    s.send(
        outbox,
        WorkerEvent::Done {
            finish_reason: crate::worker::FinishReason::Stop,
            usage,
        },
    );
}

/// Scores `s`'s prompt tokens from the step's logits rows `rows` (the last rows of the
/// tokens it computed this step, up to `end`, if it is being scored): each row's logits give the next
/// row's token its log-probability. Once every prompt token is scored, sends them
/// ([`WorkerEvent::Prompt`], the first unscored).
pub(super) fn score_prompt(
    s: &mut Seq,
    end: usize,
    rows: std::ops::Range<usize>,
    next: &Next,
    vocab: usize,
    tok: &Tokenizer,
    outbox: &mut Outbox,
) {
    let Some(mut want) = s.prompt_next else {
        return;
    };
    let top = s.prompt_top;
    for (j, row) in rows.clone().enumerate() {
        // Row `row` is position p; it scores token p + 1.
        let target = end - rows.len() + j + 1;
        if target != want || target >= s.prompt_len {
            continue;
        }
        let on_device = match next {
            Next::Tokens(t) => t.scored(row).filter(|lp| lp.id == s.tokens[target]),
            Next::Logits(_) => None,
        };
        let lp = match (on_device, next.row(row, vocab)) {
            (Some(lp), _) => lp.clone(),
            (None, Some(raw)) => token_logprobs(raw, s.tokens[target], top),
            (None, None) => continue,
        };
        s.prompt_scored.push(logprob_item(tok, &lp));
        want += 1;
    }
    s.prompt_next = Some(want);
    if want < s.prompt_len {
        return;
    }
    s.prompt_next = None;
    let first = s.tokens[0];
    let bytes = tok.token_bytes(first).to_vec();
    let mut logprobs = vec![TokenLogprob {
        token: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
        logprob: f32::NAN,
        top_logprobs: Vec::new(),
        id: Some(first),
        rank: None,
    }];
    logprobs.append(&mut s.prompt_scored);
    s.send(
        outbox,
        WorkerEvent::Prompt {
            logprobs,
            text: None,
        },
    );
}
