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

pub use crate::verdict::ClientVerdict;

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

/// A registered CA that is ACTIVE with auto-registration on: an unregistered certificate it
/// signed is registered just in time (JITR), or provisioned as a thing when the CA has a
/// provisioning template (JITP).
#[derive(Debug, Clone)]
pub struct AutoRegistration {
    /// The CA certificate.
    pub ca: Certificate,
    /// Its registry id.
    pub ca_id: String,
    /// The provisioning template's check, for JITP.
    pub provisioner: Option<Arc<dyn Provisioner>>,
}

/// Decides, in memory, whether a certificate can be provisioned: the thing's name, or why not
/// (a subject field the template needs is missing…).
pub trait Provisioner: Send + Sync + std::fmt::Debug {
    /// The thing `leaf` would be provisioned as, or the reason it cannot be.
    fn check(&self, leaf: &Certificate) -> Result<String, String>;
}

/// A just-in-time registration for the binary to write to the store.
#[derive(Debug)]
pub struct JitRequest {
    /// The unregistered certificate.
    pub certificate: Certificate,
    /// The registered CA that issued it.
    pub ca_id: String,
    /// Provision it (JITP: ACTIVE, with a thing) rather than register it PENDING_ACTIVATION.
    pub provision: bool,
    /// For JITP: where to say whether it worked; the connection waits for it before serving.
    pub done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
}

/// A verified client certificate a gateway saw, for `last_seen` and truststore impact previews.
#[derive(Debug, Clone)]
pub struct Sighting {
    /// The leaf.
    pub certificate: Certificate,
    /// The domain.
    pub domain: String,
}

/// What the registry says about a certificate on a domain.
#[derive(Debug)]
pub enum RegistryDecision {
    /// Admitted (or the domain does not consult the registry).
    Admit,
    /// Admitted once provisioning (JITP) completes; `pending` says when.
    Provision {
        /// The thing it will be attached to.
        thing: String,
        /// Completion, when a request was sent (not in dry runs).
        pending: Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
    },
    /// Refused.
    Refuse(RejectReason, String),
}

/// Shards of the status map: an incremental update copies only the shards it touches.
const SHARDS: usize = 256;

/// Certificate ids (SHA-256 of the DER) → status, in [`SHARDS`] shards by the id's first byte.
type Shard = std::collections::HashMap<[u8; 32], RegisteredStatus>;

