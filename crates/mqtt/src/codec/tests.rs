use bytes::{Bytes, BytesMut};

use super::*;

const MAX: usize = 1 << 20;

fn encode(packet: &Packet, protocol: Protocol) -> Vec<u8> {
    let mut out = BytesMut::new();
    write_packet(packet, protocol, &mut out).unwrap();
    out.to_vec()
}

/// The protocol to read a packet with: none for CONNECT, as a broker reads it.
fn reading(packet: &Packet, protocol: Protocol) -> Option<Protocol> {
    match packet {
        Packet::Connect(_) => None,
        _ => Some(protocol),
    }
}

/// Reads exactly one packet from `bytes`, which must hold nothing else.
fn decode(bytes: &[u8], protocol: Option<Protocol>) -> Result<Packet, CodecError> {
    let mut buf = BytesMut::from(bytes);
    let packet = read_packet(&mut buf, protocol, MAX)?.expect("a whole packet");
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    Ok(packet)
}

fn decode_err(bytes: &[u8], protocol: Option<Protocol>) -> CodecError {
    let mut buf = BytesMut::from(bytes);
    match read_packet(&mut buf, protocol, MAX) {
        Err(e) => e,
        Ok(p) => panic!("read {p:?}, expected an error"),
    }
}

fn round_trip(packet: &Packet, protocol: Protocol) {
    let bytes = encode(packet, protocol);
    let read = decode(&bytes, reading(packet, protocol))
        .unwrap_or_else(|e| panic!("{packet:?} in {protocol:?}: {e}"));
    assert_eq!(&read, packet, "{protocol:?}");
    assert_eq!(encode(&read, protocol), bytes, "written again the same");
}

fn malformed(e: &CodecError) -> bool {
    matches!(e, CodecError::MalformedPacket(_))
}

fn protocol_error(e: &CodecError) -> bool {
    matches!(e, CodecError::ProtocolError(_))
}

fn user() -> Vec<(String, String)> {
    vec![
        ("k".into(), "v".into()),
        ("k".into(), "second".into()),
        ("ü".into(), String::new()),
    ]
}

fn publish(qos: QoS, packet_id: Option<u16>) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: "a/b".into(),
        packet_id,
        payload: Bytes::from_static(b"hi"),
        properties: PublishProperties::default(),
    }
}

fn connect_v311() -> Connect {
    Connect {
        protocol: Protocol::V311,
        client_id: "abc".into(),
        clean_start: true,
        keep_alive: 60,
        username: None,
        password: None,
        will: None,
        properties: ConnectProperties::default(),
    }
}

fn ack(packet_id: u16) -> PubAck {
    PubAck {
        packet_id,
        reason: 0,
        properties: AckProperties::default(),
    }
}

/// Every packet type, with only what MQTT 3.1.1 can say.
fn samples_v311() -> Vec<Packet> {
    let will = Will {
        topic: "dev/1/status".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: true,
        delay_interval: None,
        properties: PublishProperties::default(),
    };
    vec![
        Packet::Connect(connect_v311()),
        Packet::Connect(Connect {
            client_id: String::new(),
            clean_start: false,
            keep_alive: 0,
            username: Some("user".into()),
            password: Some(Bytes::from_static(b"\x00\xffpw")),
            will: Some(will),
            ..connect_v311()
        }),
        Packet::ConnAck(ConnAck {
            session_present: true,
            code: 0,
            properties: ConnAckProperties::default(),
        }),
        Packet::ConnAck(ConnAck {
            session_present: false,
            code: reason::NOT_AUTHORIZED,
            properties: ConnAckProperties::default(),
        }),
        Packet::Publish(publish(QoS::AtMostOnce, None)),
        Packet::Publish(Publish {
            dup: true,
            retain: true,
            payload: Bytes::new(),
            ..publish(QoS::AtLeastOnce, Some(65535))
        }),
        Packet::Publish(publish(QoS::ExactlyOnce, Some(7))),
        Packet::PubAck(ack(1)),
        Packet::PubRec(ack(2)),
        Packet::PubRel(ack(3)),
        Packet::PubComp(ack(4)),
        Packet::Subscribe(Subscribe {
            packet_id: 10,
            filters: vec![
                SubscribeFilter {
                    filter: "a/#".into(),
                    qos: QoS::AtLeastOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                },
                SubscribeFilter {
                    filter: "+/x".into(),
                    qos: QoS::ExactlyOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                },
            ],
            properties: SubscribeProperties::default(),
        }),
        Packet::SubAck(SubAck {
            packet_id: 10,
            codes: vec![0x00, 0x01, 0x02, 0x80],
            properties: AckProperties::default(),
        }),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 11,
            filters: vec!["a/#".into(), "b".into()],
            properties: UnsubscribeProperties::default(),
        }),
        Packet::UnsubAck(UnsubAck {
            packet_id: 11,
            codes: Vec::new(),
            properties: AckProperties::default(),
        }),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect(Disconnect {
            reason: 0,
            properties: DisconnectProperties::default(),
        }),
    ]
}

