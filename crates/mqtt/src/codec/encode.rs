//! Writing packets: the body first (into a scratch buffer), then the fixed header, so that the
//! remaining length is known and an error leaves the output untouched.

use bytes::{BufMut, BytesMut};

use super::properties;
use super::wire::{cannot_encode, put_binary, put_string, put_varint};
use super::{
    AckProperties, Auth, AuthProperties, CodecError, ConnAck, Connect, Disconnect,
    DisconnectProperties, Kind, MAX_REMAINING_LENGTH, Packet, Protocol, PubAck, Publish, QoS,
    SubAck, Subscribe, UnsubAck, Unsubscribe, connack_return_code_v311, reason,
};

pub(super) fn write_packet(
    packet: &Packet,
    protocol: Protocol,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    let mut body = BytesMut::new();
    // A PUBLISH payload goes straight to `out`, not through `body`.
    let mut payload: &[u8] = &[];
    let first = match packet {
        Packet::Connect(connect) => {
            write_connect(connect, protocol, &mut body)?;
            Kind::Connect.first_byte()
        }
        Packet::ConnAck(ack) => {
            write_connack(ack, protocol, &mut body)?;
            Kind::ConnAck.first_byte()
        }
        Packet::Publish(publish) => {
            payload = &publish.payload;
            write_publish(publish, protocol, &mut body)?
        }
        Packet::PubAck(ack) => write_pub_ack(Kind::PubAck, ack, protocol, &mut body)?,
        Packet::PubRec(ack) => write_pub_ack(Kind::PubRec, ack, protocol, &mut body)?,
        Packet::PubRel(ack) => write_pub_ack(Kind::PubRel, ack, protocol, &mut body)?,
        Packet::PubComp(ack) => write_pub_ack(Kind::PubComp, ack, protocol, &mut body)?,
        Packet::Subscribe(subscribe) => {
            write_subscribe(subscribe, protocol, &mut body)?;
            Kind::Subscribe.first_byte()
        }
        Packet::SubAck(ack) => {
            write_suback(ack, protocol, &mut body)?;
            Kind::SubAck.first_byte()
        }
        Packet::Unsubscribe(unsubscribe) => {
            write_unsubscribe(unsubscribe, protocol, &mut body)?;
            Kind::Unsubscribe.first_byte()
        }
        Packet::UnsubAck(ack) => {
            write_unsuback(ack, protocol, &mut body)?;
            Kind::UnsubAck.first_byte()
        }
        Packet::PingReq => Kind::PingReq.first_byte(),
        Packet::PingResp => Kind::PingResp.first_byte(),
        Packet::Disconnect(disconnect) => {
            write_disconnect(disconnect, protocol, &mut body)?;
            Kind::Disconnect.first_byte()
        }
        Packet::Auth(auth) => {
            write_auth(auth, protocol, &mut body)?;
            Kind::Auth.first_byte()
        }
    };
    let remaining = body.len() + payload.len();
    if remaining > MAX_REMAINING_LENGTH {
        return Err(cannot_encode(format!(
            "packet body of {remaining} bytes is over the MQTT limit of {MAX_REMAINING_LENGTH}"
        )));
    }
    out.reserve(5 + remaining);
    out.put_u8(first);
    put_varint(out, remaining, "remaining length")?;
    out.extend_from_slice(&body);
    out.extend_from_slice(payload);
    Ok(())
}

