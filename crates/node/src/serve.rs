//! `portcullis serve`: the configuration file, the quickstart data dir, auto certificates,
//! signals (SIGHUP reloads, SIGTERM/SIGINT drain and exit) and wiring of the gateway.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use portcullis_gateway::registry_view::{AutoRegistration, RegisteredStatus, RegistrySnapshot};
use portcullis_gateway::{Config, Gateway};
use portcullis_pki::Certificate;
use portcullis_registry::{CertStatus, Store};

use crate::config::{RegistryConfig, database_of, file_stamps, load_config};
use crate::data_dir::DataDir;

#[derive(Debug, Args)]
/// `portcullis serve` arguments.
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

/// Runs the gateway until SIGTERM or SIGINT.
pub fn run(args: ServeArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

/// `serve --check-config`: validates without side effects. Nothing is created (no data
/// directory, CA, key, certificate or database); auto certificates that do not exist yet are
/// made in memory only; the registry is read when its database exists, so stored domains and
/// truststores are checked as the server would use them.
async fn check_config(args: &ServeArgs) -> Result<ExitCode> {
    let data = DataDir::dry_run(&args.data_dir);
    let config_path = match &args.config {
        Some(path) => path.clone(),
        None => {
            let path = args.data_dir.join("portcullis.toml");
            if !path.exists() {
                bail!(
                    "{} does not exist: pass --config FILE, or run `portcullis serve --data-dir {}` once to make the quickstart",
                    path.display(),
                    args.data_dir.display()
                );
            }
            path
        }
    };
    let echo = SocketAddr::from(([127, 0, 0, 1], 9));
    let database = database_of(&config_path, &data)?;
    let stored = database.starts_with("postgres") || Path::new(&database).exists();
    let registry = if stored {
        let store = Store::open(&database)
            .await
            .with_context(|| format!("opening the registry {}", redact(&database)))?;
        RegistryConfig::read(&store)
            .await
            .context("reading the registry's domains and truststores")?
    } else {
        RegistryConfig::default()
    };
    let (config, _) = load_config(&config_path, &data, echo, &registry)?;
    portcullis_gateway::check(&config)
        .with_context(|| format!("checking {}", config_path.display()))?;
    if registry.domains.is_some() {
        outln!(
            "{}: OK (with the registry's domains, which replaced the file's [[domain]] tables at the first start)",
            config_path.display()
        );
    } else {
        outln!("{}: OK", config_path.display());
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs) -> Result<ExitCode> {
    if args.check_config {
        return check_config(&args).await;
    }
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
    // What the configuration is built from is noted before it is read, so that a change made
    // meanwhile is noticed afterwards rather than lost.
    let mut config_marker = store.config_marker().await?;
    let mut registry = RegistryConfig::read(&store)
        .await
        .context("reading the registry's domains and truststores")?;
    let files = file_stamps(&config_path, &registry);
    let (config, admin_addr) = load_config(&config_path, &data, echo, &registry)?;
    init_logging();
    // The file's domains loaded, so they can seed the registry (at the first start only).
    if crate::config::seed_domains(&store, &config_path).await? {
        tracing::info!(
            config = %config_path.display(),
            "the configuration file's domains now live in the registry; change them with `portcullis domain put|delete`"
        );
        config_marker = store.config_marker().await?;
        registry = RegistryConfig::read(&store).await?;
    } else {
        crate::config::warn_if_file_domains_ignored(&config_path, &registry);
    }
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
    if database.starts_with("postgres") && config.speaks_mqtt() {
        tracing::warn!(
            "MQTT sessions live on this node: with several nodes sharing this database, a message reaches only subscribers connected to the node it was published on; keep a fleet's MQTT on one node or pin devices to a node"
        );
    }
    let gateway = Gateway::start(config, registry_snapshot(&store).await?).await?;
    // What the data path reports: each kind to its own writer.
    if let Some(outbox) = gateway.take_outbox() {
        tokio::spawn(just_in_time(store.clone(), outbox.jit));
        tokio::spawn(record_sightings(store.clone(), outbox.sightings));
        tokio::spawn(record_forwarded(store.clone(), outbox.forwarded));
    }
    tokio::spawn(portcullis_registry::webhooks::Dispatcher::new(store.clone()).run());
    tokio::spawn(publish_registry_events(store.clone(), gateway.broker()));

    // The admin API: HTTPS, admin client certificate or bearer token.
    let local_ca = Arc::new(data.local_ca()?);
    let admin_files = crate::admin::AdminFiles::new(&args.data_dir);
    let admin_tls = admin_files.tls_config(&local_ca, admin_addr)?;
    let registry_reachable = Arc::new(AtomicBool::new(true));
    let hooks = crate::admin::ServeHooks {
        metrics,
        expiry: gateway.expiry_gauges(),
        live: gateway.live_connections(),
        ready: ready.clone(),
        registry_reachable: registry_reachable.clone(),
        explainer: gateway.explainer(),
        broker: gateway.broker(),
        admin: crate::admin::AdminFiles::new(&args.data_dir),
        domains: crate::config::DomainChecker {
            store: store.clone(),
            config_path: config_path.clone(),
            data_root: args.data_dir.clone(),
            echo,
        },
    };
    let api = portcullis_admin::Api::new(store.clone(), Some(local_ca), Arc::new(hooks));
    let admin = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("cannot listen on the admin address {admin_addr}"))?;
    let admin_local = admin.local_addr()?;
    admin_files.write_endpoint(admin_local)?;
    tokio::spawn(portcullis_admin::serve_https(
        admin,
        admin_tls,
        portcullis_admin::router(api),
    ));

    ready.store(true, Ordering::SeqCst);
    outln!("portcullis admin API on https://{admin_local}");
    outln!(
        "portcullis console on https://{admin_local}/ui (sign in with a token from `portcullis admin token create --name NAME`, or the admin certificate)"
    );
    let addrs: Vec<String> = gateway
        .local_addrs()
        .iter()
        .map(ToString::to_string)
        .collect();
    outln!(
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
    let load = |registry: &RegistryConfig| {
        load_config(&config_path, &data, echo, registry).map(|(config, _)| config)
    };
    let baseline = Baseline {
        registry_marker: marker,
        config_marker,
        files,
        reachable: registry_reachable,
    };
    wait_for_changes(
        &gateway,
        &load,
        &config_path,
        signals,
        &store,
        baseline,
        registry,
    )
    .await;
    ready.store(false, Ordering::SeqCst);
    outln!("portcullis: draining connections and stopping");
    gateway.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Writes just-in-time registrations: JITR records PENDING_ACTIVATION (the device was refused
/// and retries once activated); JITP registers ACTIVE with its thing and answers the waiting
/// connection. Requests run concurrently, a bounded number at a time; a certificate registered
/// already (a burst of one device) is registered exactly once.
async fn just_in_time(
    store: Store,
    mut requests: tokio::sync::mpsc::Receiver<portcullis_gateway::outbox::JitRequest>,
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
    request: &portcullis_gateway::outbox::JitRequest,
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
                Err(jit_error(&e, "the registry could not record it"))
            }
        };
    }
    let ca_id = portcullis_registry::CertId::from_str(&request.ca_id).map_err(|e| e.to_string())?;
    let template = match store.ca(&ca_id).await {
        Ok(ca) => ca.provisioning_template,
        Err(e) => {
            tracing::warn!(error = %e, "just-in-time provisioning: reading the CA failed");
            return Err(jit_error(&e, "the registry could not read the CA"));
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
            Err(jit_error(&e, &format!("the registry refused it: {e}")))
        }
    }
}

/// Why a just-in-time registration failed, in the words the client's log line will carry.
fn jit_error(e: &portcullis_registry::RegistryError, otherwise: &str) -> String {
    if e.is_unavailable() {
        "the registry database cannot be reached; just-in-time registrations are refused until it is back".into()
    } else {
        otherwise.into()
    }
}

/// Publishes registry events (the webhook events) on this node's MQTT topics
/// `$portcullis/events/<type>` (`certificate.status_changed` → `…/certificate/status_changed`),
/// which only policies naming them can read.
async fn publish_registry_events(store: Store, broker: Arc<portcullis_mqtt::broker::Broker>) {
    let mut cursor = loop {
        match store.newest_event().await {
            Ok(seq) => break seq,
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let Ok(events) = store.events_after(cursor, 500).await else {
            continue;
        };
        for (seq, kind, payload) in events {
            cursor = seq;
            broker.publish(
                portcullis_mqtt::broker::Message {
                    topic: format!("$portcullis/events/{}", kind.replace('.', "/")),
                    payload: payload.into_bytes().into(),
                    qos: portcullis_mqtt::codec::QoS::AtLeastOnce,
                    retain: false,
                    properties: Default::default(),
                    expires_at: None,
                    sent_as: None,
                },
                None,
            );
        }
    }
}

/// Records MQTT messages for their forwarding rules, in batches; the webhook dispatcher sends
/// them (signed, retried, recorded).
async fn record_forwarded(
    store: Store,
    mut forwarded: tokio::sync::mpsc::Receiver<portcullis_gateway::outbox::Forwarded>,
) {
    let mut batch = Vec::new();
    while forwarded.recv_many(&mut batch, 500).await > 0 {
        let rows: Vec<(String, String)> = batch.drain(..).map(|m| (m.rule, m.envelope)).collect();
        if let Err(e) = store.enqueue_message_deliveries(&rows).await {
            tracing::warn!(target: "portcullis::webhooks", error = %e, messages = rows.len(), "cannot record messages for forwarding rules; they are dropped");
        }
    }
}

/// Writes the certificates gateways saw, in batches.
async fn record_sightings(
    store: Store,
    mut sightings: tokio::sync::mpsc::Receiver<portcullis_gateway::outbox::Sighting>,
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
    load: &dyn Fn(&RegistryConfig) -> Result<Config>,
    config_path: &Path,
    signals: Signals,
    store: &Store,
    baseline: Baseline,
    mut registry: RegistryConfig,
) {
    let Baseline {
        registry_marker,
        config_marker,
        files: mut seen,
        reachable,
    } = baseline;
    let Signals {
        mut hup,
        mut term,
        mut int,
    } = signals;
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    // The registry is polled often: a revocation must reach live connections within a second.
    // On PostgreSQL, notifications from every node's commits wake the loop at once.
    let mut registry_poll = tokio::time::interval(Duration::from_millis(200));
    let mut watch = RegistryWatch {
        registry_marker,
        window_start: time::OffsetDateTime::now_utc().unix_timestamp() - CHANGE_WINDOW_SECS,
        last_full: std::time::Instant::now(),
        notified: false,
        reread_from: None,
        config_marker,
        force_snapshot: false,
        force_config: false,
        reachable: true,
        reachable_flag: reachable,
    };
    let mut listener = match store.listen().await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for registry changes; polling only");
            None
        }
    };
    loop {
        let trigger = tokio::select! {
            _ = hup.recv() => "signal",
            change = next_change(&mut listener) => {
                match change {
                    Ok(portcullis_registry::Change::Registry(seq)) => watch.notified(seq),
                    Ok(portcullis_registry::Change::Config(seq)) => {
                        watch.notified(seq);
                        watch.force_config = true;
                    }
                    Ok(portcullis_registry::Change::Resync) => {
                        tracing::info!(target: "portcullis::registry", "change notifications reconnected; resynchronizing");
                        watch.force_snapshot = true;
                        watch.force_config = true;
                    }
                    Err(e) => {
                        // Notifications may be lost while disconnected: resync once back.
                        watch.force_snapshot = true;
                        watch.force_config = true;
                        tracing::debug!(error = %e, "change notifications unavailable");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
                match watch.check(store, gateway).await {
                    Some(fresh) => {
                        registry = fresh;
                        "registry"
                    }
                    None => continue,
                }
            }
            _ = registry_poll.tick() => {
                match watch.check(store, gateway).await {
                    Some(fresh) => {
                        registry = fresh;
                        "registry"
                    }
                    None => continue,
                }
            }
            _ = poll.tick() => {
                if file_stamps(config_path, &registry) == seen {
                    continue;
                }
                "file-change"
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        // Stamped before reading: a change made while loading triggers the next reload. A file
        // edit seen first by a reload the registry triggered still gets its warning.
        let stamps = file_stamps(config_path, &registry);
        if trigger == "signal" || stamps.first() != seen.first() {
            crate::config::warn_if_file_domains_ignored(config_path, &registry);
        }
        seen = stamps;
        match load(&registry).and_then(|c| gateway.reload(c).map_err(Into::into)) {
            Ok(reloaded) => {
                metrics::counter!("portcullis_reloads_total", "result" => "ok").increment(1);
                let generation = reloaded.generation;
                if reloaded.listeners.is_empty() {
                    tracing::info!(target: "portcullis::reload", generation, trigger, result = "ok", "configuration reloaded");
                } else {
                    let listeners = reloaded.listeners.join("; ");
                    tracing::info!(target: "portcullis::reload", generation, trigger, result = "ok", listeners, "configuration reloaded");
                }
            }
            Err(e) => {
                metrics::counter!("portcullis_reloads_total", "result" => "failed").increment(1);
                tracing::error!(target: "portcullis::reload", trigger, result = "failed", error = %format!("{e:#}"), "reload failed; keeping the previous configuration");
            }
        }
    }
}

/// What the running configuration was built from: registry markers and file stamps taken before
/// it was read; and where to say whether the registry database is reachable (`/readyz`).
struct Baseline {
    registry_marker: i64,
    config_marker: i64,
    files: Vec<crate::config::Stamp>,
    reachable: Arc<AtomicBool>,
}

/// How far back (seconds) an incremental refresh reads changes again.
const CHANGE_WINDOW_SECS: i64 = 10;

/// The snapshot is rebuilt whole this often anyway: a safety net under incremental refreshes.
const FULL_RESYNC: Duration = Duration::from_secs(600);

/// The next change notification, or never (SQLite).
async fn next_change(
    listener: &mut Option<portcullis_registry::ChangeListener>,
) -> std::result::Result<portcullis_registry::Change, portcullis_registry::RegistryError> {
    match listener {
        Some(l) => l.next().await,
        None => std::future::pending().await,
    }
}

/// Follows the registry: refreshes the snapshot when anything changed, and hands back a fresh
/// configuration source when domains or truststores did. While the database cannot be reached
/// the gateway keeps its last snapshot and configuration, `/readyz` says not ready, and once
/// it is back everything is read again.
struct RegistryWatch {
    registry_marker: i64,
    /// Changes recorded from this time on are read again at the next incremental refresh.
    window_start: i64,
    /// When the snapshot was last rebuilt whole.
    last_full: std::time::Instant,
    /// A change was committed (notification): read the changes even if the newest sequence
    /// number did not move.
    notified: bool,
    /// The smallest sequence number notified since the last refresh.
    reread_from: Option<i64>,
    config_marker: i64,
    force_snapshot: bool,
    force_config: bool,
    reachable: bool,
    reachable_flag: Arc<AtomicBool>,
}

impl RegistryWatch {
    /// A change was committed with this sequence number (when known): the next refresh reads
    /// the changes from there, even below the marker (it may have committed after larger ones).
    fn notified(&mut self, seq: Option<i64>) {
        self.notified = true;
        if let Some(seq) = seq {
            self.reread_from = Some(self.reread_from.map_or(seq, |r| r.min(seq)));
        }
    }

    fn unreachable(&mut self, e: &dyn std::fmt::Display) {
        if self.reachable {
            tracing::warn!(target: "portcullis::registry", error = %e, "the registry database cannot be reached: serving from the last snapshot; just-in-time registrations and admin writes are refused until it is back");
        }
        self.reachable = false;
        self.reachable_flag.store(false, Ordering::SeqCst);
        metrics::gauge!("portcullis_registry_reachable").set(0.0);
        self.force_snapshot = true;
        self.force_config = true;
    }

    async fn check(&mut self, store: &Store, gateway: &Gateway) -> Option<RegistryConfig> {
        let marker = match store.change_marker().await {
            Ok(m) => m,
            Err(e) => {
                self.unreachable(&e);
                return None;
            }
        };
        if !self.reachable {
            tracing::info!(target: "portcullis::registry", "the registry database is reachable again; resynchronizing");
            self.reachable = true;
            self.reachable_flag.store(true, Ordering::SeqCst);
            metrics::gauge!("portcullis_registry_reachable").set(1.0);
        }
        let full = self.force_snapshot || self.last_full.elapsed() >= FULL_RESYNC;
        if marker != self.registry_marker || full || self.notified {
            self.notified = false;
            let started = std::time::Instant::now();
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let incremental = if full {
                Ok(None)
            } else {
                let from = self.reread_from.map_or(self.registry_marker, |r| {
                    r.saturating_sub(1).min(self.registry_marker)
                });
                incremental_snapshot(store, &gateway.registry(), from, self.window_start).await
            };
            let built = match incremental {
                Ok(Some(snapshot)) => Ok((snapshot, "incremental")),
                Ok(None) => registry_snapshot(store).await.map(|s| (s, "full")),
                Err(e) => Err(e),
            };
            match built {
                Ok((snapshot, kind)) => {
                    self.registry_marker = marker;
                    self.force_snapshot = false;
                    self.reread_from = None;
                    // The next incremental read looks back a little: on PostgreSQL a change
                    // with a smaller sequence number can commit after a larger one.
                    self.window_start = now - CHANGE_WINDOW_SECS;
                    if kind == "full" {
                        self.last_full = std::time::Instant::now();
                    }
                    let (certificates, bytes) = (snapshot.len(), snapshot.status_bytes());
                    gateway.update_registry(snapshot);
                    metrics::gauge!("portcullis_registry_snapshot_certificates")
                        .set(certificates as f64);
                    metrics::gauge!("portcullis_registry_snapshot_bytes").set(bytes as f64);
                    tracing::info!(
                        target: "portcullis::registry",
                        marker,
                        kind,
                        certificates,
                        status_bytes = bytes,
                        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                        "registry snapshot refreshed"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read the registry; keeping the previous snapshot");
                    self.force_snapshot = true;
                    return None;
                }
            }
        }
        // Domain and truststore changes rebuild the configuration.
        let marker = match store.config_marker().await {
            Ok(m) => m,
            Err(e) => {
                self.unreachable(&e);
                return None;
            }
        };
        if marker == self.config_marker && !self.force_config {
            return None;
        }
        match RegistryConfig::read(store).await {
            Ok(fresh) => {
                self.config_marker = marker;
                self.force_config = false;
                Some(fresh)
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot read the registry's domains and truststores; keeping the previous configuration");
                None
            }
        }
    }
}

/// The gateway's in-memory view of the registry.
async fn registry_snapshot(store: &Store) -> Result<RegistrySnapshot> {
    let mut builder = portcullis_gateway::registry_view::SnapshotBuilder::default();
    store
        .for_each_status(|id, status| builder.add(id, registered(status)))
        .await
        .context("reading the registry")?;
    Ok(builder
        .build()
        .with_rules(
            store
                .message_rules()
                .await
                .context("reading the forwarding rules")?,
        )
        .with_auto_registering_cas(auto_registering_cas(store).await?)
        .with_policies(policy_snapshot(store).await?))
}

fn registered(status: CertStatus) -> RegisteredStatus {
    match status {
        CertStatus::Active => RegisteredStatus::Active,
        CertStatus::Inactive => RegisteredStatus::Inactive,
        CertStatus::PendingActivation => RegisteredStatus::PendingActivation,
        CertStatus::Revoked => RegisteredStatus::Revoked,
    }
}

/// Changes read at most per refresh; beyond this the snapshot is rebuilt whole.
const INCREMENTAL_LIMIT: i64 = 20_000;

/// The snapshot after the changes recorded since `marker` (or within the last `window`
/// seconds), derived from `current`: only the certificates named by those changes are read
/// again; CAs and policies only when they changed. `None` when there are too many changes.
async fn incremental_snapshot(
    store: &Store,
    current: &RegistrySnapshot,
    marker: i64,
    since: i64,
) -> Result<Option<RegistrySnapshot>> {
    let changes = store
        .changes_since(marker, since, INCREMENTAL_LIMIT + 1)
        .await
        .context("reading the registry's changes")?;
    if changes.len() > usize::try_from(INCREMENTAL_LIMIT).unwrap_or(usize::MAX) {
        return Ok(None);
    }
    let mut ids: Vec<String> = Vec::new();
    let (mut cas, mut policies, mut rules) = (false, false, false);
    for (_, action, target) in &changes {
        // A change this node does not know (a newer node wrote it): read everything again.
        let Some(action) = portcullis_registry::AuditAction::parse(action) else {
            return Ok(None);
        };
        let effects = action.effects();
        if effects.certificate_status {
            ids.push(target.clone());
        }
        rules |= effects.rules;
        // Statuses of many certificates at once (a CA deactivated with --revoke-issued writes
        // one entry per certificate, so these are covered too).
        cas |= effects.cas;
        // What applies to a certificate: its things, its CA (linked at registration, used when
        // a CA has policies), and the domain's attachments (removed with the domain).
        policies |=
            effects.policies || (effects.policies_if_ca_policies && current.has_ca_policies());
    }
    ids.sort();
    ids.dedup();
    let found: std::collections::HashMap<String, CertStatus> = store
        .statuses_of(&ids)
        .await
        .context("reading the registry")?
        .into_iter()
        .map(|(id, status)| (id.to_string(), status))
        .collect();
    let updates = ids.into_iter().map(|id| {
        let status = found.get(&id).copied().map(registered);
        (id, status)
    });
    let mut next = current.with_changes(updates);
    if cas {
        next = next.with_auto_registering_cas(auto_registering_cas(store).await?);
    }
    if policies {
        next = next.with_policies(policy_snapshot(store).await?);
    }
    if rules {
        next = next.with_rules(
            store
                .message_rules()
                .await
                .context("reading the forwarding rules")?,
        );
    }
    Ok(Some(next))
}

/// The ACTIVE CAs with auto-registration on.
async fn auto_registering_cas(store: &Store) -> Result<Vec<AutoRegistration>> {
    Ok(store
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
                        as Arc<dyn portcullis_gateway::registry_view::Provisioner>
                }),
            })
        })
        .collect())
}

