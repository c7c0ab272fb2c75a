//! The Batch API (`[batches] enabled = true`, see [`crate::batch`]): `POST /v1/batches`
//! (a batch of an uploaded file's requests, run apart from any connection within its
//! 24-hour window), `GET /v1/batches` (pages, newest first), `GET /v1/batches/{id}` and
//! `POST /v1/batches/{id}/cancel`. A tenant sees only its own batches; any other id is a
//! 404.

use super::auth::ActingFor;
use super::error::ApiError;
use super::files::{answer, enabled, for_tenant, keep_for, list_json, listing, on_store};
use super::handlers::read_body;
use super::stored_responses::owner;
use crate::batch::input::Endpoint;
use crate::batch::store::{new_id, now_s, Listing};
use crate::batch::{BatchRow, BatchStore, Halt};
use crate::state::AppState;
use crate::tenants::Tenant;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The one completion window offered, and its length in seconds.
const WINDOW: (&str, i64) = ("24h", 24 * 3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    /// How long its output and error files are kept: `{"anchor": "created_at",
    /// "seconds": n}`.
    #[serde(default)]
    output_expires_after: Option<ExpiresAfter>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpiresAfter {
    anchor: String,
    seconds: i64,
}

/// A batch object as the API shows it.
fn batch_json(b: &BatchRow) -> Value {
    let metadata: Value = b
        .metadata
        .as_deref()
        .and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or(Value::Null);
    let errors = b
        .errors
        .as_deref()
        .and_then(|e| serde_json::from_str::<Value>(e).ok())
        .map(|data| json!({"object": "list", "data": data}));
    json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": errors,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at,
        "in_progress_at": b.in_progress_at,
        "expires_at": b.expires_at,
        "finalizing_at": b.finalizing_at,
        "completed_at": b.completed_at,
        "failed_at": b.failed_at,
        "expired_at": b.expired_at,
        "cancelling_at": b.cancelling_at,
        "cancelled_at": b.cancelled_at,
        "request_counts": {
            "total": b.total,
            "completed": b.completed,
            "failed": b.failed,
        },
        "metadata": metadata,
        "model": b.model,
        "usage": {
            "input_tokens": b.input_tokens,
            "input_tokens_details": {"cached_tokens": b.cached_tokens},
            "output_tokens": b.output_tokens,
            "output_tokens_details": {"reasoning_tokens": b.reasoning_tokens},
            "total_tokens": b.input_tokens + b.output_tokens,
        },
    })
}

/// The request read, or a 400 naming the field at fault.
fn read_request(body: &[u8]) -> Result<CreateBatch, ApiError> {
    let req: CreateBatch = super::validate::typed(body)?;
    if Endpoint::parse(&req.endpoint).is_none() {
        let known: Vec<&str> = Endpoint::ALL.iter().map(|e| e.path()).collect();
        return Err(ApiError::BadRequest {
            message: format!(
                "`endpoint` {:?} is not one a batch runs here ({}).",
                req.endpoint,
                known.join(", ")
            ),
            param: Some("endpoint".into()),
            code: Some("unsupported_parameter"),
        });
    }
    if req.completion_window != WINDOW.0 {
        return Err(ApiError::bad(
            format!(
                "`completion_window` must be \"{}\", got {:?}.",
                WINDOW.0, req.completion_window
            ),
            Some("completion_window".into()),
        ));
    }
    if let Some(m) = &req.metadata {
        let fits = m.len() <= 16
            && m.iter().all(|(k, v)| {
                k.chars().count() <= 64 && v.as_str().is_some_and(|v| v.chars().count() <= 512)
            });
        if !fits {
            return Err(ApiError::bad(
                "`metadata` holds at most 16 pairs of a key (at most 64 characters) and a string value (at most 512).",
                Some("metadata".into()),
            ));
        }
    }
    Ok(req)
}

