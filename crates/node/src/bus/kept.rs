//! Which topics the cluster keeps QoS 1 messages of.
//!
//! JetStream keeps a QoS 1 message (three copies, before its PUBACK) only for someone who may
//! need it later: a persistent session (online or not, on any node) subscribed at QoS 1 or 2 to
//! a matching filter, or a shared subscription's group (its consumer balances the group's
//! messages across the nodes). Every other QoS 1 message crosses NATS live, as QoS 0 messages
//! do, and its publisher gets its PUBACK once the message is on its way to NATS: a subscriber
//! without a persistent session loses what it had not acknowledged when its connection or its
//! node goes, with or without a cluster.
//!
//! Every node learns the filters from the sessions bucket (the persistent sessions' records,
//! which list their subscriptions) and the shared groups bucket, watched. Until a node has read
//! both since it (re)started watching, it keeps every QoS 1 message. A node that had not yet
//! learned of a subscription made a moment ago on another node sends its messages live; the
//! subscription's node then stores them itself (see `Node::keep_late`).

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use portcullis_mqtt::tree::SubscriptionTree;

/// The filters whose QoS 1 messages the cluster keeps, as this node knows them.
#[derive(Default)]
pub(crate) struct KeptInterest {
    /// Both buckets read whole since the watch (re)started: until then everything is kept.
    ready: AtomicBool,
    /// Bumped on every change: decisions remembered by topic are stale.
    generation: AtomicU64,
    inner: RwLock<Filters>,
}

impl std::fmt::Debug for KeptInterest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptInterest")
            .field("ready", &self.ready.load(Ordering::Relaxed))
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Filters {
    tree: SubscriptionTree<()>,
    /// Per bucket entry (`s:KEY` a session's, `g:KEY` a shared group's), the life it belongs to
    /// (a session's incarnation) and the filters it holds.
    by_entry: HashMap<String, (u64, Vec<String>)>,
}

impl KeptInterest {
    /// Entry `entry` now holds `filters` (none: it went).
    pub(crate) fn set(&self, entry: &str, filters: Vec<String>) {
        self.replace(entry, 0, filters, false);
    }

    /// A persistent session's record (`incarnation`: its life) lists `filters`: added to what
    /// the same life listed before, never taken from it. A session resumed on another node
    /// has its record written again as its subscriptions come back one by one, and the
    /// filters not back yet must stay kept meanwhile; a filter the session unsubscribed from
    /// stays kept until the session ends (kept for nobody: a cost, not a loss).
    pub(crate) fn grow(&self, entry: &str, incarnation: u64, filters: Vec<String>) {
        self.replace(entry, incarnation, filters, true);
    }

    fn replace(&self, entry: &str, incarnation: u64, filters: Vec<String>, grow: bool) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let Filters { tree, by_entry } = &mut *inner;
        let (life, old) = by_entry.remove(entry).unwrap_or_default();
        let mut filters = filters;
        if grow && life == incarnation {
            filters.extend(old.iter().cloned());
            filters.sort();
            filters.dedup();
        }
        if old == filters {
            if !filters.is_empty() {
                by_entry.insert(entry.to_string(), (incarnation, filters));
            }
            return;
        }
        for filter in &old {
            tree.remove(filter, entry);
        }
        for filter in &filters {
            tree.insert(filter, entry, ());
        }
        if !filters.is_empty() {
            by_entry.insert(entry.to_string(), (incarnation, filters));
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The watch starts again: nothing known, everything kept until it has read both buckets.
    pub(crate) fn reset(&self) {
        self.ready.store(false, Ordering::Release);
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        *inner = Filters::default();
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Both buckets read whole; true if it was not ready before.
    pub(crate) fn set_ready(&self) -> bool {
        let became = !self.ready.swap(true, Ordering::AcqRel);
        if became {
            self.generation.fetch_add(1, Ordering::Release);
        }
        became
    }

    /// Changes so far (see [`KeptInterest::must_keep`]).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a QoS 1 message of `topic` must be kept: a kept filter matches it, or this node
    /// does not know yet.
    pub(crate) fn must_keep(&self, topic: &str) -> bool {
        if !self.ready.load(Ordering::Acquire) {
            return true;
        }
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        !inner.tree.matching(topic).is_empty()
    }
}

/// The filters a persistent session's record (the sessions bucket's JSON) keeps messages for:
/// its subscriptions at QoS 1 or 2, and its shared subscriptions' filters (their groups keep
/// them); with the session's incarnation. A value that is no session record holds none.
pub(crate) fn record_filters(value: &[u8]) -> (u64, Vec<String>) {
    let Ok(record) = serde_json::from_slice::<serde_json::Value>(value) else {
        return (0, Vec::new());
    };
    let incarnation = record["incarnation"].as_u64().unwrap_or(0);
    let mut filters: Vec<String> = record["subscriptions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let filter = s["filter"].as_str()?;
            match portcullis_mqtt::topic::shared(filter) {
                Ok(Some((_, inner))) => Some(inner.to_string()),
                Ok(None) if s["qos"].as_u64().unwrap_or(1) > 0 => Some(filter.to_string()),
                _ => None,
            }
        })
        .collect();
    filters.sort();
    filters.dedup();
    (incarnation, filters)
}

#[cfg(test)]
mod tests {
    use super::{KeptInterest, record_filters};

