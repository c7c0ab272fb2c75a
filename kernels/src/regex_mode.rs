//! Text held to a regular expression (vLLM's `guided_regex`, and `guided_choice`: one of
//! a list of texts): which tokens may come next, so that sampling only ever continues a
//! text the expression matches, whole, and ends only where it does.
//!
//! The expression is compiled once to a minimized DFA over UTF-8 bytes, anchored at both
//! ends (the one `pattern` in a JSON schema compiles to: [`crate::json_schema::Dfa`],
//! size-limited and cached). A token may come next when its bytes lead the DFA from the
//! text's state to a live one; a stop token when the text so far is a whole match. The
//! mask walks the vocabulary as a trie ([`JsonVocab`]'s tokens in byte order, each
//! sharing a beginning with the one before): a shared beginning is run once, and every
//! token under a beginning that kills the DFA is refused without running it. A state's
//! mask depends on nothing else, so each is kept ([`Masks`], per vocabulary) and a text
//! that comes back to a state (a loop in the expression; the same expression in the next
//! request) costs a copy of its bits.

use crate::json_mode::JsonVocab;
use crate::json_schema::Dfa;
use regex_automata::util::primitives::StateID;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The most bytes of masks a vocabulary keeps (about 5,000 rows of SmolLM2's 49,152
/// tokens); past it, they are dropped and computed again as needed.
const MAX_MASK_BYTES: usize = 32 << 20;

/// What a mask is kept by: its DFA ([`Dfa::id`]), state and row width.
type MaskKey = (u64, StateID, usize);

/// A vocabulary's masks already computed.
#[derive(Debug, Default)]
pub struct Masks(Mutex<Kept>);

/// The masks, and the bytes they take.
#[derive(Debug, Default)]
struct Kept {
    masks: HashMap<MaskKey, Arc<[u32]>>,
    bytes: usize,
}

impl Masks {
    fn get(&self, key: MaskKey) -> Option<Arc<[u32]>> {
        self.0.lock().ok()?.masks.get(&key).cloned()
    }
    fn keep(&self, key: MaskKey, bits: &[u32]) {
        if let Ok(mut m) = self.0.lock() {
            if m.bytes + bits.len() * 4 > MAX_MASK_BYTES {
                *m = Kept::default();
            }
            m.masks.insert(key, bits.into());
            m.bytes += bits.len() * 4;
        }
    }
}

/// Where a text held to a regular expression stands.
#[derive(Debug, Clone)]
pub struct RegexState {
    dfa: Arc<Dfa>,
    state: StateID,
}

impl PartialEq for RegexState {
    fn eq(&self, o: &Self) -> bool {
        self.dfa.source == o.dfa.source && self.state == o.state
    }
}

/// A regular expression compiled for [`RegexState`]: the text must match it whole (the
/// `^…$` are implied). An expression past the DFA's size limit, or not one, is refused
/// with the compiler's reason.
pub fn compile(regex: &str) -> Result<Arc<Dfa>, String> {
    crate::json_schema::whole_match_dfa(regex, regex)
}

/// The expression that matches exactly the texts of `choices`.
pub fn choice_regex(choices: &[String]) -> String {
    let alts: Vec<String> = choices.iter().map(|c| regex_syntax::escape(c)).collect();
    format!("(?:{})", alts.join("|"))
}

impl RegexState {
    /// A text of this compiled expression must follow.
    pub fn new(dfa: Arc<Dfa>) -> Self {
        let state = dfa.start;
        Self { dfa, state }
    }

    /// Whether the text so far matches whole (a stop token may follow).
    pub fn done(&self) -> bool {
        self.dfa.accepts(self.state)
    }

    /// The state after `bytes`, `None` if they may not come next.
    fn run(&self, bytes: &[u8]) -> Option<StateID> {
        bytes
            .iter()
            .try_fold(self.state, |s, &b| self.dfa.next(s, b))
    }

    /// Whether `bytes` (a token's) may come next.
    pub fn allows(&self, bytes: &[u8]) -> bool {
        !bytes.is_empty() && self.run(bytes).is_some()
    }

    /// Takes `bytes`; returns false, changing nothing, if they may not come next.
    pub fn advance(&mut self, bytes: &[u8]) -> bool {
        match self.run(bytes) {
            Some(s) => {
                self.state = s;
                true
            }
            None => false,
        }
    }

    /// The tokens that may come next as a bitmask over a row of `n` logits: bit `i % 32`
    /// of word `i / 32` set when token `i` may (the form of
    /// [`crate::json_mode::JsonState::allowed`]). Special tokens never may; stop tokens
    /// once the text matches.
    pub fn allowed(&self, vocab: &JsonVocab, n: usize) -> Vec<u32> {
        let key = (self.dfa.id, self.state, n);
        if let Some(bits) = vocab.regex_masks().get(key) {
            return bits.to_vec();
        }
        let bits = self.walk(vocab, n);
        vocab.regex_masks().keep(key, &bits);
        bits
    }

    /// [`RegexState::allowed`], computed: the vocabulary's trie walked from this state,
    /// without the masks kept (what a state's first row costs).
    pub fn walk(&self, vocab: &JsonVocab, n: usize) -> Vec<u32> {
        let mut words = vec![0u32; n.div_ceil(32)];
        let mut keep = |id: u32| {
            if (id as usize) < n {
                words[id as usize / 32] |= 1 << (id % 32);
            }
        };
        let (sorted, shared) = vocab.trie();
        // states[d]: the DFA's state after the first d bytes of the token last run, all
        // live; `dead`: whether its next byte killed it.
        let mut states: Vec<StateID> = vec![self.state];
        let mut dead = false;
        for (i, (&id, &common)) in sorted.iter().zip(shared).enumerate() {
            let common = common as usize;
            let live = states.len() - 1;
            if dead && common > live {
                // It begins with the beginning that killed the DFA.
                continue;
            }
            let from = common.min(live);
            states.truncate(from + 1);
            let bytes = vocab.trie_token(i);
            dead = false;
            let mut s = states[from];
            for &b in &bytes[from..] {
                match self.dfa.next(s, b) {
                    Some(next) => {
                        s = next;
                        states.push(s);
                    }
                    None => {
                        dead = true;
                        break;
                    }
                }
            }
            if !dead {
                keep(id);
            }
        }
        if self.done() {
            for &id in vocab.stops() {
                keep(id);
            }
        }
        words
    }
}

#[cfg(test)]
mod tests;