/// `POST /v1/batches`.
pub async fn create(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let owner = owner(&tenant, &acting.map(|a| a.0));
    let done = async {
        let batches = enabled(&state)?;
        let req = read_request(&read_body(&state, body)?)?;
        let keep = match &req.output_expires_after {
            None => None,
            Some(e) => keep_for(
                "output_expires_after",
                Some(&e.anchor),
                Some(&e.seconds.to_string()),
            )?,
        };
        let (who, file) = (owner.clone(), req.input_file_id.clone());
        let input = on_store(batches, move |s| s.file(&who, &file)).await?;
        match input {
            Some(f) if f.purpose == "batch" => {}
            Some(f) => {
                return Err(ApiError::bad(
                    format!(
                        "The file `{}` was uploaded for {:?}; a batch reads a file uploaded with `purpose` \"batch\".",
                        f.id, f.purpose
                    ),
                    Some("input_file_id".into()),
                ))
            }
            None => {
                return Err(ApiError::NotFound(format!(
                    "no file with id `{}`",
                    req.input_file_id
                )))
            }
        }
        let now = now_s();
        let row = BatchRow {
            id: new_id("batch_"),
            tenant: owner,
            created_at: now,
            endpoint: req.endpoint,
            input_file_id: req.input_file_id,
            completion_window: req.completion_window,
            status: "validating".into(),
            metadata: req.metadata.map(|m| Value::Object(m).to_string()),
            output_keep_s: keep,
            expires_at: now + WINDOW.1,
            ..BatchRow::default()
        };
        let stored = row.clone();
        on_store(batches, move |s| s.create_batch(&stored)).await?;
        tracing::info!(batch = %row.id, "batch created");
        crate::batch::runner::spawn(&state, row.clone());
        Ok(Json(batch_json(&row)).into_response())
    }
    .await;
    answer(&tenant, done)
}

fn no_batch(id: &str) -> ApiError {
    ApiError::NotFound(format!("no batch with id `{id}`"))
}

/// `GET /v1/batches/{id}`.
pub async fn get(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Path(id): Path<String>,
) -> Response {
    let key = id.clone();
    let op = move |s: &BatchStore, owner: &str| s.batch(owner, &key);
    for_tenant(&state, &tenant, acting, op, |row| {
        Ok(Json(batch_json(&row.ok_or_else(|| no_batch(&id))?)).into_response())
    })
    .await
}

/// `GET /v1/batches`.
pub async fn list(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    RawQuery(query): RawQuery,
) -> Response {
    let owner = owner(&tenant, &acting.map(|a| a.0));
    let done = async {
        let batches = enabled(&state)?;
        let (after, limit, _, _) = listing(query.as_deref(), 20, 100, false)?;
        let (rows, more) = on_store(batches, move |s| {
            let page = Listing {
                after: after.as_deref(),
                limit,
                oldest_first: false,
                purpose: None,
            };
            s.batches(&owner, &page)
        })
        .await?;
        let data = rows.iter().map(batch_json).collect();
        Ok(Json(list_json(data, more)).into_response())
    }
    .await;
    answer(&tenant, done)
}

/// `POST /v1/batches/{id}/cancel`: a batch that has not ended stops sending requests
/// (`cancelling`; those in flight end and are kept), then ends `cancelled` with what it
/// did. A batch that has ended is a 400.
pub async fn cancel(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Path(id): Path<String>,
) -> Response {
    let key = id.clone();
    let op = move |s: &BatchStore, owner: &str| s.cancel(owner, &key);
    let batches = state.batches.clone();
    for_tenant(&state, &tenant, acting, op, |row| {
        let row = row.ok_or_else(|| no_batch(&id))?;
        match row.status.as_str() {
            "cancelling" => {
                if let Some(b) = &batches {
                    b.halt(&row.id, Halt::Cancel);
                }
            }
            "cancelled" | "finalizing" => {}
            other => {
                return Err(ApiError::BadRequest {
                    message: format!(
                        "The batch `{id}` is {other}: only a batch that has not ended can be cancelled."
                    ),
                    param: None,
                    code: Some("invalid_state"),
                })
            }
        }
        Ok(Json(batch_json(&row)).into_response())
    })
    .await
}
