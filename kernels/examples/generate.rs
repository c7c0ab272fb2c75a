//! Greedy generation from a GGUF file, one sequence, printing token ids and speed:
//!
//!     cargo run --release -p kernels --example generate -- MODEL.gguf "prompt" [N]
//!
//! A prompt starting with `chat:` is rendered through the model's chat template.

use kernels::backend::{Backend, CpuBackend};
use kernels::chat::Message;
use kernels::forward::Batch;
use kernels::sampler::argmax;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (path, prompt) = (&args[1], &args[2]);
    let n: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let m = kernels::load::load(path.as_ref())?;
    let text = match prompt.strip_prefix("chat:") {
        Some(p) => m.template.render(&[Message {
            role: "user",
            content: p,
        }])?,
        None => prompt.clone(),
    };
    let ids = m.tokenizer.encode(&text)?;
    println!("prompt ids ({}): {:?}", ids.len(), ids);
    let bs = 16;
    let blocks = (ids.len() + n) / bs + 1;
    let mut be = CpuBackend::new(m.model.clone(), bs, blocks, 0)?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut b = Batch::default();
    b.push(&ids, 0, table.clone(), true);
    let t0 = Instant::now();
    let logits = be.step(&b)?;
    let prefill = t0.elapsed();
    let mut top: Vec<(f32, usize)> = logits.iter().copied().zip(0..).collect();
    top.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("top-5 first logits: {:?}", &top[..5]);
    let mut tok = argmax(&logits);
    let mut out = vec![tok];
    let t1 = Instant::now();
    for i in 1..n {
        let mut b = Batch::default();
        b.push(&[tok], ids.len() + i - 1, table.clone(), true);
        tok = argmax(&be.step(&b)?);
        out.push(tok);
    }
    let decode = t1.elapsed();
    println!("generated ids: {out:?}");
    println!("text: {:?}", m.tokenizer.decode(&out));
    println!(
        "prefill {} tokens in {:?} ({:.0} tok/s); decode {} tokens in {:?} ({:.1} tok/s)",
        ids.len(),
        prefill,
        ids.len() as f64 / prefill.as_secs_f64(),
        n - 1,
        decode,
        (n - 1) as f64 / decode.as_secs_f64()
    );
    Ok(())
}
