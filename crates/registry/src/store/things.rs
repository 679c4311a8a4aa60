//! Things, attachments, just-in-time provisioning, and sightings (certificates gateways saw).

use std::collections::BTreeMap;
use std::str::FromStr;

use portcullis_pki::Certificate;
use sqlx::Row;

use super::{Store, audit, conflict_or, now, summary_cert, with_pool};
use crate::RegistryError;
use crate::audit::AuditAction;
use crate::model::{Attachment, CertId, CertRecord, CertStatus, Thing, check_name};
use crate::provisioning::Provisioned;

/// A client certificate a gateway saw on a domain.
#[derive(Debug, Clone)]
pub struct Sighting {
    /// The leaf certificate.
    pub certificate: Certificate,
    /// The domain it connected to.
    pub domain: String,
    /// When, seconds since the epoch.
    pub at: i64,
}

impl Store {
    /// Creates a thing.
    pub async fn create_thing(
        &self,
        name: &str,
        attributes: &BTreeMap<String, String>,
        actor: &str,
    ) -> Result<Thing, RegistryError> {
        check_name("thing", name)?;
        check_attributes(attributes)?;
        let now = now();
        let json = attributes_json(attributes)?;
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let inserted = sqlx::query(
                "INSERT INTO things (name, attributes, created_at, updated_at, version) VALUES ($1, $2, $3, $3, 1)",
            )
            .bind(name)
            .bind(&json)
            .bind(now)
            .execute(&mut *tx)
            .await;
            if let Err(e) = inserted {
                return Err(conflict_or(e, format!("thing '{name}' exists already")));
            }
            audit(&mut *tx, actor, AuditAction::ThingCreate, name, None, Some(&json)).await?;
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })?;
        self.thing(name).await
    }

    /// A thing and its certificates.
    pub async fn thing(&self, name: &str) -> Result<Thing, RegistryError> {
        with_pool!(self, pool => {
            let Some(row) = sqlx::query("SELECT * FROM things WHERE name = $1").bind(name).fetch_optional(pool).await? else {
                return Err(RegistryError::NotFound(format!("thing '{name}'")));
            };
            let attachments = sqlx::query("SELECT certificate_id, exclusive FROM thing_certificates WHERE thing_name = $1 ORDER BY certificate_id")
                .bind(name)
                .fetch_all(pool)
                .await?;
            let attributes: String = row.try_get("attributes")?;
            Ok(Thing {
                name: row.try_get("name")?,
                attributes: serde_json::from_str(&attributes).map_err(|e| RegistryError::Invalid(format!("stored attributes: {e}")))?,
                certificates: attachments
                    .iter()
                    .map(|a| {
                        Ok(Attachment {
                            certificate_id: CertId::from_str(&a.try_get::<String, _>("certificate_id")?)?,
                            exclusive: a.try_get::<i64, _>("exclusive")? != 0,
                        })
                    })
                    .collect::<Result<_, RegistryError>>()?,
                created_at: row.try_get("created_at")?,
                updated_at: row.try_get("updated_at")?,
                version: row.try_get("version")?,
            })
        })
    }

    /// One page of thing names, in order, after `after`.
    pub async fn list_things(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Thing>, RegistryError> {
        let names: Vec<String> = with_pool!(self, pool => {
            sqlx::query("SELECT name FROM things WHERE ($1 IS NULL OR name > $1) ORDER BY name LIMIT $2")
                .bind(after)
                .bind(i64::from(limit.clamp(1, 1000)))
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>("name"))
                .collect::<Result<_, _>>()?
        });
        let mut things = Vec::with_capacity(names.len());
        for name in names {
            match self.thing(&name).await {
                Ok(t) => things.push(t),
                // Deleted between the two reads.
                Err(RegistryError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(things)
    }

    /// Sets or removes (`None`) attributes of a thing.
    pub async fn update_thing(
        &self,
        name: &str,
        changes: &BTreeMap<String, Option<String>>,
        actor: &str,
    ) -> Result<Thing, RegistryError> {
        loop {
            let before = self.thing(name).await?;
            let mut attributes = before.attributes.clone();
            for (k, v) in changes {
                match v {
                    Some(v) => attributes.insert(k.clone(), v.clone()),
                    None => attributes.remove(k),
                };
            }
            check_attributes(&attributes)?;
            let (b, a) = (
                attributes_json(&before.attributes)?,
                attributes_json(&attributes)?,
            );
            let written = with_pool!(self, pool => {
                let mut tx = pool.begin().await?;
                let done = sqlx::query("UPDATE things SET attributes = $1, updated_at = $2, version = version + 1 WHERE name = $3 AND version = $4")
                    .bind(&a)
                    .bind(now())
                    .bind(name)
                    .bind(before.version)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 1 {
                    audit(&mut *tx, actor, AuditAction::ThingUpdate, name, Some(&b), Some(&a)).await?;
                    tx.commit().await?;
                    true
                } else {
                    false
                }
            });
            if written {
                return self.thing(name).await;
            }
        }
    }

    /// Deletes a thing that has no certificates attached.
    pub async fn delete_thing(&self, name: &str, actor: &str) -> Result<(), RegistryError> {
        let before = self.thing(name).await?;
        if !before.certificates.is_empty() {
            return Err(RegistryError::Invalid(format!(
                "thing '{name}' has {} certificate(s) attached; detach them first",
                before.certificates.len()
            )));
        }
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let attached = sqlx::query("SELECT COUNT(*) AS n FROM thing_certificates WHERE thing_name = $1")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?
                .try_get::<i64, _>("n")?;
            if attached > 0 {
                return Err(RegistryError::Conflict(format!("thing '{name}' had a certificate attached meanwhile; detach it first")));
            }
            let done = sqlx::query("DELETE FROM things WHERE name = $1").bind(name).execute(&mut *tx).await?;
            if done.rows_affected() != 1 {
                return Err(RegistryError::NotFound(format!("thing '{name}'")));
            }
            // A thing made later under the same name must not inherit its policies.
            sqlx::query("DELETE FROM policy_attachments WHERE target_type = 'thing' AND target = $1").bind(name).execute(&mut *tx).await?;
            let b = attributes_json(&before.attributes)?;
            audit(&mut *tx, actor, AuditAction::ThingDelete, name, Some(&b), None).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Attaches a certificate to a thing. An exclusive attachment means the certificate is
    /// attached to this thing only; a certificate attached exclusively elsewhere is refused.
    pub async fn attach(
        &self,
        thing: &str,
        certificate: &CertId,
        exclusive: bool,
        actor: &str,
    ) -> Result<(), RegistryError> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            // Writing the certificate's row first serializes attachments of one certificate.
            let locked = sqlx::query("UPDATE certificates SET version = version + 1 WHERE id = $1")
                .bind(certificate.as_str())
                .execute(&mut *tx)
                .await?;
            if locked.rows_affected() != 1 {
                return Err(RegistryError::NotFound(format!("certificate {certificate}")));
            }
            if sqlx::query("SELECT name FROM things WHERE name = $1").bind(thing).fetch_optional(&mut *tx).await?.is_none() {
                return Err(RegistryError::NotFound(format!("thing '{thing}'")));
            }
            let others = sqlx::query("SELECT thing_name, exclusive FROM thing_certificates WHERE certificate_id = $1 AND thing_name <> $2")
                .bind(certificate.as_str())
                .bind(thing)
                .fetch_all(&mut *tx)
                .await?;
            for other in &others {
                let name: String = other.try_get("thing_name")?;
                if exclusive || other.try_get::<i64, _>("exclusive")? != 0 {
                    return Err(RegistryError::Conflict(format!(
                        "certificate {certificate} is attached to thing '{name}'{}; detach it first",
                        if exclusive { "" } else { " exclusively" }
                    )));
                }
            }
            sqlx::query(
                "INSERT INTO thing_certificates (thing_name, certificate_id, exclusive, attached_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (thing_name, certificate_id) DO UPDATE SET exclusive = $3",
            )
            .bind(thing)
            .bind(certificate.as_str())
            .bind(i64::from(exclusive))
            .bind(now())
            .execute(&mut *tx)
            .await?;
            let after = serde_json::json!({"certificate_id": certificate, "exclusive": exclusive}).to_string();
            audit(&mut *tx, actor, AuditAction::ThingAttach, thing, None, Some(&after)).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Detaches a certificate from a thing.
    pub async fn detach(
        &self,
        thing: &str,
        certificate: &CertId,
        actor: &str,
    ) -> Result<(), RegistryError> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let done = sqlx::query("DELETE FROM thing_certificates WHERE thing_name = $1 AND certificate_id = $2")
                .bind(thing)
                .bind(certificate.as_str())
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(RegistryError::NotFound(format!("certificate {certificate} attached to thing '{thing}'")));
            }
            let before = serde_json::json!({"certificate_id": certificate}).to_string();
            audit(&mut *tx, actor, AuditAction::ThingDetach, thing, Some(&before), None).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Just-in-time provisioning: in one transaction, registers `cert` ACTIVE under `ca`,
    /// creates the thing the template named and attaches the certificate. A thing of that name
    /// that exists already is joined only when the template allows it; otherwise nothing is
    /// written but an audit entry (`certificate.provision-refused`) saying why. A certificate
    /// registered already is a conflict (the caller decides whether that is fine).
    pub async fn provision(
        &self,
        cert: &Certificate,
        ca: &CertId,
        provisioned: &Provisioned,
        actor: &str,
    ) -> Result<CertRecord, RegistryError> {
        check_name("thing", &provisioned.thing_name)?;
        let info = cert.info();
        let id = CertId::of_der(cert.der());
        let now = now();
        let record = CertRecord {
            id: id.clone(),
            subject: info.subject.clone(),
            issuer: info.issuer.clone(),
            serial: info.serial.clone(),
            ca_id: Some(ca.clone()),
            status: CertStatus::Active,
            not_after: info.not_after_unix(),
            created_at: now,
            updated_at: now,
            last_seen: Some(now),
            things: vec![provisioned.thing_name.clone()],
            claim_templates: None,
            version: 1,
            pem: cert.to_pem(),
        };
        let summary = serde_json::to_string(&summary_cert(&record)).ok();
        let attributes = attributes_json(&provisioned.attributes)?;
        let thing = provisioned.thing_name.as_str();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let inserted = sqlx::query(
                "INSERT INTO certificates (id, der, subject, issuer, serial, ca_id, status, not_after, created_at, updated_at, last_seen, version) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'ACTIVE', $7, $8, $8, $8, 1)",
            )
            .bind(id.as_str())
            .bind(cert.der().to_vec())
            .bind(&info.subject)
            .bind(&info.issuer)
            .bind(&info.serial)
            .bind(ca.as_str())
            .bind(info.not_after_unix())
            .bind(now)
            .execute(&mut *tx)
            .await;
            if let Err(e) = inserted {
                return Err(conflict_or(e, format!("certificate {id} is already registered")));
            }
            let created = sqlx::query(
                "INSERT INTO things (name, attributes, created_at, updated_at, version) VALUES ($1, $2, $3, $3, 1) ON CONFLICT (name) DO NOTHING",
            )
            .bind(thing)
            .bind(&attributes)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if created.rows_affected() == 1 {
                audit(&mut *tx, actor, AuditAction::ThingCreate, thing, None, Some(&attributes)).await?;
            } else if !provisioned.join_existing_thing {
                tx.rollback().await?;
                let why = format!(
                    "thing '{thing}' exists already, and the CA's provisioning template does not let new certificates join existing things (join_existing_thing)"
                );
                // The refusal is recorded, in a transaction of its own.
                let mut tx = pool.begin().await?;
                let refused = serde_json::json!({"thing": thing, "reason": why}).to_string();
                audit(&mut *tx, actor, AuditAction::CertificateProvisionRefused, id.as_str(), None, Some(&refused)).await?;
                tx.commit().await?;
                return Err(RegistryError::Invalid(why));
            }
            attach_in(&mut *tx, actor, thing, id.as_str(), provisioned.exclusive, now).await?;
            audit(&mut *tx, actor, AuditAction::CertificateProvision, id.as_str(), None, summary.as_deref()).await?;
            tx.commit().await?;
            Ok(record)
        })
    }

    /// Records sightings (upserts; the newest time wins) and the registered certificates'
    /// `last_seen`.
    pub async fn record_sightings(
        &self,
        sightings: &[Sighting],
    ) -> Result<Vec<(CertId, CertId)>, RegistryError> {
        if sightings.is_empty() {
            return Ok(Vec::new());
        }
        let mut retired = Vec::new();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for s in sightings {
                let id = CertId::of_der(s.certificate.der());
                sqlx::query(
                    "INSERT INTO sightings (certificate_id, der, subject, domain, last_seen) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (certificate_id) DO UPDATE SET last_seen = $5, domain = $4 WHERE sightings.last_seen < $5",
                )
                .bind(id.as_str())
                .bind(s.certificate.der().to_vec())
                .bind(&s.certificate.info().subject)
                .bind(&s.domain)
                .bind(s.at)
                .execute(&mut *tx)
                .await?;
                sqlx::query("UPDATE certificates SET last_seen = $1 WHERE id = $2 AND (last_seen IS NULL OR last_seen < $1)")
                    .bind(s.at)
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await?;
                // A renewal first seen: what it renews (and what that renewed, never seen
                // either) becomes INACTIVE, audited (webhook certificate.status_changed).
                let renews: Option<String> = sqlx::query("SELECT renews FROM certificates WHERE id = $1 AND status = 'ACTIVE'")
                    .bind(id.as_str())
                    .fetch_optional(&mut *tx)
                    .await?
                    .and_then(|r| r.try_get::<Option<String>, _>("renews").ok().flatten());
                // The lineage stays (`renews` is kept: revoking a certificate revokes what was
                // renewed from it); the walk stops at the first one no longer ACTIVE, behind
                // which everything was retired already.
                let mut next = renews;
                let mut steps = 0;
                while let Some(old) = next.take() {
                    steps += 1;
                    if steps > 1000 {
                        break;
                    }
                    let done = sqlx::query("UPDATE certificates SET status = 'INACTIVE', updated_at = $1, version = version + 1 WHERE id = $2 AND status = 'ACTIVE'")
                        .bind(s.at)
                        .bind(&old)
                        .execute(&mut *tx)
                        .await?;
                    if done.rows_affected() != 1 {
                        break;
                    }
                    let after = serde_json::json!({"status": "INACTIVE", "cause": "renewed", "renewed_by": id}).to_string();
                    audit(&mut *tx, "gateway:renewal", AuditAction::CertificateStatus, &old, Some(r#"{"status":"ACTIVE"}"#), Some(&after)).await?;
                    if let Ok(old_id) = old.parse::<CertId>() {
                        retired.push((old_id, id.clone()));
                    }
                    next = sqlx::query("SELECT renews FROM certificates WHERE id = $1")
                        .bind(&old)
                        .fetch_optional(&mut *tx)
                        .await?
                        .and_then(|r| r.try_get::<Option<String>, _>("renews").ok().flatten());
                }
            }
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })?;
        Ok(retired)
    }

    /// Certificates seen since `since` (seconds since the epoch), newest first, with the domain
    /// each was last seen on.
    pub async fn seen_since(
        &self,
        since: i64,
    ) -> Result<Vec<(Certificate, String, i64)>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT der, domain, last_seen FROM sightings WHERE last_seen >= $1 ORDER BY last_seen DESC LIMIT 100000")
                .bind(since)
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| {
                    let der: Vec<u8> = r.try_get("der")?;
                    Ok((Certificate::from_der(der)?, r.try_get("domain")?, r.try_get("last_seen")?))
                })
                .collect()
        })
    }
}

