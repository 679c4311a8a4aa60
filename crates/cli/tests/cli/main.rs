//! Whole-product tests: drive the built `portcullis` binary over real files and sockets, and
//! check what it makes and serves with the real `openssl`, `curl` and NSS `pk12util`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod abuse;
mod acme;
mod attacks;
mod browser;
mod cluster;
mod control;
mod fleet;
mod layout;
mod mqtt;
mod nodes;
mod operations;
mod pki;
mod policy;
mod proxy;
mod revocation;
mod serve;
mod webhook;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use portcullis_testkit::{Run, require_tool, run};
use serde_json::Value;

pub(crate) fn portcullis(dir: &Path, args: &[&str]) -> Run {
    run(env!("CARGO_BIN_EXE_portcullis"), args, dir)
}

/// Runs a command line as the product printed it (`curl --cert … URL`) with `program` in place of
/// its first word.
pub(crate) fn run_printed(program: &Path, line: &str, dir: &Path) -> Run {
    let args: Vec<&str> = line.split_whitespace().skip(1).collect();
    run(program, &args, dir)
}

pub(crate) fn openssl(dir: &Path, args: &[&str]) -> Option<Run> {
    let bin = require_tool("openssl")?;
    Some(run(bin, args, dir))
}

/// A root CA in `dir/root`.
pub(crate) fn root(dir: &Path) {
    portcullis(
        dir,
        &[
            "pki",
            "ca",
            "create",
            "--cn",
            "Test Root",
            "--org",
            "Portcullis Tests",
            "--out",
            "root",
        ],
    )
    .ok();
}

pub(crate) fn intermediate(dir: &Path, name: &str, parent: &str) {
    portcullis(
        dir,
        &[
            "pki",
            "ca",
            "create",
            "--cn",
            name,
            "--out",
            name,
            "--issuer-cert",
            &format!("{parent}/ca.pem"),
            "--issuer-key",
            &format!("{parent}/ca.key"),
        ],
    )
    .ok();
}

pub(crate) fn leaf(dir: &Path, profile: &str, cn: &str, ca: &str, extra: &[&str]) {
    let mut args = vec![
        "pki",
        "issue",
        "--profile",
        profile,
        "--cn",
        cn,
        "--out",
        ".",
        "--name",
        cn,
    ];
    let cert = format!("{ca}/ca.pem");
    let key = format!("{ca}/ca.key");
    args.extend(["--issuer-cert", &cert, "--issuer-key", &key]);
    args.extend(extra);
    portcullis(dir, &args).ok();
}

pub(crate) fn json(run: Run) -> Value {
    serde_json::from_str(&run.ok().stdout).expect("valid JSON")
}

pub(crate) fn mode(path: PathBuf) -> u32 {
    std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

pub(crate) fn assert_rejected(run: &Run, code: &str) {
    assert_eq!(
        run.code, 1,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    assert!(
        run.stdout.starts_with(&format!("REJECTED {code}: ")),
        "expected REJECTED {code}, got: {}",
        run.stdout
    );
    assert_eq!(run.stdout.trim_end().lines().count(), 1, "{}", run.stdout);
}

/// A one-line error on stderr, the given exit code, no panic, nothing on stdout.
pub(crate) fn assert_clean_error(run: &Run, code: i32, needle: &str) {
    assert_eq!(
        run.code, code,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    assert!(run.stderr.starts_with("error: "), "{}", run.stderr);
    assert_eq!(
        run.stderr.trim_end().lines().count(),
        1,
        "not one line: {}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(
        run.stderr.contains(needle),
        "expected '{needle}' in: {}",
        run.stderr
    );
}
