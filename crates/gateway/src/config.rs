//! The gateway's validated configuration: what to listen on, which domains to serve and how.
//!
//! It carries no serde: the node parses the TOML file, reads every file it names, and builds a
//! [`Config`] through [`Config::new`], which refuses anything inconsistent. Once a `Config`
//! exists it is valid, so building the runtime state from it can only fail on TLS material.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::Uri;
use portcullis_pki::Truststore;
use portcullis_pki::crl::Crl;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::GatewayError;
pub use crate::http::identity::{IdentityHeaders, Profile as IdentityProfile};
pub use crate::registry_view::RegistryMode;

/// The whole gateway configuration.
#[derive(Debug)]
pub struct Config {
    pub(crate) listeners: Vec<Listener>,
    pub(crate) domains: Vec<Arc<Domain>>,
    pub(crate) default_domain: Option<usize>,
    pub(crate) limits: Limits,
    pub(crate) identity: IdentityHeaders,
    /// The MQTT broker's limits (applied at start).
    pub(crate) broker: portcullis_mqtt::broker::Limits,
}

/// Limits and timeouts that protect the process. Connection and handshake limits and the upstream
/// connect timeout apply from start; the others follow reloads.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open client connections at most; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// TLS handshakes in progress at most; further connections wait for a slot (within the
    /// handshake timeout).
    pub max_handshakes: usize,
    /// Largest request head (HTTP/1.1) or header list (HTTP/2), in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for a request's headers to arrive (HTTP/1.1), idle keep-alive included.
    pub request_header_timeout: Duration,
    /// Time allowed to connect to an upstream.
    pub upstream_connect_timeout: Duration,
    /// Time allowed for an upstream to answer with headers; then 504.
    pub upstream_response_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_handshakes: 1_024,
            max_header_bytes: 64 * 1024,
            handshake_timeout: Duration::from_secs(10),
            request_header_timeout: Duration::from_secs(30),
            upstream_connect_timeout: Duration::from_secs(5),
            upstream_response_timeout: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// Validates and assembles a configuration. `default_domain` names the domain that serves
    /// connections whose SNI matches no domain; `None` refuses them.
    pub fn new(
        listeners: Vec<Listener>,
        domains: Vec<Domain>,
        default_domain: Option<&str>,
    ) -> Result<Config, GatewayError> {
        if listeners.is_empty() {
            return Err(GatewayError::Config(
                "no listener: add [[listener]] address = \"127.0.0.1:8443\"".into(),
            ));
        }
        if domains.is_empty() {
            return Err(GatewayError::Config("no domain: add a [[domain]]".into()));
        }
        for (i, d) in domains.iter().enumerate() {
            if domains[..i].iter().any(|o| o.hostname == d.hostname) {
                return Err(GatewayError::Config(format!(
                    "domain '{}' is defined twice",
                    d.hostname
                )));
            }
        }
        let default_domain = match default_domain {
            None => None,
            Some(name) => Some(
                domains
                    .iter()
                    .position(|d| d.hostname.to_string() == name)
                    .ok_or_else(|| {
                        GatewayError::Config(format!(
                            "default_domain '{name}' is not one of the domains"
                        ))
                    })?,
            ),
        };
        Ok(Config {
            listeners,
            domains: domains.into_iter().map(Arc::new).collect(),
            default_domain,
            limits: Limits::default(),
            identity: IdentityHeaders::default(),
            broker: portcullis_mqtt::broker::Limits::default(),
        })
    }

    /// Replaces the default identity header names and formats.
    pub fn with_identity(mut self, identity: IdentityHeaders) -> Config {
        self.identity = identity;
        self
    }

    /// Replaces the MQTT broker's default limits (queued messages per offline session,
    /// retained messages, subscriptions per session); zero is refused. They apply from start.
    pub fn with_broker_limits(
        mut self,
        limits: portcullis_mqtt::broker::Limits,
    ) -> Result<Config, GatewayError> {
        if limits.max_queued == 0 || limits.max_retained == 0 || limits.max_subscriptions == 0 {
            return Err(GatewayError::Config(
                "mqtt.max_queued_per_session, mqtt.max_retained and mqtt.max_subscriptions_per_session must be at least 1".into(),
            ));
        }
        self.broker = limits;
        Ok(self)
    }

    /// Replaces the default limits; zero counts and sizes are refused.
    pub fn with_limits(mut self, limits: Limits) -> Result<Config, GatewayError> {
        if limits.max_connections == 0 || limits.max_handshakes == 0 {
            return Err(GatewayError::Config(
                "limits.max_connections and limits.max_handshakes must be at least 1".into(),
            ));
        }
        if limits.max_header_bytes < 8192 {
            return Err(GatewayError::Config(
                "limits.max_header_bytes must be at least 8192".into(),
            ));
        }
        self.limits = limits;
        Ok(self)
    }

    /// The addresses to listen on.
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// What an operator should know about a domain's truststore: its lint warnings (the
    /// verification profiles' accommodations included), and the CAs deeper than the domain's
    /// `max_chain_depth`, whose clients it refuses (`chain-too-deep`).
    pub fn truststore_warnings(&self, hostname: &str) -> Vec<String> {
        let Some(domain) = self
            .domains
            .iter()
            .find(|d| d.hostname.to_string().eq_ignore_ascii_case(hostname))
        else {
            return Vec::new();
        };
        let Some(store) = &domain.mtls.truststore else {
            return Vec::new();
        };
        let max = usize::from(domain.mtls.max_chain_depth);
        let mut out = Vec::new();
        for e in store.entries() {
            let subject = &e.certificate.info().subject;
            for w in &e.warnings {
                out.push(format!("#{} {subject}: {}: {}", e.index, w.code, w.message));
            }
            if let Some(depth) = e.depth
                && depth > max
                && !e.duplicate
            {
                out.push(format!(
                    "#{} {subject}: too-deep-for-domain: sits {depth} CA levels below its root, more than this domain's max_chain_depth of {max}: chains through it are refused (chain-too-deep)",
                    e.index
                ));
            }
        }
        out
    }

    /// Whether some listener speaks MQTT (then domains offer the `mqtt` ALPN protocol).
    pub fn speaks_mqtt(&self) -> bool {
        self.listeners
            .iter()
            .any(|l| l.protocols != Protocols::Http)
    }
}

