//! Routing: per-model pools of workers, picked by least outstanding work with
//! power-of-two-choices, gated by health, a circuit breaker and a concurrency cap.
//!
//! A pick draws two random workers and takes the one with fewer outstanding tokens
//! (prompt + max_tokens of its in-flight requests, as the router counts them). It costs
//! O(1) in the pool's size; only when most workers are unavailable (several draws in a row
//! find no eligible worker) does it fall back to one scan of the pool.
//!
//! **Prefix affinity** (a pool's `affinity = "prefix"`, the default for pools of engines):
//! one of the two candidates is the request's own worker, chosen by a hash of its tenant
//! and the start of its prompt, and it is taken unless it is busier than the other by
//! [`AFFINITY_SLACK`] requests and half again. Prompts that start alike (a shared system
//! prompt, a chat's earlier turns) then meet the same worker's prefix cache.
//!
//! The [`Lease`] a pick returns holds the worker's slot until dropped (request finished,
//! failed or cancelled) and carries the outcome back to the breaker.
//!
//! When every healthy worker is at its cap, a request may wait in a bounded queue
//! ([`Pool::pick_or_wait`]: `server.queue_depth`, `server.queue_timeout_secs`), the pool's
//! wait [`room`]: a released slot is offered to the least-served tenant's request. A full
//! queue or a wait past the limit is a saturated fleet: 503.

pub mod health;
pub mod room;

pub use crate::config::Affinity;
use crate::config::{Config, ModelConfig, PoolConfig, WorkerConfig};
use crate::engine::EngineWorker;
use crate::worker::{openai::OpenAiWorker, sim::SimWorker, Worker};
use health::Breaker;
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How many random pairs a pick draws before it scans the pool.
const PICK_ATTEMPTS: usize = 4;

/// How many more requests in flight than the other candidate a key's own worker may have
/// (and half again) before a request goes to the other one.
pub const AFFINITY_SLACK: u64 = 8;

/// Prompt tokens (or, without the model's tokenizer, prompt bytes) that an affinity key
/// covers: prompts that start alike for this long go to the same worker.
const KEY_TOKENS: usize = 256;
const KEY_BYTES: usize = 1024;

/// The affinity key of a request: its tenant (a worker's prefix cache is per tenant) and
/// the start of its prompt, as token ids where the pool holds the tokenizer, else as text.
pub fn affinity_key(tenant: &str, prompt: &crate::worker::Prompt, ids: Option<&[u32]>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tenant.hash(&mut h);
    match ids {
        Some(ids) => ids[..ids.len().min(KEY_TOKENS)].hash(&mut h),
        None => {
            let mut left = KEY_BYTES;
            let mut take = |s: &str| {
                let b = &s.as_bytes()[..s.len().min(left)];
                h.write(b);
                left -= b.len();
            };
            match prompt {
                crate::worker::Prompt::Text(t) => take(t),
                crate::worker::Prompt::Tokens(ids) => ids[..ids.len().min(KEY_TOKENS)].hash(&mut h),
                crate::worker::Prompt::Chat(msgs, _) => {
                    for m in msgs {
                        take(&m.role);
                        take(&m.content);
                    }
                }
            }
        }
    }
    h.finish()
}

/// One worker in a pool, with the router's counters for it.
pub struct WorkerSlot {
    pub worker: Arc<dyn Worker>,
    in_flight: AtomicU64,
    outstanding_tokens: AtomicU64,
    healthy: AtomicBool,
    pub breaker: Breaker,
    cap: u64,
}

impl WorkerSlot {
    fn new(worker: Arc<dyn Worker>, breaker: Breaker) -> Self {
        let cap = worker.max_concurrency() as u64;
        Self {
            worker,
            in_flight: AtomicU64::new(0),
            outstanding_tokens: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            breaker,
            cap,
        }
    }
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
    pub fn outstanding_tokens(&self) -> u64 {
        self.outstanding_tokens.load(Ordering::Relaxed)
    }
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
    pub fn set_healthy(&self, ok: bool) {
        self.healthy.store(ok, Ordering::Relaxed);
    }
    /// Routable now, ignoring the concurrency cap.
    fn eligible(&self, now: Instant) -> bool {
        self.healthy() && self.breaker.allows(now)
    }
    /// Takes a concurrency slot if under the cap.
    fn try_acquire(&self) -> bool {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.cap).then_some(n + 1)
            })
            .is_ok()
    }
}

