//! Private keys: generation, and reading them as openssl writes them.
//!
//! Keys are read as PKCS#8, PKCS#1 (RSA) or SEC1 (EC), PEM or DER, and always held and written
//! as PKCS#8, so a key read in one form is written back in the one form every tool accepts.

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::encoding::AsDer;
use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::pem::{self, Label};
use crate::{PkiError, Result};

/// The key types Portcullis generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyType {
    /// ECDSA on P-256 (the default: small, fast, universally supported).
    #[default]
    EcP256,
    /// ECDSA on P-384.
    EcP384,
    /// Ed25519 (not accepted by browsers for TLS client authentication).
    Ed25519,
    /// RSA, 2048 bits.
    Rsa2048,
    /// RSA, 3072 bits.
    Rsa3072,
    /// RSA, 4096 bits.
    Rsa4096,
}

impl KeyType {
    /// Every key type, in the order the CLI lists them.
    pub const ALL: [KeyType; 6] = [
        KeyType::EcP256,
        KeyType::EcP384,
        KeyType::Ed25519,
        KeyType::Rsa2048,
        KeyType::Rsa3072,
        KeyType::Rsa4096,
    ];

    /// The name used on the command line (`ec-p256`…).
    pub fn name(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Ed25519 => "ed25519",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KeyType {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self> {
        KeyType::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                PkiError::InvalidRequest(format!(
                    "unknown key type '{s}'; use one of {}",
                    KeyType::ALL.map(KeyType::name).join(", ")
                ))
            })
    }
}

/// A private key, held as PKCS#8.
pub struct PrivateKey {
    pair: KeyPair,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("algorithm", &self.description())
            .finish_non_exhaustive()
    }
}

impl PrivateKey {
    /// Generates a fresh key of type `kind`.
    pub fn generate(kind: KeyType) -> Result<Self> {
        use rcgen::{
            PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PKCS_RSA_SHA256,
            RsaKeySize,
        };
        let pair = match kind {
            KeyType::EcP256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
            KeyType::EcP384 => KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384),
            KeyType::Ed25519 => KeyPair::generate_for(&PKCS_ED25519),
            KeyType::Rsa2048 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048),
            KeyType::Rsa3072 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_3072),
            KeyType::Rsa4096 => KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_4096),
        }
        .map_err(|e| PkiError::Signing(format!("generating a {kind} key: {e}")))?;
        Ok(PrivateKey { pair })
    }

    /// Reads a key from PEM (PKCS#8, PKCS#1 or SEC1) or DER.
    pub fn from_pem_or_der(input: &[u8]) -> Result<Self> {
        let blocks = pem::decode(input)?;
        let mut found = None;
        for block in blocks {
            match block.label {
                Label::EncryptedKey => return Err(PkiError::EncryptedKey),
                Label::Pkcs8Key => {
                    found = Some(PrivateKeyDer::Pkcs8(block.der.into()));
                    break;
                }
                Label::RsaKey => {
                    found = Some(PrivateKeyDer::Pkcs1(block.der.into()));
                    break;
                }
                Label::EcKey => {
                    found = Some(PrivateKeyDer::Sec1(block.der.into()));
                    break;
                }
                Label::Der => {
                    found = Some(PrivateKeyDer::try_from(block.der).map_err(|e| {
                        PkiError::malformed("", format!("not a DER private key ({e})"))
                    })?);
                    break;
                }
                _ => {}
            }
        }
        let Some(der) = found else {
            return Err(PkiError::NotFound {
                expected: "private key",
                label: "PRIVATE KEY",
            });
        };
        let pkcs8 = to_pkcs8(&der)?;
        let pair = KeyPair::try_from(&PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8)))
            .map_err(|_| {
                PkiError::UnsupportedKey(
                    "not an RSA, ECDSA (P-256, P-384, P-521) or Ed25519 key, or the key is corrupt"
                        .into(),
                )
            })?;
        Ok(PrivateKey { pair })
    }

    /// The key as a PKCS#8 PEM block.
    pub fn to_pem(&self) -> String {
        pem::encode("PRIVATE KEY", self.pkcs8_der())
    }

    /// The key as PKCS#8 DER.
    pub fn pkcs8_der(&self) -> &[u8] {
        self.pair.serialized_der()
    }

    /// Whether this is `cert`'s private key (the same public key).
    pub fn is_key_of(&self, cert: &crate::cert::Certificate) -> bool {
        cert.with_parsed(|c| c.public_key().subject_public_key.data.to_vec())
            .is_ok_and(|bits| bits == self.public_key_bits())
    }

    /// The subjectPublicKey bits, as a certificate carries them.
    pub fn public_key_bits(&self) -> &[u8] {
        self.pair.der_bytes()
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn public_key_info(&self) -> Vec<u8> {
        self.pair.subject_public_key_info()
    }

    /// A short description such as `EC P-256` or `RSA 2048`.
    pub fn description(&self) -> String {
        match crate::cert::KeyInfo::from_spki_der(&self.public_key_info()) {
            Some(info) => info.to_string(),
            None => "unknown".into(),
        }
    }

    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.pair
    }
}

