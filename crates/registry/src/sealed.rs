//! Secrets sealed under the cluster key: AES-256-GCM (aws-lc-rs), a random 96-bit nonce per
//! seal, and the record the secret belongs to as associated data, so a sealed value copied to
//! another record does not open.
//!
//! The key lives outside the database — a file each node reads (`cluster_key_file`) or the
//! `PORTCULLIS_CLUSTER_KEY` environment variable — so a copy of the database alone reveals no
//! private key. A sealed value reads `v1.<base64 of nonce ‖ ciphertext ‖ tag>`.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::RegistryError;

/// What a cluster key file starts with.
const FILE_PREFIX: &str = "portcullis-cluster-key-v1:";

/// What a sealed value starts with.
const SEALED_PREFIX: &str = "v1.";

/// Whether `value` is a sealed value (rather than one kept in clear).
pub(crate) fn is_sealed(value: &str) -> bool {
    value.starts_with(SEALED_PREFIX)
}

/// The cluster key: opens and seals the registry's private keys.
pub struct ClusterKey {
    key: LessSafeKey,
    /// HKDF-SHA256 of the key, for keys every node derives alike ([`ClusterKey::derive`]).
    prk: aws_lc_rs::hkdf::Prk,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(…)")
    }
}

fn invalid(message: impl Into<String>) -> RegistryError {
    RegistryError::Invalid(message.into())
}

impl ClusterKey {
    /// A new random key, as the text of a key file.
    pub fn generate() -> Result<String, RegistryError> {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes)
            .map_err(|_| invalid("the system random generator failed"))?;
        Ok(format!("{FILE_PREFIX}{}\n", STANDARD.encode(bytes)))
    }

    /// A key from a key file's text (as [`ClusterKey::generate`] writes it) or from 32 bytes
    /// written as 64 hex characters or base64.
    pub fn parse(text: &str) -> Result<ClusterKey, RegistryError> {
        let text = text.trim();
        let body = text.strip_prefix(FILE_PREFIX).unwrap_or(text);
        let bytes = if body.len() == 64 && body.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&body[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|_| invalid("the cluster key is not hex"))?
        } else {
            STANDARD.decode(body).map_err(|_| {
                invalid("the cluster key is neither 64 hex characters nor base64 (make one with `portcullis cluster-key generate --out FILE`)")
            })?
        };
        if bytes.len() != 32 {
            return Err(invalid(format!(
                "the cluster key holds {} bytes, not 32 (make one with `portcullis cluster-key generate --out FILE`)",
                bytes.len()
            )));
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| invalid("the cluster key cannot be used for AES-256-GCM"))?;
        let prk =
            aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, b"portcullis cluster key")
                .extract(&bytes);
        Ok(ClusterKey {
            key: LessSafeKey::new(key),
            prk,
        })
    }

    /// 32 bytes derived from the cluster key for `label` (HKDF-SHA256): the same on every
    /// node, independent of the sealing key and of every other label.
    pub fn derive(&self, label: &str) -> Result<[u8; 32], RegistryError> {
        let mut out = [0u8; 32];
        self.prk
            .expand(&[label.as_bytes()], aws_lc_rs::hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut out))
            .map_err(|_| invalid("deriving a key from the cluster key failed"))?;
        Ok(out)
    }

    /// Seals `plaintext` for the record named `context` (`server-certificate:NAME`…).
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Result<String, RegistryError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| invalid("the system random generator failed"))?;
        let mut in_out = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context.as_bytes()),
                &mut in_out,
            )
            .map_err(|_| invalid("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&in_out);
        Ok(format!("{SEALED_PREFIX}{}", STANDARD.encode(out)))
    }

    /// Opens a value sealed for `context`; an error when this is not the key it was sealed with,
    /// the value was changed, or it belongs to another record.
    pub fn open(&self, sealed: &str, context: &str) -> Result<Vec<u8>, RegistryError> {
        let wrong = || {
            invalid(format!(
                "{context}: the sealed secret does not open with this cluster key (another cluster's key, or a changed value): give this node the cluster_key_file the other nodes use"
            ))
        };
        let body = sealed.strip_prefix(SEALED_PREFIX).ok_or_else(wrong)?;
        let bytes = STANDARD.decode(body).map_err(|_| wrong())?;
        if bytes.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(wrong());
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| wrong())?;
        let mut in_out = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut in_out)
            .map_err(|_| wrong())?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_record() {
        let text = ClusterKey::generate().unwrap();
        assert!(text.starts_with(FILE_PREFIX));
        let key = ClusterKey::parse(&text).unwrap();
        let sealed = key
            .seal(b"-----BEGIN PRIVATE KEY-----", "server-certificate:a")
            .unwrap();
        assert!(!sealed.contains("PRIVATE"));
        assert_ne!(
            sealed,
            key.seal(b"-----BEGIN PRIVATE KEY-----", "server-certificate:a")
                .unwrap(),
            "a fresh nonce each time"
        );
        assert_eq!(
            key.open(&sealed, "server-certificate:a").unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        // Another record, another key, a flipped byte: refused, with the record named.
        let err = key.open(&sealed, "server-certificate:b").unwrap_err();
        assert!(err.to_string().contains("server-certificate:b"), "{err}");
        let other = ClusterKey::parse(&ClusterKey::generate().unwrap()).unwrap();
        assert!(other.open(&sealed, "server-certificate:a").is_err());
        let mut bytes = STANDARD.decode(&sealed[3..]).unwrap();
        bytes[20] ^= 1;
        let tampered = format!("v1.{}", STANDARD.encode(bytes));
        assert!(key.open(&tampered, "server-certificate:a").is_err());
        assert!(key.open("v1.", "x").is_err() && key.open("junk", "x").is_err());
        // Hex keys work too; wrong lengths say how to make a key.
        assert!(ClusterKey::parse(&"ab".repeat(32)).is_ok());
        let short = ClusterKey::parse("abcd").unwrap_err().to_string();
        assert!(short.contains("cluster-key generate"), "{short}");
    }
}
