//! Speculative decoding by prompt lookup: a decoding sequence whose last tokens already occurred earlier in its context
//! (its prompt or its answer) proposes the tokens that followed them there as its next
//! ones ([`propose`]), and the next step computes its last token and those drafts
//! together, a logits row each. The rows are drawn in order, each by the sequence's own
//! rule (seed and step, penalties, JSON mode), and kept while each draw is the draft that
//! its row was computed after ([`super::run::Engine::verify`]). On the CPU the host draws
//! them. On the GPU path the device draws every row at once, each at the step of the
//! sequence's seed it would be drawn at were the drafts before it kept, and only tokens
//! come back; a sequence with penalties or JSON mode has its rows read back and drawn on
//! the host, each adjusted by the draws before it.
//!
//! **The answer does not change.** A draw whose row follows a kept draft is the draw the
//! sequence would have made a step later: the same logits (a row's result does not depend
//! on the rows beside it), the same rule, the same step of its seed. The first draw that
//! differs from its draft is kept too (it is the sequence's own token), and the rows
//! after it are dropped with the drafts they followed; their keys and values lie past the
//! sequence's computed positions, written again by the step that computes them. So a
//! sampled answer is the one it would be without speculation, token for token, and a
//! step yields from one token to all its drafts and one more.
//!
//! A draft costs a row of compute in the step. On the CPU a step's time grows with its
//! rows, so drafts are proposed only while one sequence runs ([`MAX_SEQS`]) and none
//! waits: beside other sequences' rows, a draft's row is better spent on them (two or four
//! sequences at once lost 5–10 % with drafts, BENCHMARKS.md). A request's own prediction
//! ([`super::prediction`]), whose drafts are kept far more often, drafts while up to
//! [`MAX_PREDICTED_SEQS`] run. A sequence whose drafts keep missing proposes less often
//! ([`backoff`]).
//!
//! Where the backend plans a step while the one before runs (the GPU), a sequence's last
//! token is on the device until its step is collected; a sequence due to propose has that
//! step collected first, and a step computing drafts is collected before the next is
//! planned (it decides where the next one starts). So each look costs the device the
//! overlap of one step, and finding nothing backs off as a miss does. A step of one
//! sequence's last token and drafts replays a CUDA graph of its row count, as a decode
//! step replays its bucket's.

/// The longest and shortest run of last tokens looked up (llama.cpp's and vLLM's prompt
/// lookup take 1 to 3 or so): a longer match is tried first, as its continuation is
/// likelier to be the sequence's.
pub(super) const LONGEST: usize = 4;
pub(super) const SHORTEST: usize = 2;

/// Most sequences running at once for drafts to be proposed: one, the latency case.
pub(super) const MAX_SEQS: usize = 1;

/// Most sequences running at once for a prediction's drafts to be proposed on a backend
/// that does not plan steps ahead (the CPU).
pub(super) const MAX_PREDICTED_SEQS: usize = 4;

/// Steps a sequence waits before it proposes again after `misses` steps in a row whose
/// drafts it kept none of: 2, 4, 8, then 16 at most. Text that does not repeat its
/// context (a poem, an answer in the model's own words) stops costing rows, and text
/// that does (a quote, code edited in place) is found again within 16 steps.
pub(super) fn backoff(misses: u32) -> u32 {
    1 << misses.clamp(1, 4)
}

/// Up to `k` tokens proposed to follow `tokens`: those that followed the latest earlier
/// occurrence of its last `LONGEST` tokens (then of fewer, down to `SHORTEST`), repeated
/// where they reach the sequence's end; none when they occur nowhere before. The tokens
/// from that occurrence to the end are a loop the text is in: once they follow it again,
/// its last tokens are the same and so is what follows (a run of one token repeated
/// proposes that token `k` times, not once).
pub(super) fn propose(tokens: &[u32], k: usize) -> Vec<u32> {
    let len = tokens.len();
    if k == 0 {
        return Vec::new();
    }
    for n in (SHORTEST..=LONGEST.min(len.saturating_sub(1))).rev() {
        let tail = &tokens[len - n..];
        // The latest earlier start, so that what follows is the freshest context; a match
        // must leave at least one token after it.
        if let Some(start) = (0..len - n).rev().find(|&p| &tokens[p..p + n] == tail) {
            let from = start + n;
            let period = len - from;
            return (0..k).map(|i| tokens[from + i % period]).collect();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tokens_after_the_latest_earlier_run_of_the_last_ones_are_proposed() {
        // "a b c d | x a b c" → after the last "a b c": "d x a".
        let t = [1, 2, 3, 4, 9, 1, 2, 3];
        assert_eq!(propose(&t, 3), [4, 9, 1]);
        assert_eq!(propose(&t, 1), [4]);
        // Past the sequence's end, the loop from the match on goes round again.
        assert_eq!(propose(&t, 7), [4, 9, 1, 2, 3, 4, 9]);
        // The latest earlier occurrence wins: 5 6 7 then 5 6 8, last "5 6" → 8.
        let t = [5, 6, 7, 5, 6, 8, 0, 5, 6];
        assert_eq!(propose(&t, 1), [8]);
        // A longer match first: "1 2 3" is followed by 4 once, "2 3" by 7 later.
        let t = [1, 2, 3, 4, 2, 3, 7, 1, 2, 3];
        assert_eq!(propose(&t, 2), [4, 2]);
        // A run of one token repeated: its own continuation, as far as asked; a loop of
        // two tokens, both in turn.
        assert_eq!(propose(&[7, 7, 7, 7], 3), [7, 7, 7]);
        assert_eq!(propose(&[1, 2, 1, 2, 1], 4), [2, 1, 2, 1]);
    }

    #[test]
    fn missing_drafts_back_off_up_to_16_steps() {
        let waits: Vec<u32> = (1..7).map(backoff).collect();
        assert_eq!(waits, [2, 4, 8, 16, 16, 16]);
    }

    #[test]
    fn nothing_is_proposed_without_an_earlier_match() {
        assert!(propose(&[1, 2, 3, 4, 5], 4).is_empty());
        assert!(
            propose(&[1, 2, 1, 3], 4).is_empty(),
            "one token alone is no match"
        );
        assert!(propose(&[1], 4).is_empty());
        assert!(propose(&[], 4).is_empty());
        assert!(propose(&[1, 2, 1, 2], 0).is_empty(), "none asked");
    }
}
