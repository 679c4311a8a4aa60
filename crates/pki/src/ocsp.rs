//! OCSP (RFC 6960) for a CA Portcullis holds: reading requests, writing signed responses.
//!
//! A request names certificates by `CertID` (hashes of the issuer's name and key, and the
//! serial number); [`Responder::read`] tells which of them this CA issued, the caller gives each
//! one's status. Responses are signed by a delegated responder ([`Signer`]: a short-lived
//! certificate from the CA with EKU OCSPSigning and id-pkix-ocsp-nocheck, sent along; responder
//! ID by its key hash), carry the request's nonce when it sent one, and are valid for
//! [`Responder::validity_secs`].

/// A delegated OCSP responder: its certificate, issued by the CA, and its key.
pub struct Signer {
    cert: crate::cert::Certificate,
    key: crate::key::PrivateKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("subject", &self.cert.info().subject)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A new delegated responder for `ca`, valid `days` days (a P-256 key, never written).
    pub fn issue(ca: &CaIssuer, days: u32) -> Result<Signer> {
        let key = crate::key::PrivateKey::generate(crate::key::KeyType::EcP256)?;
        let cn = ca
            .certificate()
            .subject_attribute("CN")
            .unwrap_or_else(|| "Portcullis".into());
        let mut req = crate::issue::IssueRequest::new(
            crate::issue::Profile::OcspSigning,
            crate::issue::SubjectName {
                common_name: format!("{cn} OCSP responder"),
                organization: Some("Portcullis".into()),
                ..Default::default()
            },
        );
        req.days = days;
        let cert = crate::issue::issue(&req, &key, Some(ca))?;
        Ok(Signer { cert, key })
    }

    /// Its certificate.
    pub fn certificate(&self) -> &crate::cert::Certificate {
        &self.cert
    }
}

use crate::der::{self, element, oid, oid_body, seq};
use crate::issue::CaIssuer;
use crate::{PkiError, Result};

const SHA1: &[u64] = &[1, 3, 14, 3, 2, 26];
const SHA256: &[u64] = &[2, 16, 840, 1, 101, 3, 4, 2, 1];
const OCSP_BASIC: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 48, 1, 1];
const OCSP_NONCE: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 48, 1, 2];

/// A certificate's status, as the responder's caller knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Issued and not revoked.
    Good,
    /// Revoked at this time (seconds since the epoch), for this CRLReason if known.
    Revoked {
        /// When.
        at: i64,
        /// RFC 5280 CRLReason code.
        reason: Option<u8>,
    },
    /// Not known to this responder.
    Unknown,
}

/// One certificate a request asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    /// Its serial number (the INTEGER's contents).
    pub serial: Vec<u8>,
    /// Whether its CertID names this responder's CA (name and key hashes match).
    pub ours: bool,
    cert_id: Vec<u8>,
}

/// A parsed OCSP request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The certificates asked about.
    pub asked: Vec<Asked>,
    /// The nonce extension's value, echoed in the response.
    pub nonce: Option<Vec<u8>>,
}

/// Why an OCSP request cannot be answered (RFC 6960 OCSPResponseStatus).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorStatus {
    /// `malformedRequest` (1).
    MalformedRequest = 1,
    /// `internalError` (2).
    InternalError = 2,
    /// `tryLater` (3).
    TryLater = 3,
    /// `unauthorized` (6).
    Unauthorized = 6,
}

/// The unsigned answer to a request that cannot be answered.
pub fn error_response(status: ErrorStatus) -> Vec<u8> {
    seq(&[&element(0x0a, &[status as u8])])
}

/// Signs OCSP responses for one CA.
pub struct Responder<'a> {
    signer: &'a Signer,
    /// How long a response is valid (nextUpdate - thisUpdate), in seconds.
    pub validity_secs: i64,
    name_hashes: [Vec<u8>; 2],
    key_hashes: [Vec<u8>; 2],
    key_hash_sha1: Vec<u8>,
}

