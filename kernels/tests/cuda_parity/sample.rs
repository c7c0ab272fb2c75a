//! Sampling and log-probabilities against their twins.

use super::*;

#[test]
fn sampling_matches_its_twin() {
    on_each!(sampling_case);
}

fn sampling_case<E: Exec>(g: &E) {
    let mut rng = Rng(8);
    let (s, vocab) = (64, 49152);
    let logits = rng.vec(s * vocab, 8.0);
    let params: Vec<SampleParams> = (0..s)
        .map(|i| SampleParams {
            // vLLM's min_p, alone and before the other cuts: none, 1 (the top only), a
            // denormal floor (nearly none) and others.
            min_p: [0.0, 0.1, 0.0, 0.02, 0.5, 1.0, 1e-40][i % 7],
            temperature: if i % 4 == 0 {
                0.0
            } else {
                0.3 + (i % 5) as f32 * 0.3
            },
            // Every cut alone and with the other: none, k = 1, ties at a small k, a
            // large k, k past the vocabulary; top_p 1 (none), 0 (the top only), others.
            top_k: [0, 1, 20, 200, 0, 60000][i % 6],
            top_p: [1.0, 0.9, 0.5, 0.95, 0.0][(i / 3) % 5],
            seed: 1000 + i as u64,
            step: i as u32 * 3,
        })
        .collect();
    // Rows 8 and on are adjusted, in turn: deltas only (every other such row with its
    // input token carried: penalties counting a token the step before drew); a mask
    // keeping about half the tokens; one keeping about 1 in 500 with deltas on some kept
    // ones (a grammar's row); a mask shorter than the row (the rest refused), every other
    // one carried.
    let adjust: Vec<Option<Adjust>> = (0..s)
        .map(|i| {
            let deltas = |rng: &mut Rng, n: usize| {
                Adjust::merged((0..n).map(|_| (rng.below(vocab + 10) as u32, rng.f32() * 3.0)))
            };
            let mask = |rng: &mut Rng, words: usize, keep_in: usize| {
                let mut m = vec![0u32; words];
                for t in 0..(words * 32).min(vocab) {
                    if rng.below(keep_in) == 0 {
                        m[t / 32] |= 1 << (t % 32);
                    }
                }
                m
            };
            let words = vocab.div_ceil(32);
            match (i >= 8).then_some(i % 4) {
                None => None,
                Some(0) => {
                    let deltas = deltas(&mut rng, 300);
                    let carry = (i % 8 == 0).then(|| Carry {
                        fresh: -rng.f32() * 2.0,
                        alt: deltas.iter().map(|_| -rng.f32() * 4.0).collect(),
                    });
                    Some(Adjust {
                        repeat: None,
                        deltas,
                        mask: None,
                        carry,
                    })
                }
                Some(1) => Some(Adjust {
                    repeat: None,
                    deltas: vec![],
                    mask: Some(mask(&mut rng, words, 2)),
                    carry: None,
                }),
                Some(2) => {
                    let m = mask(&mut rng, words, 500);
                    let kept: Vec<u32> = (0..vocab as u32)
                        .filter(|&t| allowed(&m, t as usize))
                        .collect();
                    Some(Adjust {
                        repeat: None,
                        deltas: Adjust::merged(kept.iter().step_by(3).map(|&t| (t, 2.5))),
                        mask: Some(m),
                        carry: None,
                    })
                }
                // Every other one with its input token carried too (its fresh delta
                // only where the mask allows the token).
                _ => {
                    let deltas = deltas(&mut rng, 5);
                    let carry = (i % 8 == 7).then(|| Carry {
                        fresh: 3.0 + rng.f32(),
                        alt: deltas.iter().map(|_| rng.f32()).collect(),
                    });
                    Some(Adjust {
                        repeat: None,
                        deltas,
                        mask: Some(mask(&mut rng, words / 2, 4)),
                        carry,
                    })
                }
            }
        })
        .collect();
    // Each row's input token, at position 2i + 1 of a step's 2s tokens: for carried rows,
    // in turn one of its listed tokens and one most likely not listed.
    let logit_rows: Vec<i32> = (0..s as i32).map(|i| 2 * i + 1).collect();
    let mut inputs: Vec<u32> = (0..2 * s).map(|_| rng.below(vocab) as u32).collect();
    for (i, a) in adjust.iter().enumerate() {
        if let Some(a) = a.as_ref().filter(|a| a.carry.is_some() && i % 16 == 0) {
            let listed: Vec<u32> = a
                .deltas
                .iter()
                .map(|d| d.0)
                .filter(|&t| (t as usize) < vocab)
                .collect();
            inputs[2 * i + 1] = listed[rng.below(listed.len())];
        }
        // A masked carried row: in turn an input token the mask allows (most are refused).
        if let Some(m) = a
            .as_ref()
            .filter(|a| a.carry.is_some() && i % 16 == 15)
            .and_then(|a| a.mask.as_ref())
        {
            let from = rng.below(vocab / 2);
            let t = (from..vocab).find(|&t| allowed(m, t)).unwrap();
            inputs[2 * i + 1] = t as u32;
        }
    }
    // Every third row from 8 on (masked or not, carried or not) has a repetition penalty
    // too: seen tokens (some past the row) scaled by a factor above or below 1, every
    // other one's input token too (in turn listed and, most likely, not).
    let mut adjust = adjust;
    for (i, a) in adjust
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| i % 3 == 0 && *i >= 8)
    {
        // Every third such row sees more tokens than its bitmask's words: sent as that.
        let n = if i % 9 == 0 { 3000 } else { 150 };
        let mut tokens: Vec<u32> = (0..n).map(|_| rng.below(vocab + 10) as u32).collect();
        tokens.sort_unstable();
        tokens.dedup();
        let last = i % 6 == 0;
        if last && i % 16 != 0 && i % 16 != 15 {
            inputs[2 * i + 1] = if i % 12 == 0 {
                tokens[rng.below(tokens.len() / 2)]
            } else {
                rng.below(vocab) as u32
            };
        }
        let repeat = Some(Repeat::new(
            [1.3, 0.7, 2.0][(i / 3) % 3],
            tokens,
            last,
            vocab,
        ));
        assert_eq!(repeat.as_ref().unwrap().bits, i % 9 == 0);
        match a {
            Some(a) => a.repeat = repeat,
            None => {
                *a = Some(Adjust {
                    repeat,
                    ..Adjust::default()
                })
            }
        }
    }
    assert!(adjust.iter().flatten().all(Adjust::is_well_formed));
    let mut adjusted = logits.clone();
    for (i, (row, a)) in adjusted.chunks_exact_mut(vocab).zip(&adjust).enumerate() {
        if let Some(a) = a {
            a.apply_after(row, inputs[2 * i + 1]);
        }
    }
    let want: Vec<u32> = (0..s)
        .map(|i| twins::sample(&adjusted[i * vocab..(i + 1) * vocab], params[i]))
        .collect();
    let mut extra = Vec::new();
    let offsets: Vec<u32> = adjust
        .iter()
        .map(|a| match a {
            Some(a) => {
                let at = extra.len() as u32;
                a.write(&mut extra);
                at
            }
            None => u32::MAX,
        })
        .collect();
    let ld = up(g, &logits);
    let temp = up(g, &params.iter().map(|p| p.temperature).collect::<Vec<_>>());
    let topk = up(g, &params.iter().map(|p| p.top_k).collect::<Vec<_>>());
    let topp = up(g, &params.iter().map(|p| p.top_p).collect::<Vec<_>>());
    let minp = up(g, &params.iter().map(|p| p.min_p).collect::<Vec<_>>());
    let seeds = up(g, &params.iter().map(|p| p.seed).collect::<Vec<_>>());
    let steps = up(g, &params.iter().map(|p| p.step).collect::<Vec<_>>());
    let (offs, extra) = (up(g, &offsets), up(g, &extra));
    let (inputs, logit_rows) = (up(g, &inputs), up(g, &logit_rows));
    let out = up(g, &vec![u32::MAX; s]);
    // Poisoned: an adjusted row's every element must be written.
    let scratch = up(g, &vec![f32::NAN; s * vocab]);
    let args = [
        ld.arg(),
        scratch.arg(),
        i(vocab),
        temp.arg(),
        topk.arg(),
        topp.arg(),
        minp.arg(),
        seeds.arg(),
        steps.arg(),
        offs.arg(),
        extra.arg(),
        inputs.arg(),
        logit_rows.arg(),
        out.arg(),
    ];
    g.launch("sample", cfg(s as u32, twins::SAMPLE_THREADS as u32), &args)
        .unwrap();
    let got = down(g, &out);
    let what = g.describe();
    // The logits stay the model's (what a row read back for its log-probabilities
    // shows); the adjusted rows, beside them, are exactly the twin's (one f32 add per
    // delta).
    assert!(
        down(g, &ld).iter().zip(&logits).all(|(a, b)| a == b),
        "{what}: the sample kernel changed the logits"
    );
    let rows = down(g, &scratch);
    for (i, (a, b)) in rows
        .chunks_exact(vocab)
        .zip(adjusted.chunks_exact(vocab))
        .enumerate()
        .filter(|(i, _)| adjust[*i].is_some())
    {
        assert!(
            a.iter()
                .zip(b)
                .all(|(x, y)| x == y || x.is_nan() && y.is_nan()),
            "{what}: row {i} adjusted unlike its twin"
        );
    }
    for i in (0..s).step_by(4) {
        assert_eq!(got[i], want[i], "{what}: greedy row {i}");
    }
    for (i, (&t, a)) in got.iter().zip(&adjust).enumerate() {
        if let Some(m) = a.as_ref().and_then(|a| a.mask.as_ref()) {
            assert!(
                allowed(m, t as usize),
                "{what}: row {i} drew refused token {t}"
            );
        }
    }
    // Masses are integers and the probabilities the same fused multiply-adds: every
    // draw is the twin's.
    assert_eq!(got, want, "{what}: sampled tokens");
}

