//! Certificate routes: issue, register (one or a batch), list, describe (with the policies
//! that apply), status changes, delete.

use std::str::FromStr;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use portcullis_pki::{Certificate, IssueRequest, KeyType, PrivateKey, Profile};
use serde::Deserialize;
use serde_json::{Value, json};

use portcullis_registry::store::CertFilter;
use portcullis_registry::{CertId, CertStatus, RegistryError};

use super::{Api, ApiError, ApiResult, Body, Caller, Params, cert_id, policies, to_json};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateCertificate {
    /// Register this certificate.
    certificate_pem: Option<String>,
    /// Or sign this CSR with the local CA.
    csr_pem: Option<String>,
    /// Or make a key and a certificate for this common name with the local CA.
    common_name: Option<String>,
    key_type: Option<String>,
    days: Option<u32>,
    status: Option<String>,
    /// Issue a subject whose CN, O, OU or C holds `/ + # * ? $` (policies never substitute
    /// such a value).
    #[serde(default)]
    allow_separators: bool,
    /// Put the certificate under this provisioning template's renewal terms.
    renewal_template: Option<String>,
}

/// Refuses to issue `cert` when a subject value policies read holds a separator or wildcard,
/// unless the operator asked for it.
pub(crate) fn check_separators(cert: &Certificate, allowed: bool) -> Result<(), ApiError> {
    match cert.subject_separator() {
        Some((attribute, c)) if !allowed => Err(ApiError::invalid(format!(
            "the subject's {attribute} holds {:?}, which policies read as a separator or wildcard: a policy using ${{cert:Subject.{attribute}}} would never match this certificate; choose another value, or set allow_separators (--allow-separators) if you mean it",
            c
        ))),
        _ => Ok(()),
    }
}

/// Certificates accepted in one batch request.
pub const MAX_BATCH: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RegisterBatch {
    /// PEM (or base64 DER in PEM armour) of each certificate.
    certificates_pem: Vec<String>,
    status: Option<String>,
}

/// Registers up to [`MAX_BATCH`] certificates in one transaction; each item's outcome in order.
pub(super) async fn register_batch(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<RegisterBatch>,
) -> ApiResult {
    if req.certificates_pem.is_empty() || req.certificates_pem.len() > MAX_BATCH {
        return Err(ApiError::invalid(format!(
            "certificates_pem must hold 1 to {MAX_BATCH} certificates"
        )));
    }
    let status = match req.status.as_deref() {
        None => CertStatus::Inactive,
        Some(s) => CertStatus::from_str(s)?,
    };
    let pems: Vec<&[u8]> = req.certificates_pem.iter().map(|p| p.as_bytes()).collect();
    let results = api
        .store
        .register_certificates(&pems, status, &caller)
        .await?;
    let (mut registered, mut existing, mut failed) = (0, 0, 0);
    let items: Vec<Value> = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| match r {
            Ok(record) => {
                registered += 1;
                json!({"index": index, "outcome": "registered", "id": record.id})
            }
            Err(RegistryError::Conflict(m)) => {
                existing += 1;
                json!({"index": index, "outcome": "exists", "message": m})
            }
            Err(e) => {
                failed += 1;
                json!({"index": index, "outcome": "invalid", "message": e.to_string()})
            }
        })
        .collect();
    Ok(Json(json!({
        "registered": registered, "existing": existing, "invalid": failed, "items": items,
    })))
}

