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

/// A pre-provisioning hook (Python): checks each call's signature against `hook-secret.txt`,
/// refuses serial X9, lets others register with Model overridden; prints each call as JSON.
const HOOK: &str = r#"
import hashlib, hmac, http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        secret = open("hook-secret.txt").read().strip().encode()
        ts = self.headers.get("x-portcullis-timestamp", "")
        want = "v1=" + hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        valid = hmac.compare_digest(want, self.headers.get("x-portcullis-signature", ""))
        call = json.loads(body)
        print(json.dumps({"valid": valid, "event": self.headers.get("x-portcullis-event"),
                          "call": call}), flush=True)
        if not valid:
            answer = {"allowProvisioning": False}
        elif call["parameters"].get("SerialNumber") == "X9":
            answer = {"allowProvisioning": False}
        else:
            answer = {"allowProvisioning": True, "parameterOverrides": {"Model": "hooked"}}
        out = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// The local CA made before the node starts (the node uses an existing `data/ca`), and
/// `trust.pem` holding the test root and it: the domain trusts claims from the root's CAs and
/// the certificates the node issues.
fn trust_root_and_local_ca(d: &Path) {
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
}

/// An echo request with `cert` and `key` on `port`, asserted served (200); its answer.
fn served(d: &Path, port: u16, cert: &str, key: &str) -> portcullis_testkit::Run {
    let r = curl_port(d, port, "localhost", "/", &["--cert", cert, "--key", key]);
    assert!(
        r.stdout.rsplit('\n').next().unwrap().starts_with("200 "),
        "{cert}: {}",
        r.stdout
    );
    r
}

/// A P-256 key and a CSR for `subject`, made by `openssl req` as the AWS guides and RFC 7030's
/// examples do (PEM files `key` and `csr` in `d`).
fn new_csr(
    openssl: &Path,
    d: &Path,
    key: &str,
    csr: &str,
    subject: &str,
) -> portcullis_testkit::Run {
    run(
        openssl,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key,
            "-out",
            csr,
            "-subj",
            subject,
        ],
        d,
    )
}

