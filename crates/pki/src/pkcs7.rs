//! PKCS#7 / CMS "certs-only" bundles (RFC 5652 SignedData with no signers), as EST (RFC 7030)
//! answers certificates and Windows and Java export chains.

use crate::cert::Certificate;
use crate::der::element;

/// `1.2.840.113549.1.7.2`, signedData.
const SIGNED_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02];
/// `1.2.840.113549.1.7.1`, data.
const DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];

/// The DER of a certs-only bundle holding `certificates` in order: ContentInfo { signedData,
/// SignedData { version 1, no digest algorithms, data with no content, the certificates, no
/// signers } }.
pub fn certs_only(certificates: &[Certificate]) -> Vec<u8> {
    let certs: Vec<u8> = certificates
        .iter()
        .flat_map(|c| c.der().iter().copied())
        .collect();
    let signed_data = element(
        0x30,
        &[
            element(0x02, &[1]),
            element(0x31, &[]),
            element(0x30, &element(0x06, DATA)),
            element(0xa0, &certs),
            element(0x31, &[]),
        ]
        .concat(),
    );
    element(
        0x30,
        &[element(0x06, SIGNED_DATA), element(0xa0, &signed_data)].concat(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::{IssueRequest, Profile, SubjectName, issue};
    use crate::key::{KeyType, PrivateKey};

    #[test]
    fn a_bundle_reads_back_as_its_certificates_in_order() {
        let certs: Vec<Certificate> = ["one", "two"]
            .iter()
            .map(|cn| {
                let key = PrivateKey::generate(KeyType::EcP256).unwrap();
                issue(
                    &IssueRequest::new(Profile::RootCa, SubjectName::cn(*cn)),
                    &key,
                    None,
                )
                .unwrap()
            })
            .collect();
        let bundle = certs_only(&certs);
        let back = Certificate::all_from_pem_or_der(&bundle).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].der(), certs[0].der());
        assert_eq!(back[1].der(), certs[1].der());
    }
}
