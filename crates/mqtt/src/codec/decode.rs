//! Reading packets: framing from the fixed header, then the contents of each packet type.

use bytes::{Buf, BytesMut};

use super::properties;
use super::wire::{Reader, check_topic_name, malformed, protocol_error, varint};
use super::{
    Auth, CodecError, ConnAck, Connect, Disconnect, Kind, Packet, Protocol, PubAck, Publish, QoS,
    SubAck, Subscribe, SubscribeFilter, UnsubAck, Unsubscribe, Will, reason,
};

pub(super) fn read_packet(
    buf: &mut BytesMut,
    protocol: Option<Protocol>,
    max_size: usize,
) -> Result<Option<Packet>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let kind = packet_kind(first, protocol)?;
    let Some((remaining, length_bytes)) = varint(&buf[1..], "remaining length")? else {
        return Ok(None);
    };
    let header = 1 + length_bytes;
    let size = header + remaining as usize;
    if size > max_size {
        return Err(CodecError::PacketTooLarge {
            size,
            max: max_size,
        });
    }
    if buf.len() < size {
        return Ok(None);
    }
    let mut packet = buf.split_to(size).freeze();
    packet.advance(header);
    let mut r = Reader { data: packet };
    let packet = match protocol {
        Some(protocol) => contents(kind, first & 0x0F, &mut r, protocol)?,
        None if kind == Kind::Connect => Packet::Connect(connect(&mut r)?),
        // packet_kind() lets nothing but CONNECT through without a protocol.
        None => return Err(protocol_error("the first packet must be CONNECT")),
    };
    if !r.is_empty() {
        return Err(malformed(format!(
            "{} has {} unexpected bytes at its end",
            kind.name(),
            r.data.len()
        )));
    }
    Ok(Some(packet))
}

/// Checks the first byte of the fixed header: packet type and flags (§2.1.2, §2.1.3).
fn packet_kind(first: u8, protocol: Option<Protocol>) -> Result<Kind, CodecError> {
    let kind = match first >> 4 {
        1 => Kind::Connect,
        2 => Kind::ConnAck,
        3 => Kind::Publish,
        4 => Kind::PubAck,
        5 => Kind::PubRec,
        6 => Kind::PubRel,
        7 => Kind::PubComp,
        8 => Kind::Subscribe,
        9 => Kind::SubAck,
        10 => Kind::Unsubscribe,
        11 => Kind::UnsubAck,
        12 => Kind::PingReq,
        13 => Kind::PingResp,
        14 => Kind::Disconnect,
        15 if protocol != Some(Protocol::V311) => Kind::Auth,
        other => return Err(malformed(format!("packet type {other} is reserved"))),
    };
    if protocol.is_none() && kind != Kind::Connect {
        return Err(protocol_error(format!(
            "the first packet must be CONNECT, not {}",
            kind.name()
        )));
    }
    let flags = first & 0x0F;
    if kind == Kind::Publish {
        if (flags >> 1) & 0b11 == 3 {
            return Err(malformed("PUBLISH with QoS 3"));
        }
    } else if flags != kind.fixed_flags() {
        return Err(malformed(format!(
            "{} fixed header flags are {flags:#06b}, not {:#06b}",
            kind.name(),
            kind.fixed_flags()
        )));
    }
    Ok(kind)
}

