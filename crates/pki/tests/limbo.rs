//! The x509-limbo path-validation suite run through `portcullis_pki::verify`.
//!
//! CLIENT cases are verified for clientAuth, SERVER cases for serverAuth, with the expected peer
//! name checked when it is a DNS name or an IP address. Cases that need a feature we do not
//! implement are skipped and listed. The test fails on any certificate we accept that the suite
//! expects to be rejected, unless the case is on `ACCEPT_ALLOW_LIST` with its reason; cases we
//! reject that the suite expects to pass are counted as failures but do not fail the test
//! (rejecting more is the safe direction, and each is listed in the output).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use portcullis_pki::Certificate;
use portcullis_pki::crl::Crl;
use portcullis_pki::truststore::Truststore;
use portcullis_pki::verify::{Usage, Verdict, VerifyOptions, VerifyProfile, verify};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Features whose cases are skipped, with why.
const SKIPPED_FEATURES: &[(&str, &str)] = &[
    (
        "pedantic-webpki-eku",
        "CA/Browser Forum EKU rules for public web certificates; private mTLS PKIs are not bound by them",
    ),
    (
        "pedantic-webpki-subscriber-key",
        "CA/Browser Forum key rules for public web certificates",
    ),
    (
        "pedantic-public-suffix-wildcard",
        "no public suffix list: wildcard SANs are not checked against public suffixes",
    ),
    (
        "has-policy-constraints",
        "certificate policies are not evaluated (neither by rustls-webpki nor by the gateway)",
    ),
];

/// Cases the suite expects to fail that we accept, each with the reason that is acceptable.
const ACCEPT_ALLOW_LIST: &[(&str, &str)] = &[
    ("webpki::cn::ipv4-hex-mismatch", CN_RULE),
    ("webpki::cn::ipv4-leading-zeros-mismatch", CN_RULE),
    ("webpki::cn::ipv6-uppercase-mismatch", CN_RULE),
    ("webpki::cn::ipv6-uncompressed-mismatch", CN_RULE),
    ("webpki::cn::ipv6-non-rfc5952-mismatch", CN_RULE),
    ("webpki::cn::punycode-not-in-san", CN_RULE),
    ("webpki::cn::utf8-vs-punycode-mismatch", CN_RULE),
    ("webpki::cn::not-in-san", CN_RULE),
    ("webpki::cn::case-mismatch", CN_RULE),
];

/// Why the CN cases are allowed.
const CN_RULE: &str = "CA/Browser Forum BR 7.1.4.3 (a server CN must copy one of its SANs) is a \
    web PKI issuance rule that other cases of this suite contradict (valid leaves with \
    CN=example.com beside other SANs); names are matched against SANs only, never the CN, so a \
    stray CN grants nothing";

/// Cases the suite expects to fail that the compatible profile accepts, each with its reason:
/// the accommodations the profile makes on purpose, for the certificates OpenSSL (and so API
/// Gateway) accepts.
const COMPATIBLE_ACCEPT_ALLOW_LIST: &[(&str, &str)] = &[
    ("rfc5280::aki::leaf-missing-aki", KEY_IDS),
    ("rfc5280::aki::intermediate-missing-aki", KEY_IDS),
    ("rfc5280::ski::root-missing-ski", KEY_IDS),
    ("rfc5280::ski::intermediate-missing-ski", KEY_IDS),
    ("rfc5280::root-non-critical-basic-constraints", BC_CRITICAL),
    ("webpki::aki::root-with-aki-missing-keyidentifier", ROOT_AKI),
    ("webpki::aki::root-with-aki-authoritycertissuer", ROOT_AKI),
    (
        "webpki::aki::root-with-aki-authoritycertserialnumber",
        ROOT_AKI,
    ),
    ("webpki::aki::root-with-aki-all-fields", ROOT_AKI),
    ("webpki::aki::root-with-aki-ski-mismatch", ROOT_AKI),
    ("webpki::v1-cert", V1_LEAF),
];

