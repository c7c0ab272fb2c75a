//! Runs a batch: its input file read and checked (`validating` → `in_progress`, or
//! `failed` with every fault), then each request not yet done sent through
//! [`crate::pipeline::serve`] as the tenant's own request (its contract, its metering) at
//! the lowest scheduling weight, `[batches] concurrency` at once. A request refused for
//! the moment (429 past the contract, 503 no capacity) waits the time the answer names and
//! goes again (as does one whose tenant a reload took out of the config, until it is
//! back); any other answer is its result, committed at once. Then the output and
//! error files are written (`finalizing` → `completed`). A cancel stops sending requests
//! (those in flight end and are kept: `cancelled`); the completion window's end does too,
//! and lists each request not run in the error file (`expired`); a shutdown stops it
//! where it is, for the next start to go on.

use super::input::{self, Endpoint, Line};
use super::store::{now_s, BatchRow, Ending, LineResult};
use super::{BatchStoreError, Batches, Halt, Registered};
use crate::api::error::ApiError;
use crate::api::stored_responses;
use crate::pipeline::{self, RequestCtx};
use crate::state::AppState;
use serde::Deserialize;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error(transparent)]
    Store(#[from] BatchStoreError),
    #[error("a blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("{0}")]
    Writer(String),
}

/// Runs `f` on the store from the blocking pool.
async fn blocking<T: Send + 'static>(
    batches: &Arc<Batches>,
    f: impl FnOnce(&super::BatchStore) -> Result<T, BatchStoreError> + Send + 'static,
) -> Result<T, RunError> {
    Ok(batches.on_store(f).await?)
}

