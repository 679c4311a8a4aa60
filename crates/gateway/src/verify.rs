//! Client-certificate verification inside the handshake: the verifier only.
//!
//! One [`DomainVerifier`] per domain and state generation holds the truststore and CRLs, runs
//! the pki crate's `verify`, then asks the registry view ([`RegistryView::decide`]). It leaves
//! each connection's verdict in a task-local slot, so that logs, headers and
//! `on_failure = "http"` pages use exactly what the handshake decided, without verifying twice.
//!
//! Invariants: nothing here touches a database or waits: the handshake runs on in-memory
//! snapshots; a resumed session is verified again by the connection (`conn`), never trusted.

use std::sync::{Arc, Mutex};

use portcullis_pki::verify::{RejectReason, Usage, Verdict, VerifyOptions, verify};
use portcullis_pki::{Certificate, Truststore, VerifyProfile};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use crate::config::{Mtls, MtlsMode, OnFailure, RegistryMode};
use crate::outbox::Forwarded;
use crate::registry_view::{AutoRegistration, RegisteredStatus, RegistryDecision, RegistryView};
use crate::verdict::{ClientVerdict, Rejection};

/// What the verifier would decide on a chain, step by step, changing nothing: what `explain`
/// shows.
#[derive(Debug)]
pub(crate) struct CertificateTrace {
    /// The profile the chain was verified under.
    pub(crate) profile: VerifyProfile,
    /// The chain against the domain's truststore and CRLs.
    pub(crate) chain: Verdict,
    /// The domain's registry mode.
    pub(crate) mode: RegistryMode,
    /// The certificate's registry status.
    pub(crate) status: Option<RegisteredStatus>,
    /// The registry's decision; `None` when the chain was refused first.
    pub(crate) registry: Option<RegistryDecision>,
    /// The auto-registering CA that would register or provision it just in time.
    pub(crate) jit: Option<AutoRegistration>,
    /// Other CAs' revocation sources, when the domain consults them and the chain verified:
    /// the decision (admit, refuse with a reason, wait) and each source with its age.
    pub(crate) foreign: Option<ForeignTrace>,
}

/// What other CAs' revocation sources say about a verified chain (for `explain`).
#[derive(Debug)]
pub(crate) struct ForeignTrace {
    /// Refused by them, and why.
    pub(crate) refusal: Option<(Rejection, String)>,
    /// Not known yet: why (the connection would wait or be asked to retry).
    pub(crate) waiting: Option<String>,
    /// Each source consulted: URL, kind, age, last error.
    pub(crate) sources: Vec<serde_json::Value>,
}

impl CertificateTrace {
    /// Why the certificate is refused, if it is.
    pub(crate) fn refusal(&self) -> Option<(Rejection, &str)> {
        match (&self.chain, &self.registry) {
            (
                Verdict::Rejected {
                    reason,
                    explanation,
                },
                _,
            ) => Some(((*reason).into(), explanation)),
            _ => {
                if let Some(ForeignTrace {
                    refusal: Some((reason, explanation)),
                    ..
                }) = &self.foreign
                {
                    return Some((*reason, explanation));
                }
                match &self.registry {
                    Some(RegistryDecision::Refuse(reason, explanation)) => {
                        Some(((*reason).into(), explanation))
                    }
                    _ => None,
                }
            }
        }
    }
}

/// Verification settings of one domain in one state generation.
#[derive(Debug)]
pub struct DomainVerifier {
    registry_mode: RegistryMode,
    registry: Arc<RegistryView>,
    mode: MtlsMode,
    on_failure: OnFailure,
    truststore: Option<Arc<Truststore>>,
    options: VerifyOptions,
    registered_cas: Arc<Vec<Certificate>>,
    hints: Vec<DistinguishedName>,
    algorithms: WebPkiSupportedAlgorithms,
    /// Other CAs' revocation sources this domain consults.
    foreign: crate::foreign::ForeignPolicy,
    /// Chains of open connections verified again against this generation (after a reload), by
    /// the ids of their certificates: one verification per chain, however many connections.
    rechecked: Mutex<std::collections::HashMap<String, Option<(Rejection, String)>>>,
}

