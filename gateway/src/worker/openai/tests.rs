//! The upstream worker's request bodies and answers, without an upstream.

use super::answer::{parse_embedding, split_echo};
use super::{error_code, error_message, error_param, OpenAiWorker};
use crate::worker::{
    Prompt, SamplingParams, TokenLogprob, WorkerError, WorkerEvent, WorkerRequest,
    CONTEXT_LENGTH_EXCEEDED,
};
use serde_json::Value;

fn items(tokens: &[&str]) -> Vec<TokenLogprob> {
    tokens
        .iter()
        .map(|t| TokenLogprob {
            token: t.to_string(),
            bytes: t.as_bytes().to_vec(),
            logprob: -1.0,
            top_logprobs: Vec::new(),
            id: None,
            rank: None,
        })
        .collect()
}

fn embed_req(first: Prompt, more: Vec<Prompt>) -> WorkerRequest {
    WorkerRequest {
        request_id: "r".into(),
        tenant: "t".into(),
        weight: None,
        output_weight: 3.0,
        model: "m".into(),
        prompt: first,
        prompt_ids: None,
        params: SamplingParams::greedy(0),
        stream: false,
        embed: true,
        more_inputs: more,
        dimensions: None,
    }
}

fn vectors(events: &[WorkerEvent]) -> (Vec<f32>, u32) {
    let firsts = events
        .iter()
        .filter_map(|e| match e {
            WorkerEvent::Embedding(v) => Some(v[0]),
            _ => None,
        })
        .collect();
    match events.last() {
        Some(WorkerEvent::Done { usage, .. }) => (firsts, usage.prompt_tokens),
        other => panic!("ends with {other:?}"),
    }
}

