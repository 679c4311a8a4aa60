//! The broker's state: sessions (clean or persistent, with their subscriptions and the QoS 1
//! messages queued while offline), the subscription tree, and retained messages. It knows
//! nothing of sockets or TLS: a connection task calls it and reads what to deliver from its
//! session's channel. Authorization of CONNECT, PUBLISH and SUBSCRIBE happens before calling
//! it; `mqtt:Receive` is checked here, on every delivery, through the session's [`Receiver`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// How a message kept by the cluster for a persistent session is settled: acknowledged once
/// the client acknowledged it (PUBACK, or PUBREC for QoS 2), or returned to be delivered again
/// (the connection ended first).
#[derive(Clone)]
pub struct Receipt(Arc<dyn Fn(bool) + Send + Sync>);

impl Receipt {
    /// A receipt calling `settle(true)` when acknowledged, `settle(false)` when returned.
    pub fn new(settle: impl Fn(bool) + Send + Sync + 'static) -> Receipt {
        Receipt(Arc::new(settle))
    }

    /// The client acknowledged the message.
    pub fn acknowledged(&self) {
        (self.0)(true);
    }

    /// The message goes back, to be delivered again.
    pub fn returned(&self) {
        (self.0)(false);
    }
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Receipt")
    }
}

impl PartialEq for Receipt {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Receipt {}

/// A persistent session as the cluster keeps it (for a node the client reconnects to).
#[derive(Debug, Clone)]
pub struct StoredSession {
    /// Who connected it (certificate subject and id): another certificate starts clean.
    pub identity: String,
    /// Its subscriptions.
    pub subscriptions: Vec<(String, SubscriptionOptions)>,
    /// How long it is kept after its connection (a refused CONNECT leaves it so).
    pub expiry: Duration,
    /// Which life of the client id's session it is (what the cluster kept for it is kept
    /// under it): the connection resuming it goes on with it.
    pub incarnation: u64,
    /// How long it had been offline when read (`None`: online, or not known).
    pub offline_for: Option<Duration>,
}

/// A claim of a client id made: which one (the cluster's revision of it: a later claim on
/// this node is another connection's), and the session the cluster keeps for the client id,
/// if any.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The claim's revision.
    pub revision: u64,
    /// The persistent session kept for the client id.
    pub session: Option<StoredSession>,
}

/// The answer to a claim.
pub type Claimed = tokio::sync::oneshot::Receiver<Result<Claim, String>>;

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
    /// QoS 2: the client acknowledged it with PUBREC and PUBREL was sent, so a resumed session
    /// sends PUBREL again (with `sent_as`), not the message.
    pub released: bool,
    /// The packet id to send it with first, when free: the cluster derives a kept QoS 2
    /// message's from its stream sequence, so that a node sending it again after another died
    /// uses the id the client already knows it by (MQTT 5 §4.3.3: acknowledged again, not
    /// delivered twice).
    pub preferred_id: Option<u16>,
    /// Kept by the cluster for a persistent session: settled when the client acknowledges it.
    pub receipt: Option<Receipt>,
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
    /// The connection has QoS 1 and 2 messages waiting beyond its window
    /// ([`SessionHandle::backlogged`]): further ones wait here, in `queue`.
    backlogged: Arc<AtomicBool>,
    receiver: Arc<dyn Receiver>,
    filters: HashMap<String, SubscriptionOptions>,
    queue: VecDeque<Message>,
    /// The earliest expiry among messages queued (a hint: it may have left the queue since).
    queue_expiry: Option<Instant>,
    /// How long the session outlives its connection (zero: not at all).
    expiry: Duration,
    disconnected_at: Option<Instant>,
    connected_at: Instant,
    identity: String,
    /// QoS 2 packet ids received from the client and not yet released (PUBREL): a PUBLISH
    /// sent again with one of them is not routed again, across reconnections.
    awaiting_release: Vec<u16>,
    /// In a cluster, a persistent session: its QoS 1 and 2 messages come from the cluster.
    durable: bool,
    /// In a cluster, which life of the client id's persistent session this is (`None`: none
    /// yet).
    incarnation: Option<u64>,
    /// In a cluster, the claim of the client id its connection made.
    claim: Option<u64>,
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
    /// QoS 2 packet ids the client sent and has not released yet (resumed sessions).
    pub awaiting_release: Vec<u16>,
    /// What to deliver from now on.
    pub outbound: mpsc::Receiver<Outbound>,
    /// Set by the connection while QoS 1 and 2 messages wait beyond what it may have in
    /// flight: the broker then queues further ones in the session's queue (bounded by
    /// `max_queued`, beyond it dropped and counted) instead of the channel, and the connection
    /// takes them with [`Broker::take_queued`] once it has room. Cleared by the connection
    /// (see [`SessionHandle::may_take_queued`]).
    pub backlogged: Arc<AtomicBool>,
    /// The expiry the session resumed here had before this connection (a refused CONNECT
    /// gives it back: see [`Broker::refused`]).
    pub resumed_expiry: Option<Duration>,
    /// Since when the session resumed here was offline (a refused CONNECT gives it back: its
    /// expiry counts from then, not from the refusal). The caller may set it from what the
    /// cluster kept ([`StoredSession::offline_for`]) when this node did not hold the session.
    pub resumed_offline_since: Option<Instant>,
}

