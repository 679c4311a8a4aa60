//! Attacks on the promise: only a verified identity gets through, and the upstream can trust
//! what it is told. Each test replays a bypass found by a security review (named after it) with
//! a hand-written client (`scripts/attack.py`: raw HTTP/1.1 bytes, HTTP/2 frames) against the
//! release binary, and asserts on what a recording upstream (`scripts/recording_upstream.py`)
//! actually received, not only on the status the client saw.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_testkit::temp_dir;
use serde_json::Value;

use crate::control::{Auth, api};
use crate::serve::{Killed, Server, pki, python_server, registry_store};

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/cli/scripts")
        .join(name)
}

/// The Python with the `h2` package the test command installs (`PORTCULLIS_TEST_PYTHON`), or a
/// `python3` that has it. Missing in CI fails the test; elsewhere it is skipped, saying so.
fn attack_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PORTCULLIS_TEST_PYTHON") {
        return Some(p.into());
    }
    if let Some(p) = portcullis_testkit::tool("python3")
        && portcullis_testkit::run(&p, &["-c", "import h2"], Path::new(".")).code == 0
    {
        return Some(p);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "Python h2 is not installed; the test command (scripts/test) installs it"
    );
    eprintln!("SKIP: Python h2 is not installed (run scripts/test to install it)");
    None
}

/// The recording upstream: what it received, request by request.
struct Upstream {
    _process: Killed,
    port: u16,
    log: PathBuf,
}

impl Upstream {
    fn start(python: &Path, d: &Path) -> Upstream {
        let log = d.join("upstream.log");
        let (process, port) = python_server(
            python,
            &[
                script("recording_upstream.py").to_str().unwrap(),
                log.to_str().unwrap(),
            ],
            d,
        );
        Upstream {
            _process: process,
            port,
            log,
        }
    }

    /// Every record so far: requests (`line`, `headers`, `body`) and tunnel bytes.
    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The request records whose request line holds `needle`.
    fn requests(&self, needle: &str) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["kind"] == "request" && r["line"].as_str().unwrap().contains(needle))
            .collect()
    }

    fn tunnelled(&self) -> usize {
        self.records()
            .iter()
            .filter(|r| r["kind"] == "tunnel")
            .count()
    }
}

/// A request record's headers as (lower-case name, value) pairs, in arrival order.
fn headers(record: &Value) -> Vec<(String, String)> {
    record["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h[0].as_str().unwrap().to_ascii_lowercase(),
                h[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The identity headers a request record carries, by name; panics if one came twice.
fn identity(record: &Value) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    for (name, value) in headers(record) {
        if name.starts_with("client-cert")
            || name.starts_with("x-client-cert")
            || name.starts_with("x-forwarded-client-cert")
        {
            assert!(
                found.insert(name.clone(), value).is_none(),
                "{name} arrived twice: {record}"
            );
        }
    }
    found
}

/// The invariant: the upstream receives exactly the gateway's identity headers for `who`.
fn assert_exact_identity(record: &Value, who: &str) {
    let got = identity(record);
    let names: Vec<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "client-cert",
            "client-cert-chain",
            "x-client-cert-fingerprint-sha256",
            "x-client-cert-issuer",
            "x-client-cert-not-after",
            "x-client-cert-not-before",
            "x-client-cert-serial",
            "x-client-cert-subject",
            "x-client-cert-verify",
        ],
        "{record}"
    );
    assert_eq!(got["x-client-cert-verify"], "SUCCESS", "{record}");
    assert!(
        got["x-client-cert-subject"].contains(&format!("CN={who}")),
        "{record}"
    );
}

/// Sends raw HTTP/1.1 requests one after another on one TLS connection; the answers.
fn http1(
    python: &Path,
    d: &Path,
    port: u16,
    sni: &str,
    who: &str,
    requests: &[&str],
) -> Vec<Value> {
    pipe(python, d, &["http1", &port.to_string(), sni, who], requests)
}

/// Sends HTTP/2 requests (header lists) as streams of one connection; the answers.
fn h2(python: &Path, d: &Path, port: u16, sni: &str, who: &str, requests: Value) -> Vec<Value> {
    let mut child = Command::new(python)
        .args([
            script("attack.py").to_str().unwrap(),
            "h2",
            &port.to_string(),
            sni,
            who,
        ])
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
        .write_all(requests.to_string().as_bytes())
        .unwrap();
    answers(child)
}

