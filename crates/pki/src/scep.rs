//! SCEP messages (RFC 8894): reading a client's `pkiMessage` and writing the `CertRep` answer.
//!
//! A request is CMS SignedData, signed by the client (a self-signed certificate over its new
//! key, or — for a renewal — its current certificate), whose content is EnvelopedData encrypted
//! to the registration authority (RA): the CSR, or what a poll or a `GetCert` asks. The answer
//! is SignedData signed by the RA, carrying the status and, on success, the certificates as a
//! certs-only bundle encrypted to the client's key.
//!
//! The RA is an RSA key (key transport needs one, whatever the CA's key) with two certificates
//! issued by the CA, as Microsoft NDES has: one for encryption (keyEncipherment only) and one
//! for signing (digitalSignature only), so that clients that choose by key usage find each.
//!
//! Accepted from clients: AES-128/192/256-CBC content encryption (3DES and DES are refused with
//! `badAlg`), SHA-1/256/384/512 digests, RSA (PKCS#1 v1.5) and ECDSA signers. The answer uses
//! the request's own algorithms (SHA-256 for a SHA-1 request).
//! An RSA decryption failure is not told apart from a bad content (RFC 3218's countermeasure):
//! both answer `badMessageCheck`.

use aws_lc_rs::cipher::{
    AES_128, AES_192, AES_256, Algorithm, DecryptionContext, PaddedBlockDecryptingKey,
    PaddedBlockEncryptingKey, UnboundCipherKey,
};
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{
    Pkcs1PrivateDecryptingKey, Pkcs1PublicEncryptingKey, PrivateDecryptingKey, PublicEncryptingKey,
};
use aws_lc_rs::signature::{self, RsaKeyPair, UnparsedPublicKey};
use x509_parser::prelude::*;

use crate::cert::Certificate;
use crate::der::{self, Tlv, element, oid, oid_body, seq, set_of, small_int};
use crate::issue::{CaIssuer, IssueRequest, Profile, SubjectName};
use crate::key::{KeyType, PrivateKey};
use crate::{PkiError, Result};

const PKCS7_DATA: &[u64] = &[1, 2, 840, 113549, 1, 7, 1];
const PKCS7_SIGNED: &[u64] = &[1, 2, 840, 113549, 1, 7, 2];
const PKCS7_ENVELOPED: &[u64] = &[1, 2, 840, 113549, 1, 7, 3];
const ATTR_CONTENT_TYPE: &[u64] = &[1, 2, 840, 113549, 1, 9, 3];
const ATTR_MESSAGE_DIGEST: &[u64] = &[1, 2, 840, 113549, 1, 9, 4];
const ATTR_CHALLENGE: &[u64] = &[1, 2, 840, 113549, 1, 9, 7];
const RSA_ENCRYPTION: &[u64] = &[1, 2, 840, 113549, 1, 1, 1];
const EC_PUBLIC_KEY: &[u64] = &[1, 2, 840, 10045, 2, 1];
const SCEP_MESSAGE_TYPE: &[u64] = &[2, 16, 840, 1, 113733, 1, 9, 2];
const SCEP_PKI_STATUS: &[u64] = &[2, 16, 840, 1, 113733, 1, 9, 3];
const SCEP_FAIL_INFO: &[u64] = &[2, 16, 840, 1, 113733, 1, 9, 4];
const SCEP_SENDER_NONCE: &[u64] = &[2, 16, 840, 1, 113733, 1, 9, 5];
const SCEP_RECIPIENT_NONCE: &[u64] = &[2, 16, 840, 1, 113733, 1, 9, 6];
const SCEP_TRANSACTION_ID: &[u64] = &[2, 16, 840, 1, 113733, 1, 9, 7];

/// What GetCACaps answers (RFC 8894 §3.5.2): POST, renewal, AES, SHA-256/512 and the
/// standard's baseline. SHA-1 is still accepted from old clients, not offered.
pub const CAPABILITIES: &str = "POSTPKIOperation\nRenewal\nSHA-256\nSHA-512\nAES\nSCEPStandard\n";

/// The registration authority: its encryption and signing certificates, each with its own RSA
/// key (the key that decrypts never signs).
pub struct Ra {
    certificates: Vec<Certificate>,
    encryption_key: PrivateKey,
    signing_key: PrivateKey,
    decrypting: Pkcs1PrivateDecryptingKey,
    signing: RsaKeyPair,
}

impl std::fmt::Debug for Ra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ra")
            .field("certificates", &self.certificates.len())
            .finish_non_exhaustive()
    }
}

impl Ra {
    /// A new RA for `ca`: two RSA 2048 keys and their certificates, as long-lived as the CA.
    pub fn issue(ca: &CaIssuer) -> Result<Ra> {
        let cn = ca
            .certificate()
            .subject_attribute("CN")
            .unwrap_or_else(|| "Portcullis".into());
        let mut certificates = Vec::new();
        let mut keys = Vec::new();
        for (profile, role) in [
            (Profile::RaEncryption, "encryption"),
            (Profile::RaSigning, "signing"),
        ] {
            let key = PrivateKey::generate(KeyType::Rsa2048)?;
            let mut req = IssueRequest::new(
                profile,
                SubjectName {
                    common_name: format!("{cn} SCEP RA ({role})"),
                    organization: Some("Portcullis".into()),
                    ..Default::default()
                },
            );
            req.days = 3650;
            certificates.push(crate::issue::issue(&req, &key, Some(ca))?);
            keys.push(key);
        }
        let signing_key = keys.pop().ok_or(PkiError::KeyMismatch)?;
        let encryption_key = keys.pop().ok_or(PkiError::KeyMismatch)?;
        Ra::new(certificates, encryption_key, signing_key)
    }

