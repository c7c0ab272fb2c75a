//! `n` choices per request: each its own sequence on the engine (routed on its own), whole
//! and streamed, with the seed moving on by the choice's index; admission reserves for
//! all of them; completions with several prompts, `n` choices each; `best_of`.

use crate::common;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;

fn chat(n: u32, extra: &str) -> String {
    format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"max_tokens":8,"temperature":1,"seed":7,"n":{n}{extra}}}"#
    )
}

/// Each choice's text (chat's `message.content`, or completions' `text`), checking that
/// the choices come in index order.
fn texts(v: &Value) -> Vec<String> {
    v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i as u64, "{v}");
            let text = c["message"]["content"].as_str().or(c["text"].as_str());
            text.unwrap().to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn n_choices_whole_and_streamed() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ""));
    let one: Value = post_json(&gw, "/v1/chat/completions", &chat(1, "")).await;
    let three: Value = post_json(&gw, "/v1/chat/completions", &chat(3, "")).await;
    let t = texts(&three);
    assert_eq!(t.len(), 3);
    // Choice 0 has the request's seed; the others the seed plus their index.
    assert_eq!(t[0], texts(&one)[0], "{three}");
    assert!(t[1] != t[0] || t[2] != t[0], "the choices differ: {t:?}");
    let again: Value = post_json(&gw, "/v1/chat/completions", &chat(3, "")).await;
    assert_eq!(texts(&again), t, "the same seed, the same choices");
    // Usage: the prompt once, the completions added up.
    assert_eq!(
        three["usage"]["prompt_tokens"],
        one["usage"]["prompt_tokens"]
    );
    let done = three["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((3..=24).contains(&done), "{three}");

    // Streamed: a role frame per choice, each choice's text and finish by its index, one
    // usage frame after all have finished, then [DONE].
    let body = chat(
        3,
        r#","stream":true,"stream_options":{"include_usage":true}"#,
    );
    let events = sse_events(post(&gw, "/v1/chat/completions", &body).await).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let (mut text, mut roles, mut finishes) = (BTreeMap::new(), 0, 0);
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert!(usage.is_none(), "nothing after the usage frame: {c}");
        if !c["usage"].is_null() {
            usage = Some(c["usage"].clone());
            continue;
        }
        let ch = &c["choices"][0];
        let i = ch["index"].as_u64().unwrap();
        if ch["delta"]["role"] == "assistant" {
            roles += 1;
        }
        if let Some(s) = ch["delta"]["content"].as_str() {
            text.entry(i).or_insert_with(String::new).push_str(s);
        }
        if !ch["finish_reason"].is_null() {
            finishes += 1;
        }
    }
    assert_eq!((roles, finishes), (3, 3), "{events:?}");
    assert_eq!(
        text.into_values().collect::<Vec<_>>(),
        t,
        "streamed as whole"
    );
    assert_eq!(usage.unwrap()["completion_tokens"], done);

    // Completions with logprobs: each choice its own lists.
    let body = r#"{"model":"m","prompt":"once","max_tokens":4,"temperature":0,"n":2,"logprobs":1}"#;
    let v: Value = post_json(&gw, "/v1/completions", body).await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for c in choices {
        let tokens: Vec<&str> = c["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(tokens.concat(), c["text"].as_str().unwrap(), "{v}");
    }
    assert_eq!(
        choices[0]["text"], choices[1]["text"],
        "greedy: the same text"
    );
}

