//! Admin tokens (stored as SHA-256 hashes), domains managed through the API, and the audit log.

use sqlx::Row;

use super::{Store, audit, conflict_or, now, with_pool};
use crate::RegistryError;
use crate::audit::AuditAction;
use crate::domain_spec::DomainSpec;
use crate::model::{AdminCertRecord, AuditEntry, DomainRecord, TokenRecord};
use portcullis_pki::Certificate;

/// Filters for [`Store::audit_log`].
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only entries whose action starts with this (`certificate.`, `ca.register`…).
    pub action: Option<String>,
    /// Only entries about this target.
    pub target: Option<String>,
    /// Only entries older than this sequence number (the previous page's last).
    pub before: Option<i64>,
    /// Page size (1–10000, default 100).
    pub limit: Option<u32>,
}

impl Store {
    /// Makes an admin token. The secret is returned once; only its SHA-256 is stored.
    pub async fn create_token(
        &self,
        name: &str,
        actor: &str,
    ) -> Result<(TokenRecord, String), RegistryError> {
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(RegistryError::Invalid(
                "token name must be 1-128 printable characters".into(),
            ));
        }
        let secret = format!("pct_{}", random_hex(32)?);
        let record = TokenRecord {
            id: random_hex(8)?,
            name: name.to_string(),
            created_at: now(),
            last_used: None,
        };
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO admin_tokens (id, name, hash, created_at, last_used) VALUES ($1, $2, $3, $4, NULL)")
                .bind(&record.id)
                .bind(&record.name)
                .bind(token_hash(&secret))
                .bind(record.created_at)
                .execute(&mut *tx)
                .await?;
            let after = serde_json::json!({"id": record.id, "name": record.name}).to_string();
            audit(&mut *tx, actor, AuditAction::TokenCreate, &record.id, None, Some(&after)).await?;
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })?;
        Ok((record, secret))
    }

    /// The token whose secret this is, if any; notes its use (at most once a minute).
    pub async fn token_by_secret(
        &self,
        secret: &str,
    ) -> Result<Option<TokenRecord>, RegistryError> {
        let hash = token_hash(secret);
        let now = now();
        with_pool!(self, pool => {
            let Some(row) = sqlx::query("SELECT id, name, created_at, last_used FROM admin_tokens WHERE hash = $1")
                .bind(&hash)
                .fetch_optional(pool)
                .await?
            else {
                return Ok(None);
            };
            let record = TokenRecord {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                created_at: row.try_get("created_at")?,
                last_used: row.try_get("last_used")?,
            };
            if record.last_used.is_none_or(|t| t < now - 60) {
                sqlx::query("UPDATE admin_tokens SET last_used = $1 WHERE id = $2")
                    .bind(now)
                    .bind(&record.id)
                    .execute(pool)
                    .await?;
            }
            Ok(Some(record))
        })
    }

    /// Records an admin client certificate a rotation issued (ACTIVE).
    pub async fn record_admin_certificate(
        &self,
        cert: &Certificate,
        actor: &str,
    ) -> Result<(), RegistryError> {
        let info = cert.info();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO admin_certificates (id, subject, not_after, status, created_at, revoked_at) VALUES ($1, $2, $3, 'ACTIVE', $4, NULL) ON CONFLICT (id) DO NOTHING")
                .bind(&info.id)
                .bind(&info.subject)
                .bind(info.not_after_unix())
                .bind(now())
                .execute(&mut *tx)
                .await?;
            let after = serde_json::json!({"subject": info.subject}).to_string();
            audit(&mut *tx, actor, AuditAction::AdminCertificateIssue, &info.id, None, Some(&after)).await?;
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })
    }

    /// Revokes an admin client certificate for good: the admin API refuses it from the next
    /// request on, on every node.
    pub async fn revoke_admin_certificate(
        &self,
        id: &str,
        subject: &str,
        not_after: i64,
        actor: &str,
    ) -> Result<(), RegistryError> {
        let at = now();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO admin_certificates (id, subject, not_after, status, created_at, revoked_at) VALUES ($1, $2, $3, 'REVOKED', $4, $4) \
                         ON CONFLICT (id) DO UPDATE SET status = 'REVOKED', revoked_at = $4 WHERE admin_certificates.status <> 'REVOKED'")
                .bind(id)
                .bind(subject)
                .bind(not_after)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            let after = serde_json::json!({"subject": subject, "status": "REVOKED"}).to_string();
            audit(&mut *tx, actor, AuditAction::AdminCertificateRevoke, id, None, Some(&after)).await?;
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })
    }

    /// Whether the admin client certificate `id` (64 hex) is revoked.
    pub async fn admin_certificate_revoked(&self, id: &str) -> Result<bool, RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT COUNT(*) AS n FROM admin_certificates WHERE id = $1 AND status = 'REVOKED'")
                .bind(id)
                .fetch_one(pool)
                .await?;
            Ok(row.try_get::<i64, _>("n")? > 0)
        })
    }

    /// The admin client certificates the registry knows, oldest first.
    pub async fn admin_certificates(&self) -> Result<Vec<AdminCertRecord>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT * FROM admin_certificates ORDER BY created_at, id")
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(AdminCertRecord {
                        id: r.try_get("id")?,
                        subject: r.try_get("subject")?,
                        not_after: r.try_get("not_after")?,
                        status: r.try_get("status")?,
                        created_at: r.try_get("created_at")?,
                        revoked_at: r.try_get("revoked_at")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(RegistryError::from)
        })
    }

    /// Every token (never the secrets).
    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT id, name, created_at, last_used FROM admin_tokens ORDER BY created_at, id")
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(TokenRecord {
                        id: r.try_get("id")?,
                        name: r.try_get("name")?,
                        created_at: r.try_get("created_at")?,
                        last_used: r.try_get("last_used")?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(Into::into)
        })
    }

    /// Deletes a token; calls with it fail from then on.
    pub async fn delete_token(&self, id: &str, actor: &str) -> Result<(), RegistryError> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let done = sqlx::query("DELETE FROM admin_tokens WHERE id = $1").bind(id).execute(&mut *tx).await?;
            if done.rows_affected() != 1 {
                return Err(RegistryError::NotFound(format!("token {id}")));
            }
            audit(&mut *tx, actor, AuditAction::TokenDelete, id, None, None).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Creates or replaces a domain. With `expected_version`, the write happens only if the
    /// stored version is still that one (0: only if the domain does not exist).
    pub async fn put_domain(
        &self,
        hostname: &str,
        spec: &DomainSpec,
        expected_version: Option<i64>,
        actor: &str,
    ) -> Result<DomainRecord, RegistryError> {
        let spec_text = spec_json(spec)?;
        loop {
            // The stored text: a domain that cannot be read can still be replaced.
            let before = self.raw_domain(hostname).await?;
            let current = before.as_ref().map_or(0, |(version, _)| *version);
            if let Some(expected) = expected_version
                && expected != current
            {
                return Err(RegistryError::Conflict(format!(
                    "domain {hostname} is at version {current}, not {expected}; read it again and retry"
                )));
            }
            let now = now();
            let written = with_pool!(self, pool => {
                let mut tx = pool.begin().await?;
                let done = match &before {
                    None => {
                        let r = sqlx::query("INSERT INTO domains (hostname, spec, created_at, updated_at, version) VALUES ($1, $2, $3, $3, 1)")
                            .bind(hostname)
                            .bind(&spec_text)
                            .bind(now)
                            .execute(&mut *tx)
                            .await;
                        match r {
                            Ok(r) => r.rows_affected(),
                            Err(e) => match conflict_or(e, String::new()) {
                                RegistryError::Conflict(_) => 0,
                                other => return Err(other),
                            },
                        }
                    }
                    Some(b) => sqlx::query("UPDATE domains SET spec = $1, updated_at = $2, version = version + 1 WHERE hostname = $3 AND version = $4")
                        .bind(&spec_text)
                        .bind(now)
                        .bind(hostname)
                        .bind(b.0)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected(),
                };
                if done == 1 {
                    let b = before.as_ref().map(|(_, text)| text.as_str());
                    audit(&mut *tx, actor, if before.is_some() { AuditAction::DomainUpdate } else { AuditAction::DomainCreate }, hostname, b, Some(&spec_text)).await?;
                    tx.commit().await?;
                    true
                } else {
                    false
                }
            });
            if written {
                return self.domain(hostname).await;
            }
            if expected_version.is_some() {
                return Err(RegistryError::Conflict(format!(
                    "domain {hostname} changed meanwhile; read it again and retry"
                )));
            }
        }
    }

    /// A domain's version and stored text, unparsed.
    async fn raw_domain(&self, hostname: &str) -> Result<Option<(i64, String)>, RegistryError> {
        with_pool!(self, pool => {
            Ok(sqlx::query_as("SELECT version, spec FROM domains WHERE hostname = $1")
                .bind(hostname)
                .fetch_optional(pool)
                .await?)
        })
    }

    /// A domain.
    pub async fn domain(&self, hostname: &str) -> Result<DomainRecord, RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT * FROM domains WHERE hostname = $1")
                .bind(hostname)
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| RegistryError::NotFound(format!("domain {hostname}")))?;
            domain_from_row(&row)
        })
    }

    /// Every domain but `hostname`, by hostname, and `hostname`'s version (0: none). The
    /// excluded domain's specification is not read: a change that removes or replaces it works
    /// even when it cannot be read.
    pub async fn domains_except(
        &self,
        hostname: &str,
    ) -> Result<(Vec<DomainRecord>, i64), RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT * FROM domains WHERE hostname <> $1 ORDER BY hostname")
                .bind(hostname)
                .fetch_all(pool)
                .await?;
            let others = rows.iter().map(domain_from_row).collect::<Result<Vec<_>, _>>()?;
            let version: Option<i64> = sqlx::query_scalar("SELECT version FROM domains WHERE hostname = $1")
                .bind(hostname)
                .fetch_optional(pool)
                .await?;
            Ok((others, version.unwrap_or(0)))
        })
    }

    /// Every domain, by hostname.
    pub async fn list_domains(&self) -> Result<Vec<DomainRecord>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT * FROM domains ORDER BY hostname").fetch_all(pool).await?;
            rows.iter().map(domain_from_row).collect()
        })
    }

    /// Deletes a domain; with `expected_version`, only if it is still at that version.
    pub async fn delete_domain(
        &self,
        hostname: &str,
        expected_version: Option<i64>,
        actor: &str,
    ) -> Result<(), RegistryError> {
        // The stored text, not the parsed spec: a domain that cannot be read can be deleted.
        let (version, before) = self
            .raw_domain(hostname)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("domain {hostname}")))?;
        if let Some(expected) = expected_version
            && expected != version
        {
            return Err(RegistryError::Conflict(format!(
                "domain {hostname} is at version {version}, not {expected}; read it again and retry"
            )));
        }
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let done = sqlx::query("DELETE FROM domains WHERE hostname = $1 AND version = $2")
                .bind(hostname)
                .bind(version)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(RegistryError::Conflict(format!(
                    "domain {hostname} changed meanwhile; read it again and retry"
                )));
            }
            sqlx::query("DELETE FROM policy_attachments WHERE target_type = 'domain' AND target = $1")
                .bind(hostname)
                .execute(&mut *tx)
                .await?;
            audit(&mut *tx, actor, AuditAction::DomainDelete, hostname, Some(&before), None).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Seeds the domains from the configuration file, once: the first call stores them and
    /// returns true; later calls change nothing and return false (the registry is the source of
    /// truth from then on).
    pub async fn seed_domains(
        &self,
        domains: &[(String, DomainSpec)],
        actor: &str,
    ) -> Result<bool, RegistryError> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let claimed = sqlx::query("INSERT INTO registry_meta (key, value) VALUES ('domains_seeded', $1) ON CONFLICT (key) DO NOTHING")
                .bind(now().to_string())
                .execute(&mut *tx)
                .await?;
            if claimed.rows_affected() == 0 {
                return Ok(false);
            }
            for (hostname, spec) in domains {
                let spec = spec_json(spec)?;
                sqlx::query("INSERT INTO domains (hostname, spec, created_at, updated_at, version) VALUES ($1, $2, $3, $3, 1) ON CONFLICT (hostname) DO NOTHING")
                    .bind(hostname)
                    .bind(&spec)
                    .bind(now())
                    .execute(&mut *tx)
                    .await?;
                audit(&mut *tx, actor, AuditAction::DomainCreate, hostname, None, Some(&spec)).await?;
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Whether the configuration file's domains were seeded into the registry (after which the
    /// registry is their source of truth).
    pub async fn domains_seeded(&self) -> Result<bool, RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT COUNT(*) AS n FROM registry_meta WHERE key = 'domains_seeded'")
                .fetch_one(pool)
                .await?;
            Ok(row.try_get::<i64, _>("n")? > 0)
        })
    }

    /// A number that changes whenever a domain, truststore or CA (`registry:cas`) changes: what
    /// the gateway's configuration depends on (certificate changes reach it through the snapshot
    /// instead).
    pub async fn config_marker(&self) -> Result<i64, RegistryError> {
        with_pool!(self, pool => {
            let sql = format!(
                "SELECT COALESCE(MAX(seq), 0) AS marker FROM audit WHERE action IN ({})",
                AuditAction::configuration_names_sql()
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_one(pool)
                .await?;
            Ok(row.try_get::<i64, _>("marker")?)
        })
    }

    /// Audit entries, newest first.
    pub async fn audit_log(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>, RegistryError> {
        let prefix = filter
            .action
            .as_ref()
            .map(|a| format!("{}%", a.replace(['%', '_'], "")));
        with_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT * FROM audit WHERE ($1 IS NULL OR action LIKE $1) AND ($2 IS NULL OR target = $2) AND ($3 IS NULL OR seq < $3) \
                 ORDER BY seq DESC LIMIT $4",
            )
            .bind(prefix)
            .bind(filter.target.clone())
            .bind(filter.before)
            .bind(i64::from(filter.limit.unwrap_or(100).clamp(1, 10_000)))
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|r| {
                    Ok(AuditEntry {
                        seq: r.try_get("seq")?,
                        at: r.try_get("at")?,
                        actor: r.try_get("actor")?,
                        action: r.try_get("action")?,
                        target: r.try_get("target")?,
                        before: r.try_get("before")?,
                        after: r.try_get("after")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(Into::into)
        })
    }
}

fn domain_from_row<R: Row>(row: &R) -> Result<DomainRecord, RegistryError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let spec: String = row.try_get("spec")?;
    let hostname: String = row.try_get("hostname")?;
    Ok(DomainRecord {
        spec: serde_json::from_str(&spec).map_err(|e| {
            RegistryError::Invalid(format!(
                "stored domain '{hostname}' cannot be read ({e}): a newer version wrote it, or it was edited by hand; run this node's newer version, or delete the domain (portcullis domain delete {hostname}) and put it again"
            ))
        })?,
        hostname,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
    })
}

pub(crate) fn token_hash(secret: &str) -> String {
    portcullis_pki::cert::hex(&portcullis_pki::cert::sha256(secret.as_bytes()), "")
}

pub(crate) fn random_hex(bytes: usize) -> Result<String, RegistryError> {
    let mut buf = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut buf)
        .map_err(|_| RegistryError::Invalid("the system random generator failed".into()))?;
    Ok(portcullis_pki::cert::hex(&buf, ""))
}

/// A domain specification as the store keeps it: JSON text.
fn spec_json(spec: &DomainSpec) -> Result<String, RegistryError> {
    serde_json::to_string(spec).map_err(|e| RegistryError::Invalid(format!("domain: {e}")))
}
