//! Parsed views of certificates, CSRs and CRLs: what `pki inspect` prints and logs show.
//!
//! The views are plain data with stable serde field names (the `--json` form is a contract).

use std::fmt;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{DistributionPointName, GeneralName, ParsedExtension};
use x509_parser::oid_registry::Oid;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::revocation_list::CertificateRevocationList;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::name::rfc4514;
use crate::pem::{self, Label};
use crate::{PkiError, Result};

/// A certificate: its DER and the fields people and policies ask about. Shared: a clone (a
/// connection's verdict, its session, its log line) is a reference count, not another copy of
/// the DER and every decoded field.
#[derive(Debug, Clone)]
pub struct Certificate(Arc<Parsed>);

#[derive(Debug)]
struct Parsed {
    der: CertificateDer<'static>,
    info: CertificateInfo,
    /// The RFC 5280 profile checks this certificate passed, a bit per role, usage and profile
    /// (`profile_check`): a truststore's CAs are checked once, not in every handshake.
    profile_passed: std::sync::atomic::AtomicU16,
}

impl Certificate {
    /// Parses one DER certificate.
    pub fn from_der(der: impl Into<Vec<u8>>) -> Result<Self> {
        let der: Vec<u8> = der.into();
        let info = CertificateInfo::from_der(&der)?;
        Ok(Certificate(Arc::new(Parsed {
            der: CertificateDer::from(der),
            info,
            profile_passed: std::sync::atomic::AtomicU16::new(0),
        })))
    }

    /// Whether the profile check numbered `bit` has passed before.
    pub(crate) fn profile_passed(&self, bit: u32) -> bool {
        self.0
            .profile_passed
            .load(std::sync::atomic::Ordering::Relaxed)
            & (1 << bit)
            != 0
    }

