//! MQTT across nodes on NATS: what this node's clients publish goes to a NATS subject made from
//! its topic, and this node subscribes only to the subjects its own sessions' filters need
//! (interest-based: no node receives every message). Messages from NATS are delivered to this
//! node's sessions by the broker, which still asks `mqtt:Receive` of each session.
//!
//! Topics map to subjects level by level: a prefix, then each level escaped (`%XX` for `.`,
//! `*`, `>`, `%`, space, control and non-ASCII bytes; a lone `%` for an empty level), so every
//! legal MQTT topic round-trips. `+` becomes `*`; a trailing `#` becomes `>` plus its parent.
//!
//! - QoS 0 goes to the nodes that want it by the route table ([`routes`]: bucket
//!   `PORTCULLIS_ROUTES`), on `pcn.<node>` in batches of many topics; or, when the sending node
//!   is unsure of its destinations, on `pcb.<topic>` in batches of one topic, which NATS routes by
//!   each node's subscriptions (core NATS: at most once between nodes; `pcl.<topic>`, one message
//!   as a live frame, and `pcm.<topic>` with headers, as earlier versions sent it, are still
//!   read).
//! - QoS 1 and 2 go on `pcq.<topic>` through JetStream (stream `PORTCULLIS_MQTT`, replicated as
//!   configured, deduplicated by message id): the publisher's PUBACK or PUBREC waits for the
//!   stream's acknowledgement, so an acknowledged message is stored by a quorum of servers.
//! - Retained messages also go on `pcr.<topic>` (stream `PORTCULLIS_RETAINED`, the last message
//!   per subject): every node answers a subscription with the cluster's retained messages.
//! - Client ids are owned cluster-wide (key-value bucket `PORTCULLIS_CLIENTS`, written with
//!   compare-and-set): a CONNECT records its node as the owner; the node that held the session
//!   sees the new owner and closes it ("session taken over").
//! - Shared subscriptions (`$share/GROUP/FILTER`): QoS 0 messages through NATS queue
//!   subscriptions (each to one node holding the group, which hands it to one of its members);
//!   QoS 1 and 2 through one JetStream consumer per group, pulled by every node with a member
//!   online: kept while none is, settled by the member's acknowledgement, given back for
//!   another member when a connection ends first.
//!
//! - Persistent sessions are the cluster's: their subscriptions in a key-value bucket
//!   (`PORTCULLIS_SESSIONS`), their QoS 1 and 2 messages kept by a durable consumer of the
//!   message stream per subscription, acknowledged once the client acknowledged them. A client
//!   reconnecting to any node resumes its session; what was delivered and not acknowledged on
//!   a node that died is delivered again (after the consumer's acknowledgement wait).
//! - QoS 2 is exactly once across a node's death. A persistent session's QoS 2 message is
//!   recorded in a ledger (bucket `PORTCULLIS_QOS2`: client and packet id → the message id it
//!   is stored under) ahead of the message; sent again with DUP to another node, it is stored
//!   under the same id (JetStream keeps it once); PUBREL forgets the entry before PUBCOMP.
//!   Towards subscribers, a kept QoS 2 message's packet id comes from its stream sequence and
//!   the message is kept until PUBCOMP, so the node a client resumes on sends it again under
//!   the packet id the client holds (acknowledged again, not delivered twice).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, consumer, kv, stream};
use base64::Engine as _;
use futures_util::StreamExt;
use portcullis_mqtt::broker::{
    Bridge, Broker, Claim, Claimed, Confirmation, Message, Receipt, StoredSession,
    SubscriptionOptions,
};
use portcullis_mqtt::codec::{PublishProperties, QoS};
use tokio::sync::{mpsc, oneshot};

mod kept;
mod routes;

/// QoS 0 messages one by one (live frames), as nodes of bus protocol 4 and earlier sent retained
/// ones and nodes before batches every one: read while such a node is known (see
/// [`NatsState::set_older_gone`]), so that a cluster upgraded node by node keeps routing from
/// the nodes not yet upgraded.
const LIVE: &str = "pcl";
/// QoS 0 messages as versions before live frames sent them (NATS headers): read as [`LIVE`].
const LIVE_HEADERS: &str = "pcm";
/// QoS 0 messages of one topic sent together: [`Batches`] frames.
const LIVE_BATCH: &str = "pcb";
/// QoS 0 messages of many topics for one node (`pcn.NODE`): [`routes::NodeBatches`].
const NODE_BATCH: &str = "pcn";
/// A node tells another (`pcw.NODE`) of its new entry in the route table, and its SUBACK waits
/// for the answer (see [`Node::routes_hold`]).
const ROUTE_SYNC: &str = "pcw";
/// QoS 1 and 2 messages (JetStream).
const STORED: &str = "pcq";
/// Retained messages (JetStream, last per subject).
const RETAINED: &str = "pcr";

const STREAM: &str = "PORTCULLIS_MQTT";
const RETAINED_STREAM: &str = "PORTCULLIS_RETAINED";
const CLIENTS: &str = "PORTCULLIS_CLIENTS";
const SESSIONS: &str = "PORTCULLIS_SESSIONS";
/// Shared subscriptions' groups anywhere in the cluster (their QoS 1 and 2 messages are kept):
/// key a hash of `$share/GROUP/FILTER`, value FILTER. Kept [`SHARED_KEEP`] after its last
/// refresh by a node with members.
const SHARED_GROUPS: &str = "PORTCULLIS_SHARED";
/// The cluster's route table (see [`routes`]): key `NODE.FILTER-HASH`, value the filter a node
/// holds; `NODE.node`, the node's instance.
const ROUTES: &str = "PORTCULLIS_ROUTES";
/// How long a SUBACK waits at most for each step of putting its filter in the route table:
/// JetStream storing the entry, this node's watch reading it back, another node answering
/// (half a second more).
const ROUTE_WAIT: Duration = Duration::from_secs(1);
/// How often a node asks whether the nodes in its route table are still there (and writes its
/// own entries again if any went missing).
const ROUTES_SWEEP: Duration = Duration::from_secs(10);
/// Checks in a row a node must miss (no answer to its pings: nobody subscribed) before its
/// entries leave the route table (a node cut off from NATS for a moment keeps them).
const SWEEP_MISSES: u32 = 2;
/// Persistent sessions' QoS 2 messages received and not yet released (PUBREL): key
/// `CLIENT-KEY.PACKET-ID`, value the message id the stream stored it under.
const QOS2: &str = "PORTCULLIS_QOS2";

/// How long JetStream waits for a persistent session's acknowledgement before delivering a
/// message again (after its node died, the time to resume its messages on another).
const ACK_WAIT: Duration = Duration::from_secs(3);
/// How long after a session ends here its consumers (and its client id's claim) wait before
/// they go, in case another node resumed (or claimed) it at the same moment: nats-server 2.9
/// lets two compare-and-set writes in flight together both succeed.
const RESUME_GRACE: Duration = Duration::from_secs(2);

/// How long the QoS 2 ledger keeps an entry whose PUBREL never came (the client gone for good):
/// a message sent again later than this is stored again.
const QOS2_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long a shared subscription's group keeps its QoS 1 and 2 messages when no node pulls
/// (no member online anywhere); the stream keeps no message longer than a day in any case.
const SHARED_KEEP: Duration = Duration::from_secs(3600);

/// How often a node with no member of a shared group online looks again (it does not pull
/// meanwhile); also how long a message no member could take waits before it is offered again.
const SHARED_IDLE_POLL: Duration = Duration::from_millis(250);

/// A shared group's messages pulled at a time by one node (small: several nodes share them).
const SHARED_BATCH: usize = 16;

/// Bytes of a shared group's kept messages pulled at a time by one node.
const SHARED_BATCH_BYTES: usize = 16 * 1024;

/// A persistent subscription's pulls: kept messages (or batches) asked for at a time, their
/// bytes at most, and how long a pull request waits on the server.
const PULL_BATCH: usize = 16;
const PULL_BYTES: usize = 32 * 1024;
const PULL_EXPIRES: Duration = Duration::from_secs(30);

/// Messages of one persistent subscription delivered and not yet acknowledged, at most.
const MAX_ACK_PENDING: i64 = 1_000;

/// Messages waiting for NATS at most; beyond, new ones are dropped (counted) or refused.
const QUEUE: usize = 10_000;

/// Under load (a flush of at least [`LINGER_FROM`] messages, the queue emptied), the publishing
/// task waits this long after a flush before it takes the next messages, so that each NATS
/// message carries more of them: NATS servers spend most of their time waking up for each
/// message (Go's scheduler), whatever its size. A quiet node sends each message at once; one
/// whose queue holds more than [`BATCH`] takes the next at once.
const LINGER: Duration = Duration::from_millis(1);
const LINGER_FROM: usize = 64;

/// Topics whose routes the publishing task remembers at most (looked up again beyond).
const ROUTED_TOPICS: usize = 65_536;

/// Messages taken from the queue to NATS at a time.
const BATCH: usize = 512;

/// Batches a node stores for its own persistent sessions and shared groups (see
/// [`Node::keep_late`]): waiting at most, and on their way to JetStream at once.
const LATE_QUEUE: usize = 1_000;

/// How often each node writes its probe into the sessions bucket, and how long its watch of the
/// bucket may go without bringing it back before the node stops trusting what it knows of the
/// cluster's persistent subscriptions (and keeps every QoS 1 message until the probe is back).
/// A watch can stall without an error for seconds when a NATS server dies (until its consumer
/// misses its heartbeats); a persistent subscription made meanwhile would go unseen.
const PROBE_EVERY: Duration = Duration::from_millis(500);
const PROBE_STALE_MS: u64 = 2_000;

/// A fault to inject in tests, never set in production: this node learns of other nodes'
/// persistent subscriptions this many milliseconds late (once it has read the buckets), which
/// opens on demand the window [`Node::keep_late`] closes.
const INTEREST_LAG_VAR: &str = "PORTCULLIS_TEST_INTEREST_LAG_MS";
const LATE_IN_FLIGHT: usize = 64;

/// How long a live QoS 1 message's publisher waits for it to be written to NATS (NATS out of
/// reach) before it is refused.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// QoS 1 messages this node's clients published, by how they crossed: `live` (nobody keeps
/// them), `kept` (JetStream), `kept_late` (crossed live, stored by this node for a persistent
/// session or shared group of its own that the publishing node did not know of yet).
fn qos1_counter(path: &'static str) -> &'static metrics::Counter {
    static LIVE: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    static KEPT: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    static LATE: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    let cell = match path {
        "live" => &LIVE,
        "kept" => &KEPT,
        _ => &LATE,
    };
    cell.get_or_init(|| metrics::counter!("portcullis_cluster_qos1_messages_total", "path" => path))
}

/// Message ids remembered to drop a message two overlapping subscriptions both delivered.
const SEEN: usize = 10_000;

/// How the node reaches NATS.
#[derive(Debug, Clone)]
pub(crate) struct NatsOptions {
    /// `nats://host:port`, several comma-separated.
    pub(crate) url: String,
    /// Copies JetStream keeps of each stream (the NATS cluster's size, up to 5).
    pub(crate) replicas: usize,
    /// Mutual TLS with certificates of the cluster's CA.
    pub(crate) tls: bool,
    /// Bytes of QoS 1 and 2 messages the message stream keeps (the oldest go beyond).
    pub(crate) kept_bytes: i64,
    /// QoS 1 messages nobody keeps cross live (`nats_qos1_live`).
    pub(crate) qos1_live: bool,
}

/// The TLS client configuration of a node's NATS connection: NATS servers verified against
/// the cluster's CA (`portcullis cluster nats-cert` issues their certificates), and a client
/// certificate for this node issued by that CA now, kept in memory only.
fn nats_tls(ca: &portcullis_pki::issue::CaIssuer, id: &str) -> Result<rustls::ClientConfig> {
    use portcullis_pki::issue::{IssueRequest, Profile, SubjectName};
    use portcullis_pki::{KeyType, PrivateKey};
    let key = PrivateKey::generate(KeyType::EcP256)?;
    let mut request = IssueRequest::new(
        Profile::Client,
        SubjectName {
            common_name: format!("portcullis node {id}"),
            organization: Some("Portcullis".into()),
            ..Default::default()
        },
    );
    request.days = 30;
    let cert = portcullis_pki::issue::issue(&request, &key, Some(ca))?;
    let chain = ca.chain();
    let mut roots = rustls::RootCertStore::empty();
    if let Some(root) = chain.last() {
        roots
            .add(root.der().clone())
            .context("the cluster CA as a NATS trust anchor")?;
    }
    let mut presented = vec![cert.der().clone()];
    presented.extend(
        chain
            .iter()
            .take(chain.len().saturating_sub(1))
            .map(|c| c.der().clone()),
    );
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            presented,
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.pkcs8_der().to_vec().into()),
        )
        .context("the node's NATS client certificate")
}

/// A topic's NATS subject under `prefix`.
pub(crate) fn subject(prefix: &str, topic: &str) -> String {
    let mut out = String::from(prefix);
    for level in topic.split('/') {
        out.push('.');
        push_level(&mut out, level);
    }
    out
}

