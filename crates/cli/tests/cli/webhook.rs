//! Webhooks end to end with a real HTTP receiver (Python): signed JSON events written with the
//! change that caused them, retries after a failure, replays, the expiry check, and receivers
//! that redirect or hang.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use portcullis_testkit::{require_tool, temp_dir};
use serde_json::Value;

use crate::control::{cli, cli_json};
use crate::serve::{Server, pki, registry_config};
use crate::*;

/// Answers `/hook` with the statuses in `statuses.txt` (one per request, then 200), `/redirect`
/// with 302, and `/hang` after 30 s; prints each request as a JSON line, with whether its
/// signature checks out against `secret.txt`.
const RECEIVER: &str = r#"
import hashlib, hmac, http.server, json, os, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        ts = self.headers.get("x-portcullis-timestamp", "")
        sig = self.headers.get("x-portcullis-signature", "")
        valid = None
        if os.path.exists("secret.txt"):
            secret = open("secret.txt").read().strip().encode()
            want = "v1=" + hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
            valid = hmac.compare_digest(want, sig)
        print(json.dumps({"path": self.path, "event": self.headers.get("x-portcullis-event"),
                          "delivery": self.headers.get("x-portcullis-delivery"),
                          "valid": valid, "body": json.loads(body)}), flush=True)
        if self.path == "/hang":
            time.sleep(30)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("location", "/redirect")
            self.end_headers()
            return
        statuses = open("statuses.txt").read().split() if os.path.exists("statuses.txt") else []
        status = int(statuses.pop(0)) if statuses else 200
        open("statuses.txt", "w").write(" ".join(statuses))
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

pub(crate) struct Receiver_ {
    child: Child,
    pub(crate) port: u16,
    requests: Receiver<Value>,
}