    /// Records that the profile check numbered `bit` passed.
    pub(crate) fn set_profile_passed(&self, bit: u32) {
        self.0
            .profile_passed
            .fetch_or(1 << bit, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every certificate in a PEM bundle (or one DER certificate), in file order. Errors name the
    /// certificate's position and line.
    pub fn all_from_pem_or_der(input: &[u8]) -> Result<Vec<Self>> {
        pem::blocks_of(input, &Label::Certificate)?
            .into_iter()
            .enumerate()
            .map(|(i, block)| {
                Certificate::from_der(block.der).map_err(|e| match e {
                    PkiError::Malformed { detail, .. } => PkiError::malformed(
                        if block.line > 0 {
                            format!("certificate #{} (line {}): ", i + 1, block.line)
                        } else {
                            String::new()
                        },
                        detail,
                    ),
                    other => other,
                })
            })
            .collect()
    }

    /// The first certificate of a PEM or DER input; the rest (if any) follow in the second value.
    pub fn first_and_rest(input: &[u8]) -> Result<(Self, Vec<Self>)> {
        let mut all = Certificate::all_from_pem_or_der(input)?;
        if all.is_empty() {
            return Err(PkiError::NotFound {
                expected: "certificate",
                label: "CERTIFICATE",
            });
        }
        let first = all.remove(0);
        Ok((first, all))
    }

    /// The DER encoding.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.0.der
    }

    /// The decoded fields.
    pub fn info(&self) -> &CertificateInfo {
        &self.0.info
    }

    /// The certificate as a PEM block.
    pub fn to_pem(&self) -> String {
        pem::encode("CERTIFICATE", &self.0.der)
    }

    /// True when `issuer`'s subject is this certificate's issuer and `issuer`'s key made this
    /// certificate's signature (proof of possession, or a link of a chain).
    pub fn is_signed_by(&self, issuer: &Certificate) -> bool {
        let Ok((_, me)) = X509Certificate::from_der(&self.0.der) else {
            return false;
        };
        let Ok((_, them)) = X509Certificate::from_der(issuer.der()) else {
            return false;
        };
        me.issuer().as_raw() == them.subject().as_raw()
            && me.verify_signature(Some(them.public_key())).is_ok()
    }

    /// The DER of the subject public key info: what a TLS handshake signature is checked with
    /// when the certificate itself cannot be parsed for verification (X.509 v1).
    pub fn spki_der(&self) -> Vec<u8> {
        self.with_parsed(|c| c.tbs_certificate.subject_pki.raw.to_vec())
            .unwrap_or_default()
    }

    /// The first value of a subject attribute, by its RFC 4514 short name (`CN`, `O`, `OU`, `C`,
    /// `ST`, `L`, `serialNumber`, `emailAddress`…), as provisioning templates and policies use it.
    pub fn subject_attribute(&self, short: &str) -> Option<String> {
        self.with_parsed(|c| crate::name::attribute(c.subject(), short))
            .ok()
            .flatten()
    }

    /// Why the subject cannot be read as one identity (a multi-valued RDN, CN, O, OU or C given
    /// twice, a value that is not text): policies and the registry refuse such certificates,
    /// since what a policy reads and what the headers show would differ. `None` normally.
    pub fn subject_ambiguity(&self) -> Option<&str> {
        self.0.info.subject_ambiguity.as_deref()
    }

    /// The first subject attribute that policies read (CN, O, OU, C) whose value holds a
    /// character policies treat as a separator or wildcard (`/ + # * ? $`) or a control
    /// character, with that character. Policies never substitute such a value (it would reach
    /// into another device's topics or another tenant's paths), so issuing one is refused unless
    /// asked for. `None` when every value is plain.
    pub fn subject_separator(&self) -> Option<(&'static str, char)> {
        ["CN", "O", "OU", "C"].into_iter().find_map(|short| {
            let value = self.subject_attribute(short)?;
            let c = value
                .chars()
                .find(|c| "/+#*?$".contains(*c) || c.is_control())?;
            Some((short, c))
        })
    }

    /// Every attribute of the subject and of the issuer as (short name, text) pairs, in the
    /// order the names hold them (one parse for both: policies read many of them per
    /// certificate).
    pub fn name_attributes(&self) -> NameAttributes {
        self.with_parsed(|c| NameAttributes {
            subject: crate::name::attributes(c.subject()),
            issuer: crate::name::attributes(c.issuer()),
        })
        .unwrap_or_default()
    }

    /// Runs `f` over the x509-parser view. Parsing succeeded once in [`Certificate::from_der`],
    /// so it succeeds again.
    pub(crate) fn with_parsed<T>(&self, f: impl FnOnce(&X509Certificate<'_>) -> T) -> Result<T> {
        let (_, parsed) = X509Certificate::from_der(&self.0.der)
            .map_err(|e| PkiError::malformed("", format!("certificate DER: {e}")))?;
        Ok(f(&parsed))
    }
}

/// The attributes of a certificate's subject and issuer names, by short name (`CN`, `O`, `ST`,
/// `dnQualifier`… or the dotted OID for a type without one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameAttributes {
    /// The subject's attributes, in order.
    pub subject: Vec<(String, String)>,
    /// The issuer's attributes, in order.
    pub issuer: Vec<(String, String)>,
}

impl NameAttributes {
    /// The first subject value of an attribute type.
    pub fn subject(&self, short: &str) -> Option<&str> {
        first(&self.subject, short)
    }

    /// The first issuer value of an attribute type.
    pub fn issuer(&self, short: &str) -> Option<&str> {
        first(&self.issuer, short)
    }
}

fn first<'a>(attributes: &'a [(String, String)], short: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|(k, _)| k == short)
        .map(|(_, v)| v.as_str())
}

