//! The MQTT endpoint: one task per connection, behind the same TLS front end, verifier,
//! registry modes and JIT registration as HTTP. The verified certificate is the identity (a
//! username or password grants nothing); the registry's policies decide `mqtt:Connect` on
//! `client:<id>`, `mqtt:Publish` on `topic:<name>`, `mqtt:Subscribe` on `topicfilter:<filter>`
//! and, on every delivery, `mqtt:Receive` on `topic:<name>`. QoS 0 and 1; QoS 2 is refused.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use portcullis_mqtt::broker::{
    Broker, Message, Outbound, Receiver, SessionHandle, SubscriptionOptions,
};
use portcullis_mqtt::codec::{
    self, AckProperties, ConnAck, ConnAckProperties, Connect, Disconnect, Packet, Protocol, PubAck,
    Publish, QoS, SubAck, UnsubAck, reason,
};
use portcullis_pki::Certificate;
use portcullis_policy::{Bound, Request as PolicyRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;

use crate::config::Domain;
use crate::verdict::ClientVerdict;
use crate::verify::DomainVerifier;

/// QoS 1 messages sent and not yet acknowledged, per session, at most.
const MAX_INFLIGHT: usize = 64;

/// How long a MQTT 3.1.1 persistent session outlives its connection (MQTT 5 clients say).
const PERSISTENT_SESSION: Duration = Duration::from_secs(3600);

/// How long a write to a client may take: a client that stops reading is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the MQTT endpoint needs of its connection.
pub(crate) struct Conn {
    pub(crate) peer: SocketAddr,
    pub(crate) domain: Arc<Domain>,
    pub(crate) verifier: Arc<DomainVerifier>,
    pub(crate) verdict: ClientVerdict,
    pub(crate) broker: Arc<Broker>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// What the session was admitted under, checked again on registry changes and reloads.
    pub(crate) admission: crate::recheck::Admission,
}

/// A session's policies, bound to its certificate, domain and client id; bound again whenever
/// the registry snapshot changes, so a policy change applies to the next packet.
#[derive(Clone)]
pub(crate) struct SessionAuth(Arc<AuthInner>);

struct AuthInner {
    verifier: Arc<DomainVerifier>,
    leaf: Certificate,
    domain: String,
    client_id: String,
    peer: IpAddr,
    bound: Mutex<Option<(u64, Arc<Bound>)>>,
}

impl SessionAuth {
    fn new(c: &Conn, leaf: &Certificate, client_id: &str) -> SessionAuth {
        SessionAuth(Arc::new(AuthInner {
            verifier: c.verifier.clone(),
            leaf: leaf.clone(),
            domain: c.domain.hostname.to_string(),
            client_id: client_id.to_string(),
            peer: c.peer.ip(),
            bound: Mutex::new(None),
        }))
    }

    fn bound(&self) -> Arc<Bound> {
        let inner = &self.0;
        let generation = inner.verifier.registry_generation();
        let mut cached = inner.bound.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, b)) = cached.as_ref()
            && *g == generation
        {
            return b.clone();
        }
        let snapshot = inner.verifier.registry_snapshot();
        let bound = Arc::new(snapshot.policies().bind_mqtt(
            &inner.leaf,
            &inner.domain,
            &inner.client_id,
        ));
        *cached = Some((generation, bound.clone()));
        bound
    }

    /// Whether the policies allow `action` on `resource`; the reason when not. Server topics
    /// (`$…`) need an Allow statement that names them: one that would also allow a made-up
    /// `$` topic (a wildcard such as `topic:*`) does not count.
    fn decide(&self, action: &str, resource: &str) -> Result<(), String> {
        let bound = self.bound();
        let now = crate::authorize::now();
        let request = |resource| PolicyRequest {
            action,
            resource,
            source_ip: Some(self.0.peer),
            now,
        };
        let decision = bound.decide(&request(resource));
        if !decision.allowed {
            return Err(decision.reason);
        }
        if let Some((kind, rest)) = resource.split_once(':')
            && rest.starts_with('$')
        {
            let probe = format!("{kind}:$portcullis-unnamed/probe");
            let real = bound.trace(&request(resource));
            let unnamed = bound.trace(&request(&probe));
            let named = real.iter().zip(&unnamed).any(|(r, p)| {
                r.applied && r.statement.effect == portcullis_policy::Effect::Allow && !p.applied
            });
            if !named {
                return Err(format!(
                    "{resource} is a server topic: a policy must name it, not match it with a wildcard"
                ));
            }
        }
        Ok(())
    }
}

