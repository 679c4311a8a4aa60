//! Fleet provisioning by claim: templates, claim certificates, the certificates made for
//! devices with their single-use ownership tokens, and `RegisterThing` as one transaction
//! (token spent, certificate activated, thing made and attached, policies attached — or nothing).

use std::str::FromStr;

use portcullis_pki::Certificate;
use serde::Serialize;
use sqlx::Row;

use super::certificates::cert_from_row;
use super::changes::audit;
use super::things::attach_in;
use super::{Store, conflict_or, now, summary_cert, with_pool};
use crate::RegistryError;
use crate::audit::AuditAction;
use crate::fleet::{FleetPlan, FleetTemplate};
use crate::model::{CertId, CertRecord, CertStatus};
use crate::names::check_name;

/// How long a SCEP transaction's certificate is given back to a client that asks again.
const SCEP_TRANSACTION_SECS: i64 = 7 * 86400;

/// How long an ownership token may be spent (IoT Core: one hour).
pub const OWNERSHIP_TOKEN_SECONDS: i64 = 3600;

/// How renewal stands ([`Store::renewal_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RenewalCounts {
    /// ACTIVE certificates past their due point (two thirds of their lifetime unless their
    /// template says otherwise), not yet renewed.
    pub due: i64,
    /// ACTIVE certificates that expired but may still renew (their template's grace period).
    pub in_grace: i64,
    /// ACTIVE certificates that expired (past any grace period).
    pub overdue: i64,
    /// Certificates issued as renewals.
    pub renewed: i64,
}

/// How one certificate renews ([`Store::renewal_terms`]).
#[derive(Debug, Clone)]
pub struct RenewalTerms {
    /// The template that provisioned it (or the certificate it renews), if any.
    pub template: Option<String>,
    /// When it is due for renewal.
    pub due_at: i64,
    /// Until when it may renew after expiry (its notAfter without a grace period).
    pub grace_until: i64,
    /// Its template's settings now (the defaults without one).
    pub settings: crate::fleet::RenewalSettings,
}

/// A stored fleet provisioning template.
#[derive(Debug, Clone, Serialize)]
pub struct FleetTemplateRecord {
    /// Its name (the `templateName` of `RegisterThing`'s topic).
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Whether devices may use it now.
    pub enabled: bool,
    /// The document.
    pub template: FleetTemplate,
    /// When it was created.
    pub created_at: i64,
    /// When it last changed.
    pub updated_at: i64,
    /// Incremented on every change.
    pub version: i64,
}

/// A change to a template (`None`: unchanged).
#[derive(Debug, Clone, Default)]
pub struct FleetTemplateUpdate {
    /// New description.
    pub description: Option<String>,
    /// Enable or disable.
    pub enabled: Option<bool>,
    /// New document.
    pub template: Option<FleetTemplate>,
}

fn summary_template(t: &FleetTemplateRecord) -> String {
    serde_json::json!({
        "name": t.name, "description": t.description, "enabled": t.enabled,
        "template": t.template, "version": t.version,
    })
    .to_string()
}

fn template_from_row<R: Row>(row: &R) -> Result<FleetTemplateRecord, RegistryError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let document: String = row.try_get("document")?;
    let json: serde_json::Value = serde_json::from_str(&document)
        .map_err(|e| RegistryError::Invalid(format!("stored template: {e}")))?;
    Ok(FleetTemplateRecord {
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        enabled: row.try_get::<i64, _>("enabled")? != 0,
        template: FleetTemplate::from_json(&json)?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
    })
}

fn document(t: &FleetTemplate) -> Result<String, RegistryError> {
    serde_json::to_string(t).map_err(|e| RegistryError::Invalid(format!("template: {e}")))
}

