//! A session's policies, bound to its certificate, domain and client id, and asked by the
//! broker on every delivery (`mqtt:Receive`).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use portcullis_mqtt::broker::Receiver;
use portcullis_pki::Certificate;
use portcullis_policy::{Bound, Request as PolicyRequest};

use super::Conn;
use crate::verify::DomainVerifier;

/// A session's policies, bound to its certificate, domain and client id; bound again whenever
/// the registry snapshot changes, so a policy change applies to the next packet.
#[derive(Clone)]
pub(crate) struct SessionAuth(Arc<AuthInner>);

pub(super) struct AuthInner {
    pub(super) verifier: Arc<DomainVerifier>,
    pub(super) leaf: Certificate,
    pub(super) domain: String,
    pub(super) client_id: String,
    pub(super) peer: IpAddr,
    pub(super) bound: Mutex<Option<(u64, Arc<Bound>)>>,
    /// Topics recently allowed, per action, for the registry generation they were decided in
    /// (only when no decision depends on the time): a device publishes to a few topics, over
    /// and over.
    pub(super) allowed: Mutex<Allowed>,
    /// Expired, in its grace period: only the built-in renew-only policy applies.
    pub(super) renew_only: bool,
}

impl SessionAuth {
    pub(super) fn new(
        c: &Conn,
        leaf: &Certificate,
        client_id: &str,
        renew_only: bool,
    ) -> SessionAuth {
        SessionAuth(Arc::new(AuthInner {
            verifier: c.verifier.clone(),
            leaf: leaf.clone(),
            domain: c.domain.hostname.to_string(),
            client_id: client_id.to_string(),
            peer: c.peer.ip(),
            bound: Mutex::new(None),
            allowed: Mutex::new(Allowed::default()),
            renew_only,
        }))
    }

    pub(super) fn bound(&self) -> Arc<Bound> {
        let inner = &self.0;
        let generation = inner.verifier.registry_generation();
        let mut cached = inner.bound.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, b)) = cached.as_ref()
            && *g == generation
        {
            return b.clone();
        }
        let snapshot = inner.verifier.registry_snapshot();
        let bound = Arc::new(if inner.renew_only {
            crate::authorize::bind_renew_only()
        } else {
            snapshot
                .policies()
                .bind_mqtt(&inner.leaf, &inner.domain, &inner.client_id)
        });
        *cached = Some((generation, bound.clone()));
        bound
    }

    /// Whether the policies allow `action` on `resource`; the reason when not. Server topics
    /// (`$…`) need an Allow statement that names them: one that would also allow a made-up
    /// `$` topic (a wildcard such as `topic:*`) does not count.
    pub(super) fn decide(&self, action: &str, resource: &str) -> Result<(), String> {
        self.decide_in(&self.bound(), action, resource)
    }

    fn decide_in(&self, bound: &Bound, action: &str, resource: &str) -> Result<(), String> {
        crate::authorize::decide_named(
            bound,
            &PolicyRequest {
                action,
                resource,
                source_ip: Some(self.0.peer),
                now: crate::authorize::now(),
            },
        )
    }
}

/// How many topics' decisions a session remembers (beyond, it forgets them all and starts
/// again: a session publishing or receiving more topics than this decides each time).
const REMEMBERED: usize = 1024;

#[derive(Default)]
pub(super) struct Allowed {
    generation: u64,
    /// Per topic, the actions allowed on it (bits: see [`action_bit`]).
    topics: std::collections::HashMap<Box<str>, u8>,
    /// The topic looked up last, and its bits (a device publishing to one topic finds it
    /// without hashing).
    last: (String, u8),
}

/// An action's bit in [`Allowed::topics`]; `None` for one never remembered.
fn action_bit(action: &str) -> Option<u8> {
    match action {
        "mqtt:Publish" => Some(1),
        "mqtt:Receive" => Some(2),
        _ => None,
    }
}

impl SessionAuth {
    /// [`SessionAuth::decide`] on `topic:<topic>`, remembering what it allowed (until the
    /// registry changes). A fleet's devices each publish to their own topics: a subscriber
    /// receiving them, and a device cycling through its own, look up many topics, not a few.
    pub(super) fn decide_topic(&self, action: &'static str, topic: &str) -> Result<(), String> {
        let generation = self.0.verifier.registry_generation();
        let bit = action_bit(action);
        if let Some(bit) = bit {
            let mut allowed = self.0.allowed.lock().unwrap_or_else(|p| p.into_inner());
            if allowed.generation == generation {
                if allowed.last.0 == topic && allowed.last.1 & bit != 0 {
                    return Ok(());
                }
                if let Some(bits) = allowed.topics.get(topic).copied()
                    && bits & bit != 0
                {
                    // (Its buffer kept: no allocation per topic change.)
                    let last = &mut allowed.last;
                    last.0.clear();
                    last.0.push_str(topic);
                    last.1 = bits;
                    return Ok(());
                }
            }
        }
        let bound = self.bound();
        self.decide_in(&bound, action, &format!("topic:{topic}"))?;
        if let Some(bit) = bit
            && bound.timeless()
        {
            let mut allowed = self.0.allowed.lock().unwrap_or_else(|p| p.into_inner());
            if allowed.generation != generation {
                allowed.generation = generation;
                allowed.topics.clear();
                allowed.last.1 = 0;
            }
            allowed.last.1 = 0;
            if let Some(bits) = allowed.topics.get_mut(topic) {
                *bits |= bit;
            } else {
                if allowed.topics.len() >= REMEMBERED {
                    allowed.topics = std::collections::HashMap::new();
                }
                allowed.topics.insert(topic.into(), bit);
            }
        }
        Ok(())
    }
}

impl Receiver for SessionAuth {
    fn may_receive(&self, topic: &str) -> bool {
        let allowed = self.decide_topic("mqtt:Receive", topic).is_ok();
        if !allowed {
            metrics::counter!("portcullis_mqtt_denials_total", "action" => "receive", "reason" => "not-allowed").increment(1);
        }
        allowed
    }
}
