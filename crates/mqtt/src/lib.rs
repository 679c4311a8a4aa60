//! The Portcullis MQTT endpoint.
//!
//! - [`codec`]: MQTT 3.1.1 (protocol level 4) and MQTT 5 (protocol level 5) packets as plain
//!   values, read from and written to byte buffers, with every check the MQTT specifications ask
//!   of a receiver that can be made on one packet alone. Rules that need the state of a
//!   connection (a second CONNECT, topic alias ranges, receive maximum) or a direction (a client
//!   may not send subscription identifiers) belong to the endpoint that uses the codec.
//! - [`topic`]: topic names and filters, validation and matching (`$` topics included).
//! - [`tree`]: the subscription tree a PUBLISH walks to find its subscribers.
//! - [`broker`]: sessions (clean and persistent, queued QoS 1 messages, takeover of a client
//!   id), retained messages, and routing with `mqtt:Receive` checked on every delivery. It
//!   knows nothing of sockets: the gateway's MQTT listener (next) drives it.
#![forbid(unsafe_code)]

pub mod broker;
pub mod codec;
pub mod topic;
pub mod tree;
