//! Issuing certificates from profiles: roots, intermediates, client and server leaves, and the
//! proof-of-possession certificates the registry asks for.
//!
//! A [`Profile`] decides every extension (CA flag, key usage, extended key usage, key
//! identifiers); callers choose only names, lifetime and, for CAs, constraints. A CSR contributes
//! its subject and public key and nothing else.

use std::net::IpAddr;
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, KeyIdMethod, KeyUsagePurpose, NameConstraints,
    SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::cert::{Certificate, KeyInfo};
use crate::key::PrivateKey;
use crate::name;
use crate::pem::{self, Label};
use crate::{PkiError, Result};

/// What a certificate is for; decides all of its extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// A self-signed root CA: CA:TRUE, keyCertSign + cRLSign.
    RootCa,
    /// An intermediate CA: as a root, signed by another CA.
    IntermediateCa,
    /// A TLS client leaf: CA:FALSE, digitalSignature, EKU clientAuth.
    Client,
    /// A TLS server leaf: CA:FALSE, digitalSignature (+ keyEncipherment for RSA), EKU serverAuth.
    Server,
    /// A TLS peer that is both server and client (a NATS server, which serves the nodes and
    /// connects to its peers): as a server leaf, with EKU serverAuth and clientAuth.
    Peer,
    /// A proof-of-possession certificate for CA registration: CN = registration code.
    Verification,
    /// A SCEP registration authority's encryption certificate: keyEncipherment only.
    RaEncryption,
    /// A SCEP registration authority's signing certificate: digitalSignature only.
    RaSigning,
    /// A delegated OCSP responder (RFC 6960 §4.2.2.2): digitalSignature, EKU OCSPSigning and
    /// id-pkix-ocsp-nocheck (relying parties do not check its own revocation: keep it short).
    OcspSigning,
}

impl Profile {
    /// The default lifetime in days: CAs 10 years, client leaves 1 year, server leaves 90 days,
    /// verification certificates 30 days.
    pub fn default_days(self) -> u32 {
        match self {
            Profile::RootCa | Profile::IntermediateCa => 3650,
            Profile::Client => 365,
            Profile::Server => 90,
            Profile::Peer => 365,
            Profile::Verification => 30,
            Profile::RaEncryption | Profile::RaSigning => 3650,
            Profile::OcspSigning => 30,
        }
    }

    fn is_ca(self) -> bool {
        matches!(self, Profile::RootCa | Profile::IntermediateCa)
    }
}

impl FromStr for Profile {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "client" => Ok(Profile::Client),
            "server" => Ok(Profile::Server),
            _ => Err(PkiError::InvalidRequest(format!(
                "unknown profile '{s}'; use client or server"
            ))),
        }
    }
}

/// The subject fields Portcullis sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubjectName {
    /// commonName (required).
    pub common_name: String,
    /// organizationName.
    pub organization: Option<String>,
    /// organizationalUnitName.
    pub organizational_unit: Option<String>,
    /// countryName: two letters.
    pub country: Option<String>,
}

impl SubjectName {
    /// A subject with only a common name.
    pub fn cn(common_name: impl Into<String>) -> Self {
        SubjectName {
            common_name: common_name.into(),
            ..Default::default()
        }
    }

    fn to_rcgen(&self) -> Result<DistinguishedName> {
        let mut dn = DistinguishedName::new();
        if let Some(c) = &self.country {
            if c.len() != 2 || !c.chars().all(|ch| ch.is_ascii_alphabetic()) {
                return Err(PkiError::InvalidRequest(format!(
                    "country '{c}' must be a two-letter ISO 3166 code such as US or DE"
                )));
            }
            let printable = rcgen::string::PrintableString::try_from(c.to_ascii_uppercase())
                .map_err(|_| PkiError::InvalidRequest(format!("country '{c}' is not printable")))?;
            dn.push(DnType::CountryName, DnValue::PrintableString(printable));
        }
        let mut text = |ty: DnType, flag: &str, value: &Option<String>| -> Result<()> {
            if let Some(v) = value {
                check_text(flag, v)?;
                dn.push(ty, DnValue::Utf8String(v.clone()));
            }
            Ok(())
        };
        text(DnType::OrganizationName, "org", &self.organization)?;
        text(
            DnType::OrganizationalUnitName,
            "ou",
            &self.organizational_unit,
        )?;
        text(DnType::CommonName, "cn", &Some(self.common_name.clone()))?;
        Ok(dn)
    }
}

