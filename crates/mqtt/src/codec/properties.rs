//! MQTT 5 properties (§2.2.2): which packet may carry which, reading them with the checks the
//! specification asks for, and writing them.

use bytes::{BufMut, Bytes, BytesMut};

use super::wire::{
    Reader, cannot_encode, check_topic_name, malformed, protocol_error, put_binary, put_string,
    put_varint,
};
use super::{
    AckProperties, AuthProperties, CodecError, ConnAckProperties, ConnectProperties,
    DisconnectProperties, PublishProperties, QoS, SubscribeProperties, UnsubscribeProperties,
};

const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
const CONTENT_TYPE: u8 = 0x03;
const RESPONSE_TOPIC: u8 = 0x08;
const CORRELATION_DATA: u8 = 0x09;
const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
const SERVER_KEEP_ALIVE: u8 = 0x13;
const AUTHENTICATION_METHOD: u8 = 0x15;
const AUTHENTICATION_DATA: u8 = 0x16;
const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
const WILL_DELAY_INTERVAL: u8 = 0x18;
const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
const RESPONSE_INFORMATION: u8 = 0x1A;
const SERVER_REFERENCE: u8 = 0x1C;
const REASON_STRING: u8 = 0x1F;
const RECEIVE_MAXIMUM: u8 = 0x21;
const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
const TOPIC_ALIAS: u8 = 0x23;
const MAXIMUM_QOS: u8 = 0x24;
const RETAIN_AVAILABLE: u8 = 0x25;
const USER_PROPERTY: u8 = 0x26;
const MAXIMUM_PACKET_SIZE: u8 = 0x27;
const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

/// The name of a property identifier, or `None` if MQTT 5 defines no such property.
fn property_name(id: u32) -> Option<&'static str> {
    let id = u8::try_from(id).ok()?;
    Some(match id {
        PAYLOAD_FORMAT_INDICATOR => "payload format indicator",
        MESSAGE_EXPIRY_INTERVAL => "message expiry interval",
        CONTENT_TYPE => "content type",
        RESPONSE_TOPIC => "response topic",
        CORRELATION_DATA => "correlation data",
        SUBSCRIPTION_IDENTIFIER => "subscription identifier",
        SESSION_EXPIRY_INTERVAL => "session expiry interval",
        ASSIGNED_CLIENT_IDENTIFIER => "assigned client identifier",
        SERVER_KEEP_ALIVE => "server keep alive",
        AUTHENTICATION_METHOD => "authentication method",
        AUTHENTICATION_DATA => "authentication data",
        REQUEST_PROBLEM_INFORMATION => "request problem information",
        WILL_DELAY_INTERVAL => "will delay interval",
        REQUEST_RESPONSE_INFORMATION => "request response information",
        RESPONSE_INFORMATION => "response information",
        SERVER_REFERENCE => "server reference",
        REASON_STRING => "reason string",
        RECEIVE_MAXIMUM => "receive maximum",
        TOPIC_ALIAS_MAXIMUM => "topic alias maximum",
        TOPIC_ALIAS => "topic alias",
        MAXIMUM_QOS => "maximum QoS",
        RETAIN_AVAILABLE => "retain available",
        USER_PROPERTY => "user property",
        MAXIMUM_PACKET_SIZE => "maximum packet size",
        WILDCARD_SUBSCRIPTION_AVAILABLE => "wildcard subscription available",
        SUBSCRIPTION_IDENTIFIER_AVAILABLE => "subscription identifier available",
        SHARED_SUBSCRIPTION_AVAILABLE => "shared subscription available",
        _ => return None,
    })
}

/// The properties one packet type may carry, and which of them may appear more than once.
pub(super) struct Allowed {
    ids: u64,
    repeatable: u64,
    /// The packet's name, for messages.
    packet: &'static str,
}

const fn mask(ids: &[u8]) -> u64 {
    let mut mask = 0;
    let mut i = 0;
    while i < ids.len() {
        mask |= 1 << ids[i];
        i += 1;
    }
    mask
}

const USER_ONLY: u64 = mask(&[USER_PROPERTY]);