/// Completions with several prompts (text and token ids), `n` each: choices indexed
/// prompt by prompt, each prompt's the same as its request alone; usage adds the prompts
/// up; streamed, each choice by its index.
#[tokio::test(flavor = "multi_thread")]
async fn several_prompts_in_one_completions_request() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ""));
    let tok = kernels::load::load(&model).unwrap().tokenizer;
    let ids = tok.encode("the quick").unwrap();
    let body = |prompt: &str, extra: &str| {
        format!(
            r#"{{"model":"m","prompt":{prompt},"max_tokens":5,"temperature":1,"seed":3,"n":2,"echo":true{extra}}}"#
        )
    };
    let alone_a: Value =
        post_json(&gw, "/v1/completions", &body(r#""once upon a time""#, "")).await;
    let alone_b: Value = post_json(&gw, "/v1/completions", &body(&format!("{ids:?}"), "")).await;
    let both: Value = post_json(
        &gw,
        "/v1/completions",
        &body(&format!(r#"["once upon a time", {ids:?}]"#), ""),
    )
    .await;
    let text = |v: &Value, i: usize| v["choices"][i]["text"].as_str().unwrap().to_string();
    let choices = both["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4, "{both}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i as u64, "{both}");
    }
    for j in 0..2 {
        assert_eq!(text(&both, j), text(&alone_a, j), "{both}");
        assert_eq!(text(&both, 2 + j), text(&alone_b, j), "{both}");
    }
    assert!(text(&both, 2).starts_with("the quick"), "{both}");
    let sum =
        |k: &str| alone_a["usage"][k].as_u64().unwrap() + alone_b["usage"][k].as_u64().unwrap();
    assert_eq!(
        both["usage"]["prompt_tokens"].as_u64().unwrap(),
        sum("prompt_tokens")
    );
    assert_eq!(
        both["usage"]["completion_tokens"].as_u64().unwrap(),
        sum("completion_tokens")
    );
    // Streamed: each choice's text by its index, echo first.
    let streamed = body(
        &format!(r#"["once upon a time", {ids:?}]"#),
        r#","stream":true"#,
    );
    let events = sse_events(post(&gw, "/v1/completions", &streamed).await).await;
    let mut texts = BTreeMap::new();
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(e).unwrap();
        let ch = &c["choices"][0];
        if let Some(t) = ch["text"].as_str() {
            let i = ch["index"].as_u64().unwrap() as usize;
            texts.entry(i).or_insert_with(String::new).push_str(t);
        }
    }
    let want: Vec<String> = (0..4).map(|i| text(&both, i)).collect();
    assert_eq!(texts.into_values().collect::<Vec<_>>(), want);
    // Too many choices in all.
    let prompts = format!("[{}]", [r#""a""#; 9].join(","));
    let many = body(&prompts, "").replace(r#""n":2"#, r#""n":16"#);
    assert_eq!(post(&gw, "/v1/completions", &many).await.status(), 400);
}

/// `best_of`: of each prompt's `best_of` choices, the `n` with the highest mean
/// log-probability per token come back, best first; usage counts all of them; it cannot be
/// streamed, and is refused below `n` or past 16.
#[tokio::test(flavor = "multi_thread")]
async fn best_of_returns_the_most_likely_choices() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ""));
    let body = |extra: &str| {
        format!(
            r#"{{"model":"m","prompt":["once upon a time","the sea"],"max_tokens":6,"temperature":1.2,"seed":11{extra}}}"#
        )
    };
    // The candidates: `n` = 4 with the same seed draws the same four per prompt.
    let all: Value = post_json(&gw, "/v1/completions", &body(r#","n":4,"logprobs":1"#)).await;
    let mean = |c: &Value| {
        let lps: Vec<f64> = c["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        lps.iter().sum::<f64>() / lps.len().max(1) as f64
    };
    let candidates = all["choices"].as_array().unwrap();
    let mut want = Vec::new();
    for p in 0..2 {
        let mut group: Vec<&Value> = candidates[p * 4..p * 4 + 4].iter().collect();
        group.sort_by(|a, b| mean(b).total_cmp(&mean(a)));
        want.extend(
            group[..2]
                .iter()
                .map(|c| c["text"].as_str().unwrap().to_string()),
        );
    }
    for extra in [
        r#","n":2,"best_of":4,"logprobs":1"#,
        r#","n":2,"best_of":4"#,
    ] {
        let v: Value = post_json(&gw, "/v1/completions", &body(extra)).await;
        assert_eq!(texts(&v), want, "{extra}: {v}");
        // Log-probabilities only where asked for.
        for c in v["choices"].as_array().unwrap() {
            assert_eq!(c["logprobs"].is_null(), !extra.contains("logprobs"), "{v}");
        }
        // All four candidates' tokens are counted.
        assert_eq!(v["usage"], all["usage"], "{v}");
    }
    // The best are not simply the first ones drawn (else this would not tell).
    let first: Vec<&str> = [0, 1, 4, 5]
        .iter()
        .map(|&i| candidates[i]["text"].as_str().unwrap())
        .collect();
    assert_ne!(want, first, "{all}");
    for (extra, why) in [
        (r#","n":3,"best_of":2"#, "best_of"),
        (r#","best_of":17"#, "best_of"),
        (r#","n":1,"best_of":2,"stream":true"#, "streamed"),
    ] {
        refused(&gw, "/v1/completions", &body(extra), why).await;
    }
    // `best_of` equal to `n` streams as `n` does.
    let r = post(
        &gw,
        "/v1/completions",
        &body(r#","n":2,"best_of":2,"stream":true"#),
    )
    .await;
    assert_eq!(r.status(), 200);
}

/// Admission reserves for every choice: a request that fits the burst alone does not
/// with three choices.
#[tokio::test(flavor = "multi_thread")]
async fn admission_reserves_for_every_choice() {
    let gw = Gateway::start(&config(
        FAST_SIM,
        "tokens_per_second = 10.0\nburst_seconds = 10.0",
        "",
    ));
    let body = |n: u32| {
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],"max_tokens":12,"n":{n}}}"#
        )
    };
    let r = post(&gw, "/v1/chat/completions", &body(1)).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    let r = post(&gw, "/v1/chat/completions", &body(3)).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "request_exceeds_contract", "{v}");
}

/// With a long prompt the other choices start after the first: they find its prompt in the
/// engine's prefix cache, so the prompt is computed once.
#[tokio::test(flavor = "multi_thread")]
async fn choices_of_a_long_prompt_share_its_computation() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ""));
    let prompt = "lorem ipsum dolor sit amet ".repeat(60);
    let body =
        format!(r#"{{"model":"m","prompt":"{prompt}","max_tokens":3,"temperature":0,"n":3}}"#);
    let v: Value = post_json(&gw, "/v1/completions", &body).await;
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens >= 256, "{v}");
    let m = gw.metrics().await;
    let cached = m
        .lines()
        .find(|l| l.starts_with("tollgate_engine_cached_prompt_tokens_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no cached prompt tokens in {m}"));
    // Two choices took whole blocks of the prompt from the cache (all but the last block,
    // partly filled, and at most one block less than the prompt).
    assert!(
        cached >= 2.0 * (prompt_tokens as f64 - 32.0),
        "{cached} cached of 2 × {prompt_tokens}"
    );
}

/// A whole answer of more than a megabyte (16 choices of 12,000 tokens: rendered on the
/// runtime's blocking threads) is the streamed one, choice by choice.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_whole_answer_is_the_streamed_one() {
    let long = r#"{ kind = "sim", prefill_tokens_per_s = 0.0, decode_step_ms = 0.0, decode_step_ms_per_seq = 0.0, min_output_tokens = 12000, max_output_tokens = 12000 }"#;
    let gw = Gateway::start(&config(long, "", ""));
    let body = |extra: &str| {
        format!(
            r#"{{"model":"m","prompt":"a long story","max_tokens":12000,"seed":3,"n":16{extra}}}"#
        )
    };
    let r = post(&gw, "/v1/completions", &body("")).await;
    assert_eq!(r.status(), 200);
    let whole: Value = r.json().await.expect("JSON");
    let t = texts(&whole);
    let bytes: usize = t.iter().map(String::len).sum();
    assert!(bytes >= 1 << 20, "texts of {bytes} bytes: rendered apart");
    assert_eq!(whole["usage"]["completion_tokens"], 16 * 12000);
    let events = sse_events(post(&gw, "/v1/completions", &body(r#","stream":true"#)).await).await;
    let mut streamed = BTreeMap::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).expect("a chunk");
        let ch = &c["choices"][0];
        let text = ch["text"].as_str().expect("text");
        streamed
            .entry(ch["index"].as_u64().expect("index"))
            .or_insert_with(String::new)
            .push_str(text);
    }
    assert_eq!(streamed.into_values().collect::<Vec<_>>(), t);
}
