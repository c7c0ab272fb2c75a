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

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The most digits of a bounded number.
const MAX_BOUNDED_DIGITS: u8 = 18;

/// A bounded number node's bounds, and whether it is an integer.
fn bounds_of(cx: &Cx, node: NodeId) -> Option<(Bounds, bool)> {
    match cx.schema.node(node) {
        Node::Number(Some(b)) => Some((*b, false)),
        Node::Integer(Some(b)) => Some((*b, true)),
        _ => None,
    }
}

/// A bounded number's value so far.
fn value(neg: bool, frac: u8, mant: i64) -> f64 {
    let v = mant as f64 / 10f64.powi(frac as i32);
    if neg {
        -v
    } else {
        v
    }
}

/// Whether a bounded number written so far (`mode`, a [`Mode::BNum`]) can still end
/// within its bounds: the values its continuations reach, as intervals of magnitude,
/// against the bounds.
fn reachable(cx: &Cx, mode: Mode) -> bool {
    let Mode::BNum {
        node,
        n,
        neg,
        digits,
        frac,
        mant,
    } = mode
    else {
        return false;
    };
    let Some((b, int)) = bounds_of(cx, node) else {
        return false;
    };
    // A closed interval of magnitudes, signed.
    let meets = |lo: f64, hi: f64| {
        let (x, y) = if neg { (-hi, -lo) } else { (lo, hi) };
        b.meets(x, y, int)
    };
    let m = mant as f64;
    match n {
        Num::Minus => meets(0.0, f64::INFINITY),
        Num::Zero if int => meets(0.0, 0.0),
        Num::Zero => meets(0.0, 1.0),
        // More integer digits (k of them), then for a number any fraction.
        Num::Int => (0..=(MAX_BOUNDED_DIGITS - digits) as i32).any(|k| {
            let p = 10f64.powi(k);
            meets(
                m * p,
                if int {
                    (m + 1.0) * p - 1.0
                } else {
                    (m + 1.0) * p
                },
            )
        }),
        Num::Dot | Num::Frac => {
            let p = 10f64.powi(frac as i32);
            meets(m / p, (m + 1.0) / p)
        }
        _ => false,
    }
}

/// Whether a number may end in this state.
fn complete(n: Num) -> bool {
    matches!(n, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits(_))
}

fn emit(out: &mut Vec<Work>, w: Work) {
    if out.len() < MAX_READINGS && !out.contains(&w) {
        out.push(w);
    }
}

/// The texts of a literal node.
fn texts<'a>(cx: &Cx<'a>, node: NodeId) -> &'a [Vec<u8>] {
    match cx.schema.node(node) {
        Node::Literal(t) => t,
        _ => &[],
    }
}

/// The properties of an object node.
fn props<'a>(cx: &Cx<'a>, node: NodeId) -> &'a [crate::json_schema::Prop] {
    match cx.schema.node(node) {
        Node::Object { props, .. } => props,
        _ => &[],
    }
}

/// The node of element `i` (from 0) of an array of `node`; `None` past its `max`.
fn element(cx: &Cx, node: NodeId, i: u32) -> Option<NodeId> {
    match cx.schema.node(node) {
        Node::Array {
            prefix, items, max, ..
        } if i < *max => Some(prefix.get(i as usize).copied().unwrap_or(*items)),
        _ => None,
    }
}

/// Whether an object of `node` may close with property `next` and those after it unwritten.
fn closable(cx: &Cx, node: NodeId, next: u32) -> bool {
    props(cx, node)
        .get(next as usize..)
        .is_none_or(|rest| rest.iter().all(|p| !p.required))
}

/// Texts `lo..hi` narrowed to those whose byte `at` is `b`.
fn narrow(t: &[Vec<u8>], lo: u32, hi: u32, at: u32, b: u8) -> Option<(u32, u32)> {
    let at = at as usize;
    let range = &t[lo as usize..hi as usize];
    let first = range.iter().position(|x| x.get(at) == Some(&b))?;
    let n = range[first..]
        .iter()
        .take_while(|x| x.get(at) == Some(&b))
        .count();
    Some((lo + first as u32, lo + (first + n) as u32))
}

