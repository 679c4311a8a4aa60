//! Which nodes want which topics' QoS 0 messages: the cluster's route table.
//!
//! Every node writes the filters its sessions hold into the routes bucket (key
//! `NODE.FILTER-HASH`, value the filter; `NODE.node` names the node's instance) and watches the
//! bucket whole. A node sending a QoS 0 message looks its topic up here and sends it in one
//! batch per destination node (on `pcn.NODE`), many topics to a NATS message, instead of one
//! NATS message per topic: a fleet's devices each publish to their own topic, and batches by
//! topic then carry one message each.
//!
//! A topic goes the earlier way, on its own subject (which every node still subscribes to by
//! filter, so that NATS itself routes it), when this node cannot be sure of its destinations:
//! - the table is not read whole yet (since the watch (re)started);
//! - no other node is known to want it (a subscription made a moment ago on another node may
//!   not have reached this table yet: NATS routes it by that node's own subscription);
//! - a shared subscription's filter matches it (its group's members take turns through NATS
//!   queue subscriptions on the topic's subject);
//! - a node of an earlier version is up (it reads topics' subjects only).
//!
//! A message goes one way only, so no node receives it twice. A subscription's SUBACK waits until
//! its filter is in the bucket and every other node has taken it into its table (told directly on
//! `pcw.NODE`, whether or not its watch of the bucket has caught up): what is published anywhere
//! after the SUBACK reaches it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use portcullis_mqtt::tree::SubscriptionTree;

/// Where a topic's QoS 0 messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// On the topic's own subject (NATS routes it by subscription).
    Topic,
    /// To these nodes, in their batches (sorted, never this node).
    Nodes(std::sync::Arc<[u64]>),
}

/// The cluster's route table as this node knows it.
#[derive(Default)]
pub(crate) struct Routes {
    /// The bucket read whole since the watch (re)started.
    ready: AtomicBool,
    /// Bumped on every change: routes remembered by topic are stale.
    generation: AtomicU64,
    inner: RwLock<Table>,
    /// Woken on every change (a subscription's SUBACK waits for its own entry).
    changed: tokio::sync::Notify,
    /// This node (see [`Routes::set_own`]).
    own: AtomicU64,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("ready", &self.ready.load(Ordering::Relaxed))
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Table {
    /// Ordinary filters; the value is the node.
    plain: SubscriptionTree<u64>,
    /// Shared subscriptions' filters (without `$share/GROUP/`).
    shared: SubscriptionTree<u64>,
    /// Per key: the node, and the filter as written.
    by_key: HashMap<String, (u64, String)>,
    /// Per node: its instance (from its `NODE.node` key).
    instances: HashMap<u64, String>,
    /// Entries a node told this one of directly ([`Routes::told`]), not yet read from the
    /// bucket: when.
    told: HashMap<String, std::time::Instant>,
}

/// Where a change of the table comes from.
#[derive(Clone, Copy)]
enum Source {
    /// The bucket's watch.
    Bucket,
    /// A node asking for its SUBACK.
    Told,
    /// A told entry never read from the bucket, going.
    Forgotten,
}

/// The key of `filter` held by `node` in the routes bucket: the node, and 128 bits of the
/// filter's SHA-256 (no two filters a client can choose share a key).
pub(crate) fn key(node: u64, filter: &str) -> String {
    use std::fmt::Write as _;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, filter.as_bytes());
    let mut key = format!("{node:016x}.");
    for b in &digest.as_ref()[..16] {
        let _ = write!(key, "{b:02x}");
    }
    key
}

/// The key naming `node`'s instance.
pub(crate) fn instance_key(node: u64) -> String {
    format!("{node:016x}.node")
}

/// The node a key belongs to.
fn node_of(key: &str) -> Option<u64> {
    let (node, _) = key.split_once('.')?;
    u64::from_str_radix(node, 16).ok()
}