fn check_text(flag: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(PkiError::InvalidRequest(format!(
            "--{flag} must not be empty"
        )));
    }
    if value.chars().count() > 64 {
        return Err(PkiError::InvalidRequest(format!(
            "--{flag} is longer than the 64 characters X.509 allows"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(PkiError::InvalidRequest(format!(
            "--{flag} contains control characters"
        )));
    }
    Ok(())
}

/// A subject alternative name, written `dns:NAME`, `ip:ADDR`, `email:ADDR` or `uri:URI`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectAltName {
    /// A DNS name (wildcards such as `*.example.com` allowed).
    Dns(String),
    /// An IPv4 or IPv6 address.
    Ip(IpAddr),
    /// An e-mail address (rfc822Name).
    Email(String),
    /// A URI (SPIFFE ids and the like).
    Uri(String),
}

impl FromStr for SubjectAltName {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            PkiError::InvalidRequest(format!(
                "SAN '{s}' {why}; write dns:NAME, ip:ADDR, email:ADDR or uri:URI"
            ))
        };
        let (kind, value) = s.split_once(':').ok_or_else(|| bad("has no type prefix"))?;
        if value.is_empty() || !value.is_ascii() || value.chars().any(|c| c.is_whitespace()) {
            return Err(bad("has an empty, non-ASCII or spaced value"));
        }
        match kind.to_ascii_lowercase().as_str() {
            "dns" => {
                let ok = value.split('.').enumerate().all(|(i, label)| {
                    (i == 0 && label == "*")
                        || (!label.is_empty()
                            && label.len() <= 63
                            && label
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                            && !label.starts_with('-')
                            && !label.ends_with('-'))
                });
                if !ok || value.len() > 253 {
                    return Err(bad("is not a valid DNS name"));
                }
                Ok(SubjectAltName::Dns(value.to_ascii_lowercase()))
            }
            "ip" => value
                .parse()
                .map(SubjectAltName::Ip)
                .map_err(|_| bad("is not an IPv4 or IPv6 address")),
            "email" => {
                if !value.contains('@') {
                    return Err(bad("is not an e-mail address"));
                }
                Ok(SubjectAltName::Email(value.to_string()))
            }
            "uri" => {
                if !value.contains(':') {
                    return Err(bad("is not an absolute URI"));
                }
                Ok(SubjectAltName::Uri(value.to_string()))
            }
            _ => Err(bad("has an unknown type")),
        }
    }
}

impl SubjectAltName {
    fn to_rcgen(&self) -> Result<SanType> {
        let ia5 = |v: &str| {
            rcgen::string::Ia5String::try_from(v.to_string())
                .map_err(|_| PkiError::InvalidRequest(format!("SAN value '{v}' is not ASCII")))
        };
        Ok(match self {
            SubjectAltName::Dns(n) => SanType::DnsName(ia5(n)?),
            SubjectAltName::Ip(ip) => SanType::IpAddress(*ip),
            SubjectAltName::Email(e) => SanType::Rfc822Name(ia5(e)?),
            SubjectAltName::Uri(u) => SanType::URI(ia5(u)?),
        })
    }
}

/// Everything a new certificate needs besides its key and issuer.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The profile: decides extensions.
    pub profile: Profile,
    /// Subject fields.
    pub subject: SubjectName,
    /// Subject alternative names.
    pub subject_alt_names: Vec<SubjectAltName>,
    /// Lifetime in days (at least 1).
    pub days: u32,
    /// For CAs: how many CA levels may follow below this one.
    pub path_len: Option<u8>,
    /// For CAs: permitted DNS subtrees.
    pub permitted_dns: Vec<String>,
    /// For CAs: permitted IP ranges in CIDR form.
    pub permitted_ip: Vec<String>,
}

impl IssueRequest {
    /// A request with the profile's default lifetime and no names beyond the CN.
    pub fn new(profile: Profile, subject: SubjectName) -> Self {
        IssueRequest {
            profile,
            subject,
            subject_alt_names: Vec::new(),
            days: profile.default_days(),
            path_len: None,
            permitted_dns: Vec::new(),
            permitted_ip: Vec::new(),
        }
    }
}

