//! The configuration file (`portcullis serve --config`) and the domains the registry keeps:
//! parsing with errors that name the key and its line, building the gateway's configuration, and
//! the files a configuration names (watched for changes).
//!
//! The file's `[[domain]]` tables seed the registry at the first start; from then on the registry
//! is the domains' source of truth (`portcullis domain …`, `/v1/domains`), and every other key
//! (listeners, limits, identity headers, admin address, database) still comes from the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use portcullis_gateway::Config;
use portcullis_gateway::config::{
    Authorization, Domain, Hostname, IdentityHeaders, IdentityProfile, Limits, Listener, Mapping,
    MqttSettings, Mtls, MtlsMode, OnFailure, Protocols, RegistryMode, ResponseHeaders,
    SecurityPolicy, ServerCertificate, UpstreamProtocol, UpstreamTls,
};
use portcullis_pki::crl::Crl;
use portcullis_pki::{Certificate, Truststore};
use portcullis_registry::sealed::ClusterKey;
use portcullis_registry::{DomainSpec, MtlsSpec, Store};
use serde::Deserialize;

use crate::data_dir::{DataDir, server_certificate};
use crate::output::read;

/// The configuration file. Unknown keys are errors that name the key and its line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    /// Serve connections whose SNI matches no domain with `default_domain`.
    #[serde(default)]
    default_endpoint: bool,
    default_domain: Option<String>,
    #[serde(default, rename = "listener")]
    listeners: Vec<FileListener>,
    #[serde(default, rename = "domain")]
    domains: Vec<DomainSpec>,
    limits: Option<FileLimits>,
    admin: Option<FileAdmin>,
    /// The registry: a SQLite file (default DATA_DIR/registry.db) or postgres://…
    database: Option<String>,
    identity: Option<FileIdentity>,
    /// The MQTT broker's limits.
    mqtt: Option<FileMqttLimits>,
    /// The cluster key (seals the private keys kept in the registry); the
    /// `PORTCULLIS_CLUSTER_KEY` environment variable, holding the key itself, wins.
    cluster_key_file: Option<PathBuf>,
    /// This node's name in `portcullis cluster status` (default: host name and admin port).
    node_name: Option<String>,
    /// NATS (`nats://host:4222`, several comma-separated): MQTT messages reach the sessions of
    /// every node.
    nats_url: Option<String>,
    /// Copies JetStream keeps of the MQTT streams: the NATS cluster's size (1 to 5, default 1;
    /// 3 for the reference deployment).
    nats_replicas: Option<usize>,
    /// Mutual TLS to NATS with certificates of the cluster's CA: the node verifies the NATS
    /// servers against it and presents a client certificate it issues itself (in memory).
    nats_tls: Option<bool>,
    /// MiB of QoS 1 and 2 messages JetStream keeps (each copy; the oldest go beyond, and none
    /// stays longer than a day): what persistent sessions away and shared groups without a member
    /// online can find when they come back. Default 1024; each NATS server must allow it
    /// (`max_file_store`).
    nats_kept_mib: Option<u64>,
    /// QoS 1 messages no persistent session or shared group needs cross NATS live instead of
    /// being stored by JetStream first (faster; default false: see docs/cluster.md for the
    /// windows in which such a message can be lost with a node).
    nats_qos1_live: Option<bool>,
    /// `/readyz` fails when the registry snapshot was last found current longer ago than this.
    snapshot_stale_after_secs: Option<f64>,
    /// Revocation published for the local CA: CRL and OCSP over plain HTTP.
    revocation: Option<FileRevocation>,
    /// ACME: this node's part in ordering `certificate = "acme"` domains' certificates.
    acme: Option<FileAcme>,
}

/// `[acme]`: what this node needs to order and renew `certificate = "acme"` certificates (the
/// CA, contact and challenge are each domain's).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileAcme {
    /// `IP:PORT` of the plain-HTTP listener answering HTTP-01 challenges (the CA connects to
    /// port 80) and redirecting everything else to HTTPS.
    http_listen: Option<String>,
    /// PEM certificates trusted for the ACME directory's HTTPS, besides the system's (a private
    /// ACME CA, or a test one).
    ca_file: Option<PathBuf>,
    /// Renew this many days before expiry (default 30; at most a third of a certificate's
    /// lifetime, so short-lived certificates renew in time).
    renew_before_days: Option<u32>,
}

/// `[revocation]`: where the local CA's CRL, OCSP responder and certificate are served (plain
/// HTTP: relying parties fetch them so; the CRL and the answers are signed), and the URL issued
/// certificates point at.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileRevocation {
    /// `IP:PORT` of the plain-HTTP listener.
    pub(crate) listen: String,
    /// What issued certificates carry (`http://pki.example.com`); default `http://LISTEN`.
    pub(crate) public_url: Option<String>,
    /// The CRL's lifetime in hours (nextUpdate), default 24; made again at half of it.
    pub(crate) crl_hours: Option<u32>,
    /// Also answer SCEP at `/scep` (plain HTTP, as SCEP clients expect: its messages are signed
    /// and encrypted); off by default.
    #[serde(default)]
    pub(crate) scep: bool,
}

