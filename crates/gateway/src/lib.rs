//! The Portcullis data path: mutual-TLS termination by SNI, client-certificate verification,
//! base-path routing, proxying, identity headers and logs, and the MQTT endpoint's connections.
//!
//! Layout, in the order a connection meets it:
//!
//! - [`conn`]: a connection's life — `accept` (loops bound, changed and stopped by reloads),
//!   `handshake` (ClientHello, domain by SNI, handshake, failures logged), then MQTT or HTTP;
//!   [`conn::live`]: open connections, listed and closed when no longer admitted;
//! - `stream`: the connection's byte stream (bytes put back, lingering close);
//! - `tls`: a domain's rustls configuration (policy, suites, session cache per generation);
//! - [`verify`]: the verifier only (the pki crate's `verify`, then the registry view);
//!   [`registry_view`]: the registry snapshot and the registry decision, with the registry's
//!   reasons; [`verdict`]: what the handshake decided, carried by the connection;
//!   [`outbox`]: what the data path reports to the node (JIT, sightings, forwarded messages);
//!   [`fleet`]: fleet provisioning's MQTT API (parsed here, answered by the node);
//! - `http`: `context` (what a request handler knows), `inbound` (screening), `decide` (the
//!   one decision on a request: Host, path, mapping, certificate, policy — run by the fast
//!   path, the hyper path and [`explain`]), `fast` (the HTTP/1.1 fast path), `service` (the
//!   hyper path), `proxy`, `identity`, `access_log`, `respond`, `route`, `h2guard`,
//!   `provisioning` (fleet provisioning over HTTPS, `builtin:provisioning`);
//! - [`authorize`]: policies compiled for the data path; `mqtt`: MQTT connections on the
//!   `portcullis-mqtt` broker (`session`, `auth`, `publish`); `recheck`: what a connection was
//!   admitted under, checked again.
//!
//! Dependencies go one way: `conn` uses `http` and `mqtt`, never the reverse; `verify` uses
//! `registry_view` (which carries `authorize`'s policies), which reports through `outbox`.
//!
//! Invariants:
//! - The gateway never touches a database or the admin API: everything a handshake or a request
//!   needs is in an immutable [`State`] snapshot, swapped atomically on reload, and in the
//!   registry snapshot, swapped on every registry change.
//! - Nothing on the handshake path blocks or waits on I/O: the verifier reads only snapshots.
//! - Identity headers are built only from the connection's verdict; inbound copies never reach
//!   an upstream.
//! - No import cycles between modules (checked by `crates/cli/tests/cli/layout.rs`).
#![forbid(unsafe_code)]

pub mod acme;
pub mod authorize;
pub mod config;
pub mod conn;
pub mod echo;
pub mod explain;
pub mod fleet;
pub mod foreign;
mod http;
mod mqtt;
pub mod outbox;
mod recheck;
pub mod registry_view;
mod stream;
mod tls;
pub mod verdict;
pub mod verify;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;
pub use http::respond::Body;
pub use http::scep::serve as serve_scep;

use crate::config::{Domain, Protocols};
use crate::registry_view::RegistryView;
use crate::tls::DomainTls;

/// Errors of the gateway crate.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration is inconsistent.
    #[error("configuration: {0}")]
    Config(String),
    /// TLS material (certificate, key) cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// A configured limit refused, delayed or cut off a client (`portcullis_limit_reached_total`;
/// the configured values are `portcullis_limit`).
pub(crate) fn limit_reached(limit: &'static str) {
    metrics::counter!("portcullis_limit_reached_total", "limit" => limit).increment(1);
}

/// One immutable generation of everything the data path needs.
#[derive(Debug)]
pub struct State {
    domains: Vec<DomainState>,
    default_domain: Option<usize>,
    limits: config::Limits,
    identity: config::IdentityHeaders,
    generation: u64,
    /// ACME challenges pending (shared across generations).
    acme: Arc<acme::AcmeChallenges>,
}

