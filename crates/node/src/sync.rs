//! The registry follower: keeps the gateway's registry snapshot in step with the store —
//! whole at start, after a reconnect and every ten minutes, otherwise incrementally from the
//! audit log's changes (each action's [`portcullis_registry::Effects`] says what it touches) —
//! and hands back a fresh configuration source when domains or truststores change.
//!
//! Invariants: a snapshot that cannot be read whole keeps the previous one (a policy that no
//! longer parses never drops a Deny); an action this node does not know forces a full rebuild;
//! PostgreSQL notifications only wake the loop, the audit log is what is read.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use portcullis_gateway::Gateway;
use portcullis_gateway::registry_view::{AutoRegistration, RegisteredStatus, RegistrySnapshot};
use portcullis_pki::Certificate;
use portcullis_registry::{CertStatus, ChangeEntry, Store};

use crate::config::RegistryConfig;

/// How far back (seconds) an incremental refresh reads changes again.
const CHANGE_WINDOW_SECS: i64 = 10;

/// The snapshot is rebuilt whole this often anyway: a safety net under incremental refreshes.
const FULL_RESYNC: Duration = Duration::from_secs(600);

/// The next change notification, or never (SQLite).
pub(crate) async fn next_change(
    listener: &mut Option<portcullis_registry::ChangeListener>,
) -> std::result::Result<portcullis_registry::Change, portcullis_registry::RegistryError> {
    match listener {
        Some(l) => l.next().await,
        None => std::future::pending().await,
    }
}

/// What the follower last achieved, for the node's heartbeat: the audit sequence number its
/// snapshot includes and when it last checked the registry successfully.
#[derive(Debug, Default)]
pub(crate) struct SyncStatus {
    pub(crate) marker: std::sync::atomic::AtomicI64,
    pub(crate) checked_ms: std::sync::atomic::AtomicI64,
    /// Told each time the gateway is handed a newer snapshot.
    advanced: tokio::sync::Notify,
    /// Asks the follower to look at the registry now (this node just committed a change a
    /// client waits for), instead of at its next poll.
    wake: tokio::sync::Notify,
}

impl SyncStatus {
    /// The gateway now enforces every change up to `marker`.
    fn advance(&self, marker: i64) {
        self.marker.store(marker, Ordering::SeqCst);
        self.advanced.notify_waiters();
    }

    /// The follower's wake-up call (see `wake`).
    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Waits (at most `within`) until this node's gateway enforces the change `seq`; whether
    /// it does. The follower is asked to look at once.
    pub(crate) async fn enforced(&self, seq: i64, within: std::time::Duration) -> bool {
        self.wake.notify_one();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.advanced.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.marker.load(Ordering::SeqCst) >= seq {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.marker.load(Ordering::SeqCst) >= seq;
            }
        }
    }
}

/// Follows the registry: refreshes the snapshot when anything changed, and hands back a fresh
/// configuration source when domains or truststores did. While the database cannot be reached
/// the gateway keeps its last snapshot and configuration, `/readyz` says not ready, and once
/// it is back everything is read again.
pub(crate) struct RegistryWatch {
    registry_marker: i64,
    /// Changes recorded from this time on are read again at the next incremental refresh.
    window_start: i64,
    /// When the snapshot was last rebuilt whole.
    last_full: std::time::Instant,
    /// A change was committed (notification): read the changes even if the newest sequence
    /// number did not move.
    notified: bool,
    /// The smallest sequence number notified since the last refresh.
    reread_from: Option<i64>,
    config_marker: i64,
    force_snapshot: bool,
    force_config: bool,
    reachable: bool,
    reachable_flag: Arc<AtomicBool>,
    /// Opens the registry's server certificate keys at each configuration read, and issues
    /// the cluster's `auto` certificates.
    cluster: Option<crate::cluster::Cluster>,
    /// Shared with the heartbeat.
    status: Arc<SyncStatus>,
}

