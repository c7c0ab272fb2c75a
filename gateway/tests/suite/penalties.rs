//! Presence and frequency penalties and logit bias, in the engine on the CPU backend and
//! on the GPU path (the CUDA emulator: rows with penalties are drawn again on the host from
//! their penalized logits): checked token by token against the raw log-probabilities the
//! same requests report. vLLM's repetition penalty and `min_p`: checked against the rules
//! applied here to the model's logits; its `allowed_token_ids` and `bad_words`, by the
//! tokens drawn.

use crate::common;
use common::*;
use futures::StreamExt;
use gateway::config::BackendKind;
use gateway::engine::EngineWorker;
use gateway::worker::{SamplingParams, TokenLogprob, Worker, WorkerEvent, WorkerRequest};
use kernels::backend::{Backend, CpuBackend};
use kernels::forward::Batch;
use kernels::sampler::{sample, SampleParams};
use std::collections::HashMap;
use std::sync::Arc;

/// The items of a greedy request with `logprobs` (20 alternatives) and these settings.
async fn run(
    w: &EngineWorker,
    presence: f32,
    frequency: f32,
    bias: Vec<(u32, f32)>,
) -> Vec<TokenLogprob> {
    let mut r = (*worker_req("the quick brown fox", 16)).clone();
    r.params.logprobs = Some(20);
    r.params.presence_penalty = presence;
    r.params.frequency_penalty = frequency;
    r.params.logit_bias = bias;
    let mut s = w.submit(Arc::new(r)).await.unwrap();
    let mut items = Vec::new();
    while let Some(ev) = s.next().await {
        match ev.unwrap() {
            WorkerEvent::Prompt { .. } | WorkerEvent::Embedding(_) => {}
            WorkerEvent::Delta { logprobs, .. } => items.extend(logprobs),
            WorkerEvent::Done { .. } => return items,
        }
    }
    panic!("no Done event");
}