/// A CA that can issue: its certificate, its key, and its own issuers up to the root.
#[derive(Debug)]
pub struct CaIssuer {
    cert: Certificate,
    key: PrivateKey,
    issuers: Vec<Certificate>,
    /// Where relying parties find this CA's revocation data: written into every leaf it issues
    /// once set ([`CaIssuer::publish_revocation_at`]).
    urls: std::sync::OnceLock<RevocationUrls>,
}

/// The URLs a CA's leaves point relying parties to: its CRL (CRL distribution points), its
/// OCSP responder and its own certificate (authority information access).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationUrls {
    /// The CRL's URL.
    pub crl: String,
    /// The OCSP responder's URL.
    pub ocsp: String,
    /// The CA certificate's URL (caIssuers).
    pub ca_issuers: String,
}

impl CaIssuer {
    /// Checks that `cert` is a CA that may sign certificates and that `key` is its key.
    /// `issuers` are the CA's own issuers, nearest first (may be empty).
    pub fn new(cert: Certificate, key: PrivateKey, issuers: Vec<Certificate>) -> Result<Self> {
        let info = cert.info();
        let not_ca = |why: &str| PkiError::IssuerNotCa {
            subject: info.subject.clone(),
            why: why.to_string(),
        };
        if !info.is_ca() {
            return Err(not_ca("its basic constraints do not say CA:TRUE"));
        }
        if !info.key_usage.is_empty() && !info.key_usage.iter().any(|k| k == "keyCertSign") {
            return Err(not_ca("its key usage lacks keyCertSign"));
        }
        let cert_bits = cert.with_parsed(|c| c.public_key().subject_public_key.data.to_vec())?;
        if cert_bits != key.public_key_bits() {
            return Err(PkiError::KeyMismatch);
        }
        Ok(CaIssuer {
            cert,
            key,
            issuers,
            urls: std::sync::OnceLock::new(),
        })
    }

    /// From now on, leaves this CA issues carry `urls` (CRL distribution point, OCSP and
    /// caIssuers access); set once.
    pub fn publish_revocation_at(&self, urls: RevocationUrls) {
        let _ = self.urls.set(urls);
    }

    /// Where this CA's leaves point relying parties, once set.
    pub fn revocation_urls(&self) -> Option<&RevocationUrls> {
        self.urls.get()
    }

    /// The CA certificate.
    pub fn certificate(&self) -> &Certificate {
        &self.cert
    }

    /// The CA's private key.
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    /// The CA's issuers, nearest first.
    pub fn issuers(&self) -> &[Certificate] {
        &self.issuers
    }

    /// This CA followed by its issuers up to the root.
    pub fn chain(&self) -> Vec<Certificate> {
        std::iter::once(self.cert.clone())
            .chain(self.issuers.iter().cloned())
            .collect()
    }

    /// The intermediates a leaf under this CA should send: the chain without self-signed roots.
    pub fn intermediates(&self) -> Vec<Certificate> {
        self.chain()
            .into_iter()
            .filter(|c| !c.info().self_issued)
            .collect()
    }

    fn rcgen_issuer(&self) -> Result<rcgen::Issuer<'static, &rcgen::KeyPair>> {
        let (dn, ski, usages) = self.cert.with_parsed(|c| {
            let dn = name::to_rcgen(c.subject());
            let ski = c
                .extensions()
                .iter()
                .find_map(|e| match e.parsed_extension() {
                    x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(id) => {
                        Some(id.0.to_vec())
                    }
                    _ => None,
                });
            (dn, ski, self.cert.info().key_usage.clone())
        })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn.map_err(|e| PkiError::IssuerNotCa {
            subject: self.cert.info().subject.clone(),
            why: e.to_string(),
        })?;
        params.key_identifier_method = match ski {
            Some(ski) => KeyIdMethod::PreSpecified(ski),
            None => KeyIdMethod::Sha256,
        };
        params.key_usages = usages
            .iter()
            .filter_map(|u| match u.as_str() {
                "digitalSignature" => Some(KeyUsagePurpose::DigitalSignature),
                "keyCertSign" => Some(KeyUsagePurpose::KeyCertSign),
                "cRLSign" => Some(KeyUsagePurpose::CrlSign),
                _ => None,
            })
            .collect();
        Ok(rcgen::Issuer::new(params, self.key.key_pair()))
    }

    pub(crate) fn sign_crl(
        &self,
        params: &rcgen::CertificateRevocationListParams,
    ) -> Result<Vec<u8>> {
        let issuer = self.rcgen_issuer()?;
        let crl = params.signed_by(&issuer).map_err(|e| match e {
            rcgen::Error::IssuerNotCrlSigner => PkiError::IssuerNotCa {
                subject: self.cert.info().subject.clone(),
                why: "its key usage lacks cRLSign".into(),
            },
            other => PkiError::Signing(other.to_string()),
        })?;
        Ok(crl.der().to_vec())
    }

    fn has_ski(&self) -> bool {
        self.cert.info().subject_key_id.is_some()
    }
}