#[test]
fn logprobs_match_their_twin() {
    on_each!(logprobs_case);
}

fn logprobs_case<E: Exec>(g: &E) {
    let mut rng = Rng(11);
    let (rows, vocab) = (12, 49152);
    let mut logits = rng.vec(rows * vocab, 12.0);
    let row = |r: usize| r * vocab..(r + 1) * vocab;
    // Row 1: whole numbers only (ties at every rank, the 20th among them); row 2: one
    // value everywhere; row 3: NaNs, infinities and both zeros as its largest; row 4:
    // fewer numbers than asked for (the rest NaN); row 5: every logit −∞.
    for x in &mut logits[row(1)] {
        *x = x.round();
    }
    logits[row(2)].fill(-3.5);
    for (j, x) in logits[row(3)].iter_mut().enumerate() {
        *x = match j % 7 {
            0 => f32::NAN,
            1 => f32::NEG_INFINITY,
            _ if j % 1000 == 5 => -0.0,
            _ if j % 1000 == 9 => 0.0,
            _ => *x - 13.0,
        };
    }
    for (j, x) in logits[row(4)].iter_mut().enumerate() {
        if j % 4096 != 7 {
            *x = f32::NAN;
        }
    }
    logits[row(5)].fill(f32::NEG_INFINITY);
    let sampled: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
    // (row, token, top): drawn tokens and given ones, one past the vocabulary; top from 0
    // to past the most (20).
    let specs: Vec<(u32, u32, u32)> = vec![
        (0, u32::MAX, 20),
        (1, u32::MAX, 20),
        (2, 77, 20),
        (3, u32::MAX, 20),
        (4, 7, 20),
        (5, 3, 4),
        (6, 123, 0),
        (7, vocab as u32 + 5, 1),
        (8, u32::MAX, 25),
        (11, u32::MAX, 5),
        (0, 9, 2),
    ];
    let spec: Vec<u32> = specs.iter().flat_map(|&(r, t, k)| [r, t, k]).collect();
    let words = kernels::logprobs::SCORE_WORDS;
    let poison = 0xDEAD_BEEFu32;
    let (ld, sd, sp) = (up(g, &logits), up(g, &sampled), up(g, &spec));
    let out = up(g, &vec![poison; specs.len() * words]);
    let args = [ld.arg(), i(vocab), sp.arg(), sd.arg(), out.arg()];
    g.launch(
        "logprobs",
        cfg(specs.len() as u32, twins::SAMPLE_THREADS as u32),
        &args,
    )
    .unwrap();
    let got = down(g, &out);
    let what = g.describe();
    for (k, (&(r, t, top), w)) in specs.iter().zip(got.chunks_exact(words)).enumerate() {
        let r = r as usize;
        let token = if t == u32::MAX { sampled[r] } else { t };
        let l = &logits[r * vocab..(r + 1) * vocab];
        let want = kernels::logprobs::token_logprobs(l, token, top as usize);
        let n = want.top.len();
        assert!(
            w[..4 + 2 * n].iter().all(|&x| x != poison),
            "{what}: score {k}: words unwritten"
        );
        let d = kernels::logprobs::from_words(w);
        common::assert_logprobs(&d, &want, &format!("{what}: score {k}"));
    }
}
