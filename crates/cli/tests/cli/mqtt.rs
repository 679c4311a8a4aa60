//! The MQTT endpoint with real clients (Debian's mosquitto_pub and mosquitto_sub): the
//! certificate is the identity, policies with certificate variables decide connect, publish,
//! subscribe and receive; retained messages, persistent sessions, client id takeover, and a
//! revoked certificate's live session closed.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use portcullis_testkit::{Run, require_tool, run, temp_dir};

use crate::control::{Auth, api, cli, cli_json, wait_for_snapshot};
use crate::serve::{Server, answer, client, curl, pki, with_client};
use crate::*;

const POLICY: &str = r#"{"Statement": [
  {"Effect": "Allow", "Action": "mqtt:Connect", "Resource": "client:${cert:Subject.CN}"},
  {"Effect": "Allow", "Action": "mqtt:Publish",
   "Resource": ["topic:devices/${cert:Subject.CN}/*", "topic:commands/*"]},
  {"Effect": "Allow", "Action": "mqtt:Subscribe",
   "Resource": ["topicfilter:devices/+/telemetry", "topicfilter:commands/${cert:Subject.CN}/*"]},
  {"Effect": "Allow", "Action": "mqtt:Receive",
   "Resource": ["topic:devices/*", "topic:commands/${cert:Subject.CN}/*"]}]}"#;

fn config() -> String {
    "default_endpoint = true\ndefault_domain = \"localhost\"\n\
     [admin]\naddress = \"127.0.0.1:0\"\n\
     [[listener]]\naddress = \"127.0.0.1:0\"\n\
     [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"mqtt\"]\n\
     [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\nregistry_mode = \"revocation\"\n\
     [domain.mqtt]\nhttps_publish = true\n\
     [domain.mtls]\nmode = \"required\"\ntruststore = \"trust-a.pem\"\n\
     [[domain.mapping]]\nupstream = \"builtin:echo\"\n"
        .to_string()
}

/// Stores POLICY as "devices", attaches it to the domain, and waits until the gateway has it.
fn allow_devices(d: &Path, s: &Server) {
    std::fs::write(d.join("devices.json"), POLICY).unwrap();
    cli(
        d,
        &["policy", "create", "devices", "--document", "devices.json"],
    )
    .ok();
    cli(d, &["policy", "attach", "devices", "--domain", "localhost"]).ok();
    wait_for_snapshot(d, s);
}

/// The mosquitto client options for device `who` on the MQTT port.
fn tls_args(s: &Server, who: &str) -> Vec<String> {
    [
        "-h",
        "127.0.0.1",
        "-p",
        &s.ports[1].to_string(),
        "--cafile",
        "data/ca/ca.pem",
        // No SNI for an IP address: the default domain answers; its certificate names
        // localhost, so the name check is off (the chain is still verified).
        "--insecure",
        "--cert",
        &format!("{who}.chain.pem"),
        "--key",
        &format!("{who}.key"),
    ]
    .map(String::from)
    .to_vec()
}

