//! Tool calling through the API on the engine (synthetic model): `tool_choice` required,
//! named and auto; whole and streamed answers in the OpenAI shape, with arguments that
//! validate against the tool's schema; several calls in one answer (`parallel_tool_calls`);
//! earlier tool turns in the conversation; simulated workers refuse.

use crate::common;
use common::*;
use serde_json::{json, Value};

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "set_mode",
            "description": "Switch the lamp",
            "parameters": {"type": "object",
                "properties": {"mode": {"$ref": "#/$defs/Mode"}, "level": {"enum": [1, 2, 3]}},
                "required": ["mode", "level"], "additionalProperties": false,
                "$defs": {"Mode": {"enum": ["on", "off"]}}}}},
        {"type": "function", "function": {"name": "now"}}
    ])
}

fn body(choice: Value, stream: bool, seed: u64) -> String {
    body_with(choice, stream, seed, json!({}))
}

/// [`body`] with more fields (or others in place of its own).
fn body_with(choice: Value, stream: bool, seed: u64, more: Value) -> String {
    let mut body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "lamp"}],
        "max_tokens": 100,
        "temperature": 1.0,
        "seed": seed,
        "stream": stream,
        "tools": tools(),
        "tool_choice": choice,
    });
    for (k, v) in more.as_object().unwrap() {
        body[k] = v.clone();
    }
    body.to_string()
}

/// A call's name and arguments, checked against the tools by hand.
fn check_call(call: &Value) -> (String, Value) {
    assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
    assert_eq!(call["type"], "function", "{call}");
    let name = call["function"]["name"].as_str().unwrap().to_string();
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    match name.as_str() {
        "set_mode" => {
            let keys: Vec<&String> = args.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["mode", "level"], "{args}");
            assert!(args["mode"] == "on" || args["mode"] == "off", "{args}");
            assert!(
                [1, 2, 3].contains(&args["level"].as_i64().unwrap()),
                "{args}"
            );
        }
        "now" => assert_eq!(args, json!({})),
        other => panic!("no tool {other}"),
    }
    (name, args)
}

