//! The engine thread's loop: take arrivals, drop cancelled sequences, plan a step with the
//! [`super::scheduler`], run it on the backend (sampling on the device where the backend
//! can), score prompts, draw and send each finished row's token, and free what finished.
//! A device fault fails the engine's sequences and builds its backend again ([`recover`]).
//! Sending a step without waiting and collecting it are in [`super::flight`].
//!
//! **Steps planned ahead.** On a backend that overlaps steps ([`Backend::overlaps`]), a
//! step is sent ([`Backend::submit`]) and the loop goes on at once: it takes arrivals,
//! plans and sends the next step, and only then collects the first one's tokens and sends
//! them to clients, while the device runs the second. Each sequence that draws a token in a
//! step in flight holds [`FROM_LAST`](kernels::backend::FROM_LAST)` | row` in its place,
//! which the next step's batch carries and the device resolves; collecting replaces it. So
//! the host's work between two steps (scheduling, batch building, detokenizing, sending)
//! runs while the device works. Log-probabilities (of a drawn token, or of a prompt's
//! next token when a prompt is scored) are computed on the device from the model's logits
//! and come back with the step's tokens, a few words a row, while the device draws from an
//! adjusted copy of a row with penalties or a grammar, whose token the host keeps; the
//! logits rows the host draws again come back whole. Presence and frequency penalties
//! count a sequence's input token on the device ([`kernels::adjust::Carry`]: the host
//! sends what each possible token's delta would be).
//! A step with a row in JSON mode whose input token is still on the device sends its
//! forward pass first ([`Backend::submit_forward`]), then collects the step before and
//! sends its sampling with the masks ([`Backend::submit_sample`]), made while the device
//! runs the forward pass. What the host must see first keeps the step after it waiting for
//! it: a row in flight whose token the host draws again (penalties or JSON mode past the
//! step's room for adjustments: [`wanted`]), and a sequence short of a KV block (preemption
//! waits for the step in flight, which reads the blocks). A sequence that stops at step N
//! has drawn a row in step N+1 already; that token is dropped. Its blocks are freed at
//! once: everything on the device runs in order, so a block handed out again is written
//! only after that step. A decoding sequence may compute tokens proposed to follow its
//! last one in the same step, kept as far as its draws agree ([`super::speculate`]): its
//! last token is collected first, and that step runs before the next is planned. An
//! embeddings request ends with its prompt: the step that ends it reads its row's final
//! hidden state back with its tokens ([`ReadBack::hidden`]; a step taken at once, after
//! it: [`Backend::hidden_rows`]), and it holds no token from the device meanwhile, so no
//! later step computes a row for it.

use super::blocks::chain;
use super::draw;
use super::fair::Fair;
use super::flight::{Flight, Part, Who};
use super::kv_pools::KvPools;
use super::outbox::Outbox;
use super::prompts::{by_row, embedded, score_prompt, Hidden};
use super::recover::{recover, Rebuild};
use super::scheduler::{self, Limits, Plan, Schedulable};
use super::seq::{admit, emit, sample_params, tail, NewSeq, Seq};
use super::speculate;
use super::{now_ms, EngineStats};
use crate::worker::{FinishReason, WorkerEvent};
use kernels::adjust::Adjust;
use kernels::backend::{Backend, ReadBack};
use kernels::cuda::twins::SampleParams;
use kernels::forward::{Batch, StepError};
use kernels::json_mode::JsonVocab;
use kernels::logprobs::{token_logprobs, Score, TokenLogprobs};
use kernels::tokenizer::Tokenizer;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

/// The engine thread's loop; returns when every submitter is gone. `overlap`: plan each
/// step while the one before runs, where the backend can.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_engine(
    backend: Box<dyn Backend>,
    rebuild: Rebuild,
    tok: Arc<Tokenizer>,
    rx: mpsc::Receiver<NewSeq>,
    limits: Limits,
    stats: Arc<EngineStats>,
    outbox: Outbox,
    overlap: bool,
) {
    let mut backend = backend;
    let mut e = Engine {
        vocab: backend.config().vocab,
        on_device: backend.samples_on_device(),
        pool: KvPools::for_backend(backend.as_ref(), limits.prefix_caching),
        rebuild,
        tok,
        rx,
        limits,
        stats,
        outbox,
        overlap,
        json_vocab: None,
        running: Vec::new(),
        waiting: VecDeque::new(),
        fair: Fair::default(),
        flight: None,
        plan_after: false,
        next_id: 0,
    };
    loop {
        match e.turn(&mut *backend) {
            Turn::Go => {}
            Turn::Stop => return,
            Turn::Fault(why) => {
                backend = match recover(backend, &mut e.rebuild, &e.rx, &mut e.outbox, &why) {
                    Some(b) => b,
                    None => return,
                };
                e.rebuilt(&*backend);
            }
        }
    }
}

