//! Steps whose products of few rows run on `gemv`: fused or apart, against cuBLAS and the
//! twin chain, over rows too wide to stage whole and over K-quant blocks.

use super::*;

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
