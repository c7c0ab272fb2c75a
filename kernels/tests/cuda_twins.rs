//! The CUDA kernels' CPU twins, checked on the CPU: chained in the CUDA backend's order
//! (f16 weights, f16 KV cache, f32 arithmetic) they give the CPU engine's logits and greedy
//! tokens on the synthetic model; the batch builder, KV layout and sampler keep their
//! stated invariants. The GPU kernels are then held to these twins (`cuda_parity/`).

mod common;

use common::{argmax, greedy_compare, tiny};
use kernels::backend::{Backend, CpuBackend};
use kernels::cuda::twins::{self, SampleParams, TwinModel};
use kernels::forward::Batch;

#[test]
fn twin_forward_matches_the_cpu_engine() {
    let model = tiny("twins");
    let twin = TwinModel::from_model(&model);
    let mut cpu = CpuBackend::new(model.clone(), 16, 64, 2).unwrap();
    let mut kv = twin.kv(16, 64);
    // f16 weights, activations between products and KV cache: ~1e-3 relative.
    let (agree, total) = greedy_compare(
        model.config.vocab,
        6,
        2e-2,
        |b| twin.forward(b, &mut kv),
        |b| cpu.step(b).unwrap(),
    );
    assert!(
        agree * 10 >= total * 9,
        "greedy tokens agree {agree}/{total}"
    );
}

#[test]
fn batch_builder_packs_rows_slots_and_logit_rows() {
    let mut b = Batch::default();
    b.push(&[7, 8, 9], 5, vec![4, 2], false);
    b.push(&[1], 16, vec![9, 3, 6], true);
    b.push(&[2, 3], 0, vec![5], true);
    let staging = twins::stage(&b, 4);
    assert_eq!(staging.len(), 3 * 4 + 6 + 3 * 4, "one buffer, one copy");
    let o = twins::build_batch(&staging, &[], 3, 6, 4, 16);
    assert_eq!(o.tokens, [7, 8, 9, 1, 2, 3]);
    assert_eq!(o.positions, [5, 6, 7, 16, 0, 1]);
    assert_eq!(o.seq_of_row, [0, 0, 0, 1, 2, 2]);
    // position 16 of sequence 1 is slot 0 of its second block (3).
    assert_eq!(
        o.slot_mapping,
        [
            4 * 16 + 5,
            4 * 16 + 6,
            4 * 16 + 7,
            3 * 16,
            5 * 16,
            5 * 16 + 1
        ]
    );
    assert_eq!(o.logit_rows, [3, 5, -1]);
    assert_eq!(&o.block_tables[4..8], &[9, 3, 6, 0]);
}

#[test]
fn sampler_twin_greedy_seeds_and_cuts() {
    let x: Vec<f32> = (0..5000)
        .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
        .collect();
    let best = argmax(&x) as u32;
    let p = |temperature, top_k, top_p, seed, step| SampleParams {
        min_p: 0.0,
        temperature,
        top_k,
        top_p,
        seed,
        step,
    };
    assert_eq!(twins::sample(&x, p(0.0, 0, 1.0, 1, 0)), best);
    // top_k = 1 keeps the maximal logits only (this vector has several: ties are kept).
    for s in 0..20 {
        let t = twins::sample(&x, p(1.0, 1, 1.0, 9, s));
        assert_eq!(x[t as usize], x[best as usize]);
    }
    // Same seed and step: same token; the draws vary across steps.
    let a: Vec<u32> = (0..50)
        .map(|s| twins::sample(&x, p(0.8, 40, 0.9, 42, s)))
        .collect();
    let b: Vec<u32> = (0..50)
        .map(|s| twins::sample(&x, p(0.8, 40, 0.9, 42, s)))
        .collect();
    assert_eq!(a, b);
    assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 3);
    // Another seed, other draws.
    let c: Vec<u32> = (0..50)
        .map(|s| twins::sample(&x, p(0.8, 40, 0.9, 43, s)))
        .collect();
    assert_ne!(a, c);
    // Every pick is inside the top 40 (ties included).
    let mut sorted = x.clone();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let kth = sorted[39];
    assert!(a.iter().all(|&t| x[t as usize] >= kth));
    // A tiny top_p keeps only the maximal logits.
    for s in 0..20 {
        let t = twins::sample(&x, p(1.0, 0, 1e-6, 5, s));
        assert_eq!(x[t as usize], x[best as usize]);
    }
}

