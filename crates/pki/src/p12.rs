//! PKCS#12 bundles for keychains, browsers and MDM.

use p12_keystore::{EncryptionAlgorithm, KeyStore, KeyStoreEntry, MacAlgorithm, PrivateKeyChain};

use crate::cert::Certificate;
use crate::key::PrivateKey;
use crate::{PkiError, Result};

/// Which encryption a PKCS#12 file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum P12Format {
    /// PBES2 with PBKDF2-HMAC-SHA256 and AES-256-CBC, HMAC-SHA256 MAC (OpenSSL 3's default).
    #[default]
    Modern,
    /// PBE-SHA1-3DES with an HMAC-SHA1 MAC, for macOS before 14 and Windows 7.
    Legacy,
}

/// Bundles `cert`, its `key` and `chain` (intermediates, and the root if wanted) into a
/// password-protected PKCS#12 file. The key must belong to the certificate.
pub fn export(
    cert: &Certificate,
    key: &PrivateKey,
    chain: &[Certificate],
    password: &str,
    format: P12Format,
) -> Result<Vec<u8>> {
    if password.is_empty() {
        return Err(PkiError::InvalidRequest(
            "the PKCS#12 password is empty; keychains refuse unprotected bundles".into(),
        ));
    }
    let cert_bits = cert.with_parsed(|c| c.public_key().subject_public_key.data.to_vec())?;
    if cert_bits != key.public_key_bits() {
        return Err(PkiError::KeyMismatch);
    }
    let to_p12 = |c: &Certificate| {
        p12_keystore::Certificate::from_der(c.der()).map_err(|e| {
            PkiError::Signing(format!("PKCS#12 cannot hold '{}': {e}", c.info().subject))
        })
    };
    let mut certs = vec![to_p12(cert)?];
    for c in chain {
        certs.push(to_p12(c)?);
    }
    let local_key_id = &crate::cert::sha256(cert.der())[..20];
    let mut store = KeyStore::new();
    let alias = crate::name_for_alias(cert);
    store.add_entry(
        &alias,
        KeyStoreEntry::PrivateKeyChain(PrivateKeyChain::new(key.pkcs8_der(), local_key_id, certs)),
    );
    let writer = store.writer(password);
    let writer = match format {
        P12Format::Modern => writer
            .encryption_algorithm(EncryptionAlgorithm::PbeWithHmacSha256AndAes256)
            .mac_algorithm(MacAlgorithm::HmacSha256),
        P12Format::Legacy => writer
            .encryption_algorithm(EncryptionAlgorithm::PbeWithShaAnd3KeyTripleDesCbc)
            .mac_algorithm(MacAlgorithm::HmacSha1)
            .encryption_iterations(2048)
            .mac_iterations(2048),
    };
    writer
        .write()
        .map_err(|e| PkiError::Signing(format!("writing PKCS#12: {e}")))
}