/// Every packet type with every MQTT 5 field set, plus the short forms.
fn samples_v5() -> Vec<Packet> {
    let message_properties = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        topic_alias: None,
        response_topic: Some("reply/here".into()),
        correlation_data: Some(Bytes::from_static(b"\x01\x02")),
        user_properties: user(),
        subscription_identifiers: Vec::new(),
        content_type: Some("text/plain".into()),
    };
    let ack_properties = AckProperties {
        reason_string: Some("because".into()),
        user_properties: user(),
    };
    let mut samples = vec![
        Packet::Connect(Connect {
            protocol: Protocol::V5,
            ..connect_v311()
        }),
        Packet::Connect(Connect {
            protocol: Protocol::V5,
            client_id: "device-1".into(),
            clean_start: false,
            keep_alive: 30,
            username: None,
            password: Some(Bytes::from_static(b"secret")),
            will: Some(Will {
                topic: "dev/1/status".into(),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::ExactlyOnce,
                retain: false,
                delay_interval: Some(10),
                properties: message_properties.clone(),
            }),
            properties: ConnectProperties {
                session_expiry_interval: Some(0xFFFF_FFFF),
                receive_maximum: Some(20),
                maximum_packet_size: Some(65536),
                topic_alias_maximum: Some(5),
                request_response_information: Some(true),
                request_problem_information: Some(false),
                user_properties: user(),
                authentication_method: Some("SCRAM-SHA-1".into()),
                authentication_data: Some(Bytes::from_static(b"client-first")),
            },
        }),
        Packet::ConnAck(ConnAck {
            session_present: true,
            code: 0,
            properties: ConnAckProperties {
                session_expiry_interval: Some(60),
                receive_maximum: Some(100),
                maximum_qos: Some(QoS::AtLeastOnce),
                retain_available: Some(true),
                maximum_packet_size: Some(1 << 20),
                assigned_client_identifier: Some("auto-1".into()),
                topic_alias_maximum: Some(10),
                reason_string: Some("welcome".into()),
                user_properties: user(),
                wildcard_subscription_available: Some(true),
                subscription_identifiers_available: Some(false),
                shared_subscription_available: Some(false),
                server_keep_alive: Some(120),
                response_information: Some("resp/".into()),
                server_reference: Some("other.example".into()),
                authentication_method: Some("SCRAM-SHA-1".into()),
                authentication_data: Some(Bytes::from_static(b"server-final")),
            },
        }),
        Packet::ConnAck(ConnAck {
            session_present: false,
            code: reason::QUOTA_EXCEEDED,
            properties: ConnAckProperties::default(),
        }),
        Packet::Publish(publish(QoS::AtMostOnce, None)),
        Packet::Publish(Publish {
            dup: true,
            retain: true,
            properties: PublishProperties {
                subscription_identifiers: vec![1, 268_435_455],
                ..message_properties.clone()
            },
            ..publish(QoS::AtLeastOnce, Some(1))
        }),
        Packet::Publish(Publish {
            topic: String::new(),
            properties: PublishProperties {
                topic_alias: Some(3),
                ..PublishProperties::default()
            },
            ..publish(QoS::ExactlyOnce, Some(9))
        }),
        Packet::Subscribe(Subscribe {
            packet_id: 12,
            filters: vec![
                SubscribeFilter {
                    filter: "a/#".into(),
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 2,
                },
                SubscribeFilter {
                    filter: "$share/g/x".into(),
                    qos: QoS::AtMostOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 1,
                },
            ],
            properties: SubscribeProperties {
                subscription_identifier: Some(42),
                user_properties: user(),
            },
        }),
        Packet::SubAck(SubAck {
            packet_id: 12,
            codes: vec![0x01, reason::NOT_AUTHORIZED, reason::TOPIC_FILTER_INVALID],
            properties: ack_properties.clone(),
        }),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 13,
            filters: vec!["a/#".into()],
            properties: UnsubscribeProperties {
                user_properties: user(),
            },
        }),
        Packet::UnsubAck(UnsubAck {
            packet_id: 13,
            codes: vec![0x00, reason::NO_SUBSCRIPTION_EXISTED],
            properties: ack_properties.clone(),
        }),
        Packet::UnsubAck(UnsubAck {
            packet_id: 14,
            codes: vec![0x00],
            properties: AckProperties::default(),
        }),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect(Disconnect {
            reason: 0,
            properties: DisconnectProperties::default(),
        }),
        Packet::Disconnect(Disconnect {
            reason: reason::SESSION_TAKEN_OVER,
            properties: DisconnectProperties::default(),
        }),
        Packet::Disconnect(Disconnect {
            reason: reason::DISCONNECT_WITH_WILL_MESSAGE,
            properties: DisconnectProperties {
                session_expiry_interval: Some(0),
                reason_string: Some("bye".into()),
                server_reference: Some("elsewhere".into()),
                user_properties: user(),
            },
        }),
        Packet::Auth(Auth {
            reason: 0,
            properties: AuthProperties::default(),
        }),
        Packet::Auth(Auth {
            reason: reason::CONTINUE_AUTHENTICATION,
            properties: AuthProperties {
                authentication_method: Some("SCRAM-SHA-1".into()),
                authentication_data: Some(Bytes::from_static(b"step")),
                reason_string: Some("more".into()),
                user_properties: user(),
            },
        }),
    ];
    // The four publish acknowledgements: short form, reason code only, and everything.
    for make in [
        Packet::PubAck,
        Packet::PubRec,
        Packet::PubRel,
        Packet::PubComp,
    ] {
        let failure = match make(ack(1)) {
            Packet::PubRel(_) | Packet::PubComp(_) => reason::PACKET_IDENTIFIER_NOT_FOUND,
            _ => reason::NO_MATCHING_SUBSCRIBERS,
        };
        samples.push(make(ack(1)));
        samples.push(make(PubAck {
            reason: failure,
            ..ack(2)
        }));
        samples.push(make(PubAck {
            reason: failure,
            properties: ack_properties.clone(),
            ..ack(3)
        }));
    }
    samples
}

#[test]
fn every_packet_type_round_trips_in_mqtt_311() {
    let samples = samples_v311();
    let kinds: std::collections::HashSet<_> = samples.iter().map(std::mem::discriminant).collect();
    assert_eq!(kinds.len(), 14, "all packet types but AUTH");
    for packet in &samples {
        round_trip(packet, Protocol::V311);
    }
}

#[test]
fn every_packet_type_round_trips_in_mqtt_5() {
    let samples = samples_v5();
    let kinds: std::collections::HashSet<_> = samples.iter().map(std::mem::discriminant).collect();
    assert_eq!(kinds.len(), 15);
    for packet in &samples {
        round_trip(packet, Protocol::V5);
    }
}

