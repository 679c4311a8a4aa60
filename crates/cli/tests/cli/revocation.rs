//! Revocation published for the local CA (`[revocation]`): its OCSP responder and CRL, checked
//! by `openssl ocsp` and `openssl crl` as relying parties check them.

use std::path::Path;

use crate::control::{cli, cli_json};
use crate::portcullis;
use crate::serve::Server;
use portcullis_testkit::{require_tool, run, temp_dir};

/// `openssl ocsp` for `cert`, answered at `url`: (its status line, verified, nonce answered).
fn ocsp(openssl: &Path, d: &Path, cert: &str, url: &str) -> (String, bool, bool) {
    let r = run(
        openssl,
        &[
            "ocsp",
            "-issuer",
            "data/ca/ca.pem",
            "-cert",
            cert,
            "-url",
            url,
            "-CAfile",
            "data/ca/ca.pem",
        ],
        d,
    );
    let all = format!("{}{}", r.stdout, r.stderr);
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with(&format!("{cert}:")))
        .unwrap_or_default()
        .to_string();
    (
        line,
        all.contains("Response verify OK"),
        !all.contains("no nonce"),
    )
}

/// The local CA's OCSP responder and CRL: an issued certificate points to both, is good, then
/// revoked within a second of `cert update --status REVOKED` (on hold while INACTIVE), a
/// certificate the registry does not know is unknown, another CA's is refused; the CRL verifies
/// with the CA and lists what is revoked; GET and POST both answer.
#[test]
fn the_local_cas_ocsp_responder_and_crl_answer_openssl() {
    let Some(openssl) = require_tool("openssl") else {
        return;
    };
    let Some(curl) = require_tool("curl") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    let config = "[admin]\naddress = \"127.0.0.1:0\"\n\
         [revocation]\nlisten = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\"]\n\
         [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\n\
         [domain.mtls]\nmode = \"required\"\ntruststore = \"data/ca/ca.pem\"\n\
         [[domain.mapping]]\nupstream = \"builtin:echo\"\n";
    let s = Server::start(d, config);
    let line = s.printed("the revocation listener", |l| {
        l.contains("portcullis revocation (CRL, OCSP) on http://")
    });
    let base = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    let ocsp_url = format!("{base}/ocsp");

    // A device certificate from the local CA points relying parties to the CRL and OCSP.
    let made = cli_json(
        d,
        &[
            "cert",
            "create",
            "--common-name",
            "dev-1",
            "--status",
            "ACTIVE",
            "--out",
            "dev-1",
        ],
    );
    let id = made["id"].as_str().unwrap().to_string();
    let text = run(
        &openssl,
        &["x509", "-in", "dev-1/cert.pem", "-noout", "-text"],
        d,
    )
    .stdout;
    assert!(text.contains(&format!("OCSP - URI:{ocsp_url}")), "{text}");
    let crl_url = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("URI:"))
        .filter(|u| u.contains("/crl/"))
        .unwrap_or_else(|| panic!("no CRL distribution point: {text}"))
        .to_string();
    assert!(text.contains("CA Issuers - URI:"), "{text}");

    // Known to OCSP within a second of being registered.
    let registered = std::time::Instant::now();
    let (mut status, mut verified, mut nonce) = (String::new(), false, false);
    while registered.elapsed() < std::time::Duration::from_secs(5) {
        (status, verified, nonce) = ocsp(&openssl, d, "dev-1/cert.pem", &ocsp_url);
        if status.ends_with("good") {
            break;
        }
    }
    assert!(status.ends_with("good"), "{status}");
    assert!(
        verified && nonce,
        "the answer is signed by the CA and carries the nonce"
    );

    // Revoked: OCSP says so within a second, on this node, with no restart.
    cli(
        d,
        &[
            "cert",
            "update",
            &id,
            "--status",
            "REVOKED",
            "--reason",
            "keyCompromise",
        ],
    )
    .ok();
    let revoked_at = std::time::Instant::now();
    let mut seen = String::new();
    while revoked_at.elapsed() < std::time::Duration::from_secs(5) {
        seen = ocsp(&openssl, d, "dev-1/cert.pem", &ocsp_url).0;
        if seen.ends_with("revoked") {
            break;
        }
    }
    let took = revoked_at.elapsed();
    assert!(seen.ends_with("revoked"), "{seen}");
    println!("revocation visible in OCSP after {took:?}");
    assert!(took < std::time::Duration::from_millis(1500), "{took:?}");

    // INACTIVE is on hold.
    cli_json(
        d,
        &[
            "cert",
            "create",
            "--common-name",
            "dev-2",
            "--status",
            "INACTIVE",
            "--out",
            "dev-2",
        ],
    );
    let asked = std::time::Instant::now();
    let mut r = run(&openssl, &["version"], d);
    while asked.elapsed() < std::time::Duration::from_secs(5)
        && !r.stdout.contains("certificateHold")
    {
        r = run(
            &openssl,
            &[
                "ocsp",
                "-issuer",
                "data/ca/ca.pem",
                "-cert",
                "dev-2/cert.pem",
                "-url",
                &ocsp_url,
                "-CAfile",
                "data/ca/ca.pem",
                "-resp_text",
            ],
            d,
        );
    }
    assert!(r.stdout.contains("certificateHold"), "{}", r.stdout);
    // Signed by a delegated responder, sent along: EKU OCSPSigning, id-pkix-ocsp-nocheck.
    assert!(
        r.stdout.contains("OCSP Signing") && r.stdout.contains("OCSP No Check"),
        "{}",
        r.stdout
    );

    // Not registered (made with the CA's key by hand): unknown. Another CA's: refused.
    portcullis(
        d,
        &[
            "pki",
            "issue",
            "--profile",
            "client",
            "--cn",
            "stray",
            "--issuer-cert",
            "data/ca/ca.pem",
            "--issuer-key",
            "data/ca/ca.key",
            "--out",
            "stray",
            "--name",
            "stray",
        ],
    )
    .ok();
    let stray = "stray/stray.pem".to_string();
    assert!(ocsp(&openssl, d, &stray, &ocsp_url).0.ends_with("unknown"));
    portcullis(
        d,
        &["pki", "ca", "create", "--cn", "Other CA", "--out", "other"],
    )
    .ok();
    let r = run(
        &openssl,
        &[
            "ocsp",
            "-issuer",
            "other/ca.pem",
            "-cert",
            "dev-1/cert.pem",
            "-url",
            &ocsp_url,
        ],
        d,
    );
    assert!(
        format!("{}{}", r.stdout, r.stderr).contains("unauthorized"),
        "{}{}",
        r.stdout,
        r.stderr
    );

    // GET (RFC 6960 A.1): the request base64 in the path.
    let r = run(
        &openssl,
        &[
            "ocsp",
            "-issuer",
            "data/ca/ca.pem",
            "-cert",
            "dev-1/cert.pem",
            "-no_nonce",
            "-reqout",
            "req.der",
        ],
        d,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let b64 = run(&openssl, &["base64", "-A", "-in", "req.der"], d).stdout;
    let encoded = b64
        .trim()
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D");
    let r = run(
        &curl,
        &["-sS", "-o", "resp.der", &format!("{ocsp_url}/{encoded}")],
        d,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run(
        &openssl,
        &[
            "ocsp",
            "-respin",
            "resp.der",
            "-issuer",
            "data/ca/ca.pem",
            "-cert",
            "dev-1/cert.pem",
            "-CAfile",
            "data/ca/ca.pem",
        ],
        d,
    );
    let all = format!("{}{}", r.stdout, r.stderr);
    assert!(
        all.contains("Response verify OK") && all.contains("dev-1/cert.pem: revoked"),
        "{all}"
    );
    assert!(
        all.contains("keyCompromise"),
        "the reason is answered: {all}"
    );

    // The CRL at the distribution point: signed by the CA, listing the revoked certificate (and
    // the one on hold).
    let r = run(&curl, &["-sS", "-o", "ca.crl", &crl_url], d);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = run(
        &openssl,
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            "ca.crl",
            "-CAfile",
            "data/ca/ca.pem",
            "-noout",
            "-text",
        ],
        d,
    );
    assert!(r.stderr.contains("verify OK"), "{}", r.stderr);
    let serial = made["serial"]
        .as_str()
        .unwrap()
        .replace(':', "")
        .to_uppercase();
    assert!(
        r.stdout.to_uppercase().replace(':', "").contains(&serial),
        "{serial} in {}",
        r.stdout
    );
    assert!(r.stdout.contains("Certificate Hold"), "{}", r.stdout);
    assert!(r.stdout.contains("Key Compromise"), "{}", r.stdout);
    // A reason that is not one, or one without REVOKED: refused, nothing changed.
    let bad = cli(
        d,
        &[
            "cert", "update", &id, "--status", "REVOKED", "--reason", "bored",
        ],
    );
    assert!(
        bad.code != 0 && bad.stderr.contains("keyCompromise"),
        "{}",
        bad.stderr
    );
}

