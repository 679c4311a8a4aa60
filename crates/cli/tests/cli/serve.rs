//! `portcullis serve` with real clients: curl (HTTP/1.1 and HTTP/2) and `openssl s_client`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use portcullis_testkit::{Run, TempDir, expired_client_certificate, require_tool, run, temp_dir};
use serde_json::Value;

use crate::*;

/// A running `portcullis serve`, killed on drop.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) port: u16,
    pub(crate) admin_port: u16,
    /// Every listener's port, in configuration order.
    pub(crate) ports: Vec<u16>,
    lines: Receiver<String>,
    /// Every line received so far, matched or skipped.
    history: std::cell::RefCell<Vec<String>>,
}

impl Server {
    pub(crate) fn start(dir: &Path, config: &str) -> Server {
        Server::start_with(dir, config, &[])
    }

    /// [`Server::start`] with environment variables set for the process.
    pub(crate) fn start_with(dir: &Path, config: &str, env: &[(&str, &str)]) -> Server {
        std::fs::write(dir.join("gw.toml"), config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["serve", "--config", "gw.toml", "--data-dir", "data"])
            .envs(env.iter().copied())
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("stderr: {line}"));
            }
        });
        let mut server = Server {
            child,
            port: 0,
            admin_port: 0,
            ports: Vec::new(),
            lines,
            history: Default::default(),
        };
        let line = server.wait_for("portcullis admin API on https://");
        server.admin_port = line.rsplit(':').next().unwrap().trim().parse().unwrap();
        let line = server.wait_for("portcullis is serving on ");
        let addrs = line
            .split("serving on ")
            .nth(1)
            .unwrap()
            .split(" (config")
            .next()
            .unwrap();
        server.ports = addrs
            .split(", ")
            .map(|a| a.rsplit(':').next().unwrap().parse().unwrap())
            .collect();
        server.port = server.ports[0];
        server
    }

    /// Waits (up to 30 s) for an output line containing `needle` and returns it.
    pub(crate) fn wait_for(&self, needle: &str) -> String {
        self.next_line(needle, |line| line.contains(needle))
    }

    /// Returns the first line, printed at any time (also before this call), that satisfies
    /// `wanted`, waiting up to 30 s for it.
    pub(crate) fn printed(&self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        if let Some(line) = self.history.borrow().iter().find(|l| wanted(l)) {
            return line.clone();
        }
        self.next_line(what, wanted)
    }

    /// Waits until the gateway runs a configuration that includes the registry's configuration
    /// change numbered `marker` (a reload line says which it includes; markers only grow, so a
    /// line printed before this call counts too).
    pub(crate) fn wait_for_config(&self, marker: i64) {
        self.printed("configuration reloaded", |line| {
            line.contains("configuration reloaded")
                && serde_json::from_str::<Value>(line).is_ok_and(|v| {
                    v["result"] == "ok" && v["config_marker"].as_i64().is_some_and(|m| m >= marker)
                })
        });
    }

    /// Waits until this node's heartbeat reports a snapshot that includes change `marker`.
    pub(crate) fn wait_for_heartbeat(&self, marker: i64) {
        self.printed("heartbeat written", |line| {
            line.contains("heartbeat written")
                && serde_json::from_str::<Value>(line)
                    .is_ok_and(|v| v["marker"].as_i64().is_some_and(|m| m >= marker))
        });
    }

    /// Every line printed so far (this call included) that contains `needle`; never waits.
    pub(crate) fn lines_with(&self, needle: &str) -> Vec<String> {
        self.drain();
        self.history
            .borrow()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Whether a line printed so far (this call included) contains `needle`; never waits.
    pub(crate) fn has_printed(&self, needle: &str) -> bool {
        self.drain();
        self.history.borrow().iter().any(|l| l.contains(needle))
    }

    /// Takes every line printed so far off the queue (into the history), so that the next
    /// `wait_for` sees only what comes after this call.
    pub(crate) fn drain(&self) {
        while let Ok(line) = self.lines.try_recv() {
            self.history.borrow_mut().push(line);
        }
    }

    /// Waits until the gateway's registry snapshot includes the change numbered `marker`. The
    /// marker only grows, so a refresh printed before this call counts too.
    pub(crate) fn wait_for_marker(&self, marker: i64) {
        self.printed("registry snapshot refreshed", |line| {
            line.contains("registry snapshot refreshed")
                && serde_json::from_str::<Value>(line)
                    .is_ok_and(|v| v["marker"].as_i64().is_some_and(|m| m >= marker))
        });
    }

    /// Waits (up to 30 s) for the next line that satisfies `wanted`.
    pub(crate) fn next_line(&self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let mut seen = Vec::new();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    self.history.borrow_mut().push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let history = self.history.borrow();
                    let last = &history[history.len().saturating_sub(40)..];
                    panic!(
                        "no line with '{what}' within 30 s; the last lines:\n{}",
                        last.join("\n")
                    )
                }
            }
        }
    }

    /// The metrics text of the admin API (with the admin client certificate from `dir/data`).
    pub(crate) fn metrics(&self, dir: &Path) -> String {
        let curl_bin = require_tool("curl").unwrap();
        let url = format!("https://127.0.0.1:{}/metrics", self.admin_port);
        run(
            curl_bin,
            &[
                "-sS",
                "--cacert",
                "data/ca/ca.pem",
                "--cert",
                "data/admin/admin.pem",
                "--key",
                "data/admin/admin.key",
                &url,
            ],
            dir,
        )
        .ok()
        .stdout
    }

    /// Sends SIGHUP and returns the reload log line.
    pub(crate) fn reload(&self) -> String {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-HUP", &pid]).status().unwrap();
        self.wait_for("portcullis::reload")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed (and reaped) on drop.
pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a Python server script that prints the port it listens on as its first line.
pub(crate) fn python_server(python: &Path, args: &[&str], dir: &Path) -> (Killed, u16) {
    let mut child = Command::new(python)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let port = first
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("the server script printed {first:?}, not its port"));
    (Killed(child), port)
}

/// curl against `host` on the server's port, resolving to 127.0.0.1; returns the run with the
/// HTTP status as the last line of stdout.
pub(crate) fn curl(dir: &Path, server: &Server, host: &str, path: &str, extra: &[&str]) -> Run {
    curl_port(dir, server.port, host, path, extra)
}

pub(crate) fn curl_port(dir: &Path, port: u16, host: &str, path: &str, extra: &[&str]) -> Run {
    let curl = require_tool("curl").unwrap();
    let resolve = format!("{host}:{port}:127.0.0.1");
    let url = format!("https://{host}:{port}{path}");
    let mut args = vec![
        "-sS",
        "--max-time",
        "20",
        "--resolve",
        &resolve,
        "--cacert",
        "data/ca/ca.pem",
        "-w",
        "\n%{http_code} %{http_version}",
    ];
    args.extend(extra);
    args.push(&url);
    run(curl, &args, dir)
}

pub(crate) fn client(name: &str) -> [String; 4] {
    [
        "--cert".into(),
        format!("{name}.chain.pem"),
        "--key".into(),
        format!("{name}.key"),
    ]
}

pub(crate) fn with_client(c: &[String; 4]) -> Vec<&str> {
    c.iter().map(String::as_str).collect()
}

/// Status code and JSON body (if any) of a curl run.
pub(crate) fn answer(r: &Run) -> (u16, Value) {
    let (body, status) = r.stdout.rsplit_once('\n').unwrap_or(("", &r.stdout));
    let code = status
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// The test PKI: root A with an intermediate (and deeper ones), root B, clients under each.
pub(crate) fn pki(d: &Path) {
    root(d); // root/
    intermediate(d, "int", "root");
    intermediate(d, "i2", "int");
    intermediate(d, "i3", "i2");
    intermediate(d, "i4", "i3");
    portcullis(
        d,
        &["pki", "ca", "create", "--cn", "Root B", "--out", "rootb"],
    )
    .ok();
    leaf(d, "client", "alice", "int", &[]);
    leaf(d, "client", "carol", "int", &[]);
    leaf(d, "client", "four", "i3", &[]);
    leaf(d, "client", "five", "i4", &[]);
    leaf(d, "server", "srv", "int", &["--san", "dns:srv.test"]);
    leaf(d, "client", "bob", "rootb", &[]);
    let ca_pem = std::fs::read_to_string(d.join("int/ca.pem")).unwrap();
    let ca_key = std::fs::read_to_string(d.join("int/ca.key")).unwrap();
    let (cert, key) = expired_client_certificate(&ca_pem, &ca_key, "old");
    std::fs::write(d.join("old.chain.pem"), format!("{cert}{ca_pem}")).unwrap();
    std::fs::write(d.join("old.key"), key).unwrap();
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(d.join("root/ca.pem")).unwrap(),
        ca_pem
    );
    std::fs::write(d.join("trust-a.pem"), bundle).unwrap();
    std::fs::copy(d.join("rootb/ca.pem"), d.join("trust-b.pem")).unwrap();
    // An empty CRL for now; tests revoke by replacing it.
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
            "--out",
            "int.crl",
        ],
    )
    .ok();
}

pub(crate) fn revoke(d: &Path, who: &str) {
    let info = json(portcullis(
        d,
        &["pki", "inspect", "--json", &format!("{who}.pem")],
    ));
    let serial = info[0]["serial"].as_str().unwrap().to_string();
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
            "--out",
            "int.crl",
            "--force",
        ],
    )
    .ok();
}

const CONFIG: &str = r#"
[admin]
address = "127.0.0.1:0"

[[listener]]
address = "127.0.0.1:0"

[[domain]]
hostname = "a.test"
certificate = "auto"
[domain.mtls]
mode = "required"
truststore = "trust-a.pem"
crls = ["int.crl"]
[[domain.mapping]]
base_path = ""
upstream = "builtin:echo"
[[domain.mapping]]
base_path = "/api"
upstream = "builtin:echo"