fn push_level(out: &mut String, level: &str) {
    if level.is_empty() {
        out.push('%');
        return;
    }
    for b in level.bytes() {
        match b {
            b'.' | b'*' | b'>' | b'%' | b' ' => out.push_str(&format!("%{b:02X}")),
            0x21..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
}

/// The topic of a subject made by [`subject`]; `None` for anything else.
pub(crate) fn topic(subject: &str) -> Option<String> {
    let (prefix, rest) = subject.split_once('.')?;
    if ![LIVE, LIVE_BATCH, LIVE_HEADERS, STORED, RETAINED].contains(&prefix) {
        return None;
    }
    let mut levels = Vec::new();
    for token in rest.split('.') {
        levels.push(unescape(token, b'%')?);
    }
    Some(levels.join("/"))
}

/// `token` with its `<escape>XX` sequences decoded (a lone escape: the empty string).
fn unescape(token: &str, escape: u8) -> Option<String> {
    if token.len() == 1 && token.as_bytes()[0] == escape {
        return Some(String::new());
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == escape {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The NATS subjects under `prefix` a topic filter needs (a trailing `#` also matches its
/// parent level).
pub(crate) fn filter_subjects(prefix: &str, filter: &str) -> Vec<String> {
    let levels: Vec<&str> = filter.split('/').collect();
    let mut tokens: Vec<String> = Vec::new();
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "+" => tokens.push("*".to_string()),
            "#" if i == levels.len() - 1 => {
                let parent = tokens.clone();
                tokens.push(">".to_string());
                let mut out = vec![format!("{prefix}.{}", tokens.join("."))];
                if !parent.is_empty() {
                    out.push(format!("{prefix}.{}", parent.join(".")));
                }
                return out;
            }
            other => {
                let mut t = String::new();
                push_level(&mut t, other);
                tokens.push(t);
            }
        }
    }
    vec![format!("{prefix}.{}", tokens.join("."))]
}

/// Whether `filter` (not shared) is subscribed with its subjects' kind wildcarded (`*.TOPIC`,
/// one subscription for [`LIVE_BATCH`], [`STORED`] and the older [`LIVE`] and
/// [`LIVE_HEADERS`] at once: each NATS subscription costs a node over 5 KiB, its client-side
/// queue). Only when its first level is a name: no other subject has it in second place but
/// by chance (what does is read and dropped by [`Node::arrived`]). Not for a first level that is
/// a wildcard, or a name NATS or the cluster gives its own subjects in second place (`$JS.API`,
/// `$JS.ACK`, `$JS.EVENT`, `$JS.FC`, `$KV.PORTCULLIS_…`, `$SYS.SERVER`, `$SYS.ACCOUNT`,
/// `$SYS.REQ`, the raft subjects `$NRG.AE`, `.V`, `.P`, `.RP`, `.R`, `.CR` that newer servers may
/// show their clients, `pcn` and `pcw` with a node's 16 hex digits, and the pings `pcn.NAME=23…`,
/// whose `=23` is a node's escaped `#`): those would bring the node their traffic — and an
/// interest in a node's ping subject that never answers would keep that node from ever being
/// found gone.
fn any_kind(filter: &str) -> bool {
    let first = filter.split('/').next().unwrap_or_default();
    let nodes_own = first.len() == 16 && first.bytes().all(|b| b.is_ascii_hexdigit());
    !(first.is_empty()
        || first == "+"
        || first == "#"
        || nodes_own
        || first.contains("=23")
        || matches!(
            first,
            "API"
                | "ACK"
                | "EVENT"
                | "FC"
                | "SERVER"
                | "ACCOUNT"
                | "REQ"
                | "AE"
                | "V"
                | "P"
                | "RP"
                | "R"
                | "CR"
        )
        || first.starts_with("PORTCULLIS"))
}

/// The kind of every subject of a topic, in a subscription of [`any_kind`].
const ANY_KIND: &str = "*";

/// The servers of a `nats_url` (several comma-separated).
pub(crate) fn servers(url: &str) -> Result<Vec<async_nats::ServerAddr>> {
    url.split(',')
        .map(|u| {
            u.trim().parse::<async_nats::ServerAddr>().map_err(|e| {
                anyhow::anyhow!(
                    "nats_url: '{}' is not a NATS server URL ({e}); write nats://host:port, several comma-separated",
                    u.trim()
                )
            })
        })
        .collect()
}

/// A client id as a key of the clients bucket (letters, digits, `-` and `_` kept, every other
/// byte `=XX`).
pub(crate) fn client_key(client_id: &str) -> String {
    let mut out = String::with_capacity(client_id.len());
    for b in client_id.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => out.push(char::from(b)),
            _ => out.push_str(&format!("={b:02X}")),
        }
    }
    out
}

/// The client id of a key made by [`client_key`].
pub(crate) fn client_of_key(key: &str) -> Option<String> {
    if key.is_empty() {
        return None;
    }
    unescape(key, b'=')
}

/// The queue group of a shared subscription on NATS: one per `$share/GROUP/FILTER`.
fn queue_group(filter: &str) -> String {
    // A stable hash: every node must name the same group alike.
    format!("pcs{:016x}", fnv(filter.as_bytes()))
}

type Reply = oneshot::Sender<Result<(), String>>;

/// What the broker asks of the cluster.
enum Work {
    /// A message, the client id that published it, who waits for it to be stored, for a
    /// persistent session's QoS 2 message its (packet id, DUP), and whether a persistent
    /// session of this node needs it kept.
    Publish(
        Message,
        Option<String>,
        Option<Reply>,
        Option<(u16, bool)>,
        bool,
    ),
}

/// The queue from the broker (under its lock) to the publishing task, at most [`QUEUE`]: a
/// vector under a mutex, cheaper per message than a channel (no semaphore, no linked blocks,
/// no box per message, one wake-up per burst), which under a flood was a tenth of the
/// publishing node's time.
#[derive(Default)]
struct WorkQueue {
    items: Mutex<VecDeque<Work>>,
    /// Told when the queue gets its first item, and when it closes.
    ready: tokio::sync::Notify,
    closed: AtomicBool,
}

impl WorkQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Work>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `work`; false (and `work` dropped) when the queue is full.
    fn try_send(&self, work: Work) -> bool {
        let mut items = self.lock();
        if items.len() >= QUEUE {
            return false;
        }
        let first = items.is_empty();
        items.push_back(work);
        drop(items);
        if first {
            self.ready.notify_one();
        }
        true
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    /// Room left.
    fn capacity(&self) -> usize {
        QUEUE.saturating_sub(self.len())
    }

    fn try_recv(&self) -> Option<Work> {
        self.lock().pop_front()
    }

    /// Waits for work and moves up to `limit` into `out`; 0 once closed and empty. Cancel-safe:
    /// nothing is taken but under the lock, without waiting.
    async fn recv_many(&self, out: &mut Vec<Work>, limit: usize) -> usize {
        loop {
            {
                let mut items = self.lock();
                if !items.is_empty() {
                    let n = limit.min(items.len());
                    out.extend(items.drain(..n));
                    return n;
                }
            }
            if self.closed.load(Ordering::Acquire) {
                return 0;
            }
            self.ready.notified().await;
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }
}

enum Control {
    Interest(String, bool, Option<Reply>),
    Retained {
        client_id: String,
        generation: u64,
        filter: String,
        options: SubscriptionOptions,
    },
    Claim {
        client_id: String,
        clean_start: bool,
        identity: String,
        reply: oneshot::Sender<Result<Claim, String>>,
    },
    /// A connection ended: its claim (if it made one) goes.
    Release(String, Option<u64>),
    DurableSession {
        client_id: String,
        generation: u64,
        identity: String,
        expiry: Duration,
        incarnation: u64,
    },
    DurableSubscribe {
        client_id: String,
        generation: u64,
        filter: String,
        options: SubscriptionOptions,
        reply: Reply,
    },
    DurableUnsubscribe(String, String),
    DurableOffline(String, Duration, Duration),
    /// A persistent session ended, as held under its last connection's claim.
    DurableEnd(String, Option<u64>),
    /// A persistent session released its QoS 2 message: its ledger entry (key) goes.
    Released(String, Reply),
    /// This node's entries in the route table: all written again.
    RoutesWrite,
    /// Entries of this node's that it no longer holds: taken out (unless held again by then).
    RoutesDelete(Vec<String>),
    /// Whether a node of protocol 4 or earlier is known changed (see
    /// [`NatsState::set_older_gone`]).
    Older,
}

/// The broker's side: queues, never blocks.
struct NatsBridge {
    work: Arc<WorkQueue>,
    control: mpsc::UnboundedSender<Control>,
    state: Arc<NatsState>,
}

impl Drop for NatsBridge {
    /// The broker let go of the cluster: the publishing task sends what it holds and ends.
    fn drop(&mut self) {
        self.work.close();
    }
}

/// The QoS 2 ledger's key for a client's packet id.
fn qos2_key(client_id: &str, packet_id: u16) -> String {
    format!("{}.{packet_id}", client_key(client_id))
}

fn answered(result: Result<(), String>) -> Confirmation {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(result);
    rx
}

impl Bridge for NatsBridge {
    fn published(
        &self,
        message: Message,
        publisher: Option<&str>,
        exactly_once: Option<(u16, bool)>,
        keep: bool,
    ) -> Option<Confirmation> {
        let stored = message.qos != QoS::AtMostOnce || message.retain;
        let message_qos = message.qos;
        let (reply, confirm) = if stored {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        if !self.work.try_send(Work::Publish(
            message,
            // Only a kept message carries its publisher (for No Local on the way back).
            publisher
                .filter(|_| message_qos != QoS::AtMostOnce)
                .map(str::to_string),
            reply,
            exactly_once,
            keep,
        )) {
            // Looked up once: under a flood every message may come here.
            static DROPPED: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
            DROPPED
                .get_or_init(|| metrics::counter!("portcullis_cluster_messages_dropped_total"))
                .increment(1);
            return stored.then(|| answered(Err("the queue to NATS is full".into())));
        }
        confirm
    }

    fn interest(&self, filter: &str, held: bool) -> Option<Confirmation> {
        let (reply, confirm) = if held {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let _ = self
            .control
            .send(Control::Interest(filter.to_string(), held, reply));
        confirm
    }

    fn retained(
        &self,
        client_id: &str,
        generation: u64,
        filter: &str,
        options: SubscriptionOptions,
    ) {
        let _ = self.control.send(Control::Retained {
            client_id: client_id.to_string(),
            generation,
            filter: filter.to_string(),
            options,
        });
    }

    fn claim(&self, client_id: &str, clean_start: bool, identity: &str) -> Claimed {
        let (tx, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(Control::Claim { reply, .. })) =
            self.control.send(Control::Claim {
                client_id: client_id.to_string(),
                clean_start,
                identity: identity.to_string(),
                reply: tx,
            })
        {
            let _ = reply.send(Err("the cluster connection is gone".into()));
        }
        rx
    }

    fn durable_session(
        &self,
        client_id: &str,
        generation: u64,
        identity: &str,
        expiry: Duration,
        incarnation: Option<u64>,
    ) -> u64 {
        let incarnation = incarnation.unwrap_or_else(new_incarnation);
        let _ = self.control.send(Control::DurableSession {
            client_id: client_id.to_string(),
            generation,
            identity: identity.to_string(),
            expiry,
            incarnation,
        });
        incarnation
    }

    fn durable_subscribe(
        &self,
        client_id: &str,
        generation: u64,
        filter: &str,
        options: SubscriptionOptions,
    ) -> Option<Confirmation> {
        let (tx, rx) = oneshot::channel();
        let _ = self.control.send(Control::DurableSubscribe {
            client_id: client_id.to_string(),
            generation,
            filter: filter.to_string(),
            options,
            reply: tx,
        });
        Some(rx)
    }

    fn durable_unsubscribe(&self, client_id: &str, filter: &str) {
        let _ = self.control.send(Control::DurableUnsubscribe(
            client_id.to_string(),
            filter.to_string(),
        ));
    }

    fn durable_offline(&self, client_id: &str, expiry: Duration, offline_for: Duration) {
        let _ = self.control.send(Control::DurableOffline(
            client_id.to_string(),
            expiry,
            offline_for,
        ));
    }

    fn backpressure(&self) -> Option<portcullis_mqtt::broker::Backpressure> {
        if self.work.capacity() >= QUEUE / 4 {
            return None;
        }
        let (work, state) = (self.work.clone(), self.state.clone());
        Some(Box::pin(async move {
            // Until half the queue is free again, as the publishing task says when it took
            // some. Not by reserving the room: a waiting reservation is handed every slot freed
            // until it has them all, and every other publication meanwhile found the queue full
            // (dropped: half of a QoS 0 fan-in's).
            loop {
                let drained = state.drained.notified();
                tokio::pin!(drained);
                drained.as_mut().enable();
                if work.capacity() >= QUEUE / 2 {
                    return;
                }
                drained.await;
            }
        }))
    }

    fn durable_end(&self, client_id: &str, claim: Option<u64>) {
        let _ = self
            .control
            .send(Control::DurableEnd(client_id.to_string(), claim));
    }

    fn release(&self, client_id: &str, claim: Option<u64>) {
        let _ = self
            .control
            .send(Control::Release(client_id.to_string(), claim));
    }

    fn released(&self, client_id: &str, packet_id: u16) -> Option<Confirmation> {
        let (tx, rx) = oneshot::channel();
        let _ = self
            .control
            .send(Control::Released(qos2_key(client_id, packet_id), tx));
        Some(rx)
    }
}

/// Whether this node is connected to NATS, as the client's events say, and has its JetStream
/// streams (for readiness).
#[derive(Debug, Default)]
pub(crate) struct NatsState {
    connected: AtomicBool,
    streams: AtomicBool,
    client: std::sync::OnceLock<async_nats::Client>,
    /// Every node on the bus reads QoS 1 batches (the heartbeat finds out; until then, and
    /// whenever a node of an older version is up, QoS 1 messages cross one by one).
    batches: AtomicBool,
    /// Every node on the bus reads QoS 1 messages that cross live and keeps those it needs
    /// (see [`kept`]); until then every QoS 1 message is kept.
    live_acknowledged: AtomicBool,
    /// Which topics' QoS 1 messages the cluster keeps.
    kept: kept::KeptInterest,
    /// Every node on the bus reads batches for nodes (protocol 4): QoS 0 messages go by the
    /// route table.
    node_routes: AtomicBool,
    /// Which nodes want which topics' QoS 0 messages.
    routes: routes::Routes,
    /// Every node on the bus speaks protocol 5 (sends nothing on [`LIVE`] or [`LIVE_HEADERS`]):
    /// a filter's subscriptions there, two more per subject each with its client-side queue
    /// (a third of a subscribed device's memory), are not made.
    older_gone: AtomicBool,
    /// The control task's queue, told when [`NatsState::older_gone`] changes; weak, as
    /// [`Node::control`].
    control: std::sync::OnceLock<mpsc::WeakUnboundedSender<Control>>,
    /// When a slow consumer was last told in the log.
    slow_told: std::sync::Mutex<Option<std::time::Instant>>,
    /// The publishing task took publications from its queue (see [`NatsBridge::backpressure`]).
    drained: tokio::sync::Notify,
    /// Connections to NATS made again after losing one.
    reconnects: Reconnects,
    /// When this node's watch of the sessions bucket last brought back its own probe (ms since
    /// the Unix epoch; see [`PROBE_EVERY`]).
    probe_seen_ms: std::sync::atomic::AtomicU64,
}

/// Counts connections to NATS made again: a JetStream watch may have missed changes (or stalled
/// without an error) while the connection was down, so what it feeds is read again.
#[derive(Debug)]
struct Reconnects(tokio::sync::watch::Sender<u64>);

impl Default for Reconnects {
    fn default() -> Reconnects {
        Reconnects(tokio::sync::watch::channel(0).0)
    }
}

impl NatsState {
    /// Messages for this node's subscriptions arrived faster than it took them: the client
    /// dropped some (counted; told in the log at most once a second).
    fn slow_consumer(&self) {
        metrics::counter!("portcullis_cluster_slow_consumer_total").increment(1);
        let now = std::time::Instant::now();
        let due = self.slow_told.lock().is_ok_and(|mut told| {
            let due = told.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1));
            if due {
                *told = Some(now);
            }
            due
        });
        if due {
            tracing::warn!(target: "portcullis::cluster", "this node's NATS subscriptions fell behind: messages routed to it were dropped (portcullis_cluster_slow_consumer_total)");
        }
    }

    /// Whether QoS 1 messages may cross in batches (see [`batches_understood`]).
    pub(crate) fn set_batches(&self, on: bool) {
        if self.batches.swap(on, Ordering::SeqCst) != on {
            if on {
                tracing::info!(target: "portcullis::cluster", "every node reads QoS 1 batches: QoS 1 messages cross NATS a topic's batch at a time");
            } else {
                tracing::info!(target: "portcullis::cluster", "a node of an older version is up: QoS 1 messages cross NATS one by one");
            }
        }
    }

    /// Whether QoS 0 messages may go by the route table (see [`routes_understood`]).
    pub(crate) fn set_node_routes(&self, on: bool) {
        if self.node_routes.swap(on, Ordering::SeqCst) != on {
            if on {
                tracing::info!(target: "portcullis::cluster", "every node reads batches for nodes (bus protocol 4): QoS 0 messages go to the nodes that want them, many topics at a time");
            } else {
                tracing::info!(target: "portcullis::cluster", "a node of an older version is up: QoS 0 messages cross NATS a topic at a time");
            }
        }
    }

    /// Whether every node sends QoS 0 messages only as batches (see [`older_gone`]): the
    /// control task drops or makes the filters' subscriptions to the older subjects.
    pub(crate) fn set_older_gone(&self, on: bool) {
        if self.older_gone.swap(on, Ordering::SeqCst) != on {
            if on {
                tracing::info!(target: "portcullis::cluster", "every node speaks bus protocol 5: the subjects of older versions' QoS 0 messages are no longer read");
            } else {
                tracing::info!(target: "portcullis::cluster", "a node of an older version is up: its QoS 0 messages are read on the subjects it sends them on");
            }
            if let Some(control) = self
                .control
                .get()
                .and_then(mpsc::WeakUnboundedSender::upgrade)
            {
                let _ = control.send(Control::Older);
            }
        }
    }

    /// Whether QoS 1 messages nobody keeps may cross live (see [`live_understood`]).
    pub(crate) fn set_live_acknowledged(&self, on: bool) {
        if self.live_acknowledged.swap(on, Ordering::SeqCst) != on {
            if on {
                tracing::info!(target: "portcullis::cluster", "every node reads QoS 1 messages that cross live (bus protocol 3): with nats_qos1_live, JetStream keeps only those a persistent session or a shared group needs");
            } else {
                tracing::info!(target: "portcullis::cluster", "a node of an older version is up: JetStream keeps every QoS 1 message");
            }
        }
    }

    /// The connection as `cluster status` shows it.
    pub(crate) fn describe(&self) -> String {
        let client = self.client.get();
        match client.map(|c| c.connection_state()) {
            Some(async_nats::connection::State::Connected)
                if self.connected.load(Ordering::SeqCst) =>
            {
                let server = client
                    .map(|c| c.server_info().server_name)
                    .unwrap_or_default();
                if self.streams.load(Ordering::SeqCst) {
                    format!("connected to {server}")
                } else {
                    format!("connected to {server}, setting up JetStream")
                }
            }
            Some(_) => "disconnected".to_string(),
            None => "connecting".to_string(),
        }
    }

    /// Connected now (the last event said so, and the client agrees) and set up.
    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
            && self.streams.load(Ordering::SeqCst)
            && self
                .client
                .get()
                .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected)
    }
}

/// FNV-1a, 64 bits.
fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The first byte of a live frame (a QoS 0 message on `pcl.`, without NATS headers).
const FRAME: u8 = 0xC1;

/// A message's MQTT 5 properties as they cross NATS (the expiry counted down), if any.
fn wire_properties(m: &Message) -> Option<bytes::Bytes> {
    let expiry = m.expires_at.map(|at| {
        let left = at
            .saturating_duration_since(std::time::Instant::now())
            .as_secs();
        u32::try_from(left.max(1)).unwrap_or(u32::MAX)
    });
    if expiry.is_none() && m.properties == PublishProperties::default() {
        return None;
    }
    let mut properties = m.properties.clone();
    if expiry.is_some() {
        properties.message_expiry_interval = expiry;
    }
    portcullis_mqtt::codec::encode_message_properties(&properties).ok()
}

/// A QoS 0 message as it crosses NATS: its metadata in front of the payload rather than in
/// headers (which cost a map and strings per message on both sides). [`FRAME`], flags (bit 0:
/// retain), origin (u64), sequence (u64), properties length (u32) and the MQTT 5 properties,
/// then the payload; integers big-endian. Sent by nodes of protocol 4 and earlier; written
/// here only by tests of reading them.
#[cfg(test)]
fn live_frame(m: &Message, origin: u64, seq: u64) -> bytes::Bytes {
    use bytes::BufMut;
    let properties = wire_properties(m).unwrap_or_default();
    let mut out = bytes::BytesMut::with_capacity(22 + properties.len() + m.payload.len());
    out.put_u8(FRAME);
    out.put_u8(u8::from(m.retain));
    out.put_u64(origin);
    out.put_u64(seq);
    out.put_u32(u32::try_from(properties.len()).unwrap_or(u32::MAX));
    out.put_slice(&properties);
    out.put_slice(&m.payload);
    out.freeze()
}

/// The messages of one flush, by topic: each topic's messages cross NATS as one message, so
/// that a flood costs NATS, and both nodes' NATS clients, one message per topic and flush instead
/// of one per MQTT message. Order is kept per topic, which is what MQTT promises (messages of
/// different topics from one publisher may cross in another order).
///
/// QoS 0 batches go on [`LIVE_BATCH`] (core NATS); QoS 1 batches on [`STORED`] through
/// JetStream, one stored message per batch (marked by the [`BATCH_HEADER`] header), its
/// publishers answered together once the stream acknowledged it — or, when nobody keeps them
/// ([`kept`]), on [`LIVE_BATCH`] as QoS 0's, answered once written to NATS.
///
/// A batch: its kind's first byte ([`BATCH_FRAME`] for QoS 0, [`STORED_FRAME`] for QoS 1), the
/// origin (u64) and the first message's sequence (u64, big-endian), then per message its
/// sequence's distance from the previous one, flags (bit 0: retain; bit 1: the publisher's
/// client id follows), the client id if flagged, the MQTT 5 properties and the payload, each
/// length and distance a LEB128 varint: about four bytes per message on top of its payload
/// (and its client id, in a QoS 1 batch).
struct Batches {
    frame: u8,
    prefix: &'static str,
    /// Messages in one batch at most.
    messages: usize,
    groups: Vec<Group>,
    index: HashMap<String, usize>,
}

/// One topic's batch being built.
struct Group {
    topic: String,
    bytes: bytes::BytesMut,
    first: u64,
    last: u64,
    count: usize,
    replies: Vec<Reply>,
}

/// A topic's batch, ready to send.
struct Sealed {
    subject: String,
    payload: bytes::Bytes,
    /// Its first message's sequence (a stored batch's id).
    first: u64,
    /// Who waits for it to be stored.
    replies: Vec<Reply>,
}

const BATCH_FRAME: u8 = 0xC2;
const STORED_FRAME: u8 = 0xC3;

/// The header marking a QoS 1 batch on [`STORED`] (a message alone there carries its metadata
/// in headers instead).
const BATCH_HEADER: &str = "Portcullis-Batch";

/// A topic's batch is sent once it reaches this size (a single larger message alone).
const LIVE_BATCH_BYTES: usize = 64 * 1024;

/// Stored batches on their way to JetStream at most before the next ones wait for one to come
/// back (a batch that reached its size goes at once): quiet, a message goes at once; under
/// load, batches grow while earlier ones are being stored.
const MAX_STORING: usize = 4;

/// QoS 1 messages in one stored batch at most: JetStream settles a batch whole, so a message
/// given back brings back the others of its batch (at least once, as QoS 1 allows).
const STORED_BATCH_MESSAGES: usize = 128;

fn put_varint(out: &mut bytes::BytesMut, mut n: u64) {
    use bytes::BufMut;
    while n >= 0x80 {
        out.put_u8((n as u8) | 0x80);
        n >>= 7;
    }
    out.put_u8(n as u8);
}

fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        n |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

impl Batches {
    /// QoS 0 messages (not retained), for [`LIVE_BATCH`].
    fn live() -> Batches {
        Batches::new(BATCH_FRAME, LIVE_BATCH, usize::MAX)
    }

    /// QoS 1 messages (not retained), for [`STORED`].
    fn stored() -> Batches {
        Batches::new(STORED_FRAME, STORED, STORED_BATCH_MESSAGES)
    }

    /// QoS 1 messages (not retained) nobody keeps, for [`LIVE_BATCH`]: stored batches' frames,
    /// which a node whose persistent session needs them stores as they are (see [`kept`]).
    fn acknowledged() -> Batches {
        Batches::new(STORED_FRAME, LIVE_BATCH, STORED_BATCH_MESSAGES)
    }

    /// A batch of `topic` is being built.
    fn holds(&self, topic: &str) -> bool {
        self.index
            .get(topic)
            .is_some_and(|i| !self.groups[*i].bytes.is_empty())
    }

    fn new(frame: u8, prefix: &'static str, messages: usize) -> Batches {
        Batches {
            frame,
            prefix,
            messages,
            groups: Vec::new(),
            index: HashMap::new(),
        }
    }

    /// Adds `m` (published by `client`, stored for `reply`); a batch that would grow past
    /// [`LIVE_BATCH_BYTES`] or its count is returned to be sent first.
    fn add(
        &mut self,
        m: &Message,
        client: Option<&str>,
        reply: Option<Reply>,
        origin: u64,
        seq: u64,
    ) -> Option<Sealed> {
        use bytes::BufMut;
        let properties = wire_properties(m).unwrap_or_default();
        let client = client.unwrap_or_default();
        let len = 4 * 10 + 1 + client.len() + properties.len() + m.payload.len();
        let i = match self.index.get(m.topic.as_str()) {
            Some(i) => *i,
            None => {
                self.index.insert(m.topic.clone(), self.groups.len());
                self.groups.push(Group {
                    topic: m.topic.clone(),
                    bytes: bytes::BytesMut::new(),
                    first: 0,
                    last: 0,
                    count: 0,
                    replies: Vec::new(),
                });
                self.groups.len() - 1
            }
        };
        let prefix = self.prefix;
        let group = &mut self.groups[i];
        let full = (!group.bytes.is_empty()
            && (group.bytes.len() + len > LIVE_BATCH_BYTES || group.count >= self.messages))
            .then(|| group.seal(prefix));
        let out = &mut group.bytes;
        out.reserve(17 + len);
        if out.is_empty() {
            out.put_u8(self.frame);
            out.put_u64(origin);
            out.put_u64(seq);
            group.first = seq;
            group.last = seq;
        }
        put_varint(out, seq - group.last);
        group.last = seq;
        group.count += 1;
        out.put_u8(u8::from(m.retain) | if client.is_empty() { 0 } else { 2 });
        if !client.is_empty() {
            put_varint(out, client.len() as u64);
            out.put_slice(client.as_bytes());
        }
        put_varint(out, properties.len() as u64);
        out.put_slice(&properties);
        put_varint(out, m.payload.len() as u64);
        out.put_slice(&m.payload);
        group.replies.extend(reply);
        full
    }

    /// Nothing waiting to be sent.
    fn is_empty(&self) -> bool {
        self.groups.iter().all(|g| g.bytes.is_empty())
    }

    /// Every topic's batch, in the order their topics came.
    fn drain(&mut self) -> Vec<Sealed> {
        self.index.clear();
        let prefix = self.prefix;
        self.groups
            .drain(..)
            .filter(|g| !g.bytes.is_empty())
            .map(|mut g| g.seal(prefix))
            .collect()
    }
}

impl Group {
    fn seal(&mut self, prefix: &str) -> Sealed {
        self.count = 0;
        Sealed {
            subject: subject(prefix, &self.topic),
            payload: std::mem::take(&mut self.bytes).freeze(),
            first: self.first,
            replies: std::mem::take(&mut self.replies),
        }
    }
}

/// The messages of a batch (QoS 0 or 1) as frames; stops at the first malformed one.
fn batch_frames(batch: &bytes::Bytes) -> impl Iterator<Item = LiveFrame> + '_ {
    let qos = match batch.first() {
        Some(&BATCH_FRAME) => Some(QoS::AtMostOnce),
        Some(&STORED_FRAME) => Some(QoS::AtLeastOnce),
        _ => None,
    };
    let header = qos.filter(|_| batch.len() >= 17).map(|qos| {
        let u64_at = |i: usize| u64::from_be_bytes(batch[i..i + 8].try_into().unwrap_or_default());
        (u64_at(1), u64_at(9), qos)
    });
    let (origin, mut seq, qos) = header.unwrap_or((0, 0, QoS::AtMostOnce));
    let mut at = if header.is_some() { 17 } else { batch.len() };
    let mut first = true;
    std::iter::from_fn(move || {
        let slice = |at: &mut usize| {
            let n = usize::try_from(read_varint(batch, at)?).ok()?;
            let end = at.checked_add(n).filter(|e| *e <= batch.len())?;
            let part = batch.slice(*at..end);
            *at = end;
            Some(part)
        };
        let delta = read_varint(batch, &mut at)?;
        if !first {
            seq = seq.checked_add(delta)?;
        }
        first = false;
        let flags = *batch.get(at)?;
        at += 1;
        let client = if flags & 2 == 2 {
            Some(slice(&mut at)?)
        } else {
            None
        };
        let properties = slice(&mut at)?;
        let payload = slice(&mut at)?;
        Some(LiveFrame {
            origin,
            seq,
            qos,
            retain: flags & 1 == 1,
            client,
            properties,
            payload,
        })
    })
}

/// The (origin, sequence) a message from NATS carries in front of its frames: a batch's first
/// message's, or a live frame's.
fn order_key(msg: &async_nats::Message) -> Option<(u64, u64)> {
    // A message alone with headers (kept, or from an older node) carries its payload as it is.
    if msg
        .headers
        .as_ref()
        .is_some_and(|h| h.get(BATCH_HEADER).is_none())
    {
        return None;
    }
    let p = &msg.payload;
    let at = match p.first() {
        Some(&BATCH_FRAME | &STORED_FRAME) if p.len() >= 17 => 1,
        Some(&FRAME) if p.len() >= 18 => 2,
        _ => return None,
    };
    let u64_at = |i: usize| u64::from_be_bytes(p[i..i + 8].try_into().unwrap_or_default());
    Some((u64_at(at), u64_at(at + 8)))
}

/// The order to handle `arrived` in (indexes): each node's messages in the order it published
/// them (by sequence), in the places its messages took; the rest where they came. A filter's
/// subjects are separate subscriptions (a topic's QoS 1 messages cross live or kept, and a
/// topic switches when a persistent session subscribes), so one node's messages may come
/// across them out of its order.
fn in_publish_order(arrived: &[async_nats::Message]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..arrived.len()).collect();
    if arrived.len() < 2 {
        return order;
    }
    let keys: Vec<Option<(u64, u64)>> = arrived.iter().map(order_key).collect();
    let mut by_origin: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        if let Some((origin, _)) = key {
            by_origin.entry(*origin).or_default().push(i);
        }
    }
    let seq = |i: usize| keys[i].map_or(0, |(_, s)| s);
    for places in by_origin.values() {
        if places.windows(2).all(|w| seq(w[0]) <= seq(w[1])) {
            continue;
        }
        let mut sorted = places.clone();
        sorted.sort_by_key(|&i| seq(i));
        for (place, from) in places.iter().zip(sorted) {
            order[*place] = from;
        }
    }
    order
}

/// A message of a batch, or a live frame, read back.
struct LiveFrame {
    origin: u64,
    seq: u64,
    qos: QoS,
    retain: bool,
    /// Its publisher's client id (QoS 1 batches: for No Local).
    client: Option<bytes::Bytes>,
    properties: bytes::Bytes,
    payload: bytes::Bytes,
}

fn read_live_frame(frame: &bytes::Bytes) -> Option<LiveFrame> {
    if frame.len() < 22 || frame[0] != FRAME {
        return None;
    }
    let u64_at = |i: usize| u64::from_be_bytes(frame[i..i + 8].try_into().unwrap_or_default());
    let n = usize::try_from(u32::from_be_bytes(frame[18..22].try_into().ok()?)).ok()?;
    let end = 22usize.checked_add(n).filter(|e| *e <= frame.len())?;
    Some(LiveFrame {
        origin: u64_at(2),
        seq: u64_at(10),
        qos: QoS::AtMostOnce,
        retain: frame[1] & 1 == 1,
        client: None,
        properties: frame.slice(22..end),
        payload: frame.slice(end..),
    })
}

impl LiveFrame {
    /// The message, its expiry counted from `published` (see [`arrived_message`]).
    fn message(self, topic: String, published: Option<SystemTime>) -> Option<Message> {
        let properties = if self.properties.is_empty() {
            PublishProperties::default()
        } else {
            portcullis_mqtt::codec::decode_message_properties(&self.properties).ok()?
        };
        arrived_message(
            topic,
            self.payload,
            self.qos,
            self.retain,
            properties,
            published,
        )
    }
}

/// What a QoS 1 batch carries in headers for nodes before batches: an expiry of zero, so that
/// such a node, reading it as one message, drops it rather than deliver the batch's bytes (the
/// batch reaches only nodes that read batches; see [`batches_understood`]).
fn expired_properties() -> &'static str {
    static EXPIRED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    EXPIRED.get_or_init(|| {
        let properties = PublishProperties {
            message_expiry_interval: Some(0),
            ..Default::default()
        };
        base64::engine::general_purpose::STANDARD.encode(
            portcullis_mqtt::codec::encode_message_properties(&properties).unwrap_or_default(),
        )
    })
}

