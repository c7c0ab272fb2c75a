//! A sequence in the engine: what a request brings ([`NewSeq`]), its state while it runs
//! ([`Seq`]: tokens, KV blocks, sampler, penalties, JSON mode, log-probabilities), what it
//! costs its tenant and asks of the scheduler, and what it sends back as its tokens come
//! ([`emit`]).

use super::bad_words::BadWords;
use super::blocks::chain;
use super::fair::Tenanted;
use super::kv_pools::Tables;
use super::outbox::{Events, Outbox};
use super::output::{Emit, TextOut};
use super::prediction::Prediction;
use super::reasoning::{Kind, Reasoning};
use super::scheduler::Schedulable;
use crate::worker::{FinishReason, TokenLogprob, TopLogprob, Usage, WorkerEvent};
use kernels::adjust::Adjust;
use kernels::cuda::twins::SampleParams;
use kernels::grammar::Grammar;
use kernels::json_mode::JsonVocab;
use kernels::logprobs::TokenLogprobs;
use kernels::sampler::{Penalties, SamplingConfig};
use kernels::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::hash::RandomState;
use std::sync::Arc;

pub(super) struct NewSeq {
    pub(super) tenant: Arc<str>,
    /// The account its fair share is counted in ([`super::fair::Tenanted::share`]).
    pub(super) share: Arc<str>,
    pub(super) weight: f64,
    pub(super) output_weight: f64,
    pub(super) prompt: Vec<u32>,
    pub(super) max_tokens: u32,
    pub(super) sampling: SamplingConfig,
    pub(super) seed: u64,
    pub(super) stop: Vec<String>,
    /// The stop string met is kept in the text (`include_stop_str_in_output`).
    pub(super) keep_stop: bool,
    /// Special tokens are written without text (vLLM's `skip_special_tokens`).
    pub(super) skip_special: bool,
    /// Log-probabilities asked for: this many alternatives per token.
    pub(super) logprobs: Option<u8>,
    /// The prompt's log-probabilities too, with this many alternatives each (`echo` with
    /// `logprobs`, vLLM's `prompt_logprobs`).
    pub(super) prompt_logprobs: Option<u8>,
    /// The prompt is scored for `echo`: a stop token generated gets an item too.
    pub(super) echo_scored: bool,
    pub(super) penalties: Option<Penalties>,
    /// JSON mode, structured output or a regular expression (`guided_regex`,
    /// `guided_choice`): where the output starts.
    pub(super) grammar: Option<Grammar>,
    /// An embeddings request: its answer is the prompt's last hidden state.
    pub(super) embed: bool,
    /// A chat with a reasoning model: its thinking told apart from its answer.
    pub(super) reasoning: Option<Reasoning>,
    /// A chat's `prediction`, tokenized: drafts for its answer.
    pub(super) prediction: Option<Vec<u32>>,
    /// What ends it ([`Ends`]).
    pub(super) ends: Ends,
    /// vLLM's `allowed_token_ids`, as a bitmask of the vocabulary: the only tokens drawn.
    pub(super) allowed: Option<Arc<[u32]>>,
    /// vLLM's `bad_words`, as token sequences never generated.
    pub(super) bad_words: Option<Arc<BadWords>>,
    pub(super) tx: Events,
}

/// What ends a sequence besides its length and stop strings (vLLM's options): the model's
/// stop tokens unless `ignore_eos` (then tokens without text), the request's
/// `stop_token_ids` (their text sent), and none of them drawn before `min_tokens` are
/// generated.
#[derive(Debug, Clone, Default)]
pub(super) struct Ends {
    pub(super) ignore_eos: bool,
    pub(super) min_tokens: u32,
    pub(super) stop_ids: Vec<u32>,
}