/// The `[revocation]` settings, checked.
#[derive(Debug, Clone)]
pub(crate) struct RevocationSettings {
    pub(crate) listen: SocketAddr,
    /// None: `http://` and the address bound.
    pub(crate) public_url: Option<String>,
    pub(crate) crl_secs: i64,
    pub(crate) scep: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMqttLimits {
    /// QoS 1 messages kept for an offline persistent session (default 1000).
    max_queued_per_session: Option<usize>,
    /// Retained messages kept (default 100000).
    max_retained: Option<usize>,
    /// Subscriptions per session (default 100).
    max_subscriptions_per_session: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIdentity {
    /// Whose headers the upstream gets: rfc9440 (default), alb, cloudfront, envoy or traefik.
    #[serde(default)]
    profile: Option<String>,
    /// Also send Envoy's x-forwarded-client-cert.
    #[serde(default)]
    xfcc: bool,
    /// Field → header name (client_cert, client_cert_chain, subject, issuer, serial, not_before,
    /// not_after, fingerprint, verify).
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    /// The admin API (HTTPS; also /metrics, /healthz, /readyz). Default 127.0.0.1:9443.
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_connections: Option<usize>,
    max_handshakes: Option<usize>,
    max_header_bytes: Option<usize>,
    handshake_timeout_secs: Option<f64>,
    request_header_timeout_secs: Option<f64>,
    upstream_connect_timeout_secs: Option<f64>,
    upstream_response_timeout_secs: Option<f64>,
}

impl FileLimits {
    fn apply(&self, mut limits: Limits) -> Result<Limits> {
        let secs = |name: &str, v: Option<f64>, default: Duration| -> Result<Duration> {
            match v {
                None => Ok(default),
                Some(s) if s > 0.0 && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
                Some(s) => bail!("limits.{name} = {s} must be between 0 and 86400 seconds"),
            }
        };
        limits.max_connections = self.max_connections.unwrap_or(limits.max_connections);
        limits.max_handshakes = self.max_handshakes.unwrap_or(limits.max_handshakes);
        limits.max_header_bytes = self.max_header_bytes.unwrap_or(limits.max_header_bytes);
        limits.handshake_timeout = secs(
            "handshake_timeout_secs",
            self.handshake_timeout_secs,
            limits.handshake_timeout,
        )?;
        limits.request_header_timeout = secs(
            "request_header_timeout_secs",
            self.request_header_timeout_secs,
            limits.request_header_timeout,
        )?;
        limits.upstream_connect_timeout = secs(
            "upstream_connect_timeout_secs",
            self.upstream_connect_timeout_secs,
            limits.upstream_connect_timeout,
        )?;
        limits.upstream_response_timeout = secs(
            "upstream_response_timeout_secs",
            self.upstream_response_timeout_secs,
            limits.upstream_response_timeout,
        )?;
        Ok(limits)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListener {
    address: String,
    /// "http" (default), "mqtt", or both: ALPN `mqtt` then selects MQTT.
    #[serde(default = "default_protocols")]
    protocols: Vec<String>,
}

fn default_protocols() -> Vec<String> {
    vec!["http".into()]
}

impl FileConfig {
    /// How stale the registry snapshot may get before `/readyz` fails (default 10 s).
    pub(crate) fn snapshot_stale_after_ms(&self) -> Result<i64> {
        match self.snapshot_stale_after_secs {
            None => Ok(10_000),
            Some(s) if (0.5..=86_400.0).contains(&s) => Ok((s * 1000.0) as i64),
            Some(s) => bail!(
                "snapshot_stale_after_secs = {s}: give a number of seconds between 0.5 and 86400 (default 10)"
            ),
        }
    }

    /// The NATS servers MQTT is routed through, if any.
    pub(crate) fn nats(&self) -> Result<Option<crate::bus::NatsOptions>> {
        let Some(url) = &self.nats_url else {
            let set: Vec<&str> = [
                ("nats_replicas", self.nats_replicas.is_some()),
                ("nats_tls", self.nats_tls.is_some()),
                ("nats_kept_mib", self.nats_kept_mib.is_some()),
                ("nats_qos1_live", self.nats_qos1_live.is_some()),
            ]
            .into_iter()
            .filter_map(|(name, set)| set.then_some(name))
            .collect();
            if !set.is_empty() {
                bail!(
                    "{} {} set without nats_url: name the NATS servers too",
                    set.join(", "),
                    if set.len() == 1 { "is" } else { "are" }
                );
            }
            return Ok(None);
        };
        let replicas = match self.nats_replicas {
            None => 1,
            Some(n @ 1..=5) => n,
            Some(n) => bail!(
                "nats_replicas = {n}: JetStream keeps 1 to 5 copies; give the NATS cluster's size (3 in the reference deployment)"
            ),
        };
        let kept_mib = match self.nats_kept_mib {
            None => 1024,
            Some(n @ 16..=1_048_576) => n,
            Some(n) => bail!(
                "nats_kept_mib = {n}: give the MiB of messages JetStream keeps, 16 to 1048576 (default 1024)"
            ),
        };
        crate::bus::servers(url)?;
        Ok(Some(crate::bus::NatsOptions {
            url: url.clone(),
            replicas,
            tls: self.nats_tls.unwrap_or(false),
            kept_bytes: i64::try_from(kept_mib * 1024 * 1024).unwrap_or(i64::MAX),
            qos1_live: self.nats_qos1_live.unwrap_or(false),
        }))
    }

    /// This node's name, if the file gives one.
    pub(crate) fn node_name(&self) -> Option<&str> {
        self.node_name.as_deref()
    }

    /// The file's `[[domain]]` tables.
    pub(crate) fn domains(&self) -> &[DomainSpec] {
        &self.domains
    }
}

/// Reads and parses the configuration file; errors name the key and its line.
pub(crate) fn read_file_config(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading configuration {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow!("{}: {}", path.display(), one_line(&e.to_string())))
}

/// The registry database the configuration names (default DATA_DIR/registry.db), read before
/// the rest of the configuration because loading needs the registry's truststores.
pub(crate) fn database_of(path: &Path, data: &DataDir) -> Result<String> {
    let file = read_file_config(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    Ok(match &file.database {
        Some(d) if d.starts_with("postgres://") || d.starts_with("postgresql://") => d.clone(),
        Some(d) if Path::new(d).is_absolute() => d.clone(),
        Some(d) => base.join(d).display().to_string(),
        None => data.root.join("registry.db").display().to_string(),
    })
}

/// Modification time and size of a file, if it exists.
pub(crate) type Stamp = (PathBuf, Option<(std::time::SystemTime, u64)>);

/// Modification time and size of the configuration file and of every file its domains (the
/// registry's, once seeded) name.
pub(crate) fn file_stamps(config_path: &Path, registry: &RegistryConfig) -> Vec<Stamp> {
    let mut files = vec![config_path.to_path_buf()];
    let at = relative_to(config_path);
    if let Ok(file) = read_file_config(config_path)
        && let Ok(domains) = registry.domains_or(&file)
    {
        for d in &domains {
            if d.certificate != "auto" && !d.certificate.starts_with("registry:") {
                files.push(at(Path::new(&d.certificate)));
            }
            files.extend(d.key.iter().map(|k| at(k)));
            for m in &d.mappings {
                let upstream_files = [
                    &m.upstream_ca,
                    &m.upstream_client_cert,
                    &m.upstream_client_key,
                ];
                files.extend(upstream_files.into_iter().flatten().map(|f| at(f)));
            }
            if let Some(m) = &d.mtls {
                files.extend(
                    m.truststore
                        .iter()
                        .filter(|t| !t.to_string_lossy().starts_with("registry:"))
                        .map(|t| at(t)),
                );
                files.extend(m.crls.iter().map(|c| at(c)));
            }
        }
    }
    // In a stable order: the registry lists domains by hostname, the file as written.
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|f| {
            let stamp = std::fs::metadata(&f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            (f, stamp)
        })
        .collect()
}

/// Resolves paths named in the configuration (and in the registry's domains) against the
/// configuration file's directory.
fn relative_to(config_path: &Path) -> impl Fn(&Path) -> PathBuf + '_ {
    let base = config_path.parent().unwrap_or(Path::new("."));
    move |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    }
}

/// The configuration file's domains in the registry's form: hostname (lower case) and the
/// specification.
fn specs_of(domains: &[DomainSpec]) -> Vec<(String, DomainSpec)> {
    domains
        .iter()
        .map(|d| (d.hostname.to_ascii_lowercase(), d.clone()))
        .collect()
}

/// Seeds the registry with the configuration file's domains at the first start (returns true
/// then); later starts change nothing, the registry being the domains' source of truth.
pub(crate) async fn seed_domains(store: &Store, config_path: &Path) -> Result<bool> {
    if store.domains_seeded().await? {
        return Ok(false);
    }
    let file = read_file_config(config_path)?;
    let specs = specs_of(&file.domains);
    let actor = format!("config:{}", config_path.display());
    Ok(store.seed_domains(&specs, &actor).await?)
}

/// Checks a candidate set of registry domains as the gateway would load them, with the
/// configuration file's other settings; returns what an operator should know about each one's
/// truststore.
pub(crate) fn check_domains(
    config_path: &Path,
    data: &DataDir,
    echo: SocketAddr,
    registry: &RegistryConfig,
    specs: &[(String, DomainSpec)],
) -> Result<portcullis_admin::CheckedDomains> {
    let file = read_file_config(config_path)?;
    let domains = parse_specs(specs)?;
    let (config, _) = build_config(config_path, &file, &domains, data, echo, registry)?;
    portcullis_gateway::check(&config)?;
    let warnings = specs
        .iter()
        .map(|(hostname, _)| (hostname.clone(), config.truststore_warnings(hostname)))
        .collect();
    Ok(portcullis_admin::CheckedDomains { warnings })
}

/// Stored domain specifications, each under its own hostname.
fn parse_specs(specs: &[(String, DomainSpec)]) -> Result<Vec<DomainSpec>> {
    specs
        .iter()
        .map(|(hostname, d)| {
            if !d.hostname.eq_ignore_ascii_case(hostname) {
                bail!(
                    "domain '{hostname}': its specification names hostname '{}'",
                    d.hostname
                );
            }
            Ok(d.clone())
        })
        .collect()
}

impl FileConfig {
    /// The `[acme]` settings (defaults without the table); `ca_file` relative to `path`'s
    /// directory.
    pub(crate) fn acme(&self, path: &Path) -> Result<crate::acme::AcmeSettings> {
        let Some(a) = &self.acme else {
            return Ok(crate::acme::AcmeSettings {
                renew_before: std::time::Duration::from_secs(30 * 86_400),
                ..crate::acme::AcmeSettings::default()
            });
        };
        let http_listen = match &a.http_listen {
            None => None,
            Some(l) => Some(l.parse::<SocketAddr>().map_err(|_| {
                anyhow!("[acme] http_listen '{l}' is not IP:PORT (such as 0.0.0.0:80)")
            })?),
        };
        let ca_pem = match &a.ca_file {
            None => None,
            Some(f) => {
                let file = relative_to(path)(f);
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("[acme] ca_file: reading {}", file.display()))?;
                Certificate::all_from_pem_or_der(text.as_bytes())
                    .with_context(|| format!("[acme] ca_file {}", file.display()))?;
                Some(text)
            }
        };
        let days = a.renew_before_days.unwrap_or(30);
        if !(1..=365).contains(&days) {
            bail!("[acme] renew_before_days must be 1-365");
        }
        Ok(crate::acme::AcmeSettings {
            http_listen,
            ca_pem,
            renew_before: std::time::Duration::from_secs(u64::from(days) * 86_400),
        })
    }

    /// The `[revocation]` settings, if any: a bad address or URL is an error naming it.
    pub(crate) fn revocation(&self) -> Result<Option<RevocationSettings>> {
        let Some(r) = &self.revocation else {
            return Ok(None);
        };
        let listen = r.listen.parse::<SocketAddr>().map_err(|_| {
            anyhow!(
                "[revocation] listen '{}' is not IP:PORT (such as 0.0.0.0:8080)",
                r.listen
            )
        })?;
        let public_url = r
            .public_url
            .as_ref()
            .map(|u| u.trim_end_matches('/').to_string());
        if let Some(url) = &public_url
            && (!url.starts_with("http://") || url.contains(char::is_whitespace))
        {
            bail!(
                "[revocation] public_url '{url}' must be an http:// URL (relying parties fetch CRLs and OCSP over plain HTTP)"
            );
        }
        let hours = r.crl_hours.unwrap_or(24);
        if !(1..=720).contains(&hours) {
            bail!("[revocation] crl_hours must be 1-720");
        }
        Ok(Some(RevocationSettings {
            listen,
            public_url,
            crl_secs: i64::from(hours) * 3600,
            scep: r.scep,
        }))
    }
}

/// Reads the configuration file and every file it names, takes the domains from the registry
/// (from the file before it seeded them), and builds the gateway config; also returns the admin
/// listener's address.
pub(crate) fn load_config(
    path: &Path,
    data: &DataDir,
    echo: SocketAddr,
    registry: &RegistryConfig,
) -> Result<(Config, SocketAddr)> {
    let file = read_file_config(path)?;
    let domains = registry.domains_or(&file)?;
    build_config(path, &file, &domains, data, echo, registry)
}

/// Warns when the configuration file's `[[domain]]` tables differ from the registry's domains,
/// which replaced them at the first start (called when the file may have been edited).
pub(crate) fn warn_if_file_domains_ignored(path: &Path, registry: &RegistryConfig) {
    let Some(stored) = &registry.domains else {
        return;
    };
    let Ok(file) = read_file_config(path) else {
        return;
    };
    let sorted = |specs: Vec<(String, DomainSpec)>| {
        let mut specs = specs;
        specs.sort_by(|a, b| a.0.cmp(&b.0));
        specs
    };
    let file_specs = sorted(specs_of(&file.domains));
    let registry_specs = sorted(
        parse_specs(stored)
            .map(|d| specs_of(&d))
            .unwrap_or_default(),
    );
    if file_specs != registry_specs {
        tracing::warn!(
            config = %path.display(),
            "the configuration file's [[domain]] tables differ from the registry's domains and are ignored: the registry is the domains' source of truth since the first start; change them with `portcullis domain put|delete`"
        );
    }
}

/// Builds the gateway config from the file's settings and `domains`.
fn build_config(
    path: &Path,
    file: &FileConfig,
    domains: &[DomainSpec],
    data: &DataDir,
    echo: SocketAddr,
    registry: &RegistryConfig,
) -> Result<(Config, SocketAddr)> {
    let at = relative_to(path);
    let listeners = file
        .listeners
        .iter()
        .map(|l| {
            let address = l.address.parse::<SocketAddr>().map_err(|_| {
                anyhow!(
                    "{}: listener address '{}' is not IP:PORT",
                    path.display(),
                    l.address
                )
            })?;
            let (http, mqtt) = (
                l.protocols.iter().any(|p| p == "http"),
                l.protocols.iter().any(|p| p == "mqtt"),
            );
            if let Some(other) = l.protocols.iter().find(|p| *p != "http" && *p != "mqtt") {
                bail!(
                    "{}: listener {}: protocol '{other}' must be http or mqtt",
                    path.display(),
                    l.address
                );
            }
            let protocols = match (http, mqtt) {
                (true, false) => Protocols::Http,
                (false, true) => Protocols::Mqtt,
                (true, true) => Protocols::Both,
                (false, false) => bail!(
                    "{}: listener {}: protocols must name http, mqtt or both",
                    path.display(),
                    l.address
                ),
            };
            Ok(Listener { address, protocols })
        })
        .collect::<Result<Vec<_>>>()?;
    let source = if registry.domains.is_some() {
        "registry".to_string()
    } else {
        path.display().to_string()
    };
    let acme = file.acme(path)?;
    if acme.http_listen.is_none()
        && let Some(d) = domains.iter().find(|d| {
            d.certificate == "acme" && d.acme.as_ref().is_some_and(|a| a.challenge == "http-01")
        })
    {
        bail!(
            "{source}: domain '{}': challenge = \"http-01\" is answered on [acme] http_listen (the CA connects to port 80), which {} lacks: add [acme] http_listen = \"0.0.0.0:80\" or use challenge = \"tls-alpn-01\"",
            d.hostname,
            path.display()
        );
    }
    let domains = domains
        .iter()
        .map(|d| file_domain(d, &at, data, echo, registry).with_context(|| source.clone()))
        .collect::<Result<Vec<_>>>()?;
    let default = match (file.default_endpoint, &file.default_domain) {
        (false, None) => None,
        (true, Some(name)) => Some(name.as_str()),
        (true, None) => bail!(
            "{}: default_endpoint = true needs default_domain = \"<hostname>\"",
            path.display()
        ),
        (false, Some(_)) => bail!(
            "{}: default_domain is set but default_endpoint is false",
            path.display()
        ),
    };
    let config =
        Config::new(listeners, domains, default).with_context(|| path.display().to_string())?;
    let config = match &file.limits {
        None => config,
        Some(l) => {
            let limits = l
                .apply(Limits::default())
                .with_context(|| path.display().to_string())?;
            config
                .with_limits(limits)
                .with_context(|| path.display().to_string())?
        }
    };
    let config = match &file.mqtt {
        None => config,
        Some(m) => {
            let defaults = portcullis_mqtt::broker::Limits::default();
            config
                .with_broker_limits(portcullis_mqtt::broker::Limits {
                    max_queued: m.max_queued_per_session.unwrap_or(defaults.max_queued),
                    max_retained: m.max_retained.unwrap_or(defaults.max_retained),
                    max_subscriptions: m
                        .max_subscriptions_per_session
                        .unwrap_or(defaults.max_subscriptions),
                    ..defaults
                })
                .with_context(|| path.display().to_string())?
        }
    };
    let config = match &file.identity {
        None => config,
        Some(i) => {
            let profile = match &i.profile {
                None => IdentityProfile::Rfc9440,
                Some(p) => IdentityProfile::parse(p)
                    .with_context(|| format!("{}: [identity] profile", path.display()))?,
            };
            if profile != IdentityProfile::Rfc9440 {
                if i.xfcc {
                    bail!(
                        "{}: [identity] xfcc adds Envoy's header to the rfc9440 profile; with profile = \"{}\" remove it (profile = \"envoy\" sends x-forwarded-client-cert alone)",
                        path.display(),
                        i.profile.as_deref().unwrap_or_default()
                    );
                }
                if let Some(field) = i.headers.keys().find(|f| f.as_str() != "verify") {
                    bail!(
                        "{}: [identity.headers] {field}: the {} profile's header names are fixed (they are what its upstreams read); only verify can be renamed, or use profile = \"rfc9440\"",
                        path.display(),
                        i.profile.as_deref().unwrap_or_default()
                    );
                }
            }
            let mut ids = IdentityHeaders {
                xfcc: i.xfcc,
                profile,
                ..Default::default()
            };
            for (field, name) in &i.headers {
                ids.rename(field, name)
                    .with_context(|| format!("{}: [identity.headers]", path.display()))?;
            }
            config.with_identity(ids)
        }
    };
    let admin = match &file.admin {
        None => SocketAddr::from(([127, 0, 0, 1], 9443)),
        Some(a) => a.address.parse().map_err(|_| {
            anyhow!(
                "{}: admin address '{}' is not IP:PORT",
                path.display(),
                a.address
            )
        })?,
    };
    Ok((config, admin))
}

/// Builds one domain from its `[[domain]]` table (file paths relative to the configuration
/// file's directory; `registry:NAME[@VERSION]` truststores from the registry's catalog).
fn file_domain(
    d: &DomainSpec,
    at: &dyn Fn(&Path) -> PathBuf,
    data: &DataDir,
    echo: SocketAddr,
    registry: &RegistryConfig,
) -> Result<Domain> {
    let catalog = &registry.catalog;
    let ctx = || format!("domain '{}'", d.hostname);
    let hostname = Hostname::parse(&d.hostname).with_context(ctx)?;
    if d.acme.is_some() && d.certificate != "acme" {
        bail!(
            "{}: the acme table is for certificate = \"acme\"; remove it or set certificate = \"acme\"",
            ctx()
        );
    }
    let certificate = if d.certificate == "auto" {
        if d.key.is_some() {
            bail!(
                "{}: key is set, but certificate = \"auto\" makes its own",
                ctx()
            );
        }
        if registry.cluster_auto {
            registry
                .server_certificate(&crate::cluster::auto_name(&hostname))
                .with_context(ctx)?
        } else {
            data.auto_certificate(&hostname).with_context(ctx)?
        }
    } else if d.certificate == "acme" {
        if d.key.is_some() {
            bail!(
                "{}: key is set, but certificate = \"acme\" orders its own",
                ctx()
            );
        }
        crate::acme::check_spec(&hostname, d.acme.as_ref()).with_context(ctx)?;
        if !registry.cluster_auto {
            bail!(
                "{}: certificate = \"acme\" keeps the certificate and its key in the registry, sealed with the cluster key, and this node has none: make one with `portcullis cluster-key generate --out FILE` and set cluster_key_file = \"FILE\"",
                ctx()
            );
        }
        // Until the CA has issued one, the cluster's local CA stands in (clients that trust it
        // connect; others see an unknown issuer, as they would see no certificate at all).
        let ordered = crate::acme::certificate_name(&hostname);
        match registry.server_certs.get(&ordered) {
            Some(Ok(_)) => registry.server_certificate(&ordered).with_context(ctx)?,
            _ => registry
                .server_certificate(&crate::cluster::auto_name(&hostname))
                .with_context(ctx)?,
        }
    } else if let Some(name) = d.certificate.strip_prefix("registry:") {
        if d.key.is_some() {
            bail!(
                "{}: key is set, but certificate = \"registry:{name}\" takes its key from the registry",
                ctx()
            );
        }
        registry.server_certificate(name).with_context(ctx)?
    } else {
        let key = d
            .key
            .as_ref()
            .ok_or_else(|| anyhow!("{}: certificate is a file, so key = \"…\" is needed", ctx()))?;
        server_certificate(&at(Path::new(&d.certificate)), &at(key)).with_context(ctx)?
    };
    let policy = match d.security_policy.as_str() {
        "TLS_1_2" => SecurityPolicy::Tls12,
        "TLS_1_3" => SecurityPolicy::Tls13,
        "TLS_1_2_ONLY" => SecurityPolicy::Tls12Only,
        "TLS_1_3_PQ" => SecurityPolicy::Tls13Pq,
        other => bail!(
            "{}: security_policy '{other}' must be TLS_1_2, TLS_1_3, TLS_1_3_PQ or TLS_1_2_ONLY",
            ctx()
        ),
    };
    let mtls = match &d.mtls {
        None => Mtls::off(),
        Some(m) => file_mtls(m, at, catalog).with_context(ctx)?,
    };
    let mut mappings = Vec::new();
    for m in &d.mappings {
        let upstream = if m.upstream == "builtin:echo" {
            format!("http://{echo}")
        } else {
            m.upstream.clone()
        };
        let require = match m.client_certificate.as_str() {
            "required" => true,
            "optional" => false,
            other => bail!(
                "{}: client_certificate '{other}' must be required or optional",
                ctx()
            ),
        };
        let authorization = match m.authorization.as_str() {
            "none" => Authorization::None,
            "policy" => Authorization::Policy,
            other => bail!(
                "{}: mapping '{}': authorization '{other}' must be none or policy",
                ctx(),
                m.base_path
            ),
        };
        let builtin = match m.upstream.as_str() {
            "builtin:provisioning" => Some(portcullis_gateway::config::Builtin::Provisioning),
            "builtin:est" => Some(portcullis_gateway::config::Builtin::Est),
            "builtin:token" => Some(portcullis_gateway::config::Builtin::Token),
            "builtin:scep" => Some(portcullis_gateway::config::Builtin::Scep),
            _ => None,
        };
        if let Some(builtin) = builtin {
            if m.upstream_ca.is_some() || m.upstream_client_cert.is_some() {
                bail!(
                    "{}: mapping '{}': {} is answered by the gateway; it takes no upstream_ca or upstream client certificate",
                    ctx(),
                    m.base_path,
                    m.upstream
                );
            }
            if authorization == Authorization::Policy {
                bail!(
                    "{}: mapping '{}': {} authorizes each call itself (claims, registered ACTIVE certificates, mqtt:Publish on the provisioning topics); remove authorization = \"policy\"",
                    ctx(),
                    m.base_path,
                    m.upstream
                );
            }
            if !m.token_audiences.is_empty()
                && builtin != portcullis_gateway::config::Builtin::Token
            {
                bail!(
                    "{}: mapping '{}': token_audiences is for builtin:token mappings",
                    ctx(),
                    m.base_path
                );
            }
            let mut mapping = Mapping::builtin(&m.base_path, builtin, require)
                .with_context(ctx)?
                .with_authorization(authorization);
            mapping.token_audiences = m.token_audiences.clone();
            mappings.push(mapping);
            continue;
        }
        if let Some(other) = m.upstream.strip_prefix("builtin:")
            && other != "echo"
        {
            bail!(
                "{}: mapping '{}': upstream 'builtin:{other}' is not a built-in service; use builtin:echo, builtin:provisioning, builtin:est, builtin:scep or builtin:token",
                ctx(),
                m.base_path
            );
        }
        if !m.token_audiences.is_empty() {
            bail!(
                "{}: mapping '{}': token_audiences is for builtin:token mappings",
                ctx(),
                m.base_path
            );
        }
        let Some(protocol) = UpstreamProtocol::parse(&m.upstream_protocol) else {
            bail!(
                "{}: mapping '{}': upstream_protocol '{}' must be http1, h2c or h2",
                ctx(),
                m.base_path,
                m.upstream_protocol
            );
        };
        if m.retry_refused && !protocol.is_h2() {
            bail!(
                "{}: mapping '{}': retry_refused is for HTTP/2 upstreams; set upstream_protocol = \"h2c\" or \"h2\", or remove it",
                ctx(),
                m.base_path
            );
        }
        let mut mapping = Mapping::new(&m.base_path, &upstream, require)
            .with_context(ctx)?
            .with_authorization(authorization)
            .with_websocket(m.websocket)
            .with_upstream_protocol(protocol)
            .with_context(ctx)?;
        mapping.retry_refused = m.retry_refused;
        if upstream.starts_with("https://")
            || m.upstream_ca.is_some()
            || m.upstream_client_cert.is_some()
        {
            let Some(ca) = &m.upstream_ca else {
                bail!(
                    "{}: upstream '{upstream}' is https://, so upstream_ca = \"…\" is needed",
                    ctx()
                );
            };
            let ca = at(ca);
            let roots = Certificate::all_from_pem_or_der(&read(&ca, "upstream CA")?)
                .with_context(|| format!("{}: upstream CA {}", ctx(), ca.display()))?;
            let client_certificate = match (&m.upstream_client_cert, &m.upstream_client_key) {
                (None, None) => None,
                (Some(c), Some(k)) => Some(server_certificate(&at(c), &at(k)).with_context(ctx)?),
                _ => bail!(
                    "{}: upstream_client_cert and upstream_client_key go together",
                    ctx()
                ),
            };
            mapping = mapping
                .with_upstream_tls(UpstreamTls {
                    roots: roots.iter().map(|c| c.der().clone()).collect(),
                    client_certificate,
                })
                .with_context(ctx)?;
        }
        mappings.push(mapping);
    }
    Ok(Domain {
        hostname,
        certificate,
        policy,
        mtls,
        mappings,
        session_resumption: d.session_resumption,
        underscores_in_headers: d.underscores_in_headers,
        response_headers: ResponseHeaders::new(
            d.response_headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .map_err(|e| anyhow!("{}: response_headers: {e}", ctx()))?,
        registry_mode: match d.registry_mode.as_str() {
            "off" => RegistryMode::Off,
            "revocation" => RegistryMode::Revocation,
            "registered" => RegistryMode::Registered,
            other => bail!(
                "{}: registry_mode '{other}' must be off, revocation or registered",
                ctx()
            ),
        },
        mqtt: match &d.mqtt {
            None => MqttSettings::default(),
            Some(m) => {
                let defaults = MqttSettings::default();
                let max_packet_size = m.max_packet_size.unwrap_or(defaults.max_packet_size);
                if !(128..=268_435_455).contains(&max_packet_size) {
                    bail!(
                        "{}: mqtt.max_packet_size {max_packet_size} must be between 128 and 268435455",
                        ctx()
                    );
                }
                let connect_timeout = match m.connect_timeout_secs {
                    None => defaults.connect_timeout,
                    Some(s) if s > 0.0 && s <= 600.0 => Duration::from_secs_f64(s),
                    Some(s) => bail!(
                        "{}: mqtt.connect_timeout_secs {s} must be between 0 and 600",
                        ctx()
                    ),
                };
                MqttSettings {
                    require_thing_client_id: m.require_thing_client_id,
                    max_packet_size,
                    https_publish: m.https_publish,
                    connect_timeout,
                }
            }
        },
    })
}

fn file_mtls(
    m: &MtlsSpec,
    at: &dyn Fn(&Path) -> PathBuf,
    catalog: &TruststoreCatalog,
) -> Result<Mtls> {
    let mode = match m.mode.as_str() {
        "required" => MtlsMode::Required,
        "optional" => MtlsMode::Optional,
        "off" => MtlsMode::Off,
        other => bail!("mtls.mode '{other}' must be required, optional or off"),
    };
    let mut crls = Vec::new();
    let truststore = match &m.truststore {
        Some(p) if p.to_string_lossy() == "registry:cas" => {
            Some(Arc::new(Truststore::of_anchors_at(
                catalog.cas.to_vec(),
                time::OffsetDateTime::now_utc().unix_timestamp(),
            )))
        }
        Some(p) if p.to_string_lossy().starts_with("registry:") => {
            let reference = p.to_string_lossy();
            let version = catalog.resolve(&reference["registry:".len()..])?;
            let store = Truststore::from_pem(version.bundle.as_bytes()).with_context(|| {
                format!("truststore {} version {}", version.name, version.version)
            })?;
            for pem in &version.crls {
                crls.extend(Crl::all_from_pem_or_der(pem.as_bytes()).with_context(|| {
                    format!(
                        "CRL of truststore {} version {}",
                        version.name, version.version
                    )
                })?);
            }
            Some(Arc::new(store))
        }
        Some(p) => {
            let p = at(p);
            let bytes = read(&p, "truststore")?;
            let store = Truststore::from_pem(&bytes)
                .with_context(|| format!("truststore {}", p.display()))?;
            for e in store.entries() {
                for w in &e.warnings {
                    tracing::warn!(truststore = %p.display(), certificate = %e.certificate.info().subject, warning = w.code, "{}", w.message);
                }
            }
            Some(Arc::new(store))
        }
        None if mode == MtlsMode::Off => None,
        None => bail!("mtls.mode = \"{}\" needs truststore = \"…\"", m.mode),
    };
    for p in &m.crls {
        let p = at(p);
        let bytes = read(&p, "CRL")?;
        crls.extend(
            Crl::all_from_pem_or_der(&bytes).with_context(|| format!("CRL {}", p.display()))?,
        );
    }
    let on_failure = match m.on_failure.as_str() {
        "tls" => OnFailure::Tls,
        "http" => OnFailure::Http,
        "aws" => OnFailure::Aws,
        other => bail!("mtls.on_failure '{other}' must be tls, http or aws"),
    };
    let allow_stale_crls = match m.stale_crl.as_str() {
        "reject" => false,
        "allow" => true,
        other => bail!("mtls.stale_crl '{other}' must be reject or allow"),
    };
    if m.max_chain_depth == 0 {
        bail!("mtls.max_chain_depth must be at least 1");
    }
    if let Some(advice) = &m.failure_advice
        && (advice.trim().is_empty() || advice.len() > 4096)
    {
        bail!("mtls.failure_advice must be between 1 and 4096 bytes of text");
    }
    let verification = m.verification.parse().map_err(|_| {
        anyhow::anyhow!(
            "mtls.verification '{}' must be compatible or strict",
            m.verification
        )
    })?;
    let revocation = match &m.revocation {
        None => portcullis_gateway::foreign::ForeignPolicy::default(),
        Some(r) => {
            use portcullis_gateway::foreign::{ForeignPolicy, OcspMode};
            let ocsp = match r.ocsp.as_str() {
                "off" => OcspMode::Off,
                "soft" => OcspMode::Soft,
                "hard" => OcspMode::Hard,
                other => bail!("mtls.revocation.ocsp '{other}' must be off, soft or hard"),
            };
            if r.wait_ms > 10_000 {
                bail!(
                    "mtls.revocation.wait_ms {} is more than 10000 (a connection waits at most 10 s for a revocation status)",
                    r.wait_ms
                );
            }
            if r.refresh_secs == 0 {
                bail!("mtls.revocation.refresh_secs must be at least 1");
            }
            if mode == MtlsMode::Off && (r.crl_dp || ocsp != OcspMode::Off) {
                bail!(
                    "mtls.revocation needs mtls.mode required or optional: no certificate is asked for"
                );
            }
            ForeignPolicy {
                crl_dp: r.crl_dp,
                ocsp,
                wait: std::time::Duration::from_millis(r.wait_ms),
                refresh: std::time::Duration::from_secs(r.refresh_secs),
            }
        }
    };
    Ok(Mtls {
        revocation,
        verification,
        mode,
        truststore,
        crls,
        max_chain_depth: m.max_chain_depth,
        advertise_ca_names: m.advertise_ca_names,
        on_failure,
        allow_stale_crls,
        failure_advice: m.failure_advice.clone(),
        registered_cas: catalog.cas.clone(),
    })
}

/// Collapses toml's multi-line error (with its source excerpt) into one line.
fn one_line(message: &str) -> String {
    let mut parts: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with('|')
                && !l.chars().next().is_some_and(|c| c.is_ascii_digit())
        })
        .collect();
    parts.dedup();
    parts.join(": ")
}

/// What a (re)load takes from the registry, read beforehand so that loading stays synchronous:
/// the domains (once seeded) and every truststore version.
#[derive(Debug, Default)]
pub(crate) struct RegistryConfig {
    /// The registry's domains (hostname, specification); `None` before the configuration file
    /// seeded them.
    pub(crate) domains: Option<Vec<(String, DomainSpec)>>,
    /// The registry's truststores.
    pub(crate) catalog: TruststoreCatalog,
    /// The registry's server certificates, their keys opened with the cluster key; `Err`: why
    /// they cannot be used (no cluster key, another cluster's key), said by the domains that
    /// name one.
    pub(crate) server_certs: std::collections::HashMap<String, Result<ServerCertificate, String>>,
    /// In a cluster: `auto` certificates come from the registry (`auto:HOST`), not the data dir.
    pub(crate) cluster_auto: bool,
    /// ACME challenge answers pending (every node serves them).
    pub(crate) acme_challenges: Vec<portcullis_gateway::acme::ChallengeAnswer>,
}

impl RegistryConfig {
    /// Reads the domains, truststores and server certificates from the registry, opening the
    /// certificates' keys with `key`.
    pub(crate) async fn read(store: &Store, key: Option<&ClusterKey>) -> Result<RegistryConfig> {
        let domains = if store.domains_seeded().await? {
            Some(
                store
                    .list_domains()
                    .await?
                    .into_iter()
                    .map(|d| (d.hostname, d.spec))
                    .collect(),
            )
        } else {
            None
        };
        let mut server_certs = std::collections::HashMap::new();
        for record in store.list_server_certificates().await? {
            let opened = open_server_certificate(&record, key);
            server_certs.insert(record.name.clone(), opened);
        }
        Ok(RegistryConfig {
            domains,
            catalog: TruststoreCatalog::read(store).await?,
            server_certs,
            cluster_auto: false,
            acme_challenges: crate::acme::answers(&store.acme_challenges().await?),
        })
    }

