//! Routes on the running gateway, through the node's [`Hooks`](super::Hooks): explain, MQTT
//! sessions and open connections.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use portcullis_pki::Certificate;
use serde::Deserialize;
use serde_json::{Value, json};

use portcullis_registry::{CertId, RegistryError};

use super::{Api, ApiError, ApiResult, Body, Caller, ExplainRequest, Params};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Explain {
    domain: String,
    /// The Host header (default: the domain).
    host: Option<String>,
    /// The client's address (default 127.0.0.1).
    source_ip: Option<String>,
    #[serde(default = "default_method")]
    method: String,
    #[serde(default = "default_path")]
    path: String,
    certificate_pem: String,
    /// Verify under this profile instead of the domain's.
    profile: Option<String>,
}

pub(super) fn default_method() -> String {
    "GET".into()
}

pub(super) fn default_path() -> String {
    "/".into()
}

pub(super) async fn explain(State(api): State<Api>, Body(req): Body<Explain>) -> ApiResult {
    let chain = Certificate::all_from_pem_or_der(req.certificate_pem.as_bytes())?;
    if chain.is_empty() {
        return Err(ApiError::invalid("certificate_pem holds no certificate"));
    }
    if !req.path.starts_with('/') {
        return Err(ApiError::invalid("path must start with '/'"));
    }
    let profile = req
        .profile
        .as_deref()
        .map(str::parse::<portcullis_pki::VerifyProfile>)
        .transpose()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let source_ip = req
        .source_ip
        .as_deref()
        .map(|ip| {
            ip.parse::<std::net::IpAddr>()
                .map_err(|_| ApiError::invalid(format!("source_ip '{ip}' is not an IP address")))
        })
        .transpose()?;
    let request = ExplainRequest {
        domain: req.domain.to_ascii_lowercase(),
        host: req.host.map(|h| h.to_ascii_lowercase()),
        source_ip,
        method: req.method.to_ascii_uppercase(),
        path: req.path,
        chain,
        profile,
    };
    let mut trace = api
        .hooks
        .explain(&request)
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "no-such-domain", e))?;
    // The registry's own view, from the store (the gateway's snapshot follows it within 200 ms).
    let id = CertId::of_der(request.chain[0].der());
    trace["registry_record"] = match api.store.certificate(&id).await {
        Ok(record) => json!({
            "status": record.status, "things": record.things, "ca_id": record.ca_id,
            "last_seen": record.last_seen,
        }),
        Err(RegistryError::NotFound(_)) => Value::Null,
        Err(e) => return Err(e.into()),
    };
    Ok(Json(trace))
}

pub(super) async fn list_sessions(State(api): State<Api>) -> ApiResult {
    Ok(Json(json!({"items": api.hooks.mqtt_sessions()})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CloseSession {
    #[serde(default)]
    forget: bool,
}

pub(super) async fn revocation_sources(State(api): State<Api>) -> ApiResult {
    Ok(Json(json!({"items": api.hooks.revocation_sources()})))
}

pub(super) async fn list_connections(State(api): State<Api>) -> ApiResult {
    Ok(Json(json!({"items": api.hooks.live_connections()})))
}

pub(super) async fn close_connection(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let n: u64 = id
        .parse()
        .map_err(|_| ApiError::invalid(format!("connection id '{id}' must be a number")))?;
    if api.hooks.close_connection(n) {
        tracing::info!(target: "portcullis::admin", caller, connection = n, "connection closed by an operator");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(RegistryError::NotFound(format!("connection {n} (it may have ended)")).into())
    }
}

pub(super) async fn close_session(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(client_id): Path<String>,
    Params(q): Params<CloseSession>,
) -> ApiResult<StatusCode> {
    if api.hooks.close_mqtt_session(&client_id, q.forget) {
        tracing::info!(target: "portcullis::admin", caller, client_id, forget = q.forget, "mqtt session closed by an operator");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(RegistryError::NotFound(format!("MQTT session '{client_id}'")).into())
    }
}