/// nginx as a relying party (`ssl_verify_client on; ssl_ocsp on;`) trusting the local CA: it
/// asks Portcullis's OCSP responder (from the client certificate's AIA) and refuses a
/// certificate once Portcullis revokes it.
#[test]
fn nginx_refuses_a_certificate_revoked_in_portcullis_by_ocsp() {
    let (Some(nginx), Some(curl)) = (
        require_tool("nginx")
            .or_else(|| Some(std::path::PathBuf::from("/usr/sbin/nginx")).filter(|p| p.exists())),
        require_tool("curl"),
    ) else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    let config = "[admin]\naddress = \"127.0.0.1:0\"\n\
         [revocation]\nlisten = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\"]\n\
         [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\n\
         [domain.mtls]\nmode = \"required\"\ntruststore = \"data/ca/ca.pem\"\n\
         [[domain.mapping]]\nupstream = \"builtin:echo\"\n";
    let _s = Server::start(d, config);
    // nginx's own server certificate, from the same CA; a client certificate from Portcullis.
    portcullis(
        d,
        &[
            "pki",
            "issue",
            "--profile",
            "server",
            "--cn",
            "localhost",
            "--san",
            "dns:localhost",
            "--issuer-cert",
            "data/ca/ca.pem",
            "--issuer-key",
            "data/ca/ca.key",
            "--out",
            "srv",
            "--name",
            "srv",
        ],
    )
    .ok();
    let made = cli_json(
        d,
        &[
            "cert",
            "create",
            "--common-name",
            "partner-1",
            "--status",
            "ACTIVE",
            "--out",
            "partner-1",
        ],
    );
    let port = crate::cluster::free_port();
    let root = d.display();
    std::fs::create_dir_all(d.join("nginx-tmp")).unwrap();
    let conf = format!(
        "daemon off;\npid {root}/nginx.pid;\nerror_log {root}/nginx-error.log info;\n\
         events {{}}\nhttp {{\n  access_log off;\n\
           client_body_temp_path {root}/nginx-tmp/body;\n  proxy_temp_path {root}/nginx-tmp/proxy;\n\
           fastcgi_temp_path {root}/nginx-tmp/fastcgi;\n  uwsgi_temp_path {root}/nginx-tmp/uwsgi;\n\
           scgi_temp_path {root}/nginx-tmp/scgi;\n\
           server {{\n    listen 127.0.0.1:{port} ssl;\n\
             ssl_certificate {root}/srv/srv.chain.pem;\n    ssl_certificate_key {root}/srv/srv.key;\n\
             ssl_client_certificate {root}/data/ca/ca.pem;\n    ssl_verify_client on;\n\
             ssl_ocsp on;\n\
             location / {{ return 200 \"verified $ssl_client_verify\\n\"; }}\n  }}\n}}\n"
    );
    std::fs::write(d.join("nginx.conf"), conf).unwrap();
    let child = std::process::Command::new(&nginx)
        .args([
            "-c",
            &format!("{root}/nginx.conf"),
            "-p",
            &format!("{root}/"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _nginx = crate::fleet::Killed(child);
    let ask = || {
        let r = run(
            &curl,
            &[
                "-sS",
                "--cacert",
                "data/ca/ca.pem",
                "--resolve",
                &format!("localhost:{port}:127.0.0.1"),
                "--cert",
                "partner-1/cert.pem",
                "--key",
                "partner-1/key.pem",
                "-w",
                "\n%{http_code}",
                &format!("https://localhost:{port}/"),
            ],
            d,
        );
        r.stdout
    };
    // nginx is up once it answers; the certificate is good.
    let started = std::time::Instant::now();
    let mut answer = ask();
    while !answer.ends_with("200") && started.elapsed() < std::time::Duration::from_secs(10) {
        answer = ask();
    }
    let log = || std::fs::read_to_string(d.join("nginx-error.log")).unwrap_or_default();
    assert!(answer.ends_with("200"), "{answer}\n{}", log());
    assert!(answer.contains("verified SUCCESS"), "{answer}");
    // Revoked in Portcullis: nginx refuses it, by OCSP, within a second or so.
    cli(
        d,
        &[
            "cert",
            "update",
            made["id"].as_str().unwrap(),
            "--status",
            "REVOKED",
        ],
    )
    .ok();
    let revoked = std::time::Instant::now();
    while answer.ends_with("200") && revoked.elapsed() < std::time::Duration::from_secs(10) {
        answer = ask();
    }
    let took = revoked.elapsed();
    println!("nginx refused the revoked certificate after {took:?}");
    assert!(answer.ends_with("400"), "{answer}\n{}", log());
    assert!(log().contains("revoked"), "{}", log());
    assert!(took < std::time::Duration::from_millis(1500), "{took:?}");
}

/// The gateway staples the local CA's OCSP answer for its own server certificate, as
/// `openssl s_client -status` sees it.
#[test]
fn the_gateway_staples_ocsp_for_its_local_ca_certificate() {
    let Some(openssl) = require_tool("openssl") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    let config = "[admin]\naddress = \"127.0.0.1:0\"\n\
         [revocation]\nlisten = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\"]\n\
         [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\n\
         [domain.mtls]\nmode = \"required\"\ntruststore = \"data/ca/ca.pem\"\n\
         [[domain.mapping]]\nupstream = \"builtin:echo\"\n";
    let s = Server::start(d, config);
    cli_json(
        d,
        &[
            "cert",
            "create",
            "--common-name",
            "probe",
            "--status",
            "ACTIVE",
            "--out",
            "probe",
        ],
    );
    let connect = format!("127.0.0.1:{}", s.ports[0]);
    let ask = || {
        let mut child = std::process::Command::new(&openssl)
            .args([
                "s_client",
                "-connect",
                &connect,
                "-servername",
                "localhost",
                "-status",
                "-CAfile",
                "data/ca/ca.pem",
                "-cert",
                "probe/cert.pem",
                "-key",
                "probe/key.pem",
            ])
            .current_dir(d)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Stapled within the node's first second.
    let started = std::time::Instant::now();
    let mut seen = ask();
    while !seen.contains("Cert Status: good")
        && started.elapsed() < std::time::Duration::from_secs(5)
    {
        seen = ask();
    }
    assert!(seen.contains("OCSP Response Status: successful"), "{seen}");
    assert!(seen.contains("Cert Status: good"), "{seen}");
    assert!(
        seen.contains("OCSP Signing") || seen.contains("Responder Id"),
        "{seen}"
    );
}
