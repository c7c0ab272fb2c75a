//! Steps in flight: sending a step without waiting for it ([`Backend::submit`], or its
//! forward pass and then its sampling, [`Backend::submit_forward`] and
//! [`Backend::submit_sample`], when its adjustments need the tokens of the step before),
//! and collecting it, its sequences found again by id. The loop that decides when is in
//! [`super::run`].

use super::prompts::by_row;
use super::run::{check, in_backend, Engine, Next, Rows, Sampled, Turn};
use super::scheduler::Plan;
use super::seq::Seq;
use kernels::backend::{Backend, Collected, ReadBack, FROM_LAST};
use kernels::forward::{Batch, StepError};
use std::sync::atomic::Ordering;

/// A sequence of a step: its id and its index in `running` when the step was planned (an
/// index only goes down while the step runs: sequences leave, and new ones join at the
/// end).
#[derive(Clone, Copy)]
pub(super) struct Who {
    pub(super) id: u64,
    pub(super) at: usize,
}

/// A sequence's part in a step: who, its first logits row and how many it has, and its
/// tokens computed once the step has run.
#[derive(Clone, Copy)]
pub(super) struct Part {
    pub(super) who: Who,
    pub(super) row: usize,
    pub(super) rows: usize,
    pub(super) end: usize,
}

/// A step sent and not yet collected: its sequences, each logits row's drawing one, what
/// comes back with its tokens, and the rows whose token the host draws again (while there
/// are any, the next step waits for this one: the device's tokens of those rows are not
/// their final ones).
pub(super) struct Flight {
    pub(super) parts: Vec<Part>,
    pub(super) draws: Vec<Option<Who>>,
    pub(super) back: ReadBack,
    pub(super) redraw: Vec<usize>,
}

/// Where sequence `w.id` is in `running` now, if it still is.
pub(super) fn find(running: &[Seq], w: &Who) -> Option<usize> {
    let top = w.at.min(running.len().checked_sub(1)?);
    (0..=top).rev().find(|&i| running[i].id == w.id)
}

impl Engine {
    /// Sends the step without waiting for it, then collects the one before, if any: the
    /// drawing sequences' tokens stay on the device until then.
    pub(super) fn send(
        &mut self,
        backend: &mut dyn Backend,
        plan: &Plan,
        batch: &Batch,
        rows: &Rows,
        backend_ns: &mut u64,
    ) -> Turn {
        let draws = &rows.draws;
        // A grammar's mask of a row whose input token is still on the device is made once
        // the step before is collected.
        let late = draws
            .iter()
            .flatten()
            .any(|&i| self.running[i].masked() && self.running[i].carried());
        if late {
            return self.send_late(backend, plan, batch, rows, backend_ns);
        }
        let s = self.sampling(backend, draws, &rows.scoring, &[], &[]);
        let sent = in_backend(&self.stats, backend_ns, || {
            backend.submit(batch, &s.params, &s.adjust, &s.back)
        });
        let before = self.flight.take();
        let parts = self.parts(plan, batch);
        if let Some(t) = self.sent(backend, sent, plan, before.as_ref()) {
            return t;
        }
        let now = Flight {
            parts,
            draws: self.who(draws),
            back: s.back,
            redraw: s.redraw,
        };
        self.hold(draws);
        match before {
            Some(f) => {
                let t = self.collect(backend, Some(f), Some(&now), backend_ns);
                // Unless collecting failed and took this step with it.
                if matches!(t, Turn::Go) && backend.pending() == 1 {
                    self.flight = Some(now);
                }
                t
            }
            None => {
                self.flight = Some(now);
                Turn::Go
            }
        }
    }

    /// After a step (`plan`) was sent, with `before` in flight: counts it, or on an error
    /// fails both steps' sequences and returns the turn.
    pub(super) fn sent(
        &mut self,
        backend: &mut dyn Backend,
        sent: Result<(), StepError>,
        plan: &Plan,
        before: Option<&Flight>,
    ) -> Option<Turn> {
        if let Err(e) = sent {
            // The step before is lost with a device fault; after a refused batch it is
            // still on the device, and collected (its sequences fail either way).
            if before.is_some() && matches!(e, StepError::BadBatch(_)) {
                let _ = backend.collect();
            }
            let mut failed: Vec<usize> = plan.items.iter().map(|&(i, _)| i).collect();
            failed.extend(before.iter().flat_map(|f| self.present(f)));
            return Some(self.fail(e, failed));
        }
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        if before.is_some() {
            self.stats.steps_ahead.fetch_add(1, Ordering::Relaxed);
        }
        None
    }

