//! The HTTP surface: the tenant API (`/v1/...`, behind auth), and the operational endpoints
//! (`/health`, `/ready`, `/metrics`). Cross-cutting concerns are layers: request id and
//! tracing span ([`request_id`]), tenant authentication ([`auth`]), body limit.

pub mod admin;
pub mod auth;
pub mod background;
mod batches;
mod conversations;
pub mod embeddings;
pub mod error;
pub mod event_log;
mod files;
pub mod guided;
mod handlers;
pub(crate) mod input_items;
mod item_reference;
pub mod prompt_logprobs;
pub mod render;
mod render_responses;
pub mod request_id;
pub mod responses;
pub(crate) mod stored_responses;
pub mod tools;
pub mod types;
pub mod validate;

use crate::state::AppState;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;

/// The gateway's whole HTTP application.
pub fn app(state: AppState) -> Router {
    let v1 = Router::new()
        .route(
            "/v1/chat/completions",
            post(handlers::infer::<handlers::Chat>),
        )
        .route(
            "/v1/completions",
            post(handlers::infer::<handlers::Completions>),
        )
        .route(
            "/v1/embeddings",
            post(handlers::infer::<handlers::Embeddings>),
        )
        .route("/v1/responses", post(stored_responses::create))
        .route(
            "/v1/responses/{id}",
            get(stored_responses::get).delete(stored_responses::delete),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(stored_responses::input_items),
        )
        .route("/v1/responses/{id}/cancel", post(stored_responses::cancel))
        .route(
            "/v1/responses/input_tokens",
            post(stored_responses::input_tokens),
        )
        .route("/v1/conversations", post(conversations::create))
        .route(
            "/v1/conversations/{id}",
            get(conversations::get)
                .post(conversations::update)
                .delete(conversations::delete),
        )
        .route(
            "/v1/conversations/{id}/items",
            get(conversations::list_items).post(conversations::add_items),
        )
        .route(
            "/v1/conversations/{id}/items/{item}",
            get(conversations::get_item).delete(conversations::delete_item),
        )
        .route(
            "/v1/files",
            post(files::upload)
                .layer(DefaultBodyLimit::disable())
                .get(files::list),
        )
        .route("/v1/files/{id}", get(files::get).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/batches", post(batches::create).get(batches::list))
        .route("/v1/batches/{id}", get(batches::get))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route("/v1/models", get(handlers::models))
        .route("/v1/models/{*model}", get(handlers::model))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_tenant,
        ));
    Router::new()
        .merge(v1)
        .route("/health", get(handlers::health))
        .route("/ready", get(handlers::ready))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(state.server.max_body_bytes))
        .layer(middleware::from_fn(request_id::layer))
        .with_state(state)
}