[[domain]]
hostname = "*.b.test"
certificate = "auto"
[domain.mtls]
mode = "required"
truststore = "trust-b.pem"
on_failure = "http"
[[domain.mapping]]
upstream = "builtin:echo"

[[domain]]
hostname = "opt.test"
certificate = "auto"
[domain.mtls]
mode = "optional"
truststore = "trust-a.pem"
[[domain.mapping]]
base_path = "/public"
upstream = "builtin:echo"
client_certificate = "optional"
[[domain.mapping]]
base_path = "/private"
upstream = "builtin:echo"
"#;

fn setup() -> Option<(TempDir, Server)> {
    require_tool("curl")?;
    let tmp = temp_dir();
    pki(tmp.path());
    let server = Server::start(tmp.path(), CONFIG);
    Some((tmp, server))
}

#[test]
fn required_mode_admits_valid_chains_and_refuses_the_rest_in_the_handshake() {
    let Some((tmp, s)) = setup() else { return };
    let d = tmp.path();
    let alice = client("alice");
    let ok = curl(d, &s, "a.test", "/hello?q=1", &with_client(&alice));
    let (status, body) = answer(&ok);
    assert_eq!(status, 200, "{ok:?}");
    assert_eq!(body["path"], "/hello");
    assert_eq!(body["query"], "q=1");
    assert_eq!(body["identity"]["x-client-cert-verify"], "SUCCESS");
    assert_eq!(body["identity"]["x-client-cert-subject"], "CN=alice");
    assert!(
        body["identity"]["client-cert"]
            .as_str()
            .unwrap()
            .starts_with(":MII")
    );
    let chain = body["identity"]["client-cert-chain"].as_str().unwrap();
    assert_eq!(
        chain.matches(':').count(),
        4,
        "intermediate and root: {chain}"
    );
    let serial =
        json(portcullis(d, &["pki", "inspect", "--json", "alice.pem"]))[0]["serial"].clone();
    assert_eq!(body["identity"]["x-client-cert-serial"], serial);

    // Refused in the handshake: no certificate, another CA, expired, wrong EKU, 5 CA levels.
    for (who, reason) in [
        (None, "no-certificate"),
        (Some("bob"), "untrusted-issuer"),
        (Some("old"), "expired"),
        (Some("srv"), "wrong-usage"),
        (Some("five"), "chain-too-deep"),
    ] {
        let c = who.map(client);
        let args = c.as_ref().map(with_client).unwrap_or_default();
        let r = curl(d, &s, "a.test", "/", &args);
        assert_ne!(r.code, 0, "{who:?} must be refused: {r:?}");
        let log = s.wait_for("TLS handshake failed");
        assert!(
            log.contains(&format!("\"reason\":\"{reason}\"")),
            "{who:?}: {log}"
        );
        if let Some(w) = who
            && w != "old"
        {
            assert!(
                log.contains(&format!("CN={w}")),
                "the log names the presented certificate: {log}"
            );
        }
    }
    // Four CA levels are fine.
    let four = client("four");
    assert_eq!(
        answer(&curl(d, &s, "a.test", "/", &with_client(&four))).0,
        200
    );
}

#[test]
fn spoofed_identity_headers_are_stripped_and_prefixes_are_stripped() {
    let Some((tmp, s)) = setup() else { return };
    let d = tmp.path();
    let alice = client("alice");
    let mut args = with_client(&alice);
    args.extend([
        "-H",
        "X-Client-Cert-Subject: CN=admin",
        "-H",
        "Client-Cert: :AAAA:",
        "-H",
        "X-Forwarded-Client-Cert: By=spoof",
        "-H",
        "X-Client-Cert-Evil: 1",
    ]);
    let (status, body) = answer(&curl(d, &s, "a.test", "/api/v1/users", &args));
    assert_eq!(status, 200);
    assert_eq!(body["path"], "/v1/users", "the /api prefix is stripped");
    assert_eq!(body["identity"]["x-client-cert-subject"], "CN=alice");
    assert_ne!(body["identity"]["client-cert"], ":AAAA:");
    assert!(body["headers"].get("x-forwarded-client-cert").is_none());
    assert!(body["headers"].get("x-client-cert-evil").is_none());
    assert_eq!(body["headers"]["x-forwarded-proto"], "https");
    // HTTP/2 end to end, and the exact base path maps to "/".
    let r = curl(d, &s, "a.test", "/api", &with_client(&alice));
    assert!(r.stdout.ends_with(" 2"), "HTTP/2 negotiated: {}", r.stdout);
    assert_eq!(answer(&r).1["path"], "/");
    let r = curl(
        d,
        &s,
        "a.test",
        "/",
        &[with_client(&alice), vec!["--http1.1"]].concat(),
    );
    assert!(r.stdout.ends_with(" 1.1"), "{}", r.stdout);
    // A Host that is not the connection's domain.
    let (status, body) = answer(&curl(
        d,
        &s,
        "a.test",
        "/",
        &[with_client(&alice), vec!["-H", "Host: opt.test"]].concat(),
    ));
    assert_eq!(status, 421);
    assert_eq!(body["error"], "misdirected-request");
}

#[test]
fn domains_are_chosen_by_sni_with_their_own_truststores() {
    let Some((tmp, s)) = setup() else { return };
    let d = tmp.path();
    let (alice, bob) = (client("alice"), client("bob"));
    assert_eq!(
        answer(&curl(d, &s, "x.b.test", "/", &with_client(&bob))).0,
        200
    );
    // alice's CA is not trusted on *.b.test, whose failures are HTTP 403 with the reason.
    let (status, body) = answer(&curl(d, &s, "x.b.test", "/", &with_client(&alice)));
    assert_eq!(status, 403);
    assert_eq!(body["error"], "untrusted-issuer");
    let (status, body) = answer(&curl(d, &s, "x.b.test", "/", &[]));
    assert_eq!(status, 403);
    assert_eq!(body["error"], "no-certificate");
    let html = curl(
        d,
        &s,
        "x.b.test",
        "/",
        &[with_client(&alice), vec!["-H", "Accept: text/html"]].concat(),
    );
    assert!(
        html.stdout
            .contains("<h1>Your certificate is not trusted here</h1>")
            && html.stdout.contains("name=\"viewport\""),
        "{}",
        html.stdout
    );
    assert!(
        html.stdout.contains("<dd>CN=alice</dd>")
            && html.stdout.contains("<dd>CN=int</dd>")
            && html.stdout.contains("Valid until"),
        "the page shows the presented certificate: {}",
        html.stdout
    );
    assert!(
        !html.stdout.contains(&alice_id(d)),
        "no certificate id on the page: {}",
        html.stdout
    );
    // bob is not trusted on a.test.
    assert_ne!(curl(d, &s, "a.test", "/", &with_client(&bob)).code, 0);
    // No SNI (an IP address) and no default endpoint: refused.
    let curl_bin = require_tool("curl").unwrap();
    let url = format!("https://127.0.0.1:{}/", s.port);
    let r = run(curl_bin, &["-sS", "-k", "--max-time", "10", &url], d);
    assert_ne!(r.code, 0);
    assert!(s.wait_for("unknown-sni").contains("refused"));
}

/// alice's certificate id (SHA-256 of the DER, hex).
fn alice_id(d: &Path) -> String {
    let info = crate::portcullis(d, &["pki", "inspect", "--json", "alice.pem"]).ok();
    let v: Value = serde_json::from_str(&info.stdout).unwrap();
    v[0]["id"].as_str().unwrap().to_string()
}

#[test]
fn optional_mode_forwards_the_verify_status_and_guards_required_mappings() {
    let Some((tmp, s)) = setup() else { return };
    let d = tmp.path();
    let (status, body) = answer(&curl(d, &s, "opt.test", "/public/x", &[]));
    assert_eq!(status, 200);
    assert_eq!(body["identity"]["x-client-cert-verify"], "NONE");
    let bob = client("bob");
    let (status, body) = answer(&curl(d, &s, "opt.test", "/public/x", &with_client(&bob)));
    assert_eq!(status, 200);
    assert_eq!(
        body["identity"]["x-client-cert-verify"],
        "FAILED:untrusted-issuer"
    );
    assert!(
        body["identity"].get("x-client-cert-subject").is_none(),
        "unverified identities are not forwarded"
    );
    let (status, body) = answer(&curl(d, &s, "opt.test", "/private/x", &[]));
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("no-certificate"))
    );
    let alice = client("alice");
    let (status, body) = answer(&curl(d, &s, "opt.test", "/private/x", &with_client(&alice)));
    assert_eq!(status, 200);
    assert_eq!(body["identity"]["x-client-cert-verify"], "SUCCESS");
    assert_eq!(
        answer(&curl(d, &s, "opt.test", "/nowhere", &with_client(&alice))).0,
        404
    );
}

#[test]
fn a_failed_reload_keeps_the_running_state() {
    let Some((tmp, s)) = setup() else { return };
    let d = tmp.path();
    let alice = client("alice");
    assert_eq!(
        answer(&curl(d, &s, "a.test", "/", &with_client(&alice))).0,
        200
    );
    let good = std::fs::read_to_string(d.join("gw.toml")).unwrap();
    std::fs::write(d.join("gw.toml"), format!("{good}\nbogus_key = 1\n")).unwrap();
    let line = s.reload();
    assert!(line.contains("\"result\":\"failed\""), "{line}");
    assert!(line.contains("bogus_key"), "the log names the key: {line}");
    assert_eq!(
        answer(&curl(d, &s, "a.test", "/", &with_client(&alice))).0,
        200
    );
    // A truststore that is not PEM.
    std::fs::write(d.join("gw.toml"), &good).unwrap();
    std::fs::write(d.join("trust-a.pem"), "not a certificate").unwrap();
    let line = s.reload();
    assert!(
        line.contains("\"result\":\"failed\"") && line.contains("trust-a.pem"),
        "{line}"
    );
    assert_eq!(
        answer(&curl(d, &s, "a.test", "/", &with_client(&alice))).0,
        200
    );
}

