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

/// nginx as a relying party trusting the local CA, twice: one server with `ssl_ocsp on` asks
/// Portcullis's OCSP responder (from the client certificate's AIA) and refuses a certificate
/// once Portcullis revokes it; another with `ssl_crl` on the CRL Portcullis serves refuses it
/// once the CRL is fetched again and nginx reloaded (as a cron job would).
#[test]
fn nginx_refuses_a_certificate_revoked_in_portcullis_by_ocsp_and_by_crl() {
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
    let s = Server::start(d, config);
    let base = s
        .printed("the revocation listener", |l| {
            l.contains("portcullis revocation (CRL, OCSP) on http://")
        })
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
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
    // The served CRL, where the certificate's distribution point says, fetched as a relying
    // party's cron job would.
    let crl_url = {
        let openssl = require_tool("openssl").expect("openssl");
        let text = run(
            &openssl,
            &["x509", "-in", "partner-1/cert.pem", "-noout", "-text"],
            d,
        )
        .stdout;
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix("URI:"))
            .filter(|u| u.contains("/crl/") && u.starts_with(&base))
            .unwrap_or_else(|| panic!("no CRL distribution point at {base}: {text}"))
            .to_string()
    };
    // Served DER (RFC 5280 4.2.1.13); nginx reads PEM.
    let fetch_crl = || {
        let r = run(&curl, &["-sSf", "-o", "served.der", &crl_url], d);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let r = run(
            require_tool("openssl").expect("openssl"),
            &[
                "crl",
                "-inform",
                "DER",
                "-in",
                "served.der",
                "-out",
                "served.crl.new",
            ],
            d,
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        std::fs::rename(d.join("served.crl.new"), d.join("served.crl")).unwrap();
    };
    fetch_crl();
    let port = crate::cluster::free_port();
    let crl_port = crate::cluster::free_port();
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
             location / {{ return 200 \"verified $ssl_client_verify\\n\"; }}\n  }}\n\
           server {{\n    listen 127.0.0.1:{crl_port} ssl;\n\
             ssl_certificate {root}/srv/srv.chain.pem;\n    ssl_certificate_key {root}/srv/srv.key;\n\
             ssl_client_certificate {root}/data/ca/ca.pem;\n    ssl_verify_client on;\n\
             ssl_crl {root}/served.crl;\n\
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
    let nginx_pid = child.id().to_string();
    let _nginx = crate::fleet::Killed(child);
    let ask_port = |port: u16| {
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
    let ask = || ask_port(port);
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

    // The CRL nginx holds predates the revocation: still accepted there.
    let held = ask_port(crl_port);
    assert!(held.ends_with("200"), "{held}\n{}", log());
    // The CRL Portcullis serves lists it as soon as it is fetched again; reloaded, nginx refuses.
    let listed = std::time::Instant::now();
    loop {
        fetch_crl();
        let openssl = require_tool("openssl").expect("openssl");
        let text = run(
            &openssl,
            &["crl", "-in", "served.crl", "-noout", "-text"],
            d,
        )
        .stdout;
        if text.contains("Revoked Certificates:") {
            break;
        }
        assert!(
            listed.elapsed() < std::time::Duration::from_secs(5),
            "the served CRL does not list the revoked certificate: {text}"
        );
    }
    println!(
        "the served CRL listed it {:?} after the revocation",
        revoked.elapsed()
    );
    let r = run(Path::new("kill"), &["-HUP", &nginx_pid], d);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let reloaded = std::time::Instant::now();
    let mut answer = ask_port(crl_port);
    while answer.ends_with("200") && reloaded.elapsed() < std::time::Duration::from_secs(10) {
        answer = ask_port(crl_port);
    }
    assert!(answer.ends_with("400"), "{answer}\n{}", log());
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

/// A keep-alive HTTPS connection made by `openssl s_client` that has been served once.
struct LiveConnection {
    child: std::process::Child,
    _stdin: std::process::ChildStdin,
    reader: std::io::BufReader<std::process::ChildStdout>,
}

impl LiveConnection {
    fn open(openssl: &Path, d: &Path, port: u16, host: &str, cert: &str, key: &str) -> Self {
        let connect = format!("127.0.0.1:{port}");
        let mut child = std::process::Command::new(openssl)
            .args([
                "s_client",
                "-connect",
                &connect,
                "-servername",
                host,
                "-cert",
                cert,
                "-key",
                key,
                "-quiet",
            ])
            .current_dir(d)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        std::io::Write::write_all(
            &mut stdin,
            format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut status = String::new();
        std::io::BufRead::read_line(&mut reader, &mut status).unwrap();
        assert!(status.contains("200"), "{status}");
        LiveConnection {
            child,
            _stdin: stdin,
            reader,
        }
    }

    /// Returns once the gateway has closed the connection.
    fn wait_closed(mut self) {
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut self.reader, &mut rest);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A partner's CA run with `openssl ca`, as partners run theirs: an index, a CRL made with
/// `-gencrl`, certificates whose extensions name the partner's CRL and OCSP URLs.
struct PartnerCa {
    dir: std::path::PathBuf,
    openssl: std::path::PathBuf,
}

impl PartnerCa {
    fn create(openssl: &Path, dir: &Path) -> PartnerCa {
        std::fs::create_dir_all(dir.join("issued")).unwrap();
        std::fs::write(dir.join("index.txt"), "").unwrap();
        std::fs::write(dir.join("serial"), "1000\n").unwrap();
        std::fs::write(dir.join("crlnumber"), "01\n").unwrap();
        std::fs::write(
            dir.join("ca.cnf"),
            "[ca]\ndefault_ca = partner\n\
             [partner]\ndir = .\ndatabase = index.txt\nnew_certs_dir = issued\n\
             certificate = partner-ca.pem\nprivate_key = partner-ca.key\nserial = serial\n\
             crlnumber = crlnumber\ndefault_md = sha256\npolicy = any\ndefault_days = 30\n\
             default_crl_days = 1\nunique_subject = no\n\
             [any]\ncommonName = supplied\n",
        )
        .unwrap();
        run(
            openssl,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "partner-ca.key",
                "-out",
                "partner-ca.pem",
                "-days",
                "30",
                "-subj",
                "/CN=Partner Issuing CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            dir,
        )
        .ok();
        PartnerCa {
            dir: dir.to_path_buf(),
            openssl: openssl.to_path_buf(),
        }
    }

    /// Issues client certificate `name` (`name.pem`, `name.key`) with extension lines `ext`.
    fn issue(&self, name: &str, ext: &str) {
        let d = &self.dir;
        std::fs::write(
            d.join(format!("{name}.ext")),
            format!(
                "[leaf]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n\
                 extendedKeyUsage = clientAuth\n{ext}\n"
            ),
        )
        .unwrap();
        let (key, csr, pem, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        let subj = format!("/CN={name}");
        run(
            &self.openssl,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &subj,
            ],
            d,
        )
        .ok();
        run(
            &self.openssl,
            &[
                "ca",
                "-config",
                "ca.cnf",
                "-batch",
                "-notext",
                "-in",
                &csr,
                "-out",
                &pem,
                "-extfile",
                &extfile,
                "-extensions",
                "leaf",
            ],
            d,
        )
        .ok();
    }

    fn revoke(&self, name: &str) {
        let pem = format!("{name}.pem");
        run(
            &self.openssl,
            &[
                "ca",
                "-config",
                "ca.cnf",
                "-revoke",
                &pem,
                "-crl_reason",
                "keyCompromise",
            ],
            &self.dir,
        )
        .ok();
    }

    /// A new CRL, valid `secs` seconds, written to `out` (PEM).
    fn crl(&self, secs: u32, out: &Path) {
        let secs = secs.to_string();
        let tmp = self.dir.join("next.crl");
        run(
            &self.openssl,
            &[
                "ca",
                "-config",
                "ca.cnf",
                "-gencrl",
                "-crlsec",
                &secs,
                "-out",
                tmp.to_str().unwrap(),
            ],
            &self.dir,
        )
        .ok();
        // Replaced whole: the web server never serves half a CRL.
        std::fs::rename(&tmp, out).unwrap();
    }
}

fn curl_status(d: &Path, port: u16, host: &str, cert: &str, key: &str) -> (u16, String, f64) {
    let started = std::time::Instant::now();
    let r = crate::serve::curl_port(d, port, host, "/", &["--cert", cert, "--key", key]);
    let (code, _) = crate::serve::answer(&r);
    (
        code,
        format!("{}{}", r.stdout, r.stderr),
        started.elapsed().as_secs_f64(),
    )
}

/// A partner CA's CRL, fetched by Portcullis from the distribution point its certificates
/// name (a plain Python web server): the first connection waits for it (`wait_ms`), a
/// certificate the partner revokes is refused once the partner publishes a new CRL — long
/// before the old one's nextUpdate — and when the web server is gone and the CRL runs past its
/// nextUpdate, the stale-CRL policy refuses, naming the URL that failed.
#[test]
fn a_partner_cas_crl_is_fetched_from_its_distribution_point() {
    let Some(openssl) = require_tool("openssl") else {
        return;
    };
    let Some(python) = require_tool("python3") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    let www = d.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/scripts");
    let (web, port) = crate::serve::python_server(
        &python,
        &[scripts.join("revocation_sources.py").to_str().unwrap()],
        &www,
    );
    let partner = PartnerCa::create(&openssl, &d.join("partner"));
    let url = format!("http://127.0.0.1:{port}/partner.crl");
    for who in ["alice", "bob"] {
        partner.issue(who, &format!("crlDistributionPoints = URI:{url}"));
    }
    partner.crl(3600, &www.join("partner.crl"));
    let config = "[admin]\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\"]\n\
         [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\n\
         [domain.mtls]\nmode = \"required\"\ntruststore = \"partner/partner-ca.pem\"\non_failure = \"http\"\n\
         revocation = { crl_dp = true, wait_ms = 5000, refresh_secs = 1 }\n\
         [[domain.mapping]]\nupstream = \"builtin:echo\"\n";
    let s = Server::start(d, config);
    let (alice, alice_key) = ("partner/alice.pem", "partner/alice.key");
    let (bob, bob_key) = ("partner/bob.pem", "partner/bob.key");

    // The first connection waits for the CRL, then is served.
    let (code, body, took) = curl_status(d, s.port, "localhost", alice, alice_key);
    assert_eq!(code, 200, "{body}");
    println!("first connection, CRL fetched meanwhile: {took:.3} s");
    let (code, body, _) = curl_status(d, s.port, "localhost", bob, bob_key);
    assert_eq!(code, 200, "{body}");

    // The partner revokes bob and publishes a new CRL (the old one is good for an hour); bob's
    // live connection is closed within a second of the node learning it (refresh_secs = 1).
    let live = LiveConnection::open(&openssl, d, s.port, "localhost", bob, bob_key);
    partner.revoke("bob");
    partner.crl(3600, &www.join("partner.crl"));
    let published = std::time::Instant::now();
    live.wait_closed();
    let closed = published.elapsed().as_secs_f64();
    println!("live connection closed {closed:.3} s after the partner published its new CRL");
    let why = s.wait_for("no longer admitted");
    assert!(
        why.contains("\"reason\":\"revoked\"") && why.contains(&format!("in the CRL from {url}")),
        "{why}"
    );
    assert!(closed < 4.0, "{closed:.3} s");
    let mut last = String::new();
    while published.elapsed() < std::time::Duration::from_secs(10) {
        let (code, body, _) = curl_status(d, s.port, "localhost", bob, bob_key);
        if code == 403 {
            last = body;
            break;
        }
        last = body;
    }
    println!(
        "revoked by the partner's new CRL: refused {:.3} s after it was published",
        published.elapsed().as_secs_f64()
    );
    assert!(
        last.contains("\"error\":\"revoked\"")
            && last.contains(&url)
            && last.contains("keyCompromise"),
        "{last}"
    );
    let (code, body, _) = curl_status(d, s.port, "localhost", alice, alice_key);
    assert_eq!(code, 200, "alice is still good: {body}");

    // explain names the source and its age.
    let r = crate::portcullis(
        d,
        &[
            "explain",
            "--domain",
            "localhost",
            "--json",
            "--data-dir",
            "data",
            bob,
        ],
    );
    let trace: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(trace["revocation"]["decision"], "refuse", "{trace}");
    assert_eq!(trace["revocation"]["sources"][0]["url"], url, "{trace}");

    // The admin API (and the console's Revocation page) lists the source and its freshness.
    let (status, sources) = crate::control::api(
        d,
        &s,
        "GET",
        "/v1/revocation/sources",
        None,
        crate::control::Auth::Certificate,
    );
    assert_eq!(status, 200, "{sources}");
    let listed = &sources["items"][0];
    assert!(
        listed["kind"] == "crl" && listed["url"] == url.as_str() && listed["revoked"] == 1,
        "{sources}"
    );

    // A CRL that runs out in 3 s, then the web server goes away: once it is past nextUpdate
    // and cannot be fetched again, alice is refused, the message naming the URL.
    partner.crl(3, &www.join("partner.crl"));
    let number = std::fs::read_to_string(d.join("partner/crlnumber")).unwrap();
    let number = u64::from_str_radix(number.trim(), 16).unwrap() - 1;
    s.wait_for(&format!("\"crl_number\":\"{number}\""));
    drop(web);
    let gone = std::time::Instant::now();
    let mut last = String::new();
    while gone.elapsed() < std::time::Duration::from_secs(15) {
        let (code, body, _) = curl_status(d, s.port, "localhost", alice, alice_key);
        last = body;
        if code == 403 {
            break;
        }
    }
    assert!(
        last.contains("\"error\":\"crl-expired\"")
            && last.contains(&url)
            && last.contains("the last fetch failed"),
        "{last}"
    );
    let metrics = s.metrics(d);
    assert!(
        metrics.contains("portcullis_revocation_fetches_total{kind=\"crl\"")
            && metrics.contains("portcullis_revocations_learned_total{source=\"crl\"} 1"),
        "{metrics}"
    );
}

/// A partner CA's OCSP responder (`openssl ocsp -index`), asked off the handshake path: with
/// `ocsp = "hard"` a never-seen certificate's first connection is refused asking to retry (or,
/// with `wait_ms`, waits for the answer); with `"soft"` it is admitted at once and its live
/// connection closed within a second of the responder answering revoked; a responder that
/// hangs slows no other client's handshake.
#[test]
fn a_partner_cas_ocsp_responder_is_asked_off_the_handshake_path() {
    let Some(openssl) = require_tool("openssl") else {
        return;
    };
    let Some(python) = require_tool("python3") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/scripts");
    let (_hang, hang_port) = crate::serve::python_server(
        &python,
        &[scripts.join("revocation_sources.py").to_str().unwrap()],
        d,
    );
    let partner = PartnerCa::create(&openssl, &d.join("partner"));
    let mut responder = std::process::Command::new(&openssl)
        .args([
            "ocsp",
            "-index",
            "index.txt",
            "-port",
            "0",
            "-rsigner",
            "partner-ca.pem",
            "-rkey",
            "partner-ca.key",
            "-CA",
            "partner-ca.pem",
        ])
        .current_dir(d.join("partner"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(responder.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    let _responder = crate::serve::Killed(responder);
    let ocsp_port = first
        .split_whitespace()
        .nth(1)
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("openssl ocsp printed {first:?}"));
    let ocsp_url = format!("http://127.0.0.1:{ocsp_port}");
    for who in ["carol", "dave", "erin"] {
        partner.issue(who, &format!("authorityInfoAccess = OCSP;URI:{ocsp_url}"));
    }
    partner.issue(
        "hank",
        &format!("authorityInfoAccess = OCSP;URI:http://127.0.0.1:{hang_port}/hang"),
    );
    let domain = |host: &str, ocsp: &str, wait: u32| {
        format!(
            "[[domain]]\nhostname = \"{host}\"\ncertificate = \"auto\"\n\
             [domain.mtls]\nmode = \"required\"\ntruststore = \"partner/partner-ca.pem\"\non_failure = \"http\"\n\
             revocation = {{ ocsp = \"{ocsp}\", wait_ms = {wait}, refresh_secs = 1 }}\n\
             [[domain.mapping]]\nupstream = \"builtin:echo\"\n"
        )
    };
    let config = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\"]\n{}{}{}",
        domain("soft.test", "soft", 0),
        domain("hard.test", "hard", 0),
        domain("wait.test", "hard", 2000),
    );
    let s = Server::start(d, &config);
    let pair = |who: &str| (format!("partner/{who}.pem"), format!("partner/{who}.key"));

    // hard, no wait: dave's first connection is refused, asking to retry; a moment later, in.
    let (cert, key) = pair("dave");
    let (code, body, _) = curl_status(d, s.port, "hard.test", &cert, &key);
    assert!(
        code == 403 && body.contains("revocation-unknown") && body.contains("retry"),
        "{body}"
    );
    let asked = std::time::Instant::now();
    let mut code = 0;
    while asked.elapsed() < std::time::Duration::from_secs(5) && code != 200 {
        (code, _, _) = curl_status(d, s.port, "hard.test", &cert, &key);
    }
    assert_eq!(code, 200, "dave is good once the responder answered");

    // hard with a wait: erin's first connection waits for the answer and is served.
    let (cert, key) = pair("erin");
    let (code, body, took) = curl_status(d, s.port, "wait.test", &cert, &key);
    assert_eq!(code, 200, "{body}");
    println!("hard with wait_ms: first connection served after {took:.3} s");

    // A responder that hangs: soft admits hank at once; hard with a wait refuses after the
    // wait, saying so; and meanwhile other clients' handshakes are not slowed.
    let (hank, hank_key) = pair("hank");
    let (code, body, took) = curl_status(d, s.port, "soft.test", &hank, &hank_key);
    assert_eq!(code, 200, "soft admits while the responder hangs: {body}");
    assert!(took < 2.0, "soft does not wait: {took:.3} s");
    let waiting = std::thread::spawn({
        let d = d.to_path_buf();
        let port = s.port;
        move || curl_status(&d, port, "wait.test", &hank, &hank_key)
    });
    let (cert, key) = pair("carol");
    let mut slowest: f64 = 0.0;
    for _ in 0..10 {
        let (code, body, took) = curl_status(d, s.port, "soft.test", &cert, &key);
        assert_eq!(code, 200, "{body}");
        slowest = slowest.max(took);
    }
    println!("while a responder hangs: slowest of 10 other connections {slowest:.3} s");
    assert!(slowest < 1.5, "{slowest:.3} s");
    let (code, body, took) = waiting.join().unwrap();
    assert!(
        code == 403 && body.contains("revocation-unknown") && body.contains("no answer within"),
        "{body}"
    );
    assert!(
        (1.5..6.0).contains(&took),
        "refused after the 2 s wait: {took:.3} s"
    );

    // soft: carol's live connection is closed within a second of the responder answering
    // revoked (asked again every second: refresh_secs = 1).
    let (cert, key) = pair("carol");
    let live = LiveConnection::open(&openssl, d, s.port, "soft.test", &cert, &key);
    partner.revoke("carol");
    let revoked = std::time::Instant::now();
    live.wait_closed();
    let closed = revoked.elapsed().as_secs_f64();
    println!(
        "soft: live connection closed {closed:.3} s after the partner revoked (responder asked every second)"
    );
    assert!(closed < 4.0, "{closed:.3} s");
    s.wait_for("closed");
    let (code, body, _) = curl_status(d, s.port, "soft.test", &cert, &key);
    assert!(
        code == 403 && body.contains("\"error\":\"revoked\"") && body.contains(&ocsp_url),
        "{body}"
    );
    let metrics = s.metrics(d);
    assert!(
        metrics.contains("portcullis_ocsp_fetched_answers_total{status=\"revoked\"}"),
        "{metrics}"
    );
}
