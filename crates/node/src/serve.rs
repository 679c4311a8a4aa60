//! `portcullis serve`: the configuration file, the quickstart data dir, auto certificates,
//! signals (SIGHUP reloads, SIGTERM/SIGINT drain and exit) and wiring of the gateway.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use portcullis_gateway::{Config, Gateway};
use portcullis_registry::Store;

use crate::config::{RegistryConfig, database_of, file_stamps, load_config};
use crate::data_dir::DataDir;
use crate::sync::{RegistryWatch, next_change, registry_snapshot};
use crate::workers::{just_in_time, publish_registry_events, record_forwarded, record_sightings};

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
    let file = crate::config::read_file_config(&config_path)?;
    file.snapshot_stale_after_ms()?;
    file.nats()?;
    let database = database_of(&config_path, &data)?;
    let stored = database.starts_with("postgres") || Path::new(&database).exists();
    let registry = if stored {
        let store = Store::open(&database)
            .await
            .with_context(|| format!("opening the registry {}", redact(&database)))?;
        let key = crate::config::cluster_key(&config_path)?;
        crate::config::check_cluster_key(&store, key.as_deref()).await?;
        let mut registry = RegistryConfig::read(&store, key.as_deref())
            .await
            .context("reading the registry's domains and truststores")?;
        // In a cluster, `auto` certificates are the registry's (checked, not issued, here).
        registry.cluster_auto = key.is_some();
        registry
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
    // The cluster key opens the private keys kept in the registry: a node with another one, or
    // none while the registry holds sealed keys, stops here with the reason.
    let cluster_key = crate::config::cluster_key(&config_path)?;
    crate::config::check_cluster_key(&store, cluster_key.as_deref()).await?;
    // Secrets kept for others (webhook signing secrets) are sealed in a shared registry.
    match &cluster_key {
        Some(key) => {
            let sealed = store.seal_secrets_with(key.clone()).await?;
            if sealed > 0 {
                tracing::info!(
                    sealed,
                    "webhook secrets kept in clear were sealed with the cluster key"
                );
            }
        }
        None if database.starts_with("postgres") => tracing::warn!(
            "webhook signing secrets are kept in clear in PostgreSQL: set cluster_key_file (the same on every node) to seal them"
        ),
        None => {}
    }
    let cluster = match &cluster_key {
        Some(key) => Some(
            crate::cluster::Cluster::join(&store, key.clone(), &data, || {
                let files = crate::admin::AdminFiles::new(&args.data_dir);
                if files.has_own_ca() {
                    files.own_ca()
                } else {
                    crate::data_dir::new_root_issuer("Portcullis Admin CA")
                }
            })
            .await
            .context("joining the cluster")?,
        ),
        None => None,
    };
    if let Some(cluster) = &cluster {
        // The `auto` domains' certificates before the first configuration read: the registry's
        // domains, or the file's before it seeds the registry.
        let domains: Vec<portcullis_registry::DomainSpec> = if store.domains_seeded().await? {
            store
                .list_domains()
                .await?
                .into_iter()
                .map(|d| d.spec)
                .collect()
        } else {
            crate::config::read_file_config(&config_path)?
                .domains()
                .to_vec()
        };
        if let Err(e) = cluster.ensure_auto_certificates(&store, &domains).await {
            // Another node starting at the same moment may have written them first.
            tracing::warn!(error = %format!("{e:#}"), "cannot issue the cluster's auto certificates now; using the registry's");
        }
        tokio::spawn(crate::cluster::renew_auto_certificates(
            store.clone(),
            cluster.clone(),
        ));
    }
    let mut registry = crate::sync::read_config(&store, cluster.as_ref())
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
        registry = crate::sync::read_config(&store, cluster.as_ref()).await?;
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
    let nats_url = crate::config::read_file_config(&config_path)?.nats()?;
    if database.starts_with("postgres") && config.speaks_mqtt() && nats_url.is_none() {
        tracing::warn!(
            "MQTT sessions live on this node: with several nodes sharing this database, a message reaches only subscribers connected to the node it was published on; set nats_url to route MQTT between nodes, or keep a fleet's MQTT on one node"
        );
    }
    let gateway = Gateway::start(config, registry_snapshot(&store).await?).await?;
    // What the data path reports: each kind to its own writer.
    if let Some(outbox) = gateway.take_outbox() {
        tokio::spawn(just_in_time(store.clone(), outbox.jit));
        tokio::spawn(record_sightings(store.clone(), outbox.sightings));
        tokio::spawn(record_forwarded(store.clone(), outbox.forwarded));
    }
    // Other CAs' CRLs and OCSP answers, fetched for the data path in the background.
    tokio::spawn(crate::foreign::run(
        store.clone(),
        gateway.foreign_revocation(),
    ));
    tokio::spawn(portcullis_registry::webhooks::Dispatcher::new(store.clone()).run());
    tokio::spawn(publish_registry_events(store.clone(), gateway.broker()));

    // The admin API: HTTPS, admin client certificate or bearer token.
    // In a cluster, the cluster's local CA (the admin listener's certificate, enrollments).
    let local_ca = match &cluster {
        Some(c) => c.ca.clone(),
        None => Arc::new(data.local_ca()?),
    };

    let admin_ca = cluster.as_ref().map(|c| c.admin_ca.clone());
    let admin_files =
        crate::admin::AdminFiles::new(&args.data_dir).with_shared_ca(admin_ca.clone());
    let admin_tls = admin_files.tls_config(&local_ca, admin_addr)?;
    let registry_reachable = Arc::new(AtomicBool::new(true));
    let sync_status = Arc::new(crate::sync::SyncStatus::default());
    sync_status
        .checked_ms
        .store(crate::sync::now_ms(), Ordering::SeqCst);
    // Fleet provisioning by claim: devices' certificates come from the local CA.
    let token = match &cluster_key {
        Some(key) => crate::token::TokenSigner::from_cluster_key(key)?,
        None => crate::token::TokenSigner::from_data_dir(&args.data_dir)?,
    };
    // Revocation published for the local CA (before anything is issued: leaves point to it).
    let mut plain_http = None;
    let mut stapler = None;
    if let Some(r) = crate::config::read_file_config(&config_path)?.revocation()? {
        let listener = tokio::net::TcpListener::bind(r.listen)
            .await
            .with_context(|| format!("binding the revocation listener on {}", r.listen))?;
        let base = match &r.public_url {
            Some(url) => url.clone(),
            None => format!("http://{}", listener.local_addr()?),
        };
        local_ca.publish_revocation_at(crate::revocation::urls(&base, &local_ca));
        let publisher =
            crate::revocation::Revocation::start(store.clone(), local_ca.clone(), r.crl_secs)
                .await?;
        stapler = Some(publisher.clone());
        plain_http = Some((listener, publisher, r.scep));
    }
    let ra = crate::scep::load_ra(&store, cluster.as_ref(), &data, &local_ca).await?;
    let fleet = crate::fleet::Fleet::new(
        store.clone(),
        local_ca.clone(),
        sync_status.clone(),
        Arc::new(token),
    );
    let provisioning: Arc<dyn portcullis_gateway::fleet::FleetProvisioning> =
        Arc::new(crate::scep::WithScep::new(fleet, ra));
    gateway.set_fleet_provisioning(provisioning.clone());
    if let Some((listener, publisher, scep)) = plain_http {
        crate::revocation::serve(listener, publisher, scep.then_some(provisioning))?;
    }
    tokio::spawn(crate::fleet::sweep(store.clone()));
    let nats_state = nats_url
        .as_ref()
        .map(|_| Arc::new(crate::bus::NatsState::default()));
    let hooks = crate::admin::ServeHooks {
        nats: nats_state.clone(),
        sync: sync_status.clone(),
        stale_after_ms: crate::config::read_file_config(&config_path)?.snapshot_stale_after_ms()?,
        metrics,
        expiry: gateway.expiry_gauges(),
        live: gateway.live_connections(),
        ready: ready.clone(),
        registry_reachable: registry_reachable.clone(),
        explainer: gateway.explainer(),
        foreign: gateway.foreign_revocation(),
        history: Arc::default(),
        broker: gateway.broker(),
        admin: crate::admin::AdminFiles::new(&args.data_dir).with_shared_ca(admin_ca),
        domains: crate::config::DomainChecker {
            store: store.clone(),
            config_path: config_path.clone(),
            data_root: args.data_dir.clone(),
            echo,
            cluster: cluster.clone(),
        },
    };
    let hooks = Arc::new(hooks);
    // The dashboard's last hour: a sample of this node's metrics every 10 s.
    let sampled = hooks.clone();
    tokio::spawn(async move {
        use portcullis_admin::Hooks;
        let mut tick = tokio::time::interval(crate::history::INTERVAL);
        loop {
            tick.tick().await;
            sampled
                .history
                .record(&sampled.metrics(), crate::sync::now_ms());
        }
    });
    let api = portcullis_admin::Api::new(store.clone(), Some(local_ca.clone()), hooks)
        .with_cluster_key(cluster_key.clone());
    let admin = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("cannot listen on the admin address {admin_addr}"))?;
    let admin_local = admin.local_addr()?;
    admin_files.write_endpoint(admin_local)?;
    // This node's heartbeat, for `portcullis cluster status`.
    let node_id = match crate::config::read_file_config(&config_path)?.node_name() {
        Some(name) => name.to_string(),
        None => format!("{}:{}", host_name(), admin_local.port()),
    };
    // MQTT across nodes, when the configuration names NATS.
    if let (Some(nats), Some(state)) = (&nats_url, &nats_state) {
        crate::bus::start(nats, &node_id, gateway.broker(), state.clone(), &local_ca)
            .await
            .context("routing MQTT through NATS")?;
    }
    // ACME: this node's HTTP-01 listener, and its share of ordering for the cluster.
    let acme_settings = crate::config::read_file_config(&config_path)?.acme(&config_path)?;
    if let Err(e) = gateway.acme_challenges().replace(&registry.acme_challenges) {
        tracing::warn!(target: "portcullis::acme", error = %e, "cannot serve the pending ACME challenge answers");
    }
    if let Some(addr) = acme_settings.http_listen {
        let listener = crate::acme::bind_http01(addr).await?;
        outln!(
            "portcullis ACME HTTP-01 responder on http://{}",
            listener.local_addr()?
        );
        tokio::spawn(crate::acme::serve_http01(
            listener,
            gateway.acme_challenges(),
        ));
    }
    let acme_wake = Arc::new(tokio::sync::Notify::new());
    if let Some(cluster) = &cluster {
        tokio::spawn(
            crate::acme::Manager {
                store: store.clone(),
                key: cluster.key.clone(),
                settings: acme_settings,
                challenges: gateway.acme_challenges(),
                node_id: node_id.clone(),
                wake: acme_wake.clone(),
            }
            .run(),
        );
    }
    tokio::spawn(crate::workers::heartbeat(
        store.clone(),
        node_id,
        gateway.live_connections(),
        gateway.broker(),
        sync_status.clone(),
        nats_state.clone(),
    ));
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
        cluster: cluster.clone(),
        status: sync_status,
        stapler,
        acme_wake,
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
        cluster,
        status,
        stapler,
        acme_wake,
    } = baseline;
    let Signals {
        mut hup,
        mut term,
        mut int,
    } = signals;
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    let (mut staple_ticks, mut stapled_generation) = (0u32, u64::MAX);
    // The registry is polled often: a revocation must reach live connections within a second.
    // On PostgreSQL, notifications from every node's commits wake the loop at once.
    let mut registry_poll = tokio::time::interval(Duration::from_millis(200));
    let wake = status.clone();
    let mut watch = RegistryWatch::new(registry_marker, config_marker, reachable, cluster, status);
    let mut acme_seen = crate::acme::domains_of(registry.domains.as_ref());
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
                        watch.config_changed();
                    }
                    Ok(portcullis_registry::Change::Resync) => {
                        tracing::info!(target: "portcullis::registry", "change notifications reconnected; resynchronizing");
                        watch.resync();
                    }
                    Err(e) => {
                        // Notifications may be lost while disconnected: resync once back.
                        watch.resync();
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
            () = wake.woken() => {
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
                // OCSP answers stapled to the local CA's server certificates: fresh every minute
                // (good for ten), and at once for a certificate a reload just brought.
                if let Some(stapler) = &stapler {
                    staple_ticks += 1;
                    if staple_ticks >= 60 || gateway.generation() != stapled_generation {
                        staple_ticks = 0;
                        stapled_generation = gateway.generation();
                        stapler.staple(gateway);
                    }
                }
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
        // Challenge answers do not wait for the configuration: a reload that fails keeps the
        // previous configuration, not the previous challenges.
        if let Err(e) = gateway.acme_challenges().replace(&registry.acme_challenges) {
            tracing::warn!(target: "portcullis::acme", error = %e, "cannot serve the ACME challenge answers");
        }
        // The ACME manager looks again when the ACME domains changed (not on every reload: its
        // own challenge answers are configuration changes too).
        let acme_domains = crate::acme::domains_of(registry.domains.as_ref());
        if acme_domains != acme_seen {
            acme_seen = acme_domains;
            acme_wake.notify_one();
        }
        match load(&registry).and_then(|c| gateway.reload(c).map_err(Into::into)) {
            Ok(reloaded) => {
                metrics::counter!("portcullis_reloads_total", "result" => "ok").increment(1);
                let generation = reloaded.generation;
                // The registry's configuration changes this reload includes, up to this one.
                let config_marker = watch.config_marker();
                if reloaded.listeners.is_empty() {
                    tracing::info!(target: "portcullis::reload", generation, trigger, result = "ok", config_marker, "configuration reloaded");
                } else {
                    let listeners = reloaded.listeners.join("; ");
                    tracing::info!(target: "portcullis::reload", generation, trigger, result = "ok", config_marker, listeners, "configuration reloaded");
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
    /// Opens the registry's server certificate keys and issues `auto` certificates.
    cluster: Option<crate::cluster::Cluster>,
    /// What the follower achieved, shared with the heartbeat.
    status: Arc<crate::sync::SyncStatus>,
    /// Staples OCSP answers to the domains the local CA issued certificates for.
    stapler: Option<Arc<crate::revocation::Revocation>>,
    /// Tells the ACME manager that the domains may have changed.
    acme_wake: Arc<tokio::sync::Notify>,
}

/// This machine's host name (for the node's default name).
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string())
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
