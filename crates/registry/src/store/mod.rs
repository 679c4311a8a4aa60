//! The store: one implementation over SQLite and PostgreSQL.
//!
//! The SQL is written once with `$n` placeholders (SQLite accepts them too) and run on either
//! pool by [`with_pool!`]. Changes run in a transaction: read the row, check the rule, write it with
//! `version = version + 1 WHERE version = <read>`, append an audit entry, commit. A concurrent
//! writer that changed the row in between makes the update match nothing, and the change is
//! retried on the fresh row, so no update is lost.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use portcullis_pki::Certificate;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::RegistryError;
use crate::audit::AuditAction;
use crate::model::{CaRecord, CaStatus, CertId, CertRecord, CertStatus};
use crate::provisioning::ProvisioningTemplate;

mod admin;
mod policies;
mod things;
mod truststores;
pub(crate) mod webhooks;

pub use admin::AuditFilter;
pub use policies::{MAX_POLICY_VERSIONS, PolicyState, PolicySummary};
pub use things::Sighting;
pub use webhooks::{
    Delivery, DueDelivery, EVENT_TYPES, MAX_ATTEMPTS, NewWebhook, Webhook, WebhookUpdate,
};

/// What a [`ChangeListener`] heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Certificates, CAs, things, policies… changed, recorded from this audit sequence number
    /// on: refresh the snapshot, reading the changes again from there.
    Registry(Option<i64>),
    /// Domains or truststores changed: rebuild the configuration (and the snapshot).
    Config(Option<i64>),
    /// The connection was lost and is back: notifications may have been missed, so resync
    /// everything.
    Resync,
}

/// Notifications of committed changes (PostgreSQL).
#[derive(Debug)]
pub struct ChangeListener {
    listener: sqlx::postgres::PgListener,
}

impl ChangeListener {
    /// The next change. A lost connection is reconnected here and reported as
    /// [`Change::Resync`]; an error means the database cannot be reached right now.
    pub async fn next(&mut self) -> Result<Change, RegistryError> {
        match self.listener.try_recv().await? {
            None => Ok(Change::Resync),
            Some(n) => {
                let (class, seq) = n.payload().split_once(':').unwrap_or((n.payload(), ""));
                let seq = seq.parse().ok();
                Ok(if class == "config" {
                    Change::Config(seq)
                } else {
                    Change::Registry(seq)
                })
            }
        }
    }
}

/// A registry store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
}

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs the same code on whichever pool the store has.
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            crate::store::Pool::Sqlite($pool) => $body,
            crate::store::Pool::Postgres($pool) => $body,
        }
    };
}
pub(crate) use with_pool;

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
}

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

