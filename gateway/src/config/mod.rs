//! Operator configuration: the TOML file's shape, its defaults, and whole-file validation.
//!
//! Every field is documented in `config/README.md` at the repository root. A config is
//! parsed and validated as a whole ([`Config::from_toml`]); nothing half-valid is ever
//! returned. The embedded default ([`DEFAULT_CONFIG`]) serves one demo tenant on loopback.

pub mod keys;
mod serving;

pub use serving::*;

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;

/// The embedded default config (`config/gateway.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/gateway.toml");

/// Errors in reading or validating a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("invalid config: {0}")]
    Invalid(String),
}

fn positive(x: f64) -> bool {
    x > 0.0 && x.is_finite()
}

fn non_negative(x: f64) -> bool {
    x >= 0.0 && x.is_finite()
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(msg.into()))
}

/// The whole operator config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub metering: MeteringConfig,
    #[serde(default)]
    pub responses: ResponsesConfig,
    #[serde(default)]
    pub batches: BatchesConfig,
}

/// `[batches]`: the Batch API (`/v1/files`, `/v1/batches`): a tenant's file of requests
/// run apart from any connection, at the lowest scheduling weight, under its contract.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchesConfig {
    /// Serve the Files and Batches APIs. Off by default: a gateway then keeps no files.
    pub enabled: bool,
    /// Database file (files, batches, their results so far); relative to the config
    /// file's folder.
    pub path: String,
    /// Largest file a tenant may upload, in MiB.
    pub max_file_mib: f64,
    /// Most requests in one batch's input file.
    pub max_requests: usize,
    /// Requests of one batch in flight at once (each still admitted under the tenant's
    /// contract and concurrency cap).
    pub concurrency: usize,
    /// How long a file (uploaded, or a batch's output) and a finished batch are kept.
    pub retention_hours: f64,
    /// What one tenant's files may take in all, in MiB.
    pub max_stored_mib_per_tenant: f64,
}

impl Default for BatchesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            path: "tollgate-batches.db".into(),
            max_file_mib: 100.0,
            max_requests: 50_000,
            concurrency: 8,
            retention_hours: 720.0,
            max_stored_mib_per_tenant: 2048.0,
        }
    }
}

/// `[responses]`: stored answers of the Responses API (`previous_response_id`,
/// `GET`/`DELETE /v1/responses/{id}`), in SQLite.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResponsesConfig {
    /// Keep each answer whose request does not say `store: false` (the API's default is
    /// to store). Off by default: a gateway then keeps no tenant's words.
    pub store: bool,
    /// Database file; a relative path is relative to the config file's folder.
    pub path: String,
    /// How long a stored answer is kept (OpenAI keeps them 30 days).
    pub retention_hours: f64,
    /// What one tenant may keep (answers, conversations, their items; MiB of JSON) unless
    /// its own `max_stored_mib` says otherwise: past it, requests that would store more
    /// are refused (403 `storage_quota_exceeded`) until some is deleted or expires.
    pub max_stored_mib_per_tenant: f64,
}

impl Default for ResponsesConfig {
    fn default() -> Self {
        Self {
            store: false,
            path: "tollgate-responses.db".into(),
            retention_hours: 720.0,
            max_stored_mib_per_tenant: 1024.0,
        }
    }
}

/// `[limits]`: where tenants' rate buckets live.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// `local`: buckets in this process. `redis`: one global bucket per tenant in Redis,
    /// shared by every gateway replica that points at the same Redis.
    pub backend: LimitsBackend,
    /// `redis://host:port[/db]` (with `backend = "redis"`).
    pub redis_url: Option<String>,
    /// Longest wait for one Redis answer before it counts as unreachable.
    pub redis_timeout_ms: u64,
    /// While Redis is unreachable: `open` admits under this replica's local buckets (each
    /// replica enforces the whole contract on its own), `closed` answers 503.
    pub on_redis_error: FailMode,
    /// Prefix of the Redis keys.
    pub redis_prefix: String,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            backend: LimitsBackend::Local,
            redis_url: None,
            redis_timeout_ms: 100,
            on_redis_error: FailMode::Open,
            redis_prefix: "tollgate".into(),
        }
    }
}

/// `server.runtime`: how the threads serving tenant HTTP share connections.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// One single-threaded runtime per thread. An acceptor hands each new connection to
    /// the thread with the fewest open ones, and everything a request does in the gateway
    /// (parsing, admission, the upstream call, the response) runs on that thread: no
    /// wakeups from one of the gateway's threads to another on the request path.
    #[default]
    PerCore,
    /// One work-stealing runtime: tasks move between threads to balance them.
    Shared,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LimitsBackend {
    #[default]
    Local,
    Redis,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    #[default]
    Open,
    Closed,
}