impl Drop for Receiver_ {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver_ {
    pub(crate) fn next(&self, path: &str) -> Value {
        loop {
            let r = self
                .requests
                .recv_timeout(Duration::from_secs(30))
                .expect("the receiver got nothing within 30 s");
            if r["path"] == path {
                return r;
            }
        }
    }
}

pub(crate) fn receiver(dir: &std::path::Path, python: &std::path::Path) -> Receiver_ {
    std::fs::write(dir.join("receiver.py"), RECEIVER).unwrap();
    let mut child = Command::new(python)
        .arg("receiver.py")
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = lines.next().unwrap().unwrap().trim().parse().unwrap();
    let (tx, requests) = channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    Receiver_ {
        child,
        port,
        requests,
    }
}

#[test]
fn webhooks_deliver_signed_events_with_retries_replays_and_expiry_notices() {
    let Some(python) = require_tool("python3") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let rx = receiver(d, &python);
    let s = Server::start(d, &registry_config(&[("a.test", "off")]));
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", rx.port);

    // Bad input.
    assert_clean_error(
        &cli(
            d,
            &[
                "webhook",
                "create",
                "x",
                "--url",
                &url("/hook"),
                "--event",
                "cert.made",
            ],
        ),
        2,
        "unknown event 'cert.made'",
    );
    assert_clean_error(
        &cli(
            d,
            &[
                "webhook",
                "create",
                "x",
                "--url",
                "ftp://h/x",
                "--event",
                "ca.registered",
            ],
        ),
        2,
        "http:// or https://",
    );

    // A subscription; its secret is shown once.
    let created = cli_json(
        d,
        &[
            "webhook",
            "create",
            "ops",
            "--url",
            &url("/hook"),
            "--event",
            "certificate.registered,certificate.status_changed,certificate.expiring",
            "--expiring-days",
            "400",
        ],
    );
    let secret = created["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{created}");
    assert!(cli_json(d, &["webhook", "describe", "ops"])["secret"].is_null());
    std::fs::write(d.join("secret.txt"), &secret).unwrap();

    // A registration: the first attempt gets 500, the retry (5 s later) succeeds.
    std::fs::write(d.join("statuses.txt"), "500").unwrap();
    let alice = cli_json(
        d,
        &[
            "cert",
            "register",
            "--cert",
            "alice.pem",
            "--status",
            "ACTIVE",
        ],
    );
    let id = alice["id"].as_str().unwrap().to_string();
    let first = rx.next("/hook");
    assert_eq!(first["event"], "certificate.registered", "{first}");
    assert_eq!(first["valid"], true, "signature: {first}");
    assert_eq!(first["body"]["target"], id.as_str());
    assert_eq!(first["body"]["after"]["status"], "ACTIVE");
    let failed = s.wait_for("webhook delivery failed");
    assert!(failed.contains("HTTP 500"), "{failed}");
    let retry = rx.next("/hook");
    assert_eq!(
        retry["delivery"], first["delivery"],
        "the same delivery, retried"
    );
    assert_eq!(retry["valid"], true);
    s.wait_for("webhook delivered");

    // A change that fails (a duplicate registration) makes no event; a status change does.
    assert_clean_error(
        &cli(d, &["cert", "register", "--cert", "alice.pem"]),
        2,
        "already registered",
    );
    cli(d, &["cert", "update", &id, "--status", "INACTIVE"]).ok();
    let changed = rx.next("/hook");
    assert_eq!(changed["event"], "certificate.status_changed", "{changed}");
    assert_eq!(changed["body"]["before"]["status"], "ACTIVE");
    assert_eq!(changed["body"]["after"]["status"], "INACTIVE");
    s.wait_for("webhook delivered");
    let deliveries = cli_json(d, &["webhook", "deliveries", "ops"]);
    let items = deliveries["items"].as_array().unwrap();
    let events: Vec<&str> = items
        .iter()
        .map(|i| i["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["certificate.status_changed", "certificate.registered"],
        "{deliveries}"
    );
    assert_eq!(items[1]["status"], "delivered");
    assert_eq!(items[1]["attempts"], 2);

    // A replay is a new delivery of the same event.
    let first_id = first["delivery"].as_str().unwrap();
    let replay = cli_json(d, &["webhook", "replay", first_id]);
    assert_eq!(replay["replay_of"], first_id, "{replay}");
    let again = rx.next("/hook");
    assert_eq!(again["event"], "certificate.registered");
    assert_eq!(again["delivery"], replay["id"]);
    assert_eq!(again["body"]["occurred_at"], first["body"]["occurred_at"]);

    // Expiring certificates: alice expires within 400 days; told once.
    let checked = cli_json(d, &["webhook", "check-expiry"]);
    assert!(checked["deliveries"].as_i64().unwrap() >= 1, "{checked}");
    let expiring = rx.next("/hook");
    assert_eq!(expiring["event"], "certificate.expiring", "{expiring}");
    assert!(expiring["body"]["after"]["days_left"].as_i64().unwrap() <= 400);
    assert_eq!(cli_json(d, &["webhook", "check-expiry"])["deliveries"], 0);

    // Receivers that redirect or hang fail the attempt with the reason, in bounded time.
    for (name, path) in [("redir", "/redirect"), ("slow", "/hang")] {
        cli(
            d,
            &[
                "webhook",
                "create",
                name,
                "--url",
                &url(path),
                "--event",
                "truststore.version_added",
            ],
        )
        .ok();
    }
    cli(
        d,
        &["truststore", "create", "t1", "--bundle", "trust-a.pem"],
    )
    .ok();
    rx.next("/redirect");
    let (mut redirect, mut hang) = (None, None);
    while redirect.is_none() || hang.is_none() {
        let line = s.wait_for("webhook delivery failed");
        if line.contains("/redirect") {
            redirect = Some(line);
        } else if line.contains("/hang") {
            hang = Some(line);
        }
    }
    let (redirect, hang) = (redirect.unwrap(), hang.unwrap());
    assert!(
        redirect.contains("redirects are not followed"),
        "{redirect}"
    );
    assert!(hang.contains("no answer within 10 s"), "{hang}");
    let pending = cli_json(
        d,
        &["webhook", "deliveries", "redir", "--status", "pending"],
    );
    assert!(
        pending["items"][0]["attempts"].as_i64().unwrap() >= 1,
        "{pending}"
    );
    assert_eq!(pending["items"][0]["last_status"], 302);
}