    /// An RA from its certificates (encryption first, then signing) and their keys.
    pub fn new(
        certificates: Vec<Certificate>,
        encryption_key: PrivateKey,
        signing_key: PrivateKey,
    ) -> Result<Ra> {
        let [encryption, signing_cert] = certificates.as_slice() else {
            return Err(PkiError::KeyMismatch);
        };
        if !encryption_key.is_key_of(encryption) || !signing_key.is_key_of(signing_cert) {
            return Err(PkiError::KeyMismatch);
        }
        let not_rsa = || PkiError::UnsupportedKey("the SCEP RA keys must be RSA".into());
        let decrypting = PrivateDecryptingKey::from_pkcs8(encryption_key.pkcs8_der())
            .ok()
            .and_then(|k| Pkcs1PrivateDecryptingKey::new(k).ok())
            .ok_or_else(not_rsa)?;
        let signing = RsaKeyPair::from_pkcs8(signing_key.pkcs8_der()).map_err(|_| not_rsa())?;
        Ok(Ra {
            certificates,
            encryption_key,
            signing_key,
            decrypting,
            signing,
        })
    }

    /// The encryption and signing certificates.
    pub fn certificates(&self) -> &[Certificate] {
        &self.certificates
    }

    /// The encryption key, then the signing key.
    pub fn keys(&self) -> (&PrivateKey, &PrivateKey) {
        (&self.encryption_key, &self.signing_key)
    }

    /// Whether this RA still serves `ca`: issued by it and valid for more than 30 days.
    pub fn serves(&self, ca: &Certificate, now_unix: i64) -> bool {
        self.certificates
            .iter()
            .all(|c| c.is_signed_by(ca) && c.info().not_after_unix() > now_unix + 30 * 86400)
    }

    fn encryption(&self) -> &Certificate {
        &self.certificates[0]
    }

    fn signer(&self) -> &Certificate {
        &self.certificates[1]
    }
}

/// A request's kind (RFC 8894 §3.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// `PKCSReq` (19): a certificate for a CSR.
    PkcsReq,
    /// `RenewalReq` (17): a CSR signed with the certificate it renews.
    RenewalReq,
    /// `CertPoll` (20, formerly GetCertInitial): the answer to an earlier request.
    CertPoll,
    /// `GetCert` (21): a certificate by issuer and serial number.
    GetCert,
    /// `GetCRL` (22): the CRL covering a certificate.
    GetCrl,
}

impl MessageType {
    /// The name RFC 8894 gives it.
    pub fn name(self) -> &'static str {
        match self {
            MessageType::PkcsReq => "PKCSReq",
            MessageType::RenewalReq => "RenewalReq",
            MessageType::CertPoll => "CertPoll",
            MessageType::GetCert => "GetCert",
            MessageType::GetCrl => "GetCRL",
        }
    }
}

/// Why a request failed (RFC 8894 §3.2.1.4 failInfo).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailInfo {
    /// `badAlg` (0): an algorithm that is not supported.
    BadAlg,
    /// `badMessageCheck` (1): the signature or the encryption did not check.
    BadMessageCheck,
    /// `badRequest` (2): not permitted or not supported.
    BadRequest,
    /// `badTime` (3): the signing time is too far off.
    BadTime,
    /// `badCertId` (4): no certificate matches.
    BadCertId,
}

impl FailInfo {
    fn code(self) -> &'static str {
        match self {
            FailInfo::BadAlg => "0",
            FailInfo::BadMessageCheck => "1",
            FailInfo::BadRequest => "2",
            FailInfo::BadTime => "3",
            FailInfo::BadCertId => "4",
        }
    }

    /// The name RFC 8894 gives it.
    pub fn name(self) -> &'static str {
        match self {
            FailInfo::BadAlg => "badAlg",
            FailInfo::BadMessageCheck => "badMessageCheck",
            FailInfo::BadRequest => "badRequest",
            FailInfo::BadTime => "badTime",
            FailInfo::BadCertId => "badCertId",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Digest {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl Digest {
    fn arcs(self) -> &'static [u64] {
        match self {
            Digest::Sha1 => &[1, 3, 14, 3, 2, 26],
            Digest::Sha256 => &[2, 16, 840, 1, 101, 3, 4, 2, 1],
            Digest::Sha384 => &[2, 16, 840, 1, 101, 3, 4, 2, 2],
            Digest::Sha512 => &[2, 16, 840, 1, 101, 3, 4, 2, 3],
        }
    }

    fn from_oid(body: &[u8]) -> Option<Digest> {
        [Digest::Sha1, Digest::Sha256, Digest::Sha384, Digest::Sha512]
            .into_iter()
            .find(|d| oid_body(d.arcs()) == body)
    }

    fn digest(self, data: &[u8]) -> Vec<u8> {
        let alg = match self {
            Digest::Sha1 => &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
            Digest::Sha256 => &aws_lc_rs::digest::SHA256,
            Digest::Sha384 => &aws_lc_rs::digest::SHA384,
            Digest::Sha512 => &aws_lc_rs::digest::SHA512,
        };
        aws_lc_rs::digest::digest(alg, data).as_ref().to_vec()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cipher {
    Aes128,
    Aes192,
    Aes256,
}

impl Cipher {
    fn arcs(self) -> &'static [u64] {
        match self {
            Cipher::Aes128 => &[2, 16, 840, 1, 101, 3, 4, 1, 2],
            Cipher::Aes192 => &[2, 16, 840, 1, 101, 3, 4, 1, 22],
            Cipher::Aes256 => &[2, 16, 840, 1, 101, 3, 4, 1, 42],
        }
    }

    fn from_oid(body: &[u8]) -> Option<Cipher> {
        [Cipher::Aes128, Cipher::Aes192, Cipher::Aes256]
            .into_iter()
            .find(|c| oid_body(c.arcs()) == body)
    }

    fn algorithm(self) -> &'static Algorithm {
        match self {
            Cipher::Aes128 => &AES_128,
            Cipher::Aes192 => &AES_192,
            Cipher::Aes256 => &AES_256,
        }
    }

    fn key_len(self) -> usize {
        match self {
            Cipher::Aes128 => 16,
            Cipher::Aes192 => 24,
            Cipher::Aes256 => 32,
        }
    }

    fn decrypt(self, key: &[u8], iv: &[u8], ciphertext: &[u8]) -> Option<Vec<u8>> {
        let key = UnboundCipherKey::new(self.algorithm(), key).ok()?;
        let key = PaddedBlockDecryptingKey::cbc_pkcs7(key).ok()?;
        let context = DecryptionContext::Iv128(FixedLength::try_from(iv).ok()?);
        let mut buf = ciphertext.to_vec();
        let plain = key.decrypt(&mut buf, context).ok()?;
        Some(plain.to_vec())
    }

    /// Encrypts `plain` under a fresh key: (key, IV, ciphertext).
    fn encrypt(self, plain: &[u8]) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        let failed = || PkiError::Signing("encrypting the SCEP answer failed".into());
        let mut key = vec![0u8; self.key_len()];
        SystemRandom::new().fill(&mut key).map_err(|_| failed())?;
        let unbound = UnboundCipherKey::new(self.algorithm(), &key).map_err(|_| failed())?;
        let enc = PaddedBlockEncryptingKey::cbc_pkcs7(unbound).map_err(|_| failed())?;
        let mut buf = plain.to_vec();
        let context = enc.encrypt(&mut buf).map_err(|_| failed())?;
        let iv: &[u8] = (&context).try_into().map_err(|_| failed())?;
        Ok((key, iv.to_vec(), buf))
    }
}

