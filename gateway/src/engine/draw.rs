//! Drawing a step's tokens: for every sequence that gets one, its token (and its
//! log-probabilities when asked), from the backend's answer.
//!
//! A row's draw depends only on its own sequence (its seed and step, penalties, JSON
//! state) and its own logits, so the rows are drawn in parallel: the sampling rule's
//! passes over a 49,152-logit row, a JSON or schema mask (tens of microseconds a row), and
//! on the GPU path the host draw of rows with penalties or a mask would otherwise add up
//! on the engine thread, one row after another, between two steps.
//!
//! On the GPU path, a row with penalties or a mask is adjusted on the device before its
//! draw: its adjustment ([`adjustments`]: one delta per penalized token, a bitmask of the
//! tokens a grammar allows) goes in the step's staging copy, and only its token comes
//! back, with its log-probabilities under the model's logits when it wants them (the
//! device adjusts a copy, and computes them from the model's row). Rows whose adjustment
//! does not fit the step's room are read back and drawn again here.

use super::run::Next;
use super::seq::{sample_params, Seq};
use kernels::adjust::Adjust;
use kernels::json_mode::JsonVocab;
use kernels::logprobs::{token_logprobs, TokenLogprobs};
use kernels::tokenizer::Tokenizer;
use rayon::prelude::*;

/// A sequence's drawn token and its log-probabilities.
pub(super) type Drawn = Option<(u32, Option<TokenLogprobs>)>;

/// Below this many rows, drawing them one after another is cheaper than handing them to
/// the thread pool.
const PARALLEL_ROWS: usize = 4;

/// Draws the token of every sequence of `running` that gets one this step (`rows[i]`: its
/// row of the step's answer), by its index in `running`.
pub(super) fn draw(
    running: &mut [Seq],
    rows: &[Option<usize>],
    next: &mut Next,
    vocab: usize,
    tok: &Tokenizer,
    json_vocab: &mut Option<JsonVocab>,
) -> Vec<Drawn> {
    let jv = vocab_for(running.iter(), tok, json_vocab);
    let parallel = rows.iter().flatten().count() >= PARALLEL_ROWS;
    match next {
        Next::Tokens(t) => {
            let t = &*t;
            let one = |(s, row): (&Seq, &Option<usize>)| -> Drawn {
                let row = (*row)?;
                let raw = t.row(row, vocab);
                // A row with penalties or JSON mode not adjusted on the device: its draw is
                // replaced by the same rule's on the row adjusted here (same seed and step).
                let id = match raw {
                    Some(raw) if t.redraw.contains(&row) => {
                        let mut l = raw.to_vec();
                        s.adjust(&mut l, tok, jv);
                        sample(s, &l)
                    }
                    _ => *t.tokens.get(row)?,
                };
                // The device's log-probabilities of the token it drew, or the host's from
                // the row read back.
                let lp = s
                    .logprobs
                    .and_then(|k| match t.scored(row).filter(|lp| lp.id == id) {
                        Some(lp) => Some(lp.clone()),
                        None => raw.map(|raw| token_logprobs(raw, id, k as usize)),
                    });
                Some((id, lp))
            };
            if parallel {
                running.par_iter().zip(rows).map(one).collect()
            } else {
                running.iter().zip(rows).map(one).collect()
            }
        }
        Next::Logits(l) => {
            // Each sequence's own row of logits, to adjust in place.
            let mut by_row: Vec<Option<&mut [f32]>> = l.chunks_mut(vocab).map(Some).collect();
            let mut slots: Vec<Option<&mut [f32]>> = rows
                .iter()
                .map(|r| r.and_then(|r| by_row.get_mut(r).and_then(Option::take)))
                .collect();
            let one = |(s, slot): (&mut Seq, &mut Option<&mut [f32]>)| -> Drawn {
                let l = slot.take()?;
                // The model's distribution, before penalties and the sampler's temperature
                // and cuts.
                let raw = s.logprobs.map(|k| (l.to_vec(), k));
                s.adjust(l, tok, jv);
                let id = sample(s, l);
                Some((id, raw.map(|(raw, k)| token_logprobs(&raw, id, k as usize))))
            };
            if parallel {
                running
                    .par_iter_mut()
                    .zip(slots.par_iter_mut())
                    .map(one)
                    .collect()
            } else {
                running.iter_mut().zip(slots.iter_mut()).map(one).collect()
            }
        }
    }
}

/// `s`'s next token not known yet from its adjusted row `l`, by the rule the device's
/// `sample` kernel follows (so a row drawn here gets the token the device would have
/// drawn).
pub(super) fn sample(s: &Seq, l: &[f32]) -> u32 {
    kernels::sampler::sample(l, sample_params(s, s.emitted()))
}

/// The grammars' vocabulary, built on first use by any of `seqs`.
pub(super) fn vocab_for<'a, 's>(
    mut seqs: impl Iterator<Item = &'s Seq>,
    tok: &Tokenizer,
    json_vocab: &'a mut Option<JsonVocab>,
) -> Option<&'a JsonVocab> {
    if seqs.any(|s| s.grammar.is_some()) {
        json_vocab.get_or_insert_with(|| JsonVocab::of(tok));
    }
    json_vocab.as_ref()
}

/// The device adjustments of a step's logits rows (`rows`: the sequence a row draws for,
/// over rows of `vocab` logits): each row with penalties or JSON mode gets its
/// [`Adjust`], in row order while they fit in `room` words; the rest get none. A sequence
/// whose last token is still on the device (drawn by the step in flight) has it counted
/// there.
pub(super) fn adjustments(
    rows: &[Option<&Seq>],
    room: usize,
    vocab: usize,
    tok: &Tokenizer,
    json_vocab: &mut Option<JsonVocab>,
) -> Vec<Option<Adjust>> {
    let mut left = room;
    let on_device: Vec<bool> = rows
        .iter()
        .map(|s| {
            let Some(s) = s else { return false };
            let words = s.adjustment_words(vocab, s.carried());
            let fits = s.constrained() && words <= left;
            if fits {
                left -= words;
            }
            fits
        })
        .collect();
    if !on_device.contains(&true) {
        return Vec::new();
    }
    let jv = vocab_for(rows.iter().flatten().copied(), tok, json_vocab);
    let one = |(s, &on): (&Option<&Seq>, &bool)| {
        s.filter(|_| on)
            .map(|s| s.adjustment(tok, jv, vocab, s.carried()))
    };
    if on_device.iter().filter(|&&on| on).count() >= PARALLEL_ROWS {
        rows.par_iter().zip(&on_device).map(one).collect()
    } else {
        rows.iter().zip(&on_device).map(one).collect()
    }
}