    /// Server certificate `name` from the registry.
    fn server_certificate(&self, name: &str) -> Result<ServerCertificate> {
        match self.server_certs.get(name) {
            Some(Ok(c)) => Ok(ServerCertificate {
                chain: c.chain.clone(),
                key: c.key.clone_key(),
            }),
            Some(Err(why)) => bail!("certificate registry:{name}: {why}"),
            None => bail!(
                "certificate registry:{name}: the registry has no server certificate '{name}' (import it with `portcullis server-cert import {name} --cert FILE --key FILE`)"
            ),
        }
    }

    /// The domains in effect: the registry's once seeded, the file's before.
    fn domains_or(&self, file: &FileConfig) -> Result<Vec<DomainSpec>> {
        match &self.domains {
            Some(specs) => parse_specs(specs),
            None => Ok(file.domains.clone()),
        }
    }
}

/// Every stored truststore version, read before a (re)load so that loading stays synchronous.
#[derive(Debug, Default)]
pub(crate) struct TruststoreCatalog {
    versions: std::collections::HashMap<String, Vec<portcullis_registry::TruststoreVersion>>,
    /// The registered ACTIVE CAs: `registry:cas`, and the hint when a domain lacks one.
    cas: Arc<Vec<Certificate>>,
}

impl TruststoreCatalog {
    /// Reads the catalog from the registry.
    pub(crate) async fn read(store: &Store) -> Result<TruststoreCatalog> {
        let mut versions = std::collections::HashMap::new();
        for (name, latest) in store.list_truststores().await? {
            let mut all = Vec::new();
            for v in 1..=latest {
                all.push(store.truststore_version(&name, Some(v)).await?);
            }
            versions.insert(name, all);
        }
        let mut cas = Vec::new();
        for ca in store.list_cas().await? {
            // Registered with proof of possession only: a CA registered without it is not
            // trusted by registry:cas (register it again with --verification-cert).
            if ca.status == portcullis_registry::CaStatus::Active && ca.verified {
                let (cert, _) = Certificate::first_and_rest(ca.pem.as_bytes())
                    .with_context(|| format!("registered CA {}", ca.subject))?;
                cas.push(cert);
            }
        }
        Ok(TruststoreCatalog {
            versions,
            cas: Arc::new(cas),
        })
    }