#[test]
fn sampler_twin_follows_the_softmax() {
    // Four tokens with probabilities 0.1, 0.2, 0.3, 0.4 at temperature 1.
    let x: Vec<f32> = [0.1f32, 0.2, 0.3, 0.4].iter().map(|p| p.ln()).collect();
    let n = 20000;
    let mut counts = [0usize; 4];
    for s in 0..n {
        let t = twins::sample(
            &x,
            SampleParams {
                min_p: 0.0,
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                seed: 7,
                step: s,
            },
        );
        counts[t as usize] += 1;
    }
    for (i, c) in counts.iter().enumerate() {
        let f = *c as f64 / n as f64;
        let want = 0.1 * (i + 1) as f64;
        assert!((f - want).abs() < 0.015, "token {i}: {f} vs {want}");
    }
    // top_p 0.5 keeps 0.4 and 0.3 (0.4 alone is short of half the mass): 4/7 and 3/7.
    let mut counts = [0usize; 4];
    for s in 0..n {
        let p = SampleParams {
            min_p: 0.0,
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            seed: 7,
            step: s,
        };
        counts[twins::sample(&x, p) as usize] += 1;
    }
    assert_eq!(counts[0] + counts[1], 0);
    let f = counts[3] as f64 / n as f64;
    assert!((f - 4.0 / 7.0).abs() < 0.015, "token 3: {f}");
}

#[test]
fn the_samplers_exp_follows_exp_and_keeps_its_order() {
    use kernels::sampler::sample_exp;
    assert_eq!(sample_exp(0.0), 1.0);
    assert_eq!(sample_exp(f32::NEG_INFINITY), 0.0);
    assert_eq!(sample_exp(f32::NAN), 0.0);
    let mut worst = 0.0f64;
    let mut last = 1.0f32;
    let n = 2_000_000;
    for i in 0..=n {
        let z = -86.0 * i as f32 / n as f32;
        let got = sample_exp(z);
        let want = (z as f64).exp();
        worst = worst.max((got as f64 - want).abs() / want);
        // Keys order as probabilities, which must order as the logits.
        assert!(got <= last, "exp({z}) = {got} rises past {last}");
        last = got;
    }
    assert!(worst < 2e-7, "largest relative error {worst:e}");
}

#[test]
fn the_samplers_cuts_are_exact() {
    use kernels::sampler::{kept_key, mass};
    // Probabilities with many ties (and zeros, refused tokens), as keys.
    let mut seed = 0x1234_5678u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    for case in 0..200 {
        let len = 1 + (next() % 3000) as usize;
        let levels = 1 + next() % 50;
        let probs: Vec<f32> = (0..len)
            .map(|_| match next() % levels {
                0 => 0.0,
                l => 1.0 / (1 + l * 37 % 101) as f32,
            })
            .chain([1.0])
            .collect();
        let mut keys: Vec<u32> = probs.iter().map(|p| p.to_bits()).collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        let top_k = [0, 1, 2, 7, 40, len as i32 / 2, len as i32 + 1][case % 7];
        let top_p = [1.0, 0.9, 0.5, 1e-6, 0.999, 0.0][case % 6];
        // The definitions: the k-th largest key; then the largest key t whose mass at or
        // above t (among those kept by k) reaches top_p × their mass (at least 1).
        let mut want = 0;
        if top_k > 0 && (top_k as usize) < probs.len() {
            want = keys[top_k as usize - 1];
        }
        if top_p < 1.0 {
            let kept: Vec<u32> = keys.iter().copied().filter(|&k| k >= want).collect();
            let total: u64 = kept.iter().map(|&k| mass(f32::from_bits(k))).sum();
            let goal = ((top_p as f64 * total as f64) as u64).max(1);
            let mut run = 0;
            for (i, &k) in kept.iter().enumerate() {
                run += mass(f32::from_bits(k));
                let last_of_ties = kept.get(i + 1) != Some(&k);
                if last_of_ties && run >= goal {
                    want = k;
                    break;
                }
            }
        }
        assert_eq!(
            kept_key(&probs, top_k, top_p, 0.0),
            want,
            "case {case}: {len} tokens, top_k {top_k}, top_p {top_p}"
        );
    }
}

