//! Splitting PEM (or DER) input into typed blocks, with line numbers for error messages.
//!
//! Decoding itself is rustls' `PemObject`; this module adds what operators need on top: the line
//! where each block starts, encrypted-key detection, and DER input recognised as such.

use rustls_pki_types::pem::{PemObject, SectionKind};

use crate::{PkiError, Result};

/// What a block holds, by its PEM label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Label {
    /// `CERTIFICATE`.
    Certificate,
    /// `PRIVATE KEY` (PKCS#8).
    Pkcs8Key,
    /// `RSA PRIVATE KEY` (PKCS#1).
    RsaKey,
    /// `EC PRIVATE KEY` (SEC1).
    EcKey,
    /// `ENCRYPTED PRIVATE KEY`, or a traditional key with `Proc-Type: 4,ENCRYPTED`.
    EncryptedKey,
    /// `CERTIFICATE REQUEST` or `NEW CERTIFICATE REQUEST`.
    Csr,
    /// `X509 CRL`.
    Crl,
    /// Raw DER input: the kind is decided by whoever parses it.
    Der,
    /// Any other label, kept for messages.
    Other(String),
}

/// One decoded block.
#[derive(Debug, Clone)]
pub struct Block {
    /// The block's kind.
    pub label: Label,
    /// The decoded DER bytes.
    pub der: Vec<u8>,
    /// The 1-based line of its `-----BEGIN` marker; 0 for DER input.
    pub line: usize,
}

/// Splits `input` into blocks. Input without any `-----BEGIN` marker is taken as one DER block.
///
/// Text outside blocks is ignored (openssl writes `Bag Attributes` and `subject=` lines there).
pub fn decode(input: &[u8]) -> Result<Vec<Block>> {
    if !contains(input, b"-----BEGIN") {
        if input.first() == Some(&0x30) {
            return der_blocks(input);
        }
        return Ok(Vec::new());
    }
    let text = std::str::from_utf8(input)
        .map_err(|_| PkiError::malformed("", "PEM input is not valid text"))?;
    let mut blocks = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((index, line)) = lines.next() {
        let line = line.trim_end();
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
        else {
            continue;
        };
        let start = index + 1;
        let end_marker = format!("-----END {label}-----");
        let mut body = String::new();
        let mut encrypted = false;
        let mut closed = false;
        for (_, inner) in lines.by_ref() {
            let inner = inner.trim();
            if inner == end_marker {
                closed = true;
                break;
            }
            if inner.starts_with("-----BEGIN ") {
                break;
            }
            if inner.starts_with("Proc-Type:") && inner.contains("ENCRYPTED") {
                encrypted = true;
            }
            if inner.contains(':') {
                continue; // RFC 1421 headers
            }
            body.push_str(inner);
            body.push('\n');
        }
        if !closed {
            return Err(PkiError::malformed(
                format!("line {start}: "),
                format!(
                    "'-----BEGIN {label}-----' has no matching '{end_marker}' (truncated file?)"
                ),
            ));
        }
        let label_kind = match label {
            "CERTIFICATE" => Label::Certificate,
            "PRIVATE KEY" => Label::Pkcs8Key,
            "RSA PRIVATE KEY" => Label::RsaKey,
            "EC PRIVATE KEY" => Label::EcKey,
            "ENCRYPTED PRIVATE KEY" => Label::EncryptedKey,
            "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => Label::Csr,
            "X509 CRL" => Label::Crl,
            "PKCS7" | "CERTIFICATE CHAIN" => Label::Der,
            other => Label::Other(other.to_string()),
        };
        if encrypted || label_kind == Label::EncryptedKey {
            blocks.push(Block {
                label: Label::EncryptedKey,
                der: Vec::new(),
                line: start,
            });
            continue;
        }
        let der = decode_body(&label_kind, &body)
            .map_err(|detail| PkiError::malformed(format!("line {start}: "), detail))?;
        if label_kind == Label::Der {
            // A PKCS#7 certificate bundle in PEM: its certificates, at this block's line.
            for mut inner in der_blocks(&der).map_err(|_| {
                PkiError::malformed(
                    format!("line {start}: "),
                    "the PKCS#7 block is not a certificate bundle",
                )
            })? {
                inner.line = start;
                blocks.push(inner);
            }
            continue;
        }
        blocks.push(Block {
            label: label_kind,
            der,
            line: start,
        });
    }
    Ok(blocks)
}

