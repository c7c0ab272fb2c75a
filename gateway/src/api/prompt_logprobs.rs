//! vLLM's `prompt_logprobs` on chat and completions: the prompt's tokens as the engine
//! scored them, in vLLM's shape. A list with one entry per prompt token: `null` for the
//! first (nothing before it scores it), then an object keyed by token id (as a string),
//! the prompt's own token first, with its log-probability, its rank (how many tokens were
//! at least as likely, itself included) and its text (`decoded_token`), then the k most
//! likely tokens (ranks 1 to k); a prompt token among them keeps its place and takes the
//! rank of its place there, as vLLM's dictionary does. Completions put the list in each
//! choice; chat in the response.

use crate::worker::TokenLogprob;
use serde_json::{json, Map, Value};

/// The list for `items` (the prompt's tokens, the first unscored), with `k` alternatives
/// each. A token whose id the worker did not give is left out.
pub fn vllm(items: &[TokenLogprob], k: usize) -> Value {
    // Written as the f32 it is (as OpenAI's shapes write theirs), not widened to f64's
    // digits.
    let num = |x: f32| {
        x.to_string()
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::Null, Value::Number)
    };
    let entry = |logprob: f32, rank: Option<u32>, text: &str| json!({ "logprob": num(logprob), "rank": rank, "decoded_token": text });
    Value::Array(
        items
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if i == 0 {
                    return Value::Null;
                }
                let mut m = Map::new();
                if let Some(id) = t.id {
                    m.insert(id.to_string(), entry(t.logprob, t.rank, &t.token));
                }
                for (r, a) in t.top_logprobs.iter().take(k).enumerate() {
                    if let Some(id) = a.id {
                        m.insert(
                            id.to_string(),
                            entry(a.logprob, Some(r as u32 + 1), &a.token),
                        );
                    }
                }
                Value::Object(m)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::TopLogprob;

    fn item(
        id: u32,
        text: &str,
        logprob: f32,
        rank: u32,
        top: &[(u32, &str, f32)],
    ) -> TokenLogprob {
        TokenLogprob {
            token: text.into(),
            logprob,
            bytes: text.as_bytes().to_vec(),
            top_logprobs: top
                .iter()
                .map(|&(id, t, logprob)| TopLogprob {
                    token: t.into(),
                    logprob,
                    bytes: t.as_bytes().to_vec(),
                    id: Some(id),
                })
                .collect(),
            id: Some(id),
            rank: Some(rank),
        }
    }

    #[test]
    fn each_position_has_its_token_then_the_most_likely() {
        let items = [
            item(7, "The", f32::NAN, 0, &[]),
            item(9, " cat", -2.5, 4, &[(3, " dog", -0.5), (5, " big", -1.0)]),
            // The prompt's token is the most likely: one entry, first, of rank 1.
            item(
                3,
                " sat",
                -0.25,
                1,
                &[(3, " sat", -0.25), (8, " ran", -2.0)],
            ),
        ];
        let v = vllm(&items, 2);
        assert_eq!(v[0], Value::Null);
        assert_eq!(
            serde_json::to_string(&v[1]).expect("JSON"),
            r#"{"9":{"logprob":-2.5,"rank":4,"decoded_token":" cat"},"3":{"logprob":-0.5,"rank":1,"decoded_token":" dog"},"5":{"logprob":-1.0,"rank":2,"decoded_token":" big"}}"#
        );
        let keys: Vec<&String> = v[2].as_object().expect("an object").keys().collect();
        assert_eq!(keys, ["3", "8"]);
        assert_eq!(v[2]["3"]["rank"], 1);
        // k = 0: the prompt's own tokens only; fewer than asked: what there is.
        assert_eq!(vllm(&items, 0)[1].as_object().map(Map::len), Some(1));
        assert_eq!(vllm(&items, 20)[2].as_object().map(Map::len), Some(2));
    }
}