/// What the loop does after a turn.
pub(super) enum Turn {
    Go,
    /// Every submitter is gone.
    Stop,
    /// The device failed (why): the backend is built again.
    Fault(String),
}

/// The engine thread's state, beside its backend (which a device fault replaces).
pub(super) struct Engine {
    pub(super) rebuild: Rebuild,
    pub(super) tok: Arc<Tokenizer>,
    pub(super) rx: mpsc::Receiver<NewSeq>,
    pub(super) limits: Limits,
    pub(super) stats: Arc<EngineStats>,
    pub(super) outbox: Outbox,
    pub(super) vocab: usize,
    /// JSON mode's view of the vocabulary, made on the first request that asks.
    pub(super) json_vocab: Option<JsonVocab>,
    pub(super) on_device: bool,
    pub(super) overlap: bool,
    pub(super) pool: KvPools,
    pub(super) running: Vec<Seq>,
    pub(super) waiting: VecDeque<Seq>,
    pub(super) fair: Fair,
    /// The step sent last, while it is not collected.
    pub(super) flight: Option<Flight>,
    /// A step planned ahead left a sequence without a block: the next is planned after
    /// the one in flight is collected (so that it may preempt).
    pub(super) plan_after: bool,
    pub(super) next_id: u64,
}

/// Runs `f`, a call into the backend, as the step in progress (which the engine's probe
/// watches for a stuck device), adding its time to `backend_ns`.
pub(super) fn in_backend<T>(stats: &EngineStats, backend_ns: &mut u64, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    stats.step_since_ms.store(now_ms(), Ordering::Relaxed);
    let out = f();
    stats.step_since_ms.store(0, Ordering::Relaxed);
    *backend_ns += t.elapsed().as_nanos() as u64;
    out
}

/// Each logits row's sampling parameters: its drawing sequence's, greedy for a prompt's
/// row.
fn params(running: &[Seq], draws: &[Option<usize>]) -> Vec<SampleParams> {
    draws
        .iter()
        .map(|d| {
            d.map_or(SampleParams::GREEDY, |i| {
                let s = &running[i];
                sample_params(s, s.generated())
            })
        })
        .collect()
}

/// What the host reads back of a step beside its tokens, and the rows whose token it
/// draws again. Read back whole: the rows of sequences with penalties or JSON mode whose
/// adjustment is not made on the device (`adjust`: the rows that are), which are drawn
/// again here (the device drew them unadjusted). Scored on the device: a prompt's rows
/// being scored (`scoring`: the prompt token each scores, and how many most likely
/// tokens), and the other rows of sequences that want log-probabilities. Not the rows
/// whose sequence left (`gone`).
fn wanted(
    running: &[Seq],
    draws: &[Option<usize>],
    scoring: &[Option<(u32, usize)>],
    adjust: &[Option<Adjust>],
    gone: &[bool],
) -> (ReadBack, Vec<usize>) {
    let on_device = |r: usize| adjust.get(r).is_some_and(Option::is_some);
    let mut back = ReadBack::default();
    let mut redraw = Vec::new();
    for r in (0..draws.len()).filter(|&r| !gone.get(r).copied().unwrap_or(false)) {
        let Some(s) = draws[r].map(|i| &running[i]) else {
            if let Some(&Some((token, top))) = scoring.get(r) {
                let token = Some(token);
                back.scores.push(Score { row: r, token, top });
            }
            continue;
        };
        if s.embed {
            // Its prompt ends here: its final hidden state is its answer.
            back.hidden.push(r);
        } else if s.ends_with_prompt() {
            // Its prompt ends here, and nothing is drawn for it.
        } else if s.constrained() && !on_device(r) {
            back.rows.push(r);
            redraw.push(r);
        } else if let Some(top) = s.logprobs {
            let top = top as usize;
            back.scores.push(Score {
                row: r,
                token: None,
                top,
            });
        }
    }
    (back, redraw)
}

