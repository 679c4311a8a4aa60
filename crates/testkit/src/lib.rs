//! Test-only helpers shared by Portcullis' test suites: temporary directories, finding external
//! tools (openssl, curl, pk12util), running processes with their output captured, and the few
//! certificates Portcullis itself refuses to make (already expired ones), built with rcgen.
//!
//! This crate depends on no product crate, so that a crate's own tests never see two copies of
//! its types.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use tempfile::TempDir;

/// A fresh temporary directory, removed when dropped.
pub fn temp_dir() -> TempDir {
    // Invariant for tests: the system temp dir is writable.
    tempfile::tempdir().unwrap_or_else(|e| panic!("creating a temporary directory: {e}"))
}

/// The path of an external tool on PATH, if installed.
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// The path of a tool the tests need. In CI (`CI` set) a missing tool fails the test, because the
/// test command installs it; elsewhere the test is told to skip and says so.
pub fn require_tool(name: &str) -> Option<PathBuf> {
    match tool(name) {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => {
            panic!("{name} is not installed; the test command (scripts/test) installs it")
        }
        None => {
            eprintln!("SKIP: {name} is not installed (run scripts/test to install it)");
            None
        }
    }
}

/// The output of a finished process.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl Run {
    /// Panics with both outputs unless the process exited 0.
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "command failed:\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs `program` with `args` in `dir`, capturing output.
pub fn run(program: impl AsRef<Path>, args: &[&str], dir: &Path) -> Run {
    let program = program.as_ref();
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()))
        .into()
}

/// Issues a client certificate (EKU clientAuth) whose validity ended a year before now, signed by
/// the CA in `ca_cert_pem` / `ca_key_pem` (PKCS#8). Returns the certificate and key as PEM.
pub fn expired_client_certificate(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    cn: &str,
) -> (String, String) {
    use rcgen::{
        CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SerialNumber,
    };
    let ca_key = KeyPair::from_pem(ca_key_pem).unwrap_or_else(|e| panic!("CA key: {e}"));
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)
        .unwrap_or_else(|e| panic!("CA certificate: {e}"));
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("key: {e}"));
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(730);
    params.not_after = now - time::Duration::days(365);
    params.serial_number = Some(SerialNumber::from_slice(&[
        0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x01,
    ]));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &issuer)
        .unwrap_or_else(|e| panic!("signing: {e}"));
    (cert.pem(), key.serialize_pem())
}