fn pipe(python: &Path, d: &Path, args: &[&str], requests: &[&str]) -> Vec<Value> {
    let mut all = vec![script("attack.py").to_str().unwrap().to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    let mut child = Command::new(python)
        .args(&all)
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
        .write_all(serde_json::to_string(requests).unwrap().as_bytes())
        .unwrap();
    answers(child)
}

fn answers(child: Child) -> Vec<Value> {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "attack.py printed no answers ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn status(answer: &Value) -> u64 {
    answer["status"].as_u64().unwrap_or(0)
}

/// The body's `error` code of a gateway answer.
fn code(answer: &Value) -> String {
    serde_json::from_str::<Value>(answer["body"].as_str().unwrap_or(""))
        .map(|b| b["error"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// A domain with mutual TLS (`mode`) on truststore A, and mappings (base path, upstream path,
/// extra lines) to the recording upstream.
fn domain(
    host: &str,
    mode: &str,
    extra: &str,
    port: u16,
    mappings: &[(&str, &str, &str)],
) -> String {
    let mut text = format!(
        "\n[[domain]]\nhostname = \"{host}\"\ncertificate = \"auto\"\n{extra}\n\
         [domain.mtls]\nmode = \"{mode}\"\ntruststore = \"trust-a.pem\"\n"
    );
    for (base, path, lines) in mappings {
        text.push_str(&format!(
            "[[domain.mapping]]\nbase_path = \"{base}\"\nupstream = \"http://127.0.0.1:{port}{path}\"\n{lines}\n"
        ));
    }
    text
}

const HEAD: &str =
    "[admin]\naddress = \"127.0.0.1:0\"\n\n[[listener]]\naddress = \"127.0.0.1:0\"\n";

/// The gateway in front of the recording upstream: `a.test` (required), `under.test` (required,
/// `_` names allowed) and `opt.test` (optional: `/open` and the rest without a certificate,
/// `/secure` with).
fn setup() -> Option<(portcullis_testkit::TempDir, PathBuf, Upstream, Server)> {
    let python = attack_python()?;
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let up = Upstream::start(&python, d);
    let p = up.port;
    let config = format!(
        "{HEAD}{}{}{}",
        domain(
            "a.test",
            "required",
            "",
            p,
            &[
                ("/app", "/app", ""),
                ("/nows", "/nows", "websocket = false")
            ]
        ),
        domain(
            "under.test",
            "required",
            "underscores_in_headers = true",
            p,
            &[("", "/under", "")]
        ),
        domain(
            "opt.test",
            "optional",
            "",
            p,
            &[
                ("/open", "/app/open", "client_certificate = \"optional\""),
                ("/secure", "/app/secure", ""),
                ("", "/app", "client_certificate = \"optional\"")
            ]
        ),
    );
    let s = Server::start(d, &config);
    Some((tmp, python, up, s))
}

#[test]
fn h2c_upgrade_is_refused_and_never_tunnels_past_routing_and_policy() {
    let Some((tmp, py, up, s)) = setup() else {
        return;
    };
    let d = tmp.path();
    // The attack: an h2c upgrade honoured by the upstream would carry HTTP/2 straight to it,
    // past the mapping, the policies and the identity headers.
    let preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let h2c = "GET /app/h2c HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
               Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n";
    let got = http1(&py, d, s.port, "a.test", "alice", &[h2c, preface]);
    assert_eq!(status(&got[0]), 400, "{got:?}");
    assert_eq!(code(&got[0]), "upgrade-refused", "{got:?}");
    // Unknown tokens, and a WebSocket upgrade on a mapping that does not tunnel them.
    for (request, why) in [
        (
            "GET /app/x HTTP/1.1\r\nHost: a.test\r\nConnection: upgrade\r\nUpgrade: foo/1\r\n\r\n",
            "unknown token",
        ),
        (
            "GET /app/x HTTP/1.1\r\nHost: a.test\r\nConnection: upgrade\r\nUpgrade: websocket, h2c\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            "two tokens",
        ),
        (
            "GET /nows/x HTTP/1.1\r\nHost: a.test\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            "websocket = false",
        ),
    ] {
        let got = http1(&py, d, s.port, "a.test", "alice", &[request]);
        assert_eq!(status(&got[0]), 400, "{why}: {got:?}");
        assert_eq!(code(&got[0]), "upgrade-refused", "{why}: {got:?}");
    }
    // An Upgrade header that Connection does not name is no upgrade: it is dropped.
    let got = http1(
        &py,
        d,
        s.port,
        "a.test",
        "alice",
        &[
            "GET /app/plain HTTP/1.1\r\nHost: a.test\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n\r\n",
        ],
    );
    assert_eq!(status(&got[0]), 200, "{got:?}");
    // Nothing was tunnelled; no upgrade request and no HTTP2-Settings reached the upstream.
    assert_eq!(up.tunnelled(), 0, "{:?}", up.records());
    for r in up.records() {
        for (name, _) in headers(&r) {
            assert!(
                name != "upgrade" && name != "http2-settings",
                "{name} reached the upstream: {r}"
            );
        }
    }
    assert_eq!(up.requests("/app/plain").len(), 1);
    // A WebSocket upgrade where allowed still tunnels, checked by the upstream's accept key.
    let ws = websocket(&py, d, s.port, "a.test", "alice", "/app/ws");
    assert_eq!(ws.status, "101");
    drop(ws);
    let upgrade = &up.requests("/app/ws")[0];
    let names: Vec<String> = headers(upgrade).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"upgrade".to_string()), "{upgrade}");
    assert_exact_identity(upgrade, "alice");
}

#[test]
fn a_connection_header_cannot_erase_the_identity_headers() {
    let Some((tmp, py, up, s)) = setup() else {
        return;
    };
    let d = tmp.path();
    for named in [
        "X-Client-Cert-Verify, Client-Cert, X-Client-Cert-Subject",
        "keep-alive, x-client-cert-fingerprint-sha256",
        "X-Forwarded-For",
        "Forwarded",
        "Content-Length",
    ] {
        let request =
            format!("GET /app/erase HTTP/1.1\r\nHost: a.test\r\nConnection: {named}\r\n\r\n");
        let got = http1(&py, d, s.port, "a.test", "alice", &[&request]);
        assert_eq!(status(&got[0]), 400, "Connection: {named}: {got:?}");
        assert_eq!(code(&got[0]), "connection-names-owned-header", "{got:?}");
    }
    assert!(up.requests("/app/erase").is_empty(), "{:?}", up.records());
    // The same on an optional domain, where an anonymous client would hide `NONE`.
    let got = http1(
        &py,
        d,
        s.port,
        "opt.test",
        "-",
        &["GET /open/a HTTP/1.1\r\nHost: opt.test\r\nConnection: X-Client-Cert-Verify\r\n\r\n"],
    );
    assert_eq!(status(&got[0]), 400, "{got:?}");
    let got = http1(
        &py,
        d,
        s.port,
        "opt.test",
        "-",
        &["GET /open/b HTTP/1.1\r\nHost: opt.test\r\nX-Client-Cert-Verify: SUCCESS\r\n\r\n"],
    );
    assert_eq!(status(&got[0]), 200, "{got:?}");
    let anonymous = &up.requests("/app/open/b")[0];
    assert_eq!(
        identity(anonymous).into_iter().collect::<Vec<_>>(),
        [("x-client-cert-verify".to_string(), "NONE".to_string())],
        "{anonymous}"
    );
    // Connection naming other headers still works, on the fast path and the hyper path alike,
    // and the upstream gets exactly the gateway's identity headers every time.
    let got = http1(
        &py,
        d,
        s.port,
        "a.test",
        "alice",
        &[
            "GET /app/fast HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive\r\nX-Client-Cert-Subject: CN=mallory\r\n\r\n",
            "GET /app/hyper HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, X-Custom\r\nX-Custom: 1\r\nclient-cert: :ZXZpbA==:\r\n\r\n",
        ],
    );
    assert!(got.iter().all(|a| status(a) == 200), "{got:?}");
    for path in ["/app/fast", "/app/hyper"] {
        let r = &up.requests(path)[0];
        assert_exact_identity(r, "alice");
        assert!(!headers(r).iter().any(|(n, _)| n == "x-custom"), "{r}");
    }
    // HTTP/2 has no Connection header at all (a client sending one breaks the stream).
    let got = h2(
        &py,
        d,
        s.port,
        "a.test",
        "alice",
        serde_json::json!([{"headers": [[":method", "GET"], [":scheme", "https"], [":authority", "a.test"], [":path", "/app/h2"], ["x-client-cert-verify", "FAILED"]]}]),
    );
    assert_eq!(got[0]["status"], 200, "{got:?}");
    assert_exact_identity(&up.requests("/app/h2")[0], "alice");
}

#[test]
fn header_names_with_underscores_never_reach_the_upstream() {
    let Some((tmp, py, up, s)) = setup() else {
        return;
    };
    let d = tmp.path();
    let spoofs = "X_Client_Cert_Subject: CN=mallory\r\nClient_Cert: :ZXZpbA==:\r\n\
                  X_Client_Cert_Verify: SUCCESS\r\nTransfer_Encoding: chunked\r\nContent_Length: 5\r\n\
                  X_Forwarded_For: 10.6.6.6\r\nX_Custom: kept-only-where-allowed\r\n";
    for host in ["a.test", "under.test"] {
        let path = if host == "a.test" { "/app" } else { "" };
        let fast = format!("GET {path}/u-fast HTTP/1.1\r\nHost: {host}\r\n{spoofs}\r\n");
        // A chunked body sends this one down the hyper path.
        let hyper = format!(
            "POST {path}/u-hyper HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n{spoofs}\r\n3\r\nabc\r\n0\r\n\r\n"
        );
        let got = http1(&py, d, s.port, host, "alice", &[&fast, &hyper]);
        assert!(got.iter().all(|a| status(a) == 200), "{host}: {got:?}");
        let h2 = h2(
            &py,
            d,
            s.port,
            host,
            "alice",
            serde_json::json!([{"headers": [[":method", "GET"], [":scheme", "https"], [":authority", host],
                [":path", format!("{path}/u-h2")], ["x_client_cert_subject", "CN=mallory"], ["client_cert", ":ZXZpbA==:"],
                ["content_length", "5"], ["x_custom", "kept-only-where-allowed"]]}]),
        );
        assert_eq!(h2[0]["status"], 200, "{host}: {h2:?}");
    }
    for (prefix, allowed) in [("/app/u-", false), ("/under/u-", true)] {
        for kind in ["fast", "hyper", "h2"] {
            let records = up.requests(&format!("{prefix}{kind}"));
            assert_eq!(records.len(), 1, "{prefix}{kind}: {:?}", up.records());
            let r = &records[0];
            assert_exact_identity(r, "alice");
            let underscored: Vec<String> = headers(r)
                .into_iter()
                .map(|(n, _)| n)
                .filter(|n| n.contains('_'))
                .collect();
            let expected: Vec<String> = if allowed {
                vec!["x_custom".into()]
            } else {
                vec![]
            };
            assert_eq!(underscored, expected, "{r}");
            if kind == "hyper" {
                assert_eq!(r["body"], "abc", "{r}");
            }
        }
    }
}

#[test]
fn dot_segments_never_reach_the_upstream_on_domains_without_policies() {
    let Some((tmp, py, up, s)) = setup() else {
        return;
    };
    let d = tmp.path();
    // `/open` needs no certificate, `/secure` does: an anonymous client tries to reach `/secure`
    // through `/open` in every spelling an upstream resolves.
    for path in [
        "/open/../secure/x",
        "/open/%2e%2e/secure/x",
        "/open/%2E%2E/secure/x",
        "/open/..;/secure/x",
        "/open/..\\secure/x",
        "/open/..%5csecure/x",
        "/open/.%2e/secure/x",
        "/open/..%2fsecure/x",
        "/open/./../secure/x",
        // Readings other servers make: Tomcat's path parameters, IIS's case folding, trailing
        // dots and spaces, double decoding, overlong UTF-8 and %u escapes.
        "/secure;x/p1",
        "/;x/secure/p2",
        "/SECURE/p3",
        "/secure./p4",
        "/secure%20/p5",
        "/open/%252e%252e/secure/p6",
        "/secure%252fp8",
        "/open/%c0%ae%c0%ae/secure/p9",
        "/open/%u002e%u002e/secure/p10",
    ] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: opt.test\r\n\r\n");
        let got = http1(&py, d, s.port, "opt.test", "-", &[&request]);
        assert_eq!(status(&got[0]), 400, "{path}: {got:?}");
        assert_eq!(code(&got[0]), "ambiguous-path", "{path}: {got:?}");
    }
    assert!(up.requests("secure").is_empty(), "{:?}", up.records());
    // Ordinary paths, dots inside names included, still pass; `/secure` still needs a
    // certificate.
    let got = http1(
        &py,
        d,
        s.port,
        "opt.test",
        "-",
        &[
            "GET /open/v1.2/file.tar.gz HTTP/1.1\r\nHost: opt.test\r\n\r\n",
            "GET /secure/x HTTP/1.1\r\nHost: opt.test\r\n\r\n",
        ],
    );
    assert_eq!(status(&got[0]), 200, "{got:?}");
    assert_eq!(status(&got[1]), 403, "{got:?}");
    assert_eq!(up.requests("/app/open/v1.2/file.tar.gz").len(), 1);
}

#[test]
fn transfer_codings_expectations_and_two_hosts_are_refused() {
    let Some((tmp, py, up, s)) = setup() else {
        return;
    };
    let d = tmp.path();
    let got = http1(
        &py,
        d,
        s.port,
        "a.test",
        "alice",
        &[
            "POST /app/te HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ],
    );
    assert_eq!(status(&got[0]), 501, "{got:?}");
    assert_eq!(code(&got[0]), "unsupported-transfer-coding");
    let got = http1(
        &py,
        d,
        s.port,
        "a.test",
        "alice",
        &["GET /app/expect HTTP/1.1\r\nHost: a.test\r\nExpect: 200-ok\r\n\r\n"],
    );
    assert_eq!(status(&got[0]), 417, "{got:?}");
    let got = h2(
        &py,
        d,
        s.port,
        "a.test",
        "alice",
        serde_json::json!([
            {"headers": [[":method", "GET"], [":scheme", "https"], [":authority", "a.test"], [":path", "/app/two-hosts"], ["host", "under.test"]]},
            {"headers": [[":method", "GET"], [":scheme", "https"], [":authority", "a.test"], [":path", "/app/same-host"], ["host", "a.test"]]}
        ]),
    );
    assert_eq!(got[0]["status"], 400, "{got:?}");
    assert_eq!(got[1]["status"], 200, "{got:?}");
    let many: String = (0..120).map(|i| format!("X-Pad-{i}: 1\r\n")).collect();
    for (request, want) in [
        (
            "CONNECT e.test:443 HTTP/1.1\r\nHost: e.test:443\r\n\r\n".to_string(),
            405,
        ),
        (
            "OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n".to_string(),
            400,
        ),
        (
            format!("GET /app/many HTTP/1.1\r\nHost: a.test\r\n{many}\r\n"),
            431,
        ),
    ] {
        let got = http1(&py, d, s.port, "a.test", "alice", &[&request]);
        assert_eq!(status(&got[0]), want, "{request}: {got:?}");
    }
    assert!(up.requests("/app/many").is_empty());
    assert!(
        up.records()
            .iter()
            .all(|r| !r["line"].as_str().unwrap().starts_with("CONNECT"))
    );
    assert!(up.requests("/app/te").is_empty());
    assert!(up.requests("/app/expect").is_empty());
    assert!(up.requests("/app/two-hosts").is_empty());
    assert_eq!(up.requests("/app/same-host").len(), 1);
}

#[test]
fn a_host_naming_another_domain_gets_421_even_under_a_wildcard() {
    let Some(py) = attack_python() else { return };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let up = Upstream::start(&py, d);
    let p = up.port;
    // x.w.test trusts root A; *.w.test trusts root B; the default endpoint serves a.test.
    let wildcard = domain("*.w.test", "required", "", p, &[("", "/wild", "")])
        .replace("trust-a.pem", "trust-b.pem");
    let config = format!(
        "default_endpoint = true\ndefault_domain = \"a.test\"\n{HEAD}{}{}{}",
        domain("x.w.test", "required", "", p, &[("", "/exact", "")]),
        wildcard,
        domain("a.test", "required", "", p, &[("", "/default", "")]),
    );
    let s = Server::start(d, &config);
    let port = s.port;
    // bob (root B) on SNI y.w.test asks for x.w.test, which trusts only root A.
    let got = http1(
        &py,
        d,
        port,
        "y.w.test",
        "bob",
        &[
            "GET /coalesced HTTP/1.1\r\nHost: x.w.test\r\n\r\n",
            "GET /own HTTP/1.1\r\nHost: y.w.test\r\n\r\n",
            "GET /other-label HTTP/1.1\r\nHost: z.w.test:443\r\n\r\n",
        ],
    );
    assert_eq!(status(&got[0]), 421, "{got:?}");
    assert_eq!(status(&got[1]), 200, "{got:?}");
    assert_eq!(status(&got[2]), 200, "{got:?}");
    let got = h2(
        &py,
        d,
        port,
        "y.w.test",
        "bob",
        serde_json::json!([{"headers": [[":method", "GET"], [":scheme", "https"], [":authority", "x.w.test"], [":path", "/coalesced-h2"]]}]),
    );
    assert_eq!(got[0]["status"], 421, "{got:?}");
    assert!(up.requests("/exact").is_empty(), "{:?}", up.records());
    // The default endpoint (an SNI no domain has): a Host naming another domain gets 421; any
    // other Host is served under the default domain's own name, never echoed upstream.
    let got = http1(
        &py,
        d,
        port,
        "unknown.test",
        "alice",
        &[
            "GET /to-x HTTP/1.1\r\nHost: x.w.test\r\n\r\n",
            "GET /spoofed HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        ],
    );
    assert_eq!(status(&got[0]), 421, "{got:?}");
    assert_eq!(status(&got[1]), 200, "{got:?}");
    let spoofed = &up.requests("/default/spoofed")[0];
    let forwarded: Vec<(String, String)> = headers(spoofed)
        .into_iter()
        .filter(|(n, _)| n == "x-forwarded-host" || n == "forwarded")
        .collect();
    assert!(
        forwarded.iter().all(|(_, v)| !v.contains("evil")),
        "{forwarded:?}"
    );
    assert!(
        forwarded.contains(&("x-forwarded-host".into(), "a.test".into())),
        "{forwarded:?}"
    );
    // An absolute SNI name (`x.w.test.`) is x.w.test, not the default domain: alice (root A)
    // is served by x.w.test, bob (root B) is refused there.
    let got = http1(
        &py,
        d,
        port,
        "x.w.test.",
        "alice",
        &["GET /dot HTTP/1.1\r\nHost: x.w.test.\r\n\r\n"],
    );
    assert_eq!(status(&got[0]), 200, "{got:?}");
    assert_eq!(up.requests("/exact/dot").len(), 1, "{:?}", up.records());
    let got = http1(
        &py,
        d,
        port,
        "x.w.test.",
        "bob",
        &["GET /dot-bob HTTP/1.1\r\nHost: x.w.test\r\n\r\n"],
    );
    assert!(got[0]["closed"] == true, "{got:?}");
}

#[test]
fn websocket_tunnels_keep_their_slot_and_close_on_revocation_and_operator_close() {
    let Some(py) = attack_python() else { return };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let up = Upstream::start(&py, d);
    let (runtime, store) = registry_store(d);
    let alice = runtime
        .block_on(store.register_certificate(
            &std::fs::read(d.join("alice.pem")).unwrap(),
            portcullis_registry::CertStatus::Active,
            "test",
        ))
        .unwrap();
    let config = format!(
        "{HEAD}{}",
        domain(
            "rev.test",
            "required",
            "registry_mode = \"revocation\"",
            up.port,
            &[("", "", "")]
        )
    );
    let s = Server::start(d, &config);
    let mut tunnels: Vec<Held> = (0..5)
        .map(|_| websocket(&py, d, s.port, "rev.test", "alice", "/ws"))
        .collect();
    assert!(tunnels.iter().all(|t| t.status == "101"));
    // Five tunnels are five open connections: counted, listed, within max_connections.
    let metric = |name: &str| {
        s.metrics(d)
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .map(|v| v.trim().parse::<f64>().unwrap())
            })
            .unwrap_or(0.0)
    };
    assert_eq!(metric("portcullis_active_connections "), 5.0);
    let (code, listed) = api(d, &s, "GET", "/v1/connections", None, Auth::Certificate);
    assert_eq!(code, 200, "{listed}");
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 5, "{listed}");
    assert!(
        items.iter().all(|c| c["protocol"] == "websocket"),
        "{listed}"
    );
    // An operator closes the first one.
    let first = format!("127.0.0.1:{}", tunnels[0].local_port);
    let entry = items.iter().find(|c| c["peer"] == first.as_str()).unwrap();
    let id = entry["id"].as_u64().unwrap();
    let (code, _) = api(
        d,
        &s,
        "DELETE",
        &format!("/v1/connections/{id}"),
        None,
        Auth::Certificate,
    );
    assert_eq!(code, 204);
    tunnels.remove(0).wait_closed();
    // Revoking alice closes the other four.
    let revoked_at = Instant::now();
    runtime
        .block_on(store.set_certificate_status(
            &alice.id,
            portcullis_registry::CertStatus::Revoked,
            "test",
        ))
        .unwrap();
    for t in tunnels {
        t.wait_closed();
    }
    let took = revoked_at.elapsed();
    assert!(took < Duration::from_secs(5), "revocation took {took:?}");
    assert_eq!(metric("portcullis_active_connections "), 0.0);
    assert!(up.tunnelled() > 0);
    // Shutdown closes a tunnel too, instead of waiting for it.
    let carol = runtime
        .block_on(store.register_certificate(
            &std::fs::read(d.join("carol.pem")).unwrap(),
            portcullis_registry::CertStatus::Active,
            "test",
        ))
        .unwrap();
    let _ = carol;
    let tunnel = websocket(&py, d, s.port, "rev.test", "carol", "/ws");
    assert_eq!(tunnel.status, "101");
    let stopping = Instant::now();
    Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    tunnel.wait_closed();
    s.wait_for("\"reason\":\"shutdown\"");
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopping.elapsed()
    );
}