/// A client's request, read and checked.
#[derive(Debug)]
pub struct Request {
    /// Its kind.
    pub message_type: MessageType,
    /// The transaction it belongs to (the client's choice, echoed in the answer).
    pub transaction_id: String,
    /// The client's nonce (echoed in the answer as the recipient nonce).
    pub sender_nonce: Vec<u8>,
    /// The certificate that signed it: self-signed over the new key, or the one being renewed.
    pub signer: Certificate,
    /// The decrypted content (the CSR's DER for PKCSReq and RenewalReq, IssuerAndSubject for
    /// CertPoll, IssuerAndSerialNumber for GetCert and GetCRL), or why it could not be read:
    /// a request whose signature or encryption does not check is answered with a failure.
    pub content: std::result::Result<Vec<u8>, FailInfo>,
    digest: Digest,
    cipher: Cipher,
}

impl Request {
    /// Whether an issued certificate can be sent back: the answer is encrypted to the signer's
    /// key, which must be RSA.
    pub fn can_receive(&self) -> bool {
        PublicEncryptingKey::from_der(&self.signer.spki_der()).is_ok()
    }
}

/// What is answered.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The certificates (the issued one first).
    Issued(Vec<Certificate>),
    /// A failure and why.
    Failure(FailInfo),
    /// Waiting for approval: the client polls.
    Pending,
}

fn bad(what: impl Into<String>) -> PkiError {
    PkiError::malformed("", format!("not a SCEP request: {}", what.into()))
}

fn is_oid(tlv: &Tlv<'_>, arcs: &[u64]) -> bool {
    tlv.tag == 0x06 && tlv.body == oid_body(arcs).as_slice()
}

