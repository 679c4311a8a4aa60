//! Policies: named documents with numbered versions (at most [`MAX_POLICY_VERSIONS`] kept, one
//! the default) and their attachments to certificates, things, CAs and domains. Documents are
//! validated by `portcullis_policy` before they are stored.

use std::str::FromStr;

use sqlx::Row;

use super::{Store, audit, conflict_or, now, with_pool};
use crate::RegistryError;
use crate::audit::AuditAction;
use crate::model::{CertId, PolicyRecord, PolicyTarget, PolicyVersion, TargetType, check_name};

/// How many versions of a policy are kept (IoT Core's limit).
pub const MAX_POLICY_VERSIONS: usize = 5;

/// Every policy's default version and every attachment: what the gateway's snapshot is built from.
#[derive(Debug, Clone, Default)]
pub struct PolicyState {
    /// (name, default version, document text).
    pub policies: Vec<(String, i64, String)>,
    /// (policy name, target).
    pub attachments: Vec<(String, PolicyTarget)>,
    /// (certificate id, thing name) for every attachment of a certificate to a thing.
    pub things_of: Vec<(String, String)>,
    /// Every thing's attributes.
    pub thing_attributes: Vec<(String, std::collections::BTreeMap<String, String>)>,
    /// (certificate id, CA id) for the certificates of CAs that have policies attached.
    pub ca_of: Vec<(String, String)>,
}

/// A policy in a listing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PolicySummary {
    /// Its name.
    pub name: String,
    /// The version in effect.
    pub default_version: i64,
    /// How many targets it is attached to.
    pub attachments: i64,
    /// When it last changed.
    pub updated_at: i64,
}

/// Checks a document and returns it in the stored (compact) form.
fn checked_document(text: &str) -> Result<String, RegistryError> {
    portcullis_policy::Policy::parse(text)
        .map_err(|e| RegistryError::Invalid(format!("policy document: {e}")))?;
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| RegistryError::Invalid(format!("policy document: {e}")))?;
    Ok(value.to_string())
}

