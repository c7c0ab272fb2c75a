//! The tokenizer, built from GGUF metadata: byte-level BPE (`tokenizer.ggml.model =
//! gpt2`) with the pre-tokenizer the file names ([`Pre`]: SmolLM's, GPT-2's, Llama 3's,
//! Qwen2's, GPT-4o's) or
//! SentencePiece's BPE (`llama`: Llama 2, Mistral 7B; [`spm`]), special tokens from the
//! token types, and a streaming detokenizer that emits only whole UTF-8 characters across
//! token boundaries.

pub mod spm;

use crate::gguf::{Gguf, GgufError, Value};
use std::collections::HashMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

/// The text split a byte-level BPE file asks for before its merges
/// (`tokenizer.ggml.pre`, llama.cpp's names), as the model's own `tokenizer.json` does it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pre {
    /// GPT-2's split (`gpt-2`, or `default` where the file names none).
    Gpt2,
    /// Digits one a piece, then GPT-2's split (`smollm`: SmolLM and SmolLM2).
    Smollm,
    /// Llama 3's split (`llama-bpe`; `llama3`, `smaug-bpe` the same): numbers in pieces of
    /// up to three digits, a letter run with the one non-letter before it, line breaks
    /// apart from other spaces; then bytes as GPT-2's characters, unsplit again.
    Llama3,
    /// Qwen2's split (`qwen2`: Qwen2, Qwen2.5, QwQ): Llama 3's with every digit a piece
    /// of its own.
    Qwen2,
    /// GPT-4o's split (`gpt-4o`: o200k's, Phi-4-mini's): Llama 3's, but a word's capitals
    /// start a piece of their own ("Hello" "World" from "HelloWorld"), a contraction stays
    /// with its word, and a run of punctuation takes the slashes after it.
    Gpt4o,
}

/// Llama 3's split, as its `tokenizer.json` gives it (llama.cpp's `LLAMA3` pre-tokenizer).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-4o's split, as Phi-4-mini's `tokenizer.json` gives it (llama.cpp's `GPT4O`
/// pre-tokenizer).
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split, as its `tokenizer.json` gives it (llama.cpp's `QWEN2` pre-tokenizer).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Pre {
    /// The split `tokenizer.ggml.pre` names; an error for one this tokenizer does not have.
    pub fn from_name(name: &str) -> Result<Self, TokenizerError> {
        Ok(match name {
            "smollm" => Pre::Smollm,
            "gpt-2" | "default" => Pre::Gpt2,
            "llama-bpe" | "llama3" | "smaug-bpe" => Pre::Llama3,
            "qwen2" => Pre::Qwen2,
            "gpt-4o" => Pre::Gpt4o,
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "pre-tokenizer {other:?} (supported: smollm, gpt-2, llama-bpe, qwen2, gpt-4o)"
                )))
            }
        })
    }

    /// Sets `tk`'s pre-tokenizer to this split.
    fn install(self, tk: &mut HfTokenizer) -> Result<(), TokenizerError> {
        match self {
            Pre::Gpt2 => {
                tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            }
            Pre::Smollm => {
                tk.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, true, true).into(),
                ])));
            }
            Pre::Llama3 | Pre::Qwen2 | Pre::Gpt4o => {
                let regex = match self {
                    Pre::Llama3 => LLAMA3_SPLIT,
                    Pre::Qwen2 => QWEN2_SPLIT,
                    _ => GPT4O_SPLIT,
                };
                let split = Split::new(
                    SplitPattern::Regex(regex.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| TokenizerError::Build(format!("{self:?}'s split: {e}")))?;
                tk.with_pre_tokenizer(Some(Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])));
            }
        }
        Ok(())
    }
}

/// GGUF token types.
const TOKEN_NORMAL: i64 = 1;
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;
const TOKEN_BYTE: i64 = 6;