fn publish(d: &Path, s: &Server, who: &str, extra: &[&str]) -> Run {
    let tool = require_tool("mosquitto_pub").unwrap();
    let mut args = tls_args(s, who);
    args.extend(extra.iter().map(|a| a.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(tool, &refs, d)
}

/// Starts a subscriber; wait for its "mqtt subscribe" log line before publishing.
fn subscribe(d: &Path, s: &Server, who: &str, extra: &[&str]) -> Child {
    let tool = require_tool("mosquitto_sub").unwrap();
    let mut args = tls_args(s, who);
    args.extend(extra.iter().map(|a| a.to_string()));
    Command::new(tool)
        .args(&args)
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn output(child: Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn devices_publish_and_subscribe_over_mqtt_within_their_policies() {
    let Some(_) = require_tool("mosquitto_pub") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    for dev in ["dev-1", "dev-2"] {
        leaf(d, "client", dev, "int", &["--org", "Acme"]);
    }
    let s = Server::start(d, &config());
    assert_eq!(s.ports.len(), 2);
    // Without a policy nothing connects.
    let refused = publish(
        d,
        &s,
        "dev-1",
        &["-i", "dev-1", "-t", "devices/dev-1/t", "-m", "x"],
    );
    assert_ne!(refused.code, 0, "{}", refused.stderr);
    allow_devices(d, &s);

    // A subscriber receives what another device publishes on its own topic, at QoS 1 and 2
    // (QoS 2 both ways: PUBREC/PUBREL/PUBCOMP from the publisher and to the subscriber).
    let sub = subscribe(
        d,
        &s,
        "dev-1",
        &[
            "-i",
            "dev-1",
            "-t",
            "devices/+/telemetry",
            "-q",
            "2",
            "-C",
            "2",
            "-W",
            "20",
            "-v",
        ],
    );
    s.wait_for("\"message\":\"mqtt subscribe\"");
    for (message, qos) in [("21.5", "1"), ("exactly-once", "2")] {
        let sent = publish(
            d,
            &s,
            "dev-2",
            &[
                "-i",
                "dev-2",
                "-t",
                "devices/dev-2/telemetry",
                "-m",
                message,
                "-q",
                qos,
            ],
        );
        assert_eq!(sent.code, 0, "{}", sent.stderr);
    }
    let (code, text) = output(sub);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("devices/dev-2/telemetry 21.5"), "{text}");
    assert!(
        text.contains("devices/dev-2/telemetry exactly-once"),
        "{text}"
    );

    // Publishing on another device's topic: MQTT 5 answers 0x87, MQTT 3.1.1 closes.
    let v5 = publish(
        d,
        &s,
        "dev-2",
        &[
            "-V",
            "mqttv5",
            "-i",
            "dev-2",
            "-t",
            "devices/dev-1/telemetry",
            "-m",
            "x",
            "-q",
            "1",
        ],
    );
    assert!(v5.stderr.contains("Not authorized"), "{}", v5.stderr);
    let v311 = publish(
        d,
        &s,
        "dev-2",
        &[
            "-i",
            "dev-2",
            "-t",
            "devices/dev-1/telemetry",
            "-m",
            "x",
            "-q",
            "1",
        ],
    );
    assert_ne!(v311.code, 0, "{}", v311.stderr);
    assert!(
        s.wait_for("mqtt publish denied")
            .contains("devices/dev-1/telemetry")
    );
    // A client id that is not the certificate's: refused at CONNECT.
    let wrong = publish(
        d,
        &s,
        "dev-2",
        &["-i", "dev-1", "-t", "devices/dev-2/t", "-m", "x"],
    );
    assert_ne!(wrong.code, 0);
    assert!(wrong.stderr.contains("not authorised"), "{}", wrong.stderr);
    // Subscriptions outside the policy are refused (SUBACK failure), wildcards checked as such.
    let denied = subscribe(
        d,
        &s,
        "dev-1",
        &[
            "-V",
            "mqttv5",
            "-i",
            "dev-1",
            "-t",
            "devices/#",
            "-C",
            "1",
            "-W",
            "3",
        ],
    );
    let (_, text) = output(denied);
    assert!(
        text.to_lowercase().contains("not authorized") || text.contains("denied"),
        "{text}"
    );

    // Retained: a later subscriber gets the last retained message at once.
    let kept = publish(
        d,
        &s,
        "dev-2",
        &[
            "-i",
            "dev-2",
            "-t",
            "devices/dev-2/telemetry",
            "-m",
            "kept",
            "-r",
            "-q",
            "1",
        ],
    );
    assert_eq!(kept.code, 0, "{}", kept.stderr);
    let late = subscribe(
        d,
        &s,
        "dev-1",
        &[
            "-i",
            "dev-1",
            "-t",
            "devices/+/telemetry",
            "-C",
            "1",
            "-W",
            "10",
            "-v",
        ],
    );
    let (code, text) = output(late);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("devices/dev-2/telemetry kept"), "{text}");

    // A persistent session gets at QoS 1 what was published while it was away.
    let first = subscribe(
        d,
        &s,
        "dev-1",
        &[
            "-i",
            "dev-1",
            "-c",
            "-q",
            "1",
            "-t",
            "commands/dev-1/#",
            "-E",
        ],
    );
    let (code, text) = output(first);
    assert_eq!(code, Some(0), "{text}");
    let queued = publish(
        d,
        &s,
        "dev-2",
        &[
            "-i",
            "dev-2",
            "-t",
            "commands/dev-1/reboot",
            "-m",
            "now",
            "-q",
            "1",
        ],
    );
    assert_eq!(queued.code, 0, "{}", queued.stderr);
    let back = subscribe(
        d,
        &s,
        "dev-1",
        &[
            "-i",
            "dev-1",
            "-c",
            "-q",
            "1",
            "-t",
            "commands/dev-1/#",
            "-C",
            "1",
            "-W",
            "10",
            "-v",
        ],
    );
    let (code, text) = output(back);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("commands/dev-1/reboot now"), "{text}");

    // HTTPS publish reaches an MQTT subscriber, within the same policies.
    let sub = subscribe(
        d,
        &s,
        "dev-1",
        &[
            "-i",
            "dev-1",
            "-t",
            "commands/dev-1/https",
            "-C",
            "1",
            "-W",
            "20",
            "-v",
        ],
    );
    s.wait_for("commands/dev-1/https");
    let c2 = client("dev-2");
    let mut post = with_client(&c2);
    post.extend(["-X", "POST", "--data-binary", "via https"]);
    let (status, body) = answer(&curl(
        d,
        &s,
        "localhost",
        "/topics/commands/dev-1/https?qos=1",
        &post,
    ));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["delivered"], 1, "{body}");
    let (code, text) = output(sub);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("commands/dev-1/https via https"), "{text}");
    let denied = curl(d, &s, "localhost", "/topics/devices/dev-1/telemetry", &post);
    let (status, body) = answer(&denied);
    assert_ne!(status, 0, "{}", denied.stderr);
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("policy-denied")),
        "{body}"
    );

    // Sessions are listed and can be disconnected; a policy change that removes Connect
    // closes the session.
    s.drain();
    let mut live2 = subscribe(
        d,
        &s,
        "dev-2",
        &["-i", "dev-2", "-t", "commands/dev-2/a", "-W", "30"],
    );
    s.wait_for("commands/dev-2/a");
    let sessions = cli_json(d, &["sessions", "list"]);
    let dev2 = sessions["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["client_id"] == "dev-2")
        .cloned()
        .unwrap_or_default();
    assert_eq!(dev2["online"], true, "{sessions}");
    assert_eq!(dev2["subscriptions"][0], "commands/dev-2/a", "{sessions}");
    cli(d, &["sessions", "disconnect", "dev-2"]).ok();
    s.wait_for("an operator disconnected the session");
    // mosquitto_sub connects again by itself.
    s.wait_for("commands/dev-2/a");
    let started = std::time::Instant::now();
    cli(d, &["policy", "detach", "devices", "--domain", "localhost"]).ok();
    let closed = s.wait_for("mqtt:Connect no longer allowed");
    assert!(closed.contains("dev-2"), "{closed}");
    assert!(
        started.elapsed().as_millis() < 1000,
        "{:?}",
        started.elapsed()
    );
    let _ = live2.kill();
    let _ = live2.wait();
    cli(d, &["policy", "attach", "devices", "--domain", "localhost"]).ok();
    wait_for_snapshot(d, &s);

    // A second connection with the same client id closes the first.
    s.drain();
    let mut holder = subscribe(
        d,
        &s,
        "dev-1",
        &["-i", "dev-1", "-t", "commands/dev-1/holder", "-W", "30"],
    );
    s.wait_for("commands/dev-1/holder");
    let taker = publish(
        d,
        &s,
        "dev-1",
        &["-i", "dev-1", "-t", "devices/dev-1/x", "-m", "x", "-q", "1"],
    );
    assert_eq!(taker.code, 0, "{}", taker.stderr);
    let taken = s.wait_for("took this client id over");
    assert!(taken.contains("dev-1"), "{taken}");
    // (mosquitto_sub reconnects by itself; it has made its point.)
    let _ = holder.kill();
    let _ = holder.wait();

    // Revoking the certificate closes its live session within a second.
    let registered = cli_json(
        d,
        &[
            "cert",
            "register",
            "--cert",
            "dev-1.pem",
            "--status",
            "ACTIVE",
        ],
    );
    wait_for_snapshot(d, &s);
    s.drain();
    let mut live = subscribe(
        d,
        &s,
        "dev-1",
        &["-i", "dev-1", "-t", "commands/dev-1/live", "-W", "30"],
    );
    s.wait_for("commands/dev-1/live");
    let started = std::time::Instant::now();
    cli(
        d,
        &[
            "cert",
            "update",
            registered["id"].as_str().unwrap(),
            "--status",
            "REVOKED",
        ],
    )
    .ok();
    let closed = s.wait_for("\"revoked");
    let elapsed = started.elapsed();
    assert!(closed.contains("revoked"), "{closed}");
    assert!(elapsed.as_millis() < 1000, "closed after {elapsed:?}");
    println!("mqtt session closed {elapsed:?} after the revocation");
    let _ = live.kill();
    let _ = live.wait();

    // A forwarding rule: messages on its filter reach an HTTP receiver as a signed envelope.
    let python = require_tool("python3").unwrap();
    let rx = crate::webhook::receiver(d, &python);
    let rule = cli_json(
        d,
        &[
            "webhook",
            "create",
            "telemetry",
            "--url",
            &format!("http://127.0.0.1:{}/hook", rx.port),
            "--event",
            "mqtt.message",
            "--topic-filter",
            "devices/+/telemetry",
        ],
    );
    std::fs::write(d.join("secret.txt"), rule["secret"].as_str().unwrap()).unwrap();
    wait_for_snapshot(d, &s);
    let sent = publish(
        d,
        &s,
        "dev-2",
        &[
            "-i",
            "dev-2",
            "-t",
            "devices/dev-2/telemetry",
            "-m",
            "{\"t\": 21}",
            "-q",
            "1",
        ],
    );
    assert_eq!(sent.code, 0, "{}", sent.stderr);
    let got = rx.next("/hook");
    assert_eq!(got["event"], "mqtt.message", "{got}");
    assert_eq!(got["valid"], true, "signature: {got}");
    assert_eq!(got["body"]["topic"], "devices/dev-2/telemetry");
    assert_eq!(got["body"]["payload"], "{\"t\": 21}");
    assert_eq!(got["body"]["payload_encoding"], "utf-8");
    assert_eq!(got["body"]["client_id"], "dev-2");
    assert_eq!(got["body"]["certificate_id"].as_str().unwrap().len(), 64);
}