/// The streamed answer's tool calls (each merged from its deltas), how many deltas there
/// were, the words and the finish reason.
async fn streamed(gw: &Gateway, body: &str) -> (Vec<Value>, usize, String, String) {
    let events = sse_events(post(gw, "/v1/chat/completions", body).await).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let (mut calls, mut content, mut finish) = (Vec::<Value>::new(), String::new(), String::new());
    let mut deltas = 0;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let c = &v["choices"][0];
        // The first delta of a call has its index (the next), id, type and name; the
        // others the index of the call they continue (the last begun), and more of its
        // arguments.
        if let Some(delta) = c["delta"]["tool_calls"].as_array() {
            assert_eq!(delta.len(), 1);
            let d = &delta[0];
            deltas += 1;
            let more = d["function"]["arguments"].as_str().unwrap();
            if d["id"].is_string() {
                assert_eq!(d["index"], calls.len(), "{e}");
                assert!(d["function"]["name"].is_string(), "{e}");
                calls.push(d.clone());
            } else {
                assert_eq!(d["index"], calls.len() - 1, "{e}");
                assert!(d["function"].get("name").is_none(), "{e}");
                let call = calls.last_mut().unwrap();
                let args = call["function"]["arguments"].as_str().unwrap().to_string() + more;
                call["function"]["arguments"] = args.into();
            }
        }
        content.push_str(c["delta"]["content"].as_str().unwrap_or_default());
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    for call in &mut calls {
        call.as_object_mut().unwrap().remove("index");
    }
    (calls, deltas, content, finish)
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_whole_and_streamed_follow_the_tools_schemas() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ""));
    let mut names = Vec::new();
    let single = json!({"parallel_tool_calls": false});
    for seed in 0..4 {
        let v = post_json(
            &gw,
            "/v1/chat/completions",
            &body_with(json!("required"), false, seed, single.clone()),
        )
        .await;
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        assert!(c["message"]["content"].is_null(), "{v}");
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{v}");
        let whole = check_call(&calls[0]);
        // The same draw, streamed: the call's name, its arguments in pieces, then
        // `tool_calls`.
        let (calls, deltas, content, finish) = streamed(
            &gw,
            &body_with(json!("required"), true, seed, single.clone()),
        )
        .await;
        assert_eq!((content.as_str(), finish.as_str()), ("", "tool_calls"));
        assert_eq!(calls.len(), 1);
        assert_eq!(check_call(&calls[0]), whole);
        // The arguments came as they were written, not whole at the end.
        assert!(deltas > 2, "{deltas} deltas");
        names.push(whole.0);
    }
    eprintln!("required: {names:?}");
    // A named function is the one called.
    let named = json!({"type": "function", "function": {"name": "now"}});
    let v = post_json(&gw, "/v1/chat/completions", &body(named, false, 0)).await;
    let (name, _) = check_call(&v["choices"][0]["message"]["tool_calls"][0]);
    assert_eq!(name, "now");
    // Auto: a call or words, each in its own shape, streamed as whole.
    let mut words = 0;
    for seed in 0..6 {
        let v = post_json(
            &gw,
            "/v1/chat/completions",
            &body(json!("auto"), false, seed),
        )
        .await;
        let c = &v["choices"][0];
        let (calls, _, content, finish) = streamed(&gw, &body(json!("auto"), true, seed)).await;
        assert_eq!(c["finish_reason"], finish.as_str(), "{v}");
        match finish.as_str() {
            "tool_calls" => {
                let whole = c["message"]["tool_calls"].as_array().unwrap();
                assert_eq!(whole.len(), calls.len(), "{v}");
                for (a, b) in whole.iter().zip(&calls) {
                    assert_eq!(check_call(a), check_call(b));
                }
            }
            "stop" => {
                words += 1;
                assert!(c["message"]["tool_calls"].is_null(), "{v}");
                assert_eq!(c["message"]["content"], content.as_str(), "{v}");
            }
            "length" => assert!(c["message"]["content"].is_string(), "{v}"),
            other => panic!("{other}: {v}"),
        }
    }
    eprintln!("auto: {words} of 6 answered in words");
    // `none`: no call, plain text.
    let v = post_json(&gw, "/v1/chat/completions", &body(json!("none"), false, 0)).await;
    assert!(v["choices"][0]["message"]["tool_calls"].is_null(), "{v}");
    assert_ne!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn several_calls_in_one_answer_whole_and_streamed() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ""));
    // `[` pushed far up, so that the model opens an array wherever the schema lets it: it
    // can only at the start, where the array is the several-calls form.
    let tokenizer = kernels::load::load(&model).unwrap().tokenizer;
    let open = tokenizer.encode("[").unwrap();
    assert_eq!(open.len(), 1);
    let bias = json!({"max_tokens": 600, "logit_bias": {open[0].to_string(): 100}});
    let mut counts = Vec::new();
    for seed in 0..3 {
        let v = post_json(
            &gw,
            "/v1/chat/completions",
            &body_with(json!("required"), false, seed, bias.clone()),
        )
        .await;
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{v}");
        assert!(c["message"]["content"].is_null(), "{v}");
        let whole = c["message"]["tool_calls"].as_array().unwrap();
        assert!((2..=16).contains(&whole.len()), "{v}");
        let ids: std::collections::HashSet<&str> =
            whole.iter().map(|c| c["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), whole.len(), "each call its own id: {v}");
        // The same draw, streamed: each call under its own index, in the same order.
        let (calls, _, content, finish) =
            streamed(&gw, &body_with(json!("required"), true, seed, bias.clone())).await;
        assert_eq!((content.as_str(), finish.as_str()), ("", "tool_calls"));
        assert_eq!(calls.len(), whole.len());
        for (a, b) in whole.iter().zip(&calls) {
            assert_eq!(check_call(a), check_call(b));
        }
        counts.push(whole.len());
    }
    eprintln!("calls per answer: {counts:?}");
    // `parallel_tool_calls: false`, or a named function: the same push gets one call.
    let named = json!({"type": "function", "function": {"name": "now"}});
    for (choice, parallel) in [(json!("required"), json!(false)), (named, json!(true))] {
        let mut more = bias.clone();
        more["parallel_tool_calls"] = parallel;
        let v = post_json(
            &gw,
            "/v1/chat/completions",
            &body_with(choice, false, 0, more),
        )
        .await;
        let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{v}");
        check_call(&calls[0]);
    }
    // An earlier turn with several calls is taken.
    let conversation = json!({
        "model": "m", "max_tokens": 100, "temperature": 0, "tools": tools(),
        "messages": [
            {"role": "user", "content": "lamp on, and the time"},
            {"role": "assistant", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "set_mode", "arguments": "{\"mode\":\"on\",\"level\":2}"}},
                {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "done"},
            {"role": "tool", "tool_call_id": "call_2", "content": "noon"}
        ]
    });
    let v = post_json(&gw, "/v1/chat/completions", &conversation.to_string()).await;
    assert!(v["choices"][0]["finish_reason"].is_string(), "{v}");
    let r = post(
        &gw,
        "/v1/chat/completions",
        &body_with(
            json!("auto"),
            false,
            0,
            json!({"parallel_tool_calls": "yes"}),
        ),
    )
    .await;
    assert_eq!(r.status(), 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn earlier_tool_turns_are_taken_and_simulated_workers_refuse_tools() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ""));
    let conversation = json!({
        "model": "m",
        "max_tokens": 100,
        "temperature": 0,
        "tools": tools(),
        "tool_choice": "required",
        "parallel_tool_calls": false,
        "messages": [
            {"role": "system", "content": "You run a lamp."},
            {"role": "user", "content": "lamp on"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "set_mode", "arguments": "{\"mode\":\"on\",\"level\":2}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "done"},
            {"role": "user", "content": "and off"}
        ]
    });
    let v = post_json(&gw, "/v1/chat/completions", &conversation.to_string()).await;
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    check_call(&v["choices"][0]["message"]["tool_calls"][0]);
    // The tools' description and the earlier turns are part of the prompt.
    let short = json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "and off"}]});
    let plain = post_json(&gw, "/v1/chat/completions", &short.to_string()).await;
    assert!(
        v["usage"]["prompt_tokens"].as_u64().unwrap()
            > plain["usage"]["prompt_tokens"].as_u64().unwrap() + 100,
        "{v} {plain}"
    );
    let sim = Gateway::start(&config(FAST_SIM, "", ""));
    let r = post(
        &sim,
        "/v1/chat/completions",
        &body(json!("required"), false, 0),
    )
    .await;
    assert_eq!(r.status(), 400);
}
