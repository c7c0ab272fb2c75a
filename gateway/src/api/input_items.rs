//! The input items of stored answers: their stored shape ([`stored`]: every item has an
//! id, messages their content as typed parts, a status), and
//! `GET /v1/responses/{id}/input_items` ([`Page`], [`list`]): the conversation an answer
//! was given (the items of the answers it continued, then its own input), a page at a
//! time as OpenAI lists it: `limit` (1–100, 20), `order` (`desc` by default), `after` /
//! `before` an item id; answered `{object: "list", data, first_id, last_id, has_more}`.
//! Ids are given when an answer is stored, so a chain of answers lists the same items
//! under the same ids.

use super::error::ApiError;
use super::validate::ResponsesInfo;
use crate::response_store::Parent;
use serde_json::{json, Map, Value};

/// The id prefix of an item of type `kind`.
fn prefix(kind: &str) -> &'static str {
    match kind {
        "function_call" => "fc",
        "function_call_output" => "fco",
        _ => "msg",
    }
}

/// A fresh id with `prefix` (`resp`, `msg`, `fc`, …).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// A fresh item id for an item of type `kind`.
pub fn fresh_id(kind: &str) -> String {
    new_id(prefix(kind))
}

/// A (validated) input item in its stored and listed shape: `type` and `status` said, a
/// message's content as `input_text` parts (`output_text` ones with `annotations` for the
/// assistant's), and an id (`id` makes one for an item without: given its type).
pub fn stored(item: &Value, id: impl FnOnce(&str) -> String) -> Value {
    let Some(o) = item.as_object() else {
        return item.clone();
    };
    let mut out: Map<String, Value> = o.clone();
    let kind = o
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message")
        .to_string();
    if kind == "message" {
        let assistant = o.get("role").and_then(Value::as_str) == Some("assistant");
        let part = if assistant {
            "output_text"
        } else {
            "input_text"
        };
        if let Some(Value::String(text)) = o.get("content") {
            out.insert("content".into(), json!([{"type": part, "text": text}]));
        }
        if let Some(Value::Array(parts)) = out.get_mut("content") {
            for p in parts.iter_mut().filter_map(Value::as_object_mut) {
                if p.get("type").and_then(Value::as_str) == Some("output_text") {
                    p.entry("annotations").or_insert_with(|| json!([]));
                }
            }
        }
    }
    if !matches!(out.get("id"), Some(Value::String(_))) {
        out.insert("id".into(), Value::String(id(&kind)));
    }
    out.insert("type".into(), Value::String(kind));
    out.entry("status")
        .or_insert_with(|| Value::String("completed".into()));
    Value::Object(out)
}

/// What an answer to a Responses request stores of its conversation through its input:
/// the stored answer it continues, if any (the conversation's first items are that
/// one's), and its own input items in their stored shape (the whole conversation's, where
/// it continues no stored answer).
pub fn lineage(info: &ResponsesInfo) -> (Option<Parent>, Vec<Value>) {
    let parent = info.continues.as_ref().map(|id| Parent {
        id: id.clone(),
        inherits: info.own_from,
        prefix: info.conversation.clone(),
    });
    let from = parent.as_ref().map_or(0, |p| p.inherits);
    let own = info.conversation.get(from..).unwrap_or(&[]);
    (parent, own.iter().map(|i| stored(i, fresh_id)).collect())
}

/// Which page of a list is asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub limit: usize,
    /// Newest first (the default).
    pub desc: bool,
    pub after: Option<String>,
    pub before: Option<String>,
}

/// The page a query string asks for (400 naming the parameter that is wrong).
pub fn page(query: Option<&str>) -> Result<Page, ApiError> {
    let mut page = Page {
        limit: 20,
        desc: true,
        after: None,
        before: None,
    };
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "limit" => {
                page.limit = match v.parse::<usize>() {
                    Ok(n) if (1..=100).contains(&n) => n,
                    _ => {
                        return Err(ApiError::bad(
                            format!("`limit` must be an integer from 1 to 100, got {v:?}."),
                            Some("limit".into()),
                        ))
                    }
                }
            }
            "order" => {
                page.desc = match &*v {
                    "desc" => true,
                    "asc" => false,
                    _ => {
                        return Err(ApiError::bad(
                            format!("`order` must be \"asc\" or \"desc\", got {v:?}."),
                            Some("order".into()),
                        ))
                    }
                }
            }
            "after" => page.after = Some(v.into_owned()),
            "before" => page.before = Some(v.into_owned()),
            // Nothing an input item can include: asking for logprobs (of outputs) is
            // harmless, anything else is refused.
            "include" | "include[]" if v == "message.output_text.logprobs" => {}
            "include" | "include[]" => {
                return Err(ApiError::unsupported(
                    "include",
                    &format!("including {v:?}"),
                ))
            }
            other => return Err(ApiError::unknown(other)),
        }
    }
    Ok(page)
}

