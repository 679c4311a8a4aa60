//! Truststores: a PEM bundle of CA certificates, parsed and linted the way the gateway uses it.
//!
//! Semantics (as API Gateway's): self-issued certificates in the bundle are trust anchors (roots,
//! and partners' self-signed certificates trusted as themselves); every other certificate is an
//! intermediate that chains may use, so the bundle may hold the whole chain for clients that
//! send only their leaf. Problems are warnings, never errors, unless nothing usable remains.

use std::collections::{HashMap, HashSet};
use std::fmt;

use rustls_pki_types::TrustAnchor;
use serde::Serialize;

use crate::cert::Certificate;
use crate::{PkiError, Result};

pub use crate::outcome::DEFAULT_MAX_DEPTH;

/// Largest total size of CA names in a CertificateRequest before clients start failing.
pub const MAX_ADVERTISED_NAMES_BYTES: usize = 16 * 1024;

/// A parsed truststore.
#[derive(Debug, Clone)]
pub struct Truststore {
    entries: Vec<Entry>,
    store_warnings: Vec<Warning>,
    /// Usable anchors by subject name (DER): a chain's issuer names pick their candidate
    /// anchors in constant time, whatever the size of the store.
    anchors_by_subject: HashMap<Vec<u8>, Vec<usize>>,
    /// Usable intermediates (indexes into `entries`).
    intermediate_idx: Vec<usize>,
    /// Every entry by the first 64 bits of its SHA-256: a presented certificate byte-identical
    /// to one of them (pinned, under the compatible profile) is found without a scan.
    by_digest: HashMap<u64, Vec<usize>>,
}

/// One certificate of a truststore and what lint found about it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The certificate.
    pub certificate: Certificate,
    /// Its position in the file (1-based).
    pub index: usize,
    /// True when it is a trust anchor (self-issued).
    pub anchor: bool,
    /// CA levels from its root down to it (1 for a root), if its chain is complete.
    pub depth: Option<usize>,
    /// Warnings about it.
    pub warnings: Vec<Warning>,
    /// True when it was a duplicate and is not used.
    pub duplicate: bool,
    trust_anchor: Option<TrustAnchor<'static>>,
}

/// A lint finding.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Warning {
    /// Stable code (`not-ca`, `expired`, `not-yet-valid`, `weak-key`, `weak-signature`,
    /// `duplicate`, `incomplete-chain`, `too-deep`, `names-too-large`, `compatible-only`,
    /// `pinned-compatible-only`, `unusable`).
    pub code: &'static str,
    /// What is wrong and what it means for clients.
    pub message: String,
}

impl Entry {
    /// A self-signed end-entity certificate (v3 without CA:TRUE): a partner's own certificate,
    /// trusted as itself (pinned), which issues nothing.
    pub fn pinned_leaf(&self) -> bool {
        let info = self.certificate.info();
        self.anchor && info.version == 3 && !info.is_ca()
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl Truststore {
    /// Parses and lints a PEM bundle (or one DER certificate) as of now.
    pub fn from_pem(input: &[u8]) -> Result<Self> {
        Truststore::from_pem_at(input, time::OffsetDateTime::now_utc().unix_timestamp())
    }

    /// Parses and lints a bundle as of `now` (seconds since the epoch).
    pub fn from_pem_at(input: &[u8], now: i64) -> Result<Self> {
        let certs = Certificate::all_from_pem_or_der(input)?;
        if certs.is_empty() {
            return Err(PkiError::NotFound {
                expected: "certificate",
                label: "CERTIFICATE",
            });
        }
        let store = Truststore::from_certificates_at(certs, now);
        if store.anchors().is_empty() {
            return Err(PkiError::InvalidRequest(
                "no usable trust anchor: the bundle has no self-signed (root) certificate; add the root of each chain"
                    .into(),
            ));
        }
        Ok(store)
    }

    /// Builds and lints a truststore from certificates already parsed.
    pub fn from_certificates_at(certs: Vec<Certificate>, now: i64) -> Self {
        let mut seen = HashSet::new();
        let mut entries: Vec<Entry> = certs
            .into_iter()
            .enumerate()
            .map(|(i, certificate)| {
                let duplicate = !seen.insert(certificate.info().id.clone());
                let anchor = certificate.info().self_issued;
                let trust_anchor = anchor
                    .then(|| webpki::anchor_from_trusted_cert(certificate.der()).ok())
                    .flatten()
                    .map(|t| t.to_owned());
                Entry {
                    anchor,
                    trust_anchor,
                    certificate,
                    index: i + 1,
                    depth: None,
                    warnings: Vec::new(),
                    duplicate,
                }
            })
            .collect();
        compute_depths(&mut entries);
        let issuers: HashSet<Vec<u8>> = entries
            .iter()
            .filter(|e| !e.certificate.info().self_issued)
            .map(|e| e.certificate.info().issuer_der.clone())
            .collect();
        for entry in &mut entries {
            lint(entry, now);
            let issues_others = issuers.contains(&entry.certificate.info().subject_der);
            if !entry.duplicate
                && let Some((code, message)) = pinned_finding(entry, issues_others)
            {
                entry.warnings.push(Warning { code, message });
            }
        }
        let names: usize = entries
            .iter()
            .filter(|e| !e.duplicate)
            .map(|e| e.certificate.info().subject_der.len() + 2)
            .sum();
        let mut store_warnings = Vec::new();
        if names > MAX_ADVERTISED_NAMES_BYTES {
            store_warnings.push(Warning {
                code: "names-too-large",
                message: format!(
                    "the CA names take {names} bytes, over the {MAX_ADVERTISED_NAMES_BYTES} that clients accept in a CertificateRequest; turn off advertise_ca_names for this domain"
                ),
            });
        }
        let mut anchors_by_subject: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
        let mut intermediate_idx = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if e.duplicate {
                continue;
            }
            if e.trust_anchor.is_some() {
                anchors_by_subject
                    .entry(e.certificate.info().subject_der.clone())
                    .or_default()
                    .push(i);
            } else if !e.anchor {
                intermediate_idx.push(i);
            }
        }
        let mut by_digest: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            by_digest
                .entry(digest_key(&e.certificate))
                .or_default()
                .push(i);
        }
        Truststore {
            entries,
            store_warnings,
            anchors_by_subject,
            intermediate_idx,
            by_digest,
        }
    }