/// Raw MQTT bytes over TLS from Python: each abuse gets a protocol-correct refusal in bounded
/// time, and a well-behaved client is served throughout.
/// A raw MQTT 3.1.1 client over TLS as dev-1, for the abuse tests.
const RAW_CLIENT: &str = r#"
import socket, ssl, sys, time
port = int(sys.argv[1])
def conn():
    ctx = ssl.create_default_context(cafile="data/ca/ca.pem")
    ctx.check_hostname = False
    ctx.load_cert_chain("dev-1.chain.pem", "dev-1.key")
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)))
    s.settimeout(10)
    return s
def varint(n):
    out = b""
    while True:
        b = n % 128; n //= 128
        out += bytes([b | (128 if n else 0)])
        if not n: return out
def string(t): return len(t).to_bytes(2, "big") + t
def packet(kind, body): return bytes([kind]) + varint(len(body)) + body
def connect(cid=b"dev-1"):
    return packet(0x10, string(b"MQTT") + bytes([4, 0x02, 0, 60]) + string(cid))
def closed_within(s, seconds):
    start = time.time()
    try:
        while True:
            if not s.recv(4096): break
    except (ssl.SSLError, ConnectionResetError, socket.timeout, OSError):
        pass
    return time.time() - start < seconds
"#;