/// One DER element at the start of `input`: its tag, its contents and its whole length.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], usize)> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let len = input
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((tag, input.get(header..end)?, end))
}

/// `1.2.840.113549.1.7.2` (PKCS#7 signed data), DER-encoded with its tag and length.
const PKCS7_SIGNED_DATA: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02,
];

/// The certificates of a PKCS#7 certs-only bundle (`.p7b`, as Windows and Java export chains),
/// or `None` when `element` (one whole DER SEQUENCE) is not one.
fn pkcs7_certificates(element: &[u8]) -> Option<Vec<Vec<u8>>> {
    let (_, content_info, _) = tlv(element)?;
    let oid = content_info.get(..PKCS7_SIGNED_DATA.len())?;
    if oid != PKCS7_SIGNED_DATA {
        return None;
    }
    let (tag, explicit, _) = tlv(&content_info[PKCS7_SIGNED_DATA.len()..])?;
    if tag != 0xa0 {
        return None;
    }
    let (_, mut signed_data, _) = tlv(explicit)?;
    let mut certificates = Vec::new();
    // version, digestAlgorithms, encapContentInfo, then certificates [0] IMPLICIT when present.
    while let Some((tag, contents, len)) = tlv(signed_data) {
        if tag == 0xa0 {
            let mut rest = contents;
            while let Some((tag, _, len)) = tlv(rest) {
                if tag == 0x30 {
                    certificates.push(rest[..len].to_vec());
                }
                rest = &rest[len..];
            }
        }
        signed_data = &signed_data[len..];
    }
    Some(certificates)
}

/// DER input: one element, several concatenated (a DER certificate bundle), or a PKCS#7
/// certificate bundle, each certificate a block.
fn der_blocks(input: &[u8]) -> Result<Vec<Block>> {
    let mut blocks = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        if !blocks.is_empty() && rest.iter().all(|b| b.is_ascii_whitespace() || *b == 0) {
            break; // padding or a final newline after the last element
        }
        let Some((_, _, len)) = tlv(rest) else {
            if blocks.is_empty() {
                // Not DER at all: let whoever parses it say what is wrong.
                return Ok(vec![Block {
                    label: Label::Der,
                    der: input.to_vec(),
                    line: 0,
                }]);
            }
            return Err(PkiError::malformed(
                "",
                format!(
                    "DER input: the {} bytes after element #{} are not a DER element",
                    rest.len(),
                    blocks.len()
                ),
            ));
        };
        let element = &rest[..len];
        match pkcs7_certificates(element) {
            Some(certificates) if certificates.is_empty() => {
                return Err(PkiError::malformed(
                    "",
                    "the PKCS#7 bundle holds no certificate",
                ));
            }
            Some(certificates) => blocks.extend(certificates.into_iter().map(|der| Block {
                label: Label::Der,
                der,
                line: 0,
            })),
            None => blocks.push(Block {
                label: Label::Der,
                der: element.to_vec(),
                line: 0,
            }),
        }
        rest = &rest[len..];
    }
    Ok(blocks)
}

/// Decodes the base64 body through rustls' PEM reader, re-framed with a label it knows.
fn decode_body(label: &Label, body: &str) -> std::result::Result<Vec<u8>, String> {
    // The label only picks the base64 decoder (secret or public); both accept the same text.
    let frame = match label {
        Label::Pkcs8Key | Label::RsaKey | Label::EcKey => "PRIVATE KEY",
        _ => "CERTIFICATE",
    };
    let pem = format!("-----BEGIN {frame}-----\n{body}-----END {frame}-----\n");
    match <(SectionKind, Vec<u8>)>::from_pem_slice(pem.as_bytes()) {
        Ok((_, der)) if der.is_empty() => Err("block is empty".into()),
        Ok((_, der)) => Ok(der),
        Err(e) => Err(format!("block is not valid base64 ({e})")),
    }
}

