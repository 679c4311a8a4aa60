//! The admin listener's side of `serve`: admin credentials in the data dir (an admin CA of its
//! own, the admin client certificate and its .p12, the listener's server certificate from the
//! local CA), the rustls configuration, and the hooks the registry's API needs from the gateway.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use portcullis_admin::{ExplainRequest, Hooks};
use portcullis_gateway::explain::Explainer;
use portcullis_pki::issue::{self, CaIssuer};
use portcullis_pki::p12::{self, P12Format};
use portcullis_pki::{
    Certificate, IssueRequest, KeyType, PrivateKey, Profile, SubjectAltName, SubjectName,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

use crate::output::{Outputs, read};

/// The files under DATA_DIR/admin.
pub struct AdminFiles {
    dir: PathBuf,
    /// In a cluster: the cluster's admin CA (kept in the registry), which issues this data
    /// dir's admin client certificate and verifies admin clients on every node.
    shared_ca: Option<Arc<CaIssuer>>,
}

impl AdminFiles {
    /// The admin directory of a data dir.
    pub fn new(data_dir: &Path) -> AdminFiles {
        AdminFiles {
            dir: data_dir.join("admin"),
            shared_ca: None,
        }
    }

    /// With the cluster's admin CA in place of the data dir's own.
    pub(crate) fn with_shared_ca(mut self, ca: Option<Arc<CaIssuer>>) -> AdminFiles {
        self.shared_ca = ca;
        self
    }

    /// Whether this data dir has an admin CA of its own.
    pub(crate) fn has_own_ca(&self) -> bool {
        self.dir.join("ca.pem").exists() && self.dir.join("ca.key").exists()
    }

    /// This data dir's own admin CA (made, with the admin client certificate, on first use).
    pub(crate) fn own_ca(&self) -> Result<CaIssuer> {
        AdminFiles::new(self.dir.parent().unwrap_or(Path::new("."))).ensure_client_credentials()?;
        let (ca, _) = Certificate::first_and_rest(&read(&self.dir.join("ca.pem"), "admin CA")?)?;
        let key = PrivateKey::from_pem_or_der(&read(&self.dir.join("ca.key"), "admin CA key")?)
            .context("reading the admin CA key")?;
        CaIssuer::new(ca, key, Vec::new()).context("loading the admin CA")
    }

    /// The admin client certificate and key.
    pub fn client_cert(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("admin.pem"), self.dir.join("admin.key"))
    }

    /// Where `serve` writes the admin API's URL for local CLI commands.
    pub fn endpoint_file(&self) -> PathBuf {
        self.dir.join("endpoint")
    }

    /// Creates the admin CA and the admin client certificate (with a .p12 for browsers) on first
    /// start; returns the admin CA certificate.
    fn ensure_client_credentials(&self) -> Result<Certificate> {
        let ca_path = self.dir.join("ca.pem");
        if let Some(shared) = &self.shared_ca {
            // The cluster's admin CA: this data dir's client certificate is issued by it (once,
            // and again whenever the data dir's admin CA file is not the cluster's).
            let pem = shared.certificate().to_pem();
            let current = std::fs::read_to_string(&ca_path).unwrap_or_default() == pem
                && self
                    .current()
                    .is_some_and(|c| c.is_signed_by(shared.certificate()));
            if !current {
                if ca_path.exists() {
                    tracing::warn!(
                        dir = %self.dir.display(),
                        "this data dir's admin client certificate is replaced by one from the cluster's admin CA: the old one is no longer accepted by any node"
                    );
                }
                let client = AdminClientCert::issue(shared)?;
                let mut out = Outputs::default();
                client.stage(self, &mut out);
                out.public(&ca_path, pem);
                out.write(true)?;
            }
            return Ok(shared.certificate().clone());
        }
        if !ca_path.exists() {
            let (ca, ca_key) = crate::data_dir::new_root_ca("Portcullis Admin CA")?;
            let issuer = CaIssuer::new(ca.clone(), ca_key, Vec::new())?;
            let client = AdminClientCert::issue(&issuer)?;
            let mut out = Outputs::default();
            client.stage(self, &mut out);
            out.secret(self.dir.join("ca.key"), issuer.key().to_pem());
            // The CA certificate last: its presence means everything else was written.
            out.public(&ca_path, ca.to_pem());
            out.write(true)?;
        }
        let (ca, _) = Certificate::first_and_rest(&read(&ca_path, "admin CA")?)?;
        Ok(ca)
    }

    /// The admin client certificate in the data dir, if any.
    pub fn current(&self) -> Option<Certificate> {
        let (cert, _) = self.client_cert();
        let pem = std::fs::read(cert).ok()?;
        Certificate::first_and_rest(&pem).ok().map(|(c, _)| c)
    }

    /// Issues a new admin client certificate with the admin CA and writes it (certificate, key,
    /// .p12 and its password) in place of the current one, all files or none.
    pub fn rotate(&self) -> Result<portcullis_admin::RotatedAdmin> {
        let own;
        let issuer: &CaIssuer = match &self.shared_ca {
            Some(shared) => shared,
            None => {
                own = self.own_ca()?;
                &own
            }
        };
        let ca = issuer.certificate().clone();
        let previous = self.current();
        let client = AdminClientCert::issue(issuer)?;
        let mut out = Outputs::default();
        client.stage(self, &mut out);
        out.write(true)?;
        Ok(portcullis_admin::RotatedAdmin {
            chain_pem: format!("{}{}", client.certificate.to_pem(), ca.to_pem()),
            certificate: client.certificate,
            key_pem: client.key.to_pem(),
            p12: client.p12,
            p12_password: client.password,
            previous,
        })
    }

    /// The admin listener's TLS configuration: a server certificate from the local CA for
    /// localhost, 127.0.0.1, ::1 and the bound address, and client certificates verified
    /// against the admin CA (optional in the handshake: bearer tokens are the alternative).
    pub fn tls_config(
        &self,
        local_ca: &CaIssuer,
        bind: SocketAddr,
    ) -> Result<Arc<rustls::ServerConfig>> {
        let admin_ca = self.ensure_client_credentials()?;
        let key = PrivateKey::generate(KeyType::EcP256)?;
        let mut req = IssueRequest::new(Profile::Server, SubjectName::cn("portcullis-admin-api"));
        req.subject_alt_names = vec![
            SubjectAltName::Dns("localhost".into()),
            SubjectAltName::Ip([127, 0, 0, 1].into()),
            SubjectAltName::Ip(std::net::Ipv6Addr::LOCALHOST.into()),
        ];
        if !bind.ip().is_unspecified() && !bind.ip().is_loopback() {
            req.subject_alt_names.push(SubjectAltName::Ip(bind.ip()));
        }
        let cert = issue::issue(&req, &key, Some(local_ca))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(admin_ca.der().clone())
            .context("loading the admin CA")?;
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
            .allow_unauthenticated()
            .build()
            .context("building the admin client verifier")?;
        let key_der = PrivateKeyDer::try_from(key.pkcs8_der().to_vec())
            .map_err(|e| anyhow::anyhow!("admin key: {e}"))?;
        let chain: Vec<CertificateDer<'static>> =
            vec![cert.der().clone(), local_ca.certificate().der().clone()];
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key_der)
            .context("building the admin TLS configuration")?;
        // HTTP/1.1 only: an early answer (401, 405, 413) to a request whose body was not read
        // resets an HTTP/2 stream, which some clients report as a framing error.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Records the admin API's URL for local CLI commands.
    pub fn write_endpoint(&self, local: SocketAddr) -> Result<()> {
        let host = if local.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else if local.is_ipv6() {
            format!("[{}]", local.ip())
        } else {
            local.ip().to_string()
        };
        let mut out = Outputs::default();
        out.public(
            self.endpoint_file(),
            format!("https://{host}:{}\n", local.port()),
        );
        out.write(true)?;
        Ok(())
    }
}

