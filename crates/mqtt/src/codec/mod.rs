//! MQTT 3.1.1 and MQTT 5 packets: [`read_packet`] turns bytes into a [`Packet`],
//! [`write_packet`] turns a [`Packet`] into bytes.
//!
//! A connection reads with `protocol` set to `None` until its CONNECT arrives; the CONNECT
//! says which version the connection speaks ([`Connect::protocol`]), and every later packet is
//! read and written in that version. One set of types serves both versions: fields that only
//! MQTT 5 has (properties, reason codes of acknowledgements, subscription options) read as
//! their defaults from MQTT 3.1.1 and are left out when writing it.
//!
//! Reading is framing first, contents second:
//!
//! - The fixed header is checked as soon as its bytes arrive: packet type, the flag bits MQTT
//!   reserves, the remaining length (at most 4 bytes, minimally encoded) and the size limit.
//!   A packet larger than `max_size` is refused from its header, so a peer can never make us
//!   buffer more than `max_size` bytes. A framing error consumes nothing.
//! - Once the whole packet is in the buffer it is consumed and its contents are checked: every
//!   rule of the specifications that can be decided on one packet alone. A contents error
//!   leaves the buffer at the start of the next packet, but MQTT asks the receiver to close
//!   the connection after any of them (MQTT 5 first sends the error's
//!   [`reason_code`](CodecError::reason_code) in a CONNACK or DISCONNECT).
//!
//! Payloads, correlation data and passwords are slices of the read buffer, not copies.
//!
//! What the codec cannot know is left to the endpoint: the state of the connection (a second
//! CONNECT, topic alias and receive maximum limits, packet identifiers in use), the direction
//! of a packet (a client may not send subscription identifiers in PUBLISH, a server may not
//! send a session expiry interval in DISCONNECT), the syntax of topic filters (a bad filter is
//! refused per filter in SUBACK, not by closing the connection) and client identifier rules.

mod decode;
mod encode;
mod packet;
mod properties;
pub mod reason;
mod wire;

pub use packet::{
    AckProperties, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect, ConnectProperties,
    Disconnect, DisconnectProperties, Packet, Protocol, PubAck, Publish, PublishProperties, QoS,
    SubAck, Subscribe, SubscribeFilter, SubscribeProperties, UnsubAck, Unsubscribe,
    UnsubscribeProperties, Will,
};

use bytes::BytesMut;

/// The largest remaining length MQTT can encode (four bytes of seven bits).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Reads one packet from the front of `buf`.
///
/// Returns `Ok(None)` without consuming anything when `buf` does not yet hold a whole packet,
/// and `Ok(Some(packet))` after consuming exactly that packet's bytes. `protocol` is `None`
/// until the connection's CONNECT was read, and then the version that CONNECT asked for; with
/// `None`, any packet but CONNECT is a protocol error.
///
/// A packet whose total size (fixed header included) is over `max_size` is refused with
/// [`CodecError::PacketTooLarge`] as soon as its fixed header is complete. See the
/// [module documentation](self) for what an error leaves in `buf`.
pub fn read_packet(
    buf: &mut BytesMut,
    protocol: Option<Protocol>,
    max_size: usize,
) -> Result<Option<Packet>, CodecError> {
    decode::read_packet(buf, protocol, max_size)
}

/// Appends the encoding of `packet` in `protocol` to `out`.
///
/// Fields that MQTT 3.1.1 lacks are dropped when writing it, and an MQTT 5 CONNACK reason code
/// becomes the closest 3.1.1 return code ([`connack_return_code_v311`]). Values that cannot be
/// encoded are refused with [`CodecError::CannotEncode`] and leave `out` unchanged: strings
/// and binary data over 65,535 bytes, a packet over [`MAX_REMAINING_LENGTH`], a QoS 0 PUBLISH
/// with a packet identifier or a QoS 1 or 2 PUBLISH without one, packet identifier 0, an AUTH
/// packet or a password without a user name in MQTT 3.1.1, a CONNECT whose
/// [`protocol`](Connect::protocol) is not `protocol`.
pub fn write_packet(
    packet: &Packet,
    protocol: Protocol,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    encode::write_packet(packet, protocol, out)
}