pub(super) async fn create_certificate(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<CreateCertificate>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let status = match req.status.as_deref() {
        None => CertStatus::Inactive,
        Some(s) => CertStatus::from_str(s)?,
    };
    let issuer = || {
        api.issuer.clone().ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "no-local-ca",
                "this registry has no local CA to issue with; register certificates instead",
            )
        })
    };
    let request = |cn: Option<&str>| -> Result<IssueRequest, ApiError> {
        let subject = portcullis_pki::SubjectName::cn(cn.unwrap_or("device"));
        let mut r = IssueRequest::new(Profile::Client, subject);
        if let Some(days) = req.days {
            if days == 0 || days > 3650 {
                return Err(ApiError::invalid("days must be between 1 and 3650"));
            }
            r.days = days;
        }
        Ok(r)
    };
    let chosen = [
        req.certificate_pem.is_some(),
        req.csr_pem.is_some(),
        req.common_name.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if chosen != 1 {
        return Err(ApiError::invalid(
            "give exactly one of certificate_pem (register), csr_pem (sign a CSR with the local CA) or common_name (make a key and certificate)",
        ));
    }
    // The template first: an unknown one registers nothing.
    if let Some(t) = &req.renewal_template {
        api.store.fleet_template(t).await?;
    }
    let mut private_key = None;
    let pem = if let Some(pem) = &req.certificate_pem {
        pem.clone()
    } else if let Some(csr) = &req.csr_pem {
        let issuer = issuer()?;
        let r = request(None)?;
        let cert = portcullis_pki::issue::sign_csr(csr.as_bytes(), &r, &issuer)?;
        check_separators(&cert, req.allow_separators)?;
        cert.to_pem()
    } else {
        let issuer = issuer()?;
        let cn = req.common_name.as_deref().unwrap_or_default();
        if cn.is_empty() || cn.len() > 64 {
            return Err(ApiError::invalid("common_name must be 1-64 characters"));
        }
        let key_type = match req.key_type.as_deref() {
            None => KeyType::EcP256,
            Some(k) => KeyType::from_str(k)?,
        };
        let key = PrivateKey::generate(key_type)?;
        let cert = portcullis_pki::issue::issue(&request(Some(cn))?, &key, Some(&issuer))?;
        check_separators(&cert, req.allow_separators)?;
        private_key = Some(key.to_pem());
        cert.to_pem()
    };
    let mut record = api
        .store
        .register_certificate(pem.as_bytes(), status, &caller)
        .await?;
    if let Some(t) = &req.renewal_template {
        record = api
            .store
            .set_certificate_template(&record.id, t, &caller)
            .await?;
    }
    let mut body = serde_json::to_value(&record).unwrap_or(Value::Null);
    if let Some(issuer) = (req.certificate_pem.is_none())
        .then_some(api.issuer.as_ref())
        .flatten()
    {
        let chain: String = issuer.chain().iter().map(Certificate::to_pem).collect();
        body["chain_pem"] = json!(format!("{}{chain}", record.pem));
    }
    if let Some(key) = private_key {
        // Returned once; the registry never stores it.
        body["private_key_pem"] = json!(key);
    }
    Ok((StatusCode::CREATED, Json(body)))
}

