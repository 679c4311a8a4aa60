//! Responses the gateway makes itself: errors as JSON, and the readable 403 page for browsers.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

/// The body type of every response.
pub(crate) type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A JSON error `{"error": code, "message": …}`; with `html`, a readable page instead.
pub(crate) fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    html: Option<&str>,
) -> Response<Body> {
    let (content_type, body) = error_parts(status, code, message, html);
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The content type and body of [`error_response`].
pub(crate) fn error_parts(
    status: StatusCode,
    code: &str,
    message: &str,
    html: Option<&str>,
) -> (&'static str, String) {
    match html {
        Some(extra) => (
            "text/html; charset=utf-8",
            format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>{status}</title></head>\
                 <body><h1>{}</h1><p>{}</p>{extra}<p><small>reason: <code>{}</code></small></p></body></html>",
                escape(status.canonical_reason().unwrap_or("Error")),
                escape(message),
                escape(code)
            ),
        ),
        None => (
            "application/json",
            serde_json::json!({ "error": code, "message": message }).to_string(),
        ),
    }
}

/// A body from bytes.
pub(crate) fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Minimal HTML escaping for text nodes and attribute values.
pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
