//! Registered CAs: proof of possession (the registration code), statuses, auto-registration
//! and provisioning templates.

use std::str::FromStr;

use portcullis_pki::Certificate;
use sqlx::Row;

use super::changes::{audit, audit_many};
use super::{Store, conflict_or, now, with_pool};
use crate::RegistryError;
use crate::audit::AuditAction;
use crate::model::{CaRecord, CaStatus, CertId};
use crate::provisioning::ProvisioningTemplate;

/// A CA to register.
#[derive(Debug, Clone, Default)]
pub struct CaRegistration<'a> {
    /// The CA certificate, PEM or DER.
    pub certificate: &'a [u8],
    /// The proof-of-possession certificate (CN = registration code, signed by the CA's key).
    pub verification: Option<&'a [u8]>,
    /// Register without proof of possession, flagged unverified.
    pub allow_unverified: bool,
    /// ACTIVE at once (otherwise INACTIVE).
    pub activate: bool,
    /// Register certificates it issued just in time.
    pub auto_registration: bool,
    /// Provision them as things (JITP).
    pub provisioning_template: Option<ProvisioningTemplate>,
}

/// Changes to a registered CA; `None` keeps a field.
#[derive(Debug, Clone, Default)]
pub struct CaUpdate {
    /// New status.
    pub status: Option<CaStatus>,
    /// New auto-registration flag.
    pub auto_registration: Option<bool>,
    /// New provisioning template (`Some(None)` removes it).
    pub provisioning_template: Option<Option<ProvisioningTemplate>>,
    /// Also revoke every certificate the CA issued (with status INACTIVE).
    pub revoke_issued: bool,
    /// Make it a claim CA for these templates (`Some(None)`: no longer one).
    pub claim_templates: Option<Option<Vec<String>>>,
}

fn ca_from_row<R: Row>(row: &R) -> Result<CaRecord, RegistryError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let der: Vec<u8> = row.try_get("der")?;
    let template: Option<String> = row.try_get("provisioning_template")?;
    Ok(CaRecord {
        provisioning_template: template
            .map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(|e| RegistryError::Invalid(format!("stored provisioning template: {e}")))?,
        id: CertId::from_str(&row.try_get::<String, _>("id")?)?,
        subject: row.try_get("subject")?,
        status: CaStatus::from_str(&row.try_get::<String, _>("status")?)?,
        auto_registration: row.try_get::<i64, _>("auto_registration")? != 0,
        verified: row.try_get::<i64, _>("verified")? != 0,
        claim_templates: row
            .try_get::<Option<String>, _>("claim_templates")?
            .and_then(|t| serde_json::from_str(&t).ok()),
        not_after: row.try_get("not_after")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
        pem: Certificate::from_der(der)?.to_pem(),
    })
}

fn summary_ca(ca: &CaRecord) -> serde_json::Value {
    serde_json::json!({
        "id": ca.id, "subject": ca.subject, "status": ca.status,
        "auto_registration": ca.auto_registration, "verified": ca.verified, "version": ca.version,
        "claim_templates": ca.claim_templates,
        "provisioning_template": ca.provisioning_template,
    })
}

