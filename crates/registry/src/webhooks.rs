//! Webhook delivery: fans the event outbox out to subscriptions, POSTs due deliveries as signed
//! JSON, and records each attempt (retried with backoff). Every `portcullis serve` node runs one
//! dispatcher; leases in the store keep two nodes from sending one delivery at once.
//!
//! A delivery is a POST of the event JSON (with `delivery_id`) and these headers:
//! `X-Portcullis-Event`, `X-Portcullis-Delivery`, `X-Portcullis-Timestamp` (seconds since the
//! epoch) and `X-Portcullis-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
//! Only a 2xx answer counts as delivered; redirects are not followed; each attempt has 10
//! seconds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::Value;

use crate::store::DueDelivery;
use crate::{RegistryError, Store};

/// How long one attempt may take, connection included.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the dispatcher looks for work.
const TICK: Duration = Duration::from_secs(1);

/// How often expiring certificates and CAs are looked for.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(24 * 3600);

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An attempt's outcome: the 2xx status, or the status (if any) and why it failed.
type Outcome = Result<u16, (Option<u16>, String)>;

/// Attempts under way.
type InFlight = tokio::task::JoinSet<(DueDelivery, Outcome)>;

/// The signature header's value for `body` sent at `timestamp`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = aws_lc_rs::hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1={}", portcullis_pki::cert::hex(ctx.sign().as_ref(), ""))
}

/// How often fanned-out events older than a week are deleted.
const PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// Sends due deliveries; one per node.
#[derive(Debug)]
pub struct Dispatcher {
    store: Store,
}

/// HTTPS clients by CA bundle ("" = the system's roots), built once per process.
static CLIENTS: std::sync::OnceLock<std::sync::Mutex<HashMap<String, HttpsClient>>> =
    std::sync::OnceLock::new();

impl Dispatcher {
    /// A dispatcher over `store`.
    pub fn new(store: Store) -> Dispatcher {
        Dispatcher { store }
    }

    /// Runs until the process ends: fans events out and sends due deliveries every second,
    /// and checks for expiring certificates and CAs at start and daily. Errors (a database
    /// away) are logged and retried on the next tick.
    pub async fn run(mut self) {
        let mut inflight = tokio::task::JoinSet::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_expiry_check: Option<tokio::time::Instant> = None;
        let mut last_prune: Option<tokio::time::Instant> = None;
        loop {
            tick.tick().await;
            if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_INTERVAL) {
                last_prune = Some(tokio::time::Instant::now());
                if let Err(e) = self.store.prune_events().await {
                    tracing::warn!(target: "portcullis::webhooks", error = %e, "cannot delete old events; retrying later");
                }
            }
            if last_expiry_check.is_none_or(|t| t.elapsed() >= EXPIRY_INTERVAL) {
                match self.store.check_expiring().await {
                    Ok(n) => {
                        last_expiry_check = Some(tokio::time::Instant::now());
                        if n > 0 {
                            tracing::info!(target: "portcullis::webhooks", deliveries = n, "expiring certificates and CAs notified");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(target: "portcullis::webhooks", error = %e, "cannot check for expiring certificates; retrying")
                    }
                }
            }
            if let Err(e) = self.step(&mut inflight).await {
                tracing::warn!(target: "portcullis::webhooks", error = %e, "webhook dispatch failed; retrying");
            }
        }
    }

    /// One round: record finished attempts, fan out new events, and start sending what is due
    /// (at most 32 in flight: a receiver that hangs holds one slot, never the dispatcher).
    async fn step(&mut self, inflight: &mut InFlight) -> Result<(), RegistryError> {
        while let Some(done) = inflight.try_join_next() {
            let Ok((delivery, outcome)) = done else {
                continue;
            };
            match &outcome {
                Ok(status) => {
                    tracing::info!(target: "portcullis::webhooks", delivery = %delivery.id, event = %delivery.event_type, url = %redacted(&delivery.url), status, "webhook delivered")
                }
                Err((status, why)) => {
                    tracing::warn!(target: "portcullis::webhooks", delivery = %delivery.id, event = %delivery.event_type, url = %redacted(&delivery.url), status = status.unwrap_or_default(), attempt = delivery.attempts + 1, error = %why, "webhook delivery failed")
                }
            }
            self.store
                .record_delivery_attempt(&delivery.id, outcome)
                .await?;
        }
        self.store.fan_out_events(500).await?;
        let room = 32 - i64::try_from(inflight.len()).unwrap_or(32);
        if room <= 0 {
            return Ok(());
        }
        for delivery in self.store.claim_due_deliveries(room).await? {
            let client = client(&delivery.ca_pem);
            inflight.spawn(async move {
                let outcome = match client {
                    Ok(client) => send(&client, &delivery).await,
                    Err(why) => Err((None, why)),
                };
                (delivery, outcome)
            });
        }
        Ok(())
    }
}

