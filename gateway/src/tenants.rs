//! Tenants and API-key authentication.
//!
//! The config holds only SHA-256 digests of keys. A presented key is hashed, the digest
//! finds its candidate tenant, and the digests are then compared in constant time
//! (`subtle`). Timing can at most reveal digest prefixes, which say nothing about a key.
//! Keys are never logged. Each tenant carries its contracts, resolved against the
//! limiter's live scopes (which outlive config reloads).

use crate::config::keys::{self, KeyDigest};
use crate::config::{Config, TenantConfig};
use crate::limits::{Limiter, TenantLimits};
use std::collections::HashMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// A tenant as the request path sees it (one config generation's view).
pub struct Tenant {
    pub id: Arc<str>,
    pub cfg: TenantConfig,
    pub limits: TenantLimits,
}

/// Key digest → tenant.
pub struct Tenants {
    by_digest: HashMap<KeyDigest, Arc<Tenant>>,
    by_id: HashMap<String, Arc<Tenant>>,
}

impl Tenants {
    pub fn from_config(cfg: &Config, limiter: &Limiter) -> Self {
        let mut by_digest = HashMap::new();
        let mut by_id = HashMap::new();
        for t in &cfg.tenants {
            let tenant = Arc::new(Tenant {
                id: t.id.as_str().into(),
                cfg: t.clone(),
                limits: limiter.tenant(t),
            });
            for k in &t.keys_sha256 {
                // Validated by Config::from_toml.
                if let Ok(d) = keys::parse_digest(k) {
                    by_digest.insert(d, tenant.clone());
                }
            }
            by_id.insert(t.id.clone(), tenant);
        }
        Self { by_digest, by_id }
    }

    /// The tenant that owns `key`, if any.
    pub fn authenticate(&self, key: &str) -> Option<Arc<Tenant>> {
        let presented = keys::digest(key);
        let (stored, tenant) = self.by_digest.get_key_value(&presented)?;
        bool::from(stored.ct_eq(&presented)).then(|| tenant.clone())
    }

    pub fn get(&self, id: &str) -> Option<&Arc<Tenant>> {
        self.by_id.get(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.by_id.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_key_authenticates_and_others_do_not() {
        let cfg = Config::embedded_default().unwrap();
        let t = Tenants::from_config(&cfg, &Limiter::local());
        assert_eq!(&*t.authenticate("sk-tollgate-demo").unwrap().id, "demo");
        assert!(t.authenticate("sk-tollgate-dem").is_none());
        assert!(t.authenticate("").is_none());
    }

    #[test]
    fn concurrency_slots() {
        let mut cfg = Config::embedded_default().unwrap();
        cfg.tenants[0].max_concurrency = Some(2);
        let t = Tenants::from_config(&cfg, &Limiter::local())
            .authenticate("sk-tollgate-demo")
            .unwrap();
        let (c, scope) = t.limits.for_model("any");
        let a = scope.try_acquire(c.max_concurrency).unwrap();
        let _b = scope.try_acquire(c.max_concurrency).unwrap();
        assert!(scope.try_acquire(c.max_concurrency).is_none());
        drop(a);
        assert!(scope.try_acquire(c.max_concurrency).is_some());
    }
}