impl<'a> Responder<'a> {
    /// A responder for `ca` signing with `signer` (issued by `ca`), answering for
    /// `validity_secs`.
    pub fn new(ca: &'a CaIssuer, signer: &'a Signer, validity_secs: i64) -> Result<Responder<'a>> {
        let (name, key) = ca.certificate().with_parsed(|c| {
            (
                c.tbs_certificate.subject.as_raw().to_vec(),
                c.public_key().subject_public_key.data.to_vec(),
            )
        })?;
        let sha1 = |d: &[u8]| {
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, d)
                .as_ref()
                .to_vec()
        };
        let sha256 = |d: &[u8]| crate::cert::sha256(d).to_vec();
        let signer_key = signer
            .cert
            .with_parsed(|c| c.public_key().subject_public_key.data.to_vec())?;
        Ok(Responder {
            signer,
            validity_secs,
            name_hashes: [sha1(&name), sha256(&name)],
            key_hashes: [sha1(&key), sha256(&key)],
            key_hash_sha1: sha1(&signer_key),
        })
    }

    /// Reads a DER `OCSPRequest`.
    pub fn read(&self, der_request: &[u8]) -> Result<Request> {
        let bad = |what: &str| PkiError::malformed("", format!("not an OCSP request: {what}"));
        let (request, rest) = der::read(der_request)?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        let parts = request.expect(0x30, "OCSPRequest")?.children()?;
        let tbs = parts
            .first()
            .ok_or_else(|| bad("no tbsRequest"))?
            .expect(0x30, "tbsRequest")?
            .children()?;
        let mut asked = Vec::new();
        let mut nonce = None;
        for part in &tbs {
            match part.tag {
                // version [0], requestorName [1]: nothing to do with them.
                0xa0 | 0xa1 => {}
                0x30 => {
                    for one in part.children()? {
                        let fields = one.children()?;
                        let cert_id = fields
                            .first()
                            .ok_or_else(|| bad("a request with no CertID"))?;
                        asked.push(self.cert_id(cert_id)?);
                        if asked.len() > 100 {
                            return Err(bad("more than 100 certificates asked at once"));
                        }
                    }
                }
                0xa2 => {
                    for ext in part
                        .children()?
                        .first()
                        .map(|e| e.children())
                        .transpose()?
                        .unwrap_or_default()
                    {
                        let fields = ext.children()?;
                        if fields.first().is_some_and(|o| {
                            o.tag == 0x06 && o.body == oid_body(OCSP_NONCE).as_slice()
                        }) {
                            let value = fields
                                .last()
                                .ok_or_else(|| bad("an empty nonce"))?
                                .octets()?;
                            // The extension's value is an OCTET STRING holding the nonce (RFC 8954),
                            // or — as some clients send it — the nonce itself.
                            let inner = match der::read(&value) {
                                Ok((t, rest)) if t.tag == 0x04 && rest.is_empty() => {
                                    t.body.to_vec()
                                }
                                _ => value,
                            };
                            if inner.is_empty() || inner.len() > 128 {
                                return Err(bad("a nonce of 1-128 bytes is allowed"));
                            }
                            nonce = Some(inner);
                        }
                    }
                }
                _ => return Err(bad("an unexpected field")),
            }
        }
        if asked.is_empty() {
            return Err(bad("no certificate asked about"));
        }
        Ok(Request { asked, nonce })
    }

    /// The question about `cert` (issued by this responder's CA) a client would ask: what a
    /// server staples its own answer for.
    pub fn asked_for(&self, cert: &crate::cert::Certificate) -> Result<Asked> {
        let serial = cert.with_parsed(|c| c.tbs_certificate.raw_serial().to_vec())?;
        let cert_id = seq(&[
            &seq(&[&oid(SHA1), &[0x05, 0x00]]),
            &element(0x04, &self.name_hashes[0]),
            &element(0x04, &self.key_hashes[0]),
            &element(0x02, &serial),
        ]);
        Ok(Asked {
            serial,
            ours: true,
            cert_id,
        })
    }

    fn cert_id(&self, cert_id: &der::Tlv<'_>) -> Result<Asked> {
        let bad = || PkiError::malformed("", "not an OCSP request: a bad CertID");
        let fields = cert_id.expect(0x30, "CertID")?.children()?;
        let [alg, name_hash, key_hash, serial] = fields.as_slice() else {
            return Err(bad());
        };
        let alg = alg.children()?;
        let which = match alg.first() {
            Some(o) if o.body == oid_body(SHA1).as_slice() => 0,
            Some(o) if o.body == oid_body(SHA256).as_slice() => 1,
            _ => usize::MAX,
        };
        if serial.tag != 0x02 || name_hash.tag != 0x04 || key_hash.tag != 0x04 {
            return Err(bad());
        }
        let ours = which != usize::MAX
            && name_hash.body == self.name_hashes[which].as_slice()
            && key_hash.body == self.key_hashes[which].as_slice();
        Ok(Asked {
            serial: serial.body.to_vec(),
            ours,
            cert_id: cert_id.raw.to_vec(),
        })
    }

    /// The signed `OCSPResponse` (successful) for `answers` (each asked certificate and its
    /// status), produced at `now` (seconds since the epoch).
    pub fn answer(
        &self,
        answers: &[(&Asked, Status)],
        nonce: Option<&[u8]>,
        now: i64,
    ) -> Result<Vec<u8>> {
        let time = |t: i64| -> Result<Vec<u8>> {
            let t = ::time::OffsetDateTime::from_unix_timestamp(t)
                .map_err(|_| PkiError::Signing("a time out of range".into()))?;
            Ok(element(
                0x18,
                format!(
                    "{:04}{:02}{:02}{:02}{:02}{:02}Z",
                    t.year(),
                    u8::from(t.month()),
                    t.day(),
                    t.hour(),
                    t.minute(),
                    t.second()
                )
                .as_bytes(),
            ))
        };
        let mut responses = Vec::new();
        for (asked, status) in answers {
            let status = match status {
                Status::Good => vec![0x80, 0x00],
                Status::Revoked { at, reason } => {
                    let mut body = time(*at)?;
                    if let Some(r) = reason {
                        body.extend(element(0xa0, &element(0x0a, &[*r])));
                    }
                    element(0xa1, &body)
                }
                Status::Unknown => vec![0x82, 0x00],
            };
            responses.push(seq(&[
                &asked.cert_id,
                &status,
                &time(now)?,
                &element(0xa0, &time(now + self.validity_secs)?),
            ]));
        }
        let mut tbs_parts = vec![
            // responderID byKey [2]: SHA-1 of the responder's public key.
            element(0xa2, &element(0x04, &self.key_hash_sha1)),
            time(now)?,
            seq(&responses.iter().map(Vec::as_slice).collect::<Vec<_>>()),
        ];
        if let Some(nonce) = nonce {
            let ext = seq(&[&oid(OCSP_NONCE), &element(0x04, &element(0x04, nonce))]);
            tbs_parts.push(element(0xa1, &seq(&[&ext])));
        }
        let tbs = seq(&tbs_parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let (signature, algorithm) =
            crate::issue::sign_raw(&self.signer.cert, &self.signer.key, &tbs)?;
        let mut sig_bits = vec![0u8];
        sig_bits.extend(signature);
        let basic = seq(&[
            &tbs,
            &algorithm,
            &element(0x03, &sig_bits),
            // certs [0]: the delegated responder's certificate.
            &element(0xa0, &seq(&[self.signer.cert.der()])),
        ]);
        let response_bytes = seq(&[&oid(OCSP_BASIC), &element(0x04, &basic)]);
        Ok(seq(&[
            &element(0x0a, &[0]),
            &element(0xa0, &response_bytes),
        ]))
    }
}

