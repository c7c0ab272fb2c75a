//! Text held to a context-free grammar (vLLM's `guided_grammar`: EBNF in the GBNF form,
//! [`parse`]): which tokens may come next, so that sampling only ever continues a text the
//! grammar's `root` can begin, and ends only where `root` is complete.
//!
//! The grammar is compiled once ([`compile()`], cached by its text) to byte sets and calls
//! of rules. Where a text stands is a set of stacks, as a pushdown automaton's (the way
//! llama.cpp follows GBNF): each stack's top is a byte set the next byte may be from,
//! each entry below it where to go on when the rule above it is complete. A byte moves
//! every stack whose top holds it on, and a call on top is expanded into its rule's
//! alternatives, until every top is a byte set again; the text is complete where one
//! alternative of `root` ended.
//!
//! The mask walks the vocabulary as a trie, as a regular expression's does
//! ([`crate::trie_walk`]): a shared beginning is run once, and every token under a
//! beginning no stack survives is refused without running it. The stacks are linked
//! lists in one arena, so a byte's step makes a node per surviving stack, and going back
//! up the trie drops the nodes made below. Masks are kept by the state's stacks (per
//! vocabulary, as the regular expressions' are), so a state met again costs a copy.

mod compile;
pub mod parse;
#[cfg(test)]
mod tests;

use compile::Elem;
pub use compile::{Program, MAX_ELEMS};

use crate::json_mode::JsonVocab;
use std::collections::HashMap;
use std::sync::Arc;

/// The most stacks a state keeps (an ambiguous grammar's can multiply); past it, the
/// rest are dropped, which can only narrow what may come next.
pub const MAX_STACKS: usize = 4096;

/// The most nodes a walk's arena holds (16 MB): a grammar ambiguous enough to pass it
/// (its stacks multiplying with each byte) has the rest dropped, which can only narrow
/// what may come next, rather than stall the engine.
pub const MAX_STEP_NODES: usize = 2 << 20;

/// What a mask is kept by: the grammar ([`Program::id`]), the state's stacks
/// ([`EbnfState::key`]) and the row's width.
pub type MaskKey = (u64, Vec<u32>, usize);

/// A grammar compiled, from the process's cache of them (by their text).
pub fn compile(text: &str) -> Result<Arc<Program>, String> {
    type Cache = HashMap<String, Arc<Program>>;
    static CACHE: std::sync::OnceLock<std::sync::Mutex<Cache>> = std::sync::OnceLock::new();
    const MAX_CACHED: usize = 256;
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = cache.lock().ok().and_then(|c| c.get(text).cloned()) {
        return Ok(p);
    }
    let p = Arc::new(compile::compile(text)?);
    if let Ok(mut c) = cache.lock() {
        if c.len() >= MAX_CACHED {
            c.clear();
        }
        c.insert(text.to_string(), p.clone());
    }
    Ok(p)
}

/// No node: the bottom of a stack.
const NIL: u32 = u32::MAX;

/// Where a text held to a grammar stands.
#[derive(Debug, Clone)]
pub struct EbnfState {
    prog: Arc<Program>,
    /// Each stack's positions in the program, bottom first, its top a byte set; sorted.
    stacks: Vec<Vec<u32>>,
    /// Whether the text so far is a whole `root`.
    done: bool,
}

impl PartialEq for EbnfState {
    fn eq(&self, o: &Self) -> bool {
        self.prog.id == o.prog.id && self.stacks == o.stacks && self.done == o.done
    }
}

impl EbnfState {
    /// A text of `prog`'s `root` must follow.
    pub fn new(prog: Arc<Program>) -> Self {
        let mut w = Walker::new(&prog);
        let mut tops = Vec::new();
        let mut done = false;
        for &a in &prog.alts[prog.root as usize] {
            w.expand(a, NIL, &mut tops, &mut done);
        }
        w.dedup(&mut tops);
        let stacks = w.export(&tops);
        Self { prog, stacks, done }
    }

