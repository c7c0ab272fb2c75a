//! Capacity contracts: what a tenant bought, turned into admission decisions.
//!
//! Each tenant (and each model a tenant has an override for) is a [`Scope`] with two GCRA
//! buckets ([`gcra`]): weighted tokens (`input + output_weight × output`) and requests,
//! plus an in-flight counter. Scopes live in a `DashMap` keyed by (tenant, model) that
//! survives config reloads: a reload changes a scope's rates in place, so bucket state and
//! in-flight counts carry over. The request path holds an `Arc<Scope>` and touches only
//! atomics.
//!
//! Admission ([`Limiter::admit`]) reserves `input + output_weight × max_tokens` and one
//! request; the [`Reservation`] is settled when the request ends with what it really used
//! (the rest refunded). With `limits.backend = "redis"` the buckets are global: one atomic
//! Lua script per admission in Redis ([`redis`]); while Redis is unreachable the configured
//! fail mode applies.

pub mod gcra;
pub mod headers;
pub mod redis;

use crate::config::{Config, ContractOverride, LimitsBackend, Overflow, TenantConfig, Tier};
use dashmap::DashMap;
use gcra::{Gcra, Rate, Snapshot};
use serde::Serialize;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Bucket depth when a contract gives no `burst_seconds`.
pub const DEFAULT_BURST_SECONDS: f64 = 10.0;

/// Nanoseconds on the limiter's monotonic clock.
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // Start at one hour so that "a full bucket" (tat = 0) is never in the future.
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 3_600_000_000_000
}

/// One tenant's effective contract for one scope (the tenant, or one of its models).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Contract {
    pub tokens_per_second: Option<f64>,
    pub burst_seconds: f64,
    pub requests_per_minute: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub tier: Tier,
    pub overflow: Overflow,
}

impl Contract {
    pub fn of_tenant(t: &TenantConfig) -> Self {
        Self {
            tokens_per_second: t.tokens_per_second,
            burst_seconds: t.burst_seconds.unwrap_or(DEFAULT_BURST_SECONDS),
            requests_per_minute: t.requests_per_minute,
            max_concurrency: t.max_concurrency,
            tier: t.tier,
            overflow: t.overflow,
        }
    }

    pub fn with_override(&self, o: &ContractOverride) -> Self {
        Self {
            tokens_per_second: o.tokens_per_second.or(self.tokens_per_second),
            burst_seconds: o.burst_seconds.unwrap_or(self.burst_seconds),
            requests_per_minute: o.requests_per_minute.or(self.requests_per_minute),
            max_concurrency: o.max_concurrency.or(self.max_concurrency),
            ..self.clone()
        }
    }

    /// The weighted-token bucket: `tokens_per_second`, `burst_seconds` deep.
    pub fn token_rate(&self) -> Option<Rate> {
        self.tokens_per_second.map(|r| Rate {
            per_sec: r,
            burst: r * self.burst_seconds,
        })
    }

    /// The request bucket: `requests_per_minute / 60` per second, `burst_seconds` deep (at
    /// least one request).
    pub fn request_rate(&self) -> Option<Rate> {
        self.requests_per_minute.map(|rpm| {
            let per_sec = rpm as f64 / 60.0;
            Rate {
                per_sec,
                burst: (per_sec * self.burst_seconds).max(1.0),
            }
        })
    }
}

/// A rate that stands for "no limit" in a bucket that is not consulted.
const UNLIMITED: Rate = Rate {
    per_sec: 1.0,
    burst: 1.0,
};

/// The live state of one (tenant, model-or-all) scope.
pub struct Scope {
    pub tenant: Arc<str>,
    /// `None`: the tenant's traffic without a per-model override.
    pub model: Option<Arc<str>>,
    pub tokens: Gcra,
    pub requests: Gcra,
    in_flight: AtomicU32,
    admitted: AtomicU64,
    rejected: AtomicU64,
    /// Weighted tokens charged, after reconciliation (milli-tokens).
    charged_milli: AtomicU64,
}