/// An OCSP responder's answer about one certificate, checked (see [`read_response`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Good, revoked (with time and reason) or unknown.
    pub status: Status,
    /// thisUpdate (seconds since the epoch).
    pub this_update: i64,
    /// nextUpdate, when the responder gives one.
    pub next_update: Option<i64>,
}

/// SHA-1 (the hash every responder accepts in a CertID) of `data`.
fn sha1(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, data)
        .as_ref()
        .to_vec()
}

/// The CertID (SHA-1) of `leaf` issued by `issuer`.
fn cert_id_of(
    leaf: &crate::cert::Certificate,
    issuer: &crate::cert::Certificate,
) -> Result<Vec<u8>> {
    let serial = leaf.with_parsed(|c| c.tbs_certificate.raw_serial().to_vec())?;
    let (name, key) = issuer.with_parsed(|c| {
        (
            c.tbs_certificate.subject.as_raw().to_vec(),
            c.public_key().subject_public_key.data.to_vec(),
        )
    })?;
    Ok(seq(&[
        &seq(&[&oid(SHA1), &[0x05, 0x00]]),
        &element(0x04, &sha1(&name)),
        &element(0x04, &sha1(&key)),
        &element(0x02, &serial),
    ]))
}

/// The DER `OCSPRequest` asking about `leaf`, issued by `issuer` (no nonce: responders and
/// caches in front of them may answer from a precomputed response).
pub fn request_for(
    leaf: &crate::cert::Certificate,
    issuer: &crate::cert::Certificate,
) -> Result<Vec<u8>> {
    let cert_id = cert_id_of(leaf, issuer)?;
    // OCSPRequest { tbsRequest { requestList SEQUENCE OF Request { reqCert } } }
    Ok(seq(&[&seq(&[&seq(&[&seq(&[&cert_id])])])]))
}