impl RegistryWatch {
    /// A watch starting from the markers the running configuration was built from.
    pub(crate) fn new(
        registry_marker: i64,
        config_marker: i64,
        reachable_flag: Arc<AtomicBool>,
        cluster: Option<crate::cluster::Cluster>,
        status: Arc<SyncStatus>,
    ) -> RegistryWatch {
        status.marker.store(registry_marker, Ordering::SeqCst);
        status.checked_ms.store(now_ms(), Ordering::SeqCst);
        RegistryWatch {
            registry_marker,
            window_start: time::OffsetDateTime::now_utc().unix_timestamp() - CHANGE_WINDOW_SECS,
            last_full: std::time::Instant::now(),
            notified: false,
            reread_from: None,
            config_marker,
            force_snapshot: false,
            force_config: false,
            reachable: true,
            reachable_flag,
            cluster,
            status,
        }
    }

    /// A change was committed with this sequence number (when known): the next refresh reads
    /// the changes from there, even below the marker (it may have committed after larger ones).
    pub(crate) fn notified(&mut self, seq: Option<i64>) {
        self.notified = true;
        if let Some(seq) = seq {
            self.reread_from = Some(self.reread_from.map_or(seq, |r| r.min(seq)));
        }
    }

    /// The newest registry configuration change the last configuration read includes.
    pub(crate) fn config_marker(&self) -> i64 {
        self.config_marker
    }

    /// Domains or truststores changed: read the configuration again.
    pub(crate) fn config_changed(&mut self) {
        self.force_config = true;
    }

    /// Notifications may have been lost (a reconnect): read everything again.
    pub(crate) fn resync(&mut self) {
        self.force_snapshot = true;
        self.force_config = true;
    }

    pub(crate) fn unreachable(&mut self, e: &dyn std::fmt::Display) {
        if self.reachable {
            tracing::warn!(target: "portcullis::registry", error = %e, "the registry database cannot be reached: serving from the last snapshot; just-in-time registrations and admin writes are refused until it is back");
        }
        self.reachable = false;
        self.reachable_flag.store(false, Ordering::SeqCst);
        metrics::gauge!("portcullis_registry_reachable").set(0.0);
        self.force_snapshot = true;
        self.force_config = true;
    }

