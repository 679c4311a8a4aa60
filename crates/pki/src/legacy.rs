//! What the compatible profile accepts beyond rustls-webpki: the certificates the AWS guides'
//! OpenSSL commands make, which API Gateway, nginx and HAProxy (OpenSSL underneath) accept.
//!
//! - A **pinned** certificate: the presented certificate is byte-identical to a truststore
//!   certificate (a partner's self-signed certificate, v1 from `openssl x509 -req -signkey`, or v3
//!   with CA:TRUE from `openssl req -x509`). It is its own anchor: accepted once its
//!   self-signature, validity, key and usages are checked.
//! - An **X.509 v1 leaf** issued by a trusted CA (`openssl x509 -req -CA …` without
//!   `-extfile`), which webpki cannot parse. Its path is built and checked here: each signature,
//!   validity period, CA flag, key usage, path length, depth and CRL, up to a truststore anchor.
//!   A v1 certificate is never accepted as an intermediate (it cannot say CA:FALSE); a CA with
//!   name constraints is refused on this path, since they are not evaluated here.
//!
//! Everything else goes through webpki in `verify`.

use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::cert::Certificate;
use crate::outcome::{RejectReason, Usage, Verdict, VerifyOptions};
use crate::truststore::Truststore;

/// Verifies a presented certificate that is byte-identical to a truststore certificate.
pub(crate) fn verify_pinned(leaf: &Certificate, opts: &VerifyOptions, now: i64) -> Verdict {
    let info = leaf.info();
    let subject = &info.subject;
    if !info.self_issued || !leaf.is_signed_by(leaf) {
        return Verdict::Rejected {
            reason: RejectReason::UntrustedIssuer,
            explanation: format!(
                "'{subject}' is in the truststore but is not self-signed, so it cannot be trusted as itself; present its chain instead"
            ),
        };
    }
    if let Err(v) = usable_now(leaf, now, "") {
        return v;
    }
    if let Err(v) = leaf_usages(leaf, opts) {
        return v;
    }
    if let Some(weak) = weak_signature(leaf) {
        return weak;
    }
    Verdict::Valid {
        chain: vec![leaf.clone()],
    }
}

/// Verifies an X.509 v1 leaf: its path to a truststore anchor, built and checked here.
pub(crate) fn verify_v1_leaf(
    leaf: &Certificate,
    presented: &[Certificate],
    store: &Truststore,
    opts: &VerifyOptions,
    now: i64,
) -> Verdict {
    let info = leaf.info();
    let subject = info.subject.clone();
    let reject = |reason: RejectReason, explanation: String| Verdict::Rejected {
        reason,
        explanation,
    };
    if let Err(v) = usable_now(leaf, now, "") {
        return v;
    }
    if let Err(v) = leaf_usages(leaf, opts) {
        return v;
    }
    if let Some(weak) = weak_signature(leaf) {
        return weak;
    }
    let anchors = store.anchors();
    let pool: Vec<&Certificate> = presented.iter().chain(store.intermediates()).collect();
    let max_depth = usize::from(opts.max_depth.max(1));
    let mut chain = vec![leaf.clone()];
    let mut current = leaf;
    loop {
        let issued_by = |c: &&&Certificate| {
            c.info().subject_der == current.info().issuer_der && current.is_signed_by(c)
        };
        // A truststore anchor ends the path.
        if let Some(anchor) = anchors.iter().find(issued_by) {
            if let Err(v) = usable_now(anchor, now, &format!("issuer of '{subject}' ")) {
                return v;
            }
            if let Err((reason, why)) = acting_ca(anchor, chain.len() - 1, true) {
                return reject(
                    reason,
                    format!("issuer '{}' of '{subject}' {why}", anchor.info().subject),
                );
            }
            if let Some(weak) = weak_signature(current) {
                return weak;
            }
            if anchor.der() != current.der() {
                chain.push((*anchor).clone());
            }
            break;
        }
        let Some(issuer) = pool.iter().find(issued_by) else {
            return reject(
                RejectReason::UntrustedIssuer,
                format!(
                    "no chain from '{subject}' to a trusted root: its issuer '{}' is neither in the truststore nor presented",
                    current.info().issuer
                ),
            );
        };
        if chain.len() >= max_depth {
            return reject(
                RejectReason::ChainTooDeep,
                format!(
                    "the chain of '{subject}' has more than {} CA levels",
                    opts.max_depth
                ),
            );
        }
        if issuer.info().version == 1 {
            return reject(
                RejectReason::V1Intermediate,
                format!(
                    "the chain of '{subject}' goes through '{}', an X.509 v1 certificate, which cannot be a CA: it cannot say CA:FALSE (reissue it as v3 with basicConstraints CA:TRUE, or put it in the truststore if it is a self-signed root)",
                    issuer.info().subject
                ),
            );
        }
        if let Err(v) = usable_now(issuer, now, &format!("issuer of '{subject}' ")) {
            return v;
        }
        if let Err((reason, why)) = acting_ca(issuer, chain.len() - 1, false) {
            return reject(
                reason,
                format!("issuer '{}' of '{subject}' {why}", issuer.info().subject),
            );
        }
        if let Some(weak) = weak_signature(issuer) {
            return weak;
        }
        chain.push((*issuer).clone());
        current = issuer;
    }
    if let Err(v) = revocation(&chain, opts, now) {
        return v;
    }
    Verdict::Valid { chain }
}