/// `attack.py ws` or `attack.py hold`: a connection held open through the gateway, reporting
/// on its standard output.
struct Held {
    _child: Killed,
    lines: std::sync::mpsc::Receiver<String>,
    /// The first line's second word: the answer that opened it.
    status: String,
    /// The first line's third word, if any (the WebSocket client's local port).
    local_port: u16,
}

/// A WebSocket opened through the gateway (`attack.py ws`).
fn websocket(python: &Path, d: &Path, port: u16, sni: &str, who: &str, path: &str) -> Held {
    Held::start(python, d, &["ws", &port.to_string(), sni, who, path])
}

impl Held {
    fn start(python: &Path, d: &Path, args: &[&str]) -> Held {
        let mut child = Command::new(python)
            .arg(script("attack.py"))
            .args(args)
            .current_dir(d)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("the client connected");
        let mut words = first.split(' ').skip(1);
        Held {
            _child: Killed(child),
            status: words.next().unwrap_or_default().to_string(),
            local_port: words.next().and_then(|p| p.parse().ok()).unwrap_or(0),
            lines,
        }
    }

    /// Waits (at most 10 s) for the gateway to close the connection; the client's closing line.
    fn wait_closed(&self) -> String {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("the connection is closed within 10 s");
        assert!(line.starts_with("closed "), "{line}");
        line
    }