    pub(crate) async fn check(
        &mut self,
        store: &Store,
        gateway: &Gateway,
    ) -> Option<RegistryConfig> {
        let marker = match store.change_marker().await {
            Ok(m) => m,
            Err(e) => {
                self.unreachable(&e);
                return None;
            }
        };
        let checked = now_ms();
        if !self.reachable {
            tracing::info!(target: "portcullis::registry", "the registry database is reachable again; resynchronizing");
            self.reachable = true;
            self.reachable_flag.store(true, Ordering::SeqCst);
            metrics::gauge!("portcullis_registry_reachable").set(1.0);
        }
        let full = self.force_snapshot || self.last_full.elapsed() >= FULL_RESYNC;
        if marker != self.registry_marker || full || self.notified {
            self.notified = false;
            let started = std::time::Instant::now();
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let incremental = if full {
                Ok(None)
            } else {
                let from = self.reread_from.map_or(self.registry_marker, |r| {
                    r.saturating_sub(1).min(self.registry_marker)
                });
                incremental_snapshot(store, &gateway.registry(), from, self.window_start).await
            };
            let built = match incremental {
                Ok(Some((snapshot, changes))) => Ok((snapshot, "incremental", changes)),
                Ok(None) => registry_snapshot(store)
                    .await
                    .map(|s| (s, "full", Vec::new())),
                Err(e) => Err(e),
            };
            match built {
                Ok((snapshot, kind, changes)) => {
                    let applied_after = self.registry_marker;
                    self.registry_marker = marker;
                    self.force_snapshot = false;
                    self.reread_from = None;
                    // The next incremental read looks back a little: on PostgreSQL a change
                    // with a smaller sequence number can commit after a larger one.
                    self.window_start = now - CHANGE_WINDOW_SECS;
                    if kind == "full" {
                        self.last_full = std::time::Instant::now();
                    }
                    let (certificates, bytes) = (snapshot.len(), snapshot.status_bytes());
                    gateway.update_registry(snapshot);
                    self.status.advance(marker);
                    // Commit → enforced here, per change first applied (each node measures its
                    // own; the ≤ 1 s promise is watched, not assumed).
                    let enforced = crate::sync::now_ms();
                    for at_ms in changes
                        .iter()
                        .filter(|c| c.seq > applied_after)
                        .filter_map(|c| c.at_ms)
                    {
                        let seconds = (enforced - at_ms).max(0) as f64 / 1000.0;
                        metrics::histogram!("portcullis_registry_change_enforce_seconds")
                            .record(seconds);
                    }
                    metrics::gauge!("portcullis_registry_snapshot_certificates")
                        .set(certificates as f64);
                    metrics::gauge!("portcullis_registry_snapshot_bytes").set(bytes as f64);
                    tracing::info!(
                        target: "portcullis::registry",
                        marker,
                        kind,
                        certificates,
                        status_bytes = bytes,
                        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                        "registry snapshot refreshed"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read the registry; keeping the previous snapshot");
                    self.force_snapshot = true;
                    return None;
                }
            }
        }
        if self.registry_marker == marker {
            // Up to date as of this check.
            self.status.checked_ms.store(checked, Ordering::SeqCst);
        }
        // Domain and truststore changes rebuild the configuration.
        let marker = match store.config_marker().await {
            Ok(m) => m,
            Err(e) => {
                self.unreachable(&e);
                return None;
            }
        };
        if marker == self.config_marker && !self.force_config {
            return None;
        }
        match read_config(store, self.cluster.as_ref()).await {
            Ok(fresh) => {
                self.config_marker = marker;
                self.force_config = false;
                Some(fresh)
            }
            Err(e) => {
                // Said once per change, not every poll: the next change (or a reconnect) reads
                // the configuration again.
                self.config_marker = marker;
                self.force_config = false;
                tracing::warn!(error = %format!("{e:#}"), "cannot read the registry's domains and truststores; keeping the previous configuration");
                None
            }
        }
    }
}

pub(crate) use portcullis_registry::store::now_ms;

/// The registry's configuration source (in a cluster, `auto` certificates are the registry's:
/// issued by the renewal task and by domain checks, never here, on the poll loop).
pub(crate) async fn read_config(
    store: &Store,
    cluster: Option<&crate::cluster::Cluster>,
) -> Result<RegistryConfig> {
    let mut registry = RegistryConfig::read(store, cluster.map(|c| c.key.as_ref())).await?;
    registry.cluster_auto = cluster.is_some();
    Ok(registry)
}

/// The gateway's in-memory view of the registry.
pub(crate) async fn registry_snapshot(store: &Store) -> Result<RegistrySnapshot> {
    let mut builder = portcullis_gateway::registry_view::SnapshotBuilder::default();
    store
        .for_each_status(|id, status, grace| builder.add(id, registered(status, grace)))
        .await
        .context("reading the registry")?;
    Ok(builder
        .build()
        .with_rules(
            store
                .message_rules()
                .await
                .context("reading the forwarding rules")?,
        )
        .with_auto_registering_cas(auto_registering_cas(store).await?)
        .with_policies(policy_snapshot(store).await?))
}

fn registered(status: CertStatus, grace_days: u16) -> RegisteredStatus {
    match status {
        CertStatus::Active if grace_days > 0 => RegisteredStatus::ActiveWithGrace(grace_days),
        CertStatus::Active => RegisteredStatus::Active,
        CertStatus::Inactive => RegisteredStatus::Inactive,
        CertStatus::PendingActivation => RegisteredStatus::PendingActivation,
        CertStatus::Revoked => RegisteredStatus::Revoked,
    }
}

/// Changes read at most per refresh; beyond this the snapshot is rebuilt whole.
const INCREMENTAL_LIMIT: i64 = 20_000;

/// What a batch of registry changes requires of the snapshot: the certificates whose status
/// is read again, and which shared parts are rebuilt.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Refresh {
    /// Certificate ids, sorted, each once.
    pub(crate) certificates: Vec<String>,
    /// The auto-registering CAs.
    pub(crate) cas: bool,
    /// The policies (documents, attachments, things, CA links).
    pub(crate) policies: bool,
    /// The MQTT forwarding rules.
    pub(crate) rules: bool,
}

