//! What a client's request may carry to an upstream, decided once for both HTTP paths.
//!
//! Invariant: the upstream receives exactly the gateway's identity and forwarding headers. A
//! client cannot add its own (every inbound spelling is dropped, `_` look-alikes included),
//! cannot make the gateway drop them (a `Connection` header naming one is refused), and cannot
//! smuggle a second request past routing and policy (only a WebSocket upgrade, on a mapping that
//! allows it, ever becomes a tunnel; `h2c` and other upgrade tokens are refused).

use hyper::header::{self, HeaderMap, HeaderName};
use hyper::{Method, Request, StatusCode, Version};

use crate::http::identity::IdentityHeaders;

/// RFC 9110 7.6.1 hop-by-hop headers (and the obsolete `Proxy-Connection`, and `HTTP2-Settings`,
/// which belongs to an `h2c` upgrade), never forwarded; both HTTP paths use this list. As
/// header names, so that a header map removes them by hash without parsing a name each time.
pub(crate) static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("http2-settings"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Forwarding headers: set by the gateway from the connection, never taken from the client
/// (`X-Forwarded-For` is appended to, the others replaced).
pub(crate) const FORWARDING: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

/// Headers that make an upstream run another method than the one policies decided on. They are
/// dropped on policy-authorized mappings.
pub(crate) const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Header names the gateway owns: identity, forwarding, and the request's framing and Host.
/// A `Connection` header may not name them, and no `_` spelling of them is forwarded.
pub(crate) fn is_owned(identity: &IdentityHeaders, name: &str) -> bool {
    identity.is_identity_name(name)
        || FORWARDING.iter().any(|f| f.eq_ignore_ascii_case(name))
        || ["host", "content-length", "transfer-encoding"]
            .iter()
            .any(|f| f.eq_ignore_ascii_case(name))
}

/// Whether a client's header of this name is dropped before forwarding, on every path:
/// identity headers in any spelling, and names holding `_` (CGI, WSGI and Rack fold `_` and `-`
/// into one name, so `X_Client_Cert_Subject` would reach the application as the identity
/// header). With `underscores` a domain forwards `_` names, except those that read as a header
/// the gateway owns once `_` becomes `-`.
pub(crate) fn dropped(identity: &IdentityHeaders, underscores: bool, name: &str) -> bool {
    if identity.is_identity_name(name) {
        return true;
    }
    if !name.as_bytes().contains(&b'_') {
        return false;
    }
    if !underscores {
        return true;
    }
    let folded = name.replace('_', "-");
    is_owned(identity, &folded)
        || HOP_BY_HOP
            .iter()
            .any(|h| h.as_str().eq_ignore_ascii_case(&folded))
        || METHOD_OVERRIDES
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&folded))
}

/// Removes every header of `headers` that [`dropped`] refuses.
pub(crate) fn strip(identity: &IdentityHeaders, underscores: bool, headers: &mut HeaderMap) {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| dropped(identity, underscores, name.as_str()))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(&name);
    }
}

/// Removes from a request's trailers what its header fields may not carry to the upstream
/// ([`strip`]), the other fields the gateway owns, the hop-by-hop ones (which HTTP/2 forbids),
/// and on a policy-authorized mapping the method overrides (policies decided on the method).
pub(crate) fn strip_trailers(
    identity: &IdentityHeaders,
    underscores: bool,
    policy: bool,
    trailers: &mut HeaderMap,
) {
    let doomed: Vec<HeaderName> = trailers
        .keys()
        .filter(|name| {
            HOP_BY_HOP.contains(name)
                || is_owned(identity, name.as_str())
                || dropped(identity, underscores, name.as_str())
                || (policy
                    && METHOD_OVERRIDES
                        .iter()
                        .any(|m| m.eq_ignore_ascii_case(name.as_str())))
        })
        .cloned()
        .collect();
    for name in doomed {
        trailers.remove(&name);
    }
}

/// Why a request is refused before routing: status, stable code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl Refused {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refused {
        Refused {
            status,
            code,
            message: message.into(),
        }
    }
}

/// A WebSocket upgrade request that passed [`screen`]: the key, to check the upstream's answer.
#[derive(Debug, Clone)]
pub(crate) struct WebSocket {
    pub(crate) key: String,
}

