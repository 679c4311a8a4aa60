//! Fleet provisioning by claim, driven by AWS's device SDK (awsiotsdk): templates and claim
//! certificates made with the CLI, the device side exactly as the SDK's sample does it, and the
//! registry checked afterwards (things, statuses, policies, audit, nothing half-made).

use std::path::Path;

use crate::control::{cli, cli_json, wait_for_snapshot};
use crate::mqtt::awsiot_python;
use crate::serve::{Server, curl_port};
use crate::{intermediate, leaf, portcullis, root};
use portcullis_testkit::{require_tool, run, temp_dir};

const TEMPLATE: &str = r#"{
  "thing_name": "sensor-${param:SerialNumber}",
  "attributes": {"serial": "${param:SerialNumber}", "model": "${param:Model}"},
  "parameters": {"SerialNumber": {"max_length": 16}, "Model": {"default": "m1"}},
  "policies": ["devices"],
  "device_configuration": {"Fallback": "https://fallback.example"}
}"#;

const DEVICES: &str = r#"{"Statement": [
  {"Effect": "Allow", "Action": "mqtt:Connect", "Resource": "client:${thing:Name}"},
  {"Effect": "Allow", "Action": "mqtt:Publish", "Resource": "topic:devices/${thing:Name}/*"}]}"#;

/// The whole claim flow with the SDK; the claim certificate refused everywhere else.
#[test]
fn a_device_with_a_claim_certificate_provisions_itself_with_the_aws_device_sdk() {
    let Some(python) = awsiot_python() else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    root(d);
    intermediate(d, "int", "root");
    leaf(d, "client", "claim-1", "int", &[]);
    // The local CA exists before the node starts, so the domain can trust what it issues.
    portcullis(
        d,
        &[
            "pki", "ca", "create", "--cn", "Local CA", "--out", "data/ca",
        ],
    )
    .ok();
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(d.join("root/ca.pem")).unwrap(),
        std::fs::read_to_string(d.join("data/ca/ca.pem")).unwrap()
    );
    std::fs::write(d.join("trust.pem"), bundle).unwrap();
    let config = "[admin]\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"mqtt\"]\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\"]\n\
         [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\nregistry_mode = \"registered\"\n\
         [domain.mtls]\nmode = \"required\"\ntruststore = \"trust.pem\"\n\
         [[domain.mapping]]\nupstream = \"builtin:echo\"\n";
    let s = Server::start(d, config);

    std::fs::write(d.join("devices.json"), DEVICES).unwrap();
    cli(
        d,
        &["policy", "create", "devices", "--document", "devices.json"],
    )
    .ok();
    std::fs::write(d.join("factory.json"), TEMPLATE).unwrap();
    let created = cli_json(
        d,
        &[
            "provisioning-template",
            "create",
            "factory",
            "--file",
            "factory.json",
            "--description",
            "sensors from line 7",
        ],
    );
    assert_eq!(created["enabled"], true, "{created}");
    cli(
        d,
        &[
            "provisioning-template",
            "create",
            "retired",
            "--file",
            "factory.json",
            "--disabled",
        ],
    )
    .ok();
    // Bad templates are refused when stored, saying what is wrong.
    std::fs::write(d.join("bad.json"), r#"{"thing_name": "x-${param:Serial}"}"#).unwrap();
    let bad = cli(
        d,
        &[
            "provisioning-template",
            "create",
            "bad",
            "--file",
            "bad.json",
        ],
    );
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("not declared"), "{}", bad.stderr);

    let claim = cli_json(
        d,
        &[
            "cert",
            "register",
            "--cert",
            "claim-1.chain.pem",
            "--status",
            "ACTIVE",
        ],
    );
    let claim_id = claim["id"].as_str().unwrap().to_string();
    let marked = cli_json(
        d,
        &["cert", "claim", &claim_id, "--templates", "factory,retired"],
    );
    assert_eq!(marked["claim_templates"][0], "factory", "{marked}");
    wait_for_snapshot(d, &s);

    // A claim certificate is never forwarded over HTTPS.
    let r = curl_port(
        d,
        s.ports[1],
        "localhost",
        "/",
        &[
            "--cert",
            "claim-1.chain.pem",
            "--key",
            "claim-1.key",
            "-w",
            "%{http_code}",
        ],
    );
    assert!(r.stdout.ends_with("403"), "{}", r.stdout);
    assert!(r.stdout.contains("claim-certificate"), "{}", r.stdout);

    // The device's key and CSR, made with openssl as the AWS guides do.
    let openssl = require_tool("openssl").unwrap();
    let made = run(
        &openssl,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "device.key",
            "-out",
            "device.csr",
            "-subj",
            "/CN=sensor-A1",
        ],
        d,
    );
    assert_eq!(made.code, 0, "{}", made.stderr);

    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/scripts/fleet_provisioning.py");
    let r = run(
        &python,
        &[script.to_str().unwrap(), &s.ports[0].to_string()],
        d,
    );
    println!("{}", r.stdout);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("ALL OK"), "{}", r.stdout);

    // The registry: each thing with one ACTIVE certificate and the template's policy.
    for (thing, serial) in [("sensor-A1", "A1"), ("sensor-B2", "B2")] {
        let t = cli_json(d, &["thing", "describe", thing]);
        assert_eq!(t["attributes"]["serial"], serial, "{t}");
        let certs = t["certificates"].as_array().unwrap();
        assert_eq!(certs.len(), 1, "{t}");
        let id = certs[0]["certificate_id"].as_str().unwrap();
        let c = cli_json(d, &["cert", "describe", id]);
        assert_eq!(c["status"], "ACTIVE", "{c}");
    }
    let t = cli_json(d, &["thing", "describe", "sensor-A1"]);
    assert_eq!(t["attributes"]["model"], "m2", "{t}");
    let policy = cli_json(d, &["policy", "get", "devices"]);
    assert!(
        policy.to_string().contains("sensor-A1") && policy.to_string().contains("sensor-B2"),
        "{policy}"
    );
    // The claim certificate's publish elsewhere was denied by its built-in policy.
    assert!(
        s.wait_for("mqtt publish denied")
            .contains("devices/sensor-A1/telemetry")
    );
    // Every step is audited: the refusals too.
    let audit = cli_json(d, &["audit", "list", "--limit", "100"]).to_string();
    for action in [
        "certificate.fleet-create",
        "certificate.provision",
        "certificate.provision-refused",
        "certificate.claim",
        "provisioning-template.create",
    ] {
        assert!(audit.contains(action), "{action} not in the audit log");
    }
    // Nothing else was made: two things from the template, no certificate left pending.
    let pending = cli_json(d, &["cert", "list", "--status", "PENDING_ACTIVATION"]);
    assert_eq!(pending["items"].as_array().unwrap().len(), 0, "{pending}");

    // The claim certificate made ordinary again may not provision any more.
    let cleared = cli_json(d, &["cert", "claim", &claim_id, "--clear"]);
    assert!(cleared.get("claim_templates").is_none(), "{cleared}");
    let listed = cli_json(d, &["provisioning-template", "list"]);
    assert_eq!(listed["items"].as_array().unwrap().len(), 2, "{listed}");
}
