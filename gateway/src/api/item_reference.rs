//! `item_reference` inputs (`{"type": "item_reference", "id": …}`, or an item that is only
//! an `id`), where the gateway stores answers: each stands for a copy of the tenant's
//! stored item with that id — from any of its unexpired answers (their inherited items,
//! input and output) or conversations — found before the request is checked, so that the
//! copy is checked, prompted and stored as if it had been sent (with an id of its own).
//! An id the tenant has no item under is a 400 naming the reference.

use super::error::ApiError;
use crate::response_store::{ResponseStore, StoreError};
use serde_json::{Map, Value};

/// Whether `item` is a reference: typed so, or (untyped, without a role) only an id.
fn is_reference(item: &Value) -> bool {
    match item.get("type").and_then(Value::as_str) {
        Some(t) => t == "item_reference",
        None => item.get("role").is_none() && item.get("id").is_some(),
    }
}

/// Whether any of `items` is a reference.
pub fn any(items: &[Value]) -> bool {
    items.iter().any(is_reference)
}

/// The ids `items`' references name, by position (a 400 naming `field[i].id` for one
/// without a string id, or with other fields than `type` and `id`).
fn named(items: &[Value], field: &str) -> Result<Vec<(usize, String)>, ApiError> {
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate().filter(|(_, v)| is_reference(v)) {
        let at = format!("{field}[{i}]");
        if let Some(k) = item
            .as_object()
            .and_then(|o| o.keys().find(|k| !matches!(k.as_str(), "type" | "id")))
        {
            return Err(ApiError::bad(
                format!("`{at}` is an item reference: it takes `id` only, not `{k}`."),
                Some(format!("{at}.{k}")),
            ));
        }
        match item.get("id").and_then(Value::as_str) {
            Some(id) if !id.is_empty() => out.push((i, id.to_string())),
            _ => {
                return Err(ApiError::bad(
                    format!("`{at}.id` must be the id of a stored item."),
                    Some(format!("{at}.id")),
                ))
            }
        }
    }
    Ok(out)
}

/// A stored item as a new input: without its id and status (it gets its own when stored).
fn copy(item: &Value) -> Value {
    match item {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "id" | "status"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Map<_, _>>(),
        ),
        other => other.clone(),
    }
}

/// Replaces each reference among `items` (a request's `field`) by a copy of `tenant`'s
/// stored item it names; a 400 naming the first that names none.
pub fn resolve(
    store: &ResponseStore,
    tenant: &str,
    items: &mut [Value],
    field: &str,
) -> Result<Result<(), ApiError>, StoreError> {
    let refs = match named(items, field) {
        Ok(r) if r.is_empty() => return Ok(Ok(())),
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let ids: Vec<String> = refs.iter().map(|(_, id)| id.clone()).collect();
    let found = store.items(tenant, &ids)?;
    for (i, id) in refs {
        let Some(item) = found.get(&id) else {
            return Ok(Err(ApiError::BadRequest {
                message: format!("Item with id {id:?} not found (`{field}[{i}]`)."),
                param: Some(format!("{field}[{i}].id")),
                code: Some("item_not_found"),
            }));
        };
        items[i] = copy(item);
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_are_typed_or_bare_ids_and_take_nothing_else() {
        let items = vec![
            json!({"role": "user", "content": "hi"}),
            json!({"type": "item_reference", "id": "msg_1"}),
            json!({"id": "fc_2"}),
            json!({"type": "message", "id": "msg_3", "role": "user", "content": "x"}),
        ];
        assert!(any(&items));
        let got = named(&items, "input").expect("well formed");
        assert_eq!(got, vec![(1, "msg_1".into()), (2, "fc_2".into())]);
        assert!(!any(&items[3..]), "a message with an id is itself");

        let e = named(&[json!({"type": "item_reference"})], "items").expect_err("no id");
        assert!(matches!(e, ApiError::BadRequest { param: Some(p), .. } if p == "items[0].id"));
        let e = named(
            &[json!({"type": "item_reference", "id": "a", "role": "user"})],
            "input",
        )
        .expect_err("more than an id");
        assert!(matches!(e, ApiError::BadRequest { param: Some(p), .. } if p == "input[0].role"));
    }

    #[test]
    fn a_copy_has_no_id_or_status() {
        let item = json!({"type": "message", "id": "msg_1", "status": "completed",
            "role": "assistant", "content": [{"type": "output_text", "text": "Hi"}]});
        assert_eq!(
            copy(&item),
            json!({"type": "message", "role": "assistant",
                "content": [{"type": "output_text", "text": "Hi"}]})
        );
    }
}
