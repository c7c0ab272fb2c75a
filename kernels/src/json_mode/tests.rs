//! The recognizer and the mask: whole documents, refusals where they go wrong, random
//! walks through a schema, and the mask's shortcuts against trying every byte.

use super::*;

/// A seeded stream of pseudo-random numbers (xorshift64).
fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Feeds `s` byte by byte; returns how many bytes were taken.
fn feed(s: &str) -> (JsonState, usize) {
    let mut st = JsonState::new();
    for (i, b) in s.bytes().enumerate() {
        if !st.advance(&[b]) {
            return (st, i);
        }
    }
    (st, s.len())
}

#[test]
fn whole_objects_are_accepted_and_complete() {
    for doc in [
        r#"{}"#,
        r#"{"a":1}"#,
        r#"{ "a" : [1, -2.5e+3, 0, 0.0, 1E9, true, false, null, "x\"\\\/\b\f\n\r\t\u00e9"] , "b": {"c": []} }"#,
        "{\"k\": \"caf\u{e9} \u{1F600}\"}",
        r#"{"nested":[[[{"d":[{}]}]]],"n":-0}"#,
    ] {
        let (st, n) = feed(doc);
        assert_eq!(n, doc.len(), "{doc}: stopped at byte {n}");
        assert!(st.done(), "{doc}");
        assert!(
            serde_json::from_str::<serde_json::Value>(doc).is_ok(),
            "{doc}"
        );
    }
}

#[test]
fn invalid_bytes_are_refused_where_they_appear() {
    for (doc, at) in [
        ("[1]", 0),
        (" {}", 0),
        ("\"s\"", 0),
        ("{a", 1),
        ("{\"a\" 1", 5),
        ("{\"a\":01", 6),
        ("{\"a\":1.}", 7),
        ("{\"a\":-}", 6),
        ("{\"a\":1e}", 7),
        ("{\"a\":tru}", 8),
        ("{\"a\":[1,]}", 8),
        ("{\"a\":1,}", 7),
        ("{\"a\":\"\\x\"}", 7),
        ("{\"a\":\"\\u12g4\"}", 10),
        ("{\"a\":\"line\nbreak\"}", 10),
        ("{\"a\":1]", 6),
        ("{} ", 2),
        ("{\"a\":1e123}", 9),
        ("{}{}", 2),
    ] {
        let (st, n) = feed(doc);
        assert_eq!(n, at, "{doc}: {st:?}");
    }
}

#[test]
fn tokens_of_several_bytes_and_their_containers() {
    let mut st = JsonState::new();
    assert!(st.allows(b"{\""));
    assert!(!st.allows(b"}"));
    assert!(!st.allows(b""));
    assert!(st.advance(b"{\"a\": [{"));
    // A token that closes two containers and opens none: the state's own stack.
    assert!(st.allows(b"}]"));
    assert!(!st.allows(b"]]"));
    assert!(st.advance(b"\"b\":1}], \"c\""));
    assert!(!st.done());
    assert!(st.advance(b":2}"));
    assert!(st.done());
    assert!(!st.allows(b" "));
}

#[test]
fn whitespace_is_a_space_or_a_newline_and_indentation() {
    let mut st = JsonState::new();
    assert!(!st.allows(b" "), "the object starts at once");
    assert!(st.advance(b"{"));
    assert!(st.allows(b" ") && !st.allows(b"  ") && !st.allows(b" \n"));
    assert!(!st.allows(b"\t") && !st.allows(b"\r") && !st.allows(b"\n\n"));
    let indent = format!("\n{}", " \t".repeat(MAX_INDENT as usize / 2));
    assert!(st.advance(indent.as_bytes()));
    assert!(!st.allows(b" ") && !st.allows(b"\t"));
    assert!(st.advance(b"\"k\""));
    assert!(st.allows(b" "), "a run ends at the next other byte");
    assert!(st.allows(b"\n    :"));
}

