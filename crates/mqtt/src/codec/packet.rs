//! The packets as plain values. Section numbers refer to MQTT 5 (OASIS, 2019); MQTT 3.1.1 has
//! the same packets with fewer fields.

use bytes::Bytes;

/// The MQTT version a connection speaks, fixed by its CONNECT packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5 (protocol level 5).
    V5,
}

impl Protocol {
    /// The protocol level CONNECT carries: 4 for MQTT 3.1.1, 5 for MQTT 5.
    pub fn level(self) -> u8 {
        match self {
            Protocol::V311 => 4,
            Protocol::V5 => 5,
        }
    }
}

/// Quality of service of a message or subscription; ordered from weakest to strongest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    /// QoS 0: delivered at most once, never acknowledged.
    AtMostOnce = 0,
    /// QoS 1: delivered at least once, acknowledged by PUBACK.
    AtLeastOnce = 1,
    /// QoS 2: delivered exactly once, through PUBREC, PUBREL and PUBCOMP.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS a two-bit field encodes, or `None` for 3, which MQTT reserves (and for anything
    /// larger).
    pub fn from_bits(bits: u8) -> Option<QoS> {
        match bits {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// One MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Client to server: open a session (§3.1).
    Connect(Connect),
    /// Server to client: the answer to CONNECT (§3.2).
    ConnAck(ConnAck),
    /// Either way: an application message (§3.3).
    Publish(Publish),
    /// Either way: acknowledges a QoS 1 PUBLISH (§3.4).
    PubAck(PubAck),
    /// Either way: QoS 2, first acknowledgement of a PUBLISH (§3.5).
    PubRec(PubAck),
    /// Either way: QoS 2, answer to PUBREC (§3.6).
    PubRel(PubAck),
    /// Either way: QoS 2, answer to PUBREL (§3.7).
    PubComp(PubAck),
    /// Client to server: subscribe to topic filters (§3.8).
    Subscribe(Subscribe),
    /// Server to client: the answer to SUBSCRIBE (§3.9).
    SubAck(SubAck),
    /// Client to server: remove subscriptions (§3.10).
    Unsubscribe(Unsubscribe),
    /// Server to client: the answer to UNSUBSCRIBE (§3.11).
    UnsubAck(UnsubAck),
    /// Client to server: keep-alive probe (§3.12).
    PingReq,
    /// Server to client: the answer to PINGREQ (§3.13).
    PingResp,
    /// Either way in MQTT 5, client to server in 3.1.1: the connection ends (§3.14).
    Disconnect(Disconnect),
    /// Either way, MQTT 5 only: an extended authentication exchange (§3.15).
    Auth(Auth),
}

/// CONNECT (§3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The version the client speaks; the connection uses it from now on.
    pub protocol: Protocol,
    /// The client identifier; may be empty (the server then assigns one or refuses).
    pub client_id: String,
    /// Clean Start (MQTT 5) or Clean Session (3.1.1).
    pub clean_start: bool,
    /// Keep alive in seconds; 0 turns it off.
    pub keep_alive: u16,
    /// The user name, if the client sent one.
    pub username: Option<String>,
    /// The password, if the client sent one (binary data).
    pub password: Option<Bytes>,
    /// The message to publish if the connection ends without DISCONNECT.
    pub will: Option<Will>,
    /// MQTT 5 properties.
    pub properties: ConnectProperties,
}

/// The Will Message of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Topic name; never empty and without wildcards.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS to publish it with.
    pub qos: QoS,
    /// Whether to publish it retained.
    pub retain: bool,
    /// MQTT 5 Will Delay Interval in seconds: how long after the connection ends to publish.
    pub delay_interval: Option<u32>,
    /// MQTT 5 will properties, ready to publish with: payload format, message expiry, content
    /// type, response topic, correlation data and user properties. A will cannot carry a topic
    /// alias or subscription identifiers.
    pub properties: PublishProperties,
}