impl Receiver for SessionAuth {
    fn may_receive(&self, topic: &str) -> bool {
        let allowed = self
            .decide("mqtt:Receive", &format!("topic:{topic}"))
            .is_ok();
        if !allowed {
            metrics::counter!("portcullis_mqtt_denials_total", "action" => "receive", "reason" => "not-allowed").increment(1);
        }
        allowed
    }
}

/// Why a session ended, for the log.
enum End {
    /// The client sent DISCONNECT (with the will requested, for reason 0x04).
    Client { publish_will: bool },
    /// The network connection closed without DISCONNECT.
    Lost,
    /// We closed it, with this MQTT 5 reason code and explanation.
    Server(u8, String),
}

/// Serves one MQTT connection after the TLS handshake.
pub(crate) async fn serve(mut tls: TlsStream<TcpStream>, c: Conn) {
    let settings = c.domain.mqtt.clone();
    let max = settings.max_packet_size;
    // Small to start: most devices send little, and an idle session keeps its buffer. It grows
    // for publishers that send more.
    let mut buf = BytesMut::with_capacity(512);
    let hostname = c.domain.hostname.to_string();
    let first = tokio::time::timeout(
        settings.connect_timeout,
        read_packet(&mut tls, &mut buf, None, max),
    )
    .await;
    let connect = match first {
        Ok(Ok(Some(Packet::Connect(connect)))) => connect,
        Ok(Ok(Some(_))) => return log_refused(&c, "", "the first packet was not CONNECT"),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            // A CONNECT we cannot read: answer 3.1.1-style when unsure of the version.
            if let codec::CodecError::UnsupportedProtocolVersion(_) = e {
                let _ = send(
                    &mut tls,
                    Protocol::V311,
                    &connack(false, reason::UNSUPPORTED_PROTOCOL_VERSION),
                )
                .await;
            }
            return log_refused(&c, "", &format!("unreadable CONNECT: {e}"));
        }
        Err(_) => return log_refused(&c, "", "no CONNECT within the connect timeout"),
    };
    let protocol = connect.protocol;
    // CONNACK carries the MQTT 5 reason code; the codec writes its 3.1.1 return code.
    let refuse = |code: u8| connack(false, code);
    // The certificate is the identity.
    let leaf = match &c.verdict {
        ClientVerdict::Valid(chain) => chain.first().cloned(),
        _ => None,
    };
    let Some(leaf) = leaf else {
        let _ = send(&mut tls, protocol, &refuse(reason::NOT_AUTHORIZED)).await;
        return log_refused(
            &c,
            &connect.client_id,
            &format!(
                "MQTT needs a valid client certificate ({})",
                c.verdict.status()
            ),
        );
    };
    let mut assigned = None;
    let client_id = if connect.client_id.is_empty() {
        if protocol == Protocol::V311 && !connect.clean_start {
            let _ = send(
                &mut tls,
                protocol,
                &refuse(reason::CLIENT_IDENTIFIER_NOT_VALID),
            )
            .await;
            return log_refused(&c, "", "an empty client id needs a clean session");
        }
        let id = format!("auto-{}", &leaf.info().id[..16]);
        assigned = Some(id.clone());
        id
    } else {
        connect.client_id.clone()
    };
    // Policies substitute the client id into topics (`telemetry/${mqtt:ClientId}/#`): an id
    // holding MQTT wildcards or a level separator would reach other devices' topics.
    if let Some(c_bad) = client_id
        .chars()
        .find(|ch| "+#/*?$".contains(*ch) || ch.is_control())
    {
        metrics::counter!("portcullis_mqtt_denials_total", "action" => "connect", "reason" => "invalid-client-id").increment(1);
        let _ = send(
            &mut tls,
            protocol,
            &refuse(reason::CLIENT_IDENTIFIER_NOT_VALID),
        )
        .await;
        return log_refused(
            &c,
            &client_id,
            &format!(
                "the client id holds {c_bad:?}; client ids may not hold + # / * ? $ or control characters"
            ),
        );
    }
    let snapshot = c.verifier.registry_snapshot();
    if settings.require_thing_client_id
        && !snapshot
            .policies()
            .things_of(&leaf.info().id)
            .contains(&client_id)
    {
        metrics::counter!("portcullis_mqtt_denials_total", "action" => "connect", "reason" => "client-id-not-thing").increment(1);
        let _ = send(
            &mut tls,
            protocol,
            &refuse(reason::CLIENT_IDENTIFIER_NOT_VALID),
        )
        .await;
        return log_refused(
            &c,
            &client_id,
            "the client id must be the name of a thing this certificate is attached to",
        );
    }
    let auth = SessionAuth::new(&c, &leaf, &client_id);
    if let Err(why) = auth.decide("mqtt:Connect", &format!("client:{client_id}")) {
        metrics::counter!("portcullis_mqtt_denials_total", "action" => "connect", "reason" => "not-allowed").increment(1);
        let _ = send(&mut tls, protocol, &refuse(reason::NOT_AUTHORIZED)).await;
        return log_refused(&c, &client_id, &format!("mqtt:Connect denied: {why}"));
    }
    // The will is authorized now, as a publication would be.
    if let Some(will) = &connect.will {
        let checked = portcullis_mqtt::topic::check_name(&will.topic)
            .map_err(|e| e.to_string())
            .and_then(|()| reserved(&will.topic))
            .and_then(|()| auth.decide("mqtt:Publish", &format!("topic:{}", will.topic)));
        if let Err(why) = checked {
            let _ = send(&mut tls, protocol, &refuse(reason::NOT_AUTHORIZED)).await;
            return log_refused(&c, &client_id, &format!("the will is not allowed: {why}"));
        }
        if will.qos == QoS::ExactlyOnce {
            let _ = send(&mut tls, protocol, &refuse(reason::QOS_NOT_SUPPORTED)).await;
            return log_refused(&c, &client_id, "a QoS 2 will is not supported");
        }
    }
    let expiry = match protocol {
        Protocol::V5 => Duration::from_secs(u64::from(
            connect.properties.session_expiry_interval.unwrap_or(0),
        )),
        Protocol::V311 if connect.clean_start => Duration::ZERO,
        Protocol::V311 => PERSISTENT_SESSION,
    };
    let identity = format!("{} ({})", leaf.info().subject, leaf.info().id);
    let mut handle = c.broker.connect(
        &client_id,
        connect.clean_start,
        expiry,
        Arc::new(auth.clone()),
        &identity,
    );
    let mut properties = ConnAckProperties::default();
    if protocol == Protocol::V5 {
        properties.maximum_qos = Some(QoS::AtLeastOnce);
        properties.retain_available = Some(true);
        properties.maximum_packet_size = u32::try_from(max).ok();
        properties.topic_alias_maximum = Some(0);
        properties.wildcard_subscription_available = Some(true);
        properties.subscription_identifiers_available = Some(false);
        properties.shared_subscription_available = Some(false);
        properties.receive_maximum = Some(u16::try_from(MAX_INFLIGHT).unwrap_or(u16::MAX));
        properties.assigned_client_identifier = assigned;
    }
    let ack = Packet::ConnAck(ConnAck {
        session_present: handle.session_present,
        code: reason::SUCCESS,
        properties,
    });
    if send(&mut tls, protocol, &ack).await.is_err() {
        c.broker.disconnected(
            &client_id,
            handle.generation,
            std::mem::take(&mut handle.pending),
            Some(&mut handle.outbound),
        );
        return;
    }
    metrics::gauge!("portcullis_mqtt_connections").increment(1.0);
    metrics::counter!("portcullis_mqtt_connects_total", "result" => "accepted").increment(1);
    tracing::info!(
        target: "portcullis::mqtt",
        peer = %c.peer,
        domain = %hostname,
        client_id = %client_id,
        protocol = if protocol == Protocol::V5 { "5" } else { "3.1.1" },
        session_present = handle.session_present,
        client_subject = %leaf.info().subject,
        client_fingerprint = %leaf.info().id,
        "mqtt session started"
    );
    let mut session = Session {
        c: &c,
        protocol,
        client_id: client_id.clone(),
        auth,
        leaf,
        inflight: HashMap::new(),
        backlog: VecDeque::new(),
        next_id: 0,
        client_max: connect
            .properties
            .maximum_packet_size
            .map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
        problem_information: protocol == Protocol::V5
            && connect.properties.request_problem_information != Some(false),
        receive_max: usize::from(connect.properties.receive_maximum.unwrap_or(u16::MAX))
            .min(MAX_INFLIGHT),
        out: BytesMut::new(),
    };
    session.run(&mut tls, buf, handle, &connect).await;
    metrics::gauge!("portcullis_mqtt_connections").decrement(1.0);
}

