//! `portcullis pki …` against openssl, curl and NSS.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use portcullis_testkit::{require_tool, run, temp_dir};

use crate::*;

#[test]
fn four_ca_levels_verify_and_a_fifth_is_too_deep() {
    let tmp = temp_dir();
    let d = tmp.path();
    root(d);
    intermediate(d, "int1", "root");
    intermediate(d, "int2", "int1");
    intermediate(d, "int3", "int2");
    intermediate(d, "int4", "int3");
    leaf(d, "client", "deep3", "int3", &[]);
    leaf(d, "client", "deep4", "int4", &[]);

    // chain.pem runs from the CA to the root.
    let chain = std::fs::read_to_string(d.join("int3/chain.pem")).unwrap();
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 4);
    // The leaf's chain file has the leaf and the intermediates, not the root.
    let leaf_chain = std::fs::read_to_string(d.join("deep3.chain.pem")).unwrap();
    assert_eq!(leaf_chain.matches("BEGIN CERTIFICATE").count(), 4);

    let ok = portcullis(
        d,
        &["pki", "verify", "--trust", "root/ca.pem", "deep3.chain.pem"],
    )
    .ok();
    assert!(ok.stdout.starts_with("OK\n"), "{}", ok.stdout);
    assert!(ok.stdout.contains("CN=int3"), "{}", ok.stdout);
    assert!(
        ok.stdout
            .contains("CN=Test Root,O=Portcullis Tests (trust anchor)"),
        "{}",
        ok.stdout
    );

    let deep = portcullis(
        d,
        &["pki", "verify", "--trust", "root/ca.pem", "deep4.chain.pem"],
    );
    assert_rejected(&deep, "chain-too-deep");
    let allowed = portcullis(
        d,
        &[
            "pki",
            "verify",
            "--trust",
            "root/ca.pem",
            "--max-depth",
            "5",
            "deep4.chain.pem",
        ],
    );
    assert_eq!(allowed.code, 0, "{}", allowed.stdout);

    if let Some(r) = openssl(
        d,
        &[
            "verify",
            "-CAfile",
            "root/ca.pem",
            "-untrusted",
            "int3/chain.pem",
            "deep3.pem",
        ],
    ) {
        assert!(r.ok().stdout.contains("deep3.pem: OK"));
    }
}

#[test]
fn keys_are_private_and_outputs_are_never_overwritten() {
    let tmp = temp_dir();
    let d = tmp.path();
    root(d);
    assert_eq!(mode(d.join("root/ca.key")), 0o600);
    assert_eq!(mode(d.join("root/ca.pem")), 0o644);
    let before = std::fs::read(d.join("root/ca.key")).unwrap();
    let again = portcullis(
        d,
        &["pki", "ca", "create", "--cn", "Other", "--out", "root"],
    );
    assert_clean_error(&again, 2, "--force");
    assert_eq!(std::fs::read(d.join("root/ca.key")).unwrap(), before);
    portcullis(
        d,
        &[
            "pki", "ca", "create", "--cn", "Other", "--out", "root", "--force",
        ],
    )
    .ok();
    assert_ne!(std::fs::read(d.join("root/ca.key")).unwrap(), before);

    leaf(
        d,
        "server",
        "api.example.com",
        "root",
        &["--san", "dns:api.example.com", "--san", "ip:10.0.0.1"],
    );
    assert_eq!(mode(d.join("api.example.com.key")), 0o600);
    let info = json(portcullis(
        d,
        &["pki", "inspect", "--json", "api.example.com.pem"],
    ));
    let cert = &info[0];
    assert_eq!(cert["type"], "certificate");
    assert_eq!(
        cert["extended_key_usage"],
        serde_json::json!(["serverAuth"])
    );
    assert_eq!(cert["basic_constraints"]["ca"], false);
    assert_eq!(
        cert["subject_alt_names"],
        serde_json::json!(["dns:api.example.com", "ip:10.0.0.1"])
    );
}

#[test]
fn every_key_type_issues_and_verifies() {
    let tmp = temp_dir();
    let d = tmp.path();
    for (kind, expect) in [
        ("ec-p256", "P-256"),
        ("ec-p384", "P-384"),
        ("ed25519", "Ed25519"),
        ("rsa-2048", "2048"),
    ] {
        let dir = format!("ca-{kind}");
        portcullis(
            d,
            &[
                "pki",
                "ca",
                "create",
                "--cn",
                &dir,
                "--out",
                &dir,
                "--key-type",
                kind,
            ],
        )
        .ok();
        leaf(
            d,
            "client",
            &format!("c-{kind}"),
            &dir,
            &["--key-type", kind],
        );
        let info = json(portcullis(
            d,
            &["pki", "inspect", "--json", &format!("c-{kind}.pem")],
        ));
        let key = info[0]["public_key"].to_string();
        assert!(key.contains(expect), "{kind}: {key}");
        portcullis(
            d,
            &[
                "pki",
                "verify",
                "--trust",
                &format!("{dir}/ca.pem"),
                &format!("c-{kind}.pem"),
            ],
        )
        .ok();
        if let Some(r) = openssl(
            d,
            &[
                "verify",
                "-CAfile",
                &format!("{dir}/ca.pem"),
                &format!("c-{kind}.pem"),
            ],
        ) {
            r.ok();
        }
    }
}

