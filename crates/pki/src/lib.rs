//! Certificate handling for Portcullis: everything the `portcullis pki` commands do, as a library
//! that the gateway and the registry share.
//!
//! The crate does no I/O beyond what its callers hand it as bytes: no files, no network, no
//! database, no async. Callers read files and pass their contents in; everything comes back as
//! values or bytes to write.
//!
//! How the modules fit:
//!
//! - [`pem`] splits PEM or DER input into typed blocks, remembering the line each starts on, so
//!   that every other module can say exactly where an input is broken.
//! - [`key`] generates private keys and reads them as openssl writes them (PKCS#8, PKCS#1, SEC1).
//! - [`cert`] parses certificates, CSRs and CRLs into plain views ([`cert::CertificateInfo`]…)
//!   that the CLI prints as text or JSON and the gateway logs.
//! - [`issue`] turns a [`issue::Profile`] (root CA, intermediate CA, client, server,
//!   verification) into certificates, from fresh keys or from CSRs.
//! - `outcome` holds what verification is asked and answers ([`VerifyOptions`],
//!   [`VerifyProfile`], [`Verdict`]) and the stable [`RejectReason`] with the [`TlsAlert`] each
//!   one sends; it depends on none of the modules that use it.
//! - [`verify`] builds and checks a chain against a [`truststore::Truststore`] on rustls-webpki;
//!   `legacy` and `profile_check` add what the compatible profile accepts and what RFC 5280
//!   asks beyond webpki.
//! - [`truststore`] parses a PEM bundle the way the gateway uses it and lints it.
//! - [`p12`], [`crl`] and [`pkcs7`] write PKCS#12 bundles, CRLs and certs-only PKCS#7 bundles;
//!   [`scep`] reads SCEP requests and writes their answers (CMS, on the `der` reader and writer).
//!
//! Every fallible function returns [`PkiError`], whose messages name the problem and the fix.
//!
//! Invariants: no I/O, no async; a reason code, once published, is never renamed; no import
//! cycles between modules (checked by `crates/cli/tests/cli/layout.rs`).
#![forbid(unsafe_code)]

pub mod acme;
pub mod cert;
pub mod crl;
mod der;
mod error;
pub mod issue;
pub mod key;
mod legacy;
mod name;
pub mod ocsp;
mod outcome;
pub mod p12;
pub mod pem;
pub mod pkcs7;
mod profile_check;
pub mod scep;
#[cfg(test)]
mod testcerts;
pub mod truststore;
pub mod verify;

pub use cert::{Certificate, CertificateInfo, NameAttributes};
pub use error::PkiError;
pub use issue::{CaIssuer, IssueRequest, Profile, RevocationUrls, SubjectAltName, SubjectName};
pub use key::{KeyType, PrivateKey};
pub use truststore::Truststore;
pub use verify::{RejectReason, TlsAlert, Usage, Verdict, VerifyOptions, VerifyProfile};

/// Result type of this crate.
pub type Result<T, E = PkiError> = std::result::Result<T, E>;

/// The friendly name a keychain shows for `cert`: its CN, else its subject.
pub(crate) fn name_for_alias(cert: &Certificate) -> String {
    cert.with_parsed(|c| name::attribute(c.subject(), "CN"))
        .ok()
        .flatten()
        .unwrap_or_else(|| cert.info().subject.clone())
}
