//! Live config changes: the file watcher, SIGHUP and `POST /admin/reload` all land here.
//!
//! A reload reads the file, validates it whole, checks that it changes only what can
//! change live (tenants, their keys and contracts, models' `output_weight`,
//! `cached_input_weight` and `chat_template_kwargs`), and swaps the
//! new generation in atomically. Limiter scopes are updated in place, so bucket state and
//! in-flight counts survive: raised limits apply to the next request, lowered ones clamp
//! the bucket. Requests in flight keep the tenant they were admitted as (a removed tenant's
//! streams finish; its new requests get 401). A file that fails is rejected whole: the
//! running config stays, and the error goes to the log, the caller, and the
//! `tollgate_config_reloads_total{result="error"}` metric. Each applied change is written
//! to the audit log (memory, the log, and the ledger's `audit` table).

use crate::config::Config;
use crate::meter::{unix_ms, AuditEntry};
use crate::state::{AppState, Live};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// Audit entries kept in memory for `GET /admin/audit`.
const AUDIT_KEPT: usize = 1000;

pub struct Reloader {
    pub path: Option<PathBuf>,
    lock: tokio::sync::Mutex<()>,
    audit: Mutex<VecDeque<AuditEntry>>,
}

impl Reloader {
    pub fn new(path: Option<PathBuf>) -> Self {
        Self {
            path,
            lock: tokio::sync::Mutex::new(()),
            audit: Mutex::new(VecDeque::new()),
        }
    }