/// A listening address and the protocols it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    /// Address and port.
    pub address: SocketAddr,
    /// What it speaks.
    pub protocols: Protocols,
}

impl Listener {
    /// An HTTP listener.
    pub fn http(address: SocketAddr) -> Listener {
        Listener {
            address,
            protocols: Protocols::Http,
        }
    }
}

/// What a listener speaks after the TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocols {
    /// HTTP/1.1 and HTTP/2 (by ALPN).
    Http,
    /// MQTT only (with or without the `mqtt` ALPN protocol, as device SDKs connect to 8883).
    Mqtt,
    /// Both: ALPN `mqtt` selects MQTT, anything else HTTP.
    Both,
}

/// MQTT settings of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSettings {
    /// The client id must be the name of a thing the certificate is attached to.
    pub require_thing_client_id: bool,
    /// The largest packet accepted (and announced to MQTT 5 clients), bytes.
    pub max_packet_size: usize,
    /// How long a client may take to send CONNECT after the handshake.
    pub connect_timeout: Duration,
    /// `POST /topics/{topic}?qos=0|1` on this domain's HTTPS publishes to MQTT subscribers.
    pub https_publish: bool,
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings {
            require_thing_client_id: false,
            max_packet_size: 128 * 1024,
            connect_timeout: Duration::from_secs(10),
            https_publish: false,
        }
    }
}

