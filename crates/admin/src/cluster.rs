//! The cluster as the registry sees it: each node's heartbeat, how fresh its snapshot is, and
//! how far behind the newest change it is.

use axum::Json;
use axum::extract::State;
use serde_json::json;

use super::{Api, ApiResult};

/// A node silent for longer than this is shown as stale (milliseconds).
const STALE_MS: i64 = 10_000;

pub(super) async fn cluster_status(State(api): State<Api>) -> ApiResult {
    let newest = api.store.change_marker().await?;
    let now_ms = portcullis_registry::store::now_ms();
    let nodes: Vec<serde_json::Value> = api
        .store
        .cluster_nodes()
        .await?
        .into_iter()
        .map(|n| {
            let heartbeat_age_ms = (now_ms - n.heartbeat_ms).max(0);
            let mut v = serde_json::to_value(&n).unwrap_or_default();
            v["heartbeat_age_ms"] = json!(heartbeat_age_ms);
            v["snapshot_age_ms"] = json!((now_ms - n.snapshot_ms).max(0));
            v["changes_behind"] = json!((newest - n.snapshot_marker).max(0));
            v["stale"] = json!(heartbeat_age_ms > STALE_MS);
            v
        })
        .collect();
    Ok(Json(json!({"newest_change": newest, "nodes": nodes})))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NatsCertificate {
    /// The NATS server's name (its certificate's CN).
    name: String,
    /// The names and addresses the nodes and the other NATS servers reach it by.
    hosts: Vec<String>,
    /// Lifetime in days (default 365).
    days: Option<u32>,
}

/// Issues a NATS server's certificate from the cluster's CA: a TLS peer (server and client, for
/// the routes between NATS servers), so that nodes and NATS servers verify each other with the
/// cluster's own CA. The key is made here and answered once; nothing keeps it.
pub(super) async fn nats_certificate(
    State(api): State<Api>,
    axum::Extension(super::Caller(caller)): axum::Extension<super::Caller>,
    super::Body(req): super::Body<NatsCertificate>,
) -> ApiResult<(axum::http::StatusCode, Json<serde_json::Value>)> {
    use portcullis_pki::issue::{IssueRequest, Profile, SubjectAltName, SubjectName};
    use portcullis_pki::{KeyType, PrivateKey};
    let issuer = api.issuer.clone().ok_or_else(|| {
        super::ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "no-local-ca",
            "this node has no local CA to issue NATS certificates with",
        )
    })?;
    let name = req.name.trim();
    if name.is_empty() || name.len() > 64 {
        return Err(super::ApiError::invalid("name must be 1-64 characters"));
    }
    if req.hosts.is_empty() {
        return Err(super::ApiError::invalid(
            "hosts must name at least one host name or IP address the nodes connect to",
        ));
    }
    let mut request = IssueRequest::new(Profile::Peer, SubjectName::cn(name));
    for host in &req.hosts {
        let host = host.trim();
        request.subject_alt_names.push(match host.parse() {
            Ok(ip) => SubjectAltName::Ip(ip),
            Err(_) if !host.is_empty() && !host.contains(char::is_whitespace) => {
                SubjectAltName::Dns(host.to_string())
            }
            Err(_) => {
                return Err(super::ApiError::invalid(format!(
                    "'{host}' is neither a host name nor an IP address"
                )));
            }
        });
    }
    if let Some(days) = req.days {
        if days == 0 || days > 3650 {
            return Err(super::ApiError::invalid("days must be between 1 and 3650"));
        }
        request.days = days;
    }
    let key = PrivateKey::generate(KeyType::EcP256)?;
    let cert = portcullis_pki::issue::issue(&request, &key, Some(&issuer))?;
    let chain = issuer.chain();
    let root = chain.last().unwrap_or(&cert);
    tracing::info!(target: "portcullis::cluster", caller = %caller, name, hosts = ?req.hosts, serial = %cert.info().serial, "NATS server certificate issued");
    Ok((
        axum::http::StatusCode::CREATED,
        Json(json!({
            "name": name,
            "certificate_pem": std::iter::once(&cert).chain(chain.iter().take(chain.len().saturating_sub(1))).map(|c| c.to_pem()).collect::<String>(),
            "key_pem": key.to_pem(),
            "ca_pem": root.to_pem(),
            "not_after": cert.info().not_after,
        })),
    ))
}
