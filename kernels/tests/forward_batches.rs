//! The forward step refuses malformed batches with an error (never a panic or an
//! out-of-bounds access), and computes each row independently of its batch-mates; the
//! backend's default `step_sample` is the `sample` rule over its logits.

mod common;

use kernels::backend::{Backend, CpuBackend};
use kernels::forward::Batch;
use kernels::synth::{write_model, SynthSpec};

fn backend(name: &str) -> CpuBackend {
    let dir = std::env::temp_dir().join(format!("tollgate-fwd-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    write_model(&path, &SynthSpec::tiny()).unwrap();
    let m = kernels::load::load(&path).unwrap();
    CpuBackend::new(m.model.clone(), 16, 8, 2).unwrap()
}

#[test]
fn malformed_batches_are_errors() {
    let mut be = backend("malformed");
    let table: Vec<u32> = (0..8).collect();
    let mut ok = Batch::default();
    ok.push(&[5, 6, 7], 0, table.clone(), true);
    assert_eq!(be.step(&ok).unwrap().len(), be.config().vocab);

    let mut b = Batch::default();
    b.push(&[5, 999_999], 0, table.clone(), true);
    assert!(be.step(&b).unwrap_err().to_string().contains("vocabulary"));

    let mut b = Batch::default();
    b.push(&[5; 40], 0, vec![0, 1], true); // 40 positions need 3 blocks of 16
    assert!(be.step(&b).unwrap_err().to_string().contains("block table"));

    let mut b = Batch::default();
    b.push(&[5], 0, vec![99], true); // no such block
    assert!(be.step(&b).is_err());

    let mut b = Batch::default();
    b.push(&[5], 5000, table.clone(), true); // past the 2048-token context
    assert!(be.step(&b).unwrap_err().to_string().contains("context"));

    let mut b = ok.clone();
    b.positions[1] = 9; // not consecutive
    assert!(be.step(&b).unwrap_err().to_string().contains("consecutive"));
}

#[test]
fn a_row_does_not_depend_on_its_batch_mates() {
    let mut be = backend("mates");
    let mut alone = Batch::default();
    alone.push(&[10, 11, 12, 13], 0, vec![0], true);
    let a = be.step(&alone).unwrap();
    let mut mixed = Batch::default();
    mixed.push(&[40, 41, 42, 43, 44, 45, 46], 0, vec![1], true);
    mixed.push(&[10, 11, 12, 13], 0, vec![2], true);
    mixed.push(&[7], 0, vec![3], false);
    let m = be.step(&mixed).unwrap();
    let v = be.config().vocab;
    assert_eq!(m.len(), 2 * v);
    assert_eq!(&m[v..], &a[..], "same logits bit for bit");
}

#[test]
fn a_prompts_rows_logits_are_each_prefixs_last_row() {
    // Logits for every row of a prompt (its log-probabilities) are, row by row, those of
    // the prompt cut after that row; a batch-mate wanting its last row only keeps its own.
    let mut be = backend("rows");
    let v = be.config().vocab;
    let prompt = [10, 11, 12, 13, 14];
    let mut all = Batch::default();
    all.push(&[40, 41, 42], 0, vec![1], true);
    all.push_rows(&prompt, 0, vec![0], prompt.len());
    all.push_rows(&[7, 8], 0, vec![2], 0);
    assert_eq!(all.n_logits(), 1 + prompt.len());
    let got = be.step(&all).unwrap();
    assert_eq!(got.len(), (1 + prompt.len()) * v);
    for i in 0..prompt.len() {
        let mut cut = Batch::default();
        cut.push(&prompt[..=i], 0, vec![3], true);
        let want = be.step(&cut).unwrap();
        assert_eq!(&got[(1 + i) * v..(2 + i) * v], &want[..], "row {i}");
    }
    // More rows than the run has are capped to the run.
    let mut over = Batch::default();
    over.push_rows(&[1, 2], 0, vec![0], 9);
    assert_eq!(over.n_logits(), 2);
}

#[test]
fn step_sample_on_the_cpu_is_the_sample_rule_over_step_logits() {
    use kernels::cuda::twins::{self, SampleParams};
    let model = common::tiny("step-sample");
    let mut cpu = CpuBackend::new(model.clone(), 16, 16, 1).unwrap();
    assert!(!cpu.samples_on_device());
    let mut b = Batch::default();
    b.push(&[1, 2, 3], 0, vec![0], true);
    b.push(&[4, 5], 0, vec![1], false);
    b.push(&[6], 0, vec![2], true);
    let p = |t: f32, seed: u64| SampleParams {
        temperature: t,
        top_k: 10,
        top_p: 0.9,
        seed,
        step: 2,
    };
    let params = [p(0.0, 1), p(0.9, 7)];
    let logits = cpu.step(&b).unwrap();
    let vocab = model.config.vocab;
    let tokens = cpu.step_sample(&b, &params, &[]).unwrap();
    let want: Vec<u32> = logits
        .chunks_exact(vocab)
        .zip(params)
        .map(|(r, q)| twins::sample(r, q))
        .collect();
    assert_eq!(tokens, want);
    assert_eq!(tokens[0], common::argmax(&logits[..vocab]) as u32);
    let err = cpu.step_sample(&b, &params[..1], &[]).unwrap_err();
    assert!(
        err.to_string()
            .contains("1 sampling parameters for 2 logits rows"),
        "{err}"
    );
}