/// The page `page` of `items` (in conversation order), as a list object. An item lacking
/// an id (stored before ids were given) is listed as `item_{its index}`.
pub fn list(items: Vec<Value>, page: &Page) -> Result<Value, ApiError> {
    let mut items: Vec<Value> = items
        .iter()
        .enumerate()
        .map(|(i, item)| stored(item, |_| format!("item_{i}")))
        .collect();
    if page.desc {
        items.reverse();
    }
    let at = |cursor: &Option<String>, param: &str| -> Result<Option<usize>, ApiError> {
        let Some(id) = cursor else { return Ok(None) };
        items
            .iter()
            .position(|it| it.get("id").and_then(Value::as_str) == Some(id))
            .map(Some)
            .ok_or_else(|| no_such_item(id, param, "response"))
    };
    let start = at(&page.after, "after")?.map_or(0, |i| i + 1);
    let end = at(&page.before, "before")?.unwrap_or(items.len());
    let window = items.get(start..end).unwrap_or(&[]);
    let has_more = window.len() > page.limit;
    // Only `before`: the page just before it; otherwise the page from the start.
    let data = if page.before.is_some() && page.after.is_none() {
        &window[window.len().saturating_sub(page.limit)..]
    } else {
        &window[..window.len().min(page.limit)]
    };
    Ok(listed(data, has_more))
}

/// A page of items as a list object.
pub fn listed(data: &[Value], has_more: bool) -> Value {
    let id = |v: Option<&Value>| v.and_then(|it| it.get("id")).cloned();
    json!({
        "object": "list",
        "first_id": id(data.first()),
        "last_id": id(data.last()),
        "has_more": has_more,
        "data": data,
    })
}

/// The 400 for a cursor (`param`: `after`, `before`) naming `id`, no item of the `what`
/// (`response`, `conversation`) listed.
pub fn no_such_item(id: &str, param: &str, what: &str) -> ApiError {
    ApiError::bad(
        format!("No item with id {id:?} in this {what}."),
        Some(param.to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| json!({"id": format!("msg_{i}"), "role": "user", "content": format!("{i}")}))
            .collect()
    }

    fn ids(list: &Value) -> Vec<&str> {
        list["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|i| i["id"].as_str().expect("id"))
            .collect()
    }

    fn page(q: &str) -> Page {
        super::page(Some(q)).expect("a valid query")
    }

    #[test]
    fn items_are_stored_in_the_listed_shape() {
        let user = stored(&json!({"role": "user", "content": "hi"}), fresh_id);
        assert_eq!(user["type"], "message");
        assert_eq!(user["status"], "completed");
        assert_eq!(
            user["content"],
            json!([{"type": "input_text", "text": "hi"}])
        );
        assert!(user["id"].as_str().expect("id").starts_with("msg_"));
        let said = json!({"type": "message", "role": "assistant",
                          "content": [{"type": "output_text", "text": "yo"}]});
        let said = stored(&said, fresh_id);
        assert_eq!(said["content"][0]["annotations"], json!([]));
        let out = json!({"type": "function_call_output", "call_id": "c", "output": "1"});
        assert!(stored(&out, fresh_id)["id"]
            .as_str()
            .expect("id")
            .starts_with("fco_"));
        // Already stored: unchanged (ids are kept along a chain of answers).
        assert_eq!(stored(&user, |_| unreachable!()), user);
    }

    #[test]
    fn pages_walk_the_list_either_way() {
        let all = items(5);
        let first = list(all.clone(), &page("limit=2")).expect("list");
        assert_eq!(ids(&first), ["msg_4", "msg_3"], "newest first by default");
        assert_eq!(first["has_more"], true);
        assert_eq!(first["first_id"], "msg_4");
        assert_eq!(first["last_id"], "msg_3");
        let next = list(all.clone(), &page("limit=2&after=msg_3")).expect("list");
        assert_eq!(ids(&next), ["msg_2", "msg_1"]);
        let last = list(all.clone(), &page("limit=2&after=msg_1")).expect("list");
        assert_eq!(ids(&last), ["msg_0"]);
        assert_eq!(last["has_more"], false);
        let asc = list(all.clone(), &page("order=asc&limit=3")).expect("list");
        assert_eq!(ids(&asc), ["msg_0", "msg_1", "msg_2"]);
        let back = list(all.clone(), &page("order=asc&limit=2&before=msg_3")).expect("list");
        assert_eq!(ids(&back), ["msg_1", "msg_2"], "the page just before");
        assert_eq!(back["has_more"], true);
        let whole = list(all, &page("order=asc&limit=100")).expect("list");
        assert_eq!(ids(&whole).len(), 5);
        let empty = list(Vec::new(), &page("")).expect("list");
        assert_eq!(empty["first_id"], Value::Null);
        assert_eq!(empty["has_more"], false);
    }

    #[test]
    fn bad_queries_name_their_parameter() {
        for (q, param) in [
            ("limit=0", "limit"),
            ("limit=101", "limit"),
            ("limit=x", "limit"),
            ("order=up", "order"),
            ("include=file_search_call.results", "include"),
            ("colour=blue", "colour"),
        ] {
            let e = super::page(Some(q)).expect_err(q);
            assert_eq!(e.param(), Some(param), "{q}");
        }
        let e = list(items(2), &page("after=msg_9")).expect_err("unknown cursor");
        assert_eq!(e.param(), Some("after"));
        assert!(super::page(Some("include[]=message.output_text.logprobs")).is_ok());
    }
}
