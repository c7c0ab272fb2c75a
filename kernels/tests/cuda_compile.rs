//! Every CUDA kernel compiles to PTX for compute_90 (H100/H200) through the project's own
//! NVRTC path, with no GPU: CI installs NVRTC from the PyPI package `nvidia-cuda-nvrtc`
//! (13.0.x) and puts its `nvidia/cu13/lib` on `LD_LIBRARY_PATH`. A kernel that does not
//! compile fails this test. Without NVRTC it skips, unless `TOLLGATE_REQUIRE_TOOLS=1`.
//!
//! With `ptxas` (PyPI `nvidia-cuda-nvcc` 13.0.x, its path in `TOLLGATE_PTXAS`; CI sets it),
//! every entry point is also assembled for sm_90: it must fit its launch's block size in
//! registers (registers × threads ≤ 64 K, or the launch fails on the GPU) and spill
//! nothing. The report (registers, shared memory) is printed.

use kernels::cuda::compile::Defines;
use kernels::cuda::{compile, nvrtc_present, Source, LAUNCH_THREADS, SOURCES};
use std::sync::OnceLock;

fn tools_required() -> bool {
    std::env::var("TOLLGATE_REQUIRE_TOOLS").as_deref() == Ok("1")
}

/// `ptxas -v` figures of one entry point.
#[derive(Debug, Default)]
struct Report {
    registers: u32,
    spill_stores: u32,
    spill_loads: u32,
    smem: u32,
}

fn parse_ptxas(log: &str) -> Vec<(String, Report)> {
    let mut out: Vec<(String, Report)> = Vec::new();
    let num_before = |line: &str, word: &str| -> u32 {
        let toks: Vec<&str> = line
            .split(|c: char| c == ',' || c.is_whitespace())
            .collect();
        toks.iter()
            .position(|t| *t == word)
            .and_then(|i| toks[..i].iter().rev().find_map(|t| t.parse().ok()))
            .unwrap_or(0)
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push((name, Report::default()));
        } else if let Some((_, r)) = out.last_mut() {
            if line.contains("spill stores") {
                // "N bytes stack frame, N bytes spill stores, N bytes spill loads"
                for part in line.split(',') {
                    if part.contains("spill stores") {
                        r.spill_stores = num_before(part, "bytes");
                    } else if part.contains("spill loads") {
                        r.spill_loads = num_before(part, "bytes");
                    }
                }
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = num_before(line, "registers");
                // "..., used 1 barriers, 32 bytes cumulative stack size, 32768 bytes smem"
                if let Some(smem) = line.split(',').find(|p| p.contains("smem")) {
                    r.smem = num_before(smem, "bytes");
                }
            }
        }
    }
    out
}

/// Whether NVRTC is here to compile with; where not, says so (a failure under
/// `TOLLGATE_REQUIRE_TOOLS=1`, as CI sets).
fn nvrtc_here() -> bool {
    if nvrtc_present() {
        return true;
    }
    assert!(
        !tools_required(),
        "TOLLGATE_REQUIRE_TOOLS=1 but libnvrtc.so.13 is not loadable (LD_LIBRARY_PATH)"
    );
    eprintln!("SKIPPED: NVRTC not found (pip install nvidia-cuda-nvrtc; LD_LIBRARY_PATH=.../nvidia/cu13/lib)");
    false
}

/// The attention constants the backend builds for SmolLM2 (3 query heads per KV head,
/// head_dim 64).
const SMOL: Defines<'static> = &[("MAX_GROUP", 3), ("MAX_DPL", 2), ("MAX_WARPS", 16)];

/// Whether the attention constants specialize `src` (only those sources are built again
/// for a model's heads).
fn specialized(src: &Source) -> bool {
    src.code.contains("#ifndef MAX_GROUP")
}

/// PTX of `srcs` for `arch` with `defines`, each source compiled on its own thread.
fn compile_each(
    srcs: Vec<&'static Source>,
    arch: &'static str,
    defines: Defines,
) -> Vec<(&'static Source, String)> {
    std::thread::scope(|s| {
        let each: Vec<_> = srcs
            .into_iter()
            .map(|src| {
                s.spawn(move || {
                    let ptx =
                        compile::compile_with(src, arch, defines).unwrap_or_else(|e| panic!("{e}"));
                    (src, ptx)
                })
            })
            .collect();
        each.into_iter()
            .map(|h| h.join().expect("a compile panicked"))
            .collect()
    })
}

