//! Fleet provisioning over HTTPS (`builtin:provisioning`): the MQTT API's calls as POSTs,
//! answered with [`crate::fleet`]'s parsing and the node's `FleetProvisioning`.

use portcullis_pki::Certificate;

/// The largest request body accepted over HTTPS (a CSR is a few KiB).
const MAX_HTTPS_BODY: usize = 64 * 1024;

/// Fleet provisioning over HTTPS (`builtin:provisioning`), for devices without MQTT: `POST
/// <base>/certificates/create`, `<base>/certificates/create-from-csr` and
/// `<base>/provisioning-templates/NAME/provision` take the MQTT API's JSON and answer its
/// accepted payload (200), or its rejection with the rejection's status. Authorized exactly as
/// the MQTT request would be: `mqtt:Publish` on its `$aws/…/json` topic, named by a policy (a
/// claim certificate's built-in one names them).
pub(crate) async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    leaf: &Certificate,
    rest: &str,
    verifier: &std::sync::Arc<crate::verify::DomainVerifier>,
    domain: &crate::config::Domain,
    peer: std::net::SocketAddr,
) -> hyper::Response<crate::http::respond::Body> {
    use http_body_util::BodyExt;
    use hyper::StatusCode;

    use crate::fleet::{FleetError, FleetRequest, request};
    use crate::http::respond::{error_response, full};
    use serde_json::json;
    if req.method() != hyper::Method::POST {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "fleet provisioning takes POST",
            None,
        );
    }
    let topic = format!("$aws{}/json", rest.trim_end_matches('/'));
    let body = match http_body_util::Limited::new(req.into_body(), MAX_HTTPS_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                &format!("the request is larger than {MAX_HTTPS_BODY} bytes"),
                None,
            );
        }
    };
    let Some(call) = request(&topic, &body) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "no-such-call",
            "fleet provisioning answers POST …/certificates/create, …/certificates/create-from-csr and …/provisioning-templates/NAME/provision",
            None,
        );
    };
    let decided = verifier.registry_snapshot().policies().decide_named(
        Some(leaf),
        &domain.hostname.to_string(),
        "mqtt:Publish",
        &format!("topic:{topic}"),
        peer.ip(),
    );
    if let Err(why) = decided {
        return error_response(
            StatusCode::FORBIDDEN,
            "policy-denied",
            &format!("Access denied: {why}."),
            None,
        );
    }
    let answer = match (call, verifier.fleet()) {
        (Err(e), _) => Err(e),
        (Ok(_), None) => Err(FleetError {
            status: 503,
            code: "ServiceUnavailable",
            message: "fleet provisioning is not available on this gateway".into(),
        }),
        (Ok(call), Some(service)) => {
            service
                .call(FleetRequest {
                    call,
                    caller: Some(leaf.clone()),
                    client_id: format!("https {peer}"),
                })
                .await
        }
    };
    let (status, body) = match &answer {
        Ok(v) => (StatusCode::OK, v.to_string()),
        Err(e) => (
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
            json!({"statusCode": e.status, "errorCode": e.code, "errorMessage": e.message})
                .to_string(),
        ),
    };
    let mut resp = hyper::Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    // Keys and tokens: never cached.
    resp.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    resp
}
