//! Writes a synthetic model: `cargo run -p kernels --example synth -- OUT.gguf [tiny] [seed]`
//! (SmolLM2-135M's shape unless `tiny`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let out = args.get(1).ok_or("usage: synth OUT.gguf [tiny] [seed]")?;
    let mut spec = if args.get(2).map(String::as_str) == Some("tiny") {
        kernels::synth::SynthSpec::tiny()
    } else {
        kernels::synth::SynthSpec::default()
    };
    if let Some(seed) = args.get(3) {
        spec.seed = seed.parse()?;
    }
    kernels::synth::write_model(out.as_ref(), &spec)?;
    println!("wrote {out} ({spec:?})");
    Ok(())
}