pub(super) struct Seq {
    /// The engine's name for it (admission order), to find it again after a step in flight.
    pub(super) id: u64,
    pub(super) tenant: Arc<str>,
    /// The account its fair share is counted in: its tenant's, or the tenant's account of
    /// lowest-weight work ([`super::fair::account`]).
    pub(super) share: Arc<str>,
    /// Fair-share weight (the tenant's purchased rate).
    pub(super) weight: f64,
    pub(super) output_weight: f64,
    /// Its prompt and generated tokens. The last may still be on the device
    /// ([`kernels::backend::FROM_LAST`]` | row`: drawn by a step in flight, and read there by
    /// the step after it); those before `resolved` are known.
    pub(super) tokens: Vec<u32>,
    pub(super) resolved: usize,
    pub(super) prompt_len: usize,
    pub(super) computed: usize,
    pub(super) blocks: Tables,
    /// Content hashes of the full blocks of `tokens` known so far (prefix caching).
    pub(super) hashes: Vec<u64>,
    /// Blocks registered in the pool's prefix cache (the first ones of `blocks`).
    pub(super) registered: usize,
    /// Prompt tokens taken from the prefix cache (reported in the usage).
    pub(super) cached: usize,
    pub(super) max_tokens: u32,
    /// The request's sampling settings and seed (each draw is the rule's for its token's
    /// index among those generated: [`sample_params`]).
    pub(super) sampling: SamplingConfig,
    pub(super) seed: u64,
    pub(super) out: TextOut,
    /// Log-probabilities asked for (alternatives per token), and those of the tokens whose
    /// text is not sent yet.
    pub(super) logprobs: Option<u8>,
    pub(super) pending_logprobs: Vec<TokenLogprob>,
    /// While its prompt is being scored (`echo` with `logprobs`, vLLM's
    /// `prompt_logprobs`): the next prompt token to score (from 1: each row's logits score
    /// the next row's token), and the prompt's tokens scored so far, its first unscored.
    /// Sent once all are, before any text; with `prompt_top` alternatives each.
    pub(super) prompt_next: Option<usize>,
    pub(super) prompt_top: usize,
    pub(super) prompt_scored: Vec<TokenLogprob>,
    /// Its prompt is scored (`echo` with `logprobs`): a stop token gets an item too.
    pub(super) scored: bool,
    /// Presence and frequency penalties, logit bias and a repetition penalty, when the
    /// request has any; how often each token has been generated; and under a repetition
    /// penalty, the prompt's tokens (sorted, each once).
    pub(super) penalties: Option<Penalties>,
    pub(super) counts: HashMap<u32, u32>,
    pub(super) seen: Vec<u32>,
    /// JSON mode, structured output or a regular expression: where the output generated
    /// so far stands.
    pub(super) grammar: Option<Grammar>,
    /// An embeddings request: it ends with its prompt, answered with the normalized
    /// final hidden state of its last token (no token is generated).
    pub(super) embed: bool,
    /// A chat with a reasoning model: where its thinking stands, and what its last token
    /// taken was ([`Seq::take`], read by [`emit`]).
    pub(super) reasoning: Option<Reasoning>,
    pub(super) last_kind: Kind,
    /// Tokens proposed to follow its last one ([`super::speculate`]): the next step
    /// computes them after it, and its draws keep them as far as they agree. Only while
    /// its last token is its only one not computed, and known on the host.
    pub(super) draft: Vec<u32>,
    /// Steps its drafts keep missing in a row (none of a step's kept), and steps left
    /// before it proposes again: a run of misses backs off ([`super::speculate::backoff`]).
    pub(super) draft_misses: u32,
    pub(super) draft_wait: u32,
    /// A chat's `prediction`, and where its answer stands in it ([`super::prediction`]).
    pub(super) prediction: Option<Prediction>,
    pub(super) ends: Ends,
    pub(super) allowed: Option<Arc<[u32]>>,
    pub(super) bad_words: Option<Arc<BadWords>>,
    pub(super) tx: Events,
}

impl Tenanted for Seq {
    fn tenant(&self) -> &Arc<str> {
        &self.tenant
    }
    fn share(&self) -> &Arc<str> {
        &self.share
    }
    fn weight(&self) -> f64 {
        self.weight
    }
    /// Prompt positions count 1, generated ones (decodes, or recomputed after a
    /// preemption) `output_weight`.
    fn token_cost(&self, n: usize) -> f64 {
        let input = self
            .prompt_len
            .min(self.computed + n)
            .saturating_sub(self.computed);
        input as f64 + (n - input) as f64 * self.output_weight
    }
}