/// Chains kept in [`DomainVerifier::recheck`]'s cache before it starts over.
const RECHECK_CACHE: usize = 100_000;

impl DomainVerifier {
    /// A chain refused as untrusted whose leaf was issued by a CA registered in the registry but
    /// missing from this truststore: the explanation says so and what to do.
    fn untrusted_hint(
        &self,
        leaf: &Certificate,
        presented: &[Certificate],
        verdict: Verdict,
    ) -> Verdict {
        let Verdict::Rejected {
            reason: RejectReason::UntrustedIssuer,
            explanation,
        } = verdict
        else {
            return verdict;
        };
        // Only the leaf's issuer, and a bounded number of signature checks: a client padding
        // its chain must not buy itself work or probe which CAs are registered.
        let _ = presented;
        let registered = self
            .registered_cas
            .iter()
            .filter(|ca| ca.info().subject_der() == leaf.info().issuer_der())
            .take(4)
            .find(|ca| leaf.is_signed_by(ca));
        match registered {
            Some(ca) => Verdict::Rejected {
                reason: RejectReason::UntrustedIssuer,
                explanation: format!(
                    "{explanation}; '{}' is a CA registered in the registry, but this domain's truststore does not include it: set the domain's truststore to \"registry:cas\" (every registered ACTIVE CA) or add the CA to its truststore",
                    ca.info().subject
                ),
            },
            None => Verdict::Rejected {
                reason: RejectReason::UntrustedIssuer,
                explanation,
            },
        }
    }

    pub(crate) fn new(
        mtls: &Mtls,
        algorithms: WebPkiSupportedAlgorithms,
        hostname: &str,
        registry_mode: RegistryMode,
        registry: Arc<RegistryView>,
    ) -> DomainVerifier {
        let mut hints = Vec::new();
        if mtls.advertise_ca_names
            && let Some(store) = &mtls.truststore
        {
            let names: Vec<Vec<u8>> = store
                .entries()
                .iter()
                .filter(|e| !e.duplicate)
                .map(|e| e.certificate.info().subject_der().to_vec())
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
            registered_cas: mtls.registered_cas.clone(),
            options: VerifyOptions {
                usage: Usage::Client,
                max_depth: mtls.max_chain_depth,
                crls: mtls.crls.clone(),
                allow_stale_crls: mtls.allow_stale_crls,
                ..VerifyOptions::for_profile(mtls.verification)
            },
            hints,
            algorithms,
            foreign: mtls.revocation.clone(),
            rechecked: Mutex::default(),
        }
    }

    /// Why this generation would refuse an open connection's verified `chain` (leaf first, as
    /// another generation built it): its truststore and CRLs (cached per chain), then the
    /// registry (the current snapshot).
    pub(crate) fn recheck(&self, chain: &[Certificate]) -> Option<(Rejection, String)> {
        let leaf = chain.first()?;
        let key: String = chain.iter().map(|c| c.info().id.as_str()).collect();
        let cached = self
            .rechecked
            .lock()
            .ok()
            .and_then(|cache| cache.get(&key).cloned());
        let chain_refusal = match cached {
            Some(refusal) => refusal,
            None => {
                let refusal = match &self.truststore {
                    None => Some((
                        RejectReason::UntrustedIssuer.into(),
                        "this domain has no truststore".to_string(),
                    )),
                    Some(store) => match verify(leaf, &chain[1..], store, &self.options) {
                        Verdict::Valid { .. } => None,
                        Verdict::Rejected {
                            reason,
                            explanation,
                        } => Some((reason.into(), explanation)),
                    },
                };
                if let Ok(mut cache) = self.rechecked.lock() {
                    if cache.len() >= RECHECK_CACHE {
                        cache.clear();
                    }
                    cache.insert(key, refusal.clone());
                }
                refusal
            }
        };
        chain_refusal.or_else(|| self.live_refusal(chain))
    }

