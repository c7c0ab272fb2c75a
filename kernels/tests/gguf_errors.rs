//! Malformed GGUF files are clear errors, never panics or out-of-bounds reads.

use kernels::gguf::{GgmlType, Gguf, GgufError, Value};
use kernels::synth::{write_model, SynthSpec};
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tollgate-gguf-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join("m.gguf")
}

/// A tiny `arch` file with an 8-position sliding window, written under `name`, and its
/// spec.
fn windowed_file(name: &str, arch: kernels::synth::SynthArch) -> (PathBuf, SynthSpec) {
    let p = tmp(name);
    let spec = SynthSpec {
        arch,
        window: Some(8),
        ..SynthSpec::tiny()
    };
    write_model(&p, &spec).unwrap();
    (p, spec)
}

/// `g`'s model read with `key` set to a list of windowed layers (newer converters'
/// `attention.sliding_window_pattern`).
fn with_windowed_layers(
    g: &mut Gguf,
    key: &str,
    layers: &[bool],
) -> Result<kernels::model::LlamaConfig, GgufError> {
    let v = kernels::gguf::Value::Array(
        layers
            .iter()
            .map(|&w| kernels::gguf::Value::Bool(w))
            .collect(),
    );
    g.metadata.insert(key.into(), v);
    kernels::model::LlamaConfig::from_gguf(g)
}

fn open_bytes(name: &str, bytes: &[u8]) -> Result<Gguf, GgufError> {
    let p = tmp(name);
    std::fs::write(&p, bytes).unwrap();
    Gguf::open(&p)
}

#[test]
fn synthetic_model_round_trips_and_corruptions_are_errors() {
    let p = tmp("good");
    write_model(&p, &SynthSpec::tiny()).unwrap();
    let good = std::fs::read(&p).unwrap();
    let g = Gguf::open(&p).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(g.tensor("token_embd.weight").unwrap().ty, GgmlType::Q8_0);
    assert_eq!(g.tensor("blk.0.attn_q.weight").unwrap().ty, GgmlType::Q4_1);
    assert!(kernels::load::load(&p).is_ok());

    // Wrong magic.
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(open_bytes("magic", &b), Err(GgufError::Magic(_))));
    // Unsupported version.
    let mut b = good.clone();
    b[4] = 9;
    assert!(matches!(
        open_bytes("version", &b),
        Err(GgufError::Version(9))
    ));
    // Truncated anywhere: header, metadata, tensor infos, tensor data.
    for cut in [3, 20, 200, 5000, good.len() / 2, good.len() - 1] {
        let r = open_bytes("trunc", &good[..cut]);
        assert!(r.is_err(), "truncated at {cut} was accepted");
    }
    // An absurd string length.
    let mut b = good.clone();
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_bytes("len", &b).is_err());
}

#[test]
fn unsupported_types_and_shape_mismatches_are_errors() {
    use kernels::gguf::write::{gguf, Tensor};
    let meta = vec![(
        "general.architecture".to_string(),
        Value::String("llama".into()),
    )];
    let t = |ty: GgmlType| Tensor {
        name: "x".into(),
        dims: vec![32],
        ty,
        data: vec![0; ty.block_bytes() * 32 / ty.block_elems()],
    };
    let mut bytes = Vec::new();
    gguf(&mut bytes, &meta, &[t(GgmlType::F32)]).unwrap();
    assert!(open_bytes("ok", &bytes).is_ok());
    // Patch the tensor's type id to 16 (IQ2_XXS): unsupported. Its info is: name (u64 length,
    // "x"), n_dims (u32), dims (u64), then the type (u32).
    let mut b2 = bytes.clone();
    let name = b2
        .windows(9)
        .position(|w| w == b"\x01\0\0\0\0\0\0\0x")
        .unwrap();
    b2[name + 9 + 4 + 8] = 16;
    match open_bytes("type", &b2) {
        Err(GgufError::UnsupportedType { ty: 16, .. }) => {}
        other => panic!("expected unsupported type, got {:?}", other.map(|_| ())),
    }
    // A model whose tensor shape disagrees with its metadata.
    let p = tmp("shape");
    let spec = SynthSpec {
        ffn_dim: 256,
        ..SynthSpec::tiny()
    };
    write_model(&p, &spec).unwrap();
    let mut g = std::fs::read(&p).unwrap();
    // Change llama.feed_forward_length (256) to 512 in the metadata.
    let key = b"llama.feed_forward_length";
    let at = g.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    g[at..at + 4].copy_from_slice(&512u32.to_le_bytes());
    std::fs::write(&p, &g).unwrap();
    match kernels::load::load(&p) {
        Err(e) => assert!(e.to_string().contains("does not match the metadata"), "{e}"),
        Ok(_) => panic!("shape mismatch accepted"),
    }
}