    /// Whether the text so far is a whole `root` (a stop token may follow).
    pub fn done(&self) -> bool {
        self.done
    }

    /// Takes `bytes`; returns false, changing nothing, if they may not come next.
    pub fn advance(&mut self, bytes: &[u8]) -> bool {
        let mut w = Walker::new(&self.prog);
        let mut tops = w.import(&self.stacks);
        let mut done = self.done;
        for &b in bytes {
            let mut next = Vec::new();
            done = w.step(&tops, b, &mut next);
            if next.is_empty() && !done {
                return false;
            }
            tops = next;
        }
        self.stacks = w.export(&tops);
        self.done = done;
        true
    }

    /// What masks of this state are kept by: its stacks, each bottom first and followed by
    /// `u32::MAX`, then whether it is complete.
    fn key(&self) -> Vec<u32> {
        let mut k: Vec<u32> =
            Vec::with_capacity(self.stacks.iter().map(|s| s.len() + 1).sum::<usize>() + 1);
        for s in &self.stacks {
            k.extend_from_slice(s);
            k.push(u32::MAX);
        }
        k.push(self.done as u32);
        k
    }

    /// The tokens that may come next as a bitmask over a row of `n` logits: bit `i % 32`
    /// of word `i / 32` set when token `i` may (the form of
    /// [`crate::json_mode::JsonState::allowed`]). Special tokens never may; stop tokens
    /// once the text is a whole `root`.
    pub fn allowed(&self, vocab: &JsonVocab, n: usize) -> Vec<u32> {
        vocab
            .ebnf_masks()
            .get_or_walk((self.prog.id, self.key(), n), || self.walk(vocab, n))
    }

    /// [`EbnfState::allowed`], computed: the vocabulary's trie walked from this state.
    pub fn walk(&self, vocab: &JsonVocab, n: usize) -> Vec<u32> {
        let mut w = Walker::new(&self.prog);
        let tops = w.import(&self.stacks);
        let mut levels = StackLevels {
            at: vec![0, tops.len()],
            marks: vec![w.nodes.len()],
            buf: tops,
            next: Vec::new(),
            w,
        };
        crate::trie_walk::allowed(vocab, n, &mut levels, self.done)
    }
}

/// The stacks' tops after each byte of the token last run: level `d`'s at
/// `buf[at[d]..at[d + 1]]` (each level live: some stack, or the text complete), and
/// `marks[d]` the arena's length once it was made, so that going back up the trie drops
/// the nodes made below.
struct StackLevels<'a> {
    w: Walker<'a>,
    buf: Vec<u32>,
    at: Vec<usize>,
    marks: Vec<usize>,
    next: Vec<u32>,
}

impl crate::trie_walk::Levels for StackLevels<'_> {
    fn len(&self) -> usize {
        self.marks.len()
    }
    fn truncate(&mut self, len: usize) {
        self.marks.truncate(len);
        self.at.truncate(len + 1);
        self.buf.truncate(self.at[len]);
        self.w.nodes.truncate(self.marks[len - 1]);
    }
    fn push(&mut self, b: u8) -> bool {
        let d = self.marks.len() - 1;
        self.next.clear();
        let done = self
            .w
            .step(&self.buf[self.at[d]..self.at[d + 1]], b, &mut self.next);
        if self.next.is_empty() && !done {
            return false;
        }
        self.buf.extend_from_slice(&self.next);
        self.at.push(self.buf.len());
        self.marks.push(self.w.nodes.len());
        true
    }
}

/// The stacks as linked nodes in one arena: a node is a position in the program and the
/// node under it ([`NIL`] at the bottom).
struct Walker<'a> {
    prog: &'a Program,
    nodes: Vec<(u32, u32)>,
    /// [`Walker::expand`]'s worklist, kept for its allocation.
    work: Vec<(u32, u32)>,
}