/// Checks what the hyper path receives before routing (the fast path hands every request
/// carrying these headers to it): one Host (HTTP/1.1), the same host in `:authority` and Host,
/// no transfer coding but `chunked`, no expectation but `100-continue`, no `Connection` naming a
/// header the gateway owns, and an upgrade only to WebSocket. Then drops what [`dropped`]
/// refuses. Returns the WebSocket upgrade asked for, if any.
pub(crate) fn screen<B>(
    req: &mut Request<B>,
    identity: &IdentityHeaders,
    underscores: bool,
) -> Result<Option<WebSocket>, Refused> {
    let headers = req.headers();
    if headers.len() > MAX_FIELDS {
        // An upstream that keeps only so many fields (Node keeps 2,000) would lose the
        // gateway's identity headers, which come last.
        return Err(Refused::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too-many-headers",
            format!("the request has more than {MAX_FIELDS} header fields"),
        ));
    }
    if req.method() == Method::CONNECT {
        return Err(Refused::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "CONNECT is not supported: the gateway is not a forward proxy",
        ));
    }
    if !req.uri().path().starts_with('/') {
        return Err(Refused::new(
            StatusCode::BAD_REQUEST,
            "bad-target",
            "the request target must be a path starting with '/' (not '*')",
        ));
    }
    let hosts = headers.get_all(header::HOST).iter().count();
    if (req.version() == Version::HTTP_11 && hosts != 1) || hosts > 1 {
        return Err(Refused::new(
            StatusCode::BAD_REQUEST,
            "bad-host",
            "a request needs exactly one Host header (HTTP/1.1), never two",
        ));
    }
    let named = req
        .uri()
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| headers.get(header::HOST).map(|h| h.as_bytes()));
    let host_ok = match named {
        Some(host) => valid_host(host),
        // HTTP/1.0 may leave the host out; HTTP/2 names it in :authority or Host.
        None => req.version() < Version::HTTP_11,
    };
    if !host_ok {
        return Err(Refused::new(
            StatusCode::BAD_REQUEST,
            "bad-host",
            "the Host (or :authority) must be a host name or IP address, with an optional port",
        ));
    }
    if let Some(authority) = req.uri().authority() {
        // RFC 9113 8.3.1 (HTTP/2 :authority) and RFC 9112 3.2.2 (absolute-form): both name the
        // target; two different names are refused rather than one of them picked.
        let differs = headers.get_all(header::HOST).iter().any(|h| {
            !h.as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        });
        if differs || hosts > 1 {
            return Err(Refused::new(
                StatusCode::BAD_REQUEST,
                "bad-host",
                "the request names one host in its target (:authority) and another in Host",
            ));
        }
    }
    let codings: Vec<&[u8]> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .collect();
    if !codings.is_empty() && (codings.len() != 1 || !codings[0].eq_ignore_ascii_case(b"chunked")) {
        return Err(Refused::new(
            StatusCode::NOT_IMPLEMENTED,
            "unsupported-transfer-coding",
            "only the chunked transfer coding is supported; send the body with Content-Length or chunked",
        ));
    }
    if let Some(expect) = headers.get(header::EXPECT)
        && (!expect.as_bytes().eq_ignore_ascii_case(b"100-continue")
            || headers.get_all(header::EXPECT).iter().count() > 1)
    {
        return Err(Refused::new(
            StatusCode::EXPECTATION_FAILED,
            "expectation-failed",
            "the only expectation supported is Expect: 100-continue",
        ));
    }
    let mut asks_upgrade = false;
    for token in headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
    {
        let name = String::from_utf8_lossy(token);
        if name.eq_ignore_ascii_case("upgrade") {
            asks_upgrade = true;
        } else if !name.eq_ignore_ascii_case("close")
            && !name.eq_ignore_ascii_case("keep-alive")
            && is_owned(identity, &name)
        {
            return Err(Refused::new(
                StatusCode::BAD_REQUEST,
                "connection-names-owned-header",
                format!(
                    "the Connection header names '{name}', a header the gateway sets; remove it from Connection"
                ),
            ));
        }
    }
    let websocket = if asks_upgrade {
        Some(websocket_upgrade(req)?)
    } else {
        None
    };
    strip(identity, underscores, req.headers_mut());
    Ok(websocket)
}

/// Header fields a request may carry at most (hyper's HTTP/1.1 limit too).
const MAX_FIELDS: usize = 100;