    /// Why an admitted connection's verified `chain` is refused now by what changes without a
    /// reload: other CAs' revocation sources (a certificate still waiting for its status stays
    /// admitted), then the registry.
    pub(crate) fn live_refusal(&self, chain: &[Certificate]) -> Option<(Rejection, String)> {
        let leaf = chain.first()?;
        if let crate::foreign::ForeignCheck::Refuse(reason, why) = self.foreign_check(chain, true) {
            return Some((reason.into(), why));
        }
        if !self.uses_registry() {
            return None;
        }
        self.registry_refusal(leaf)
    }

    /// The verified `chain` against the foreign revocation sources (asking for what is
    /// missing when `ask`).
    fn foreign_check(&self, chain: &[Certificate], ask: bool) -> crate::foreign::ForeignCheck {
        self.registry.foreign.check(
            &self.foreign,
            chain,
            self.options.allow_stale_crls,
            ask,
            crate::authorize::now(),
        )
    }

    /// A connection to hold until the foreign revocation status of `chain` is known (at most
    /// the domain's bound): admitted if the answer admits it.
    fn wait_for_foreign(&self, chain: Vec<Certificate>) -> Option<Pending> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let (done, pending) = tokio::sync::oneshot::channel();
        let registry = self.registry.clone();
        let policy = self.foreign.clone();
        let allow_stale = self.options.allow_stale_crls;
        handle.spawn(async move {
            let mut changes = registry.changes.subscribe();
            let check = || {
                registry
                    .foreign
                    .check(&policy, &chain, allow_stale, false, crate::authorize::now())
            };
            let outcome = tokio::time::timeout(policy.wait, async {
                loop {
                    match check() {
                        crate::foreign::ForeignCheck::Admit => return Ok(()),
                        crate::foreign::ForeignCheck::Refuse(reason, why) => {
                            return Err((reason.into(), why));
                        }
                        crate::foreign::ForeignCheck::Wait(_) => {
                            if changes.changed().await.is_err() {
                                return Err((
                                    Rejection::RevocationUnknown,
                                    "the node is shutting down".to_string(),
                                ));
                            }
                        }
                    }
                }
            })
            .await;
            let outcome = outcome.unwrap_or_else(|_| match check() {
                crate::foreign::ForeignCheck::Admit => Ok(()),
                crate::foreign::ForeignCheck::Refuse(reason, why) => Err((reason.into(), why)),
                crate::foreign::ForeignCheck::Wait(why) => Err((
                    Rejection::RevocationUnknown,
                    format!(
                        "{why}, with no answer within {} ms; retry in a moment",
                        policy.wait.as_millis()
                    ),
                )),
            });
            let _ = done.send(outcome);
        });
        Some(Pending {
            rx: pending,
            provisioning: false,
        })
    }

    /// Verifies a presented chain (leaf first) now. Just-in-time registrations it calls for are
    /// sent; a JITP provisioning's completion comes back with the verdict.
    pub(crate) fn verify_chain(
        &self,
        end_entity: &[u8],
        intermediates: &[CertificateDer<'_>],
    ) -> (ClientVerdict, Option<Pending>) {
        let leaf = match parsed(end_entity) {
            Ok(c) => c,
            Err(e) => {
                let verdict = ClientVerdict::Rejected {
                    leaf: None,
                    reason: RejectReason::Malformed.into(),
                    explanation: format!("the client certificate cannot be parsed ({e})"),
                };
                return (verdict, None);
            }
        };
        let presented: Vec<Certificate> = intermediates
            .iter()
            .filter_map(|c| parsed(c).ok())
            .collect();
        let Some(store) = &self.truststore else {
            let verdict = ClientVerdict::Rejected {
                leaf: Some(Box::new(leaf)),
                reason: RejectReason::UntrustedIssuer.into(),
                explanation: "this domain has no truststore".into(),
            };
            return (verdict, None);
        };
        let verdict = match self.untrusted_hint(
            &leaf,
            &presented,
            verify(&leaf, &presented, store, &self.options),
        ) {
            Verdict::Valid { chain } => match self.foreign_check(&chain, true) {
                crate::foreign::ForeignCheck::Refuse(reason, explanation) => {
                    ClientVerdict::Rejected {
                        leaf: Some(Box::new(leaf)),
                        reason: reason.into(),
                        explanation,
                    }
                }
                crate::foreign::ForeignCheck::Wait(why) => {
                    // Refused unless a bounded wait can be set up; the registry decides after.
                    match self.wait_for_foreign(chain.clone()) {
                        Some(waiting) => match self.registry_decision(&leaf, false) {
                            RegistryDecision::Admit => {
                                return (ClientVerdict::Valid(Arc::new(chain)), Some(waiting));
                            }
                            RegistryDecision::Provision { pending, .. } => {
                                return (
                                    ClientVerdict::Valid(Arc::new(chain)),
                                    Some(both(waiting, pending.map(provisioning))),
                                );
                            }
                            RegistryDecision::Refuse(reason, explanation) => {
                                ClientVerdict::Rejected {
                                    leaf: Some(Box::new(leaf)),
                                    reason: reason.into(),
                                    explanation,
                                }
                            }
                        },
                        None => ClientVerdict::Rejected {
                            leaf: Some(Box::new(leaf)),
                            reason: Rejection::RevocationUnknown,
                            explanation: format!("{why}; retry in a moment"),
                        },
                    }
                }
                crate::foreign::ForeignCheck::Admit => match self.registry_decision(&leaf, false) {
                    RegistryDecision::Admit => ClientVerdict::Valid(Arc::new(chain)),
                    RegistryDecision::Provision { pending, .. } => {
                        return (
                            ClientVerdict::Valid(Arc::new(chain)),
                            pending.map(provisioning),
                        );
                    }
                    RegistryDecision::Refuse(reason, explanation) => ClientVerdict::Rejected {
                        leaf: Some(Box::new(leaf)),
                        reason: reason.into(),
                        explanation,
                    },
                },
            },
            Verdict::Rejected {
                reason: RejectReason::Expired,
                explanation,
            } => match self.in_grace(&leaf, &presented, store) {
                Some(until) => ClientVerdict::Rejected {
                    explanation: format!(
                        "{explanation}; in its grace period until {until}: it may only renew"
                    ),
                    leaf: Some(Box::new(leaf)),
                    reason: Rejection::RenewOnly,
                },
                None => ClientVerdict::Rejected {
                    leaf: Some(Box::new(leaf)),
                    reason: RejectReason::Expired.into(),
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
                    reason: reason.into(),
                    explanation,
                }
            }
        };
        (verdict, None)
    }

    /// For an expired `leaf`: until when it may still renew (RFC 3339), when the registry
    /// gives it a grace period that has not run out and its chain verifies as it stood the
    /// second before it expired (the registry's decision included).
    fn in_grace(
        &self,
        leaf: &Certificate,
        presented: &[Certificate],
        store: &portcullis_pki::Truststore,
    ) -> Option<String> {
        let until = self.registry.snapshot.load().grace_until(leaf)?;
        let now = crate::authorize::now();
        if now >= until {
            return None;
        }
        let options = VerifyOptions {
            at: Some(leaf.info().not_after_unix() - 1),
            ..self.options.clone()
        };
        // Trusted as the chain stood then; its CAs and CRLs must also be good now (only the
        // leaf's own expiry is forgiven).
        match verify(leaf, presented, store, &options) {
            Verdict::Valid { chain } => {
                let stale_ca = chain
                    .iter()
                    .skip(1)
                    .any(|c| c.info().not_after_unix() <= now || c.info().not_before_unix() > now);
                if stale_ca {
                    return None;
                }
            }
            Verdict::Rejected { .. } => return None,
        }
        if !self.options.allow_stale_crls
            && self
                .options
                .crls
                .iter()
                .any(|c| c.next_update_unix().is_some_and(|n| n <= now))
        {
            return None;
        }
        if !matches!(self.registry_decision(leaf, true), RegistryDecision::Admit) {
            return None;
        }
        time::OffsetDateTime::from_unix_timestamp(until)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
    }

    /// What the registry says about `leaf` (already verified against the truststore). Unless
    /// `dry_run`, just-in-time registrations are sent to the node.
    pub(crate) fn registry_decision(&self, leaf: &Certificate, dry_run: bool) -> RegistryDecision {
        self.registry.decide(self.registry_mode, leaf, dry_run)
    }

    /// The decision on a presented chain (leaf first), step by step, changing nothing: the
    /// chain against this domain's truststore (under another profile when asked), then the
    /// registry's view.
    pub(crate) fn trace(
        &self,
        chain: &[Certificate],
        profile: Option<VerifyProfile>,
    ) -> Option<CertificateTrace> {
        let options = match profile {
            Some(p) if p != self.options.profile => VerifyOptions {
                profile: p,
                require_eku: VerifyOptions::for_profile(p).require_eku,
                ..self.options.clone()
            },
            _ => self.options.clone(),
        };
        let leaf = chain.first()?;
        let verdict = match &self.truststore {
            None => Verdict::Rejected {
                reason: RejectReason::UntrustedIssuer,
                explanation: "this domain has no truststore".into(),
            },
            Some(store) => self.untrusted_hint(
                leaf,
                &chain[1..],
                verify(leaf, &chain[1..], store, &options),
            ),
        };
        let snapshot = self.registry.snapshot.load();
        let foreign = match &verdict {
            Verdict::Valid { chain } if self.foreign.is_on() => {
                let (refusal, waiting) = match self.foreign_check(chain, false) {
                    crate::foreign::ForeignCheck::Admit => (None, None),
                    crate::foreign::ForeignCheck::Refuse(reason, why) => {
                        (Some((reason.into(), why)), None)
                    }
                    crate::foreign::ForeignCheck::Wait(why) => (None, Some(why)),
                };
                Some(ForeignTrace {
                    refusal,
                    waiting,
                    sources: self.registry.foreign.sources(
                        &self.foreign,
                        chain,
                        crate::authorize::now(),
                    ),
                })
            }
            _ => None,
        };
        let registry = match verdict {
            Verdict::Valid { .. } => Some(self.registry_decision(leaf, true)),
            Verdict::Rejected { .. } => None,
        };
        Some(CertificateTrace {
            profile: options.profile,
            chain: verdict,
            mode: self.registry_mode,
            status: snapshot.status(&leaf.info().id),
            registry,
            jit: snapshot.jit_issuer(leaf).cloned(),
            foreign,
        })
    }

    /// The mTLS mode and what a refused client gets.
    pub fn mode(&self) -> (MtlsMode, OnFailure) {
        (self.mode, self.on_failure)
    }

    /// The registry's refusal of an admitted connection's certificate, checked again when the
    /// registry changes (dry run: a certificate being provisioned stays admitted).
    pub(crate) fn registry_refusal(&self, leaf: &Certificate) -> Option<(Rejection, String)> {
        match self.registry_decision(leaf, true) {
            RegistryDecision::Refuse(reason, explanation) => Some((reason.into(), explanation)),
            RegistryDecision::Admit | RegistryDecision::Provision { .. } => None,
        }
    }

    /// Whether a session verified with certificate `id` (hex) may resume: the current registry
    /// snapshot still admits it.
    pub(crate) fn admits_resumption(&self, id: &str) -> bool {
        self.registry
            .snapshot
            .load()
            .refusal(self.registry_mode, id)
            .is_none()
    }

    /// Reports a verified certificate seen on `domain`.
    pub(crate) fn saw(&self, leaf: &Certificate, domain: &str) {
        self.registry.outbox.saw(leaf, domain);
    }

    /// The registry status of a certificate in the current snapshot.
    fn registered_status(&self, id: &str) -> Option<RegisteredStatus> {
        self.registry.snapshot.load().status(id)
    }

    /// Whether the current registry snapshot holds this certificate (any status).
    pub(crate) fn is_registered(&self, leaf: &Certificate) -> bool {
        self.registered_status(&leaf.info().id).is_some()
    }

    /// Whether this domain consults the registry.
    pub(crate) fn uses_registry(&self) -> bool {
        self.registry_mode != RegistryMode::Off
    }

    /// Hands an MQTT message to the forwarding rules whose filter matches its topic (the node
    /// records and sends the deliveries). A full queue drops it, counted.
    pub(crate) fn forward(&self, envelope: impl Fn() -> String, topic: &str) {
        let snapshot = self.registry.snapshot.load();
        for (rule, filter) in snapshot.rules() {
            if portcullis_mqtt::topic::matches(filter, topic) {
                self.registry.outbox.forward(Forwarded {
                    rule: rule.clone(),
                    envelope: envelope(),
                });
            }
        }
    }

    /// How many times the registry snapshot was replaced: a session's cached policy binding is
    /// valid while this does not move.
    pub(crate) fn registry_generation(&self) -> u64 {
        *self.registry.changes.borrow()
    }

    /// The node's fleet provisioning, once set.
    pub(crate) fn fleet(&self) -> Option<Arc<dyn crate::fleet::FleetProvisioning>> {
        self.registry.fleet.get().cloned()
    }

    pub(crate) fn registry_snapshot(&self) -> Arc<crate::registry_view::RegistrySnapshot> {
        self.registry.snapshot.load_full()
    }

    pub(crate) fn registry_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.registry.changes.subscribe()
    }

    /// Whether the handshake itself refuses presented certificates it rejects (required mode,
    /// `on_failure = "tls"`; with "aws" only a missing certificate fails the handshake).
    fn rejects_in_handshake(&self) -> bool {
        self.mode == MtlsMode::Required && self.on_failure == OnFailure::Tls
    }
}