impl Store {
    /// The registry's CA registration code: 64 hex characters, made once and kept.
    pub async fn registration_code(&self) -> Result<String, RegistryError> {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes)
            .map_err(|_| RegistryError::Invalid("the system random generator failed".into()))?;
        let fresh = portcullis_pki::cert::hex(&bytes, "");
        with_pool!(self, pool => {
            sqlx::query("INSERT INTO registry_meta (key, value) VALUES ('registration_code', $1) ON CONFLICT (key) DO NOTHING")
                .bind(&fresh)
                .execute(pool)
                .await?;
            let row = sqlx::query("SELECT value FROM registry_meta WHERE key = 'registration_code'")
                .fetch_one(pool)
                .await?;
            Ok(row.try_get::<String, _>("value")?)
        })
    }

    /// Registers a CA. With a verification certificate, proof of possession is required: its CN
    /// must be the registration code and the CA's key must have signed it. Without one,
    /// `unverified` must be set and the CA is flagged unverified.
    pub async fn register_ca(
        &self,
        registration: CaRegistration<'_>,
        actor: &str,
    ) -> Result<CaRecord, RegistryError> {
        let CaRegistration {
            certificate: ca_pem,
            verification: verification_pem,
            allow_unverified: unverified,
            activate,
            auto_registration,
            provisioning_template,
        } = registration;
        if let Some(t) = &provisioning_template {
            t.check()?;
        }
        let (ca, _) = Certificate::first_and_rest(ca_pem)?;
        if !ca.info().is_ca() {
            return Err(RegistryError::Invalid(format!(
                "'{}' is not a CA certificate (basic constraints lack CA:TRUE)",
                ca.info().subject
            )));
        }
        let verified = match verification_pem {
            Some(pem) => {
                let (proof, _) = Certificate::first_and_rest(pem)?;
                let code = self.registration_code().await?;
                let cn_ok = proof.info().subject == format!("CN={code}");
                if !cn_ok {
                    return Err(RegistryError::Invalid(format!(
                        "the verification certificate's subject is '{}', not CN=<registration code>; make it with `portcullis pki verification-cert --code {code}`",
                        proof.info().subject
                    )));
                }
                if !proof.is_signed_by(&ca) {
                    return Err(RegistryError::Invalid(
                        "the verification certificate was not signed by this CA's key".into(),
                    ));
                }
                true
            }
            None if unverified => false,
            None => {
                return Err(RegistryError::Invalid(
                    "a verification certificate is required (or register it explicitly unverified)"
                        .into(),
                ));
            }
        };
        let id = CertId::of_der(ca.der());
        let now = now();
        let status = if activate {
            CaStatus::Active
        } else {
            CaStatus::Inactive
        };
        let info = ca.info();
        let template_json = provisioning_template
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| RegistryError::Invalid(format!("provisioning template: {e}")))?;
        let record = CaRecord {
            provisioning_template,
            id: id.clone(),
            subject: info.subject.clone(),
            status,
            auto_registration,
            verified,
            claim_templates: None,
            not_after: info.not_after_unix(),
            created_at: now,
            updated_at: now,
            version: 1,
            pem: ca.to_pem(),
        };
        let after = serde_json::to_string(&summary_ca(&record)).ok();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let inserted = sqlx::query(
                "INSERT INTO cas (id, der, subject, status, auto_registration, verified, provisioning_template, not_after, created_at, updated_at, version) \
                 VALUES ($1, $2, $3, $4, $5, $6, $9, $7, $8, $8, 1)",
            )
            .bind(id.as_str())
            .bind(ca.der().to_vec())
            .bind(&info.subject)
            .bind(status.as_str())
            .bind(i64::from(auto_registration))
            .bind(i64::from(verified))
            .bind(info.not_after_unix())
            .bind(now)
            .bind(template_json.clone())
            .execute(&mut *tx)
            .await;
            if let Err(e) = inserted {
                return Err(conflict_or(e, format!("CA {id} is already registered")));
            }
            audit(&mut *tx, actor, AuditAction::CaRegister, id.as_str(), None, after.as_deref()).await?;
            tx.commit().await?;
            Ok(record)
        })
    }

    /// A registered CA.
    pub async fn ca(&self, id: &CertId) -> Result<CaRecord, RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT * FROM cas WHERE id = $1").bind(id.as_str()).fetch_optional(pool).await?;
            match row {
                Some(row) => ca_from_row(&row),
                None => Err(RegistryError::NotFound(format!("CA {id}"))),
            }
        })
    }

    /// Every registered CA, by subject.
    pub async fn list_cas(&self) -> Result<Vec<CaRecord>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT * FROM cas ORDER BY subject, id").fetch_all(pool).await?;
            rows.iter().map(ca_from_row).collect()
        })
    }

    /// Changes a CA. With `revoke_issued`, every certificate it issued that is not REVOKED yet
    /// is revoked in the same transaction; the count is returned with the record.
    pub async fn update_ca(
        &self,
        id: &CertId,
        update: &CaUpdate,
        actor: &str,
    ) -> Result<(CaRecord, u64), RegistryError> {
        if let Some(Some(t)) = &update.provisioning_template {
            t.check()?;
        }
        if let Some(Some(names)) = &update.claim_templates {
            if names.is_empty() {
                return Err(RegistryError::Invalid(
                    "a claim CA names at least one provisioning template".into(),
                ));
            }
            for n in names {
                crate::names::check_name("provisioning template", n)?;
            }
        }
        loop {
            let before = self.ca(id).await?;
            let mut after = before.clone();
            after.status = update.status.unwrap_or(before.status);
            after.auto_registration = update.auto_registration.unwrap_or(before.auto_registration);
            if let Some(t) = &update.provisioning_template {
                after.provisioning_template = t.clone();
            }
            if let Some(c) = &update.claim_templates {
                after.claim_templates = c.clone();
            }
            let claim_json = after
                .claim_templates
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| RegistryError::Invalid(format!("claim templates: {e}")))?;
            after.updated_at = now();
            after.version = before.version + 1;
            let template_json = after
                .provisioning_template
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| RegistryError::Invalid(format!("provisioning template: {e}")))?;
            let (b, a) = (
                serde_json::to_string(&summary_ca(&before)).ok(),
                serde_json::to_string(&summary_ca(&after)).ok(),
            );
            let written = with_pool!(self, pool => {
                let mut tx = pool.begin().await?;
                let done = sqlx::query(
                    "UPDATE cas SET status = $1, auto_registration = $2, provisioning_template = $3, updated_at = $4, version = version + 1, claim_templates = $7 WHERE id = $5 AND version = $6",
                )
                .bind(after.status.as_str())
                .bind(i64::from(after.auto_registration))
                .bind(template_json)
                .bind(after.updated_at)
                .bind(id.as_str())
                .bind(before.version)
                .bind(&claim_json)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 1 {
                    audit(&mut *tx, actor, AuditAction::CaUpdate, id.as_str(), b.as_deref(), a.as_deref()).await?;
                    let mut revoked = 0;
                    if update.revoke_issued {
                        // The statuses before, then the update; the audit entries (and webhook
                        // events) are for exactly the rows the update changed.
                        let before_status: std::collections::HashMap<String, String> = sqlx::query(
                            "SELECT id, status FROM certificates WHERE ca_id = $1 AND status <> 'REVOKED'",
                        )
                        .bind(id.as_str())
                        .fetch_all(&mut *tx)
                        .await?
                        .iter()
                        .map(|r| Ok((r.try_get("id")?, r.try_get("status")?)))
                        .collect::<Result<_, sqlx::Error>>()?;
                        let changed: Vec<String> = sqlx::query(
                            "UPDATE certificates SET status = 'REVOKED', updated_at = $1, version = version + 1 WHERE ca_id = $2 AND status <> 'REVOKED' RETURNING id",
                        )
                        .bind(after.updated_at)
                        .bind(id.as_str())
                        .fetch_all(&mut *tx)
                        .await?
                        .iter()
                        .map(|r| r.try_get("id"))
                        .collect::<Result<_, sqlx::Error>>()?;
                        let after_json = r#"{"status":"REVOKED","cause":"ca-revoke-issued"}"#.to_string();
                        let entries: Vec<(String, Option<String>, String)> = changed
                            .into_iter()
                            .map(|cert| {
                                let before = before_status
                                    .get(&cert)
                                    .map(|s| serde_json::json!({"status": s}).to_string());
                                (cert, before, after_json.clone())
                            })
                            .collect();
                        revoked = u64::try_from(entries.len()).unwrap_or(u64::MAX);
                        audit_many(&mut *tx, actor, AuditAction::CertificateStatus, &entries).await?;
                    }
                    tx.commit().await?;
                    Some(revoked)
                } else {
                    None
                }
            });
            if let Some(revoked) = written {
                return Ok((after, revoked));
            }
        }
    }
}
