//! Tenants and API-key authentication.
//!
//! The config holds only SHA-256 digests of keys. A presented key is hashed, the digest
//! finds its candidate tenant, and the digests are then compared in constant time
//! (`subtle`). Timing can at most reveal digest prefixes, which say nothing about a key.
//! Keys are never logged.

use crate::config::keys::{self, KeyDigest};
use crate::config::{Config, TenantConfig};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// A tenant as the request path sees it.
pub struct Tenant {
    pub id: Arc<str>,
    pub cfg: TenantConfig,
    in_flight: AtomicU32,
}

/// Holds one of a tenant's concurrency slots until dropped.
pub struct TenantSlot(Arc<Tenant>);

impl Drop for TenantSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Tenant {
    /// Takes a concurrency slot, or `None` when the tenant is at `max_concurrency`.
    pub fn try_acquire(self: &Arc<Self>) -> Option<TenantSlot> {
        let cap = self.cfg.max_concurrency.unwrap_or(u32::MAX);
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| TenantSlot(self.clone()))
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Key digest → tenant.
pub struct Tenants {
    by_digest: HashMap<KeyDigest, Arc<Tenant>>,
}

impl Tenants {
    pub fn from_config(cfg: &Config) -> Self {
        let mut by_digest = HashMap::new();
        for t in &cfg.tenants {
            let tenant = Arc::new(Tenant {
                id: t.id.as_str().into(),
                cfg: t.clone(),
                in_flight: AtomicU32::new(0),
            });
            for k in &t.keys_sha256 {
                // Validated by Config::from_toml.
                if let Ok(d) = keys::parse_digest(k) {
                    by_digest.insert(d, tenant.clone());
                }
            }
        }
        Self { by_digest }
    }

    /// The tenant that owns `key`, if any.
    pub fn authenticate(&self, key: &str) -> Option<Arc<Tenant>> {
        let presented = keys::digest(key);
        let (stored, tenant) = self.by_digest.get_key_value(&presented)?;
        bool::from(stored.ct_eq(&presented)).then(|| tenant.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_key_authenticates_and_others_do_not() {
        let t = Tenants::from_config(&Config::embedded_default().unwrap());
        assert_eq!(&*t.authenticate("sk-tollgate-demo").unwrap().id, "demo");
        assert!(t.authenticate("sk-tollgate-dem").is_none());
        assert!(t.authenticate("").is_none());
    }

    #[test]
    fn concurrency_slots() {
        let mut cfg = Config::embedded_default().unwrap();
        cfg.tenants[0].max_concurrency = Some(2);
        let t = Tenants::from_config(&cfg)
            .authenticate("sk-tollgate-demo")
            .unwrap();
        let a = t.try_acquire().unwrap();
        let _b = t.try_acquire().unwrap();
        assert!(t.try_acquire().is_none());
        drop(a);
        assert!(t.try_acquire().is_some());
    }
}