    /// Whether `cert` is byte for byte one of this store's certificates: a hash lookup, whatever
    /// the size of the store.
    pub fn contains(&self, cert: &Certificate) -> bool {
        self.by_digest.get(&digest_key(cert)).is_some_and(|found| {
            found
                .iter()
                .any(|&i| self.entries[i].certificate.der() == cert.der())
        })
    }

    /// A truststore in which every certificate is a trust anchor, self-signed or not: the
    /// registry's registered CAs (`registry:cas`), trusted as registered, as IoT Core trusts a
    /// registered intermediate. May be empty: then nothing is trusted.
    pub fn of_anchors_at(certs: Vec<Certificate>, now: i64) -> Self {
        let mut store = Truststore::from_certificates_at(certs, now);
        store.anchors_by_subject.clear();
        store.intermediate_idx.clear();
        for (i, e) in store.entries.iter_mut().enumerate() {
            e.anchor = true;
            if e.trust_anchor.is_none() {
                e.trust_anchor = webpki::anchor_from_trusted_cert(e.certificate.der())
                    .ok()
                    .map(|t| t.to_owned());
            }
            if !e.duplicate && e.trust_anchor.is_some() {
                store
                    .anchors_by_subject
                    .entry(e.certificate.info().subject_der.clone())
                    .or_default()
                    .push(i);
            }
        }
        store
    }

    /// The usable anchors that may have issued a certificate named `issuer` (DER name), with
    /// their webpki form.
    pub(crate) fn anchors_named(
        &self,
        issuer: &[u8],
    ) -> impl Iterator<Item = (&TrustAnchor<'static>, &Certificate)> {
        self.anchors_by_subject
            .get(issuer)
            .into_iter()
            .flatten()
            .filter_map(|&i| {
                let e = &self.entries[i];
                e.trust_anchor.as_ref().map(|t| (t, &e.certificate))
            })
    }

    /// Every certificate with its findings, in file order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Findings about the bundle as a whole.
    pub fn store_warnings(&self) -> &[Warning] {
        &self.store_warnings
    }

    /// Number of warnings in all.
    pub fn warning_count(&self) -> usize {
        self.store_warnings.len() + self.entries.iter().map(|e| e.warnings.len()).sum::<usize>()
    }

    /// The trust anchors (self-issued certificates, duplicates removed).
    pub fn anchors(&self) -> Vec<&Certificate> {
        self.usable()
            .filter(|e| e.anchor)
            .map(|e| &e.certificate)
            .collect()
    }

    /// The intermediates chains may use (certificates that are not self-issued).
    pub fn intermediates(&self) -> Vec<&Certificate> {
        self.intermediate_idx
            .iter()
            .map(|&i| &self.entries[i].certificate)
            .collect()
    }

    fn usable(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| !e.duplicate)
    }
}

