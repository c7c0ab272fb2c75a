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

use crate::json_schema::{Node, NodeId, Schema, ANY_ARRAY, ANY_OBJECT, WORDS};
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
        Node::String => (b == b'"').then_some(Mode::Str {
            key: false,
            esc: false,
            hex: 0,
        }),
        Node::Number => number(false),
        Node::Integer => number(true),
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
    // A number (or a literal that may be a number) ends at the first byte that cannot
    // continue it; that byte then counts in the mode after it.
    match w.mode {
        Mode::Num { int, n, len } => {
            let next = match (n, b) {
                _ if len >= MAX_NUMBER => None,
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
            let Node::Array { items, max, .. } = *cx.schema.node(node) else {
                return;
            };
            if b == b']' {
                close(w, b, out);
            } else if max > 0 {
                w.replace_top(Frame::Array { node, count: 1 });
                start(cx, w, items, b, 0, out);
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
                let Node::Array { items, max, .. } = *cx.schema.node(node) else {
                    return;
                };
                if count < max {
                    w.replace_top(Frame::Array {
                        node,
                        count: count + 1,
                    });
                    w.mode = Mode::Value {
                        node: items,
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
        Mode::Num { .. } | Mode::Lit { .. } => unreachable!("handled above"),
        Mode::Done => {}
    }
}

impl JsonState {
    /// JSON mode: a JSON object must follow.
    pub fn new() -> Self {
        Self::with_schema(Arc::new(Schema::any_object()))
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

    /// [`JsonState::allows_in`] out of line, so that the mask's scan of the vocabulary
    /// stays a tight loop.
    #[inline(never)]
    fn tries(&self, bytes: &[u8], sc: &mut Scratch) -> bool {
        self.allows_in(bytes, sc)
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

    /// Sets every logit of a token that may not come next to −∞: tokens whose bytes do not
    /// continue the document, special tokens, and stop tokens until the document may end.
    ///
    /// Two shortcuts keep a row of 49,152 tokens to a fraction of a millisecond: a token
    /// whose first byte cannot come next is refused without trying the rest (the 256
    /// first bytes are tried once per call), and inside a free string a token with no
    /// quote, backslash or control byte is taken whole.
    pub fn mask(&self, logits: &mut [f32], vocab: &JsonVocab) {
        let done = self.done();
        let mut sc = Scratch::default();
        // The gate: which first bytes may come next, then whether stop tokens may, then
        // the never-allowed.
        let mut first = [false; 258];
        for (b, ok) in first.iter_mut().take(256).enumerate() {
            *ok = self.run(&[b as u8], &mut sc);
        }
        first[GATE_STOP as usize] = done;
        let in_string = self.readings.iter().all(|r| {
            matches!(
                r.mode,
                Mode::Str {
                    esc: false,
                    hex: 0,
                    ..
                }
            )
        });
        // Where whitespace leaves every reading's mode as it is (between tokens of
        // structure, or inside a string), a token's first byte after its leading
        // whitespace is checked by the same table.
        let ws_keeps_mode = self.readings.iter().all(|r| match r.mode {
            Mode::Value { top, .. } => !top,
            Mode::ArrayFirst
            | Mode::Key { .. }
            | Mode::Colon { .. }
            | Mode::After
            | Mode::Str {
                esc: false, hex: 0, ..
            } => true,
            _ => false,
        });
        let ws_room = self
            .readings
            .iter()
            .map(|r| match r.mode {
                Mode::Str { .. } => u8::MAX,
                _ => whitespace_room(r.whitespace),
            })
            .max()
            .unwrap_or(0);
        for (id, l) in logits.iter_mut().enumerate() {
            let gate = vocab.gate.get(id).copied().unwrap_or(GATE_NEVER);
            if !first[(gate & GATE_INDEX) as usize] {
                *l = f32::NEG_INFINITY;
                continue;
            }
            if gate & GATE_INDEX >= GATE_STOP || (in_string && gate & GATE_PLAIN != 0) {
                continue; // a stop token once the document may end, or plain string text
            }
            let lead_ws = (gate >> GATE_LEAD_WS) as u8;
            let quick_no = ws_keeps_mode
                && lead_ws > 0
                && (lead_ws > ws_room
                    || (gate & GATE_HAS_AFTER != 0
                        && !first[((gate >> GATE_AFTER) & 0xff) as usize]));
            let ok = !(quick_no || in_string && gate & GATE_CONTROL != 0)
                && self.tries(&vocab.bytes[id], &mut sc);
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
    /// counted) and the byte after them; whether its first byte that is not plain is a
    /// control byte (refused inside a string before anything could end it).
    Text {
        first: u8,
        plain: bool,
        control: bool,
        lead_ws: u8,
        after_ws: Option<u8>,
    },
}

/// A vocabulary as JSON mode sees it, built once per model.
pub struct JsonVocab {
    bytes: Vec<Vec<u8>>,
    /// Per token, its entry in the mask's gate table: a text token's first byte, or
    /// [`GATE_STOP`], or [`GATE_NEVER`] (a dense array, so that the scan over the
    /// vocabulary is one table lookup per token).
    gate: Vec<u32>,
}

const GATE_STOP: u32 = 256;
const GATE_NEVER: u32 = 257;
/// The gate's table index (bits 0–8); flags for a plain token and for a control byte
/// first among its other bytes (see [`Kind::Text`]), and for a byte after its leading
/// whitespace; that byte (bits 16–23) and the leading whitespace (bits 24–31).
const GATE_INDEX: u32 = 0x1ff;
const GATE_PLAIN: u32 = 1 << 9;
const GATE_CONTROL: u32 = 1 << 10;
const GATE_HAS_AFTER: u32 = 1 << 11;
const GATE_AFTER: u32 = 16;
const GATE_LEAD_WS: u32 = 24;

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
        let kind: Vec<Kind> = bytes
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
                        control: b
                            .iter()
                            .find(|&&c| c < 0x20 || c == b'"' || c == b'\\')
                            .is_some_and(|&c| c < 0x20),
                        lead_ws: lead.min(255) as u8,
                        after_ws: b.get(lead).copied(),
                    }
                }
            })
            .collect();
        let gate = kind
            .iter()
            .map(|&k| match k {
                Kind::Stop => GATE_STOP,
                Kind::Never => GATE_NEVER,
                Kind::Text {
                    first,
                    plain,
                    control,
                    lead_ws,
                    after_ws,
                } => {
                    first as u32
                        | if plain { GATE_PLAIN } else { 0 }
                        | if control { GATE_CONTROL } else { 0 }
                        | after_ws.map_or(0, |c| GATE_HAS_AFTER | (c as u32) << GATE_AFTER)
                        | (lead_ws as u32) << GATE_LEAD_WS
                }
            })
            .collect();
        Self { bytes, gate }
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
            ("{\"a\":1e123}", 9),
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
    fn whitespace_is_a_space_or_a_newline_and_indentation() {
        let mut st = JsonState::new();
        assert!(!st.allows(b" "), "the object starts at once");
        assert!(st.advance(b"{"));
        assert!(st.allows(b" ") && !st.allows(b"  ") && !st.allows(b" \n"));
        assert!(!st.allows(b"\t") && !st.allows(b"\r") && !st.allows(b"\n\n"));
        let indent = format!("\n{}", " \t".repeat(MAX_INDENT as usize / 2));
        assert!(st.advance(indent.as_bytes()));
        assert!(!st.allows(b" ") && !st.allows(b"\t"));
        assert!(st.advance(b"\"k\""));
        assert!(st.allows(b" "), "a run ends at the next other byte");
        assert!(st.allows(b"\n    :"));
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
        let mut states = Vec::new();
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
            states.push((prefix, st));
        }
        for prefix in [
            "",
            "{\"name\": \"x",
            "{\"name\": \"x\",",
            "{\"name\": \"x\", \"kind\": 1",
            "{\"name\": \"x\", \"kind\": \"c",
            "{\"name\": \"x\", \"kind\": null, \"tags\": [\"a\"], ",
            "{\"name\": \"x\", \"kind\": null, \"tags\": [\"a\"], \"sc",
            "{\"name\": \"x\", \"kind\": null, \"tags\": [\"a\"], \"extra\": {\"k",
        ] {
            let mut st = schema(person());
            assert!(st.advance(prefix.as_bytes()), "{prefix}");
            states.push((prefix, st));
        }
        for (prefix, st) in states {
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

    fn schema(v: serde_json::Value) -> JsonState {
        JsonState::with_schema(Arc::new(Schema::compile(&v).unwrap()))
    }

    /// Feeds `s` to a state byte by byte; returns how many bytes were taken.
    fn feed_into(mut st: JsonState, s: &str) -> (JsonState, usize) {
        for (i, b) in s.bytes().enumerate() {
            if !st.advance(&[b]) {
                return (st, i);
            }
        }
        (st, s.len())
    }

    fn person() -> serde_json::Value {
        serde_json::json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "kind": {"enum": ["cat", "dog", 12, 1, null]},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
                "owner": {"anyOf": [{"$ref": "#/$defs/P"}, {"type": "null"}]},
                "score": {"type": ["number", "boolean"]},
                "extra": {"type": "object", "additionalProperties": {"type": "integer"}}
            },
            "required": ["name", "kind", "tags"],
            "additionalProperties": false,
            "$defs": {"P": {"type": "object", "properties": {
                "id": {"type": "integer"}, "p": {"$ref": "#/$defs/P"}}, "required": ["id"]}}
        })
    }

    /// The schema above, checked by hand (independently of the recognizer).
    fn is_person(v: &serde_json::Value) -> Result<(), String> {
        use serde_json::Value as V;
        // An integer of any size (past i64, serde_json reads it as a float).
        fn int(v: &V) -> bool {
            v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        fn is_p(v: &V) -> bool {
            let Some(o) = v.as_object() else { return false };
            let keys: Vec<&str> = o.keys().map(|k| k.as_str()).collect();
            matches!(keys.as_slice(), ["id"] | ["id", "p"])
                && int(&o["id"])
                && o.get("p").is_none_or(is_p)
        }
        let o = v.as_object().ok_or("not an object")?;
        let order = ["name", "age", "kind", "tags", "owner", "score", "extra"];
        let mut last = None;
        for k in o.keys() {
            let i = order
                .iter()
                .position(|o| o == k)
                .ok_or(format!("key {k}"))?;
            if last.is_some_and(|l| l >= i) {
                return Err(format!("order at {k}"));
            }
            last = Some(i);
        }
        let ok = o["name"].is_string()
            && o.get("age").is_none_or(int)
            && [
                V::from("cat"),
                V::from("dog"),
                V::from(12),
                V::from(1),
                V::Null,
            ]
            .contains(&o["kind"])
            && o["tags"]
                .as_array()
                .is_some_and(|t| (1..=3).contains(&t.len()) && t.iter().all(|x| x.is_string()))
            && o.get("owner").is_none_or(|w| w.is_null() || is_p(w))
            && o.get("score")
                .is_none_or(|s| s.is_number() || s.is_boolean())
            && o.get("extra")
                .is_none_or(|e| e.as_object().is_some_and(|e| e.values().all(int)));
        ok.then_some(()).ok_or_else(|| format!("values of {v}"))
    }

    #[test]
    fn schema_documents_are_accepted_and_others_refused_where_they_go_wrong() {
        for doc in [
            r#"{"name":"a","kind":"cat","tags":["x"]}"#,
            r#"{ "name" : "b\"q", "age": -3, "kind": 12, "tags": ["x", "y", "z"], "owner": {"id": 1, "p": {"id": 2}}, "score": 1.5e3, "extra": {"k": 4, "": 0} }"#,
            r#"{"name":"c","kind":null,"tags":["t"],"owner":null,"score":true}"#,
            r#"{"name":"c","kind":1,"tags":["t"]}"#,
        ] {
            let (st, n) = feed_into(schema(person()), doc);
            assert_eq!(n, doc.len(), "{doc}: stopped at byte {n}");
            assert!(st.done(), "{doc}");
            is_person(&serde_json::from_str(doc).unwrap()).unwrap();
        }
        for (doc, at) in [
            (r#"{"kind":"cat"}"#, 2),                       // `name` is required first
            (r#"{"name":"a","kind":"cow"}"#, 21),           // not in the enum
            (r#"{"name":"a","age":1.5}"#, 19),              // an integer
            (r#"{"name":"a","kind":"cat","tags":[]}"#, 33), // minItems 1
            (r#"{"name":"a","kind":"cat","tags":["a","b","c","d"]}"#, 44), // maxItems 3
            (r#"{"name":"a","kind":"cat"}"#, 24),           // `tags` is required
            (r#"{"name":"a","kind":"cat","tags":["x"],"age":3}"#, 39), // order
            (r#"{"name":"a","kind":"cat","tags":["x"],"owner":{"p":"#, 48), // `id` first
            (
                r#"{"name":"a","kind":"cat","tags":["x"],"extra":{"k":"v"}}"#,
                51,
            ),
            (r#"{"name":"a","kind":123"#, 21), // 12 and then a digit
            (r#"{"name":"a","kind":"cat","tags":["x"],"other":1}"#, 40), // "o" may begin "owner"
        ] {
            let (st, n) = feed_into(schema(person()), doc);
            assert_eq!(n, at, "{doc}: {st:?}");
        }
    }

    #[test]
    fn roots_other_than_objects_end_where_their_value_may_end() {
        let (st, n) = feed_into(schema(serde_json::json!({"type": "integer"})), "-12");
        assert_eq!(n, 3);
        assert!(st.done() && st.allows(b"3") && !st.allows(b".") && !st.allows(b" "));
        let (st, _) = feed_into(schema(serde_json::json!({"type": "integer"})), "-");
        assert!(!st.done());
        let lit = || schema(serde_json::json!({"enum": [1, 12, "a"]}));
        let (st, _) = feed_into(lit(), "1");
        assert!(st.done() && st.allows(b"2") && !st.allows(b"3"));
        let (st, _) = feed_into(lit(), "12");
        assert!(st.done() && !st.allows(b"2"));
        let (st, _) = feed_into(lit(), "\"a");
        assert!(!st.done());
        let (st, _) = feed_into(lit(), "\"a\"");
        assert!(st.done());
        let (st, n) = feed_into(
            schema(serde_json::json!({"type": ["array", "null"], "items": {"type": "boolean"}})),
            "[true,false]",
        );
        assert_eq!(n, 12);
        assert!(st.done());
        assert!(
            !schema(serde_json::json!({"type": "string"})).allows(b" \""),
            "no whitespace first"
        );
        let closed = schema(serde_json::json!({"type": "object", "additionalProperties": false}));
        assert!(closed.allows(b"{}") && !closed.allows(b"{\"") && !closed.allows(b"{ \""));
    }

    #[test]
    fn random_walks_through_a_schema_give_documents_it_accepts() {
        // Each walk takes a random allowed byte at every step (preferring those that close
        // strings and containers once it is long), until the document may end.
        let mut x = 99u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let closing = b"\"}]";
        for walk in 0..300 {
            let mut st = schema(person());
            let mut doc = Vec::new();
            loop {
                let allowed: Vec<u8> = (0x20u8..0x7f).filter(|&b| st.allows(&[b])).collect();
                if st.done() && (doc.len() > 60 || allowed.is_empty() || next() % 4 == 0) {
                    break;
                }
                assert!(
                    !allowed.is_empty(),
                    "walk {walk} stuck at {:?}",
                    String::from_utf8_lossy(&doc)
                );
                let preferred: Vec<u8> = allowed
                    .iter()
                    .copied()
                    .filter(|b| closing.contains(b) || b.is_ascii_digit() || *b == b',')
                    .collect();
                let pool = if doc.len() > 40 && !preferred.is_empty() && next() % 4 != 0 {
                    &preferred
                } else {
                    &allowed
                };
                let b = pool[(next() % pool.len() as u64) as usize];
                assert!(st.advance(&[b]));
                doc.push(b);
                assert!(doc.len() < 5000, "walk {walk} runs on");
            }
            let v: serde_json::Value = serde_json::from_slice(&doc)
                .unwrap_or_else(|e| panic!("walk {walk}: {e}: {}", String::from_utf8_lossy(&doc)));
            is_person(&v).unwrap_or_else(|e| panic!("walk {walk}: {e}"));
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
