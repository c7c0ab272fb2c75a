//! The CUDA backend as the engine uses it, on the tiny synthetic model: decode steps
//! replayed from CUDA graphs (padded to their bucket) give the logits of direct launches;
//! sampling on the device gives the tokens of the `sample` rule on the CPU; the load-time
//! self-check passes.
//!
//! Each test runs on the CPU emulator (the same kernel sources, launches, staging copy and
//! graph logic; a graph there replays its recorded launches with their captured arguments)
//! and on GPU 0, skipped with a printed reason where there is none. On a GPU machine:
//! `kernels/gpu-check.sh` runs this binary.

#[path = "../common/mod.rs"]
mod common;

use common::{assert_logprobs, rel_err};
use kernels::adjust::{allowed, Adjust, Carry};
use kernels::backend::{Backend, Collected, ReadBack, FROM_LAST};
use kernels::cuda::backend::{AttentionKernel, CudaBackend, KvCapacity, SmallProducts};
use kernels::cuda::emu::Emu;
use kernels::cuda::exec::Exec;
use kernels::cuda::twins::{self, SampleParams, TwinModel};
use kernels::forward::{Batch, StepError};
use kernels::logprobs::{token_logprobs, Score, TokenLogprobs};
use kernels::synth::SynthSpec;

/// The backend on the emulator (16 sequences of up to 128 rows, buckets up to 16).
fn on_emu(name: &str, spec: &SynthSpec) -> Option<(CudaBackend<Emu>, TwinModel)> {
    let model = common::synthetic(name, spec);
    let twin = TwinModel::from_model(&model);
    let emu = common::emu_for(&twin.config)?;
    let what = emu.describe();
    let b = CudaBackend::on(emu, what, &twin, 16, KvCapacity::Blocks(128), 128, 16).unwrap();
    eprintln!("{} graphs for {:?}", b.name(), b.graph_buckets());
    Some((b, twin))
}

/// The backend on GPU 0.
fn on_gpu(name: &str, spec: &SynthSpec) -> Option<(CudaBackend, TwinModel)> {
    if let Err(e) = kernels::cuda::available() {
        eprintln!("SKIPPED on a GPU: {e}");
        return None;
    }
    let model = common::synthetic(name, spec);
    let twin = TwinModel::from_model(&model);
    let b = CudaBackend::with_capacity(&twin, 0, 16, KvCapacity::Blocks(128), 512, 64).unwrap();
    eprintln!("{} graphs for {:?}", b.name(), b.graph_buckets());
    Some((b, twin))
}

/// Runs `case` on the emulator's backend and on the GPU's, where each is present, for the
/// tiny synthetic model or the one of `spec`.
macro_rules! on_each {
    ($name:literal, $case:ident) => {
        on_each!($name, SynthSpec::tiny(), $case)
    };
    ($name:literal, $spec:expr, $case:ident) => {{
        let spec = $spec;
        if let Some((mut b, twin)) = on_emu($name, &spec) {
            $case(&mut b, &twin);
        }
        if let Some((mut b, twin)) = on_gpu($name, &spec) {
            $case(&mut b, &twin);
        }
    }};
}

/// `n` sequences with prompts of different lengths, each with its own 4 blocks.
fn prefill(n: usize) -> Batch {
    let mut b = Batch::default();
    for s in 0..n {
        let p: Vec<u32> = (0..(3 + s % 5) as u32)
            .map(|i| 1 + i * 7 + s as u32)
            .collect();
        b.push(&p, 0, (4 * s as u32..4 * s as u32 + 4).collect(), true);
    }
    b
}

