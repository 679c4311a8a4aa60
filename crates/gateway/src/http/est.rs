//! Enrollment over Secure Transport (RFC 7030) on a `builtin:est` mapping (usually
//! `base_path = "/.well-known/est"`): the gateway speaks the protocol (base64 PKCS#10 in,
//! base64 certs-only PKCS#7 out), the node decides and issues ([`crate::fleet`]).
//!
//! | request | answer |
//! | --- | --- |
//! | `GET [/LABEL]/cacerts` | the CA certificates, certs-only PKCS#7 |
//! | `POST /LABEL/simpleenroll` | a certificate for the CSR, registered under template LABEL (the caller is a claim certificate allowed it) |
//! | `POST [/LABEL]/simplereenroll` | a new certificate for the caller's own subject, attached where the caller's is |
//! | `POST /LABEL/serverkeygen` | as `simpleenroll`, with a key made by us for the CSR's subject: the key (PKCS#8) and the certificate, multipart |
//! | `GET [/LABEL]/csrattrs` | 204: no attributes asked |

use base64::Engine as _;
use http_body_util::BodyExt;
use hyper::StatusCode;
use portcullis_pki::Certificate;

use crate::fleet::{FleetCall, FleetError, FleetRequest};
use crate::http::respond::{Body, full};

/// The largest CSR accepted (base64), well above any real one.
const MAX_CSR: usize = 64 * 1024;

/// Answers an EST request on the path `rest` (after the mapping's base path).
pub(crate) async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    leaf: Option<&Certificate>,
    rest: &str,
    verifier: &std::sync::Arc<crate::verify::DomainVerifier>,
    peer: std::net::SocketAddr,
) -> hyper::Response<Body> {
    let segments: Vec<&str> = rest.trim_matches('/').split('/').collect();
    let (label, operation) = match segments.as_slice() {
        [op] => (None, *op),
        [label, op] if !label.is_empty() => (Some(label.to_string()), *op),
        _ => return text(StatusCode::NOT_FOUND, "no such EST operation"),
    };
    let method = req.method().clone();
    let call = match (operation, method) {
        ("cacerts", hyper::Method::GET) => FleetCall::CaCertificates,
        ("csrattrs", hyper::Method::GET) => {
            let mut resp = hyper::Response::new(full(""));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            return resp;
        }
        (op @ ("simpleenroll" | "serverkeygen"), hyper::Method::POST) => {
            let code = basic_password(req.headers());
            match csr(req).await {
                Ok(csr) => FleetCall::EstEnroll {
                    csr,
                    template: label,
                    code,
                    server_keygen: op == "serverkeygen",
                },
                Err(e) => return e,
            }
        }
        ("simplereenroll", hyper::Method::POST) => match csr(req).await {
            Ok(csr) => FleetCall::Reenroll { csr },
            Err(e) => return e,
        },
        ("cacerts" | "csrattrs" | "simpleenroll" | "simplereenroll" | "serverkeygen", _) => {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "cacerts and csrattrs take GET, simpleenroll, simplereenroll and serverkeygen take POST",
            );
        }
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "EST answers cacerts, simpleenroll, simplereenroll, serverkeygen and csrattrs",
            );
        }
    };
    // Without a certificate, only an enrollment with a one-time code.
    let with_code = matches!(&call, FleetCall::EstEnroll { code: Some(_), .. });
    if leaf.is_none() && !with_code {
        let mut resp = text(
            StatusCode::UNAUTHORIZED,
            "present a client certificate, or a one-time enrollment code (HTTP Basic authentication) to simpleenroll",
        );
        resp.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Basic realm=\"est\""),
        );
        return resp;
    }
    let Some(service) = verifier.fleet() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "enrollment is not available on this gateway",
        );
    };
    let answer = service
        .call(FleetRequest {
            call,
            caller: leaf.cloned(),
            client_id: format!("est {peer}"),
        })
        .await;
    match answer {
        Ok(v) => {
            let pems: Vec<&str> = v["certificatesPem"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_str())
                .collect();
            let mut certs = Vec::new();
            for pem in pems {
                match Certificate::all_from_pem_or_der(pem.as_bytes()) {
                    Ok(c) => certs.extend(c),
                    Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "bad certificate"),
                }
            }
            match v["privateKey"].as_str() {
                Some(key) => with_key(key, &certs),
                None => pkcs7(&certs),
            }
        }
        Err(FleetError {
            status, message, ..
        }) => {
            let mut resp = text(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                &message,
            );
            if status == 401 {
                resp.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    hyper::header::HeaderValue::from_static("Basic realm=\"est\""),
                );
            }
            resp
        }
    }
}

