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
        let open = metric(&s.metrics(d), "portcullis_active_connections ");
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
    let text = s.metrics(d);
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
    let text = s.metrics(d);
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

#[test]
fn kill_9_at_random_points_during_registry_writes_keeps_every_acknowledged_write() {
    let Some(python) = require_tool("python3") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let config = config("");
    let writer = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/scripts/crash_writer.py");
    // Random kill points: after 1 to 120 acknowledged writes, different on every run.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mut acknowledged: Vec<String> = Vec::new();
    for round in 0..4u64 {
        let s = Server::start(d, &config);
        let kill_after = 1
            + (seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(round * 1442695040888963407)
                >> 33)
                % 120;
        let mut child = Command::new(&python)
            .args([
                writer.to_str().unwrap(),
                &s.admin_port.to_string(),
                &format!("r{round}"),
            ])
            .current_dir(d)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut acked = 0;
        for line in lines.by_ref() {
            let line = line.unwrap();
            assert!(line.starts_with("ok "), "{line}");
            acknowledged.push(line[3..].to_string());
            acked += 1;
            if acked == kill_after {
                // kill -9 while the four writers have requests in flight.
                Command::new("kill")
                    .args(["-KILL", &s.child.id().to_string()])
                    .status()
                    .unwrap();
                break;
            }
        }
        // What was acknowledged before the process died counts too.
        for line in lines {
            let line = line.unwrap();
            if let Some(name) = line.strip_prefix("ok ") {
                acknowledged.push(name.to_string());
            }
        }
        let _ = child.wait();
        println!("round {round}: killed after {kill_after} acknowledged writes");
        drop(s);
    }
    // Restarted: every acknowledged thing is there, whole; the database is consistent.
    let s = Server::start(d, &config);
    let mut stored = std::collections::BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let mut args = vec!["thing", "list", "--limit", "1000"];
        if let Some(a) = &after {
            args.extend(["--after", a.as_str()]);
        }
        let page = crate::control::cli_json(d, &args);
        for t in page["items"].as_array().unwrap() {
            stored.insert(
                t["name"].as_str().unwrap().to_string(),
                t["attributes"].clone(),
            );
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    for name in &acknowledged {
        let attributes = stored
            .get(name)
            .unwrap_or_else(|| panic!("acknowledged {name} lost"));
        assert_eq!(attributes["check"], name.as_str(), "{name}: {attributes}");
    }
    // Things the API never acknowledged may exist (committed as the process died), whole.
    for (name, attributes) in &stored {
        assert_eq!(
            attributes["check"],
            name.as_str(),
            "half-written {name}: {attributes}"
        );
    }
    drop(s);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let check: String = runtime.block_on(async {
        use sqlx::Connection;
        let url = format!("sqlite://{}", d.join("data/registry.db").display());
        let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&mut db)
            .await
            .unwrap()
    });
    assert_eq!(check, "ok");
    println!(
        "{} acknowledged writes over 4 kills, all present",
        acknowledged.len()
    );
}

/// A full configuration: every section the file format has.
const FULL_CONFIG: &str = r#"default_endpoint = true
default_domain = "a.test"

[admin]
address = "127.0.0.1:0"

[limits]
max_connections = 100
max_handshakes = 10
max_header_bytes = 16384
handshake_timeout_secs = 2.5
request_header_timeout_secs = 3
upstream_connect_timeout_secs = 1
upstream_response_timeout_secs = 30

[identity]
xfcc = false

[[listener]]
address = "127.0.0.1:0"
protocols = ["http", "mqtt"]

[[domain]]
hostname = "a.test"
certificate = "auto"
security_policy = "TLS_1_3"
session_resumption = false
registry_mode = "revocation"
[domain.mqtt]
https_publish = true
max_packet_size = 4096
[domain.mtls]
mode = "optional"
truststore = "trust-a.pem"
max_chain_depth = 3
advertise_ca_names = false
on_failure = "http"
[[domain.mapping]]
base_path = "/api"
upstream = "builtin:echo"
client_certificate = "required"
[[domain.mapping]]
upstream = "http://127.0.0.1:9"
"#;