/// A literal's texts `lo..hi` matched up to `at`: complete at once when none is longer
/// (a number text waits for the byte after it, which may continue a longer one).
fn literal(cx: &Cx, w: &Work, node: NodeId, lo: u32, hi: u32, at: u32) -> Mode {
    let t = texts(cx, node);
    if t[lo as usize..hi as usize]
        .iter()
        .all(|x| x.len() == at as usize)
    {
        w.after_value(cx)
    } else {
        Mode::Lit {
            lit: Lit::Value { node, lo, hi },
            at,
        }
    }
}

/// A value of `node` starts with `b`.
fn start(cx: &Cx, mut w: Work, node: NodeId, b: u8, depth: u8, out: &mut Vec<Work>) {
    let number = |int: bool| {
        match b {
            b'-' => Some(Num::Minus),
            b'0' => Some(Num::Zero),
            b'1'..=b'9' => Some(Num::Int),
            _ => None,
        }
        .map(|n| Mode::Num { int, n, len: 1 })
    };
    let mode = match cx.schema.node(node) {
        Node::Any => {
            let specific = match b {
                b'{' => ANY_OBJECT,
                b'[' => ANY_ARRAY,
                b't' | b'f' | b'n' => WORDS,
                b'"' => {
                    w.mode = Mode::Str {
                        key: false,
                        esc: false,
                        hex: 0,
                    };
                    return emit(out, w);
                }
                _ => {
                    if let Some(m) = number(false) {
                        w.mode = m;
                        emit(out, w);
                    }
                    return;
                }
            };
            return start(cx, w, specific, b, depth, out);
        }
        Node::Object { .. } => (b == b'{').then(|| {
            w.push(Frame::Object { node, next: 0 });
            Mode::Key { first: true }
        }),
        Node::Array { .. } => (b == b'[').then(|| {
            w.push(Frame::Array { node, count: 0 });
            Mode::ArrayFirst
        }),
        Node::String(None) => (b == b'"').then_some(Mode::Str {
            key: false,
            esc: false,
            hex: 0,
        }),
        Node::String(Some(rule)) => (b == b'"').then_some(Mode::Pat {
            node,
            state: rule.dfa.as_ref().map_or(StateID::ZERO, |d| d.start),
            chars: 0,
        }),
        Node::Number(None) => number(false),
        Node::Integer(None) => number(true),
        Node::Number(Some(_)) | Node::Integer(Some(_)) => {
            let (n, neg, digits, mant) = match b {
                b'-' => (Num::Minus, true, 0, 0),
                b'0' => (Num::Zero, false, 1, 0),
                b'1'..=b'9' => (Num::Int, false, 1, (b - b'0') as i64),
                _ => return,
            };
            let mode = Mode::BNum {
                node,
                n,
                neg,
                digits,
                frac: 0,
                mant,
            };
            reachable(cx, mode).then_some(mode)
        }
        Node::Literal(t) => {
            narrow(t, 0, t.len() as u32, 0, b).map(|(lo, hi)| literal(cx, &w, node, lo, hi, 1))
        }
        Node::AnyOf(alts) => {
            if depth < MAX_ALT_DEPTH {
                for &a in alts {
                    start(cx, w.clone(), a, b, depth + 1, out);
                }
            }
            return;
        }
    };
    if let Some(m) = mode {
        w.mode = m;
        emit(out, w);
    }
}

