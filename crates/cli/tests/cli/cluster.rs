//! A cluster as the reference deployment runs it: three `portcullis serve` nodes sharing one
//! PostgreSQL registry and a three-server NATS cluster with JetStream (replicas = 3), all real
//! processes on loopback. A domain put on one node is served by all three with one certificate;
//! MQTT crosses nodes (mosquitto for QoS 0, 1 and 2; paho-mqtt for QoS 2
//! exactly once, shared subscriptions, cluster-wide retained messages and takeover), a revoked
//! certificate's sessions close on every node within a second, routing goes on when a NATS
//! server is killed, and a persistent session outlives its node (kill -9).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use portcullis_testkit::{require_tool, run, temp_dir};

use crate::control::{cli, cli_json, fresh_postgres, on, wait_for_snapshot};
use crate::serve::{Server, pki};
use crate::*;

/// One nats-server, killed on drop.
pub(crate) struct NatsServer {
    child: Child,
    pub(crate) name: String,
    pub(crate) port: u16,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A NATS cluster with JetStream, each server's store in `dir`.
pub(crate) struct Nats {
    pub(crate) servers: Vec<NatsServer>,
}

pub(crate) fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768 and up by default): a port the kernel picked
    // for a `bind(0)` and released comes back to the next process asking for one (the nodes'
    // own listeners), and a NATS server started later on it found it taken. Here only another
    // test choosing the same port could, and each process starts at its own place.
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..2_000 {
        let port = 20_000 + (start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000);
        let port = u16::try_from(port).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32000");
}

/// Client and route ports for `n` NATS servers.
pub(crate) fn nats_ports(n: usize) -> Vec<(u16, u16)> {
    (0..n).map(|_| (free_port(), free_port())).collect()
}

/// The servers on `ports`, as `nats_url` takes them.
pub(crate) fn nats_url(ports: &[(u16, u16)]) -> String {
    ports
        .iter()
        .map(|(p, _)| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

impl Nats {
    /// Starts `n` servers (clustered when more than one) and waits until each is ready; `None`
    /// without nats-server (outside CI).
    pub(crate) fn start(dir: &Path, n: usize) -> Option<Nats> {
        Nats::start_on(dir, &nats_ports(n), None)
    }

    /// Starts a server on each of `ports` (client, route); with `tls`, a directory holding
    /// `nN.pem`, `nN.key` and `ca.pem`, clients and routes use mutual TLS.
    pub(crate) fn start_on(dir: &Path, ports: &[(u16, u16)], tls: Option<&Path>) -> Option<Nats> {
        let Some(bin) = require_tool("nats-server") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "the cluster tests need nats-server (scripts/test installs it)"
            );
            return None;
        };
        let n = ports.len();
        let mut servers = Vec::new();
        let mut ready: Vec<Receiver<String>> = Vec::new();
        for (i, (port, route)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.join(&name);
            std::fs::create_dir_all(&store).unwrap();
            let mut config = format!(
                "server_name: {name}\nlisten: \"127.0.0.1:{port}\"\n\
                 jetstream {{ store_dir: \"{}\", max_memory_store: 64MB, max_file_store: 8GB }}\n",
                store.display()
            );
            let tls_block = tls.map(|t| {
                format!(
                    "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true }}",
                    t.join(format!("{name}.pem")).display(),
                    t.join(format!("{name}.key")).display(),
                    t.join("ca.pem").display()
                )
            });
            if let Some(block) = &tls_block {
                config.push_str(block);
                config.push('\n');
            }
            if n > 1 {
                let routes: Vec<String> = ports
                    .iter()
                    .filter(|(_, r)| r != route)
                    .map(|(_, r)| format!("\"nats-route://127.0.0.1:{r}\""))
                    .collect();
                config.push_str(&format!(
                    "cluster {{ name: portcullis-test, listen: \"127.0.0.1:{route}\", routes: [{}]{} }}\n",
                    routes.join(", "),
                    tls_block
                        .as_deref()
                        .map(|b| format!(", {b}"))
                        .unwrap_or_default()
                ));
            }
            let file = dir.join(format!("{name}.conf"));
            std::fs::write(&file, config).unwrap();
            let mut child = Command::new(&bin)
                .arg("-c")
                .arg(&file)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let (tx, rx) = channel();
            let stderr = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            ready.push(rx);
            servers.push(NatsServer {
                child,
                name,
                port: *port,
            });
        }
        for (rx, server) in ready.iter().zip(&servers) {
            let mut seen = Vec::new();
            loop {
                match rx.recv_timeout(Duration::from_secs(30)) {
                    Ok(line) if line.contains("Server is ready") => break,
                    Ok(line) => seen.push(line),
                    Err(_) => panic!("{} never became ready:\n{}", server.name, seen.join("\n")),
                }
            }
        }
        Some(Nats { servers })
    }

    /// Every server, as `nats_url` takes them.
    pub(crate) fn url(&self) -> String {
        let ports: Vec<(u16, u16)> = self.servers.iter().map(|s| (s.port, 0)).collect();
        nats_url(&ports)
    }

    /// `kill -9` of the server named `name`.
    pub(crate) fn kill(&mut self, name: &str) {
        let i = self.servers.iter().position(|s| s.name == name).unwrap();
        drop(self.servers.remove(i));
    }
}

