//! `portcullis pki …`: a thin shell over `portcullis-pki`. Each command reads its inputs, calls
//! the library, and writes all its outputs at once (see `portcullis_node::output`).

use portcullis_node::{out, outln};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use portcullis_pki::cert::inspect;
use portcullis_pki::crl::{self, Crl};
use portcullis_pki::issue::{self, random_serial};
use portcullis_pki::p12::{self, P12Format};
use portcullis_pki::verify::verify;
use portcullis_pki::{
    CaIssuer, Certificate, IssueRequest, KeyType, PrivateKey, Profile, SubjectAltName, SubjectName,
    Truststore, Usage, Verdict, VerifyOptions, VerifyProfile,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use portcullis_node::output::{Outputs, read};

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Make a demo PKI: root, intermediate, localhost server and client certificates, a .p12.
    Quickstart(QuickstartArgs),
    /// Certificate authorities.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue a client or server certificate with a new key.
    Issue(IssueArgs),
    /// Sign a certificate signing request (CSR), e.g. one made by `openssl req`.
    SignCsr(SignCsrArgs),
    /// Print every certificate, CSR and CRL in a PEM or DER file.
    Inspect(InspectArgs),
    /// Verify a certificate against a truststore: exit 0 and OK, or exit 1 and REJECTED <reason>.
    Verify(VerifyArgs),
    /// Truststores (PEM bundles of CA certificates).
    #[command(subcommand)]
    Truststore(TruststoreCommand),
    /// Bundle a certificate, its key and chain as PKCS#12 for keychains, browsers and MDM.
    ExportP12(ExportP12Args),
    /// Certificate revocation lists.
    #[command(subcommand)]
    Crl(CrlCommand),
    /// Make a proof-of-possession certificate (CN = registration code) signed by a CA's key.
    VerificationCert(VerificationCertArgs),
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a root CA, or an intermediate with --issuer-cert/--issuer-key.
    Create(CaCreateArgs),
}

#[derive(Debug, Subcommand)]
pub enum TruststoreCommand {
    /// Check a PEM bundle as the gateway would use it and report warnings per certificate.
    Lint(LintArgs),
}

#[derive(Debug, Subcommand)]
pub enum CrlCommand {
    /// Create a CRL signed by a CA.
    Create(CrlCreateArgs),
}

#[derive(Debug, Args)]
pub struct SubjectArgs {
    /// Common name.
    #[arg(long)]
    cn: String,
    /// Organization.
    #[arg(long)]
    org: Option<String>,
    /// Organizational unit.
    #[arg(long)]
    ou: Option<String>,
    /// Two-letter country code.
    #[arg(long)]
    country: Option<String>,
}