#[test]
fn configuration_files_mutated_at_random_are_refused_in_one_line_never_with_a_panic() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let check = |text: &[u8]| {
        std::fs::write(d.join("fuzz.toml"), text).unwrap();
        crate::portcullis(
            d,
            &[
                "serve",
                "--config",
                "fuzz.toml",
                "--data-dir",
                "data",
                "--check-config",
            ],
        )
    };
    // The unmutated file is valid, so mutations are near-valid inputs.
    let ok = check(FULL_CONFIG.as_bytes());
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let lines: Vec<&str> = FULL_CONFIG.lines().collect();
    #[derive(Debug, Clone)]
    enum Edit {
        DropLine(usize),
        DupLine(usize),
        SwapLines(usize, usize),
        Byte(usize, u8),
        Cut(usize),
        Value(usize, String),
    }
    let edit = prop_oneof![
        (0..lines.len()).prop_map(Edit::DropLine),
        (0..lines.len()).prop_map(Edit::DupLine),
        (0..lines.len(), 0..lines.len()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        (0..FULL_CONFIG.len(), any::<u8>()).prop_map(|(i, b)| Edit::Byte(i, b)),
        (0..FULL_CONFIG.len()).prop_map(Edit::Cut),
        (
            0..lines.len(),
            prop_oneof![
                Just("-1".to_string()),
                Just("1e400".to_string()),
                Just("\"\"".to_string()),
                Just("[]".to_string()),
                Just("{}".to_string()),
                Just("99999999999999999999".to_string()),
                Just("\"../../etc/passwd\"".to_string()),
                Just("\"\\u0000\"".to_string()),
                "[ -~]{0,40}".prop_map(|s| format!("{s:?}")),
            ]
        )
            .prop_map(|(l, v)| Edit::Value(l, v)),
    ];
    let mut runner = TestRunner::new(Config {
        cases: 96,
        failure_persistence: None,
        ..Config::default()
    });
    let (valid, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    runner
        .run(&proptest::collection::vec(edit, 1..4), |edits| {
            let mut text: Vec<u8> = FULL_CONFIG.as_bytes().to_vec();
            for e in edits {
                if text.is_empty() {
                    break;
                }
                let mut ls: Vec<Vec<u8>> =
                    text.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
                let n = ls.len();
                match e {
                    Edit::DropLine(i) => {
                        ls.remove(i % n);
                    }
                    Edit::DupLine(i) => {
                        let l = ls[i % n].clone();
                        ls.insert(i % n, l);
                    }
                    Edit::SwapLines(a, b) => ls.swap(a % n, b % n),
                    Edit::Byte(i, b) => {
                        let len = text.len();
                        text[i % len] = b;
                        continue;
                    }
                    Edit::Cut(i) => {
                        text.truncate(i % (text.len() + 1));
                        continue;
                    }
                    Edit::Value(i, v) => {
                        let l = &mut ls[i % n];
                        if let Some(eq) = l.iter().position(|b| *b == b'=') {
                            l.truncate(eq + 1);
                            l.push(b' ');
                            l.extend_from_slice(v.as_bytes());
                        }
                    }
                }
                text = ls.join(&b'\n');
            }
            let r = check(&text);
            prop_assert!(
                !r.stderr.contains("panicked"),
                "panic on:\n{}\n{}",
                String::from_utf8_lossy(&text),
                r.stderr
            );
            if r.code == 0 {
                valid.set(valid.get() + 1);
            } else {
                refused.set(refused.get() + 1);
                prop_assert_eq!(r.code, 2, "{}", r.stderr);
                prop_assert!(r.stderr.starts_with("error: "), "{}", r.stderr);
                prop_assert_eq!(
                    r.stderr.trim_end().lines().count(),
                    1,
                    "not one line: {}",
                    r.stderr
                );
            }
            Ok(())
        })
        .unwrap();
    println!(
        "{} mutated configurations valid, {} refused in one line",
        valid.get(),
        refused.get()
    );
    assert!(refused.get() > 0);
}