#[test]
fn a_reload_binds_changes_and_closes_listeners() {
    let Some((tmp, s)) = setup() else { return };
    let d = tmp.path();
    let alice = client("alice");
    let good = std::fs::read_to_string(d.join("gw.toml")).unwrap();
    // The file watcher may reload before the signal does: the line that says it is awaited.
    let reload_saying = |needle: &str| {
        s.reload();
        s.printed(needle, |l| {
            l.contains("portcullis::reload") && l.contains(needle)
        })
    };
    // A new [[listener]] is bound, and the reload line says where.
    let with = |extra: &str| {
        good.replacen(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n",
            &format!("[[listener]]\naddress = \"127.0.0.1:0\"\n{extra}"),
            1,
        )
    };
    std::fs::write(
        d.join("gw.toml"),
        with("\n[[listener]]\naddress = \"127.0.0.2:0\"\n"),
    )
    .unwrap();
    let line = reload_saying("bound 127.0.0.2:");
    assert!(line.contains("\"result\":\"ok\""), "{line}");
    let port: u16 = line
        .split("bound 127.0.0.2:")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no bound listener in {line}"));
    let on_new = |path: &str| {
        let curl = require_tool("curl").unwrap();
        let resolve = format!("a.test:{port}:127.0.0.2");
        let url = format!("https://a.test:{port}{path}");
        let mut args = vec![
            "-sS",
            "--max-time",
            "10",
            "--resolve",
            &resolve,
            "--cacert",
            "data/ca/ca.pem",
            "-w",
            "\n%{http_code}",
        ];
        args.extend(with_client(&alice));
        args.push(&url);
        run(curl, &args, d)
    };
    assert_eq!(answer(&on_new("/")).0, 200);
    // What it speaks changes for the next connection.
    std::fs::write(
        d.join("gw.toml"),
        with("\n[[listener]]\naddress = \"127.0.0.2:0\"\nprotocols = [\"mqtt\"]\n"),
    )
    .unwrap();
    reload_saying(&format!("127.0.0.2:{port} speaks mqtt"));
    assert_ne!(answer(&on_new("/")).0, 200);
    // An address that cannot be bound fails the reload and changes nothing.
    std::fs::write(
        d.join("gw.toml"),
        with(&format!(
            "\n[[listener]]\naddress = \"127.0.0.2:0\"\nprotocols = [\"mqtt\"]\n\n[[listener]]\naddress = \"127.0.0.1:{}\"\n",
            s.port
        )),
    )
    .unwrap();
    let line = reload_saying("\"result\":\"failed\"");
    assert!(line.contains(&s.port.to_string()), "{line}");
    assert_eq!(
        answer(&curl(d, &s, "a.test", "/", &with_client(&alice))).0,
        200
    );
    // Removed, it stops accepting; the first listener serves on.
    std::fs::write(d.join("gw.toml"), &good).unwrap();
    reload_saying(&format!("closed 127.0.0.2:{port}"));
    let refused = on_new("/");
    assert_ne!(refused.code, 0, "{refused:?}");
    assert_eq!(
        answer(&curl(d, &s, "a.test", "/", &with_client(&alice))).0,
        200
    );
}

#[test]
fn a_revoked_certificate_cannot_come_back_through_a_resumed_session() {
    let Some((tmp, s)) = setup() else { return };
    let d = tmp.path();
    let Some(openssl_bin) = require_tool("openssl") else {
        return;
    };
    let connect = format!("127.0.0.1:{}", s.port);
    let s_client = |extra: &[&str]| -> String {
        let mut args = vec![
            "s_client",
            "-connect",
            &connect,
            "-servername",
            "a.test",
            "-tls1_2",
            "-cert",
            "carol.pem",
            "-key",
            "carol.key",
            "-cert_chain",
            "int/ca.pem",
            "-CAfile",
            "data/ca/ca.pem",
            "-ign_eof",
        ];
        args.extend(extra);
        let mut child = Command::new(&openssl_bin)
            .args(&args)
            .current_dir(d)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            .unwrap();
        let out = child.wait_with_output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let first = s_client(&["-sess_out", "sess.pem"]);
    assert!(first.contains("HTTP/1.1 200"), "{first}");
    // Control: in the same generation the session resumes (so the test below can fail).
    let again = s_client(&["-sess_in", "sess.pem"]);
    assert!(again.contains("Reused, TLSv1.2"), "{again}");
    assert!(again.contains("HTTP/1.1 200"), "{again}");
    // Revoke carol, reload, and try to resume.
    revoke(d, "carol");
    let line = s.reload();
    assert!(line.contains("\"result\":\"ok\""), "{line}");
    let after = s_client(&["-sess_in", "sess.pem"]);
    assert!(
        !after.contains("Reused"),
        "the old session must not resume: {after}"
    );
    assert!(!after.contains("HTTP/1.1 200"), "{after}");
    let log = s.wait_for("TLS handshake failed");
    assert!(log.contains("\"reason\":\"revoked\""), "{log}");
}

#[test]
fn bad_configurations_are_refused_with_the_key_and_line() {
    let tmp = temp_dir();
    let d = tmp.path();
    let check = |text: &str| {
        std::fs::write(d.join("bad.toml"), text).unwrap();
        portcullis(
            d,
            &[
                "serve",
                "--config",
                "bad.toml",
                "--data-dir",
                "data",
                "--check-config",
            ],
        )
    };
    let r = check("[[listener]]\naddress = \"127.0.0.1:0\"\nlisten_backlog = 5\n");
    assert_clean_error(&r, 2, "listen_backlog");
    assert!(r.stderr.contains("line 3"), "{}", r.stderr);
    let r = check(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[domain]]\nhostname = \"a.test\"\ncertificate = \"auto\"\n[domain.mtls]\nmode = \"required\"\n",
    );
    assert_clean_error(&r, 2, "truststore");
    std::fs::write(d.join("junk.pem"), "junk").unwrap();
    let r = check(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[domain]]\nhostname = \"a.test\"\ncertificate = \"auto\"\n[domain.mtls]\nmode = \"required\"\ntruststore = \"junk.pem\"\n",
    );
    assert_clean_error(&r, 2, "junk.pem");
    let r = check(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[domain]]\nhostname = \"a.test\"\ncertificate = \"auto\"\n[[domain.mapping]]\nupstream = \"ftp://x\"\n",
    );
    assert_clean_error(&r, 2, "ftp://x");
    let ok = check(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[domain]]\nhostname = \"a.test\"\ncertificate = \"auto\"\n[[domain.mapping]]\nupstream = \"builtin:echo\"\n",
    );
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(ok.stdout.contains("OK"));
    // Checking has no side effects: no data directory, CA, certificate or database was made.
    assert!(!d.join("data").exists());
    let r = check(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[domain]]\nhostname = \"a.test\"\ncertificate = \"auto\"\n[domain.response_headers]\nContent-Length = \"5\"\n[[domain.mapping]]\nupstream = \"builtin:echo\"\n",
    );
    assert_clean_error(&r, 2, "response_headers: 'Content-Length'");
    let r = check(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[domain]]\nhostname = \"a.test\"\ncertificate = \"auto\"\n[domain.response_headers]\n\"Bad Name\" = \"x\"\n[[domain.mapping]]\nupstream = \"builtin:echo\"\n",
    );
    assert_clean_error(&r, 2, "'Bad Name' is not a valid header name");
    let r = check(
        "[mqtt]\nmax_retained = 0\n[[listener]]\naddress = \"127.0.0.1:0\"\n[[domain]]\nhostname = \"a.test\"\ncertificate = \"auto\"\n[[domain.mapping]]\nupstream = \"builtin:echo\"\n",
    );
    assert_clean_error(&r, 2, "mqtt.max_retained");
    let r = check("[mqtt]\nmax_queued = 5\n");
    assert_clean_error(&r, 2, "max_queued");
    let rest = "[[listener]]\naddress = \"127.0.0.1:0\"\n[[domain]]\nhostname = \"a.test\"\ncertificate = \"auto\"\n[[domain.mapping]]\nupstream = \"builtin:echo\"\n";
    let r = check(&format!(
        "nats_url = \"nats://127.0.0.1:4222\"\nnats_kept_mib = 1\n{rest}"
    ));
    assert_clean_error(
        &r,
        2,
        "nats_kept_mib = 1: give the MiB of messages JetStream keeps",
    );
    let r = check(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[domain]]\nhostname = \"a.test\"\ncertificate = \"auto\"\n[[domain.mapping]]\nupstream = \"http://127.0.0.1:9\"\nretry_refused = true\n",
    );
    assert_clean_error(&r, 2, "retry_refused is for HTTP/2 upstreams");
    let r = check(&format!("nats_kept_mib = 64\n{rest}"));
    assert_clean_error(&r, 2, "nats_kept_mib is set without nats_url");
    // Without --config, the quickstart's file must exist: checking does not make it.
    let r = portcullis(d, &["serve", "--data-dir", "data", "--check-config"]);
    assert_clean_error(&r, 2, "portcullis.toml does not exist");
    assert!(!d.join("data").exists());
}