#[test]
fn the_masks_shortcuts_decide_as_trying_every_byte_does() {
    // Every single byte, and random tokens of printable and JSON-significant bytes.
    let mut next = xorshift(7);
    let alphabet = b"{}[]\":,\\ \n\t-+.0123456789eEtrufalsnxu\x01\xc3\xa9ab";
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for _ in 0..3000 {
        let n = 1 + (next() % 6) as usize;
        tokens.push(
            (0..n)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect(),
        );
    }
    tokens.push(Vec::new());
    let vocab = JsonVocab::new(tokens.len(), |id| &tokens[id as usize], |id| id == 3, &[5]);
    let mut states = Vec::new();
    for prefix in [
        "",
        "{",
        "{\"k",
        "{\"k\\",
        "{\"k\\u0",
        "{\"k\": ",
        "{\"k\": -",
        "{\"k\": 12",
        "{\"k\": 1.5e",
        "{\"k\": [tr",
        "{\"k\": [{}, \"s",
        "{\"k\": [1]",
        "{\"k\": 1}",
    ] {
        let mut st = JsonState::new();
        assert!(st.advance(prefix.as_bytes()), "{prefix}");
        states.push((prefix, st));
    }
    for prefix in [
        "",
        "{\"name\": \"x",
        "{\"name\": \"x\",",
        "{\"name\": \"x\", \"kind\": 1",
        "{\"name\": \"x\", \"kind\": \"c",
        "{\"name\": \"x\", \"kind\": null, \"tags\": [\"a\"], ",
        "{\"name\": \"x\", \"kind\": null, \"tags\": [\"a\"], \"sc",
        "{\"name\": \"x\", \"kind\": null, \"tags\": [\"a\"], \"extra\": {\"k",
    ] {
        let mut st = schema(person());
        assert!(st.advance(prefix.as_bytes()), "{prefix}");
        states.push((prefix, st));
    }
    for (prefix, st) in states {
        // A row padded past the vocabulary: the padding is never a token.
        let n = tokens.len() + 40;
        let mut l = vec![0.0f32; n];
        st.mask(&mut l, &vocab);
        // The same decisions as the GPU's bitmask.
        let bits = st.allowed(&vocab, n);
        assert_eq!(bits.len(), n.div_ceil(32));
        for id in 0..bits.len() * 32 {
            let want = tokens.get(id).is_some_and(|t| match id {
                5 => st.done(),
                3 => false,
                _ => !st.done() && st.allows(t),
            });
            assert_eq!(
                crate::adjust::allowed(&bits, id),
                want,
                "bits after {prefix:?}: token {id}"
            );
            if id < n {
                assert_eq!(l[id] == 0.0, want, "after {prefix:?}: token {id}");
            }
        }
    }
}

fn schema(v: serde_json::Value) -> JsonState {
    JsonState::with_schema(Arc::new(Schema::compile(&v).unwrap()))
}

/// Feeds `s` to a state byte by byte; returns how many bytes were taken.
fn feed_into(mut st: JsonState, s: &str) -> (JsonState, usize) {
    for (i, b) in s.bytes().enumerate() {
        if !st.advance(&[b]) {
            return (st, i);
        }
    }
    (st, s.len())
}

fn person() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "kind": {"enum": ["cat", "dog", 12, 1, null]},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
            "owner": {"anyOf": [{"$ref": "#/$defs/P"}, {"type": "null"}]},
            "score": {"type": ["number", "boolean"]},
            "extra": {"type": "object", "additionalProperties": {"type": "integer"}}
        },
        "required": ["name", "kind", "tags"],
        "additionalProperties": false,
        "$defs": {"P": {"type": "object", "properties": {
            "id": {"type": "integer"}, "p": {"$ref": "#/$defs/P"}}, "required": ["id"]}}
    })
}