/// A certificate id from its 64 hex characters.
pub fn id_bytes(id: &str) -> Option<[u8; 32]> {
    let hex = id.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        let (hi, lo) = (digit(pair[0])?, digit(pair[1])?);
        out[i] = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// An in-memory snapshot of the registry: certificate id → status (O(1) lookups, ids kept as
/// 32 bytes), the auto-registering CAs and the policies. The data path reads only this; the
/// binary replaces it when the registry changes — whole at start and after a reconnect, and
/// otherwise by [`RegistrySnapshot::with_changes`], which shares every untouched part.
#[derive(Debug, Clone)]
pub struct RegistrySnapshot {
    statuses: Vec<Arc<Shard>>,
    count: usize,
    auto_registering: Arc<Vec<AutoRegistration>>,
    policies: Arc<crate::authorize::PolicySnapshot>,
    /// Forwarding rules: (webhook id, topic filter).
    rules: Arc<Vec<(String, String)>>,
}

/// Builds a [`RegistrySnapshot`] one status at a time (from a stream of database rows).
#[derive(Debug)]
pub struct SnapshotBuilder {
    shards: Vec<Shard>,
    count: usize,
}

impl Default for SnapshotBuilder {
    fn default() -> Self {
        SnapshotBuilder {
            shards: (0..SHARDS).map(|_| Shard::new()).collect(),
            count: 0,
        }
    }
}

impl SnapshotBuilder {
    /// Adds a certificate's status; an id that is not 64 hex characters is skipped.
    pub fn add(&mut self, id: &str, status: RegisteredStatus) {
        if let Some(key) = id_bytes(id)
            && self.shards[usize::from(key[0])]
                .insert(key, status)
                .is_none()
        {
            self.count += 1;
        }
    }

    /// The snapshot, with no CAs or policies yet.
    pub fn build(self) -> RegistrySnapshot {
        RegistrySnapshot {
            statuses: self
                .shards
                .into_iter()
                .map(|mut s| {
                    s.shrink_to_fit();
                    Arc::new(s)
                })
                .collect(),
            count: self.count,
            auto_registering: Arc::new(Vec::new()),
            policies: Arc::new(crate::authorize::PolicySnapshot::new()),
            rules: Arc::new(Vec::new()),
        }
    }
}

impl Default for RegistrySnapshot {
    fn default() -> Self {
        RegistrySnapshot::new(std::iter::empty())
    }
}

impl RegistrySnapshot {
    /// A snapshot from (certificate id, status) pairs; ids that are not 64 hex characters are
    /// skipped.
    pub fn new(statuses: impl IntoIterator<Item = (String, RegisteredStatus)>) -> RegistrySnapshot {
        let mut builder = SnapshotBuilder::default();
        for (id, status) in statuses {
            builder.add(&id, status);
        }
        builder.build()
    }

    /// This snapshot with some statuses changed (`None`: no longer registered). Only the
    /// shards holding those ids are copied; everything else is shared.
    pub fn with_changes(
        &self,
        changes: impl IntoIterator<Item = (String, Option<RegisteredStatus>)>,
    ) -> RegistrySnapshot {
        let mut next = self.clone();
        for (id, status) in changes {
            let Some(key) = id_bytes(&id) else {
                continue;
            };
            let shard = Arc::make_mut(&mut next.statuses[usize::from(key[0])]);
            let existed = match status {
                Some(s) => shard.insert(key, s).is_some(),
                None => shard.remove(&key).is_some(),
            };
            match (existed, status.is_some()) {
                (false, true) => next.count += 1,
                (true, false) => next.count -= 1,
                _ => {}
            }
        }
        next
    }

    /// How many certificates it holds.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Approximate memory of the status map, in bytes (allocated buckets, keys and values).
    pub fn status_bytes(&self) -> usize {
        let entry = std::mem::size_of::<([u8; 32], RegisteredStatus)>() + 1;
        self.statuses
            .iter()
            .map(|s| s.capacity() * entry + std::mem::size_of::<Shard>())
            .sum()
    }

    /// Adds the registry's policies.
    pub fn with_policies(mut self, policies: crate::authorize::PolicySnapshot) -> RegistrySnapshot {
        self.policies = Arc::new(policies);
        self
    }

    /// Sets the MQTT forwarding rules: (webhook id, topic filter).
    pub fn with_rules(mut self, rules: Vec<(String, String)>) -> RegistrySnapshot {
        self.rules = Arc::new(rules);
        self
    }

    /// The forwarding rules.
    pub(crate) fn rules(&self) -> &[(String, String)] {
        &self.rules
    }

    /// The same policies as another snapshot (shared, not copied).
    pub fn with_policies_of(mut self, other: &RegistrySnapshot) -> RegistrySnapshot {
        self.policies = other.policies.clone();
        self
    }

    /// Whether a policy is attached to some CA.
    pub fn has_ca_policies(&self) -> bool {
        self.policies.has_ca_policies()
    }

    /// The registry's policies.
    pub(crate) fn policies(&self) -> &crate::authorize::PolicySnapshot {
        &self.policies
    }

    /// Adds the CAs that register their certificates just in time (ACTIVE, auto-registration on).
    pub fn with_auto_registering_cas(mut self, cas: Vec<AutoRegistration>) -> RegistrySnapshot {
        self.auto_registering = Arc::new(cas);
        self
    }

    /// The status of a registered certificate.
    pub fn status(&self, id: &str) -> Option<RegisteredStatus> {
        let key = id_bytes(id)?;
        self.statuses[usize::from(key[0])].get(&key).copied()
    }

    /// The auto-registering CA that signed `leaf`, if any.
    fn jit_issuer(&self, leaf: &Certificate) -> Option<&AutoRegistration> {
        self.auto_registering
            .iter()
            .find(|a| leaf.is_signed_by(&a.ca))
    }

    /// The refusal, if any, for certificate `id` under `mode`.
    pub fn refusal(&self, mode: RegistryMode, id: &str) -> Option<(RejectReason, String)> {
        let status = self.status(id);
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
    /// Ticks on every registry snapshot and every reload: open connections and MQTT sessions
    /// check themselves then, and MQTT sessions bind their policies again.
    pub(crate) changes: tokio::sync::watch::Sender<u64>,
    /// Just-in-time registrations for the binary to write to the store; bounded, and never
    /// awaited by a handshake (a full queue refuses the device, which retries).
    jit: tokio::sync::mpsc::Sender<JitRequest>,
    pub(crate) jit_requests: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<JitRequest>>>,
    /// Verified certificates seen, at most one report per certificate a minute.
    seen: tokio::sync::mpsc::Sender<Sighting>,
    pub(crate) sightings: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Sighting>>>,
    /// MQTT messages for forwarding rules: (webhook id, envelope JSON); bounded, never awaited.
    pub(crate) forward: tokio::sync::mpsc::Sender<(String, String)>,
    pub(crate) forwarded: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<(String, String)>>>,
    last_reported: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl RegistryHandle {
    pub(crate) fn empty() -> RegistryHandle {
        let (jit, requests) = tokio::sync::mpsc::channel(10_000);
        let (seen, sightings) = tokio::sync::mpsc::channel(10_000);
        let (forward, forwarded) = tokio::sync::mpsc::channel(10_000);
        RegistryHandle {
            snapshot: arc_swap::ArcSwap::from_pointee(RegistrySnapshot::default()),
            changes: tokio::sync::watch::channel(0).0,
            jit,
            jit_requests: std::sync::Mutex::new(Some(requests)),
            seen,
            sightings: std::sync::Mutex::new(Some(sightings)),
            forward,
            forwarded: std::sync::Mutex::new(Some(forwarded)),
            last_reported: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Reports a verified certificate, at most once a minute per certificate; never blocks.
    pub(crate) fn saw(&self, leaf: &Certificate, domain: &str) {
        let now = std::time::Instant::now();
        {
            let Ok(mut last) = self.last_reported.lock() else {
                return;
            };
            match last.get(&leaf.info().id) {
                Some(t) if now.duration_since(*t) < std::time::Duration::from_secs(60) => return,
                _ => {}
            }
            if last.len() > 100_000 {
                last.retain(|_, t| now.duration_since(*t) < std::time::Duration::from_secs(60));
            }
            last.insert(leaf.info().id.clone(), now);
        }
        let _ = self.seen.try_send(Sighting {
            certificate: leaf.clone(),
            domain: domain.to_string(),
        });
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
    registered_cas: Arc<Vec<Certificate>>,
    hints: Vec<DistinguishedName>,
    algorithms: WebPkiSupportedAlgorithms,
    /// Chains of open connections verified again against this generation (after a reload), by
    /// the ids of their certificates: one verification per chain, however many connections.
    rechecked: Mutex<std::collections::HashMap<String, Option<(RejectReason, String)>>>,
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
            rechecked: Mutex::default(),
        }
    }

    /// Why this generation would refuse an open connection's verified `chain` (leaf first, as
    /// another generation built it): its truststore and CRLs (cached per chain), then the
    /// registry (the current snapshot).
    pub(crate) fn recheck(&self, chain: &[Certificate]) -> Option<(RejectReason, String)> {
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
                        RejectReason::UntrustedIssuer,
                        "this domain has no truststore".to_string(),
                    )),
                    Some(store) => match verify(leaf, &chain[1..], store, &self.options) {
                        Verdict::Valid { .. } => None,
                        Verdict::Rejected {
                            reason,
                            explanation,
                        } => Some((reason, explanation)),
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
        chain_refusal.or_else(|| self.registry_refusal(leaf))
    }

    /// Verifies a presented chain (leaf first) now. Just-in-time registrations it calls for are
    /// sent; a JITP provisioning's completion comes back with the verdict.
    pub fn verify_chain(
        &self,
        end_entity: &[u8],
        intermediates: &[CertificateDer<'_>],
    ) -> (
        ClientVerdict,
        Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
    ) {
        self.verify_chain_as(end_entity, intermediates, false)
    }

    /// [`DomainVerifier::verify_chain`], or with `dry_run` a verdict that changes nothing (no
    /// just-in-time registration is sent): what `explain` shows.
    pub fn verify_chain_as(
        &self,
        end_entity: &[u8],
        intermediates: &[CertificateDer<'_>],
        dry_run: bool,
    ) -> (
        ClientVerdict,
        Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
    ) {
        let leaf = match Certificate::from_der(end_entity.to_vec()) {
            Ok(c) => c,
            Err(e) => {
                let verdict = ClientVerdict::Rejected {
                    leaf: None,
                    reason: RejectReason::Malformed,
                    explanation: format!("the client certificate cannot be parsed ({e})"),
                };
                return (verdict, None);
            }
        };
        let presented: Vec<Certificate> = intermediates
            .iter()
            .filter_map(|c| Certificate::from_der(c.to_vec()).ok())
            .collect();
        let Some(store) = &self.truststore else {
            let verdict = ClientVerdict::Rejected {
                leaf: Some(Box::new(leaf)),
                reason: RejectReason::UntrustedIssuer,
                explanation: "this domain has no truststore".into(),
            };
            return (verdict, None);
        };
        let verdict = match self.untrusted_hint(
            &leaf,
            &presented,
            verify(&leaf, &presented, store, &self.options),
        ) {
            Verdict::Valid { chain } => match self.registry_decision(&leaf, dry_run) {
                RegistryDecision::Admit => ClientVerdict::Valid(Arc::new(chain)),
                RegistryDecision::Provision { pending, .. } => {
                    return (ClientVerdict::Valid(Arc::new(chain)), pending);
                }
                RegistryDecision::Refuse(reason, explanation) => ClientVerdict::Rejected {
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
        };
        (verdict, None)
    }

    /// What the registry says about `leaf` (already verified against the truststore). Unless
    /// `dry_run`, just-in-time registrations are sent to the binary.
    pub fn registry_decision(&self, leaf: &Certificate, dry_run: bool) -> RegistryDecision {
        if self.registry_mode != RegistryMode::Off
            && let Some(why) = leaf.subject_ambiguity()
        {
            // The registry names certificates by their subject (things, templates, policies):
            // one that reads as two identities is refused.
            return RegistryDecision::Refuse(
                RejectReason::AmbiguousSubject,
                format!(
                    "the subject '{}' has {why}, which the registry refuses",
                    leaf.info().subject
                ),
            );
        }
        let snapshot = self.registry.snapshot.load();
        let Some(refusal) = snapshot.refusal(self.registry_mode, &leaf.info().id) else {
            return RegistryDecision::Admit;
        };
        if refusal.0 != RejectReason::Unregistered {
            return RegistryDecision::Refuse(refusal.0, refusal.1);
        }
        let Some(auto) = snapshot.jit_issuer(leaf) else {
            return RegistryDecision::Refuse(refusal.0, refusal.1);
        };
        let id = &leaf.info().id;
        let ca = &auto.ca.info().subject;
        let Some(provisioner) = &auto.provisioner else {
            // JITR: recorded as PENDING_ACTIVATION by the binary, and this connection is refused
            // (an operator activates the certificate; the device retries).
            if !dry_run {
                let _ = self.registry.jit.try_send(JitRequest {
                    certificate: leaf.clone(),
                    ca_id: auto.ca_id.clone(),
                    provision: false,
                    done: None,
                });
            }
            return RegistryDecision::Refuse(
                RejectReason::Inactive,
                format!(
                    "certificate {id} is registered just in time (CA '{ca}') as PENDING_ACTIVATION; activate it, then retry"
                ),
            );
        };
        // JITP: admitted once the binary has registered it ACTIVE with its thing.
        let thing = match provisioner.check(leaf) {
            Ok(thing) => thing,
            Err(why) => {
                return RegistryDecision::Refuse(
                    RejectReason::ProvisioningFailed,
                    format!("certificate {id} cannot be provisioned (CA '{ca}'): {why}"),
                );
            }
        };
        if dry_run {
            return RegistryDecision::Provision {
                thing,
                pending: None,
            };
        }
        let (done, pending) = tokio::sync::oneshot::channel();
        let sent = self.registry.jit.try_send(JitRequest {
            certificate: leaf.clone(),
            ca_id: auto.ca_id.clone(),
            provision: true,
            done: Some(done),
        });
        if sent.is_err() {
            return RegistryDecision::Refuse(
                RejectReason::ProvisioningFailed,
                format!(
                    "certificate {id} cannot be provisioned now: the registry queue is full; retry"
                ),
            );
        }
        RegistryDecision::Provision {
            thing,
            pending: Some(pending),
        }
    }

    /// The decision trace for a presented chain (leaf first), changing nothing: the chain
    /// result against this domain's truststore, then the registry's view.
    pub fn explain(
        &self,
        chain: &[Certificate],
        profile: Option<portcullis_pki::VerifyProfile>,
    ) -> serde_json::Value {
        use serde_json::json;
        // Under another verification profile than the domain's, when asked.
        let options = match profile {
            Some(p) if p != self.options.profile => VerifyOptions {
                profile: p,
                require_eku: VerifyOptions::for_profile(p).require_eku,
                ..self.options.clone()
            },
            _ => self.options.clone(),
        };
        let Some(leaf) = chain.first() else {
            return json!({"chain": {"result": "rejected", "reason": "no-certificate"}});
        };
        let info = leaf.info();
        let certificate = json!({
            "id": info.id, "subject": info.subject, "issuer": info.issuer,
            "serial": info.serial, "not_after": info.not_after,
        });
        let chain_result = match &self.truststore {
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
        let chain_json = match &chain_result {
            Verdict::Valid { chain } => json!({
                "result": "valid",
                "path": chain.iter().map(|c| c.info().subject.clone()).collect::<Vec<_>>(),
            }),
            Verdict::Rejected {
                reason,
                explanation,
            } => json!({"result": "rejected", "reason": reason.code(), "explanation": explanation}),
        };
        let mode = match self.registry_mode {
            RegistryMode::Off => "off",
            RegistryMode::Revocation => "revocation",
            RegistryMode::Registered => "registered",
        };
        let status = self.registered_status(&info.id).map(|s| match s {
            RegisteredStatus::Active => "ACTIVE",
            RegisteredStatus::Inactive => "INACTIVE",
            RegisteredStatus::PendingActivation => "PENDING_ACTIVATION",
            RegisteredStatus::Revoked => "REVOKED",
        });
        let registry = if matches!(chain_result, Verdict::Rejected { .. }) {
            json!({"mode": mode, "status": status, "decision": "not-reached"})
        } else {
            let snapshot = self.registry.snapshot.load();
            let jit = snapshot.jit_issuer(leaf).map(|a| {
                json!({"ca": a.ca.info().subject, "ca_id": a.ca_id,
                       "kind": if a.provisioner.is_some() { "JITP" } else { "JITR" }})
            });
            match self.registry_decision(leaf, true) {
                RegistryDecision::Admit => {
                    json!({"mode": mode, "status": status, "decision": "admit"})
                }
                RegistryDecision::Provision { thing, .. } => json!({
                    "mode": mode, "status": status, "decision": "provision-just-in-time",
                    "thing": thing, "just_in_time": jit,
                    "explanation": format!("unregistered, from an auto-registering CA with a provisioning template: the first connection registers it ACTIVE as thing '{thing}' and is served"),
                }),
                RegistryDecision::Refuse(reason, explanation) => json!({
                    "mode": mode, "status": status,
                    "decision": if jit.is_some() && status.is_none() { "refuse-and-register-just-in-time" } else { "refuse" },
                    "reason": reason.code(), "explanation": explanation, "just_in_time": jit,
                }),
            }
        };
        json!({"certificate": certificate, "profile": options.profile.name(), "chain": chain_json, "registry": registry})
    }

    /// The mTLS mode and what a refused client gets.
    pub fn mode(&self) -> (MtlsMode, OnFailure) {
        (self.mode, self.on_failure)
    }

    /// The registry's refusal of an admitted connection's certificate, checked again when the
    /// registry changes (dry run: a certificate being provisioned stays admitted).
    pub(crate) fn registry_refusal(&self, leaf: &Certificate) -> Option<(RejectReason, String)> {
        match self.registry_decision(leaf, true) {
            RegistryDecision::Refuse(reason, explanation) => Some((reason, explanation)),
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
        self.registry.saw(leaf, domain);
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

    /// Registry change notifications.
    /// Hands an MQTT message to the forwarding rules whose filter matches its topic (the binary
    /// records and sends the deliveries). A full queue drops it, counted.
    pub(crate) fn forward(&self, envelope: impl Fn() -> String, topic: &str) {
        let snapshot = self.registry.snapshot.load();
        for (rule, filter) in snapshot.rules() {
            if portcullis_mqtt::topic::matches(filter, topic) {
                let result = if self
                    .registry
                    .forward
                    .try_send((rule.clone(), envelope()))
                    .is_ok()
                {
                    "queued"
                } else {
                    "dropped"
                };
                metrics::counter!("portcullis_mqtt_rule_messages_total", "result" => result)
                    .increment(1);
            }
        }
    }

    /// How many times the registry snapshot was replaced: a session's cached policy binding is
    /// valid while this does not move.
    pub(crate) fn registry_generation(&self) -> u64 {
        *self.registry.changes.borrow()
    }

    pub(crate) fn registry_snapshot(&self) -> Arc<RegistrySnapshot> {
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
    /// A JITP provisioning to wait for before serving.
    pub(crate) provisioning: Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
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

/// A certificate whose key is too weak (RSA below 2048 bits): the verifier refuses it before
/// anything else, under every profile, so its handshake signature (which no algorithm here
/// checks: RSA-PSS starts at 2048 bits) proves nothing a decision relies on. Accepting it lets
/// `on_failure = "http"` answer 403 weak-key instead of a bare decrypt_error alert.
fn refused_for_its_key(cert: &CertificateDer<'_>) -> bool {
    Certificate::from_der(cert.to_vec()).is_ok_and(|c| c.info().public_key.is_weak())
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
/// ([`RejectReason::tls_alert`]); exhaustive over the alerts.
fn alert_for(reason: RejectReason) -> CertificateError {
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

    fn id(n: u8) -> String {
        format!("{n:02x}{}", "ab".repeat(31))
    }

    #[test]
    fn incremental_changes_share_untouched_shards() {
        let base = RegistrySnapshot::new((0..=255u8).map(|n| (id(n), RegisteredStatus::Active)));
        assert_eq!(base.len(), 256);
        assert_eq!(base.status(&id(7)), Some(RegisteredStatus::Active));
        assert_eq!(base.status("not-an-id"), None);
        let next = base.with_changes([
            (id(7), Some(RegisteredStatus::Revoked)),
            (id(9), None),
            ("cd".repeat(32), Some(RegisteredStatus::Inactive)),
        ]);
        assert_eq!(next.len(), 256);
        assert_eq!(next.status(&id(7)), Some(RegisteredStatus::Revoked));
        assert_eq!(next.status(&id(9)), None);
        assert_eq!(
            next.status(&"CD".repeat(32)),
            Some(RegisteredStatus::Inactive),
            "hex case does not matter"
        );
        // The old snapshot is untouched, and shards nobody changed are shared.
        assert_eq!(base.status(&id(7)), Some(RegisteredStatus::Active));
        assert!(Arc::ptr_eq(&base.statuses[1], &next.statuses[1]));
        assert!(!Arc::ptr_eq(&base.statuses[7], &next.statuses[7]));
        assert!(next.status_bytes() > 0);
    }

    #[test]
    fn registered_mode_refuses_unknown_and_inactive_certificates() {
        let snap = RegistrySnapshot::new([(id(1), RegisteredStatus::Inactive)]);
        assert!(snap.refusal(RegistryMode::Registered, &id(2)).is_some());
        assert!(snap.refusal(RegistryMode::Revocation, &id(2)).is_none());
        let (reason, _) = snap.refusal(RegistryMode::Revocation, &id(1)).unwrap();
        assert_eq!(reason, RejectReason::Inactive);
    }
}