/// One byte from reading `w`: the readings it leads to, into `out`.
fn step(cx: &Cx, mut w: Work, b: u8, out: &mut Vec<Work>) {
    let space_ok = match w.mode {
        Mode::Value { top, .. } => !top,
        Mode::ArrayFirst | Mode::Key { .. } | Mode::Colon { .. } | Mode::After => true,
        _ => false,
    };
    if space_ok && is_ws(b) {
        if let Some(ws) = whitespace(w.ws, b) {
            w.ws = ws;
            emit(out, w);
        }
        return;
    }
    if let Mode::BNum {
        node,
        n,
        neg,
        digits,
        frac,
        mant,
    } = w.mode
    {
        let Some((bounds, int)) = bounds_of(cx, node) else {
            return;
        };
        let d = b.is_ascii_digit().then(|| (b - b'0') as i64);
        let room = digits < MAX_BOUNDED_DIGITS;
        let next = match (n, d) {
            // `-0` only begins `-0.…` (alone, parsers read a float −0.0).
            (Num::Minus, Some(0)) if !int => Some((Num::Zero, 1, 0, 0)),
            (Num::Minus, Some(d)) if d > 0 => Some((Num::Int, 1, 0, d)),
            (Num::Int, Some(d)) if room => Some((Num::Int, digits + 1, 0, mant * 10 + d)),
            (Num::Zero | Num::Int, None) if b == b'.' && !int && room => {
                Some((Num::Dot, digits, 0, mant))
            }
            (Num::Dot | Num::Frac, Some(d)) if room => {
                Some((Num::Frac, digits + 1, frac + 1, mant * 10 + d))
            }
            _ => None,
        };
        if let Some((n, digits, frac, mant)) = next {
            let mode = Mode::BNum {
                node,
                n,
                neg,
                digits,
                frac,
                mant,
            };
            if reachable(cx, mode) {
                w.ws = 0;
                w.mode = mode;
                emit(out, w);
            }
            return;
        }
        if complete(n) && !(neg && n == Num::Zero) && bounds.holds(value(neg, frac, mant)) {
            w.mode = w.after_value(cx);
            step(cx, w, b, out);
        }
        return;
    }
    // A number (or a literal that may be a number) ends at the first byte that cannot
    // continue it; that byte then counts in the mode after it.
    match w.mode {
        Mode::Num { int, n, len } => {
            let next = match (n, b) {
                _ if len >= MAX_NUMBER => None,
                // A part that needs a digit after it needs room for one.
                (Num::Zero | Num::Int | Num::Frac, b'.' | b'e' | b'E')
                | (Num::Exp, b'+' | b'-')
                    if len + 1 >= MAX_NUMBER =>
                {
                    None
                }
                (Num::Minus, b'0') => Some(Num::Zero),
                (Num::Minus, b'1'..=b'9') => Some(Num::Int),
                (Num::Int, b'0'..=b'9') => Some(Num::Int),
                (Num::Zero | Num::Int, b'.') if !int => Some(Num::Dot),
                (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
                (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') if !int => Some(Num::Exp),
                (Num::Exp, b'+' | b'-') => Some(Num::ExpSign),
                (Num::Exp | Num::ExpSign, b'0'..=b'9') => Some(Num::ExpDigits(1)),
                (Num::ExpDigits(k), b'0'..=b'9') if k < MAX_EXP_DIGITS => {
                    Some(Num::ExpDigits(k + 1))
                }
                _ => None,
            };
            if let Some(n) = next {
                w.ws = 0;
                w.mode = Mode::Num {
                    int,
                    n,
                    len: len + 1,
                };
                return emit(out, w);
            }
            if !complete(n) {
                return;
            }
            w.mode = w.after_value(cx);
            return step(cx, w, b, out);
        }
        Mode::Lit {
            lit: Lit::Value { node, lo, hi },
            at,
        } => {
            let t = texts(cx, node);
            if let Some((lo, hi)) = narrow(t, lo, hi, at, b) {
                w.ws = 0;
                w.mode = literal(cx, &w, node, lo, hi, at + 1);
                return emit(out, w);
            }
            if t[lo as usize].len() != at as usize {
                return;
            }
            w.mode = w.after_value(cx);
            return step(cx, w, b, out);
        }
        _ => {}
    }
    w.ws = 0;
    let close = |mut w: Work, b: u8, out: &mut Vec<Work>| {
        let ok = match (b, w.top(cx)) {
            (b'}', Some(Frame::Object { node, next })) => closable(cx, node, next),
            (b']', Some(Frame::Array { node, count })) => match cx.schema.node(node) {
                Node::Array { min, .. } => count >= *min,
                _ => false,
            },
            _ => false,
        };
        if ok {
            w.pop();
            w.mode = w.after_value(cx);
            emit(out, w);
        }
    };
    match w.mode {
        Mode::Value { node, .. } => start(cx, w, node, b, 0, out),
        Mode::ArrayFirst => {
            let Some(Frame::Array { node, .. }) = w.top(cx) else {
                return;
            };
            if b == b']' {
                close(w, b, out);
            } else if let Some(element) = element(cx, node, 0) {
                w.replace_top(Frame::Array { node, count: 1 });
                start(cx, w, element, b, 0, out);
            }
        }
        Mode::Key { first } => {
            let Some(Frame::Object { node, next }) = w.top(cx) else {
                return;
            };
            match b {
                b'"' => match cx.schema.node(node) {
                    // A free object's key (an object with neither properties nor
                    // `values` takes none: the arm below then offers nothing).
                    Node::Object {
                        props,
                        values: Some(_),
                    } if props.is_empty() => {
                        w.mode = Mode::Str {
                            key: true,
                            esc: false,
                            hex: 0,
                        };
                        emit(out, w);
                    }
                    Node::Object { props, .. } => {
                        // The next property, or an optional one after it: up to the first
                        // required one.
                        for (j, p) in props.iter().enumerate().skip(next as usize) {
                            let mut f = w.clone();
                            f.replace_top(Frame::Object {
                                node,
                                next: j as u32 + 1,
                            });
                            f.mode = Mode::Lit {
                                lit: Lit::Key {
                                    node,
                                    prop: j as u32,
                                },
                                at: 1,
                            };
                            emit(out, f);
                            if p.required {
                                break;
                            }
                        }
                    }
                    _ => {}
                },
                b'}' if first => close(w, b, out),
                _ => {}
            }
        }
        Mode::Pat { node, state, chars } => {
            let Node::String(Some(rule)) = cx.schema.node(node) else {
                return;
            };
            match b {
                b'"' => {
                    if chars >= rule.min && rule.dfa.as_ref().is_none_or(|d| d.accepts(state)) {
                        w.mode = w.after_value(cx);
                        emit(out, w);
                    }
                }
                // Written without escapes (so that the bytes are the value's).
                b'\\' | 0x00..=0x1f => {}
                _ => {
                    // A character starts at every byte that is not a continuation byte.
                    let chars = chars + u32::from(!(0x80..0xc0).contains(&b));
                    if chars > rule.max {
                        return;
                    }
                    let state = match &rule.dfa {
                        Some(d) => match d.next(state, b) {
                            // Room left for the shortest way to a match.
                            Some(s) if d.chars_to_match(s).saturating_add(chars) <= rule.max => s,
                            _ => return,
                        },
                        None => state,
                    };
                    w.mode = Mode::Pat { node, state, chars };
                    emit(out, w);
                }
            }
        }
        Mode::Colon { value } => {
            if b == b':' {
                w.mode = Mode::Value {
                    node: value,
                    top: false,
                };
                emit(out, w);
            }
        }
        Mode::After => match (b, w.top(cx)) {
            (b',', Some(Frame::Object { node, next })) => {
                let free = props(cx, node).is_empty();
                if free || (next as usize) < props(cx, node).len() {
                    w.mode = Mode::Key { first: false };
                    emit(out, w);
                }
            }
            (b',', Some(Frame::Array { node, count })) => {
                if let Some(element) = element(cx, node, count) {
                    w.replace_top(Frame::Array {
                        node,
                        count: count + 1,
                    });
                    w.mode = Mode::Value {
                        node: element,
                        top: false,
                    };
                    emit(out, w);
                }
            }
            _ => close(w, b, out),
        },
        Mode::Str { key, esc, hex } => {
            let next = if hex > 0 {
                b.is_ascii_hexdigit().then_some(Mode::Str {
                    key,
                    esc: false,
                    hex: hex - 1,
                })
            } else if esc {
                match b {
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
                }
            } else {
                match b {
                    b'"' if key => match w.top(cx).map(|f| match f {
                        Frame::Object { node, .. } | Frame::Array { node, .. } => {
                            cx.schema.node(node)
                        }
                    }) {
                        Some(Node::Object {
                            values: Some(v), ..
                        }) => Some(Mode::Colon { value: *v }),
                        _ => None,
                    },
                    b'"' => Some(w.after_value(cx)),
                    b'\\' => Some(Mode::Str {
                        key,
                        esc: true,
                        hex: 0,
                    }),
                    0x00..=0x1f => None,
                    _ => Some(w.mode),
                }
            };
            if let Some(m) = next {
                w.mode = m;
                emit(out, w);
            }
        }
        Mode::Lit {
            lit: Lit::Key { node, prop },
            at,
        } => {
            let Some(p) = props(cx, node).get(prop as usize) else {
                return;
            };
            if p.key.get(at as usize) == Some(&b) {
                w.mode = if at as usize + 1 == p.key.len() {
                    Mode::Colon { value: p.value }
                } else {
                    Mode::Lit {
                        lit: Lit::Key { node, prop },
                        at: at + 1,
                    }
                };
                emit(out, w);
            }
        }
        Mode::Num { .. } | Mode::BNum { .. } | Mode::Lit { .. } => unreachable!("handled above"),
        Mode::Done => {}
    }
}

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
