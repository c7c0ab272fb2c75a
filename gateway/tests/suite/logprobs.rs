//! Log-probabilities (`logprobs`): from the engine on the CPU backend and on the GPU path
//! (the CUDA emulator, where the `logprobs` kernel computes them from the rows that ask,
//! after sampling on the device); through the gateway in both endpoints' shapes, streamed
//! and not; passed on by a gateway from a remote tollgate worker; refused by simulated
//! workers.

use crate::common;
use common::*;
use futures::StreamExt;
use gateway::engine::EngineWorker;
use gateway::worker::{FinishReason, TokenLogprob, Worker, WorkerEvent};
use serde_json::Value;
use std::sync::Arc;

/// A request's text, log-probability items and how it ended.
async fn run_logprobs(
    w: &EngineWorker,
    temperature: f32,
    top: u8,
) -> (String, Vec<TokenLogprob>, FinishReason, u32) {
    let mut r = (*worker_req("the quick brown fox", 12)).clone();
    r.params.temperature = temperature;
    r.params.seed = Some(5);
    r.params.logprobs = Some(top);
    run(w, r).await
}

/// `r`'s text, log-probability items and how it ended.
async fn run(
    w: &EngineWorker,
    r: gateway::worker::WorkerRequest,
) -> (String, Vec<TokenLogprob>, FinishReason, u32) {
    let mut s = w.submit(Arc::new(r)).await.unwrap();
    let (mut text, mut items) = (String::new(), Vec::new());
    while let Some(ev) = s.next().await {
        match ev.unwrap() {
            WorkerEvent::Prompt { .. } | WorkerEvent::Embedding(_) => {}
            WorkerEvent::Delta {
                text: t, logprobs, ..
            } => {
                text.push_str(&t);
                items.extend(logprobs);
            }
            WorkerEvent::Done {
                finish_reason,
                usage,
            } => return (text, items, finish_reason, usage.completion_tokens),
        }
    }
    panic!("no Done event");
}