/// Reads a `pkiMessage` (DER or BER). An error means no answer can be made (the message is not
/// SignedData with a signer and the SCEP attributes); a message whose signature or encryption
/// does not check comes back with `content` saying so.
pub fn read_request(message: &[u8], ra: &Ra) -> Result<Request> {
    let (info, _) = der::read(message)?;
    let info = info.expect(0x30, "the ContentInfo")?.children()?;
    let [content_type, content, ..] = info.as_slice() else {
        return Err(bad("the ContentInfo is incomplete"));
    };
    if !is_oid(content_type, PKCS7_SIGNED) {
        return Err(bad("the content is not SignedData"));
    }
    let signed = content.expect(0xa0, "the content")?.children()?;
    let signed = signed
        .first()
        .ok_or_else(|| bad("empty SignedData"))?
        .expect(0x30, "SignedData")?
        .children()?;
    // version, digestAlgorithms, encapContentInfo, [0] certificates, [1] crls, signerInfos
    let encap = signed
        .get(2)
        .ok_or_else(|| bad("no encapsulated content"))?
        .children()?;
    let e_content = match encap.get(1) {
        Some(wrapper) => {
            let inner = wrapper
                .expect(0xa0, "the encapsulated content")?
                .children()?;
            inner
                .first()
                .ok_or_else(|| bad("empty encapsulated content"))?
                .octets()?
        }
        None => Vec::new(),
    };
    let mut certificates = Vec::new();
    for part in &signed[3..] {
        if part.tag == 0xa0 {
            for c in part.children()? {
                certificates.push(Certificate::from_der(c.raw.to_vec())?);
            }
        }
    }
    let signer_infos = signed
        .last()
        .ok_or_else(|| bad("no signers"))?
        .expect(0x31, "the signer infos")?
        .children()?;
    let signer_info = signer_infos
        .first()
        .ok_or_else(|| bad("no signer"))?
        .children()?;
    // version, sid, digestAlgorithm, [0] signedAttrs, signatureAlgorithm, signature
    let [_, sid, digest_alg, attrs, _sig_alg, signature, ..] = signer_info.as_slice() else {
        return Err(bad("the signer has no signed attributes"));
    };
    let attrs = attrs.expect(0xa0, "the signed attributes")?;
    let digest_oid = digest_alg.children()?;
    let digest = digest_oid
        .first()
        .and_then(|o| Digest::from_oid(o.body))
        .ok_or_else(|| bad("an unsupported digest algorithm"))?;
    let signer = find_signer(sid, &certificates)?;

    let mut message_type = None;
    let mut transaction_id = None;
    let mut sender_nonce = None;
    let mut message_digest = None;
    for attr in attrs.children()? {
        let parts = attr.children()?;
        let [attr_type, values, ..] = parts.as_slice() else {
            continue;
        };
        let Some(value) = values.children()?.into_iter().next() else {
            continue;
        };
        if is_oid(attr_type, SCEP_MESSAGE_TYPE) {
            message_type = Some(String::from_utf8_lossy(value.body).into_owned());
        } else if is_oid(attr_type, SCEP_TRANSACTION_ID) {
            transaction_id = Some(String::from_utf8_lossy(value.body).into_owned());
        } else if is_oid(attr_type, SCEP_SENDER_NONCE) {
            sender_nonce = Some(value.octets()?);
        } else if is_oid(attr_type, ATTR_MESSAGE_DIGEST) {
            message_digest = Some(value.octets()?);
        }
    }
    let message_type = match message_type.as_deref() {
        Some("19") => MessageType::PkcsReq,
        Some("17") => MessageType::RenewalReq,
        Some("20") => MessageType::CertPoll,
        Some("21") => MessageType::GetCert,
        Some("22") => MessageType::GetCrl,
        Some(other) => return Err(bad(format!("message type '{other}' is not a request"))),
        None => return Err(bad("no messageType attribute")),
    };
    let transaction_id = transaction_id.ok_or_else(|| bad("no transactionID attribute"))?;
    if transaction_id.is_empty() || transaction_id.len() > 256 {
        return Err(bad("the transactionID is empty or too long"));
    }
    let sender_nonce = sender_nonce.ok_or_else(|| bad("no senderNonce attribute"))?;

    // The signature over the signed attributes (re-tagged as the SET they are), and the
    // content's digest among them.
    let mut signed_bytes = attrs.raw.to_vec();
    signed_bytes[0] = 0x31;
    let verified = message_digest.as_deref() == Some(digest.digest(&e_content).as_slice())
        && verify(&signer, digest, &signed_bytes, signature.body);
    let mut cipher = Cipher::Aes256;
    // Whatever fails past the signature — the key, the padding, the content's structure — is
    // one answer, badMessageCheck: no oracle on the RA key or on someone else's envelope.
    let content = if verified {
        decrypt_envelope(&e_content, &ra.decrypting, ra.encryption(), &mut cipher)
            .and_then(|c| well_formed(message_type, c))
    } else {
        Err(FailInfo::BadMessageCheck)
    };
    Ok(Request {
        message_type,
        transaction_id,
        sender_nonce,
        signer,
        content,
        digest,
        cipher,
    })
}

/// The certificate `sid` names among `certificates` (issuer and serial number, or the only one).
fn find_signer(sid: &Tlv<'_>, certificates: &[Certificate]) -> Result<Certificate> {
    if sid.tag == 0x30 {
        let parts = sid.children()?;
        if let [issuer, serial, ..] = parts.as_slice() {
            for c in certificates {
                let matches = c
                    .with_parsed(|p| {
                        p.tbs_certificate.issuer.as_raw() == issuer.raw
                            && p.tbs_certificate.raw_serial() == serial.body
                    })
                    .unwrap_or(false);
                if matches {
                    return Ok(c.clone());
                }
            }
        }
    }
    match certificates {
        [only] => Ok(only.clone()),
        _ => Err(bad("the signer's certificate is not in the message")),
    }
}

/// Whether `signature` over `data` verifies with `signer`'s key.
fn verify(signer: &Certificate, digest: Digest, data: &[u8], signature: &[u8]) -> bool {
    let Ok((alg, bits)) = signer.with_parsed(|c| {
        let spki = c.public_key();
        (
            spki.algorithm.algorithm.as_bytes().to_vec(),
            spki.subject_public_key.data.to_vec(),
        )
    }) else {
        return false;
    };
    let candidates: Vec<&'static dyn signature::VerificationAlgorithm> =
        if alg == oid_body(RSA_ENCRYPTION) {
            vec![match digest {
                Digest::Sha1 => &signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
                Digest::Sha256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                Digest::Sha384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                Digest::Sha512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            }]
        } else if alg == oid_body(EC_PUBLIC_KEY) {
            match digest {
                Digest::Sha256 => vec![
                    &signature::ECDSA_P256_SHA256_ASN1,
                    &signature::ECDSA_P384_SHA256_ASN1,
                ],
                Digest::Sha384 => vec![
                    &signature::ECDSA_P256_SHA384_ASN1,
                    &signature::ECDSA_P384_SHA384_ASN1,
                ],
                _ => Vec::new(),
            }
        } else {
            Vec::new()
        };
    candidates.into_iter().any(|alg| {
        UnparsedPublicKey::new(alg, &bits)
            .verify(data, signature)
            .is_ok()
    })
}

