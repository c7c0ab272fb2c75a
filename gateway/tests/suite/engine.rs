//! The in-process engine on the synthetic model: batching invariance (alone versus inside
//! a batch of 16 mixed-length sequences, with and without preemption), cancellation,
//! stop strings, seeds, context limits, and the fair share of batch slots between tenants
//! (virtual token counters, by weight).
//!
//! The batching and sampling tests run twice: on the CPU backend, and on the CUDA backend
//! over the CPU emulator (`backend = "emulator"`: the GPU path, with sampling on the
//! device, run by the kernel sources themselves on the CPU), and, where the driver sees a
//! GPU, on device 0 (`backend = "cuda"`; `common::gpu_paths`).

use crate::common;
use common::tempdir::TempDir;
use futures::StreamExt;
use gateway::config::{BackendKind, EngineConfig};
use gateway::engine::EngineWorker;
use gateway::worker::{
    FinishReason, OutputFormat, SamplingParams, Usage, Worker, WorkerError, WorkerEvent,
    WorkerRequest,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

fn synthetic() -> (TempDir, kernels::load::Loaded) {
    common::synthetic_model()
}

fn engine(loaded: &kernels::load::Loaded, cfg: EngineConfig) -> Arc<EngineWorker> {
    Arc::new(EngineWorker::start("test".into(), loaded, &cfg, 0).unwrap())
}

fn req(
    prompt: &str,
    max_tokens: u32,
    temperature: f32,
    seed: Option<u64>,
    stop: Vec<String>,
) -> Arc<WorkerRequest> {
    let mut r = (*common::worker_req(prompt, max_tokens)).clone();
    r.params = SamplingParams {
        temperature,
        seed,
        stop,
        ..r.params
    };
    Arc::new(r)
}

/// Runs a request to the end: (text, finish reason, usage.completion_tokens).
async fn run(w: &EngineWorker, r: Arc<WorkerRequest>) -> (String, FinishReason, u32) {
    let (text, reason, usage) = run_usage(w, r).await;
    (text, reason, usage.completion_tokens)
}

/// Runs a request to the end: (text, finish reason, usage).
async fn run_usage(w: &EngineWorker, r: Arc<WorkerRequest>) -> (String, FinishReason, Usage) {
    read_to_end(w.submit(r).await.unwrap()).await
}

/// Reads a request's events to the end: (text, finish reason, usage).
async fn read_to_end(mut s: gateway::worker::EventStream) -> (String, FinishReason, Usage) {
    let mut text = String::new();
    while let Some(ev) = s.next().await {
        match ev.unwrap() {
            WorkerEvent::Prompt { .. } | WorkerEvent::Embedding(_) => {}
            WorkerEvent::Delta { text: t, .. } => text.push_str(&t),
            WorkerEvent::Done {
                finish_reason,
                usage,
            } => return (text, finish_reason, usage),
        }
    }
    panic!("no Done event");
}

/// Each of [`prompts`] greedily for 24 tokens, all sent at once: their answers, in order.
/// All are submitted before any answer is read, so that the engine finds them waiting
/// together however busy the machine (tasks spawned to submit them could start late, one
/// after another finished, on a loaded machine).
async fn all_at_once(e: &Arc<EngineWorker>) -> Vec<(String, FinishReason, u32)> {
    let mut streams = Vec::new();
    for p in prompts() {
        streams.push(e.submit(req(&p, 24, 0.0, None, vec![])).await.unwrap());
    }
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|s| tokio::spawn(read_to_end(s)))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        let (text, reason, usage) = t.await.unwrap();
        out.push((text, reason, usage.completion_tokens));
    }
    out
}