/// The certificate's validity period contains `now`.
fn usable_now(cert: &Certificate, now: i64, role: &str) -> Result<(), Verdict> {
    let info = cert.info();
    if info.not_after_unix() < now {
        return Err(Verdict::Rejected {
            reason: RejectReason::Expired,
            explanation: format!("{role}'{}' expired at {}", info.subject, info.not_after),
        });
    }
    if info.not_before_unix() > now {
        return Err(Verdict::Rejected {
            reason: RejectReason::NotYetValid,
            explanation: format!(
                "{role}'{}' is not valid before {}",
                info.subject, info.not_before
            ),
        });
    }
    if info.public_key.is_weak() {
        return Err(Verdict::Rejected {
            reason: RejectReason::WeakKey,
            explanation: format!(
                "{role}'{}' has a {} key; the minimum is RSA 2048 or ECDSA P-256",
                info.subject, info.public_key
            ),
        });
    }
    Ok(())
}

/// What a presented certificate must allow, when it says: an EKU must list the usage's purpose
/// (or anyExtendedKeyUsage), a key usage must allow digitalSignature.
fn leaf_usages(leaf: &Certificate, opts: &VerifyOptions) -> Result<(), Verdict> {
    let info = leaf.info();
    let want = match opts.usage {
        Usage::Client => "clientAuth",
        Usage::Server => "serverAuth",
    };
    if info.extended_key_usage.is_empty() {
        if opts.require_eku {
            return Err(Verdict::Rejected {
                reason: RejectReason::WrongUsage,
                explanation: format!(
                    "'{}' has no extended key usage; it must list {want}",
                    info.subject
                ),
            });
        }
    } else if !info
        .extended_key_usage
        .iter()
        .any(|e| e == want || e == "anyExtendedKeyUsage")
    {
        return Err(Verdict::Rejected {
            reason: RejectReason::WrongUsage,
            explanation: format!(
                "'{}' is not for {want}: its extended key usage is {}",
                info.subject,
                info.extended_key_usage.join(",")
            ),
        });
    }
    if !info.key_usage.is_empty() && !info.key_usage.iter().any(|k| k == "digitalSignature") {
        return Err(Verdict::Rejected {
            reason: RejectReason::WrongUsage,
            explanation: format!(
                "'{}' has key usage {} without digitalSignature, so it cannot sign a TLS handshake",
                info.subject,
                info.key_usage.join(",")
            ),
        });
    }
    Ok(())
}