/// Issues a certificate for `key`. Without an issuer the certificate is self-signed (roots).
pub fn issue(
    req: &IssueRequest,
    key: &PrivateKey,
    issuer: Option<&CaIssuer>,
) -> Result<Certificate> {
    let key_info = KeyInfo::from_spki_der(&key.public_key_info())
        .ok_or_else(|| PkiError::UnsupportedKey("cannot read the public key".into()))?;
    let params = build_params(req, &key_info, issuer)?;
    let der = match issuer {
        None => params
            .self_signed(key.key_pair())
            .map_err(|e| PkiError::Signing(e.to_string()))?
            .der()
            .to_vec(),
        Some(ca) => {
            let rc_issuer = ca.rcgen_issuer()?;
            params
                .signed_by(key.key_pair(), &rc_issuer)
                .map_err(|e| PkiError::Signing(e.to_string()))?
                .der()
                .to_vec()
        }
    };
    finish(der, issuer)
}

/// Renews `old` for `key`: the subject (byte for byte) and subject alternative names (DNS, IP,
/// email and URI) of `old`, everything else from `req` (its subject and SANs are ignored).
pub fn renew(
    old: &Certificate,
    req: &IssueRequest,
    key: &PrivateKey,
    issuer: &CaIssuer,
) -> Result<Certificate> {
    use x509_parser::extensions::GeneralName;
    let key_info = KeyInfo::from_spki_der(&key.public_key_info())
        .ok_or_else(|| PkiError::UnsupportedKey("cannot read the public key".into()))?;
    let mut req = req.clone();
    req.subject = SubjectName::cn("renewed");
    req.subject_alt_names.clear();
    let mut params = build_params(&req, &key_info, Some(issuer))?;
    let (_, parsed) = X509Certificate::from_der(old.der())
        .map_err(|e| PkiError::malformed("", format!("not a certificate ({e})")))?;
    params.distinguished_name = name::to_rcgen(parsed.subject())?;
    let ia5 = |v: &str| {
        rcgen::string::Ia5String::try_from(v.to_string())
            .map_err(|_| PkiError::InvalidRequest(format!("SAN value '{v}' is not ASCII")))
    };
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = parsed.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(n) => sans.push(SanType::DnsName(ia5(n)?)),
                GeneralName::RFC822Name(e) => sans.push(SanType::Rfc822Name(ia5(e)?)),
                GeneralName::URI(u) => sans.push(SanType::URI(ia5(u)?)),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => sans.push(SanType::IpAddress(IpAddr::from(
                        <[u8; 4]>::try_from(*b)
                            .map_err(|_| PkiError::InvalidRequest("IP SAN".into()))?,
                    ))),
                    16 => sans.push(SanType::IpAddress(IpAddr::from(
                        <[u8; 16]>::try_from(*b)
                            .map_err(|_| PkiError::InvalidRequest("IP SAN".into()))?,
                    ))),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    params.subject_alt_names = sans;
    let rc_issuer = issuer.rcgen_issuer()?;
    let der = params
        .signed_by(key.key_pair(), &rc_issuer)
        .map_err(|e| PkiError::Signing(e.to_string()))?
        .der()
        .to_vec();
    finish(der, Some(issuer))
}