/// How renewal stands now: certificates due (past two thirds of their lifetime, not renewed),
/// overdue (expired while ACTIVE), and renewals issued.
pub(super) async fn renewal(State(api): State<Api>) -> ApiResult {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    Ok(to_json(&api.store.renewal_counts(now).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RenewCertificate {
    /// Sign this CSR (same subject and SANs) instead of making a key.
    csr_pem: Option<String>,
    /// The new key's type (without a CSR).
    key_type: Option<String>,
    /// Lifetime in days.
    days: Option<u32>,
}

/// Renews a registered certificate with the local CA: a new key (answered once) or the
/// device's CSR for the same subject and SANs; the new certificate is ACTIVE where the old one
/// is (things, certificate policies), and the old one becomes INACTIVE when the new one is
/// first seen on a connection.
pub(super) async fn renew_certificate(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
    Body(req): Body<RenewCertificate>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let id = cert_id(&id)?;
    let old = api.store.certificate(&id).await?;
    if old.status == CertStatus::Revoked {
        return Err(ApiError::invalid(format!(
            "certificate {id} is REVOKED; a revoked certificate is not renewed (register or create a new one)"
        )));
    }
    if old.claim_templates.is_some() {
        return Err(ApiError::invalid(format!(
            "certificate {id} is a claim certificate; devices get their own by fleet provisioning"
        )));
    }
    let issuer = api.issuer.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no-local-ca",
            "this registry has no local CA to renew with",
        )
    })?;
    let (old_cert, _) = Certificate::first_and_rest(old.pem.as_bytes())?;
    let mut request = IssueRequest::new(Profile::Client, portcullis_pki::SubjectName::cn("device"));
    if let Some(days) = req.days {
        if days == 0 || days > 3650 {
            return Err(ApiError::invalid("days must be between 1 and 3650"));
        }
        request.days = days;
    }
    let mut private_key = None;
    let cert = match (&req.csr_pem, &req.key_type) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give csr_pem (the device keeps its key) or key_type (a new key made here), not both",
            ));
        }
        (Some(csr), None) => {
            let cert = portcullis_pki::issue::sign_csr(csr.as_bytes(), &request, &issuer)?;
            let (new, was) = (cert.info(), old_cert.info());
            if new.subject != was.subject || new.subject_alt_names != was.subject_alt_names {
                return Err(ApiError::invalid(format!(
                    "the CSR's subject and alternative names must be those of the certificate it renews ('{}')",
                    was.subject
                )));
            }
            cert
        }
        (None, key_type) => {
            let key_type = match key_type.as_deref() {
                None => KeyType::EcP256,
                Some(k) => KeyType::from_str(k)?,
            };
            let key = PrivateKey::generate(key_type)?;
            let cert = portcullis_pki::issue::renew(&old_cert, &request, &key, &issuer)?;
            private_key = Some(key.to_pem());
            cert
        }
    };
    let record = api
        .store
        .register_renewal(&cert, &id, &caller, false)
        .await?;
    let mut body = serde_json::to_value(&record).unwrap_or(Value::Null);
    let chain: String = issuer.chain().iter().map(Certificate::to_pem).collect();
    body["chain_pem"] = json!(format!("{}{chain}", record.pem));
    body["renews"] = json!(id);
    if let Some(key) = private_key {
        // Returned once; the registry never stores it.
        body["private_key_pem"] = json!(key);
    }
    Ok((StatusCode::CREATED, Json(body)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListCertificates {
    status: Option<String>,
    ca: Option<String>,
    thing: Option<String>,
    expiring_before: Option<i64>,
    limit: Option<u32>,
    after: Option<String>,
}

pub(super) async fn list_certificates(
    State(api): State<Api>,
    Params(q): Params<ListCertificates>,
) -> ApiResult {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 1000"));
    }
    let filter = CertFilter {
        status: q.status.as_deref().map(CertStatus::from_str).transpose()?,
        ca: q.ca.as_deref().map(cert_id).transpose()?,
        thing: q.thing,
        expiring_before: q.expiring_before,
        limit: Some(limit),
        after: q.after.as_deref().map(cert_id).transpose()?,
    };
    let items = api.store.list_certificates(&filter).await?;
    let next = (items.len() == limit as usize)
        .then(|| items.last().map(|c| c.id.to_string()))
        .flatten();
    Ok(Json(json!({"items": items, "next": next})))
}

/// A certificate's record, with its decoded fields (as `pki inspect`), the registered CA it
/// chains to, and the policies that apply to it (attached to it, its things or its CA).
pub(super) async fn describe_certificate(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> ApiResult {
    let record = api.store.certificate(&cert_id(&id)?).await?;
    let mut body = serde_json::to_value(&record).unwrap_or(Value::Null);
    let leaf = Certificate::all_from_pem_or_der(record.pem.as_bytes())
        .ok()
        .and_then(|c| c.into_iter().next());
    if let Some(cert) = &leaf {
        body["decoded"] = serde_json::to_value(cert.info()).unwrap_or(Value::Null);
    }
    body["ca_chain"] = json!(registered_chain(&api, record.ca_id.as_ref()).await);
    // Every attachment to the certificate, its things and its CA (a policy attached twice is
    // listed twice, so that detaching one shows the other), in the policy context's order.
    let targets = portcullis_policy::context::certificate_targets(
        record.id.as_str(),
        record.things.iter().map(String::as_str),
        record.ca_id.as_ref().map(CertId::as_str),
    );
    let mut policies = Vec::new();
    for (t, names) in policies::attached_to(&api, &targets).await? {
        for name in names {
            policies.push(json!({"name": name, "attached_to": t.describe()}));
        }
    }
    body["policies"] = json!(policies);
    Ok(Json(body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateCertificate {
    status: String,
    /// Why it is revoked (an RFC 5280 CRLReason name), with status REVOKED.
    #[serde(default)]
    reason: Option<String>,
}

pub(super) async fn update_certificate(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
    Body(req): Body<UpdateCertificate>,
) -> ApiResult {
    let status = CertStatus::from_str(&req.status)?;
    Ok(to_json(
        &api.store
            .set_certificate_status_for(&cert_id(&id)?, status, req.reason.as_deref(), &caller)
            .await?,
    ))
}

pub(super) async fn delete_certificate(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    api.store
        .delete_certificate(&cert_id(&id)?, &caller)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The registered CAs above a certificate, nearest first: its CA, then each CA's issuer among
/// the registered CAs (the one whose subject key id is the child's authority key id, or by
/// name when a key id is missing), up to a self-issued root or a CA whose issuer is not
/// registered; each with the key ids that link it (what the console draws).
async fn registered_chain(api: &Api, first: Option<&CertId>) -> Vec<Value> {
    let Some(first) = first else {
        return Vec::new();
    };
    let Ok(first) = api.store.ca(first).await else {
        return Vec::new();
    };
    let all = api.store.list_cas().await.unwrap_or_default();
    let info = |pem: &str| {
        Certificate::all_from_pem_or_der(pem.as_bytes())
            .ok()
            .and_then(|c| c.into_iter().next())
            .map(|c| c.info().clone())
    };
    let mut chain = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut next = Some(first);
    while let Some(ca) = next.take() {
        if !seen.insert(ca.id.clone()) || chain.len() >= 8 {
            break;
        }
        let decoded = info(&ca.pem);
        let (ski, aki, issuer, self_issued) = match &decoded {
            Some(i) => (
                i.subject_key_id.clone(),
                i.authority_key_id.clone(),
                i.issuer.clone(),
                i.subject == i.issuer,
            ),
            None => (None, None, String::new(), true),
        };
        chain.push(json!({
            "id": ca.id, "subject": ca.subject, "status": ca.status, "not_after": ca.not_after,
            "verified": ca.verified, "issuer": issuer, "subject_key_id": ski,
            "authority_key_id": aki, "self_issued": self_issued,
        }));
        if self_issued {
            break;
        }
        next = all
            .iter()
            .filter(|p| p.id != ca.id)
            .find(|p| {
                let Some(pi) = info(&p.pem) else {
                    return false;
                };
                match (&aki, &pi.subject_key_id) {
                    (Some(a), Some(s)) => a == s,
                    _ => pi.subject == issuer,
                }
            })
            .cloned();
    }
    chain
}
