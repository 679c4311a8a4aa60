//! Policy routes: documents with versions, attachments, and the simulator.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use portcullis_pki::Certificate;
use portcullis_policy::context::{self, Subject, Target};
use portcullis_policy::{Policy, PolicyRef, Request as PolicyRequest};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::{Api, ApiError, ApiResult, Body, Caller, Params, to_json};
use portcullis_registry::{CertId, PolicyTarget, RegistryError, TargetType};

/// A document in a request, exactly as the client wrote it (so that duplicate keys, which a
/// parsed JSON value would silently collapse, are refused by the policy parser).
fn document_text(document: &RawValue) -> Result<String, ApiError> {
    if !document.get().trim_start().starts_with('{') {
        return Err(ApiError::invalid(
            "document must be a JSON object with a Statement list",
        ));
    }
    Ok(document.get().to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreatePolicy {
    name: String,
    document: Box<RawValue>,
}

pub(super) async fn create_policy(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<CreatePolicy>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let text = document_text(&req.document)?;
    let policy = api.store.create_policy(&req.name, &text, &caller).await?;
    Ok((StatusCode::CREATED, to_json(&policy)))
}

pub(super) async fn list_policies(State(api): State<Api>) -> ApiResult {
    Ok(Json(json!({"items": api.store.list_policies().await?})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VersionQuery {
    version: Option<i64>,
}

pub(super) async fn describe_policy(
    State(api): State<Api>,
    Path(name): Path<String>,
    Params(q): Params<VersionQuery>,
) -> ApiResult {
    Ok(to_json(&api.store.policy(&name, q.version).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdatePolicy {
    default_version: i64,
}

pub(super) async fn update_policy(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
    Body(req): Body<UpdatePolicy>,
) -> ApiResult {
    Ok(to_json(
        &api.store
            .set_default_policy_version(&name, req.default_version, &caller)
            .await?,
    ))
}

pub(super) async fn delete_policy(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    api.store.delete_policy(&name, &caller).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateVersion {
    document: Box<RawValue>,
    #[serde(default)]
    set_default: bool,
}

pub(super) async fn create_policy_version(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
    Body(req): Body<CreateVersion>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let text = document_text(&req.document)?;
    let policy = api
        .store
        .create_policy_version(&name, &text, req.set_default, &caller)
        .await?;
    Ok((StatusCode::CREATED, to_json(&policy)))
}

pub(super) async fn delete_policy_version(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path((name, version)): Path<(String, i64)>,
) -> ApiResult {
    Ok(to_json(
        &api.store
            .delete_policy_version(&name, version, &caller)
            .await?,
    ))
}

fn target(kind: &str, target: String) -> Result<PolicyTarget, ApiError> {
    Ok(PolicyTarget {
        target_type: TargetType::from_str(kind)?,
        target,
    })
}

pub(super) async fn attach_policy(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path((name, kind, id)): Path<(String, String, String)>,
) -> ApiResult {
    Ok(to_json(
        &api.store
            .attach_policy(&name, &target(&kind, id)?, &caller)
            .await?,
    ))
}

pub(super) async fn detach_policy(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path((name, kind, id)): Path<(String, String, String)>,
) -> ApiResult {
    Ok(to_json(
        &api.store
            .detach_policy(&name, &target(&kind, id)?, &caller)
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Simulate {
    /// The client certificate (PEM; a chain may follow, leaf first).
    certificate_pem: String,
    /// `http:GET`, `mqtt:Publish`…
    action: String,
    /// `route:api.example.com/orders`, `topic:devices/d1/telemetry`…
    resource: String,
    /// The client's address, for `IpAddress` conditions.
    source_ip: Option<std::net::IpAddr>,
    /// The MQTT client id, for `${mqtt:ClientId}`.
    client_id: Option<String>,
    /// Evaluate these policies (default versions) instead of those attached.
    policies: Option<Vec<String>>,
    /// The domain whose policies apply (default: the one a `route:` resource names).
    domain: Option<String>,
}

/// A policy context's target as the store names it.
pub(super) fn stored_target(target: &Target) -> PolicyTarget {
    let (target_type, name) = match target {
        Target::Certificate(id) => (TargetType::Certificate, id),
        Target::Thing(name) => (TargetType::Thing, name),
        Target::Ca(id) => (TargetType::Ca, id),
        Target::Domain(host) => (TargetType::Domain, host),
    };
    PolicyTarget {
        target_type,
        target: name.clone(),
    }
}

/// The policies attached to each of `targets`, in order, from the store: what
/// [`context::applicable`] reads.
pub(super) async fn attached_to(
    api: &Api,
    targets: &[Target],
) -> Result<Vec<(Target, Vec<String>)>, ApiError> {
    let mut attached = Vec::with_capacity(targets.len());
    for t in targets {
        attached.push((t.clone(), api.store.policies_of(&stored_target(t)).await?));
    }
    Ok(attached)
}

/// The domain a `route:<domain>/<path>` resource names.
fn route_domain(resource: &str) -> Option<String> {
    let rest = resource.strip_prefix("route:")?;
    Some(rest.split('/').next().unwrap_or(rest).to_ascii_lowercase())
}

pub(super) async fn simulate(State(api): State<Api>, Body(req): Body<Simulate>) -> ApiResult {
    let chain = Certificate::all_from_pem_or_der(req.certificate_pem.as_bytes())?;
    let Some(leaf) = chain.first() else {
        return Err(ApiError::invalid("certificate_pem holds no certificate"));
    };
    let id = CertId::of_der(leaf.der());
    // What the registry knows: things (names and attributes) and the CA it was registered with.
    let record = match api.store.certificate(&id).await {
        Ok(r) => Some(r),
        Err(RegistryError::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let thing_names: Vec<String> = record
        .as_ref()
        .map(|r| r.things.clone())
        .unwrap_or_default();
    let mut attributes = Vec::with_capacity(thing_names.len());
    for name in &thing_names {
        attributes.push(api.store.thing(name).await?.attributes);
    }
    let things: Vec<(&str, &BTreeMap<String, String>)> = thing_names
        .iter()
        .map(String::as_str)
        .zip(attributes.iter())
        .collect();
    // The same context the gateway builds from its snapshot.
    let subject = Subject {
        leaf,
        id: id.as_str(),
        things: &things,
        ca: record
            .as_ref()
            .and_then(|r| r.ca_id.as_ref())
            .map(CertId::as_str),
    };
    let vars = context::variables(Some(&subject), req.client_id.as_deref());
    // The policies: those named, or those attached to the certificate, its things, its CA and
    // the domain.
    let names: Vec<(String, String)> = match &req.policies {
        Some(names) => names
            .iter()
            .map(|n| (n.clone(), "named in the request".to_string()))
            .collect(),
        None => {
            let domain = req.domain.clone().or_else(|| route_domain(&req.resource));
            let targets = context::targets(Some(&subject), domain.as_deref());
            let mut attached: HashMap<Target, Vec<String>> =
                attached_to(&api, &targets).await?.into_iter().collect();
            context::applicable(&targets, |t| attached.remove(t).unwrap_or_default())
                .into_iter()
                .map(|(name, via)| (name, via.describe()))
                .collect()
        }
    };
    let mut policies = Vec::new();
    let mut used = Vec::new();
    for (name, via) in &names {
        let record = api.store.policy(name, None).await?;
        let policy = Policy::parse(&record.document.to_string())
            .map_err(|e| ApiError::invalid(format!("stored policy '{name}': {e}")))?;
        used.push(json!({"name": name, "version": record.version, "attached_to": via}));
        policies.push((
            PolicyRef {
                name: name.clone(),
                version: record.version,
            },
            Arc::new(policy),
        ));
    }
    let bound = portcullis_policy::bind(&policies, &vars);
    let request = PolicyRequest {
        action: &req.action,
        resource: &req.resource,
        source_ip: req.source_ip,
        now: time::OffsetDateTime::now_utc().unix_timestamp(),
    };
    let decision = bound.decide(&request);
    let variables: BTreeMap<&str, &[String]> = vars.iter().collect();
    Ok(Json(json!({
        "certificate_id": id,
        "registered": record.is_some(),
        "action": req.action,
        "resource": req.resource,
        "decision": if decision.allowed { "allow" } else { "deny" },
        "reason": decision.reason,
        "statement": decision.by,
        "policies": used,
        "variables": variables,
        "trace": bound.trace(&request),
    })))
}
