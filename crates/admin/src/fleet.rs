//! Fleet provisioning routes: provisioning templates (`/v1/provisioning-templates`) and claim
//! certificates (`/v1/certificates/{id}/claim`). Devices themselves use the MQTT API on the data
//! plane (the gateway's `fleet` module, answered by the node).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Api, ApiResult, Body, Caller, cert_id, to_json};
use portcullis_registry::FleetTemplateUpdate;
use portcullis_registry::fleet::FleetTemplate;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateTemplate {
    name: String,
    #[serde(default)]
    description: String,
    /// Devices may use it at once (the default).
    #[serde(default = "yes")]
    enabled: bool,
    template: Value,
}

fn yes() -> bool {
    true
}

pub(super) async fn create_template(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<CreateTemplate>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let template = FleetTemplate::from_json(&req.template)?;
    let record = api
        .store
        .create_fleet_template(&req.name, &req.description, req.enabled, &template, &caller)
        .await?;
    Ok((StatusCode::CREATED, to_json(&record)))
}

pub(super) async fn list_templates(State(api): State<Api>) -> ApiResult {
    Ok(Json(
        json!({"items": api.store.list_fleet_templates().await?}),
    ))
}

pub(super) async fn describe_template(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> ApiResult {
    Ok(to_json(&api.store.fleet_template(&name).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateTemplate {
    description: Option<String>,
    enabled: Option<bool>,
    template: Option<Value>,
}

pub(super) async fn update_template(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
    Body(req): Body<UpdateTemplate>,
) -> ApiResult {
    let update = FleetTemplateUpdate {
        description: req.description,
        enabled: req.enabled,
        template: req
            .template
            .as_ref()
            .map(FleetTemplate::from_json)
            .transpose()?,
    };
    Ok(to_json(
        &api.store
            .update_fleet_template(&name, &update, &caller)
            .await?,
    ))
}

pub(super) async fn delete_template(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    api.store.delete_fleet_template(&name, &caller).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Claim {
    /// The provisioning templates the claim certificate may register devices under.
    templates: Vec<String>,
}

/// Makes a registered certificate a claim certificate: from then on (on every node within a
/// second) it may only ask for devices' certificates and register them under `templates`.
pub(super) async fn set_claim(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
    Body(req): Body<Claim>,
) -> ApiResult {
    Ok(to_json(
        &api.store
            .set_certificate_claim(&cert_id(&id)?, Some(&req.templates), &caller)
            .await?,
    ))
}

/// Makes a claim certificate an ordinary one again.
pub(super) async fn clear_claim(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    Ok(to_json(
        &api.store
            .set_certificate_claim(&cert_id(&id)?, None, &caller)
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EnrollmentCodes {
    /// How many (1-1000, default 1).
    count: Option<u32>,
    /// How long they are good, in hours (1-8760, default a week).
    ttl_hours: Option<i64>,
}

/// One-time enrollment codes for a template (EST `simpleenroll` with HTTP Basic
/// authentication, for devices with no certificate yet): answered once, kept as hashes.
pub(super) async fn enrollment_codes(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
    Body(req): Body<EnrollmentCodes>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let ttl_hours = req.ttl_hours.unwrap_or(24 * 7);
    if !(1..=8760).contains(&ttl_hours) {
        return Err(super::ApiError::invalid(
            "ttl_hours must be between 1 and 8760",
        ));
    }
    let (codes, expires_at) = api
        .store
        .create_enrollment_codes(&name, req.count.unwrap_or(1), ttl_hours * 3600, &caller)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"template": name, "codes": codes, "expires_at": expires_at})),
    ))
}
