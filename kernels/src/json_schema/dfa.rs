//! Strings held to a `pattern` or a `format`: the regular expression compiled to a
//! minimized, size-limited DFA over the string's UTF-8 bytes (ASCII classes where the
//! Unicode DFA is too large), with the fewest characters from each state to a match, and a
//! process-wide cache of them.

use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::util::{primitives::StateID, start, syntax};
use regex_automata::Anchored;
use std::collections::HashMap;
use std::sync::Arc;

/// What a constrained string must satisfy: its characters between `min` and `max`, and
/// its bytes matched, whole, by `dfa` (from `pattern` or `format`).
#[derive(Debug, Clone)]
pub struct StringRule {
    pub min: u32,
    pub max: u32,
    pub dfa: Option<Arc<Dfa>>,
}

/// A compiled regular expression: its source (for equality and errors), its DFA, the
/// DFA's start state, and for each state the fewest characters that lead from it to a
/// match (so that a `maxLength` never leaves a string that cannot end).
#[derive(Debug)]
pub struct Dfa {
    /// Unique to this build in the process: what masks computed from it are kept by
    /// ([`crate::regex_mode`]).
    pub id: u64,
    pub source: String,
    pub dfa: dense::DFA<Vec<u32>>,
    pub start: StateID,
    to_match: HashMap<StateID, u32>,
}

impl PartialEq for StringRule {
    fn eq(&self, o: &Self) -> bool {
        (self.min, self.max) == (o.min, o.max)
            && self.dfa.as_ref().map(|d| &d.source) == o.dfa.as_ref().map(|d| &d.source)
    }
}

impl Dfa {
    /// Whether the bytes that led to `s` are a whole match.
    pub fn accepts(&self, s: StateID) -> bool {
        self.dfa.is_match_state(self.dfa.next_eoi_state(s))
    }
    /// The state after byte `b`, `None` once no match can follow.
    pub fn next(&self, s: StateID, b: u8) -> Option<StateID> {
        let n = self.dfa.next_state(s, b);
        (!self.dfa.is_dead_state(n)).then_some(n)
    }
    /// The fewest characters from `s` to a match.
    pub fn chars_to_match(&self, s: StateID) -> u32 {
        self.to_match.get(&s).copied().unwrap_or(u32::MAX)
    }
}

/// For every state reachable from `start`, the fewest characters to a match: a
/// breadth-first search back from the matching states, where a byte that starts a
/// character counts 1 and a continuation byte 0.
fn chars_to_match(dfa: &dense::DFA<Vec<u32>>, start: StateID) -> HashMap<StateID, u32> {
    let mut index: HashMap<StateID, usize> = HashMap::from([(start, 0)]);
    let mut states = vec![start];
    // Per state, the states that lead to it and whether that byte starts a character.
    let mut back: Vec<Vec<(usize, bool)>> = vec![Vec::new()];
    let mut i = 0;
    while i < states.len() {
        let s = states[i];
        for b in 0..=255u8 {
            let n = dfa.next_state(s, b);
            if dfa.is_dead_state(n) {
                continue;
            }
            let j = *index.entry(n).or_insert_with(|| {
                states.push(n);
                back.push(Vec::new());
                states.len() - 1
            });
            back[j].push((i, !(0x80..0xc0).contains(&b)));
        }
        i += 1;
    }
    let mut dist = vec![u32::MAX; states.len()];
    let mut queue = std::collections::VecDeque::new();
    for (k, &s) in states.iter().enumerate() {
        if dfa.is_match_state(dfa.next_eoi_state(s)) {
            dist[k] = 0;
            queue.push_back(k);
        }
    }
    while let Some(k) = queue.pop_front() {
        for &(from, starts_char) in &back[k] {
            let d = dist[k] + u32::from(starts_char);
            if d < dist[from] {
                dist[from] = d;
                // 0-1 search: a free step goes to the front.
                if starts_char {
                    queue.push_back(from);
                } else {
                    queue.push_front(from);
                }
            }
        }
    }
    states.into_iter().zip(dist).collect()
}

/// The largest DFA a `pattern` or `format` may compile to.
const MAX_DFA_BYTES: usize = 2 << 20;

