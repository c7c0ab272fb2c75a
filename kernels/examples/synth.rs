//! Writes a synthetic model: `cargo run -p kernels --example synth -- OUT.gguf
//! [tiny|q4_k_m|llama8b|llama8b_q2_k|groups_of_7|qwen2_0_5b|qwen3_0_6b|qwen3moe_smol|qwen3moe_30b_layer|gemma3_smol|phi3_smol|smollm3_smol] [seed]` (SmolLM2-135M's shape
//! unless `tiny`; `q4_k_m`: in llama.cpp's Q4_K_M mix; `llama8b`: two of Llama-3-8B's
//! layers in that mix; `llama8b_q2_k`: the same layers in its Q2_K mix; `groups_of_7`:
//! Qwen2.5-0.5B's shape, 14 query heads on 2 KV heads, as a `llama` file; `qwen2_0_5b`:
//! the same as a `qwen2` file, with its biases on Q, K and V; `qwen3_0_6b`: Qwen3-0.6B's
//! shape as a `qwen3` file, heads of 128 under a width of 1,024, each Q and K head normed;
//! `qwen3moe_smol`: SmolLM2's shape as a `qwen3moe` file, its feed-forward 4 experts half
//! as wide, 2 a token — the dense model's active weights, routed; `qwen3moe_30b_layer`: one
//! of Qwen3-30B-A3B's layers, 8 of 128 experts a token; `gemma3_smol`: SmolLM2's width
//! and depth as a `gemma3` file with Gemma 3 1B's attention — 4 query heads 256 wide on one
//! KV head, a window of 512 positions on five layers of six; `phi3_smol`: SmolLM2's
//! width and depth as a `phi3` file with Phi-3-mini's heads, 96 wide, one KV head each;
//! `smollm3_smol`: SmolLM2's shape as a `smollm3` file, every fourth layer without RoPE).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let out = args.get(1).ok_or(
        "usage: synth OUT.gguf [tiny|q4_k_m|llama8b|llama8b_q2_k|groups_of_7|qwen2_0_5b|qwen3_0_6b|qwen3moe_smol|qwen3moe_30b_layer|gemma3_smol|phi3_smol|smollm3_smol] [seed]",
    )?;
    let mut spec = match args.get(2).map(String::as_str) {
        Some("tiny") => kernels::synth::SynthSpec::tiny(),
        Some("q4_k_m") => kernels::synth::SynthSpec::q4_k_m(),
        Some("llama8b") => kernels::synth::SynthSpec::llama8b_layers(),
        Some("llama8b_q2_k") => kernels::synth::SynthSpec::llama8b_q2_k(),
        Some("groups_of_7") => kernels::synth::SynthSpec::groups_of_7(),
        Some("qwen2_0_5b") => kernels::synth::SynthSpec {
            arch: kernels::synth::SynthArch::Qwen2,
            ..kernels::synth::SynthSpec::groups_of_7()
        },
        Some("qwen3_0_6b") => kernels::synth::SynthSpec::qwen3_0_6b(),
        Some("qwen3moe_smol") => kernels::synth::SynthSpec {
            arch: kernels::synth::SynthArch::Qwen3Moe,
            ..kernels::synth::SynthSpec::default()
        },
        Some("qwen3moe_30b_layer") => kernels::synth::SynthSpec::qwen3moe_30b_layer(),
        Some("gemma3_smol") => kernels::synth::SynthSpec {
            arch: kernels::synth::SynthArch::Gemma3,
            n_heads: 4,
            n_kv_heads: 1,
            head_dim: Some(256),
            window: Some(512),
            ..kernels::synth::SynthSpec::default()
        },
        Some("phi3_smol") => kernels::synth::SynthSpec {
            arch: kernels::synth::SynthArch::Phi3,
            n_heads: 6,
            n_kv_heads: 6,
            ..kernels::synth::SynthSpec::default()
        },
        Some("smollm3_smol") => kernels::synth::SynthSpec {
            arch: kernels::synth::SynthArch::SmolLM3,
            ..kernels::synth::SynthSpec::default()
        },
        Some("default") | None => kernels::synth::SynthSpec::default(),
        Some(other) => {
            return Err(format!(
                "{other}: tiny, q4_k_m, llama8b, llama8b_q2_k, groups_of_7, qwen2_0_5b, qwen3_0_6b, qwen3moe_smol, qwen3moe_30b_layer, gemma3_smol, phi3_smol, smollm3_smol or default"
            )
            .into())
        }
    };
    if let Some(seed) = args.get(3) {
        spec.seed = seed.parse()?;
    }
    kernels::synth::write_model(out.as_ref(), &spec)?;
    println!("wrote {out} ({spec:?})");
    Ok(())
}