    #[test]
    fn a_persistent_sessions_qos1_and_shared_filters_are_kept_and_nothing_before_the_watch_read_all()
     {
        let kept = KeptInterest::default();
        // Not read yet: everything is kept.
        assert!(kept.must_keep("any/topic"));
        let _ = kept.set_ready();
        assert!(!kept.must_keep("any/topic"));
        let record = br#"{"identity":"x","incarnation":7,"subscriptions":[
            {"filter":"fleet/+/alerts","qos":1},
            {"filter":"fleet/+/status","qos":0},
            {"filter":"$share/workers/jobs/#","qos":0},
            {"filter":"exact/topic","qos":2}]}"#;
        let (incarnation, filters) = record_filters(record);
        assert_eq!(incarnation, 7);
        assert_eq!(filters, ["exact/topic", "fleet/+/alerts", "jobs/#"]);
        kept.grow("s:dev-1", 7, filters);
        // The same life written again with fewer filters (resumed on another node, its
        // subscriptions coming back one by one): the others stay kept.
        kept.grow("s:dev-1", 7, vec!["exact/topic".to_string()]);
        assert!(kept.must_keep("fleet/7/alerts"));
        assert!(!kept.must_keep("fleet/7/status"));
        assert!(kept.must_keep("jobs/a/b"));
        assert!(kept.must_keep("exact/topic"));
        // Another entry with an overlapping filter: the filter stays while either holds it.
        let before = kept.generation();
        kept.set("g:1234", vec!["jobs/#".to_string()]);
        assert!(kept.generation() > before);
        // A new life of the session replaces what the old one listed.
        kept.grow("s:dev-1", 8, vec!["exact/topic".to_string()]);
        assert!(!kept.must_keep("fleet/7/alerts"));
        assert!(kept.must_keep("exact/topic"));
        kept.set("s:dev-1", Vec::new());
        assert!(!kept.must_keep("exact/topic"));
        assert!(kept.must_keep("jobs/a"));
        kept.set("g:1234", Vec::new());
        assert!(!kept.must_keep("jobs/a"));
        // Setting the same filters again changes nothing.
        kept.set("s:dev-2", vec!["a/b".to_string()]);
        let before = kept.generation();
        kept.set("s:dev-2", vec!["a/b".to_string()]);
        assert_eq!(kept.generation(), before);
        assert!(kept.must_keep("a/b"));
        // The watch starts again: everything kept until it has read the buckets.
        kept.reset();
        assert!(kept.must_keep("c/d"));
        let _ = kept.set_ready();
        assert!(!kept.must_keep("a/b"));
        // Values that are no session record hold nothing.
        assert!(record_filters(b"not json").1.is_empty());
        assert!(record_filters(br#"{"lease":"node"}"#).1.is_empty());
    }
}
