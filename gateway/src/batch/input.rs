//! A batch's input file read and checked: JSON Lines, one request a line
//! (`{"custom_id", "method": "POST", "url", "body"}`), every request for the batch's
//! endpoint, `custom_id`s unique, every body one the endpoint would accept from this tenant
//! (its model reachable, not streamed). Every fault is reported with its line (1-based),
//! as the API's `errors` list; a file with any fault runs nothing.

use crate::api::error::ApiError;
use crate::api::validate::InferenceRequest;
use crate::config::ServerConfig;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// The endpoints a batch may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Responses,
}

type Validator = fn(&[u8], &ServerConfig) -> Result<InferenceRequest, ApiError>;

impl Endpoint {
    pub const ALL: [Endpoint; 4] = [
        Endpoint::Chat,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Responses,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Responses => "/v1/responses",
        }
    }

    pub fn parse(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.path() == path)
    }

    /// What reads its request bodies: the endpoint's own validator.
    pub fn validator(self) -> Validator {
        match self {
            Endpoint::Chat => crate::api::validate::chat,
            Endpoint::Completions => crate::api::validate::completion,
            Endpoint::Embeddings => crate::api::embeddings::validate,
            Endpoint::Responses => responses,
        }
    }
}

/// A `/v1/responses` body of a batch: whole in itself (it continues no stored response or
/// conversation, and runs in the batch, not in the background), else read as the endpoint
/// reads it.
fn responses(body: &[u8], server: &ServerConfig) -> Result<InferenceRequest, ApiError> {
    let req = crate::api::responses::read(body)?;
    for k in ["previous_response_id", "conversation", "background"] {
        if req
            .get(k)
            .is_some_and(|v| !v.is_null() && v != &serde_json::Value::Bool(false))
        {
            return Err(ApiError::BadRequest {
                message: format!(
                    "`{k}` is not taken in a batch: each of its requests is whole in itself."
                ),
                param: Some(k.into()),
                code: Some("unsupported_parameter"),
            });
        }
    }
    crate::api::responses::validate_map(req, server, None)
}

/// One request of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub custom_id: String,
    /// Its body, as JSON bytes.
    pub body: Bytes,
    /// The model it asks for.
    pub model: String,
}

/// A fault of an input file, as the API lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fault {
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    /// 1-based; none for the file as a whole.
    pub line: Option<usize>,
}

#[derive(Deserialize)]
struct RawLine {
    custom_id: Option<String>,
    method: Option<String>,
    url: Option<String>,
    body: Option<Box<serde_json::value::RawValue>>,
}

/// Most faults listed; past them the list says how many more there were.
const MAX_FAULTS: usize = 100;

/// What the checks of each line need: the batch's endpoint, the server's limits, and
/// whether the tenant can reach a model.
pub struct Checks<'a> {
    pub endpoint: Endpoint,
    pub server: &'a ServerConfig,
    pub max_requests: usize,
    pub reachable: &'a dyn Fn(&str) -> bool,
}

/// The requests of `content`, or every fault found (at most [`MAX_FAULTS`], then one that
/// counts the rest).
pub fn read(content: &[u8], checks: &Checks<'_>) -> Result<Vec<Line>, Vec<Fault>> {
    let mut lines = Vec::new();
    let mut faults = Vec::new();
    let mut ids = HashSet::new();
    let mut more = 0usize;
    let text = match std::str::from_utf8(content) {
        Ok(t) => t,
        Err(e) => {
            return Err(vec![Fault {
                code: "invalid_file_format",
                message: format!("The input file is not UTF-8 text: {e}."),
                param: None,
                line: None,
            }])
        }
    };
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        if lines.len() + faults.len() + more >= checks.max_requests {
            return Err(vec![Fault {
                code: "too_many_requests",
                message: format!(
                    "The input file holds more than {} requests, the most one batch may run.",
                    checks.max_requests
                ),
                param: None,
                line: Some(n),
            }]);
        }
        match line(raw, n, checks, &mut ids) {
            Ok(l) => lines.push(l),
            Err(_) if faults.len() >= MAX_FAULTS => more += 1,
            Err(f) => faults.push(f),
        }
    }
    if lines.is_empty() && faults.is_empty() {
        faults.push(Fault {
            code: "empty_file",
            message: "The input file holds no requests.".into(),
            param: None,
            line: None,
        });
    }
    if more > 0 {
        faults.push(Fault {
            code: "too_many_errors",
            message: format!("{more} more lines have faults (the first {MAX_FAULTS} are listed)."),
            param: None,
            line: None,
        });
    }
    match faults.is_empty() {
        true => Ok(lines),
        false => Err(faults),
    }
}