fn contents(
    kind: Kind,
    flags: u8,
    r: &mut Reader,
    protocol: Protocol,
) -> Result<Packet, CodecError> {
    Ok(match kind {
        Kind::Connect => Packet::Connect(connect(r)?),
        Kind::ConnAck => Packet::ConnAck(connack(r, protocol)?),
        Kind::Publish => Packet::Publish(publish(flags, r, protocol)?),
        Kind::PubAck => Packet::PubAck(pub_ack(kind, r, protocol)?),
        Kind::PubRec => Packet::PubRec(pub_ack(kind, r, protocol)?),
        Kind::PubRel => Packet::PubRel(pub_ack(kind, r, protocol)?),
        Kind::PubComp => Packet::PubComp(pub_ack(kind, r, protocol)?),
        Kind::Subscribe => Packet::Subscribe(subscribe(r, protocol)?),
        Kind::SubAck => Packet::SubAck(suback(r, protocol)?),
        Kind::Unsubscribe => Packet::Unsubscribe(unsubscribe(r, protocol)?),
        Kind::UnsubAck => Packet::UnsubAck(unsuback(r, protocol)?),
        Kind::PingReq => Packet::PingReq,
        Kind::PingResp => Packet::PingResp,
        Kind::Disconnect => Packet::Disconnect(disconnect(r, protocol)?),
        Kind::Auth => Packet::Auth(auth(r)?),
    })
}

/// CONNECT (§3.1): the packet says its own protocol version.
fn connect(r: &mut Reader) -> Result<Connect, CodecError> {
    let name = r.binary("protocol name")?;
    let level = r.u8("protocol level")?;
    let protocol = match (&name[..], level) {
        (b"MQTT", 4) => Protocol::V311,
        (b"MQTT", 5) => Protocol::V5,
        // MQTT 3.1 says "MQIsdp" with level 3; anything else is not MQTT we speak.
        (_, level) => return Err(CodecError::UnsupportedProtocolVersion(level)),
    };
    let flags = r.u8("connect flags")?;
    if flags & 0x01 != 0 {
        return Err(malformed("CONNECT reserved flag is set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    let Some(will_qos) = QoS::from_bits(will_qos) else {
        return Err(malformed("will QoS 3"));
    };
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(protocol_error("will QoS or will retain set without a will"));
    }
    if protocol == Protocol::V311 && password_flag && !username_flag {
        return Err(protocol_error("password without a user name"));
    }
    let keep_alive = r.u16("keep alive")?;
    let properties = match protocol {
        Protocol::V5 => properties::read(r, &properties::CONNECT)?.into_connect()?,
        Protocol::V311 => Default::default(),
    };
    let client_id = r.string("client identifier")?;
    let will = if will_flag {
        let (delay_interval, properties) = match protocol {
            Protocol::V5 => properties::read(r, &properties::WILL)?.into_will(),
            Protocol::V311 => Default::default(),
        };
        let topic = r.string("will topic")?;
        check_topic_name(&topic, "will topic")?;
        let payload = r.binary("will payload")?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            delay_interval,
            properties,
        })
    } else {
        None
    };
    let username = username_flag.then(|| r.string("user name")).transpose()?;
    let password = password_flag.then(|| r.binary("password")).transpose()?;
    Ok(Connect {
        protocol,
        client_id,
        clean_start,
        keep_alive,
        username,
        password,
        will,
        properties,
    })
}

/// CONNACK (§3.2).
fn connack(r: &mut Reader, protocol: Protocol) -> Result<ConnAck, CodecError> {
    let flags = r.u8("connect acknowledge flags")?;
    if flags & 0xFE != 0 {
        return Err(malformed("CONNACK reserved flags are set"));
    }
    let session_present = flags & 0x01 != 0;
    let code = r.u8("connect reason code")?;
    let (code, properties) = match protocol {
        Protocol::V311 => {
            let code = match code {
                0x00 => reason::SUCCESS,
                0x01 => reason::UNSUPPORTED_PROTOCOL_VERSION,
                0x02 => reason::CLIENT_IDENTIFIER_NOT_VALID,
                0x03 => reason::SERVER_UNAVAILABLE,
                0x04 => reason::BAD_USER_NAME_OR_PASSWORD,
                0x05 => reason::NOT_AUTHORIZED,
                other => {
                    return Err(protocol_error(format!(
                        "CONNACK return code {other:#04x} is reserved"
                    )));
                }
            };
            (code, Default::default())
        }
        Protocol::V5 => {
            check_reason(Kind::ConnAck, code)?;
            let properties = properties::read(r, &properties::CONNACK)?.into_connack();
            (code, properties)
        }
    };
    if session_present && code != reason::SUCCESS {
        return Err(protocol_error(
            "CONNACK refuses but says a session is present",
        ));
    }
    Ok(ConnAck {
        session_present,
        code,
        properties,
    })
}

