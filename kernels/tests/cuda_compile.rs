//! Every CUDA kernel compiles to PTX for compute_90 (H100/H200) through the project's own
//! NVRTC path, with no GPU: CI installs NVRTC from the PyPI package `nvidia-cuda-nvrtc`
//! (13.0.x) and puts its `nvidia/cu13/lib` on `LD_LIBRARY_PATH`. A kernel that does not
//! compile fails this test. Without NVRTC it skips, unless `TOLLGATE_REQUIRE_TOOLS=1`.

use kernels::cuda::{compile, nvrtc_present, SOURCES};

#[test]
fn every_kernel_compiles_to_ptx_for_compute_90() {
    if !nvrtc_present() {
        if std::env::var("TOLLGATE_REQUIRE_TOOLS").as_deref() == Ok("1") {
            panic!("TOLLGATE_REQUIRE_TOOLS=1 but libnvrtc.so.13 is not loadable (LD_LIBRARY_PATH)");
        }
        eprintln!("SKIPPED: NVRTC not found (pip install nvidia-cuda-nvrtc; LD_LIBRARY_PATH=.../nvidia/cu13/lib)");
        return;
    }
    for src in SOURCES {
        let ptx = compile::compile(src, "compute_90").unwrap_or_else(|e| panic!("{e}"));
        assert!(
            ptx.contains(".target sm_90"),
            "{}: {}",
            src.name,
            &ptx[..200.min(ptx.len())]
        );
        for entry in src.entries {
            assert!(
                ptx.contains(&format!(".entry {entry}(")),
                "{}.cu: no entry point {entry}",
                src.name
            );
        }
    }
}

#[test]
fn a_broken_kernel_is_a_clear_error() {
    if !nvrtc_present() {
        eprintln!("SKIPPED: NVRTC not found");
        return;
    }
    let bad = kernels::cuda::Source {
        name: "broken",
        code: "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_name; }",
        entries: &["broken"],
    };
    let err = compile::compile(&bad, "compute_90")
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.cu"), "{err}");
}
