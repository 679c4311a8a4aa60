//! `portcullis serve`: the configuration file, the quickstart data dir, auto certificates,
//! signals (SIGHUP reloads, SIGTERM/SIGINT drain and exit) and wiring of the gateway.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use portcullis_gateway::config::{
    Domain, Hostname, IdentityHeaders, Limits, Mapping, Mtls, MtlsMode, OnFailure, RegistryMode,
    SecurityPolicy, ServerCertificate, UpstreamTls,
};
use portcullis_gateway::verify::{AutoRegistration, RegisteredStatus, RegistrySnapshot};
use portcullis_gateway::{Config, Gateway};
use portcullis_pki::crl::Crl;
use portcullis_pki::issue::{self, CaIssuer};
use portcullis_pki::p12::{self, P12Format};
use portcullis_pki::{
    Certificate, IssueRequest, KeyType, PrivateKey, Profile, SubjectAltName, SubjectName,
    Truststore,
};
use portcullis_registry::{CertStatus, Store};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::output::{Outputs, read};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML). Without it, DATA_DIR/portcullis.toml, made by the quickstart.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the local CA, auto certificates and the quickstart live.
    #[arg(long, value_name = "DIR", default_value = "portcullis-data")]
    data_dir: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

/// The configuration file. Unknown keys are errors that name the key and its line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// Serve connections whose SNI matches no domain with `default_domain`.
    #[serde(default)]
    default_endpoint: bool,
    default_domain: Option<String>,
    #[serde(default, rename = "listener")]
    listeners: Vec<FileListener>,
    #[serde(default, rename = "domain")]
    domains: Vec<FileDomain>,
    limits: Option<FileLimits>,
    admin: Option<FileAdmin>,
    /// The registry: a SQLite file (default DATA_DIR/registry.db) or postgres://…
    database: Option<String>,
    identity: Option<FileIdentity>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIdentity {
    /// Also send Envoy's x-forwarded-client-cert.
    #[serde(default)]
    xfcc: bool,
    /// Field → header name (client_cert, client_cert_chain, subject, issuer, serial, not_before,
    /// not_after, fingerprint, verify).
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDomain {
    hostname: String,
    /// "auto" (issued by the local CA) or a PEM chain file (leaf first).
    certificate: String,
    key: Option<PathBuf>,
    #[serde(default = "default_policy")]
    security_policy: String,
    mtls: Option<FileMtls>,
    #[serde(default, rename = "mapping")]
    mappings: Vec<FileMapping>,
    #[serde(default = "default_true")]
    session_resumption: bool,
    /// off (truststore only), revocation, or registered.
    #[serde(default = "default_registry_mode")]
    registry_mode: String,
}

fn default_registry_mode() -> String {
    "off".into()
}

fn default_policy() -> String {
    "TLS_1_2".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMtls {
    mode: String,
    truststore: Option<PathBuf>,
    #[serde(default)]
    crls: Vec<PathBuf>,
    #[serde(default = "default_depth")]
    max_chain_depth: u8,
    #[serde(default = "default_true")]
    advertise_ca_names: bool,
    #[serde(default = "default_on_failure")]
    on_failure: String,
    #[serde(default = "default_stale")]
    stale_crl: String,
}

fn default_depth() -> u8 {
    4
}
fn default_true() -> bool {
    true
}
fn default_on_failure() -> String {
    "tls".into()
}
fn default_stale() -> String {
    "reject".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMapping {
    #[serde(default)]
    base_path: String,
    upstream: String,
    #[serde(default = "default_required")]
    client_certificate: String,
    /// For https:// upstreams: the CA bundle their server certificates chain to.
    upstream_ca: Option<PathBuf>,
    /// For https:// upstreams that want one: the gateway's client certificate chain and key.
    upstream_client_cert: Option<PathBuf>,
    upstream_client_key: Option<PathBuf>,
}

fn default_required() -> String {
    "required".into()
}

/// Runs the gateway until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> Result<ExitCode> {
    let data = DataDir::new(&args.data_dir);
    let (config_path, quickstart) = match &args.config {
        Some(path) => (path.clone(), None),
        None => {
            let path = args.data_dir.join("portcullis.toml");
            let made = if path.exists() {
                None
            } else {
                Some(data.quickstart()?)
            };
            (path, made)
        }
    };
    let echo = portcullis_gateway::echo::spawn_echo(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("starting the built-in echo upstream")?;
    let database = database_of(&config_path, &data)?;
    if !database.starts_with("postgres")
        && let Some(dir) = Path::new(&database).parent()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the registry's directory {}", dir.display()))?;
    }
    let store = Store::open(&database)
        .await
        .with_context(|| format!("opening the registry {}", redact(&database)))?;
    let catalog = TruststoreCatalog::read(&store)
        .await
        .context("reading the registry's truststores")?;
    let (config, admin_addr) = load_config(&config_path, &data, echo, &catalog)?;
    if args.check_config {
        portcullis_gateway::check(&config)
            .with_context(|| format!("checking {}", config_path.display()))?;
        println!("{}: OK", config_path.display());
        return Ok(ExitCode::SUCCESS);
    }
    init_logging();
    let signals = Signals::install()?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
        .context("configuring metrics")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let ready = Arc::new(AtomicBool::new(false));
    let marker = store.change_marker().await?;
    let config_marker = store.config_marker().await?;
    let gateway = Gateway::start(config, registry_snapshot(&store).await?).await?;
    if let Some(requests) = gateway.take_jit_requests() {
        tokio::spawn(just_in_time(store.clone(), requests));
    }
    if let Some(sightings) = gateway.take_sightings() {
        tokio::spawn(record_sightings(store.clone(), sightings));
    }

    // The admin API: HTTPS, admin client certificate or bearer token.
    let local_ca = Arc::new(data.local_ca()?);
    let admin_files = crate::admin::AdminFiles::new(&args.data_dir);
    let admin_tls = admin_files.tls_config(&local_ca, admin_addr)?;
    let hooks = crate::admin::ServeHooks {
        metrics,
        ready: ready.clone(),
        explainer: gateway.explainer(),
    };
    let api = portcullis_registry::api::Api::new(store.clone(), Some(local_ca), Arc::new(hooks));
    let admin = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("cannot listen on the admin address {admin_addr}"))?;
    let admin_local = admin.local_addr()?;
    admin_files.write_endpoint(admin_local)?;
    tokio::spawn(portcullis_registry::api::serve_https(
        admin,
        admin_tls,
        portcullis_registry::api::router(api),
    ));

    ready.store(true, Ordering::SeqCst);
    println!("portcullis admin API on https://{admin_local}");
    let addrs: Vec<String> = gateway
        .local_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    println!(
        "portcullis is serving on {} (config {})",
        addrs.join(", "),
        config_path.display()
    );
    let port = gateway
        .local_addrs()
        .first()
        .map(|a| a.port())
        .unwrap_or(8443);
    if let Some(q) = &quickstart {
        q.print(port);
    } else if args.config.is_none()
        && let Ok(q) = data.existing_quickstart()
    {
        q.print(port);
    }
    let load = |catalog: &TruststoreCatalog| {
        load_config(&config_path, &data, echo, catalog).map(|(config, _)| config)
    };
    let markers = (marker, config_marker);
    wait_for_changes(
        &gateway,
        &load,
        &config_path,
        signals,
        &store,
        markers,
        catalog,
    )
    .await;
    ready.store(false, Ordering::SeqCst);
    println!("portcullis: draining connections and stopping");
    gateway.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Reads and parses the configuration file; errors name the key and its line.
fn read_file_config(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading configuration {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow!("{}: {}", path.display(), one_line(&e.to_string())))
}

/// The registry database the configuration names (default DATA_DIR/registry.db), read before
/// the rest of the configuration because loading needs the registry's truststores.
fn database_of(path: &Path, data: &DataDir) -> Result<String> {
    let file = read_file_config(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    Ok(match &file.database {
        Some(d) if d.starts_with("postgres://") || d.starts_with("postgresql://") => d.clone(),
        Some(d) if Path::new(d).is_absolute() => d.clone(),
        Some(d) => base.join(d).display().to_string(),
        None => data.root.join("registry.db").display().to_string(),
    })
}

/// Writes just-in-time registrations: JITR records PENDING_ACTIVATION (the device was refused
/// and retries once activated); JITP registers ACTIVE with its thing and answers the waiting
/// connection. Requests run concurrently, a bounded number at a time; a certificate registered
/// already (a burst of one device) is registered exactly once.
async fn just_in_time(
    store: Store,
    mut requests: tokio::sync::mpsc::Receiver<portcullis_gateway::verify::JitRequest>,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(16));
    while let Some(request) = requests.recv().await {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let store = store.clone();
        tokio::spawn(async move {
            let outcome = jit_one(&store, &request).await;
            if let Some(done) = request.done {
                let _ = done.send(outcome);
            }
            drop(permit);
        });
    }
}

async fn jit_one(
    store: &Store,
    request: &portcullis_gateway::verify::JitRequest,
) -> std::result::Result<(), String> {
    use portcullis_registry::RegistryError;
    let cert = &request.certificate;
    let id = portcullis_registry::CertId::of_der(cert.der());
    if !request.provision {
        return match store
            .register_certificate(
                cert.to_pem().as_bytes(),
                CertStatus::PendingActivation,
                "gateway:jit",
            )
            .await
        {
            Ok(record) => {
                tracing::info!(
                    target: "portcullis::registry",
                    certificate = %record.id,
                    subject = %record.subject,
                    status = "PENDING_ACTIVATION",
                    "registered just in time"
                );
                Ok(())
            }
            Err(RegistryError::Conflict(_)) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "just-in-time registration failed");
                Err("the registry could not record it".into())
            }
        };
    }
    let ca_id = portcullis_registry::CertId::from_str(&request.ca_id).map_err(|e| e.to_string())?;
    let template = match store.ca(&ca_id).await {
        Ok(ca) => ca.provisioning_template,
        Err(e) => {
            tracing::warn!(error = %e, "just-in-time provisioning: reading the CA failed");
            return Err("the registry could not read the CA".into());
        }
    };
    let Some(template) = template else {
        return Err("the CA no longer has a provisioning template".into());
    };
    let provisioned = template.resolve(cert)?;
    match store
        .provision(cert, &ca_id, &provisioned, "gateway:jit")
        .await
    {
        Ok(record) => {
            tracing::info!(
                target: "portcullis::registry",
                certificate = %record.id,
                subject = %record.subject,
                thing = %provisioned.thing_name,
                status = "ACTIVE",
                "provisioned just in time"
            );
            Ok(())
        }
        // Registered meanwhile (the same device connecting twice at once): fine if ACTIVE.
        Err(RegistryError::Conflict(_)) => match store.certificate(&id).await {
            Ok(r) if r.status == CertStatus::Active => Ok(()),
            Ok(r) => Err(format!(
                "the certificate is registered {}",
                r.status.as_str()
            )),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => {
            tracing::warn!(error = %e, "just-in-time provisioning failed");
            Err(format!("the registry refused it: {e}"))
        }
    }
}

/// Writes the certificates gateways saw, in batches.
async fn record_sightings(
    store: Store,
    mut sightings: tokio::sync::mpsc::Receiver<portcullis_gateway::verify::Sighting>,
) {
    let mut batch = Vec::new();
    while sightings.recv_many(&mut batch, 1000).await > 0 {
        let at = time::OffsetDateTime::now_utc().unix_timestamp();
        let rows: Vec<portcullis_registry::Sighting> = batch
            .drain(..)
            .map(|s| portcullis_registry::Sighting {
                certificate: s.certificate,
                domain: s.domain,
                at,
            })
            .collect();
        match store.record_sightings(&rows).await {
            Ok(()) => {
                tracing::info!(target: "portcullis::registry", count = rows.len(), "recorded seen certificates")
            }
            Err(e) => tracing::warn!(error = %e, "recording seen certificates failed"),
        }
    }
}

/// Reloads on SIGHUP and when the configuration file or a file it names changes (checked every
/// second); returns on SIGTERM or SIGINT.
async fn wait_for_changes(
    gateway: &Gateway,
    load: &dyn Fn(&TruststoreCatalog) -> Result<Config>,
    config_path: &Path,
    signals: Signals,
    store: &Store,
    markers: (i64, i64),
    mut catalog: TruststoreCatalog,
) {
    let (mut registry_marker, mut config_marker) = markers;
    let Signals {
        mut hup,
        mut term,
        mut int,
    } = signals;
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    // The registry is polled often: a revocation must reach live connections within a second.
    let mut registry_poll = tokio::time::interval(Duration::from_millis(200));
    let mut seen = file_stamps(config_path);
    loop {
        let trigger = tokio::select! {
            _ = hup.recv() => "signal",
            _ = registry_poll.tick() => {
                match store.change_marker().await {
                    Ok(marker) if marker != registry_marker => match registry_snapshot(store).await {
                        Ok(snapshot) => {
                            registry_marker = marker;
                            gateway.update_registry(snapshot);
                            tracing::info!(target: "portcullis::registry", marker, "registry snapshot refreshed");
                        }
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot read the registry; keeping the previous snapshot"),
                    },
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot read the registry; keeping the previous snapshot"),
                }
                // Truststore (and domain) changes rebuild the configuration.
                match store.config_marker().await {
                    Ok(marker) if marker != config_marker => match TruststoreCatalog::read(store).await {
                        Ok(fresh) => {
                            config_marker = marker;
                            catalog = fresh;
                            "registry"
                        }
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "cannot read the registry's truststores; keeping the previous configuration");
                            continue;
                        }
                    },
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the registry; keeping the previous configuration");
                        continue;
                    }
                }
            }
            _ = poll.tick() => {
                if file_stamps(config_path) == seen {
                    continue;
                }
                "file-change"
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        match load(&catalog).and_then(|c| gateway.reload(c).map_err(Into::into)) {
            Ok(generation) => {
                metrics::counter!("portcullis_reloads_total", "result" => "ok").increment(1);
                tracing::info!(target: "portcullis::reload", generation, trigger, result = "ok", "configuration reloaded");
            }
            Err(e) => {
                metrics::counter!("portcullis_reloads_total", "result" => "failed").increment(1);
                tracing::error!(target: "portcullis::reload", trigger, result = "failed", error = %format!("{e:#}"), "reload failed; keeping the previous configuration");
            }
        }
        seen = file_stamps(config_path);
    }
}