/// A host name pattern for SNI: exact, or `*.example.com` (one label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hostname {
    /// An exact name, lower-case.
    Exact(String),
    /// `*.suffix`: stores the suffix, lower-case, without `*.`.
    Wildcard(String),
}

impl Hostname {
    /// Parses `name` or `*.name`.
    pub fn parse(text: &str) -> Result<Hostname, GatewayError> {
        let lower = text.trim().trim_end_matches('.').to_ascii_lowercase();
        let (wild, rest) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, lower.clone()),
        };
        let valid = !rest.is_empty()
            && rest.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !valid && rest.parse::<std::net::IpAddr>().is_err() {
            return Err(GatewayError::Config(format!(
                "hostname '{text}' is not a host name or *.domain wildcard"
            )));
        }
        Ok(if wild {
            Hostname::Wildcard(rest)
        } else {
            Hostname::Exact(rest)
        })
    }

    /// True when `name` (an SNI or Host, lower-case, without port) is covered.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Hostname::Exact(h) => h.eq_ignore_ascii_case(name),
            Hostname::Wildcard(suffix) => name.split_once('.').is_some_and(|(label, rest)| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && rest.eq_ignore_ascii_case(suffix)
            }),
        }
    }
}

impl std::fmt::Display for Hostname {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hostname::Exact(h) => f.write_str(h),
            Hostname::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

/// A domain: a host name with its own certificate, TLS policy, client authentication and routes.
#[derive(Debug)]
pub struct Domain {
    /// SNI pattern.
    pub hostname: Hostname,
    /// Server certificate chain (leaf first) and key.
    pub certificate: ServerCertificate,
    /// Minimum TLS version.
    pub policy: SecurityPolicy,
    /// Client certificate authentication.
    pub mtls: Mtls,
    /// Base path mappings.
    pub mappings: Vec<Mapping>,
    /// Allow TLS session resumption (within one state generation). Benchmarks of full
    /// handshakes turn it off.
    pub session_resumption: bool,
    /// How the registry's statuses apply to this domain's clients.
    pub registry_mode: RegistryMode,
    /// MQTT settings (on listeners that speak MQTT).
    pub mqtt: MqttSettings,
    /// Forward request header names holding `_` (nginx's `underscores_in_headers`). Off by
    /// default: CGI, WSGI and Rack upstreams read `X_Client_Cert` as `X-Client-Cert`. Even on,
    /// names that read as a header the gateway owns are dropped.
    pub underscores_in_headers: bool,
    /// Headers set on every response, proxied or made by the gateway.
    pub response_headers: ResponseHeaders,
}

/// Headers a domain sets on every response, proxied or made by the gateway
/// (`Strict-Transport-Security`, `X-Content-Type-Options`, …): an upstream's header of the same
/// name is replaced, not repeated.
#[derive(Clone, Debug, Default)]
pub struct ResponseHeaders {
    pairs: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
    /// `name: value\r\n` lines, as the HTTP/1.1 fast path writes them.
    block: Vec<u8>,
}

/// Headers that describe the message or the connection: the gateway writes them itself.
const NOT_SETTABLE: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "date",
];

impl ResponseHeaders {
    /// Validates names and values; a message naming the header says what is wrong.
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, String> {
        let mut out = ResponseHeaders::default();
        for (name, value) in pairs {
            let parsed = hyper::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("'{name}' is not a valid header name"))?;
            if NOT_SETTABLE.contains(&parsed.as_str()) {
                return Err(format!(
                    "'{name}' describes the message or the connection and is written by the gateway; remove it"
                ));
            }
            if value.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
                return Err(format!(
                    "the value of '{name}' holds a control character; write it on one line"
                ));
            }
            let value = hyper::header::HeaderValue::from_str(value.trim())
                .map_err(|_| format!("the value of '{name}' is not a valid header value"))?;
            if out.pairs.iter().any(|(n, _)| *n == parsed) {
                return Err(format!("'{name}' is set twice"));
            }
            out.block.extend_from_slice(parsed.as_str().as_bytes());
            out.block.extend_from_slice(b": ");
            out.block.extend_from_slice(value.as_bytes());
            out.block.extend_from_slice(b"\r\n");
            out.pairs.push((parsed, value));
        }
        Ok(out)
    }

    /// Whether none are set.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Whether `name` is one of them (ASCII case-insensitive).
    pub(crate) fn sets(&self, name: &str) -> bool {
        self.pairs
            .iter()
            .any(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
    }

    /// The `name: value\r\n` lines.
    pub(crate) fn block(&self) -> &[u8] {
        &self.block
    }

    /// Sets them on a response's headers, replacing any of the same name.
    pub(crate) fn apply(&self, headers: &mut hyper::HeaderMap) {
        for (name, value) in &self.pairs {
            headers.insert(name.clone(), value.clone());
        }
    }
}

