//! The verdict on one connection's client certificate: what the handshake decided, carried by
//! the connection and read by routing, identity headers, logs and pages; and why a certificate
//! is refused, by its chain (the pki crate's reasons) or by the registry.

use std::sync::Arc;

use portcullis_pki::{Certificate, RejectReason, TlsAlert};

use crate::registry_view::RegistryReason;

/// Why a presented certificate is refused: its chain (truststore, CRLs, profile) or the
/// registry (status, just-in-time provisioning, an ambiguous subject).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// The pki crate's verification refused the chain.
    Chain(RejectReason),
    /// The registry refused a certificate whose chain verified.
    Registry(RegistryReason),
    /// Expired, within its template's grace period: admitted to renew itself (EST
    /// `simplereenroll`, MQTT's renewal topics) and nothing else. The handshake completes.
    RenewOnly,
    /// The domain's revocation policy needs the certificate's status from another CA's CRL or
    /// OCSP responder, and it is not known (being fetched, or the source fails).
    RevocationUnknown,
}

impl Rejection {
    /// The stable code (`expired`, `unregistered`…), as logs, headers and pages give it.
    pub fn code(self) -> &'static str {
        match self {
            Rejection::Chain(r) => r.code(),
            Rejection::Registry(r) => r.code(),
            Rejection::RenewOnly => "renew-only",
            Rejection::RevocationUnknown => "revocation-unknown",
        }
    }

    /// The TLS alert a handshake refused for this reason ends with.
    pub fn tls_alert(self) -> TlsAlert {
        match self {
            Rejection::Chain(r) => r.tls_alert(),
            Rejection::Registry(r) => r.tls_alert(),
            // Never sent: a certificate in grace completes its handshake.
            Rejection::RenewOnly => TlsAlert::CertificateExpired,
            Rejection::RevocationUnknown => TlsAlert::AccessDenied,
        }
    }
}

impl From<RejectReason> for Rejection {
    fn from(r: RejectReason) -> Self {
        Rejection::Chain(r)
    }
}

impl From<crate::foreign::Refusal> for Rejection {
    fn from(r: crate::foreign::Refusal) -> Self {
        match r {
            crate::foreign::Refusal::Revoked => Rejection::Chain(RejectReason::Revoked),
            crate::foreign::Refusal::CrlExpired => Rejection::Chain(RejectReason::CrlExpired),
            crate::foreign::Refusal::Unknown => Rejection::RevocationUnknown,
        }
    }
}

impl From<RegistryReason> for Rejection {
    fn from(r: RegistryReason) -> Self {
        Rejection::Registry(r)
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

/// The verdict on one connection's client certificate.
#[derive(Debug, Clone)]
pub enum ClientVerdict {
    /// No certificate was presented.
    None,
    /// Verified; the chain runs from the leaf to the trust anchor.
    Valid(Arc<Vec<Certificate>>),
    /// Presented and rejected.
    Rejected {
        /// The presented leaf, when it could be parsed.
        leaf: Option<Box<Certificate>>,
        /// Why.
        reason: Rejection,
        /// A sentence for logs and pages.
        explanation: String,
    },
}

impl ClientVerdict {
    /// The `X-Client-Cert-Verify` value: `SUCCESS`, `NONE` or `FAILED:<reason>`.
    pub fn status(&self) -> String {
        match self {
            ClientVerdict::None => "NONE".into(),
            ClientVerdict::Valid(_) => "SUCCESS".into(),
            ClientVerdict::Rejected { reason, .. } => format!("FAILED:{}", reason.code()),
        }
    }

    /// The leaf of a certificate admitted to renew itself only (expired, in its grace period).
    pub fn renew_only(&self) -> Option<&Certificate> {
        match self {
            ClientVerdict::Rejected {
                reason: Rejection::RenewOnly,
                leaf,
                ..
            } => leaf.as_deref(),
            _ => None,
        }
    }

    /// The leaf certificate, verified or not.
    pub fn leaf(&self) -> Option<&Certificate> {
        match self {
            ClientVerdict::None => None,
            ClientVerdict::Valid(chain) => chain.first(),
            ClientVerdict::Rejected { leaf, .. } => leaf.as_deref(),
        }
    }
}
