//! The registry as the data path sees it: an in-memory snapshot (certificate statuses, the
//! CAs that register just in time, the policies, the forwarding rules), swapped whole or
//! incrementally by the node, and the registry decision on a verified certificate
//! ([`RegistryView::decide`]), with the reasons only the registry gives.
//!
//! Invariants: nothing here touches a database or waits; a decision reads one snapshot; just-in-
//! time requests leave through the [`Outbox`] without blocking.

use std::sync::Arc;

use portcullis_pki::{Certificate, TlsAlert};

use crate::outbox::{JitRequest, Outbox};

/// How a domain uses the certificate registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RegistryMode {
    /// Truststore only (API Gateway's model).
    #[default]
    Off,
    /// Truststore, and certificates the registry marks REVOKED, INACTIVE or PENDING_ACTIVATION
    /// are refused.
    Revocation,
    /// The certificate must also be registered and ACTIVE (IoT Core's model).
    Registered,
}

/// A registered certificate's status, as the data path sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisteredStatus {
    /// May authenticate.
    Active,
    /// May authenticate, and for this many days after it expires may still renew (and do
    /// nothing else): its template's grace period.
    ActiveWithGrace(u16),
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

/// Why the registry refuses a certificate the chain verification accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegistryReason {
    /// Not registered, and the domain admits only registered certificates.
    Unregistered,
    /// The registry marks it REVOKED.
    Revoked,
    /// The registry marks it INACTIVE or PENDING_ACTIVATION.
    Inactive,
    /// Just-in-time provisioning could not provision it (its CA's template needs a subject
    /// field it lacks, or the registry could not record it).
    ProvisioningFailed,
    /// The subject cannot be read as one identity (a multi-valued RDN, CN, O, OU or C given
    /// twice, a value that is not text), which the registry and policies refuse.
    AmbiguousSubject,
}

impl RegistryReason {
    /// Every reason, in documentation order.
    pub const ALL: [RegistryReason; 5] = [
        RegistryReason::Unregistered,
        RegistryReason::Revoked,
        RegistryReason::Inactive,
        RegistryReason::ProvisioningFailed,
        RegistryReason::AmbiguousSubject,
    ];

    /// The stable code, from the same namespace as the pki crate's reasons (`revoked` is
    /// either's: a CRL or the registry).
    pub fn code(self) -> &'static str {
        match self {
            RegistryReason::Unregistered => "unregistered",
            RegistryReason::Revoked => "revoked",
            RegistryReason::Inactive => "inactive",
            RegistryReason::ProvisioningFailed => "provisioning-failed",
            RegistryReason::AmbiguousSubject => "ambiguous-subject",
        }
    }

    /// The TLS alert a handshake refused for this reason ends with. Exhaustive.
    pub fn tls_alert(self) -> TlsAlert {
        match self {
            RegistryReason::Revoked => TlsAlert::CertificateRevoked,
            RegistryReason::Unregistered
            | RegistryReason::Inactive
            | RegistryReason::ProvisioningFailed
            | RegistryReason::AmbiguousSubject => TlsAlert::AccessDenied,
        }
    }
}

/// Decides, in memory, whether a certificate can be provisioned: the thing's name, or why not
/// (a subject field the template needs is missing…).
pub trait Provisioner: Send + Sync + std::fmt::Debug {
    /// The thing `leaf` would be provisioned as, or the reason it cannot be.
    fn check(&self, leaf: &Certificate) -> Result<String, String>;
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
    Refuse(RegistryReason, String),
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
/// node replaces it when the registry changes — whole at start and after a reconnect, and
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

    /// Until when an expired certificate may still renew (seconds since the epoch): ACTIVE
    /// with a grace period; `None` otherwise.
    pub fn grace_until(&self, leaf: &Certificate) -> Option<i64> {
        match self.status(&leaf.info().id)? {
            RegisteredStatus::ActiveWithGrace(days) => {
                Some(leaf.info().not_after_unix() + i64::from(days) * 86400)
            }
            _ => None,
        }
    }

    /// The auto-registering CA that signed `leaf`, if any.
    pub(crate) fn jit_issuer(&self, leaf: &Certificate) -> Option<&AutoRegistration> {
        self.auto_registering
            .iter()
            .find(|a| leaf.is_signed_by(&a.ca))
    }

    /// The refusal, if any, for certificate `id` under `mode`.
    pub fn refusal(&self, mode: RegistryMode, id: &str) -> Option<(RegistryReason, String)> {
        let status = self.status(id);
        match (mode, status) {
            (RegistryMode::Off, _)
            | (_, Some(RegisteredStatus::Active | RegisteredStatus::ActiveWithGrace(_))) => None,
            (RegistryMode::Revocation, None) => None,
            (RegistryMode::Registered, None) => Some((
                RegistryReason::Unregistered,
                format!(
                    "certificate {id} is not registered, and this domain admits only registered certificates"
                ),
            )),
            (_, Some(RegisteredStatus::Revoked)) => Some((
                RegistryReason::Revoked,
                format!("the registry marks certificate {id} REVOKED"),
            )),
            (_, Some(RegisteredStatus::Inactive)) => Some((
                RegistryReason::Inactive,
                format!("the registry marks certificate {id} INACTIVE"),
            )),
            (_, Some(RegisteredStatus::PendingActivation)) => Some((
                RegistryReason::Inactive,
                format!("certificate {id} is PENDING_ACTIVATION; an operator must activate it"),
            )),
        }
    }
}

