//! What the nodes of a cluster share: server certificates kept in the registry (chain, and the
//! key sealed under the cluster key), the cluster's CAs, the cluster key's check value, and each
//! node's heartbeat.

use portcullis_pki::Certificate;
use sqlx::Row;

use super::{Store, audit, now, with_pool};
use crate::RegistryError;
use crate::audit::AuditAction;
use crate::model::{ServerCertRecord, check_name};

/// The largest chain stored (bytes of PEM).
const MAX_CHAIN_BYTES: usize = 256 * 1024;

impl Store {
    /// Imports server certificate `name`, or replaces it (a renewal): `chain_pem` leaf first, the
    /// key already sealed for [`ServerCertRecord::seal_context`] by the caller, which holds the
    /// cluster key and checked that the key matches the leaf.
    pub async fn put_server_certificate(
        &self,
        name: &str,
        chain_pem: &str,
        sealed_key: &str,
        actor: &str,
    ) -> Result<ServerCertRecord, RegistryError> {
        check_name("server certificate", name)?;
        if chain_pem.len() > MAX_CHAIN_BYTES {
            return Err(RegistryError::Invalid(
                "the certificate chain exceeds 256 KiB".into(),
            ));
        }
        let chain = Certificate::all_from_pem_or_der(chain_pem.as_bytes())?;
        let Some(leaf) = chain.first() else {
            return Err(RegistryError::Invalid(
                "the certificate chain holds no certificate".into(),
            ));
        };
        let (subject, not_after) = (leaf.info().subject.clone(), leaf.info().not_after_unix());
        let at = now();
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let before: Option<(i64, String)> = sqlx::query_as("SELECT version, subject FROM server_certificates WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
            match &before {
                None => {
                    sqlx::query("INSERT INTO server_certificates (name, chain_pem, sealed_key, subject, not_after, created_at, updated_at, version) VALUES ($1, $2, $3, $4, $5, $6, $6, 1)")
                        .bind(name)
                        .bind(chain_pem)
                        .bind(sealed_key)
                        .bind(&subject)
                        .bind(not_after)
                        .bind(at)
                        .execute(&mut *tx)
                        .await?;
                }
                Some((version, _)) => {
                    let done = sqlx::query("UPDATE server_certificates SET chain_pem = $1, sealed_key = $2, subject = $3, not_after = $4, updated_at = $5, version = version + 1 WHERE name = $6 AND version = $7")
                        .bind(chain_pem)
                        .bind(sealed_key)
                        .bind(&subject)
                        .bind(not_after)
                        .bind(at)
                        .bind(name)
                        .bind(version)
                        .execute(&mut *tx)
                        .await?;
                    if done.rows_affected() != 1 {
                        return Err(RegistryError::Conflict(format!(
                            "server certificate {name} changed meanwhile; retry"
                        )));
                    }
                }
            }
            let summary = |s: &str| serde_json::json!({"subject": s}).to_string();
            let after = serde_json::json!({"subject": subject, "not_after": not_after}).to_string();
            audit(&mut *tx, actor, AuditAction::ServerCertImport, name, before.as_ref().map(|(_, s)| summary(s)).as_deref(), Some(&after)).await?;
            tx.commit().await?;
            Ok::<(), RegistryError>(())
        })?;
        self.server_certificate(name).await
    }

    /// A server certificate.
    pub async fn server_certificate(&self, name: &str) -> Result<ServerCertRecord, RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT * FROM server_certificates WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await?
                .ok_or_else(|| RegistryError::NotFound(format!("server certificate {name}")))?;
            server_cert_from_row(&row)
        })
    }

    /// Every server certificate, by name.
    pub async fn list_server_certificates(&self) -> Result<Vec<ServerCertRecord>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT * FROM server_certificates ORDER BY name").fetch_all(pool).await?;
            rows.iter().map(server_cert_from_row).collect()
        })
    }

    /// Deletes a server certificate (the caller checked that no domain uses it).
    pub async fn delete_server_certificate(
        &self,
        name: &str,
        actor: &str,
    ) -> Result<(), RegistryError> {
        with_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let done = sqlx::query("DELETE FROM server_certificates WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(RegistryError::NotFound(format!("server certificate {name}")));
            }
            audit(&mut *tx, actor, AuditAction::ServerCertDelete, name, None, None).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// The cluster key's check value (a constant sealed with it), once a node with a cluster
    /// key has started; nodes compare their key against it.
    pub async fn cluster_key_check(&self) -> Result<Option<String>, RegistryError> {
        with_pool!(self, pool => {
            Ok(sqlx::query_scalar("SELECT value FROM registry_meta WHERE key = 'cluster_key_check'")
                .fetch_optional(pool)
                .await?)
        })
    }

    /// Records the cluster key's check value unless one is recorded; the value in effect.
    pub async fn init_cluster_key_check(&self, value: &str) -> Result<String, RegistryError> {
        with_pool!(self, pool => {
            sqlx::query("INSERT INTO registry_meta (key, value) VALUES ('cluster_key_check', $1) ON CONFLICT (key) DO NOTHING")
                .bind(value)
                .execute(pool)
                .await?;
            Ok::<(), RegistryError>(())
        })?;
        self.cluster_key_check()
            .await?
            .ok_or_else(|| RegistryError::Invalid("the cluster key check was not recorded".into()))
    }
}

