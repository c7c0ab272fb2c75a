//! Thin route handlers: read the body, validate, hand over to the pipeline.

use super::auth::ActingFor;
use super::error::ApiError;
use super::request_id::RequestId;
use super::types::{ModelCard, ModelList};
use super::validate::{self, InferenceRequest};
use crate::pipeline::{self, apart_if, RequestCtx};
use crate::state::AppState;
use crate::tenants::Tenant;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

type Validator = fn(&[u8], &crate::config::ServerConfig) -> Result<InferenceRequest, ApiError>;

async fn inference(
    state: AppState,
    tenant: Arc<Tenant>,
    acting: Option<ActingFor>,
    id: RequestId,
    body: Result<Bytes, BytesRejection>,
    validate: Validator,
) -> Response {
    let started = Instant::now();
    let parsed = match read_body(&state, body) {
        Ok(b) => validated(&state, b, validate).await,
        Err(e) => Err(e),
    };
    respond(state, tenant, acting, id, started, parsed).await
}

/// The body, or why it could not be read (413 past the limit).
pub(super) fn read_body(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|r| match r.status() {
        http::StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge {
            limit: state.server.max_body_bytes,
        },
        _ => ApiError::bad(format!("Could not read the request body: {r}"), None),
    })
}

/// Bodies of at least this many bytes are parsed and validated on the runtime's blocking
/// threads: a megabyte of JSON takes milliseconds to parse, which on a serving thread
/// would hold up its other connections (a hop to the blocking pool costs microseconds).
const VALIDATE_APART_BYTES: usize = 64 << 10;

/// Runs `validate` on `body`: off the runtime's threads where the body is large
/// ([`VALIDATE_APART_BYTES`]) or may carry a schema (its compilation, its patterns' DFAs,
/// takes up to tens of milliseconds).
pub(super) async fn validated<F>(
    state: &AppState,
    body: Bytes,
    validate: F,
) -> Result<InferenceRequest, ApiError>
where
    F: FnOnce(&[u8], &crate::config::ServerConfig) -> Result<InferenceRequest, ApiError>
        + Send
        + 'static,
{
    let apart = body.len() >= VALIDATE_APART_BYTES || may_carry_schema(&body);
    let st = state.clone();
    apart_if(apart, "reading the request", move || {
        validate(&body, &st.server)
    })
    .await?
}

/// Runs `parse` on `body` (a body's parsing and checks), on the runtime's blocking threads
/// where the body is large ([`VALIDATE_APART_BYTES`]).
pub(super) async fn parsed<T, F>(body: Bytes, parse: F) -> Result<T, ApiError>
where
    F: FnOnce(&[u8]) -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    let apart = body.len() >= VALIDATE_APART_BYTES;
    apart_if(apart, "reading the request", move || parse(&body)).await?
}

/// Serves a validated request through the pipeline, or answers why it is not valid.
pub(super) async fn respond(
    state: AppState,
    tenant: Arc<Tenant>,
    acting: Option<ActingFor>,
    id: RequestId,
    started: Instant,
    parsed: Result<InferenceRequest, ApiError>,
) -> Response {
    match parsed {
        Ok(req) => {
            let ctx = RequestCtx {
                request_id: id.0,
                tenant,
                acting,
                started,
                batch: false,
            };
            pipeline::serve(&state, ctx, req).await
        }
        Err(e) => {
            state.metrics.count(&tenant.id, "", e.status().as_str());
            tracing::info!(error = %e, "invalid request");
            with_limits(&tenant, e.into_response())
        }
    }
}

/// Whether a body may hold a JSON schema to compile (`response_format.json_schema`, or
/// `tools`' parameters).
fn may_carry_schema(body: &[u8]) -> bool {
    let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    has(b"\"json_schema\"") || has(b"\"tools\"")
}

/// Adds the tenant's rate-limit headers (its default scope) to a response.
pub(super) fn with_limits(tenant: &Tenant, mut resp: Response) -> Response {
    let (contract, scope) = (&tenant.limits.default.0, &tenant.limits.default.1);
    crate::limits::headers::apply(resp.headers_mut(), contract, &scope.snapshot(contract));
    resp
}

/// An inference endpoint: which validator reads its body (the response shape follows
/// from the request it makes).
pub trait Inference {
    const VALIDATE: Validator;
}

/// `POST /v1/chat/completions`.
pub struct Chat;
/// `POST /v1/completions`.
pub struct Completions;
/// `POST /v1/embeddings`.
pub struct Embeddings;

impl Inference for Chat {
    const VALIDATE: Validator = validate::chat;
}
impl Inference for Completions {
    const VALIDATE: Validator = validate::completion;
}
impl Inference for Embeddings {
    const VALIDATE: Validator = super::embeddings::validate;
}

/// The handler of inference endpoint `E`.
pub async fn infer<E: Inference>(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Extension(id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    inference(state, tenant, acting.map(|a| a.0), id, body, E::VALIDATE).await
}

/// The models this tenant can reach, as the API lists them.
fn reachable(state: &AppState, tenant: &Tenant) -> Vec<ModelCard> {
    state
        .live()
        .config
        .models
        .iter()
        .filter(|m| {
            state
                .router
                .pool_for(&m.id, tenant.cfg.pool.as_deref())
                .is_some()
        })
        .map(|m| ModelCard {
            id: m.id.clone(),
            object: "model",
            created: 0,
            owned_by: "tollgate",
        })
        .collect()
}

/// `GET /v1/models`: the models this tenant can reach.
pub async fn models(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
) -> Response {
    let data = reachable(&state, &tenant);
    let resp = Json(ModelList {
        object: "list",
        data,
    })
    .into_response();
    with_limits(&tenant, resp)
}

/// `GET /v1/models/{model}`: one of them (404 for any other, reachable by others or not).
pub async fn model(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    Path(id): Path<String>,
) -> Response {
    let resp = match reachable(&state, &tenant).into_iter().find(|m| m.id == id) {
        Some(card) => Json(card).into_response(),
        None => ApiError::ModelNotFound(id).into_response(),
    };
    with_limits(&tenant, resp)
}

/// Liveness: the process serves HTTP.
pub async fn health() -> &'static str {
    "ok\n"
}

/// Readiness: not draining, and every pool has a routable worker.
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        return (http::StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    for pool in &state.router.pools {
        if !pool.slots.iter().any(|s| s.healthy()) {
            let msg = format!("pool {} has no healthy worker\n", pool.name);
            return (http::StatusCode::SERVICE_UNAVAILABLE, msg).into_response();
        }
    }
    "ready\n".into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(&state),
    )
        .into_response()
}

pub async fn not_found(uri: http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}