fn lint(entry: &mut Entry, now: i64) {
    let info = entry.certificate.info().clone();
    let finding = profile_finding(entry);
    let mut warn =
        |code: &'static str, message: String| entry.warnings.push(Warning { code, message });
    if entry.duplicate {
        warn(
            "duplicate",
            "appears earlier in the bundle; this copy is ignored".into(),
        );
        return;
    }
    if info.version != 1 && !info.is_ca() && !info.self_issued {
        warn(
            "not-ca",
            "is not a CA and not self-signed, so it can neither anchor nor extend a chain".into(),
        );
    } else if let Some((code, message)) = finding {
        warn(code, message);
    }
    if info.not_after_unix() < now {
        warn(
            "expired",
            format!(
                "expired at {}; chains through it are rejected",
                info.not_after
            ),
        );
    } else if info.not_before_unix() > now {
        warn(
            "not-yet-valid",
            format!("is not valid before {}", info.not_before),
        );
    }
    if info.public_key.is_weak() {
        warn(
            "weak-key",
            format!(
                "{} is below the minimum (RSA 2048, ECDSA P-256)",
                info.public_key
            ),
        );
    }
    let sig = info.signature_algorithm.to_ascii_lowercase();
    if sig.contains("sha1") || sig.contains("md5") || sig.contains("md2") {
        warn(
            "weak-signature",
            format!(
                "is signed with {}; use SHA-256 or stronger",
                info.signature_algorithm
            ),
        );
    }
    if !info.self_issued && entry.depth.is_none() {
        warn(
            "incomplete-chain",
            format!(
                "its issuer '{}' is not in the bundle, so chains through it cannot reach a root; add the issuer",
                info.issuer
            ),
        );
    }
    if let Some(depth) = entry.depth
        && depth > usize::from(DEFAULT_MAX_DEPTH)
    {
        warn(
            "too-deep",
            format!(
                "sits {depth} CA levels below its root, deeper than the {DEFAULT_MAX_DEPTH} levels allowed"
            ),
        );
    }
}

/// What the verification profiles say of an entry as an issuer (anchor or intermediate), by
/// the same checks `verify` runs on a path: accepted by both (nothing to say), by the
/// compatible profile only (an accommodation, named), or by neither.
fn profile_finding(entry: &Entry) -> Option<(&'static str, String)> {
    use crate::outcome::{Usage, VerifyProfile};
    use crate::profile_check::{Role, check};
    let cert = &entry.certificate;
    let info = cert.info();
    if entry.pinned_leaf() {
        return None;
    }
    if info.version == 1 && !info.self_issued {
        return Some((
            "unusable",
            "is an X.509 v1 certificate and not self-signed: it cannot say CA:FALSE, so no profile lets it issue (reissue it as v3 with basicConstraints CA:TRUE)".into(),
        ));
    }
    let role = if entry.anchor {
        Role::Root
    } else {
        Role::Intermediate
    };
    let compatible = check(cert, role, Usage::Client, VerifyProfile::Compatible);
    let strict = check(cert, role, Usage::Client, VerifyProfile::Strict);
    match (compatible, strict) {
        (Ok(()), Ok(())) => None,
        (Ok(()), Err((_, why))) => Some((
            "compatible-only",
            format!(
                "only the compatible verification profile (the default) accepts it as a CA; the strict profile refuses it: it {why}"
            ),
        )),
        (Err((_, why)), _) => Some((
            "unusable",
            format!("no verification profile accepts it as a CA: it {why}"),
        )),
    }
}

/// A self-signed CA certificate that issues nothing else in the bundle may be a partner's own
/// certificate, pinned: presented itself, only the compatible profile accepts it.
fn pinned_finding(entry: &Entry, issues_others: bool) -> Option<(&'static str, String)> {
    let info = entry.certificate.info();
    (entry.anchor && !issues_others && (info.is_ca() || info.version == 1)).then(|| {
        (
            "pinned-compatible-only",
            format!(
                "is a self-signed {} certificate that issues nothing in this bundle: if a client presents it itself (a pinned partner certificate), only the compatible verification profile (the default) accepts it",
                if info.version == 1 { "X.509 v1" } else { "CA:TRUE" }
            ),
        )
    })
}

