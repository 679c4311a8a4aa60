//! The admin REST API: JSON over HTTPS on its own listener, authenticated by an admin client
//! certificate (verified in the TLS handshake against the admin CA) or a bearer token (stored
//! hashed). Only `/healthz` answers without one of them.
//!
//! Every error is `{"code", "message", "details"}` with a 4xx status for the caller's mistakes;
//! failures of ours are 500 with a public message, the cause going to the log only.
//! [`openapi`] describes exactly the routes [`router`] serves (a test checks both ways).
//!
//! Modules: the crate root (router, authentication, errors and extractors, health), then a
//! router file per resource — `cas`, `certificates`, `things`, `truststores`, `domains`,
//! `policies` (with the simulator), `fleet` (provisioning templates, claim certificates), `webhooks`, `operators` (audit log, tokens, admin
//! certificates), `gateway` (explain, MQTT sessions, connections, through [`Hooks`]) —
//! `console` (the web console and its sessions) and `enroll` (device enrollment).
//! Invariants: the API never answers unauthenticated except `/healthz`; every write goes
//! through the `Store` (one transaction with its audit entry); what the node owns (metrics,
//! explain, checking domains) comes through [`Hooks`].

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use portcullis_pki::{CaIssuer, Certificate};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use portcullis_registry::{CertId, DomainSpec, RegistryError, Store};

mod cas;
mod certificates;
mod cluster;
mod console;
mod domains;
pub mod enroll;
mod fleet;
mod gateway;
pub mod openapi;
mod operators;
mod policies;
mod server_certs;
mod things;
mod truststores;
mod webhooks;

use cas::{describe_ca, list_cas, register_ca, registration_code, update_ca};
use certificates::{
    create_certificate, delete_certificate, describe_certificate, list_certificates,
    register_batch, update_certificate,
};
use domains::{delete_domain, describe_domain, list_domains, put_domain};
use gateway::{close_connection, close_session, explain, list_connections, list_sessions};
use operators::{
    audit, create_token, delete_token, list_admin_certificates, list_tokens,
    revoke_admin_certificate, rotate_admin_certificate,
};
use server_certs::{
    delete_server_certificate, describe_server_certificate, list_server_certificates,
    put_server_certificate,
};
use things::{
    attach, create_thing, delete_thing, describe_thing, detach, list_things, update_thing,
};
use truststores::{
    add_truststore_version, create_truststore, delete_truststore, describe_truststore,
    list_truststores, preview, preview_bundle, truststore_version,
};

/// The largest request body accepted (a truststore bundle with its CRLs).
pub const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;

/// What the API needs from the node that runs it: what the registry does not own.
pub trait Hooks: Send + Sync + 'static {
    /// Prometheus text for `/metrics`.
    fn metrics(&self) -> String;
    /// Whether the gateway is serving (for `/readyz`).
    fn ready(&self) -> bool;
    /// The gateway's decision trace for a certificate on a domain (`portcullis explain`).
    fn explain(&self, request: &ExplainRequest) -> Result<Value, String>;
    /// Checks that the gateway can load exactly these domains (hostname → specification):
    /// every file readable, every truststore resolvable, every value meaningful. Returns what
    /// an operator should know about each one's truststore, or one line naming what is wrong.
    /// Nothing is stored unless this passes.
    fn check_domains<'a>(
        &'a self,
        domains: &'a [(String, DomainSpec)],
    ) -> HookFuture<'a, CheckedDomains>;
    /// The MQTT sessions.
    fn mqtt_sessions(&self) -> Vec<MqttSession>;
    /// Closes an MQTT session's connection (and with `forget`, the stored session); whether
    /// there was one.
    fn close_mqtt_session(&self, client_id: &str, forget: bool) -> bool;
    /// The open HTTP connections, oldest first.
    fn live_connections(&self) -> Vec<LiveConnection>;
    /// Closes an open HTTP connection; whether it was open.
    fn close_connection(&self, id: u64) -> bool;
    /// The admin client certificate in this node's data dir, if any.
    fn admin_certificate(&self) -> Option<Certificate>;
    /// Issues a new admin client certificate with this node's admin CA and puts it in the data
    /// dir in place of the current one (every file or none); the new credentials and the
    /// certificate they replace.
    fn rotate_admin_certificate(&self) -> Result<RotatedAdmin, String>;
    /// Other CAs' revocation sources this node follows (CRL distribution points, OCSP
    /// responders) and their freshness.
    fn revocation_sources(&self) -> Vec<Value> {
        Vec::new()
    }
    /// The last hour of handshakes, failures by reason, requests by status class, latency,
    /// connections and MQTT sessions (what the console's dashboard charts).
    fn metrics_history(&self) -> Value {
        json!({"interval_secs": 10, "window_secs": 3600, "points": [], "failures_by_reason": {}})
    }
}