/// A pool's shared state: requests in flight on any of its workers, and its wait room.
#[derive(Default)]
pub struct PoolSignal {
    room: room::Room,
    in_flight: AtomicU64,
}

/// A pool of workers for one model.
pub struct Pool {
    pub name: String,
    pub model: String,
    pub slots: Vec<Arc<WorkerSlot>>,
    pub health_interval: Duration,
    signal: Arc<PoolSignal>,
    /// Sum of the workers' concurrency caps.
    cap_total: u64,
    /// How many embeddings inputs one routed request may carry: what every worker takes.
    embed_batch: crate::worker::EmbedBatch,
    /// Whether every worker makes embeddings of a size asked (`dimensions`).
    sets_dimensions: bool,
    /// Whether requests that start alike go to the same worker.
    pub affinity: Affinity,
}

/// Why no worker could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoWorker {
    /// Every worker is unhealthy or ejected.
    Unhealthy,
    /// Healthy workers exist but all are at their concurrency cap.
    Saturated,
}

impl Pool {
    /// Builds a pool; engine workers load `model`'s weights (fetching a known model).
    pub fn from_config(cfg: &PoolConfig, model: Option<&ModelConfig>) -> Result<Self, String> {
        let mut slots = Vec::new();
        let breaker = || {
            Breaker::new(
                cfg.breaker_failures,
                Duration::from_secs_f64(cfg.breaker_cooldown_secs),
            )
        };
        for (i, w) in cfg.workers.iter().enumerate() {
            match w {
                WorkerConfig::Sim(s) => {
                    for k in 0..s.count {
                        let name = if s.count == 1 {
                            format!("{}/{i}-sim", cfg.name)
                        } else {
                            format!("{}/{i}-sim-{k}", cfg.name)
                        };
                        let worker: Arc<dyn Worker> = Arc::new(SimWorker::new(name, s.clone()));
                        slots.push(Arc::new(WorkerSlot::new(worker, breaker())));
                    }
                }
                WorkerConfig::Engine(e) => {
                    let source = model.and_then(|m| m.source.as_deref()).ok_or_else(|| {
                        format!("pools.{}: the engine needs a model source", cfg.name)
                    })?;
                    let path = crate::model_fetch::resolve(source).map_err(|e| e.to_string())?;
                    let started = std::time::Instant::now();
                    let loaded = kernels::load::load(&path)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    tracing::info!(model = %cfg.model, path = %path.display(), elapsed = ?started.elapsed(), "model loaded");
                    // One engine per GPU on CUDA; one engine on the CPU.
                    let on_gpu = e.backend == crate::config::BackendKind::Cuda
                        || (e.backend == crate::config::BackendKind::Auto
                            && kernels::cuda::available().is_ok());
                    let devices = if on_gpu { e.devices.clone() } else { vec![0] };
                    // GPUs start side by side (weights, graphs and the self-check take
                    // seconds each); slots keep the configured order.
                    let loaded = &loaded;
                    let started: Vec<Result<EngineWorker, String>> = std::thread::scope(|s| {
                        let handles: Vec<_> = devices
                            .iter()
                            .map(|&dev| {
                                let name = if on_gpu {
                                    format!("{}/{i}-engine-gpu{dev}", cfg.name)
                                } else {
                                    format!("{}/{i}-engine", cfg.name)
                                };
                                s.spawn(move || EngineWorker::start(name, loaded, e, dev))
                            })
                            .collect();
                        handles
                            .into_iter()
                            .map(|h| {
                                h.join().unwrap_or_else(|_| {
                                    Err("an engine panicked while starting".to_string())
                                })
                            })
                            .collect()
                    });
                    for w in started {
                        let worker: Arc<dyn Worker> = Arc::new(w?);
                        slots.push(Arc::new(WorkerSlot::new(worker, breaker())));
                    }
                }
                WorkerConfig::Openai(o) => {
                    let name = format!("{}/{i}-{}", cfg.name, o.url);
                    let worker: Arc<dyn Worker> = Arc::new(
                        OpenAiWorker::new(name, o.clone())
                            .map_err(|e| format!("pools.{}: {e}", cfg.name))?,
                    );
                    slots.push(Arc::new(WorkerSlot::new(worker, breaker())));
                }
            }
        }
        let cap_total = slots.iter().map(|s| s.cap).sum();
        let embed_batch = slots
            .iter()
            .map(|s| s.worker.embed_batch())
            .reduce(crate::worker::EmbedBatch::min)
            .unwrap_or(crate::worker::EmbedBatch::ONE);
        let sets_dimensions = !slots.is_empty() && slots.iter().all(|s| s.worker.sets_dimensions());
        // Engines keep a prefix cache: by default their pools send prompts that start
        // alike to the same one.
        let engines = cfg
            .workers
            .iter()
            .all(|w| matches!(w, WorkerConfig::Engine(_)));
        let affinity = cfg.affinity.unwrap_or(if engines {
            Affinity::Prefix
        } else {
            Affinity::None
        });
        Ok(Self {
            affinity,
            name: cfg.name.clone(),
            model: cfg.model.clone(),
            slots,
            health_interval: Duration::from_secs_f64(cfg.health_interval_secs),
            signal: Arc::default(),
            cap_total,
            embed_batch,
            sets_dimensions,
        })
    }