    /// The audit log since start, oldest first.
    pub fn audit(&self) -> Vec<AuditEntry> {
        self.audit
            .lock()
            .map(|a| a.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// What a successful reload changed.
#[derive(Debug, serde::Serialize)]
pub struct Applied {
    pub generation: u64,
    pub changes: Vec<String>,
}

/// The parts of a config that need a restart to change.
fn restart_only(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    if old.server != new.server {
        v.push("[server]");
    }
    if old.pools != new.pools {
        v.push("[[pools]]");
    }
    if old.limits != new.limits {
        v.push("[limits]");
    }
    if old.metering != new.metering {
        v.push("[metering]");
    }
    if old.responses != new.responses {
        v.push("[responses]");
    }
    let (a, b) = (&old.batches, &new.batches);
    if (a.enabled, &a.path, a.retention_hours) != (b.enabled, &b.path, b.retention_hours) {
        v.push("[batches] enabled, path or retention_hours");
    }
    let ids = |c: &Config| {
        c.models
            .iter()
            .map(|m| (m.id.clone(), m.source.clone()))
            .collect::<Vec<_>>()
    };
    if ids(old) != ids(new) {
        v.push("[[models]] (ids or sources)");
    }
    v
}

/// Human-readable changes from `old` to `new` (never key digests).
fn diff(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for t in &new.tenants {
        match old.tenants.iter().find(|o| o.id == t.id) {
            None => out.push(format!("tenant {} added", t.id)),
            Some(o) if o != t => {
                let mut fields = Vec::new();
                macro_rules! field {
                    ($f:ident) => {
                        if o.$f != t.$f {
                            fields.push(format!("{} {:?} -> {:?}", stringify!($f), o.$f, t.$f));
                        }
                    };
                }
                field!(tokens_per_second);
                field!(burst_seconds);
                field!(requests_per_minute);
                field!(max_concurrency);
                field!(tier);
                field!(overflow);
                field!(pool);
                field!(trusted);
                field!(max_stored_mib);
                field!(max_files_mib);
                field!(models);
                if o.keys_sha256 != t.keys_sha256 {
                    fields.push(format!(
                        "keys changed ({} -> {})",
                        o.keys_sha256.len(),
                        t.keys_sha256.len()
                    ));
                }
                out.push(format!("tenant {} changed: {}", t.id, fields.join(", ")));
            }
            Some(_) => {}
        }
    }
    for o in &old.tenants {
        if !new.tenants.iter().any(|t| t.id == o.id) {
            out.push(format!("tenant {} removed", o.id));
        }
    }
    for m in &new.models {
        if let Some(o) = old.models.iter().find(|o| o.id == m.id) {
            if o.output_weight != m.output_weight {
                out.push(format!(
                    "model {} output_weight {} -> {}",
                    m.id, o.output_weight, m.output_weight
                ));
            }
            if o.cached_input_weight != m.cached_input_weight {
                out.push(format!(
                    "model {} cached_input_weight {} -> {}",
                    m.id, o.cached_input_weight, m.cached_input_weight
                ));
            }
            if o.chat_template_kwargs != m.chat_template_kwargs {
                let show = |a: &Option<serde_json::Map<String, serde_json::Value>>| {
                    a.as_ref().map_or("none".to_string(), |a| {
                        serde_json::Value::from(a.clone()).to_string()
                    })
                };
                out.push(format!(
                    "model {} chat_template_kwargs {} -> {}",
                    m.id,
                    show(&o.chat_template_kwargs),
                    show(&m.chat_template_kwargs)
                ));
            }
        }
    }
    out
}

/// Reloads the config file. `actor` names who asked (audit log).
pub async fn reload(state: &AppState, actor: &str) -> Result<Applied, String> {
    let _one_at_a_time = state.reloader.lock.lock().await;
    let result = apply(state, actor);
    let label = if result.is_ok() { "ok" } else { "error" };
    state.metrics.reload(label);
    match &result {
        Ok(a) => tracing::info!(
            actor,
            generation = a.generation,
            changes = a.changes.len(),
            "config reloaded"
        ),
        Err(e) => {
            tracing::error!(actor, error = %e, "config reload rejected; the running config stays")
        }
    }
    result
}

fn apply(state: &AppState, actor: &str) -> Result<Applied, String> {
    let path = state
        .reloader
        .path
        .as_ref()
        .ok_or("this gateway runs the embedded default config: there is no file to reload")?;
    let new = Config::load(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let old = state.live();
    let fixed = restart_only(&old.config, &new);
    if !fixed.is_empty() {
        return Err(format!(
            "{}: {} changed; these need a restart (live: tenants, their keys and contracts, models' output_weight, cached_input_weight and chat_template_kwargs)",
            path.display(),
            fixed.join(", ")
        ));
    }
    let changes = diff(&old.config, &new);
    let generation = old.generation + 1;
    let live = Live::new(new, &state.limiter, generation);
    state.limiter.retain(&live.config);
    state.live.store(std::sync::Arc::new(live));
    let ts_ms = unix_ms();
    let entries: Vec<AuditEntry> = if changes.is_empty() {
        vec![AuditEntry {
            ts_ms,
            actor: actor.into(),
            action: "reload".into(),
            detail: format!("generation {generation}: no changes"),
        }]
    } else {
        changes
            .iter()
            .map(|c| AuditEntry {
                ts_ms,
                actor: actor.into(),
                action: "reload".into(),
                detail: format!("generation {generation}: {c}"),
            })
            .collect()
    };
    for e in entries {
        tracing::info!(target: "audit", actor = %e.actor, detail = %e.detail, "config change applied");
        if let Some(l) = &state.ledger {
            l.audit(e.clone());
        }
        if let Ok(mut a) = state.reloader.audit.lock() {
            if a.len() == AUDIT_KEPT {
                a.pop_front();
            }
            a.push_back(e);
        }
    }
    Ok(Applied {
        generation,
        changes,
    })
}

/// Reloads on SIGHUP and when the config file changes (watched through its folder, so
/// that editors that write a new file and rename it are seen too).
pub fn spawn_triggers(state: AppState) {
    let s = state.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("cannot install the SIGHUP handler");
            return;
        };
        while hup.recv().await.is_some() {
            let _ = reload(&s, "sighup").await;
        }
    });
    let Some(path) = state.reloader.path.clone() else {
        return;
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let file = path.file_name().map(|f| f.to_owned());
    let watched = path.clone();
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            let ours = ev
                .paths
                .iter()
                .any(|p| p.file_name().map(|f| f.to_owned()) == file);
            if ours && (ev.kind.is_modify() || ev.kind.is_create()) {
                let _ = tx.send(());
            }
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the config file; reload with SIGHUP or the admin API");
            return;
        }
    };
    let dir = watched
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.to_path_buf())
        .unwrap_or_else(|| PathBuf::from("."));
    use notify::Watcher;
    if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::error!(error = %e, dir = %dir.display(), "cannot watch the config folder");
        return;
    }
    tokio::spawn(async move {
        let _keep = watcher;
        while rx.recv().await.is_some() {
            // Let the writer finish (editors write in several steps), then reload once.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while rx.try_recv().is_ok() {}
            let _ = reload(&state, "file-watch").await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_settings_read_at_start_need_a_restart_and_the_rest_are_live() {
        let old = Config::from_toml(crate::config::DEFAULT_CONFIG).expect("the default");
        let with = |f: fn(&mut crate::config::BatchesConfig)| {
            let mut c = old.clone();
            f(&mut c.batches);
            restart_only(&old, &c)
        };
        let restart = ["[batches] enabled, path or retention_hours"];
        assert_eq!(with(|b| b.enabled = true), restart);
        assert_eq!(with(|b| b.path = "elsewhere.db".into()), restart);
        assert_eq!(with(|b| b.retention_hours = 1.0), restart);
        assert!(with(|b| b.concurrency = 2).is_empty());
        assert!(with(|b| b.max_file_mib = 1.0).is_empty());
        assert!(with(|b| b.max_stored_mib_per_tenant = 1.0).is_empty());
    }

    #[test]
    fn a_tenants_storage_quotas_are_named_in_the_log_of_changes() {
        let old = Config::from_toml(crate::config::DEFAULT_CONFIG).expect("the default");
        let mut new = old.clone();
        new.tenants[0].max_files_mib = Some(5.0);
        new.tenants[0].max_stored_mib = Some(1.0);
        let id = &new.tenants[0].id;
        assert_eq!(
            diff(&old, &new),
            [format!(
                "tenant {id} changed: max_stored_mib None -> Some(1.0), max_files_mib None -> Some(5.0)"
            )]
        );
        assert!(restart_only(&old, &new).is_empty());
    }

    /// A model's template defaults change live, named in the log of changes.
    #[test]
    fn a_models_template_defaults_change_live() {
        let old = Config::from_toml(crate::config::DEFAULT_CONFIG).expect("the default");
        let mut new = old.clone();
        let args = serde_json::json!({"enable_thinking": false});
        new.models[0].chat_template_kwargs = args.as_object().cloned();
        let id = &new.models[0].id;
        assert!(restart_only(&old, &new).is_empty());
        assert_eq!(
            diff(&old, &new),
            [format!(
                r#"model {id} chat_template_kwargs none -> {{"enable_thinking":false}}"#
            )]
        );
    }
}