/// An MQTT session, as `GET /v1/sessions` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MqttSession {
    /// The client id.
    pub client_id: String,
    /// Whether a connection holds it now.
    pub online: bool,
    /// Who connected it (certificate subject and id).
    pub identity: String,
    /// Its subscriptions.
    pub subscriptions: Vec<String>,
    /// Messages queued for it.
    pub queued: usize,
    /// Seconds since it connected, or since it went offline.
    pub seconds: u64,
}

/// An open HTTP connection, as `GET /v1/connections` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveConnection {
    /// Its id (to close it).
    pub id: u64,
    /// The client's address.
    pub peer: String,
    /// The domain it was made for.
    pub domain: String,
    /// `http/1.1`, `h2` or `websocket`.
    pub protocol: String,
    /// The verdict on its certificate (`SUCCESS`, `NONE`, `FAILED:<reason>`).
    pub verify: String,
    /// The client certificate's subject, if any.
    pub client_subject: String,
    /// The client certificate's id (SHA-256), if any.
    pub client_fingerprint: String,
    /// When it was established (seconds since the epoch).
    pub since: i64,
}

/// A rotated admin client certificate.
#[derive(Debug, Clone)]
pub struct RotatedAdmin {
    /// The new certificate.
    pub certificate: Certificate,
    /// Its chain up to the admin CA, PEM.
    pub chain_pem: String,
    /// Its private key, PEM (returned once, never stored in the registry).
    pub key_pem: String,
    /// A PKCS#12 bundle for browsers, and its password.
    pub p12: Vec<u8>,
    /// The bundle's password.
    pub p12_password: String,
    /// The certificate it replaces.
    pub previous: Option<Certificate>,
}

/// A set of domains the gateway can load: what an operator should know about each one's
/// truststore.
#[derive(Debug, Clone, Default)]
pub struct CheckedDomains {
    /// Warnings by hostname.
    pub warnings: Vec<(String, Vec<String>)>,
}

/// What an asynchronous hook returns.
pub type HookFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, String>> + Send + 'a>>;

/// A request to explain a decision.
#[derive(Debug, Clone)]
pub struct ExplainRequest {
    /// The domain (SNI).
    pub domain: String,
    /// The Host header, when it differs from the SNI.
    pub host: Option<String>,
    /// The client's address (policies' `aws:SourceIp`); loopback when not given.
    pub source_ip: Option<std::net::IpAddr>,
    /// The HTTP method.
    pub method: String,
    /// The request path.
    pub path: String,
    /// The presented chain, leaf first.
    pub chain: Vec<Certificate>,
    /// The verification profile to explain under, instead of the domain's.
    pub profile: Option<portcullis_pki::VerifyProfile>,
}

/// The API's state.
#[derive(Clone)]
pub struct Api {
    store: Store,
    issuer: Option<Arc<CaIssuer>>,
    hooks: Arc<dyn Hooks>,
    sessions: Arc<console::Sessions>,
    /// Seals private keys before they are stored (server certificates); none: refused.
    cluster_key: Option<Arc<portcullis_registry::sealed::ClusterKey>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").finish_non_exhaustive()
    }
}

impl Api {
    /// An API over `store`; `issuer` (the local CA) signs certificates made through the API.
    pub fn new(store: Store, issuer: Option<Arc<CaIssuer>>, hooks: Arc<dyn Hooks>) -> Api {
        Api {
            store,
            issuer,
            hooks,
            sessions: Arc::default(),
            cluster_key: None,
        }
    }

    /// With the cluster key that seals private keys before they are stored.
    pub fn with_cluster_key(
        mut self,
        key: Option<Arc<portcullis_registry::sealed::ClusterKey>>,
    ) -> Api {
        self.cluster_key = key;
        self
    }
}

/// Who made a request: set by the listener for a verified admin certificate, or by the token
/// check. Audit entries name it.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

/// The admin certificate a connection presented (verified by the handshake), if any.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub Option<AdminPeer>);

/// A verified admin client certificate: its name (CN) and id (SHA-256 of the DER, hex).
#[derive(Debug, Clone)]
pub struct AdminPeer {
    /// The CN, or the subject.
    pub name: String,
    /// The certificate id.
    pub id: String,
}