/// `n` sequences with prompts of 1 to 4 tokens (`first + i · step + s` for sequence s),
/// each with its own block (room for the prompt and a few decode steps) past those of the
/// batches of fewer sequences: a prefill of a few rows, for steps of 1 to 9 sequences on
/// the same cache.
fn short_prompts(n: usize, first: u32, step: u32) -> Batch {
    let base = (n * (n - 1) / 2) as u32;
    let mut p = Batch::default();
    for s in 0..n {
        let toks: Vec<u32> = (0..(1 + s % 4) as u32)
            .map(|i| first + i * step + s as u32)
            .collect();
        let b = base + s as u32;
        p.push(&toks, 0, vec![b], true);
    }
    p
}

/// The decode step after `prev` (one given token per sequence).
fn decode(prev: &Batch, next: &[u32]) -> Batch {
    let mut b = Batch::default();
    for (s, &t) in prev.seqs.iter().zip(next) {
        let pos = prev.positions[s.start] as usize + s.len;
        b.push(&[t], pos, s.block_table.clone(), true);
    }
    b
}

/// `b`'s logits with `set(cuda, true)`, which must have the bits of those with
/// `set(cuda, false)` (`what` names the step in the failure).
fn both_ways<E: Exec>(
    cuda: &mut CudaBackend<E>,
    b: &Batch,
    what: &str,
    set: impl Fn(&mut CudaBackend<E>, bool),
) -> Vec<f32> {
    let mut out = Vec::new();
    for on in [true, false] {
        set(cuda, on);
        out.push(cuda.step(b).unwrap());
    }
    let same = out[0]
        .iter()
        .zip(&out[1])
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(
        same,
        "{what}: on and off differ by {}",
        rel_err(&out[0], &out[1])
    );
    out.swap_remove(0)
}

/// Every row count's products of few rows fused (`on`), or none.
fn fused(on: bool) -> SmallProducts {
    if on {
        SmallProducts::ALL
    } else {
        SmallProducts(0)
    }
}

fn greedy(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits
        .chunks_exact(vocab)
        .map(|r| common::argmax(r) as u32)
        .collect()
}

#[test]
fn graph_decode_steps_match_direct_launches_for_every_padding() {
    on_each!("graphs", graphs_case);
}

fn graphs_case<E: Exec>(cuda: &mut CudaBackend<E>, _: &TwinModel) {
    assert!(cuda.graphs_off().is_none(), "{:?}", cuda.graphs_off());
    let vocab = cuda.config().vocab;
    // 3 and 5 sequences pad to the 4 and 8 buckets; 16 fills its bucket.
    for n in [1usize, 3, 5, 16] {
        let p = prefill(n);
        let mut step = decode(&p, &greedy(&cuda.step(&p).unwrap(), vocab));
        for _ in 0..3 {
            cuda.set_graphs(true).unwrap();
            let with = cuda.step(&step).unwrap();
            cuda.set_graphs(false).unwrap();
            let without = cuda.step(&step).unwrap();
            let e = rel_err(&with, &without);
            assert!(
                e < 2e-3,
                "{n} sequences: graph vs direct logits differ by {e}"
            );
            step = decode(&step, &greedy(&without, vocab));
        }
    }
    // The padded rows wrote only the spare block: a sequence decoded alone afterwards
    // still matches.
    cuda.set_graphs(true).unwrap();
    let p = prefill(2);
    let direct = {
        let l = cuda.step(&p).unwrap();
        decode(&p, &greedy(&l, vocab))
    };
    let a = cuda.step(&direct).unwrap();
    cuda.set_graphs(false).unwrap();
    let b = cuda.step(&direct).unwrap();
    assert!(rel_err(&a, &b) < 2e-3);
}

/// A sequence's last token and the drafts after it (speculative decoding: one sequence,
/// every row a logits row) replay a graph of their row count, captured when that count
/// first comes and replayed when it comes again, with the bits of direct launches: logits,
/// and tokens sampled on the device.
#[test]
fn a_sequences_drafts_replay_a_graph_of_their_rows_with_the_bits_of_direct_launches() {
    on_each!("draft_graphs", draft_graphs_case);
}

