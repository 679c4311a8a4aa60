//! Certificate → short-lived token on a `builtin:token` mapping: `POST <base>/token` with
//! `{"audience": "…", "lifetime_seconds": 300}` (or the same as a query) answers
//! `{"token", "token_type": "Bearer", "expires_in"}`; `GET <base>/.well-known/jwks.json` the keys.
//! The node signs ([`crate::fleet`]); a claim certificate gets none.

use http_body_util::BodyExt;
use hyper::StatusCode;
use portcullis_pki::Certificate;
use serde_json::json;

use crate::fleet::{FleetCall, FleetError, FleetRequest};
use crate::http::respond::{Body, error_response, full};

/// Answers a token request on the path `rest` (after `mapping`'s base path).
pub(crate) async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    leaf: &Certificate,
    rest: &str,
    mapping: &crate::config::Mapping,
    verifier: &std::sync::Arc<crate::verify::DomainVerifier>,
    domain: &crate::config::Domain,
    peer: std::net::SocketAddr,
) -> hyper::Response<Body> {
    let call = match (rest, req.method().clone()) {
        ("/.well-known/jwks.json", hyper::Method::GET) => FleetCall::Jwks,
        ("/token", hyper::Method::POST) => {
            let query = req.uri().query().unwrap_or("").to_string();
            let body = match http_body_util::Limited::new(req.into_body(), 16 * 1024)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return error_response(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "too-large",
                        "the request is larger than 16 KiB",
                        None,
                    );
                }
            };
            let asked: serde_json::Value = if body.is_empty() {
                json!({})
            } else {
                match serde_json::from_slice(&body) {
                    Ok(v @ serde_json::Value::Object(_)) => v,
                    _ => {
                        return error_response(
                            StatusCode::BAD_REQUEST,
                            "invalid-request",
                            "the body must be a JSON object: {\"audience\": \"…\", \"lifetime_seconds\": 300}",
                            None,
                        );
                    }
                }
            };
            let from_query = |key: &str| {
                query
                    .split('&')
                    .filter_map(|p| p.split_once('='))
                    .find(|(k, _)| *k == key)
                    .and_then(|(_, v)| crate::authorize::percent_decode(v))
            };
            let audience = asked["audience"]
                .as_str()
                .map(str::to_string)
                .or_else(|| from_query("audience"));
            let Some(audience) = audience.filter(|a| !a.is_empty() && a.len() <= 256) else {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid-request",
                    "name the token's audience: {\"audience\": \"https://api.example.com\"} (1-256 characters)",
                    None,
                );
            };
            let audiences = &mapping.token_audiences;
            if !audiences.is_empty() && !audiences.contains(&audience) {
                return error_response(
                    StatusCode::FORBIDDEN,
                    "audience-not-allowed",
                    &format!(
                        "tokens on this mapping are for {} only (token_audiences)",
                        audiences.join(", ")
                    ),
                    None,
                );
            }
            let lifetime_secs = asked["lifetime_seconds"]
                .as_u64()
                .or_else(|| from_query("lifetime_seconds").and_then(|v| v.parse().ok()))
                .unwrap_or(300);
            if !(1..=3600).contains(&lifetime_secs) {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid-request",
                    "lifetime_seconds must be between 1 and 3600",
                    None,
                );
            }
            FleetCall::Token {
                audience,
                lifetime_secs,
                issuer: format!("https://{}{}", domain.hostname, mapping.base_path),
            }
        }
        _ => {
            return error_response(
                StatusCode::NOT_FOUND,
                "no-route",
                "the token service answers POST …/token and GET …/.well-known/jwks.json",
                None,
            );
        }
    };
    let Some(service) = verifier.fleet() else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "tokens are not available on this gateway",
            None,
        );
    };
    let answer = service
        .call(FleetRequest {
            call,
            caller: Some(leaf.clone()),
            client_id: format!("token {peer}"),
        })
        .await;
    match answer {
        Ok(v) => {
            let mut resp = hyper::Response::new(full(v.to_string()));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            resp.headers_mut().insert(
                hyper::header::CACHE_CONTROL,
                hyper::header::HeaderValue::from_static("no-store"),
            );
            resp
        }
        Err(FleetError {
            status,
            code,
            message,
        }) => error_response(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            code,
            &message,
            None,
        ),
    }
}