impl Domain {
    /// Whether `other` (the same domain in another generation) admits and routes requests as
    /// this one does: the same mutual TLS mode and failure answer, registry mode and mappings
    /// (paths, upstreams, certificate requirements, authorization, WebSocket). Certificates,
    /// truststores and CRLs are compared where they matter, by verifying chains again.
    pub(crate) fn routes_like(&self, other: &Domain) -> bool {
        self.mtls.mode == other.mtls.mode
            && self.mtls.on_failure == other.mtls.on_failure
            && self.mtls.verification == other.mtls.verification
            && self.registry_mode == other.registry_mode
            && self.mqtt.https_publish == other.mqtt.https_publish
            && self.underscores_in_headers == other.underscores_in_headers
            && self.mappings.len() == other.mappings.len()
            && self.mappings.iter().zip(&other.mappings).all(|(a, b)| {
                a.base_path == b.base_path
                    && a.upstream == b.upstream
                    && a.require_client_cert == b.require_client_cert
                    && a.authorization == b.authorization
                    && a.websocket == b.websocket
                    && a.upstream_tls.is_some() == b.upstream_tls.is_some()
            })
    }
}

/// A server certificate chain and its key.
#[derive(Debug)]
pub struct ServerCertificate {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

/// API Gateway's security policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityPolicy {
    /// TLS 1.2 and 1.3, AEAD suites with forward secrecy only.
    Tls12,
    /// TLS 1.3 only.
    Tls13,
    /// TLS 1.2 only (AEAD suites with forward secrecy): for clients whose TLS 1.3 is broken, and
    /// for measuring TLS 1.2 handshakes against clients that would otherwise pick 1.3.
    Tls12Only,
    /// TLS 1.3 with the post-quantum hybrid key exchange X25519MLKEM768 only: a client that
    /// cannot do it fails the handshake.
    Tls13Pq,
}

/// How a domain authenticates clients.
#[derive(Debug)]
pub struct Mtls {
    /// Required, optional or off.
    pub mode: MtlsMode,
    /// Trusted CAs (required unless the mode is off).
    pub truststore: Option<Arc<Truststore>>,
    /// CRLs checked for every certificate of the chain they cover.
    pub crls: Vec<Crl>,
    /// Most CA levels, root included.
    pub max_chain_depth: u8,
    /// Send the truststore's CA names in the CertificateRequest.
    pub advertise_ca_names: bool,
    /// What a rejected client gets.
    pub on_failure: OnFailure,
    /// Let chains through when a CRL covering them is past its next update (default: refuse).
    pub allow_stale_crls: bool,
    /// What the readable 403 page tells people to do (`on_failure = "http"`), in the domain's
    /// own words: plain text, paragraphs separated by blank lines. `None`: the default advice.
    pub failure_advice: Option<String>,
    /// How strictly client certificates are judged (compatible by default).
    pub verification: portcullis_pki::VerifyProfile,
    /// The registry's ACTIVE CAs: a chain refused as untrusted whose issuer is one of them
    /// gets an explanation that says to use `registry:cas` or add the CA.
    pub registered_cas: Arc<Vec<portcullis_pki::Certificate>>,
    /// Other CAs' revocation sources: CRL distribution points, OCSP.
    pub revocation: crate::foreign::ForeignPolicy,
}

