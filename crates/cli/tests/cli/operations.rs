//! What operators install beside the binary: the Debian package and its systemd unit, shell
//! completions and manual pages, the container image, the Prometheus alerting rules (checked by
//! Prometheus's own tool) and the Grafana dashboard, each checked against the metrics the code
//! emits.

use std::path::{Path, PathBuf};

use portcullis_testkit::{require_tool, run};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `.rs` file's text under `dir`.
fn sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// Asserts that every `portcullis_*` metric `text` names is one the nodes export (histograms by
/// their base name); returns how many references there were.
fn assert_exported(text: &str, what: &str) -> usize {
    let mut code = String::new();
    for krate in ["gateway", "node", "admin", "registry", "mqtt"] {
        sources(&repo().join("crates").join(krate).join("src"), &mut code);
    }
    let mut named = 0;
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !word.starts_with("portcullis_") {
            continue;
        }
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| word.strip_suffix(s))
            .unwrap_or(word);
        assert!(
            code.contains(&format!("\"{base}\"")) || code.contains(&format!("{base}{{")),
            "{what} reads {word}, which no node exports"
        );
        named += 1;
    }
    named
}

#[test]
fn grafana_dashboard_queries_only_metrics_the_nodes_export() {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/portcullis.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    let mut exprs = String::new();
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            exprs.push_str(t["expr"].as_str().unwrap());
            exprs.push('\n');
        }
    }
    assert!(assert_exported(&exprs, "deploy/grafana/portcullis.json") >= 13);
}

#[test]
fn alert_rules_pass_promtool_and_name_only_metrics_the_nodes_export() {
    let dir = repo().join("deploy/prometheus");
    let rules = std::fs::read_to_string(dir.join("portcullis-rules.yml")).unwrap();
    // Each metric a rule reads is one the code exports: a renamed metric would otherwise leave
    // an alert that never fires.
    let named = assert_exported(&rules, "deploy/prometheus/portcullis-rules.yml");
    assert!(named >= 8, "{named} metric references");
    let Some(promtool) = require_tool("promtool") else {
        return;
    };
    let check = run(&promtool, &["check", "rules", "portcullis-rules.yml"], &dir);
    assert_eq!(check.code, 0, "{}{}", check.stdout, check.stderr);
    assert!(
        check.stdout.contains("SUCCESS: 9 rules found"),
        "{}",
        check.stdout
    );
    // The unit tests: each alert fires on the series that should raise it, with the labels and
    // text given, and stays quiet below its thresholds.
    let test = run(
        &promtool,
        &["test", "rules", "portcullis-rules.test.yml"],
        &dir,
    );
    assert_eq!(test.code, 0, "{}{}", test.stdout, test.stderr);
}

#[test]
fn shell_completions_and_manual_pages_come_from_the_command_line_definition() {
    let tmp = portcullis_testkit::temp_dir();
    let d = tmp.path();
    let bin = env!("CARGO_BIN_EXE_portcullis");
    // bash completes subcommands and their subcommands.
    if let Some(bash) = require_tool("bash") {
        let script = format!(
            "source <({bin} completions bash) && complete -p portcullis && \
             COMP_WORDS=(portcullis pk); COMP_CWORD=1; _portcullis portcullis pk portcullis; \
             echo \"words: ${{COMPREPLY[*]}}\"; \
             COMP_WORDS=(portcullis pki is); COMP_CWORD=2; _portcullis portcullis is pki; \
             echo \"words: ${{COMPREPLY[*]}}\""
        );
        let r = run(&bash, &["-c", &script], d);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        assert!(
            r.stdout.contains("-F _portcullis portcullis"),
            "{}",
            r.stdout
        );
        assert!(r.stdout.contains("words: pki\n"), "{}", r.stdout);
        assert!(r.stdout.contains("words: issue\n"), "{}", r.stdout);
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let r = run(bin, &["completions", shell], d);
        assert_eq!(r.code, 0, "{shell}: {}", r.stderr);
        assert!(r.stdout.contains("truststore"), "{shell}");
    }
    let bad = run(bin, &["completions", "tcsh"], d);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("possible values"), "{}", bad.stderr);
    // One page per command, each valid roff (groff with preconv reports no warning), saying
    // what `--help` says.
    let r = run(bin, &["man", "--out", "man1"], d);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let pages: Vec<PathBuf> = std::fs::read_dir(d.join("man1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(pages.len() > 50, "{} pages", pages.len());
    for name in [
        "portcullis.1",
        "portcullis-serve.1",
        "portcullis-pki-issue.1",
        "portcullis-cert-update.1",
    ] {
        assert!(d.join("man1").join(name).exists(), "{name}");
    }
    let issue = std::fs::read_to_string(d.join("man1/portcullis-pki-issue.1")).unwrap();
    assert!(
        issue.starts_with(".ie") || issue.contains(".TH portcullis-pki-issue 1"),
        "{issue}"
    );
    assert!(issue.contains("issuer\\-cert"), "{issue}");
    if let Some(groff) = require_tool("groff") {
        for page in &pages {
            let p = page.to_str().unwrap();
            let r = run(&groff, &["-k", "-man", "-Tutf8", "-ww", "-z", p], d);
            assert_eq!(r.code, 0, "{p}: {}", r.stderr);
            assert!(r.stderr.is_empty(), "{p}: {}", r.stderr);
        }
    }
}

/// Purges the package when the test ends, passed or not.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = std::process::Command::new("dpkg")
            .args(["--purge", "portcullis"])
            .output();
    }
}

