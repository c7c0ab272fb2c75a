//! The admin API, on its own listener (`server.admin_listen`, loopback by default) and with
//! its own token (`Authorization: Bearer TOKEN`, checked against
//! `server.admin_token_sha256` in constant time):
//!
//! - `GET /admin/contracts`: each tenant's effective contracts (per-model overrides resolved)
//! - `GET /admin/usage`: live usage per tenant scope (in flight, admitted, refused, charged
//!   weighted tokens, what remains in the buckets)
//! - `POST /admin/reload`: reload the config file (200 with the changes, 400 with why not)
//! - `GET /admin/audit`: every config change applied since start
//! - `GET /admin/stored`: what each tenant has in the response store (answers,
//!   conversations, bytes); `DELETE /admin/stored/{tenant}`: all of it deleted (a tenant
//!   that leaves), its background responses stopped
//! - `GET /admin/batches`: what each tenant keeps of the Batch API (files, their bytes,
//!   batches, those running); `DELETE /admin/batches/{tenant}`: all of it deleted, its
//!   running batches stopped

use super::error::ApiError;
use super::stored_responses::{on_store, quota};
use crate::config::keys;
use crate::state::AppState;
use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/admin/contracts", get(contracts))
        .route("/admin/usage", get(usage))
        .route("/admin/reload", post(reload))
        .route("/admin/audit", get(audit))
        .route("/admin/stored", get(stored))
        .route(
            "/admin/stored/{tenant}",
            axum::routing::delete(delete_stored),
        )
        .route("/admin/batches", get(batches))
        .route(
            "/admin/batches/{tenant}",
            axum::routing::delete(delete_batches),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin))
        .fallback(|uri: http::Uri| async move {
            ApiError::NotFound(format!("no admin route for {}", uri.path()))
        })
        .with_state(state)
}

async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|k| keys::digest(k.trim()));
    let expected = state
        .server
        .admin_token_sha256
        .as_deref()
        .and_then(|d| keys::parse_digest(d).ok());
    match (presented, expected) {
        (Some(p), Some(e)) if bool::from(p.ct_eq(&e)) => next.run(req).await,
        _ => {
            tracing::warn!("admin API: refused a request without the admin token");
            ApiError::Unauthorized("The admin API needs the admin token.").into_response()
        }
    }
}

async fn contracts(State(state): State<AppState>) -> Json<serde_json::Value> {
    let live = state.live();
    let mut tenants: Vec<_> = live
        .tenants
        .iter()
        .map(|t| {
            let models: serde_json::Map<String, serde_json::Value> = t
                .limits
                .per_model
                .iter()
                .map(|(m, c, _)| (m.clone(), json!(c)))
                .collect();
            json!({
                "id": &*t.id,
                "pool": t.cfg.pool,
                "contract": t.limits.default.0,
                "models": models,
            })
        })
        .collect();
    tenants.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    let weights: serde_json::Map<String, serde_json::Value> = live
        .config
        .models
        .iter()
        .map(|m| (m.id.clone(), json!(m.output_weight)))
        .collect();
    Json(json!({
        "generation": live.generation,
        "output_weights": weights,
        "tenants": tenants,
    }))
}

async fn usage(State(state): State<AppState>) -> Json<serde_json::Value> {
    let live = state.live();
    let mut rows: Vec<_> = state
        .limiter
        .scopes()
        .into_iter()
        .filter_map(|scope| {
            let t = live.tenants.get(&scope.tenant)?;
            let c = match &scope.model {
                Some(m) => t.limits.for_model(m).0,
                None => &t.limits.default.0,
            };
            Some(scope.usage(c))
        })
        .collect();
    rows.sort_by(|a, b| (&a.tenant, &a.model).cmp(&(&b.tenant, &b.model)));
    Json(json!({ "scopes": rows }))
}