#[test]
fn several_embeddings_inputs_are_one_upstream_call_answered_in_input_order() {
    let w = OpenAiWorker::new(
        "w".into(),
        toml::from_str(r#"url = "http://127.0.0.1:1""#).expect("config"),
    )
    .expect("worker");
    let one = embed_req(Prompt::Text("a".into()), vec![]);
    let (_, body) = w.body(&one);
    let v: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(v["input"], "a", "one input: as it was");
    assert_eq!(v["encoding_format"], "base64", "by default");
    let three = embed_req(
        Prompt::Text("a".into()),
        vec![Prompt::Text("bb".into()), Prompt::Text("ccccc".into())],
    );
    let (path, body) = w.body(&three);
    let v: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(path, "/v1/embeddings");
    assert_eq!(v["input"], serde_json::json!(["a", "bb", "ccccc"]));
    assert!(v.get("dimensions").is_none());
    let mut ids = embed_req(Prompt::Tokens(vec![1, 2]), vec![Prompt::Tokens(vec![3])]);
    ids.dimensions = Some(64);
    let v: Value = serde_json::from_slice(&w.body(&ids).1).expect("JSON");
    assert_eq!(v["input"], serde_json::json!([[1, 2], [3]]));
    assert_eq!(v["dimensions"], 64, "asked of the upstream");
    assert!(v.get("truncate_prompt_tokens").is_none());
    ids.params.truncate_prompt_tokens = Some(3);
    let v: Value = serde_json::from_slice(&w.body(&ids).1).expect("JSON");
    assert_eq!(v["truncate_prompt_tokens"], 3, "vLLM's, passed on");

    // Answered out of order: put back in order by index; the upstream's count.
    let answer = br#"{"data":[{"index":2,"embedding":[2.0]},{"index":0,"embedding":[0.0]},
        {"index":1,"embedding":[1.0]}],"usage":{"prompt_tokens":9}}"#;
    let events = parse_embedding(answer, &three).expect("parsed");
    assert_eq!(vectors(&events), (vec![0.0, 1.0, 2.0], 9));
    // No usage: each input's estimate, added up; no indexes: as listed.
    let answer = br#"{"data":[{"embedding":[5.0]},{"embedding":[6.0]},{"embedding":[7.0]}]}"#;
    let events = parse_embedding(answer, &three).expect("parsed");
    assert_eq!(vectors(&events), (vec![5.0, 6.0, 7.0], 1 + 1 + 2));
    // Base64 of little-endian f32s ([1.5] is 0x3fc00000), beside numbers.
    let answer = br#"{"data":[{"index":0,"embedding":"AADAPw=="},{"index":1,"embedding":[2.0]},
        {"index":2,"embedding":"AADAPwAAwD8="}]}"#;
    let events = parse_embedding(answer, &three).expect("parsed");
    let lens: Vec<usize> = events
        .iter()
        .filter_map(|e| match e {
            WorkerEvent::Embedding(v) => Some(v.len()),
            _ => None,
        })
        .collect();
    assert_eq!(
        (vectors(&events).0, lens),
        (vec![1.5, 2.0, 1.5], vec![1, 1, 2])
    );
    // Another number of vectors, indexes that are not one per input, or base64 that
    // is not whole f32s: refused.
    for bad in [
        &br#"{"data":[{"index":0,"embedding":[0.0]},{"index":1,"embedding":[1.0]}]}"#[..],
        br#"{"data":[{"index":0,"embedding":[0.0]},{"index":0,"embedding":[1.0]},
            {"index":2,"embedding":[2.0]}]}"#,
        br#"{"data":[{"embedding":"AADA"},{"embedding":[1.0]},{"embedding":[2.0]}]}"#,
    ] {
        assert!(
            matches!(parse_embedding(bad, &three), Err(WorkerError::Protocol(_))),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

fn tokens(items: &[TokenLogprob]) -> Vec<&str> {
    items.iter().map(|t| t.token.as_str()).collect()
}

#[test]
fn an_echoed_answer_splits_into_prompt_and_completion() {
    // By the first completion token's offset (in characters: `é` is two bytes).
    let (mut text, mut all) = (
        "café au lait!".to_string(),
        items(&["caf", "é", " au", " lait", "!"]),
    );
    let (prompt, echoed) = split_echo(&mut text, &mut all, &[0, 3, 4, 7, 12], 4).unwrap();
    assert_eq!((echoed.as_str(), text.as_str()), ("café au lait", "!"));
    assert_eq!(
        (tokens(&prompt), tokens(&all)),
        (vec!["caf", "é", " au", " lait"], vec!["!"])
    );
    // Without offsets, by the prompt tokens' texts.
    let (mut text, mut all) = (
        "café au lait!".to_string(),
        items(&["caf", "é", " au", " lait", "!"]),
    );
    let (_, echoed) = split_echo(&mut text, &mut all, &[], 4).unwrap();
    assert_eq!((echoed.as_str(), text.as_str()), ("café au lait", "!"));
    // No completion token (a stop at once): all of the text is the prompt's.
    let (mut text, mut all) = ("ab".to_string(), items(&["a", "b"]));
    let (prompt, echoed) = split_echo(&mut text, &mut all, &[0, 1], 2).unwrap();
    assert_eq!(
        (echoed.as_str(), text.as_str(), prompt.len(), all.len()),
        ("ab", "", 2, 0)
    );
    // Fewer items than the prompt's tokens: the upstream did not score it.
    let (mut text, mut all) = ("ab".to_string(), items(&["a", "b"]));
    assert!(split_echo(&mut text, &mut all, &[], 3).is_err());
}

/// An upstream's rejection of a prompt over the model's context keeps OpenAI's code for
/// it, whether the upstream sets the code (OpenAI, another tollgate) or only words the
/// message as OpenAI does (vLLM, whose `code` is the status); other rejections have none.
#[test]
fn an_upstreams_context_length_rejection_keeps_its_code() {
    let code = |body: &str| error_code(body.as_bytes(), &error_message(body.as_bytes()));
    let openai = r#"{"error":{"message":"This model's maximum context length is 8192 tokens. However, your messages resulted in 9031 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
    assert_eq!(code(openai), Some(CONTEXT_LENGTH_EXCEEDED));
    let coded = r#"{"error":{"message":"too long","type":"invalid_request_error","param":null,"code":"context_length_exceeded"}}"#;
    assert_eq!(code(coded), Some(CONTEXT_LENGTH_EXCEEDED));
    let vllm = r#"{"object":"error","message":"This model's maximum context length is 2048 tokens. However, you requested 2100 tokens.","type":"BadRequestError","param":null,"code":400}"#;
    assert_eq!(code(vllm), Some(CONTEXT_LENGTH_EXCEEDED));
    // vLLM's message is at the top level, not under `error`: the client sees it alone.
    assert!(error_message(vllm.as_bytes()).starts_with("This model's maximum context"));
    let other = r#"{"error":{"message":"`temperature` must be between 0 and 2.","type":"invalid_request_error","param":"temperature","code":null}}"#;
    assert_eq!(code(other), None);
    // The field at fault is passed on (OpenAI's and tollgate's under `error`, vLLM's at the
    // top level), where there is one.
    assert_eq!(error_param(openai.as_bytes()).as_deref(), Some("messages"));
    assert_eq!(
        error_param(other.as_bytes()).as_deref(),
        Some("temperature")
    );
    assert_eq!(error_param(vllm.as_bytes()), None);
    let vllm_named =
        r#"{"object":"error","message":"bad","type":"BadRequestError","param":"min_p","code":400}"#;
    assert_eq!(error_param(vllm_named.as_bytes()).as_deref(), Some("min_p"));
    assert_eq!(code("not json at all"), None);
}

/// vLLM's sampling and stopping options are passed to the upstream where the request sets
/// them, and left out where it does not (an OpenAI upstream would refuse them).
#[test]
fn vllms_options_reach_the_upstream_only_when_set() {
    let w = OpenAiWorker::new(
        "w".into(),
        toml::from_str(r#"url = "http://127.0.0.1:1""#).expect("config"),
    )
    .expect("worker");
    let mut r = embed_req(Prompt::Text("a".into()), vec![]);
    r.embed = false;
    r.params = SamplingParams::greedy(8);
    let v: Value = serde_json::from_slice(&w.body(&r).1).expect("JSON");
    for field in [
        "min_p",
        "repetition_penalty",
        "ignore_eos",
        "min_tokens",
        "stop_token_ids",
        "allowed_token_ids",
        "include_stop_str_in_output",
        "truncate_prompt_tokens",
        "structured_outputs",
        "response_format",
        "bad_words",
        "skip_special_tokens",
        "continue_final_message",
        "add_generation_prompt",
    ] {
        assert!(v.get(field).is_none(), "{field} sent unset: {v}");
    }
    r.params.min_p = 0.05;
    r.params.repetition_penalty = 1.25;
    r.params.ignore_eos = true;
    r.params.min_tokens = 3;
    r.params.stop_token_ids = vec![7, 9];
    r.params.allowed_token_ids = vec![3, 1];
    r.params.include_stop_str_in_output = true;
    r.params.bad_words = vec!["pie".into()];
    r.params.skip_special_tokens = false;
    r.params.truncate_prompt_tokens = Some(crate::worker::KEEP_CONTEXT);
    let v: Value = serde_json::from_slice(&w.body(&r).1).expect("JSON");
    assert_eq!(v["min_p"], 0.05);
    assert_eq!(v["repetition_penalty"], 1.25);
    assert_eq!(v["ignore_eos"], true);
    assert_eq!(v["min_tokens"], 3);
    assert_eq!(v["stop_token_ids"], serde_json::json!([7, 9]));
    assert_eq!(v["allowed_token_ids"], serde_json::json!([3, 1]));
    assert_eq!(v["include_stop_str_in_output"], true);
    assert_eq!(v["bad_words"], serde_json::json!(["pie"]));
    assert_eq!(v["skip_special_tokens"], false);
    assert_eq!(
        v["truncate_prompt_tokens"], -1,
        "vLLM's word for the context"
    );
    // A chat whose final message is left open: vLLM's `continue_final_message`.
    let mut chat = r.clone();
    chat.prompt = Prompt::Chat(
        vec![crate::worker::ChatMessage {
            role: "assistant".into(),
            content: "Sure".into(),
            open: true,
        }],
        None,
    );
    let v: Value = serde_json::from_slice(&w.body(&chat).1).expect("JSON");
    assert_eq!(
        (&v["continue_final_message"], &v["add_generation_prompt"]),
        (&Value::Bool(true), &Value::Bool(false))
    );
    assert_eq!(
        v["messages"],
        serde_json::json!([{"role": "assistant", "content": "Sure"}])
    );
    // A text format goes as vLLM's `structured_outputs`; a JSON one as `response_format`.
    assert!(v.get("structured_outputs").is_none() && v.get("response_format").is_none());
    r.params.format = Some(crate::worker::OutputFormat::regex("[0-9]+").expect("regex"));
    let v: Value = serde_json::from_slice(&w.body(&r).1).expect("JSON");
    assert_eq!(
        v["structured_outputs"],
        serde_json::json!({"regex": "[0-9]+"})
    );
    assert!(v.get("response_format").is_none(), "{v}");
    let choices = vec!["a.b".to_string(), "c".to_string()];
    r.params.format = Some(crate::worker::OutputFormat::choice(choices).expect("choice"));
    let v: Value = serde_json::from_slice(&w.body(&r).1).expect("JSON");
    assert_eq!(
        v["structured_outputs"],
        serde_json::json!({"choice": ["a.b", "c"]})
    );
    let grammar = "root ::= \"a\"+";
    r.params.format = Some(crate::worker::OutputFormat::ebnf(grammar).expect("grammar"));
    let v: Value = serde_json::from_slice(&w.body(&r).1).expect("JSON");
    assert_eq!(
        v["structured_outputs"],
        serde_json::json!({ "grammar": grammar })
    );
    r.params.format = Some(crate::worker::OutputFormat::Object);
    let v: Value = serde_json::from_slice(&w.body(&r).1).expect("JSON");
    assert_eq!(
        v["response_format"],
        serde_json::json!({"type": "json_object"})
    );
    assert!(v.get("structured_outputs").is_none(), "{v}");
}