/// `$` topics belong to the server (registry events are published on `$portcullis/…`).
fn reserved(topic: &str) -> Result<(), String> {
    if topic.starts_with('$') {
        Err(format!(
            "topics starting with '$' are reserved for the server ({topic})"
        ))
    } else {
        Ok(())
    }
}

fn connack(session_present: bool, code: u8) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present,
        code,
        properties: ConnAckProperties::default(),
    })
}

fn log_refused(c: &Conn, client_id: &str, why: &str) {
    metrics::counter!("portcullis_mqtt_connects_total", "result" => "refused").increment(1);
    let leaf = c.verdict.leaf().map(|l| l.info());
    tracing::info!(
        target: "portcullis::mqtt",
        peer = %c.peer,
        domain = %c.domain.hostname,
        client_id,
        result = "refused",
        reason = why,
        client_subject = leaf.map(|l| l.subject.as_str()).unwrap_or(""),
        "mqtt connection refused"
    );
}

/// Reads one packet (more bytes as needed); `None` at a clean end of stream.
async fn read_packet(
    tls: &mut TlsStream<TcpStream>,
    buf: &mut BytesMut,
    protocol: Option<Protocol>,
    max: usize,
) -> Result<Option<Packet>, codec::CodecError> {
    loop {
        if let Some(p) = codec::read_packet(buf, protocol, max)? {
            return Ok(Some(p));
        }
        match tls.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

async fn send(
    tls: &mut TlsStream<TcpStream>,
    protocol: Protocol,
    packet: &Packet,
) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    codec::write_packet(packet, protocol, &mut out)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    tls.write_all(&out).await?;
    tls.flush().await
}

/// The first read of a session's loop, in bytes; doubled while reads fill it, up to MAX_READ.
const FIRST_READ: usize = 512;
const MAX_READ: usize = 64 * 1024;

/// Packets handled from one read after which a session lets other tasks run.
const YIELD_AFTER_PACKETS: usize = 64;

/// A live session.
struct Session<'a> {
    c: &'a Conn,
    protocol: Protocol,
    client_id: String,
    auth: SessionAuth,
    leaf: Certificate,
    /// QoS 1 messages sent, by packet id, until PUBACK.
    inflight: HashMap<u16, Message>,
    /// QoS 1 messages waiting for room in `inflight`.
    backlog: VecDeque<Message>,
    next_id: u16,
    /// The largest packet the client accepts (MQTT 5).
    client_max: Option<usize>,
    /// Whether acknowledgements may carry a reason string (MQTT 5, unless the client set
    /// Request Problem Information to 0).
    problem_information: bool,
    receive_max: usize,
    out: BytesMut,
}