/// Resumes the batches a previous run of the gateway left unfinished, and purges expired
/// files and batches now and hourly. Called once, on the runtime batches are to run on.
pub fn resume(state: &AppState) {
    let Some(batches) = &state.batches else {
        return;
    };
    let _ = batches.runtime.set(tokio::runtime::Handle::current());
    let state = state.clone();
    tokio::spawn(async move {
        let Some(batches) = state.batches.clone() else {
            return;
        };
        match blocking(&batches, |s| s.unfinished()).await {
            Ok(left) => {
                if !left.is_empty() {
                    tracing::info!(batches = left.len(), "resuming unfinished batches");
                }
                for b in left {
                    spawn(&state, b);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read unfinished batches"),
        }
        loop {
            match blocking(&batches, |s| s.purge()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, "purged expired files and batches"),
                Err(e) => tracing::warn!(error = %e, "purging expired files and batches failed"),
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    });
}

/// Starts running `batch` (unless it already runs here).
pub fn spawn(state: &AppState, batch: BatchRow) {
    let Some(batches) = state.batches.clone() else {
        return;
    };
    // A batch cancelled while a gateway that stopped ran it ends as cancelled.
    let first = match batch.status.as_str() {
        "cancelling" => Halt::Cancel,
        _ => Halt::No,
    };
    let (tx, halt) = watch::channel(first);
    match batches.running.entry(batch.id.clone()) {
        dashmap::Entry::Occupied(_) => return,
        dashmap::Entry::Vacant(v) => {
            v.insert(tx);
        }
    }
    batches.running_count.send_modify(|n| *n += 1);
    let registered = Registered {
        batches: batches.clone(),
        id: batch.id.clone(),
    };
    let runtime = batches
        .runtime
        .get()
        .cloned()
        .unwrap_or_else(tokio::runtime::Handle::current);
    let state = state.clone();
    let span = tracing::info_span!("batch", id = %batch.id, tenant = %batch.tenant);
    runtime.spawn(
        async move {
            let _registered = registered;
            if let Err(e) = run(&state, &batches, batch, halt).await {
                tracing::error!(error = %e, "batch stopped; the next start resumes it");
            }
        }
        .instrument(span),
    );
}

/// The batch's faults as the API lists them (`errors.data`).
fn faults_json(faults: &[input::Fault]) -> String {
    serde_json::to_string(faults).unwrap_or_else(|_| "[]".into())
}

async fn run(
    state: &AppState,
    batches: &Arc<Batches>,
    batch: BatchRow,
    halt: watch::Receiver<Halt>,
) -> Result<(), RunError> {
    let id = batch.id.clone();
    let fail = |code: &'static str, message: String| {
        let errors = faults_json(&[input::Fault {
            code,
            message,
            param: None,
            line: None,
        }]);
        let id = id.clone();
        async move { blocking(batches, move |s| s.fail(&id, &errors)).await }
    };
    let Some(endpoint) = Endpoint::parse(&batch.endpoint) else {
        return fail(
            "invalid_endpoint",
            format!("Unknown endpoint {}.", batch.endpoint),
        )
        .await;
    };
    let (tenant, file) = (batch.tenant.clone(), batch.input_file_id.clone());
    let Some(content) = blocking(batches, move |s| s.content(&tenant, &file)).await? else {
        return fail(
            "file_not_found",
            format!("The input file {} is gone.", batch.input_file_id),
        )
        .await;
    };
    let validating = batch.status == "validating";
    let st = state.clone();
    let tenant = batch.tenant.clone();
    let read = tokio::task::spawn_blocking(move || {
        let live = st.live();
        let pool = live.tenants.get(&tenant).and_then(|t| t.cfg.pool.clone());
        let reachable = |model: &str| {
            // A batch resumed runs what it accepted; its requests meet today's config.
            !validating || st.router.pool_for(model, pool.as_deref()).is_some()
        };
        let checks = input::Checks {
            endpoint,
            server: &st.server,
            max_requests: live.config.batches.max_requests,
            reachable: &reachable,
        };
        input::read(&content, &checks)
    })
    .await?;
    let lines = match read {
        Ok(lines) => Arc::new(lines),
        Err(faults) => {
            let errors = faults_json(&faults);
            tracing::info!(faults = faults.len(), "batch input refused");
            let id = id.clone();
            return blocking(batches, move |s| s.fail(&id, &errors)).await;
        }
    };
    let (b, total) = (id.clone(), lines.len());
    // The model, where every request asks for the same one.
    let model = lines
        .first()
        .map(|l| l.model.clone())
        .filter(|m| lines.iter().all(|l| &l.model == m));
    blocking(batches, move |s| s.start(&b, total, model.as_deref())).await?;
    let b = id.clone();
    let done: HashSet<usize> = blocking(batches, move |s| s.done_lines(&b))
        .await?
        .into_iter()
        .collect();
    tracing::info!(requests = total, done = done.len(), "batch running");
    let expiry = deadline(batch.expires_at);
    let gate = Arc::new(Semaphore::new(concurrency(state, &batch.tenant)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut left = Vec::new();
    let mut stopped = false;
    for i in (0..lines.len()).filter(|i| !done.contains(i)) {
        // Ended requests are reaped as the batch goes (a finished task is kept, with
        // its future's memory, until it is joined).
        while let Some(ended) = tasks.try_join_next() {
            if let Some(i) = ended?? {
                left.push(i);
            }
        }
        if stopped {
            left.push(i);
            continue;
        }
        if tokio::time::Instant::now() >= expiry {
            stopped = true;
            left.push(i);
            continue;
        }
        let mut h = halt.clone();
        let permit = tokio::select! {
            biased;
            _ = h.wait_for(|h| *h != Halt::No) => None,
            _ = tokio::time::sleep_until(expiry) => None,
            p = gate.clone().acquire_owned() => p.ok(),
        };
        let Some(permit) = permit else {
            stopped = true;
            left.push(i);
            continue;
        };
        let job = Job {
            state: state.clone(),
            batches: batches.clone(),
            batch: id.clone(),
            tenant: batch.tenant.clone(),
            endpoint,
            lines: lines.clone(),
            line: i,
            halt: halt.clone(),
            expiry,
        };
        let span = tracing::info_span!("batch_request", line = i + 1);
        tasks.spawn(
            async move {
                let _permit = permit;
                job.run().await
            }
            .instrument(span),
        );
    }
    let mut unrun = left;
    while let Some(ended) = tasks.join_next().await {
        if let Some(i) = ended?? {
            unrun.push(i);
        }
    }
    let why = *halt.borrow();
    let ending = match why {
        Halt::Drain => {
            tracing::info!(left = unrun.len(), "batch paused for shutdown");
            return Ok(());
        }
        Halt::Cancel => Ending::Cancelled,
        Halt::No if !unrun.is_empty() => Ending::Expired,
        Halt::No => Ending::Completed,
    };
    let b = id.clone();
    blocking(batches, move |s| s.finalizing(&b)).await?;
    if ending == Ending::Expired {
        unrun.sort_unstable();
        let (b, lines) = (id.clone(), lines.clone());
        blocking(batches, move |s| {
            for i in unrun {
                s.record(&b, &expired(i, &lines[i]))?;
            }
            Ok(())
        })
        .await?;
    }
    let b = id.clone();
    blocking(batches, move |s| s.finish(&b, ending)).await?;
    tracing::info!(status = ?ending, "batch ended");
    Ok(())
}

/// The runtime's instant at Unix second `at`.
fn deadline(at: i64) -> tokio::time::Instant {
    let left = Duration::from_secs(at.saturating_sub(now_s()).max(0) as u64);
    tokio::time::Instant::now() + left
}

/// One request of a running batch.
struct Job {
    state: AppState,
    batches: Arc<Batches>,
    batch: String,
    tenant: String,
    endpoint: Endpoint,
    lines: Arc<Vec<Line>>,
    line: usize,
    halt: watch::Receiver<Halt>,
    expiry: tokio::time::Instant,
}

/// How long a request waits for its tenant to be in the config again.
const TENANT_GONE_WAIT: Duration = Duration::from_secs(5);

/// Shortest and longest waits before a refused request goes again.
const WAIT_MIN: Duration = Duration::from_millis(50);
const WAIT_MAX: Duration = Duration::from_secs(60);

impl Job {
    /// Runs the request until it has a result (recorded; `None`), or the batch stops or
    /// expires first (`Some(line)`: not run).
    async fn run(mut self) -> Result<Option<usize>, RunError> {
        let line = &self.lines[self.line];
        let request_id = format!("{}-{}", self.batch, self.line + 1);
        loop {
            if *self.halt.borrow() != Halt::No || tokio::time::Instant::now() >= self.expiry {
                return Ok(Some(self.line));
            }
            let answer = self.attempt(line, &request_id).await;
            let wait = match answer {
                Attempt::Done(status, body) => {
                    let result = outcome(&request_id, line, status, &body, self.line);
                    let counter = match result.ok {
                        true => &self.batches.answered,
                        false => &self.batches.refused,
                    };
                    let batch = self.batch.clone();
                    self.batches
                        .record(batch, result)
                        .await
                        .map_err(RunError::Writer)?;
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(None);
                }
                Attempt::Later(wait) => wait,
            };
            tracing::debug!(?wait, "refused for now; going again");
            tokio::select! {
                biased;
                _ = self.halt.wait_for(|h| *h != Halt::No) => return Ok(Some(self.line)),
                _ = tokio::time::sleep_until(self.expiry) => return Ok(Some(self.line)),
                _ = tokio::time::sleep(wait.clamp(WAIT_MIN, WAIT_MAX)) => {}
            }
        }
    }

    /// One try: the request as the tenant sends it now (its contract may have changed).
    async fn attempt(&self, line: &Line, request_id: &str) -> Attempt {
        let tenant = self.state.live().tenants.get(&self.tenant).cloned();
        let Some(tenant) = tenant else {
            // Not in the config now (a reload took it out): its batch waits for it to
            // come back, or for the window's end.
            return Attempt::Later(TENANT_GONE_WAIT);
        };
        let validated = (self.endpoint.validator())(&line.body, &self.state.server);
        let req = match validated {
            Ok(req) => req,
            Err(e) => return Attempt::Done(e.status(), e.to_json().into()),
        };
        if let Some(wait) = headroom(&tenant, &req.model) {
            return Attempt::Later(wait);
        }
        if self.endpoint == Endpoint::Responses {
            // An answer the store would keep is held to the tenant's storage quota, as
            // the endpoint holds it.
            let room = stored_responses::room_for_batch_line(&self.state, &tenant, &line.body);
            if let Err(e) = room.await {
                return Attempt::Done(e.status(), e.to_json().into());
            }
        }
        let ctx = RequestCtx {
            request_id: request_id.into(),
            tenant,
            acting: None,
            started: Instant::now(),
            batch: true,
        };
        let resp = pipeline::serve(&self.state, ctx, req).await;
        let status = resp.status();
        if status == http::StatusCode::TOO_MANY_REQUESTS
            || status == http::StatusCode::SERVICE_UNAVAILABLE
        {
            let ms = resp
                .headers()
                .get("retry-after-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1000);
            return Attempt::Later(Duration::from_millis(ms));
        }
        match axum::body::to_bytes(resp.into_body(), MAX_ANSWER_BYTES).await {
            Ok(body) => Attempt::Done(status, body),
            Err(e) => {
                let e = ApiError::Internal(format!("reading the answer failed: {e}"));
                Attempt::Done(e.status(), e.to_json().into())
            }
        }
    }
}

/// How long until the tenant's token bucket for `model` holds half its burst again, if it
/// holds less now: a batch leaves that half to the tenant's own interactive requests.
fn headroom(tenant: &crate::tenants::Tenant, model: &str) -> Option<Duration> {
    let (contract, scope) = tenant.limits.for_model(model);
    let rate = contract.token_rate()?;
    let bucket = scope.snapshot(contract).tokens?;
    let keep = bucket.limit / 2.0;
    (bucket.remaining < keep)
        .then(|| Duration::from_secs_f64((keep - bucket.remaining) / rate.per_sec))
}

/// Requests of a batch in flight at once: `[batches] concurrency`, and at most half the
/// tenant's `max_concurrency` (at least one), so its own requests keep room.
fn concurrency(state: &AppState, tenant: &str) -> usize {
    let live = state.live();
    let cap = live
        .tenants
        .get(tenant)
        .and_then(|t| t.limits.default.0.max_concurrency)
        .map_or(usize::MAX, |m| (m as usize / 2).max(1));
    live.config.batches.concurrency.min(cap)
}

/// Largest answer kept for one request.
const MAX_ANSWER_BYTES: usize = 256 << 20;

enum Attempt {
    /// An answer: its status and body.
    Done(http::StatusCode, bytes::Bytes),
    /// Refused for now: go again after this long.
    Later(Duration),
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Counted {
    usage: Option<Usage>,
}

/// An answer's usage: chat's and completions' names, or the Responses API's.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Usage {
    #[serde(alias = "input_tokens")]
    prompt_tokens: i64,
    #[serde(alias = "output_tokens")]
    completion_tokens: i64,
    #[serde(alias = "input_tokens_details")]
    prompt_tokens_details: Option<Cached>,
    #[serde(alias = "output_tokens_details")]
    completion_tokens_details: Option<Reasoned>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Cached {
    cached_tokens: i64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Reasoned {
    reasoning_tokens: i64,
}

/// A request's line of the output (2xx) or error file.
fn outcome(
    request_id: &str,
    line: &Line,
    status: http::StatusCode,
    body: &[u8],
    index: usize,
) -> LineResult {
    let json = serde_json::from_slice::<&serde_json::value::RawValue>(body).ok();
    let body_json = match json {
        Some(raw) => raw.get().to_string(),
        // Never expected of the gateway's own answers; kept as text rather than lost.
        None => serde_json::to_string(&String::from_utf8_lossy(body)).unwrap_or_default(),
    };
    let usage = serde_json::from_slice::<Counted>(body)
        .ok()
        .and_then(|c| c.usage)
        .unwrap_or_default();
    let output = format!(
        r#"{{"id":{},"custom_id":{},"response":{{"status_code":{},"request_id":{},"body":{}}},"error":null}}"#,
        quoted(&super::store::new_id("batch_req_")),
        quoted(&line.custom_id),
        status.as_u16(),
        quoted(request_id),
        body_json
    );
    LineResult {
        line: index,
        ok: status.is_success(),
        output,
        input_tokens: usage.prompt_tokens,
        cached_tokens: usage.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
        output_tokens: usage.completion_tokens,
        reasoning_tokens: usage
            .completion_tokens_details
            .map_or(0, |d| d.reasoning_tokens),
    }
}

/// The error-file line of a request the completion window ended before it ran.
fn expired(index: usize, line: &Line) -> LineResult {
    LineResult {
        line: index,
        ok: false,
        output: format!(
            r#"{{"id":{},"custom_id":{},"response":null,"error":{{"code":"batch_expired","message":"This request could not be executed before the completion window expired."}}}}"#,
            quoted(&super::store::new_id("batch_req_")),
            quoted(&line.custom_id),
        ),
        ..LineResult::default()
    }
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> Line {
        Line {
            custom_id: "req \"1\"".into(),
            body: bytes::Bytes::from_static(b"{}"),
            model: "m".into(),
        }
    }

    #[test]
    fn an_answer_becomes_its_output_line_with_its_usage() {
        let body = br#"{"id":"x","usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10,"prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":2}}}"#;
        let r = outcome("batch_1-1", &line(), http::StatusCode::OK, body, 0);
        assert!(r.ok);
        assert_eq!(
            (
                r.input_tokens,
                r.cached_tokens,
                r.output_tokens,
                r.reasoning_tokens
            ),
            (7, 4, 3, 2)
        );
        let v: serde_json::Value = serde_json::from_str(&r.output).expect("json");
        assert_eq!(v["custom_id"], "req \"1\"");
        assert_eq!(v["response"]["status_code"], 200);
        assert_eq!(v["response"]["request_id"], "batch_1-1");
        assert_eq!(v["response"]["body"]["usage"]["prompt_tokens"], 7);
        assert!(v["error"].is_null());
        assert!(v["id"].as_str().expect("id").starts_with("batch_req_"));
    }

    #[test]
    fn a_responses_answer_counts_its_usage_too() {
        let body = br#"{"object":"response","usage":{"input_tokens":5,"output_tokens":2,"total_tokens":7,"input_tokens_details":{"cached_tokens":1},"output_tokens_details":{"reasoning_tokens":1}}}"#;
        let r = outcome("b", &line(), http::StatusCode::OK, body, 0);
        assert_eq!(
            (
                r.input_tokens,
                r.cached_tokens,
                r.output_tokens,
                r.reasoning_tokens
            ),
            (5, 1, 2, 1)
        );
    }

    #[test]
    fn a_refusal_is_an_error_line_and_text_is_kept_as_text() {
        let e = ApiError::bad("no", None);
        let r = outcome("b", &line(), e.status(), e.to_json().as_bytes(), 3);
        assert!(!r.ok);
        assert_eq!(r.line, 3);
        let v: serde_json::Value = serde_json::from_str(&r.output).expect("json");
        assert_eq!(v["response"]["status_code"], 400);
        assert_eq!(v["response"]["body"]["error"]["message"], "no");
        let r = outcome("b", &line(), http::StatusCode::BAD_GATEWAY, b"oops", 0);
        let v: serde_json::Value = serde_json::from_str(&r.output).expect("json");
        assert_eq!(v["response"]["body"], "oops");
        let r = expired(2, &line());
        let v: serde_json::Value = serde_json::from_str(&r.output).expect("json");
        assert_eq!(v["error"]["code"], "batch_expired");
        assert!(v["response"].is_null());
    }
}