    /// Sends the step's forward pass, collects the one before (so that every input token
    /// of this step is known on the host), and only then sends its sampling, with its
    /// rows' adjustments: the host makes them while the device runs the forward pass.
    pub(super) fn send_late(
        &mut self,
        backend: &mut dyn Backend,
        plan: &Plan,
        batch: &Batch,
        rows: &Rows,
        backend_ns: &mut u64,
    ) -> Turn {
        let sent = in_backend(&self.stats, backend_ns, || backend.submit_forward(batch));
        let before = self.flight.take();
        let mut now = Flight {
            parts: self.parts(plan, batch),
            draws: self.who(&rows.draws),
            back: ReadBack::default(),
            redraw: Vec::new(),
        };
        if let Some(t) = self.sent(backend, sent, plan, before.as_ref()) {
            return t;
        }
        let t = self.collect(backend, before, Some(&now), backend_ns);
        if !matches!(t, Turn::Go) {
            return t;
        }
        // Each row's drawing sequence now (those that stopped with the step before are
        // gone: their rows are drawn greedily and dropped).
        let drawing = self.drawing(&now.draws);
        let gone: Vec<bool> = (0..drawing.len())
            .map(|r| now.draws[r].is_some() && drawing[r].is_none())
            .collect();
        let s = self.sampling(backend, &drawing, &rows.scoring, &[], &gone);
        let sampled = in_backend(&self.stats, backend_ns, || {
            backend.submit_sample(&s.params, &s.adjust, &s.back)
        });
        if let Err(e) = sampled {
            return self.fail(e, self.present(&now));
        }
        self.hold(&drawing);
        now.back = s.back;
        now.redraw = s.redraw;
        self.flight = Some(now);
        Turn::Go
    }

    /// Who draws each logits row of a step (`draws`: by index in `running`).
    fn who(&self, draws: &[Option<usize>]) -> Vec<Option<Who>> {
        let who = |i: usize| Who {
            id: self.running[i].id,
            at: i,
        };
        draws.iter().map(|d| d.map(who)).collect()
    }

    /// Each logits row's drawing sequence by its index in `running` now (none where it
    /// left).
    fn drawing(&self, who: &[Option<Who>]) -> Vec<Option<usize>> {
        who.iter()
            .map(|w| w.as_ref().and_then(|w| find(&self.running, w)))
            .collect()
    }

    /// Each drawing sequence (`drawing[row]`) holds `FROM_LAST | row` for its token until
    /// the step is collected; but a sequence that ends with its prompt (an embeddings
    /// request, a prompt with no completion), which ends with the step (so has nothing more
    /// to compute until then).
    fn hold(&mut self, drawing: &[Option<usize>]) {
        for (row, i) in drawing.iter().enumerate() {
            let held = i.map(|i| &mut self.running[i]);
            if let Some(s) = held.filter(|s| !s.ends_with_prompt()) {
                s.tokens.push(FROM_LAST | row as u32);
            }
        }
    }

    /// The indices in `running` of a flight's sequences still there.
    pub(super) fn present(&self, f: &Flight) -> Vec<usize> {
        f.parts
            .iter()
            .filter_map(|p| find(&self.running, &p.who))
            .collect()
    }

    /// Waits for the step in flight `f` and finishes it with its tokens (`newer`: the step
    /// sent after it, lost with it if collecting fails).
    pub(super) fn collect(
        &mut self,
        backend: &mut dyn Backend,
        f: Option<Flight>,
        newer: Option<&Flight>,
        backend_ns: &mut u64,
    ) -> Turn {
        let Some(mut f) = f else {
            return Turn::Go;
        };
        let got = in_backend(&self.stats, backend_ns, || backend.collect());
        let vocab = self.vocab;
        let dim = backend.config().dim;
        let got = got.and_then(|c: Collected| {
            let back = std::mem::take(&mut f.back);
            let hidden = by_row(&back.hidden, &c.hidden, dim)?;
            let next = Next::Tokens(Sampled {
                tokens: c.tokens,
                rows: back.rows,
                logits: c.logits,
                scores: back.scores,
                scored: c.scores,
                redraw: std::mem::take(&mut f.redraw),
            });
            Ok((check(next, f.draws.len(), vocab)?, hidden))
        });
        match got {
            Ok((next, hidden)) => {
                let parts: Vec<(usize, Part)> = f
                    .parts
                    .iter()
                    .filter_map(|p| Some((find(&self.running, &p.who)?, *p)))
                    .collect();
                let draws = self.drawing(&f.draws);
                self.finish(&parts, &draws, &[], next, hidden);
                Turn::Go
            }
            Err(e) => {
                let mut failed = self.present(&f);
                failed.extend(newer.iter().flat_map(|n| self.present(n)));
                self.fail(e, failed)
            }
        }
    }
}
