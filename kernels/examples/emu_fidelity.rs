//! How close the CUDA backend's logits come to the file's exact values, for each way it
//! can run the products of few rows: cuBLAS (f16 weights), `gemv_f16` (f16 weights) and
//! `gemv_q4` / `gemv_q8` over the file's own blocks. The reference is the CPU backend with
//! f32 activations, which reads the file's values. Runs the CUDA backend on the CPU
//! emulator (the GPU's kernels, the emulator's arithmetic), so it needs no GPU; a prefill
//! of a few tokens makes every product one of few rows.
//!
//!     cargo run --release -p kernels --example emu_fidelity -- MODEL.gguf ["prompt" ...]
//!
//! Prints, per prompt and way, the largest and the mean error over the prompt's rows of
//! logits, each row's error relative to its largest logit, and whether each row's greedy
//! token agrees with the reference's.

use kernels::backend::{Backend, CpuBackend};
use kernels::cuda::backend::{CudaBackend, KvCapacity, SmallProducts};
use kernels::cuda::emu::Emu;
use kernels::cuda::exec::Exec;
use kernels::cuda::twins::TwinModel;
use kernels::forward::Batch;
use kernels::matmul::ActPrecision;

const BLOCK: usize = 16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: emu_fidelity MODEL.gguf [prompt ...]")?;
    let mut prompts: Vec<String> = args.collect();
    if prompts.is_empty() {
        prompts = vec![
            "The capital of France is".into(),
            "def fib(n):\n    return".into(),
        ];
    }
    let loaded = kernels::load::load(std::path::Path::new(&path))?;
    let model = loaded.model.clone();
    let vocab = model.config.vocab;
    let twin = TwinModel::from_model(&model);
    let emu = Emu::open_for(&twin.config)?;
    let name = emu.describe();
    let mut cuda = CudaBackend::on(emu, name, &twin, BLOCK, KvCapacity::Blocks(8), 64, 2)?;
    let mut cpu = CpuBackend::new(model, BLOCK, 8, 0)?.with_precision(ActPrecision::F32);
    let all = SmallProducts::ALL;
    let ways = [
        ("cuBLAS (f16 weights)", SmallProducts(0), SmallProducts(0)),
        ("gemv_f16 (f16 weights)", all, SmallProducts(0)),
        ("the file's blocks (gemv_q4 / gemv_q8)", all, all),
    ];
    println!("| prompt | tokens | products | max error | mean error | greedy agree |");
    println!("|---|---:|---|---:|---:|---:|");
    for prompt in &prompts {
        let tokens = loaded.tokenizer.encode(prompt)?;
        let mut batch = Batch::default();
        batch.push_rows(&tokens, 0, (0..8).collect(), tokens.len());
        let want = cpu.step(&batch)?;
        for (what, small, quant) in ways {
            cuda.set_small_products(small)?;
            if cuda.set_quant_small(quant).is_err() {
                println!("| {prompt:?} | | {what} | (the model has no such blocks) | | |");
                continue;
            }
            let got = cuda.step(&batch)?;
            let (mut max, mut sum, mut agree) = (0f32, 0f32, 0);
            for (g, w) in got.chunks_exact(vocab).zip(want.chunks_exact(vocab)) {
                let top = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                let e = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / top;
                max = max.max(e);
                sum += e;
                agree += usize::from(argmax(g) == argmax(w));
            }
            let rows = tokens.len();
            println!(
                "| {prompt:?} | {rows} | {what} | {max:.2e} | {:.2e} | {agree}/{rows} |",
                sum / rows as f32
            );
        }
    }
    Ok(())
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |b, (i, &x)| if x > v[b] { i } else { b })
}
