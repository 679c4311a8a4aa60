//! The registry's records and their statuses.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::RegistryError;

/// A certificate's (or CA's) id: SHA-256 of its DER, 64 lower-case hex characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct CertId(String);

impl CertId {
    /// The id of a DER certificate.
    pub fn of_der(der: &[u8]) -> CertId {
        CertId(portcullis_pki::cert::hex(
            &portcullis_pki::cert::sha256(der),
            "",
        ))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CertId {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, RegistryError> {
        if s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(CertId(s.to_string()))
        } else {
            Err(RegistryError::Invalid(format!(
                "'{s}' is not a certificate id (64 lower-case hex characters, the SHA-256 of the DER)"
            )))
        }
    }
}

impl fmt::Display for CertId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A registered certificate's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CertStatus {
    /// May authenticate.
    Active,
    /// May not authenticate; may be activated again.
    Inactive,
    /// Permanently refused.
    Revoked,
    /// Registered just in time, waiting for an operator.
    PendingActivation,
}

impl CertStatus {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            CertStatus::Active => "ACTIVE",
            CertStatus::Inactive => "INACTIVE",
            CertStatus::Revoked => "REVOKED",
            CertStatus::PendingActivation => "PENDING_ACTIVATION",
        }
    }
}

impl FromStr for CertStatus {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, RegistryError> {
        match s.to_ascii_uppercase().as_str() {
            "ACTIVE" => Ok(CertStatus::Active),
            "INACTIVE" => Ok(CertStatus::Inactive),
            "REVOKED" => Ok(CertStatus::Revoked),
            "PENDING_ACTIVATION" => Ok(CertStatus::PendingActivation),
            _ => Err(RegistryError::Invalid(format!(
                "status '{s}' must be ACTIVE, INACTIVE, REVOKED or PENDING_ACTIVATION"
            ))),
        }
    }
}

/// A registered CA's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CaStatus {
    /// Certificates it issued may be registered just in time.
    Active,
    /// No new registrations through it.
    Inactive,
}

impl CaStatus {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            CaStatus::Active => "ACTIVE",
            CaStatus::Inactive => "INACTIVE",
        }
    }
}

impl FromStr for CaStatus {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, RegistryError> {
        match s.to_ascii_uppercase().as_str() {
            "ACTIVE" => Ok(CaStatus::Active),
            "INACTIVE" => Ok(CaStatus::Inactive),
            _ => Err(RegistryError::Invalid(format!(
                "CA status '{s}' must be ACTIVE or INACTIVE"
            ))),
        }
    }
}

/// A registered CA.
#[derive(Debug, Clone, Serialize)]
pub struct CaRecord {
    /// The provisioning template (JITP), when certificates it issues are provisioned as things
    /// at their first connection.
    pub provisioning_template: Option<crate::provisioning::ProvisioningTemplate>,
    /// SHA-256 of the DER.
    pub id: CertId,
    /// RFC 4514 subject.
    pub subject: String,
    /// Status.
    pub status: CaStatus,
    /// Whether certificates it issued are registered just in time.
    pub auto_registration: bool,
    /// Whether it was registered with proof of possession.
    pub verified: bool,
    /// A claim CA: every certificate it issues may only provision devices under these
    /// fleet provisioning templates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim_templates: Option<Vec<String>>,
    /// notAfter, seconds since the epoch.
    pub not_after: i64,
    /// When it was registered.
    pub created_at: i64,
    /// When it last changed.
    pub updated_at: i64,
    /// Incremented on every change.
    pub version: i64,
    /// The certificate, PEM.
    pub pem: String,
}

/// A registered certificate.
#[derive(Debug, Clone, Serialize)]
pub struct CertRecord {
    /// SHA-256 of the DER.
    pub id: CertId,
    /// RFC 4514 subject.
    pub subject: String,
    /// RFC 4514 issuer.
    pub issuer: String,
    /// Serial, colon hex.
    pub serial: String,
    /// The registered CA that issued it, if any.
    pub ca_id: Option<CertId>,
    /// Status.
    pub status: CertStatus,
    /// notAfter, seconds since the epoch.
    pub not_after: i64,
    /// When it was registered.
    pub created_at: i64,
    /// When it last changed.
    pub updated_at: i64,
    /// When a gateway last saw it, if ever.
    pub last_seen: Option<i64>,
    /// The things it is attached to.
    pub things: Vec<String>,
    /// A claim certificate: the fleet provisioning templates it may use, and nothing else.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim_templates: Option<Vec<String>>,
    /// Incremented on every change.
    pub version: i64,
    /// The certificate, PEM.
    pub pem: String,
}

/// One audit-log entry.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    /// Sequence number.
    pub seq: i64,
    /// When.
    pub at: i64,
    /// Who (an admin identity, `gateway`, `system`).
    pub actor: String,
    /// What (`ca.register`, `certificate.status`…).
    pub action: String,
    /// On what (an id).
    pub target: String,
    /// JSON before the change.
    pub before: Option<String>,
    /// JSON after the change.
    pub after: Option<String>,
}

/// A thing: a device or workload that certificates are attached to.
#[derive(Debug, Clone, Serialize)]
pub struct Thing {
    /// Unique name: 1–128 of `A-Z a-z 0-9 : _ - .`.
    pub name: String,
    /// Free-form string attributes.
    pub attributes: std::collections::BTreeMap<String, String>,
    /// Attached certificates.
    pub certificates: Vec<Attachment>,
    /// When it was created.
    pub created_at: i64,
    /// When it last changed.
    pub updated_at: i64,
    /// Incremented on every change.
    pub version: i64,
}

