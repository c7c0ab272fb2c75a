//! Global limits through Redis: every gateway replica admits against the same buckets.
//!
//! Design: the GCRA state of each scope's two buckets (theoretical arrival times, in
//! microseconds of Redis's own clock) lives in Redis, and one Lua script checks and takes
//! both atomically on the server. There is no local share to drift, so the global bound is
//! the local one (`rate × window + burst`) exactly, whatever the number of replicas; the
//! price is one Redis round trip per admission (~100 µs on a LAN). Reconciliation at the
//! end of a request is a second script call, sent off the request path.
//!
//! When Redis does not answer within `limits.redis_timeout_ms` (or refuses connections),
//! the limiter marks it down (one log line, `tollgate_limits_backend_up` = 0, and
//! `tollgate_limits_backend_errors_total`), and applies `limits.on_redis_error`: `open`
//! admits under this replica's local buckets, `closed` answers 503. While down, one request
//! every 500 ms probes Redis; the first answer brings it back (one log line).

use super::gcra::{Rate, Snapshot};
use super::{Buckets, Contract, Refused, Scope};
use crate::config::{FailMode, LimitsConfig};
use arc_swap::ArcSwapOption;
use redis::aio::ConnectionManager;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const PROBE_EVERY_NS: u64 = 500_000_000;

/// KEYS: tokens tat, requests tat. ARGV: mode, then per bucket interval_us, cost, tolerance_us
/// (interval 0 = bucket not limited). Returns {admitted, retry_us, tokens_ahead_us,
/// requests_ahead_us}.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
local function store(key, v)
  if v > now then
    redis.call('SET', key, string.format('%.0f', v), 'PX', math.ceil((v - now) / 1000) + 1000)
  else
    redis.call('DEL', key)
  end
end
local function tat_of(key)
  local v = tonumber(redis.call('GET', key) or '0')
  if v < now then v = now end
  return v
end
if mode == 'take' then
  local retry = 0
  local tat = {now, now}
  local new = {false, false}
  for i = 1, 2 do
    local interval = tonumber(ARGV[3 * i - 1])
    if interval > 0 then
      local cost = tonumber(ARGV[3 * i])
      local tol = tonumber(ARGV[3 * i + 1])
      tat[i] = tat_of(KEYS[i])
      new[i] = tat[i] + math.ceil(cost * interval)
      local over = new[i] - now - tol
      if over > retry then retry = over end
    end
  end
  if retry > 0 then
    return {0, retry, tat[1] - now, tat[2] - now}
  end
  local ahead = {0, 0}
  for i = 1, 2 do
    if new[i] then
      store(KEYS[i], new[i])
      ahead[i] = new[i] - now
    end
  end
  return {1, 0, ahead[1], ahead[2]}
end
for i = 1, 2 do
  local interval = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  if interval > 0 and cost ~= 0 then
    local cur = tonumber(redis.call('GET', KEYS[i]) or '0')
    if cost > 0 then
      store(KEYS[i], math.max(cur, now) + math.ceil(cost * interval))
    else
      store(KEYS[i], math.max(cur - math.ceil(-cost * interval), math.min(now, cur)))
    end
  end
end
return {1, 0, 0, 0}
"#;

/// What the global limiter decided.
pub enum Outcome {
    Admitted(Buckets),
    Refused(Refused),
    /// Redis is unreachable, fail open: admit under the local buckets.
    Open,
    /// Redis is unreachable, fail closed: 503.
    Closed,
}

struct Inner {
    client: Result<redis::Client, String>,
    conn: ArcSwapOption<ConnectionManager>,
    script: redis::Script,
    timeout: Duration,
    fail: FailMode,
    prefix: String,
    up: AtomicBool,
    next_probe: AtomicU64,
    errors: AtomicU64,
}

/// The Redis-backed limiter (cheap to clone).
#[derive(Clone)]
pub struct RedisLimiter(Arc<Inner>);

fn micros(rate: Option<Rate>) -> (f64, f64) {
    match rate {
        Some(r) => {
            let interval = 1e6 / r.per_sec;
            (interval, r.burst * interval)
        }
        None => (0.0, 0.0),
    }
}

fn snapshot(rate: Option<Rate>, ahead_us: i64) -> Option<Snapshot> {
    rate.map(|r| {
        let ahead = ahead_us.max(0) as f64;
        Snapshot {
            limit: r.burst,
            remaining: (r.burst - ahead * r.per_sec / 1e6).max(0.0),
            reset_ns: ahead as u64 * 1000,
        }
    })
}

impl RedisLimiter {
    pub fn new(cfg: &LimitsConfig) -> Self {
        let url = cfg.redis_url.clone().unwrap_or_default();
        Self(Arc::new(Inner {
            client: redis::Client::open(url.as_str()).map_err(|e| e.to_string()),
            conn: ArcSwapOption::empty(),
            script: redis::Script::new(SCRIPT),
            timeout: Duration::from_millis(cfg.redis_timeout_ms),
            fail: cfg.on_redis_error,
            prefix: cfg.redis_prefix.clone(),
            // Unknown until the first call; assume up so that the first request tries.
            up: AtomicBool::new(true),
            next_probe: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }))
    }