/// `format`s followed, as regular expressions of the strings they accept (each a subset
/// of what RFC 3339 and the usual validators accept: no leap seconds, no 29 February).
pub(super) fn format_regex(format: &str) -> Option<&'static str> {
    const DATE: &str = "[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))";
    Some(match format {
        "date" => DATE,
        "date-time" => concat!(
            "[0-9]{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))",
            "T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
        ),
        "time" => "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])",
        "uuid" => "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
        "email" => "[A-Za-z0-9_+-]+(?:\\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\\.[A-Za-z]{2,24}",
        "ipv4" => "(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
        _ => return None,
    })
}

/// A DFA that matches whole strings of `regex`, from the process's cache of them (a
/// `format`'s DFA, or a pattern's, is built once, not per request: building one takes
/// 0.1–1 ms for the formats and up to milliseconds for Unicode classes).
pub(crate) fn whole_match_dfa(regex: &str, source: &str) -> Result<Arc<Dfa>, String> {
    /// The cache's DFAs, and the bytes they hold.
    type Cache = (HashMap<String, Arc<Dfa>>, usize);
    static CACHE: std::sync::OnceLock<std::sync::Mutex<Cache>> = std::sync::OnceLock::new();
    // At most this many expressions, and this many bytes of DFAs (one can be 2 MB): past
    // either, the cache starts again.
    const MAX_CACHED: usize = 512;
    const MAX_CACHED_BYTES: usize = 64 << 20;
    let cache = CACHE.get_or_init(Default::default);
    if let Some(d) = cache.lock().ok().and_then(|c| c.0.get(regex).cloned()) {
        return Ok(d);
    }
    let d = Arc::new(build_dfa(regex, source)?);
    if let Ok(mut c) = cache.lock() {
        let size = d.dfa.memory_usage() + d.to_match.len() * 16;
        if c.0.len() >= MAX_CACHED || c.1 + size > MAX_CACHED_BYTES {
            *c = Cache::default();
        }
        c.0.insert(regex.to_string(), d.clone());
        c.1 += size;
    }
    Ok(d)
}

/// The DFA of a string schema's `pattern`, which matches anywhere in the string (JSON
/// Schema's rule). The text around the match may be any characters, Unicode's (`u`) even
/// where the pattern's classes fall back to ASCII ([`build_dfa`]).
pub(super) fn pattern_dfa(p: &str) -> Result<Arc<Dfa>, String> {
    whole_match_dfa(&format!("(?su:.*)(?:{p})(?su:.*)"), p)
}

/// Builds a DFA that matches whole strings of `regex` (anchored at both ends).
///
/// Classes are Unicode's (`\w` takes every script's letters). Where that DFA is past
/// [`MAX_DFA_BYTES`] (`(\w+\s){0,30}\w+` is), the pattern is compiled again with its
/// classes' ASCII members (`\w`, `\d`, `\s`, case folding), and that DFA is followed
/// instead: it accepts only strings the pattern accepts, so what the model writes still
/// matches; it just cannot use other scripts there. A pattern that would then match more
/// than before — a negated class (`\W`, `[^a]`) or `.` takes any byte in ASCII mode —
/// can match bytes that are not UTF-8, and the second build refuses it: the first error
/// stands.
fn build_dfa(regex: &str, source: &str) -> Result<Dfa, String> {
    let build = |unicode: bool| {
        dense::Builder::new()
            .configure(
                dense::DFA::config()
                    .start_kind(StartKind::Anchored)
                    .minimize(true)
                    .dfa_size_limit(Some(MAX_DFA_BYTES))
                    .determinize_size_limit(Some(MAX_DFA_BYTES)),
            )
            .syntax(syntax::Config::new().unicode(unicode).utf8(true))
            .build(&format!("^(?:{regex})$"))
            .map_err(Box::new)
    };
    let dfa = match build(true) {
        Ok(d) => d,
        Err(e) if e.is_size_limit_exceeded() => build(false).map_err(|_| e.to_string())?,
        Err(e) => return Err(e.to_string()),
    };
    let start = dfa
        .start_state(&start::Config::new().anchored(Anchored::Yes))
        .map_err(|e| e.to_string())?;
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    Ok(Dfa {
        id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        source: source.to_string(),
        to_match: chars_to_match(&dfa, start),
        dfa,
        start,
    })
}