/// compute_90 PTX of every source in the general build, then of the sources SmolLM2's
/// constants specialize: compiled once, for the tests here that read them.
fn sm90() -> [&'static [(&'static Source, String)]; 2] {
    static GENERAL: OnceLock<Vec<(&'static Source, String)>> = OnceLock::new();
    static SMOLLM2: OnceLock<Vec<(&'static Source, String)>> = OnceLock::new();
    [
        GENERAL.get_or_init(|| compile_each(SOURCES.iter().collect(), "compute_90", &[])),
        SMOLLM2.get_or_init(|| {
            let srcs = SOURCES.iter().filter(|s| specialized(s)).collect();
            compile_each(srcs, "compute_90", SMOL)
        }),
    ]
}

#[test]
fn every_kernel_compiles_to_ptx_for_compute_90() {
    if !nvrtc_here() {
        return;
    }
    // The general build, and the attention kernel fitted to SmolLM2's heads.
    for built in sm90() {
        for (src, ptx) in built {
            assert!(
                ptx.contains(".target sm_90"),
                "{}: {}",
                src.name,
                &ptx[..200.min(ptx.len())]
            );
            for entry in src.entries {
                let at = ptx
                    .find(&format!(".entry {entry}("))
                    .unwrap_or_else(|| panic!("{}.cu: no entry point {entry}", src.name));
                // Its body (up to the next entry) waits for the kernel before it.
                let body = &ptx[at..];
                let body = &body[..body[1..].find(".entry ").map_or(body.len(), |e| e + 1)];
                assert!(
                    body.contains("griddepcontrol.wait"),
                    "{entry}: no griddepcontrol.wait in its PTX for sm_90"
                );
            }
        }
    }
}

/// The other architectures the backend compiles for (`compile::arch_for`): Ampere's
/// (A100, the oldest: no dependent launches, whose `griddepcontrol` must not be in its
/// PTX) and consumer Blackwell's (the newest): every kernel and entry point, so that a
/// kernel that takes up a Hopper-only instruction unguarded fails here, not on an A100
/// fleet.
#[test]
fn every_kernel_compiles_for_ampere_and_blackwell_too() {
    if !nvrtc_here() {
        return;
    }
    for (arch, target) in [("compute_80", "sm_80"), ("compute_120", "sm_120")] {
        for (src, ptx) in compile_each(SOURCES.iter().collect(), arch, &[]) {
            assert!(
                ptx.contains(&format!(".target {target}")),
                "{}: {arch}",
                src.name
            );
            for entry in src.entries {
                assert!(
                    ptx.contains(&format!(".entry {entry}(")),
                    "{}.cu for {arch}: no entry point {entry}",
                    src.name
                );
            }
            if arch == "compute_80" {
                assert!(!ptx.contains("griddepcontrol"), "{}: {arch}", src.name);
            }
        }
    }
}

/// Every entry point's first statement is `pdl_begin()` (or `pdl_begin_prefetch`, which
/// ends with it): launched as dependent launches, a kernel that touched memory or
/// returned before it could race the kernel before it, or let the one after it run
/// early (`kernels/cuda/common.cuh`).
#[test]
fn every_kernel_first_waits_for_the_one_before_it() {
    for src in SOURCES {
        for entry in src.entries {
            // `__global__ void name(`, maybe with `__launch_bounds__(…)` before the name.
            let sig = format!(" {entry}(");
            let at = src
                .code
                .match_indices(&sig)
                .map(|(i, _)| i)
                .find(|&i| {
                    let line = src.code[..i].rsplit('\n').next().unwrap_or("");
                    line.contains("__global__ void")
                })
                .unwrap_or_else(|| panic!("{}.cu: no __global__ void {entry}(", src.name));
            let body = &src.code[at..];
            let open = body.find('{').expect("a body");
            let first = body[open + 1..]
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with("//"))
                .unwrap_or("");
            assert!(
                first == "pdl_begin();" || first.contains(" = pdl_begin_prefetch("),
                "{}.cu: {entry} starts with `{first}`, not pdl_begin()",
                src.name
            );
        }
    }
}

#[test]
fn a_broken_kernel_is_a_clear_error() {
    if !nvrtc_here() {
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
    assert!(err.contains("undefined_name"), "{err}");
}

#[test]
fn every_kernel_fits_its_launch_on_sm_90() {
    let ptxas = std::env::var("TOLLGATE_PTXAS").ok();
    let Some(ptxas) = ptxas.filter(|p| std::path::Path::new(p).exists()) else {
        assert!(
            !tools_required(),
            "TOLLGATE_REQUIRE_TOOLS=1 but TOLLGATE_PTXAS is not set to ptxas"
        );
        eprintln!("SKIPPED: no ptxas (pip install nvidia-cuda-nvcc; TOLLGATE_PTXAS=.../nvidia/cu13/bin/ptxas)");
        return;
    };
    if !nvrtc_here() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tollgate-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    eprintln!("| kernel | threads | registers | spills (st/ld bytes) | shared memory |");
    eprintln!("|---|---:|---:|---:|---:|");
    // The general build, then the one the backend loads for SmolLM2 (3 query heads per
    // KV head, head_dim 64), and Llama-3-8B's (4 per KV head, head_dim 128: gpu-check's
    // decode steps over two of its layers).
    let warps = kernels::cuda::device::attention_max_warps(4, 4);
    let llama8b: Defines = &[("MAX_GROUP", 4), ("MAX_DPL", 4), ("MAX_WARPS", warps)];
    let srcs = SOURCES.iter().filter(|s| specialized(s)).collect();
    let llama8b_ptx = compile_each(srcs, "compute_90", llama8b);
    let [general, smol] = sm90();
    for (built, defines, label) in [
        (general, &[][..], ""),
        (smol, SMOL, " (SmolLM2)"),
        (&llama8b_ptx[..], llama8b, " (Llama-3-8B)"),
    ] {
        for (src, ptx) in built {
            let special = specialized(src);
            let path = dir.join(format!("{}.ptx", src.name));
            std::fs::write(&path, ptx).unwrap();
            let out = std::process::Command::new(&ptxas)
                .args(["-arch=sm_90", "-v", "-o", "/dev/null"])
                .arg(&path)
                .output()
                .expect("run ptxas");
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "ptxas failed on {}.cu:\n{log}",
                src.name
            );
            let reports = parse_ptxas(&log);
            for entry in src.entries {
                let (_, r) = reports
                    .iter()
                    .find(|(n, _)| n == entry)
                    .unwrap_or_else(|| panic!("no ptxas report for {entry}:\n{log}"));
                let most = LAUNCH_THREADS
                    .iter()
                    .find(|(n, _)| n == entry)
                    .unwrap_or_else(|| panic!("{entry} has no LAUNCH_THREADS entry"))
                    .1;
                // The attention kernels launch at most MAX_WARPS warps (4 in the general
                // build).
                let threads = if special {
                    let warps = defines
                        .iter()
                        .find(|(k, _)| *k == "MAX_WARPS")
                        .map_or(4, |(_, v)| *v as u32);
                    most.min(32 * warps)
                } else {
                    most
                };
                eprintln!(
                    "| {entry}{label} | {threads} | {} | {}/{} | {} B |",
                    r.registers, r.spill_stores, r.spill_loads, r.smem
                );
                assert!(r.registers > 0, "{entry}: no register count in\n{log}");
                assert!(
                    r.registers * threads <= 65536,
                    "{entry}: {} registers × {threads} threads exceed the 64 K registers of a block",
                    r.registers
                );
                assert_eq!(
                    (r.spill_stores, r.spill_loads),
                    (0, 0),
                    "{entry} spills registers"
                );
            }
        }
    }
}

#[test]
fn ptxas_reports_are_parsed() {
    let log = "ptxas info    : 24 bytes gmem
ptxas info    : Compiling entry function 'rope' for 'sm_90'
ptxas info    : Function properties for rope
    32 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 20 registers, used 0 barriers, 32 bytes cumulative stack size
ptxas info    : Compiling entry function 'sample' for 'sm_90'
ptxas info    : Function properties for sample
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 72 registers, used 1 barriers, 4224 bytes smem
ptxas info    : Compiling entry function 'gemv' for 'sm_90'
ptxas info    : Function properties for gemv
    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, used 1 barriers, 32 bytes cumulative stack size, 32768 bytes smem
";
    let r = parse_ptxas(log);
    assert_eq!(r.len(), 3);
    assert_eq!(
        (r[2].1.registers, r[2].1.smem),
        (56, 32768),
        "smem past a stack size"
    );
    assert_eq!(r[0].0, "rope");
    assert_eq!(
        (r[0].1.registers, r[0].1.spill_stores, r[0].1.spill_loads),
        (20, 8, 4)
    );
    assert_eq!(r[1].0, "sample");
    assert_eq!((r[1].1.registers, r[1].1.smem), (72, 4224));
}
