//! CA routes: the registration code, registration with proof of possession, statuses.

use std::str::FromStr;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use portcullis_registry::store::{CaRegistration, CaUpdate};
use portcullis_registry::{CaStatus, ProvisioningTemplate};

use super::{Api, ApiResult, Body, Caller, cert_id, double_option, to_json};

pub(super) async fn registration_code(State(api): State<Api>) -> ApiResult {
    Ok(Json(
        json!({"registration_code": api.store.registration_code().await?}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RegisterCa {
    certificate_pem: String,
    verification_certificate_pem: Option<String>,
    #[serde(default)]
    allow_unverified: bool,
    #[serde(default)]
    activate: bool,
    #[serde(default)]
    auto_registration: bool,
    provisioning_template: Option<Value>,
}

pub(super) async fn register_ca(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<RegisterCa>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let template = req
        .provisioning_template
        .as_ref()
        .map(ProvisioningTemplate::from_json)
        .transpose()?;
    let record = api
        .store
        .register_ca(
            CaRegistration {
                certificate: req.certificate_pem.as_bytes(),
                verification: req
                    .verification_certificate_pem
                    .as_deref()
                    .map(str::as_bytes),
                allow_unverified: req.allow_unverified,
                activate: req.activate,
                auto_registration: req.auto_registration,
                provisioning_template: template,
            },
            &caller,
        )
        .await?;
    Ok((StatusCode::CREATED, to_json(&record)))
}

pub(super) async fn list_cas(State(api): State<Api>) -> ApiResult {
    Ok(Json(json!({"items": api.store.list_cas().await?})))
}

pub(super) async fn describe_ca(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    Ok(to_json(&api.store.ca(&cert_id(&id)?).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateCa {
    status: Option<String>,
    auto_registration: Option<bool>,
    #[serde(default, deserialize_with = "double_option")]
    provisioning_template: Option<Option<Value>>,
    #[serde(default)]
    revoke_issued: bool,
    /// Make it a claim CA for these provisioning templates (`null`: no longer one).
    #[serde(default, deserialize_with = "double_option")]
    claim_templates: Option<Option<Vec<String>>>,
}

pub(super) async fn update_ca(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
    Body(req): Body<UpdateCa>,
) -> ApiResult {
    let update = CaUpdate {
        status: req.status.as_deref().map(CaStatus::from_str).transpose()?,
        auto_registration: req.auto_registration,
        provisioning_template: req
            .provisioning_template
            .map(|t| t.as_ref().map(ProvisioningTemplate::from_json).transpose())
            .transpose()?,
        revoke_issued: req.revoke_issued,
        claim_templates: req.claim_templates,
    };
    let (record, revoked) = api
        .store
        .update_ca(&cert_id(&id)?, &update, &caller)
        .await?;
    let mut body = serde_json::to_value(&record).unwrap_or(Value::Null);
    body["revoked_certificates"] = json!(revoked);
    Ok(Json(body))
}
