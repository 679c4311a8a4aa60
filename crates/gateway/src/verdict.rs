//! The verdict on one connection's client certificate: what the handshake decided, carried by
//! the connection and read by routing, identity headers, logs and pages.

use std::sync::Arc;

use portcullis_pki::{Certificate, RejectReason};

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
        reason: RejectReason,
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

    /// The leaf certificate, verified or not.
    pub fn leaf(&self) -> Option<&Certificate> {
        match self {
            ClientVerdict::None => None,
            ClientVerdict::Valid(chain) => chain.first(),
            ClientVerdict::Rejected { leaf, .. } => leaf.as_deref(),
        }
    }
}
