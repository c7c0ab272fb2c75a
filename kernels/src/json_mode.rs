//! JSON mode (`response_format: {"type": "json_object"}`): a byte-level JSON recognizer
//! that says which tokens may come next, so that sampling only ever continues a JSON
//! object, and ends exactly when the object is complete.
//!
//! The recognizer is a pushdown automaton over bytes (RFC 8259: objects, arrays, strings
//! with escapes, numbers, `true`/`false`/`null`). A token is allowed when every one of its
//! bytes is accepted from the current state; a stop token only once the top-level object
//! has closed, and then nothing else. The object starts at once (no whitespace before
//! it), and runs of whitespace are capped, so that a model cannot idle in whitespace. Bytes of 0x80 and above are taken as string content
//! (the detokenizer sends whole characters; a model that emits a broken sequence gets a
//! replacement character inside a string, which is still JSON).

/// The most whitespace bytes in a row.
pub const MAX_WHITESPACE: u8 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    Object,
    Array,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    /// After `-`: a digit must follow.
    Minus,
    /// A leading `0`.
    Zero,
    Int,
    /// After `.`: a digit must follow.
    Dot,
    Frac,
    /// After `e`: a sign or digit.
    Exp,
    /// After `e+`/`e-`: a digit.
    ExpSign,
    ExpDigits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the top-level object: `{`.
    Start,
    /// A value must start.
    Value,
    /// After `[`: a value or `]`.
    ArrayFirst,
    /// After `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value inside a container: `,` or the container's end.
    After,
    /// Inside a string (a key when `key`); `esc`: after a backslash; `hex`: \u digits left.
    Str {
        key: bool,
        esc: bool,
        hex: u8,
    },
    Num(Num),
    /// The rest of `true`, `false` or `null`.
    Lit {
        word: u8,
        at: u8,
    },
    /// The top-level object is complete.
    Done,
}

const WORDS: [&[u8]; 3] = [b"true", b"false", b"null"];

/// Where a JSON object being generated stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonState {
    stack: Vec<Frame>,
    mode: Mode,
    whitespace: u8,
}

impl Default for JsonState {
    fn default() -> Self {
        Self::new()
    }
}

/// The containers of a state as seen while trying a token: the state's own, less those a
/// token closed, plus those it opened (so that trying a token copies nothing).
struct Stack<'a> {
    base: &'a [Frame],
    popped: usize,
    pushed: Vec<Frame>,
}