/// Decrypts the `pkcsPKIEnvelope`; records the cipher used so the answer uses it too.
fn decrypt_envelope(
    e_content: &[u8],
    decrypting: &Pkcs1PrivateDecryptingKey,
    recipient_cert: &Certificate,
    cipher_used: &mut Cipher,
) -> std::result::Result<Vec<u8>, FailInfo> {
    let check = |_| FailInfo::BadMessageCheck;
    let (info, _) = der::read(e_content).map_err(check)?;
    let info = info.children().map_err(check)?;
    let [content_type, content, ..] = info.as_slice() else {
        return Err(FailInfo::BadMessageCheck);
    };
    if !is_oid(content_type, PKCS7_ENVELOPED) {
        return Err(FailInfo::BadMessageCheck);
    }
    let enveloped = content.children().map_err(check)?;
    let enveloped = enveloped
        .first()
        .ok_or(FailInfo::BadMessageCheck)?
        .children()
        .map_err(check)?;
    // version, [0] originatorInfo?, recipientInfos, encryptedContentInfo, ...
    let rest: Vec<&Tlv<'_>> = enveloped.iter().skip(1).filter(|t| t.tag != 0xa0).collect();
    let [recipients, encrypted, ..] = rest.as_slice() else {
        return Err(FailInfo::BadMessageCheck);
    };
    let encrypted = encrypted.children().map_err(check)?;
    let [_, alg, ciphertext, ..] = encrypted.as_slice() else {
        return Err(FailInfo::BadMessageCheck);
    };
    let alg = alg.children().map_err(check)?;
    let cipher = alg
        .first()
        .and_then(|o| Cipher::from_oid(o.body))
        .ok_or(FailInfo::BadAlg)?;
    *cipher_used = cipher;
    let iv = alg
        .get(1)
        .ok_or(FailInfo::BadMessageCheck)?
        .octets()
        .map_err(check)?;
    let ciphertext = ciphertext.octets().map_err(check)?;
    // The content key: the one key-transport recipient addressed to `recipient_cert` (by
    // issuer and serial number, or subject key identifier), decrypted with its key; a random
    // key when it does not decrypt (implicit rejection: a failed decryption looks like a bad
    // content). Other recipients are never tried.
    let addressed = recipient_ids(recipient_cert);
    let mut encrypted_key = None;
    for recipient in recipients.children().map_err(check)? {
        let parts = recipient.children().map_err(check)?;
        // KeyTransRecipientInfo: version, rid, keyEncryptionAlgorithm, encryptedKey
        let [_, rid, key_alg, key, ..] = parts.as_slice() else {
            continue;
        };
        if !addressed.iter().any(|a| a.as_slice() == rid.raw) {
            continue;
        }
        let key_alg = key_alg.children().map_err(check)?;
        if !key_alg.first().is_some_and(|o| is_oid(o, RSA_ENCRYPTION)) {
            return Err(FailInfo::BadAlg);
        }
        encrypted_key = Some(key.body);
        break;
    }
    let encrypted_key = encrypted_key.ok_or(FailInfo::BadMessageCheck)?;
    let mut out = vec![0u8; decrypting.min_output_size()];
    let key = match decrypting.decrypt(encrypted_key, &mut out) {
        Ok(plain) if plain.len() == cipher.key_len() => plain.to_vec(),
        _ => {
            let mut k = vec![0u8; cipher.key_len()];
            SystemRandom::new()
                .fill(&mut k)
                .map_err(|_| FailInfo::BadMessageCheck)?;
            k
        }
    };
    cipher
        .decrypt(&key, &iv, &ciphertext)
        .ok_or(FailInfo::BadMessageCheck)
}

/// The ways a recipient info can name `cert`: IssuerAndSerialNumber, or `[0]` its subject key
/// identifier.
fn recipient_ids(cert: &Certificate) -> Vec<Vec<u8>> {
    let mut ids = Vec::new();
    if let Ok(ias) = issuer_and_serial(cert) {
        ids.push(ias);
    }
    if let Some(ski) = &cert.info().subject_key_id
        && let Some(bytes) = hex_bytes(ski)
    {
        ids.push(element(0x80, &bytes));
    }
    ids
}