const ABUSE: &str = r#"
# 1. Silence after the handshake: closed after the connect timeout (1 s here).
s = conn(); print("silent", closed_within(s, 5), flush=True)
# 2. Garbage.
s = conn(); s.sendall(b"\xff" * 64); print("garbage", closed_within(s, 5), flush=True)
# 3. A CONNECT announcing 100 kB against a 1 kB limit: closed before the rest arrives.
s = conn(); s.sendall(bytes([0x10]) + varint(100_000) + b"\x00\x04MQTT"); print("oversized", closed_within(s, 5), flush=True)
# 4. A wildcard in a PUBLISH topic.
s = conn(); s.sendall(connect()); ack = s.recv(4)
print("connack", ack.hex(), flush=True)
s.sendall(packet(0x30, string(b"commands/+/x") + b"payload")); print("wildcard-publish", closed_within(s, 5), flush=True)
# 5. A flood of SUBSCRIBEs: the first 100 granted, then quota refusals; the session lives.
s = conn(); s.sendall(connect()); s.recv(4)
codes = []
for i in range(150):
    s.sendall(packet(0x82, (i + 1).to_bytes(2, "big") + string(b"commands/dev-1/f%d" % i) + b"\x00"))
    suback = b""
    while len(suback) < 5: suback += s.recv(5 - len(suback))
    codes.append(suback[4])
print("subscribe-codes", codes.count(0), codes.count(0x80), flush=True)
s.sendall(packet(0xC0, b"")); print("pingresp", s.recv(2).hex(), flush=True)
# 6. Keep-alive 1 s: a PINGREQ within it keeps the session (the waiting is what is tested);
# silence after it closes the session 1.5 s later.
s = conn(); s.sendall(packet(0x10, string(b"MQTT") + bytes([4, 0x02, 0, 1]) + string(b"dev-1"))); s.recv(4)
time.sleep(1.0)
s.sendall(packet(0xC0, b"")); alive = s.recv(2).hex() == "d000"
start = time.time()
closed = closed_within(s, 5)
waited = time.time() - start
print("keepalive", alive, closed and 1.0 < waited < 4.0, round(waited, 2), flush=True)
"#;

#[test]
fn bad_mqtt_input_is_refused_in_bounded_time_and_spares_other_clients() {
    let (Some(python), Some(_)) = (require_tool("python3"), require_tool("mosquitto_pub")) else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    for dev in ["dev-1", "dev-2"] {
        leaf(d, "client", dev, "int", &["--org", "Acme"]);
    }
    let config = config().replace(
        "https_publish = true\n",
        "https_publish = true\nconnect_timeout_secs = 1\nmax_packet_size = 1024\n",
    );
    let s = Server::start(d, &config);
    allow_devices(d, &s);
    // A well-behaved subscriber is connected throughout.
    let mut steady = subscribe(
        d,
        &s,
        "dev-2",
        &["-i", "dev-2", "-t", "commands/dev-2/steady", "-W", "60"],
    );
    s.wait_for("commands/dev-2/steady");
    std::fs::write(d.join("abuse.py"), format!("{RAW_CLIENT}{ABUSE}")).unwrap();
    let r = run(&python, &["abuse.py", &s.ports[1].to_string()], d);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    for line in [
        "silent True",
        "garbage True",
        "oversized True",
        "wildcard-publish True",
    ] {
        assert!(r.stdout.contains(line), "{line}: {}", r.stdout);
    }
    assert!(r.stdout.contains("connack 20020000"), "{}", r.stdout);
    assert!(r.stdout.contains("subscribe-codes 100 50"), "{}", r.stdout);
    assert!(r.stdout.contains("pingresp d000"), "{}", r.stdout);
    assert!(r.stdout.contains("keepalive True True"), "{}", r.stdout);
    // The steady client was not disturbed, and the gateway still serves new ones.
    let ok = publish(
        d,
        &s,
        "dev-1",
        &[
            "-i",
            "dev-1",
            "-t",
            "devices/dev-1/after",
            "-m",
            "x",
            "-q",
            "1",
        ],
    );
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(
        steady.try_wait().unwrap().is_none(),
        "the steady subscriber is still connected"
    );
    let _ = steady.kill();
    let _ = steady.wait();
}

/// A subscriber that never acknowledges its QoS 1 messages while they keep coming (here its own
/// publications, acknowledged to it as publisher): after the 64 in flight it reads nothing it
/// was sent, so the rest waits for it.
const STALLED: &str = r#"
pid = int(sys.argv[2])
def rss():
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS:"): return int(line.split()[1])
s = conn(); s.sendall(connect()); s.recv(4)
s.sendall(packet(0x82, (1).to_bytes(2, "big") + string(b"commands/dev-1/stalled") + b"\x01"))
suback = b""
while len(suback) < 5: suback += s.recv(5 - len(suback))
before = rss()
buf = b""; acked = 0; delivered = 0
def take():
    global buf, acked, delivered
    while len(buf) >= 2:
        n, mult, i = 0, 1, 1
        while True:
            if i >= len(buf): return
            b = buf[i]; n += (b & 127) * mult; mult *= 128; i += 1
            if not b & 128: break
        if len(buf) < i + n: return
        kind = buf[0] >> 4
        if kind == 4: acked += 1
        elif kind == 3: delivered += 1
        buf = buf[i + n:]