impl<'a> Walker<'a> {
    fn new(prog: &'a Program) -> Self {
        Self {
            prog,
            nodes: Vec::new(),
            work: Vec::new(),
        }
    }

    fn node(&mut self, pos: u32, under: u32) -> u32 {
        self.nodes.push((pos, under));
        self.nodes.len() as u32 - 1
    }

    /// Goes on at `pos` with `under` beneath: pushes the tops this makes to `out` (a call
    /// expanded into its alternatives, an alternative's end popped), and sets `done` where
    /// `root` is complete. A worklist, not recursion: how deep a text nests is the
    /// client's. Past [`MAX_STEP_NODES`] nodes in the arena, what is left is dropped.
    fn expand(&mut self, pos: u32, under: u32, out: &mut Vec<u32>, done: &mut bool) {
        let mut work = std::mem::take(&mut self.work);
        work.push((pos, under));
        while let Some((mut pos, mut under)) = work.pop() {
            if self.nodes.len() >= MAX_STEP_NODES {
                work.clear();
                break;
            }
            loop {
                match self.prog.elems[pos as usize] {
                    Elem::End => {
                        if under == NIL {
                            *done = true;
                            break;
                        }
                        let (p, u) = self.nodes[under as usize];
                        if matches!(self.prog.elems[p as usize], Elem::Set(_)) {
                            out.push(under);
                            break;
                        }
                        (pos, under) = (p, u);
                    }
                    Elem::Set(_) => {
                        let n = self.node(pos, under);
                        out.push(n);
                        break;
                    }
                    Elem::Call(r) => {
                        // Where to go on after the rule; nothing to keep where its
                        // caller's alternative ends there (so right recursion does not
                        // grow stacks).
                        let after = if self.prog.elems[pos as usize + 1] == Elem::End {
                            under
                        } else {
                            self.node(pos + 1, under)
                        };
                        // Last first, so that the first alternative's tops come first.
                        for &a in self.prog.alts[r as usize].iter().rev() {
                            work.push((a, after));
                        }
                        break;
                    }
                }
            }
        }
        self.work = work;
    }

    /// The tops after byte `b` from `tops`, to `out`; whether `root` is then complete.
    fn step(&mut self, tops: &[u32], b: u8, out: &mut Vec<u32>) -> bool {
        let mut done = false;
        for &t in tops {
            let (pos, under) = self.nodes[t as usize];
            if let Elem::Set(k) = self.prog.elems[pos as usize] {
                if self.prog.holds(k, b) {
                    self.expand(pos + 1, under, out, &mut done);
                }
            }
        }
        self.dedup(out);
        done
    }

    /// Drops tops of `out` that are the same stack as another (the same node, or the same
    /// position over the same node), and those past [`MAX_STACKS`].
    fn dedup(&self, out: &mut Vec<u32>) {
        if out.len() > 1 {
            let nodes = &self.nodes;
            out.sort_unstable_by_key(|&t| nodes[t as usize]);
            out.dedup_by_key(|t| nodes[*t as usize]);
            out.truncate(MAX_STACKS);
        }
    }

    /// Nodes for `stacks` (each bottom first); their tops.
    fn import(&mut self, stacks: &[Vec<u32>]) -> Vec<u32> {
        stacks
            .iter()
            .map(|s| s.iter().fold(NIL, |under, &pos| self.node(pos, under)))
            .collect()
    }

    /// The stacks of `tops`, each bottom first, sorted.
    fn export(&self, tops: &[u32]) -> Vec<Vec<u32>> {
        let mut stacks: Vec<Vec<u32>> = tops
            .iter()
            .map(|&t| {
                let mut s = Vec::new();
                let mut n = t;
                while n != NIL {
                    let (pos, under) = self.nodes[n as usize];
                    s.push(pos);
                    n = under;
                }
                s.reverse();
                s
            })
            .collect();
        stacks.sort_unstable();
        stacks.dedup();
        stacks
    }
}
