//! Policy evaluation cost: binds per second (once per connection and certificate), decisions per
//! second (once per request), and the worst case of the wildcard matcher.
//!
//!   cargo run --release -p portcullis-policy --example evaluate [ITERATIONS]
//!
//! `bench/policy.sh` runs it next to the gateway's added latency per request.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use portcullis_pki::issue::{self, CaIssuer};
use portcullis_pki::{IssueRequest, KeyType, PrivateKey, Profile, SubjectAltName, SubjectName};
use portcullis_policy::{Policy, PolicyRef, Request, Variables, bind, glob_match};

/// A partner policy with variables and conditions, a tier policy on thing attributes, and a
/// deny list: 12 statements in all, the shape a real deployment attaches to a domain and thing.
const POLICIES: &[(&str, &str)] = &[
    (
        "partner",
        r#"{"Statement": [
          {"Sid": "own-read", "Effect": "Allow", "Action": ["http:GET", "http:HEAD"],
           "Resource": ["route:api.example.com/partners/${cert:Subject.O}/*", "route:api.example.com/v2/partners/${cert:Subject.O}/*"]},
          {"Sid": "own-write", "Effect": "Allow", "Action": ["http:POST", "http:PUT"],
           "Resource": "route:api.example.com/partners/${cert:Subject.O}/orders/*",
           "Condition": {"StringEquals": {"cert:Subject.OU": ["payments", "treasury"]},
                         "IpAddress": {"conn:SourceIp": ["10.0.0.0/8", "127.0.0.0/8", "2001:db8::/32"]}}},
          {"Sid": "hosts", "Effect": "Allow", "Action": "http:GET",
           "Resource": "route:api.example.com/hosts/${cert:SAN.DNS}/status"},
          {"Sid": "reports", "Effect": "Allow", "Action": "http:GET",
           "Resource": "route:api.example.com/reports/${cert:Subject.O}/????-??-??.csv",
           "Condition": {"DateLessThan": {"conn:CurrentTime": "2099-01-01T00:00:00Z"}}},
          {"Sid": "public", "Effect": "Allow", "Action": "http:GET", "Resource": "route:api.example.com/public/*"}
        ]}"#,
    ),
    (
        "tier",
        r#"{"Statement": [
          {"Effect": "Allow", "Action": "http:*", "Resource": "route:api.example.com/tiers/${thing:Attribute.tier}/*"},
          {"Effect": "Allow", "Action": "http:GET", "Resource": "route:api.example.com/things/${thing:Name}/*"},
          {"Effect": "Allow", "Action": "mqtt:Publish", "Resource": "topic:devices/${thing:Name}/*"}
        ]}"#,
    ),
    (
        "deny-list",
        r#"{"Statement": [
          {"Sid": "no-deletes", "Effect": "Deny", "Action": "http:DELETE", "Resource": "route:api.example.com/*"},
          {"Sid": "no-admin", "Effect": "Deny", "Action": "http:*", "Resource": "route:api.example.com/*/admin/*"},
          {"Sid": "no-internal", "Effect": "Deny", "Action": "http:*", "Resource": "route:api.example.com/internal*"},
          {"Sid": "office-hours", "Effect": "Deny", "Action": "http:POST", "Resource": "route:api.example.com/*",
           "Condition": {"DateGreaterThan": {"conn:CurrentTime": "2099-01-01T00:00:00Z"}}}
        ]}"#,
    ),
];

fn certificate() -> portcullis_pki::Certificate {
    let ca_key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let ca = issue::issue(
        &IssueRequest::new(Profile::RootCa, SubjectName::cn("Bench CA")),
        &ca_key,
        None,
    )
    .unwrap();
    let issuer = CaIssuer::new(ca, ca_key, Vec::new()).unwrap();
    let key = PrivateKey::generate(KeyType::EcP256).unwrap();
    let mut subject = SubjectName::cn("acme-client-7");
    subject.organization = Some("Acme".into());
    subject.organizational_unit = Some("payments".into());
    let mut req = IssueRequest::new(Profile::Client, subject);
    req.subject_alt_names = vec![
        SubjectAltName::Dns("gw1.acme.example".into()),
        SubjectAltName::Dns("gw2.acme.example".into()),
    ];
    issue::issue(&req, &key, Some(&issuer)).unwrap()
}

fn rate(label: &str, n: u64, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{label:<56} {:>10.0}/s {:>7.0} ns each",
        n as f64 / secs,
        secs * 1e9 / n as f64
    );
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let cert = certificate();
    let mut vars = Variables::from_certificate(&cert, &cert.info().id);
    vars.set("thing:Name", vec!["acme-gw-1".into()]);
    vars.set("thing:Attribute.tier", vec!["gold".into()]);

    let started = Instant::now();
    let mut policies = Vec::new();
    for _ in 0..1_000 {
        policies = POLICIES
            .iter()
            .map(|(name, doc)| {
                (
                    PolicyRef {
                        name: (*name).to_string(),
                        version: 1,
                    },
                    Arc::new(Policy::parse(doc).unwrap()),
                )
            })
            .collect();
    }
    rate("parse and check 3 policies (12 statements)", 1_000, started);

    let binds = (n / 20).max(1);
    let started = Instant::now();
    for _ in 0..binds {
        black_box(bind(black_box(&policies), black_box(&vars)));
    }
    rate("bind to a connection (per certificate)", binds, started);

    let bound = bind(&policies, &vars);
    let ip = "10.1.2.3".parse().ok();
    let now = 1_800_000_000;
    let cases = [
        (
            "http:GET",
            "route:api.example.com/partners/Acme/orders/17",
            true,
        ),
        (
            "http:POST",
            "route:api.example.com/partners/Acme/orders/17",
            true,
        ),
        (
            "http:GET",
            "route:api.example.com/hosts/gw2.acme.example/status",
            true,
        ),
        (
            "http:GET",
            "route:api.example.com/partners/Globex/orders/17",
            false,
        ),
        (
            "http:DELETE",
            "route:api.example.com/partners/Acme/orders/17",
            false,
        ),
    ];
    for (action, resource, expected) in cases {
        let request = Request {
            action,
            resource,
            source_ip: ip,
            now,
        };
        assert_eq!(
            bound.decide(&request).allowed,
            expected,
            "{action} {resource}"
        );
        let started = Instant::now();
        for _ in 0..n {
            black_box(bound.decide(black_box(&request)));
        }
        let what = if expected { "allow" } else { "deny" };
        let short = resource.trim_start_matches("route:api.example.com");
        rate(&format!("decide {what}: {action} {short}"), n, started);
    }

    // Worst case of the matcher: a 1,024-byte pattern of stars against 8 KiB of near misses.
    let pattern = format!("{}b", "*a".repeat(511));
    let text = "a".repeat(8 * 1024);
    let rounds = (n / 10_000).max(1);
    let started = Instant::now();
    for _ in 0..rounds {
        assert!(!glob_match(black_box(&pattern), black_box(&text)));
    }
    rate(
        "adversarial glob (1 KiB pattern, 8 KiB text)",
        rounds,
        started,
    );
}
