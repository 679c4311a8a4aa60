//! Two gateway nodes on one PostgreSQL server: a change through either node's admin API is in
//! effect on the other within a second, just-in-time provisioning is exactly-once across nodes,
//! and a PostgreSQL restart leaves both serving from their snapshots (not ready, writes and JIT
//! refused with a clear error) until they recover by themselves.
//!
//! The test runs its own PostgreSQL cluster (Debian's binaries, as the `postgres` user) so that
//! restarting it disturbs no other test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use portcullis_testkit::{TempDir, temp_dir};
use serde_json::Value;

use crate::control::{Auth, api, cli, cli_json, on};
use crate::serve::{Server, answer, client, curl, pki, registry_config, with_client};
use crate::*;

/// A private PostgreSQL cluster in a temporary directory, stopped on drop.
struct PrivatePostgres {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    /// Initializes and starts a cluster, when this machine can (Debian's PostgreSQL installed,
    /// running as root or as postgres); in CI it must.
    fn start() -> Option<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                versions
                    .filter_map(Result::ok)
                    .map(|v| v.path().join("bin"))
                    .filter(|b| b.join("pg_ctl").exists())
                    .max()
            });
        let whoami = Command::new("id").arg("-un").output().ok();
        let user = whoami
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let sudo = user != "root"
            && user != "postgres"
            && Command::new("sudo")
                .args(["-n", "true"])
                .status()
                .is_ok_and(|s| s.success());
        let (Some(bin), true) = (bin, user == "root" || user == "postgres" || sudo) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "the two-node test needs Debian's postgresql and to run as root or postgres"
            );
            eprintln!("SKIP: needs Debian's postgresql and root (scripts/test installs it)");
            return None;
        };
        let dir = temp_dir();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = PrivatePostgres { dir, bin, port };
        if user != "postgres" {
            let mut chown = if sudo {
                let mut c = Command::new("sudo");
                c.args(["-n", "chown"]);
                c
            } else {
                Command::new("chown")
            };
            let status = chown
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .status()
                .unwrap();
            assert!(status.success());
        }
        let data = pg.dir.path().join("data");
        pg.as_postgres(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        pg.up();
        Some(pg)
    }

    fn as_postgres(&self, tool: &str, args: &[&str]) {
        let tool = self.bin.join(tool);
        let me = Command::new("id").arg("-un").output().unwrap();
        let out = match String::from_utf8_lossy(&me.stdout).trim() {
            "root" => Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&tool)
                .args(args)
                .output()
                .unwrap(),
            "postgres" => Command::new(&tool).args(args).output().unwrap(),
            _ => Command::new("sudo")
                .args(["-n", "-u", "postgres"])
                .arg(&tool)
                .args(args)
                .output()
                .unwrap(),
        };
        assert!(
            out.status.success(),
            "{} {args:?}: {}{}",
            tool.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn up(&self) {
        let dir = self.dir.path();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            dir.display()
        );
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                dir.join("data").to_str().unwrap(),
                "-o",
                &options,
                "-l",
                dir.join("log").to_str().unwrap(),
                "-w",
                "start",
            ],
        );
    }

    fn down(&self) {
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                self.dir.path().join("data").to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        for (tool, prefix) in [
            ("runuser", &["-u", "postgres", "--"][..]),
            ("sudo", &["-n", "-u", "postgres"][..]),
        ] {
            let stopped = Command::new(tool)
                .args(prefix)
                .arg(self.bin.join("pg_ctl"))
                .args(["-D"])
                .arg(self.dir.path().join("data"))
                .args(["-m", "immediate", "stop"])
                .output()
                .is_ok_and(|o| o.status.success());
            if stopped {
                break;
            }
        }
    }
}

/// Copies the files a client needs from the first node's directory to the second's.
pub(crate) fn share(from: &Path, to: &Path, names: &[&str]) {
    for name in names {
        for ext in ["pem", "chain.pem", "key"] {
            let file = format!("{name}.{ext}");
            if from.join(&file).exists() {
                std::fs::copy(from.join(&file), to.join(&file)).unwrap();
            }
        }
    }
}