#[test]
fn openssl_csrs_are_signed_with_profile_extensions_only() {
    let tmp = temp_dir();
    let d = tmp.path();
    if require_tool("openssl").is_none() {
        return;
    }
    root(d);
    intermediate(d, "int", "root");
    for (name, keyopts, expect) in [
        ("rsa", vec!["-newkey", "rsa:2048"], "RSA 2048"),
        ("rsa4k", vec!["-newkey", "rsa:4096"], "RSA 4096"),
        (
            "p256",
            vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
            "P-256",
        ),
        (
            "p384",
            vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
            "P-384",
        ),
        ("ed25519", vec!["-newkey", "ed25519"], "Ed25519"),
    ] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let mut args = vec!["req", "-new", "-nodes", "-keyout", &key, "-out", &csr];
        args.extend(keyopts);
        // The CSR asks to be a CA with a SAN: both must be ignored.
        args.extend([
            "-subj",
            "/C=DE/O=Acme Partner/CN=partner-api",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "subjectAltName=DNS:evil.example",
        ]);
        openssl(d, &args).unwrap().ok();
        let out = format!("{name}.pem");
        portcullis(
            d,
            &[
                "pki",
                "sign-csr",
                "--csr",
                &csr,
                "--profile",
                "client",
                "--issuer-cert",
                "int/ca.pem",
                "--issuer-key",
                "int/ca.key",
                "--out",
                &out,
            ],
        )
        .ok();
        let info = json(portcullis(d, &["pki", "inspect", "--json", &out]));
        let c = &info[0];
        assert_eq!(c["subject"], "CN=partner-api,O=Acme Partner,C=DE", "{name}");
        assert_eq!(c["basic_constraints"]["ca"], false, "{name}");
        assert_eq!(
            c["extended_key_usage"],
            serde_json::json!(["clientAuth"]),
            "{name}"
        );
        assert_eq!(c["subject_alt_names"], serde_json::json!([]), "{name}");
        let key_info = format!("{} {}", c["public_key"]["algorithm"], c["public_key"]);
        assert!(
            key_info.contains(expect.split(' ').next_back().unwrap()),
            "{name}: {key_info}"
        );
        // The signed certificate carries the CSR's own key.
        let pubkey_csr = openssl(d, &["req", "-in", &csr, "-pubkey", "-noout"])
            .unwrap()
            .ok()
            .stdout;
        let pubkey_cert = openssl(d, &["x509", "-in", &out, "-pubkey", "-noout"])
            .unwrap()
            .ok()
            .stdout;
        assert_eq!(pubkey_csr, pubkey_cert, "{name}");
        openssl(
            d,
            &[
                "verify",
                "-CAfile",
                "root/ca.pem",
                "-untrusted",
                "int/ca.pem",
                &out,
            ],
        )
        .unwrap()
        .ok();
        // The key openssl wrote (PKCS#8) and the certificate make a usable .p12.
        portcullis(
            d,
            &[
                "pki",
                "export-p12",
                "--cert",
                &out,
                "--key",
                &key,
                "--out",
                &format!("{name}.p12"),
                "--password-env",
                "HOME",
            ],
        )
        .ok();
    }
}

#[test]
fn a_tampered_csr_is_refused() {
    let tmp = temp_dir();
    let d = tmp.path();
    if require_tool("openssl").is_none() {
        return;
    }
    root(d);
    openssl(
        d,
        &[
            "req",
            "-new",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-keyout",
            "k.pem",
            "-subj",
            "/CN=honest",
            "-outform",
            "DER",
            "-out",
            "csr.der",
        ],
    )
    .unwrap()
    .ok();
    let mut der = std::fs::read(d.join("csr.der")).unwrap();
    // Change the subject's last letter: the signature no longer covers the content.
    let pos = der.windows(6).position(|w| w == b"honest").unwrap();
    der[pos + 5] = b'x';
    std::fs::write(d.join("tampered.der"), &der).unwrap();
    let r = portcullis(
        d,
        &[
            "pki",
            "sign-csr",
            "--csr",
            "tampered.der",
            "--profile",
            "client",
            "--issuer-cert",
            "root/ca.pem",
            "--issuer-key",
            "root/ca.key",
            "--out",
            "x.pem",
        ],
    );
    assert_clean_error(&r, 2, "CSR signature does not verify");
    assert!(!d.join("x.pem").exists());
}