/// Whether `ca` may issue in this path: CA:TRUE (a self-signed v1 anchor may), keyCertSign when
/// it has a key usage, a path length constraint that allows `below` CAs under it, no name
/// constraints (not evaluated on this path).
fn acting_ca(ca: &Certificate, below: usize, anchor: bool) -> Result<(), (RejectReason, String)> {
    let info = ca.info();
    let Ok((_, parsed)) = X509Certificate::from_der(ca.der()) else {
        return Err((RejectReason::Malformed, "cannot be parsed".into()));
    };
    let v1_anchor = anchor && info.version == 1 && info.self_issued;
    match &info.basic_constraints {
        Some(bc) if bc.ca => {
            if let Some(max) = bc.path_len
                && below > max as usize
            {
                return Err((
                    RejectReason::ChainTooDeep,
                    format!("allows {max} CA levels below it, and the chain has {below}"),
                ));
            }
        }
        _ if v1_anchor => {}
        _ => {
            return Err((
                RejectReason::WrongUsage,
                "is used as a CA but its basic constraints do not say CA:TRUE".into(),
            ));
        }
    }
    if !info.key_usage.is_empty() && !info.key_usage.iter().any(|k| k == "keyCertSign") {
        return Err((
            RejectReason::WrongUsage,
            "is used as a CA but its key usage lacks keyCertSign".into(),
        ));
    }
    if let Ok(Some(_)) = parsed.name_constraints() {
        return Err((
            RejectReason::NameConstraints,
            "has name constraints, which are not evaluated for an X.509 v1 leaf; reissue the leaf as v3"
                .into(),
        ));
    }
    Ok(())
}

/// A signature algorithm too weak to trust (SHA-1, MD5): the rejection.
fn weak_signature(cert: &Certificate) -> Option<Verdict> {
    let algorithm = cert.info().signature_algorithm.to_ascii_lowercase();
    (algorithm.contains("sha1") || algorithm.contains("md5") || algorithm.contains("md2")).then(
        || Verdict::Rejected {
            reason: RejectReason::UnsupportedAlgorithm,
            explanation: format!(
                "'{}' is signed with {}; SHA-256 or stronger with RSA, ECDSA or Ed25519 is required",
                cert.info().subject,
                cert.info().signature_algorithm
            ),
        },
    )
}

