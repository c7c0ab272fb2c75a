//! A reasoning model's thinking, told apart from its answer token by token: models that
//! think inside `<think>` … `</think>` (Qwen3, QwQ, DeepSeek-R1 and its distillations)
//! have both markers as tokens of their vocabulary, so the split is exact at the token
//! where it happens, never a guess over text. The engine sends the thinking as reasoning
//! deltas (the API's `reasoning_content`), the rest as the answer; the markers themselves
//! are not sent.
//!
//! Where a chat starts: its prompt may already open the block (QwQ's and DeepSeek-R1's
//! templates end the assistant's turn header with `<think>\n`): then everything up to the
//! model's `</think>` is thinking. Otherwise the answer is plain unless its first token is
//! `<think>` (Qwen3 in thinking mode); a prompt that closes the block itself (Qwen3 with
//! `enable_thinking: false`) starts with the answer.

use kernels::tokenizer::Tokenizer;

/// The markers' token ids, where the vocabulary has both as tokens of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Markers {
    pub start: u32,
    pub end: u32,
}

impl Markers {
    /// `<think>` and `</think>`, each one added (special or user-defined) token of `tok`.
    pub fn of(tok: &Tokenizer) -> Option<Self> {
        let one = |text: &str| match tok.encode(text).ok()?.as_slice() {
            &[id] if tok.is_special(id) => Some(id),
            _ => None,
        };
        Some(Self {
            start: one("<think>")?,
            end: one("</think>")?,
        })
    }
}

/// Where a sequence's generated tokens stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No token yet, and the prompt left no block open: a first `<think>` opens one.
    First,
    /// Inside the thinking block.
    Thinking,
    /// The answer (the block closed, or there was none).
    Answer,
}

/// What a generated token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A marker, which opened or closed the block: no text.
    Marker,
    /// Thinking: its text goes out as reasoning.
    Thinking,
    /// The answer's.
    Answer,
}

/// One sequence's split.
#[derive(Debug, Clone)]
pub struct Reasoning {
    markers: Markers,
    phase: Phase,
    /// Newlines right after the block are dropped (templates put a blank line between the
    /// block and the answer, and drop it too when they render the turn back).
    trim: bool,
    /// Tokens of the block, its markers included (the usage's `reasoning_tokens`).
    pub tokens: u32,
}

impl Reasoning {
    /// The split of a sequence after `prompt` (its token ids): thinking from the start
    /// where the prompt's last marker opens a block.
    pub fn after_prompt(markers: Markers, prompt: &[u32]) -> Self {
        let open = prompt
            .iter()
            .rev()
            .find(|&&id| id == markers.start || id == markers.end)
            == Some(&markers.start);
        Self {
            markers,
            phase: if open { Phase::Thinking } else { Phase::First },
            trim: false,
            tokens: 0,
        }
    }

    /// Takes the next generated token: what it is.
    pub fn next(&mut self, id: u32) -> Kind {
        let m = self.markers;
        match self.phase {
            Phase::First if id == m.start => {
                self.phase = Phase::Thinking;
                self.tokens += 1;
                Kind::Marker
            }
            Phase::Thinking if id == m.end => {
                self.phase = Phase::Answer;
                self.trim = true;
                self.tokens += 1;
                Kind::Marker
            }
            Phase::Thinking => {
                self.tokens += 1;
                Kind::Thinking
            }
            Phase::First | Phase::Answer => {
                self.phase = Phase::Answer;
                Kind::Answer
            }
        }
    }

    /// Whether the sequence is thinking now (its next token is not the answer's yet, so
    /// that a grammar for the answer waits).
    pub fn thinking(&self) -> bool {
        self.phase == Phase::Thinking
    }

    /// The answer's `text` as sent: without the newlines that follow the block.
    pub fn answer_text(&mut self, text: String) -> String {
        if !self.trim {
            return text;
        }
        let rest = text.trim_start_matches(['\n', '\r']);
        // Until the answer's first other character.
        self.trim = rest.is_empty();
        rest.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: Markers = Markers { start: 7, end: 8 };

    fn kinds(r: &mut Reasoning, ids: &[u32]) -> Vec<Kind> {
        ids.iter().map(|&id| r.next(id)).collect()
    }

    #[test]
    fn a_first_think_token_opens_the_block_and_its_end_closes_it() {
        use Kind::*;
        let mut r = Reasoning::after_prompt(M, &[1, 2, 3]);
        assert!(!r.thinking());
        assert_eq!(
            kinds(&mut r, &[7, 1, 2, 8, 3, 7, 8]),
            [Marker, Thinking, Thinking, Marker, Answer, Answer, Answer]
        );
        assert_eq!(r.tokens, 4, "the block's tokens, markers included");
        assert!(!r.thinking());
    }

    #[test]
    fn without_a_first_think_token_everything_is_the_answer() {
        let mut r = Reasoning::after_prompt(M, &[1]);
        assert_eq!(kinds(&mut r, &[1, 7, 2, 8]), [Kind::Answer; 4]);
        assert_eq!(r.tokens, 0);
    }

    #[test]
    fn a_prompt_that_opens_the_block_starts_the_answer_thinking() {
        use Kind::*;
        let mut r = Reasoning::after_prompt(M, &[8, 1, 7, 4]);
        assert!(r.thinking());
        assert_eq!(
            kinds(&mut r, &[1, 7, 8, 2]),
            [Thinking, Thinking, Marker, Answer]
        );
        // A prompt whose last marker closes a block (thinking switched off) does not.
        let r = Reasoning::after_prompt(M, &[7, 4, 8, 1]);
        assert!(!r.thinking());
    }

    #[test]
    fn newlines_after_the_block_are_dropped_once() {
        let mut r = Reasoning::after_prompt(M, &[7]);
        r.next(8);
        assert_eq!(r.answer_text("\n".into()), "");
        assert_eq!(r.answer_text("\n\nHi\n".into()), "Hi\n");
        assert_eq!(r.answer_text("\nthere".into()), "\nthere");
    }
}