/// Line `n` (1-based) checked.
fn line(
    raw: &str,
    n: usize,
    checks: &Checks<'_>,
    ids: &mut HashSet<String>,
) -> Result<Line, Fault> {
    let at = |code, message: String, param: Option<&str>| Fault {
        code,
        message,
        param: param.map(str::to_string),
        line: Some(n),
    };
    let parsed: RawLine = serde_json::from_str(raw).map_err(|e| {
        at(
            "invalid_json_line",
            format!(
                "Line {n} is not a request object `{{\"custom_id\", \"method\", \"url\", \"body\"}}`: {e}."
            ),
            None,
        )
    })?;
    let custom_id = match parsed.custom_id {
        Some(id) if !id.is_empty() => id,
        _ => {
            return Err(at(
                "missing_required_parameter",
                format!("Line {n} has no `custom_id`."),
                Some("custom_id"),
            ))
        }
    };
    if parsed.method.as_deref() != Some("POST") {
        return Err(at(
            "invalid_method",
            format!("Line {n}: `method` must be \"POST\"."),
            Some("method"),
        ));
    }
    let want = checks.endpoint.path();
    if parsed.url.as_deref() != Some(want) {
        return Err(at(
            "mismatched_url",
            format!(
                "Line {n}: `url` is {:?}, but this batch runs `{want}` (its `endpoint`).",
                parsed.url.unwrap_or_default()
            ),
            Some("url"),
        ));
    }
    let Some(body) = parsed.body else {
        return Err(at(
            "missing_required_parameter",
            format!("Line {n} has no `body`."),
            Some("body"),
        ));
    };
    let body = Bytes::copy_from_slice(body.get().as_bytes());
    if body.len() > checks.server.max_body_bytes {
        return Err(at(
            "request_too_large",
            format!(
                "Line {n}: its body is larger than the limit of {} bytes.",
                checks.server.max_body_bytes
            ),
            Some("body"),
        ));
    }
    let req = (checks.endpoint.validator())(&body, checks.server).map_err(|e| {
        let param = e.param().map(|p| format!("body.{p}"));
        at(
            e.code().unwrap_or("invalid_request"),
            format!("Line {n}: {e}"),
            param.as_deref(),
        )
    })?;
    if req.stream {
        return Err(at(
            "invalid_value",
            format!("Line {n}: a batch's requests are not streamed (`stream` must be false)."),
            Some("body.stream"),
        ));
    }
    if !(checks.reachable)(&req.model) {
        return Err(at(
            "model_not_found",
            format!(
                "Line {n}: the model `{}` does not exist or you do not have access to it.",
                req.model
            ),
            Some("body.model"),
        ));
    }
    if !ids.insert(custom_id.clone()) {
        return Err(at(
            "duplicate_custom_id",
            format!("Line {n}: the `custom_id` {custom_id:?} is used by an earlier line."),
            Some("custom_id"),
        ));
    }
    Ok(Line {
        custom_id,
        body,
        model: req.model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_as(endpoint: Endpoint, text: impl AsRef<[u8]>) -> Result<Vec<Line>, Vec<Fault>> {
        let server = ServerConfig::default();
        let checks = Checks {
            endpoint,
            server: &server,
            max_requests: 10,
            reachable: &|m| m == "m",
        };
        read(text.as_ref(), &checks)
    }

    fn chat(id: &str, model: &str) -> String {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}}}"#
        )
    }

    #[test]
    fn a_good_file_gives_its_requests_in_order() {
        let text = format!("{}\n\n{}\n", chat("a", "m"), chat("b", "m"));
        let lines = read_as(Endpoint::Chat, text).expect("valid");
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].custom_id, "a");
        assert_eq!(lines[1].custom_id, "b");
        let body: serde_json::Value = serde_json::from_slice(&lines[1].body).expect("json");
        assert_eq!(body["model"], "m");
    }

    #[test]
    fn every_fault_is_reported_with_its_line() {
        let text = [
            chat("a", "m"),
            "not json".into(),
            chat("a", "m"),
            chat("c", "other"),
            chat("d", "m").replace("/v1/chat/completions", "/v1/completions"),
            r#"{"custom_id":"e","method":"GET","url":"/v1/chat/completions","body":{}}"#.into(),
            r#"{"custom_id":"f","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[],"stream":false}}"#.into(),
        ]
        .join("\n");
        let faults = read_as(Endpoint::Chat, text).expect_err("faulty");
        let got: Vec<(Option<usize>, &str)> = faults.iter().map(|f| (f.line, f.code)).collect();
        assert_eq!(
            got,
            [
                (Some(2), "invalid_json_line"),
                (Some(3), "duplicate_custom_id"),
                (Some(4), "model_not_found"),
                (Some(5), "mismatched_url"),
                (Some(6), "invalid_method"),
                (Some(7), "invalid_request"),
            ]
        );
        assert_eq!(faults[2].param.as_deref(), Some("body.model"));
    }

    #[test]
    fn responses_requests_are_whole_in_themselves() {
        let line = |body: &str| {
            format!(r#"{{"custom_id":"a","method":"POST","url":"/v1/responses","body":{body}}}"#)
        };
        let ok = read_as(
            Endpoint::Responses,
            line(r#"{"model":"m","input":"hi","store":false}"#),
        );
        assert_eq!(ok.expect("valid").len(), 1);
        for field in [r#""previous_response_id":"resp_1""#, r#""background":true"#] {
            let body = format!(r#"{{"model":"m","input":"hi",{field}}}"#);
            let f = read_as(Endpoint::Responses, line(&body)).expect_err("refused");
            assert_eq!(f[0].code, "unsupported_parameter", "{field}");
        }
    }

    #[test]
    fn streamed_requests_empty_files_and_long_files_are_refused() {
        let streamed = chat("a", "m").replace(r#""model":"m""#, r#""model":"m","stream":true"#);
        let f = read_as(Endpoint::Chat, streamed).expect_err("streamed");
        assert_eq!(f[0].param.as_deref(), Some("body.stream"));
        let f = read_as(Endpoint::Chat, "\n\n").expect_err("empty");
        assert_eq!(f[0].code, "empty_file");
        let eleven: Vec<String> = (0..11).map(|i| chat(&i.to_string(), "m")).collect();
        let f = read_as(Endpoint::Chat, eleven.join("\n")).expect_err("too many");
        assert_eq!((f[0].code, f[0].line), ("too_many_requests", Some(11)));
        let f = read_as(Endpoint::Chat, [b'{', 0xff, 0xfe]).expect_err("binary");
        assert_eq!((f.len(), f[0].code), (1, "invalid_file_format"));
    }
}