#[test]
fn garbage_on_the_tls_port_does_not_disturb_other_clients() {
    let Some((tmp, s)) = setup() else { return };
    let d = tmp.path();
    use std::io::Read;
    let mut junk = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n\x00\x01garbage")
        .unwrap();
    let mut buf = Vec::new();
    let _ = junk.read_to_end(&mut buf);
    // A client that connects and never sends a byte does not hold up the others.
    let _idle = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    let alice = client("alice");
    assert_eq!(
        answer(&curl(d, &s, "a.test", "/", &with_client(&alice))).0,
        200
    );
    assert!(s.wait_for("bad-client-hello").contains("failed"));
}

#[test]
fn the_quickstart_serves_on_localhost_8443() {
    let Some(curl_bin) = require_tool("curl") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve"])
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut banner = Vec::new();
    let mut reader = BufReader::new(stdout).lines();
    for line in reader.by_ref() {
        let line = line.unwrap();
        let done = line.starts_with("Other settings:");
        banner.push(line);
        if done {
            break;
        }
    }
    std::thread::spawn(move || for _ in reader {});
    let curls: Vec<String> = banner
        .iter()
        .map(|l| l.trim().to_string())
        .filter(|l| l.starts_with("curl "))
        .collect();
    assert_eq!(curls.len(), 3, "{banner:?}");
    let ok = run_printed(&curl_bin, &curls[0], d);
    // The refusal reaches curl every time, as the alert itself (TLS 1.3: curl sends its request
    // right after its Finished; an unread request must not turn the close into a reset).
    let refusals: Vec<Run> = (0..20)
        .map(|_| run_printed(&curl_bin, &curls[1], d))
        .collect();
    let forbidden = run_printed(&curl_bin, &curls[2], d);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let body: Value = serde_json::from_str(&ok.stdout).unwrap();
    assert_eq!(
        body["identity"]["x-client-cert-subject"],
        "CN=demo-client,O=Portcullis Quickstart"
    );
    for refused in &refusals {
        assert_ne!(refused.code, 0);
        assert!(
            refused.stderr.contains("alert certificate required"),
            "{}",
            refused.stderr
        );
    }
    assert_eq!(forbidden.code, 0, "{}", forbidden.stderr);
    let body: Value = serde_json::from_str(&forbidden.stdout).unwrap();
    assert_eq!(body["error"], "untrusted-issuer", "{body}");
    assert_eq!(mode(d.join("portcullis-data/clients/demo.key")), 0o600);
    assert_eq!(mode(d.join("portcullis-data/ca/ca.key")), 0o600);
}

#[test]
fn websocket_upgrades_tunnel_for_a_python_ssl_client() {
    let Some(python) = require_tool("python3") else {
        return;
    };
    let Some((tmp, s)) = setup() else { return };
    let d = tmp.path();
    let script = r#"
import base64, hashlib, os, socket, ssl, sys
port = int(sys.argv[1])
ctx = ssl.create_default_context(cafile="data/ca/ca.pem")
ctx.load_cert_chain("alice.chain.pem", "alice.key")
ctx.set_alpn_protocols(["http/1.1"])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="a.test")
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /api/ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key).encode())
resp = b""
while b"\r\n\r\n" not in resp:
    chunk = s.recv(4096)
    if not chunk:
        break
    resp += chunk
head, _, rest = resp.partition(b"\r\n\r\n")
print(head.decode())
expected = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
print("ACCEPT-OK" if expected.lower() in head.decode().lower() else "ACCEPT-WRONG")
s.sendall(b"ping-through-tunnel")
got = rest
while len(got) < len(b"ping-through-tunnel"):
    chunk = s.recv(4096)
    if not chunk:
        break
    got += chunk
print("ECHO:" + got.decode())
"#;
    std::fs::write(d.join("ws.py"), script).unwrap();
    let r = run(python, &["ws.py", &s.port.to_string()], d);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.starts_with("HTTP/1.1 101"), "{}", r.stdout);
    assert!(r.stdout.contains("ACCEPT-OK"), "{}", r.stdout);
    assert!(
        r.stdout.contains("ECHO:ping-through-tunnel"),
        "{}",
        r.stdout
    );
}

#[test]
fn limits_and_upstream_failures_get_clear_statuses() {
    let Some(_) = require_tool("curl") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    // An upstream that accepts and never answers, and one that is not listening.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        r#"
[admin]
address = "127.0.0.1:0"

[limits]
max_header_bytes = 16384
upstream_response_timeout_secs = 1
request_header_timeout_secs = 1
handshake_timeout_secs = 1

[[listener]]
address = "127.0.0.1:0"

[[domain]]
hostname = "a.test"
certificate = "auto"
[domain.mtls]
mode = "required"
truststore = "trust-a.pem"
[[domain.mapping]]
base_path = "/slow"
upstream = "http://127.0.0.1:{silent_port}"
[[domain.mapping]]
base_path = "/down"
upstream = "http://127.0.0.1:{closed_port}"
[[domain.mapping]]
upstream = "builtin:echo"
"#
    );
    let s = Server::start(d, &config);
    let alice = client("alice");
    let (status, body) = answer(&curl(d, &s, "a.test", "/slow", &with_client(&alice)));
    assert_eq!(
        (status, body["error"].as_str()),
        (504, Some("upstream-timeout"))
    );
    let (status, body) = answer(&curl(d, &s, "a.test", "/down", &with_client(&alice)));
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("upstream-unavailable"))
    );
    let big = format!("X-Big: {}", "a".repeat(20_000));
    let r = curl(
        d,
        &s,
        "a.test",
        "/",
        &[with_client(&alice), vec!["--http1.1", "-H", &big]].concat(),
    );
    assert_eq!(answer(&r).0, 431, "{r:?}");
    // The gateway still serves normal requests.
    assert_eq!(
        answer(&curl(d, &s, "a.test", "/", &with_client(&alice))).0,
        200
    );
    // A client that connects and never finishes the handshake is disconnected after the
    // handshake timeout.
    {
        use std::io::Read;
        let mut silent_client = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        silent_client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 16];
        let n = silent_client.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "the server closes the connection");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert!(s.wait_for("handshake-timeout").contains("failed"));
    }
    // A client that completes the handshake and then sends nothing is disconnected after the
    // request header timeout, not kept forever.
    if let Some(python) = require_tool("python3") {
        let script = r#"
import socket, ssl, sys, time
ctx = ssl.create_default_context(cafile="data/ca/ca.pem")
ctx.load_cert_chain("alice.chain.pem", "alice.key")
ctx.set_alpn_protocols(["http/1.1"])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))), server_hostname="a.test")
s.settimeout(20)
start = time.monotonic()
try:
    data = s.recv(1)
except (ssl.SSLError, ConnectionResetError):
    data = b""
print("closed" if data == b"" else "data", round(time.monotonic() - start, 1))
"#;
        std::fs::write(d.join("idle.py"), script).unwrap();
        let r = run(python, &["idle.py", &s.port.to_string()], d);
        assert!(r.stdout.starts_with("closed "), "{r:?}");
        let waited: f64 = r.stdout.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(waited < 10.0, "closed after {waited} s");
    }
    drop(silent);
}

#[test]
fn metrics_and_health_are_served_on_the_admin_listener() {
    let Some((tmp, s)) = setup() else { return };
    let d = tmp.path();
    let (alice, bob) = (client("alice"), client("bob"));
    assert_eq!(
        answer(&curl(d, &s, "a.test", "/api/x", &with_client(&alice))).0,
        200
    );
    let access = s.wait_for("portcullis::access");
    let line: Value = serde_json::from_str(&access).unwrap();
    assert_eq!(line["path"], "/api/x");
    assert_eq!(line["mapping"], "/api");
    assert_eq!(line["status"], 200);
    assert_eq!(line["client_subject"], "CN=alice");
    assert_eq!(line["verify"], "SUCCESS");
    assert_eq!(line["complete"], true);
    assert!(line["response_bytes"].as_u64().unwrap() > 100, "{line}");
    assert_eq!(line["client_fingerprint"].as_str().unwrap().len(), 64);
    assert_ne!(curl(d, &s, "a.test", "/", &with_client(&bob)).code, 0);
    s.wait_for("TLS handshake failed");
    let curl_bin = require_tool("curl").unwrap();
    let admin = |path: &str, with_cert: bool| {
        let url = format!("https://127.0.0.1:{}{path}", s.admin_port);
        let mut args = vec!["-sS", "-w", "\n%{http_code}", "--cacert", "data/ca/ca.pem"];
        if with_cert {
            args.extend([
                "--cert",
                "data/admin/admin.pem",
                "--key",
                "data/admin/admin.key",
            ]);
        }
        args.push(&url);
        run(&curl_bin, &args, d)
    };
    // Only /healthz answers without credentials.
    assert!(admin("/healthz", false).stdout.ends_with("200"));
    assert!(admin("/readyz", false).stdout.ends_with("401"));
    assert!(admin("/metrics", false).stdout.ends_with("401"));
    assert!(admin("/readyz", true).stdout.ends_with("200"));
    let metrics = admin("/metrics", true).stdout;
    for needle in [
        r#"portcullis_handshakes_total{domain="a.test",result="ok",reason=""}"#,
        r#"portcullis_handshakes_total{domain="a.test",result="failed",reason="untrusted-issuer"}"#,
        r#"portcullis_requests_total{domain="a.test",mapping="/api",status="200"}"#,
        "portcullis_request_duration_seconds_bucket",
        "portcullis_active_connections",
        r#"portcullis_server_certificate_expiry_days{domain="a.test",bucket="#,
        "portcullis_truststore_ca_expiry_days{domain=\"a.test\",fingerprint=",
        "portcullis_config_generation 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in:\n{metrics}");
    }
}