/// The MQTT 3.1.1 CONNACK return code closest to an MQTT 5 CONNACK reason code.
///
/// 3.1.1 has six codes: 0x00 accepted, 0x01 unacceptable protocol version, 0x02 identifier
/// rejected, 0x03 server unavailable, 0x04 bad user name or password, 0x05 not authorized.
/// Refusals of what the client sent (malformed or refused contents, topic names, QoS, retain)
/// become "not authorized", which clients do not retry blindly; failures on the server's side
/// (unspecified, busy, quotas, moved) become "server unavailable".
pub fn connack_return_code_v311(reason: u8) -> u8 {
    match reason {
        reason::SUCCESS => 0x00,
        reason::UNSUPPORTED_PROTOCOL_VERSION => 0x01,
        reason::CLIENT_IDENTIFIER_NOT_VALID => 0x02,
        reason::BAD_USER_NAME_OR_PASSWORD | reason::BAD_AUTHENTICATION_METHOD => 0x04,
        reason::NOT_AUTHORIZED
        | reason::BANNED
        | reason::MALFORMED_PACKET
        | reason::PROTOCOL_ERROR
        | reason::TOPIC_NAME_INVALID
        | reason::PACKET_TOO_LARGE
        | reason::PAYLOAD_FORMAT_INVALID
        | reason::RETAIN_NOT_SUPPORTED
        | reason::QOS_NOT_SUPPORTED => 0x05,
        _ => 0x03,
    }
}

/// Why a packet could not be read or written.
///
/// Read errors are the peer's fault; [`CodecError::CannotEncode`] is the caller's. Messages
/// are one line and name the packet or field at fault.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The packet's total size is over the limit; known from its fixed header alone.
    #[error("packet of {size} bytes is larger than the maximum of {max}")]
    PacketTooLarge {
        /// The packet's total size in bytes, fixed header included.
        size: usize,
        /// The limit it was read with.
        max: usize,
    },
    /// The bytes do not follow the packet format (MQTT calls this a malformed packet).
    #[error("malformed packet: {0}")]
    MalformedPacket(String),
    /// The packet is well formed but breaks a rule of the protocol.
    #[error("protocol error: {0}")]
    ProtocolError(String),
    /// The CONNECT asks for a protocol other than MQTT 3.1.1 or 5: the level it gave (3 for
    /// MQTT 3.1's "MQIsdp"), whether the protocol name or the level was wrong.
    #[error("unsupported protocol (name or level {0}); MQTT 3.1.1 and MQTT 5 are supported")]
    UnsupportedProtocolVersion(u8),
    /// A string is not valid UTF-8.
    #[error("malformed packet: a string is not valid UTF-8")]
    InvalidUtf8,
    /// The packet cannot be encoded as given (see [`write_packet`]).
    #[error("cannot encode packet: {0}")]
    CannotEncode(String),
}

impl CodecError {
    /// The MQTT 5 reason code to close the connection with (in CONNACK or DISCONNECT).
    pub fn reason_code(&self) -> u8 {
        match self {
            CodecError::PacketTooLarge { .. } => reason::PACKET_TOO_LARGE,
            CodecError::MalformedPacket(_) | CodecError::InvalidUtf8 => reason::MALFORMED_PACKET,
            CodecError::ProtocolError(_) => reason::PROTOCOL_ERROR,
            CodecError::UnsupportedProtocolVersion(_) => reason::UNSUPPORTED_PROTOCOL_VERSION,
            CodecError::CannotEncode(_) => reason::UNSPECIFIED_ERROR,
        }
    }
}