/// The tokens' texts, for messages.
fn tokens(items: &[TokenLogprob]) -> Vec<&str> {
    items.iter().map(|t| t.token.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_greedy_token_is_the_best_after_penalties() {
    let (_dir, loaded) = synthetic_model();
    for kind in engine_backends() {
        let w = engine_on(&loaded, kind);
        let (presence, frequency) = (0.5f32, 1.5f32);
        let items = run(&w, presence, frequency, vec![]).await;
        assert!(items.len() > 4, "{kind:?}: {:?}", tokens(&items));
        // Log-probabilities differ from logits by one constant per step, so the penalized
        // scores of a step's tokens compare as their penalized logits do.
        let mut counts: HashMap<Vec<u8>, u32> = HashMap::new();
        let mut moved = 0;
        for (i, t) in items.iter().enumerate() {
            let score = |bytes: &[u8], lp: f32| {
                let c = counts.get(bytes).copied().unwrap_or(0);
                lp - frequency * c as f32 - if c > 0 { presence } else { 0.0 }
            };
            let chosen = score(&t.bytes, t.logprob);
            for a in &t.top_logprobs {
                assert!(
                    chosen >= score(&a.bytes, a.logprob) - 1e-4,
                    "{kind:?} step {i}: {:?} ({}) chosen over a better {:?} ({}), counts {counts:?}",
                    t.token,
                    t.logprob,
                    a.token,
                    a.logprob
                );
            }
            if t.top_logprobs[0].bytes != t.bytes {
                moved += 1;
            }
            *counts.entry(t.bytes.clone()).or_insert(0) += 1;
        }
        assert!(moved > 0, "{kind:?}: the penalties never changed a choice");
        // Without them the model repeats its favourite: every token is its step's best.
        let plain = run(&w, 0.0, 0.0, vec![]).await;
        assert!(plain.iter().all(|t| t.top_logprobs[0].bytes == t.bytes));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn logit_bias_forces_and_bans_tokens() {
    let (_dir, loaded) = synthetic_model();
    let tok = loaded.tokenizer.clone();
    for kind in engine_backends() {
        let w = engine_on(&loaded, kind);
        // +100 on token 300: every token is 300.
        let forced = run(&w, 0.0, 0.0, vec![(300, 100.0)]).await;
        assert_eq!(forced.len(), 16, "{kind:?}");
        assert!(
            forced.iter().all(|t| t.bytes == tok.token_bytes(300)),
            "{kind:?}: {:?}",
            tokens(&forced)
        );
        // −100 on the unbiased first choice: never chosen.
        let plain = run(&w, 0.0, 0.0, vec![]).await;
        let first = &plain[0].bytes;
        let id = (0..tok.vocab_size() as u32)
            .find(|&i| tok.token_bytes(i) == first.as_slice())
            .unwrap();
        let banned = run(&w, 0.0, 0.0, vec![(id, -100.0)]).await;
        assert!(
            banned.iter().all(|t| &t.bytes != first),
            "{kind:?}: {:?}",
            tokens(&banned)
        );
    }
    // A token past the vocabulary is refused.
    let w = engine_on(&loaded, BackendKind::Cpu);
    let mut r = (*worker_req("x", 4)).clone();
    r.params.logit_bias = vec![(1 << 30, 1.0)];
    match w.submit(Arc::new(r)).await {
        Err(e) => assert!(e.to_string().contains("vocabulary"), "{e}"),
        Ok(_) => panic!("a bias on a token past the vocabulary was accepted"),
    }
}

/// The text of a request on `w`.
async fn answer(w: &EngineWorker, r: WorkerRequest) -> String {
    answer_and_usage(w, r).await.0
}

/// What vLLM's `repetition_penalty` and `min_p` make of `prompt`, computed here: at each
/// step the CPU model's logits of the whole text so far, every token seen (the prompt's
/// and those drawn) divided by the penalty where positive, else multiplied, then drawn by
/// the sampler's rule with `min_p` (the request's seed, the step's number).
fn by_the_rules(
    be: &mut CpuBackend,
    prompt: &[u32],
    stop: &[u32],
    n: usize,
    p: &SamplingParams,
    seed: u64,
) -> Vec<u32> {
    let mut tokens = prompt.to_vec();
    for step in 0..n {
        let mut batch = Batch::default();
        let blocks = tokens.len().div_ceil(16);
        batch.push(&tokens, 0, (0..blocks as u32).collect(), true);
        let mut row = be.step(&batch).unwrap();
        let mut seen = tokens.clone();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            let x = &mut row[t as usize];
            *x = if *x > 0.0 {
                *x / p.repetition_penalty
            } else {
                *x * p.repetition_penalty
            };
        }
        let next = sample(
            &row,
            SampleParams {
                temperature: p.temperature,
                top_k: 0,
                top_p: 1.0,
                min_p: p.min_p,
                seed,
                step: step as u32,
            },
        );
        if stop.contains(&next) {
            break;
        }
        tokens.push(next);
    }
    tokens.split_off(prompt.len())
}

/// vLLM's `repetition_penalty` and `min_p`, in the engine on each backend: greedy and
/// sampled answers are exactly those of the rules applied here to the model's logits
/// (`by_the_rules`), penalties above and below 1, the seen tokens' logits also adjusted on
/// the device (the GPU path's `sample` kernel, its input token not yet known on the host);
/// and they change answers: the synthetic model's greedy answer repeats its favourite
/// token, a penalty of 2 stops that; `min_p` 1 keeps only the most likely token, so a hot
/// sampled answer is the greedy one.
#[tokio::test(flavor = "multi_thread")]
async fn repetition_penalty_and_min_p_follow_their_rules() {
    let (_dir, loaded) = synthetic_model();
    let tok = loaded.tokenizer.clone();
    let mut be = CpuBackend::new(loaded.model.clone(), 16, 64, 2).unwrap();
    let short = "the quick brown fox";
    // More distinct tokens than the vocabulary's bitmask has words: the seen tokens go to
    // the device as a bitmask, not a list.
    let long = "Pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow! \
                THE QUICK BROWN FOX JUMPS OVER 13 LAZY DOGS?";
    let mut distinct = tok.encode_prompt(long).unwrap();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(
        distinct.len() > tok.vocab_size().div_ceil(32),
        "{}",
        distinct.len()
    );
    let n = 24;
    let cases = [
        // (prompt, repetition_penalty, min_p, temperature, seed)
        (short, 1.0, 0.0, 0.0, 0),
        (short, 2.0, 0.0, 0.0, 0),
        (short, 0.8, 0.0, 0.0, 0),
        (short, 1.0, 0.2, 1.5, 7),
        (short, 1.3, 0.05, 1.0, 11),
        (short, 1.0, 1.0, 1.8, 5),
        (long, 2.0, 0.0, 0.0, 0),
        (long, 1.3, 0.05, 1.0, 11),
        // Last, computed here only: the hot draw without `min_p`, nearly uniform over
        // the synthetic model's tokens (the GPU path's logits, not the CPU's bits, soon
        // draw otherwise).
        (short, 1.0, 0.0, 1.5, 7),
    ];
    let mut want = Vec::new();
    for &(text, rep, min_p, temperature, seed) in &cases {
        let p = SamplingParams {
            repetition_penalty: rep,
            min_p,
            temperature,
            seed: Some(seed),
            ..SamplingParams::greedy(n as u32)
        };
        let prompt = tok.encode_prompt(text).unwrap();
        let ids = by_the_rules(&mut be, &prompt, &tok.stop_tokens, n, &p, seed);
        want.push((text, p, tok.decode(&ids), ids));
    }
    let (greedy, penalized) = (&want[0].3, &want[1].3);
    let most = |ids: &[u32]| {
        let mut c = HashMap::new();
        for &t in ids {
            *c.entry(t).or_insert(0) += 1;
        }
        c.into_values().max().unwrap_or(0)
    };
    assert!(most(greedy) > 4, "the plain answer repeats: {greedy:?}");
    assert!(
        most(penalized) < most(greedy),
        "{penalized:?} against {greedy:?}"
    );
    assert_ne!(want[3].2, want[8].2, "min_p 0.2 changed nothing");
    assert_eq!(
        want[5].2, want[0].2,
        "min_p 1 keeps the most likely token only"
    );
    want.pop();
    for kind in engine_backends() {
        let w = engine_on(&loaded, kind);
        for (prompt, p, text, _) in &want {
            let mut r = (*worker_req(prompt, n as u32)).clone();
            r.params = p.clone();
            assert_eq!(&answer(&w, r).await, text, "{kind:?}: {prompt:?} {p:?}");
        }
    }
}

/// The tokens of one lowercase letter each, and their letters.
fn letters(tok: &kernels::tokenizer::Tokenizer) -> impl Iterator<Item = (u32, char)> + '_ {
    (0..tok.vocab_size() as u32).filter_map(|id| match tok.token_bytes(id) {
        [b] if b.is_ascii_lowercase() => Some((id, *b as char)),
        _ => None,
    })
}

/// vLLM's `allowed_token_ids`, in the engine on each backend (on the GPU path a mask drawn
/// on the device): greedy and sampled answers have those tokens only, and without the end
/// of sequence among them run to `max_tokens`; with `min_tokens`, the end of sequence
/// allowed, none is drawn before it. An id past the vocabulary is refused.
#[tokio::test(flavor = "multi_thread")]
async fn allowed_token_ids_are_the_only_tokens_drawn() {
    let (_dir, loaded) = synthetic_model();
    let tok = loaded.tokenizer.clone();
    // Three tokens of one printable character each, told apart by their text.
    let picked: Vec<(u32, char)> = letters(&tok).skip(3).take(3).collect();
    assert_eq!(picked.len(), 3);
    let ids: Vec<u32> = picked.iter().map(|p| p.0).collect();
    let chars: Vec<char> = picked.iter().map(|p| p.1).collect();
    for kind in engine_backends() {
        let w = engine_on(&loaded, kind);
        for (temperature, seed) in [(0.0, 0), (1.5, 3), (1.0, 9)] {
            let mut r = (*worker_req("the quick brown fox", 12)).clone();
            r.params.allowed_token_ids = ids.clone();
            r.params.temperature = temperature;
            r.params.seed = Some(seed);
            let (text, usage) = answer_and_usage(&w, r).await;
            assert_eq!(usage.completion_tokens, 12, "{kind:?}: {text:?}");
            assert!(
                text.chars().count() == 12 && text.chars().all(|c| chars.contains(&c)),
                "{kind:?}, temperature {temperature}: {text:?} has tokens not in {chars:?}"
            );
        }
        // The end of sequence allowed too, held back by `min_tokens`.
        let mut r = (*worker_req("the quick brown fox", 12)).clone();
        r.params.allowed_token_ids = [ids.clone(), tok.stop_tokens.clone()].concat();
        r.params.min_tokens = 5;
        let (text, usage) = answer_and_usage(&w, r).await;
        assert!(usage.completion_tokens >= 5, "{kind:?}: {text:?}");
        assert!(
            text.chars().all(|c| chars.contains(&c)),
            "{kind:?}: {text:?}"
        );
    }
    let w = engine_on(&loaded, gateway::config::BackendKind::Cpu);
    let mut r = (*worker_req("x", 4)).clone();
    r.params.allowed_token_ids = vec![5, 1 << 30];
    match w.submit(Arc::new(r)).await {
        Err(e) => assert!(e.to_string().contains("allowed_token_ids"), "{e}"),
        Ok(_) => panic!("an allowed token past the vocabulary was accepted"),
    }
}

/// The text and usage of a request on `w`.
async fn answer_and_usage(w: &EngineWorker, r: WorkerRequest) -> (String, gateway::worker::Usage) {
    let mut s = w.submit(Arc::new(r)).await.unwrap();
    let mut text = String::new();
    while let Some(ev) = s.next().await {
        match ev.unwrap() {
            WorkerEvent::Delta { text: t, .. } => text.push_str(&t),
            WorkerEvent::Done { usage, .. } => return (text, usage),
            _ => {}
        }
    }
    panic!("no Done event");
}

/// vLLM's `bad_words`: a word of one token is never drawn, and one of two tokens never
/// completed, on the CPU and on the GPU path (the emulator: a word of two tokens makes the
/// row's mask wait for the answer's last token). The answers are held to single
/// characters (`allowed_token_ids`), so that the text shows every token.
#[tokio::test(flavor = "multi_thread")]
async fn bad_words_are_never_generated() {
    let (_dir, loaded) = synthetic_model();
    let tok = loaded.tokenizer.clone();
    let picked: Vec<(u32, char)> = letters(&tok).take(6).collect();
    let ids: Vec<u32> = picked.iter().map(|p| p.0).collect();
    for kind in engine_backends() {
        let w = engine_on(&loaded, kind);
        let ask = |bad: Vec<String>, temperature: f32| {
            let mut r = (*worker_req("the quick brown fox", 24)).clone();
            r.params.allowed_token_ids = ids.clone();
            r.params.bad_words = bad;
            r.params.temperature = temperature;
            r.params.seed = Some(5);
            r
        };
        for temperature in [0.0, 1.0] {
            let plain = answer(&w, ask(vec![], temperature)).await;
            assert_eq!(plain.chars().count(), 24, "{kind:?}: {plain:?}");
            // The answer's most frequent character, banned.
            let top = picked
                .iter()
                .map(|p| p.1)
                .max_by_key(|&c| plain.matches(c).count())
                .unwrap();
            let banned = answer(&w, ask(vec![top.to_string()], temperature)).await;
            assert!(
                !banned.contains(top) && banned.chars().count() == 24,
                "{kind:?}, temperature {temperature}: {banned:?} has {top:?} (unbanned: {plain:?})"
            );
            // Pairs of the answer's characters that tokenize as two tokens, banned: never
            // written together, though each is.
            let pairs: Vec<String> = plain
                .chars()
                .zip(plain.chars().skip(1))
                .map(|(a, b)| format!("{a}{b}"))
                .filter(|p| tok.encode(p).map(|t| t.len() == 2).unwrap_or(false))
                .collect();
            assert!(
                !pairs.is_empty(),
                "{kind:?}: no pair of two tokens in {plain:?}"
            );
            let banned = answer(&w, ask(pairs.clone(), temperature)).await;
            assert_eq!(banned.chars().count(), 24, "{kind:?}: {banned:?}");
            for p in &pairs {
                assert!(
                    !banned.contains(p.as_str()),
                    "{kind:?}, temperature {temperature}: {banned:?} has {p:?} (unbanned: {plain:?})"
                );
            }
            assert_ne!(banned, plain, "{kind:?}: the ban changed nothing");
        }
        // Alone (no other option makes the row adjusted): the greedy answer's most
        // frequent token, banned, is never drawn.
        let tokens_of = |bad: Vec<String>| {
            let mut r = (*worker_req("the quick brown fox", 16)).clone();
            r.params.logprobs = Some(0);
            r.params.bad_words = bad;
            r
        };
        let items = |r| async {
            let mut s = w.submit(Arc::new(r)).await.unwrap();
            let mut out: Vec<Vec<u8>> = Vec::new();
            while let Some(ev) = s.next().await {
                match ev.unwrap() {
                    WorkerEvent::Delta { logprobs, .. } => {
                        out.extend(logprobs.into_iter().map(|t| t.bytes))
                    }
                    WorkerEvent::Done { .. } => return out,
                    _ => {}
                }
            }
            panic!("no Done event");
        };
        let plain = items(tokens_of(vec![])).await;
        let top = plain
            .iter()
            .max_by_key(|b| plain.iter().filter(|c| c == b).count())
            .unwrap()
            .clone();
        let word = String::from_utf8(top.clone()).unwrap();
        let banned = items(tokens_of(vec![word.clone()])).await;
        assert!(
            !banned.contains(&top) && banned != plain,
            "{kind:?}: {word:?} banned, drawn: {banned:?}"
        );
    }
}
