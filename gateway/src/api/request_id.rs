//! Request ids and the per-request tracing span: `x-request-id` is taken from the client
//! when it is a sane token (1–128 visible ASCII characters) or made fresh, recorded on the
//! span, handed to handlers as [`RequestId`] and returned on the response.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use http::HeaderValue;
use std::sync::Arc;
use tracing::Instrument;

#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);

fn acceptable(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?;
    (!s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())).then_some(s)
}

pub async fn layer(mut req: Request, next: Next) -> Response {
    let id: Arc<str> = match req.headers().get("x-request-id").and_then(acceptable) {
        Some(s) => s.into(),
        None => uuid::Uuid::new_v4().simple().to_string().into(),
    };
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!(
        "request",
        id = %id,
        method = %req.method(),
        path = %req.uri().path(),
        tenant = tracing::field::Empty,
    );
    let mut resp = next.run(req).instrument(span).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}
