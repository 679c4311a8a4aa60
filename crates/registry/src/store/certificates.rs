//! Registered certificates: registration (one or many, linked to their CA), statuses, deletion,
//! and the status reads the gateway's snapshot is built from.

use std::str::FromStr;

use portcullis_pki::Certificate;
use sqlx::Row;

use super::changes::{audit, audit_many};
use super::{Store, now, with_pool};
use crate::RegistryError;
use crate::audit::AuditAction;
use crate::model::{CertId, CertRecord, CertStatus};

/// Filters for [`Store::list_certificates`].
#[derive(Debug, Clone, Default)]
pub struct CertFilter {
    /// Only this status.
    pub status: Option<CertStatus>,
    /// Only certificates issued by this registered CA.
    pub ca: Option<CertId>,
    /// Only certificates whose notAfter is before this time (seconds since the epoch).
    pub expiring_before: Option<i64>,
    /// Page size (1–1000, default 100).
    pub limit: Option<u32>,
    /// Only certificates attached to this thing.
    pub thing: Option<String>,
    /// Start after this id (the last id of the previous page).
    pub after: Option<CertId>,
}

pub(crate) fn cert_from_row<R: Row>(row: &R) -> Result<CertRecord, RegistryError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let der: Vec<u8> = row.try_get("der")?;
    Ok(CertRecord {
        id: CertId::from_str(&row.try_get::<String, _>("id")?)?,
        subject: row.try_get("subject")?,
        issuer: row.try_get("issuer")?,
        serial: row.try_get("serial")?,
        ca_id: row
            .try_get::<Option<String>, _>("ca_id")?
            .map(|s| CertId::from_str(&s))
            .transpose()?,
        status: CertStatus::from_str(&row.try_get::<String, _>("status")?)?,
        not_after: row.try_get("not_after")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        last_seen: row.try_get("last_seen")?,
        things: Vec::new(),
        claim_templates: row
            .try_get::<Option<String>, _>("claim_templates")?
            .and_then(|t| serde_json::from_str(&t).ok()),
        version: row.try_get("version")?,
        pem: Certificate::from_der(der)?.to_pem(),
    })
}

pub(crate) fn summary_cert(c: &CertRecord) -> serde_json::Value {
    serde_json::json!({
        "id": c.id, "subject": c.subject, "status": c.status, "ca_id": c.ca_id, "version": c.version,
    })
}

/// Parses a certificate to register and links its issuing CA.
pub(crate) fn prepare_certificate(
    pem: &[u8],
    status: CertStatus,
    cas: &[(CertId, String, Certificate)],
) -> Result<(CertRecord, Vec<u8>), RegistryError> {
    let (cert, _) = Certificate::first_and_rest(pem)?;
    if status == CertStatus::Revoked {
        return Err(RegistryError::Invalid(
            "a certificate cannot be registered as REVOKED".into(),
        ));
    }
    let info = cert.info();
    if let Some(why) = cert.subject_ambiguity() {
        return Err(RegistryError::Invalid(format!(
            "certificate subject '{}' has {why}: policies and identity headers would read it as different identities, so the registry refuses it",
            info.subject
        )));
    }
    let ca_id = cas
        .iter()
        .find(|(_, subject, ca)| *subject == info.issuer && cert.is_signed_by(ca))
        .map(|(id, _, _)| id.clone());
    let now = now();
    let record = CertRecord {
        id: CertId::of_der(cert.der()),
        subject: info.subject.clone(),
        issuer: info.issuer.clone(),
        serial: info.serial.clone(),
        ca_id,
        status,
        not_after: info.not_after_unix(),
        created_at: now,
        updated_at: now,
        last_seen: None,
        things: Vec::new(),
        claim_templates: None,
        version: 1,
        pem: cert.to_pem(),
    };
    Ok((record, cert.der().to_vec()))
}

