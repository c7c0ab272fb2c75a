//! The schema compiler's tests: what it accepts, what it refuses, and the DFAs of its
//! patterns and formats.

use super::*;
use serde_json::json;

/// Whether `d` matches all of `text`.
fn matches(d: &Dfa, text: &str) -> bool {
    let mut s = d.start;
    for &b in text.as_bytes() {
        match d.next(s, b) {
            Some(n) => s = n,
            None => return false,
        }
    }
    d.accepts(s)
}

#[test]
fn a_pattern_too_large_with_unicode_classes_is_followed_with_their_ascii_members() {
    // Small enough with Unicode classes: other scripts' letters are words.
    let small = pattern_dfa(r"^\w+( \w+)?$").unwrap();
    assert!(matches(&small, "héllo wörld"));
    // Unanchored, a pattern may have any text around it, in ASCII mode too.
    let around = pattern_dfa(r"(\w+\s){30}\w+").unwrap();
    let thirty_one = vec!["w"; 31].join(" ");
    assert!(matches(&around, &format!("«{thirty_one}» ✓")));
    // (Unicode's `\w` would count "é" as the first of 31 words.)
    assert!(!matches(&around, &format!("é {}", vec!["w"; 30].join(" "))));
    // Unicode `\w` repeated 31 times is past the limit; its ASCII members are not.
    let words = r"^(\w+\s){0,30}\w+$";
    let d = pattern_dfa(words).unwrap();
    let n_words = |n: usize| vec!["word"; n].join(" ");
    assert!(matches(&d, &n_words(1)));
    assert!(matches(&d, &n_words(31)));
    assert!(!matches(&d, &n_words(32)), "the bound still holds");
    assert!(!matches(&d, "héllo"), "only ASCII word characters");
    // Every string it accepts, the pattern accepts (here: the regex crate's view).
    let re = regex::Regex::new(words).unwrap();
    for t in [n_words(1), n_words(31), "a_1 B2\tc".into()] {
        assert!(matches(&d, &t) && re.is_match(&t), "{t:?}");
    }
    // Where ASCII mode would accept more (`\W` takes any byte there), the size error
    // stands.
    let e = pattern_dfa(r"^(\w+\W){0,30}\w+$").unwrap_err();
    assert!(e.contains("size limit"), "{e}");
}

#[test]
fn pydantic_shapes_compile() {
    let s = Schema::compile(&json!({
        "$defs": {"Pet": {"properties": {"kind": {"enum": ["cat", "dog"], "title": "Kind"}},
                          "required": ["kind"], "title": "Pet", "type": "object"}},
        "properties": {
            "name": {"title": "Name", "type": "string"},
            "age": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": null},
            "pets": {"items": {"$ref": "#/$defs/Pet"}, "type": "array", "maxItems": 3},
            "tags": {"type": "object", "additionalProperties": {"type": "number"}}
        },
        "required": ["name", "pets"],
        "title": "Person", "type": "object", "additionalProperties": false
    }))
    .unwrap();
    let Node::Object { props, .. } = s.node(s.root()) else {
        panic!("{s:?}")
    };
    let keys: Vec<&[u8]> = props.iter().map(|p| p.key.as_slice()).collect();
    assert_eq!(
        keys,
        [&b"\"name\""[..], b"\"age\"", b"\"pets\"", b"\"tags\""]
    );
    let req: Vec<bool> = props.iter().map(|p| p.required).collect();
    assert_eq!(req, [true, false, true, false]);
}

#[test]
fn one_of_is_taken_where_its_alternatives_cannot_overlap() {
    // Pydantic's discriminated union: a `const` tag in each alternative.
    let s = Schema::compile(&json!({
        "$defs": {
            "Cat": {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}}, "required": ["kind", "lives"]},
            "Dog": {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}}, "required": ["kind", "good"]}
        },
        "oneOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}, {"type": "null"}, {"type": "string"}],
        "discriminator": {"propertyName": "kind"}
    }));
    assert!(s.is_ok(), "{s:?}");
    // Recursion: an alternative still being compiled is taken to overlap.
    let s = Schema::compile(
        &json!({"$defs": {"T": {"oneOf": [{"type": "string"}, {"$ref": "#/$defs/T"}]}}, "$ref": "#/$defs/T"}),
    );
    assert!(s.is_err(), "{s:?}");
}

#[test]
fn recursion_closes_on_itself() {
    let s = Schema::compile(&json!({
        "type": "object",
        "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}
    }))
    .unwrap();
    assert!(s.nodes.len() < 10, "{s:?}");
}

#[test]
fn what_cannot_be_followed_is_refused_by_name() {
    for (schema, word) in [
        (json!({"type": "string", "format": "hostname"}), "hostname"),
        (
            json!({"type": "string", "format": "email", "pattern": "a"}),
            "pattern` with `format",
        ),
        (json!({"type": "integer", "multipleOf": 3}), "multipleOf"),
        (json!({"type": "integer", "minimum": 1e20}), "beyond"),
        (
            json!({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}),
            "may both match",
        ),
        (
            json!({"oneOf": [
                {"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"]},
                {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]}
            ]}),
            "alternatives 0 and 1",
        ),
        (
            json!({"$ref": "#/$defs/X", "minItems": 2, "$defs": {"X": {}}}),
            "minItems",
        ),
        (
            json!({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": true}}}),
            "uniqueItems",
        ),
    ] {
        let e = Schema::compile(&schema).unwrap_err();
        assert!(e.to_string().contains(word), "{schema}: {e}");
    }
    for (schema, why) in [
        (json!({"$ref": "#/$defs/Missing"}), "does not point"),
        (json!({"type": "strin"}), "unknown type"),
        (json!({"enum": []}), "non-empty"),
        (
            json!({"type": "object", "properties": {}, "required": ["a"], "additionalProperties": false}),
            "not among",
        ),
        (
            json!({"type": "array", "minItems": 3, "maxItems": 2}),
            "above",
        ),
        (json!(false), "accepts no value"),
        (
            json!({"type": "string", "pattern": "(a"}),
            "`pattern` \"(a\"",
        ),
        (
            json!({"type": "string", "minLength": 3, "maxLength": 2}),
            "above",
        ),
        (json!({"$ref": "#"}), "refer to themselves"),
        (
            json!({"$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "string"}]}}, "$ref": "#/$defs/A"}),
            "refer to themselves",
        ),
    ] {
        let e = Schema::compile(&schema).unwrap_err();
        assert!(e.to_string().contains(why), "{schema}: {e}");
    }
}
