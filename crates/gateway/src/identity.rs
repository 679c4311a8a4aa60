//! Identity headers: the verified client certificate, forwarded upstream; never trusted from the
//! client.
//!
//! Invariant: identity headers are built only from the connection's verdict; every inbound copy
//! (any header whose name starts with `client-cert`, `x-client-cert` or is
//! `x-forwarded-client-cert`) is removed before routing, in every mode.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};

use crate::verify::ClientVerdict;

/// Header name prefixes that only the gateway may set.
const RESERVED_PREFIXES: [&str; 3] = ["client-cert", "x-client-cert", "x-forwarded-client-cert"];

/// Removes every identity header a client sent.
pub(crate) fn strip(headers: &mut HeaderMap) {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            RESERVED_PREFIXES
                .iter()
                .any(|p| name.as_str().starts_with(p))
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(&name);
    }
}

/// Adds the identity headers for `verdict`: RFC 9440 `Client-Cert` / `Client-Cert-Chain` and the
/// `X-Client-Cert-*` fields when verified, and `X-Client-Cert-Verify` always.
pub(crate) fn add(headers: &mut HeaderMap, verdict: &ClientVerdict) {
    if let ClientVerdict::Valid(chain) = verdict
        && let Some(leaf) = chain.first()
    {
        let info = leaf.info();
        set(headers, "client-cert", &sf_binary(leaf.der()));
        if chain.len() > 1 {
            let rest: Vec<String> = chain[1..].iter().map(|c| sf_binary(c.der())).collect();
            set(headers, "client-cert-chain", &rest.join(", "));
        }
        set(headers, "x-client-cert-subject", &info.subject);
        set(headers, "x-client-cert-issuer", &info.issuer);
        set(headers, "x-client-cert-serial", &info.serial);
        set(headers, "x-client-cert-not-before", &info.not_before);
        set(headers, "x-client-cert-not-after", &info.not_after);
        set(headers, "x-client-cert-fingerprint-sha256", &info.id);
    }
    set(headers, "x-client-cert-verify", &verdict.status());
}

/// An RFC 8941 byte sequence: `:base64:`.
fn sf_binary(der: &[u8]) -> String {
    format!(":{}:", STANDARD.encode(der))
}

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    // Control characters cannot travel in a header; anything else (UTF-8 included) can.
    let cleaned: String = value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(cleaned.as_bytes()) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_every_spelling() {
        let mut h = HeaderMap::new();
        for name in [
            "Client-Cert",
            "client-cert-chain",
            "X-Client-Cert-Subject",
            "x-client-cert-verify",
            "X-Forwarded-Client-Cert",
            "x-other",
        ] {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("spoof"),
            );
        }
        strip(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-other"));
    }

    #[test]
    fn none_verdict_sets_only_the_status() {
        let mut h = HeaderMap::new();
        add(&mut h, &ClientVerdict::None);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-client-cert-verify"], "NONE");
    }
}