pub(super) const CONNECT: Allowed = Allowed {
    ids: mask(&[
        SESSION_EXPIRY_INTERVAL,
        RECEIVE_MAXIMUM,
        MAXIMUM_PACKET_SIZE,
        TOPIC_ALIAS_MAXIMUM,
        REQUEST_RESPONSE_INFORMATION,
        REQUEST_PROBLEM_INFORMATION,
        USER_PROPERTY,
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
    ]),
    repeatable: USER_ONLY,
    packet: "CONNECT",
};

pub(super) const WILL: Allowed = Allowed {
    ids: mask(&[
        WILL_DELAY_INTERVAL,
        PAYLOAD_FORMAT_INDICATOR,
        MESSAGE_EXPIRY_INTERVAL,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        USER_PROPERTY,
    ]),
    repeatable: USER_ONLY,
    packet: "will properties",
};

pub(super) const CONNACK: Allowed = Allowed {
    ids: mask(&[
        SESSION_EXPIRY_INTERVAL,
        RECEIVE_MAXIMUM,
        MAXIMUM_QOS,
        RETAIN_AVAILABLE,
        MAXIMUM_PACKET_SIZE,
        ASSIGNED_CLIENT_IDENTIFIER,
        TOPIC_ALIAS_MAXIMUM,
        REASON_STRING,
        USER_PROPERTY,
        WILDCARD_SUBSCRIPTION_AVAILABLE,
        SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        SHARED_SUBSCRIPTION_AVAILABLE,
        SERVER_KEEP_ALIVE,
        RESPONSE_INFORMATION,
        SERVER_REFERENCE,
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
    ]),
    repeatable: USER_ONLY,
    packet: "CONNACK",
};

pub(super) const PUBLISH: Allowed = Allowed {
    ids: mask(&[
        PAYLOAD_FORMAT_INDICATOR,
        MESSAGE_EXPIRY_INTERVAL,
        TOPIC_ALIAS,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        USER_PROPERTY,
        SUBSCRIPTION_IDENTIFIER,
        CONTENT_TYPE,
    ]),
    // A message matching several subscriptions carries each one's identifier (§3.3.2.3.8).
    repeatable: mask(&[USER_PROPERTY, SUBSCRIPTION_IDENTIFIER]),
    packet: "PUBLISH",
};

/// PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
pub(super) const fn ack(packet: &'static str) -> Allowed {
    Allowed {
        ids: mask(&[REASON_STRING, USER_PROPERTY]),
        repeatable: USER_ONLY,
        packet,
    }
}

pub(super) const SUBSCRIBE: Allowed = Allowed {
    ids: mask(&[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY]),
    repeatable: USER_ONLY,
    packet: "SUBSCRIBE",
};

pub(super) const UNSUBSCRIBE: Allowed = Allowed {
    ids: USER_ONLY,
    repeatable: USER_ONLY,
    packet: "UNSUBSCRIBE",
};

pub(super) const DISCONNECT: Allowed = Allowed {
    ids: mask(&[
        SESSION_EXPIRY_INTERVAL,
        REASON_STRING,
        USER_PROPERTY,
        SERVER_REFERENCE,
    ]),
    repeatable: USER_ONLY,
    packet: "DISCONNECT",
};

pub(super) const AUTH: Allowed = Allowed {
    ids: mask(&[
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
        REASON_STRING,
        USER_PROPERTY,
    ]),
    repeatable: USER_ONLY,
    packet: "AUTH",
};

/// Every property of every packet type, as read; the packet's own struct is taken from it.
#[derive(Default)]
pub(super) struct Properties {
    payload_format_indicator: Option<u8>,
    message_expiry_interval: Option<u32>,
    content_type: Option<String>,
    response_topic: Option<String>,
    correlation_data: Option<Bytes>,
    subscription_identifiers: Vec<u32>,
    session_expiry_interval: Option<u32>,
    assigned_client_identifier: Option<String>,
    server_keep_alive: Option<u16>,
    authentication_method: Option<String>,
    authentication_data: Option<Bytes>,
    request_problem_information: Option<bool>,
    will_delay_interval: Option<u32>,
    request_response_information: Option<bool>,
    response_information: Option<String>,
    server_reference: Option<String>,
    reason_string: Option<String>,
    receive_maximum: Option<u16>,
    topic_alias_maximum: Option<u16>,
    topic_alias: Option<u16>,
    maximum_qos: Option<QoS>,
    retain_available: Option<bool>,
    user_properties: Vec<(String, String)>,
    maximum_packet_size: Option<u32>,
    wildcard_subscription_available: Option<bool>,
    subscription_identifiers_available: Option<bool>,
    shared_subscription_available: Option<bool>,
}

