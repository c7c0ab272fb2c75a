//! What an endpoint's shapes cost the gateway per request, the pipeline aside: reading and
//! validating a short request's body, and rendering its answer whole and streamed (four
//! tokens), for `/v1/chat/completions` and `/v1/responses` (which is read as the chat
//! request it means, and answered as a `response` object or its events).
//!
//! `cargo bench -p gateway --bench api_shapes`

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use gateway::api::render::{ChoiceOut, Renderer};
use gateway::api::validate::{self, InferenceRequest};
use gateway::api::{error::ApiError, responses};
use gateway::config::ServerConfig;
use gateway::worker::{FinishReason, Usage};
use std::hint::black_box;

const CHAT: &[u8] =
    br#"{"model":"stub","messages":[{"role":"user","content":"hello"}],"max_tokens":4}"#;
const RESPONSES: &[u8] = br#"{"model":"stub","input":"hello","max_output_tokens":4}"#;

type Validate = fn(&[u8], &ServerConfig) -> Result<InferenceRequest, ApiError>;

fn renderer(req: &InferenceRequest) -> Renderer {
    Renderer::new(
        req.endpoint,
        &req.model,
        req.include_usage,
        false,
        1,
        false,
        req.responses.clone().map(|info| (info, None)),
    )
}

const USAGE: Usage = Usage {
    prompt_tokens: 7,
    completion_tokens: 4,
    cached_tokens: 0,
    reasoning_tokens: 0,
    accepted_prediction_tokens: 0,
    rejected_prediction_tokens: 0,
};

fn shapes(c: &mut Criterion) {
    let server = ServerConfig::default();
    let endpoints: [(&str, &[u8], Validate); 2] = [
        ("chat", CHAT, validate::chat),
        ("responses", RESPONSES, responses::validate),
    ];
    for (name, body, validate) in endpoints {
        let req = validate(body, &server).expect("a valid body");
        c.bench_function(&format!("{name}/validate"), |b| {
            b.iter(|| validate(black_box(body), &server).expect("valid"))
        });
        c.bench_function(&format!("{name}/render_whole"), |b| {
            b.iter(|| {
                let choice = ChoiceOut {
                    text: "tok tok tok tok",
                    reasoning: "",
                    logprobs: &[],
                    finish: FinishReason::Length,
                    embedding: &[],
                    prompt_logprobs: None,
                };
                renderer(&req).full(&[choice], USAGE)
            })
        });
        c.bench_function(&format!("{name}/render_stream"), |b| {
            b.iter(|| {
                let mut r = renderer(&req);
                let mut out = BytesMut::new();
                r.role_frame(&mut out);
                for t in ["tok", " tok", " tok", " tok"] {
                    r.delta_frame(&mut out, 0, t, &[]);
                }
                r.finish_frame(&mut out, 0, FinishReason::Length);
                r.end_frames(&mut out, USAGE);
                out
            })
        });
    }
}

criterion_group!(benches, shapes);
criterion_main!(benches);