/// How text becomes ids: the file's model.
enum Model {
    /// Byte-level BPE through Hugging Face's tokenizer.
    Bpe(Box<HfTokenizer>),
    /// SentencePiece's BPE over scores.
    Spm(Box<spm::Spm>),
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{0}")]
    Gguf(#[from] GgufError),
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Build(String),
}

pub struct Tokenizer {
    inner: Model,
    /// Each token's bytes (byte-level or SentencePiece decoded); special tokens map to
    /// their text.
    token_bytes: Vec<Vec<u8>>,
    special: Vec<bool>,
    /// The special tokens Hugging Face calls special (control and unknown tokens, not the
    /// user-defined ones such as Qwen3's `<think>`): what `skip_special_tokens` leaves out.
    control: Vec<bool>,
    pub bos: Option<u32>,
    /// Whether a prompt begins with [`Tokenizer::bos`] ([`Tokenizer::encode_prompt`]).
    add_bos: bool,
    pub eos: u32,
    /// Tokens that end generation (EOS and the chat turn end).
    pub stop_tokens: Vec<u32>,
    pub chat_template: Option<String>,
}

/// GPT-2's byte ↔ printable-character table: byte b is written as `table[b]`.
pub fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (b'!' as u32..=b'~' as u32).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            let c = char::from_u32(256 + n).unwrap_or('?');
            n += 1;
            c
        };
    }
    table
}