/// Parses a GeneralizedTime (`YYYYMMDDHHMMSS[.fff]Z`) as seconds since the epoch.
fn generalized_time(tlv: &der::Tlv<'_>) -> Option<i64> {
    if tlv.tag != 0x18 {
        return None;
    }
    let text = std::str::from_utf8(tlv.body).ok()?;
    let text = text.strip_suffix('Z')?;
    let whole = text.split('.').next()?;
    if whole.len() != 14 || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| whole[r].parse::<u32>().ok();
    let month = ::time::Month::try_from(u8::try_from(n(4..6)?).ok()?).ok()?;
    let date = ::time::Date::from_calendar_date(
        i32::try_from(n(0..4)?).ok()?,
        month,
        u8::try_from(n(6..8)?).ok()?,
    )
    .ok()?;
    let t = ::time::Time::from_hms(
        u8::try_from(n(8..10)?).ok()?,
        u8::try_from(n(10..12)?).ok()?,
        u8::try_from(n(12..14)?).ok()?,
    )
    .ok()?;
    Some(
        ::time::PrimitiveDateTime::new(date, t)
            .assume_utc()
            .unix_timestamp(),
    )
}

/// How far a responder's clock may be ahead of ours.
const CLOCK_SKEW_SECS: i64 = 300;