fn hex_bytes(hex: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = hex.bytes().filter(u8::is_ascii_hexdigit).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

/// The decrypted content, when it is what `message_type` carries: a CSR whose self-signature
/// verifies, IssuerAndSubject, or IssuerAndSerialNumber — nothing after it.
fn well_formed(
    message_type: MessageType,
    content: Vec<u8>,
) -> std::result::Result<Vec<u8>, FailInfo> {
    let ok = match message_type {
        MessageType::PkcsReq | MessageType::RenewalReq => {
            X509CertificationRequest::from_der(&content)
                .is_ok_and(|(rest, csr)| rest.is_empty() && csr.verify_signature().is_ok())
        }
        MessageType::CertPoll => der::read(&content).is_ok_and(|(tlv, rest)| {
            rest.is_empty()
                && tlv.tag == 0x30
                && tlv
                    .children()
                    .is_ok_and(|c| c.len() == 2 && c.iter().all(|n| n.tag == 0x30))
        }),
        MessageType::GetCert | MessageType::GetCrl => {
            der::read(&content).is_ok_and(|(_, rest)| rest.is_empty())
                && read_issuer_and_serial(&content).is_ok()
        }
    };
    if ok {
        Ok(content)
    } else {
        Err(FailInfo::BadMessageCheck)
    }
}

/// The `CertRep` answering `request`, signed by the RA.
pub fn reply(request: &Request, outcome: &Outcome, ra: &Ra) -> Result<Vec<u8>> {
    let (status, fail, content) = match outcome {
        Outcome::Issued(certs) => match envelope(request, certs) {
            Some(env) => ("0", None, env?),
            None => ("2", Some(FailInfo::BadAlg), Vec::new()),
        },
        Outcome::Failure(why) => ("2", Some(*why), Vec::new()),
        Outcome::Pending => ("3", None, Vec::new()),
    };
    let mut nonce = vec![0u8; 16];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| PkiError::Signing("no randomness for the SCEP nonce".into()))?;
    // SHA-1 is read, never written: its requests are answered with SHA-256.
    let digest = match request.digest {
        Digest::Sha1 => Digest::Sha256,
        other => other,
    };
    let attr = |arcs: &[u64], value: Vec<u8>| seq(&[&oid(arcs), &element(0x31, &value)]);
    let printable = |s: &str| element(0x13, s.as_bytes());
    let mut attrs = vec![
        attr(ATTR_CONTENT_TYPE, oid(PKCS7_DATA)),
        attr(ATTR_MESSAGE_DIGEST, element(0x04, &digest.digest(&content))),
        attr(SCEP_MESSAGE_TYPE, printable("3")),
        attr(SCEP_PKI_STATUS, printable(status)),
        attr(SCEP_TRANSACTION_ID, printable(&request.transaction_id)),
        attr(SCEP_SENDER_NONCE, element(0x04, &nonce)),
        attr(SCEP_RECIPIENT_NONCE, element(0x04, &request.sender_nonce)),
    ];
    if let Some(fail) = fail {
        attrs.push(attr(SCEP_FAIL_INFO, printable(fail.code())));
    }
    let attrs_set = set_of(attrs);
    let rsa_alg = match digest {
        Digest::Sha1 | Digest::Sha256 => &signature::RSA_PKCS1_SHA256,
        Digest::Sha384 => &signature::RSA_PKCS1_SHA384,
        Digest::Sha512 => &signature::RSA_PKCS1_SHA512,
    };
    let mut sig = vec![0u8; ra.signing.public_modulus_len()];
    ra.signing
        .sign(rsa_alg, &SystemRandom::new(), &attrs_set, &mut sig)
        .map_err(|_| PkiError::Signing("signing the SCEP answer failed".into()))?;
    let digest_alg = seq(&[&oid(digest.arcs())]);
    let mut signed_attrs = attrs_set;
    signed_attrs[0] = 0xa0;
    let signer_info = seq(&[
        &small_int(1),
        &issuer_and_serial(ra.signer())?,
        &digest_alg,
        &signed_attrs,
        &seq(&[&oid(RSA_ENCRYPTION), &[0x05, 0x00]]),
        &element(0x04, &sig),
    ]);
    let signed_data = seq(&[
        &small_int(1),
        &element(0x31, &digest_alg),
        &seq(&[&oid(PKCS7_DATA), &element(0xa0, &element(0x04, &content))]),
        &element(0xa0, ra.signer().der()),
        &element(0x31, &signer_info),
    ]);
    Ok(seq(&[&oid(PKCS7_SIGNED), &element(0xa0, &signed_data)]))
}

/// The certs-only bundle of `certs` encrypted to the request's signer (EnvelopedData), or
/// `None` when its key cannot receive (not RSA).
fn envelope(request: &Request, certs: &[Certificate]) -> Option<Result<Vec<u8>>> {
    let public = PublicEncryptingKey::from_der(&request.signer.spki_der()).ok()?;
    let public = Pkcs1PublicEncryptingKey::new(public).ok()?;
    Some((|| {
        let plain = crate::pkcs7::certs_only(certs);
        let (key, iv, ciphertext) = request.cipher.encrypt(&plain)?;
        let mut encrypted_key = vec![0u8; public.ciphertext_size()];
        let encrypted_key = public
            .encrypt(&key, &mut encrypted_key)
            .map_err(|_| PkiError::Signing("encrypting the SCEP content key failed".into()))?
            .to_vec();
        let recipient = seq(&[
            &small_int(0),
            &issuer_and_serial(&request.signer)?,
            &seq(&[&oid(RSA_ENCRYPTION), &[0x05, 0x00]]),
            &element(0x04, &encrypted_key),
        ]);
        let enveloped = seq(&[
            &small_int(0),
            &element(0x31, &recipient),
            &seq(&[
                &oid(PKCS7_DATA),
                &seq(&[&oid(request.cipher.arcs()), &element(0x04, &iv)]),
                &element(0x80, &ciphertext),
            ]),
        ]);
        Ok(seq(&[&oid(PKCS7_ENVELOPED), &element(0xa0, &enveloped)]))
    })())
}

/// IssuerAndSerialNumber of `cert`.
fn issuer_and_serial(cert: &Certificate) -> Result<Vec<u8>> {
    cert.with_parsed(|c| {
        seq(&[
            c.tbs_certificate.issuer.as_raw(),
            &element(0x02, c.tbs_certificate.raw_serial()),
        ])
    })
}

/// The issuer (raw Name) and serial number (INTEGER contents) of an IssuerAndSerialNumber, as
/// GetCert and GetCRL send it.
pub fn read_issuer_and_serial(content: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let (tlv, _) = der::read(content)?;
    let parts = tlv.expect(0x30, "IssuerAndSerialNumber")?.children()?;
    match parts.as_slice() {
        [issuer, serial, ..] if serial.tag == 0x02 => {
            Ok((issuer.raw.to_vec(), serial.body.to_vec()))
        }
        _ => Err(bad("not an IssuerAndSerialNumber")),
    }
}

/// Whether the CSR (DER) asks for `cert`'s public key.
pub fn csr_key_is(csr_der: &[u8], cert: &Certificate) -> bool {
    X509CertificationRequest::from_der(csr_der).is_ok_and(|(_, csr)| {
        csr.certification_request_info.subject_pki.raw == cert.spki_der().as_slice()
    })
}

