//! MQTT across nodes on NATS: what this node's clients publish goes to a NATS subject made from
//! its topic, and this node subscribes only to the subjects its own sessions' filters need
//! (interest-based: no node receives every message). Messages from NATS are delivered to this
//! node's sessions by the broker, which still asks `mqtt:Receive` of each session.
//!
//! Topics map to subjects level by level: `pcm.` then each level escaped (`%XX` for `.`, `*`,
//! `>`, `%`, space, control and non-ASCII bytes; a lone `%` for an empty level), so every legal
//! MQTT topic round-trips. `+` becomes `*`; a trailing `#` becomes `>` plus its parent level.
//!
//! This first slice routes QoS 0 and 1 messages between online sessions through core NATS
//! (at most once between nodes); client-id takeover, persistent sessions and retained messages
//! across nodes are still per node.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use portcullis_mqtt::broker::{Bridge, Broker, Message};
use portcullis_mqtt::codec::{PublishProperties, QoS};
use tokio::sync::mpsc;

/// The subject prefix of routed MQTT messages.
const PREFIX: &str = "pcm";

/// Messages waiting for NATS at most; beyond, new ones are dropped (counted).
const QUEUE: usize = 10_000;

/// Message ids remembered to drop a message two overlapping subscriptions both delivered.
const SEEN: usize = 10_000;