    /// When (unix seconds) the client saw the connection close.
    fn closed_at(&self) -> f64 {
        self.wait_closed()[7..].parse().unwrap()
    }

    /// Whether the connection is still open now.
    fn is_open(&self) -> bool {
        matches!(
            self.lines.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Empty)
        )
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn a_crl_or_truststore_change_closes_open_connections_within_a_second() {
    let Some(py) = attack_python() else { return };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    std::fs::copy(d.join("trust-a.pem"), d.join("trust.pem")).unwrap();
    let config = "[admin]\naddress = \"127.0.0.1:0\"\n\n[[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\", \"mqtt\"]\n\n\
                  [[domain]]\nhostname = \"a.test\"\ncertificate = \"auto\"\n\
                  [domain.mtls]\nmode = \"required\"\ntruststore = \"trust.pem\"\ncrls = [\"int.crl\"]\n\
                  [[domain.mapping]]\nupstream = \"builtin:echo\"\n";
    let s = Server::start(d, config);
    std::fs::write(
        d.join("connect.json"),
        r#"{"Statement": {"Effect": "Allow", "Action": "mqtt:Connect", "Resource": "client:${cert:Subject.CN}"}}"#,
    )
    .unwrap();
    crate::control::cli(
        d,
        &["policy", "create", "connect", "--document", "connect.json"],
    )
    .ok();
    crate::control::cli(d, &["policy", "attach", "connect", "--domain", "a.test"]).ok();
    crate::control::wait_for_snapshot(d, &s);
    let port = s.port.to_string();
    let hold = |who: &str, kind: &str| Held::start(&py, d, &["hold", &port, "a.test", who, kind]);
    let alice = [
        hold("alice", "http1"),
        hold("alice", "h2"),
        hold("alice", "mqtt"),
    ];
    let carol = [hold("carol", "http1"), hold("carol", "mqtt")];
    for h in alice.iter().chain(&carol) {
        assert!(
            ["200", "connack-0"].contains(&h.status.as_str()),
            "{}",
            h.status
        );
    }
    // A CRL now revokes alice: the reload closes her open connections, not carol's.
    // (The file watcher may reload before the signal does: either reload closes them.)
    crate::serve::revoke(d, "alice");
    let line = s.reload();
    let reloaded = unix_now();
    assert!(line.contains("\"result\":\"ok\""), "{line}");
    let mut slowest: f64 = 0.0;
    for h in &alice {
        slowest = slowest.max(h.closed_at() - reloaded);
    }
    println!("alice's connections closed at most {slowest:.3} s after the reload");
    assert!(slowest < 1.0, "closed {slowest:.3} s after the reload");
    s.printed("alice's close", |l| l.contains("\"reason\":\"revoked\""));
    assert!(carol.iter().all(Held::is_open));
    // A truststore without root A closes carol's.
    std::fs::copy(d.join("trust-b.pem"), d.join("trust.pem")).unwrap();
    let line = s.reload();
    let reloaded = unix_now();
    assert!(line.contains("\"result\":\"ok\""), "{line}");
    for h in &carol {
        let after = h.closed_at() - reloaded;
        assert!(after < 1.0, "closed {after:.3} s after the reload");
    }
    let text = s.metrics(d);
    assert!(
        text.contains(
            r#"portcullis_connections_closed_total{domain="a.test",reason="untrusted-issuer"}"#
        ),
        "{text}"
    );
}

/// `openssl` makes a client certificate signed by `int` with the subject exactly as given
/// (`-subj`, multi-valued RDNs allowed), a P-256 key, and the extensions the profile asks for.
fn openssl_client(d: &Path, name: &str, subject: &str) {
    std::fs::write(
        d.join("client-ext.cnf"),
        "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n\
         extendedKeyUsage = clientAuth\nsubjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| crate::openssl(d, args).expect("openssl is installed").ok();
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-multivalue-rdn",
        "-keyout",
        &format!("{name}.key"),
        "-subj",
        subject,
        "-out",
        &format!("{name}.csr"),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &format!("{name}.csr"),
        "-CA",
        "int/ca.pem",
        "-CAkey",
        "int/ca.key",
        "-set_serial",
        "0x5a5a5a5a5a5a",
        "-days",
        "30",
        "-extfile",
        "client-ext.cnf",
        "-out",
        &format!("{name}.pem"),
    ]);
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(d.join(format!("{name}.pem"))).unwrap(),
        std::fs::read_to_string(d.join("int/ca.pem")).unwrap()
    );
    std::fs::write(d.join(format!("{name}.chain.pem")), chain).unwrap();
}