total, burst, payload = 40000, 500, b"x" * 900
for start in range(0, total, burst):
    s.sendall(b"".join(packet(0x32, string(b"commands/dev-1/stalled") + (start + i + 1).to_bytes(2, "big") + payload) for i in range(burst)))
    while acked < start + burst:
        data = s.recv(1 << 16)
        if not data: raise SystemExit("closed after %d acknowledged" % acked)
        buf += data; take()
print("stalled", acked, delivered, rss() - before, flush=True)
s.close()
# A subscription's retained messages are all owed, however many (here more than a connection
# holds waiting of what is published live): 6,000 retained, then subscribed and acknowledged.
s = conn(); s.sendall(connect()); s.recv(4)
buf = b""; acked = 0; delivered = 0; ids = []
total = 6000
s.sendall(b"".join(packet(0x33, string(b"commands/dev-1/r/%d" % i) + (i + 1).to_bytes(2, "big") + b"kept") for i in range(total)))
while acked < total:
    data = s.recv(1 << 16)
    if not data: raise SystemExit("closed after %d retained acknowledged" % acked)
    buf += data; take()
def take_acking():
    global buf, delivered
    out = b""
    while len(buf) >= 2:
        n, mult, i = 0, 1, 1
        while True:
            if i >= len(buf): return out
            b = buf[i]; n += (b & 127) * mult; mult *= 128; i += 1
            if not b & 128: break
        if len(buf) < i + n: return out
        if buf[0] >> 4 == 3:
            delivered += 1
            body = buf[i:i + n]
            tlen = int.from_bytes(body[0:2], "big")
            out += packet(0x40, body[2 + tlen:4 + tlen])
        buf = buf[i + n:]
    return out
s.sendall(packet(0x82, (1).to_bytes(2, "big") + string(b"commands/dev-1/r/+") + b"\x01"))
suback = b""
while len(suback) < 5: suback += s.recv(5 - len(suback))
while delivered < total:
    data = s.recv(1 << 16)
    if not data: break
    buf += data
    acks = take_acking()
    if acks: s.sendall(acks)
print("retained", delivered, flush=True)
"#;

/// Regression (found by the cluster bench, 2026-12-04): a QoS 1 subscriber that did not
/// acknowledge — or was slower than its publishers — had every message beyond its 64 in
/// flight buffered by its session, without bound (a 6 s fan-in: 1.4 GB resident, none counted
/// dropped). What exceeds its queue is now dropped and counted, as the broker's full queue is.
#[test]
fn a_qos1_subscriber_that_never_acknowledges_cannot_grow_the_node_memory() {
    let Some(python) = require_tool("python3") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    leaf(d, "client", "dev-1", "int", &["--org", "Acme"]);
    let config = config().replace(
        "https_publish = true\n",
        "https_publish = true\nmax_packet_size = 1024\n",
    );
    let s = Server::start(d, &config);
    allow_devices(d, &s);
    std::fs::write(d.join("stalled.py"), format!("{RAW_CLIENT}{STALLED}")).unwrap();
    let pid = s.child.id().to_string();
    let r = run(&python, &["stalled.py", &s.ports[1].to_string(), &pid], d);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("stalled "))
        .unwrap_or_default();
    let f: Vec<i64> = line
        .split(' ')
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    assert_eq!(f.len(), 3, "{}", r.stdout);
    assert_eq!(f[0], 40_000, "every publication acknowledged: {line}");
    assert!(
        (1..=64).contains(&f[1]),
        "at most 64 in flight to it: {line}"
    );
    // 40,000 messages of 900 bytes: about 48 MiB if kept; its queue (1,000) and channel hold
    // a few MiB.
    assert!(
        f[2] < 20 * 1024,
        "resident memory grew by {} KiB: {line}",
        f[2]
    );
    let metrics = s.metrics(d);
    let dropped = metrics
        .lines()
        .find(|l| l.starts_with("portcullis_mqtt_messages_total") && l.contains("\"dropped\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(dropped >= 30_000.0, "dropped and counted: {dropped}");
    assert!(
        r.stdout.contains("retained 6000"),
        "every retained message of a subscription is delivered: {}",
        r.stdout
    );
}

#[test]
fn registry_events_reach_only_sessions_whose_policies_name_them() {
    let Some(_) = require_tool("mosquitto_pub") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    for dev in ["dev-1", "dev-2"] {
        leaf(d, "client", dev, "int", &["--org", "Acme"]);
    }
    let s = Server::start(d, &config());
    std::fs::write(d.join("devices.json"), POLICY).unwrap();
    // A broad policy on the domain: every filter and topic, by wildcard.
    std::fs::write(
        d.join("broad.json"),
        r#"{"Statement": [{"Effect": "Allow", "Action": ["mqtt:Subscribe", "mqtt:Receive"],
                           "Resource": ["topicfilter:*", "topic:*"]}]}"#,
    )
    .unwrap();
    // A policy that names the event topics, on dev-2's certificate only.
    std::fs::write(
        d.join("events.json"),
        r#"{"Statement": [{"Effect": "Allow", "Action": "mqtt:Subscribe", "Resource": "topicfilter:$portcullis/events/*"},
                          {"Effect": "Allow", "Action": "mqtt:Receive", "Resource": "topic:$portcullis/events/*"}]}"#,
    )
    .unwrap();
    let dev2 = cli_json(
        d,
        &[
            "cert",
            "register",
            "--cert",
            "dev-2.pem",
            "--status",
            "ACTIVE",
        ],
    );
    let dev1 = cli_json(
        d,
        &[
            "cert",
            "register",
            "--cert",
            "dev-1.pem",
            "--status",
            "ACTIVE",
        ],
    );
    for (name, file) in [
        ("devices", "devices.json"),
        ("broad", "broad.json"),
        ("events", "events.json"),
    ] {
        cli(d, &["policy", "create", name, "--document", file]).ok();
    }
    cli(d, &["policy", "attach", "devices", "--domain", "localhost"]).ok();
    cli(d, &["policy", "attach", "broad", "--domain", "localhost"]).ok();
    cli(
        d,
        &[
            "policy",
            "attach",
            "events",
            "--cert",
            dev2["id"].as_str().unwrap(),
        ],
    )
    .ok();
    wait_for_snapshot(d, &s);

    // A wildcard does not open the server's topics.
    let refused = subscribe(
        d,
        &s,
        "dev-1",
        &[
            "-V",
            "mqttv5",
            "-i",
            "dev-1",
            "-t",
            "$portcullis/events/#",
            "-C",
            "1",
            "-W",
            "3",
        ],
    );
    let (_, text) = output(refused);
    assert!(
        text.to_lowercase().contains("not authorized") || text.contains("denied"),
        "{text}"
    );

    // The named policy does: a status change arrives as an event.
    let events = subscribe(
        d,
        &s,
        "dev-2",
        &[
            "-i",
            "dev-2",
            "-t",
            "$portcullis/events/certificate/status_changed",
            "-C",
            "1",
            "-W",
            "20",
            "-v",
        ],
    );
    s.wait_for("$portcullis/events/certificate/status_changed");
    cli(
        d,
        &[
            "cert",
            "update",
            dev1["id"].as_str().unwrap(),
            "--status",
            "INACTIVE",
        ],
    )
    .ok();
    let (code, text) = output(events);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.starts_with("$portcullis/events/certificate/status_changed {"),
        "{text}"
    );
    assert!(text.contains("INACTIVE"), "{text}");
}