impl Schedulable for Seq {
    /// Its tokens not yet computed, less a token still on the device that is its last
    /// (`max_tokens`): nothing is drawn after it; and its drafts.
    fn pending(&self) -> usize {
        let last = self.resolved < self.tokens.len() && self.generated() >= self.max_tokens;
        (self.tokens.len() - self.computed).saturating_sub(usize::from(last)) + self.draft.len()
    }
    fn computed(&self) -> usize {
        self.computed
    }
    fn blocks_mut(&mut self) -> &mut Tables {
        &mut self.blocks
    }
    fn reset(&mut self) {
        self.draft.clear();
        self.computed = 0;
        self.registered = 0;
        if self.generated() == 0 {
            self.cached = 0;
        }
    }
    fn cache_keys(&mut self, hasher: &RandomState, block_size: usize) -> (&[u64], &[u32]) {
        let known = &self.tokens[..self.resolved];
        chain(hasher, &self.tenant, known, block_size, &mut self.hashes);
        (&self.hashes, known)
    }
    fn skip(&mut self, n: usize, block_size: usize) {
        self.computed = n;
        self.registered = n / block_size;
        if self.generated() == 0 {
            self.cached = n.min(self.prompt_len);
        }
    }
    /// Its last row when it reaches its end; while its prompt is scored, also every row
    /// from the first that scores a prompt token not yet scored (a run to its end, as
    /// the batch takes them: rows after the prompt's that a recomputation after a
    /// preemption passes over are computed and dropped).
    fn logit_rows(&self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let end = self.computed + n;
        if !self.draft.is_empty() {
            // Its last token's row and each draft's the chunk reaches.
            return end.saturating_sub(self.tokens.len() - 1);
        }
        let last = usize::from(end == self.tokens.len());
        match self.prompt_next {
            // Row p scores prompt token p + 1.
            Some(next) if next < self.prompt_len => {
                let first = (next - 1).max(self.computed);
                if first < end.min(self.prompt_len - 1) {
                    end - first
                } else {
                    last
                }
            }
            _ => last,
        }
    }
    fn reuses_prefix(&self) -> bool {
        self.prompt_next.is_none()
    }
}