/// A child process killed when dropped (a failing test leaves nothing running).
pub(crate) struct Killed(pub(crate) std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
    // A factory CA whose every certificate is a claim (registered or not).
    intermediate(d, "factory", "root");
    leaf(d, "client", "claim-2", "factory", &[]);
    trust_root_and_local_ca(d);
    let config = "[admin]\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"mqtt\"]\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\"]\n\
         [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\nregistry_mode = \"registered\"\n\
         [domain.mtls]\nmode = \"required\"\ntruststore = \"trust.pem\"\n\
         [[domain.mapping]]\nupstream = \"builtin:echo\"\n\
         [[domain.mapping]]\nbase_path = \"/provisioning\"\nupstream = \"builtin:provisioning\"\n";
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
        &[
            "cert",
            "claim",
            &claim_id,
            "--templates",
            "factory,retired,hooked",
        ],
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
    let made = new_csr(&openssl, d, "device.key", "device.csr", "/CN=sensor-A1");
    assert_eq!(made.code, 0, "{}", made.stderr);

    let made = new_csr(&openssl, d, "renew.key", "renew.csr", "/CN=sensor-A1");
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

    // The registry: each thing with one ACTIVE certificate and the template's policy; sensor-A1
    // renewed over MQTT, its first certificate retired once the renewal was seen.
    s.printed("a renewed certificate retired", |l| {
        l.contains("a renewed certificate retired")
    });
    for (thing, serial, count) in [("sensor-A1", "A1", 2), ("sensor-B2", "B2", 1)] {
        let t = cli_json(d, &["thing", "describe", thing]);
        assert_eq!(t["attributes"]["serial"], serial, "{t}");
        let certs = t["certificates"].as_array().unwrap();
        assert_eq!(certs.len(), count, "{t}");
        let active = certs
            .iter()
            .filter(|c| {
                let id = c["certificate_id"].as_str().unwrap();
                cli_json(d, &["cert", "describe", id])["status"] == "ACTIVE"
            })
            .count();
        assert_eq!(active, 1, "{thing}: {t}");
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
        s.printed("mqtt publish denied", |l| l.contains("mqtt publish denied"))
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

    // The same over HTTPS (builtin:provisioning), for devices without MQTT: the MQTT API's
    // payloads, the rejection's status.
    let made = new_csr(&openssl, d, "web.key", "web.csr", "/CN=sensor-C3");
    assert_eq!(made.code, 0, "{}", made.stderr);
    let csr = std::fs::read_to_string(d.join("web.csr")).unwrap();
    std::fs::write(
        d.join("csr.json"),
        serde_json::json!({"certificateSigningRequest": csr}).to_string(),
    )
    .unwrap();
    let post = |path: &str, file: &str, who: &str, key: &str| {
        let r = curl_port(
            d,
            s.ports[1],
            "localhost",
            path,
            &[
                "--cert",
                who,
                "--key",
                key,
                "-X",
                "POST",
                "--data-binary",
                &format!("@{file}"),
                "-H",
                "content-type: application/json",
            ],
        );
        let (body, status) = r.stdout.rsplit_once('\n').unwrap();
        let code = status.split_whitespace().next().unwrap().to_string();
        (
            code,
            serde_json::from_str::<serde_json::Value>(body).unwrap_or_default(),
        )
    };
    let (code, created) = post(
        "/provisioning/certificates/create-from-csr",
        "csr.json",
        "claim-1.chain.pem",
        "claim-1.key",
    );
    assert_eq!(code, "200", "{created}");
    let token = created["certificateOwnershipToken"].as_str().unwrap();
    std::fs::write(
        d.join("register.json"),
        serde_json::json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": "C3"}})
            .to_string(),
    )
    .unwrap();
    let register = "/provisioning/provisioning-templates/factory/provision";
    let (code, thing) = post(
        register,
        "register.json",
        "claim-1.chain.pem",
        "claim-1.key",
    );
    assert_eq!(
        (code.as_str(), &thing["thingName"]),
        ("200", &serde_json::json!("sensor-C3")),
        "{thing}"
    );
    let (code, again) = post(
        register,
        "register.json",
        "claim-1.chain.pem",
        "claim-1.key",
    );
    assert_eq!(code, "400", "{again}");
    assert_eq!(
        again["errorCode"], "InvalidCertificateOwnershipToken",
        "{again}"
    );
    // CSRs the registry would misread or that are weak are refused in IoT Core's terms.
    for (args, why) in [
        (
            vec![
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-subj",
                "/CN=dev*",
            ],
            "separator",
        ),
        (vec!["-newkey", "rsa:1024", "-subj", "/CN=weak"], "key"),
    ] {
        let mut all = vec![
            "req", "-new", "-nodes", "-keyout", "bad.key", "-out", "bad.csr",
        ];
        all.extend(args);
        assert_eq!(run(&openssl, &all, d).code, 0);
        let csr = std::fs::read_to_string(d.join("bad.csr")).unwrap();
        std::fs::write(
            d.join("bad.json"),
            serde_json::json!({"certificateSigningRequest": csr}).to_string(),
        )
        .unwrap();
        let (code, refused) = post(
            "/provisioning/certificates/create-from-csr",
            "bad.json",
            "claim-1.chain.pem",
            "claim-1.key",
        );
        assert_eq!(code, "400", "{why}: {refused}");
        assert_eq!(refused["errorCode"], "InvalidCsr", "{why}: {refused}");
    }
    // A claim cannot mint a certificate with a registered device's subject (csr.json is
    // sensor-C3's, registered above): another device's identity is not for the taking.
    let (code, refused) = post(
        "/provisioning/certificates/create-from-csr",
        "csr.json",
        "claim-1.chain.pem",
        "claim-1.key",
    );
    assert_eq!(code, "400", "{refused}");
    assert!(
        refused["errorMessage"]
            .as_str()
            .unwrap_or_default()
            .contains("held by a registered certificate"),
        "{refused}"
    );
    // A device's own certificate has no policy naming the provisioning topics; the one it
    // renewed is INACTIVE now and does not get past the handshake.
    let (code, denied) = post(
        "/provisioning/certificates/create",
        "csr.json",
        "renewed.pem",
        "renew.key",
    );
    assert_eq!(code, "403", "{denied}");
    let (code, _) = post(
        "/provisioning/certificates/create",
        "csr.json",
        "device.pem",
        "device.key",
    );
    assert_eq!(code, "000", "the renewed certificate is retired");

    // A pre-provisioning hook (a webhook subscribed to provisioning.pre_provision) is asked
    // before each registration, signed: it may refuse, or change parameters.
    let mut hook = Killed(
        std::process::Command::new(&python)
            .args(["-c", HOOK])
            .current_dir(d)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, calls) = std::sync::mpsc::channel::<String>();
    let out = std::io::BufReader::new(hook.0.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(out).map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let hook_port: u16 = calls
        .recv_timeout(std::time::Duration::from_secs(20))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let created = cli_json(
        d,
        &[
            "webhook",
            "create",
            "gatekeeper",
            "--url",
            &format!("http://127.0.0.1:{hook_port}/hook"),
            "--event",
            "provisioning.pre_provision",
        ],
    );
    std::fs::write(
        d.join("hook-secret.txt"),
        created["secret"].as_str().unwrap(),
    )
    .unwrap();
    let mut hooked: serde_json::Value = serde_json::from_str(TEMPLATE).unwrap();
    hooked["pre_provisioning_hook"] = "gatekeeper".into();
    std::fs::write(d.join("hooked.json"), hooked.to_string()).unwrap();
    cli(
        d,
        &[
            "provisioning-template",
            "create",
            "hooked",
            "--file",
            "hooked.json",
        ],
    )
    .ok();
    let register_hooked = |serial: &str| {
        let made = new_csr(
            &openssl,
            d,
            "h.key",
            "h.csr",
            &format!("/CN=hooked-{serial}"),
        );
        assert_eq!(made.code, 0, "{}", made.stderr);
        let csr = std::fs::read_to_string(d.join("h.csr")).unwrap();
        std::fs::write(
            d.join("h.json"),
            serde_json::json!({"certificateSigningRequest": csr}).to_string(),
        )
        .unwrap();
        let (_, created) = post(
            "/provisioning/certificates/create-from-csr",
            "h.json",
            "claim-1.chain.pem",
            "claim-1.key",
        );
        std::fs::write(
            d.join("hr.json"),
            serde_json::json!({"certificateOwnershipToken": created["certificateOwnershipToken"],
                               "parameters": {"SerialNumber": serial}})
            .to_string(),
        )
        .unwrap();
        let answer = post(
            "/provisioning/provisioning-templates/hooked/provision",
            "hr.json",
            "claim-1.chain.pem",
            "claim-1.key",
        );
        let line = calls
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("the hook was not called: {answer:?}"));
        let call: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(call["valid"], true, "the hook's signature: {call}");
        assert_eq!(call["event"], "provisioning.pre_provision", "{call}");
        assert_eq!(call["call"]["parameters"]["SerialNumber"], serial, "{call}");
        answer
    };
    let (code, thing) = register_hooked("D4");
    assert_eq!(code, "200", "{thing}");
    let t = cli_json(d, &["thing", "describe", "sensor-D4"]);
    assert_eq!(
        t["attributes"]["model"], "hooked",
        "the hook's override: {t}"
    );
    let (code, refused) = register_hooked("X9");
    assert_eq!(code, "403", "{refused}");
    assert!(
        refused["errorMessage"]
            .as_str()
            .unwrap()
            .contains("pre-provisioning hook"),
        "{refused}"
    );
    assert!(cli(d, &["thing", "describe", "sensor-X9"]).code != 0);
    drop(hook);

    // A claim CA: its certificates provision without being registered, and nothing else.
    let ca = cli_json(
        d,
        &[
            "ca",
            "register",
            "--cert",
            "factory/ca.pem",
            "--no-verification",
            "--activate",
        ],
    );
    let ca_id = ca["id"].as_str().unwrap().to_string();
    let unregistered = post(
        "/provisioning/certificates/create-from-csr",
        "csr.json",
        "claim-2.chain.pem",
        "claim-2.key",
    );
    assert_eq!(
        unregistered.0, "000",
        "not a claim yet: refused in the handshake"
    );
    let marked = cli_json(d, &["ca", "update", &ca_id, "--claim-templates", "factory"]);
    let made = new_csr(&openssl, d, "claim2.key", "claim2.csr", "/CN=sensor-E5");
    assert_eq!(made.code, 0);
    let claim2 = std::fs::read_to_string(d.join("claim2.csr")).unwrap();
    std::fs::write(
        d.join("claim2.json"),
        serde_json::json!({"certificateSigningRequest": claim2}).to_string(),
    )
    .unwrap();
    assert_eq!(marked["claim_templates"][0], "factory", "{marked}");
    wait_for_snapshot(d, &s);
    let (code, created) = post(
        "/provisioning/certificates/create-from-csr",
        "claim2.json",
        "claim-2.chain.pem",
        "claim-2.key",
    );
    assert_eq!(
        code, "200",
        "a claim CA's certificate provisions: {created}"
    );
    let r = curl_port(
        d,
        s.ports[1],
        "localhost",
        "/",
        &["--cert", "claim-2.chain.pem", "--key", "claim-2.key"],
    );
    assert!(r.stdout.contains("claim-certificate"), "{}", r.stdout);

    // The claim certificate made ordinary again may not provision any more.
    let cleared = cli_json(d, &["cert", "claim", &claim_id, "--clear"]);
    assert!(cleared.get("claim_templates").is_none(), "{cleared}");
    let listed = cli_json(d, &["provisioning-template", "list"]);
    assert_eq!(listed["items"].as_array().unwrap().len(), 3, "{listed}");
}

/// EST (RFC 7030) as its examples do it, with curl and openssl: the CA certificates, a first
/// enrollment bootstrapped by a claim certificate (the template as the CA label), a
/// re-enrollment with the issued certificate, and the refusals in HTTP's terms.
#[test]
fn est_enrolls_and_reenrolls_devices_as_rfc_7030_examples_do_with_curl_and_openssl() {
    let Some(openssl) = require_tool("openssl") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    root(d);
    intermediate(d, "int", "root");
    leaf(d, "client", "boot-1", "int", &[]);
    trust_root_and_local_ca(d);
    let config = "[admin]\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\"]\n\
         [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\nregistry_mode = \"registered\"\n\
         [domain.mtls]\nmode = \"required\"\ntruststore = \"trust.pem\"\n\
         [[domain.mapping]]\nupstream = \"builtin:echo\"\n\
         [[domain.mapping]]\nbase_path = \"/.well-known/est\"\nupstream = \"builtin:est\"\n\
         [[domain]]\nhostname = \"enroll.test\"\ncertificate = \"auto\"\nregistry_mode = \"registered\"\n\
         [domain.mtls]\nmode = \"optional\"\ntruststore = \"trust.pem\"\n\
         [[domain.mapping]]\nbase_path = \"/.well-known/est\"\nupstream = \"builtin:est\"\n\
         client_certificate = \"optional\"\n";
    let s = Server::start(d, config);
    std::fs::write(
        d.join("factory.json"),
        r#"{"thing_name": "${cert:Subject.CN}"}"#,
    )
    .unwrap();
    cli(
        d,
        &[
            "provisioning-template",
            "create",
            "factory",
            "--file",
            "factory.json",
        ],
    )
    .ok();
    let boot = cli_json(
        d,
        &[
            "cert",
            "register",
            "--cert",
            "boot-1.chain.pem",
            "--status",
            "ACTIVE",
        ],
    );
    let boot_id = boot["id"].as_str().unwrap().to_string();
    cli(d, &["cert", "claim", &boot_id, "--templates", "factory"]).ok();
    wait_for_snapshot(d, &s);

    let port = s.ports[0];
    let est = |path: &str, who: &str, body: Option<&str>| {
        let (cert, key) = (format!("{who}.pem"), format!("{who}.key"));
        let mut args = vec!["--cert", cert.as_str(), "--key", key.as_str()];
        let data = body.map(|b| format!("@{b}"));
        if let Some(data) = &data {
            args.extend([
                "-X",
                "POST",
                "-H",
                "Content-Type: application/pkcs10",
                "--data-binary",
                data.as_str(),
            ]);
        }
        let r = curl_port(
            d,
            port,
            "localhost",
            &format!("/.well-known/est{path}"),
            &args,
        );
        let (body, status) = r.stdout.rsplit_once('\n').unwrap_or(("", &r.stdout));
        (
            status.split_whitespace().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    };
    // RFC 7030's example unpacking: base64, then `openssl pkcs7 -print_certs`.
    let unpack = |b64: &str, out: &str| -> String {
        std::fs::write(d.join("answer.b64"), b64).unwrap();
        let der = run(
            &openssl,
            &["base64", "-d", "-in", "answer.b64", "-out", "answer.p7"],
            d,
        );
        assert_eq!(der.code, 0, "{}", der.stderr);
        let certs = run(
            &openssl,
            &[
                "pkcs7",
                "-inform",
                "DER",
                "-in",
                "answer.p7",
                "-print_certs",
                "-out",
                out,
            ],
            d,
        );
        assert_eq!(certs.code, 0, "{}", certs.stderr);
        std::fs::read_to_string(d.join(out)).unwrap()
    };
    let csr = |name: &str, subject: &str| {
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
                &format!("{name}.key"),
                "-subj",
                subject,
                "-outform",
                "DER",
                "-out",
                &format!("{name}.der"),
            ],
            d,
        );
        assert_eq!(made.code, 0, "{}", made.stderr);
        let b64 = run(
            &openssl,
            &[
                "base64",
                "-in",
                &format!("{name}.der"),
                "-out",
                &format!("{name}.b64"),
            ],
            d,
        );
        assert_eq!(b64.code, 0, "{}", b64.stderr);
        format!("{name}.b64")
    };
    std::fs::copy(d.join("boot-1.chain.pem"), d.join("boot.pem")).unwrap();
    std::fs::copy(d.join("boot-1.key"), d.join("boot.key")).unwrap();

    // /cacerts: the CA devices' certificates chain to.
    let (code, body) = est("/cacerts", "boot", None);
    assert_eq!(code, "200", "{body}");
    assert!(unpack(&body, "cacerts.pem").contains("Local CA"));
    let (code, _) = est("/csrattrs", "boot", None);
    assert_eq!(code, "204");

    // simpleenroll, bootstrapped by the claim certificate, the template as the label.
    // A device with no certificate yet enrolls with a one-time code (HTTP Basic, the code as
    // the password), on a domain where the certificate is optional.
    let codes = cli_json(
        d,
        &["provisioning-template", "codes", "factory", "--count", "2"],
    );
    let (one, two) = (
        codes["codes"][0].as_str().unwrap().to_string(),
        codes["codes"][1].as_str().unwrap().to_string(),
    );
    let by_code = |path: &str, code: Option<&str>, body: &str| {
        let auth = code.map(|c| format!("device:{c}"));
        let data = format!("@{body}");
        let mut args = vec![
            "-X",
            "POST",
            "-H",
            "Content-Type: application/pkcs10",
            "--data-binary",
            data.as_str(),
        ];
        if let Some(auth) = &auth {
            args.extend(["-u", auth.as_str()]);
        }
        let r = curl_port(
            d,
            port,
            "enroll.test",
            &format!("/.well-known/est{path}"),
            &args,
        );
        let (body, status) = r.stdout.rsplit_once('\n').unwrap_or(("", &r.stdout));
        (
            status.split_whitespace().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    };
    let coded = csr("code-1", "/CN=code-dev-1");
    let (code, body) = by_code("/factory/simpleenroll", None, &coded);
    assert_eq!(code, "401", "no certificate and no code: {body}");
    let (code, body) = by_code("/factory/simpleenroll", Some("not-a-code"), &coded);
    assert_eq!(code, "401", "an unknown code: {body}");
    let (code, body) = by_code("/other/simpleenroll", Some(&two), &coded);
    assert_eq!(code, "403", "a code is for one template: {body}");
    let (code, body) = by_code("/factory/simpleenroll", Some(&one), &coded);
    assert_eq!(code, "200", "{body}");
    assert!(unpack(&body, "code-1.pem").contains("code-dev-1"));
    assert_eq!(
        cli_json(d, &["thing", "describe", "code-dev-1"])["name"],
        "code-dev-1"
    );
    let second = csr("code-2", "/CN=code-dev-2");
    let (code, body) = by_code("/factory/simpleenroll", Some(&one), &second);
    assert_eq!(code, "401", "a spent code: {body}");
    let (code, body) = by_code("/factory/simpleenroll", Some(&two), &second);
    assert_eq!(
        code, "200",
        "the code refused for another template is still good: {body}"
    );

    let first = csr("est-1", "/CN=est-dev-1");
    let (code, body) = est("/factory/simpleenroll", "boot", Some(&first));
    assert_eq!(code, "200", "{body}");
    let issued = unpack(&body, "est-1.pem");
    assert!(issued.contains("est-dev-1"), "{issued}");
    let t = cli_json(d, &["thing", "describe", "est-dev-1"]);
    assert_eq!(t["certificates"].as_array().unwrap().len(), 1, "{t}");
    // The device is served with it at once.
    served(d, port, "est-1.pem", "est-1.key");

    // serverkeygen (RFC 7030 §4.4): the key made by the server for the CSR's subject, answered
    // with the certificate as multipart/mixed (PKCS#8, then certs-only PKCS#7, each base64).
    let asked = csr("skg-1", "/CN=skg-dev-1");
    let (code, body) = est("/factory/serverkeygen", "boot", Some(&asked));
    assert_eq!(code, "200", "{body}");
    let parts: Vec<&str> = body.split("--estServerKeyGen").collect();
    assert_eq!(parts.len(), 4, "two parts and the closing boundary: {body}");
    let payload = |part: &str| {
        part.split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        parts[1].contains("Content-Type: application/pkcs8"),
        "{body}"
    );
    std::fs::write(d.join("skg.b64"), payload(parts[1])).unwrap();
    for args in [
        &["base64", "-d", "-in", "skg.b64", "-out", "skg.der"][..],
        &[
            "pkey",
            "-inform",
            "DER",
            "-in",
            "skg.der",
            "-out",
            "skg-server.key",
        ],
    ] {
        let r = run(&openssl, args, d);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
    }
    let issued = unpack(&payload(parts[2]), "skg-server.pem");
    assert!(issued.contains("skg-dev-1"), "{issued}");
    served(d, port, "skg-server.pem", "skg-server.key");
    // The certificate is for the key the server made, not the CSR's.
    let r = run(
        &openssl,
        &["x509", "-in", "skg-server.pem", "-noout", "-pubkey"],
        d,
    );
    let csr_key = run(&openssl, &["pkey", "-in", "skg-1.key", "-pubout"], d);
    assert_ne!(r.stdout, csr_key.stdout);

    // simplereenroll with the issued certificate: a new key, the same subject.
    let again = csr("est-2", "/CN=est-dev-1");
    let (code, body) = est("/simplereenroll", "est-1", Some(&again));
    assert_eq!(code, "200", "{body}");
    unpack(&body, "est-2.pem");
    let t = cli_json(d, &["thing", "describe", "est-dev-1"]);
    assert_eq!(t["certificates"].as_array().unwrap().len(), 2, "{t}");
    served(d, port, "est-2.pem", "est-2.key");

    // Refusals, in HTTP's terms.
    let other = csr("other", "/CN=someone-else");
    let (code, body) = est("/simplereenroll", "est-2", Some(&other));
    assert_eq!(code, "400", "another subject on re-enrollment: {body}");
    let (code, body) = est("/factory/simpleenroll", "est-2", Some(&other));
    assert_eq!(
        code, "403",
        "a device certificate is not a bootstrap one: {body}"
    );
    let (code, body) = est("/simpleenroll", "boot", Some(&other));
    assert_eq!(code, "400", "no template named: {body}");
    assert!(
        body.contains("/.well-known/est/TEMPLATE/simpleenroll"),
        "{body}"
    );
    std::fs::write(d.join("garbage.b64"), "not base64 !!").unwrap();
    let (code, _) = est("/factory/simpleenroll", "boot", Some("garbage.b64"));
    assert_eq!(code, "400");
    let est2 = cli_json(d, &["cert", "list", "--thing", "est-dev-1"]);
    let newest = est2["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["pem"].as_str().is_some_and(|p| {
                std::fs::read_to_string(d.join("est-2.pem"))
                    .unwrap()
                    .contains(p.lines().nth(1).unwrap_or("-"))
            })
        })
        .map(|c| c["id"].as_str().unwrap().to_string())
        .expect("the renewed certificate is listed");
    // Regression (renewal_with_a_stolen_key_outlived_revocation): renewals never used do not
    // pile up — a newer one revokes the unused one — and revoking a certificate revokes what
    // was renewed from it.
    let id_of = |pem: &str| {
        let der = run(
            &openssl,
            &["x509", "-in", pem, "-outform", "DER", "-out", "id.der"],
            d,
        );
        assert_eq!(der.code, 0);
        run(&openssl, &["dgst", "-sha256", "-r", "id.der"], d)
            .stdout
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let third = csr("est-3", "/CN=est-dev-1");
    let (code, body) = est("/simplereenroll", "est-2", Some(&third));
    assert_eq!(code, "200", "{body}");
    unpack(&body, "est-3.pem");
    let fourth = csr("est-4", "/CN=est-dev-1");
    let (code, body) = est("/simplereenroll", "est-2", Some(&fourth));
    assert_eq!(code, "200", "{body}");
    unpack(&body, "est-4.pem");
    let (unused, pending) = (id_of("est-3.pem"), id_of("est-4.pem"));
    assert_eq!(
        cli_json(d, &["cert", "describe", &unused])["status"],
        "REVOKED"
    );
    assert_eq!(
        cli_json(d, &["cert", "describe", &pending])["status"],
        "ACTIVE"
    );
    cli(d, &["cert", "update", &newest, "--status", "REVOKED"]).ok();
    assert_eq!(
        cli_json(d, &["cert", "describe", &pending])["status"],
        "REVOKED",
        "renewed from a revoked certificate"
    );
    wait_for_snapshot(d, &s);
    let (code, _) = est("/simplereenroll", "est-2", Some(&again));
    assert_eq!(code, "000", "a revoked certificate cannot even connect");

    // Enrollments per second, one at a time (curl and openssl included): measured, printed.
    let csrs: Vec<String> = (0..20)
        .map(|i| csr(&format!("bulk-{i}"), &format!("/CN=bulk-{i}")))
        .collect();
    let started = std::time::Instant::now();
    for c in &csrs {
        let (code, body) = est("/factory/simpleenroll", "boot", Some(c));
        assert_eq!(code, "200", "{body}");
    }
    let took = started.elapsed();
    println!(
        "EST: 20 enrollments one after another in {took:?} ({:.0}/s, curl's start-up included)",
        20.0 / took.as_secs_f64()
    );

    // Rotation with overlap: a device re-enrolls 100 times, each new certificate used at once;
    // each renewed one becomes INACTIVE when its successor is first seen. Nothing piles up.
    let first = csr("rot-0", "/CN=rot-dev");
    let (code, body) = est("/factory/simpleenroll", "boot", Some(&first));
    assert_eq!(code, "200", "{body}");
    unpack(&body, "rot-0.pem");
    let started = std::time::Instant::now();
    for i in 1..=100 {
        let next = csr(&format!("rot-{i}"), "/CN=rot-dev");
        let (code, body) = est("/simplereenroll", &format!("rot-{}", i - 1), Some(&next));
        assert_eq!(code, "200", "rotation {i}: {body}");
        unpack(&body, &format!("rot-{i}.pem"));
        served(d, port, &format!("rot-{i}.pem"), &format!("rot-{i}.key"));
    }
    let rotations = started.elapsed();
    // The last retirement names the last certificate as its successor.
    let der = run(
        &openssl,
        &[
            "x509",
            "-in",
            "rot-100.pem",
            "-outform",
            "DER",
            "-out",
            "rot-100.der",
        ],
        d,
    );
    assert_eq!(der.code, 0);
    let digest = run(&openssl, &["dgst", "-sha256", "-r", "rot-100.der"], d).stdout;
    let last = digest.split_whitespace().next().unwrap().to_string();
    s.printed("the last renewed certificate retired", |l| {
        l.contains("a renewed certificate retired") && l.contains(&last)
    });
    let certs = cli_json(
        d,
        &["cert", "list", "--thing", "rot-dev", "--limit", "1000"],
    );
    let statuses: Vec<&str> = certs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.len(), 101, "{certs}");
    assert_eq!(
        statuses.iter().filter(|s| **s == "ACTIVE").count(),
        1,
        "one ACTIVE certificate after 100 rotations: {statuses:?}"
    );
    let active = certs["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["status"] == "ACTIVE")
        .unwrap();
    assert_eq!(active["id"], last.as_str());
    println!("EST: 100 rotations in {rotations:?}, leaving 1 ACTIVE certificate of 101");
    let renewal = cli_json(d, &["cert", "renewal"]);
    assert!(
        renewal["renewed"].as_i64().unwrap() >= 100,
        "renewals counted: {renewal}"
    );
    assert_eq!(renewal["overdue"], 0, "{renewal}");

    // An operator renews it (`cert renew`): a new key written 0600, the same subject and
    // thing; the renewed one retires once the new one connects.
    let renewed = cli_json(d, &["cert", "renew", &last, "--out", "op"]);
    assert_eq!(renewed["renews"], last.as_str(), "{renewed}");
    assert_eq!(renewed["things"][0], "rot-dev", "{renewed}");
    assert!(
        renewed.get("private_key_pem").is_none(),
        "the key is not printed"
    );
    assert_eq!(crate::mode(d.join("op/key.pem")) & 0o777, 0o600);
    let new_id = renewed["id"].as_str().unwrap().to_string();
    wait_for_snapshot(d, &s);
    let r = served(d, port, "op/cert.pem", "op/key.pem");
    assert!(
        r.stdout.contains("rot-dev"),
        "the same subject: {}",
        r.stdout
    );
    s.printed("the operator's renewal retired the old certificate", |l| {
        l.contains("a renewed certificate retired") && l.contains(&new_id)
    });
    assert_eq!(
        cli_json(d, &["cert", "describe", &last])["status"],
        "INACTIVE"
    );
    // A CSR for another subject is refused, saying why.
    let made = new_csr(&openssl, d, "op-other.key", "op-other.csr", "/CN=someone");
    assert_eq!(made.code, 0);
    let refused = cli(
        d,
        &[
            "cert",
            "renew",
            &new_id,
            "--csr",
            "op-other.csr",
            "--out",
            "op2",
        ],
    );
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .stderr
            .contains("must be those of the certificate it renews"),
        "{}",
        refused.stderr
    );
}