/// An admin client certificate with its key and a .p12 for browsers.
struct AdminClientCert {
    certificate: Certificate,
    key: PrivateKey,
    p12: Vec<u8>,
    password: String,
}

impl AdminClientCert {
    fn issue(issuer: &CaIssuer) -> Result<AdminClientCert> {
        let key = PrivateKey::generate(KeyType::EcP256)?;
        let certificate = issue::issue(
            &IssueRequest::new(Profile::Client, SubjectName::cn("portcullis-admin")),
            &key,
            Some(issuer),
        )?;
        let password = portcullis_pki::cert::hex(&issue::random_serial()?[..8], "");
        let p12 = p12::export(
            &certificate,
            &key,
            std::slice::from_ref(issuer.certificate()),
            &password,
            P12Format::Modern,
        )?;
        Ok(AdminClientCert {
            certificate,
            key,
            p12,
            password,
        })
    }

    /// Adds its files (the key, .p12 and password 0600) to `out`.
    fn stage(&self, files: &AdminFiles, out: &mut Outputs) {
        let (cert_path, key_path) = files.client_cert();
        out.public(&cert_path, self.certificate.to_pem());
        out.secret(&key_path, self.key.to_pem());
        out.secret(files.dir.join("admin.p12"), self.p12.clone());
        out.secret(
            files.dir.join("admin.p12.password"),
            format!("{}\n", self.password),
        );
    }
}