async fn reload(State(state): State<AppState>) -> Response {
    match crate::reload::reload(&state, "admin-api").await {
        Ok(applied) => Json(applied).into_response(),
        Err(e) => ApiError::bad(
            format!("reload rejected; the running config stays: {e}"),
            None,
        )
        .into_response(),
    }
}

async fn audit(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "entries": state.reloader.audit() }))
}

/// The response store, or a 404 saying the gateway stores nothing.
fn store(
    state: &AppState,
) -> Result<std::sync::Arc<crate::response_store::ResponseStore>, ApiError> {
    state
        .responses
        .clone()
        .ok_or_else(|| ApiError::NotFound("stored responses (this gateway stores none)".into()))
}

async fn stored(State(state): State<AppState>) -> Response {
    let summary = async { on_store(&store(&state)?, |s| s.summary()).await }.await;
    with_quotas(&state, summary, |t| &t.tenant, |_, c| quota(&state, c))
}

/// The tenants' summaries, each with `quota_bytes`: `quota` of its tenant where that is a
/// tenant of the config now (else `null`); or the error.
fn with_quotas<T: serde::Serialize>(
    state: &AppState,
    summary: Result<Vec<T>, ApiError>,
    tenant: impl Fn(&T) -> &str,
    quota: impl Fn(&crate::config::Config, &crate::tenants::Tenant) -> u64,
) -> Response {
    let tenants = match summary {
        Ok(tenants) => tenants,
        Err(e) => return e.into_response(),
    };
    let live = state.live();
    let tenants: Vec<Value> = tenants
        .iter()
        .map(|t| {
            let q = live.tenants.get(tenant(t)).map(|c| quota(&live.config, c));
            let mut v = json!(t);
            v["quota_bytes"] = json!(q);
            v
        })
        .collect();
    Json(json!({ "tenants": tenants })).into_response()
}

async fn delete_stored(State(state): State<AppState>, Path(tenant): Path<String>) -> Response {
    let deleted = async {
        let store = store(&state)?;
        // Its background responses first (each stops and is stored cancelled), then all.
        let running = store.running_of(&tenant);
        for (owner, id) in &running {
            super::background::cancel(&store, owner, id).await?;
        }
        let who = tenant.clone();
        let (answers, conversations) = on_store(&store, move |s| s.delete_tenant(&who)).await?;
        tracing::warn!(
            target: "audit",
            tenant = %tenant,
            answers,
            conversations,
            stopped = running.len(),
            "a tenant's stored responses and conversations deleted (admin API)"
        );
        Ok::<_, ApiError>(json!({
            "tenant": tenant,
            "deleted": {"answers": answers, "conversations": conversations},
            "stopped": running.len(),
        }))
    }
    .await;
    match deleted {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /admin/batches`.
async fn batches(State(state): State<AppState>) -> Response {
    let summary = async {
        let b = super::files::enabled(&state)?;
        super::files::on_store(b, |s| s.summary()).await
    }
    .await;
    with_quotas(&state, summary, |t| &t.tenant, super::files::files_quota)
}

/// `DELETE /admin/batches/{tenant}`: its files, batches and their results deleted; its
/// running batches stop (what they finish meanwhile is not kept).
async fn delete_batches(State(state): State<AppState>, Path(tenant): Path<String>) -> Response {
    let deleted = async {
        let b = super::files::enabled(&state)?;
        let who = tenant.clone();
        let (files, batches, running) =
            super::files::on_store(b, move |s| s.delete_tenant(&who)).await?;
        for id in &running {
            b.halt(id, crate::batch::Halt::Cancel);
        }
        tracing::warn!(
            target: "audit",
            tenant = %tenant,
            files,
            batches,
            stopped = running.len(),
            "a tenant's files and batches deleted (admin API)"
        );
        Ok::<_, ApiError>(json!({
            "tenant": tenant,
            "deleted": {"files": files, "batches": batches},
            "stopped": running.len(),
        }))
    }
    .await;
    match deleted {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