/// Depth of each entry from a root, following issuer names within the bundle.
fn compute_depths(entries: &mut [Entry]) {
    let raw: Vec<(Vec<u8>, Vec<u8>)> = entries
        .iter()
        .map(|e| {
            e.certificate
                .with_parsed(|c| (c.subject().as_raw().to_vec(), c.issuer().as_raw().to_vec()))
                .unwrap_or_default()
        })
        .collect();
    for (i, entry) in entries.iter_mut().enumerate() {
        // Walk up at most 16 links; a loop or a missing issuer leaves the depth unknown.
        let mut current = i;
        let mut depth = 1;
        let mut found = false;
        for _ in 0..16 {
            if raw[current].0 == raw[current].1 {
                found = true;
                break;
            }
            match raw
                .iter()
                .position(|(subject, _)| *subject == raw[current].1)
            {
                Some(parent) => {
                    current = parent;
                    depth += 1;
                }
                None => break,
            }
        }
        entry.depth = found.then_some(depth);
    }
}

/// The first 64 bits of a certificate's SHA-256 (its id is the digest in hex): the key of
/// [`Truststore::contains`]'s index, the DER compared on a match.
fn digest_key(cert: &Certificate) -> u64 {
    cert.info()
        .id
        .get(..16)
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::{CaIssuer, IssueRequest, Profile, SubjectName, issue};
    use crate::key::{KeyType, PrivateKey};

    fn ca(name: &str, parent: Option<&CaIssuer>) -> CaIssuer {
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let profile = if parent.is_some() {
            Profile::IntermediateCa
        } else {
            Profile::RootCa
        };
        let cert = issue(
            &IssueRequest::new(profile, SubjectName::cn(name)),
            &key,
            parent,
        )
        .unwrap();
        CaIssuer::new(cert, key, Vec::new()).unwrap()
    }

    fn pem(cas: &[&CaIssuer]) -> String {
        cas.iter().map(|c| c.certificate().to_pem()).collect()
    }

    #[test]
    fn hierarchy_deeper_than_four_levels_is_flagged() {
        let root = ca("root", None);
        let i1 = ca("i1", Some(&root));
        let i2 = ca("i2", Some(&i1));
        let i3 = ca("i3", Some(&i2));
        let i4 = ca("i4", Some(&i3));
        let store = Truststore::from_pem(pem(&[&root, &i1, &i2, &i3, &i4]).as_bytes()).unwrap();
        let depths: Vec<_> = store.entries().iter().map(|e| e.depth).collect();
        assert_eq!(depths, vec![Some(1), Some(2), Some(3), Some(4), Some(5)]);
        assert!(store.entries()[3].warnings.is_empty());
        assert_eq!(store.entries()[4].warnings[0].code, "too-deep");
    }

    #[test]
    fn expiry_is_judged_at_the_given_time() {
        let root = ca("root", None);
        let later = root.certificate().info().not_after_unix() + 1;
        let store = Truststore::from_pem_at(pem(&[&root]).as_bytes(), later).unwrap();
        assert_eq!(store.entries()[0].warnings[0].code, "expired");
        let earlier = root.certificate().info().not_before_unix() - 1;
        let store = Truststore::from_pem_at(pem(&[&root]).as_bytes(), earlier).unwrap();
        assert_eq!(store.entries()[0].warnings[0].code, "not-yet-valid");
    }

    #[test]
    fn too_many_ca_names_to_advertise_is_flagged() {
        let roots: Vec<CaIssuer> = (0..300)
            .map(|i| {
                ca(
                    &format!("A fairly long root CA name for advertising number {i:04}"),
                    None,
                )
            })
            .collect();
        let refs: Vec<&CaIssuer> = roots.iter().collect();
        let store = Truststore::from_pem(pem(&refs).as_bytes()).unwrap();
        assert_eq!(store.store_warnings()[0].code, "names-too-large");
        let few = Truststore::from_pem(pem(&refs[..10]).as_bytes()).unwrap();
        assert!(few.store_warnings().is_empty());
    }

    #[test]
    fn contains_finds_exactly_the_stores_certificates() {
        let root = ca("root", None);
        let i1 = ca("i1", Some(&root));
        let store = Truststore::from_pem(pem(&[&root, &i1]).as_bytes()).unwrap();
        assert!(store.contains(root.certificate()));
        assert!(store.contains(i1.certificate()));
        // Same name, another key: a different certificate.
        let other = ca("root", None);
        assert!(!store.contains(other.certificate()));
        // Kept by a store of anchors built from the same certificates.
        let anchors = Truststore::of_anchors_at(vec![i1.certificate().clone()], 0);
        assert!(anchors.contains(i1.certificate()));
        assert!(!anchors.contains(root.certificate()));
    }

    #[test]
    fn only_intermediates_is_not_usable() {
        let root = ca("root", None);
        let i1 = ca("i1", Some(&root));
        let err = Truststore::from_pem(pem(&[&i1]).as_bytes()).unwrap_err();
        assert!(err.to_string().contains("no usable trust anchor"), "{err}");
    }
}
