//! A grammar's rules ([`super::parse`]) to the program [`super::EbnfState`] runs: every
//! rule a list of alternatives, each a sequence of byte sets and calls of rules, laid out
//! one after another in one array (each alternative ending in [`Elem::End`]).
//!
//! Strings become their UTF-8 bytes, one set each; a character class becomes one set
//! where its characters are all one byte long, and otherwise a rule whose alternatives
//! are its UTF-8 byte sequences (`regex_syntax`'s). Repetitions become rules: `x*` is
//! `r ::= x r | ""`, `x{2,4}` is `x x (x (x)?)?`. Refused: a grammar that would loop
//! without reading anything (left recursion, through rules that may be empty or not), one
//! that repeats what may be empty (its ways to match a text, and so its stacks, would
//! multiply with each repeat), and one past [`MAX_ELEMS`].

use super::parse::{parse, Expr};
use regex_syntax::hir::{ClassUnicode, ClassUnicodeRange};
use regex_syntax::utf8::Utf8Sequences;
use std::collections::HashMap;

/// The most elements a grammar's program may have, repetitions written out.
pub const MAX_ELEMS: usize = 200_000;

/// One element of an alternative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Elem {
    /// One byte of the set of this index.
    Set(u32),
    /// The rule of this index.
    Call(u32),
    /// The alternative is complete.
    End,
}

/// A grammar compiled.
#[derive(Debug)]
pub struct Program {
    pub(crate) elems: Vec<Elem>,
    /// The byte sets, 256 bits each.
    pub(crate) sets: Vec<[u64; 4]>,
    /// Each rule's alternatives: where each starts in `elems`.
    pub(crate) alts: Vec<Vec<u32>>,
    pub(crate) root: u32,
    /// Distinct per grammar compiled: what masks are kept by.
    pub id: u64,
    /// The grammar's text.
    pub source: String,
}

impl Program {
    /// Whether set `k` holds byte `b`.
    pub(crate) fn holds(&self, k: u32, b: u8) -> bool {
        self.sets[k as usize][(b >> 6) as usize] >> (b & 63) & 1 == 1
    }
}

/// Compiles `text`, whose rule `root` is the whole output.
pub fn compile(text: &str) -> Result<Program, String> {
    let rules = parse(text)?;
    let mut b = Builder::default();
    for (name, _) in &rules {
        if b.ids.contains_key(name) {
            return Err(format!("rule `{name}` is defined twice"));
        }
        b.ids.insert(name.clone(), b.rules.len() as u32);
        b.rules.push(Vec::new());
        b.names.push(name.clone());
    }
    let root = *b
        .ids
        .get("root")
        .ok_or("the grammar has no rule named `root` (where the output starts)")?;
    for (i, (name, expr)) in rules.iter().enumerate() {
        let alts = b.alts(expr, name)?;
        b.grow(alts.iter().map(|a| a.len() + 1).sum())?;
        b.rules[i] = alts;
    }
    let nullable = b.nullable();
    b.check_repeats(&nullable)?;
    b.check_left_recursion(&nullable)?;
    let mut elems = Vec::with_capacity(b.size + b.rules.len());
    let mut alts = Vec::with_capacity(b.rules.len());
    for rule in &b.rules {
        let mut starts = Vec::with_capacity(rule.len());
        for alt in rule {
            starts.push(elems.len() as u32);
            elems.extend_from_slice(alt);
            elems.push(Elem::End);
        }
        alts.push(starts);
    }
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    Ok(Program {
        elems,
        sets: b.sets,
        alts,
        root,
        id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        source: text.to_string(),
    })
}

#[derive(Default)]
struct Builder {
    /// Each rule's alternatives (the grammar's own first, then those made here).
    rules: Vec<Vec<Vec<Elem>>>,
    names: Vec<String>,
    ids: HashMap<String, u32>,
    sets: Vec<[u64; 4]>,
    set_ids: HashMap<[u64; 4], u32>,
    /// Character classes already made, by their ranges.
    classes: HashMap<Vec<(u32, u32)>, Elem>,
    /// Elements so far.
    size: usize,
    /// The unit each repetition repeats, and the rule it was written in.
    repeated: Vec<(Elem, String)>,
}

impl Builder {
    fn set(&mut self, bits: [u64; 4]) -> Elem {
        let n = self.sets.len() as u32;
        let id = *self.set_ids.entry(bits).or_insert_with(|| {
            self.sets.push(bits);
            n
        });
        Elem::Set(id)
    }

