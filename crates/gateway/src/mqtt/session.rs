//! A live MQTT session: its read loop, packets, subscriptions, in-flight QoS 1 messages and
//! the checks on every registry change.

use super::{Conn, End, SessionAuth, WRITE_TIMEOUT, expiry_of, puback, reserved};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use portcullis_mqtt::broker::{
    Confirmation, Message, Outbound, SessionHandle, SubscriptionOptions,
};
use portcullis_mqtt::codec::{
    self, AckProperties, Connect, Disconnect, Packet, Protocol, PubAck, Publish, QoS, SubAck,
    UnsubAck, reason,
};
use portcullis_pki::Certificate;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::publish::envelope;

/// The first read of a session's loop, in bytes; doubled while reads fill it, up to MAX_READ.
pub(super) const FIRST_READ: usize = 512;
pub(super) const MAX_READ: usize = 64 * 1024;

/// How many messages from its channel a session writes per turn (one write for many).
const OUTBOUND_BATCH: usize = 256;

/// Publications handled between two looks at the cluster's backpressure within one read.
const BACKPRESSURE_EVERY: usize = 64;

/// Waits for the cluster to catch up with this node's publications (`wait`), until `patience`
/// (one deadline for a whole read); once it ran out, not again within that read.
async fn wait_for_cluster(
    wait: Option<portcullis_mqtt::broker::Backpressure>,
    patience: &mut Option<tokio::time::Instant>,
) {
    let (Some(wait), Some(until)) = (wait, *patience) else {
        return;
    };
    if tokio::time::timeout_at(until, wait).await.is_err() {
        *patience = None;
    }
}

/// Packets handled from one read after which a session lets other tasks run.
pub(super) const YIELD_AFTER_PACKETS: usize = 64;

/// QoS 2 messages a client may have received by us and not released (PUBREL) at once.
const MAX_AWAITING_RELEASE: usize = 1024;

/// An acknowledgement owed to the client, sent in the order its packets came.
pub(super) enum Reply {
    /// PUBACK for a QoS 1 PUBLISH, with its reason when stored.
    PubAck(u16, u8),
    /// PUBREC for a QoS 2 PUBLISH.
    PubRec(u16),
    /// PUBCOMP for a PUBREL (with its reason).
    PubComp(u16, u8),
    /// SUBACK, once the cluster routes the new filters here, then the retained messages.
    SubAck(Box<Packet>, Vec<Message>),
}

/// A reply waiting for the cluster to store what it acknowledges (or behind one that is).
pub(super) struct Owed {
    reply: Reply,
    confirm: Option<Confirmation>,
}

/// The first owed reply's confirmation (`Ok` at once for one that waits for nothing).
async fn first_confirmed(owed: &mut VecDeque<Owed>) -> Result<(), String> {
    let Some(first) = owed.front_mut() else {
        return std::future::pending().await;
    };
    match first.confirm.as_mut() {
        None => Ok(()),
        Some(rx) => rx
            .await
            .unwrap_or_else(|_| Err("the cluster connection closed".into())),
    }
}

/// A live session.
pub(super) struct Session<'a> {
    pub(super) c: &'a Conn,
    pub(super) protocol: Protocol,
    pub(super) client_id: String,
    pub(super) auth: SessionAuth,
    pub(super) leaf: Certificate,
    /// QoS 1 messages sent, by packet id, until PUBACK.
    pub(super) inflight: HashMap<u16, Message>,
    /// QoS 1 messages waiting for room in `inflight`.
    pub(super) backlog: VecDeque<Message>,
    /// The broker's [`SessionHandle::backlogged`] for this connection.
    pub(super) backlogged: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub(super) next_id: u16,
    /// The largest packet the client accepts (MQTT 5).
    pub(super) client_max: Option<usize>,
    /// Whether acknowledgements may carry a reason string (MQTT 5, unless the client set
    /// Request Problem Information to 0).
    pub(super) problem_information: bool,
    pub(super) receive_max: usize,
    pub(super) out: BytesMut,
    /// QoS 2 packet ids received and not yet released by the client.
    pub(super) awaiting_release: HashSet<u16>,
    /// Acknowledgements waiting for the cluster, in order.
    pub(super) owed: VecDeque<Owed>,
    /// Fleet provisioning on this connection, once used (an idle session stays small).
    pub(super) fleet: Option<Box<FleetReplies>>,
}

/// A connection's fleet provisioning: the reply filters it subscribed to (answered by the
/// session, never routed by the broker: replies carry keys and tokens for this connection
/// only), and the channel the answers come back on.
pub(super) struct FleetReplies {
    filters: Vec<(String, QoS)>,
    tx: tokio::sync::mpsc::UnboundedSender<(String, Vec<u8>)>,
    rx: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    /// Calls under way: at most [`FLEET_CALLS_IN_FLIGHT`] (each makes a key or signs a
    /// certificate and writes the registry), so the reply channel holds at most that many.
    in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Fleet provisioning calls one connection may have under way at once; more are refused
/// (`Throttled`, 429) rather than queued.
const FLEET_CALLS_IN_FLIGHT: usize = 4;

impl FleetReplies {
    fn new() -> Box<FleetReplies> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Box::new(FleetReplies {
            filters: Vec::new(),
            tx,
            rx,
            in_flight: Default::default(),
        })
    }
}

