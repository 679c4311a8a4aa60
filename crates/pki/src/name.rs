//! Distinguished names: RFC 4514 text for people, and rcgen names for issuing.

use rcgen::{DistinguishedName, DnType, DnValue};
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::x509::{AttributeTypeAndValue, X509Name};

use crate::{PkiError, Result};

/// Formats a name as RFC 4514 text (last RDN first, as `openssl -nameopt RFC2253` prints).
pub(crate) fn rfc4514(name: &X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| format!("{}={}", short_name(attr), escape(&value_text(attr))))
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// The first value of an attribute type in `name`, as text (`CN`, `O`…).
pub(crate) fn attribute(name: &X509Name<'_>, short: &str) -> Option<String> {
    name.iter_attributes()
        .find(|a| short_name(a) == short)
        .map(value_text)
}

/// Every attribute of `name` as (short name, text), in order.
pub(crate) fn attributes(name: &X509Name<'_>) -> Vec<(String, String)> {
    name.iter_attributes()
        .map(|a| (short_name(a), value_text(a)))
        .collect()
}

/// The subject attributes policies read as variables (`${cert:Subject.CN}`…), by the DER of
/// their OIDs (CN 2.5.4.3, C 2.5.4.6, O 2.5.4.10, OU 2.5.4.11): compared as bytes, since every
/// certificate parsed in a handshake is checked.
const POLICY_ATTRIBUTES: [(&[u8], &str); 4] = [
    (&[0x55, 0x04, 0x03], "CN"),
    (&[0x55, 0x04, 0x06], "C"),
    (&[0x55, 0x04, 0x0a], "O"),
    (&[0x55, 0x04, 0x0b], "OU"),
];

/// Why a name cannot be read as one identity: a multi-valued RDN, an attribute that policies
/// read (CN, O, OU, C) given twice, or a value that is not text (rendered `#hex`, it could
/// collide with that literal text). `None` for an ordinary name.
pub(crate) fn ambiguity(name: &X509Name<'_>) -> Option<String> {
    let mut seen = [false; POLICY_ATTRIBUTES.len()];
    for rdn in name.iter() {
        if rdn.iter().nth(1).is_some() {
            let types: Vec<String> = rdn.iter().map(short_name).collect();
            return Some(format!("a multi-valued RDN ({})", types.join("+")));
        }
        for attr in rdn.iter() {
            if !is_text(attr) {
                return Some(format!("a {} value that is not text", short_name(attr)));
            }
            let oid = attr.attr_type().as_bytes();
            if let Some(i) = POLICY_ATTRIBUTES.iter().position(|(o, _)| *o == oid) {
                if seen[i] {
                    return Some(format!("more than one {}", POLICY_ATTRIBUTES[i].1));
                }
                seen[i] = true;
            }
        }
    }
    None
}

/// Whether an attribute's value decodes as text (as [`value_text`] renders it without `#hex`).
fn is_text(attr: &AttributeTypeAndValue<'_>) -> bool {
    let value = attr.attr_value();
    if value.header.tag() == Tag::BmpString {
        let units: Vec<u16> = value
            .data
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        return value.data.len() % 2 == 0 && String::from_utf16(&units).is_ok();
    }
    attr.as_str().is_ok()
}