/// The fifteen packet types, as the fixed header numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    Auth = 15,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Connect => "CONNECT",
            Kind::ConnAck => "CONNACK",
            Kind::Publish => "PUBLISH",
            Kind::PubAck => "PUBACK",
            Kind::PubRec => "PUBREC",
            Kind::PubRel => "PUBREL",
            Kind::PubComp => "PUBCOMP",
            Kind::Subscribe => "SUBSCRIBE",
            Kind::SubAck => "SUBACK",
            Kind::Unsubscribe => "UNSUBSCRIBE",
            Kind::UnsubAck => "UNSUBACK",
            Kind::PingReq => "PINGREQ",
            Kind::PingResp => "PINGRESP",
            Kind::Disconnect => "DISCONNECT",
            Kind::Auth => "AUTH",
        }
    }

    /// The flag bits the fixed header must carry (all but PUBLISH, whose flags are its own).
    fn fixed_flags(self) -> u8 {
        match self {
            Kind::PubRel | Kind::Subscribe | Kind::Unsubscribe => 0b0010,
            _ => 0,
        }
    }

    /// The first byte of the fixed header, for every type but PUBLISH.
    fn first_byte(self) -> u8 {
        (self as u8) << 4 | self.fixed_flags()
    }
}

/// A message's MQTT 5 properties as a PUBLISH carries them (property length first), to take
/// a message to another node.
pub fn encode_message_properties(p: &PublishProperties) -> Result<bytes::Bytes, CodecError> {
    let mut out = bytes::BytesMut::new();
    properties::write_publish(p, &mut out)?;
    Ok(out.freeze())
}

/// The properties [`encode_message_properties`] wrote.
pub fn decode_message_properties(data: &[u8]) -> Result<PublishProperties, CodecError> {
    let mut r = wire::Reader {
        data: bytes::Bytes::copy_from_slice(data),
    };
    Ok(properties::read(&mut r, &properties::PUBLISH)?.into_publish())
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod property_tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    /// Reads every packet `bytes` holds, as a connection would, until it needs more or errs.
    fn drain(bytes: &[u8], protocol: Option<Protocol>) {
        let mut buf = BytesMut::from(bytes);
        loop {
            let before = buf.len();
            match read_packet(&mut buf, protocol, 4096) {
                Ok(Some(_)) => assert!(buf.len() < before, "a packet consumed no bytes"),
                Ok(None) | Err(_) => break,
            }
        }
    }

    fn publish() -> impl Strategy<Value = Publish> {
        (
            prop::collection::vec(prop::sample::select(&b"abcxyz019/-_"[..]), 1..40),
            prop::collection::vec(any::<u8>(), 0..300),
            any::<bool>(),
            any::<bool>(),
            1u16..,
        )
            .prop_map(|(topic, payload, qos1, retain, id)| Publish {
                dup: false,
                qos: if qos1 {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                },
                retain,
                topic: String::from_utf8(topic).unwrap_or_default(),
                packet_id: qos1.then_some(id),
                payload: Bytes::from(payload),
                properties: PublishProperties::default(),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic_and_always_progress(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            drain(&bytes, None);
            drain(&bytes, Some(Protocol::V311));
            drain(&bytes, Some(Protocol::V5));
        }

        #[test]
        fn publish_packets_round_trip_in_both_versions(p in publish()) {
            for protocol in [Protocol::V311, Protocol::V5] {
                let mut out = BytesMut::new();
                write_packet(&Packet::Publish(p.clone()), protocol, &mut out).unwrap();
                let len = out.len();
                // Split anywhere: the first part is not a packet, the whole is exactly one.
                let mut first = BytesMut::from(&out[..len / 2]);
                prop_assert!(read_packet(&mut first, Some(protocol), 1 << 20).unwrap().is_none());
                let got = read_packet(&mut out, Some(protocol), 1 << 20).unwrap();
                prop_assert_eq!(got, Some(Packet::Publish(p.clone())));
                prop_assert!(out.is_empty());
            }
        }

        #[test]
        fn mutated_packets_never_panic(p in publish(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut out = BytesMut::new();
            write_packet(&Packet::Publish(p), Protocol::V5, &mut out).unwrap();
            let i = at.index(out.len());
            out[i] = byte;
            drain(&out, Some(Protocol::V5));
        }
    }
}
