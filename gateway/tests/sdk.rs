//! The official `openai` Python SDK, unchanged, against the real gateway binary.
//!
//! Needs a Python with `openai` installed: `$TOLLGATE_PYTHON`, else `.venv/bin/python` at
//! the repository root (`scripts/test.sh` makes it). Without one the test is skipped with
//! a printed reason, unless `TOLLGATE_REQUIRE_SDK=1` (set by the test script and CI), in
//! which case it fails.

mod common;
use common::*;
use std::path::PathBuf;
use std::process::Command;

fn python() -> Option<PathBuf> {
    let candidate = std::env::var_os("TOLLGATE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python"))
        });
    let ok = Command::new(&candidate)
        .args(["-c", "import openai"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ok.then_some(candidate)
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_python_sdk_lists_completes_and_streams() {
    let Some(py) = python() else {
        if std::env::var("TOLLGATE_REQUIRE_SDK").as_deref() == Ok("1") {
            panic!("TOLLGATE_REQUIRE_SDK=1 but no Python with the openai package was found");
        }
        eprintln!("SKIPPED: no Python with the `openai` package (run scripts/test.sh, or set TOLLGATE_PYTHON)");
        return;
    };
    let gw = Gateway::start(&config(FAST_SIM, "", ""));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk.py");
    let base = gw.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .args([script, &base, KEY, "m"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "SDK check failed:\n{stdout}\n{stderr}"
    );
}
