//! The wire primitives both directions share: the packet body reader, variable byte integers,
//! strings and binary data, and the errors they raise. `decode`, `encode` and `properties` build
//! on these; none of them depends on another.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{CodecError, MAX_REMAINING_LENGTH};

/// Checks a topic name (of a PUBLISH, a will or a response topic): not empty, no wildcards.
/// Strings never hold U+0000: [`Reader::string`] refuses it.
pub(super) fn check_topic_name(topic: &str, what: &str) -> Result<(), CodecError> {
    if topic.is_empty() {
        return Err(protocol_error(format!("empty {what}")));
    }
    if topic.contains(['+', '#']) {
        return Err(protocol_error(format!(
            "{what} {topic:?} contains a wildcard"
        )));
    }
    Ok(())
}

pub(super) fn malformed(detail: impl Into<String>) -> CodecError {
    CodecError::MalformedPacket(detail.into())
}

pub(super) fn protocol_error(detail: impl Into<String>) -> CodecError {
    CodecError::ProtocolError(detail.into())
}

/// The unread part of one packet's body. Every read checks its length first: running past the
/// end of the packet is a malformed packet, never a panic.
pub(super) struct Reader {
    pub(super) data: Bytes,
}

impl Reader {
    pub(super) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub(super) fn need(&self, n: usize, what: &str) -> Result<(), CodecError> {
        if self.data.len() < n {
            return Err(malformed(format!("{what} runs past the end of the packet")));
        }
        Ok(())
    }

    pub(super) fn u8(&mut self, what: &str) -> Result<u8, CodecError> {
        self.need(1, what)?;
        Ok(self.data.get_u8())
    }

    pub(super) fn u16(&mut self, what: &str) -> Result<u16, CodecError> {
        self.need(2, what)?;
        Ok(self.data.get_u16())
    }

    pub(super) fn u32(&mut self, what: &str) -> Result<u32, CodecError> {
        self.need(4, what)?;
        Ok(self.data.get_u32())
    }

    pub(super) fn varint(&mut self, what: &str) -> Result<u32, CodecError> {
        let Some((value, length)) = varint(&self.data, what)? else {
            return Err(malformed(format!("{what} runs past the end of the packet")));
        };
        self.data.advance(length);
        Ok(value)
    }

    /// The next `n` bytes as a reader of their own.
    pub(super) fn split(&mut self, n: usize, what: &str) -> Result<Reader, CodecError> {
        self.need(n, what)?;
        Ok(Reader {
            data: self.data.split_to(n),
        })
    }

    /// Binary data (§1.5.6): a two-byte length and that many bytes.
    pub(super) fn binary(&mut self, what: &str) -> Result<Bytes, CodecError> {
        let length = self.u16(what)?;
        self.need(usize::from(length), what)?;
        Ok(self.data.split_to(usize::from(length)))
    }

    /// A UTF-8 encoded string (§1.5.4): valid UTF-8 without U+0000.
    pub(super) fn string(&mut self, what: &str) -> Result<String, CodecError> {
        let raw = self.binary(what)?;
        let text = std::str::from_utf8(&raw).map_err(|_| CodecError::InvalidUtf8)?;
        if text.contains('\0') {
            return Err(malformed(format!("{what} contains U+0000")));
        }
        Ok(text.to_owned())
    }

    /// A packet identifier, which is never 0 (§2.2.1).
    pub(super) fn packet_id(&mut self) -> Result<u16, CodecError> {
        match self.u16("packet identifier")? {
            0 => Err(protocol_error("packet identifier 0")),
            id => Ok(id),
        }
    }

    /// Everything left: a payload.
    pub(super) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.data)
    }
}

pub(super) fn put_varint(out: &mut BytesMut, value: usize, what: &str) -> Result<(), CodecError> {
    if value > MAX_REMAINING_LENGTH {
        return Err(cannot_encode(format!(
            "{what} {value} is over the variable byte integer limit of {MAX_REMAINING_LENGTH}"
        )));
    }
    let mut value = value;
    loop {
        // Seven bits at a time: the cast keeps exactly them.
        let mut byte = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            return Ok(());
        }
    }
}

pub(super) fn put_string(out: &mut BytesMut, s: &str, what: &str) -> Result<(), CodecError> {
    put_binary(out, s.as_bytes(), what)
}

pub(super) fn put_binary(out: &mut BytesMut, data: &[u8], what: &str) -> Result<(), CodecError> {
    let Ok(length) = u16::try_from(data.len()) else {
        return Err(cannot_encode(format!(
            "{what} of {} bytes is over the MQTT limit of 65535",
            data.len()
        )));
    };
    out.put_u16(length);
    out.extend_from_slice(data);
    Ok(())
}

pub(super) fn cannot_encode(detail: impl Into<String>) -> CodecError {
    CodecError::CannotEncode(detail.into())
}

/// Decodes a variable byte integer (§1.5.5) from the front of `bytes`: its value and length,
/// or `None` if `bytes` ends before it does.
pub(super) fn varint(bytes: &[u8], what: &str) -> Result<Option<(u32, usize)>, CodecError> {
    let mut value = 0u32;
    for (i, &byte) in bytes.iter().take(4).enumerate() {
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return Err(malformed(format!("{what} is not minimally encoded")));
            }
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        return Err(malformed(format!("{what} is longer than 4 bytes")));
    }
    Ok(None)
}