#[test]
fn the_files_pooling_type_is_read_and_its_absence_is_the_last_token() {
    use kernels::model::Pooling;
    for (written, want) in [
        (None, Pooling::Last),
        (Some(3), Pooling::Last),
        (Some(0), Pooling::None),
        (Some(1), Pooling::Mean),
        (Some(2), Pooling::Cls),
        (Some(4), Pooling::Rank),
        (Some(9), Pooling::Other(9)),
    ] {
        let p = tmp(&format!("pooling-{written:?}"));
        let spec = SynthSpec {
            pooling_type: written,
            ..SynthSpec::tiny()
        };
        write_model(&p, &spec).unwrap();
        let loaded = kernels::load::load(&p).expect("a model of any pooling loads");
        assert_eq!(loaded.model.config.pooling, want, "{written:?}");
    }
}

/// RoPE the engine would not compute as the file means is an error at load, not a model
/// that answers wrongly: scaling of another kind than linear, YaRN or frequency factors,
/// YaRN without the original context its ramp is made for, and rotation over part of each
/// head only.
#[test]
fn rope_the_engine_does_not_compute_is_refused_at_load() {
    use kernels::synth::SynthRope;
    let write = |name: &str, rope: SynthRope| {
        let p = tmp(name);
        let spec = SynthSpec {
            rope_scaling: rope,
            ..SynthSpec::tiny()
        };
        write_model(&p, &spec).unwrap();
        (p.clone(), std::fs::read(&p).unwrap())
    };
    let patch = |p: &PathBuf, mut g: Vec<u8>, from: &[u8], to: &[u8]| {
        let at = g.windows(from.len()).position(|w| w == from).unwrap();
        g[at..at + to.len()].copy_from_slice(to);
        std::fs::write(p, &g).unwrap();
    };
    // Linear loads; the same file naming a kind the engine does not have does not.
    let (p, g) = write("rope-kind", SynthRope::Linear(2.0));
    assert!(kernels::load::load(&p).is_ok());
    patch(&p, g, b"linear", b"dynami");
    match kernels::load::load(&p) {
        Err(e) => assert!(e.to_string().contains("RoPE scaling \"dynami"), "{e}"),
        Ok(_) => panic!("an unknown scaling accepted"),
    }
    // YaRN loads; without its original context it does not.
    let yarn = SynthRope::Yarn {
        factor: 4.0,
        original_context: 64,
    };
    let (p, g) = write("rope-yarn", yarn);
    assert!(kernels::load::load(&p).is_ok());
    patch(
        &p,
        g,
        b"original_context_length",
        b"original_context_lengtX",
    );
    match kernels::load::load(&p) {
        Err(e) => assert!(e.to_string().contains("YaRN scaling without"), "{e}"),
        Ok(_) => panic!("YaRN without its original context accepted"),
    }
    // tiny's heads are 32 wide: turning 16 of their dimensions is partial RoPE; turning
    // 34, or an odd count, is refused.
    let (p, g) = write("rope-partial", SynthRope::None);
    let key = b"llama.rope.dimension_count";
    let at = g.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    let with = |n: u32| {
        let mut g2 = g.clone();
        g2[at..at + 4].copy_from_slice(&n.to_le_bytes());
        std::fs::write(&p, &g2).unwrap();
        kernels::load::load(&p)
    };
    let partial = with(16).expect("partial RoPE loads");
    assert_eq!(partial.model.config.rope_dims, Some(16));
    assert_eq!(with(32).expect("loads").model.config.rope_dims, None);
    for n in [34, 15, 0] {
        match with(n) {
            Err(e) => assert!(
                e.to_string()
                    .contains(&format!("RoPE over {n} of each head's 32")),
                "{e}"
            ),
            Ok(_) => panic!("RoPE over {n} dimensions accepted"),
        }
    }
    // A Phi-3 file loads; with one of LongRoPE's two sets of factors it does not.
    use kernels::gguf::write::{gguf, Tensor};
    let p = tmp("rope-longrope");
    let spec = SynthSpec {
        arch: kernels::synth::SynthArch::Phi3,
        ..SynthSpec::tiny()
    };
    write_model(&p, &spec).unwrap();
    assert!(kernels::load::load(&p).is_ok());
    let g = kernels::gguf::Gguf::open(&p).unwrap();
    let meta: Vec<(String, Value)> = g
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut tensors: Vec<Tensor> = g
        .tensors
        .iter()
        .map(|t| Tensor {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
            data: g.data(t).to_vec(),
        })
        .collect();
    tensors.push(Tensor {
        name: "rope_factors_long.weight".into(),
        dims: vec![16],
        ty: GgmlType::F32,
        data: [1f32; 16].iter().flat_map(|f| f.to_le_bytes()).collect(),
    });
    let mut bytes = Vec::new();
    gguf(&mut bytes, &meta, &tensors).unwrap();
    drop(g);
    std::fs::write(&p, &bytes).unwrap();
    match kernels::load::load(&p) {
        Err(e) => assert!(e.to_string().contains("without the other"), "{e}"),
        Ok(_) => panic!("LongRoPE's long factors alone accepted"),
    }
}

