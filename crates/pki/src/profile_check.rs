//! RFC 5280 structure checks on a chain that rustls-webpki has already accepted.
//!
//! webpki checks signatures, validity, EKU and constraints but, by design, not the encoding
//! rules of RFC 5280 profiles (key identifiers, criticality, serial numbers) and nothing at all
//! about trust anchors. A gateway that fronts partners' PKIs should refuse what a conforming CA
//! never issues, so these checks run on the built path, anchor included.

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::cert::{Certificate, KeyInfo};
use crate::outcome::{RejectReason, Usage, VerifyProfile};

/// Where a certificate sits in the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Leaf,
    Intermediate,
    Root,
}

/// Checks one certificate of a path; returns the first problem found.
///
/// The compatible profile relaxes what OpenSSL does not require of the certificates its own
/// commands make: basic constraints need not be critical, key identifiers need not be present
/// or consistent, and a self-signed X.509 v1 root is an anchor.
pub(crate) fn check(
    cert: &Certificate,
    role: Role,
    usage: Usage,
    profile: VerifyProfile,
) -> Result<(), (RejectReason, String)> {
    // The outcome depends only on the certificate and these three: a pass is remembered (a
    // truststore's CA is then parsed again only for a new combination), a failure recomputed.
    let bit = role as u32 * 4 + usage as u32 * 2 + profile as u32;
    if cert.profile_passed(bit) {
        return Ok(());
    }
    let checked = check_parsed(cert, role, usage, profile);
    if checked.is_ok() {
        cert.set_profile_passed(bit);
    }
    checked
}