/// Reads a DER `OCSPResponse` to the request of [`request_for`] about `leaf` (issued by
/// `issuer`), at `now`: a successful response, signed by `issuer` or by a responder
/// certificate `issuer` issued with EKU OCSPSigning (valid now), answering for this very
/// certificate, current (thisUpdate not in the future, nextUpdate not past). Anything else is
/// an error saying what was wrong.
pub fn read_response(
    der_response: &[u8],
    leaf: &crate::cert::Certificate,
    issuer: &crate::cert::Certificate,
    now: i64,
) -> Result<Answer> {
    let bad = |what: &str| PkiError::malformed("", format!("not a usable OCSP response: {what}"));
    let (response, _) = der::read(der_response)?;
    let parts = response.expect(0x30, "OCSPResponse")?.children()?;
    let status = parts.first().ok_or_else(|| bad("no status"))?;
    if status.tag != 0x0a || status.body.len() != 1 {
        return Err(bad("a bad responseStatus"));
    }
    match status.body[0] {
        0 => {}
        1 => return Err(bad("the responder says malformedRequest")),
        2 => return Err(bad("the responder says internalError")),
        3 => return Err(bad("the responder says tryLater")),
        5 => return Err(bad("the responder says sigRequired")),
        6 => {
            return Err(bad(
                "the responder says unauthorized (it does not answer for this CA)",
            ));
        }
        other => return Err(bad(&format!("responseStatus {other}"))),
    }
    let bytes = parts
        .get(1)
        .ok_or_else(|| bad("no responseBytes"))?
        .expect(0xa0, "responseBytes")?
        .children()?;
    let bytes = bytes
        .first()
        .ok_or_else(|| bad("empty responseBytes"))?
        .children()?;
    let [kind, octets] = bytes.as_slice() else {
        return Err(bad("a bad responseBytes"));
    };
    if kind.tag != 0x06 || kind.body != oid_body(OCSP_BASIC).as_slice() {
        return Err(bad("not a basic OCSP response"));
    }
    let basic_der = octets.octets()?;
    let (basic, _) = der::read(&basic_der)?;
    let basic = basic.expect(0x30, "BasicOCSPResponse")?.children()?;
    let (tbs, alg, sig) = match basic.as_slice() {
        [tbs, alg, sig, ..] => (tbs, alg, sig),
        _ => return Err(bad("a short BasicOCSPResponse")),
    };
    if sig.tag != 0x03 || sig.body.is_empty() {
        return Err(bad("a bad signature"));
    }
    let mut certs = Vec::new();
    if let Some(list) = basic.get(3) {
        for c in list
            .expect(0xa0, "certs")?
            .children()?
            .first()
            .map(|s| s.children())
            .transpose()?
            .unwrap_or_default()
        {
            certs.push(crate::cert::Certificate::from_der(c.raw.to_vec())?);
        }
        if certs.len() > 8 {
            return Err(bad("more than 8 certificates"));
        }
    }
    // Who signed: the CA itself, or a delegated responder it issued (RFC 6960 4.2.2.2).
    let signed_by = |signer: &crate::cert::Certificate| -> bool {
        use x509_parser::prelude::FromDer;
        let Ok((_, alg)) = x509_parser::x509::AlgorithmIdentifier::from_der(alg.raw) else {
            return false;
        };
        let bits = x509_parser::der_parser::asn1_rs::BitString::new(sig.body[0], &sig.body[1..]);
        signer
            .with_parsed(|c| {
                x509_parser::verify::verify_signature(c.public_key(), &alg, &bits, tbs.raw).is_ok()
            })
            .unwrap_or(false)
    };
    let delegated = certs.iter().find(|c| {
        c.is_signed_by(issuer)
            && c.info()
                .extended_key_usage
                .iter()
                .any(|e| e == "OCSPSigning" || e == "1.3.6.1.5.5.7.3.9")
            && c.info().not_before_unix() <= now + CLOCK_SKEW_SECS
            && now < c.info().not_after_unix()
            && signed_by(c)
    });
    if delegated.is_none() && !signed_by(issuer) {
        return Err(bad(&format!(
            "not signed by '{}' or a responder it authorized (EKU OCSPSigning)",
            issuer.info().subject
        )));
    }
    // tbsResponseData: [0] version?, responderID, producedAt, responses, [1] extensions?
    if tbs.tag != 0x30 {
        return Err(bad("a bad ResponseData"));
    }
    let fields = tbs.children()?;
    let responses = fields
        .iter()
        .find(|f| f.tag == 0x30)
        .ok_or_else(|| bad("no responses"))?
        .children()?;
    for single in responses {
        let f = single.children()?;
        let (Some(id), Some(status), Some(this)) = (f.first(), f.get(1), f.get(2)) else {
            return Err(bad("a short SingleResponse"));
        };
        if !same_cert_id(id, leaf, issuer)? {
            continue;
        }
        let this_update = generalized_time(this).ok_or_else(|| bad("a bad thisUpdate"))?;
        let next_update = match f.get(3) {
            Some(n) if n.tag == 0xa0 => Some(
                n.children()?
                    .first()
                    .and_then(generalized_time)
                    .ok_or_else(|| bad("a bad nextUpdate"))?,
            ),
            _ => None,
        };
        if this_update > now + CLOCK_SKEW_SECS {
            return Err(bad("thisUpdate is in the future"));
        }
        if next_update.is_some_and(|n| n < now) {
            return Err(bad("the answer is past its nextUpdate"));
        }
        let status = match status.tag {
            0x80 => Status::Good,
            0x82 => Status::Unknown,
            0xa1 => {
                let r = status.children()?;
                let at = r
                    .first()
                    .and_then(generalized_time)
                    .ok_or_else(|| bad("a bad revocationTime"))?;
                let reason = r
                    .get(1)
                    .filter(|t| t.tag == 0xa0)
                    .and_then(|t| t.children().ok())
                    .and_then(|c| {
                        c.first()
                            .filter(|e| e.tag == 0x0a)
                            .and_then(|e| e.body.first().copied())
                    });
                Status::Revoked { at, reason }
            }
            _ => return Err(bad("a bad certStatus")),
        };
        return Ok(Answer {
            status,
            this_update,
            next_update,
        });
    }
    Err(bad("no answer about this certificate"))
}