/// The registry snapshot shared by every domain, its change notifications, and the outbox the
/// data path reports to the node through.
#[derive(Debug)]
pub(crate) struct RegistryView {
    pub(crate) snapshot: arc_swap::ArcSwap<RegistrySnapshot>,
    /// Ticks on every registry snapshot and every reload: open connections and MQTT sessions
    /// check themselves then, and MQTT sessions bind their policies again.
    pub(crate) changes: tokio::sync::watch::Sender<u64>,
    pub(crate) outbox: Outbox,
    /// The node's fleet provisioning (set once at start; none: the MQTT API answers that it
    /// is unavailable).
    pub(crate) fleet: std::sync::OnceLock<Arc<dyn crate::fleet::FleetProvisioning>>,
    /// Revocation learned from other CAs' CRLs and OCSP responders.
    pub(crate) foreign: crate::foreign::ForeignView,
    /// ACME challenges pending (answered by every TLS listener and the node's HTTP responder).
    pub(crate) acme: Arc<crate::acme::AcmeChallenges>,
}

impl RegistryView {
    pub(crate) fn empty() -> RegistryView {
        RegistryView {
            snapshot: arc_swap::ArcSwap::from_pointee(RegistrySnapshot::default()),
            changes: tokio::sync::watch::channel(0).0,
            outbox: Outbox::new(),
            fleet: std::sync::OnceLock::new(),
            foreign: crate::foreign::ForeignView::new(),
            acme: Arc::default(),
        }
    }

    /// What the registry says about `leaf` (already verified against a truststore) on a domain
    /// in `mode`. Unless `dry_run`, just-in-time registrations are sent to the node.
    pub(crate) fn decide(
        &self,
        mode: RegistryMode,
        leaf: &Certificate,
        dry_run: bool,
    ) -> RegistryDecision {
        if mode != RegistryMode::Off
            && let Some(why) = leaf.subject_ambiguity()
        {
            // The registry names certificates by their subject (things, templates, policies):
            // one that reads as two identities is refused.
            return RegistryDecision::Refuse(
                RegistryReason::AmbiguousSubject,
                format!(
                    "the subject '{}' has {why}, which the registry refuses",
                    leaf.info().subject
                ),
            );
        }
        let snapshot = self.snapshot.load();
        let Some(refusal) = snapshot.refusal(mode, &leaf.info().id) else {
            return RegistryDecision::Admit;
        };
        if refusal.0 != RegistryReason::Unregistered {
            return RegistryDecision::Refuse(refusal.0, refusal.1);
        }
        // A claim CA's certificates need no registration: their only policy is the claim's.
        if snapshot.policies().claim_ca_issued(leaf) {
            return RegistryDecision::Admit;
        }
        let Some(auto) = snapshot.jit_issuer(leaf) else {
            return RegistryDecision::Refuse(refusal.0, refusal.1);
        };
        let id = &leaf.info().id;
        let ca = &auto.ca.info().subject;
        let Some(provisioner) = &auto.provisioner else {
            // JITR: recorded as PENDING_ACTIVATION by the node, and this connection is refused
            // (an operator activates the certificate; the device retries).
            if !dry_run {
                let _ = self.outbox.jit(JitRequest {
                    certificate: leaf.clone(),
                    ca_id: auto.ca_id.clone(),
                    provision: false,
                    done: None,
                });
            }
            return RegistryDecision::Refuse(
                RegistryReason::Inactive,
                format!(
                    "certificate {id} is registered just in time (CA '{ca}') as PENDING_ACTIVATION; activate it, then retry"
                ),
            );
        };
        // JITP: admitted once the node has registered it ACTIVE with its thing.
        let thing = match provisioner.check(leaf) {
            Ok(thing) => thing,
            Err(why) => {
                return RegistryDecision::Refuse(
                    RegistryReason::ProvisioningFailed,
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
        let sent = self.outbox.jit(JitRequest {
            certificate: leaf.clone(),
            ca_id: auto.ca_id.clone(),
            provision: true,
            done: Some(done),
        });
        if !sent {
            return RegistryDecision::Refuse(
                RegistryReason::ProvisioningFailed,
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
        assert_eq!(reason, RegistryReason::Inactive);
    }

    /// docs/reject-reasons.md lists the registry's codes too, each with the alert it sends.
    #[test]
    fn the_reasons_table_names_every_registry_code_and_its_alert() {
        let doc = include_str!("../../../docs/reject-reasons.md");
        for reason in RegistryReason::ALL {
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", reason.code())))
                .unwrap_or_else(|| panic!("{} is not in docs/reject-reasons.md", reason.code()));
            assert!(
                row.trim_end()
                    .ends_with(&format!("| {} |", reason.tls_alert().name())),
                "{}: the table says {row}",
                reason.code()
            );
        }
    }
}
