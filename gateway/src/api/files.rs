//! The Files API (`[batches] enabled = true`, see [`crate::batch`]): `POST /v1/files`
//! (multipart: `file`, `purpose` and optionally `expires_after[anchor]` and
//! `expires_after[seconds]`; the file read as it arrives and refused past `max_file_mib`),
//! `GET /v1/files` (pages, newest first), `GET`/`DELETE /v1/files/{id}` and
//! `GET /v1/files/{id}/content`. A batch's output and error files are files too (purpose
//! `batch_output`). A tenant sees only its own files; any other id is a 404.

use super::auth::ActingFor;
use super::error::ApiError;
use super::handlers::with_limits;
use super::stored_responses::owner;
use crate::batch::store::Listing;
use crate::batch::{BatchStore, BatchStoreError, Batches, FileRow};
use crate::state::AppState;
use crate::tenants::Tenant;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};
use std::sync::Arc;

/// The purposes a file may be uploaded for: `batch` (a batch's input, checked as JSON
/// Lines) and `user_data` (kept as it is).
const PURPOSES: [&str; 2] = ["batch", "user_data"];

/// The Batch API's state, or the 404 of a gateway that keeps no files.
pub(super) fn enabled(state: &AppState) -> Result<&Arc<Batches>, ApiError> {
    state.batches.as_ref().ok_or_else(|| {
        ApiError::NotFound(
            "files and batches (this gateway keeps none: [batches] enabled = false)".into(),
        )
    })
}

/// Runs `f` on the store from the blocking pool.
pub(super) async fn on_store<T: Send + 'static>(
    batches: &Arc<Batches>,
    f: impl FnOnce(&BatchStore) -> Result<T, BatchStoreError> + Send + 'static,
) -> Result<T, ApiError> {
    batches
        .on_store(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// A file object as the API shows it.
pub(super) fn file_json(f: &FileRow) -> Value {
    json!({
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "expires_at": f.expires_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": null,
    })
}

/// A page of a list as the API shows it.
pub(super) fn list_json(data: Vec<Value>, more: bool) -> Value {
    let id = |v: Option<&Value>| v.and_then(|v| v["id"].as_str()).map(str::to_string);
    json!({
        "object": "list",
        "first_id": id(data.first()),
        "last_id": id(data.last()),
        "has_more": more,
        "data": data,
    })
}

/// A list's query (`after`, `limit` from 1 to `max_limit`, and where `files`: `order`
/// and `purpose`), or a 400 naming the parameter at fault.
pub(super) fn listing(
    query: Option<&str>,
    default_limit: usize,
    max_limit: usize,
    files: bool,
) -> Result<(Option<String>, usize, bool, Option<String>), ApiError> {
    let (mut after, mut limit, mut oldest_first, mut purpose) = (None, default_limit, false, None);
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "after" => after = Some(v.into_owned()),
            "limit" => {
                limit = match v.parse::<usize>() {
                    Ok(n) if (1..=max_limit).contains(&n) => n,
                    _ => {
                        return Err(ApiError::bad(
                            format!("`limit` must be an integer from 1 to {max_limit}, got {v:?}."),
                            Some("limit".into()),
                        ))
                    }
                }
            }
            "order" if files => {
                oldest_first = match &*v {
                    "desc" => false,
                    "asc" => true,
                    _ => {
                        return Err(ApiError::bad(
                            format!("`order` must be \"asc\" or \"desc\", got {v:?}."),
                            Some("order".into()),
                        ))
                    }
                }
            }
            "purpose" if files => purpose = Some(v.into_owned()),
            other => return Err(ApiError::unknown(other)),
        }
    }
    Ok((after, limit, oldest_first, purpose))
}

/// The bytes `tenant`'s files may take: its `max_files_mib`, else `[batches]
/// max_stored_mib_per_tenant`.
pub(super) fn files_quota(config: &crate::config::Config, tenant: &Tenant) -> u64 {
    let mib = tenant
        .cfg
        .max_files_mib
        .unwrap_or(config.batches.max_stored_mib_per_tenant);
    (mib * 1024.0 * 1024.0) as u64
}

/// Answers with `done`'s value, or its error; the tenant's rate-limit headers added.
pub(super) fn answer(tenant: &Tenant, done: Result<Response, ApiError>) -> Response {
    with_limits(tenant, done.unwrap_or_else(IntoResponse::into_response))
}

