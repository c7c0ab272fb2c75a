//! Builds the CUDA emulator (`kernels/emu/`): every kernel source in `kernels/cuda/`, compiled
//! by the host C++ compiler against the emulator's CUDA shim, once per set of attention
//! constants the tests use, so that the kernels' own code runs (and is checked against its CPU
//! twins) on machines without a GPU; where the compiler takes `-fsanitize`, with every access
//! checked for alignment, every array index for bounds and every shift for width, so that what
//! faults on a GPU fails the launch. Sets `cfg(tollgate_emu)` when built; without a C++
//! compiler, or off x86-64 Linux, it warns and leaves the emulator out (the tests then skip
//! their emulator runs, or fail under `TOLLGATE_REQUIRE_EMU=1`, as in `scripts/test.sh`);
//! `TOLLGATE_NO_EMU=1` leaves it out on purpose, to check that path. With
//! `TOLLGATE_EMU_RACECHECK=1` every access is instrumented, and shared and global memory's
//! checked for races between a block's threads, and global memory's between a launch's
//! blocks (sets `cfg(tollgate_emu_racecheck)`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Emulator builds: a name and the attention kernel's `MAX_GROUP`, `MAX_DPL`,
/// `MAX_WARPS` (the sources' general defaults; SmolLM2-135M's; the tiny synthetic model's;
/// heads 256 wide in pairs, Gemma's).
/// The first builds every source; the others only the sources that read those constants
/// ([`CONSTANTS`]: the attention kernels), and take every other kernel from the first
/// (`emu.rs`'s `builds`), whose code would be the same.
const VARIANTS: &[(&str, usize, usize, usize)] = &[
    ("general", 8, 4, 4),
    ("g3d2w16", 3, 2, 16),
    ("g2d1w16", 2, 1, 16),
    ("g2d8w8", 2, 8, 8),
];

/// The sources' own headers (`kernels/cuda/*.cuh` but common.cuh), in the order each builds
/// on the ones before it: the order `SOURCES` in src/cuda/mod.rs concatenates them in. A
/// header not listed leaves the emulator out, saying so (as a source it cannot build does).
const HEADERS: &[&str] = &["gemv.cuh", "gemv_blocks.cuh", "gemv_product.cuh"];