/// Why an X.509 v1 leaf issued by a trusted CA is accepted by the compatible profile.
const V1_LEAF: &str = "`openssl x509 -req -CA …` without -extfile, as the AWS IoT guides write it, \
    makes v1 device certificates; OpenSSL, API Gateway and IoT Core accept them as leaves (a v1 \
    certificate is still never accepted as an intermediate)";

/// Why missing key identifiers are accepted by the compatible profile.
const KEY_IDS: &str = "key identifiers are hints for building paths, which are built by name and \
    signature anyway; OpenSSL (without -x509_strict) does not require them, and `openssl x509 -req \
    -extfile` with only basicConstraints, as the AWS guides write it, makes CAs without them";

/// Why a non-critical CA:TRUE is accepted by the compatible profile.
const BC_CRITICAL: &str = "`-addext basicConstraints=CA:TRUE`, as the AWS guides write it, is not \
    marked critical; OpenSSL, Go and browsers accept it: CA:TRUE is still required";

/// Why a root's authority key identifier is not checked by the compatible profile.
const ROOT_AKI: &str = "a trust anchor's authority key identifier is never used (nothing is above \
    it); OpenSSL ignores it, and `openssl req -x509` roots may carry keyid and issuer both";

#[test]
fn x509_limbo() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/conformance/x509-limbo/limbo.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!(
            "SKIP: {} is absent (clone the project beside shared/ to run the x509-limbo suite)",
            path.display()
        );
        return;
    };
    let suite: Value = serde_json::from_str(&text).expect("limbo.json is JSON");
    let cases = suite["testcases"].as_array().expect("testcases array");
    let mut unexpected = Vec::new();
    for (profile, allowed) in [
        (VerifyProfile::Strict, ACCEPT_ALLOW_LIST),
        (VerifyProfile::Compatible, COMPATIBLE_ACCEPT_ALLOW_LIST),
    ] {
        unexpected.extend(run_suite(cases, profile, allowed));
    }
    assert!(
        unexpected.is_empty(),
        "accepted certificates the suite expects to be rejected: {unexpected:?}"
    );
}

/// Runs every case under `profile`, prints the counts and the disagreements; returns the
/// accepted cases the suite expects to fail that `allowed` does not list (the strict profile's
/// list applies under the compatible profile too).
fn run_suite(cases: &[Value], profile: VerifyProfile, allowed: &[(&str, &str)]) -> Vec<String> {
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let mut false_accepts = Vec::new();
    let mut false_rejects = Vec::new();
    let mut skipped_cases: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for case in cases {
        let id = case["id"].as_str().unwrap_or("?").to_string();
        match run_case(case, profile) {
            Outcome::Skip(why) => {
                skipped += 1;
                skipped_cases.entry(why).or_default().push(id);
            }
            Outcome::Agree => passed += 1,
            Outcome::FalseAccept => {
                failed += 1;
                false_accepts.push(id);
            }
            Outcome::FalseReject(reason) => {
                failed += 1;
                false_rejects.push(format!("{id} ({reason})"));
            }
        }
    }
    let name = profile.name();
    println!(
        "x509-limbo, {name} profile: CLIENT cases with clientAuth, SERVER cases with serverAuth"
    );
    for (why, ids) in &skipped_cases {
        println!("skipped ({why}): {}", ids.join(", "));
    }
    for id in &false_rejects {
        println!("{name}: rejected, suite expects success: {id}");
    }
    let listed = |id: &str| {
        allowed
            .iter()
            .chain(ACCEPT_ALLOW_LIST)
            .find(|(a, _)| *a == id)
            .map(|(_, why)| *why)
    };
    for id in &false_accepts {
        match listed(id) {
            Some(why) => {
                println!("{name}: accepted, suite expects failure (allow-listed: {why:.60}…): {id}")
            }
            None => println!("{name}: accepted, suite expects failure: {id}"),
        }
    }
    println!("x509-limbo, {name} profile: {passed} passed, {failed} failed, {skipped} skipped");
    false_accepts
        .into_iter()
        .filter(|id| listed(id).is_none())
        .map(|id| format!("{name}: {id}"))
        .collect()
}