impl Store {
    /// Opens a store: `postgres://…` (or `postgresql://…`) for PostgreSQL, otherwise a SQLite
    /// file path (created if missing, WAL journal, synchronous FULL). Migrations are applied.
    pub async fn open(database: &str) -> Result<Store, RegistryError> {
        let pool = if database.starts_with("postgres://") || database.starts_with("postgresql://") {
            // A short acquire timeout: with the database away, callers get a clear error in
            // seconds instead of waiting (the gateway keeps serving from its snapshot).
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(3))
                .connect(database)
                .await?;
            sqlx::migrate!("migrations/postgres").run(&pool).await?;
            Pool::Postgres(pool)
        } else {
            owner_only(Path::new(database))?;
            let options = SqliteConnectOptions::new()
                .filename(Path::new(database))
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .foreign_keys(true)
                .busy_timeout(Duration::from_secs(10));
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .connect_with(options)
                .await?;
            sqlx::migrate!("migrations/sqlite").run(&pool).await?;
            Pool::Sqlite(pool)
        };
        Ok(Store { pool })
    }

    /// Listens for changes committed by any process on the same database (PostgreSQL
    /// LISTEN/NOTIFY); `None` on SQLite, where one process owns the file and polling suffices.
    pub async fn listen(&self) -> Result<Option<ChangeListener>, RegistryError> {
        match &self.pool {
            Pool::Sqlite(_) => Ok(None),
            Pool::Postgres(pool) => {
                let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
                listener.listen("portcullis_changes").await?;
                Ok(Some(ChangeListener { listener }))
            }
        }
    }

    /// The backend's name: `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

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
        loop {
            let before = self.ca(id).await?;
            let mut after = before.clone();
            after.status = update.status.unwrap_or(before.status);
            after.auto_registration = update.auto_registration.unwrap_or(before.auto_registration);
            if let Some(t) = &update.provisioning_template {
                after.provisioning_template = t.clone();
            }
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
                    "UPDATE cas SET status = $1, auto_registration = $2, provisioning_template = $3, updated_at = $4, version = version + 1 WHERE id = $5 AND version = $6",
                )
                .bind(after.status.as_str())
                .bind(i64::from(after.auto_registration))
                .bind(template_json)
                .bind(after.updated_at)
                .bind(id.as_str())
                .bind(before.version)
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

    /// Registered CAs with their parsed certificates, to link what they issued.
    async fn issuing_cas(&self) -> Result<Vec<(CertId, String, Certificate)>, RegistryError> {
        Ok(self
            .list_cas()
            .await?
            .into_iter()
            .filter_map(|ca| {
                let (cert, _) = Certificate::first_and_rest(ca.pem.as_bytes()).ok()?;
                Some((ca.id, ca.subject, cert))
            })
            .collect())
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
            let (b, a) = (
                serde_json::to_string(&summary_cert(&before)).ok(),
                serde_json::to_string(&summary_cert(&after)).ok(),
            );
            let written = with_pool!(self, pool => {
                let mut tx = pool.begin().await?;
                let done = sqlx::query(
                    "UPDATE certificates SET status = $1, updated_at = $2, version = version + 1 WHERE id = $3 AND version = $4",
                )
                .bind(status.as_str())
                .bind(after.updated_at)
                .bind(id.as_str())
                .bind(before.version)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 1 {
                    audit(&mut *tx, actor, AuditAction::CertificateStatus, id.as_str(), b.as_deref(), a.as_deref()).await?;
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
        mut f: impl FnMut(&str, CertStatus) + Send,
    ) -> Result<usize, RegistryError> {
        use futures_util::TryStreamExt;
        let mut count = 0;
        with_pool!(self, pool => {
            let mut rows = sqlx::query("SELECT id, status FROM certificates").fetch(pool);
            while let Some(r) = rows.try_next().await? {
                let id: &str = r.try_get("id")?;
                let status: &str = r.try_get("status")?;
                f(id, CertStatus::from_str(status)?);
                count += 1;
            }
            Ok::<(), RegistryError>(())
        })?;
        Ok(count)
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

    /// What changed after audit entry `seq`, or was recorded at or after `since` (seconds; a
    /// window for PostgreSQL, where a smaller sequence number can commit later): (seq, action,
    /// target), oldest first, at most `limit`.
    pub async fn changes_since(
        &self,
        seq: i64,
        since: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String, String)>, RegistryError> {
        // Two queries, each on its own index (an OR of both makes SQLite scan the table).
        with_pool!(self, pool => {
            let mut rows = sqlx::query("SELECT seq, action, target FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2")
                .bind(seq)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            rows.extend(
                // `seq + 0` and no ORDER BY: otherwise SQLite walks the table by seq instead of
                // using the index on `at`.
                sqlx::query("SELECT seq, action, target FROM audit WHERE at >= $1 AND seq + 0 <= $2 LIMIT $3")
                    .bind(since)
                    .bind(seq)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?,
            );
            let mut out: Vec<(i64, String, String)> = rows
                .iter()
                .map(|r| Ok((r.try_get("seq")?, r.try_get("action")?, r.try_get("target")?)))
                .collect::<Result<_, RegistryError>>()?;
            out.sort_by_key(|(s, _, _)| *s);
            out.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            Ok(out)
        })
    }

    /// The statuses of these certificates; an id not returned is not registered.
    pub async fn statuses_of(
        &self,
        ids: &[String],
    ) -> Result<Vec<(CertId, CertStatus)>, RegistryError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT id, status FROM certificates WHERE id IN ({})",
                placeholders.join(", ")
            );
            with_pool!(self, pool => {
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
                for id in chunk {
                    query = query.bind(id.as_str());
                }
                for r in query.fetch_all(pool).await? {
                    out.push((
                        CertId::from_str(&r.try_get::<String, _>("id")?)?,
                        CertStatus::from_str(&r.try_get::<String, _>("status")?)?,
                    ));
                }
                Ok::<(), RegistryError>(())
            })?;
        }
        Ok(out)
    }

    /// A number that changes whenever the registry changes (every change writes an audit
    /// entry): polled to refresh snapshots, also from other processes.
    pub async fn change_marker(&self) -> Result<i64, RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS marker FROM audit").fetch_one(pool).await?;
            Ok(row.try_get::<i64, _>("marker")?)
        })
    }
}

