//! JSON mode's per-step cost: masking one row of logits (each token checked against the
//! recognizer's state), for a vocabulary the size of SmolLM2's.
//!
//! `cargo bench -p kernels --bench json_mask`. With `TOLLGATE_GGUF=path.gguf` the
//! model's own vocabulary is used; otherwise 49,152 tokens: the 256 single bytes and
//! random strings of 2 to 8 printable bytes (about as long as byte-level BPE tokens).
//! JSON mode's states, then structured output's (a schema with fixed keys, an enum and
//! optional properties), then regular expressions' (`guided_choice`, `guided_regex`), then
//! context-free grammars' (`guided_grammar`).

use criterion::{criterion_group, criterion_main, Criterion};
use kernels::json_mode::{JsonState, JsonVocab};
use kernels::json_schema::Schema;

fn vocab() -> Vec<Vec<u8>> {
    if let Ok(path) = std::env::var("TOLLGATE_GGUF") {
        let loaded = kernels::load::load(std::path::Path::new(&path)).expect("load the model");
        let t = &loaded.tokenizer;
        return (0..t.vocab_size() as u32)
            .map(|i| t.token_bytes(i).to_vec())
            .collect();
    }
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut v: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    while v.len() < 49152 {
        let n = 2 + (next() % 7) as usize;
        v.push((0..n).map(|_| 0x20 + (next() % 95) as u8).collect());
    }
    v
}

fn bench(c: &mut Criterion) {
    let v = vocab();
    let jv = JsonVocab::new(v.len(), |id| &v[id as usize], |_| false, &[0]);
    // Three states: before the object, inside a string, between values of a nested array.
    let states = [
        ("start", JsonState::new()),
        ("in a string", {
            let mut s = JsonState::new();
            assert!(s.advance(b"{\"name\": \"Wh"));
            s
        }),
        ("in an array", {
            let mut s = JsonState::new();
            assert!(s.advance(b"{\"a\": [1, {\"b\": [true"));
            s
        }),
    ];
    // Structured output: a Pydantic-like schema, where keys and an enum are fixed texts
    // and optional properties leave several readings.
    let schema = std::sync::Arc::new(
        Schema::compile(&serde_json::json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "kind": {"enum": ["cat", "dog", "bird"]},
                "age": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "nickname": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}}
            },
            "required": ["name", "kind"],
            "additionalProperties": false
        }))
        .expect("the schema compiles"),
    );
    let at = |prefix: &[u8]| {
        let mut s = JsonState::with_schema(schema.clone());
        assert!(s.advance(prefix));
        s
    };
    let states = states.into_iter().chain([
        ("schema: in a string", at(b"{\"name\": \"Wh")),
        (
            "schema: in an enum",
            at(b"{\"name\": \"Whiskers\", \"kind\": \""),
        ),
        (
            "schema: optional keys",
            at(b"{\"name\": \"Whiskers\", \"kind\": \"cat\", "),
        ),
    ]);
    let mut logits = vec![0.0f32; v.len()];
    for (name, st) in states {
        c.bench_function(&format!("mask {} tokens, {name}", v.len()), |b| {
            b.iter(|| {
                st.mask(&mut logits, &jv);
                logits[0]
            })
        });
        // The same decision as bits (what the GPU path sends), and those bits applied to
        // the row (what the host path does with them).
        c.bench_function(&format!("bits {} tokens, {name}", v.len()), |b| {
            b.iter(|| st.allowed(&jv, v.len()))
        });
        c.bench_function(&format!("bits+apply {} tokens, {name}", v.len()), |b| {
            b.iter(|| {
                let a = kernels::adjust::Adjust {
                    repeat: None,
                    deltas: Vec::new(),
                    mask: Some(st.allowed(&jv, v.len())),
                    carry: None,
                };
                a.apply(&mut logits);
                logits[0]
            })
        });
    }
}

/// Regular expressions (vLLM's `guided_regex` and `guided_choice`): the mask's walk of
/// the vocabulary as a trie, at the start of a text and inside one; and the same state's
/// mask again, kept.
fn bench_regex(c: &mut Criterion) {
    use kernels::regex_mode::{choice_regex, compile, RegexState};
    let v = vocab();
    let jv = JsonVocab::new(v.len(), |id| &v[id as usize], |_| false, &[0]);
    let labels: Vec<String> = ["positive", "negative", "neutral"]
        .map(String::from)
        .to_vec();
    let cases = [
        ("choice: start", choice_regex(&labels), &b""[..]),
        (
            "date: start",
            r"[0-9]{4}-[0-9]{2}-[0-9]{2}".to_string(),
            &b""[..],
        ),
        (
            "words: inside",
            r"[A-Za-z ,.]{1,200}".to_string(),
            &b"Once upon a ti"[..],
        ),
        (
            "any: inside",
            r"(?s).{0,100}".to_string(),
            &b"Once upon a ti"[..],
        ),
    ];
    for (name, re, prefix) in cases {
        let mut st = RegexState::new(compile(&re).expect("compiles"));
        assert!(st.advance(prefix));
        // A state's first row (the trie walked), then one it has been in before.
        c.bench_function(&format!("regex walk {} tokens, {name}", v.len()), |b| {
            b.iter(|| st.walk(&jv, v.len()))
        });
        c.bench_function(&format!("regex bits {} tokens, {name}", v.len()), |b| {
            b.iter(|| st.allowed(&jv, v.len()))
        });
    }
}

/// Context-free grammars (vLLM's `guided_grammar`): the mask's walk of the vocabulary as a
/// trie from a state's stacks, at the start of vLLM's SQL example, inside a nested list
/// (stacks several deep) and inside a free text; and a state's mask again, kept.
fn bench_ebnf(c: &mut Criterion) {
    use kernels::ebnf::{compile, EbnfState};
    let v = vocab();
    let jv = JsonVocab::new(v.len(), |id| &v[id as usize], |_| false, &[0]);
    let sql = include_str!("../testdata/vllm_sql.gbnf");
    let lists = r#"
        root ::= value
        value ::= list | word | [0-9]+
        list ::= "[" ( value ( ", " value )* )? "]"
        word ::= [a-z]+
    "#;
    let prose = r#"
        root ::= sentence+
        sentence ::= word ( [ ,] word )* [.!?] " "?
        word ::= [A-Za-z']+
    "#;
    let cases = [
        ("sql: start", sql, &b""[..]),
        ("lists: inside", lists, &b"[[one, [2, three], [[fo"[..]),
        ("prose: inside", prose, &b"Once upon a ti"[..]),
    ];
    for (name, g, prefix) in cases {
        let mut st = EbnfState::new(compile(g).expect("compiles"));
        assert!(st.advance(prefix));
        c.bench_function(&format!("ebnf walk {} tokens, {name}", v.len()), |b| {
            b.iter(|| st.walk(&jv, v.len()))
        });
        c.bench_function(&format!("ebnf bits {} tokens, {name}", v.len()), |b| {
            b.iter(|| st.allowed(&jv, v.len()))
        });
    }
}

criterion_group!(benches, bench, bench_regex, bench_ebnf);
criterion_main!(benches);
