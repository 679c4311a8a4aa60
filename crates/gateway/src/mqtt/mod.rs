//! The MQTT endpoint: one task per connection, behind the same TLS front end, verifier,
//! registry modes and JIT registration as HTTP. The verified certificate is the identity (a
//! username or password grants nothing); the registry's policies decide `mqtt:Connect` on
//! `client:<id>`, `mqtt:Publish` on `topic:<name>`, `mqtt:Subscribe` on `topicfilter:<filter>`
//! and, on every delivery, `mqtt:Receive` on `topic:<name>`. QoS 0, 1 and 2; shared
//! subscriptions (`$share/GROUP/FILTER`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use portcullis_mqtt::broker::Broker;
use portcullis_mqtt::codec::{self, ConnAck, ConnAckProperties, Packet, Protocol, PubAck, reason};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;

use crate::config::Domain;
use crate::verdict::ClientVerdict;
use crate::verify::DomainVerifier;

mod auth;
mod publish;
mod session;

pub(crate) use auth::SessionAuth;
pub(crate) use publish::https_publish;
use session::Session;

/// The message counters every packet bumps, looked up in the registry once: a labelled
/// `counter!` hashes and compares its labels on every call. First used by a session, after
/// `serve` installed the recorder.
pub(crate) struct MessageCounters {
    pub(crate) in_accepted: metrics::Counter,
    pub(crate) out_sent: metrics::Counter,
    pub(crate) out_dropped: metrics::Counter,
}

pub(crate) fn message_counters() -> &'static MessageCounters {
    static COUNTERS: std::sync::OnceLock<MessageCounters> = std::sync::OnceLock::new();
    COUNTERS.get_or_init(|| MessageCounters {
        in_accepted: metrics::counter!("portcullis_mqtt_messages_total", "direction" => "in", "result" => "accepted"),
        out_sent: metrics::counter!("portcullis_mqtt_messages_total", "direction" => "out", "result" => "sent"),
        out_dropped: metrics::counter!("portcullis_mqtt_messages_total", "direction" => "out", "result" => "dropped"),
    })
}

/// QoS 1 messages sent and not yet acknowledged, per session, at most.
const MAX_INFLIGHT: usize = 64;

/// How long a MQTT 3.1.1 persistent session outlives its connection (MQTT 5 clients say).
const PERSISTENT_SESSION: Duration = Duration::from_secs(3600);

/// How long a CONNECT waits for the cluster to record its node as the session's owner.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a CONNECT waits for the cluster to keep a persistent session's subscriptions (it
/// rides through a JetStream election).
const STORE_TIMEOUT: Duration = Duration::from_secs(15);

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

/// Why a session ended, for the log.
enum End {
    /// The client sent DISCONNECT (with the will requested, for reason 0x04).
    Client { publish_will: bool },
    /// The network connection closed without DISCONNECT.
    Lost,
    /// We closed it, with this MQTT 5 reason code and explanation.
    Server(u8, String),
}

/// Serves one MQTT connection after the TLS handshake: CONNECT in a future of its own (boxed:
/// its state is large and an idle session holds none of it), then the session.
pub(crate) async fn serve(mut tls: Box<TlsStream<TcpStream>>, c: Conn) {
    let Some(Accepted {
        protocol,
        client_id,
        auth,
        leaf,
        connect,
        handle,
        buf,
    }) = Box::pin(accept(&mut tls, &c)).await
    else {
        return;
    };
    let mut session = Session {
        c: &c,
        protocol,
        client_id,
        auth,
        leaf,
        inflight: HashMap::new(),
        backlog: VecDeque::new(),
        backlogged: handle.backlogged.clone(),
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
        awaiting_release: Default::default(),
        owed: VecDeque::new(),
        fleet: None,
    };
    session.run(&mut tls, buf, handle, &connect).await;
    metrics::gauge!("portcullis_mqtt_connections").decrement(1.0);
}

/// A CONNECT accepted and answered: what the session starts from.
struct Accepted {
    protocol: Protocol,
    client_id: String,
    auth: SessionAuth,
    leaf: portcullis_pki::Certificate,
    connect: codec::Connect,
    handle: portcullis_mqtt::broker::SessionHandle,
    buf: BytesMut,
}