/// Converts PKCS#1 and SEC1 keys to PKCS#8; PKCS#8 passes through.
fn to_pkcs8(der: &PrivateKeyDer<'_>) -> Result<Vec<u8>> {
    let corrupt = |what: &str| PkiError::malformed("", format!("{what} private key is corrupt"));
    match der {
        PrivateKeyDer::Pkcs8(k) => Ok(k.secret_pkcs8_der().to_vec()),
        PrivateKeyDer::Pkcs1(k) => {
            let pair = aws_lc_rs::rsa::KeyPair::from_der(k.secret_pkcs1_der())
                .map_err(|_| corrupt("RSA (PKCS#1)"))?;
            let pkcs8: aws_lc_rs::encoding::Pkcs8V1Der<'static> =
                pair.as_der().map_err(|_| corrupt("RSA (PKCS#1)"))?;
            Ok(pkcs8.as_ref().to_vec())
        }
        PrivateKeyDer::Sec1(k) => {
            use aws_lc_rs::signature::{
                ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING,
                ECDSA_P521_SHA512_ASN1_SIGNING, EcdsaKeyPair,
            };
            for alg in [
                &ECDSA_P256_SHA256_ASN1_SIGNING,
                &ECDSA_P384_SHA384_ASN1_SIGNING,
                &ECDSA_P521_SHA512_ASN1_SIGNING,
            ] {
                if let Ok(pair) = EcdsaKeyPair::from_private_key_der(alg, k.secret_sec1_der()) {
                    let doc = pair.to_pkcs8v1().map_err(|_| corrupt("EC (SEC1)"))?;
                    return Ok(doc.as_ref().to_vec());
                }
            }
            Err(PkiError::UnsupportedKey(
                "EC key is not on P-256, P-384 or P-521, or is corrupt".into(),
            ))
        }
        _ => Err(PkiError::UnsupportedKey(
            "unknown private key encoding".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_pem() {
        for kind in [
            KeyType::EcP256,
            KeyType::EcP384,
            KeyType::Ed25519,
            KeyType::Rsa2048,
        ] {
            let key = PrivateKey::generate(kind).unwrap();
            let again = PrivateKey::from_pem_or_der(key.to_pem().as_bytes()).unwrap();
            assert_eq!(key.public_key_bits(), again.public_key_bits(), "{kind}");
            let from_der = PrivateKey::from_pem_or_der(key.pkcs8_der()).unwrap();
            assert_eq!(key.public_key_bits(), from_der.public_key_bits(), "{kind}");
        }
    }

    #[test]
    fn key_type_names_parse() {
        for kind in KeyType::ALL {
            assert_eq!(kind.name().parse::<KeyType>().unwrap(), kind);
        }
        let err = "dsa".parse::<KeyType>().unwrap_err().to_string();
        assert!(err.contains("ec-p256"), "{err}");
    }

    #[test]
    fn non_key_input_is_refused() {
        let err = PrivateKey::from_pem_or_der(b"not a key").unwrap_err();
        assert!(matches!(err, PkiError::NotFound { .. }), "{err}");
    }
}