/// The decoded fields of a certificate.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CertificateInfo {
    /// X.509 version: 1 (no extensions; `openssl x509 -req` without `-extfile` makes these), 2
    /// or 3.
    pub version: u32,
    /// Subject, RFC 4514.
    pub subject: String,
    /// Issuer, RFC 4514.
    pub issuer: String,
    /// Serial number, colon-separated lower-case hex.
    pub serial: String,
    /// Start of validity, RFC 3339.
    pub not_before: String,
    /// End of validity, RFC 3339.
    pub not_after: String,
    /// Public key.
    pub public_key: KeyInfo,
    /// Signature algorithm name (`ecdsa-with-SHA256`…).
    pub signature_algorithm: String,
    /// Key usage bits by RFC 5280 name; empty when the extension is absent.
    pub key_usage: Vec<String>,
    /// Extended key usages (`clientAuth`, `serverAuth`, or dotted OIDs); empty when absent.
    pub extended_key_usage: Vec<String>,
    /// Basic constraints, when present.
    pub basic_constraints: Option<BasicConstraintsInfo>,
    /// Subject key identifier, colon hex.
    pub subject_key_id: Option<String>,
    /// Authority key identifier (the key id part), colon hex.
    pub authority_key_id: Option<String>,
    /// Subject alternative names as `dns:…`, `ip:…`, `email:…`, `uri:…`, `dirname:…`.
    pub subject_alt_names: Vec<String>,
    /// Authority information access as `ocsp:URI` / `ca-issuers:URI`.
    pub authority_info_access: Vec<String>,
    /// CRL distribution point URIs.
    pub crl_distribution_points: Vec<String>,
    /// Name constraints (`permitted dns:example.com`, `excluded ip:10.0.0.0/8`…).
    pub name_constraints: Vec<String>,
    /// Whether subject and issuer names are the same.
    pub self_issued: bool,
    /// SHA-256 of the DER, colon-separated upper-case hex (as `openssl x509 -fingerprint`).
    pub sha256_fingerprint: String,
    /// SHA-256 of the DER, 64 lower-case hex characters (the registry's certificate id).
    pub id: String,
    #[serde(skip)]
    pub(crate) not_before_unix: i64,
    #[serde(skip)]
    pub(crate) not_after_unix: i64,
    /// The issuer and subject names as encoded (DER), for matching issuers to CAs.
    #[serde(skip)]
    pub(crate) issuer_der: Vec<u8>,
    #[serde(skip)]
    pub(crate) subject_der: Vec<u8>,
    /// Why the subject cannot be read as one identity, if so (see
    /// [`Certificate::subject_ambiguity`]).
    #[serde(skip)]
    pub(crate) subject_ambiguity: Option<String>,
}

/// Basic constraints.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BasicConstraintsInfo {
    /// cA flag.
    pub ca: bool,
    /// pathLenConstraint.
    pub path_len: Option<u32>,
}

/// A public key's algorithm and size.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeyInfo {
    /// `EC`, `RSA`, `Ed25519`, `Ed448` or the algorithm OID.
    pub algorithm: String,
    /// Key size in bits (curve size for EC).
    pub bits: u32,
    /// Curve name for EC keys (`P-256`…).
    pub curve: Option<String>,
}

impl KeyInfo {
    /// Reads a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(der: &[u8]) -> Option<KeyInfo> {
        let (_, spki) = SubjectPublicKeyInfo::from_der(der).ok()?;
        Some(KeyInfo::from_spki(&spki))
    }

    pub(crate) fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> KeyInfo {
        let alg = spki.algorithm.algorithm.to_id_string();
        match alg.as_str() {
            "1.2.840.113549.1.1.1" | "1.2.840.113549.1.1.10" => {
                let bits = match spki.parsed() {
                    Ok(PublicKey::RSA(rsa)) => {
                        // Exact bit length: x509-parser rounds to whole bytes.
                        let modulus = rsa.modulus;
                        let start = modulus
                            .iter()
                            .position(|b| *b != 0)
                            .unwrap_or(modulus.len());
                        let significant = &modulus[start..];
                        match significant.first() {
                            Some(first) => {
                                (significant.len() as u32 - 1) * 8 + (8 - first.leading_zeros())
                            }
                            None => 0,
                        }
                    }
                    _ => 0,
                };
                KeyInfo {
                    algorithm: "RSA".into(),
                    bits,
                    curve: None,
                }
            }
            "1.2.840.10045.2.1" => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .map(|o| o.to_id_string());
                let (name, bits) = match curve.as_deref() {
                    Some("1.2.840.10045.3.1.7") => ("P-256".to_string(), 256),
                    Some("1.3.132.0.34") => ("P-384".to_string(), 384),
                    Some("1.3.132.0.35") => ("P-521".to_string(), 521),
                    Some("1.2.840.10045.3.1.1") => ("P-192".to_string(), 192),
                    Some("1.3.132.0.33") => ("P-224".to_string(), 224),
                    Some("1.3.132.0.10") => ("secp256k1".to_string(), 256),
                    Some(other) => (other.to_string(), 0),
                    None => ("unknown".to_string(), 0),
                };
                KeyInfo {
                    algorithm: "EC".into(),
                    bits,
                    curve: Some(name),
                }
            }
            "1.3.101.112" => KeyInfo {
                algorithm: "Ed25519".into(),
                bits: 256,
                curve: None,
            },
            "1.3.101.113" => KeyInfo {
                algorithm: "Ed448".into(),
                bits: 456,
                curve: None,
            },
            _ => KeyInfo {
                algorithm: alg,
                bits: 0,
                curve: None,
            },
        }
    }

    /// True for RSA below 2048 bits and EC below P-256 (API Gateway's and our minimums).
    pub fn is_weak(&self) -> bool {
        match self.algorithm.as_str() {
            "RSA" => self.bits < 2048,
            "EC" => self.bits < 256,
            _ => false,
        }
    }
}

