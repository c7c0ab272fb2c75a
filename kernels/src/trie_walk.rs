//! The vocabulary's trie walked from a grammar's state, for the grammars whose state runs
//! byte by byte (a regular expression's DFA: [`crate::regex_mode`]; a context-free
//! grammar's stacks: [`crate::ebnf`]). The tokens come in byte order, each with the length
//! of the beginning it shares with the one before: a shared beginning is run once, and
//! every token under a beginning the grammar refuses is passed over without running it.

use crate::json_mode::JsonVocab;

/// A grammar's state after each byte of the token last run: level `d` is the state after
/// its first `d` bytes (level 0, the state the walk started from).
pub(crate) trait Levels {
    /// How many levels there are (at least 1).
    fn len(&self) -> usize;
    /// Keeps the first `len` levels.
    fn truncate(&mut self, len: usize);
    /// Runs byte `b` from the last level: true, with the new level added, where the
    /// grammar takes it.
    fn push(&mut self, b: u8) -> bool;
}

/// The tokens that may come next as a bitmask over a row of `n` logits (bit `i % 32` of
/// word `i / 32` for token `i`): each text token whose bytes `levels` takes, and the stop
/// tokens where `done` (the text so far is whole).
pub(crate) fn allowed(
    vocab: &JsonVocab,
    n: usize,
    levels: &mut impl Levels,
    done: bool,
) -> Vec<u32> {
    let mut words = vec![0u32; n.div_ceil(32)];
    let mut keep = |id: u32| {
        if (id as usize) < n {
            words[id as usize / 32] |= 1 << (id % 32);
        }
    };
    let (sorted, shared) = vocab.trie();
    // Whether the token last run had a byte the grammar refused (after `levels.len() - 1`
    // bytes it took).
    let mut dead = false;
    for (i, (&id, &common)) in sorted.iter().zip(shared).enumerate() {
        let common = common as usize;
        let live = levels.len() - 1;
        if dead && common > live {
            // It begins with the beginning that was refused.
            continue;
        }
        let from = common.min(live);
        levels.truncate(from + 1);
        dead = !vocab.trie_token(i)[from..].iter().all(|&b| levels.push(b));
        if !dead {
            keep(id);
        }
    }
    if done {
        for &id in vocab.stops() {
            keep(id);
        }
    }
    words
}