impl Mtls {
    /// Client authentication turned off.
    pub fn off() -> Mtls {
        Mtls {
            mode: MtlsMode::Off,
            truststore: None,
            crls: Vec::new(),
            max_chain_depth: 4,
            advertise_ca_names: true,
            on_failure: OnFailure::Tls,
            allow_stale_crls: false,
            failure_advice: None,
            verification: portcullis_pki::VerifyProfile::Compatible,
            registered_cas: Arc::default(),
            revocation: crate::foreign::ForeignPolicy::default(),
        }
    }
}

/// Client certificate mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    /// Every request needs a valid certificate.
    Required,
    /// Certificates are verified when presented; mappings decide what needs one.
    Optional,
    /// No certificate is requested.
    Off,
}

/// What a client whose certificate is missing or rejected gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// A TLS alert in the handshake (the reason as the alert).
    Tls,
    /// The handshake completes and requests get 403 with the reason (JSON or HTML).
    Http,
    /// API Gateway's split: no certificate at all fails the handshake (`certificate_required`);
    /// a certificate presented and refused completes it, and requests get 403 with the reason.
    Aws,
}

/// One base path mapping.
#[derive(Debug)]
pub struct Mapping {
    /// The prefix, without trailing slash; empty catches everything.
    pub base_path: String,
    /// Where requests go.
    pub upstream: Uri,
    /// Whether requests need a valid client certificate (only `false` matters in optional mode).
    pub require_client_cert: bool,
    /// TLS to an `https://` upstream.
    pub upstream_tls: Option<UpstreamTls>,
    /// Whether the registry's policies must allow each request.
    pub authorization: Authorization,
    /// Whether a WebSocket upgrade (decided like any request) becomes a tunnel to the upstream.
    /// No other upgrade ever does.
    pub websocket: bool,
    /// How requests reach the upstream.
    pub upstream_protocol: UpstreamProtocol,
    /// HTTP/2 upstreams: a stream refused unprocessed is sent once more (`retry_refused`).
    pub retry_refused: bool,
    /// Answered by the gateway itself instead of an upstream.
    pub builtin: Option<Builtin>,
    /// For [`Builtin::Token`]: the audiences a token may be asked for (empty: any).
    pub token_audiences: Vec<String>,
}

/// The protocol spoken to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1, pooled keep-alive connections (the fast path's).
    #[default]
    Http1,
    /// HTTP/2 without TLS ("prior knowledge"), to an `http://` upstream: one multiplexed
    /// connection per upstream; what gRPC servers behind a proxy usually speak.
    H2c,
    /// HTTP/2 over TLS, by ALPN, to an `https://` upstream.
    H2,
}

impl UpstreamProtocol {
    /// From its configuration name (`http1`, `h2c`, `h2`).
    pub fn parse(name: &str) -> Option<UpstreamProtocol> {
        match name {
            "http1" => Some(UpstreamProtocol::Http1),
            "h2c" => Some(UpstreamProtocol::H2c),
            "h2" => Some(UpstreamProtocol::H2),
            _ => None,
        }
    }

    /// Whether it is HTTP/2.
    pub fn is_h2(self) -> bool {
        self != UpstreamProtocol::Http1
    }
}