/// Reads a property length and the properties it covers.
///
/// A property the packet type may not carry is malformed (§2.2.2.2), as is an unknown one; a
/// second copy of one that may appear once is a protocol error, and so are values the
/// specification rules out (0 where 0 is meaningless, a flag other than 0 or 1).
pub(super) fn read(r: &mut Reader, allowed: &Allowed) -> Result<Properties, CodecError> {
    let length = r.varint("property length")?;
    let mut r = r.split(length as usize, "properties")?;
    let mut p = Properties::default();
    let mut seen = 0u64;
    while !r.is_empty() {
        let id = r.varint("property identifier")?;
        let Some(name) = property_name(id) else {
            return Err(malformed(format!(
                "unknown property identifier {id:#04x} in {}",
                allowed.packet
            )));
        };
        // Known identifiers are all below 64.
        let bit = 1u64 << id;
        if allowed.ids & bit == 0 {
            return Err(malformed(format!(
                "{name} property is not allowed in {}",
                allowed.packet
            )));
        }
        if seen & bit != 0 && allowed.repeatable & bit == 0 {
            return Err(protocol_error(format!(
                "{name} property appears more than once in {}",
                allowed.packet
            )));
        }
        seen |= bit;
        match id as u8 {
            PAYLOAD_FORMAT_INDICATOR => {
                p.payload_format_indicator = Some(u8::from(flag(&mut r, name)?));
            }
            MESSAGE_EXPIRY_INTERVAL => p.message_expiry_interval = Some(r.u32(name)?),
            CONTENT_TYPE => p.content_type = Some(r.string(name)?),
            RESPONSE_TOPIC => {
                let topic = r.string(name)?;
                check_topic_name(&topic, name)?;
                p.response_topic = Some(topic);
            }
            CORRELATION_DATA => p.correlation_data = Some(r.binary(name)?),
            SUBSCRIPTION_IDENTIFIER => {
                let id = r.varint(name)?;
                if id == 0 {
                    return Err(protocol_error("subscription identifier 0"));
                }
                p.subscription_identifiers.push(id);
            }
            SESSION_EXPIRY_INTERVAL => p.session_expiry_interval = Some(r.u32(name)?),
            ASSIGNED_CLIENT_IDENTIFIER => p.assigned_client_identifier = Some(r.string(name)?),
            SERVER_KEEP_ALIVE => p.server_keep_alive = Some(r.u16(name)?),
            AUTHENTICATION_METHOD => p.authentication_method = Some(r.string(name)?),
            AUTHENTICATION_DATA => p.authentication_data = Some(r.binary(name)?),
            REQUEST_PROBLEM_INFORMATION => {
                p.request_problem_information = Some(flag(&mut r, name)?);
            }
            WILL_DELAY_INTERVAL => p.will_delay_interval = Some(r.u32(name)?),
            REQUEST_RESPONSE_INFORMATION => {
                p.request_response_information = Some(flag(&mut r, name)?);
            }
            RESPONSE_INFORMATION => p.response_information = Some(r.string(name)?),
            SERVER_REFERENCE => p.server_reference = Some(r.string(name)?),
            REASON_STRING => p.reason_string = Some(r.string(name)?),
            RECEIVE_MAXIMUM => p.receive_maximum = Some(non_zero_u16(&mut r, name)?),
            TOPIC_ALIAS_MAXIMUM => p.topic_alias_maximum = Some(r.u16(name)?),
            TOPIC_ALIAS => p.topic_alias = Some(non_zero_u16(&mut r, name)?),
            MAXIMUM_QOS => {
                p.maximum_qos = Some(if flag(&mut r, name)? {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                });
            }
            RETAIN_AVAILABLE => p.retain_available = Some(flag(&mut r, name)?),
            USER_PROPERTY => {
                let key = r.string(name)?;
                let value = r.string(name)?;
                p.user_properties.push((key, value));
            }
            MAXIMUM_PACKET_SIZE => {
                let size = r.u32(name)?;
                if size == 0 {
                    return Err(protocol_error("maximum packet size 0"));
                }
                p.maximum_packet_size = Some(size);
            }
            WILDCARD_SUBSCRIPTION_AVAILABLE => {
                p.wildcard_subscription_available = Some(flag(&mut r, name)?);
            }
            SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                p.subscription_identifiers_available = Some(flag(&mut r, name)?);
            }
            SHARED_SUBSCRIPTION_AVAILABLE => {
                p.shared_subscription_available = Some(flag(&mut r, name)?);
            }
            // property_name() knows exactly the identifiers above.
            _ => return Err(malformed(format!("unknown property identifier {id:#04x}"))),
        }
    }
    Ok(p)
}

