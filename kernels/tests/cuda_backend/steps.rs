//! Whole steps over random mixed batches, with either attention kernel and with long
//! rows split over several blocks, against the twin chain.

use super::*;

#[test]
fn random_mixed_batches_match_the_twin_chain() {
    on_each!("random-batches", random_batches_case);
}

/// Steps of random shape (prefill chunks of 1–20 tokens continuing where each sequence
/// left off, single-token decodes, logits of no row, the last or the last few
/// (a prompt's log-probabilities), non-contiguous shuffled block
/// tables) against the twin chain over the same batches: the batch building, slot
/// mapping, block tables and logits-row packing hold for layouts the engine makes.
fn random_batches_case<E: Exec>(cuda: &mut CudaBackend<E>, twin: &TwinModel) {
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let (bs, n_blocks) = cuda.kv_geometry();
    let mut kv = twin.kv(bs, n_blocks);
    // Six sequences, each with 16 of the cache's blocks, dealt out shuffled.
    let mut blocks: Vec<u32> = (0..96).collect();
    for i in (1..blocks.len()).rev() {
        blocks.swap(i, next(i + 1));
    }
    let tables: Vec<Vec<u32>> = blocks.chunks(16).map(|c| c.to_vec()).collect();
    let mut lens = [0usize; 6];
    let vocab = twin.config.vocab;
    for step in 0..30 {
        let mut b = Batch::default();
        for s in 0..6 {
            if next(3) == 0 {
                continue;
            }
            let n = if lens[s] > 0 && next(2) == 0 {
                1
            } else {
                1 + next(20)
            };
            if lens[s] + n > 16 * bs || b.tokens.len() + n > 128 {
                continue;
            }
            let toks: Vec<u32> = (0..n).map(|_| next(vocab) as u32).collect();
            // Logits for none, the last row, or (a prompt's log-probabilities) the last
            // few or all.
            let rows = match next(6) {
                0 => 0,
                1 => n,
                2 => 1 + next(n),
                _ => 1,
            };
            b.push_rows(&toks, lens[s], tables[s].clone(), rows);
            lens[s] += n;
        }
        if b.tokens.is_empty() {
            continue;
        }
        let got = cuda.step(&b).unwrap();
        let want = twin.forward(&b, &mut kv);
        assert_eq!(got.len(), b.n_logits() * vocab, "step {step}");
        let e = rel_err(&got, &want);
        assert!(e < 2e-3, "step {step} ({} rows): {e}", b.tokens.len());
    }
}

#[test]
fn tensor_core_attention_steps_match_the_twin_chain() {
    on_each!("tensor-attention", tensor_attention_case);
}

/// With `attention_tc` launched: the random mixed batches (prefill chunks tiled, decodes
/// alone), then the long rows split over blocks, from graphs captured again with it.
fn tensor_attention_case<E: Exec>(cuda: &mut CudaBackend<E>, twin: &TwinModel) {
    cuda.set_attention(AttentionKernel::Tensor).unwrap();
    assert_eq!(cuda.attention(), AttentionKernel::Tensor);
    random_batches_case(cuda, twin);
    long_rows_case(cuda, twin);
}

#[test]
fn long_rows_at_small_batch_split_their_attention_and_match_the_twin_chain() {
    on_each!("long-rows", long_rows_case);
}

/// Two sequences with long prompts (1,100 and 700 tokens: 3 and 2 attention chunks),
/// prefilled 128 rows a step, then decoded together and alone: at 1 and 2 rows the step
/// spreads each row's chunks over several blocks (on the emulator's 8 SMs and the tiny
/// model's 2 KV heads, 4 and 2 blocks), from graphs and from direct launches, and each step
/// matches the twin chain over the same batches.
fn long_rows_case<E: Exec>(cuda: &mut CudaBackend<E>, twin: &TwinModel) {
    let (bs, n_blocks) = cuda.kv_geometry();
    let mut kv = twin.kv(bs, n_blocks);
    let vocab = twin.config.vocab;
    let lens = [1100usize, 700];
    let tables: Vec<Vec<u32>> = {
        let a = (lens[0] + 16).div_ceil(bs) as u32;
        let b = (lens[1] + 16).div_ceil(bs) as u32;
        vec![(0..a).collect(), (a..a + b).collect()]
    };
    let prompt = |s: usize, i: usize| ((i * 31 + s * 7) % (vocab - 1) + 1) as u32;
    let mut done = [0usize; 2];
    let mut last = [0u32; 2];
    let mut check = |cuda: &mut CudaBackend<E>, b: &Batch, what: &str| -> Vec<f32> {
        let got = cuda.step(b).unwrap();
        let want = twin.forward(b, &mut kv);
        let e = rel_err(&got, &want);
        assert!(e < 2e-3, "{what} ({} rows): {e}", b.tokens.len());
        got
    };
    // Prefill: up to 128 rows a step, both sequences in turn.
    while done != lens {
        let mut b = Batch::default();
        for s in 0..2 {
            let n = (lens[s] - done[s]).min(128 - b.tokens.len());
            if n == 0 {
                continue;
            }
            let toks: Vec<u32> = (done[s]..done[s] + n).map(|i| prompt(s, i)).collect();
            b.push(&toks, done[s], tables[s].clone(), done[s] + n == lens[s]);
            done[s] += n;
        }
        let logits = check(cuda, &b, "prefill");
        for (s, l) in b
            .seqs
            .iter()
            .filter(|s| s.logits > 0)
            .zip(logits.chunks_exact(vocab))
        {
            let seq = tables.iter().position(|t| *t == s.block_table).unwrap();
            last[seq] = common::argmax(l) as u32;
        }
    }
    // Decode: both, then the first alone, from graphs and direct launches in turn.
    for step in 0..6 {
        let alone = step >= 4;
        cuda.set_graphs(step % 2 == 0).unwrap();
        let mut b = Batch::default();
        for s in 0..if alone { 1 } else { 2 } {
            b.push(&[last[s]], done[s], tables[s].clone(), true);
            done[s] += 1;
        }
        let logits = check(cuda, &b, &format!("decode step {step}"));
        for (s, l) in logits.chunks_exact(vocab).enumerate() {
            last[s] = common::argmax(l) as u32;
        }
    }
    cuda.set_graphs(true).unwrap();
}