/// The client for a CA bundle, built once.
fn client(ca_pem: &str) -> Result<HttpsClient, String> {
    let cache = CLIENTS.get_or_init(Default::default);
    if let Some(c) = cache.lock().ok().and_then(|c| c.get(ca_pem).cloned()) {
        return Ok(c);
    }
    let mut roots = rustls::RootCertStore::empty();
    if ca_pem.is_empty() {
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
    } else {
        let certs = portcullis_pki::Certificate::all_from_pem_or_der(ca_pem.as_bytes())
            .map_err(|e| format!("the webhook's CA bundle: {e}"))?;
        for c in certs {
            roots
                .add(c.der().clone())
                .map_err(|e| format!("the webhook's CA bundle: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(ATTEMPT_TIMEOUT));
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let client = Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    if let Ok(mut c) = cache.lock() {
        c.insert(ca_pem.to_string(), client.clone());
    }
    Ok(client)
}

/// A synchronous hook (a fleet provisioning template's pre-provisioning hook): POSTs `body`
/// to a webhook's URL, signed as deliveries are (event `event`), and answers the JSON of a 2xx
/// answer; anything else — a timeout, another status, a body that is not JSON — is the error.
pub async fn call_hook(
    url: &str,
    secret: &str,
    ca_pem: &str,
    event: &str,
    body: &Value,
    within: Duration,
) -> Result<Value, String> {
    let client = client(ca_pem)?;
    let body = body.to_string();
    let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let request = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header(
            "user-agent",
            concat!("portcullis-webhook/", env!("CARGO_PKG_VERSION")),
        )
        .header("x-portcullis-event", event)
        .header("x-portcullis-timestamp", timestamp.to_string())
        .header(
            "x-portcullis-signature",
            signature(secret, timestamp, body.as_bytes()),
        )
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let attempt = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| one_line_error(&e))?;
        let status = response.status();
        let answer = http_body_util::Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        serde_json::from_slice::<Value>(&answer).map_err(|e| format!("the answer is not JSON: {e}"))
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(answer) => answer,
        Err(_) => Err(format!("no answer within {} s", within.as_secs())),
    }
}

/// One attempt: the HTTP status of a 2xx answer, or the status (if any) and why it failed.
async fn send(client: &HttpsClient, d: &DueDelivery) -> Outcome {
    let mut body: Value = serde_json::from_str(&d.payload).unwrap_or(Value::Null);
    body["delivery_id"] = Value::String(d.id.clone());
    let body = body.to_string();
    let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let request = hyper::Request::post(&d.url)
        .header("content-type", "application/json")
        .header(
            "user-agent",
            concat!("portcullis-webhook/", env!("CARGO_PKG_VERSION")),
        )
        .header("x-portcullis-event", &d.event_type)
        .header("x-portcullis-delivery", &d.id)
        .header("x-portcullis-timestamp", timestamp.to_string())
        .header(
            "x-portcullis-signature",
            signature(&d.secret, timestamp, body.as_bytes()),
        )
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| (None, format!("cannot build the request: {e}")))?;
    let attempt = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| (None, one_line_error(&e)))?;
        let status = response.status();
        // The answer's body is not needed; read a little of it so the connection can be reused.
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            http_body_util::Limited::new(response.into_body(), 64 * 1024).collect(),
        )
        .await;
        if status.is_success() {
            Ok(status.as_u16())
        } else if status.is_redirection() {
            Err((
                Some(status.as_u16()),
                format!(
                    "HTTP {status}: redirects are not followed; give the webhook its final URL"
                ),
            ))
        } else {
            Err((Some(status.as_u16()), format!("HTTP {status}")))
        }
    };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
        Ok(outcome) => outcome,
        Err(_) => Err((
            None,
            format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()),
        )),
    }
}

/// A URL for logs: scheme, host, port and path only (user info and query may hold secrets).
fn redacted(url: &str) -> String {
    match url.parse::<hyper::Uri>() {
        Ok(u) => {
            format!(
                "{}://{}{}",
                u.scheme_str().unwrap_or("?"),
                u.host().unwrap_or("?"),
                u.port().map(|p| format!(":{p}")).unwrap_or_default()
            ) + u.path()
        }
        Err(_) => "(unparsable URL)".to_string(),
    }
}

/// An error and its causes on one line (an HTTP client's error, for logs and messages).
pub fn one_line_error(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_urls_lose_credentials_and_queries() {
        assert_eq!(
            redacted("https://user:pw@hooks.example.com:8443/in?token=s3cret"),
            "https://hooks.example.com:8443/in"
        );
    }

    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: python3 -c 'import hmac, hashlib;
        // print(hmac.new(b"whsec_test", b"1700000000.{}", hashlib.sha256).hexdigest())'.
        assert_eq!(
            signature("whsec_test", 1_700_000_000, b"{}"),
            "v1=35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91"
        );
    }
}
