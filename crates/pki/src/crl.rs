//! Certificate revocation lists: reading them for verification, and writing them.

use std::sync::Arc;

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use time::{Duration, OffsetDateTime};
use webpki::{CertRevocationList, OwnedCertRevocationList};
use x509_parser::prelude::FromDer;

use crate::cert::CrlInfo;
use crate::issue::CaIssuer;
use crate::pem::{self, Label};
use crate::{PkiError, Result};

/// A parsed CRL, ready for [`crate::verify`].
#[derive(Debug, Clone)]
pub struct Crl {
    der: Vec<u8>,
    info: CrlInfo,
    parsed: Arc<CertRevocationList<'static>>,
}

impl Crl {
    /// Parses one DER CRL.
    pub fn from_der(der: impl Into<Vec<u8>>) -> Result<Self> {
        let der = der.into();
        let info = CrlInfo::from_der(&der)?;
        // RFC 5280 5.2.3: conforming CRL issuers MUST include a non-critical CRL number.
        let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
            .map_err(|e| PkiError::malformed("", format!("not a valid CRL ({e})")))?;
        match parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "2.5.29.20")
        {
            None => {
                return Err(PkiError::malformed(
                    "",
                    "CRL has no CRL number (RFC 5280 requires one)",
                ));
            }
            Some(e) if e.critical => {
                return Err(PkiError::malformed("", "CRL marks its CRL number critical"));
            }
            Some(_) => {}
        }
        let parsed = OwnedCertRevocationList::from_der(&der)
            .map_err(|e| PkiError::malformed("", format!("CRL is not usable ({e:?})")))?;
        Ok(Crl {
            der,
            info,
            parsed: Arc::new(CertRevocationList::Owned(parsed)),
        })
    }

    /// Every CRL in a PEM bundle, or one DER CRL.
    pub fn all_from_pem_or_der(input: &[u8]) -> Result<Vec<Self>> {
        let crls: Vec<Crl> = pem::blocks_of(input, &Label::Crl)?
            .into_iter()
            .map(|b| {
                let line = b.line;
                Crl::from_der(b.der).map_err(|e| match e {
                    PkiError::Malformed { detail, .. } if line > 0 => {
                        PkiError::malformed(format!("line {line}: "), detail)
                    }
                    other => other,
                })
            })
            .collect::<Result<_>>()?;
        if crls.is_empty() {
            return Err(PkiError::NotFound {
                expected: "CRL",
                label: "X509 CRL",
            });
        }
        Ok(crls)
    }

    /// The DER encoding.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The decoded fields.
    pub fn info(&self) -> &CrlInfo {
        &self.info
    }

    /// nextUpdate as seconds since the epoch, when present.
    pub fn next_update_unix(&self) -> Option<i64> {
        let (_, parsed) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&self.der).ok()?;
        parsed.next_update().map(|t| t.timestamp())
    }

    /// The CRL as a PEM block.
    pub fn to_pem(&self) -> String {
        pem::encode("X509 CRL", &self.der)
    }

    /// Checks that `issuer` issued this CRL: its issuer name is `issuer`'s subject, `issuer`'s
    /// key signed it, and `issuer` may sign CRLs (cRLSign, when it has a key usage at all).
    pub fn verify_issued_by(&self, issuer: &crate::cert::Certificate) -> Result<()> {
        let (_, parsed) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&self.der)
                .map_err(|e| PkiError::malformed("", format!("not a valid CRL ({e})")))?;
        let ku = &issuer.info().key_usage;
        let checked = issuer.with_parsed(|c| {
            if parsed.issuer().as_raw() != c.subject().as_raw() {
                return Err(format!(
                    "the CRL is issued by '{}', not by '{}'",
                    self.info.issuer,
                    issuer.info().subject
                ));
            }
            if !ku.is_empty() && !ku.iter().any(|k| k == "cRLSign") {
                return Err(format!(
                    "'{}' may not sign CRLs (its key usage lacks cRLSign)",
                    issuer.info().subject
                ));
            }
            parsed.verify_signature(c.public_key()).map_err(|_| {
                format!(
                    "the CRL's signature does not verify with the key of '{}'",
                    issuer.info().subject
                )
            })
        })?;
        checked.map_err(|why| PkiError::malformed("", why))
    }

    pub(crate) fn webpki(&self) -> &CertRevocationList<'static> {
        &self.parsed
    }
}