impl Store {
    /// Registers a certificate with `status`. Its issuing CA is linked when it is registered and
    /// its key signed the certificate.
    pub async fn register_certificate(
        &self,
        pem: &[u8],
        status: CertStatus,
        actor: &str,
    ) -> Result<CertRecord, RegistryError> {
        self.register_certificates(&[pem], status, actor)
            .await?
            .pop()
            .unwrap_or_else(|| Err(RegistryError::Invalid("no certificate to register".into())))
    }

    /// Registers many certificates in one transaction (one disk sync for all: what makes bulk
    /// registration fast). Each item's outcome is returned in order: the record, `Conflict` when
    /// it is registered already, or why it is not a usable certificate. Nothing is written
    /// unless the whole batch commits.
    pub async fn register_certificates(
        &self,
        pems: &[&[u8]],
        status: CertStatus,
        actor: &str,
    ) -> Result<Vec<Result<CertRecord, RegistryError>>, RegistryError> {
        let cas = self.issuing_cas().await?;
        let mut out: Vec<Result<CertRecord, RegistryError>> = Vec::with_capacity(pems.len());
        let mut seen = std::collections::HashSet::new();
        // (index in `out`, record, der) of the certificates to insert, duplicates removed.
        let mut fresh: Vec<(usize, Vec<u8>)> = Vec::new();
        for pem in pems {
            match prepare_certificate(pem, status, &cas) {
                Err(e) => out.push(Err(e)),
                Ok((record, der)) => {
                    if seen.insert(record.id.clone()) {
                        fresh.push((out.len(), der));
                        out.push(Ok(record));
                    } else {
                        out.push(Err(RegistryError::Conflict(format!(
                            "certificate {} is already registered (twice in this batch)",
                            record.id
                        ))));
                    }
                }
            }
        }
        // Multi-row statements, ROWS rows at a time: per-statement overhead dominates otherwise.
        const ROWS: usize = 100;
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for chunk in fresh.chunks(ROWS) {
                let mut sql = String::from("INSERT INTO certificates (id, der, subject, issuer, serial, ca_id, status, not_after, created_at, updated_at, last_seen, version) VALUES ");
                for i in 0..chunk.len() {
                    let b = i * 9;
                    if i > 0 {
                        sql.push_str(", ");
                    }
                    sql.push_str(&format!("(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, NULL, 1)", b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7, b + 8, b + 9, b + 9));
                }
                sql.push_str(" ON CONFLICT (id) DO NOTHING RETURNING id");
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                for (index, der) in chunk {
                    let Some(Ok(r)) = out.get(*index) else { continue };
                    query = query
                        .bind(r.id.as_str().to_string())
                        .bind(der.clone())
                        .bind(r.subject.clone())
                        .bind(r.issuer.clone())
                        .bind(r.serial.clone())
                        .bind(r.ca_id.as_ref().map(|c| c.as_str().to_string()))
                        .bind(r.status.as_str())
                        .bind(r.not_after)
                        .bind(r.created_at);
                }
                let inserted: std::collections::HashSet<String> = query
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(|row| row.try_get::<String, _>("id"))
                    .collect::<Result<_, _>>()?;
                let mut entries = Vec::new();
                for (index, _) in chunk {
                    let Some(slot) = out.get_mut(*index) else { continue };
                    let Ok(r) = &*slot else { continue };
                    if inserted.contains(r.id.as_str()) {
                        let after = serde_json::to_string(&summary_cert(r)).unwrap_or_default();
                        entries.push((r.id.as_str().to_string(), None, after));
                    } else {
                        let id = r.id.clone();
                        *slot = Err(RegistryError::Conflict(format!("certificate {id} is already registered")));
                    }
                }
                audit_many(&mut *tx, actor, AuditAction::CertificateRegister, &entries).await?;
            }
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })?;
        Ok(out)
    }

    /// A registered certificate.
    pub async fn certificate(&self, id: &CertId) -> Result<CertRecord, RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT * FROM certificates WHERE id = $1").bind(id.as_str()).fetch_optional(pool).await?;
            let mut record = match row {
                Some(row) => cert_from_row(&row)?,
                None => return Err(RegistryError::NotFound(format!("certificate {id}"))),
            };
            let things = sqlx::query("SELECT thing_name FROM thing_certificates WHERE certificate_id = $1 ORDER BY thing_name")
                .bind(id.as_str())
                .fetch_all(pool)
                .await?;
            record.things = things
                .iter()
                .map(|r| r.try_get::<String, _>("thing_name"))
                .collect::<Result<_, _>>()?;
            Ok(record)
        })
    }

    /// One page of certificates, by id, matching `filter`.
    pub async fn list_certificates(
        &self,
        filter: &CertFilter,
    ) -> Result<Vec<CertRecord>, RegistryError> {
        let limit = i64::from(filter.limit.unwrap_or(100).clamp(1, 1000));
        let sql = "SELECT * FROM certificates WHERE ($1 IS NULL OR status = $1) AND ($2 IS NULL OR ca_id = $2) \
                   AND ($3 IS NULL OR not_after < $3) AND ($4 IS NULL OR id > $4) \
                   AND ($6 IS NULL OR id IN (SELECT certificate_id FROM thing_certificates WHERE thing_name = $6)) \
                   ORDER BY id LIMIT $5";
        let status = filter.status.map(|s| s.as_str().to_string());
        let ca = filter.ca.as_ref().map(|c| c.as_str().to_string());
        let after = filter.after.as_ref().map(|c| c.as_str().to_string());
        with_pool!(self, pool => {
            let rows = sqlx::query(sql)
                .bind(status)
                .bind(ca)
                .bind(filter.expiring_before)
                .bind(after)
                .bind(limit)
                .bind(filter.thing.clone())
                .fetch_all(pool)
                .await?;
            let mut page: Vec<CertRecord> = rows.iter().map(cert_from_row).collect::<Result<_, _>>()?;
            // The page is ordered by id: one range query finds its attachments.
            if let (Some(first), Some(last)) = (page.first(), page.last()) {
                let attached = sqlx::query(
                    "SELECT certificate_id, thing_name FROM thing_certificates WHERE certificate_id >= $1 AND certificate_id <= $2 ORDER BY thing_name",
                )
                .bind(first.id.as_str().to_string())
                .bind(last.id.as_str().to_string())
                .fetch_all(pool)
                .await?;
                for row in &attached {
                    let cert: String = row.try_get("certificate_id")?;
                    if let Ok(i) = page.binary_search_by(|c| c.id.as_str().cmp(&cert)) {
                        page[i].things.push(row.try_get("thing_name")?);
                    }
                }
            }
            Ok(page)
        })
    }

    /// Changes a certificate's status. REVOKED is permanent.
    pub async fn set_certificate_status(
        &self,
        id: &CertId,
        status: CertStatus,
        actor: &str,
    ) -> Result<CertRecord, RegistryError> {
        self.set_certificate_status_for(id, status, None, actor)
            .await
    }

    /// [`Store::set_certificate_status`], with the reason of a revocation (an RFC 5280
    /// CRLReason name such as `keyCompromise`; see [`REVOCATION_REASONS`]), which the CA's CRL
    /// and OCSP answers publish.
    pub async fn set_certificate_status_for(
        &self,
        id: &CertId,
        status: CertStatus,
        reason: Option<&str>,
        actor: &str,
    ) -> Result<CertRecord, RegistryError> {
        if let Some(r) = reason {
            if status != CertStatus::Revoked {
                return Err(RegistryError::Invalid(
                    "a reason goes with --status REVOKED only".into(),
                ));
            }
            if !REVOCATION_REASONS.contains(&r) {
                return Err(RegistryError::Invalid(format!(
                    "revocation reason '{r}' is not one of {}",
                    REVOCATION_REASONS.join(", ")
                )));
            }
        }
        loop {
            let before = self.certificate(id).await?;
            if before.status == CertStatus::Revoked && status != CertStatus::Revoked {
                return Err(RegistryError::Invalid(format!(
                    "certificate {id} is REVOKED, which is permanent; register a new certificate instead"
                )));
            }
            let mut after = before.clone();
            after.status = status;
            after.updated_at = now();
            after.version = before.version + 1;
            let b = serde_json::to_string(&summary_cert(&before)).ok();
            let a = serde_json::to_value(summary_cert(&after))
                .ok()
                .map(|mut v| {
                    if let Some(r) = reason {
                        v["revocation_reason"] = serde_json::json!(r);
                    }
                    v.to_string()
                });
            let written = with_pool!(self, pool => {
                let mut tx = pool.begin().await?;
                let done = sqlx::query(
                    "UPDATE certificates SET status = $1, updated_at = $2, version = version + 1, revocation_reason = $5 WHERE id = $3 AND version = $4",
                )
                .bind(status.as_str())
                .bind(after.updated_at)
                .bind(id.as_str())
                .bind(before.version)
                .bind(reason)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 1 {
                    audit(&mut *tx, actor, AuditAction::CertificateStatus, id.as_str(), b.as_deref(), a.as_deref()).await?;
                    if status == CertStatus::Revoked {
                        // What was renewed from a revoked certificate goes with it: its key may
                        // have renewed itself into certificates its holder never used.
                        let mut frontier = vec![id.as_str().to_string()];
                        let mut steps = 0;
                        while let Some(parent) = frontier.pop() {
                            steps += 1;
                            if steps > 10_000 {
                                break;
                            }
                            let children: Vec<(String, String)> = sqlx::query("SELECT id, status FROM certificates WHERE renews = $1 AND status <> 'REVOKED'")
                                .bind(&parent)
                                .fetch_all(&mut *tx)
                                .await?
                                .iter()
                                .map(|r| Ok((r.try_get("id")?, r.try_get("status")?)))
                                .collect::<Result<_, sqlx::Error>>()?;
                            for (child, was) in children {
                                sqlx::query("UPDATE certificates SET status = 'REVOKED', updated_at = $1, version = version + 1, revocation_reason = $3 WHERE id = $2")
                                    .bind(after.updated_at)
                                    .bind(&child)
                                    .bind(reason)
                                    .execute(&mut *tx)
                                    .await?;
                                let before = serde_json::json!({"status": was}).to_string();
                                let why = serde_json::json!({"status": "REVOKED", "cause": "renewed from a revoked certificate", "revoked": id}).to_string();
                                audit(&mut *tx, actor, AuditAction::CertificateStatus, &child, Some(&before), Some(&why)).await?;
                                frontier.push(child);
                            }
                        }
                    }
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

    /// Deletes a certificate that is not ACTIVE.
    pub async fn delete_certificate(&self, id: &CertId, actor: &str) -> Result<(), RegistryError> {
        let before = self.certificate(id).await?;
        if before.status == CertStatus::Active {
            return Err(RegistryError::Invalid(format!(
                "certificate {id} is ACTIVE; deactivate or revoke it before deleting it"
            )));
        }
        let b = serde_json::to_string(&summary_cert(&before)).ok();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let done = sqlx::query("DELETE FROM certificates WHERE id = $1 AND status <> 'ACTIVE'")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(RegistryError::Conflict(format!("certificate {id} changed while being deleted; try again")));
            }
            sqlx::query("DELETE FROM policy_attachments WHERE target_type = 'certificate' AND target = $1").bind(id.as_str()).execute(&mut *tx).await?;
            audit(&mut *tx, actor, AuditAction::CertificateDelete, id.as_str(), b.as_deref(), None).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Calls `f` with every registered certificate's id (64 hex) and status, streaming the rows:
    /// what a gateway's snapshot is built from, without holding a million rows at once.
    pub async fn for_each_status(
        &self,
        mut f: impl FnMut(&str, CertStatus, u16) + Send,
    ) -> Result<usize, RegistryError> {
        use futures_util::TryStreamExt;
        let mut count = 0;
        with_pool!(self, pool => {
            let mut rows = sqlx::query(STATUS_COLUMNS).fetch(pool);
            while let Some(r) = rows.try_next().await? {
                let id: &str = r.try_get("id")?;
                let status: &str = r.try_get("status")?;
                f(id, CertStatus::from_str(status)?, grace_days(&r)?);
                count += 1;
            }
            Ok::<(), RegistryError>(())
        })?;
        Ok(count)
    }

    /// The serial (colon hex), status, last change and revocation reason of every registered
    /// certificate whose issuer is `issuer` (RFC 4514): what a CA's CRL and OCSP responder
    /// publish.
    pub async fn statuses_by_issuer(
        &self,
        issuer: &str,
    ) -> Result<Vec<(String, CertStatus, i64, Option<String>)>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT serial, status, updated_at, revocation_reason FROM certificates WHERE issuer = $1")
                .bind(issuer)
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok((
                        r.try_get("serial")?,
                        CertStatus::from_str(&r.try_get::<String, _>("status")?)?,
                        r.try_get("updated_at")?,
                        r.try_get("revocation_reason")?,
                    ))
                })
                .collect()
        })
    }

    /// Every registered certificate's status, for the gateway's in-memory snapshot.
    pub async fn statuses(&self) -> Result<Vec<(CertId, CertStatus)>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT id, status FROM certificates").fetch_all(pool).await?;
            rows.iter()
                .map(|r| {
                    Ok((
                        CertId::from_str(&r.try_get::<String, _>("id")?)?,
                        CertStatus::from_str(&r.try_get::<String, _>("status")?)?,
                    ))
                })
                .collect()
        })
    }

    /// The statuses of these certificates, with their grace periods in days (renewal only
    /// after expiry: [`Store::renewal_terms`]); an id not returned is not registered.
    pub async fn statuses_of(
        &self,
        ids: &[String],
    ) -> Result<Vec<(CertId, CertStatus, u16)>, RegistryError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!("{STATUS_COLUMNS} WHERE id IN ({})", placeholders.join(", "));
            with_pool!(self, pool => {
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
                for id in chunk {
                    query = query.bind(id.as_str());
                }
                for r in query.fetch_all(pool).await? {
                    out.push((
                        CertId::from_str(&r.try_get::<String, _>("id")?)?,
                        CertStatus::from_str(&r.try_get::<String, _>("status")?)?,
                        grace_days(&r)?,
                    ));
                }
                Ok::<(), RegistryError>(())
            })?;
        }
        Ok(out)
    }
}

/// What the data path's snapshot reads of each certificate: its status and grace period.
const STATUS_COLUMNS: &str =
    "SELECT id, status, COALESCE(grace_until, not_after) - not_after AS grace FROM certificates";

/// A row's grace period in whole days (0 without one).
fn grace_days<R: Row>(row: &R) -> Result<u16, RegistryError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let secs: i64 = row.try_get("grace")?;
    Ok(u16::try_from(secs.max(0) / 86400).unwrap_or(u16::MAX))
}

/// The revocation reasons a certificate may be given (RFC 5280 CRLReason, by name; their codes
/// are their positions, 7 unused, certificateHold being an INACTIVE certificate's).
pub const REVOCATION_REASONS: [&str; 8] = [
    "unspecified",
    "keyCompromise",
    "cACompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "privilegeWithdrawn",
    "aACompromise",
];

/// The RFC 5280 code of a revocation reason a certificate may be given.
pub fn revocation_reason_code(name: &str) -> Option<u8> {
    REVOCATION_REASONS
        .contains(&name)
        .then(|| portcullis_pki::crl::reason_code(name))
        .flatten()
}
