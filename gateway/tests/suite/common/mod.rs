//! Test harness: runs the real `gateway` binary on an ephemeral loopback port, and
//! in-process upstream stubs (from the `loadtest` crate) for it to route to.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const KEY: &str = "sk-tollgate-demo";
pub const KEY_SHA256: &str = "179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f";

/// The key of a second tenant, `other` ([`other_tenant`]).
pub const OTHER: &str = "sk-tollgate-other";

/// The config lines of a second tenant, `other`, whose key is [`OTHER`].
pub fn other_tenant() -> String {
    use sha2::Digest;
    format!(
        "\n[[tenants]]\nid = \"other\"\nkeys_sha256 = [\"{}\"]\n",
        hex::encode(sha2::Sha256::digest(OTHER.as_bytes()))
    )
}

/// A running gateway process, killed on drop.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    pub base: String,
    /// The admin API's base URL, when the config has `admin_listen`.
    pub admin: Option<String>,
    _dir: tempdir::TempDir,
}

/// The admin token the test configs' `ADMIN_SERVER` lines accept.
pub const ADMIN_TOKEN: &str = "sk-tollgate-admin-demo";
/// `[server]` lines that open the admin API on an ephemeral loopback port.
pub const ADMIN_SERVER: &str = "admin_listen = \"127.0.0.1:0\"\nadmin_token_sha256 = \"89fc741a02ccba763dd23dad9bbcbeab2e95fef69c0a4bab66317295ac2dab1f\"";

