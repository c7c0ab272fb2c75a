//! Engine throughput: single-stream prefill, and aggregate decode tokens/s at several
//! numbers of concurrent streams through the continuous-batching engine.
//!
//!     cargo run --release -p gateway --example engine_bench [-- MODEL.gguf]
//!
//! Greedy decoding, `TOKENS` (default 128) new tokens per stream (fewer if the model ends
//! its answer). Environment: `BACKEND=auto|cpu|cuda|emulator` (default cpu; `emulator` checks the
//! CUDA path's harness on the CPU, with the tiny model), `STREAMS=1,4,16,64`
//! (the default; the engine gets as many batch slots as the largest), `ACTIVATIONS` (CPU),
//! `THREADS=n` (the CPU backend's threads; default one per CPU),
//! `PREFIX_CACHING=0` (the prefix cache off), `PREFILL_TOKENS=n` (the prefill's prompt
//! length, default 512), `MAX_BATCH_TOKENS=n` (the per-step token
//! budget, chunked prefill), `ATTENTION=tensor` (CUDA: the tensor-core
//! attention kernel), `FORMAT=json|schema|regex|grammar` (the streams' answers
//! in JSON mode, held to a small schema, to a regular expression as vLLM's
//! `guided_regex`, or to a context-free grammar as its `guided_grammar`: the
//! constrained-decoding mask's cost),
//! `SAMPLING=top_p` (temperature 0.8, top-p 0.9, seeded, in place of greedy),
//! `OVERLAP=0` (CUDA: each step waits for the one before instead of being planned while it
//! runs), `PENALTIES=1` (presence 0.5 and frequency 0.3 penalties on every stream),
//! `REPETITION=r` (vLLM's repetition penalty r on every stream: the prompt's and answer's
//! tokens travel to the device as a list), `MIN_P=p` (vLLM's `min_p`, with `SAMPLING`),
//! `LOGPROBS=n` (every stream asks for its tokens' log-probabilities and the n most
//! likely: their logits rows come back to the host), `EMBED=1` (each stream is an
//! embeddings request of an input of about `TOKENS` tokens, each its own: the table counts
//! input tokens embedded; on the GPU path an input's last row comes back with its step's tokens),
//! `PROMPT_TOKENS=n` (each stream's prompt that long, its own from its first token: no
//! prefix shared), `KV_TOKENS=n` (the KV cache's tokens; default every stream's prompt
//! and answer, at least 32,768), `WINDOW_KV_TOKENS=n` (a model with sliding-window
//! layers: their own pool's tokens; 0: none; it prints the engine's preemptions too),
//! `SPECULATE=k` (speculative decoding by prompt lookup, `speculative_tokens = k`: a
//! stream decoding alone proposes up to k drafts a step; it prints the drafts proposed
//! and kept).
//! Without a model path it fetches the real model; `kernels/gpu-check.sh` passes the
//! synthetic SmolLM2-shaped one and `BACKEND=cuda STREAMS=1,64,256 TOKENS=256`.
//! After the prefill it sends the same prompt again, served from the prefix cache.
//! Besides tokens/s it prints the engine's steps and, per step, the time its thread spent
//! in the backend and around it (scheduling, batch building, detokenizing, sending): with
//! a fast backend the second bounds the tokens/s the host can feed, unless steps are
//! planned ahead ("ahead": steps sent while the one before ran, whose host time overlapped
//! the device's).

use futures::StreamExt;
use gateway::config::EngineConfig;
use gateway::engine::EngineWorker;
use gateway::worker::{Prompt, SamplingParams, Worker, WorkerEvent, WorkerRequest};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn req(prompt: String, max_tokens: u32) -> Arc<WorkerRequest> {
    Arc::new(WorkerRequest {
        request_id: "bench".into(),
        tenant: "bench".into(),
        weight: None,
        output_weight: 3.0,
        model: "m".into(),
        prompt: Prompt::Text(prompt),
        prompt_ids: None,
        params: SamplingParams::greedy(max_tokens),
        stream: true,
        embed: false,
        more_inputs: Vec::new(),
        dimensions: None,
    })
}