/// `GET /healthz` on an admin port (its certificate is the node's own, not checked here).
fn healthz(curl: &Path, port: u16, d: &Path) -> portcullis_testkit::Run {
    run(
        curl,
        &[
            "-sSk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("https://127.0.0.1:{port}/healthz"),
        ],
        d,
    )
}

#[test]
fn the_debian_package_installs_a_hardened_service_that_runs_as_its_own_user() {
    use std::io::BufRead;
    use std::os::unix::fs::MetadataExt;
    // dpkg -i needs root (CI runs as root).
    let root = run("id", &["-u"], Path::new("/")).stdout.trim() == "0";
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "the package test installs with dpkg -i and needs root"
        );
        eprintln!("SKIP: not root");
        return;
    }
    let (Some(dpkg), Some(analyze), Some(runuser), Some(curl)) = (
        require_tool("dpkg"),
        require_tool("systemd-analyze"),
        require_tool("runuser"),
        require_tool("curl"),
    ) else {
        return;
    };
    let tmp = portcullis_testkit::temp_dir();
    let d = tmp.path();
    let deb = d.join("portcullis.deb");
    let built = std::process::Command::new(repo().join("scripts/package-deb"))
        .args([env!("CARGO_BIN_EXE_portcullis"), deb.to_str().unwrap()])
        .env("DEB_COMPRESS", "none")
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let _guard = Installed;
    let installed = run(&dpkg, &["-i", deb.to_str().unwrap()], d);
    assert_eq!(
        installed.code, 0,
        "{}{}",
        installed.stdout, installed.stderr
    );
    // Installing it again (an upgrade's path through the maintainer scripts) works too, and the
    // configuration stays readable by the service's group only.
    let again = run(&dpkg, &["-i", deb.to_str().unwrap()], d);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    let conf = std::fs::metadata("/etc/portcullis/portcullis.toml").unwrap();
    assert_eq!(conf.mode() & 0o777, 0o640);
    // The unit: systemd's own check passes, and it is locked down.
    let unit_path = "/lib/systemd/system/portcullis.service";
    let verify = run(&analyze, &["verify", unit_path], d);
    assert_eq!(verify.code, 0, "{}{}", verify.stdout, verify.stderr);
    let unit = std::fs::read_to_string(unit_path).unwrap();
    for line in [
        "User=portcullis",
        "StateDirectory=portcullis",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    // Its own user, without a login; the state directory private to it.
    let user = run("getent", &["passwd", "portcullis"], d).stdout;
    assert!(user.trim_end().ends_with(":/usr/sbin/nologin"), "{user}");
    let state = std::fs::metadata("/var/lib/portcullis").unwrap();
    assert_eq!(state.mode() & 0o777, 0o700);
    let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
    assert_eq!(state.uid(), uid);
    // Completions and manual pages are installed.
    assert!(Path::new("/usr/share/bash-completion/completions/portcullis").exists());
    assert!(Path::new("/usr/share/man/man1/portcullis-serve.1.gz").exists());
    // The service's own command line, as its user: the operator's one edit (ports, here any
    // free ones) and it serves, with its keys private to it.
    let config = std::fs::read_to_string("/etc/portcullis/portcullis.toml").unwrap();
    std::fs::write(
        "/etc/portcullis/portcullis.toml",
        config.replace(":8443", ":0").replace(":9443", ":0"),
    )
    .unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let mut words: Vec<&str> = vec!["-u", "portcullis", "--"];
    words.extend(exec.split_whitespace());
    let mut child = std::process::Command::new(&runuser)
        .args(&words)
        .current_dir("/")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut admin, mut serving) = (None, None);
    while admin.is_none() || serving.is_none() {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            panic!("the service stopped: {err}");
        };
        let port = |l: &str| {
            l.rsplit(':')
                .next()
                .and_then(|p| p.split_whitespace().next())
                .and_then(|p| p.parse::<u16>().ok())
        };
        if let Some(rest) = line.strip_prefix("portcullis admin API on https://127.0.0.1:") {
            admin = rest.trim().parse::<u16>().ok();
        } else if let Some(rest) = line.strip_prefix("portcullis is serving on ") {
            serving = port(rest.split(' ').next().unwrap_or(""));
        }
    }
    let health = healthz(&curl, admin.unwrap(), d);
    assert_eq!(health.stdout, "200", "{}", health.stderr);
    // The gateway's port answers TLS with the local CA's certificate for localhost.
    let tls = run(
        &curl,
        &[
            "-sS",
            "--cacert",
            "/var/lib/portcullis/ca/ca.pem",
            "--resolve",
            &format!("localhost:{}:127.0.0.1", serving.unwrap()),
            &format!("https://localhost:{}/", serving.unwrap()),
        ],
        d,
    );
    // No client certificate: the handshake is refused (mode = "required"), after the server's
    // certificate verified (curl names the alert, not an unknown CA).
    assert_ne!(tls.code, 0);
    assert!(
        !tls.stderr.contains("unable to get local issuer"),
        "{}",
        tls.stderr
    );
    let key = std::fs::metadata("/var/lib/portcullis/ca/ca.key").unwrap();
    assert_eq!(key.uid(), uid, "the CA key belongs to the service user");
    assert_eq!(key.mode() & 0o777, 0o600);
    let _ = run("kill", &["-TERM", &child.id().to_string()], d);
    let _ = child.wait();
    // Purge takes the user and the state with it.
    let purged = run(&dpkg, &["--purge", "portcullis"], d);
    assert_eq!(purged.code, 0, "{}", purged.stderr);
    assert!(!Path::new("/var/lib/portcullis").exists());
    assert_ne!(run("getent", &["passwd", "portcullis"], d).code, 0);
}