/// The schema above, checked by hand (independently of the recognizer).
fn is_person(v: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value as V;
    // An integer of any size (past i64, serde_json reads it as a float).
    fn int(v: &V) -> bool {
        v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0)
    }
    fn is_p(v: &V) -> bool {
        let Some(o) = v.as_object() else { return false };
        let keys: Vec<&str> = o.keys().map(|k| k.as_str()).collect();
        matches!(keys.as_slice(), ["id"] | ["id", "p"])
            && int(&o["id"])
            && o.get("p").is_none_or(is_p)
    }
    let o = v.as_object().ok_or("not an object")?;
    let order = ["name", "age", "kind", "tags", "owner", "score", "extra"];
    let mut last = None;
    for k in o.keys() {
        let i = order
            .iter()
            .position(|o| o == k)
            .ok_or(format!("key {k}"))?;
        if last.is_some_and(|l| l >= i) {
            return Err(format!("order at {k}"));
        }
        last = Some(i);
    }
    let ok = o["name"].is_string()
        && o.get("age").is_none_or(int)
        && [
            V::from("cat"),
            V::from("dog"),
            V::from(12),
            V::from(1),
            V::Null,
        ]
        .contains(&o["kind"])
        && o["tags"]
            .as_array()
            .is_some_and(|t| (1..=3).contains(&t.len()) && t.iter().all(|x| x.is_string()))
        && o.get("owner").is_none_or(|w| w.is_null() || is_p(w))
        && o.get("score")
            .is_none_or(|s| s.is_number() || s.is_boolean())
        && o.get("extra")
            .is_none_or(|e| e.as_object().is_some_and(|e| e.values().all(int)));
    ok.then_some(()).ok_or_else(|| format!("values of {v}"))
}

