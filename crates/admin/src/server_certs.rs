//! Server certificate routes: chains and keys kept in the registry, so every node of a cluster
//! serves the same certificate with nothing copied to its disk. The key arrives in the request,
//! is checked against the leaf, and is sealed under this node's cluster key before it is
//! stored; it is never answered back.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use portcullis_pki::{Certificate, PrivateKey};
use serde::Deserialize;
use serde_json::json;

use portcullis_registry::{RegistryError, ServerCertRecord};

use super::{Api, ApiError, ApiResult, Body, Caller, to_json};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PutServerCertificate {
    /// The chain, leaf first, PEM.
    certificate_pem: String,
    /// The leaf's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    key_pem: String,
}

/// Imports or replaces (a renewal) server certificate `name`.
pub(super) async fn put_server_certificate(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
    Body(req): Body<PutServerCertificate>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    refuse_reserved(&name)?;
    let Some(key) = api.cluster_key.as_ref() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no-cluster-key",
            "this node has no cluster key, so it cannot seal a private key for the registry: set cluster_key_file in its configuration (make a key with `portcullis cluster-key generate --out FILE`; every node uses the same file)",
        ));
    };
    let chain = Certificate::all_from_pem_or_der(req.certificate_pem.as_bytes())?;
    let Some(leaf) = chain.first() else {
        return Err(ApiError::invalid("certificate_pem holds no certificate"));
    };
    let private = PrivateKey::from_pem_or_der(req.key_pem.as_bytes())?;
    if !private.is_key_of(leaf) {
        return Err(ApiError::invalid(
            "key_pem is not the key of the first certificate in certificate_pem (the chain starts with the leaf)",
        ));
    }
    let sealed = key.seal(private.pkcs8_der(), &ServerCertRecord::seal_context(&name))?;
    let existed = match api.store.server_certificate(&name).await {
        Ok(_) => true,
        Err(RegistryError::NotFound(_)) => false,
        Err(e) => return Err(e.into()),
    };
    let pem: String = chain.iter().map(Certificate::to_pem).collect();
    let record = api
        .store
        .put_server_certificate(&name, &pem, &sealed, &caller)
        .await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, to_json(&record)))
}

pub(super) async fn list_server_certificates(State(api): State<Api>) -> ApiResult {
    Ok(Json(
        json!({"items": api.store.list_server_certificates().await?}),
    ))
}

pub(super) async fn describe_server_certificate(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> ApiResult {
    let record = api.store.server_certificate(&name).await?;
    let users = domains_serving(&api, &name).await?;
    let mut body = to_json(&record).0;
    body["domains"] = json!(users);
    Ok(Json(body))
}

/// Deletes a server certificate no domain serves.
pub(super) async fn delete_server_certificate(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    refuse_reserved(&name)?;
    let users = domains_serving(&api, &name).await?;
    if !users.is_empty() {
        return Err(ApiError::from(RegistryError::Conflict(format!(
            "server certificate '{name}' is served by {}; give those domains another certificate first",
            users.join(", ")
        ))));
    }
    api.store.delete_server_certificate(&name, &caller).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `auto:HOST` names the cluster's `auto` certificate of a domain, which the nodes issue and
/// renew: an operator neither imports nor deletes one (a domain takes its own certificate with
/// `certificate = "registry:NAME"`).
fn refuse_reserved(name: &str) -> Result<(), ApiError> {
    if name.starts_with("auto:") {
        return Err(ApiError::invalid(format!(
            "'{name}': names starting with 'auto:' are the cluster's auto certificates, issued and renewed by the nodes; import under another name and set the domain's certificate = \"registry:NAME\""
        )));
    }
    Ok(())
}

/// The domains whose certificate is `registry:NAME`.
async fn domains_serving(api: &Api, name: &str) -> Result<Vec<String>, ApiError> {
    let reference = format!("registry:{name}");
    Ok(api
        .store
        .list_domains()
        .await?
        .into_iter()
        .filter(|d| d.spec.certificate == reference)
        .map(|d| d.hostname)
        .collect())
}