/// The bus protocol this version speaks to other nodes: 2 since QoS 1 messages cross NATS in
/// batches, 3 since QoS 1 messages nobody keeps cross live (a node stores those its persistent
/// sessions need; see [`kept`]), 4 since QoS 0 messages go by the route table (see [`routes`]),
/// 5 since retained QoS 0 messages cross as batches too (nothing is sent on [`LIVE`]).
/// Reported in the heartbeat's version (`0.1.0+bus.5`); a node reporting none speaks 1.
pub(crate) const BUS_PROTOCOL: u32 = 5;

/// The version this node reports in its heartbeat.
pub(crate) fn reported_version() -> String {
    format!("{}+bus.{BUS_PROTOCOL}", env!("CARGO_PKG_VERSION"))
}

/// Whether every node the registry knows on the bus (with NATS) reads QoS 1 batches; until then
/// QoS 1 messages cross one by one, as older nodes read them. However long ago its last
/// heartbeat (the registry forgets a node silent for a day, longer than the stream keeps a
/// message): a node of an older version that comes back must not meet batches it would drop,
/// and no clock is compared.
pub(crate) fn batches_understood(nodes: &[portcullis_registry::NodeStatus]) -> bool {
    all_speak(nodes, 2)
}

/// Whether every node the registry knows on the bus keeps the QoS 1 messages its persistent
/// sessions need when they cross live (protocol 3); until then JetStream keeps every one, as
/// older nodes expect (as [`batches_understood`]).
pub(crate) fn live_understood(nodes: &[portcullis_registry::NodeStatus]) -> bool {
    all_speak(nodes, 3)
}

/// Whether every node the registry knows on the bus reads batches for nodes (protocol 4): until
/// then QoS 0 messages cross a topic at a time (as [`batches_understood`]).
pub(crate) fn routes_understood(nodes: &[portcullis_registry::NodeStatus]) -> bool {
    all_speak(nodes, 4)
}

/// Whether every node the registry knows on the bus sends QoS 0 messages only as batches
/// (protocol 5): until then each filter is also subscribed on [`LIVE`] and [`LIVE_HEADERS`].
pub(crate) fn older_gone(nodes: &[portcullis_registry::NodeStatus]) -> bool {
    all_speak(nodes, 5)
}

fn all_speak(nodes: &[portcullis_registry::NodeStatus], protocol: u32) -> bool {
    nodes.iter().filter(|n| n.nats.is_some()).all(|n| {
        n.version
            .split_once("+bus.")
            .and_then(|(_, p)| p.parse::<u32>().ok())
            .unwrap_or(1)
            >= protocol
    })
}

/// Batches for nodes sent or received (see [`routes::NodeBatches`]).
fn node_batches(direction: &'static str) -> &'static metrics::Counter {
    static SENT: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    static RECEIVED: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    let cell = if direction == "sent" {
        &SENT
    } else {
        &RECEIVED
    };
    cell.get_or_init(
        || metrics::counter!("portcullis_cluster_node_batches_total", "direction" => direction),
    )
}

/// The headers a message crosses NATS with.
fn headers_of(m: &Message, origin: &str, id: &str) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Portcullis-Origin", origin);
    headers.insert("Portcullis-Id", id);
    headers.insert("Portcullis-QoS", (m.qos as u8).to_string().as_str());
    if m.retain {
        headers.insert("Portcullis-Retain", "1");
    }
    if let Some(bytes) = wire_properties(m) {
        headers.insert(
            "Portcullis-Properties",
            base64::engine::general_purpose::STANDARD
                .encode(&bytes)
                .as_str(),
        );
    }
    headers
}

/// A message from NATS; `published` is when a stream stored it (for its expiry).
fn message_of(
    topic: String,
    headers: Option<&async_nats::HeaderMap>,
    payload: bytes::Bytes,
    published: Option<SystemTime>,
) -> Option<Message> {
    let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
    let qos = match header("Portcullis-QoS") {
        Some("2") => QoS::ExactlyOnce,
        Some("1") => QoS::AtLeastOnce,
        _ => QoS::AtMostOnce,
    };
    let properties = header("Portcullis-Properties")
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| portcullis_mqtt::codec::decode_message_properties(&b).ok())
        .unwrap_or_default();
    arrived_message(
        topic,
        payload,
        qos,
        header("Portcullis-Retain").is_some(),
        properties,
        published,
    )
}

/// A message that crossed NATS, its expiry counted from `published` (when a stream stored it;
/// `None`: just now); `None` if it expired on the way.
fn arrived_message(
    topic: String,
    payload: bytes::Bytes,
    qos: QoS,
    retain: bool,
    properties: PublishProperties,
    published: Option<SystemTime>,
) -> Option<Message> {
    let mut expires_at = None;
    if let Some(seconds) = properties.message_expiry_interval {
        let age = published
            .and_then(|p| SystemTime::now().duration_since(p).ok())
            .unwrap_or_default();
        let left = Duration::from_secs(u64::from(seconds)).checked_sub(age)?;
        expires_at = Some(std::time::Instant::now() + left);
    }
    Some(Message {
        topic,
        payload,
        qos,
        retain,
        properties,
        expires_at,
        sent_as: None,
        preferred_id: None,
        released: false,
        receipt: None,
    })
}

/// Connects to NATS and bridges `broker` to the other nodes, as node `id`; `state` follows the
/// connection. The JetStream streams are made (or found) in the background, retried until NATS
/// answers; the node is not ready before.
pub(crate) async fn start(
    options: &NatsOptions,
    id: &str,
    broker: Arc<Broker>,
    state: Arc<NatsState>,
    ca: &portcullis_pki::issue::CaIssuer,
) -> Result<()> {
    let events = state.clone();
    let url = options.url.clone();
    let servers = servers(&url)?;
    let mut connect = async_nats::ConnectOptions::new();
    if options.tls {
        connect = connect
            .require_tls(true)
            .tls_client_config(nats_tls(ca, id)?);
    }
    let client = connect
        .name(format!("portcullis {id}"))
        .client_capacity(QUEUE)
        .retry_on_initial_connect()
        .event_callback(move |event| {
            let events = events.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        events.connected.store(true, Ordering::SeqCst);
                        if events.client.get().is_some() {
                            events.reconnects.0.send_modify(|n| *n += 1);
                        }
                        // The first connection is told by `start`, once the client is known.
                        if let Some(client) = events.client.get() {
                            tracing::info!(target: "portcullis::cluster", server = %client.server_info().server_name, "connected to NATS");
                        }
                    }
                    async_nats::Event::Disconnected => {
                        events.connected.store(false, Ordering::SeqCst);
                        tracing::warn!(target: "portcullis::cluster", "disconnected from NATS: MQTT messages do not reach the other nodes, and this node is not ready");
                    }
                    async_nats::Event::SlowConsumer(_) => events.slow_consumer(),
                    async_nats::Event::ServerError(e) => {
                        tracing::warn!(target: "portcullis::cluster", error = %e, "NATS server error");
                    }
                    _ => {}
                }
            }
        })
        .connect(servers)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))?;
    let _ = state.client.set(client.clone());
    if client.connection_state() == async_nats::connection::State::Connected {
        state.connected.store(true, Ordering::SeqCst);
        tracing::info!(target: "portcullis::cluster", server = %client.server_info().server_name, "connected to NATS");
    }
    let work = Arc::new(WorkQueue::default());
    let publishing = work.clone();
    let (control, controls) = mpsc::unbounded_channel();
    let _ = state.control.set(control.downgrade());
    // This process, not just this node: message ids restart with it, and a peer must not take
    // a restarted node's new messages for ones it has seen.
    let instance = format!(
        "{id}#{}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let origin = fnv(instance.as_bytes());
    state.routes.set_own(origin);
    let (late, to_store_late) = mpsc::channel(LATE_QUEUE);
    let node = Node {
        client: client.clone(),
        js: jetstream::new(client),
        broker: broker.clone(),
        instance,
        id: id.to_string(),
        replicas: options.replicas,
        kept_bytes: options.kept_bytes,
        qos1_live: options.qos1_live,
        claims: Arc::new(Mutex::new(HashMap::new())),
        durables: Arc::new(Mutex::new(HashMap::new())),
        order: Arc::new(Mutex::new((0, HashMap::new()))),
        seen: Arc::new(Mutex::new((VecDeque::new(), HashSet::new()))),
        origin,
        state: state.clone(),
        storing: Arc::default(),
        groups: Arc::default(),
        late,
        interest_lag: std::env::var(INTEREST_LAG_VAR)
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis),
        held_routes: Arc::default(),
        route_deletes: Arc::default(),
        control: control.downgrade(),
    };
    broker.set_bridge(Arc::new(NatsBridge {
        work,
        control,
        state: state.clone(),
    }));
    tokio::spawn(async move {
        let (clients, sessions, qos2, groups, routes) = node.set_up().await;
        tokio::spawn(node.clone().watch_routes(routes));
        tokio::spawn(node.clone().keep_routes());
        tokio::spawn(node.clone().receive_routed());
        tokio::spawn(node.clone().answer_route_waits());
        let _ = node.groups.set(groups.clone());
        tokio::spawn(node.clone().watch_interest(sessions.clone(), groups));
        // Only a node that sends QoS 1 live decides by what it knows of the cluster's
        // persistent subscriptions; the others keep every QoS 1 message.
        if node.qos1_live {
            tokio::spawn(node.clone().probe(sessions.clone()));
        }
        tokio::spawn(node.clone().store_late(to_store_late));
        state.streams.store(true, Ordering::SeqCst);
        tracing::info!(target: "portcullis::cluster", "JetStream streams ready");
        tokio::spawn(node.clone().watch_owners(clients.clone()));
        tokio::spawn(node.clone().answer_pings());
        tokio::spawn(node.clone().sweep(clients.clone(), sessions.clone()));
        tokio::spawn(node.clone().watch_kept());
        tokio::spawn(node.clone().publish(publishing, qos2.clone()));
        node.control(controls, clients, sessions, qos2).await;
    });
    Ok(())
}

/// How often a node reads how much the message stream keeps (see [`Node::watch_kept`]).
const KEPT_EVERY: Duration = Duration::from_secs(15);

/// The message stream is said to be full from this share of `nats_kept_mib` (percent), and
/// no longer below the second.
const KEPT_FULL_PERCENT: u64 = 95;
const KEPT_CLEAR_PERCENT: u64 = 85;

/// How often a node offers to sweep the sessions bucket (one node at a time does: a lease).
const SWEEP_EVERY: Duration = Duration::from_secs(300);

/// A session record is forgotten this long after its session expired (a node resuming it at
/// the moment of its expiry has long finished).
const SWEEP_MARGIN_MS: u64 = 60_000;

/// The sweeper's lease in the sessions bucket (client ids' keys never hold a `.`).
const SWEEP_LEASE: &str = "sweep.lease";

/// What the sweeper does with a session record.
#[derive(Debug, PartialEq, Eq)]
enum Sweep {
    /// Current (online, or offline within its expiry).
    Keep,
    /// Expired (beyond the margin): its consumers and the record go.
    End,
    /// Online on the node instance named: still there? (a node that died with it online never
    /// said it went offline).
    AskOwner,
}

fn sweep_verdict(record: &serde_json::Value, now_ms: u64) -> Sweep {
    match record["offline_since_ms"].as_u64() {
        Some(since) => {
            let expiry_ms = record["expiry_secs"]
                .as_u64()
                .unwrap_or(0)
                .saturating_mul(1000);
            if now_ms.saturating_sub(since) >= expiry_ms.saturating_add(SWEEP_MARGIN_MS) {
                Sweep::End
            } else {
                Sweep::Keep
            }
        }
        None => Sweep::AskOwner,
    }
}

/// The subject a node instance answers pings on (is it alive?).
fn ping_subject(instance: &str) -> String {
    format!("pcn.{}", client_key(instance))
}

/// How long a publication or a claim keeps trying while JetStream elects new leaders (after a
/// NATS server's death): below the time a client waits for its acknowledgement.
const RIDE_THROUGH: Duration = Duration::from_secs(4);

/// The same for what a client waits longer for (PUBACK, SUBACK): a JetStream election after a
/// NATS server's death takes seconds (up to about ten measured here under load).
const STORE_RIDE_THROUGH: Duration = Duration::from_secs(12);

/// Waits for JetStream's acknowledgement of a publication (`ack`, if it was sent), sending it
/// again (same message id: stored once) until it is acknowledged or [`STORE_RIDE_THROUGH`]
/// passed.
async fn stored_within(
    js: &jetstream::Context,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
    ack: Option<jetstream::context::PublishAckFuture>,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + STORE_RIDE_THROUGH;
    let mut delay = Duration::from_millis(50);
    let mut ack = ack;
    loop {
        let error = match ack.take() {
            Some(pending) => match pending.await {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            },
            None => "not sent".to_string(),
        };
        if tokio::time::Instant::now() + delay > deadline {
            return Err(error);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(800));
        ack = js
            .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
            .await
            .ok();
    }
}

/// Waits for JetStream's acknowledgements of publications sent (each retried as
/// [`stored_within`] does).
async fn all_stored(
    js: &jetstream::Context,
    acks: Vec<(
        String,
        async_nats::HeaderMap,
        bytes::Bytes,
        Option<jetstream::context::PublishAckFuture>,
    )>,
) -> Result<(), String> {
    let mut result = Ok(());
    for (subject, headers, payload, ack) in acks {
        if let Err(e) = stored_within(js, subject, headers, payload, ack).await {
            result = Err(format!("JetStream did not store it: {e}"));
        }
    }
    result
}

/// Stores a QoS 2 message a client sent again (DUP): under the message id the ledger kept at
/// `key` when it was first sent (JetStream then stores it once), or under `id`, recorded first.
async fn store_again(
    js: &jetstream::Context,
    qos2: &kv::Store,
    key: &str,
    id: &str,
    mut stored: Vec<(String, async_nats::HeaderMap, bytes::Bytes)>,
) -> Result<(), String> {
    let kept = match qos2.get(key).await {
        Ok(Some(v)) => String::from_utf8(v.to_vec()).ok().filter(|v| !v.is_empty()),
        Ok(None) => None,
        Err(e) => return Err(format!("cannot read the QoS 2 ledger: {e}")),
    };
    match kept {
        Some(first) => {
            for (_, headers, _) in &mut stored {
                let retained = headers
                    .get("Nats-Msg-Id")
                    .is_some_and(|v| v.as_str().ends_with("/r"));
                let again = if retained {
                    format!("{first}/r")
                } else {
                    first.clone()
                };
                headers.insert("Nats-Msg-Id", again.as_str());
            }
        }
        None => {
            qos2.put(key, bytes::Bytes::from(id.to_string()))
                .await
                .map_err(|e| format!("cannot record in the QoS 2 ledger: {e}"))?;
        }
    }
    let mut acks = Vec::new();
    for (subject, headers, payload) in stored {
        let sent = js
            .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
            .await;
        acks.push((subject, headers, payload, sent.ok()));
    }
    all_stored(js, acks).await
}

/// Deletes claim `revision` of `client_id` a moment later, and only if nobody claimed it since
/// (read from the leader): nats-server 2.9 lets a delete and a claim in flight at the same
/// moment both succeed, and the delete applied last would erase the newer owner's claim.
fn release_later(clients: kv::Store, client_id: String, revision: u64) {
    tokio::spawn(async move {
        tokio::time::sleep(RESUME_GRACE).await;
        let still = leader_entry(&clients, &client_id)
            .await
            .is_ok_and(|m| m.is_some_and(|m| m.sequence == revision));
        if still {
            let _ = clients
                .delete_expect_revision(client_key(&client_id), Some(revision))
                .await;
        }
    });
}

/// The last write of `client_id`'s key in bucket `store` (a put, or a delete or purge marker),
/// read from the bucket stream's leader (a replica may lag); `None` when there is none, an
/// error when JetStream does not answer.
async fn leader_entry(
    store: &kv::Store,
    client_id: &str,
) -> Result<Option<async_nats::jetstream::message::StreamMessage>, ()> {
    let subject = format!("{}{}", store.prefix, client_key(client_id));
    match store.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(_) => Err(()),
    }
}

/// The packet id a kept QoS 2 message is sent with: from its stream sequence (1–65535).
fn qos2_packet_id(seq: u64) -> u16 {
    u16::try_from(seq % 65_535 + 1).unwrap_or(1)
}

/// A kept QoS 2 message's packet id follows from its place in the stream (`seq`): a node sending
/// it again after the one that sent it died (JetStream delivered it `delivered` times) uses the
/// same, with DUP (MQTT 5 §4.3.3: the client acknowledges it again without delivering it twice).
fn number_qos2(message: &mut Message, seq: u64, delivered: i64) {
    if message.qos != QoS::ExactlyOnce {
        return;
    }
    let id = qos2_packet_id(seq);
    if delivered > 1 {
        message.sent_as = Some(id);
    } else {
        message.preferred_id = Some(id);
    }
}

/// The receipts of the `n` messages of one kept NATS message (a batch, or a message alone): it
/// is acknowledged to JetStream once every one was acknowledged, or given back (after
/// `nak_delay`) once all are settled and any was returned; `settled` runs then. With `room`
/// (a semaphore, and the permits taken), the first settlement of each of the first receipts
/// gives one permit back. A receipt's later settlements do nothing. JetStream settles whole messages: a batch given back comes
/// again whole, its messages acknowledged already included (at least once, as QoS 1 allows).
fn settle_all(
    acker: jetstream::message::Acker,
    n: usize,
    nak_delay: Option<Duration>,
    room: Option<(Arc<tokio::sync::Semaphore>, usize)>,
    settled: impl Fn(bool) + Send + Sync + 'static,
) -> Vec<Receipt> {
    use std::sync::atomic::AtomicUsize;
    let batch = Arc::new((acker, AtomicUsize::new(n), AtomicBool::new(false), settled));
    (0..n)
        .map(|i| {
            let batch = batch.clone();
            let done = AtomicBool::new(false);
            // The first `taken` receipts each give back one message's room.
            let room = room
                .as_ref()
                .filter(|(_, taken)| i < *taken)
                .map(|(room, _)| room.clone());
            Receipt::new(move |acknowledged| {
                if done.swap(true, Ordering::SeqCst) {
                    return;
                }
                if let Some(room) = &room {
                    room.add_permits(1);
                }
                let (_, left, returned, settled) = &*batch;
                if !acknowledged {
                    returned.store(true, Ordering::SeqCst);
                }
                if left.fetch_sub(1, Ordering::SeqCst) != 1 {
                    return;
                }
                let give_back = returned.load(Ordering::SeqCst);
                settled(!give_back);
                let batch = batch.clone();
                tokio::spawn(async move {
                    let _ = if give_back {
                        batch.0.ack_with(jetstream::AckKind::Nak(nak_delay)).await
                    } else {
                        batch.0.ack().await
                    };
                });
            })
        })
        .collect()
}

