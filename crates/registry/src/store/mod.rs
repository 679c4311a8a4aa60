//! The store: one implementation over SQLite and PostgreSQL.
//!
//! The SQL is written once with `$n` placeholders (SQLite accepts them too) and run on either
//! pool by [`with_pool!`]. Changes run in a transaction: read the row, check the rule, write it with
//! `version = version + 1 WHERE version = <read>`, append an audit entry, commit. A concurrent
//! writer that changed the row in between makes the update match nothing, and the change is
//! retried on the fresh row, so no update is lost.
//!
//! One file per entity, each an `impl Store` block: `cas`, `certificates`, `things` (with
//! attachments, JIT provisioning and sightings), `policies`, `truststores`, `fleet` (fleet provisioning: templates, claims, ownership tokens), `cluster` (server certificates with sealed keys, the cluster's CAs and key check, node heartbeats), `webhooks` (with
//! deliveries), `admin` (tokens, admin certificates, domains, the audit log's reads);
//! `changes` is the audit log as the change feed (every write's audit entry and webhook
//! event, the markers and notifications nodes follow). This file opens the database.

use std::path::Path;
use std::time::Duration;

use portcullis_pki::Certificate;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::RegistryError;
use crate::model::CertId;

mod acme;
mod admin;
mod cas;
mod certificates;
mod changes;
mod cluster;
mod fetched;
mod fleet;
mod policies;
pub use cluster::NodeStatus;
mod things;
mod truststores;
pub(crate) mod webhooks;

pub use acme::AcmeChallenge;
pub use admin::AuditFilter;
pub use cas::{CaRegistration, CaUpdate};
pub(crate) use certificates::summary_cert;
pub use certificates::{CertFilter, REVOCATION_REASONS, revocation_reason_code};
pub(crate) use changes::audit;
pub use changes::{Change, ChangeEntry, ChangeListener, now_ms};
pub use fetched::{FetchedCrl, MAX_FETCHED_CRL_BYTES};
pub use fleet::{
    FleetTemplateRecord, FleetTemplateUpdate, OWNERSHIP_TOKEN_SECONDS, RenewalCounts, RenewalTerms,
};
pub use policies::{MAX_POLICY_VERSIONS, PolicyState, PolicySummary};
pub use things::Sighting;
pub use webhooks::{
    Delivery, DueDelivery, EVENT_TYPES, MAX_ATTEMPTS, NewWebhook, Webhook, WebhookUpdate,
};

/// A registry store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    /// Seals the secrets this store keeps for others (webhook signing secrets) when the
    /// cluster key is given ([`Store::seal_secrets_with`]); shared by every clone.
    sealer: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<crate::sealed::ClusterKey>>>,
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
        Ok(Store {
            pool,
            sealer: Default::default(),
        })
    }

    /// From now on, secrets kept for others (webhook signing secrets) are sealed with `key`,
    /// and those kept in clear so far are sealed now; a store without it keeps them as they
    /// are (a single node's SQLite file, 0600).
    pub async fn seal_secrets_with(
        &self,
        key: std::sync::Arc<crate::sealed::ClusterKey>,
    ) -> Result<u64, RegistryError> {
        let _ = self.sealer.set(key);
        self.seal_clear_webhook_secrets().await
    }

    /// `stored` as kept (sealed, or in clear from before) opened for the record `context`.
    pub(crate) fn open_secret(
        &self,
        stored: String,
        context: &str,
    ) -> Result<String, RegistryError> {
        if !crate::sealed::is_sealed(&stored) {
            return Ok(stored);
        }
        let key = self.sealer.get().ok_or_else(|| {
            RegistryError::Invalid(format!(
                "{context} is sealed with the cluster key and this node has none: set cluster_key_file"
            ))
        })?;
        String::from_utf8(key.open(&stored, context)?)
            .map_err(|_| RegistryError::Invalid(format!("{context} is not text")))
    }

    /// `secret` as it is kept for the record `context`: sealed when the store has the key.
    pub(crate) fn keep_secret(&self, secret: &str, context: &str) -> Result<String, RegistryError> {
        match self.sealer.get() {
            Some(key) => key.seal(secret.as_bytes(), context),
            None => Ok(secret.to_string()),
        }
    }

    /// The backend's name: `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
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
