//! Client-certificate verification inside the handshake, with the pki crate's verdicts.
//!
//! One [`DomainVerifier`] per domain and state generation holds the truststore and CRLs. It
//! leaves each connection's verdict in a task-local slot, so that logs, headers and
//! `on_failure = "http"` pages use exactly what the handshake decided, without verifying twice.
//! Nothing here touches a database: the handshake runs on an in-memory snapshot.

use std::sync::{Arc, Mutex};

use portcullis_pki::verify::{RejectReason, Usage, Verdict, VerifyOptions, verify};
use portcullis_pki::{Certificate, Truststore};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use crate::config::{Mtls, MtlsMode, OnFailure, RegistryMode};

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

/// A registered certificate's status, as the data path sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisteredStatus {
    /// May authenticate.
    Active,
    /// Deactivated.
    Inactive,
    /// Registered just in time, not activated yet.
    PendingActivation,
    /// Revoked for good.
    Revoked,
}

/// An in-memory snapshot of the registry: certificate id → status. The data path reads only
/// this; the binary replaces it when the registry changes.
#[derive(Debug, Default)]
pub struct RegistrySnapshot {
    statuses: std::collections::HashMap<String, RegisteredStatus>,
    /// Registered CAs that are ACTIVE with auto-registration on: an unregistered certificate
    /// they signed is registered just in time.
    auto_registering: Vec<Certificate>,
}

impl RegistrySnapshot {
    /// A snapshot from (certificate id, status) pairs.
    pub fn new(statuses: impl IntoIterator<Item = (String, RegisteredStatus)>) -> RegistrySnapshot {
        RegistrySnapshot {
            statuses: statuses.into_iter().collect(),
            auto_registering: Vec::new(),
        }
    }

    /// Adds the CAs that register their certificates just in time (ACTIVE, auto-registration on).
    pub fn with_auto_registering_cas(mut self, cas: Vec<Certificate>) -> RegistrySnapshot {
        self.auto_registering = cas;
        self
    }

    /// The auto-registering CA that signed `leaf`, if any.
    fn jit_issuer(&self, leaf: &Certificate) -> Option<&Certificate> {
        self.auto_registering
            .iter()
            .find(|ca| leaf.is_signed_by(ca))
    }

    /// The refusal, if any, for certificate `id` under `mode`.
    pub fn refusal(&self, mode: RegistryMode, id: &str) -> Option<(RejectReason, String)> {
        let status = self.statuses.get(id).copied();
        match (mode, status) {
            (RegistryMode::Off, _) | (_, Some(RegisteredStatus::Active)) => None,
            (RegistryMode::Revocation, None) => None,
            (RegistryMode::Registered, None) => Some((
                RejectReason::Unregistered,
                format!(
                    "certificate {id} is not registered, and this domain admits only registered certificates"
                ),
            )),
            (_, Some(RegisteredStatus::Revoked)) => Some((
                RejectReason::Revoked,
                format!("the registry marks certificate {id} REVOKED"),
            )),
            (_, Some(RegisteredStatus::Inactive)) => Some((
                RejectReason::Inactive,
                format!("the registry marks certificate {id} INACTIVE"),
            )),
            (_, Some(RegisteredStatus::PendingActivation)) => Some((
                RejectReason::Inactive,
                format!("certificate {id} is PENDING_ACTIVATION; an operator must activate it"),
            )),
        }
    }
}

/// The registry snapshot shared by every domain, with its change notifications.
#[derive(Debug)]
pub(crate) struct RegistryHandle {
    pub(crate) snapshot: arc_swap::ArcSwap<RegistrySnapshot>,
    pub(crate) changes: tokio::sync::watch::Sender<u64>,
    /// Just-in-time registrations for the binary to write to the store; bounded, and never
    /// awaited by a handshake (a full queue drops the request; the device retries).
    jit: tokio::sync::mpsc::Sender<Certificate>,
    pub(crate) jit_requests: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Certificate>>>,
}

impl RegistryHandle {
    pub(crate) fn empty() -> RegistryHandle {
        let (jit, requests) = tokio::sync::mpsc::channel(10_000);
        RegistryHandle {
            snapshot: arc_swap::ArcSwap::from_pointee(RegistrySnapshot::default()),
            changes: tokio::sync::watch::channel(0).0,
            jit,
            jit_requests: std::sync::Mutex::new(Some(requests)),
        }
    }
}

