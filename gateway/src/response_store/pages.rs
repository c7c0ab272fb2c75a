//! Pages of a list of items, as the API lists a conversation's items and an answer's
//! input items: what a page asks for ([`ItemsPage`]) and what it holds ([`Paged`]); a
//! page of a list read whole ([`Paged::of`]) is what the stores' own page reads (a range
//! of a conversation, the newest items of a chain of answers) must equal.

use serde_json::Value;

/// Which page of a list of items is asked for: at most `limit` items, newest first when
/// `desc`, those after the item `after` and/or before the item `before` in that order.
#[derive(Debug, Clone, Copy)]
pub struct ItemsPage<'a> {
    pub limit: usize,
    pub desc: bool,
    pub after: Option<&'a str>,
    pub before: Option<&'a str>,
}

/// A page of a list of items.
#[derive(Debug, Clone, PartialEq)]
pub enum Paged {
    /// The page's items in the order asked, and whether more lie past it (before it,
    /// for a page asked only `before` an item).
    Items { items: Vec<Value>, has_more: bool },
    /// The cursor `param` (`after`, `before`) names no item of the list.
    NoSuchItem { param: &'static str },
}

impl Paged {
    /// The page `page` of `items` (in list order, each with its `id`). A cursor names
    /// the first item of that id in the order asked.
    pub fn of(mut items: Vec<Value>, page: ItemsPage<'_>) -> Paged {
        if page.desc {
            items.reverse();
        }
        let at = |cursor: Option<&str>| {
            cursor.map(|id| {
                items
                    .iter()
                    .position(|it| it.get("id").and_then(Value::as_str) == Some(id))
            })
        };
        let start = match at(page.after) {
            None => 0,
            Some(Some(i)) => i + 1,
            Some(None) => return Paged::NoSuchItem { param: "after" },
        };
        let end = match at(page.before) {
            None => items.len(),
            Some(Some(i)) => i,
            Some(None) => return Paged::NoSuchItem { param: "before" },
        };
        let window = items.get(start..end).unwrap_or(&[]);
        let has_more = window.len() > page.limit;
        // Only `before`: the page just before it; otherwise the page from the start.
        let data = if page.before.is_some() && page.after.is_none() {
            &window[window.len().saturating_sub(page.limit)..]
        } else {
            &window[..window.len().min(page.limit)]
        };
        Paged::Items {
            items: data.to_vec(),
            has_more,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn items(n: usize) -> Vec<Value> {
        (0..n).map(|i| json!({"id": format!("msg_{i}")})).collect()
    }

    fn page<'a>(
        limit: usize,
        desc: bool,
        after: Option<&'a str>,
        before: Option<&'a str>,
    ) -> ItemsPage<'a> {
        ItemsPage {
            limit,
            desc,
            after,
            before,
        }
    }

    fn ids(p: &Paged) -> (Vec<&str>, bool) {
        match p {
            Paged::Items { items, has_more } => (
                items
                    .iter()
                    .map(|i| i["id"].as_str().expect("id"))
                    .collect(),
                *has_more,
            ),
            Paged::NoSuchItem { param } => panic!("no item for {param}"),
        }
    }

    #[test]
    fn pages_walk_the_list_either_way() {
        let all = items(5);
        let of = |p| Paged::of(all.clone(), p);
        assert_eq!(
            ids(&of(page(2, true, None, None))),
            (vec!["msg_4", "msg_3"], true)
        );
        assert_eq!(
            ids(&of(page(2, true, Some("msg_3"), None))),
            (vec!["msg_2", "msg_1"], true)
        );
        assert_eq!(
            ids(&of(page(2, true, Some("msg_1"), None))),
            (vec!["msg_0"], false)
        );
        assert_eq!(
            ids(&of(page(3, false, None, None))),
            (vec!["msg_0", "msg_1", "msg_2"], true)
        );
        assert_eq!(
            ids(&of(page(2, false, None, Some("msg_3")))),
            (vec!["msg_1", "msg_2"], true),
            "the page just before"
        );
        assert_eq!(ids(&of(page(100, false, None, None))).0.len(), 5);
        assert_eq!(
            ids(&Paged::of(Vec::new(), page(20, true, None, None))),
            (vec![], false)
        );
        assert_eq!(
            of(page(2, true, Some("msg_9"), None)),
            Paged::NoSuchItem { param: "after" }
        );
        assert_eq!(
            of(page(2, true, None, Some("msg_9"))),
            Paged::NoSuchItem { param: "before" }
        );
    }
}
