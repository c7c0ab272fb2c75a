//! A sequence's way out: sampled token → detokenizer (whole UTF-8 characters) → stop-string
//! check (text that could still become a stop string is held back) → text deltas.

use kernels::tokenizer::{Detokenizer, Tokenizer};

/// Turns sampled tokens into text to send, and finds where generation must stop.
pub struct TextOut {
    detok: Detokenizer,
    stop: Vec<String>,
    /// The stop string that ends the text is kept in it (vLLM's
    /// `include_stop_str_in_output`).
    keep_stop: bool,
    /// Special tokens have no text (vLLM's `skip_special_tokens`, its default); else their
    /// text is written (`<|im_start|>`).
    skip_special: bool,
    held: String,
}

/// What one token produced.
pub struct Emit {
    pub text: String,
    /// A stop string was reached: generation ends (its text is not emitted, unless kept).
    pub stopped: bool,
}

impl TextOut {
    pub fn new(stop: Vec<String>, keep_stop: bool, skip_special: bool) -> Self {
        Self {
            detok: Detokenizer::default(),
            stop,
            keep_stop,
            skip_special,
            held: String::new(),
        }
    }

    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Emit {
        if self.skip_special && tok.is_control(id) {
            return Emit {
                text: String::new(),
                stopped: false,
            };
        }
        let piece = self.detok.push(tok.token_bytes(id));
        self.held.push_str(&piece);
        // The first stop string met (the first listed of those met at one place).
        if let Some((at, len)) = self
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s.len())))
            .min_by_key(|m| m.0)
        {
            self.held
                .truncate(if self.keep_stop { at + len } else { at });
            return Emit {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let keep = self
            .stop
            .iter()
            .map(|s| {
                (1..s.len().min(self.held.len()) + 1)
                    .rev()
                    .find(|&k| {
                        self.held.is_char_boundary(self.held.len() - k)
                            && s.is_char_boundary(k)
                            && self.held.ends_with(&s[..k])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let emit_to = self.held.len() - keep;
        let text = self.held[..emit_to].to_string();
        self.held.drain(..emit_to);
        Emit {
            text,
            stopped: false,
        }
    }

    /// What was held back as a possible stop string's start, released (the text after it
    /// is told apart from it: a reasoning model's answer after its thinking).
    pub fn release(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// End of generation for another reason: release what was held.
    pub fn finish(&mut self) -> String {
        let mut s = std::mem::take(&mut self.held);
        s.push_str(&self.detok.finish());
        s
    }
}