impl Api {
    /// The caller a verified admin certificate stands for, unless it is revoked (checked on
    /// every request, so a revocation applies to open connections at once).
    pub(crate) async fn admin_caller(
        &self,
        peer: Option<&AdminPeer>,
    ) -> Result<Option<String>, ApiError> {
        let Some(peer) = peer else {
            return Ok(None);
        };
        if self.store.admin_certificate_revoked(&peer.id).await? {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "admin-certificate-revoked",
                "this admin client certificate was revoked (rotated); use the current one from the data dir, or a token",
            ));
        }
        Ok(Some(format!("admin-cert:{}", peer.name)))
    }
}

/// The routes, with authentication on all but `/healthz`.
pub fn router(api: Api) -> Router {
    let authenticated = Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_document))
        .route("/v1/registration-code", get(registration_code))
        .route("/v1/cas", get(list_cas).post(register_ca))
        .route("/v1/cas/{id}", get(describe_ca).patch(update_ca))
        .route(
            "/v1/certificates",
            get(list_certificates).post(create_certificate),
        )
        .route("/v1/certificates/batch", post(register_batch))
        .route("/v1/renewal", get(certificates::renewal))
        .route(
            "/v1/certificates/{id}/renew",
            post(certificates::renew_certificate),
        )
        .route(
            "/v1/certificates/{id}/claim",
            axum::routing::put(fleet::set_claim).delete(fleet::clear_claim),
        )
        .route(
            "/v1/provisioning-templates",
            get(fleet::list_templates).post(fleet::create_template),
        )
        .route(
            "/v1/provisioning-templates/{name}/enrollment-codes",
            post(fleet::enrollment_codes),
        )
        .route(
            "/v1/provisioning-templates/{name}",
            get(fleet::describe_template)
                .patch(fleet::update_template)
                .delete(fleet::delete_template),
        )
        .route("/v1/enrollments", post(enroll::enroll))
        .route("/v1/enrollments/scep", post(enroll::scep_profile))
        .route(
            "/v1/certificates/{id}",
            get(describe_certificate)
                .patch(update_certificate)
                .delete(delete_certificate),
        )
        .route("/v1/things", get(list_things).post(create_thing))
        .route(
            "/v1/things/{name}",
            get(describe_thing).patch(update_thing).delete(delete_thing),
        )
        .route(
            "/v1/things/{name}/certificates/{id}",
            put(attach).delete(detach),
        )
        .route(
            "/v1/truststores",
            get(list_truststores).post(create_truststore),
        )
        .route(
            "/v1/truststores/{name}",
            get(describe_truststore).delete(delete_truststore),
        )
        .route("/v1/truststores/{name}/preview", post(preview_bundle))
        .route(
            "/v1/truststores/{name}/versions",
            post(add_truststore_version),
        )
        .route(
            "/v1/truststores/{name}/versions/{version}",
            get(truststore_version),
        )
        .route(
            "/v1/truststores/{name}/versions/{version}/preview",
            get(preview),
        )
        .route("/v1/audit", get(audit))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(delete_token))
        .route("/v1/admin/certificates", get(list_admin_certificates))
        .route(
            "/v1/admin/certificates/rotate",
            post(rotate_admin_certificate),
        )
        .route(
            "/v1/admin/certificates/{id}/revoke",
            post(revoke_admin_certificate),
        )
        .route("/v1/explain", post(explain))
        .route(
            "/v1/policies",
            get(policies::list_policies).post(policies::create_policy),
        )
        .route(
            "/v1/policies/{name}",
            get(policies::describe_policy)
                .patch(policies::update_policy)
                .delete(policies::delete_policy),
        )
        .route(
            "/v1/policies/{name}/versions",
            post(policies::create_policy_version),
        )
        .route(
            "/v1/policies/{name}/versions/{version}",
            axum::routing::delete(policies::delete_policy_version),
        )
        .route(
            "/v1/policies/{name}/targets/{type}/{target}",
            put(policies::attach_policy).delete(policies::detach_policy),
        )
        .route("/v1/simulate", post(policies::simulate))
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/connections", get(list_connections))
        .route("/v1/revocation/sources", get(gateway::revocation_sources))
        .route(
            "/v1/connections/{id}",
            axum::routing::delete(close_connection),
        )
        .route(
            "/v1/sessions/{client_id}",
            axum::routing::delete(close_session),
        )
        .route(
            "/v1/webhooks",
            get(webhooks::list_webhooks).post(webhooks::create_webhook),
        )
        .route(
            "/v1/webhooks/{id}",
            get(webhooks::describe_webhook)
                .patch(webhooks::update_webhook)
                .delete(webhooks::delete_webhook),
        )
        .route(
            "/v1/webhooks/{id}/deliveries",
            get(webhooks::list_deliveries),
        )
        .route("/v1/deliveries/{id}", get(webhooks::describe_delivery))
        .route(
            "/v1/deliveries/{id}/replay",
            post(webhooks::replay_delivery),
        )
        .route("/v1/expiry-check", post(webhooks::expiry_check))
        .route("/v1/cluster", get(cluster::cluster_status))
        .route("/v1/metrics/history", get(metrics_history))
        .route(
            "/v1/cluster/nats-certificates",
            axum::routing::post(cluster::nats_certificate),
        )
        .route("/v1/server-certificates", get(list_server_certificates))
        .route(
            "/v1/server-certificates/{name}",
            get(describe_server_certificate)
                .put(put_server_certificate)
                .delete(delete_server_certificate),
        )
        .route("/v1/domains", get(list_domains))
        .route(
            "/v1/domains/{hostname}",
            get(describe_domain).put(put_domain).delete(delete_domain),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            api.clone(),
            authenticate,
        ));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        // The console's page and assets hold no data; the data comes through the API.
        .route("/ui", get(console::index))
        .route("/ui/", get(console::index))
        .route("/ui/app.js", get(console::script))
        .route("/ui/app.css", get(console::style))
        .route("/ui/login", post(console::login))
        .route("/ui/logout", post(console::logout))
        .route("/ui/session", get(console::session))
        .merge(authenticated)
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no-such-route",
                "no such route; see /openapi.json",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "this route does not take that method; see /openapi.json",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(log_request))
        .with_state(api)
}