/// The GPU's products of few rows may read a matrix's file blocks only where the CPU
/// holds them with the file's own values: each such matrix's blocks give those values
/// exactly (`d · q + m`, one rounding, as the kernels read them). Every matrix of the
/// synthetic Q4_1 model has them (its Q8_0 head too); of the converted layouts, those
/// converted to 8-bit blocks of the same values (Q5_0, Q3_K, IQ4_NL) and, where the CPU
/// has packed kernels, those whose packed form holds what the blocks do not (the K-quant
/// sub-blocks' f32 scales: Q4_K, Q5_K, IQ4_XS; Q6_K's scale per 16; Q5_1's and Q5_K's
/// offsets) and Q2_K's 8-bit blocks with their offsets per 16, never one with values moved.
#[test]
fn file_blocks_are_kept_for_the_gpu_only_with_the_files_values() {
    use kernels::cuda::gemv::QuantRows;
    use kernels::synth::{write_model, SynthSpec};
    // Every value of `r`, as the kernels read it.
    let values = |r: &QuantRows| -> Vec<f32> {
        (0..r.rows * r.k)
            .map(|i| r.weight(i / r.k, i % r.k))
            .collect()
    };
    let mut kept = Vec::new();
    for (name, spec) in [
        ("plain", SynthSpec::tiny()),
        ("k-quants", SynthSpec::tiny_k_quants()),
        ("low-bits", SynthSpec::tiny_low_bits()),
    ] {
        let dir =
            std::env::temp_dir().join(format!("tollgate-blocks-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.gguf");
        write_model(&path, &spec).unwrap();
        let twin = TwinModel::from_model(&kernels::load::load(&path).unwrap().model);
        let g = kernels::gguf::Gguf::open(&path).unwrap();
        // The file's own values of tensors `names`, stacked.
        let file = |names: &[String]| -> Vec<f32> {
            names
                .iter()
                .flat_map(|n| {
                    let t = g.tensor(n).unwrap();
                    let mut v = vec![0f32; t.n_elems()];
                    kernels::quant::dequantize_row(t.ty, g.data(t), &mut v);
                    v
                })
                .collect()
        };
        let mut count = 0;
        let out = if g.tensor("output.weight").is_some() {
            "output"
        } else {
            "token_embd"
        };
        // A stack's parts (one where they are of one layout), one after the other.
        let mut check = |parts: &[QuantRows], names: Vec<String>, what: &str| {
            if !parts.is_empty() {
                let got: Vec<f32> = parts.iter().flat_map(values).collect();
                let want = file(&names);
                assert!(
                    // Equal as numbers (0 · a negative d is −0 in the file's arithmetic).
                    got.len() == want.len() && got.iter().zip(&want).all(|(a, b)| a == b),
                    "{name}: {what}'s blocks are not the file's values"
                );
                count += 1;
            }
        };
        check(
            twin.output_q.as_slice(),
            vec![format!("{out}.weight")],
            "the head",
        );
        for (i, l) in twin.layers.iter().enumerate() {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let q = &l.quant;
            check(&q.wqkv, vec![n("attn_q"), n("attn_k"), n("attn_v")], "qkv");
            check(q.wo.as_slice(), vec![n("attn_output")], "wo");
            check(&q.w_gate_up, vec![n("ffn_gate"), n("ffn_up")], "gate|up");
            check(q.w_down.as_slice(), vec![n("ffn_down")], "down");
        }
        kept.push((name, count));
    }
    // plain: 4 a layer and the head; k-quants: each layer's four (its Q4_K|Q5_K|Q6_K QKV
    // and Q4_K|Q5_1 gate|up as stacks of parts) and the Q6_K head; low-bits: each layer's
    // four (its Q3_K|IQ4_XS|Q2_K QKV, the Q2_K part with its offsets per 16; IQ4_NL
    // attn_output, Q3_K ffn_down and IQ4_XS|Q3_K gate|up) and the IQ4_XS head. On a CPU
    // without packed kernels the K-quant scales are rounded (the GPU's f16 rows are read
    // from the file) and no block is kept.
    let converted = if kernels::packed::available() {
        (9, 9)
    } else {
        (0, 0)
    };
    assert_eq!(
        kept,
        [
            ("plain", 9),
            ("k-quants", converted.0),
            ("low-bits", converted.1)
        ]
    );
}