/// Runs `op` on the store (from the blocking pool) for the tenant a request acts for, and
/// answers with `ok` of what it found, or with the error; the tenant's rate-limit headers
/// added.
pub(super) async fn for_tenant<T: Send + 'static>(
    state: &AppState,
    tenant: &Tenant,
    acting: Option<Extension<ActingFor>>,
    op: impl FnOnce(&BatchStore, &str) -> Result<T, BatchStoreError> + Send + 'static,
    ok: impl FnOnce(T) -> Result<Response, ApiError>,
) -> Response {
    let owner = owner(tenant, &acting.map(|a| a.0));
    let done = async {
        let batches = enabled(state)?;
        ok(on_store(batches, move |s| op(s, &owner)).await?)
    }
    .await;
    answer(tenant, done)
}

/// `POST /v1/files`.
pub async fn upload(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    form: Result<Multipart, MultipartRejection>,
) -> Response {
    let owner = owner(&tenant, &acting.map(|a| a.0));
    let done = async {
        let batches = enabled(&state)?;
        let form = form.map_err(|e| {
            ApiError::bad(
                format!("A file is uploaded as multipart/form-data with the fields `file` and `purpose`: {e}"),
                None,
            )
        })?;
        let live = state.live();
        let max_bytes = (live.config.batches.max_file_mib * 1024.0 * 1024.0) as usize;
        let quota = files_quota(&live.config, &tenant);
        drop(live);
        let Form {
            filename,
            purpose,
            content,
            keep_s,
        } = read_form(form, max_bytes).await?;
        if !PURPOSES.contains(&purpose.as_str()) {
            return Err(ApiError::BadRequest {
                message: format!(
                    "`purpose` {purpose:?} is not one this gateway keeps files for ({}).",
                    PURPOSES.join(", ")
                ),
                param: Some("purpose".into()),
                code: Some("unsupported_parameter"),
            });
        }
        let content = match purpose.as_str() {
            "batch" => tokio::task::spawn_blocking(move || json_lines(content))
                .await
                .map_err(|e| ApiError::Internal(format!("reading the file failed: {e}")))??,
            _ => content,
        };
        let row = on_store(batches, move |s| {
            s.put_file_within(&owner, &filename, &purpose, &content, keep_s, quota)
        })
        .await?
        .map_err(|stored| ApiError::FilesQuota { stored, quota })?;
        Ok(Json(file_json(&row)).into_response())
    }
    .await;
    answer(&tenant, done)
}

/// Longest text field read (`purpose`, `expires_after[…]`).
const MAX_FIELD_BYTES: usize = 64;

/// An upload's form.
struct Form {
    filename: String,
    purpose: String,
    content: Vec<u8>,
    /// `expires_after[seconds]` (with `expires_after[anchor]` = `created_at`).
    keep_s: Option<i64>,
}

/// The shortest and longest time a file may be asked to be kept (`expires_after`,
/// `output_expires_after`): an hour to 30 days, as OpenAI's.
pub(super) const KEEP_S: std::ops::RangeInclusive<i64> = 3600..=2_592_000;

/// `expires_after` (or `output_expires_after`, named `param`): its `anchor` must be
/// `created_at`, its `seconds` within [`KEEP_S`].
pub(super) fn keep_for(
    param: &str,
    anchor: Option<&str>,
    seconds: Option<&str>,
) -> Result<Option<i64>, ApiError> {
    if anchor.is_none() && seconds.is_none() {
        return Ok(None);
    }
    if anchor != Some("created_at") {
        return Err(ApiError::bad(
            format!("`{param}.anchor` must be \"created_at\"."),
            Some(format!("{param}.anchor")),
        ));
    }
    match seconds.and_then(|s| s.trim().parse::<i64>().ok()) {
        Some(s) if KEEP_S.contains(&s) => Ok(Some(s)),
        _ => Err(ApiError::bad(
            format!(
                "`{param}.seconds` must be a whole number of seconds from {} to {}.",
                KEEP_S.start(),
                KEEP_S.end()
            ),
            Some(format!("{param}.seconds")),
        )),
    }
}

