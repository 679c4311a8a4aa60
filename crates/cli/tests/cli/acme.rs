//! ACME with Let's Encrypt's test CA, `pebble`, and its challenge test server (whose DNS sends
//! every name to 127.0.0.1): certificates ordered by TLS-ALPN-01 on a mutual-TLS listener and
//! by HTTP-01 on the node's port-80 listener, stored in the registry, served without a restart
//! and renewed before they expire.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_testkit::{require_tool, run, temp_dir};

use crate::cluster::free_port;
use crate::control::cli_json;
use crate::serve::Server;
use crate::*;

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (up to 20 s) until `probe` succeeds.
fn until(what: &str, mut probe: impl FnMut() -> bool) {
    let start = Instant::now();
    while !probe() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: not within 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The certificate `host` is served with on `port` (presenting alice's certificate): whether it
/// verifies against `ca` and its serial.
fn served(d: &Path, openssl: &Path, port: u16, host: &str, ca: &str) -> (bool, String) {
    let out = run(
        openssl,
        &[
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            host,
            "-CAfile",
            ca,
            "-cert",
            "alice.pem",
            "-key",
            "alice.key",
        ],
        d,
    );
    let pem_start = out.stdout.find("-----BEGIN CERTIFICATE-----");
    let pem_end = out.stdout.find("-----END CERTIFICATE-----");
    let (Some(a), Some(b)) = (pem_start, pem_end) else {
        return (false, String::new());
    };
    std::fs::write(
        d.join("served.pem"),
        &out.stdout[a..b + "-----END CERTIFICATE-----".len()],
    )
    .unwrap();
    let serial = run(
        openssl,
        &["x509", "-in", "served.pem", "-noout", "-serial"],
        d,
    )
    .ok();
    (
        out.stdout.contains("Verify return code: 0 (ok)"),
        serial.stdout.trim().to_string(),
    )
}

/// curl and openssl, when pebble and its challenge test server are installed too.
fn tools() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    require_tool("pebble")?;
    require_tool("pebble-challtestsrv")?;
    Some((require_tool("curl")?, require_tool("openssl")?))
}

/// Let's Encrypt's test CA and its challenge test server (whose DNS answers 127.0.0.1 for every
/// name), validating on `tls_port` (TLS-ALPN-01) and `http_port` (HTTP-01); killed on drop.
struct Pebble {
    directory: String,
    mgmt_port: u16,
    _pebble: Killed,
    _challtestsrv: Killed,
}

impl Pebble {
    fn start(d: &Path, curl: &Path, tls_port: u16, http_port: u16, validity_secs: u32) -> Pebble {
        let pebble = require_tool("pebble").unwrap();
        let challtestsrv = require_tool("pebble-challtestsrv").unwrap();
        leaf(d, "server", "pebble", "root", &["--san", "ip:127.0.0.1"]);
        let (dir_port, mgmt_port, dns_port, chall_port) =
            (free_port(), free_port(), free_port(), free_port());
        let challtestsrv = Killed(
            Command::new(challtestsrv)
                .args([
                    "-dns01",
                    &format!("127.0.0.1:{dns_port}"),
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                    "-management",
                    &format!("127.0.0.1:{chall_port}"),
                    "-defaultIPv6",
                    "",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        std::fs::write(
            d.join("pebble.json"),
            format!(
                r#"{{"pebble": {{"listenAddress": "127.0.0.1:{dir_port}", "managementListenAddress": "127.0.0.1:{mgmt_port}",
                "certificate": "pebble.pem", "privateKey": "pebble.key", "httpPort": {http_port}, "tlsPort": {tls_port},
                "ocspResponderURL": "", "externalAccountBindingRequired": false, "certificateValidityPeriod": {validity_secs}}}}}"#
            ),
        )
        .unwrap();
        let pebble = Killed(
            Command::new(pebble)
                .args([
                    "-config",
                    "pebble.json",
                    "-dnsserver",
                    &format!("127.0.0.1:{dns_port}"),
                ])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_AUTHZREUSE", "0")
                .current_dir(d)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let directory = format!("https://127.0.0.1:{dir_port}/dir");
        until("pebble's directory", || {
            run(curl, &["-sSf", "--cacert", "root/ca.pem", &directory], d).code == 0
        });
        until("the challenge test server", || {
            run(
                curl,
                &[
                    "-sS",
                    "-o",
                    "/dev/null",
                    &format!("http://127.0.0.1:{chall_port}/"),
                ],
                d,
            )
            .code
                == 0
        });
        Pebble {
            directory,
            mgmt_port,
            _pebble: pebble,
            _challtestsrv: challtestsrv,
        }
    }

    /// Pebble's root (made for this run), written to `to`.
    fn root(&self, d: &Path, curl: &Path, to: &[&Path]) {
        let pem = run(
            curl,
            &[
                "-sSf",
                "--cacert",
                "root/ca.pem",
                &format!("https://127.0.0.1:{}/roots/0", self.mgmt_port),
            ],
            d,
        )
        .ok()
        .stdout;
        for dir in to {
            std::fs::write(dir.join("acme-root.pem"), &pem).unwrap();
        }
    }
}

#[test]
fn acme_certificates_are_ordered_by_tls_alpn_and_http_challenges_served_and_renewed() {
    let Some((curl, openssl)) = tools() else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    root(d);
    intermediate(d, "int", "root");
    leaf(d, "client", "alice", "int", &[]);
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(d.join("root/ca.pem")).unwrap(),
        std::fs::read_to_string(d.join("int/ca.pem")).unwrap()
    );
    std::fs::write(d.join("trust-a.pem"), bundle).unwrap();
    portcullis(d, &["cluster-key", "generate", "--out", "cluster.key"]).ok();

    // The gateway's ports first: pebble validates on them. Certificates valid 20 s: renewed at
    // two thirds of their lifetime, within the test.
    let (tls_port, http_port) = (free_port(), free_port());
    let pebble = Pebble::start(d, &curl, tls_port, http_port, 20);
    let directory = pebble.directory.clone();

    // A mutual-TLS domain whose certificate comes by TLS-ALPN-01: the CA's validation server has
    // no client certificate, and is answered anyway.
    let config = format!(
        r#"cluster_key_file = "cluster.key"
[admin]
address = "127.0.0.1:0"

[[listener]]
address = "127.0.0.1:{tls_port}"

[acme]
http_listen = "127.0.0.1:{http_port}"
ca_file = "root/ca.pem"

[[domain]]
hostname = "alpn.acme.test"
certificate = "acme"
acme = {{ directory = "{directory}", contact = ["mailto:ops@acme.test"] }}
[domain.mtls]
mode = "required"
truststore = "trust-a.pem"
[[domain.mapping]]
upstream = "builtin:echo"
"#
    );
    let s = Server::start(d, &config);
    let responder = s.printed("the HTTP-01 responder", |l| {
        l.contains("portcullis ACME HTTP-01 responder on http://127.0.0.1")
    });
    assert!(responder.ends_with(&format!(":{http_port}")), "{responder}");
    let issued = |host: &'static str| {
        move |l: &str| l.contains("ACME certificate issued") && l.contains(&format!("\"{host}\""))
    };
    let first = s.printed("the TLS-ALPN-01 certificate", issued("alpn.acme.test"));
    assert!(first.contains("tls-alpn-01"), "{first}");
    assert!(
        s.has_printed("answered an ACME TLS-ALPN-01 challenge"),
        "the CA validated through the gateway"
    );
    // Pebble's root, made for this run.
    pebble.root(d, &curl, &[d]);
    // Served without a restart, trusted through the ACME CA, and the domain still requires
    // client certificates.
    // (Served from the reload that follows the registry change the order made.)
    until(
        "the ordered certificate, verified against pebble's root",
        || served(d, &openssl, tls_port, "alpn.acme.test", "acme-root.pem").0,
    );
    let (_, serial) = served(d, &openssl, tls_port, "alpn.acme.test", "acme-root.pem");
    let url = format!("https://alpn.acme.test:{tls_port}/");
    let resolve = format!("alpn.acme.test:{tls_port}:127.0.0.1");
    let ok = run(
        &curl,
        &[
            "-sS",
            "--resolve",
            &resolve,
            "--cacert",
            "acme-root.pem",
            "--cert",
            "alice.pem",
            "--key",
            "alice.key",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ],
        d,
    );
    assert_eq!(ok.stdout, "200", "{}", ok.stderr);
    let anonymous = run(
        &curl,
        &[
            "-sS",
            "--resolve",
            &resolve,
            "--cacert",
            "acme-root.pem",
            &url,
        ],
        d,
    );
    assert_ne!(anonymous.code, 0, "no client certificate, no entry");
    // Kept in the registry under the cluster key, as `acme:HOST`.
    let certs = cli_json(d, &["server-cert", "list"]);
    assert!(certs.to_string().contains("acme:alpn.acme.test"), "{certs}");

    // HTTP-01, for a domain put later: answered on the port-80 listener.
    std::fs::write(
        d.join("http.toml"),
        format!(
            "hostname = \"http.acme.test\"\ncertificate = \"acme\"\n\
             acme = {{ directory = \"{directory}\", challenge = \"http-01\" }}\n\
             [[mapping]]\nupstream = \"builtin:echo\"\n"
        ),
    )
    .unwrap();
    cli_json(d, &["domain", "put", "--file", "http.toml"]);
    let http = s.printed("the HTTP-01 certificate", issued("http.acme.test"));
    assert!(http.contains("http-01"), "{http}");
    let resolve_http = format!("http.acme.test:{tls_port}:127.0.0.1");
    until("the HTTP-01 certificate served", || {
        run(
            &curl,
            &[
                "-sS",
                "--resolve",
                &resolve_http,
                "--cacert",
                "acme-root.pem",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("https://http.acme.test:{tls_port}/"),
            ],
            d,
        )
        .stdout
            == "200"
    });
    // Everything else on the port-80 listener goes to HTTPS.
    let moved = run(
        &curl,
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "-H",
            "Host: http.acme.test",
            &format!("http://127.0.0.1:{http_port}/a?b=1"),
        ],
        d,
    );
    assert_eq!(moved.stdout, "308 https://http.acme.test/a?b=1");

    // Renewed before it expires (a third of its 20 s lifetime before the end), and the new
    // certificate served at once.
    until("the renewal", || {
        s.lines_with("ACME certificate issued")
            .iter()
            .filter(|l| l.contains("\"alpn.acme.test\""))
            .count()
            >= 2
    });
    until("the renewed certificate served", || {
        let (verified, now) = served(d, &openssl, tls_port, "alpn.acme.test", "acme-root.pem");
        verified && now != serial
    });
}