/// Holds one of a scope's concurrency slots until dropped.
pub struct ConcurrencySlot(Arc<Scope>);

impl Drop for ConcurrencySlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Scope {
    fn new(tenant: Arc<str>, model: Option<Arc<str>>, c: &Contract) -> Self {
        Self {
            tenant,
            model,
            tokens: Gcra::new(c.token_rate().unwrap_or(UNLIMITED)),
            requests: Gcra::new(c.request_rate().unwrap_or(UNLIMITED)),
            in_flight: AtomicU32::new(0),
            admitted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            charged_milli: AtomicU64::new(0),
        }
    }

    fn apply(&self, c: &Contract, now: u64) {
        if let Some(r) = c.token_rate() {
            if self.tokens.rate() != r {
                self.tokens.set_rate(r, now);
            }
        }
        if let Some(r) = c.request_rate() {
            if self.requests.rate() != r {
                self.requests.set_rate(r, now);
            }
        }
    }

    /// Takes a concurrency slot, or `None` at `cap`.
    pub fn try_acquire(self: &Arc<Self>, cap: Option<u32>) -> Option<ConcurrencySlot> {
        let cap = cap.unwrap_or(u32::MAX);
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| ConcurrencySlot(self.clone()))
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The buckets as of now, for response headers and the admin API.
    pub fn snapshot(&self, c: &Contract) -> Buckets {
        let now = now_ns();
        Buckets {
            tokens: c.token_rate().map(|_| self.tokens.snapshot(now)),
            requests: c.request_rate().map(|_| self.requests.snapshot(now)),
        }
    }

    pub fn usage(&self, c: &Contract) -> ScopeUsage {
        let b = self.snapshot(c);
        ScopeUsage {
            tenant: self.tenant.to_string(),
            model: self.model.as_deref().map(str::to_string),
            in_flight: self.in_flight(),
            admitted: self.admitted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            weighted_tokens_charged: self.charged_milli.load(Ordering::Relaxed) as f64 / 1e3,
            tokens_remaining: b.tokens.map(|s| s.remaining.floor()),
            requests_remaining: b.requests.map(|s| s.remaining.floor()),
        }
    }
}

/// A scope's live usage (admin API).
#[derive(Debug, Serialize)]
pub struct ScopeUsage {
    pub tenant: String,
    pub model: Option<String>,
    pub in_flight: u32,
    pub admitted: u64,
    pub rejected: u64,
    pub weighted_tokens_charged: f64,
    pub tokens_remaining: Option<f64>,
    pub requests_remaining: Option<f64>,
}

/// Both buckets of a scope, where the contract limits them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Buckets {
    pub tokens: Option<Snapshot>,
    pub requests: Option<Snapshot>,
}

/// A tenant's contracts as resolved from one config: the default scope and per-model ones.
pub struct TenantLimits {
    pub default: (Contract, Arc<Scope>),
    pub per_model: Vec<(String, Contract, Arc<Scope>)>,
}

impl TenantLimits {
    /// The contract and scope that govern `model`.
    pub fn for_model(&self, model: &str) -> (&Contract, &Arc<Scope>) {
        self.per_model
            .iter()
            .find(|(m, _, _)| m == model)
            .map(|(_, c, s)| (c, s))
            .unwrap_or((&self.default.0, &self.default.1))
    }
}

/// An admission refused by the rate buckets.
#[derive(Debug, Clone, Copy)]
pub struct Refused {
    pub retry_after_ns: u64,
    /// Which bucket is short: `"tokens"` or `"requests"`.
    pub bucket: &'static str,
    pub buckets: Buckets,
}

/// Why admission failed.
#[derive(Debug)]
pub enum AdmitError {
    /// Past contract: 429.
    Refused(Refused),
    /// The global limiter is unreachable and `on_redis_error = "closed"`: 503.
    Unavailable,
}