/// A domain with its TLS configuration built.
#[derive(Debug)]
pub(crate) struct DomainState {
    pub(crate) config: Arc<Domain>,
    pub(crate) tls: DomainTls,
    /// A client per `https://` mapping (same order as the mappings); `None` uses the shared one.
    pub(crate) upstream_clients: Vec<Option<http::proxy::MappingClient>>,
    /// The fast path's idle connections per plain-HTTP mapping (same order as the mappings).
    pub(crate) pools: Vec<Option<http::fast::Pool>>,
    /// Metric handles by (mapping, status), registered on first use: looking a labelled metric
    /// up in the registry on every request costs allocations and hashing.
    request_metrics: std::sync::Mutex<Vec<((String, u16), RequestMetrics)>>,
}

/// The metric handles of one (domain, mapping, status).
#[derive(Clone)]
pub(crate) struct RequestMetrics {
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

impl RequestMetrics {
    pub(crate) fn record(&self, seconds: f64) {
        self.requests.increment(1);
        self.duration.record(seconds);
    }
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestMetrics")
    }
}

impl DomainState {
    pub(crate) fn request_metrics(&self, mapping: &str, status: u16) -> RequestMetrics {
        let make = || {
            let domain = self.config.hostname.to_string();
            RequestMetrics {
                requests: metrics::counter!(
                    "portcullis_requests_total",
                    "domain" => domain.clone(),
                    "mapping" => mapping.to_string(),
                    "status" => status.to_string()
                ),
                duration: metrics::histogram!(
                    "portcullis_request_duration_seconds",
                    "domain" => domain,
                    "mapping" => mapping.to_string()
                ),
            }
        };
        let Ok(mut cache) = self.request_metrics.lock() else {
            return make();
        };
        // A handful of (mapping, status) pairs per domain: a linear scan beats hashing.
        if let Some((_, m)) = cache
            .iter()
            .find(|((m, s), _)| m == mapping && *s == status)
        {
            return m.clone();
        }
        let m = make();
        cache.push(((mapping.to_string(), status), m.clone()));
        m
    }
}

impl State {
    fn build(
        config: &Config,
        generation: u64,
        registry: &Arc<RegistryView>,
    ) -> Result<State, GatewayError> {
        let domains = config
            .domains
            .iter()
            .map(|d| {
                let upstream_clients = d
                    .mappings
                    .iter()
                    .map(|m| {
                        if m.upstream_tls.is_none() && !m.upstream_protocol.is_h2() {
                            return Ok(None);
                        }
                        http::proxy::mapping_client(
                            config.limits.upstream_connect_timeout,
                            m.upstream_tls.as_ref(),
                            m.upstream_protocol,
                            m.retry_refused,
                        )
                        .map(Some)
                    })
                    .collect::<Result<Vec<_>, GatewayError>>()?;
                Ok(DomainState {
                    config: d.clone(),
                    tls: DomainTls::new(d, registry.clone(), config.speaks_mqtt())?,
                    upstream_clients,
                    pools: d
                        .mappings
                        .iter()
                        .map(http::fast::Pool::for_mapping)
                        .collect(),
                    request_metrics: Default::default(),
                })
            })
            .collect::<Result<Vec<_>, GatewayError>>()?;
        Ok(State {
            domains,
            default_domain: config.default_domain,
            limits: config.limits.clone(),
            identity: config.identity.clone(),
            generation,
            acme: registry.acme.clone(),
        })
    }