impl Seq {
    /// Tokens drawn so far, those still on the device too (the next draw's index).
    /// It ends with its prompt, so the token its prompt's last row draws is not its: an
    /// embeddings request, or a prompt echoed with no completion (`max_tokens` 0, to score
    /// it).
    pub(super) fn ends_with_prompt(&self) -> bool {
        self.embed || self.max_tokens == 0
    }
    pub(super) fn generated(&self) -> u32 {
        (self.tokens.len() - self.prompt_len) as u32
    }
    /// Tokens drawn and known on the host.
    pub(super) fn emitted(&self) -> u32 {
        (self.resolved - self.prompt_len) as u32
    }
    /// Whether its next row's adjustment needs its last token on the host (JSON mode): a
    /// JSON mask is sent once the step before is collected
    /// ([`kernels::backend::Backend::submit_sample`]), while penalties count a token still
    /// on the device there ([`kernels::adjust::Carry`]).
    pub(super) fn masked(&self) -> bool {
        self.grammar.is_some()
            || self
                .bad_words
                .as_ref()
                .is_some_and(|b| b.follow_the_answer())
    }
    /// Whether it decodes with only its last token left to compute and no drafts yet, so
    /// that it may propose some to follow it ([`super::speculate`]): not an embeddings
    /// request, nor a prompt that ends the request.
    pub(super) fn may_draft(&self) -> bool {
        self.draft.is_empty()
            && self.computed + 1 == self.tokens.len()
            && self.tokens.len() > self.prompt_len
            && !self.embed
            && !self.ends_with_prompt()
    }
    /// Whether its last token is still on the device.
    pub(super) fn carried(&self) -> bool {
        self.resolved < self.tokens.len()
    }
    pub(super) fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len as u32,
            completion_tokens: self.emitted(),
            cached_tokens: self.cached as u32,
            reasoning_tokens: self.reasoning.as_ref().map_or(0, |r| r.tokens),
            accepted_prediction_tokens: self.prediction.as_ref().map_or(0, |p| p.accepted),
            rejected_prediction_tokens: self.prediction.as_ref().map_or(0, |p| p.rejected),
        }
    }
    pub(super) fn send(&self, out: &mut Outbox, ev: WorkerEvent) {
        out.push(&self.tx, Ok(ev));
    }
    /// Takes its next token `id`, with its log-probabilities when asked: counted for the
    /// penalties, fed to JSON mode, its item queued for the next text sent (a stop token
    /// is counted only). It replaces the first token still on the device, if any.
    pub(super) fn take(&mut self, id: u32, lp: Option<TokenLogprobs>, tok: &Tokenizer) {
        if self.penalties.is_some() {
            *self.counts.entry(id).or_insert(0) += 1;
        }
        if !tok.stop_tokens.contains(&id) {
            self.last_kind = self.reasoning.as_mut().map_or(Kind::Answer, |r| r.next(id));
            if let Some(grammar) = self
                .grammar
                .as_mut()
                .filter(|_| self.last_kind == Kind::Answer)
            {
                grammar.advance(tok.token_bytes(id));
            }
            if let Some(lp) = lp {
                self.pending_logprobs.push(logprob_item(tok, &lp));
            }
        } else if let Some(lp) = lp.filter(|_| self.scored) {
            // A scored prompt's lists end with every generated token, the stop token too
            // (with no text): harnesses cut the last entry off as the generated one.
            let mut item = logprob_item(tok, &lp);
            item.token.clear();
            item.bytes.clear();
            self.pending_logprobs.push(item);
        }
        match self.tokens.get_mut(self.resolved) {
            Some(t) => *t = id,
            None => self.tokens.push(id),
        }
        self.resolved += 1;
    }
    /// Whether its next token is drawn from adjusted logits (penalties, JSON mode, the
    /// tokens that would end it before `min_tokens`, `allowed_token_ids`).
    pub(super) fn constrained(&self) -> bool {
        self.penalties.is_some()
            || self.grammar.is_some()
            || self.holds_ends()
            || self.allowed.is_some()
            || self.bad_words.is_some()
    }
    /// Whether its next draw may not end it (`min_tokens` not reached): it always has
    /// a token that would (the model's end of sequence, or a `stop_token_ids` one).
    fn holds_ends(&self) -> bool {
        self.generated() < self.ends.min_tokens
            && (!self.ends.ignore_eos || !self.ends.stop_ids.is_empty())
    }
    /// Its penalties and JSON mode, applied to a row of logits.
    pub(super) fn adjust(
        &self,
        logits: &mut [f32],
        tok: &Tokenizer,
        json_vocab: Option<&JsonVocab>,
    ) {
        self.adjustment(tok, json_vocab, logits.len(), false)
            .apply(logits);
    }
    /// Its penalties and JSON mode as an adjustment of its next row of `n` logits (what
    /// the GPU's `sample` kernel applies, and [`Seq::adjust`] on the host), counting its
    /// last token on the device when `carried` (it is still there). A JSON mask
    /// that would leave no token (a vocabulary without the bytes the object needs) leaves
    /// the stop tokens.
    pub(super) fn adjustment(
        &self,
        tok: &Tokenizer,
        json_vocab: Option<&JsonVocab>,
        n: usize,
        carried: bool,
    ) -> Adjust {
        let deltas = self
            .penalties
            .as_ref()
            .map(|p| p.deltas(&self.counts))
            .unwrap_or_default();
        let carry = self
            .penalties
            .as_ref()
            .filter(|_| carried)
            .and_then(|p| p.carry(&self.counts, &deltas));
        let repeat = self
            .penalties
            .as_ref()
            .and_then(|p| p.repeat(&self.seen, &self.counts, carried, n));
        // A grammar is the answer's: it waits while the model thinks.
        let thinking = self.reasoning.as_ref().is_some_and(Reasoning::thinking);
        let grammar = self.grammar.as_ref().filter(|_| !thinking);
        let mut mask = grammar.zip(json_vocab).map(|(grammar, vocab)| {
            let bits = grammar.allowed(vocab, n);
            if bits.iter().all(|&w| w == 0) {
                kernels::adjust::bitmask(&tok.stop_tokens, n)
            } else {
                bits
            }
        });
        // The API refuses `allowed_token_ids` with a grammar: its mask is the row's.
        if let Some(allowed) = self.allowed.as_deref().filter(|_| mask.is_none()) {
            let mut bits = allowed.to_vec();
            bits.resize(n.div_ceil(32), 0);
            mask = Some(bits);
        }
        if self.holds_ends() {
            // Every token the grammar allows (or any), but those that would end it; unless
            // that leaves none.
            let mut bits = mask
                .clone()
                .unwrap_or_else(|| vec![u32::MAX; n.div_ceil(32)]);
            let model = if self.ends.ignore_eos {
                &[][..]
            } else {
                &tok.stop_tokens[..]
            };
            clear(
                &mut bits,
                model.iter().chain(&self.ends.stop_ids).copied(),
                n,
            );
            if bits.iter().any(|&w| w != 0) {
                mask = Some(bits);
            }
        }
        if let Some(bad) = &self.bad_words {
            // Every token allowed so far, less the last tokens of the bad words the answer
            // has begun; unless that leaves none.
            let answer = &self.tokens[self.prompt_len..self.resolved.min(self.tokens.len())];
            let mut bits = mask
                .clone()
                .unwrap_or_else(|| vec![u32::MAX; n.div_ceil(32)]);
            let cut = clear(&mut bits, bad.refused(answer), n);
            if cut && bits.iter().any(|&w| w != 0) {
                mask = Some(bits);
            }
        }
        Adjust {
            repeat,
            deltas,
            mask,
            carry,
        }
    }
    /// An upper bound of [`Seq::adjustment`]'s words, for rows of `n` logits.
    pub(super) fn adjustment_words(&self, n: usize, carried: bool) -> usize {
        let deltas = self
            .penalties
            .as_ref()
            .map_or(0, |p| p.bias.len() + self.counts.len());
        let carry = if carried && self.penalties.is_some() {
            1 + deltas
        } else {
            0
        };
        let mask = if self.grammar.is_some()
            || self.holds_ends()
            || self.allowed.is_some()
            || self.bad_words.is_some()
        {
            n.div_ceil(32)
        } else {
            0
        };
        let repeat = match &self.penalties {
            Some(p) if p.repetition != 1.0 => {
                2 + (self.seen.len() + self.counts.len()).min(n.div_ceil(32))
            }
            _ => 0,
        };
        2 + 2 * deltas + mask + carry + repeat
    }
}

