//! vLLM's `bad_words`: token sequences an answer never has. Each word is tokenized as
//! vLLM tokenizes it: as written (less its leading spaces), and after one space (the same
//! word inside a text) where that gives as many tokens, beginning with another. The last
//! token of each sequence is refused wherever the answer so far ends with the tokens
//! before it: always, for a word of one token.

use kernels::tokenizer::Tokenizer;

/// A request's bad words, as token sequences (each at least one token, none twice).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BadWords {
    seqs: Vec<Vec<u32>>,
}

impl BadWords {
    /// The token sequences of `words` in `tok`'s vocabulary; `None` where there are none.
    pub(crate) fn new(words: &[String], tok: &Tokenizer) -> Result<Option<Self>, String> {
        let mut seqs: Vec<Vec<u32>> = Vec::new();
        for w in words {
            let word = w.trim_start();
            let plain = tok.encode(word).map_err(|e| e.to_string())?;
            let spaced = tok.encode(&format!(" {word}")).map_err(|e| e.to_string())?;
            let inside = spaced.len() == plain.len() && spaced.first() != plain.first();
            for ids in [Some(plain), inside.then_some(spaced)]
                .into_iter()
                .flatten()
            {
                if !ids.is_empty() && !seqs.contains(&ids) {
                    seqs.push(ids);
                }
            }
        }
        Ok((!seqs.is_empty()).then_some(Self { seqs }))
    }

    /// Whether a sequence is longer than one token: which tokens are refused then depends
    /// on the answer's last tokens (its mask is made on the host once they are known).
    pub(crate) fn follow_the_answer(&self) -> bool {
        self.seqs.iter().any(|s| s.len() > 1)
    }

    /// The tokens refused next after `answer` (the tokens generated so far).
    pub(crate) fn refused<'a>(&'a self, answer: &'a [u32]) -> impl Iterator<Item = u32> + 'a {
        self.seqs.iter().filter_map(move |s| {
            let (last, before) = s.split_last()?;
            answer.ends_with(before).then_some(*last)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(seqs: &[&[u32]]) -> BadWords {
        BadWords {
            seqs: seqs.iter().map(|s| s.to_vec()).collect(),
        }
    }

    #[test]
    fn a_sequences_last_token_is_refused_only_after_the_ones_before_it() {
        let b = of(&[&[7], &[1, 2, 3], &[4, 5]]);
        let refused = |answer: &[u32]| {
            let mut r: Vec<u32> = b.refused(answer).collect();
            r.sort_unstable();
            r
        };
        assert_eq!(refused(&[]), vec![7]);
        assert_eq!(refused(&[9, 1, 2]), vec![3, 7]);
        assert_eq!(refused(&[1, 2, 9]), vec![7]);
        assert_eq!(refused(&[2]), vec![7]);
        assert_eq!(refused(&[1, 2, 4]), vec![5, 7]);
        assert!(b.follow_the_answer());
        assert!(!of(&[&[7], &[8]]).follow_the_answer());
    }
}