    /// Publishes the generation number. The expiry gauges are computed at each scrape from the
    /// state then current ([`ExpiryGauges`]), so domains removed by a reload and buckets crossed
    /// since leave no stale series.
    fn publish_gauges(&self) {
        metrics::gauge!("portcullis_config_generation").set(self.generation as f64);
        let l = &self.limits;
        for (name, value) in [
            ("max_connections", l.max_connections as f64),
            ("max_handshakes", l.max_handshakes as f64),
            ("max_header_bytes", l.max_header_bytes as f64),
            (
                "handshake_timeout_seconds",
                l.handshake_timeout.as_secs_f64(),
            ),
            (
                "request_header_timeout_seconds",
                l.request_header_timeout.as_secs_f64(),
            ),
        ] {
            metrics::gauge!("portcullis_limit", "limit" => name).set(value);
        }
    }

    /// Server certificate and truststore CA expiry, in the Prometheus text format.
    fn render_expiry(&self) -> String {
        use std::fmt::Write;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let days = |not_after: i64| (not_after - now) as f64 / 86_400.0;
        let bucket = |d: f64| match d {
            d if d < 0.0 => "expired",
            d if d < 7.0 => "7d",
            d if d < 30.0 => "30d",
            d if d < 90.0 => "90d",
            _ => "later",
        };
        let label = |v: &str| {
            v.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
        };
        let mut servers = String::new();
        let mut cas = String::new();
        for d in &self.domains {
            let domain = label(&d.config.hostname.to_string());
            if let Some(leaf) = d.config.certificate.chain.first()
                && let Ok(info) = portcullis_pki::CertificateInfo::from_der(leaf)
            {
                let left = days(info.not_after_unix());
                let _ = writeln!(
                    servers,
                    "portcullis_server_certificate_expiry_days{{domain=\"{domain}\",bucket=\"{}\"}} {left}",
                    bucket(left)
                );
            }
            if let Some(store) = &d.config.mtls.truststore {
                for e in store.entries().iter().filter(|e| !e.duplicate) {
                    let info = e.certificate.info();
                    let left = days(info.not_after_unix());
                    let _ = writeln!(
                        cas,
                        "portcullis_truststore_ca_expiry_days{{domain=\"{domain}\",fingerprint=\"{}\",subject=\"{}\",bucket=\"{}\"}} {left}",
                        label(&info.id),
                        label(&info.subject),
                        bucket(left)
                    );
                }
            }
        }
        let mut out = String::new();
        if !servers.is_empty() {
            out.push_str("# TYPE portcullis_server_certificate_expiry_days gauge\n");
            out.push_str(&servers);
        }
        if !cas.is_empty() {
            out.push_str("# TYPE portcullis_truststore_ca_expiry_days gauge\n");
            out.push_str(&cas);
        }
        out
    }

    /// The domain for an SNI name: exact names first, then wildcards, then the default domain.
    /// The flag says whether the default was used.
    pub(crate) fn select(&self, sni: Option<&str>) -> Option<(&DomainState, bool)> {
        if let Some(i) = sni.and_then(|name| self.domain_for(name)) {
            return Some((&self.domains[i], false));
        }
        self.default_domain.map(|i| (&self.domains[i], true))
    }

    /// The domain a host name (an SNI or a Host, lower-case) names, by index: exact names first,
    /// then wildcards; a trailing dot (an absolute name) is the same name. No default.
    pub(crate) fn domain_for(&self, name: &str) -> Option<usize> {
        let name = name.strip_suffix('.').unwrap_or(name);
        self.domains
            .iter()
            .position(|d| {
                matches!(d.config.hostname, config::Hostname::Exact(_))
                    && d.config.hostname.matches(name)
            })
            .or_else(|| {
                self.domains
                    .iter()
                    .position(|d| d.config.hostname.matches(name))
            })
    }