/// Certificate → short-lived token (builtin:token): an ES256 JWT bound to the certificate,
/// verified by PyJWT against the JWKS the gateway serves; a revoked certificate gets none.
#[test]
fn a_certificate_gets_a_short_lived_token_that_pyjwt_verifies_against_the_jwks() {
    let Some(python) = crate::mqtt::paho_python() else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    root(d);
    intermediate(d, "int", "root");
    leaf(d, "client", "pump-1", "int", &[]);
    leaf(d, "client", "claim-9", "int", &[]);
    let config = "[admin]\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\"]\n\
         [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\nregistry_mode = \"registered\"\n\
         [domain.mtls]\nmode = \"required\"\ntruststore = \"root/ca.pem\"\n\
         [[domain.mapping]]\nupstream = \"builtin:echo\"\n\
         [[domain.mapping]]\nbase_path = \"/auth\"\nupstream = \"builtin:token\"\n\
         token_audiences = [\"https://api.example.com\"]\n";
    let s = Server::start(d, config);
    let pump = cli_json(
        d,
        &[
            "cert",
            "register",
            "--cert",
            "pump-1.chain.pem",
            "--status",
            "ACTIVE",
        ],
    );
    let pump_id = pump["id"].as_str().unwrap().to_string();
    cli(d, &["thing", "create", "pump-1", "--attr", "site=berlin"]).ok();
    cli(d, &["thing", "attach", "pump-1", &pump_id]).ok();
    let claim = cli_json(
        d,
        &[
            "cert",
            "register",
            "--cert",
            "claim-9.chain.pem",
            "--status",
            "ACTIVE",
        ],
    );
    cli(
        d,
        &[
            "cert",
            "claim",
            claim["id"].as_str().unwrap(),
            "--templates",
            "any",
        ],
    )
    .ok();
    wait_for_snapshot(d, &s);
    let ask = |who: &str, path: &str, body: Option<&str>| {
        let (cert, key) = (format!("{who}.chain.pem"), format!("{who}.key"));
        let mut args = vec!["--cert", cert.as_str(), "--key", key.as_str()];
        if let Some(b) = body {
            args.extend([
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "--data",
                b,
            ]);
        }
        let r = curl_port(d, s.ports[0], "localhost", path, &args);
        let (body, status) = r.stdout.rsplit_once('\n').unwrap_or(("", &r.stdout));
        (
            status.split_whitespace().next().unwrap_or("").to_string(),
            serde_json::from_str::<serde_json::Value>(body).unwrap_or_default(),
        )
    };
    let (code, jwks) = ask("pump-1", "/auth/.well-known/jwks.json", None);
    assert_eq!(code, "200", "{jwks}");
    let (code, token) = ask(
        "pump-1",
        "/auth/token",
        Some(r#"{"audience": "https://api.example.com", "lifetime_seconds": 120}"#),
    );
    assert_eq!(code, "200", "{token}");
    assert_eq!(token["token_type"], "Bearer");
    std::fs::write(d.join("token.txt"), token["token"].as_str().unwrap()).unwrap();
    std::fs::write(d.join("jwks.json"), jwks.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/scripts/token_verify.py");
    let r = run(
        &python,
        &[
            script.to_str().unwrap(),
            "token.txt",
            "jwks.json",
            "pump-1.pem",
            "https://localhost/auth",
            "https://api.example.com",
            "pump-1",
        ],
        d,
    );
    println!("{}", r.stdout);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("ALL OK"), "{}", r.stdout);

    // Bad requests and claims get none; a revoked certificate does not get past the handshake.
    let (code, e) = ask("pump-1", "/auth/token", Some("{}"));
    assert_eq!(code, "400", "{e}");
    let (code, e) = ask(
        "pump-1",
        "/auth/token",
        Some(r#"{"audience": "https://api.example.com", "lifetime_seconds": 86400}"#),
    );
    assert_eq!(code, "400", "{e}");
    let (code, e) = ask(
        "claim-9",
        "/auth/token",
        Some(r#"{"audience": "https://api.example.com"}"#),
    );
    assert_eq!(code, "403", "{e}");
    assert!(e.to_string().contains("claim"), "{e}");
    // Only the mapping's audiences (token_audiences).
    let (code, e) = ask(
        "pump-1",
        "/auth/token",
        Some(r#"{"audience": "https://other.example.com"}"#),
    );
    assert_eq!(code, "403", "{e}");
    assert_eq!(e["error"], "audience-not-allowed", "{e}");
    cli(d, &["cert", "update", &pump_id, "--status", "REVOKED"]).ok();
    wait_for_snapshot(d, &s);
    let (code, _) = ask("pump-1", "/auth/token", Some(r#"{"audience": "a"}"#));
    assert_eq!(code, "000", "revoked: refused in the handshake");
}

/// SCEP (RFC 8894) with pyscep, a real SCEP client, driven by the .mobileconfig an operator
/// makes for the device: the device makes its own key, enrolls with the profile's challenge, gets the same certificate for the same transaction and by polling,
/// renews with a new key, and is served through the gateway with what it got; a wrong or spent
/// challenge and a stranger's renewal are refused.
#[test]
fn scep_enrolls_a_device_whose_key_never_leaves_it_with_pyscep() {
    let Some(python) = crate::mqtt::paho_python() else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    // pyscep checks the RA's certificates with RSA PKCS#1 only: an RSA local CA.
    portcullis(
        d,
        &[
            "pki",
            "ca",
            "create",
            "--cn",
            "Local CA",
            "--key-type",
            "rsa-2048",
            "--out",
            "data/ca",
        ],
    )
    .ok();
    let config = "[admin]\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\"]\n\
         [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\nregistry_mode = \"registered\"\n\
         [domain.mtls]\nmode = \"optional\"\ntruststore = \"data/ca/ca.pem\"\n\
         [[domain.mapping]]\nupstream = \"builtin:echo\"\n\
         [[domain.mapping]]\nbase_path = \"/scep\"\nupstream = \"builtin:scep\"\n\
         client_certificate = \"optional\"\n";
    let s = Server::start(d, config);
    std::fs::write(
        d.join("laptops.json"),
        r#"{"thing_name": "${cert:Subject.CN}", "attributes": {"enrolled": "scep"}}"#,
    )
    .unwrap();
    cli(
        d,
        &[
            "provisioning-template",
            "create",
            "laptops",
            "--file",
            "laptops.json",
        ],
    )
    .ok();
    let port = s.ports[0];
    // The operator's profile for the device: the SCEP URL, the subject, a one-time challenge.
    let url = format!("https://localhost:{port}/scep");
    let made = cli_json(
        d,
        &[
            "provisioning-template",
            "mobileconfig",
            "laptops",
            "--cn",
            "scep-device-1",
            "--url",
            &url,
            "--out",
            "scep-device-1.mobileconfig",
        ],
    );
    assert_eq!(made["template"], "laptops", "{made}");
    let mode = std::fs::metadata(d.join("scep-device-1.mobileconfig"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/scripts/scep_enroll.py");
    let r = run(
        &python,
        &[script.to_str().unwrap(), "scep-device-1.mobileconfig", "."],
        d,
    );
    println!("{}", r.stdout);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("ALL OK"), "{}", r.stdout);

    // Registered ACTIVE, attached to its thing by the template; served at once.
    let t = cli_json(d, &["thing", "describe", "scep-device-1"]);
    assert_eq!(t["attributes"]["enrolled"], "scep", "{t}");
    served(d, port, "scep.pem", "scep.key");
    served(d, port, "renewed.pem", "renewed.key");
    assert!(cli(d, &["thing", "describe", "scep-device-2"]).code != 0);
    // The refusals are audited with SCEP's reason.
    let audit = cli_json(d, &["audit", "list", "--limit", "100"]).to_string();
    assert!(audit.contains("badRequest"), "{audit}");

    // Answers without a certificate, by plain curl: the capabilities, and a 400 for junk.
    let caps = curl_port(d, port, "localhost", "/scep?operation=GetCACaps", &[]);
    assert!(caps.stdout.contains("SCEPStandard"), "{}", caps.stdout);
    let junk = curl_port(
        d,
        port,
        "localhost",
        "/scep?operation=PKIOperation",
        &["-X", "POST", "--data-binary", "0not-a-message"],
    );
    assert!(junk.stdout.contains("\n400 "), "{}", junk.stdout);
    assert!(
        junk.stdout.contains("send a SCEP pkiMessage"),
        "{}",
        junk.stdout
    );
}

/// A certificate with the lifetime `from`..`until` (days from now, negative in the past),
/// made by `openssl ca` for a CSR made by `openssl req`: signed by the local CA
/// (`data/ca`), or — for the name `data/ca/ca` — the local CA itself, self-signed.
fn dated_certificate(openssl: &Path, d: &Path, name: &str, from: i64, until: i64) {
    let ca_itself = name == "data/ca/ca";
    let subject = if ca_itself {
        "/CN=Local CA".to_string()
    } else {
        format!("/CN={name}")
    };
    let r = new_csr(
        openssl,
        d,
        &format!("{name}.key"),
        &format!("{name}.csr"),
        &subject,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let ca = "[ca]\ndefault_ca = local\n[local]\ndatabase = index.txt\nnew_certs_dir = .\n\
              serial = serial\ndefault_md = sha256\npolicy = any\nunique_subject = no\n\
              [any]\ncommonName = supplied\n\
              [leaf]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
              extendedKeyUsage = clientAuth\nsubjectKeyIdentifier = hash\n\
              authorityKeyIdentifier = keyid\n\
              [root]\nbasicConstraints = critical,CA:TRUE,pathlen:0\n\
              keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n";
    std::fs::write(d.join("ca.cnf"), ca).unwrap();
    if !d.join("index.txt").exists() {
        std::fs::write(d.join("index.txt"), "").unwrap();
    }
    std::fs::write(d.join("serial"), format!("{:032X}\n", rand_serial(name))).unwrap();
    let stamp = |days: i64| {
        let t = time::OffsetDateTime::now_utc() + time::Duration::days(days);
        format!(
            "{:04}{:02}{:02}{:02}{:02}{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )
    };
    let (csr, out, start, end) = (
        format!("{name}.csr"),
        format!("{name}.pem"),
        stamp(from),
        stamp(until),
    );
    let mut args = vec![
        "ca",
        "-batch",
        "-config",
        "ca.cnf",
        "-keyfile",
        "data/ca/ca.key",
        "-in",
        &csr,
        "-out",
        &out,
        "-startdate",
        &start,
        "-enddate",
        &end,
        "-notext",
    ];
    if ca_itself {
        args.extend(["-selfsign", "-extensions", "root"]);
    } else {
        args.extend(["-cert", "data/ca/ca.pem", "-extensions", "leaf"]);
    }
    let r = run(openssl, &args, d);
    assert_eq!(r.code, 0, "openssl ca: {}", r.stderr);
}

/// A serial number that differs per name and per run.
fn rand_serial(name: &str) -> u128 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    name.bytes()
        .fold(nanos, |acc, b| acc.rotate_left(7) ^ u128::from(b))
        | (1 << 120)
}

/// A template's grace period: a certificate that expired within it completes its handshake
/// and may renew itself over EST (then is served with its renewal), and nothing else; one
/// whose template has no grace, or whose grace ran out, is refused in the handshake.
#[test]
fn an_expired_certificate_in_its_grace_period_may_only_renew() {
    let Some(openssl) = require_tool("openssl") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    // The local CA, brought by the operator (made by openssl, valid since 100 days ago).
    std::fs::create_dir_all(d.join("data/ca")).unwrap();
    dated_certificate(&openssl, d, "data/ca/ca", -100, 3650);
    let config = "[admin]\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\"]\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"mqtt\"]\n\
         [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\nregistry_mode = \"registered\"\n\
         [domain.mtls]\nmode = \"required\"\ntruststore = \"data/ca/ca.pem\"\n\
         [[domain.mapping]]\nupstream = \"builtin:echo\"\n\
         [[domain.mapping]]\nbase_path = \"/.well-known/est\"\nupstream = \"builtin:est\"\n";
    let s = Server::start(d, config);
    for (name, doc) in [
        (
            "graceful",
            r#"{"thing_name": "${cert:Subject.CN}", "renewal": {"grace_days": 30}}"#,
        ),
        ("strict", r#"{"thing_name": "${cert:Subject.CN}"}"#),
    ] {
        std::fs::write(d.join(format!("{name}.json")), doc).unwrap();
        cli(
            d,
            &[
                "provisioning-template",
                "create",
                name,
                "--file",
                &format!("{name}.json"),
            ],
        )
        .ok();
    }
    // Expired yesterday (grace: 30 days), expired yesterday (no grace), expired 40 days ago,
    // and one more in grace for MQTT.
    for (name, from, until, template) in [
        ("late-1", -60, -1, "graceful"),
        ("late-2", -60, -1, "strict"),
        ("late-3", -90, -40, "graceful"),
        ("late-4", -60, -1, "graceful"),
    ] {
        dated_certificate(&openssl, d, name, from, until);
        let r = cli_json(
            d,
            &[
                "cert",
                "register",
                "--cert",
                &format!("{name}.pem"),
                "--status",
                "ACTIVE",
                "--renewal-template",
                template,
            ],
        );
        cli(d, &["thing", "create", name]).ok();
        cli(d, &["thing", "attach", name, r["id"].as_str().unwrap()]).ok();
    }
    let unknown = cli(
        d,
        &[
            "cert",
            "register",
            "--cert",
            "late-1.pem",
            "--renewal-template",
            "nope",
        ],
    );
    assert!(
        unknown.code != 0 && unknown.stderr.contains("nope"),
        "an unknown template registers nothing: {}",
        unknown.stderr
    );
    wait_for_snapshot(d, &s);
    let renewal = cli_json(d, &["cert", "renewal"]);
    assert_eq!(renewal["in_grace"], 2, "{renewal}");
    assert_eq!(renewal["overdue"], 2, "{renewal}");

    let port = s.ports[0];
    let ask = |who: &str, path: &str, csr: Option<&str>| {
        let (cert, key) = (format!("{who}.pem"), format!("{who}.key"));
        let data = csr.map(|c| format!("@{c}"));
        let mut args = vec!["--cert", cert.as_str(), "--key", key.as_str()];
        if let Some(data) = &data {
            args.extend([
                "-X",
                "POST",
                "-H",
                "Content-Type: application/pkcs10",
                "--data-binary",
                data.as_str(),
            ]);
        }
        let r = curl_port(d, port, "localhost", path, &args);
        let (body, status) = r.stdout.rsplit_once('\n').unwrap_or(("", &r.stdout));
        (
            status.split_whitespace().next().unwrap_or("").to_string(),
            format!("{body}{}", r.stderr),
        )
    };
    // In grace: the handshake completes; the echo and a first enrollment are refused.
    let (code, body) = ask("late-1", "/", None);
    assert_eq!(code, "403", "{body} {:?}", s.lines_with("handshake failed"));
    let r = new_csr(&openssl, d, "next-1.key", "next-1.csr", "/CN=late-1");
    assert_eq!(r.code, 0);
    for args in [
        &[
            "req",
            "-in",
            "next-1.csr",
            "-outform",
            "DER",
            "-out",
            "next-1.der",
        ][..],
        &["base64", "-in", "next-1.der", "-out", "next-1.b64"],
    ] {
        assert_eq!(run(&openssl, args, d).code, 0, "{args:?}");
    }
    let (code, body) = ask(
        "late-1",
        "/.well-known/est/graceful/simpleenroll",
        Some("next-1.b64"),
    );
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("only renew"), "{body}");
    // It renews, and its renewal is served.
    let (code, body) = ask(
        "late-1",
        "/.well-known/est/simplereenroll",
        Some("next-1.b64"),
    );
    assert_eq!(code, "200", "{body}");
    std::fs::write(d.join("next-1.p7.b64"), &body).unwrap();
    let unpacked = run(
        &openssl,
        &["base64", "-d", "-in", "next-1.p7.b64", "-out", "next-1.p7"],
        d,
    );
    assert_eq!(unpacked.code, 0);
    let pem = run(
        &openssl,
        &[
            "pkcs7",
            "-inform",
            "DER",
            "-in",
            "next-1.p7",
            "-print_certs",
        ],
        d,
    );
    assert!(pem.stdout.contains("CN = late-1"), "{}", pem.stdout);
    std::fs::write(d.join("next-1.pem"), &pem.stdout).unwrap();
    served(d, port, "next-1.pem", "next-1.key");
    // Over MQTT (paho): connects as its own thing only, may do nothing but renew, renews.
    if let Some(python) = crate::mqtt::paho_python() {
        let r = new_csr(&openssl, d, "next-4.key", "next-4.csr", "/CN=late-4");
        assert_eq!(r.code, 0);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/scripts/grace_mqtt.py");
        let mqtt_port = s.ports[1].to_string();
        let r = run(
            &python,
            &[
                script.to_str().unwrap(),
                &mqtt_port,
                "late-4.pem",
                "late-4.key",
                "next-4.csr",
            ],
            d,
        );
        assert!(r.stdout.contains("ALL OK"), "{}\n{}", r.stdout, r.stderr);
        served(d, port, "renewed.pem", "next-4.key");
    }
    // No grace, or grace run out: refused in the handshake.
    for who in ["late-2", "late-3"] {
        let (code, body) = ask(who, "/.well-known/est/simplereenroll", Some("next-1.b64"));
        assert_ne!(code, "200", "{who}: {body}");
        assert_ne!(
            code, "403",
            "{who}: the handshake itself is refused: {body}"
        );
    }
}

/// SCEP with certmonger (Debian), as a Linux host enrolls: its daemon (on a private socket, its
/// state in the test's directory) makes an RSA key, sends a PKCSReq with the one-time challenge
/// to `/scep` on the plain-HTTP listener, verifies the signed answer against the RA and CA it
/// fetched, and writes the certificate — issued by the default ECDSA local CA and served through
/// the gateway.
#[test]
fn scep_enrolls_a_linux_host_with_certmonger_over_plain_http() {
    let (Some(certmonger), Some(getcert)) = (require_tool("certmonger"), require_tool("getcert"))
    else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    let config = "[admin]\naddress = \"127.0.0.1:0\"\n\
         [revocation]\nlisten = \"127.0.0.1:0\"\nscep = true\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\nprotocols = [\"http\"]\n\
         [[domain]]\nhostname = \"localhost\"\ncertificate = \"auto\"\nregistry_mode = \"registered\"\n\
         [domain.mtls]\nmode = \"required\"\ntruststore = \"data/ca/ca.pem\"\n\
         [[domain.mapping]]\nupstream = \"builtin:echo\"\n";
    let s = Server::start(d, config);
    let line = s.printed("the plain-HTTP listener", |l| {
        l.contains("portcullis revocation (CRL, OCSP) on http://")
    });
    let base = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    std::fs::write(
        d.join("hosts.json"),
        r#"{"thing_name": "${cert:Subject.CN}"}"#,
    )
    .unwrap();
    cli(
        d,
        &[
            "provisioning-template",
            "create",
            "hosts",
            "--file",
            "hosts.json",
        ],
    )
    .ok();
    let codes = cli_json(d, &["provisioning-template", "codes", "hosts"]);
    let code = codes["codes"][0].as_str().unwrap().to_string();

    // certmonger's state and socket in the test's directory.
    let state = d.join("certmonger");
    let dirs = ["config", "requests", "cas", "tmp", "local"];
    for sub in dirs {
        std::fs::create_dir_all(state.join(sub)).unwrap();
    }
    let socket = state.join("cm.sock");
    let env: Vec<(String, String)> = vec![
        (
            "CERTMONGER_CONFIG_DIR".into(),
            state.join("config").display().to_string(),
        ),
        (
            "CERTMONGER_REQUESTS_DIR".into(),
            state.join("requests").display().to_string(),
        ),
        (
            "CERTMONGER_CAS_DIR".into(),
            state.join("cas").display().to_string(),
        ),
        (
            "CERTMONGER_TMPDIR".into(),
            state.join("tmp").display().to_string(),
        ),
        (
            "CERTMONGER_LOCAL_CA_DIR".into(),
            state.join("local").display().to_string(),
        ),
        (
            "CERTMONGER_PVT_ADDRESS".into(),
            format!("unix:path={}", socket.display()),
        ),
    ];
    let daemon = std::process::Command::new(&certmonger)
        .args(["-n", "-L", "-P"])
        .arg(&socket)
        .envs(env.iter().cloned())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _daemon = Killed(daemon);
    let getcert_run = |args: &[&str]| {
        let out = std::process::Command::new(&getcert)
            .args(args)
            .envs(env.iter().cloned())
            .current_dir(d)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    // The daemon answers once its socket is up.
    let started = std::time::Instant::now();
    let mut added = getcert_run(&[
        "add-scep-ca",
        "-c",
        "portcullis",
        "-u",
        &format!("{base}/scep"),
    ]);
    while added.0 != 0 && started.elapsed() < std::time::Duration::from_secs(10) {
        added = getcert_run(&[
            "add-scep-ca",
            "-c",
            "portcullis",
            "-u",
            &format!("{base}/scep"),
        ]);
    }
    assert_eq!(added.0, 0, "{}", added.1);
    let cert = d.join("host.pem").display().to_string();
    let key = d.join("host.key").display().to_string();
    let requested = getcert_run(&[
        "request",
        "-c",
        "portcullis",
        "-f",
        &cert,
        "-k",
        &key,
        "-N",
        "CN=host-1",
        "-L",
        &code,
        "-G",
        "rsa",
        "-g",
        "2048",
        "-w",
    ]);
    let listed = getcert_run(&["list"]).1;
    assert_eq!(requested.0, 0, "{}\n{listed}", requested.1);
    assert!(listed.contains("status: MONITORING"), "{listed}");
    let issued = std::fs::read_to_string(&cert).unwrap();
    assert!(issued.contains("BEGIN CERTIFICATE"), "{issued}");
    // Registered, attached by the template, served.
    assert_eq!(
        cli_json(d, &["thing", "describe", "host-1"])["name"],
        "host-1"
    );
    served(d, s.ports[0], "host.pem", "host.key");
}