impl Store {
    /// Creates a fleet provisioning template.
    pub async fn create_fleet_template(
        &self,
        name: &str,
        description: &str,
        enabled: bool,
        template: &FleetTemplate,
        actor: &str,
    ) -> Result<FleetTemplateRecord, RegistryError> {
        check_name("provisioning template", name)?;
        template.check()?;
        let now = now();
        let record = FleetTemplateRecord {
            name: name.to_string(),
            description: description.to_string(),
            enabled,
            template: template.clone(),
            created_at: now,
            updated_at: now,
            version: 1,
        };
        let doc = document(template)?;
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let inserted = sqlx::query("INSERT INTO fleet_templates (name, description, enabled, document, created_at, updated_at, version) VALUES ($1, $2, $3, $4, $5, $5, 1)")
                .bind(name)
                .bind(description)
                .bind(i64::from(enabled))
                .bind(&doc)
                .bind(now)
                .execute(&mut *tx)
                .await;
            if let Err(e) = inserted {
                return Err(conflict_or(e, format!("provisioning template '{name}' exists already")));
            }
            audit(&mut *tx, actor, AuditAction::FleetTemplateCreate, name, None, Some(&summary_template(&record))).await?;
            tx.commit().await?;
            Ok(record)
        })
    }

    /// A fleet provisioning template.
    pub async fn fleet_template(&self, name: &str) -> Result<FleetTemplateRecord, RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT * FROM fleet_templates WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| RegistryError::NotFound(format!("provisioning template '{name}'")))?;
            template_from_row(&row)
        })
    }

    /// Every fleet provisioning template, by name.
    pub async fn list_fleet_templates(&self) -> Result<Vec<FleetTemplateRecord>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT * FROM fleet_templates ORDER BY name").fetch_all(pool).await?;
            rows.iter().map(template_from_row).collect()
        })
    }

    /// Changes a template (compare-and-set on its version, retried).
    pub async fn update_fleet_template(
        &self,
        name: &str,
        update: &FleetTemplateUpdate,
        actor: &str,
    ) -> Result<FleetTemplateRecord, RegistryError> {
        if let Some(t) = &update.template {
            t.check()?;
        }
        loop {
            let before = self.fleet_template(name).await?;
            let mut after = before.clone();
            if let Some(d) = &update.description {
                after.description = d.clone();
            }
            if let Some(e) = update.enabled {
                after.enabled = e;
            }
            if let Some(t) = &update.template {
                after.template = t.clone();
            }
            after.updated_at = now();
            after.version += 1;
            let doc = document(&after.template)?;
            let written = with_pool!(self, pool => {
                let mut tx = pool.begin().await?;
                let done = sqlx::query("UPDATE fleet_templates SET description = $1, enabled = $2, document = $3, updated_at = $4, version = version + 1 WHERE name = $5 AND version = $6")
                    .bind(&after.description)
                    .bind(i64::from(after.enabled))
                    .bind(&doc)
                    .bind(after.updated_at)
                    .bind(name)
                    .bind(before.version)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 1 {
                    audit(&mut *tx, actor, AuditAction::FleetTemplateUpdate, name, Some(&summary_template(&before)), Some(&summary_template(&after))).await?;
                    tx.commit().await?;
                    true
                } else {
                    false
                }
            });
            if written {
                return Ok(after);
            }
        }
    }

    /// Deletes a template.
    pub async fn delete_fleet_template(
        &self,
        name: &str,
        actor: &str,
    ) -> Result<(), RegistryError> {
        let before = self.fleet_template(name).await?;
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM fleet_templates WHERE name = $1").bind(name).execute(&mut *tx).await?;
            audit(&mut *tx, actor, AuditAction::FleetTemplateDelete, name, Some(&summary_template(&before)), None).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Makes a registered certificate a claim certificate for `templates` (it may then only
    /// ask for devices' certificates and register them under those templates), or an ordinary
    /// one again (`None`).
    pub async fn set_certificate_claim(
        &self,
        id: &CertId,
        templates: Option<&[String]>,
        actor: &str,
    ) -> Result<CertRecord, RegistryError> {
        if let Some(names) = templates {
            if names.is_empty() {
                return Err(RegistryError::Invalid(
                    "a claim certificate names at least one provisioning template".into(),
                ));
            }
            for n in names {
                check_name("provisioning template", n)?;
            }
        }
        let value = templates
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| RegistryError::Invalid(e.to_string()))?;
        loop {
            let before = self.certificate(id).await?;
            let mut after = before.clone();
            after.claim_templates = templates.map(<[String]>::to_vec);
            after.updated_at = now();
            after.version += 1;
            let said = |c: &CertRecord| {
                serde_json::json!({"id": c.id, "claim_templates": c.claim_templates}).to_string()
            };
            let written = with_pool!(self, pool => {
                let mut tx = pool.begin().await?;
                let done = sqlx::query("UPDATE certificates SET claim_templates = $1, updated_at = $2, version = version + 1 WHERE id = $3 AND version = $4")
                    .bind(&value)
                    .bind(after.updated_at)
                    .bind(id.as_str())
                    .bind(before.version)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 1 {
                    audit(&mut *tx, actor, AuditAction::CertificateClaim, id.as_str(), Some(&said(&before)), Some(&said(&after))).await?;
                    tx.commit().await?;
                    true
                } else {
                    false
                }
            });
            if written {
                return Ok(after);
            }
        }
    }

    /// The claim certificates and the templates each may use (for the gateway's snapshot).
    pub async fn claims(&self) -> Result<Vec<(CertId, Vec<String>)>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT id, claim_templates FROM certificates WHERE claim_templates IS NOT NULL")
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| {
                    let id = CertId::from_str(&r.try_get::<String, _>("id")?)?;
                    let t: String = r.try_get("claim_templates")?;
                    Ok((id, serde_json::from_str(&t).unwrap_or_default()))
                })
                .collect()
        })
    }

    /// Registers a certificate made for a device (PENDING_ACTIVATION) with a new ownership
    /// token (kept as its hash), in one transaction; `claim` is the certificate that asked.
    /// Answers the record and the token, which is shown once.
    pub async fn register_fleet_certificate(
        &self,
        cert: &Certificate,
        claim: &str,
        actor: &str,
    ) -> Result<(CertRecord, String), RegistryError> {
        let token = super::admin::random_hex(32)?;
        let token_hash = super::admin::token_hash(&token);
        let pem = cert.to_pem();
        let cas = self.issuing_cas().await?;
        let (record, der) = super::certificates::prepare_certificate(
            pem.as_bytes(),
            CertStatus::PendingActivation,
            &cas,
        )?;
        let summary = serde_json::to_string(&summary_cert(&record)).ok();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let inserted = sqlx::query(
                "INSERT INTO certificates (id, der, subject, issuer, serial, ca_id, status, not_after, created_at, updated_at, last_seen, version) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'PENDING_ACTIVATION', $7, $8, $8, NULL, 1)",
            )
            .bind(record.id.as_str())
            .bind(der)
            .bind(&record.subject)
            .bind(&record.issuer)
            .bind(&record.serial)
            .bind(record.ca_id.as_ref().map(CertId::as_str))
            .bind(record.not_after)
            .bind(record.created_at)
            .execute(&mut *tx)
            .await;
            if let Err(e) = inserted {
                return Err(conflict_or(e, format!("certificate {} is already registered", record.id)));
            }
            // One identity, one holder: a claim cannot mint a certificate with the subject of a
            // registered device (policies and upstreams that read the subject would take it for
            // that device). Renewals go through `register_renewal`.
            // Checked after the insert: on SQLite a transaction that reads before it writes
            // cannot wait for another writer.
            let taken = sqlx::query("SELECT id FROM certificates WHERE subject = $1 AND id <> $2 AND status <> 'REVOKED' LIMIT 1")
                .bind(&record.subject)
                .bind(record.id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            if taken.is_some() {
                return Err(RegistryError::Invalid(format!(
                    "the subject '{}' is held by a registered certificate; a device provisions under a subject of its own (renewal keeps it)",
                    record.subject
                )));
            }
            sqlx::query("INSERT INTO ownership_tokens (token_hash, certificate_id, claim_id, expires_at) VALUES ($1, $2, $3, $4)")
                .bind(&token_hash)
                .bind(record.id.as_str())
                .bind(claim)
                .bind(record.created_at + OWNERSHIP_TOKEN_SECONDS)
                .execute(&mut *tx)
                .await?;
            audit(&mut *tx, actor, AuditAction::CertificateFleetCreate, record.id.as_str(), None, summary.as_deref()).await?;
            tx.commit().await?;
            Ok((record, token))
        })
    }

    /// The certificate an unspent, unexpired ownership token is for.
    pub async fn ownership_token(&self, token: &str) -> Result<Option<CertId>, RegistryError> {
        let token_hash = super::admin::token_hash(token);
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT certificate_id FROM ownership_tokens WHERE token_hash = $1 AND expires_at > $2")
                .bind(&token_hash)
                .bind(now())
                .fetch_optional(pool)
                .await?;
            row.map(|r| CertId::from_str(&r.try_get::<String, _>("certificate_id")?))
                .transpose()
        })
    }

    /// `RegisterThing`: spends the token, gives the certificate its status, makes (or joins)
    /// the thing, attaches the certificate and the policies — in one transaction, so a refusal
    /// leaves nothing half-made.
    pub async fn register_fleet_thing(
        &self,
        token: &str,
        certificate: &CertId,
        plan: &FleetPlan,
        actor: &str,
    ) -> Result<CertRecord, RegistryError> {
        let token_hash = super::admin::token_hash(token);
        self.try_register_fleet_thing(&token_hash, certificate, plan, actor)
            .await
    }

    /// Records a refused fleet provisioning request (`certificate.provision-refused`, on the
    /// certificate that asked): what was asked, IoT Core's error code and why.
    pub async fn record_fleet_refusal(
        &self,
        caller: &str,
        call: &str,
        code: &str,
        reason: &str,
        actor: &str,
    ) -> Result<(), RegistryError> {
        let refused = serde_json::json!({"call": call, "code": code, "reason": reason}).to_string();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            audit(&mut *tx, actor, AuditAction::CertificateProvisionRefused, caller, None, Some(&refused)).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    async fn try_register_fleet_thing(
        &self,
        token_hash: &str,
        certificate: &CertId,
        plan: &FleetPlan,
        actor: &str,
    ) -> Result<CertRecord, RegistryError> {
        check_name("thing", &plan.thing_name)?;
        let attributes = serde_json::to_string(&plan.attributes)
            .map_err(|e| RegistryError::Invalid(format!("attributes: {e}")))?;
        let thing = plan.thing_name.as_str();
        let now = now();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let spent = sqlx::query("DELETE FROM ownership_tokens WHERE token_hash = $1 AND certificate_id = $2 AND expires_at > $3")
                .bind(token_hash)
                .bind(certificate.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            if spent.rows_affected() != 1 {
                return Err(RegistryError::Conflict("the certificate ownership token is unknown, spent or expired".into()));
            }
            let activated = sqlx::query("UPDATE certificates SET status = $1, updated_at = $2, version = version + 1 WHERE id = $3 AND status = 'PENDING_ACTIVATION'")
                .bind(plan.status.as_str())
                .bind(now)
                .bind(certificate.as_str())
                .execute(&mut *tx)
                .await?;
            if activated.rows_affected() != 1 {
                return Err(RegistryError::Conflict(format!("certificate {certificate} is no longer waiting to be registered")));
            }
            sqlx::query("UPDATE certificates SET template = $1, due_at = created_at + (not_after - created_at) * $2 / 100, grace_until = not_after + $3 WHERE id = $4")
                .bind(plan.template.as_deref())
                .bind(plan.renewal.due_percent())
                .bind(i64::from(plan.renewal.grace_days) * 86400)
                .bind(certificate.as_str())
                .execute(&mut *tx)
                .await?;
            for policy in &plan.policies {
                let exists = sqlx::query("SELECT name FROM policies WHERE name = $1")
                    .bind(policy)
                    .fetch_optional(&mut *tx)
                    .await?;
                if exists.is_none() {
                    return Err(RegistryError::Invalid(format!("the template attaches policy '{policy}', which does not exist")));
                }
            }
            let created = sqlx::query("INSERT INTO things (name, attributes, created_at, updated_at, version) VALUES ($1, $2, $3, $3, 1) ON CONFLICT (name) DO NOTHING")
                .bind(thing)
                .bind(&attributes)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            if created.rows_affected() == 1 {
                audit(&mut *tx, actor, AuditAction::ThingCreate, thing, None, Some(&attributes)).await?;
            } else if !plan.join_existing_thing {
                return Err(RegistryError::Conflict(format!(
                    "thing '{thing}' exists already, and the template does not let new certificates join existing things (join_existing_thing)"
                )));
            }
            attach_in(&mut *tx, actor, thing, certificate.as_str(), plan.exclusive, now).await?;
            for policy in &plan.policies {
                let added = sqlx::query("INSERT INTO policy_attachments (policy, target_type, target, attached_at) VALUES ($1, 'thing', $2, $3) ON CONFLICT DO NOTHING")
                    .bind(policy)
                    .bind(thing)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                if added.rows_affected() == 1 {
                    audit(&mut *tx, actor, AuditAction::PolicyAttach, policy, None, Some(&format!("thing:{thing}"))).await?;
                }
            }
            let row = sqlx::query("SELECT * FROM certificates WHERE id = $1")
                .bind(certificate.as_str())
                .fetch_one(&mut *tx)
                .await?;
            let mut record = cert_from_row(&row)?;
            record.things = vec![thing.to_string()];
            let summary = serde_json::to_string(&summary_cert(&record)).ok();
            audit(&mut *tx, actor, AuditAction::CertificateProvision, certificate.as_str(), None, summary.as_deref()).await?;
            tx.commit().await?;
            Ok(record)
        })
    }

    /// Registers `cert`, the renewal of certificate `old` (EST `simplereenroll`), ACTIVE and
    /// attached where `old` is: its things (same exclusivity) and its certificate policies, in
    /// one transaction. `old` stays ACTIVE until `cert` is first seen on a connection
    /// ([`Store::record_sightings`] retires it then).
    ///
    /// `by_device`: the device asks (its template's `refuse_early` applies); an operator's
    /// renewal may come early. A template's `require_new_key` applies to both.
    pub async fn register_renewal(
        &self,
        cert: &Certificate,
        old: &CertId,
        actor: &str,
        by_device: bool,
    ) -> Result<CertRecord, RegistryError> {
        let terms = self.renewal_terms(old).await?;
        let settings = terms.settings;
        if by_device && settings.refuse_early && now() < terms.due_at {
            return Err(RegistryError::Invalid(format!(
                "certificate {old} is not due for renewal until {} (its template '{}' refuses early renewals)",
                crate::rfc3339_of(terms.due_at),
                terms.template.as_deref().unwrap_or_default()
            )));
        }
        if settings.require_new_key {
            // New: not the key of the renewed certificate, nor of any it renewed (A→B→A).
            let new_key = cert.spki_der();
            let mut next = Some(old.clone());
            let mut steps = 0;
            while let Some(id) = next.take() {
                steps += 1;
                if steps > 1000 {
                    break;
                }
                let record = self.certificate(&id).await?;
                let key = Certificate::all_from_pem_or_der(record.pem.as_bytes())
                    .ok()
                    .and_then(|c| c.into_iter().next())
                    .map(|c| c.spki_der());
                if key.as_deref() == Some(new_key.as_slice()) {
                    return Err(RegistryError::Invalid(format!(
                        "the template '{}' requires a new key on renewal (one this device has not used before): make a new key and CSR",
                        terms.template.as_deref().unwrap_or_default()
                    )));
                }
                next = self.renewed_by(&id).await?;
            }
        }
        let pem = cert.to_pem();
        let cas = self.issuing_cas().await?;
        let (mut record, der) =
            super::certificates::prepare_certificate(pem.as_bytes(), CertStatus::Active, &cas)?;
        let mut after = serde_json::to_value(summary_cert(&record)).unwrap_or_default();
        after["renews"] = serde_json::json!(old);
        let after = after.to_string();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            // The renewed certificate's row first (a write: on PostgreSQL a row lock, on SQLite
            // the write lock): two renewals of one certificate at once are taken one after the
            // other, so the second sees — and supersedes — the first.
            sqlx::query("UPDATE certificates SET version = version WHERE id = $1")
                .bind(old.as_str())
                .execute(&mut *tx)
                .await?;
            let inserted = sqlx::query(
                "INSERT INTO certificates (id, der, subject, issuer, serial, ca_id, status, not_after, created_at, updated_at, last_seen, version, renews) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'ACTIVE', $7, $8, $8, NULL, 1, $9)",
            )
            .bind(record.id.as_str())
            .bind(der)
            .bind(&record.subject)
            .bind(&record.issuer)
            .bind(&record.serial)
            .bind(record.ca_id.as_ref().map(CertId::as_str))
            .bind(record.not_after)
            .bind(record.created_at)
            .bind(old.as_str())
            .execute(&mut *tx)
            .await;
            if let Err(e) = inserted {
                return Err(conflict_or(e, format!("certificate {} is already registered", record.id)));
            }
            // The renewed certificate's terms carry over (its template's, read now).
            sqlx::query("UPDATE certificates SET template = $1, due_at = created_at + (not_after - created_at) * $2 / 100, grace_until = not_after + $3, retire_renewed_at = $4 WHERE id = $5")
                .bind(terms.template.as_deref())
                .bind(settings.due_percent())
                .bind(i64::from(settings.grace_days) * 86400)
                .bind(settings.overlap_hours.map(|h| record.created_at + i64::from(h) * 3600))
                .bind(record.id.as_str())
                .execute(&mut *tx)
                .await?;
            audit(&mut *tx, actor, AuditAction::CertificateRegister, record.id.as_str(), None, Some(&after)).await?;
            // At most one unused renewal per certificate: an earlier one never seen on a
            // connection (an answer the device lost, or a stolen key's) is revoked now.
            let superseded: Vec<String> = sqlx::query("SELECT id FROM certificates WHERE renews = $1 AND id <> $2 AND status = 'ACTIVE' AND last_seen IS NULL")
                .bind(old.as_str())
                .bind(record.id.as_str())
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get("id"))
                .collect::<Result<_, _>>()?;
            for id in &superseded {
                sqlx::query("UPDATE certificates SET status = 'REVOKED', updated_at = $1, version = version + 1, revocation_reason = 'superseded' WHERE id = $2")
                    .bind(record.created_at)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                let why = serde_json::json!({"status": "REVOKED", "cause": "superseded by a newer renewal, never used", "superseded_by": record.id}).to_string();
                audit(&mut *tx, actor, AuditAction::CertificateStatus, id, Some(r#"{"status":"ACTIVE"}"#), Some(&why)).await?;
            }
            let things = sqlx::query("SELECT thing_name, exclusive FROM thing_certificates WHERE certificate_id = $1")
                .bind(old.as_str())
                .fetch_all(&mut *tx)
                .await?;
            for row in &things {
                let thing: String = row.try_get("thing_name")?;
                let exclusive: i64 = row.try_get("exclusive")?;
                attach_in(&mut *tx, actor, &thing, record.id.as_str(), exclusive != 0, record.created_at).await?;
                record.things.push(thing);
            }
            let policies = sqlx::query("SELECT policy FROM policy_attachments WHERE target_type = 'certificate' AND target = $1")
                .bind(old.as_str())
                .fetch_all(&mut *tx)
                .await?;
            for row in &policies {
                let policy: String = row.try_get("policy")?;
                sqlx::query("INSERT INTO policy_attachments (policy, target_type, target, attached_at) VALUES ($1, 'certificate', $2, $3)")
                    .bind(&policy)
                    .bind(record.id.as_str())
                    .bind(record.created_at)
                    .execute(&mut *tx)
                    .await?;
                audit(&mut *tx, actor, AuditAction::PolicyAttach, &policy, None, Some(&format!("certificate:{}", record.id))).await?;
            }
            tx.commit().await?;
            Ok(record)
        })
    }

    /// Makes `count` one-time enrollment codes for template `template`, good for `ttl_secs`;
    /// answers the codes (shown once; only their hashes are kept) and when they expire.
    pub async fn create_enrollment_codes(
        &self,
        template: &str,
        count: u32,
        ttl_secs: i64,
        actor: &str,
    ) -> Result<(Vec<String>, i64), RegistryError> {
        if !(1..=1000).contains(&count) {
            return Err(RegistryError::Invalid(
                "count must be between 1 and 1000".into(),
            ));
        }
        self.fleet_template(template).await?;
        let now = now();
        let expires_at = now + ttl_secs;
        let codes: Vec<String> = (0..count)
            .map(|_| super::admin::random_hex(16))
            .collect::<Result<_, _>>()?;
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for code in &codes {
                sqlx::query("INSERT INTO enrollment_codes (code_hash, template, expires_at, created_at) VALUES ($1, $2, $3, $4)")
                    .bind(super::admin::token_hash(code))
                    .bind(template)
                    .bind(expires_at)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            let after = serde_json::json!({"template": template, "count": count, "expires_at": expires_at}).to_string();
            audit(&mut *tx, actor, AuditAction::EnrollmentCodeCreate, template, None, Some(&after)).await?;
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })?;
        Ok((codes, expires_at))
    }

    /// Spends a one-time enrollment code: the template it is for; `None` when it is unknown,
    /// spent or expired.
    pub async fn spend_enrollment_code(
        &self,
        code: &str,
    ) -> Result<Option<(String, i64)>, RegistryError> {
        let hash = super::admin::token_hash(code);
        with_pool!(self, pool => {
            let row = sqlx::query("DELETE FROM enrollment_codes WHERE code_hash = $1 AND expires_at > $2 RETURNING template, expires_at")
                .bind(&hash)
                .bind(now())
                .fetch_optional(pool)
                .await?;
            row.map(|r| Ok((r.try_get("template")?, r.try_get("expires_at")?))).transpose()
        })
    }

    /// Gives a spent code back (the enrollment it was spent on was refused).
    pub async fn restore_enrollment_code(
        &self,
        code: &str,
        template: &str,
        expires_at: i64,
    ) -> Result<(), RegistryError> {
        with_pool!(self, pool => {
            sqlx::query("INSERT INTO enrollment_codes (code_hash, template, expires_at, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
                .bind(super::admin::token_hash(code))
                .bind(template)
                .bind(expires_at)
                .bind(now())
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    /// Records the certificate issued for SCEP transaction `transaction_id` of the client whose
    /// signing key hashes to `signer_key_sha256` (the first record stands).
    pub async fn record_scep_transaction(
        &self,
        transaction_id: &str,
        signer_key_sha256: &str,
        certificate: &CertId,
    ) -> Result<(), RegistryError> {
        with_pool!(self, pool => {
            sqlx::query("INSERT INTO scep_transactions (transaction_id, signer_key_sha256, certificate_id, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING")
                .bind(transaction_id)
                .bind(signer_key_sha256)
                .bind(certificate.as_str())
                .bind(now())
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    /// The certificate issued for a SCEP transaction of the client with this signing key, if
    /// any (and not yet forgotten).
    pub async fn scep_transaction(
        &self,
        transaction_id: &str,
        signer_key_sha256: &str,
    ) -> Result<Option<CertId>, RegistryError> {
        with_pool!(self, pool => {
            let row: Option<(String,)> = sqlx::query_as("SELECT certificate_id FROM scep_transactions WHERE transaction_id = $1 AND signer_key_sha256 = $2 AND created_at > $3")
                .bind(transaction_id)
                .bind(signer_key_sha256)
                .bind(now() - SCEP_TRANSACTION_SECS)
                .fetch_optional(pool)
                .await?;
            row.map(|(id,)| CertId::from_str(&id)).transpose()
        })
    }

    /// Forgets SCEP transactions older than 7 days; how many.
    pub async fn prune_scep_transactions(&self) -> Result<u64, RegistryError> {
        with_pool!(self, pool => {
            Ok(sqlx::query("DELETE FROM scep_transactions WHERE created_at <= $1")
                .bind(now() - SCEP_TRANSACTION_SECS)
                .execute(pool)
                .await?
                .rows_affected())
        })
    }

    /// How renewal stands at `now` (seconds since the epoch): ACTIVE certificates past two
    /// thirds of their lifetime with no ACTIVE renewal (due), ACTIVE certificates already
    /// expired (overdue), and renewals issued.
    pub async fn renewal_counts(&self, now: i64) -> Result<RenewalCounts, RegistryError> {
        with_pool!(self, pool => {
            let due: i64 = sqlx::query("SELECT COUNT(*) AS n FROM certificates c WHERE c.status = 'ACTIVE' AND c.not_after > $1 AND COALESCE(c.due_at, (c.created_at + 2 * c.not_after) / 3) <= $1 AND c.claim_templates IS NULL \
                                        AND NOT EXISTS (SELECT 1 FROM certificates r WHERE r.renews = c.id AND r.status = 'ACTIVE')")
                .bind(now)
                .fetch_one(pool)
                .await?
                .try_get("n")?;
            let in_grace: i64 = sqlx::query("SELECT COUNT(*) AS n FROM certificates WHERE status = 'ACTIVE' AND not_after <= $1 AND COALESCE(grace_until, not_after) > $1")
                .bind(now)
                .fetch_one(pool)
                .await?
                .try_get("n")?;
            let overdue: i64 = sqlx::query("SELECT COUNT(*) AS n FROM certificates WHERE status = 'ACTIVE' AND COALESCE(grace_until, not_after) <= $1")
                .bind(now)
                .fetch_one(pool)
                .await?
                .try_get("n")?;
            let renewed: i64 = sqlx::query("SELECT COUNT(*) AS n FROM certificates WHERE renews IS NOT NULL")
                .fetch_one(pool)
                .await?
                .try_get("n")?;
            Ok(RenewalCounts { due, in_grace, overdue, renewed })
        })
    }

    /// How certificate `id` renews: its template (or its lineage's), when it is due, until
    /// when it may renew after expiry, and its template's settings now.
    pub async fn renewal_terms(&self, id: &CertId) -> Result<RenewalTerms, RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT c.template, c.due_at, c.grace_until, c.not_after, c.created_at, t.document FROM certificates c \
                                   LEFT JOIN fleet_templates t ON t.name = c.template WHERE c.id = $1")
                .bind(id.as_str())
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| RegistryError::NotFound(format!("certificate {id}")))?;
            let not_after: i64 = row.try_get("not_after")?;
            let created_at: i64 = row.try_get("created_at")?;
            let document: Option<String> = row.try_get("document")?;
            let settings = document
                .and_then(|d| serde_json::from_str::<FleetTemplate>(&d).ok())
                .map(|t| t.renewal)
                .unwrap_or_default();
            Ok(RenewalTerms {
                template: row.try_get("template")?,
                due_at: row.try_get::<Option<i64>, _>("due_at")?.unwrap_or((created_at + 2 * not_after) / 3),
                grace_until: row.try_get::<Option<i64>, _>("grace_until")?.unwrap_or(not_after),
                settings,
            })
        })
    }

    /// Puts certificate `id` (registered otherwise: imported, issued by an operator) under
    /// template `template`'s renewal terms, as if the template had provisioned it: its due
    /// point and grace period, and its renewals'.
    pub async fn set_certificate_template(
        &self,
        id: &CertId,
        template: &str,
        actor: &str,
    ) -> Result<CertRecord, RegistryError> {
        let settings = self.fleet_template(template).await?.template.renewal;
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let done = sqlx::query("UPDATE certificates SET template = $1, due_at = created_at + (not_after - created_at) * $2 / 100, grace_until = not_after + $3, updated_at = $4, version = version + 1 WHERE id = $5")
                .bind(template)
                .bind(settings.due_percent())
                .bind(i64::from(settings.grace_days) * 86400)
                .bind(now())
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(RegistryError::NotFound(format!("certificate {id}")));
            }
            let after = serde_json::json!({"template": template, "renewal": settings}).to_string();
            audit(&mut *tx, actor, AuditAction::CertificateRenewalTerms, id.as_str(), None, Some(&after)).await?;
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })?;
        self.certificate(id).await
    }

    /// The certificate `id` renews, if it is a renewal.
    async fn renewed_by(&self, id: &CertId) -> Result<Option<CertId>, RegistryError> {
        with_pool!(self, pool => {
            let row: Option<(Option<String>,)> = sqlx::query_as("SELECT renews FROM certificates WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(pool)
                .await?;
            row.and_then(|(r,)| r).map(|r| CertId::from_str(&r)).transpose()
        })
    }

    /// Ends overlaps by time: a certificate whose ACTIVE renewal was issued with an overlap
    /// that has run out by `now` becomes INACTIVE even though the renewal was never seen
    /// (audited, cause `overlap ended`). Answers (retired, its renewal).
    pub async fn end_overlaps(
        &self,
        now: i64,
        actor: &str,
    ) -> Result<Vec<(CertId, CertId)>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT r.id AS renewal, r.renews AS old FROM certificates r JOIN certificates c ON c.id = r.renews \
                                    WHERE r.retire_renewed_at <= $1 AND r.status = 'ACTIVE' AND c.status = 'ACTIVE' LIMIT 1000")
                .bind(now)
                .fetch_all(pool)
                .await?;
            let mut retired = Vec::new();
            for row in rows {
                let renewal: String = row.try_get("renewal")?;
                let old: String = row.try_get("old")?;
                let mut tx = pool.begin().await?;
                let done = sqlx::query("UPDATE certificates SET status = 'INACTIVE', updated_at = $1, version = version + 1 WHERE id = $2 AND status = 'ACTIVE'")
                    .bind(now)
                    .bind(&old)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 1 {
                    let after = serde_json::json!({"status": "INACTIVE", "cause": "overlap ended", "renewed_by": renewal}).to_string();
                    audit(&mut *tx, actor, AuditAction::CertificateStatus, &old, Some(r#"{"status":"ACTIVE"}"#), Some(&after)).await?;
                    retired.push((CertId::from_str(&old)?, CertId::from_str(&renewal)?));
                }
                tx.commit().await?;
            }
            Ok(retired)
        })
    }

    /// Deletes the certificates made for devices whose ownership token expired unspent by
    /// `now` (seconds since the epoch: the device never registered them): how many.
    pub async fn sweep_unclaimed_certificates(
        &self,
        now: i64,
        actor: &str,
    ) -> Result<u64, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT certificate_id FROM ownership_tokens WHERE expires_at <= $1")
                .bind(now)
                .fetch_all(pool)
                .await?;
            let mut swept = 0;
            for row in rows {
                let id: String = row.try_get("certificate_id")?;
                let mut tx = pool.begin().await?;
                sqlx::query("DELETE FROM ownership_tokens WHERE certificate_id = $1").bind(&id).execute(&mut *tx).await?;
                let gone = sqlx::query("DELETE FROM certificates WHERE id = $1 AND status = 'PENDING_ACTIVATION'")
                    .bind(&id)
                    .execute(&mut *tx)
                    .await?;
                if gone.rows_affected() == 1 {
                    let why = serde_json::json!({"id": id, "reason": "its ownership token expired unspent"}).to_string();
                    audit(&mut *tx, actor, AuditAction::CertificateDelete, &id, Some(&why), None).await?;
                    swept += 1;
                }
                tx.commit().await?;
            }
            Ok(swept)
        })
    }
}