/// A service the gateway answers itself on a mapping (`upstream = "builtin:…"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// Fleet provisioning by claim over HTTPS (`builtin:provisioning`): the MQTT API's calls as
    /// `POST <base>/certificates/create`, `…/certificates/create-from-csr` and
    /// `…/provisioning-templates/NAME/provision`.
    Provisioning,
    /// Enrollment over Secure Transport (RFC 7030, `builtin:est`): `cacerts`, `simpleenroll`
    /// (bootstrapped by a claim certificate, the template as the CA label),
    /// `simplereenroll` (the current certificate renews itself) and `csrattrs`.
    Est,
    /// Certificate → short-lived token (`builtin:token`): `POST <base>/token` answers an
    /// ES256 JWT for the certificate; `GET <base>/.well-known/jwks.json` the keys to verify it.
    Token,
    /// SCEP (RFC 8894, `builtin:scep`): `?operation=GetCACaps`, `GetCACert` and
    /// `PKIOperation`; enrollment by a one-time challenge password, renewal signed by the
    /// current certificate. Needs no client certificate (mutual TLS optional on its domain).
    Scep,
}

/// How a mapping authorizes requests beyond the client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Authorization {
    /// A valid certificate (where one is required) is enough.
    #[default]
    None,
    /// The policies attached to the certificate, its things, its CA or the domain must allow
    /// `http:<METHOD>` on `route:<host><path>`.
    Policy,
}

/// How the gateway authenticates an `https://` upstream, and itself to it.
#[derive(Debug)]
pub struct UpstreamTls {
    /// CA certificates the upstream's server certificate must chain to.
    pub roots: Vec<CertificateDer<'static>>,
    /// The gateway's client certificate for the upstream, if it asks for one.
    pub client_certificate: Option<ServerCertificate>,
}

