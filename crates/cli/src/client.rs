//! The admin API client behind the control-plane commands. Locally it finds everything in the
//! data dir (the endpoint `serve` wrote, the local CA, the admin client certificate); remotely
//! `--endpoint`, `--ca` and `--token` (or PORTCULLIS_ENDPOINT, PORTCULLIS_CA, PORTCULLIS_TOKEN).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use portcullis_pki::{Certificate, PrivateKey};
use rustls::pki_types::PrivateKeyDer;
use serde_json::Value;

use crate::RuntimeFailure;
use portcullis_node::output::read;

/// How to reach the admin API.
#[derive(Debug, Clone, Args)]
pub struct Connect {
    /// Admin API URL (default: the one `portcullis serve` wrote to DATA_DIR/admin/endpoint).
    #[arg(long, env = "PORTCULLIS_ENDPOINT", global = true, value_name = "URL")]
    endpoint: Option<String>,
    /// Bearer token (default: the admin client certificate in DATA_DIR/admin).
    #[arg(
        long,
        env = "PORTCULLIS_TOKEN",
        global = true,
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Option<String>,
    /// CA bundle the admin API's certificate chains to (default DATA_DIR/ca/ca.pem).
    #[arg(
        id = "admin_ca",
        long = "admin-ca",
        env = "PORTCULLIS_CA",
        global = true,
        value_name = "FILE"
    )]
    ca: Option<PathBuf>,
    /// The data directory of the local `portcullis serve`.
    #[arg(
        long,
        env = "PORTCULLIS_DATA_DIR",
        global = true,
        default_value = "portcullis-data",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A connected admin API client.
#[derive(Clone)]
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// An error the API answered with (4xx: the caller's; 5xx: the server's).
#[derive(Debug)]
pub struct ApiFailure {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, HTTP {})",
            self.message,
            self.code,
            self.status.as_u16()
        )
    }
}

impl std::error::Error for ApiFailure {}

impl AdminClient {
    /// Connects as `connect` says.
    pub fn new(connect: &Connect) -> Result<AdminClient> {
        let admin = portcullis_node::admin::AdminFiles::new(&connect.data_dir);
        let base = match &connect.endpoint {
            Some(e) => e.trim_end_matches('/').to_string(),
            None => std::fs::read_to_string(admin.endpoint_file())
                .map(|s| s.trim().trim_end_matches('/').to_string())
                .map_err(|_| {
                    anyhow!(
                        "no admin API endpoint: start `portcullis serve --data-dir {}` or pass --endpoint URL",
                        connect.data_dir.display()
                    )
                })?,
        };
        if !base.starts_with("https://") {
            return Err(anyhow!(
                "--endpoint '{base}' must be an https:// URL (the admin API speaks only HTTPS)"
            ));
        }
        let ca_path = connect
            .ca
            .clone()
            .unwrap_or_else(|| connect.data_dir.join("ca/ca.pem"));
        let mut roots = rustls::RootCertStore::empty();
        for cert in Certificate::all_from_pem_or_der(&read(&ca_path, "admin API CA")?)
            .with_context(|| format!("reading {}", ca_path.display()))?
        {
            roots
                .add(cert.der().clone())
                .with_context(|| format!("{}: unusable CA certificate", ca_path.display()))?;
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let (cert_path, key_path) = admin.client_cert();
        if connect.token.is_none() && !cert_path.exists() {
            return Err(anyhow!(
                "no admin credentials: {} does not exist; pass --token (or PORTCULLIS_TOKEN) or --data-dir",
                cert_path.display()
            ));
        }
        let config = if connect.token.is_none() {
            let (cert, _) = Certificate::first_and_rest(&read(&cert_path, "admin certificate")?)?;
            let key = PrivateKey::from_pem_or_der(&read(&key_path, "admin key")?)?;
            let key = PrivateKeyDer::try_from(key.pkcs8_der().to_vec())
                .map_err(|e| anyhow!("admin key: {e}"))?;
            builder
                .with_client_auth_cert(vec![cert.der().clone()], key)
                .context("admin client certificate")?
        } else {
            builder.with_no_client_auth()
        };
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let http = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(AdminClient {
            base,
            token: connect.token.clone(),
            http,
        })
    }

    /// GET.
    pub async fn get(&self, path: &str) -> Result<Value> {
        self.call(Method::GET, path, None).await
    }

    /// POST a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.call(Method::POST, path, Some(serde_json::to_vec(body)?))
            .await
    }

    /// POST JSON text as it is (documents whose exact text matters).
    pub async fn post_text(&self, path: &str, body: String) -> Result<Value> {
        self.call(Method::POST, path, Some(body.into_bytes())).await
    }

    /// PATCH a JSON body.
    pub async fn patch(&self, path: &str, body: &Value) -> Result<Value> {
        self.call(Method::PATCH, path, Some(serde_json::to_vec(body)?))
            .await
    }

    /// PUT (a JSON body, or none).
    pub async fn put(&self, path: &str, body: Option<&Value>) -> Result<Value> {
        let body = body.map(serde_json::to_vec).transpose()?;
        self.call(Method::PUT, path, body).await
    }

    /// DELETE.
    pub async fn delete(&self, path: &str) -> Result<Value> {
        self.call(Method::DELETE, path, None).await
    }

    async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let payload = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(b)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .context("building the request")?;
        let response = tokio::time::timeout(Duration::from_secs(60), self.http.request(req))
            .await
            .map_err(|_| RuntimeFailure(format!("{url}: no answer within 60 s")))?
            .map_err(|e| {
                RuntimeFailure(format!(
                    "cannot reach the admin API at {url}: {}",
                    chain(&e)
                ))
            })?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| RuntimeFailure(format!("{url}: reading the answer: {e}")))?
            .to_bytes();
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes)
                .or_else(|_| Ok(Value::String(String::from_utf8_lossy(&bytes).into_owned())));
        }
        let error: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let failure = ApiFailure {
            status,
            code: error["code"].as_str().unwrap_or("error").to_string(),
            message: error["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string()),
        };
        if status.is_server_error() {
            Err(RuntimeFailure(failure.to_string()).into())
        } else {
            Err(failure.into())
        }
    }
}

/// The causes of a connection error, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Percent-encodes one path segment.
pub fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':' | b'@') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