/// The MQTT messages of a kept (JetStream) message — a QoS 1 batch's, or the one of a message
/// stored alone — each with its publisher's client id; expired ones left out.
fn kept_messages(
    msg: &async_nats::Message,
    published: SystemTime,
) -> Vec<(Message, Option<bytes::Bytes>)> {
    let Some(topic) = topic(msg.subject.as_str()) else {
        return Vec::new();
    };
    let headers = msg.headers.as_ref();
    if headers.is_some_and(|h| h.get(BATCH_HEADER).is_some()) {
        return batch_frames(&msg.payload)
            .filter_map(|mut frame| {
                let client = frame.client.take();
                Some((frame.message(topic.clone(), Some(published))?, client))
            })
            .collect();
    }
    let client = headers
        .and_then(|h| h.get("Portcullis-Client"))
        .map(|c| bytes::Bytes::copy_from_slice(c.as_str().as_bytes()));
    message_of(topic, headers, msg.payload.clone(), Some(published))
        .map(|m| (m, client))
        .into_iter()
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// A persistent session online on this node.
struct Durable {
    identity: String,
    expiry: Duration,
    generation: u64,
    /// Which life of the client id's session this is (its consumers are named after it).
    incarnation: u64,
    subscriptions: std::collections::BTreeMap<String, SubscriptionOptions>,
    /// The tasks pulling each subscription's kept messages.
    pullers: HashMap<String, Vec<tokio::task::JoinHandle<()>>>,
    /// Its kept messages on their way to it.
    inflight: Arc<Inflight>,
}

/// A persistent session's kept messages on their way to it.
struct Inflight {
    /// Which stream sequences are with the client or were acknowledged lately.
    seqs: Mutex<Seqs>,
    /// Messages it may still be handed: its queue's size, given back as they are settled. A
    /// batch waits for room rather than overflow the queue (and come back whole).
    room: Arc<tokio::sync::Semaphore>,
    /// The room when none is taken.
    capacity: usize,
}

/// How many acknowledged stream sequences a persistent session's consumer remembers: more
/// than [`MAX_ACK_PENDING`], what JetStream may have out at once.
const ACKED_REMEMBERED: usize = 4 * MAX_ACK_PENDING as usize;

/// The stream sequences of a persistent session's kept messages that JetStream may deliver
/// again (when the acknowledgement wait passed first: a slow client, or a batch that waited
/// long for room), by consumer: none is sent to the client twice, nor out of order. Each
/// consumer delivers its own copy of a message (overlapping subscriptions, each with its own
/// QoS and No Local), and its redeliveries come back through it. (Regression, found by
/// review: kept by sequence alone, a copy one subscription filtered out, No Local's, made the
/// other subscription's copy be skipped as acknowledged, and lost.)
#[derive(Default)]
struct Seqs {
    of: HashMap<u64, ConsumerSeqs>,
}

impl Seqs {
    /// Those of the consumer whose name hashes to `consumer`.
    fn of(&mut self, consumer: u64) -> &mut ConsumerSeqs {
        self.of.entry(consumer).or_default()
    }
}

/// One consumer's [`Seqs`].
#[derive(Default)]
struct ConsumerSeqs {
    /// Delivered and not yet settled.
    with_client: HashSet<u64>,
    /// Acknowledged lately (the last [`ACKED_REMEMBERED`], oldest first).
    acked: HashSet<u64>,
    acked_order: VecDeque<u64>,
}

impl ConsumerSeqs {
    /// Settled: no longer with the client; remembered if acknowledged.
    fn settled(&mut self, seq: u64, acknowledged: bool) {
        self.with_client.remove(&seq);
        if acknowledged && self.acked.insert(seq) {
            self.acked_order.push_back(seq);
            if self.acked_order.len() > ACKED_REMEMBERED
                && let Some(old) = self.acked_order.pop_front()
            {
                self.acked.remove(&old);
            }
        }
    }
}

impl Inflight {
    fn new(capacity: usize) -> Inflight {
        let capacity = capacity.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        Inflight {
            seqs: Mutex::new(Seqs::default()),
            room: Arc::new(tokio::sync::Semaphore::new(capacity)),
            capacity,
        }
    }
}

impl Durable {
    fn stop(&mut self) {
        for task in self.pullers.drain().flat_map(|(_, t)| t) {
            task.abort();
        }
    }

    /// The session's record in the sessions bucket, held by node instance `owner`.
    fn record(&self, owner: &str, offline_since_ms: Option<u64>) -> String {
        serde_json::json!({
            "identity": self.identity,
            "expiry_secs": self.expiry.as_secs(),
            "offline_since_ms": offline_since_ms,
            "owner": owner,
            "incarnation": self.incarnation,
            "subscriptions": self.subscriptions.iter().map(|(f, o)| serde_json::json!({
                "filter": f,
                "qos": o.qos as u8,
                "no_local": o.no_local,
                "retain_as_published": o.retain_as_published,
            })).collect::<Vec<_>>(),
        })
        .to_string()
    }
}

/// The durable consumer keeping `subject` for `client_id`'s session `incarnation` (a stable
/// name: every node binds the same one; ending one life of the session never touches the
/// next one's. Incarnation 0: a session recorded by an earlier version).
fn consumer_name(client_id: &str, incarnation: u64, subject: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let life = (incarnation != 0).then(|| incarnation.to_be_bytes());
    for b in client_id
        .bytes()
        .chain(life.into_iter().flatten())
        .chain([0])
        .chain(subject.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("ps_{h:016x}")
}

/// A new session's incarnation (random, never 0).
fn new_incarnation() -> u64 {
    let mut bytes = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    u64::from_be_bytes(bytes).max(1)
}

/// The incarnation a session record names (0: recorded by an earlier version).
fn incarnation_of(record: &serde_json::Value) -> u64 {
    record["incarnation"].as_u64().unwrap_or(0)
}

/// The node instance holding a session record, if it names one (an earlier version's does not).
fn owner_of(record: &serde_json::Value) -> Option<&str> {
    record["owner"].as_str()
}

/// The changes made to sessions, and per client id the last on its way (numbered).
type SessionChanges = (u64, HashMap<String, (u64, tokio::task::JoinHandle<()>)>);

/// This node's side of the cluster.
#[derive(Clone)]
struct Node {
    client: async_nats::Client,
    js: jetstream::Context,
    broker: Arc<Broker>,
    /// This process (node name and start time): the origin of its messages and claims.
    instance: String,
    id: String,
    replicas: usize,
    /// Bytes of QoS 1 and 2 messages the message stream keeps.
    kept_bytes: i64,
    /// QoS 1 messages nobody keeps cross live (`nats_qos1_live`; off: JetStream keeps every
    /// one, and this node still stores late what its persistent sessions need of other nodes'
    /// live ones).
    qos1_live: bool,
    /// Client ids this node owns, with the revision of its claim.
    claims: Arc<Mutex<HashMap<String, u64>>>,
    /// Persistent sessions online here.
    durables: Arc<Mutex<HashMap<String, Durable>>>,
    /// Per client id, the last change of its session on its way to NATS (see
    /// [`Node::in_order`]), and the number of changes made.
    order: Arc<Mutex<SessionChanges>>,
    /// Message ids delivered lately (overlapping subscriptions deliver a message twice).
    seen: Arc<Mutex<(VecDeque<u128>, HashSet<u128>)>>,
    /// This process's id in live frames (a hash of `instance`).
    origin: u64,
    /// The connection's state, and whether every node reads QoS 1 batches.
    state: Arc<NatsState>,
    /// Stored batches on their way to JetStream, and a wake-up when one comes back.
    storing: Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)>,
    /// The shared groups bucket (see [`SHARED_GROUPS`]), once set up.
    groups: Arc<std::sync::OnceLock<kv::Store>>,
    /// QoS 1 batches to store for this node's persistent sessions and shared groups (see
    /// [`Node::keep_late`]).
    late: mpsc::Sender<(String, async_nats::HeaderMap, bytes::Bytes)>,
    /// Tests only: see [`INTEREST_LAG_VAR`].
    interest_lag: Option<Duration>,
    /// This node's entries in the route table (key, filter): written again after a lost
    /// connection to NATS, or when one went missing.
    held_routes: Arc<Mutex<HashMap<String, String>>>,
    /// Deletions written into the route table (when, key, stream sequence): their markers are
    /// purged once every node has read them.
    route_deletes: Arc<Mutex<Vec<(tokio::time::Instant, String, u64)>>>,
    /// The control task's queue (route table repairs go through it); weak, so that the control
    /// task still ends with the broker's bridge.
    control: mpsc::WeakUnboundedSender<Control>,
}

impl Node {
    /// Makes (or finds) the streams and the buckets, retrying until NATS answers.
    async fn set_up(&self) -> (kv::Store, kv::Store, kv::Store, kv::Store, kv::Store) {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.try_set_up().await {
                Ok(store) => return store,
                Err(e) => {
                    tracing::warn!(target: "portcullis::cluster", error = %format!("{e:#}"), "cannot set up JetStream (is nats-server running with -js, are there as many servers as nats_replicas, and does each allow nats_kept_mib in its max_file_store?); retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn try_set_up(&self) -> Result<(kv::Store, kv::Store, kv::Store, kv::Store, kv::Store)> {
        // Limits retention: every consumer (a persistent subscription, a shared group) keeps its
        // own place and nothing is removed on acknowledgement. By interest (as earlier versions
        // made it), nats-server 2.9 lost messages one consumer had not taken yet once another
        // acknowledged them under load (docs/cluster.md, "Fixed issues").
        let messages = self
            .js
            .get_or_create_stream(stream::Config {
                name: STREAM.into(),
                subjects: vec![format!("{STORED}.>")],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                num_replicas: self.replicas,
                duplicate_window: Duration::from_secs(120),
                max_age: Duration::from_secs(24 * 3600),
                max_bytes: self.kept_bytes,
                discard: stream::DiscardPolicy::Old,
                ..Default::default()
            })
            .await
            .context("the MQTT message stream")?;
        let info = messages.cached_info();
        if info.config.max_bytes != self.kept_bytes {
            tracing::warn!(target: "portcullis::cluster", kept_bytes = info.config.max_bytes, "the stream PORTCULLIS_MQTT keeps another size than nats_kept_mib says (made with another setting; JetStream keeps the stream's own): `nats stream edit PORTCULLIS_MQTT --max-bytes` changes it");
        }
        if info.config.retention == stream::RetentionPolicy::Interest {
            tracing::warn!(target: "portcullis::cluster", "the stream PORTCULLIS_MQTT keeps messages by interest (made by an earlier version): with nats-server 2.9 a persistent session can lose kept QoS 1 messages that a shared group acknowledged; with every node stopped, `nats stream rm PORTCULLIS_MQTT` lets the next node make it anew (what it keeps now is lost; docs/cluster.md)");
        }
        self.js
            .get_or_create_stream(stream::Config {
                name: RETAINED_STREAM.into(),
                subjects: vec![format!("{RETAINED}.>")],
                max_messages_per_subject: 1,
                storage: stream::StorageType::File,
                num_replicas: self.replicas,
                ..Default::default()
            })
            .await
            .context("the retained message stream")?;
        Ok((
            self.bucket(CLIENTS, Duration::ZERO).await?,
            self.bucket(SESSIONS, Duration::ZERO).await?,
            self.bucket(QOS2, QOS2_KEEP).await?,
            self.bucket(SHARED_GROUPS, SHARED_KEEP).await?,
            self.bucket(ROUTES, Duration::ZERO).await?,
        ))
    }

    /// A key-value bucket, made if missing.
    /// `max_age`: how long an entry is kept (zero: until deleted).
    async fn bucket(&self, name: &str, max_age: Duration) -> Result<kv::Store> {
        // The bucket's stream as the key-value API makes it (async-nats's own bucket creation
        // reads account information nats-server 2.9 answers in an older shape).
        self.js
            .get_or_create_stream(stream::Config {
                name: format!("KV_{name}"),
                subjects: vec![format!("$KV.{name}.>")],
                max_messages_per_subject: 1,
                storage: stream::StorageType::File,
                num_replicas: self.replicas,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: stream::DiscardPolicy::New,
                max_message_size: -1,
                max_bytes: -1,
                max_messages: -1,
                max_age,
                ..Default::default()
            })
            .await
            .with_context(|| format!("the bucket {name}"))?;
        self.js
            .get_key_value(name)
            .await
            .with_context(|| format!("the bucket {name}"))
    }

    /// Sends what this node's clients publish, in order; a stored message's publisher is
    /// answered once JetStream acknowledged it, a live QoS 1 message's once it is written to
    /// NATS.
    async fn publish(self, publishing: Arc<WorkQueue>, qos2: kv::Store) {
        let mut seq: u64 = 0;
        let mut batch = Vec::with_capacity(BATCH);
        let mut live = Batches::live();
        let mut kept = Batches::stored();
        let mut acknowledged = Batches::acknowledged();
        // Live QoS 1 messages' publishers, answered once what was sent is on its way to NATS
        // (with whether it was sent).
        let mut answered: Vec<(Reply, bool)> = Vec::new();
        // Whether a topic's QoS 1 messages are kept, as decided under `decided_at`.
        let mut decided: HashMap<String, bool> = HashMap::new();
        let mut decided_at = u64::MAX;
        // QoS 0 messages for other nodes, by the route table; a topic's route as looked up
        // under `routed_at`.
        let mut for_nodes = routes::NodeBatches::default();
        let mut routed: HashMap<String, routes::Route> = HashMap::new();
        let mut routed_at = u64::MAX;
        // When the last flush went (see [`LINGER`]).
        let mut flushed_at: Option<tokio::time::Instant> = None;
        // Many at a time: under a flood this task must keep pace with the sessions feeding it,
        // not take one message per turn of the scheduler.
        loop {
            if let Some(at) = flushed_at.take() {
                // Under load: what comes meanwhile goes in the next flush.
                tokio::time::sleep_until(at + LINGER).await;
            }
            let closed = if kept.is_empty() {
                publishing.recv_many(&mut batch, BATCH).await == 0
            } else {
                // QoS 1 batches wait while [`MAX_STORING`] stored batches are on their way (a
                // group commit: they grow meanwhile), until one comes back.
                tokio::select! {
                    n = publishing.recv_many(&mut batch, BATCH) => n == 0,
                    () = self.storing.1.notified() => false,
                }
            };
            if closed {
                for full in kept.drain() {
                    self.store_batch(full).await;
                }
                return;
            }
            if !batch.is_empty() && batch.len() < BATCH {
                // Woken by the first message of a session's burst: let the sessions that are
                // ready run first, so that one wake-up takes their bursts whole.
                tokio::task::yield_now().await;
                while batch.len() < BATCH
                    && let Some(work) = publishing.try_recv()
                {
                    batch.push(work);
                }
            }
            if publishing.len() <= QUEUE / 2 {
                self.state.drained.notify_waiters();
            }
            if (LINGER_FROM..BATCH).contains(&batch.len()) {
                flushed_at = Some(tokio::time::Instant::now());
            }
            // Every node reads QoS 1 batches (read once per turn).
            let batched = self.state.batches.load(Ordering::Relaxed);
            // ... and every node keeps what its persistent sessions need of those crossing live.
            let live_acknowledged = self.qos1_live
                && batched
                && self.state.live_acknowledged.load(Ordering::Relaxed)
                && now_ms().saturating_sub(self.state.probe_seen_ms.load(Ordering::Relaxed))
                    <= PROBE_STALE_MS;
            let generation = self.state.kept.generation();
            if generation != decided_at || decided.len() > 4096 {
                decided.clear();
                decided_at = generation;
            }
            let node_routes = self.state.node_routes.load(Ordering::Relaxed);
            let generation = self.state.routes.generation();
            if generation != routed_at || routed.len() > ROUTED_TOPICS {
                routed.clear();
                routed_at = generation;
            }
            for Work::Publish(m, publisher, reply, exactly_once, keep) in batch.drain(..) {
                seq += 1;
                if m.qos == QoS::AtMostOnce && !m.retain {
                    // The common case, kept cheap: no headers, no id string; to the nodes that
                    // want it, many topics at a time, or else on the topic's subject (a
                    // topic's messages together).
                    if node_routes {
                        if !routed.contains_key(m.topic.as_str()) {
                            let route = self.state.routes.route(&m.topic, self.origin);
                            routed.insert(m.topic.clone(), route);
                        }
                        if let Some(routes::Route::Nodes(to)) = routed.get(m.topic.as_str()) {
                            if let Some(full) = for_nodes.add(to, &m, self.origin, seq) {
                                self.send_nodes(full).await;
                            }
                            continue;
                        }
                    }
                    if let Some(full) = live.add(&m, None, None, self.origin, seq) {
                        self.send_live(full).await;
                    }
                    continue;
                }
                if batched && m.qos == QoS::AtLeastOnce && !m.retain {
                    // Nobody keeps it: live, unless this topic's kept batch is still waiting
                    // (it goes first).
                    let live_now = live_acknowledged
                        && !keep
                        && !kept.holds(&m.topic)
                        && !*decided
                            .entry(m.topic.clone())
                            .or_insert_with(|| self.state.kept.must_keep(&m.topic));
                    if live_now {
                        qos1_counter("live").increment(1);
                        if let Some(full) =
                            acknowledged.add(&m, publisher.as_deref(), reply, self.origin, seq)
                        {
                            self.send_acknowledged(full, &mut answered).await;
                        }
                        continue;
                    }
                    qos1_counter("kept").increment(1);
                    if acknowledged.holds(&m.topic) {
                        // Its live ones before it.
                        for full in acknowledged.drain() {
                            self.send_acknowledged(full, &mut answered).await;
                        }
                    }
                    // Stored a topic's batch at a time, its publishers answered together.
                    if let Some(full) = kept.add(&m, publisher.as_deref(), reply, self.origin, seq)
                    {
                        self.store_batch(full).await;
                    }
                    continue;
                }
                // Anything else keeps its place after the batched messages before it.
                for full in live.drain() {
                    self.send_live(full).await;
                }
                for full in for_nodes.drain() {
                    self.send_nodes(full).await;
                }
                for full in acknowledged.drain() {
                    self.send_acknowledged(full, &mut answered).await;
                }
                for full in kept.drain() {
                    self.store_batch(full).await;
                }
                let id = format!("{}/{seq}", self.instance);
                let mut headers = headers_of(&m, &self.instance, &id);
                // Kept messages carry their publisher: a persistent session's No Local
                // subscriptions skip its own when they come back from the stream.
                if m.qos != QoS::AtMostOnce
                    && let Some(client) = &publisher
                {
                    headers.insert("Portcullis-Client", client.as_str());
                }
                // What goes through JetStream: (subject, headers, payload), each acknowledged by
                // the stream.
                let mut stored = Vec::new();
                // A persistent session's QoS 2 message: the ledger records the message id it is
                // stored under, before the message (in order on this connection), so that the
                // client sending it again to another node (DUP, this node dead before PUBREC)
                // has it stored under the same id: once (the stream's duplicate window).
                let ledger = exactly_once
                    .zip(publisher.as_deref())
                    .map(|((packet_id, dup), client)| (qos2_key(client, packet_id), dup));
                if let Some((key, false)) = &ledger {
                    stored.push((
                        format!("$KV.{QOS2}.{key}"),
                        async_nats::HeaderMap::new(),
                        bytes::Bytes::from(id.clone()),
                    ));
                }
                if m.retain {
                    let mut kept = headers.clone();
                    kept.insert("Portcullis-Retain", "1");
                    kept.insert("Nats-Msg-Id", format!("{id}/r").as_str());
                    stored.push((subject(RETAINED, &m.topic), kept, m.payload.clone()));
                }
                if m.qos == QoS::AtMostOnce {
                    // Retained at QoS 0: kept above, and live to the subscribers of the moment,
                    // a batch of one on the topic's subject (every node that reads batches reads
                    // it, with its retain flag; a node before batches misses it).
                    if let Some(full) = live.add(&m, None, None, self.origin, seq) {
                        self.send_live(full).await;
                    }
                    for full in live.drain() {
                        self.send_live(full).await;
                    }
                } else {
                    headers.insert("Nats-Msg-Id", id.as_str());
                    stored.push((subject(STORED, &m.topic), headers, m.payload.clone()));
                }
                if let Some((key, true)) = ledger {
                    // Sent again by a client whose node may have died after storing it: under
                    // the id the ledger kept, if it kept one (out of order with what follows:
                    // a message sent again is).
                    let (js, qos2) = (self.js.clone(), qos2.clone());
                    tokio::spawn(async move {
                        let result = store_again(&js, &qos2, &key, &id, stored).await;
                        if let Some(reply) = reply {
                            let _ = reply.send(result);
                        }
                    });
                    continue;
                }
                let mut acks = Vec::new();
                for (subject, headers, payload) in stored {
                    let sent = self
                        .js
                        .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                        .await;
                    acks.push((subject, headers, payload, sent.ok()));
                }
                let Some(reply) = reply else {
                    continue;
                };
                let js = self.js.clone();
                tokio::spawn(async move {
                    let _ = reply.send(all_stored(&js, acks).await);
                });
            }
            for full in live.drain() {
                self.send_live(full).await;
            }
            for full in for_nodes.drain() {
                self.send_nodes(full).await;
            }
            for full in acknowledged.drain() {
                self.send_acknowledged(full, &mut answered).await;
            }
            if !answered.is_empty() {
                self.answer_when_flushed(std::mem::take(&mut answered));
            }
            if self.storing.0.load(Ordering::SeqCst) < MAX_STORING {
                for full in kept.drain() {
                    self.store_batch(full).await;
                }
            }
        }
    }

    async fn send_live(&self, batch: Sealed) {
        if let Err(e) = self.client.publish(batch.subject, batch.payload).await {
            tracing::warn!(target: "portcullis::cluster", error = %e, "cannot route a message to the other nodes");
        }
    }

    /// Sends a batch of QoS 1 messages nobody keeps; its publishers go to `answered`.
    async fn send_acknowledged(&self, batch: Sealed, answered: &mut Vec<(Reply, bool)>) {
        let sent = self.client.publish(batch.subject, batch.payload).await;
        if let Err(e) = &sent {
            tracing::warn!(target: "portcullis::cluster", error = %e, "cannot route a message to the other nodes");
        }
        answered.extend(batch.replies.into_iter().map(|r| (r, sent.is_ok())));
    }

    /// Answers live QoS 1 messages' publishers once what was sent before is written to NATS
    /// (a node dying after the PUBACK has handed the message on).
    fn answer_when_flushed(&self, answered: Vec<(Reply, bool)>) {
        let client = self.client.clone();
        tokio::spawn(async move {
            let flushed = match tokio::time::timeout(FLUSH_WAIT, client.flush()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("NATS: {e}")),
                Err(_) => Err("NATS did not take the message in time".to_string()),
            };
            for (reply, sent) in answered {
                let result = if sent {
                    flushed.clone()
                } else {
                    Err("cannot route the message to the other nodes".to_string())
                };
                let _ = reply.send(result);
            }
        });
    }

    /// Stores a QoS 1 batch (deduplicated by its first message's id, as a message alone is);
    /// its publishers are answered once the stream acknowledged it.
    async fn store_batch(&self, batch: Sealed) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(BATCH_HEADER, "1");
        headers.insert("Portcullis-Properties", expired_properties());
        headers.insert(
            "Nats-Msg-Id",
            format!("{}/{}", self.instance, batch.first).as_str(),
        );
        let sent = self
            .js
            .publish_with_headers(
                batch.subject.clone(),
                headers.clone(),
                batch.payload.clone(),
            )
            .await;
        let (js, replies, storing) = (self.js.clone(), batch.replies, self.storing.clone());
        let acks = vec![(batch.subject, headers, batch.payload, sent.ok())];
        storing.0.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let result = all_stored(&js, acks).await;
            for reply in replies {
                let _ = reply.send(result.clone());
            }
            storing.0.fetch_sub(1, Ordering::SeqCst);
            storing.1.notify_one();
        });
    }

    /// Subscriptions, retained message lookups and client id claims, as the broker asks.
    async fn control(
        self,
        mut controls: mpsc::UnboundedReceiver<Control>,
        clients: kv::Store,
        sessions: kv::Store,
        qos2: kv::Store,
    ) {
        let mut held: HashMap<String, Vec<tokio::task::JoinHandle<()>>> = HashMap::new();
        // Each filter's subscriptions to the subjects older nodes send on, while one is known.
        let mut older: HashMap<String, Vec<tokio::task::JoinHandle<()>>> = HashMap::new();
        while let Some(control) = controls.recv().await {
            match control {
                Control::Older if self.state.older_gone.load(Ordering::SeqCst) => {
                    for task in older.drain().flat_map(|(_, tasks)| tasks) {
                        task.abort();
                    }
                }
                Control::Older => {
                    for filter in held.keys() {
                        if !older.contains_key(filter) {
                            older.insert(filter.clone(), self.subscribe(filter, true).await);
                        }
                    }
                }
                // Route table repairs come here, in order with the filters' own writes.
                Control::RoutesWrite => self.write_routes().await,
                Control::RoutesDelete(keys) => {
                    for key in keys {
                        let held = self
                            .held_routes
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .contains_key(&key);
                        if !held {
                            self.delete_route(&key).await;
                        }
                    }
                }
                Control::Interest(filter, false, _) => {
                    let tasks = held.remove(&filter).into_iter().flatten();
                    for task in tasks.chain(older.remove(&filter).into_iter().flatten()) {
                        task.abort();
                    }
                    self.unroute(&filter).await;
                }
                Control::Interest(filter, true, reply) => {
                    let tasks = self.subscribe(&filter, false).await;
                    if !self.state.older_gone.load(Ordering::SeqCst) {
                        older.insert(filter.clone(), self.subscribe(&filter, true).await);
                    }
                    let routed = self.route(&filter).await;
                    held.insert(filter, tasks);
                    let node = self.clone();
                    tokio::spawn(async move {
                        // Until every node's route table has the filter, or a moment has
                        // passed (a table not read yet, JetStream out of reach: the topic's
                        // own subject carries its messages meanwhile).
                        if let Some((key, stored, filter)) = routed
                            && let Ok(Ok(_)) = tokio::time::timeout(ROUTE_WAIT, stored).await
                            && node.state.routes.is_ready()
                        {
                            node.routes_hold(&key, &filter).await;
                        }
                        if let Some(reply) = reply {
                            let _ = reply.send(Ok(()));
                        }
                    });
                }
                Control::Retained {
                    client_id,
                    generation,
                    filter,
                    options,
                } => {
                    let node = self.clone();
                    tokio::spawn(async move {
                        match node.retained_matching(&filter).await {
                            Ok(found) if !found.is_empty() => {
                                node.broker
                                    .deliver_retained(&client_id, generation, found, options);
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(target: "portcullis::cluster", filter = %filter, error = %format!("{e:#}"), "cannot read the retained messages");
                            }
                        }
                    });
                }
                Control::Claim {
                    client_id,
                    clean_start,
                    identity,
                    reply,
                } => {
                    let node = self.clone();
                    let (clients, sessions) = (clients.clone(), sessions.clone());
                    let key = client_id.clone();
                    self.in_order(&key, async move {
                        // The connection stopped waiting (a change before this one was slow):
                        // a claim now could take the client id from its newer connection on
                        // another node.
                        if reply.is_closed() {
                            return;
                        }
                        // An earlier connection here holding the client id keeps holding it if
                        // this one gives up.
                        let held = node.held_claim(&client_id).is_some();
                        let revision = match node.claim(&clients, &client_id).await {
                            Ok(revision) => revision,
                            Err(e) => {
                                let _ = reply.send(Err(e));
                                return;
                            }
                        };
                        let taken = !reply.is_closed()
                            && match node
                                .stored_session(&sessions, &client_id, clean_start, &identity)
                                .await
                            {
                                Ok(session) => reply.send(Ok(Claim { revision, session })).is_ok(),
                                Err(e) => {
                                    let _ = reply.send(Err(e));
                                    false
                                }
                            };
                        // No connection takes this claim (it gave up, or is refused): the
                        // earlier connection here holding the client id holds it under this
                        // claim now (its release and end are this claim's), or the claim goes.
                        let kept = taken || (held && node.broker.adopt_claim(&client_id, revision));
                        if !kept {
                            node.give_back(&clients, &client_id, revision);
                        }
                    });
                }
                Control::DurableSession {
                    client_id,
                    generation,
                    identity,
                    expiry,
                    incarnation,
                } => {
                    let mut durables = self.durables.lock().unwrap_or_else(|p| p.into_inner());
                    let d = durables
                        .entry(client_id.clone())
                        .or_insert_with(|| Durable {
                            identity: identity.clone(),
                            expiry,
                            generation,
                            incarnation,
                            subscriptions: Default::default(),
                            pullers: HashMap::new(),
                            inflight: Arc::new(Inflight::new(self.broker.max_queued())),
                        });
                    d.stop();
                    if d.generation != generation {
                        // A new connection (the old one may still be ending here): what the
                        // old one held is settled by its own receipts, or delivered again;
                        // nothing of it may hold this one's deliveries back.
                        d.inflight = Arc::new(Inflight::new(self.broker.max_queued()));
                    }
                    d.identity = identity;
                    d.expiry = expiry;
                    d.generation = generation;
                    // The life its connection resumed (the broker's session keeps it).
                    d.incarnation = incarnation;
                    let record = d.record(&self.instance, None);
                    drop(durables);
                    // Recorded at once, subscriptions or not: a session that only publishes
                    // has state too (QoS 2 messages not yet released) and resumes elsewhere.
                    let node = self.clone();
                    let sessions = sessions.clone();
                    let key = client_id.clone();
                    self.in_order(&key, async move {
                        if let Err(e) = node.put_mine(&sessions, &client_id, record, true).await {
                            tracing::debug!(target: "portcullis::cluster", client_id = %client_id, error = %e, "cannot record a persistent session online (its subscriptions record it)");
                        }
                    });
                }
                Control::DurableSubscribe {
                    client_id,
                    generation,
                    filter,
                    options,
                    reply,
                } => {
                    // Now: the session's list has it (going offline right after records it),
                    // and a filter taken again at QoS 0 is no longer delivered at QoS 1. The
                    // session's life now: its consumers of a filter taken at QoS 0 go even if
                    // the session ends (or goes offline) before that change's turn.
                    let incarnation = self
                        .durables
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_mut(&client_id)
                        .filter(|d| d.generation == generation)
                        .map(|d| {
                            d.subscriptions.insert(filter.clone(), options);
                            if options.qos == QoS::AtMostOnce {
                                for task in d.pullers.remove(&filter).into_iter().flatten() {
                                    task.abort();
                                }
                            }
                            d.incarnation
                        });
                    let node = self.clone();
                    let sessions = sessions.clone();
                    let key = client_id.clone();
                    let change = async move {
                        // Retried while JetStream elects leaders (after a NATS server's death).
                        let deadline = tokio::time::Instant::now() + STORE_RIDE_THROUGH;
                        let mut delay = Duration::from_millis(50);
                        let result = loop {
                            let tried = node
                                .durable_subscribe(
                                    &sessions,
                                    &client_id,
                                    generation,
                                    incarnation,
                                    &filter,
                                    options,
                                )
                                .await
                                .map_err(|e| format!("{e:#}"));
                            if tried.is_ok() || tokio::time::Instant::now() + delay > deadline {
                                break tried;
                            }
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_millis(800));
                        };
                        if let Err(e) = &result {
                            tracing::warn!(target: "portcullis::cluster", client_id = %client_id, filter = %filter, error = %e, "cannot keep a persistent subscription's messages");
                        }
                        let _ = reply.send(result);
                    };
                    self.in_order(&key, change);
                }
                Control::DurableUnsubscribe(client_id, filter) => {
                    // Now, so that what the session records next (going offline) lacks it, and
                    // again in turn, after a subscription of the filter still on its way (which
                    // finds it gone and installs nothing). Its consumers go in turn even if the
                    // session went offline or ended meanwhile (with the life of the moment).
                    let incarnation = self
                        .stop_delivering(&client_id, &filter, true)
                        .map(|(_, incarnation)| incarnation);
                    let node = self.clone();
                    let sessions = sessions.clone();
                    let key = client_id.clone();
                    let change = async move {
                        // The list as it is now: a SUBSCRIBE of the filter since (handled
                        // already, its turn after this one) keeps it.
                        let now = node.stop_delivering(&client_id, &filter, false);
                        if let Some(incarnation) = incarnation.or(now.as_ref().map(|(_, i)| *i)) {
                            node.delete_consumers(&client_id, incarnation, &filter)
                                .await;
                        }
                        if let Some((record, _)) = now {
                            let _ = node.put_mine(&sessions, &client_id, record, false).await;
                        }
                    };
                    self.in_order(&key, change);
                }
                Control::DurableOffline(client_id, expiry, offline_for) => {
                    let since = now_ms()
                        .saturating_sub(u64::try_from(offline_for.as_millis()).unwrap_or(u64::MAX));
                    let record = {
                        let mut durables = self.durables.lock().unwrap_or_else(|p| p.into_inner());
                        durables.remove(&client_id).map(|mut d| {
                            d.stop();
                            d.expiry = expiry;
                            d.record(&self.instance, Some(since))
                        })
                    };
                    if let Some(record) = record {
                        let node = self.clone();
                        let sessions = sessions.clone();
                        let key = client_id.clone();
                        self.in_order(&key, async move {
                            if let Err(e) = node.put_mine(&sessions, &client_id, record, false).await {
                                tracing::warn!(target: "portcullis::cluster", client_id = %client_id, error = %e, "cannot record a persistent session offline (it expires from when its node is found gone)");
                            }
                        });
                    }
                }
                Control::DurableEnd(client_id, claim) => {
                    if let Some(mut d) = self
                        .durables
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&client_id)
                    {
                        d.stop();
                    }
                    let node = self.clone();
                    let sessions = sessions.clone();
                    let key = client_id.clone();
                    self.in_order(&key, async move {
                        // In turn, after the claims made before: a newer connection here that
                        // claimed the client id (and resumed the session, or ended it with a
                        // clean start) before this end came holds the session now.
                        let newer = claim.is_some()
                            && node
                                .held_claim(&client_id)
                                .is_some_and(|r| Some(r) != claim);
                        if !newer {
                            node.end_session(&sessions, &client_id, true).await;
                        }
                    });
                }
                Control::Released(key, reply) => {
                    let qos2 = qos2.clone();
                    tokio::spawn(async move {
                        // Retried while JetStream elects a leader; PUBCOMP waits for it (a
                        // packet id the client may use again must not find an old entry).
                        let deadline = tokio::time::Instant::now() + RIDE_THROUGH;
                        let mut delay = Duration::from_millis(50);
                        let result = loop {
                            match qos2.delete(&key).await {
                                Ok(()) => break Ok(()),
                                Err(e) if tokio::time::Instant::now() + delay > deadline => {
                                    tracing::warn!(target: "portcullis::cluster", key = %key, error = %e, "cannot forget a released QoS 2 message");
                                    break Err(e.to_string());
                                }
                                Err(_) => {}
                            }
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_millis(800));
                        };
                        let _ = reply.send(result);
                    });
                }
                Control::Release(client_id, claim) => {
                    // That connection's claim only: a newer connection here claimed the
                    // client id again, or is claiming it (its claim made in turn after).
                    let revision = self.claims.lock().ok().and_then(|mut c| {
                        if claim.is_none_or(|r| c.get(&client_id) == Some(&r)) {
                            c.remove(&client_id)
                        } else {
                            None
                        }
                    });
                    if let Some(revision) = revision {
                        release_later(clients.clone(), client_id, revision);
                    }
                }
            }
        }
    }

    /// Subscribes on NATS for one filter (an ordinary one: messages of the other nodes; a
    /// shared one: this node's turn of the group's messages, its own included). With `older`,
    /// an ordinary filter's subscriptions to the subjects only older nodes send on instead
    /// (none for a shared one: those are always made).
    async fn subscribe(&self, filter: &str, older: bool) -> Vec<tokio::task::JoinHandle<()>> {
        let shared = portcullis_mqtt::topic::shared(filter).ok().flatten();
        let inner = shared.map_or(filter, |(_, f)| f);
        let wildcarded = shared.is_none() && any_kind(inner);
        if older && (shared.is_some() || wildcarded) {
            // (A wildcarded filter's one subscription takes the older subjects too.)
            return Vec::new();
        }
        let mut tasks = Vec::new();
        // A shared subscription's QoS 1 and 2 messages are the group's, kept by JetStream (a
        // consumer every node with members pulls from): kept while no member is online,
        // given back when a member's connection ends before acknowledging them.
        let prefixes: &[&str] = if shared.is_some() {
            // Every node keeps the group's QoS 1 messages from now on (the group is told until
            // this node no longer holds it).
            if let Some(groups) = self.groups.get() {
                let (groups, key) = (groups.clone(), format!("{:016x}", fnv(filter.as_bytes())));
                let value = bytes::Bytes::from(inner.to_string());
                if let Err(e) = groups.put(&key, value.clone()).await {
                    tracing::warn!(target: "portcullis::cluster", error = %e, filter = %filter, "cannot tell the cluster of a shared group (its node keeps what crosses live)");
                }
                tasks.push(tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(SHARED_KEEP / 4).await;
                        let _ = groups.put(&key, value.clone()).await;
                    }
                }));
            }
            for subject in filter_subjects(STORED, inner) {
                match self.group_consumer(filter, &subject).await {
                    Ok(consumer) => {
                        let node = self.clone();
                        let filter = filter.to_string();
                        tasks.push(tokio::spawn(async move {
                            node.pull_shared(consumer, &filter).await;
                        }));
                    }
                    Err(e) => {
                        tracing::warn!(target: "portcullis::cluster", error = %format!("{e:#}"), filter = %filter, "cannot keep a shared subscription's messages");
                    }
                }
            }
            &[LIVE, LIVE_BATCH, LIVE_HEADERS]
        } else if wildcarded {
            &[ANY_KIND]
        } else if older {
            &[LIVE, LIVE_HEADERS]
        } else {
            &[LIVE_BATCH, STORED]
        };
        // A filter's subscriptions (not shared) are read by one task, in the order NATS sent
        // them across subjects (see [`in_publish_order`]).
        let mut together = Vec::new();
        for prefix in prefixes {
            for pattern in filter_subjects(prefix, inner) {
                let subscribed = match shared {
                    Some(_) => {
                        self.client
                            .queue_subscribe(pattern.clone(), queue_group(filter))
                            .await
                    }
                    None => self.client.subscribe(pattern.clone()).await,
                };
                let mut sub = match subscribed {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(target: "portcullis::cluster", error = %e, subject = %pattern, "cannot subscribe on NATS");
                        continue;
                    }
                };
                // Once the server has the subscription, messages published anywhere arrive.
                if let Err(e) = self.client.flush().await {
                    tracing::warn!(target: "portcullis::cluster", error = %e, "cannot reach NATS");
                }
                tracing::info!(target: "portcullis::cluster", subject = %pattern, filter = %filter, "routing subscribed");
                if shared.is_none() {
                    together.push(sub);
                    continue;
                }
                let node = self.clone();
                let filter = filter.to_string();
                tasks.push(tokio::spawn(async move {
                    while let Some(msg) = sub.next().await {
                        node.arrived(&msg, Some(filter.as_str()));
                    }
                }));
            }
        }
        if !together.is_empty() {
            let node = self.clone();
            tasks.push(tokio::spawn(async move {
                let mut subs = futures_util::stream::select_all(together);
                let mut arrived = Vec::new();
                while let Some(first) = subs.next().await {
                    // Everything the client has handed over by now, from every subject: a
                    // message sent before one taken here is taken too (the client hands them
                    // over in the order they came, and this reads until none is left).
                    arrived.push(first);
                    // (Outside Tokio's task budget: a drain the budget cut short would leave
                    // an earlier message behind for the next one.)
                    while let Some(Some(more)) = futures_util::FutureExt::now_or_never(
                        tokio::task::unconstrained(subs.next()),
                    ) {
                        arrived.push(more);
                    }
                    for i in in_publish_order(&arrived) {
                        node.arrived(&arrived[i], None);
                    }
                    arrived.clear();
                    // As for batches routed to this node: the sessions write first.
                    tokio::task::yield_now().await;
                }
            }));
        }
        tasks
    }

    /// The consumer keeping the shared subscription `filter`'s messages on `subject` (one for
    /// the whole cluster: every node binds the same).
    async fn group_consumer(&self, filter: &str, subject: &str) -> Result<consumer::PullConsumer> {
        let stream = self.js.get_stream(STREAM).await?;
        let name = format!("pg{}", &consumer_name(filter, 0, subject)[2..]);
        let consumer = stream
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: subject.to_string(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    deliver_policy: consumer::DeliverPolicy::New,
                    max_ack_pending: MAX_ACK_PENDING,
                    // Gone (and what it kept) once no node pulled for this long.
                    inactive_threshold: SHARED_KEEP,
                    ..Default::default()
                },
            )
            .await?;
        Ok(consumer)
    }

    /// Hands a shared subscription's kept messages to this node's members while one is online;
    /// a message no member here can take goes back (for another node's, or later).
    async fn pull_shared(&self, consumer: consumer::PullConsumer, filter: &str) {
        loop {
            if !self.broker.shared_online(filter) {
                // Nobody here to hand messages to: the consumer keeps them (no pull).
                tokio::time::sleep(SHARED_IDLE_POLL).await;
                continue;
            }
            let batch = consumer
                .fetch()
                .max_messages(SHARED_BATCH)
                // A batch holds up to 128 messages: a few at a time, so that the group's
                // members on other nodes get their share.
                .max_bytes(SHARED_BATCH_BYTES)
                .expires(Duration::from_secs(1))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(target: "portcullis::cluster", error = %e, "pulling a shared subscription's messages");
                    tokio::time::sleep(SHARED_IDLE_POLL).await;
                    continue;
                }
            };
            while let Some(next) = batch.next().await {
                let Ok(m) = next else {
                    continue;
                };
                let Ok(info) = m.info() else {
                    continue;
                };
                let (seq, published) = (info.stream_sequence, SystemTime::from(info.published));
                let delivered = info.delivered;
                let (msg, acker) = m.split();
                // Expired while kept, or not an MQTT topic: none.
                let messages = kept_messages(&msg, published);
                let receipts = settle_all(
                    acker,
                    messages.len().max(1),
                    Some(SHARED_IDLE_POLL),
                    None,
                    |_| {},
                );
                if messages.is_empty() {
                    receipts[0].acknowledged();
                }
                for ((mut message, _), receipt) in messages.into_iter().zip(receipts) {
                    number_qos2(&mut message, seq, delivered);
                    message.receipt = Some(receipt.clone());
                    if !self.broker.deliver_shared_kept(filter, message) {
                        receipt.returned();
                    }
                }
            }
        }
    }

    /// A message from NATS: to this node's subscribers, or to one member of `shared`.
    fn arrived(&self, msg: &async_nats::Message, shared: Option<&str>) {
        let kind = msg.subject.as_str().split_once('.').map(|(p, _)| p);
        // A subscription of [`any_kind`] also brings what else has the same tokens after the
        // first (a retained message as stored, a subject of NATS's own by chance): not a topic's.
        if !kind.is_some_and(|k| [LIVE_BATCH, STORED, LIVE, LIVE_HEADERS].contains(&k)) {
            return;
        }
        // QoS 0 batches, QoS 1 batches that crossed live, and QoS 1 batches as JetStream stored
        // them.
        let on_live = kind == Some(LIVE_BATCH);
        if on_live
            || msg
                .headers
                .as_ref()
                .is_some_and(|h| h.get(BATCH_HEADER).is_some())
        {
            let Some(topic) = topic(msg.subject.as_str()) else {
                return;
            };
            // QoS 1 messages the publishing node did not keep: a shared group's here means it
            // did not know of the group yet (the group's consumer delivers them once kept).
            let unkept = on_live && msg.payload.first() == Some(&STORED_FRAME);
            if unkept && shared.is_some() {
                self.keep_late(msg, &topic);
                return;
            }
            let mut frames = batch_frames(&msg.payload).peekable();
            // A batch arrives twice only whole (two of this node's subscriptions match its
            // subject): its first message's (origin, sequence) stands for it.
            if shared.is_none()
                && let Some(first) = frames.peek()
                && !self.first_seen(first.origin, first.seq)
            {
                return;
            }
            let mut left = 0;
            if shared.is_none() {
                // One topic's: its subscribers looked up once.
                let messages: Vec<Message> = frames
                    .filter_map(|frame| frame.message(topic.clone(), None))
                    .collect();
                left = self.counted(self.broker.deliver_remote_all(messages));
            } else {
                for frame in frames {
                    if let Some(message) = frame.message(topic.clone(), None) {
                        left += self.hand_over(message, shared);
                    }
                }
            }
            if unkept && left > 0 {
                // A persistent session here needs them kept, and the publishing node did not
                // know of its subscription yet.
                self.keep_late(msg, &topic);
            }
            return;
        }
        let headers = msg.headers.as_ref();
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
        let live = if headers.is_none() {
            read_live_frame(&msg.payload)
        } else {
            None
        };
        if shared.is_none() {
            // (origin, sequence) of the message: its own come back (skipped), and overlapping
            // subscriptions deliver a message twice (delivered once).
            let key = match &live {
                Some(frame) => Some((frame.origin, frame.seq)),
                None => {
                    if header("Portcullis-Origin") == Some(self.instance.as_str()) {
                        return;
                    }
                    header("Portcullis-Origin")
                        .zip(header("Portcullis-Id"))
                        .map(|(origin, id)| (fnv(origin.as_bytes()), fnv(id.as_bytes())))
                }
            };
            if let Some((origin, seq)) = key
                && !self.first_seen(origin, seq)
            {
                return;
            }
        }
        let Some(topic) = topic(msg.subject.as_str()) else {
            return;
        };
        let message = match live {
            Some(frame) => frame.message(topic, None),
            None => message_of(topic, headers, msg.payload.clone(), None),
        };
        if let Some(message) = message {
            self.hand_over(message, shared);
        }
    }

    /// Delivers a message from NATS here; how many of its deliveries were left to the cluster
    /// for a persistent session here.
    fn hand_over(&self, message: Message, shared: Option<&str>) -> usize {
        self.counted(match shared {
            Some(filter) => self.broker.deliver_shared(filter, message),
            None => self.broker.deliver_remote(message),
        })
    }

    /// Counts what was dropped of deliveries from NATS; how many were left to the cluster for
    /// a persistent session here.
    fn counted(&self, routed: portcullis_mqtt::broker::Routed) -> usize {
        if routed.dropped > 0 {
            // As a local publication's: for a subscriber here whose queue was full.
            static DROPPED: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
            DROPPED
                .get_or_init(|| metrics::counter!("portcullis_mqtt_messages_total", "direction" => "out", "result" => "dropped"))
                .increment(routed.dropped as u64);
        }
        routed.kept
    }

    /// Stores a QoS 1 batch that crossed live for a persistent session or shared group of this
    /// node that its publishing node did not know of yet: as the publishing node would have,
    /// under an id every node storing it computes alike (JetStream keeps it once).
    fn keep_late(&self, msg: &async_nats::Message, topic: &str) {
        let Some(id) = msg.payload.get(1..17) else {
            return;
        };
        let origin = u64::from_be_bytes(id[..8].try_into().unwrap_or_default());
        let first = u64::from_be_bytes(id[8..].try_into().unwrap_or_default());
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(BATCH_HEADER, "1");
        headers.insert("Portcullis-Properties", expired_properties());
        headers.insert("Nats-Msg-Id", format!("{origin:016x}/{first}").as_str());
        qos1_counter("kept_late").increment(batch_frames(&msg.payload).count() as u64);
        if self
            .late
            .try_send((subject(STORED, topic), headers, msg.payload.clone()))
            .is_err()
        {
            tracing::warn!(target: "portcullis::cluster", "too many QoS 1 messages to keep for persistent sessions or shared groups of this node at once: some are not kept");
        }
    }

    /// Stores what [`Node::keep_late`] queued, one after the other (in the order they came:
    /// a topic's stay in order), each retried as the publishing node's are.
    async fn store_late(
        self,
        mut late: mpsc::Receiver<(String, async_nats::HeaderMap, bytes::Bytes)>,
    ) {
        // Sent in order; up to LATE_IN_FLIGHT acknowledgements awaited at once.
        let mut waiting = futures_util::stream::FuturesOrdered::new();
        loop {
            tokio::select! {
                item = late.recv(), if waiting.len() < LATE_IN_FLIGHT => {
                    let Some((subject, headers, payload)) = item else {
                        break;
                    };
                    let ack = self
                        .js
                        .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                        .await
                        .ok();
                    let js = self.js.clone();
                    let messages = batch_frames(&payload).count() as u64;
                    waiting.push_back(async move {
                        (messages, stored_within(&js, subject, headers, payload, ack).await)
                    });
                }
                Some((messages, stored)) = waiting.next(), if !waiting.is_empty() => {
                    let result = if stored.is_ok() { "stored" } else { "failed" };
                    metrics::counter!("portcullis_cluster_qos1_late_stored_total", "result" => result)
                        .increment(messages);
                    if let Err(e) = stored {
                        tracing::warn!(target: "portcullis::cluster", error = %e, "cannot keep QoS 1 messages for a persistent session or shared group of this node");
                    }
                }
            }
        }
    }

    /// False for this node's own messages (they come back) and for one seen already
    /// (overlapping subscriptions deliver a message twice): delivered once.
    fn first_seen(&self, origin: u64, seq: u64) -> bool {
        if origin == self.origin {
            return false;
        }
        let key = (u128::from(origin) << 64) | u128::from(seq);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.1.insert(key) {
            return false;
        }
        seen.0.push_back(key);
        if seen.0.len() > SEEN
            && let Some(old) = seen.0.pop_front()
        {
            seen.1.remove(&old);
        }
        true
    }

    /// The cluster's retained messages matching `filter`.
    async fn retained_matching(&self, filter: &str) -> Result<Vec<Message>> {
        let stream = self.js.get_stream(RETAINED_STREAM).await?;
        let mut found = Vec::new();
        let mut keep = |m: async_nats::jetstream::message::StreamMessage| {
            if m.payload.is_empty() {
                return;
            }
            let Some(topic) = topic(m.subject.as_str()) else {
                return;
            };
            if !portcullis_mqtt::topic::matches(filter, &topic) {
                return;
            }
            let stored = SystemTime::from(m.time);
            if let Some(message) = message_of(topic, Some(&m.headers), m.payload, Some(stored)) {
                found.push(message);
            }
        };
        for pattern in filter_subjects(RETAINED, filter) {
            if !pattern.contains('*') && !pattern.contains('>') {
                match stream.get_last_raw_message_by_subject(&pattern).await {
                    Ok(m) => keep(m),
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
                    Err(e) => return Err(e.into()),
                }
                continue;
            }
            let consumer: consumer::PullConsumer = stream
                .create_consumer(consumer::pull::Config {
                    filter_subject: pattern.clone(),
                    deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                    ack_policy: consumer::AckPolicy::None,
                    inactive_threshold: Duration::from_secs(30),
                    ..Default::default()
                })
                .await?;
            let name = consumer.cached_info().name.clone();
            let mut left = consumer.cached_info().num_pending;
            while left > 0 {
                let mut batch = consumer
                    .fetch()
                    .max_messages(usize::try_from(left.min(1000)).unwrap_or(1000))
                    .messages()
                    .await?;
                let mut got = 0;
                while let Some(m) = batch.next().await {
                    let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
                    got += 1;
                    let time = m.info().map(|i| i.published).ok();
                    keep(async_nats::jetstream::message::StreamMessage {
                        subject: m.subject.clone(),
                        sequence: 0,
                        headers: m.headers.clone().unwrap_or_default(),
                        payload: m.payload.clone(),
                        time: time.unwrap_or_else(time::OffsetDateTime::now_utc),
                    });
                }
                if got == 0 {
                    break;
                }
                left = left.saturating_sub(got);
            }
            let _ = stream.delete_consumer(&name).await;
        }
        Ok(found)
    }

    /// The revision of this node's claim of `client_id`, if it holds one.
    fn held_claim(&self, client_id: &str) -> Option<u64> {
        self.claims
            .lock()
            .ok()
            .and_then(|c| c.get(client_id).copied())
    }

    /// Records this node as the owner of `client_id` (compare-and-set, retried on a race).
    async fn claim(&self, clients: &kv::Store, client_id: &str) -> Result<u64, String> {
        let key = client_key(client_id);
        let value = serde_json::json!({
            "owner": self.instance,
            "node": self.id,
            "at_ms": SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default(),
        })
        .to_string();
        let mut last = String::new();
        let deadline = tokio::time::Instant::now() + RIDE_THROUGH;
        let mut delay = Duration::from_millis(20);
        loop {
            if tokio::time::Instant::now() + delay > deadline {
                return Err(last);
            }
            let written = match clients.entry(key.clone()).await {
                Ok(Some(e)) => clients
                    .update(&key, value.clone().into(), e.revision)
                    .await
                    .map_err(|e| e.to_string()),
                Ok(None) => clients
                    .create(&key, value.clone().into())
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match written {
                Ok(revision) => {
                    if let Ok(mut claims) = self.claims.lock() {
                        claims.insert(client_id.to_string(), revision);
                    }
                    return Ok(revision);
                }
                // Another node wrote in between (read again), or JetStream is electing a
                // leader (try again shortly).
                Err(e) => last = e,
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// Gives claim `revision` back: nobody waits for it any more (its connection gave up). Not
    /// a newer claim of this node, nor one another node made since (a moment later, read from
    /// the leader: see [`RESUME_GRACE`]).
    fn give_back(&self, clients: &kv::Store, client_id: &str, revision: u64) {
        let mine = self.claims.lock().is_ok_and(|mut c| {
            c.get(client_id) == Some(&revision) && c.remove(client_id).is_some()
        });
        if mine {
            release_later(clients.clone(), client_id.to_string(), revision);
        }
    }

    /// The persistent session the cluster keeps for `client_id`, if it is still current and
    /// `identity`'s; anything else it kept is discarded. A session resumed is recorded as this
    /// node's at once, with a compare-and-set on what was read: a node ending it at the same
    /// moment (its last connection ended with an expiry of zero) either ends it first (then it
    /// is not resumed) or finds it taken and leaves it.
    async fn stored_session(
        &self,
        sessions: &kv::Store,
        client_id: &str,
        clean_start: bool,
        identity: &str,
    ) -> Result<Option<StoredSession>, String> {
        let key = client_key(client_id);
        let Some(claim) = self.held_claim(client_id) else {
            return Err("another node claimed the client id meanwhile".into());
        };
        let mut last = String::new();
        for attempt in 1..=5u64 {
            let entry = match sessions.entry(key.clone()).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put => e,
                Ok(_) => return Ok(None),
                Err(e) => return Err(e.to_string()),
            };
            let Ok(mut record) = serde_json::from_slice::<serde_json::Value>(&entry.value) else {
                return Ok(None);
            };
            if record["claim"].as_u64().unwrap_or(0) > claim {
                return Err("another node claimed the client id meanwhile".into());
            }
            let expired = record["offline_since_ms"].as_u64().is_some_and(|since| {
                now_ms().saturating_sub(since) >= record["expiry_secs"].as_u64().unwrap_or(0) * 1000
            });
            if clean_start || expired || record["identity"].as_str() != Some(identity) {
                self.end_session(sessions, client_id, false).await;
                return Ok(None);
            }
            // How long it had been offline, before the record says it is online here.
            let offline_for = record["offline_since_ms"]
                .as_u64()
                .map(|since| Duration::from_millis(now_ms().saturating_sub(since)));
            record["offline_since_ms"] = serde_json::Value::Null;
            record["owner"] = serde_json::json!(self.instance);
            record["claim"] = serde_json::json!(claim);
            if let Err(e) = sessions
                .update(&key, record.to_string().into(), entry.revision)
                .await
            {
                // Changed since it was read (ended, or written by its previous connection):
                // read again.
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                continue;
            }
            let subscriptions = record["subscriptions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| {
                    let qos = match s["qos"].as_u64()? {
                        0 => QoS::AtMostOnce,
                        1 => QoS::AtLeastOnce,
                        _ => QoS::ExactlyOnce,
                    };
                    Some((
                        s["filter"].as_str()?.to_string(),
                        SubscriptionOptions {
                            qos,
                            no_local: s["no_local"].as_bool().unwrap_or(false),
                            retain_as_published: s["retain_as_published"]
                                .as_bool()
                                .unwrap_or(false),
                        },
                    ))
                })
                .collect();
            return Ok(Some(StoredSession {
                identity: identity.to_string(),
                subscriptions,
                expiry: Duration::from_secs(record["expiry_secs"].as_u64().unwrap_or(0)),
                incarnation: incarnation_of(&record),
                offline_for,
            }));
        }
        Err(format!("the session's record kept changing: {last}"))
    }

    /// Forgets a persistent session: its record, then its consumers (and what they kept). With
    /// `only_mine`, only the session this node holds, not one another node resumed since (its
    /// record names that node). The record goes first, compared and set, so a node resuming
    /// it meanwhile finds it gone or keeps it — but nats-server 2.9 lets two compare-and-set
    /// writes in flight at the same moment both succeed (its check sees only what is
    /// applied): a resume racing this end can win the record and then lose it to this purge.
    /// So the consumers go a moment later, unless the session's record is back with the same
    /// incarnation (resumed; a session made anew has its own consumers).
    async fn end_session(&self, sessions: &kv::Store, client_id: &str, only_mine: bool) {
        let key = client_key(client_id);
        for _ in 0..5 {
            let entry = match sessions.entry(key.clone()).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put => e,
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(target: "portcullis::cluster", client_id = %client_id, error = %e, "cannot end a persistent session (the sweeper ends it once it expires)");
                    return;
                }
            };
            let record =
                serde_json::from_slice::<serde_json::Value>(&entry.value).unwrap_or_default();
            if only_mine && owner_of(&record).is_some_and(|o| o != self.instance) {
                return;
            }
            if sessions
                .purge_expect_revision(key.as_str(), Some(entry.revision))
                .await
                .is_err()
            {
                continue;
            }
            let incarnation = incarnation_of(&record);
            let filters: Vec<String> = record["subscriptions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["filter"].as_str().map(str::to_string))
                .collect();
            if !only_mine {
                for filter in &filters {
                    self.delete_consumers(client_id, incarnation, filter).await;
                }
                return;
            }
            // A node resuming the session at this moment may have won the record and lost it
            // to this purge: it writes the record again as it goes on. Its consumers stay if
            // it did (a moment later, out of the session's turn: a reconnection here waits
            // for nothing).
            let (node, sessions, client_id) =
                (self.clone(), sessions.clone(), client_id.to_string());
            tokio::spawn(async move {
                tokio::time::sleep(RESUME_GRACE).await;
                if node
                    .record_incarnation(&sessions, &client_id)
                    .await
                    .is_ok_and(|found| found != Some(incarnation))
                {
                    for filter in &filters {
                        node.delete_consumers(&client_id, incarnation, filter).await;
                    }
                }
            });
            return;
        }
    }

    /// The incarnation of the session `client_id`'s record names, read from the bucket
    /// stream's leader (a replica may lag); `None` without a record, an error when JetStream
    /// does not answer (the caller then keeps what it would delete: unknown is not gone).
    async fn record_incarnation(
        &self,
        sessions: &kv::Store,
        client_id: &str,
    ) -> Result<Option<u64>, ()> {
        let Some(m) = leader_entry(sessions, client_id).await? else {
            return Ok(None);
        };
        if m.headers.get("KV-Operation").is_some() {
            return Ok(None);
        }
        Ok(serde_json::from_slice::<serde_json::Value>(&m.payload)
            .ok()
            .map(|r| incarnation_of(&r)))
    }

    /// Writes a persistent session's record as the holder of its client id's claim (the claim's
    /// revision goes with it): never over a record written under a newer claim (another node
    /// took the session since), nor once this node holds no claim (the session moved or
    /// ended) — a late write must not take a session back. `online`: its connection starts (a
    /// record of the same life is kept as it is, no longer offline; any other is replaced).
    async fn put_mine(
        &self,
        sessions: &kv::Store,
        client_id: &str,
        record: String,
        online: bool,
    ) -> Result<(), String> {
        let key = client_key(client_id);
        let Ok(mut mine) = serde_json::from_str::<serde_json::Value>(&record) else {
            return Ok(());
        };
        let mut last = String::new();
        for attempt in 1..=5u64 {
            let Some(claim) = self.held_claim(client_id) else {
                return Ok(());
            };
            mine["claim"] = serde_json::json!(claim);
            let written = match sessions.entry(key.clone()).await {
                Ok(Some(e)) if e.operation == kv::Operation::Put => {
                    let mut kept =
                        serde_json::from_slice::<serde_json::Value>(&e.value).unwrap_or_default();
                    if kept["claim"].as_u64().unwrap_or(0) > claim {
                        return Ok(());
                    }
                    let value = if online && incarnation_of(&kept) == incarnation_of(&mine) {
                        // The same life: its subscriptions as recorded (a resumed session's
                        // come back one by one), the rest as its new connection says.
                        if kept["offline_since_ms"].is_null()
                            && kept["claim"].as_u64() == Some(claim)
                            && owner_of(&kept) == Some(self.instance.as_str())
                            && kept["expiry_secs"] == mine["expiry_secs"]
                            && kept["identity"] == mine["identity"]
                        {
                            return Ok(());
                        }
                        kept["offline_since_ms"] = serde_json::Value::Null;
                        kept["owner"] = serde_json::json!(self.instance);
                        kept["claim"] = serde_json::json!(claim);
                        kept["expiry_secs"] = mine["expiry_secs"].clone();
                        kept["identity"] = mine["identity"].clone();
                        kept
                    } else {
                        mine.clone()
                    };
                    sessions
                        .update(&key, value.to_string().into(), e.revision)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
                Ok(_) => sessions
                    .create(&key, mine.to_string().into())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match written {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
        }
        Err(last)
    }

    /// Stops delivering `filter`'s kept messages to a persistent session online here and, with
    /// `forget`, takes the subscription off its list; the session's record then (and its
    /// incarnation), if it is online here.
    fn stop_delivering(
        &self,
        client_id: &str,
        filter: &str,
        forget: bool,
    ) -> Option<(String, u64)> {
        let mut durables = self.durables.lock().unwrap_or_else(|p| p.into_inner());
        durables.get_mut(client_id).map(|d| {
            for task in d.pullers.remove(filter).into_iter().flatten() {
                task.abort();
            }
            if forget {
                d.subscriptions.remove(filter);
            }
            (d.record(&self.instance, None), d.incarnation)
        })
    }

    /// Runs a change of `client_id`'s session in NATS after the changes this node made to it
    /// before (claims, subscriptions, going offline, ending), so they take effect in the order
    /// the session made them: a filter taken at QoS 1 then at once at QoS 0, or unsubscribed,
    /// keeps no consumer behind; a session ended by its connection is gone for the next claim.
    fn in_order<F>(&self, client_id: &str, change: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        order.0 += 1;
        let id = order.0;
        let before = order.1.remove(client_id).map(|(_, task)| task);
        /// The last change of the session done (or failed): nothing left to wait for.
        struct Done(Arc<Mutex<SessionChanges>>, String, u64);
        impl Drop for Done {
            fn drop(&mut self) {
                let mut order = self.0.lock().unwrap_or_else(|p| p.into_inner());
                if order
                    .1
                    .get(&self.1)
                    .is_some_and(|(last, _)| *last == self.2)
                {
                    order.1.remove(&self.1);
                }
            }
        }
        let done = Done(self.order.clone(), client_id.to_string(), id);
        let task = tokio::spawn(async move {
            let _done = done;
            if let Some(before) = before {
                let _ = before.await;
            }
            change.await;
        });
        order.1.insert(client_id.to_string(), (id, task));
    }

    async fn delete_consumers(&self, client_id: &str, incarnation: u64, filter: &str) {
        // A shared subscription's messages are its group's (see `group_consumer`).
        if filter.starts_with("$share/") {
            return;
        }
        let Ok(stream) = self.js.get_stream(STREAM).await else {
            return;
        };
        for subject in filter_subjects(STORED, filter) {
            let _ = stream
                .delete_consumer(&consumer_name(client_id, incarnation, &subject))
                .await;
        }
    }

    /// Keeps `filter`'s QoS 1 and 2 messages for a persistent session (a durable consumer per
    /// subject, made if missing), delivers them while the session is online here, and records
    /// the subscription. At QoS 0 only records it (and forgets the consumers of a filter taken
    /// again at QoS 0 in life `taken_in`, the session's when it subscribed: nothing may deliver
    /// it at QoS 1 besides). A subscription the session changed since (unsubscribed, or taken
    /// again with other options) is left to that change.
    async fn durable_subscribe(
        &self,
        sessions: &kv::Store,
        client_id: &str,
        generation: u64,
        taken_in: Option<u64>,
        filter: &str,
        options: SubscriptionOptions,
    ) -> Result<()> {
        let stream = self.js.get_stream(STREAM).await?;
        let quiet = options.qos == QoS::AtMostOnce && !filter.starts_with("$share/");
        let current = {
            let durables = self.durables.lock().unwrap_or_else(|p| p.into_inner());
            match durables.get(client_id) {
                Some(d)
                    if d.generation == generation
                        && d.subscriptions.get(filter) == Some(&options) =>
                {
                    Some((d.expiry, d.inflight.clone(), d.incarnation))
                }
                _ => None,
            }
        };
        let Some((expiry, inflight, incarnation)) = current else {
            // Offline, ended or changed since: nothing to deliver, and the record is written
            // by what changed it. A filter taken at QoS 0 keeps no consumer, whatever came.
            if quiet && let Some(incarnation) = taken_in {
                self.delete_consumers(client_id, incarnation, filter).await;
            }
            return Ok(());
        };
        let mut tasks = Vec::new();
        // A shared subscription is only recorded: its group keeps its messages.
        let subjects = if filter.starts_with("$share/") || options.qos == QoS::AtMostOnce {
            Vec::new()
        } else {
            filter_subjects(STORED, filter)
        };
        for subject in subjects {
            let name = consumer_name(client_id, incarnation, &subject);
            let consumer: consumer::PullConsumer = stream
                .get_or_create_consumer(
                    &name,
                    consumer::pull::Config {
                        durable_name: Some(name.clone()),
                        filter_subject: subject,
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: ACK_WAIT,
                        deliver_policy: consumer::DeliverPolicy::New,
                        max_ack_pending: MAX_ACK_PENDING,
                        // Gone with the session: nobody pulls longer than its expiry.
                        inactive_threshold: expiry.max(Duration::from_secs(60)),
                        ..Default::default()
                    },
                )
                .await?;
            let node = self.clone();
            let (client_id, inflight) = (client_id.to_string(), inflight.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = node
                    .pull(consumer, &client_id, generation, options, inflight)
                    .await
                {
                    tracing::warn!(target: "portcullis::cluster", client_id = %client_id, error = %format!("{e:#}"), "stopped delivering a persistent session's kept messages");
                }
            }));
        }
        // Taken (again) at QoS 0: no consumer may deliver it at QoS 1 besides. Before the
        // record, so that a failed attempt tried again still deletes them.
        if quiet {
            self.delete_consumers(client_id, incarnation, filter).await;
        }
        let record = {
            let mut durables = self.durables.lock().unwrap_or_else(|p| p.into_inner());
            match durables.get_mut(client_id) {
                // Still as it subscribed: an unsubscribe or a QoS 0 subscription handled while
                // the consumers were made must not find pullers installed after it.
                Some(d)
                    if d.generation == generation
                        && d.subscriptions.get(filter) == Some(&options) =>
                {
                    for task in d
                        .pullers
                        .insert(filter.to_string(), tasks)
                        .into_iter()
                        .flatten()
                    {
                        task.abort();
                    }
                    d.subscriptions.insert(filter.to_string(), options);
                    Some(d.record(&self.instance, None))
                }
                _ => {
                    for task in tasks {
                        task.abort();
                    }
                    None
                }
            }
        };
        if let Some(record) = record {
            self.put_mine(sessions, client_id, record, false)
                .await
                .map_err(|e| anyhow::anyhow!("recording the session: {e}"))?;
        }
        Ok(())
    }

    /// Delivers what a durable consumer kept to the session, each message settled (acknowledged
    /// or delivered again) by its receipt.
    async fn pull(
        &self,
        consumer: consumer::PullConsumer,
        client_id: &str,
        generation: u64,
        options: SubscriptionOptions,
        inflight: Arc<Inflight>,
    ) -> Result<()> {
        // Small pulls: what is pulled waits here for room in the session's queue (and counts
        // towards the acknowledgement wait meanwhile), and a pull request outlives a puller
        // stopped when its session moves — the server keeps sending it messages nobody reads,
        // as many as it asked for (each delivered again after the wait), until it expires.
        // Its sequences are kept apart from the session's other consumers' (see [`Seqs`]).
        let consumer_key = {
            use std::hash::{Hash as _, Hasher as _};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            consumer.cached_info().name.hash(&mut h);
            h.finish()
        };
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .max_bytes_per_batch(PULL_BYTES)
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_EXPIRES / 2)
            .messages()
            .await?;
        while let Some(next) = messages.next().await {
            let m = match next {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(target: "portcullis::cluster", error = %e, "pulling kept messages");
                    continue;
                }
            };
            let Ok(info) = m.info() else {
                continue;
            };
            let (seq, published) = (info.stream_sequence, SystemTime::from(info.published));
            let info_delivered = info.delivered;
            let (with_client, acked) = {
                let mut seqs = inflight.seqs.lock().unwrap_or_else(|p| p.into_inner());
                let seqs = seqs.of(consumer_key);
                (seqs.with_client.contains(&seq), seqs.acked.contains(&seq))
            };
            if with_client {
                // Still with the client: not sent twice, only waited for longer.
                let _ = m.ack_with(jetstream::AckKind::Progress).await;
                continue;
            }
            if acked {
                // Delivered again after its wait although acknowledged meanwhile (the
                // acknowledgement crossed it): settled, not sent twice.
                let _ = m.ack().await;
                continue;
            }
            let (msg, acker) = m.split();
            // Expired while kept, and No Local's own publications (never delivered to it), are
            // settled at once.
            let messages: Vec<Message> = kept_messages(&msg, published)
                .into_iter()
                .filter(|(_, client)| {
                    !(options.no_local && client.as_deref() == Some(client_id.as_bytes()))
                })
                .map(|(m, _)| m)
                .collect();
            // Room in the session's queue first: a slow client holds its kept messages back,
            // none overflow.
            let room = messages.len().min(inflight.capacity);
            let wanted = inflight
                .room
                .clone()
                .acquire_many_owned(u32::try_from(room).unwrap_or(u32::MAX));
            tokio::pin!(wanted);
            loop {
                // Waiting for room counts towards the acknowledgement wait: JetStream is told
                // it is in progress (or it would deliver it again, behind later ones).
                match tokio::time::timeout(ACK_WAIT / 3, &mut wanted).await {
                    Ok(Ok(permits)) => {
                        permits.forget();
                        break;
                    }
                    Ok(Err(_)) => return Ok(()),
                    Err(_) => {
                        let _ = acker.ack_with(jetstream::AckKind::Progress).await;
                    }
                }
            }
            // With the client from here until settled (nothing awaited before the receipts are
            // made: a puller stopped in between would leave it marked, never delivered again).
            inflight
                .seqs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .of(consumer_key)
                .with_client
                .insert(seq);
            let set = inflight.clone();
            // Given back (the connection ended, or its queue was full): delivered again after
            // a moment, not at once in a loop.
            let mut receipts = settle_all(
                acker,
                messages.len().max(1),
                Some(SHARED_IDLE_POLL),
                Some((inflight.room.clone(), room)),
                move |acknowledged| {
                    set.seqs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .of(consumer_key)
                        .settled(seq, acknowledged);
                },
            )
            .into_iter();
            if messages.is_empty()
                && let Some(r) = receipts.next()
            {
                r.acknowledged();
            }
            for mut message in messages {
                message.qos = if (message.qos as u8) <= (options.qos as u8) {
                    message.qos
                } else {
                    options.qos
                };
                message.retain = options.retain_as_published && message.retain;
                number_qos2(&mut message, seq, info_delivered);
                message.receipt = receipts.next();
                let receipt = message.receipt.clone();
                if !self.broker.deliver_durable(client_id, generation, message) {
                    // The session is gone: this message and the rest go back.
                    for r in receipt.into_iter().chain(receipts) {
                        r.returned();
                    }
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Answers other nodes asking whether this process is alive (see [`Node::sweep`]).
    async fn answer_pings(self) {
        loop {
            match self.client.subscribe(ping_subject(&self.instance)).await {
                Ok(mut pings) => {
                    while let Some(ping) = pings.next().await {
                        let Some(reply) = ping.reply else {
                            continue;
                        };
                        // Asked about a client id: "0" when no persistent session of it is
                        // online here (an empty answer: alive, and holding it if asked).
                        let answer = match std::str::from_utf8(&ping.payload) {
                            Ok(client_id) if !client_id.is_empty() && !self.holds(client_id) => {
                                bytes::Bytes::from_static(b"0")
                            }
                            _ => bytes::Bytes::new(),
                        };
                        let _ = self.client.publish(reply, answer).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "portcullis::cluster", error = %e, "cannot answer pings; retrying");
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Every [`KEPT_EVERY`], how much of `nats_kept_mib` the message stream uses and how old
    /// its oldest message is (metrics); says once when it is full (JetStream then drops the
    /// oldest: a persistent session or shared group away longer than that age misses them),
    /// and once when it is no longer.
    async fn watch_kept(self) {
        let mut every = tokio::time::interval(KEPT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut full = false;
        loop {
            every.tick().await;
            let info = match self.js.get_stream(STREAM).await {
                Ok(stream) => stream.get_info().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let Ok(info) = info else {
                continue;
            };
            let limit = info.config.max_bytes;
            let bytes = info.state.bytes;
            let oldest = if info.state.messages == 0 {
                0
            } else {
                let first = info.state.first_timestamp.unix_timestamp();
                let now = i64::try_from(now_ms() / 1000).unwrap_or(i64::MAX);
                u64::try_from(now.saturating_sub(first)).unwrap_or(0)
            };
            metrics::gauge!("portcullis_cluster_kept_bytes").set(bytes as f64);
            metrics::gauge!("portcullis_cluster_kept_limit_bytes").set(limit as f64);
            metrics::gauge!("portcullis_cluster_kept_oldest_seconds").set(oldest as f64);
            let Ok(limit) = u64::try_from(limit) else {
                continue;
            };
            if !full && bytes.saturating_mul(100) >= limit.saturating_mul(KEPT_FULL_PERCENT) {
                full = true;
                tracing::warn!(target: "portcullis::cluster", kept_mib = bytes >> 20, oldest_secs = oldest, "the MQTT message stream is full (nats_kept_mib): JetStream drops its oldest QoS 1 and 2 messages, so a persistent session or shared group away longer than the oldest's age misses messages; raise nats_kept_mib (and max_file_store on each NATS server) to keep more");
            } else if full && bytes.saturating_mul(100) < limit.saturating_mul(KEPT_CLEAR_PERCENT) {
                full = false;
                tracing::info!(target: "portcullis::cluster", kept_mib = bytes >> 20, "the MQTT message stream is no longer full");
            }
        }
    }

    /// Now and then (one node at a time), forgets persistent sessions that expired and never
    /// came back, and starts the expiry of sessions left online by a node that died.
    async fn sweep(self, clients: kv::Store, sessions: kv::Store) {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            if !self.sweep_lease(&sessions).await {
                continue;
            }
            match self.sweep_once(&clients, &sessions).await {
                Ok((ended, orphaned)) if ended + orphaned > 0 => {
                    tracing::info!(target: "portcullis::cluster", ended, orphaned, "swept the persistent sessions: expired ones forgotten, ones a dead node held now expiring");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(target: "portcullis::cluster", error = %e, "cannot sweep the persistent sessions; trying again later");
                }
            }
        }
    }

    /// Takes the sweeper's lease if no node took it within half a period.
    async fn sweep_lease(&self, sessions: &kv::Store) -> bool {
        let now = now_ms();
        let value = serde_json::json!({"owner": self.instance, "at_ms": now}).to_string();
        match sessions.entry(SWEEP_LEASE).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => {
                let at = serde_json::from_slice::<serde_json::Value>(&e.value)
                    .ok()
                    .and_then(|v| v["at_ms"].as_u64())
                    .unwrap_or(0);
                let half = u64::try_from(SWEEP_EVERY.as_millis() / 2).unwrap_or(u64::MAX);
                now.saturating_sub(at) >= half
                    && sessions
                        .update(SWEEP_LEASE, value.into(), e.revision)
                        .await
                        .is_ok()
            }
            Ok(_) => sessions.create(SWEEP_LEASE, value.into()).await.is_ok(),
            Err(_) => false,
        }
    }

    /// One pass over the sessions bucket: (sessions ended, orphaned sessions now expiring).
    async fn sweep_once(&self, clients: &kv::Store, sessions: &kv::Store) -> Result<(u64, u64)> {
        let keys: Vec<String> = sessions
            .keys()
            .await?
            .filter_map(|k| async move { k.ok() })
            .collect()
            .await;
        let (mut ended, mut orphaned) = (0, 0);
        for key in keys.into_iter().filter(|k| !k.contains('.')) {
            let Some(client_id) = client_of_key(&key) else {
                continue;
            };
            let Some(entry) = sessions.entry(key.as_str()).await? else {
                continue;
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            let Ok(mut record) = serde_json::from_slice::<serde_json::Value>(&entry.value) else {
                continue;
            };
            match sweep_verdict(&record, now_ms()) {
                Sweep::Keep => {}
                Sweep::End => {
                    // The record first: a session resumed meanwhile keeps its consumers.
                    if sessions
                        .purge_expect_revision(key.as_str(), Some(entry.revision))
                        .await
                        .is_ok()
                    {
                        ended += 1;
                        let incarnation = incarnation_of(&record);
                        for s in record["subscriptions"].as_array().into_iter().flatten() {
                            if let Some(filter) = s["filter"].as_str() {
                                self.delete_consumers(&client_id, incarnation, filter).await;
                            }
                        }
                    }
                }
                Sweep::AskOwner => {
                    // The node the record names (the claim's holder may be another node whose
                    // connection never resumed it); an earlier version's record names none:
                    // the claim's holder then.
                    let owner = match owner_of(&record) {
                        Some(owner) => Some(owner.to_string()),
                        None => clients
                            .get(client_key(&client_id))
                            .await?
                            .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v).ok())
                            .and_then(|v| v["owner"].as_str().map(str::to_string)),
                    };
                    if let Some(owner) = owner
                        && self.holding(&owner, &client_id).await
                    {
                        continue;
                    }
                    // Its node is gone, or no longer has it online (it moved, and the node it
                    // moved to gave up before resuming it): offline from now, so it expires as
                    // any other would.
                    record["offline_since_ms"] = serde_json::json!(now_ms());
                    if sessions
                        .update(key.as_str(), record.to_string().into(), entry.revision)
                        .await
                        .is_ok()
                    {
                        orphaned += 1;
                    }
                }
            }
        }
        Ok((ended, orphaned))
    }

    /// Whether a persistent session of `client_id` is online here.
    fn holds(&self, client_id: &str) -> bool {
        self.durables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(client_id)
    }

    /// Whether node instance `instance` answers and holds `client_id`'s persistent session
    /// online (a slow or unclear answer counts as yes; a node of an earlier version answers
    /// every ping alike: yes).
    async fn holding(&self, instance: &str, client_id: &str) -> bool {
        if instance == self.instance {
            return self.holds(client_id);
        }
        let asked = self.client.request(
            ping_subject(instance),
            bytes::Bytes::copy_from_slice(client_id.as_bytes()),
        );
        match tokio::time::timeout(Duration::from_secs(2), asked).await {
            Ok(Ok(answer)) => answer.payload.as_ref() != b"0",
            Ok(Err(e)) => e.kind() != async_nats::RequestErrorKind::NoResponders,
            Err(_) => true,
        }
    }

    /// Closes this node's session of a client id another node claimed since.
    /// Keeps [`NatsState::kept`] as the sessions and shared groups buckets say, read again from
    /// the start whenever the watch fails (every QoS 1 message is kept meanwhile).
    /// The key of this node's probe in the sessions bucket (a `.` in it: the sweeper skips it,
    /// and no client id's key has one).
    fn probe_key(&self) -> String {
        format!("probe.{:016x}", self.origin)
    }

    /// Writes this node's probe now and then, for its own watch to bring back
    /// ([`PROBE_EVERY`]).
    async fn probe(self, sessions: kv::Store) {
        let key = self.probe_key();
        let mut every = tokio::time::interval(PROBE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            every.tick().await;
            n += 1;
            let _ = tokio::time::timeout(
                PROBE_EVERY,
                sessions.put(key.as_str(), n.to_string().into()),
            )
            .await;
        }
    }

    async fn watch_interest(self, sessions: kv::Store, groups: kv::Store) {
        let mut reconnects = self.state.reconnects.0.subscribe();
        loop {
            self.state.kept.reset();
            reconnects.borrow_and_update();
            tokio::select! {
                read = self.read_interest(&sessions, &groups) => if let Err(e) = read {
                    tracing::warn!(target: "portcullis::cluster", error = %format!("{e:#}"), "cannot watch which QoS 1 messages the cluster keeps (it keeps every one meanwhile); retrying");
                },
                // Regression: a watch that lived through a lost connection to NATS went on
                // without error but missed a persistent subscription made meanwhile, so the
                // node sent its messages live and they were lost with the session's node.
                // Everything is kept again until both buckets are read afresh.
                _ = reconnects.changed() => {
                    tracing::info!(target: "portcullis::cluster", "connected to NATS again: reading the cluster's persistent subscriptions and shared groups afresh (every QoS 1 message is kept meanwhile)");
                    continue;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn read_interest(&self, sessions: &kv::Store, groups: &kv::Store) -> Result<()> {
        let kept = &self.state.kept;
        let probe_key = self.probe_key();
        let set_ready = || {
            if kept.set_ready() {
                tracing::info!(target: "portcullis::cluster", "read the persistent subscriptions and shared groups of the cluster (with nats_qos1_live, QoS 1 messages none of them needs cross live)");
            }
        };
        let mut of_sessions = sessions.watch_with_history(">").await?;
        let mut of_groups = groups.watch_with_history(">").await?;
        // Each watch first gives every entry its bucket holds (the last with nothing pending
        // after it); an empty bucket gives none. Counted now, after the watches started (a
        // bucket's status is what it was when the node opened it).
        let mut pending = [
            self.bucket_holds(SESSIONS).await?,
            self.bucket_holds(SHARED_GROUPS).await?,
        ];
        if pending == [false, false] {
            set_ready();
        }
        // While not ready: counted again now and then (entries that aged out between the
        // count and the watch never come).
        let mut recount = tokio::time::interval(Duration::from_secs(1));
        recount.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        recount.tick().await;
        loop {
            let (i, entry) = tokio::select! {
                e = of_sessions.next() => (0, e),
                e = of_groups.next() => (1, e),
                _ = recount.tick(), if pending != [false, false] => {
                    for (i, bucket) in [SESSIONS, SHARED_GROUPS].into_iter().enumerate() {
                        if pending[i] && !self.bucket_holds(bucket).await? {
                            pending[i] = false;
                        }
                    }
                    if pending == [false, false] {
                        set_ready();
                    }
                    continue;
                }
            };
            let entry = entry.context("the watch ended")??;
            let key = format!("{}{}", if i == 0 { "s:" } else { "g:" }, entry.key);
            match (entry.operation, i) {
                // Probes (see [`PROBE_EVERY`]): this node's own, read once the history is read,
                // shows its watch alive; none holds subscriptions.
                _ if i == 0 && entry.key.starts_with("probe.") => {
                    if entry.key == probe_key && !pending[0] {
                        let now = now_ms();
                        let before = self.state.probe_seen_ms.swap(now, Ordering::Relaxed);
                        if now.saturating_sub(before) > PROBE_STALE_MS {
                            tracing::info!(target: "portcullis::cluster", "the watch of the cluster's persistent subscriptions is current (its probe came back): QoS 1 messages none of them needs cross live (nats_qos1_live)");
                        }
                    }
                }
                (kv::Operation::Put, 0) => {
                    let (incarnation, filters) = kept::record_filters(&entry.value);
                    if let Some(lag) = self.interest_lag
                        && pending == [false, false]
                    {
                        tokio::time::sleep(lag).await;
                    }
                    kept.grow(&key, incarnation, filters);
                }
                (kv::Operation::Put, _) => kept.set(
                    &key,
                    std::str::from_utf8(&entry.value)
                        .ok()
                        .filter(|f| portcullis_mqtt::topic::check_filter(f).is_ok())
                        .map(|f| vec![f.to_string()])
                        .unwrap_or_default(),
                ),
                _ => kept.set(&key, Vec::new()),
            }
            if entry.delta == 0 && pending[i] {
                pending[i] = false;
                if pending == [false, false] {
                    set_ready();
                }
            }
        }
    }

    /// Writes `filter` (held here) into the route table; the key, and the write's
    /// acknowledgement to come.
    async fn route(
        &self,
        filter: &str,
    ) -> Option<(String, jetstream::context::PublishAckFuture, String)> {
        let key = routes::key(self.origin, filter);
        self.held_routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), filter.to_string());
        match self
            .js
            .publish(
                format!("$KV.{ROUTES}.{key}"),
                bytes::Bytes::copy_from_slice(filter.as_bytes()),
            )
            .await
        {
            Ok(ack) => Some((key, ack, filter.to_string())),
            Err(e) => {
                tracing::warn!(target: "portcullis::cluster", error = %e, filter = %filter, "cannot write a filter into the route table (its messages cross on their topics' subjects)");
                None
            }
        }
    }

    /// Waits until this node's route table and every other node's hold `key` for `filter`
    /// (each told it directly; this node's own read from the bucket, at most [`ROUTE_WAIT`]; a
    /// node gone answers at once that nobody is there).
    async fn routes_hold(&self, key: &str, filter: &str) {
        let own = self.state.routes.wait_for(key, ROUTE_WAIT);
        let others = self
            .state
            .routes
            .other_nodes(self.origin)
            .into_iter()
            .map(|node| {
                // KEY, a NUL (never in a filter), the filter.
                let asked = self.client.request(
                    format!("{ROUTE_SYNC}.{node:016x}"),
                    bytes::Bytes::from(format!("{key}\0{filter}")),
                );
                async move {
                    let _ =
                        tokio::time::timeout(ROUTE_WAIT + Duration::from_millis(500), asked).await;
                }
            });
        futures_util::future::join(own, futures_util::future::join_all(others)).await;
    }

    /// Answers other nodes' [`Node::routes_hold`] once this node's route table holds the entry
    /// it is told of.
    async fn answer_route_waits(self) {
        let subject = format!("{ROUTE_SYNC}.{:016x}", self.origin);
        loop {
            match self.client.subscribe(subject.clone()).await {
                Ok(mut asked) => {
                    while let Some(ask) = asked.next().await {
                        let Some(reply) = ask.reply else {
                            continue;
                        };
                        let told = std::str::from_utf8(&ask.payload)
                            .ok()
                            .and_then(|p| p.split_once('\0'));
                        if let Some((key, filter)) = told {
                            self.state.routes.told(key, filter);
                        }
                        let answer = if told.is_some() { &b"1"[..] } else { &b"0"[..] };
                        let _ = self
                            .client
                            .publish(reply, bytes::Bytes::from_static(answer))
                            .await;
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "portcullis::cluster", error = %e, "cannot subscribe on NATS to route table questions; retrying");
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Takes `filter` (no longer held here) out of the route table.
    async fn unroute(&self, filter: &str) {
        let key = routes::key(self.origin, filter);
        self.held_routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        self.delete_route(&key).await;
    }

    /// Writes a deletion of `key` into the route table; its marker is purged later (see
    /// [`Node::purge_route_deletes`]).
    async fn delete_route(&self, key: &str) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("KV-Operation", "DEL");
        match self
            .js
            .publish_with_headers(format!("$KV.{ROUTES}.{key}"), headers, bytes::Bytes::new())
            .await
        {
            Ok(ack) => {
                let (deletes, key) = (self.route_deletes.clone(), key.to_string());
                tokio::spawn(async move {
                    if let Ok(Ok(ack)) = tokio::time::timeout(ROUTE_WAIT, ack).await {
                        deletes.lock().unwrap_or_else(|p| p.into_inner()).push((
                            tokio::time::Instant::now(),
                            key,
                            ack.sequence,
                        ));
                    }
                });
            }
            Err(e) => {
                tracing::warn!(target: "portcullis::cluster", error = %e, key = %key, "cannot take an entry out of the route table");
            }
        }
    }

    /// Writes this node's instance and every filter it holds into the route table (in order
    /// with the control task's own writes: it runs there).
    async fn write_routes(&self) {
        let held: Vec<(String, String)> = self
            .held_routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, f)| (k.clone(), f.clone()))
            .collect();
        let marker = (routes::instance_key(self.origin), self.instance.clone());
        for (key, value) in std::iter::once(marker).chain(held) {
            if let Err(e) = self
                .js
                .publish(format!("$KV.{ROUTES}.{key}"), value.into())
                .await
            {
                // Written again at the next check (ROUTES_SWEEP).
                tracing::warn!(target: "portcullis::cluster", error = %e, "cannot write this node's entries into the route table");
                return;
            }
        }
    }

    /// Purges the markers of deletions older than [`ROUTES_SWEEP`] (every node has read them):
    /// up to the deletion's own sequence, so that an entry written again since stays.
    async fn purge_route_deletes(&self) {
        let due: Vec<(String, u64)> = {
            let mut deletes = self.route_deletes.lock().unwrap_or_else(|p| p.into_inner());
            let now = tokio::time::Instant::now();
            let (due, later): (Vec<_>, Vec<_>) = deletes
                .drain(..)
                .partition(|(at, _, _)| now.duration_since(*at) >= ROUTES_SWEEP);
            *deletes = later;
            due.into_iter().map(|(_, k, seq)| (k, seq)).collect()
        };
        if due.is_empty() {
            return;
        }
        let Ok(stream) = self.js.get_stream(format!("KV_{ROUTES}")).await else {
            return;
        };
        for (key, seq) in due {
            let _ = stream
                .purge()
                .filter(format!("$KV.{ROUTES}.{key}"))
                .sequence(seq + 1)
                .await;
        }
    }

    /// Keeps [`NatsState::routes`] as the routes bucket says, read again from the start whenever
    /// the watch fails or the connection to NATS comes back (every QoS 0 message goes on its
    /// topic's subject meanwhile).
    async fn watch_routes(self, bucket: kv::Store) {
        let mut reconnects = self.state.reconnects.0.subscribe();
        loop {
            self.state.routes.reset();
            reconnects.borrow_and_update();
            tokio::select! {
                read = self.read_routes(&bucket) => if let Err(e) = read {
                    tracing::warn!(target: "portcullis::cluster", error = %format!("{e:#}"), "cannot watch the route table (QoS 0 messages cross on their topics' subjects meanwhile); retrying");
                },
                _ = reconnects.changed() => continue,
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn read_routes(&self, bucket: &kv::Store) -> Result<()> {
        let routes = &self.state.routes;
        let set_ready = || {
            if routes.set_ready() {
                tracing::info!(target: "portcullis::cluster", entries = routes.len(), "read the route table: QoS 0 messages go to the nodes that want them");
            }
        };
        let mut watch = bucket.watch_with_history(">").await?;
        // The watch first gives every entry the bucket holds (the last with nothing pending
        // after it); an empty bucket gives none.
        let mut pending = self.bucket_holds(ROUTES).await?;
        if !pending {
            set_ready();
        }
        // While not ready: counted again now and then (deletions purged between the count and
        // the watch never come).
        let mut recount = tokio::time::interval(Duration::from_secs(1));
        recount.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        recount.tick().await;
        loop {
            let entry = tokio::select! {
                entry = watch.next() => entry,
                _ = recount.tick(), if pending => {
                    if !self.bucket_holds(ROUTES).await? {
                        pending = false;
                        set_ready();
                    }
                    continue;
                }
            };
            let entry = entry.context("the watch ended")??;
            match entry.operation {
                kv::Operation::Put => {
                    routes.set(&entry.key, std::str::from_utf8(&entry.value).ok());
                }
                _ => routes.set(&entry.key, None),
            }
            if entry.delta == 0 && pending {
                pending = false;
                set_ready();
            }
        }
    }

    /// Has this node's entries written into the route table at start and again after a lost
    /// connection to NATS; every [`ROUTES_SWEEP`], has what went missing written back and what it
    /// no longer holds taken out, takes out the entries of nodes that are gone, and purges
    /// deletions every node has read.
    async fn keep_routes(self) {
        let mut reconnects = self.state.reconnects.0.subscribe();
        let mut every = tokio::time::interval(ROUTES_SWEEP);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Per other node, the checks in a row that found it gone (or without an instance).
        let mut missed: HashMap<u64, u32> = HashMap::new();
        let repair = |fix: Control| {
            if let Some(control) = self.control.upgrade() {
                let _ = control.send(fix);
            }
        };
        repair(Control::RoutesWrite);
        loop {
            tokio::select! {
                _ = reconnects.changed() => {
                    repair(Control::RoutesWrite);
                    continue;
                }
                _ = every.tick() => {}
            }
            self.purge_route_deletes().await;
            // Told of and never written (a filter dropped as it was told): gone after a while.
            self.state.routes.forget_told(6 * ROUTES_SWEEP);
            if !self.state.routes.is_ready() {
                continue;
            }
            // This node's entries as its table has them, against those it holds (the control
            // task checks again before it deletes: a filter held again meanwhile stays).
            let listed: HashSet<String> =
                self.state.routes.keys_of(self.origin).into_iter().collect();
            let (missing, extra) = {
                let held = self.held_routes.lock().unwrap_or_else(|p| p.into_inner());
                let missing = !listed.contains(&routes::instance_key(self.origin))
                    || held.keys().any(|k| !listed.contains(k));
                let extra: Vec<String> = listed
                    .iter()
                    .filter(|k| !k.ends_with(".node") && !held.contains_key(*k))
                    .cloned()
                    .collect();
                (missing, extra)
            };
            if missing {
                tracing::info!(target: "portcullis::cluster", "entries of this node were missing from the route table: written again");
                repair(Control::RoutesWrite);
            }
            if !extra.is_empty() {
                repair(Control::RoutesDelete(extra));
            }
            self.sweep_routes(&mut missed).await;
        }
    }

    /// Takes out of the route table the entries of nodes that have not answered on NATS for
    /// [`SWEEP_MISSES`] checks in a row (a node killed: its messages would be sent for nobody),
    /// and of nodes without an instance that long.
    async fn sweep_routes(&self, missed: &mut HashMap<u64, u32>) {
        let others = self.state.routes.others(self.origin);
        missed.retain(|node, _| others.iter().any(|(n, _, _)| n == node));
        for (node, instance, keys) in others {
            let gone = match &instance {
                Some(instance) => self.gone(instance).await,
                None => true,
            };
            let misses = missed.entry(node).or_default();
            *misses = if gone { *misses + 1 } else { 0 };
            if *misses < SWEEP_MISSES {
                continue;
            }
            missed.remove(&node);
            tracing::info!(target: "portcullis::cluster", node = %instance.unwrap_or_else(|| format!("{node:016x}")), entries = keys.len(), "a node is gone: its entries leave the route table");
            for key in &keys {
                self.delete_route(key).await;
            }
        }
    }

    /// Whether node instance `instance` is gone: nobody answers its pings on NATS.
    async fn gone(&self, instance: &str) -> bool {
        let asked = self
            .client
            .request(ping_subject(instance), bytes::Bytes::new());
        matches!(
            tokio::time::timeout(Duration::from_secs(2), asked).await,
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders
        )
    }

    /// Receives the batches other nodes send this node (see [`routes::NodeBatches`]).
    async fn receive_routed(self) {
        let subject = format!("{NODE_BATCH}.{:016x}", self.origin);
        loop {
            match self.client.subscribe(subject.clone()).await {
                Ok(mut batches) => {
                    while let Some(msg) = batches.next().await {
                        self.arrived_routed(&msg);
                        // The sessions it filled write before the next batch is read: batches
                        // of hundreds handled back to back overflowed a subscriber's channel
                        // (its QoS 0 messages dropped) while its session waited its turn.
                        tokio::task::yield_now().await;
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "portcullis::cluster", error = %e, "cannot subscribe on NATS to this node's batches; retrying");
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn arrived_routed(&self, msg: &async_nats::Message) {
        let Some((origin, messages)) = routes::read_node_batch(&msg.payload) else {
            return;
        };
        if origin == self.origin {
            return;
        }
        node_batches("received").increment(1);
        self.counted(self.broker.deliver_remote_all(messages));
    }

    /// Sends a batch to each of its nodes.
    async fn send_nodes(&self, batch: routes::ForNodes) {
        for node in batch.to.iter() {
            if let Err(e) = self
                .client
                .publish(format!("{NODE_BATCH}.{node:016x}"), batch.payload.clone())
                .await
            {
                tracing::warn!(target: "portcullis::cluster", error = %e, "cannot route a message to the other nodes");
            }
        }
        node_batches("sent").increment(batch.to.len() as u64);
    }

    /// Whether the bucket `name` holds any entry now (its stream's state, read afresh).
    async fn bucket_holds(&self, name: &str) -> Result<bool> {
        let stream = self.js.get_stream(format!("KV_{name}")).await?;
        Ok(stream.cached_info().state.messages > 0)
    }

    async fn watch_owners(self, clients: kv::Store) {
        let mut reconnects = self.state.reconnects.0.subscribe();
        let mut afresh = false;
        loop {
            reconnects.borrow_and_update();
            // After a lost connection, every client id's last owner is read again: a takeover
            // made meanwhile may have crossed the old watch unseen (as the kept-interest
            // watch's did).
            let watch = if afresh {
                clients.watch_with_history(">").await
            } else {
                clients.watch_all().await
            };
            let mut watch = match watch {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(target: "portcullis::cluster", error = %e, "cannot watch client id owners; retrying");
                    afresh = true;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            loop {
                let (entry, reconnected) = tokio::select! {
                    entry = watch.next() => (entry, false),
                    _ = reconnects.changed() => (None, true),
                };
                let Some(Ok(entry)) = entry else {
                    afresh = true;
                    // A watch that failed or ended is made again after a moment (each time
                    // every owner is read again: not in a loop); after a reconnect, at once.
                    if !reconnected {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    break;
                };
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                let Some(client_id) = client_of_key(&entry.key) else {
                    continue;
                };
                // Only client ids this node holds matter (read afresh, every id comes).
                let held = self
                    .claims
                    .lock()
                    .map(|claims| claims.contains_key(&client_id))
                    .unwrap_or(false);
                if !held {
                    continue;
                }
                let owner = serde_json::from_slice::<serde_json::Value>(&entry.value)
                    .ok()
                    .and_then(|v| {
                        Some((
                            v.get("owner")?.as_str()?.to_string(),
                            v.get("node")?.as_str()?.to_string(),
                        ))
                    });
                let Some((owner, node)) = owner else {
                    continue;
                };
                if owner == self.instance {
                    continue;
                }
                let mine =
                    self.claims
                        .lock()
                        .ok()
                        .and_then(|mut claims| match claims.get(&client_id) {
                            Some(&revision) if revision < entry.revision => {
                                claims.remove(&client_id)
                            }
                            _ => None,
                        });
                if mine.is_some()
                    && let Some(mut d) = self
                        .durables
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&client_id)
                {
                    d.stop();
                }
                if mine.is_some() && self.broker.taken_over(&client_id) {
                    tracing::info!(target: "portcullis::cluster", client_id = %client_id, node = %node, "mqtt session taken over by another node");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Regression (found by the cluster bench, 2026-12-04): the wait a publishing connection
    /// was given while the queue to NATS was behind reserved half the queue's room. A waiting
    /// reservation is handed every slot freed until it has them all: meanwhile every other
    /// publication found the queue full and was dropped (half of a QoS 0 fan-in's).
    #[tokio::test]
    async fn backpressure_never_takes_the_room_publications_need() {
        use super::{Bridge, NatsBridge, QUEUE, Work};
        use portcullis_mqtt::codec::QoS;
        use std::sync::Arc;
        let publishing = Arc::new(super::WorkQueue::default());
        let (control, _controls) = tokio::sync::mpsc::unbounded_channel();
        let state = Arc::new(super::NatsState::default());
        let bridge = NatsBridge {
            work: publishing.clone(),
            control,
            state: state.clone(),
        };
        let message = || test_message("t", b"", QoS::AtMostOnce);
        for _ in 0..QUEUE - 10 {
            assert!(bridge.published(message(), None, None, false).is_none());
        }
        let wait = bridge.backpressure().expect("behind: a wait");
        let waiting = tokio::spawn(wait);
        tokio::task::yield_now().await;
        // The publishing task takes 100: they are the publications' room, not the wait's.
        for _ in 0..100 {
            let Some(Work::Publish(..)) = publishing.try_recv() else {
                panic!("queued");
            };
        }
        for _ in 0..100 {
            assert!(
                bridge
                    .work
                    .try_send(Work::Publish(message(), None, None, None, false)),
                "a freed slot went to the waiting connection"
            );
        }
        assert!(!waiting.is_finished(), "still behind");
        // Caught up: the publishing task says so, and the wait ends.
        while publishing.len() > QUEUE / 2 {
            publishing.try_recv();
        }
        state.drained.notify_waiters();
        waiting.await.unwrap();
    }

    #[test]
    fn the_sweeper_ends_expired_sessions_keeps_current_ones_and_asks_about_online_ones() {
        use super::{SWEEP_MARGIN_MS, Sweep, sweep_verdict};
        let now = 10_000_000;
        let offline = |ago: u64, expiry: u64| serde_json::json!({"offline_since_ms": now - ago, "expiry_secs": expiry});
        assert_eq!(sweep_verdict(&offline(5_000, 3600), now), Sweep::Keep);
        // Expired, but within the margin: a node may be resuming it right now.
        assert_eq!(sweep_verdict(&offline(3_600_000, 3600), now), Sweep::Keep);
        assert_eq!(
            sweep_verdict(&offline(3_600_000 + SWEEP_MARGIN_MS, 3600), now),
            Sweep::End
        );
        assert_eq!(
            sweep_verdict(
                &serde_json::json!({"offline_since_ms": null, "expiry_secs": 60}),
                now
            ),
            Sweep::AskOwner
        );
    }

    use super::*;

    #[test]
    fn every_topic_round_trips_and_filters_map_to_wildcards() {
        for t in [
            "a/b",
            "a.b/c d",
            "*/>/%",
            "/leading//empty/",
            "$SYS/x",
            "ünï/ç",
            "a%2Eb",
            "",
        ] {
            for prefix in [LIVE, STORED, RETAINED] {
                let s = subject(prefix, t);
                assert!(!s.contains(' ') && !s.contains(".."), "{t} -> {s}");
                assert_eq!(topic(&s).as_deref(), Some(t), "{s}");
            }
        }
        assert_eq!(subject(LIVE, "a.b/c"), "pcl.a%2Eb.c");
        assert_eq!(filter_subjects(LIVE, "a/+/c"), vec!["pcl.a.*.c"]);
        assert_eq!(filter_subjects(STORED, "a/#"), vec!["pcq.a.>", "pcq.a"]);
        assert_eq!(filter_subjects(LIVE, "#"), vec!["pcl.>"]);
        assert_eq!(
            filter_subjects(LIVE, "a.b/#"),
            vec!["pcl.a%2Eb.>", "pcl.a%2Eb"]
        );
        assert_eq!(topic("other.subject"), None);
    }

    #[test]
    fn a_filter_beginning_with_a_name_takes_every_kind_in_one_subscription() {
        use super::{ANY_KIND, any_kind};
        for filter in [
            "devices/+/telemetry",
            "commands/dev-1/#",
            "a",
            "$SYS/x",
            "api/x",
        ] {
            assert!(any_kind(filter), "{filter}");
        }
        assert_eq!(
            filter_subjects(ANY_KIND, "commands/dev-1/#"),
            vec!["*.commands.dev-1.>", "*.commands.dev-1"]
        );
        // What the kind's wildcard would bring besides topics: NATS's own subjects and the
        // cluster's subjects for nodes, with that name in second place.
        for filter in [
            "+/x",
            "#",
            "/x",
            "API/#",
            "ACK/x",
            "EVENT/#",
            "FC/x",
            "SERVER/#",
            "ACCOUNT/#",
            "REQ/#",
            "PORTCULLIS_ROUTES/#",
            "AE/#",
            "CR/x",
            "0123456789abcdef",
            "0123456789ABCDEF/#",
        ] {
            assert!(!any_kind(filter), "{filter}");
        }
        // A node's ping subject (`pcn.` and its instance, escaped): never an interest of a
        // session's, which would answer for a dead node.
        let ping = super::ping_subject("node-1#1764912345678901234");
        let token = ping.strip_prefix("pcn.").unwrap();
        assert!(!any_kind(token));
        assert!(!any_kind(&format!("{token}/#")));
    }

    #[test]
    fn client_ids_round_trip_as_bucket_keys() {
        for id in ["dev-1", "a.b c", "ünï", "x=41", "_-", "%"] {
            let key = client_key(id);
            assert!(
                key.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)),
                "{key}"
            );
            assert_eq!(client_of_key(&key).as_deref(), Some(id));
        }
        assert_ne!(queue_group("$share/g/a"), queue_group("$share/g/b"));
    }

    #[test]
    fn properties_and_expiry_cross_nodes() {
        let m = Message {
            topic: "t".into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: PublishProperties {
                content_type: Some("text/plain".into()),
                user_properties: vec![("k".into(), "ü v".into())],
                correlation_data: Some(bytes::Bytes::from_static(b"\0\x01")),
                ..Default::default()
            },
            expires_at: Some(std::time::Instant::now() + Duration::from_secs(60)),
            sent_as: None,
            preferred_id: None,
            released: false,
            receipt: None,
        };
        let headers = headers_of(&m, "node#1", "node#1/1");
        let back = message_of("t".into(), Some(&headers), m.payload.clone(), None).unwrap();
        assert_eq!(back.qos, QoS::ExactlyOnce);
        assert!(back.retain);
        assert_eq!(back.properties.content_type, m.properties.content_type);
        assert_eq!(
            back.properties.user_properties,
            m.properties.user_properties
        );
        assert_eq!(
            back.properties.correlation_data,
            m.properties.correlation_data
        );
        assert!(back.expires_at.is_some());
        // Stored longer ago than it lives: gone.
        let old = SystemTime::now() - Duration::from_secs(120);
        assert!(message_of("t".into(), Some(&headers), m.payload.clone(), Some(old)).is_none());

        // A QoS 0 message's live frame carries the same, and its origin and sequence.
        let frame = super::live_frame(&m, 0xfeed, 42);
        let read = super::read_live_frame(&frame).unwrap();
        assert_eq!((read.origin, read.seq, read.retain), (0xfeed, 42, true));
        let back = read.message("t".into(), None).unwrap();
        assert_eq!(back.qos, QoS::AtMostOnce);
        assert_eq!(back.payload, m.payload);
        assert_eq!(back.properties.content_type, m.properties.content_type);
        assert_eq!(
            back.properties.user_properties,
            m.properties.user_properties
        );
        assert!(back.expires_at.is_some());
        // A plain message: nothing but the payload after the fixed fields.
        let plain = Message {
            properties: PublishProperties::default(),
            expires_at: None,
            retain: false,
            ..m.clone()
        };
        let frame = super::live_frame(&plain, 1, 2);
        assert_eq!(frame.len(), 22 + plain.payload.len());
        let back = super::read_live_frame(&frame)
            .unwrap()
            .message("t".into(), None)
            .unwrap();
        assert_eq!((back.payload, back.retain), (plain.payload, false));
        // Truncated or foreign payloads are not frames.
        assert!(super::read_live_frame(&frame.slice(..21)).is_none());
        assert!(
            super::read_live_frame(&bytes::Bytes::from_static(b"hello, not a frame at all"))
                .is_none()
        );
        let mut lying = frame.to_vec();
        lying[18..22].copy_from_slice(&1000u32.to_be_bytes());
        assert!(super::read_live_frame(&bytes::Bytes::from(lying)).is_none());
    }

    /// A message as a publisher's session hands it over.
    fn test_message(topic: &str, payload: &[u8], qos: QoS) -> Message {
        Message {
            topic: topic.into(),
            payload: bytes::Bytes::copy_from_slice(payload),
            qos,
            retain: false,
            properties: PublishProperties::default(),
            expires_at: None,
            sent_as: None,
            preferred_id: None,
            released: false,
            receipt: None,
        }
    }

    /// QoS 0 messages of one flush cross NATS as one message per topic, in order per topic; a
    /// full batch is sent before it grows further.
    #[test]
    fn live_batches_group_by_topic_and_keep_order() {
        let message = |topic: &str, payload: &[u8]| test_message(topic, payload, QoS::AtMostOnce);
        let mut batch = super::Batches::live();
        let add = |batch: &mut super::Batches, m: &Message, origin: u64, seq: u64| {
            batch
                .add(m, None, None, origin, seq)
                .map(|s| (s.subject, s.payload))
        };
        let drain = |batch: &mut super::Batches| -> Vec<(String, bytes::Bytes)> {
            batch
                .drain()
                .into_iter()
                .map(|s| (s.subject, s.payload))
                .collect()
        };
        for (seq, (topic, payload)) in [("a/b", "1"), ("c", "2"), ("a/b", "3"), ("a/b", "4")]
            .into_iter()
            .enumerate()
        {
            assert!(
                add(
                    &mut batch,
                    &message(topic, payload.as_bytes()),
                    7,
                    seq as u64
                )
                .is_none()
            );
        }
        let sent = drain(&mut batch);
        assert_eq!(sent.len(), 2);
        let read = |payload: &bytes::Bytes, topic: &str| -> Vec<(u64, u64, bytes::Bytes)> {
            super::batch_frames(payload)
                .map(|f| {
                    (
                        f.origin,
                        f.seq,
                        f.message(topic.into(), None).unwrap().payload,
                    )
                })
                .collect()
        };
        assert_eq!(sent[0].0, "pcb.a.b");
        assert_eq!(
            read(&sent[0].1, "a/b"),
            [(7, 0, "1".into()), (7, 2, "3".into()), (7, 3, "4".into())]
        );
        // About four bytes per message on top of its payload, after the header.
        assert_eq!(sent[0].1.len(), 17 + 3 * (4 + 1));
        assert_eq!(sent[1].0, "pcb.c");
        assert_eq!(read(&sent[1].1, "c"), [(7, 1, "2".into())]);
        assert!(drain(&mut batch).is_empty());
        // Properties and the retain flag come back.
        let mut kept = message("p", b"x");
        kept.retain = true;
        kept.properties.content_type = Some("text/plain".into());
        add(&mut batch, &kept, 9, 1_000_000);
        let frames: Vec<_> = super::batch_frames(&drain(&mut batch)[0].1).collect();
        assert_eq!((frames[0].seq, frames[0].retain), (1_000_000, true));
        let back = frames
            .into_iter()
            .next()
            .unwrap()
            .message("p".into(), None)
            .unwrap();
        assert_eq!(back.properties.content_type.as_deref(), Some("text/plain"));
        assert_eq!(back.qos, QoS::AtMostOnce);
        // A batch that would pass the size is sent first, whole.
        let big = vec![b'x'; super::LIVE_BATCH_BYTES / 2];
        assert!(add(&mut batch, &message("t", &big), 1, 1).is_none());
        let full = add(&mut batch, &message("t", &big), 1, 2).expect("sent when full");
        assert_eq!(full.0, "pcb.t");
        assert_eq!(read(&full.1, "t").len(), 1);
        let rest = drain(&mut batch);
        assert_eq!(rest.len(), 1);
        assert_eq!(super::batch_frames(&rest[0].1).next().unwrap().seq, 2);
        // A truncated batch yields its whole messages only; anything else none.
        let mut two = super::Batches::live();
        add(&mut two, &message("t", b"one"), 1, 1);
        add(&mut two, &message("t", b"two"), 1, 2);
        let payload = drain(&mut two).remove(0).1;
        assert_eq!(super::batch_frames(&payload).count(), 2);
        assert_eq!(
            super::batch_frames(&payload.slice(..payload.len() - 1)).count(),
            1
        );
        assert_eq!(super::batch_frames(&payload.slice(..3)).count(), 0);
        let plain = super::live_frame(&message("t", b"one"), 1, 1);
        assert_eq!(super::batch_frames(&plain).count(), 0);
    }

    #[test]
    fn stored_batches_carry_publishers_answer_them_together_and_older_nodes_drop_them() {
        let message = |topic: &str, payload: &[u8]| test_message(topic, payload, QoS::AtLeastOnce);
        let mut batch = super::Batches::stored();
        let mut waiting = Vec::new();
        for (seq, client) in [(5u64, Some("dev-1")), (6, None), (8, Some("dev-2"))] {
            let (tx, rx) = tokio::sync::oneshot::channel();
            waiting.push(rx);
            let mut m = message("a/b", format!("m{seq}").as_bytes());
            if seq == 8 {
                m.properties.content_type = Some("text/plain".into());
            }
            assert!(batch.add(&m, client, Some(tx), 3, seq).is_none());
        }
        let mut sealed = batch.drain();
        assert_eq!(sealed.len(), 1);
        let sealed = sealed.remove(0);
        assert_eq!((sealed.subject.as_str(), sealed.first), ("pcq.a.b", 5));
        // Every publisher of the batch is answered by the batch's acknowledgement.
        assert_eq!(sealed.replies.len(), 3);
        for reply in sealed.replies {
            reply.send(Ok(())).unwrap();
        }
        for mut rx in waiting {
            assert_eq!(rx.try_recv().unwrap(), Ok(()));
        }
        // As a node reads it from the stream: QoS 1, publishers and properties kept.
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(super::BATCH_HEADER, "1");
        headers.insert("Portcullis-Properties", super::expired_properties());
        let stored = async_nats::Message {
            subject: sealed.subject.clone().into(),
            reply: None,
            payload: sealed.payload.clone(),
            headers: Some(headers.clone()),
            status: None,
            description: None,
            length: sealed.payload.len(),
        };
        let published = std::time::SystemTime::now() - Duration::from_millis(5);
        let read = super::kept_messages(&stored, published);
        let summary: Vec<_> = read
            .iter()
            .map(|(m, client)| {
                (
                    m.topic.as_str(),
                    m.payload.clone(),
                    m.qos,
                    client.clone(),
                    m.properties.content_type.clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "a/b",
                    "m5".into(),
                    QoS::AtLeastOnce,
                    Some("dev-1".into()),
                    None
                ),
                ("a/b", "m6".into(), QoS::AtLeastOnce, None, None),
                (
                    "a/b",
                    "m8".into(),
                    QoS::AtLeastOnce,
                    Some("dev-2".into()),
                    Some("text/plain".into())
                ),
            ]
        );
        // A message stored alone is read as before, its publisher from its header.
        let mut alone = async_nats::HeaderMap::new();
        alone.insert("Portcullis-QoS", "1");
        alone.insert("Portcullis-Client", "dev-9");
        let single = async_nats::Message {
            headers: Some(alone),
            payload: "x".into(),
            ..stored.clone()
        };
        let read = super::kept_messages(&single, published);
        assert_eq!(read.len(), 1);
        assert_eq!(
            (read[0].0.qos, read[0].1.clone()),
            (QoS::AtLeastOnce, Some("dev-9".into()))
        );
        // A node before batches reads one message with an expiry of zero: dropped, never the
        // batch's bytes delivered (from a stream: expired; live: expired on arrival).
        assert!(
            super::message_of(
                "a/b".into(),
                Some(&headers),
                sealed.payload.clone(),
                Some(published)
            )
            .is_none()
        );
        let live = super::message_of("a/b".into(), Some(&headers), sealed.payload, None).unwrap();
        assert!(
            live.expires_at
                .is_some_and(|t| t <= std::time::Instant::now())
        );
        // The count bounds a stored batch (JetStream settles it whole).
        let mut many = super::Batches::stored();
        let sent: usize = (0..super::STORED_BATCH_MESSAGES as u64 * 2 + 1)
            .filter_map(|seq| many.add(&message("t", b"x"), None, None, 1, seq))
            .count();
        assert_eq!((sent, many.drain().len()), (2, 1));
    }

    /// Review of the live QoS 1 path: a topic's QoS 1 messages switch between crossing live
    /// and kept when a persistent session subscribes, and the two subjects are separate
    /// subscriptions: one node's messages taken together are handled in its order, the
    /// others' where they came.
    #[test]
    fn messages_taken_together_from_several_subjects_are_handled_in_their_publishers_order() {
        use super::{Batches, in_publish_order, live_frame};
        let message = |subject: &str, payload: bytes::Bytes| async_nats::Message {
            subject: subject.into(),
            reply: None,
            payload,
            headers: None,
            status: None,
            description: None,
            length: 0,
        };
        let m = test_message("t", b"x", QoS::AtLeastOnce);
        let batch = |mut b: Batches, origin: u64, seq: u64| {
            assert!(b.add(&m, Some("pub"), None, origin, seq).is_none());
            b.drain().remove(0).payload
        };
        let arrived = vec![
            // Node 1's kept batch (sequence 5) came before its live one (sequence 3).
            message("pcq.t", batch(Batches::stored(), 1, 5)),
            message("pcb.t", batch(Batches::live(), 2, 9)),
            message("pcm.t", bytes::Bytes::from_static(b"headers only")),
            message("pcb.t", batch(Batches::acknowledged(), 1, 3)),
            message("pcl.t", live_frame(&m, 2, 10)),
        ];
        assert_eq!(in_publish_order(&arrived), [3, 1, 2, 0, 4]);
        // In order already: as they came.
        assert_eq!(in_publish_order(&arrived[1..]), [0, 1, 2, 3]);
        // A message alone with headers carries its payload as it is, whatever its first bytes
        // (here those of a batch of node 1, sequence 1): it keeps its place.
        let mut alone = message("pcq.t", batch(Batches::stored(), 1, 1));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Portcullis-Origin", "n");
        alone.headers = Some(headers);
        let mut arrived = arrived;
        arrived.push(alone);
        assert_eq!(in_publish_order(&arrived), [3, 1, 2, 0, 4, 5]);
    }

    #[test]
    fn qos1_batches_wait_for_every_node_on_the_bus_to_read_them() {
        let node = |id: &str, version: &str, heartbeat_ms: i64, nats: bool| {
            portcullis_registry::NodeStatus {
                id: id.into(),
                version: version.into(),
                started_at: 0,
                heartbeat_ms,
                snapshot_marker: 0,
                snapshot_ms: 0,
                connections: 0,
                mqtt_sessions: 0,
                nats: nats.then(|| "connected to n1".to_string()),
            }
        };
        let now = 1_000_000;
        let ours = super::reported_version();
        assert!(ours.ends_with("+bus.5"));
        assert!(super::routes_understood(&[node("a", &ours, now, true)]));
        assert!(super::older_gone(&[node("a", &ours, now, true)]));
        let upgraded = vec![
            node("a", &ours, now, true),
            node("b", &ours, now - 3_000, true),
        ];
        assert!(super::batches_understood(&upgraded));
        assert!(super::live_understood(&upgraded));
        // A node of protocol 2 reads batches but expects every QoS 1 message kept.
        let mut two = upgraded.clone();
        two.push(node("f", "0.1.0+bus.2", now - 1_000, true));
        assert!(super::batches_understood(&two));
        assert!(!super::live_understood(&two));
        assert!(!super::routes_understood(&two));
        // A node of protocol 4 sends retained QoS 0 messages on their own subject: read there.
        let mut four = upgraded.clone();
        four.push(node("g", "0.1.0+bus.4", now - 1_000, true));
        assert!(super::routes_understood(&four));
        assert!(!super::older_gone(&four));
        // A node of a version before batches: one by one, whenever it was last heard of (it
        // may come back, and would drop the batches kept for its sessions).
        for last in [now - 1_000, now - 3_600_000] {
            let mut mixed = upgraded.clone();
            mixed.push(node("c", "0.1.0", last, true));
            assert!(!super::batches_understood(&mixed));
            assert!(!super::live_understood(&mixed));
        }
        // Not on the bus: it does not count.
        let mut off = upgraded.clone();
        off.push(node("d", "0.1.0", now, false));
        assert!(super::batches_understood(&off));
        // A later protocol reads batches too.
        let mut later = upgraded;
        later.push(node("e", "0.2.0+bus.6", now, true));
        assert!(super::batches_understood(&later));
        assert!(super::live_understood(&later));
        assert!(super::routes_understood(&later));
        assert!(super::older_gone(&later));
    }
}
