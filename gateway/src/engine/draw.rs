//! Drawing a step's tokens: for every sequence that gets one, its token (and its
//! log-probabilities when asked), from the backend's answer.
//!
//! A row's draw depends only on its own sequence (its sampler's random state, penalties,
//! JSON state) and its own logits, so the rows are drawn in parallel: the CPU sampler's
//! pass over a 49,152-logit row, a JSON or schema mask (tens of microseconds a row), and
//! on the GPU path the host draw of rows with penalties or a mask would otherwise add up
//! on the engine thread, one row after another, between two steps.

use super::{device_params, Next, Seq};
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
    if running.iter().any(|s| s.json.is_some()) {
        json_vocab.get_or_insert_with(|| JsonVocab::of(tok));
    }
    let jv = json_vocab.as_ref();
    let parallel = rows.iter().flatten().count() >= PARALLEL_ROWS;
    match next {
        Next::Tokens(t, want, logits) => {
            let one = |(s, row): (&Seq, &Option<usize>)| -> Drawn {
                let row = (*row)?;
                let raw = want
                    .iter()
                    .position(|&r| r == row)
                    .map(|at| &logits[at * vocab..(at + 1) * vocab]);
                // With penalties or JSON mode the device's draw is replaced by the same
                // rule's on the adjusted row (the `sample` kernel's twin, same seed and
                // step).
                let id = match raw {
                    Some(raw) if s.constrained() => {
                        let mut l = raw.to_vec();
                        s.adjust(&mut l, tok, jv);
                        let id = kernels::cuda::twins::sample(&l, device_params(s));
                        if l[id as usize].is_finite() {
                            id
                        } else {
                            kernels::sampler::argmax(&l)
                        }
                    }
                    _ => *t.get(row)?,
                };
                let lp = s
                    .logprobs
                    .zip(raw)
                    .map(|(k, raw)| token_logprobs(raw, id, k as usize));
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
                let id = s.sampler.sample(l);
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