#[test]
fn a_truststore_swap_under_load_fails_no_request_and_file_changes_reload() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some((tmp, s)) = setup() else { return };
    let d = tmp.path().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (d, port, stop) = (d.clone(), s.port, stop.clone());
        std::thread::spawn(move || {
            let alice = client("alice");
            let mut statuses = Vec::new();
            // A new connection per request, until the swaps are done.
            while !stop.load(Ordering::SeqCst) || statuses.len() < 5 {
                statuses.push(answer(&curl_port(&d, port, "a.test", "/", &with_client(&alice))).0);
            }
            statuses
        })
    };
    // Swap: trust root B as well, by SIGHUP.
    let mut bundle = std::fs::read_to_string(d.join("trust-a.pem")).unwrap();
    bundle.push_str(&std::fs::read_to_string(d.join("rootb/ca.pem")).unwrap());
    std::fs::write(d.join("trust-a.pem.new"), &bundle).unwrap();
    std::fs::rename(d.join("trust-a.pem.new"), d.join("trust-a.pem")).unwrap();
    let line = s.reload();
    assert!(line.contains("\"result\":\"ok\""), "{line}");
    let bob = client("bob");
    assert_eq!(
        answer(&curl(&d, &s, "a.test", "/", &with_client(&bob))).0,
        200,
        "root B is trusted after the swap"
    );
    // Swap back by editing the file only: the change is noticed without a signal.
    let original: String = bundle
        .split_inclusive("-----END CERTIFICATE-----\n")
        .take(2)
        .collect();
    // Written aside and renamed into place, as a deployment tool would.
    std::fs::write(d.join("trust-a.pem.new"), original).unwrap();
    std::fs::rename(d.join("trust-a.pem.new"), d.join("trust-a.pem")).unwrap();
    let line = s.wait_for("\"trigger\":\"file-change\"");
    assert!(line.contains("\"result\":\"ok\""), "{line}");
    assert_ne!(
        curl(&d, &s, "a.test", "/", &with_client(&bob)).code,
        0,
        "root B is no longer trusted"
    );
    stop.store(true, Ordering::SeqCst);
    let statuses = worker.join().unwrap();
    assert!(statuses.iter().all(|code| *code == 200), "{statuses:?}");
}

