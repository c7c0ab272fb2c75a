//! Embeddings on the in-process engine (synthetic model): a request's answer is the
//! normalized final hidden state of its prompt's last token, with no token generated. On
//! the CPU backend and on the GPU path over the CUDA emulator (`backend = "emulator"`,
//! where the engine plans each step while the one before runs: an embedding's last row
//! comes back with its step's tokens). A prompt's vector is the same alone, again from the
//! prefix cache, many at once, and amid other requests being generated, whose outputs are
//! those of their solo runs. A file that asks for another pooling gets embeddings refused.

use crate::common;
use futures::StreamExt;
use gateway::config::{BackendKind, EngineConfig};
use gateway::engine::EngineWorker;
use gateway::worker::{Usage, Worker, WorkerEvent};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// An embeddings request's vector and usage.
async fn embed(w: &EngineWorker, prompt: &str) -> (Vec<f32>, Usage) {
    let mut r = (*common::worker_req(prompt, 0)).clone();
    r.embed = true;
    let mut s = w.submit(Arc::new(r)).await.expect("accepted");
    let mut vector = None;
    while let Some(ev) = s.next().await {
        match ev.expect("an event") {
            WorkerEvent::Embedding(v) => {
                assert!(vector.is_none(), "one vector");
                vector = Some(v);
            }
            WorkerEvent::Done { usage, .. } => {
                return (vector.expect("a vector before the end"), usage);
            }
            other => panic!("an embeddings request answered {other:?}"),
        }
    }
    panic!("no Done event");
}