/// A byte property that must be 0 or 1.
fn flag(r: &mut Reader, name: &'static str) -> Result<bool, CodecError> {
    match r.u8(name)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(protocol_error(format!("{name} is {other}, not 0 or 1"))),
    }
}

fn non_zero_u16(r: &mut Reader, name: &'static str) -> Result<u16, CodecError> {
    match r.u16(name)? {
        0 => Err(protocol_error(format!("{name} 0"))),
        value => Ok(value),
    }
}

fn check_authentication(
    method: &Option<String>,
    data: &Option<Bytes>,
    packet: &str,
) -> Result<(), CodecError> {
    if method.is_none() && data.is_some() {
        return Err(protocol_error(format!(
            "authentication data without an authentication method in {packet}"
        )));
    }
    Ok(())
}

impl Properties {
    pub(super) fn into_connect(self) -> Result<ConnectProperties, CodecError> {
        check_authentication(
            &self.authentication_method,
            &self.authentication_data,
            "CONNECT",
        )?;
        Ok(ConnectProperties {
            session_expiry_interval: self.session_expiry_interval,
            receive_maximum: self.receive_maximum,
            maximum_packet_size: self.maximum_packet_size,
            topic_alias_maximum: self.topic_alias_maximum,
            request_response_information: self.request_response_information,
            request_problem_information: self.request_problem_information,
            user_properties: self.user_properties,
            authentication_method: self.authentication_method,
            authentication_data: self.authentication_data,
        })
    }

    /// The will delay interval and the will's message properties.
    pub(super) fn into_will(self) -> (Option<u32>, PublishProperties) {
        let delay = self.will_delay_interval;
        (delay, self.into_publish())
    }

    pub(super) fn into_connack(self) -> ConnAckProperties {
        ConnAckProperties {
            session_expiry_interval: self.session_expiry_interval,
            receive_maximum: self.receive_maximum,
            maximum_qos: self.maximum_qos,
            retain_available: self.retain_available,
            maximum_packet_size: self.maximum_packet_size,
            assigned_client_identifier: self.assigned_client_identifier,
            topic_alias_maximum: self.topic_alias_maximum,
            reason_string: self.reason_string,
            user_properties: self.user_properties,
            wildcard_subscription_available: self.wildcard_subscription_available,
            subscription_identifiers_available: self.subscription_identifiers_available,
            shared_subscription_available: self.shared_subscription_available,
            server_keep_alive: self.server_keep_alive,
            response_information: self.response_information,
            server_reference: self.server_reference,
            authentication_method: self.authentication_method,
            authentication_data: self.authentication_data,
        }
    }

    pub(super) fn into_publish(self) -> PublishProperties {
        PublishProperties {
            payload_format_indicator: self.payload_format_indicator,
            message_expiry_interval: self.message_expiry_interval,
            topic_alias: self.topic_alias,
            response_topic: self.response_topic,
            correlation_data: self.correlation_data,
            user_properties: self.user_properties,
            subscription_identifiers: self.subscription_identifiers,
            content_type: self.content_type,
        }
    }

    pub(super) fn into_ack(self) -> AckProperties {
        AckProperties {
            reason_string: self.reason_string,
            user_properties: self.user_properties,
        }
    }

    pub(super) fn into_subscribe(self) -> SubscribeProperties {
        SubscribeProperties {
            // Not repeatable in SUBSCRIBE: there is at most one.
            subscription_identifier: self.subscription_identifiers.first().copied(),
            user_properties: self.user_properties,
        }
    }

