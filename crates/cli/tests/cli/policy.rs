//! Policies end to end: documents with certificate and thing variables scope partners to their
//! own routes, explicit Deny wins, changes reach open connections, simulate and explain say
//! which statement decided. On SQLite and on PostgreSQL.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use portcullis_testkit::{require_tool, temp_dir};
use serde_json::Value;

use crate::control::{cli, cli_json, fresh_postgres, on, wait_for_snapshot};
use crate::serve::{Server, answer, client, curl, pki, with_client};
use crate::*;

const PARTNER_POLICY: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    {"Sid": "own-routes", "Effect": "Allow", "Action": ["http:GET", "http:POST", "http:DELETE"],
     "Resource": "route:api.test/partners/${cert:Subject.O}/*"},
    {"Sid": "no-deletes", "Effect": "Deny", "Action": "http:DELETE", "Resource": "route:api.test/*"}
  ]
}"#;

fn config() -> String {
    "[admin]\naddress = \"127.0.0.1:0\"\n\n[[listener]]\naddress = \"127.0.0.1:0\"\n\n\
     [[domain]]\nhostname = \"api.test\"\ncertificate = \"auto\"\n\
     [domain.mtls]\nmode = \"required\"\ntruststore = \"trust-a.pem\"\n\
     [[domain.mapping]]\nbase_path = \"/public\"\nupstream = \"builtin:echo\"\n\
     [[domain.mapping]]\nbase_path = \"\"\nupstream = \"builtin:echo\"\nauthorization = \"policy\"\n"
        .to_string()
}

/// GET (or another method) as a partner: (status, body).
fn call(d: &Path, s: &Server, who: &str, method: &str, path: &str) -> (u16, Value) {
    let c = client(who);
    let mut args = with_client(&c);
    args.extend(["-X", method, "--path-as-is"]);
    answer(&curl(d, s, "api.test", path, &args))
}

#[test]
fn policies_scope_partners_to_their_own_routes() {
    policies_scenario(None);
}

#[test]
fn policies_scope_partners_to_their_own_routes_on_postgres() {
    if let Some(database) = fresh_postgres("policies") {
        policies_scenario(Some(&database));
    }
}