/// The rows of the sequences computing drafts (`verify`: [`Engine::verify`] draws them),
/// on a backend that samples on the device: row `j` of a sequence is drawn there by its
/// own rule at the step it would be drawn at were the drafts before it kept (its seed's
/// `emitted + j`), and its log-probabilities computed there where it wants them; a
/// sequence with penalties or JSON mode has its rows read back whole and drawn on the
/// host, each adjusted by what the draws before it took.
fn verify_rows(
    running: &[Seq],
    verify: &[Verify],
    params: &mut [SampleParams],
    back: &mut ReadBack,
) {
    for &(i, first, k) in verify {
        let s = &running[i];
        for (j, row) in (first..first + k).enumerate() {
            params[row] = sample_params(s, s.emitted() + j as u32);
            if s.constrained() {
                back.rows.push(row);
            } else if let Some(top) = s.logprobs {
                back.scores.push(Score {
                    row,
                    token: None,
                    top: top as usize,
                });
            }
        }
    }
}

/// Each logits row of a planned step: the sequence it draws for (by index in `running`),
/// and the prompt token it scores, with how many most likely tokens.
#[derive(Default)]
pub(super) struct Rows {
    pub(super) draws: Vec<Option<usize>>,
    pub(super) scoring: Vec<Option<(u32, usize)>>,
    /// Sequences computing drafts ([`super::speculate`]): index in `running`, first logits
    /// row, rows (its last token's and each draft's), drawn by [`Engine::verify`].
    pub(super) verify: Vec<Verify>,
}

/// A sequence computing drafts in a step: its index in `running`, its first logits row,
/// and its rows.
pub(super) type Verify = (usize, usize, usize);

/// A sampled step's parameters and device adjustments per logits row, what it reads back
/// and the rows whose token the host draws again ([`wanted`]).
pub(super) struct Sampling {
    pub(super) params: Vec<SampleParams>,
    pub(super) adjust: Vec<Option<Adjust>>,
    pub(super) back: ReadBack,
    pub(super) redraw: Vec<usize>,
}

/// A backend's answer is checked before any of it reaches a client: the right number of
/// rows (`rows`), token ids inside the vocabulary, and the logits rows asked for.
pub(super) fn check(next: Next, rows: usize, vocab: usize) -> Result<Next, StepError> {
    let bad = |m: String| Err(StepError::Device(m));
    let got = match &next {
        Next::Tokens(t) => t.tokens.len(),
        Next::Logits(l) => l.len() / vocab.max(1),
    };
    if got != rows {
        return bad(format!("the backend returned {got} rows for {rows}"));
    }
    if let Next::Tokens(t) = &next {
        if t.logits.len() != t.rows.len() * vocab {
            return bad(format!(
                "the backend returned {} floats for {} logits rows",
                t.logits.len(),
                t.rows.len()
            ));
        }
        if t.scored.len() != t.scores.len() {
            return bad(format!(
                "the backend returned {} scored rows for {}",
                t.scored.len(),
                t.scores.len()
            ));
        }
        let tokens = t
            .scored
            .iter()
            .flat_map(|s| std::iter::once(s.id).chain(s.top.iter().map(|p| p.0)));
        if let Some(id) = t
            .tokens
            .iter()
            .copied()
            .chain(tokens)
            .find(|&id| id as usize >= vocab)
        {
            return bad(format!(
                "the backend sampled token {id}, past the vocabulary"
            ));
        }
    }
    Ok(next)
}