/// All blocks of one label from `input`, or DER input taken as that kind.
pub(crate) fn blocks_of(input: &[u8], want: &Label) -> Result<Vec<Block>> {
    Ok(decode(input)?
        .into_iter()
        .filter(|b| &b.label == want || b.label == Label::Der)
        .collect())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Encodes DER bytes as a PEM block with `label`, 64 characters a line.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = base64_encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // Invariant: base64 output is ASCII, so any byte boundary is a char boundary.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(ALPHABET[(n >> 18) as usize & 63] as char);
        out.push(ALPHABET[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            ALPHABET[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            ALPHABET[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reports_lines() {
        let der = vec![0x30, 0x03, 0x02, 0x01, 0x05];
        let pem = format!("junk\n{}", encode("CERTIFICATE", &der));
        let blocks = decode(pem.as_bytes()).unwrap();
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].der, der);
        assert_eq!(blocks[0].line, 2);
        assert_eq!(blocks[0].label, Label::Certificate);
    }

    #[test]
    fn truncated_block_names_line() {
        let pem = "\n\n-----BEGIN CERTIFICATE-----\nMAMCAQU=\n";
        let err = decode(pem.as_bytes()).unwrap_err().to_string();
        assert!(err.starts_with("line 3: "), "{err}");
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn bad_base64_is_malformed() {
        let pem = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let err = decode(pem.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("base64"), "{err}");
    }

    #[test]
    fn encrypted_keys_are_flagged() {
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        assert_eq!(
            decode(pem.as_bytes()).unwrap()[0].label,
            Label::EncryptedKey
        );
    }

    #[test]
    fn der_input_is_one_block() {
        let blocks = decode(&[0x30, 0x00]).unwrap();
        assert_eq!(blocks[0].label, Label::Der);
        assert!(decode(b"hello").unwrap().is_empty());
    }
}

#[cfg(test)]
mod property_tests {
    use super::*;
    use crate::issue::{IssueRequest, Profile, SubjectName, issue};
    use crate::{Certificate, KeyType, PrivateKey, Truststore};
    use proptest::prelude::*;

    fn sample_der() -> Vec<u8> {
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let req = IssueRequest::new(Profile::RootCa, SubjectName::cn("Fuzz Root"));
        issue(&req, &key, None).unwrap().der().to_vec()
    }

    /// Every parser that reads untrusted certificate input, on the same bytes.
    fn parse_everything(input: &[u8]) {
        let _ = decode(input);
        let _ = crate::cert::inspect(input);
        let _ = Certificate::all_from_pem_or_der(input);
        let _ = Truststore::from_pem(input);
        if let Ok(c) = Certificate::from_der(input.to_vec()) {
            let _ = c.info().to_string();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..800)) {
            parse_everything(&bytes);
            // The same bytes as the body of a PEM block.
            parse_everything(encode("CERTIFICATE", &bytes).as_bytes());
        }

        #[test]
        fn mutated_certificates_never_panic(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let mut der = sample_der();
            for (at, byte) in edits {
                let i = at.index(der.len());
                der[i] = byte;
            }
            parse_everything(&der);
            parse_everything(encode("CERTIFICATE", &der).as_bytes());
        }

        #[test]
        fn pem_blocks_round_trip(der in prop::collection::vec(any::<u8>(), 1..600)) {
            let text = encode("CERTIFICATE", &der);
            let blocks = decode(text.as_bytes()).unwrap();
            prop_assert_eq!(blocks.len(), 1);
            prop_assert_eq!(&blocks[0].der, &der);
        }
    }
}
