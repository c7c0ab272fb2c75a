//! The CUDA backend as the engine uses it, on the tiny synthetic model: decode steps
//! replayed from CUDA graphs (padded to their bucket) give the logits of direct launches;
//! sampling on the device gives the tokens of the `sample` rule on the CPU; the load-time
//! self-check passes.
//!
//! Each test runs on the CPU emulator (the same kernel sources, launches, staging copy and
//! graph logic; a graph there replays its recorded launches with their captured arguments)
//! and on GPU 0, skipped with a printed reason where there is none. On a GPU machine:
//! `kernels/gpu-check.sh` runs this binary.

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
    // is collected.
    let pen = kernels::sampler::Penalties {
        presence: 0.8,
        frequency: 0.6,
        bias: vec![(3, 0.5)],
    };
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
fn sampling_on_the_device_follows_the_sample_rule() {
    on_each!("device-sampling", sampling_case);
}

fn sampling_case<E: Exec>(cuda: &mut CudaBackend<E>, _: &TwinModel) {
    assert!(cuda.samples_on_device());
    let vocab = cuda.config().vocab;
    let n = 12;
    let p = prefill(n);
    let params: Vec<SampleParams> = (0..n)
        .map(|i| SampleParams {
            temperature: if i % 3 == 0 { 0.0 } else { 0.8 },
            top_k: [0, 5, 50][i % 3],
            top_p: if i % 2 == 0 { 1.0 } else { 0.9 },
            seed: 42 + i as u64,
            step: 0,
        })
        .collect();
    // A step rewrites its rows' keys and values with the same values, so running the same
    // batch twice (logits, then sampled) sees the same cache.
    let logits = cuda.step(&p).unwrap();
    let tokens = cuda.step_sample(&p, &params, &[]).unwrap();
    assert_eq!(tokens.len(), n);
    let want: Vec<u32> = logits
        .chunks_exact(vocab)
        .zip(&params)
        .map(|(r, &q)| twins::sample(r, q))
        .collect();
    for i in (0..n).step_by(3) {
        assert_eq!(tokens[i], want[i], "greedy row {i}");
    }
    let same = tokens.iter().zip(&want).filter(|(a, b)| a == b).count();
    assert!(
        same + 1 >= n,
        "{same}/{n} sampled tokens agree with the CPU rule"
    );
    // The logits the sampled step left on the device, read back by row (what logprobs
    // need): the unsampled step's rows; rows past the step's are refused.
    let rows = cuda.logits_rows(&[0, 5, n - 1]).unwrap();
    for (k, r) in [0, 5, n - 1].into_iter().enumerate() {
        let e = rel_err(
            &rows[k * vocab..(k + 1) * vocab],
            &logits[r * vocab..(r + 1) * vocab],
        );
        assert!(e < 1e-6, "row {r}: {e}");
    }
    assert!(cuda.logits_rows(&[n]).is_err());
    // A decode step (a graph) samples on the device too.
    let d = decode(&p, &tokens);
    let mut greedy_params = params.clone();
    for q in greedy_params.iter_mut() {
        q.temperature = 0.0;
        q.step = 1;
    }
    cuda.set_graphs(false).unwrap();
    let l = cuda.step(&d).unwrap();
    cuda.set_graphs(true).unwrap();
    let t = cuda.step_sample(&d, &greedy_params, &[]).unwrap();
    let want = greedy(&l, vocab);
    let same = t.iter().zip(&want).filter(|(a, b)| a == b).count();
    assert!(same + 1 >= n, "graph greedy decode: {same}/{n}");
    // Adjusted rows through the graph: every other row's best token refused by its mask,
    // and a delta that lifts another; every fourth also counts its input token (a carry,
    // read from the step's packed tokens); the draws are the adjusted rows' greedy tokens.
    let adjust: Vec<Option<Adjust>> = (0..n)
        .map(|r| {
            let row = &l[r * vocab..(r + 1) * vocab];
            (r % 2 == 1).then(|| {
                let mut mask = vec![u32::MAX; vocab.div_ceil(32)];
                let best = greedy(row, vocab)[0] as usize;
                mask[best / 32] &= !(1 << (best % 32));
                Adjust {
                    deltas: vec![(7 + r as u32, 1.0)],
                    mask: Some(mask),
                    carry: (r % 4 == 3).then(|| Carry {
                        fresh: 40.0,
                        alt: vec![-3.0],
                    }),
                }
            })
        })
        .collect();
    let t = cuda.step_sample(&d, &greedy_params, &adjust).unwrap();
    let mut adjusted = l.clone();
    let inputs = d.logit_tokens();
    for (r, (row, a)) in adjusted.chunks_exact_mut(vocab).zip(&adjust).enumerate() {
        if let Some(a) = a {
            a.apply_after(row, inputs[r]);
        }
    }
    let want = greedy(&adjusted, vocab);
    let same = t.iter().zip(&want).filter(|(a, b)| a == b).count();
    assert!(same + 1 >= n, "graph greedy decode, adjusted: {same}/{n}");
    // The rows read back are the model's logits, not the adjusted copies the draws were
    // made from (their best tokens refused): what log-probabilities report.
    let back = cuda.logits_rows(&[1, 3]).unwrap();
    for (k, r) in [1, 3].into_iter().enumerate() {
        let e = rel_err(
            &back[k * vocab..(k + 1) * vocab],
            &l[r * vocab..(r + 1) * vocab],
        );
        // (A graph's step against a direct one's: padded rows, as above.)
        assert!(e < 2e-3, "adjusted row {r} read back: {e}");
    }
    for r in (1..n).step_by(2) {
        assert_ne!(
            t[r],
            greedy(&l[r * vocab..(r + 1) * vocab], vocab)[0],
            "row {r}: refused token drawn"
        );
    }
    // A carried row's input token, lifted by 40, is drawn unless refused.
    for r in (3..n).step_by(4) {
        let a = adjust[r].as_ref().unwrap();
        if allowed(a.mask.as_ref().unwrap(), inputs[r] as usize) && inputs[r] != 7 + r as u32 {
            assert_eq!(t[r], inputs[r], "row {r}: its carried input token");
        }
    }
    // Wrong parameter or adjustment counts, and adjustments past the room, are refused.
    assert!(cuda.step_sample(&d, &greedy_params[1..], &[]).is_err());
    assert!(cuda.step_sample(&d, &greedy_params, &adjust[1..]).is_err());
    let huge = Adjust {
        deltas: vec![(0, 1.0); cuda.adjust_room() / 2],
        mask: None,
        carry: None,
    };
    let too_much: Vec<Option<Adjust>> = (0..n).map(|_| Some(huge.clone())).collect();
    assert!(matches!(
        cuda.step_sample(&d, &greedy_params, &too_much),
        Err(kernels::forward::StepError::BadBatch(_))
    ));
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

#[test]
fn fused_products_of_few_rows_give_the_bits_of_their_kernels_apart() {
    on_each!("fused-small", fused_small_case);
}

/// With every product of 1–16 rows on `gemv_f16`, and again on the file's own blocks
/// (`gemv_q4`, `gemv_q8`: the synthetic model's Q4_1 layers and Q8_0 head), steps of 1 to
/// 9 and 15 sequences (prefills and decodes, from graphs and direct launches; 15 decodes
/// in the bucket of 16) give the same logits, bit for bit, with the norms, swiglu and RoPE
/// with the cache write fused into the products and launched apart (prefills of more than
/// 16 rows: cuBLAS, never fused, the control).
fn fused_small_case<E: Exec>(cuda: &mut CudaBackend<E>, twin: &TwinModel) {
    let vocab = twin.config.vocab;
    cuda.set_small_products(SmallProducts::ALL).unwrap();
    assert_eq!(cuda.fused_small(), SmallProducts::ALL, "fused by default");
    assert!(cuda.has_quant(), "the synthetic model's blocks are held");
    let both = |cuda: &mut CudaBackend<E>, b: &Batch, what: &str| {
        both_ways(cuda, b, what, |c, on| c.set_fused_small(fused(on)).unwrap())
    };
    for quant in [SmallProducts(0), SmallProducts::ALL] {
        cuda.set_quant_small(quant).unwrap();
        for n in (1..=9usize).chain([15]) {
            let p = short_prompts(n, 2, 3);
            let got = both(cuda, &p, &format!("{quant:?}: prefill of {n}"));
            let mut step = decode(&p, &greedy(&got, vocab));
            for graphs in [true, false] {
                cuda.set_graphs(graphs).unwrap();
                let what = format!("{quant:?}: decode of {n}, graphs {graphs}");
                let got = both(cuda, &step, &what);
                step = decode(&step, &greedy(&got, vocab));
            }
        }
    }
    cuda.set_graphs(true).unwrap();
    cuda.set_fused_small(SmallProducts::ALL).unwrap();
    cuda.set_quant_small(SmallProducts::default()).unwrap();
    cuda.set_small_products(SmallProducts::default()).unwrap();
}

#[test]
fn products_of_few_rows_on_gemv_match_cublas_and_the_twin_chain() {
    on_each!("small-products", small_products_case);
}

/// Steps of 1 to 9 and 15 sequences (prefills of up to 4 tokens a sequence, decodes)
/// with the products of 1–16 rows on `gemv_f16`, on the file's own blocks and
/// on cuBLAS: each within the twin chain's bound (the twin's f16 weights; the blocks'
/// own values differ from them by its rounding), from graphs and direct launches; then
/// the load-time choice, timed, keeps the fastest per bucket.
fn small_products_case<E: Exec>(cuda: &mut CudaBackend<E>, twin: &TwinModel) {
    let vocab = twin.config.vocab;
    let (bs, n_blocks) = cuda.kv_geometry();
    let all = SmallProducts::ALL;
    for (small, quant) in [
        (all, SmallProducts(0)),
        (SmallProducts(0), SmallProducts(0)),
        (SmallProducts(0b1010_0101), SmallProducts(0)),
        (all, all),
        (all, SmallProducts(0b0110_1001)),
    ] {
        cuda.set_small_products(small).unwrap();
        cuda.set_quant_small(quant).unwrap();
        assert_eq!((cuda.small_products(), cuda.quant_small()), (small, quant));
        let small = (small, quant);
        let mut kv = twin.kv(bs, n_blocks);
        for n in (1..=9usize).chain([15]) {
            let p = short_prompts(n, 3, 5);
            let got = cuda.step(&p).unwrap();
            let want = twin.forward(&p, &mut kv);
            let e = rel_err(&got, &want);
            assert!(e < 2e-3, "{small:?}: prefill of {n}: {e}");
            let mut step = decode(&p, &greedy(&got, vocab));
            for graphs in [true, false] {
                cuda.set_graphs(graphs).unwrap();
                let got = cuda.step(&step).unwrap();
                let want = twin.forward(&step, &mut kv);
                let e = rel_err(&got, &want);
                assert!(e < 2e-3, "{small:?}: decode of {n}, graphs {graphs}: {e}");
                step = decode(&step, &greedy(&got, vocab));
            }
        }
    }
    // Buckets 1, 2, 4, 8 and 16 timed five ways (cuBLAS; gemv_f16 and the blocks, each
    // fused and apart); each row count follows its bucket's fastest.
    cuda.set_graphs(true).unwrap();
    cuda.set_quant_small(SmallProducts::default()).unwrap();
    let timings = cuda.tune_small_products(3).unwrap();
    assert_eq!(
        timings.iter().map(|t| t.bucket).collect::<Vec<_>>(),
        [1, 2, 4, 8, 16]
    );
    let (small, quant, fused) = (
        cuda.small_products(),
        cuda.quant_small(),
        cuda.fused_small(),
    );
    for t in &timings {
        let q = t.quant_secs.expect("the synthetic model's blocks timed");
        let qa = t
            .quant_apart_secs
            .expect("the synthetic model's blocks timed");
        let secs = [t.cublas_secs, t.gemv_secs, t.gemv_apart_secs, q, qa];
        assert!(secs.iter().all(|&s| s > 0.0), "{t:?}");
        let rows: &[usize] = match t.bucket {
            1 => &[1],
            2 => &[2],
            4 => &[3, 4],
            8 => &[5, 6, 7, 8],
            _ => &[9, 10, 11, 12, 13, 14, 15, 16],
        };
        let fastest = (0..secs.len()).fold(0, |b, k| if secs[k] < secs[b] { k } else { b });
        for &r in rows {
            // cuBLAS's way leaves the row count fused (no product of it is on gemv).
            assert_eq!(
                (small.gemv(r), quant.gemv(r), fused.gemv(r)),
                (fastest > 0, fastest >= 3, fastest != 2 && fastest != 4),
                "{t:?}: {small:?} {quant:?} {fused:?}"
            );
        }
    }
    assert_eq!(cuda.small_product_timings(), &timings[..]);
    cuda.set_quant_small(SmallProducts::default()).unwrap();
    cuda.set_fused_small(SmallProducts::ALL).unwrap();
}

#[test]
fn rows_wider_than_2048_run_on_gemv_and_match_the_twin_chain() {
    let spec = SynthSpec {
        ffn_dim: 2560,
        ..SynthSpec::tiny()
    };
    if let Some((mut b, twin)) = on_emu("wide-rows", &spec) {
        wide_rows_case(&mut b, &twin);
        // The 2,560-wide product took gemv, fused with swiglu, over both kinds of weights.
        for k in ["gemv_f16_swiglu", "gemv_q4_swiglu"] {
            assert!(b.exec().launches(k) > 0, "{k} never ran");
        }
    }
    if let Some((mut b, twin)) = on_gpu("wide-rows", &spec) {
        wide_rows_case(&mut b, &twin);
    }
}

#[test]
fn a_step_whose_rows_are_read_in_runs_of_columns_stays_fused() {
    // A block's shared memory of 9,000 bytes: the tiny model's rows (128 and 256 wide) fit
    // whole at 1 row, and at the 3 and 6 rows below only in runs of their columns — the
    // QKV product with RoPE and the cache write, gate|up with the norm, down with SwiGLU
    // and the output head with the final norm, each in 2 to 4 launches.
    let spec = SynthSpec::tiny();
    let model = common::synthetic("runs", &spec);
    let twin = TwinModel::from_model(&model);
    let Some(emu) = common::emu_for(&twin.config) else {
        return;
    };
    let emu = emu.with_shared_bytes(9000);
    let what = emu.describe();
    let mut b = CudaBackend::on(emu, what, &twin, 16, KvCapacity::Blocks(128), 128, 16).unwrap();
    wide_rows_case(&mut b, &twin);
    // Each layer of a prefill of 6 rows stayed fused (before, rows that did not fit whole
    // ran every kernel apart): its QKV product's last run rotated, no norm was launched.
    b.set_small_products(SmallProducts::ALL).unwrap();
    for (quant, kind) in [(SmallProducts(0), "f16"), (SmallProducts::ALL, "q4")] {
        b.set_quant_small(quant).unwrap();
        let kernels = [
            format!("gemv_{kind}_norm_rope"),
            format!("gemv_{kind}_swiglu"),
            "add_rmsnorm".to_string(),
        ];
        let count = |b: &CudaBackend<Emu>| kernels.clone().map(|k| b.exec().launches(&k));
        let before = count(&b);
        b.step(&short_prompts(3, 3, 5)).unwrap();
        let [rope, swiglu, norm] = count(&b).map(|n| n as usize);
        let layers = twin.config.n_layers;
        assert_eq!(rope - before[0] as usize, layers, "{kind}: QKV products");
        assert!(
            swiglu - before[1] as usize >= layers,
            "{kind}: down products"
        );
        assert_eq!(norm, before[2] as usize, "{kind}: norms apart");
    }
    b.set_quant_small(SmallProducts::default()).unwrap();
    b.set_small_products(SmallProducts::default()).unwrap();
}

/// A feed-forward of 2,560 (SmolLM2-360M's: the down product's rows are wider than the
/// 2,048 the `gemv` kernels once took), or a model of K-quant blocks: with every product
/// of few rows on `gemv`, over the f16 rows and over the file's blocks, a prefill and
/// decodes of 3 sequences give the same bits fused and apart and are within the twin
/// chain's bound.
fn wide_rows_case<E: Exec>(cuda: &mut CudaBackend<E>, twin: &TwinModel) {
    let vocab = twin.config.vocab;
    let (bs, n_blocks) = cuda.kv_geometry();
    cuda.set_small_products(SmallProducts::ALL).unwrap();
    assert!(cuda.has_quant(), "the synthetic model's blocks are held");
    for quant in [SmallProducts(0), SmallProducts::ALL] {
        cuda.set_quant_small(quant).unwrap();
        let mut kv = twin.kv(bs, n_blocks);
        let mut step = short_prompts(3, 3, 5);
        for s in 0..3 {
            let what = format!("{quant:?}: step {s}");
            let got = both_ways(cuda, &step, &what, |c, on| {
                c.set_fused_small(fused(on)).unwrap()
            });
            let want = twin.forward(&step, &mut kv);
            let e = rel_err(&got, &want);
            assert!(e < 2e-3, "{what}: {e}");
            step = decode(&step, &greedy(&got, vocab));
        }
    }
    cuda.set_fused_small(SmallProducts::ALL).unwrap();
    cuda.set_quant_small(SmallProducts::default()).unwrap();
    cuda.set_small_products(SmallProducts::default()).unwrap();
}

#[test]
fn k_quant_blocks_on_gemv_match_the_twin_chain() {
    use kernels::gguf::GgmlType;
    // A K-quant mix: Q5_K Q and K and Q6_K V (Q5_K_M's QKV: a stack of two parts,
    // `gemv_q5f` for Q|K — parts the CPU holds apart, their offsets keeping them from
    // stacking there — and `gemv_q6h` for V: Q6_K's integers at 6 bits), Q4_K attn_output
    // (`gemv_q4f`), Q3_K gate and Q2_K up (a stack of two parts: `gemv_q4h`, Q3_K's 4-bit
    // integers under scales per 16, from the CPU's Q8_0 blocks; `gemv_q2h`, Q2_K's 2-bit
    // ones under scales and offsets per 16, from its Q8_0 blocks and offsets), Q6_K
    // ffn_down (`gemv_q6h`), an IQ4_XS head (`gemv_iq4f`: its levels from 4-bit indices).
    let spec = SynthSpec {
        types: vec![
            ("attn_q", GgmlType::Q5_K),
            ("attn_k", GgmlType::Q5_K),
            ("attn_v", GgmlType::Q6_K),
            ("attn_output", GgmlType::Q4_K),
            ("ffn_gate", GgmlType::Q3_K),
            ("ffn_up", GgmlType::Q2_K),
            ("ffn_down", GgmlType::Q6_K),
            ("output", GgmlType::IQ4_XS),
        ],
        ..SynthSpec::tiny_k_quants()
    };
    if !kernels::packed::available() {
        println!("SKIPPED: this CPU has no packed kernels, which make the K-quant blocks' scales");
        return;
    }
    if let Some((mut b, twin)) = on_emu("k-quant-blocks", &spec) {
        // Two layers' QKV, attn_output, gate|up, ffn_down; the head.
        assert_eq!(
            b.quant_summary(),
            "1 iq4f, 2 q4f, 2 q4h+q2h, 2 q5f+q6h, 2 q6h"
        );
        wide_rows_case(&mut b, &twin);
        // Each product of the mix took its kernel, in each of the forms the step fuses.
        for k in [
            "gemv_q5f_norm_rope",
            "gemv_q6h_norm_rope",
            "gemv_q6h",
            "gemv_q4f",
            "gemv_q4h_norm",
            "gemv_q2h_norm",
            "gemv_q6h_swiglu",
            "gemv_iq4f_norm",
        ] {
            assert!(b.exec().launches(k) > 0, "{k} never ran");
        }
    }
    if let Some((mut b, twin)) = on_gpu("k-quant-blocks", &spec) {
        wide_rows_case(&mut b, &twin);
    }
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
