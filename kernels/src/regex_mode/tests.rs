use super::*;
use crate::testutil::{
    grammar_vocab as vocab, grammar_vocab_tokens as vocab_tokens, mask_by_hand, STOP,
};

/// What the mask must be, token by token.
fn by_hand(s: &RegexState, tokens: &[Vec<u8>], n: usize) -> Vec<u32> {
    mask_by_hand(tokens, n, s.done(), |b| s.allows(b))
}

#[test]
fn the_trie_walk_allows_exactly_the_tokens_that_continue_a_match() {
    let tokens = vocab_tokens();
    let v = vocab(&tokens);
    let cases: [(&str, &[&[u8]]); 5] = [
        (
            r"[a-f]{2,5}-[0-9]+",
            &[b"", b"ab", b"abcde", b"abc-", b"abc-12"],
        ),
        (r"(?:yes|no|maybe)\.", &[b"", b"ma", b"no", b"no."]),
        (r"\d{3}(?: \d{3})*", &[b"", b"12", b"123", b"123 4"]),
        (
            r"é+ü?",
            &[b"", "é".as_bytes(), &"é".as_bytes()[..1], "éü".as_bytes()],
        ),
        (r"(?s).{0,3}", &[b"", b"x", b"xyz"]),
    ];
    for (re, states) in cases {
        let dfa = compile(re).expect("compiles");
        for &text in states {
            let mut s = RegexState::new(dfa.clone());
            assert!(s.advance(text), "{re}: {text:?} is a beginning");
            // A row as wide as the vocabulary, and one padded past it.
            for n in [tokens.len(), tokens.len() + 40] {
                let want = by_hand(&s, &tokens, n);
                // Walked, then kept and taken from the vocabulary's masks.
                let got = s.walk(&v, n);
                assert_eq!(s.allowed(&v, n), got);
                assert_eq!(s.allowed(&v, n), got);
                let diff: Vec<usize> = (0..n)
                    .filter(|&i| (got[i / 32] ^ want[i / 32]) & (1 << (i % 32)) != 0)
                    .collect();
                assert!(
                    diff.is_empty(),
                    "{re} after {text:?}: tokens {diff:?} differ"
                );
            }
            let kept = by_hand(&s, &tokens, tokens.len());
            assert!(
                kept.iter().any(|&w| w != 0),
                "{re} after {text:?}: some token"
            );
        }
    }
}

#[test]
fn stop_tokens_come_only_where_the_text_matches_whole() {
    let tokens = vocab_tokens();
    let v = vocab(&tokens);
    let mut s = RegexState::new(compile("ab|abcd").expect("compiles"));
    let stop_kept =
        |s: &RegexState| s.allowed(&v, tokens.len())[STOP as usize / 32] & (1 << (STOP % 32)) != 0;
    assert!(!stop_kept(&s) && !s.done());
    assert!(s.advance(b"a"));
    assert!(!stop_kept(&s));
    assert!(s.advance(b"b"));
    assert!(stop_kept(&s) && s.done());
    assert!(s.allows(b"cd") && !s.allows(b"ce"));
    assert!(s.advance(b"cd"));
    // The whole match, with nothing that may follow: the stop token alone.
    let bits = s.allowed(&v, tokens.len());
    let kept: Vec<usize> = (0..tokens.len())
        .filter(|&i| bits[i / 32] & (1 << (i % 32)) != 0)
        .collect();
    assert_eq!(kept, vec![STOP as usize]);
    // A refused token changes nothing.
    assert!(!s.advance(b"x"));
    assert!(s.done());
}

#[test]
fn choices_are_matched_as_written_not_as_expressions() {
    let choices: Vec<String> = ["a.b", "(x)", "c+", "日本"].map(String::from).to_vec();
    let dfa = compile(&choice_regex(&choices)).expect("compiles");
    for c in &choices {
        let mut s = RegexState::new(dfa.clone());
        assert!(s.advance(c.as_bytes()) && s.done(), "{c} is a choice");
    }
    for other in ["axb", "x", "cc", "c", "(x)y", "日"] {
        let mut s = RegexState::new(dfa.clone());
        assert!(
            !(s.advance(other.as_bytes()) && s.done()),
            "{other} is no choice"
        );
    }
    // The masked mask: after "a", only "." may follow.
    let tokens = vocab_tokens();
    let v = vocab(&tokens);
    let mut s = RegexState::new(dfa);
    assert!(s.advance(b"a"));
    let bits = s.allowed(&v, tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        if bits[id / 32] & (1 << (id % 32)) != 0 {
            assert!(
                b".b".starts_with(t) && !t.is_empty(),
                "token {t:?} after \"a\""
            );
        }
    }
}

#[test]
fn a_bad_or_huge_expression_is_refused_with_its_reason() {
    assert!(compile("(unclosed").is_err());
    assert!(compile("[z-a]").is_err());
    // Far past the DFA's size limit (2^21 states: the 21st byte from the end is an `a`),
    // in Unicode and in ASCII alike.
    let err = compile(r"[ab]*a[ab]{20}").expect_err("too large");
    assert!(!err.is_empty());
}

#[test]
fn following_the_mask_always_ends_in_a_match() {
    let tokens = vocab_tokens();
    let v = vocab(&tokens);
    let dfa = compile(r"[a-f]{2,5}-[0-9]{1,4}(?:\.[0-9]{2})?").expect("compiles");
    let whole = regex::Regex::new(r"^[a-f]{2,5}-[0-9]{1,4}(?:\.[0-9]{2})?$").expect("re");
    let mut x = 7u64;
    for _ in 0..50 {
        let mut s = RegexState::new(dfa.clone());
        let mut text = Vec::new();
        loop {
            let bits = s.allowed(&v, tokens.len());
            let kept: Vec<usize> = (0..tokens.len())
                .filter(|&i| bits[i / 32] & (1 << (i % 32)) != 0)
                .collect();
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let id = kept[(x >> 33) as usize % kept.len()];
            if id == STOP as usize {
                break;
            }
            assert!(s.advance(&tokens[id]));
            text.extend_from_slice(&tokens[id]);
            assert!(text.len() < 64, "a match is finite");
        }
        let text = String::from_utf8(text).expect("UTF-8");
        assert!(whole.is_match(&text), "{text:?}");
    }
}