/// Serves `router` over HTTPS on `listener` until the task is dropped. Each connection's
/// verified client certificate (if any) reaches the handlers as a [`PeerCertificate`].
pub async fn serve_https(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::error!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            admin_connection(stream, peer, acceptor, router).await;
        });
    }
}

async fn admin_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    router: Router,
) {
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(target: "portcullis::admin", peer = %peer, error = %e, "admin TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let subject = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| Certificate::from_der(c.to_vec()).ok())
        .map(|c| AdminPeer {
            name: c
                .subject_attribute("CN")
                .unwrap_or_else(|| c.info().subject.clone()),
            id: c.info().id.clone(),
        });
    let service = hyper_util::service::TowerToHyperService::new(
        router.layer(Extension(PeerCertificate(subject))),
    );
    let builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection(hyper_util::rt::TokioIo::new(Lingering::new(tls)), service)
        .await
    {
        tracing::debug!(target: "portcullis::admin", peer = %peer, error = %e, "admin connection ended");
    }
}

/// How long, and how much, a client is read after the last answer before the socket closes.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// A stream whose shutdown lingers: the write side is shut, then what the client still sends
/// (the rest of a body refused with 413, say) is read and discarded, for at most [`LINGER`] and
/// [`LINGER_BYTES`], so that no reset destroys the answer before the client reads it (as the
/// gateway's connections close).
struct Lingering<S> {
    inner: S,
    draining: Option<(std::pin::Pin<Box<tokio::time::Sleep>>, bool, usize)>,
}

impl<S> Lingering<S> {
    fn new(inner: S) -> Self {
        Lingering {
            inner,
            draining: None,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Lingering<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for Lingering<S>
{
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        let (until, shut, read) = this
            .draining
            .get_or_insert_with(|| (Box::pin(tokio::time::sleep(LINGER)), false, 0));
        if std::future::Future::poll(until.as_mut(), cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        if !*shut {
            std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_shutdown(cx))?;
            *shut = true;
        }
        let mut scratch = [0u8; 8192];
        loop {
            if *read >= LINGER_BYTES {
                return Poll::Ready(Ok(()));
            }
            let mut buf = tokio::io::ReadBuf::new(&mut scratch);
            match std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => *read += buf.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Admits a request with a verified admin certificate or a valid bearer token.
async fn authenticate(State(api): State<Api>, mut req: Request, next: Next) -> Response {
    if let Some(e) = console::cross_site(req.method(), req.headers()) {
        return e.into_response();
    }
    let peer = req
        .extensions()
        .get::<PeerCertificate>()
        .and_then(|p| p.0.clone());
    let from_cert = match api.admin_caller(peer.as_ref()).await {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    // A console session (cookie), when the request has no token: its CSRF token must come
    // with every state-changing request.
    let from_session = match console::session_cookie(req.headers()) {
        Some(id) if bearer(req.headers()).is_none() => match api.sessions.check(id) {
            Ok((caller, csrf)) => {
                let safe = matches!(
                    *req.method(),
                    axum::http::Method::GET | axum::http::Method::HEAD
                );
                let echoed = req
                    .headers()
                    .get(console::CSRF_HEADER)
                    .and_then(|v| v.to_str().ok());
                if !safe && echoed != Some(csrf.as_str()) {
                    return ApiError::new(
                        StatusCode::FORBIDDEN,
                        "csrf-token",
                        "the request lacks the console's CSRF token (X-CSRF-Token); reload the console",
                    )
                    .into_response();
                }
                Some(caller)
            }
            Err(console::SessionError::Expired) if from_cert.is_none() => {
                return console::expired().into_response();
            }
            Err(_) => None,
        },
        _ => None,
    };
    let caller = match (from_session.or(from_cert), bearer(req.headers())) {
        (_, Some(Err(e))) => return e.into_response(),
        (_, Some(Ok(secret))) => match api.store.token_by_secret(secret).await {
            Ok(Some(token)) => format!("token:{}", token.name),
            Ok(None) => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid-token",
                    "the bearer token is not valid (unknown or deleted); make one with `portcullis admin token create`",
                )
                .into_response();
            }
            Err(e) => return ApiError::from(e).into_response(),
        },
        (Some(caller), None) => caller,
        (None, None) => {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "present the admin client certificate or an `Authorization: Bearer <token>` header",
            )
            .into_response();
        }
    };
    req.extensions_mut().insert(Caller(caller.clone()));
    let mut response = next.run(req).await;
    response.extensions_mut().insert(Caller(caller));
    response
}

/// One log line per admin request: who, what, the answer.
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    let caller = response
        .extensions()
        .get::<Caller>()
        .map(|c| c.0.clone())
        .unwrap_or_default();
    tracing::info!(
        target: "portcullis::admin",
        method = %method,
        path,
        status = response.status().as_u16(),
        caller,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        "admin request"
    );
    response
}

fn bearer(headers: &HeaderMap) -> Option<Result<&str, ApiError>> {
    let value = headers.get(header::AUTHORIZATION)?;
    let bad = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid-token",
            "the Authorization header must be `Bearer <token>`",
        )
    };
    Some(
        value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(bad),
    )
}

// ---------------------------------------------------------------------------------------------
// Errors and extractors

/// An API error: `{"code", "message", "details"}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Value,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Value::Null,
        }
    }

    fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", message)
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match e {
            RegistryError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid", m),
            RegistryError::NotFound(what) => ApiError::new(
                StatusCode::NOT_FOUND,
                "not-found",
                format!("{what} not found"),
            ),
            RegistryError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            RegistryError::Pki(e) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid-certificate",
                e.to_string(),
            ),
            other if other.is_unavailable() => {
                tracing::warn!(target: "portcullis::admin", error = %other, "the registry database cannot be reached");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "registry-unavailable",
                    "the registry database cannot be reached; the request was not carried out, retry when it is back",
                )
            }
            other => {
                tracing::error!(target: "portcullis::admin", error = %other, "registry store failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the registry store failed; the server log has the cause",
                )
            }
        }
    }
}