/// A topic's NATS subject.
pub(crate) fn subject(topic: &str) -> String {
    let mut out = String::from(PREFIX);
    for level in topic.split('/') {
        out.push('.');
        if level.is_empty() {
            out.push('%');
            continue;
        }
        for b in level.bytes() {
            match b {
                b'.' | b'*' | b'>' | b'%' | b' ' => out.push_str(&format!("%{b:02X}")),
                0x21..=0x7e => out.push(char::from(b)),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
    }
    out
}

/// The topic of a subject made by [`subject`]; `None` for anything else.
pub(crate) fn topic(subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(PREFIX)?.strip_prefix('.')?;
    let mut levels = Vec::new();
    for token in rest.split('.') {
        if token == "%" {
            levels.push(String::new());
            continue;
        }
        let bytes = token.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        levels.push(String::from_utf8(out).ok()?);
    }
    Some(levels.join("/"))
}

/// The NATS subjects a topic filter needs (a trailing `#` also matches its parent level).
pub(crate) fn filter_subjects(filter: &str) -> Vec<String> {
    let levels: Vec<&str> = filter.split('/').collect();
    let mut tokens = Vec::new();
    for (i, level) in levels.iter().enumerate() {
        match *level {
            "+" => tokens.push("*".to_string()),
            "#" if i == levels.len() - 1 => {
                let parent = tokens.clone();
                tokens.push(">".to_string());
                let mut out = vec![format!("{PREFIX}.{}", tokens.join("."))];
                if !parent.is_empty() {
                    out.push(format!("{PREFIX}.{}", parent.join(".")));
                }
                return out;
            }
            other => tokens.push(subject(other)[PREFIX.len() + 1..].to_string()),
        }
    }
    vec![format!("{PREFIX}.{}", tokens.join("."))]
}

enum Work {
    Publish(Message),
    Interest(String, bool),
}

/// The broker's side: queues, never blocks.
struct NatsBridge {
    work: mpsc::Sender<Work>,
    interest: mpsc::UnboundedSender<Work>,
}

impl Bridge for NatsBridge {
    fn published(&self, message: &Message) {
        if self.work.try_send(Work::Publish(message.clone())).is_err() {
            metrics::counter!("portcullis_cluster_messages_dropped_total").increment(1);
        }
    }

    fn interest(&self, filter: &str, held: bool) {
        let _ = self.interest.send(Work::Interest(filter.to_string(), held));
    }
}

/// Whether this node is connected to NATS, as the client's events say (for readiness).
#[derive(Debug, Default)]
pub(crate) struct NatsState {
    connected: std::sync::atomic::AtomicBool,
    client: std::sync::OnceLock<async_nats::Client>,
}

impl NatsState {
    /// Connected now (the last event said so, and the client agrees).
    pub(crate) fn connected(&self) -> bool {
        self.connected.load(std::sync::atomic::Ordering::SeqCst)
            && self
                .client
                .get()
                .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected)
    }
}

/// Connects to NATS at `url` and bridges `broker` to the other nodes, as node `id`; `state`
/// follows the connection.
pub(crate) async fn start(
    url: &str,
    id: &str,
    broker: Arc<Broker>,
    state: Arc<NatsState>,
) -> Result<()> {
    let events = state.clone();
    let client = async_nats::ConnectOptions::new()
        .name(format!("portcullis {id}"))
        .retry_on_initial_connect()
        .event_callback(move |event| {
            let events = events.clone();
            async move {
                use std::sync::atomic::Ordering;
                match event {
                    async_nats::Event::Connected => {
                        events.connected.store(true, Ordering::SeqCst);
                        tracing::info!(target: "portcullis::cluster", "connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        events.connected.store(false, Ordering::SeqCst);
                        tracing::warn!(target: "portcullis::cluster", "disconnected from NATS: MQTT messages do not reach the other nodes, and this node is not ready");
                    }
                    _ => {}
                }
            }
        })
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))?;
    if client.connection_state() == async_nats::connection::State::Connected {
        state
            .connected
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let _ = state.client.set(client.clone());
    let (work, mut publishing) = mpsc::channel(QUEUE);
    let (interest, mut interests) = mpsc::unbounded_channel();
    // This process, not just this node: message ids restart with it, and a peer must not take
    // a restarted node's new messages for ones it has seen.
    let instance = format!(
        "{id}#{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let origin = instance.clone();
    let publisher = client.clone();
    tokio::spawn(async move {
        let mut seq: u64 = 0;
        while let Some(Work::Publish(m)) = publishing.recv().await {
            seq += 1;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Portcullis-Origin", origin.as_str());
            headers.insert("Portcullis-Id", format!("{origin}/{seq}").as_str());
            headers.insert("Portcullis-QoS", (m.qos as u8).to_string().as_str());
            if m.retain {
                headers.insert("Portcullis-Retain", "1");
            }
            if let Err(e) = publisher
                .publish_with_headers(subject(&m.topic), headers, m.payload.clone())
                .await
            {
                tracing::warn!(target: "portcullis::cluster", error = %e, "cannot route a message to the other nodes");
            }
        }
    });
    let me = instance;
    let routed_to = broker.clone();
    tokio::spawn(async move {
        let broker = routed_to;
        let seen = Arc::new(Mutex::new((VecDeque::new(), HashSet::new())));
        let mut held: HashMap<String, Vec<tokio::task::JoinHandle<()>>> = HashMap::new();
        while let Some(Work::Interest(filter, on)) = interests.recv().await {
            if !on {
                for task in held.remove(&filter).into_iter().flatten() {
                    task.abort();
                }
                continue;
            }
            let mut tasks = Vec::new();
            for pattern in filter_subjects(&filter) {
                let mut sub = match client.subscribe(pattern.clone()).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(target: "portcullis::cluster", error = %e, subject = %pattern, "cannot subscribe on NATS");
                        continue;
                    }
                };
                // Once the server has the subscription, messages published anywhere arrive.
                if let Err(e) = client.flush().await {
                    tracing::warn!(target: "portcullis::cluster", error = %e, "cannot reach NATS");
                }
                tracing::info!(target: "portcullis::cluster", subject = %pattern, filter = %filter, "routing subscribed");
                let (broker, me, seen) = (broker.clone(), me.clone(), seen.clone());
                tasks.push(tokio::spawn(async move {
                    while let Some(msg) = sub.next().await {
                        let headers = msg.headers.clone().unwrap_or_default();
                        let header = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
                        if header("Portcullis-Origin").as_deref() == Some(me.as_str()) {
                            continue;
                        }
                        if let Some(id) = header("Portcullis-Id")
                            && let Ok(mut seen) = seen.lock()
                        {
                            if !seen.1.insert(id.clone()) {
                                continue;
                            }
                            seen.0.push_back(id);
                            if seen.0.len() > SEEN
                                && let Some(old) = seen.0.pop_front()
                            {
                                seen.1.remove(&old);
                            }
                        }
                        let Some(topic) = topic(msg.subject.as_str()) else {
                            continue;
                        };
                        let qos = match header("Portcullis-QoS").as_deref() {
                            Some("1") => QoS::AtLeastOnce,
                            _ => QoS::AtMostOnce,
                        };
                        broker.deliver_remote(Message {
                            topic,
                            payload: msg.payload.clone(),
                            qos,
                            retain: header("Portcullis-Retain").is_some(),
                            properties: PublishProperties::default(),
                            expires_at: None,
                            sent_as: None,
                        });
                    }
                }));
            }
            held.insert(filter, tasks);
        }
    });
    broker.set_bridge(Arc::new(NatsBridge { work, interest }));
    Ok(())
}

#[cfg(test)]
mod tests {
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
            let s = subject(t);
            assert!(!s.contains(' ') && !s.contains(".."), "{t} -> {s}");
            assert_eq!(topic(&s).as_deref(), Some(t), "{s}");
        }
        assert_eq!(subject("a.b/c"), "pcm.a%2Eb.c");
        assert_eq!(filter_subjects("a/+/c"), vec!["pcm.a.*.c"]);
        assert_eq!(filter_subjects("a/#"), vec!["pcm.a.>", "pcm.a"]);
        assert_eq!(filter_subjects("#"), vec!["pcm.>"]);
        assert_eq!(filter_subjects("a.b/#"), vec!["pcm.a%2Eb.>", "pcm.a%2Eb"]);
        assert_eq!(topic("other.subject"), None);
    }
}