impl Engine {
    /// One turn of the loop: arrivals, one step planned and run or sent, and the step
    /// before collected if one is in flight.
    fn turn(&mut self, backend: &mut dyn Backend) -> Turn {
        if self.running.is_empty() && self.waiting.is_empty() && self.flight.is_none() {
            self.fair.reset();
            match self.rx.recv() {
                Ok(n) => self.arrive(n),
                Err(_) => return Turn::Stop,
            }
        }
        let t_loop = Instant::now();
        while let Ok(n) = self.rx.try_recv() {
            self.arrive(n);
        }
        self.drop_cancelled();
        let overlapping = self.overlap && backend.overlaps();
        let mut backend_ns = 0;
        // A sequence due to propose drafts needs its last token, which the step in flight
        // draws: that step is collected first (the pipeline drains for it).
        if self.flight.is_some() && self.due_to_propose(overlapping) {
            let f = self.flight.take();
            let t = self.collect(backend, f, None, &mut backend_ns);
            if !matches!(t, Turn::Go) {
                return t;
            }
        }
        self.propose(overlapping);
        // A step in flight whose tokens the next one's planning needs is collected first.
        if self.flight.is_some() && !self.may_plan_ahead() {
            let f = self.flight.take();
            let t = self.collect(backend, f, None, &mut backend_ns);
            if !matches!(t, Turn::Go) {
                return t;
            }
        }
        let ahead = self.flight.is_some();
        let lim = Limits {
            max_logit_rows: backend.max_logit_rows(),
            preempt: !ahead,
            ..self.limits
        };
        let plan = scheduler::schedule(
            &mut self.running,
            &mut self.waiting,
            &mut self.pool,
            lim,
            &mut self.fair,
        );
        self.plan_after = plan.starved;
        self.stats
            .preemptions
            .fetch_add(plan.preempted as u64, Ordering::Relaxed);
        self.stats
            .rows_held
            .fetch_add(plan.held as u64, Ordering::Relaxed);
        let t = if plan.items.is_empty() {
            match self.flight.take() {
                Some(f) => self.collect(backend, Some(f), None, &mut backend_ns),
                None => {
                    // What a step collected above finished goes out before the loop
                    // idles (or waits for arrivals).
                    self.outbox.flush();
                    self.publish();
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    return Turn::Go;
                }
            }
        } else {
            let (batch, rows) = self.build(&plan);
            // A step computing drafts is verified as soon as it has run: the next one
            // starts from the tokens it kept.
            if overlapping && rows.verify.is_empty() {
                self.send(backend, &plan, &batch, &rows, &mut backend_ns)
            } else {
                self.step(backend, &plan, &batch, &rows, &mut backend_ns)
            }
        };
        if !matches!(t, Turn::Go) {
            return t;
        }
        self.outbox.flush();
        self.publish();
        let total = t_loop.elapsed().as_nanos() as u64;
        self.stats
            .backend_ns
            .fetch_add(backend_ns, Ordering::Relaxed);
        self.stats
            .host_ns
            .fetch_add(total.saturating_sub(backend_ns), Ordering::Relaxed);
        Turn::Go
    }

    /// A tenant back from idle is lifted to the least served tenant with work.
    fn arrive(&mut self, n: NewSeq) {
        let backlogged = self.running.iter().chain(self.waiting.iter());
        self.fair.arrive(&n.share, backlogged.map(|s| &s.share));
        self.waiting.push_back(admit(n, self.next_id));
        self.next_id += 1;
    }

    /// Drops the sequences whose client went away, and frees their blocks.
    fn drop_cancelled(&mut self) {
        let pool = &mut self.pool;
        let mut keep = |s: &mut Seq| {
            let gone = s.tx.is_closed();
            if gone {
                pool.release(&mut s.blocks);
            }
            !gone
        };
        self.running.retain_mut(&mut keep);
        self.waiting.retain_mut(&mut keep);
    }

    /// The most drafts a sequence may propose this turn, by prompt lookup and from a
    /// prediction: none while sequences wait; by lookup only while one sequence runs
    /// ([`speculate::MAX_SEQS`]); from a prediction while a few do where steps are not
    /// planned ahead (the CPU: [`speculate::MAX_PREDICTED_SEQS`]), else only alone too.
    fn drafting(&self, overlapping: bool) -> Drafting {
        let few = |most: usize| self.waiting.is_empty() && self.running.len() <= most;
        let predicted = if overlapping {
            speculate::MAX_SEQS
        } else {
            speculate::MAX_PREDICTED_SEQS
        };
        Drafting {
            lookup: if few(speculate::MAX_SEQS) {
                self.limits.speculate
            } else {
                0
            },
            predict: if few(predicted) {
                self.limits.predict
            } else {
                0
            },
        }
    }

    /// Whether a decoding sequence is due to propose drafts this turn (allowed some
    /// ([`Engine::drafting`]), its wait after misses over), so that its last token must be
    /// on the host.
    fn due_to_propose(&self, overlapping: bool) -> bool {
        let d = self.drafting(overlapping);
        self.running
            .iter()
            .any(|s| s.may_draft() && s.draft_wait == 0 && d.limit(s) > 0)
    }

