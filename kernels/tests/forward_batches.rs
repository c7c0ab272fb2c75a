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
        min_p: 0.0,
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

/// A small model of `arch` whose windowed layers see `window` positions.
fn windowed(name: &str, arch: kernels::synth::SynthArch, window: usize) -> CpuBackend {
    let dir = std::env::temp_dir().join(format!("tollgate-fwd-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("windowed.gguf");
    let spec = SynthSpec {
        arch,
        n_layers: 6,
        window: Some(window),
        ..SynthSpec::tiny()
    };
    write_model(&path, &spec).unwrap();
    let m = kernels::load::load(&path).unwrap();
    CpuBackend::new(m.model.clone(), 16, 16, 2).unwrap()
}

#[test]
fn windowed_layers_in_a_pool_of_their_own_compute_the_same_logits() {
    // Two sequences, each alone on one cache (one block table), and side by side on a
    // cache whose windowed layers hold 8 blocks of their own: blocks out of a window go
    // back and the other sequence writes them at once, so a read of one would show.
    use kernels::synth::SynthArch;
    const NONE: u32 = u32::MAX;
    for (arch, window) in [
        (SynthArch::Gemma3, 20),
        (SynthArch::Gemma2, 33),
        (SynthArch::Phi3, 17),
    ] {
        let name = format!("{arch:?}-{window}");
        let mut one = windowed(&format!("one-{name}"), arch, window);
        let mut own = windowed(&format!("own-{name}"), arch, window).with_window_blocks(8);
        assert_eq!(one.kv_window_blocks(), None);
        assert_eq!(own.kv_window_blocks(), Some(8));
        let seqs: [Vec<u32>; 2] = [
            (0..90).map(|i| (i * 37 + 11) % 2000).collect(),
            (0..90).map(|i| (i * 53 + 5) % 2000).collect(),
        ];
        // Chunks: prompts of 23 and 40 rows, then rows of 1 or 2 (a draft).
        let chunks = |s: usize| -> Vec<usize> {
            let mut c = vec![23 + 17 * s];
            while c.iter().sum::<usize>() < 90 {
                c.push(1 + c.len() % 2);
            }
            *c.last_mut().unwrap() -= c.iter().sum::<usize>() - 90;
            c
        };
        let (mut free, mut tables): (Vec<u32>, [Vec<u32>; 2]) =
            ((0..8).rev().collect(), [vec![], vec![]]);
        let mut returned = 0;
        let mut at = [0usize; 2];
        let plans = [chunks(0), chunks(1)];
        let mut step = [0usize; 2];
        while at[0] < 90 || at[1] < 90 {
            let mut both = Batch::default();
            let mut alone = vec![];
            for s in 0..2 {
                let Some(&n) = plans[s].get(step[s]) else {
                    continue;
                };
                let (p0, p1) = (at[s], at[s] + n);
                // Its window's blocks: those below the first row's window go back first.
                let lo = (p0 + 1).saturating_sub(window) / 16;
                for b in tables[s].iter_mut().take(lo) {
                    if *b != NONE {
                        free.push(std::mem::replace(b, NONE));
                        returned += 1;
                    }
                }
                while tables[s].len() < p1.div_ceil(16) {
                    tables[s].push(free.pop().expect("8 blocks hold two windows"));
                }
                let full: Vec<u32> = (s as u32 * 8..s as u32 * 8 + 8).collect();
                both.push_rows(&seqs[s][p0..p1], p0, full.clone(), n);
                both.set_window_table(tables[s].clone());
                let mut a = Batch::default();
                a.push_rows(&seqs[s][p0..p1], p0, full, n);
                alone.push((s, a));
                at[s] = p1;
                step[s] += 1;
            }
            let got = own.step(&both).unwrap();
            let mut want = vec![];
            for (_, a) in &alone {
                want.extend(one.step(a).unwrap());
            }
            assert_eq!(got.len(), want.len());
            assert!(got == want, "{name}: the same logits bit for bit at {at:?}");
        }
        assert!(returned >= 6, "{name}: {returned} blocks went back");
        // A window table short of the rows' blocks, or naming a block outside its pool,
        // is refused.
        let mut b = Batch::default();
        b.push(&[5; 40], 0, vec![8, 9, 10], true);
        b.set_window_table(vec![0, 1]);
        assert!(own
            .step(&b)
            .unwrap_err()
            .to_string()
            .contains("window block table"));
        let mut b = Batch::default();
        b.push(&[5; 4], 0, vec![8], true);
        b.set_window_table(vec![8]);
        assert!(own
            .step(&b)
            .unwrap_err()
            .to_string()
            .contains("outside its pool"));
    }
}
