//! Named truststores with immutable numbered versions.

use portcullis_pki::Truststore;
use portcullis_pki::crl::Crl;
use sqlx::Row;

use super::{Store, audit, now, with_pool};
use crate::RegistryError;
use crate::audit::AuditAction;
use crate::model::{TruststoreVersion, check_name};

/// The largest bundle or CRL set stored (bytes of PEM).
const MAX_TRUSTSTORE_BYTES: usize = 8 * 1024 * 1024;

impl Store {
    /// Stores a new version of truststore `name`: version 1 when `create` (refused if the name
    /// exists), the next number otherwise (refused if it does not). The bundle must parse and
    /// hold a trust anchor, CRLs must parse; lint warnings are stored with the version.
    pub async fn add_truststore_version(
        &self,
        name: &str,
        bundle: &str,
        crls: &[String],
        create: bool,
        actor: &str,
    ) -> Result<TruststoreVersion, RegistryError> {
        check_name("truststore", name)?;
        if name == "cas" {
            return Err(RegistryError::Invalid(
                "the truststore name 'cas' is reserved: registry:cas is every registered ACTIVE CA; choose another name".into(),
            ));
        }
        if bundle.len() + crls.iter().map(String::len).sum::<usize>() > MAX_TRUSTSTORE_BYTES {
            return Err(RegistryError::Invalid(
                "truststore bundle and CRLs exceed 8 MiB".into(),
            ));
        }
        let store = Truststore::from_pem(bundle.as_bytes())?;
        let mut warnings: Vec<String> = store
            .store_warnings()
            .iter()
            .map(|w| w.to_string())
            .collect();
        for entry in store.entries() {
            for w in &entry.warnings {
                warnings.push(format!(
                    "certificate #{} ({}): {w}",
                    entry.index,
                    entry.certificate.info().subject
                ));
            }
        }
        for (i, crl) in crls.iter().enumerate() {
            let parsed = Crl::all_from_pem_or_der(crl.as_bytes())
                .map_err(|e| RegistryError::Invalid(format!("CRL #{}: {e}", i + 1)))?;
            if parsed.is_empty() {
                return Err(RegistryError::Invalid(format!(
                    "CRL #{} holds no CRL",
                    i + 1
                )));
            }
        }
        let crls_json = serde_json::to_string(crls)
            .map_err(|e| RegistryError::Invalid(format!("CRLs: {e}")))?;
        let warnings_json = serde_json::to_string(&warnings)
            .map_err(|e| RegistryError::Invalid(format!("warnings: {e}")))?;
        loop {
            let latest = self.latest_truststore_version(name).await?;
            match (create, latest) {
                (true, Some(_)) => {
                    return Err(RegistryError::Conflict(format!(
                        "truststore '{name}' exists already; add a version to it instead"
                    )));
                }
                (false, None) => {
                    return Err(RegistryError::NotFound(format!("truststore '{name}'")));
                }
                _ => {}
            }
            let version = latest.unwrap_or(0) + 1;
            let created_at = now();
            // Two writers racing for the same number: the primary key refuses one, which then
            // takes the next number.
            let inserted = with_pool!(self, pool => {
                let mut tx = pool.begin().await?;
                let done = sqlx::query(
                    "INSERT INTO truststore_versions (name, version, bundle, crls, warnings, created_at) VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (name, version) DO NOTHING",
                )
                .bind(name)
                .bind(version)
                .bind(bundle)
                .bind(&crls_json)
                .bind(&warnings_json)
                .bind(created_at)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 1 {
                    let after = serde_json::json!({"version": version, "warnings": warnings.len(), "crls": crls.len()}).to_string();
                    audit(&mut *tx, actor, if version == 1 { AuditAction::TruststoreCreate } else { AuditAction::TruststoreVersion }, name, None, Some(&after)).await?;
                    tx.commit().await?;
                    true
                } else {
                    false
                }
            });
            if inserted {
                return Ok(TruststoreVersion {
                    name: name.to_string(),
                    version,
                    bundle: bundle.to_string(),
                    crls: crls.to_vec(),
                    warnings,
                    created_at,
                });
            }
            if create {
                return Err(RegistryError::Conflict(format!(
                    "truststore '{name}' exists already; add a version to it instead"
                )));
            }
        }
    }

    /// One version of a truststore, or its latest with `None`.
    pub async fn truststore_version(
        &self,
        name: &str,
        version: Option<i64>,
    ) -> Result<TruststoreVersion, RegistryError> {
        let version = match version {
            Some(v) => v,
            None => self
                .latest_truststore_version(name)
                .await?
                .ok_or_else(|| RegistryError::NotFound(format!("truststore '{name}'")))?,
        };
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT * FROM truststore_versions WHERE name = $1 AND version = $2")
                .bind(name)
                .bind(version)
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| RegistryError::NotFound(format!("truststore '{name}' version {version}")))?;
            let crls: String = row.try_get("crls")?;
            let warnings: String = row.try_get("warnings")?;
            Ok(TruststoreVersion {
                name: row.try_get("name")?,
                version: row.try_get("version")?,
                bundle: row.try_get("bundle")?,
                crls: serde_json::from_str(&crls).map_err(|e| RegistryError::Invalid(format!("stored CRLs: {e}")))?,
                warnings: serde_json::from_str(&warnings).map_err(|e| RegistryError::Invalid(format!("stored warnings: {e}")))?,
                created_at: row.try_get("created_at")?,
            })
        })
    }

    /// Deletes every version of truststore `name` (the caller checked that no domain uses it).
    pub async fn delete_truststore(&self, name: &str, actor: &str) -> Result<(), RegistryError> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let gone = sqlx::query("DELETE FROM truststore_versions WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            if gone.rows_affected() == 0 {
                return Err(RegistryError::NotFound(format!("truststore '{name}'")));
            }
            let before = serde_json::json!({"versions": gone.rows_affected()}).to_string();
            audit(&mut *tx, actor, AuditAction::TruststoreDelete, name, Some(&before), None).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Every truststore with its latest version number, by name.
    pub async fn list_truststores(&self) -> Result<Vec<(String, i64)>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT name, MAX(version) AS latest FROM truststore_versions GROUP BY name ORDER BY name")
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| Ok((r.try_get("name")?, r.try_get("latest")?)))
                .collect::<Result<_, sqlx::Error>>()
                .map_err(Into::into)
        })
    }

    async fn latest_truststore_version(&self, name: &str) -> Result<Option<i64>, RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT MAX(version) AS latest FROM truststore_versions WHERE name = $1")
                .bind(name)
                .fetch_one(pool)
                .await?;
            Ok(row.try_get::<Option<i64>, _>("latest")?)
        })
    }
}
