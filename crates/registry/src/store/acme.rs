//! ACME for server certificates, shared by the nodes: the cluster's account on each directory
//! (credentials sealed by the caller under the cluster key), the challenge answers every node
//! serves while an order is being validated (published as a configuration change, so each
//! node's gateway picks them up with its next configuration), and leases that let one node at a
//! time order a domain's certificate for the whole cluster.

use sqlx::Row;

use super::{Store, audit, changes::now_ms, now, with_pool};
use crate::RegistryError;
use crate::audit::AuditAction;

/// A challenge answer to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeChallenge {
    /// The ACME token (the HTTP-01 path's last segment).
    pub token: String,
    /// The name being validated.
    pub hostname: String,
    /// `http-01` or `tls-alpn-01`.
    pub kind: String,
    /// The key authorization (token.thumbprint).
    pub key_authorization: String,
    /// When the answer is withdrawn even if the order never finishes (ms since the epoch).
    pub expires_ms: i64,
}

impl Store {
    /// The sealed credentials of the cluster's account on `directory`, if one was made.
    pub async fn acme_account(&self, directory: &str) -> Result<Option<String>, RegistryError> {
        with_pool!(self, pool => {
            Ok(sqlx::query_scalar("SELECT sealed_credentials FROM acme_accounts WHERE directory = $1")
                .bind(directory)
                .fetch_optional(pool)
                .await?)
        })
    }

    /// Records the account on `directory` unless one is recorded (the first node wins); the
    /// sealed credentials in effect.
    pub async fn init_acme_account(
        &self,
        directory: &str,
        sealed_credentials: &str,
    ) -> Result<String, RegistryError> {
        with_pool!(self, pool => {
            sqlx::query("INSERT INTO acme_accounts (directory, sealed_credentials, created_at) VALUES ($1, $2, $3) ON CONFLICT (directory) DO NOTHING")
                .bind(directory)
                .bind(sealed_credentials)
                .bind(now())
                .execute(pool)
                .await?;
            Ok::<(), RegistryError>(())
        })?;
        self.acme_account(directory).await?.ok_or_else(|| {
            RegistryError::Invalid(format!("the ACME account on {directory} was not recorded"))
        })
    }

    /// Publishes challenge answers (replacing any with the same token) for every node to
    /// serve; one audited configuration change.
    pub async fn put_acme_challenges(
        &self,
        challenges: &[AcmeChallenge],
        actor: &str,
    ) -> Result<(), RegistryError> {
        let Some(first) = challenges.first() else {
            return Ok(());
        };
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            // A name has one pending answer: an order abandoned by a node that died (and took
            // its lease back after a restart) leaves none behind to be served instead.
            for c in challenges {
                sqlx::query("DELETE FROM acme_challenges WHERE hostname = $1 AND kind = $2")
                    .bind(&c.hostname)
                    .bind(&c.kind)
                    .execute(&mut *tx)
                    .await?;
            }
            for c in challenges {
                sqlx::query("INSERT INTO acme_challenges (token, hostname, kind, key_authorization, expires_ms) VALUES ($1, $2, $3, $4, $5) \
                             ON CONFLICT (token) DO UPDATE SET hostname = $2, kind = $3, key_authorization = $4, expires_ms = $5")
                    .bind(&c.token)
                    .bind(&c.hostname)
                    .bind(&c.kind)
                    .bind(&c.key_authorization)
                    .bind(c.expires_ms)
                    .execute(&mut *tx)
                    .await?;
            }
            let after = serde_json::json!({"published": challenges.iter().map(|c| serde_json::json!({"hostname": c.hostname, "type": c.kind})).collect::<Vec<_>>()}).to_string();
            audit(&mut *tx, actor, AuditAction::AcmeChallenge, &first.hostname, None, Some(&after)).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Withdraws the answers of `tokens` (and every expired one); one audited configuration
    /// change when something was withdrawn.
    pub async fn clear_acme_challenges(
        &self,
        hostname: &str,
        tokens: &[String],
        actor: &str,
    ) -> Result<(), RegistryError> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let mut removed = 0;
            for token in tokens {
                removed += sqlx::query("DELETE FROM acme_challenges WHERE token = $1")
                    .bind(token)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            removed += sqlx::query("DELETE FROM acme_challenges WHERE expires_ms < $1")
                .bind(now_ms())
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if removed > 0 {
                let before = serde_json::json!({"withdrawn": removed}).to_string();
                audit(&mut *tx, actor, AuditAction::AcmeChallenge, hostname, Some(&before), None).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// The challenge answers to serve now (unexpired), by token.
    pub async fn acme_challenges(&self) -> Result<Vec<AcmeChallenge>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT * FROM acme_challenges WHERE expires_ms >= $1 ORDER BY token")
                .bind(now_ms())
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(AcmeChallenge {
                        token: r.try_get("token")?,
                        hostname: r.try_get("hostname")?,
                        kind: r.try_get("kind")?,
                        key_authorization: r.try_get("key_authorization")?,
                        expires_ms: r.try_get("expires_ms")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(Into::into)
        })
    }

    /// Takes lease `name` for `holder` for `ttl_ms` when it is free, expired or already
    /// `holder`'s (then extended); whether `holder` has it now.
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: i64,
    ) -> Result<bool, RegistryError> {
        let at = now_ms();
        with_pool!(self, pool => {
            let done = sqlx::query("INSERT INTO leases (name, holder, expires_ms) VALUES ($1, $2, $3) \
                                    ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms \
                                    WHERE leases.expires_ms < $4 OR leases.holder = excluded.holder")
                .bind(name)
                .bind(holder)
                .bind(at.saturating_add(ttl_ms))
                .bind(at)
                .execute(pool)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Gives lease `name` back if `holder` has it.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), RegistryError> {
        with_pool!(self, pool => {
            sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
                .bind(name)
                .bind(holder)
                .execute(pool)
                .await?;
            Ok(())
        })
    }
}