/// One item per generated token (the end-of-sequence token has none), whose bytes make
/// up the text; log-probabilities at most 0; `top` alternatives, most likely first;
/// greedy picks the first.
fn check_items(
    text: &str,
    items: &[TokenLogprob],
    finish: FinishReason,
    tokens: u32,
    top: usize,
    greedy: bool,
) {
    let eos = u32::from(finish == FinishReason::Stop);
    assert_eq!(items.len() as u32, tokens - eos, "{items:?}");
    let bytes: Vec<u8> = items.iter().flat_map(|t| t.bytes.clone()).collect();
    assert_eq!(String::from_utf8_lossy(&bytes), text);
    for t in items {
        assert!(t.logprob <= 0.0 && t.logprob > -9999.0, "{t:?}");
        assert_eq!(t.top_logprobs.len(), top, "{t:?}");
        assert!(
            t.top_logprobs
                .windows(2)
                .all(|w| w[0].logprob >= w[1].logprob),
            "{t:?}"
        );
        if let Some(alt) = t.top_logprobs.iter().find(|a| a.bytes == t.bytes) {
            assert_eq!(
                alt.logprob, t.logprob,
                "the same token, the same number: {t:?}"
            );
        }
        if greedy && top > 0 {
            assert_eq!(t.top_logprobs[0].logprob, t.logprob, "{t:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_engine_reports_logprobs_on_the_cpu_and_on_the_gpu_path() {
    let (_dir, loaded) = synthetic_model();
    let mut greedy_runs = Vec::new();
    for kind in engine_backends() {
        let w = engine_on(&loaded, kind);
        let (text, items, finish, n) = run_logprobs(&w, 0.0, 3).await;
        check_items(&text, &items, finish, n, 3, true);
        let (text2, items2, finish2, n2) = run_logprobs(&w, 1.0, 0).await;
        check_items(&text2, &items2, finish2, n2, 0, false);
        on_the_device(&w, kind, (n + n2) as u64);
        greedy_runs.push(items);
    }
    if let [cpu, gpu] = &greedy_runs[..] {
        agree(cpu, gpu);
    }
}

/// On the GPU path, at least `rows` rows' log-probabilities were computed on the device,
/// and no row of logits was read back.
fn on_the_device(w: &EngineWorker, kind: gateway::config::BackendKind, rows: u64) {
    let c = w.engine_counters().unwrap();
    if kind == gateway::config::BackendKind::Cpu {
        assert_eq!((c.rows_scored_on_device, c.rows_read_back), (0, 0));
    } else {
        assert!(c.rows_scored_on_device >= rows, "{kind:?}: {c:?}");
        assert_eq!(c.rows_read_back, 0, "{kind:?}: {c:?}");
    }
}

/// The GPU path's numbers are the CPU's (f16 weights: within a few hundredths), the
/// chosen token's and its alternatives', over the tokens both chose alike (at least one).
fn agree(cpu: &[TokenLogprob], gpu: &[TokenLogprob]) {
    let same = cpu.iter().zip(gpu).take_while(|(a, b)| a.bytes == b.bytes);
    let mut n = 0;
    for (a, b) in same {
        assert!((a.logprob - b.logprob).abs() < 0.05, "{a:?} vs {b:?}");
        for (x, y) in a.top_logprobs.iter().zip(&b.top_logprobs) {
            assert!((x.logprob - y.logprob).abs() < 0.05, "{a:?} vs {b:?}");
        }
        n += 1;
    }
    assert!(n > 0, "the two paths chose different first tokens");
}

/// With penalties and a grammar, the numbers are still the model's: the tokens are drawn
/// from the adjusted rows (on the GPU path, from an adjusted copy on the device, the
/// model's numbers computed there from its own row), so a greedy token may be below the
/// model's most likely one, and both paths agree.
#[tokio::test(flavor = "multi_thread")]
async fn the_engine_reports_the_models_logprobs_under_penalties_and_json_mode() {
    let (_dir, loaded) = synthetic_model();
    let mut runs = Vec::new();
    for kind in engine_backends() {
        let w = engine_on(&loaded, kind);
        let mut r = (*worker_req("the quick brown fox", 12)).clone();
        r.params.format = Some(gateway::worker::OutputFormat::Object);
        r.params.frequency_penalty = 0.9;
        r.params.presence_penalty = 0.4;
        r.params.logprobs = Some(3);
        let (text, items, finish, n) = run(&w, r).await;
        check_items(&text, &items, finish, n, 3, false);
        on_the_device(&w, kind, n as u64 - 1);
        assert!(text.trim_start().starts_with('{'), "{kind:?}: {text:?}");
        let below = items
            .iter()
            .filter(|t| t.logprob < t.top_logprobs[0].logprob)
            .count();
        assert!(
            below > 0,
            "{kind:?}: every token was the model's most likely: {items:?}"
        );
        runs.push(items);
    }
    if let [cpu, gpu] = &runs[..] {
        agree(cpu, gpu);
    }
}

/// A completion's legacy `tokens` and `text_offset`: the tokens make up the text, and
/// each offset is where its token starts in it (in characters).
fn legacy_tokens(v: &Value) -> (Vec<&str>, Vec<u64>) {
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        tokens.concat(),
        v["choices"][0]["text"].as_str().unwrap(),
        "{v}"
    );
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    let mut at = 0;
    for (t, o) in tokens.iter().zip(&offsets) {
        assert_eq!(*o, at, "{v}");
        at += t.chars().count() as u64;
    }
    (tokens, offsets)
}

/// A gateway over the CPU engine: chat and completions, whole and streamed.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_renders_logprobs_in_each_endpoints_shape() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ""));
    let chat = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":10,"temperature":0,"logprobs":true,"top_logprobs":2}"#;

    // Chat, whole: one item per token, its text the message's.
    let v: Value = post_json(&gw, "/v1/chat/completions", chat).await;
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    let message = v["choices"][0]["message"]["content"].as_str().unwrap();
    let joined: String = content
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(joined, message, "{v}");
    let eos = u64::from(v["choices"][0]["finish_reason"] == "stop");
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap() - eos
    );
    for t in &content {
        assert!(t["logprob"].as_f64().unwrap() <= 0.0, "{t}");
        assert!(t["bytes"].is_array(), "{t}");
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2, "{t}");
        assert_eq!(top[0]["token"], t["token"], "greedy: {t}");
    }
    assert!(v["choices"][0]["logprobs"]["refusal"].is_null());

    // Chat, streamed: each text chunk carries its tokens' items; the same items in all.
    let body = chat.replace(r#""logprobs":true"#, r#""stream":true,"logprobs":true"#);
    let events = sse_events(post(&gw, "/v1/chat/completions", &body).await).await;
    let mut streamed = Vec::new();
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(e).unwrap();
        let choice = &c["choices"][0];
        if let Some(items) = choice["logprobs"]["content"].as_array() {
            let text: String = items.iter().map(|t| t["token"].as_str().unwrap()).collect();
            assert_eq!(text, choice["delta"]["content"].as_str().unwrap(), "{c}");
            streamed.extend(items.iter().cloned());
        }
    }
    assert_eq!(streamed, content, "streamed and whole give the same items");

    // Completions: the legacy lists, of equal length; offsets into the text.
    let text_body =
        r#"{"model":"m","prompt":"once upon","max_tokens":10,"temperature":0,"logprobs":2}"#;
    let v: Value = post_json(&gw, "/v1/completions", text_body).await;
    let lp = &v["choices"][0]["logprobs"];
    let (tokens, offsets) = legacy_tokens(&v);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), tokens.len());
    let tops = lp["top_logprobs"].as_array().unwrap();
    assert_eq!(tops.len(), tokens.len());
    for (t, top) in tokens.iter().zip(tops) {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 2, "{top:?}");
        assert!(top.contains_key(*t), "greedy: {t:?} among {top:?}");
    }
    // Streamed completions: offsets continue from chunk to chunk.
    let body = text_body.replace(r#""logprobs":2"#, r#""stream":true,"logprobs":2"#);
    let events = sse_events(post(&gw, "/v1/completions", &body).await).await;
    let mut streamed_offsets = Vec::new();
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(e).unwrap();
        if let Some(o) = c["choices"][0]["logprobs"]["text_offset"].as_array() {
            streamed_offsets.extend(o.iter().map(|o| o.as_u64().unwrap()));
        }
    }
    assert_eq!(streamed_offsets, offsets);

    // Not asked: null.
    let plain = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;
    let v: Value = post_json(&gw, "/v1/chat/completions", plain).await;
    assert!(v["choices"][0]["logprobs"].is_null(), "{v}");
}