impl Stack<'_> {
    fn top(&self) -> Option<Frame> {
        match self.pushed.last() {
            Some(&f) => Some(f),
            None => self
                .base
                .len()
                .checked_sub(self.popped + 1)
                .map(|i| self.base[i]),
        }
    }
    fn push(&mut self, f: Frame) {
        self.pushed.push(f);
    }
    fn pop(&mut self) {
        if self.pushed.pop().is_none() {
            self.popped += 1;
        }
    }
    fn is_empty(&self) -> bool {
        self.pushed.is_empty() && self.popped >= self.base.len()
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The mode after a complete value, given the containers left.
fn after_value(stack: &Stack) -> Mode {
    if stack.is_empty() {
        Mode::Done
    } else {
        Mode::After
    }
}

/// One byte from `mode` (with `stack` and the whitespace run `ws`); `None` if the byte
/// cannot come next.
fn step(mode: Mode, stack: &mut Stack, ws: &mut u8, b: u8) -> Option<Mode> {
    let space_ok = matches!(
        mode,
        Mode::Value | Mode::ArrayFirst | Mode::ObjectFirst | Mode::Key | Mode::Colon | Mode::After
    );
    if space_ok && is_ws(b) {
        if *ws >= MAX_WHITESPACE {
            return None;
        }
        *ws += 1;
        return Some(mode);
    }
    // A number ends at the first byte that cannot continue it; that byte then counts in
    // the mode after the number.
    if let Mode::Num(n) = mode {
        let next = match (n, b) {
            (Num::Minus, b'0') => Some(Num::Zero),
            (Num::Minus, b'1'..=b'9') => Some(Num::Int),
            (Num::Int, b'0'..=b'9') => Some(Num::Int),
            (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
            (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
            (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::Exp),
            (Num::Exp, b'+' | b'-') => Some(Num::ExpSign),
            (Num::Exp | Num::ExpSign | Num::ExpDigits, b'0'..=b'9') => Some(Num::ExpDigits),
            _ => None,
        };
        if let Some(n) = next {
            *ws = 0;
            return Some(Mode::Num(n));
        }
        let complete = matches!(n, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits);
        if !complete {
            return None;
        }
        let m = after_value(stack);
        return step(m, stack, ws, b);
    }
    *ws = 0;
    let value_start = |b: u8, stack: &mut Stack| -> Option<Mode> {
        Some(match b {
            b'{' => {
                stack.push(Frame::Object);
                Mode::ObjectFirst
            }
            b'[' => {
                stack.push(Frame::Array);
                Mode::ArrayFirst
            }
            b'"' => Mode::Str {
                key: false,
                esc: false,
                hex: 0,
            },
            b'-' => Mode::Num(Num::Minus),
            b'0' => Mode::Num(Num::Zero),
            b'1'..=b'9' => Mode::Num(Num::Int),
            b't' => Mode::Lit { word: 0, at: 1 },
            b'f' => Mode::Lit { word: 1, at: 1 },
            b'n' => Mode::Lit { word: 2, at: 1 },
            _ => return None,
        })
    };
    let close = |b: u8, stack: &mut Stack| -> Option<Mode> {
        let want = match b {
            b'}' => Frame::Object,
            b']' => Frame::Array,
            _ => return None,
        };
        if stack.top() != Some(want) {
            return None;
        }
        stack.pop();
        Some(after_value(stack))
    };
    let key = Mode::Str {
        key: true,
        esc: false,
        hex: 0,
    };
    match mode {
        Mode::Start => (b == b'{').then(|| {
            stack.push(Frame::Object);
            Mode::ObjectFirst
        }),
        Mode::Value => value_start(b, stack),
        Mode::ArrayFirst => match b {
            b']' => close(b, stack),
            _ => value_start(b, stack),
        },
        Mode::ObjectFirst => match b {
            b'"' => Some(key),
            b'}' => close(b, stack),
            _ => None,
        },
        Mode::Key => (b == b'"').then_some(key),
        Mode::Colon => (b == b':').then_some(Mode::Value),
        Mode::After => match (b, stack.top()) {
            (b',', Some(Frame::Object)) => Some(Mode::Key),
            (b',', Some(Frame::Array)) => Some(Mode::Value),
            _ => close(b, stack),
        },
        Mode::Str { key, esc, hex } => {
            if hex > 0 {
                return b.is_ascii_hexdigit().then_some(Mode::Str {
                    key,
                    esc: false,
                    hex: hex - 1,
                });
            }
            if esc {
                return match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(Mode::Str {
                        key,
                        esc: false,
                        hex: 0,
                    }),
                    b'u' => Some(Mode::Str {
                        key,
                        esc: false,
                        hex: 4,
                    }),
                    _ => None,
                };
            }
            match b {
                b'"' if key => Some(Mode::Colon),
                b'"' => Some(after_value(stack)),
                b'\\' => Some(Mode::Str {
                    key,
                    esc: true,
                    hex: 0,
                }),
                0x00..=0x1f => None,
                _ => Some(mode),
            }
        }
        Mode::Lit { word, at } => {
            let w = WORDS[word as usize];
            if w.get(at as usize) != Some(&b) {
                return None;
            }
            Some(if at as usize + 1 == w.len() {
                after_value(stack)
            } else {
                Mode::Lit { word, at: at + 1 }
            })
        }
        Mode::Num(_) => unreachable!("numbers are handled above"),
        Mode::Done => None,
    }
}

impl JsonState {
    /// Before anything: a JSON object must follow.
    pub fn new() -> Self {
        Self {
            stack: Vec::new(),
            mode: Mode::Start,
            whitespace: 0,
        }
    }

    /// Whether the top-level object is complete (only a stop token may follow).
    pub fn done(&self) -> bool {
        self.mode == Mode::Done
    }

    /// The state after `bytes`, or `None` if they cannot continue a JSON object.
    fn after(&self, bytes: &[u8]) -> Option<(Mode, u8, usize, Vec<Frame>)> {
        let mut stack = Stack {
            base: &self.stack,
            popped: 0,
            pushed: Vec::new(),
        };
        let (mut mode, mut ws) = (self.mode, self.whitespace);
        for &b in bytes {
            mode = step(mode, &mut stack, &mut ws, b)?;
        }
        Some((mode, ws, stack.popped, stack.pushed))
    }

    /// Whether `bytes` (a token's) may come next.
    pub fn allows(&self, bytes: &[u8]) -> bool {
        !bytes.is_empty() && self.after(bytes).is_some()
    }

    /// Takes `bytes` (which [`JsonState::allows`]); returns false, changing nothing, if
    /// they may not come next.
    pub fn advance(&mut self, bytes: &[u8]) -> bool {
        match self.after(bytes) {
            Some((mode, ws, popped, pushed)) => {
                self.stack.truncate(self.stack.len() - popped);
                self.stack.extend(pushed);
                self.mode = mode;
                self.whitespace = ws;
                true
            }
            None => false,
        }
    }

    /// Sets every logit of a token that may not come next to −∞: tokens whose bytes do not
    /// continue the object, special tokens, and stop tokens until the object is complete
    /// (after which only stop tokens remain).
    ///
    /// Two shortcuts keep a row of 49,152 tokens to a fraction of a millisecond: a token
    /// whose first byte cannot come next is refused without trying the rest (the 256
    /// first bytes are tried once per call), and inside a string a token with no quote,
    /// backslash or control byte is taken whole.
    pub fn mask(&self, logits: &mut [f32], vocab: &JsonVocab) {
        let done = self.done();
        let mut first = [false; 256];
        if !done {
            for (b, ok) in first.iter_mut().enumerate() {
                *ok = self.allows(&[b as u8]);
            }
        }
        let in_string = matches!(
            self.mode,
            Mode::Str {
                esc: false,
                hex: 0,
                ..
            }
        );
        // Where whitespace leaves the mode as it is (between tokens of structure, or inside
        // a string), a token's first byte after its leading whitespace is checked by the
        // same table.
        let ws_keeps_mode = in_string
            || matches!(
                self.mode,
                Mode::Value
                    | Mode::ArrayFirst
                    | Mode::ObjectFirst
                    | Mode::Key
                    | Mode::Colon
                    | Mode::After
            );
        let ws_room = MAX_WHITESPACE.saturating_sub(self.whitespace);
        for (id, l) in logits.iter_mut().enumerate() {
            let ok = match vocab.kind.get(id) {
                Some(Kind::Stop) => done,
                Some(&Kind::Text {
                    first: b,
                    plain,
                    lead_ws,
                    after_ws,
                }) if !done && first[b as usize] => {
                    if in_string && plain {
                        true
                    } else {
                        let quick_no = ws_keeps_mode
                            && lead_ws > 0
                            && ((!in_string && lead_ws > ws_room)
                                || after_ws.is_some_and(|c| !first[c as usize]));
                        !quick_no && self.allows(&vocab.bytes[id])
                    }
                }
                _ => false,
            };
            if !ok {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Stop,
    /// Never allowed in JSON mode: special tokens, empty tokens.
    Never,
    /// A token of text: its first byte; whether it has no quote, backslash or control
    /// byte (it can sit inside a string whole); its leading whitespace bytes (at most 255
    /// counted) and the byte after them.
    Text {
        first: u8,
        plain: bool,
        lead_ws: u8,
        after_ws: Option<u8>,
    },
}

/// A vocabulary as JSON mode sees it, built once per model.
pub struct JsonVocab {
    bytes: Vec<Vec<u8>>,
    kind: Vec<Kind>,
}

impl JsonVocab {
    /// `n` tokens: `token_bytes(id)` their bytes, `special(id)` whether special, `stop`
    /// the stop tokens.
    pub fn new<'t>(
        n: usize,
        token_bytes: impl Fn(u32) -> &'t [u8],
        special: impl Fn(u32) -> bool,
        stop: &[u32],
    ) -> Self {
        let bytes: Vec<Vec<u8>> = (0..n as u32).map(|id| token_bytes(id).to_vec()).collect();
        let kind = bytes
            .iter()
            .enumerate()
            .map(|(id, b)| {
                let id = id as u32;
                if stop.contains(&id) {
                    Kind::Stop
                } else if special(id) || b.is_empty() {
                    Kind::Never
                } else {
                    let lead = b.iter().take_while(|&&c| is_ws(c)).count();
                    Kind::Text {
                        first: b[0],
                        plain: b.iter().all(|&c| c >= 0x20 && c != b'"' && c != b'\\'),
                        lead_ws: lead.min(255) as u8,
                        after_ws: b.get(lead).copied(),
                    }
                }
            })
            .collect();
        Self { bytes, kind }
    }

    /// A model's tokenizer's.
    pub fn of(t: &crate::tokenizer::Tokenizer) -> Self {
        Self::new(
            t.vocab_size(),
            |id| t.token_bytes(id),
            |id| t.is_special(id),
            &t.stop_tokens,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn whitespace_runs_are_capped() {
        let mut st = JsonState::new();
        assert!(!st.allows(b" "), "the object starts at once");
        assert!(st.advance(b"{"));
        let ws = " ".repeat(MAX_WHITESPACE as usize);
        assert!(st.advance(ws.as_bytes()));
        assert!(!st.allows(b" "));
        assert!(st.advance(b"\"k\""));
        assert!(st.allows(b" "), "a run ends at the next other byte");
    }

    #[test]
    fn the_masks_shortcuts_decide_as_trying_every_byte_does() {
        // Every single byte, and random tokens of printable and JSON-significant bytes.
        let mut x = 7u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
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
            let mut l = vec![0.0f32; tokens.len()];
            st.mask(&mut l, &vocab);
            for (id, t) in tokens.iter().enumerate() {
                let want = match id {
                    5 => st.done(),
                    3 => false,
                    _ => !st.done() && st.allows(t),
                };
                assert_eq!(l[id] == 0.0, want, "after {prefix:?}: token {t:?}");
            }
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
}