fn check_parsed(
    cert: &Certificate,
    role: Role,
    usage: Usage,
    profile: VerifyProfile,
) -> Result<(), (RejectReason, String)> {
    let strict = profile == VerifyProfile::Strict;
    use RejectReason as R;
    let Ok((_, c)) = X509Certificate::from_der(cert.der()) else {
        return Err((R::Malformed, "cannot be parsed".into()));
    };
    let info = cert.info();
    let fail = |reason: RejectReason, why: String| Err((reason, why));

    let serial = c.tbs_certificate.raw_serial();
    let content = match serial {
        [0, rest @ ..] if !rest.is_empty() => rest,
        other => other,
    };
    // Old roots (Starfield G2…) carry serial 0; a trust anchor's serial is never used.
    if role != Role::Root && content.iter().all(|b| *b == 0) {
        return fail(R::Malformed, "has serial number zero".into());
    }
    if serial.first().is_some_and(|b| b & 0x80 != 0) {
        return fail(R::Malformed, "has a negative serial number".into());
    }
    if content.len() > 20 {
        return fail(
            R::Malformed,
            format!(
                "has a {}-byte serial number; at most 20 are allowed",
                content.len()
            ),
        );
    }

    if !matches!(info.public_key.algorithm.as_str(), "RSA" | "EC" | "Ed25519") {
        return fail(
            R::UnsupportedAlgorithm,
            format!(
                "has a {} key; RSA, ECDSA or Ed25519 is required",
                info.public_key.algorithm
            ),
        );
    }
    if info.public_key.algorithm == "RSA" && !info.public_key.bits.is_multiple_of(8) {
        return fail(
            R::WeakKey,
            format!(
                "has an RSA key of {} bits, not a whole number of bytes",
                info.public_key.bits
            ),
        );
    }
    if KeyInfo::is_weak(&info.public_key) {
        return fail(R::WeakKey, format!("has a weak {} key", info.public_key));
    }

    let subject_empty = c.subject().iter().next().is_none();
    let is_ca = role != Role::Leaf;
    let mut has_aki = false;
    let mut has_ski = false;
    let mut bc_ok = false;
    for ext in c.extensions() {
        let critical = ext.critical;
        match ext.parsed_extension() {
            ParsedExtension::ParseError { error } => {
                return fail(
                    R::Malformed,
                    format!("has a malformed extension {} ({error})", ext.oid),
                );
            }
            ParsedExtension::UnsupportedExtension { .. } if critical => {
                return fail(
                    R::Malformed,
                    format!("has an unsupported critical extension {}", ext.oid),
                );
            }
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                has_aki = true;
                if critical {
                    return fail(
                        R::Malformed,
                        "marks its authority key identifier critical".into(),
                    );
                }
                if aki.key_identifier.is_none() && role != Role::Root && strict {
                    return fail(
                        R::Malformed,
                        "has an authority key identifier without a key id".into(),
                    );
                }
                if role == Role::Root && strict {
                    if aki.authority_cert_issuer.is_some()
                        || aki.authority_cert_serial.is_some()
                        || aki.key_identifier.is_none()
                    {
                        return fail(
                            R::Malformed,
                            "is a root whose authority key identifier is not just its own key id"
                                .into(),
                        );
                    }
                    if aki
                        .key_identifier
                        .as_ref()
                        .map(|k| crate::cert::hex(k.0, ":"))
                        != info.subject_key_id
                    {
                        return fail(
                            R::Malformed,
                            "is a root whose authority key id differs from its subject key id"
                                .into(),
                        );
                    }
                }
            }
            ParsedExtension::SubjectKeyIdentifier(_) => {
                has_ski = true;
                if critical {
                    return fail(
                        R::Malformed,
                        "marks its subject key identifier critical".into(),
                    );
                }
            }
            ParsedExtension::BasicConstraints(bc) => {
                bc_ok = bc.ca && (critical || !strict);
            }
            ParsedExtension::NameConstraints(nc) => {
                if role == Role::Leaf {
                    return fail(
                        R::NameConstraints,
                        "is a leaf with name constraints, which only CAs may carry".into(),
                    );
                }
                if !critical {
                    return fail(
                        R::NameConstraints,
                        "has name constraints not marked critical".into(),
                    );
                }
                let permitted = nc
                    .permitted_subtrees
                    .as_ref()
                    .is_some_and(|s| !s.is_empty());
                let excluded = nc.excluded_subtrees.as_ref().is_some_and(|s| !s.is_empty());
                if !permitted && !excluded {
                    return fail(
                        R::NameConstraints,
                        "has name constraints with no subtrees".into(),
                    );
                }
                for tree in nc
                    .permitted_subtrees
                    .iter()
                    .chain(nc.excluded_subtrees.iter())
                    .flatten()
                {
                    if let GeneralName::DNSName(name) = &tree.base
                        && name.starts_with('.')
                    {
                        return fail(
                            R::NameConstraints,
                            format!(
                                "has a DNS name constraint '{name}' with a leading period, which RFC 5280 does not allow"
                            ),
                        );
                    }
                }
            }
            ParsedExtension::SubjectAlternativeName(san) => {
                if subject_empty && !critical {
                    return fail(
                        R::Malformed,
                        "has an empty subject and a subject alternative name not marked critical"
                            .into(),
                    );
                }
                if !subject_empty && critical && role == Role::Leaf {
                    return fail(
                        R::Malformed,
                        "has a subject and a subject alternative name marked critical".into(),
                    );
                }
                if role == Role::Leaf && usage == Usage::Server {
                    for name in &san.general_names {
                        if let GeneralName::DNSName(dns) = name
                            && !preferred_name_syntax(dns)
                        {
                            return fail(
                                R::Malformed,
                                format!(
                                    "has the DNS name '{dns}', which is not valid host name syntax"
                                ),
                            );
                        }
                    }
                }
            }
            ParsedExtension::AuthorityInfoAccess(aia) if aia.accessdescs.is_empty() => {
                return fail(
                    R::Malformed,
                    "has an empty authority information access extension".into(),
                );
            }
            _ => {}
        }
    }
    if role != Role::Root && !info.self_issued && !has_aki && strict {
        return fail(R::Malformed, "has no authority key identifier".into());
    }
    // A self-signed v1 root (no extensions at all) is a trust anchor to OpenSSL.
    let v1_root = role == Role::Root && info.version == 1 && info.self_issued && !strict;
    if is_ca && info.version == 1 && strict {
        return fail(
            R::WrongUsage,
            "is an X.509 v1 certificate (no extensions), which the strict profile refuses as a CA"
                .into(),
        );
    }
    if is_ca && !v1_root {
        if !has_ski && strict {
            return fail(
                R::Malformed,
                "is a CA without a subject key identifier".into(),
            );
        }
        if !bc_ok {
            return fail(
                R::WrongUsage,
                if strict {
                    "is used as a CA but has no critical basic constraints with CA:TRUE (the compatible profile accepts them not critical)"
                } else {
                    "is used as a CA but its basic constraints do not say CA:TRUE"
                }
                .into(),
            );
        }
        if let Ok(Some(ku)) = c.key_usage()
            && !ku.value.key_cert_sign()
        {
            return fail(
                R::WrongUsage,
                "is used as a CA but its key usage lacks keyCertSign".into(),
            );
        }
    } else if let Ok(Some(ku)) = c.key_usage()
        && ku.value.key_cert_sign()
    {
        return fail(
            R::WrongUsage,
            "is a leaf whose key usage includes keyCertSign".into(),
        );
    }
    Ok(())
}

/// RFC 1034 preferred name syntax (letters, digits, hyphens), with a leading `*.` wildcard.
fn preferred_name_syntax(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}
