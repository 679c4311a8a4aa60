//! The data directory: the local CA, `auto` server certificates, the quickstart, all created on
//! first use (or, for `serve --check-config`, made in memory only).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use portcullis_gateway::config::{Hostname, ServerCertificate};
use portcullis_pki::issue::{self, CaIssuer};
use portcullis_pki::p12::{self, P12Format};
use portcullis_pki::{
    Certificate, IssueRequest, KeyType, PrivateKey, Profile, SubjectAltName, SubjectName,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::output::{Outputs, read};

/// The data directory: local CA, auto certificates, quickstart files.
pub(crate) struct DataDir {
    pub(crate) root: PathBuf,
    /// Writes nothing: what is missing is made in memory (`serve --check-config`).
    dry_run: bool,
}

/// What the quickstart made, for the banner.
pub(crate) struct Quickstart {
    root: PathBuf,
    password: String,
}

impl DataDir {
    pub(crate) fn new(root: &Path) -> DataDir {
        DataDir {
            root: root.to_path_buf(),
            dry_run: false,
        }
    }

    /// A data directory that is only read: the CA and certificates it lacks are made in memory.
    pub(crate) fn dry_run(root: &Path) -> DataDir {
        DataDir {
            root: root.to_path_buf(),
            dry_run: true,
        }
    }

    /// The local CA, created on first use.
    pub(crate) fn local_ca(&self) -> Result<CaIssuer> {
        let cert_path = self.root.join("ca/ca.pem");
        let key_path = self.root.join("ca/ca.key");
        if !cert_path.exists() {
            let (cert, key) = new_root_ca("Portcullis Local CA")?;
            if self.dry_run {
                return CaIssuer::new(cert, key, Vec::new()).context("making a local CA");
            }
            let mut out = Outputs::default();
            out.public(&cert_path, cert.to_pem());
            out.secret(&key_path, key.to_pem());
            out.write(false)?;
        }
        let (cert, _) = Certificate::first_and_rest(&read(&cert_path, "local CA")?)?;
        let key = PrivateKey::from_pem_or_der(&read(&key_path, "local CA key")?)?;
        CaIssuer::new(cert, key, Vec::new()).context("loading the local CA")
    }

    /// A server certificate for `hostname` from the local CA, reissued when missing or within
    /// 30 days of expiry.
    pub(crate) fn auto_certificate(&self, hostname: &Hostname) -> Result<ServerCertificate> {
        let name = hostname.to_string().replace('*', "_wildcard");
        let cert_path = self.root.join(format!("certs/{name}.pem"));
        let key_path = self.root.join(format!("certs/{name}.key"));
        let fresh = Certificate::first_and_rest(&std::fs::read(&cert_path).unwrap_or_default())
            .map(|(c, _)| {
                c.info().not_after_unix()
                    > time::OffsetDateTime::now_utc().unix_timestamp() + 30 * 86400
            })
            .unwrap_or(false);
        if !fresh || !key_path.exists() {
            let ca = self.local_ca()?;
            let (cert, key) = issue_auto(&ca, hostname)?;
            if self.dry_run {
                return Ok(ServerCertificate {
                    chain: vec![cert.der().clone()],
                    key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.pkcs8_der().to_vec().into()),
                });
            }
            let mut out = Outputs::default();
            out.public(&cert_path, cert.to_pem());
            out.secret(&key_path, key.to_pem());
            out.write(true)?;
        }
        server_certificate(&cert_path, &key_path)
    }

    /// Makes the quickstart: local CA, demo client certificate (+ .p12), truststore and a
    /// configuration serving `localhost` on 127.0.0.1:8443 with mutual TLS required, mapped to
    /// the built-in echo upstream.
    pub(crate) fn quickstart(&self) -> Result<Quickstart> {
        let ca = self.local_ca()?;
        let key = PrivateKey::generate(KeyType::EcP256)?;
        let req = IssueRequest::new(
            Profile::Client,
            SubjectName {
                common_name: "demo-client".into(),
                organization: Some("Portcullis Quickstart".into()),
                ..Default::default()
            },
        );
        let client = issue::issue(&req, &key, Some(&ca))?;
        let password = portcullis_pki::cert::hex(&issue::random_serial()?[..8], "");
        let p12 = p12::export(
            &client,
            &key,
            &[ca.certificate().clone()],
            &password,
            P12Format::Modern,
        )?;
        let mut out = Outputs::default();
        out.public(self.root.join("clients/demo.pem"), client.to_pem());
        out.secret(self.root.join("clients/demo.key"), key.to_pem());
        out.secret(self.root.join("clients/demo.p12"), p12);
        out.secret(
            self.root.join("clients/demo.p12.password"),
            format!("{password}\n"),
        );
        // A client the domain does not trust: its own throwaway CA, whose key is not kept.
        let stranger_ca_key = PrivateKey::generate(KeyType::EcP256)?;
        let stranger_ca = issue::issue(
            &IssueRequest::new(Profile::RootCa, SubjectName::cn("Stranger CA")),
            &stranger_ca_key,
            None,
        )?;
        let stranger_ca = CaIssuer::new(stranger_ca, stranger_ca_key, Vec::new())?;
        let stranger_key = PrivateKey::generate(KeyType::EcP256)?;
        let stranger = issue::issue(
            &IssueRequest::new(Profile::Client, SubjectName::cn("stranger")),
            &stranger_key,
            Some(&stranger_ca),
        )?;
        out.public(
            self.root.join("clients/stranger.pem"),
            format!(
                "{}{}",
                stranger.to_pem(),
                stranger_ca.certificate().to_pem()
            ),
        );
        out.secret(
            self.root.join("clients/stranger.key"),
            stranger_key.to_pem(),
        );
        out.public(self.root.join("truststore.pem"), ca.certificate().to_pem());
        out.public(self.root.join("portcullis.toml"), QUICKSTART_CONFIG);
        out.write(true)?;
        Ok(Quickstart {
            root: self.root.clone(),
            password,
        })
    }

    pub(crate) fn existing_quickstart(&self) -> Result<Quickstart> {
        let password = std::fs::read_to_string(self.root.join("clients/demo.p12.password"))?;
        if !self.root.join("clients/demo.pem").exists() {
            bail!("no quickstart client");
        }
        Ok(Quickstart {
            root: self.root.clone(),
            password: password.trim().to_string(),
        })
    }
}