enum Outcome {
    Skip(String),
    Agree,
    FalseAccept,
    FalseReject(String),
}

fn run_case(case: &Value, profile: VerifyProfile) -> Outcome {
    let features: Vec<&str> = case["features"]
        .as_array()
        .map(|f| f.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (feature, why) in SKIPPED_FEATURES {
        if features.contains(feature) {
            return Outcome::Skip(format!("{feature}: {why}"));
        }
    }
    let key_usage: Vec<&str> = case["key_usage"]
        .as_array()
        .map(|k| k.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if key_usage.iter().any(|k| *k != "digitalSignature") {
        return Outcome::Skip("key usage constraints other than digitalSignature".into());
    }
    let usage = match case["validation_kind"].as_str() {
        Some("CLIENT") => Usage::Client,
        Some("SERVER") => Usage::Server,
        _ => return Outcome::Skip("unknown validation kind".into()),
    };
    let ekus: Vec<&str> = case["extended_key_usage"]
        .as_array()
        .map(|e| e.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let wanted = match usage {
        Usage::Client => "clientAuth",
        Usage::Server => "serverAuth",
    };
    if ekus.iter().any(|e| *e != wanted) {
        return Outcome::Skip("EKU constraints other than the validation kind's".into());
    }
    let expected_name = match &case["expected_peer_name"] {
        Value::Null => None,
        name => match name["kind"].as_str() {
            Some("DNS") | Some("IP") => name["value"].as_str().map(str::to_string),
            _ => return Outcome::Skip("peer name kinds other than DNS and IP".into()),
        },
    };
    let expect_success = case["expected_result"].as_str() == Some("SUCCESS");
    let at = case["validation_time"]
        .as_str()
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .unwrap_or_else(OffsetDateTime::now_utc)
        .unix_timestamp();
    let parse_all = |v: &Value| -> Option<Vec<Certificate>> {
        let mut out = Vec::new();
        for pem in v.as_array()? {
            out.extend(Certificate::all_from_pem_or_der(pem.as_str()?.as_bytes()).ok()?);
        }
        Some(out)
    };
    let reject = |why: &str| {
        if expect_success {
            Outcome::FalseReject(format!("unparsable: {why}"))
        } else {
            Outcome::Agree
        }
    };
    let Some(trusted) = parse_all(&case["trusted_certs"]) else {
        return reject("trusted certificate");
    };
    let Some(intermediates) = parse_all(&case["untrusted_intermediates"]) else {
        return reject("intermediate");
    };
    let Ok(leaf) = Certificate::all_from_pem_or_der(
        case["peer_certificate"]
            .as_str()
            .unwrap_or_default()
            .as_bytes(),
    ) else {
        return reject("peer certificate");
    };
    let Some(leaf) = leaf.into_iter().next() else {
        return reject("peer certificate");
    };
    let mut crls = Vec::new();
    for crl in case["crls"].as_array().into_iter().flatten() {
        match Crl::all_from_pem_or_der(crl.as_str().unwrap_or_default().as_bytes()) {
            Ok(c) => crls.extend(c),
            Err(_) => return reject("CRL"),
        }
    }
    let max_depth = case["max_chain_depth"]
        .as_u64()
        .map(|intermediates| u8::try_from(intermediates + 1).unwrap_or(u8::MAX))
        .unwrap_or(u8::MAX);
    let store = Truststore::from_certificates_at(trusted, at);
    let opts = VerifyOptions {
        usage,
        at: Some(at),
        max_depth,
        crls,
        expected_name,
        ..VerifyOptions::for_profile(profile)
    };
    match (verify(&leaf, &intermediates, &store, &opts), expect_success) {
        (Verdict::Valid { .. }, true) | (Verdict::Rejected { .. }, false) => Outcome::Agree,
        (Verdict::Valid { .. }, false) => Outcome::FalseAccept,
        (
            Verdict::Rejected {
                reason,
                explanation,
            },
            true,
        ) => Outcome::FalseReject(format!("{reason}: {explanation}")),
    }
}
