//! Tenant authentication layer: `Authorization: Bearer KEY` → [`Tenant`] in the request's
//! extensions, or a 401 in the OpenAI shape. The key itself is never logged.

use super::error::ApiError;
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

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
    match state.tenants.authenticate(key) {
        Some(tenant) => {
            tracing::Span::current().record("tenant", &*tenant.id);
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