fn policies_scenario(database: Option<&str>) {
    let Some(python) = require_tool("python3") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    leaf(d, "client", "acme-1", "int", &["--org", "Acme"]);
    leaf(d, "client", "globex-1", "int", &["--org", "Globex"]);
    let s = Server::start(d, &on(database, config()));

    // No policy: the policy route refuses, the other one serves.
    let (status, body) = call(d, &s, "acme-1", "GET", "/partners/Acme/orders");
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("policy-denied")),
        "{body}"
    );
    assert_eq!(call(d, &s, "acme-1", "GET", "/public/x").0, 200);

    // Bad documents are refused with the statement and field.
    std::fs::write(
        d.join("bad.json"),
        r#"{"Statement": [{"Effect": "Allow", "Action": "http:GET", "Resource": "route:x/*"},
                          {"Effect": "Allow", "Action": "ftp:Get", "Resource": "route:x/*"}]}"#,
    )
    .unwrap();
    assert_clean_error(
        &cli(d, &["policy", "create", "bad", "--document", "bad.json"]),
        2,
        "Statement[1].Action: unknown action",
    );
    std::fs::write(
        d.join("bad.json"),
        r#"{"Statement": {"Effect": "Allow", "Action": "http:GET", "Resource": "route:x/${cert:Nope}"}}"#,
    )
    .unwrap();
    assert_clean_error(
        &cli(d, &["policy", "create", "bad", "--document", "bad.json"]),
        2,
        "Statement[0].Resource: unknown variable ${cert:Nope}",
    );

    // Duplicate keys would otherwise drop a condition silently.
    std::fs::write(
        d.join("bad.json"),
        r#"{"Statement": {"Effect": "Allow", "Action": "http:GET", "Resource": "route:x/*",
            "Condition": {"StringEquals": {"cert:Subject.OU": "a"}, "StringEquals": {"cert:Subject.O": "b"}}}}"#,
    )
    .unwrap();
    assert_clean_error(
        &cli(d, &["policy", "create", "bad", "--document", "bad.json"]),
        2,
        "StringEquals",
    );

    // The partner policy on the domain: each partner reaches its own routes only.
    std::fs::write(d.join("partner.json"), PARTNER_POLICY).unwrap();
    let created = cli_json(
        d,
        &["policy", "create", "partner", "--document", "partner.json"],
    );
    assert_eq!(created["default_version"], 1);
    cli(d, &["policy", "attach", "partner", "--domain", "api.test"]).ok();
    wait_for_snapshot(d, &s);
    let (status, body) = call(d, &s, "acme-1", "GET", "/partners/Acme/orders");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/partners/Acme/orders", "{body}");
    assert_eq!(
        call(d, &s, "globex-1", "GET", "/partners/Globex/orders").0,
        200
    );
    let (status, body) = call(d, &s, "acme-1", "GET", "/partners/Globex/orders");
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("policy-denied")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("no statement"),
        "{body}"
    );
    // Explicit Deny wins over the Allow.
    let (status, body) = call(d, &s, "acme-1", "DELETE", "/partners/Acme/orders");
    assert_eq!(status, 403, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("no-deletes"),
        "{body}"
    );
    // Paths that could mean another route to the upstream are refused.
    for path in [
        "/partners/Acme/../Globex/orders",
        "/partners/Acme/%2e%2e/Globex/orders",
        "/partners/Acme%2f..%2fGlobex/orders",
        "/partners//Acme/orders",
        "/partners/Acme;x/orders",
        // Routes to /public raw but to the policy mapping decoded, or the reverse.
        "/%70ublic/x",
    ] {
        let (status, body) = call(d, &s, "acme-1", "GET", path);
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("ambiguous-path")),
            "{path}: {body}"
        );
    }
    let denied = s.wait_for("\"denied\":\"denied by statement");
    assert!(denied.contains("no-deletes"), "{denied}");

    // simulate and explain name the statement and the variables.
    let sim = cli(
        d,
        &[
            "policy",
            "simulate",
            "--cert",
            "acme-1.chain.pem",
            "--action",
            "http:GET",
            "--resource",
            "route:api.test/partners/Acme/x",
            "--json",
        ],
    )
    .ok();
    let sim: Value = serde_json::from_str(&sim.stdout).unwrap();
    assert_eq!(sim["decision"], "allow", "{sim}");
    assert_eq!(sim["statement"]["sid"], "own-routes", "{sim}");
    assert_eq!(sim["variables"]["cert:Subject.O"][0], "Acme", "{sim}");
    let denied = cli(
        d,
        &[
            "policy",
            "simulate",
            "--cert",
            "acme-1.chain.pem",
            "--action",
            "http:GET",
            "--resource",
            "route:api.test/partners/Globex/x",
        ],
    );
    assert_eq!(denied.code, 1, "{}", denied.stderr);
    assert!(
        denied.stdout.contains("decision:    DENY"),
        "{}",
        denied.stdout
    );
    let explained = cli(
        d,
        &[
            "explain",
            "--domain",
            "api.test",
            "--method",
            "DELETE",
            "--path",
            "/partners/Acme/x",
            "acme-1.chain.pem",
            "--json",
        ],
    );
    assert_eq!(explained.code, 1, "{}", explained.stderr);
    let trace: Value = serde_json::from_str(&explained.stdout).unwrap();
    assert_eq!(trace["outcome"]["code"], "policy-denied", "{trace}");
    assert_eq!(trace["policy"]["statement"]["sid"], "no-deletes", "{trace}");

    // Thing attributes as variables: a second policy on the thing acme-1 is attached to.
    let registered = cli_json(
        d,
        &[
            "cert",
            "register",
            "--cert",
            "acme-1.pem",
            "--status",
            "ACTIVE",
        ],
    );
    let id = registered["id"].as_str().unwrap().to_string();
    cli(d, &["thing", "create", "acme-gw", "--attr", "tier=gold"]).ok();
    cli(d, &["thing", "attach", "acme-gw", &id]).ok();
    std::fs::write(
        d.join("tier.json"),
        r#"{"Statement": [{"Effect": "Allow", "Action": "http:*", "Resource": "route:api.test/tiers/${thing:Attribute.tier}/*"}]}"#,
    )
    .unwrap();
    cli(d, &["policy", "create", "tier", "--document", "tier.json"]).ok();
    cli(d, &["policy", "attach", "tier", "--thing", "acme-gw"]).ok();
    wait_for_snapshot(d, &s);
    assert_eq!(call(d, &s, "acme-1", "GET", "/tiers/gold/x").0, 200);
    assert_eq!(call(d, &s, "acme-1", "GET", "/tiers/silver/x").0, 403);
    assert_eq!(call(d, &s, "globex-1", "GET", "/tiers/gold/x").0, 403);

    // A CA's policies apply to the certificates registered with it.
    let ca = cli_json(
        d,
        &[
            "ca",
            "register",
            "--cert",
            "int/ca.pem",
            "--no-verification",
            "--activate",
        ],
    );
    let globex = cli_json(
        d,
        &[
            "cert",
            "register",
            "--cert",
            "globex-1.pem",
            "--status",
            "ACTIVE",
        ],
    );
    assert_eq!(globex["ca_id"], ca["id"], "{globex}");
    std::fs::write(
        d.join("ca-wide.json"),
        r#"{"Statement": [{"Effect": "Allow", "Action": "http:GET", "Resource": "route:api.test/ca-wide/*"}]}"#,
    )
    .unwrap();
    cli(
        d,
        &["policy", "create", "ca-wide", "--document", "ca-wide.json"],
    )
    .ok();
    cli(
        d,
        &[
            "policy",
            "attach",
            "ca-wide",
            "--ca",
            ca["id"].as_str().unwrap(),
        ],
    )
    .ok();
    wait_for_snapshot(d, &s);
    assert_eq!(call(d, &s, "globex-1", "GET", "/ca-wide/x").0, 200);
    assert_eq!(
        call(d, &s, "acme-1", "GET", "/ca-wide/x").0,
        403,
        "registered before the CA, so not linked to it"
    );

    // A change reaches an open keep-alive connection: version 2 of the partner policy (read
    // only) becomes the default while the connection stays open.
    let script = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile="data/ca/ca.pem")
