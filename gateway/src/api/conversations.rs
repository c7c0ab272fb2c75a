//! OpenAI's Conversations API, where the gateway stores answers (`[responses] store =
//! true`; see [`crate::response_store::conversations`]): `POST /v1/conversations`
//! (`items`, `metadata`), `GET`/`POST` (new metadata)/`DELETE /v1/conversations/{id}`,
//! and its items: `GET` (a page: see [`super::input_items`]) and `POST
//! /v1/conversations/{id}/items`, `GET`/`DELETE /v1/conversations/{id}/items/{item}`.
//! A response created with `conversation` reads its items first and adds its input and
//! output to it. Items are checked as a response's input is (messages with text,
//! function calls and their outputs), and stored with ids. A tenant sees only its own
//! conversations; any other id is a 404.

use super::auth::ActingFor;
use super::error::ApiError;
use super::handlers::{parsed, read_body, with_limits};
use super::input_items::{self, fresh_id};
use super::item_reference;
use super::responses::{self, metadata};
use super::stored_responses::{for_tenant, quota, within_quota};
use crate::response_store::{ResponseStore, StoreError};
use crate::state::AppState;
use crate::tenants::Tenant;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// Most items one request may add.
const MAX_ITEMS: usize = 1000;

/// What a store operation answers: a JSON body, or an error to send.
type Answered = Result<Value, ApiError>;

/// Runs `op` on the store for the tenant a request acts for, from the blocking pool, and
/// answers with its JSON (or its error), the tenant's rate-limit headers added.
async fn run(
    state: AppState,
    tenant: Arc<Tenant>,
    acting: Option<Extension<ActingFor>>,
    op: impl FnOnce(&ResponseStore, &str) -> Result<Answered, StoreError> + Send + 'static,
) -> Response {
    let json = |v: Value| axum::Json(v).into_response();
    for_tenant(state, tenant, acting, "conversations", op, json).await
}

fn no_conversation(id: &str) -> ApiError {
    ApiError::NotFound(format!("conversation {id:?}"))
}

fn no_item(id: &str, item: &str) -> ApiError {
    ApiError::NotFound(format!("item {item:?} in conversation {id:?}"))
}

/// A request body as a JSON object with only the fields `allowed` (an empty body: `{}`).
fn body(body: &[u8], allowed: &[&str]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let req = responses::read(body)?;
    if let Some(k) = req.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::unknown(k));
    }
    Ok(req)
}

/// The body read, then `parse`d (on the blocking threads where it is large).
async fn read_then<T, F>(
    state: &AppState,
    raw: Result<Bytes, BytesRejection>,
    parse: F,
) -> Result<T, ApiError>
where
    F: FnOnce(&[u8]) -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    parsed(read_body(state, raw)?, parse).await
}

/// `items` as given: an array of at most [`MAX_ITEMS`] (checked by [`checked`]).
fn items(v: Option<&Value>, required: bool) -> Result<Vec<Value>, ApiError> {
    let list = match v {
        None | Some(Value::Null) if !required => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        _ => {
            return Err(ApiError::bad(
                "`items` must be an array of items.",
                Some("items".into()),
            ))
        }
    };
    if list.len() > MAX_ITEMS {
        return Err(ApiError::bad(
            format!(
                "`items` may hold at most {MAX_ITEMS} items, got {}.",
                list.len()
            ),
            Some("items".into()),
        ));
    }
    Ok(list.clone())
}

/// `items` with their references replaced by the tenant's items they name (see
/// [`super::item_reference`]), checked, and in their stored shape (each with an id);
/// refused (403) where the tenant keeps `quota` bytes or more.
fn checked(
    store: &ResponseStore,
    owner: &str,
    mut items: Vec<Value>,
    quota: u64,
) -> Result<Result<Vec<Value>, ApiError>, StoreError> {
    if let Err(e) = within_quota(store, owner, quota)? {
        return Ok(Err(e));
    }
    if let Err(e) = item_reference::resolve(store, owner, &mut items, "items")? {
        return Ok(Err(e));
    }
    Ok(responses::check_items(&items, "items").map(|()| {
        items
            .iter()
            .map(|i| input_items::stored(i, fresh_id))
            .collect()
    }))
}

