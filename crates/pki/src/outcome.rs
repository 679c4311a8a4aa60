//! What verification is asked and what it answers: options and profiles, verdicts, and the
//! stable rejection reasons with the TLS alert each one sends. Shared by `verify`, `legacy`,
//! `profile_check` and `truststore`, and depending on none of them.

use std::fmt;

use serde::Serialize;

use crate::cert::Certificate;
use crate::crl::Crl;

/// Most CA levels (root + intermediates) a chain may have by default, as API Gateway.
pub const DEFAULT_MAX_DEPTH: u8 = 4;

/// Why a certificate was rejected. The [`code`](RejectReason::code) is stable: scripts, metrics
/// labels, HTTP bodies and logs use it, so variants are only ever added. The registry's reasons
/// (`unregistered`, `inactive`, `provisioning-failed`, `ambiguous-subject`) share the code
/// namespace and live where the registry decision is made (the gateway's `RegistryReason`).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RejectReason {
    /// No certificate was presented.
    NoCertificate,
    /// A certificate in the chain is past its notAfter.
    Expired,
    /// A certificate in the chain is before its notBefore.
    NotYetValid,
    /// No chain leads to a trust anchor in the truststore.
    UntrustedIssuer,
    /// A signature in the chain does not verify.
    BadSignature,
    /// The certificate is not allowed for this use (EKU, key usage, or a CA used as a leaf).
    WrongUsage,
    /// A CRL lists the certificate or one of its issuers.
    Revoked,
    /// The chain has more CA levels than allowed, or breaks a path length constraint.
    ChainTooDeep,
    /// A name in the certificate falls outside a CA's name constraints.
    NameConstraints,
    /// A signature or key algorithm is not supported (SHA-1, MD5, DSA…).
    UnsupportedAlgorithm,
    /// The certificate or an extension is not valid DER or X.509.
    Malformed,
    /// A CRL for the chain is past its nextUpdate: its revocation status is unknown.
    CrlExpired,
    /// A CRL for the chain has a bad signature or unsupported features.
    CrlInvalid,
    /// The certificate is not valid for the expected name.
    NameMismatch,
    /// The key is too weak (RSA below 2048 bits, EC below P-256).
    WeakKey,
    /// An X.509 v1 certificate would act as an intermediate CA: a v1 certificate cannot say
    /// CA:FALSE, so no profile lets one issue (only a trusted self-signed v1 root may).
    V1Intermediate,
}

impl RejectReason {
    /// Every reason, in documentation order.
    pub const ALL: [RejectReason; 16] = [
        RejectReason::NoCertificate,
        RejectReason::Expired,
        RejectReason::NotYetValid,
        RejectReason::UntrustedIssuer,
        RejectReason::BadSignature,
        RejectReason::WrongUsage,
        RejectReason::Revoked,
        RejectReason::ChainTooDeep,
        RejectReason::NameConstraints,
        RejectReason::UnsupportedAlgorithm,
        RejectReason::Malformed,
        RejectReason::CrlExpired,
        RejectReason::CrlInvalid,
        RejectReason::NameMismatch,
        RejectReason::WeakKey,
        RejectReason::V1Intermediate,
    ];

    /// The stable code (`expired`, `untrusted-issuer`…).
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::NoCertificate => "no-certificate",
            RejectReason::Expired => "expired",
            RejectReason::NotYetValid => "not-yet-valid",
            RejectReason::UntrustedIssuer => "untrusted-issuer",
            RejectReason::BadSignature => "bad-signature",
            RejectReason::WrongUsage => "wrong-usage",
            RejectReason::Revoked => "revoked",
            RejectReason::ChainTooDeep => "chain-too-deep",
            RejectReason::NameConstraints => "name-constraints",
            RejectReason::UnsupportedAlgorithm => "unsupported-algorithm",
            RejectReason::Malformed => "malformed",
            RejectReason::CrlExpired => "crl-expired",
            RejectReason::CrlInvalid => "crl-invalid",
            RejectReason::NameMismatch => "name-mismatch",
            RejectReason::WeakKey => "weak-key",
            RejectReason::V1Intermediate => "v1-intermediate",
        }
    }

    /// The TLS alert a handshake refused for this reason ends with. Exhaustive: a new reason
    /// must choose its alert here.
    pub fn tls_alert(self) -> TlsAlert {
        match self {
            RejectReason::NoCertificate => TlsAlert::CertificateRequired,
            RejectReason::Expired | RejectReason::NotYetValid => TlsAlert::CertificateExpired,
            RejectReason::Revoked => TlsAlert::CertificateRevoked,
            RejectReason::UntrustedIssuer => TlsAlert::UnknownCa,
            RejectReason::BadSignature => TlsAlert::DecryptError,
            RejectReason::WrongUsage => TlsAlert::UnsupportedCertificate,
            RejectReason::Malformed => TlsAlert::BadCertificate,
            RejectReason::ChainTooDeep
            | RejectReason::NameConstraints
            | RejectReason::UnsupportedAlgorithm
            | RejectReason::CrlExpired
            | RejectReason::CrlInvalid
            | RejectReason::NameMismatch
            | RejectReason::WeakKey
            | RejectReason::V1Intermediate => TlsAlert::AccessDenied,
        }
    }

    /// Whose fault the rejection is, for operators: all of these are the client's side except a
    /// stale or broken CRL, which is the operator's.
    pub fn is_operator_side(self) -> bool {
        matches!(self, RejectReason::CrlExpired | RejectReason::CrlInvalid)
    }
}

