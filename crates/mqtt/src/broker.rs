//! The broker's state: sessions (clean or persistent, with their subscriptions and the QoS 1
//! messages queued while offline), the subscription tree, and retained messages. It knows
//! nothing of sockets or TLS: a connection task calls it and reads what to deliver from its
//! session's channel. Authorization of CONNECT, PUBLISH and SUBSCRIBE happens before calling
//! it; `mqtt:Receive` is checked here, on every delivery, through the session's [`Receiver`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::codec::{PublishProperties, QoS};
use crate::tree::SubscriptionTree;

/// Bounds that keep one session or client from taking the broker's memory.
#[derive(Debug, Clone)]
pub struct Limits {
    /// QoS 1 messages kept for an offline persistent session (newer ones are dropped).
    pub max_queued: usize,
    /// Messages waiting in an online session's channel; beyond, QoS 0 is dropped and QoS 1
    /// waits in the session queue.
    pub channel_capacity: usize,
    /// Retained messages kept (a new topic beyond this is not retained).
    pub max_retained: usize,
    /// Subscriptions per session.
    pub max_subscriptions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queued: 1_000,
            channel_capacity: 4_096,
            max_retained: 100_000,
            max_subscriptions: 100,
        }
    }
}

/// Whether a session may receive messages on a topic (`mqtt:Receive`), decided on every
/// delivery with the policies of the moment.
pub trait Receiver: Send + Sync {
    /// Whether a message on `topic` may be delivered.
    fn may_receive(&self, topic: &str) -> bool;
}

/// An application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: QoS,
    /// Retain flag (as delivered: set for retained messages sent on subscription).
    pub retain: bool,
    /// MQTT 5 properties forwarded to subscribers (topic alias removed).
    pub properties: PublishProperties,
    /// When it expires (MQTT 5 message expiry), if ever.
    pub expires_at: Option<Instant>,
    /// The packet id it was last sent with, when it went back to its session unacknowledged:
    /// a resumed session resends it with that id and the DUP flag (MQTT 3.1.1 §4.4, 5 §4.4).
    pub sent_as: Option<u16>,
}

impl Message {
    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// What a connection task is told.
#[derive(Debug)]
pub enum Outbound {
    /// Deliver this message at this QoS. Boxed: a channel allocates its slots in blocks, and
    /// every session has a channel, so a small slot keeps idle sessions small.
    Deliver(Box<Message>),
    /// Another connection took this client id over: close (MQTT 5: reason 0x8E).
    TakenOver,
    /// An operator or the registry ended the session: close, saying why.
    Closed(String),
}

/// Options of one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// The maximum QoS delivered.
    pub qos: QoS,
    /// MQTT 5: do not deliver the session's own publications.
    pub no_local: bool,
    /// MQTT 5: keep the retain flag as published.
    pub retain_as_published: bool,
}

#[derive(Debug, Clone)]
struct Subscribed {
    options: SubscriptionOptions,
}

struct Session {
    generation: u64,
    online: Option<mpsc::Sender<Outbound>>,
    receiver: Arc<dyn Receiver>,
    filters: HashMap<String, SubscriptionOptions>,
    queue: VecDeque<Message>,
    /// How long the session outlives its connection (zero: not at all).
    expiry: Duration,
    disconnected_at: Option<Instant>,
    connected_at: Instant,
    identity: String,
}

/// A connection's hold on its session.
#[derive(Debug)]
pub struct SessionHandle {
    /// The client id.
    pub client_id: String,
    /// Which connection of this client id this is (a takeover makes a new one).
    pub generation: u64,
    /// Whether an existing session was resumed (CONNACK's session present).
    pub session_present: bool,
    /// Messages queued while offline, to send first.
    pub pending: Vec<Message>,
    /// What to deliver from now on.
    pub outbound: mpsc::Receiver<Outbound>,
}

/// A session as the admin API lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionInfo {
    /// The client id.
    pub client_id: String,
    /// Whether a connection holds it now.
    pub online: bool,
    /// Who connected it (certificate subject and id).
    pub identity: String,
    /// Its subscriptions.
    pub subscriptions: Vec<String>,
    /// Messages queued for it.
    pub queued: usize,
    /// Seconds since it connected, or since it went offline.
    pub seconds: u64,
}