tokio::task_local! {
    /// Where the handshake of the current connection leaves its verdict. The verifier runs
    /// synchronously inside the task that drives the handshake, so a task-local slot gives each
    /// connection its own verdict without a per-connection `ServerConfig`.
    pub(crate) static CONNECTION_VERDICT: Arc<Mutex<Option<HandshakeRecord>>>;
}

/// What the verifier leaves for its connection.
#[derive(Debug)]
pub(crate) struct HandshakeRecord {
    pub(crate) verdict: ClientVerdict,
    /// What to wait for before serving: a JITP provisioning, a revocation status.
    pub(crate) provisioning: Option<Pending>,
}

/// What a connection waits for before it is served (a JITP provisioning, a revocation status
/// being fetched): admitted, or refused with a code and why.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The answer.
    pub(crate) rx: tokio::sync::oneshot::Receiver<Result<(), (Rejection, String)>>,
    /// Whether a JITP provisioning is among what is waited for (the connection then also
    /// waits, briefly, for the registry snapshot to hold the new certificate).
    pub(crate) provisioning: bool,
}

/// A JITP provisioning's completion as a [`Pending`].
fn provisioning(rx: tokio::sync::oneshot::Receiver<Result<(), String>>) -> Pending {
    let (done, pending) = tokio::sync::oneshot::channel();
    let task = async move {
        let outcome = match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(why),
            Err(_) => Err("the registry dropped the request".to_string()),
        };
        let _ = done.send(outcome.map_err(|why| {
            (
                Rejection::Registry(crate::registry_view::RegistryReason::ProvisioningFailed),
                format!("just-in-time provisioning failed: {why}"),
            )
        }));
    };
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(task);
    }
    Pending {
        rx: pending,
        provisioning: true,
    }
}