#[test]
fn identity_headers_can_be_renamed_and_sent_as_xfcc() {
    let Some(_) = require_tool("curl") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let config = r#"
[admin]
address = "127.0.0.1:0"

[identity]
xfcc = true
[identity.headers]
subject = "X-SSL-Client-DN"
verify = "X-SSL-Verify"

[[listener]]
address = "127.0.0.1:0"

[[domain]]
hostname = "a.test"
certificate = "auto"
[domain.mtls]
mode = "required"
truststore = "trust-a.pem"
[[domain.mapping]]
upstream = "builtin:echo"
"#;
    let s = Server::start(d, config);
    let alice = client("alice");
    let args = [
        with_client(&alice),
        vec![
            "-H",
            "X-SSL-Client-DN: CN=admin",
            "-H",
            "X-SSL-Verify: SUCCESS",
        ],
    ]
    .concat();
    let (status, body) = answer(&curl(d, &s, "a.test", "/", &args));
    assert_eq!(status, 200);
    let h = &body["headers"];
    assert_eq!(h["x-ssl-client-dn"], "CN=alice", "{h}");
    assert_eq!(h["x-ssl-verify"], "SUCCESS");
    assert!(h.get("x-client-cert-subject").is_none());
    let id = json(portcullis(d, &["pki", "inspect", "--json", "alice.pem"]))[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let xfcc = h["x-forwarded-client-cert"].as_str().unwrap();
    assert!(
        xfcc.starts_with(&format!("Hash={id};Cert=\"-----BEGIN%20CERTIFICATE-----")),
        "{xfcc}"
    );
    assert!(xfcc.contains(";Subject=\"CN=alice\""), "{xfcc}");
}

/// What each product's documentation says its headers hold for `alice` (chain: alice, int,
/// root), computed by Python and OpenSSL rather than by the gateway's code.
const PRODUCT_FORMATS: &str = r#"
import base64, datetime, hashlib, json, ssl, subprocess, sys, urllib.parse
leaf = open("alice.pem").read()
pems = [leaf, open("int/ca.pem").read(), open("root/ca.pem").read()]
d = ssl._ssl._test_decode_cert("alice.pem")
when = lambda s: datetime.datetime.strptime(s, "%b %d %H:%M:%S %Y %Z").strftime("%Y-%m-%dT%H:%M:%SZ")
der = [ssl.PEM_cert_to_DER_cert(p) for p in pems]
dn = lambda which: subprocess.run(["openssl", "x509", "-in", "alice.pem", "-noout", "-" + which,
    "-nameopt", "RFC2253"], capture_output=True, text=True).stdout.strip().split("=", 1)[1]
serial = d["serialNumber"]
# Traefik's passTLSClientCert with every info option (pkg/middlewares/passtlsclientcert):
# DC, C, ST, L, O (OU for the subject), the last SN and CN; decimal serial; Unix times; SANs
# as DNS, email, IP, URI.
def go_dn(rdns, with_ou):
    attrs = [kv for rdn in rdns for kv in rdn]
    parts = ["DC=" + v for k, v in attrs if k == "domainComponent"]
    keys = [("countryName", "C"), ("stateOrProvinceName", "ST"), ("localityName", "L"), ("organizationName", "O")]
    if with_ou:
        keys.append(("organizationalUnitName", "OU"))
    for key, short in keys:
        parts += [short + "=" + v for k, v in attrs if k == key and v]
    for key, short in [("serialNumber", "SN"), ("commonName", "CN")]:
        vals = [v for k, v in attrs if k == key]
        if vals and vals[-1]:
            parts.append(short + "=" + vals[-1])
    return ",".join(parts)
def unix(s):
    return int(datetime.datetime.strptime(s, "%b %d %H:%M:%S %Y %Z").replace(tzinfo=datetime.timezone.utc).timestamp())
def traefik_info(path):
    c = ssl._ssl._test_decode_cert(path)
    fields = []
    subject, issuer = go_dn(c["subject"], True), go_dn(c["issuer"], False)
    if subject:
        fields.append('Subject="%s"' % subject)
    if issuer:
        fields.append('Issuer="%s"' % issuer)
    fields.append('SerialNumber="%d"' % int(c["serialNumber"], 16))
    fields.append('NB="%d"' % unix(c["notBefore"]))
    fields.append('NA="%d"' % unix(c["notAfter"]))
    sans = c.get("subjectAltName", ())
    ordered = [v for kind in ["DNS", "email", "IP Address", "URI"] for k, v in sans if k == kind]
    if ordered:
        fields.append('SAN="%s"' % ",".join(ordered))
    return ";".join(fields)
print(json.dumps({
    "serial": serial,
    "serial_colon": ":".join(serial[i:i + 2] for i in range(0, len(serial), 2)).lower(),
    "subject": dn("subject"),
    "issuer": dn("issuer"),
    "validity": "NotBefore=%s;NotAfter=%s" % (when(d["notBefore"]), when(d["notAfter"])),
    "leaf": urllib.parse.quote(leaf, safe="+=/"),
    "chain": urllib.parse.quote("".join(pems), safe="+=/"),
    "sha256": hashlib.sha256(der[0]).hexdigest(),
    "client_cert": ":" + base64.b64encode(der[0]).decode() + ":",
    "traefik": ",".join(base64.b64encode(c).decode() for c in der),
    "traefik_info": urllib.parse.quote_plus(",".join(traefik_info(p) for p in ["alice.pem", "int/ca.pem", "root/ca.pem"]), safe=""),
}))
"#;

#[test]
fn identity_profiles_send_what_alb_cloudfront_envoy_and_traefik_upstreams_read() {
    let Some(python) = require_tool("python3") else {
        return;
    };
    let Some(_) = require_tool("curl") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let want = run(&python, &["-c", PRODUCT_FORMATS], d).ok().stdout;
    let want: Value = serde_json::from_str(&want).unwrap();
    let w = |k: &str| want[k].as_str().unwrap().to_string();
    // A client forging every product's headers: each is replaced or removed, in every profile.
    let forged = [
        "X-Amzn-Mtls-Clientcert-Subject: CN=admin",
        "X-Amzn-Mtls-Clientcert: forged",
        "CloudFront-Viewer-Cert-Sha256: forged",
        "CloudFront-Viewer-Cert-Present: 1",
        "X-Forwarded-Tls-Client-Cert: forged",
        "X-Forwarded-Tls-Client-Cert-Info: forged",
        "X-Forwarded-Client-Cert: Hash=forged",
        "Client-Cert: :Zm9yZ2Vk:",
    ];
    let alice = client("alice");
    for profile in ["alb", "cloudfront", "envoy", "traefik"] {
        let config = format!(
            r#"
[admin]
address = "127.0.0.1:0"

[identity]
profile = "{profile}"

[[listener]]
address = "127.0.0.1:0"

[[domain]]
hostname = "a.test"
certificate = "auto"
[domain.mtls]
mode = "optional"
truststore = "root/ca.pem"
[[domain.mapping]]
upstream = "builtin:echo"
client_certificate = "optional"
"#
        );
        let s = Server::start(d, &config);
        let mut args = with_client(&alice);
        for f in &forged {
            args.extend(["-H", f]);
        }
        let (status, body) = answer(&curl(d, &s, "a.test", "/", &args));
        assert_eq!(status, 200, "{profile}");
        let h = body["headers"].as_object().unwrap().clone();
        let got = |k: &str| h.get(k).and_then(Value::as_str).map(str::to_string);
        let mut expected: Vec<(&str, String)> = match profile {
            "alb" => vec![
                ("x-amzn-mtls-clientcert", w("chain")),
                ("x-amzn-mtls-clientcert-serial-number", w("serial")),
                ("x-amzn-mtls-clientcert-issuer", w("issuer")),
                ("x-amzn-mtls-clientcert-subject", w("subject")),
                ("x-amzn-mtls-clientcert-validity", w("validity")),
                ("x-amzn-mtls-clientcert-leaf", w("leaf")),
            ],
            "cloudfront" => vec![
                ("cloudfront-viewer-cert-serial-number", w("serial_colon")),
                ("cloudfront-viewer-cert-issuer", w("issuer")),
                ("cloudfront-viewer-cert-subject", w("subject")),
                ("cloudfront-viewer-cert-present", "1".into()),
                ("cloudfront-viewer-cert-sha256", w("sha256")),
                ("cloudfront-viewer-cert-validity", w("validity")),
                ("cloudfront-viewer-cert-pem", w("leaf")),
                ("client-cert", w("client_cert")),
            ],
            "traefik" => vec![
                ("x-forwarded-tls-client-cert", w("traefik")),
                ("x-forwarded-tls-client-cert-info", w("traefik_info")),
            ],
            _ => vec![],
        };
        expected.push(("x-client-cert-verify", "SUCCESS".into()));
        for (name, value) in &expected {
            assert_eq!(
                got(name).as_deref(),
                Some(value.as_str()),
                "{profile}: {name}"
            );
        }
        if profile == "envoy" {
            let xfcc = got("x-forwarded-client-cert").unwrap();
            let hash = format!("Hash={};Cert=\"-----BEGIN%20CERTIFICATE-----", w("sha256"));
            assert!(xfcc.starts_with(&hash), "{xfcc}");
            assert!(xfcc.contains(";Subject=\"CN=alice\""), "{xfcc}");
            expected.push(("x-forwarded-client-cert", xfcc));
        }
        // Nothing else that any product would read: the forged copies are gone.
        for name in h.keys() {
            let identity = [
                "x-amzn-mtls",
                "cloudfront-viewer",
                "x-forwarded-tls",
                "x-forwarded-client",
                "client-cert",
                "x-client-cert",
            ]
            .iter()
            .any(|p| name.starts_with(p));
            assert!(
                !identity || expected.iter().any(|(n, _)| n == name),
                "{profile}: the upstream got {name}: {:?}",
                h[name]
            );
        }
        // Without a certificate (optional mode) no product header is sent, only the status.
        let (status, body) = answer(&curl(d, &s, "a.test", "/", &[]));
        assert_eq!(status, 200);
        let h = &body["headers"];
        assert_eq!(h["x-client-cert-verify"], "NONE", "{profile}");
        match profile {
            "cloudfront" => assert_eq!(h["cloudfront-viewer-cert-present"], "0"),
            "alb" => assert!(h.get("x-amzn-mtls-clientcert-leaf").is_none()),
            _ => {}
        }
    }
    // A profile's names are fixed; a typo is named.
    for (identity, why) in [
        ("profile = \"nginx\"", "unknown identity profile 'nginx'"),
        (
            "profile = \"alb\"\n[identity.headers]\nsubject = \"X-Subject\"",
            "only verify can be renamed",
        ),
        ("profile = \"traefik\"\nxfcc = true", "profile = \"envoy\""),
    ] {
        let config = format!(
            "[identity]\n{identity}\n\n[[listener]]\naddress = \"127.0.0.1:0\"\n\n[[domain]]\nhostname = \"a.test\"\ncertificate = \"auto\"\n[[domain.mapping]]\nupstream = \"builtin:echo\"\n"
        );
        std::fs::write(d.join("bad.toml"), config).unwrap();
        let out = portcullis(d, &["serve", "--config", "bad.toml", "--data-dir", "bad"]);
        assert_ne!(out.code, 0);
        assert!(out.stderr.contains(why), "{}", out.stderr);
    }
}

/// A mutual-TLS handshake with a rustls client offering `groups` (first one with a key share):
/// the negotiated group and the first line of the answer, or the handshake's error.
fn handshake_with_groups(
    d: &Path,
    port: u16,
    host: &str,
    groups: &[&'static dyn rustls::crypto::SupportedKxGroup],
) -> Result<(rustls::NamedGroup, String), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::io::Read;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = groups.to_vec();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(d.join("data/ca/ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(d.join("alice.chain.pem"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(d.join("alice.key")).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let name = ServerName::try_from(host.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    let group = tls
        .conn
        .negotiated_key_exchange_group()
        .ok_or("no key exchange")?
        .name();
    let text = String::from_utf8_lossy(&answer);
    Ok((group, text.lines().next().unwrap_or("").to_string()))
}

#[test]
fn post_quantum_key_exchange_with_mutual_tls() {
    use rustls::NamedGroup;
    use rustls::crypto::aws_lc_rs::kx_group::{SECP256R1, X25519, X25519MLKEM768};
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let config = r#"
[admin]
address = "127.0.0.1:0"

[[listener]]
address = "127.0.0.1:0"

[[domain]]
hostname = "a.test"
certificate = "auto"
[domain.mtls]
mode = "required"
truststore = "root/ca.pem"
[[domain.mapping]]
upstream = "builtin:echo"

[[domain]]
hostname = "pq.test"
certificate = "auto"
security_policy = "TLS_1_3_PQ"
[domain.mtls]
mode = "required"
truststore = "root/ca.pem"
[[domain.mapping]]
upstream = "builtin:echo"
"#;
    let s = Server::start(d, config);
    // Every policy takes the hybrid when the client sends its key share (rustls sends an X25519
    // share beside it, as browsers do: the server's order picks the hybrid).
    let (group, status) =
        handshake_with_groups(d, s.port, "a.test", &[X25519MLKEM768, X25519]).unwrap();
    assert_eq!(group, NamedGroup::X25519MLKEM768);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // A client that lists it below X25519 and sends only an X25519 share is not made to pay a
    // round trip for it; one without it still connects on the default policy.
    let (group, _) = handshake_with_groups(d, s.port, "a.test", &[X25519, X25519MLKEM768]).unwrap();
    assert_eq!(group, NamedGroup::X25519);
    let (group, status) = handshake_with_groups(d, s.port, "a.test", &[X25519, SECP256R1]).unwrap();
    assert_eq!(group, NamedGroup::X25519);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // TLS_1_3_PQ: the hybrid, with the client certificate verified, or no handshake at all.
    let (group, status) =
        handshake_with_groups(d, s.port, "pq.test", &[X25519MLKEM768, X25519]).unwrap();
    assert_eq!(group, NamedGroup::X25519MLKEM768);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let refused = handshake_with_groups(d, s.port, "pq.test", &[X25519, SECP256R1]);
    assert!(refused.is_err(), "{refused:?}");
    // The connection log names the group.
    s.wait_for(r#""kx_group":"X25519MLKEM768""#);
}

#[test]
fn https_upstreams_get_the_gateway_client_certificate() {
    let Some(python) = require_tool("python3") else {
        return;
    };
    let Some(_) = require_tool("curl") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    leaf(
        d,
        "server",
        "localhost",
        "int",
        &["--san", "dns:localhost", "--san", "ip:127.0.0.1"],
    );
    leaf(d, "client", "gw", "int", &[]);
    let upstream = r#"
import http.server, json, ssl
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        cert = self.connection.getpeercert()
        subject = dict(x[0] for x in cert["subject"]) if cert else {}
        body = json.dumps({"path": self.path, "peer_cn": subject.get("commonName")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("localhost.chain.pem", "localhost.key")
ctx.load_verify_locations("trust-a.pem")
ctx.verify_mode = ssl.CERT_REQUIRED
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;
    std::fs::write(d.join("upstream.py"), upstream).unwrap();
    let (py, port) = python_server(&python, &["upstream.py"], d);
    let config = format!(
        r#"
[admin]
address = "127.0.0.1:0"

[[listener]]
address = "127.0.0.1:0"

[[domain]]
hostname = "a.test"
certificate = "auto"
[domain.mtls]
mode = "required"
truststore = "trust-a.pem"
[[domain.mapping]]
base_path = "/secure"
upstream = "https://localhost:{port}/base"
upstream_ca = "trust-a.pem"
upstream_client_cert = "gw.chain.pem"
upstream_client_key = "gw.key"
[[domain.mapping]]
base_path = "/anonymous"
upstream = "https://localhost:{port}"
upstream_ca = "trust-a.pem"
"#
    );
    let s = Server::start(d, &config);
    let alice = client("alice");
    let (status, body) = answer(&curl(
        d,
        &s,
        "a.test",
        "/secure/x?y=1",
        &with_client(&alice),
    ));
    let (anon_status, _) = answer(&curl(d, &s, "a.test", "/anonymous/x", &with_client(&alice)));
    drop(py);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["peer_cn"], "gw");
    assert_eq!(body["path"], "/base/x?y=1");
    assert_eq!(
        anon_status, 502,
        "the upstream requires a client certificate"
    );
}

#[test]
fn sigterm_drains_and_exits_cleanly() {
    let Some((tmp, mut s)) = setup() else { return };
    let d = tmp.path();
    let alice = client("alice");
    assert_eq!(
        answer(&curl(d, &s, "a.test", "/", &with_client(&alice))).0,
        200
    );
    let pid = s.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    s.wait_for("draining connections and stopping");
    let mut child = std::mem::replace(&mut s.child, Command::new("true").spawn().unwrap());
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = rx
        .recv_timeout(Duration::from_secs(40))
        .expect("portcullis exits after draining")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn registry_modes_refuse_unregistered_and_revocation_closes_live_connections() {
    let Some(python) = require_tool("python3") else {
        return;
    };
    let Some(_) = require_tool("curl") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    // Register alice before the gateway starts, in the registry the gateway will open.
    let (runtime, store) = registry_store(d);
    let alice_pem = std::fs::read(d.join("alice.pem")).unwrap();
    let alice = runtime
        .block_on(store.register_certificate(
            &alice_pem,
            portcullis_registry::CertStatus::Active,
            "test",
        ))
        .unwrap();
    let config = registry_config(&[("reg.test", "registered"), ("rev.test", "revocation")]);
    let s = Server::start(d, &config);
    let (alice_args, carol_args) = (client("alice"), client("carol"));
    assert_eq!(
        answer(&curl(d, &s, "reg.test", "/", &with_client(&alice_args))).0,
        200
    );
    assert_ne!(
        curl(d, &s, "reg.test", "/", &with_client(&carol_args)).code,
        0
    );
    assert!(
        s.wait_for("TLS handshake failed")
            .contains("\"reason\":\"unregistered\"")
    );
    assert_eq!(
        answer(&curl(d, &s, "rev.test", "/", &with_client(&carol_args))).0,
        200,
        "revocation mode admits unregistered certificates"
    );

    // Live keep-alive connections, HTTP/1.1 and HTTP/2, are closed when alice leaves ACTIVE.
    // The HTTP/2 client speaks the frames by hand: preface, SETTINGS, one HEADERS request.
    let script = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile="data/ca/ca.pem")
ctx.load_cert_chain("alice.chain.pem", "alice.key")
h2 = sys.argv[2] == "h2"
ctx.set_alpn_protocols(["h2" if h2 else "http/1.1"])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))), server_hostname="reg.test")
assert s.selected_alpn_protocol() == ("h2" if h2 else "http/1.1")
buf = b""
def need(n):
    global buf
    while len(buf) < n:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit("closed early")
        buf += chunk
if h2:
    authority = b"reg.test"
    block = b"\x82\x87\x84\x41" + bytes([len(authority)]) + authority
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
              + len(block).to_bytes(3, "big") + b"\x01\x05\x00\x00\x00\x01" + block)
    status = None
    while status is None:
        need(9)
        length, kind, stream = int.from_bytes(buf[:3], "big"), buf[3], int.from_bytes(buf[5:9], "big")
        need(9 + length)
        if kind == 4 and buf[4] & 1 == 0:
            s.sendall(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")  # SETTINGS ack
        if kind == 1 and stream == 1:
            status = "HTTP/2 " + ("200" if buf[9] == 0x88 else "not 200")
        buf = buf[9 + length:]
    print("READY", status, flush=True)
else:
    s.sendall(b"GET / HTTP/1.1\r\nHost: reg.test\r\n\r\n")
    while b"\r\n\r\n" not in buf:
        need(len(buf) + 1)
    head, _, body = buf.partition(b"\r\n\r\n")
    length = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0]
    while len(body) < length:
        body += s.recv(65536)
    print("READY", head.split(b"\r\n")[0].decode(), flush=True)
# Wait for the server to close (HTTP/2 frames such as GOAWAY may come first).
s.settimeout(10)
try:
    while s.recv(65536):
        pass
    data = b""
except (socket.timeout, TimeoutError):
    data = b"timeout"
except (ssl.SSLError, ConnectionResetError):
    data = b""
print("CLOSED" if data == b"" else "OPEN", flush=True)
"#;
    std::fs::write(d.join("live.py"), script).unwrap();
    let mut clients = Vec::new();
    for (protocol, expected) in [("h1", "READY HTTP/1.1 200 OK"), ("h2", "READY HTTP/2 200")] {
        let mut py = Command::new(&python)
            .args(["live.py", &s.port.to_string(), protocol])
            .current_dir(d)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
        let ready = lines.next().map(Result::unwrap);
        assert_eq!(ready.as_deref(), Some(expected), "{protocol}");
        clients.push((protocol, py, lines));
    }
    let changed = std::time::Instant::now();
    runtime
        .block_on(store.set_certificate_status(
            &alice.id,
            portcullis_registry::CertStatus::Inactive,
            "test",
        ))
        .unwrap();
    for (protocol, mut py, mut lines) in clients {
        let outcome = lines.next().map(Result::unwrap);
        let latency = changed.elapsed();
        let _ = py.wait();
        assert_eq!(outcome.as_deref(), Some("CLOSED"), "{protocol}");
        assert!(
            latency < Duration::from_secs(1),
            "{protocol} closed after {latency:?}"
        );
        println!("live revocation latency ({protocol}): {latency:?}");
        let closed =
            s.wait_for("connection closed: its certificate or domain is no longer admitted");
        assert!(closed.contains("\"reason\":\"inactive\""), "{closed}");
    }
    // New handshakes are refused on both domains.
    assert_ne!(
        curl(d, &s, "reg.test", "/", &with_client(&alice_args)).code,
        0
    );
    assert!(
        s.wait_for("TLS handshake failed")
            .contains("\"reason\":\"inactive\"")
    );
    runtime
        .block_on(store.set_certificate_status(
            &alice.id,
            portcullis_registry::CertStatus::Revoked,
            "test",
        ))
        .unwrap();
    // The change reaches the gateway within its polling interval; wait for the effect.
    let mut refused_as_revoked = false;
    for _ in 0..50 {
        let r = curl(d, &s, "rev.test", "/", &with_client(&alice_args));
        assert_ne!(r.code, 0);
        if s.wait_for("TLS handshake failed")
            .contains("\"reason\":\"revoked\"")
        {
            refused_as_revoked = true;
            break;
        }
    }
    assert!(refused_as_revoked);
}