fn draft_graphs_case<E: Exec>(cuda: &mut CudaBackend<E>, _: &TwinModel) {
    let vocab = cuda.config().vocab;
    let p = prefill(1);
    let last = greedy(&cuda.step(&p).unwrap(), vocab)[0];
    let (at, table) = (p.tokens.len(), p.seqs[0].block_table.clone());
    let steps: Vec<Batch> = [5u32, 3, 5]
        .iter()
        .map(|&rows| {
            let toks: Vec<u32> = std::iter::once(last).chain(11..10 + rows).collect();
            let mut b = Batch::default();
            b.push_rows(&toks, at, table.clone(), rows as usize);
            b
        })
        .collect();
    let params = |rows: usize| -> Vec<SampleParams> {
        (0..rows as u32)
            .map(|i| SampleParams {
                min_p: 0.0,
                temperature: 0.9,
                top_k: 40,
                top_p: 0.95,
                seed: 7,
                step: i,
            })
            .collect()
    };
    let mut got = Vec::new();
    for on in [true, false] {
        cuda.set_graphs(on).unwrap();
        let mut out = Vec::new();
        for b in &steps {
            let rows = b.tokens.len();
            out.push((
                cuda.step(b).unwrap(),
                cuda.step_sample(b, &params(rows), &[]).unwrap(),
            ));
        }
        let want: Vec<usize> = if on { vec![5, 3] } else { Vec::new() };
        assert_eq!(cuda.draft_graph_rows(), want, "graphs on: {on}");
        got.push(out);
    }
    for (i, (with, without)) in got[0].iter().zip(&got[1]).enumerate() {
        let same = with
            .0
            .iter()
            .zip(&without.0)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "step {i}: {}", rel_err(&with.0, &without.0));
        assert_eq!(with.1, without.1, "step {i}'s tokens");
    }
    cuda.set_graphs(true).unwrap();
}

#[test]
fn overlapped_steps_give_the_tokens_of_steps_one_at_a_time() {
    on_each!("overlapped", overlapped_case);
}