/// What the API asks of the running gateway.
pub(crate) struct ServeHooks {
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Certificate expiry, computed from the live state at each scrape.
    pub expiry: portcullis_gateway::ExpiryGauges,
    pub ready: Arc<AtomicBool>,
    /// Whether the registry database answered the last poll.
    pub registry_reachable: Arc<AtomicBool>,
    pub explainer: Explainer,
    pub domains: crate::config::DomainChecker,
    pub broker: std::sync::Arc<portcullis_mqtt::broker::Broker>,
    /// The gateway's open HTTP connections.
    pub live: std::sync::Arc<portcullis_gateway::conn::live::Live>,
    /// The data dir's admin credentials (for rotation).
    pub admin: AdminFiles,
    /// When the registry follower last found the snapshot current.
    pub sync: Arc<crate::sync::SyncStatus>,
    /// Not ready when the snapshot was last found current longer ago than this (ms).
    pub stale_after_ms: i64,
    /// The NATS connection MQTT is routed through (with `nats_url`): not ready while it is down.
    pub nats: Option<Arc<crate::bus::NatsState>>,
    /// Other CAs' revocation, as the data path holds it.
    pub foreign: portcullis_gateway::ForeignHandle,
    /// The last hour of the dashboard's metrics.
    pub history: Arc<crate::history::History>,
}

impl Hooks for ServeHooks {
    fn revocation_sources(&self) -> Vec<serde_json::Value> {
        self.foreign.sources()
    }

    fn metrics_history(&self) -> serde_json::Value {
        self.history.json(&self.metrics(), crate::sync::now_ms())
    }

    fn metrics(&self) -> String {
        let mut text = self.metrics.render();
        text.push_str(&self.expiry.render());
        let b = self.broker.stats();
        for (name, help, value) in [
            (
                "portcullis_mqtt_sessions_online",
                "MQTT sessions held by a connection",
                b.online,
            ),
            (
                "portcullis_mqtt_sessions_offline",
                "persistent MQTT sessions kept while their client is away",
                b.offline,
            ),
            (
                "portcullis_mqtt_queued_messages",
                "messages queued for MQTT sessions",
                b.queued,
            ),
            (
                "portcullis_mqtt_subscriptions",
                "subscriptions of every MQTT session",
                b.subscriptions,
            ),
            (
                "portcullis_mqtt_retained_messages",
                "retained MQTT messages",
                b.retained,
            ),
        ] {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            ));
        }
        text
    }

    fn ready(&self) -> bool {
        let checked = self.sync.checked_ms.load(Ordering::SeqCst);
        self.ready.load(Ordering::SeqCst)
            && self.registry_reachable.load(Ordering::SeqCst)
            && crate::sync::now_ms() - checked <= self.stale_after_ms
            && self.nats.as_ref().is_none_or(|n| n.connected())
    }

    fn explain(&self, request: &ExplainRequest) -> Result<Value, String> {
        self.explainer.explain(
            &request.domain,
            request.host.as_deref(),
            request.source_ip,
            &request.method,
            &request.path,
            &request.chain,
            request.profile,
        )
    }

    fn mqtt_sessions(&self) -> Vec<portcullis_admin::MqttSession> {
        self.broker
            .sessions()
            .into_iter()
            .map(|s| portcullis_admin::MqttSession {
                client_id: s.client_id,
                online: s.online,
                identity: s.identity,
                subscriptions: s.subscriptions,
                queued: s.queued,
                seconds: s.seconds,
            })
            .collect()
    }

    fn live_connections(&self) -> Vec<portcullis_admin::LiveConnection> {
        self.live
            .list()
            .into_iter()
            .map(|c| portcullis_admin::LiveConnection {
                id: c.id,
                peer: c.peer.to_string(),
                domain: c.domain,
                protocol: c.protocol.to_string(),
                verify: c.verify,
                client_subject: c.client_subject,
                client_fingerprint: c.client_fingerprint,
                since: c.since,
            })
            .collect()
    }

    fn close_connection(&self, id: u64) -> bool {
        self.live.close(id)
    }

    fn close_mqtt_session(&self, client_id: &str, forget: bool) -> bool {
        self.broker
            .close(client_id, "an operator disconnected the session", forget)
    }

    fn admin_certificate(&self) -> Option<Certificate> {
        self.admin.current()
    }

    fn rotate_admin_certificate(&self) -> Result<portcullis_admin::RotatedAdmin, String> {
        self.admin.rotate().map_err(|e| format!("{e:#}"))
    }

    fn check_domains<'a>(
        &'a self,
        domains: &'a [(String, portcullis_registry::DomainSpec)],
    ) -> portcullis_admin::HookFuture<'a, portcullis_admin::CheckedDomains> {
        Box::pin(self.domains.check(domains))
    }
}
