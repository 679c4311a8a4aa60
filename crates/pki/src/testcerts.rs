//! Certificates for tests that the issuing code refuses to make: X.509 v1, basic constraints
//! not marked critical, no key identifiers, as OpenSSL's commands make them. Built as DER by
//! hand and signed with ECDSA P-256.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use rcgen::{KeyPair, PublicKeyData, SigningKey};

use crate::cert::Certificate;

/// What to build.
pub(crate) struct Spec<'a> {
    pub(crate) cn: &'a str,
    /// 1 or 3.
    pub(crate) version: u8,
    /// basicConstraints CA:TRUE (critical or not), CA:FALSE, or none.
    pub(crate) ca: Option<(bool, bool)>,
    /// extendedKeyUsage clientAuth.
    pub(crate) client_auth: bool,
    /// Seconds from now the validity ends (negative: expired).
    pub(crate) until: i64,
}

impl Spec<'_> {
    pub(crate) fn v3(cn: &str) -> Spec<'_> {
        Spec {
            cn,
            version: 3,
            ca: None,
            client_auth: true,
            until: 86_400 * 30,
        }
    }
}

/// A key and the certificate it makes; `issuer` signs (self-signed when `None`).
pub(crate) fn build(
    spec: &Spec<'_>,
    issuer: Option<(&Certificate, &KeyPair)>,
) -> (Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let cert = build_with(spec, &key, issuer);
    (cert, key)
}

pub(crate) fn build_with(
    spec: &Spec<'_>,
    key: &KeyPair,
    issuer: Option<(&Certificate, &KeyPair)>,
) -> Certificate {
    let subject = name(spec.cn);
    let (issuer_name, signer) = match issuer {
        Some((cert, k)) => (cert.info().subject_der.clone(), k),
        None => (subject.clone(), key),
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let ecdsa_sha256 = seq(&[oid(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02])]);
    let mut tbs = Vec::new();
    if spec.version == 3 {
        tbs.extend(tlv(0xa0, &tlv(0x02, &[2])));
    }
    let serial = {
        let mut s = vec![0x01];
        s.extend_from_slice(&(now as u64).to_be_bytes());
        s.extend_from_slice(spec.cn.as_bytes().get(..4).unwrap_or(b"xxxx"));
        s
    };
    tbs.extend(tlv(0x02, &serial));
    tbs.extend(ecdsa_sha256.clone());
    tbs.extend(issuer_name);
    tbs.extend(seq(&[utc(now - 3600), utc(now + spec.until)]));
    tbs.extend(subject);
    tbs.extend(signer_spki(key));
    if spec.version == 3 {
        let mut exts = Vec::new();
        // Key identifiers as every CA makes them: the first 20 bytes of the key's SHA-256.
        let own_id = key_id(&signer_spki(key));
        let issuer_id = match issuer {
            Some((cert, _)) => key_id(&cert.spki_der()),
            None => own_id.clone(),
        };
        exts.push(extension(&[0x55, 0x1d, 0x0e], false, &tlv(0x04, &own_id)));
        exts.push(extension(
            &[0x55, 0x1d, 0x23],
            false,
            &seq(&[tlv(0x80, &issuer_id)]),
        ));
        if let Some((is_ca, critical)) = spec.ca {
            let bc = if is_ca {
                seq(&[tlv(0x01, &[0xff])])
            } else {
                seq(&[])
            };
            exts.push(extension(&[0x55, 0x1d, 0x13], critical, &bc));
        }
        if spec.client_auth {
            let eku = seq(&[oid(&[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02])]);
            exts.push(extension(&[0x55, 0x1d, 0x25], false, &eku));
        }
        if !exts.is_empty() {
            tbs.extend(tlv(0xa3, &seq(&exts)));
        }
    }
    let tbs = tlv(0x30, &tbs);
    let signature = signer.sign(&tbs).unwrap();
    let mut bits = vec![0];
    bits.extend(signature);
    let der = seq(&[tbs, ecdsa_sha256, tlv(0x03, &bits)]);
    Certificate::from_der(der).unwrap()
}

fn key_id(spki: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, spki).as_ref()[..20].to_vec()
}

fn signer_spki(key: &KeyPair) -> Vec<u8> {
    key.subject_public_key_info()
}

fn name(cn: &str) -> Vec<u8> {
    let atv = seq(&[oid(&[0x55, 0x04, 0x03]), tlv(0x0c, cn.as_bytes())]);
    seq(&[tlv(0x31, &atv)])
}

fn extension(id: &[u8], critical: bool, value: &[u8]) -> Vec<u8> {
    let mut parts = vec![oid(id)];
    if critical {
        parts.push(tlv(0x01, &[0xff]));
    }
    parts.push(tlv(0x04, value));
    seq(&parts)
}

fn utc(unix: i64) -> Vec<u8> {
    let t = time::OffsetDateTime::from_unix_timestamp(unix).unwrap();
    let text = format!(
        "{:02}{:02}{:02}{:02}{:02}{:02}Z",
        t.year() % 100,
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    tlv(0x17, text.as_bytes())
}

fn oid(bytes: &[u8]) -> Vec<u8> {
    tlv(0x06, bytes)
}

fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}