/// A certificate attached to a thing.
#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    /// The certificate.
    pub certificate_id: CertId,
    /// Whether the certificate may be attached to this thing only.
    pub exclusive: bool,
}

/// One immutable version of a named truststore.
#[derive(Debug, Clone, Serialize)]
pub struct TruststoreVersion {
    /// The truststore's name.
    pub name: String,
    /// 1, 2, 3… in order of creation.
    pub version: i64,
    /// The CA bundle, PEM.
    pub bundle: String,
    /// CRLs, PEM each.
    pub crls: Vec<String>,
    /// The pki lint warnings of the bundle when it was stored.
    pub warnings: Vec<String>,
    /// When it was stored.
    pub created_at: i64,
}

/// An admin client certificate the registry knows: one a rotation issued, or one revoked.
#[derive(Debug, Clone, Serialize)]
pub struct AdminCertRecord {
    /// SHA-256 of the DER, 64 hex.
    pub id: String,
    /// Subject, RFC 4514.
    pub subject: String,
    /// notAfter, unix seconds.
    pub not_after: i64,
    /// `ACTIVE` or `REVOKED`.
    pub status: String,
    /// When the registry learnt of it.
    pub created_at: i64,
    /// When it was revoked.
    pub revoked_at: Option<i64>,
}

/// An admin API token (the secret itself is never stored).
#[derive(Debug, Clone, Serialize)]
pub struct TokenRecord {
    /// Short public id, used to delete it.
    pub id: String,
    /// Who or what it is for.
    pub name: String,
    /// When it was made.
    pub created_at: i64,
    /// When it was last used, if ever.
    pub last_used: Option<i64>,
}

/// A server certificate kept in the registry: its chain, and its key sealed under the cluster
/// key (never serialized).
#[derive(Debug, Clone, Serialize)]
pub struct ServerCertRecord {
    /// Its name (`certificate = "registry:NAME"`).
    pub name: String,
    /// The leaf's subject.
    pub subject: String,
    /// The leaf's notAfter (seconds since the epoch).
    pub not_after: i64,
    /// The chain, leaf first, PEM.
    pub chain_pem: String,
    /// The private key, sealed for `server-certificate:NAME`.
    #[serde(skip)]
    pub sealed_key: String,
    /// When it was imported.
    pub created_at: i64,
    /// When it was last replaced.
    pub updated_at: i64,
    /// Incremented on every replacement.
    pub version: i64,
}

impl ServerCertRecord {
    /// What its key is sealed for: the associated data of [`crate::sealed::ClusterKey::seal`].
    pub fn seal_context(name: &str) -> String {
        format!("server-certificate:{name}")
    }
}

/// A domain managed in the registry: the configuration file's `[[domain]]` table, typed.
#[derive(Debug, Clone, Serialize)]
pub struct DomainRecord {
    /// The hostname (or `*.suffix`).
    pub hostname: String,
    /// The domain's settings, as the configuration file spells them.
    pub spec: crate::domain_spec::DomainSpec,
    /// When it was created.
    pub created_at: i64,
    /// When it last changed.
    pub updated_at: i64,
    /// Incremented on every change.
    pub version: i64,
}

pub use crate::names::check_name;

/// What a policy is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetType {
    /// A certificate (by id).
    Certificate,
    /// A thing (by name): applies to the certificates attached to it.
    Thing,
    /// A registered CA (by id): applies to the certificates registered with it.
    Ca,
    /// A domain (by hostname): applies to every request on it.
    Domain,
}

impl TargetType {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetType::Certificate => "certificate",
            TargetType::Thing => "thing",
            TargetType::Ca => "ca",
            TargetType::Domain => "domain",
        }
    }
}

impl std::str::FromStr for TargetType {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "certificate" => Ok(TargetType::Certificate),
            "thing" => Ok(TargetType::Thing),
            "ca" => Ok(TargetType::Ca),
            "domain" => Ok(TargetType::Domain),
            other => Err(RegistryError::Invalid(format!(
                "target type '{other}' must be certificate, thing, ca or domain"
            ))),
        }
    }
}

/// A policy target.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyTarget {
    /// What kind of item.
    #[serde(rename = "type")]
    pub target_type: TargetType,
    /// Its id or name.
    pub target: String,
}

/// One version of a policy.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyVersion {
    /// The version number (never reused).
    pub version: i64,
    /// Whether it is the one in effect.
    pub is_default: bool,
    /// When it was made.
    pub created_at: i64,
}

/// A policy: its versions, one document, and where it is attached.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRecord {
    /// Unique name: 1–128 of `A-Z a-z 0-9 : _ - .`.
    pub name: String,
    /// The version in effect.
    pub default_version: i64,
    /// Every kept version (at most five), oldest first.
    pub versions: Vec<PolicyVersion>,
    /// The version `document` is (the default unless another was asked for).
    pub version: i64,
    /// The document of `version`.
    pub document: serde_json::Value,
    /// Where it is attached.
    pub targets: Vec<PolicyTarget>,
    /// When it was created.
    pub created_at: i64,
    /// When it last changed.
    pub updated_at: i64,
    /// Incremented on every change of the policy (conditional writes).
    pub revision: i64,
}
