//! The one place where errors become HTTP: [`ApiError`] → status + OpenAI error JSON
//! `{"error":{"message","type","param","code"}}` (+ `retry-after` where it applies).

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use serde::Serialize;

/// Everything a tenant-facing request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    #[error("Not found: {0}")]
    NotFound(String),
    #[error("Request body is larger than the limit of {limit} bytes.")]
    PayloadTooLarge { limit: usize },
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_ms: u64,
    },
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after_ms: u64,
    },
    #[error(
        "This tenant's stored responses and conversations take {stored} bytes, at or past its \
         quota of {quota} bytes: delete some (`DELETE /v1/responses/{{id}}`, \
         `DELETE /v1/conversations/{{id}}`), wait for some to expire, or send `store: false`."
    )]
    StorageQuota { stored: u64, quota: u64 },
    #[error(
        "This tenant's files take {stored} bytes; with this one they would pass its quota of \
         {quota} bytes: delete some (`DELETE /v1/files/{{id}}`) or wait for some to expire."
    )]
    FilesQuota { stored: u64, quota: u64 },
    #[error("{0}")]
    Upstream(String),
    #[error("The request timed out.")]
    Timeout,
    #[error("Internal error: {0}")]
    Internal(String),
}

/// A `json_schema` the engine cannot follow: a 400 that names the keyword or the place.
impl From<kernels::json_schema::SchemaError> for ApiError {
    fn from(e: kernels::json_schema::SchemaError) -> Self {
        let code = match e {
            kernels::json_schema::SchemaError::Unsupported { .. } => Some("unsupported_parameter"),
            _ => None,
        };
        ApiError::BadRequest {
            message: format!("`response_format.json_schema.schema`: {e}."),
            param: Some("response_format.json_schema.schema".into()),
            code,
        }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn bad(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: param.into(),
            code: None,
        }
    }

    /// A parameter the endpoint does not know.
    pub fn unknown(param: &str) -> Self {
        Self::bad(
            format!("Unknown parameter: {param:?}."),
            Some(param.to_string()),
        )
    }

    pub fn unsupported(param: &str, what: &str) -> Self {
        ApiError::BadRequest {
            message: format!("`{param}`: {what} is not supported by this gateway."),
            param: Some(param.to_string()),
            code: Some("unsupported_parameter"),
        }
    }

    /// A parameter this gateway's configuration turns off, and what to do instead.
    pub fn turned_off(param: &str, what: &str, instead: &str) -> Self {
        ApiError::BadRequest {
            message: format!("`{param}`: {what} is turned off on this gateway; {instead}."),
            param: Some(param.to_string()),
            code: Some("unsupported_parameter"),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::StorageQuota { .. } | ApiError::FilesQuota { .. } => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ApiError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            ApiError::BadRequest { code, .. } => ("invalid_request_error", *code),
            ApiError::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key")),
            ApiError::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            ApiError::NotFound(_) => ("invalid_request_error", Some("not_found")),
            ApiError::PayloadTooLarge { .. } => {
                ("invalid_request_error", Some("request_too_large"))
            }
            ApiError::StorageQuota { .. } | ApiError::FilesQuota { .. } => {
                ("invalid_request_error", Some("storage_quota_exceeded"))
            }
            ApiError::RateLimited { .. } => ("rate_limit_error", Some("rate_limit_exceeded")),
            ApiError::Overloaded { .. } => ("server_error", Some("overloaded")),
            ApiError::Upstream(_) => ("server_error", Some("upstream_error")),
            ApiError::Timeout => ("server_error", Some("timeout")),
            ApiError::Internal(_) => ("server_error", None),
        }
    }

    /// The OpenAI error's `code`.
    pub fn code(&self) -> Option<&'static str> {
        self.kind_and_code().1
    }

    /// The OpenAI error's `param`: the request field at fault, where there is one.
    pub fn param(&self) -> Option<&str> {
        match self {
            ApiError::BadRequest { param, .. } => param.as_deref(),
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// The OpenAI error JSON for this error (also used as an SSE error event).
    pub fn to_json(&self) -> String {
        let (kind, code) = self.kind_and_code();
        let body = Body {
            error: Inner {
                message: self.to_string(),
                kind,
                param: self.param(),
                code,
            },
        };
        serde_json::to_string(&body).unwrap_or_else(|_| {
            r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#.into()
        })
    }

    fn retry_after_ms(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after_ms, .. }
            | ApiError::Overloaded { retry_after_ms, .. } => Some(*retry_after_ms),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status(),
            [(http::header::CONTENT_TYPE, "application/json")],
            self.to_json(),
        )
            .into_response();
        if let Some(ms) = self.retry_after_ms() {
            let h = resp.headers_mut();
            // retry-after is whole seconds, rounded up so that a retry then is not early.
            h.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(ms.div_ceil(1000).max(1)),
            );
            h.insert("retry-after-ms", HeaderValue::from(ms));
        }
        resp
    }
}