    /// Drafts for the decoding sequences, as many as [`Engine::drafting`] allows, where no
    /// step is in flight: from a sequence's prediction ([`super::prediction`]), else by
    /// prompt lookup ([`super::speculate`]); each leaving room under `max_tokens` for the
    /// token drawn after them. None from a sequence backing off after drafts that missed
    /// ([`speculate::backoff`]), whose wait goes down a step at a time. Where steps are
    /// planned ahead (`overlapping`), looking cost the device its next step's overlap, so
    /// finding nothing backs off too.
    fn propose(&mut self, overlapping: bool) {
        let d = self.drafting(overlapping);
        let Drafting { lookup, predict } = d;
        for s in &mut self.running {
            if !s.may_draft() || d.limit(s) == 0 {
                continue;
            }
            if s.draft_wait > 0 {
                s.draft_wait -= 1;
                continue;
            }
            // Due, so the step in flight (if any) was collected first: its last token is
            // known ([`Engine::due_to_propose`]).
            debug_assert!(
                !s.carried(),
                "a sequence due to propose holds a token in flight"
            );
            let room = (s.max_tokens as usize).saturating_sub(s.generated() as usize + 1);
            let answer = &s.tokens[s.prompt_len..];
            s.draft = match &mut s.prediction {
                Some(p) if predict > 0 => p.propose(answer, predict.min(room)),
                _ => Vec::new(),
            };
            if s.draft.is_empty() && lookup > 0 {
                s.draft = speculate::propose(&s.tokens, lookup.min(room));
            }
            if s.draft.is_empty() && overlapping {
                s.draft_misses += 1;
                s.draft_wait = speculate::backoff(s.draft_misses);
            }
        }
    }

    /// Whether the next step may be planned before the one in flight is collected.
    fn may_plan_ahead(&self) -> bool {
        !self.plan_after && self.flight.as_ref().is_none_or(|f| f.redraw.is_empty())
    }

    /// A sampled step's [`Sampling`], for logits rows drawn by `draws`, prompt rows
    /// `scoring` and the rows of sequences computing drafts (`verify`, [`verify_rows`])
    /// (counted in the stats), but for rows whose sequence left (`gone`).
    pub(super) fn sampling(
        &mut self,
        backend: &dyn Backend,
        draws: &[Option<usize>],
        scoring: &[Option<(u32, usize)>],
        verify: &[Verify],
        gone: &[bool],
    ) -> Sampling {
        let row_seqs: Vec<Option<&Seq>> =
            draws.iter().map(|r| r.map(|i| &self.running[i])).collect();
        let mut params = params(&self.running, draws);
        let adjust = draw::adjustments(
            &row_seqs,
            backend.adjust_room(),
            self.vocab,
            &self.tok,
            &mut self.json_vocab,
        );
        let (mut back, redraw) = wanted(&self.running, draws, scoring, &adjust, gone);
        verify_rows(&self.running, verify, &mut params, &mut back);
        let st = &self.stats;
        st.rows_adjusted_on_device
            .fetch_add(adjust.iter().flatten().count() as u64, Ordering::Relaxed);
        st.rows_read_back
            .fetch_add(back.rows.len() as u64, Ordering::Relaxed);
        st.rows_scored_on_device
            .fetch_add(back.scores.len() as u64, Ordering::Relaxed);
        Sampling {
            params,
            adjust,
            back,
            redraw,
        }
    }

    /// The plan's batch, and for each logits row: its sequence (by index in `running`)
    /// when the row draws its next token, and the prompt token it scores (with how many
    /// most likely tokens) when it scores one. Counts the plan's tokens as computed.
    fn build(&mut self, plan: &Plan) -> (Batch, Rows) {
        let mut batch = Batch::default();
        let mut rows = Rows::default();
        let ahead = self.flight.is_some();
        for &(i, n) in &plan.items {
            let s = &mut self.running[i];
            if ahead {
                // Drafts follow a last token known on the host, and their step is verified
                // before the next is planned: never beside a step in flight.
                s.draft.clear();
            }
            let end = s.computed + n;
            let k = s.logit_rows(n);
            if !s.draft.is_empty() {
                // Its last token and the drafts after it as far as the chunk reaches, a
                // logits row each, drawn by `verify`.
                s.draft.truncate(end.saturating_sub(s.tokens.len()));
                self.stats
                    .draft_tokens
                    .fetch_add(s.draft.len() as u64, Ordering::Relaxed);
                let mut tokens = s.tokens[s.computed..].to_vec();
                tokens.extend_from_slice(&s.draft);
                batch.push_rows(&tokens, s.computed, s.blocks.full.clone(), k);
                batch.set_window_table(s.blocks.window.clone());
                rows.verify.push((i, rows.draws.len(), k));
                rows.draws.extend(std::iter::repeat_n(None, k));
                rows.scoring.extend(std::iter::repeat_n(None, k));
                s.computed = end;
                continue;
            }
            batch.push_rows(
                &s.tokens[s.computed..end],
                s.computed,
                s.blocks.full.clone(),
                k,
            );
            batch.set_window_table(s.blocks.window.clone());
            let drawing = end == s.tokens.len();
            rows.draws
                .extend((0..k).map(|j| (drawing && j + 1 == k).then_some(i)));
            // Row j is position end − k + j; it scores the prompt token after it, from the
            // first not scored yet ([`score_prompt`]).
            let top = s.prompt_top;
            let scores = |j: usize| {
                let target = end - k + j + 1;
                let next = s.prompt_next?;
                (target >= next && target < s.prompt_len).then(|| (s.tokens[target], top))
            };
            rows.scoring.extend((0..k).map(scores));
            s.computed = end;
        }
        (batch, rows)
    }