/// Reads CONNECT and decides it (client id, thing, policy, will, the cluster's ownership and
/// persistent session), answering CONNACK. `None`: refused (and answered and logged) or gone.
async fn accept(tls: &mut TlsStream<TcpStream>, c: &Conn) -> Option<Accepted> {
    let settings = c.domain.mqtt.clone();
    let max = settings.max_packet_size;
    // Small to start: most devices send little, and an idle session keeps its buffer. It grows
    // for publishers that send more.
    let mut buf = BytesMut::with_capacity(512);
    let hostname = c.domain.hostname.to_string();
    let first = tokio::time::timeout(
        settings.connect_timeout,
        read_packet(tls, &mut buf, None, max),
    )
    .await;
    let connect = match first {
        Ok(Ok(Some(Packet::Connect(connect)))) => connect,
        Ok(Ok(Some(_))) => return log_refused(c, "", "the first packet was not CONNECT"),
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            // A CONNECT we cannot read: answer 3.1.1-style when unsure of the version.
            if let codec::CodecError::UnsupportedProtocolVersion(_) = e {
                let _ = send(
                    tls,
                    Protocol::V311,
                    &connack(false, reason::UNSUPPORTED_PROTOCOL_VERSION),
                )
                .await;
            }
            return log_refused(c, "", &format!("unreadable CONNECT: {e}"));
        }
        Err(_) => return log_refused(c, "", "no CONNECT within the connect timeout"),
    };
    let protocol = connect.protocol;
    // CONNACK carries the MQTT 5 reason code; the codec writes its 3.1.1 return code.
    let refuse = |code: u8| connack(false, code);
    // The certificate is the identity.
    // An expired certificate in its grace period connects to renew itself, and nothing else.
    let renew_only = c.verdict.renew_only().is_some();
    let leaf = match &c.verdict {
        ClientVerdict::Valid(chain) => chain.first().cloned(),
        other => other.renew_only().cloned(),
    };
    let Some(leaf) = leaf else {
        let _ = send(tls, protocol, &refuse(reason::NOT_AUTHORIZED)).await;
        return log_refused(
            c,
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
            let _ = send(tls, protocol, &refuse(reason::CLIENT_IDENTIFIER_NOT_VALID)).await;
            return log_refused(c, "", "an empty client id needs a clean session");
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
        let _ = send(tls, protocol, &refuse(reason::CLIENT_IDENTIFIER_NOT_VALID)).await;
        return log_refused(
            c,
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
        let _ = send(tls, protocol, &refuse(reason::CLIENT_IDENTIFIER_NOT_VALID)).await;
        return log_refused(
            c,
            &client_id,
            "the client id must be the name of a thing this certificate is attached to",
        );
    }
    // A claim certificate (shared by a batch of devices) may not take a device's client id: it
    // would close that device's session and could clear what it kept.
    let policies = c.verifier.registry_snapshot();
    if policies.policies().claim_templates(&leaf).is_some()
        && policies.policies().is_thing(&client_id)
    {
        let _ = send(tls, protocol, &refuse(reason::NOT_AUTHORIZED)).await;
        return log_refused(
            c,
            &client_id,
            "a claim certificate may not connect with a thing's name as its client id",
        );
    }
    // A certificate in its grace period connects as one of its own things, or under its own
    // automatic id: it may not take over another client's session.
    if renew_only
        && client_id != format!("auto-{}", &leaf.info().id[..16])
        && !policies
            .policies()
            .things_of(&leaf.info().id)
            .contains(&client_id)
    {
        let _ = send(tls, protocol, &refuse(reason::NOT_AUTHORIZED)).await;
        return log_refused(
            c,
            &client_id,
            "a certificate in its grace period may connect as its own thing (or with an empty client id) only",
        );
    }
    let auth = SessionAuth::new(c, &leaf, &client_id, renew_only);
    if let Err(why) = auth.decide("mqtt:Connect", &format!("client:{client_id}")) {
        metrics::counter!("portcullis_mqtt_denials_total", "action" => "connect", "reason" => "not-allowed").increment(1);
        let _ = send(tls, protocol, &refuse(reason::NOT_AUTHORIZED)).await;
        return log_refused(c, &client_id, &format!("mqtt:Connect denied: {why}"));
    }
    // The will is authorized now, as a publication would be.
    if let Some(will) = &connect.will {
        let checked = portcullis_mqtt::topic::check_name(&will.topic)
            .map_err(|e| e.to_string())
            .and_then(|()| reserved(&will.topic))
            .and_then(|()| auth.decide("mqtt:Publish", &format!("topic:{}", will.topic)));
        if let Err(why) = checked {
            let _ = send(tls, protocol, &refuse(reason::NOT_AUTHORIZED)).await;
            return log_refused(c, &client_id, &format!("the will is not allowed: {why}"));
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
    // In a cluster, this node becomes the client id's owner first: a session another node
    // holds is taken over there, and a persistent session the cluster keeps comes back.
    let mut stored = None;
    let mut claimed_revision = None;
    if let Some(claim) = c.broker.claim(&client_id, connect.clean_start, &identity) {
        let claimed = match tokio::time::timeout(CLAIM_TIMEOUT, claim).await {
            Ok(Ok(Ok(claim))) => Ok(claim),
            Ok(Ok(Err(why))) => Err(why),
            Ok(Err(_)) => Err("the cluster connection closed".to_string()),
            Err(_) => Err(format!("no answer within {CLAIM_TIMEOUT:?}")),
        };
        match claimed {
            Ok(claim) => {
                stored = claim.session;
                claimed_revision = Some(claim.revision);
            }
            Err(why) => {
                let _ = send(tls, protocol, &refuse(reason::SERVER_UNAVAILABLE)).await;
                return log_refused(
                    c,
                    &client_id,
                    &format!(
                        "the cluster could not record this node as the session's owner: {why}"
                    ),
                );
            }
        }
    }
    let stored_expiry = stored.as_ref().map(|s| s.expiry);
    let stored_offline_for = stored.as_ref().and_then(|s| s.offline_for);
    let mut handle = c.broker.connect(
        &client_id,
        connect.clean_start,
        expiry,
        Arc::new(auth.clone()),
        &identity,
    );
    if let Some(revision) = claimed_revision {
        c.broker.claimed(&client_id, handle.generation, revision);
    }
    // Refused before CONNACK, a session this CONNECT resumed stays as it was (its expiry
    // included: an expiry of zero asked for must not end it and lose what it kept; and its
    // offline clock, as this node or the cluster had it).
    let kept_expiry = handle.resumed_expiry.or(stored_expiry);
    if handle.resumed_offline_since.is_none() {
        handle.resumed_offline_since =
            stored_offline_for.and_then(|d| std::time::Instant::now().checked_sub(d));
    }
    // A session resumed with an expiry of zero (MQTT 5) is still resumed: its queued messages
    // and subscriptions come back, and it ends with this connection.
    if (!expiry.is_zero() || !connect.clean_start)
        && let Err(why) = resume_in_cluster(c, &client_id, &mut handle, stored, &auth).await
    {
        let _ = send(tls, protocol, &refuse(reason::SERVER_UNAVAILABLE)).await;
        c.broker.refused(&mut handle, kept_expiry);
        return log_refused(
            c,
            &client_id,
            &format!("the cluster could not keep the persistent session: {why}"),
        );
    }
    let mut properties = ConnAckProperties::default();
    if protocol == Protocol::V5 {
        properties.retain_available = Some(true);
        properties.maximum_packet_size = u32::try_from(max).ok();
        properties.topic_alias_maximum = Some(0);
        properties.wildcard_subscription_available = Some(true);
        properties.subscription_identifiers_available = Some(false);
        properties.shared_subscription_available = Some(true);
        properties.receive_maximum = Some(u16::try_from(MAX_INFLIGHT).unwrap_or(u16::MAX));
        properties.assigned_client_identifier = assigned;
    }
    let ack = Packet::ConnAck(ConnAck {
        session_present: handle.session_present,
        code: reason::SUCCESS,
        properties,
    });
    if send(tls, protocol, &ack).await.is_err() {
        c.broker.refused(&mut handle, kept_expiry);
        return None;
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
    Some(Accepted {
        protocol,
        client_id,
        auth,
        leaf,
        connect,
        handle,
        buf,
    })
}

/// A persistent session in a cluster: the cluster keeps its QoS 1 and 2 messages from now on,
/// and a session it kept (left on another node, or before this node restarted) comes back with
/// its subscriptions, each still allowed by the policies of the moment. Nothing to do for a
/// session with an expiry of zero that resumes nothing.
async fn resume_in_cluster(
    c: &Conn,
    client_id: &str,
    handle: &mut portcullis_mqtt::broker::SessionHandle,
    stored: Option<portcullis_mqtt::broker::StoredSession>,
    auth: &SessionAuth,
) -> Result<(), String> {
    let mut ready = c.broker.make_durable(
        client_id,
        handle.generation,
        stored.as_ref().map(|s| s.incarnation),
    );
    if let Some(stored) = stored
        && !handle.session_present
    {
        for (filter, options) in stored.subscriptions {
            if auth
                .decide("mqtt:Subscribe", &format!("topicfilter:{filter}"))
                .is_err()
            {
                continue;
            }
            if let Some(s) =
                c.broker
                    .restore_subscription(client_id, handle.generation, &filter, options)
            {
                ready.extend(s.ready);
            }
        }
        handle.session_present = true;
    }
    for r in ready {
        match tokio::time::timeout(STORE_TIMEOUT, r).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(why))) => return Err(why),
            Ok(Err(_)) => return Err("the cluster connection closed".into()),
            Err(_) => return Err(format!("no answer within {STORE_TIMEOUT:?}")),
        }
    }
    Ok(())
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

fn log_refused<T>(c: &Conn, client_id: &str, why: &str) -> Option<T> {
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
    None
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