/// What a publication did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Routed {
    /// Deliveries handed to online sessions.
    pub delivered: usize,
    /// Messages queued for offline (or slow) sessions.
    pub queued: usize,
    /// Deliveries refused by `mqtt:Receive`.
    pub denied: usize,
    /// Deliveries dropped (QoS 0 to a slow or offline session, full queues).
    pub dropped: usize,
}

/// Where a broker's messages also go, and what it tells about its subscriptions: the other
/// nodes of a cluster. Called under the broker's lock: implementations only queue, never block.
pub trait Bridge: Send + Sync {
    /// A message published on this node (by a client, HTTPS or the registry), for the others.
    fn published(&self, message: &Message);
    /// This node's sessions now hold `filter` (`true`), or none does any more (`false`).
    fn interest(&self, filter: &str, held: bool);
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Session>,
    tree: SubscriptionTree<Subscribed>,
    retained: HashMap<String, Message>,
    /// How many sessions hold each filter (for the bridge's interest).
    interest: HashMap<String, usize>,
    bridge: Option<Arc<dyn Bridge>>,
    next_generation: u64,
}

/// The broker.
pub struct Broker {
    state: Mutex<State>,
    limits: Limits,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

impl Broker {
    /// An empty broker.
    pub fn new(limits: Limits) -> Broker {
        Broker {
            state: Mutex::new(State::default()),
            limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent state behind (every method makes
        // its changes after its checks), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a session for a connection that passed authentication and `mqtt:Connect`. An
    /// online session with the same client id is told [`Outbound::TakenOver`]. With
    /// `clean_start`, any stored session is discarded; otherwise it is resumed with its
    /// subscriptions and queued messages, but only by the same `identity` (the certificate):
    /// a session another certificate left starts clean, so nothing queued for one device is
    /// handed to another. Queued messages are delivered only if `receiver` may receive them.
    pub fn connect(
        &self,
        client_id: &str,
        clean_start: bool,
        expiry: Duration,
        receiver: Arc<dyn Receiver>,
        identity: &str,
    ) -> SessionHandle {
        let (tx, rx) = mpsc::channel(self.limits.channel_capacity);
        let mut state = self.lock();
        state.next_generation += 1;
        let generation = state.next_generation;
        let now = Instant::now();
        let mut session_present = false;
        let mut pending = Vec::new();
        if let Some(old) = state.sessions.get_mut(client_id)
            && let Some(online) = old.online.take()
        {
            let _ = online.try_send(Outbound::TakenOver);
        }
        let expired = state.sessions.get(client_id).is_some_and(|s| {
            s.disconnected_at
                .is_some_and(|at| now.duration_since(at) >= s.expiry)
        });
        let other_owner = state
            .sessions
            .get(client_id)
            .is_some_and(|s| s.identity != identity);
        if clean_start || expired || other_owner {
            remove_session(&mut state, client_id);
        }
        if let Some(s) = state.sessions.get_mut(client_id) {
            session_present = true;
            pending = s
                .queue
                .drain(..)
                .filter(|m| !m.expired(now) && receiver.may_receive(&m.topic))
                .collect();
            s.generation = generation;
            s.online = Some(tx);
            s.receiver = receiver;
            s.expiry = expiry;
            s.disconnected_at = None;
            s.connected_at = now;
            s.identity = identity.to_string();
        } else {
            state.sessions.insert(
                client_id.to_string(),
                Session {
                    generation,
                    online: Some(tx),
                    receiver,
                    filters: HashMap::new(),
                    queue: VecDeque::new(),
                    expiry,
                    disconnected_at: None,
                    connected_at: now,
                    identity: identity.to_string(),
                },
            );
        }
        SessionHandle {
            client_id: client_id.to_string(),
            generation,
            session_present,
            pending,
            outbound: rx,
        }
    }

    /// Subscribes (the filter checked and `mqtt:Subscribe` allowed by the caller); returns the
    /// retained messages it matches that the session may receive, to send now. `None` when
    /// the connection no longer holds the session, or the session has too many subscriptions.
    pub fn subscribe(
        &self,
        client_id: &str,
        generation: u64,
        filter: &str,
        options: SubscriptionOptions,
    ) -> Option<Vec<Message>> {
        let mut state = self.lock();
        let now = Instant::now();
        let max = self.limits.max_subscriptions;
        let session = state
            .sessions
            .get_mut(client_id)
            .filter(|s| s.generation == generation)?;
        if !session.filters.contains_key(filter) && session.filters.len() >= max {
            return None;
        }
        let new = session
            .filters
            .insert(filter.to_string(), options)
            .is_none();
        let receiver = session.receiver.clone();
        state.tree.insert(filter, client_id, Subscribed { options });
        if new {
            hold(&mut state, filter);
        }
        let retained = state
            .retained
            .values()
            .filter(|m| !m.expired(now) && crate::topic::matches(filter, &m.topic))
            .filter(|m| receiver.may_receive(&m.topic))
            .map(|m| {
                let mut m = m.clone();
                m.qos = min_qos(m.qos, options.qos);
                m.retain = true;
                m
            })
            .collect();
        Some(retained)
    }

    /// Unsubscribes; whether the subscription existed.
    pub fn unsubscribe(&self, client_id: &str, generation: u64, filter: &str) -> bool {
        let mut state = self.lock();
        let Some(session) = state
            .sessions
            .get_mut(client_id)
            .filter(|s| s.generation == generation)
        else {
            return false;
        };
        if session.filters.remove(filter).is_none() {
            return false;
        }
        release(&mut state, filter);
        state.tree.remove(filter, client_id)
    }

    /// Sends what this broker publishes to `bridge` too, and tells it which filters its
    /// sessions hold (those held now at once).
    pub fn set_bridge(&self, bridge: Arc<dyn Bridge>) {
        let mut state = self.lock();
        for filter in state.interest.keys() {
            bridge.interest(filter, true);
        }
        state.bridge = Some(bridge);
    }

    /// Delivers a message another node published to this node's sessions (retained here too
    /// when it is), without sending it back to the bridge.
    pub fn deliver_remote(&self, message: Message) -> Routed {
        self.route(message, None, false)
    }

    /// Publishes a message (its topic checked and `mqtt:Publish` allowed by the caller) from
    /// `publisher` (a client id, or `None` from HTTPS or the registry): retains it if asked,
    /// and delivers it to every session subscribed to its topic that may receive it.
    pub fn publish(&self, message: Message, publisher: Option<&str>) -> Routed {
        self.route(message, publisher, true)
    }

    fn route(&self, message: Message, publisher: Option<&str>, bridged: bool) -> Routed {
        let mut state = self.lock();
        if bridged && let Some(bridge) = &state.bridge {
            bridge.published(&message);
        }
        let now = Instant::now();
        if message.retain {
            if message.payload.is_empty() {
                state.retained.remove(&message.topic);
            } else if state.retained.len() < self.limits.max_retained
                || state.retained.contains_key(&message.topic)
            {
                let mut kept = message.clone();
                kept.retain = true;
                state.retained.insert(message.topic.clone(), kept);
            }
        }
        // The highest QoS among a session's matching subscriptions decides (§3.3.5).
        let mut targets: HashMap<String, SubscriptionOptions> = HashMap::new();
        for (session, sub) in state.tree.matching(&message.topic) {
            if sub.options.no_local && Some(session) == publisher {
                continue;
            }
            targets
                .entry(session.to_string())
                .and_modify(|o| {
                    if (sub.options.qos as u8) > (o.qos as u8) {
                        *o = sub.options;
                    }
                })
                .or_insert(sub.options);
        }
        let mut routed = Routed::default();
        let max_queued = self.limits.max_queued;
        for (client_id, options) in targets {
            let Some(session) = state.sessions.get_mut(&client_id) else {
                continue;
            };
            if !session.receiver.may_receive(&message.topic) {
                routed.denied += 1;
                continue;
            }
            let mut copy = message.clone();
            copy.qos = min_qos(message.qos, options.qos);
            copy.retain = options.retain_as_published && message.retain;
            match &session.online {
                Some(tx) if session.queue.is_empty() => {
                    match tx.try_send(Outbound::Deliver(Box::new(copy))) {
                        Ok(()) => routed.delivered += 1,
                        Err(mpsc::error::TrySendError::Full(Outbound::Deliver(m)))
                            if m.qos != QoS::AtMostOnce =>
                        {
                            queue(session, *m, max_queued, &mut routed, now);
                        }
                        Err(_) => routed.dropped += 1,
                    }
                }
                _ if copy.qos == QoS::AtMostOnce => routed.dropped += 1,
                _ => queue(session, copy, max_queued, &mut routed, now),
            }
        }
        routed
    }

    /// Messages queued for an online session whose channel was full, to send now that it has
    /// room (at most `room`).
    pub fn take_queued(&self, client_id: &str, generation: u64, room: usize) -> Vec<Message> {
        let mut state = self.lock();
        let now = Instant::now();
        let Some(session) = state
            .sessions
            .get_mut(client_id)
            .filter(|s| s.generation == generation)
        else {
            return Vec::new();
        };
        let n = room.min(session.queue.len());
        let receiver = session.receiver.clone();
        session
            .queue
            .drain(..n)
            .filter(|m| !m.expired(now) && receiver.may_receive(&m.topic))
            .collect()
    }

    /// The connection ended. QoS 1 messages it had not seen acknowledged go back to the front
    /// of the queue, followed by those still in its channel (`outbound`: routed to it but not
    /// taken yet, drained under the lock that stops new ones); a session without expiry ends
    /// here.
    pub fn disconnected(
        &self,
        client_id: &str,
        generation: u64,
        unacknowledged: Vec<Message>,
        outbound: Option<&mut mpsc::Receiver<Outbound>>,
    ) {
        let mut unacknowledged = unacknowledged;
        let mut state = self.lock();
        let Some(session) = state
            .sessions
            .get_mut(client_id)
            .filter(|s| s.generation == generation)
        else {
            return;
        };
        session.online = None;
        // Publishers route under this lock: with `online` gone, nothing more enters the
        // channel, so what it holds now is all that was acknowledged to them and not yet sent.
        if let Some(outbound) = outbound {
            while let Ok(out) = outbound.try_recv() {
                if let Outbound::Deliver(m) = out
                    && m.qos != QoS::AtMostOnce
                {
                    unacknowledged.push(*m);
                }
            }
        }
        if session.expiry.is_zero() {
            remove_session(&mut state, client_id);
            return;
        }
        session.disconnected_at = Some(Instant::now());
        for m in unacknowledged.into_iter().rev() {
            if session.queue.len() >= self.limits.max_queued {
                session.queue.pop_back();
            }
            session.queue.push_front(m);
        }
    }

    /// Ends a session now (an operator's disconnect, a revoked certificate): its connection is
    /// told why; with `forget`, the stored session goes too. Whether there was one.
    pub fn close(&self, client_id: &str, reason: &str, forget: bool) -> bool {
        let mut state = self.lock();
        let Some(session) = state.sessions.get_mut(client_id) else {
            return false;
        };
        if let Some(tx) = session.online.take() {
            let _ = tx.try_send(Outbound::Closed(reason.to_string()));
            session.disconnected_at = Some(Instant::now());
        }
        if forget {
            remove_session(&mut state, client_id);
        }
        true
    }

    /// Removes offline sessions whose expiry passed; how many.
    pub fn expire_sessions(&self) -> usize {
        let mut state = self.lock();
        let now = Instant::now();
        let expired: Vec<String> = state
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.online.is_none()
                    && s.disconnected_at
                        .is_some_and(|at| now.duration_since(at) >= s.expiry)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            remove_session(&mut state, id);
        }
        state.retained.retain(|_, m| !m.expired(now));
        expired.len()
    }

    /// Every session, by client id.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let state = self.lock();
        let now = Instant::now();
        let mut out: Vec<SessionInfo> = state
            .sessions
            .iter()
            .map(|(id, s)| SessionInfo {
                client_id: id.clone(),
                online: s.online.is_some(),
                identity: s.identity.clone(),
                subscriptions: {
                    let mut f: Vec<String> = s.filters.keys().cloned().collect();
                    f.sort();
                    f
                },
                queued: s.queue.len(),
                seconds: now
                    .duration_since(s.disconnected_at.unwrap_or(s.connected_at))
                    .as_secs(),
            })
            .collect();
        out.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        out
    }

    /// How many retained messages are kept.
    pub fn retained_count(&self) -> usize {
        self.lock().retained.len()
    }

    /// Counts for the metrics endpoint, taken in one pass under the lock.
    pub fn stats(&self) -> BrokerStats {
        let state = self.lock();
        let mut stats = BrokerStats {
            retained: state.retained.len(),
            ..BrokerStats::default()
        };
        for s in state.sessions.values() {
            if s.online.is_some() {
                stats.online += 1;
            } else {
                stats.offline += 1;
            }
            stats.queued += s.queue.len();
            stats.subscriptions += s.filters.len();
        }
        stats
    }
}

/// Broker-wide counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BrokerStats {
    /// Sessions a connection holds.
    pub online: usize,
    /// Persistent sessions kept while their client is away.
    pub offline: usize,
    /// Messages queued for sessions (offline, or online and behind).
    pub queued: usize,
    /// Subscriptions of every session.
    pub subscriptions: usize,
    /// Retained messages.
    pub retained: usize,
}

fn queue(session: &mut Session, m: Message, max: usize, routed: &mut Routed, now: Instant) {
    session.queue.retain(|q| !q.expired(now));
    if session.queue.len() >= max {
        routed.dropped += 1;
    } else {
        session.queue.push_back(m);
        routed.queued += 1;
    }
}

fn remove_session(state: &mut State, client_id: &str) {
    if let Some(s) = state.sessions.remove(client_id) {
        for filter in s.filters.keys() {
            state.tree.remove(filter, client_id);
            release(state, filter);
        }
    }
}

/// One more session holds `filter`: the bridge hears of the first.
fn hold(state: &mut State, filter: &str) {
    let n = state.interest.entry(filter.to_string()).or_insert(0);
    *n += 1;
    if *n == 1
        && let Some(bridge) = &state.bridge
    {
        bridge.interest(filter, true);
    }
}

/// One session fewer holds `filter`: the bridge hears when none does.
fn release(state: &mut State, filter: &str) {
    let Some(n) = state.interest.get_mut(filter) else {
        return;
    };
    *n -= 1;
    if *n == 0 {
        state.interest.remove(filter);
        if let Some(bridge) = &state.bridge {
            bridge.interest(filter, false);
        }
    }
}

fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) { a } else { b }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Allow(Vec<&'static str>);

    impl Receiver for Allow {
        fn may_receive(&self, topic: &str) -> bool {
            self.0.iter().any(|f| crate::topic::matches(f, topic))
        }
    }

    fn everything() -> Arc<dyn Receiver> {
        Arc::new(Allow(vec!["#"]))
    }

    fn msg(topic: &str, qos: QoS, retain: bool) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from_static(b"hello"),
            qos,
            retain,
            properties: PublishProperties::default(),
            expires_at: None,
            sent_as: None,
        }
    }

    fn sub(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions {
            qos,
            no_local: false,
            retain_as_published: false,
        }
    }

    fn delivered(h: &mut SessionHandle) -> Vec<Message> {
        let mut out = Vec::new();
        while let Ok(Outbound::Deliver(m)) = h.outbound.try_recv() {
            out.push(*m);
        }
        out
    }

    #[test]
    fn publish_reaches_matching_subscribers_at_the_lower_qos() {
        let b = Broker::new(Limits::default());
        let mut a = b.connect("a", true, Duration::ZERO, everything(), "a");
        let mut c = b.connect("c", true, Duration::ZERO, everything(), "c");
        b.subscribe("a", a.generation, "d/+/t", sub(QoS::AtMostOnce));
        b.subscribe("c", c.generation, "d/#", sub(QoS::AtLeastOnce));
        b.subscribe("c", c.generation, "d/1/t", sub(QoS::AtMostOnce));
        let routed = b.publish(msg("d/1/t", QoS::AtLeastOnce, false), None);
        assert_eq!(routed.delivered, 2);
        assert_eq!(delivered(&mut a)[0].qos, QoS::AtMostOnce);
        let got = delivered(&mut c);
        assert_eq!(
            got.len(),
            1,
            "once per session, at the highest matching QoS"
        );
        assert_eq!(got[0].qos, QoS::AtLeastOnce);
        assert_eq!(
            b.publish(msg("other", QoS::AtMostOnce, false), None)
                .delivered,
            0
        );
    }

    #[test]
    fn receive_is_checked_on_every_delivery() {
        let b = Broker::new(Limits::default());
        let mut a = b.connect(
            "a",
            true,
            Duration::ZERO,
            Arc::new(Allow(vec!["ok/#"])),
            "a",
        );
        b.subscribe("a", a.generation, "#", sub(QoS::AtMostOnce));
        let routed = b.publish(msg("secret/x", QoS::AtMostOnce, false), None);
        assert_eq!((routed.delivered, routed.denied), (0, 1));
        b.publish(msg("ok/x", QoS::AtMostOnce, false), None);
        assert_eq!(delivered(&mut a).len(), 1);
    }

    #[test]
    fn retained_messages_are_kept_replaced_cleared_and_sent_on_subscribe() {
        let b = Broker::new(Limits::default());
        b.publish(msg("s/1", QoS::AtLeastOnce, true), None);
        let mut newer = msg("s/1", QoS::AtMostOnce, true);
        newer.payload = Bytes::from_static(b"newer");
        b.publish(newer, None);
        b.publish(msg("s/2", QoS::AtMostOnce, true), None);
        let a = b.connect("a", true, Duration::ZERO, Arc::new(Allow(vec!["s/1"])), "a");
        let retained = b
            .subscribe("a", a.generation, "s/+", sub(QoS::AtLeastOnce))
            .unwrap();
        assert_eq!(retained.len(), 1, "s/2 is not receivable");
        assert_eq!(retained[0].payload, Bytes::from_static(b"newer"));
        assert!(retained[0].retain);
        let mut empty = msg("s/1", QoS::AtMostOnce, true);
        empty.payload = Bytes::new();
        b.publish(empty, None);
        assert_eq!(b.retained_count(), 1);
    }

    #[test]
    fn messages_routed_to_a_closing_connection_go_back_to_its_session() {
        let b = Broker::new(Limits::default());
        let mut a = b.connect("a", true, Duration::from_secs(3600), everything(), "a");
        b.subscribe("a", a.generation, "q/#", sub(QoS::AtLeastOnce));
        // Routed into the connection's channel while it was closing, never written.
        assert_eq!(
            b.publish(msg("q/1", QoS::AtLeastOnce, false), None)
                .delivered,
            1
        );
        assert_eq!(
            b.publish(msg("q/0", QoS::AtMostOnce, false), None)
                .delivered,
            1
        );
        b.disconnected("a", a.generation, Vec::new(), Some(&mut a.outbound));
        let resumed = b.connect("a", false, Duration::from_secs(3600), everything(), "a");
        let topics: Vec<&str> = resumed.pending.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(
            topics,
            ["q/1"],
            "the QoS 1 message is kept, the QoS 0 one is not"
        );
    }

    #[test]
    fn persistent_sessions_queue_qos1_while_offline_and_resume() {
        let b = Broker::new(Limits {
            max_queued: 2,
            ..Limits::default()
        });
        let a = b.connect("a", true, Duration::from_secs(3600), everything(), "a");
        b.subscribe("a", a.generation, "q/#", sub(QoS::AtLeastOnce));
        b.disconnected(
            "a",
            a.generation,
            vec![msg("q/unacked", QoS::AtLeastOnce, false)],
            None,
        );
        let r = b.publish(msg("q/1", QoS::AtLeastOnce, false), None);
        assert_eq!(r.queued, 1);
        let r = b.publish(msg("q/2", QoS::AtLeastOnce, false), None);
        assert_eq!(r.dropped, 1, "the queue is bounded");
        assert_eq!(
            b.publish(msg("q/0", QoS::AtMostOnce, false), None).dropped,
            1,
            "QoS 0 is not queued"
        );
        let again = b.connect("a", false, Duration::from_secs(3600), everything(), "a");
        assert!(again.session_present);
        let topics: Vec<&str> = again.pending.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(topics, ["q/unacked", "q/1"]);
        // The subscription survived: a new message is delivered live.
        let mut again = again;
        b.publish(msg("q/3", QoS::AtLeastOnce, false), None);
        assert_eq!(delivered(&mut again).len(), 1);
    }

    #[test]
    fn a_session_resumed_by_another_certificate_starts_clean_and_queues_are_checked() {
        let b = Broker::new(Limits::default());
        let hour = Duration::from_secs(3600);
        let a = b.connect("dev", true, hour, everything(), "CN=dev (aaaa)");
        b.subscribe("dev", a.generation, "secret/#", sub(QoS::AtLeastOnce))
            .unwrap();
        b.disconnected("dev", a.generation, Vec::new(), None);
        b.publish(msg("secret/1", QoS::AtLeastOnce, false), None);
        // Another certificate takes the client id over: nothing of the first session.
        let other = b.connect("dev", false, hour, everything(), "CN=mallory (bbbb)");
        assert!(!other.session_present);
        assert!(other.pending.is_empty());
        b.publish(msg("secret/2", QoS::AtLeastOnce, false), None);
        b.disconnected("dev", other.generation, Vec::new(), None);
        // The same certificate resumes, but only with what its policies let it receive now.
        let a = b.connect("dev", true, hour, everything(), "CN=dev (aaaa)");
        b.subscribe("dev", a.generation, "#", sub(QoS::AtLeastOnce))
            .unwrap();
        b.disconnected("dev", a.generation, Vec::new(), None);
        b.publish(msg("secret/3", QoS::AtLeastOnce, false), None);
        b.publish(msg("public/4", QoS::AtLeastOnce, false), None);
        let again = b.connect(
            "dev",
            false,
            hour,
            Arc::new(Allow(vec!["public/4"])),
            "CN=dev (aaaa)",
        );
        assert!(again.session_present);
        let topics: Vec<&str> = again.pending.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(topics, ["public/4"]);
    }

    #[test]
    fn clean_sessions_end_with_their_connection_and_takeover_closes_the_first() {
        let b = Broker::new(Limits::default());
        let mut first = b.connect("dup", true, Duration::from_secs(60), everything(), "x");
        b.subscribe("dup", first.generation, "t", sub(QoS::AtMostOnce));
        let second = b.connect("dup", false, Duration::ZERO, everything(), "x");
        assert!(matches!(first.outbound.try_recv(), Ok(Outbound::TakenOver)));
        assert!(second.session_present);
        // The first connection's late disconnect does not touch the second's session.
        b.disconnected("dup", first.generation, Vec::new(), None);
        assert!(b.sessions()[0].online);
        b.disconnected("dup", second.generation, Vec::new(), None);
        assert!(b.sessions().is_empty(), "expiry zero: gone at disconnect");
        assert_eq!(
            b.publish(msg("t", QoS::AtMostOnce, false), None).delivered,
            0
        );
        let clean = b.connect("dup", true, Duration::ZERO, everything(), "x");
        assert!(!clean.session_present);
    }

    #[test]
    fn no_local_and_close() {
        let b = Broker::new(Limits::default());
        let mut a = b.connect("a", true, Duration::ZERO, everything(), "a");
        b.subscribe(
            "a",
            a.generation,
            "t",
            SubscriptionOptions {
                qos: QoS::AtMostOnce,
                no_local: true,
                retain_as_published: false,
            },
        );
        assert_eq!(
            b.publish(msg("t", QoS::AtMostOnce, false), Some("a"))
                .delivered,
            0
        );
        assert_eq!(
            b.publish(msg("t", QoS::AtMostOnce, false), Some("z"))
                .delivered,
            1
        );
        delivered(&mut a);
        assert!(b.close("a", "revoked", true));
        assert!(matches!(a.outbound.try_recv(), Ok(Outbound::Closed(r)) if r == "revoked"));
        assert!(b.sessions().is_empty());
        assert!(!b.close("nobody", "x", true));
    }
}
