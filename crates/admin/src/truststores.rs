//! Truststore routes: versions, the domains that follow them, and impact previews checked as
//! the gateway checks.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use portcullis_pki::verify::{Usage, Verdict, VerifyOptions, verify};
use serde::Deserialize;
use serde_json::{Value, json};

use portcullis_registry::{DomainSpec, RegistryError};

use super::{Api, ApiError, ApiResult, Body, Caller, Params, to_json};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateTruststore {
    name: String,
    bundle_pem: String,
    #[serde(default)]
    crls_pem: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AddVersion {
    bundle_pem: String,
    #[serde(default)]
    crls_pem: Vec<String>,
}

pub(super) async fn create_truststore(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<CreateTruststore>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let v = api
        .store
        .add_truststore_version(&req.name, &req.bundle_pem, &req.crls_pem, true, &caller)
        .await?;
    Ok((StatusCode::CREATED, to_json(&v)))
}

pub(super) async fn add_truststore_version(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
    Body(req): Body<AddVersion>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let v = api
        .store
        .add_truststore_version(&name, &req.bundle_pem, &req.crls_pem, false, &caller)
        .await?;
    // The domains that follow the latest version use it from now on: what they should know
    // (a CA deeper than their max_chain_depth, a profile's accommodation) comes with the answer.
    let following: Vec<(String, DomainSpec)> = domains_using(&api, &name)
        .await?
        .into_iter()
        .filter(|(_, spec)| spec.truststore() == Some(&format!("registry:{name}")))
        .collect();
    let mut out = to_json(&v).0;
    if !following.is_empty() {
        let all: Vec<(String, DomainSpec)> = api
            .store
            .list_domains()
            .await?
            .into_iter()
            .map(|d| (d.hostname, d.spec))
            .collect();
        let checked = api.hooks.check_domains(&all).await.map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-domain",
                format!(
                    "the version is stored, but the domains that follow it cannot be loaded: {e}"
                ),
            )
        })?;
        let warnings: serde_json::Map<String, Value> = checked
            .warnings
            .into_iter()
            .filter(|(h, w)| !w.is_empty() && following.iter().any(|(f, _)| f == h))
            .map(|(h, w)| (h, json!(w)))
            .collect();
        if let Some(o) = out.as_object_mut() {
            o.insert("domain_warnings".into(), Value::Object(warnings));
        }
    }
    Ok((StatusCode::CREATED, Json(out)))
}

pub(super) async fn list_truststores(State(api): State<Api>) -> ApiResult {
    let items: Vec<Value> = api
        .store
        .list_truststores()
        .await?
        .into_iter()
        .map(|(name, latest)| json!({"name": name, "latest_version": latest}))
        .collect();
    Ok(Json(json!({"items": items})))
}

