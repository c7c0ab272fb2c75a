//! Presence and frequency penalties and logit bias, in the engine on the CPU backend and
//! on the GPU path (the CUDA emulator: rows with penalties are drawn again on the host from
//! their penalized logits): checked token by token against the raw log-probabilities the
//! same requests report.

mod common;
use common::*;
use futures::StreamExt;
use gateway::config::BackendKind;
use gateway::engine::EngineWorker;
use gateway::worker::{TokenLogprob, Worker, WorkerEvent};
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
