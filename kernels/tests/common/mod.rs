//! Shared by the kernels' tests: the tiny synthetic model, and a greedy run that compares
//! two backends step by step.
#![allow(dead_code)]

use kernels::forward::{Batch, Model};
use kernels::synth::{write_model, SynthSpec};
use std::sync::Arc;

/// The tiny synthetic model, written once per test process under `name`.
pub fn tiny(name: &str) -> Arc<Model> {
    synthetic(name, &SynthSpec::tiny())
}

/// The synthetic model of `spec`, written to a folder of its own and loaded.
pub fn synthetic(name: &str, spec: &SynthSpec) -> Arc<Model> {
    let dir = std::env::temp_dir().join(format!("tollgate-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tiny.gguf");
    write_model(&path, spec).unwrap();
    kernels::load::load(&path).unwrap().model.clone()
}

pub fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0
}

/// A row's log-probabilities from the device (`d`) against the host's (`h`, from the same
/// logits): the same token and most likely tokens, the values equal or within the f32
/// normalizer's rounding.
#[allow(dead_code)] // not every test binary compares log-probabilities
pub fn assert_logprobs(
    d: &kernels::logprobs::TokenLogprobs,
    h: &kernels::logprobs::TokenLogprobs,
    what: &str,
) {
    let close =
        |a: f32, b: f32| a.to_bits() == b.to_bits() || (a - b).abs() <= 2e-5 * (1.0 + b.abs());
    assert_eq!((d.id, d.rank), (h.id, h.rank), "{what}: token and rank");
    assert!(close(d.logprob, h.logprob), "{what}: {d:?} vs {h:?}");
    let ids = |t: &kernels::logprobs::TokenLogprobs| t.top.iter().map(|p| p.0).collect::<Vec<_>>();
    assert_eq!(ids(d), ids(h), "{what}: the most likely tokens");
    for (a, b) in d.top.iter().zip(&h.top) {
        assert!(close(a.1, b.1), "{what}: {d:?} vs {h:?}");
    }
}

/// Largest |a − b| relative to the largest |b| (NaN → infinity), of equal lengths.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    kernels::cuda::twins::rel_err(a, b)
}

/// Two prompts of different lengths (a prefill step), then `steps − 1` decode steps with
/// both in the batch, fed the reference's greedy tokens. `got` and `want` run one step each;
/// their logits must agree within `tol` (relative). Returns how many greedy tokens agreed
/// and how many there were.
pub fn greedy_compare(
    vocab: usize,
    steps: usize,
    tol: f32,
    mut got: impl FnMut(&Batch) -> Vec<f32>,
    mut want: impl FnMut(&Batch) -> Vec<f32>,
) -> (usize, usize) {
    let prompts: [Vec<u32>; 2] = [(1..40).collect(), (100..107).collect()];
    let tables: [Vec<u32>; 2] = [(0..32).collect(), (32..64).collect()];
    let mut b = Batch::default();
    for (p, t) in prompts.iter().zip(&tables) {
        b.push(p, 0, t.clone(), true);
    }
    let mut lens = [prompts[0].len(), prompts[1].len()];
    let (mut agree, mut total) = (0, 0);
    for step in 0..steps {
        let (g, w) = (got(&b), want(&b));
        let err = rel_err(&g, &w);
        assert!(err < tol, "step {step}: logits differ by {err}");
        let mut next = Batch::default();
        for s in 0..2 {
            let (a, r) = (
                argmax(&g[s * vocab..(s + 1) * vocab]),
                argmax(&w[s * vocab..(s + 1) * vocab]),
            );
            agree += (a == r) as usize;
            total += 1;
            next.push(&[r as u32], lens[s], tables[s].clone(), true);
            lens[s] += 1;
        }
        b = next;
    }
    (agree, total)
}

/// The CPU emulator's general build, or `None` with a printed reason (a failure instead
/// under `TOLLGATE_REQUIRE_EMU=1`, as in CI).
pub fn emu() -> Option<kernels::cuda::emu::Emu> {
    kernels::cuda::emu::or_skip(kernels::cuda::emu::Emu::open())
}

/// The emulator's build for `config`'s attention shape.
pub fn emu_for(config: &kernels::model::LlamaConfig) -> Option<kernels::cuda::emu::Emu> {
    kernels::cuda::emu::or_skip(kernels::cuda::emu::Emu::open_for(config))
}

/// GPU 0 with the kernels' general build, or `None` with a printed reason.
pub fn gpu() -> Option<kernels::cuda::device::Gpu> {
    gpu_or_skip(kernels::cuda::device::Gpu::open(0))
}

/// GPU 0 with the kernels built for `config`'s attention shape.
pub fn gpu_for(config: &kernels::model::LlamaConfig) -> Option<kernels::cuda::device::Gpu> {
    gpu_or_skip(kernels::cuda::device::Gpu::open_for(0, config))
}

fn gpu_or_skip(
    r: Result<kernels::cuda::device::Gpu, kernels::cuda::device::GpuError>,
) -> Option<kernels::cuda::device::Gpu> {
    match r {
        Ok(g) => {
            eprintln!("GPU: {}", g.describe());
            Some(g)
        }
        Err(e) => {
            eprintln!("SKIPPED on a GPU: {e}");
            None
        }
    }
}