/// `FORMAT`: the streams' output format (`json`, `schema`, `regex`, `grammar`).
fn format() -> Option<gateway::worker::OutputFormat> {
    use gateway::worker::OutputFormat;
    match std::env::var("FORMAT").as_deref() {
        Ok("json") => Some(OutputFormat::Object),
        Ok("schema") => {
            let schema = serde_json::json!({
                "type": "object",
                "properties": {
                    "title": {"type": "string"},
                    "traveller": {"enum": ["Alex", "Sam"]},
                    "chapters": {"type": "array", "items": {"type": "string"}},
                    "pages": {"type": "integer", "minimum": 1, "maximum": 999}
                },
                "required": ["title", "traveller", "chapters", "pages"],
                "additionalProperties": false
            });
            let spec = serde_json::json!({"name": "story", "schema": schema});
            Some(OutputFormat::schema(spec).expect("the schema"))
        }
        // vLLM's `guided_regex`: a text of words and punctuation as long as the stream.
        Ok("regex") => Some(OutputFormat::regex(r"[A-Za-z][A-Za-z ,.'\n]*").expect("the regex")),
        // vLLM's `guided_grammar`: the same text as sentences of words, a context-free
        // grammar's (its stacks followed each step, its masks kept by them).
        Ok("grammar") => Some(
            OutputFormat::ebnf(
                r#"root ::= sentence+
                   sentence ::= word ( [ ,'\n] word )* [.!?] [ \n]?
                   word ::= [A-Za-z]+"#,
            )
            .expect("the grammar"),
        ),
        _ => None,
    }
}

fn chat(prompt: String, max_tokens: u32) -> Arc<WorkerRequest> {
    let mut r = (*req(String::new(), max_tokens)).clone();
    r.params.format = format();
    if std::env::var("SAMPLING").as_deref() == Ok("top_p") {
        r.params.temperature = 0.8;
        r.params.top_p = 0.9;
        r.params.seed = Some(7);
    }
    // `PENALTIES=1`: presence and frequency penalties on every stream (each row's deltas
    // go to the device, and count the token the step before drew there).
    if std::env::var("PENALTIES").as_deref() == Ok("1") {
        r.params.presence_penalty = 0.5;
        r.params.frequency_penalty = 0.3;
    }
    let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<f32>().ok());
    if let Some(v) = number("REPETITION") {
        r.params.repetition_penalty = v;
    }
    if let Some(p) = number("MIN_P") {
        r.params.min_p = p;
    }
    if let Some(n) = std::env::var("LOGPROBS").ok().and_then(|n| n.parse().ok()) {
        r.params.logprobs = Some(n);
    }
    r.prompt = Prompt::Chat(
        vec![gateway::worker::ChatMessage {
            role: "user".into(),
            content: prompt,
            open: false,
        }],
        None,
    );
    Arc::new(r)
}

/// An embeddings request of passage `i`, about `tokens` tokens (each passage its own words,
/// so that the prefix cache serves none); returns its input tokens.
async fn embed(w: Arc<EngineWorker>, i: usize, tokens: u32) -> u32 {
    let words: Vec<String> = (0..tokens)
        .map(|j| format!("w{}", (i * 31 + j as usize * 7) % 997))
        .collect();
    let mut r = (*req(format!("Passage {i}: {}", words.join(" ")), 0)).clone();
    r.embed = true;
    let mut s = w.submit(Arc::new(r)).await.expect("submit");
    while let Some(ev) = s.next().await {
        if let WorkerEvent::Done { usage, .. } = ev.expect("event") {
            return usage.prompt_tokens;
        }
    }
    panic!("no Done");
}

/// Runs a request; returns (time to first token, completion tokens).
async fn run(w: Arc<EngineWorker>, r: Arc<WorkerRequest>) -> (Duration, u32) {
    let t0 = Instant::now();
    let mut s = w.submit(r).await.expect("submit");
    let mut ttft = None;
    while let Some(ev) = s.next().await {
        match ev.expect("event") {
            WorkerEvent::Delta { .. } => {
                ttft.get_or_insert(t0.elapsed());
            }
            WorkerEvent::Prompt { .. } | WorkerEvent::Embedding(_) => {}
            WorkerEvent::Done { usage, .. } => {
                return (ttft.unwrap_or(t0.elapsed()), usage.completion_tokens)
            }
        }
    }
    panic!("no Done");
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = match std::env::args().nth(1) {
        Some(p) => p.into(),
        None => gateway::model_fetch::resolve("smollm2-135m")?,
    };
    let loaded = kernels::load::load(&path)?;
    let activations = match std::env::var("ACTIVATIONS").as_deref() {
        Ok("q8") => gateway::config::Activations::Q8,
        Ok("f32") => gateway::config::Activations::F32,
        _ => gateway::config::Activations::I16,
    };
    println!("activations: {activations:?} (ACTIVATIONS=i16|q8|f32)");
    let backend = match std::env::var("BACKEND").as_deref() {
        Ok("cuda") => gateway::config::BackendKind::Cuda,
        Ok("auto") => gateway::config::BackendKind::Auto,
        Ok("emulator") => gateway::config::BackendKind::Emulator,
        _ => gateway::config::BackendKind::Cpu,
    };
    let streams: Vec<usize> = match std::env::var("STREAMS") {
        Ok(v) => v
            .split(',')
            .map(|x| x.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => vec![1, 4, 16, 64],
    };
    let tokens: u32 = match std::env::var("TOKENS") {
        Ok(v) => v.parse()?,
        Err(_) => 128,
    };
    let max_seqs = streams.iter().copied().max().unwrap_or(1);
    let prompt_tokens: Option<usize> = std::env::var("PROMPT_TOKENS")
        .ok()
        .and_then(|n| n.parse().ok());
    let cfg = EngineConfig {
        backend,
        max_seqs: Some(max_seqs),
        max_concurrency: Some(max_seqs.max(256)),
        // Room for every stream's prompt and answer.
        kv_tokens: Some(
            match std::env::var("KV_TOKENS").ok().and_then(|n| n.parse().ok()) {
                Some(n) => n,
                None => (max_seqs * (tokens as usize + prompt_tokens.unwrap_or(128))).max(32768),
            },
        ),
        activations,
        max_batch_tokens: std::env::var("MAX_BATCH_TOKENS")
            .ok()
            .and_then(|n| n.parse().ok()),
        prefix_caching: std::env::var("PREFIX_CACHING").as_deref() != Ok("0"),
        // A model with sliding-window layers: their own pool's tokens (0: none).
        window_kv_tokens: std::env::var("WINDOW_KV_TOKENS")
            .ok()
            .and_then(|n| n.parse().ok()),
        overlap_steps: std::env::var("OVERLAP").as_deref() != Ok("0"),
        speculative_tokens: std::env::var("SPECULATE")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        attention: match std::env::var("ATTENTION").as_deref() {
            Ok("tensor") => gateway::config::AttentionKind::Tensor,
            _ => gateway::config::AttentionKind::Simt,
        },
        threads: std::env::var("THREADS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        ..EngineConfig::default()
    };
    let w = Arc::new(EngineWorker::start("bench".into(), &loaded, &cfg, 0)?);
    println!(
        "model {} | backend {backend:?} | kernels: {} | threads: {}",
        path.display(),
        kernels::quant::simd_path(),
        std::thread::available_parallelism()?
    );

    // Warm up.
    run(w.clone(), req("Hello".into(), 4)).await;

    // Prefill: a 512-token prompt (`PREFILL_TOKENS`), one new token.
    let n_prefill: usize = match std::env::var("PREFILL_TOKENS") {
        Ok(v) => v.parse()?,
        Err(_) => 512,
    };
    let long = "The history of the city is long and complex. ".repeat(n_prefill / 8 + 8);
    let ids = loaded.tokenizer.encode(&long)?;
    let n_prompt = ids.len().min(n_prefill);
    let prompt512 = loaded.tokenizer.decode(&ids[..n_prompt]);
    let (ttft, _) = run(w.clone(), req(prompt512.clone(), 1)).await;
    println!(
        "prefill: {n_prompt} tokens in {:.0} ms = {:.0} tokens/s",
        ttft.as_secs_f64() * 1e3,
        n_prompt as f64 / ttft.as_secs_f64()
    );
    // The same prompt again: its whole blocks but the last come from the prefix cache.
    let (warm, _) = run(w.clone(), req(prompt512, 1)).await;
    println!(
        "the same prompt again (prefix cache): first token in {:.1} ms ({:.1}× sooner)",
        warm.as_secs_f64() * 1e3,
        ttft.as_secs_f64() / warm.as_secs_f64()
    );

    if format().is_some() {
        // The grammars' vocabulary is built on a constrained sequence's first step (tens
        // of milliseconds, once per engine): before the timed rounds.
        run(w.clone(), chat("Hello".into(), 2)).await;
    }
    println!(
        "{:>8} {:>10} {:>10} {:>12} {:>8} {:>8} {:>12} {:>12}",
        "streams", "tokens", "seconds", "tokens/s", "steps", "ahead", "host µs/st", "backend µs/st"
    );
    let snap = |w: &EngineWorker| {
        let s = w.stats();
        let r = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        (
            r(&s.steps),
            r(&s.host_ns),
            r(&s.backend_ns),
            r(&s.steps_ahead),
        )
    };
    for c in streams {
        let before = snap(&w);
        let t0 = Instant::now();
        let embeds = std::env::var("EMBED").as_deref() == Ok("1");
        let tasks: Vec<_> = (0..c)
            .map(|i| match embeds {
                // Inputs of this round its own (past the earlier rounds' numbers).
                true => tokio::spawn(embed(w.clone(), i + 1000 * c, tokens)),
                false => {
                    let mut prompt = format!("Write a long story about a traveller named Alex, number {i}, who crosses the mountains.");
                    if let Some(n) = prompt_tokens {
                        // Its number first: no two streams share a block of prompt.
                        let text = format!("{i}. {}", long.repeat(n / 64 + 2));
                        let ids = loaded.tokenizer.encode(&text).expect("the prompt encodes");
                        prompt = loaded.tokenizer.decode(&ids[..n.min(ids.len())]);
                    }
                    let run = run(w.clone(), chat(prompt, tokens));
                    tokio::spawn(async move { run.await.1 })
                }
            })
            .collect();
        let mut tokens = 0;
        for t in tasks {
            tokens += t.await?;
        }
        let secs = t0.elapsed().as_secs_f64();
        let after = snap(&w);
        let steps = (after.0 - before.0).max(1);
        let per = |a: u64, b: u64| (a - b) as f64 / steps as f64 / 1e3;
        println!(
            "{c:>8} {tokens:>10} {secs:>10.2} {:>12.1} {steps:>8} {:>8} {:>12.1} {:>12.1}",
            tokens as f64 / secs,
            after.3 - before.3,
            per(after.1, before.1),
            per(after.2, before.2),
        );
    }
    if let Some(c) = w.engine_counters().filter(|c| c.kv_window_blocks_total > 0) {
        println!(
            "windowed layers' own KV pool: {} blocks (WINDOW_KV_TOKENS; 0: none)",
            c.kv_window_blocks_total
        );
    }
    if let Some(c) = w.engine_counters().filter(|c| c.draft_tokens > 0) {
        println!(
            "speculation (SPECULATE): {} drafts proposed, {} kept",
            c.draft_tokens, c.draft_tokens_accepted
        );
    }
    println!(
        "preemptions: {}",
        w.stats()
            .preemptions
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let s = w.stats();
    let r = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let (adjusted, read, scored) = (
        r(&s.rows_adjusted_on_device),
        r(&s.rows_read_back),
        r(&s.rows_scored_on_device),
    );
    if adjusted + read + scored > 0 {
        println!(
            "GPU path: {adjusted} rows adjusted on the device, {scored} rows' \
             log-probabilities computed there, {read} rows' logits read back"
        );
    }
    Ok(())
}