fn overlapped_case<E: Exec>(cuda: &mut CudaBackend<E>, _: &TwinModel) {
    assert!(cuda.overlaps());
    let (n, vocab) = (12, cuda.config().vocab);
    let params = |step: u32| -> Vec<SampleParams> {
        (0..n)
            .map(|i| SampleParams {
                min_p: [0.0, 0.0, 0.02, 0.0][i % 4],
                temperature: if i % 3 == 0 { 0.0 } else { 0.9 },
                top_k: [0, 5, 50][i % 3],
                top_p: 1.0,
                seed: 7 + i as u64,
                step,
            })
            .collect()
    };
    let steps = 6;
    // Every other row has penalties: counting the tokens drawn before it, known on the
    // host when each step waits for the one before; the last of them carried (counted on
    // the device, as the step's input token) when the step is sent before the one before
    // is collected. A repetition penalty too, on some tokens taken as the prompt's and on
    // those drawn, the last carried likewise.
    let pen = kernels::sampler::Penalties {
        presence: 0.8,
        frequency: 0.6,
        bias: vec![(3, 0.5)],
        repetition: 1.4,
    };
    let prompt_seen = [3u32, 11, 12, 40];
    let adjust = |drawn: &[Vec<u32>], carried: bool| -> Vec<Option<Adjust>> {
        (0..n)
            .map(|i| {
                (i % 2 == 0).then(|| {
                    let mut counts = std::collections::HashMap::new();
                    let known = drawn.len() - usize::from(carried && !drawn.is_empty());
                    for t in &drawn[..known] {
                        *counts.entry(t[i]).or_insert(0u32) += 1;
                    }
                    let deltas = pen.deltas(&counts);
                    let carry = if carried && !drawn.is_empty() {
                        pen.carry(&counts, &deltas)
                    } else {
                        None
                    };
                    Adjust {
                        repeat: pen.repeat(
                            &prompt_seen,
                            &counts,
                            carried && !drawn.is_empty(),
                            vocab,
                        ),
                        deltas,
                        mask: None,
                        carry,
                    }
                })
            })
            .collect()
    };
    // Graph decode steps, then direct launches.
    for graphs in [true, false] {
        cuda.set_graphs(graphs).unwrap();
        // Some steps also read some rows' logits back (none, one, rows apart and a run of
        // two, out of order), and have
        // some rows' log-probabilities computed on the device: of the token drawn (a
        // penalized row's too, 6), of a given token (a prompt's next), with 0 to 20 of the
        // most likely.
        let score = |row: usize, token: Option<u32>, top: usize| Score { row, token, top };
        let rows = |k: usize| -> ReadBack {
            let (rows, scores) = [
                (vec![], vec![]),
                (vec![4], vec![score(1, None, 3)]),
                (
                    vec![9, 2, 3, 5],
                    vec![
                        score(0, Some(17), 0),
                        score(6, None, 20),
                        score(9, Some(2), 1),
                    ],
                ),
            ][k % 3]
                .clone();
            ReadBack {
                rows,
                scores,
                ..ReadBack::default()
            }
        };
        // Step k's scored rows after the step ran alone: the device's log-probabilities
        // ([`Backend::scores`]), which must be the host's from the rows' logits and the
        // step's tokens.
        let host_scores = |cuda: &mut CudaBackend<E>, k: usize, t: &[u32]| {
            let scored = rows(k).scores;
            let at: Vec<usize> = scored.iter().map(|s| s.row).collect();
            let l = cuda.logits_rows(&at).unwrap();
            let device = cuda.scores(&scored).unwrap();
            let host = scored
                .iter()
                .zip(l.chunks_exact(vocab))
                .map(|(s, row)| token_logprobs(row, s.token.unwrap_or(t[s.row]), s.top));
            for (d, h) in device.iter().zip(host) {
                assert_logprobs(d, &h, &format!("step {k} alone"));
            }
            device
        };
        // One step at a time: each decode step's tokens known on the host.
        let mut want: Vec<(Vec<u32>, Vec<f32>)> = Vec::new();
        let mut want_scores: Vec<Vec<TokenLogprobs>> = Vec::new();
        let mut drawn: Vec<Vec<u32>> = Vec::new();
        let mut b = prefill(n);
        let t = cuda
            .step_sample(&b, &params(0), &adjust(&drawn, false))
            .unwrap();
        drawn.push(t.clone());
        want_scores.push(host_scores(cuda, 0, &t));
        want.push((t, cuda.logits_rows(&rows(0).rows).unwrap()));
        for k in 1..=steps {
            b = decode(&b, &want[k - 1].0);
            // The model's logits of the step (it rewrites the same keys and values).
            let model = (!graphs).then(|| cuda.step(&b).unwrap());
            let t = cuda
                .step_sample(&b, &params(k as u32), &adjust(&drawn, false))
                .unwrap();
            drawn.push(t.clone());
            want_scores.push(host_scores(cuda, k, &t));
            let back = cuda.logits_rows(&rows(k).rows).unwrap();
            // Rows read back are the model's, penalized ones (even rows) too: the draw
            // was made from an adjusted copy.
            for (j, r) in rows(k).rows.into_iter().enumerate().filter(|_| !graphs) {
                let m = model.as_ref().unwrap();
                assert_eq!(
                    back[j * vocab..(j + 1) * vocab],
                    m[r * vocab..(r + 1) * vocab],
                    "step {k}: row {r} read back"
                );
            }
            want.push((t, back));
        }
        // Each step sent before the one before is collected, its tokens that one's.
        let from_last: Vec<u32> = (0..n as u32).map(|r| FROM_LAST | r).collect();
        let mut b = prefill(n);
        cuda.submit(&b, &params(0), &adjust(&[], true), &rows(0))
            .unwrap();
        let mut got = Vec::new();
        for k in 1..=steps {
            b = decode(&b, &from_last);
            let a = adjust(&drawn[..k], true);
            cuda.submit(&b, &params(k as u32), &a, &rows(k)).unwrap();
            assert_eq!(cuda.pending(), 2);
            got.push(cuda.collect().unwrap());
        }
        got.push(cuda.collect().unwrap());
        assert_eq!(cuda.pending(), 0);
        // Each step's forward pass sent before the one before is collected, and its
        // sampling after, with adjustments from the tokens just collected (as for a
        // grammar's mask, which the device cannot count).
        let mut late: Vec<Collected> = Vec::new();
        let mut b = prefill(n);
        cuda.submit_forward(&b).unwrap();
        let refused = cuda.submit(&b, &params(0), &[], &ReadBack::default());
        assert!(matches!(refused, Err(StepError::BadBatch(_))), "unsampled");
        assert!(cuda.collect().is_err(), "collecting a step not sampled");
        cuda.submit_sample(&params(0), &adjust(&[], false), &rows(0))
            .unwrap();
        for k in 1..=steps {
            b = decode(&b, &from_last);
            cuda.submit_forward(&b).unwrap();
            late.push(cuda.collect().unwrap());
            let drawn: Vec<Vec<u32>> = late.iter().map(|c| c.tokens.clone()).collect();
            cuda.submit_sample(&params(k as u32), &adjust(&drawn, false), &rows(k))
                .unwrap();
        }
        late.push(cuda.collect().unwrap());
        assert!(
            cuda.submit_sample(&params(0), &[], &ReadBack::default())
                .is_err(),
            "nothing to sample"
        );
        for (k, ((g, l), w)) in got.iter().zip(&late).zip(&want).enumerate() {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (how, g) in [("ahead", g), ("sampled late", l)] {
                let what = format!("graphs {graphs}, {how}: step {k}");
                assert_eq!(g.tokens, w.0, "{what}'s tokens");
                assert_eq!(bits(&g.logits), bits(&w.1), "{what}'s logits");
                assert_eq!(g.logits.len(), rows(k).rows.len() * vocab);
                // The log-probabilities of the step run alone, to the bit (the drawn
                // token's: the step's own draw).
                assert_eq!(g.scores, want_scores[k], "{what}'s scores");
            }
        }
    }
    // What a submitted step may not do.
    let b = prefill(n);
    let bad = |r: Result<(), StepError>| matches!(r, Err(StepError::BadBatch(_)));
    let mut past = decode(&b, &[5; 12]);
    past.tokens[3] = FROM_LAST | 3;
    cuda.step(&b).unwrap();
    let none = ReadBack::default();
    let submitted = cuda.submit(&past, &params(0), &[], &none);
    assert!(bad(submitted), "no submitted step before it");
    cuda.submit(&b, &params(0), &[], &none).unwrap();
    past.tokens[3] = FROM_LAST | n as u32;
    let submitted = cuda.submit(&past, &params(1), &[], &none);
    assert!(bad(submitted), "a row past the step before's");
    past.tokens[3] = FROM_LAST | 11;
    let submitted = cuda.submit(&past, &params(1), &[], &ReadBack::rows(vec![n]));
    assert!(bad(submitted), "logits past its rows");
    let scored = |row| ReadBack {
        rows: vec![],
        scores: vec![Score {
            row,
            token: None,
            top: 1,
        }],
        ..ReadBack::default()
    };
    let submitted = cuda.submit(&past, &params(1), &[], &scored(n));
    assert!(bad(submitted), "a scored row past its rows");
    let hidden = ReadBack {
        hidden: vec![n],
        ..ReadBack::default()
    };
    let submitted = cuda.submit(&past, &params(1), &[], &hidden);
    assert!(bad(submitted), "a hidden state past its rows");
    let sync = cuda.step_sample(&b, &params(0), &[]);
    assert!(sync.is_err(), "a step in flight");
    assert!(cuda.logits_rows(&[0]).is_err(), "logits while in flight");
    cuda.submit(&past, &params(1), &[], &none).unwrap();
    let submitted = cuda.submit(&past, &params(1), &[], &none);
    assert!(bad(submitted), "a third step in flight");
    assert_eq!(cuda.collect().unwrap().tokens.len(), n);
    assert_eq!(cuda.collect().unwrap().tokens.len(), n);
    assert!(cuda.collect().is_err(), "nothing in flight");
    assert_eq!(cuda.step_sample(&b, &params(0), &[]).unwrap().len(), n);
}

