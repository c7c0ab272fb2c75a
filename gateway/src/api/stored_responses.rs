//! The Responses API's stored answers (`[responses] store = true`, see
//! [`crate::response_store`]): `POST /v1/responses` with a `previous_response_id` (the
//! stored conversation read first, then the request validated with it),
//! `GET`/`DELETE /v1/responses/{id}` and `GET /v1/responses/{id}/input_items` (see
//! [`super::input_items`]), and `POST /v1/responses/input_tokens` (a body read as
//! `POST /v1/responses` reads it, counted). A tenant sees only its own answers; any other
//! id is a 404.

use super::auth::ActingFor;
use super::background::{self, Background};
use super::error::ApiError;
use super::handlers::{parsed, read_body, respond, validated, with_limits};
use super::input_items;
use super::item_reference;
use super::request_id::RequestId;
use super::responses::{self, Previous, Prior};
use super::validate::InferenceRequest;
use crate::response_store::{Kept, ResponseStore, StoreError};
use crate::state::AppState;
use crate::tenants::Tenant;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Instant;

/// The tenant a request acts for (a trusted gateway's, else the caller's).
pub(super) fn owner(tenant: &Tenant, acting: &Option<ActingFor>) -> String {
    acting
        .as_ref()
        .map_or(&tenant.id, |a| &a.tenant)
        .to_string()
}

/// Runs `f` on the store from the blocking pool.
pub(super) async fn on_store<T: Send + 'static>(
    store: &Arc<ResponseStore>,
    f: impl FnOnce(&ResponseStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| ApiError::Internal(format!("response store: {e}")))?
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// Runs `op` on the store (from the blocking pool) for the tenant a request acts for, and
/// answers with `ok` of what it found, or with its error; the tenant's rate-limit headers
/// added. Without a store, a 404 naming `what`.
pub(super) async fn for_tenant<T: Send + 'static>(
    state: AppState,
    tenant: Arc<Tenant>,
    acting: Option<Extension<ActingFor>>,
    what: &'static str,
    op: impl FnOnce(&ResponseStore, &str) -> Result<Result<T, ApiError>, StoreError> + Send + 'static,
    ok: impl FnOnce(T) -> Response,
) -> Response {
    let owner = owner(&tenant, &acting.map(|a| a.0));
    let done = async {
        let store = state
            .responses
            .as_ref()
            .ok_or_else(|| ApiError::NotFound(format!("{what} (this gateway stores none)")))?;
        on_store(store, move |s| op(s, &owner)).await?
    }
    .await;
    with_limits(&tenant, done.map_or_else(IntoResponse::into_response, ok))
}

/// The bytes `tenant` may keep in the store: its `max_stored_mib`, else the gateway's
/// `[responses] max_stored_mib_per_tenant`.
pub(super) fn quota(state: &AppState, tenant: &Tenant) -> u64 {
    let mib = tenant
        .cfg
        .max_stored_mib
        .unwrap_or_else(|| state.live().config.responses.max_stored_mib_per_tenant);
    (mib * 1024.0 * 1024.0) as u64
}

/// A 403 where `owner` keeps `quota` bytes or more (checked before a request that would
/// store more: one answer may take it past).
pub(super) fn within_quota(
    store: &ResponseStore,
    owner: &str,
    quota: u64,
) -> Result<Result<(), ApiError>, StoreError> {
    let stored = store.stored_bytes(owner)?;
    Ok(match stored >= quota {
        true => Err(ApiError::StorageQuota { stored, quota }),
        false => Ok(()),
    })
}

/// [`room`] for a batch's `/v1/responses` request (its body as JSON bytes; a body that is
/// not a JSON object is left to the request's own validation).
pub(crate) async fn room_for_batch_line(
    state: &AppState,
    tenant: &Tenant,
    body: &[u8],
) -> Result<(), ApiError> {
    match serde_json::from_slice::<Map<String, Value>>(body) {
        Ok(req) => room(state, tenant, tenant.id.to_string(), &req).await,
        Err(_) => Ok(()),
    }
}