    pub(super) fn into_unsubscribe(self) -> UnsubscribeProperties {
        UnsubscribeProperties {
            user_properties: self.user_properties,
        }
    }

    pub(super) fn into_disconnect(self) -> DisconnectProperties {
        DisconnectProperties {
            session_expiry_interval: self.session_expiry_interval,
            reason_string: self.reason_string,
            server_reference: self.server_reference,
            user_properties: self.user_properties,
        }
    }

    pub(super) fn into_auth(self) -> Result<AuthProperties, CodecError> {
        check_authentication(
            &self.authentication_method,
            &self.authentication_data,
            "AUTH",
        )?;
        Ok(AuthProperties {
            authentication_method: self.authentication_method,
            authentication_data: self.authentication_data,
            reason_string: self.reason_string,
            user_properties: self.user_properties,
        })
    }
}

/// Collects encoded properties, then writes them behind their length.
struct Writer {
    buf: BytesMut,
}

impl Writer {
    fn new() -> Self {
        Writer {
            buf: BytesMut::new(),
        }
    }

    fn u8(&mut self, id: u8, value: Option<u8>) {
        if let Some(value) = value {
            self.buf.put_u8(id);
            self.buf.put_u8(value);
        }
    }

    fn flag(&mut self, id: u8, value: Option<bool>) {
        self.u8(id, value.map(u8::from));
    }

    fn u16(&mut self, id: u8, value: Option<u16>) {
        if let Some(value) = value {
            self.buf.put_u8(id);
            self.buf.put_u16(value);
        }
    }

    fn u32(&mut self, id: u8, value: Option<u32>) {
        if let Some(value) = value {
            self.buf.put_u8(id);
            self.buf.put_u32(value);
        }
    }

    fn subscription_identifier(&mut self, value: u32) -> Result<(), CodecError> {
        if value == 0 {
            return Err(cannot_encode("subscription identifier 0"));
        }
        self.buf.put_u8(SUBSCRIPTION_IDENTIFIER);
        put_varint(&mut self.buf, value as usize, "subscription identifier")
    }

    fn string(&mut self, id: u8, value: &Option<String>) -> Result<(), CodecError> {
        if let Some(value) = value {
            self.buf.put_u8(id);
            put_string(
                &mut self.buf,
                value,
                property_name(id.into()).unwrap_or("property"),
            )?;
        }
        Ok(())
    }

    fn binary(&mut self, id: u8, value: &Option<Bytes>) -> Result<(), CodecError> {
        if let Some(value) = value {
            self.buf.put_u8(id);
            put_binary(
                &mut self.buf,
                value,
                property_name(id.into()).unwrap_or("property"),
            )?;
        }
        Ok(())
    }

    fn user_properties(&mut self, pairs: &[(String, String)]) -> Result<(), CodecError> {
        for (key, value) in pairs {
            self.buf.put_u8(USER_PROPERTY);
            put_string(&mut self.buf, key, "user property name")?;
            put_string(&mut self.buf, value, "user property value")?;
        }
        Ok(())
    }

    fn finish(self, out: &mut BytesMut) -> Result<(), CodecError> {
        put_varint(out, self.buf.len(), "property length")?;
        out.extend_from_slice(&self.buf);
        Ok(())
    }
}

