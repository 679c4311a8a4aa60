//! Just enough ASN.1 for CMS (RFC 5652) messages: a BER reader that takes what real clients
//! send (definite and indefinite lengths, constructed OCTET STRINGs) and a DER writer.
//!
//! The reader keeps every element's raw bytes, so a signature is checked over exactly the bytes
//! that were signed, never over a re-encoding.

use crate::{PkiError, Result};

/// How deep elements may nest (CMS needs about ten levels).
const MAX_DEPTH: usize = 32;

/// One element read from BER.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tlv<'a> {
    /// The identifier octet (class, constructed bit, tag number below 31).
    pub(crate) tag: u8,
    /// The whole element: header, contents and (for an indefinite length) end-of-contents.
    pub(crate) raw: &'a [u8],
    /// The contents (without the end-of-contents of an indefinite length).
    pub(crate) body: &'a [u8],
}

fn bad(what: &str) -> PkiError {
    PkiError::malformed("", format!("not a valid CMS message: {what}"))
}

/// Reads one element from the front of `input`; returns it and what follows.
pub(crate) fn read(input: &[u8]) -> Result<(Tlv<'_>, &[u8])> {
    read_at(input, 0)
}

fn read_at(input: &[u8], depth: usize) -> Result<(Tlv<'_>, &[u8])> {
    if depth > MAX_DEPTH {
        return Err(bad("nested too deeply"));
    }
    let (&tag, rest) = input.split_first().ok_or_else(|| bad("truncated"))?;
    if tag & 0x1f == 0x1f {
        return Err(bad("a multi-byte tag"));
    }
    let (&first, mut rest) = rest.split_first().ok_or_else(|| bad("truncated length"))?;
    let header_len;
    if first == 0x80 {
        // Indefinite length: constructed only, contents end at an end-of-contents (00 00).
        if tag & 0x20 == 0 {
            return Err(bad("an indefinite length on a primitive element"));
        }
        let start = rest;
        let mut consumed = 0;
        loop {
            if rest.len() >= 2 && rest[0] == 0 && rest[1] == 0 {
                let raw_len = 2 + consumed + 2;
                return Ok((
                    Tlv {
                        tag,
                        raw: &input[..raw_len],
                        body: &start[..consumed],
                    },
                    &rest[2..],
                ));
            }
            let (child, after) = read_at(rest, depth + 1)?;
            consumed += child.raw.len();
            rest = after;
        }
    }
    let len = if first < 0x80 {
        header_len = 2;
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(bad("a bad length"));
        }
        header_len = 2 + n;
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return Err(bad("truncated contents"));
    }
    Ok((
        Tlv {
            tag,
            raw: &input[..header_len + len],
            body: &rest[..len],
        },
        &rest[len..],
    ))
}

impl<'a> Tlv<'a> {
    /// The element inside an explicitly tagged or wrapping element, checked to have `tag`.
    pub(crate) fn expect(self, tag: u8, what: &str) -> Result<Tlv<'a>> {
        if self.tag == tag {
            Ok(self)
        } else {
            Err(bad(&format!(
                "{what} has tag {:#04x}, not {tag:#04x}",
                self.tag
            )))
        }
    }

    /// The elements inside a constructed element.
    pub(crate) fn children(&self) -> Result<Vec<Tlv<'a>>> {
        let mut out = Vec::new();
        let mut rest = self.body;
        while !rest.is_empty() {
            let (child, after) = read(rest)?;
            out.push(child);
            rest = after;
        }
        Ok(out)
    }

    /// The contents of an OCTET STRING (or an implicitly tagged one), joined when constructed
    /// (to [`MAX_DEPTH`] levels: a hostile message cannot exhaust the stack).
    pub(crate) fn octets(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.octets_into(&mut out, 0)?;
        Ok(out)
    }

    fn octets_into(&self, out: &mut Vec<u8>, depth: usize) -> Result<()> {
        if self.tag & 0x20 == 0 {
            out.extend_from_slice(self.body);
            return Ok(());
        }
        if depth >= MAX_DEPTH {
            return Err(bad("an OCTET STRING nested too deeply"));
        }
        for child in self.children()? {
            child.octets_into(out, depth + 1)?;
        }
        Ok(())
    }
}

