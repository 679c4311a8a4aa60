//! ACME (RFC 8555) for `certificate = "acme"` domains: orders the certificate from the domain's
//! CA (Let's Encrypt by default), answers the CA's challenge (TLS-ALPN-01 on the TLS listeners,
//! or HTTP-01 on `[acme] http_listen`), keeps the certificate in the registry (its key sealed with
//! the cluster key, as `acme:HOST`), and renews it before it expires; every node serves it
//! without a restart, as any registry change.
//!
//! One node orders for the cluster: a lease per domain in the registry. Challenge answers are
//! published in the registry, so whichever node the CA reaches answers; the ordering node waits
//! until every live node reports the change before it asks the CA to validate. The account on
//! each directory is the cluster's, its credentials sealed in the registry.
//!
//! Until the CA has issued a certificate, the domain is served with the cluster's `auto`
//! certificate. A failed order is retried after 1 minute, doubling up to 6 hours, and at once
//! when the domains change.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use portcullis_gateway::acme::{AcmeChallenges, ChallengeAnswer, ChallengeKind};
use portcullis_gateway::config::Hostname;
use portcullis_pki::{Certificate, KeyType, PrivateKey};
use portcullis_registry::store::AcmeChallenge;
use portcullis_registry::{AcmeSpec, DomainSpec, RegistryError, ServerCertRecord, Store};

use portcullis_registry::sealed::ClusterKey;

/// The `[acme]` settings, checked.
#[derive(Debug, Clone, Default)]
pub(crate) struct AcmeSettings {
    pub(crate) http_listen: Option<SocketAddr>,
    /// PEM text of the extra roots.
    pub(crate) ca_pem: Option<String>,
    pub(crate) renew_before: std::time::Duration,
}

/// How long a node holds a domain's lease while ordering (renewed by nobody: an order finishes
/// well within it, and a node that dies frees it when it expires).
const LEASE_MS: i64 = 10 * 60 * 1000;
/// How long challenge answers stay published at most.
const CHALLENGE_MS: i64 = 10 * 60 * 1000;
/// The first retry after a failure, doubled after each.
const FIRST_RETRY: Duration = Duration::from_secs(60);
/// Retries wait at most this long.
const LAST_RETRY: Duration = Duration::from_secs(6 * 3600);
/// Each request to the CA.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A whole order, well within the lease.
const ORDER_TIMEOUT: Duration = Duration::from_secs(8 * 60);
/// Connections the HTTP-01 listener serves at once (more are closed at once).
const HTTP01_CONNECTIONS: usize = 256;

/// The registry name of a host's ACME certificate: `acme:HOST` (`_wildcard` for `*`), or
/// `acme:` and the host's SHA-256 when that would exceed a registry name's 128 characters.
pub(crate) fn certificate_name(host: &Hostname) -> String {
    let name = format!("acme:{}", host.to_string().replace('*', "_wildcard"));
    if name.len() <= 128 {
        return name;
    }
    let digest = portcullis_pki::cert::sha256(host.to_string().as_bytes());
    format!("acme:{}", portcullis_pki::cert::hex(&digest, ""))
}

/// Checks a domain's ACME settings.
pub(crate) fn check_spec(host: &Hostname, spec: Option<&AcmeSpec>) -> Result<()> {
    let default = AcmeSpec::default();
    let spec = spec.unwrap_or(&default);
    if host.to_string().starts_with('*') {
        bail!(
            "certificate = \"acme\" cannot cover a wildcard name: ACME CAs validate those only by DNS-01, which Portcullis does not answer; name the hosts, or import a wildcard certificate with `portcullis server-cert import`"
        );
    }
    if spec.challenge != "tls-alpn-01" && spec.challenge != "http-01" {
        bail!(
            "acme challenge '{}' must be tls-alpn-01 or http-01",
            spec.challenge
        );
    }
    if !spec.directory.starts_with("https://")
        || spec.directory.parse::<hyper::Uri>().is_err()
        || spec.directory.contains(char::is_whitespace)
    {
        bail!(
            "acme directory '{}' must be an https:// URL (such as {})",
            spec.directory,
            portcullis_registry::LETS_ENCRYPT_DIRECTORY
        );
    }
    if let Some(c) = spec.contact.iter().find(|c| !c.starts_with("mailto:")) {
        bail!("acme contact '{c}' must be a mailto: URL (mailto:ops@example.com)");
    }
    Ok(())
}

