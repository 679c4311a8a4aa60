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