#[test]
fn just_in_time_registration_records_pending_activation_once() {
    let Some(_) = require_tool("curl") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let (runtime, store) = registry_store(d);
    // Register the issuing CA with proof of possession and auto-registration on.
    let code = runtime.block_on(store.registration_code()).unwrap();
    portcullis(
        d,
        &[
            "pki",
            "verification-cert",
            "--ca-cert",
            "int/ca.pem",
            "--ca-key",
            "int/ca.key",
            "--code",
            &code,
            "--out",
            "pop",
        ],
    )
    .ok();
    let ca_pem = std::fs::read(d.join("int/ca.pem")).unwrap();
    let proof = std::fs::read(d.join("pop/verification.pem")).unwrap();
    runtime
        .block_on(store.register_ca(
            portcullis_registry::CaRegistration {
                certificate: &ca_pem,
                verification: Some(&proof),
                activate: true,
                auto_registration: true,
                ..Default::default()
            },
            "test",
        ))
        .unwrap();
    let config = registry_config(&[("reg.test", "registered")]);
    let s = Server::start(d, &config);
    // A burst of connections with the same unregistered certificate: all refused, one registration.
    let carol = client("carol");
    let port = s.port;
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let (d, carol) = (d.to_path_buf(), carol.clone());
            std::thread::spawn(move || {
                curl_port(&d, port, "reg.test", "/", &with_client(&carol)).code
            })
        })
        .collect();
    for t in burst {
        assert_ne!(
            t.join().unwrap(),
            0,
            "the first connections are refused (JITR)"
        );
    }
    // The registry's own line, once the record is written (a refusal's reason says "registered
    // just in time" too, before the worker has written it: waiting for that raced the listing).
    let registered = s.printed("the registry's JITR line", |l| {
        l.contains(r#""message":"registered just in time""#)
    });
    assert!(registered.contains("PENDING_ACTIVATION"), "{registered}");
    let pending = runtime
        .block_on(store.list_certificates(&portcullis_registry::CertFilter {
            status: Some(portcullis_registry::CertStatus::PendingActivation),
            ..Default::default()
        }))
        .unwrap();
    assert_eq!(pending.len(), 1, "registered exactly once");
    assert_eq!(pending[0].subject, "CN=carol");
    // An operator activates it; once the gateway has the new snapshot, carol gets in.
    runtime
        .block_on(store.set_certificate_status(
            &pending[0].id,
            portcullis_registry::CertStatus::Active,
            "operator",
        ))
        .unwrap();
    let marker = runtime.block_on(store.change_marker()).unwrap();
    s.wait_for_marker(marker);
    assert_eq!(
        answer(&curl(d, &s, "reg.test", "/", &with_client(&carol))).0,
        200
    );
}

/// A runtime and the registry the gateway under test will open (DATA_DIR/registry.db).
pub(crate) fn registry_store(d: &Path) -> (tokio::runtime::Runtime, portcullis_registry::Store) {
    std::fs::create_dir_all(d.join("data")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = d.join("data/registry.db").display().to_string();
    let store = runtime
        .block_on(portcullis_registry::Store::open(&db))
        .unwrap();
    (runtime, store)
}

/// A configuration with one mTLS domain per (hostname, registry mode), trusting root A, mapped
/// to the echo upstream.
pub(crate) fn registry_config(domains: &[(&str, &str)]) -> String {
    let mut config = String::from(
        "[admin]\naddress = \"127.0.0.1:0\"\n\n[[listener]]\naddress = \"127.0.0.1:0\"\n",
    );
    for (host, mode) in domains {
        config.push_str(&format!(
            "\n[[domain]]\nhostname = \"{host}\"\ncertificate = \"auto\"\nregistry_mode = \"{mode}\"\n\
             [domain.mtls]\nmode = \"required\"\ntruststore = \"trust-a.pem\"\n\
             [[domain.mapping]]\nupstream = \"builtin:echo\"\n"
        ));
    }
    config
}

#[test]
fn the_connection_limit_is_shared_by_listeners_and_every_slot_is_usable() {
    let Some(python) = require_tool("python3") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let config = r#"
[admin]
address = "127.0.0.1:0"

[limits]
max_connections = 3

[[listener]]
address = "127.0.0.1:0"
[[listener]]
address = "127.0.0.1:0"
protocols = ["mqtt"]

[[domain]]
hostname = "a.test"
certificate = "auto"
[domain.mtls]
mode = "required"
truststore = "trust-a.pem"
[[domain.mapping]]
upstream = "builtin:echo"
"#;
    let s = Server::start(d, config);
    // Three connections on the HTTP listener use the three slots (an idle MQTT listener holds
    // none); a fourth waits in the backlog until one of them closes.
    let script = r#"
import socket, ssl, sys
port = int(sys.argv[1])
ctx = ssl.create_default_context(cafile="data/ca/ca.pem")
ctx.load_cert_chain("alice.chain.pem", "alice.key")
ctx.set_alpn_protocols(["http/1.1"])
def open_one(timeout):
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname="a.test")
held = [open_one(20) for _ in range(3)]
for s in held:
    s.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert s.recv(12).startswith(b"HTTP/1.1 200"), "served"
print("three served")
try:
    open_one(1.5)
    print("fourth admitted")
except (socket.timeout, TimeoutError):
    print("fourth waits")
held.pop().close()
late = open_one(20)
late.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
print("late served" if late.recv(12).startswith(b"HTTP/1.1 200") else "late refused")
"#;
    std::fs::write(d.join("limit.py"), script).unwrap();
    let r = run(python, &["limit.py", &s.port.to_string()], d);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout.lines().collect::<Vec<_>>(),
        ["three served", "fourth waits", "late served"],
        "{r:?}"
    );
}