/// The challenge password of a CSR (DER), which SCEP uses as the one-time enrollment code.
pub fn challenge_password(csr_der: &[u8]) -> Option<String> {
    let (_, csr) = X509CertificationRequest::from_der(csr_der).ok()?;
    let wanted = x509_parser::der_parser::oid::Oid::from(ATTR_CHALLENGE).ok()?;
    csr.certification_request_info
        .iter_attributes()
        .find(|a| a.oid == wanted)
        .and_then(|a| match a.parsed_attribute() {
            x509_parser::cri_attributes::ParsedCriAttribute::ChallengePassword(p) => {
                Some(p.0.clone())
            }
            _ => None,
        })
}

#[cfg(test)]
pub(crate) mod client {
    //! A SCEP client, as far as the tests need one: builds requests the way RFC 8894 clients
    //! do, and opens answers.

    use super::*;

    /// A PKCSReq (or any `message_type`) for `content`, signed by `signer`/`key` and
    /// encrypted to the RA's encryption certificate with `cipher`.
    pub(crate) fn request(
        message_type: &str,
        content: &[u8],
        signer: &Certificate,
        key: &PrivateKey,
        ra_encryption: &Certificate,
        transaction_id: &str,
    ) -> Vec<u8> {
        let cipher = Cipher::Aes256;
        let (cek, iv, ciphertext) = cipher.encrypt(content).unwrap();
        let public = Pkcs1PublicEncryptingKey::new(
            PublicEncryptingKey::from_der(&ra_encryption.spki_der()).unwrap(),
        )
        .unwrap();
        let mut ek = vec![0u8; public.ciphertext_size()];
        let ek = public.encrypt(&cek, &mut ek).unwrap().to_vec();
        let recipient = seq(&[
            &small_int(0),
            &issuer_and_serial(ra_encryption).unwrap(),
            &seq(&[&oid(RSA_ENCRYPTION), &[0x05, 0x00]]),
            &element(0x04, &ek),
        ]);
        let enveloped = seq(&[
            &small_int(0),
            &element(0x31, &recipient),
            &seq(&[
                &oid(PKCS7_DATA),
                &seq(&[&oid(cipher.arcs()), &element(0x04, &iv)]),
                &element(0x80, &ciphertext),
            ]),
        ]);
        let e_content = seq(&[&oid(PKCS7_ENVELOPED), &element(0xa0, &enveloped)]);
        let attr = |arcs: &[u64], value: Vec<u8>| seq(&[&oid(arcs), &element(0x31, &value)]);
        let attrs = set_of(vec![
            attr(ATTR_CONTENT_TYPE, oid(PKCS7_DATA)),
            attr(
                ATTR_MESSAGE_DIGEST,
                element(0x04, &Digest::Sha256.digest(&e_content)),
            ),
            attr(SCEP_MESSAGE_TYPE, element(0x13, message_type.as_bytes())),
            attr(
                SCEP_TRANSACTION_ID,
                element(0x13, transaction_id.as_bytes()),
            ),
            attr(SCEP_SENDER_NONCE, element(0x04, b"0123456789abcdef")),
        ]);
        let pair = RsaKeyPair::from_pkcs8(key.pkcs8_der()).unwrap();
        let mut sig = vec![0u8; pair.public_modulus_len()];
        pair.sign(
            &signature::RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            &attrs,
            &mut sig,
        )
        .unwrap();
        let mut signed_attrs = attrs;
        signed_attrs[0] = 0xa0;
        let digest_alg = seq(&[&oid(Digest::Sha256.arcs())]);
        let signer_info = seq(&[
            &small_int(1),
            &issuer_and_serial(signer).unwrap(),
            &digest_alg,
            &signed_attrs,
            &seq(&[&oid(RSA_ENCRYPTION), &[0x05, 0x00]]),
            &element(0x04, &sig),
        ]);
        let signed = seq(&[
            &small_int(1),
            &element(0x31, &digest_alg),
            &seq(&[&oid(PKCS7_DATA), &element(0xa0, &element(0x04, &e_content))]),
            &element(0xa0, signer.der()),
            &element(0x31, &signer_info),
        ]);
        seq(&[&oid(PKCS7_SIGNED), &element(0xa0, &signed)])
    }

    /// An answer's pkiStatus, failInfo and (on success) the decrypted certificates.
    pub(crate) fn open(
        answer: &[u8],
        key: &PrivateKey,
        me: &Certificate,
    ) -> (String, Option<String>, Vec<Certificate>) {
        let (info, _) = der::read(answer).unwrap();
        let info = info.children().unwrap();
        let signed = info[1].children().unwrap()[0].children().unwrap();
        let encap = signed[2].children().unwrap();
        let e_content = encap[1].children().unwrap()[0].octets().unwrap();
        let signer_info = signed.last().unwrap().children().unwrap()[0]
            .children()
            .unwrap();
        let mut status = String::new();
        let mut fail = None;
        for attr in signer_info[3].children().unwrap() {
            let parts = attr.children().unwrap();
            let value = parts[1].children().unwrap()[0];
            if is_oid(&parts[0], SCEP_PKI_STATUS) {
                status = String::from_utf8_lossy(value.body).into_owned();
            } else if is_oid(&parts[0], SCEP_FAIL_INFO) {
                fail = Some(String::from_utf8_lossy(value.body).into_owned());
            }
        }
        if status != "0" {
            return (status, fail, Vec::new());
        }
        let decrypting = Pkcs1PrivateDecryptingKey::new(
            PrivateDecryptingKey::from_pkcs8(key.pkcs8_der()).unwrap(),
        )
        .unwrap();
        let mut cipher = Cipher::Aes256;
        let bundle = decrypt_envelope(&e_content, &decrypting, me, &mut cipher).unwrap();
        let certs = Certificate::all_from_pem_or_der(&bundle).unwrap();
        (status, fail, certs)
    }
}

