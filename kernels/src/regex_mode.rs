//! Text held to a regular expression (vLLM's `guided_regex`, and `guided_choice`: one of
//! a list of texts): which tokens may come next, so that sampling only ever continues a
//! text the expression matches, whole, and ends only where it does.
//!
//! The expression is compiled once to a minimized DFA over UTF-8 bytes, anchored at both
//! ends (the one `pattern` in a JSON schema compiles to: [`crate::json_schema::Dfa`],
//! size-limited and cached). A token may come next when its bytes lead the DFA from the
//! text's state to a live one; a stop token when the text so far is a whole match. The
//! mask walks the vocabulary as a trie ([`crate::trie_walk`]): a shared beginning is run
//! once, and every token under a beginning that kills the DFA is refused without running
//! it. A state's
//! mask depends on nothing else, so each is kept ([`crate::mask_cache::Masks`], per vocabulary) and a text
//! that comes back to a state (a loop in the expression; the same expression in the next
//! request) costs a copy of its bits.

use crate::json_mode::JsonVocab;
use crate::json_schema::Dfa;
use regex_automata::util::primitives::StateID;
use std::sync::Arc;

/// What a mask is kept by: its DFA ([`Dfa::id`]), state and row width.
pub type MaskKey = (u64, StateID, usize);

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
        vocab
            .regex_masks()
            .get_or_walk((self.dfa.id, self.state, n), || self.walk(vocab, n))
    }

    /// [`RegexState::allowed`], computed: the vocabulary's trie walked from this state,
    /// without the masks kept (what a state's first row costs).
    pub fn walk(&self, vocab: &JsonVocab, n: usize) -> Vec<u32> {
        let mut levels = DfaLevels {
            dfa: &self.dfa,
            states: vec![self.state],
        };
        crate::trie_walk::allowed(vocab, n, &mut levels, self.done())
    }
}

/// The DFA's state after each byte of the token last run.
struct DfaLevels<'a> {
    dfa: &'a Dfa,
    states: Vec<StateID>,
}

impl crate::trie_walk::Levels for DfaLevels<'_> {
    fn len(&self) -> usize {
        self.states.len()
    }
    fn truncate(&mut self, len: usize) {
        self.states.truncate(len);
    }
    fn push(&mut self, b: u8) -> bool {
        let last = self.states[self.states.len() - 1];
        match self.dfa.next(last, b) {
            Some(s) => {
                self.states.push(s);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests;
