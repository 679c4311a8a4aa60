//! Abuse: malformed and oversized HTTP, slow clients, a handshake flood, connections dropped
//! mid-handshake. The gateway must refuse what is wrong, cut off what is slow, keep its memory and
//! file descriptors bounded, keep serving legitimate clients, and say in its metrics which limits
//! were hit. (Malformed and oversized MQTT input: mqtt.rs,
//! `bad_mqtt_input_is_refused_in_bounded_time_and_spares_other_clients`.)

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_testkit::{require_tool, run, temp_dir};

use crate::serve::{Killed, Server, answer, client, curl, pki, with_client};

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/scripts/abuse.py")
}

fn config(limits: &str) -> String {
    format!(
        r#"
[admin]
address = "127.0.0.1:0"

[limits]
{limits}

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
"#
    )
}

fn status(s: &Server) -> String {
    std::fs::read_to_string(format!("/proc/{}/status", s.child.id())).unwrap()
}

/// Resident memory of the gateway, KiB.
fn rss_kib(s: &Server) -> u64 {
    status(s)
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Open file descriptors of the gateway.
fn fds(s: &Server) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", s.child.id()))
        .unwrap()
        .count()
}

/// The gateway's metrics text (admin API, with the admin client certificate).
fn metrics(d: &Path, s: &Server) -> String {
    let curl_bin = require_tool("curl").unwrap();
    let url = format!("https://127.0.0.1:{}/metrics", s.admin_port);
    let r = run(
        &curl_bin,
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
        d,
    );
    assert_eq!(r.code, 0, "{r:?}");
    r.stdout
}

/// The value of one metric series (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Polls the open-connections gauge until it is `want` (at most 30 s); returns the last value.
fn wait_for_connections(d: &Path, s: &Server, want: f64) -> f64 {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let open = metric(&metrics(d, s), "portcullis_active_connections ");
        if open == want || Instant::now() > until {
            return open;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn legit_ok(d: &Path, s: &Server) -> bool {
    let alice = client("alice");
    answer(&curl(
        d,
        s,
        "a.test",
        "/",
        &[with_client(&alice), vec!["--max-time", "15"]].concat(),
    ))
    .0 == 200
}

#[test]
fn malformed_and_oversized_http_is_refused_and_the_connection_ends() {
    let (Some(python), Some(_)) = (require_tool("python3"), require_tool("curl")) else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let s = Server::start(d, &config("max_header_bytes = 16384"));
    let r = run(
        &python,
        &[script().to_str().unwrap(), "malformed", &s.port.to_string()],
        d,
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    for case in [
        "oversized-header 431",
        "too-many-headers 431",
        "cl-and-te 400",
        "normal 200",
    ] {
        assert!(r.stdout.contains(case), "{case}: {}", r.stdout);
    }
    let text = metrics(d, &s);
    assert!(
        metric(
            &text,
            r#"portcullis_limit_reached_total{limit="max_header_bytes"}"#
        ) >= 2.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"portcullis_limit{limit="max_header_bytes"}"#),
        16384.0
    );
}

#[test]
fn floods_slow_clients_and_dropped_handshakes_leave_memory_bounded_and_clients_served() {
    let (Some(python), Some(_)) = (require_tool("python3"), require_tool("curl")) else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let s = Server::start(
        d,
        &config(
            "max_connections = 200\nmax_handshakes = 16\nhandshake_timeout_secs = 2\nrequest_header_timeout_secs = 2",
        ),
    );
    let port = s.port.to_string();
    let py = |args: &[&str]| {
        let mut all = vec![script().to_str().unwrap().to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        Command::new(&python)
            .args(&all)
            .current_dir(d)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    assert!(legit_ok(d, &s));
    assert_eq!(wait_for_connections(d, &s, 0.0), 0.0);
    let (rss0, fds0) = (rss_kib(&s), fds(&s));

    // 10,000 connections that send part of a ClientHello (or nothing) and vanish.
    let out = py(&["drop", &port, "10000"]).wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("dropped 10000"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        wait_for_connections(d, &s, 0.0),
        0.0,
        "every dropped connection is closed"
    );
    assert!(
        fds(&s) <= fds0 + 4,
        "file descriptors {} → {}",
        fds0,
        fds(&s)
    );
    assert!(legit_ok(d, &s));

    // Slowloris: 100 clients trickling a request head, while legitimate clients are served.
    let mut slow = py(&["slowloris", &port, "100"]);
    let mut slow_out = BufReader::new(slow.stdout.take().unwrap());
    let mut line = String::new();
    slow_out.read_line(&mut line).unwrap();
    assert!(line.starts_with("connected 100"), "{line}");
    // Connections that hold slots without a byte, beyond the connection limit.
    let mut hold = Killed(py(&["hold", &port, "250"]));
    line.clear();
    BufReader::new(hold.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("holding 250"), "{line}");
    // A handshake flood on top.
    let flood = py(&["flood", &port, "6"]);
    let mut peak = 0;
    let mut served = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        if legit_ok(d, &s) {
            served += 1;
        }
        peak = peak.max(rss_kib(&s));
    }
    assert!(
        served >= 2,
        "legitimate clients served during the abuse: {served}"
    );
    let out = flood.wait_with_output().unwrap();
    let flooded = String::from_utf8_lossy(&out.stdout);
    assert!(
        flooded.contains("flood handshakes"),
        "{flooded}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut slowloris = String::new();
    slow_out.read_to_string(&mut slowloris).unwrap();
    let out = slow.wait_with_output().unwrap();
    assert!(
        slowloris.contains("closed 100 of 100"),
        "{slowloris}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let slowest: f64 = slowloris
        .split("after ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap();
    assert!(
        slowest < 10.0,
        "slow clients are cut off near the 2 s header timeout: {slowloris}"
    );
    drop(hold.0.stdin.take());
    drop(hold);
    println!(
        "rss {rss0} KiB → peak {peak} KiB; {flooded}; {slowloris}; legitimate requests served during abuse: {served}"
    );
    assert!(
        peak < rss0 + 96 * 1024,
        "memory stays bounded under abuse: {rss0} KiB → {peak} KiB"
    );
    assert_eq!(wait_for_connections(d, &s, 0.0), 0.0);
    assert!(
        fds(&s) <= fds0 + 4,
        "file descriptors {} → {}",
        fds0,
        fds(&s)
    );
    // The limits hit are in the metrics.
    let text = metrics(d, &s);
    for limit in [
        "max_connections",
        "handshake_timeout",
        "request_header_timeout",
    ] {
        let series = format!(r#"portcullis_limit_reached_total{{limit="{limit}"}}"#);
        assert!(metric(&text, &series) >= 1.0, "{series} in:\n{text}");
    }
    assert!(
        metric(
            &text,
            r#"portcullis_handshakes_total{domain="",result="failed",reason="handshake-timeout"}"#
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"portcullis_limit{limit="max_connections"}"#),
        200.0
    );
    assert!(legit_ok(d, &s));
}