/// Whether a response's CertID names `leaf` of `issuer`, whatever hash it uses (SHA-1 or
/// SHA-256).
fn same_cert_id(
    id: &der::Tlv<'_>,
    leaf: &crate::cert::Certificate,
    issuer: &crate::cert::Certificate,
) -> Result<bool> {
    let fields = id.children()?;
    let [alg, name_hash, key_hash, serial] = fields.as_slice() else {
        return Ok(false);
    };
    let hash: fn(&[u8]) -> Vec<u8> = match alg.children()?.first() {
        Some(o) if o.body == oid_body(SHA1).as_slice() => sha1,
        Some(o) if o.body == oid_body(SHA256).as_slice() => |d| crate::cert::sha256(d).to_vec(),
        _ => return Ok(false),
    };
    let leaf_serial = leaf.with_parsed(|c| c.tbs_certificate.raw_serial().to_vec())?;
    let (name, key) = issuer.with_parsed(|c| {
        (
            c.tbs_certificate.subject.as_raw().to_vec(),
            c.public_key().subject_public_key.data.to_vec(),
        )
    })?;
    Ok(serial.body == leaf_serial.as_slice()
        && name_hash.body == hash(&name).as_slice()
        && key_hash.body == hash(&key).as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::Certificate;
    use crate::issue::{IssueRequest, Profile, SubjectName, issue};
    use crate::key::{KeyType, PrivateKey};

    fn ca(name: &str) -> CaIssuer {
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let cert = issue(
            &IssueRequest::new(Profile::RootCa, SubjectName::cn(name)),
            &key,
            None,
        )
        .unwrap();
        CaIssuer::new(cert, key, Vec::new()).unwrap()
    }

    fn leaf(ca: &CaIssuer) -> Certificate {
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        issue(
            &IssueRequest::new(Profile::Client, SubjectName::cn("device")),
            &key,
            Some(ca),
        )
        .unwrap()
    }

    /// The client side reads what the responder side writes: good, revoked with time and
    /// reason; and refuses an answer someone else signed, one about another certificate, one
    /// past its nextUpdate, and a tampered one.
    #[test]
    fn answers_are_read_only_when_signed_current_and_about_the_certificate() {
        let ca = ca("Partner CA");
        let signer = Signer::issue(&ca, 2).unwrap();
        let responder = Responder::new(&ca, &signer, 600).unwrap();
        let device = leaf(&ca);
        let other = leaf(&ca);
        let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
        let request = request_for(&device, ca.certificate()).unwrap();
        let asked = responder.read(&request).unwrap();
        assert!(asked.asked[0].ours && asked.nonce.is_none());

        let good = responder
            .answer(&[(&asked.asked[0], Status::Good)], None, now)
            .unwrap();
        let answer = read_response(&good, &device, ca.certificate(), now).unwrap();
        assert_eq!(answer.status, Status::Good);
        assert_eq!(answer.next_update, Some(now + 600));

        let revoked = Status::Revoked {
            at: now - 60,
            reason: Some(1),
        };
        let der = responder
            .answer(&[(&asked.asked[0], revoked)], None, now)
            .unwrap();
        assert_eq!(
            read_response(&der, &device, ca.certificate(), now)
                .unwrap()
                .status,
            revoked
        );

        // About another certificate: not an answer for this one.
        let e = read_response(&good, &other, ca.certificate(), now).unwrap_err();
        assert!(
            e.to_string().contains("no answer about this certificate"),
            "{e}"
        );
        // Past its nextUpdate.
        let e = read_response(&good, &device, ca.certificate(), now + 601).unwrap_err();
        assert!(e.to_string().contains("nextUpdate"), "{e}");
        // Signed by a responder another CA authorized.
        let stranger = self::ca("Partner CA");
        let e = read_response(&good, &device, stranger.certificate(), now).unwrap_err();
        assert!(e.to_string().contains("not signed by"), "{e}");
        // One byte of the signed data changed.
        let mut tampered = good.clone();
        let at = tampered.len() / 3;
        tampered[at] ^= 0x01;
        assert!(read_response(&tampered, &device, ca.certificate(), now).is_err());
        // An error status says which.
        let e = read_response(
            &error_response(ErrorStatus::TryLater),
            &device,
            ca.certificate(),
            now,
        )
        .unwrap_err();
        assert!(e.to_string().contains("tryLater"), "{e}");
    }
}
