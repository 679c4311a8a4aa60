//! The Portcullis registry: registered CAs and certificates with statuses, things, policies,
//! truststores, domains, webhooks and the audit log, kept in SQLite (the default, one file in the
//! data dir) or PostgreSQL.
//!
//! - [`model`]: records and statuses; ids are the SHA-256 of the DER.
//! - [`audit`]: every audit action and what a change recorded with it affects (the gateway's
//!   snapshot, its configuration, webhook events).
//! - [`store`]: the [`Store`], one implementation over both backends (the same SQL, `$n`
//!   placeholders), with per-backend migrations applied at open.
//! - [`provisioning`]: just-in-time provisioning templates; [`fleet`]: fleet provisioning
//!   templates (provisioning by claim).
//! - [`webhooks`]: delivery of events to subscribers.
//!
//! Invariants:
//! - Every change runs in a transaction, bumps the row's version and writes its audit entry in
//!   the same transaction: nothing acknowledged is unrecorded, nothing recorded is unapplied.
//! - The gateway never reads the store: the node keeps an in-memory snapshot current (from the
//!   audit log's changes) and hands it to the gateway.
//! - Private keys are never stored; admin API tokens only as hashes.
#![forbid(unsafe_code)]

pub mod audit;
pub mod domain_spec;
pub mod fleet;
pub mod model;
mod names;
pub mod provisioning;
pub mod sealed;
pub mod store;
pub mod webhooks;

pub use audit::{AuditAction, Effects};
pub use domain_spec::{
    AcmeSpec, DomainSpec, LETS_ENCRYPT_DIRECTORY, MappingSpec, MqttSpec, MtlsSpec,
};
pub use model::{
    AdminCertRecord, Attachment, AuditEntry, CaRecord, CaStatus, CertId, CertRecord, CertStatus,
    DomainRecord, PolicyRecord, PolicyTarget, PolicyVersion, ServerCertRecord, TargetType, Thing,
    TokenRecord, TruststoreVersion,
};
pub use provisioning::{Provisioned, ProvisioningTemplate};
pub use store::{
    AuditFilter, CaRegistration, CaUpdate, CertFilter, Change, ChangeEntry, ChangeListener,
    Delivery, DueDelivery, EVENT_TYPES, MAX_ATTEMPTS, MAX_POLICY_VERSIONS, NewWebhook, NodeStatus,
    PolicyState, PolicySummary, Sighting, Store, Webhook, WebhookUpdate,
};
pub use store::{FetchedCrl, MAX_FETCHED_CRL_BYTES};
pub use store::{
    FleetTemplateRecord, FleetTemplateUpdate, OWNERSHIP_TOKEN_SECONDS, REVOCATION_REASONS,
    RenewalTerms, revocation_reason_code,
};

/// A time (seconds since the epoch) as RFC 3339, for messages.
pub(crate) fn rfc3339_of(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Errors of the registry.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request is malformed or not allowed (a caller's mistake).
    #[error("{0}")]
    Invalid(String),
    /// The item does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The item exists already, or changed since it was read.
    #[error("{0}")]
    Conflict(String),
    /// A certificate or key could not be used.
    #[error(transparent)]
    Pki(#[from] portcullis_pki::PkiError),
    /// The database failed (ours, not the caller's).
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed at open.
    #[error("database migration: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
}

impl RegistryError {
    /// Whether the database could not be reached (rather than refusing the request): the
    /// connection failed, timed out, or the server is shutting down or starting.
    pub fn is_unavailable(&self) -> bool {
        match self {
            RegistryError::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => db.code().is_some_and(|c| {
                    // 08: connection exceptions; 57P0x: shutdown, crash, cannot connect now.
                    c.starts_with("08") || c.starts_with("57P")
                }),
                _ => false,
            },
            _ => false,
        }
    }
}