fn check_attributes(attributes: &BTreeMap<String, String>) -> Result<(), RegistryError> {
    if attributes.len() > 50 {
        return Err(RegistryError::Invalid(
            "a thing has at most 50 attributes".into(),
        ));
    }
    for (k, v) in attributes {
        check_name("attribute", k)?;
        if v.len() > 800 {
            return Err(RegistryError::Invalid(format!(
                "attribute '{k}' is longer than 800 bytes"
            )));
        }
    }
    Ok(())
}

fn attributes_json(attributes: &BTreeMap<String, String>) -> Result<String, RegistryError> {
    serde_json::to_string(attributes)
        .map_err(|e| RegistryError::Invalid(format!("attributes: {e}")))
}

/// Attaches certificate `certificate` to `thing` in the caller's transaction, with its audit
/// entry (`thing.attach`): what provisioning, fleet registration and renewal share.
pub(crate) async fn attach_in<C, DB>(
    conn: &mut C,
    actor: &str,
    thing: &str,
    certificate: &str,
    exclusive: bool,
    now: i64,
) -> Result<(), sqlx::Error>
where
    DB: sqlx::Database,
    C: Send,
    for<'c> &'c mut C: sqlx::Executor<'c, Database = DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<&'q str>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    sqlx::query("INSERT INTO thing_certificates (thing_name, certificate_id, exclusive, attached_at) VALUES ($1, $2, $3, $4)")
        .bind(thing)
        .bind(certificate)
        .bind(i64::from(exclusive))
        .bind(now)
        .execute(&mut *conn)
        .await?;
    let attached =
        serde_json::json!({"certificate_id": certificate, "exclusive": exclusive}).to_string();
    audit(
        conn,
        actor,
        AuditAction::ThingAttach,
        thing,
        None,
        Some(&attached),
    )
    .await
}
