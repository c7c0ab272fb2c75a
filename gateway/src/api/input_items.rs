//! The input items of stored answers: their stored shape ([`stored`]: every item has an
//! id, messages their content as typed parts, a status), and
//! the pages of `GET /v1/responses/{id}/input_items` and of a conversation's items
//! ([`Page`], read by the store, answered by [`Page::answer`]): the conversation an answer
//! was given (the items of the answers it continued, then its own input), a page at a
//! time as OpenAI lists it: `limit` (1–100, 20), `order` (`desc` by default), `after` /
//! `before` an item id; answered `{object: "list", data, first_id, last_id, has_more}`.
//! What a stored answer keeps of its request's conversation: [`lineage`].
//! Ids are given when an answer is stored, so a chain of answers lists the same items
//! under the same ids.

use super::error::ApiError;
use super::validate::ResponsesInfo;
use crate::response_store::{ItemsPage, Paged, Parent};
use serde_json::{json, Map, Value};

/// The id prefix of an item of type `kind`.
fn prefix(kind: &str) -> &'static str {
    match kind {
        "function_call" => "fc",
        "function_call_output" => "fco",
        "reasoning" => "rs",
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
/// one's), and its own input items (the whole conversation's, where it continues no
/// stored answer). All already in their stored shape: read from the store, or given
/// their ids when the request was read ([`super::responses::validate_map`]).
pub fn lineage(info: &ResponsesInfo) -> (Option<Parent>, Vec<Value>) {
    let parent = info.continues.as_ref().map(|(id, inherits)| Parent {
        id: id.clone(),
        inherits: *inherits,
        prefix: info.conversation.clone(),
    });
    let from = parent.as_ref().map_or(0, |p| p.inherits);
    (
        parent,
        info.conversation.get(from..).unwrap_or(&[]).to_vec(),
    )
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

impl Page {
    /// The page as the store reads it.
    pub fn asked(&self) -> ItemsPage<'_> {
        ItemsPage {
            limit: self.limit,
            desc: self.desc,
            after: self.after.as_deref(),
            before: self.before.as_deref(),
        }
    }

    /// The list object of `paged` (its items in their listed shape), or the 400 for a
    /// cursor that names no item of the `what` (`response`, `conversation`) listed.
    pub fn answer(&self, paged: Paged, what: &str) -> Result<Value, ApiError> {
        match paged {
            Paged::Items { items, has_more } => {
                let items: Vec<Value> = items
                    .iter()
                    .map(|item| stored(item, |_| String::new()))
                    .collect();
                Ok(listed(&items, has_more))
            }
            Paged::NoSuchItem { param } => {
                let id = match param {
                    "after" => self.after.as_deref(),
                    _ => self.before.as_deref(),
                };
                Err(no_such_item(id.unwrap_or_default(), param, what))
            }
        }
    }
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

    #[test]
    fn a_page_is_answered_as_a_list_of_items_in_their_listed_shape() {
        let page = super::page(Some("limit=2")).expect("a valid query");
        let items = vec![
            json!({"id": "msg_2", "role": "user", "content": "two"}),
            json!({"id": "msg_1", "type": "message", "role": "assistant",
                   "content": [{"type": "output_text", "text": "one"}]}),
        ];
        let list = page
            .answer(
                Paged::Items {
                    items,
                    has_more: true,
                },
                "response",
            )
            .expect("a page");
        assert_eq!(list["object"], "list");
        assert_eq!(
            (&list["first_id"], &list["last_id"]),
            (&json!("msg_2"), &json!("msg_1"))
        );
        assert_eq!(list["has_more"], true);
        assert_eq!(list["data"][0]["content"][0]["type"], "input_text");
        assert_eq!(list["data"][1]["content"][0]["annotations"], json!([]));
        let empty = page
            .answer(
                Paged::Items {
                    items: vec![],
                    has_more: false,
                },
                "response",
            )
            .expect("a page");
        assert_eq!(
            (&empty["first_id"], &empty["has_more"]),
            (&Value::Null, &json!(false))
        );
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
        let page = super::page(Some("after=msg_9")).expect("a valid query");
        let e = page
            .answer(Paged::NoSuchItem { param: "after" }, "response")
            .expect_err("unknown cursor");
        assert_eq!(e.param(), Some("after"));
        assert!(e.to_string().contains("msg_9"), "{e}");
        assert!(super::page(Some("include[]=message.output_text.logprobs")).is_ok());
    }
}
