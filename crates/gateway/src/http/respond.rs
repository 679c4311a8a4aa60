//! Responses the gateway makes itself: errors as JSON, and the readable 403 page for browsers.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

/// The body type of every response.
/// The body of every answer the gateway makes.
pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Marks a response the gateway made itself (not an upstream's), with its reason code and
/// message: what a gRPC client gets as a gRPC status instead.
#[derive(Debug, Clone)]
pub(crate) struct GatewayAnswer {
    pub(crate) reason: String,
    pub(crate) message: String,
}

/// A JSON error `{"error": code, "message": …}`; with `html`, a readable page instead.
pub(crate) fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    html: Option<&str>,
) -> Response<Body> {
    let (content_type, body) = error_parts(status, code, message, html);
    let mut resp = Response::new(full(body));
    resp.extensions_mut().insert(GatewayAnswer {
        reason: code.to_string(),
        message: message.to_string(),
    });
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

/// What the readable failure page says about the certificate presented, if any.
pub(crate) struct Presented<'a> {
    pub(crate) subject: &'a str,
    pub(crate) issuer: &'a str,
    pub(crate) not_after: &'a str,
    pub(crate) expired: bool,
}

/// The headline a person reads first, by reason code.
fn headline(code: &str) -> &'static str {
    match code {
        "no-certificate" => "A certificate is required",
        "expired" => "Your certificate has expired",
        "not-yet-valid" => "Your certificate is not valid yet",
        "revoked" => "Your certificate has been revoked",
        "untrusted-issuer" | "v1-intermediate" => "Your certificate is not trusted here",
        "unregistered" | "inactive" => "Your certificate is not enabled for this service",
        "wrong-usage" => "Your certificate is not meant for signing in",
        "forbidden" | "policy-denied" => "Access denied",
        "revocation-unknown" => "Your certificate's revocation status is being checked",
        _ => "Your certificate was not accepted",
    }
}

/// `message` without certificate ids (64 hex digits mean nothing to the person reading).
fn without_ids(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut run = String::new();
    for c in message.chars().map(Some).chain(std::iter::once(None)) {
        if let Some(c) = c.filter(char::is_ascii_hexdigit) {
            run.push(c);
            continue;
        }
        out.push_str(if run.len() >= 40 { "(id)" } else { &run });
        run.clear();
        if let Some(c) = c {
            out.push(c);
        }
    }
    out.replace("certificate (id) ", "certificate ")
        .replace(" (id)", "")
}

/// The readable failure page (HTML, the console's look, readable on a phone): what happened in
/// words, the certificate presented (subject, issuer, expiry), what to do (`advice_html`:
/// paragraphs, already escaped) and the reason code for the administrator.
pub(crate) fn failure_page(
    status: StatusCode,
    code: &str,
    message: &str,
    presented: Option<&Presented<'_>>,
    advice_html: &str,
) -> String {
    let certificate = match presented {
        Some(p) => format!(
            "<section class=\"card\"><h2>The certificate your browser presented</h2><dl>\
             <dt>Subject</dt><dd>{}</dd><dt>Issuer</dt><dd>{}</dd><dt>Valid until</dt><dd{}>{}{}</dd></dl></section>",
            escape(p.subject),
            escape(p.issuer),
            if p.expired { " class=\"bad\"" } else { "" },
            escape(p.not_after),
            if p.expired { " (expired)" } else { "" }
        ),
        None => String::new(),
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{status_text} — {headline}</title><style>{FAILURE_CSS}</style></head><body><main>\
         <p class=\"status\">{status_code} · {status_text}</p><h1>{headline}</h1><p class=\"lead\">{message}</p>\
         {certificate}<section class=\"card\">{advice_html}</section>\
         <p class=\"reason\">Reason for your administrator: <code>{code}</code></p></main></body></html>",
        status_code = status.as_u16(),
        status_text = escape(status.canonical_reason().unwrap_or("Error")),
        headline = escape(headline(code)),
        message = escape(&without_ids(message)),
        code = escape(code),
    )
}

/// The failure page's style: the console's colours and type, one column, readable on a phone.
const FAILURE_CSS: &str = "*{box-sizing:border-box}\
body{margin:0;font:16px/1.5 system-ui,-apple-system,\"Segoe UI\",sans-serif;color:#1d2330;background:#f6f7f9}\
main{max-width:640px;margin:0 auto;padding:32px 20px}\
.status{margin:0;color:#b42318;font-weight:600;font-size:14px;letter-spacing:.4px;text-transform:uppercase}\
h1{font-size:26px;line-height:1.25;margin:6px 0 12px}\
h2{font-size:16px;margin:0 0 8px}\
.lead{color:#3a4252;margin:0 0 20px}\
.card{background:#fff;border:1px solid #dde1e8;border-radius:10px;padding:16px 18px;margin:0 0 16px}\
.card p{margin:0 0 8px}.card p:last-child{margin:0}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}\
dt{color:#5c6577}dd{margin:0;word-break:break-word}.bad{color:#b42318;font-weight:600}\
.reason{color:#5c6577;font-size:13px}code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace}\
@media (max-width:480px){h1{font-size:22px}dl{grid-template-columns:1fr}dt{margin-top:6px}}";

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failure_page_names_no_certificate_id_and_escapes_what_it_shows() {
        let id = "812960857f8089d05e7d1af066b7cc1a342f8ea29784d6f1a3d9fc46983d9721";
        assert_eq!(
            without_ids(&format!("certificate {id} is INACTIVE in the registry")),
            "certificate is INACTIVE in the registry"
        );
        assert_eq!(
            without_ids("serial 0a:ff, CN=cafe"),
            "serial 0a:ff, CN=cafe"
        );
        let page = failure_page(
            StatusCode::FORBIDDEN,
            "expired",
            &format!("The client certificate {id} expired"),
            Some(&Presented {
                subject: "CN=<b>alice</b>",
                issuer: "CN=int",
                not_after: "2020-01-01T00:00:00Z",
                expired: true,
            }),
            "<h2>What to do</h2><p>Renew it.</p>",
        );
        assert!(!page.contains(id), "{page}");
        assert!(page.contains("Your certificate has expired"), "{page}");
        assert!(page.contains("CN=&lt;b&gt;alice&lt;/b&gt;"), "{page}");
        assert!(
            page.contains("(expired)") && page.contains("Renew it."),
            "{page}"
        );
        assert!(page.contains("name=\"viewport\""), "{page}");
    }
}