/// Stores `document` as policy `name`, attaches it to `domain` and waits for the gateway.
fn attach_policy(d: &Path, s: &Server, name: &str, document: &str, domain: &str) {
    std::fs::write(d.join(format!("{name}.json")), document).unwrap();
    let file = format!("{name}.json");
    crate::control::cli(d, &["policy", "create", name, "--document", &file]).ok();
    crate::control::cli(d, &["policy", "attach", name, "--domain", domain]).ok();
    crate::control::wait_for_snapshot(d, s);
}

/// A gateway with a policy-authorized domain `api.test` (on the recording upstream) and
/// `reg.test` (registry_mode revocation).
fn policy_gateway() -> Option<(portcullis_testkit::TempDir, PathBuf, Upstream, Server)> {
    let python = attack_python()?;
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let up = Upstream::start(&python, d);
    let config = format!(
        "{HEAD}{}{}",
        domain(
            "api.test",
            "required",
            "",
            up.port,
            &[("", "", "authorization = \"policy\"")]
        ),
        domain(
            "reg.test",
            "required",
            "registry_mode = \"revocation\"",
            up.port,
            &[("", "/reg", "")]
        ),
    );
    let s = Server::start(d, &config);
    Some((tmp, python, up, s))
}

#[test]
fn policy_variables_holding_a_slash_never_cross_into_another_tenant() {
    let Some((tmp, py, up, s)) = policy_gateway() else {
        return;
    };
    let d = tmp.path();
    crate::leaf(d, "client", "acme-1", "int", &["--org", "Acme"]);
    crate::leaf(d, "client", "mallory", "int", &["--org", "Acme/secret"]);
    attach_policy(
        d,
        &s,
        "partners",
        r#"{"Statement": {"Effect": "Allow", "Action": "http:*", "Resource": "route:api.test/partners/${cert:Subject.O}/*"}}"#,
        "api.test",
    );
    let get = |who: &str, path: &str| {
        let request = format!("GET {path} HTTP/1.1\r\nHost: api.test\r\n\r\n");
        http1(&py, d, s.port, "api.test", who, &[&request]).remove(0)
    };
    assert_eq!(status(&get("acme-1", "/partners/Acme/orders")), 200);
    // O = "Acme/secret" would make the pattern route:api.test/partners/Acme/secret/*: Acme's.
    let answer = get("mallory", "/partners/Acme/secret/orders");
    assert_eq!(status(&answer), 403, "{answer}");
    assert_eq!(code(&answer), "policy-denied");
    assert!(up.requests("secret").is_empty(), "{:?}", up.records());
}

#[test]
fn method_override_headers_never_reach_policy_mappings() {
    let Some((tmp, py, up, s)) = policy_gateway() else {
        return;
    };
    let d = tmp.path();
    attach_policy(
        d,
        &s,
        "read-only",
        r#"{"Statement": {"Effect": "Allow", "Action": "http:GET", "Resource": "route:api.test/*"}}"#,
        "api.test",
    );
    // GET is allowed, DELETE is not: an upstream honouring an override would delete.
    let got = http1(
        &py,
        d,
        s.port,
        "api.test",
        "alice",
        &[
            "GET /fast HTTP/1.1\r\nHost: api.test\r\nX-HTTP-Method-Override: DELETE\r\nX-HTTP-Method: DELETE\r\nX-Method-Override: DELETE\r\n\r\n",
            "GET /hyper HTTP/1.1\r\nHost: api.test\r\nConnection: keep-alive, X-Other\r\nX-HTTP-Method-Override: DELETE\r\n\r\n",
        ],
    );
    assert!(got.iter().all(|a| status(a) == 200), "{got:?}");
    // A query-string override (Rails, Laravel, Express) is refused on policy mappings.
    let got = http1(
        &py,
        d,
        s.port,
        "api.test",
        "alice",
        &[
            "GET /query?_method=DELETE HTTP/1.1\r\nHost: api.test\r\n\r\n",
            "GET /query2?a=1&%5Fmethod=DELETE HTTP/1.1\r\nHost: api.test\r\n\r\n",
        ],
    );
    assert!(got.iter().all(|a| status(a) == 400), "{got:?}");
    assert!(up.requests("/query").is_empty());
    for path in ["/fast", "/hyper"] {
        let r = &up.requests(&format!("GET {path} "))[0];
        let overrides: Vec<(String, String)> = headers(r)
            .into_iter()
            .filter(|(n, _)| n.contains("method"))
            .collect();
        assert!(overrides.is_empty(), "{r}");
    }
    // A mapping without policies keeps them (the method decided nothing there).
    let got = http1(
        &py,
        d,
        s.port,
        "reg.test",
        "alice",
        &["GET /plain HTTP/1.1\r\nHost: reg.test\r\nX-HTTP-Method-Override: PATCH\r\n\r\n"],
    );
    assert_eq!(status(&got[0]), 200, "{got:?}");
    let r = &up.requests("/reg/plain")[0];
    assert!(
        headers(r)
            .iter()
            .any(|(n, _)| n == "x-http-method-override"),
        "{r}"
    );
}

#[test]
fn ambiguous_subjects_are_refused_by_policies_and_the_registry() {
    let Some((tmp, py, up, s)) = policy_gateway() else {
        return;
    };
    let d = tmp.path();
    // Two O values: a policy reads the first, the headers show both. A multi-valued RDN too.
    openssl_client(d, "two-orgs", "/O=Globex/O=Acme/CN=two-orgs");
    openssl_client(d, "multi", "/O=Acme/CN=multi+OU=ops");
    openssl_client(d, "plain", "/O=Acme/CN=plain");
    attach_policy(
        d,
        &s,
        "acme",
        r#"{"Statement": {"Effect": "Allow", "Action": "http:*", "Resource": "route:api.test/partners/${cert:Subject.O}/*"}}"#,
        "api.test",
    );
    let get = |who: &str, host: &str, path: &str| {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        http1(&py, d, s.port, host, who, &[&request]).remove(0)
    };
    assert_eq!(status(&get("plain", "api.test", "/partners/Acme/x")), 200);
    for who in ["two-orgs", "multi"] {
        for org in ["Acme", "Globex"] {
            let answer = get(who, "api.test", &format!("/partners/{org}/x"));
            assert_eq!(status(&answer), 403, "{who} {org}: {answer}");
            assert!(
                answer["body"].as_str().unwrap().contains("ambiguous"),
                "{answer}"
            );
        }
        // A domain that consults the registry refuses it in the handshake.
        let answer = get(who, "reg.test", "/x");
        assert_eq!(answer["closed"], true, "{who}: {answer}");
    }
    assert!(
        s.wait_for("\"reason\":\"ambiguous-subject\"")
            .contains("reg.test")
    );
    assert_eq!(up.requests("/partners/").len(), 1, "{:?}", up.records());
    // The registry does not register it.
    let r = crate::control::cli(d, &["cert", "register", "--cert", "two-orgs.pem"]);
    crate::assert_clean_error(&r, 2, "more than one O");
}