/// Compiled policies by (name, version).
type Compiled = std::collections::HashMap<(String, i64, String), Arc<portcullis_policy::Policy>>;

/// Policies compiled once per (name, version, document), kept across snapshots. The document is
/// part of the key: a policy deleted and created again starts at version 1 with new text.
static COMPILED: std::sync::LazyLock<std::sync::Mutex<Compiled>> =
    std::sync::LazyLock::new(Default::default);

/// The registry's policies for the data path. A stored policy that no longer parses fails the
/// whole snapshot (the previous one stays): dropping a Deny must never widen access.
async fn policy_snapshot(store: &Store) -> Result<portcullis_gateway::authorize::PolicySnapshot> {
    use portcullis_gateway::authorize::{PolicySnapshot, PolicyTarget};
    let state = store.policy_state().await.context("reading the policies")?;
    let mut snapshot = PolicySnapshot::new();
    let mut compiled = COMPILED
        .lock()
        .map_err(|_| anyhow::anyhow!("the policy cache is poisoned"))?;
    let mut keep = std::collections::HashSet::new();
    for (name, version, document) in &state.policies {
        let key = (name.clone(), *version, document.clone());
        let policy = match compiled.get(&key) {
            Some(p) => p.clone(),
            None => {
                let p = Arc::new(
                    portcullis_policy::Policy::parse(document)
                        .map_err(|e| anyhow::anyhow!("stored policy '{name}' v{version}: {e}"))?,
                );
                compiled.insert(key.clone(), p.clone());
                p
            }
        };
        keep.insert(key);
        snapshot.add_policy(name, *version, policy);
    }
    compiled.retain(|k, _| keep.contains(k));
    for (policy, target) in &state.attachments {
        let t = target.target.clone();
        let target = match target.target_type {
            portcullis_registry::TargetType::Certificate => PolicyTarget::Certificate(t),
            portcullis_registry::TargetType::Thing => PolicyTarget::Thing(t),
            portcullis_registry::TargetType::Ca => PolicyTarget::Ca(t),
            portcullis_registry::TargetType::Domain => PolicyTarget::Domain(t),
        };
        snapshot.attach(target, policy);
    }
    for (certificate, thing) in &state.things_of {
        snapshot.add_thing_of(certificate, thing);
    }
    for (thing, attributes) in state.thing_attributes {
        snapshot.set_thing_attributes(&thing, attributes);
    }
    for (certificate, ca) in &state.ca_of {
        snapshot.set_ca_of(certificate, ca);
    }
    Ok(snapshot)
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

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("PORTCULLIS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_target(true)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .finish();
    if tracing::subscriber::set_global_default(subscriber).is_ok() {
        // Libraries that log through `log` (rustls) get one readable line each, without the
        // source file paths of the build machine.
        let _ = log::set_boxed_logger(Box::new(LibraryLog));
        log::set_max_level(log::LevelFilter::Warn);
    }
}

/// Forwards `log` records of libraries (rustls' warnings) to the JSON log as one line each.
struct LibraryLog;

impl log::Log for LibraryLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let library = record.target();
        let message = library_message(&record.args().to_string());
        if record.level() == log::Level::Error {
            tracing::error!(target: "portcullis::library", library, "{message}");
        } else {
            tracing::warn!(target: "portcullis::library", library, "{message}");
        }
    }

    fn flush(&self) {}
}

/// A library's message, reworded where it is cryptic: rustls' "Illegal SNI extension: ignoring
/// IP address presented as hostname (3132372e302e302e31)" names the address in hex.
fn library_message(message: &str) -> String {
    if let Some(rest) =
        message.strip_prefix("Illegal SNI extension: ignoring IP address presented as hostname")
    {
        let address = rest
            .trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .as_bytes()
            .chunks(2)
            .map(|pair| {
                std::str::from_utf8(pair)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .filter(|b| b.is_ascii_graphic())
                    .map(char::from)
            })
            .collect::<Option<String>>()
            .unwrap_or_else(|| "an address".to_string());
        return format!(
            "a client sent the IP address {address} as its TLS server name (SNI), which TLS does not allow (RFC 6066); it is treated as a connection without SNI (connect by host name, or set default_endpoint)"
        );
    }
    message.to_string()
}