pub(super) async fn describe_truststore(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> ApiResult {
    Ok(version_json(
        &api.store.truststore_version(&name, None).await?,
    ))
}

/// A truststore version with its certificates decoded (subject, id, validity, role).
pub(super) fn version_json(v: &portcullis_registry::TruststoreVersion) -> Json<Value> {
    let mut out = serde_json::to_value(v).unwrap_or(Value::Null);
    let certificates: Vec<Value> = portcullis_pki::Truststore::from_pem(v.bundle.as_bytes())
        .map(|store| {
            store
                .entries()
                .iter()
                .map(|e| {
                    let info = e.certificate.info();
                    json!({
                        "index": e.index,
                        "subject": info.subject,
                        "issuer": info.issuer,
                        "id": info.id,
                        "not_after": info.not_after,
                        "role": if e.anchor { "anchor" } else { "intermediate" },
                        "duplicate": e.duplicate,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    if let Some(o) = out.as_object_mut() {
        o.insert("certificates".into(), Value::Array(certificates));
    }
    Json(out)
}

/// The domains whose truststore is `registry:NAME` or `registry:NAME@VERSION`, with their
/// specification.
pub(super) async fn domains_using(
    api: &Api,
    name: &str,
) -> Result<Vec<(String, DomainSpec)>, ApiError> {
    let exact = format!("registry:{name}");
    let pinned = format!("registry:{name}@");
    Ok(api
        .store
        .list_domains()
        .await?
        .into_iter()
        .filter(|d| {
            d.spec
                .truststore()
                .is_some_and(|t| t == exact || t.starts_with(&pinned))
        })
        .map(|d| (d.hostname, d.spec))
        .collect())
}

pub(super) async fn delete_truststore(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let users = domains_using(&api, &name).await?;
    if !users.is_empty() {
        let names: Vec<&str> = users.iter().map(|(h, _)| h.as_str()).collect();
        return Err(ApiError::from(RegistryError::Conflict(format!(
            "truststore '{name}' is used by {}; point those domains at another truststore first",
            names.join(", ")
        ))));
    }
    api.store.delete_truststore(&name, &caller).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) fn version_number(version: &str) -> Result<i64, ApiError> {
    version
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| ApiError::invalid(format!("version '{version}' must be a number from 1")))
}

pub(super) async fn truststore_version(
    State(api): State<Api>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult {
    let v = version_number(&version)?;
    Ok(version_json(
        &api.store.truststore_version(&name, Some(v)).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PreviewParams {
    days: Option<u32>,
}

/// Impact preview: the certificates seen in the last N days that this version would reject,
/// with the reasons, checked as the gateway checks them.
pub(super) async fn preview(
    State(api): State<Api>,
    Path((name, version)): Path<(String, String)>,
    Params(q): Params<PreviewParams>,
) -> ApiResult {
    let v = version_number(&version)?;
    let tv = api.store.truststore_version(&name, Some(v)).await?;
    let mut out = impact(&api, &name, Some(v), &tv.bundle, &tv.crls, q.days).await?;
    if let Some(o) = out.as_object_mut() {
        o.insert("version".into(), json!(v));
        o.insert("warnings".into(), json!(tv.warnings));
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PreviewBundle {
    bundle_pem: String,
    #[serde(default)]
    crls_pem: Vec<String>,
    days: Option<u32>,
}

/// Impact preview of a bundle not stored yet, on the domains that use truststore `name`.
pub(super) async fn preview_bundle(
    State(api): State<Api>,
    Path(name): Path<String>,
    Body(req): Body<PreviewBundle>,
) -> ApiResult {
    let mut out = impact(&api, &name, None, &req.bundle_pem, &req.crls_pem, req.days).await?;
    let store = portcullis_pki::Truststore::from_pem(req.bundle_pem.as_bytes())?;
    let mut warnings: Vec<String> = store
        .store_warnings()
        .iter()
        .map(|w| w.to_string())
        .collect();
    for e in store.entries() {
        for w in &e.warnings {
            warnings.push(format!(
                "certificate #{} ({}): {w}",
                e.index,
                e.certificate.info().subject
            ));
        }
    }
    if let Some(o) = out.as_object_mut() {
        o.insert("version".into(), json!("bundle"));
        o.insert("warnings".into(), json!(warnings));
    }
    Ok(Json(out))
}

/// The certificates seen in the last `days` days on the domains that use truststore `name`
/// that `bundle` (with `crls`) would reject, checked as each domain checks them (its profile,
/// chain depth and CRL policy).
pub(super) async fn impact(
    api: &Api,
    name: &str,
    version: Option<i64>,
    bundle: &str,
    crls: &[String],
    days: Option<u32>,
) -> Result<Value, ApiError> {
    let days = days.unwrap_or(30);
    if !(1..=3650).contains(&days) {
        return Err(ApiError::invalid("days must be between 1 and 3650"));
    }
    let store = portcullis_pki::Truststore::from_pem(bundle.as_bytes())?;
    let mut parsed = Vec::new();
    for c in crls {
        parsed.extend(portcullis_pki::crl::Crl::all_from_pem_or_der(c.as_bytes())?);
    }
    // The domains a version reaches: those that follow the latest, and those pinned to it.
    let pinned = version.map(|v| format!("registry:{name}@{v}"));
    let latest = format!("registry:{name}");
    let domains: Vec<(String, DomainSpec)> = domains_using(api, name)
        .await?
        .into_iter()
        .filter(|(_, spec)| {
            let t = spec.truststore().unwrap_or_default();
            t == latest || pinned.as_deref() == Some(t)
        })
        .collect();
    let options_of = |spec: &DomainSpec| {
        let mtls = spec.mtls.as_ref();
        let profile = mtls
            .and_then(|m| m.verification.parse::<portcullis_pki::VerifyProfile>().ok())
            .unwrap_or_default();
        VerifyOptions {
            usage: Usage::Client,
            crls: parsed.clone(),
            max_depth: mtls.map_or(4, |m| m.max_chain_depth),
            allow_stale_crls: mtls.is_some_and(|m| m.stale_crl == "allow"),
            ..VerifyOptions::for_profile(profile)
        }
    };
    let options: BTreeMap<&str, VerifyOptions> = domains
        .iter()
        .map(|(host, spec)| (host.as_str(), options_of(spec)))
        .collect();
    let since = time::OffsetDateTime::now_utc().unix_timestamp() - i64::from(days) * 86_400;
    let seen: Vec<_> = api
        .store
        .seen_since(since)
        .await?
        .into_iter()
        .filter(|(_, domain, _)| options.contains_key(domain.as_str()))
        .collect();
    let rejected: Vec<Value> = seen
        .iter()
        .filter_map(|(cert, domain, last_seen)| {
            let options = options.get(domain.as_str())?;
            match verify(cert, &[], &store, options) {
                Verdict::Valid { .. } => None,
                Verdict::Rejected {
                    reason,
                    explanation,
                } => Some(json!({
                    "certificate_id": cert.info().id,
                    "subject": cert.info().subject,
                    "domain": domain,
                    "last_seen": last_seen,
                    "reason": reason.code(),
                    "explanation": explanation,
                })),
            }
        })
        .collect();
    Ok(json!({
        "truststore": name,
        "domains": domains.iter().map(|(h, _)| h.clone()).collect::<Vec<_>>(),
        "days": days,
        "checked": seen.len(),
        "would_reject": rejected.len(),
        "rejected": rejected,
    }))
}
