//! Chain verification with precise, stable rejection reasons.
//!
//! Path building and signature checks are rustls-webpki's (the verifier rustls itself uses);
//! this module adds what a gateway needs on top: a maximum CA depth, expiry of the root itself,
//! CRL checks through the whole chain, a clientAuth/serverAuth EKU that must be present, and one
//! [`RejectReason`] per failure whose code is reused in TLS alerts, HTTP bodies, logs and
//! metrics.

use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use webpki::{
    EndEntityCert, Error as WebpkiError, ExpirationPolicy, KeyUsage, RevocationCheckDepth,
    RevocationOptionsBuilder, UnknownStatusPolicy, VerifiedPath,
};

use crate::cert::{Certificate, rfc3339};
use crate::crl::Crl;
use crate::profile_check::{self, Role};
use crate::truststore::Truststore;

pub use crate::outcome::{RejectReason, TlsAlert, Usage, Verdict, VerifyOptions, VerifyProfile};

/// Verifies `leaf` (with the chain the peer `presented`, leaf excluded) against `store`.
pub fn verify(
    leaf: &Certificate,
    presented: &[Certificate],
    store: &Truststore,
    opts: &VerifyOptions,
) -> Verdict {
    let info = leaf.info();
    let now = opts
        .at
        .unwrap_or_else(|| time::OffsetDateTime::now_utc().unix_timestamp());
    if info.public_key.is_weak() {
        return Verdict::reject(
            RejectReason::WeakKey,
            format!(
                "'{}' has a {} key; the minimum is RSA 2048 or ECDSA P-256",
                info.subject, info.public_key
            ),
        );
    }
    if info.version == 2 {
        // Version 2 added only unique identifiers, which nothing uses; no CA issues it.
        return Verdict::reject(
            RejectReason::Malformed,
            format!(
                "'{}' is an X.509 v2 certificate; only v3 (and, with the compatible profile, v1) are accepted",
                info.subject
            ),
        );
    }
    if opts.profile == VerifyProfile::Compatible && store.contains(leaf) {
        return crate::legacy::verify_pinned(leaf, opts, now);
    }
    let Ok(ee) = EndEntityCert::try_from(leaf.der()) else {
        if info.version == 1 {
            return match opts.profile {
                VerifyProfile::Compatible => {
                    crate::legacy::verify_v1_leaf(leaf, presented, store, opts, now)
                }
                VerifyProfile::Strict => Verdict::reject(
                    RejectReason::Malformed,
                    format!(
                        "'{}' is an X.509 v1 certificate, which the strict profile refuses (the compatible profile accepts a v1 leaf issued by a trusted CA, or pinned in the truststore when self-signed)",
                        info.subject
                    ),
                ),
            };
        }
        return Verdict::reject(
            RejectReason::Malformed,
            format!("'{}' cannot be parsed for verification", info.subject),
        );
    };
    // Only the anchors whose subject is the issuer of a certificate that can be in the path: webpki
    // matches anchors to issuers by exact name, so nothing else could be chosen, and a large
    // truststore costs a hash lookup per handshake instead of a scan and a copy.
    let pool: Vec<&Certificate> = presented.iter().chain(store.intermediates()).collect();
    let mut candidates: Vec<(&TrustAnchor<'static>, &Certificate)> = Vec::new();
    for cert in std::iter::once(leaf).chain(pool.iter().copied()) {
        for found in store.anchors_named(&cert.info().issuer_der) {
            if !candidates.iter().any(|(_, c)| std::ptr::eq(*c, found.1)) {
                candidates.push(found);
            }
        }
    }
    let anchors: Vec<TrustAnchor<'_>> = candidates
        .iter()
        .map(|(t, _)| TrustAnchor {
            subject: t.subject.as_ref().into(),
            subject_public_key_info: t.subject_public_key_info.as_ref().into(),
            name_constraints: t.name_constraints.as_ref().map(|n| n.as_ref().into()),
        })
        .collect();
    let intermediates: Vec<CertificateDer<'_>> = pool
        .iter()
        .map(|c| CertificateDer::from(c.der().as_ref()))
        .collect();
    let anchor_certificate = |anchor: &TrustAnchor<'_>| -> Option<&Certificate> {
        candidates
            .iter()
            .find(|(t, _)| {
                t.subject.as_ref() == anchor.subject.as_ref()
                    && t.subject_public_key_info.as_ref() == anchor.subject_public_key_info.as_ref()
            })
            .map(|(_, c)| *c)
    };
    let crl_refs: Vec<_> = opts.crls.iter().map(Crl::webpki).collect();
    let revocation = RevocationOptionsBuilder::new(&crl_refs).ok().map(|b| {
        b.with_depth(RevocationCheckDepth::Chain)
            .with_status_policy(UnknownStatusPolicy::Allow)
            .with_expiration_policy(if opts.allow_stale_crls {
                ExpirationPolicy::Ignore
            } else {
                ExpirationPolicy::Enforce
            })
            .build()
    });
    let usage = match opts.usage {
        Usage::Client => KeyUsage::client_auth(),
        Usage::Server => KeyUsage::server_auth(),
    };
    let time = UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(now).unwrap_or(0)));
    let max_depth = usize::from(opts.max_depth.max(1));
    let path_check = |path: &VerifiedPath<'_>| -> Result<(), WebpkiError> {
        let levels = path.intermediate_certificates().count() + 1;
        if levels > max_depth {
            return Err(WebpkiError::MaximumPathDepthExceeded);
        }
        // webpki treats anchors as bare names and keys; a truststore entry that has expired
        // must stop trusting, as API Gateway's does.
        if let Some(cert) = anchor_certificate(path.anchor()) {
            let ai = cert.info();
            if ai.not_after_unix() < now {
                return Err(WebpkiError::CertExpired {
                    time,
                    not_after: UnixTime::since_unix_epoch(Duration::from_secs(
                        u64::try_from(ai.not_after_unix()).unwrap_or(0),
                    )),
                });
            }
            if ai.not_before_unix() > now {
                return Err(WebpkiError::CertNotValidYet {
                    time,
                    not_before: UnixTime::since_unix_epoch(Duration::from_secs(
                        u64::try_from(ai.not_before_unix()).unwrap_or(0),
                    )),
                });
            }
        }
        Ok(())
    };
    let result = ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &intermediates,
        time,
        usage,
        revocation,
        Some(&path_check),
    );
    let path = match result {
        Ok(path) => path,
        Err(e) => return explain(e, leaf, presented, store, opts, now),
    };
    if opts.require_eku && info.extended_key_usage.is_empty() {
        let want = match opts.usage {
            Usage::Client => "clientAuth",
            Usage::Server => "serverAuth",
        };
        return Verdict::reject(
            RejectReason::WrongUsage,
            format!(
                "'{}' has no extended key usage; it must list {want}",
                info.subject
            ),
        );
    }
    if !info.key_usage.is_empty() && !info.key_usage.iter().any(|k| k == "digitalSignature") {
        return Verdict::reject(
            RejectReason::WrongUsage,
            format!(
                "'{}' has key usage {} without digitalSignature, so it cannot sign a TLS handshake",
                info.subject,
                info.key_usage.join(",")
            ),
        );
    }
    if let Some(name) = &opts.expected_name {
        let valid = ServerName::try_from(name.as_str())
            .map_err(|_| ())
            .and_then(|n| ee.verify_is_valid_for_subject_name(&n).map_err(|_| ()));
        if valid.is_err() {
            return Verdict::reject(
                RejectReason::NameMismatch,
                format!(
                    "'{}' is not valid for the name '{name}' (its names: {})",
                    info.subject,
                    if info.subject_alt_names.is_empty() {
                        "none".to_string()
                    } else {
                        info.subject_alt_names.join(", ")
                    }
                ),
            );
        }
    }
    let mut chain = vec![leaf.clone()];
    for der in path.intermediate_certificates().map(|c| c.der()) {
        if let Some(c) = pool.iter().find(|c| c.der().as_ref() == der.as_ref()) {
            chain.push((*c).clone());
        }
    }
    if let Some(c) = anchor_certificate(path.anchor())
        && c.der() != leaf.der()
    {
        chain.push(c.clone());
    }
    // RFC 5280 structure of every certificate of the path, the anchor included (unless the
    // anchor is the leaf itself: a partner's self-signed certificate trusted as itself).
    let last = chain.len() - 1;
    for (i, cert) in chain.iter().enumerate() {
        let role = match i {
            0 => Role::Leaf,
            i if i == last => Role::Root,
            _ => Role::Intermediate,
        };
        if let Err((reason, why)) = profile_check::check(cert, role, opts.usage, opts.profile) {
            let who = if i == 0 {
                format!("'{}'", cert.info().subject)
            } else {
                format!("issuer '{}' of '{}'", cert.info().subject, info.subject)
            };
            return Verdict::reject(reason, format!("{who} {why}"));
        }
    }
    // A CRL counts only if its issuer may sign CRLs.
    for crl in &opts.crls {
        if let Some(ca) = chain[1..]
            .iter()
            .find(|c| c.info().subject == crl.info().issuer)
            && !ca.info().key_usage.is_empty()
            && !ca.info().key_usage.iter().any(|k| k == "cRLSign")
        {
            return Verdict::reject(
                RejectReason::CrlInvalid,
                format!(
                    "a CRL for the chain of '{}' is signed by '{}', whose key usage lacks cRLSign",
                    info.subject,
                    ca.info().subject
                ),
            );
        }
    }
    Verdict::Valid { chain }
}

