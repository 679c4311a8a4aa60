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