/// The gateway's in-memory view of the registry.
async fn registry_snapshot(store: &Store) -> Result<RegistrySnapshot> {
    let statuses = store.statuses().await.context("reading the registry")?;
    let auto_registering = store
        .list_cas()
        .await
        .context("reading the registry")?
        .into_iter()
        .filter(|ca| ca.status == portcullis_registry::CaStatus::Active && ca.auto_registration)
        .filter_map(|ca| {
            let (cert, _) = Certificate::first_and_rest(ca.pem.as_bytes()).ok()?;
            Some(AutoRegistration {
                ca: cert,
                ca_id: ca.id.to_string(),
                provisioner: ca.provisioning_template.map(|t| {
                    Arc::new(crate::admin::TemplateProvisioner(t))
                        as Arc<dyn portcullis_gateway::verify::Provisioner>
                }),
            })
        })
        .collect();
    let statuses = statuses.into_iter().map(|(id, status)| {
        let status = match status {
            CertStatus::Active => RegisteredStatus::Active,
            CertStatus::Inactive => RegisteredStatus::Inactive,
            CertStatus::PendingActivation => RegisteredStatus::PendingActivation,
            CertStatus::Revoked => RegisteredStatus::Revoked,
        };
        (id.to_string(), status)
    });
    Ok(RegistrySnapshot::new(statuses).with_auto_registering_cas(auto_registering))
}