impl SessionHandle {
    /// Whether the connection, with room in flight and nothing waiting of its own, may take
    /// what the broker queued for it: only once its channel is empty too (what is in the
    /// channel came before anything queued). Clears [`SessionHandle::backlogged`] first, so
    /// that what comes after it is taken goes through the channel again once the queue is
    /// empty.
    pub fn may_take_queued(&self) -> bool {
        self.backlogged.store(false, Ordering::Release);
        self.outbound.is_empty()
    }
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

/// What a subscription brought.
#[derive(Debug)]
pub struct Subscription {
    /// Retained messages to send now (in a cluster, the bridge sends them instead).
    pub retained: Vec<Message>,
    /// In a cluster: answered once the other nodes' messages reach this node (SUBACK waits).
    pub ready: Vec<Confirmation>,
}

/// What a publication did.
#[derive(Debug, Default)]
pub struct Routed {
    /// Deliveries handed to online sessions.
    pub delivered: usize,
    /// Messages queued for offline (or slow) sessions.
    pub queued: usize,
    /// Deliveries refused by `mqtt:Receive`.
    pub denied: usize,
    /// Deliveries dropped (QoS 0 to a slow or offline session, full queues).
    pub dropped: usize,
    /// In a cluster: deliveries at QoS 1 or 2 left to the cluster, which keeps them for a
    /// persistent session here (also counted in `queued`).
    pub kept: usize,
    /// In a cluster: answered once the cluster stored the message (QoS 1 and 2, retained), to
    /// acknowledge it to its publisher only then.
    pub confirm: Option<Confirmation>,
}

/// A wait until the cluster has room for more publications.
pub type Backpressure = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The answer to something a [`Bridge`] was asked to do durably: `Err` says why it could not.
pub type Confirmation = tokio::sync::oneshot::Receiver<Result<(), String>>;

/// Where a broker's messages also go, and what it tells about its subscriptions: the other
/// nodes of a cluster. Called under the broker's lock: implementations only queue, never block.
/// With a bridge, retained messages and shared subscriptions are the cluster's: the bridge
/// keeps retained messages and delivers shared subscriptions' messages
/// ([`Broker::deliver_shared`]), balanced across the nodes.
pub trait Bridge: Send + Sync {
    /// A message published on this node (by a client, HTTPS or the registry), for the others;
    /// a QoS 1 or 2 or retained message is answered once the cluster has it: stored, or (a QoS 1
    /// message no persistent session or shared group needs) written to the cluster's bus.
    /// `publisher`: the client id that published it (No Local applies to it on every node).
    ///
    /// `exactly_once`: a persistent session's QoS 2 message's (packet id, DUP flag), so that the
    /// cluster stores it once even when the client sends it again to another node after its node
    /// died.
    ///
    /// `keep`: a persistent session of this node matched it at QoS 1 or 2 and was left to the
    /// cluster, which must keep it for that session (whatever it knows of other nodes').
    fn published(
        &self,
        message: Message,
        publisher: Option<&str>,
        exactly_once: Option<(u16, bool)>,
        keep: bool,
    ) -> Option<Confirmation>;
    /// A persistent session's client released (PUBREL) its QoS 2 message `packet_id`: the
    /// cluster forgets what it kept to store it once. Answered (PUBCOMP may be sent) once
    /// forgotten.
    fn released(&self, _client_id: &str, _packet_id: u16) -> Option<Confirmation> {
        None
    }
    /// This node's sessions now hold `filter` (`true`), or none does any more (`false`);
    /// shared subscriptions (`$share/GROUP/FILTER`) too. A new interest is answered once the
    /// other nodes' messages on it reach this node.
    fn interest(&self, filter: &str, held: bool) -> Option<Confirmation>;
    /// The retained messages matching `filter`, to hand to a session that just subscribed
    /// with [`Broker::deliver_retained`].
    fn retained(
        &self,
        client_id: &str,
        generation: u64,
        filter: &str,
        options: SubscriptionOptions,
    );
    /// A connection wants `client_id`: the cluster records this node as its owner (a session
    /// another node holds is taken over there). Answered once recorded, with the persistent
    /// session the cluster keeps for it (discarded with `clean_start`, or when another
    /// certificate than `identity` left it).
    fn claim(&self, client_id: &str, clean_start: bool, identity: &str) -> Claimed;
    /// This node no longer holds `client_id` (its session ended): the claim `claim` its
    /// connection made, if it made one (not a newer connection's claim).
    fn release(&self, client_id: &str, claim: Option<u64>);
    /// `client_id`'s session (generation `generation`, of `identity`) is persistent and kept by
    /// the cluster for `expiry` after its connection. `incarnation`: the life of the session
    /// it continues (`None`: a new one). Returns the session's incarnation (a new one's, made
    /// here), which the session keeps while it lives, online or not.
    fn durable_session(
        &self,
        client_id: &str,
        generation: u64,
        identity: &str,
        expiry: Duration,
        incarnation: Option<u64>,
    ) -> u64;
    /// A persistent session holds `filter` (recorded, to resume it on any node): at QoS 1 or 2,
    /// its QoS 1 and 2 messages are kept by the cluster and handed to
    /// [`Broker::deliver_durable`] while the session is online here; at QoS 0 (a subscription
    /// taken again at QoS 0 included), nothing is kept. Answered once messages published from
    /// now on are kept.
    fn durable_subscribe(
        &self,
        client_id: &str,
        generation: u64,
        filter: &str,
        options: SubscriptionOptions,
    ) -> Option<Confirmation>;
    /// A persistent session no longer holds `filter`.
    fn durable_unsubscribe(&self, client_id: &str, filter: &str);
    /// A persistent session's connection ended, `offline_for` ago (the cluster keeps its
    /// messages for `expiry` from then; not zero after a refused CONNECT, which leaves the
    /// offline clock as it was).
    fn durable_offline(&self, client_id: &str, expiry: Duration, offline_for: Duration);
    /// When the cluster is behind with what this node publishes: a wait until it has caught up
    /// (publishers stop reading until then: flow control instead of dropping).
    fn backpressure(&self) -> Option<Backpressure> {
        None
    }
    /// A persistent session ended for good (clean start, expiry, revocation), as held under
    /// `claim` (its last connection's claim): a newer claim of the client id on this node
    /// (a connection that may have resumed it meanwhile) makes it that connection's, not
    /// ended.
    fn durable_end(&self, client_id: &str, claim: Option<u64>);
}

/// The members of one shared subscription (`$share/GROUP/FILTER`) on this node.
#[derive(Default)]
struct SharedGroup {
    members: Vec<(String, SubscriptionOptions)>,
    /// Where the next message's search for a member starts (round robin).
    next: usize,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Session>,
    tree: SubscriptionTree<Subscribed>,
    /// Shared subscriptions: the tree holds each group at its filter (the group's full
    /// `$share/…` filter as key and value), `shared` its members.
    shared_tree: SubscriptionTree<String>,
    shared: HashMap<String, SharedGroup>,
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
        let backlogged = Arc::new(AtomicBool::new(false));
        let mut state = self.lock();
        state.next_generation += 1;
        let generation = state.next_generation;
        let now = Instant::now();
        let mut session_present = false;
        let mut pending = Vec::new();
        let mut awaiting_release = Vec::new();
        let mut resumed_expiry = None;
        let mut resumed_offline_since = None;
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
        // The claim the session was held under: a claim older than it, answered first but
        // connecting late, holds the session under the newer one (see `claimed`).
        let held_under = state.sessions.get(client_id).and_then(|s| s.claim);
        if clean_start || expired || other_owner {
            remove_session(&mut state, client_id, true);
        }
        if let Some(s) = state.sessions.get_mut(client_id) {
            session_present = true;
            pending = s
                .queue
                .drain(..)
                .filter(|m| sendable(m, now, receiver.as_ref()))
                .collect();
            awaiting_release = std::mem::take(&mut s.awaiting_release);
            resumed_expiry = Some(s.expiry);
            resumed_offline_since = s.disconnected_at;
            s.generation = generation;
            s.online = Some(tx);
            s.backlogged = backlogged.clone();
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
                    backlogged: backlogged.clone(),
                    receiver,
                    filters: HashMap::new(),
                    queue: VecDeque::new(),
                    queue_expiry: None,
                    expiry,
                    disconnected_at: None,
                    connected_at: now,
                    identity: identity.to_string(),
                    awaiting_release: Vec::new(),
                    durable: false,
                    incarnation: None,
                    claim: held_under,
                },
            );
        }
        SessionHandle {
            client_id: client_id.to_string(),
            generation,
            session_present,
            pending,
            awaiting_release,
            outbound: rx,
            backlogged,
            resumed_expiry,
            resumed_offline_since,
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
    ) -> Option<Subscription> {
        self.add_subscription(client_id, generation, filter, options, true)
    }

    /// A subscription of a session the cluster kept, restored on this node: as
    /// [`Broker::subscribe`], without retained messages (MQTT sends them on SUBSCRIBE only).
    pub fn restore_subscription(
        &self,
        client_id: &str,
        generation: u64,
        filter: &str,
        options: SubscriptionOptions,
    ) -> Option<Subscription> {
        self.add_subscription(client_id, generation, filter, options, false)
    }

    fn add_subscription(
        &self,
        client_id: &str,
        generation: u64,
        filter: &str,
        options: SubscriptionOptions,
        with_retained: bool,
    ) -> Option<Subscription> {
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
        let durable = session.durable;
        let receiver = session.receiver.clone();
        if let Ok(Some((_, inner))) = crate::topic::shared(filter) {
            // Shared subscriptions get no retained messages (MQTT 5 §4.8.2).
            let group = state.shared.entry(filter.to_string()).or_default();
            group.members.retain(|(id, _)| id != client_id);
            group.members.push((client_id.to_string(), options));
            state.shared_tree.insert(inner, filter, filter.to_string());
            let mut ready: Vec<Confirmation> = if new {
                hold(&mut state, filter).into_iter().collect()
            } else {
                Vec::new()
            };
            // A persistent session's membership is the cluster's too: it resumes with it on
            // any node (the group's messages are kept by the group, not the session).
            if let Some(bridge) = &state.bridge
                && durable
            {
                ready.extend(bridge.durable_subscribe(client_id, generation, filter, options));
            }
            return Some(Subscription {
                retained: Vec::new(),
                ready,
            });
        }
        state.tree.insert(filter, client_id, Subscribed { options });
        let mut ready: Vec<Confirmation> = if new {
            hold(&mut state, filter).into_iter().collect()
        } else {
            Vec::new()
        };
        if let Some(bridge) = &state.bridge {
            // Every subscription of a persistent session, whatever its QoS: it resumes with
            // them on any node (at QoS 0, the cluster keeps no messages, and stops keeping
            // those of a filter taken again at QoS 0).
            if durable {
                ready.extend(bridge.durable_subscribe(client_id, generation, filter, options));
            }
            if with_retained {
                bridge.retained(client_id, generation, filter, options);
            }
            return Some(Subscription {
                retained: Vec::new(),
                ready,
            });
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
        Some(Subscription { retained, ready })
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
        if session.durable
            && let Some(bridge) = &state.bridge
        {
            bridge.durable_unsubscribe(client_id, filter);
        }
        unsubscribed(&mut state, client_id, filter);
        true
    }

    /// Sends what this broker publishes to `bridge` too, and tells it which filters its
    /// sessions hold (those held now at once).
    pub fn set_bridge(&self, bridge: Arc<dyn Bridge>) {
        let mut state = self.lock();
        for filter in state.interest.keys() {
            let _ = bridge.interest(filter, true);
        }
        state.bridge = Some(bridge);
    }

    /// Delivers a message another node published to this node's sessions, without sending it
    /// back to the bridge.
    pub fn deliver_remote(&self, message: Message) -> Routed {
        self.route(message, None, None)
    }

    /// [`Broker::deliver_remote`] for messages from another node, in order (a batch): under
    /// one lock, the subscribers of each run of one topic's messages looked up once.
    pub fn deliver_remote_all(&self, messages: Vec<Message>) -> Routed {
        let mut state = self.lock();
        let mut routed = Routed::default();
        if messages.is_empty() {
            return routed;
        }
        if state.bridge.is_none() {
            // Shared subscriptions are routed here: one by one.
            drop(state);
            for m in messages {
                let one = self.deliver_remote(m);
                routed.delivered += one.delivered;
                routed.queued += one.queued;
                routed.denied += one.denied;
                routed.dropped += one.dropped;
                routed.kept += one.kept;
            }
            return routed;
        }
        let now = Instant::now();
        let max_queued = self.limits.max_queued;
        let st = &mut *state;
        // Where each run of one topic's messages starts (found before the messages are taken).
        let starts: Vec<bool> = std::iter::once(true)
            .chain(messages.windows(2).map(|w| w[0].topic != w[1].topic))
            .collect();
        let mut run = None;
        for (message, start) in messages.into_iter().zip(starts) {
            let targets = match &run {
                Some(targets) if !start => targets,
                _ => run.insert(targets(&st.tree, &message.topic, None)),
            };
            deliver_all(
                &mut st.sessions,
                targets,
                message,
                false,
                &mut routed,
                max_queued,
                now,
            );
        }
        routed
    }

    /// Delivers a message of the shared subscription `filter` (`$share/GROUP/FILTER`) to one of
    /// its members on this node, round robin, online members first (the bridge chose this node
    /// among the group's).
    pub fn deliver_shared(&self, filter: &str, message: Message) -> Routed {
        let mut state = self.lock();
        let mut routed = Routed::default();
        route_shared(
            &mut state,
            filter,
            &message,
            &mut routed,
            self.limits.max_queued,
        );
        routed
    }

    /// Whether a member of the shared subscription `filter` is online on this node.
    pub fn shared_online(&self, filter: &str) -> bool {
        let state = self.lock();
        state.shared.get(filter).is_some_and(|g| {
            g.members
                .iter()
                .any(|(id, _)| state.sessions.get(id).is_some_and(|s| s.online.is_some()))
        })
    }

    /// A QoS 1 or 2 message the cluster kept for the shared subscription `filter`: handed to
    /// its next member in turn online on this node that may receive it, settled by the
    /// message's receipt (at once for a member subscribed at QoS 0). `false`: no member is
    /// online here (the caller gives it back for another node's, or for later).
    pub fn deliver_shared_kept(&self, filter: &str, message: Message) -> bool {
        let mut state = self.lock();
        let max_queued = self.limits.max_queued;
        let Some(group) = state.shared.get(filter) else {
            return false;
        };
        let n = group.members.len();
        let start = if n == 0 { 0 } else { group.next % n };
        let mut online = false;
        let mut chosen = None;
        for i in 0..n {
            let (id, options) = &group.members[(start + i) % n];
            let Some(session) = state.sessions.get(id).filter(|s| s.online.is_some()) else {
                continue;
            };
            online = true;
            if session.receiver.may_receive(&message.topic) {
                chosen = Some(((start + i) % n, id.clone(), *options));
                break;
            }
        }
        let Some((index, id, options)) = chosen else {
            if online && let Some(r) = &message.receipt {
                // Online members, none allowed to receive it: settled, never delivered.
                r.acknowledged();
            }
            return online;
        };
        if let Some(group) = state.shared.get_mut(filter) {
            group.next = (index + 1) % n;
        }
        let Some(session) = state.sessions.get_mut(&id) else {
            return false;
        };
        let mut m = message;
        m.retain = false;
        m.qos = min_qos(m.qos, options.qos);
        if m.qos == QoS::AtMostOnce
            && let Some(r) = m.receipt.take()
        {
            r.acknowledged();
        }
        if !session.queue.is_empty() {
            if session.queue.len() < max_queued {
                session.enqueue(false, m);
            } else if let Some(r) = &m.receipt {
                r.returned();
            }
            return true;
        }
        let Some(tx) = &session.online else {
            return false;
        };
        match tx.try_send(Outbound::Deliver(Box::new(m))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(Outbound::Deliver(m))) => {
                if session.queue.len() < max_queued {
                    session.enqueue(false, *m);
                } else if let Some(r) = &m.receipt {
                    r.returned();
                }
            }
            Err(mpsc::error::TrySendError::Full(_) | mpsc::error::TrySendError::Closed(_)) => {
                return false;
            }
        }
        true
    }

    /// Retained messages the bridge found for a subscription: delivered to the session (if the
    /// connection still holds it and may receive them) as retained, at most at `options.qos`.
    pub fn deliver_retained(
        &self,
        client_id: &str,
        generation: u64,
        messages: Vec<Message>,
        options: SubscriptionOptions,
    ) -> Routed {
        let mut state = self.lock();
        let now = Instant::now();
        let mut routed = Routed::default();
        let max_queued = self.limits.max_queued;
        let Some(session) = state
            .sessions
            .get_mut(client_id)
            .filter(|s| s.generation == generation)
        else {
            return routed;
        };
        for mut m in messages {
            if m.expired(now) {
                continue;
            }
            m.retain = true;
            deliver_to(session, m, options.qos, &mut routed, max_queued, now);
        }
        routed
    }

    /// In a cluster that is behind with this node's publications: a wait until it caught up.
    /// A publishing connection awaits it before reading more.
    pub fn backpressure(&self) -> Option<Backpressure> {
        let state = self.lock();
        state.bridge.as_ref().and_then(|b| b.backpressure())
    }

    /// Records this node as the owner of `client_id` in the cluster (a session elsewhere is
    /// taken over there); `None` without a cluster.
    pub fn claim(&self, client_id: &str, clean_start: bool, identity: &str) -> Option<Claimed> {
        let state = self.lock();
        state
            .bridge
            .as_ref()
            .map(|b| b.claim(client_id, clean_start, identity))
    }

    /// In a cluster, the claim connection `generation` made of its client id before it
    /// connected (see [`Broker::claim`]): its session's release gives back that claim only.
    /// A newer claim the session was already held under stays (two connections answered in
    /// one order and connecting in the other: the later one holds the newer claim).
    pub fn claimed(&self, client_id: &str, generation: u64, revision: u64) {
        let mut state = self.lock();
        if let Some(session) = state
            .sessions
            .get_mut(client_id)
            .filter(|s| s.generation == generation)
        {
            session.claim = session.claim.max(Some(revision));
        }
    }

    /// In a cluster, a newer claim of `client_id` that no connection takes (it gave up, or was
    /// refused): the session here holds the client id under it from now on. `false` without
    /// a session here (the claim is then given back).
    pub fn adopt_claim(&self, client_id: &str, revision: u64) -> bool {
        let mut state = self.lock();
        match state.sessions.get_mut(client_id) {
            Some(session) => {
                session.claim = session.claim.max(Some(revision));
                true
            }
            None => false,
        }
    }

    /// In a cluster, makes the session a persistent one the cluster keeps (its expiry is not
    /// zero, or it resumes one the cluster kept: `kept`, that session's incarnation, or is
    /// already persistent here — with an expiry of zero it then ends with this connection, as
    /// MQTT 5 says): its QoS 1 and 2 messages come from the cluster from now on. Answered once
    /// the cluster keeps the messages of its subscriptions.
    pub fn make_durable(
        &self,
        client_id: &str,
        generation: u64,
        kept: Option<u64>,
    ) -> Vec<Confirmation> {
        let mut state = self.lock();
        let Some(bridge) = state.bridge.clone() else {
            return Vec::new();
        };
        let Some(session) = state.sessions.get_mut(client_id).filter(|s| {
            s.generation == generation && (!s.expiry.is_zero() || s.durable || kept.is_some())
        }) else {
            return Vec::new();
        };
        session.durable = true;
        // The life the cluster resumed, or the one this node kept (offline here, its record
        // may be gone), or a new one.
        let incarnation = kept.or(session.incarnation);
        session.incarnation = Some(bridge.durable_session(
            client_id,
            generation,
            &session.identity,
            session.expiry,
            incarnation,
        ));
        session
            .filters
            .iter()
            .filter_map(|(f, o)| bridge.durable_subscribe(client_id, generation, f, *o))
            .collect()
    }

    /// Messages a session queues at most (beyond, QoS 1 and 2 are dropped, or given back to
    /// the cluster).
    pub fn max_queued(&self) -> usize {
        self.limits.max_queued
    }

    /// What a connection may hold waiting beyond its window: what the broker may have put in
    /// its channel before it marked itself backlogged, and a queue's worth (see
    /// [`SessionHandle::backlogged`]). Every message in its channel was counted delivered.
    pub fn connection_backlog_limit(&self) -> usize {
        self.limits.max_queued + self.limits.channel_capacity
    }

    /// A message the cluster kept for a persistent session: delivered if the connection
    /// `generation` still holds it (and it may receive it). `false`: not delivered (the caller
    /// returns it to the cluster).
    pub fn deliver_durable(&self, client_id: &str, generation: u64, message: Message) -> bool {
        let mut state = self.lock();
        let max_queued = self.limits.max_queued;
        let Some(session) = state
            .sessions
            .get_mut(client_id)
            .filter(|s| s.generation == generation && s.online.is_some())
        else {
            return false;
        };
        // Not receivable under the policies of the moment: settled, never delivered.
        if !session.receiver.may_receive(&message.topic) {
            if let Some(r) = &message.receipt {
                r.acknowledged();
            }
            return true;
        }
        let full = |session: &mut Session, m: Message| {
            if session.queue.len() < max_queued {
                session.enqueue(false, m);
            } else if let Some(r) = &m.receipt {
                // Delivered again later by the cluster.
                r.returned();
            }
        };
        if !session.queue.is_empty() {
            full(session, message);
            return true;
        }
        let Some(tx) = &session.online else {
            return false;
        };
        match tx.try_send(Outbound::Deliver(Box::new(message))) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(Outbound::Deliver(m))) => {
                full(session, *m);
                true
            }
            Err(_) => false,
        }
    }

    /// Another node took `client_id` over: the connection holding it here is told
    /// [`Outbound::TakenOver`] and the session is forgotten here (it lives on there).
    pub fn taken_over(&self, client_id: &str) -> bool {
        let mut state = self.lock();
        let Some(session) = state.sessions.get_mut(client_id) else {
            return false;
        };
        if let Some(tx) = session.online.take() {
            let _ = tx.try_send(Outbound::TakenOver);
        }
        remove_session(&mut state, client_id, false);
        true
    }

    /// Publishes a message (its topic checked and `mqtt:Publish` allowed by the caller) from
    /// `publisher` (a client id, or `None` from HTTPS or the registry): retains it if asked,
    /// and delivers it to every session subscribed to its topic that may receive it.
    pub fn publish(&self, message: Message, publisher: Option<&str>) -> Routed {
        self.route(message, publisher, Some(None))
    }

    /// [`Broker::publish`] for a client's QoS 2 message sent with `packet_id` (`dup`: the
    /// client says it may have sent it before): the cluster stores it once across nodes.
    pub fn publish_exactly_once(
        &self,
        message: Message,
        publisher: &str,
        packet_id: u16,
        dup: bool,
    ) -> Routed {
        self.route(message, Some(publisher), Some(Some((packet_id, dup))))
    }

    /// `publisher` released its QoS 2 message `packet_id` (PUBREL): PUBCOMP waits for the
    /// answer, when there is one.
    pub fn released(&self, publisher: &str, packet_id: u16) -> Option<Confirmation> {
        let state = self.lock();
        // Only a persistent session the cluster keeps sends it again elsewhere.
        if !state.sessions.get(publisher).is_some_and(|s| s.durable) {
            return None;
        }
        let bridge = state.bridge.clone()?;
        drop(state);
        bridge.released(publisher, packet_id)
    }

    /// `bridged`: `Some` to hand the message to the cluster too (with its exactly-once key).
    fn route(
        &self,
        message: Message,
        publisher: Option<&str>,
        bridged: Option<Option<(u16, bool)>>,
    ) -> Routed {
        let mut state = self.lock();
        let mut routed = Routed::default();
        // For the bridge, once delivered here (it takes the message itself, not a copy).
        let bridged = bridged
            .filter(|_| state.bridge.is_some())
            .map(|exactly_once| {
                // Decided here, with the session's own state (made persistent before its CONNACK),
                // not by the bridge, which learns of the session a moment later.
                let durable = publisher
                    .and_then(|p| state.sessions.get(p))
                    .is_some_and(|s| s.durable);
                exactly_once.filter(|_| durable)
            });
        // With a bridge, the cluster keeps retained messages.
        if message.retain && state.bridge.is_none() {
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
        let st = &mut *state;
        let targets = targets(&st.tree, &message.topic, publisher);
        let max_queued = self.limits.max_queued;
        // Needed once delivered here: by the bridge, or for shared subscriptions (routed here
        // without a bridge). Otherwise the last target takes the message itself, not a copy.
        let kept = bridged.is_some() || st.bridge.is_none();
        // (A node whose clients only publish has nobody to deliver to: no clock read, no move.)
        let message = if targets.is_empty() {
            message
        } else {
            let now = Instant::now();
            let Some(message) = deliver_all(
                &mut st.sessions,
                &targets,
                message,
                kept,
                &mut routed,
                max_queued,
                now,
            ) else {
                return routed;
            };
            message
        };
        // Shared subscriptions: one member of each group. In a cluster the bridge balances
        // them across the nodes and hands them to `deliver_shared`.
        if state.bridge.is_none() {
            let groups: Vec<String> = state
                .shared_tree
                .matching(&message.topic)
                .into_iter()
                .map(|(_, f)| f.clone())
                .collect();
            for filter in groups {
                route_shared(&mut state, &filter, &message, &mut routed, max_queued);
            }
        }
        if let Some(exactly_once) = bridged
            && let Some(bridge) = &state.bridge
        {
            let keep = routed.kept > 0;
            routed.confirm = bridge.published(message, publisher, exactly_once, keep);
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
        let receiver = session.receiver.clone();
        // Until `room` sendable ones: messages that expired or may no longer be received are
        // skipped, and the connection, told of nothing else, must not wait with some left.
        let mut taken = Vec::with_capacity(room.min(session.queue.len()));
        while taken.len() < room
            && let Some(m) = session.queue.pop_front()
        {
            if sendable(&m, now, receiver.as_ref()) {
                taken.push(m);
            }
        }
        taken
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
        awaiting_release: Vec<u16>,
        outbound: Option<&mut mpsc::Receiver<Outbound>>,
    ) {
        self.went_offline(
            client_id,
            generation,
            unacknowledged,
            awaiting_release,
            outbound,
            None,
        );
    }

    /// [`Broker::disconnected`], offline since `since` (`None`: now).
    fn went_offline(
        &self,
        client_id: &str,
        generation: u64,
        unacknowledged: Vec<Message>,
        awaiting_release: Vec<u16>,
        outbound: Option<&mut mpsc::Receiver<Outbound>>,
        since: Option<Instant>,
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
            let claim = session.claim;
            remove_session(&mut state, client_id, true);
            if let Some(bridge) = &state.bridge {
                bridge.release(client_id, claim);
            }
            return;
        }
        let now = Instant::now();
        let since = since.filter(|at| *at <= now).unwrap_or(now);
        session.disconnected_at = Some(since);
        session.awaiting_release = awaiting_release;
        if session.durable {
            // What the cluster keeps goes back to it, to be delivered again.
            unacknowledged.retain(|m| match &m.receipt {
                Some(r) => {
                    r.returned();
                    false
                }
                None => true,
            });
            let expiry = session.expiry;
            if let Some(bridge) = &state.bridge {
                bridge.durable_offline(client_id, expiry, now.duration_since(since));
            }
            let Some(session) = state.sessions.get_mut(client_id) else {
                return;
            };
            // So does what waited in its queue: the next connection (here or on another node)
            // gets it from the cluster, once (kept here too, it came twice).
            session.queue.retain(|m| match &m.receipt {
                Some(r) => {
                    r.returned();
                    false
                }
                None => true,
            });
            session.refresh_queue_expiry();
            for m in unacknowledged.into_iter().rev() {
                session.enqueue_first(m, self.limits.max_queued);
            }
            return;
        }
        for m in unacknowledged.into_iter().rev() {
            session.enqueue_first(m, self.limits.max_queued);
        }
    }

    /// A connection refused after [`Broker::connect`] (no CONNACK reached the client): the
    /// session stays as it was before — one it resumed is kept for `kept_expiry` (its expiry
    /// before this CONNECT: [`SessionHandle::resumed_expiry`], or [`StoredSession::expiry`]),
    /// with what it had queued; one it made anew ends (`None`). An expiry of zero asked for
    /// by the refused CONNECT must not end a kept session and lose its messages.
    pub fn refused(&self, handle: &mut SessionHandle, kept_expiry: Option<Duration>) {
        {
            let mut state = self.lock();
            if let Some(session) = state
                .sessions
                .get_mut(&handle.client_id)
                .filter(|s| s.generation == handle.generation)
            {
                session.expiry = kept_expiry.unwrap_or(Duration::ZERO);
            }
        }
        // Offline since it was before this CONNECT: a refused one does not restart its clock.
        self.went_offline(
            &handle.client_id,
            handle.generation,
            std::mem::take(&mut handle.pending),
            std::mem::take(&mut handle.awaiting_release),
            Some(&mut handle.outbound),
            handle.resumed_offline_since,
        );
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
            remove_session(&mut state, client_id, true);
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
            remove_session(&mut state, id, true);
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

/// Hands `m` to `session` at most at `max_qos`, if it may receive it: into its channel when
/// online and nothing waits before it, else (QoS 1 and 2) into its queue.
fn deliver_to(
    session: &mut Session,
    mut m: Message,
    max_qos: QoS,
    routed: &mut Routed,
    max_queued: usize,
    now: Instant,
) {
    m.qos = min_qos(m.qos, max_qos);
    // A QoS 0 message with no room to go is dropped before anything is spent on it (under a
    // flood, most are). It waits for nothing: QoS 1 messages queued for a backlogged
    // connection do not hold it back (order is kept per topic and QoS).
    if m.qos == QoS::AtMostOnce && session.online.as_ref().is_none_or(|tx| tx.capacity() == 0) {
        routed.dropped += 1;
        return;
    }
    if !session.receiver.may_receive(&m.topic) {
        routed.denied += 1;
        return;
    }
    match &session.online {
        // In order: once messages wait in the queue (the channel was full, or the connection
        // has a backlog of QoS 1 and 2 messages), the next ones wait behind them.
        Some(tx)
            if m.qos == QoS::AtMostOnce
                || (session.queue.is_empty() && !session.backlogged.load(Ordering::Acquire)) =>
        {
            match tx.try_send(Outbound::Deliver(Box::new(m))) {
                Ok(()) => routed.delivered += 1,
                Err(mpsc::error::TrySendError::Full(Outbound::Deliver(m)))
                    if m.qos != QoS::AtMostOnce =>
                {
                    queue(session, *m, max_queued, routed, now);
                }
                Err(_) => routed.dropped += 1,
            }
        }
        _ if m.qos == QoS::AtMostOnce => routed.dropped += 1,
        _ => queue(session, m, max_queued, routed, now),
    }
}

/// Delivers `message` to one member of the shared subscription `filter`: the next online one
/// that may receive it, else (QoS 1 and 2) the queue of the next persistent one.
fn route_shared(
    state: &mut State,
    filter: &str,
    message: &Message,
    routed: &mut Routed,
    max_queued: usize,
) {
    let now = Instant::now();
    let Some(group) = state.shared.get_mut(filter) else {
        return;
    };
    let n = group.members.len();
    if n == 0 {
        return;
    }
    let start = group.next % n;
    let order: Vec<(String, SubscriptionOptions)> = (0..n)
        .map(|i| group.members[(start + i) % n].clone())
        .collect();
    let mut chosen = None;
    for (i, (id, _)) in order.iter().enumerate() {
        if state
            .sessions
            .get(id)
            .is_some_and(|s| s.online.is_some() && s.receiver.may_receive(&message.topic))
        {
            chosen = Some(i);
            break;
        }
    }
    if chosen.is_none() && message.qos != QoS::AtMostOnce {
        chosen = order.iter().position(|(id, _)| {
            state
                .sessions
                .get(id)
                .is_some_and(|s| !s.expiry.is_zero() && s.receiver.may_receive(&message.topic))
        });
    }
    let Some(i) = chosen else {
        routed.dropped += 1;
        return;
    };
    if let Some(group) = state.shared.get_mut(filter) {
        group.next = (start + i + 1) % n;
    }
    let (id, options) = &order[i];
    if let Some(session) = state.sessions.get_mut(id) {
        let mut copy = message.clone();
        copy.retain = false;
        deliver_to(session, copy, options.qos, routed, max_queued, now);
    }
}

/// `client_id` no longer holds `filter` (already gone from its session's filters).
fn unsubscribed(state: &mut State, client_id: &str, filter: &str) {
    if let Ok(Some((_, inner))) = crate::topic::shared(filter) {
        if let Some(group) = state.shared.get_mut(filter) {
            group.members.retain(|(id, _)| id != client_id);
            if group.members.is_empty() {
                state.shared.remove(filter);
                state.shared_tree.remove(inner, filter);
            }
        }
    } else {
        state.tree.remove(filter, client_id);
    }
    release(state, filter);
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

/// Whether a queued message is still to be sent (a QoS 2 message released, or one not expired
/// that the session may receive); one that is not, kept by the cluster, is settled (the cluster
/// forgets it, as a message the session may not receive is when it arrives).
fn sendable(m: &Message, now: Instant, receiver: &dyn Receiver) -> bool {
    let send = m.released || (!m.expired(now) && receiver.may_receive(&m.topic));
    if !send && let Some(r) = &m.receipt {
        r.acknowledged();
    }
    send
}

impl Session {
    /// Queues `m` first, the last queued message making room if the queue is full (one the
    /// cluster keeps goes back to it, to be delivered again).
    fn enqueue_first(&mut self, m: Message, max: usize) {
        if self.queue.len() >= max
            && let Some(last) = self.queue.pop_back()
            && let Some(r) = &last.receipt
        {
            r.returned();
        }
        self.enqueue(true, m);
    }

    /// The earliest expiry hint, exact again after messages left the queue.
    fn refresh_queue_expiry(&mut self) {
        self.queue_expiry = self.queue.iter().filter_map(|q| q.expires_at).min();
    }

    /// Queues `m` at the back (or the `front`).
    fn enqueue(&mut self, front: bool, m: Message) {
        if let Some(at) = m.expires_at {
            self.queue_expiry = Some(self.queue_expiry.map_or(at, |e| e.min(at)));
        }
        if front {
            self.queue.push_front(m);
        } else {
            self.queue.push_back(m);
        }
    }
}

fn queue(session: &mut Session, m: Message, max: usize, routed: &mut Routed, now: Instant) {
    if session.queue.len() >= max && session.queue_expiry.is_some_and(|t| t <= now) {
        // Full: expired messages make room first (otherwise they are dropped when their turn
        // comes; looked for only when one may have expired: a scan per message made a busy
        // subscriber's full queue quadratic).
        session.queue.retain(|q| {
            let keep = !q.expired(now);
            if !keep && let Some(r) = &q.receipt {
                // Settled: the cluster does not keep it for later either.
                r.acknowledged();
            }
            keep
        });
        session.refresh_queue_expiry();
    }
    if session.queue.len() >= max {
        routed.dropped += 1;
    } else {
        session.enqueue(false, m);
        routed.queued += 1;
    }
}

/// The sessions to deliver a message of `topic` to, with their subscription's options: the
/// highest QoS among a session's matching subscriptions decides (§3.3.5). Sorted by session to
/// merge a session's several, borrowed from the tree (no copy per message).
fn targets<'a>(
    tree: &'a SubscriptionTree<Subscribed>,
    topic: &str,
    publisher: Option<&str>,
) -> Vec<(&'a str, SubscriptionOptions)> {
    if tree.is_empty() {
        return Vec::new();
    }
    let mut targets: Vec<(&str, SubscriptionOptions)> = tree
        .matching(topic)
        .into_iter()
        .filter(|(session, sub)| !(sub.options.no_local && Some(*session) == publisher))
        .map(|(session, sub)| (session, sub.options))
        .collect();
    if targets.len() > 1 {
        // Stable: among a session's subscriptions of equal QoS, the first in tree order.
        targets.sort_by(|a, b| a.0.cmp(b.0).then((b.1.qos as u8).cmp(&(a.1.qos as u8))));
        // The first of each session's run has its highest QoS.
        targets.dedup_by(|later, first| later.0 == first.0);
    }
    targets
}

/// Delivers `message` to `targets` (see [`targets`]); returns it unless the last one took it
/// (`keep`: it is needed afterwards, every target gets a copy).
fn deliver_all(
    sessions: &mut HashMap<String, Session>,
    targets: &[(&str, SubscriptionOptions)],
    message: Message,
    keep: bool,
    routed: &mut Routed,
    max_queued: usize,
    now: Instant,
) -> Option<Message> {
    let last = targets.len().saturating_sub(1);
    let mut message = Some(message);
    for (i, (client_id, options)) in targets.iter().enumerate() {
        let Some(session) = sessions.get_mut(*client_id) else {
            continue;
        };
        let Some(original) = message.as_ref() else {
            break;
        };
        // A persistent session in a cluster gets these from the cluster, which keeps them.
        if session.durable && min_qos(original.qos, options.qos) != QoS::AtMostOnce {
            routed.queued += 1;
            routed.kept += 1;
            continue;
        }
        let retain = options.retain_as_published && original.retain;
        let mut copy = match message.take() {
            Some(m) if i == last && !keep => m,
            Some(m) => {
                let copy = m.clone();
                message = Some(m);
                copy
            }
            None => break,
        };
        copy.retain = retain;
        deliver_to(session, copy, options.qos, routed, max_queued, now);
    }
    message
}

/// Forgets a session here; `ended`: for good (the cluster forgets a persistent one too), not
/// moved to another node.
fn remove_session(state: &mut State, client_id: &str, ended: bool) {
    if let Some(s) = state.sessions.remove(client_id) {
        for filter in s.filters.keys() {
            unsubscribed(state, client_id, filter);
        }
        if s.durable
            && ended
            && let Some(bridge) = &state.bridge
        {
            bridge.durable_end(client_id, s.claim);
        }
    }
}

/// One more session holds `filter`: the bridge hears of the first (and answers once it is
/// subscribed).
fn hold(state: &mut State, filter: &str) -> Option<Confirmation> {
    let n = state.interest.entry(filter.to_string()).or_insert(0);
    *n += 1;
    match &state.bridge {
        Some(bridge) if *n == 1 => bridge.interest(filter, true),
        _ => None,
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
            let _ = bridge.interest(filter, false);
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
            preferred_id: None,
            released: false,
            receipt: None,
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
            .unwrap()
            .retained;
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
        b.disconnected(
            "a",
            a.generation,
            Vec::new(),
            Vec::new(),
            Some(&mut a.outbound),
        );
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
            Vec::new(),
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

    /// A cluster that keeps nothing: enough for a persistent session to be the cluster's.
    struct KeepingNothing;

    impl Bridge for KeepingNothing {
        fn published(
            &self,
            _: Message,
            _: Option<&str>,
            _: Option<(u16, bool)>,
            _: bool,
        ) -> Option<Confirmation> {
            None
        }
        fn interest(&self, _: &str, _: bool) -> Option<Confirmation> {
            None
        }
        fn retained(&self, _: &str, _: u64, _: &str, _: SubscriptionOptions) {}
        fn claim(&self, _: &str, _: bool, _: &str) -> Claimed {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = tx.send(Ok(Claim {
                revision: 1,
                session: None,
            }));
            rx
        }
        fn release(&self, _: &str, _: Option<u64>) {}
        fn durable_session(&self, _: &str, _: u64, _: &str, _: Duration, i: Option<u64>) -> u64 {
            i.unwrap_or(1)
        }
        fn durable_subscribe(
            &self,
            _: &str,
            _: u64,
            _: &str,
            _: SubscriptionOptions,
        ) -> Option<Confirmation> {
            None
        }
        fn durable_unsubscribe(&self, _: &str, _: &str) {}
        fn durable_offline(&self, _: &str, _: Duration, _: Duration) {}
        fn durable_end(&self, _: &str, _: Option<u64>) {}
    }

    #[test]
    fn a_persistent_sessions_kept_messages_go_back_to_the_cluster_when_its_connection_ends() {
        let b = Broker::new(Limits {
            channel_capacity: 2,
            ..Limits::default()
        });
        b.set_bridge(Arc::new(KeepingNothing));
        let mut a = b.connect("a", false, Duration::from_secs(3600), everything(), "a");
        b.make_durable("a", a.generation, None);
        b.subscribe("a", a.generation, "q/#", sub(QoS::AtLeastOnce));
        let returned = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for i in 0..5 {
            let mut m = msg(&format!("q/{i}"), QoS::AtLeastOnce, false);
            let count = returned.clone();
            m.receipt = Some(Receipt::new(move |acknowledged| {
                if !acknowledged {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }));
            // Two in the connection's channel, three in the session's queue.
            assert!(b.deliver_durable("a", a.generation, m));
        }
        b.disconnected(
            "a",
            a.generation,
            Vec::new(),
            Vec::new(),
            Some(&mut a.outbound),
        );
        // Every one goes back to the cluster, which delivers it to the next connection: none is
        // kept here as well (it would come twice).
        assert_eq!(returned.load(std::sync::atomic::Ordering::SeqCst), 5);
        let again = b.connect("a", false, Duration::from_secs(3600), everything(), "a");
        assert!(again.pending.is_empty());
    }

    /// A cluster that keeps nothing and records what a session told it.
    #[derive(Default)]
    struct Recording(Mutex<Vec<String>>);

    impl Bridge for Recording {
        fn published(
            &self,
            m: Message,
            p: Option<&str>,
            q: Option<(u16, bool)>,
            k: bool,
        ) -> Option<Confirmation> {
            KeepingNothing.published(m, p, q, k)
        }
        fn interest(&self, _: &str, _: bool) -> Option<Confirmation> {
            None
        }
        fn retained(&self, _: &str, _: u64, _: &str, _: SubscriptionOptions) {}
        fn claim(&self, c: &str, s: bool, i: &str) -> Claimed {
            KeepingNothing.claim(c, s, i)
        }
        fn release(&self, c: &str, claim: Option<u64>) {
            self.0
                .lock()
                .unwrap()
                .push(format!("release {c} {claim:?}"));
        }
        fn durable_session(&self, c: &str, _: u64, _: &str, e: Duration, i: Option<u64>) -> u64 {
            self.0
                .lock()
                .unwrap()
                .push(format!("session {c} {} life {i:?}", e.as_secs()));
            i.unwrap_or(7)
        }
        fn durable_subscribe(
            &self,
            _: &str,
            _: u64,
            _: &str,
            _: SubscriptionOptions,
        ) -> Option<Confirmation> {
            None
        }
        fn durable_unsubscribe(&self, _: &str, _: &str) {}
        fn durable_offline(&self, c: &str, e: Duration, _: Duration) {
            self.0
                .lock()
                .unwrap()
                .push(format!("offline {c} {}", e.as_secs()));
        }
        fn durable_end(&self, c: &str, claim: Option<u64>) {
            self.0.lock().unwrap().push(format!("end {c}"));
            if let Some(claim) = claim {
                self.0.lock().unwrap().push(format!("ended under {claim}"));
            }
        }
    }

    #[test]
    fn a_refused_connect_leaves_the_persistent_session_it_resumed_as_it_was() {
        let b = Broker::new(Limits::default());
        let told = Arc::new(Recording::default());
        b.set_bridge(told.clone());
        let a = b.connect("a", false, Duration::from_secs(600), everything(), "a");
        b.make_durable("a", a.generation, None);
        b.subscribe("a", a.generation, "q/#", sub(QoS::AtLeastOnce));
        b.disconnected("a", a.generation, Vec::new(), Vec::new(), None);
        let offline_at = |b: &Broker| b.lock().sessions.get("a").and_then(|s| s.disconnected_at);
        let went = offline_at(&b).expect("offline");
        // Resumed with an expiry of zero (MQTT 5), then refused before CONNACK (the cluster
        // could not resume it): kept as it was, not ended.
        let mut z = b.connect("a", false, Duration::ZERO, everything(), "a");
        assert!(z.session_present);
        assert_eq!(z.resumed_expiry, Some(Duration::from_secs(600)));
        assert_eq!(z.resumed_offline_since, Some(went));
        b.make_durable("a", z.generation, None);
        let kept = z.resumed_expiry;
        b.refused(&mut z, kept);
        // Its offline clock too: still counting from when its last connection ended.
        assert_eq!(offline_at(&b), Some(went));
        let told_now = told.0.lock().unwrap().clone();
        assert_eq!(told_now.last().map(String::as_str), Some("offline a 600"));
        assert!(
            !told_now.iter().any(|t| t.starts_with("end")),
            "{told_now:?}"
        );
        let again = b.connect("a", false, Duration::ZERO, everything(), "a");
        assert!(again.session_present, "the session is still kept");
        // Accepted this time: it ends with this connection, as its CONNECT asked.
        b.disconnected("a", again.generation, Vec::new(), Vec::new(), None);
        assert!(told.0.lock().unwrap().iter().any(|t| t == "end a"));
        // A session the refused CONNECT made anew is not left behind.
        let mut n = b.connect("n", false, Duration::from_secs(600), everything(), "n");
        b.make_durable("n", n.generation, None);
        let kept = n.resumed_expiry;
        b.refused(&mut n, kept);
        assert!(told.0.lock().unwrap().iter().any(|t| t == "end n"));
        assert!(
            !b.connect("n", false, Duration::ZERO, everything(), "n")
                .session_present
        );
    }

    #[test]
    fn a_session_gives_back_the_newest_claim_it_was_held_under() {
        let b = Broker::new(Limits::default());
        let told = Arc::new(Recording::default());
        b.set_bridge(told.clone());
        let last = |told: &Recording| told.0.lock().unwrap().last().cloned().unwrap_or_default();
        // Two CONNECTs on this node: claims answered 3 then 5, connecting in the other order.
        let newer = b.connect("a", false, Duration::ZERO, everything(), "a");
        b.claimed("a", newer.generation, 5);
        let older = b.connect("a", false, Duration::ZERO, everything(), "a");
        b.claimed("a", older.generation, 3);
        // The older claim's connection holds the session, under the newer claim.
        b.disconnected("a", older.generation, Vec::new(), Vec::new(), None);
        assert_eq!(last(&told), "release a Some(5)");
        // A newer claim no connection took (it gave up) is adopted by the session here.
        let c = b.connect("c", false, Duration::from_secs(60), everything(), "c");
        b.claimed("c", c.generation, 7);
        b.make_durable("c", c.generation, None);
        assert!(b.adopt_claim("c", 9));
        assert!(
            !b.adopt_claim("nobody", 9),
            "without a session, the claim goes back"
        );
        // Ended (a clean start), the session is ended under that claim.
        let again = b.connect("c", true, Duration::from_secs(60), everything(), "c");
        assert_eq!(last(&told), "ended under 9");
        // And the clean start's own connection holds the client id under it too.
        b.claimed("c", again.generation, 8);
        let mut again = again;
        b.refused(&mut again, None);
        assert_eq!(last(&told), "release c Some(9)");
    }

    #[test]
    fn a_persistent_session_keeps_its_life_across_connections_until_it_ends() {
        let b = Broker::new(Limits::default());
        let told = Arc::new(Recording::default());
        b.set_bridge(told.clone());
        let last = |told: &Recording| told.0.lock().unwrap().last().cloned().unwrap_or_default();
        // A new session (no life asked for): the cluster gives it a life (7 here).
        let a = b.connect("a", false, Duration::from_secs(600), everything(), "a");
        b.make_durable("a", a.generation, None);
        assert_eq!(last(&told), "session a 600 life None");
        b.disconnected("a", a.generation, Vec::new(), Vec::new(), None);
        // Offline here, then back (its record in the cluster may be gone meanwhile): the same
        // life, so what the cluster kept for it comes.
        let again = b.connect("a", false, Duration::from_secs(600), everything(), "a");
        b.make_durable("a", again.generation, None);
        assert_eq!(last(&told), "session a 600 life Some(7)");
        // Taken over here by a connection that resumed the cluster's record of it: that
        // record's life.
        let resumed = b.connect("a", false, Duration::from_secs(600), everything(), "a");
        b.make_durable("a", resumed.generation, Some(42));
        assert_eq!(last(&told), "session a 600 life Some(42)");
        // Ended: the next session is a new life.
        let clean = b.connect("a", true, Duration::from_secs(600), everything(), "a");
        assert!(told.0.lock().unwrap().iter().any(|t| t == "end a"));
        b.make_durable("a", clean.generation, None);
        assert_eq!(last(&told), "session a 600 life None");
    }

    #[test]
    fn a_full_queue_makes_room_by_dropping_expired_messages_only() {
        let b = Broker::new(Limits {
            max_queued: 2,
            ..Limits::default()
        });
        let a = b.connect("a", true, Duration::from_secs(3600), everything(), "a");
        b.subscribe("a", a.generation, "q/#", sub(QoS::AtLeastOnce));
        b.disconnected("a", a.generation, Vec::new(), Vec::new(), None);
        let mut old = msg("q/old", QoS::AtLeastOnce, false);
        old.expires_at = Instant::now().checked_sub(Duration::from_secs(1));
        assert!(old.expires_at.is_some());
        let mut later = msg("q/1", QoS::AtLeastOnce, false);
        later.expires_at = Some(Instant::now() + Duration::from_secs(3600));
        assert_eq!(b.publish(old, None).queued, 1);
        assert_eq!(b.publish(later, None).queued, 1);
        // Full: the expired message makes room.
        assert_eq!(
            b.publish(msg("q/2", QoS::AtLeastOnce, false), None).queued,
            1
        );
        // Full of messages that have not expired: the new one is dropped.
        assert_eq!(
            b.publish(msg("q/3", QoS::AtLeastOnce, false), None).dropped,
            1
        );
        let again = b.connect("a", false, Duration::from_secs(3600), everything(), "a");
        let topics: Vec<&str> = again.pending.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(topics, ["q/1", "q/2"]);
    }

    #[test]
    fn a_backlogged_connection_has_further_messages_queued_in_order_and_bounded() {
        let b = Broker::new(Limits {
            max_queued: 3,
            ..Limits::default()
        });
        let mut a = b.connect("a", true, Duration::from_secs(3600), everything(), "a");
        b.subscribe("a", a.generation, "q/#", sub(QoS::AtLeastOnce));
        // Through the channel while the connection has room.
        assert_eq!(
            b.publish(msg("q/1", QoS::AtLeastOnce, false), None)
                .delivered,
            1
        );
        // The connection has a window's worth waiting: QoS 1 waits in the broker's queue,
        // bounded (beyond it dropped and counted); QoS 0 still goes through.
        a.backlogged.store(true, Ordering::Release);
        for i in 2..=5 {
            let routed = b.publish(msg(&format!("q/{i}"), QoS::AtLeastOnce, false), None);
            assert_eq!(
                (routed.queued, routed.dropped),
                if i <= 4 { (1, 0) } else { (0, 1) }
            );
        }
        assert_eq!(
            b.publish(msg("q/zero", QoS::AtMostOnce, false), None)
                .delivered,
            1,
            "QoS 0 waits for nothing"
        );
        // What is in the channel comes first: the queue is not taken before it.
        assert!(!a.may_take_queued());
        let first: Vec<String> = std::iter::from_fn(|| a.outbound.try_recv().ok())
            .filter_map(|o| match o {
                Outbound::Deliver(m) => Some(m.topic),
                _ => None,
            })
            .collect();
        assert_eq!(first, ["q/1", "q/zero"]);
        assert!(a.may_take_queued());
        let queued: Vec<String> = b
            .take_queued("a", a.generation, 10)
            .into_iter()
            .map(|m| m.topic)
            .collect();
        assert_eq!(queued, ["q/2", "q/3", "q/4"]);
        // Cleared and empty: the channel again.
        assert_eq!(
            b.publish(msg("q/6", QoS::AtLeastOnce, false), None)
                .delivered,
            1
        );
    }

    #[test]
    fn a_session_resumed_by_another_certificate_starts_clean_and_queues_are_checked() {
        let b = Broker::new(Limits::default());
        let hour = Duration::from_secs(3600);
        let a = b.connect("dev", true, hour, everything(), "CN=dev (aaaa)");
        b.subscribe("dev", a.generation, "secret/#", sub(QoS::AtLeastOnce))
            .unwrap();
        b.disconnected("dev", a.generation, Vec::new(), Vec::new(), None);
        b.publish(msg("secret/1", QoS::AtLeastOnce, false), None);
        // Another certificate takes the client id over: nothing of the first session.
        let other = b.connect("dev", false, hour, everything(), "CN=mallory (bbbb)");
        assert!(!other.session_present);
        assert!(other.pending.is_empty());
        b.publish(msg("secret/2", QoS::AtLeastOnce, false), None);
        b.disconnected("dev", other.generation, Vec::new(), Vec::new(), None);
        // The same certificate resumes, but only with what its policies let it receive now.
        let a = b.connect("dev", true, hour, everything(), "CN=dev (aaaa)");
        b.subscribe("dev", a.generation, "#", sub(QoS::AtLeastOnce))
            .unwrap();
        b.disconnected("dev", a.generation, Vec::new(), Vec::new(), None);
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
        b.disconnected("dup", first.generation, Vec::new(), Vec::new(), None);
        assert!(b.sessions()[0].online);
        b.disconnected("dup", second.generation, Vec::new(), Vec::new(), None);
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

    #[test]
    fn shared_subscriptions_deliver_each_message_to_one_member_in_turn() {
        let b = Broker::new(Limits::default());
        let mut a = b.connect("a", true, Duration::ZERO, everything(), "a");
        let mut c = b.connect("c", true, Duration::ZERO, everything(), "c");
        let mut p = b.connect("p", true, Duration::ZERO, everything(), "p");
        b.publish(msg("jobs/old", QoS::AtLeastOnce, true), None);
        for id in ["a", "c"] {
            let generation = if id == "a" {
                a.generation
            } else {
                c.generation
            };
            let retained = b
                .subscribe(id, generation, "$share/g/jobs/#", sub(QoS::AtLeastOnce))
                .unwrap()
                .retained;
            assert!(
                retained.is_empty(),
                "no retained messages on a shared subscription"
            );
        }
        b.subscribe("p", p.generation, "jobs/#", sub(QoS::AtLeastOnce));
        for i in 0..4 {
            b.publish(msg(&format!("jobs/{i}"), QoS::AtLeastOnce, false), None);
        }
        assert_eq!(delivered(&mut a).len(), 2);
        assert_eq!(delivered(&mut c).len(), 2);
        assert_eq!(
            delivered(&mut p).len(),
            4,
            "ordinary subscribers get every message"
        );
        // A member gone: the other takes everything.
        b.disconnected(
            "a",
            a.generation,
            Vec::new(),
            Vec::new(),
            Some(&mut a.outbound),
        );
        for i in 0..3 {
            b.publish(msg(&format!("jobs/{i}"), QoS::AtLeastOnce, false), None);
        }
        assert_eq!(delivered(&mut c).len(), 3);
        assert!(b.unsubscribe("c", c.generation, "$share/g/jobs/#"));
        let routed = b.publish(msg("jobs/x", QoS::AtLeastOnce, false), None);
        assert_eq!(routed.delivered, 1, "only the ordinary subscriber is left");
        assert!(crate::topic::shared("$share/g").is_err());
        assert!(crate::topic::shared("$share//a").is_err());
        assert_eq!(
            crate::topic::shared("$share/g/a/+").unwrap(),
            Some(("g", "a/+"))
        );
    }

    #[test]
    fn qos2_packet_ids_awaiting_release_survive_a_reconnection() {
        let b = Broker::new(Limits::default());
        let hour = Duration::from_secs(3600);
        let a = b.connect("a", true, hour, everything(), "a");
        let mut released = msg("q", QoS::ExactlyOnce, false);
        released.sent_as = Some(7);
        released.released = true;
        b.disconnected("a", a.generation, vec![released], vec![3, 9], None);
        let again = b.connect("a", false, hour, Arc::new(Allow(vec![])), "a");
        assert_eq!(again.awaiting_release, vec![3, 9]);
        assert_eq!(
            again.pending.len(),
            1,
            "a released message goes on (PUBREL) whatever the policies say now"
        );
        assert!(again.pending[0].released);
    }
}
