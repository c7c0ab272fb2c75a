//! The text of a grammar in EBNF (vLLM's `guided_grammar`, in the GBNF form xgrammar and
//! llama.cpp read) to its rules' expressions.
//!
//! A rule is `name ::= expression`. An expression is alternatives (`|`) of sequences of
//! items; an item is a string (`"…"` or `'…'`), a character class (`[a-z]`, `[^"\\]`),
//! any character (`.`), a rule's name, or a parenthesized expression, each optionally
//! repeated (`*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`, `{,n}`). Strings and classes take the
//! escapes `\n \r \t \\ \" \' \[ \] \- \^ \/ \xHH \uHHHH \UHHHHHHHH`. `#` starts a comment
//! to the end of its line. Line breaks are spaces: a rule ends where the next `name ::=`
//! begins, so a rule may run over several lines, inside parentheses or not.

/// The most times `{m,n}` may repeat an item.
pub const MAX_REPEAT: u32 = 1000;

/// The deepest parentheses and repetitions may nest (an expression is parsed and compiled
/// by recursion).
pub const MAX_NESTING: usize = 64;

/// An expression of a rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// Any one of these.
    Alt(Vec<Expr>),
    /// These one after another (none: the empty text).
    Seq(Vec<Expr>),
    /// These bytes (a string's UTF-8).
    Bytes(Vec<u8>),
    /// One character of these inclusive ranges, or of none of them.
    Class {
        ranges: Vec<(char, char)>,
        negated: bool,
    },
    /// The rule of this name.
    Rule(String),
    /// `inner` at least `min` times, at most `max` (`None`: no limit).
    Repeat {
        inner: Box<Expr>,
        min: u32,
        max: Option<u32>,
    },
}

/// The rules of `text`, in their order.
pub fn parse(text: &str) -> Result<Vec<(String, Expr)>, String> {
    let mut p = Parser {
        s: text.chars().collect(),
        i: 0,
        depth: 0,
    };
    let mut rules = Vec::new();
    p.space();
    while !p.at_end() {
        let name = p.name().ok_or_else(|| p.error("expected a rule's name"))?;
        p.space();
        if !p.eat_str("::=") {
            if p.peek() == Some(':') {
                return Err(p.error(&format!(
                    "expected `::=` after `{name}`: Lark's form (`{name}: …`) is not read; write each rule as `name ::= …` (GBNF), the output's as `root ::= …`"
                )));
            }
            return Err(p.error(&format!("expected `::=` after `{name}`")));
        }
        let expr = p.alternatives()?;
        rules.push((name, expr));
    }
    if rules.is_empty() {
        return Err("the grammar has no rules".into());
    }
    Ok(rules)
}

struct Parser {
    s: Vec<char>,
    i: usize,
    /// Groups and repetitions open around `i`.
    depth: usize,
}

