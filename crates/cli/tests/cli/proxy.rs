//! The HTTP/1.1 proxy path byte for byte: a scripted upstream (framings, interim answers,
//! hang-ups, hop-by-hop headers) and a raw TLS client (spoofed headers, pipelining, bodies
//! small and large, connection close, garbage).

use portcullis_testkit::{require_tool, run, temp_dir};

use crate::serve::{Server, client, curl, pki, python_server, with_client};

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

/// gRPC through the gateway with grpcio (PyPI) on both ends: a gRPC server speaking h2c behind
/// an `upstream_protocol = "h2c"` mapping, a client over mutual TLS. Unary, server-streaming,
/// client-streaming and bidirectional calls; the upstream's status and message in trailers; a
/// deadline shorter than the answer; a stream cancelled mid-way; and the gateway's own answers
/// as gRPC statuses: UNAVAILABLE for an upstream down, PERMISSION_DENIED for a method the
/// policies do not allow (named by HTTP route or as `grpc:Invoke` on `grpc:Service/Method`,
/// an explicit Deny under either name winning), UNAUTHENTICATED without a certificate on an
/// optional domain.
#[test]
fn grpc_calls_cross_the_gateway_to_an_h2c_upstream() {
    let Some(python) = crate::mqtt::paho_python() else {
        return;
    };
    if run(&python, &["-c", "import grpc"], std::path::Path::new(".")).code != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "grpcio is not installed; the test command (scripts/test) installs it"
        );
        eprintln!("SKIP: grpcio is not installed (run scripts/test to install it)");
        return;
    }
    let tmp = temp_dir();
    let d = tmp.path();
    let scripts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/scripts");
    let (_upstream, port) = python_server(
        &python,
        &[scripts.join("grpc_upstream.py").to_str().unwrap()],
        d,
    );
    // The same service over TLS (ALPN h2), its certificate from the local CA (made once the
    // gateway has made the CA).
    let down = crate::cluster::free_port();
    let domain = |host: &str, mode: &str, mapping: &str| {
        format!(
            "[[domain]]\nhostname = \"{host}\"\ncertificate = \"auto\"\n\
             [domain.mtls]\nmode = \"{mode}\"\ntruststore = \"data/ca/ca.pem\"\n\
             [[domain.mapping]]\n{mapping}\n"
        )
    };
    let h2c = |upstream: u16| {
        format!("upstream = \"http://127.0.0.1:{upstream}\"\nupstream_protocol = \"h2c\"")
    };
    let (_refusing, refusing) = python_server(
        &python,
        &[scripts.join("refusing_h2_upstream.py").to_str().unwrap()],
        d,
    );
    let config = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\"]\n{}{}{}{}{}{}",
        domain("localhost", "required", &h2c(port)),
        domain(
            "refusing.test",
            "required",
            &format!("{}\nretry_refused = true", h2c(refusing))
        ),
        domain("no-retry.test", "required", &h2c(refusing)),
        domain("down.test", "required", &h2c(down)),
        domain(
            "policy.test",
            "required",
            &format!("{}\nauthorization = \"policy\"", h2c(port))
        ),
        domain(
            "optional.test",
            "optional",
            &format!("{}\nclient_certificate = \"required\"", h2c(port))
        ),
    );
    let s = Server::start(d, &config);
    crate::portcullis(
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
            "upstream",
            "--name",
            "upstream",
        ],
    )
    .ok();
    let (_tls_upstream, tls_port) = python_server(
        &python,
        &[
            scripts.join("grpc_upstream.py").to_str().unwrap(),
            "upstream/upstream.key",
            "upstream/upstream.chain.pem",
        ],
        d,
    );
    let ca = d.join("data/ca/ca.pem");
    std::fs::write(
        d.join("tls.toml"),
        domain(
            "tls.test",
            "required",
            &format!(
                "upstream = \"https://localhost:{tls_port}\"\nupstream_protocol = \"h2\"\n\
                 upstream_ca = \"{}\"",
                ca.display()
            ),
        ),
    )
    .unwrap();
    crate::control::cli_json(d, &["domain", "put", "--file", "tls.toml"]);
    crate::control::wait_for_registry_reload(&s);
    crate::control::cli_json(
        d,
        &[
            "cert",
            "create",
            "--common-name",
            "caller",
            "--status",
            "ACTIVE",
            "--out",
            "caller",
        ],
    );
    std::fs::write(
        d.join("grpc.json"),
        r#"{"Statement": [
             {"Effect": "Allow", "Action": "http:POST", "Resource": "route:policy.test/test.Echo/Echo"},
             {"Effect": "Allow", "Action": "grpc:Invoke", "Resource": "grpc:test.Echo/Count"},
             {"Effect": "Allow", "Action": "http:POST", "Resource": "route:policy.test/test.Echo/Fail"},
             {"Effect": "Deny", "Action": "grpc:*", "Resource": "grpc:test.Echo/Fail"}]}"#,
    )
    .unwrap();
    crate::control::cli(d, &["policy", "create", "grpc", "--document", "grpc.json"]).ok();
    crate::control::cli(d, &["policy", "attach", "grpc", "--domain", "policy.test"]).ok();
    let r = run(
        &python,
        &[
            scripts.join("grpc_client.py").to_str().unwrap(),
            &s.port.to_string(),
            "data/ca/ca.pem",
            "caller/cert.pem",
            "caller/key.pem",
            &s.child.id().to_string(),
        ],
        d,
    );
    println!("{}", r.stdout);
    assert!(
        r.code == 0 && r.stdout.contains("ALL OK"),
        "{}\n{}\n{}",
        r.stdout,
        r.stderr,
        s.lines_with("WARN").join("\n")
    );
    // Regression (h2 upstream): an HTTP/1.1 request's chunked trailers naming fields HTTP/2
    // forbids (`connection`, `te` other than trailers) made h2 refuse the trailers, and the
    // upstream's stream was left waiting for its end until the gateway's timeout. They are
    // dropped, as identity fields are (`strip_trailers`' unit test); the call completes.
    std::fs::copy(d.join("caller/cert.pem"), d.join("caller.chain.pem")).unwrap();
    std::fs::copy(d.join("caller/key.pem"), d.join("caller.key")).unwrap();
    let request = "POST /test.Echo/Echo HTTP/1.1\r\nHost: localhost\r\n\
                   content-type: application/grpc\r\nte: trailers\r\n\
                   transfer-encoding: chunked\r\n\r\n\
                   a\r\n\u{0}\u{0}\u{0}\u{0}\u{5}hello\r\n0\r\n\
                   connection: x-gone\r\nte: gzip\r\nx-client-cert-verify: SUCCESS\r\n\
                   x-kept: 1\r\n\r\n";
    let started = std::time::Instant::now();
    let mut attack = std::process::Command::new(&python)
        .args([
            scripts.join("attack.py").to_str().unwrap(),
            "http1",
            &s.port.to_string(),
            "localhost",
            "caller",
        ])
        .current_dir(d)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = attack.stdin.take().unwrap();
        stdin
            .write_all(serde_json::to_string(&[request]).unwrap().as_bytes())
            .unwrap();
    }
    let out = attack.wait_with_output().unwrap();
    let answers: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answers[0]["status"], 200, "{answers}");
    assert!(
        answers[0]["body"]
            .as_str()
            .unwrap_or_default()
            .contains("echo:hello"),
        "{answers}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "the call waited {:?}",
        started.elapsed()
    );
    refused_streams_are_sent_again_only_when_unprocessed(d, &s);
    // The access log keeps the decision's HTTP status for calls answered as gRPC statuses.
    let line = s.printed("the denied call's access line", |l| {
        l.contains("portcullis::access")
            && l.contains("/test.Echo/Slow")
            && l.contains("policy.test")
    });
    assert!(line.contains("\"status\":403"), "{line}");
}

