//! Browser device trust in a real Chromium: a managed laptop's certificate in the browser's NSS
//! database, an AutoSelectCertificateForUrls policy, the web app behind the gateway showing the
//! forwarded identity, and the readable failure page once the certificate is revoked.

use std::path::{Path, PathBuf};

use portcullis_testkit::{Run, require_tool, run, temp_dir};

use crate::serve::{Server, pki, revoke};
use crate::*;

/// Where Chromium reads managed policies on Linux.
const POLICY_DIR: &str = "/etc/chromium/policies/managed";

/// A managed policy file, removed on drop.
struct ManagedPolicy(PathBuf);

impl Drop for ManagedPolicy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Screenshots land here, kept after the test as artifacts.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs headless Chromium on `url` with the test's HOME (its NSS database) and profile, bounded
/// by a timeout: Chromium waits forever when no certificate matches the policy.
fn chromium(d: &Path, chromium: &Path, url: &str, action: &str) -> Run {
    let timeout = require_tool("timeout").unwrap();
    let home = d.join("home");
    let profile = format!("--user-data-dir={}", d.join("profile").display());
    let mut args = vec![
        "60".to_string(),
        chromium.display().to_string(),
        "--headless".into(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-background-networking".into(),
        "--disable-dev-shm-usage".into(),
        "--no-first-run".into(),
        profile,
        "--host-resolver-rules=MAP app.test 127.0.0.1".into(),
        "--window-size=1100,800".into(),
        action.to_string(),
        url.to_string(),
    ];
    if action.starts_with("--screenshot") {
        args.insert(2, "--hide-scrollbars".into());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = std::process::Command::new(timeout);
    cmd.args(&refs).current_dir(d).env("HOME", &home);
    let out = cmd.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn a_managed_browser_opens_the_app_with_its_certificate_and_gets_a_readable_page_once_revoked() {
    let (Some(browser), Some(certutil), Some(pk12util)) = (
        require_tool("chromium"),
        require_tool("certutil"),
        require_tool("pk12util"),
    ) else {
        return;
    };
    if std::fs::create_dir_all(POLICY_DIR).is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{POLICY_DIR} is not writable: the browser test needs root (or sudo) for Chromium's managed policies"
        );
        eprintln!("SKIP: {POLICY_DIR} is not writable (run as root)");
        return;
    }
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    leaf(d, "client", "laptop-1", "int", &["--org", "Corp IT"]);
    // IT's MDM payload: the laptop's certificate and key with its chain, as PKCS#12.
    std::fs::write(d.join("p12.pass"), "mdm-secret\n").unwrap();
    portcullis(
        d,
        &[
            "pki",
            "export-p12",
            "--cert",
            "laptop-1.pem",
            "--key",
            "laptop-1.key",
            "--chain",
            "int/ca.pem",
            "--out",
            "laptop-1.p12",
            "--password-file",
            "p12.pass",
        ],
    )
    .ok();
    let config = r#"
[admin]
address = "127.0.0.1:0"

[[listener]]
address = "127.0.0.1:0"

[[domain]]
hostname = "app.test"
certificate = "auto"
[domain.mtls]
mode = "optional"
truststore = "trust-a.pem"
crls = ["int.crl"]
on_failure = "http"
failure_advice = "Open Self Service and install the <b>Corp Device</b> profile, then restart the browser.\n\nHelp desk: it@corp.test"
[[domain.mapping]]
upstream = "builtin:echo"
"#;
    let s = Server::start(d, config);

    // The browser's NSS database (under the test's own HOME): the gateway's CA trusted for TLS,
    // the laptop's certificate imported from the .p12.
    let nssdb = d.join("home/.pki/nssdb");
    std::fs::create_dir_all(&nssdb).unwrap();
    let db = format!("sql:{}", nssdb.display());
    run(&certutil, &["-N", "-d", &db, "--empty-password"], d).ok();
    run(
        &certutil,
        &[
            "-A",
            "-d",
            &db,
            "-n",
            "portcullis-local-ca",
            "-t",
            "C,,",
            "-i",
            "data/ca/ca.pem",
        ],
        d,
    )
    .ok();
    run(
        &pk12util,
        &["-i", "laptop-1.p12", "-d", &db, "-W", "mdm-secret"],
        d,
    )
    .ok();
    // The managed policy: pick the certificate issued by the company CA for this app, silently.
    let origin = format!("https://app.test:{}", s.port);
    let pattern = serde_json::json!({"pattern": origin, "filter": {"ISSUER": {"CN": "int"}}});
    let policy = serde_json::json!({ "AutoSelectCertificateForUrls": [pattern.to_string()] });
    let policy_file =
        Path::new(POLICY_DIR).join(format!("portcullis-test-{}.json", std::process::id()));
    std::fs::write(&policy_file, policy.to_string()).unwrap();
    let _policy = ManagedPolicy(policy_file);

    // The web app opens, and shows the identity the gateway forwarded.
    let url = format!("{origin}/whoami");
    let page = chromium(d, &browser, &url, "--dump-dom");
    assert_eq!(page.code, 0, "{}", page.stderr);
    assert!(page.stdout.contains("CN=laptop-1"), "{}", page.stdout);
    assert!(page.stdout.contains("SUCCESS"), "{}", page.stdout);
    let shot = artifacts().join("device-trust-admitted.png");
    chromium(
        d,
        &browser,
        &url,
        &format!("--screenshot={}", shot.display()),
    );
    assert!(shot.exists(), "screenshot {}", shot.display());

    // IT revokes the laptop's certificate: the same browser now gets the readable page, with the
    // certificate it presented and the domain's own words (escaped).
    revoke(d, "laptop-1");
    s.wait_for("configuration reloaded");
    let page = chromium(d, &browser, &url, "--dump-dom");
    assert_eq!(page.code, 0, "{}", page.stderr);
    let html = &page.stdout;
    assert!(
        html.contains("The client certificate was rejected"),
        "{html}"
    );
    assert!(html.contains("revoked"), "{html}");
    assert!(html.contains("CN=laptop-1"), "{html}");
    assert!(html.contains("Self Service"), "{html}");
    assert!(
        html.contains("&lt;b&gt;Corp Device&lt;/b&gt;"),
        "advice escaped: {html}"
    );
    assert!(html.contains("it@corp.test"), "{html}");
    let shot = artifacts().join("device-trust-revoked.png");
    chromium(
        d,
        &browser,
        &url,
        &format!("--screenshot={}", shot.display()),
    );
    assert!(shot.exists(), "screenshot {}", shot.display());
}

#[test]
fn the_console_signs_in_issues_revokes_and_shows_the_audit_log_in_chromium() {
    let Some(python) = crate::mqtt::paho_python() else {
        return;
    };
    if run(&python, &["-c", "import playwright"], Path::new(".")).code != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "Playwright for Python is not installed; the test command (scripts/test) installs it"
        );
        eprintln!("SKIP: Playwright for Python is not installed (run scripts/test)");
        return;
    }
    let Some(_) = require_tool("chromium") else {
        return;
    };
    let tmp = temp_dir();
    let d = tmp.path();
    pki(d);
    let s = Server::start(
        d,
        "[admin]\naddress = \"127.0.0.1:0\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
         [[domain]]\nhostname = \"a.test\"\ncertificate = \"auto\"\n\
         [domain.mtls]\nmode = \"required\"\ntruststore = \"trust-a.pem\"\n\
         [[domain.mapping]]\nupstream = \"builtin:echo\"\n",
    );
    // Traffic for the dashboard: requests by a trusted client, handshakes refused for another.
    let alice = crate::serve::client("alice");
    let bob = crate::serve::client("bob");
    for _ in 0..3 {
        let r = crate::serve::curl(d, &s, "a.test", "/", &crate::serve::with_client(&alice));
        assert_eq!(crate::serve::answer(&r).0, 200);
        assert_ne!(
            crate::serve::curl(d, &s, "a.test", "/", &crate::serve::with_client(&bob)).code,
            0
        );
    }
    let made = crate::control::cli_json(d, &["admin", "token", "create", "--name", "console-test"]);
    let token = made["token"].as_str().unwrap().to_string();
    // axe-core (npm), injected by the script into every page for the accessibility check.
    let axe = std::env::var("PORTCULLIS_TEST_AXE")
        .ok()
        .filter(|p| Path::new(p).is_file());
    assert!(
        axe.is_some() || std::env::var_os("CI").is_none(),
        "PORTCULLIS_TEST_AXE names no file; the test command (scripts/test) installs axe-core"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cli/scripts/console.py");
    let r = run(
        &python,
        &[
            script.to_str().unwrap(),
            &s.admin_port.to_string(),
            &token,
            artifacts().to_str().unwrap(),
            env!("CARGO_BIN_EXE_portcullis"),
            &s.port.to_string(),
            axe.as_deref().unwrap_or(""),
        ],
        d,
    );
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("ALL OK"), "{}", r.stdout);
    // The gateway logged the sign-in and the operator's close.
    s.wait_for("console login");
    assert!(s.wait_for("\"reason\":\"operator\"").contains("a.test"));
}