#[test]
fn mqtt_5_only_fields_are_dropped_when_writing_311() {
    for packet in samples_v5() {
        let packet = match packet {
            // Writing CONNECT needs its own version; AUTH has none in 3.1.1.
            Packet::Connect(c) => Packet::Connect(Connect {
                protocol: Protocol::V311,
                password: None,
                ..c
            }),
            // 3.1.1 has no topic aliases, so no empty topic names.
            Packet::Auth(_) => continue,
            Packet::Publish(p) if p.topic.is_empty() => continue,
            other => other,
        };
        let bytes = encode(&packet, Protocol::V311);
        decode(&bytes, reading(&packet, Protocol::V311))
            .unwrap_or_else(|e| panic!("{packet:?}: {e}"));
    }
    let bytes = encode(
        &Packet::SubAck(SubAck {
            packet_id: 1,
            codes: vec![0x01, reason::NOT_AUTHORIZED],
            properties: AckProperties {
                reason_string: Some("no".into()),
                user_properties: Vec::new(),
            },
        }),
        Protocol::V311,
    );
    assert_eq!(bytes, [0x90, 0x04, 0x00, 0x01, 0x01, 0x80]);
    let bytes = encode(
        &Packet::Disconnect(Disconnect {
            reason: reason::SERVER_SHUTTING_DOWN,
            properties: DisconnectProperties::default(),
        }),
        Protocol::V311,
    );
    assert_eq!(bytes, [0xE0, 0x00]);
}

#[test]
fn connect_311_bytes() {
    let bytes = [
        0x10, 0x0F, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x03, b'a',
        b'b', b'c',
    ];
    let packet = Packet::Connect(connect_v311());
    assert_eq!(encode(&packet, Protocol::V311), bytes);
    assert_eq!(decode(&bytes, None).unwrap(), packet);
}

#[test]
fn connect_311_with_will_user_and_password_bytes() {
    let packet = Packet::Connect(Connect {
        client_id: "c1".into(),
        keep_alive: 10,
        username: Some("u".into()),
        password: Some(Bytes::from_static(b"p")),
        will: Some(Will {
            topic: "t".into(),
            payload: Bytes::from_static(b"by"),
            qos: QoS::AtLeastOnce,
            retain: true,
            delay_interval: None,
            properties: PublishProperties::default(),
        }),
        ..connect_v311()
    });
    #[rustfmt::skip]
    let bytes = [
        0x10, 27,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04,
        // user name, password, will retain, will QoS 1, will, clean session
        0b1110_1110,
        0x00, 0x0A,
        0x00, 0x02, b'c', b'1',
        0x00, 0x01, b't',
        0x00, 0x02, b'b', b'y',
        0x00, 0x01, b'u',
        0x00, 0x01, b'p',
    ];
    assert_eq!(encode(&packet, Protocol::V311), bytes);
    assert_eq!(decode(&bytes, None).unwrap(), packet);
}

#[test]
fn connect_5_bytes() {
    let packet = Packet::Connect(Connect {
        protocol: Protocol::V5,
        properties: ConnectProperties {
            session_expiry_interval: Some(3600),
            ..ConnectProperties::default()
        },
        ..connect_v311()
    });
    #[rustfmt::skip]
    let bytes = [
        0x10, 21,
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3C,
        0x05, 0x11, 0x00, 0x00, 0x0E, 0x10,
        0x00, 0x03, b'a', b'b', b'c',
    ];
    assert_eq!(encode(&packet, Protocol::V5), bytes);
    assert_eq!(decode(&bytes, None).unwrap(), packet);
}

#[test]
fn connack_bytes() {
    let accepted = Packet::ConnAck(ConnAck {
        session_present: true,
        code: 0,
        properties: ConnAckProperties::default(),
    });
    assert_eq!(encode(&accepted, Protocol::V311), [0x20, 0x02, 0x01, 0x00]);
    assert_eq!(
        encode(&accepted, Protocol::V5),
        [0x20, 0x03, 0x01, 0x00, 0x00]
    );
    let refused = Packet::ConnAck(ConnAck {
        session_present: false,
        code: reason::NOT_AUTHORIZED,
        properties: ConnAckProperties {
            reason_string: Some("no".into()),
            ..ConnAckProperties::default()
        },
    });
    assert_eq!(encode(&refused, Protocol::V311), [0x20, 0x02, 0x00, 0x05]);
    assert_eq!(
        encode(&refused, Protocol::V5),
        [0x20, 0x08, 0x00, 0x87, 0x05, 0x1F, 0x00, 0x02, b'n', b'o']
    );
}

#[test]
fn connack_311_return_codes_map_both_ways() {
    for (v5, v311) in [
        (reason::SUCCESS, 0x00),
        (reason::UNSUPPORTED_PROTOCOL_VERSION, 0x01),
        (reason::CLIENT_IDENTIFIER_NOT_VALID, 0x02),
        (reason::SERVER_UNAVAILABLE, 0x03),
        (reason::BAD_USER_NAME_OR_PASSWORD, 0x04),
        (reason::NOT_AUTHORIZED, 0x05),
    ] {
        assert_eq!(connack_return_code_v311(v5), v311);
        let read = decode(&[0x20, 0x02, 0x00, v311], Some(Protocol::V311)).unwrap();
        let Packet::ConnAck(ack) = read else {
            panic!("{read:?}")
        };
        assert_eq!(ack.code, v5);
    }
    assert_eq!(connack_return_code_v311(reason::BANNED), 0x05);
    assert_eq!(connack_return_code_v311(reason::SERVER_BUSY), 0x03);
    assert_eq!(
        connack_return_code_v311(reason::BAD_AUTHENTICATION_METHOD),
        0x04
    );
    assert_eq!(connack_return_code_v311(reason::UNSPECIFIED_ERROR), 0x03);
    assert!(protocol_error(&decode_err(
        &[0x20, 0x02, 0x00, 0x06],
        Some(Protocol::V311)
    )));
}

#[test]
fn publish_bytes() {
    let qos0 = Packet::Publish(publish(QoS::AtMostOnce, None));
    let qos0_bytes = [0x30, 0x07, 0x00, 0x03, b'a', b'/', b'b', b'h', b'i'];
    assert_eq!(encode(&qos0, Protocol::V311), qos0_bytes);
    assert_eq!(decode(&qos0_bytes, Some(Protocol::V311)).unwrap(), qos0);

    let qos1 = Packet::Publish(publish(QoS::AtLeastOnce, Some(10)));
    let qos1_bytes = [
        0x32, 0x09, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, b'h', b'i',
    ];
    assert_eq!(encode(&qos1, Protocol::V311), qos1_bytes);
    assert_eq!(decode(&qos1_bytes, Some(Protocol::V311)).unwrap(), qos1);

    let qos1_v5 = [
        0x32, 0x0A, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x0A, 0x00, b'h', b'i',
    ];
    assert_eq!(encode(&qos1, Protocol::V5), qos1_v5);

    let retained_dup = Packet::Publish(Publish {
        dup: true,
        retain: true,
        properties: PublishProperties {
            message_expiry_interval: Some(1),
            ..PublishProperties::default()
        },
        ..publish(QoS::ExactlyOnce, Some(1))
    });
    assert_eq!(
        encode(&retained_dup, Protocol::V5),
        [
            0x3D, 0x0F, 0x00, 0x03, b'a', b'/', b'b', 0x00, 0x01, 0x05, 0x02, 0x00, 0x00, 0x00,
            0x01, b'h', b'i'
        ]
    );
}