#[test]
fn schema_documents_are_accepted_and_others_refused_where_they_go_wrong() {
    for doc in [
        r#"{"name":"a","kind":"cat","tags":["x"]}"#,
        r#"{ "name" : "b\"q", "age": -3, "kind": 12, "tags": ["x", "y", "z"], "owner": {"id": 1, "p": {"id": 2}}, "score": 1.5e3, "extra": {"k": 4, "": 0} }"#,
        r#"{"name":"c","kind":null,"tags":["t"],"owner":null,"score":true}"#,
        r#"{"name":"c","kind":1,"tags":["t"]}"#,
    ] {
        let (st, n) = feed_into(schema(person()), doc);
        assert_eq!(n, doc.len(), "{doc}: stopped at byte {n}");
        assert!(st.done(), "{doc}");
        is_person(&serde_json::from_str(doc).unwrap()).unwrap();
    }
    for (doc, at) in [
        (r#"{"kind":"cat"}"#, 2),                       // `name` is required first
        (r#"{"name":"a","kind":"cow"}"#, 21),           // not in the enum
        (r#"{"name":"a","age":1.5}"#, 19),              // an integer
        (r#"{"name":"a","kind":"cat","tags":[]}"#, 33), // minItems 1
        (r#"{"name":"a","kind":"cat","tags":["a","b","c","d"]}"#, 44), // maxItems 3
        (r#"{"name":"a","kind":"cat"}"#, 24),           // `tags` is required
        (r#"{"name":"a","kind":"cat","tags":["x"],"age":3}"#, 39), // order
        (r#"{"name":"a","kind":"cat","tags":["x"],"owner":{"p":"#, 48), // `id` first
        (
            r#"{"name":"a","kind":"cat","tags":["x"],"extra":{"k":"v"}}"#,
            51,
        ),
        (r#"{"name":"a","kind":123"#, 21), // 12 and then a digit
        (r#"{"name":"a","kind":"cat","tags":["x"],"other":1}"#, 40), // "o" may begin "owner"
    ] {
        let (st, n) = feed_into(schema(person()), doc);
        assert_eq!(n, at, "{doc}: {st:?}");
    }
}

#[test]
fn roots_other_than_objects_end_where_their_value_may_end() {
    let (st, n) = feed_into(schema(serde_json::json!({"type": "integer"})), "-12");
    assert_eq!(n, 3);
    assert!(st.done() && st.allows(b"3") && !st.allows(b".") && !st.allows(b" "));
    let (st, _) = feed_into(schema(serde_json::json!({"type": "integer"})), "-");
    assert!(!st.done());
    let lit = || schema(serde_json::json!({"enum": [1, 12, "a"]}));
    let (st, _) = feed_into(lit(), "1");
    assert!(st.done() && st.allows(b"2") && !st.allows(b"3"));
    let (st, _) = feed_into(lit(), "12");
    assert!(st.done() && !st.allows(b"2"));
    let (st, _) = feed_into(lit(), "\"a");
    assert!(!st.done());
    let (st, _) = feed_into(lit(), "\"a\"");
    assert!(st.done());
    let (st, n) = feed_into(
        schema(serde_json::json!({"type": ["array", "null"], "items": {"type": "boolean"}})),
        "[true,false]",
    );
    assert_eq!(n, 12);
    assert!(st.done());
    assert!(
        !schema(serde_json::json!({"type": "string"})).allows(b" \""),
        "no whitespace first"
    );
    let closed = schema(serde_json::json!({"type": "object", "additionalProperties": false}));
    assert!(closed.allows(b"{}") && !closed.allows(b"{\"") && !closed.allows(b"{ \""));
}

#[test]
fn random_walks_through_a_schema_give_documents_it_accepts() {
    // Each walk takes a random allowed byte at every step (preferring those that close
    // strings and containers once it is long), until the document may end.
    let mut next = xorshift(99);
    let closing = b"\"}]";
    for walk in 0..300 {
        let mut st = schema(person());
        let mut doc = Vec::new();
        loop {
            let allowed: Vec<u8> = (0x20u8..0x7f).filter(|&b| st.allows(&[b])).collect();
            if st.done() && (doc.len() > 60 || allowed.is_empty() || next().is_multiple_of(4)) {
                break;
            }
            assert!(
                !allowed.is_empty(),
                "walk {walk} stuck at {:?}",
                String::from_utf8_lossy(&doc)
            );
            let preferred: Vec<u8> = allowed
                .iter()
                .copied()
                .filter(|b| closing.contains(b) || b.is_ascii_digit() || *b == b',')
                .collect();
            let pool = if doc.len() > 40 && !preferred.is_empty() && !next().is_multiple_of(4) {
                &preferred
            } else {
                &allowed
            };
            let b = pool[(next() % pool.len() as u64) as usize];
            assert!(st.advance(&[b]));
            doc.push(b);
            assert!(doc.len() < 5000, "walk {walk} runs on");
        }
        let v: serde_json::Value = serde_json::from_slice(&doc)
            .unwrap_or_else(|e| panic!("walk {walk}: {e}: {}", String::from_utf8_lossy(&doc)));
        is_person(&v).unwrap_or_else(|e| panic!("walk {walk}: {e}"));
    }
}

#[test]
fn the_mask_keeps_continuations_and_stop_tokens_only_at_the_end() {
    let tokens: Vec<&[u8]> = vec![b"{", b"}", b"\"a\"", b":", b"1", b"x", b"", b"<eos>"];
    let vocab = JsonVocab::new(tokens.len(), |id| tokens[id as usize], |id| id == 7, &[7]);
    let mut st = JsonState::new();
    let mut l = vec![0.0f32; tokens.len()];
    st.mask(&mut l, &vocab);
    let open: Vec<usize> = (0..l.len()).filter(|&i| l[i] == 0.0).collect();
    assert_eq!(open, [0]);
    st.advance(b"{");
    let mut l = vec![0.0f32; tokens.len()];
    st.mask(&mut l, &vocab);
    let open: Vec<usize> = (0..l.len()).filter(|&i| l[i] == 0.0).collect();
    assert_eq!(open, [1, 2]);
    st.advance(b"}");
    let mut l = vec![0.0f32; tokens.len()];
    st.mask(&mut l, &vocab);
    let open: Vec<usize> = (0..l.len()).filter(|&i| l[i] == 0.0).collect();
    assert_eq!(open, [7], "only the stop token once complete");
}

/// A string schema's documents, each fed whole: where each stops, and whether complete.
fn strings(schema_json: serde_json::Value, cases: &[(&str, usize, bool)]) {
    for &(doc, at, done) in cases {
        let (st, n) = feed_into(schema(schema_json.clone()), doc);
        assert_eq!((n, st.done()), (at, done), "{schema_json} on {doc}");
    }
}

#[test]
fn strings_follow_their_pattern_format_and_length() {
    strings(
        serde_json::json!({"type": "string", "pattern": "^[a-z]+-[0-9]{2}$"}),
        &[
            ("\"abc-12\"", 8, true),
            ("\"abc-1\"", 6, false),
            ("\"ABC", 1, false),
            ("\"ab\\u0063-12\"", 3, false), // no escapes in a held string
        ],
    );
    // Unanchored, as JSON Schema has it: the match may be anywhere.
    strings(
        serde_json::json!({"type": "string", "pattern": "cat"}),
        &[("\"a cat!\"", 8, true), ("\"dog\"", 4, false)],
    );
    strings(
        serde_json::json!({"type": "string", "format": "date-time"}),
        &[
            ("\"2024-02-28T12:00:00Z\"", 22, true),
            ("\"2024-12-31T23:59:59.123+05:30\"", 31, true),
            ("\"2024-02-30", 9, false),
            ("\"2024-13", 7, false),
            ("\"2024-01-01\"", 11, false),
        ],
    );
    strings(
        serde_json::json!({"type": "string", "format": "uuid"}),
        &[
            ("\"123e4567-e89b-12d3-a456-426614174000\"", 38, true),
            ("\"123E", 4, false),
        ],
    );
    strings(
        serde_json::json!({"type": "string", "format": "email"}),
        &[
            ("\"ann.lee@mail.example.org\"", 26, true),
            ("\"ann..lee", 5, false),
            ("\"ann@x\"", 6, false),
        ],
    );
    strings(
        serde_json::json!({"type": "string", "format": "ipv4"}),
        &[("\"192.168.0.255\"", 15, true), ("\"256", 3, false)],
    );
    // Lengths count characters, not bytes.
    strings(
        serde_json::json!({"type": "string", "minLength": 2, "maxLength": 3}),
        &[
            ("\"h\u{e9}\u{e9}\"", 7, true),
            ("\"h\u{e9}\u{e9}x", 6, false),
            ("\"a\"", 2, false),
        ],
    );
}

#[test]
fn random_walks_through_held_strings_give_what_a_regex_engine_accepts() {
    let mut next = xorshift(5);
    let date_time = r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$";
    let email = r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$";
    for (schema_json, check) in [
        (
            serde_json::json!({"type": "string", "pattern": "^(ab|c)+[0-9]{1,3}x?$"}),
            r"^(ab|c)+[0-9]{1,3}x?$",
        ),
        (
            serde_json::json!({"type": "string", "pattern": "[A-Z][a-z]+"}),
            r"[A-Z][a-z]+",
        ),
        (
            serde_json::json!({"type": "string", "format": "date-time"}),
            date_time,
        ),
        (
            serde_json::json!({"type": "string", "format": "email", "maxLength": 30}),
            email,
        ),
    ] {
        let re = regex::Regex::new(check).unwrap();
        for walk in 0..100 {
            let mut st = schema(schema_json.clone());
            let mut doc = Vec::new();
            while !st.done() {
                let allowed: Vec<u8> = (0x20u8..0x7f).filter(|&b| st.allows(&[b])).collect();
                assert!(
                    !allowed.is_empty(),
                    "{schema_json}: stuck at {:?}",
                    String::from_utf8_lossy(&doc)
                );
                // Close the string as soon as it may be closed, some of the time.
                let b = if allowed.contains(&b'"') && doc.len() > 1 && next().is_multiple_of(3) {
                    b'"'
                } else {
                    allowed[(next() % allowed.len() as u64) as usize]
                };
                assert!(st.advance(&[b]));
                doc.push(b);
                assert!(doc.len() < 200, "{schema_json}: runs on");
            }
            let v: String = serde_json::from_slice(&doc).unwrap();
            assert!(re.is_match(&v), "{schema_json}, walk {walk}: {v:?}");
            if schema_json["maxLength"].is_u64() {
                assert!(v.chars().count() <= 30, "{v}");
            }
        }
    }
}

#[test]
fn bounded_numbers_end_only_within_their_bounds() {
    let int = serde_json::json!({"type": "integer", "minimum": 1, "maximum": 10});
    strings(
        int.clone(),
        &[
            ("5", 1, true),
            ("10", 2, true),
            ("11", 1, true),
            ("0", 0, false),
            ("-", 0, false),
            ("1.", 1, true),
        ],
    );
    let unit = serde_json::json!({"type": "number", "exclusiveMinimum": 0, "maximum": 1});
    strings(
        unit,
        &[
            ("0.5", 3, true),
            ("0", 1, false),
            ("0.0", 3, false),
            ("0.01", 4, true),
            ("1.0", 3, true),
            ("1.5", 2, false),
            ("2", 0, false),
            ("-", 0, false),
            ("1e0", 1, true), // no exponents in a bounded number
        ],
    );
    let neg = serde_json::json!({"type": "integer", "minimum": -250, "exclusiveMaximum": -99});
    strings(
        neg,
        &[
            ("-100", 4, true),
            ("-250", 4, true),
            ("-251", 3, false),
            ("-99", 1, false),
            ("-0", 1, false),
            ("7", 0, false),
        ],
    );
    // Draft 4's boolean exclusiveMaximum.
    let old = serde_json::json!({"type": "number", "maximum": 3, "exclusiveMaximum": true});
    strings(old, &[("2.99", 4, true), ("3", 0, false)]);
}

#[test]
fn random_walks_through_bounded_numbers_stay_within_them() {
    let mut next = xorshift(11);
    for (schema_json, lo, hi, int) in [
        (
            serde_json::json!({"type": "integer", "minimum": -7, "maximum": 1234}),
            -7.0,
            1234.0,
            true,
        ),
        (
            serde_json::json!({"type": "number", "minimum": 0.25, "exclusiveMaximum": 0.5}),
            0.25,
            0.4999999,
            false,
        ),
        (
            serde_json::json!({"type": "number", "minimum": -3.5, "maximum": 12}),
            -3.5,
            12.0,
            false,
        ),
        (
            serde_json::json!({"type": "integer", "exclusiveMinimum": 99}),
            100.0,
            1e18,
            true,
        ),
    ] {
        for walk in 0..200 {
            let mut st = schema(schema_json.clone());
            let mut doc = Vec::new();
            loop {
                let allowed: Vec<u8> = (0x20u8..0x7f).filter(|&b| st.allows(&[b])).collect();
                if st.done() && (allowed.is_empty() || next().is_multiple_of(3)) {
                    break;
                }
                assert!(
                    !allowed.is_empty(),
                    "{schema_json}: stuck at {:?}",
                    String::from_utf8_lossy(&doc)
                );
                let b = allowed[(next() % allowed.len() as u64) as usize];
                assert!(st.advance(&[b]));
                doc.push(b);
                assert!(doc.len() < 40, "{schema_json}: runs on");
            }
            let v: serde_json::Value = serde_json::from_slice(&doc).unwrap();
            let f = v.as_f64().unwrap();
            assert!((lo..=hi).contains(&f), "{schema_json}, walk {walk}: {v}");
            assert!(!int || v.is_i64(), "{v}");
        }
    }
}

#[test]
fn tuples_and_discriminated_unions() {
    let pair = serde_json::json!({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": false});
    strings(
        pair.clone(),
        &[
            ("[1,\"a\"]", 7, true),
            ("[1,\"a\",", 6, false),
            ("[\"a\"", 1, false),
            ("[]", 2, true),
        ],
    );
    let pair_min = serde_json::json!({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 2, "maxItems": 2});
    strings(pair_min, &[("[1]", 2, false), ("[1, \"b\"]", 8, true)]);
    // Draft 7: `items` as an array, the rest in `additionalItems`.
    let draft7 = serde_json::json!({"type": "array", "items": [{"type": "boolean"}], "additionalItems": {"type": "integer"}});
    strings(
        draft7,
        &[
            ("[true,1,2]", 10, true),
            ("[true,\"x\"", 6, false),
            ("[1", 1, false),
        ],
    );
    let pets = serde_json::json!({
        "$defs": {
            "Cat": {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}}, "required": ["kind", "lives"], "additionalProperties": false},
            "Dog": {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}}, "required": ["kind", "good"], "additionalProperties": false}
        },
        "type": "object",
        "properties": {"pet": {"oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}], "discriminator": {"propertyName": "kind"}}},
        "required": ["pet"],
        "additionalProperties": false
    });
    strings(
        pets,
        &[
            (r#"{"pet":{"kind":"cat","lives":9}}"#, 32, true),
            (r#"{"pet":{"kind":"dog","good":true}}"#, 34, true),
            (r#"{"pet":{"kind":"dog","lives":9}}"#, 22, false),
        ],
    );
}
