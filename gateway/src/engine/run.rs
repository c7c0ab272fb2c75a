//! The engine thread's loop: take arrivals, drop cancelled sequences, plan a step with the
//! [`super::scheduler`], run it on the backend (sampling on the device where the backend
//! can), score prompts, draw and send each finished row's token, and free what finished.
//! A device fault fails the engine's sequences and builds its backend again ([`recover`]).

use super::blocks::{chain, BlockPool};
use super::draw;
use super::fair::Fair;
use super::outbox::Outbox;
use super::scheduler::{self, Limits, Schedulable};
use super::seq::{admit, emit, logprob_item, sample_params, NewSeq, Seq};
use super::{now_ms, EngineStats};
use crate::worker::{TokenLogprob, WorkerError, WorkerEvent};
use kernels::backend::Backend;
use kernels::cuda::twins::SampleParams;
use kernels::forward::{Batch, StepError};
use kernels::json_mode::JsonVocab;
use kernels::logprobs::token_logprobs;
use kernels::tokenizer::Tokenizer;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;

/// The engine thread's loop; returns when every submitter is gone.
pub(super) fn run_engine(
    mut backend: Box<dyn Backend>,
    mut rebuild: Rebuild,
    tok: Arc<Tokenizer>,
    rx: mpsc::Receiver<NewSeq>,
    limits: Limits,
    stats: Arc<EngineStats>,
    mut outbox: Outbox,
) {
    let vocab = backend.config().vocab;
    // JSON mode's view of the vocabulary, made on the first request that asks.
    let mut json_vocab: Option<JsonVocab> = None;
    let mut on_device = backend.samples_on_device();
    let mut pool = BlockPool::new(backend.kv_geometry().1, limits.prefix_caching);
    let mut running: Vec<Seq> = Vec::new();
    let mut waiting: VecDeque<Seq> = VecDeque::new();
    let mut fair = Fair::default();
    // A tenant back from idle is lifted to the least served tenant with work.
    let arrive = |n: NewSeq, fair: &mut Fair, running: &[Seq], waiting: &mut VecDeque<Seq>| {
        let backlogged = running.iter().chain(waiting.iter()).map(|s| &s.tenant);
        fair.arrive(&n.tenant, backlogged);
        waiting.push_back(admit(n));
    };
    loop {
        if running.is_empty() && waiting.is_empty() {
            fair.reset();
            match rx.recv() {
                Ok(n) => arrive(n, &mut fair, &running, &mut waiting),
                Err(_) => return,
            }
        }
        let t_loop = std::time::Instant::now();
        while let Ok(n) = rx.try_recv() {
            arrive(n, &mut fair, &running, &mut waiting);
        }
        // Cancelled: the client went away.
        let mut keep = |s: &mut Seq| {
            let gone = s.tx.is_closed();
            if gone {
                pool.release(&mut s.blocks);
            }
            !gone
        };
        running.retain_mut(&mut keep);
        waiting.retain_mut(&mut keep);
        let lim = Limits {
            max_logit_rows: backend.max_logit_rows(),
            ..limits
        };
        let plan = scheduler::schedule(&mut running, &mut waiting, &mut pool, lim, &mut fair);
        stats
            .preemptions
            .fetch_add(plan.preempted as u64, Ordering::Relaxed);
        if plan.items.is_empty() {
            publish(&stats, &running, &waiting, &pool);
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        }
        let mut batch = Batch::default();
        // Each logits row's sequence (by its index in `running`) when the row draws its
        // next token; `None` for a prompt's row that scores the prompt's next token.
        let mut row_seq: Vec<Option<usize>> = Vec::new();
        for &(i, n) in &plan.items {
            let s = &running[i];
            let end = s.computed + n;
            let k = s.logit_rows(n);
            batch.push_rows(&s.tokens[s.computed..end], s.computed, s.blocks.clone(), k);
            let draws = end == s.tokens.len();
            row_seq.extend((0..k).map(|j| (draws && j + 1 == k).then_some(i)));
        }
        let t_step = std::time::Instant::now();
        stats.step_since_ms.store(now_ms(), Ordering::Relaxed);
        let stepped = if on_device {
            let row_seqs: Vec<Option<&Seq>> =
                row_seq.iter().map(|r| r.map(|i| &running[i])).collect();
            let params: Vec<SampleParams> = row_seqs
                .iter()
                .map(|s| s.map_or(SampleParams::GREEDY, sample_params))
                .collect();
            // Rows whose token is drawn from adjusted logits (penalties, JSON mode) are
            // adjusted on the device as its room allows. Rows that want log-probabilities
            // (a prompt's rows among them), and adjusted ones past the room, get their
            // logits read back.
            let adjust = draw::adjustments(
                &row_seqs,
                backend.adjust_room(),
                vocab,
                &tok,
                &mut json_vocab,
            );
            let want: Vec<usize> = (0..row_seqs.len())
                .filter(|&r| match row_seqs[r] {
                    None => true,
                    Some(s) => {
                        s.logprobs.is_some()
                            || s.constrained() && adjust.get(r).is_none_or(Option::is_none)
                    }
                })
                .collect();
            stats
                .rows_adjusted_on_device
                .fetch_add(adjust.iter().flatten().count() as u64, Ordering::Relaxed);
            stats
                .rows_read_back
                .fetch_add(want.len() as u64, Ordering::Relaxed);
            backend.step_sample(&batch, &params, &adjust).and_then(|t| {
                let rows = if want.is_empty() {
                    Vec::new()
                } else {
                    backend.logits_rows(&want)?
                };
                Ok(Next::Tokens(t, want, rows))
            })
        } else {
            backend.step(&batch).map(Next::Logits)
        };
        stats.step_since_ms.store(0, Ordering::Relaxed);
        let backend_ns = t_step.elapsed().as_nanos() as u64;
        let rows = batch.n_logits();
        // A backend's answer is checked before any of it reaches a client: the right
        // number of rows, and token ids inside the vocabulary.
        let stepped = stepped.and_then(|next| {
            let bad = |m: String| Err(kernels::forward::StepError::Device(m));
            let got = match &next {
                Next::Tokens(t, ..) => t.len(),
                Next::Logits(l) => l.len() / vocab.max(1),
            };
            if got != rows {
                return bad(format!("the backend returned {got} rows for {rows}"));
            }
            if let Next::Tokens(t, want, logits) = &next {
                if logits.len() != want.len() * vocab {
                    return bad(format!(
                        "the backend returned {} floats for {} logits rows",
                        logits.len(),
                        want.len()
                    ));
                }
                if let Some(id) = t.iter().find(|&&id| id as usize >= vocab) {
                    return bad(format!(
                        "the backend sampled token {id}, past the vocabulary"
                    ));
                }
            }
            Ok(next)
        });
        let mut next = match stepped {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "engine step failed; failing its sequences");
                // Out of service before any client hears of the failure.
                let fault = match &e {
                    StepError::Device(why) => {
                        let why = format!("the engine's device failed ({why}); rebuilding it");
                        stats.faults.fetch_add(1, Ordering::Relaxed);
                        stats.set_fault(Some(why.clone()));
                        Some(why)
                    }
                    StepError::BadBatch(_) => None,
                };
                let mut failed: Vec<usize> = plan.items.iter().map(|&(i, _)| i).collect();
                failed.sort_unstable_by(|a, b| b.cmp(a));
                for i in failed {
                    let mut s = running.remove(i);
                    outbox.push(
                        &s.tx,
                        Err(WorkerError::Protocol(format!("engine step failed: {e}"))),
                    );
                    pool.release(&mut s.blocks);
                }
                outbox.flush();
                if let Some(why) = fault {
                    // The device is in doubt (a CUDA error is sticky: every later call
                    // fails too): nothing more runs on it. The engine's other sequences
                    // fail now (the gateway retries those that sent nothing yet on another
                    // worker), and the backend is built again from scratch.
                    for s in running.drain(..).chain(waiting.drain(..)) {
                        outbox.push(&s.tx, Err(WorkerError::Unreachable(why.clone())));
                    }
                    outbox.flush();
                    publish(&stats, &running, &waiting, &pool);
                    backend = match recover(backend, &mut rebuild, &rx, &mut outbox, &why) {
                        Some(b) => b,
                        None => return,
                    };
                    on_device = backend.samples_on_device();
                    pool = BlockPool::new(backend.kv_geometry().1, limits.prefix_caching);
                    fair.reset();
                    stats.set_fault(None);
                    publish(&stats, &running, &waiting, &pool);
                    tracing::info!(
                        backend = backend.name(),
                        "engine rebuilt after a device fault; serving again"
                    );
                }
                continue;
            }
        };
        stats.steps.fetch_add(1, Ordering::Relaxed);
        // Prompts scored this step: their rows' log-probabilities, before any token drawn.
        let mut row = 0;
        for (&(i, n), b) in plan.items.iter().zip(&batch.seqs) {
            let rows = row..row + b.logits;
            score_prompt(&mut running[i], n, rows, &next, vocab, &tok, &mut outbox);
            row += b.logits;
        }
        // Each sampled sequence's row of the step's answer; every such token drawn at once.
        let mut rows: Vec<Option<usize>> = vec![None; running.len()];
        for (row, i) in row_seq.iter().enumerate() {
            if let Some(i) = *i {
                rows[i] = Some(row);
            }
        }
        let mut drawn = draw::draw(&mut running, &rows, &mut next, vocab, &tok, &mut json_vocab);
        let mut finished = Vec::new();
        for &(i, n) in &plan.items {
            let s = &mut running[i];
            s.computed += n;
            // The blocks this step filled join the prefix cache.
            let full = s.computed / limits.block_size;
            if full > s.registered {
                let done = &s.tokens[..s.computed];
                chain(
                    pool.hasher(),
                    &s.tenant,
                    done,
                    limits.block_size,
                    &mut s.hashes,
                );
                let bs = limits.block_size;
                for b in s.registered..full {
                    let after = b.checked_sub(1).map(|p| s.hashes[p]);
                    let tokens = &s.tokens[b * bs..(b + 1) * bs];
                    pool.register(s.blocks[b], s.hashes[b], after, tokens, &s.tenant);
                }
                s.registered = full;
            }
            if s.computed != s.tokens.len() {
                continue;
            }
            let Some((id, lp)) = drawn.get_mut(i).and_then(Option::take) else {
                continue;
            };
            s.take(id, lp, &tok);
            if let Some(reason) = emit(s, &tok, id, &mut outbox) {
                let tail = s.out.finish();
                let logprobs = std::mem::take(&mut s.pending_logprobs);
                if !tail.is_empty() || !logprobs.is_empty() {
                    s.send(
                        &mut outbox,
                        WorkerEvent::Delta {
                            text: tail,
                            tokens: 0,
                            logprobs,
                        },
                    );
                }
                let usage = s.usage();
                stats
                    .prompt_tokens
                    .fetch_add(usage.prompt_tokens as u64, Ordering::Relaxed);
                stats
                    .cached_tokens
                    .fetch_add(usage.cached_tokens as u64, Ordering::Relaxed);
                s.send(
                    &mut outbox,
                    WorkerEvent::Done {
                        finish_reason: reason,
                        usage,
                    },
                );
                finished.push(i);
            }
        }
        finished.sort_unstable_by(|a, b| b.cmp(a));
        for i in finished {
            let mut s = running.remove(i);
            pool.release(&mut s.blocks);
        }
        outbox.flush();
        publish(&stats, &running, &waiting, &pool);
        let total = t_loop.elapsed().as_nanos() as u64;
        stats.backend_ns.fetch_add(backend_ns, Ordering::Relaxed);
        stats
            .host_ns
            .fetch_add(total.saturating_sub(backend_ns), Ordering::Relaxed);
    }
}