/// MQTT 5 CONNECT properties (§3.1.2.11).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectProperties {
    /// Seconds the session outlives the connection (absent: 0, ended with it).
    pub session_expiry_interval: Option<u32>,
    /// QoS 1 and 2 messages the client accepts unacknowledged (absent: 65,535); never 0.
    pub receive_maximum: Option<u16>,
    /// Largest packet the client accepts (absent: no limit); never 0.
    pub maximum_packet_size: Option<u32>,
    /// Highest topic alias the client accepts from the server (absent: 0, none).
    pub topic_alias_maximum: Option<u16>,
    /// Whether the client asks for response information in CONNACK.
    pub request_response_information: Option<bool>,
    /// Whether reason strings and user properties may be sent on failures (absent: yes).
    pub request_problem_information: Option<bool>,
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
    /// Extended authentication method.
    pub authentication_method: Option<String>,
    /// Extended authentication data; only with a method.
    pub authentication_data: Option<Bytes>,
}

/// CONNACK (§3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    /// Whether the server resumed a session; only with a success code.
    pub session_present: bool,
    /// The MQTT 5 reason code (see [`reason`](super::reason)). Written to MQTT 3.1.1 as the
    /// closest return code ([`connack_return_code_v311`](super::connack_return_code_v311)),
    /// and read from it as the MQTT 5 code of the same meaning.
    pub code: u8,
    /// MQTT 5 properties.
    pub properties: ConnAckProperties,
}

/// MQTT 5 CONNACK properties (§3.2.2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAckProperties {
    /// Session expiry the server uses, if not the client's.
    pub session_expiry_interval: Option<u32>,
    /// QoS 1 and 2 messages the server accepts unacknowledged (absent: 65,535); never 0.
    pub receive_maximum: Option<u16>,
    /// Highest QoS the server supports (absent: 2); never 2 when present.
    pub maximum_qos: Option<QoS>,
    /// Whether retained messages are supported (absent: yes).
    pub retain_available: Option<bool>,
    /// Largest packet the server accepts (absent: no limit); never 0.
    pub maximum_packet_size: Option<u32>,
    /// The client identifier the server assigned, when the client sent an empty one.
    pub assigned_client_identifier: Option<String>,
    /// Highest topic alias the server accepts (absent: 0, none).
    pub topic_alias_maximum: Option<u16>,
    /// A human-readable reason, for diagnostics only.
    pub reason_string: Option<String>,
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
    /// Whether wildcard subscriptions are supported (absent: yes).
    pub wildcard_subscription_available: Option<bool>,
    /// Whether subscription identifiers are supported (absent: yes).
    pub subscription_identifiers_available: Option<bool>,
    /// Whether shared subscriptions are supported (absent: yes).
    pub shared_subscription_available: Option<bool>,
    /// Keep alive the client must use instead of its own, in seconds.
    pub server_keep_alive: Option<u16>,
    /// Basis for response topics, when the client asked for it.
    pub response_information: Option<String>,
    /// Another server to use.
    pub server_reference: Option<String>,
    /// Extended authentication method.
    pub authentication_method: Option<String>,
    /// Extended authentication data.
    pub authentication_data: Option<Bytes>,
}

/// PUBLISH (§3.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Whether this is a redelivery; never with QoS 0.
    pub dup: bool,
    /// The QoS it is sent with.
    pub qos: QoS,
    /// Whether the message is (to be) retained.
    pub retain: bool,
    /// Topic name: no wildcards, and empty only with an MQTT 5 topic alias.
    pub topic: String,
    /// Packet identifier: `Some` (and not 0) exactly when QoS is 1 or 2.
    pub packet_id: Option<u16>,
    /// Payload.
    pub payload: Bytes,
    /// MQTT 5 properties.
    pub properties: PublishProperties,
}