impl Store {
    /// Creates a policy with its first version (the default).
    pub async fn create_policy(
        &self,
        name: &str,
        document: &str,
        actor: &str,
    ) -> Result<PolicyRecord, RegistryError> {
        check_name("policy", name)?;
        let document = checked_document(document)?;
        let now = now();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let inserted = sqlx::query("INSERT INTO policies (name, default_version, latest_version, created_at, updated_at, version) VALUES ($1, 1, 1, $2, $2, 1)")
                .bind(name)
                .bind(now)
                .execute(&mut *tx)
                .await;
            if let Err(e) = inserted {
                return Err(conflict_or(e, format!("policy '{name}' exists already; add a version with `portcullis policy create-version`")));
            }
            sqlx::query("INSERT INTO policy_versions (policy, version, document, created_at) VALUES ($1, 1, $2, $3)")
                .bind(name)
                .bind(&document)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            audit(&mut *tx, actor, AuditAction::PolicyCreate, name, None, Some(&document)).await?;
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })?;
        self.policy(name, None).await
    }

    /// Adds a version; with `set_default` it becomes the one in effect.
    pub async fn create_policy_version(
        &self,
        name: &str,
        document: &str,
        set_default: bool,
        actor: &str,
    ) -> Result<PolicyRecord, RegistryError> {
        let document = checked_document(document)?;
        let now = now();
        loop {
            let before = self.policy(name, None).await?;
            if before.versions.len() >= MAX_POLICY_VERSIONS {
                return Err(RegistryError::Conflict(format!(
                    "policy '{name}' has {MAX_POLICY_VERSIONS} versions; delete one with `portcullis policy delete-version {name} --version N` first"
                )));
            }
            let written = with_pool!(self, pool => {
                let mut tx = pool.begin().await?;
                // Taking the row (version check) serializes concurrent writers of this policy.
                let row = sqlx::query("UPDATE policies SET latest_version = latest_version + 1, default_version = CASE WHEN $1 THEN latest_version + 1 ELSE default_version END, updated_at = $2, version = version + 1 WHERE name = $3 AND version = $4 RETURNING latest_version")
                    .bind(set_default)
                    .bind(now)
                    .bind(name)
                    .bind(before.revision)
                    .fetch_optional(&mut *tx)
                    .await?;
                match row {
                    None => false,
                    Some(row) => {
                        let version: i64 = row.try_get("latest_version")?;
                        sqlx::query("INSERT INTO policy_versions (policy, version, document, created_at) VALUES ($1, $2, $3, $4)")
                            .bind(name)
                            .bind(version)
                            .bind(&document)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        let after = serde_json::json!({"version": version, "default": set_default, "document": serde_json::from_str::<serde_json::Value>(&document).unwrap_or_default()}).to_string();
                        audit(&mut *tx, actor, AuditAction::PolicyVersion, name, None, Some(&after)).await?;
                        tx.commit().await?;
                        true
                    }
                }
            });
            if written {
                return self.policy(name, None).await;
            }
        }
    }

    /// Makes a kept version the one in effect.
    pub async fn set_default_policy_version(
        &self,
        name: &str,
        version: i64,
        actor: &str,
    ) -> Result<PolicyRecord, RegistryError> {
        let before = self.policy(name, None).await?;
        if !before.versions.iter().any(|v| v.version == version) {
            return Err(RegistryError::NotFound(format!(
                "version {version} of policy '{name}'"
            )));
        }
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let done = sqlx::query("UPDATE policies SET default_version = $1, updated_at = $2, version = version + 1 WHERE name = $3 AND EXISTS (SELECT 1 FROM policy_versions WHERE policy = $3 AND version = $1)")
                .bind(version)
                .bind(now())
                .bind(name)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(RegistryError::Conflict(format!("policy '{name}' changed meanwhile; retry")));
            }
            audit(&mut *tx, actor, AuditAction::PolicyDefault, name, Some(&before.default_version.to_string()), Some(&version.to_string())).await?;
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })?;
        self.policy(name, None).await
    }

    /// Deletes a version that is not the default.
    pub async fn delete_policy_version(
        &self,
        name: &str,
        version: i64,
        actor: &str,
    ) -> Result<PolicyRecord, RegistryError> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            // The default cannot change underneath: the delete checks it in the same statement.
            let done = sqlx::query("DELETE FROM policy_versions WHERE policy = $1 AND version = $2 AND version <> (SELECT default_version FROM policies WHERE name = $1)")
                .bind(name)
                .bind(version)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                tx.rollback().await?;
                let record = self.policy(name, None).await?;
                return Err(if record.default_version == version {
                    RegistryError::Conflict(format!("version {version} is the default of policy '{name}'; make another version the default first"))
                } else {
                    RegistryError::NotFound(format!("version {version} of policy '{name}'"))
                });
            }
            sqlx::query("UPDATE policies SET updated_at = $1, version = version + 1 WHERE name = $2")
                .bind(now())
                .bind(name)
                .execute(&mut *tx)
                .await?;
            audit(&mut *tx, actor, AuditAction::PolicyDeleteVersion, name, Some(&version.to_string()), None).await?;
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })?;
        self.policy(name, None).await
    }

    /// A policy with the document of `version` (default: the version in effect).
    pub async fn policy(
        &self,
        name: &str,
        version: Option<i64>,
    ) -> Result<PolicyRecord, RegistryError> {
        with_pool!(self, pool => {
            let Some(row) = sqlx::query("SELECT * FROM policies WHERE name = $1").bind(name).fetch_optional(pool).await? else {
                return Err(RegistryError::NotFound(format!("policy '{name}'")));
            };
            let default_version: i64 = row.try_get("default_version")?;
            let wanted = version.unwrap_or(default_version);
            let versions = sqlx::query("SELECT version, document, created_at FROM policy_versions WHERE policy = $1 ORDER BY version")
                .bind(name)
                .fetch_all(pool)
                .await?;
            let mut document = None;
            let mut kept = Vec::new();
            for v in &versions {
                let number: i64 = v.try_get("version")?;
                if number == wanted {
                    let text: String = v.try_get("document")?;
                    document = Some(serde_json::from_str(&text).map_err(|e| RegistryError::Invalid(format!("stored policy document: {e}")))?);
                }
                kept.push(PolicyVersion { version: number, is_default: number == default_version, created_at: v.try_get("created_at")? });
            }
            let Some(document) = document else {
                return Err(RegistryError::NotFound(format!("version {wanted} of policy '{name}'")));
            };
            let targets = sqlx::query("SELECT target_type, target FROM policy_attachments WHERE policy = $1 ORDER BY target_type, target")
                .bind(name)
                .fetch_all(pool)
                .await?
                .iter()
                .map(target_from_row)
                .collect::<Result<Vec<_>, RegistryError>>()?;
            Ok(PolicyRecord {
                name: row.try_get("name")?,
                default_version,
                versions: kept,
                version: wanted,
                document,
                targets,
                created_at: row.try_get("created_at")?,
                updated_at: row.try_get("updated_at")?,
                revision: row.try_get("version")?,
            })
        })
    }

    /// Every policy, by name.
    pub async fn list_policies(&self) -> Result<Vec<PolicySummary>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT p.name, p.default_version, p.updated_at, (SELECT COUNT(*) FROM policy_attachments a WHERE a.policy = p.name) AS attachments FROM policies p ORDER BY p.name")
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(PolicySummary {
                        name: r.try_get("name")?,
                        default_version: r.try_get("default_version")?,
                        attachments: r.try_get("attachments")?,
                        updated_at: r.try_get("updated_at")?,
                    })
                })
                .collect()
        })
    }

    /// Deletes a policy that is attached to nothing.
    pub async fn delete_policy(&self, name: &str, actor: &str) -> Result<(), RegistryError> {
        let before = self.policy(name, None).await?;
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let done = sqlx::query("DELETE FROM policies WHERE name = $1 AND NOT EXISTS (SELECT 1 FROM policy_attachments WHERE policy = $1)")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                tx.rollback().await?;
                let record = self.policy(name, None).await?;
                let targets: Vec<String> = record.targets.iter().map(|t| format!("{} {}", t.target_type.as_str(), t.target)).collect();
                return Err(RegistryError::Conflict(format!(
                    "policy '{name}' is attached to {}; detach it first",
                    targets.join(", ")
                )));
            }
            audit(&mut *tx, actor, AuditAction::PolicyDelete, name, Some(&before.document.to_string()), None).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Attaches a policy to an existing certificate, thing, CA or domain.
    pub async fn attach_policy(
        &self,
        name: &str,
        target: &PolicyTarget,
        actor: &str,
    ) -> Result<PolicyRecord, RegistryError> {
        self.policy(name, None).await?;
        let target = self.existing_target(target).await?;
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let inserted = sqlx::query("INSERT INTO policy_attachments (policy, target_type, target, attached_at) VALUES ($1, $2, $3, $4)")
                .bind(name)
                .bind(target.target_type.as_str())
                .bind(&target.target)
                .bind(now())
                .execute(&mut *tx)
                .await;
            if let Err(e) = inserted {
                return Err(conflict_or(e, format!("policy '{name}' is attached to {} {} already", target.target_type.as_str(), target.target)));
            }
            let what = format!("{}:{}", target.target_type.as_str(), target.target);
            audit(&mut *tx, actor, AuditAction::PolicyAttach, name, None, Some(&what)).await?;
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })?;
        self.policy(name, None).await
    }

    /// Detaches a policy.
    pub async fn detach_policy(
        &self,
        name: &str,
        target: &PolicyTarget,
        actor: &str,
    ) -> Result<PolicyRecord, RegistryError> {
        let target = normalized_target(target)?;
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let done = sqlx::query("DELETE FROM policy_attachments WHERE policy = $1 AND target_type = $2 AND target = $3")
                .bind(name)
                .bind(target.target_type.as_str())
                .bind(&target.target)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(RegistryError::NotFound(format!("attachment of policy '{name}' to {} {}", target.target_type.as_str(), target.target)));
            }
            let what = format!("{}:{}", target.target_type.as_str(), target.target);
            audit(&mut *tx, actor, AuditAction::PolicyDetach, name, Some(&what), None).await?;
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })?;
        self.policy(name, None).await
    }

    /// The policies attached to a target, by name.
    pub async fn policies_of(&self, target: &PolicyTarget) -> Result<Vec<String>, RegistryError> {
        let target = normalized_target(target)?;
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT policy FROM policy_attachments WHERE target_type = $1 AND target = $2 ORDER BY policy")
                .bind(target.target_type.as_str())
                .bind(&target.target)
                .fetch_all(pool)
                .await?;
            rows.iter().map(|r| Ok(r.try_get("policy")?)).collect()
        })
    }

    /// Every policy's default document and every attachment.
    pub async fn policy_state(&self) -> Result<PolicyState, RegistryError> {
        with_pool!(self, pool => {
            let policies = sqlx::query("SELECT p.name, p.default_version, v.document FROM policies p JOIN policy_versions v ON v.policy = p.name AND v.version = p.default_version ORDER BY p.name")
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| Ok((r.try_get("name")?, r.try_get("default_version")?, r.try_get("document")?)))
                .collect::<Result<Vec<_>, RegistryError>>()?;
            let attachments = sqlx::query("SELECT policy, target_type, target FROM policy_attachments ORDER BY policy, target_type, target")
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| Ok((r.try_get("policy")?, target_from_row(r)?)))
                .collect::<Result<Vec<_>, RegistryError>>()?;
            let things_of = sqlx::query("SELECT certificate_id, thing_name FROM thing_certificates ORDER BY certificate_id, thing_name")
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| Ok((r.try_get("certificate_id")?, r.try_get("thing_name")?)))
                .collect::<Result<Vec<_>, RegistryError>>()?;
            let thing_attributes = sqlx::query("SELECT name, attributes FROM things WHERE attributes <> '{}'")
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| {
                    let text: String = r.try_get("attributes")?;
                    let attributes = serde_json::from_str(&text).map_err(|e| RegistryError::Invalid(format!("stored attributes: {e}")))?;
                    Ok((r.try_get("name")?, attributes))
                })
                .collect::<Result<Vec<_>, RegistryError>>()?;
            let ca_of = sqlx::query("SELECT id, ca_id FROM certificates WHERE ca_id IN (SELECT target FROM policy_attachments WHERE target_type = 'ca')")
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| Ok((r.try_get("id")?, r.try_get("ca_id")?)))
                .collect::<Result<Vec<_>, RegistryError>>()?;
            Ok(PolicyState { policies, attachments, things_of, thing_attributes, ca_of })
        })
    }

    /// The target, normalized, if it exists.
    async fn existing_target(&self, target: &PolicyTarget) -> Result<PolicyTarget, RegistryError> {
        let target = normalized_target(target)?;
        match target.target_type {
            TargetType::Certificate => {
                self.certificate(&CertId::from_str(&target.target)?).await?;
            }
            TargetType::Ca => {
                self.ca(&CertId::from_str(&target.target)?).await?;
            }
            TargetType::Thing => {
                self.thing(&target.target).await?;
            }
            TargetType::Domain => {
                self.domain(&target.target).await?;
            }
        }
        Ok(target)
    }
}

/// Lower-cases ids and hostnames.
fn normalized_target(target: &PolicyTarget) -> Result<PolicyTarget, RegistryError> {
    let text = match target.target_type {
        TargetType::Certificate | TargetType::Ca => CertId::from_str(&target.target)?.to_string(),
        TargetType::Domain => target.target.to_ascii_lowercase(),
        TargetType::Thing => target.target.clone(),
    };
    Ok(PolicyTarget {
        target_type: target.target_type,
        target: text,
    })
}

fn target_from_row<R: Row>(row: &R) -> Result<PolicyTarget, RegistryError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let kind: String = row.try_get("target_type")?;
    Ok(PolicyTarget {
        target_type: TargetType::from_str(&kind)?,
        target: row.try_get("target")?,
    })
}