/// A gateway in front of `gateway worker` asks the upstream for logprobs and passes them
/// on; simulated workers refuse them.
#[tokio::test(flavor = "multi_thread")]
async fn logprobs_pass_through_a_remote_worker_and_simulated_workers_refuse_them() {
    let (_dir, model) = synthetic_model_file();
    let worker = remote_worker(&model);
    let gw = Gateway::start(&config(&remote_upstream(&worker), "", ""));
    for (path, body) in [
        (
            "/v1/chat/completions",
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"temperature":0,"logprobs":true,"top_logprobs":3}"#,
        ),
        (
            "/v1/completions",
            r#"{"model":"m","prompt":"hi","max_tokens":8,"temperature":0,"logprobs":3}"#,
        ),
    ] {
        for stream in [false, true] {
            let body = if stream {
                body.replace(r#""temperature":0"#, r#""temperature":0,"stream":true"#)
            } else {
                body.to_string()
            };
            // The same request straight to the worker (with its secret), and through the
            // gateway: the same log-probabilities.
            let direct = client()
                .post(worker.url(path))
                .bearer_auth(WORKER_SECRET)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let through = post(&gw, path, &body).await;
            let (a, b) = if stream {
                (
                    logprobs_of_stream(sse_events(direct).await),
                    logprobs_of_stream(sse_events(through).await),
                )
            } else {
                let a: Value = direct.json().await.unwrap();
                let b: Value = through.json().await.unwrap();
                (
                    vec![a["choices"][0]["logprobs"].clone()],
                    vec![b["choices"][0]["logprobs"].clone()],
                )
            };
            assert!(
                !a.is_empty() && a.iter().all(|v| !v.is_null()),
                "{path}: {a:?}"
            );
            assert_eq!(
                merged(&a),
                merged(&b),
                "{path}, stream {stream}: the gateway passes the worker's logprobs on"
            );
        }
    }
    // Simulated workers make their text up: a request for logprobs is refused.
    let sim = Gateway::start(&config(FAST_SIM, "", ""));
    refused(
        &sim,
        "/v1/chat/completions",
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"logprobs":true}"#,
        "logprobs",
    )
    .await;
    // So is `best_of` past `n`, which ranks by them.
    let best_of = r#"{"model":"m","prompt":"hi","best_of":2}"#;
    refused(&sim, "/v1/completions", best_of, "best_of").await;
}

/// The `logprobs` objects of a stream's chunks that have one.
fn logprobs_of_stream(events: Vec<String>) -> Vec<Value> {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"].get(0).map(|ch| ch["logprobs"].clone()))
        .filter(|l| !l.is_null())
        .collect()
}

/// The token items (chat) or the token lists (completions) of several `logprobs`
/// objects, in order, as one list of (token, logprob, alternatives) (chunk boundaries
/// differ between a worker and a gateway that re-frames its stream).
fn merged(parts: &[Value]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in parts {
        if let Some(items) = p["content"].as_array() {
            for t in items {
                out.push((
                    t["token"].to_string(),
                    t["logprob"].to_string(),
                    t["top_logprobs"].to_string(),
                ));
            }
        } else if let Some(tokens) = p["tokens"].as_array() {
            for (i, t) in tokens.iter().enumerate() {
                out.push((
                    t.to_string(),
                    p["token_logprobs"][i].to_string(),
                    p["top_logprobs"][i].to_string(),
                ));
            }
        }
    }
    out
}