pub mod tempdir {
    /// A scratch directory removed on drop.
    pub struct TempDir(pub std::path::PathBuf);
    impl TempDir {
        pub fn new() -> Self {
            let p = std::env::temp_dir().join(format!(
                "tollgate-test-{}-{}",
                std::process::id(),
                uuid_like()
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    fn uuid_like() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A config with one model `m`, a pool with the given workers, and the demo tenant.
pub fn config(workers: &str, extra_tenant: &str, server: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
max_body_bytes = 4096
drain_timeout_secs = 10.0
{server}

[[models]]
id = "m"

[[pools]]
name = "p"
model = "m"
health_interval_secs = 0.2
workers = [{workers}]

[[tenants]]
id = "demo"
keys_sha256 = ["{KEY_SHA256}"]
{extra_tenant}
"#
    )
}

/// A fast simulated worker: fixed 8-token answers, no delays.
pub const FAST_SIM: &str = r#"{ kind = "sim", prefill_tokens_per_s = 0.0, decode_step_ms = 0.0, decode_step_ms_per_seq = 0.0, min_output_tokens = 8, max_output_tokens = 8 }"#;

impl Gateway {
    pub fn start(config: &str) -> Gateway {
        Self::start_with_log(config, "warn")
    }

    /// Starts with `RUST_LOG=log`; stderr goes to a file read by [`Gateway::log`].
    pub fn start_with_log(config: &str, log: &str) -> Gateway {
        let dir = tempdir::TempDir::new();
        let path = dir.0.join("gateway.toml");
        std::fs::write(&path, config).unwrap();
        let args = vec![
            "serve".to_string(),
            "--config".into(),
            path.display().to_string(),
        ];
        Self::spawn(dir, &args, &[("RUST_LOG", log)])
    }

    /// Runs `gateway ARGS...` (a command that serves and prints its address first).
    pub fn start_args(args: &[String], env: &[(&str, &str)]) -> Gateway {
        let mut env = env.to_vec();
        env.push(("RUST_LOG", "warn"));
        Self::spawn(tempdir::TempDir::new(), args, &env)
    }

    fn spawn(dir: tempdir::TempDir, args: &[String], env: &[(&str, &str)]) -> Gateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.0.join("stderr.log")).unwrap())
            .spawn()
            .expect("start gateway");
        let stdout = child.stdout.take().unwrap();
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let mut admin = None;
        if let Some(a) = line.trim().strip_prefix("tollgate admin on ") {
            admin = Some(a.to_string());
            line.clear();
            reader.read_line(&mut line).unwrap();
        }
        let url = line
            .trim()
            .strip_prefix("tollgate listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        let addr: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
        Gateway {
            child,
            addr,
            base: url,
            admin,
            _dir: dir,
        }
    }

    /// The gateway's scratch folder (its config file and usage database live there).
    pub fn dir(&self) -> &std::path::Path {
        &self._dir.0
    }

    /// Rewrites the config file the gateway was started with.
    pub fn write_config(&self, text: &str) {
        let tmp = self._dir.0.join("gateway.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self._dir.0.join("gateway.toml")).unwrap();
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "{}{}",
            self.admin.as_deref().expect("admin API enabled"),
            path
        )
    }

    /// Everything the gateway logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.0.join("stderr.log")).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Kills the process at once (SIGKILL: no drain, nothing flushed) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit (up to `limit`).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The usage journal's segments of database `db` (in `<db>.usage-log/`).
pub fn journal_segments(db: &std::path::Path) -> usize {
    let folder = db.with_file_name(format!(
        "{}.usage-log",
        db.file_name().unwrap().to_string_lossy()
    ));
    std::fs::read_dir(folder).unwrap().count()
}

/// The value of one metric line (exact name and labels as rendered).
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

/// An in-process upstream stub; `kill` closes all its connections at once.
pub struct Stub {
    pub addr: SocketAddr,
    pub stats: Arc<loadtest::stub::Stats>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Stub {
    pub async fn start(args: loadtest::stub::StubArgs) -> Stub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(loadtest::stub::Stats::default());
        let task = tokio::spawn(loadtest::stub::serve(listener, args, stats.clone()));
        Stub { addr, stats, task }
    }

    pub fn worker(&self) -> String {
        self.worker_with("")
    }

    /// The worker entry with more `fields` (`a = 1, b = "x"`).
    pub fn worker_with(&self, fields: &str) -> String {
        let more = if fields.is_empty() {
            String::new()
        } else {
            format!(", {fields}")
        };
        format!(
            r#"{{ kind = "openai", url = "http://{}"{more} }}"#,
            self.addr
        )
    }

    pub fn kill(&self) {
        self.task.abort();
    }

    pub fn get(&self, c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

pub async fn post(gw: &Gateway, path: &str, body: &str) -> reqwest::Response {
    client()
        .post(gw.url(path))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// A request to `path` refused with a 400 whose message says `why`.
pub async fn refused(gw: &Gateway, path: &str, body: &str, why: &str) {
    let r = post(gw, path, body).await;
    assert_eq!(r.status(), 400, "{body}");
    let e: serde_json::Value = r.json().await.unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains(why), "{e}");
}

/// `post`, and its body as JSON.
pub async fn post_json(gw: &Gateway, path: &str, body: &str) -> serde_json::Value {
    post(gw, path, body).await.json().await.unwrap()
}

/// `GET url` with bearer `token`, its body as JSON.
pub async fn get_json(url: String, token: &str) -> serde_json::Value {
    client()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("JSON")
}

/// Reads a whole SSE body into its `data:` payloads.
pub async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// One request offered to a rate limit: whether it was admitted, the weighted tokens it
/// used, and when it was sent and answered.
pub struct Offered {
    pub admitted: bool,
    pub weighted: f64,
    pub sent: Instant,
    pub done: Instant,
}

/// What a token bucket of `rate` per second and depth `burst` may have admitted of
/// `offered`, each request costing at most `cost`: `(least, most)`. Each admission happened
/// between its request's send and its answer, so the span over which the bucket was drawn
/// on lies between (last send − first answer) and (last answer − first send) of the
/// admitted requests; a loaded machine may delay a request well after it was meant to go,
/// which the ticks that sent them do not see. The least assumes demand never let the
/// bucket fill up and idle (offer more than the rate).
pub fn admission_bounds(rate: f64, burst: f64, cost: f64, offered: &[Offered]) -> (f64, f64) {
    let ok: Vec<&Offered> = offered.iter().filter(|o| o.admitted).collect();
    let (Some(first_sent), Some(first_done), Some(last_sent), Some(last_done)) = (
        ok.iter().map(|o| o.sent).min(),
        ok.iter().map(|o| o.done).min(),
        ok.iter().map(|o| o.sent).max(),
        ok.iter().map(|o| o.done).max(),
    ) else {
        return (0.0, burst + cost);
    };
    let least = burst
        + rate
            * last_sent
                .saturating_duration_since(first_done)
                .as_secs_f64()
        - cost;
    let most = burst + rate * (last_done - first_sent).as_secs_f64() + cost;
    (least, most)
}

/// Polls `f` until it returns true or `limit` passes.
pub async fn eventually(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// A Python that can import `modules`: `$TOLLGATE_PYTHON`, else `.venv/bin/python` at the
/// repository root (made by `scripts/test.sh`). `None` means skip — unless
/// `TOLLGATE_REQUIRE_TOOLS=1` (the test script, CI), where a missing tool is a failure.
pub fn python_with(modules: &str) -> Option<std::path::PathBuf> {
    let candidate = std::env::var_os("TOLLGATE_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python").into());
    let ok = Command::new(&candidate)
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some(candidate);
    }
    if std::env::var("TOLLGATE_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("TOLLGATE_REQUIRE_TOOLS=1 but no Python with {modules} was found");
    }
    eprintln!("SKIPPED: no Python with {modules} (run scripts/test.sh, or set TOLLGATE_PYTHON)");
    None
}

/// A gateway config serving `model_path` with the in-process engine.
pub fn engine_config(model_path: &std::path::Path, engine: &str) -> String {
    engine_pool_config(
        model_path,
        "",
        &format!("{{ kind = \"engine\", backend = \"cpu\" {engine} }}"),
        "",
    )
}

/// A gateway config whose model `m` comes from `model_path` (with `model_extra` lines
/// under `[[models]]`), served by `workers`, for tenant `demo` (with `extra_tenant`).
pub fn engine_pool_config(
    model_path: &std::path::Path,
    model_extra: &str,
    workers: &str,
    extra_tenant: &str,
) -> String {
    config(workers, extra_tenant, "").replace(
        "[[models]]\nid = \"m\"",
        &format!(
            "[[models]]\nid = \"m\"\nsource = {:?}\n{model_extra}",
            model_path.display().to_string()
        ),
    )
}

/// The synthetic tiny model, written to a scratch directory (kept while the `TempDir`
/// lives) and loaded.
pub fn synthetic_model() -> (tempdir::TempDir, kernels::load::Loaded) {
    let dir = tempdir::TempDir::new();
    let path = dir.0.join("synthetic.gguf");
    kernels::synth::write_model(&path, &kernels::synth::SynthSpec::tiny()).unwrap();
    let loaded = kernels::load::load(&path).unwrap();
    (dir, loaded)
}

/// The synthetic tiny model written to a scratch directory (kept while the `TempDir`
/// lives), for a gateway config's `source`.
pub fn synthetic_model_file() -> (tempdir::TempDir, std::path::PathBuf) {
    let dir = tempdir::TempDir::new();
    let path = dir.0.join("synthetic.gguf");
    kernels::synth::write_model(&path, &kernels::synth::SynthSpec::tiny()).unwrap();
    (dir, path)
}

/// The secret between a gateway and the `gateway worker` behind it.
pub const WORKER_SECRET: &str = "a-shared-secret-of-some-length";

/// `gateway worker` serving `model` (id `m`) on the CPU backend, with [`WORKER_SECRET`].
pub fn remote_worker(model: &std::path::Path) -> Gateway {
    let args: Vec<String> = [
        "worker",
        "--listen",
        "127.0.0.1:0",
        "--model",
        model.to_str().unwrap(),
        "--model-id",
        "m",
        "--backend",
        "cpu",
        "--kv-tokens",
        "4096",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Gateway::start_args(&args, &[("TOLLGATE_WORKER_SECRET", WORKER_SECRET)])
}

/// A pool's `openai` worker entry for `worker`, passing the tenant on.
pub fn remote_upstream(worker: &Gateway) -> String {
    format!(
        r#"{{ kind = "openai", url = "{}", api_key = "{WORKER_SECRET}", forward_tenant = true }}"#,
        worker.base
    )
}

/// The engine backends to run a test on: the CPU, then the GPU path ([`gpu_paths`]).
pub fn engine_backends() -> Vec<gateway::config::BackendKind> {
    let mut kinds = vec![gateway::config::BackendKind::Cpu];
    kinds.extend(gpu_paths());
    kinds
}

/// The GPU code path's backends to run a test on: the CUDA emulator where it is built, and
/// a real GPU (`backend = "cuda"`, device 0) where the driver sees one, as on the GPU
/// machine `kernels/gpu-check.sh` runs this binary on (with the emulator off there).
pub fn gpu_paths() -> Vec<gateway::config::BackendKind> {
    let mut kinds = Vec::new();
    if emulator_present() {
        kinds.push(gateway::config::BackendKind::Emulator);
    }
    if gpu_present() {
        kinds.push(gateway::config::BackendKind::Cuda);
    }
    kinds
}

/// Whether the CUDA driver, NVRTC and cuBLAS load and the driver sees a GPU (asked once a
/// process); the reason it does not is printed once.
pub fn gpu_present() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRESENT.get_or_init(|| match kernels::cuda::available() {
        Ok(n) => {
            println!("GPU: the driver sees {n}; the GPU path runs on device 0 too");
            true
        }
        Err(why) => {
            println!("no GPU ({why}): the GPU path runs on the emulator only");
            false
        }
    })
}

/// An engine worker on `kind` with 2 CPU threads and the default sizes.
pub fn engine_on(
    loaded: &kernels::load::Loaded,
    kind: gateway::config::BackendKind,
) -> gateway::engine::EngineWorker {
    let cfg = gateway::config::EngineConfig {
        backend: kind,
        threads: 2,
        ..gateway::config::EngineConfig::default()
    };
    gateway::engine::EngineWorker::start("test".into(), loaded, &cfg, 0).unwrap()
}

/// A worker's answer read to its end: its text and why it ended.
pub async fn text_and_finish(
    mut s: gateway::worker::EventStream,
) -> (String, gateway::worker::FinishReason) {
    use futures::StreamExt;
    let mut text = String::new();
    while let Some(ev) = s.next().await {
        match ev.unwrap() {
            gateway::worker::WorkerEvent::Delta { text: t, .. } => text.push_str(&t),
            gateway::worker::WorkerEvent::Done { finish_reason, .. } => {
                return (text, finish_reason)
            }
            _ => {}
        }
    }
    panic!("no Done event");
}

/// A streamed, greedy request for a worker, of tenant `t`.
pub fn worker_req(prompt: &str, max_tokens: u32) -> Arc<gateway::worker::WorkerRequest> {
    use gateway::worker::{Prompt, SamplingParams, WorkerRequest};
    Arc::new(WorkerRequest {
        request_id: "r".into(),
        tenant: "t".into(),
        weight: None,
        output_weight: 3.0,
        model: "m".into(),
        prompt: Prompt::Text(prompt.into()),
        prompt_ids: None,
        params: SamplingParams::greedy(max_tokens),
        stream: true,
        embed: false,
        more_inputs: Vec::new(),
        dimensions: None,
    })
}

/// Whether the CUDA emulator is built; if not, prints why the test is skipped (and panics
/// under `TOLLGATE_REQUIRE_EMU`, as `scripts/test.sh` sets).
pub fn emulator_present() -> bool {
    match kernels::cuda::emu::available() {
        Ok(()) => true,
        Err(why) => {
            assert!(
                std::env::var("TOLLGATE_REQUIRE_EMU").is_err(),
                "the emulator is required: {why}"
            );
            println!("SKIPPED: no CUDA emulator ({why})");
            false
        }
    }
}