/// The refresh that audit entries `(sequence, action, target)` call for, from each action's
/// [`portcullis_registry::Effects`]; `None` when only a full rebuild will do (an action this
/// node does not know, written by a newer node, or more than `limit` changes). Pure: the
/// node's sync decisions, testable without a database.
pub(crate) fn plan_refresh(
    changes: &[ChangeEntry],
    has_ca_policies: bool,
    limit: usize,
) -> Option<Refresh> {
    if changes.len() > limit {
        return None;
    }
    let mut refresh = Refresh::default();
    for change in changes {
        let effects = portcullis_registry::AuditAction::parse(&change.action)?.effects();
        if effects.certificate_status {
            refresh.certificates.push(change.target.clone());
        }
        refresh.rules |= effects.rules;
        // Statuses of many certificates at once (a CA deactivated with --revoke-issued writes
        // one entry per certificate, so these are covered too).
        refresh.cas |= effects.cas;
        // What applies to a certificate: its things, its CA (linked at registration, used when
        // a CA has policies), and the domain's attachments (removed with the domain).
        refresh.policies |=
            effects.policies || (effects.policies_if_ca_policies && has_ca_policies);
    }
    refresh.certificates.sort();
    refresh.certificates.dedup();
    Some(refresh)
}

/// `current` with the statuses `found` for the certificates `ids` (an id not found is no
/// longer registered); every other part is shared.
pub(crate) fn with_statuses(
    current: &RegistrySnapshot,
    ids: Vec<String>,
    found: &std::collections::HashMap<String, RegisteredStatus>,
) -> RegistrySnapshot {
    current.with_changes(ids.into_iter().map(|id| {
        let status = found.get(&id).copied();
        (id, status)
    }))
}

/// The snapshot after the changes recorded since `marker` (or within the last `window`
/// seconds), derived from `current`, with the changes it applied: only the certificates named
/// by those changes are read again; CAs and policies only when they changed. `None` when only a
/// full rebuild will do.
async fn incremental_snapshot(
    store: &Store,
    current: &RegistrySnapshot,
    marker: i64,
    since: i64,
) -> Result<Option<(RegistrySnapshot, Vec<ChangeEntry>)>> {
    let changes = store
        .changes_since(marker, since, INCREMENTAL_LIMIT + 1)
        .await
        .context("reading the registry's changes")?;
    let limit = usize::try_from(INCREMENTAL_LIMIT).unwrap_or(usize::MAX);
    let Some(refresh) = plan_refresh(&changes, current.has_ca_policies(), limit) else {
        return Ok(None);
    };
    let found: std::collections::HashMap<String, RegisteredStatus> = store
        .statuses_of(&refresh.certificates)
        .await
        .context("reading the registry")?
        .into_iter()
        .map(|(id, status, grace)| (id.to_string(), registered(status, grace)))
        .collect();
    let mut next = with_statuses(current, refresh.certificates, &found);
    if refresh.cas {
        next = next.with_auto_registering_cas(auto_registering_cas(store).await?);
    }
    if refresh.policies {
        next = next.with_policies(policy_snapshot(store).await?);
    }
    if refresh.rules {
        next = next.with_rules(
            store
                .message_rules()
                .await
                .context("reading the forwarding rules")?,
        );
    }
    Ok(Some((next, changes)))
}

/// A CA's provisioning template, checked in memory inside handshakes.
#[derive(Debug)]
pub(crate) struct TemplateProvisioner(pub(crate) portcullis_registry::ProvisioningTemplate);

impl portcullis_gateway::registry_view::Provisioner for TemplateProvisioner {
    fn check(&self, leaf: &Certificate) -> Result<String, String> {
        self.0.resolve(leaf).map(|p| p.thing_name)
    }
}

