//! A step's trip through the device: its host memory ([`Slot`]), its staging words sent,
//! its work enqueued (its graph replayed, or its kernels launched), and its answers
//! (tokens, scored rows, logits rows, final hidden states) copied back.

use super::CudaBackend;
use crate::adjust::Adjust;
use crate::cuda::exec::{Exec, ExecError};
use crate::cuda::staging::{self, Layout};
use crate::cuda::step::{runs, Device};
use crate::cuda::twins::SampleParams;
use crate::forward::Batch;
use crate::logprobs::{from_words, Score, TokenLogprobs, SCORE_WORDS};

/// One step's host memory (page-locked on a GPU): its staging words, its sampling part
/// when that is sent after the rest (`late`, the same words of a second buffer), where
/// its sampled tokens and scored rows land, and where the logits rows it asked for land,
/// with their room in words (grown on demand).
pub(super) struct Slot<E: Exec> {
    pub(super) staging: E::Host,
    pub(super) late: E::Host,
    pub(super) tokens: E::Host,
    pub(super) scores: E::Host,
    pub(super) logits: Option<(E::Host, usize)>,
    /// Where the rows of its final hidden states land ([`Device::receive_hidden`]), with
    /// their room in words (grown on demand).
    pub(super) hidden: Option<(E::Host, usize)>,
}

impl<E: Exec> Slot<E> {
    /// For steps of `staging` words and up to `rows` logits rows.
    pub(super) fn new(exec: &E, staging: usize, rows: usize) -> Result<Self, ExecError> {
        Ok(Self {
            staging: exec.host(staging)?,
            late: exec.host(staging)?,
            tokens: exec.host(rows)?,
            scores: exec.host(rows * SCORE_WORDS)?,
            logits: None,
            hidden: None,
        })
    }
}

/// How a step is launched: for its logits only, sampled, or sampled later (its forward
/// pass now; its parameters and adjustments sent with [`Backend::submit_sample`](crate::backend::Backend::submit_sample)).
#[derive(Clone, Copy)]
pub(super) enum Sampling<'a> {
    No,
    Now(Sample<'a>),
    Later,
}

/// What [`CudaBackend::launch`] enqueued: the step's staging layout, its own logits rows,
/// and those with its padding.
pub(super) struct Launched {
    pub(super) lay: Layout,
    pub(super) rows: usize,
    pub(super) padded: usize,
}

/// A sampled step's parameters and adjustments, per logits row, and its rows scored on
/// the device.
pub(super) type Sample<'a> = (&'a [SampleParams], &'a [Option<Adjust>], &'a [Score]);

/// Reads a step's first rows back from the device: logits, or sampled tokens.
pub(super) type Read<E, T> = fn(&Device<E>, usize) -> Result<Vec<T>, ExecError>;

pub(super) fn logits<E: Exec>(dev: &Device<E>, rows: usize) -> Result<Vec<f32>, ExecError> {
    dev.exec.download(&dev.bufs.logits, rows * dev.config.vocab)
}

pub(super) fn tokens<E: Exec>(dev: &Device<E>, rows: usize) -> Result<Vec<u32>, ExecError> {
    dev.exec.download(&dev.bufs.sampled, rows)
}

impl<E: Exec> CudaBackend<E> {
    /// Sends and enqueues one step (not awaited): `batch` padded with dummy decode rows to
    /// `min_rows` sequences, or to its graph's bucket; sampled as `sampling` says (with
    /// parameters and adjustments per logits row when now; `Later`: only the batch's
    /// words are sent, and the step stops before its `sample` kernel).
    pub(super) fn launch(
        &mut self,
        batch: &Batch,
        min_rows: usize,
        graph: Option<usize>,
        sampling: Sampling,
    ) -> Result<Launched, ExecError> {
        let n = batch.seqs.len();
        let n_logits = batch.n_logits();
        self.last_padded = 0;
        let pad = match graph {
            Some(i) => self.graph(i).bucket - n,
            None => min_rows.saturating_sub(n),
        };
        let trash = self.dev.n_blocks as u32;
        let trash_w = self.dev.window_blocks.map(|n| n as u32);
        self.dev.exec.make_current()?;
        // Waits for the last copy out of this buffer (two steps ago).
        let host = self
            .dev
            .exec
            .host_words(&mut self.slots[self.turn].staging)?;
        let (params, adjust, scores) = match sampling {
            Sampling::Now(s) => s,
            _ => Default::default(),
        };
        // The staging buffer holds `Layout::new(max_seqs, max_tokens)` words and the
        // adjustments' and scored rows' room, which `step_checked` held the step to.
        let max_blocks = self.dev.max_blocks;
        let w = staging::write(
            host, batch, pad, max_blocks, trash, trash_w, params, adjust, scores,
        )
        .ok_or_else(|| {
            ExecError::Bounds("a step's adjustments or scored rows past their room".into())
        })?;
        let words = match sampling {
            Sampling::Later => 0..w.lay.sample,
            _ => 0..w.words(),
        };
        self.dev.exec.send(
            &self.slots[self.turn].staging,
            words,
            &mut self.dev.bufs.staging,
        )?;
        self.turn ^= 1;
        let sample = matches!(sampling, Sampling::Now(_));
        let padded = n_logits + pad;
        match graph {
            Some(i) if matches!(sampling, Sampling::Later) => {
                self.dev.exec.replay(&self.graph(i).forward)?
            }
            Some(i) => self.dev.exec.replay(&self.graph(i).graph)?,
            None => self.dev.enqueue(w.lay, padded, sample)?,
        }
        if sample {
            self.dev
                .enqueue_logprobs(w.extra.scores_at(w.lay), scores.len())?;
        }
        Ok(Launched {
            lay: w.lay,
            rows: n_logits,
            padded,
        })
    }