/// Parses a serial written as hex, with or without colons (`01:a3:…`, `01a3…`, `0x01a3`).
pub fn parse_serial(text: &str) -> Result<Vec<u8>> {
    let digits: String = text
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if digits.is_empty() || digits.len() > 40 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(PkiError::InvalidRequest(format!(
            "serial '{text}' is not hex of at most 20 bytes (as `pki inspect` prints it)"
        )));
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    decode_hex(&padded)
        .ok_or_else(|| PkiError::InvalidRequest(format!("serial '{text}' is not hex")))
}

/// Decodes hex with optional colons; `None` if anything else is in it or a digit is left over.
fn decode_hex(text: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = text.bytes().filter(|b| *b != b':').collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

/// Issues a CRL signed by `issuer` revoking `serials`, valid for `next_update_days` days, with a
/// CRL number taken from the clock (so that later CRLs always carry larger numbers).
pub fn create(issuer: &CaIssuer, serials: &[Vec<u8>], next_update_days: u32) -> Result<Crl> {
    if next_update_days == 0 {
        return Err(PkiError::InvalidRequest(
            "--next-update-days must be at least 1".into(),
        ));
    }
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let revoked: Vec<(Vec<u8>, i64, Option<u8>)> =
        serials.iter().map(|s| (s.clone(), now, None)).collect();
    create_at(issuer, &revoked, i64::from(next_update_days) * 86400, 0)
}

/// Issues a CRL signed by `issuer` revoking each serial at its time (seconds since the epoch)
/// for its RFC 5280 reason code (6: on hold), valid for `next_update_secs`.
///
/// The CRL number is `generation` in its high 64 bits and the clock in milliseconds in its low
/// 64: several nodes publishing one CA's CRL from a shared registry pass the registry's change
/// marker as `generation`, so a CRL made from newer registry content always carries a larger
/// number than one made from older, whichever node made it and whatever their clocks say; CRLs
/// of one generation are ordered by time. (16 octets; RFC 5280 allows 20.)
pub fn create_at(
    issuer: &CaIssuer,
    revoked: &[(Vec<u8>, i64, Option<u8>)],
    next_update_secs: i64,
    generation: u64,
) -> Result<Crl> {
    let now = OffsetDateTime::now_utc();
    let revoked_certs = revoked
        .iter()
        .map(|(s, at, reason)| RevokedCertParams {
            serial_number: SerialNumber::from_slice(s),
            revocation_time: OffsetDateTime::from_unix_timestamp(*at).unwrap_or(now),
            reason_code: reason.and_then(reason_of),
            invalidity_date: None,
        })
        .collect();
    let millis = u64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(u64::MAX);
    let number = (u128::from(generation) << 64) | u128::from(millis);
    let number = number.to_be_bytes();
    let first = number
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(number.len() - 1);
    // A positive INTEGER: a leading zero octet when the top bit is set.
    let mut number_der = Vec::with_capacity(17);
    if number[first] & 0x80 != 0 {
        number_der.push(0);
    }
    number_der.extend_from_slice(&number[first..]);
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::seconds(next_update_secs.max(60)),
        crl_number: SerialNumber::from_slice(&number_der),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: match &issuer.certificate().info().subject_key_id {
            Some(ski) => KeyIdMethod::PreSpecified(decode_hex(ski).ok_or_else(|| {
                PkiError::malformed("", "issuer subject key identifier is not hex")
            })?),
            None => KeyIdMethod::Sha256,
        },
    };
    Crl::from_der(issuer.sign_crl(&params)?)
}