/// Builds the engine's backend again (after a device fault).
pub(super) type Rebuild = Box<dyn FnMut() -> Result<Box<dyn Backend>, String> + Send>;

/// After a device fault: drops the failed backend (its device memory and context with
/// it), then builds a new one until one passes its self-check, waiting 0.5 s, 1 s, 2 s, …
/// (at most 30 s) between tries. Requests that arrive meanwhile fail at once. `None` when
/// every submitter is gone.
fn recover(
    failed: Box<dyn Backend>,
    rebuild: &mut Rebuild,
    rx: &mpsc::Receiver<NewSeq>,
    outbox: &mut Outbox,
    why: &str,
) -> Option<Box<dyn Backend>> {
    // A library may panic tearing down after a device fault (cudarc unwraps
    // cublasDestroy's status): that must not end the engine thread.
    let teardown = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(failed)));
    if teardown.is_err() {
        tracing::error!("tearing down the failed backend panicked; building a new one anyway");
    }
    let mut wait = std::time::Duration::from_millis(500);
    for attempt in 1u32.. {
        match rebuild() {
            Ok(b) => return Some(b),
            Err(e) => {
                tracing::error!(attempt, error = %e, retry_in = ?wait, "rebuilding the engine's backend failed");
            }
        }
        let until = std::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(n) => {
                    outbox.push(&n.tx, Err(WorkerError::Unreachable(why.to_string())));
                    outbox.flush();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
        wait = (wait * 2).min(std::time::Duration::from_secs(30));
    }
    None
}