/// Both waits: admitted when both admit, refused by the first that refuses.
fn both(a: Pending, b: Option<Pending>) -> Pending {
    let Some(b) = b else {
        return a;
    };
    let (done, pending) = tokio::sync::oneshot::channel();
    let task = async move {
        let closed = || Err((Rejection::RevocationUnknown, "dropped".to_string()));
        let first = a.rx.await.unwrap_or_else(|_| closed());
        let outcome = match first {
            Ok(()) => b.rx.await.unwrap_or_else(|_| closed()),
            refused => refused,
        };
        let _ = done.send(outcome);
    };
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(task);
    }
    Pending {
        rx: pending,
        provisioning: true,
    }
}

impl ClientCertVerifier for DomainVerifier {
    fn offer_client_auth(&self) -> bool {
        self.mode != MtlsMode::Off
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mode == MtlsMode::Required && self.on_failure != OnFailure::Http
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
        let (verdict, provisioning) = self.verify_chain(end_entity, intermediates);
        let alert = match &verdict {
            // A certificate in its grace period completes the handshake to renew itself.
            ClientVerdict::Rejected {
                reason: Rejection::RenewOnly,
                ..
            } => None,
            ClientVerdict::Rejected { reason, .. } if self.rejects_in_handshake() => {
                Some(alert_for(*reason))
            }
            _ => None,
        };
        let _ = CONNECTION_VERDICT.try_with(|slot| {
            if let Ok(mut slot) = slot.lock() {
                *slot = Some(HandshakeRecord {
                    verdict,
                    provisioning,
                });
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
        match verify_tls12_signature(message, cert, dss, &self.algorithms) {
            Err(Error::InvalidCertificate(_)) if refused_for_its_key(cert) => {
                Ok(HandshakeSignatureValid::assertion())
            }
            Err(Error::InvalidCertificate(_)) => {
                let spki = spki_of(cert)?;
                let key = webpki::RawPublicKeyEntity::try_from(&spki)
                    .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
                let candidates = self
                    .algorithms
                    .mapping
                    .iter()
                    .find(|(scheme, _)| *scheme == dss.scheme)
                    .map(|(_, algs)| *algs)
                    .ok_or(Error::PeerMisbehaved(
                        rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
                    ))?;
                candidates
                    .iter()
                    .find(|alg| {
                        key.verify_signature(**alg, message, dss.signature())
                            .is_ok()
                    })
                    .map(|_| HandshakeSignatureValid::assertion())
                    .ok_or(Error::InvalidCertificate(CertificateError::BadSignature))
            }
            other => other,
        }
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        match verify_tls13_signature(message, cert, dss, &self.algorithms) {
            Err(Error::InvalidCertificate(_)) if refused_for_its_key(cert) => {
                Ok(HandshakeSignatureValid::assertion())
            }
            Err(Error::InvalidCertificate(_)) => {
                rustls::crypto::verify_tls13_signature_with_raw_key(
                    message,
                    &spki_of(cert)?,
                    dss,
                    &self.algorithms,
                )
            }
            other => other,
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Client certificates parsed lately, by a keyed hash of their DER: a partner or device that
/// connects again is not parsed again (parsing and decoding its fields were 3 % of a handshake,
/// and the RFC 5280 profile checks it passed, another parse, are remembered with it). Only the
/// parse: every handshake still verifies the chain, CRLs and the registry. Emptied when full.
static PARSED: std::sync::LazyLock<(
    std::hash::RandomState,
    Mutex<std::collections::HashMap<u64, Certificate>>,
)> = std::sync::LazyLock::new(Default::default);

/// Client certificates [`PARSED`] keeps at most (about 2 KiB each).
const PARSED_MAX: usize = 1024;

/// `der` parsed, or the certificate parsed from the same bytes lately.
fn parsed(der: &[u8]) -> portcullis_pki::Result<Certificate> {
    use std::hash::BuildHasher;
    let (keys, cache) = &*PARSED;
    let key = keys.hash_one(der);
    if let Some(c) = cache.lock().ok().and_then(|m| m.get(&key).cloned())
        && c.der().as_ref() == der
    {
        return Ok(c);
    }
    let c = Certificate::from_der(der.to_vec())?;
    if let Ok(mut cache) = cache.lock() {
        if cache.len() >= PARSED_MAX {
            cache.clear();
        }
        cache.insert(key, c.clone());
    }
    Ok(c)
}

/// A certificate whose key is too weak (RSA below 2048 bits): the verifier refuses it before
/// anything else, under every profile, so its handshake signature (which no algorithm here
/// checks: RSA-PSS starts at 2048 bits) proves nothing a decision relies on. Accepting it lets
/// `on_failure = "http"` answer 403 weak-key instead of a bare decrypt_error alert.
fn refused_for_its_key(cert: &CertificateDer<'_>) -> bool {
    parsed(cert).is_ok_and(|c| c.info().public_key.is_weak())
}

/// The subject public key info of a certificate webpki cannot parse for verification (X.509 v1):
/// the handshake's signature is still checked with its key, so that the verdict, not the
/// parser, decides what the client gets.
fn spki_of(
    cert: &CertificateDer<'_>,
) -> Result<rustls::pki_types::SubjectPublicKeyInfoDer<'static>, Error> {
    let spki = Certificate::from_der(cert.to_vec())
        .map(|c| c.spki_der())
        .unwrap_or_default();
    if spki.is_empty() {
        return Err(Error::InvalidCertificate(CertificateError::BadEncoding));
    }
    Ok(rustls::pki_types::SubjectPublicKeyInfoDer::from(spki))
}

/// The rustls error that sends a rejection's TLS alert, as the pki crate chose it
/// ([`Rejection::tls_alert`]); exhaustive over the alerts.
fn alert_for(reason: Rejection) -> CertificateError {
    use portcullis_pki::TlsAlert;
    match reason.tls_alert() {
        TlsAlert::CertificateExpired => CertificateError::Expired,
        TlsAlert::CertificateRevoked => CertificateError::Revoked,
        TlsAlert::UnknownCa => CertificateError::UnknownIssuer,
        TlsAlert::DecryptError => CertificateError::BadSignature,
        TlsAlert::UnsupportedCertificate => CertificateError::InvalidPurpose,
        TlsAlert::BadCertificate => CertificateError::BadEncoding,
        // rustls sends certificate_required itself when no certificate comes; a refusal for it
        // here (a rule that wants one) is access_denied, as every other rule's.
        TlsAlert::CertificateRequired | TlsAlert::AccessDenied => {
            CertificateError::ApplicationVerificationFailure
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_pki::issue::issue;
    use portcullis_pki::{IssueRequest, KeyType, PrivateKey, Profile, SubjectName};

    fn self_signed(cn: &str) -> Certificate {
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        issue(
            &IssueRequest::new(Profile::RootCa, SubjectName::cn(cn)),
            &key,
            None,
        )
        .unwrap()
    }

    #[test]
    fn a_certificate_presented_again_is_not_parsed_again_and_other_bytes_are() {
        let (a, b) = (self_signed("cache a"), self_signed("cache b"));
        let first = parsed(a.der()).unwrap();
        let again = parsed(a.der()).unwrap();
        // The same parse (the same allocation of its bytes), not a new one.
        assert_eq!(first.der().as_ptr(), again.der().as_ptr());
        assert_eq!(again.info().subject, "CN=cache a");
        let other = parsed(b.der()).unwrap();
        assert_eq!(other.info().subject, "CN=cache b");
        assert_ne!(other.der().as_ptr(), first.der().as_ptr());
        // Bytes that do not parse are refused every time, and never kept.
        let mut broken = a.der().to_vec();
        broken.truncate(broken.len() / 2);
        assert!(parsed(&broken).is_err());
        assert!(parsed(&broken).is_err());
        // Full, the cache starts again: still right.
        for _ in 0..PARSED_MAX {
            let _ = parsed(self_signed("filler").der());
        }
        assert!(PARSED.1.lock().unwrap().len() <= PARSED_MAX);
        assert_eq!(parsed(a.der()).unwrap().info().subject, "CN=cache a");
    }
}