/// PUBLISH (§3.3).
fn publish(flags: u8, r: &mut Reader, protocol: Protocol) -> Result<Publish, CodecError> {
    let dup = flags & 0x08 != 0;
    let retain = flags & 0x01 != 0;
    let Some(qos) = QoS::from_bits((flags >> 1) & 0b11) else {
        return Err(malformed("PUBLISH with QoS 3"));
    };
    if dup && qos == QoS::AtMostOnce {
        return Err(protocol_error("DUP flag set on a QoS 0 PUBLISH"));
    }
    let topic = r.string("topic name")?;
    let packet_id = match qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce | QoS::ExactlyOnce => Some(r.packet_id()?),
    };
    let properties = match protocol {
        Protocol::V5 => properties::read(r, &properties::PUBLISH)?.into_publish(),
        Protocol::V311 => Default::default(),
    };
    // An empty topic name stands for the one a topic alias was set to (§3.3.2.3.4).
    if !(topic.is_empty() && properties.topic_alias.is_some()) {
        check_topic_name(&topic, "topic name")?;
    }
    let payload = r.rest();
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        payload,
        properties,
    })
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP (§3.4–3.7). MQTT 5 may leave out the reason code when it is
/// success, and the properties when there are none.
fn pub_ack(kind: Kind, r: &mut Reader, protocol: Protocol) -> Result<PubAck, CodecError> {
    let packet_id = r.packet_id()?;
    let mut ack = PubAck {
        packet_id,
        reason: reason::SUCCESS,
        properties: Default::default(),
    };
    if protocol == Protocol::V5 && !r.is_empty() {
        ack.reason = r.u8("reason code")?;
        check_reason(kind, ack.reason)?;
        if !r.is_empty() {
            ack.properties = properties::read(r, &properties::ack(kind.name()))?.into_ack();
        }
    }
    Ok(ack)
}

