//! The grammar a sequence's output is held to, whichever kind: a JSON document (JSON
//! mode, a schema's structured output, tool calls: [`crate::json_mode`]), a text a
//! regular expression matches (vLLM's `guided_regex` and `guided_choice`:
//! [`crate::regex_mode`]), or a text of a context-free grammar (vLLM's `guided_grammar`:
//! [`crate::ebnf`]). The engine follows it through one interface: what may come
//! next as a bitmask of the vocabulary, and each token taken.

use crate::ebnf::EbnfState;
use crate::json_mode::{JsonState, JsonVocab};
use crate::regex_mode::RegexState;

/// Where an output held to a grammar stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    Json(JsonState),
    Regex(RegexState),
    Ebnf(EbnfState),
}

impl Grammar {
    /// Takes `bytes`; returns false, changing nothing, if they may not come next.
    pub fn advance(&mut self, bytes: &[u8]) -> bool {
        match self {
            Self::Json(j) => j.advance(bytes),
            Self::Regex(r) => r.advance(bytes),
            Self::Ebnf(e) => e.advance(bytes),
        }
    }

    /// The tokens that may come next, as a bitmask over a row of `n` logits (bit `i % 32`
    /// of word `i / 32` for token `i`).
    pub fn allowed(&self, vocab: &JsonVocab, n: usize) -> Vec<u32> {
        match self {
            Self::Json(j) => j.allowed(vocab, n),
            Self::Regex(r) => r.allowed(vocab, n),
            Self::Ebnf(e) => e.allowed(vocab, n),
        }
    }
}
