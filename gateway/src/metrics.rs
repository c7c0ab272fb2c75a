//! Prometheus metrics: per tenant and model (requests by status, tokens, weighted tokens,
//! time to first token, end-to-end latency, in flight), per worker (health, in flight,
//! queue, breaker, KV blocks), config reloads, the limiter's backend and the usage ledger.
//!
//! Per-(tenant, model) handles are created once and cached, so the request path touches
//! only atomics. Worker, limiter and ledger gauges are read at scrape time.
//!
//! [`Meter`] is one request's accounting: metrics, its contract reservation (settled with
//! what the request really used) and its usage record in the ledger.

use crate::limits::Reservation;
use crate::meter::{unix_ms, Ledger, UsageRecord};
use crate::route::Router;
use crate::state::Shared;
use crate::worker::EngineCounters;
use crate::worker::Usage;
use dashmap::DashMap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantModel {
    tenant: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ThreadLabel {
    thread: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WithStatus {
    tenant: String,
    model: String,
    status: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

type HistFamily = Family<TenantModel, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    requests: Family<WithStatus, Counter>,
    input_tokens: Family<TenantModel, Counter>,
    cached_input_tokens: Family<TenantModel, Counter>,
    output_tokens: Family<TenantModel, Counter>,
    reasoning_tokens: Family<TenantModel, Counter>,
    ttft: HistFamily,
    e2e: HistFamily,
    in_flight: Family<TenantModel, Gauge>,
    auth_failures: Counter,
    weighted_tokens: Family<TenantModel, Counter<f64, std::sync::atomic::AtomicU64>>,
    reloads: Family<ResultLabel, Counter>,
    connections: Family<ThreadLabel, Gauge>,
    handles: DashMap<(Arc<str>, Arc<str>), Arc<Handles>>,
}

/// Cached metric handles of one (tenant, model).
pub struct Handles {
    labels: TenantModel,
    ok: Counter,
    input_tokens: Counter,
    cached_input_tokens: Counter,
    output_tokens: Counter,
    reasoning_tokens: Counter,
    weighted_tokens: Counter<f64, std::sync::atomic::AtomicU64>,
    ttft: Histogram,
    e2e: Histogram,
    in_flight: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let requests = Family::<WithStatus, Counter>::default();
        let input_tokens = Family::<TenantModel, Counter>::default();
        let cached_input_tokens = Family::<TenantModel, Counter>::default();
        let output_tokens = Family::<TenantModel, Counter>::default();
        let reasoning_tokens = Family::<TenantModel, Counter>::default();
        let ttft = HistFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        let e2e = HistFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        let in_flight = Family::<TenantModel, Gauge>::default();
        let auth_failures = Counter::default();
        let weighted_tokens =
            Family::<TenantModel, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        let reloads = Family::<ResultLabel, Counter>::default();
        let connections = Family::<ThreadLabel, Gauge>::default();
        registry.register(
            "open_connections",
            "Tenant connections open, by serving thread (server.runtime = \"per_core\")",
            connections.clone(),
        );
        registry.register(
            "weighted_tokens",
            "Weighted tokens charged to tenants' contracts (input + output_weight x output, cached input at cached_input_weight)",
            weighted_tokens.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result (ok, error)",
            reloads.clone(),
        );
        registry.register(
            "requests",
            "Finished requests by tenant, model and status",
            requests.clone(),
        );
        registry.register(
            "input_tokens",
            "Prompt tokens of finished requests",
            input_tokens.clone(),
        );
        registry.register(
            "cached_input_tokens",
            "Prompt tokens of finished requests that the worker served from its prefix cache",
            cached_input_tokens.clone(),
        );
        registry.register(
            "output_tokens",
            "Generated tokens of finished requests",
            output_tokens.clone(),
        );
        registry.register(
            "reasoning_tokens",
            "Of the output tokens, a reasoning model's thinking",
            reasoning_tokens.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            ttft.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from arrival to the last byte",
            e2e.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Requests being served",
            in_flight.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests refused for a missing or unknown API key",
            auth_failures.clone(),
        );
        Self {
            registry,
            requests,
            input_tokens,
            cached_input_tokens,
            output_tokens,
            reasoning_tokens,
            ttft,
            e2e,
            in_flight,
            auth_failures,
            weighted_tokens,
            reloads,
            connections,
            handles: DashMap::new(),
        }
    }

    /// The handles of one (tenant, model), created on first use.
    pub fn handles(&self, tenant: &Arc<str>, model: &Arc<str>) -> Arc<Handles> {
        if let Some(h) = self.handles.get(&(tenant.clone(), model.clone())) {
            return h.clone();
        }
        let labels = TenantModel {
            tenant: tenant.to_string(),
            model: model.to_string(),
        };
        let h = Arc::new(Handles {
            ok: self
                .requests
                .get_or_create(&WithStatus {
                    tenant: labels.tenant.clone(),
                    model: labels.model.clone(),
                    status: "200".into(),
                })
                .clone(),
            input_tokens: self.input_tokens.get_or_create(&labels).clone(),
            cached_input_tokens: self.cached_input_tokens.get_or_create(&labels).clone(),
            output_tokens: self.output_tokens.get_or_create(&labels).clone(),
            reasoning_tokens: self.reasoning_tokens.get_or_create(&labels).clone(),
            weighted_tokens: self.weighted_tokens.get_or_create(&labels).clone(),
            ttft: self.ttft.get_or_create(&labels).clone(),
            e2e: self.e2e.get_or_create(&labels).clone(),
            in_flight: self.in_flight.get_or_create(&labels).clone(),
            labels,
        });
        self.handles
            .entry((tenant.clone(), model.clone()))
            .or_insert(h)
            .clone()
    }

    /// Counts a finished request with a status other than 200 (errors, cancellations).
    pub fn count(&self, tenant: &str, model: &str, status: &str) {
        self.requests
            .get_or_create(&WithStatus {
                tenant: tenant.into(),
                model: model.into(),
                status: status.into(),
            })
            .inc();
    }

    /// The gauge of a serving thread's open tenant connections.
    pub fn open_connections(&self, thread: &str) -> Gauge {
        self.connections
            .get_or_create(&ThreadLabel {
                thread: thread.into(),
            })
            .clone()
    }

    pub fn auth_failure(&self) {
        self.auth_failures.inc();
    }

    /// Counts a config reload attempt (`"ok"` or `"error"`).
    pub fn reload(&self, result: &str) {
        self.reloads
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// The Prometheus text exposition, worker gauges included.
    pub fn render(&self, state: &Shared) -> String {
        let router: &Router = &state.router;
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        if out.ends_with("# EOF\n") {
            out.truncate(out.len() - "# EOF\n".len());
        }
        let gauges: [(&str, &str); 7] = [
            (
                "tollgate_worker_healthy",
                "1 when the worker passes its health probes",
            ),
            (
                "tollgate_worker_breaker_open",
                "1 while the worker's circuit breaker ejects it",
            ),
            (
                "tollgate_worker_in_flight",
                "Requests the router has on the worker",
            ),
            (
                "tollgate_worker_running",
                "Requests the worker reports as running",
            ),
            (
                "tollgate_worker_queued",
                "Requests the worker reports as queued inside it",
            ),
            (
                "tollgate_worker_kv_blocks_used",
                "KV-cache blocks in use (engines)",
            ),
            (
                "tollgate_worker_kv_blocks_free",
                "KV-cache blocks free (engines)",
            ),
        ];
        let now = Instant::now();
        for (i, (name, help)) in gauges.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} gauge");
            for pool in &router.pools {
                for slot in &pool.slots {
                    let load = slot.worker.load();
                    let v = match (i, load.kv_blocks) {
                        (0, _) => slot.healthy() as u64,
                        (1, _) => slot.breaker.is_open(now) as u64,
                        (2, _) => slot.in_flight(),
                        (3, _) => load.running,
                        (4, _) => load.queued,
                        (5, Some((used, _))) => used,
                        (6, Some((used, total))) => total - used,
                        _ => continue,
                    };
                    let _ = writeln!(
                        out,
                        "{name}{{pool=\"{}\",worker=\"{}\"}} {v}",
                        escape(&pool.name),
                        escape(slot.worker.name())
                    );
                }
            }
        }
        render_engines(router, &mut out);
        if let Some(r) = state.limiter.redis() {
            let _ = writeln!(
                out,
                "# HELP tollgate_limits_backend_up 1 while the global limiter (Redis) answers.\n# TYPE tollgate_limits_backend_up gauge\ntollgate_limits_backend_up {}",
                r.is_up() as u8
            );
            let _ = writeln!(
                out,
                "# HELP tollgate_limits_backend_errors Failed or timed-out calls to the global limiter.\n# TYPE tollgate_limits_backend_errors counter\ntollgate_limits_backend_errors_total {}",
                r.errors()
            );
        }
        if let Some(l) = &state.ledger {
            let (journaled, written, failed) = l.counts();
            let _ = writeln!(
                out,
                "# HELP tollgate_usage_records Usage records by outcome (journaled: appended to the journal; written: copied into the database; failed: lost, or damaged in the journal).\n# TYPE tollgate_usage_records counter"
            );
            for (k, v) in [
                ("journaled", journaled),
                ("written", written),
                ("failed", failed),
            ] {
                let _ = writeln!(out, "tollgate_usage_records_total{{outcome=\"{k}\"}} {v}");
            }
        }
        if let Some(b) = &state.batches {
            let _ = writeln!(
                out,
                "# HELP tollgate_batches_running Batches (`/v1/batches`) this gateway runs now.\n# TYPE tollgate_batches_running gauge\ntollgate_batches_running {}\n# HELP tollgate_batch_requests Requests of batches run to a result, by result (ok: answered 2xx; failed: any other answer).\n# TYPE tollgate_batch_requests counter\ntollgate_batch_requests_total{{result=\"ok\"}} {}\ntollgate_batch_requests_total{{result=\"failed\"}} {}",
                b.running(),
                b.answered.load(std::sync::atomic::Ordering::Relaxed),
                b.refused.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        if let Some(store) = &state.responses {
            let w = &store.writes;
            let _ = writeln!(
                out,
                "# HELP tollgate_stored_answers Answers the response store's writer committed (ok) or lost (failed).\n# TYPE tollgate_stored_answers counter\ntollgate_stored_answers_total{{result=\"ok\"}} {}\ntollgate_stored_answers_total{{result=\"failed\"}} {}",
                w.ok.load(std::sync::atomic::Ordering::Relaxed),
                w.failed.load(std::sync::atomic::Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "# HELP tollgate_response_store_commits Transactions the response store's writer committed (each holds every answer that waited).\n# TYPE tollgate_response_store_commits counter\ntollgate_response_store_commits_total {}",
                w.commits.load(std::sync::atomic::Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "# HELP tollgate_background_responses_running Background responses running now.\n# TYPE tollgate_background_responses_running gauge\ntollgate_background_responses_running {}",
                store.running_now()
            );
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_config_generation Applied config generation (1 at start).\n# TYPE tollgate_config_generation gauge\ntollgate_config_generation {}",
            state.live().generation
        );
        out.push_str("# EOF\n");
        out
    }
}

/// The in-process engines' counters, one series per engine worker.
fn render_engines(router: &Router, out: &mut String) {
    let engines: Vec<_> = router
        .pools
        .iter()
        .flat_map(|p| p.slots.iter().map(move |s| (p, s)))
        .filter_map(|(p, s)| s.worker.engine_counters().map(|c| (p, s, c)))
        .collect();
    if engines.is_empty() {
        return;
    }
    type Pick = fn(&EngineCounters) -> f64;
    fn counter<'a>(name: &'a str, help: &'a str, pick: Pick) -> (&'a str, &'a str, &'a str, Pick) {
        (name, help, "counter", pick)
    }
    let series: [(&str, &str, &str, Pick); 16] = [
        counter("tollgate_engine_steps", "Forward steps the engine ran", |c| {
            c.steps as f64
        }),
        counter(
            "tollgate_engine_preemptions",
            "Sequences preempted for want of KV blocks (recomputed later)",
            |c| c.preemptions as f64,
        ),
        counter(
            "tollgate_engine_rows_held",
            "Lowest-weight sequences (batches, spot, best effort) held out of a step beside interactive ones (lowest_weight_rows), summed over steps",
            |c| c.rows_held as f64,
        ),
        counter(
            "tollgate_engine_rows_adjusted_on_device",
            "GPU path: rows adjusted on the device before their draw (penalties, logit bias, a grammar's mask)",
            |c| c.rows_adjusted_on_device as f64,
        ),
        counter(
            "tollgate_engine_logits_rows_read_back",
            "GPU path: rows whose logits were read back to the host (their adjustments past a step's room: drawn again there)",
            |c| c.rows_read_back as f64,
        ),
        counter(
            "tollgate_engine_rows_scored_on_device",
            "GPU path: rows whose log-probabilities were computed on the device (a few words read back instead of a row of logits)",
            |c| c.rows_scored_on_device as f64,
        ),
        counter(
            "tollgate_engine_draft_tokens",
            "Speculative decoding: tokens proposed (by prompt lookup, speculative_tokens, or from a request's prediction, prediction_tokens) and computed after a sequence's last one",
            |c| c.draft_tokens as f64,
        ),
        counter(
            "tollgate_engine_draft_tokens_accepted",
            "Speculative decoding: proposed tokens the sequence's own draw kept (each one a step saved)",
            |c| c.draft_tokens_accepted as f64,
        ),
        counter(
            "tollgate_engine_device_faults",
            "Steps the device failed (each followed by a rebuild of the backend)",
            |c| c.device_faults as f64,
        ),
        counter(
            "tollgate_engine_prompt_tokens",
            "Prompt tokens of the requests the engine finished",
            |c| c.prompt_tokens as f64,
        ),
        counter(
            "tollgate_engine_cached_prompt_tokens",
            "Of those, the tokens served from the prefix cache (not computed again)",
            |c| c.cached_tokens as f64,
        ),
        counter(
            "tollgate_engine_backend_seconds",
            "Seconds the engine thread spent in the backend's steps",
            |c| c.backend_seconds,
        ),
        counter(
            "tollgate_engine_host_seconds",
            "Seconds the engine thread spent around the steps (scheduling, batching, sampling on the CPU, detokenizing)",
            |c| c.host_seconds,
        ),
        (
            "tollgate_engine_kv_blocks_cached",
            "KV blocks in the engine's prefix cache (in use or idle; idle ones count as free)",
            "gauge",
            |c| c.kv_blocks_cached as f64,
        ),
        (
            "tollgate_engine_kv_window_blocks_used",
            "KV blocks of the windowed layers' own pool held by sequences (0 where the model's windowed layers have no pool of their own)",
            "gauge",
            |c| c.kv_window_blocks_used as f64,
        ),
        (
            "tollgate_engine_kv_window_blocks_total",
            "KV blocks of the windowed layers' own pool (the blocks before each sequence's window go back to it)",
            "gauge",
            |c| c.kv_window_blocks_total as f64,
        ),
    ];
    for (name, help, kind, pick) in series {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} {kind}");
        // OpenMetrics: a counter's sample is named `<name>_total`.
        let suffix = if kind == "counter" { "_total" } else { "" };
        for (pool, slot, c) in &engines {
            let _ = writeln!(
                out,
                "{name}{suffix}{{pool=\"{}\",worker=\"{}\"}} {}",
                escape(&pool.name),
                escape(slot.worker.name()),
                pick(c)
            );
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What a [`Meter`] records besides metrics.
pub struct MeterCtx {
    pub ledger: Option<Ledger>,
    /// `metering.wait_for_commit`.
    pub durable: bool,
    pub request_id: Arc<str>,
    pub output_weight: f64,
    /// Weight of a prompt token served from the worker's prefix cache (1 = a full input
    /// token).
    pub cached_input_weight: f64,
}

/// One request's accounting: in flight while alive; exactly one status recorded; its
/// reservation settled and its usage record written when it ends.
pub struct Meter {
    metrics: Arc<Metrics>,
    h: Arc<Handles>,
    ctx: MeterCtx,
    started: Instant,
    ttft_ms: Option<f64>,
    finished: bool,
    reservation: Option<Reservation>,
    /// Prompt tokens as counted (or estimated) at admission.
    input_tokens: u32,
    /// Tokens generated so far.
    generated: u32,
    pub worker: String,
    pub best_effort: bool,
}

impl Meter {
    pub fn start(metrics: Arc<Metrics>, h: Arc<Handles>, started: Instant, ctx: MeterCtx) -> Self {
        h.in_flight.inc();
        Self {
            metrics,
            h,
            ctx,
            started,
            ttft_ms: None,
            finished: false,
            reservation: None,
            input_tokens: 0,
            generated: 0,
            worker: String::new(),
            best_effort: false,
        }
    }

    /// The request was admitted: it holds `r` until it ends.
    pub fn admitted(&mut self, r: Reservation, input_tokens: u32) {
        self.reservation = Some(r);
        self.input_tokens = input_tokens;
    }

    /// `tokens` more tokens were generated.
    pub fn tokens(&mut self, tokens: u32) {
        if self.ttft_ms.is_none() {
            let t = self.started.elapsed().as_secs_f64();
            self.ttft_ms = Some(t * 1e3);
            self.h.ttft.observe(t);
        }
        self.generated = self.generated.saturating_add(tokens);
    }

    /// `input − cached + cached_input_weight × cached + output_weight × output`.
    fn weighted(&self, input: u32, cached: u32, output: u32) -> f64 {
        let cached = cached.min(input) as f64;
        input as f64 - cached
            + self.ctx.cached_input_weight * cached
            + self.ctx.output_weight * output as f64
    }

    fn record(&self, status: &str, u: Usage, weighted: f64) -> UsageRecord {
        UsageRecord {
            ts_ms: unix_ms(),
            request_id: self.ctx.request_id.to_string(),
            tenant: self.h.labels.tenant.clone(),
            model: self.h.labels.model.clone(),
            worker: self.worker.clone(),
            input_tokens: u.prompt_tokens,
            cached_tokens: u.cached_tokens,
            output_tokens: u.completion_tokens,
            weighted_tokens: weighted,
            status: status.to_string(),
            ttft_ms: self.ttft_ms,
            duration_ms: self.started.elapsed().as_secs_f64() * 1e3,
            best_effort: self.best_effort,
        }
    }

    /// A request that completed with the worker's true counts. Settles the reservation and
    /// records its usage; returns once the record is durable (see `meter`).
    pub async fn success(&mut self, usage: Usage) {
        let (input, cached, output) = (
            usage.prompt_tokens,
            usage.cached_tokens.min(usage.prompt_tokens),
            usage.completion_tokens,
        );
        let weighted = self.weighted(input, cached, output);
        if let Some(r) = &mut self.reservation {
            r.settle(Some(weighted));
        }
        self.h.ok.inc();
        self.h.input_tokens.inc_by(input as u64);
        self.h.cached_input_tokens.inc_by(cached as u64);
        self.h.output_tokens.inc_by(output as u64);
        let reasoning = usage.reasoning_tokens.min(output);
        self.h.reasoning_tokens.inc_by(reasoning as u64);
        self.h.weighted_tokens.inc_by(weighted);
        self.end();
        tracing::info!(
            status = 200,
            input_tokens = input,
            cached_input_tokens = cached,
            output_tokens = output,
            reasoning_tokens = reasoning,
            weighted_tokens = weighted,
            ms = self.started.elapsed().as_secs_f64() * 1e3,
            "request done"
        );
        let usage = Usage {
            cached_tokens: cached,
            ..usage
        };
        if let Some(l) = &self.ctx.ledger {
            let r = self.record("200", usage, weighted);
            if !self.ctx.durable {
                l.record(r);
            } else if !l.record_durable(r).await {
                tracing::error!("usage record could not be made durable");
            }
        }
    }

    /// A request that ended otherwise (`"429"`, `"502"`, `"stream_error"`, `"cancelled"`):
    /// charged only what it generated (its prompt and output, once a token came out).
    pub fn failure(&mut self, status: &str) {
        if self.finished {
            return;
        }
        let (input, output) = if self.generated > 0 {
            (self.input_tokens, self.generated)
        } else {
            (0, 0)
        };
        // What the worker served from its cache is not known before its last event.
        let weighted = self.weighted(input, 0, output);
        if let Some(r) = &mut self.reservation {
            r.settle((self.generated > 0).then_some(weighted));
        }
        self.h.weighted_tokens.inc_by(weighted);
        self.metrics
            .count(&self.h.labels.tenant, &self.h.labels.model, status);
        self.end();
        tracing::info!(
            status,
            ms = self.started.elapsed().as_secs_f64() * 1e3,
            "request ended"
        );
        if let Some(l) = &self.ctx.ledger {
            let usage = Usage {
                prompt_tokens: input,
                completion_tokens: output,
                ..Usage::default()
            };
            l.record(self.record(status, usage, weighted));
        }
    }

    fn end(&mut self) {
        if !self.finished {
            self.finished = true;
            self.h.e2e.observe(self.started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.h.in_flight.dec();
        if !self.finished {
            // Dropped mid-way: the client went away.
            self.failure("cancelled");
        }
    }
}