/// The next fleet provisioning answer (never, on a connection that asked nothing).
async fn fleet_answer(fleet: &mut Option<Box<FleetReplies>>) -> Option<(String, Vec<u8>)> {
    match fleet {
        Some(f) => f.rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Session<'_> {
    pub(super) async fn run(
        &mut self,
        tls: &mut TlsStream<TcpStream>,
        mut buf: BytesMut,
        mut handle: SessionHandle,
        connect: &Connect,
    ) -> End {
        let c = self.c;
        let keep_alive = match connect.keep_alive {
            0 => None,
            s => Some(Duration::from_millis(u64::from(s) * 1500)),
        };
        let mut last_heard = Instant::now();
        let keep_alive_timer = tokio::time::sleep(keep_alive.unwrap_or(Duration::MAX / 4));
        tokio::pin!(keep_alive_timer);
        let mut read_size = FIRST_READ;
        let mut changes = c.verifier.registry_changes();
        let mut shutdown = c.shutdown.clone();
        self.awaiting_release = std::mem::take(&mut handle.awaiting_release)
            .into_iter()
            .collect();
        for m in std::mem::take(&mut handle.pending) {
            self.deliver(m);
        }
        // Checked once after subscribing: a change made while the session was set up counts.
        let mut initial = self.recheck();
        let end = loop {
            if let Some(end) = initial.take() {
                break end;
            }
            if self.flush(tls).await.is_err() {
                break End::Lost;
            }
            // Room for the next read: small for a quiet device, doubled each time a read fills
            // it (up to 64 KiB), so a busy publisher reads many packets at a time.
            if buf.capacity() - buf.len() < read_size {
                buf.reserve(read_size);
            }
            let offered = buf.capacity() - buf.len();
            tokio::select! {
                read = tls.read_buf(&mut buf) => {
                    match read {
                        Ok(0) | Err(_) => break End::Lost,
                        Ok(n) => {
                            last_heard = Instant::now();
                            if n == offered && read_size < MAX_READ {
                                read_size *= 2;
                            }
                        }
                    }
                    let mut ended = None;
                    let mut handled = 0usize;
                    let mut published = 0usize;
                    // In a cluster that is behind with this node's publications, stop handling
                    // them until it caught up (the client's TCP window fills: flow control, not
                    // loss). At most a second per read: with NATS gone the queue does not drain,
                    // and the session must still answer its client.
                    let mut patience = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                    loop {
                        match codec::read_packet(&mut buf, Some(self.protocol), c.domain.mqtt.max_packet_size) {
                            Ok(Some(packet)) => {
                                handled += 1;
                                let publish = matches!(packet, Packet::Publish(_));
                                if let Some(end) = self.handle(packet, &handle) {
                                    ended = Some(end);
                                    break;
                                }
                                // A read holds up to 64 KiB of publications: the cluster is
                                // waited for within it too, not only after (eight publishers'
                                // reads overflowed its queue: dropped).
                                if publish {
                                    published += 1;
                                    if published.is_multiple_of(BACKPRESSURE_EVERY) {
                                        wait_for_cluster(c.broker.backpressure(), &mut patience).await;
                                    }
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                ended = Some(End::Server(e.reason_code(), e.to_string()));
                                break;
                            }
                        }
                    }
                    if let Some(end) = ended {
                        break end;
                    }
                    if published > 0 {
                        wait_for_cluster(c.broker.backpressure(), &mut patience).await;
                    }
                    // A flooding publisher would otherwise keep the worker (tokio lets a task do
                    // 128 reads per turn) while its subscribers' queues overflow: after a large
                    // batch — every complete packet in the buffer handled, so nothing waits on
                    // the next read — let the sessions it fed write.
                    if handled >= YIELD_AFTER_PACKETS {
                        tokio::task::yield_now().await;
                    }
                }
                out = handle.outbound.recv() => {
                    // Take what else is waiting too: one write for many messages.
                    let mut next = out;
                    let mut ended = None;
                    for taken in 1..=OUTBOUND_BATCH {
                        match next {
                            Some(Outbound::Deliver(m)) => self.deliver(*m),
                            Some(Outbound::TakenOver) => {
                                ended = Some(End::Server(reason::SESSION_TAKEN_OVER, "another connection took this client id over".into()));
                                break;
                            }
                            Some(Outbound::Closed(why)) => {
                                ended = Some(End::Server(reason::ADMINISTRATIVE_ACTION, why));
                                break;
                            }
                            None => {
                                ended = Some(End::Server(reason::UNSPECIFIED_ERROR, "the session ended".into()));
                                break;
                            }
                        }
                        // Taken only when it is handled in this turn: one taken and dropped
                        // at the end of a full turn was a message lost every 256.
                        if taken == OUTBOUND_BATCH {
                            break;
                        }
                        match handle.outbound.try_recv() {
                            Ok(o) => next = Some(o),
                            Err(_) => break,
                        }
                    }
                    if let Some(end) = ended {
                        break end;
                    }
                }
                // One timer for the session, moved on only when it fires (not on every packet).
                _ = keep_alive_timer.as_mut(), if keep_alive.is_some() => {
                    let k = keep_alive.unwrap_or_default();
                    if last_heard.elapsed() >= k {
                        break End::Server(reason::KEEP_ALIVE_TIMEOUT, "no packet within 1.5 times the keep-alive".into());
                    }
                    keep_alive_timer.as_mut().reset((last_heard + k).into());
                    continue;
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    if let Some(end) = self.recheck() {
                        break end;
                    }
                    self.refill(&handle);
                }
                _ = shutdown.changed() => break End::Server(reason::SERVER_SHUTTING_DOWN, "the gateway is stopping".into()),
                answer = fleet_answer(&mut self.fleet), if self.fleet.is_some() => {
                    if let Some(answer) = answer {
                        self.fleet_reply(answer);
                    }
                }
                stored = first_confirmed(&mut self.owed), if !self.owed.is_empty() => {
                    if let Some(end) = self.answer_owed(stored) {
                        break end;
                    }
                }
            }
            self.refill(&handle);
        };
        // Tell an MQTT 5 client why (3.1.1 has no server DISCONNECT: the connection closes).
        if let (End::Server(code, why), Protocol::V5) = (&end, self.protocol) {
            self.out.clear();
            let _ = codec::write_packet(
                &Packet::Disconnect(Disconnect {
                    reason: *code,
                    properties: codec::DisconnectProperties {
                        reason_string: Some(why.chars().take(200).collect()),
                        ..Default::default()
                    },
                }),
                self.protocol,
                &mut self.out,
            );
            let _ = self.flush(tls).await;
        }
        let _ = tls.shutdown().await;
        let publish_will = match &end {
            End::Client { publish_will } => *publish_will,
            End::Lost => true,
            End::Server(code, _) => *code != reason::SESSION_TAKEN_OVER,
        };
        if publish_will && let Some(will) = &connect.will {
            let m = Message {
                topic: will.topic.clone(),
                payload: will.payload.clone(),
                qos: will.qos,
                retain: will.retain,
                properties: will.properties.clone(),
                expires_at: expiry_of(will.properties.message_expiry_interval),
                sent_as: None,
                preferred_id: None,
                released: false,
                receipt: None,
            };
            c.broker.publish(m, Some(&self.client_id));
        }
        // What was sent and not acknowledged, and what waited, goes back to the session.
        let mut unacked: Vec<(u16, Message)> = self.inflight.drain().collect();
        unacked.sort_by_key(|(id, _)| *id);
        let mut keep: Vec<Message> = unacked
            .into_iter()
            .map(|(id, mut m)| {
                m.sent_as = Some(id);
                m
            })
            .collect();
        keep.extend(self.backlog.drain(..));
        let mut awaiting: Vec<u16> = self.awaiting_release.drain().collect();
        awaiting.sort_unstable();
        c.broker.disconnected(
            &self.client_id,
            handle.generation,
            keep,
            awaiting,
            Some(&mut handle.outbound),
        );
        let (result, why) = match &end {
            End::Client { .. } => ("disconnected", "the client disconnected".to_string()),
            End::Lost => ("lost", "the network connection closed".to_string()),
            End::Server(_, why) => ("closed", why.clone()),
        };
        tracing::info!(
            target: "portcullis::mqtt",
            peer = %c.peer,
            domain = %c.domain.hostname,
            client_id = %self.client_id,
            result,
            reason = %why,
            client_subject = %self.leaf.info().subject,
            "mqtt session ended"
        );
        end
    }

    /// After a registry change or a reload: the session ends when its certificate is no longer
    /// admitted (revoked, deactivated, refused by a new truststore or CRL, its domain gone) or
    /// it may no longer connect.
    pub(super) fn recheck(&self) -> Option<End> {
        if let Some(closed) = self.c.admission.refusal() {
            return Some(End::Server(
                reason::NOT_AUTHORIZED,
                format!("{}: {}", closed.code, closed.explanation),
            ));
        }
        if let Err(why) = self
            .auth
            .decide("mqtt:Connect", &format!("client:{}", self.client_id))
        {
            return Some(End::Server(
                reason::NOT_AUTHORIZED,
                format!("mqtt:Connect no longer allowed: {why}"),
            ));
        }
        None
    }

    /// Handles one packet from the client; `Some` ends the session.
    pub(super) fn handle(&mut self, packet: Packet, handle: &SessionHandle) -> Option<End> {
        let c = self.c;
        match packet {
            Packet::Publish(p) => return self.publish(p),
            Packet::PubAck(a) => {
                if self
                    .inflight
                    .get(&a.packet_id)
                    .is_some_and(|m| m.qos == QoS::AtLeastOnce)
                    && let Some(m) = self.inflight.remove(&a.packet_id)
                    && let Some(receipt) = m.receipt
                {
                    receipt.acknowledged();
                }
                self.refill(handle);
            }
            Packet::PubRec(a) => {
                // QoS 2, our message received: release it (an error reason ends the exchange).
                match self.inflight.get_mut(&a.packet_id) {
                    Some(m) if m.qos == QoS::ExactlyOnce && a.reason < 0x80 => {
                        m.released = true;
                        m.expires_at = None;
                        // The cluster keeps it until PUBCOMP: if this node dies before, the
                        // node the client resumes on sends it again with the same packet id,
                        // which the client acknowledges without delivering it twice.
                        self.write(&Packet::PubRel(codec::PubAck {
                            packet_id: a.packet_id,
                            reason: reason::SUCCESS,
                            properties: Default::default(),
                        }));
                    }
                    Some(m) if m.qos == QoS::ExactlyOnce => {
                        if let Some(receipt) = m.receipt.take() {
                            receipt.acknowledged();
                        }
                        self.inflight.remove(&a.packet_id);
                        self.refill(handle);
                    }
                    _ if self.protocol == Protocol::V5 => {
                        self.write(&Packet::PubRel(codec::PubAck {
                            packet_id: a.packet_id,
                            reason: reason::PACKET_IDENTIFIER_NOT_FOUND,
                            properties: Default::default(),
                        }));
                    }
                    _ => {}
                }
            }
            Packet::PubComp(a) => {
                if self.inflight.get(&a.packet_id).is_some_and(|m| m.released)
                    && let Some(m) = self.inflight.remove(&a.packet_id)
                    && let Some(receipt) = m.receipt
                {
                    receipt.acknowledged();
                }
                self.refill(handle);
            }
            Packet::PubRel(a) => {
                // QoS 2, the client's message: it may now be forgotten (it was routed once).
                let known = self.awaiting_release.remove(&a.packet_id);
                // The cluster forgets what kept the message stored once (the client may have
                // sent it to a node that died since: released here all the same).
                let forgotten = c.broker.released(&self.client_id, a.packet_id);
                let code = if known || forgotten.is_some() || self.protocol == Protocol::V311 {
                    reason::SUCCESS
                } else {
                    reason::PACKET_IDENTIFIER_NOT_FOUND
                };
                self.reply(Reply::PubComp(a.packet_id, code), forgotten);
            }
            Packet::Subscribe(s) => {
                let mut codes = Vec::with_capacity(s.filters.len());
                let mut denials: Vec<String> = Vec::new();
                let mut retained = Vec::new();
                let mut ready: Vec<Confirmation> = Vec::new();
                for f in &s.filters {
                    let refused = |code: u8| match self.protocol {
                        Protocol::V5 => code,
                        Protocol::V311 => 0x80,
                    };
                    if portcullis_mqtt::topic::check_filter(&f.filter).is_err() {
                        codes.push(refused(reason::TOPIC_FILTER_INVALID));
                        continue;
                    }
                    match portcullis_mqtt::topic::shared(&f.filter) {
                        Err(_) => {
                            codes.push(refused(reason::TOPIC_FILTER_INVALID));
                            continue;
                        }
                        // No Local on a shared subscription is a protocol error (MQTT 5 §3.8.3.1).
                        Ok(Some(_)) if f.no_local => {
                            return Some(End::Server(
                                reason::PROTOCOL_ERROR,
                                format!("No Local set on the shared subscription '{}'", f.filter),
                            ));
                        }
                        _ => {}
                    }
                    let decided = if crate::fleet::self_service(&f.filter) {
                        Ok(())
                    } else {
                        self.auth
                            .decide("mqtt:Subscribe", &format!("topicfilter:{}", f.filter))
                    };
                    if let Err(why) = decided {
                        metrics::counter!("portcullis_mqtt_denials_total", "action" => "subscribe", "reason" => "not-allowed")
                            .increment(1);
                        tracing::info!(target: "portcullis::mqtt", client_id = %self.client_id, filter = %f.filter, reason = %why, "mqtt subscription denied");
                        denials.push(format!("'{}': {why}", f.filter));
                        codes.push(refused(reason::NOT_AUTHORIZED));
                        continue;
                    }
                    let granted = f.qos;
                    if crate::fleet::is_reply_filter(&f.filter) {
                        let fleet = self.fleet.get_or_insert_with(FleetReplies::new);
                        fleet.filters.retain(|(filter, _)| filter != &f.filter);
                        fleet.filters.push((f.filter.clone(), granted));
                        codes.push(granted as u8);
                        continue;
                    }
                    let options = SubscriptionOptions {
                        qos: granted,
                        no_local: f.no_local,
                        retain_as_published: f.retain_as_published,
                    };
                    match c
                        .broker
                        .subscribe(&self.client_id, handle.generation, &f.filter, options)
                    {
                        Some(r) => {
                            codes.push(granted as u8);
                            if f.retain_handling != 2 {
                                retained.extend(r.retained);
                            }
                            ready.extend(r.ready);
                        }
                        None => codes.push(refused(reason::QUOTA_EXCEEDED)),
                    }
                }
                tracing::info!(
                    target: "portcullis::mqtt",
                    client_id = %self.client_id,
                    filters = %s.filters.iter().map(|f| f.filter.as_str()).collect::<Vec<_>>().join(" "),
                    codes = ?codes,
                    "mqtt subscribe"
                );
                let reason_string =
                    self.reason_string("subscription denied by policy", &denials, 4 + codes.len());
                let suback = Packet::SubAck(SubAck {
                    packet_id: s.packet_id,
                    codes,
                    properties: AckProperties {
                        reason_string,
                        ..Default::default()
                    },
                });
                // In a cluster, SUBACK waits until the other nodes' messages reach this node.
                let confirm = match ready.len() {
                    0 => None,
                    1 => ready.pop(),
                    _ => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        tokio::spawn(async move {
                            let mut result = Ok(());
                            for r in ready {
                                if let Ok(Err(e)) = r.await {
                                    result = Err(e);
                                }
                            }
                            let _ = tx.send(result);
                        });
                        Some(rx)
                    }
                };
                self.reply(Reply::SubAck(Box::new(suback), retained), confirm);
            }
            Packet::Unsubscribe(u) => {
                let codes = u
                    .filters
                    .iter()
                    .map(|f| {
                        if let Some(fleet) = self.fleet.as_mut()
                            && let Some(i) = fleet.filters.iter().position(|(x, _)| x == f)
                        {
                            fleet.filters.remove(i);
                            return reason::SUCCESS;
                        }
                        if c.broker.unsubscribe(&self.client_id, handle.generation, f) {
                            reason::SUCCESS
                        } else {
                            reason::NO_SUBSCRIPTION_EXISTED
                        }
                    })
                    .collect();
                let codes = if self.protocol == Protocol::V5 {
                    codes
                } else {
                    Vec::new()
                };
                self.write(&Packet::UnsubAck(UnsubAck {
                    packet_id: u.packet_id,
                    codes,
                    properties: Default::default(),
                }));
            }
            Packet::PingReq => self.write(&Packet::PingResp),
            Packet::Disconnect(d) => {
                return Some(End::Client {
                    publish_will: d.reason == reason::DISCONNECT_WITH_WILL_MESSAGE,
                });
            }
            Packet::Connect(_) => {
                return Some(End::Server(
                    reason::PROTOCOL_ERROR,
                    "a second CONNECT".into(),
                ));
            }
            Packet::Auth(_) => {
                return Some(End::Server(
                    reason::BAD_AUTHENTICATION_METHOD,
                    "enhanced authentication is not supported: the certificate is the identity"
                        .into(),
                ));
            }
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                return Some(End::Server(
                    reason::PROTOCOL_ERROR,
                    "a server packet from the client".into(),
                ));
            }
        }
        None
    }

    pub(super) fn publish(&mut self, p: Publish) -> Option<End> {
        let c = self.c;
        if let (QoS::ExactlyOnce, Some(id)) = (p.qos, p.packet_id) {
            // Sent again before PUBREL: received already, acknowledged again, not routed twice.
            if self.awaiting_release.contains(&id) {
                self.reply(Reply::PubRec(id), None);
                return None;
            }
            if self.awaiting_release.len() >= MAX_AWAITING_RELEASE {
                return Some(End::Server(
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    format!("more than {MAX_AWAITING_RELEASE} QoS 2 messages waiting for PUBREL"),
                ));
            }
        }
        if p.properties.topic_alias.is_some() {
            return Some(End::Server(
                reason::TOPIC_ALIAS_INVALID,
                "topic aliases are not supported (topic alias maximum 0)".into(),
            ));
        }
        let fleet_call = crate::fleet::request(&p.topic, &p.payload);
        let allowed = portcullis_mqtt::topic::check_name(&p.topic)
            .map_err(|e| ("invalid-topic", e.to_string()))
            .and_then(|()| match fleet_call {
                Some(_) => Ok(()),
                None => reserved(&p.topic).map_err(|e| ("reserved-topic", e)),
            })
            .and_then(|()| {
                if fleet_call.is_some() && crate::fleet::self_service(&p.topic) {
                    return Ok(());
                }
                self.auth
                    .decide_topic("mqtt:Publish", &p.topic)
                    .map_err(|e| ("not-allowed", e))
            });
        if let Err((code, why)) = allowed {
            metrics::counter!("portcullis_mqtt_messages_total", "direction" => "in", "result" => "denied").increment(1);
            metrics::counter!("portcullis_mqtt_denials_total", "action" => "publish", "reason" => code).increment(1);
            tracing::info!(target: "portcullis::mqtt", client_id = %self.client_id, topic = %p.topic, reason = %why, "mqtt publish denied");
            return match (self.protocol, p.qos, p.packet_id) {
                (Protocol::V5, QoS::AtLeastOnce | QoS::ExactlyOnce, Some(id)) => {
                    let what = if code == "not-allowed" {
                        "publish denied by policy"
                    } else {
                        "publish refused"
                    };
                    let reason_string = self.reason_string(what, &[why], 6);
                    let ack = PubAck {
                        packet_id: id,
                        reason: reason::NOT_AUTHORIZED,
                        properties: AckProperties {
                            reason_string,
                            ..Default::default()
                        },
                    };
                    self.write(&if p.qos == QoS::ExactlyOnce {
                        Packet::PubRec(ack)
                    } else {
                        Packet::PubAck(ack)
                    });
                    None
                }
                // MQTT 5 QoS 0 has no acknowledgement: the message is dropped (and counted).
                (Protocol::V5, _, _) => None,
                // MQTT 3.1.1 cannot say no: the connection is closed, as IoT Core does.
                (Protocol::V311, _, _) => Some(End::Server(
                    reason::NOT_AUTHORIZED,
                    format!("publish to '{}' denied: {why}", p.topic),
                )),
            };
        }
        if let Some(call) = fleet_call {
            self.ask_fleet(&p.topic, call);
            match (p.qos, p.packet_id) {
                (QoS::AtLeastOnce, Some(id)) => {
                    self.reply(Reply::PubAck(id, reason::SUCCESS), None)
                }
                (QoS::ExactlyOnce, Some(id)) => {
                    self.awaiting_release.insert(id);
                    self.reply(Reply::PubRec(id), None);
                }
                _ => {}
            }
            return None;
        }
        let mut properties = p.properties.clone();
        properties.topic_alias = None;
        properties.subscription_identifiers.clear();
        let message = Message {
            expires_at: expiry_of(properties.message_expiry_interval),
            sent_as: None,
            preferred_id: None,
            released: false,
            receipt: None,
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties,
        };
        c.verifier.forward(
            || envelope(&message, Some(&self.client_id), &self.leaf, &c.verifier),
            &message.topic,
        );
        let routed = match (p.qos, p.packet_id) {
            (QoS::ExactlyOnce, Some(id)) => {
                c.broker
                    .publish_exactly_once(message, &self.client_id, id, p.dup)
            }
            _ => c.broker.publish(message, Some(&self.client_id)),
        };
        super::message_counters().in_accepted.increment(1);
        if routed.dropped > 0 {
            super::message_counters()
                .out_dropped
                .increment(routed.dropped as u64);
        }
        let code = if self.protocol == Protocol::V5 && routed.delivered + routed.queued == 0 {
            reason::NO_MATCHING_SUBSCRIBERS
        } else {
            reason::SUCCESS
        };
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => self.reply(Reply::PubAck(id, code), routed.confirm),
            (QoS::ExactlyOnce, Some(id)) => {
                self.awaiting_release.insert(id);
                self.reply(Reply::PubRec(id), routed.confirm);
            }
            _ => {}
        }
        None
    }

    /// Hands a fleet provisioning request to the node on a task of its own; the answer comes
    /// back through [`FleetReplies`].
    fn ask_fleet(
        &mut self,
        topic: &str,
        call: Result<crate::fleet::FleetCall, crate::fleet::FleetError>,
    ) {
        use crate::fleet::{FleetError, FleetRequest, reply};
        use std::sync::atomic::Ordering;
        let fleet = self.fleet.get_or_insert_with(FleetReplies::new);
        let tx = fleet.tx.clone();
        let in_flight = fleet.in_flight.clone();
        if in_flight.fetch_add(1, Ordering::SeqCst) >= FLEET_CALLS_IN_FLIGHT {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            metrics::counter!("portcullis_fleet_requests_total", "call" => "any", "result" => "throttled").increment(1);
            let _ = tx.send(reply(
                topic,
                &Err(FleetError {
                    status: 429,
                    code: "Throttled",
                    message: format!(
                        "more than {FLEET_CALLS_IN_FLIGHT} provisioning calls under way on this connection; wait for their answers"
                    ),
                }),
            ));
            return;
        }
        let service = self.c.verifier.fleet();
        let request = call.map(|call| FleetRequest {
            call,
            caller: Some(self.leaf.clone()),
            client_id: self.client_id.clone(),
        });
        let topic = topic.to_string();
        tracing::info!(target: "portcullis::mqtt", client_id = %self.client_id, topic = %topic, "fleet provisioning request");
        tokio::spawn(async move {
            let answer = match (request, service) {
                (Err(e), _) => Err(e),
                (Ok(_), None) => Err(FleetError {
                    status: 503,
                    code: "ServiceUnavailable",
                    message: "fleet provisioning is not available on this gateway".into(),
                }),
                (Ok(request), Some(service)) => service.call(request).await,
            };
            in_flight.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(reply(&topic, &answer));
        });
    }

    /// Sends a fleet provisioning answer to this connection, if it subscribed to its topic
    /// (as IoT Core: unsubscribed, the answer is lost) and may receive it.
    fn fleet_reply(&mut self, (topic, payload): (String, Vec<u8>)) {
        let qos = self.fleet.as_ref().and_then(|f| {
            f.filters
                .iter()
                .filter(|(filter, _)| portcullis_mqtt::topic::matches(filter, &topic))
                .map(|(_, q)| *q)
                .max_by_key(|q| *q as u8)
        });
        let Some(qos) = qos else {
            tracing::info!(target: "portcullis::mqtt", client_id = %self.client_id, topic = %topic, "fleet provisioning answer not sent: the client did not subscribe to it");
            return;
        };
        if !crate::fleet::self_service(&topic)
            && let Err(why) = self.auth.decide("mqtt:Receive", &format!("topic:{topic}"))
        {
            tracing::info!(target: "portcullis::mqtt", client_id = %self.client_id, topic = %topic, reason = %why, "fleet provisioning answer not sent");
            return;
        }
        self.deliver(Message {
            topic,
            payload: payload.into(),
            qos,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            sent_as: None,
            preferred_id: None,
            released: false,
            receipt: None,
        });
    }

    /// Sends `reply` once `confirm` says the cluster stored the message (at once without a
    /// cluster), after every reply owed before it.
    fn reply(&mut self, reply: Reply, confirm: Option<Confirmation>) {
        if confirm.is_none() && self.owed.is_empty() {
            self.send_reply(reply, Ok(()));
        } else {
            self.owed.push_back(Owed { reply, confirm });
        }
    }

    /// The first owed reply's message was stored (or not): answer it, and every reply behind it
    /// that is ready too.
    fn answer_owed(&mut self, first: Result<(), String>) -> Option<End> {
        let mut result = first;
        loop {
            let owed = self.owed.pop_front()?;
            if let (Err(why), Reply::PubAck(..) | Reply::PubRec(_)) = (&result, &owed.reply) {
                metrics::counter!("portcullis_mqtt_messages_total", "direction" => "in", "result" => "not-stored").increment(1);
                tracing::warn!(target: "portcullis::mqtt", client_id = %self.client_id, error = %why, "a message could not be stored by the cluster");
                if self.protocol == Protocol::V311 {
                    // MQTT 3.1.1 cannot refuse a message: without its acknowledgement, the
                    // client sends it again after reconnecting.
                    return Some(End::Server(
                        reason::UNSPECIFIED_ERROR,
                        format!("the cluster could not store a message: {why}"),
                    ));
                }
            }
            self.send_reply(owed.reply, result);
            result = match self.owed.front_mut() {
                None => return None,
                Some(Owed { confirm: None, .. }) => Ok(()),
                Some(Owed {
                    confirm: Some(rx), ..
                }) => match rx.try_recv() {
                    Ok(r) => r,
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => return None,
                    Err(_) => Err("the cluster connection closed".into()),
                },
            };
        }
    }

    fn send_reply(&mut self, reply: Reply, stored: Result<(), String>) {
        let failed = |this: &Self, id: u16, why: String| PubAck {
            packet_id: id,
            reason: reason::UNSPECIFIED_ERROR,
            properties: AckProperties {
                reason_string: this.reason_string(
                    "the cluster could not store the message",
                    &[why],
                    6,
                ),
                ..Default::default()
            },
        };
        match (reply, stored) {
            (Reply::PubAck(id, code), Ok(())) => self.write(&puback(id, code)),
            (Reply::PubAck(id, _), Err(why)) => {
                let ack = failed(self, id, why);
                self.write(&Packet::PubAck(ack));
            }
            (Reply::PubRec(id), Ok(())) => self.write(&Packet::PubRec(PubAck {
                packet_id: id,
                reason: reason::SUCCESS,
                properties: Default::default(),
            })),
            (Reply::PubRec(id), Err(why)) => {
                self.awaiting_release.remove(&id);
                let ack = failed(self, id, why);
                self.write(&Packet::PubRec(ack));
            }
            (Reply::PubComp(id, code), _) => self.write(&Packet::PubComp(PubAck {
                packet_id: id,
                reason: code,
                properties: Default::default(),
            })),
            (Reply::SubAck(suback, retained), Ok(())) => {
                self.write(&suback);
                for m in retained {
                    self.deliver_within(m, false);
                }
            }
            // The cluster could not route or keep the subscription: the client is told (and
            // may subscribe again), rather than wait for messages that will not come.
            (Reply::SubAck(mut suback, _), Err(why)) => {
                tracing::warn!(target: "portcullis::mqtt", client_id = %self.client_id, error = %why, "a subscription could not be set up in the cluster");
                if let Packet::SubAck(ack) = suback.as_mut() {
                    for code in &mut ack.codes {
                        if *code < 0x80 {
                            *code = reason::UNSPECIFIED_ERROR;
                        }
                    }
                }
                self.write(&suback);
            }
        }
    }

    /// The reason string of an MQTT 5 acknowledgement: `what`, then each detail, one line,
    /// at most 256 bytes, and only if the acknowledgement (`fixed` bytes without it) still fits
    /// the client's maximum packet size; none for MQTT 3.1.1 or when the client asked for no
    /// problem information.
    pub(super) fn reason_string(
        &self,
        what: &str,
        details: &[String],
        fixed: usize,
    ) -> Option<String> {
        if !self.problem_information {
            return None;
        }
        let mut text = what.to_string();
        if !details.is_empty() {
            text.push_str(": ");
            text.push_str(&details.join("; "));
        }
        text.retain(|c| !c.is_control());
        // Property length (up to 2 bytes here), identifier, string length.
        let room = self
            .client_max
            .unwrap_or(usize::MAX)
            .saturating_sub(fixed + 2 + 1 + 2)
            .min(256);
        if text.len() > room {
            let mut end = room.saturating_sub(3);
            while end > 0 && !text.is_char_boundary(end) {
                end -= 1;
            }
            if end < what.len() {
                return None;
            }
            text.truncate(end);
            text.push_str("...");
        }
        Some(text)
    }

    /// Queues a delivery: QoS 0 is written at once, QoS 1 and 2 when there is room in flight.
    pub(super) fn deliver(&mut self, m: Message) {
        self.deliver_within(m, true);
    }

    /// [`Session::deliver`]; `bounded`: what waits beyond the window is bounded (a
    /// subscription's retained messages are not: there are at most `max_retained`, and all of
    /// them are owed).
    fn deliver_within(&mut self, m: Message, bounded: bool) {
        if !m.released && m.expires_at.is_some_and(|t| t <= Instant::now()) {
            if let Some(receipt) = m.receipt {
                receipt.acknowledged();
            }
            return;
        }
        if m.released
            && let Some(id) = m.sent_as
            && !self.inflight.contains_key(&id)
        {
            // QoS 2 received by the client before: release it again.
            self.inflight.insert(id, m);
            self.write(&Packet::PubRel(codec::PubAck {
                packet_id: id,
                reason: reason::SUCCESS,
                properties: Default::default(),
            }));
            return;
        }
        if m.qos == QoS::AtMostOnce {
            self.send_message(m, None);
        } else if self.inflight.len() < self.receive_max {
            // A message sent before and not acknowledged goes again with its packet id and
            // DUP set, so the client knows it may have seen it.
            let (id, dup) = match (m.sent_as, m.preferred_id) {
                (Some(id), _) if !self.inflight.contains_key(&id) => (id, true),
                (None, Some(id)) if id != 0 && !self.inflight.contains_key(&id) => (id, false),
                _ => (self.packet_id(), false),
            };
            self.inflight.insert(id, m.clone());
            self.send_message(m, Some((id, dup)));
        } else if !bounded || self.backlog.len() < self.c.broker.connection_backlog_limit() {
            self.backlog.push_back(m);
            if self.backlog.len() >= self.receive_max {
                // A window's worth waits here: further ones wait in the broker's queue
                // (bounded, counted), not in the channel and this session.
                self.backlogged
                    .store(true, std::sync::atomic::Ordering::Release);
            }
        } else {
            // A subscriber that leaves what it was sent unacknowledged, or is slower than its
            // publishers, has what exceeds its bound dropped, as the broker drops for a full
            // queue: the node's memory is not its buffer. A message the cluster keeps goes back
            // to it, for later.
            if let Some(receipt) = &m.receipt {
                receipt.returned();
            }
            super::message_counters().out_dropped.increment(1);
        }
    }

    /// Moves waiting QoS 1 messages into flight, then what the broker queued while this
    /// session's channel was full.
    pub(super) fn refill(&mut self, handle: &SessionHandle) {
        while self.inflight.len() < self.receive_max {
            let Some(m) = self.backlog.pop_front() else {
                break;
            };
            self.deliver(m);
        }
        let room = self.receive_max.saturating_sub(self.inflight.len());
        if room > 0 && self.backlog.is_empty() && handle.may_take_queued() {
            for m in self
                .c
                .broker
                .take_queued(&self.client_id, handle.generation, room)
            {
                self.deliver(m);
            }
        }
    }

    pub(super) fn packet_id(&mut self) -> u16 {
        loop {
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_id) {
                return self.next_id;
            }
        }
    }

    /// Writes a PUBLISH: QoS 1 and 2 with `(packet id, DUP)`, QoS 0 without.
    pub(super) fn send_message(&mut self, m: Message, qos1: Option<(u16, bool)>) {
        let packet_id = qos1.map(|(id, _)| id);
        let mut properties = m.properties.clone();
        if let Some(at) = m.expires_at {
            let left = at.saturating_duration_since(Instant::now()).as_secs();
            properties.message_expiry_interval =
                Some(u32::try_from(left.max(1)).unwrap_or(u32::MAX));
        }
        let packet = Packet::Publish(Publish {
            dup: qos1.is_some_and(|(_, dup)| dup),
            qos: if packet_id.is_some() {
                m.qos
            } else {
                QoS::AtMostOnce
            },
            retain: m.retain,
            topic: m.topic,
            packet_id,
            payload: m.payload,
            properties,
        });
        let before = self.out.len();
        self.write(&packet);
        // A packet larger than the client accepts is not sent (MQTT 5 §3.1.2.11.4).
        if self
            .client_max
            .is_some_and(|max| self.out.len() - before > max)
        {
            self.out.truncate(before);
            if let Some(id) = packet_id
                && let Some(m) = self.inflight.remove(&id)
                && let Some(receipt) = m.receipt
            {
                receipt.acknowledged();
            }
            return;
        }
        super::message_counters().out_sent.increment(1);
    }

    pub(super) fn write(&mut self, packet: &Packet) {
        if let Err(e) = codec::write_packet(packet, self.protocol, &mut self.out) {
            tracing::warn!(target: "portcullis::mqtt", client_id = %self.client_id, error = %e, "cannot encode a packet");
        }
    }

    pub(super) async fn flush(&mut self, tls: &mut TlsStream<TcpStream>) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = self.out.split();
        let write = async {
            tls.write_all(&out).await?;
            tls.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(done) => done,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            )),
        }
    }
}
