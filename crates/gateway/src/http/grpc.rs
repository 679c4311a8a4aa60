//! gRPC through the gateway. Calls are HTTP/2 requests proxied like any other (streamed both
//! ways, trailers included) to an `h2c` or `h2` upstream; what is gRPC's own:
//!
//! - the gateway's own answers (a refused certificate, a policy denial, an upstream down or too
//!   slow, no route) go back as gRPC statuses a client can read — HTTP 200, `content-type:
//!   application/grpc`, `grpc-status` and `grpc-message` in a trailers-only response — instead
//!   of JSON bodies;
//! - `grpc-timeout` shortens the wait for the upstream's answer, never past the configured
//!   limit (forwarded, so the upstream holds the same deadline);
//! - `te: trailers` is forwarded to HTTP/2 upstreams (gRPC servers want it).

use std::time::Duration;

use bytes::Bytes;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};

use crate::http::respond::{Body, GatewayAnswer, full};

/// gRPC status codes the gateway answers with.
pub(crate) mod code {
    pub(crate) const UNKNOWN: u32 = 2;
    pub(crate) const DEADLINE_EXCEEDED: u32 = 4;
    pub(crate) const PERMISSION_DENIED: u32 = 7;
    pub(crate) const RESOURCE_EXHAUSTED: u32 = 8;
    pub(crate) const UNIMPLEMENTED: u32 = 12;
    pub(crate) const INTERNAL: u32 = 13;
    pub(crate) const UNAVAILABLE: u32 = 14;
    pub(crate) const UNAUTHENTICATED: u32 = 16;
}

/// Whether a request is a gRPC call (`content-type: application/grpc`, `+proto`, `+json`…).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The call's deadline from `grpc-timeout` (up to 8 digits and a unit: `H`, `M`, `S`, `m`, `u`,
/// `n`), if it has a valid one.
pub(crate) fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC status for one of the gateway's own answers (its HTTP status and reason code), after
/// gRPC's HTTP-to-status mapping, made more precise where the gateway knows more.
pub(crate) fn status_for(status: StatusCode, reason: &str) -> u32 {
    match (status, reason) {
        (_, "upstream-timeout") => code::DEADLINE_EXCEEDED,
        (_, "upstream-unavailable") => code::UNAVAILABLE,
        (StatusCode::FORBIDDEN, "policy-denied" | "forbidden" | "claim-certificate") => {
            code::PERMISSION_DENIED
        }
        // Every other refusal on 403 is about the client certificate.
        (StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED, _) => code::UNAUTHENTICATED,
        (StatusCode::NOT_FOUND, _) => code::UNIMPLEMENTED,
        (StatusCode::TOO_MANY_REQUESTS, _) => code::RESOURCE_EXHAUSTED,
        (StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE, _) => code::UNAVAILABLE,
        (StatusCode::GATEWAY_TIMEOUT, _) => code::DEADLINE_EXCEEDED,
        (StatusCode::BAD_REQUEST, _) => code::INTERNAL,
        _ => code::UNKNOWN,
    }
}

/// A trailers-only gRPC answer (gRPC over HTTP/2: the status in the headers, no message).
pub(crate) fn answer(status: u32, message: &str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::new()));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(status));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", v);
    }
    resp
}

/// The gateway's own answer `resp` as a gRPC status; anything else (the upstream's) unchanged.
pub(crate) fn convert(resp: Response<Body>) -> Response<Body> {
    let Some(own) = resp.extensions().get::<GatewayAnswer>() else {
        return resp;
    };
    let status = status_for(resp.status(), &own.reason);
    let message = format!("{} ({})", own.message, own.reason);
    let mut out = answer(status, &message);
    if let Some(reason) = resp.headers().get("x-portcullis-reason") {
        out.headers_mut()
            .insert("x-portcullis-reason", reason.clone());
    }
    // Kept for the access log and metrics: the decision's own HTTP status.
    out.extensions_mut().insert(DecidedStatus(resp.status()));
    out
}

/// The HTTP status the gateway decided on for a call answered as a gRPC status (what the access
/// log and the request metrics record).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecidedStatus(pub(crate) StatusCode);

/// gRPC's `grpc-message` encoding: percent-encoding of everything outside printable ASCII and
/// of `%` itself.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_read_every_unit_and_refuse_the_malformed() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("grpc-timeout", HeaderValue::from_str(v).unwrap());
            timeout(&m)
        };
        assert_eq!(h("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(h("2M"), Some(Duration::from_secs(120)));
        assert_eq!(h("3S"), Some(Duration::from_secs(3)));
        assert_eq!(h("250m"), Some(Duration::from_millis(250)));
        assert_eq!(h("7u"), Some(Duration::from_micros(7)));
        assert_eq!(h("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S", "m"] {
            assert_eq!(h(bad), None, "{bad:?}");
        }
        assert_eq!(timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn gateway_answers_map_to_grpc_statuses() {
        assert_eq!(
            status_for(StatusCode::FORBIDDEN, "policy-denied"),
            code::PERMISSION_DENIED
        );
        assert_eq!(
            status_for(StatusCode::FORBIDDEN, "certificate-revoked"),
            code::UNAUTHENTICATED
        );
        assert_eq!(
            status_for(StatusCode::FORBIDDEN, "no-certificate"),
            code::UNAUTHENTICATED
        );
        assert_eq!(
            status_for(StatusCode::BAD_GATEWAY, "upstream-unavailable"),
            code::UNAVAILABLE
        );
        assert_eq!(
            status_for(StatusCode::GATEWAY_TIMEOUT, "upstream-timeout"),
            code::DEADLINE_EXCEEDED
        );
        assert_eq!(
            status_for(StatusCode::NOT_FOUND, "no-route"),
            code::UNIMPLEMENTED
        );
        assert_eq!(percent_encode("déjà 100%"), "d%C3%A9j%C3%A0 100%25");
    }

    #[test]
    fn only_the_gateways_own_answers_are_converted() {
        let own = crate::http::respond::error_response(
            StatusCode::FORBIDDEN,
            "policy-denied",
            "Access denied",
            None,
        );
        let converted = convert(own);
        assert_eq!(converted.status(), StatusCode::OK);
        assert_eq!(converted.headers()["grpc-status"], "7");
        assert_eq!(converted.headers()["content-type"], "application/grpc");
        assert!(
            converted.headers()["grpc-message"]
                .to_str()
                .unwrap()
                .contains("policy-denied")
        );
        let upstream = Response::new(full(Bytes::from_static(b"x")));
        let kept = convert(upstream);
        assert!(kept.headers().get("grpc-status").is_none());
    }
}