impl fmt::Display for KeyInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.curve {
            Some(curve) => write!(f, "{} {}", self.algorithm, curve),
            None if self.algorithm == "RSA" => write!(f, "RSA {}", self.bits),
            None => f.write_str(&self.algorithm),
        }
    }
}

impl CertificateInfo {
    /// The DER of the subject name (outer SEQUENCE included), as TLS CertificateRequests carry
    /// CA names.
    pub fn subject_der(&self) -> &[u8] {
        &self.subject_der
    }

    /// The DER of the issuer name (outer SEQUENCE included).
    pub fn issuer_der(&self) -> &[u8] {
        &self.issuer_der
    }

    /// Decodes a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self> {
        let (rest, cert) = X509Certificate::from_der(der)
            .map_err(|e| PkiError::malformed("", format!("not a valid X.509 certificate ({e})")))?;
        if !rest.is_empty() {
            return Err(PkiError::malformed(
                "",
                "certificate has trailing bytes after its DER encoding",
            ));
        }
        let tbs = &cert.tbs_certificate;
        let digest = sha256(der);
        let mut info = CertificateInfo {
            version: tbs.version.0 + 1,
            subject: rfc4514(tbs.subject()),
            issuer: rfc4514(tbs.issuer()),
            serial: hex(tbs.raw_serial(), ":"),
            not_before: rfc3339(tbs.validity().not_before.to_datetime()),
            not_after: rfc3339(tbs.validity().not_after.to_datetime()),
            public_key: KeyInfo::from_spki(tbs.public_key()),
            signature_algorithm: signature_algorithm_name(&cert.signature_algorithm.algorithm),
            key_usage: Vec::new(),
            extended_key_usage: Vec::new(),
            basic_constraints: None,
            subject_key_id: None,
            authority_key_id: None,
            subject_alt_names: Vec::new(),
            authority_info_access: Vec::new(),
            crl_distribution_points: Vec::new(),
            name_constraints: Vec::new(),
            self_issued: tbs.subject().as_raw() == tbs.issuer().as_raw(),
            sha256_fingerprint: hex(&digest, ":").to_uppercase(),
            id: hex(&digest, ""),
            not_before_unix: tbs.validity().not_before.timestamp(),
            not_after_unix: tbs.validity().not_after.timestamp(),
            issuer_der: tbs.issuer().as_raw().to_vec(),
            subject_der: tbs.subject().as_raw().to_vec(),
            subject_ambiguity: crate::name::ambiguity(tbs.subject()),
        };
        for ext in tbs.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::KeyUsage(ku) => info.key_usage = key_usage_names(ku.flags),
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    let named = [
                        (eku.server_auth, "serverAuth"),
                        (eku.client_auth, "clientAuth"),
                        (eku.code_signing, "codeSigning"),
                        (eku.email_protection, "emailProtection"),
                        (eku.time_stamping, "timeStamping"),
                        (eku.ocsp_signing, "OCSPSigning"),
                        (eku.any, "anyExtendedKeyUsage"),
                    ];
                    info.extended_key_usage = named
                        .iter()
                        .filter(|(set, _)| *set)
                        .map(|(_, name)| name.to_string())
                        .chain(eku.other.iter().map(|o| o.to_id_string()))
                        .collect();
                }
                ParsedExtension::BasicConstraints(bc) => {
                    info.basic_constraints = Some(BasicConstraintsInfo {
                        ca: bc.ca,
                        path_len: bc.path_len_constraint,
                    })
                }
                ParsedExtension::SubjectKeyIdentifier(id) => {
                    info.subject_key_id = Some(hex(id.0, ":"))
                }
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    info.authority_key_id = aki.key_identifier.as_ref().map(|id| hex(id.0, ":"))
                }
                ParsedExtension::SubjectAlternativeName(san) => {
                    info.subject_alt_names = san.general_names.iter().map(general_name).collect()
                }
                ParsedExtension::AuthorityInfoAccess(aia) => {
                    info.authority_info_access = aia
                        .accessdescs
                        .iter()
                        .map(|d| {
                            let method = match d.access_method.to_id_string().as_str() {
                                "1.3.6.1.5.5.7.48.1" => "ocsp".to_string(),
                                "1.3.6.1.5.5.7.48.2" => "ca-issuers".to_string(),
                                other => other.to_string(),
                            };
                            format!("{method}:{}", general_name_value(&d.access_location))
                        })
                        .collect()
                }
                ParsedExtension::CRLDistributionPoints(dps) => {
                    for dp in dps.iter() {
                        if let Some(DistributionPointName::FullName(names)) = &dp.distribution_point
                        {
                            info.crl_distribution_points
                                .extend(names.iter().map(general_name_value));
                        }
                    }
                }
                ParsedExtension::NameConstraints(nc) => {
                    for (kind, trees) in [
                        ("permitted", &nc.permitted_subtrees),
                        ("excluded", &nc.excluded_subtrees),
                    ] {
                        for tree in trees.iter().flatten() {
                            info.name_constraints
                                .push(format!("{kind} {}", general_name(&tree.base)));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(info)
    }

    /// True when basic constraints say this certificate is a CA.
    pub fn is_ca(&self) -> bool {
        self.basic_constraints.as_ref().is_some_and(|bc| bc.ca)
    }

    /// Seconds since the epoch of notBefore.
    pub fn not_before_unix(&self) -> i64 {
        self.not_before_unix
    }

    /// Seconds since the epoch of notAfter.
    pub fn not_after_unix(&self) -> i64 {
        self.not_after_unix
    }
}

impl fmt::Display for CertificateInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let none = "(none)";
        writeln!(f, "Certificate")?;
        writeln!(f, "  Version:             {}", self.version)?;
        writeln!(f, "  Subject:             {}", self.subject)?;
        writeln!(f, "  Issuer:              {}", self.issuer)?;
        writeln!(f, "  Serial:              {}", self.serial)?;
        writeln!(f, "  Not before:          {}", self.not_before)?;
        writeln!(f, "  Not after:           {}", self.not_after)?;
        writeln!(f, "  Public key:          {}", self.public_key)?;
        writeln!(f, "  Signature algorithm: {}", self.signature_algorithm)?;
        let bc = match &self.basic_constraints {
            Some(BasicConstraintsInfo {
                ca: true,
                path_len: Some(n),
            }) => format!("CA:TRUE, pathlen:{n}"),
            Some(BasicConstraintsInfo {
                ca: true,
                path_len: None,
            }) => "CA:TRUE".into(),
            Some(BasicConstraintsInfo { ca: false, .. }) => "CA:FALSE".into(),
            None => none.into(),
        };
        writeln!(f, "  Basic constraints:   {bc}")?;
        writeln!(
            f,
            "  Key usage:           {}",
            list_or(&self.key_usage, none)
        )?;
        writeln!(
            f,
            "  Extended key usage:  {}",
            list_or(&self.extended_key_usage, none)
        )?;
        writeln!(
            f,
            "  Subject key id:      {}",
            self.subject_key_id.as_deref().unwrap_or(none)
        )?;
        writeln!(
            f,
            "  Authority key id:    {}",
            self.authority_key_id.as_deref().unwrap_or(none)
        )?;
        writeln!(
            f,
            "  Subject alt names:   {}",
            list_or(&self.subject_alt_names, none)
        )?;
        if !self.name_constraints.is_empty() {
            writeln!(
                f,
                "  Name constraints:    {}",
                self.name_constraints.join(", ")
            )?;
        }
        writeln!(
            f,
            "  Authority info:      {}",
            list_or(&self.authority_info_access, none)
        )?;
        writeln!(
            f,
            "  CRL distribution:    {}",
            list_or(&self.crl_distribution_points, none)
        )?;
        writeln!(f, "  SHA-256 fingerprint: {}", self.sha256_fingerprint)
    }
}