impl Parser {
    fn at_end(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek(&self) -> Option<char> {
        self.s.get(self.i).copied()
    }

    fn error(&self, what: &str) -> String {
        let line = self.s[..self.i.min(self.s.len())]
            .iter()
            .filter(|&&c| c == '\n')
            .count()
            + 1;
        let near: String = self.s[self.i.min(self.s.len())..].iter().take(20).collect();
        if near.is_empty() {
            format!("{what} at the end of the grammar (line {line})")
        } else {
            format!("{what} on line {line}, at `{near}`")
        }
    }

    /// Skips spaces, line breaks and comments.
    fn space(&mut self) {
        while let Some(c) = self.peek() {
            if c == '#' {
                while self.peek().is_some_and(|c| c != '\n') {
                    self.i += 1;
                }
            } else if c.is_whitespace() {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    fn eat_str(&mut self, lit: &str) -> bool {
        let n = lit.chars().count();
        if self.s.len() >= self.i + n && self.s[self.i..self.i + n].iter().copied().eq(lit.chars())
        {
            self.i += n;
            true
        } else {
            false
        }
    }

    fn is_name_char(c: char) -> bool {
        c.is_ascii_alphanumeric() || c == '_' || c == '-'
    }

    /// A rule's name: letters, digits, `_` and `-`, not starting with a digit or `-`.
    fn name(&mut self) -> Option<String> {
        let start = self.i;
        if !self
            .peek()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        {
            return None;
        }
        while self.peek().is_some_and(Self::is_name_char) {
            self.i += 1;
        }
        Some(self.s[start..self.i].iter().collect())
    }

    /// Whether a rule's definition (`name ::=`) starts here.
    fn at_definition(&mut self) -> bool {
        let start = self.i;
        let found = self.name().is_some() && {
            self.space();
            self.eat_str("::=")
        };
        self.i = start;
        found
    }

    fn alternatives(&mut self) -> Result<Expr, String> {
        let mut alts = vec![self.sequence()?];
        while self.peek() == Some('|') {
            self.i += 1;
            alts.push(self.sequence()?);
        }
        Ok(if alts.len() == 1 {
            alts.remove(0)
        } else {
            Expr::Alt(alts)
        })
    }

    fn sequence(&mut self) -> Result<Expr, String> {
        let mut items = Vec::new();
        loop {
            self.space();
            match self.peek() {
                None | Some('|') | Some(')') => break,
                Some(_) if self.at_definition() => break,
                Some(_) => {}
            }
            let mut item = self.primary()?;
            let depth = self.depth;
            while let Some((min, max)) = {
                self.space();
                self.quantifier()?
            } {
                self.nest()?;
                item = Expr::Repeat {
                    inner: Box::new(item),
                    min,
                    max,
                };
            }
            self.depth = depth;
            items.push(item);
        }
        Ok(if items.len() == 1 {
            items.remove(0)
        } else {
            Expr::Seq(items)
        })
    }

    fn primary(&mut self) -> Result<Expr, String> {
        match self.peek() {
            Some(q @ ('"' | '\'')) => {
                self.i += 1;
                let mut text = String::new();
                loop {
                    match self.peek() {
                        None => return Err(self.error("a string that does not end")),
                        Some(c) if c == q => {
                            self.i += 1;
                            break;
                        }
                        Some('\\') => text.push(self.escape()?),
                        Some(c) => {
                            self.i += 1;
                            text.push(c);
                        }
                    }
                }
                Ok(Expr::Bytes(text.into_bytes()))
            }
            Some('[') => {
                self.i += 1;
                let negated = self.peek() == Some('^');
                if negated {
                    self.i += 1;
                }
                let mut ranges = Vec::new();
                loop {
                    let lo = match self.peek() {
                        None => return Err(self.error("a character class that does not end")),
                        Some(']') => {
                            self.i += 1;
                            break;
                        }
                        Some(_) => self.class_char()?,
                    };
                    let hi = if self.peek() == Some('-') && self.s.get(self.i + 1) != Some(&']') {
                        self.i += 1;
                        if self.at_end() {
                            return Err(self.error("a character class that does not end"));
                        }
                        self.class_char()?
                    } else {
                        lo
                    };
                    if hi < lo {
                        return Err(
                            self.error(&format!("a range that runs backwards ({lo:?}-{hi:?})"))
                        );
                    }
                    ranges.push((lo, hi));
                }
                if ranges.is_empty() && !negated {
                    return Err(self.error("an empty character class"));
                }
                Ok(Expr::Class { ranges, negated })
            }
            Some('.') => {
                self.i += 1;
                Ok(Expr::Class {
                    ranges: Vec::new(),
                    negated: true,
                })
            }
            Some('(') => {
                self.i += 1;
                self.nest()?;
                let inner = self.alternatives()?;
                self.depth -= 1;
                self.space();
                if self.peek() != Some(')') {
                    return Err(self.error("expected `)`"));
                }
                self.i += 1;
                Ok(inner)
            }
            _ => match self.name() {
                Some(n) => Ok(Expr::Rule(n)),
                None => Err(self.error("expected a string, a class, a rule's name or `(`")),
            },
        }
    }

    /// One more group or repetition around what follows; refused past [`MAX_NESTING`].
    fn nest(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(self.error(&format!(
                "groups and repetitions nested more than {MAX_NESTING} deep"
            )));
        }
        Ok(())
    }

    fn class_char(&mut self) -> Result<char, String> {
        match self.peek() {
            Some('\\') => self.escape(),
            Some(c) => {
                self.i += 1;
                Ok(c)
            }
            None => Err(self.error("a character class that does not end")),
        }
    }

    /// The character of the escape at `\`.
    fn escape(&mut self) -> Result<char, String> {
        self.i += 1;
        let c = self
            .peek()
            .ok_or_else(|| self.error("an escape that does not end"))?;
        self.i += 1;
        let hex = |p: &mut Self, n: usize| -> Result<char, String> {
            let digits: String = p.s[p.i.min(p.s.len())..].iter().take(n).collect();
            let v = (digits.len() == n)
                .then(|| u32::from_str_radix(&digits, 16).ok())
                .flatten()
                .and_then(char::from_u32)
                .ok_or_else(|| p.error(&format!("an escape needs {n} hexadecimal digits")))?;
            p.i += n;
            Ok(v)
        };
        Ok(match c {
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            '0' => '\0',
            'x' => hex(self, 2)?,
            'u' => hex(self, 4)?,
            'U' => hex(self, 8)?,
            '\\' | '"' | '\'' | '[' | ']' | '-' | '^' | '/' | '.' | '|' | '(' | ')' | '*' | '+'
            | '?' | '{' | '}' => c,
            _ => {
                self.i -= 1;
                return Err(self.error(&format!("an unknown escape `\\{c}`")));
            }
        })
    }

    /// A repetition after an item: `(min, max)`.
    fn quantifier(&mut self) -> Result<Option<(u32, Option<u32>)>, String> {
        let q = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => {
                self.i += 1;
                let min = self.number()?;
                self.space();
                let max = if self.peek() == Some(',') {
                    self.i += 1;
                    self.number()?
                } else {
                    Some(min.unwrap_or(0))
                };
                self.space();
                if self.peek() != Some('}') {
                    return Err(self.error("expected `}`"));
                }
                let min = min.unwrap_or(0);
                if let Some(max) = max {
                    if max < min {
                        return Err(self.error(&format!("a repetition {{{min},{max}}}")));
                    }
                }
                if min.max(max.unwrap_or(0)) > MAX_REPEAT {
                    return Err(self.error(&format!(
                        "a repetition past {MAX_REPEAT} (write it with `*` or `+`)"
                    )));
                }
                (min, max)
            }
            _ => return Ok(None),
        };
        self.i += 1;
        Ok(Some(q))
    }

    fn number(&mut self) -> Result<Option<u32>, String> {
        self.space();
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        if start == self.i {
            return Ok(None);
        }
        let digits: String = self.s[start..self.i].iter().collect();
        digits
            .parse()
            .map(Some)
            .map_err(|_| self.error("a repetition count too large"))
    }
}