#[test]
fn inspect_matches_openssl() {
    let tmp = temp_dir();
    let d = tmp.path();
    root(d);
    intermediate(d, "int", "root");
    leaf(
        d,
        "client",
        "device-7",
        "int",
        &["--org", "Fleet", "--ou", "Sensors", "--country", "NL"],
    );
    let info = json(portcullis(
        d,
        &["pki", "inspect", "--json", "device-7.chain.pem"],
    ));
    let (leaf_info, int_info) = (&info[0], &info[1]);
    assert_eq!(leaf_info["subject"], "CN=device-7,OU=Sensors,O=Fleet,C=NL");
    assert_eq!(leaf_info["issuer"], int_info["subject"]);
    assert_eq!(leaf_info["authority_key_id"], int_info["subject_key_id"]);
    assert_eq!(
        leaf_info["key_usage"],
        serde_json::json!(["digitalSignature"])
    );
    assert_eq!(int_info["basic_constraints"]["ca"], true);
    let id = leaf_info["id"].as_str().unwrap();
    assert_eq!(id.len(), 64);
    let text = portcullis(d, &["pki", "inspect", "device-7.pem"])
        .ok()
        .stdout;
    assert!(text.contains("Extended key usage:  clientAuth"), "{text}");
    assert!(text.contains("Serial:"), "{text}");
    if let Some(r) = openssl(
        d,
        &[
            "x509",
            "-in",
            "device-7.pem",
            "-noout",
            "-fingerprint",
            "-sha256",
            "-serial",
        ],
    ) {
        let out = r.ok().stdout;
        let fp = leaf_info["sha256_fingerprint"].as_str().unwrap();
        assert!(out.contains(fp), "{out} vs {fp}");
        let serial = leaf_info["serial"]
            .as_str()
            .unwrap()
            .replace(':', "")
            .to_uppercase();
        assert!(
            out.contains(&format!("serial={serial}")),
            "{out} vs {serial}"
        );
    }
}

#[test]
fn verify_names_each_rejection_reason() {
    let tmp = temp_dir();
    let d = tmp.path();
    root(d);
    intermediate(d, "int", "root");
    leaf(d, "client", "alice", "int", &[]);
    leaf(d, "server", "web.example.com", "int", &[]);
    let verify = |extra: &[&str]| {
        let mut args = vec![
            "pki",
            "verify",
            "--trust",
            "root/ca.pem",
            "--chain",
            "int/ca.pem",
        ];
        args.extend(extra);
        portcullis(d, &args)
    };
    assert_eq!(verify(&["alice.pem"]).code, 0);
    assert_rejected(
        &verify(&["--at", "2099-01-01T00:00:00Z", "alice.pem"]),
        "expired",
    );
    assert_rejected(
        &verify(&["--at", "2001-01-01T00:00:00Z", "alice.pem"]),
        "not-yet-valid",
    );
    assert_rejected(&verify(&["web.example.com.pem"]), "wrong-usage");
    assert_eq!(
        verify(&[
            "--usage",
            "server",
            "--name",
            "web.example.com",
            "web.example.com.pem"
        ])
        .code,
        0
    );
    assert_rejected(
        &verify(&[
            "--usage",
            "server",
            "--name",
            "other.example.com",
            "web.example.com.pem",
        ]),
        "name-mismatch",
    );

    // Untrusted: a different root.
    portcullis(
        d,
        &[
            "pki",
            "ca",
            "create",
            "--cn",
            "Other Root",
            "--out",
            "other",
        ],
    )
    .ok();
    let r = portcullis(
        d,
        &[
            "pki",
            "verify",
            "--trust",
            "other/ca.pem",
            "alice.chain.pem",
        ],
    );
    assert_rejected(&r, "untrusted-issuer");
    // Only the leaf, without the intermediate anywhere.
    let r = portcullis(d, &["pki", "verify", "--trust", "root/ca.pem", "alice.pem"]);
    assert_rejected(&r, "untrusted-issuer");
    // The truststore may hold the whole chain, so the leaf alone is enough.
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(d.join("root/ca.pem")).unwrap(),
        std::fs::read_to_string(d.join("int/ca.pem")).unwrap()
    );
    std::fs::write(d.join("bundle.pem"), bundle).unwrap();
    assert_eq!(
        portcullis(d, &["pki", "verify", "--trust", "bundle.pem", "alice.pem"]).code,
        0
    );

    // Revocation, and a CRL past its next update.
    let serial = json(portcullis(d, &["pki", "inspect", "--json", "alice.pem"]))[0]["serial"]
        .as_str()
        .unwrap()
        .to_string();
    portcullis(
        d,
        &[
            "pki",
            "crl",
            "create",
            "--issuer-cert",
            "int/ca.pem",
            "--issuer-key",
            "int/ca.key",
            "--revoke",
            &serial,
            "--next-update-days",
            "7",
            "--out",
            "int.crl",
        ],
    )
    .ok();
    assert_rejected(&verify(&["--crl", "int.crl", "alice.pem"]), "revoked");
    assert_rejected(
        &verify(&[
            "--crl",
            "int.crl",
            "--usage",
            "server",
            "--at",
            &in_days(30),
            "web.example.com.pem",
        ]),
        "crl-expired",
    );
    let stale = verify(&[
        "--crl",
        "int.crl",
        "--usage",
        "server",
        "--at",
        &in_days(30),
        "web.example.com.pem",
    ]);
    assert!(
        stale.stdout.contains("the CRL of 'CN=int'"),
        "names the CRL: {}",
        stale.stdout
    );
    assert_eq!(
        verify(&[
            "--crl",
            "int.crl",
            "--usage",
            "server",
            "web.example.com.pem"
        ])
        .code,
        0
    );
    let crl = json(portcullis(d, &["pki", "inspect", "--json", "int.crl"]));
    assert_eq!(crl[0]["type"], "crl");
    assert_eq!(crl[0]["revoked"][0]["serial"], serial);
    if let Some(r) = openssl(
        d,
        &[
            "crl",
            "-in",
            "int.crl",
            "-CAfile",
            "int/chain.pem",
            "-noout",
            "-verify",
        ],
    ) {
        let r = r.ok();
        assert!(
            format!("{}{}", r.stdout, r.stderr).contains("verify OK"),
            "{r:?}"
        );
    }

    // Name constraints.
    portcullis(
        d,
        &[
            "pki",
            "ca",
            "create",
            "--cn",
            "Constrained",
            "--out",
            "nc",
            "--issuer-cert",
            "root/ca.pem",
            "--issuer-key",
            "root/ca.key",
            "--permit-dns",
            "example.com",
        ],
    )
    .ok();
    leaf(d, "server", "ok.example.com", "nc", &[]);
    leaf(d, "server", "evil.org", "nc", &[]);
    let nc = |file: &str| {
        portcullis(
            d,
            &[
                "pki",
                "verify",
                "--trust",
                "root/ca.pem",
                "--chain",
                "nc/ca.pem",
                "--usage",
                "server",
                file,
            ],
        )
    };
    assert_eq!(nc("ok.example.com.pem").code, 0);
    assert_rejected(&nc("evil.org.pem"), "name-constraints");
}

