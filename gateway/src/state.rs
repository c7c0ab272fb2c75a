//! The state every request shares: the live config (swapped whole on reload), the router,
//! the limiter, metrics and the usage ledger.

use crate::config::{Config, ServerConfig};
use crate::limits::Limiter;
use crate::meter::Ledger;
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::response_store::ResponseStore;
use crate::route::Router;
use crate::tenants::Tenants;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// What a reload replaces, as one unit: a request sees one generation or the next, never
/// a mix.
pub struct Live {
    pub config: Config,
    pub tenants: Tenants,
    /// Per model: (output_weight, cached_input_weight).
    weights: HashMap<String, (f64, f64)>,
    /// Per model with any: its chat template's default variables.
    template_defaults: HashMap<String, Arc<serde_json::Map<String, serde_json::Value>>>,
    /// Counts applied configs: 1 at start.
    pub generation: u64,
}

impl Live {
    pub fn new(config: Config, limiter: &Limiter, generation: u64) -> Self {
        let weights = config
            .models
            .iter()
            .map(|m| (m.id.clone(), (m.output_weight, m.cached_input_weight)))
            .collect();
        let template_defaults = config
            .models
            .iter()
            .filter_map(|m| {
                let args = m.chat_template_kwargs.clone()?;
                Some((m.id.clone(), Arc::new(args)))
            })
            .collect();
        Self {
            tenants: Tenants::from_config(&config, limiter),
            config,
            weights,
            template_defaults,
            generation,
        }
    }

    /// `model`'s chat template defaults (its `chat_template_kwargs`), where it has any.
    pub fn template_defaults(
        &self,
        model: &str,
    ) -> Option<&Arc<serde_json::Map<String, serde_json::Value>>> {
        self.template_defaults.get(model)
    }

    /// Weight of one output token of `model` in a tenant's token rate.
    pub fn output_weight(&self, model: &str) -> f64 {
        self.weights.get(model).map_or(3.0, |w| w.0)
    }

    /// Weight of one prompt token of `model` served from a worker's prefix cache.
    pub fn cached_input_weight(&self, model: &str) -> f64 {
        self.weights.get(model).map_or(1.0, |w| w.1)
    }
}

pub struct Shared {
    /// `[server]` as started (changing it needs a restart).
    pub server: ServerConfig,
    pub live: ArcSwap<Live>,
    pub router: Router,
    pub limiter: Limiter,
    pub metrics: Arc<Metrics>,
    /// The usage ledger (`None` with `metering.enabled = false`).
    pub ledger: Option<Ledger>,
    /// Stored answers of the Responses API (`None` unless `[responses] store = true`).
    pub responses: Option<Arc<ResponseStore>>,
    /// The Batch API's files and batches (`None` unless `[batches] enabled = true`).
    pub batches: Option<Arc<crate::batch::Batches>>,
    /// `metering.wait_for_commit`.
    pub metering_wait: bool,
    pub reloader: Reloader,
    /// Set once shutdown began: `/ready` answers 503.
    pub draining: AtomicBool,
}

pub type AppState = Arc<Shared>;

impl Shared {
    /// Builds the state; `path` is the config file (for reloads and relative paths).
    pub fn new(config: Config, path: Option<PathBuf>) -> Result<AppState, String> {
        let limiter = Limiter::new(&config);
        let ledger = if config.metering.enabled {
            let db = resolve_relative(path.as_deref(), &config.metering.path);
            Some(Ledger::start(&db, config.metering.synchronous).map_err(|e| e.to_string())?)
        } else {
            None
        };
        let responses = if config.responses.store {
            let db = resolve_relative(path.as_deref(), &config.responses.path);
            let keep =
                std::time::Duration::try_from_secs_f64(config.responses.retention_hours * 3600.0)
                    .map_err(|e| format!("responses.retention_hours: {e}"))?;
            let store = ResponseStore::open(&db, keep).map_err(|e| e.to_string())?;
            store.purge_hourly();
            Some(store)
        } else {
            None
        };
        let batches = if config.batches.enabled {
            let db = resolve_relative(path.as_deref(), &config.batches.path);
            let keep =
                std::time::Duration::try_from_secs_f64(config.batches.retention_hours * 3600.0)
                    .map_err(|e| format!("batches.retention_hours: {e}"))?;
            let store = crate::batch::BatchStore::open(&db, keep).map_err(|e| e.to_string())?;
            Some(Arc::new(crate::batch::Batches::new(store)?))
        } else {
            None
        };
        let metering_wait = config.metering.wait_for_commit;
        Ok(Arc::new(Self {
            server: config.server.clone(),
            router: Router::from_config(&config)?,
            live: ArcSwap::from_pointee(Live::new(config, &limiter, 1)),
            limiter,
            metrics: Arc::new(Metrics::new()),
            ledger,
            responses,
            batches,
            metering_wait,
            reloader: Reloader::new(path),
            draining: AtomicBool::new(false),
        }))
    }

    /// The live config generation.
    pub fn live(&self) -> arc_swap::Guard<Arc<Live>> {
        self.live.load()
    }
}

/// `p` as given if absolute, else relative to the config file's folder (or the working
/// directory without a file).
pub fn resolve_relative(config_path: Option<&std::path::Path>, p: &str) -> PathBuf {
    let p = std::path::Path::new(p);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match config_path.and_then(|c| c.parent()) {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
        _ => p.to_path_buf(),
    }
}
