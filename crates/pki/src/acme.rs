//! What an ACME (RFC 8555) client makes locally: the certificate signing request of an order,
//! and the self-signed certificate that answers a TLS-ALPN-01 challenge (RFC 8737).

use rcgen::{CertificateParams, CustomExtension, DistinguishedName, SanType, SerialNumber};
use time::{Duration, OffsetDateTime};

use crate::cert::Certificate;
use crate::issue::random_serial;
use crate::key::{KeyType, PrivateKey};
use crate::{PkiError, Result};

fn dns_name(hostname: &str) -> Result<SanType> {
    Ok(SanType::DnsName(hostname.try_into().map_err(|_| {
        PkiError::InvalidRequest(format!("'{hostname}' is not a DNS name"))
    })?))
}

/// A CSR for `hostnames` (subject alternative names only, an empty subject, as ACME CAs want it)
/// signed with `key`; DER.
pub fn order_csr(hostnames: &[String], key: &PrivateKey) -> Result<Vec<u8>> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = hostnames
        .iter()
        .map(|h| dns_name(h))
        .collect::<Result<Vec<_>>>()?;
    let csr = params
        .serialize_request(key.key_pair())
        .map_err(|e| PkiError::Signing(e.to_string()))?;
    Ok(csr.der().to_vec())
}

/// The certificate answering a TLS-ALPN-01 challenge for `hostname`: self-signed, `hostname` its
/// only subject alternative name, and the critical acmeIdentifier extension
/// (1.3.6.1.5.5.7.1.31) holding the SHA-256 digest of `key_authorization`; a fresh P-256 key.
pub fn tls_alpn_certificate(
    hostname: &str,
    key_authorization: &str,
) -> Result<(Certificate, PrivateKey)> {
    let key = PrivateKey::generate(KeyType::EcP256)?;
    let digest =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key_authorization.as_bytes());
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![dns_name(hostname)?];
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest.as_ref())];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(7);
    let cert = params
        .self_signed(key.key_pair())
        .map_err(|e| PkiError::Signing(e.to_string()))?;
    Ok((Certificate::from_der(cert.der().to_vec())?, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    #[test]
    fn the_challenge_certificate_carries_the_digest_in_a_critical_acme_identifier() {
        let (cert, _) = tls_alpn_certificate("a.example.com", "token.thumbprint").unwrap();
        let (_, parsed) = X509Certificate::from_der(cert.der()).unwrap();
        let ext = parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .unwrap();
        assert!(ext.critical);
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"token.thumbprint");
        // An OCTET STRING of 32 bytes: 04 20 <digest>.
        assert_eq!(&ext.value[..2], &[0x04, 0x20]);
        assert_eq!(&ext.value[2..], digest.as_ref());
        let san = parsed.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::DNSName("a.example.com")]
        );
    }

    #[test]
    fn an_order_csr_names_only_the_hostnames() {
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let der = order_csr(&["a.example.com".into()], &key).unwrap();
        let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
        assert_eq!(csr.certification_request_info.subject.iter().count(), 0);
        assert!(order_csr(&["ünï.example".into()], &key).is_err());
    }
}