/// `POST /v1/conversations`.
pub async fn create(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = read_then(&state, raw, |b| {
        let req = body(b, &["items", "metadata"])?;
        Ok((
            metadata(req.get("metadata"))?,
            items(req.get("items"), false)?,
        ))
    })
    .await;
    let (meta, items) = match parsed {
        Ok(p) => p,
        Err(e) => return with_limits(&tenant, e.into_response()),
    };
    let quota = quota(&state, &tenant);
    run(state, tenant, acting, move |s, owner| {
        let items = match checked(s, owner, items, quota)? {
            Ok(items) => items,
            Err(e) => return Ok(Err(e)),
        };
        Ok(Ok(s.create_conversation(owner, meta, &items)?.to_json()))
    })
    .await
}

/// `GET /v1/conversations/{id}`.
pub async fn get(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Path(id): Path<String>,
) -> Response {
    run(state, tenant, acting, move |s, owner| {
        Ok(s.get_conversation(owner, &id)?
            .map(|c| c.to_json())
            .ok_or_else(|| no_conversation(&id)))
    })
    .await
}

/// `POST /v1/conversations/{id}`: new metadata.
pub async fn update(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    let meta = read_then(&state, raw, |b| {
        match body(b, &["metadata"])?.get("metadata") {
            None => Err(ApiError::bad(
                "`metadata` is required.",
                Some("metadata".into()),
            )),
            m => metadata(m),
        }
    })
    .await;
    let meta = match meta {
        Ok(m) => m,
        Err(e) => return with_limits(&tenant, e.into_response()),
    };
    run(state, tenant, acting, move |s, owner| {
        Ok(s.update_conversation(owner, &id, meta)?
            .map(|c| c.to_json())
            .ok_or_else(|| no_conversation(&id)))
    })
    .await
}

/// `DELETE /v1/conversations/{id}`: it and its items.
pub async fn delete(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Path(id): Path<String>,
) -> Response {
    run(state, tenant, acting, move |s, owner| {
        Ok(match s.delete_conversation(owner, &id)? {
            true => Ok(json!({"id": id, "object": "conversation.deleted", "deleted": true})),
            false => Err(no_conversation(&id)),
        })
    })
    .await
}

/// `GET /v1/conversations/{id}/items`: a page of its items.
pub async fn list_items(
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
    run(state, tenant, acting, move |s, owner| {
        Ok(match s.conversation_items_page(owner, &id, page.asked())? {
            Some(paged) => page.answer(paged, "conversation"),
            None => Err(no_conversation(&id)),
        })
    })
    .await
}

/// `POST /v1/conversations/{id}/items`: items added to its end.
pub async fn add_items(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    raw: Result<Bytes, BytesRejection>,
) -> Response {
    let added = match input_items::page(query.as_deref()) {
        Ok(_) => {
            read_then(&state, raw, |b| {
                items(body(b, &["items"])?.get("items"), true)
            })
            .await
        }
        Err(e) => Err(e),
    };
    let added = match added {
        Ok(a) => a,
        Err(e) => return with_limits(&tenant, e.into_response()),
    };
    let quota = quota(&state, &tenant);
    run(state, tenant, acting, move |s, owner| {
        let added = match checked(s, owner, added, quota)? {
            Ok(items) => items,
            Err(e) => return Ok(Err(e)),
        };
        Ok(match s.add_items(owner, &id, &added)? {
            true => Ok(input_items::listed(&added, false)),
            false => Err(no_conversation(&id)),
        })
    })
    .await
}