/// `[metering]`: the usage ledger (SQLite).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MeteringConfig {
    pub enabled: bool,
    /// Database file; a relative path is relative to the config file's folder.
    pub path: String,
    /// `normal`: a record survives a crash of the process (it is in the OS's page cache
    /// once written), the last ones may be lost on power loss; `full`: the usage journal
    /// and the database are fsynced (one `fdatasync` shared by the records written
    /// meanwhile), records survive power loss.
    pub synchronous: Synchronous,
    /// Hold a completed request's last bytes until its usage record is durable (the
    /// default: every answer a client received in full is on record). Under `normal` a
    /// record is durable once written, which the request does itself, so this matters only
    /// under `full`: `false` does not wait for the fsync.
    pub wait_for_commit: bool,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "tollgate-usage.db".into(),
            synchronous: Synchronous::Normal,
            wait_for_commit: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Normal,
    Full,
}

/// `[server]`: listeners and request-level limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Tenant API listener.
    pub listen: SocketAddr,
    /// Admin API listener (contracts, live usage, reload, audit); none = no admin API.
    pub admin_listen: Option<SocketAddr>,
    /// Hex SHA-256 of the admin token (required with `admin_listen`).
    pub admin_token_sha256: Option<String>,
    /// Requests that may wait in the gateway for a worker slot when every worker of a pool
    /// is at its cap; past it → 503.
    pub queue_depth: usize,
    /// Longest wait for a worker slot; past it → 503.
    pub queue_timeout_secs: f64,
    /// A pool has idle capacity (for `overflow = "best_effort"` and `tier = "spot"`) while
    /// its in-flight requests are below this fraction of its workers' caps and nothing waits.
    pub idle_below: f64,
    /// Largest accepted request body, in bytes (larger → 413).
    pub max_body_bytes: usize,
    /// On SIGTERM/SIGINT: how long in-flight requests may finish before the process exits.
    pub drain_timeout_secs: f64,
    /// Upper bound on one request's whole life (admission to last byte).
    pub request_timeout_secs: f64,
    /// How many other workers a request may be retried on before its first byte.
    pub max_retries: u32,
    /// `max_tokens` used when a request gives none.
    pub default_max_tokens: u32,
    /// Threads serving tenant HTTP: 0 = one per CPU.
    pub threads: usize,
    /// How those threads share the work: `per_core` (each its own single-threaded
    /// runtime; a connection stays on one thread) or `shared` (one work-stealing runtime).
    pub runtime: RuntimeKind,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("static address"),
            admin_listen: None,
            admin_token_sha256: None,
            queue_depth: 128,
            queue_timeout_secs: 1.0,
            idle_below: 0.5,
            max_body_bytes: 1 << 20,
            drain_timeout_secs: 30.0,
            request_timeout_secs: 600.0,
            max_retries: 2,
            default_max_tokens: 256,
            threads: 0,
            runtime: RuntimeKind::default(),
            max_tokens_limit: 32768,
        }
    }
}

/// `[[tenants]]`: who may call, with which keys, under which contract.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: String,
    /// Hex SHA-256 digests of the tenant's API keys (`gateway keys new` prints one).
    pub keys_sha256: Vec<String>,
    /// Purchased rate of weighted tokens per second (enforced by the capacity limiter).
    #[serde(default)]
    pub tokens_per_second: Option<f64>,
    /// Bucket depth in seconds of the rate.
    #[serde(default)]
    pub burst_seconds: Option<f64>,
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Cap on the tenant's in-flight requests (over it → 429).
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    #[serde(default)]
    pub tier: Tier,
    #[serde(default)]
    pub overflow: Overflow,
    /// Dedicated pool; without it the tenant uses the first pool listed for the model.
    #[serde(default)]
    pub pool: Option<String>,
    /// A gateway in front of this one (remote worker mode): its requests may name the
    /// tenant they are made for in `x-tollgate-tenant` (and its weight in
    /// `x-tollgate-weight`); metrics and scheduling then see that tenant.
    #[serde(default)]
    pub trusted: bool,
    /// What this tenant may keep in the response store, in MiB (default:
    /// `[responses] max_stored_mib_per_tenant`; 0: nothing).
    #[serde(default)]
    pub max_stored_mib: Option<f64>,
    /// What this tenant's files (batch inputs, outputs and other uploads) may take, in MiB
    /// (default: `[batches] max_stored_mib_per_tenant`; 0: no uploads).
    #[serde(default)]
    pub max_files_mib: Option<f64>,
    /// Per-model overrides: a model listed here gets its own contract (fields not given are
    /// the tenant's) and its own buckets, apart from the tenant's other traffic.
    #[serde(default)]
    pub models: BTreeMap<String, ContractOverride>,
}

