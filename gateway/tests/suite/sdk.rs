//! The official `openai` Python SDK, unchanged, against the real gateway binary.
//!
//! Needs a Python with `openai` installed (see `common::python_with`).

use crate::common;
use common::*;
use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn openai_python_sdk_lists_completes_and_streams() {
    let Some(py) = python_with("openai") else {
        return;
    };
    // Responses stored here (not with the real model below: both ways are checked).
    let stored = "\n[responses]\nstore = true\n[batches]\nenabled = true\n";
    let gw = Gateway::start(&(config(FAST_SIM, "", "") + stored));
    run_sdk(&py, &gw, &[]).await;
}

/// The same SDK checks against the real SmolLM2 served by the in-process engine.
#[tokio::test(flavor = "multi_thread")]
async fn openai_python_sdk_against_the_real_model() {
    let Some(py) = python_with("openai") else {
        return;
    };
    let model = gateway::model_fetch::resolve("smollm2-135m").expect("fetch smollm2-135m");
    // The id of `[`, which the script pushes up to ask for several tool calls at once.
    let gguf = kernels::gguf::Gguf::open(&model).expect("the real model");
    let tokenizer = kernels::tokenizer::Tokenizer::from_gguf(&gguf).expect("its tokenizer");
    let open = tokenizer.encode("[").expect("`[`");
    assert_eq!(open.len(), 1);
    let gw = Gateway::start(&(engine_config(&model, "") + "\n[batches]\nenabled = true\n"));
    run_sdk(&py, &gw, &["engine", &open[0].to_string()]).await;
}

/// Runs the SDK scripts (chat and completions; the Responses API; files and batches)
/// against `gw` (`extra`: their optional arguments).
async fn run_sdk(py: &std::path::Path, gw: &Gateway, extra: &[&str]) {
    for script in ["openai_sdk.py", "openai_responses.py", "openai_batches.py"] {
        run_script(py, gw, script, extra).await;
    }
}

async fn run_script(py: &std::path::Path, gw: &Gateway, script: &str, extra: &[&str]) {
    let py = py.to_path_buf();
    let script = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    let base = gw.base.clone();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .args([script.as_str(), base.as_str(), KEY, "m"])
            .args(&extra)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stdout}");
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "SDK check failed:\n{stdout}\n{stderr}"
    );
}