impl SubjectArgs {
    fn subject(&self) -> SubjectName {
        SubjectName {
            common_name: self.cn.clone(),
            organization: self.org.clone(),
            organizational_unit: self.ou.clone(),
            country: self.country.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KeyTypeArg {
    #[value(name = "ec-p256")]
    EcP256,
    #[value(name = "ec-p384")]
    EcP384,
    #[value(name = "ed25519")]
    Ed25519,
    #[value(name = "rsa-2048")]
    Rsa2048,
    #[value(name = "rsa-3072")]
    Rsa3072,
    #[value(name = "rsa-4096")]
    Rsa4096,
}

impl From<KeyTypeArg> for KeyType {
    fn from(k: KeyTypeArg) -> Self {
        match k {
            KeyTypeArg::EcP256 => KeyType::EcP256,
            KeyTypeArg::EcP384 => KeyType::EcP384,
            KeyTypeArg::Ed25519 => KeyType::Ed25519,
            KeyTypeArg::Rsa2048 => KeyType::Rsa2048,
            KeyTypeArg::Rsa3072 => KeyType::Rsa3072,
            KeyTypeArg::Rsa4096 => KeyType::Rsa4096,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProfileArg {
    Client,
    Server,
}

impl From<ProfileArg> for Profile {
    fn from(p: ProfileArg) -> Self {
        match p {
            ProfileArg::Client => Profile::Client,
            ProfileArg::Server => Profile::Server,
        }
    }
}

#[derive(Debug, Args)]
pub struct IssuerArgs {
    /// Issuing CA certificate (PEM; may be followed by the CA's own chain).
    #[arg(long, value_name = "F")]
    issuer_cert: Option<PathBuf>,
    /// Issuing CA private key.
    #[arg(long, value_name = "F")]
    issuer_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Output directory.
    #[arg(long, value_name = "DIR", default_value = "portcullis-pki")]
    out: PathBuf,
    /// Replace an existing quickstart PKI in DIR.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct CaCreateArgs {
    #[command(flatten)]
    subject: SubjectArgs,
    /// Output directory: ca.pem, ca.key (0600), chain.pem.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Key type.
    #[arg(long, value_enum, default_value = "ec-p256")]
    key_type: KeyTypeArg,
    /// Lifetime in days [default: 3650].
    #[arg(long)]
    days: Option<u32>,
    /// How many CA levels may follow below this CA.
    #[arg(long)]
    path_len: Option<u8>,
    #[command(flatten)]
    issuer: IssuerArgs,
    /// Permitted DNS subtree (name constraint); repeatable.
    #[arg(long = "permit-dns", value_name = "DOMAIN")]
    permit_dns: Vec<String>,
    /// Permitted IP range in CIDR form (name constraint); repeatable.
    #[arg(long = "permit-ip", value_name = "CIDR")]
    permit_ip: Vec<String>,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// client (EKU clientAuth) or server (EKU serverAuth).
    #[arg(long, value_enum)]
    profile: ProfileArg,
    #[command(flatten)]
    subject: SubjectArgs,
    /// Subject alternative name: dns:NAME, ip:ADDR, email:ADDR or uri:URI; repeatable.
    #[arg(long = "san", value_name = "TYPE:VALUE")]
    sans: Vec<String>,
    #[command(flatten)]
    issuer: IssuerArgs,
    /// Output directory.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Base name of the files: NAME.pem, NAME.key, NAME.chain.pem [default: from the CN].
    #[arg(long, value_name = "BASENAME")]
    name: Option<String>,
    /// Key type.
    #[arg(long, value_enum, default_value = "ec-p256")]
    key_type: KeyTypeArg,
    /// Lifetime in days [default: 365 for client, 90 for server].
    #[arg(long)]
    days: Option<u32>,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct SignCsrArgs {
    /// The CSR (PEM or DER).
    #[arg(long, value_name = "F")]
    csr: PathBuf,
    /// client or server: decides every extension; the CSR's requested extensions are ignored.
    #[arg(long, value_enum)]
    profile: ProfileArg,
    #[command(flatten)]
    issuer: IssuerArgs,
    /// Output certificate file (PEM).
    #[arg(long, value_name = "F")]
    out: PathBuf,
    /// Lifetime in days [default: 365 for client, 90 for server].
    #[arg(long)]
    days: Option<u32>,
    /// Subject alternative name: dns:NAME, ip:ADDR, email:ADDR or uri:URI; repeatable.
    #[arg(long = "san", value_name = "TYPE:VALUE")]
    sans: Vec<String>,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// PEM or DER file with certificates, CSRs or CRLs.
    file: PathBuf,
    /// Print JSON with stable field names.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum UsageArg {
    Client,
    Server,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Truststore: PEM bundle of roots (and intermediates).
    #[arg(long, value_name = "F")]
    trust: PathBuf,
    /// Intermediates the peer would present.
    #[arg(long, value_name = "F")]
    chain: Option<PathBuf>,
    /// What the certificate must be good for.
    #[arg(long, value_enum, default_value = "client")]
    usage: UsageArg,
    /// Verify as of this time (RFC 3339) instead of now.
    #[arg(long, value_name = "RFC3339")]
    at: Option<String>,
    /// Most CA levels, root included.
    #[arg(long, default_value_t = 4)]
    max_depth: u8,
    /// CRL to check the chain against; repeatable.
    #[arg(long = "crl", value_name = "F")]
    crls: Vec<PathBuf>,
    /// DNS name or IP address the certificate must be valid for.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// compatible (default): what OpenSSL and API Gateway accept (v1 anchors and leaves, pinned
    /// partner certificates, no EKU, non-critical basic constraints); strict: RFC 5280 to the
    /// letter. The gateway's `mtls.verification` uses the same profiles.
    #[arg(long, value_parser = ["compatible", "strict"], default_value = "compatible")]
    profile: String,
    /// Under the strict profile, accept a certificate without an extended key usage extension
    /// (the compatible profile always does: RFC 5280 "any purpose").
    #[arg(long)]
    allow_no_eku: bool,
    /// The certificate to verify (PEM or DER; certificates after the first are taken as its chain).
    cert: PathBuf,
}

#[derive(Debug, Args)]
pub struct LintArgs {
    /// The PEM bundle.
    file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ExportP12Args {
    /// The certificate.
    #[arg(long, value_name = "F")]
    cert: PathBuf,
    /// Its private key.
    #[arg(long, value_name = "F")]
    key: PathBuf,
    /// Chain to include (intermediates, optionally the root).
    #[arg(long, value_name = "F")]
    chain: Option<PathBuf>,
    /// Output .p12 file.
    #[arg(long, value_name = "F.p12")]
    out: PathBuf,
    /// File whose first line is the password.
    #[arg(
        long,
        value_name = "F",
        conflicts_with = "password_env",
        required_unless_present = "password_env"
    )]
    password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    #[arg(long, value_name = "VAR")]
    password_env: Option<String>,
    /// 3DES/SHA-1 for older keychains (macOS before 14, Windows 7).
    #[arg(long)]
    legacy: bool,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct CrlCreateArgs {
    #[command(flatten)]
    issuer: IssuerArgs,
    /// Serial to revoke (hex, colons optional); repeatable.
    #[arg(long = "revoke", value_name = "SERIAL")]
    revoke: Vec<String>,
    /// Days until the CRL's nextUpdate.
    #[arg(long, default_value_t = 30)]
    next_update_days: u32,
    /// Output CRL file (PEM).
    #[arg(long, value_name = "F")]
    out: PathBuf,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub struct VerificationCertArgs {
    /// The CA certificate being registered.
    #[arg(long, value_name = "F")]
    ca_cert: PathBuf,
    /// The CA's private key.
    #[arg(long, value_name = "F")]
    ca_key: PathBuf,
    /// The registration code (`portcullis ca registration-code`).
    #[arg(long)]
    code: String,
    /// Output directory: verification.pem, verification.key.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

/// Runs one `pki` command.
pub fn run(cmd: PkiCommand) -> Result<ExitCode> {
    match cmd {
        PkiCommand::Quickstart(a) => quickstart(a),
        PkiCommand::Ca(CaCommand::Create(a)) => ca_create(a),
        PkiCommand::Issue(a) => issue_leaf(a),
        PkiCommand::SignCsr(a) => sign_csr(a),
        PkiCommand::Inspect(a) => inspect_file(a),
        PkiCommand::Verify(a) => verify_cert(a),
        PkiCommand::Truststore(TruststoreCommand::Lint(a)) => lint(a),
        PkiCommand::ExportP12(a) => export_p12(a),
        PkiCommand::Crl(CrlCommand::Create(a)) => crl_create(a),
        PkiCommand::VerificationCert(a) => verification_cert(a),
    }
}

fn ca_create(a: CaCreateArgs) -> Result<ExitCode> {
    let issuer = load_optional_issuer(&a.issuer)?;
    let profile = if issuer.is_some() {
        Profile::IntermediateCa
    } else {
        Profile::RootCa
    };
    let mut req = IssueRequest::new(profile, a.subject.subject());
    if let Some(days) = a.days {
        req.days = days;
    }
    req.path_len = a.path_len;
    req.permitted_dns = a.permit_dns;
    req.permitted_ip = a.permit_ip;
    let mut out = Outputs::default();
    let (ca_pem, key_pem, chain_pem) = (
        a.out.join("ca.pem"),
        a.out.join("ca.key"),
        a.out.join("chain.pem"),
    );
    // Check before the (possibly slow, RSA) key generation.
    out.public(&ca_pem, Vec::new());
    out.secret(&key_pem, Vec::new());
    out.public(&chain_pem, Vec::new());
    out.check_absent(a.force)?;
    let key = PrivateKey::generate(a.key_type.into())?;
    let cert = issue::issue(&req, &key, issuer.as_ref())?;
    let mut chain = cert.to_pem();
    if let Some(ca) = &issuer {
        for c in ca.chain() {
            chain.push_str(&c.to_pem());
        }
    }
    let mut out = Outputs::default();
    out.public(&ca_pem, cert.to_pem());
    out.secret(&key_pem, key.to_pem());
    out.public(&chain_pem, chain);
    out.write(a.force)?;
    let kind = if issuer.is_some() {
        "intermediate CA"
    } else {
        "root CA"
    };
    outln!("created {kind} {}", cert.info().subject);
    outln!("  certificate: {}", ca_pem.display());
    outln!("  private key: {} (mode 0600)", key_pem.display());
    outln!("  chain:       {}", chain_pem.display());
    outln!("  valid until: {}", cert.info().not_after);
    Ok(ExitCode::SUCCESS)
}

fn issue_leaf(a: IssueArgs) -> Result<ExitCode> {
    let issuer = load_issuer(&a.issuer)?;
    let profile: Profile = a.profile.into();
    let mut req = IssueRequest::new(profile, a.subject.subject());
    req.subject_alt_names = parse_sans(&a.sans)?;
    if let Some(days) = a.days {
        req.days = days;
    }
    let base = match &a.name {
        Some(n) => n.clone(),
        None => basename_from_cn(&a.subject.cn),
    };
    if base.is_empty() || base.contains('/') {
        bail!("--name '{base}' must be a plain file name");
    }
    let paths = [
        a.out.join(format!("{base}.pem")),
        a.out.join(format!("{base}.key")),
        a.out.join(format!("{base}.chain.pem")),
    ];
    let mut probe = Outputs::default();
    for p in &paths {
        probe.public(p, Vec::new());
    }
    probe.check_absent(a.force)?;
    let key = PrivateKey::generate(a.key_type.into())?;
    let cert = issue::issue(&req, &key, Some(&issuer))?;
    let mut chain = cert.to_pem();
    for c in issuer.intermediates() {
        chain.push_str(&c.to_pem());
    }
    let mut out = Outputs::default();
    out.public(&paths[0], cert.to_pem());
    out.secret(&paths[1], key.to_pem());
    out.public(&paths[2], chain);
    out.write(a.force)?;
    outln!(
        "issued {} certificate {}",
        a.profile.name(),
        cert.info().subject
    );
    outln!("  certificate: {}", paths[0].display());
    outln!("  private key: {} (mode 0600)", paths[1].display());
    outln!(
        "  chain:       {} (leaf + intermediates)",
        paths[2].display()
    );
    outln!("  serial:      {}", cert.info().serial);
    outln!("  valid until: {}", cert.info().not_after);
    Ok(ExitCode::SUCCESS)
}

fn sign_csr(a: SignCsrArgs) -> Result<ExitCode> {
    let issuer = load_issuer(&a.issuer)?;
    let csr = read(&a.csr, "CSR")?;
    let profile: Profile = a.profile.into();
    let mut req = IssueRequest::new(profile, SubjectName::default());
    req.subject_alt_names = parse_sans(&a.sans)?;
    if let Some(days) = a.days {
        req.days = days;
    }
    let mut out = Outputs::default();
    out.public(&a.out, Vec::new());
    out.check_absent(a.force)?;
    let cert = issue::sign_csr(&csr, &req, &issuer)
        .with_context(|| format!("signing CSR {}", a.csr.display()))?;
    let mut out = Outputs::default();
    out.public(&a.out, cert.to_pem());
    out.write(a.force)?;
    outln!(
        "signed {} certificate {}",
        a.profile.name(),
        cert.info().subject
    );
    outln!("  certificate: {}", a.out.display());
    outln!("  serial:      {}", cert.info().serial);
    outln!("  valid until: {}", cert.info().not_after);
    Ok(ExitCode::SUCCESS)
}

fn inspect_file(a: InspectArgs) -> Result<ExitCode> {
    let input = read(&a.file, "file")?;
    let items = inspect(&input).with_context(|| format!("inspecting {}", a.file.display()))?;
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&items)?);
    } else {
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                outln!();
            }
            if items.len() > 1 {
                outln!("#{}", i + 1);
            }
            out!("{item}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn verify_cert(a: VerifyArgs) -> Result<ExitCode> {
    let trust_bytes = read(&a.trust, "truststore")?;
    let store = Truststore::from_pem(&trust_bytes)
        .with_context(|| format!("reading truststore {}", a.trust.display()))?;
    let cert_bytes = read(&a.cert, "certificate")?;
    let (leaf, mut presented) = Certificate::first_and_rest(&cert_bytes)
        .with_context(|| format!("reading certificate {}", a.cert.display()))?;
    if let Some(chain) = &a.chain {
        let bytes = read(chain, "chain")?;
        let certs = Certificate::all_from_pem_or_der(&bytes)
            .with_context(|| format!("reading chain {}", chain.display()))?;
        presented.extend(certs.into_iter().filter(|c| c.der() != leaf.der()));
    }
    let mut crls = Vec::new();
    for path in &a.crls {
        let bytes = read(path, "CRL")?;
        crls.extend(
            Crl::all_from_pem_or_der(&bytes)
                .with_context(|| format!("reading CRL {}", path.display()))?,
        );
    }
    let at = match &a.at {
        Some(text) => Some(
            OffsetDateTime::parse(text, &Rfc3339)
                .map_err(|_| {
                    anyhow!("--at '{text}' is not an RFC 3339 time such as 2026-01-31T12:00:00Z")
                })?
                .unix_timestamp(),
        ),
        None => None,
    };
    if a.max_depth == 0 {
        bail!("--max-depth must be at least 1");
    }
    let profile: VerifyProfile = a.profile.parse()?;
    let base = VerifyOptions::for_profile(profile);
    let opts = VerifyOptions {
        usage: match a.usage {
            UsageArg::Client => Usage::Client,
            UsageArg::Server => Usage::Server,
        },
        at,
        max_depth: a.max_depth,
        crls,
        expected_name: a.name.clone(),
        require_eku: base.require_eku && !a.allow_no_eku,
        ..base
    };
    match verify(&leaf, &presented, &store, &opts) {
        Verdict::Valid { chain } => {
            outln!("OK");
            let last = chain.len().saturating_sub(1);
            for (i, c) in chain.iter().enumerate() {
                let role = if i == last { " (trust anchor)" } else { "" };
                outln!("  {i}: {}{role}", c.info().subject);
                outln!("     SHA-256 {}", c.info().sha256_fingerprint);
            }
            Ok(ExitCode::SUCCESS)
        }
        Verdict::Rejected {
            reason,
            explanation,
        } => {
            outln!("REJECTED {}: {explanation}", reason.code());
            Ok(ExitCode::from(1))
        }
    }
}

fn lint(a: LintArgs) -> Result<ExitCode> {
    let bytes = read(&a.file, "truststore")?;
    let store = Truststore::from_pem(&bytes)
        .with_context(|| format!("linting truststore {}", a.file.display()))?;
    if a.json {
        let certs: Vec<_> = store
            .entries()
            .iter()
            .map(|e| {
                serde_json::json!({
                    "index": e.index,
                    "subject": e.certificate.info().subject,
                    "sha256_fingerprint": e.certificate.info().sha256_fingerprint,
                    "not_after": e.certificate.info().not_after,
                    "role": if e.duplicate { "ignored" } else if e.pinned_leaf() { "pinned" } else if e.anchor { "anchor" } else { "intermediate" },
                    "depth": e.depth,
                    "status": if e.warnings.is_empty() { "ok" } else { "warning" },
                    "warnings": e.warnings,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "file": a.file.display().to_string(),
            "certificates": certs,
            "anchors": store.anchors().len(),
            "intermediates": store.intermediates().len(),
            "warnings": store.store_warnings(),
            "warning_count": store.warning_count(),
        });
        outln!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        outln!(
            "{}: {} certificates ({} trust anchors, {} intermediates), {} warnings",
            a.file.display(),
            store.entries().len(),
            store.anchors().len(),
            store.intermediates().len(),
            store.warning_count()
        );
        for e in store.entries() {
            let role = if e.duplicate {
                "ignored"
            } else if e.pinned_leaf() {
                "pinned"
            } else if e.anchor {
                "anchor"
            } else {
                "intermediate"
            };
            let status = if e.warnings.is_empty() {
                "ok"
            } else {
                "WARNING"
            };
            outln!(
                "#{} {status} [{role}] {}\n    SHA-256 {}",
                e.index,
                e.certificate.info().subject,
                e.certificate.info().sha256_fingerprint
            );
            for w in &e.warnings {
                outln!("    warning {w}");
            }
        }
        for w in store.store_warnings() {
            outln!("warning {w}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn export_p12(a: ExportP12Args) -> Result<ExitCode> {
    let password = match (&a.password_file, &a.password_env) {
        (Some(path), _) => {
            let text = read(path, "password file")?;
            let text = String::from_utf8(text)
                .map_err(|_| anyhow!("password file {} is not UTF-8", path.display()))?;
            text.lines().next().unwrap_or_default().to_string()
        }
        (None, Some(var)) => std::env::var(var)
            .map_err(|_| anyhow!("environment variable {var} is not set (or not UTF-8)"))?,
        (None, None) => bail!("give --password-file F or --password-env VAR"),
    };
    let cert_bytes = read(&a.cert, "certificate")?;
    let (cert, rest) = Certificate::first_and_rest(&cert_bytes)
        .with_context(|| format!("reading certificate {}", a.cert.display()))?;
    let key_bytes = read(&a.key, "private key")?;
    let key = PrivateKey::from_pem_or_der(&key_bytes)
        .with_context(|| format!("reading private key {}", a.key.display()))?;
    let mut chain = rest;
    if let Some(path) = &a.chain {
        let bytes = read(path, "chain")?;
        chain = Certificate::all_from_pem_or_der(&bytes)
            .with_context(|| format!("reading chain {}", path.display()))?
            .into_iter()
            .filter(|c| c.der() != cert.der())
            .collect();
    }
    let format = if a.legacy {
        P12Format::Legacy
    } else {
        P12Format::Modern
    };
    let mut out = Outputs::default();
    out.secret(&a.out, Vec::new());
    out.check_absent(a.force)?;
    let der = p12::export(&cert, &key, &chain, &password, format)
        .with_context(|| format!("bundling {} with {}", a.cert.display(), a.key.display()))?;
    let mut out = Outputs::default();
    out.secret(&a.out, der);
    out.write(a.force)?;
    let kind = if a.legacy {
        "legacy 3DES/SHA-1"
    } else {
        "AES-256/PBKDF2"
    };
    outln!(
        "wrote {} ({kind}, {} certificates, mode 0600)",
        a.out.display(),
        chain.len() + 1
    );
    Ok(ExitCode::SUCCESS)
}

fn crl_create(a: CrlCreateArgs) -> Result<ExitCode> {
    let issuer = load_issuer(&a.issuer)?;
    let serials = a
        .revoke
        .iter()
        .map(|s| crl::parse_serial(s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Outputs::default();
    out.public(&a.out, Vec::new());
    out.check_absent(a.force)?;
    let crl = crl::create(&issuer, &serials, a.next_update_days)?;
    let mut out = Outputs::default();
    out.public(&a.out, crl.to_pem());
    out.write(a.force)?;
    outln!(
        "wrote CRL {} by {}: {} revoked, next update {}",
        a.out.display(),
        crl.info().issuer,
        crl.info().revoked.len(),
        crl.info().next_update.as_deref().unwrap_or("(none)")
    );
    Ok(ExitCode::SUCCESS)
}

fn verification_cert(a: VerificationCertArgs) -> Result<ExitCode> {
    let issuer = load_issuer(&IssuerArgs {
        issuer_cert: Some(a.ca_cert.clone()),
        issuer_key: Some(a.ca_key.clone()),
    })?;
    let code = a.code.trim();
    if code.is_empty()
        || code.len() > 64
        || !code.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        bail!(
            "--code '{code}' is not a registration code (up to 64 letters and digits, as `portcullis ca registration-code` prints)"
        );
    }
    let paths = [
        a.out.join("verification.pem"),
        a.out.join("verification.key"),
    ];
    let mut probe = Outputs::default();
    for p in &paths {
        probe.public(p, Vec::new());
    }
    probe.check_absent(a.force)?;
    let key = PrivateKey::generate(KeyType::EcP256)?;
    let req = IssueRequest::new(Profile::Verification, SubjectName::cn(code));
    let cert = issue::issue(&req, &key, Some(&issuer))?;
    let mut out = Outputs::default();
    out.public(&paths[0], cert.to_pem());
    out.secret(&paths[1], key.to_pem());
    out.write(a.force)?;
    outln!(
        "wrote verification certificate CN={code} signed by {}",
        issuer.certificate().info().subject
    );
    outln!("  certificate: {}", paths[0].display());
    Ok(ExitCode::SUCCESS)
}

fn quickstart(a: QuickstartArgs) -> Result<ExitCode> {
    let dir = &a.out;
    let root_dir = dir.join("root");
    let int_dir = dir.join("intermediate");
    let password_path = dir.join("client.p12.password");
    if root_dir.join("ca.pem").exists() && !a.force {
        outln!(
            "A quickstart PKI already exists in {} (pass --force to make a new one).",
            dir.display()
        );
        let password = std::fs::read_to_string(&password_path).unwrap_or_default();
        print_quickstart_guide(dir, password.trim());
        return Ok(ExitCode::SUCCESS);
    }
    let root_key = PrivateKey::generate(KeyType::EcP256)?;
    let mut root_req = IssueRequest::new(
        Profile::RootCa,
        SubjectName {
            common_name: "Portcullis Quickstart Root CA".into(),
            organization: Some("Portcullis Quickstart".into()),
            ..Default::default()
        },
    );
    root_req.path_len = Some(1);
    let root = issue::issue(&root_req, &root_key, None)?;
    let root_ca = CaIssuer::new(root.clone(), root_key, Vec::new())?;

    let int_key = PrivateKey::generate(KeyType::EcP256)?;
    let mut int_req = IssueRequest::new(
        Profile::IntermediateCa,
        SubjectName {
            common_name: "Portcullis Quickstart Intermediate CA".into(),
            organization: Some("Portcullis Quickstart".into()),
            ..Default::default()
        },
    );
    int_req.path_len = Some(0);
    int_req.days = 1825;
    let intermediate = issue::issue(&int_req, &int_key, Some(&root_ca))?;
    let int_key_pem = int_key.to_pem();
    let int_ca = CaIssuer::new(intermediate.clone(), int_key, vec![root.clone()])?;

    let server_key = PrivateKey::generate(KeyType::EcP256)?;
    let mut server_req = IssueRequest::new(Profile::Server, SubjectName::cn("localhost"));
    server_req.subject_alt_names = parse_sans(&[
        "dns:localhost".into(),
        "ip:127.0.0.1".into(),
        "ip:::1".into(),
    ])?;
    let server = issue::issue(&server_req, &server_key, Some(&int_ca))?;

    let client_key = PrivateKey::generate(KeyType::EcP256)?;
    let client_req = IssueRequest::new(
        Profile::Client,
        SubjectName {
            common_name: "quickstart-client".into(),
            organization: Some("Portcullis Quickstart".into()),
            ..Default::default()
        },
    );
    let client = issue::issue(&client_req, &client_key, Some(&int_ca))?;
    let password = portcullis_pki::cert::hex(&random_serial()?[..10], "");
    let p12 = p12::export(
        &client,
        &client_key,
        &[intermediate.clone(), root.clone()],
        &password,
        P12Format::Modern,
    )?;

    let mut out = Outputs::default();
    out.public(root_dir.join("ca.pem"), root.to_pem());
    out.secret(root_dir.join("ca.key"), root_ca.key().to_pem());
    out.public(root_dir.join("chain.pem"), root.to_pem());
    out.public(int_dir.join("ca.pem"), intermediate.to_pem());
    out.secret(int_dir.join("ca.key"), int_key_pem);
    out.public(
        int_dir.join("chain.pem"),
        format!("{}{}", intermediate.to_pem(), root.to_pem()),
    );
    out.public(dir.join("server.pem"), server.to_pem());
    out.secret(dir.join("server.key"), server_key.to_pem());
    out.public(
        dir.join("server.chain.pem"),
        format!("{}{}", server.to_pem(), intermediate.to_pem()),
    );
    out.public(dir.join("client.pem"), client.to_pem());
    out.secret(dir.join("client.key"), client_key.to_pem());
    out.public(
        dir.join("client.chain.pem"),
        format!("{}{}", client.to_pem(), intermediate.to_pem()),
    );
    out.secret(dir.join("client.p12"), p12);
    out.secret(&password_path, format!("{password}\n"));
    out.public(
        dir.join("truststore.pem"),
        format!("{}{}", root.to_pem(), intermediate.to_pem()),
    );
    out.write(true)?;
    outln!("Created a quickstart PKI in {}:", dir.display());
    outln!("  root CA            root/ca.pem, root/ca.key");
    outln!("  intermediate CA    intermediate/ca.pem, intermediate/ca.key");
    outln!("  server (localhost) server.pem, server.key, server.chain.pem");
    outln!("  client             client.pem, client.key, client.chain.pem, client.p12");
    outln!("  truststore         truststore.pem (root + intermediate, for a gateway)");
    print_quickstart_guide(dir, &password);
    Ok(ExitCode::SUCCESS)
}

fn print_quickstart_guide(dir: &Path, password: &str) {
    let d = dir.display();
    outln!();
    outln!("Check the chains with openssl:");
    outln!(
        "  openssl verify -CAfile {d}/root/ca.pem -untrusted {d}/intermediate/ca.pem {d}/server.pem {d}/client.pem"
    );
    outln!("Check the client certificate as a gateway would:");
    outln!("  portcullis pki verify --trust {d}/truststore.pem {d}/client.pem");
    outln!("Look inside the .p12 (password {password}, also in {d}/client.p12.password):");
    outln!("  openssl pkcs12 -info -noout -in {d}/client.p12 -passin file:{d}/client.p12.password");
    outln!("Try mutual TLS: start a server that requires a client certificate ...");
    outln!(
        "  openssl s_server -accept 8443 -www -cert {d}/server.pem -key {d}/server.key -cert_chain {d}/intermediate/ca.pem -CAfile {d}/truststore.pem -Verify 4 -verify_return_error"
    );
    outln!("... then, in another terminal, this succeeds:");
    outln!(
        "  curl --cacert {d}/root/ca.pem --cert {d}/client.chain.pem --key {d}/client.key https://localhost:8443/"
    );
    outln!("and this is refused (no client certificate):");
    outln!("  curl --cacert {d}/root/ca.pem https://localhost:8443/");
}

fn parse_sans(sans: &[String]) -> Result<Vec<SubjectAltName>> {
    sans.iter()
        .map(|s| s.parse::<SubjectAltName>().map_err(Into::into))
        .collect()
}

fn basename_from_cn(cn: &str) -> String {
    let mut out = String::new();
    for c in cn.chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches(|c| c == '-' || c == '.').to_string()
}

fn load_optional_issuer(a: &IssuerArgs) -> Result<Option<CaIssuer>> {
    match (&a.issuer_cert, &a.issuer_key) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => load_issuer(a).map(Some),
        _ => bail!("--issuer-cert and --issuer-key go together"),
    }
}

/// Loads an issuing CA. Certificates after the first in the issuer file are its own issuers;
/// when the file holds only the CA, a `chain.pem` beside it that starts with the same CA (the
/// layout `pki ca create` writes) supplies them.
fn load_issuer(a: &IssuerArgs) -> Result<CaIssuer> {
    let (Some(cert_path), Some(key_path)) = (&a.issuer_cert, &a.issuer_key) else {
        bail!("give the issuing CA with --issuer-cert F --issuer-key F");
    };
    let bytes = read(cert_path, "issuer certificate")?;
    let (cert, mut issuers) = Certificate::first_and_rest(&bytes)
        .with_context(|| format!("reading issuer certificate {}", cert_path.display()))?;
    if issuers.is_empty() && !cert.info().self_issued {
        let sibling = cert_path.with_file_name("chain.pem");
        if sibling != *cert_path
            && let Ok(chain_bytes) = std::fs::read(&sibling)
            && let Ok((first, rest)) = Certificate::first_and_rest(&chain_bytes)
            && first.der() == cert.der()
        {
            issuers = rest;
        }
    }
    let key_bytes = read(key_path, "issuer key")?;
    let key = PrivateKey::from_pem_or_der(&key_bytes)
        .with_context(|| format!("reading issuer key {}", key_path.display()))?;
    CaIssuer::new(cert, key, issuers).with_context(|| {
        format!(
            "using {} with {} as issuer",
            cert_path.display(),
            key_path.display()
        )
    })
}

impl ProfileArg {
    fn name(self) -> &'static str {
        match self {
            ProfileArg::Client => "client",
            ProfileArg::Server => "server",
        }
    }
}
