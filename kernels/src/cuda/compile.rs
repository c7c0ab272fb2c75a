//! Run-time compilation of the kernel sources by NVRTC, for the device's compute
//! capability, with the PTX cached on disk (`$TOLLGATE_PTX_CACHE`, else
//! `~/.cache/tollgate/ptx`) under a hash of source, options and architecture.

use super::{Source, COMMON, SOURCES};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("NVRTC failed on {name}.cu: {log}")]
    Nvrtc { name: &'static str, log: String },
    #[error("unsupported architecture {0:?}")]
    Arch(String),
}

/// Compile-time constants for the kernels (`-DNAME=VALUE`), e.g. the attention kernel's
/// `MAX_GROUP` and `MAX_DPL` fitted to a model's heads so that it holds no unused
/// registers. Empty: the sources' general defaults.
pub type Defines<'a> = &'a [(&'static str, usize)];

/// NVRTC options for every kernel.
fn options(arch: &'static str, name: &'static str, defines: Defines) -> CompileOptions {
    let mut options = vec!["--std=c++17".to_string()];
    options.extend(defines.iter().map(|(k, v)| format!("-D{k}={v}")));
    CompileOptions {
        arch: Some(arch),
        name: Some(format!("{name}.cu")),
        // Precise division and sqrt: the CPU twins are compared at tight tolerances.
        use_fast_math: Some(false),
        options,
        ..Default::default()
    }
}

/// `compute_XY` for a compute capability.
pub fn arch_for(major: i32, minor: i32) -> Result<&'static str, CompileError> {
    Ok(match (major, minor) {
        (9, 0) => "compute_90",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 9) => "compute_89",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        _ => return Err(CompileError::Arch(format!("{major}.{minor}"))),
    })
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TOLLGATE_PTX_CACHE") {
        return PathBuf::from(d);
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/tollgate/ptx"))
        .unwrap_or_else(|| std::env::temp_dir().join("tollgate-ptx"))
}

/// Compiles one source (no cache) with the sources' default constants.
pub fn compile(src: &Source, arch: &'static str) -> Result<String, CompileError> {
    compile_with(src, arch, &[])
}

/// Compiles one source (no cache) with `defines`.
pub fn compile_with(
    src: &Source,
    arch: &'static str,
    defines: Defines,
) -> Result<String, CompileError> {
    let code = format!("{COMMON}\n#line 1 \"{}.cu\"\n{}", src.name, src.code);
    compile_ptx_with_opts(code, options(arch, src.name, defines))
        .map(|p| p.to_src())
        .map_err(|e| CompileError::Nvrtc {
            name: src.name,
            log: e.to_string(),
        })
}

/// Compiles one source, or reads it from the cache.
pub fn cached(src: &Source, arch: &'static str, defines: Defines) -> Result<Ptx, CompileError> {
    let mut h = Sha256::new();
    h.update(COMMON);
    h.update(src.code);
    h.update(arch);
    h.update(format!("{:?}", options(arch, src.name, defines).options));
    let key = hex::encode(&h.finalize()[..12]);
    let path = cache_dir().join(format!("{}-{arch}-{key}.ptx", src.name));
    if let Ok(ptx) = std::fs::read_to_string(&path) {
        return Ok(Ptx::from_src(ptx));
    }
    let ptx = compile_with(src, arch, defines)?;
    if std::fs::create_dir_all(cache_dir()).is_ok() {
        // Write then rename: concurrent compilers (other processes, or other threads of
        // this one) never see a half-written file; each writer has its own temporary.
        static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(Ptx::from_src(ptx))
}

/// Every source, compiled (or cached) for `arch` with `defines`.
pub fn all(
    arch: &'static str,
    defines: Defines,
) -> Result<Vec<(&'static Source, Ptx)>, CompileError> {
    SOURCES
        .iter()
        .map(|s| Ok((s, cached(s, arch, defines)?)))
        .collect()
}
