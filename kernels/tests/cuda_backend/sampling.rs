//! Sampling on the device (greedy, temperature, top-k, top-p, seeds, adjustments)
//! against the `sample` rule on the CPU.

use super::*;

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
            min_p: 0.0,
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
                    repeat: None,
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
        repeat: None,
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