    /// The plan's parts, by sequence id.
    pub(super) fn parts(&self, plan: &Plan, batch: &Batch) -> Vec<Part> {
        let mut row = 0;
        plan.items
            .iter()
            .zip(&batch.seqs)
            .map(|(&(i, _), b)| {
                let s = &self.running[i];
                let p = Part {
                    who: Who { id: s.id, at: i },
                    row,
                    rows: b.logits,
                    end: s.computed,
                };
                row += b.logits;
                p
            })
            .collect()
    }

    /// Runs the step and waits for it: sampled on the device where the backend can (rows
    /// with penalties or JSON mode adjusted there as its room allows; log-probabilities
    /// computed there; constrained rows past the room read back), else its logits drawn
    /// here.
    fn step(
        &mut self,
        backend: &mut dyn Backend,
        plan: &Plan,
        batch: &Batch,
        rows: &Rows,
        backend_ns: &mut u64,
    ) -> Turn {
        debug_assert!(self.flight.is_none(), "a step waits while one is in flight");
        let draws = &rows.draws;
        let sampling = self
            .on_device
            .then(|| self.sampling(backend, draws, &rows.scoring, &rows.verify, &[]));
        let stepped = in_backend(&self.stats, backend_ns, || {
            if let Some(s) = sampling {
                backend
                    .step_sample(batch, &s.params, &s.adjust)
                    .and_then(|tokens| {
                        // The hidden states are read after the step (below).
                        let ReadBack { rows, scores, .. } = s.back;
                        let logits = if rows.is_empty() {
                            Vec::new()
                        } else {
                            backend.logits_rows(&rows)?
                        };
                        let scored = if scores.is_empty() {
                            Vec::new()
                        } else {
                            backend.scores(&scores)?
                        };
                        Ok(Next::Tokens(Sampled {
                            tokens,
                            rows,
                            logits,
                            scores,
                            scored,
                            redraw: s.redraw,
                        }))
                    })
            } else {
                backend.step(batch).map(Next::Logits)
            }
        });
        let stepped = stepped.and_then(|next| check(next, batch.n_logits(), self.vocab));
        // The hidden states of the rows that end an embeddings request's prompt, read
        // before any other step runs.
        let stepped = stepped.and_then(|next| {
            let ends: Vec<usize> = (0..draws.len())
                .filter(|&r| draws[r].is_some_and(|i| self.running[i].embed))
                .collect();
            if ends.is_empty() {
                return Ok((next, Hidden::new()));
            }
            let got = in_backend(&self.stats, backend_ns, || backend.hidden_rows(&ends))?;
            Ok((next, by_row(&ends, &got, backend.config().dim)?))
        });
        match stepped {
            Ok((next, hidden)) => {
                self.stats.steps.fetch_add(1, Ordering::Relaxed);
                let parts: Vec<(usize, Part)> = plan
                    .items
                    .iter()
                    .map(|&(i, _)| i)
                    .zip(self.parts(plan, batch))
                    .collect();
                self.finish(&parts, draws, &rows.verify, next, hidden);
                Turn::Go
            }
            Err(e) => self.fail(e, plan.items.iter().map(|&(i, _)| i).collect()),
        }
    }

