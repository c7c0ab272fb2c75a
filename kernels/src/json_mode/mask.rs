//! The per-step mask: a row of logits cut to the tokens that may come next, with the
//! vocabulary's tokens sorted once per model ([`JsonVocab`]) so that most are decided by
//! one table lookup.

use super::*;

impl JsonState {
    /// Sets every logit of a token that may not come next to −∞: tokens whose bytes do not
    /// continue the document, special tokens, and stop tokens until the document may end.
    ///
    /// Shortcuts keep a row of 49,152 tokens to a fraction of a millisecond: a token
    /// whose first byte cannot come next is refused without trying the rest (the 256
    /// first bytes are tried once per call); inside a free string a token with no quote,
    /// backslash or control byte is taken whole, and one whose first such byte is a
    /// control byte refused; leading whitespace is checked against the room left and the
    /// byte after it against the first-byte table. Tokens alike in all of that are
    /// decided as a group.
    pub fn mask(&self, logits: &mut [f32], vocab: &JsonVocab) {
        self.cut(&mut Logits(logits), vocab);
    }

    /// The same decision as [`JsonState::mask`], as a bitmask over a row of `n` logits:
    /// bit `i % 32` of word `i / 32` set when token `i` may come next (the form the GPU's
    /// `sample` kernel takes, see [`crate::adjust::Adjust`]).
    pub fn allowed(&self, vocab: &JsonVocab, n: usize) -> Vec<u32> {
        let mut bits = Bits {
            words: vec![u32::MAX; n.div_ceil(32)],
            n,
        };
        if !n.is_multiple_of(32) {
            bits.words[n / 32] = (1u32 << (n % 32)) - 1;
        }
        self.cut(&mut bits, vocab);
        bits.words
    }