const POLICY: &str = r#"{"Statement": [
  {"Effect": "Allow", "Action": "mqtt:Connect",
   "Resource": ["client:${cert:Subject.CN}", "client:${cert:Subject.CN}-*"]},
  {"Effect": "Allow", "Action": "mqtt:Publish",
   "Resource": ["topic:devices/${cert:Subject.CN}/*", "topic:jobs/*", "topic:late/*",
                "topic:fleet/*"]},
  {"Effect": "Allow", "Action": "mqtt:Subscribe",
   "Resource": ["topicfilter:devices/+/telemetry", "topicfilter:jobs/#",
                "topicfilter:$share/workers/jobs/#", "topicfilter:jobs/zero/*", "topicfilter:late/#",
                "topicfilter:fleet/#", "topicfilter:+/+/t"]},
  {"Effect": "Allow", "Action": "mqtt:Receive",
   "Resource": ["topic:devices/*", "topic:jobs/*", "topic:late/*", "topic:fleet/*"]}]}"#;

/// The mosquitto options for device `who` on `node`'s MQTT port (the server certificate is
/// the cluster's, issued by the cluster CA).
fn mqtt_args(node: &Server, who: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "-h",
        "127.0.0.1",
        "-p",
        &node.ports[1].to_string(),
        "--cafile",
        "data/ca/cluster-ca.pem",
        "--insecure",
        "--cert",
        &format!("{who}.chain.pem"),
        "--key",
        &format!("{who}.key"),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// A mosquitto client, killed after 60 s whatever happens (mosquitto_pub has no timeout).
fn mosquitto(tool: &str, d: &Path, node: &Server, who: &str, extra: &[&str]) -> Child {
    Command::new("timeout")
        .arg("60")
        .arg(require_tool(tool).unwrap())
        .args(mqtt_args(node, who, extra))
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finished(child: Child) -> (Option<i32>, String) {
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

/// The NATS server a node said it is connected to, last.
fn nats_server_of(node: &Server) -> String {
    let line = node.printed("connected to NATS", |l| l.contains("connected to NATS"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v["server"].as_str().unwrap().to_string()
}

#[test]
fn three_nodes_route_mqtt_through_a_three_server_nats_cluster() {
    let (Some(_), Some(python)) = (require_tool("mosquitto_pub"), crate::mqtt::paho_python())
    else {
        return;
    };
    let Some(database) = fresh_postgres("cluster") else {
        return;
    };
    let tmp = temp_dir();
    if require_tool("nats-server").is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the cluster tests need nats-server"
        );
        return;
    }
    let ports = nats_ports(3);
    let dirs: Vec<PathBuf> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| tmp.path().join(n))
        .collect();
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    let da = &dirs[0];
    pki(da);
    let devices: Vec<String> = (1..=9).map(|i| format!("dev-{i}")).collect();
    for dev in &devices {
        leaf(da, "client", dev, "int", &["--org", "Acme"]);
    }
    portcullis(da, &["cluster-key", "generate", "--out", "cluster.key"]).ok();
    let mut shared: Vec<&str> = vec!["trust-a"];
    shared.extend(devices.iter().map(String::as_str));
    for d in &dirs[1..] {
        crate::nodes::share(da, d, &shared);
        std::fs::copy(da.join("cluster.key"), d.join("cluster.key")).unwrap();
    }
    let config = |name: &str| {
        on(
            Some(&database),
            format!(
                "cluster_key_file = \"cluster.key\"\nnode_name = \"{name}\"\n\
                 nats_url = \"{}\"\nnats_replicas = 3\nnats_tls = true\nnats_kept_mib = 256\n\
                 default_endpoint = true\ndefault_domain = \"localhost\"\n\
                 [admin]\naddress = \"127.0.0.1:0\"\n\
                 [[listener]]\naddress = \"127.0.0.1:0\"\n\
                 [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"mqtt\"]\n\
                 [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\nregistry_mode = \"revocation\"\n\
                 [domain.mtls]\nmode = \"required\"\ntruststore = \"trust-a.pem\"\n\
                 [[domain.mapping]]\nupstream = \"builtin:echo\"\n",
                nats_url(&ports)
            ),
        )
    };
    // One node first: it makes the cluster's CAs. The NATS servers get their certificates from
    // the cluster's CA (mutual TLS for the nodes and between the servers); then the others
    // join.
    let a = Server::start(da, &config("a"));
    let certs = tmp.path().join("nats-certs");
    for i in 1..=3 {
        let name = format!("n{i}");
        cli(
            da,
            &[
                "cluster",
                "nats-cert",
                &name,
                "--host",
                "127.0.0.1",
                "--out",
                certs.to_str().unwrap(),
            ],
        )
        .ok();
    }
    let mode = std::fs::metadata(certs.join("n1.key"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let mut nats = Nats::start_on(&tmp.path().join("nats"), &ports, Some(&certs)).unwrap();
    // Every NATS server asks its clients for a certificate of the cluster's CA.
    {
        use std::io::Read;
        let mut plain = std::net::TcpStream::connect(("127.0.0.1", ports[0].0)).unwrap();
        let mut info = [0u8; 4096];
        let n = plain.read(&mut info).unwrap();
        let info = String::from_utf8_lossy(&info[..n]);
        assert!(
            info.contains(r#""tls_required":true"#) && info.contains(r#""tls_verify":true"#),
            "{info}"
        );
    }
    let b = Server::start(&dirs[1], &config("b"));
    let c = Server::start(&dirs[2], &config("c"));
    let nodes = [&a, &b, &c];
    std::fs::write(da.join("devices.json"), POLICY).unwrap();
    cli(
        da,
        &["policy", "create", "devices", "--document", "devices.json"],
    )
    .ok();
    cli(
        da,
        &["policy", "attach", "devices", "--domain", "localhost"],
    )
    .ok();
    for (d, node) in dirs.iter().zip(nodes) {
        wait_for_snapshot(d, node);
        node.printed("JetStream streams ready", |l| {
            l.contains("JetStream streams ready")
        });
    }

    // A domain put on A is served by B and C within a second, with the same certificate
    // (issued once for the cluster by its CA), no file copied.
    std::fs::write(
        da.join("auto.toml"),
        "hostname = \"auto.test\"\ncertificate = \"auto\"\n[mtls]\nmode = \"required\"\n\
         truststore = \"trust-a.pem\"\n[[mapping]]\nupstream = \"builtin:echo\"\n",
    )
    .unwrap();
    let started = Instant::now();
    cli_json(da, &["domain", "put", "--file", "auto.toml"]);
    let put = cli_json(da, &["audit", "list", "--limit", "1"])["items"][0]["seq"]
        .as_i64()
        .unwrap();
    for node in nodes {
        node.wait_for_config(put);
    }
    let everywhere = started.elapsed();
    let served: Vec<String> = dirs
        .iter()
        .zip(nodes)
        .map(|(d, node)| {
            let shown = openssl(
                d,
                &[
                    "s_client",
                    "-connect",
                    &format!("127.0.0.1:{}", node.port),
                    "-servername",
                    "auto.test",
                    "-cert",
                    "dev-1.chain.pem",
                    "-key",
                    "dev-1.key",
                    "-CAfile",
                    "data/ca/cluster-ca.pem",
                    "-verify_return_error",
                ],
            )
            .map(|r| r.stdout)
            .unwrap_or_default();
            let start = shown.find("-----BEGIN CERTIFICATE-----");
            let end = shown.find("-----END CERTIFICATE-----");
            match (start, end) {
                (Some(s), Some(e)) => shown[s..e].to_string(),
                _ => panic!("no server certificate in: {shown}"),
            }
        })
        .collect();
    assert!(
        served.iter().all(|c| c == &served[0]),
        "three nodes, one certificate"
    );
    println!("a domain put on A was served by A, B and C after {everywhere:?}");
    assert!(everywhere < Duration::from_secs(1), "{everywhere:?}");

    // `cluster status` shows each node's connection to NATS (its heartbeat after the put is
    // later than its streams were ready).
    for node in nodes {
        node.wait_for_heartbeat(put);
    }
    let status = cli_json(da, &["cluster", "status"]);
    let connections: Vec<&str> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["nats"].as_str())
        .collect();
    assert_eq!(connections.len(), 3, "{status}");
    assert!(
        connections.iter().all(|n| n.starts_with("connected to n")),
        "{status}"
    );
    // Every node reports the bus protocol of QoS 1 batches, and each finds that out: what
    // follows stores QoS 1 messages a topic's batch at a time.
    // And each finds out that every node keeps what its persistent sessions need of QoS 1
    // messages that cross live (which a node with nats_qos1_live sends).
    for node in nodes {
        node.printed("QoS 1 batches", |l| {
            l.contains("every node reads QoS 1 batches")
        });
        node.printed("QoS 1 live", |l| {
            l.contains("every node reads QoS 1 messages that cross live")
        });
        // ... and QoS 0 messages go by the route table, as soon as each has read it.
        node.printed("batches for nodes", |l| {
            l.contains("every node reads batches for nodes")
        });
        node.printed("route table read", |l| l.contains("read the route table"));
        // ... and none subscribes on the subjects only older versions send on.
        node.printed("bus protocol 5", |l| {
            l.contains("every node speaks bus protocol 5")
        });
    }

    // mosquitto: what is published on B and C at QoS 0, 1 and 2 reaches a subscriber on A.
    let sub = mosquitto(
        "mosquitto_sub",
        da,
        &a,
        "dev-1",
        &[
            "-i",
            "dev-1",
            "-t",
            "devices/+/telemetry",
            "-q",
            "2",
            "-C",
            "3",
            "-W",
            "30",
            "-v",
        ],
    );
    // SUBACK comes once the cluster routes the filter to A.
    a.printed("mqtt subscribe", |l| {
        l.contains("mqtt subscribe") && l.contains("dev-1")
    });
    for (node, who, qos) in [(&b, "dev-2", "0"), (&c, "dev-3", "1"), (&b, "dev-2", "2")] {
        let topic = format!("devices/{who}/telemetry");
        let sent = mosquitto(
            "mosquitto_pub",
            da,
            node,
            who,
            &[
                "-i",
                who,
                "-t",
                &topic,
                "-m",
                &format!("qos{qos}"),
                "-q",
                qos,
            ],
        );
        let (code, text) = finished(sent);
        assert_eq!(code, Some(0), "{text}");
    }
    let (code, text) = finished(sub);
    assert_eq!(code, Some(0), "{text}");
    for line in [
        "devices/dev-2/telemetry qos0",
        "devices/dev-3/telemetry qos1",
        "devices/dev-2/telemetry qos2",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    // B sent its QoS 0 message to A in a batch for A: A's filter was in B's route table before
    // A's SUBACK.
    assert!(
        counter(
            &a.metrics(da),
            "portcullis_cluster_node_batches_total{direction=\"received\"}"
        ) >= 1,
        "{}",
        a.metrics(da)
    );
    // No persistent session or shared group wanted the QoS 1 message, but nats_qos1_live is off
    // (the default): JetStream kept it, and nothing of C's crossed live.
    let metrics = c.metrics(da);
    assert_eq!(
        (
            counter(
                &metrics,
                "portcullis_cluster_qos1_messages_total{path=\"live\"}"
            ),
            counter(
                &metrics,
                "portcullis_cluster_qos1_messages_total{path=\"kept\"}"
            )
        ),
        (0, 1),
        "{metrics}"
    );

    // paho-mqtt (MQTT 5): QoS 2 exactly once, retained messages, shared subscriptions, takeover.
    let ports = |n: &[&Server]| n.iter().map(|s| s.ports[1].to_string()).collect::<Vec<_>>();
    script_passes(
        &python,
        da,
        "mqtt_cluster.py",
        &ports(&[&a, &b, &c]),
        &nodes,
    );
    a.printed("taken over", |l| {
        l.contains("mqtt session taken over by another node") && l.contains("dev-7")
    });
    // The fleet's QoS 0 messages reached B and C in batches for nodes.
    for (node, dir) in [(&b, &dirs[1]), (&c, &dirs[2])] {
        let metrics = node.metrics(dir);
        assert!(
            counter(
                &metrics,
                "portcullis_cluster_node_batches_total{direction=\"received\"}"
            ) >= 1,
            "{metrics}"
        );
    }
    // What the message stream keeps, against nats_kept_mib (256 MiB here), is watched.
    let metrics = a.metrics(da);
    assert!(
        metrics.contains("portcullis_cluster_kept_limit_bytes 268435456")
            && metrics.contains("portcullis_cluster_kept_bytes ")
            && metrics.contains("portcullis_cluster_kept_oldest_seconds "),
        "the kept messages' gauges:\n{metrics}"
    );

    // Revocation: dev-9's sessions on all three nodes close within a second.
    let registered = cli_json(
        da,
        &[
            "cert",
            "register",
            "--cert",
            "dev-9.pem",
            "--status",
            "ACTIVE",
        ],
    );
    let mut sessions = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let id = format!("dev-9-{i}");
        sessions.push(mosquitto(
            "mosquitto_sub",
            da,
            node,
            "dev-9",
            &["-i", &id, "-t", "devices/+/telemetry", "-W", "60"],
        ));
        node.printed("mqtt subscribe", |l| {
            l.contains("mqtt subscribe") && l.contains(&id)
        });
    }
    // And an HTTP connection on each node, answered once (so it is established and served).
    let mut https = Vec::new();
    for node in nodes {
        let mut conn = Command::new(require_tool("openssl").unwrap())
            .args([
                "s_client",
                "-quiet",
                "-connect",
                &format!("127.0.0.1:{}", node.port),
                "-cert",
                "dev-9.chain.pem",
                "-key",
                "dev-9.key",
            ])
            .current_dir(da)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        conn.stdin
            .as_mut()
            .unwrap()
            .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut out = BufReader::new(conn.stdout.take().unwrap());
        let mut status = String::new();
        out.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
        https.push((conn, out));
    }
    let started = Instant::now();
    cli(
        da,
        &[
            "cert",
            "update",
            registered["id"].as_str().unwrap(),
            "--status",
            "REVOKED",
        ],
    )
    .ok();
    for node in nodes {
        node.printed("HTTP connection closed", |l| {
            l.contains("connection closed: its certificate or domain is no longer admitted")
        });
    }
    for (i, node) in nodes.iter().enumerate() {
        let id = format!("dev-9-{i}");
        node.printed("mqtt session ended", |l| {
            l.contains("mqtt session ended") && l.contains(&id)
        });
    }
    let closed = started.elapsed();
    println!(
        "revocation closed the MQTT sessions and HTTP connections on three nodes in {closed:?}"
    );
    for (mut conn, mut out) in https {
        // The connection is gone: the rest of the stream ends.
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut rest);
        let _ = conn.wait();
    }
    assert!(closed < Duration::from_secs(1), "{closed:?}");
    for s in sessions {
        let (code, _) = finished(s);
        assert_ne!(code, Some(0), "a revoked session ended as if normally");
    }

    // kill -9 of the NATS server A is connected to: A reconnects to another, routing goes on.
    let victim = nats_server_of(&a);
    let on_victim: Vec<bool> = nodes.iter().map(|n| nats_server_of(n) == victim).collect();
    nats.kill(&victim);
    for (node, moved) in nodes.iter().zip(&on_victim) {
        if *moved {
            node.wait_for("disconnected from NATS");
            node.printed("connected to NATS again", |l| {
                l.contains("connected to NATS") && !l.contains(&format!("\"{victim}\""))
            });
        }
    }
    // A device whose CONNECT comes while JetStream elects leaders is refused ("server
    // unavailable") and connects again, as devices do.
    let mut sub = None;
    for _ in 0..10 {
        a.drain();
        let started = mosquitto(
            "mosquitto_sub",
            da,
            &a,
            "dev-1",
            &[
                "-i",
                "dev-1",
                "-t",
                "devices/+/telemetry",
                "-q",
                "1",
                "-C",
                "1",
                "-W",
                "30",
                "-v",
                // Not the retained message the paho script left.
                "-R",
            ],
        );
        let line = a.next_line("dev-1 subscribed or refused", |l| {
            l.contains(r#""message":"mqtt subscribe","client_id":"dev-1""#)
                || (l.contains("mqtt connection refused") && l.contains(r#""client_id":"dev-1""#))
        });
        if line.contains("mqtt subscribe") {
            sub = Some(started);
            break;
        }
        let _ = finished(started);
    }
    let sub = sub.expect("dev-1 could not subscribe again on A");

    // While JetStream elects new stream leaders, a publication may go unacknowledged (the
    // MQTT 3.1.1 connection is closed without PUBACK): the client sends it again, as devices do.
    let killed = Instant::now();
    let mut attempts = Vec::new();
    for _ in 0..10 {
        let sent = mosquitto(
            "mosquitto_pub",
            da,
            &c,
            "dev-3",
            &[
                "-i",
                "dev-3",
                "-t",
                "devices/dev-3/telemetry",
                "-m",
                "survived",
                "-q",
                "1",
            ],
        );
        let (code, text) = finished(sent);
        attempts.push(text);
        if code == Some(0) {
            break;
        }
    }
    println!(
        "after kill -9 of NATS server {victim}: a QoS 1 message acknowledged after {:?} ({} attempts)",
        killed.elapsed(),
        attempts.len()
    );
    assert!(attempts.len() < 10, "{attempts:?}");
    let (code, text) = finished(sub);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("survived"), "{text}");

    // kill -9 of the node holding a persistent subscriber with QoS 1 messages in flight, more
    // queued while it is away: the subscriber resumes on node B and receives every message
    // whose publisher got a PUBACK.
    let mut args = ports(&[&a, &b, &c]);
    args.push(a.child.id().to_string());
    script_passes(
        &python,
        da,
        "mqtt_cluster_persistent.py",
        &args,
        &[&a, &b, &c],
    );
    // The persistent subscriber's messages were kept: C knew of its subscription.
    let metrics = c.metrics(da);
    assert!(
        counter(
            &metrics,
            "portcullis_cluster_qos1_messages_total{path=\"kept\"}"
        ) >= 10,
        "{metrics}"
    );

    // QoS 2 exactly once across the death of node B, mid-exchange both ways (a hand-written
    // MQTT 5 client decides which acknowledgements each side saw).
    let mut args = ports(&[&b, &c]);
    args.push(b.child.id().to_string());
    script_passes(&python, da, "mqtt_cluster_qos2.py", &args, &[&c]);

    // The late store: node D learns of persistent subscriptions made elsewhere 1.5 s late (a
    // fault injected for the test), so the QoS 1 messages it takes meanwhile for a persistent
    // subscriber on C cross live, and C, whose session needed them, stores them itself. Once
    // C stored them, kill -9 of C: the session resumes on D and receives every one.
    // D sends QoS 1 messages nobody keeps live (nats_qos1_live; off on the others).
    let d = Server::start_with(
        &dirs[3],
        &config("d").replacen(
            "nats_kept_mib = 256\n",
            "nats_kept_mib = 256\nnats_qos1_live = true\n",
            1,
        ),
        &[("PORTCULLIS_TEST_INTEREST_LAG_MS", "1500")],
    );
    d.printed("JetStream streams ready", |l| {
        l.contains("JetStream streams ready")
    });
    // Until it has read that every node speaks bus protocol 3, and which QoS 1 messages the
    // cluster's persistent sessions need, a node keeps every QoS 1 message.
    d.printed("QoS 1 routed live", |l| {
        l.contains("every node reads QoS 1 messages that cross live")
    });
    d.printed("persistent subscriptions read", |l| {
        l.contains("read the persistent subscriptions and shared groups of the cluster")
    });
    d.printed("its watch current", |l| {
        l.contains("the watch of the cluster's persistent subscriptions is current")
    });
    let mut args = ports(&[&c, &d]);
    args.push(c.child.id().to_string());
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/scripts/mqtt_cluster_late.py");
    let mut late = std::process::Command::new(&python)
        .arg(&script)
        .arg("data/ca/cluster-ca.pem")
        .args(&args)
        .current_dir(da)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = std::io::BufReader::new(late.stdout.take().unwrap());
    let mut transcript = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut said, &mut line).unwrap();
        transcript.push_str(&line);
        assert!(n > 0 && !line.starts_with("FAILED"), "{transcript}");
        if line.starts_with("HOLDING") {
            break;
        }
    }
    // D sent them live; C stored every one it took live for its persistent session.
    let started = Instant::now();
    loop {
        let (dm, cm) = (d.metrics(&dirs[3]), c.metrics(&dirs[2]));
        let live = counter(&dm, "portcullis_cluster_qos1_messages_total{path=\"live\"}");
        let taken = counter(
            &cm,
            "portcullis_cluster_qos1_messages_total{path=\"kept_late\"}",
        );
        let stored = counter(
            &cm,
            "portcullis_cluster_qos1_late_stored_total{result=\"stored\"}",
        );
        if live >= 10 && taken >= 10 && stored == taken {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "live on D {live}, taken late on C {taken}, late stores {stored}:\n{cm}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    {
        use std::io::Write as _;
        let mut stdin = late.stdin.take().unwrap();
        writeln!(stdin, "go").unwrap();
    }
    std::io::Read::read_to_string(&mut said, &mut transcript).unwrap();
    let status = late.wait().unwrap();
    println!("{transcript}");
    assert!(
        status.success() && transcript.contains("ALL OK"),
        "{transcript}\n{}",
        d.lines_with("WARN").join("\n")
    );
    // The nodes killed above leave the route table (no batch is sent for them): A and B,
    // killed a while ago, by C's sweeps; else D's sweep is awaited.
    let swept = "a node is gone: its entries leave the route table";
    let mut gone = c.lines_with(swept);
    if gone.is_empty() {
        gone.push(d.printed("a node gone", |l| l.contains(swept)));
    }
    println!("{}", gone.join("\n"));
}

/// The value of the counter `series` (name and labels) in a Prometheus exposition; 0 if absent.
fn counter(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Runs `tests/cli/scripts/SCRIPT` with the cluster CA and `args`, and requires it to end with
/// `ALL OK`; a failure shows its output and the `nodes`' warnings.
fn script_passes(python: &Path, dir: &Path, script: &str, args: &[String], nodes: &[&Server]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/cli/scripts")
        .join(script);
    let mut all = vec![script.to_str().unwrap(), "data/ca/cluster-ca.pem"];
    all.extend(args.iter().map(String::as_str));
    let r = run(python, &all, dir);
    println!("{}", r.stdout);
    assert!(
        r.code == 0 && r.stdout.contains("ALL OK"),
        "{}\n{}\nthe nodes' warnings and refusals:\n{}",
        r.stdout,
        r.stderr,
        nodes
            .iter()
            .flat_map(|n| {
                let mut lines = n.lines_with("WARN");
                lines.extend(n.lines_with("refused"));
                lines
            })
            .collect::<Vec<_>>()
            .join("\n")
    );
}