impl Mapping {
    /// Validates a mapping: the base path is empty or `/segment…`; the upstream is an
    /// `http://` URL.
    pub fn new(
        base_path: &str,
        upstream: &str,
        require_client_cert: bool,
    ) -> Result<Mapping, GatewayError> {
        // API Gateway writes base paths without the leading slash (`c360`), and `(none)` for
        // the empty one.
        let slashed = match base_path {
            "(none)" => String::new(),
            p if p.is_empty() || p.starts_with('/') => p.to_string(),
            p => format!("/{p}"),
        };
        let base = slashed.trim_end_matches('/');
        if base.contains(['?', '#']) {
            return Err(GatewayError::Config(format!(
                "base path '{base_path}' must hold no query or fragment"
            )));
        }
        let uri: Uri = upstream
            .parse()
            .map_err(|_| GatewayError::Config(format!("upstream '{upstream}' is not a URL")))?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) {
            return Err(GatewayError::Config(format!(
                "upstream '{upstream}' must start with http:// or https://"
            )));
        }
        if uri.authority().is_none() {
            return Err(GatewayError::Config(format!(
                "upstream '{upstream}' has no host"
            )));
        }
        Ok(Mapping {
            base_path: base.to_string(),
            upstream: uri,
            require_client_cert,
            upstream_tls: None,
            authorization: Authorization::None,
            websocket: true,
            upstream_protocol: UpstreamProtocol::Http1,
            retry_refused: false,
            builtin: None,
            token_audiences: Vec::new(),
        })
    }

    /// A mapping the gateway answers itself (no upstream is ever contacted).
    pub fn builtin(
        base_path: &str,
        builtin: Builtin,
        require_client_cert: bool,
    ) -> Result<Mapping, GatewayError> {
        let mut mapping = Mapping::new(base_path, "http://builtin.invalid", require_client_cert)?;
        mapping.builtin = Some(builtin);
        mapping.websocket = false;
        Ok(mapping)
    }

    /// Sets whether WebSocket upgrades are tunnelled (default: yes).
    pub fn with_websocket(mut self, websocket: bool) -> Mapping {
        self.websocket = websocket;
        self
    }

    /// Sets the protocol spoken to the upstream: `h2c` needs an `http://` upstream, `h2` an
    /// `https://` one. WebSocket upgrades are HTTP/1.1 only: an HTTP/2 mapping tunnels none.
    pub fn with_upstream_protocol(
        mut self,
        protocol: UpstreamProtocol,
    ) -> Result<Mapping, GatewayError> {
        let scheme = self.upstream.scheme_str();
        match (protocol, scheme) {
            (UpstreamProtocol::H2c, Some("https")) => {
                return Err(GatewayError::Config(format!(
                    "upstream '{}' is https://: use upstream_protocol = \"h2\" (HTTP/2 over TLS), or an http:// upstream for h2c",
                    self.upstream
                )));
            }
            (UpstreamProtocol::H2, Some("http")) => {
                return Err(GatewayError::Config(format!(
                    "upstream '{}' is http://: use upstream_protocol = \"h2c\" (HTTP/2 without TLS), or an https:// upstream for h2",
                    self.upstream
                )));
            }
            _ => {}
        }
        if protocol.is_h2() {
            self.websocket = false;
        }
        self.upstream_protocol = protocol;
        Ok(self)
    }

    /// Sets how requests are authorized.
    pub fn with_authorization(mut self, authorization: Authorization) -> Mapping {
        self.authorization = authorization;
        self
    }

    /// Sets the TLS settings for an `https://` upstream (required for one, refused for http).
    pub fn with_upstream_tls(mut self, tls: UpstreamTls) -> Result<Mapping, GatewayError> {
        if self.upstream.scheme_str() != Some("https") {
            return Err(GatewayError::Config(format!(
                "upstream '{}' is not https://, so it takes no upstream CA or client certificate",
                self.upstream
            )));
        }
        if tls.roots.is_empty() {
            return Err(GatewayError::Config(format!(
                "upstream '{}': the upstream CA file holds no certificate",
                self.upstream
            )));
        }
        self.upstream_tls = Some(tls);
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_protocols_match_their_schemes() {
        let plain = || Mapping::new("", "http://127.0.0.1:9", true).unwrap();
        let tls = || Mapping::new("", "https://up.internal:9", true).unwrap();
        let h2c = plain()
            .with_upstream_protocol(UpstreamProtocol::H2c)
            .unwrap();
        assert!(!h2c.websocket, "HTTP/2 upstreams tunnel no WebSocket");
        assert!(tls().with_upstream_protocol(UpstreamProtocol::H2).is_ok());
        let e = tls()
            .with_upstream_protocol(UpstreamProtocol::H2c)
            .unwrap_err()
            .to_string();
        assert!(e.contains("use upstream_protocol = \"h2\""), "{e}");
        let e = plain()
            .with_upstream_protocol(UpstreamProtocol::H2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("use upstream_protocol = \"h2c\""), "{e}");
        assert_eq!(UpstreamProtocol::parse("h2c"), Some(UpstreamProtocol::H2c));
        assert_eq!(UpstreamProtocol::parse("HTTP/2"), None);
    }

    #[test]
    fn wildcards_cover_one_label() {
        let h = Hostname::parse("*.Example.com").unwrap();
        assert!(h.matches("api.example.com"));
        assert!(!h.matches("example.com"));
        assert!(!h.matches("a.b.example.com"));
        assert!(Hostname::parse("exa mple").is_err());
        assert!(Hostname::parse("127.0.0.1").is_ok());
    }

    #[test]
    fn mappings_validate() {
        assert!(Mapping::new("/api/", "http://127.0.0.1:9000", true).is_ok());
        assert!(Mapping::new("", "http://127.0.0.1:9000/base", true).is_ok());
        // As API Gateway writes them: "api" is "/api", "(none)" is the empty path.
        assert_eq!(
            Mapping::new("api", "http://x", true).unwrap().base_path,
            "/api"
        );
        assert_eq!(
            Mapping::new("(none)", "http://x", true).unwrap().base_path,
            ""
        );
        assert!(Mapping::new("/a?b", "http://x", true).is_err());
        assert!(Mapping::new("/api", "ftp://x", true).is_err());
        let plain = Mapping::new("", "http://x", true).unwrap();
        let tls = UpstreamTls {
            roots: vec![CertificateDer::from(vec![0x30, 0])],
            client_certificate: None,
        };
        assert!(plain.with_upstream_tls(tls).is_err());
    }
}