/// The Python with paho-mqtt that the test command installs (`PORTCULLIS_TEST_PYTHON`), or a
/// `python3` that has it. Missing in CI fails the test; elsewhere it is skipped, saying so.
pub(crate) fn paho_python() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("PORTCULLIS_TEST_PYTHON") {
        return Some(p.into());
    }
    if let Some(p) = portcullis_testkit::tool("python3")
        && run(&p, &["-c", "import paho.mqtt.client"], Path::new(".")).code == 0
    {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!("Python paho-mqtt is not installed; the test command (scripts/test) installs it");
    }
    eprintln!("SKIP: Python paho-mqtt is not installed (run scripts/test to install it)");
    None
}

#[test]
fn mqtt5_sessions_expiry_reason_codes_and_aliases_with_paho() {
    let Some(python) = paho_python() else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    for dev in ["dev-1", "dev-2", "dev-3"] {
        leaf(d, "client", dev, "int", &["--org", "Acme"]);
    }
    let s = Server::start(d, &config());
    allow_devices(d, &s);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/scripts/mqtt5.py");
    let r = run(
        &python,
        &[
            script.to_str().unwrap(),
            &s.ports[1].to_string(),
            &s.admin_port.to_string(),
        ],
        d,
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("ALL OK"), "{}", r.stdout);
    // The gateway logged the refusals with their reasons.
    assert!(
        s.wait_for("mqtt publish denied")
            .contains("devices/dev-1/telemetry")
    );
}

