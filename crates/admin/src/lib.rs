//! The admin REST API: JSON over HTTPS on its own listener, authenticated by an admin client
//! certificate (verified in the TLS handshake against the admin CA) or a bearer token (stored
//! hashed). Only `/healthz` answers without one of them.
//!
//! Every error is `{"code", "message", "details"}` with a 4xx status for the caller's mistakes;
//! failures of ours are 500 with a public message, the cause going to the log only.
//! [`openapi`] describes exactly the routes [`router`] serves (a test checks both ways).
//!
//! Modules: the crate root (router, authentication, errors, most resources), `console` (the
//! web console and its sessions), `enroll` (device enrollment), `policies`, `webhooks`.
//! Invariants: the API never answers unauthenticated except `/healthz`; every write goes
//! through the `Store` (one transaction with its audit entry); what the node owns (metrics,
//! explain, checking domains) comes through [`Hooks`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use portcullis_pki::verify::{Usage, Verdict, VerifyOptions, verify};
use portcullis_pki::{CaIssuer, Certificate, IssueRequest, KeyType, PrivateKey, Profile};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use portcullis_registry::store::{AuditFilter, CaRegistration, CaUpdate, CertFilter};
use portcullis_registry::{
    CaStatus, CertId, CertStatus, DomainSpec, ProvisioningTemplate, RegistryError, Store,
};

mod console;
pub mod enroll;
pub mod openapi;
mod policies;
mod webhooks;

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
    /// Checks that the gateway can load exactly these domains (hostname → specification, as the
    /// configuration file's `[[domain]]` tables spell them): every key known, every file
    /// readable, every truststore resolvable. Returns the specifications with defaults filled in,
    /// in the same order, or one line naming what is wrong. Nothing is stored unless this passes.
    fn check_domains<'a>(
        &'a self,
        domains: &'a [(String, DomainSpec)],
    ) -> HookFuture<'a, CheckedDomains>;
    /// The MQTT sessions (`{"items": [...]}`).
    fn mqtt_sessions(&self) -> Value;
    /// Closes an MQTT session's connection (and with `forget`, the stored session); whether
    /// there was one.
    fn close_mqtt_session(&self, client_id: &str, forget: bool) -> bool;
    /// The open HTTP connections (`{"items": [...]}`).
    fn live_connections(&self) -> Value;
    /// Closes an open HTTP connection; whether it was open.
    fn close_connection(&self, id: u64) -> bool;
    /// The admin client certificate in this node's data dir, if any.
    fn admin_certificate(&self) -> Option<Certificate>;
    /// Issues a new admin client certificate with this node's admin CA and puts it in the data
    /// dir in place of the current one (every file or none); the new credentials and the
    /// certificate they replace.
    fn rotate_admin_certificate(&self) -> Result<RotatedAdmin, String>;
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
        }
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
        .route("/v1/enrollments", post(enroll::enroll))
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
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(target: "portcullis::admin", peer = %peer, error = %e, "admin connection ended");
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

async fn openapi_document() -> Json<Value> {
    Json(openapi::document())
}

// ---------------------------------------------------------------------------------------------
// CAs