    /// `NAME` (follows the latest version) or `NAME@VERSION` (pinned).
    fn resolve(&self, reference: &str) -> Result<&portcullis_registry::TruststoreVersion> {
        let (name, version) = match reference.split_once('@') {
            Some((name, v)) => (
                name,
                Some(v.parse::<i64>().map_err(|_| {
                    anyhow!(
                        "truststore registry:{reference}: the version after '@' must be a number"
                    )
                })?),
            ),
            None => (reference, None),
        };
        let versions = self.versions.get(name).ok_or_else(|| {
            anyhow!(
                "truststore registry:{name} does not exist; create it with `portcullis truststore create {name} --bundle FILE`"
            )
        })?;
        match version {
            None => versions.last(),
            Some(v) => versions.iter().find(|t| t.version == v),
        }
        .ok_or_else(|| {
            anyhow!(
                "truststore registry:{name} has no version {}",
                version.unwrap_or_default()
            )
        })
    }
}

/// Checks domain changes made through the admin API before they are stored.
#[derive(Debug)]
pub(crate) struct DomainChecker {
    /// The registry (for its truststores).
    pub(crate) store: Store,
    /// The configuration file (for everything but domains, and the base of relative paths).
    pub(crate) config_path: PathBuf,
    /// The data directory (for `certificate = "auto"`).
    pub(crate) data_root: PathBuf,
    /// The built-in echo upstream.
    pub(crate) echo: SocketAddr,
    /// Opens the registry's server certificate keys; issues `auto` certificates in a cluster.
    pub(crate) cluster: Option<crate::cluster::Cluster>,
}

impl DomainChecker {
    /// See [`portcullis_admin::Hooks::check_domains`].
    pub(crate) async fn check(
        &self,
        specs: &[(String, DomainSpec)],
    ) -> Result<portcullis_admin::CheckedDomains, String> {
        if let Some(cluster) = &self.cluster {
            let candidates: Vec<DomainSpec> = specs.iter().map(|(_, d)| d.clone()).collect();
            cluster
                .ensure_auto_certificates(&self.store, &candidates)
                .await
                .map_err(|e| format!("{e:#}"))?;
        }
        let key = self.cluster.as_ref().map(|c| c.key.as_ref());
        let mut registry = RegistryConfig::read(&self.store, key)
            .await
            .map_err(|e| format!("{e:#}"))?;
        registry.cluster_auto = self.cluster.is_some();
        let data = DataDir::new(&self.data_root);
        check_domains(&self.config_path, &data, self.echo, &registry, specs)
            .map_err(|e| format!("{e:#}"))
    }
}

/// A registry server certificate with its key opened, or why it cannot be.
fn open_server_certificate(
    record: &portcullis_registry::ServerCertRecord,
    key: Option<&ClusterKey>,
) -> Result<ServerCertificate, String> {
    let Some(key) = key else {
        return Err("its key is sealed with the cluster key, and this node has none: set cluster_key_file (or PORTCULLIS_CLUSTER_KEY) to the key the other nodes use".into());
    };
    let context = portcullis_registry::ServerCertRecord::seal_context(&record.name);
    let der = key
        .open(&record.sealed_key, &context)
        .map_err(|e| e.to_string())?;
    let chain = Certificate::all_from_pem_or_der(record.chain_pem.as_bytes())
        .map_err(|e| format!("its chain cannot be read: {e}"))?;
    Ok(ServerCertificate {
        chain: chain.iter().map(|c| c.der().clone()).collect(),
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(der.into()),
    })
}

/// The cluster key: `PORTCULLIS_CLUSTER_KEY` (the key itself), or the file the configuration's
/// `cluster_key_file` names (relative to the configuration file); none when neither is set.
pub(crate) fn cluster_key(config_path: &Path) -> Result<Option<Arc<ClusterKey>>> {
    if let Ok(text) = std::env::var("PORTCULLIS_CLUSTER_KEY") {
        let key = ClusterKey::parse(&text).context("PORTCULLIS_CLUSTER_KEY")?;
        return Ok(Some(Arc::new(key)));
    }
    let file = read_file_config(config_path)?;
    let Some(path) = &file.cluster_key_file else {
        return Ok(None);
    };
    let path = relative_to(config_path)(path);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading cluster_key_file {} (make one with `portcullis cluster-key generate --out {}`)",
            path.display(),
            path.display()
        )
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(&path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(file = %path.display(), "the cluster key file is readable by others than its owner: chmod 600 it");
        }
    }
    let key =
        ClusterKey::parse(&text).with_context(|| format!("cluster_key_file {}", path.display()))?;
    Ok(Some(Arc::new(key)))
}