/// A v1 certificate (not a trusted self-signed root) that issued a certificate of the presented
/// chain: webpki cannot parse it, so the path stops there.
fn v1_issuer<'a>(
    leaf: &Certificate,
    presented: &'a [Certificate],
    store: &'a Truststore,
) -> Option<&'a Certificate> {
    let pool: Vec<&Certificate> = presented.iter().chain(store.intermediates()).collect();
    let mut current = leaf;
    for _ in 0..8 {
        let issuer = pool.iter().find(|c| {
            c.info().subject_der == current.info().issuer_der && current.is_signed_by(c)
        })?;
        if issuer.info().version == 1 && !issuer.info().self_issued {
            return Some(issuer);
        }
        current = issuer;
    }
    None
}

/// A CA with a key too weak to trust whose name issues a certificate of the chain: its signature
/// fails (webpki has no algorithm for RSA below 2048 bits), and the key is the reason.
fn weak_issuer<'a>(
    leaf: &'a Certificate,
    presented: &'a [Certificate],
    store: &'a Truststore,
) -> Option<&'a Certificate> {
    let pool: Vec<&Certificate> = presented.iter().chain(store.intermediates()).collect();
    let issued: Vec<&Certificate> = std::iter::once(leaf).chain(pool.iter().copied()).collect();
    issued.iter().find_map(|cert| {
        let issuer = &cert.info().issuer_der;
        pool.iter()
            .copied()
            .filter(|c| &c.info().subject_der == issuer)
            .chain(store.anchors_named(issuer).map(|(_, c)| c))
            .find(|c| c.info().public_key.is_weak())
    })
}

