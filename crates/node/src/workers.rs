//! The node's workers: they write what the data path reports (just-in-time registrations,
//! certificates seen, messages for forwarding rules) to the registry, and publish registry
//! events to MQTT.
//!
//! Invariant: the data path never waits on them; each reads its own bounded queue from the
//! gateway's outbox, and a failed write is logged, never retried into the handshake.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use portcullis_registry::{CertStatus, Store};

/// Writes just-in-time registrations: JITR records PENDING_ACTIVATION (the device was refused
/// and retries once activated); JITP registers ACTIVE with its thing and answers the waiting
/// connection. Requests run concurrently, a bounded number at a time; a certificate registered
/// already (a burst of one device) is registered exactly once.
pub(crate) async fn just_in_time(
    store: Store,
    mut requests: tokio::sync::mpsc::Receiver<portcullis_gateway::outbox::JitRequest>,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(16));
    while let Some(request) = requests.recv().await {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let store = store.clone();
        tokio::spawn(async move {
            let outcome = jit_one(&store, &request).await;
            if let Some(done) = request.done {
                let _ = done.send(outcome);
            }
            drop(permit);
        });
    }
}

async fn jit_one(
    store: &Store,
    request: &portcullis_gateway::outbox::JitRequest,
) -> std::result::Result<(), String> {
    use portcullis_registry::RegistryError;
    let cert = &request.certificate;
    let id = portcullis_registry::CertId::of_der(cert.der());
    if !request.provision {
        return match store
            .register_certificate(
                cert.to_pem().as_bytes(),
                CertStatus::PendingActivation,
                "gateway:jit",
            )
            .await
        {
            Ok(record) => {
                tracing::info!(
                    target: "portcullis::registry",
                    certificate = %record.id,
                    subject = %record.subject,
                    status = "PENDING_ACTIVATION",
                    "registered just in time"
                );
                Ok(())
            }
            Err(RegistryError::Conflict(_)) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "just-in-time registration failed");
                Err(jit_error(&e, "the registry could not record it"))
            }
        };
    }
    let ca_id = portcullis_registry::CertId::from_str(&request.ca_id).map_err(|e| e.to_string())?;
    let template = match store.ca(&ca_id).await {
        Ok(ca) => ca.provisioning_template,
        Err(e) => {
            tracing::warn!(error = %e, "just-in-time provisioning: reading the CA failed");
            return Err(jit_error(&e, "the registry could not read the CA"));
        }
    };
    let Some(template) = template else {
        return Err("the CA no longer has a provisioning template".into());
    };
    let provisioned = template.resolve(cert)?;
    match store
        .provision(cert, &ca_id, &provisioned, "gateway:jit")
        .await
    {
        Ok(record) => {
            tracing::info!(
                target: "portcullis::registry",
                certificate = %record.id,
                subject = %record.subject,
                thing = %provisioned.thing_name,
                status = "ACTIVE",
                "provisioned just in time"
            );
            Ok(())
        }
        // Registered meanwhile (the same device connecting twice at once): fine if ACTIVE.
        Err(RegistryError::Conflict(_)) => match store.certificate(&id).await {
            Ok(r) if r.status == CertStatus::Active => Ok(()),
            Ok(r) => Err(format!(
                "the certificate is registered {}",
                r.status.as_str()
            )),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => {
            tracing::warn!(error = %e, "just-in-time provisioning failed");
            Err(jit_error(&e, &format!("the registry refused it: {e}")))
        }
    }
}

/// Why a just-in-time registration failed, in the words the client's log line will carry.
fn jit_error(e: &portcullis_registry::RegistryError, otherwise: &str) -> String {
    if e.is_unavailable() {
        "the registry database cannot be reached; just-in-time registrations are refused until it is back".into()
    } else {
        otherwise.into()
    }
}