#[test]
fn a_self_signed_partner_certificate_is_its_own_anchor() {
    let tmp = temp_dir();
    let d = tmp.path();
    if require_tool("openssl").is_none() {
        return;
    }
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-keyout",
            "partner.key",
            "-out",
            "partner.pem",
            "-days",
            "30",
            "-subj",
            "/CN=partner",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "keyUsage=critical,digitalSignature",
            "-addext",
            "extendedKeyUsage=clientAuth",
        ],
    )
    .unwrap()
    .ok();
    let r = portcullis(
        d,
        &["pki", "verify", "--trust", "partner.pem", "partner.pem"],
    );
    assert_eq!(r.code, 0, "{} {}", r.stdout, r.stderr);
    let lint = json(portcullis(
        d,
        &["pki", "truststore", "lint", "--json", "partner.pem"],
    ));
    assert_eq!(lint["certificates"][0]["status"], "ok", "{lint}");
}

#[test]
fn truststore_lint_warns_per_certificate() {
    let tmp = temp_dir();
    let d = tmp.path();
    if require_tool("openssl").is_none() {
        return;
    }
    root(d);
    intermediate(d, "int", "root");
    // An intermediate whose root is absent.
    portcullis(
        d,
        &["pki", "ca", "create", "--cn", "Lost Root", "--out", "lost"],
    )
    .ok();
    intermediate(d, "orphan", "lost");
    leaf(d, "client", "notca", "int", &[]);
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-nodes",
            "-newkey",
            "rsa:1024",
            "-keyout",
            "w.key",
            "-out",
            "weak.pem",
            "-days",
            "30",
            "-subj",
            "/CN=Weak Root",
        ],
    )
    .unwrap()
    .ok();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-nodes",
            "-sha1",
            "-newkey",
            "rsa:2048",
            "-keyout",
            "s.key",
            "-out",
            "sha1.pem",
            "-days",
            "30",
            "-subj",
            "/CN=SHA1 Root",
        ],
    )
    .unwrap()
    .ok();
    let parts = [
        "root/ca.pem",
        "int/ca.pem",
        "root/ca.pem",
        "orphan/ca.pem",
        "notca.pem",
        "weak.pem",
        "sha1.pem",
    ];
    let bundle: String = parts
        .iter()
        .map(|p| std::fs::read_to_string(d.join(p)).unwrap())
        .collect();
    std::fs::write(d.join("bundle.pem"), bundle).unwrap();
    let lint = portcullis(d, &["pki", "truststore", "lint", "--json", "bundle.pem"]);
    assert_eq!(lint.code, 0, "warnings do not fail: {}", lint.stderr);
    let report = json(lint);
    let codes = |i: usize| -> Vec<String> {
        report["certificates"][i]["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["code"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(codes(0).is_empty() && codes(1).is_empty(), "{report}");
    assert_eq!(codes(2), vec!["duplicate"]);
    assert_eq!(codes(3), vec!["incomplete-chain"]);
    assert!(codes(4).contains(&"not-ca".to_string()), "{report}");
    assert!(codes(5).contains(&"weak-key".to_string()), "{report}");
    assert!(codes(6).contains(&"weak-signature".to_string()), "{report}");
    let text = portcullis(d, &["pki", "truststore", "lint", "bundle.pem"])
        .ok()
        .stdout;
    assert!(text.contains("CN=Weak Root"), "{text}");
    assert!(text.contains("warning incomplete-chain"), "{text}");

    // Malformed: say where.
    let broken = std::fs::read_to_string(d.join("bundle.pem")).unwrap();
    let cut = &broken[..broken.len() - 40];
    std::fs::write(d.join("cut.pem"), cut).unwrap();
    let r = portcullis(d, &["pki", "truststore", "lint", "cut.pem"]);
    assert_clean_error(&r, 2, "line ");
}

#[test]
fn pkcs12_modern_and_legacy_import_in_openssl_and_nss() {
    let tmp = temp_dir();
    let d = tmp.path();
    root(d);
    intermediate(d, "int", "root");
    leaf(d, "client", "laptop", "int", &[]);
    std::fs::write(d.join("pw"), "s3cret-pass\n").unwrap();
    for (file, legacy) in [("modern.p12", false), ("legacy.p12", true)] {
        let mut args = vec![
            "pki",
            "export-p12",
            "--cert",
            "laptop.pem",
            "--key",
            "laptop.key",
            "--chain",
            "int/chain.pem",
            "--out",
            file,
            "--password-file",
            "pw",
        ];
        if legacy {
            args.push("--legacy");
        }
        portcullis(d, &args).ok();
        assert_eq!(mode(d.join(file)), 0o600);
        if let Some(r) = openssl(
            d,
            &[
                "pkcs12",
                "-info",
                "-in",
                file,
                "-passin",
                "pass:s3cret-pass",
                "-nokeys",
            ],
        ) {
            let r = r.ok();
            let all = format!("{}{}", r.stdout, r.stderr);
            assert_eq!(all.matches("BEGIN CERTIFICATE").count(), 3, "{all}");
            if legacy {
                assert!(
                    all.contains("TripleDES") || all.contains("des-ede3"),
                    "{all}"
                );
            } else {
                assert!(all.contains("AES-256"), "{all}");
            }
        }
        let (Some(certutil), Some(pk12util)) = (require_tool("certutil"), require_tool("pk12util"))
        else {
            continue;
        };
        let db = format!("nss-{file}");
        std::fs::create_dir(d.join(&db)).unwrap();
        let sql = format!("sql:{db}");
        run(&certutil, &["-N", "-d", &sql, "--empty-password"], d).ok();
        run(
            &pk12util,
            &["-i", file, "-d", &sql, "-W", "s3cret-pass", "-K", ""],
            d,
        )
        .ok();
        let listed = run(&certutil, &["-L", "-d", &sql], d).ok().stdout;
        assert!(listed.contains("laptop"), "{listed}");
    }
    // A wrong password file is refused by openssl: the MAC is real.
    if let Some(r) = openssl(
        d,
        &[
            "pkcs12",
            "-info",
            "-in",
            "modern.p12",
            "-passin",
            "pass:wrong",
            "-noout",
        ],
    ) {
        assert_ne!(r.code, 0);
    }
}

#[test]
fn verification_certificate_proves_the_ca_key() {
    let tmp = temp_dir();
    let d = tmp.path();
    root(d);
    let code = "a".repeat(64);
    portcullis(
        d,
        &[
            "pki",
            "verification-cert",
            "--ca-cert",
            "root/ca.pem",
            "--ca-key",
            "root/ca.key",
            "--code",
            &code,
            "--out",
            "pop",
        ],
    )
    .ok();
    let info = json(portcullis(
        d,
        &["pki", "inspect", "--json", "pop/verification.pem"],
    ));
    assert_eq!(info[0]["subject"], format!("CN={code}"));
    assert_eq!(info[0]["issuer"], "CN=Test Root,O=Portcullis Tests");
    if let Some(r) = openssl(
        d,
        &["verify", "-CAfile", "root/ca.pem", "pop/verification.pem"],
    ) {
        r.ok();
    }
}

#[test]
fn bad_input_gets_a_one_line_error_and_no_output() {
    let tmp = temp_dir();
    let d = tmp.path();
    root(d);
    leaf(d, "client", "bob", "root", &[]);
    let pem = std::fs::read_to_string(d.join("root/ca.pem")).unwrap();
    std::fs::write(d.join("truncated.pem"), &pem[..pem.len() / 2]).unwrap();
    std::fs::write(d.join("garbage.pem"), "this is not a certificate\n").unwrap();

    let r = portcullis(d, &["pki", "inspect", "truncated.pem"]);
    assert_clean_error(&r, 2, "truncated.pem");
    assert!(r.stderr.contains("line 1"), "{}", r.stderr);
    let r = portcullis(d, &["pki", "inspect", "garbage.pem"]);
    assert_clean_error(&r, 2, "garbage.pem");
    let r = portcullis(d, &["pki", "verify", "--trust", "garbage.pem", "bob.pem"]);
    assert_clean_error(&r, 2, "garbage.pem");
    let r = portcullis(d, &["pki", "inspect", "missing.pem"]);
    assert_clean_error(&r, 2, "missing.pem");

    // A key that is not the certificate's.
    let r = portcullis(
        d,
        &[
            "pki",
            "export-p12",
            "--cert",
            "bob.pem",
            "--key",
            "root/ca.key",
            "--out",
            "x.p12",
            "--password-env",
            "HOME",
        ],
    );
    assert_clean_error(&r, 2, "does not match");
    assert!(!d.join("x.p12").exists());

    // A leaf as issuer.
    let r = portcullis(
        d,
        &[
            "pki",
            "issue",
            "--profile",
            "client",
            "--cn",
            "x",
            "--issuer-cert",
            "bob.pem",
            "--issuer-key",
            "bob.key",
            "--out",
            "o",
        ],
    );
    assert_clean_error(&r, 2, "not a CA");
    assert!(!d.join("o").exists() || std::fs::read_dir(d.join("o")).unwrap().next().is_none());

    // --days 0.
    let r = portcullis(
        d,
        &[
            "pki", "ca", "create", "--cn", "x", "--days", "0", "--out", "zero",
        ],
    );
    assert_clean_error(&r, 2, "--days");
    assert!(!d.join("zero/ca.key").exists());

    // An encrypted key.
    if let Some(r) = openssl(
        d,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-aes256",
            "-pass",
            "pass:x",
            "-out",
            "enc.key",
        ],
    ) {
        r.ok();
        let r = portcullis(
            d,
            &[
                "pki",
                "export-p12",
                "--cert",
                "bob.pem",
                "--key",
                "enc.key",
                "--out",
                "y.p12",
                "--password-env",
                "HOME",
            ],
        );
        assert_clean_error(&r, 2, "encrypted");
    }

    // An output directory that cannot be created (a file is in the way).
    std::fs::write(d.join("blocker"), "").unwrap();
    let r = portcullis(
        d,
        &["pki", "ca", "create", "--cn", "x", "--out", "blocker/sub"],
    );
    assert_clean_error(&r, 3, "blocker");
    assert!(!d.join("blocker/sub").exists());
}

