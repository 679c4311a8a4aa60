//! MQTT 5 reason codes (§2.4). Each packet type accepts only some of them; the codec refuses
//! a code its packet type does not list.

/// Success; also Normal disconnection and Granted QoS 0.
pub const SUCCESS: u8 = 0x00;
/// SUBACK: subscribed with maximum QoS 1.
pub const GRANTED_QOS_1: u8 = 0x01;
/// SUBACK: subscribed with maximum QoS 2.
pub const GRANTED_QOS_2: u8 = 0x02;
/// DISCONNECT: close, but publish the will.
pub const DISCONNECT_WITH_WILL_MESSAGE: u8 = 0x04;
/// PUBACK, PUBREC: accepted, but nobody is subscribed.
pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
/// UNSUBACK: there was no such subscription.
pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
/// AUTH: another step of authentication follows.
pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
/// AUTH: the client starts re-authentication.
pub const RE_AUTHENTICATE: u8 = 0x19;
/// A failure no other code describes, or one not to reveal.
pub const UNSPECIFIED_ERROR: u8 = 0x80;
/// The packet does not follow the format.
pub const MALFORMED_PACKET: u8 = 0x81;
/// The packet breaks a rule of the protocol.
pub const PROTOCOL_ERROR: u8 = 0x82;
/// Valid, but not accepted by this implementation.
pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
/// CONNACK: the protocol version is not supported.
pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
/// CONNACK: the client identifier is not allowed.
pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
/// CONNACK: the user name or password is wrong.
pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
/// The client may not do this.
pub const NOT_AUTHORIZED: u8 = 0x87;
/// CONNACK: the server is not available.
pub const SERVER_UNAVAILABLE: u8 = 0x88;
/// The server is busy; try later.
pub const SERVER_BUSY: u8 = 0x89;
/// CONNACK: the client is banned.
pub const BANNED: u8 = 0x8A;
/// DISCONNECT: the server is shutting down.
pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
/// The authentication method is not supported or does not match.
pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
/// DISCONNECT: nothing arrived within 1.5 times the keep alive.
pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
/// DISCONNECT: another connection with the same client identifier took over.
pub const SESSION_TAKEN_OVER: u8 = 0x8E;
/// The topic filter is not valid or not accepted.
pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
/// The topic name is not valid or not accepted.
pub const TOPIC_NAME_INVALID: u8 = 0x90;
/// The packet identifier is already in use.
pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
/// PUBREL, PUBCOMP: the packet identifier is not known.
pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
/// DISCONNECT: more unacknowledged QoS 1 and 2 messages than allowed.
pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
/// DISCONNECT: a topic alias is 0, too high or unknown.
pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
/// The packet is larger than the maximum packet size.
pub const PACKET_TOO_LARGE: u8 = 0x95;
/// DISCONNECT: messages arrive too fast.
pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
/// A quota was exceeded.
pub const QUOTA_EXCEEDED: u8 = 0x97;
/// DISCONNECT: an operator ended the connection.
pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
/// The payload does not match its payload format indicator.
pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
/// Retained messages are not supported.
pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
/// The QoS is higher than the server supports.
pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
/// Use another server, for now.
pub const USE_ANOTHER_SERVER: u8 = 0x9C;
/// Use another server, from now on.
pub const SERVER_MOVED: u8 = 0x9D;
/// Shared subscriptions are not supported.
pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
/// Connections arrive too fast.
pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
/// DISCONNECT: the connection lasted as long as it may.
pub const MAXIMUM_CONNECT_TIME: u8 = 0xA0;
/// Subscription identifiers are not supported.
pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
/// Wildcard subscriptions are not supported.
pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;