#[test]
fn one_port_serves_mqtt_by_alpn_and_the_first_connect_provisions_just_in_time() {
    let Some(_) = require_tool("mosquitto_pub") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    leaf(d, "client", "dev-9", "int", &["--org", "Acme"]);
    let config = "[admin]\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\", \"mqtt\"]\n\
         [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\nregistry_mode = \"registered\"\n\
         [domain.mqtt]\nrequire_thing_client_id = true\n\
         [domain.mtls]\nmode = \"required\"\ntruststore = \"trust-a.pem\"\n\
         [[domain.mapping]]\nupstream = \"builtin:echo\"\n";
    let s = Server::start(d, config);
    std::fs::write(
        d.join("template.json"),
        r#"{"thing_name": "${Certificate.Subject.CommonName}", "attributes": {"org": "${Certificate.Subject.Organization}"}}"#,
    )
    .unwrap();
    cli(
        d,
        &[
            "ca",
            "register",
            "--cert",
            "int/ca.pem",
            "--no-verification",
            "--activate",
            "--auto-register",
            "--template",
            "template.json",
        ],
    )
    .ok();
    allow_devices(d, &s);
    let port = s.port.to_string();
    let mosquitto_as = |client_id: &str, alpn: Option<&str>| {
        let mut args = vec![
            "-h",
            "localhost",
            "-p",
            &port,
            "--cafile",
            "data/ca/ca.pem",
            "--cert",
            "dev-9.chain.pem",
            "--key",
            "dev-9.key",
            "-i",
            client_id,
            "-t",
            "devices/dev-9/telemetry",
            "-m",
            "first",
            "-q",
            "1",
        ];
        if let Some(alpn) = alpn {
            args.extend(["--tls-alpn", alpn]);
        }
        run(require_tool("mosquitto_pub").unwrap(), &args, d)
    };
    let mosquitto = |alpn: Option<&str>| mosquitto_as("dev-9", alpn);
    // The device's first CONNECT: registered, provisioned (a thing named after it, which the
    // client id must match), and served on that very connection.
    let first = mosquitto(Some("mqtt"));
    assert_eq!(first.code, 0, "{}", first.stderr);
    s.wait_for("provisioned just in time");
    let thing = cli_json(d, &["thing", "describe", "dev-9"]);
    assert_eq!(thing["attributes"]["org"], "Acme");
    let listed = cli_json(d, &["cert", "list", "--thing", "dev-9"]);
    assert_eq!(listed["items"][0]["status"], "ACTIVE", "{listed}");
    assert!(s.wait_for("mqtt session started").contains("dev-9"));
    // The client id must be the thing's name.
    let other = mosquitto_as("dev-9-other", Some("mqtt"));
    assert_ne!(other.code, 0, "{}", other.stderr);
    assert!(s.wait_for("mqtt connection refused").contains("thing"));
    // The same port speaks HTTP to HTTP clients (ALPN h2 or http/1.1) ...
    let dev = client("dev-9");
    let r = curl(d, &s, "localhost", "/over-http", &with_client(&dev));
    assert_eq!(answer(&r).0, 200, "{r:?}");
    let r = curl(
        d,
        &s,
        "localhost",
        "/over-http",
        &[with_client(&dev), vec!["--http1.1"]].concat(),
    );
    assert_eq!(answer(&r).0, 200, "{r:?}");
    // ... and a client that offers no ALPN gets HTTP: MQTT bytes there are refused, and the
    // log says what to do.
    let no_alpn = mosquitto(None);
    assert_ne!(no_alpn.code, 0, "{}", no_alpn.stdout);
    let line = s.wait_for("mqtt-without-alpn");
    assert!(line.contains("offer ALPN 'mqtt'"), "{line}");
    // An ALPN protocol this listener does not speak fails the handshake with its own reason.
    let unknown = mosquitto(Some("coap"));
    assert_ne!(unknown.code, 0, "{}", unknown.stdout);
    let line = s.wait_for("unknown-alpn");
    assert!(line.contains("offered: coap"), "{line}");
    let again = mosquitto(Some("mqtt"));
    assert_eq!(again.code, 0, "{}", again.stderr);
}

/// A policy as AWS IoT Core's guides write it, stored unchanged.
const AWS_POLICY: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": "iot:Connect",
     "Resource": "arn:aws:iot:us-east-1:123456789012:client/${iot:Connection.Thing.ThingName}",
     "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"}}},
    {"Effect": "Allow", "Action": ["iot:Publish", "iot:RetainPublish"],
     "Resource": "arn:aws:iot:us-east-1:123456789012:topic/sensors/${iot:Connection.Thing.ThingName}/*"},
    {"Effect": "Allow", "Action": "iot:Subscribe",
     "Resource": "arn:aws:iot:us-east-1:123456789012:topicfilter/sensors/*"},
    {"Effect": "Allow", "Action": "iot:Receive",
     "Resource": "arn:aws:iot:us-east-1:123456789012:topic/sensors/*"},
    {"Effect": "Allow", "Action": ["iot:GetThingShadow", "iot:UpdateThingShadow"],
     "Resource": "arn:aws:iot:us-east-1:123456789012:thing/${iot:Connection.Thing.ThingName}"},
    {"Effect": "Deny", "Action": "iot:Publish",
     "Resource": "arn:aws:iot:us-east-1:123456789012:topic/sensors/${iot:ClientId}/locked"}
  ]
}"#;

/// A Python with AWS's device SDK (awsiotsdk), which the test command installs; missing in CI
/// fails the test, elsewhere it is skipped, saying so.
pub(crate) fn awsiot_python() -> Option<std::path::PathBuf> {
    let python = paho_python()?;
    if run(&python, &["-c", "import awsiot, awscrt"], Path::new(".")).code == 0 {
        return Some(python);
    }
    if std::env::var_os("CI").is_some() {
        panic!("Python awsiotsdk is not installed; the test command (scripts/test) installs it");
    }
    eprintln!("SKIP: Python awsiotsdk is not installed (run scripts/test to install it)");
    None
}

