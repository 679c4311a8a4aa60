//! The crate's one error type.

/// Everything that can go wrong while handling keys and certificates.
///
/// Messages are one line, lower-case, and say what to do where that is not obvious. They never
/// name a file: the caller knows which file it read and adds that as context.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The input is not valid PEM, base64 or DER; `at` says where when known.
    #[error("{at}{detail}")]
    Malformed {
        /// Where the problem is ("line 12: ", "certificate #2: ") or empty.
        at: String,
        /// What is wrong.
        detail: String,
    },
    /// The input holds nothing of the expected kind.
    #[error("no {expected} found (expected PEM with '-----BEGIN {label}-----' or DER)")]
    NotFound {
        /// What was looked for, for people ("certificate").
        expected: &'static str,
        /// The PEM label that was looked for.
        label: &'static str,
    },
    /// The private key is encrypted; Portcullis reads only plain keys.
    #[error(
        "private key is encrypted; write a plain copy with `openssl pkey -in KEY -out PLAIN.key` and keep it mode 0600"
    )]
    EncryptedKey,
    /// The key type or size is not supported, or too weak to use.
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    /// The private key does not belong to the certificate it was given with.
    #[error("private key does not match the certificate's public key")]
    KeyMismatch,
    /// The certificate given as issuer cannot issue certificates.
    #[error("issuer certificate '{subject}' is not a CA: {why}")]
    IssuerNotCa {
        /// The issuer's subject.
        subject: String,
        /// Why it cannot issue.
        why: String,
    },
    /// A request is invalid (zero days, a bad SAN, an unsupported subject…).
    #[error("{0}")]
    InvalidRequest(String),
    /// The CSR's self-signature does not verify: it was altered or not made with its key.
    #[error("CSR signature does not verify: the request was altered or not signed by its own key")]
    BadCsrSignature,
    /// Building or signing a certificate, CRL or PKCS#12 failed.
    #[error("signing failed: {0}")]
    Signing(String),
}

impl PkiError {
    pub(crate) fn malformed(at: impl Into<String>, detail: impl Into<String>) -> Self {
        PkiError::Malformed {
            at: at.into(),
            detail: detail.into(),
        }
    }
}