/// Issues a certificate for `key`, made by the server (EST `serverkeygen`, RFC 7030 §4.4), with
/// the subject of `csr` (PEM or DER), whose self-signature must verify; everything else from
/// `req` (its subject is ignored). The CSR's own key is not certified.
pub fn issue_for_subject_of(
    csr: &[u8],
    req: &IssueRequest,
    key: &PrivateKey,
    issuer: &CaIssuer,
) -> Result<Certificate> {
    let blocks = pem::blocks_of(csr, &Label::Csr)?;
    let block = blocks.first().ok_or(PkiError::NotFound {
        expected: "certificate signing request",
        label: "CERTIFICATE REQUEST",
    })?;
    let (_, parsed) = X509CertificationRequest::from_der(&block.der)
        .map_err(|e| PkiError::malformed("", format!("not a valid CSR ({e})")))?;
    parsed
        .verify_signature()
        .map_err(|_| PkiError::BadCsrSignature)?;
    let key_info = KeyInfo::from_spki_der(&key.public_key_info())
        .ok_or_else(|| PkiError::UnsupportedKey("cannot read the public key".into()))?;
    let mut req = req.clone();
    req.subject = SubjectName::cn("from-csr");
    let mut params = build_params(&req, &key_info, Some(issuer))?;
    params.distinguished_name = name::to_rcgen(&parsed.certification_request_info.subject)?;
    let rc_issuer = issuer.rcgen_issuer()?;
    let der = params
        .signed_by(key.key_pair(), &rc_issuer)
        .map_err(|e| PkiError::Signing(e.to_string()))?
        .der()
        .to_vec();
    finish(der, Some(issuer))
}

/// Signs a CSR (PEM or DER) with `issuer`. The subject and public key come from the CSR;
/// everything else from `req` (its subject is ignored). The CSR's self-signature must verify.
pub fn sign_csr(csr: &[u8], req: &IssueRequest, issuer: &CaIssuer) -> Result<Certificate> {
    let blocks = pem::blocks_of(csr, &Label::Csr)?;
    let block = blocks.first().ok_or(PkiError::NotFound {
        expected: "certificate signing request",
        label: "CERTIFICATE REQUEST",
    })?;
    let (_, parsed) = X509CertificationRequest::from_der(&block.der)
        .map_err(|e| PkiError::malformed("", format!("not a valid CSR ({e})")))?;
    parsed
        .verify_signature()
        .map_err(|_| PkiError::BadCsrSignature)?;
    let info = &parsed.certification_request_info;
    let key_info = KeyInfo::from_spki(&info.subject_pki);
    if key_info.is_weak() {
        return Err(PkiError::UnsupportedKey(format!(
            "the CSR's key is {key_info}; use RSA 2048 or larger, or ECDSA P-256 or larger"
        )));
    }
    // The key type comes from the SPKI itself, not from the CSR's signature algorithm: an
    // `openssl req` P-384 CSR is signed with SHA-256, which would otherwise read as P-256.
    let public_key = rcgen::SubjectPublicKeyInfo::from_der(info.subject_pki.raw).map_err(|_| {
        PkiError::UnsupportedKey(format!(
            "the CSR's key ({key_info}) is not RSA, ECDSA P-256/P-384/P-521 or Ed25519"
        ))
    })?;
    // The subject comes from the CSR; the request's own subject is not used.
    let mut req = req.clone();
    req.subject = SubjectName::cn("from-csr");
    let mut params = build_params(&req, &key_info, Some(issuer))?;
    params.distinguished_name = name::to_rcgen(&info.subject)?;
    if req.subject_alt_names.is_empty() && matches!(req.profile, Profile::Server | Profile::Peer) {
        let cn = name::attribute(&info.subject, "CN").unwrap_or_default();
        params.subject_alt_names = vec![san_from_cn(&cn)?.to_rcgen()?];
    }
    let rc_issuer = issuer.rcgen_issuer()?;
    let der = params
        .signed_by(&public_key, &rc_issuer)
        .map_err(|e| PkiError::Signing(e.to_string()))?
        .der()
        .to_vec();
    finish(der, Some(issuer))
}

/// A fresh random serial: positive, at most 20 bytes (RFC 5280 4.1.2.2), 159 bits of entropy.
pub fn random_serial() -> Result<Vec<u8>> {
    let mut serial = [0u8; 20];
    aws_lc_rs::rand::fill(&mut serial)
        .map_err(|_| PkiError::Signing("the system random generator failed".into()))?;
    serial[0] &= 0x7f;
    if serial[0] == 0 {
        serial[0] = 0x40;
    }
    Ok(serial.to_vec())
}