/// A decoded certificate signing request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CsrInfo {
    /// Subject, RFC 4514.
    pub subject: String,
    /// Public key.
    pub public_key: KeyInfo,
    /// Signature algorithm name.
    pub signature_algorithm: String,
    /// Whether the request's self-signature verifies.
    pub signature_valid: bool,
    /// Subject alternative names the request asks for.
    pub requested_subject_alt_names: Vec<String>,
    /// OIDs of every extension the request asks for.
    pub requested_extensions: Vec<String>,
}

impl CsrInfo {
    /// Decodes a DER CSR.
    pub fn from_der(der: &[u8]) -> Result<Self> {
        let (_, csr) = X509CertificationRequest::from_der(der)
            .map_err(|e| PkiError::malformed("", format!("not a valid CSR ({e})")))?;
        let info = &csr.certification_request_info;
        let mut out = CsrInfo {
            subject: rfc4514(&info.subject),
            public_key: KeyInfo::from_spki(&info.subject_pki),
            signature_algorithm: signature_algorithm_name(&csr.signature_algorithm.algorithm),
            signature_valid: csr.verify_signature().is_ok(),
            requested_subject_alt_names: Vec::new(),
            requested_extensions: Vec::new(),
        };
        if let Some(exts) = csr.requested_extensions() {
            for ext in exts {
                if let ParsedExtension::SubjectAlternativeName(san) = ext {
                    out.requested_subject_alt_names =
                        san.general_names.iter().map(general_name).collect();
                }
                out.requested_extensions
                    .push(extension_name(ext).to_string());
            }
        }
        Ok(out)
    }
}