/// Converts a parsed name to rcgen's form, keeping every string type so that the encoding is
/// byte-for-byte the same (chain building compares names as bytes).
pub(crate) fn to_rcgen(name: &X509Name<'_>) -> Result<DistinguishedName> {
    let mut dn = DistinguishedName::new();
    let mut seen = Vec::new();
    for rdn in name.iter() {
        let attrs: Vec<_> = rdn.iter().collect();
        if attrs.len() != 1 {
            return Err(PkiError::InvalidRequest(format!(
                "name '{}' has a multi-valued RDN, which Portcullis cannot reproduce",
                rfc4514(name)
            )));
        }
        let attr = attrs[0];
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| PkiError::malformed("", "name attribute type is not a valid OID"))?
            .collect();
        if seen.contains(&oid) {
            return Err(PkiError::InvalidRequest(format!(
                "name '{}' repeats the attribute {}, which Portcullis cannot reproduce",
                rfc4514(name),
                short_name(attr)
            )));
        }
        seen.push(oid.clone());
        let value = attr.attr_value();
        let data = value.data;
        let text = || {
            std::str::from_utf8(data)
                .map_err(|_| PkiError::malformed("", "name attribute is not valid text"))
        };
        let bad =
            |_| PkiError::malformed("", "name attribute has characters its string type forbids");
        let dn_value = match value.header.tag() {
            Tag::PrintableString => DnValue::PrintableString(text()?.try_into().map_err(bad)?),
            Tag::Utf8String => DnValue::Utf8String(text()?.to_owned()),
            Tag::Ia5String => DnValue::Ia5String(text()?.try_into().map_err(bad)?),
            Tag::T61String => DnValue::TeletexString(text()?.try_into().map_err(bad)?),
            Tag::BmpString => DnValue::BmpString(
                rcgen::string::BmpString::from_utf16be(data.to_vec()).map_err(bad)?,
            ),
            Tag::UniversalString => DnValue::UniversalString(
                rcgen::string::UniversalString::from_utf32be(data.to_vec()).map_err(bad)?,
            ),
            other => {
                return Err(PkiError::InvalidRequest(format!(
                    "name attribute {} has the unsupported ASN.1 type {other}",
                    short_name(attr)
                )));
            }
        };
        dn.push(DnType::from_oid(&oid), dn_value);
    }
    Ok(dn)
}

fn short_name(attr: &AttributeTypeAndValue<'_>) -> String {
    let oid = attr.attr_type().to_id_string();
    match oid.as_str() {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.42" => "GN",
        "2.5.4.43" => "initials",
        "2.5.4.44" => "generationQualifier",
        "2.5.4.46" => "dnQualifier",
        "2.5.4.65" => "pseudonym",
        "2.5.4.97" => "organizationIdentifier",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "emailAddress",
        _ => return oid,
    }
    .to_string()
}

fn value_text(attr: &AttributeTypeAndValue<'_>) -> String {
    let value = attr.attr_value();
    if value.header.tag() == Tag::BmpString {
        let units: Vec<u16> = value
            .data
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
            .collect();
        return String::from_utf16_lossy(&units);
    }
    match attr.as_str() {
        Ok(s) => s.to_string(),
        Err(_) => format!(
            "#{}",
            value
                .data
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ),
    }
}

/// RFC 4514 section 2.4 escaping.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == ' ' || c == '#'))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        if c == '\0' {
            out.push_str("\\00");
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_read_as_two_identities_are_ambiguous() {
        use crate::{IssueRequest, KeyType, PrivateKey, Profile, SubjectName};
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let subject = SubjectName {
            common_name: "AAAA".into(),
            organization: Some("Acme".into()),
            ..Default::default()
        };
        let cert =
            crate::issue::issue(&IssueRequest::new(Profile::RootCa, subject), &key, None).unwrap();
        assert_eq!(cert.subject_ambiguity(), None);
        // The same certificate with its CN's bytes made invalid UTF-8: rendered `#hex`, it could
        // collide with that text, so it is ambiguous (the signature no longer matters here).
        let mut der = cert.der().to_vec();
        while let Some(at) = der.windows(4).position(|w| w == b"AAAA") {
            der[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
        }
        let broken = crate::Certificate::from_der(der).unwrap();
        assert!(
            broken.info().subject.contains("fffefdfc"),
            "{}",
            broken.info().subject
        );
        assert_eq!(
            broken.subject_ambiguity(),
            Some("a CN value that is not text")
        );
    }

    #[test]
    fn escapes_specials() {
        assert_eq!(escape("a,b"), "a\\,b");
        assert_eq!(escape(" lead"), "\\ lead");
        assert_eq!(escape("#x"), "\\#x");
        assert_eq!(escape("trail "), "trail\\ ");
        assert_eq!(escape("plain"), "plain");
    }
}