    /// The generation number: 1 at start, one more per successful reload.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

/// Checks that a configuration would start: builds every domain's TLS state without binding.
pub fn check(config: &Config) -> Result<(), GatewayError> {
    State::build(config, 0, &Arc::new(RegistryView::empty())).map(|_| ())
}

/// The expiry gauges of the live state, rendered at scrape time.
#[derive(Clone)]
pub struct ExpiryGauges(Arc<ArcSwap<State>>);

impl ExpiryGauges {
    /// The gauges in the Prometheus text format, to append to the recorder's output.
    pub fn render(&self) -> String {
        self.0.load().render_expiry()
    }
}

/// A running gateway.
pub struct Gateway {
    state: Arc<ArcSwap<State>>,
    registry: Arc<RegistryView>,
    shutdown: watch::Sender<bool>,
    shutdown_rx: watch::Receiver<bool>,
    /// Shared by every connection (a pooled client is over 300 bytes: one copy, not one each).
    client: Arc<http::proxy::UpstreamClient>,
    listeners: std::sync::Mutex<Vec<RunningListener>>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    broker: Arc<portcullis_mqtt::broker::Broker>,
    gates: Arc<conn::Gates>,
}

/// A bound listener: its configured address, the address bound, and the handles that change
/// what it speaks or stop it (a reload that removes it).
struct RunningListener {
    address: SocketAddr,
    local: SocketAddr,
    protocols: watch::Sender<Protocols>,
    stop: watch::Sender<bool>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The new state generation.
    pub generation: u64,
    /// Listener changes applied: `bound 127.0.0.1:8883 (mqtt)`, `closed 127.0.0.1:9443`,
    /// `127.0.0.1:8443 speaks http+mqtt`.
    pub listeners: Vec<String>,
}

/// Binds a listening socket without blocking the runtime (std's bind is synchronous, and cheap),
/// with the address actually bound.
fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), GatewayError> {
    let bound = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(TcpListener::from_std)
        .and_then(|l| l.local_addr().map(|local| (l, local)))
        .map_err(|source| GatewayError::Bind { addr, source })?;
    Ok(bound)
}

fn protocols_name(p: Protocols) -> &'static str {
    match p {
        Protocols::Http => "http",
        Protocols::Mqtt => "mqtt",
        Protocols::Both => "http+mqtt",
    }
}

