use super::*;
use crate::testutil::{grammar_vocab, grammar_vocab_tokens, mask_by_hand, STOP};

/// vLLM's example of `guided_grammar`.
const SQL: &str = include_str!("../../testdata/vllm_sql.gbnf");

fn state(grammar: &str) -> EbnfState {
    EbnfState::new(compile(grammar).unwrap_or_else(|e| panic!("{grammar}: {e}")))
}

/// Whether `text` is a beginning of the grammar's language (`Some`), and whether whole.
fn run(grammar: &str, text: &[u8]) -> Option<bool> {
    let mut s = state(grammar);
    s.advance(text).then(|| s.done())
}

#[test]
fn vllms_sql_example_is_followed() {
    let q = b"SELECT col_1  from table_2  where col_2 = 1 ";
    assert_eq!(run(SQL, q), Some(true));
    for n in 0..q.len() {
        assert_eq!(run(SQL, &q[..n]), Some(false), "{:?}", &q[..n]);
    }
    assert_eq!(run(SQL, b"SELECT col_3"), None);
    assert_eq!(run(SQL, b"select"), None);
    assert_eq!(
        run(SQL, b"SELECT col_1  from table_2  where col_2 = 1  "),
        None
    );
}

/// A grammar of a regular language against the `regex` crate's matcher of the same,
/// on every text of up to 4 characters of an alphabet with multibyte characters: each is
/// whole where the expression matches, and a beginning where some longer text matches
/// (checked over the same texts with one to three characters more).
#[test]
fn regular_grammars_accept_what_their_expressions_match() {
    let cases = [
        (
            r#"root ::= [a-b]{1,2} ("x" | "yé")* [^a-bxy]?"#,
            r"[a-b]{1,2}(?:x|yé)*[^a-bxy]?",
        ),
        (
            "root ::= item (\",\" item)*\nitem ::= \"a\"+ | [é日] # a comment\n",
            r"(?:a+|[é日])(?:,(?:a+|[é日]))*",
        ),
        (r#"root ::= ("ab" | "a") "b"? . "#, r"(?:ab|a)b?(?s:.)"),
        (r#"root ::= "" | "x"{2} | "y"{,2}"#, r"|x{2}|y{0,2}"),
    ];
    let alphabet = ["a", "b", "x", "y", "é", "日", ",", "z"];
    let texts = |max: usize| {
        let mut all = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..max {
            last = last
                .iter()
                .flat_map(|t| alphabet.iter().map(move |c| format!("{t}{c}")))
                .collect();
            all.extend(last.iter().cloned());
        }
        all
    };
    let short = texts(4);
    let long = texts(6);
    for (grammar, re) in cases {
        let re = regex::Regex::new(&format!("^(?:{re})$")).unwrap();
        // Every beginning of a longer text that matches.
        let beginnings: std::collections::HashSet<&str> = long
            .iter()
            .filter(|l| re.is_match(l))
            .flat_map(|l| l.char_indices().map(|(i, _)| &l[..i]).chain([l.as_str()]))
            .collect();
        for t in &short {
            let whole = re.is_match(t);
            let begins = beginnings.contains(t.as_str());
            let got = run(grammar, t.as_bytes());
            assert_eq!(got.is_some(), begins, "{grammar}: {t:?} as a beginning");
            if let Some(done) = got {
                assert_eq!(done, whole, "{grammar}: {t:?} whole");
            }
        }
    }
}

/// A language no regular expression has: balanced parentheses, nested at any depth.
#[test]
fn nested_parentheses_balance() {
    let g = r#"root ::= ( "(" root ")" )*"#;
    let mut x = 7u64;
    for _ in 0..2000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = (x >> 60) as usize;
        let text: String = (0..n)
            .map(|i| {
                if (x >> (i * 2 + 3)) & 3 != 0 {
                    '('
                } else {
                    ')'
                }
            })
            .collect();
        let mut depth = 0i32;
        let mut ok = true;
        for c in text.chars() {
            depth += if c == '(' { 1 } else { -1 };
            ok &= depth >= 0;
        }
        let want = ok.then_some(depth == 0);
        assert_eq!(run(g, text.as_bytes()), want, "{text}");
    }
    // Deep: the stacks grow with the nesting, not with what came before.
    let deep = format!("{}{}", "(".repeat(3000), ")".repeat(3000));
    assert_eq!(run(g, deep.as_bytes()), Some(true));
    let mut s = state(g);
    for _ in 0..500 {
        assert!(s.advance(b"()"));
    }
    assert!(s.done());
    assert!(s.stacks.iter().all(|st| st.len() <= 2), "{:?}", s.stacks);
}

/// What the mask must be, token by token.
fn by_hand(s: &EbnfState, tokens: &[Vec<u8>], n: usize) -> Vec<u32> {
    mask_by_hand(tokens, n, s.done(), |b| s.clone().advance(b))
}

#[test]
fn the_trie_walk_allows_exactly_the_tokens_that_continue_the_grammar() {
    let tokens = grammar_vocab_tokens();
    let v = grammar_vocab(&tokens);
    let cases: [(&str, &[&[u8]]); 4] = [
        (
            r#"root ::= call ("," call)*
               call ::= [a-f]+ "(" (arg (", " arg)*)? ")"
               arg ::= [0-9]+ | call"#,
            &[b"", b"ab", b"ab(", b"ab(1, c(", b"ab(1, c(2))", b"ab(1),"],
        ),
        (
            r#"root ::= ( "(" root ")" )* "."?"#,
            &[b"", b"((", b"(()", b"()"],
        ),
        (
            r#"root ::= ("é" | "日本")+ [^é]?"#,
            &[b"", "é".as_bytes(), &"é".as_bytes()[..1], "日本".as_bytes()],
        ),
        (
            SQL,
            &[
                b"",
                b"SELECT col_",
                b"SELECT col_1  from table_1  where col_1 = 2 ",
            ],
        ),
    ];
    for (g, states) in cases {
        for &text in states {
            let mut s = state(g);
            assert!(s.advance(text), "{g}: {text:?}");
            for n in [tokens.len(), tokens.len() + 40] {
                let want = by_hand(&s, &tokens, n);
                assert_eq!(s.walk(&v, n), want, "{g}: after {text:?}, walked");
                // Twice through the kept masks: the first walks, the second copies.
                assert_eq!(s.allowed(&v, n), want, "{g}: after {text:?}");
                assert_eq!(s.allowed(&v, n), want, "{g}: after {text:?}, kept");
            }
        }
    }
}

#[test]
fn following_the_mask_always_ends_in_a_whole_text() {
    let tokens = grammar_vocab_tokens();
    let v = grammar_vocab(&tokens);
    let g = r#"root ::= "(" list ")"
               list ::= item (", " item){0,3}
               item ::= [a-c]+ | [0-9] | "(" list ")""#;
    let mut x = 11u64;
    for _ in 0..20 {
        let mut s = state(g);
        let mut text = Vec::new();
        loop {
            let bits = s.allowed(&v, tokens.len());
            let allowed: Vec<u32> = (0..tokens.len() as u32)
                .filter(|&i| bits[i as usize / 32] >> (i % 32) & 1 == 1)
                .collect();
            assert!(!allowed.is_empty(), "nothing may follow {text:?}");
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let id = allowed[(x >> 33) as usize % allowed.len()];
            if id == STOP {
                break;
            }
            assert!(s.advance(&tokens[id as usize]));
            text.extend_from_slice(&tokens[id as usize]);
            if text.len() > 400 {
                break;
            }
        }
        if text.len() <= 400 {
            assert!(s.done(), "{:?}", String::from_utf8_lossy(&text));
        }
    }
}

#[test]
fn a_grammar_that_cannot_be_followed_is_refused_with_its_reason() {
    for (g, why) in [
        ("", "no rules"),
        ("start ::= \"a\"", "no rule named `root`"),
        ("root ::= a", "`a` is used but not defined"),
        ("root ::= \"a\"\nroot ::= \"b\"", "defined twice"),
        ("root ::= \"a", "does not end"),
        ("root ::= [a", "does not end"),
        ("root ::= [z-a]", "runs backwards"),
        ("root ::= \"\\q\"", "unknown escape"),
        ("root ::= \"\\x4\"", "hexadecimal"),
        ("root ::= (\"a\"", "expected `)`"),
        ("root ::= \"a\"{3,2}", "repetition"),
        ("root ::= \"a\"{5000}", "past 1000"),
        (
            "root ::= root \"a\" | \"b\"",
            "`root` can come back to itself",
        ),
        (
            "root ::= x\nx ::= y? x \"a\" | \"b\"\ny ::= \"c\"",
            "`x` can come back",
        ),
        (
            "root ::= (\"a\"?)*",
            "`root` repeats something that may be empty",
        ),
        ("root ::= x{0,50}\nx ::= \"a\"?", "`root` repeats something"),
        ("root ::= ::=", "expected a string"),
        ("root \"a\"", "expected `::=`"),
        ("?start: value\nvalue: \"a\"", "expected a rule's name"),
        (
            "start: value\nvalue: \"a\"",
            "Lark's form (`start: …`) is not read",
        ),
    ] {
        let err = compile(g).err().unwrap_or_else(|| panic!("{g:?} compiled"));
        assert!(err.contains(why), "{g:?}: {err}");
    }
    // Repetitions written out past the limit; nested, they are rules calling rules.
    let mut big = String::from("root ::= r0\n");
    for i in 0..60 {
        big.push_str(&format!("r{i} ::= \"a\"{{0,1000}}\n"));
    }
    let err = compile(&big).expect_err("compiled");
    assert!(err.contains("too large"), "{err}");
    // Nesting is parsed and compiled by recursion: bounded.
    let deep = format!("root ::= {}\"a\"{}", "(".repeat(20_000), ")".repeat(20_000));
    assert!(compile(&deep)
        .expect_err("compiled")
        .contains("nested more than 64"));
    let stars = format!("root ::= \"a\"{}", "+".repeat(100));
    assert!(compile(&stars)
        .expect_err("compiled")
        .contains("nested more than 64"));
    assert!(compile(&format!(
        "root ::= {}\"a\"{}",
        "(".repeat(60),
        ")".repeat(60)
    ))
    .is_ok());
    assert!(compile(r#"root ::= (("a"{1000}){1000}){1000}"#).is_ok());
}

#[test]
fn comments_line_breaks_escapes_and_classes() {
    let g = "# a grammar\nroot ::= greeting # the first\n  ( \"\\n\" | [\\t\\x41-\\x43\\u00e9] )*\n\ngreeting ::=\n  'hi' | \"\\\"yo\\\"\"\n";
    assert_eq!(run(g, b"hi"), Some(true));
    assert_eq!(run(g, b"\"yo\"\n\tAC"), Some(true));
    assert_eq!(run(g, "hié".as_bytes()), Some(true));
    assert_eq!(run(g, b"hiD"), None);
    // `.` is any character, whole: a lone continuation byte is not one.
    assert_eq!(run("root ::= . .", "日x".as_bytes()), Some(true));
    assert_eq!(run("root ::= .", &[0x80]), None);
}