/// A database URL without its password, for messages.
fn redact(database: &str) -> String {
    match (database.find("://"), database.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &database[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &database[..scheme + 3], &database[at..])
        }
        _ => database.to_string(),
    }
}

/// The signals `serve` handles, installed before anything is announced so that an early SIGHUP
/// reloads instead of killing the process.
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }
}

/// Modification time and size of the configuration file and of every file it names.
fn file_stamps(config_path: &Path) -> Vec<(PathBuf, Option<(std::time::SystemTime, u64)>)> {
    let mut files = vec![config_path.to_path_buf()];
    let base = config_path.parent().unwrap_or(Path::new("."));
    let at = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    if let Ok(text) = std::fs::read_to_string(config_path)
        && let Ok(file) = toml::from_str::<FileConfig>(&text)
    {
        for d in &file.domains {
            if d.certificate != "auto" {
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

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("PORTCULLIS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_target(true)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .try_init();
}

/// Reads the configuration file and every file it names, and builds the gateway config; also
/// returns the admin listener's address.
fn load_config(
    path: &Path,
    data: &DataDir,
    echo: SocketAddr,
    catalog: &TruststoreCatalog,
) -> Result<(Config, SocketAddr)> {
    let file = read_file_config(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let at = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let listeners = file
        .listeners
        .iter()
        .map(|l| {
            l.address.parse::<SocketAddr>().map_err(|_| {
                anyhow!(
                    "{}: listener address '{}' is not IP:PORT",
                    path.display(),
                    l.address
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut domains = Vec::new();
    for d in &file.domains {
        let ctx = || format!("{}: domain '{}'", path.display(), d.hostname);
        domains.push(file_domain(d, &at, data, echo, catalog).with_context(ctx)?);
    }
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
    let config = match &file.identity {
        None => config,
        Some(i) => {
            let mut ids = IdentityHeaders {
                xfcc: i.xfcc,
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
    d: &FileDomain,
    at: &dyn Fn(&Path) -> PathBuf,
    data: &DataDir,
    echo: SocketAddr,
    catalog: &TruststoreCatalog,
) -> Result<Domain> {
    let ctx = || format!("domain '{}'", d.hostname);
    let hostname = Hostname::parse(&d.hostname).with_context(ctx)?;
    let certificate = if d.certificate == "auto" {
        if d.key.is_some() {
            bail!(
                "{}: key is set, but certificate = \"auto\" makes its own",
                ctx()
            );
        }
        data.auto_certificate(&hostname).with_context(ctx)?
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
        other => bail!(
            "{}: security_policy '{other}' must be TLS_1_2 or TLS_1_3",
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
        let mut mapping = Mapping::new(&m.base_path, &upstream, require).with_context(ctx)?;
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
        registry_mode: match d.registry_mode.as_str() {
            "off" => RegistryMode::Off,
            "revocation" => RegistryMode::Revocation,
            "registered" => RegistryMode::Registered,
            other => bail!(
                "{}: registry_mode '{other}' must be off, revocation or registered",
                ctx()
            ),
        },
    })
}

fn file_mtls(
    m: &FileMtls,
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
        other => bail!("mtls.on_failure '{other}' must be tls or http"),
    };
    let allow_stale_crls = match m.stale_crl.as_str() {
        "reject" => false,
        "allow" => true,
        other => bail!("mtls.stale_crl '{other}' must be reject or allow"),
    };
    if m.max_chain_depth == 0 {
        bail!("mtls.max_chain_depth must be at least 1");
    }
    Ok(Mtls {
        mode,
        truststore,
        crls,
        max_chain_depth: m.max_chain_depth,
        advertise_ca_names: m.advertise_ca_names,
        on_failure,
        allow_stale_crls,
    })
}

fn server_certificate(chain: &Path, key: &Path) -> Result<ServerCertificate> {
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

/// The data directory: local CA, auto certificates, quickstart files.
struct DataDir {
    root: PathBuf,
}

/// What the quickstart made, for the banner.
struct Quickstart {
    root: PathBuf,
    password: String,
}

impl DataDir {
    fn new(root: &Path) -> DataDir {
        DataDir {
            root: root.to_path_buf(),
        }
    }

    /// The local CA, created on first use.
    fn local_ca(&self) -> Result<CaIssuer> {
        let cert_path = self.root.join("ca/ca.pem");
        let key_path = self.root.join("ca/ca.key");
        if !cert_path.exists() {
            let key = PrivateKey::generate(KeyType::EcP256)?;
            let mut req = IssueRequest::new(
                Profile::RootCa,
                SubjectName {
                    common_name: "Portcullis Local CA".into(),
                    organization: Some("Portcullis".into()),
                    ..Default::default()
                },
            );
            req.path_len = Some(0);
            let cert = issue::issue(&req, &key, None)?;
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
    fn auto_certificate(&self, hostname: &Hostname) -> Result<ServerCertificate> {
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
            let key = PrivateKey::generate(KeyType::EcP256)?;
            let mut req = IssueRequest::new(Profile::Server, SubjectName::cn(hostname.to_string()));
            req.subject_alt_names = vec![SubjectAltName::Dns(hostname.to_string())];
            if hostname.to_string() == "localhost" {
                req.subject_alt_names
                    .push(SubjectAltName::Ip([127, 0, 0, 1].into()));
                req.subject_alt_names
                    .push(SubjectAltName::Ip(std::net::Ipv6Addr::LOCALHOST.into()));
            }
            let cert = issue::issue(&req, &key, Some(&ca))?;
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
    fn quickstart(&self) -> Result<Quickstart> {
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
        out.public(self.root.join("truststore.pem"), ca.certificate().to_pem());
        out.public(self.root.join("portcullis.toml"), QUICKSTART_CONFIG);
        out.write(true)?;
        Ok(Quickstart {
            root: self.root.clone(),
            password,
        })
    }

    fn existing_quickstart(&self) -> Result<Quickstart> {
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
    fn print(&self, port: u16) {
        let d = self.root.display();
        println!();
        println!(
            "Quickstart: https://localhost:{port}/ requires a client certificate and answers with the identity it forwarded."
        );
        println!("This succeeds (the demo client certificate):");
        println!(
            "  curl --cacert {d}/ca/ca.pem --cert {d}/clients/demo.pem --key {d}/clients/demo.key https://localhost:{port}/hello"
        );
        println!("This is refused (no client certificate):");
        println!("  curl --cacert {d}/ca/ca.pem https://localhost:{port}/hello");
        println!(
            "Browsers: import {d}/clients/demo.p12 (password {}) and trust {d}/ca/ca.pem.",
            self.password
        );
        println!("Configuration: {d}/portcullis.toml (edit it, then send SIGHUP to reload).");
        println!();
    }
}

const QUICKSTART_CONFIG: &str = r#"# Portcullis quickstart configuration; see docs/configuration.md for every key.

[[listener]]
address = "127.0.0.1:8443"

[[domain]]
hostname = "localhost"
certificate = "auto"          # issued by the local CA in this directory
security_policy = "TLS_1_2"   # TLS 1.2 and 1.3

[domain.mtls]
mode = "required"
truststore = "truststore.pem"
on_failure = "tls"

[[domain.mapping]]
base_path = ""                # everything
upstream = "builtin:echo"     # answers with the identity it received
"#;

/// Every stored truststore version, read before a (re)load so that loading stays synchronous.
#[derive(Debug, Default)]
pub(crate) struct TruststoreCatalog {
    versions: std::collections::HashMap<String, Vec<portcullis_registry::TruststoreVersion>>,
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
        Ok(TruststoreCatalog { versions })
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