impl Routes {
    /// This node is `node`: its own ordinary filters stay out of the tree that routes (nothing is
    /// sent to itself), a third of the table's memory in a cluster of three.
    pub(crate) fn set_own(&self, node: u64) {
        self.own.store(node, Ordering::Release);
    }

    /// Key `key` now holds `value` (`None`: it went), as the bucket says.
    pub(crate) fn set(&self, key: &str, value: Option<&str>) {
        self.apply(key, value, Source::Bucket);
    }

    /// A node asking for its SUBACK ([`super::ROUTE_SYNC`]) tells this one that it holds
    /// `filter` under `key`, written into the bucket already: taken at once, so that its
    /// subscriber gets what this node publishes after the SUBACK even while this node's watch
    /// of the bucket lags. An entry told and never read from the bucket (its filter dropped at
    /// once) goes after a while ([`Routes::forget_told`]).
    pub(crate) fn told(&self, key: &str, filter: &str) {
        if node_of(key).is_some_and(|node| key == self::key(node, filter)) {
            self.apply(key, Some(filter), Source::Told);
        }
    }

    /// Entries told more than `after` ago and never read from the bucket go.
    pub(crate) fn forget_told(&self, after: std::time::Duration) {
        let stale: Vec<String> = {
            let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
            inner
                .told
                .iter()
                .filter(|(_, at)| at.elapsed() >= after)
                .map(|(k, _)| k.clone())
                .collect()
        };
        for key in stale {
            self.apply(&key, None, Source::Forgotten);
        }
    }

    fn apply(&self, key: &str, value: Option<&str>, from: Source) {
        let Some(node) = node_of(key) else {
            return;
        };
        let own = self.own.load(Ordering::Acquire);
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let Table {
            plain,
            shared,
            by_key,
            instances,
            told: told_keys,
        } = &mut *inner;
        match from {
            Source::Told => {
                if by_key.contains_key(key) {
                    return;
                }
                told_keys.insert(key.to_string(), std::time::Instant::now());
            }
            // Read from the bucket since: it stays as the bucket says.
            Source::Forgotten if told_keys.remove(key).is_none() => return,
            Source::Forgotten => {}
            Source::Bucket => {
                told_keys.remove(key);
            }
        }
        if key.ends_with(".node") {
            match value {
                Some(instance) => instances.insert(node, instance.to_string()),
                None => instances.remove(&node),
            };
            return;
        }
        if let Some((_, old)) = by_key.remove(key) {
            if value == Some(old.as_str()) {
                by_key.insert(key.to_string(), (node, old));
                return;
            }
            match portcullis_mqtt::topic::shared(&old) {
                Ok(Some((_, inner))) => shared.remove(inner, key),
                _ if node == own => false,
                _ => plain.remove(&old, key),
            };
        }
        if let Some(filter) = value.filter(|f| portcullis_mqtt::topic::check_filter(f).is_ok()) {
            match portcullis_mqtt::topic::shared(filter) {
                Ok(Some((_, inner))) => shared.insert(inner, key, node),
                // (A shared group's here counts: its topics go on their subjects.)
                _ if node == own => {}
                _ => plain.insert(filter, key, node),
            }
            by_key.insert(key.to_string(), (node, filter.to_string()));
        }
        drop(inner);
        self.generation.fetch_add(1, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// The watch starts again: nothing known, every topic on its own subject until it has read
    /// the bucket.
    pub(crate) fn reset(&self) {
        self.ready.store(false, Ordering::Release);
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        *inner = Table::default();
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The bucket read whole; true if it was not ready before.
    pub(crate) fn set_ready(&self) -> bool {
        let became = !self.ready.swap(true, Ordering::AcqRel);
        if became {
            self.generation.fetch_add(1, Ordering::Release);
            self.changed.notify_waiters();
        }
        became
    }

    /// Whether the bucket was read whole since the watch (re)started.
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The keys of `node`'s entries (its instance's key included, if known).
    pub(crate) fn keys_of(&self, node: u64) -> Vec<String> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let mut keys: Vec<String> = inner
            .by_key
            .iter()
            .filter(|(_, (n, _))| *n == node)
            .map(|(k, _)| k.clone())
            .collect();
        if inner.instances.contains_key(&node) {
            keys.push(instance_key(node));
        }
        keys
    }

    /// Changes so far (see [`Routes::route`]).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Where `topic`'s QoS 0 messages go from node `own`.
    pub(crate) fn route(&self, topic: &str, own: u64) -> Route {
        if !self.ready.load(Ordering::Acquire) {
            return Route::Topic;
        }
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        if !inner.shared.matching(topic).is_empty() {
            return Route::Topic;
        }
        let mut nodes: Vec<u64> = inner
            .plain
            .matching(topic)
            .into_iter()
            .map(|(_, n)| *n)
            .filter(|n| *n != own)
            .collect();
        if nodes.is_empty() {
            return Route::Topic;
        }
        nodes.sort_unstable();
        nodes.dedup();
        Route::Nodes(nodes.into())
    }

    /// Whether this node's table holds `key` (read whole, so every node's is about as far).
    pub(crate) fn holds(&self, key: &str) -> bool {
        self.ready.load(Ordering::Acquire)
            && self
                .inner
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .by_key
                .contains_key(key)
    }

    /// Waits until the table holds `key`, at most `within`.
    pub(crate) async fn wait_for(&self, key: &str, within: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.holds(key) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.holds(key);
            }
        }
    }

    /// The nodes other than `own` with entries, with their instance if known, and their keys.
    pub(crate) fn others(&self, own: u64) -> Vec<(u64, Option<String>, Vec<String>)> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let mut by_node: HashMap<u64, Vec<String>> = HashMap::new();
        for (key, (node, _)) in &inner.by_key {
            if *node != own {
                by_node.entry(*node).or_default().push(key.clone());
            }
        }
        for node in inner.instances.keys() {
            if *node != own {
                by_node.entry(*node).or_default();
            }
        }
        by_node
            .into_iter()
            .map(|(node, mut keys)| {
                if inner.instances.contains_key(&node) {
                    keys.push(instance_key(node));
                }
                (node, inner.instances.get(&node).cloned(), keys)
            })
            .collect()
    }

    /// The nodes other than `own` whose instance is known.
    pub(crate) fn other_nodes(&self, own: u64) -> Vec<u64> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner
            .instances
            .keys()
            .copied()
            .filter(|n| *n != own)
            .collect()
    }

    /// Entries known (filters of every node).
    pub(crate) fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_key
            .len()
    }
}