impl From<portcullis_pki::PkiError> for ApiError {
    fn from(e: portcullis_pki::PkiError) -> ApiError {
        ApiError::from(RegistryError::Pki(e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"code": self.code, "message": self.message, "details": self.details});
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T = Json<Value>> = Result<T, ApiError>;

/// A JSON body whose rejections are API errors (malformed JSON, wrong fields, too large).
struct Body<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(rejection) => {
                let status = rejection.status();
                let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "too-large"
                } else {
                    "invalid-json"
                };
                Err(ApiError::new(status, code, rejection.body_text()))
            }
        }
    }
}

/// Query parameters whose rejections are API errors.
struct Params<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Params(v))
            .map_err(|r| ApiError::invalid(r.body_text()))
    }
}

fn cert_id(id: &str) -> Result<CertId, ApiError> {
    CertId::from_str(id).map_err(ApiError::from)
}

fn to_json<T: serde::Serialize>(value: &T) -> Json<Value> {
    Json(serde_json::to_value(value).unwrap_or(Value::Null))
}

/// `null` and absent told apart: `Some(None)` is an explicit null.
fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

// ---------------------------------------------------------------------------------------------
// Health, metrics, documentation

async fn readyz(State(api): State<Api>) -> Response {
    if api.hooks.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(api): State<Api>) -> String {
    api.hooks.metrics()
}

async fn metrics_history(State(api): State<Api>) -> Json<Value> {
    Json(api.hooks.metrics_history())
}

async fn openapi_document() -> Json<Value> {
    Json(openapi::document())
}