/// Turns a webpki error into a reason and an explanation that names the certificate concerned.
fn explain(
    err: WebpkiError,
    leaf: &Certificate,
    presented: &[Certificate],
    store: &Truststore,
    opts: &VerifyOptions,
    now: i64,
) -> Verdict {
    use RejectReason as R;
    let info = leaf.info();
    let subject = &info.subject;
    // Which certificate of those we know is out of its validity period, for the message.
    let candidates: Vec<&Certificate> = std::iter::once(leaf)
        .chain(presented.iter())
        .chain(store.intermediates())
        .chain(store.anchors())
        .collect();
    let out_of_date = |expired: bool| {
        candidates
            .iter()
            .find(|c| {
                if expired {
                    c.info().not_after_unix() < now
                } else {
                    c.info().not_before_unix() > now
                }
            })
            .map(|c| c.info().clone())
    };
    let at = time::OffsetDateTime::from_unix_timestamp(now)
        .map(rfc3339)
        .unwrap_or_default();
    match err {
        WebpkiError::CertExpired { .. } => match out_of_date(true) {
            Some(c) if c.subject == *subject => Verdict::reject(
                R::Expired,
                format!("'{subject}' expired at {} (checked at {at})", c.not_after),
            ),
            Some(c) => Verdict::reject(
                R::Expired,
                format!(
                    "issuer '{}' of '{subject}' expired at {} (checked at {at})",
                    c.subject, c.not_after
                ),
            ),
            None => Verdict::reject(
                R::Expired,
                format!("a certificate in the chain of '{subject}' has expired"),
            ),
        },
        WebpkiError::CertNotValidYet { .. } => match out_of_date(false) {
            Some(c) if c.subject == *subject => Verdict::reject(
                R::NotYetValid,
                format!(
                    "'{subject}' is not valid before {} (checked at {at})",
                    c.not_before
                ),
            ),
            Some(c) => Verdict::reject(
                R::NotYetValid,
                format!(
                    "issuer '{}' of '{subject}' is not valid before {} (checked at {at})",
                    c.subject, c.not_before
                ),
            ),
            None => Verdict::reject(
                R::NotYetValid,
                format!("a certificate in the chain of '{subject}' is not yet valid"),
            ),
        },
        WebpkiError::UnknownIssuer
        | WebpkiError::CertDistrusted
        | WebpkiError::UnsupportedCertVersion
            if v1_issuer(leaf, presented, store).is_some() =>
        {
            let issuer = v1_issuer(leaf, presented, store)
                .map(|c| c.info().subject.clone())
                .unwrap_or_default();
            Verdict::reject(
                R::V1Intermediate,
                format!(
                    "the chain of '{subject}' goes through '{issuer}', an X.509 v1 certificate, which cannot be a CA: it cannot say CA:FALSE, so no profile lets it issue (reissue it as v3 with basicConstraints CA:TRUE, or put it in the truststore if it is a self-signed root)"
                ),
            )
        }
        WebpkiError::UnknownIssuer | WebpkiError::CertDistrusted => Verdict::reject(
            R::UntrustedIssuer,
            format!(
                "no chain from '{subject}' to a trusted root: its issuer '{}' is neither in the truststore nor presented",
                info.issuer
            ),
        ),
        WebpkiError::InvalidSignatureForPublicKey
        | WebpkiError::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
            if weak_issuer(leaf, presented, store).is_some() =>
        {
            let weak = weak_issuer(leaf, presented, store)
                .map(|c| (c.info().subject.clone(), c.info().public_key.to_string()))
                .unwrap_or_default();
            Verdict::reject(
                R::WeakKey,
                format!(
                    "the chain of '{subject}' goes through '{}', whose {} key is too weak to trust; the minimum is RSA 2048 or ECDSA P-256 (reissue the CA with a stronger key)",
                    weak.0, weak.1
                ),
            )
        }
        WebpkiError::InvalidSignatureForPublicKey => Verdict::reject(
            R::BadSignature,
            format!(
                "a signature in the chain of '{subject}' does not verify with its issuer's key"
            ),
        ),
        WebpkiError::UnsupportedSignatureAlgorithmContext(_)
        | WebpkiError::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | WebpkiError::SignatureAlgorithmMismatch => Verdict::reject(
            R::UnsupportedAlgorithm,
            format!(
                "the chain of '{subject}' uses an insecure or unsupported signature algorithm ('{subject}' is signed with {}); SHA-256 or stronger with RSA, ECDSA or Ed25519 is required",
                info.signature_algorithm
            ),
        ),
        WebpkiError::RequiredEkuNotFoundContext(_) => {
            let want = match opts.usage {
                Usage::Client => "clientAuth",
                Usage::Server => "serverAuth",
            };
            Verdict::reject(
                R::WrongUsage,
                format!(
                    "'{subject}' is not for {want}: its extended key usage is {}",
                    info.extended_key_usage.join(",")
                ),
            )
        }
        WebpkiError::CaUsedAsEndEntity => Verdict::reject(
            R::WrongUsage,
            format!(
                "'{subject}' is a CA certificate and cannot be used as a client or server certificate"
            ),
        ),
        WebpkiError::EndEntityUsedAsCa => Verdict::reject(
            R::WrongUsage,
            format!("the chain of '{subject}' uses a non-CA certificate as an issuer"),
        ),
        WebpkiError::EmptyEkuExtension => Verdict::reject(
            R::WrongUsage,
            format!("'{subject}' has an empty extended key usage extension"),
        ),
        WebpkiError::CertRevoked => {
            let revoked_leaf = opts.crls.iter().any(|crl| {
                crl.info().revoked.iter().any(|r| r.serial == info.serial)
                    && crl.info().issuer == info.issuer
            });
            if revoked_leaf {
                Verdict::reject(
                    R::Revoked,
                    format!(
                        "'{subject}' (serial {}) is revoked by a CRL of '{}'",
                        info.serial, info.issuer
                    ),
                )
            } else {
                Verdict::reject(
                    R::Revoked,
                    format!("an issuer of '{subject}' is revoked by a CRL"),
                )
            }
        }
        WebpkiError::MaximumPathDepthExceeded => Verdict::reject(
            R::ChainTooDeep,
            format!(
                "the chain of '{subject}' has more than {} CA levels",
                opts.max_depth
            ),
        ),
        WebpkiError::PathLenConstraintViolated => Verdict::reject(
            R::ChainTooDeep,
            format!("the chain of '{subject}' breaks an issuer's path length constraint"),
        ),
        WebpkiError::MaximumPathBuildCallsExceeded
        | WebpkiError::MaximumSignatureChecksExceeded
        | WebpkiError::MaximumNameConstraintComparisonsExceeded => Verdict::reject(
            R::ChainTooDeep,
            format!(
                "building a chain for '{subject}' took too many steps (a hostile or tangled chain)"
            ),
        ),
        WebpkiError::NameConstraintViolation | WebpkiError::MalformedNameConstraint => {
            Verdict::reject(
                R::NameConstraints,
                format!("a name in '{subject}' is outside a CA's name constraints"),
            )
        }
        WebpkiError::CrlExpired { .. } => {
            let stale: Vec<String> = opts
                .crls
                .iter()
                .filter(|c| c.next_update_unix().is_some_and(|t| t < now))
                .map(|c| {
                    format!(
                        "the CRL of '{}' (next update {})",
                        c.info().issuer,
                        c.info().next_update.as_deref().unwrap_or("?")
                    )
                })
                .collect();
            let which = if stale.is_empty() {
                "a CRL covering it".to_string()
            } else {
                stale.join(" and ")
            };
            Verdict::reject(
                R::CrlExpired,
                format!(
                    "revocation of '{subject}' cannot be checked: {which} is past its next update; publish a fresh CRL"
                ),
            )
        }
        WebpkiError::InvalidCrlSignatureForPublicKey
        | WebpkiError::UnsupportedCrlSignatureAlgorithmContext(_)
        | WebpkiError::UnsupportedCrlSignatureAlgorithmForPublicKeyContext(_)
        | WebpkiError::IssuerNotCrlSigner
        | WebpkiError::InvalidCrlNumber
        | WebpkiError::UnsupportedCrlVersion
        | WebpkiError::UnsupportedDeltaCrl
        | WebpkiError::UnsupportedIndirectCrl
        | WebpkiError::UnsupportedCrlIssuingDistributionPoint
        | WebpkiError::UnsupportedRevocationReason
        | WebpkiError::UnsupportedRevocationReasonsPartitioning
        | WebpkiError::UnknownRevocationStatus => Verdict::reject(
            R::CrlInvalid,
            format!("a CRL covering the chain of '{subject}' cannot be used ({err:?})"),
        ),
        WebpkiError::CertNotValidForName(_) => Verdict::reject(
            R::NameMismatch,
            format!("'{subject}' is not valid for the expected name"),
        ),
        other => Verdict::reject(
            R::Malformed,
            format!("'{subject}' or its chain is malformed ({other:?})"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/reject-reasons.md lists every code once, with the alert the code sends.
    #[test]
    fn the_reasons_table_names_every_code_and_its_alert() {
        let doc = include_str!("../../../docs/reject-reasons.md");
        for reason in RejectReason::ALL {
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", reason.code())))
                .unwrap_or_else(|| panic!("{reason} is not in docs/reject-reasons.md"));
            assert!(
                row.trim_end()
                    .ends_with(&format!("| {} |", reason.tls_alert().name())),
                "{reason}: the table says {row}"
            );
        }
    }
}