/// Each certificate of the path below the anchor against the CRLs its issuer signed.
fn revocation(chain: &[Certificate], opts: &VerifyOptions, now: i64) -> Result<(), Verdict> {
    for pair in chain.windows(2) {
        let (cert, issuer) = (&pair[0], &pair[1]);
        let Ok((_, issuer_parsed)) = X509Certificate::from_der(issuer.der()) else {
            continue;
        };
        for crl in &opts.crls {
            let Ok((_, parsed)) = CertificateRevocationList::from_der(crl.der()) else {
                continue;
            };
            if parsed.issuer().as_raw() != issuer.info().subject_der.as_slice()
                || parsed.verify_signature(issuer_parsed.public_key()).is_err()
            {
                continue;
            }
            if !issuer.info().key_usage.is_empty()
                && !issuer.info().key_usage.iter().any(|k| k == "cRLSign")
            {
                return Err(Verdict::Rejected {
                    reason: RejectReason::CrlInvalid,
                    explanation: format!(
                        "a CRL for the chain of '{}' is signed by '{}', whose key usage lacks cRLSign",
                        chain[0].info().subject,
                        issuer.info().subject
                    ),
                });
            }
            if !opts.allow_stale_crls && crl.next_update_unix().is_some_and(|t| t < now) {
                return Err(Verdict::Rejected {
                    reason: RejectReason::CrlExpired,
                    explanation: format!(
                        "revocation of '{}' cannot be checked: the CRL of '{}' is past its next update; publish a fresh CRL",
                        chain[0].info().subject,
                        issuer.info().subject
                    ),
                });
            }
            if crl
                .info()
                .revoked
                .iter()
                .any(|r| r.serial == cert.info().serial)
            {
                return Err(Verdict::Rejected {
                    reason: RejectReason::Revoked,
                    explanation: format!(
                        "'{}' (serial {}) is revoked by a CRL of '{}'",
                        cert.info().subject,
                        cert.info().serial,
                        issuer.info().subject
                    ),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testcerts::{Spec, build};
    use crate::verify::{VerifyProfile, verify};

    fn opts(profile: VerifyProfile) -> VerifyOptions {
        VerifyOptions::for_profile(profile)
    }

    fn store(certs: &[&Certificate]) -> Truststore {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        Truststore::from_certificates_at(certs.iter().map(|c| (*c).clone()).collect(), now)
    }

    fn outcome(v: Verdict) -> Result<usize, RejectReason> {
        match v {
            Verdict::Valid { chain } => Ok(chain.len()),
            Verdict::Rejected { reason, .. } => Err(reason),
        }
    }

    fn check(
        leaf: &Certificate,
        presented: &[Certificate],
        trust: &Truststore,
    ) -> [Result<usize, RejectReason>; 2] {
        [VerifyProfile::Compatible, VerifyProfile::Strict]
            .map(|p| outcome(verify(leaf, presented, trust, &opts(p))))
    }

    fn root() -> (Certificate, rcgen::KeyPair) {
        build(
            &Spec {
                ca: Some((true, true)),
                client_auth: false,
                ..Spec::v3("Root")
            },
            None,
        )
    }

    #[test]
    fn pinned_self_signed_certificates_are_accepted_by_the_compatible_profile() {
        let (v1, _) = build(
            &Spec {
                version: 1,
                ..Spec::v3("partner-v1")
            },
            None,
        );
        let (ca, _) = build(
            &Spec {
                ca: Some((true, true)),
                ..Spec::v3("partner-ca")
            },
            None,
        );
        let (plain, _) = build(&Spec::v3("partner-leaf"), None);
        use RejectReason as R;
        assert_eq!(check(&v1, &[], &store(&[&v1])), [Ok(1), Err(R::Malformed)]);
        assert_eq!(check(&ca, &[], &store(&[&ca])), [Ok(1), Err(R::WrongUsage)]);
        assert_eq!(check(&plain, &[], &store(&[&plain])), [Ok(1), Ok(1)]);
        // Pinned still means valid: an expired pinned certificate is refused.
        let (old, _) = build(
            &Spec {
                version: 1,
                until: -60,
                ..Spec::v3("old")
            },
            None,
        );
        assert_eq!(check(&old, &[], &store(&[&old]))[0], Err(R::Expired));
        // A self-signed certificate that is not in the truststore is not trusted.
        assert_eq!(
            check(&v1, &[], &store(&[&plain]))[0],
            Err(R::UntrustedIssuer)
        );
    }

    #[test]
    fn v1_leaves_of_trusted_cas_are_accepted_and_v1_intermediates_never() {
        use RejectReason as R;
        let (root, root_key) = root();
        let (int, int_key) = build(
            &Spec {
                ca: Some((true, false)),
                client_auth: false,
                ..Spec::v3("Int")
            },
            Some((&root, &root_key)),
        );
        let v1 = |cn, issuer: (&Certificate, &rcgen::KeyPair)| {
            build(
                &Spec {
                    version: 1,
                    ..Spec::v3(cn)
                },
                Some(issuer),
            )
            .0
        };
        let trust = store(&[&root, &int]);
        assert_eq!(
            check(&v1("d1", (&root, &root_key)), &[], &trust),
            [Ok(2), Err(R::Malformed)]
        );
        // Through an intermediate whose basic constraints are not critical.
        assert_eq!(
            check(&v1("d2", (&int, &int_key)), &[], &trust),
            [Ok(3), Err(R::Malformed)]
        );
        // The same, the intermediate presented instead of stored.
        assert_eq!(
            check(
                &v1("d3", (&int, &int_key)),
                std::slice::from_ref(&int),
                &store(&[&root])
            )[0],
            Ok(3)
        );
        // A v1 certificate never issues: neither for a v1 leaf nor for a v3 one.
        let (v1_int, v1_int_key) = build(
            &Spec {
                version: 1,
                ..Spec::v3("v1-int")
            },
            Some((&root, &root_key)),
        );
        let (v3_leaf, _) = build(&Spec::v3("v3-leaf"), Some((&v1_int, &v1_int_key)));
        let under_v1 = v1("d4", (&v1_int, &v1_int_key));
        let presented = std::slice::from_ref(&v1_int);
        assert_eq!(
            check(&under_v1, presented, &store(&[&root]))[0],
            Err(R::V1Intermediate)
        );
        assert_eq!(
            check(&v3_leaf, presented, &store(&[&root])),
            [Err(R::V1Intermediate), Err(R::V1Intermediate)]
        );
        // A self-signed v1 root in the truststore is an anchor (compatible only).
        let (v1_root, v1_root_key) = build(
            &Spec {
                version: 1,
                ..Spec::v3("v1-root")
            },
            None,
        );
        let (leaf, _) = build(&Spec::v3("leaf"), Some((&v1_root, &v1_root_key)));
        assert_eq!(
            check(&leaf, &[], &store(&[&v1_root])),
            [Ok(2), Err(R::WrongUsage)]
        );
        assert_eq!(
            check(
                &v1("d5", (&v1_root, &v1_root_key)),
                &[],
                &store(&[&v1_root])
            )[0],
            Ok(2)
        );
    }

    #[test]
    fn v1_paths_are_checked_link_by_link() {
        use RejectReason as R;
        let (other_root, other_key) = root();
        let (root, root_key) = root();
        let trust = store(&[&root]);
        // Signed by another key under the same name: no issuer.
        let forged = build(
            &Spec {
                version: 1,
                ..Spec::v3("forged")
            },
            Some((&root, &other_key)),
        )
        .0;
        let _ = other_root;
        assert_eq!(check(&forged, &[], &trust)[0], Err(R::UntrustedIssuer));
        let expired = build(
            &Spec {
                version: 1,
                until: -60,
                ..Spec::v3("late")
            },
            Some((&root, &root_key)),
        )
        .0;
        assert_eq!(check(&expired, &[], &trust)[0], Err(R::Expired));
        // Too deep: root -> int -> v1 leaf with at most one CA level.
        let (int, int_key) = build(
            &Spec {
                ca: Some((true, true)),
                client_auth: false,
                ..Spec::v3("Int")
            },
            Some((&root, &root_key)),
        );
        let deep = build(
            &Spec {
                version: 1,
                ..Spec::v3("deep")
            },
            Some((&int, &int_key)),
        )
        .0;
        let shallow = VerifyOptions {
            max_depth: 1,
            ..opts(VerifyProfile::Compatible)
        };
        assert_eq!(
            outcome(verify(&deep, &[], &store(&[&root, &int]), &shallow)),
            Err(R::ChainTooDeep)
        );
        // An issuer that is not a CA.
        let (not_ca, not_ca_key) = build(
            &Spec {
                ca: Some((false, true)),
                ..Spec::v3("not-ca")
            },
            Some((&root, &root_key)),
        );
        let under = build(
            &Spec {
                version: 1,
                ..Spec::v3("under")
            },
            Some((&not_ca, &not_ca_key)),
        )
        .0;
        assert_eq!(
            check(&under, std::slice::from_ref(&not_ca), &trust)[0],
            Err(R::WrongUsage)
        );
    }

    #[test]
    fn a_crl_revokes_a_v1_leaf() {
        let (root, root_key) = root();
        let leaf = build(
            &Spec {
                version: 1,
                ..Spec::v3("revoked")
            },
            Some((&root, &root_key)),
        )
        .0;
        let key =
            crate::key::PrivateKey::from_pem_or_der(root_key.serialize_pem().as_bytes()).unwrap();
        let issuer = crate::issue::CaIssuer::new(root.clone(), key, Vec::new()).unwrap();
        let serial = crate::crl::parse_serial(&leaf.info().serial).unwrap();
        let crl = crate::crl::create(&issuer, &[serial], 7).unwrap();
        let with_crl = VerifyOptions {
            crls: vec![crl],
            ..opts(VerifyProfile::Compatible)
        };
        assert_eq!(
            outcome(verify(&leaf, &[], &store(&[&root]), &with_crl)),
            Err(RejectReason::Revoked)
        );
    }

    #[test]
    fn a_leaf_without_eku_is_for_any_purpose_unless_strict() {
        let (root, root_key) = root();
        let leaf = build(
            &Spec {
                client_auth: false,
                ..Spec::v3("no-eku")
            },
            Some((&root, &root_key)),
        )
        .0;
        let [compatible, strict] = check(&leaf, &[], &store(&[&root]));
        assert_eq!(compatible, Ok(2));
        assert_eq!(strict, Err(RejectReason::WrongUsage));
    }
}

#[cfg(test)]
mod agreement {
    //! Lint never contradicts verify: for certificates made every way OpenSSL makes them (v1 or
    //! v3, with or without EKU, basic constraints critical or not, self-signed or issued), what
    //! lint says a profile accepts of a truststore entry is what verify accepts under it.
    use proptest::prelude::*;

    use super::*;
    use crate::testcerts::{Spec, build, build_with};
    use crate::verify::{VerifyProfile, verify};

    fn accepts_as_issuer(store: &Truststore, cert: &Certificate, profile: VerifyProfile) -> bool {
        let entry = store
            .entries()
            .iter()
            .find(|e| e.certificate.der() == cert.der())
            .unwrap();
        !entry.pinned_leaf()
            && !entry.warnings.iter().any(|w| {
                w.code == "unusable"
                    || w.code == "not-ca"
                    || (w.code == "compatible-only" && profile == VerifyProfile::Strict)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn lint_and_verify_agree(
            v1 in any::<bool>(),
            ca in prop_oneof![Just(None), Just(Some((true, true))), Just(Some((true, false))), Just(Some((false, true)))],
            client_auth in any::<bool>(),
            self_signed in any::<bool>(),
        ) {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let root_key = rcgen::KeyPair::generate().unwrap();
            let root = build_with(
                &Spec { ca: Some((true, true)), client_auth: false, ..Spec::v3("Agreement Root") },
                &root_key,
                None,
            );
            let spec = Spec {
                version: if v1 { 1 } else { 3 },
                ca: if v1 { None } else { ca },
                client_auth: client_auth && !v1,
                ..Spec::v3("Subject CA")
            };
            let (cert, key) = if self_signed {
                build(&spec, None)
            } else {
                build(&spec, Some((&root, &root_key)))
            };
            let store = Truststore::from_certificates_at(vec![root.clone(), cert.clone()], now);
            let (leaf, _) = build(&Spec::v3("Agreement Leaf"), Some((&cert, &key)));
            for profile in [VerifyProfile::Compatible, VerifyProfile::Strict] {
                let opts = VerifyOptions::for_profile(profile);
                let issued = matches!(verify(&leaf, &[], &store, &opts), Verdict::Valid { .. });
                prop_assert_eq!(
                    issued,
                    accepts_as_issuer(&store, &cert, profile),
                    "{:?} as issuer under {:?}: {:?}",
                    cert.info(),
                    profile,
                    store.entries()[1].warnings
                );
                if self_signed {
                    let pinned = matches!(verify(&cert, &[], &store, &opts), Verdict::Valid { .. });
                    let flagged = store.entries()[1].warnings.iter().any(|w| w.code == "pinned-compatible-only");
                    if profile == VerifyProfile::Compatible {
                        prop_assert!(pinned, "pinned under compatible: {:?}", cert.info());
                    } else if flagged {
                        prop_assert!(!pinned, "strict accepted a pinned certificate lint flags: {:?}", cert.info());
                    }
                }
            }
        }
    }
}
