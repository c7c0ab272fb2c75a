//! SentencePiece's BPE as GGUF files carry it (`tokenizer.ggml.model = llama`: Llama 2,
//! Mistral 7B, TinyLlama, CodeLlama): a vocabulary with a score per piece and no merge
//! list. Spaces are written `▁`, a space goes before the text (`add_space_prefix`), the
//! highest-scoring adjacent pair that is a piece merges first, and a character no piece
//! holds falls back to its UTF-8 bytes (`<0x0A>`). The merge order is llama.cpp's (and
//! SentencePiece's): score, then leftmost; special tokens' text is split out first.

use aho_corasick::{AhoCorasick, MatchKind};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// SentencePiece's space.
pub const SPACE: char = '\u{2581}';

/// The vocabulary and what encoding needs of it.
pub struct Spm {
    /// Each piece's id (the last id where a text repeats, as llama.cpp's map).
    ids: HashMap<String, u32>,
    scores: Vec<f32>,
    /// The id of byte `b`'s piece (`<0xXX>`), where the vocabulary has one.
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
    add_space_prefix: bool,
    /// Special tokens' texts (longest first where two start together) and their ids.
    specials: Option<(AhoCorasick, Vec<u32>)>,
}

/// A run of text that is still one symbol: byte range into the escaped text, neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of two adjacent symbols into a piece.
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// The heap's top: the highest score, then the leftmost.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

/// The byte a piece `<0xXX>` stands for.
pub fn byte_piece(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

impl Spm {
    /// `tokens`/`scores` the vocabulary; `byte` and `special` say which tokens are byte
    /// pieces and special (split out of text whole).
    pub fn new(
        tokens: &[&str],
        scores: Vec<f32>,
        byte: impl Fn(usize) -> bool,
        special: impl Fn(usize) -> bool,
        unk: Option<u32>,
        add_space_prefix: bool,
    ) -> Result<Self, String> {
        if scores.len() != tokens.len() {
            return Err(format!(
                "{} scores for {} tokens",
                scores.len(),
                tokens.len()
            ));
        }
        let mut ids = HashMap::with_capacity(tokens.len());
        let mut byte_ids = [None; 256];
        let (mut texts, mut special_ids) = (Vec::new(), Vec::new());
        for (i, t) in tokens.iter().enumerate() {
            ids.insert(t.to_string(), i as u32);
            if byte(i) {
                if let Some(b) = byte_piece(t) {
                    byte_ids[b as usize] = Some(i as u32);
                }
            }
            if special(i) && !t.is_empty() {
                texts.push(*t);
                special_ids.push(i as u32);
            }
        }
        let specials = if texts.is_empty() {
            None
        } else {
            let ac = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&texts)
                .map_err(|e| format!("special tokens: {e}"))?;
            Some((ac, special_ids))
        };
        Ok(Self {
            ids,
            scores,
            byte_ids,
            unk,
            add_space_prefix,
            specials,
        })
    }

    /// Whether the encoder puts a space before the text (`add_space_prefix`), which
    /// decoding a whole text drops again.
    pub fn adds_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// Appends `text`'s ids to `out`: special tokens' text as their ids, each run of text
    /// between them (with a space before it where it opens the text or follows a special
    /// token, as llama.cpp) merged piece by piece.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut after_special = true;
        let mut at = 0;
        let run = |piece: &str, after_special: bool, out: &mut Vec<u32>| {
            let mut escaped = String::with_capacity(piece.len() * 3 + 3);
            if self.add_space_prefix && after_special {
                escaped.push(SPACE);
            }
            for c in piece.chars() {
                escaped.push(if c == ' ' { SPACE } else { c });
            }
            self.merge(&escaped, out);
        };
        if let Some((ac, special_ids)) = &self.specials {
            for m in ac.find_iter(text) {
                if m.start() > at {
                    run(&text[at..m.start()], after_special, out);
                }
                out.push(special_ids[m.pattern().as_usize()]);
                after_special = true;
                at = m.end();
            }
        }
        if at < text.len() {
            run(&text[at..], after_special, out);
        }
    }

    /// One run of escaped text: characters merged by score, then each symbol as its piece
    /// or its bytes.
    fn merge(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        let Some(last) = symbols.last_mut() else {
            return;
        };
        last.next = None;
        let mut heap = BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
            let (l, r) = (left?, right?);
            let (a, b) = (symbols[l], symbols[r]);
            let id = *self.ids.get(&text[a.start..a.start + a.len + b.len])?;
            Some(Bigram {
                left: l,
                right: r,
                score: self.scores[id as usize],
                len: a.len + b.len,
            })
        };
        for i in 1..symbols.len() {
            heap.extend(bigram(&symbols, Some(i - 1), Some(i)));
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            // Stale: one side has merged since this pair was seen.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
                continue;
            }
            symbols[b.left].len = b.len;
            symbols[b.left].next = r.next;
            symbols[b.right].len = 0;
            if let Some(n) = r.next {
                symbols[n].prev = Some(b.left);
            }
            heap.extend(bigram(&symbols, l.prev, Some(b.left)));
            heap.extend(bigram(&symbols, Some(b.left), r.next));
        }
        let mut i = Some(0);
        while let Some(at) = i {
            let s = symbols[at];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        out.extend(self.byte_ids[b as usize].or(self.unk));
                    }
                }
            }
            i = s.next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary where the merge order, not the pieces alone, decides the split.
    fn vocab() -> Spm {
        let tokens = [
            "<unk>", "<s>", "<0x0A>", "▁", "a", "b", "c", "ab", "bc", "▁a", "▁ab",
        ];
        let scores = vec![
            0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -2.0, -3.0, -1.5, -2.5, -4.0,
        ];
        Spm::new(&tokens, scores, |i| i == 2, |i| i == 1, Some(0), true).expect("a vocabulary")
    }

    #[test]
    fn the_best_pair_merges_first_and_bytes_fall_back() {
        let v = vocab();
        let mut out = Vec::new();
        // "▁abc": "bc" (-1.5) merges before "▁a" (-2.5) and "ab" (-3), so not "▁ab" + "c".
        v.encode("abc", &mut out);
        assert_eq!(out, [9, 8]);
        out.clear();
        // A line break is its byte piece; "é" has none and no byte piece: unknown, twice.
        v.encode("a\né", &mut out);
        assert_eq!(out, [9, 2, 0, 0]);
        out.clear();
        // Special text splits; the text after it gets the space again.
        v.encode("a<s>a", &mut out);
        assert_eq!(out, [9, 1, 9]);
        assert_eq!(byte_piece("<0xE2>"), Some(0xE2));
        assert_eq!(byte_piece("<0xE>"), None);
    }
}