    /// Whether the pool has idle capacity: nothing waits, and fewer requests are in flight
    /// than `below` × the workers' caps.
    pub fn idle(&self, below: f64) -> bool {
        self.signal.room.is_empty()
            && (self.signal.in_flight.load(Ordering::Relaxed) as f64)
                < below * self.cap_total as f64
    }

    /// The workers' concurrency caps added up: requests the pool runs at once.
    pub fn capacity(&self) -> u64 {
        self.cap_total
    }

    /// How many embeddings inputs one routed request may carry (one, unless every worker
    /// takes several).
    pub fn embed_batch(&self) -> crate::worker::EmbedBatch {
        self.embed_batch
    }

    /// Whether every worker makes embeddings of the size a request asks (`dimensions`).
    pub fn sets_dimensions(&self) -> bool {
        self.sets_dimensions
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.signal.room.len()
    }

    /// The prompt's token ids, where the pool's workers tokenize with the model's
    /// tokenizer (every worker of a pool serves the same model).
    pub fn tokenize_prompt(&self, prompt: &crate::worker::Prompt) -> Option<Vec<u32>> {
        self.slots.first()?.worker.tokenize_prompt(prompt)
    }

    /// Most tokens a sequence may hold on every worker of the pool, where they all say.
    pub fn max_context(&self) -> Option<usize> {
        let each: Option<Vec<usize>> = self.slots.iter().map(|s| s.worker.max_context()).collect();
        each?.into_iter().min()
    }

    /// The text of token ids, where the pool's workers hold the model's tokenizer.
    pub fn detokenize(&self, ids: &[u32]) -> Option<String> {
        self.slots.first()?.worker.detokenize(ids)
    }