#[test]
fn refusals_reach_the_client_as_alerts_and_the_lingering_is_bounded() {
    let Some(python) = require_tool("python3") else {
        return;
    };
    let Some((tmp, s)) = setup() else { return };
    let d = tmp.path();
    let bob = client("bob");
    for _ in 0..20 {
        let r = curl(d, &s, "a.test", "/", &with_client(&bob));
        assert_ne!(r.code, 0);
        assert!(r.stderr.contains("alert unknown ca"), "{}", r.stderr);
    }
    let r = curl(d, &s, "nope.test", "/", &[]);
    assert!(r.stderr.contains("unrecognized name"), "{}", r.stderr);
    let line = s.wait_for("\"reason\":\"unknown-sni\"");
    assert!(line.contains("no domain is named 'nope.test'"), "{line}");
    // An IP address as SNI (which TLS forbids; rustls warns and ignores it) is one readable
    // line naming the address, without the build machine's source paths.
    if let Some(openssl) = require_tool("openssl") {
        let address = format!("127.0.0.1:{}", s.port);
        run(
            openssl,
            &["s_client", "-connect", &address, "-servername", "127.0.0.1"],
            d,
        );
        let line = s.wait_for("as its TLS server name (SNI)");
        assert!(
            line.contains("the IP address 127.0.0.1") && !line.contains(".rs"),
            "{line}"
        );
    }
    // A client that keeps sending after its refusal is read for a bounded time, then cut off.
    let script = r#"
import socket, ssl, sys, time
ctx = ssl.create_default_context(cafile="data/ca/ca.pem")
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))), server_hostname="a.test")
started = time.monotonic()
try:
    while time.monotonic() - started < 30:
        s.sendall(b"x" * 1024)
        time.sleep(0.005)
    print("still open after 30 s")
except (ssl.SSLError, OSError) as e:
    print("cut off after %.2f s: %s" % (time.monotonic() - started, e))
"#;
    std::fs::write(d.join("keeps_sending.py"), script).unwrap();
    let r = run(&python, &["keeps_sending.py", &s.port.to_string()], d);
    let took: f64 = r
        .stdout
        .strip_prefix("cut off after ")
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{}{}", r.stdout, r.stderr));
    assert!(took < 6.0, "{}", r.stdout);
}

/// The AWS guides' OpenSSL commands, typed as written (API Gateway mTLS: a partner's
/// self-signed certificate appended to the truststore; a root and an intermediate made with
/// `basicConstraints=CA:TRUE`; IoT Core: device certificates signed with `openssl x509 -req -CA`),
/// served under the compatible profile (accepted, identity forwarded) and the strict one
/// (refused, with the documented reasons).
#[test]
fn certificates_made_with_the_aws_guides_commands_work_under_the_compatible_profile() {
    let Some(_) = require_tool("curl") else {
        return;
    };
    let Some(_) = require_tool("openssl") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    let sh = |line: &str| {
        let r = run("sh", &["-c", line], d);
        assert_eq!(r.code, 0, "{line}: {}", r.stderr);
    };
    // API Gateway: "openssl req -newkey rsa:2048 -nodes -keyout … -out …csr", then
    // "openssl x509 -signkey … -in …csr -req -days 365 -out …crt": an X.509 v1 certificate.
    sh(
        "openssl req -newkey rsa:2048 -nodes -keyout partner.key -out partner.csr -subj '/CN=partner/O=Partner Inc'",
    );
    sh("openssl x509 -signkey partner.key -in partner.csr -req -days 365 -out partner.crt");
    // A private CA: root with `openssl req -x509`, an intermediate with basicConstraints=CA:TRUE
    // (not critical), a device certificate signed with `openssl x509 -req -CA` (v1).
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout RootCA.key -out RootCA.pem -days 3650 -subj '/CN=Guide Root CA'",
    );
    sh(
        "openssl req -new -newkey rsa:2048 -nodes -keyout Intermediate.key -out Intermediate.csr -subj '/CN=Guide Intermediate CA'",
    );
    sh(
        "echo basicConstraints=CA:TRUE > ca.ext && openssl x509 -req -in Intermediate.csr -CA RootCA.pem -CAkey RootCA.key -CAcreateserial -days 365 -extfile ca.ext -out Intermediate.pem",
    );
    sh(
        "openssl req -new -newkey rsa:2048 -nodes -keyout device.key -out device.csr -subj '/CN=device-1'",
    );
    sh(
        "openssl x509 -req -in device.csr -CA Intermediate.pem -CAkey Intermediate.key -CAcreateserial -out device.crt -days 500 -sha256",
    );
    // IoT Core: the device signed directly by the root.
    sh(
        "openssl req -new -newkey rsa:2048 -nodes -keyout sensor.key -out sensor.csr -subj '/CN=sensor-7'",
    );
    sh(
        "openssl x509 -req -in sensor.csr -CA RootCA.pem -CAkey RootCA.key -CAcreateserial -out sensor.crt -days 500 -sha256",
    );
    // A v3 client certificate through the intermediate whose CA:TRUE is not critical.
    sh(
        "printf 'keyUsage=digitalSignature\\nextendedKeyUsage=clientAuth\\n' > client.ext && openssl req -new -newkey rsa:2048 -nodes -keyout app.key -out app.csr -subj '/CN=app' && openssl x509 -req -in app.csr -CA Intermediate.pem -CAkey Intermediate.key -CAcreateserial -days 30 -extfile client.ext -out app.crt",
    );
    // The truststore: the whole chain, and the partner's certificate appended.
    sh("cat RootCA.pem Intermediate.pem > truststore.pem && cat partner.crt >> truststore.pem");
    let lint = run(
        env!("CARGO_BIN_EXE_portcullis"),
        &["pki", "truststore", "lint", "truststore.pem"],
        d,
    );
    assert!(lint.stdout.contains("compatible-only"), "{}", lint.stdout);
    let domain = |host: &str, extra: &str| {
        format!(
            "\n[[domain]]\nhostname = \"{host}\"\ncertificate = \"auto\"\n[domain.mtls]\nmode = \"required\"\n\
             truststore = \"truststore.pem\"\non_failure = \"http\"\n{extra}\n[[domain.mapping]]\nupstream = \"builtin:echo\"\n"
        )
    };
    let config = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n\n[[listener]]\naddress = \"127.0.0.1:0\"\n{}{}",
        domain("compat.test", ""),
        domain("strict.test", "verification = \"strict\"")
    );
    let s = Server::start(d, &config);
    for (who, cert, key, strict_reason) in [
        ("partner", "partner.crt", "partner.key", "malformed"),
        ("device-1", "device.crt", "device.key", "malformed"),
        ("sensor-7", "sensor.crt", "sensor.key", "malformed"),
        ("app", "app.crt", "app.key", "wrong-usage"),
    ] {
        let args = ["--cert", cert, "--key", key];
        let r = curl(d, &s, "compat.test", "/", &args);
        let (status, body) = answer(&r);
        assert_eq!(status, 200, "{who} (compatible): {body} {}", r.stderr);
        assert!(
            body["identity"]["x-client-cert-subject"]
                .as_str()
                .is_some_and(|v| v.contains(&format!("CN={who}"))),
            "{who}: {body}"
        );
        assert_eq!(body["identity"]["x-client-cert-verify"], "SUCCESS");
        let (status, body) = answer(&curl(d, &s, "strict.test", "/", &args));
        assert_eq!(status, 403, "{who} (strict): {body}");
        assert_eq!(body["error"], strict_reason, "{who} (strict): {body}");
        // explain says the same, on the domain's profile and on the other one asked for.
        let explain = |domain: &str, profile: Option<&str>| {
            let mut args = vec![
                "explain",
                "--domain",
                domain,
                "--json",
                "--data-dir",
                "data",
            ];
            if let Some(p) = profile {
                args.extend(["--profile", p]);
            }
            args.push(cert);
            let r = crate::portcullis(d, &args);
            let trace: Value = serde_json::from_str(&r.stdout).unwrap();
            (r.code, trace)
        };
        let (code, trace) = explain("compat.test", None);
        assert_eq!(
            (code, trace["chain"]["result"].as_str()),
            (0, Some("valid")),
            "{trace}"
        );
        for (domain, profile) in [("strict.test", None), ("compat.test", Some("strict"))] {
            let (code, trace) = explain(domain, profile);
            assert_eq!(code, 1, "{trace}");
            assert_eq!(trace["profile"], "strict", "{trace}");
            assert_eq!(trace["chain"]["reason"], strict_reason, "{who}: {trace}");
        }
    }
}