pub(super) fn write_connect(p: &ConnectProperties, out: &mut BytesMut) -> Result<(), CodecError> {
    let mut w = Writer::new();
    w.u32(SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
    w.u16(RECEIVE_MAXIMUM, p.receive_maximum);
    w.u32(MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
    w.u16(TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    w.flag(REQUEST_RESPONSE_INFORMATION, p.request_response_information);
    w.flag(REQUEST_PROBLEM_INFORMATION, p.request_problem_information);
    w.user_properties(&p.user_properties)?;
    w.string(AUTHENTICATION_METHOD, &p.authentication_method)?;
    w.binary(AUTHENTICATION_DATA, &p.authentication_data)?;
    w.finish(out)
}

pub(super) fn write_will(
    delay_interval: Option<u32>,
    p: &PublishProperties,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    if p.topic_alias.is_some() || !p.subscription_identifiers.is_empty() {
        return Err(cannot_encode(
            "a will cannot carry a topic alias or subscription identifiers",
        ));
    }
    let mut w = Writer::new();
    w.u32(WILL_DELAY_INTERVAL, delay_interval);
    write_message_properties(&mut w, p)?;
    w.finish(out)
}

pub(super) fn write_publish(p: &PublishProperties, out: &mut BytesMut) -> Result<(), CodecError> {
    let mut w = Writer::new();
    w.u16(TOPIC_ALIAS, p.topic_alias);
    write_message_properties(&mut w, p)?;
    for &id in &p.subscription_identifiers {
        w.subscription_identifier(id)?;
    }
    w.finish(out)
}

/// The properties a will and a PUBLISH share.
fn write_message_properties(w: &mut Writer, p: &PublishProperties) -> Result<(), CodecError> {
    w.u8(PAYLOAD_FORMAT_INDICATOR, p.payload_format_indicator);
    w.u32(MESSAGE_EXPIRY_INTERVAL, p.message_expiry_interval);
    w.string(CONTENT_TYPE, &p.content_type)?;
    w.string(RESPONSE_TOPIC, &p.response_topic)?;
    w.binary(CORRELATION_DATA, &p.correlation_data)?;
    w.user_properties(&p.user_properties)
}

pub(super) fn write_connack(p: &ConnAckProperties, out: &mut BytesMut) -> Result<(), CodecError> {
    let mut w = Writer::new();
    w.u32(SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
    w.u16(RECEIVE_MAXIMUM, p.receive_maximum);
    match p.maximum_qos {
        Some(QoS::ExactlyOnce) => {
            return Err(cannot_encode("maximum QoS can only be 0 or 1"));
        }
        qos => w.u8(MAXIMUM_QOS, qos.map(|qos| qos as u8)),
    }
    w.flag(RETAIN_AVAILABLE, p.retain_available);
    w.u32(MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
    w.string(ASSIGNED_CLIENT_IDENTIFIER, &p.assigned_client_identifier)?;
    w.u16(TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    w.string(REASON_STRING, &p.reason_string)?;
    w.user_properties(&p.user_properties)?;
    w.flag(
        WILDCARD_SUBSCRIPTION_AVAILABLE,
        p.wildcard_subscription_available,
    );
    w.flag(
        SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        p.subscription_identifiers_available,
    );
    w.flag(
        SHARED_SUBSCRIPTION_AVAILABLE,
        p.shared_subscription_available,
    );
    w.u16(SERVER_KEEP_ALIVE, p.server_keep_alive);
    w.string(RESPONSE_INFORMATION, &p.response_information)?;
    w.string(SERVER_REFERENCE, &p.server_reference)?;
    w.string(AUTHENTICATION_METHOD, &p.authentication_method)?;
    w.binary(AUTHENTICATION_DATA, &p.authentication_data)?;
    w.finish(out)
}

pub(super) fn write_ack(p: &AckProperties, out: &mut BytesMut) -> Result<(), CodecError> {
    let mut w = Writer::new();
    w.string(REASON_STRING, &p.reason_string)?;
    w.user_properties(&p.user_properties)?;
    w.finish(out)
}

pub(super) fn write_subscribe(
    p: &SubscribeProperties,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    let mut w = Writer::new();
    if let Some(id) = p.subscription_identifier {
        w.subscription_identifier(id)?;
    }
    w.user_properties(&p.user_properties)?;
    w.finish(out)
}

pub(super) fn write_unsubscribe(
    p: &UnsubscribeProperties,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    let mut w = Writer::new();
    w.user_properties(&p.user_properties)?;
    w.finish(out)
}

pub(super) fn write_disconnect(
    p: &DisconnectProperties,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    let mut w = Writer::new();
    w.u32(SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
    w.string(REASON_STRING, &p.reason_string)?;
    w.string(SERVER_REFERENCE, &p.server_reference)?;
    w.user_properties(&p.user_properties)?;
    w.finish(out)
}

pub(super) fn write_auth(p: &AuthProperties, out: &mut BytesMut) -> Result<(), CodecError> {
    let mut w = Writer::new();
    w.string(AUTHENTICATION_METHOD, &p.authentication_method)?;
    w.binary(AUTHENTICATION_DATA, &p.authentication_data)?;
    w.string(REASON_STRING, &p.reason_string)?;
    w.user_properties(&p.user_properties)?;
    w.finish(out)
}
