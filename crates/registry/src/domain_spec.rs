//! A domain's specification: what a `[[domain]]` table of the configuration file, a stored
//! registry domain and the admin API's `PUT /v1/domains/{hostname}` all spell, as one type.
//!
//! Parsing fills in every default and refuses unknown keys; what each value means (a security
//! policy's name, a truststore reference, a file) is checked by the node when it builds the
//! gateway's configuration from it. JSON (and TOML) only at the edges: the store keeps it as
//! JSON text, the admin API takes and returns it as JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A domain: hostname, server certificate, TLS policy, mutual TLS, mappings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSpec {
    /// The hostname (or `*.suffix`).
    pub hostname: String,
    /// "auto" (issued by the local CA), "acme" (ordered from an ACME CA), "registry:NAME", or a
    /// PEM chain file (leaf first).
    pub certificate: String,
    /// The ACME CA and challenge, with `certificate = "acme"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeSpec>,
    /// The server key file, with a certificate file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// The TLS security policy (`TLS_1_2`, `TLS_1_3`, … as API Gateway names them).
    #[serde(default = "default_policy")]
    pub security_policy: String,
    /// Mutual TLS; none: no client certificates asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsSpec>,
    /// Base path mappings, tried longest first.
    #[serde(default, rename = "mapping")]
    pub mappings: Vec<MappingSpec>,
    /// Allow TLS session resumption (default true).
    #[serde(default = "default_true")]
    pub session_resumption: bool,
    /// off (truststore only), revocation, or registered.
    #[serde(default = "default_registry_mode")]
    pub registry_mode: String,
    /// MQTT settings (for listeners that speak MQTT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mqtt: Option<MqttSpec>,
    /// Forward request header names holding `_` (dropped by default).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub underscores_in_headers: bool,
    /// Headers set on every response (Strict-Transport-Security and other security headers),
    /// replacing the upstream's of the same name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub response_headers: BTreeMap<String, String>,
}

/// Where and how a `certificate = "acme"` domain's certificate is ordered.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeSpec {
    /// The ACME directory URL (default: Let's Encrypt's production directory).
    #[serde(default = "default_acme_directory")]
    pub directory: String,
    /// Contact URLs for the account (`mailto:ops@example.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contact: Vec<String>,
    /// `tls-alpn-01` (default: answered on the TLS listener) or `http-01` (answered on the
    /// node's `[acme] http_listen`, usually port 80).
    #[serde(default = "default_acme_challenge")]
    pub challenge: String,
}

impl Default for AcmeSpec {
    fn default() -> Self {
        AcmeSpec {
            directory: default_acme_directory(),
            contact: Vec::new(),
            challenge: default_acme_challenge(),
        }
    }
}

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";

fn default_acme_directory() -> String {
    LETS_ENCRYPT_DIRECTORY.to_string()
}

fn default_acme_challenge() -> String {
    "tls-alpn-01".to_string()
}

/// A domain's MQTT settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSpec {
    /// The client id must be the name of a thing the certificate is attached to.
    #[serde(default)]
    pub require_thing_client_id: bool,
    /// The largest packet accepted, bytes (default 131072).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_packet_size: Option<usize>,
    /// `POST /topics/{topic}?qos=0|1` publishes to MQTT subscribers.
    #[serde(default)]
    pub https_publish: bool,
    /// Seconds a client may take to send CONNECT after the handshake (default 10).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout_secs: Option<f64>,
}

/// Reads a base path as API Gateway writes it too: `c360` is `/c360`, `(none)` is empty.
fn base_path<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    let path = String::deserialize(d)?;
    Ok(match path.trim() {
        "" | "(none)" | "/" => String::new(),
        p if p.starts_with('/') => p.to_string(),
        p => format!("/{p}"),
    })
}

fn default_registry_mode() -> String {
    "off".into()
}

fn default_policy() -> String {
    "TLS_1_2".into()
}