    /// A step's answer: its prompts' rows scored, the drafts it computed checked
    /// (`verify`: [`Engine::verify`]), each drawing sequence's token drawn, taken and sent
    /// (an embeddings request's: its vector, from `hidden`, instead), the blocks its
    /// sequences filled offered to the prefix cache, and the sequences that finished
    /// freed. `parts`: the step's sequences (index in `running`, part); `draws`: each
    /// logits row's drawing sequence.
    pub(super) fn finish(
        &mut self,
        parts: &[(usize, Part)],
        draws: &[Option<usize>],
        verify: &[Verify],
        mut next: Next,
        mut hidden: Hidden,
    ) {
        let (vocab, tok) = (self.vocab, &*self.tok);
        for &(i, p) in parts {
            let rows = p.row..p.row + p.rows;
            let s = &mut self.running[i];
            score_prompt(s, p.end, rows, &next, vocab, tok, &mut self.outbox);
        }
        let mut finished = self.verify(verify, &next);
        let tok = &*self.tok;
        // Each drawing sequence's row of the step's answer; every such token drawn at once.
        let mut rows: Vec<Option<usize>> = vec![None; self.running.len()];
        for (row, i) in draws.iter().enumerate() {
            if let Some(i) = *i {
                rows[i] = Some(row);
            }
        }
        let mut drawn = draw::draw(
            &mut self.running,
            &rows,
            &mut next,
            vocab,
            tok,
            &mut self.json_vocab,
        );
        let bs = self.limits.block_size;
        for &(i, _) in parts {
            let s = &mut self.running[i];
            let got = drawn.get_mut(i).and_then(Option::take);
            // One that ends with its prompt: the token drawn for it is not its.
            if let Some((id, lp)) = got.as_ref().filter(|_| !s.ends_with_prompt()) {
                s.take(*id, lp.clone(), tok);
            }
            // The blocks filled with known tokens join the prefix cache.
            let known = s.computed.min(s.resolved);
            let full = known / bs;
            if full > s.registered {
                chain(
                    self.pool.hasher(),
                    &s.tenant,
                    &s.tokens[..known],
                    bs,
                    &mut s.hashes,
                );
                for b in s.registered..full {
                    let after = b.checked_sub(1).map(|p| s.hashes[p]);
                    let tokens = &s.tokens[b * bs..(b + 1) * bs];
                    self.pool
                        .register(&s.blocks, b, s.hashes[b], after, tokens, &s.tenant);
                }
                s.registered = full;
            }
            let Some((id, _)) = got else {
                continue;
            };
            if s.embed {
                let vector = rows[i].and_then(|r| hidden.remove(&r));
                embedded(s, vector, &self.stats, &mut self.outbox);
                finished.push(i);
                continue;
            }
            if s.ends_with_prompt() {
                // The prompt alone (scored above, where asked): its completion is empty.
                let usage = s.usage();
                self.stats.count_prompt(&usage);
                let done = WorkerEvent::Done {
                    finish_reason: FinishReason::Length,
                    usage,
                };
                s.send(&mut self.outbox, done);
                finished.push(i);
                continue;
            }
            if let Some(reason) = emit(s, tok, id, &mut self.outbox) {
                close(s, reason, &self.stats, &mut self.outbox);
                finished.push(i);
            }
        }
        finished.sort_unstable_by(|a, b| b.cmp(a));
        for i in finished {
            let mut s = self.running.remove(i);
            self.pool.release(&mut s.blocks);
        }
    }

    /// Each sequence that computed drafts in the step (`verify`): its rows drawn in
    /// order, each by its own rule and taken and sent as it comes, while each draw is the
    /// draft its row was computed after; the first that is not, its own token, ends it
    /// (the rows after it followed a token it did not take). Its computed positions end
    /// before its last token, as after any step. Returns those that finished.
    fn verify(&mut self, verify: &[Verify], next: &Next) -> Vec<usize> {
        let mut finished = Vec::new();
        if verify.is_empty() {
            return finished;
        }
        let (vocab, tok) = (self.vocab, &*self.tok);
        let seqs = verify.iter().map(|&(i, _, _)| &self.running[i]);
        let jv = draw::vocab_for(seqs, tok, &mut self.json_vocab);
        let mut kept = 0;
        for &(i, first, rows) in verify {
            let s = &mut self.running[i];
            let draft = std::mem::take(&mut s.draft);
            let before = kept;
            let mut end = None;
            for j in 0..rows {
                let r = first + j;
                let (id, lp) = match (next.row(r, vocab), next) {
                    // Read back (the CPU's rows, or a constrained sequence's): drawn here.
                    (Some(row), _) => {
                        let mut l = row.to_vec();
                        s.adjust(&mut l, tok, jv);
                        let id = draw::sample(s, &l);
                        (id, s.logprobs.map(|k| token_logprobs(row, id, k as usize)))
                    }
                    // Drawn on the device by the same rule ([`verify_rows`]).
                    (None, Next::Tokens(t)) => {
                        let Some(&id) = t.tokens.get(r) else {
                            break;
                        };
                        let lp = s
                            .logprobs
                            .and_then(|_| t.scored(r).filter(|lp| lp.id == id).cloned());
                        (id, lp)
                    }
                    (None, Next::Logits(_)) => break,
                };
                s.take(id, lp, tok);
                let agrees = draft.get(j) == Some(&id);
                kept += usize::from(agrees);
                end = emit(s, tok, id, &mut self.outbox);
                if end.is_some() || !agrees {
                    break;
                }
            }
            s.computed = s.tokens.len() - 1;
            // Counted before the usage goes out with its end.
            if let Some(p) = &mut s.prediction {
                p.settle(draft.len(), kept - before, self.limits.predict);
            }
            if let Some(reason) = end {
                close(s, reason, &self.stats, &mut self.outbox);
                finished.push(i);
            }
            // A step whose drafts all missed backs the next proposal off.
            if kept == before && !draft.is_empty() {
                s.draft_misses += 1;
                s.draft_wait = speculate::backoff(s.draft_misses);
            } else {
                s.draft_misses = 0;
            }
        }
        self.stats
            .draft_tokens_accepted
            .fetch_add(kept as u64, Ordering::Relaxed);
        finished
    }

