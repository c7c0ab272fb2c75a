//! Tool calling through the API on the engine (synthetic model): `tool_choice` required,
//! named and auto; whole and streamed answers in the OpenAI shape, with arguments that
//! validate against the tool's schema; earlier tool turns in the conversation; simulated
//! workers refuse.

mod common;
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
    json!({
        "model": "m",
        "messages": [{"role": "user", "content": "lamp"}],
        "max_tokens": 100,
        "temperature": 1.0,
        "seed": seed,
        "stream": stream,
        "tools": tools(),
        "tool_choice": choice,
    })
    .to_string()
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

/// The streamed answer's tool call (merged from its deltas, and how many there were),
/// words and finish reason.
async fn streamed(gw: &Gateway, body: &str) -> (Option<Value>, usize, String, String) {
    let events = sse_events(post(gw, "/v1/chat/completions", body).await).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let (mut call, mut content, mut finish) = (None, String::new(), String::new());
    let mut deltas = 0;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let c = &v["choices"][0];
        // The first delta of a call has its id, type and name; the others more of its
        // arguments.
        if let Some(calls) = c["delta"]["tool_calls"].as_array() {
            assert_eq!(calls.len(), 1);
            assert_eq!(calls[0]["index"], 0);
            deltas += 1;
            let more = calls[0]["function"]["arguments"].as_str().unwrap();
            match &mut call {
                None => {
                    assert!(
                        calls[0]["id"].is_string() && calls[0]["function"]["name"].is_string(),
                        "{e}"
                    );
                    call = Some(calls[0].clone());
                }
                Some(call) => {
                    assert!(
                        calls[0].get("id").is_none() && calls[0]["function"].get("name").is_none(),
                        "{e}"
                    );
                    let args = call["function"]["arguments"].as_str().unwrap().to_string() + more;
                    call["function"]["arguments"] = args.into();
                }
            }
        }
        content.push_str(c["delta"]["content"].as_str().unwrap_or_default());
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (call, deltas, content, finish)
}

#[tokio::test(flavor = "multi_thread")]
async fn tool_calls_whole_and_streamed_follow_the_tools_schemas() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ""));
    let mut names = Vec::new();
    for seed in 0..4 {
        let v = post_json(
            &gw,
            "/v1/chat/completions",
            &body(json!("required"), false, seed),
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
        let (call, deltas, content, finish) =
            streamed(&gw, &body(json!("required"), true, seed)).await;
        assert_eq!((content.as_str(), finish.as_str()), ("", "tool_calls"));
        assert_eq!(check_call(&call.expect("a streamed call")), whole);
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
        let (call, _, content, finish) = streamed(&gw, &body(json!("auto"), true, seed)).await;
        assert_eq!(c["finish_reason"], finish.as_str(), "{v}");
        match finish.as_str() {
            "tool_calls" => {
                assert_eq!(
                    check_call(&c["message"]["tool_calls"][0]),
                    check_call(&call.unwrap())
                );
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
async fn earlier_tool_turns_are_taken_and_simulated_workers_refuse_tools() {
    let (_dir, model) = synthetic_model_file();
    let gw = Gateway::start(&engine_config(&model, ""));
    let conversation = json!({
        "model": "m",
        "max_tokens": 100,
        "temperature": 0,
        "tools": tools(),
        "tool_choice": "required",
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