/// A request's prompt items (`echo` with `logprobs`, when `score`), generated items, text
/// and prompt tokens; the prompt's items must come before any text.
async fn run_scored(
    w: &EngineWorker,
    prompt: &str,
    max_tokens: u32,
    score: bool,
) -> (Vec<TokenLogprob>, Vec<TokenLogprob>, String, u32) {
    let mut r = (*worker_req(prompt, max_tokens)).clone();
    r.params.logprobs = Some(2);
    r.params.prompt_logprobs = score;
    let mut s = w.submit(Arc::new(r)).await.unwrap();
    let (mut scored, mut items, mut text) = (Vec::new(), Vec::new(), String::new());
    while let Some(ev) = s.next().await {
        match ev.unwrap() {
            WorkerEvent::Embedding(_) => panic!("an embedding for a completion"),
            WorkerEvent::Prompt { logprobs, .. } => {
                assert!(
                    text.is_empty() && items.is_empty(),
                    "the prompt comes first"
                );
                assert!(scored.is_empty(), "once");
                scored = logprobs;
            }
            WorkerEvent::Delta {
                text: t, logprobs, ..
            } => {
                text.push_str(&t);
                items.extend(logprobs);
            }
            WorkerEvent::Done { usage, .. } => {
                return (scored, items, text, usage.prompt_tokens);
            }
        }
    }
    panic!("no Done event");
}