/// Two nodes sharing PostgreSQL: one orders (the registry's lease), the node the CA reaches
/// answers the challenge whichever node ordered (the answers travel through the registry), and
/// both serve the one certificate.
#[test]
fn two_nodes_order_an_acme_certificate_once_and_both_serve_it() {
    let Some((curl, openssl)) = tools() else {
        return;
    };
    let Some(database) = crate::control::fresh_postgres("acme") else {
        return;
    };
    let tmp = temp_dir();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(db.join("root")).unwrap();
    root(&da);
    intermediate(&da, "int", "root");
    leaf(&da, "client", "alice", "int", &[]);
    crate::nodes::share(&da, &db, &["alice"]);
    std::fs::copy(da.join("root/ca.pem"), db.join("root/ca.pem")).unwrap();
    portcullis(&da, &["cluster-key", "generate", "--out", "cluster.key"]).ok();
    std::fs::copy(da.join("cluster.key"), db.join("cluster.key")).unwrap();
    // The CA validates on B, whichever node orders.
    let (tls_a, tls_b, http_a, http_b) = (free_port(), free_port(), free_port(), free_port());
    let pebble = Pebble::start(&da, &curl, tls_b, http_b, 3600);
    let config = |tls: u16, http: u16| {
        crate::control::on(
            Some(&database),
            format!(
                "cluster_key_file = \"cluster.key\"\n[admin]\naddress = \"127.0.0.1:0\"\n\
                 [[listener]]\naddress = \"127.0.0.1:{tls}\"\n\
                 [acme]\nhttp_listen = \"127.0.0.1:{http}\"\nca_file = \"root/ca.pem\"\n\
                 [[domain]]\nhostname = \"first.test\"\ncertificate = \"auto\"\n\
                 [[domain.mapping]]\nupstream = \"builtin:echo\"\n"
            ),
        )
    };
    let a = Server::start(&da, &config(tls_a, http_a));
    let b = Server::start(&db, &config(tls_b, http_b));
    std::fs::write(
        da.join("both.toml"),
        format!(
            "hostname = \"both.acme.test\"\ncertificate = \"acme\"\n\
             acme = {{ directory = \"{}\" }}\n[[mapping]]\nupstream = \"builtin:echo\"\n",
            pebble.directory
        ),
    )
    .unwrap();
    cli_json(&da, &["domain", "put", "--file", "both.toml"]);
    let issued = |s: &Server| {
        s.lines_with("ACME certificate issued")
            .iter()
            .filter(|l| l.contains("\"both.acme.test\""))
            .count()
    };
    until("the certificate ordered by one of the nodes", || {
        issued(&a) + issued(&b) >= 1
    });
    pebble.root(&da, &curl, &[&da, &db]);
    let mut serials = Vec::new();
    for (dir, port) in [(&da, tls_a), (&db, tls_b)] {
        until("the ordered certificate served", || {
            served(dir, &openssl, port, "both.acme.test", "acme-root.pem").0
        });
        serials.push(served(dir, &openssl, port, "both.acme.test", "acme-root.pem").1);
    }
    assert_eq!(serials[0], serials[1], "one certificate for the cluster");
    assert_eq!(issued(&a) + issued(&b), 1, "ordered once, by one node");
    for s in [&a, &b] {
        assert!(!s.has_printed("ACME order failed"));
    }
    let ordered_by = if issued(&a) == 1 { "A" } else { "B" };
    println!("ordered by node {ordered_by}; the CA validated through node B");
}