/// Whether a certificate valid from `not_before` to `not_after` (seconds) is due for renewal at
/// `now`: within `renew_before` of its end, or within the last third of its lifetime when that
/// is shorter (so that short-lived certificates renew in time).
#[cfg(test)]
fn renewal_due(not_before: i64, not_after: i64, now: i64, renew_before: Duration) -> bool {
    renewal_at(not_before, not_after, renew_before) <= now
}

fn renewal_at(not_before: i64, not_after: i64, renew_before: Duration) -> i64 {
    let lifetime = (not_after - not_before).max(0);
    let window = i64::try_from(renew_before.as_secs())
        .unwrap_or(i64::MAX)
        .min(lifetime / 3);
    not_after - window
}

/// The challenge answers the gateway serves, from the registry's.
pub(crate) fn answers(stored: &[AcmeChallenge]) -> Vec<ChallengeAnswer> {
    stored
        .iter()
        .filter_map(|c| {
            let kind = match c.kind.as_str() {
                "http-01" => ChallengeKind::Http01,
                "tls-alpn-01" => ChallengeKind::TlsAlpn01,
                _ => return None,
            };
            Some(ChallengeAnswer {
                hostname: c.hostname.clone(),
                kind,
                token: c.token.clone(),
                key_authorization: c.key_authorization.clone(),
                expires_ms: c.expires_ms,
            })
        })
        .collect()
}

/// The CA's HTTPS client: the system's roots and `[acme] ca_file`'s.
struct CaClient {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        BodyWrapper<Bytes>,
    >,
}

impl CaClient {
    fn new(extra_roots: Option<&str>) -> Result<CaClient> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(pem) = extra_roots {
            for c in Certificate::all_from_pem_or_der(pem.as_bytes()).context("[acme] ca_file")? {
                roots
                    .add(c.der().clone())
                    .map_err(|e| anyhow!("[acme] ca_file: {e}"))?;
            }
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector);
        Ok(CaClient { client })
    }
}

impl HttpClient for CaClient {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let fut = self.client.request(req);
        Box::pin(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                Ok(Ok(response)) => Ok(BytesResponse::from(response)),
                Ok(Err(e)) => Err(instant_acme::Error::Other(Box::new(e))),
                Err(_) => Err(instant_acme::Error::Str(
                    "the ACME CA did not answer within 30 s",
                )),
            }
        })
    }
}

/// Orders and renews the certificates of `certificate = "acme"` domains for the cluster.
pub(crate) struct Manager {
    pub(crate) store: Store,
    /// Seals the certificates' keys and the account's credentials.
    pub(crate) key: Arc<ClusterKey>,
    pub(crate) settings: AcmeSettings,
    /// This node's part: the gateway's challenge answers.
    pub(crate) challenges: Arc<AcmeChallenges>,
    /// This node's name (the lease holder).
    pub(crate) node_id: String,
    /// Woken when the domains change.
    pub(crate) wake: Arc<tokio::sync::Notify>,
}

/// Failures of one domain: how many in a row, and when to try again.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    retry_at: tokio::time::Instant,
}