#[test]
fn publish_acknowledgement_bytes() {
    assert_eq!(
        encode(&Packet::PubAck(ack(10)), Protocol::V5),
        [0x40, 0x02, 0x00, 0x0A],
        "short form for success without properties"
    );
    assert_eq!(
        encode(&Packet::PubAck(ack(10)), Protocol::V311),
        [0x40, 0x02, 0x00, 0x0A]
    );
    let no_subscribers = PubAck {
        reason: reason::NO_MATCHING_SUBSCRIBERS,
        ..ack(10)
    };
    assert_eq!(
        encode(&Packet::PubAck(no_subscribers.clone()), Protocol::V5),
        [0x40, 0x03, 0x00, 0x0A, 0x10]
    );
    assert_eq!(
        encode(&Packet::PubAck(no_subscribers), Protocol::V311),
        [0x40, 0x02, 0x00, 0x0A]
    );
    assert_eq!(
        encode(&Packet::PubRel(ack(1)), Protocol::V311),
        [0x62, 0x02, 0x00, 0x01]
    );
    // The long forms with nothing in them read as the short one.
    for bytes in [
        &[0x40, 0x03, 0x00, 0x0A, 0x00][..],
        &[0x40, 0x04, 0x00, 0x0A, 0x00, 0x00],
    ] {
        assert_eq!(
            decode(bytes, Some(Protocol::V5)).unwrap(),
            Packet::PubAck(ack(10))
        );
    }
    assert!(protocol_error(&decode_err(
        &[0x40, 0x03, 0x00, 0x0A, 0x92],
        Some(Protocol::V5)
    )));
    assert!(malformed(&decode_err(
        &[0x40, 0x03, 0x00, 0x0A, 0x00],
        Some(Protocol::V311)
    )));
}

#[test]
fn subscribe_and_suback_bytes() {
    let subscribe = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![SubscribeFilter {
            filter: "a/#".into(),
            qos: QoS::AtLeastOnce,
            no_local: true,
            retain_as_published: false,
            retain_handling: 2,
        }],
        properties: SubscribeProperties::default(),
    });
    assert_eq!(
        encode(&subscribe, Protocol::V311),
        [0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'#', 0x01]
    );
    assert_eq!(
        encode(&subscribe, Protocol::V5),
        [
            0x82, 0x09, 0x00, 0x01, 0x00, 0x00, 0x03, b'a', b'/', b'#', 0x25
        ]
    );
    let suback = Packet::SubAck(SubAck {
        packet_id: 1,
        codes: vec![0x01],
        properties: AckProperties::default(),
    });
    assert_eq!(
        encode(&suback, Protocol::V311),
        [0x90, 0x03, 0x00, 0x01, 0x01]
    );
    assert_eq!(
        encode(&suback, Protocol::V5),
        [0x90, 0x04, 0x00, 0x01, 0x00, 0x01]
    );
    let unsubscribe = Packet::Unsubscribe(Unsubscribe {
        packet_id: 2,
        filters: vec!["a".into()],
        properties: UnsubscribeProperties::default(),
    });
    assert_eq!(
        encode(&unsubscribe, Protocol::V311),
        [0xA2, 0x05, 0x00, 0x02, 0x00, 0x01, b'a']
    );
    let unsuback = Packet::UnsubAck(UnsubAck {
        packet_id: 2,
        codes: vec![0x00],
        properties: AckProperties::default(),
    });
    assert_eq!(encode(&unsuback, Protocol::V311), [0xB0, 0x02, 0x00, 0x02]);
    assert_eq!(
        encode(&unsuback, Protocol::V5),
        [0xB0, 0x04, 0x00, 0x02, 0x00, 0x00]
    );
}

#[test]
fn ping_disconnect_and_auth_bytes() {
    for protocol in [Protocol::V311, Protocol::V5] {
        assert_eq!(encode(&Packet::PingReq, protocol), [0xC0, 0x00]);
        assert_eq!(encode(&Packet::PingResp, protocol), [0xD0, 0x00]);
        assert_eq!(
            decode(&[0xC0, 0x00], Some(protocol)).unwrap(),
            Packet::PingReq
        );
        assert_eq!(
            decode(&[0xD0, 0x00], Some(protocol)).unwrap(),
            Packet::PingResp
        );
    }
    let normal = Packet::Disconnect(Disconnect {
        reason: 0,
        properties: DisconnectProperties::default(),
    });
    assert_eq!(encode(&normal, Protocol::V311), [0xE0, 0x00]);
    assert_eq!(encode(&normal, Protocol::V5), [0xE0, 0x00]);
    let taken_over = Packet::Disconnect(Disconnect {
        reason: reason::SESSION_TAKEN_OVER,
        properties: DisconnectProperties::default(),
    });
    assert_eq!(encode(&taken_over, Protocol::V5), [0xE0, 0x01, 0x8E]);
    assert_eq!(
        decode(&[0xE0, 0x01, 0x8E], Some(Protocol::V5)).unwrap(),
        taken_over
    );
    assert_eq!(
        decode(&[0xE0, 0x02, 0x00, 0x00], Some(Protocol::V5)).unwrap(),
        normal
    );
    assert!(malformed(&decode_err(
        &[0xE0, 0x01, 0x00],
        Some(Protocol::V311)
    )));
    assert!(malformed(&decode_err(
        &[0xC0, 0x01, 0x00],
        Some(Protocol::V5)
    )));

    let auth = Packet::Auth(Auth {
        reason: 0,
        properties: AuthProperties::default(),
    });
    assert_eq!(encode(&auth, Protocol::V5), [0xF0, 0x00]);
    let mut out = BytesMut::new();
    assert!(matches!(
        write_packet(&auth, Protocol::V311, &mut out),
        Err(CodecError::CannotEncode(_))
    ));
    assert!(out.is_empty());
    assert!(malformed(&decode_err(&[0xF0, 0x00], Some(Protocol::V311))));
}