/// MQTT 5 PUBLISH properties (§3.3.2.3), also used for a will's properties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishProperties {
    /// 0: the payload is unspecified bytes; 1: it is UTF-8 text.
    pub payload_format_indicator: Option<u8>,
    /// Seconds the message lives (absent: forever).
    pub message_expiry_interval: Option<u32>,
    /// Topic alias, standing for (or, with a topic, setting) a topic name; never 0.
    pub topic_alias: Option<u16>,
    /// Topic name for a response; no wildcards.
    pub response_topic: Option<String>,
    /// Correlation data for a response.
    pub correlation_data: Option<Bytes>,
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
    /// Identifiers of the subscriptions the message matched (server to client only); never 0.
    pub subscription_identifiers: Vec<u32>,
    /// MIME type or other description of the payload.
    pub content_type: Option<String>,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP (§3.4–3.7): which one is said by the [`Packet`] variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubAck {
    /// Identifier of the packet acknowledged.
    pub packet_id: u16,
    /// MQTT 5 reason code; 0 (success) in MQTT 3.1.1.
    pub reason: u8,
    /// MQTT 5 properties.
    pub properties: AckProperties,
}

/// MQTT 5 properties of PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckProperties {
    /// A human-readable reason, for diagnostics only.
    pub reason_string: Option<String>,
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
}

/// SUBSCRIBE (§3.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier; never 0.
    pub packet_id: u16,
    /// The filters, at least one, in order.
    pub filters: Vec<SubscribeFilter>,
    /// MQTT 5 properties.
    pub properties: SubscribeProperties,
}

/// One topic filter of a SUBSCRIBE with its options (§3.8.3.1). The filter's syntax is not
/// checked by the codec: a bad filter is refused in SUBACK, not by closing the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter {
    /// The topic filter.
    pub filter: String,
    /// Maximum QoS to deliver with.
    pub qos: QoS,
    /// MQTT 5: do not deliver messages this connection published.
    pub no_local: bool,
    /// MQTT 5: keep the retain flag of forwarded messages as published.
    pub retain_as_published: bool,
    /// MQTT 5: 0 send retained messages on subscribe, 1 only for a new subscription, 2 never.
    pub retain_handling: u8,
}

/// MQTT 5 SUBSCRIBE properties (§3.8.2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscribeProperties {
    /// Identifier given back in messages matching these subscriptions; never 0.
    pub subscription_identifier: Option<u32>,
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
}

/// SUBACK (§3.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Identifier of the SUBSCRIBE answered.
    pub packet_id: u16,
    /// One code per filter: the QoS granted (0, 1, 2) or a failure (0x80 and up). MQTT 3.1.1
    /// knows only 0x80 as failure; other failure codes are written to it as 0x80.
    pub codes: Vec<u8>,
    /// MQTT 5 properties.
    pub properties: AckProperties,
}

/// UNSUBSCRIBE (§3.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier; never 0.
    pub packet_id: u16,
    /// The filters, at least one, in order.
    pub filters: Vec<String>,
    /// MQTT 5 properties.
    pub properties: UnsubscribeProperties,
}

/// MQTT 5 UNSUBSCRIBE properties (§3.10.2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnsubscribeProperties {
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
}

/// UNSUBACK (§3.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    /// Identifier of the UNSUBSCRIBE answered.
    pub packet_id: u16,
    /// MQTT 5: one reason code per filter; always empty in MQTT 3.1.1.
    pub codes: Vec<u8>,
    /// MQTT 5 properties.
    pub properties: AckProperties,
}

/// DISCONNECT (§3.14). MQTT 3.1.1's has no body: reason 0 and no properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// MQTT 5 reason code; 0 is a normal disconnection.
    pub reason: u8,
    /// MQTT 5 properties.
    pub properties: DisconnectProperties,
}

/// MQTT 5 DISCONNECT properties (§3.14.2.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DisconnectProperties {
    /// New session expiry (client to server only).
    pub session_expiry_interval: Option<u32>,
    /// A human-readable reason, for diagnostics only.
    pub reason_string: Option<String>,
    /// Another server to use.
    pub server_reference: Option<String>,
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
}

/// AUTH (§3.15), MQTT 5 only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// 0x00 success, 0x18 continue authentication, 0x19 re-authenticate.
    pub reason: u8,
    /// Properties.
    pub properties: AuthProperties,
}

/// AUTH properties (§3.15.2.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthProperties {
    /// Extended authentication method.
    pub authentication_method: Option<String>,
    /// Extended authentication data; only with a method.
    pub authentication_data: Option<Bytes>,
    /// A human-readable reason, for diagnostics only.
    pub reason_string: Option<String>,
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
}