/// Attention the engine would not compute as the file means is an error at load: value
/// heads of another width than the key heads, and a Qwen3 layer with a norm for its Q
/// heads but none for its K heads. The same file unpatched loads, heads wider than its
/// width over its heads.
#[test]
fn attention_the_engine_does_not_compute_is_refused_at_load() {
    use kernels::synth::SynthArch;
    let p = tmp("qwen3-heads");
    let spec = SynthSpec {
        arch: SynthArch::Qwen3,
        n_heads: 8,
        n_kv_heads: 4,
        head_dim: Some(32),
        ..SynthSpec::tiny()
    };
    write_model(&p, &spec).unwrap();
    let good = std::fs::read(&p).unwrap();
    let m = kernels::load::load(&p).expect("the file loads");
    assert_eq!((m.model.config.head_dim, m.model.config.dim), (32, 128));
    let refused = |name: &str, from: &[u8], to: &[u8], want: &str| {
        let mut g = good.clone();
        let at = g.windows(from.len()).position(|w| w == from).unwrap();
        g[at..at + to.len()].copy_from_slice(to);
        let p = tmp(name);
        std::fs::write(&p, &g).unwrap();
        match kernels::load::load(&p) {
            Err(e) => assert!(e.to_string().contains(want), "{name}: {e}"),
            Ok(_) => panic!("{name}: accepted"),
        }
    };
    // The value length's u32, after its key and the value's type.
    let key = b"qwen3.attention.value_length";
    let at = good.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4;
    let mut to = good[at - key.len() - 4..at].to_vec();
    to.extend_from_slice(&16u32.to_le_bytes());
    refused(
        "value-width",
        &good[at - key.len() - 4..at + 4],
        &to,
        "value heads of 16 beside key heads of 32",
    );
    refused(
        "one-norm",
        b"blk.0.attn_k_norm.weight",
        b"blk.0.attn_k_nXrm.weight",
        "layer 0 has one of attn_q_norm and attn_k_norm without the other",
    );
}

/// A Gemma 3 file loads with its windowed layers and post-norms; one of a layer's
/// post-norms without the other, or a list of windowed layers in no period, is refused
/// by name.
#[test]
fn gemma_layers_the_engine_does_not_compute_are_refused_at_load() {
    let (p, _) = windowed_file("gemma3", kernels::synth::SynthArch::Gemma3);
    let good = std::fs::read(&p).unwrap();
    let m = kernels::load::load(&p).expect("the file loads");
    let c = &m.model.config;
    assert_eq!((c.window_at(0), c.window_at(1)), (Some(8), Some(8)));
    assert!(m
        .model
        .weights
        .layers
        .iter()
        .all(|l| l.post_norms.is_some()));
    let mut g = good.clone();
    let from = b"blk.1.post_ffw_norm.weight";
    let at = g.windows(from.len()).position(|w| w == from).unwrap();
    g[at..at + from.len()].copy_from_slice(b"blk.1.post_ffX_norm.weight");
    let bad = tmp("gemma3-one-post-norm");
    std::fs::write(&bad, &g).unwrap();
    let e = kernels::load::load(&bad)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("layer 1 has one of post_attention_norm and post_ffw_norm without the other"),
        "{e}"
    );
    // Windowed layers as a list (newer converters'): a period is read, another list refused.
    let key = "gemma3.attention.sliding_window_pattern";
    let mut g = kernels::gguf::Gguf::open(&p).unwrap();
    let c = with_windowed_layers(&mut g, key, &[true, false]).expect("every other layer windowed");
    assert_eq!(
        (c.window_at(0), c.window_at(1), c.window_at(2)),
        (Some(8), None, Some(8))
    );
    let e = with_windowed_layers(&mut g, key, &[false, true])
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains(&format!("{key}: windowed layers in no period")),
        "{e}"
    );
    assert!(!e.contains("  "), "one line of words: {e}");
}

/// Another architecture's sliding window (Phi-3-mini-4k's) is every layer's, at the file's
/// whole context; a list of windowed layers beside it, which only Gemma 2's and 3's
/// layers are read by, is refused by name rather than read as every layer's.
#[test]
fn a_phi3_window_is_every_layers_and_a_list_of_windowed_layers_beside_it_is_refused() {
    let (p, spec) = windowed_file("phi3-window", kernels::synth::SynthArch::Phi3);
    let mut g = kernels::gguf::Gguf::open(&p).unwrap();
    let c = kernels::model::LlamaConfig::from_gguf(&g).expect("the file loads");
    assert_eq!(c.context_len, spec.context_len, "the file's context");
    assert!((0..c.n_layers).all(|l| c.window_at(l) == Some(8) && !c.local_rope_at(l)));
    let key = "phi3.attention.sliding_window_pattern";
    let e = with_windowed_layers(&mut g, key, &[true, false])
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains(&format!(
            "{key}: a sliding window on some layers only is supported for Gemma 2 and 3, not for phi3"
        )),
        "{e}"
    );
}