impl Manager {
    /// Runs until the process ends.
    pub(crate) async fn run(self) {
        let client = match CaClient::new(self.settings.ca_pem.as_deref()) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(target: "portcullis::acme", error = %format!("{e:#}"), "cannot make the ACME client; no ACME certificate will be ordered");
                return;
            }
        };
        let mut backoff: HashMap<String, Backoff> = HashMap::new();
        loop {
            let next = self.pass(&client, &mut backoff).await;
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = self.wake.notified() => {
                    // The operator changed domains: what failed is tried again now.
                    backoff.clear();
                }
            }
        }
    }

    /// One look at every ACME domain; how long until the next is due.
    async fn pass(
        &self,
        client: &Arc<CaClient>,
        backoff: &mut HashMap<String, Backoff>,
    ) -> Duration {
        let mut next = Duration::from_secs(3600);
        let domains = match acme_domains(&self.store).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(target: "portcullis::acme", error = %format!("{e:#}"), "cannot read the domains; trying again in a minute");
                return FIRST_RETRY;
            }
        };
        let now = tokio::time::Instant::now();
        backoff.retain(|host, _| domains.iter().any(|d| d.hostname == *host));
        // Answers whose order was abandoned (a node died) are withdrawn once expired.
        if let Err(e) = self
            .store
            .clear_acme_challenges("(expired)", &[], "node:acme")
            .await
        {
            tracing::debug!(target: "portcullis::acme", error = %e, "cannot withdraw expired challenge answers");
        }
        for d in domains {
            let Ok(host) = Hostname::parse(&d.hostname) else {
                continue;
            };
            let spec = d.acme.clone().unwrap_or_default();
            if check_spec(&host, Some(&spec)).is_err() {
                continue;
            }
            if let Some(b) = backoff.get(&d.hostname)
                && b.retry_at > now
            {
                next = next.min(b.retry_at - now);
                continue;
            }
            let name = certificate_name(&host);
            match self.store.server_certificate(&name).await {
                Ok(record) => {
                    let wait = until_due(&record, self.settings.renew_before);
                    if !wait.is_zero() {
                        next = next.min(wait);
                        continue;
                    }
                }
                Err(RegistryError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(target: "portcullis::acme", domain = %host, error = %e, "cannot read the domain's certificate");
                    next = next.min(FIRST_RETRY);
                    continue;
                }
            }
            let lease = format!("acme:{host}");
            match self
                .store
                .acquire_lease(&lease, &self.node_id, LEASE_MS)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    // Another node is ordering it; its result arrives as a registry change.
                    next = next.min(FIRST_RETRY);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(target: "portcullis::acme", domain = %host, error = %e, "cannot take the domain's ordering lease");
                    next = next.min(FIRST_RETRY);
                    continue;
                }
            }
            // Read again under the lease: another node may have just renewed it.
            if let Ok(record) = self.store.server_certificate(&name).await
                && !until_due(&record, self.settings.renew_before).is_zero()
            {
                let _ = self.store.release_lease(&lease, &self.node_id).await;
                next = next.min(until_due(&record, self.settings.renew_before));
                continue;
            }
            let started = std::time::Instant::now();
            let result = match tokio::time::timeout(
                ORDER_TIMEOUT,
                self.order(client, &host, &spec, &name, &lease),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(anyhow!(
                    "the order took longer than {} minutes",
                    ORDER_TIMEOUT.as_secs() / 60
                )),
            };
            match result {
                Ok(leaf) => {
                    if let Err(e) = self.store.release_lease(&lease, &self.node_id).await {
                        tracing::debug!(target: "portcullis::acme", error = %e, "cannot release the lease; it expires by itself");
                    }
                    backoff.remove(&d.hostname);
                    metrics::counter!("portcullis_acme_orders_total", "result" => "ok")
                        .increment(1);
                    tracing::info!(
                        target: "portcullis::acme",
                        domain = %host,
                        directory = %spec.directory,
                        challenge = %spec.challenge,
                        serial = %leaf.info().serial,
                        not_after = leaf.info().not_after_unix(),
                        seconds = started.elapsed().as_secs_f64(),
                        "ACME certificate issued"
                    );
                    let renew = renewal_at(
                        leaf.info().not_before_unix(),
                        leaf.info().not_after_unix(),
                        self.settings.renew_before,
                    ) - unix_now();
                    next = next.min(Duration::from_secs(
                        u64::try_from(renew.max(1)).unwrap_or(1),
                    ));
                }
                Err(e) => {
                    metrics::counter!("portcullis_acme_orders_total", "result" => "failed")
                        .increment(1);
                    let failures = backoff.get(&d.hostname).map_or(0, |b| b.failures) + 1;
                    let wait = FIRST_RETRY
                        .saturating_mul(1 << (failures - 1).min(10))
                        .min(LAST_RETRY);
                    backoff.insert(
                        d.hostname.clone(),
                        Backoff {
                            failures,
                            retry_at: tokio::time::Instant::now() + wait,
                        },
                    );
                    next = next.min(wait);
                    // The lease is kept until the retry: the other nodes back off too, so the
                    // CA sees one node's retries, not one per node.
                    let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
                    if let Err(e) = self
                        .store
                        .acquire_lease(&lease, &self.node_id, wait_ms)
                        .await
                    {
                        tracing::debug!(target: "portcullis::acme", error = %e, "cannot keep the lease for the back-off");
                    }
                    tracing::warn!(
                        target: "portcullis::acme",
                        domain = %host,
                        directory = %spec.directory,
                        error = %format!("{e:#}"),
                        retry_in_secs = wait.as_secs(),
                        "ACME order failed"
                    );
                }
            }
        }
        next
    }

    /// Orders `host`'s certificate and records it as `name`; the new leaf.
    async fn order(
        &self,
        client: &Arc<CaClient>,
        host: &Hostname,
        spec: &AcmeSpec,
        name: &str,
        lease: &str,
    ) -> Result<Certificate> {
        let account = self.account(client, spec).await?;
        let hostname = host.to_string();
        let identifiers = [Identifier::Dns(hostname.clone())];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .context("creating the order")?;
        let kind = if spec.challenge == "http-01" {
            ChallengeType::Http01
        } else {
            ChallengeType::TlsAlpn01
        };
        let mut published = Vec::new();
        let mut ready = Vec::new();
        {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.context("reading the order's authorizations")?;
                match authz.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => bail!("the CA's authorization for {hostname} is {other:?}"),
                }
                let challenge = authz.challenge(kind.clone()).ok_or_else(|| {
                    anyhow!(
                        "the CA offers no {} challenge for {hostname}",
                        spec.challenge
                    )
                })?;
                published.push(AcmeChallenge {
                    token: challenge.token.clone(),
                    hostname: hostname.clone(),
                    kind: spec.challenge.clone(),
                    key_authorization: challenge.key_authorization().as_str().to_string(),
                    expires_ms: crate::sync::now_ms() + CHALLENGE_MS,
                });
                ready.push(challenge.url.clone());
            }
        }
        let tokens: Vec<String> = published.iter().map(|c| c.token.clone()).collect();
        let outcome = async {
            if !published.is_empty() {
                self.publish(&published).await?;
                let mut authorizations = order.authorizations();
                while let Some(authz) = authorizations.next().await {
                    let mut authz = authz?;
                    if let Some(mut challenge) = authz.challenge(kind.clone())
                        && ready.contains(&challenge.url)
                    {
                        challenge
                            .set_ready()
                            .await
                            .context("telling the CA the challenge is ready")?;
                    }
                }
            }
            let retries = RetryPolicy::new()
                .initial_delay(Duration::from_millis(500))
                .timeout(Duration::from_secs(120));
            let status = order
                .poll_ready(&retries)
                .await
                .context("waiting for the CA to validate")?;
            if status != OrderStatus::Ready {
                let mut why = Vec::new();
                let mut authorizations = order.authorizations();
                while let Some(Ok(authz)) = authorizations.next().await {
                    for c in &authz.challenges {
                        if let Some(e) = &c.error {
                            why.push(e.to_string());
                        }
                    }
                }
                bail!(
                    "the CA did not validate {hostname} ({status:?}): {}",
                    if why.is_empty() {
                        "no reason given".to_string()
                    } else {
                        why.join("; ")
                    }
                );
            }
            let key = PrivateKey::generate(KeyType::EcP256)?;
            let csr = portcullis_pki::acme::order_csr(std::slice::from_ref(&hostname), &key)?;
            order
                .finalize_csr(&csr)
                .await
                .context("finalizing the order")?;
            let chain = order
                .poll_certificate(&retries)
                .await
                .context("downloading the certificate")?;
            Ok::<_, anyhow::Error>((key, chain))
        }
        .await;
        if !tokens.is_empty()
            && let Err(e) = self
                .store
                .clear_acme_challenges(&hostname, &tokens, "node:acme")
                .await
        {
            tracing::warn!(target: "portcullis::acme", domain = %hostname, error = %e, "cannot withdraw the challenge answers; they expire within 10 minutes");
        }
        let (key, chain) = outcome?;
        let certs = Certificate::all_from_pem_or_der(chain.as_bytes())
            .context("the CA's certificate chain")?;
        let leaf = certs
            .first()
            .cloned()
            .ok_or_else(|| anyhow!("the CA's certificate chain is empty"))?;
        if !key.is_key_of(&leaf) {
            bail!("the CA's certificate is not for the key this node sent");
        }
        let sealed = self
            .key
            .seal(key.pkcs8_der(), &ServerCertRecord::seal_context(name))?;
        // Still this node's order (its lease not expired and taken by another node meanwhile).
        if !self
            .store
            .acquire_lease(lease, &self.node_id, LEASE_MS)
            .await?
        {
            bail!("another node took the order over (this one took longer than its lease)");
        }
        self.store
            .put_server_certificate(name, &chain, &sealed, "node:acme")
            .await
            .with_context(|| format!("recording the certificate of {hostname}"))?;
        Ok(leaf)
    }

    /// The cluster's account on the directory: the registry's, or a new one recorded (the first
    /// node to record one wins, the others use it).
    async fn account(&self, client: &Arc<CaClient>, spec: &AcmeSpec) -> Result<Account> {
        let context = format!("acme-account:{}", spec.directory);
        let http = || -> Box<dyn HttpClient> {
            Box::new(CaClient {
                client: client.client.clone(),
            })
        };
        if let Some(sealed) = self.store.acme_account(&spec.directory).await? {
            let json = self.key.open(&sealed, &context)?;
            let credentials: AccountCredentials =
                serde_json::from_slice(&json).context("the stored ACME account")?;
            return Account::builder_with_http(http())
                .from_credentials(credentials)
                .await
                .with_context(|| format!("reaching the ACME directory {}", spec.directory));
        }
        let contact: Vec<&str> = spec.contact.iter().map(String::as_str).collect();
        let (account, credentials) = Account::builder_with_http(http())
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                spec.directory.clone(),
                None,
            )
            .await
            .with_context(|| format!("creating an account on {}", spec.directory))?;
        let json = serde_json::to_vec(&credentials)?;
        let sealed = self.key.seal(&json, &context)?;
        let kept = self
            .store
            .init_acme_account(&spec.directory, &sealed)
            .await?;
        if kept == sealed {
            tracing::info!(target: "portcullis::acme", directory = %spec.directory, "ACME account created");
            return Ok(account);
        }
        // Another node recorded one first: use the cluster's.
        let json = self.key.open(&kept, &context)?;
        let credentials: AccountCredentials = serde_json::from_slice(&json)?;
        Ok(Account::builder_with_http(http())
            .from_credentials(credentials)
            .await?)
    }

    /// Publishes challenge answers and waits (10 s at most) until every live node serves them.
    async fn publish(&self, answers: &[AcmeChallenge]) -> Result<()> {
        self.store
            .put_acme_challenges(answers, "node:acme")
            .await
            .context("publishing the challenge answers")?;
        let marker = self.store.config_marker().await?;
        // This node at once (its reload follows); the others through the registry.
        if let Ok(all) = self.store.acme_challenges().await {
            let _ = self.challenges.replace(&self::answers(&all));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now_ms = crate::sync::now_ms();
            let behind: Vec<String> = self
                .store
                .cluster_nodes()
                .await?
                .into_iter()
                .filter(|n| n.id != self.node_id && now_ms - n.heartbeat_ms < 10_000)
                .filter(|n| n.snapshot_marker < marker)
                .map(|n| n.id)
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(target: "portcullis::acme", nodes = %behind.join(", "), "nodes have not reported the challenge answers within 10 s; asking the CA to validate anyway");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// How long until `record` is due for renewal (zero: now).
fn until_due(record: &ServerCertRecord, renew_before: Duration) -> Duration {
    let Ok((leaf, _)) = Certificate::first_and_rest(record.chain_pem.as_bytes()) else {
        return Duration::ZERO;
    };
    let at = renewal_at(
        leaf.info().not_before_unix(),
        leaf.info().not_after_unix(),
        renew_before,
    );
    Duration::from_secs(u64::try_from(at - unix_now()).unwrap_or(0))
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The registry's `certificate = "acme"` domains (none before the configuration file seeded
/// them: the node seeds them at its first start).
async fn acme_domains(store: &Store) -> Result<Vec<DomainSpec>> {
    if !store.domains_seeded().await? {
        return Ok(Vec::new());
    }
    Ok(store
        .list_domains()
        .await?
        .into_iter()
        .map(|d| d.spec)
        .filter(|d| d.certificate == "acme")
        .collect())
}

/// The registry's `certificate = "acme"` domains as a reload sees them (to tell the manager
/// when they change).
pub(crate) fn domains_of(domains: Option<&Vec<(String, DomainSpec)>>) -> Vec<(String, DomainSpec)> {
    domains
        .into_iter()
        .flatten()
        .filter(|(_, d)| d.certificate == "acme")
        .cloned()
        .collect()
}

/// The plain-HTTP listener of `[acme] http_listen`: answers HTTP-01 challenges and redirects
/// everything else to HTTPS on the same host (the port-80 listener sites keep for that).
pub(crate) async fn serve_http01(
    listener: tokio::net::TcpListener,
    challenges: Arc<AcmeChallenges>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(HTTP01_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed on the ACME HTTP listener");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A bounded number at once, each for 10 s at most and one request: port 80 is open to
        // anyone, and what it serves is small.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let challenges = challenges.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let answer = http01_answer(&challenges, &req);
                async move { Ok::<_, std::convert::Infallible>(answer) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        });
    }
}

/// The answer to one request on the HTTP-01 listener.
fn http01_answer<B>(challenges: &AcmeChallenges, req: &Request<B>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain"),
        );
        r
    };
    let path = req.uri().path();
    if let Some(token) = path.strip_prefix("/.well-known/acme-challenge/") {
        if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        return match challenges.http_answer(token) {
            Some(answer) => text(StatusCode::OK, answer),
            None => text(StatusCode::NOT_FOUND, "no such ACME challenge\n".into()),
        };
    }
    // Everything else goes to HTTPS on the same name (a valid host name only: no open redirect
    // to whatever a Host header says).
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name))
        .and_then(|h| {
            Hostname::parse(h)
                .ok()
                .filter(|n| !n.to_string().starts_with('*'))
        });
    match host {
        Some(host) => {
            let target = format!(
                "https://{host}{}",
                req.uri().path_and_query().map_or("/", |p| p.as_str())
            );
            match hyper::header::HeaderValue::from_str(&target) {
                Ok(v) => {
                    let mut r = text(StatusCode::PERMANENT_REDIRECT, String::new());
                    r.headers_mut().insert(hyper::header::LOCATION, v);
                    r
                }
                Err(_) => text(
                    StatusCode::BAD_REQUEST,
                    "a path that cannot be redirected\n".into(),
                ),
            }
        }
        None => text(
            StatusCode::BAD_REQUEST,
            "a Host header with a host name is needed\n".into(),
        ),
    }
}