#[test]
fn dependent_launches_give_the_bits_of_plain_ones() {
    on_each!("dependent", dependent_case);
}

/// Programmatic dependent launches (Hopper on) change when kernels start, not what they
/// compute: prefills and decode steps (graphs and direct, few rows and many) give the
/// same logits, bit for bit, with them on and off. Skipped where the device has none
/// (the emulator runs kernels one after the other anyway).
fn dependent_case<E: Exec>(cuda: &mut CudaBackend<E>, _: &TwinModel) {
    if !cuda.set_dependent_launch(true).unwrap() {
        eprintln!("SKIPPED on the emulator or a pre-Hopper device: no dependent launches");
        return;
    }
    let vocab = cuda.config().vocab;
    let both = |cuda: &mut CudaBackend<E>, b: &Batch, what: &str| {
        both_ways(cuda, b, what, |c, on| {
            c.set_dependent_launch(on).unwrap();
        })
    };
    for n in [1usize, 3, 16] {
        let p = prefill(n);
        let mut step = decode(&p, &greedy(&both(cuda, &p, "prefill"), vocab));
        for graphs in [true, false] {
            cuda.set_graphs(graphs).unwrap();
            let l = both(cuda, &step, &format!("decode of {n}, graphs {graphs}"));
            step = decode(&step, &greedy(&l, vocab));
        }
    }
    cuda.set_graphs(true).unwrap();
    assert!(cuda.set_dependent_launch(true).unwrap());
}