/// The first byte of a batch for nodes.
pub(super) const NODES_FRAME: u8 = 0xC4;

/// A batch for nodes is sent once it reaches this size (a single larger message alone).
const NODE_BATCH_BYTES: usize = 256 * 1024;

/// QoS 0 messages of one flush for other nodes, a batch per set of destination nodes (every
/// message of a topic goes to the same set until the table changes, so a topic's messages keep
/// their order): many topics to one NATS message per node.
///
/// A batch: [`NODES_FRAME`], the origin (u64) and the first message's sequence (u64,
/// big-endian), then per message its topic (a varint: 0 for a topic not in this batch yet,
/// followed by its length and bytes; n for the batch's n-th topic), its sequence's distance
/// from the previous one, flags (bit 0: retain), the MQTT 5 properties and the payload, each
/// length and distance a LEB128 varint.
#[derive(Default)]
pub(super) struct NodeBatches {
    sets: Vec<SetBatch>,
}

struct SetBatch {
    to: Arc<[u64]>,
    bytes: bytes::BytesMut,
    /// What its messages take once read back (each with its topic).
    decoded: usize,
    /// Topics named in the batch so far.
    named: u64,
    last: u64,
    /// The batch's topics by hash: their number (from 1, in the order they came) and where
    /// their name is in `bytes` (compared there: no copy of each name).
    topics: HashMap<u64, (u64, usize, usize)>,
}