/// Refuses a request that would store (its answer, or in a conversation) where its tenant
/// is at its quota.
async fn room(
    state: &AppState,
    tenant: &Tenant,
    owner: String,
    req: &Map<String, Value>,
) -> Result<(), ApiError> {
    let Some(store) = &state.responses else {
        return Ok(());
    };
    let named = |k: &str| req.get(k).is_some_and(|v| !v.is_null());
    if req.get("store") == Some(&Value::Bool(false)) && !named("conversation") {
        return Ok(());
    }
    let quota = quota(state, tenant);
    on_store(store, move |s| within_quota(s, &owner, quota)).await?
}

fn not_stored(id: &str) -> ApiError {
    ApiError::NotFound(format!("no stored response with id {id:?}"))
}

/// What a request continues, if anything: the stored response its
/// `previous_response_id` names, or the conversation its `conversation` names (an id, or
/// `{"id": …}`), with the input items each holds.
async fn previous(
    state: &AppState,
    owner: String,
    req: &Map<String, Value>,
) -> Result<Option<Previous>, ApiError> {
    let named = |k: &str| req.get(k).filter(|v| !v.is_null());
    let (response, conversation) = (named("previous_response_id"), named("conversation"));
    // Without a store, validation refuses the fields and says why.
    let Some(store) = &state.responses else {
        return Ok(None);
    };
    let prior = match (response, conversation) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad(
                "`previous_response_id` and `conversation` cannot both be given.",
                Some("conversation".into()),
            ))
        }
        (Some(id), None) => Prior::Response(
            id.as_str()
                .ok_or_else(|| {
                    ApiError::bad(
                        "`previous_response_id` must be a string.",
                        Some("previous_response_id".into()),
                    )
                })?
                .to_string(),
        ),
        (None, Some(c)) => Prior::Conversation(
            c.as_str()
                .or_else(|| c.get("id").and_then(Value::as_str))
                .ok_or_else(|| {
                    ApiError::bad(
                        "`conversation` must be a conversation id or `{\"id\": …}`.",
                        Some("conversation".into()),
                    )
                })?
                .to_string(),
        ),
    };
    let looked = prior.clone();
    let found = on_store(store, move |s| match &looked {
        Prior::Response(id) => Ok(s.conversation(&owner, id)?.map(|items| Previous {
            continues: Some((id.clone(), items.len())),
            items,
            prior: looked.clone(),
            version: 0,
        })),
        Prior::Conversation(id) => Ok(s.in_conversation(&owner, id)?.map(|c| Previous {
            items: c.items,
            continues: c.answer,
            prior: looked.clone(),
            version: c.version,
        })),
    })
    .await?;
    match (found, prior) {
        (Some(previous), _) => Ok(Some(previous)),
        (None, Prior::Response(id)) => Err(ApiError::BadRequest {
            message: format!("Previous response with id {id:?} not found."),
            param: Some("previous_response_id".into()),
            code: Some("previous_response_not_found"),
        }),
        (None, Prior::Conversation(id)) => Err(ApiError::NotFound(format!(
            "conversation {id:?} (no such conversation of this tenant's)"
        ))),
    }
}

/// Replaces the item references in a request's `input` by the items they name (see
/// [`item_reference`]); without a store, they are left for validation to refuse.
async fn references(
    state: &AppState,
    owner: String,
    req: &mut Map<String, Value>,
) -> Result<(), ApiError> {
    let Some(store) = &state.responses else {
        return Ok(());
    };
    let Some(Value::Array(items)) = req.get_mut("input") else {
        return Ok(());
    };
    if !item_reference::any(items) {
        return Ok(());
    }
    let mut given = std::mem::take(items);
    let (resolved, found) = on_store(store, move |s| {
        let found = item_reference::resolve(s, &owner, &mut given, "input")?;
        Ok((given, found))
    })
    .await?;
    *items = resolved;
    found
}

/// A `/v1/responses` body `body` (read as `req`) as the request it makes: its item
/// references replaced, what it continues looked up, then validated with it.
async fn request(
    state: &AppState,
    owner: String,
    body: Bytes,
    mut req: Map<String, Value>,
) -> Result<InferenceRequest, ApiError> {
    references(state, owner.clone(), &mut req).await?;
    let previous = previous(state, owner, &req).await?;
    validated(state, body, move |_, server| {
        responses::validate_map(req, server, previous)
    })
    .await
}

