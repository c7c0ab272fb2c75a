//! JSON mode and structured output (`response_format` `json_object` / `json_schema`): a
//! byte-level JSON recognizer that says which tokens may come next, so that sampling only
//! ever continues a document of the requested shape, and ends exactly when it is complete.
//!
//! The recognizer is a pushdown automaton over bytes (RFC 8259: objects, arrays, strings
//! with escapes, numbers, `true`/`false`/`null`) that walks a compiled schema
//! ([`crate::json_schema`]); JSON mode is the schema "any object". Where the schema offers
//! choices that the bytes so far do not settle (`anyOf`, keys of optional properties),
//! the state holds every reading still possible, and a byte is accepted if any reading
//! takes it. A token is allowed when every one of its bytes is accepted; a stop token
//! only once the document is complete. The document starts at once (no whitespace
//! before it), and runs of whitespace are capped, so that a model cannot idle in
//! whitespace. Bytes of 0x80 and above are taken as string content (the detokenizer sends
//! whole characters; a model that emits a broken sequence gets a replacement character
//! inside a string, which is still JSON).

use crate::json_schema::{Bounds, Node, NodeId, Schema, ANY_ARRAY, ANY_OBJECT, WORDS};
use regex_automata::util::primitives::StateID;
use std::sync::Arc;

/// Whitespace between tokens of structure is one space, or a newline and at most this
/// many spaces or tabs of indentation (llama.cpp's JSON grammars use the same shape): room
/// for pretty-printing, none for idling in whitespace.
pub const MAX_INDENT: u8 = 20;
/// The state of a run of whitespace: none yet, one space (the run is over), or a newline
/// then `k` indentation bytes (`WS_NEWLINE + k`).
const WS_NONE: u8 = 0;
const WS_SPACE: u8 = 1;
const WS_NEWLINE: u8 = 2;

/// The run of whitespace after `b`, from `ws`; `None` if `b` may not come.
fn whitespace(ws: u8, b: u8) -> Option<u8> {
    match (ws, b) {
        (WS_NONE, b' ') => Some(WS_SPACE),
        (WS_NONE, b'\n') => Some(WS_NEWLINE),
        (k, b' ' | b'\t') if k >= WS_NEWLINE && k - WS_NEWLINE < MAX_INDENT => Some(k + 1),
        _ => None,
    }
}

/// How many more whitespace bytes may follow `ws`.
fn whitespace_room(ws: u8) -> u8 {
    match ws {
        WS_NONE => 1 + MAX_INDENT,
        WS_SPACE => 0,
        k => MAX_INDENT.saturating_sub(k - WS_NEWLINE),
    }
}
/// The most readings kept at once (past it, the later ones are dropped: what is generated
/// is still valid, from fewer of the schema's alternatives).
const MAX_READINGS: usize = 64;
/// How deeply nested `anyOf`s are followed at one value's start.
const MAX_ALT_DEPTH: u8 = 16;
/// The longest number, in bytes, and the most digits of its exponent: every number
/// generated fits a double (a model cannot idle in digits either).
const MAX_NUMBER: u8 = 48;
const MAX_EXP_DIGITS: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// An object of this node; `next`: its first property neither written nor skipped.
    Object { node: NodeId, next: u32 },
    /// An array of this node, with `count` elements begun.
    Array { node: NodeId, count: u32 },
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
    /// This many exponent digits.
    ExpDigits(u8),
}

/// Fixed text being matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lit {
    /// The texts `lo..hi` of a literal node (sorted, so those that share a prefix are
    /// contiguous).
    Value { node: NodeId, lo: u32, hi: u32 },
    /// The key of property `prop` of the object node `node`.
    Key { node: NodeId, prop: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A value of `node` must start (`top`: the document's, with no whitespace before).
    Value { node: NodeId, top: bool },
    /// After `[`: a value or `]`.
    ArrayFirst,
    /// In an object: a key; `first`: right after `{`, where `}` may come too.
    Key { first: bool },
    /// After a key: `:`, then a value of `value`.
    Colon { value: NodeId },
    /// After a value inside a container: `,` or the container's end.
    After,
    /// Inside a free string (a key of a free object when `key`); `esc`: after a
    /// backslash; `hex`: \u digits left.
    Str { key: bool, esc: bool, hex: u8 },
    /// Inside a string held to a rule (the string node `node`): the rule's DFA in
    /// `state`, `chars` characters so far.
    Pat {
        node: NodeId,
        state: StateID,
        chars: u32,
    },
    /// A number of a node with bounds: its digits so far as `mant` (`digits` of them,
    /// the last `frac` after the point), negative when `neg`. Written without an
    /// exponent, in at most [`MAX_BOUNDED_DIGITS`] digits, and only as long as some
    /// ending stays within the bounds.
    BNum {
        node: NodeId,
        n: Num,
        neg: bool,
        digits: u8,
        frac: u8,
        mant: i64,
    },
    /// A number of `len` bytes so far (`int`: an integer).
    Num { int: bool, n: Num, len: u8 },
    /// The first `at` bytes of a fixed text are matched.
    Lit { lit: Lit, at: u32 },
    /// The document is complete.
    Done,
}

/// One way of reading the bytes so far.
#[derive(Debug, Clone, PartialEq)]
struct Reading {
    stack: Vec<Frame>,
    mode: Mode,
    whitespace: u8,
}

/// Where a JSON document being generated stands.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonState {
    schema: Arc<Schema>,
    readings: Vec<Reading>,
}