/// A batch ready to send to each of `to`.
pub(super) struct ForNodes {
    pub(super) to: Arc<[u64]>,
    pub(super) payload: bytes::Bytes,
}

impl SetBatch {
    fn seal(&mut self) -> ForNodes {
        self.topics.clear();
        self.decoded = 0;
        self.named = 0;
        ForNodes {
            to: self.to.clone(),
            payload: std::mem::take(&mut self.bytes).freeze(),
        }
    }
}

impl NodeBatches {
    /// Adds `m` for the nodes `to`; a batch that would grow past [`NODE_BATCH_BYTES`] is
    /// returned to be sent first. (The sets stay, emptied, from one flush to the next: their
    /// buffers and topic maps are not made again for each.)
    pub(super) fn add(
        &mut self,
        to: &Arc<[u64]>,
        m: &super::Message,
        origin: u64,
        seq: u64,
    ) -> Option<ForNodes> {
        use bytes::BufMut;
        let i = match self
            .sets
            .iter()
            .position(|s| Arc::ptr_eq(&s.to, to) || s.to == *to)
        {
            Some(i) => i,
            None => {
                self.sets.push(SetBatch {
                    to: to.clone(),
                    bytes: bytes::BytesMut::new(),
                    decoded: 0,
                    named: 0,
                    last: seq,
                    topics: HashMap::new(),
                });
                self.sets.len() - 1
            }
        };
        let set = &mut self.sets[i];
        let properties = super::wire_properties(m).unwrap_or_default();
        let len = 5 * 10 + 1 + m.topic.len() + properties.len() + m.payload.len();
        let full =
            (!set.bytes.is_empty() && set.decoded + len > NODE_BATCH_BYTES).then(|| set.seal());
        set.decoded += len;
        let out = &mut set.bytes;
        if out.is_empty() {
            out.reserve((17 + len).max(32 * 1024));
            out.put_u8(NODES_FRAME);
            out.put_u64(origin);
            out.put_u64(seq);
            set.last = seq;
        }
        out.reserve(len);
        let hash = super::fnv(m.topic.as_bytes());
        match set.topics.get(&hash) {
            Some((n, at, len)) if out.get(*at..at + len) == Some(m.topic.as_bytes()) => {
                super::put_varint(out, *n);
            }
            known => {
                // New to this batch (or another topic with the same hash: named again, and
                // the first keeps the hash).
                let collided = known.is_some();
                super::put_varint(out, 0);
                super::put_varint(out, m.topic.len() as u64);
                let at = out.len();
                out.put_slice(m.topic.as_bytes());
                set.named += 1;
                if !collided {
                    set.topics.insert(hash, (set.named, at, m.topic.len()));
                }
            }
        }
        super::put_varint(out, seq - set.last);
        set.last = seq;
        out.put_u8(u8::from(m.retain));
        super::put_varint(out, properties.len() as u64);
        out.put_slice(&properties);
        super::put_varint(out, m.payload.len() as u64);
        out.put_slice(&m.payload);
        full
    }

    /// Every set's batch, in the order the sets came.
    pub(super) fn drain(&mut self) -> Vec<ForNodes> {
        let sealed = self
            .sets
            .iter_mut()
            .filter(|s| !s.bytes.is_empty())
            .map(SetBatch::seal)
            .collect();
        if self.sets.len() > 16 {
            // Destinations come and go: the sets are not kept beyond a few.
            self.sets.clear();
        }
        sealed
    }
}