#[test]
fn quickstart_lines_work_with_openssl_and_curl() {
    let tmp = temp_dir();
    let d = tmp.path();
    let out = portcullis(d, &["pki", "quickstart", "--out", "qs"])
        .ok()
        .stdout;
    assert!(
        out.contains("openssl verify -CAfile qs/root/ca.pem"),
        "{out}"
    );
    let again = portcullis(d, &["pki", "quickstart", "--out", "qs"])
        .ok()
        .stdout;
    assert!(again.contains("already exists"), "{again}");
    assert_eq!(mode(d.join("qs/client.key")), 0o600);
    portcullis(
        d,
        &[
            "pki",
            "verify",
            "--trust",
            "qs/truststore.pem",
            "qs/client.pem",
        ],
    )
    .ok();
    portcullis(
        d,
        &[
            "pki",
            "verify",
            "--trust",
            "qs/truststore.pem",
            "--usage",
            "server",
            "--name",
            "localhost",
            "qs/server.pem",
        ],
    )
    .ok();
    let Some(openssl_bin) = require_tool("openssl") else {
        return;
    };
    let Some(curl) = require_tool("curl") else {
        return;
    };
    // Run each printed openssl verify/pkcs12 line as printed.
    for line in out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("openssl verify") || l.starts_with("openssl pkcs12"))
    {
        run_printed(&openssl_bin, line, d).ok();
    }
    // The printed s_server line, on a free port, then the two curl lines.
    let server_line = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("openssl s_server"))
        .unwrap()
        .to_string();
    let port = free_port();
    let server_line = server_line.replace("-accept 8443", &format!("-accept 127.0.0.1:{port}"));
    let mut server = Command::new(&openssl_bin)
        .args(server_line.split_whitespace().skip(1))
        .current_dir(d)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    // s_server prints ACCEPT once it listens.
    assert!(lines.any(|l| l.map(|l| l.contains("ACCEPT")).unwrap_or(false)));
    let curl_lines: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl "))
        .map(|l| {
            l.replace(
                "https://localhost:8443/",
                &format!("https://localhost:{port}/"),
            )
            .replace(
                "curl ",
                &format!("curl -sS --max-time 20 --resolve localhost:{port}:127.0.0.1 "),
            )
        })
        .collect();
    assert_eq!(curl_lines.len(), 2);
    let ok = run_printed(&curl, &curl_lines[0], d);
    let refused = run_printed(&curl, &curl_lines[1], d);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        ok.code, 0,
        "curl with the client certificate: {}",
        ok.stderr
    );
    assert!(ok.stdout.contains("s_server"), "{}", ok.stdout);
    assert_ne!(
        refused.code, 0,
        "curl without a client certificate must be refused"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn in_days(days: i64) -> String {
    let t = time::OffsetDateTime::now_utc() + time::Duration::days(days);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[test]
fn openssl_made_cas_and_traditional_keys_issue_verifiable_certificates() {
    let tmp = temp_dir();
    let d = tmp.path();
    if require_tool("openssl").is_none() {
        return;
    }
    let o = |args: &[&str]| openssl(d, args).unwrap().ok();
    // SEC1 ("EC PRIVATE KEY"), PKCS#1 ("RSA PRIVATE KEY") and DER PKCS#8 keys, as openssl writes them.
    o(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "sec1.key",
    ]);
    o(&["genrsa", "-traditional", "-out", "pkcs1.key", "2048"]);
    o(&[
        "pkey",
        "-in",
        "sec1.key",
        "-outform",
        "DER",
        "-out",
        "pkcs8.der",
    ]);
    assert!(
        std::fs::read_to_string(d.join("sec1.key"))
            .unwrap()
            .contains("BEGIN EC PRIVATE KEY")
    );
    assert!(
        std::fs::read_to_string(d.join("pkcs1.key"))
            .unwrap()
            .contains("BEGIN RSA PRIVATE KEY")
    );
    for (key, name) in [
        ("sec1.key", "ec"),
        ("pkcs1.key", "rsa"),
        ("pkcs8.der", "der"),
    ] {
        let ca = format!("{name}-ca.pem");
        o(&[
            "req",
            "-x509",
            "-key",
            key,
            "-keyform",
            if key.ends_with(".der") { "DER" } else { "PEM" },
            "-out",
            &ca,
            "-days",
            "30",
            "-subj",
            "/C=US/O=OpenSSL Made/OU=Unit/CN=OpenSSL CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        portcullis(
            d,
            &[
                "pki",
                "issue",
                "--profile",
                "client",
                "--cn",
                &format!("{name}-leaf"),
                "--issuer-cert",
                &ca,
                "--issuer-key",
                key,
                "--out",
                ".",
            ],
        )
        .ok();
        let leaf = format!("{name}-leaf.pem");
        o(&["verify", "-CAfile", &ca, "-purpose", "sslclient", &leaf]);
        portcullis(d, &["pki", "verify", "--trust", &ca, &leaf]).ok();
        let info = json(portcullis(d, &["pki", "inspect", "--json", &leaf]));
        let ca_info = json(portcullis(d, &["pki", "inspect", "--json", &ca]));
        assert_eq!(info[0]["issuer"], ca_info[0]["subject"]);
        assert_eq!(info[0]["authority_key_id"], ca_info[0]["subject_key_id"]);
    }
}

#[test]
fn der_files_are_inspected() {
    let tmp = temp_dir();
    let d = tmp.path();
    if require_tool("openssl").is_none() {
        return;
    }
    root(d);
    openssl(
        d,
        &[
            "x509",
            "-in",
            "root/ca.pem",
            "-outform",
            "DER",
            "-out",
            "root.der",
        ],
    )
    .unwrap()
    .ok();
    let info = json(portcullis(d, &["pki", "inspect", "--json", "root.der"]));
    assert_eq!(info[0]["subject"], "CN=Test Root,O=Portcullis Tests");
    assert_eq!(info[0]["self_issued"], true);

    // DER bundles: certificates concatenated, and PKCS#7 (.p7b, DER and PEM), as Windows and
    // Java export chains, read wherever a PEM bundle is.
    intermediate(d, "int", "root");
    leaf(d, "client", "alice", "int", &[]);
    let o = |args: &[&str]| openssl(d, args).unwrap().ok();
    o(&[
        "x509",
        "-in",
        "int/ca.pem",
        "-outform",
        "DER",
        "-out",
        "int.der",
    ]);
    let mut both = std::fs::read(d.join("int.der")).unwrap();
    both.extend(std::fs::read(d.join("root.der")).unwrap());
    std::fs::write(d.join("bundle.der"), both).unwrap();
    std::fs::write(
        d.join("bundle.pem"),
        std::fs::read_to_string(d.join("int/ca.pem")).unwrap()
            + &std::fs::read_to_string(d.join("root/ca.pem")).unwrap(),
    )
    .unwrap();
    o(&[
        "crl2pkcs7",
        "-nocrl",
        "-certfile",
        "bundle.pem",
        "-outform",
        "DER",
        "-out",
        "bundle.p7b",
    ]);
    o(&[
        "crl2pkcs7",
        "-nocrl",
        "-certfile",
        "bundle.pem",
        "-out",
        "bundle.p7b.pem",
    ]);
    for bundle in ["bundle.der", "bundle.p7b", "bundle.p7b.pem"] {
        let info = json(portcullis(d, &["pki", "inspect", "--json", bundle]));
        let subjects: Vec<&str> = info
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["subject"].as_str().unwrap())
            .collect();
        assert_eq!(subjects.len(), 2, "{bundle}: {subjects:?}");
        assert!(
            subjects.contains(&"CN=Test Root,O=Portcullis Tests"),
            "{bundle}: {subjects:?}"
        );
        let lint = portcullis(d, &["pki", "truststore", "lint", bundle]).ok();
        assert!(
            lint.stdout.contains("[anchor]"),
            "{bundle}: {}",
            lint.stdout
        );
        portcullis(d, &["pki", "verify", "--trust", bundle, "alice.pem"]).ok();
    }
    // Bytes after the last element are named, not ignored.
    let mut trailing = std::fs::read(d.join("bundle.der")).unwrap();
    trailing.extend_from_slice(&[0x30, 0x82, 0xff]);
    std::fs::write(d.join("trailing.der"), trailing).unwrap();
    assert_clean_error(
        &portcullis(d, &["pki", "inspect", "trailing.der"]),
        2,
        "are not a DER element",
    );
}

#[test]
fn key_rollover_chains_verify_and_a_weak_root_is_named_as_the_reason() {
    let tmp = temp_dir();
    let d = tmp.path();
    if require_tool("openssl").is_none() {
        return;
    }
    let o = |args: &[&str]| openssl(d, args).unwrap().ok();
    std::fs::write(
        d.join("ext.cnf"),
        "[ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n\
         [leaf]\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=clientAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .unwrap();
    let root = |key: &str, bits: &str, subject: &str, out: &str| {
        o(&["genrsa", "-out", key, bits]);
        o(&[
            "req",
            "-x509",
            "-key",
            key,
            "-subj",
            subject,
            "-days",
            "30",
            "-out",
            out,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    };
    let sign = |csr: &str, ca: &str, ca_key: &str, ext: &str, out: &str| {
        o(&[
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-days",
            "20",
            "-extfile",
            "ext.cnf",
            "-extensions",
            ext,
            "-out",
            out,
        ]);
    };
    let csr = |key: &str, subject: &str, out: &str| {
        o(&[
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-subj", subject,
            "-out", out,
        ]);
    };
    // A root rolls over to a new key under the same name: the new key's "new with old"
    // certificate is self-issued (same name), signed by the old key, which relying parties still
    // trust; the new key issues from now on.
    root("old.key", "2048", "/CN=Roll Root", "old.pem");
    root("new.key", "2048", "/CN=Roll Root", "new-self.pem");
    o(&[
        "req",
        "-new",
        "-key",
        "new.key",
        "-subj",
        "/CN=Roll Root",
        "-out",
        "new.csr",
    ]);
    sign("new.csr", "old.pem", "old.key", "ca", "new-with-old.pem");
    csr("int.key", "/CN=Roll Int", "int.csr");
    sign("int.csr", "new-self.pem", "new.key", "ca", "int.pem");
    csr("dev.key", "/CN=dev", "dev.csr");
    sign("dev.csr", "int.pem", "int.key", "leaf", "dev.pem");
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(d.join("int.pem")).unwrap(),
        std::fs::read_to_string(d.join("new-with-old.pem")).unwrap()
    );
    std::fs::write(d.join("chain.pem"), chain).unwrap();
    o(&[
        "verify",
        "-CAfile",
        "old.pem",
        "-untrusted",
        "chain.pem",
        "-purpose",
        "sslclient",
        "dev.pem",
    ]);
    let verified = portcullis(
        d,
        &[
            "pki",
            "verify",
            "--trust",
            "old.pem",
            "--chain",
            "chain.pem",
            "dev.pem",
        ],
    )
    .ok();
    assert!(
        verified.stdout.contains("Roll Root (trust anchor)"),
        "{}",
        verified.stdout
    );
    // Without the self-issued link the old root cannot vouch for the new key's signature.
    assert_rejected(
        &portcullis(
            d,
            &[
                "pki", "verify", "--trust", "old.pem", "--chain", "int.pem", "dev.pem",
            ],
        ),
        "bad-signature",
    );

    // A 1024-bit root: its signatures are refused because of its key, and the reason says so.
    root("weak.key", "1024", "/CN=Weak Root", "weak.pem");
    sign("dev.csr", "weak.pem", "weak.key", "leaf", "weak-dev.pem");
    let weak = portcullis(d, &["pki", "verify", "--trust", "weak.pem", "weak-dev.pem"]);
    assert_rejected(&weak, "weak-key");
    assert!(
        weak.stdout.contains("'CN=Weak Root'") && weak.stdout.contains("RSA 1024"),
        "{}",
        weak.stdout
    );
}

#[test]
fn a_closed_standard_output_ends_a_command_quietly() {
    let tmp = temp_dir();
    let d = tmp.path();
    root(d);
    leaf(d, "client", "alice", "root", &[]);
    // `portcullis pki verify … | head -1` with head gone: the reading end is closed before the
    // command writes, so every write fails with EPIPE.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["pki", "verify", "--trust", "root/ca.pem", "alice.pem"])
        .current_dir(d)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "stderr: {stderr}");
    assert!(stderr.is_empty(), "stderr: {stderr}");
}