/// `echo` with `logprobs`: every prompt token's log-probability, the first unscored. A
/// prompt scored in one go and one scored over several steps (chunked prefill, its rows
/// past a step's logits rows) give the same numbers as the tokens' log-probabilities
/// when they were generated one by one; the CPU and the GPU path agree.
#[tokio::test(flavor = "multi_thread")]
async fn the_engine_scores_prompts_on_the_cpu_and_on_the_gpu_path() {
    let (_dir, loaded) = synthetic_model();
    let mut long_scores = Vec::new();
    for kind in engine_backends() {
        let w = engine_on(&loaded, kind);
        // Greedy generation with log-probabilities, then its text scored as a prompt.
        let start = "the quick brown fox";
        let (_, generated, text, _) = run_scored(&w, start, 8, false).await;
        let prompt = format!("{start}{text}");
        let (scored, _, _, n) = run_scored(&w, &prompt, 1, true).await;
        assert_eq!(
            scored.len() as u32,
            n,
            "{kind:?}: one item per prompt token"
        );
        // The prompt alone (`max_tokens` 0): the same items, and nothing generated.
        let (alone, items, text_alone, n_alone) = run_scored(&w, &prompt, 0, true).await;
        assert_eq!(n_alone, n, "{kind:?}");
        assert!(items.is_empty() && text_alone.is_empty(), "{kind:?}");
        assert_eq!(alone.len(), scored.len(), "{kind:?}");
        for (a, b) in alone.iter().zip(&scored).skip(1) {
            assert_eq!(a.bytes, b.bytes, "{kind:?}");
            assert!(
                (a.logprob - b.logprob).abs() < 1e-3,
                "{kind:?}: {a:?} vs {b:?}"
            );
        }
        assert!(scored[0].logprob.is_nan() && scored[0].top_logprobs.is_empty());
        let bytes: Vec<u8> = scored.iter().flat_map(|t| t.bytes.clone()).collect();
        assert_eq!(String::from_utf8_lossy(&bytes), prompt, "{kind:?}");
        for t in &scored[1..] {
            assert!(t.logprob <= 0.0 && t.logprob > -9999.0, "{kind:?}: {t:?}");
            assert_eq!(t.top_logprobs.len(), 2, "{kind:?}: {t:?}");
            // Its rank (vLLM's): 1 where it is the most likely, else past those likelier.
            let rank = t.rank.expect("an engine's items have ranks");
            let likelier = t
                .top_logprobs
                .iter()
                .filter(|a| a.logprob > t.logprob)
                .count();
            assert!(rank as usize > likelier, "{kind:?}: {t:?}");
            assert_eq!(t.top_logprobs[0].id == t.id, rank == 1, "{kind:?}: {t:?}");
        }
        // The generated tokens, scored in the prompt: the numbers they were drawn with.
        let tail = &scored[scored.len() - generated.len()..];
        for (a, b) in tail.iter().zip(&generated) {
            assert_eq!(a.bytes, b.bytes, "{kind:?}: the same tokens");
            assert!(
                (a.logprob - b.logprob).abs() < 2e-2,
                "{kind:?}: {a:?} vs {b:?}"
            );
        }
        // A scored prompt's lists end with the generated tokens, a stop token too (with no
        // text).
        let mut r = (*worker_req(start, 4)).clone();
        r.params.logprobs = Some(1);
        r.params.prompt_logprobs = true;
        r.params.logit_bias = vec![(loaded.tokenizer.stop_tokens[0], 100.0)];
        let mut st = w.submit(Arc::new(r)).await.unwrap();
        let mut items = Vec::new();
        while let Some(ev) = st.next().await {
            match ev.unwrap() {
                WorkerEvent::Delta { logprobs, .. } => items.extend(logprobs),
                WorkerEvent::Done { finish_reason, .. } => {
                    assert_eq!(finish_reason, FinishReason::Stop);
                    break;
                }
                WorkerEvent::Prompt { .. } | WorkerEvent::Embedding(_) => {}
            }
        }
        assert_eq!(items.len(), 1, "{kind:?}: {items:?}");
        assert!(
            items[0].token.is_empty() && items[0].logprob <= 0.0,
            "{items:?}"
        );
        // A long prompt: scored over several steps on both paths (more tokens than a
        // step of the test engines' 512, more rows than the GPU path's 64 + 256 logits
        // rows a step).
        let long = "the quick brown fox jumps over the lazy dog. ".repeat(30);
        let (scored, _, _, n) = run_scored(&w, &long, 1, true).await;
        assert_eq!(scored.len() as u32, n, "{kind:?}");
        assert!(n > 512, "{n} tokens");
        on_the_device(&w, kind, n as u64 - 1);
        long_scores.push(scored);
    }
    if let [cpu, gpu] = &long_scores[..] {
        let same_rank = cpu
            .iter()
            .zip(gpu)
            .filter(|(a, b)| a.rank == b.rank)
            .count();
        let worst = cpu
            .iter()
            .zip(gpu)
            .skip(1)
            .map(|(a, b)| {
                let (a, b) = (a.rank.unwrap_or(0) as f64, b.rank.unwrap_or(0) as f64);
                (a - b).abs() / a.max(b)
            })
            .fold(0.0, f64::max);
        eprintln!(
            "ranks: {same_rank} of {} the same on both paths, worst {worst}",
            cpu.len()
        );
        // The paths' logits differ in their last bits (f16 on the GPU path), and this
        // model's are close together: a rank moves by the tokens in between (2.8 % at
        // most, measured).
        assert!(worst < 0.1, "ranks differ by {worst} of themselves");
        for (i, (a, b)) in cpu.iter().zip(gpu).enumerate().skip(1) {
            assert_eq!(a.bytes, b.bytes);
            assert!(
                (a.logprob - b.logprob).abs() < 0.05,
                "token {i}: {a:?} vs {b:?}"
            );
        }
    }
}