/// A batch for nodes read back: its origin, and its messages in order; stops at the first malformed message, or where its topics
/// read back would take more than a sender makes a batch take (a topic named once and repeated in
/// many tiny messages must not cost gigabytes).
pub(super) fn read_node_batch(batch: &bytes::Bytes) -> Option<(u64, Vec<super::Message>)> {
    if batch.len() < 17 || batch[0] != NODES_FRAME {
        return None;
    }
    let u64_at = |i: usize| u64::from_be_bytes(batch[i..i + 8].try_into().unwrap_or_default());
    let origin = u64_at(1);
    let mut seq = u64_at(9);
    let mut at = 17;
    let mut topics: Vec<String> = Vec::new();
    let mut messages: Vec<super::Message> = Vec::new();
    let mut topic_bytes: usize = 0;
    let most = NODE_BATCH_BYTES + batch.len();
    let slice = |at: &mut usize| {
        let n = usize::try_from(super::read_varint(batch, at)?).ok()?;
        let end = at.checked_add(n).filter(|e| *e <= batch.len())?;
        let part = batch.slice(*at..end);
        *at = end;
        Some(part)
    };
    while at < batch.len() {
        let Some(reference) = super::read_varint(batch, &mut at) else {
            break;
        };
        let t = if reference == 0 {
            let Some(name) = slice(&mut at) else {
                break;
            };
            let Some(topic) = std::str::from_utf8(&name)
                .ok()
                .filter(|t| portcullis_mqtt::topic::check_name(t).is_ok())
            else {
                break;
            };
            topics.push(topic.to_string());
            topics.len() - 1
        } else {
            match usize::try_from(reference - 1)
                .ok()
                .filter(|t| *t < topics.len())
            {
                Some(t) => t,
                None => break,
            }
        };
        topic_bytes = topic_bytes.saturating_add(topics[t].len());
        if topic_bytes > most {
            break;
        }
        let Some(delta) = super::read_varint(batch, &mut at) else {
            break;
        };
        seq = match seq.checked_add(delta) {
            Some(s) => s,
            None => break,
        };
        let Some(&flags) = batch.get(at) else {
            break;
        };
        at += 1;
        let (Some(properties), Some(payload)) = (slice(&mut at), slice(&mut at)) else {
            break;
        };
        let frame = super::LiveFrame {
            origin,
            seq,
            qos: super::QoS::AtMostOnce,
            retain: flags & 1 == 1,
            client: None,
            properties,
            payload,
        };
        if let Some(message) = frame.message(topics[t].clone(), None) {
            messages.push(message);
        }
    }
    Some((origin, messages))
}

#[cfg(test)]
mod tests {
    use super::{NodeBatches, Route, Routes, instance_key, key, read_node_batch};