/// SUBSCRIBE (§3.8).
fn subscribe(r: &mut Reader, protocol: Protocol) -> Result<Subscribe, CodecError> {
    let packet_id = r.packet_id()?;
    let properties = match protocol {
        Protocol::V5 => properties::read(r, &properties::SUBSCRIBE)?.into_subscribe(),
        Protocol::V311 => Default::default(),
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string("topic filter")?;
        let options = r.u8("subscription options")?;
        let reserved = match protocol {
            Protocol::V311 => 0b1111_1100,
            Protocol::V5 => 0b1100_0000,
        };
        if options & reserved != 0 {
            return Err(malformed("reserved bits of subscription options are set"));
        }
        let Some(qos) = QoS::from_bits(options & 0b11) else {
            return Err(malformed("subscription with QoS 3"));
        };
        let retain_handling = (options >> 4) & 0b11;
        if retain_handling == 3 {
            return Err(protocol_error("retain handling 3"));
        }
        filters.push(SubscribeFilter {
            filter,
            qos,
            no_local: options & 0x04 != 0,
            retain_as_published: options & 0x08 != 0,
            retain_handling,
        });
    }
    if filters.is_empty() {
        return Err(protocol_error("SUBSCRIBE without topic filters"));
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

/// SUBACK (§3.9).
fn suback(r: &mut Reader, protocol: Protocol) -> Result<SubAck, CodecError> {
    let packet_id = r.packet_id()?;
    let properties = match protocol {
        Protocol::V5 => properties::read(r, &properties::ack("SUBACK"))?.into_ack(),
        Protocol::V311 => Default::default(),
    };
    let codes = r.rest().to_vec();
    if codes.is_empty() {
        return Err(protocol_error("SUBACK without return codes"));
    }
    for &code in &codes {
        match protocol {
            Protocol::V311 if !matches!(code, 0x00 | 0x01 | 0x02 | 0x80) => {
                return Err(protocol_error(format!(
                    "SUBACK return code {code:#04x} is reserved"
                )));
            }
            Protocol::V311 => {}
            Protocol::V5 => check_reason(Kind::SubAck, code)?,
        }
    }
    Ok(SubAck {
        packet_id,
        codes,
        properties,
    })
}

/// UNSUBSCRIBE (§3.10).
fn unsubscribe(r: &mut Reader, protocol: Protocol) -> Result<Unsubscribe, CodecError> {
    let packet_id = r.packet_id()?;
    let properties = match protocol {
        Protocol::V5 => properties::read(r, &properties::UNSUBSCRIBE)?.into_unsubscribe(),
        Protocol::V311 => Default::default(),
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string("topic filter")?);
    }
    if filters.is_empty() {
        return Err(protocol_error("UNSUBSCRIBE without topic filters"));
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

/// UNSUBACK (§3.11): MQTT 3.1.1's has nothing but the packet identifier.
fn unsuback(r: &mut Reader, protocol: Protocol) -> Result<UnsubAck, CodecError> {
    let packet_id = r.packet_id()?;
    let mut ack = UnsubAck {
        packet_id,
        codes: Vec::new(),
        properties: Default::default(),
    };
    if protocol == Protocol::V5 {
        ack.properties = properties::read(r, &properties::ack("UNSUBACK"))?.into_ack();
        ack.codes = r.rest().to_vec();
        if ack.codes.is_empty() {
            return Err(protocol_error("UNSUBACK without reason codes"));
        }
        for &code in &ack.codes {
            check_reason(Kind::UnsubAck, code)?;
        }
    }
    Ok(ack)
}

/// DISCONNECT (§3.14): MQTT 3.1.1's has no body, MQTT 5's may leave out its reason code
/// (success) and its properties.
fn disconnect(r: &mut Reader, protocol: Protocol) -> Result<Disconnect, CodecError> {
    let mut packet = Disconnect {
        reason: reason::SUCCESS,
        properties: Default::default(),
    };
    if protocol == Protocol::V5 && !r.is_empty() {
        packet.reason = r.u8("reason code")?;
        check_reason(Kind::Disconnect, packet.reason)?;
        if !r.is_empty() {
            packet.properties = properties::read(r, &properties::DISCONNECT)?.into_disconnect();
        }
    }
    Ok(packet)
}

/// AUTH (§3.15), MQTT 5 only: may leave out its reason code (success) and its properties.
fn auth(r: &mut Reader) -> Result<Auth, CodecError> {
    let mut packet = Auth {
        reason: reason::SUCCESS,
        properties: Default::default(),
    };
    if !r.is_empty() {
        packet.reason = r.u8("reason code")?;
        check_reason(Kind::Auth, packet.reason)?;
        if !r.is_empty() {
            packet.properties = properties::read(r, &properties::AUTH)?.into_auth()?;
        }
    }
    Ok(packet)
}

/// Checks that an MQTT 5 reason code is one its packet type may carry (§2.4 and each packet's
/// reason code table).
fn check_reason(kind: Kind, code: u8) -> Result<(), CodecError> {
    let allowed: &[u8] = match kind {
        Kind::ConnAck => &[
            0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
            0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
        ],
        Kind::PubAck | Kind::PubRec => &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99],
        Kind::PubRel | Kind::PubComp => &[0x00, 0x92],
        Kind::SubAck => &[
            0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
        ],
        Kind::UnsubAck => &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91],
        Kind::Disconnect => &[
            0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93,
            0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1,
            0xA2,
        ],
        Kind::Auth => &[0x00, 0x18, 0x19],
        _ => &[],
    };
    if allowed.contains(&code) {
        Ok(())
    } else {
        Err(protocol_error(format!(
            "{code:#04x} is not a {} reason code",
            kind.name()
        )))
    }
}