/// The form's file (its name and bytes, at most `max_bytes`), purpose and expiry.
async fn read_form(mut form: Multipart, max_bytes: usize) -> Result<Form, ApiError> {
    let bad = |m: String| ApiError::bad(m, None);
    let mut file = None;
    let mut text: std::collections::HashMap<String, String> = Default::default();
    while let Some(mut field) = form
        .next_field()
        .await
        .map_err(|e| bad(format!("The multipart body cannot be read: {e}")))?
    {
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "file" => {
                let filename = field.file_name().unwrap_or("file").to_string();
                let mut bytes = Vec::new();
                while let Some(chunk) = field
                    .chunk()
                    .await
                    .map_err(|e| bad(format!("The file cannot be read: {e}")))?
                {
                    if bytes.len() + chunk.len() > max_bytes {
                        return Err(ApiError::PayloadTooLarge { limit: max_bytes });
                    }
                    bytes.extend_from_slice(&chunk);
                }
                file = Some((filename, bytes));
            }
            "purpose" | "expires_after[anchor]" | "expires_after[seconds]" => {
                // A short word: read a few of its bytes at most (the body has no limit
                // but the file's).
                let mut value = Vec::new();
                while let Some(chunk) = field
                    .chunk()
                    .await
                    .map_err(|e| bad(format!("`{name}` cannot be read: {e}")))?
                {
                    value.extend_from_slice(&chunk);
                    if value.len() > MAX_FIELD_BYTES {
                        return Err(ApiError::bad(
                            format!("`{name}` is longer than any value it takes."),
                            Some(name),
                        ));
                    }
                }
                text.insert(name, String::from_utf8_lossy(&value).into_owned());
            }
            _ => {}
        }
    }
    let missing = |p: &str| ApiError::BadRequest {
        message: format!("Missing required parameter: `{p}`."),
        param: Some(p.into()),
        code: Some("missing_required_parameter"),
    };
    let (filename, content) = file.ok_or_else(|| missing("file"))?;
    let keep_s = keep_for(
        "expires_after",
        text.get("expires_after[anchor]").map(String::as_str),
        text.get("expires_after[seconds]").map(String::as_str),
    )?;
    let purpose = text.remove("purpose").ok_or_else(|| missing("purpose"))?;
    Ok(Form {
        filename,
        purpose,
        content,
        keep_s,
    })
}

/// A batch input file checked as JSON Lines (each line that is not blank a JSON object;
/// the requests in them are checked when a batch is made of it).
fn json_lines(content: Vec<u8>) -> Result<Vec<u8>, ApiError> {
    let bad = |m: String| ApiError::BadRequest {
        message: m,
        param: Some("file".into()),
        code: Some("invalid_file_format"),
    };
    let text = std::str::from_utf8(&content)
        .map_err(|e| bad(format!("A batch file is UTF-8 JSON Lines: {e}.")))?;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ok = serde_json::from_str::<serde::de::IgnoredAny>(line).is_ok()
            && line.trim_start().starts_with('{');
        if !ok {
            return Err(bad(format!(
                "Line {} of the file is not a JSON object: a batch file holds one request object a line.",
                i + 1
            )));
        }
    }
    Ok(content)
}

/// `GET /v1/files`.
pub async fn list(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    RawQuery(query): RawQuery,
) -> Response {
    let owner = owner(&tenant, &acting.map(|a| a.0));
    let done = async {
        let batches = enabled(&state)?;
        let (after, limit, oldest_first, purpose) =
            listing(query.as_deref(), 10_000, 10_000, true)?;
        let (rows, more) = on_store(batches, move |s| {
            let page = Listing {
                after: after.as_deref(),
                limit,
                oldest_first,
                purpose: purpose.as_deref(),
            };
            s.files(&owner, &page)
        })
        .await?;
        let data = rows.iter().map(file_json).collect();
        Ok(Json(list_json(data, more)).into_response())
    }
    .await;
    answer(&tenant, done)
}

fn no_file(id: &str) -> ApiError {
    ApiError::NotFound(format!("no file with id `{id}`"))
}

/// `GET /v1/files/{id}`.
pub async fn get(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Path(id): Path<String>,
) -> Response {
    let key = id.clone();
    let op = move |s: &BatchStore, owner: &str| s.file(owner, &key);
    for_tenant(&state, &tenant, acting, op, |row| {
        Ok(Json(file_json(&row.ok_or_else(|| no_file(&id))?)).into_response())
    })
    .await
}

/// `GET /v1/files/{id}/content`.
pub async fn content(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Path(id): Path<String>,
) -> Response {
    let key = id.clone();
    let op = move |s: &BatchStore, owner: &str| s.content(owner, &key);
    for_tenant(&state, &tenant, acting, op, |bytes| {
        let bytes = bytes.ok_or_else(|| no_file(&id))?;
        let kind = [(http::header::CONTENT_TYPE, "application/octet-stream")];
        Ok((kind, bytes).into_response())
    })
    .await
}

/// `DELETE /v1/files/{id}` (refused while a batch that has not ended reads it).
pub async fn delete(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Path(id): Path<String>,
) -> Response {
    let key = id.clone();
    let op = move |s: &BatchStore, owner: &str| s.delete_file(owner, &key);
    for_tenant(&state, &tenant, acting, op, |gone| match gone {
        Ok(true) => Ok(Json(json!({"id": id, "object": "file", "deleted": true})).into_response()),
        Ok(false) => Err(no_file(&id)),
        Err(batch) => Err(ApiError::BadRequest {
            message: format!(
                "The file `{id}` is the input of batch `{batch}`, which has not ended: cancel the batch first."
            ),
            param: None,
            code: Some("file_in_use"),
        }),
    })
    .await
}