/// Where the buckets live.
enum Backend {
    Local,
    Redis(redis::RedisLimiter),
}

/// (tenant, model with an override, or `None` for the tenant's other traffic).
type ScopeKey = (Arc<str>, Option<Arc<str>>);

/// All scopes, and the backend that admits against them.
pub struct Limiter {
    scopes: DashMap<ScopeKey, Arc<Scope>>,
    backend: Backend,
}

impl Limiter {
    pub fn new(cfg: &Config) -> Self {
        let backend = match cfg.limits.backend {
            LimitsBackend::Local => Backend::Local,
            LimitsBackend::Redis => Backend::Redis(redis::RedisLimiter::new(&cfg.limits)),
        };
        Self {
            scopes: DashMap::new(),
            backend,
        }
    }

    /// The limiter with local buckets only (benchmarks, tests).
    pub fn local() -> Self {
        Self {
            scopes: DashMap::new(),
            backend: Backend::Local,
        }
    }

    pub fn redis(&self) -> Option<&redis::RedisLimiter> {
        match &self.backend {
            Backend::Redis(r) => Some(r),
            Backend::Local => None,
        }
    }

    fn scope(&self, tenant: &Arc<str>, model: Option<&str>, c: &Contract, now: u64) -> Arc<Scope> {
        let key = (tenant.clone(), model.map(Arc::from));
        let scope = self
            .scopes
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Scope::new(key.0, key.1, c)))
            .clone();
        scope.apply(c, now);
        scope
    }

    /// Resolves a tenant's contracts against the live scopes (creating or updating them).
    pub fn tenant(&self, t: &TenantConfig) -> TenantLimits {
        let now = now_ns();
        let id: Arc<str> = t.id.as_str().into();
        let base = Contract::of_tenant(t);
        let default = (base.clone(), self.scope(&id, None, &base, now));
        let per_model = t
            .models
            .iter()
            .map(|(m, o)| {
                let c = base.with_override(o);
                let s = self.scope(&id, Some(m), &c, now);
                (m.clone(), c, s)
            })
            .collect();
        TenantLimits { default, per_model }
    }

    /// Drops scopes that no tenant of `cfg` uses (in-flight requests keep theirs alive).
    pub fn retain(&self, cfg: &Config) {
        self.scopes.retain(|(tenant, model), _| {
            cfg.tenants.iter().any(|t| {
                *t.id == **tenant && model.as_deref().is_none_or(|m| t.models.contains_key(m))
            })
        });
    }

    /// Every scope, for the admin API.
    pub fn scopes(&self) -> Vec<Arc<Scope>> {
        self.scopes.iter().map(|e| e.value().clone()).collect()
    }

    /// Reserves `cost` weighted tokens and one request in `scope` under `contract`.
    pub async fn admit(
        &self,
        scope: &Arc<Scope>,
        contract: &Contract,
        cost: f64,
    ) -> Result<Reservation, AdmitError> {
        let global = match &self.backend {
            Backend::Local => false,
            Backend::Redis(r) => match r.admit(scope, contract, cost).await {
                redis::Outcome::Admitted(buckets) => {
                    return Ok(self.reserved(scope, contract, cost, true, buckets))
                }
                redis::Outcome::Refused(refused) => {
                    scope.rejected.fetch_add(1, Ordering::Relaxed);
                    return Err(AdmitError::Refused(refused));
                }
                redis::Outcome::Closed => return Err(AdmitError::Unavailable),
                redis::Outcome::Open => false,
            },
        };
        match take_local(scope, contract, cost, now_ns()) {
            Ok(()) => {
                let buckets = scope.snapshot(contract);
                Ok(self.reserved(scope, contract, cost, global, buckets))
            }
            Err(refused) => {
                scope.rejected.fetch_add(1, Ordering::Relaxed);
                Err(AdmitError::Refused(refused))
            }
        }
    }

    fn reserved(
        &self,
        scope: &Arc<Scope>,
        contract: &Contract,
        cost: f64,
        global: bool,
        buckets: Buckets,
    ) -> Reservation {
        scope.admitted.fetch_add(1, Ordering::Relaxed);
        Reservation {
            scope: scope.clone(),
            contract: contract.clone(),
            reserved: cost,
            global: global.then(|| self.redis().cloned()).flatten(),
            buckets,
            settled: false,
        }
    }

    /// A reservation that charges nothing (`best_effort` overflow, unlimited tenants).
    pub fn free(scope: &Arc<Scope>, contract: &Contract) -> Reservation {
        scope.admitted.fetch_add(1, Ordering::Relaxed);
        Reservation {
            scope: scope.clone(),
            contract: contract.clone(),
            reserved: 0.0,
            global: None,
            buckets: scope.snapshot(contract),
            settled: true,
        }
    }
}