/// Verification settings of one domain in one state generation.
#[derive(Debug)]
pub struct DomainVerifier {
    registry_mode: RegistryMode,
    registry: Arc<RegistryHandle>,
    mode: MtlsMode,
    on_failure: OnFailure,
    truststore: Option<Arc<Truststore>>,
    options: VerifyOptions,
    hints: Vec<DistinguishedName>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl DomainVerifier {
    pub(crate) fn new(
        mtls: &Mtls,
        algorithms: WebPkiSupportedAlgorithms,
        hostname: &str,
        registry_mode: RegistryMode,
        registry: Arc<RegistryHandle>,
    ) -> DomainVerifier {
        let mut hints = Vec::new();
        if mtls.advertise_ca_names
            && let Some(store) = &mtls.truststore
        {
            let names: Vec<Vec<u8>> = store
                .entries()
                .iter()
                .filter(|e| !e.duplicate)
                .filter_map(|e| subject_der(&e.certificate))
                .collect();
            let size: usize = names.iter().map(|n| n.len() + 2).sum();
            if size > portcullis_pki::truststore::MAX_ADVERTISED_NAMES_BYTES {
                tracing::warn!(
                    domain = hostname,
                    bytes = size,
                    "truststore CA names exceed 16 KiB; not advertising them (set advertise_ca_names = false to silence this)"
                );
            } else {
                hints = names.into_iter().map(DistinguishedName::from).collect();
            }
        }
        DomainVerifier {
            registry_mode,
            registry,
            mode: mtls.mode,
            on_failure: mtls.on_failure,
            truststore: mtls.truststore.clone(),
            options: VerifyOptions {
                usage: Usage::Client,
                at: None,
                max_depth: mtls.max_chain_depth,
                crls: mtls.crls.clone(),
                expected_name: None,
                // The contract: clientAuth when the certificate has an EKU extension.
                require_eku: false,
                allow_stale_crls: mtls.allow_stale_crls,
            },
            hints,
            algorithms,
        }
    }

    /// Verifies a presented chain (leaf first) now.
    pub fn verify_chain(
        &self,
        end_entity: &[u8],
        intermediates: &[CertificateDer<'_>],
    ) -> ClientVerdict {
        let leaf = match Certificate::from_der(end_entity.to_vec()) {
            Ok(c) => c,
            Err(e) => {
                return ClientVerdict::Rejected {
                    leaf: None,
                    reason: RejectReason::Malformed,
                    explanation: format!("the client certificate cannot be parsed ({e})"),
                };
            }
        };
        let presented: Vec<Certificate> = intermediates
            .iter()
            .filter_map(|c| Certificate::from_der(c.to_vec()).ok())
            .collect();
        let Some(store) = &self.truststore else {
            return ClientVerdict::Rejected {
                leaf: Some(Box::new(leaf)),
                reason: RejectReason::UntrustedIssuer,
                explanation: "this domain has no truststore".into(),
            };
        };
        match verify(&leaf, &presented, store, &self.options) {
            Verdict::Valid { chain } => match self.registry_refusal(&leaf) {
                None => ClientVerdict::Valid(Arc::new(chain)),
                Some((reason, explanation)) => ClientVerdict::Rejected {
                    leaf: Some(Box::new(leaf)),
                    reason,
                    explanation,
                },
            },
            Verdict::Rejected {
                reason,
                explanation,
            } => {
                if reason.is_operator_side() {
                    tracing::warn!(reason = reason.code(), "{explanation}");
                }
                ClientVerdict::Rejected {
                    leaf: Some(Box::new(leaf)),
                    reason,
                    explanation,
                }
            }
        }
    }

    /// The registry's refusal of `leaf`, if this domain consults the registry.
    pub(crate) fn registry_refusal(&self, leaf: &Certificate) -> Option<(RejectReason, String)> {
        let snapshot = self.registry.snapshot.load();
        let refusal = snapshot.refusal(self.registry_mode, &leaf.info().id)?;
        if refusal.0 == RejectReason::Unregistered
            && let Some(ca) = snapshot.jit_issuer(leaf)
        {
            // Just-in-time registration: recorded as PENDING_ACTIVATION by the binary, and this
            // connection is refused (an operator activates the certificate; the device retries).
            let _ = self.registry.jit.try_send(leaf.clone());
            return Some((
                RejectReason::Inactive,
                format!(
                    "certificate {} was registered just in time (CA '{}') as PENDING_ACTIVATION; activate it, then retry",
                    leaf.info().id,
                    ca.info().subject
                ),
            ));
        }
        Some(refusal)
    }

    /// Whether this domain consults the registry.
    pub(crate) fn uses_registry(&self) -> bool {
        self.registry_mode != RegistryMode::Off
    }

    /// Registry change notifications.
    pub(crate) fn registry_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.registry.changes.subscribe()
    }

    /// Whether the handshake itself refuses bad certificates (required mode, TLS failures).
    fn rejects_in_handshake(&self) -> bool {
        self.mode == MtlsMode::Required && self.on_failure == OnFailure::Tls
    }
}

tokio::task_local! {
    /// Where the handshake of the current connection leaves its verdict. The verifier runs
    /// synchronously inside the task that drives the handshake, so a task-local slot gives each
    /// connection its own verdict without a per-connection `ServerConfig`.
    pub(crate) static CONNECTION_VERDICT: Arc<Mutex<Option<ClientVerdict>>>;
}

impl ClientCertVerifier for DomainVerifier {
    fn offer_client_auth(&self) -> bool {
        self.mode != MtlsMode::Off
    }

    fn client_auth_mandatory(&self) -> bool {
        self.rejects_in_handshake()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verdict = self.verify_chain(end_entity, intermediates);
        let alert = match &verdict {
            ClientVerdict::Rejected { reason, .. } if self.rejects_in_handshake() => {
                Some(alert_for(*reason))
            }
            _ => None,
        };
        let _ = CONNECTION_VERDICT.try_with(|slot| {
            if let Ok(mut slot) = slot.lock() {
                *slot = Some(verdict);
            }
        });
        match alert {
            Some(e) => Err(Error::InvalidCertificate(e)),
            None => Ok(ClientCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The TLS alert for a rejection: rustls maps these to certificate_expired, certificate_revoked,
/// unknown_ca, bad_certificate, unsupported_certificate and access_denied.
fn alert_for(reason: RejectReason) -> CertificateError {
    match reason {
        RejectReason::Expired => CertificateError::Expired,
        RejectReason::NotYetValid => CertificateError::NotValidYet,
        RejectReason::Revoked => CertificateError::Revoked,
        RejectReason::UntrustedIssuer => CertificateError::UnknownIssuer,
        RejectReason::BadSignature => CertificateError::BadSignature,
        RejectReason::WrongUsage => CertificateError::InvalidPurpose,
        RejectReason::Malformed => CertificateError::BadEncoding,
        _ => CertificateError::ApplicationVerificationFailure,
    }
}

fn subject_der(cert: &Certificate) -> Option<Vec<u8>> {
    portcullis_pki::cert::subject_der(cert)
}