/// One DER element: tag, definite length, contents.
pub(crate) fn element(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(contents.len() + 6);
    out.push(tag);
    let len = contents.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(contents);
    out
}

/// A SEQUENCE of already encoded elements.
pub(crate) fn seq(items: &[&[u8]]) -> Vec<u8> {
    element(0x30, &items.concat())
}

/// A SET OF already encoded elements, sorted as DER requires.
pub(crate) fn set_of(mut items: Vec<Vec<u8>>) -> Vec<u8> {
    items.sort();
    element(0x31, &items.concat())
}

/// The contents of an OBJECT IDENTIFIER.
pub(crate) fn oid_body(arcs: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut push = |mut v: u64| {
        let mut bytes = vec![(v & 0x7f) as u8];
        v >>= 7;
        while v > 0 {
            bytes.push(0x80 | (v & 0x7f) as u8);
            v >>= 7;
        }
        bytes.reverse();
        out.extend(bytes);
    };
    if let [a, b, rest @ ..] = arcs {
        push(a * 40 + b);
        for arc in rest {
            push(*arc);
        }
    }
    out
}

/// An OBJECT IDENTIFIER element.
pub(crate) fn oid(arcs: &[u64]) -> Vec<u8> {
    element(0x06, &oid_body(arcs))
}

/// An INTEGER holding the small non-negative `v`.
pub(crate) fn small_int(v: u8) -> Vec<u8> {
    if v < 0x80 {
        element(0x02, &[v])
    } else {
        element(0x02, &[0, v])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indefinite_lengths_and_constructed_octet_strings_read_as_their_contents() {
        // SEQUENCE (indefinite) { OCTET STRING (constructed, indefinite) { "ab", "c" } }
        let ber = [
            0x30, 0x80, 0x24, 0x80, 0x04, 0x02, b'a', b'b', 0x04, 0x01, b'c', 0x00, 0x00, 0x00,
            0x00, 0xff,
        ];
        let (seq, rest) = read(&ber).unwrap();
        assert_eq!(rest, &[0xff]);
        assert_eq!(seq.raw.len(), 15);
        let kids = seq.children().unwrap();
        assert_eq!(kids.len(), 1);
        assert_eq!(kids[0].octets().unwrap(), b"abc");
    }

    #[test]
    fn truncated_or_hostile_input_is_an_error_not_a_panic() {
        for bad in [
            &[0x30][..],
            &[0x30, 0x05, 0x01],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x04, 0x80, 0x00, 0x00],
            &[0x1f, 0x01, 0x00],
            &[0x30, 0x80, 0x04, 0x01],
        ] {
            assert!(read(bad).is_err(), "{bad:?}");
        }
        let deep: Vec<u8> = std::iter::repeat_n([0x30u8, 0x80], 100).flatten().collect();
        assert!(read(&deep).is_err());
        // Regression (scep_nested_octet_string_overflowed_the_stack): definite-length
        // constructed OCTET STRINGs nested 20,000 deep are an error, not a stack overflow.
        let mut nested = vec![0x04, 0x00];
        for _ in 0..20_000 {
            let mut outer = vec![0x24, 0x83];
            outer.extend_from_slice(&(nested.len() as u32).to_be_bytes()[1..]);
            outer.extend(nested);
            nested = outer;
        }
        let (tlv, _) = read(&nested).unwrap();
        assert!(tlv.octets().is_err());
    }

    #[test]
    fn object_identifiers_encode_as_der() {
        // 1.2.840.113549.1.7.2 and 2.16.840.1.113733.1.9.2
        assert_eq!(
            oid_body(&[1, 2, 840, 113549, 1, 7, 2]),
            [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02]
        );
        assert_eq!(
            oid_body(&[2, 16, 840, 1, 113733, 1, 9, 2]),
            [0x60, 0x86, 0x48, 0x01, 0x86, 0xf8, 0x45, 0x01, 0x09, 0x02]
        );
        assert_eq!(element(0x04, &[0; 300])[..4], [0x04, 0x82, 0x01, 0x2c]);
    }
}
