//! The registry's records and their statuses.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

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