/// What the cluster key check seals.
const KEY_CHECK: &[u8] = b"portcullis cluster key";

/// Checks this node's cluster key against the registry's: the first node with a key records a
/// check value; a node with another key, or none while the registry holds sealed keys, refuses
/// to start with the reason.
pub(crate) async fn check_cluster_key(store: &Store, key: Option<&ClusterKey>) -> Result<()> {
    let recorded = store.cluster_key_check().await?;
    match (key, recorded) {
        (Some(key), None) => {
            let check = store
                .init_cluster_key_check(&key.seal(KEY_CHECK, "cluster-key-check")?)
                .await?;
            key.open(&check, "cluster-key-check")
                .map(|_| ())
                .map_err(|_| anyhow!("another node recorded a different cluster key at the same time: give every node the same cluster_key_file"))
        }
        (Some(key), Some(check)) => match key.open(&check, "cluster-key-check") {
            Ok(plain) if plain == KEY_CHECK => Ok(()),
            _ => bail!(
                "the cluster key is not the one this registry's private keys are sealed with: give this node the same cluster_key_file (or PORTCULLIS_CLUSTER_KEY) as the other nodes"
            ),
        },
        (None, Some(_)) => bail!(
            "the registry holds private keys sealed with a cluster key, and this node has none: set cluster_key_file = \"FILE\" in its configuration (the same key file as the other nodes) or PORTCULLIS_CLUSTER_KEY"
        ),
        (None, None) => Ok(()),
    }
}