/// `POST /v1/responses`.
pub async fn create(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Extension(id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let acting = acting.map(|a| a.0);
    let owner = owner(&tenant, &acting);
    let parsed = async {
        let body = read_body(&state, body)?;
        let req = parsed(body.clone(), responses::read).await?;
        room(&state, &tenant, owner.clone(), &req).await?;
        request(&state, owner.clone(), body, req).await
    }
    .await;
    let mut req = match parsed {
        Ok(req) if req.responses.as_ref().is_some_and(|r| r.background) => req,
        other => return respond(state, tenant, acting, id, started, other).await,
    };
    let bg = match background_of(&state, &mut req, owner) {
        Ok(bg) => bg,
        Err(e) => return respond(state, tenant, acting, id, started, Err(e)).await,
    };
    let answer = respond(state, tenant, acting, id, started, Ok(req)).await;
    background::start(bg, answer).await
}

/// `POST /v1/responses/input_tokens`: how many input tokens a response to this body
/// would take (`{"object": "response.input_tokens", "input_tokens": n}`), read as
/// `POST /v1/responses` reads it (the same validation; a stored response or conversation
/// it continues and the items it references first; truncated if it says `auto`) and
/// counted by the pool that would serve it (see [`crate::pipeline::input_tokens`]).
/// Nothing is admitted, run or charged.
pub async fn input_tokens(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let owner = owner(&tenant, &acting.map(|a| a.0));
    let counted = async {
        let body = read_body(&state, body)?;
        let req = parsed(body.clone(), responses::read).await?;
        let req = request(&state, owner, body, req).await?;
        crate::pipeline::input_tokens(&state, &tenant, req).await
    }
    .await;
    let answer = counted.map(|n| json!({"object": "response.input_tokens", "input_tokens": n}));
    with_limits(
        &tenant,
        answer.map_or_else(IntoResponse::into_response, |v| {
            axum::Json(v).into_response()
        }),
    )
}

/// What a `background: true` request needs to run apart from its client (run streamed,
/// whatever it asked), or why it cannot.
fn background_of(
    state: &AppState,
    req: &mut InferenceRequest,
    owner: String,
) -> Result<Background, ApiError> {
    let Some(store) = &state.responses else {
        return Err(ApiError::turned_off(
            "background",
            "running a response in the background",
            "this gateway stores no answers (`[responses] store = false`) to poll",
        ));
    };
    let info = req.responses.as_ref().ok_or_else(|| {
        ApiError::Internal("a Responses request without its Responses info".into())
    })?;
    if !info.store {
        return Err(ApiError::bad(
            "A background response must be stored: `background: true` needs `store` left true.",
            Some("store".into()),
        ));
    }
    let (parent, items) = input_items::lineage(info);
    let stream = req.stream;
    req.stream = true;
    Ok(Background {
        store: store.clone(),
        owner,
        conversation: Value::Array(items).to_string(),
        parent,
        stream,
    })
}

/// Runs `op` on the store for the tenant's answer `id` (`None`: it has none such: 404),
/// and answers with `ok` of its result, the tenant's rate-limit headers added.
async fn by_id<T: Send + 'static>(
    state: AppState,
    tenant: Arc<Tenant>,
    acting: Option<Extension<ActingFor>>,
    id: String,
    op: impl FnOnce(&ResponseStore, &str, &str) -> Result<Option<T>, StoreError> + Send + 'static,
    ok: impl FnOnce(T, &str) -> Response,
) -> Response {
    let key = id.clone();
    let found = move |s: &ResponseStore, owner: &str| {
        Ok(op(s, owner, &key)?.ok_or_else(|| not_stored(&key)))
    };
    for_tenant(state, tenant, acting, "stored responses", found, |t| {
        ok(t, &id)
    })
    .await
}

