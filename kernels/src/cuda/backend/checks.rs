//! What the backend checks before a step runs or reads back: the batch against its sizes,
//! the cache and the vocabulary, room in flight, rows asked for against the step's.

use super::CudaBackend;
use crate::backend::{ReadBack, FROM_LAST};
use crate::cuda::exec::Exec;
use crate::forward::{Batch, StepError};
use crate::logprobs::Score;

impl<E: Exec> CudaBackend<E> {
    /// Checks `batch` against the backend's sizes, the cache and the vocabulary; its tokens
    /// may stand for one of the `from_last` tokens the step before sampled.
    pub(super) fn check(&self, batch: &Batch, from_last: usize) -> Result<(), StepError> {
        let bad = |m: String| Err(StepError::BadBatch(m));
        let c = &self.dev.config;
        if batch.n_logits() > self.dev.max_logits {
            return bad(format!(
                "{} logits rows: this GPU backend was sized for {}",
                batch.n_logits(),
                self.dev.max_logits
            ));
        }
        if batch.tokens.len() > self.max_tokens || batch.seqs.len() > self.max_seqs {
            return bad(format!(
                "{} tokens in {} sequences: this GPU backend was sized for {} and {}",
                batch.tokens.len(),
                batch.seqs.len(),
                self.max_tokens,
                self.max_seqs
            ));
        }
        for s in &batch.seqs {
            let last = batch.positions[s.start] as usize + s.len - 1;
            if last >= c.context_len {
                return bad(format!("position {last} is past the model's context"));
            }
            let need = last / self.dev.block_size + 1;
            if s.block_table.len() < need
                || s.block_table[..need]
                    .iter()
                    .any(|&b| b as usize >= self.dev.n_blocks)
            {
                return bad("block table too short or outside the cache".into());
            }
            // The windowed layers' own pool: the blocks the rows' windows read.
            if let (Some(n), Some(w)) = (self.dev.window_blocks, c.window_size()) {
                let pos0 = batch.positions[s.start] as usize;
                let lo = crate::kv::first_window_block(w, pos0, self.dev.block_size);
                if s.window_table.len() < need
                    || s.window_table[lo..need].iter().any(|&b| b as usize >= n)
                {
                    return bad("window block table too short or outside its pool".into());
                }
            }
        }
        let known = |t: u32| match t & FROM_LAST {
            0 => (t as usize) < c.vocab,
            _ => ((t & !FROM_LAST) as usize) < from_last,
        };
        if !batch.tokens.iter().all(|&t| known(t)) {
            return bad(format!(
                "a token id outside the vocabulary, or not one of the {from_last} tokens the \
                 step before sampled"
            ));
        }
        Ok(())
    }

    /// Checks that `rows` are logits rows of the last step, which left them (`gone`
    /// says it did not, and `why`).
    pub(super) fn last_step_rows(
        &self,
        rows: &[usize],
        gone: bool,
        why: &str,
    ) -> Result<(), StepError> {
        if gone {
            return Err(StepError::BadBatch(why.into()));
        }
        match rows.iter().find(|&&r| r >= self.last_rows) {
            Some(r) => Err(StepError::BadBatch(format!(
                "logits row {r} of a step with {} rows",
                self.last_rows
            ))),
            None => Ok(()),
        }
    }

    /// Checks a step about to be submitted: room in flight (two steps, the last sampled),
    /// and its batch, whose tokens may stand for the last submitted step's.
    pub(super) fn check_submit(&mut self, batch: &Batch) -> Result<(), StepError> {
        if self.flight.len() >= 2 {
            return Err(StepError::BadBatch(
                "two steps are in flight already".into(),
            ));
        }
        if self.flight.back().is_some_and(|f| !f.sampled) {
            return Err(StepError::BadBatch(
                "the step sent before waits to be sampled".into(),
            ));
        }
        self.check(batch, self.last_sampled)?;
        if batch.tokens.is_empty() {
            return Err(StepError::BadBatch("an empty step".into()));
        }
        // A submitted step's logits are read with its tokens, not by `logits_rows`.
        self.last_rows = 0;
        Ok(())
    }
}

/// Checks what a step reads back against its `rows` logits rows.
pub(super) fn check_back(back: &ReadBack, rows: usize) -> Result<(), StepError> {
    let past = back.rows.iter().chain(&back.hidden).find(|&&r| r >= rows);
    match past {
        Some(r) => Err(StepError::BadBatch(format!(
            "logits row {r} of a step with {rows}"
        ))),
        None => check_scores(&back.scores, rows),
    }
}

/// Checks the rows scored on the device against a step's `rows` logits rows: each one of
/// them, at most one score each.
pub(super) fn check_scores(scores: &[Score], rows: usize) -> Result<(), StepError> {
    if let Some(s) = scores.iter().find(|s| s.row >= rows) {
        return Err(StepError::BadBatch(format!(
            "scored row {} of a step with {rows}",
            s.row
        )));
    }
    if scores.len() > rows {
        return Err(StepError::BadBatch(format!(
            "{} scored rows for a step with {rows}",
            scores.len()
        )));
    }
    Ok(())
}