    /// Refuses, in `row`, every token that may not come next.
    fn cut(&self, row: &mut impl Cut, vocab: &JsonVocab) {
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
        // structure, or inside a string), or ends a number (whose next byte the table
        // already tried after it), a token's first byte after its leading whitespace is
        // checked by the same table.
        let ws_keeps_mode = self.readings.iter().all(|r| match r.mode {
            Mode::Value { top, .. } => !top,
            Mode::Num { n, .. } | Mode::BNum { n, .. } => complete(n),
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
        // Tokens of one signature (first byte, plain or not, leading whitespace and the
        // byte after it) are decided together where the tables settle it; only the rest
        // are tried one by one.
        #[derive(Clone, Copy, PartialEq)]
        enum Decision {
            Keep,
            Refuse,
            Try,
        }
        // (Only groups of a first byte that may come are decided: see the buckets below.)
        let decide = |gate: u32| {
            if gate & GATE_INDEX >= GATE_STOP || (in_string && gate & GATE_PLAIN != 0) {
                return Decision::Keep; // stop tokens once the document may end, or plain string text
            }
            let lead_ws = (gate >> GATE_LEAD_WS) as u8;
            let quick_no = ws_keeps_mode
                && lead_ws > 0
                && (lead_ws > ws_room
                    || (gate & GATE_HAS_AFTER != 0
                        && !first[((gate >> GATE_AFTER) & 0xff) as usize]));
            if quick_no || in_string && gate & GATE_CONTROL != 0 {
                Decision::Refuse
            } else {
                Decision::Try
            }
        };
        // Only the buckets of first bytes that may come are looked into. A group left to
        // try is tried by its shared beginning first: refused whole if that cannot come,
        // kept whole if its tokens are nothing more.
        let mut decisions: Vec<(&Group, Decision)> = Vec::new();
        let mut refused = 0;
        for (b, bucket) in vocab.buckets.iter().enumerate() {
            if !first[b] {
                refused += bucket.tokens.len();
                continue;
            }
            for g in &vocab.groups[bucket.groups.clone()] {
                let d = match decide(g.gate) {
                    Decision::Try if !self.run(&g.prefix, &mut sc) => Decision::Refuse,
                    Decision::Try if g.whole => Decision::Keep,
                    d => d,
                };
                if d == Decision::Refuse {
                    refused += (g.hi - g.lo) as usize;
                }
                decisions.push((g, d));
            }
        }
        let ids = |g: &Group| &vocab.order[g.lo as usize..g.hi as usize];
        if refused * 2 > vocab.order.len() {
            // Mostly refused: refuse all but the few that stay.
            let mut kept: Vec<u32> = Vec::new();
            for (g, d) in &decisions {
                match d {
                    Decision::Refuse => {}
                    Decision::Keep => kept.extend_from_slice(ids(g)),
                    Decision::Try => kept.extend(
                        ids(g)
                            .iter()
                            .filter(|&&id| self.allows_in(&vocab.bytes[id as usize], &mut sc)),
                    ),
                }
            }
            row.only(&kept);
            return;
        }
        for (b, bucket) in vocab.buckets.iter().enumerate() {
            if !first[b] {
                row.refuse(&vocab.order[bucket.tokens.clone()]);
            }
        }
        for (g, d) in decisions {
            match d {
                Decision::Keep => {}
                Decision::Refuse => row.refuse(ids(g)),
                Decision::Try => {
                    for &id in ids(g) {
                        if !self.allows_in(&vocab.bytes[id as usize], &mut sc) {
                            row.refuse(&[id]);
                        }
                    }
                }
            }
        }
        // Entries past the vocabulary (a padded head) are no tokens.
        row.refuse_from(vocab.bytes.len());
    }
}

/// Where the mask's decisions go: a row of logits, or a bitmask of the tokens kept.
trait Cut {
    /// Refuses these tokens (ids past the row are passed over).
    fn refuse(&mut self, ids: &[u32]);
    /// Refuses every token but these.
    fn only(&mut self, ids: &[u32]);
    /// Refuses every token from `id` on.
    fn refuse_from(&mut self, id: usize);
}

/// Refused logits become −∞.
struct Logits<'a>(&'a mut [f32]);

impl Cut for Logits<'_> {
    fn refuse(&mut self, ids: &[u32]) {
        for &id in ids {
            if let Some(l) = self.0.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    fn only(&mut self, ids: &[u32]) {
        let kept: Vec<(usize, f32)> = ids
            .iter()
            .filter_map(|&id| Some((id as usize, *self.0.get(id as usize)?)))
            .collect();
        self.0.fill(f32::NEG_INFINITY);
        for (id, l) in kept {
            self.0[id] = l;
        }
    }
    fn refuse_from(&mut self, id: usize) {
        for l in self.0.iter_mut().skip(id) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Refused tokens' bits are cleared; `n` tokens in all.
struct Bits {
    words: Vec<u32>,
    n: usize,
}

impl Cut for Bits {
    fn refuse(&mut self, ids: &[u32]) {
        for &id in ids {
            if let Some(w) = self.words.get_mut(id as usize / 32) {
                *w &= !(1 << (id % 32));
            }
        }
    }
    fn only(&mut self, ids: &[u32]) {
        self.words.fill(0);
        for &id in ids {
            if (id as usize) < self.n {
                self.words[id as usize / 32] |= 1 << (id % 32);
            }
        }
    }
    fn refuse_from(&mut self, id: usize) {
        for i in id..self.n.min(id.next_multiple_of(32)) {
            self.words[i / 32] &= !(1 << (i % 32));
        }
        for w in self.words.iter_mut().skip(id.div_ceil(32)) {
            *w = 0;
        }
    }
}

/// A vocabulary as the grammars see it (JSON mode, structured output, and regular
/// expressions: [`crate::regex_mode`]), built once per model.
pub struct JsonVocab {
    bytes: Vec<Vec<u8>>,
    /// The text tokens (not stop, special or empty) in the order of their bytes, and each
    /// one's longest common beginning with the one before it (in bytes, at most 65,535):
    /// a trie of the vocabulary, walked once per row by [`crate::regex_mode`].
    sorted: Vec<u32>,
    shared: Vec<u16>,
    /// Their bytes, one after another in that order (`trie_at[i]..trie_at[i + 1]`: the
    /// `i`th's), so that the walk reads memory in order.
    trie_bytes: Vec<u8>,
    trie_at: Vec<u32>,
    /// The stop tokens.
    stops: Vec<u32>,
    /// Masks already computed for regular expressions' states, and for context-free
    /// grammars'.
    regex_masks: crate::mask_cache::Masks<crate::regex_mode::MaskKey>,
    ebnf_masks: crate::mask_cache::Masks<crate::ebnf::MaskKey>,
    /// The token ids, grouped by their signature for the mask (`groups`: a signature
    /// and the range of `order` that has it). A signature (its "gate") is a text token's
    /// first byte, or [`GATE_STOP`], or [`GATE_NEVER`], with the flags below: what the
    /// mask's tables decide a token by, so that they decide a whole group at once.
    order: Vec<u32>,
    groups: Vec<Group>,
    /// Per table index (a first byte, [`GATE_STOP`], [`GATE_NEVER`]): its tokens' range
    /// of `order` and its groups' range of `groups`.
    buckets: Vec<Bucket>,
}

#[derive(Debug, Clone, Default)]
struct Bucket {
    tokens: std::ops::Range<usize>,
    groups: std::ops::Range<usize>,
}

/// Tokens alike for the mask: their signature (`gate`), the beginning they share (their
/// leading whitespace and two bytes more), whether they are that beginning and nothing
/// more, and their range of [`JsonVocab::order`].
#[derive(Debug, Clone)]
struct Group {
    gate: u32,
    prefix: Box<[u8]>,
    whole: bool,
    lo: u32,
    hi: u32,
}

const GATE_STOP: u32 = 256;
const GATE_NEVER: u32 = 257;
/// A signature's table index (bits 0–8); flags for a plain token (no quote, backslash
/// or control byte: it can sit inside a string whole), for a token whose first such byte
/// is a control byte (refused inside a string before anything could end it), and for a
/// byte after its leading whitespace; that byte (bits 16–23) and the leading whitespace
/// (bits 24–31, at most 255 counted).
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
        // Each token's signature: stop, never allowed (special or empty), or a text
        // token's first byte with the flags and bytes the mask decides it by.
        let gate: Vec<u32> = bytes
            .iter()
            .enumerate()
            .map(|(id, b)| {
                let id = id as u32;
                if stop.contains(&id) {
                    return GATE_STOP;
                }
                if special(id) || b.is_empty() {
                    return GATE_NEVER;
                }
                let lead = b.iter().take_while(|&&c| is_ws(c)).count();
                let plain = b.iter().all(|&c| c >= 0x20 && c != b'"' && c != b'\\');
                let control = b
                    .iter()
                    .find(|&&c| c < 0x20 || c == b'"' || c == b'\\')
                    .is_some_and(|&c| c < 0x20);
                b[0] as u32
                    | if plain { GATE_PLAIN } else { 0 }
                    | if control { GATE_CONTROL } else { 0 }
                    | b.get(lead)
                        .map_or(0, |&c| GATE_HAS_AFTER | (c as u32) << GATE_AFTER)
                    | (lead.min(255) as u32) << GATE_LEAD_WS
            })
            .collect();
        // Text tokens are grouped by their beginning too (leading whitespace and two
        // bytes more): a group whose beginning cannot come is refused with one try.
        let prefix = |id: u32| -> &[u8] {
            let b = &bytes[id as usize];
            match gate[id as usize] & GATE_INDEX {
                i if i < 256 => {
                    let lead = (gate[id as usize] >> GATE_LEAD_WS) as usize;
                    &b[..b.len().min(lead + 2)]
                }
                _ => &[],
            }
        };
        let mut order: Vec<u32> = (0..n as u32).collect();
        let key = |id: u32| {
            (
                gate[id as usize] & GATE_INDEX,
                gate[id as usize],
                prefix(id),
            )
        };
        order.sort_by(|&a, &b| key(a).cmp(&key(b)));
        let mut groups: Vec<Group> = Vec::new();
        for (i, &id) in order.iter().enumerate() {
            let (g, p) = (gate[id as usize], prefix(id));
            let whole = p.len() == bytes[id as usize].len();
            match groups.last_mut() {
                Some(last) if last.gate == g && *last.prefix == *p => {
                    last.hi = i as u32 + 1;
                    last.whole &= whole;
                }
                _ => groups.push(Group {
                    gate: g,
                    prefix: p.into(),
                    whole,
                    lo: i as u32,
                    hi: i as u32 + 1,
                }),
            }
        }
        let mut buckets = vec![Bucket::default(); GATE_NEVER as usize + 1];
        for (gi, g) in groups.iter().enumerate() {
            let b = &mut buckets[(g.gate & GATE_INDEX) as usize];
            if b.groups.is_empty() {
                b.groups = gi..gi;
                b.tokens = g.lo as usize..g.lo as usize;
            }
            b.groups.end = gi + 1;
            b.tokens.end = g.hi as usize;
        }
        let text = &order[buckets[..256]
            .iter()
            .map(|b| b.tokens.start)
            .min()
            .unwrap_or(0)
            ..buckets[..256]
                .iter()
                .map(|b| b.tokens.end)
                .max()
                .unwrap_or(0)];
        let mut sorted = text.to_vec();
        sorted.sort_unstable_by(|&a, &b| bytes[a as usize].cmp(&bytes[b as usize]));
        let shared = std::iter::once(0)
            .chain(sorted.windows(2).map(|w| {
                let (a, b) = (&bytes[w[0] as usize], &bytes[w[1] as usize]);
                a.iter()
                    .zip(b)
                    .take_while(|(x, y)| x == y)
                    .count()
                    .min(u16::MAX as usize) as u16
            }))
            .collect();
        let mut trie_at = Vec::with_capacity(sorted.len() + 1);
        let mut trie_bytes = Vec::new();
        trie_at.push(0);
        for &id in &sorted {
            trie_bytes.extend_from_slice(&bytes[id as usize]);
            trie_at.push(trie_bytes.len() as u32);
        }
        let stops = order[buckets[GATE_STOP as usize].tokens.clone()].to_vec();
        Self {
            bytes,
            order,
            groups,
            buckets,
            sorted,
            shared,
            trie_bytes,
            trie_at,
            stops,
            regex_masks: Default::default(),
            ebnf_masks: Default::default(),
        }
    }

    /// The text tokens in the order of their bytes, with each one's common beginning with
    /// the one before it.
    pub(crate) fn trie(&self) -> (&[u32], &[u16]) {
        (&self.sorted, &self.shared)
    }

    /// The bytes of the `i`th token in the order of [`JsonVocab::trie`].
    pub(crate) fn trie_token(&self, i: usize) -> &[u8] {
        &self.trie_bytes[self.trie_at[i] as usize..self.trie_at[i + 1] as usize]
    }

    /// The masks already computed for regular expressions' states.
    pub(crate) fn regex_masks(&self) -> &crate::mask_cache::Masks<crate::regex_mode::MaskKey> {
        &self.regex_masks
    }

    /// The masks already computed for context-free grammars' states.
    pub(crate) fn ebnf_masks(&self) -> &crate::mask_cache::Masks<crate::ebnf::MaskKey> {
        &self.ebnf_masks
    }

    /// The stop tokens.
    pub(crate) fn stops(&self) -> &[u32] {
        &self.stops
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
