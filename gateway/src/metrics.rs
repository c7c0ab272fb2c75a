//! Prometheus metrics: per tenant and model (requests by status, tokens, time to first
//! token, end-to-end latency, in flight) and per worker (health, in flight, queue, breaker).
//!
//! Per-(tenant, model) handles are created once and cached, so the request path touches
//! only atomics. Worker gauges are read from the router at scrape time.

use crate::route::Router;
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
    output_tokens: Family<TenantModel, Counter>,
    ttft: HistFamily,
    e2e: HistFamily,
    in_flight: Family<TenantModel, Gauge>,
    auth_failures: Counter,
    handles: DashMap<(Arc<str>, Arc<str>), Arc<Handles>>,
}

/// Cached metric handles of one (tenant, model).
pub struct Handles {
    labels: TenantModel,
    ok: Counter,
    input_tokens: Counter,
    output_tokens: Counter,
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
        let output_tokens = Family::<TenantModel, Counter>::default();
        let ttft = HistFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        let e2e = HistFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        let in_flight = Family::<TenantModel, Gauge>::default();
        let auth_failures = Counter::default();
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
            "output_tokens",
            "Generated tokens of finished requests",
            output_tokens.clone(),
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
            output_tokens,
            ttft,
            e2e,
            in_flight,
            auth_failures,
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
            output_tokens: self.output_tokens.get_or_create(&labels).clone(),
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

    pub fn auth_failure(&self) {
        self.auth_failures.inc();
    }

    /// The Prometheus text exposition, worker gauges included.
    pub fn render(&self, router: &Router) -> String {
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
        out.push_str("# EOF\n");
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One request's metering: in-flight while alive; exactly one status recorded.
pub struct Meter {
    metrics: Arc<Metrics>,
    h: Arc<Handles>,
    started: Instant,
    first_token: bool,
    finished: bool,
}

impl Meter {
    pub fn start(metrics: Arc<Metrics>, h: Arc<Handles>, started: Instant) -> Self {
        h.in_flight.inc();
        Self {
            metrics,
            h,
            started,
            first_token: false,
            finished: false,
        }
    }

    pub fn first_token(&mut self) {
        if !self.first_token {
            self.first_token = true;
            self.h.ttft.observe(self.started.elapsed().as_secs_f64());
        }
    }

    /// A request that completed: status 200 and its token counts.
    pub fn success(&mut self, input: u32, output: u32) {
        self.h.ok.inc();
        self.h.input_tokens.inc_by(input as u64);
        self.h.output_tokens.inc_by(output as u64);
        self.end();
        tracing::info!(
            status = 200,
            input_tokens = input,
            output_tokens = output,
            ms = self.started.elapsed().as_secs_f64() * 1e3,
            "request done"
        );
    }

    /// A request that ended otherwise (`"429"`, `"502"`, `"stream_error"`, ...).
    pub fn failure(&mut self, status: &str) {
        self.metrics
            .count(&self.h.labels.tenant, &self.h.labels.model, status);
        self.end();
        tracing::info!(
            status,
            ms = self.started.elapsed().as_secs_f64() * 1e3,
            "request ended"
        );
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