/// A TLS alert that ends a refused handshake (RFC 8446 §6.2 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsAlert {
    /// `certificate_required`: no certificate was presented.
    CertificateRequired,
    /// `certificate_expired`: expired or not yet valid.
    CertificateExpired,
    /// `certificate_revoked`.
    CertificateRevoked,
    /// `unknown_ca`: no chain to a trusted CA.
    UnknownCa,
    /// `decrypt_error`: a signature does not verify.
    DecryptError,
    /// `unsupported_certificate`: not for this use.
    UnsupportedCertificate,
    /// `bad_certificate`: not valid X.509.
    BadCertificate,
    /// `access_denied`: valid, but refused by a rule (depth, algorithm, key, CRL, registry…).
    AccessDenied,
}

impl TlsAlert {
    /// The alert's name as RFC 8446 writes it (and openssl prints it, with spaces).
    pub fn name(self) -> &'static str {
        match self {
            TlsAlert::CertificateRequired => "certificate_required",
            TlsAlert::CertificateExpired => "certificate_expired",
            TlsAlert::CertificateRevoked => "certificate_revoked",
            TlsAlert::UnknownCa => "unknown_ca",
            TlsAlert::DecryptError => "decrypt_error",
            TlsAlert::UnsupportedCertificate => "unsupported_certificate",
            TlsAlert::BadCertificate => "bad_certificate",
            TlsAlert::AccessDenied => "access_denied",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// What the certificate is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Usage {
    /// TLS client authentication (EKU clientAuth).
    #[default]
    Client,
    /// TLS server authentication (EKU serverAuth).
    Server,
}

/// How strictly certificates are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerifyProfile {
    /// What OpenSSL (and so API Gateway, nginx, HAProxy) accepts, for the certificates users
    /// already have: an X.509 v1 self-signed certificate is a trust anchor; a presented
    /// certificate byte-identical to a truststore certificate (a pinned partner certificate,
    /// v1, or v3 even with CA:TRUE) is accepted once its self-signature, validity and key are
    /// checked; a v1 leaf issued by a trusted CA is accepted; a leaf without EKU has no usage
    /// restriction; a CA's basic constraints need not be critical, nor key identifiers present.
    /// A v1 certificate is never accepted as an intermediate.
    #[default]
    Compatible,
    /// RFC 5280 to the letter: v3 only, EKU required, critical basic constraints and key
    /// identifiers on every CA.
    Strict,
}

impl VerifyProfile {
    /// `compatible` or `strict`.
    pub fn name(self) -> &'static str {
        match self {
            VerifyProfile::Compatible => "compatible",
            VerifyProfile::Strict => "strict",
        }
    }
}

impl std::str::FromStr for VerifyProfile {
    type Err = crate::PkiError;

    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "compatible" => Ok(VerifyProfile::Compatible),
            "strict" => Ok(VerifyProfile::Strict),
            other => Err(crate::PkiError::InvalidRequest(format!(
                "verification profile '{other}' must be compatible or strict"
            ))),
        }
    }
}

/// How to verify.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Client or server.
    pub usage: Usage,
    /// Verification time, seconds since the epoch; `None` for now.
    pub at: Option<i64>,
    /// Most CA levels (root included) a chain may have. Default 4.
    pub max_depth: u8,
    /// CRLs to check every certificate of the chain against. A CRL past its nextUpdate rejects
    /// chains it covers (`crl-expired`) rather than silently letting them in.
    pub crls: Vec<Crl>,
    /// A DNS name or IP address the certificate must be valid for.
    pub expected_name: Option<String>,
    /// Require the EKU extension (with the usage's purpose) to be present. RFC 5280 reads an
    /// absent EKU as "any purpose"; the strict profile does not. Default false (the compatible
    /// profile's); [`VerifyOptions::for_profile`] sets it from the profile.
    pub require_eku: bool,
    /// Accept chains covered by a CRL past its nextUpdate (default false: such chains are
    /// rejected with `crl-expired`).
    pub allow_stale_crls: bool,
    /// How strictly certificates are judged.
    pub profile: VerifyProfile,
}

impl VerifyOptions {
    /// The default options under `profile`: strict requires the EKU extension, compatible
    /// reads its absence as "any purpose" (RFC 5280 4.2.1.12), as OpenSSL, Go and Java do.
    pub fn for_profile(profile: VerifyProfile) -> VerifyOptions {
        VerifyOptions {
            profile,
            require_eku: profile == VerifyProfile::Strict,
            ..VerifyOptions::default()
        }
    }
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            usage: Usage::Client,
            at: None,
            max_depth: DEFAULT_MAX_DEPTH,
            crls: Vec::new(),
            expected_name: None,
            require_eku: false,
            allow_stale_crls: false,
            profile: VerifyProfile::Compatible,
        }
    }
}

/// The outcome of [`verify`](crate::verify::verify).
#[derive(Debug, Clone)]
pub enum Verdict {
    /// The certificate is valid; `chain` runs from it to the trust anchor.
    Valid {
        /// Leaf, intermediates, anchor.
        chain: Vec<Certificate>,
    },
    /// The certificate is rejected.
    Rejected {
        /// The stable reason.
        reason: RejectReason,
        /// A one-line explanation naming the certificate concerned.
        explanation: String,
    },
}

impl Verdict {
    pub(crate) fn reject(reason: RejectReason, explanation: impl Into<String>) -> Verdict {
        Verdict::Rejected {
            reason,
            explanation: explanation.into(),
        }
    }

    /// The reason, if rejected.
    pub fn reason(&self) -> Option<RejectReason> {
        match self {
            Verdict::Valid { .. } => None,
            Verdict::Rejected { reason, .. } => Some(*reason),
        }
    }
}