impl Session<'_> {
    async fn run(
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
                    loop {
                        match codec::read_packet(&mut buf, Some(self.protocol), c.domain.mqtt.max_packet_size) {
                            Ok(Some(packet)) => {
                                handled += 1;
                                if let Some(end) = self.handle(packet, &handle) {
                                    ended = Some(end);
                                    break;
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
                    for _ in 0..256 {
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
        c.broker.disconnected(
            &self.client_id,
            handle.generation,
            keep,
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
    fn recheck(&self) -> Option<End> {
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
    fn handle(&mut self, packet: Packet, handle: &SessionHandle) -> Option<End> {
        let c = self.c;
        match packet {
            Packet::Publish(p) => return self.publish(p),
            Packet::PubAck(a) => {
                self.inflight.remove(&a.packet_id);
                self.refill(handle);
            }
            Packet::Subscribe(s) => {
                let mut codes = Vec::with_capacity(s.filters.len());
                let mut denials: Vec<String> = Vec::new();
                let mut retained = Vec::new();
                for f in &s.filters {
                    let refused = |code: u8| match self.protocol {
                        Protocol::V5 => code,
                        Protocol::V311 => 0x80,
                    };
                    if portcullis_mqtt::topic::check_filter(&f.filter).is_err() {
                        codes.push(refused(reason::TOPIC_FILTER_INVALID));
                        continue;
                    }
                    if f.filter.starts_with("$share/") {
                        codes.push(refused(reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED));
                        continue;
                    }
                    if let Err(why) = self
                        .auth
                        .decide("mqtt:Subscribe", &format!("topicfilter:{}", f.filter))
                    {
                        metrics::counter!("portcullis_mqtt_denials_total", "action" => "subscribe", "reason" => "not-allowed")
                            .increment(1);
                        tracing::info!(target: "portcullis::mqtt", client_id = %self.client_id, filter = %f.filter, reason = %why, "mqtt subscription denied");
                        denials.push(format!("'{}': {why}", f.filter));
                        codes.push(refused(reason::NOT_AUTHORIZED));
                        continue;
                    }
                    let granted = if f.qos == QoS::AtMostOnce {
                        QoS::AtMostOnce
                    } else {
                        QoS::AtLeastOnce
                    };
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
                                retained.extend(r);
                            }
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
                self.write(&Packet::SubAck(SubAck {
                    packet_id: s.packet_id,
                    codes,
                    properties: AckProperties {
                        reason_string,
                        ..Default::default()
                    },
                }));
                for m in retained {
                    self.deliver(m);
                }
            }
            Packet::Unsubscribe(u) => {
                let codes = u
                    .filters
                    .iter()
                    .map(|f| {
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
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => {
                return Some(End::Server(
                    reason::QOS_NOT_SUPPORTED,
                    "QoS 2 is not supported".into(),
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

    fn publish(&mut self, p: Publish) -> Option<End> {
        let c = self.c;
        if p.qos == QoS::ExactlyOnce {
            return Some(End::Server(
                reason::QOS_NOT_SUPPORTED,
                "QoS 2 is not supported; publish at QoS 0 or 1".into(),
            ));
        }
        if p.properties.topic_alias.is_some() {
            return Some(End::Server(
                reason::TOPIC_ALIAS_INVALID,
                "topic aliases are not supported (topic alias maximum 0)".into(),
            ));
        }
        let allowed = portcullis_mqtt::topic::check_name(&p.topic)
            .map_err(|e| ("invalid-topic", e.to_string()))
            .and_then(|()| reserved(&p.topic).map_err(|e| ("reserved-topic", e)))
            .and_then(|()| {
                self.auth
                    .decide("mqtt:Publish", &format!("topic:{}", p.topic))
                    .map_err(|e| ("not-allowed", e))
            });
        if let Err((code, why)) = allowed {
            metrics::counter!("portcullis_mqtt_messages_total", "direction" => "in", "result" => "denied").increment(1);
            metrics::counter!("portcullis_mqtt_denials_total", "action" => "publish", "reason" => code).increment(1);
            tracing::info!(target: "portcullis::mqtt", client_id = %self.client_id, topic = %p.topic, reason = %why, "mqtt publish denied");
            return match (self.protocol, p.qos, p.packet_id) {
                (Protocol::V5, QoS::AtLeastOnce, Some(id)) => {
                    let what = if code == "not-allowed" {
                        "publish denied by policy"
                    } else {
                        "publish refused"
                    };
                    let reason_string = self.reason_string(what, &[why], 6);
                    self.write(&Packet::PubAck(PubAck {
                        packet_id: id,
                        reason: reason::NOT_AUTHORIZED,
                        properties: AckProperties {
                            reason_string,
                            ..Default::default()
                        },
                    }));
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
        let mut properties = p.properties.clone();
        properties.topic_alias = None;
        properties.subscription_identifiers.clear();
        let message = Message {
            expires_at: expiry_of(properties.message_expiry_interval),
            sent_as: None,
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
        let routed = c.broker.publish(message, Some(&self.client_id));
        metrics::counter!("portcullis_mqtt_messages_total", "direction" => "in", "result" => "accepted").increment(1);
        if routed.dropped > 0 {
            metrics::counter!("portcullis_mqtt_messages_total", "direction" => "out", "result" => "dropped").increment(routed.dropped as u64);
        }
        if let (QoS::AtLeastOnce, Some(id)) = (p.qos, p.packet_id) {
            let code = if self.protocol == Protocol::V5 && routed.delivered + routed.queued == 0 {
                reason::NO_MATCHING_SUBSCRIBERS
            } else {
                reason::SUCCESS
            };
            self.write(&puback(id, code));
        }
        None
    }

    /// The reason string of an MQTT 5 acknowledgement: `what`, then each detail, one line,
    /// at most 256 bytes, and only if the acknowledgement (`fixed` bytes without it) still fits
    /// the client's maximum packet size; none for MQTT 3.1.1 or when the client asked for no
    /// problem information.
    fn reason_string(&self, what: &str, details: &[String], fixed: usize) -> Option<String> {
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

    /// Queues a delivery: QoS 0 is written at once, QoS 1 when there is room in flight.
    fn deliver(&mut self, m: Message) {
        if m.expires_at.is_some_and(|t| t <= Instant::now()) {
            return;
        }
        if m.qos == QoS::AtMostOnce {
            self.send_message(m, None);
        } else if self.inflight.len() < self.receive_max {
            // A message sent before and not acknowledged goes again with its packet id and
            // DUP set, so the client knows it may have seen it.
            let (id, dup) = match m.sent_as {
                Some(id) if !self.inflight.contains_key(&id) => (id, true),
                _ => (self.packet_id(), false),
            };
            self.inflight.insert(id, m.clone());
            self.send_message(m, Some((id, dup)));
        } else {
            self.backlog.push_back(m);
        }
    }

    /// Moves waiting QoS 1 messages into flight, then what the broker queued while this
    /// session's channel was full.
    fn refill(&mut self, handle: &SessionHandle) {
        while self.inflight.len() < self.receive_max {
            let Some(m) = self.backlog.pop_front() else {
                break;
            };
            self.deliver(m);
        }
        let room = self.receive_max.saturating_sub(self.inflight.len());
        if room > 0 && self.backlog.is_empty() {
            for m in self
                .c
                .broker
                .take_queued(&self.client_id, handle.generation, room)
            {
                self.deliver(m);
            }
        }
    }

    fn packet_id(&mut self) -> u16 {
        loop {
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_id) {
                return self.next_id;
            }
        }
    }

    /// Writes a PUBLISH: QoS 1 with `(packet id, DUP)`, QoS 0 without.
    fn send_message(&mut self, m: Message, qos1: Option<(u16, bool)>) {
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
                QoS::AtLeastOnce
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
            if let Some(id) = packet_id {
                self.inflight.remove(&id);
            }
            return;
        }
        metrics::counter!("portcullis_mqtt_messages_total", "direction" => "out", "result" => "sent").increment(1);
    }

    fn write(&mut self, packet: &Packet) {
        if let Err(e) = codec::write_packet(packet, self.protocol, &mut self.out) {
            tracing::warn!(target: "portcullis::mqtt", client_id = %self.client_id, error = %e, "cannot encode a packet");
        }
    }

    async fn flush(&mut self, tls: &mut TlsStream<TcpStream>) -> std::io::Result<()> {
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

fn puback(packet_id: u16, code: u8) -> Packet {
    Packet::PubAck(PubAck {
        packet_id,
        reason: code,
        properties: Default::default(),
    })
}

fn expiry_of(seconds: Option<u32>) -> Option<Instant> {
    seconds.map(|s| Instant::now() + Duration::from_secs(u64::from(s)))
}

/// `POST /topics/{topic}?qos=0|1[&retain=true]` over HTTPS: the body is published to MQTT
/// subscribers if the certificate's policies allow `mqtt:Publish` on `topic:<topic>`.
pub(crate) async fn https_publish(
    req: hyper::Request<hyper::body::Incoming>,
    leaf: &Certificate,
    verifier: &Arc<DomainVerifier>,
    domain: &Domain,
    broker: &Broker,
    peer: SocketAddr,
) -> hyper::Response<crate::http::respond::Body> {
    use http_body_util::BodyExt;
    use hyper::StatusCode;

    use crate::http::respond::{error_response, full};
    if req.method() != hyper::Method::POST {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "publish with POST /topics/{topic}?qos=0|1",
            None,
        );
    }
    let raw = req.uri().path().trim_start_matches("/topics/");
    let topic = match crate::authorize::percent_decode(raw) {
        Some(t) => t,
        None => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid-topic",
                "the topic is not valid percent-encoded UTF-8",
                None,
            );
        }
    };
    if let Err(why) = portcullis_mqtt::topic::check_name(&topic)
        .map_err(|e| e.to_string())
        .and_then(|()| reserved(&topic))
    {
        return error_response(StatusCode::BAD_REQUEST, "invalid-topic", &why, None);
    }
    let mut qos = QoS::AtMostOnce;
    let mut retain = false;
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("qos", "0") => qos = QoS::AtMostOnce,
            ("qos", "1") => qos = QoS::AtLeastOnce,
            ("retain", "true") => retain = true,
            ("retain", "false") => retain = false,
            _ => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid-query",
                    &format!("'{pair}': the query takes qos=0|1 and retain=true|false"),
                    None,
                );
            }
        }
    }
    // The body is read first (bounded): answering before it is read makes HTTP/2 clients see
    // the stream reset.
    let max = domain.mqtt.max_packet_size;
    let payload = match http_body_util::Limited::new(req.into_body(), max)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                &format!("the message is larger than {max} bytes (mqtt.max_packet_size)"),
                None,
            );
        }
    };
    let decision = verifier.registry_snapshot().policies().decide(
        Some(leaf),
        &domain.hostname.to_string(),
        "mqtt:Publish",
        &format!("topic:{topic}"),
        peer.ip(),
    );
    if !decision.allowed {
        metrics::counter!("portcullis_mqtt_denials_total", "action" => "publish", "reason" => "not-allowed").increment(1);
        return error_response(
            StatusCode::FORBIDDEN,
            "policy-denied",
            &format!("Access denied: {}.", decision.reason),
            None,
        );
    }
    let message = Message {
        topic: topic.clone(),
        payload,
        qos,
        retain,
        properties: Default::default(),
        expires_at: None,
        sent_as: None,
    };
    verifier.forward(|| envelope(&message, None, leaf, verifier), &topic);
    let routed = broker.publish(message, None);
    metrics::counter!("portcullis_mqtt_messages_total", "direction" => "in", "result" => "accepted").increment(1);
    let body = serde_json::json!({
        "topic": topic,
        "qos": qos as u8,
        "delivered": routed.delivered,
        "queued": routed.queued,
    });
    let mut resp = hyper::Response::new(full(body.to_string()));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The JSON a forwarding rule delivers for a message: the payload as text when it is UTF-8,
/// base64 otherwise, with who sent it.
fn envelope(
    message: &Message,
    client_id: Option<&str>,
    leaf: &Certificate,
    verifier: &DomainVerifier,
) -> String {
    use base64::Engine;
    let id = &leaf.info().id;
    let things: Vec<String> = verifier
        .registry_snapshot()
        .policies()
        .things_of(id)
        .to_vec();
    let (payload, encoding) = match std::str::from_utf8(&message.payload) {
        Ok(text) => (serde_json::Value::String(text.to_string()), "utf-8"),
        Err(_) => (
            serde_json::Value::String(
                base64::engine::general_purpose::STANDARD.encode(&message.payload),
            ),
            "base64",
        ),
    };
    serde_json::json!({
        "event": "mqtt.message",
        "occurred_at": crate::authorize::now(),
        "topic": message.topic,
        "payload": payload,
        "payload_encoding": encoding,
        "qos": message.qos as u8,
        "retain": message.retain,
        "client_id": client_id,
        "certificate_id": id,
        "thing": things.first(),
        "things": things,
    })
    .to_string()
}