impl Tokenizer {
    pub fn from_gguf(g: &Gguf) -> Result<Self, TokenizerError> {
        let model = g.get_str("tokenizer.ggml.model")?;
        let tokens = g.get_strings("tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) => a
                .iter()
                .map(|v| match v {
                    Value::I32(x) => *x as i64,
                    other => other.as_u64().map(|x| x as i64).unwrap_or(1),
                })
                .collect(),
            None => vec![1; tokens.len()],
        };
        let ty = |i: usize| types.get(i).copied().unwrap_or(TOKEN_NORMAL);
        let id = |k: &str| g.get_u64(k).ok().map(|v| v as u32);
        let flag = |k: &str| match g.get(k) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        };
        let (inner, special, token_bytes, add_bos) = match model {
            "gpt2" => {
                let pre = Pre::from_name(g.get_str("tokenizer.ggml.pre").unwrap_or("default"))?;
                let special: Vec<bool> = (0..tokens.len())
                    .map(|i| matches!(ty(i), TOKEN_CONTROL | TOKEN_USER_DEFINED))
                    .collect();
                let inner = Self::bpe(g, &tokens, &special, pre)?;
                let mut from_char = HashMap::new();
                for (b, c) in byte_to_char().iter().enumerate() {
                    from_char.insert(*c, b as u8);
                }
                let token_bytes = tokens
                    .iter()
                    .zip(&special)
                    .map(|(t, &s)| {
                        if s {
                            t.as_bytes().to_vec()
                        } else {
                            t.chars()
                                .map(|c| from_char.get(&c).copied().unwrap_or(b'?'))
                                .collect()
                        }
                    })
                    .collect();
                // The file's word, else llama.cpp's default for the split: Llama 3's
                // models were trained with every text after the BOS token.
                let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(pre == Pre::Llama3);
                (Model::Bpe(Box::new(inner)), special, token_bytes, add_bos)
            }
            "llama" => {
                let scores: Vec<f32> = g
                    .get("tokenizer.ggml.scores")
                    .and_then(Value::as_array)
                    .ok_or_else(|| TokenizerError::Build("missing tokenizer.ggml.scores".into()))?
                    .iter()
                    .map(|v| v.as_f64().unwrap_or(0.0) as f32)
                    .collect();
                // llama.cpp's special tokens for this model: control, user-defined and
                // the unknown token, each split out of text whole.
                let special: Vec<bool> = (0..tokens.len())
                    .map(|i| matches!(ty(i), TOKEN_CONTROL | TOKEN_USER_DEFINED | TOKEN_UNKNOWN))
                    .collect();
                let add_space_prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let spm = spm::Spm::new(
                    &tokens,
                    scores,
                    |i| ty(i) == TOKEN_BYTE,
                    |i| special[i],
                    id("tokenizer.ggml.unknown_token_id"),
                    add_space_prefix,
                )
                .map_err(TokenizerError::Build)?;
                let token_bytes = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| match ty(i) {
                        TOKEN_NORMAL => t.replace(spm::SPACE, " ").into_bytes(),
                        TOKEN_BYTE => spm::byte_piece(t)
                            .map(|b| vec![b])
                            .unwrap_or_else(|| t.as_bytes().to_vec()),
                        _ => t.as_bytes().to_vec(),
                    })
                    .collect();
                let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(true);
                (Model::Spm(Box::new(spm)), special, token_bytes, add_bos)
            }
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "tokenizer.ggml.model = {other:?} (byte-level BPE `gpt2` and \
                     SentencePiece's `llama` only)"
                )))
            }
        };
        let control = (0..tokens.len())
            .map(|i| matches!(ty(i), TOKEN_CONTROL | TOKEN_UNKNOWN))
            .collect();
        let eos = id("tokenizer.ggml.eos_token_id")
            .ok_or_else(|| TokenizerError::Build("missing tokenizer.ggml.eos_token_id".into()))?;
        let mut stop_tokens = vec![eos];
        // The turn and text ends of the chat formats: ChatML's, GPT-2's, Llama 3's (its
        // end of turn, of a tool call's message, and of text), Phi-3's and Gemma's ends of
        // turn.
        for name in [
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|end_of_text|>",
            "<|end|>",
            "<end_of_turn>",
        ] {
            if let Some(&i) = tokens.iter().position(|t| *t == name).as_ref() {
                let i = i as u32;
                if !stop_tokens.contains(&i) {
                    stop_tokens.push(i);
                }
            }
        }
        Ok(Self {
            inner,
            token_bytes,
            special,
            control,
            bos: id("tokenizer.ggml.bos_token_id"),
            add_bos,
            eos,
            stop_tokens,
            chat_template: g
                .get_str("tokenizer.chat_template")
                .ok()
                .map(str::to_string),
        })
    }

    /// Hugging Face's byte-level BPE over the file's merges, with `pre`'s split.
    fn bpe(
        g: &Gguf,
        tokens: &[&str],
        special: &[bool],
        pre: Pre,
    ) -> Result<HfTokenizer, TokenizerError> {
        let merges: Vec<(String, String)> = g
            .get_strings("tokenizer.ggml.merges")
            .unwrap_or_default()
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| TokenizerError::Build(format!("bad merge {m:?}")))
            })
            .collect::<Result<_, _>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            // Llama 3's model takes a piece that is a token whole, merges or not (its
            // `tokenizer.json`'s `ignore_merges`, as llama.cpp does for it).
            .ignore_merges(pre == Pre::Llama3)
            .build()
            .map_err(|e| TokenizerError::Build(e.to_string()))?;
        let mut inner = HfTokenizer::new(bpe);
        pre.install(&mut inner)?;
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(special)
            .filter(|(_, s)| **s)
            .map(|(t, _)| AddedToken::from(t.to_string(), true))
            .collect();
        inner.add_special_tokens(&specials);
        Ok(inner)
    }

    /// Token ids of `text`; special-token text (`<|im_start|>`) becomes its special id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match &self.inner {
            Model::Bpe(hf) => hf
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Build(e.to_string())),
            Model::Spm(spm) => {
                let mut ids = Vec::with_capacity(text.len() / 3 + 1);
                spm.encode(text, &mut ids);
                Ok(ids)
            }
        }
    }

    /// Token ids of a prompt's text (a completion's prompt, a rendered chat): [`encode`]'s,
    /// after the BOS token where the file asks for one (`tokenizer.ggml.add_bos_token`,
    /// true by default for Llama 3's split) and the text does not begin with it already (a
    /// chat template that writes `bos_token`).
    ///
    /// [`encode`]: Tokenizer::encode
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = self.encode(text)?;
        if let Some(bos) = self.bos.filter(|_| self.add_bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// The text of `ids` (special tokens included as text). SentencePiece's leading space
    /// (the one the encoder put before the text) is dropped, as its decoder does: text
    /// encodes and decodes back to itself.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i))
            .copied()
            .collect();
        if let (Model::Spm(spm), Some(&first)) = (&self.inner, ids.first()) {
            if spm.adds_space_prefix() && !self.is_special(first) && bytes.first() == Some(&b' ') {
                bytes.remove(0);
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Whether `id` is a control (or the unknown) token: a special token as Hugging Face
    /// counts them (`skip_special_tokens` leaves it out), where user-defined tokens
    /// (Qwen3's `<think>`) are text.
    pub fn is_control(&self, id: u32) -> bool {
        self.control.get(id as usize).copied().unwrap_or(false)
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }
}

/// Streams text out of token ids, holding back bytes until they form whole characters.
#[derive(Default)]
pub struct Detokenizer {
    pending: Vec<u8>,
}

impl Detokenizer {
    /// Adds one token's bytes; returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) => match e.error_len() {
                // Invalid (not just incomplete) bytes: replace them and move on.
                Some(_) => {
                    let s = String::from_utf8_lossy(&self.pending).into_owned();
                    self.pending.clear();
                    return s;
                }
                None => e.valid_up_to(),
            },
        };
        let out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        out
    }

    /// Whatever is left at the end (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detokenizer_holds_partial_utf8() {
        let mut d = Detokenizer::default();
        let e = "é".as_bytes();
        assert_eq!(d.push(&[b'a', e[0]]), "a");
        assert_eq!(d.push(&[e[1]]), "é");
        let crab = "🦀".as_bytes();
        assert_eq!(d.push(&crab[..1]), "");
        assert_eq!(d.push(&crab[1..3]), "");
        assert_eq!(d.push(&crab[3..]), "🦀");
        assert_eq!(d.push(&[0xff]), "\u{fffd}");
        assert_eq!(d.push(&crab[..2]), "");
        assert_eq!(d.finish(), "\u{fffd}");
    }

    /// The pieces `pre`'s split makes of `text` (before their bytes become GPT-2's
    /// characters).
    fn pieces(pre: Pre, text: &str) -> Vec<String> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let mut tk = HfTokenizer::new(BPE::default());
        pre.install(&mut tk).expect("installs");
        let mut s = PreTokenizedString::from(text);
        tk.get_pre_tokenizer()
            .expect("set")
            .pre_tokenize(&mut s)
            .expect("splits");
        let bytes = byte_to_char();
        let from: HashMap<char, u8> = bytes
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(p, _, _)| {
                let raw: Vec<u8> = p.chars().map(|c| from[&c]).collect();
                String::from_utf8(raw).expect("utf-8")
            })
            .collect()
    }

    /// GPT-4o's split (o200k's regex, as Phi-4-mini's `tokenizer.json` has it) where it
    /// parts from Llama 3's: capitals, contractions, slashes after punctuation.
    #[test]
    fn gpt4o_splits_words_at_their_capitals_and_keeps_contractions() {
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("HelloWorld", &["Hello", "World"], &["HelloWorld"]),
            ("fooBAR baz", &["foo", "BAR", " baz"], &["fooBAR", " baz"]),
            ("HTTPServer", &["HTTPServer"], &["HTTPServer"]),
            ("don't", &["don't"], &["don", "'t"]),
            ("I'M here", &["I'M", " here"], &["I", "'M", " here"]),
            ("12345", &["123", "45"], &["123", "45"]),
            ("a+/ b", &["a", "+/", " b"], &["a", "+/", " b"]),
            ("a.\n/b", &["a", ".\n/", "b"], &["a", ".\n", "/b"]),
            (
                "end.\n\n  next",
                &["end", ".\n\n", " ", " next"],
                &["end", ".\n\n", " ", " next"],
            ),
            (
                "Ünïcode Straße",
                &["Ünïcode", " Straße"],
                &["Ünïcode", " Straße"],
            ),
        ];
        for (text, gpt4o, llama3) in cases {
            assert_eq!(pieces(Pre::Gpt4o, text), *gpt4o, "gpt-4o: {text:?}");
            assert_eq!(pieces(Pre::Llama3, text), *llama3, "llama-bpe: {text:?}");
        }
        assert_eq!(Pre::from_name("gpt-4o").expect("known"), Pre::Gpt4o);
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = byte_to_char();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }
}