/// Clears the bits of `ids` in a bitmask over a row of `n` tokens (ids past it are passed
/// over); whether any was.
fn clear(bits: &mut [u32], ids: impl Iterator<Item = u32>, n: usize) -> bool {
    let mut cut = false;
    for id in ids.filter(|&id| (id as usize) < n) {
        if let Some(w) = bits.get_mut(id as usize / 32) {
            *w &= !(1 << (id % 32));
            cut = true;
        }
    }
    cut
}

pub(super) fn admit(n: NewSeq, id: u64) -> Seq {
    let seen = match &n.penalties {
        Some(p) if p.repetition != 1.0 => {
            let mut seen = n.prompt.clone();
            seen.sort_unstable();
            seen.dedup();
            seen
        }
        _ => Vec::new(),
    };
    Seq {
        id,
        resolved: n.prompt.len(),
        tenant: n.tenant,
        share: n.share,
        weight: n.weight,
        output_weight: n.output_weight,
        prompt_len: n.prompt.len(),
        tokens: n.prompt,
        computed: 0,
        blocks: Tables::default(),
        hashes: Vec::new(),
        registered: 0,
        cached: 0,
        max_tokens: n.max_tokens,
        sampling: n.sampling,
        seed: n.seed,
        out: TextOut::new(n.stop, n.keep_stop, n.skip_special),
        logprobs: n.logprobs,
        pending_logprobs: Vec::new(),
        prompt_next: n.prompt_logprobs.map(|_| 1),
        prompt_top: n.prompt_logprobs.unwrap_or(0) as usize,
        prompt_scored: Vec::new(),
        scored: n.echo_scored,
        seen,
        penalties: n.penalties,
        counts: HashMap::new(),
        grammar: n.grammar,
        embed: n.embed,
        reasoning: n.reasoning,
        last_kind: Kind::Answer,
        draft: Vec::new(),
        draft_misses: 0,
        draft_wait: 0,
        prediction: n.prediction.map(Prediction::new),
        ends: n.ends,
        allowed: n.allowed,
        bad_words: n.bad_words,
        tx: n.tx,
    }
}