/// The constants that differ between [`VARIANTS`]: a source that names one is built in each.
const CONSTANTS: &[&str] = &["MAX_GROUP", "MAX_DPL", "MAX_WARPS"];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tollgate_emu)");
    println!("cargo::rustc-check-cfg=cfg(tollgate_emu_fma_f16c)");
    println!("cargo::rustc-check-cfg=cfg(tollgate_emu_racecheck)");
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=emu");
    println!("cargo:rerun-if-env-changed=TOLLGATE_NO_EMU");
    println!("cargo:rerun-if-env-changed=TOLLGATE_EMU_RACECHECK");
    let skip = |why: String| println!("cargo:warning=CUDA emulator left out: {why}");
    if std::env::var("TOLLGATE_NO_EMU").as_deref() == Ok("1") {
        return skip("TOLLGATE_NO_EMU=1".into());
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if arch != "x86_64" || os != "linux" {
        return skip(format!("it runs on x86-64 Linux only (target {arch}-{os})"));
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    let mut sources = match kernel_sources(&root.join("cuda")) {
        Ok(s) => s,
        Err(e) => return skip(format!("reading kernels/cuda: {e}")),
    };
    let headers = match files_of(&root.join("cuda"), "cuh") {
        Ok(h) => h,
        Err(e) => return skip(format!("reading kernels/cuda: {e}")),
    };
    let unlisted = headers
        .iter()
        .filter_map(|p| p.file_name()?.to_str())
        .find(|n| *n != "common.cuh" && !HEADERS.contains(n));
    if let Some(n) = unlisted {
        return skip(format!(
            "kernels/cuda/{n} is not in build.rs's HEADERS (list it where it belongs in order)"
        ));
    }
    let headers: Vec<PathBuf> = HEADERS.iter().map(|h| root.join("cuda").join(h)).collect();
    // The emulator's own checks (emulator builds only).
    let selftest = root.join("emu/selftest.cu");
    match entries_of(&selftest) {
        Ok(e) => sources.push((selftest, e)),
        Err(e) => return skip(format!("reading {}: {e}", selftest.display())),
    }
    // The sources as the emulator builds them (shared memory rewritten: `rewritten`).
    let dir = out.join("emu_src");
    let mut next = 0;
    let mut emulated = |path: &Path| rewritten(path, &dir, &mut next);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return skip(format!("making {}: {e}", dir.display()));
    }
    let common = match emulated(&root.join("cuda/common.cuh")) {
        Ok(c) => c,
        Err(e) => return skip(e),
    };
    let headers = match headers
        .iter()
        .map(|h| emulated(h))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(h) => h,
        Err(e) => return skip(e),
    };
    let sources = match sources
        .into_iter()
        .map(|(p, e)| Ok((emulated(&p)?, e)))
        .collect::<Result<Vec<_>, String>>()
    {
        Ok(s) => s,
        Err(e) => return skip(e),
    };
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .warnings(false)
        .flag_if_supported("-Wno-unknown-pragmas")
        // Kernels store pairs of f16 words as one 32-bit word, as CUDA allows.
        .flag_if_supported("-fno-strict-aliasing")
        // a·b + c rounds twice whatever the host compiler's default; kernels that need the
        // same bits everywhere (sample.cu's exp) say fmaf.
        .flag_if_supported("-ffp-contract=off")
        .include(root.join("emu"))
        .file(root.join("emu/runtime.cpp"));
    // FMA and F16C where the building CPU has them (the emulator runs where it is built,
    // and `Emu::open` refuses a CPU without them): `fmaf` and the f16 conversions are then
    // an instruction each rather than calls.
    if host_has_fma_f16c() {
        build.flag("-mfma").flag("-mf16c");
        println!("cargo:rustc-cfg=tollgate_emu_fma_f16c");
    }
    // Each build's sources one translation unit each, so that the C++ compiler's jobs
    // (cc's `parallel`) share the source files between the cores.
    let mut list = String::from("#include \"emu.h\"\n");
    let mut parts = Vec::new();
    for (i, (name, group, dpl, warps)) in VARIANTS.iter().enumerate() {
        for source in sources.iter().filter(|(p, _)| i == 0 || reads_constants(p)) {
            let stem = source
                .0
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("source");
            let part = format!("{name}_{stem}");
            let path = out.join(format!("emu_{part}.cpp"));
            let consts = (*group, *dpl, *warps);
            let code = variant(&common, &headers, source, name, &part, consts);
            if let Err(e) = std::fs::write(&path, code) {
                return skip(format!("writing {}: {e}", path.display()));
            }
            build.file(&path);
            let _ = writeln!(
                list,
                "extern \"C\" const emu::Variant* tollgate_emu_variant_{part}();"
            );
            parts.push(part);
        }
    }
    list.push_str(
        "extern \"C\" const emu::Variant* tollgate_emu_variant(unsigned i) {\n  switch (i) {\n",
    );
    for (i, part) in parts.iter().enumerate() {
        let _ = writeln!(list, "    case {i}: return tollgate_emu_variant_{part}();");
    }
    list.push_str("    default: return nullptr;\n  }\n}\n");
    let path = out.join("emu_variants.cpp");
    if let Err(e) = std::fs::write(&path, list) {
        return skip(format!("writing {}: {e}", path.display()));
    }
    build.file(&path);
    // Misaligned accesses, indices past an array's bounds and over-wide shifts fail the
    // launch, as on a GPU they fault or are undefined (the handlers: runtime.cpp).
    let checks = [
        "-fsanitize=alignment,bounds,shift",
        "-fno-sanitize-recover=all",
    ];
    if checks
        .iter()
        .all(|f| build.is_flag_supported(f).unwrap_or(false))
    {
        for f in checks {
            build.flag(f);
        }
        build.define("TOLLGATE_EMU_UB_CHECKS", None);
    } else {
        println!("cargo:warning=CUDA emulator built without its alignment, bounds and shift checks (the C++ compiler takes no -fsanitize)");
    }
    // Racecheck (runtime.cpp): every access instrumented, and shared and global memory's
    // checked for hazards between threads and blocks, where asked (slower;
    // `scripts/test.sh` runs the kernels' parity tests so once).
    if std::env::var("TOLLGATE_EMU_RACECHECK").as_deref() == Ok("1") {
        build
            .flag("-fsanitize=thread")
            .flag("--param=tsan-instrument-func-entry-exit=0")
            .define("TOLLGATE_EMU_RACECHECK", None);
        println!("cargo:rustc-cfg=tollgate_emu_racecheck");
    }
    match build.try_compile("tollgate_emu") {
        Ok(()) => println!("cargo:rustc-cfg=tollgate_emu"),
        Err(e) => skip(format!("the C++ compiler failed: {e}")),
    }
}

/// Whether the CPU running this build has FMA and F16C.
fn host_has_fma_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Every `.cu` file (sorted) with the `extern "C" __global__` entry points it defines.
fn kernel_sources(dir: &Path) -> std::io::Result<Vec<(PathBuf, Vec<String>)>> {
    files_of(dir, "cu")?
        .into_iter()
        .map(|p| Ok((p.clone(), entries_of(&p)?)))
        .collect()
}