#[cfg(test)]
mod tests {
    use super::client::{open, request};
    use super::*;
    use crate::issue::{issue, sign_csr};

    fn ca() -> CaIssuer {
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let mut req = IssueRequest::new(Profile::RootCa, SubjectName::cn("SCEP Test CA"));
        req.path_len = Some(0);
        let cert = issue(&req, &key, None).unwrap();
        CaIssuer::new(cert, key, Vec::new()).unwrap()
    }

    /// A device's key, its self-signed signer certificate and a CSR with `challenge`.
    fn device(challenge: &str) -> (PrivateKey, Certificate, Vec<u8>) {
        let key = PrivateKey::generate(KeyType::Rsa2048).unwrap();
        let mut self_signed = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        self_signed
            .distinguished_name
            .push(rcgen::DnType::CommonName, "scep-device");
        let signer = self_signed.self_signed(key.key_pair()).unwrap();
        let signer = Certificate::from_der(signer.der().to_vec()).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "scep-device");
        let challenge = rcgen::Attribute {
            oid: ATTR_CHALLENGE,
            values: element(0x31, &element(0x13, challenge.as_bytes())),
        };
        let csr = params
            .serialize_request_with_attributes(key.key_pair(), vec![challenge])
            .unwrap();
        (key, signer, csr.der().to_vec())
    }

    #[test]
    fn a_pkcsreq_is_read_and_its_certificate_comes_back_encrypted_to_the_device() {
        let ca = ca();
        let ra = Ra::issue(&ca).unwrap();
        assert!(ra.serves(ca.certificate(), 0));
        let (key, signer, csr) = device("one-time-code");
        let message = request("19", &csr, &signer, &key, &ra.certificates()[0], "tx-1");
        let req = read_request(&message, &ra).unwrap();
        assert_eq!(req.message_type, MessageType::PkcsReq);
        assert_eq!(req.transaction_id, "tx-1");
        assert_eq!(req.sender_nonce, b"0123456789abcdef");
        let content = req.content.clone().unwrap();
        assert_eq!(content, csr);
        assert_eq!(
            challenge_password(&content).as_deref(),
            Some("one-time-code")
        );
        assert!(req.can_receive());

        let cert = sign_csr(
            &content,
            &IssueRequest::new(Profile::Client, SubjectName::cn("x")),
            &ca,
        )
        .unwrap();
        let answer = reply(&req, &Outcome::Issued(vec![cert.clone()]), &ra).unwrap();
        let (status, fail, certs) = open(&answer, &key, &signer);
        assert_eq!((status.as_str(), fail), ("0", None));
        assert_eq!(certs[0].der(), cert.der());
    }

    #[test]
    fn a_tampered_or_misaddressed_request_is_answered_bad_message_check() {
        let ca = ca();
        let ra = Ra::issue(&ca).unwrap();
        let (key, signer, csr) = device("code");
        let mut message = request("19", &csr, &signer, &key, &ra.certificates()[0], "tx-2");
        // Flip a byte of the signature (the message's last bytes).
        let last = message.len() - 1;
        message[last] ^= 1;
        let req = read_request(&message, &ra).unwrap();
        assert_eq!(req.content, Err(FailInfo::BadMessageCheck));
        let answer = reply(&req, &Outcome::Failure(FailInfo::BadMessageCheck), &ra).unwrap();
        let (status, fail, _) = open(&answer, &key, &signer);
        assert_eq!((status.as_str(), fail.as_deref()), ("2", Some("1")));

        // Encrypted to another RA: the content does not decrypt.
        let other = Ra::issue(&ca).unwrap();
        let message = request("19", &csr, &signer, &key, &other.certificates()[0], "tx-3");
        let req = read_request(&message, &ra).unwrap();
        assert_eq!(req.content, Err(FailInfo::BadMessageCheck));

        for junk in [
            &b""[..],
            b"\x30\x03\x02\x01\x01",
            &message[..message.len() / 2],
        ] {
            assert!(read_request(junk, &ra).is_err());
        }
    }

    /// Regression (scep_padding_and_rsa_oracles): every failure past the signature answers the
    /// same badMessageCheck — content of the wrong kind, an envelope addressed to the RA's other
    /// certificate (never tried), a key that does not decrypt — so a stranger re-signing
    /// someone else's envelope learns nothing about its plaintext or the RA key.
    #[test]
    fn failures_past_the_signature_are_one_answer() {
        let ca = ca();
        let ra = Ra::issue(&ca).unwrap();
        let (key, signer, csr) = device("code");
        let encryption = &ra.certificates()[0];
        let answer = |message: Vec<u8>| read_request(&message, &ra).unwrap().content;
        // A CSR where a poll's IssuerAndSubject belongs, and a poll's content in a PKCSReq.
        assert_eq!(
            answer(request("20", &csr, &signer, &key, encryption, "t1")),
            Err(FailInfo::BadMessageCheck)
        );
        let ias = seq(&[&seq(&[]), &seq(&[])]);
        assert_eq!(
            answer(request("19", &ias, &signer, &key, encryption, "t2")),
            Err(FailInfo::BadMessageCheck)
        );
        assert!(answer(request("20", &ias, &signer, &key, encryption, "t3")).is_ok());
        // Addressed to the signing certificate: not tried.
        assert_eq!(
            answer(request(
                "19",
                &csr,
                &signer,
                &key,
                &ra.certificates()[1],
                "t4"
            )),
            Err(FailInfo::BadMessageCheck)
        );
        // The RA's two keys are two keys.
        let (enc, sig) = ra.keys();
        assert_ne!(enc.public_key_bits(), sig.public_key_bits());
    }
}