/// `GET /v1/conversations/{id}/items/{item}`.
pub async fn get_item(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Path((id, item)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Response {
    // `include` is all it takes (there is nothing to include).
    if let Err(e) = input_items::page(query.as_deref()) {
        return with_limits(&tenant, e.into_response());
    }
    run(state, tenant, acting, move |s, owner| {
        Ok(s.conversation_item(owner, &id, &item)?
            .ok_or_else(|| no_item(&id, &item)))
    })
    .await
}

/// `DELETE /v1/conversations/{id}/items/{item}`: answered with the conversation.
pub async fn delete_item(
    State(state): State<AppState>,
    Extension(tenant): Extension<Arc<Tenant>>,
    acting: Option<Extension<ActingFor>>,
    Path((id, item)): Path<(String, String)>,
) -> Response {
    run(state, tenant, acting, move |s, owner| {
        Ok(s.delete_item(owner, &id, &item)?
            .map(|c| c.to_json())
            .ok_or_else(|| no_item(&id, &item)))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_is_sixteen_short_strings() {
        assert!(metadata(None).expect("none").is_empty());
        let ok = json!({"topic": "demo", "user": "u1"});
        assert_eq!(metadata(Some(&ok)).expect("valid").len(), 2);
        let many: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        for bad in [
            json!("x"),
            json!({"n": 1}),
            json!({"k": "v".repeat(513)}),
            json!({"k".repeat(65): "v"}),
            Value::Object(many),
        ] {
            let e = metadata(Some(&bad)).expect_err("refused");
            assert_eq!(e.param(), Some("metadata"), "{bad}");
        }
    }

    fn store(name: &str) -> Arc<ResponseStore> {
        let dir = std::env::temp_dir().join(format!("tollgate-conv-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary folder");
        ResponseStore::open(&dir.join("r.db"), std::time::Duration::from_secs(3600))
            .expect("a store")
    }

    fn check(s: &ResponseStore, tenant: &str, v: Value) -> Result<Vec<Value>, ApiError> {
        checked(s, tenant, items(Some(&v), true)?, u64::MAX).expect("the store answers")
    }

    #[test]
    fn items_are_checked_and_given_ids() {
        let s = store("checked");
        let given = json!([{"role": "user", "content": "hi"},
                           {"type": "function_call_output", "call_id": "c1", "output": "42"}]);
        let got = check(&s, "a", given).expect("valid");
        assert!(got[0]["id"].as_str().expect("id").starts_with("msg_"));
        assert!(got[1]["id"].as_str().expect("id").starts_with("fco_"));
        let bad = json!([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]);
        let e = check(&s, "a", bad).expect_err("a bad role");
        assert_eq!(e.param(), Some("items[1].role"));
        assert!(items(None, true).is_err(), "required");
        assert!(items(None, false).expect("optional").is_empty());
        let many = Value::Array(vec![json!({"role": "user", "content": "x"}); MAX_ITEMS + 1]);
        assert_eq!(
            items(Some(&many), true).expect_err("too many").param(),
            Some("items")
        );
    }

    #[test]
    fn references_are_copies_of_the_tenants_own_items() {
        let s = store("references");
        let first = check(&s, "a", json!([{"role": "user", "content": "hi"}])).expect("valid");
        let c = s
            .create_conversation("a", Map::new(), &first)
            .expect("created");
        let id = first[0]["id"].as_str().expect("an id").to_string();
        assert_eq!(
            s.conversation_items("a", &c.id)
                .expect("read")
                .map(|v| v.len()),
            Some(1)
        );

        let got = check(
            &s,
            "a",
            json!([{"type": "item_reference", "id": id}, {"id": id}]),
        )
        .expect("both found");
        assert_eq!(got.len(), 2);
        for item in &got {
            assert_eq!(item["content"], first[0]["content"]);
            assert_ne!(item["id"], first[0]["id"], "a copy has an id of its own");
        }
        // Another tenant's item, and no item at all, are not found.
        for (tenant, id) in [("b", id.as_str()), ("a", "msg_none")] {
            let e = check(
                &s,
                tenant,
                json!([{"role": "user", "content": "x"},
                {"type": "item_reference", "id": id}]),
            )
            .expect_err("not found");
            assert_eq!(e.param(), Some("items[1].id"), "{tenant} {id}");
        }
    }
}