/// Whether a Host value (or `:authority`) is `host[:port]`: a DNS name of letters, digits and
/// `-` in non-empty labels (one trailing dot allowed), an IPv4 address or a bracketed IPv6
/// address. Anything else (quotes, commas, spaces, `/`, `@`, `_`) could travel on into
/// `Forwarded`, `X-Forwarded-Host` or a policy's `route:` resource.
pub(crate) fn valid_host(value: &[u8]) -> bool {
    let (host, port) = match value.iter().rposition(|b| *b == b':') {
        Some(i) if !value.starts_with(b"[") || value[..i].ends_with(b"]") => {
            (&value[..i], Some(&value[i + 1..]))
        }
        _ => (value, None),
    };
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.iter().all(u8::is_ascii_digit))
    {
        return false;
    }
    if let Some(inner) = host.strip_prefix(b"[").and_then(|h| h.strip_suffix(b"]")) {
        return std::str::from_utf8(inner)
            .ok()
            .and_then(|t| t.parse::<std::net::Ipv6Addr>().ok())
            .is_some();
    }
    let name = host.strip_suffix(b".").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split(|b| *b == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        })
}

/// The upgrade a request with `Connection: upgrade` asks for: only a well-formed WebSocket
/// opening handshake (RFC 6455 4.1) is accepted. `h2c` would hand the connection to the
/// upstream's HTTP/2 server, past routing, policies and identity headers.
fn websocket_upgrade<B>(req: &Request<B>) -> Result<WebSocket, Refused> {
    let headers = req.headers();
    let tokens: Vec<String> = headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|t| String::from_utf8_lossy(t.trim_ascii()).into_owned())
        .filter(|t| !t.is_empty())
        .collect();
    let refused =
        |message: String| Refused::new(StatusCode::BAD_REQUEST, "upgrade-refused", message);
    match tokens.as_slice() {
        [one] if one.eq_ignore_ascii_case("websocket") => {}
        [] => {
            return Err(refused(
                "Connection: upgrade without an Upgrade header".into(),
            ));
        }
        _ => {
            return Err(refused(format!(
                "upgrading to '{}' is not supported; only WebSocket connections are tunnelled",
                tokens.join(", ")
            )));
        }
    }
    let key = headers
        .get("sec-websocket-key")
        .and_then(|k| k.to_str().ok())
        .map(str::trim)
        .filter(|k| k.len() == 24)
        .map(str::to_string);
    let version_13 = headers
        .get("sec-websocket-version")
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"13");
    match key {
        Some(key)
            if req.method() == Method::GET && req.version() == Version::HTTP_11 && version_13 =>
        {
            Ok(WebSocket { key })
        }
        _ => Err(refused(
            "a WebSocket upgrade needs GET over HTTP/1.1 with Sec-WebSocket-Key and Sec-WebSocket-Version: 13".into(),
        )),
    }
}