/// The ACTIVE CAs with auto-registration on.
async fn auto_registering_cas(store: &Store) -> Result<Vec<AutoRegistration>> {
    Ok(store
        .list_cas()
        .await
        .context("reading the registry")?
        .into_iter()
        .filter(|ca| ca.status == portcullis_registry::CaStatus::Active && ca.auto_registration)
        .filter_map(|ca| {
            let (cert, _) = Certificate::first_and_rest(ca.pem.as_bytes()).ok()?;
            Some(AutoRegistration {
                ca: cert,
                ca_id: ca.id.to_string(),
                provisioner: ca.provisioning_template.map(|t| {
                    Arc::new(TemplateProvisioner(t))
                        as Arc<dyn portcullis_gateway::registry_view::Provisioner>
                }),
            })
        })
        .collect())
}

/// Compiled policies by (name, version).
type Compiled = std::collections::HashMap<(String, i64, String), Arc<portcullis_policy::Policy>>;

/// Policies compiled once per (name, version, document), kept across snapshots. The document is
/// part of the key: a policy deleted and created again starts at version 1 with new text.
static COMPILED: std::sync::LazyLock<std::sync::Mutex<Compiled>> =
    std::sync::LazyLock::new(Default::default);

/// The registry's policies for the data path. A stored policy that no longer parses fails the
/// whole snapshot (the previous one stays): dropping a Deny must never widen access.
async fn policy_snapshot(store: &Store) -> Result<portcullis_gateway::authorize::PolicySnapshot> {
    use portcullis_gateway::authorize::{PolicySnapshot, PolicyTarget};
    let state = store.policy_state().await.context("reading the policies")?;
    let claims = store.claims().await.context("reading the claims")?;
    let claim_cas: Vec<(Certificate, Vec<String>)> = store
        .list_cas()
        .await
        .context("reading the CAs")?
        .into_iter()
        .filter(|ca| ca.status == portcullis_registry::CaStatus::Active)
        .filter_map(|ca| {
            let templates = ca.claim_templates?;
            let (cert, _) = Certificate::first_and_rest(ca.pem.as_bytes()).ok()?;
            Some((cert, templates))
        })
        .collect();
    let mut snapshot = PolicySnapshot::new();
    let mut compiled = COMPILED
        .lock()
        .map_err(|_| anyhow::anyhow!("the policy cache is poisoned"))?;
    let mut keep = std::collections::HashSet::new();
    for (name, version, document) in &state.policies {
        let key = (name.clone(), *version, document.clone());
        let policy = match compiled.get(&key) {
            Some(p) => p.clone(),
            None => {
                let p = Arc::new(
                    portcullis_policy::Policy::parse(document)
                        .map_err(|e| anyhow::anyhow!("stored policy '{name}' v{version}: {e}"))?,
                );
                compiled.insert(key.clone(), p.clone());
                p
            }
        };
        keep.insert(key);
        snapshot.add_policy(name, *version, policy);
    }
    compiled.retain(|k, _| keep.contains(k));
    for (policy, target) in &state.attachments {
        let t = target.target.clone();
        let target = match target.target_type {
            portcullis_registry::TargetType::Certificate => PolicyTarget::Certificate(t),
            portcullis_registry::TargetType::Thing => PolicyTarget::Thing(t),
            portcullis_registry::TargetType::Ca => PolicyTarget::Ca(t),
            portcullis_registry::TargetType::Domain => PolicyTarget::Domain(t),
        };
        snapshot.attach(target, policy);
    }
    for (certificate, thing) in &state.things_of {
        snapshot.add_thing_of(certificate, thing);
    }
    for (thing, attributes) in state.thing_attributes {
        snapshot.set_thing_attributes(&thing, attributes);
    }
    for (certificate, ca) in &state.ca_of {
        snapshot.set_ca_of(certificate, ca);
    }
    for (certificate, templates) in claims {
        snapshot.set_claim(certificate.as_str(), templates);
    }
    for (ca, templates) in claim_cas {
        snapshot.set_claim_ca(ca, templates);
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_registry::AuditAction;

    fn change(action: AuditAction, target: &str) -> ChangeEntry {
        ChangeEntry {
            seq: 1,
            action: action.as_str().to_string(),
            target: target.to_string(),
            at_ms: None,
        }
    }

    fn id(n: u8) -> String {
        format!("{n:02x}{}", "ab".repeat(31))
    }

    /// Each action, alone, and the refresh it causes (with and without CA policies).
    #[test]
    fn each_audit_action_causes_its_snapshot_change() {
        for action in AuditAction::ALL {
            let effects = action.effects();
            for ca_policies in [false, true] {
                let refresh = plan_refresh(&[change(action, "t")], ca_policies, 10)
                    .unwrap_or_else(|| panic!("{} needs no full rebuild", action.as_str()));
                assert_eq!(
                    refresh.certificates.is_empty(),
                    !effects.certificate_status,
                    "{}",
                    action.as_str()
                );
                assert_eq!(refresh.cas, effects.cas, "{}", action.as_str());
                assert_eq!(refresh.rules, effects.rules, "{}", action.as_str());
                assert_eq!(
                    refresh.policies,
                    effects.policies || (effects.policies_if_ca_policies && ca_policies),
                    "{}",
                    action.as_str()
                );
            }
        }
        // The ones a revocation and a policy change travel by, spelled out.
        let status = plan_refresh(&[change(AuditAction::CertificateStatus, &id(1))], false, 10);
        assert_eq!(
            status,
            Some(Refresh {
                certificates: vec![id(1)],
                ..Refresh::default()
            })
        );
        let attach = plan_refresh(&[change(AuditAction::PolicyAttach, "p")], false, 10).unwrap();
        assert!(attach.policies && attach.certificates.is_empty() && !attach.cas);
        let register = plan_refresh(
            &[change(AuditAction::CertificateRegister, &id(2))],
            true,
            10,
        )
        .unwrap();
        assert_eq!(register.certificates, vec![id(2)]);
        assert!(register.policies, "a registration links the CA's policies");
        let webhook = plan_refresh(&[change(AuditAction::WebhookCreate, "w")], false, 10).unwrap();
        assert!(webhook.rules && !webhook.policies);
    }

    #[test]
    fn unknown_actions_and_floods_force_a_full_rebuild_and_ids_are_read_once() {
        let unknown = [ChangeEntry {
            action: "certificate.teleport".into(),
            ..change(AuditAction::CertificateStatus, &id(1))
        }];
        assert_eq!(plan_refresh(&unknown, false, 10), None);
        let many: Vec<_> = (0..11)
            .map(|n| change(AuditAction::CertificateStatus, &id(n)))
            .collect();
        assert_eq!(plan_refresh(&many, false, 10), None);
        let twice = [
            change(AuditAction::CertificateStatus, &id(3)),
            change(AuditAction::CertificateStatus, &id(3)),
            change(AuditAction::CertificateDelete, &id(2)),
        ];
        assert_eq!(
            plan_refresh(&twice, false, 10).unwrap().certificates,
            vec![id(2), id(3)]
        );
    }

    /// A revocation read back changes that certificate only; a certificate the store no longer
    /// has leaves the snapshot.
    #[test]
    fn statuses_read_back_replace_only_the_named_certificates() {
        let current = RegistrySnapshot::new([
            (id(1), RegisteredStatus::Active),
            (id(2), RegisteredStatus::Active),
            (id(3), RegisteredStatus::Active),
        ]);
        let found = std::collections::HashMap::from([(id(1), registered(CertStatus::Revoked, 0))]);
        let next = with_statuses(&current, vec![id(1), id(2)], &found);
        assert_eq!(next.status(&id(1)), Some(RegisteredStatus::Revoked));
        assert_eq!(next.status(&id(2)), None, "deleted");
        assert_eq!(next.status(&id(3)), Some(RegisteredStatus::Active));
        assert_eq!(next.len(), 2);
        assert_eq!(current.status(&id(1)), Some(RegisteredStatus::Active));
    }
}
