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
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Debian installs servers (nats-server…) in sbin, which a user's PATH may lack.
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
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
    client_certificate_valid(ca_cert_pem, ca_key_pem, cn, -730, -365)
}

/// Issues a client certificate valid from `from_days` to `to_days` days from now (negative: in
/// the past), signed by the CA in `ca_cert_pem` / `ca_key_pem` (PKCS#8). Returns the certificate
/// and key as PEM.
pub fn client_certificate_valid(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    cn: &str,
    from_days: i64,
    to_days: i64,
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
    params.not_before = now + time::Duration::days(from_days);
    params.not_after = now + time::Duration::days(to_days);
    // Distinct serials from the clock (rcgen would derive one from the key otherwise).
    let mut serial = now.unix_timestamp_nanos().to_be_bytes()[4..].to_vec();
    serial[0] = 0x11;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &issuer)
        .unwrap_or_else(|e| panic!("signing: {e}"));
    (cert.pem(), key.serialize_pem())
}

/// A CRL (PEM) naming the CA in `ca_cert_pem` as its issuer, signed with `signing_key_pem`
/// (PKCS#8; another key than the CA's makes a CRL with a bad signature), its thisUpdate and
/// nextUpdate `this_days` and `next_days` days from now (negative: in the past).
pub fn crl(ca_cert_pem: &str, signing_key_pem: &str, this_days: i64, next_days: i64) -> String {
    use rcgen::{CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, SerialNumber};
    let key = KeyPair::from_pem(signing_key_pem).unwrap_or_else(|e| panic!("key: {e}"));
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, key).unwrap_or_else(|e| panic!("CA: {e}"));
    let now = time::OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now + time::Duration::days(this_days),
        next_update: now + time::Duration::days(next_days),
        crl_number: SerialNumber::from_slice(&[0x01]),
        issuing_distribution_point: None,
        revoked_certs: Vec::new(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    params
        .signed_by(&issuer)
        .and_then(|c| c.pem())
        .unwrap_or_else(|e| panic!("CRL: {e}"))
}