#[test]
fn the_load_time_self_check_passes() {
    on_each!("self-check", self_check_case);
}

fn self_check_case<E: Exec>(cuda: &mut CudaBackend<E>, twin: &TwinModel) {
    let e = cuda.self_check(twin).unwrap();
    eprintln!("self-check relative error {e:.2e}");
    assert!(e < 2e-3);
}

#[test]
fn hidden_states_match_the_twin_chain() {
    on_each!("hidden", hidden_case);
}

/// A step's final hidden states (an embedding's source), read back after it: the twin
/// chain's, for steps of 1 to 9 rows (prefills and decodes, from graphs and direct
/// launches) with the products of few rows on `gemv_f16` and on the file's own blocks (the
/// final norm fused into the output head: the last residual add is made on the host) and
/// on cuBLAS (launched apart);
/// any of a step's logits rows, in the order asked; refused after a submitted step. And
/// the same states coming back with a submitted step's tokens ([`ReadBack::hidden`]):
/// sent whole or its sampling after its forward pass, a prefill with a logits row per
/// prompt token among them.
fn hidden_case<E: Exec>(cuda: &mut CudaBackend<E>, twin: &TwinModel) {
    let (vocab, d) = (twin.config.vocab, twin.config.dim);
    let (bs, n_blocks) = cuda.kv_geometry();
    // The last row first, then the rest: any order, as asked.
    let order = |n: usize| -> Vec<usize> { std::iter::once(n - 1).chain(0..n - 1).collect() };
    let compare = |got: &[f32], want: &[f32], rows: &[usize], what: &str| {
        let want: Vec<f32> = rows
            .iter()
            .flat_map(|&r| want[r * d..(r + 1) * d].to_vec())
            .collect();
        assert_eq!(got.len(), want.len(), "{what}");
        let e = rel_err(got, &want);
        assert!(e < 2e-3, "{what}: {e}");
    };
    let check = |cuda: &mut CudaBackend<E>, want: &[f32], n: usize, what: &str| {
        let rows = order(n);
        compare(&cuda.hidden_rows(&rows).unwrap(), want, &rows, what);
    };
    // A step submitted with its hidden rows asked for (`late`: its sampling sent after
    // its forward pass), collected: its tokens, checked against the twin's states.
    let submitted = |cuda: &mut CudaBackend<E>, b: &Batch, want: &[f32], late: bool, what: &str| {
        let rows = order(b.n_logits());
        let back = ReadBack {
            hidden: rows.clone(),
            ..ReadBack::default()
        };
        let params = vec![SampleParams::GREEDY; b.n_logits()];
        if late {
            cuda.submit_forward(b).unwrap();
            cuda.submit_sample(&params, &[], &back).unwrap();
        } else {
            cuda.submit(b, &params, &[], &back).unwrap();
        }
        let c = cuda.collect().unwrap();
        compare(&c.hidden, want, &rows, what);
        c.tokens
    };
    let (all, none) = (SmallProducts::ALL, SmallProducts(0));
    for (small, quant) in [(all, none), (all, all), (none, none)] {
        cuda.set_small_products(small).unwrap();
        cuda.set_quant_small(quant).unwrap();
        let small = (small, quant);
        let mut kv = twin.kv(bs, n_blocks);
        for n in [1usize, 3, 9] {
            let p = short_prompts(n, 4, 7);
            let got = cuda.step(&p).unwrap();
            let (_, want) = twin.forward_hidden(&p, &mut kv);
            check(cuda, &want, n, &format!("{small:?}: prefill of {n}"));
            // The same prefill again (it writes the same keys and values), submitted.
            let what = format!("{small:?}: prefill of {n}, submitted");
            submitted(cuda, &p, &want, false, &what);
            let mut step = decode(&p, &greedy(&got, vocab));
            for graphs in [true, false] {
                cuda.set_graphs(graphs).unwrap();
                let got = cuda.step(&step).unwrap();
                let (_, want) = twin.forward_hidden(&step, &mut kv);
                check(
                    cuda,
                    &want,
                    n,
                    &format!("{small:?}: decode of {n}, graphs {graphs}"),
                );
                step = decode(&step, &greedy(&got, vocab));
                for late in [false, true] {
                    let (_, want) = twin.forward_hidden(&step, &mut kv);
                    let what = format!("{small:?}: decode of {n}, graphs {graphs}, late {late}");
                    let tokens = submitted(cuda, &step, &want, late, &what);
                    step = decode(&step, &tokens);
                }
            }
        }
        // Every prompt row a logits row (a scored prompt): the rows' own states.
        let mut p = Batch::default();
        for (s, len) in [3usize, 1, 4].into_iter().enumerate() {
            let toks: Vec<u32> = (0..len as u32).map(|i| 5 + 3 * i + s as u32).collect();
            p.push_rows(&toks, 0, vec![40 + s as u32], len);
        }
        let (_, want) = twin.forward_hidden(&p, &mut twin.kv(bs, n_blocks));
        submitted(
            cuda,
            &p,
            &want,
            false,
            &format!("{small:?}: every prompt row"),
        );
    }
    cuda.set_graphs(true).unwrap();
    cuda.set_quant_small(SmallProducts::default()).unwrap();
    cuda.set_small_products(SmallProducts::default()).unwrap();
    assert!(cuda.hidden_rows(&[9]).is_err(), "past the step's rows");
    // A submitted step keeps none to read.
    let p = short_prompts(2, 9, 2);
    let params = vec![SampleParams::GREEDY; p.n_logits()];
    cuda.submit(&p, &params, &[], &ReadBack::default()).unwrap();
    assert!(cuda.hidden_rows(&[0]).is_err(), "while in flight");
    cuda.collect().unwrap();
    assert!(cuda.hidden_rows(&[0]).is_err(), "after a submitted step");
}

// The steps with more cases than fit here, a file each (after `on_each!`).
mod sampling;
mod small;
mod steps;