    pub(super) fn publish(&self) {
        publish(&self.stats, &self.running, &self.waiting, &self.pool);
    }
}

/// The most drafts a sequence may propose this turn ([`Engine::drafting`]).
#[derive(Clone, Copy)]
struct Drafting {
    lookup: usize,
    predict: usize,
}

impl Drafting {
    /// For `s`: from its prediction, or by prompt lookup; 0: none.
    fn limit(self, s: &Seq) -> usize {
        match s.prediction {
            Some(_) => self.predict.max(self.lookup),
            None => self.lookup,
        }
    }
}

/// Ends `s` for `reason`: the text it held back and the log-probabilities not sent yet go
/// out, then its usage (counted in `stats`).
fn close(s: &mut Seq, reason: FinishReason, stats: &EngineStats, outbox: &mut Outbox) {
    let (tail, reasoning) = tail(s);
    let logprobs = std::mem::take(&mut s.pending_logprobs);
    if !tail.is_empty() || !logprobs.is_empty() {
        s.send(
            outbox,
            WorkerEvent::Delta {
                text: tail,
                tokens: 0,
                logprobs,
                reasoning,
            },
        );
    }
    let usage = s.usage();
    stats.count_prompt(&usage);
    s.send(
        outbox,
        WorkerEvent::Done {
            finish_reason: reason,
            usage,
        },
    );
}

/// A step's result: the next tokens (sampled by the backend) or the logits to sample.
pub(super) enum Next {
    Tokens(Sampled),
    Logits(Vec<f32>),
}

/// A step sampled on the device: its tokens, and what the host read back beside them
/// ([`wanted`]).
pub(super) struct Sampled {
    pub(super) tokens: Vec<u32>,
    /// Rows read back whole (the model's logits), and their logits.
    pub(super) rows: Vec<usize>,
    pub(super) logits: Vec<f32>,
    /// Rows scored on the device, and their log-probabilities.
    pub(super) scores: Vec<Score>,
    pub(super) scored: Vec<TokenLogprobs>,
    /// The rows the host draws again.
    pub(super) redraw: Vec<usize>,
}

impl Sampled {
    /// Logits row `row`, if it was read back.
    pub(super) fn row(&self, row: usize, vocab: usize) -> Option<&[f32]> {
        let at = self.rows.iter().position(|&r| r == row)?;
        self.logits.get(at * vocab..(at + 1) * vocab)
    }

    /// Row `row`'s log-probabilities computed on the device, if it was scored there.
    pub(super) fn scored(&self, row: usize) -> Option<&TokenLogprobs> {
        let at = self.scores.iter().position(|s| s.row == row)?;
        self.scored.get(at)
    }
}

impl Next {
    /// Logits row `row` of the step, if the host has it.
    pub(super) fn row(&self, row: usize, vocab: usize) -> Option<&[f32]> {
        match self {
            Next::Tokens(t) => t.row(row, vocab),
            Next::Logits(l) => l.get(row * vocab..(row + 1) * vocab),
        }
    }
}

fn publish(stats: &EngineStats, running: &[Seq], waiting: &VecDeque<Seq>, pools: &KvPools) {
    let pool = &pools.full;
    stats.running.store(running.len() as u64, Ordering::Relaxed);
    stats.waiting.store(waiting.len() as u64, Ordering::Relaxed);
    stats
        .kv_blocks_used
        .store((pool.total() - pool.free_count()) as u64, Ordering::Relaxed);
    stats
        .kv_blocks_cached
        .store(pool.cached_count() as u64, Ordering::Relaxed);
    let (used, total) = pools.window_use().unwrap_or((0, 0));
    stats
        .kv_window_blocks_used
        .store(used as u64, Ordering::Relaxed);
    stats
        .kv_window_blocks_total
        .store(total as u64, Ordering::Relaxed);
}