fn build_params(
    req: &IssueRequest,
    key_info: &KeyInfo,
    issuer: Option<&CaIssuer>,
) -> Result<CertificateParams> {
    if req.days == 0 {
        return Err(PkiError::InvalidRequest("--days must be at least 1".into()));
    }
    if req.days > 36_500 {
        return Err(PkiError::InvalidRequest(
            "--days must be at most 36500 (100 years)".into(),
        ));
    }
    if req.profile == Profile::RootCa && issuer.is_some() {
        return Err(PkiError::InvalidRequest("a root CA has no issuer".into()));
    }
    if req.profile != Profile::RootCa && issuer.is_none() {
        return Err(PkiError::InvalidRequest(
            "this certificate needs an issuer (--issuer-cert and --issuer-key)".into(),
        ));
    }
    if !req.profile.is_ca()
        && (req.path_len.is_some() || !req.permitted_dns.is_empty() || !req.permitted_ip.is_empty())
    {
        return Err(PkiError::InvalidRequest(
            "path length and name constraints apply only to CAs".into(),
        ));
    }
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    // Backdate a little so that a peer whose clock is slightly behind accepts it at once.
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(i64::from(req.days));
    if let Some(ca) = issuer {
        let ca_info = ca.certificate().info();
        if ca_info.not_after_unix() < now.unix_timestamp() {
            return Err(PkiError::IssuerNotCa {
                subject: ca_info.subject.clone(),
                why: format!("it expired at {}", ca_info.not_after),
            });
        }
        if req.profile.is_ca()
            && ca_info
                .basic_constraints
                .as_ref()
                .and_then(|bc| bc.path_len)
                == Some(0)
        {
            return Err(PkiError::IssuerNotCa {
                subject: ca_info.subject.clone(),
                why: "its path length constraint is 0, so it may not sign another CA".into(),
            });
        }
        // A certificate never outlives its issuer.
        if let Ok(limit) = OffsetDateTime::from_unix_timestamp(ca_info.not_after_unix()) {
            params.not_after = params.not_after.min(limit);
        }
        params.use_authority_key_identifier_extension = ca.has_ski();
    } else {
        params.use_authority_key_identifier_extension = true;
    }
    params.distinguished_name = req.subject.to_rcgen()?;
    params.subject_alt_names = req
        .subject_alt_names
        .iter()
        .map(SubjectAltName::to_rcgen)
        .collect::<Result<_>>()?;
    match req.profile {
        Profile::RootCa | Profile::IntermediateCa => {
            params.is_ca = IsCa::Ca(match req.path_len {
                Some(n) => BasicConstraints::Constrained(n),
                None => BasicConstraints::Unconstrained,
            });
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            if !req.permitted_dns.is_empty() || !req.permitted_ip.is_empty() {
                let mut permitted = Vec::new();
                for dns in &req.permitted_dns {
                    let d = dns.trim_start_matches('.');
                    SubjectAltName::from_str(&format!("dns:{d}")).map_err(|_| {
                        PkiError::InvalidRequest(format!("--permit-dns '{dns}' is not a DNS name"))
                    })?;
                    permitted.push(GeneralSubtree::DnsName(d.to_ascii_lowercase()));
                }
                for cidr in &req.permitted_ip {
                    let subnet = CidrSubnet::from_str(cidr).map_err(|_| {
                        PkiError::InvalidRequest(format!(
                            "--permit-ip '{cidr}' is not a CIDR range such as 10.0.0.0/8"
                        ))
                    })?;
                    permitted.push(GeneralSubtree::IpAddress(subnet));
                }
                params.name_constraints = Some(NameConstraints {
                    permitted_subtrees: permitted,
                    excluded_subtrees: Vec::new(),
                });
            }
        }
        Profile::Client => {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        Profile::Server | Profile::Peer => {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            if key_info.algorithm == "RSA" {
                params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
            }
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            if req.profile == Profile::Peer {
                params
                    .extended_key_usages
                    .push(ExtendedKeyUsagePurpose::ClientAuth);
            }
            if params.subject_alt_names.is_empty() {
                params.subject_alt_names = vec![san_from_cn(&req.subject.common_name)?.to_rcgen()?];
            }
        }
        Profile::Verification | Profile::RaSigning => {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
        Profile::RaEncryption => {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        }
        Profile::OcspSigning => {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::OcspSigning];
            // id-pkix-ocsp-nocheck, NULL.
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &[1, 3, 6, 1, 5, 5, 7, 48, 1, 5],
                    vec![0x05, 0x00],
                ));
        }
    }
    // Leaves point relying parties to their CA's revocation data, once it is published.
    if matches!(
        req.profile,
        Profile::Client | Profile::Server | Profile::Peer
    ) && let Some(urls) = issuer.and_then(CaIssuer::revocation_urls)
    {
        params.crl_distribution_points = vec![rcgen::CrlDistributionPoint {
            uris: vec![urls.crl.clone()],
        }];
        let access = |method: u64, uri: &str| {
            crate::der::seq(&[
                &crate::der::oid(&[1, 3, 6, 1, 5, 5, 7, 48, method]),
                &crate::der::element(0x86, uri.as_bytes()),
            ])
        };
        let aia = crate::der::seq(&[&access(1, &urls.ocsp), &access(2, &urls.ca_issuers)]);
        params
            .custom_extensions
            .push(rcgen::CustomExtension::from_oid_content(
                &[1, 3, 6, 1, 5, 5, 7, 1, 1],
                aia,
            ));
    }
    Ok(params)
}