/// EST for a certificate in its grace period (expired, its template allows renewal for a
/// while): `simplereenroll` (and the public `cacerts`, `csrattrs`) only.
pub(crate) async fn renew_only(
    req: hyper::Request<hyper::body::Incoming>,
    leaf: Option<&Certificate>,
    rest: &str,
    verifier: &std::sync::Arc<crate::verify::DomainVerifier>,
    peer: std::net::SocketAddr,
) -> hyper::Response<Body> {
    let operation = rest
        .trim_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    if !matches!(operation, "simplereenroll" | "cacerts" | "csrattrs") {
        // Read what was sent first (bounded): a refusal before the request body is read makes
        // HTTP/2 reset the stream, and the client sees that rather than the answer.
        let _ = http_body_util::Limited::new(req.into_body(), MAX_CSR)
            .collect()
            .await;
        return text(
            StatusCode::FORBIDDEN,
            "this certificate expired and is in its grace period: it may only renew (simplereenroll)",
        );
    }
    answer(req, leaf, rest, verifier, peer).await
}

/// The password of an `Authorization: Basic` header (the user name is not used).
fn basic_password(headers: &hyper::HeaderMap) -> Option<String> {
    let value = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':')
        .map(|(_, p)| p.to_string())
        .filter(|p| !p.is_empty())
}

/// The request's CSR (base64 DER, as RFC 7030 sends it; PEM accepted too) as PEM.
async fn csr(req: hyper::Request<hyper::body::Incoming>) -> Result<String, hyper::Response<Body>> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_CSR)
        .collect()
        .await
        .map_err(|_| text(StatusCode::PAYLOAD_TOO_LARGE, "the CSR is too large"))?
        .to_bytes();
    let text_body = String::from_utf8_lossy(&body);
    if text_body.contains("-----BEGIN") {
        return Ok(text_body.into_owned());
    }
    let compact: String = text_body.split_whitespace().collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|_| {
            text(
                StatusCode::BAD_REQUEST,
                "the body must be a base64 PKCS#10 CSR (Content-Type: application/pkcs10)",
            )
        })?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .filter_map(|c| std::str::from_utf8(c).ok())
        .collect();
    Ok(format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    ))
}

/// A certs-only PKCS#7, base64 (RFC 7030 §4.1.3, §4.2.3).
fn pkcs7(certs: &[Certificate]) -> hyper::Response<Body> {
    let der = portcullis_pki::pkcs7::certs_only(certs);
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut body = String::with_capacity(b64.len() + b64.len() / 64 + 1);
    for chunk in b64.as_bytes().chunks(64) {
        body.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        body.push_str("\r\n");
    }
    let mut resp = hyper::Response::new(full(body));
    let headers = resp.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/pkcs7-mime; smime-type=certs-only"),
    );
    headers.insert(
        "content-transfer-encoding",
        hyper::header::HeaderValue::from_static("base64"),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// `serverkeygen`'s answer (RFC 7030 §4.4.2): multipart/mixed, the private key (PKCS#8,
/// base64) then the certificate (certs-only PKCS#7, base64). Never stored or logged.
fn with_key(key_pem: &str, certs: &[Certificate]) -> hyper::Response<Body> {
    let Some(key) = portcullis_pki::pem::decode(key_pem.as_bytes())
        .ok()
        .and_then(|blocks| blocks.into_iter().next())
    else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "bad key");
    };
    let wrap = |der: &[u8]| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2);
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
            out.push_str("\r\n");
        }
        out
    };
    let body = format!(
        "--estServerKeyGen\r\nContent-Type: application/pkcs8\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\
         --estServerKeyGen\r\nContent-Type: application/pkcs7-mime; smime-type=certs-only\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\
         --estServerKeyGen--\r\n",
        wrap(&key.der),
        wrap(&portcullis_pki::pkcs7::certs_only(certs)),
    );
    let mut resp = hyper::Response::new(full(body));
    let headers = resp.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("multipart/mixed; boundary=estServerKeyGen"),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// An error as RFC 7030 §4.2.3 allows: the status, a human-readable text body.
fn text(status: StatusCode, message: &str) -> hyper::Response<Body> {
    let mut resp = hyper::Response::new(full(format!("{message}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