/// The newest audit sequence number, through node `d`'s admin API.
fn newest(d: &Path) -> i64 {
    cli_json(d, &["audit", "list", "--limit", "1"])["items"][0]["seq"]
        .as_i64()
        .unwrap()
}

fn status(d: &Path, s: &Server, who: &str) -> u16 {
    answer(&curl(d, s, "reg.test", "/", &with_client(&client(who)))).0
}

#[test]
fn two_nodes_on_postgres_agree_within_a_second_and_survive_a_restart() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let admin = sqlx::PgPool::connect(&pg.url("postgres")).await.unwrap();
        sqlx::query("CREATE DATABASE portcullis")
            .execute(&admin)
            .await
            .unwrap();
    });
    let tmp = temp_dir();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    pki(&da);
    let devices: Vec<String> = (1..=9).map(|i| format!("dev-{i}")).collect();
    for dev in &devices {
        leaf(&da, "client", dev, "int", &["--org", "Acme"]);
    }
    let mut shared: Vec<&str> = vec!["alice", "carol", "trust-a"];
    shared.extend(devices.iter().map(String::as_str));
    share(&da, &db, &shared);
    // One cluster key for both nodes; the server certificate itself is copied nowhere.
    portcullis(&da, &["cluster-key", "generate", "--out", "cluster.key"]).ok();
    std::fs::copy(da.join("cluster.key"), db.join("cluster.key")).unwrap();
    std::fs::create_dir_all(db.join("root")).unwrap();
    std::fs::copy(da.join("root/ca.pem"), db.join("root/ca.pem")).unwrap();
    let config = on(
        Some(&pg.url("portcullis")),
        format!(
            "cluster_key_file = \"cluster.key\"\n{}",
            registry_config(&[("reg.test", "registered")])
        ),
    );
    let a = Server::start(&da, &config);
    let b = Server::start(&db, &config);
    assert_ne!(
        curl(&db, &b, "reg.test", "/", &with_client(&client("alice"))).code,
        0
    );

    // A registration through A is in effect on B within a second, and the reverse.
    let started = Instant::now();
    let alice = cli_json(
        &da,
        &[
            "cert",
            "register",
            "--cert",
            "alice.pem",
            "--status",
            "ACTIVE",
        ],
    );
    b.wait_for_marker(newest(&da));
    let a_to_b = started.elapsed();
    assert_eq!(status(&db, &b, "alice"), 200);
    let started = Instant::now();
    cli(
        &db,
        &[
            "cert",
            "update",
            alice["id"].as_str().unwrap(),
            "--status",
            "REVOKED",
        ],
    )
    .ok();
    a.wait_for_marker(newest(&db));
    let b_to_a = started.elapsed();
    assert_ne!(
        curl(&da, &a, "reg.test", "/", &with_client(&client("alice"))).code,
        0
    );
    println!("propagation between nodes: A->B {a_to_b:?}, B->A {b_to_a:?}");
    assert!(a_to_b.as_millis() < 1000 && b_to_a.as_millis() < 1000);

    // A server certificate imported through A and a domain put on A are served by B within a
    // second, with the same certificate, though B's disk has neither file.
    cli_json(
        &da,
        &[
            "server-cert",
            "import",
            "srv",
            "--cert",
            "srv.chain.pem",
            "--key",
            "srv.key",
        ],
    );
    std::fs::write(
        da.join("srv.toml"),
        "hostname = \"srv.test\"\ncertificate = \"registry:srv\"\n[mtls]\nmode = \"required\"\n\
         truststore = \"trust-a.pem\"\n[[mapping]]\nupstream = \"builtin:echo\"\n",
    )
    .unwrap();
    // B reloads for the import (a configuration change) first.
    assert!(crate::control::wait_for_registry_reload(&b).contains("\"result\":\"ok\""));
    let started = Instant::now();
    cli_json(&da, &["domain", "put", "--file", "srv.toml"]);
    assert!(crate::control::wait_for_registry_reload(&b).contains("\"result\":\"ok\""));
    let put_to_b = started.elapsed();
    assert!(!db.join("srv.key").exists() && !db.join("srv.chain.pem").exists());
    let alice_files = client("alice");
    let mut args = with_client(&alice_files);
    args.extend(["--cacert", "root/ca.pem"]);
    let served = curl(&db, &b, "srv.test", "/x", &args);
    let (code, body) = answer(&served);
    assert_eq!(
        code, 200,
        "served with srv's chain (the truststore alone decides here): {body} {}",
        served.stderr
    );
    println!(
        "a domain with a registry server certificate, put on A, served by B after {put_to_b:?}"
    );
    assert!(put_to_b.as_millis() < 1000);

    // An `auto` domain is issued one certificate for the cluster, by its shared CA: both nodes
    // serve the same one, and clients of either node trust the same CA file.
    std::fs::write(
        da.join("auto.toml"),
        "hostname = \"auto.test\"\ncertificate = \"auto\"\n[mtls]\nmode = \"required\"\n\
         truststore = \"trust-a.pem\"\n[[mapping]]\nupstream = \"builtin:echo\"\n",
    )
    .unwrap();
    cli_json(&da, &["domain", "put", "--file", "auto.toml"]);
    // Each node runs a configuration that includes the domain (and its certificate, recorded
    // before it).
    let put = newest(&da);
    a.wait_for_config(put);
    b.wait_for_config(put);
    assert_eq!(
        std::fs::read(da.join("data/ca/cluster-ca.pem")).unwrap(),
        std::fs::read(db.join("data/ca/cluster-ca.pem")).unwrap()
    );
    let served_by = |dir: &Path, server: &Server| {
        let mut args = with_client(&alice_files);
        args.extend(["--cacert", "data/ca/cluster-ca.pem"]);
        let run = curl(dir, server, "auto.test", "/x", &args);
        assert_eq!(answer(&run).0, 200, "{}", run.stderr);
        let connect = format!("127.0.0.1:{}", server.port);
        let shown = openssl(
            dir,
            &[
                "s_client",
                "-connect",
                &connect,
                "-servername",
                "auto.test",
                "-cert",
                "alice.chain.pem",
                "-key",
                "alice.key",
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
    };
    let (on_a, on_b) = (served_by(&da, &a), served_by(&db, &b));
    assert_eq!(on_a, on_b, "the same certificate on both nodes");
    let autos = cli_json(&db, &["server-cert", "list"]);
    assert!(autos.to_string().contains("auto:auto.test"), "{autos}");

    // `cluster status` lists both nodes, alive and caught up once each heartbeat reports the
    // newest change, and each node measured commit → enforced.
    let newest_change = newest(&da);
    a.wait_for_heartbeat(newest_change);
    b.wait_for_heartbeat(newest_change);
    let cluster = cli_json(&db, &["cluster", "status"]);
    let nodes = cluster["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{cluster}");
    for n in nodes {
        assert_eq!(n["stale"], false, "{cluster}");
        assert_eq!(n["changes_behind"], 0, "{cluster}");
        assert_eq!(n["version"], format!("{}+bus.5", env!("CARGO_PKG_VERSION")));
    }
    // One admin CA for the cluster: B's admin client certificate is accepted by A, and A's by B.
    let (code, body) = api(&db, &a, "GET", "/v1/cluster", None, Auth::Certificate);
    assert_eq!(code, 200, "B's admin certificate on A: {body}");
    let (code, body) = api(&da, &b, "GET", "/v1/cluster", None, Auth::Certificate);
    assert_eq!(code, 200, "A's admin certificate on B: {body}");
    let text = cli(&da, &["cluster", "status"]).ok().stdout;
    assert_eq!(text.matches(" up ").count(), 2, "{text}");
    for (dir, node) in [(&da, &a), (&db, &b)] {
        let metrics = node.metrics(dir);
        let count = metrics
            .lines()
            .find(|l| l.starts_with("portcullis_registry_change_enforce_seconds_count"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(count > 0.0, "no enforcement measured:\n{metrics}");
    }

    // Just-in-time provisioning is exactly-once across nodes: each device connects to both
    // nodes at the same moment, and both connections are served.
    std::fs::write(
        da.join("template.json"),
        r#"{"thing_name": "${Certificate.Subject.CommonName}"}"#,
    )
    .unwrap();
    cli(
        &da,
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
    b.wait_for_marker(newest(&da));
    a.wait_for_marker(newest(&da));
    let (pa, pb) = (a.port, b.port);
    std::thread::scope(|scope| {
        for dev in &devices[..8] {
            let (da, db) = (&da, &db);
            let one = scope.spawn(move || {
                answer(&crate::serve::curl_port(
                    da,
                    pa,
                    "reg.test",
                    "/",
                    &with_client(&client(dev)),
                ))
                .0
            });
            let two = scope.spawn(move || {
                answer(&crate::serve::curl_port(
                    db,
                    pb,
                    "reg.test",
                    "/",
                    &with_client(&client(dev)),
                ))
                .0
            });
            assert_eq!(
                (one.join().unwrap(), two.join().unwrap()),
                (200, 200),
                "{dev}"
            );
        }
    });
    let provisioned = cli_json(
        &da,
        &[
            "audit",
            "list",
            "--action",
            "certificate.provision",
            "--limit",
            "100",
        ],
    );
    assert_eq!(
        provisioned["items"].as_array().unwrap().len(),
        8,
        "each device provisioned once: {provisioned}"
    );

    // PostgreSQL goes away: both nodes keep serving from their snapshots, say they are not
    // ready, and refuse admin writes and just-in-time registrations with a clear error.
    pg.down();
    b.wait_for("the registry database cannot be reached");
    a.wait_for("the registry database cannot be reached");
    assert_eq!(status(&db, &b, "dev-1"), 200, "served from the snapshot");
    assert_eq!(status(&da, &a, "dev-2"), 200, "served from the snapshot");
    let (code, _) = api(&db, &b, "GET", "/readyz", None, Auth::Certificate);
    assert_eq!(code, 503);
    let refused = cli(
        &da,
        &[
            "cert",
            "register",
            "--cert",
            "carol.pem",
            "--status",
            "ACTIVE",
        ],
    );
    assert_eq!(refused.code, 3, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("cannot be reached"),
        "{}",
        refused.stderr
    );
    assert_ne!(
        curl(&db, &b, "reg.test", "/", &with_client(&client("dev-9"))).code,
        0
    );
    let closed = b.wait_for("just-in-time provisioning failed");
    assert!(closed.contains("cannot be reached"), "{closed}");

    // It comes back: both recover by themselves and follow changes again.
    pg.up();
    b.wait_for("the registry database is reachable again");
    a.wait_for("the registry database is reachable again");
    // Ready again once resynchronized (a snapshot older than snapshot_stale_after_secs is not).
    b.wait_for("registry snapshot refreshed");
    let (code, _) = api(&db, &b, "GET", "/readyz", None, Auth::Certificate);
    assert_eq!(code, 200);
    cli(
        &da,
        &[
            "cert",
            "register",
            "--cert",
            "carol.pem",
            "--status",
            "ACTIVE",
        ],
    )
    .ok();
    b.wait_for_marker(newest(&da));
    assert_eq!(status(&db, &b, "carol"), 200);
    assert_eq!(status(&db, &b, "dev-9"), 200, "JIT works again");
    let _: Value = cli_json(&db, &["thing", "describe", "dev-9"]);
}
