//! What operators install beside the binary: the Prometheus alerting rules (deploy/prometheus),
//! checked by Prometheus's own tool and against the metrics the code emits.

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

#[test]
fn alert_rules_pass_promtool_and_name_only_metrics_the_nodes_export() {
    let dir = repo().join("deploy/prometheus");
    let rules = std::fs::read_to_string(dir.join("portcullis-rules.yml")).unwrap();
    // Each metric a rule reads is one the code exports (histograms by their base name): a
    // renamed metric would otherwise leave an alert that never fires.
    let mut code = String::new();
    for krate in ["gateway", "node", "admin", "registry", "mqtt"] {
        sources(&repo().join("crates").join(krate).join("src"), &mut code);
    }
    let mut named = 0;
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !word.starts_with("portcullis_") {
            continue;
        }
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| word.strip_suffix(s))
            .unwrap_or(word);
        assert!(
            code.contains(&format!("\"{base}\"")) || code.contains(&format!("{base}{{")),
            "deploy/prometheus/portcullis-rules.yml reads {word}, which no node exports"
        );
        named += 1;
    }
    assert!(named >= 8, "{named} metric references");
    let Some(promtool) = require_tool("promtool") else {
        return;
    };
    let check = run(&promtool, &["check", "rules", "portcullis-rules.yml"], &dir);
    assert_eq!(check.code, 0, "{}{}", check.stdout, check.stderr);
    assert!(
        check.stdout.contains("SUCCESS: 8 rules found"),
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
