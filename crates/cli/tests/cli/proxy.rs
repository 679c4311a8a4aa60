//! The HTTP/1.1 proxy path byte for byte: a scripted upstream (framings, interim answers,
//! hang-ups, hop-by-hop headers) and a raw TLS client (spoofed headers, pipelining, bodies
//! small and large, connection close, garbage).

use portcullis_testkit::{require_tool, run, temp_dir};

use crate::serve::{Server, pki, python_server};

#[test]
fn the_http1_path_relays_every_framing_pools_upstreams_and_hands_over_the_rest() {
    let Some(python) = require_tool("python3") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let scripts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/scripts");
    let upstream = scripts.join("raw_upstream.py");
    let (_upstream, port) = python_server(&python, &[upstream.to_str().unwrap()], d);
    // A port nothing listens on: bound, then closed.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        r#"
[admin]
address = "127.0.0.1:0"

[[listener]]
address = "127.0.0.1:0"

[limits]
request_header_timeout_secs = 60

[[domain]]
hostname = "a.test"
certificate = "auto"
[domain.response_headers]
Strict-Transport-Security = "max-age=63072000; includeSubDomains"
X-Content-Type-Options = "nosniff"
[domain.mtls]
mode = "required"
truststore = "trust-a.pem"
[[domain.mapping]]
base_path = "raw"
upstream = "http://127.0.0.1:{port}"
[[domain.mapping]]
base_path = "/dead"
upstream = "http://127.0.0.1:{dead}"
[[domain.mapping]]
upstream = "builtin:echo"
"#
    );
    let s = Server::start(d, &config);
    let r = run(
        &python,
        &[
            scripts.join("raw_client.py").to_str().unwrap(),
            &s.port.to_string(),
        ],
        d,
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("ALL OK"), "{}", r.stdout);

    // A TLS 1.2 renegotiation attempt while the gateway waits for a request head: rustls answers
    // with a no_renegotiation warning, which must leave at once, not when the request header
    // timeout (60 s here) closes the connection.
    let Some(openssl) = require_tool("openssl") else {
        return;
    };
    let mut client = std::process::Command::new(openssl)
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", s.port),
            "-servername",
            "a.test",
            "-tls1_2",
            "-cert",
            "alice.chain.pem",
            "-key",
            "alice.key",
            "-CAfile",
            "data/ca/ca.pem",
        ])
        .current_dir(d)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = client.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"R\n").unwrap();
    let started = std::time::Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let out = client.wait_with_output().unwrap();
        let _ = tx.send(out);
    });
    let out = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("s_client still waits for the answer to its renegotiation");
    drop(stdin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stderr.contains("RENEGOTIATING") && stderr.to_lowercase().contains("no renegotiation"),
        "{stdout}\n{stderr}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}