    fn byte_range(&mut self, lo: u8, hi: u8) -> Elem {
        let mut bits = [0u64; 4];
        for b in lo..=hi {
            bits[(b >> 6) as usize] |= 1 << (b & 63);
        }
        self.set(bits)
    }

    /// Counts `n` more elements; refused past [`MAX_ELEMS`].
    fn grow(&mut self, n: usize) -> Result<(), String> {
        self.size += n;
        if self.size > MAX_ELEMS {
            return Err(format!(
                "the grammar is too large (past {MAX_ELEMS} elements with its repetitions written out)"
            ));
        }
        Ok(())
    }

    /// A rule made here, named for the rule it was made for.
    fn new_rule(&mut self, owner: &str, alts: Vec<Vec<Elem>>) -> Result<u32, String> {
        self.grow(alts.iter().map(|a| a.len() + 1).sum())?;
        self.rules.push(alts);
        self.names.push(format!("{owner}#{}", self.rules.len()));
        Ok(self.rules.len() as u32 - 1)
    }

    fn alts(&mut self, e: &Expr, owner: &str) -> Result<Vec<Vec<Elem>>, String> {
        Ok(match e {
            Expr::Alt(v) => v
                .iter()
                .map(|a| {
                    let mut out = Vec::new();
                    self.seq(a, owner, &mut out)?;
                    Ok(out)
                })
                .collect::<Result<_, String>>()?,
            _ => {
                let mut out = Vec::new();
                self.seq(e, owner, &mut out)?;
                vec![out]
            }
        })
    }