/// Server certificates must carry a SAN: clients ignore the CN. Derive one from a CN that is a
/// host name or an address.
fn san_from_cn(cn: &str) -> Result<SubjectAltName> {
    let guess = if cn.parse::<IpAddr>().is_ok() {
        format!("ip:{cn}")
    } else {
        format!("dns:{cn}")
    };
    SubjectAltName::from_str(&guess).map_err(|_| {
        PkiError::InvalidRequest(format!(
            "a server certificate needs a SAN and CN '{cn}' is not a host name; add --san dns:NAME"
        ))
    })
}

/// Parses the new certificate and checks that its issuer name is byte-for-byte the issuer's
/// subject (path building compares names as bytes).
fn finish(der: Vec<u8>, issuer: Option<&CaIssuer>) -> Result<Certificate> {
    if let Some(ca) = issuer {
        let (_, new) = X509Certificate::from_der(&der)
            .map_err(|e| PkiError::Signing(format!("produced an unparsable certificate: {e}")))?;
        let expected = ca
            .certificate()
            .with_parsed(|c| c.subject().as_raw().to_vec())?;
        if new.issuer().as_raw() != expected.as_slice() {
            return Err(PkiError::Signing(format!(
                "cannot reproduce the issuer name '{}' byte-for-byte",
                ca.certificate().info().subject
            )));
        }
    }
    Certificate::from_der(der)
}

/// Signs `data` with `key` (the key of `cert`); with the signature's AlgorithmIdentifier.
pub(crate) fn sign_raw(
    cert: &Certificate,
    key: &PrivateKey,
    data: &[u8],
) -> Result<(Vec<u8>, Vec<u8>)> {
    use rcgen::SigningKey as _;
    let algorithm = cert
        .with_parsed(|c| signature_algorithm(c.public_key()))?
        .ok_or_else(|| PkiError::Signing("this key type cannot sign OCSP responses".into()))?;
    let signature = key
        .key_pair()
        .sign(data)
        .map_err(|e| PkiError::Signing(e.to_string()))?;
    Ok((signature, algorithm))
}