impl Store {
    /// A CA the cluster shares (`local`…): its certificate PEM and its key sealed for
    /// `cluster-ca:NAME`.
    pub async fn cluster_ca(&self, name: &str) -> Result<Option<(String, String)>, RegistryError> {
        with_pool!(self, pool => {
            Ok(sqlx::query_as("SELECT cert_pem, sealed_key FROM cluster_cas WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await?)
        })
    }

    /// Records a shared CA unless one is recorded under `name` (the first node wins); the one in
    /// effect.
    pub async fn init_cluster_ca(
        &self,
        name: &str,
        cert_pem: &str,
        sealed_key: &str,
    ) -> Result<(String, String), RegistryError> {
        with_pool!(self, pool => {
            sqlx::query("INSERT INTO cluster_cas (name, cert_pem, sealed_key, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING")
                .bind(name)
                .bind(cert_pem)
                .bind(sealed_key)
                .bind(now())
                .execute(pool)
                .await?;
            Ok::<(), RegistryError>(())
        })?;
        self.cluster_ca(name).await?.ok_or_else(|| {
            RegistryError::Invalid(format!("the cluster CA {name} was not recorded"))
        })
    }

    /// Replaces the shared entry `name` if it is still `old_cert_pem` (a node renewing it; the
    /// first to renew wins); the one in effect.
    pub async fn replace_cluster_ca(
        &self,
        name: &str,
        old_cert_pem: &str,
        cert_pem: &str,
        sealed_key: &str,
    ) -> Result<(String, String), RegistryError> {
        with_pool!(self, pool => {
            sqlx::query("UPDATE cluster_cas SET cert_pem = $3, sealed_key = $4, created_at = $5 WHERE name = $1 AND cert_pem = $2")
                .bind(name)
                .bind(old_cert_pem)
                .bind(cert_pem)
                .bind(sealed_key)
                .bind(now())
                .execute(pool)
                .await?;
            Ok::<(), RegistryError>(())
        })?;
        self.cluster_ca(name).await?.ok_or_else(|| {
            RegistryError::Invalid(format!("the cluster CA {name} was not recorded"))
        })
    }
}

fn server_cert_from_row<R: Row>(row: &R) -> Result<ServerCertRecord, RegistryError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    Ok(ServerCertRecord {
        name: row.try_get("name")?,
        subject: row.try_get("subject")?,
        not_after: row.try_get("not_after")?,
        chain_pem: row.try_get("chain_pem")?,
        sealed_key: row.try_get("sealed_key")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
    })
}

/// A node's heartbeat: what `portcullis cluster status` shows of it.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node's name (`node_name`, or host:admin port).
    pub id: String,
    /// Its Portcullis version.
    pub version: String,
    /// When it started (seconds since the epoch).
    pub started_at: i64,
    /// Its last heartbeat (milliseconds since the epoch).
    pub heartbeat_ms: i64,
    /// The audit sequence number its registry snapshot includes.
    pub snapshot_marker: i64,
    /// When it last checked the registry successfully (milliseconds since the epoch).
    pub snapshot_ms: i64,
    /// Its open HTTP connections.
    pub connections: i64,
    /// Its MQTT sessions.
    pub mqtt_sessions: i64,
    /// Its connection to NATS ("connected to NAME", "disconnected", "setting up JetStream");
    /// `None` without NATS.
    pub nats: Option<String>,
}

/// Nodes silent for this long are forgotten (milliseconds).
const FORGET_NODES_MS: i64 = 24 * 3600 * 1000;

impl Store {
    /// Records a node's heartbeat (not an audited change: it moves no marker), and forgets
    /// nodes silent for a day.
    pub async fn heartbeat(&self, node: &NodeStatus) -> Result<(), RegistryError> {
        with_pool!(self, pool => {
            sqlx::query("INSERT INTO cluster_nodes (id, version, started_at, heartbeat_ms, snapshot_marker, snapshot_ms, connections, mqtt_sessions, nats) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                         ON CONFLICT (id) DO UPDATE SET version = $2, started_at = $3, heartbeat_ms = $4, snapshot_marker = $5, snapshot_ms = $6, connections = $7, mqtt_sessions = $8, nats = $9")
                .bind(&node.id)
                .bind(&node.version)
                .bind(node.started_at)
                .bind(node.heartbeat_ms)
                .bind(node.snapshot_marker)
                .bind(node.snapshot_ms)
                .bind(node.connections)
                .bind(node.mqtt_sessions)
                .bind(&node.nats)
                .execute(pool)
                .await?;
            sqlx::query("DELETE FROM cluster_nodes WHERE heartbeat_ms < $1")
                .bind(node.heartbeat_ms - FORGET_NODES_MS)
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    /// The nodes that sent a heartbeat in the last day, by id.
    pub async fn cluster_nodes(&self) -> Result<Vec<NodeStatus>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT * FROM cluster_nodes ORDER BY id").fetch_all(pool).await?;
            rows.iter()
                .map(|r| {
                    Ok(NodeStatus {
                        id: r.try_get("id")?,
                        version: r.try_get("version")?,
                        started_at: r.try_get("started_at")?,
                        heartbeat_ms: r.try_get("heartbeat_ms")?,
                        snapshot_marker: r.try_get("snapshot_marker")?,
                        snapshot_ms: r.try_get("snapshot_ms")?,
                        connections: r.try_get("connections")?,
                        mqtt_sessions: r.try_get("mqtt_sessions")?,
                        nats: r.try_get("nats")?,
                    })
                })
                .collect()
        })
    }
}