#[test]
fn issuing_a_subject_with_policy_separators_needs_an_explicit_yes() {
    let Some((tmp, _py, _up, s)) = policy_gateway() else {
        return;
    };
    let d = tmp.path();
    let _ = &s;
    for cn in ["+", "telemetry/x", "a#", "$aws", "dev*"] {
        let r = crate::control::cli(
            d,
            &[
                "cert",
                "create",
                "--common-name",
                cn,
                "--out",
                "issued",
                "--force",
            ],
        );
        crate::assert_clean_error(&r, 2, "allow-separators");
    }
    let made = crate::control::cli(
        d,
        &[
            "cert",
            "create",
            "--common-name",
            "ops/north",
            "--out",
            "issued",
            "--force",
            "--allow-separators",
        ],
    );
    assert_eq!(made.code, 0, "{}", made.stderr);
    crate::control::cli(
        d,
        &["cert", "create", "--common-name", "dev-1", "--out", "ok"],
    )
    .ok();
}

#[test]
fn things_named_dot_or_dotdot_are_refused() {
    let Some((tmp, _py, _up, _s)) = policy_gateway() else {
        return;
    };
    let d = tmp.path();
    // Such a thing could not be named in a URL (`/v1/things/..`): the console could not manage it.
    for name in [".", "..", "..."] {
        crate::assert_clean_error(
            &crate::control::cli(d, &["thing", "create", name]),
            2,
            "not only dots",
        );
    }
    crate::control::cli(d, &["thing", "create", "v1.2"]).ok();
}

#[test]
fn mqtt_session_takeover_by_another_certificate_starts_clean() {
    let Some(py) = attack_python() else { return };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    crate::leaf(d, "client", "dave", "int", &[]);
    let s = Server::start(d, &mqtt_config());
    attach_policy(d, &s, "devices", MQTT_POLICY, "localhost");
    let r = portcullis_testkit::run(
        &py,
        &[
            script("mqtt_attacks.py").to_str().unwrap(),
            "takeover",
            &s.ports[1].to_string(),
        ],
        d,
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["alice_connack"], 0, "{v}");
    assert_eq!(v["carol_connack"], 0, "{v}");
    assert_eq!(v["carol_session_present"], false, "{v}");
    assert_eq!(v["carol_first_message"], "public/hello", "{v}");
}

#[test]
fn mqtt_wildcards_in_client_ids_and_certificate_fields_never_widen_a_filter() {
    let Some(py) = attack_python() else { return };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    crate::leaf(d, "client", "dev-1", "int", &[]);
    crate::portcullis(
        d,
        &[
            "pki",
            "issue",
            "--profile",
            "client",
            "--cn",
            "+",
            "--out",
            ".",
            "--name",
            "plus",
            "--issuer-cert",
            "int/ca.pem",
            "--issuer-key",
            "int/ca.key",
        ],
    )
    .ok();
    let s = Server::start(d, &mqtt_config());
    attach_policy(d, &s, "devices", MQTT_POLICY, "localhost");
    let r = portcullis_testkit::run(
        &py,
        &[
            script("mqtt_attacks.py").to_str().unwrap(),
            "wildcard",
            &s.ports[1].to_string(),
        ],
        d,
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    // MQTT 3.1.1 return code 2 (identifier rejected) is reason 133 to paho.
    assert_eq!(v["plus_client_id_connack"], 133, "{v}");
    assert_eq!(v["attacker_connack"], 0, "{v}");
    assert_eq!(v["wide_suback"], serde_json::json!([128]), "{v}");
    assert_eq!(v["own_suback"], serde_json::json!([1]), "{v}");
    assert_eq!(v["attacker_first_message"], "public/hello", "{v}");
}

const MQTT_POLICY: &str = r#"{"Statement": [
  {"Effect": "Allow", "Action": "mqtt:Connect", "Resource": "client:*"},
  {"Effect": "Allow", "Action": "mqtt:Publish", "Resource": "topic:*"},
  {"Effect": "Allow", "Action": "mqtt:Subscribe",
   "Resource": ["topicfilter:telemetry/${cert:Subject.CN}/#", "topicfilter:${cert:Subject.CN}/#", "topicfilter:public/#"]},
  {"Effect": "Allow", "Action": "mqtt:Receive",
   "Resource": ["topic:telemetry/*", "topic:${cert:Subject.CN}/*", "topic:public/*"]}]}"#;

/// HTTP and an MQTT listener; connections without SNI go to `localhost` (truststore A).
fn mqtt_config() -> String {
    format!(
        "default_endpoint = true\ndefault_domain = \"localhost\"\n{HEAD}\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"mqtt\"]\n\
         [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\n\
         [domain.mtls]\nmode = \"required\"\ntruststore = \"trust-a.pem\"\n\
         [[domain.mapping]]\nupstream = \"builtin:echo\"\n"
    )
}