    fn seq(&mut self, e: &Expr, owner: &str, out: &mut Vec<Elem>) -> Result<(), String> {
        match e {
            Expr::Seq(items) => {
                for i in items {
                    self.seq(i, owner, out)?;
                }
            }
            Expr::Bytes(bytes) => {
                for &b in bytes {
                    let s = self.byte_range(b, b);
                    out.push(s);
                }
            }
            Expr::Class { ranges, negated } => {
                let c = self.class(ranges, *negated, owner)?;
                out.push(c);
            }
            Expr::Rule(name) => match self.ids.get(name) {
                Some(&r) => out.push(Elem::Call(r)),
                None => return Err(format!("rule `{name}` is used but not defined")),
            },
            Expr::Alt(_) => {
                let alts = self.alts(e, owner)?;
                let r = self.new_rule(owner, alts)?;
                out.push(Elem::Call(r));
            }
            Expr::Repeat { inner, min, max } => {
                let unit = self.unit(inner, owner)?;
                self.repeated.push((unit, owner.to_string()));
                self.grow(*min as usize)?;
                for _ in 0..*min {
                    out.push(unit);
                }
                match max {
                    None => {
                        // r ::= unit r | ""
                        let r = self.rules.len() as u32;
                        self.new_rule(owner, vec![vec![unit, Elem::Call(r)], vec![]])?;
                        out.push(Elem::Call(r));
                    }
                    Some(max) if max > min => {
                        // (unit (unit (…)?)?)?
                        let mut next: Option<u32> = None;
                        for _ in *min..*max {
                            let mut alt = vec![unit];
                            alt.extend(next.map(Elem::Call));
                            next = Some(self.new_rule(owner, vec![alt, vec![]])?);
                        }
                        out.extend(next.map(Elem::Call));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// `e` as one element: itself where it is one, or a rule made of it.
    fn unit(&mut self, e: &Expr, owner: &str) -> Result<Elem, String> {
        let alts = self.alts(e, owner)?;
        if let [alt] = alts.as_slice() {
            if let [one] = alt.as_slice() {
                return Ok(*one);
            }
        }
        Ok(Elem::Call(self.new_rule(owner, alts)?))
    }

    /// A character class: one set where its characters are one byte each, else a rule of
    /// its UTF-8 sequences.
    fn class(
        &mut self,
        ranges: &[(char, char)],
        negated: bool,
        owner: &str,
    ) -> Result<Elem, String> {
        let mut class =
            ClassUnicode::new(ranges.iter().map(|&(a, b)| ClassUnicodeRange::new(a, b)));
        if negated {
            class.negate();
        }
        let key: Vec<(u32, u32)> = class
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect();
        if key.is_empty() {
            return Err("a character class that no character is in".into());
        }
        if let Some(&e) = self.classes.get(&key) {
            return Ok(e);
        }
        let mut one_byte = [0u64; 4];
        let mut longer: Vec<Vec<Elem>> = Vec::new();
        for r in class.iter() {
            for seq in Utf8Sequences::new(r.start(), r.end()) {
                let bytes = seq.as_slice();
                if let [b] = bytes {
                    for x in b.start..=b.end {
                        one_byte[(x >> 6) as usize] |= 1 << (x & 63);
                    }
                } else {
                    let alt = bytes
                        .iter()
                        .map(|b| self.byte_range(b.start, b.end))
                        .collect();
                    longer.push(alt);
                }
            }
        }
        let e = if longer.is_empty() {
            self.set(one_byte)
        } else {
            if one_byte != [0; 4] {
                let s = self.set(one_byte);
                longer.insert(0, vec![s]);
            }
            Elem::Call(self.new_rule(owner, longer)?)
        };
        self.classes.insert(key, e);
        Ok(e)
    }

    /// Which rules may match the empty text: a rule is where one of its alternatives is
    /// only calls of such rules. Worked out from the empty alternatives up, each call
    /// visited once.
    fn nullable(&self) -> Vec<bool> {
        let n = self.rules.len();
        let mut nullable = vec![false; n];
        // Per alternative (rule, index): the calls in it not yet known to be empty; an
        // alternative with a byte set never is.
        let mut waiting: Vec<(usize, usize)> = Vec::new();
        let mut callers: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut ready = Vec::new();
        for (r, alts) in self.rules.iter().enumerate() {
            for alt in alts {
                if alt.iter().any(|e| matches!(e, Elem::Set(_))) {
                    continue;
                }
                let id = waiting.len();
                waiting.push((r, alt.len()));
                for e in alt {
                    if let Elem::Call(x) = e {
                        callers[*x as usize].push(id);
                    }
                }
                if alt.is_empty() {
                    ready.push(r);
                }
            }
        }
        while let Some(r) = ready.pop() {
            if std::mem::replace(&mut nullable[r], true) {
                continue;
            }
            for &id in &callers[r] {
                let w = &mut waiting[id];
                w.1 -= 1;
                if w.1 == 0 {
                    ready.push(w.0);
                }
            }
        }
        nullable
    }

    /// Refuses a repetition of what may be empty (`("a"?){0,9}`): the ways to match one
    /// text multiply with each repeat, and so would the stacks.
    fn check_repeats(&self, nullable: &[bool]) -> Result<(), String> {
        for (unit, owner) in &self.repeated {
            if matches!(unit, Elem::Call(r) if nullable[*r as usize]) {
                return Err(format!(
                    "rule `{owner}` repeats something that may be empty, which cannot be followed (repeat a part that reads at least one character)"
                ));
            }
        }
        Ok(())
    }

    /// Refuses a rule that can reach itself before reading a byte: following it would
    /// never end.
    fn check_left_recursion(&self, nullable: &[bool]) -> Result<(), String> {
        let n = self.rules.len();
        // The rules each can call before reading a byte.
        let first: Vec<Vec<u32>> = self
            .rules
            .iter()
            .map(|alts| {
                let mut out = Vec::new();
                for alt in alts {
                    for e in alt {
                        match *e {
                            Elem::Call(x) => {
                                out.push(x);
                                if !nullable[x as usize] {
                                    break;
                                }
                            }
                            _ => break,
                        }
                    }
                }
                out
            })
            .collect();
        // Depth-first, without recursion: 0 unseen, 1 on the path, 2 done.
        let mut color = vec![0u8; n];
        for start in 0..n {
            if color[start] != 0 {
                continue;
            }
            let mut path: Vec<(usize, usize)> = vec![(start, 0)];
            color[start] = 1;
            while let Some(&mut (r, ref mut i)) = path.last_mut() {
                if let Some(&next) = first[r].get(*i) {
                    *i += 1;
                    let next = next as usize;
                    match color[next] {
                        0 => {
                            color[next] = 1;
                            path.push((next, 0));
                        }
                        1 => {
                            let name = &self.names[next];
                            let name = name.split('#').next().unwrap_or(name);
                            return Err(format!(
                                "rule `{name}` can come back to itself without reading a character (left recursion, or a repetition of what may be empty), which cannot be followed"
                            ));
                        }
                        _ => {}
                    }
                } else {
                    color[r] = 2;
                    path.pop();
                }
            }
        }
        Ok(())
    }
}