async fn registration_code(State(api): State<Api>) -> ApiResult {
    Ok(Json(
        json!({"registration_code": api.store.registration_code().await?}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterCa {
    certificate_pem: String,
    verification_certificate_pem: Option<String>,
    #[serde(default)]
    allow_unverified: bool,
    #[serde(default)]
    activate: bool,
    #[serde(default)]
    auto_registration: bool,
    provisioning_template: Option<Value>,
}

async fn register_ca(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<RegisterCa>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let template = req
        .provisioning_template
        .as_ref()
        .map(ProvisioningTemplate::from_json)
        .transpose()?;
    let record = api
        .store
        .register_ca(
            CaRegistration {
                certificate: req.certificate_pem.as_bytes(),
                verification: req
                    .verification_certificate_pem
                    .as_deref()
                    .map(str::as_bytes),
                allow_unverified: req.allow_unverified,
                activate: req.activate,
                auto_registration: req.auto_registration,
                provisioning_template: template,
            },
            &caller,
        )
        .await?;
    Ok((StatusCode::CREATED, to_json(&record)))
}

async fn list_cas(State(api): State<Api>) -> ApiResult {
    Ok(Json(json!({"items": api.store.list_cas().await?})))
}

async fn describe_ca(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    Ok(to_json(&api.store.ca(&cert_id(&id)?).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateCa {
    status: Option<String>,
    auto_registration: Option<bool>,
    #[serde(default, deserialize_with = "double_option")]
    provisioning_template: Option<Option<Value>>,
    #[serde(default)]
    revoke_issued: bool,
}

async fn update_ca(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
    Body(req): Body<UpdateCa>,
) -> ApiResult {
    let update = CaUpdate {
        status: req.status.as_deref().map(CaStatus::from_str).transpose()?,
        auto_registration: req.auto_registration,
        provisioning_template: req
            .provisioning_template
            .map(|t| t.as_ref().map(ProvisioningTemplate::from_json).transpose())
            .transpose()?,
        revoke_issued: req.revoke_issued,
    };
    let (record, revoked) = api
        .store
        .update_ca(&cert_id(&id)?, &update, &caller)
        .await?;
    let mut body = serde_json::to_value(&record).unwrap_or(Value::Null);
    body["revoked_certificates"] = json!(revoked);
    Ok(Json(body))
}

// ---------------------------------------------------------------------------------------------
// Certificates

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateCertificate {
    /// Register this certificate.
    certificate_pem: Option<String>,
    /// Or sign this CSR with the local CA.
    csr_pem: Option<String>,
    /// Or make a key and a certificate for this common name with the local CA.
    common_name: Option<String>,
    key_type: Option<String>,
    days: Option<u32>,
    status: Option<String>,
    /// Issue a subject whose CN, O, OU or C holds `/ + # * ? $` (policies never substitute
    /// such a value).
    #[serde(default)]
    allow_separators: bool,
}

/// Refuses to issue `cert` when a subject value policies read holds a separator or wildcard,
/// unless the operator asked for it.
pub(crate) fn check_separators(cert: &Certificate, allowed: bool) -> Result<(), ApiError> {
    match cert.subject_separator() {
        Some((attribute, c)) if !allowed => Err(ApiError::invalid(format!(
            "the subject's {attribute} holds {:?}, which policies read as a separator or wildcard: a policy using ${{cert:Subject.{attribute}}} would never match this certificate; choose another value, or set allow_separators (--allow-separators) if you mean it",
            c
        ))),
        _ => Ok(()),
    }
}

/// Certificates accepted in one batch request.
pub const MAX_BATCH: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBatch {
    /// PEM (or base64 DER in PEM armour) of each certificate.
    certificates_pem: Vec<String>,
    status: Option<String>,
}

/// Registers up to [`MAX_BATCH`] certificates in one transaction; each item's outcome in order.
async fn register_batch(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<RegisterBatch>,
) -> ApiResult {
    if req.certificates_pem.is_empty() || req.certificates_pem.len() > MAX_BATCH {
        return Err(ApiError::invalid(format!(
            "certificates_pem must hold 1 to {MAX_BATCH} certificates"
        )));
    }
    let status = match req.status.as_deref() {
        None => CertStatus::Inactive,
        Some(s) => CertStatus::from_str(s)?,
    };
    let pems: Vec<&[u8]> = req.certificates_pem.iter().map(|p| p.as_bytes()).collect();
    let results = api
        .store
        .register_certificates(&pems, status, &caller)
        .await?;
    let (mut registered, mut existing, mut failed) = (0, 0, 0);
    let items: Vec<Value> = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| match r {
            Ok(record) => {
                registered += 1;
                json!({"index": index, "outcome": "registered", "id": record.id})
            }
            Err(RegistryError::Conflict(m)) => {
                existing += 1;
                json!({"index": index, "outcome": "exists", "message": m})
            }
            Err(e) => {
                failed += 1;
                json!({"index": index, "outcome": "invalid", "message": e.to_string()})
            }
        })
        .collect();
    Ok(Json(json!({
        "registered": registered, "existing": existing, "invalid": failed, "items": items,
    })))
}

async fn create_certificate(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<CreateCertificate>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let status = match req.status.as_deref() {
        None => CertStatus::Inactive,
        Some(s) => CertStatus::from_str(s)?,
    };
    let issuer = || {
        api.issuer.clone().ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "no-local-ca",
                "this registry has no local CA to issue with; register certificates instead",
            )
        })
    };
    let request = |cn: Option<&str>| -> Result<IssueRequest, ApiError> {
        let subject = portcullis_pki::SubjectName::cn(cn.unwrap_or("device"));
        let mut r = IssueRequest::new(Profile::Client, subject);
        if let Some(days) = req.days {
            if days == 0 || days > 3650 {
                return Err(ApiError::invalid("days must be between 1 and 3650"));
            }
            r.days = days;
        }
        Ok(r)
    };
    let chosen = [
        req.certificate_pem.is_some(),
        req.csr_pem.is_some(),
        req.common_name.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if chosen != 1 {
        return Err(ApiError::invalid(
            "give exactly one of certificate_pem (register), csr_pem (sign a CSR with the local CA) or common_name (make a key and certificate)",
        ));
    }
    let mut private_key = None;
    let pem = if let Some(pem) = &req.certificate_pem {
        pem.clone()
    } else if let Some(csr) = &req.csr_pem {
        let issuer = issuer()?;
        let r = request(None)?;
        let cert = portcullis_pki::issue::sign_csr(csr.as_bytes(), &r, &issuer)?;
        check_separators(&cert, req.allow_separators)?;
        cert.to_pem()
    } else {
        let issuer = issuer()?;
        let cn = req.common_name.as_deref().unwrap_or_default();
        if cn.is_empty() || cn.len() > 64 {
            return Err(ApiError::invalid("common_name must be 1-64 characters"));
        }
        let key_type = match req.key_type.as_deref() {
            None => KeyType::EcP256,
            Some(k) => KeyType::from_str(k)?,
        };
        let key = PrivateKey::generate(key_type)?;
        let cert = portcullis_pki::issue::issue(&request(Some(cn))?, &key, Some(&issuer))?;
        check_separators(&cert, req.allow_separators)?;
        private_key = Some(key.to_pem());
        cert.to_pem()
    };
    let record = api
        .store
        .register_certificate(pem.as_bytes(), status, &caller)
        .await?;
    let mut body = serde_json::to_value(&record).unwrap_or(Value::Null);
    if let Some(issuer) = (req.certificate_pem.is_none())
        .then_some(api.issuer.as_ref())
        .flatten()
    {
        let chain: String = issuer.chain().iter().map(Certificate::to_pem).collect();
        body["chain_pem"] = json!(format!("{}{chain}", record.pem));
    }
    if let Some(key) = private_key {
        // Returned once; the registry never stores it.
        body["private_key_pem"] = json!(key);
    }
    Ok((StatusCode::CREATED, Json(body)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListCertificates {
    status: Option<String>,
    ca: Option<String>,
    thing: Option<String>,
    expiring_before: Option<i64>,
    limit: Option<u32>,
    after: Option<String>,
}

async fn list_certificates(
    State(api): State<Api>,
    Params(q): Params<ListCertificates>,
) -> ApiResult {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 1000"));
    }
    let filter = CertFilter {
        status: q.status.as_deref().map(CertStatus::from_str).transpose()?,
        ca: q.ca.as_deref().map(cert_id).transpose()?,
        thing: q.thing,
        expiring_before: q.expiring_before,
        limit: Some(limit),
        after: q.after.as_deref().map(cert_id).transpose()?,
    };
    let items = api.store.list_certificates(&filter).await?;
    let next = (items.len() == limit as usize)
        .then(|| items.last().map(|c| c.id.to_string()))
        .flatten();
    Ok(Json(json!({"items": items, "next": next})))
}

/// A certificate's record, with its decoded fields (as `pki inspect`), the registered CA it
/// chains to, and the policies that apply to it (attached to it, its things or its CA).
async fn describe_certificate(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    let record = api.store.certificate(&cert_id(&id)?).await?;
    let mut body = serde_json::to_value(&record).unwrap_or(Value::Null);
    let leaf = Certificate::all_from_pem_or_der(record.pem.as_bytes())
        .ok()
        .and_then(|c| c.into_iter().next());
    if let Some(cert) = &leaf {
        body["decoded"] = serde_json::to_value(cert.info()).unwrap_or(Value::Null);
    }
    let mut chain = Vec::new();
    if let Some(ca_id) = &record.ca_id
        && let Ok(ca) = api.store.ca(ca_id).await
    {
        chain.push(json!({"id": ca.id, "subject": ca.subject, "status": ca.status, "not_after": ca.not_after, "verified": ca.verified}));
    }
    body["ca_chain"] = json!(chain);
    // The policies attached to the certificate, its things and its CA, as a policy context
    // lists them (each once, where it is first attached).
    let none = BTreeMap::new();
    let things: Vec<(&str, &BTreeMap<String, String>)> =
        record.things.iter().map(|t| (t.as_str(), &none)).collect();
    let subject = leaf
        .as_ref()
        .map(|leaf| portcullis_policy::context::Subject {
            leaf,
            id: record.id.as_str(),
            things: &things,
            ca: record.ca_id.as_ref().map(CertId::as_str),
        });
    let targets = portcullis_policy::context::targets(subject.as_ref(), None);
    let mut attached = policies::attached_to(&api, &targets).await?;
    let policies: Vec<Value> = portcullis_policy::context::applicable(&targets, |t| {
        attached.remove(t).unwrap_or_default()
    })
    .into_iter()
    .map(|(name, via)| json!({"name": name, "attached_to": via.describe()}))
    .collect();
    body["policies"] = json!(policies);
    Ok(Json(body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateCertificate {
    status: String,
}

async fn update_certificate(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
    Body(req): Body<UpdateCertificate>,
) -> ApiResult {
    let status = CertStatus::from_str(&req.status)?;
    Ok(to_json(
        &api.store
            .set_certificate_status(&cert_id(&id)?, status, &caller)
            .await?,
    ))
}

async fn delete_certificate(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    api.store
        .delete_certificate(&cert_id(&id)?, &caller)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Things

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateThing {
    name: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

async fn create_thing(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<CreateThing>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let thing = api
        .store
        .create_thing(&req.name, &req.attributes, &caller)
        .await?;
    Ok((StatusCode::CREATED, to_json(&thing)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    after: Option<String>,
    limit: Option<u32>,
}

async fn list_things(State(api): State<Api>, Params(q): Params<Page>) -> ApiResult {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let items = api.store.list_things(q.after.as_deref(), limit).await?;
    let next = (items.len() == limit as usize)
        .then(|| items.last().map(|t| t.name.clone()))
        .flatten();
    Ok(Json(json!({"items": items, "next": next})))
}

async fn describe_thing(State(api): State<Api>, Path(name): Path<String>) -> ApiResult {
    Ok(to_json(&api.store.thing(&name).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateThing {
    /// Attributes to set; `null` removes one.
    attributes: BTreeMap<String, Option<String>>,
}

async fn update_thing(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
    Body(req): Body<UpdateThing>,
) -> ApiResult {
    Ok(to_json(
        &api.store
            .update_thing(&name, &req.attributes, &caller)
            .await?,
    ))
}

async fn delete_thing(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    api.store.delete_thing(&name, &caller).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Attach {
    #[serde(default)]
    exclusive: bool,
}

async fn attach(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path((name, id)): Path<(String, String)>,
    Params(q): Params<Attach>,
) -> ApiResult {
    api.store
        .attach(&name, &cert_id(&id)?, q.exclusive, &caller)
        .await?;
    Ok(to_json(&api.store.thing(&name).await?))
}

async fn detach(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult {
    api.store.detach(&name, &cert_id(&id)?, &caller).await?;
    Ok(to_json(&api.store.thing(&name).await?))
}

// ---------------------------------------------------------------------------------------------
// Truststores

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTruststore {
    name: String,
    bundle_pem: String,
    #[serde(default)]
    crls_pem: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddVersion {
    bundle_pem: String,
    #[serde(default)]
    crls_pem: Vec<String>,
}

async fn create_truststore(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<CreateTruststore>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let v = api
        .store
        .add_truststore_version(&req.name, &req.bundle_pem, &req.crls_pem, true, &caller)
        .await?;
    Ok((StatusCode::CREATED, to_json(&v)))
}

async fn add_truststore_version(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
    Body(req): Body<AddVersion>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let v = api
        .store
        .add_truststore_version(&name, &req.bundle_pem, &req.crls_pem, false, &caller)
        .await?;
    // The domains that follow the latest version use it from now on: what they should know
    // (a CA deeper than their max_chain_depth, a profile's accommodation) comes with the answer.
    let following: Vec<(String, DomainSpec)> = domains_using(&api, &name)
        .await?
        .into_iter()
        .filter(|(_, spec)| spec.truststore() == Some(&format!("registry:{name}")))
        .collect();
    let mut out = to_json(&v).0;
    if !following.is_empty() {
        let all: Vec<(String, DomainSpec)> = api
            .store
            .list_domains()
            .await?
            .into_iter()
            .map(|d| (d.hostname, d.spec))
            .collect();
        let checked = api.hooks.check_domains(&all).await.map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-domain",
                format!(
                    "the version is stored, but the domains that follow it cannot be loaded: {e}"
                ),
            )
        })?;
        let warnings: serde_json::Map<String, Value> = checked
            .warnings
            .into_iter()
            .filter(|(h, w)| !w.is_empty() && following.iter().any(|(f, _)| f == h))
            .map(|(h, w)| (h, json!(w)))
            .collect();
        if let Some(o) = out.as_object_mut() {
            o.insert("domain_warnings".into(), Value::Object(warnings));
        }
    }
    Ok((StatusCode::CREATED, Json(out)))
}

async fn list_truststores(State(api): State<Api>) -> ApiResult {
    let items: Vec<Value> = api
        .store
        .list_truststores()
        .await?
        .into_iter()
        .map(|(name, latest)| json!({"name": name, "latest_version": latest}))
        .collect();
    Ok(Json(json!({"items": items})))
}

async fn describe_truststore(State(api): State<Api>, Path(name): Path<String>) -> ApiResult {
    Ok(version_json(
        &api.store.truststore_version(&name, None).await?,
    ))
}

/// A truststore version with its certificates decoded (subject, id, validity, role).
fn version_json(v: &portcullis_registry::TruststoreVersion) -> Json<Value> {
    let mut out = serde_json::to_value(v).unwrap_or(Value::Null);
    let certificates: Vec<Value> = portcullis_pki::Truststore::from_pem(v.bundle.as_bytes())
        .map(|store| {
            store
                .entries()
                .iter()
                .map(|e| {
                    let info = e.certificate.info();
                    json!({
                        "index": e.index,
                        "subject": info.subject,
                        "issuer": info.issuer,
                        "id": info.id,
                        "not_after": info.not_after,
                        "role": if e.anchor { "anchor" } else { "intermediate" },
                        "duplicate": e.duplicate,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    if let Some(o) = out.as_object_mut() {
        o.insert("certificates".into(), Value::Array(certificates));
    }
    Json(out)
}

/// The domains whose truststore is `registry:NAME` or `registry:NAME@VERSION`, with their
/// specification.
async fn domains_using(api: &Api, name: &str) -> Result<Vec<(String, DomainSpec)>, ApiError> {
    let exact = format!("registry:{name}");
    let pinned = format!("registry:{name}@");
    Ok(api
        .store
        .list_domains()
        .await?
        .into_iter()
        .filter(|d| {
            d.spec
                .truststore()
                .is_some_and(|t| t == exact || t.starts_with(&pinned))
        })
        .map(|d| (d.hostname, d.spec))
        .collect())
}

async fn delete_truststore(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    let users = domains_using(&api, &name).await?;
    if !users.is_empty() {
        let names: Vec<&str> = users.iter().map(|(h, _)| h.as_str()).collect();
        return Err(ApiError::from(RegistryError::Conflict(format!(
            "truststore '{name}' is used by {}; point those domains at another truststore first",
            names.join(", ")
        ))));
    }
    api.store.delete_truststore(&name, &caller).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn version_number(version: &str) -> Result<i64, ApiError> {
    version
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| ApiError::invalid(format!("version '{version}' must be a number from 1")))
}

async fn truststore_version(
    State(api): State<Api>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult {
    let v = version_number(&version)?;
    Ok(version_json(
        &api.store.truststore_version(&name, Some(v)).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewParams {
    days: Option<u32>,
}

/// Impact preview: the certificates seen in the last N days that this version would reject,
/// with the reasons, checked as the gateway checks them.
async fn preview(
    State(api): State<Api>,
    Path((name, version)): Path<(String, String)>,
    Params(q): Params<PreviewParams>,
) -> ApiResult {
    let v = version_number(&version)?;
    let tv = api.store.truststore_version(&name, Some(v)).await?;
    let mut out = impact(&api, &name, Some(v), &tv.bundle, &tv.crls, q.days).await?;
    if let Some(o) = out.as_object_mut() {
        o.insert("version".into(), json!(v));
        o.insert("warnings".into(), json!(tv.warnings));
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewBundle {
    bundle_pem: String,
    #[serde(default)]
    crls_pem: Vec<String>,
    days: Option<u32>,
}

/// Impact preview of a bundle not stored yet, on the domains that use truststore `name`.
async fn preview_bundle(
    State(api): State<Api>,
    Path(name): Path<String>,
    Body(req): Body<PreviewBundle>,
) -> ApiResult {
    let mut out = impact(&api, &name, None, &req.bundle_pem, &req.crls_pem, req.days).await?;
    let store = portcullis_pki::Truststore::from_pem(req.bundle_pem.as_bytes())?;
    let mut warnings: Vec<String> = store
        .store_warnings()
        .iter()
        .map(|w| w.to_string())
        .collect();
    for e in store.entries() {
        for w in &e.warnings {
            warnings.push(format!(
                "certificate #{} ({}): {w}",
                e.index,
                e.certificate.info().subject
            ));
        }
    }
    if let Some(o) = out.as_object_mut() {
        o.insert("version".into(), json!("bundle"));
        o.insert("warnings".into(), json!(warnings));
    }
    Ok(Json(out))
}

/// The certificates seen in the last `days` days on the domains that use truststore `name`
/// that `bundle` (with `crls`) would reject, checked as each domain checks them (its profile,
/// chain depth and CRL policy).
async fn impact(
    api: &Api,
    name: &str,
    version: Option<i64>,
    bundle: &str,
    crls: &[String],
    days: Option<u32>,
) -> Result<Value, ApiError> {
    let days = days.unwrap_or(30);
    if !(1..=3650).contains(&days) {
        return Err(ApiError::invalid("days must be between 1 and 3650"));
    }
    let store = portcullis_pki::Truststore::from_pem(bundle.as_bytes())?;
    let mut parsed = Vec::new();
    for c in crls {
        parsed.extend(portcullis_pki::crl::Crl::all_from_pem_or_der(c.as_bytes())?);
    }
    // The domains a version reaches: those that follow the latest, and those pinned to it.
    let pinned = version.map(|v| format!("registry:{name}@{v}"));
    let latest = format!("registry:{name}");
    let domains: Vec<(String, DomainSpec)> = domains_using(api, name)
        .await?
        .into_iter()
        .filter(|(_, spec)| {
            let t = spec.truststore().unwrap_or_default();
            t == latest || pinned.as_deref() == Some(t)
        })
        .collect();
    let options_of = |spec: &DomainSpec| {
        let mtls = spec.mtls.as_ref();
        let profile = mtls
            .and_then(|m| m.verification.parse::<portcullis_pki::VerifyProfile>().ok())
            .unwrap_or_default();
        VerifyOptions {
            usage: Usage::Client,
            crls: parsed.clone(),
            max_depth: mtls.map_or(4, |m| m.max_chain_depth),
            allow_stale_crls: mtls.is_some_and(|m| m.stale_crl == "allow"),
            ..VerifyOptions::for_profile(profile)
        }
    };
    let options: BTreeMap<&str, VerifyOptions> = domains
        .iter()
        .map(|(host, spec)| (host.as_str(), options_of(spec)))
        .collect();
    let since = time::OffsetDateTime::now_utc().unix_timestamp() - i64::from(days) * 86_400;
    let seen: Vec<_> = api
        .store
        .seen_since(since)
        .await?
        .into_iter()
        .filter(|(_, domain, _)| options.contains_key(domain.as_str()))
        .collect();
    let rejected: Vec<Value> = seen
        .iter()
        .filter_map(|(cert, domain, last_seen)| {
            let options = options.get(domain.as_str())?;
            match verify(cert, &[], &store, options) {
                Verdict::Valid { .. } => None,
                Verdict::Rejected {
                    reason,
                    explanation,
                } => Some(json!({
                    "certificate_id": cert.info().id,
                    "subject": cert.info().subject,
                    "domain": domain,
                    "last_seen": last_seen,
                    "reason": reason.code(),
                    "explanation": explanation,
                })),
            }
        })
        .collect();
    Ok(json!({
        "truststore": name,
        "domains": domains.iter().map(|(h, _)| h.clone()).collect::<Vec<_>>(),
        "days": days,
        "checked": seen.len(),
        "would_reject": rejected.len(),
        "rejected": rejected,
    }))
}

// ---------------------------------------------------------------------------------------------
// Audit, tokens, explain

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    action: Option<String>,
    target: Option<String>,
    before: Option<i64>,
    limit: Option<u32>,
}

async fn audit(State(api): State<Api>, Params(q): Params<AuditParams>) -> ApiResult {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let items = api
        .store
        .audit_log(&AuditFilter {
            action: q.action,
            target: q.target,
            before: q.before,
            limit: Some(limit),
        })
        .await?;
    let next = (items.len() == limit as usize)
        .then(|| items.last().map(|e| e.seq))
        .flatten();
    Ok(Json(json!({"items": items, "next": next})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    name: String,
}

async fn create_token(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Body(req): Body<CreateToken>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let (record, secret) = api.store.create_token(&req.name, &caller).await?;
    let mut body = serde_json::to_value(&record).unwrap_or(Value::Null);
    // Shown once; only its hash is stored.
    body["token"] = json!(secret);
    Ok((StatusCode::CREATED, Json(body)))
}

async fn list_admin_certificates(State(api): State<Api>) -> ApiResult {
    let current = api.hooks.admin_certificate().map(|c| c.info().id.clone());
    Ok(Json(json!({
        "current": current,
        "items": api.store.admin_certificates().await?,
    })))
}

async fn rotate_admin_certificate(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let rotated = api
        .hooks
        .rotate_admin_certificate()
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "no-admin-ca", e))?;
    api.store
        .record_admin_certificate(&rotated.certificate, &caller)
        .await?;
    if let Some(previous) = &rotated.previous {
        let p = previous.info();
        api.store
            .revoke_admin_certificate(&p.id, &p.subject, p.not_after_unix(), &caller)
            .await?;
    }
    let info = rotated.certificate.info();
    let p12_base64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&rotated.p12)
    };
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": info.id,
            "subject": info.subject,
            "not_after": info.not_after,
            "certificate_pem": rotated.certificate.to_pem(),
            "chain_pem": rotated.chain_pem,
            // Returned once; the node keeps its copy in the data dir (0600).
            "private_key_pem": rotated.key_pem,
            "p12_base64": p12_base64,
            "p12_password": rotated.p12_password,
            "revoked": rotated.previous.map(|p| p.info().id.clone()),
        })),
    ))
}

async fn revoke_admin_certificate(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let current = api.hooks.admin_certificate();
    if current.as_ref().is_some_and(|c| c.info().id == id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "current-admin-certificate",
            "this is the node's current admin certificate: rotate it (`portcullis admin cert rotate`) instead, so a new one replaces it",
        ));
    }
    let known = api
        .store
        .admin_certificates()
        .await?
        .into_iter()
        .find(|r| r.id == id);
    let Some(known) = known else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!(
                "admin certificate {id} is not known here; list them with `portcullis admin cert list`"
            ),
        ));
    };
    api.store
        .revoke_admin_certificate(&known.id, &known.subject, known.not_after, &caller)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_tokens(State(api): State<Api>) -> ApiResult {
    Ok(Json(json!({"items": api.store.list_tokens().await?})))
}

async fn delete_token(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    api.store.delete_token(&id, &caller).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Explain {
    domain: String,
    /// The Host header (default: the domain).
    host: Option<String>,
    /// The client's address (default 127.0.0.1).
    source_ip: Option<String>,
    #[serde(default = "default_method")]
    method: String,
    #[serde(default = "default_path")]
    path: String,
    certificate_pem: String,
    /// Verify under this profile instead of the domain's.
    profile: Option<String>,
}

fn default_method() -> String {
    "GET".into()
}

fn default_path() -> String {
    "/".into()
}

async fn explain(State(api): State<Api>, Body(req): Body<Explain>) -> ApiResult {
    let chain = Certificate::all_from_pem_or_der(req.certificate_pem.as_bytes())?;
    if chain.is_empty() {
        return Err(ApiError::invalid("certificate_pem holds no certificate"));
    }
    if !req.path.starts_with('/') {
        return Err(ApiError::invalid("path must start with '/'"));
    }
    let profile = req
        .profile
        .as_deref()
        .map(str::parse::<portcullis_pki::VerifyProfile>)
        .transpose()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let source_ip = req
        .source_ip
        .as_deref()
        .map(|ip| {
            ip.parse::<std::net::IpAddr>()
                .map_err(|_| ApiError::invalid(format!("source_ip '{ip}' is not an IP address")))
        })
        .transpose()?;
    let request = ExplainRequest {
        domain: req.domain.to_ascii_lowercase(),
        host: req.host.map(|h| h.to_ascii_lowercase()),
        source_ip,
        method: req.method.to_ascii_uppercase(),
        path: req.path,
        chain,
        profile,
    };
    let mut trace = api
        .hooks
        .explain(&request)
        .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, "no-such-domain", e))?;
    // The registry's own view, from the store (the gateway's snapshot follows it within 200 ms).
    let id = CertId::of_der(request.chain[0].der());
    trace["registry_record"] = match api.store.certificate(&id).await {
        Ok(record) => json!({
            "status": record.status, "things": record.things, "ca_id": record.ca_id,
            "last_seen": record.last_seen,
        }),
        Err(RegistryError::NotFound(_)) => Value::Null,
        Err(e) => return Err(e.into()),
    };
    Ok(Json(trace))
}

async fn list_domains(State(api): State<Api>) -> ApiResult {
    Ok(Json(json!({"items": api.store.list_domains().await?})))
}

async fn describe_domain(State(api): State<Api>, Path(hostname): Path<String>) -> ApiResult {
    Ok(to_json(
        &api.store.domain(&hostname.to_ascii_lowercase()).await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutDomain {
    /// The domain as a `[[domain]]` table of the configuration file spells it, in JSON.
    spec: Value,
    /// Write only if the stored version is still this one (0: only if it does not exist yet).
    expected_version: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteDomain {
    expected_version: Option<i64>,
}

/// The stored domains with one replaced, added (`Some`) or removed (`None`), checked by the
/// gateway as a whole; also returns the version the change was checked against (0: new).
async fn checked_domains(
    api: &Api,
    hostname: &str,
    spec: Option<DomainSpec>,
) -> Result<(Vec<(String, DomainSpec)>, i64, Vec<String>), ApiError> {
    let mut domains: Vec<(String, DomainSpec)> = Vec::new();
    let mut version = 0;
    for d in api.store.list_domains().await? {
        if d.hostname == hostname {
            version = d.version;
        } else {
            domains.push((d.hostname, d.spec));
        }
    }
    if spec.is_none() && version == 0 {
        return Err(RegistryError::NotFound(format!("domain {hostname}")).into());
    }
    let changed = spec.is_some();
    domains.extend(spec.map(|s| (hostname.to_string(), s)));
    let checked = api.hooks.check_domains(&domains).await.map_err(|e| {
        let what = if changed {
            format!("domain {hostname}")
        } else {
            format!("without domain {hostname}, the configuration")
        };
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-domain",
            format!("{what} cannot be loaded: {e}"),
        )
    })?;
    let warnings = checked
        .warnings
        .into_iter()
        .find(|(h, _)| h == hostname)
        .map(|(_, w)| w)
        .unwrap_or_default();
    Ok((domains, version, warnings))
}

async fn put_domain(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(hostname): Path<String>,
    Body(req): Body<PutDomain>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let hostname = hostname.to_ascii_lowercase();
    let mut spec = req.spec;
    let Some(fields) = spec.as_object_mut() else {
        return Err(ApiError::invalid(
            "spec must be a JSON object with the keys of a [[domain]] table",
        ));
    };
    match fields
        .get("hostname")
        .map(|h| h.as_str().map(str::to_ascii_lowercase))
    {
        None => {
            fields.insert("hostname".into(), Value::String(hostname.clone()));
        }
        Some(Some(h)) if h == hostname => {}
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "spec.hostname must be \"{hostname}\", the hostname in the path"
            )));
        }
    }
    // JSON only at this edge: from here on the domain is typed (every default filled in, unknown
    // keys refused).
    let spec: DomainSpec = serde_json::from_value(spec).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-domain",
            format!("domain {hostname} cannot be loaded: {e}"),
        )
    })?;
    let (domains, checked_version, warnings) =
        checked_domains(&api, &hostname, Some(spec.clone())).await?;
    let expected = req.expected_version.unwrap_or(checked_version);
    if expected != checked_version {
        return Err(RegistryError::Conflict(format!(
            "domain {hostname} is at version {checked_version}, not {expected}; read it again and retry"
        ))
        .into());
    }
    drop(domains);
    // Written only if nothing changed since the check.
    let record = api
        .store
        .put_domain(&hostname, &spec, Some(expected), &caller)
        .await?;
    let status = if expected == 0 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut body = serde_json::to_value(&record).unwrap_or(Value::Null);
    body["warnings"] = json!(warnings);
    Ok((status, Json(body)))
}

async fn delete_domain(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(hostname): Path<String>,
    Params(q): Params<DeleteDomain>,
) -> ApiResult<StatusCode> {
    let hostname = hostname.to_ascii_lowercase();
    let (_, checked_version, _) = checked_domains(&api, &hostname, None).await?;
    let expected = q.expected_version.unwrap_or(checked_version);
    api.store
        .delete_domain(&hostname, Some(expected), &caller)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_sessions(State(api): State<Api>) -> ApiResult {
    Ok(Json(api.hooks.mqtt_sessions()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloseSession {
    #[serde(default)]
    forget: bool,
}

async fn list_connections(State(api): State<Api>) -> ApiResult {
    Ok(Json(api.hooks.live_connections()))
}

async fn close_connection(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let n: u64 = id
        .parse()
        .map_err(|_| ApiError::invalid(format!("connection id '{id}' must be a number")))?;
    if api.hooks.close_connection(n) {
        tracing::info!(target: "portcullis::admin", caller, connection = n, "connection closed by an operator");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(RegistryError::NotFound(format!("connection {n} (it may have ended)")).into())
    }
}

async fn close_session(
    State(api): State<Api>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(client_id): Path<String>,
    Params(q): Params<CloseSession>,
) -> ApiResult<StatusCode> {
    if api.hooks.close_mqtt_session(&client_id, q.forget) {
        tracing::info!(target: "portcullis::admin", caller, client_id, forget = q.forget, "mqtt session closed by an operator");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(RegistryError::NotFound(format!("MQTT session '{client_id}'")).into())
    }
}