impl Gateway {
    /// Builds the first state, binds every listener and starts serving.
    pub async fn start(
        config: Config,
        initial: registry_view::RegistrySnapshot,
    ) -> Result<Gateway, GatewayError> {
        let registry = Arc::new(RegistryView::empty());
        registry.snapshot.store(Arc::new(initial));
        let first = State::build(&config, 1, &registry)?;
        first.publish_gauges();
        let state = Arc::new(ArcSwap::from_pointee(first));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let client = Arc::new(http::proxy::client(
            config.limits.upstream_connect_timeout,
            None,
        )?);
        let limits = Arc::new(conn::Gates::new(&config.limits));
        let mut tasks = Vec::new();
        let broker = Arc::new(portcullis_mqtt::broker::Broker::new(config.broker.clone()));
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let listener = bind(l.address)?;
            let (running, task) =
                Self::spawn_listener(l, listener, &state, &client, &limits, &broker, &shutdown_rx);
            listeners.push(running);
            tasks.push(task);
        }
        // Every registry snapshot and reload: the open HTTP connections the current state no
        // longer admits are closed, in one pass.
        tasks.push(tokio::spawn({
            let live = limits.live.clone();
            let mut changes = registry.changes.subscribe();
            let mut shutdown = shutdown_rx.clone();
            async move {
                loop {
                    tokio::select! {
                        changed = changes.changed() => {
                            if changed.is_err() {
                                break;
                            }
                            live.recheck();
                        }
                        _ = shutdown.changed() => break,
                    }
                }
            }
        }));
        // Offline sessions past their expiry, and expired retained messages, go.
        tasks.push(tokio::spawn({
            let broker = broker.clone();
            let mut shutdown = shutdown_rx.clone();
            async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            broker.expire_sessions();
                        }
                        _ = shutdown.changed() => break,
                    }
                }
            }
        }));
        Ok(Gateway {
            state,
            registry,
            shutdown,
            shutdown_rx,
            client,
            listeners: std::sync::Mutex::new(listeners),
            tasks: std::sync::Mutex::new(tasks),
            broker,
            gates: limits,
        })
    }

    /// Starts accepting on a bound listener.
    #[allow(clippy::too_many_arguments)]
    fn spawn_listener(
        config: &config::Listener,
        (listener, local): (TcpListener, SocketAddr),
        state: &Arc<ArcSwap<State>>,
        client: &Arc<http::proxy::UpstreamClient>,
        gates: &Arc<conn::Gates>,
        broker: &Arc<portcullis_mqtt::broker::Broker>,
        shutdown: &watch::Receiver<bool>,
    ) -> (RunningListener, tokio::task::JoinHandle<()>) {
        let (protocols, protocols_rx) = watch::channel(config.protocols);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(conn::accept_loop(
            listener,
            conn::Accepting {
                protocols: protocols_rx,
                stop: stop_rx,
            },
            state.clone(),
            client.clone(),
            gates.clone(),
            broker.clone(),
            shutdown.clone(),
        ));
        (
            RunningListener {
                address: config.address,
                local,
                protocols,
                stop,
            },
            task,
        )
    }

    /// The open HTTP connections, to list and close from the admin API.
    pub fn live_connections(&self) -> Arc<conn::live::Live> {
        self.gates.live.clone()
    }

    /// Builds a complete new state from `config` and swaps it in, and applies the listeners:
    /// a new `[[listener]]` is bound, a removed one stops accepting (its open connections go on
    /// until they end), a changed `protocols` applies to the next connection. On error (a state
    /// that does not build, an address that cannot be bound) the running state and listeners are
    /// untouched. Open connections that the new state would refuse (a truststore or CRL no longer
    /// admits their certificate, their domain is gone or changed its mutual TLS mode) are closed.
    pub fn reload(&self, config: Config) -> Result<Reloaded, GatewayError> {
        let generation = self.state.load().generation + 1;
        let state = State::build(&config, generation, &self.registry)?;
        let mut running = self
            .listeners
            .lock()
            .map_err(|_| GatewayError::Config("the listener table is poisoned".into()))?;
        // Each running listener is the configured one at the same address, in order: several
        // `127.0.0.1:0` listeners (any free port) pair one to one, not all with the first.
        let mut taken = vec![false; config.listeners.len()];
        let pairs: Vec<Option<usize>> = running
            .iter()
            .map(|r| {
                let i = (0..config.listeners.len())
                    .find(|&i| !taken[i] && config.listeners[i].address == r.address);
                if let Some(i) = i {
                    taken[i] = true;
                }
                i
            })
            .collect();
        // Bind every new address first: a failure leaves everything as it was.
        let mut bound = Vec::new();
        for (l, _) in config.listeners.iter().zip(&taken).filter(|(_, t)| !**t) {
            bound.push((l, bind(l.address)?));
        }
        state.publish_gauges();
        self.state.store(Arc::new(state));
        let mut changes = Vec::new();
        let mut pair = pairs.into_iter();
        let mut kept = Vec::new();
        running.retain(|r| {
            let matched = pair.next().flatten();
            if matched.is_none() {
                let _ = r.stop.send(true);
                changes.push(format!("closed {}", r.local));
            } else {
                kept.push(matched);
            }
            matched.is_some()
        });
        for (r, i) in running.iter().zip(kept) {
            if let Some(l) = i.map(|i| &config.listeners[i])
                && *r.protocols.borrow() != l.protocols
            {
                let _ = r.protocols.send(l.protocols);
                changes.push(format!(
                    "{} speaks {}",
                    r.local,
                    protocols_name(l.protocols)
                ));
            }
        }
        for (l, listener) in bound {
            let (listening, task) = Self::spawn_listener(
                l,
                listener,
                &self.state,
                &self.client,
                &self.gates,
                &self.broker,
                &self.shutdown_rx,
            );
            changes.push(format!(
                "bound {} ({})",
                listening.local,
                protocols_name(l.protocols)
            ));
            running.push(listening);
            if let Ok(mut tasks) = self.tasks.lock() {
                tasks.retain(|t| !t.is_finished());
                tasks.push(task);
            }
        }
        drop(running);
        // Open connections and sessions check themselves against the new state.
        self.registry.changes.send_modify(|n| *n += 1);
        Ok(Reloaded {
            generation,
            listeners: changes,
        })
    }

    /// Replaces the registry snapshot. New handshakes use it at once; open connections whose
    /// certificate it now refuses are closed (one pass over the open connections).
    pub fn update_registry(&self, snapshot: registry_view::RegistrySnapshot) {
        self.registry.snapshot.store(Arc::new(snapshot));
        self.registry.changes.send_modify(|n| *n += 1);
    }

    /// Where the node puts what it learns from other CAs' CRLs and OCSP responders, and takes
    /// what the data path asks it to fetch.
    pub fn foreign_revocation(&self) -> ForeignHandle {
        ForeignHandle(self.registry.clone())
    }

    /// The leaf certificate each domain serves, by hostname: what the node staples OCSP
    /// answers for.
    pub fn served_certificates(&self) -> Vec<(String, rustls::pki_types::CertificateDer<'static>)> {
        self.state
            .load()
            .domains
            .iter()
            .filter_map(|d| Some((d.config.hostname.to_string(), d.tls.stapled.leaf()?)))
            .collect()
    }

    /// Staples `ocsp` to the handshakes of the domain `hostname` serving `leaf` (ignored when
    /// the domain serves another certificate by now).
    pub fn staple(
        &self,
        hostname: &str,
        leaf: &rustls::pki_types::CertificateDer<'_>,
        ocsp: Vec<u8>,
    ) {
        for d in &self.state.load().domains {
            if d.config.hostname.to_string() == hostname
                && d.tls
                    .stapled
                    .leaf()
                    .is_some_and(|l| l.as_ref() == leaf.as_ref())
            {
                d.tls.stapled.staple(ocsp.clone());
            }
        }
    }

    /// Who answers devices' fleet provisioning requests (the node; set once).
    pub fn set_fleet_provisioning(&self, fleet: Arc<dyn fleet::FleetProvisioning>) {
        let _ = self.registry.fleet.set(fleet);
    }

    /// What the data path reports to the node (just-in-time registrations, certificates seen,
    /// messages for forwarding rules); the first call takes the receivers.
    pub fn take_outbox(&self) -> Option<outbox::OutboxReceivers> {
        self.registry.outbox.take()
    }

    /// The MQTT broker (sessions, retained messages), for the admin API and HTTPS publish.
    pub fn broker(&self) -> Arc<portcullis_mqtt::broker::Broker> {
        self.broker.clone()
    }

    /// The ACME challenges every listener answers (the node replaces them as orders go).
    pub fn acme_challenges(&self) -> Arc<acme::AcmeChallenges> {
        self.registry.acme.clone()
    }

    /// The registry snapshot in use (to derive the next one from).
    pub fn registry(&self) -> Arc<registry_view::RegistrySnapshot> {
        self.registry.snapshot.load_full()
    }

    /// The expiry gauges of the live state, for the metrics endpoint.
    pub fn expiry_gauges(&self) -> ExpiryGauges {
        ExpiryGauges(self.state.clone())
    }

    /// A handle that explains decisions on the current state (`portcullis explain`).
    pub fn explainer(&self) -> explain::Explainer {
        explain::Explainer::new(self.state.clone())
    }

    /// The addresses actually bound (useful with port 0), in configuration order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .lock()
            .map(|l| l.iter().map(|r| r.local).collect())
            .unwrap_or_default()
    }

    /// The current state generation.
    pub fn generation(&self) -> u64 {
        self.state.load().generation
    }

    /// Stops accepting, lets open connections finish their requests, and returns when the
    /// listeners have stopped.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let tasks = self.tasks.into_inner().unwrap_or_default();
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// The node's handle on the foreign revocation snapshot (see [`Gateway::foreign_revocation`]).
#[derive(Debug, Clone)]
pub struct ForeignHandle(pub(crate) Arc<RegistryView>);