/// A token's log-probabilities as the API reports them: token texts from their bytes, and
/// −9999 for an impossible token (JSON has no −∞; OpenAI reports the same).
pub(super) fn logprob_item(tok: &Tokenizer, lp: &TokenLogprobs) -> TokenLogprob {
    let text = |id: u32| {
        let bytes = tok.token_bytes(id).to_vec();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    };
    let (token, bytes) = text(lp.id);
    TokenLogprob {
        token,
        bytes,
        logprob: lp.logprob.max(-9999.0),
        id: Some(lp.id),
        rank: Some(lp.rank),
        top_logprobs: lp
            .top
            .iter()
            .map(|&(id, logprob)| {
                let (token, bytes) = text(id);
                TopLogprob {
                    token,
                    bytes,
                    logprob: logprob.max(-9999.0),
                    id: Some(id),
                }
            })
            .collect(),
    }
}

/// A sequence's parameters for its draw of its `step`-th token, on the device or the host
/// (the same rule, [`kernels::sampler::sample`]): greedy below a temperature of 1e-5.
/// Planning a step, that is the next token ([`Seq::generated`]); drawing on the host once
/// the step is collected, the first one not known yet ([`Seq::emitted`]: the sequence may
/// already hold a placeholder for a step sent after it).
pub(super) fn sample_params(s: &Seq, step: u32) -> SampleParams {
    let c = s.sampling;
    SampleParams {
        min_p: c.min_p,
        temperature: if c.temperature < 1e-5 {
            0.0
        } else {
            c.temperature
        },
        top_k: c.top_k.min(i32::MAX as usize) as i32,
        top_p: c.top_p,
        seed: s.seed,
        step,
    }
}

/// A finished sequence's last text (what was held back), and whether it is thinking.
pub(super) fn tail(s: &mut Seq) -> (String, bool) {
    let text = s.out.finish();
    match &mut s.reasoning {
        Some(r) if r.thinking() => (text, true),
        Some(r) => (r.answer_text(text), false),
        None => (text, false),
    }
}