/// A greedy generation's text.
async fn generate(w: &EngineWorker, prompt: &str) -> String {
    let mut s = w
        .submit(common::worker_req(prompt, 16))
        .await
        .expect("accepted");
    let mut text = String::new();
    while let Some(ev) = s.next().await {
        match ev.expect("an event") {
            WorkerEvent::Delta { text: t, .. } => text.push_str(&t),
            WorkerEvent::Done { .. } => return text,
            _ => {}
        }
    }
    panic!("no Done event");
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn prompt(i: usize) -> String {
    format!(
        "{} item {i}",
        "the quick brown fox jumps over the lazy dog ".repeat(i + 2)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_on_the_cpu_backend() {
    case(BackendKind::Cpu).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_on_the_gpu_path() {
    for backend in common::gpu_paths() {
        case(backend).await;
    }
}

/// A model whose file asks for embeddings pooled otherwise (`llama.pooling_type`: mean)
/// gets embeddings requests refused, in the worker and through the API, with the reason;
/// it still generates. One that names the last token explicitly embeds as one that
/// names nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_that_asks_for_another_pooling_gets_no_embeddings() {
    let dir = common::tempdir::TempDir::new();
    let write = |name: &str, pooling_type| {
        let path = dir.0.join(name);
        let spec = kernels::synth::SynthSpec {
            pooling_type,
            ..kernels::synth::SynthSpec::tiny()
        };
        kernels::synth::write_model(&path, &spec).expect("written");
        path
    };
    let mean = write("mean.gguf", Some(1));
    let loaded = kernels::load::load(&mean).expect("loads");
    let w = common::engine_on(&loaded, BackendKind::Cpu);
    let mut r = (*common::worker_req("the quick brown fox", 0)).clone();
    r.embed = true;
    match w.submit(Arc::new(r)).await {
        Err(gateway::worker::WorkerError::Rejected {
            status,
            message,
            code,
            ..
        }) => {
            assert_eq!((status, code), (400, None));
            assert!(
                message.contains("mean embeddings") && message.contains("llama.pooling_type"),
                "{message}"
            );
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("an embeddings request taken by a mean-pooled model"),
    }
    assert!(!generate(&w, "once upon a time").await.is_empty());
    drop(w);

    let gw = common::Gateway::start(&common::engine_config(&mean, ""));
    common::refused(
        &gw,
        "/v1/embeddings",
        r#"{"model": "m", "input": ["one", "two"]}"#,
        "asks for mean embeddings",
    )
    .await;
    let chat = common::post_json(
        &gw,
        "/v1/chat/completions",
        r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}"#,
    )
    .await;
    assert!(
        chat["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{chat}"
    );

    // `llama.pooling_type = 3` (last): the same vectors as a file that says nothing.
    let (last, plain) = (write("last.gguf", Some(3)), write("plain.gguf", None));
    let (last, plain) = (
        kernels::load::load(&last).expect("loads"),
        kernels::load::load(&plain).expect("loads"),
    );
    let (a, b) = (
        common::engine_on(&last, BackendKind::Cpu),
        common::engine_on(&plain, BackendKind::Cpu),
    );
    let ((va, _), (vb, _)) = (embed(&a, &prompt(1)).await, embed(&b, &prompt(1)).await);
    assert_eq!(va, vb);
}

async fn case(backend: BackendKind) {
    let (_d, m) = common::synthetic_model();
    let cfg = EngineConfig {
        backend,
        threads: 2,
        max_batch_tokens: Some(64),
        max_seqs: Some(16),
        ..EngineConfig::default()
    };
    let w = Arc::new(EngineWorker::start("test".into(), &m, &cfg, 0).expect("an engine"));
    let dim = m.model.config.dim;
    // Alone: unit vectors of the model's width, nothing generated.
    let mut alone = Vec::new();
    for i in 0..4 {
        let (v, usage) = embed(&w, &prompt(i)).await;
        assert_eq!(v.len(), dim);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{backend:?}: norm {norm}");
        assert_eq!(usage.completion_tokens, 0);
        assert!(usage.prompt_tokens > 10, "{usage:?}");
        alone.push(v);
    }
    assert!(
        max_diff(&alone[0], &alone[1]) > 1e-3,
        "different prompts differ"
    );
    // Past the context: refused, in an input's terms.
    let mut long = (*common::worker_req(&"word ".repeat(20_000), 0)).clone();
    long.embed = true;
    match w.submit(Arc::new(long)).await {
        Err(gateway::worker::WorkerError::Rejected {
            status,
            message,
            code,
            ..
        }) => {
            assert_eq!((status, code), (400, Some("context_length_exceeded")));
            assert!(message.contains("the input has"), "{message}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("an input past the context was taken"),
    }
    // Again: its blocks from the prefix cache, the same vector.
    let (again, usage) = embed(&w, &prompt(3)).await;
    assert!(usage.cached_tokens > 0, "{backend:?}: {usage:?}");
    assert!(
        max_diff(&again, &alone[3]) < 1e-5,
        "{backend:?}: from the cache"
    );
    // Many at once, of different lengths (each prefilled in chunks, ending at different
    // steps): each as alone. On the GPU path the engine plans steps ahead meanwhile (an
    // embedding's last row comes back with its step's tokens).
    let ahead = w.stats().steps_ahead.load(Ordering::Relaxed);
    let many = futures::future::join_all((0..8).map(|i| {
        let w = w.clone();
        async move { embed(&w, &format!("batch {i} {}", prompt(i % 4 + 2 * (i / 4)))).await }
    }))
    .await;
    let ahead = w.stats().steps_ahead.load(Ordering::Relaxed) - ahead;
    if backend != BackendKind::Cpu {
        assert!(ahead > 0, "no step planned ahead among embeddings");
    }
    for (i, (v, _)) in many.iter().enumerate() {
        let (want, _) = embed(&w, &format!("batch {i} {}", prompt(i % 4 + 2 * (i / 4)))).await;
        assert!(
            max_diff(v, &want) < 1e-5,
            "{backend:?}: embedding {i} among many"
        );
    }
    // Amid generations: each vector as alone, each generation as its solo run.
    let solo: Vec<String> = futures::future::join_all((0..4).map(|i| {
        let w = w.clone();
        async move { generate(&w, &format!("story {i}: once upon a time")).await }
    }))
    .await;
    let gens = (0..4).map(|i| {
        let w = w.clone();
        tokio::spawn(async move { generate(&w, &format!("story {i}: once upon a time")).await })
    });
    let embeds = (0..4).map(|i| {
        let w = w.clone();
        // Fresh prompts (no cache), interleaved with the generations' steps.
        tokio::spawn(async move { embed(&w, &format!("fresh {i} {}", prompt(i))).await })
    });
    let (gens, embeds): (Vec<_>, Vec<_>) = (gens.collect(), embeds.collect());
    for (i, g) in gens.into_iter().enumerate() {
        assert_eq!(
            g.await.expect("ran"),
            solo[i],
            "{backend:?}: generation {i}"
        );
    }
    for (i, e) in embeds.into_iter().enumerate() {
        let (v, _) = e.await.expect("ran");
        let (want, _) = embed(&w, &format!("fresh {i} {}", prompt(i))).await;
        assert!(
            max_diff(&v, &want) < 1e-5,
            "{backend:?}: embedding {i} amid others"
        );
    }
}

/// vLLM's `truncate_prompt_tokens` on embeddings, through the gateway: each input's last k
/// tokens only, counted so, and embedded as those tokens alone are; −1 keeps an input that
/// fits the context whole; 0 is refused.
#[tokio::test(flavor = "multi_thread")]
async fn truncate_prompt_tokens_embeds_each_inputs_last_tokens() {
    let (_d, model) = common::synthetic_model_file();
    let gw = common::Gateway::start(&common::engine_config(&model, ""));
    let ids: Vec<u32> = (100..120).collect();
    let ask = |input: serde_json::Value, keep: Option<i64>| {
        let mut body = serde_json::json!({"model": "m", "input": input});
        if let Some(k) = keep {
            body["truncate_prompt_tokens"] = k.into();
        }
        body.to_string()
    };
    let vectors = |v: &serde_json::Value| -> Vec<Vec<f64>> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                d["embedding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    let cut = common::post_json(
        &gw,
        "/v1/embeddings",
        &ask(serde_json::json!([ids, ids[..12]]), Some(5)),
    )
    .await;
    assert_eq!(cut["usage"]["prompt_tokens"], 10, "{cut}");
    let tails = common::post_json(
        &gw,
        "/v1/embeddings",
        &ask(serde_json::json!([ids[15..], ids[7..12]]), None),
    )
    .await;
    let (got, want) = (vectors(&cut), vectors(&tails));
    for (g, w) in got.iter().zip(&want) {
        assert!(
            g.iter().zip(w).all(|(a, b)| (a - b).abs() < 1e-5),
            "the cut input's vector is its last tokens'"
        );
    }
    let whole = common::post_json(
        &gw,
        "/v1/embeddings",
        &ask(serde_json::json!(ids), Some(-1)),
    )
    .await;
    assert_eq!(whole["usage"]["prompt_tokens"], 20, "{whole}");
    common::refused(
        &gw,
        "/v1/embeddings",
        &ask(serde_json::json!(ids), Some(0)),
        "truncate_prompt_tokens",
    )
    .await;
}