fn prompts() -> Vec<String> {
    // 16 mixed lengths: about 10 to 300 tokens.
    (0..16)
        .map(|i| format!("{} seq{i}", "lorem ipsum dolor sit amet ".repeat(i + 1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn greedy_output_is_the_same_alone_and_in_a_batch_of_16_with_and_without_preemption() {
    batching_case(BackendKind::Cpu).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_gpu_path_greedy_output_is_the_same_alone_and_in_a_batch() {
    for backend in common::gpu_paths() {
        batching_case(backend).await;
    }
}

async fn batching_case(backend: BackendKind) {
    let (_d, m) = synthetic();
    let base = EngineConfig {
        backend,
        threads: 2,
        max_batch_tokens: Some(64),
        max_seqs: Some(16),
        ..EngineConfig::default()
    };
    let solo_engine = engine(&m, base.clone());
    let mut solo = Vec::new();
    for p in prompts() {
        solo.push(run(&solo_engine, req(&p, 24, 0.0, None, vec![])).await);
    }
    let distinct: std::collections::HashSet<_> = solo.iter().map(|s| &s.0).collect();
    assert!(
        distinct.len() >= 8,
        "the prompts should give varied outputs: {solo:?}"
    );
    for (label, cfg) in [
        ("batched", base.clone()),
        // 64 blocks of 16 tokens cannot hold 16 sequences of up to ~380 tokens at once.
        (
            "batched with preemption",
            EngineConfig {
                kv_tokens: Some(1024),
                prefix_caching: false,
                ..base.clone()
            },
        ),
        // The prompts share long prefixes: with the prefix cache they share blocks, and
        // half the cache still forces preemption.
        (
            "batched with preemption and prefix caching",
            EngineConfig {
                kv_tokens: Some(512),
                ..base.clone()
            },
        ),
    ] {
        let e = engine(&m, cfg);
        for (i, got) in all_at_once(&e).await.into_iter().enumerate() {
            assert_eq!(
                got, solo[i],
                "{label}: sequence {i} differs from its solo run"
            );
        }
        let pre = e.stats().preemptions.load(Ordering::Relaxed);
        if label.contains("preemption") {
            assert!(pre > 0, "the small cache should have forced preemption");
        } else {
            assert_eq!(pre, 0);
        }
        // Stats are published after each step, just after the last events went out.
        let mut freed = false;
        for _ in 0..200 {
            if e.stats().kv_blocks_used.load(Ordering::Relaxed) == 0 {
                freed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(freed, "{label}: finished sequences free their blocks");
        assert!(
            e.stats().steps.load(Ordering::Relaxed) < 16 * 30,
            "{label}: sequences were batched"
        );
    }
}

/// A prompt whose start an earlier request of the same tenant computed takes those
/// blocks from the prefix cache: the usage says how many tokens, and the answer is the
/// one computing them gives. Another tenant's identical prompt shares nothing.
#[tokio::test(flavor = "multi_thread")]
async fn the_prefix_cache_serves_a_tenants_repeated_prefix_and_changes_no_token() {
    let (_d, m) = synthetic();
    let cfg = EngineConfig {
        backend: BackendKind::Cpu,
        threads: 2,
        max_batch_tokens: Some(64),
        ..EngineConfig::default()
    };
    let e = engine(&m, cfg.clone());
    let system = "you are a helpful assistant who answers briefly. ".repeat(8);
    let ask = |tenant: &str, q: &str| {
        let mut r = (*req(&format!("{system}{q}"), 16, 0.0, None, vec![])).clone();
        r.tenant = tenant.into();
        Arc::new(r)
    };
    let first = run_usage(&e, ask("a", "what is one?")).await;
    assert_eq!(first.2.cached_tokens, 0, "nothing cached yet");
    let prompt = first.2.prompt_tokens;
    assert!(prompt > 100, "{prompt}");
    // The same prompt again: all its whole blocks but the one holding its last token.
    let again = run_usage(&e, ask("a", "what is one?")).await;
    assert_eq!(again.0, first.0, "the cached prefix gives the same answer");
    assert_eq!(again.2.cached_tokens, (prompt - 1) / 16 * 16);
    // Another question after the same system prompt: the shared whole blocks.
    let other = run_usage(&e, ask("a", "and what is two?")).await;
    assert!(other.2.cached_tokens > 0 && other.2.cached_tokens < prompt);
    let cold = engine(&m, cfg.clone());
    assert_eq!(
        run_usage(&cold, ask("a", "and what is two?")).await.0,
        other.0,
        "the answer does not depend on what was cached"
    );
    // Tenant b sends a's prompt: nothing is shared across tenants.
    let b = run_usage(&e, ask("b", "what is one?")).await;
    assert_eq!(b.2.cached_tokens, 0);
    assert_eq!(b.0, first.0);
    let c = e.engine_counters().unwrap();
    assert_eq!(
        c.cached_tokens,
        (again.2.cached_tokens + other.2.cached_tokens) as u64
    );
    // Three prompts of a's length on this engine (a twice, b once), and the other one.
    assert_eq!(
        c.prompt_tokens,
        3 * prompt as u64 + other.2.prompt_tokens as u64
    );
    // The blocks stay cached while nobody holds them (the gauge is published after each
    // step, just after its events went out).
    let want = ((prompt - 1) / 16) as u64;
    let mut held = 0;
    for _ in 0..200 {
        held = e.stats().kv_blocks_cached.load(Ordering::Relaxed);
        if held >= want && e.stats().kv_blocks_used.load(Ordering::Relaxed) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(held >= want, "{held} cached blocks, want at least {want}");
    assert_eq!(
        e.stats().kv_blocks_used.load(Ordering::Relaxed),
        0,
        "idle cached blocks count as free"
    );
    // Turned off: nothing is cached.
    let off = engine(
        &m,
        EngineConfig {
            prefix_caching: false,
            ..cfg
        },
    );
    run_usage(&off, ask("a", "what is one?")).await;
    assert_eq!(
        run_usage(&off, ask("a", "what is one?"))
            .await
            .2
            .cached_tokens,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn seeds_stops_limits_and_cancellation() {
    seeds_case(BackendKind::Cpu).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_gpu_path_seeds_stops_limits_and_cancellation() {
    for backend in common::gpu_paths() {
        seeds_case(backend).await;
    }
}

/// vLLM's `continue_final_message`: a chat whose final assistant message is left open is
/// the prompt its template writes up to that message's last character (no end of turn):
/// the same tokens and answer as a completion of that text.
#[tokio::test(flavor = "multi_thread")]
async fn a_final_assistant_message_left_open_is_continued() {
    let (_d, m) = synthetic();
    let e = engine(
        &m,
        EngineConfig {
            threads: 2,
            ..EngineConfig::default()
        },
    );
    let message = |role: &str, content: &str, open| gateway::worker::ChatMessage {
        role: role.into(),
        content: content.into(),
        open,
    };
    let mut chat = (*req("", 12, 0.0, None, vec![])).clone();
    chat.prompt = gateway::worker::Prompt::Chat(
        vec![
            message("user", "tell me a story", false),
            message("assistant", "Once upon", true),
        ],
        None,
    );
    let text = "<|im_start|>user\ntell me a story<|im_end|>\n<|im_start|>assistant\nOnce upon";
    let (got, _, got_usage) = run_usage(&e, Arc::new(chat.clone())).await;
    let (want, _, want_usage) = run_usage(&e, req(text, 12, 0.0, None, vec![])).await;
    assert_eq!(got, want);
    assert_eq!(got_usage.prompt_tokens, want_usage.prompt_tokens);
    // Closed, the same messages are another prompt: the turn ended, a new one opened.
    if let gateway::worker::Prompt::Chat(ms, _) = &mut chat.prompt {
        ms[1].open = false;
    }
    let (_, _, closed) = run_usage(&e, Arc::new(chat)).await;
    assert!(closed.prompt_tokens > got_usage.prompt_tokens, "{closed:?}");
}

/// vLLM's `skip_special_tokens`: a special token the model draws in its answer (one that
/// does not end it) has no text by default, and its own with `skip_special_tokens` false;
/// the tokens are counted either way.
#[tokio::test(flavor = "multi_thread")]
async fn special_tokens_have_no_text_unless_asked() {
    let (_d, m) = synthetic();
    let tok = m.tokenizer.clone();
    let special = (0..tok.vocab_size() as u32)
        .find(|&id| tok.is_control(id) && !tok.stop_tokens.contains(&id))
        .expect("a special token that ends nothing");
    let name = String::from_utf8(tok.token_bytes(special).to_vec()).unwrap();
    let e = engine(
        &m,
        EngineConfig {
            threads: 2,
            ..EngineConfig::default()
        },
    );
    let forced = |skip: bool| {
        let mut r = (*req("sampling test", 6, 0.0, None, vec![])).clone();
        r.params.logit_bias = vec![(special, 100.0)];
        r.params.skip_special_tokens = skip;
        Arc::new(r)
    };
    let (text, reason, n) = run(&e, forced(true)).await;
    assert_eq!((text.as_str(), reason, n), ("", FinishReason::Length, 6));
    let (text, _, n) = run(&e, forced(false)).await;
    assert_eq!((text, n), (name.repeat(6), 6));
}

async fn seeds_case(backend: BackendKind) {
    let (_d, m) = synthetic();
    let e = engine(
        &m,
        EngineConfig {
            backend,
            threads: 2,
            kv_tokens: Some(1024),
            ..EngineConfig::default()
        },
    );
    // Same seed, same sample; the length limit gives finish_reason "length".
    let a = run(&e, req("sampling test", 20, 1.0, Some(11), vec![])).await;
    let b = run(&e, req("sampling test", 20, 1.0, Some(11), vec![])).await;
    assert_eq!(a, b, "a seed makes sampling reproducible");
    let mut differs = false;
    for seed in 12..20 {
        differs |= run(&e, req("sampling test", 20, 1.0, Some(seed), vec![])).await != a;
    }
    assert!(differs, "different seeds give different samples");
    // top_k = 1 is greedy, whatever the temperature and seed.
    let greedy = run(&e, req("top-k test", 12, 0.0, None, vec![])).await;
    for seed in 0..4 {
        let mut r = (*req("top-k test", 12, 1.5, Some(seed), vec![])).clone();
        r.params.top_k = 1;
        assert_eq!(
            run(&e, Arc::new(r)).await,
            greedy,
            "top_k = 1 must be greedy"
        );
    }
    // A stop string taken from the greedy output cuts the text before it.
    let (full, _, n) = run(&e, req("stop test", 30, 0.0, None, vec![])).await;
    if n == 30 && full.chars().count() > 12 {
        let stop: String = full.chars().skip(8).take(3).collect();
        let (cut, reason, _) = run(&e, req("stop test", 30, 0.0, None, vec![stop.clone()])).await;
        assert_eq!(cut, full[..full.find(&stop).unwrap()], "stop {stop:?}");
        assert_eq!(reason, FinishReason::Stop);
        // vLLM's `include_stop_str_in_output`: the stop string met ends the text, kept in
        // it (another listed first, never met, changes nothing).
        let never = "\u{2603} never".to_string();
        let mut r = (*req("stop test", 30, 0.0, None, vec![never, stop.clone()])).clone();
        r.params.include_stop_str_in_output = true;
        let (kept, reason, _) = run(&e, Arc::new(r)).await;
        let end = full.find(&stop).unwrap() + stop.len();
        assert_eq!(kept, full[..end], "stop {stop:?} kept");
        assert_eq!(reason, FinishReason::Stop);
    }
    // vLLM's `truncate_prompt_tokens`: only the prompt's last k tokens are read, the
    // answer that of those tokens sent alone; more than the prompt has cuts nothing.
    let long = "one two three four five six seven eight nine ten eleven twelve";
    let ids = e
        .tokenize_prompt(&gateway::worker::Prompt::Text(long.into()))
        .expect("ids");
    for k in [5, ids.len() + 3] {
        let mut cut = (*req(long, 8, 0.0, None, vec![])).clone();
        cut.params.truncate_prompt_tokens = Some(k as u32);
        let mut alone = (*req("", 8, 0.0, None, vec![])).clone();
        alone.prompt = gateway::worker::Prompt::Tokens(ids[ids.len().saturating_sub(k)..].to_vec());
        let (text, _, usage) = run_usage(&e, Arc::new(cut)).await;
        assert_eq!(usage.prompt_tokens as usize, k.min(ids.len()), "k = {k}");
        assert_eq!(text, run(&e, Arc::new(alone)).await.0, "k = {k}");
    }
    // −1: as many as the context holds; with the answer the request is then too long,
    // as vLLM has it, and refused for it.
    let mut r = (*req(&"word ".repeat(3000), 4, 0.0, None, vec![])).clone();
    r.params.truncate_prompt_tokens = Some(gateway::worker::KEEP_CONTEXT);
    let context = e.max_context().expect("context");
    match e.submit(Arc::new(r)).await {
        Err(WorkerError::Rejected { message, .. }) => {
            let cut = format!("the prompt has {context} tokens");
            assert!(message.contains(&cut), "{message}")
        }
        other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
    }
    // Over the context: a 400 from the worker, before any generation.
    match e.submit(req("x", 5000, 0.0, None, vec![])).await {
        Err(WorkerError::Rejected {
            status: 400,
            message,
            code,
            ..
        }) => {
            assert!(message.contains("context"), "{message}");
            assert_eq!(code, Some(gateway::worker::CONTEXT_LENGTH_EXCEEDED));
        }
        other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
    }
    // Cancelling (dropping the stream) frees the sequence's blocks at once.
    let mut s = e
        .submit(req(&"long prompt ".repeat(20), 700, 0.0, None, vec![]))
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(matches!(
            s.next().await,
            Some(Ok(WorkerEvent::Delta { .. }))
        ));
    }
    let mut held = false;
    for _ in 0..200 {
        if e.stats().kv_blocks_used.load(Ordering::Relaxed) > 0 {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(held, "a running sequence holds KV blocks");
    drop(s);
    let mut freed = false;
    for _ in 0..200 {
        if e.stats().kv_blocks_used.load(Ordering::Relaxed) == 0
            && e.stats().running.load(Ordering::Relaxed) == 0
        {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(freed, "cancelled sequence still holds blocks");
}

/// On the GPU path each step is planned and sent while the one before runs, its drawn
/// tokens read on the device (`overlap_steps`): every answer (each event: text,
/// log-probabilities, a scored prompt's, usage) is the one steps taken one at a time give:
/// seeded samples, length limits of 1 to 23 tokens, a request with log-probabilities and
/// one scoring its prompt (their logits read back with the tokens), one with penalties
/// (whose steps wait for the one before), and in a cache small enough to force preemption.
/// Every event of a request, to its end.
async fn events(w: &EngineWorker, r: Arc<WorkerRequest>) -> Vec<WorkerEvent> {
    let mut s = w.submit(r).await.unwrap();
    let mut out = Vec::new();
    while let Some(ev) = s.next().await {
        let ev = ev.unwrap();
        let done = matches!(ev, WorkerEvent::Done { .. });
        out.push(ev);
        if done {
            return out;
        }
    }
    panic!("no Done event: {out:?}");
}

/// The events of `reqs`, all sent at once, each to its end (within two minutes).
async fn all_events(e: &Arc<EngineWorker>, reqs: &[Arc<WorkerRequest>]) -> Vec<Vec<WorkerEvent>> {
    let tasks: Vec<_> = reqs
        .iter()
        .map(|r| {
            let (e, r) = (e.clone(), r.clone());
            tokio::spawn(async move { events(&e, r).await })
        })
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        let done = tokio::time::timeout(Duration::from_secs(120), t).await;
        got.push(done.expect("an answer that never ended").unwrap());
    }
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_gpu_path_steps_planned_ahead_give_the_answers_of_steps_one_at_a_time() {
    let (_d, m) = synthetic();
    for backend in common::gpu_paths() {
        steps_planned_ahead_case(&m, backend).await;
    }
}

async fn steps_planned_ahead_case(m: &kernels::load::Loaded, backend: BackendKind) {
    let reqs: Vec<Arc<WorkerRequest>> = prompts()
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let t = if i % 3 == 0 { 0.0 } else { 0.9 };
            let mut r = (*req(&p, 1 + (i as u32 * 5) % 23, t, Some(i as u64), vec![])).clone();
            match i {
                5 => r.params.logprobs = Some(2),
                7 => {
                    r.params.logprobs = Some(1);
                    r.params.prompt_logprobs = true;
                }
                // Penalties drawn on the device, with steps planned ahead: each step counts
                // the token the step before drew there.
                2 => {
                    r.params.presence_penalty = 0.9;
                    r.params.frequency_penalty = 0.6;
                }
                3 => {
                    r.params.frequency_penalty = 1.7;
                    r.params.logit_bias = vec![(5, 1.5), (17, -2.0)];
                }
                11 => r.params.presence_penalty = -1.2,
                // JSON mode: each step's masks are sent once the step before is collected
                // (its forward pass runs meanwhile).
                4 => r.params.format = Some(OutputFormat::Object),
                12 => {
                    r.params.format = Some(OutputFormat::Object);
                    r.params.frequency_penalty = 0.8;
                }
                // With log-probabilities too: the device draws from an adjusted copy of the
                // row, and computes them from the model's own.
                9 => {
                    r.params.presence_penalty = 0.7;
                    r.params.logprobs = Some(1);
                }
                13 => {
                    r.params.format = Some(OutputFormat::Object);
                    r.params.logprobs = Some(3);
                }
                _ => {}
            }
            Arc::new(r)
        })
        .collect();
    for kv_tokens in [4096, 768] {
        let mut answers = Vec::new();
        let (mut ahead, mut steps) = (Vec::new(), Vec::new());
        for overlap_steps in [true, false] {
            let e = engine(
                m,
                EngineConfig {
                    backend,
                    max_batch_tokens: Some(64),
                    max_seqs: Some(16),
                    kv_tokens: Some(kv_tokens),
                    prefix_caching: false,
                    overlap_steps,
                    ..EngineConfig::default()
                },
            );
            answers.push(all_events(&e, &reqs).await);
            ahead.push(e.stats().steps_ahead.load(Ordering::Relaxed));
            steps.push(e.stats().steps.load(Ordering::Relaxed));
            let pre = e.stats().preemptions.load(Ordering::Relaxed);
            assert_eq!(
                pre > 0,
                kv_tokens < 1024,
                "kv {kv_tokens}: {pre} preemptions"
            );
        }
        // As text: a scored prompt's first token has no log-probability (NaN).
        for (i, (a, b)) in answers[0].iter().zip(&answers[1]).enumerate() {
            assert_eq!(
                format!("{a:?}"),
                format!("{b:?}"),
                "kv {kv_tokens}: request {i} differs with steps planned ahead"
            );
        }
        // Nothing here makes a step wait for the one before but preemption (a sequence
        // short of a block), and the engine running out of work.
        eprintln!(
            "kv {kv_tokens}: {} of {} steps planned ahead",
            ahead[0], steps[0]
        );
        let least = if kv_tokens < 1024 {
            1
        } else {
            steps[0] * 4 / 5
        };
        assert!(
            ahead[0] >= least,
            "kv {kv_tokens}: {} of {} steps planned ahead",
            ahead[0],
            steps[0]
        );
        assert_eq!(ahead[1], 0, "kv {kv_tokens}: overlap_steps = false");
    }
}

/// Rows whose adjustments do not fit a step's room (here a logit bias on every token of the
/// vocabulary, under frequency penalties) are read back and drawn on the host, and the
/// step after such a row waits for it. Three sequences start in one step: while all three
/// run, a step's room (19 rows of 578 words) holds two of their rows (4,098 words each);
/// then two rows fit when their input tokens are known, and one when they are still on the
/// device (6,147 words with the carry), so steps are in turn planned ahead and waited for.
/// The answers are those of steps one at a time, and every answer ends (the last step's
/// tokens reach their clients, also when that step was collected with nothing left to
/// plan: the last two end with a step planned ahead for one length, and after one for the
/// other).
#[tokio::test(flavor = "multi_thread")]
async fn on_the_gpu_path_rows_past_the_adjustments_room_are_drawn_on_the_host() {
    let (_d, m) = synthetic();
    let vocab = m.model.config.vocab as u32;
    for backend in common::gpu_paths() {
        for last in [12u32, 13] {
            rows_past_the_room_case(&m, backend, vocab, last).await;
        }
    }
}

async fn rows_past_the_room_case(
    m: &kernels::load::Loaded,
    backend: BackendKind,
    vocab: u32,
    last: u32,
) {
    let reqs: Vec<Arc<WorkerRequest>> = [4, last, last]
        .into_iter()
        .enumerate()
        .map(|(i, max_tokens)| {
            let mut r = (*req(&format!("ab{i}"), max_tokens, 0.8, Some(i as u64), vec![])).clone();
            r.params.logit_bias = (0..vocab)
                .map(|t| (t, ((t as usize * 7 + i) % 5) as f32 * 0.2))
                .collect();
            r.params.frequency_penalty = 0.5;
            Arc::new(r)
        })
        .collect();
    let mut answers = Vec::new();
    for overlap_steps in [true, false] {
        let e = engine(
            m,
            EngineConfig {
                backend,
                max_batch_tokens: Some(16),
                max_seqs: Some(3),
                overlap_steps,
                ..EngineConfig::default()
            },
        );
        let got = all_events(&e, &reqs).await;
        let stats = e.stats();
        let read_back = stats.rows_read_back.load(Ordering::Relaxed);
        assert!(
            read_back > 0,
            "overlap {overlap_steps}: no row was past the room"
        );
        let ahead = stats.steps_ahead.load(Ordering::Relaxed);
        assert_eq!(ahead > 0, overlap_steps, "{ahead} steps planned ahead");
        answers.push(got);
    }
    for (i, (a, b)) in answers[0].iter().zip(&answers[1]).enumerate() {
        assert_eq!(
            format!("{a:?}"),
            format!("{b:?}"),
            "{last} tokens: request {i} differs with steps planned ahead"
        );
    }
}

/// `gateway worker` serves the engine over the OpenAI API; a gateway routes to it as an
/// `openai` worker with the shared secret, and passes its tenant along.
#[tokio::test(flavor = "multi_thread")]
async fn remote_worker_mode_behind_a_gateway() {
    use common::*;
    let (_dir, model) = synthetic_model_file();
    let worker = remote_worker(&model);
    // Without the secret: 401.
    let r = client()
        .get(worker.url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let gw = Gateway::start(&config(
        &remote_upstream(&worker),
        "tokens_per_second = 500.0",
        "",
    ));
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"temperature":0,"stream":true,"stream_options":{"include_usage":true}}"#;
    let events = sse_events(post(&gw, "/v1/chat/completions", body).await).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(
        usage["usage"]["prompt_tokens"].as_u64().unwrap() > 5,
        "the worker counts the chat template"
    );
    // The worker attributes the request to the gateway's tenant, and reports its KV cache.
    let m = worker.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"tollgate_requests_total{tenant="demo",model="m",status="200"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        m.contains("tollgate_worker_kv_blocks_free{pool=\"worker\""),
        "{m}"
    );
    // And its engine's counters: the steps it ran (one per generated token at least), no
    // device fault, time in and around the backend.
    let engine = |name: &str| {
        let series = m
            .lines()
            .find(|l| l.starts_with(&format!("{name}_total{{pool=\"worker\"")))
            .unwrap_or_else(|| panic!("no {name} in {m}"));
        series.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
    };
    let generated = usage["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(generated > 0);
    assert!(engine("tollgate_engine_steps") >= generated as f64, "{m}");
    assert_eq!(engine("tollgate_engine_device_faults"), 0.0);
    assert_eq!(engine("tollgate_engine_preemptions"), 0.0);
    assert!(engine("tollgate_engine_backend_seconds") > 0.0, "{m}");
    assert!(engine("tollgate_engine_host_seconds") > 0.0, "{m}");
    // The request's prompt blocks stay in its prefix cache.
    assert!(
        m.contains("tollgate_engine_kv_blocks_cached{pool=\"worker\""),
        "{m}"
    );
    // A prediction passes on to the worker, which drafts from it; its counts come back.
    let chat = |prediction: &str| {
        let mut body = serde_json::json!({"model": "m", "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "user", "content": "say something"}]});
        if !prediction.is_empty() {
            body["prediction"] = serde_json::json!({"type": "content", "content": prediction});
        }
        let gw = &gw;
        async move {
            let r = post(gw, "/v1/chat/completions", &body.to_string()).await;
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    let plain = chat("").await;
    let answer = plain["choices"][0]["message"]["content"].as_str().unwrap();
    let predicted = chat(answer).await;
    assert_eq!(predicted["choices"], plain["choices"]);
    let details = &predicted["usage"]["completion_tokens_details"];
    assert!(
        details["accepted_prediction_tokens"].as_u64().unwrap() > 0,
        "{predicted}"
    );
    assert_eq!(
        plain["usage"]["completion_tokens_details"]["accepted_prediction_tokens"],
        0
    );
    // Embeddings through the worker's engine: the gateway passes its vectors on.
    let v: serde_json::Value = post(
        &gw,
        "/v1/embeddings",
        r#"{"model":"m","input":["hi","hi"]}"#,
    )
    .await
    .json()
    .await
    .expect("JSON");
    let e = |i: usize| {
        v["data"][i]["embedding"]
            .as_array()
            .expect("floats")
            .clone()
    };
    let norm: f64 = e(0)
        .iter()
        .map(|x| x.as_f64().expect("a float").powi(2))
        .sum();
    assert!((norm.sqrt() - 1.0).abs() < 1e-4, "{v}");
    assert_eq!(e(0), e(1), "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64() > Some(0), "{v}");
}

fn tenant_req(tenant: &str, weight: Option<f64>) -> Arc<WorkerRequest> {
    tenant_req_of(tenant, weight, 24)
}

fn tenant_req_of(tenant: &str, weight: Option<f64>, max_tokens: u32) -> Arc<WorkerRequest> {
    let mut r = (*req("fair share", max_tokens, 0.0, None, vec![])).clone();
    r.tenant = tenant.into();
    r.weight = weight;
    Arc::new(r)
}

/// Runs every request at once (in this order); returns the tenants in completion order.
async fn completion_order(e: &Arc<EngineWorker>, reqs: Vec<Arc<WorkerRequest>>) -> Vec<String> {
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|r| {
            let (e, order) = (e.clone(), order.clone());
            tokio::spawn(async move {
                let tenant = r.tenant.to_string();
                run(&e, r).await;
                order.lock().unwrap().push(tenant);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let v = order.lock().unwrap().clone();
    v
}

fn fair_engine(m: &kernels::load::Loaded) -> Arc<EngineWorker> {
    engine(
        m,
        EngineConfig {
            threads: 2,
            max_seqs: Some(2),
            ..EngineConfig::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_arriving_behind_a_backlog_gets_the_next_free_slots() {
    let (_d, m) = synthetic();
    let e = fair_engine(&m);
    // Tenant a fills both slots and queues 6 more; then b asks for 2.
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    // Long enough answers (160 tokens) that b's requests reach the engine before a's
    // running ones finish, also on a loaded machine.
    let spawn = |tenant: &'static str, tasks: &mut Vec<_>| {
        let (e, order) = (e.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            run(&e, tenant_req_of(tenant, None, 160)).await;
            order.lock().unwrap().push(tenant);
        }));
    };
    for _ in 0..8 {
        spawn("a", &mut tasks);
    }
    let mut queued = false;
    for _ in 0..500 {
        let s = e.stats();
        if s.running.load(Ordering::Relaxed) == 2 && s.waiting.load(Ordering::Relaxed) == 6 {
            queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(queued, "a's requests should be running and queued");
    for _ in 0..2 {
        spawn("b", &mut tasks);
    }
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    // First come first served would finish b's two last (9th and 10th); by virtual token
    // counters b takes the next free slots, behind only what was running.
    let last_b = order.iter().rposition(|t| *t == "b").unwrap();
    assert!(
        last_b < 4,
        "b's requests should finish among the first 4: {order:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slots_are_shared_by_weight_while_both_tenants_wait() {
    let (_d, m) = synthetic();
    let e = fair_engine(&m);
    // a queued first, 12 each; b bought three times a's rate.
    let mut reqs: Vec<_> = (0..12).map(|_| tenant_req("a", Some(100.0))).collect();
    reqs.extend((0..12).map(|_| tenant_req("b", Some(300.0))));
    let order = completion_order(&e, reqs).await;
    let b_first_12 = order[..12].iter().filter(|t| *t == "b").count();
    // By weight, b gets about 3 of every 4 slots (9 of 12); first come first served: 0.
    assert!(
        (7..=11).contains(&b_first_12),
        "b finished {b_first_12} of the first 12: {order:?}"
    );
    // Equal weights: an even share.
    let mut reqs: Vec<_> = (0..12).map(|_| tenant_req("a", Some(100.0))).collect();
    reqs.extend((0..12).map(|_| tenant_req("b", Some(100.0))));
    let order = completion_order(&e, reqs).await;
    let b_first_12 = order[..12].iter().filter(|t| *t == "b").count();
    assert!(
        (4..=8).contains(&b_first_12),
        "b finished {b_first_12} of the first 12: {order:?}"
    );
}

/// Lowest-weight work (batches, spot) beside interactive work with `lowest_weight_rows`
/// = 1: the held-back sequences keep their place and KV blocks, the interactive ones
/// finish first, and every answer is token for token the one it gets alone.
#[tokio::test(flavor = "multi_thread")]
async fn held_back_lowest_weight_sequences_answer_as_they_would_alone() {
    let (_d, m) = synthetic();
    let e = engine(
        &m,
        EngineConfig {
            threads: 2,
            lowest_weight_rows: Some(1),
            ..EngineConfig::default()
        },
    );
    let ask = |i: usize, low: bool| {
        // The batch's answers longer, so that it is still running when the others come.
        let n = if low { 120 } else { 40 };
        let mut r = (*req(&format!("request number {i} asks"), n, 0.0, None, vec![])).clone();
        r.tenant = "a".into();
        r.weight = low.then_some(gateway::worker::LOWEST_WEIGHT);
        Arc::new(r)
    };
    let plan: Vec<bool> = vec![true, true, true, true, false, false];
    let mut alone = Vec::new();
    for (i, &low) in plan.iter().enumerate() {
        alone.push(run(&e, ask(i, low)).await.0);
    }
    // The batch's four first, then the two interactive ones, all at once.
    let done = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, &low) in plan.iter().enumerate() {
        let (w, done, r) = (e.clone(), done.clone(), ask(i, low));
        tasks.push(tokio::spawn(async move {
            let text = run(&w, r).await.0;
            done.lock().unwrap().push((i, low, text));
        }));
        if i == 3 {
            // The batch is running before the interactive ones arrive.
            for _ in 0..500 {
                if e.stats().running.load(Ordering::Relaxed) == 4 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let done = done.lock().unwrap().clone();
    for (i, _, text) in &done {
        assert_eq!(text, &alone[*i], "request {i}");
    }
    // One batch row a step beside them: the interactive ones finish before at least three
    // of the batch's four.
    let order: Vec<bool> = done.iter().map(|(_, low, _)| *low).collect();
    let last_interactive = order
        .iter()
        .rposition(|low| !low)
        .expect("interactive ones");
    assert!(
        last_interactive <= 2,
        "completion order (true: batch): {order:?}"
    );
    let counters = e.engine_counters().expect("an engine's counters");
    assert!(counters.rows_held > 0, "held rows are counted");
}

/// A pool of two engines (as `devices = [0, 1]` makes on two GPUs): a tenant's prompts
/// that start alike go to the same one, whose prefix cache then serves them, while prompts
/// that start otherwise spread over both.
#[tokio::test(flavor = "multi_thread")]
async fn a_pool_of_engines_sends_prompts_that_start_alike_to_the_same_one() {
    use common::*;
    let dir = TempDir::new();
    let model = dir.0.join("synthetic.gguf");
    kernels::synth::write_model(&model, &kernels::synth::SynthSpec::tiny()).unwrap();
    let engine = r#"{ kind = "engine", backend = "cpu", threads = 1, kv_tokens = 4096 }"#;
    let workers = format!("{engine}, {engine}");
    let tenant = "tokens_per_second = 100000.0";
    let gw = Gateway::start(&engine_pool_config(&model, "", &workers, tenant));
    let system = "the instructions every request of this application starts with. ".repeat(6);
    let ask = |q: String| {
        serde_json::json!({"model": "m", "prompt": format!("{system}{q}"), "max_tokens": 2})
            .to_string()
    };
    for i in 0..6 {
        let r = post(&gw, "/v1/completions", &ask(format!("question {i}"))).await;
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        if i == 0 {
            assert_eq!(cached, 0);
        } else {
            assert!(cached >= 64, "request {i}: {cached} cached tokens");
        }
    }
    // Short prompts that differ at once spread over both engines.
    for i in 0..24 {
        let r = post(&gw, "/v1/completions", &ask_short(i)).await;
        assert_eq!(r.status(), 200);
    }
    let m = gw.metrics().await;
    let steps: Vec<f64> = m
        .lines()
        .filter(|l| l.starts_with("tollgate_engine_steps_total{pool=\"p\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(steps.len(), 2, "{m}");
    assert!(
        steps.iter().all(|&s| s > 0.0),
        "both engines served: {steps:?}"
    );
}

fn ask_short(i: u32) -> String {
    serde_json::json!({"model": "m", "prompt": format!("{i} short"), "max_tokens": 2}).to_string()
}

/// A mixture of experts (a Qwen3-MoE-shaped synthetic file: 2 of 4 experts a token) on
/// the CPU backend and on the GPU path (emulated: decode steps replayed from captured
/// graphs, batches padded to their bucket): each sequence's greedy tokens are the same
/// alone and inside a batch of 8 (an expert's rows are gathered from whichever sequences
/// chose it, and a row's output does not depend on the rows beside it).
#[tokio::test(flavor = "multi_thread")]
async fn a_mixture_of_experts_answers_alike_alone_and_in_a_batch_on_either_backend() {
    use kernels::synth::{SynthArch, SynthSpec};
    let dir = TempDir::new();
    let path = dir.0.join("moe.gguf");
    let spec = SynthSpec {
        arch: SynthArch::Qwen3Moe,
        ..SynthSpec::tiny()
    };
    kernels::synth::write_model(&path, &spec).unwrap();
    let loaded = kernels::load::load(&path).unwrap();
    let cpu = EngineConfig {
        backend: BackendKind::Cpu,
        threads: 2,
        ..EngineConfig::default()
    };
    let mut configs = vec![cpu.clone()];
    for backend in common::gpu_paths() {
        configs.push(EngineConfig {
            backend,
            ..cpu.clone()
        });
    }
    let prompts: Vec<String> = prompts().into_iter().take(8).collect();
    for config in configs {
        let w = engine(&loaded, config.clone());
        let mut alone = Vec::new();
        for p in &prompts {
            alone.push(run(&w, req(p, 12, 0.0, None, vec![])).await);
        }
        let together = futures::future::join_all(
            prompts
                .iter()
                .map(|p| run(&w, req(p, 12, 0.0, None, vec![]))),
        )
        .await;
        assert_eq!(alone, together, "{:?}", config.backend);
        assert!(alone.iter().all(|(_, _, n)| *n == 12));
    }
}

/// Speculative decoding by prompt lookup (`speculative_tokens`, the CPU backend): every
/// answer (each event: text, log-probabilities, usage) is the one the engine gives without
/// it — greedy and seeded samples, a stop string met inside a step's drafts, length limits
/// that end a step's drafts early, log-probabilities, penalties, JSON mode — alone, and two
/// at once (one speculating alone until the other arrives, then neither); and drafts were
/// proposed and kept (the prompts repeat themselves, as the synthetic model's answers do),
/// and some not (answers that leave their loop: a growing penalty, a sample). Each
/// engine's prefix cache serves the repeats (what speculating sequences registered among
/// them), so the prompt tokens it served are left out of the comparison.
#[tokio::test(flavor = "multi_thread")]
async fn speculative_decoding_changes_no_answer() {
    let (_d, m) = synthetic();
    speculation_case(&m, None, BackendKind::Cpu).await;
}

/// The same on the GPU path (the emulator, and a real GPU where there is one), against an engine that plans its steps ahead:
/// drafts' rows drawn on the device by each sequence's rule at the step each would be
/// drawn at (log-probabilities computed there), a penalized or JSON-mode sequence's rows
/// read back and drawn on the host; the step in flight collected before a sequence due to
/// propose looks up its last token.
#[tokio::test(flavor = "multi_thread")]
async fn on_the_gpu_path_speculative_decoding_changes_no_answer() {
    let (_d, m) = synthetic();
    for backend in common::gpu_paths() {
        speculation_case(&m, None, backend).await;
    }
}

/// On the GPU path, where each step is planned while the one before runs, a sequence due
/// to look for drafts has the step in flight collected first; one whose look finds nothing
/// backs off as after a miss, so an answer that never repeats itself keeps most of its
/// steps planned ahead (looking every step would plan none ahead).
#[tokio::test(flavor = "multi_thread")]
async fn on_the_gpu_path_a_sequence_that_finds_no_drafts_keeps_its_steps_planned_ahead() {
    let (_d, m) = synthetic();
    for backend in common::gpu_paths() {
        no_drafts_case(&m, backend).await;
    }
}

async fn no_drafts_case(m: &kernels::load::Loaded, backend: BackendKind) {
    let w = engine(
        m,
        EngineConfig {
            backend,
            speculative_tokens: 4,
            ..EngineConfig::default()
        },
    );
    // A sample over the whole vocabulary: its pairs of tokens seldom come again.
    let (_, _, n) = run(&w, req("The history of the city", 64, 1.0, Some(3), vec![])).await;
    let st = w.stats();
    let (steps, ahead) = (
        st.steps.load(std::sync::atomic::Ordering::Relaxed),
        st.steps_ahead.load(std::sync::atomic::Ordering::Relaxed),
    );
    let c = w.engine_counters().expect("counters");
    eprintln!(
        "{n} tokens, {steps} steps, {ahead} planned ahead, drafts {} kept {}",
        c.draft_tokens, c.draft_tokens_accepted
    );
    assert!(n >= 32, "a short answer: {n} tokens");
    assert!(
        2 * ahead > steps,
        "{ahead} of {steps} steps planned ahead: {c:?}"
    );
}

/// Predicted outputs (`prediction`): a request's answer, each of its events, is the one it
/// gets without a prediction, whether the prediction is that answer, that answer edited in
/// its middle, or unrelated text — greedy and seeded samples, log-probabilities,
/// penalties, JSON mode, a stop string — and the usage counts the prediction's drafts
/// kept and not kept. An engine that takes predictions without drafting from them
/// (`prediction_tokens = 0`) counts none; the one that drafts takes fewer steps.
async fn prediction_case(m: &kernels::load::Loaded, backend: BackendKind) {
    // The usage without the prefix cache's share (repeats are served from it) and with the
    // prediction's counts taken out, which it returns.
    let split = |mut evs: Vec<WorkerEvent>| {
        let mut counts = (0, 0);
        for e in &mut evs {
            if let WorkerEvent::Done { usage, .. } = e {
                usage.cached_tokens = 0;
                counts = (
                    usage.accepted_prediction_tokens,
                    usage.rejected_prediction_tokens,
                );
                (
                    usage.accepted_prediction_tokens,
                    usage.rejected_prediction_tokens,
                ) = (0, 0);
            }
        }
        (evs, counts)
    };
    let base = compared(backend);
    let plain = engine(
        m,
        EngineConfig {
            prediction_tokens: 0,
            ..base.clone()
        },
    );
    let predicting = engine(m, base);
    let mut reqs = Vec::new();
    for i in 0..6 {
        let (temperature, seed) = if i % 2 == 0 {
            (0.0, None)
        } else {
            (1.0, Some(i as u64))
        };
        let prompt = format!("Rewrite the list {i}: alpha beta gamma delta epsilon");
        let mut r = (*req(&prompt, 48, temperature, seed, vec![])).clone();
        match i {
            2 => r.params.logprobs = Some(2),
            3 => r.params.frequency_penalty = 0.5,
            5 => r.params.format = Some(OutputFormat::Object),
            _ => {}
        }
        reqs.push(r);
    }
    // A stop string met inside the answer.
    let first = text(&events(&plain, Arc::new(reqs[0].clone())).await);
    let mut r = reqs[0].clone();
    r.params.stop = vec![first
        .chars()
        .skip(first.chars().count() / 2)
        .take(3)
        .collect()];
    reqs.push(r);
    let steps = |e: &EngineWorker| e.engine_counters().expect("counters").steps;
    let (mut accepted, mut rejected, mut plain_steps) = (0, 0, 0);
    let mut exact = Vec::new();
    for r in &reqs {
        let (want, _) = split(events(&plain, Arc::new(r.clone())).await);
        let answer = text(&want);
        let chars: Vec<char> = answer.chars().collect();
        let half = chars.len() / 2;
        let edited: String = chars[..half]
            .iter()
            .chain(" an edit here ".chars().collect::<Vec<_>>().iter())
            .chain(chars[(half + 6).min(chars.len())..].iter())
            .collect();
        let mut e = r.clone();
        e.params.prediction = Some(answer.as_str().into());
        exact.push(Arc::new(e));
        for prediction in [answer.clone(), edited, "unrelated words entirely".into()] {
            let mut with = r.clone();
            with.params.prediction = Some(prediction.as_str().into());
            let with = Arc::new(with);
            let (got, counts) = split(events(&predicting, with.clone()).await);
            assert_eq!(got, want, "{backend:?}: prediction {prediction:?}: {r:?}");
            accepted += counts.0;
            rejected += counts.1;
            let before = steps(&plain);
            let (got, counts) = split(events(&plain, with).await);
            plain_steps += steps(&plain) - before;
            assert_eq!(got, want, "{backend:?}, taken and not drafted from");
            assert_eq!(counts, (0, 0), "not drafted from, not counted");
        }
    }
    let c = predicting.engine_counters().expect("counters");
    eprintln!(
        "{backend:?}: prediction tokens kept {accepted}, not kept {rejected}; steps {} against {plain_steps}",
        c.steps
    );
    // Two greedy requests at once, each predicting its answer: the same answers. On the
    // CPU each drafts beside the other; where steps are planned ahead, only alone.
    let pair = [exact[0].clone(), exact[2].clone()];
    let mut pair_steps = Vec::new();
    let mut answers = Vec::new();
    for e in [&plain, &predicting] {
        let before = steps(e);
        let got = all_events(e, &pair).await;
        pair_steps.push(steps(e) - before);
        answers.push(got.into_iter().map(|evs| split(evs).0).collect::<Vec<_>>());
    }
    assert_eq!(answers[1], answers[0], "{backend:?}, two at once");
    eprintln!(
        "two at once: {} steps, {} without drafts",
        pair_steps[1], pair_steps[0]
    );
    if backend == BackendKind::Cpu {
        assert!(
            pair_steps[1] < pair_steps[0],
            "no step saved two at once: {pair_steps:?}"
        );
    }
    assert!(
        accepted > 0 && rejected > 0,
        "{accepted} kept, {rejected} not"
    );
    assert_eq!(
        u64::from(accepted),
        c.draft_tokens_accepted,
        "every draft kept is the prediction's"
    );
    assert!(
        c.steps < plain_steps,
        "{} steps against {plain_steps}: {c:?}",
        c.steps
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prediction_changes_no_answer_and_saves_steps() {
    let (_d, m) = synthetic();
    prediction_case(&m, BackendKind::Cpu).await;
}

/// The same on the GPU path (the emulator, and a real GPU where there is one): a prediction's drafts drawn on the device.
#[tokio::test(flavor = "multi_thread")]
async fn on_the_gpu_path_a_prediction_changes_no_answer_and_saves_steps() {
    let (_d, m) = synthetic();
    for backend in common::gpu_paths() {
        prediction_case(&m, backend).await;
    }
}

/// vLLM's `ignore_eos`, `min_tokens` and `stop_token_ids`. With the end of sequence pushed
/// up (`logit_bias` +100: every greedy draw would be it) an answer ends at once; with
/// `ignore_eos` it runs to `max_tokens`, its end-of-sequence tokens generated without
/// text; with `min_tokens` its first that many are other tokens, and the next ends it. A
/// token pushed up likewise runs to `max_tokens`, and named in `stop_token_ids` ends the
/// answer after its text (after `min_tokens` others, with them).
async fn stop_controls_case(m: &kernels::load::Loaded, backend: BackendKind) {
    let w = engine(
        m,
        EngineConfig {
            backend,
            ..EngineConfig::default()
        },
    );
    let tok = &m.tokenizer;
    let eos = tok.stop_tokens[0];
    let x = tok.encode(" hello").expect("tokens")[0];
    let x_text = String::from_utf8_lossy(tok.token_bytes(x)).into_owned();
    let ask = |id: u32, ignore_eos: bool, min_tokens: u32, stop_ids: Vec<u32>| {
        let mut r = (*req("Tell me a story", 12, 0.0, None, vec![])).clone();
        r.params.logit_bias = vec![(id, 100.0)];
        (
            r.params.ignore_eos,
            r.params.min_tokens,
            r.params.stop_token_ids,
        ) = (ignore_eos, min_tokens, stop_ids);
        let w = w.clone();
        async move {
            let (text, reason, usage) = run_usage(&w, Arc::new(r)).await;
            (text, reason, usage.completion_tokens)
        }
    };
    use FinishReason::{Length, Stop};
    let s = String::new;
    assert_eq!(
        ask(eos, false, 0, vec![]).await,
        (s(), Stop, 1),
        "{backend:?}"
    );
    assert_eq!(
        ask(eos, true, 0, vec![]).await,
        (s(), Length, 12),
        "ignore_eos"
    );
    let (text, reason, n) = ask(eos, false, 5, vec![]).await;
    assert_eq!((reason, n), (Stop, 6), "min_tokens: {text:?}");
    assert!(!text.is_empty());
    assert_eq!(
        ask(eos, true, 0, vec![eos]).await,
        (s(), Stop, 1),
        "ignored, then named"
    );
    assert_eq!(
        ask(x, false, 0, vec![]).await,
        (x_text.repeat(12), Length, 12)
    );
    assert_eq!(ask(x, false, 0, vec![x]).await, (x_text.clone(), Stop, 1));
    let (text, reason, n) = ask(x, false, 3, vec![x]).await;
    assert_eq!(
        (reason, n),
        (Stop, 4),
        "min_tokens, then the stop token: {text:?}"
    );
    assert!(
        text.ends_with(&x_text) && text.len() > x_text.len(),
        "{text:?}"
    );
    // With nothing else adjusting its draws: the first token of its greedy answer, named
    // in `stop_token_ids`, ends it at once; with `min_tokens` it is held back (masked)
    // for the first three.
    let mut r = (*req("Tell me a story", 12, 0.0, None, vec![])).clone();
    r.params.logprobs = Some(0);
    let first = events(&w, Arc::new(r.clone()))
        .await
        .into_iter()
        .find_map(|e| match e {
            WorkerEvent::Delta { logprobs, .. } => logprobs.first().map(|l| l.bytes.clone()),
            _ => None,
        });
    let first = first.expect("a first token");
    let t = (0..tok.vocab_size() as u32)
        .find(|&id| tok.token_bytes(id) == first.as_slice())
        .expect("its id");
    r.params.logprobs = None;
    r.params.stop_token_ids = vec![t];
    let (_, reason, usage) = run_usage(&w, Arc::new(r.clone())).await;
    assert_eq!((reason, usage.completion_tokens), (Stop, 1));
    r.params.min_tokens = 3;
    let (text, _, usage) = run_usage(&w, Arc::new(r)).await;
    assert!(
        usage.completion_tokens >= 4,
        "{backend:?}: {text:?} in {usage:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ignore_eos_min_tokens_and_stop_token_ids() {
    let (_d, m) = synthetic();
    stop_controls_case(&m, BackendKind::Cpu).await;
}

/// The same on the GPU path (the emulator, and a real GPU where there is one): the tokens held back before `min_tokens` are
/// masked on the device, as JSON mode's are.
#[tokio::test(flavor = "multi_thread")]
async fn on_the_gpu_path_ignore_eos_min_tokens_and_stop_token_ids() {
    let (_d, m) = synthetic();
    for backend in common::gpu_paths() {
        stop_controls_case(&m, backend).await;
    }
}

/// The same on a model with sliding-window layers: speculation over the windowed layers'
/// own pool (20 blocks: drafts' rows and rewinds as blocks go back) against the engine
/// without either (every position kept on every layer).
#[tokio::test(flavor = "multi_thread")]
async fn speculative_decoding_over_the_windowed_layers_pool_changes_no_answer() {
    let (_d, m) = windowed_model(24);
    speculation_case(&m, Some(320), BackendKind::Cpu).await;
}

/// The engines' settings the speculation and prediction cases compare, but for drafts.
fn compared(backend: BackendKind) -> EngineConfig {
    EngineConfig {
        backend,
        threads: 2,
        kv_tokens: Some(4096),
        ..EngineConfig::default()
    }
}

/// The text of an answer's events.
fn text(evs: &[WorkerEvent]) -> String {
    evs.iter()
        .filter_map(|e| match e {
            WorkerEvent::Delta { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

/// Requests alone and two at once, on a plain engine and one that speculates (with the
/// windowed layers' own pool of `window_kv_tokens`, where given: the plain one keeps every
/// position then): the same events.
async fn speculation_case(
    m: &kernels::load::Loaded,
    window_kv_tokens: Option<usize>,
    backend: BackendKind,
) {
    let uncached = |mut evs: Vec<WorkerEvent>| {
        for e in &mut evs {
            if let WorkerEvent::Done { usage, .. } = e {
                usage.cached_tokens = 0;
            }
        }
        evs
    };
    let base = compared(backend);
    let plain = engine(
        m,
        EngineConfig {
            window_kv_tokens: window_kv_tokens.map(|_| 0),
            ..base.clone()
        },
    );
    let spec = engine(
        m,
        EngineConfig {
            speculative_tokens: 4,
            window_kv_tokens,
            ..base
        },
    );

    let prompt = |i: usize| "one two three four five six ".repeat(2 + i);
    let mut reqs: Vec<Arc<WorkerRequest>> = Vec::new();
    for i in 0..10 {
        let (temperature, seed) = if i % 2 == 0 {
            (0.0, None)
        } else {
            (1.0, Some(i as u64))
        };
        let mut r = (*req(
            &prompt(i),
            [40, 3, 17, 60][i % 4],
            temperature,
            seed,
            vec![],
        ))
        .clone();
        match i {
            2 => r.params.logprobs = Some(2),
            3 => {
                r.params.presence_penalty = 0.7;
                r.params.frequency_penalty = 0.4;
            }
            5 => r.params.format = Some(OutputFormat::Object),
            _ => {}
        }
        reqs.push(Arc::new(r));
    }
    // Answers that loop and then leave the loop, so that drafts are kept and then missed
    // while the sequence runs alone: greedy with a frequency penalty that grows as the loop
    // repeats, greedy in JSON mode, and a sample among the two likeliest tokens.
    let long = |i: usize| (*req(&prompt(i), 60, 0.0, None, vec![])).clone();
    let mut r = long(10);
    r.params.frequency_penalty = 0.3;
    reqs.push(Arc::new(r));
    let mut r = long(11);
    r.params.format = Some(OutputFormat::Object);
    reqs.push(Arc::new(r));
    let mut r = long(12);
    (r.params.temperature, r.params.top_k, r.params.seed) = (1.0, 2, Some(12));
    reqs.push(Arc::new(r));
    // A stop string from the greedy answer, met part way through it.
    let first = events(&plain, reqs[0].clone()).await;
    let text = text(&first);
    let stop: String = text
        .chars()
        .skip(text.chars().count() / 2)
        .take(4)
        .collect();
    let mut r = (*reqs[0]).clone();
    r.params.stop = vec![stop];
    reqs.push(Arc::new(r));
    // Each request alone, then two at once; each answer within two minutes (`all_events`).
    let alone = reqs.chunks(1).map(|r| (r, "alone"));
    for (group, how) in alone.chain(reqs.chunks(2).map(|r| (r, "two at once"))) {
        let mut answers = Vec::new();
        for e in [&plain, &spec] {
            let got = all_events(e, group).await;
            answers.push(got.into_iter().map(uncached).collect::<Vec<_>>());
        }
        assert_eq!(answers[1], answers[0], "{backend:?}, {how}: {group:?}");
    }
    let c = spec.engine_counters().expect("counters");
    eprintln!(
        "drafts proposed {}, kept {}",
        c.draft_tokens, c.draft_tokens_accepted
    );
    assert!(c.draft_tokens_accepted > 0, "no draft kept: {c:?}");
    assert!(
        c.draft_tokens > c.draft_tokens_accepted,
        "every draft kept: {c:?}"
    );
    assert!(
        c.steps < plain.engine_counters().expect("counters").steps,
        "no step saved: {c:?}"
    );
    let p = plain.engine_counters().expect("counters");
    assert_eq!(
        (p.draft_tokens, p.draft_tokens_accepted),
        (0, 0),
        "off by default"
    );
    if backend != BackendKind::Cpu {
        // The penalized and JSON-mode sequences' drafts' rows came back to the host (the
        // plain engine adjusts every row on the device).
        assert!(
            c.rows_read_back > p.rows_read_back,
            "no draft's row read back: {c:?}"
        );
    }
    let w = window_kv_tokens.map(|t| (t / 16) as u64);
    assert_eq!(
        (c.kv_window_blocks_total, p.kv_window_blocks_total),
        (w.unwrap_or(0), 0)
    );
}

/// The tiny synthetic model as a Gemma 3 file of 6 layers, five windowed to `window`
/// positions.
fn windowed_model(window: usize) -> (common::tempdir::TempDir, kernels::load::Loaded) {
    let d = common::tempdir::TempDir::new();
    let path = d.0.join("windowed.gguf");
    let spec = kernels::synth::SynthSpec {
        arch: kernels::synth::SynthArch::Gemma3,
        n_layers: 6,
        window: Some(window),
        ..kernels::synth::SynthSpec::tiny()
    };
    kernels::synth::write_model(&path, &spec).unwrap();
    (d, kernels::load::load(&path).unwrap())
}

/// A model with sliding-window layers (Gemma 3's five of six, a window of 24 positions),
/// on the CPU: with the windowed layers in a pool of their own, whose blocks before each
/// sequence's window go back as it moves on, every answer is the one the engine gives
/// with every position kept on every layer (`window_kv_tokens = 0`), 16 at once in a pool
/// smaller than their windows together (so some wait or are preempted), and a repeated
/// prompt's prefix is served from the cache with its windowed blocks.
#[tokio::test(flavor = "multi_thread")]
async fn windowed_layers_in_a_pool_of_their_own_change_no_token() {
    windowed_case(BackendKind::Cpu).await;
}

/// The same on the GPU path (the emulator, and a real GPU where there is one): the windowed layers' caches hold their own
/// pool's blocks, named by a second block table and slot mapping `build_batch` makes.
#[tokio::test(flavor = "multi_thread")]
async fn on_the_gpu_path_windowed_layers_in_a_pool_of_their_own_change_no_token() {
    for backend in common::gpu_paths() {
        windowed_case(backend).await;
    }
}

async fn windowed_case(backend: BackendKind) {
    let (_d, m) = windowed_model(24);
    let base = EngineConfig {
        backend,
        threads: 2,
        max_batch_tokens: Some(64),
        max_seqs: Some(16),
        ..EngineConfig::default()
    };
    let kept = engine(
        &m,
        EngineConfig {
            window_kv_tokens: Some(0),
            ..base.clone()
        },
    );
    let mut want = Vec::new();
    for p in prompts() {
        want.push(run(&kept, req(&p, 24, 0.0, None, vec![])).await);
    }
    let c = kept.engine_counters().unwrap();
    assert_eq!((c.kv_window_blocks_used, c.kv_window_blocks_total), (0, 0));
    // 20 blocks of 16: room for a step's rows and a few windows, not 16 (each reads 24
    // positions, 2 or 3 blocks), so sequences are preempted for blocks.
    let own = engine(
        &m,
        EngineConfig {
            window_kv_tokens: Some(320),
            ..base.clone()
        },
    );
    for (i, got) in all_at_once(&own).await.into_iter().enumerate() {
        assert_eq!(got, want[i], "sequence {i}");
    }
    let c = own.engine_counters().unwrap();
    assert_eq!(c.kv_window_blocks_total, 20);
    assert!(c.preemptions > 0, "the windows did not fit at once");
    // Every window block back (the gauge is published after each step).
    for _ in 0..200 {
        if own.engine_counters().unwrap().kv_window_blocks_used == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(own.engine_counters().unwrap().kv_window_blocks_used, 0);
    // The longest prompt again, alone, twice: the second takes its prefix from the cache,
    // windowed blocks and all (the first's were let go last, so nothing evicted them;
    // the first may find some of its windowed blocks evicted by the 16 and compute from
    // there).
    let p = prompts().pop().unwrap();
    for _ in 0..2 {
        let again = run_usage(&own, req(&p, 24, 0.0, None, vec![])).await;
        assert_eq!(
            (again.0.as_str(), again.1),
            (want[15].0.as_str(), want[15].1)
        );
        let (prompt, cached) = (again.2.prompt_tokens, again.2.cached_tokens);
        assert!(cached <= (prompt - 1) / 16 * 16, "{:?}", again.2);
        if cached == (prompt - 1) / 16 * 16 {
            return;
        }
    }
    panic!("the prompt's prefix was not served from the cache");
}