    /// Sends the sampling part of a step launched for `Later` (slot `turn`, laid out as
    /// `lay`, `padded` logits rows) and enqueues its `sample` kernel.
    pub(super) fn launch_sample(
        &mut self,
        turn: usize,
        lay: Layout,
        padded: usize,
        (params, adjust, scores): Sample,
    ) -> Result<(), ExecError> {
        let e = &self.dev.exec;
        e.make_current()?;
        let late = &mut self.slots[turn].late;
        let extra = staging::write_sample(e.host_words(late)?, lay, params, adjust, scores)
            .ok_or_else(|| {
                ExecError::Bounds("a step's adjustments or scored rows past their room".into())
            })?;
        e.send(
            late,
            lay.sample..lay.len + extra.words(),
            &mut self.dev.bufs.staging,
        )?;
        self.dev.enqueue_sample(lay, padded)?;
        self.dev
            .enqueue_logprobs(extra.scores_at(lay), scores.len())
    }

    /// Enqueues the copies back of a sampled step's `rows` tokens, its `scored` rows'
    /// answers, of its logits rows `want` (in that order, one copy per run of consecutive
    /// rows), and of the final hidden states of its logits rows at token rows `hidden`
    /// (the step enqueued with `padded` logits rows) into slot `turn`. Returns how many
    /// hidden states come back, and whether the final norm was fused.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn receive(
        &mut self,
        turn: usize,
        rows: usize,
        scored: usize,
        want: &[usize],
        hidden: &[usize],
        padded: usize,
    ) -> Result<(usize, bool), ExecError> {
        let e = &self.dev.exec;
        let slot = &mut self.slots[turn];
        let mut fused = false;
        if !hidden.is_empty() {
            let words = 2 * hidden.len() * self.dev.config.dim;
            let room = match slot.hidden.take() {
                Some((h, room)) if room >= words => (h, room),
                _ => (e.host(words)?, words),
            };
            let h = &mut slot.hidden.insert(room).0;
            fused = self.dev.receive_hidden(hidden, padded, h)?;
        }
        e.receive(&self.dev.bufs.sampled, 0..rows, &mut slot.tokens, 0)?;
        if scored > 0 {
            let words = 0..scored * SCORE_WORDS;
            e.receive(&self.dev.bufs.scores, words, &mut slot.scores, 0)?;
        }
        if !want.is_empty() {
            let vocab = self.dev.config.vocab;
            let words = want.len() * vocab;
            let room = match slot.logits.take() {
                Some((h, room)) if room >= words => (h, room),
                _ => (e.host(words)?, words),
            };
            let h = &mut slot.logits.insert(room).0;
            for (at, first, n) in runs(want) {
                let r = first * vocab..(first + n) * vocab;
                e.receive(&self.dev.bufs.logits, r, h, at * vocab)?;
            }
        }
        Ok((hidden.len(), fused))
    }

    /// A step padded to `min_rows` (graphs as they apply), then its first rows read back
    /// by `read`; the stream is idle when it returns, also on an error.
    pub(super) fn run<T>(
        &mut self,
        batch: &Batch,
        min_rows: usize,
        graph: Option<usize>,
        sampling: Sampling,
        read: Read<E, T>,
    ) -> Result<Vec<T>, ExecError> {
        self.last_sampled = 0;
        let r = self.launch(batch, min_rows, graph, sampling).and_then(
            |Launched { rows, padded, .. }| {
                self.last_padded = padded;
                let out = if rows == 0 {
                    Vec::new()
                } else {
                    read(&self.dev, rows)?
                };
                self.dev.exec.synchronize()?;
                Ok(out)
            },
        );
        if r.is_err() {
            // Leave the stream idle before the staging buffer is written again.
            let _ = self.dev.exec.synchronize();
        }
        r
    }

    /// [`Backend::scores`](crate::backend::Backend::scores) of the last step, checked: the `logprobs` kernel over its logits
    /// rows, the scored rows' words sent first (the last step is done with its staging
    /// words: they go at the start).
    pub(super) fn score_last(&mut self, scores: &[Score]) -> Result<Vec<TokenLogprobs>, ExecError> {
        let words = 3 * scores.len();
        self.dev.exec.make_current()?;
        let slot = &mut self.slots[self.turn];
        let host = self.dev.exec.host_words(&mut slot.late)?;
        for (w, s) in host[..words].chunks_exact_mut(3).zip(scores) {
            w.copy_from_slice(&s.words());
        }
        let (late, staging) = (&slot.late, &mut self.dev.bufs.staging);
        self.dev.exec.send(late, 0..words, staging)?;
        self.dev.enqueue_logprobs(0, scores.len())?;
        let answers = 0..scores.len() * SCORE_WORDS;
        let slot = &mut self.slots[self.turn];
        let e = &self.dev.exec;
        e.receive(&self.dev.bufs.scores, answers.clone(), &mut slot.scores, 0)?;
        let out = &e.host_words(&mut slot.scores)?[answers];
        Ok(out.chunks_exact(SCORE_WORDS).map(from_words).collect())
    }
}