/// A domain's mutual TLS.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsSpec {
    /// `required`, `optional` or `off`.
    pub mode: String,
    /// The CA bundle file, or `registry:NAME[@VERSION]`, or `registry:cas`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truststore: Option<PathBuf>,
    /// CRL files.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// Most CA levels a chain may have (default 4).
    #[serde(default = "default_depth")]
    pub max_chain_depth: u8,
    /// Send the truststore's CA names in the CertificateRequest (default true).
    #[serde(default = "default_true")]
    pub advertise_ca_names: bool,
    /// What a refused certificate gets: `tls` (an alert), `http` (a readable 403) or `aws`.
    #[serde(default = "default_on_failure")]
    pub on_failure: String,
    /// A CRL past nextUpdate: `reject` (default) or `allow`.
    #[serde(default = "default_stale")]
    pub stale_crl: String,
    /// The readable 403 page's advice, in the domain's words (plain text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_advice: Option<String>,
    /// "compatible" (default: what OpenSSL and API Gateway accept) or "strict" (RFC 5280).
    #[serde(default = "default_verification")]
    pub verification: String,
    /// Other CAs' revocation sources (CRL distribution points, OCSP), fetched in the
    /// background.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<RevocationSpec>,
}

/// `mtls.revocation`: revocation learned from the certificates' own CRL distribution points
/// and OCSP responders, fetched off the handshake path.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationSpec {
    /// Fetch and check the CRLs the chain's certificates name (default false).
    #[serde(default)]
    pub crl_dp: bool,
    /// OCSP for the leaf: `off` (default), `soft` (admitted until an answer says revoked) or
    /// `hard` (the status must be known and good).
    #[serde(default = "default_ocsp")]
    pub ocsp: String,
    /// How long a first connection whose status is not known yet may wait for it, in
    /// milliseconds (default 0: refused at once, asking to retry; at most 10000).
    #[serde(default)]
    pub wait_ms: u64,
    /// Fetch each CRL again at least this often, in seconds (default 3600; at least 1), and
    /// always before its nextUpdate.
    #[serde(default = "default_refresh")]
    pub refresh_secs: u64,
}

fn default_ocsp() -> String {
    "off".into()
}

fn default_refresh() -> u64 {
    3600
}

fn default_verification() -> String {
    "compatible".into()
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

/// A base path mapping to an upstream.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSpec {
    /// `/c360`; `c360` (as API Gateway writes it) and `(none)` (its empty path) are read too.
    #[serde(default, deserialize_with = "base_path")]
    pub base_path: String,
    /// The upstream URL (`http://` or `https://`).
    pub upstream: String,
    /// `required` or `optional`: whether this mapping needs a valid client certificate on an
    /// optional-mTLS domain (default `required`).
    #[serde(default = "default_required")]
    pub client_certificate: String,
    /// For https:// upstreams: the CA bundle their server certificates chain to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ca: Option<PathBuf>,
    /// For https:// upstreams that want one: the gateway's client certificate chain and key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_client_cert: Option<PathBuf>,
    /// Its key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_client_key: Option<PathBuf>,
    /// "none", or "policy": the registry's policies must allow each request.
    #[serde(default = "default_authorization")]
    pub authorization: String,
    /// Tunnel WebSocket upgrades to the upstream (default true).
    #[serde(default = "default_true")]
    pub websocket: bool,
    /// How the gateway speaks to the upstream: `http1` (default), `h2c` (HTTP/2 without TLS,
    /// `http://`) or `h2` (HTTP/2 over TLS by ALPN, `https://`). gRPC needs `h2c` or `h2`.
    #[serde(default = "default_http1", skip_serializing_if = "is_http1")]
    pub upstream_protocol: String,
    /// HTTP/2 upstreams: a request whose stream the upstream refused unprocessed (RST_STREAM
    /// REFUSED_STREAM, or above a GOAWAY's last stream) is sent once more on a new stream
    /// (default false: each request's head is kept for it, a cost).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry_refused: bool,
    /// For `builtin:token`: the audiences a token may be asked for (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_audiences: Vec<String>,
}

fn default_http1() -> String {
    "http1".into()
}

fn is_http1(p: &String) -> bool {
    p == "http1"
}

fn default_authorization() -> String {
    "none".into()
}

fn default_required() -> String {
    "required".into()
}

impl DomainSpec {
    /// The truststore reference of its mutual TLS, if any (`registry:NAME[@V]` or a file).
    pub fn truststore(&self) -> Option<&str> {
        self.mtls.as_ref()?.truststore.as_deref()?.to_str()
    }
}