/// Whether the source at `path` names one of the [`CONSTANTS`] the builds differ in.
fn reads_constants(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|code| CONSTANTS.iter().any(|c| code.contains(c)))
}

/// The files in `dir` named `*.{ext}`, sorted.
fn files_of(dir: &Path, ext: &str) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    Ok(files)
}

/// The `extern "C" __global__` entry points a source defines.
fn entries_of(path: &Path) -> std::io::Result<Vec<String>> {
    let code = std::fs::read_to_string(path)?;
    Ok(code
        .split("extern \"C\" __global__ void ")
        .skip(1)
        // Past a `__launch_bounds__(…)` between the return type and the name.
        .map(|rest| match rest.strip_prefix("__launch_bounds__(") {
            Some(b) => b.split_once(')').map_or(b, |(_, r)| r),
            None => rest,
        })
        .filter_map(|rest| rest.split('(').next())
        .map(|n| n.trim().to_string())
        .collect())
}

/// `path` as the emulator builds it, written to `dir`: each `__shared__ T name[dims];`
/// rewritten into `auto& name = ::emu::shared_var<T[dims], id>("name");`, a slot of the
/// launching OS thread's own arena (emu.h), so that emulated devices launch on their threads
/// at once;
/// declarations numbered on from `next` (0 is `gemv_smem`'s, gemv.cuh's). A `#line` keeps the
/// file's own name and lines in messages.
fn rewritten(path: &Path, dir: &Path, next: &mut usize) -> Result<PathBuf, String> {
    let code =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut out = format!("#line 1 \"{}\"\n", path.display());
    for (i, line) in code.lines().enumerate() {
        let decl = line.trim_start();
        if !decl.starts_with("__shared__ ") {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let Some((ty, name, dims)) = shared_decl(decl) else {
            return Err(format!(
                "{}:{}: a `__shared__` declaration the emulator's build does not follow (one \
                 `T name[dims];` a line): {decl}",
                path.display(),
                i + 1
            ));
        };
        *next += 1;
        let indent = &line[..line.len() - decl.len()];
        let _ = writeln!(
            out,
            "{indent}auto& {name} = ::emu::shared_var<{ty}{dims}, {next}>(\"{name}\");"
        );
    }
    let to = dir.join(path.file_name().unwrap_or_default());
    std::fs::write(&to, out).map_err(|e| format!("writing {}: {e}", to.display()))?;
    Ok(to)
}

/// `__shared__ T name[dims];` (a trailing `//` comment allowed) as T, name and dims.
fn shared_decl(line: &str) -> Option<(&str, &str, &str)> {
    let decl = line.strip_prefix("__shared__ ")?;
    let decl = decl.split("//").next()?.trim_end().strip_suffix(';')?;
    let (head, dims) = decl.split_at(decl.find('[').unwrap_or(decl.len()));
    let (ty, name) = head.trim().rsplit_once(char::is_whitespace)?;
    let ident = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let ty = ty.trim();
    (ident && !ty.is_empty() && !ty.contains([',', '='])).then(|| (ty, name, dims.trim()))
}

/// One source of an emulator build (`part` of build `name`): the constants, its entry
/// points renamed for this build (so that builds link side by side), the shared helpers,
/// the sources' headers and the source, and its entry table.
fn variant(
    common: &Path,
    headers: &[PathBuf],
    source: &(PathBuf, Vec<String>),
    name: &str,
    part: &str,
    (group, dpl, warps): (usize, usize, usize),
) -> String {
    let mut s = String::from("// Generated by kernels/build.rs.\n#include \"emu.h\"\n");
    let _ = writeln!(
        s,
        "#define MAX_GROUP {group}\n#define MAX_DPL {dpl}\n#define MAX_WARPS {warps}"
    );
    let (path, entries) = source;
    for e in entries {
        let _ = writeln!(s, "#define {e} {e}__{name}");
    }
    s.push_str("namespace {\n");
    let _ = writeln!(s, "#include \"{}\"", common.display());
    // A source's device code in its own headers (gemv's), in order, before every source.
    for h in headers {
        let _ = writeln!(s, "#include \"{}\"", h.display());
    }
    let _ = writeln!(s, "#include \"{}\"", path.display());
    s.push_str("}  // namespace\nstatic const emu::Entry ENTRIES[] = {\n");
    for e in entries {
        let _ = writeln!(s, "    EMU_ENTRY({e}),");
    }
    let _ = writeln!(
        s,
        "}};\nextern \"C\" const emu::Variant* tollgate_emu_variant_{part}() {{\n  static const emu::Variant v = {{\"{name}\", {group}, {dpl}, {warps}, ENTRIES, {}}};\n  return &v;\n}}",
        entries.len()
    );
    s
}