/// Binds `[acme] http_listen`.
pub(crate) async fn bind_http01(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding [acme] http_listen {addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_thirty_days_before_expiry_or_at_two_thirds_of_a_short_lifetime() {
        let day = 86_400;
        let thirty = Duration::from_secs(30 * day as u64);
        // 90 days: renewed at day 60.
        assert!(!renewal_due(0, 90 * day, 60 * day - 1, thirty));
        assert!(renewal_due(0, 90 * day, 60 * day, thirty));
        // 1 year: 30 days before the end.
        assert!(!renewal_due(0, 365 * day, 334 * day, thirty));
        assert!(renewal_due(0, 365 * day, 335 * day, thirty));
        // 6 days (Let's Encrypt's short-lived profile): at day 4.
        assert!(!renewal_due(0, 6 * day, 4 * day - 1, thirty));
        assert!(renewal_due(0, 6 * day, 4 * day, thirty));
        // Expired: due.
        assert!(renewal_due(0, 10, 11, thirty));
    }

    #[test]
    fn specs_are_checked_with_the_fix_in_the_message() {
        let host = Hostname::parse("a.example.com").unwrap();
        check_spec(&host, None).unwrap();
        let wildcard = Hostname::parse("*.example.com").unwrap();
        assert!(
            check_spec(&wildcard, None)
                .unwrap_err()
                .to_string()
                .contains("DNS-01")
        );
        let bad = |f: &dyn Fn(&mut AcmeSpec)| {
            let mut s = AcmeSpec::default();
            f(&mut s);
            check_spec(&host, Some(&s)).unwrap_err().to_string()
        };
        assert!(bad(&|s| s.challenge = "dns-01".into()).contains("tls-alpn-01 or http-01"));
        assert!(bad(&|s| s.directory = "http://ca.test/dir".into()).contains("https://"));
        assert!(bad(&|s| s.contact = vec!["ops@example.com".into()]).contains("mailto:"));
    }

    /// Review finding: port 80 is open to anyone, and its connections used to be unbounded
    /// (each held up to 60 s): a flood would have used up the file descriptors the TLS
    /// listeners need.
    #[tokio::test]
    async fn the_http01_listener_holds_a_bounded_number_of_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_http01(listener, Arc::default()));
        let mut idle = Vec::new();
        for _ in 0..HTTP01_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // One more is closed at once, before it says anything.
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0);
        // Once one leaves, a request is answered again.
        idle.pop();
        let answered = async {
            loop {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                let _ = s
                    .write_all(
                        b"GET /.well-known/acme-challenge/x HTTP/1.1\r\nHost: a.test\r\n\r\n",
                    )
                    .await;
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out).await;
                if out.starts_with(b"HTTP/1.1 404") {
                    return;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), answered)
            .await
            .expect("a request is answered once a slot is free");
    }

    #[test]
    fn http01_answers_challenges_and_redirects_the_rest() {
        let challenges = AcmeChallenges::default();
        challenges
            .replace(&[ChallengeAnswer {
                hostname: "a.example.com".into(),
                kind: ChallengeKind::Http01,
                token: "tok".into(),
                key_authorization: "tok.thumb".into(),
                expires_ms: crate::sync::now_ms() + 60_000,
            }])
            .unwrap();
        let get = |uri: &str, host: &str| {
            let req = Request::get(uri).header("host", host).body(()).unwrap();
            http01_answer(&challenges, &req)
        };
        let ok = get("/.well-known/acme-challenge/tok", "a.example.com");
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(
            get("/.well-known/acme-challenge/other", "a.example.com").status(),
            StatusCode::NOT_FOUND
        );
        let moved = get("/x?y=1", "a.example.com:80");
        assert_eq!(moved.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(moved.headers()["location"], "https://a.example.com/x?y=1");
        assert_eq!(get("/x", "evil.test/@x").status(), StatusCode::BAD_REQUEST);
    }
}