impl Quickstart {
    pub(crate) fn print(&self, port: u16) {
        let d = self.root.display();
        outln!();
        outln!(
            "Quickstart: https://localhost:{port}/ requires a client certificate and answers with the identity it forwarded."
        );
        outln!("This succeeds (the demo client certificate):");
        outln!(
            "  curl --cacert {d}/ca/ca.pem --cert {d}/clients/demo.pem --key {d}/clients/demo.key https://localhost:{port}/hello"
        );
        outln!(
            "This is refused in the TLS handshake (no client certificate: curl reports the alert \"certificate required\"):"
        );
        outln!("  curl --cacert {d}/ca/ca.pem https://localhost:{port}/hello");
        if self.root.join("clients/stranger.pem").exists() {
            outln!(
                "This is refused with HTTP 403 and the reason (a certificate from a CA the domain does not trust):"
            );
            outln!(
                "  curl --cacert {d}/ca/ca.pem --cert {d}/clients/stranger.pem --key {d}/clients/stranger.key https://localhost:{port}/hello"
            );
        }
        outln!(
            "Browsers: import {d}/clients/demo.p12 (password {}) and trust {d}/ca/ca.pem.",
            self.password
        );
        outln!(
            "Domains live in the registry: portcullis domain list --data-dir {d} (then describe, put, delete)."
        );
        outln!("Other settings: {d}/portcullis.toml (reloaded when it changes or on SIGHUP).");
        outln!();
    }
}

const QUICKSTART_CONFIG: &str = r#"# Portcullis quickstart configuration; see docs/configuration.md for every key.

[[listener]]
address = "127.0.0.1:8443"

# Domains seed the registry at the first start; change them later with `portcullis domain`.
[[domain]]
hostname = "localhost"
certificate = "auto"          # issued by the local CA in this directory
security_policy = "TLS_1_2"   # TLS 1.2 and 1.3

[domain.mtls]
mode = "required"
truststore = "truststore.pem"
# API Gateway's split: no certificate fails the TLS handshake; an untrusted one gets 403.
on_failure = "aws"

[[domain.mapping]]
base_path = ""                # everything
upstream = "builtin:echo"     # answers with the identity it received
"#;

pub(crate) fn server_certificate(chain: &Path, key: &Path) -> Result<ServerCertificate> {
    let certs = Certificate::all_from_pem_or_der(&read(chain, "certificate chain")?)
        .with_context(|| format!("reading certificate chain {}", chain.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", chain.display());
    }
    let key = PrivateKey::from_pem_or_der(&read(key, "private key")?)
        .with_context(|| format!("reading private key {}", key.display()))?;
    Ok(ServerCertificate {
        chain: certs
            .iter()
            .map(|c| c.der().clone())
            .collect::<Vec<CertificateDer<'static>>>(),
        key: PrivateKeyDer::Pkcs8(key.pkcs8_der().to_vec().into()),
    })
}

/// An `auto` server certificate for `hostname`, issued by `ca` (a new key).
pub(crate) fn issue_auto(ca: &CaIssuer, hostname: &Hostname) -> Result<(Certificate, PrivateKey)> {
    let key = PrivateKey::generate(KeyType::EcP256)?;
    let mut req = IssueRequest::new(Profile::Server, SubjectName::cn(hostname.to_string()));
    req.subject_alt_names = vec![SubjectAltName::Dns(hostname.to_string())];
    if hostname.to_string() == "localhost" {
        req.subject_alt_names
            .push(SubjectAltName::Ip([127, 0, 0, 1].into()));
        req.subject_alt_names
            .push(SubjectAltName::Ip(std::net::Ipv6Addr::LOCALHOST.into()));
    }
    let cert = issue::issue(&req, &key, Some(ca))?;
    Ok((cert, key))
}

/// Whether an `auto` certificate expiring at `not_after` is due for renewal (30 days before).
pub(crate) fn auto_due(not_after: i64) -> bool {
    not_after <= time::OffsetDateTime::now_utc().unix_timestamp() + 30 * 86400
}

/// A new root CA of this node's own (the local CA, the admin CA): ECDSA P-256, organization
/// Portcullis, issuing end entities only (path length 0).
pub(crate) fn new_root_ca(common_name: &str) -> Result<(Certificate, PrivateKey)> {
    let key = PrivateKey::generate(KeyType::EcP256)?;
    let mut req = IssueRequest::new(
        Profile::RootCa,
        SubjectName {
            common_name: common_name.into(),
            organization: Some("Portcullis".into()),
            ..Default::default()
        },
    );
    req.path_len = Some(0);
    let cert = issue::issue(&req, &key, None)?;
    Ok((cert, key))
}

/// [`new_root_ca`] as an issuer, in memory only.
pub(crate) fn new_root_issuer(common_name: &str) -> Result<CaIssuer> {
    let (cert, key) = new_root_ca(common_name)?;
    CaIssuer::new(cert, key, Vec::new()).with_context(|| format!("making the {common_name}"))
}
