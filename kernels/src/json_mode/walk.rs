//! How one byte moves a reading of the document: a value's start (which of the schema's
//! alternatives it may begin), and every byte after it (structure, strings and their
//! rules' DFAs, numbers within their bounds, fixed texts), each reading that survives
//! going into the next set. The schema navigation these need (a node's texts, properties,
//! elements, bounds) is here too.

use super::*;
pub(super) fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The most digits of a bounded number.
pub(super) const MAX_BOUNDED_DIGITS: u8 = 18;

/// A bounded number node's bounds, and whether it is an integer.
pub(super) fn bounds_of(cx: &Cx, node: NodeId) -> Option<(Bounds, bool)> {
    match cx.schema.node(node) {
        Node::Number(Some(b)) => Some((*b, false)),
        Node::Integer(Some(b)) => Some((*b, true)),
        _ => None,
    }
}

/// A bounded number's value so far.
pub(super) fn value(neg: bool, frac: u8, mant: i64) -> f64 {
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
pub(super) fn complete(n: Num) -> bool {
    matches!(n, Num::Zero | Num::Int | Num::Frac | Num::ExpDigits(_))
}

fn emit(out: &mut Vec<Work>, w: Work) {
    if out.len() < MAX_READINGS && !out.contains(&w) {
        out.push(w);
    }
}

/// The texts of a literal node.
pub(super) fn texts<'a>(cx: &Cx<'a>, node: NodeId) -> &'a [Vec<u8>] {
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
pub(super) fn step(cx: &Cx, mut w: Work, b: u8, out: &mut Vec<Work>) {
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
