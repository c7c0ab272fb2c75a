//! Predicted outputs (OpenAI's chat `prediction`): drafts for speculative decoding taken
//! from text the client expects much of the answer to repeat, such as a file edited in
//! place. The answer is followed along the prediction token by token. While it agrees,
//! the prediction's next tokens are the drafts ([`Prediction::propose`]); the step checks
//! them as it checks prompt lookup's ([`super::speculate`]), so the answer is the one it
//! would be without a prediction.
//!
//! Where the answer leaves the prediction (an edit), its last few tokens are looked up in
//! the prediction again: first ahead of where it left (text inserted or replaced, then
//! the prediction resumes; or text dropped), the nearest first, then behind it. How many
//! drafts a step takes grows while all are kept and shrinks when some are not
//! ([`Prediction::settle`]): a step's rows are spent where the answer is following the
//! prediction, and a miss at an edit costs a few rows, not the full run.

use super::speculate::{LONGEST, SHORTEST};

/// Drafts a prediction proposes at first, and the fewest it shrinks to after a miss.
const FIRST: usize = 4;
const FEWEST: usize = 2;

/// A sequence's prediction and where its answer stands in it.
pub(super) struct Prediction {
    tokens: Vec<u32>,
    /// The prediction's position the answer's next token is expected at, while the answer
    /// follows it; `None` once it left it, until its last tokens are found again.
    at: Option<usize>,
    /// Where the answer last left the prediction: looked ahead of first.
    left: usize,
    /// The answer's tokens followed so far.
    seen: usize,
    /// Drafts to propose next.
    k: usize,
    /// Drafts of the step being computed, from this prediction (0: none).
    proposed: usize,
    /// Drafts kept in the answer, and drafts computed and not kept.
    pub(super) accepted: u32,
    pub(super) rejected: u32,
}

impl Prediction {
    /// A prediction of `tokens`; the answer is expected to start with them.
    pub(super) fn new(tokens: Vec<u32>) -> Self {
        Self {
            tokens,
            at: Some(0),
            left: 0,
            seen: 0,
            k: FIRST,
            proposed: 0,
            accepted: 0,
            rejected: 0,
        }
    }

    /// Up to `most` drafts to follow `answer` (the sequence's generated tokens, all known):
    /// the prediction's tokens after where the answer stands in it. None where the answer
    /// left it and its last tokens occur nowhere in it.
    pub(super) fn propose(&mut self, answer: &[u32], most: usize) -> Vec<u32> {
        for &t in answer.get(self.seen..).unwrap_or_default() {
            self.at = match self.at {
                Some(a) if self.tokens.get(a) == Some(&t) => Some(a + 1),
                Some(a) => {
                    self.left = a;
                    None
                }
                None => None,
            };
        }
        self.seen = answer.len();
        if self.at.is_none() {
            self.at = self.anchor(answer);
        }
        let drafts: Vec<u32> = match self.at {
            Some(a) => self.tokens[a.min(self.tokens.len())..]
                .iter()
                .take(self.k.min(most))
                .copied()
                .collect(),
            None => Vec::new(),
        };
        self.proposed = drafts.len();
        drafts
    }

    /// Where the answer's last tokens (the longest run of `LONGEST` down to `SHORTEST` found)
    /// occur in the prediction with a token after them: the position after that run, the
    /// nearest at or past where the answer left the prediction, else the nearest before.
    fn anchor(&self, answer: &[u32]) -> Option<usize> {
        let len = self.tokens.len();
        for n in (SHORTEST..=LONGEST.min(answer.len())).rev() {
            let tail = &answer[answer.len() - n..];
            let ends_here = |p: &usize| self.tokens[p - n..*p] == *tail;
            let ahead = (self.left.max(n)..len).find(ends_here);
            if let Some(p) = ahead.or_else(|| (n..self.left.min(len)).rev().find(ends_here)) {
                return Some(p);
            }
        }
        None
    }