/// Takes one request and `cost` tokens from a scope's local buckets, atomically as a pair:
/// if the second bucket refuses, the first is refunded.
pub fn take_local(scope: &Scope, c: &Contract, cost: f64, now: u64) -> Result<(), Refused> {
    let limited_r = c.requests_per_minute.is_some();
    let limited_t = c.tokens_per_second.is_some();
    if limited_r {
        if let Err(d) = scope.requests.try_take(1.0, now) {
            // Report the later of the two waits, so a retry then passes both.
            let wait_t = if limited_t {
                token_wait(scope, cost, now)
            } else {
                0
            };
            return Err(Refused {
                retry_after_ns: d.retry_after_ns.max(wait_t),
                bucket: if wait_t > d.retry_after_ns {
                    "tokens"
                } else {
                    "requests"
                },
                buckets: scope.snapshot(c),
            });
        }
    }
    if limited_t {
        if let Err(d) = scope.tokens.try_take(cost, now) {
            if limited_r {
                scope.requests.refund(1.0, now);
            }
            return Err(Refused {
                retry_after_ns: d.retry_after_ns,
                bucket: "tokens",
                buckets: scope.snapshot(c),
            });
        }
    }
    Ok(())
}

/// How long until `cost` tokens fit, without taking them.
fn token_wait(scope: &Scope, cost: f64, now: u64) -> u64 {
    scope
        .tokens
        .check(cost, now)
        .err()
        .map_or(0, |d| d.retry_after_ns)
}

/// Weighted tokens and one request held for an admitted request until it ends.
pub struct Reservation {
    scope: Arc<Scope>,
    contract: Contract,
    reserved: f64,
    global: Option<redis::RedisLimiter>,
    /// The buckets right after admission (for response headers).
    pub buckets: Buckets,
    settled: bool,
}

impl Reservation {
    pub fn reserved(&self) -> f64 {
        self.reserved
    }

    /// Settles with what the request really used: `used` weighted tokens, or `None` when it
    /// produced nothing (failed or cancelled before its first token, or never ran): then the
    /// request itself is refunded too.
    pub fn settle(&mut self, used: Option<f64>) {
        if self.settled {
            return;
        }
        self.settled = true;
        let charged = used.unwrap_or(0.0);
        self.scope
            .charged_milli
            .fetch_add((charged * 1e3) as u64, Ordering::Relaxed);
        let delta_tokens = charged - self.reserved;
        let refund_request = used.is_none();
        if let Some(r) = &self.global {
            r.adjust(&self.scope, &self.contract, delta_tokens, refund_request);
            return;
        }
        let now = now_ns();
        if self.contract.tokens_per_second.is_some() {
            if delta_tokens < 0.0 {
                self.scope.tokens.refund(-delta_tokens, now);
            } else if delta_tokens > 0.0 {
                self.scope.tokens.charge(delta_tokens, now);
            }
        }
        if refund_request && self.contract.requests_per_minute.is_some() {
            self.scope.requests.refund(1.0, now);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // Never settled: the request ended before producing anything.
        self.settle(None);
    }
}