/// Completions with `echo` and `logprobs`, whole and streamed: the prompt's tokens first
/// (the first with nulls), then the completion's, over the echoed text, also for a prompt
/// of token ids; a gateway in front of an OpenAI-compatible upstream refuses them (and
/// passes token ids on).
#[tokio::test(flavor = "multi_thread")]
async fn the_api_echoes_a_scored_prompt_on_engines_and_through_upstream_pools() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ""));
    let body = r#"{"model":"m","prompt":"once upon a time","max_tokens":4,"temperature":0,"echo":true,"logprobs":1}"#;
    let v: Value = post_json(&gw, "/v1/completions", body).await;
    let choice = &v["choices"][0];
    let text = choice["text"].as_str().unwrap();
    assert!(text.starts_with("once upon a time"), "{v}");
    let lp = &choice["logprobs"];
    let (tokens, _) = legacy_tokens(&v);
    // Every token, a stop token too (with no text): harnesses cut the last one off.
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(tokens.len(), prompt_tokens + completion, "{v}");
    let lps = lp["token_logprobs"].as_array().unwrap();
    let tops = lp["top_logprobs"].as_array().unwrap();
    assert!(lps[0].is_null() && tops[0].is_null(), "{v}");
    for (l, t) in lps.iter().zip(tops).skip(1) {
        assert!(l.as_f64().unwrap() <= 0.0, "{v}");
        assert_eq!(t.as_object().unwrap().len(), 1, "{v}");
    }
    // Streamed: the first text chunk is the prompt with its items; then the same lists.
    let body_s = body.replace(r#""echo":true"#, r#""echo":true,"stream":true"#);
    let events = sse_events(post(&gw, "/v1/completions", &body_s).await).await;
    let mut first = None;
    let (mut streamed, mut streamed_lps) = (String::new(), Vec::new());
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(e).unwrap();
        let piece = c["choices"][0]["text"].as_str().unwrap_or_default();
        if !piece.is_empty() && first.is_none() {
            first = Some(c.clone());
        }
        streamed.push_str(piece);
        if let Some(l) = c["choices"][0]["logprobs"]["token_logprobs"].as_array() {
            streamed_lps.extend(l.iter().cloned());
        }
    }
    let first = first.unwrap();
    assert_eq!(first["choices"][0]["text"], "once upon a time", "{first}");
    assert_eq!(
        first["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        prompt_tokens
    );
    assert_eq!(streamed, text);
    assert_eq!(&streamed_lps, lps);

    // The prompt as token ids (as evaluation harnesses send it), alone or as a list of
    // one: the same answer; ids outside the vocabulary are refused.
    let tok = kernels::load::load(&model).unwrap().tokenizer;
    let ids = tok.encode("once upon a time").unwrap();
    for prompt in [format!("{ids:?}"), format!("[{ids:?}]")] {
        let by_ids = body.replace(r#""once upon a time""#, &prompt);
        let w: Value = post_json(&gw, "/v1/completions", &by_ids).await;
        assert_eq!(w["choices"][0]["text"], choice["text"], "{w}");
        assert_eq!(w["choices"][0]["logprobs"], choice["logprobs"], "{w}");
    }
    let oov = body.replace(r#""once upon a time""#, "[1, 99999999]");
    refused(&gw, "/v1/completions", &oov, "vocabulary").await;

    // An upstream pool (here `gateway worker` behind an OpenAI-compatible worker).
    let worker = remote_worker(&model);
    let gw = Gateway::start(&config(&remote_upstream(&worker), "", ""));
    // Token ids pass on to it as they are.
    let plain = format!(r#"{{"model":"m","prompt":{ids:?},"max_tokens":4,"temperature":0}}"#);
    let w: Value = post_json(&gw, "/v1/completions", &plain).await;
    assert_eq!(
        format!(
            "once upon a time{}",
            w["choices"][0]["text"].as_str().unwrap()
        ),
        text,
        "{w}"
    );
    // Scoring: the upstream echoes and scores the prompt; the answer is the engine's,
    // whole and streamed, by text and by token ids (whose text, with no tokenizer in this
    // gateway, is the upstream's echo).
    for prompt in [r#""once upon a time""#.to_string(), format!("{ids:?}")] {
        let scored = body.replace(r#""once upon a time""#, &prompt);
        let w: Value = post_json(&gw, "/v1/completions", &scored).await;
        assert_eq!(w["choices"][0]["text"], choice["text"], "{w}");
        assert_eq!(w["choices"][0]["logprobs"], choice["logprobs"], "{w}");
        assert_eq!(w["usage"], v["usage"], "{w}");
        let stream = scored.replace(r#""echo":true"#, r#""echo":true,"stream":true"#);
        let events = sse_events(post(&gw, "/v1/completions", &stream).await).await;
        let (mut streamed_u, mut lps_u) = (String::new(), Vec::new());
        for e in events.iter().filter(|e| *e != "[DONE]") {
            let c: Value = serde_json::from_str(e).unwrap();
            streamed_u.push_str(c["choices"][0]["text"].as_str().unwrap_or_default());
            if let Some(l) = c["choices"][0]["logprobs"]["token_logprobs"].as_array() {
                lps_u.extend(l.iter().cloned());
            }
        }
        assert_eq!((streamed_u.as_str(), &lps_u), (text, lps), "{prompt}");
    }
    // Echo of token ids without scoring needs the gateway's tokenizer.
    let echo_ids = plain.replace(r#""temperature":0"#, r#""temperature":0,"echo":true"#);
    refused(&gw, "/v1/completions", &echo_ids, "tokenizer").await;
}

/// The answer with the prompt's items and text, whole and streamed: its text, its
/// `token_logprobs` (null where not asked), its finish reason and its usage.
async fn prompt_alone(gw: &Gateway, body: &str) -> (String, Value, Value, Value) {
    let v: Value = post_json(gw, "/v1/completions", body).await;
    let c = &v["choices"][0];
    let text = c["text"].as_str().unwrap().to_string();
    let lps = c["logprobs"]["token_logprobs"].clone();
    let stream = body.replace(r#""echo":true"#, r#""echo":true,"stream":true"#);
    let events = sse_events(post(gw, "/v1/completions", &stream).await).await;
    let (mut streamed, mut streamed_lps, mut finish) = (String::new(), Vec::new(), Value::Null);
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(e).unwrap();
        streamed.push_str(c["choices"][0]["text"].as_str().unwrap_or_default());
        if let Some(l) = c["choices"][0]["logprobs"]["token_logprobs"].as_array() {
            streamed_lps.extend(l.iter().cloned());
        }
        if !c["choices"][0]["finish_reason"].is_null() {
            finish = c["choices"][0]["finish_reason"].clone();
        }
    }
    assert_eq!(streamed, text, "streamed: {events:?}");
    assert_eq!(finish, c["finish_reason"], "streamed: {events:?}");
    if let Some(l) = lps.as_array() {
        assert_eq!(&streamed_lps, l, "streamed: {events:?}");
    }
    (text, lps, c["finish_reason"].clone(), v["usage"].clone())
}

/// `max_tokens` 0 with `echo` (how evaluation harnesses score a prompt): the prompt alone,
/// with its items where `logprobs` asks, finished for `length` with no completion token, on
/// an engine and through an upstream pool; without `echo` it is refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_answers_the_prompt_alone_for_max_tokens_0_with_echo() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ""));
    let prompt = "once upon a time";
    let with_4 = format!(
        r#"{{"model":"m","prompt":"{prompt}","max_tokens":4,"temperature":0,"echo":true,"logprobs":1}}"#
    );
    let v: Value = post_json(&gw, "/v1/completions", &with_4).await;
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let lps_4 = v["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .clone();
    let scored = with_4.replace(r#""max_tokens":4"#, r#""max_tokens":0"#);
    let echoed = scored.replace(r#","logprobs":1"#, "");
    let (text, lps, finish, usage) = prompt_alone(&gw, &scored).await;
    assert_eq!(text, prompt);
    assert_eq!(finish, "length");
    assert_eq!(usage["prompt_tokens"], prompt_tokens, "{usage}");
    assert_eq!(usage["completion_tokens"], 0, "{usage}");
    let lps = lps.as_array().unwrap().clone();
    assert_eq!(lps.len() as u64, prompt_tokens);
    assert!(lps[0].is_null());
    for (a, b) in lps.iter().zip(&lps_4).skip(1) {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        assert!(a <= 0.0 && (a - b).abs() < 1e-3, "{a} vs {b}");
    }
    let (text_e, lps_e, finish_e, usage_e) = prompt_alone(&gw, &echoed).await;
    assert_eq!(
        (text_e.as_str(), &finish_e, &usage_e),
        (prompt, &finish, &usage)
    );
    assert!(lps_e.is_null(), "{lps_e}");
    let no_echo = echoed.replace(r#","echo":true"#, "");
    refused(&gw, "/v1/completions", &no_echo, "needs `echo`").await;

    // Through an upstream pool (`gateway worker` behind an OpenAI-compatible worker): the
    // upstream is asked with `echo`, and the answers are the same.
    let worker = remote_worker(&model);
    let up = Gateway::start(&config(&remote_upstream(&worker), "", ""));
    let (text_u, lps_u, finish_u, usage_u) = prompt_alone(&up, &scored).await;
    assert_eq!(
        (text_u.as_str(), &finish_u, &usage_u),
        (prompt, &finish, &usage)
    );
    assert_eq!(lps_u.as_array(), Some(&lps));
    let (text_u, lps_u, _, usage_u) = prompt_alone(&up, &echoed).await;
    assert_eq!((text_u.as_str(), &usage_u), (prompt, &usage));
    assert!(lps_u.is_null(), "{lps_u}");
}

/// vLLM's `prompt_logprobs`: each prompt token's log-probability, id and rank, with the k
/// most likely tokens at its place, on completions (in each choice) and chat (in the
/// response); the same numbers as `echo` with `logprobs` scores; refused where it cannot
/// be served (past 20, streamed, a pool of simulated workers).
#[tokio::test(flavor = "multi_thread")]
async fn vllms_prompt_logprobs_give_each_prompt_tokens_id_rank_and_the_most_likely() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ""));
    let tok = kernels::load::load(&model).unwrap().tokenizer;
    let ids = tok.encode("once upon a time").unwrap();
    let body = r#"{"model":"m","prompt":"once upon a time","max_tokens":3,"temperature":0,"prompt_logprobs":3}"#;
    let v: Value = post_json(&gw, "/v1/completions", body).await;
    let choice = &v["choices"][0];
    assert!(choice["logprobs"].is_null(), "not asked: {v}");
    assert!(
        !choice["text"].as_str().unwrap().starts_with("once"),
        "no echo: {v}"
    );
    let list = choice["prompt_logprobs"].as_array().expect("a list");
    assert_eq!(list.len(), ids.len(), "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    assert!(list[0].is_null());
    let mut ranks = Vec::new();
    for (at, (entry, id)) in list.iter().zip(&ids).enumerate().skip(1) {
        let m = entry.as_object().unwrap();
        // The prompt's own token first, then the 3 most likely (ranks 1 to 3), one entry
        // each: 3 entries where the prompt's token is among them, else 4.
        let (first, own) = m.iter().next().unwrap();
        assert_eq!(first, &id.to_string(), "position {at}: {entry}");
        assert_eq!(
            own["decoded_token"],
            String::from_utf8_lossy(tok.token_bytes(*id)).as_ref()
        );
        let rank = own["rank"].as_u64().unwrap();
        let lp = own["logprob"].as_f64().unwrap();
        let top: Vec<(u64, f64)> = m
            .values()
            .skip(1)
            .map(|e| (e["rank"].as_u64().unwrap(), e["logprob"].as_f64().unwrap()))
            .collect();
        let in_top = rank <= 3;
        assert_eq!(
            m.len(),
            if in_top { 3 } else { 4 },
            "position {at}: {entry}"
        );
        // Ranks 1.., most likely first; the prompt's token no likelier than the first,
        // and past the third where it is not among them.
        let best = top.first().map_or(lp, |t| t.1);
        assert!(
            top.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 >= w[1].1),
            "{entry}"
        );
        assert!(rank >= 1 && lp <= best + 1e-6, "position {at}: {entry}");
        if !in_top {
            assert!(top.iter().all(|t| t.1 >= lp), "position {at}: {entry}");
        }
        ranks.push(rank);
    }
    // The same log-probabilities as `echo` with `logprobs` gives the prompt's tokens.
    let echo = body.replace(r#""prompt_logprobs":3"#, r#""echo":true,"logprobs":1"#);
    let e: Value = post_json(&gw, "/v1/completions", &echo).await;
    let lps = e["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .clone();
    for (at, entry) in list.iter().enumerate().skip(1) {
        let own = entry.as_object().unwrap().values().next().unwrap();
        assert_eq!(own["logprob"], lps[at], "position {at}");
    }
    // Both at once: each its own number of alternatives.
    let both = body.replace(
        r#""prompt_logprobs":3"#,
        r#""prompt_logprobs":3,"echo":true,"logprobs":1"#,
    );
    let b: Value = post_json(&gw, "/v1/completions", &both).await;
    assert_eq!(
        b["choices"][0]["prompt_logprobs"], choice["prompt_logprobs"],
        "{b}"
    );
    assert_eq!(
        b["choices"][0]["logprobs"], e["choices"][0]["logprobs"],
        "{b}"
    );
    // Chat: one list, in the response, as long as the templated prompt.
    let chat = r#"{"model":"m","messages":[{"role":"user","content":"hello"}],"max_tokens":2,"prompt_logprobs":0}"#;
    let c: Value = post_json(&gw, "/v1/chat/completions", chat).await;
    let list = c["prompt_logprobs"].as_array().expect("a list");
    assert_eq!(
        list.len() as u64,
        c["usage"]["prompt_tokens"].as_u64().unwrap(),
        "{c}"
    );
    assert!(
        list[1..].iter().all(|e| e.as_object().unwrap().len() == 1),
        "k = 0: {c}"
    );
    assert!(c["choices"][0].get("prompt_logprobs").is_none(), "{c}");
    // Refused, naming the field.
    for (body, why) in [
        (body.replace(":3}", ":21}"), "0 to 20"),
        (body.replace(":3}", ":-1}"), "0 to 20"),
        (body.replace(":3}", r#":3,"stream":true}"#), "stream"),
    ] {
        let r = post(&gw, "/v1/completions", &body).await;
        assert_eq!(r.status(), 400, "{body}");
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["error"]["param"], "prompt_logprobs", "{err}");
        assert!(
            err["error"]["message"].as_str().unwrap().contains(why),
            "{err}"
        );
    }
    let sim = Gateway::start(&config(FAST_SIM, "", ""));
    let r = post(&sim, "/v1/completions", body).await;
    assert_eq!(r.status(), 400);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["param"], "prompt_logprobs", "{err}");
    eprintln!("ranks: {ranks:?}");
}
