//! Domain routes: the registry's domains, each change checked by the gateway as a whole
//! before it is stored.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use portcullis_registry::{DomainSpec, RegistryError};

use super::{Api, ApiError, ApiResult, Body, Caller, Params, to_json};

pub(super) async fn list_domains(State(api): State<Api>) -> ApiResult {
    Ok(Json(json!({"items": api.store.list_domains().await?})))
}

pub(super) async fn describe_domain(
    State(api): State<Api>,
    Path(hostname): Path<String>,
) -> ApiResult {
    Ok(to_json(
        &api.store.domain(&hostname.to_ascii_lowercase()).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PutDomain {
    /// The domain as a `[[domain]]` table of the configuration file spells it, in JSON.
    spec: Value,
    /// Write only if the stored version is still this one (0: only if it does not exist yet).
    expected_version: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeleteDomain {
    expected_version: Option<i64>,
}

/// The stored domains with one replaced, added (`Some`) or removed (`None`), checked by the
/// gateway as a whole; also returns the version the change was checked against (0: new).
pub(super) async fn checked_domains(
    api: &Api,
    hostname: &str,
    spec: Option<DomainSpec>,
) -> Result<(Vec<(String, DomainSpec)>, i64, Vec<String>), ApiError> {
    // The domain changed is not read: one stored by a newer version can be replaced or removed.
    let (others, version) = api.store.domains_except(hostname).await?;
    let mut domains: Vec<(String, DomainSpec)> =
        others.into_iter().map(|d| (d.hostname, d.spec)).collect();
    if spec.is_none() && version == 0 {
        return Err(RegistryError::NotFound(format!("domain {hostname}")).into());
    }
    let changed = spec.is_some();
    domains.extend(spec.map(|s| (hostname.to_string(), s)));
    let checked = api.hooks.check_domains(&domains).await.map_err(|e| {
        let what = if changed {
            format!("domain {hostname}")
        } else {
            format!("without domain {hostname}, the configuration")
        };
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-domain",
            format!("{what} cannot be loaded: {e}"),
        )
    })?;
    let warnings = checked
        .warnings
        .into_iter()
        .find(|(h, _)| h == hostname)
        .map(|(_, w)| w)
        .unwrap_or_default();
    Ok((domains, version, warnings))
}

pub(super) async fn put_domain(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(hostname): Path<String>,
    Body(req): Body<PutDomain>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let hostname = hostname.to_ascii_lowercase();
    let mut spec = req.spec;
    let Some(fields) = spec.as_object_mut() else {
        return Err(ApiError::invalid(
            "spec must be a JSON object with the keys of a [[domain]] table",
        ));
    };
    match fields
        .get("hostname")
        .map(|h| h.as_str().map(str::to_ascii_lowercase))
    {
        None => {
            fields.insert("hostname".into(), Value::String(hostname.clone()));
        }
        Some(Some(h)) if h == hostname => {}
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "spec.hostname must be \"{hostname}\", the hostname in the path"
            )));
        }
    }
    // JSON only at this edge: from here on the domain is typed (every default filled in, unknown
    // keys refused).
    let spec: DomainSpec = serde_json::from_value(spec).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-domain",
            format!("domain {hostname} cannot be loaded: {e}"),
        )
    })?;
    let (domains, checked_version, warnings) =
        checked_domains(&api, &hostname, Some(spec.clone())).await?;
    let expected = req.expected_version.unwrap_or(checked_version);
    if expected != checked_version {
        return Err(RegistryError::Conflict(format!(
            "domain {hostname} is at version {checked_version}, not {expected}; read it again and retry"
        ))
        .into());
    }
    drop(domains);
    // Written only if nothing changed since the check.
    let record = api
        .store
        .put_domain(&hostname, &spec, Some(expected), &caller)
        .await?;
    let status = if expected == 0 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut body = serde_json::to_value(&record).unwrap_or(Value::Null);
    body["warnings"] = json!(warnings);
    Ok((status, Json(body)))
}

pub(super) async fn delete_domain(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(hostname): Path<String>,
    Params(q): Params<DeleteDomain>,
) -> ApiResult<StatusCode> {
    let hostname = hostname.to_ascii_lowercase();
    let (_, checked_version, _) = checked_domains(&api, &hostname, None).await?;
    let expected = q.expected_version.unwrap_or(checked_version);
    api.store
        .delete_domain(&hostname, Some(expected), &caller)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