/// The AlgorithmIdentifier of the signature a key of this SPKI algorithm makes with rcgen's
/// defaults (ECDSA with the curve's hash, RSA PKCS#1 with SHA-256, Ed25519).
fn signature_algorithm(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Option<Vec<u8>> {
    let alg = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    match (alg.as_str(), curve.as_deref()) {
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => Some(crate::der::seq(&[
            &crate::der::oid(&[1, 2, 840, 10045, 4, 3, 2]),
        ])),
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => {
            Some(crate::der::seq(&[&crate::der::oid(&[
                1, 2, 840, 10045, 4, 3, 3,
            ])]))
        }
        ("1.2.840.10045.2.1", Some("1.3.132.0.35")) => {
            Some(crate::der::seq(&[&crate::der::oid(&[
                1, 2, 840, 10045, 4, 3, 4,
            ])]))
        }
        ("1.2.840.113549.1.1.1", _) => Some(crate::der::seq(&[
            &crate::der::oid(&[1, 2, 840, 113549, 1, 1, 11]),
            &[0x05, 0x00],
        ])),
        ("1.3.101.112", _) => Some(crate::der::seq(&[&crate::der::oid(&[1, 3, 101, 112])])),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyType;

    fn root() -> CaIssuer {
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let cert = issue(
            &IssueRequest::new(Profile::RootCa, SubjectName::cn("Test Root")),
            &key,
            None,
        )
        .unwrap();
        CaIssuer::new(cert, key, Vec::new()).unwrap()
    }

    #[test]
    fn client_profile_sets_usages_and_key_ids() {
        let ca = root();
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let cert = issue(
            &IssueRequest::new(Profile::Client, SubjectName::cn("device-1")),
            &key,
            Some(&ca),
        )
        .unwrap();
        let info = cert.info();
        assert_eq!(info.extended_key_usage, vec!["clientAuth"]);
        assert_eq!(info.key_usage, vec!["digitalSignature"]);
        assert!(!info.is_ca());
        assert!(info.basic_constraints.is_some());
        assert!(info.subject_key_id.is_some());
        assert_eq!(
            info.authority_key_id,
            ca.certificate().info().subject_key_id
        );
        assert_eq!(info.issuer, "CN=Test Root");
    }

    #[test]
    fn serials_are_random_positive_and_short() {
        let ca = root();
        let a = ca.certificate().info().serial.clone();
        let b = root().certificate().info().serial.clone();
        assert_ne!(a, b);
        let bytes = a.split(':').count();
        assert!(bytes <= 20, "{a}");
        assert!(u8::from_str_radix(&a[..2], 16).unwrap() < 0x80);
    }

    #[test]
    fn zero_days_is_refused() {
        let mut req = IssueRequest::new(Profile::RootCa, SubjectName::cn("x"));
        req.days = 0;
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let err = issue(&req, &key, None).unwrap_err().to_string();
        assert!(err.contains("--days"), "{err}");
    }

    #[test]
    fn leaf_cannot_issue() {
        let ca = root();
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let leaf = issue(
            &IssueRequest::new(Profile::Client, SubjectName::cn("leaf")),
            &key,
            Some(&ca),
        )
        .unwrap();
        let err = CaIssuer::new(leaf, key, vec![]).unwrap_err();
        assert!(matches!(err, PkiError::IssuerNotCa { .. }), "{err}");
    }

    #[test]
    fn wrong_key_is_refused() {
        let ca = root();
        let other = PrivateKey::generate(KeyType::EcP256).unwrap();
        let err = CaIssuer::new(ca.certificate().clone(), other, vec![]).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch), "{err}");
    }

    #[test]
    fn san_syntax() {
        assert_eq!(
            "dns:Example.COM".parse::<SubjectAltName>().unwrap(),
            SubjectAltName::Dns("example.com".into())
        );
        assert!("dns:*.example.com".parse::<SubjectAltName>().is_ok());
        assert!("ip:::1".parse::<SubjectAltName>().is_ok());
        assert!("ip:300.1.1.1".parse::<SubjectAltName>().is_err());
        assert!("example.com".parse::<SubjectAltName>().is_err());
        assert!("dns:bad name".parse::<SubjectAltName>().is_err());
        assert!("uri:spiffe://x/y".parse::<SubjectAltName>().is_ok());
    }

    #[test]
    fn server_without_san_gets_cn_as_dns() {
        let ca = root();
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let cert = issue(
            &IssueRequest::new(Profile::Server, SubjectName::cn("api.example.com")),
            &key,
            Some(&ca),
        )
        .unwrap();
        assert_eq!(cert.info().subject_alt_names, vec!["dns:api.example.com"]);
        let err = issue(
            &IssueRequest::new(Profile::Server, SubjectName::cn("My Server")),
            &key,
            Some(&ca),
        )
        .unwrap_err();
        assert!(err.to_string().contains("--san"), "{err}");
    }
}