/// Appends an audit entry, and the webhook event the change amounts to (if any), in the
/// caller's transaction: both commit with the change or not at all.
pub(crate) async fn audit<C, DB>(
    conn: &mut C,
    actor: &str,
    action: AuditAction,
    target: &str,
    before: Option<&str>,
    after: Option<&str>,
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
    let at = now();
    sqlx::query("INSERT INTO audit (at, actor, action, target, before, after) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(at)
        .bind(actor)
        .bind(action.as_str())
        .bind(target)
        .bind(before)
        .bind(after)
        .execute(&mut *conn)
        .await?;
    // Every node LISTENs: the notification is delivered at commit, in commit order, so a node
    // refreshes even when a change with a smaller sequence number commits after a larger one.
    if DB::NAME == "PostgreSQL" {
        let class = if action.effects().configuration {
            "config"
        } else {
            "registry"
        };
        // The payload carries the entry's sequence number: a node that already moved past it
        // (a larger one committed first) reads the changes again from there.
        sqlx::query("SELECT pg_notify('portcullis_changes', $1 || ':' || currval(pg_get_serial_sequence('audit', 'seq')))")
            .bind(class)
            .execute(&mut *conn)
            .await?;
    }
    if let Some(event) = webhooks::event_of(action, before, after) {
        let payload = webhooks::event_payload(event, at, actor, target, before, after);
        sqlx::query("INSERT INTO events (type, at, payload, dispatched) VALUES ($1, $2, $3, 0)")
            .bind(event)
            .bind(at)
            .bind(payload)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

pub(crate) fn conflict_or(e: sqlx::Error, message: String) -> RegistryError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => RegistryError::Conflict(message),
        _ => RegistryError::Database(e),
    }
}

pub(crate) fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
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
        not_after: row.try_get("not_after")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
        pem: Certificate::from_der(der)?.to_pem(),
    })
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
        version: row.try_get("version")?,
        pem: Certificate::from_der(der)?.to_pem(),
    })
}

fn summary_ca(ca: &CaRecord) -> serde_json::Value {
    serde_json::json!({
        "id": ca.id, "subject": ca.subject, "status": ca.status,
        "auto_registration": ca.auto_registration, "verified": ca.verified, "version": ca.version,
        "provisioning_template": ca.provisioning_template,
    })
}

pub(crate) fn summary_cert(c: &CertRecord) -> serde_json::Value {
    serde_json::json!({
        "id": c.id, "subject": c.subject, "status": c.status, "ca_id": c.ca_id, "version": c.version,
    })
}

/// [`audit`] for many entries of one action (target, before, after), in multi-row statements
/// of at most 500 entries (parameter limits).
pub(crate) async fn audit_many<C, DB>(
    conn: &mut C,
    actor: &str,
    action: AuditAction,
    entries: &[(String, Option<String>, String)],
) -> Result<(), sqlx::Error>
where
    DB: sqlx::Database,
    C: Send,
    for<'c> &'c mut C: sqlx::Executor<'c, Database = DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
{
    if entries.is_empty() {
        return Ok(());
    }
    if DB::NAME == "PostgreSQL" {
        // A number below every entry these statements insert (see `audit`).
        sqlx::query("SELECT pg_notify('portcullis_changes', 'registry:' || nextval(pg_get_serial_sequence('audit', 'seq')))")
            .execute(&mut *conn)
            .await?;
    }
    let at = now();
    for chunk in entries.chunks(500) {
        let mut sql =
            String::from("INSERT INTO audit (at, actor, action, target, before, after) VALUES ");
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!(
                "($1, $2, $3, ${}, ${}, ${})",
                4 + 3 * i,
                5 + 3 * i,
                6 + 3 * i
            ));
        }
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(at)
            .bind(actor)
            .bind(action.as_str());
        for (target, before, after) in chunk {
            query = query
                .bind(target.clone())
                .bind(before.clone())
                .bind(after.clone());
        }
        query.execute(&mut *conn).await?;
        let events: Vec<(&str, String)> = chunk
            .iter()
            .filter_map(|(target, before, after)| {
                let event = webhooks::event_of(action, before.as_deref(), Some(after))?;
                Some((
                    event,
                    webhooks::event_payload(
                        event,
                        at,
                        actor,
                        target,
                        before.as_deref(),
                        Some(after),
                    ),
                ))
            })
            .collect();
        if !events.is_empty() {
            let mut sql =
                String::from("INSERT INTO events (type, at, payload, dispatched) VALUES ");
            for i in 0..events.len() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("(${}, $1, ${}, 0)", 2 + 2 * i, 3 + 2 * i));
            }
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(at);
            for (event, payload) in events {
                query = query.bind(event.to_string()).bind(payload);
            }
            query.execute(&mut *conn).await?;
        }
    }
    Ok(())
}

/// Parses a certificate to register and links its issuing CA.
/// Makes a SQLite database readable by its owner only, like a private key: it holds webhook
/// secrets and the CA registration code. A new file is created 0600 before SQLite opens it
/// (SQLite gives its `-wal` and `-shm` files the database's mode); existing files are
/// narrowed.
fn owner_only(database: &Path) -> Result<(), RegistryError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let failed = |path: &Path, e: std::io::Error| {
            RegistryError::Invalid(format!(
                "cannot make the registry database {} private (mode 0600): {e}",
                path.display()
            ))
        };
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(database)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(failed(database, e)),
        }
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut name = database.as_os_str().to_owned();
            name.push(suffix);
            let path = Path::new(&name);
            match std::fs::metadata(path) {
                Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                        .map_err(|e| failed(path, e))?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn prepare_certificate(
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
        version: 1,
        pem: cert.to_pem(),
    };
    Ok((record, cert.der().to_vec()))
}