/// With `retry_refused = true`, an HTTP/2 upstream that refuses a stream unprocessed
/// (RST_STREAM REFUSED_STREAM, or a GOAWAY whose last stream is below it: RFC 9113 §8.7) gets
/// the request again on a new stream, its body included, whatever its method; a stream reset
/// otherwise and a body beyond what is kept to send again are not sent twice: the client gets
/// 502. Without the option (the default, as HAProxy's and Envoy's), nothing is sent twice.
fn refused_streams_are_sent_again_only_when_unprocessed(d: &std::path::Path, s: &Server) {
    let caller = client("caller");
    let ask_on = |host: &str, path: &str, extra: &[&str]| {
        let mut args = with_client(&caller);
        args.extend(extra);
        let r = curl(d, s, host, path, &args);
        let (body, status) = r.stdout.rsplit_once('\n').unwrap_or_default();
        (
            status
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
            body.to_string(),
        )
    };
    let ask = |path: &str, extra: &[&str]| ask_on("refusing.test", path, extra);
    let count = |name: &str| ask(&format!("/count/{name}"), &[]).1;
    let ok = |body: &str| ("200".to_string(), body.to_string());
    assert_eq!(
        ask("/refuse-once/a", &["--data-binary", "hello"]),
        ok("attempt 2: hello"),
        "REFUSED_STREAM: sent again with its body"
    );
    assert_eq!(
        ask("/goaway-once/b", &[]),
        ok("attempt 2: "),
        "GOAWAY below an idempotent GET: sent again on a new connection"
    );
    assert_eq!(
        ask("/goaway-once/f", &["-X", "PUT", "--data-binary", "put"]),
        ok("attempt 2: put"),
        "GOAWAY below an idempotent PUT: sent again with its body"
    );
    assert_eq!(
        ask("/goaway-once/c", &["--data-binary", "post"]),
        ok("attempt 2: post"),
        "GOAWAY below a POST (a gRPC call): sent again with its body"
    );
    assert_eq!(ask("/reset/d", &["--data-binary", "x"]).0, "502");
    assert_eq!(
        count("d"),
        "1",
        "a stream reset otherwise is not sent again"
    );
    std::fs::write(d.join("big.bin"), vec![b'x'; 100 * 1024]).unwrap();
    assert_eq!(
        ask("/refuse-once/e", &["--data-binary", "@big.bin"]).0,
        "502"
    );
    assert_eq!(
        count("e"),
        "1",
        "a body beyond the replay limit is not sent again"
    );
    assert_eq!(
        ask_on("no-retry.test", "/refuse-once/g", &["--data-binary", "x"]).0,
        "502"
    );
    assert_eq!(
        count("g"),
        "1",
        "without retry_refused, nothing is sent again"
    );

    // Refused while its body is still coming (the client streams it): what went up is sent
    // again, then the rest, whole and in order.
    let resolve = format!("refusing.test:{}:127.0.0.1", s.port);
    let mut streaming = {
        let mut args = vec!["-sS", "--max-time", "30", "--resolve", &resolve];
        args.extend([
            "--cacert",
            "data/ca/ca.pem",
            "-X",
            "POST",
            "-T",
            "-",
            "-H",
            "Expect:",
        ]);
        args.extend(with_client(&caller));
        let early = format!("https://refusing.test:{}/refuse-early/m", s.port);
        std::process::Command::new("curl")
            .args(&args)
            .arg(&early)
            .current_dir(d)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    {
        use std::io::Write as _;
        let mut body = streaming.stdin.take().unwrap();
        body.write_all(b"part1-").unwrap();
        body.flush().unwrap();
        let started = std::time::Instant::now();
        while !d.join("refused-m.txt").exists() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "the upstream never saw the streamed request"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        body.write_all(b"part2").unwrap();
    }
    let out = streaming.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "attempt 2: part1-part2",
        "a body refused mid-way arrives whole on the second try"
    );

    // Regression: calls share one connection to the upstream, which allows 4 streams at once;
    // 4 held open (a client that does not read, or long calls) queued every other client's
    // calls behind them inside h2. A connection more is opened instead.
    let url = format!("https://refusing.test:{}/hold/h", s.port);
    let holding: Vec<_> = (0..4)
        .map(|_| {
            let mut args = vec!["-sS", "--max-time", "60", "--resolve", &resolve];
            args.extend(["--cacert", "data/ca/ca.pem"]);
            args.extend(with_client(&caller));
            args.push(&url);
            crate::serve::Killed(
                std::process::Command::new("curl")
                    .args(&args)
                    .current_dir(d)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let started = std::time::Instant::now();
    while std::fs::read_to_string(d.join("held.txt")).unwrap_or_default() != "4" {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the 4 held requests did not all reach the upstream"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        ask("/count/h", &[]),
        ok("4"),
        "a call while the upstream's 4 streams are held goes through on another connection"
    );
    drop(holding);
}