/// `[tenants.models."MODEL"]`: a tenant's contract for one model.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ContractOverride {
    pub tokens_per_second: Option<f64>,
    pub burst_seconds: Option<f64>,
    pub requests_per_minute: Option<u32>,
    pub max_concurrency: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    #[default]
    Reserved,
    Spot,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    #[default]
    Reject,
    BestEffort,
}

impl Config {
    /// Parses and validates a whole config.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// The embedded default config.
    pub fn embedded_default() -> Result<Self, ConfigError> {
        Self::from_toml(DEFAULT_CONFIG)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.max_body_bytes < 1024 {
            return invalid("server.max_body_bytes must be at least 1024");
        }
        if !(s.drain_timeout_secs >= 0.0 && s.drain_timeout_secs.is_finite()) {
            return invalid("server.drain_timeout_secs must be a finite number >= 0");
        }
        if !(s.request_timeout_secs > 0.0 && s.request_timeout_secs.is_finite()) {
            return invalid("server.request_timeout_secs must be > 0");
        }
        if s.default_max_tokens == 0 || s.default_max_tokens > s.max_tokens_limit {
            return invalid("server.default_max_tokens must be in 1..=server.max_tokens_limit");
        }
        if !non_negative(s.queue_timeout_secs) {
            return invalid("server.queue_timeout_secs must be a finite number >= 0");
        }
        if !(s.idle_below > 0.0 && s.idle_below <= 1.0) {
            return invalid("server.idle_below must be in (0, 1]");
        }
        match (&s.admin_listen, &s.admin_token_sha256) {
            (Some(_), None) => {
                return invalid("server.admin_listen needs server.admin_token_sha256 (`gateway keys new --tenant admin` makes one)")
            }
            (_, Some(t)) => {
                keys::parse_digest(t).map_err(|e| {
                    ConfigError::Invalid(format!("server.admin_token_sha256: {e}"))
                })?;
            }
            _ => {}
        }
        let l = &self.limits;
        if l.backend == LimitsBackend::Redis {
            match &l.redis_url {
                Some(u) if u.starts_with("redis://") => {}
                _ => {
                    return invalid(
                        "limits.backend = \"redis\" needs limits.redis_url = \"redis://host:port\"",
                    )
                }
            }
        }
        if l.redis_timeout_ms == 0 {
            return invalid("limits.redis_timeout_ms must be >= 1");
        }
        let kept = self.responses.retention_hours;
        let keeps = std::time::Duration::try_from_secs_f64(kept * 3600.0).is_ok() && kept > 0.0;
        if self.responses.store && (self.responses.path.is_empty() || !keeps) {
            return invalid(
                "responses.path must not be empty and responses.retention_hours must be a \
                 number of hours > 0 (or set responses.store = false)",
            );
        }
        let quota = self.responses.max_stored_mib_per_tenant;
        if !(quota >= 0.0 && quota.is_finite()) {
            return invalid("responses.max_stored_mib_per_tenant must be a number >= 0");
        }
        let b = &self.batches;
        let kept = std::time::Duration::try_from_secs_f64(b.retention_hours * 3600.0).is_ok()
            && b.retention_hours > 0.0;
        if b.enabled
            && (b.path.is_empty()
                || !kept
                || !positive(b.max_file_mib)
                || !positive(b.max_stored_mib_per_tenant)
                || b.max_requests == 0
                || b.concurrency == 0)
        {
            return invalid(
                "batches: path must not be empty; retention_hours, max_file_mib and \
                 max_stored_mib_per_tenant must be numbers > 0; max_requests and concurrency \
                 must be >= 1 (or set batches.enabled = false)",
            );
        }
        if self.metering.enabled && self.metering.path.is_empty() {
            return invalid("metering.path must not be empty (or set metering.enabled = false)");
        }
        let mut model_ids = HashSet::new();
        for m in &self.models {
            if m.id.is_empty() {
                return invalid("models: id must not be empty");
            }
            if !model_ids.insert(m.id.as_str()) {
                return invalid(format!("models: duplicate id {:?}", m.id));
            }
            if !(m.output_weight > 0.0 && m.output_weight.is_finite()) {
                return invalid(format!("models.{}: output_weight must be > 0", m.id));
            }
            if !(0.0..=1.0).contains(&m.cached_input_weight) {
                return invalid(format!(
                    "models.{}: cached_input_weight must be in [0, 1]",
                    m.id
                ));
            }
            let own = m.chat_template_kwargs.iter().flat_map(|a| a.keys());
            if let Some(k) = own
                .into_iter()
                .find(|k| crate::worker::TEMPLATE_OWN.contains(&k.as_str()))
            {
                return invalid(format!(
                    "models.{}: chat_template_kwargs may not set {k:?} (tollgate sets it from each request)",
                    m.id
                ));
            }
        }
        let mut pool_names = HashSet::new();
        for p in &self.pools {
            if !pool_names.insert(p.name.as_str()) {
                return invalid(format!("pools: duplicate name {:?}", p.name));
            }
            if !model_ids.contains(p.model.as_str()) {
                return invalid(format!("pools.{}: unknown model {:?}", p.name, p.model));
            }
            if p.workers.is_empty() {
                return invalid(format!("pools.{}: needs at least one worker", p.name));
            }
            if !positive(p.health_interval_secs) || !non_negative(p.breaker_cooldown_secs) {
                return invalid(format!(
                    "pools.{}: health_interval_secs must be > 0 and breaker_cooldown_secs >= 0",
                    p.name
                ));
            }
            if p.breaker_failures == 0 {
                return invalid(format!("pools.{}: breaker_failures must be >= 1", p.name));
            }
            for w in &p.workers {
                w.validate(&p.name)?;
                if matches!(w, WorkerConfig::Engine(_)) {
                    let m = self.models.iter().find(|m| m.id == p.model);
                    if m.and_then(|m| m.source.as_ref()).is_none() {
                        return invalid(format!(
                            "pools.{}: an engine worker needs models.{}.source (a known name or a .gguf path)",
                            p.name, p.model
                        ));
                    }
                }
            }
        }
        let mut tenant_ids = HashSet::new();
        let mut key_hashes = HashSet::new();
        for t in &self.tenants {
            if t.id.is_empty() {
                return invalid("tenants: id must not be empty");
            }
            if !tenant_ids.insert(t.id.as_str()) {
                return invalid(format!("tenants: duplicate id {:?}", t.id));
            }
            if t.keys_sha256.is_empty() {
                return invalid(format!("tenants.{}: keys_sha256 must list a key", t.id));
            }
            for k in &t.keys_sha256 {
                let digest = keys::parse_digest(k).map_err(|e| {
                    ConfigError::Invalid(format!("tenants.{}: keys_sha256: {e}", t.id))
                })?;
                if !key_hashes.insert(digest) {
                    return invalid(format!(
                        "tenants.{}: a key digest is listed twice (keys must be unique)",
                        t.id
                    ));
                }
            }
            if let Some(pool) = &t.pool {
                if !pool_names.contains(pool.as_str()) {
                    return invalid(format!("tenants.{}: unknown pool {pool:?}", t.id));
                }
            }
            for (name, v) in [
                ("tokens_per_second", t.tokens_per_second),
                ("burst_seconds", t.burst_seconds),
            ] {
                if let Some(v) = v {
                    if !(v > 0.0 && v.is_finite()) {
                        return invalid(format!("tenants.{}: {name} must be > 0", t.id));
                    }
                }
            }
            if t.max_concurrency == Some(0) || t.requests_per_minute == Some(0) {
                return invalid(format!(
                    "tenants.{}: max_concurrency and requests_per_minute must be >= 1",
                    t.id
                ));
            }
            for (name, v) in [
                ("max_stored_mib", t.max_stored_mib),
                ("max_files_mib", t.max_files_mib),
            ] {
                if v.is_some_and(|m| !(m >= 0.0 && m.is_finite())) {
                    return invalid(format!("tenants.{}: {name} must be >= 0", t.id));
                }
            }
            for (model, o) in &t.models {
                if !model_ids.contains(model.as_str()) {
                    return invalid(format!("tenants.{}.models: unknown model {model:?}", t.id));
                }
                for (name, v) in [
                    ("tokens_per_second", o.tokens_per_second),
                    ("burst_seconds", o.burst_seconds),
                ] {
                    if let Some(v) = v {
                        if !positive(v) {
                            return invalid(format!(
                                "tenants.{}.models.{model}: {name} must be > 0",
                                t.id
                            ));
                        }
                    }
                }
                if o.max_concurrency == Some(0) || o.requests_per_minute == Some(0) {
                    return invalid(format!(
                        "tenants.{}.models.{model}: max_concurrency and requests_per_minute must be >= 1",
                        t.id
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine_pool(fields: &str) -> String {
        format!(
            r#"
[[models]]
id = "m"
source = "m.gguf"

[[pools]]
name = "p"
model = "m"
workers = [{{ kind = "engine"{fields} }}]
"#
        )
    }

    fn engine(cfg: &Config) -> &EngineConfig {
        match &cfg.pools[0].workers[0] {
            WorkerConfig::Engine(e) => e,
            other => panic!("not an engine: {other:?}"),
        }
    }

    #[test]
    fn engine_sizes_default_by_backend_and_follow_the_config() {
        let cfg = Config::from_toml(&engine_pool("")).unwrap();
        let e = engine(&cfg);
        assert_eq!(
            e.sizes(false),
            EngineSizes {
                max_batch_tokens: 128,
                max_seqs: 64,
                kv_tokens: Some(65536),
                max_concurrency: 256,
                lowest_rows: Some(2),
            }
        );
        assert_eq!(
            e.sizes(true),
            EngineSizes {
                max_batch_tokens: 2048,
                max_seqs: 256,
                kv_tokens: None,
                max_concurrency: 1024,
                lowest_rows: None,
            }
        );
        let cfg = Config::from_toml(&engine_pool(
            ", max_seqs = 8, kv_tokens = 4096, max_batch_tokens = 128, lowest_weight_rows = 3",
        ))
        .unwrap();
        let set = EngineSizes {
            max_batch_tokens: 128,
            max_seqs: 8,
            kv_tokens: Some(4096),
            max_concurrency: 32,
            lowest_rows: Some(3),
        };
        assert_eq!(engine(&cfg).sizes(true), set);
        assert_eq!(engine(&cfg).sizes(false), set);
        // As many as the slots or more: no cap.
        let cfg =
            Config::from_toml(&engine_pool(", max_seqs = 8, lowest_weight_rows = 8")).unwrap();
        assert_eq!(engine(&cfg).sizes(false).lowest_rows, None);
    }

    #[test]
    fn speculative_tokens_are_off_by_default_and_capped() {
        let cfg = Config::from_toml(&engine_pool("")).unwrap();
        assert_eq!(engine(&cfg).speculative_tokens, 0);
        let cfg = Config::from_toml(&engine_pool(", speculative_tokens = 4")).unwrap();
        assert_eq!(engine(&cfg).speculative_tokens, 4);
        let err =
            Config::from_toml(&engine_pool(", speculative_tokens = 17")).expect_err("past the cap");
        assert!(err.to_string().contains("speculative_tokens"), "{err}");
    }

    #[test]
    fn the_windowed_layers_pool_is_sized_by_default_and_may_be_set_or_off() {
        let cfg = Config::from_toml(&engine_pool("")).unwrap();
        assert_eq!(engine(&cfg).window_kv_tokens, None);
        let cfg = Config::from_toml(&engine_pool(", window_kv_tokens = 8192")).unwrap();
        assert_eq!(engine(&cfg).window_kv_tokens, Some(8192));
        let cfg = Config::from_toml(&engine_pool(", window_kv_tokens = 0")).unwrap();
        assert_eq!(engine(&cfg).window_kv_tokens, Some(0));
    }

    #[test]
    fn stored_responses_need_a_path_and_a_retention() {
        let with = |fields: &str| Config::from_toml(&format!("[responses]\n{fields}\n"));
        let cfg = with("store = true").unwrap();
        assert_eq!(cfg.responses.path, "tollgate-responses.db");
        assert_eq!(cfg.responses.retention_hours, 720.0);
        for bad in [
            "store = true\npath = \"\"",
            "store = true\nretention_hours = 0.0",
            "store = true\nretention_hours = -1.0",
            "store = true\nretention_hours = 1e300",
            "store = true\nretention_hours = nan",
            "store = true\nmax_stored_mib_per_tenant = -1.0",
            "max_stored_mib_per_tenant = inf",
        ] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("responses."), "{bad}: {err}");
        }
        // Off, nothing about it is checked.
        assert!(with("store = false\npath = \"\"").is_ok());
        assert_eq!(cfg.responses.max_stored_mib_per_tenant, 1024.0);
        let tenant = |quota: &str| {
            Config::from_toml(&format!(
                "[[tenants]]\nid = \"t\"\nkeys_sha256 = [\"{}\"]\nmax_stored_mib = {quota}\n",
                "ab".repeat(32)
            ))
        };
        assert_eq!(tenant("0.0").unwrap().tenants[0].max_stored_mib, Some(0.0));
        let err = tenant("-2.0").unwrap_err().to_string();
        assert!(err.contains("tenants.t: max_stored_mib"), "{err}");
        let files = |quota: &str| {
            Config::from_toml(&format!(
                "[[tenants]]\nid = \"t\"\nkeys_sha256 = [\"{}\"]\nmax_files_mib = {quota}\n",
                "ab".repeat(32)
            ))
        };
        assert_eq!(files("5").unwrap().tenants[0].max_files_mib, Some(5.0));
        for bad in ["-1", "nan"] {
            let err = files(bad).unwrap_err().to_string();
            assert!(err.contains("tenants.t: max_files_mib"), "{err}");
        }
    }

    /// A model's chat template defaults are read as a table of any values; one naming a
    /// variable tollgate sets itself is refused.
    #[test]
    fn a_models_template_defaults_are_checked() {
        let with = |line: &str| {
            Config::from_toml(&engine_pool("").replace(
                "source = \"m.gguf\"",
                &format!("source = \"m.gguf\"\n{line}"),
            ))
        };
        let cfg = with("chat_template_kwargs = { enable_thinking = false, depth = 2 }").unwrap();
        assert_eq!(
            serde_json::to_value(&cfg.models[0].chat_template_kwargs).unwrap(),
            serde_json::json!({"enable_thinking": false, "depth": 2})
        );
        assert_eq!(with("").unwrap().models[0].chat_template_kwargs, None);
        for own in ["messages", "add_generation_prompt", "bos_token", "tools"] {
            let err = with(&format!("chat_template_kwargs = {{ {own} = 1 }}"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("models.m: chat_template_kwargs may not set"),
                "{own}: {err}"
            );
        }
    }

    #[test]
    fn the_attention_kernel_is_chosen_by_name() {
        let cfg = Config::from_toml(&engine_pool("")).unwrap();
        assert_eq!(engine(&cfg).attention, AttentionKind::Simt);
        let cfg = Config::from_toml(&engine_pool(r#", attention = "tensor""#)).unwrap();
        assert_eq!(engine(&cfg).attention, AttentionKind::Tensor);
        let err = Config::from_toml(&engine_pool(r#", attention = "flash""#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("simt") && err.contains("tensor"), "{err}");
    }

    #[test]
    fn bad_engine_sizes_are_refused() {
        for bad in [
            ", max_seqs = 0",
            ", max_concurrency = 0",
            ", kv_tokens = 8",
            ", gpu_memory_fraction = 0.0",
            ", gpu_memory_fraction = 1.5",
        ] {
            let err = Config::from_toml(&engine_pool(bad))
                .unwrap_err()
                .to_string();
            assert!(err.contains("pools.p: engine"), "{bad}: {err}");
        }
    }

    #[test]
    fn upstream_embeddings_batches_are_bounded() {
        let pool = |fields: &str| {
            engine_pool("").replace(
                r#"{ kind = "engine" }"#,
                &format!(r#"{{ kind = "openai", url = "http://127.0.0.1:9"{fields} }}"#),
            )
        };
        let cfg = Config::from_toml(&pool("")).expect("defaults");
        match &cfg.pools[0].workers[0] {
            WorkerConfig::Openai(o) => {
                assert_eq!((o.embed_batch, o.embed_batch_tokens), (256, 100_000))
            }
            other => panic!("not an upstream: {other:?}"),
        }
        assert!(Config::from_toml(&pool(", embed_batch = 2048")).is_ok());
        let cfg = Config::from_toml(&pool(r#", embed_encoding = "float""#)).expect("float");
        assert!(matches!(&cfg.pools[0].workers[0],
            WorkerConfig::Openai(o) if o.embed_encoding == EmbedEncoding::Float));
        assert!(Config::from_toml(&pool(r#", embed_encoding = "hex""#)).is_err());
        for bad in [
            ", embed_batch = 0",
            ", embed_batch = 2049",
            ", embed_batch_tokens = 0",
        ] {
            let err = Config::from_toml(&pool(bad)).unwrap_err().to_string();
            assert!(err.contains("embed_batch"), "{bad}: {err}");
        }
    }
}