impl Default for JsonState {
    fn default() -> Self {
        Self::new()
    }
}

/// A reading as seen while trying a token: the containers of reading `base`, less those
/// a token closed, plus those it opened (so that trying a token copies no stack).
#[derive(Debug, Clone, PartialEq)]
struct Work {
    base: usize,
    popped: usize,
    pushed: Vec<Frame>,
    mode: Mode,
    ws: u8,
}

/// The readings of a try in progress, kept between tries.
#[derive(Default)]
struct Scratch {
    cur: Vec<Work>,
    next: Vec<Work>,
}

/// What a byte is tried against: the schema and the state's readings.
struct Cx<'a> {
    schema: &'a Schema,
    readings: &'a [Reading],
}

impl Work {
    fn top(&self, cx: &Cx) -> Option<Frame> {
        match self.pushed.last() {
            Some(&f) => Some(f),
            None => {
                let base = &cx.readings[self.base].stack;
                base.len().checked_sub(self.popped + 1).map(|i| base[i])
            }
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
    fn replace_top(&mut self, f: Frame) {
        self.pop();
        self.push(f);
    }
    fn is_empty(&self, cx: &Cx) -> bool {
        self.pushed.is_empty() && self.popped >= cx.readings[self.base].stack.len()
    }
    /// The mode after a complete value, given the containers left.
    fn after_value(&self, cx: &Cx) -> Mode {
        if self.is_empty(cx) {
            Mode::Done
        } else {
            Mode::After
        }
    }
}

mod walk;
use walk::*;

impl JsonState {
    /// JSON mode: a JSON object must follow.
    pub fn new() -> Self {
        // One schema for every JSON-mode sequence.
        static ANY_OBJECT: std::sync::OnceLock<Arc<Schema>> = std::sync::OnceLock::new();
        Self::with_schema(
            ANY_OBJECT
                .get_or_init(|| Arc::new(Schema::any_object()))
                .clone(),
        )
    }

    /// Structured output: a document of this schema must follow.
    pub fn with_schema(schema: Arc<Schema>) -> Self {
        let root = schema.root();
        Self {
            schema,
            readings: vec![Reading {
                stack: Vec::new(),
                mode: Mode::Value {
                    node: root,
                    top: true,
                },
                whitespace: 0,
            }],
        }
    }

    /// Whether the document may end here (a stop token may follow).
    pub fn done(&self) -> bool {
        let cx = self.cx();
        self.readings.iter().any(|r| match r.mode {
            Mode::Done => true,
            Mode::Num { n, .. } => r.stack.is_empty() && complete(n),
            Mode::BNum {
                node,
                n,
                neg,
                frac,
                mant,
                ..
            } => {
                r.stack.is_empty()
                    && complete(n)
                    && !(neg && n == Num::Zero)
                    && bounds_of(&cx, node).is_some_and(|(b, _)| b.holds(value(neg, frac, mant)))
            }
            Mode::Lit {
                lit: Lit::Value { node, lo, .. },
                at,
            } => r.stack.is_empty() && texts(&cx, node)[lo as usize].len() == at as usize,
            _ => false,
        })
    }

    fn cx(&self) -> Cx<'_> {
        Cx {
            schema: &self.schema,
            readings: &self.readings,
        }
    }

    /// The readings after `bytes`, into `sc.cur`; false (and none) if they cannot come
    /// next. The scratch's vectors are reused from one try to the next.
    fn run(&self, bytes: &[u8], sc: &mut Scratch) -> bool {
        let cx = self.cx();
        sc.cur.clear();
        sc.cur
            .extend(self.readings.iter().enumerate().map(|(base, r)| Work {
                base,
                popped: 0,
                pushed: Vec::new(),
                mode: r.mode,
                ws: r.whitespace,
            }));
        for &b in bytes {
            sc.next.clear();
            for w in sc.cur.drain(..) {
                step(&cx, w, b, &mut sc.next);
            }
            std::mem::swap(&mut sc.cur, &mut sc.next);
            if sc.cur.is_empty() {
                return false;
            }
        }
        true
    }

    /// Whether `bytes` (a token's) may come next.
    pub fn allows(&self, bytes: &[u8]) -> bool {
        self.allows_in(bytes, &mut Scratch::default())
    }

    fn allows_in(&self, bytes: &[u8], sc: &mut Scratch) -> bool {
        !bytes.is_empty() && self.run(bytes, sc)
    }

    /// Takes `bytes` (which [`JsonState::allows`]); returns false, changing nothing, if
    /// they may not come next.
    pub fn advance(&mut self, bytes: &[u8]) -> bool {
        let mut sc = Scratch::default();
        if !self.run(bytes, &mut sc) {
            return false;
        }
        let mut readings: Vec<Reading> = Vec::with_capacity(sc.cur.len());
        for w in sc.cur {
            let base = &self.readings[w.base].stack;
            let mut stack = base[..base.len() - w.popped].to_vec();
            stack.extend(w.pushed);
            let r = Reading {
                stack,
                mode: w.mode,
                whitespace: w.ws,
            };
            if !readings.contains(&r) {
                readings.push(r);
            }
        }
        self.readings = readings;
        true
    }
}

mod mask;
pub use mask::JsonVocab;

#[cfg(test)]
mod tests;