impl fmt::Display for CsrInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Certificate signing request")?;
        writeln!(f, "  Subject:             {}", self.subject)?;
        writeln!(f, "  Public key:          {}", self.public_key)?;
        writeln!(f, "  Signature algorithm: {}", self.signature_algorithm)?;
        let valid = if self.signature_valid {
            "valid"
        } else {
            "INVALID"
        };
        writeln!(f, "  Signature:           {valid}")?;
        writeln!(
            f,
            "  Requested SANs:      {}",
            list_or(&self.requested_subject_alt_names, "(none)")
        )?;
        writeln!(
            f,
            "  Requested exts:      {}",
            list_or(&self.requested_extensions, "(none)")
        )
    }
}

/// A decoded CRL.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CrlInfo {
    /// Issuer, RFC 4514.
    pub issuer: String,
    /// thisUpdate, RFC 3339.
    pub this_update: String,
    /// nextUpdate, RFC 3339, when present.
    pub next_update: Option<String>,
    /// CRL number, decimal.
    pub crl_number: Option<String>,
    /// Signature algorithm name.
    pub signature_algorithm: String,
    /// Authority key identifier, colon hex.
    pub authority_key_id: Option<String>,
    /// Revoked entries.
    pub revoked: Vec<RevokedEntry>,
}

/// One revoked certificate in a CRL.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RevokedEntry {
    /// Serial, colon hex.
    pub serial: String,
    /// Revocation date, RFC 3339.
    pub revoked_at: String,
    /// Reason, when given.
    pub reason: Option<String>,
}

impl CrlInfo {
    /// Decodes a DER CRL.
    pub fn from_der(der: &[u8]) -> Result<Self> {
        let (_, crl) = CertificateRevocationList::from_der(der)
            .map_err(|e| PkiError::malformed("", format!("not a valid CRL ({e})")))?;
        let mut info = CrlInfo {
            issuer: rfc4514(crl.issuer()),
            this_update: rfc3339(crl.last_update().to_datetime()),
            next_update: crl.next_update().map(|t| rfc3339(t.to_datetime())),
            crl_number: crl.crl_number().map(|n| n.to_string()),
            signature_algorithm: signature_algorithm_name(&crl.signature_algorithm.algorithm),
            authority_key_id: None,
            revoked: crl
                .iter_revoked_certificates()
                .map(|r| RevokedEntry {
                    serial: hex(r.raw_serial(), ":"),
                    revoked_at: rfc3339(r.revocation_date.to_datetime()),
                    reason: r.reason_code().map(|(_, code)| format!("{code}")),
                })
                .collect(),
        };
        for ext in crl.extensions() {
            if let ParsedExtension::AuthorityKeyIdentifier(aki) = ext.parsed_extension() {
                info.authority_key_id = aki.key_identifier.as_ref().map(|id| hex(id.0, ":"));
            }
        }
        Ok(info)
    }
}

