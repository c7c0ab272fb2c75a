//! Tenant authentication layer: `Authorization: Bearer KEY` → [`Tenant`](crate::tenants::Tenant) in the request's
//! extensions, or a 401 in the OpenAI shape. The key itself is never logged.

use super::error::ApiError;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// The tenant a trusted gateway says a request is for (`x-tollgate-tenant`), and its
/// weight (`x-tollgate-weight`).
#[derive(Clone, Debug)]
pub struct ActingFor {
    pub tenant: Arc<str>,
    pub weight: Option<f64>,
}

fn acting_for(headers: &http::HeaderMap) -> Option<ActingFor> {
    let t = headers.get("x-tollgate-tenant")?.to_str().ok()?;
    if t.is_empty() || t.len() > 128 || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    let weight = headers
        .get("x-tollgate-weight")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|w| w.is_finite() && *w > 0.0);
    Some(ActingFor {
        tenant: t.into(),
        weight,
    })
}

pub async fn require_tenant(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let key = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty());
    let Some(key) = key else {
        state.metrics.auth_failure();
        return ApiError::Unauthorized(
            "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.",
        )
        .into_response();
    };
    let found = state.live().tenants.authenticate(key);
    match found {
        Some(tenant) => {
            let on_behalf = tenant
                .cfg
                .trusted
                .then(|| acting_for(req.headers()))
                .flatten();
            let shown = on_behalf.as_ref().map_or(&*tenant.id, |a| &*a.tenant);
            tracing::Span::current().record("tenant", shown);
            if let Some(a) = on_behalf {
                req.extensions_mut().insert(a);
            }
            req.extensions_mut().insert(tenant);
            next.run(req).await
        }
        None => {
            state.metrics.auth_failure();
            tracing::info!("refused: unknown API key");
            ApiError::Unauthorized("Incorrect API key provided.").into_response()
        }
    }
}
