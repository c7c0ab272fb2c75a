//! The state every request shares: config, tenants, router, metrics.

use crate::config::Config;
use crate::metrics::Metrics;
use crate::route::Router;
use crate::tenants::Tenants;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub struct Shared {
    pub config: Config,
    pub tenants: Tenants,
    pub router: Router,
    pub metrics: Arc<Metrics>,
    /// Set once shutdown began: `/ready` answers 503.
    pub draining: AtomicBool,
}

pub type AppState = Arc<Shared>;

impl Shared {
    pub fn new(config: Config) -> Result<AppState, String> {
        Ok(Arc::new(Self {
            tenants: Tenants::from_config(&config),
            router: Router::from_config(&config)?,
            metrics: Arc::new(Metrics::new()),
            draining: AtomicBool::new(false),
            config,
        }))
    }
}