/// The container image (deploy/docker/Dockerfile), built with buildah from the binary under
/// test and a Debian 12 base made here with debootstrap (no container registry is reachable:
/// the image is what `--build-arg BINARY=prebuilt` builds on `debian:bookworm-slim`): it runs
/// as its own unprivileged user, serves with a mounted read-only configuration, and writes
/// nothing outside its state volume and /tmp (so it runs on a read-only root file system).
#[test]
fn the_container_image_runs_as_its_own_user_and_writes_only_its_state_volume() {
    use std::io::BufRead;
    // buildah's chroot isolation needs root (CI runs as root).
    if run("id", &["-u"], Path::new("/")).stdout.trim() != "0" {
        assert!(
            std::env::var_os("CI").is_none(),
            "the container test builds with buildah and needs root"
        );
        eprintln!("SKIP: not root");
        return;
    }
    let (Some(buildah), Some(debootstrap), Some(curl)) = (
        require_tool("buildah"),
        require_tool("debootstrap"),
        require_tool("curl"),
    ) else {
        return;
    };
    let tmp = portcullis_testkit::temp_dir();
    let d = tmp.path();
    let storage = [
        "--root",
        &d.join("storage").to_string_lossy(),
        "--runroot",
        &d.join("run").to_string_lossy(),
        "--storage-driver",
        "vfs",
    ]
    .map(String::from);
    let bah = |args: &[&str]| {
        let mut all: Vec<&str> = storage.iter().map(String::as_str).collect();
        all.extend(args);
        let r = run(&buildah, &all, d);
        assert_eq!(r.code, 0, "buildah {args:?}: {}{}", r.stdout, r.stderr);
        r.stdout.trim().to_string()
    };
    // debian:bookworm-slim, made from the Debian mirror apt uses.
    let sources =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let mirror = sources
        .lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .and_then(|u| u.split_whitespace().next())
        .unwrap_or("http://deb.debian.org/debian")
        .to_string();
    let made = run(
        &debootstrap,
        &["--variant=minbase", "bookworm", "rootfs", &mirror],
        d,
    );
    assert_eq!(made.code, 0, "{}{}", made.stdout, made.stderr);
    let base = bah(&["from", "scratch"]);
    let mount = bah(&["mount", &base]);
    let copied = run("cp", &["-a", "rootfs/.", &mount], d);
    assert_eq!(copied.code, 0, "{}", copied.stderr);
    bah(&["umount", &base]);
    bah(&["commit", "-q", &base, "localhost/debian:bookworm-slim"]);
    // The build context: the Dockerfile, the configuration it installs, and the binary.
    let ctx = d.join("ctx");
    for file in ["deploy/docker/Dockerfile", "deploy/debian/portcullis.toml"] {
        std::fs::create_dir_all(ctx.join(file).parent().unwrap()).unwrap();
        std::fs::copy(repo().join(file), ctx.join(file)).unwrap();
    }
    std::fs::create_dir_all(ctx.join("target/release")).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_portcullis"),
        ctx.join("target/release/portcullis"),
    )
    .unwrap();
    bah(&[
        "build",
        "--isolation",
        "chroot",
        "--pull=never",
        "--build-arg",
        "BINARY=prebuilt",
        "-f",
        "ctx/deploy/docker/Dockerfile",
        "-t",
        "localhost/portcullis:test",
        "ctx",
    ]);
    let ctr = bah(&["from", "--pull=never", "localhost/portcullis:test"]);
    let config = bah(&[
        "inspect",
        "--format",
        "{{.OCIv1.Config.User}} {{.OCIv1.Config.Entrypoint}}",
        &ctr,
    ]);
    assert!(
        config.starts_with("10001:10001 [/usr/bin/portcullis serve --config /etc/portcullis/portcullis.toml --data-dir /var/lib/portcullis]"),
        "{config}"
    );
    // Run as documented: the operator's configuration mounted read-only (here: any free ports).
    let shipped = std::fs::read_to_string(repo().join("deploy/debian/portcullis.toml")).unwrap();
    std::fs::write(
        d.join("portcullis.toml"),
        shipped.replace(":8443", ":0").replace(":9443", ":0"),
    )
    .unwrap();
    let since = std::time::SystemTime::now();
    let volume = format!(
        "{}:/etc/portcullis/portcullis.toml:ro",
        d.join("portcullis.toml").display()
    );
    let mut args: Vec<String> = storage.to_vec();
    args.extend(
        [
            "run",
            "--isolation",
            "chroot",
            "--volume",
            &volume,
            &ctr,
            "--",
            "sh",
            "-c",
            // The entrypoint's command line; once it serves, who owns what it made in its state
            // volume (the image's VOLUME: a fresh volume, as `docker run -v NAME:…` gives).
            "/usr/bin/portcullis serve --config /etc/portcullis/portcullis.toml \
             --data-dir /var/lib/portcullis | while IFS= read -r line; do echo \"$line\"; \
             case \"$line\" in 'portcullis is serving on '*) stat -c 'state %u %a %n' \
             /var/lib/portcullis/registry.db /var/lib/portcullis/ca/ca.key;; esac; done",
        ]
        .map(String::from),
    );
    let mut child = std::process::Command::new(&buildah)
        .args(&args)
        .current_dir(d)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut admin, mut owners) = (None, Vec::new());
    while owners.len() < 2 {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("the container stopped before serving");
        };
        if let Some(rest) = line.strip_prefix("portcullis admin API on https://127.0.0.1:") {
            admin = rest.trim().parse::<u16>().ok();
        } else if let Some(rest) = line.strip_prefix("state ") {
            owners.push(rest.to_string());
        }
    }
    let health = healthz(&curl, admin.unwrap(), d);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    assert_eq!(health.stdout, "200", "{}", health.stderr);
    // Its user owns the state it made; nothing else in the image changed.
    let mount = bah(&["mount", &ctr]);
    let root = Path::new(&mount);
    assert!(
        owners[0].starts_with("10001 ") && owners[0].ends_with("/var/lib/portcullis/registry.db"),
        "the registry belongs to the image's user: {owners:?}"
    );
    assert_eq!(owners[1], "10001 600 /var/lib/portcullis/ca/ca.key");
    let mut changed = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let first = rel
                .components()
                .next()
                .map(|c| c.as_os_str().to_string_lossy().into_owned());
            if matches!(
                first.as_deref(),
                Some("proc" | "sys" | "dev" | "tmp" | "run")
            ) || rel.starts_with("var/lib/portcullis")
            {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.modified().is_ok_and(|m| m > since) {
                changed.push(rel.display().to_string());
            }
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    bah(&["umount", &ctr]);
    assert!(
        changed.is_empty(),
        "written outside the state volume: {changed:?}"
    );
}