fn write_connect(c: &Connect, protocol: Protocol, out: &mut BytesMut) -> Result<(), CodecError> {
    if c.protocol != protocol {
        return Err(cannot_encode(format!(
            "CONNECT for protocol level {} written as level {}",
            c.protocol.level(),
            protocol.level()
        )));
    }
    if protocol == Protocol::V311 && c.password.is_some() && c.username.is_none() {
        return Err(cannot_encode(
            "MQTT 3.1.1 allows a password only with a user name",
        ));
    }
    put_string(out, "MQTT", "protocol name")?;
    out.put_u8(protocol.level());
    let mut flags = 0u8;
    if c.clean_start {
        flags |= 0x02;
    }
    if let Some(will) = &c.will {
        flags |= 0x04 | (will.qos as u8) << 3;
        if will.retain {
            flags |= 0x20;
        }
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    if protocol == Protocol::V5 {
        properties::write_connect(&c.properties, out)?;
    }
    put_string(out, &c.client_id, "client identifier")?;
    if let Some(will) = &c.will {
        if protocol == Protocol::V5 {
            properties::write_will(will.delay_interval, &will.properties, out)?;
        }
        put_string(out, &will.topic, "will topic")?;
        put_binary(out, &will.payload, "will payload")?;
    }
    if let Some(username) = &c.username {
        put_string(out, username, "user name")?;
    }
    if let Some(password) = &c.password {
        put_binary(out, password, "password")?;
    }
    Ok(())
}

fn write_connack(a: &ConnAck, protocol: Protocol, out: &mut BytesMut) -> Result<(), CodecError> {
    out.put_u8(u8::from(a.session_present));
    match protocol {
        Protocol::V311 => out.put_u8(connack_return_code_v311(a.code)),
        Protocol::V5 => {
            out.put_u8(a.code);
            properties::write_connack(&a.properties, out)?;
        }
    }
    Ok(())
}

/// Writes the variable header of a PUBLISH and returns its first byte; the payload follows.
fn write_publish(p: &Publish, protocol: Protocol, out: &mut BytesMut) -> Result<u8, CodecError> {
    let packet_id = match (p.qos, p.packet_id) {
        (QoS::AtMostOnce, None) => None,
        (QoS::AtMostOnce, Some(_)) => {
            return Err(cannot_encode("QoS 0 PUBLISH with a packet identifier"));
        }
        (_, Some(id)) => Some(id),
        (_, None) => {
            return Err(cannot_encode(
                "QoS 1 or 2 PUBLISH without a packet identifier",
            ));
        }
    };
    let mut first = (Kind::Publish as u8) << 4 | (p.qos as u8) << 1;
    if p.dup {
        first |= 0x08;
    }
    if p.retain {
        first |= 0x01;
    }
    put_string(out, &p.topic, "topic name")?;
    if let Some(id) = packet_id {
        put_packet_id(out, id)?;
    }
    if protocol == Protocol::V5 {
        properties::write_publish(&p.properties, out)?;
    }
    Ok(first)
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP; MQTT 5 in the shortest form that says everything.
fn write_pub_ack(
    kind: Kind,
    a: &PubAck,
    protocol: Protocol,
    out: &mut BytesMut,
) -> Result<u8, CodecError> {
    put_packet_id(out, a.packet_id)?;
    if protocol == Protocol::V5 {
        // Without properties the reason code may stand alone, and be left out for success
        // (§3.4.2.1).
        if a.properties != AckProperties::default() {
            out.put_u8(a.reason);
            properties::write_ack(&a.properties, out)?;
        } else if a.reason != reason::SUCCESS {
            out.put_u8(a.reason);
        }
    }
    Ok(kind.first_byte())
}

fn write_subscribe(
    s: &Subscribe,
    protocol: Protocol,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    put_packet_id(out, s.packet_id)?;
    if protocol == Protocol::V5 {
        properties::write_subscribe(&s.properties, out)?;
    }
    for f in &s.filters {
        put_string(out, &f.filter, "topic filter")?;
        let mut options = f.qos as u8;
        if protocol == Protocol::V5 {
            if f.retain_handling > 2 {
                return Err(cannot_encode(format!(
                    "retain handling {} (0, 1 or 2)",
                    f.retain_handling
                )));
            }
            options |= u8::from(f.no_local) << 2
                | u8::from(f.retain_as_published) << 3
                | f.retain_handling << 4;
        }
        out.put_u8(options);
    }
    Ok(())
}

fn write_suback(a: &SubAck, protocol: Protocol, out: &mut BytesMut) -> Result<(), CodecError> {
    put_packet_id(out, a.packet_id)?;
    match protocol {
        Protocol::V311 => {
            // 3.1.1 has one failure code.
            out.extend(a.codes.iter().map(|&code| code.min(0x80)));
        }
        Protocol::V5 => {
            properties::write_ack(&a.properties, out)?;
            out.extend_from_slice(&a.codes);
        }
    }
    Ok(())
}

fn write_unsubscribe(
    u: &Unsubscribe,
    protocol: Protocol,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    put_packet_id(out, u.packet_id)?;
    if protocol == Protocol::V5 {
        properties::write_unsubscribe(&u.properties, out)?;
    }
    for filter in &u.filters {
        put_string(out, filter, "topic filter")?;
    }
    Ok(())
}

fn write_unsuback(a: &UnsubAck, protocol: Protocol, out: &mut BytesMut) -> Result<(), CodecError> {
    put_packet_id(out, a.packet_id)?;
    if protocol == Protocol::V5 {
        properties::write_ack(&a.properties, out)?;
        out.extend_from_slice(&a.codes);
    }
    Ok(())
}

fn write_disconnect(
    d: &Disconnect,
    protocol: Protocol,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    // MQTT 3.1.1's DISCONNECT has no body.
    if protocol == Protocol::V5 {
        // Without properties the reason code may stand alone, and be left out for a normal
        // disconnection (§3.14.2.1).
        if d.properties != DisconnectProperties::default() {
            out.put_u8(d.reason);
            properties::write_disconnect(&d.properties, out)?;
        } else if d.reason != reason::SUCCESS {
            out.put_u8(d.reason);
        }
    }
    Ok(())
}

fn write_auth(a: &Auth, protocol: Protocol, out: &mut BytesMut) -> Result<(), CodecError> {
    if protocol == Protocol::V311 {
        return Err(cannot_encode("AUTH does not exist in MQTT 3.1.1"));
    }
    // Nothing at all for success without properties (§3.15.2.1).
    if a.reason != reason::SUCCESS || a.properties != AuthProperties::default() {
        out.put_u8(a.reason);
        properties::write_auth(&a.properties, out)?;
    }
    Ok(())
}

fn put_packet_id(out: &mut BytesMut, id: u16) -> Result<(), CodecError> {
    if id == 0 {
        return Err(cannot_encode("packet identifier 0"));
    }
    out.put_u16(id);
    Ok(())
}