#[test]
fn partial_input_is_not_consumed() {
    let packets = samples_v5();
    let mut stream = Vec::new();
    for packet in &packets {
        stream.extend(encode(packet, Protocol::V5));
    }
    let mut buf = BytesMut::new();
    let mut read = Vec::new();
    for &byte in &stream {
        buf.extend_from_slice(&[byte]);
        loop {
            let before = buf.clone();
            // CONNECT packets in the stream are read as the broker would read a first one.
            let protocol = match buf.first() {
                Some(first) if first >> 4 == 1 => None,
                _ => Some(Protocol::V5),
            };
            match read_packet(&mut buf, protocol, MAX).unwrap() {
                Some(packet) => read.push(packet),
                None => {
                    assert_eq!(buf, before, "nothing consumed without a whole packet");
                    break;
                }
            }
        }
    }
    assert!(buf.is_empty());
    assert_eq!(read, packets);
}

#[test]
fn oversized_packet_is_refused_from_its_header() {
    // A PUBLISH announcing 1,024 bytes of which none have arrived.
    let mut buf = BytesMut::from(&[0x30, 0x80, 0x08][..]);
    assert_eq!(
        read_packet(&mut buf, Some(Protocol::V5), 1000),
        Err(CodecError::PacketTooLarge {
            size: 1027,
            max: 1000
        })
    );
    assert_eq!(buf.len(), 3, "nothing consumed");
    // The largest remaining length there is.
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F][..]);
    assert_eq!(
        read_packet(&mut buf, Some(Protocol::V311), MAX),
        Err(CodecError::PacketTooLarge {
            size: MAX_REMAINING_LENGTH + 5,
            max: MAX
        })
    );
    // Exactly at the limit is fine.
    let bytes = encode(
        &Packet::Publish(publish(QoS::AtMostOnce, None)),
        Protocol::V5,
    );
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(
        read_packet(&mut buf, Some(Protocol::V5), bytes.len())
            .unwrap()
            .is_some()
    );
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(matches!(
        read_packet(&mut buf, Some(Protocol::V5), bytes.len() - 1),
        Err(CodecError::PacketTooLarge { .. })
    ));
}

#[test]
fn remaining_length_over_four_bytes_is_malformed() {
    // Refused as soon as the fourth length byte says another follows.
    for bytes in [
        &[0x30, 0xFF, 0xFF, 0xFF, 0xFF][..],
        &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
        &[0x30, 0x80, 0x80, 0x80, 0x80, 0x00],
    ] {
        let e = decode_err(bytes, Some(Protocol::V5));
        assert!(malformed(&e), "{e:?}");
        assert_eq!(e.reason_code(), reason::MALFORMED_PACKET);
    }
    // Still incomplete with three length bytes.
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF][..]);
    assert_eq!(
        read_packet(&mut buf, Some(Protocol::V5), usize::MAX),
        Ok(None)
    );
}

#[test]
fn non_minimal_remaining_length_is_malformed() {
    assert!(malformed(&decode_err(
        &[0xC0, 0x80, 0x00],
        Some(Protocol::V5)
    )));
}

#[test]
fn strings_must_be_utf8_without_nul() {
    // PUBLISH to "a\0b".
    let nul = [0x30, 0x05, 0x00, 0x03, b'a', 0x00, b'b'];
    let e = decode_err(&nul, Some(Protocol::V311));
    assert!(malformed(&e), "{e:?}");
    assert_eq!(e.reason_code(), reason::MALFORMED_PACKET);
    let bad_utf8 = [0x30, 0x04, 0x00, 0x02, 0xC3, 0x28];
    assert_eq!(
        decode_err(&bad_utf8, Some(Protocol::V311)),
        CodecError::InvalidUtf8
    );
    // A surrogate encoded as UTF-8 (CESU) is not UTF-8 either.
    let surrogate = [0x30, 0x05, 0x00, 0x03, 0xED, 0xA0, 0x80];
    assert_eq!(
        decode_err(&surrogate, Some(Protocol::V311)),
        CodecError::InvalidUtf8
    );
    // NUL in a client identifier and in a user property.
    let mut bytes = encode(&Packet::Connect(connect_v311()), Protocol::V311);
    let at = bytes.len() - 2;
    bytes[at] = 0;
    assert!(malformed(&decode_err(&bytes, None)));
    let mut bytes = encode(
        &Packet::Disconnect(Disconnect {
            reason: 0,
            properties: DisconnectProperties {
                user_properties: vec![("k".into(), "v".into())],
                ..DisconnectProperties::default()
            },
        }),
        Protocol::V5,
    );
    let last = bytes.len() - 1;
    bytes[last] = 0;
    assert!(malformed(&decode_err(&bytes, Some(Protocol::V5))));
}

#[test]
fn publish_topic_with_wildcard_is_a_protocol_error() {
    for topic in ["a/+", "#", "a/#/b", "+"] {
        let bytes = encode(
            &Packet::Publish(Publish {
                topic: topic.into(),
                ..publish(QoS::AtMostOnce, None)
            }),
            Protocol::V5,
        );
        let e = decode_err(&bytes, Some(Protocol::V5));
        assert!(protocol_error(&e), "{topic}: {e:?}");
        assert_eq!(e.reason_code(), reason::PROTOCOL_ERROR);
    }
}

#[test]
fn empty_publish_topic_needs_a_topic_alias() {
    let empty = Publish {
        topic: String::new(),
        ..publish(QoS::AtMostOnce, None)
    };
    for protocol in [Protocol::V311, Protocol::V5] {
        let bytes = encode(&Packet::Publish(empty.clone()), protocol);
        assert!(protocol_error(&decode_err(&bytes, Some(protocol))));
    }
    let aliased = Packet::Publish(Publish {
        properties: PublishProperties {
            topic_alias: Some(1),
            ..PublishProperties::default()
        },
        ..empty
    });
    round_trip(&aliased, Protocol::V5);
}