ctx.load_cert_chain("acme-1.chain.pem", "acme-1.key")
ctx.set_alpn_protocols(["http/1.1"])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[1]))), server_hostname="api.test")
f = s.makefile("rb")
for line in sys.stdin:
    method, path = line.split()
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode())
    status = f.readline().split()[1].decode()
    length = 0
    while True:
        h = f.readline()
        if h in (b"\r\n", b""):
            break
        if h.lower().startswith(b"content-length:"):
            length = int(h.split(b":")[1])
    f.read(length)
    print(status, flush=True)
"#;
    std::fs::write(d.join("keepalive.py"), script).unwrap();
    let mut py = Command::new(&python)
        .args(["keepalive.py", &s.port.to_string()])
        .current_dir(d)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = py.stdin.take().unwrap();
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    let mut ask = |method: &str, path: &str| -> String {
        writeln!(stdin, "{method} {path}").unwrap();
        lines.next().unwrap().unwrap()
    };
    assert_eq!(ask("POST", "/partners/Acme/orders"), "200");
    std::fs::write(
        d.join("read-only.json"),
        PARTNER_POLICY.replace(
            r#"["http:GET", "http:POST", "http:DELETE"]"#,
            r#""http:GET""#,
        ),
    )
    .unwrap();
    let v2 = cli_json(
        d,
        &[
            "policy",
            "create-version",
            "partner",
            "--document",
            "read-only.json",
            "--set-default",
        ],
    );
    assert_eq!(v2["default_version"], 2, "{v2}");
    wait_for_snapshot(d, &s);
    assert_eq!(
        ask("POST", "/partners/Acme/orders"),
        "403",
        "same connection, new policy"
    );
    assert_eq!(ask("GET", "/partners/Acme/orders"), "200");
    drop(stdin);
    let _ = py.wait();

    // Versions: at most five; the default cannot be deleted; an attached policy cannot be.
    for _ in 0..3 {
        cli(
            d,
            &[
                "policy",
                "create-version",
                "partner",
                "--document",
                "partner.json",
            ],
        )
        .ok();
    }
    assert_clean_error(
        &cli(
            d,
            &[
                "policy",
                "create-version",
                "partner",
                "--document",
                "partner.json",
            ],
        ),
        2,
        "5 versions",
    );
    assert_clean_error(
        &cli(
            d,
            &["policy", "delete-version", "partner", "--version", "2"],
        ),
        2,
        "default",
    );
    cli(
        d,
        &["policy", "delete-version", "partner", "--version", "1"],
    )
    .ok();
    assert_clean_error(&cli(d, &["policy", "delete", "partner"]), 2, "detach");
    let got = cli_json(d, &["policy", "get", "partner"]);
    let versions: Vec<i64> = got["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [2, 3, 4, 5]);
    cli(d, &["policy", "detach", "partner", "--domain", "api.test"]).ok();
    cli(d, &["policy", "delete", "partner"]).ok();
    wait_for_snapshot(d, &s);
    assert_eq!(call(d, &s, "acme-1", "GET", "/partners/Acme/orders").0, 403);
    let listed = cli_json(d, &["policy", "list"]);
    assert_eq!(listed["items"].as_array().unwrap().len(), 2, "{listed}");
}
