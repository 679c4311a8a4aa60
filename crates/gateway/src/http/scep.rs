//! SCEP (RFC 8894) on a `builtin:scep` mapping: the gateway speaks HTTP (`?operation=…`), the
//! node reads and answers the messages ([`crate::fleet`]). No client certificate is needed:
//! a SCEP request is signed and encrypted itself, and authorized by its challenge password (a
//! one-time enrollment code) or, for a renewal, by the certificate that signs it.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET ?operation=GetCACaps` | the capabilities, one per line |
//! | `GET ?operation=GetCACert` | the RA's certificates and the CA's, `application/x-x509-ca-ra-cert` |
//! | `POST ?operation=PKIOperation` (the message as the body) or `GET ?operation=PKIOperation&message=BASE64` | the `CertRep`, `application/x-pki-message` |

use base64::Engine as _;
use http_body_util::BodyExt;
use hyper::StatusCode;
use portcullis_pki::Certificate;

use crate::fleet::{FleetCall, FleetError, FleetRequest};
use crate::http::respond::{Body, full};

/// The largest message accepted: a CSR with a 4096-bit key, signed and encrypted, is ~6 KiB.
const MAX_MESSAGE: usize = 64 * 1024;

/// Answers a SCEP request on a `builtin:scep` mapping.
pub(crate) async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    verifier: &std::sync::Arc<crate::verify::DomainVerifier>,
    peer: std::net::SocketAddr,
) -> hyper::Response<Body> {
    serve(req, verifier.fleet(), peer).await
}

/// Answers a SCEP request with `service` (the node's fleet provisioning): on a mapping, or on
/// the node's plain-HTTP listener, where SCEP clients that verify no TLS (certmonger) reach it.
pub async fn serve(
    req: hyper::Request<hyper::body::Incoming>,
    service: Option<std::sync::Arc<dyn crate::fleet::FleetProvisioning>>,
    peer: std::net::SocketAddr,
) -> hyper::Response<Body> {
    let mut operation = None;
    let mut message = None;
    for pair in req.uri().query().unwrap_or_default().split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        // Form encoding: '+' is a space, which base64 never holds, so it meant '+'.
        let value = crate::authorize::percent_decode(value).map(|v| v.replace(' ', "+"));
        match name {
            "operation" => operation = value,
            "message" => message = value,
            _ => {}
        }
    }
    let call = match (operation.as_deref(), req.method()) {
        (Some("GetCACaps"), &hyper::Method::GET) => {
            return binary(
                portcullis_pki::scep::CAPABILITIES.as_bytes().to_vec(),
                "text/plain",
            );
        }
        (Some("GetCACert"), &hyper::Method::GET) => FleetCall::ScepCaCertificates,
        (Some("PKIOperation"), &hyper::Method::GET) => {
            let decoded = message.as_deref().and_then(|m| {
                let compact: String = m.split_whitespace().collect();
                base64::engine::general_purpose::STANDARD
                    .decode(compact)
                    .ok()
            });
            match decoded {
                Some(message) => FleetCall::ScepOperation { message },
                None => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "PKIOperation by GET takes the message as base64 in ?message=; or POST it",
                    );
                }
            }
        }
        (Some("PKIOperation"), &hyper::Method::POST) => {
            let body = match http_body_util::Limited::new(req.into_body(), MAX_MESSAGE)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "the message is too large"),
            };
            // DER as RFC 8894 says; base64 from clients that send it as text.
            let message = if body.first() == Some(&0x30) {
                body.to_vec()
            } else {
                let compact: String = String::from_utf8_lossy(&body).split_whitespace().collect();
                match base64::engine::general_purpose::STANDARD.decode(compact) {
                    Ok(m) => m,
                    Err(_) => {
                        return text(
                            StatusCode::BAD_REQUEST,
                            "the body must be a SCEP pkiMessage (DER, Content-Type: application/x-pki-message)",
                        );
                    }
                }
            };
            FleetCall::ScepOperation { message }
        }
        (Some("GetCACaps" | "GetCACert" | "PKIOperation"), _) => {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "GetCACaps and GetCACert take GET, PKIOperation GET or POST",
            );
        }
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                "SCEP answers ?operation=GetCACaps, GetCACert and PKIOperation",
            );
        }
    };
    let Some(service) = service else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "enrollment is not available on this gateway",
        );
    };
    let is_ca_certs = call == FleetCall::ScepCaCertificates;
    let answer = service
        .call(FleetRequest {
            call,
            caller: None,
            client_id: format!("scep {peer}"),
        })
        .await;
    match answer {
        Ok(v) if is_ca_certs => {
            let mut certs = Vec::new();
            for pem in v["certificatesPem"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_str())
            {
                match Certificate::all_from_pem_or_der(pem.as_bytes()) {
                    Ok(c) => certs.extend(c),
                    Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "bad certificate"),
                }
            }
            binary(
                portcullis_pki::pkcs7::certs_only(&certs),
                "application/x-x509-ca-ra-cert",
            )
        }
        Ok(v) => {
            match base64::engine::general_purpose::STANDARD
                .decode(v["pkiMessage"].as_str().unwrap_or_default())
            {
                Ok(der) => binary(der, "application/x-pki-message"),
                Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "bad answer"),
            }
        }
        Err(FleetError {
            status, message, ..
        }) => text(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            &message,
        ),
    }
}

fn binary(der: Vec<u8>, content_type: &'static str) -> hyper::Response<Body> {
    let mut resp = hyper::Response::new(full(der));
    let headers = resp.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    resp
}

fn text(status: StatusCode, message: &str) -> hyper::Response<Body> {
    let mut resp = hyper::Response::new(full(format!("{message}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