/// AWS's device SDK, as its samples use it, against both MQTT listeners: a policy copied from
/// IoT Core decides (ARNs, iot: actions, thing variables, IsAttached), devices are provisioned
/// just in time by a template written with AWS IoT's variable names, and MQTT 5 denials carry
/// their reason codes and strings.
#[test]
fn aws_device_sdk_works_under_a_policy_copied_from_iot_core() {
    let Some(python) = awsiot_python() else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    for dev in ["dev-1", "dev-2"] {
        leaf(d, "client", dev, "int", &["--org", "Acme"]);
    }
    let config = "[admin]\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"mqtt\"]\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\", \"mqtt\"]\n\
         [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\nregistry_mode = \"registered\"\n\
         [domain.mtls]\nmode = \"required\"\ntruststore = \"trust-a.pem\"\n\
         [[domain.mapping]]\nupstream = \"builtin:echo\"\n";
    let s = Server::start(d, config);
    std::fs::write(
        d.join("template.json"),
        r#"{"thing_name": "${iot:Certificate.Subject.CommonName}"}"#,
    )
    .unwrap();
    cli(
        d,
        &[
            "ca",
            "register",
            "--cert",
            "int/ca.pem",
            "--no-verification",
            "--activate",
            "--auto-register",
            "--template",
            "template.json",
        ],
    )
    .ok();
    std::fs::write(d.join("aws.json"), AWS_POLICY).unwrap();
    cli(d, &["policy", "create", "fleet", "--document", "aws.json"]).ok();
    cli(d, &["policy", "attach", "fleet", "--domain", "localhost"]).ok();
    wait_for_snapshot(d, &s);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/cli/scripts/aws_device_sdk.py");
    let r = run(
        &python,
        &[
            script.to_str().unwrap(),
            &s.ports[0].to_string(),
            &s.ports[1].to_string(),
        ],
        d,
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("ALL OK"), "{}", r.stdout);
    // The SDK's ALPN was taken as MQTT, and each thing was provisioned from the template.
    assert!(
        s.wait_for(r#""alpn":"x-amzn-mqtt-ca""#)
            .contains("TLS handshake completed")
    );
    let thing = cli_json(d, &["thing", "describe", "dev-2"]);
    assert_eq!(thing["name"], "dev-2", "{thing}");
    // simulate reads the copied policy the same way, and names what has no counterpart here.
    let sim = cli(
        d,
        &[
            "policy",
            "simulate",
            "--cert",
            "dev-1.chain.pem",
            "--action",
            "mqtt:Connect",
            "--resource",
            "client:dev-1",
            "--client-id",
            "dev-1",
            "--domain",
            "localhost",
        ],
    );
    assert_eq!(sim.code, 0, "{}{}", sim.stdout, sim.stderr);
    assert!(
        sim.stdout.contains("${thing:Name} = dev-1"),
        "{}",
        sim.stdout
    );
    assert!(sim.stdout.contains("no counterpart here"), "{}", sim.stdout);
}

/// Two nodes routing MQTT through a real nats-server: a device subscribed on node A receives
/// what another device publishes on node B, topics with dots and spaces included, and node A
/// subscribes on NATS only for the filters its sessions hold.
#[test]
fn mqtt_messages_cross_nodes_through_nats() {
    let Some(_) = require_tool("mosquitto_pub") else {
        return;
    };
    let tmp = temp_dir();
    let Some(nats) = crate::cluster::Nats::start(&tmp.path().join("nats"), 1) else {
        return;
    };
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    pki(&da);
    for dev in ["dev-1", "dev-2"] {
        leaf(&da, "client", dev, "int", &["--org", "Acme"]);
    }
    for file in ["trust-a.pem", "dev-2.chain.pem", "dev-2.key"] {
        std::fs::copy(da.join(file), db.join(file)).unwrap();
    }
    let config = format!("nats_url = \"{}\"\n{}", nats.url(), config());
    let a = Server::start(&da, &config);
    let b = Server::start(&db, &config);
    allow_devices(&da, &a);
    allow_devices(&db, &b);
    // Once A knows no node of an older version, it subscribes a filter on the subjects only
    // older nodes send on no more (two subscriptions fewer each).
    a.printed("bus protocol 5", |l| {
        l.contains("every node speaks bus protocol 5")
    });

    let sub = subscribe(
        &da,
        &a,
        "dev-1",
        &[
            "-i",
            "dev-1",
            "-t",
            "devices/+/telemetry",
            "-t",
            "commands/dev-1/#",
            "-C",
            "2",
            "-W",
            "20",
            "-v",
        ],
    );
    // A holds both filters on NATS (the `#` one twice: its level and below), their first level
    // a name: one subscription for every kind of message (the three-node test has a filter
    // whose first level is a wildcard).
    for subject in [
        "*.devices.*.telemetry",
        "*.commands.dev-1.>",
        "*.commands.dev-1",
    ] {
        a.printed("routing subscribed", |l| {
            l.contains("routing subscribed") && l.contains(subject)
        });
    }
    for (topic, message) in [
        ("devices/dev-2/telemetry", "21.5"),
        ("commands/dev-1/a.b c", "dotted"),
    ] {
        let sent = publish(
            &db,
            &b,
            "dev-2",
            &["-i", "dev-2", "-t", topic, "-m", message, "-q", "1"],
        );
        assert_eq!(sent.code, 0, "{}", sent.stderr);
    }
    let (code, text) = output(sub);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("devices/dev-2/telemetry 21.5"), "{text}");
    assert!(text.contains("commands/dev-1/a.b c dotted"), "{text}");
    let older: Vec<String> = a
        .lines_with("routing subscribed")
        .into_iter()
        .filter(|l| l.contains("pcl.") || l.contains("pcm."))
        .collect();
    assert!(older.is_empty(), "no older node is on the bus: {older:?}");
    // B's sessions hold no filter: B subscribed to nothing on NATS (interest-based routing).
    assert!(
        !b.has_printed("routing subscribed"),
        "B subscribed on NATS without a session holding a filter"
    );

    // NATS gone: the nodes say they are not ready (a load balancer stops sending devices to a
    // node that cannot route their messages).
    assert_eq!(
        api(&da, &a, "GET", "/readyz", None, Auth::Certificate).0,
        200
    );
    drop(nats);
    a.wait_for("disconnected from NATS");
    assert_eq!(
        api(&da, &a, "GET", "/readyz", None, Auth::Certificate).0,
        503,
        "not ready without NATS"
    );
}
