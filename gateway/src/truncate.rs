//! `truncation: "auto"` (the Responses API): a conversation too long for the model's
//! context loses its oldest turns until it and its answer fit. System messages (the
//! instructions) and the last message stay; a tool result whose call was dropped goes
//! with it. The fewest turns are dropped: a binary search over how many, each try
//! counted by the caller (the pool's tokenizer through the chat template); the last try
//! that fits is the one chosen, so the caller may keep what it counted.

use crate::worker::ChatMessage;

/// `messages` without their `k` oldest droppable turns (and the tool results left at the
/// front without their call).
fn keep(messages: &[ChatMessage], droppable: &[usize], k: usize) -> Vec<ChatMessage> {
    let dropped = &droppable[..k];
    let mut front = true;
    let mut out = Vec::with_capacity(messages.len() - k);
    for (i, m) in messages.iter().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        let system = matches!(m.role.as_str(), "system" | "developer");
        if !system && front && k > 0 && m.role == "tool" && i + 1 < messages.len() {
            continue;
        }
        if !system {
            front = false;
        }
        out.push(m.clone());
    }
    out
}

/// The messages with the fewest oldest turns dropped for which `fits` holds; `None`
/// where they fit whole, or do not fit even with all but the last turn dropped (the
/// caller then sends them as they are, to be refused for their length).
pub fn truncated(
    messages: &[ChatMessage],
    mut fits: impl FnMut(&[ChatMessage]) -> bool,
) -> Option<Vec<ChatMessage>> {
    if fits(messages) {
        return None;
    }
    let last = messages.len().checked_sub(1)?;
    let droppable: Vec<usize> = (0..last)
        .filter(|&i| !matches!(messages[i].role.as_str(), "system" | "developer"))
        .collect();
    if droppable.is_empty() || !fits(&keep(messages, &droppable, droppable.len())) {
        return None;
    }
    // The least k in 1..=len that fits (len does).
    let (mut lo, mut hi) = (1, droppable.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if fits(&keep(messages, &droppable, mid)) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(keep(messages, &droppable, lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            open: false,
        }
    }

    fn chars(ms: &[ChatMessage]) -> usize {
        ms.iter().map(|m| m.content.len()).sum()
    }

    fn said(ms: &[ChatMessage]) -> Vec<&str> {
        ms.iter().map(|m| m.content.as_str()).collect()
    }

    #[test]
    fn the_oldest_turns_go_first_and_the_instructions_stay() {
        let ms = [
            m("system", "sys"),
            m("user", "aaaa"),
            m("assistant", "bbbb"),
            m("user", "cccc"),
            m("assistant", "dddd"),
            m("user", "eeee"),
        ];
        assert!(
            truncated(&ms, |k| chars(k) <= 23).is_none(),
            "it fits whole"
        );
        let mut tries = 0;
        let got = truncated(&ms, |k| {
            tries += 1;
            chars(k) <= 11
        })
        .expect("truncated");
        assert_eq!(said(&got), ["sys", "dddd", "eeee"]);
        assert!(tries <= 5, "a binary search: {tries} tries");
        let got = truncated(&ms, |k| chars(k) <= 19).expect("truncated");
        assert_eq!(said(&got), ["sys", "bbbb", "cccc", "dddd", "eeee"]);
        assert!(
            truncated(&ms, |k| chars(k) <= 6).is_none(),
            "not even the last turn fits"
        );
        let got = truncated(&ms, |k| chars(k) <= 7).expect("the last turn alone");
        assert_eq!(said(&got), ["sys", "eeee"]);
    }

    #[test]
    fn a_tool_result_goes_with_its_call() {
        let ms = [
            m("user", "aaaa"),
            m("assistant", "call"),
            m("tool", "rslt"),
            m("user", "eeee"),
        ];
        let got = truncated(&ms, |k| chars(k) <= 12).expect("truncated");
        assert_eq!(said(&got), ["call", "rslt", "eeee"]);
        let got = truncated(&ms, |k| chars(k) <= 11).expect("truncated");
        assert_eq!(said(&got), ["eeee"], "the result without its call goes too");
    }

    #[test]
    fn the_fewest_turns_are_dropped_for_any_budget() {
        let ms: Vec<ChatMessage> = (0..40)
            .map(|i| {
                m(
                    if i % 2 == 0 { "user" } else { "assistant" },
                    &"x".repeat(i + 1),
                )
            })
            .collect();
        for budget in 40..=820 {
            // The last try that fitted is the answer (the caller keeps its token ids).
            let mut last_fit = None;
            let got = truncated(&ms, |k| {
                let fit = chars(k) <= budget;
                if fit {
                    last_fit = Some(k.len());
                }
                fit
            });
            assert_eq!(
                last_fit,
                Some(got.as_ref().map_or(ms.len(), Vec::len)),
                "{budget}"
            );
            match truncated(&ms, |k| chars(k) <= budget) {
                None => assert!(chars(&ms) <= budget || ms[39].content.len() > budget),
                Some(got) => {
                    assert!(chars(&got) <= budget, "{budget}");
                    // One more turn would not fit.
                    let more = ms.len() - got.len() - 1;
                    assert!(
                        chars(&ms[more..]) > budget,
                        "{budget}: not the fewest dropped"
                    );
                }
            }
        }
    }
}