/// A step's result: the next tokens (sampled by the backend) or the logits to sample.
pub(super) enum Next {
    /// Sampled on the device; the rows whose log-probabilities are asked for, and their
    /// logits.
    Tokens(Vec<u32>, Vec<usize>, Vec<f32>),
    Logits(Vec<f32>),
}

impl Next {
    /// Logits row `row` of the step, if the host has it.
    pub(super) fn row(&self, row: usize, vocab: usize) -> Option<&[f32]> {
        match self {
            Next::Tokens(_, want, l) => read_back(want, l, row, vocab),
            Next::Logits(l) => l.get(row * vocab..(row + 1) * vocab),
        }
    }
}

/// Logits row `row` among `logits`, the rows `want` read back after sampling on the
/// device, if it is one of them.
pub(super) fn read_back<'a>(
    want: &[usize],
    logits: &'a [f32],
    row: usize,
    vocab: usize,
) -> Option<&'a [f32]> {
    let at = want.iter().position(|&r| r == row)?;
    logits.get(at * vocab..(at + 1) * vocab)
}

/// Scores `s`'s prompt tokens from the step's logits rows `rows` (the last rows of its `n`
/// tokens computed this step, if it is being scored): each row's logits give the next
/// row's token its log-probability. Once every prompt token is scored, sends them
/// ([`WorkerEvent::Prompt`], the first unscored).
fn score_prompt(
    s: &mut Seq,
    n: usize,
    rows: std::ops::Range<usize>,
    next: &Next,
    vocab: usize,
    tok: &Tokenizer,
    outbox: &mut Outbox,
) {
    let Some(mut want) = s.prompt_next else {
        return;
    };
    let top = s.logprobs.unwrap_or(0) as usize;
    let end = s.computed + n;
    for (j, row) in rows.clone().enumerate() {
        // Row `row` is position p; it scores token p + 1.
        let target = end - rows.len() + j + 1;
        if target != want || target >= s.prompt_len {
            continue;
        }
        let Some(raw) = next.row(row, vocab) else {
            continue;
        };
        let lp = token_logprobs(raw, s.tokens[target], top);
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

fn publish(stats: &EngineStats, running: &[Seq], waiting: &VecDeque<Seq>, pool: &BlockPool) {
    stats.running.store(running.len() as u64, Ordering::Relaxed);
    stats.waiting.store(waiting.len() as u64, Ordering::Relaxed);
    stats
        .kv_blocks_used
        .store((pool.total() - pool.free_count()) as u64, Ordering::Relaxed);
    stats
        .kv_blocks_cached
        .store(pool.cached_count() as u64, Ordering::Relaxed);
}