    /// Like [`Pool::pick`], but when every worker is at its cap (or others already wait),
    /// waits in the pool's room for a slot offered to `who` (at most `depth` requests
    /// wait; none past `until`).
    pub async fn pick_or_wait(
        &self,
        tokens: u64,
        exclude: &[usize],
        key: Option<u64>,
        depth: usize,
        until: tokio::time::Instant,
        who: &room::Who,
    ) -> Result<Lease, NoWorker> {
        let room = &self.signal.room;
        // Nobody waiting: a free slot is taken at once.
        if room.is_empty() {
            match self.pick_for(tokens, exclude, key) {
                Err(NoWorker::Saturated) => {}
                other => return other,
            }
        }
        let Some(ticket) = room.join(who, depth) else {
            // The room is full: only a slot free right now will do.
            return self.pick_for(tokens, exclude, key);
        };
        // A slot freed before this request joined (or while others wait) is offered now.
        if self.signal.in_flight.load(Ordering::Acquire) < self.cap_total {
            room.wake_next();
        }
        loop {
            if tokio::time::timeout_at(until, ticket.offered())
                .await
                .is_err()
            {
                return Err(NoWorker::Saturated);
            }
            match self.pick_for(tokens, exclude, key) {
                Ok(lease) => {
                    ticket.served();
                    return Ok(lease);
                }
                Err(NoWorker::Saturated) => ticket.decline(!exclude.is_empty()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Picks a worker for a request of `tokens` outstanding tokens, skipping the indices in
    /// `exclude` (workers already tried for this request).
    pub fn pick(&self, tokens: u64, exclude: &[usize]) -> Result<Lease, NoWorker> {
        self.pick_for(tokens, exclude, None)
    }

    /// The request's affinity key under the pool's `affinity` ([`affinity_key`]), if any.
    pub fn key(
        &self,
        tenant: &str,
        prompt: &crate::worker::Prompt,
        ids: Option<&[u32]>,
    ) -> Option<u64> {
        match self.affinity {
            Affinity::Prefix if self.slots.len() > 1 => Some(affinity_key(tenant, prompt, ids)),
            _ => None,
        }
    }

    /// As [`Pool::pick`]; with a `key`, the key's own worker is one of the two candidates
    /// and is taken unless it is unusable, at its cap, or busier than the other by
    /// [`AFFINITY_SLACK`] requests and half again.
    pub fn pick_for(
        &self,
        tokens: u64,
        exclude: &[usize],
        key: Option<u64>,
    ) -> Result<Lease, NoWorker> {
        let n = self.slots.len();
        let now = Instant::now();
        let usable = |i: usize| !exclude.contains(&i) && self.slots[i].eligible(now);
        if n == 0 {
            return Err(NoWorker::Unhealthy);
        }
        let mut rng = rand::thread_rng();
        let mut saw_eligible = false;
        for attempt in 0..PICK_ATTEMPTS {
            let home = key
                .filter(|_| attempt == 0)
                .map(|k| (k % n as u64) as usize);
            let a = home.unwrap_or_else(|| rng.gen_range(0..n));
            let b = if n > 1 {
                (a + rng.gen_range(1..n)) % n
            } else {
                a
            };
            let (ua, ub) = (usable(a), usable(b));
            saw_eligible |= ua || ub;
            let mut order = match (ua, ub) {
                (true, true) if home.is_some() => {
                    let (fa, fb) = (self.slots[a].in_flight(), self.slots[b].in_flight());
                    if fa >= fb + AFFINITY_SLACK.max(fb / 2) {
                        [Some(b), Some(a)]
                    } else {
                        [Some(a), Some(b)]
                    }
                }
                (true, true) => {
                    if self.slots[b].outstanding_tokens() < self.slots[a].outstanding_tokens() {
                        [Some(b), Some(a)]
                    } else {
                        [Some(a), Some(b)]
                    }
                }
                (true, false) => [Some(a), None],
                (false, true) => [Some(b), None],
                (false, false) => continue,
            };
            for i in order.iter_mut().flatten() {
                if let Some(lease) = self.lease(*i, tokens, now) {
                    return Ok(lease);
                }
            }
        }
        // Fallback scan: least outstanding among usable workers with room.
        let mut candidates: Vec<usize> = (0..n).filter(|&i| usable(i)).collect();
        saw_eligible |= !candidates.is_empty();
        candidates.sort_by_key(|&i| self.slots[i].outstanding_tokens());
        for i in candidates {
            if let Some(lease) = self.lease(i, tokens, now) {
                return Ok(lease);
            }
        }
        Err(if saw_eligible {
            NoWorker::Saturated
        } else {
            NoWorker::Unhealthy
        })
    }

    fn lease(&self, i: usize, tokens: u64, now: Instant) -> Option<Lease> {
        let slot = &self.slots[i];
        if !slot.try_acquire() {
            return None;
        }
        let trial = match slot.breaker.admit(now) {
            Some(trial) => trial,
            None => {
                slot.in_flight.fetch_sub(1, Ordering::AcqRel);
                return None;
            }
        };
        slot.outstanding_tokens.fetch_add(tokens, Ordering::Relaxed);
        self.signal.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            signal: self.signal.clone(),
            slot: slot.clone(),
            index: i,
            tokens,
            trial,
            reported: false,
        })
    }
}

/// A worker's slot held by one request.
pub struct Lease {
    signal: Arc<PoolSignal>,
    pub slot: Arc<WorkerSlot>,
    pub index: usize,
    tokens: u64,
    trial: bool,
    reported: bool,
}

impl Lease {
    pub fn worker(&self) -> &Arc<dyn Worker> {
        &self.slot.worker
    }
    /// The request completed on this worker.
    pub fn success(&mut self) {
        self.reported = true;
        self.slot.breaker.record_success();
    }
    /// The worker failed this request (counts toward passive ejection).
    pub fn failure(&mut self) {
        self.reported = true;
        let opened = self.slot.breaker.record_failure(Instant::now());
        if opened {
            tracing::warn!(
                worker = self.slot.worker.name(),
                "circuit breaker opened: worker ejected"
            );
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.slot.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.slot
            .outstanding_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
        if self.trial && !self.reported {
            self.slot.breaker.abandon_trial();
        }
        self.signal.in_flight.fetch_sub(1, Ordering::AcqRel);
        if !self.signal.room.is_empty() {
            self.signal.room.wake_next();
        }
    }
}

/// All pools, and which pool serves a model by default.
pub struct Router {
    pub pools: Vec<Arc<Pool>>,
    by_name: HashMap<String, Arc<Pool>>,
    default_for_model: HashMap<String, Arc<Pool>>,
}

impl Router {
    pub fn from_config(cfg: &Config) -> Result<Self, String> {
        let mut pools = Vec::new();
        let mut by_name = HashMap::new();
        let mut default_for_model = HashMap::new();
        for p in &cfg.pools {
            let model = cfg.models.iter().find(|m| m.id == p.model);
            let pool = Arc::new(Pool::from_config(p, model)?);
            by_name.insert(pool.name.clone(), pool.clone());
            default_for_model
                .entry(pool.model.clone())
                .or_insert_with(|| pool.clone());
            pools.push(pool);
        }
        Ok(Self {
            pools,
            by_name,
            default_for_model,
        })
    }

    /// The pool that serves `model` for a tenant (its dedicated pool if it has one).
    pub fn pool_for(&self, model: &str, dedicated: Option<&str>) -> Option<&Arc<Pool>> {
        match dedicated {
            Some(name) => self.by_name.get(name).filter(|p| p.model == model),
            None => self.default_for_model.get(model),
        }
    }

    /// Models that have at least one pool.
    pub fn serves(&self, model: &str) -> bool {
        self.default_for_model.contains_key(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SimConfig;

    fn pool(n: usize, cap: usize) -> Pool {
        let cfg = PoolConfig {
            name: "p".into(),
            model: "m".into(),
            workers: vec![WorkerConfig::Sim(SimConfig {
                count: n,
                max_concurrency: cap,
                ..SimConfig::default()
            })],
            health_interval_secs: 5.0,
            breaker_failures: 2,
            breaker_cooldown_secs: 60.0,
            affinity: None,
        };
        Pool::from_config(&cfg, None).unwrap()
    }

    #[test]
    fn caps_are_respected_and_released() {
        let p = pool(3, 2);
        let leases: Vec<_> = (0..6).map(|_| p.pick(10, &[]).unwrap()).collect();
        assert!(p.slots.iter().all(|s| s.in_flight() == 2));
        assert_eq!(p.pick(10, &[]).err(), Some(NoWorker::Saturated));
        drop(leases);
        assert!(p
            .slots
            .iter()
            .all(|s| s.in_flight() == 0 && s.outstanding_tokens() == 0));
    }

    #[test]
    fn p2c_balances_outstanding_work() {
        let p = pool(8, 1000);
        let _leases: Vec<_> = (0..800).map(|_| p.pick(100, &[]).unwrap()).collect();
        let loads: Vec<u64> = p.slots.iter().map(|s| s.in_flight()).collect();
        let (min, max) = (*loads.iter().min().unwrap(), *loads.iter().max().unwrap());
        assert!(
            max - min <= 10,
            "power of two choices keeps loads close: {loads:?}"
        );
    }

    #[test]
    fn a_key_goes_to_its_own_worker_until_that_one_is_busier_by_the_slack() {
        let p = pool(8, 1000);
        let home = (12345u64 % 8) as usize;
        // Up to the slack, every request of the key lands on its worker.
        let held: Vec<_> = (0..AFFINITY_SLACK)
            .map(|_| p.pick_for(10, &[], Some(12345)).unwrap())
            .collect();
        assert!(held.iter().all(|l| l.index == home));
        // Busier than the other candidate by the slack: the next goes elsewhere.
        let spilled = p.pick_for(10, &[], Some(12345)).unwrap();
        assert_ne!(spilled.index, home);
        drop((held, spilled));
        assert_eq!(p.pick_for(10, &[], Some(12345)).unwrap().index, home);
        // Excluded (already tried) or unhealthy: elsewhere.
        assert_ne!(p.pick_for(10, &[home], Some(12345)).unwrap().index, home);
        p.slots[home].set_healthy(false);
        assert_ne!(p.pick_for(10, &[], Some(12345)).unwrap().index, home);
        // Many keys spread over the pool.
        let hit: std::collections::HashSet<usize> = (0..64u64)
            .map(|k| p.pick_for(1, &[], Some(k)).unwrap().index)
            .collect();
        assert!(hit.len() >= 6, "{hit:?}");
    }

    #[test]
    fn the_affinity_key_is_the_tenant_and_the_start_of_the_prompt() {
        use crate::worker::{ChatMessage, Prompt};
        let text = |s: &str| Prompt::Text(s.to_string());
        let long = "x".repeat(KEY_BYTES);
        let k = |t: &str, p: &Prompt| affinity_key(t, p, None);
        assert_eq!(
            k("a", &text(&format!("{long}1"))),
            k("a", &text(&format!("{long}2")))
        );
        assert_ne!(k("a", &text("one")), k("a", &text("two")));
        assert_ne!(k("a", &text("one")), k("b", &text("one")));
        let chat = |c: &str| {
            Prompt::Chat(
                vec![ChatMessage {
                    role: "user".into(),
                    content: c.into(),
                    open: false,
                }],
                None,
            )
        };
        assert_ne!(k("a", &chat("one")), k("a", &chat("two")));
        // With the model's token ids: the first KEY_TOKENS of them.
        let ids: Vec<u32> = (0..KEY_TOKENS as u32 + 5).collect();
        let mut other = ids.clone();
        *other.last_mut().unwrap() = 7;
        let p = text("");
        assert_eq!(
            affinity_key("a", &p, Some(&ids)),
            affinity_key("a", &p, Some(&other))
        );
        other[3] = 99;
        assert_ne!(
            affinity_key("a", &p, Some(&ids)),
            affinity_key("a", &p, Some(&other))
        );
    }

    #[test]
    fn excluded_unhealthy_and_ejected_workers_are_skipped() {
        let p = pool(3, 100);
        p.slots[0].set_healthy(false);
        let mut l = p.pick(1, &[1]).unwrap();
        assert_eq!(l.index, 2);
        // Two failures open worker 2's breaker.
        l.failure();
        drop(l);
        p.pick(1, &[0, 1]).unwrap().failure();
        assert_eq!(p.pick(1, &[1]).err(), Some(NoWorker::Unhealthy));
        assert_eq!(p.pick(1, &[]).unwrap().index, 1);
    }

    #[test]
    fn pick_is_constant_time_in_pool_size() {
        // A pool of 10,000 simulated workers: each pick touches a handful of slots.
        let p = pool(10_000, 4);
        let start = Instant::now();
        let leases: Vec<_> = (0..20_000).map(|_| p.pick(1, &[]).unwrap()).collect();
        assert_eq!(leases.len(), 20_000);
        // Generous bound (debug build, noisy machine): a scan per pick would be ~1000x slower.
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn freed_slots_go_to_the_least_served_waiting_tenant() {
        let p = Arc::new(pool(1, 1));
        let held = p.pick(1, &[]).unwrap();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut tasks = Vec::new();
        for (i, t) in ["a", "a", "a", "b"].into_iter().enumerate() {
            let (pc, order) = (p.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let who = room::Who {
                    tenant: t.into(),
                    weight: 1.0,
                    cost: 100.0,
                };
                let lease = pc
                    .pick_or_wait(1, &[], None, 16, until, &who)
                    .await
                    .unwrap();
                order.lock().unwrap().push(t);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(lease);
            }));
            // Joined in this order.
            while p.waiting() < i + 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        // The slot is still held: nothing is free to pick.
        assert_eq!(p.pick(1, &[]).err(), Some(NoWorker::Saturated));
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["a", "b", "a", "a"]);
        assert_eq!(p.waiting(), 0);
        assert!(p.idle(1.0));
    }
}
