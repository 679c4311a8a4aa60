//! Operator routes: the audit log, API tokens and admin client certificates.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use portcullis_registry::store::AuditFilter;

use super::{Api, ApiError, ApiResult, Body, Caller, Params};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditParams {
    action: Option<String>,
    target: Option<String>,
    before: Option<i64>,
    limit: Option<u32>,
}

pub(super) async fn audit(State(api): State<Api>, Params(q): Params<AuditParams>) -> ApiResult {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let items = api
        .store
        .audit_log(&AuditFilter {
            action: q.action,
            target: q.target,
            before: q.before,
            limit: Some(limit),
        })
        .await?;
    let next = (items.len() == limit as usize)
        .then(|| items.last().map(|e| e.seq))
        .flatten();
    Ok(Json(json!({"items": items, "next": next})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateToken {
    name: String,
}

pub(super) async fn create_token(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<CreateToken>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let (record, secret) = api.store.create_token(&req.name, &caller).await?;
    let mut body = serde_json::to_value(&record).unwrap_or(Value::Null);
    // Shown once; only its hash is stored.
    body["token"] = json!(secret);
    Ok((StatusCode::CREATED, Json(body)))
}

pub(super) async fn list_admin_certificates(State(api): State<Api>) -> ApiResult {
    let current = api.hooks.admin_certificate().map(|c| c.info().id.clone());
    Ok(Json(json!({
        "current": current,
        "items": api.store.admin_certificates().await?,
    })))
}

pub(super) async fn rotate_admin_certificate(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let rotated = api
        .hooks
        .rotate_admin_certificate()
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "no-admin-ca", e))?;
    api.store
        .record_admin_certificate(&rotated.certificate, &caller)
        .await?;
    if let Some(previous) = &rotated.previous {
        let p = previous.info();
        api.store
            .revoke_admin_certificate(&p.id, &p.subject, p.not_after_unix(), &caller)
            .await?;
    }
    let info = rotated.certificate.info();
    let p12_base64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&rotated.p12)
    };
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": info.id,
            "subject": info.subject,
            "not_after": info.not_after,
            "certificate_pem": rotated.certificate.to_pem(),
            "chain_pem": rotated.chain_pem,
            // Returned once; the node keeps its copy in the data dir (0600).
            "private_key_pem": rotated.key_pem,
            "p12_base64": p12_base64,
            "p12_password": rotated.p12_password,
            "revoked": rotated.previous.map(|p| p.info().id.clone()),
        })),
    ))
}

pub(super) async fn revoke_admin_certificate(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let current = api.hooks.admin_certificate();
    if current.as_ref().is_some_and(|c| c.info().id == id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "current-admin-certificate",
            "this is the node's current admin certificate: rotate it (`portcullis admin cert rotate`) instead, so a new one replaces it",
        ));
    }
    let known = api
        .store
        .admin_certificates()
        .await?
        .into_iter()
        .find(|r| r.id == id);
    let Some(known) = known else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!(
                "admin certificate {id} is not known here; list them with `portcullis admin cert list`"
            ),
        ));
    };
    api.store
        .revoke_admin_certificate(&known.id, &known.subject, known.not_after, &caller)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn list_tokens(State(api): State<Api>) -> ApiResult {
    Ok(Json(json!({"items": api.store.list_tokens().await?})))
}

pub(super) async fn delete_token(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    api.store.delete_token(&id, &caller).await?;
    Ok(StatusCode::NO_CONTENT)
}
