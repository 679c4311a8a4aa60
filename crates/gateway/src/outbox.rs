//! What the data path reports to the node, typed: just-in-time registrations, certificates seen,
//! and MQTT messages for forwarding rules.
//!
//! Invariants: nothing here blocks or waits. Each kind has its own bounded queue (10,000), so a
//! flood of one (sightings under a reconnect storm) never refuses another (a device's JITP).
//! A full queue refuses a JITP (the connection says so), drops a JITR request or a sighting
//! (the device retries; the next sighting comes within a minute) and drops a forwarded message
//! (counted in `portcullis_mqtt_rule_messages_total`). The node takes all three queues once,
//! through [`crate::Gateway::take_outbox`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use portcullis_pki::Certificate;
use tokio::sync::mpsc;

/// Entries each queue holds before it refuses.
const QUEUE: usize = 10_000;

/// A certificate is reported as seen at most once in this period.
const SEEN_EVERY: Duration = Duration::from_secs(60);

/// A just-in-time registration for the node to write to the store.
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

/// An MQTT message matched by a forwarding rule, for the node to record and deliver.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// The rule's webhook id.
    pub rule: String,
    /// The message's envelope (JSON: topic, payload, client, identity).
    pub envelope: String,
}

/// The receiving ends, taken once by the node.
#[derive(Debug)]
pub struct OutboxReceivers {
    /// Just-in-time registrations.
    pub jit: mpsc::Receiver<JitRequest>,
    /// Certificates seen.
    pub sightings: mpsc::Receiver<Sighting>,
    /// Messages for forwarding rules.
    pub forwarded: mpsc::Receiver<Forwarded>,
}

/// The sending ends, shared by every domain and connection.
#[derive(Debug)]
pub(crate) struct Outbox {
    jit: mpsc::Sender<JitRequest>,
    seen: mpsc::Sender<Sighting>,
    forward: mpsc::Sender<Forwarded>,
    receivers: Mutex<Option<OutboxReceivers>>,
    last_reported: Mutex<HashMap<String, Instant>>,
}

impl Outbox {
    pub(crate) fn new() -> Outbox {
        let (jit, jit_rx) = mpsc::channel(QUEUE);
        let (seen, sightings) = mpsc::channel(QUEUE);
        let (forward, forwarded) = mpsc::channel(QUEUE);
        Outbox {
            jit,
            seen,
            forward,
            receivers: Mutex::new(Some(OutboxReceivers {
                jit: jit_rx,
                sightings,
                forwarded,
            })),
            last_reported: Mutex::new(HashMap::new()),
        }
    }

    /// The receiving ends, the first time only.
    pub(crate) fn take(&self) -> Option<OutboxReceivers> {
        self.receivers.lock().ok()?.take()
    }

    /// Queues a just-in-time registration; whether it was queued (never blocks).
    pub(crate) fn jit(&self, request: JitRequest) -> bool {
        self.jit.try_send(request).is_ok()
    }

    /// Reports a verified certificate, at most once a minute per certificate; never blocks.
    pub(crate) fn saw(&self, leaf: &Certificate, domain: &str) {
        let now = Instant::now();
        {
            let Ok(mut last) = self.last_reported.lock() else {
                return;
            };
            match last.get(&leaf.info().id) {
                Some(t) if now.duration_since(*t) < SEEN_EVERY => return,
                _ => {}
            }
            if last.len() > 100_000 {
                last.retain(|_, t| now.duration_since(*t) < SEEN_EVERY);
            }
            last.insert(leaf.info().id.clone(), now);
        }
        let _ = self.seen.try_send(Sighting {
            certificate: leaf.clone(),
            domain: domain.to_string(),
        });
    }

    /// Queues a message for a forwarding rule; a full queue drops it, counted.
    pub(crate) fn forward(&self, message: Forwarded) {
        let result = if self.forward.try_send(message).is_ok() {
            "queued"
        } else {
            "dropped"
        };
        metrics::counter!("portcullis_mqtt_rule_messages_total", "result" => result).increment(1);
    }
}