/// `GET /v1/responses/{id}`: a stored answer, as it was sent; with `stream=true`, a
/// background response's events (after `starting_after`), followed to its end.
pub async fn get(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let (stream, after) = match stream_query(query.as_deref()) {
        Ok(q) => q,
        Err(e) => return with_limits(&tenant, e.into_response()),
    };
    if stream {
        let owner = owner(&tenant, &acting.as_ref().map(|a| a.0.clone()));
        if let Some(events) = state
            .responses
            .as_ref()
            .and_then(|s| background::follow(s, &owner, &id, after))
        {
            return with_limits(&tenant, events);
        }
    }
    let op = |s: &ResponseStore, owner: &str, id: &str| s.response(owner, id);
    by_id(state, tenant, acting, id, op, move |stored, id| {
        if stream {
            return ApiError::bad(
                format!(
                    "Response {id:?} has no events to stream: it did not run in the background, or it ended a while ago (GET it without `stream`)."
                ),
                Some("stream".into()),
            )
            .into_response();
        }
        let json = [(http::header::CONTENT_TYPE, "application/json")];
        (json, stored).into_response()
    })
    .await
}

/// `stream` and `starting_after` of a `GET /v1/responses/{id}` (and `include`, which
/// changes nothing here).
fn stream_query(query: Option<&str>) -> Result<(bool, Option<usize>), ApiError> {
    let (mut stream, mut after) = (false, None);
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "stream" => {
                stream = match &*v {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(ApiError::bad(
                            format!("`stream` must be true or false, got {v:?}."),
                            Some("stream".into()),
                        ))
                    }
                }
            }
            "starting_after" => {
                after = Some(v.parse().map_err(|_| {
                    ApiError::bad(
                        format!("`starting_after` must be an event's sequence number, got {v:?}."),
                        Some("starting_after".into()),
                    )
                })?)
            }
            "include" | "include[]" | "include_obfuscation" => {}
            other => return Err(ApiError::unknown(other)),
        }
    }
    Ok((stream, after))
}

/// `DELETE /v1/responses/{id}`: a background response still running is stopped first
/// (its end would store it again).
pub async fn delete(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Path(id): Path<String>,
) -> Response {
    if let Some(store) = &state.responses {
        let owner = owner(&tenant, &acting.as_ref().map(|a| a.0.clone()));
        if background::stop(store, &(owner, id.clone()))
            .await
            .is_some()
        {
            // After whatever it had sent the writer before it stopped (the writer takes
            // saves in order): an empty save waits for those to be committed.
            if let Err(e) = store.save(Kept::default()).await {
                return with_limits(&tenant, ApiError::Internal(e.to_string()).into_response());
            }
        }
    }
    let op = |s: &ResponseStore, owner: &str, id: &str| Ok(s.delete(owner, id)?.then_some(()));
    by_id(state, tenant, acting, id, op, |(), id| {
        axum::Json(json!({"id": id, "object": "response", "deleted": true})).into_response()
    })
    .await
}

/// `GET /v1/responses/{id}/input_items`: a page of a stored answer's input items.
pub async fn input_items(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let page = match input_items::page(query.as_deref()) {
        Ok(p) => p,
        Err(e) => return with_limits(&tenant, e.into_response()),
    };
    let asked = page.clone();
    let op = move |s: &ResponseStore, owner: &str, id: &str| {
        s.input_items_page(owner, id, asked.asked())
    };
    by_id(state, tenant, acting, id, op, move |paged, _| {
        match page.answer(paged, "response") {
            Ok(list) => axum::Json(list).into_response(),
            Err(e) => e.into_response(),
        }
    })
    .await
}

/// `POST /v1/responses/{id}/cancel`: stops a background response still running (stored
/// `cancelled`); one that is not running is answered as it is stored.
pub async fn cancel(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Path(id): Path<String>,
) -> Response {
    let owner = owner(&tenant, &acting.as_ref().map(|a| a.0.clone()));
    if let Some(store) = &state.responses {
        match background::cancel(store, &owner, &id).await {
            Ok(Some(cancelled)) => {
                return with_limits(&tenant, axum::Json(cancelled).into_response())
            }
            Ok(None) => {}
            Err(e) => return with_limits(&tenant, e.into_response()),
        }
    }
    let op = |s: &ResponseStore, owner: &str, id: &str| s.response(owner, id);
    by_id(state, tenant, acting, id, op, |stored, _| {
        let background =
            serde_json::from_str::<Value>(&stored).is_ok_and(|r| r["background"] == true);
        if !background {
            return ApiError::bad("Only background responses can be cancelled.", None)
                .into_response();
        }
        let json = [(http::header::CONTENT_TYPE, "application/json")];
        (json, stored).into_response()
    })
    .await
}
