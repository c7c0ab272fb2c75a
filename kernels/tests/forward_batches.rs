//! The forward step refuses malformed batches with an error (never a panic or an
//! out-of-bounds access), and computes each row independently of its batch-mates.

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