impl fmt::Display for CrlInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Certificate revocation list")?;
        writeln!(f, "  Issuer:              {}", self.issuer)?;
        writeln!(f, "  This update:         {}", self.this_update)?;
        writeln!(
            f,
            "  Next update:         {}",
            self.next_update.as_deref().unwrap_or("(none)")
        )?;
        writeln!(
            f,
            "  CRL number:          {}",
            self.crl_number.as_deref().unwrap_or("(none)")
        )?;
        writeln!(f, "  Signature algorithm: {}", self.signature_algorithm)?;
        writeln!(
            f,
            "  Authority key id:    {}",
            self.authority_key_id.as_deref().unwrap_or("(none)")
        )?;
        writeln!(f, "  Revoked:             {}", self.revoked.len())?;
        for r in &self.revoked {
            let reason = r
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            writeln!(f, "    {} at {}{}", r.serial, r.revoked_at, reason)?;
        }
        Ok(())
    }
}

/// One object found by [`inspect`].
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Inspected {
    /// A certificate.
    Certificate(Box<CertificateInfo>),
    /// A certificate signing request.
    Csr(CsrInfo),
    /// A certificate revocation list.
    Crl(CrlInfo),
}

impl fmt::Display for Inspected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Inspected::Certificate(c) => c.fmt(f),
            Inspected::Csr(c) => c.fmt(f),
            Inspected::Crl(c) => c.fmt(f),
        }
    }
}

/// Decodes every certificate, CSR and CRL in a PEM or DER input, in order. Private keys are
/// skipped (never printed); anything else is an error naming its line.
pub fn inspect(input: &[u8]) -> Result<Vec<Inspected>> {
    let mut out = Vec::new();
    for block in pem::decode(input)? {
        let at = |detail: String| {
            if block.line > 0 {
                PkiError::malformed(format!("line {}: ", block.line), detail)
            } else {
                PkiError::malformed("", detail)
            }
        };
        let relabel = |e: PkiError| match e {
            PkiError::Malformed { detail, .. } => at(detail),
            other => other,
        };
        match &block.label {
            Label::Certificate => out.push(Inspected::Certificate(Box::new(
                CertificateInfo::from_der(&block.der).map_err(relabel)?,
            ))),
            Label::Csr => out.push(Inspected::Csr(
                CsrInfo::from_der(&block.der).map_err(relabel)?,
            )),
            Label::Crl => out.push(Inspected::Crl(
                CrlInfo::from_der(&block.der).map_err(relabel)?,
            )),
            Label::Der => {
                if let Ok(c) = CertificateInfo::from_der(&block.der) {
                    out.push(Inspected::Certificate(Box::new(c)));
                } else if let Ok(c) = CsrInfo::from_der(&block.der) {
                    out.push(Inspected::Csr(c));
                } else if let Ok(c) = CrlInfo::from_der(&block.der) {
                    out.push(Inspected::Crl(c));
                } else {
                    return Err(at("DER input is not a certificate, CSR or CRL".into()));
                }
            }
            Label::Pkcs8Key | Label::RsaKey | Label::EcKey | Label::EncryptedKey => {}
            Label::Other(label) => {
                return Err(at(format!(
                    "unsupported PEM block '{label}' (expected CERTIFICATE, CERTIFICATE REQUEST or X509 CRL)"
                )));
            }
        }
    }
    if out.is_empty() {
        return Err(PkiError::NotFound {
            expected: "certificate, CSR or CRL",
            label: "CERTIFICATE",
        });
    }
    Ok(out)
}