    #[test]
    fn topics_go_to_the_nodes_whose_filters_match_and_on_their_own_subject_when_unsure() {
        let routes = Routes::default();
        let (own, b, c) = (1u64, 2u64, 3u64);
        routes.set_own(own);
        routes.set(&key(b, "fleet/+/telemetry"), Some("fleet/+/telemetry"));
        // Not read whole yet: every topic on its own subject.
        assert_eq!(routes.route("fleet/7/telemetry", own), Route::Topic);
        assert!(routes.set_ready());
        assert!(!routes.set_ready());
        let only_b: std::sync::Arc<[u64]> = vec![b].into();
        assert_eq!(
            routes.route("fleet/7/telemetry", own),
            Route::Nodes(only_b.clone())
        );
        // Nobody known: its own subject (a subscription made a moment ago may be on its way).
        assert_eq!(routes.route("other/topic", own), Route::Topic);
        // Two filters of one node and one of another: each node once, sorted.
        routes.set(&key(c, "fleet/#"), Some("fleet/#"));
        routes.set(&key(b, "fleet/7/+"), Some("fleet/7/+"));
        assert_eq!(
            routes.route("fleet/7/telemetry", own),
            Route::Nodes(vec![b, c].into())
        );
        // This node's own filters count for nothing: no other node known, its own subject.
        routes.set(&key(own, "mine/#"), Some("mine/#"));
        assert_eq!(routes.route("mine/x", own), Route::Topic);
        assert!(routes.holds(&key(own, "mine/#")));
        // ... kept out of the tree that routes, but held and let go as the bucket says.
        assert!(
            routes
                .inner
                .read()
                .unwrap()
                .plain
                .matching("mine/x")
                .is_empty()
        );
        routes.set(&key(b, "mine/+"), Some("mine/+"));
        assert_eq!(routes.route("mine/x", own), Route::Nodes(only_b.clone()));
        routes.set(&key(b, "mine/+"), None);
        routes.set(&key(own, "mine/#"), None);
        assert!(!routes.holds(&key(own, "mine/#")));
        assert_eq!(routes.route("mine/x", own), Route::Topic);
        // A shared group's filter: the topic's own subject (its queue subscriptions).
        let before = routes.generation();
        routes.set(
            &key(c, "$share/g/fleet/+/alerts"),
            Some("$share/g/fleet/+/alerts"),
        );
        assert!(routes.generation() > before);
        assert_eq!(routes.route("fleet/7/alerts", own), Route::Topic);
        assert_eq!(
            routes.route("fleet/7/telemetry", own),
            Route::Nodes(vec![b, c].into())
        );
        // A filter gone: its node no longer gets the topic.
        routes.set(&key(c, "fleet/#"), None);
        assert_eq!(
            routes.route("fleet/7/telemetry", own),
            Route::Nodes(only_b.clone())
        );
        assert!(routes.holds(&key(b, "fleet/7/+")));
        assert!(!routes.holds(&key(c, "fleet/#")));
        // Writing the same value again changes nothing.
        let before = routes.generation();
        routes.set(&key(b, "fleet/7/+"), Some("fleet/7/+"));
        assert_eq!(routes.generation(), before);
        // Instances and keys per node (for the sweep of nodes that are gone).
        routes.set(&instance_key(b), Some("node-b#1"));
        let mut others = routes.others(own);
        others.sort();
        assert_eq!(others.len(), 2);
        assert_eq!(others[0].0, b);
        assert_eq!(others[0].1.as_deref(), Some("node-b#1"));
        assert_eq!(others[0].2.len(), 3);
        // `$` topics are not matched by a leading wildcard.
        routes.set(&key(b, "#"), Some("#"));
        assert_eq!(routes.route("$SYS/x", own), Route::Topic);
        // Nonsense is ignored.
        routes.set("not-a-key", Some("a/b"));
        routes.set(&key(b, "bad"), Some("a/#/b"));
        assert_eq!(routes.route("a/x/b", own), Route::Nodes(only_b.clone()));
        // The watch starts again: unsure of everything.
        routes.reset();
        assert_eq!(routes.route("fleet/7/telemetry", own), Route::Topic);
        assert_eq!(routes.len(), 0);
    }

    fn message(topic: &str, payload: &str) -> crate::bus::Message {
        crate::bus::arrived_message(
            topic.to_string(),
            bytes::Bytes::copy_from_slice(payload.as_bytes()),
            crate::bus::QoS::AtMostOnce,
            false,
            Default::default(),
            None,
        )
        .unwrap()
    }