    /// Whether Redis answered the last call.
    pub fn is_up(&self) -> bool {
        self.0.up.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.0.errors.load(Ordering::Relaxed)
    }

    fn keys(&self, scope: &Scope) -> (String, String) {
        let model = scope.model.as_deref().unwrap_or("*");
        let base = format!("{}:{{{}}}:{model}", self.0.prefix, scope.tenant);
        (format!("{base}:t"), format!("{base}:r"))
    }

    fn failed(&self) -> Outcome {
        match self.0.fail {
            FailMode::Open => Outcome::Open,
            FailMode::Closed => Outcome::Closed,
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, String> {
        if let Some(c) = self.0.conn.load_full() {
            return Ok((*c).clone());
        }
        let client = self.0.client.as_ref().map_err(|e| e.clone())?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(self.0.timeout)
            .set_response_timeout(self.0.timeout)
            .set_number_of_retries(1);
        let conn = tokio::time::timeout(
            self.0.timeout * 2,
            client.get_connection_manager_with_config(cfg),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        self.0.conn.store(Some(Arc::new(conn.clone())));
        Ok(conn)
    }

    async fn call(&self, keys: (String, String), args: [String; 7]) -> Result<[i64; 4], String> {
        let mut conn = self.connection().await?;
        let mut inv = self.0.script.prepare_invoke();
        inv.key(keys.0).key(keys.1);
        for a in args {
            inv.arg(a);
        }
        let r: Vec<i64> = tokio::time::timeout(self.0.timeout, inv.invoke_async(&mut conn))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        r.try_into()
            .map_err(|r: Vec<i64>| format!("unexpected script answer {r:?}"))
    }

    fn mark(&self, result: &Result<[i64; 4], String>) {
        match result {
            Ok(_) => {
                if !self.0.up.swap(true, Ordering::Relaxed) {
                    tracing::warn!("limits: Redis answers again; global limits restored");
                }
            }
            Err(e) => {
                self.0.errors.fetch_add(1, Ordering::Relaxed);
                self.0
                    .next_probe
                    .store(super::now_ns() + PROBE_EVERY_NS, Ordering::Relaxed);
                if self.0.up.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, mode = ?self.0.fail, "limits: Redis unreachable; applying on_redis_error");
                }
            }
        }
    }

    /// Checks and takes `cost` tokens and one request in the global buckets.
    pub async fn admit(&self, scope: &Scope, c: &Contract, cost: f64) -> Outcome {
        if !self.is_up() {
            // Down: only the request that claims the probe slot asks Redis.
            let now = super::now_ns();
            let due = self.0.next_probe.load(Ordering::Relaxed);
            if now < due
                || self
                    .0
                    .next_probe
                    .compare_exchange(
                        due,
                        now + PROBE_EVERY_NS,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_err()
            {
                return self.failed();
            }
        }
        let (tr, rr) = (c.token_rate(), c.request_rate());
        let (ti, ttol) = micros(tr);
        let (ri, rtol) = micros(rr);
        let args = [
            "take".to_string(),
            ti.to_string(),
            cost.to_string(),
            ttol.to_string(),
            ri.to_string(),
            "1".to_string(),
            rtol.to_string(),
        ];
        let result = self.call(self.keys(scope), args).await;
        self.mark(&result);
        match result {
            Ok([admitted, retry_us, t_ahead, r_ahead]) => {
                let buckets = Buckets {
                    tokens: snapshot(tr, t_ahead),
                    requests: snapshot(rr, r_ahead),
                };
                if admitted == 1 {
                    Outcome::Admitted(buckets)
                } else {
                    // Which bucket is short: the one whose own wait is the longer.
                    let t_short =
                        tr.is_some_and(|r| t_ahead as f64 + cost * 1e6 / r.per_sec > ttol);
                    Outcome::Refused(Refused {
                        retry_after_ns: retry_us.max(1) as u64 * 1000,
                        bucket: if t_short { "tokens" } else { "requests" },
                        buckets,
                    })
                }
            }
            Err(_) => self.failed(),
        }
    }

    /// Settles a reservation in the global buckets, off the request path: `tokens` more
    /// (or, negative, fewer) weighted tokens, and the request itself back if it produced
    /// nothing.
    pub fn adjust(&self, scope: &Scope, c: &Contract, tokens: f64, refund_request: bool) {
        if tokens == 0.0 && !refund_request {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (ti, _) = micros(c.token_rate());
        let (ri, _) = micros(c.request_rate());
        let args = [
            "adjust".to_string(),
            ti.to_string(),
            tokens.to_string(),
            "0".to_string(),
            ri.to_string(),
            if refund_request { "-1" } else { "0" }.to_string(),
            "0".to_string(),
        ];
        let keys = self.keys(scope);
        let me = self.clone();
        rt.spawn(async move {
            let result = me.call(keys, args).await;
            me.mark(&result);
        });
    }
}