/// Lower-case hex of `bytes` joined by `sep`.
pub fn hex(bytes: &[u8], sep: &str) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * (2 + sep.len()));
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            out.push_str(sep);
        }
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn list_or(items: &[String], none: &str) -> String {
    if items.is_empty() {
        none.to_string()
    } else {
        items.join(", ")
    }
}

fn key_usage_names(flags: u16) -> Vec<String> {
    const NAMES: [&str; 9] = [
        "digitalSignature",
        "nonRepudiation",
        "keyEncipherment",
        "dataEncipherment",
        "keyAgreement",
        "keyCertSign",
        "cRLSign",
        "encipherOnly",
        "decipherOnly",
    ];
    // x509-parser stores bit 0 (digitalSignature) in the least significant bit.
    NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| flags & (1 << i) != 0)
        .map(|(_, n)| n.to_string())
        .collect()
}

pub(crate) fn signature_algorithm_name(oid: &Oid<'_>) -> String {
    match oid.to_id_string().as_str() {
        "1.2.840.10045.4.3.2" => "ecdsa-with-SHA256",
        "1.2.840.10045.4.3.3" => "ecdsa-with-SHA384",
        "1.2.840.10045.4.3.4" => "ecdsa-with-SHA512",
        "1.2.840.10045.4.1" => "ecdsa-with-SHA1",
        "1.2.840.113549.1.1.11" => "sha256WithRSAEncryption",
        "1.2.840.113549.1.1.12" => "sha384WithRSAEncryption",
        "1.2.840.113549.1.1.13" => "sha512WithRSAEncryption",
        "1.2.840.113549.1.1.5" => "sha1WithRSAEncryption",
        "1.2.840.113549.1.1.4" => "md5WithRSAEncryption",
        "1.2.840.113549.1.1.10" => "rsassaPss",
        "1.3.101.112" => "ED25519",
        "1.3.101.113" => "ED448",
        other => return other.to_string(),
    }
    .to_string()
}

fn extension_name(ext: &ParsedExtension<'_>) -> &'static str {
    match ext {
        ParsedExtension::SubjectAlternativeName(_) => "subjectAltName",
        ParsedExtension::KeyUsage(_) => "keyUsage",
        ParsedExtension::ExtendedKeyUsage(_) => "extendedKeyUsage",
        ParsedExtension::BasicConstraints(_) => "basicConstraints",
        ParsedExtension::SubjectKeyIdentifier(_) => "subjectKeyIdentifier",
        ParsedExtension::NameConstraints(_) => "nameConstraints",
        _ => "other",
    }
}

fn general_name(name: &GeneralName<'_>) -> String {
    let kind = match name {
        GeneralName::DNSName(_) => "dns",
        GeneralName::IPAddress(_) => "ip",
        GeneralName::RFC822Name(_) => "email",
        GeneralName::URI(_) => "uri",
        GeneralName::DirectoryName(_) => "dirname",
        GeneralName::RegisteredID(_) => "rid",
        _ => "other",
    };
    format!("{kind}:{}", general_name_value(name))
}

fn general_name_value(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => s.to_string(),
        GeneralName::IPAddress(bytes) => ip_text(bytes),
        GeneralName::DirectoryName(n) => rfc4514(n),
        GeneralName::RegisteredID(oid) => oid.to_id_string(),
        other => format!("{other:?}"),
    }
}

/// An IP SAN (4 or 16 bytes) or a name-constraint range (8 or 32 bytes: address and mask).
fn ip_text(bytes: &[u8]) -> String {
    use std::net::{Ipv4Addr, Ipv6Addr};
    let prefix = |mask: &[u8]| mask.iter().map(|b| b.count_ones()).sum::<u32>();
    match bytes.len() {
        4 => Ipv4Addr::from(<[u8; 4]>::try_from(bytes).unwrap_or_default()).to_string(),
        16 => Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap_or_default()).to_string(),
        8 => format!(
            "{}/{}",
            Ipv4Addr::from(<[u8; 4]>::try_from(&bytes[..4]).unwrap_or_default()),
            prefix(&bytes[4..])
        ),
        32 => format!(
            "{}/{}",
            Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[..16]).unwrap_or_default()),
            prefix(&bytes[16..])
        ),
        _ => format!("#{}", hex(bytes, "")),
    }
}