/// Publishes registry events (the webhook events) on this node's MQTT topics
/// `$portcullis/events/<type>` (`certificate.status_changed` → `…/certificate/status_changed`),
/// which only policies naming them can read.
pub(crate) async fn publish_registry_events(
    store: Store,
    broker: Arc<portcullis_mqtt::broker::Broker>,
) {
    let mut cursor = loop {
        match store.newest_event().await {
            Ok(seq) => break seq,
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Ok(events) = store.events_after(cursor, 500).await else {
            continue;
        };
        for (seq, kind, payload) in events {
            cursor = seq;
            broker.publish(
                portcullis_mqtt::broker::Message {
                    topic: format!("$portcullis/events/{}", kind.replace('.', "/")),
                    payload: payload.into_bytes().into(),
                    qos: portcullis_mqtt::codec::QoS::AtLeastOnce,
                    retain: false,
                    properties: Default::default(),
                    expires_at: None,
                    sent_as: None,
                    preferred_id: None,
                    released: false,
                    receipt: None,
                },
                None,
            );
        }
    }
}

/// Records MQTT messages for their forwarding rules, in batches; the webhook dispatcher sends
/// them (signed, retried, recorded).
pub(crate) async fn record_forwarded(
    store: Store,
    mut forwarded: tokio::sync::mpsc::Receiver<portcullis_gateway::outbox::Forwarded>,
) {
    let mut batch = Vec::new();
    while forwarded.recv_many(&mut batch, 500).await > 0 {
        let rows: Vec<(String, String)> = batch.drain(..).map(|m| (m.rule, m.envelope)).collect();
        if let Err(e) = store.enqueue_message_deliveries(&rows).await {
            tracing::warn!(target: "portcullis::webhooks", error = %e, messages = rows.len(), "cannot record messages for forwarding rules; they are dropped");
        }
    }
}

/// Writes the certificates gateways saw, in batches.
pub(crate) async fn record_sightings(
    store: Store,
    mut sightings: tokio::sync::mpsc::Receiver<portcullis_gateway::outbox::Sighting>,
) {
    let mut batch = Vec::new();
    while sightings.recv_many(&mut batch, 1000).await > 0 {
        let at = time::OffsetDateTime::now_utc().unix_timestamp();
        let rows: Vec<portcullis_registry::Sighting> = batch
            .drain(..)
            .map(|s| portcullis_registry::Sighting {
                certificate: s.certificate,
                domain: s.domain,
                at,
            })
            .collect();
        match store.record_sightings(&rows).await {
            Ok(retired) => {
                for (old, new) in &retired {
                    tracing::info!(target: "portcullis::registry", certificate = %old, renewed_by = %new, "a renewed certificate retired (INACTIVE): its renewal was seen");
                }
                tracing::info!(target: "portcullis::registry", count = rows.len(), "recorded seen certificates")
            }
            Err(e) => tracing::warn!(error = %e, "recording seen certificates failed"),
        }
    }
}

/// Writes this node's heartbeat every two seconds (what `portcullis cluster status` shows):
/// version, start, the snapshot's marker and freshness, open connections and MQTT sessions, and
/// its connection to NATS.
pub(crate) async fn heartbeat(
    store: Store,
    id: String,
    gateway_live: Arc<portcullis_gateway::conn::live::Live>,
    broker: Arc<portcullis_mqtt::broker::Broker>,
    sync: Arc<crate::sync::SyncStatus>,
    nats: Option<Arc<crate::bus::NatsState>>,
) {
    use std::sync::atomic::Ordering;
    let started_at = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut reported = None;
    loop {
        tick.tick().await;
        let stats = broker.stats();
        let node = portcullis_registry::NodeStatus {
            id: id.clone(),
            version: crate::bus::reported_version(),
            started_at,
            heartbeat_ms: crate::sync::now_ms(),
            snapshot_marker: sync.marker.load(Ordering::SeqCst),
            snapshot_ms: sync.checked_ms.load(Ordering::SeqCst),
            connections: i64::try_from(gateway_live.count()).unwrap_or(i64::MAX),
            mqtt_sessions: i64::try_from(stats.online).unwrap_or(i64::MAX),
            nats: nats.as_ref().map(|n| n.describe()),
        };
        match store.heartbeat(&node).await {
            // Said when the snapshot it reports moves, not every beat.
            Ok(()) if reported != Some(node.snapshot_marker) => {
                reported = Some(node.snapshot_marker);
                tracing::info!(target: "portcullis::cluster", marker = node.snapshot_marker, "heartbeat written");
            }
            Ok(()) => {}
            Err(e) => tracing::debug!(error = %e, "cannot write this node's heartbeat"),
        }
        // Which bus protocol every node speaks (kept as it was when the registry is out of
        // reach: no node of another version joins meanwhile).
        if let Some(nats) = &nats
            && let Ok(nodes) = store.cluster_nodes().await
        {
            nats.set_batches(crate::bus::batches_understood(&nodes));
            nats.set_live_acknowledged(crate::bus::live_understood(&nodes));
            nats.set_node_routes(crate::bus::routes_understood(&nodes));
            nats.set_older_gone(crate::bus::older_gone(&nodes));
        }
    }
}