/// RFC 5280 CRLReason codes and their names (7 is unused), the one table every crate reads.
pub const REASONS: [(u8, &str); 10] = [
    (0, "unspecified"),
    (1, "keyCompromise"),
    (2, "cACompromise"),
    (3, "affiliationChanged"),
    (4, "superseded"),
    (5, "cessationOfOperation"),
    (6, "certificateHold"),
    (8, "removeFromCRL"),
    (9, "privilegeWithdrawn"),
    (10, "aACompromise"),
];

/// A CRLReason's name (`keyCompromise`), or `None` for a code RFC 5280 does not define.
pub fn reason_name(code: u8) -> Option<&'static str> {
    REASONS.iter().find(|(c, _)| *c == code).map(|(_, n)| *n)
}

/// A CRLReason's code from its RFC 5280 name.
pub fn reason_code(name: &str) -> Option<u8> {
    REASONS.iter().find(|(_, n)| *n == name).map(|(c, _)| *c)
}

fn reason_of(code: u8) -> Option<rcgen::RevocationReason> {
    use rcgen::RevocationReason as R;
    Some(match reason_name(code)? {
        "unspecified" => R::Unspecified,
        "keyCompromise" => R::KeyCompromise,
        "cACompromise" => R::CaCompromise,
        "affiliationChanged" => R::AffiliationChanged,
        "superseded" => R::Superseded,
        "cessationOfOperation" => R::CessationOfOperation,
        "certificateHold" => R::CertificateHold,
        "privilegeWithdrawn" => R::PrivilegeWithdrawn,
        "aACompromise" => R::AaCompromise,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_and_codes_round_trip() {
        for (code, name) in REASONS {
            assert_eq!(reason_name(code), Some(name));
            assert_eq!(reason_code(name), Some(code));
        }
        assert_eq!(reason_name(7), None);
        assert_eq!(reason_code("KeyCompromise"), None);
        assert!(matches!(
            reason_of(1),
            Some(rcgen::RevocationReason::KeyCompromise)
        ));
    }

    fn ca() -> CaIssuer {
        use crate::{IssueRequest, PrivateKey, Profile, SubjectName, issue::issue, key::KeyType};
        let key = PrivateKey::generate(KeyType::EcP256).unwrap();
        let cert = issue(
            &IssueRequest::new(Profile::RootCa, SubjectName::cn("CRL Root")),
            &key,
            None,
        )
        .unwrap();
        CaIssuer::new(cert, key, Vec::new()).unwrap()
    }

    fn number(crl: &Crl) -> u128 {
        crl.info().crl_number.as_deref().unwrap().parse().unwrap()
    }

    #[test]
    fn crl_numbers_order_by_registry_generation_before_time() {
        let ca = ca();
        let older_content_later = create_at(&ca, &[], 3600, 7).unwrap();
        let newer_content = create_at(&ca, &[], 3600, 8).unwrap();
        assert!(number(&newer_content) > number(&older_content_later));
        assert_eq!(number(&newer_content) >> 64, 8);
        let same_generation_later = create_at(&ca, &[(vec![1], 0, Some(1))], 3600, 8).unwrap();
        assert!(number(&same_generation_later) >= number(&newer_content));
        // A generation with its top bit set stays a positive number within 20 octets.
        let top = create_at(&ca, &[], 3600, u64::MAX).unwrap();
        assert_eq!(number(&top) >> 64, u128::from(u64::MAX));
        assert_eq!(
            create(&ca, &[vec![2]], 1)
                .map(|c| number(&c) >> 64)
                .unwrap(),
            0
        );
    }

    #[test]
    fn serials_parse_in_every_written_form() {
        assert_eq!(parse_serial("01:a3").unwrap(), vec![0x01, 0xa3]);
        assert_eq!(parse_serial("1a3").unwrap(), vec![0x01, 0xa3]);
        assert_eq!(parse_serial("0x01A3").unwrap(), vec![0x01, 0xa3]);
        assert!(parse_serial("xyz").is_err());
        assert!(parse_serial("").is_err());
        assert!(parse_serial(&"ab".repeat(21)).is_err());
    }
}