#[test]
fn reserved_fixed_header_flags_are_malformed() {
    for (bytes, protocol) in [
        // SUBSCRIBE with flags 0000 instead of 0010.
        (
            &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00][..],
            Protocol::V311,
        ),
        // UNSUBSCRIBE with flags 0000.
        (&[0xA0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'], Protocol::V311),
        // PUBREL with flags 0000.
        (&[0x60, 0x02, 0x00, 0x01], Protocol::V5),
        // PUBACK with flags 0010.
        (&[0x42, 0x02, 0x00, 0x01], Protocol::V5),
        (&[0xC1, 0x00], Protocol::V5),
        (&[0xE8, 0x00], Protocol::V311),
        // Packet type 0.
        (&[0x00, 0x00], Protocol::V5),
    ] {
        let e = decode_err(bytes, Some(protocol));
        assert!(malformed(&e), "{bytes:02x?}: {e:?}");
    }
    // Known from the first byte alone.
    let mut buf = BytesMut::from(&[0x82][..]);
    assert!(read_packet(&mut buf, Some(Protocol::V5), MAX).is_ok());
    let mut buf = BytesMut::from(&[0x81][..]);
    assert!(read_packet(&mut buf, Some(Protocol::V5), MAX).is_err());
    let mut buf = BytesMut::from(&[0x11][..]);
    assert!(read_packet(&mut buf, None, MAX).is_err());
}

#[test]
fn qos_3_is_malformed() {
    // PUBLISH with QoS bits 11, refused from the first byte.
    let mut buf = BytesMut::from(&[0x36][..]);
    assert!(malformed(
        &read_packet(&mut buf, Some(Protocol::V5), MAX).unwrap_err()
    ));
    // Subscription option QoS 3.
    let bytes = [0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x03];
    assert!(malformed(&decode_err(&bytes, Some(Protocol::V311))));
    assert!(malformed(&decode_err(
        &[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x03],
        Some(Protocol::V5)
    )));
    // Will QoS 3: flags will + QoS 11.
    let mut bytes = encode(&Packet::Connect(connect_v311()), Protocol::V311);
    bytes[9] = 0b0001_1110;
    assert!(malformed(&decode_err(&bytes, None)));
}

#[test]
fn subscription_options_reserved_bits_and_retain_handling() {
    // 3.1.1: only the QoS bits.
    let bytes = [0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x05];
    assert!(malformed(&decode_err(&bytes, Some(Protocol::V311))));
    // 5: bits 6 and 7 reserved; retain handling 3 is a protocol error.
    let bytes = [0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x40];
    assert!(malformed(&decode_err(&bytes, Some(Protocol::V5))));
    let bytes = [0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x30];
    assert!(protocol_error(&decode_err(&bytes, Some(Protocol::V5))));
}

#[test]
fn packet_id_0_is_a_protocol_error() {
    for (bytes, protocol) in [
        (
            &[0x32, 0x07, 0x00, 0x01, b'a', 0x00, 0x00, 0x00, b'x'][..],
            Protocol::V5,
        ),
        (
            &[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00],
            Protocol::V311,
        ),
        (&[0xA2, 0x05, 0x00, 0x00, 0x00, 0x01, b'a'], Protocol::V311),
        (&[0x40, 0x02, 0x00, 0x00], Protocol::V5),
        (&[0x62, 0x02, 0x00, 0x00], Protocol::V311),
        (&[0x90, 0x03, 0x00, 0x00, 0x00], Protocol::V311),
    ] {
        let e = decode_err(bytes, Some(protocol));
        assert!(protocol_error(&e), "{bytes:02x?}: {e:?}");
    }
    let mut out = BytesMut::new();
    assert!(matches!(
        write_packet(&Packet::PubAck(ack(0)), Protocol::V5, &mut out),
        Err(CodecError::CannotEncode(_))
    ));
}

#[test]
fn subscribe_and_unsubscribe_need_a_filter() {
    assert!(protocol_error(&decode_err(
        &[0x82, 0x02, 0x00, 0x01],
        Some(Protocol::V311)
    )));
    assert!(protocol_error(&decode_err(
        &[0x82, 0x03, 0x00, 0x01, 0x00],
        Some(Protocol::V5)
    )));
    assert!(protocol_error(&decode_err(
        &[0xA2, 0x02, 0x00, 0x01],
        Some(Protocol::V311)
    )));
}

#[test]
fn properties_that_may_appear_once_are_refused_twice() {
    // PUBLISH with two message expiry intervals.
    let twice = [
        0x30, 0x10, 0x00, 0x01, b't', 0x0A, 0x02, 0x00, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00,
        0x02, b'x', b'y',
    ];
    let e = decode_err(&twice, Some(Protocol::V5));
    assert!(protocol_error(&e), "{e:?}");
    assert_eq!(e.reason_code(), reason::PROTOCOL_ERROR);
    // User properties and (in PUBLISH) subscription identifiers may repeat.
    let repeated = [
        0x30, 0x0E, 0x00, 0x01, b't', 0x0A, 0x26, 0x00, 0x00, 0x00, 0x00, 0x26, 0x00, 0x00, 0x00,
        0x00,
    ];
    let Packet::Publish(p) = decode(&repeated, Some(Protocol::V5)).unwrap() else {
        panic!()
    };
    assert_eq!(p.properties.user_properties.len(), 2);
    let sub_ids = [0x30, 0x08, 0x00, 0x01, b't', 0x04, 0x0B, 0x01, 0x0B, 0x02];
    let Packet::Publish(p) = decode(&sub_ids, Some(Protocol::V5)).unwrap() else {
        panic!()
    };
    assert_eq!(p.properties.subscription_identifiers, [1, 2]);
    // But not in SUBSCRIBE.
    let subscribe = [
        0x82, 0x0B, 0x00, 0x01, 0x04, 0x0B, 0x01, 0x0B, 0x02, 0x00, 0x01, b'a', 0x00,
    ];
    assert!(protocol_error(&decode_err(&subscribe, Some(Protocol::V5))));
}

#[test]
fn unknown_or_misplaced_properties_are_malformed() {
    // Property 0x7F does not exist.
    let unknown = [0x30, 0x06, 0x00, 0x01, b't', 0x02, 0x7F, 0x00];
    assert!(malformed(&decode_err(&unknown, Some(Protocol::V5))));
    // Session expiry interval belongs to CONNECT, CONNACK and DISCONNECT, not PUBLISH.
    let misplaced = [
        0x30, 0x09, 0x00, 0x01, b't', 0x05, 0x11, 0x00, 0x00, 0x00, 0x01,
    ];
    assert!(malformed(&decode_err(&misplaced, Some(Protocol::V5))));
    // A property length running past the packet.
    let long = [0x30, 0x06, 0x00, 0x01, b't', 0x09, 0x02, 0x00];
    assert!(malformed(&decode_err(&long, Some(Protocol::V5))));
    // A will with a topic alias.
    let mut with_alias = BytesMut::new();
    let connect = Packet::Connect(Connect {
        protocol: Protocol::V5,
        will: Some(Will {
            topic: "w".into(),
            payload: Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            delay_interval: None,
            properties: PublishProperties {
                topic_alias: Some(1),
                ..PublishProperties::default()
            },
        }),
        ..connect_v311()
    });
    assert!(matches!(
        write_packet(&connect, Protocol::V5, &mut with_alias),
        Err(CodecError::CannotEncode(_))
    ));
}

#[test]
fn property_values_are_checked() {
    let publish_with = |props: &[u8]| {
        let mut bytes = vec![0x30, (4 + props.len()) as u8, 0x00, 0x01, b't'];
        bytes.push(props.len() as u8);
        bytes.extend_from_slice(props);
        bytes
    };
    for props in [
        &[0x01, 0x02][..],         // payload format indicator 2
        &[0x23, 0x00, 0x00],       // topic alias 0
        &[0x0B, 0x00],             // subscription identifier 0
        &[0x08, 0x00, 0x01, b'#'], // response topic with a wildcard
    ] {
        let e = decode_err(&publish_with(props), Some(Protocol::V5));
        assert!(protocol_error(&e), "{props:02x?}: {e:?}");
    }
    // CONNACK maximum QoS 2, receive maximum 0.
    for props in [&[0x24, 0x02][..], &[0x21, 0x00, 0x00]] {
        let mut bytes = vec![0x20, (3 + props.len()) as u8, 0x00, 0x00, props.len() as u8];
        bytes.extend_from_slice(props);
        assert!(protocol_error(&decode_err(&bytes, Some(Protocol::V5))));
    }
}

#[test]
fn connect_protocol_name_and_level() {
    let with = |name: &[u8], level: u8| {
        let mut bytes = vec![0x10, (9 + name.len()) as u8, 0x00, name.len() as u8];
        bytes.extend_from_slice(name);
        bytes.extend_from_slice(&[level, 0x02, 0x00, 0x3C, 0x00, 0x01, b'c']);
        bytes
    };
    let e = decode_err(&with(b"MQIsdp", 3), None);
    assert_eq!(e, CodecError::UnsupportedProtocolVersion(3));
    assert_eq!(e.reason_code(), reason::UNSUPPORTED_PROTOCOL_VERSION);
    assert_eq!(
        decode_err(&with(b"MQTT", 6), None),
        CodecError::UnsupportedProtocolVersion(6)
    );
    assert_eq!(
        decode_err(&with(b"MQTT", 3), None),
        CodecError::UnsupportedProtocolVersion(3)
    );
    assert_eq!(
        decode_err(&with(b"HTTP", 4), None),
        CodecError::UnsupportedProtocolVersion(4)
    );
    assert!(decode(&with(b"MQTT", 4), None).is_ok());
}

#[test]
fn connect_flags() {
    let bytes = encode(&Packet::Connect(connect_v311()), Protocol::V311);
    let with_flags = |flags: u8| {
        let mut b = bytes.clone();
        b[9] = flags;
        b
    };
    // Reserved bit 0.
    assert!(malformed(&decode_err(&with_flags(0x03), None)));
    // Will QoS or retain without the will flag.
    assert!(protocol_error(&decode_err(&with_flags(0x0A), None)));
    assert!(protocol_error(&decode_err(&with_flags(0x22), None)));
    // Password without user name: a protocol error in 3.1.1, allowed in 5.
    let mut password_only = with_flags(0x42);
    password_only.extend_from_slice(&[0x00, 0x01, b'p']);
    password_only[1] += 3;
    assert!(protocol_error(&decode_err(&password_only, None)));
    let v5 = Packet::Connect(Connect {
        protocol: Protocol::V5,
        password: Some(Bytes::from_static(b"p")),
        ..connect_v311()
    });
    round_trip(&v5, Protocol::V5);
    let mut out = BytesMut::new();
    let v311 = Packet::Connect(Connect {
        password: Some(Bytes::from_static(b"p")),
        ..connect_v311()
    });
    assert!(write_packet(&v311, Protocol::V311, &mut out).is_err());
    // A flag promising a user name that is not there.
    assert!(malformed(&decode_err(&with_flags(0x82), None)));
}

#[test]
fn first_packet_must_be_connect() {
    let e = decode_err(&[0xC0, 0x00], None);
    assert!(protocol_error(&e), "{e:?}");
    let mut buf = BytesMut::from(&[0x30][..]);
    assert!(protocol_error(
        &read_packet(&mut buf, None, MAX).unwrap_err()
    ));
}

#[test]
fn trailing_bytes_are_malformed() {
    let mut bytes = encode(&Packet::Connect(connect_v311()), Protocol::V311);
    bytes.push(0);
    bytes[1] += 1;
    assert!(malformed(&decode_err(&bytes, None)));
    assert!(malformed(&decode_err(
        &[0x20, 0x03, 0x00, 0x00, 0x00],
        Some(Protocol::V311)
    )));
}

#[test]
fn reason_codes_are_checked_per_packet_type() {
    // 0x18 (continue authentication) belongs to AUTH, not DISCONNECT.
    assert!(protocol_error(&decode_err(
        &[0xE0, 0x01, 0x18],
        Some(Protocol::V5)
    )));
    assert!(protocol_error(&decode_err(
        &[0xF0, 0x01, 0x8E],
        Some(Protocol::V5)
    )));
    assert!(protocol_error(&decode_err(
        &[0x20, 0x03, 0x00, 0x04, 0x00],
        Some(Protocol::V5)
    )));
    // A refusal cannot come with a session.
    assert!(protocol_error(&decode_err(
        &[0x20, 0x03, 0x01, 0x87, 0x00],
        Some(Protocol::V5)
    )));
}

#[test]
fn contents_error_consumes_only_its_packet() {
    let mut buf = BytesMut::from(&[0x40, 0x02, 0x00, 0x00, 0xC0, 0x00][..]);
    assert!(read_packet(&mut buf, Some(Protocol::V5), MAX).is_err());
    assert_eq!(
        read_packet(&mut buf, Some(Protocol::V5), MAX),
        Ok(Some(Packet::PingReq))
    );
}

#[test]
fn write_refuses_what_it_cannot_encode() {
    let long = "x".repeat(65_536);
    let mut out = BytesMut::from(&b"kept"[..]);
    for (packet, protocol) in [
        (
            Packet::Publish(Publish {
                topic: long.clone(),
                ..publish(QoS::AtMostOnce, None)
            }),
            Protocol::V311,
        ),
        (
            Packet::Disconnect(Disconnect {
                reason: 0,
                properties: DisconnectProperties {
                    user_properties: vec![("k".into(), long)],
                    ..DisconnectProperties::default()
                },
            }),
            Protocol::V5,
        ),
        (
            Packet::Publish(publish(QoS::AtMostOnce, Some(1))),
            Protocol::V5,
        ),
        (
            Packet::Publish(publish(QoS::AtLeastOnce, None)),
            Protocol::V5,
        ),
        (Packet::Connect(connect_v311()), Protocol::V5),
        (
            Packet::ConnAck(ConnAck {
                session_present: false,
                code: 0,
                properties: ConnAckProperties {
                    maximum_qos: Some(QoS::ExactlyOnce),
                    ..ConnAckProperties::default()
                },
            }),
            Protocol::V5,
        ),
    ] {
        let e = write_packet(&packet, protocol, &mut out).unwrap_err();
        assert!(matches!(e, CodecError::CannotEncode(_)), "{e:?}");
        assert_eq!(e.reason_code(), reason::UNSPECIFIED_ERROR);
    }
    assert_eq!(&out[..], b"kept", "output untouched");
    // A long payload is fine: only strings and binary data have a 16-bit length.
    let big = Packet::Publish(Publish {
        payload: Bytes::from(vec![7u8; 70_000]),
        ..publish(QoS::AtMostOnce, None)
    });
    round_trip(&big, Protocol::V5);
}

#[test]
fn error_reason_codes() {
    assert_eq!(
        CodecError::PacketTooLarge { size: 2, max: 1 }.reason_code(),
        0x95
    );
    assert_eq!(
        CodecError::MalformedPacket(String::new()).reason_code(),
        0x81
    );
    assert_eq!(CodecError::InvalidUtf8.reason_code(), 0x81);
    assert_eq!(CodecError::ProtocolError(String::new()).reason_code(), 0x82);
    assert_eq!(
        CodecError::UnsupportedProtocolVersion(3).reason_code(),
        0x84
    );
}

/// xorshift64: deterministic, no dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_and_damaged_input_never_panics_or_overreads() {
    let mut valid: Vec<(Vec<u8>, Protocol)> = Vec::new();
    for protocol in [Protocol::V311, Protocol::V5] {
        let samples = match protocol {
            Protocol::V311 => samples_v311(),
            Protocol::V5 => samples_v5(),
        };
        for packet in samples {
            valid.push((encode(&packet, protocol), protocol));
        }
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut decoded = 0;
    for _ in 0..100_000 {
        let (base, base_protocol) = &valid[rng.below(valid.len())];
        let mut input = match rng.below(4) {
            // Random bytes, often starting with a plausible first byte.
            0 => (0..rng.below(48)).map(|_| rng.next() as u8).collect(),
            // A valid packet cut short.
            1 => base[..rng.below(base.len() + 1)].to_vec(),
            // A valid packet with a few bytes changed.
            2 => {
                let mut bytes = base.clone();
                for _ in 0..=rng.below(3) {
                    let at = rng.below(bytes.len());
                    bytes[at] = rng.next() as u8;
                }
                bytes
            }
            // Two packets, the second one damaged and cut.
            _ => {
                let mut bytes = base.clone();
                let (other, _) = &valid[rng.below(valid.len())];
                let mut other = other[..rng.below(other.len() + 1)].to_vec();
                if !other.is_empty() {
                    let at = rng.below(other.len());
                    other[at] ^= 1 << rng.below(8);
                }
                bytes.extend(other);
                bytes
            }
        };
        if input.is_empty() {
            input.push(rng.next() as u8);
        }
        let protocol = match rng.below(5) {
            0 => None,
            1 => Some(Protocol::V311),
            2 => Some(Protocol::V5),
            _ => Some(*base_protocol),
        };
        let max = if rng.below(4) == 0 {
            rng.below(64)
        } else {
            MAX
        };
        let mut buf = BytesMut::from(&input[..]);
        loop {
            let before = buf.len();
            match read_packet(&mut buf, protocol, max) {
                Ok(Some(packet)) => {
                    let used = before - buf.len();
                    assert!(used > 0 && used <= max, "{input:02x?}");
                    decoded += 1;
                    // Whatever was accepted can be written and reads back the same.
                    let write_as = match &packet {
                        Packet::Connect(c) => c.protocol,
                        _ => protocol.expect("only CONNECT reads without a protocol"),
                    };
                    let again = encode(&packet, write_as);
                    assert_eq!(
                        decode(&again, reading(&packet, write_as)).as_ref(),
                        Ok(&packet),
                        "{input:02x?}"
                    );
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "{input:02x?}");
                    break;
                }
                Err(_) => {
                    assert!(buf.len() <= before);
                    break;
                }
            }
        }
    }
    assert!(decoded > 1_000, "the inputs reach the decoders: {decoded}");
}