impl ForeignHandle {
    /// The snapshot in use (to derive the next one from).
    pub fn load(&self) -> Arc<foreign::ForeignSnapshot> {
        self.0.foreign.snapshot.load_full()
    }

    /// Replaces it. New handshakes use it at once; open connections it now refuses are closed
    /// (the same pass as a registry change), and connections waiting for a status get their
    /// answer.
    pub fn store(&self, snapshot: foreign::ForeignSnapshot) {
        self.0.foreign.snapshot.store(Arc::new(snapshot));
        self.0.changes.send_modify(|n| *n += 1);
    }

    /// Every foreign revocation source this node follows, with its freshness: each CRL
    /// distribution point (age, nextUpdate, number, entries, last error) and each OCSP
    /// responder (certificates followed, answers by status, oldest answer, failures), for the
    /// admin API and the console.
    pub fn sources(&self) -> Vec<serde_json::Value> {
        let snapshot = self.load();
        let now = authorize::now();
        let mut out = Vec::new();
        let mut urls: std::collections::BTreeSet<&String> = snapshot.crls.keys().collect();
        urls.extend(snapshot.failures.keys().filter(|k| !k.starts_with("ocsp:")));
        for url in urls {
            let crl = snapshot.crls.get(url);
            let failure = snapshot.failures.get(url);
            out.push(serde_json::json!({
                "kind": "crl",
                "url": url,
                "age_seconds": crl.map(|c| (now - c.fetched_at).max(0)),
                "next_update": crl.and_then(|c| c.next_update),
                "stale": crl.is_some_and(|c| c.next_update.is_some_and(|n| n <= now)),
                "crl_number": crl.and_then(|c| c.number.clone()),
                "revoked": crl.map(|c| c.revoked.len()),
                "last_error": failure.map(|f| f.error.clone()),
                "failed_at": failure.map(|f| f.at),
            }));
        }
        let mut responders: std::collections::BTreeMap<&str, [i64; 5]> = Default::default();
        for c in snapshot.ocsp.values() {
            let r = responders.entry(c.url.as_str()).or_insert([0, 0, 0, 0, 0]);
            match c.answer.status {
                portcullis_pki::ocsp::Status::Good => r[0] += 1,
                portcullis_pki::ocsp::Status::Revoked { .. } => r[1] += 1,
                portcullis_pki::ocsp::Status::Unknown => r[2] += 1,
            }
            r[3] = r[3].max((now - c.fetched_at).max(0));
        }
        let failing = snapshot
            .failures
            .iter()
            .filter(|(k, _)| k.starts_with("ocsp:"))
            .count();
        for (url, [good, revoked, unknown, oldest, _]) in responders {
            out.push(serde_json::json!({
                "kind": "ocsp",
                "url": url,
                "certificates": good + revoked + unknown,
                "good": good,
                "revoked": revoked,
                "unknown": unknown,
                "oldest_answer_seconds": oldest,
            }));
        }
        if failing > 0 {
            let last = snapshot
                .failures
                .iter()
                .filter(|(k, _)| k.starts_with("ocsp:"))
                .max_by_key(|(_, f)| f.at)
                .map(|(_, f)| f.error.clone());
            out.push(serde_json::json!({
                "kind": "ocsp-failures",
                "certificates": failing,
                "last_error": last,
            }));
        }
        out
    }

    /// What the data path asks to have fetched; the first call takes the receiver.
    pub fn requests(&self) -> Option<tokio::sync::mpsc::Receiver<foreign::FetchRequest>> {
        self.0.foreign.take()
    }
}