/// RFC 6455 4.2.2: the `Sec-WebSocket-Accept` value for a key, base64(SHA-1(key + GUID)).
pub(crate) fn websocket_accept(key: &[u8]) -> String {
    use base64::Engine;
    let mut input = key.to_vec();
    input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    /// Regression: request trailers reached an HTTP/2 upstream as the client sent them, identity
    /// fields included (an upstream reading trailers took `x-client-cert-verify: SUCCESS` from
    /// the client); and fields HTTP/2 forbids left the upstream's stream open.
    #[test]
    fn request_trailers_never_carry_identity_forwarding_or_hop_by_hop_fields() {
        let mut t = HeaderMap::new();
        for (name, value) in [
            ("x-client-cert-verify", "SUCCESS"),
            ("client-cert", ":ZXZpbA==:"),
            ("x_client_cert_subject", "CN=mallory"),
            ("x-forwarded-for", "10.0.0.1"),
            ("host", "elsewhere"),
            ("connection", "x-gone"),
            ("te", "gzip"),
            ("grpc-status-details-bin", "kept"),
            ("x-checksum", "kept"),
        ] {
            t.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_trailers(&IdentityHeaders::default(), false, false, &mut t);
        let mut left: Vec<&str> = t.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["grpc-status-details-bin", "x-checksum"]);
        // On a policy-authorized mapping, no method override either.
        let mut t = HeaderMap::new();
        t.append("x-http-method-override", HeaderValue::from_static("DELETE"));
        t.append("x-checksum", HeaderValue::from_static("kept"));
        strip_trailers(&IdentityHeaders::default(), false, true, &mut t);
        assert_eq!(
            t.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["x-checksum"]
        );
        // A domain forwarding `_` names still drops those that read as the gateway's own.
        let mut t = HeaderMap::new();
        t.append("x_client_cert_verify", HeaderValue::from_static("SUCCESS"));
        t.append("x_custom", HeaderValue::from_static("kept"));
        strip_trailers(&IdentityHeaders::default(), true, false, &mut t);
        assert_eq!(
            t.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["x_custom"]
        );
    }

    fn request(lines: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/x").version(Version::HTTP_11);
        for (k, v) in lines {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    fn code(lines: &[(&str, &str)]) -> Result<bool, &'static str> {
        let mut r = request(lines);
        screen(&mut r, &IdentityHeaders::default(), false)
            .map(|w| w.is_some())
            .map_err(|e| e.code)
    }

    #[test]
    fn websocket_accept_matches_rfc_6455_example() {
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn only_websocket_upgrades_pass() {
        let ws = [
            ("host", "a.test"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ];
        assert_eq!(code(&ws), Ok(true));
        for token in ["h2c", "websocket, h2c", "HTTP/2.0", "foo/1"] {
            let mut lines = ws.to_vec();
            lines[2] = ("upgrade", token);
            assert_eq!(code(&lines), Err("upgrade-refused"), "{token}");
        }
        assert_eq!(
            code(&[
                ("host", "a"),
                ("connection", "upgrade, http2-settings"),
                ("upgrade", "h2c")
            ]),
            Err("upgrade-refused")
        );
        // Without the key, not a WebSocket handshake.
        assert_eq!(code(&ws[..4]), Err("upgrade-refused"));
        // An Upgrade header that Connection does not name is no upgrade request (dropped later
        // as hop-by-hop).
        assert_eq!(code(&[("host", "a"), ("upgrade", "h2c")]), Ok(false));
    }

    #[test]
    fn connection_cannot_name_owned_headers() {
        for named in [
            "X-Client-Cert-Verify",
            "client-cert, keep-alive",
            "x-forwarded-for",
            "Forwarded",
            "host",
            "content-length",
            "x-forwarded-client-cert",
        ] {
            assert_eq!(
                code(&[("host", "a"), ("connection", named)]),
                Err("connection-names-owned-header"),
                "{named}"
            );
        }
        assert_eq!(
            code(&[("host", "a"), ("connection", "close, x-custom")]),
            Ok(false)
        );
    }

    #[test]
    fn codings_expectations_and_hosts() {
        assert_eq!(
            code(&[("host", "a"), ("transfer-encoding", "gzip, chunked")]),
            Err("unsupported-transfer-coding")
        );
        assert_eq!(
            code(&[("host", "a"), ("transfer-encoding", "chunked")]),
            Ok(false)
        );
        assert_eq!(
            code(&[("host", "a"), ("expect", "200-ok")]),
            Err("expectation-failed")
        );
        assert_eq!(
            code(&[("host", "a"), ("expect", "100-continue")]),
            Ok(false)
        );
        assert_eq!(code(&[]), Err("bad-host"));
        let mut r = Request::builder()
            .uri("https://x.test/")
            .version(Version::HTTP_2)
            .header("host", "y.test")
            .body(())
            .unwrap();
        let refused = screen(&mut r, &IdentityHeaders::default(), false).unwrap_err();
        assert_eq!(refused.code, "bad-host");
    }

    #[test]
    fn hosts_are_names_or_addresses() {
        for good in [
            "a.test",
            "A.Test:8443",
            "a.test.",
            "127.0.0.1",
            "[::1]:443",
            "xn--bcher-kva.example",
        ] {
            assert!(valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "a.test..",
            "x\", for=6;host=\"z",
            "localhost,z.w.test",
            "evil host",
            "a@b",
            "x/public/x.pw.test",
            "a_b.test",
            "a.test:",
            "a.test:99999x",
            "[::1",
            "::1",
            "a..test",
            ".a.test",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn underscore_names_are_dropped_and_look_alikes_even_when_allowed() {
        let ids = IdentityHeaders::default();
        for name in [
            "X_Client_Cert_Subject",
            "Client_Cert",
            "Transfer_Encoding",
            "Content_Length",
            "X_Custom",
        ] {
            assert!(dropped(&ids, false, name), "{name}");
        }
        for name in [
            "X_Client_Cert_Subject",
            "Client_Cert",
            "Transfer_Encoding",
            "Content_Length",
            "X_Forwarded_For",
            "X_HTTP_Method_Override",
        ] {
            assert!(dropped(&ids, true, name), "{name} with underscores allowed");
        }
        assert!(!dropped(&ids, true, "X_Custom"));
        assert!(!dropped(&ids, false, "x-custom"));
        assert!(dropped(&ids, false, "x-client-cert-subject"));
    }
}