#[test]
fn jitp_never_joins_an_existing_thing_unless_the_template_allows_it() {
    let Some(py) = attack_python() else { return };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    crate::leaf(d, "client", "sensor-1", "int", &[]);
    let s = Server::start(
        d,
        &crate::serve::registry_config(&[("reg.test", "registered")]),
    );
    let cli = |args: &[&str]| crate::control::cli(d, args);
    let code = cli(&["ca", "registration-code"])
        .ok()
        .stdout
        .trim()
        .to_string();
    crate::portcullis(
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
    std::fs::write(
        d.join("template.json"),
        r#"{"thing_name": "${Certificate.Subject.CommonName}"}"#,
    )
    .unwrap();
    let ca = crate::control::cli_json(
        d,
        &[
            "ca",
            "register",
            "--cert",
            "int/ca.pem",
            "--verification-cert",
            "pop/verification.pem",
            "--activate",
            "--auto-register",
            "--template",
            "template.json",
        ],
    );
    // An operator's thing, with an attribute and a policy a device must not inherit.
    cli(&["thing", "create", "sensor-1", "--attr", "role=admin"]).ok();
    crate::control::wait_for_snapshot(d, &s);
    let get = || {
        http1(
            &py,
            d,
            s.port,
            "reg.test",
            "sensor-1",
            &["GET / HTTP/1.1\r\nHost: reg.test\r\n\r\n"],
        )
        .remove(0)
    };
    let refused = get();
    assert!(
        refused["closed"] == true || status(&refused) != 200,
        "{refused}"
    );
    let line = s.wait_for("\"reason\":\"provisioning-failed\"");
    assert!(line.contains("exists already"), "{line}");
    let thing = crate::control::cli_json(d, &["thing", "describe", "sensor-1"]);
    assert!(
        thing["certificates"].as_array().unwrap().is_empty(),
        "{thing}"
    );
    let audit = crate::control::cli_json(
        d,
        &["audit", "list", "--action", "certificate.provision-refused"],
    );
    assert_eq!(audit["items"].as_array().unwrap().len(), 1, "{audit}");
    // The template may allow it explicitly.
    std::fs::write(
        d.join("template.json"),
        r#"{"thing_name": "${Certificate.Subject.CommonName}", "join_existing_thing": true}"#,
    )
    .unwrap();
    cli(&[
        "ca",
        "update",
        ca["id"].as_str().unwrap(),
        "--template",
        "template.json",
    ])
    .ok();
    crate::control::wait_for_snapshot(d, &s);
    assert_eq!(status(&get()), 200);
    let thing = crate::control::cli_json(d, &["thing", "describe", "sensor-1"]);
    assert_eq!(
        thing["certificates"].as_array().unwrap().len(),
        1,
        "{thing}"
    );
}

#[test]
fn a_resumed_session_of_a_revoked_certificate_gets_the_tls_alert() {
    let Some(openssl_bin) = portcullis_testkit::require_tool("openssl") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let (runtime, store) = registry_store(d);
    let alice = runtime
        .block_on(store.register_certificate(
            &std::fs::read(d.join("alice.pem")).unwrap(),
            portcullis_registry::CertStatus::Active,
            "test",
        ))
        .unwrap();
    let s = Server::start(
        d,
        &crate::serve::registry_config(&[("reg.test", "revocation")]),
    );
    let connect = format!("127.0.0.1:{}", s.port);
    let s_client = |version: &str, session: &str| -> String {
        let out =
            Command::new(&openssl_bin)
                .args([
                    "s_client",
                    "-connect",
                    &connect,
                    "-servername",
                    "reg.test",
                    version,
                    "-cert",
                    "alice.pem",
                    "-key",
                    "alice.key",
                    "-cert_chain",
                    "int/ca.pem",
                    "-CAfile",
                    "data/ca/ca.pem",
                    "-ign_eof",
                    session,
                    &format!("sess{version}.pem"),
                ])
                .current_dir(d)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .and_then(|mut child| {
                    child.stdin.take().unwrap().write_all(
                        b"GET / HTTP/1.1\r\nHost: reg.test\r\nConnection: close\r\n\r\n",
                    )?;
                    child.wait_with_output()
                })
                .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    for version in ["-tls1_2", "-tls1_3"] {
        let first = s_client(version, "-sess_out");
        assert!(first.contains("HTTP/1.1 200"), "{first}");
        // Control: the session resumes while alice is admitted.
        let again = s_client(version, "-sess_in");
        assert!(again.contains("Reused"), "{version}: {again}");
        assert!(again.contains("HTTP/1.1 200"), "{again}");
    }
    runtime
        .block_on(store.set_certificate_status(
            &alice.id,
            portcullis_registry::CertStatus::Revoked,
            "test",
        ))
        .unwrap();
    crate::control::wait_for_snapshot(d, &s);
    for version in ["-tls1_2", "-tls1_3"] {
        let after = s_client(version, "-sess_in");
        assert!(!after.contains("Reused"), "{version}: {after}");
        assert!(!after.contains("HTTP/1.1"), "{version}: {after}");
        assert!(
            after.contains("alert certificate revoked"),
            "{version}: {after}"
        );
    }
}

#[test]
fn the_admin_client_certificate_can_be_rotated_and_the_old_one_is_refused() {
    let Some(curl) = portcullis_testkit::require_tool("curl") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let s = Server::start(d, &crate::serve::registry_config(&[("a.test", "off")]));
    std::fs::copy(d.join("data/admin/admin.pem"), d.join("old.pem")).unwrap();
    std::fs::copy(d.join("data/admin/admin.key"), d.join("old.key")).unwrap();
    let with_cert = |cert: &str, key: &str| {
        let url = format!("https://127.0.0.1:{}/v1/tokens", s.admin_port);
        let r = portcullis_testkit::run(
            &curl,
            &[
                "-sS",
                "--cacert",
                "data/ca/ca.pem",
                "--cert",
                cert,
                "--key",
                key,
                "-w",
                "\n%{http_code}",
                &url,
            ],
            d,
        );
        let (body, code) = r.stdout.rsplit_once('\n').unwrap();
        (code.to_string(), body.to_string())
    };
    assert_eq!(with_cert("old.pem", "old.key").0, "200");
    let old_id = crate::json(crate::portcullis(
        d,
        &["pki", "inspect", "--json", "old.pem"],
    ))[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let rotated = crate::control::cli_json(d, &["admin", "cert", "rotate"]);
    assert_eq!(rotated["revoked"], old_id.as_str(), "{rotated}");
    assert!(rotated.get("private_key_pem").is_none(), "{rotated}");
    // The old certificate is refused from the next request on; the data dir holds the new one.
    let (code, body) = with_cert("old.pem", "old.key");
    assert_eq!(code, "401", "{body}");
    assert!(body.contains("admin-certificate-revoked"), "{body}");
    assert_eq!(
        with_cert("data/admin/admin.pem", "data/admin/admin.key").0,
        "200"
    );
    assert_eq!(crate::mode(d.join("data/admin/admin.key")), 0o600);
    let listed = crate::control::cli_json(d, &["admin", "cert", "list"]);
    assert_eq!(listed["current"], rotated["id"], "{listed}");
    let statuses: Vec<(String, String)> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        statuses.contains(&(old_id.clone(), "REVOKED".into())),
        "{listed}"
    );
    // The current certificate is rotated, not revoked (that would lock the node's CLI out).
    let current = rotated["id"].as_str().unwrap();
    crate::assert_clean_error(
        &crate::control::cli(d, &["admin", "cert", "revoke", current]),
        2,
        "rotate",
    );
    // A remote operator takes a copy; the rotation it replaces is revoked as well.
    let again = crate::control::cli_json(d, &["admin", "cert", "rotate", "--out", "remote"]);
    assert_eq!(again["revoked"], current, "{again}");
    assert_eq!(crate::mode(d.join("remote/admin.key")), 0o600);
    assert_eq!(with_cert("remote/admin.pem", "remote/admin.key").0, "200");
    let audit = crate::control::cli_json(d, &["audit", "list", "--action", "admin.certificate"]);
    assert_eq!(audit["items"].as_array().unwrap().len(), 4, "{audit}");
}

/// CPU time (user + system, seconds) and resident memory (KiB) of a process.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    (ticks / 100.0, rss)
}

#[test]
fn http2_floods_are_cut_off_with_bounded_memory_and_cpu_and_other_clients_served() {
    let Some(python) = portcullis_testkit::require_tool("python3") else {
        return;
    };
    let Some(_) = portcullis_testkit::require_tool("curl") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let up = Upstream::start(&python, d);
    let s = Server::start(
        d,
        &format!(
            "{HEAD}{}",
            domain("a.test", "required", "", up.port, &[("", "", "")])
        ),
    );
    let pid = s.child.id();
    let legit = || {
        let alice = crate::serve::client("alice");
        let mut args = crate::serve::with_client(&alice);
        args.push("--http2");
        crate::serve::answer(&crate::serve::curl(d, &s, "a.test", "/legit", &args)).0
    };
    assert_eq!(legit(), 200);
    let (_, rss0) = usage(pid);
    for (mode, count, budget) in [
        ("rapid-reset", "100000", Some("rst-stream")),
        ("reset-accepted", "1000", Some("rst-stream")),
        ("server-reset", "5000", Some("rst-stream")),
        ("ping", "100000", Some("ping")),
        ("settings", "100000", Some("settings")),
        ("priority", "100000", Some("priority")),
        ("continuation", "100000", None),
        ("streams", "150", None),
    ] {
        s.drain();
        let (cpu0, _) = usage(pid);
        let r = portcullis_testkit::run(
            &python,
            &[
                script("h2_flood.py").to_str().unwrap(),
                mode,
                &s.port.to_string(),
                "a.test",
                "alice",
                count,
            ],
            d,
        );
        assert_eq!(r.code, 0, "{mode}: {}{}", r.stdout, r.stderr);
        let v: Value = serde_json::from_str(&r.stdout).unwrap();
        let (cpu1, rss) = usage(pid);
        println!(
            "{mode}: {v}; gateway CPU {:.2} s, memory {rss0} → {rss} KiB",
            cpu1 - cpu0
        );
        match budget {
            Some(kind) => {
                assert_eq!(v["closed"], true, "{mode}: {v}");
                let line = s.wait_for("\"reason\":\"h2-flood\"");
                assert!(line.contains(kind), "{mode}: {line}");
            }
            None if mode == "continuation" => {
                assert_eq!(v["closed"], true, "{mode}: {v}");
                assert_eq!(v["goaway"], 11, "ENHANCE_YOUR_CALM: {v}");
            }
            None => {
                assert_eq!(v["max_concurrent_streams"], 100, "{v}");
                assert!(v["refused"].as_u64().unwrap() >= 50, "{v}");
            }
        }
        assert!(
            cpu1 - cpu0 < 2.0,
            "{mode}: {:.2} s of gateway CPU",
            cpu1 - cpu0
        );
        assert!(rss < rss0 + 64 * 1024, "{mode}: memory {rss0} → {rss} KiB");
        assert_eq!(legit(), 200, "a legitimate client after the {mode} flood");
    }
}

/// What held up in the review stays held: identity headers smuggled as trailers (HTTP/1.1 and
/// HTTP/2), and requests smuggled past the gateway with conflicting or odd framing, never reach
/// the upstream.
#[test]
fn identity_trailers_and_smuggled_requests_never_reach_the_upstream() {
    let Some((tmp, py, up, s)) = setup() else {
        return;
    };
    let d = tmp.path();
    let trailer = "POST /app/trailer HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\
                   Trailer: X-Client-Cert-Subject\r\nTE: trailers\r\n\r\n\
                   3\r\nabc\r\n0\r\nX-Client-Cert-Subject: CN=mallory\r\nClient-Cert: :ZXZpbA==:\r\n\
                   X_Client_Cert_Verify: SUCCESS\r\nX-Kept: yes\r\n\r\n";
    let got = http1(&py, d, s.port, "a.test", "alice", &[trailer]);
    assert_eq!(status(&got[0]), 200, "{got:?}");
    let got = h2(
        &py,
        d,
        s.port,
        "a.test",
        "alice",
        serde_json::json!([{"headers": [[":method", "POST"], [":scheme", "https"], [":authority", "a.test"], [":path", "/app/h2-trailer"]],
                            "body": "abc", "trailers": [["x-client-cert-subject", "CN=mallory"], ["client-cert", ":ZXZpbA==:"]]}]),
    );
    assert_eq!(got[0]["status"], 200, "{got:?}");
    for path in ["/app/trailer", "/app/h2-trailer"] {
        let r = &up.requests(path)[0];
        assert_exact_identity(r, "alice");
        for (name, _) in r["trailers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t[0].as_str().unwrap().to_ascii_lowercase(), t[1].clone()))
        {
            assert!(
                !name.contains("client") && !name.contains('_'),
                "{name} reached the upstream as a trailer: {r}"
            );
        }
    }
    // Smuggling: every framing trick either is refused or carries exactly one request.
    for (trick, request) in [
        (
            "CL.TE",
            "POST /app/cl-te HTTP/1.1\r\nHost: a.test\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /app/smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n",
        ),
        (
            "TE.CL",
            "POST /app/te-cl HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n2c\r\nGET /app/smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n\r\n0\r\n\r\n",
        ),
        (
            "two lengths",
            "POST /app/cl-cl HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\nGET /app/smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n",
        ),
        (
            "obs-fold TE",
            "POST /app/fold HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\nGET /app/smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n",
        ),
        (
            "TE with a space",
            "POST /app/space HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\nGET /app/smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n",
        ),
    ] {
        let got = http1(&py, d, s.port, "a.test", "alice", &[request]);
        assert!(!got.is_empty(), "{trick}");
        assert!(
            up.requests("/app/smuggled").is_empty(),
            "{trick} smuggled a request: {:?}",
            up.records()
        );
    }
}

#[test]
fn hosts_that_are_not_host_names_never_reach_forwarded_headers_or_policies() {
    let Some(py) = attack_python() else { return };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let up = Upstream::start(&py, d);
    let config = format!(
        "{HEAD}{}{}",
        domain("*.w.test", "required", "", up.port, &[("", "/w", "")]),
        domain(
            "*.pw.test",
            "required",
            "",
            up.port,
            &[("", "/pw", "authorization = \"policy\"")]
        ),
    );
    let s = Server::start(d, &config);
    attach_policy(
        d,
        &s,
        "public",
        r#"{"Statement": {"Effect": "Allow", "Action": "http:*", "Resource": "route:*/public/*"}}"#,
        "*.pw.test",
    );
    for (sni, host) in [
        ("x.w.test", "x\", for=6;proto=http;host=\"z.w.test"),
        ("x.w.test", "localhost,z.w.test"),
        ("x.w.test", "evil host z.w.test"),
        ("x.w.test", "x.w.test.."),
        ("x.w.test", ""),
        ("x.pw.test", "x/public/x.pw.test"),
    ] {
        let request = format!("GET /admin/h HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let got = http1(&py, d, s.port, sni, "alice", &[&request]);
        assert_eq!(status(&got[0]), 400, "Host {host:?}: {got:?}");
        assert_eq!(code(&got[0]), "bad-host", "{got:?}");
    }
    // HTTP/1.0 with two Hosts, and HTTP/2 with a bad host header in place of :authority.
    let got = http1(
        &py,
        d,
        s.port,
        "x.w.test",
        "alice",
        &["GET /admin/h10 HTTP/1.0\r\nHost: x.w.test\r\nHost: y.w.test\r\n\r\n"],
    );
    assert_eq!(status(&got[0]), 400, "{got:?}");
    let got = h2(
        &py,
        d,
        s.port,
        "x.w.test",
        "alice",
        serde_json::json!([{"headers": [[":method", "GET"], [":scheme", "https"], [":path", "/admin/h2"], ["host", "x\", for=6;host=\"z.w.test"]]}]),
    );
    assert_eq!(got[0]["status"], 400, "{got:?}");
    assert!(up.requests("/admin/").is_empty(), "{:?}", up.records());
    // The policy still decides on the real host.
    let got = http1(
        &py,
        d,
        s.port,
        "x.pw.test",
        "alice",
        &[
            "GET /public/ok HTTP/1.1\r\nHost: x.pw.test\r\n\r\n",
            "GET /admin/no HTTP/1.1\r\nHost: x.pw.test\r\n\r\n",
        ],
    );
    assert_eq!((status(&got[0]), status(&got[1])), (200, 403), "{got:?}");
}

#[test]
fn open_connections_close_when_their_domain_tightens_its_mappings() {
    let Some((tmp, py, _up, s)) = setup() else {
        return;
    };
    let d = tmp.path();
    let port = s.port.to_string();
    let held = Held::start(
        &py,
        d,
        &["hold", &port, "opt.test", "-", "http1", "/open/hold"],
    );
    assert_eq!(held.status, "200");
    // /open now needs a certificate: the anonymous connection must not keep its old access.
    let described = crate::control::cli(d, &["domain", "describe", "opt.test"])
        .ok()
        .stdout;
    let tightened = described.replace("client_certificate = \"optional\"\n", "");
    assert_ne!(tightened, described, "{described}");
    std::fs::write(d.join("opt.toml"), tightened).unwrap();
    crate::control::cli(d, &["domain", "put", "--file", "opt.toml"]).ok();
    held.wait_closed();
    s.printed("the close", |l| l.contains("\"reason\":\"domain-changed\""));
}