    /// Counts the step's drafts from this prediction, `computed` of them computed (a step
    /// may take fewer than proposed) and `kept` of those kept, and sizes the next proposal:
    /// twice as many (up to `most`) when all were kept, else one more than were kept (at
    /// least [`FEWEST`]).
    pub(super) fn settle(&mut self, computed: usize, kept: usize, most: usize) {
        let proposed = std::mem::take(&mut self.proposed).min(computed);
        if proposed == 0 {
            return;
        }
        let kept = kept.min(proposed);
        self.accepted += kept as u32;
        self.rejected += (proposed - kept) as u32;
        self.k = if kept == proposed {
            (2 * self.k).min(most.max(FEWEST))
        } else {
            (kept + 1).clamp(FEWEST, most.max(FEWEST))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Proposes after `answer`, then settles as the answer's next tokens `next` keep them.
    fn step(p: &mut Prediction, answer: &mut Vec<u32>, next: &[u32], most: usize) -> Vec<u32> {
        let drafts = p.propose(answer, most);
        let kept = drafts.iter().zip(next).take_while(|(d, n)| d == n).count();
        p.settle(drafts.len(), kept, most);
        answer.extend_from_slice(next);
        drafts
    }

    #[test]
    fn an_answer_that_follows_the_prediction_is_drafted_its_next_tokens_more_each_step() {
        let pred: Vec<u32> = (100..160).collect();
        let mut p = Prediction::new(pred.clone());
        let mut answer = vec![100];
        // 4, then 8, then 16 (the most), each kept with the token after them.
        let d = step(&mut p, &mut answer, &pred[1..6], 16);
        assert_eq!(d, pred[1..5]);
        let d = step(&mut p, &mut answer, &pred[6..15], 16);
        assert_eq!(d, pred[6..14]);
        let d = step(&mut p, &mut answer, &pred[15..32], 16);
        assert_eq!(d, pred[15..31]);
        assert_eq!((p.accepted, p.rejected), (28, 0));
        // Capped by the room left too.
        assert_eq!(p.propose(&answer, 3), pred[32..35]);
    }

    #[test]
    fn an_answer_that_leaves_the_prediction_finds_it_again_after_an_edit() {
        // The prediction: 1..=30. The answer replaces 10 11 12 by 90 91, then goes on.
        let pred: Vec<u32> = (1..=30).collect();
        let mut p = Prediction::new(pred.clone());
        let mut answer: Vec<u32> = (1..=9).collect();
        assert_eq!(p.propose(&answer, 4), [10, 11, 12, 13]);
        // The step drew 90 instead of 10: nothing kept, and fewer next time.
        p.settle(4, 0, 16);
        assert_eq!(p.rejected, 4);
        answer.push(90);
        assert!(p.propose(&answer, 16).is_empty(), "90 occurs nowhere");
        answer.extend([91, 13, 14]);
        // "13 14" occurs after where the answer left: resumed from 15.
        assert_eq!(p.propose(&answer, 16), [15, 16]);
        p.settle(2, 2, 16);
        assert_eq!(p.accepted, 2);
    }

    #[test]
    fn a_repeated_run_is_found_ahead_of_where_the_answer_left_before_behind_it() {
        // "7 8" occurs at 2..4 and at 10..12; the answer leaves at 5 and writes "7 8".
        let pred = vec![1, 2, 7, 8, 3, 4, 5, 6, 0, 0, 7, 8, 9, 9];
        let mut p = Prediction::new(pred);
        let mut answer = vec![1, 2, 7, 8, 3];
        assert_eq!(p.propose(&answer, 2), [4, 5]);
        p.settle(2, 0, 16);
        answer.extend([50, 7, 8]);
        assert_eq!(p.propose(&answer, 2), [9, 9], "ahead first");
        // Left past its end: the run behind is the nearest.
        let mut p = Prediction::new(vec![1, 7, 8, 2, 3]);
        let answer = vec![1, 7, 8, 2, 3, 4, 7, 8];
        assert_eq!(p.propose(&answer, 2), [2, 3]);
    }

    #[test]
    fn an_answer_that_starts_elsewhere_is_drafted_once_its_tokens_occur() {
        let mut p = Prediction::new(vec![5, 6, 7, 8, 9]);
        assert!(p.propose(&[1], 4).is_empty());
        assert_eq!(p.proposed, 0);
        assert!(p.propose(&[1, 2, 6], 4).is_empty(), "one token is no match");
        assert_eq!(p.propose(&[1, 2, 6, 5, 6], 4), [7, 8, 9]);
        assert_eq!(p.proposed, 3);
        // At the prediction's end, nothing more to propose.
        assert!(p.propose(&[1, 2, 6, 5, 6, 7, 8, 9], 4).is_empty());
    }
}