    #[test]
    fn batches_for_nodes_carry_many_topics_each_in_order_and_read_back_whole() {
        let mut batches = NodeBatches::default();
        let to_b: std::sync::Arc<[u64]> = vec![2].into();
        let to_bc: std::sync::Arc<[u64]> = vec![2, 3].into();
        let mut sent = Vec::new();
        for i in 0..300u64 {
            let topic = format!("fleet/{}/telemetry", i % 7);
            let to = if i % 7 == 3 { &to_bc } else { &to_b };
            sent.extend(batches.add(to, &message(&topic, &format!("m{i}")), 9, 100 + i));
        }
        // A topic added to a batch at its limit seals it first.
        let big = "x".repeat(super::NODE_BATCH_BYTES / 2);
        sent.extend(batches.add(&to_b, &message("big/one", &big), 9, 1000));
        sent.extend(batches.add(&to_b, &message("big/one", &big), 9, 1001));
        assert_eq!(sent.len(), 1);
        sent.extend(batches.drain());
        assert!(batches.drain().is_empty());
        // Two for B (the first sealed by the big message), one for B and C.
        assert_eq!(sent.len(), 3);
        let mut by_topic: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for batch in &sent {
            let (origin, messages) = read_node_batch(&batch.payload).unwrap();
            assert_eq!(origin, 9);
            for m in messages {
                by_topic
                    .entry(m.topic.clone())
                    .or_default()
                    .push(String::from_utf8_lossy(&m.payload).into_owned());
            }
        }
        for t in 0..7u64 {
            let want: Vec<String> = (0..300u64)
                .filter(|i| i % 7 == t)
                .map(|i| format!("m{i}"))
                .collect();
            assert_eq!(by_topic[&format!("fleet/{t}/telemetry")], want);
        }
        assert_eq!(by_topic["big/one"].len(), 2);
        // Truncated or nonsense: what came before the damage, never a panic.
        let whole = &sent[1].payload;
        for cut in 0..whole.len() {
            let _ = read_node_batch(&whole.slice(..cut));
        }
        assert!(read_node_batch(&bytes::Bytes::from_static(b"\xc4short")).is_none());
        // One long topic named once, then repeated by number in a million tiny messages:
        // read back only as far as a sender's batch would go.
        let mut flood = bytes::BytesMut::new();
        {
            use bytes::BufMut;
            flood.put_u8(super::NODES_FRAME);
            flood.put_u64(7);
            flood.put_u64(1);
            let topic = "t".repeat(60_000);
            crate::bus::put_varint(&mut flood, 0);
            crate::bus::put_varint(&mut flood, topic.len() as u64);
            flood.put_slice(topic.as_bytes());
            flood.put_slice(&[0, 0, 0, 0]);
            for _ in 0..1_000_000 {
                flood.put_slice(&[1, 0, 0, 0, 0]);
            }
        }
        let flood = flood.freeze();
        let (_, read) = read_node_batch(&flood).unwrap();
        let read = read.len();
        assert!(
            read * 60_000 <= super::NODE_BATCH_BYTES + flood.len(),
            "{read}"
        );
        let mut bad = whole.to_vec();
        bad[17] = 0x7f; // a topic number never given
        let (_, read) = read_node_batch(&bytes::Bytes::from(bad)).unwrap();
        assert!(read.is_empty());
    }

    #[test]
    fn an_entry_told_by_its_node_routes_at_once_and_goes_unless_the_bucket_has_it() {
        let routes = Routes::default();
        assert!(routes.set_ready());
        let (own, b) = (1u64, 2u64);
        // A key that is not the filter's is ignored.
        routes.told(&key(b, "other"), "fleet/#");
        assert_eq!(routes.route("fleet/1", own), Route::Topic);
        routes.told(&key(b, "fleet/#"), "fleet/#");
        assert_eq!(routes.route("fleet/1", own), Route::Nodes(vec![b].into()));
        // Read from the bucket since: kept when told entries are forgotten.
        routes.set(&key(b, "fleet/#"), Some("fleet/#"));
        routes.told(&key(b, "jobs/#"), "jobs/#");
        routes.forget_told(std::time::Duration::ZERO);
        assert_eq!(routes.route("fleet/1", own), Route::Nodes(vec![b].into()));
        // Never read from the bucket: gone.
        assert_eq!(routes.route("jobs/1", own), Route::Topic);
        // Deleted in the bucket: gone.
        routes.set(&key(b, "fleet/#"), None);
        assert_eq!(routes.route("fleet/1", own), Route::Topic);
    }

    #[tokio::test]
    async fn a_subscription_waits_until_its_own_entry_is_in_the_table() {
        let routes = std::sync::Arc::new(Routes::default());
        let k = key(5, "a/b");
        assert!(
            !routes
                .wait_for(&k, std::time::Duration::from_millis(10))
                .await
        );
        let waiting = {
            let routes = routes.clone();
            let k = k.clone();
            tokio::spawn(async move {
                routes
                    .wait_for(&k, std::time::Duration::from_secs(30))
                    .await
            })
        };
        routes.set(&k, Some("a/b"));
        assert!(routes.set_ready());
        assert!(waiting.await.unwrap());
    }
}