/// Sends the text of a sampled token; returns why the sequence ends, if it does.
pub(super) fn emit(
    s: &mut Seq,
    tok: &Tokenizer,
    id: u32,
    outbox: &mut Outbox,
) -> Option<FinishReason> {
    if tok.stop_tokens.contains(&id) {
        // The model's end of sequence; with `ignore_eos`, a token without text.
        if !s.ends.ignore_eos || s.ends.stop_ids.contains(&id) {
            return Some(FinishReason::Stop);
        }
        return (s.emitted() >= s.max_tokens).then_some(FinishReason::Length);
    }
    let kind = s.last_kind;
    let e = if kind == Kind::Marker {
        // A marker has no text: what the thinking still held back goes out as thinking
        // (after `</think>`), or nothing (after a first `<think>`).
        Emit {
            text: s.out.release(),
            stopped: false,
        }
    } else {
        s.out.push(tok, id)
    };
    if e.stopped {
        // The token that completed a stop string: its text is not sent, nor its
        // log-probability.
        s.pending_logprobs.pop();
    }
    let reasoning = kind != Kind::Answer;
    let text = match (&mut s.reasoning, reasoning) {
        (Some(r), false) => r.answer_text(e.text),
        _ => e.text,
    };
    // Log-probabilities of tokens with no text yet (a marker's too) go with the next text.
    if !text.is_empty() {
        let logprobs = std::mem::take(&mut s.pending_logprobs);
        s.send(
            outbox,
            WorkerEvent::Delta {
                text,
                tokens: 1,
                logprobs,
                reasoning,
            },
        );
    }
    if e.stopped || s.ends.stop_ids.contains(&id) {
        return Some(FinishReason::Stop);
    }
    (s.emitted() >= s.max_tokens).then_some(FinishReason::Length)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc as tmpsc;

    /// A greedy sequence of `prompt`, up to `max_tokens` generated ones costing
    /// `output_weight` each; and the receiving end of its events.
    fn greedy(
        prompt: Vec<u32>,
        max_tokens: u32,
        output_weight: f64,
    ) -> (
        Seq,
        tmpsc::UnboundedReceiver<Result<WorkerEvent, crate::worker::WorkerError>>,
    ) {
        let (tx, rx) = tmpsc::unbounded_channel();
        let n = NewSeq {
            tenant: "t".into(),
            share: "t".into(),
            weight: 1.0,
            output_weight,
            prompt,
            max_tokens,
            sampling: SamplingConfig {
                min_p: 0.0,
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
            },
            seed: 0,
            stop: vec![],
            keep_stop: false,
            skip_special: true,
            logprobs: None,
            prompt_logprobs: None,
            echo_scored: false,
            penalties: None,
            grammar: None,
            embed: false,
            reasoning: None,
            prediction: None,
            ends: Ends::default(),
            allowed: None,
            bad_words: None,
            tx,
        };
        (admit(n, 0), rx)
    }

    #[test]
    fn a_sequence_costs_prompt_tokens_at_one_and_generated_ones_at_output_weight() {
        let (mut s, _rx) = greedy(vec![1; 10], 8, 3.0);
        assert_eq!(s.token_cost(4), 4.0, "a prefill chunk");
        s.computed = 8;
        s.tokens.extend([5, 6]); // two generated tokens, not yet computed
        assert_eq!(
            s.token_cost(4),
            2.0 + 2.0 * 3.0,
            "the prompt's end and two generated"
        );
        s.computed = 11;
        assert_eq!(s.token_cost(1), 3.0, "a decode");
    }

    #[test]
    fn tokens_still_on_the_device_are_drawn_not_emitted_and_resolved_in_order() {
        use kernels::backend::FROM_LAST;
        let path = std::env::temp_dir().join(format!("tollgate-seq-{}.gguf", std::process::id()));
        kernels::synth::write_model(&path, &kernels::synth::SynthSpec::tiny()).unwrap();
        let tok = Tokenizer::from_gguf(&kernels::gguf::Gguf::open(&path).unwrap()).unwrap();
        let _ = std::fs::remove_file(&path);
        let (mut s, _rx) = greedy(vec![1; 4], 2, 1.0);
        // The prefill is in flight, drawing the first token from its row 3.
        s.computed = 4;
        s.tokens.push(FROM_LAST | 3);
        assert_eq!((s.generated(), s.emitted(), s.pending()), (1, 0, 1));
        // The decode after it is in flight too, drawing the last token (max_tokens 2).
        s.computed = 5;
        s.tokens.push(FROM_LAST); // its row 0
        assert_eq!(s.generated(), 2);
        assert_eq!(s.pending(), 0, "nothing is drawn after the last token");
        s.take(40, None, &tok);
        assert_eq!(s.tokens, [1, 1, 1, 1, 40, FROM_LAST]);
        assert_eq!((s.emitted(), s.resolved), (1, 5));
        s.take(41, None, &tok);
        assert_eq!(&s.tokens[4..], [40, 41]);
        assert_eq!(s.usage().completion_tokens, 2);
        // Known on the host from here on: tokens are pushed.
        s.take(42, None, &tok);
        assert_eq!(&s.tokens[4..], [40, 41, 42]);
    }
}
