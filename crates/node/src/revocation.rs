//! Revocation published for the local CA, over plain HTTP (`[revocation]`): its CRL, an OCSP
//! responder (RFC 6960, GET and POST) and its certificate, at stable URLs that the leaves it
//! issues point to (CRL distribution point, authority information access).
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /crl/CA-ID.crl` | the CRL, DER (`application/pkix-crl`) |
//! | `GET /ca/CA-ID.crt` | the CA certificate, DER (`application/pkix-cert`) |
//! | `POST /ocsp` (`application/ocsp-request`), `GET /ocsp/BASE64` | the signed OCSP response |
//!
//! OCSP answers are signed by a delegated responder (RFC 6960 §4.2.2.2): a certificate the
//! local CA issues to each node for two weeks (EKU OCSPSigning, id-pkix-ocsp-nocheck), kept in
//! memory, sent with every answer and made again after a week; the CA's key signs only the CRL.
//!
//! What is published comes from the registry, followed in memory: re-read when its change
//! marker moves (checked every 250 ms, so a revocation reaches OCSP and the CRL within a second
//! on every node) and the CRL made again at half its lifetime. REVOKED certificates are revoked;
//! INACTIVE and PENDING_ACTIVATION ones are on hold (`certificateHold`), good again when
//! activated; a serial the registry does not know under this CA is `unknown`. Nothing here waits
//! on the database while answering.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use portcullis_pki::CaIssuer;
use portcullis_pki::ocsp::{ErrorStatus, Responder, Status};
use portcullis_registry::{CertStatus, Store};

/// How long an OCSP answer is valid (nextUpdate).
const OCSP_VALIDITY_SECS: i64 = 600;

/// The delegated OCSP responder's lifetime (days); made again at half of it. Each node has its
/// own, in memory only: the answers carry it.
const SIGNER_DAYS: u32 = 14;

/// The largest OCSP request read.
const MAX_REQUEST: usize = 16 * 1024;

/// What is published now.
struct Published {
    marker: i64,
    made_at: i64,
    /// Serial (without leading zero bytes) → status.
    statuses: HashMap<Vec<u8>, Status>,
    crl: Bytes,
}

/// The local CA's revocation publisher.
pub(crate) struct Revocation {
    store: Store,
    ca: Arc<CaIssuer>,
    ca_id: String,
    crl_secs: i64,
    published: ArcSwap<Published>,
    /// The delegated OCSP responder, and when it was made.
    signer: ArcSwap<(portcullis_pki::ocsp::Signer, i64)>,
    /// Serials of the server certificates this node serves from the local CA (not in the
    /// registry's certificates): `good` unless the registry says otherwise.
    served: ArcSwap<std::collections::HashSet<Vec<u8>>>,
}

/// The stable id of `ca` in URLs: its certificate's SHA-256, hex.
pub(crate) fn ca_id(ca: &CaIssuer) -> String {
    ca.certificate().info().id.clone()
}

/// The URLs leaves of `ca` carry when its revocation is published at `base`.
pub(crate) fn urls(base: &str, ca: &CaIssuer) -> portcullis_pki::RevocationUrls {
    let id = ca_id(ca);
    portcullis_pki::RevocationUrls {
        crl: format!("{base}/crl/{id}.crl"),
        ocsp: format!("{base}/ocsp"),
        ca_issuers: format!("{base}/ca/{id}.crt"),
    }
}

fn strip(serial: &[u8]) -> Vec<u8> {
    let start = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    serial[start..].to_vec()
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl Revocation {
    /// Publishes `ca`'s revocation from `store`: reads it once, then follows the registry.
    pub(crate) async fn start(
        store: Store,
        ca: Arc<CaIssuer>,
        crl_secs: i64,
    ) -> Result<Arc<Revocation>> {
        let first = build(&store, &ca, crl_secs).await?;
        let signer = portcullis_pki::ocsp::Signer::issue(&ca, SIGNER_DAYS)
            .context("making the OCSP responder's certificate")?;
        let this = Arc::new(Revocation {
            ca_id: ca_id(&ca),
            store,
            ca,
            crl_secs,
            published: ArcSwap::from_pointee(first),
            signer: ArcSwap::from_pointee((signer, now())),
            served: ArcSwap::from_pointee(Default::default()),
        });
        tokio::spawn(follow(this.clone()));
        Ok(this)
    }
}

/// Re-reads the registry when its marker moves, and makes the CRL again at half its lifetime.
async fn follow(this: Arc<Revocation>) {
    let mut every = tokio::time::interval(Duration::from_millis(250));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if now() >= this.signer.load().1 + i64::from(SIGNER_DAYS) * 86400 / 2 {
            match portcullis_pki::ocsp::Signer::issue(&this.ca, SIGNER_DAYS) {
                Ok(signer) => this.signer.store(Arc::new((signer, now()))),
                Err(e) => {
                    tracing::warn!(target: "portcullis::revocation", error = %e, "cannot renew the OCSP responder's certificate; the current one stays")
                }
            }
        }
        let current = this.published.load();
        let marker = match this.store.change_marker().await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "reading the registry's change marker for revocation");
                continue;
            }
        };
        if marker == current.marker && now() < current.made_at + this.crl_secs / 2 {
            continue;
        }
        match build(&this.store, &this.ca, this.crl_secs).await {
            Ok(next) => {
                metrics::counter!("portcullis_crl_published_total").increment(1);
                this.published.store(Arc::new(next));
            }
            Err(e) => {
                tracing::warn!(target: "portcullis::revocation", error = %e, "cannot publish the local CA's revocation; the previous CRL and statuses stay")
            }
        }
    }
}

/// Reads the CA's certificates' statuses and makes the CRL.
async fn build(store: &Store, ca: &CaIssuer, crl_secs: i64) -> Result<Published> {
    let marker = store.change_marker().await?;
    let subject = &ca.certificate().info().subject;
    let rows = store
        .statuses_by_issuer(subject)
        .await
        .context("reading the local CA's certificates")?;
    let mut statuses = HashMap::with_capacity(rows.len());
    let mut listed = Vec::new();
    for (serial, status, changed_at, reason) in rows {
        let Ok(bytes) = portcullis_pki::crl::parse_serial(&serial) else {
            continue;
        };
        let status = match status {
            CertStatus::Active => Status::Good,
            CertStatus::Revoked => Status::Revoked {
                at: changed_at,
                reason: reason
                    .as_deref()
                    .and_then(portcullis_registry::revocation_reason_code),
            },
            // Not valid now, may be again: on hold.
            CertStatus::Inactive | CertStatus::PendingActivation => Status::Revoked {
                at: changed_at,
                reason: Some(6),
            },
        };
        if let Status::Revoked { at, reason } = status {
            listed.push((bytes.clone(), at, reason));
        }
        statuses.insert(strip(&bytes), status);
    }
    let generation = u64::try_from(marker).unwrap_or(0);
    let crl = portcullis_pki::crl::create_at(ca, &listed, crl_secs, generation)
        .context("signing the local CA's CRL")?;
    Ok(Published {
        marker,
        made_at: now(),
        statuses,
        crl: Bytes::from(crl.der().to_vec()),
    })
}

/// SCEP on the plain-HTTP listener, when it answers it.
type Scep = Option<Arc<dyn portcullis_gateway::fleet::FleetProvisioning>>;

/// Serves the revocation endpoints on `listener` (plain HTTP/1.1), and SCEP at `/scep` when
/// `scep` is given.
pub(crate) fn serve(
    listener: tokio::net::TcpListener,
    this: Arc<Revocation>,
    scep: Scep,
) -> Result<()> {
    let bound = listener.local_addr()?;
    tracing::info!(target: "portcullis::revocation", address = %bound, "revocation (CRL, OCSP) served over plain HTTP");
    println!("portcullis revocation (CRL, OCSP) on http://{bound}");
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let this = this.clone();
            let scep = scep.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    let scep = scep.clone();
                    async move {
                        if let Some(service) = scep
                            && req.uri().path() == "/scep"
                        {
                            return Ok::<_, std::convert::Infallible>(
                                portcullis_gateway::serve_scep(req, Some(service), peer).await,
                            );
                        }
                        Ok(handle(&this, req)
                            .await
                            .map(|b| b.map_err(|never| match never {}).boxed()))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}

async fn handle(this: &Revocation, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let id = &this.ca_id;
    match (method, path.as_str()) {
        (Method::GET, p) if p == format!("/crl/{id}.crl") => {
            binary(this.published.load().crl.clone(), "application/pkix-crl")
        }
        (Method::GET, p) if p == format!("/ca/{id}.crt") => binary(
            Bytes::from(this.ca.certificate().der().to_vec()),
            "application/pkix-cert",
        ),
        (Method::POST, "/ocsp") => {
            match http_body_util::Limited::new(req.into_body(), MAX_REQUEST)
                .collect()
                .await
            {
                Ok(body) => ocsp(this, &body.to_bytes()),
                Err(_) => ocsp_error(ErrorStatus::MalformedRequest),
            }
        }
        (Method::GET, p) if p.starts_with("/ocsp/") => {
            // RFC 6960 A.1: the request's DER, base64, URL-encoded.
            let encoded = &p["/ocsp/".len()..];
            let decoded = percent_decode(encoded).and_then(|b64| {
                base64::engine::general_purpose::STANDARD
                    .decode(b64.as_bytes())
                    .ok()
            });
            match decoded {
                Some(der) => ocsp(this, &der),
                None => ocsp_error(ErrorStatus::MalformedRequest),
            }
        }
        _ => plain(
            StatusCode::NOT_FOUND,
            "this listener serves /crl/CA-ID.crl, /ca/CA-ID.crt and /ocsp",
        ),
    }
}

/// Answers an OCSP request from what is published.
fn ocsp(this: &Revocation, der: &[u8]) -> Response<Full<Bytes>> {
    let signer = this.signer.load();
    let Ok(responder) = Responder::new(&this.ca, &signer.0, OCSP_VALIDITY_SECS) else {
        return ocsp_error(ErrorStatus::InternalError);
    };
    let request = match responder.read(der) {
        Ok(r) => r,
        Err(_) => return ocsp_error(ErrorStatus::MalformedRequest),
    };
    if !request.asked.iter().any(|a| a.ours) {
        // RFC 6960 2.3: a responder asked about no certificate it serves.
        return ocsp_error(ErrorStatus::Unauthorized);
    }
    let published = this.published.load();
    let answers: Vec<_> = request
        .asked
        .iter()
        .map(|a| {
            let status = if a.ours {
                status_of(&published, &this.served.load(), &a.serial)
            } else {
                Status::Unknown
            };
            let name = match status {
                Status::Good => "good",
                Status::Revoked { .. } => "revoked",
                Status::Unknown => "unknown",
            };
            metrics::counter!("portcullis_ocsp_answers_total", "status" => name).increment(1);
            (a, status)
        })
        .collect();
    match responder.answer(&answers, request.nonce.as_deref(), now()) {
        Ok(signed) => binary(Bytes::from(signed), "application/ocsp-response"),
        Err(e) => {
            tracing::warn!(target: "portcullis::revocation", error = %e, "cannot sign an OCSP answer");
            ocsp_error(ErrorStatus::InternalError)
        }
    }
}

/// A serial's status: the registry's, else `good` for a server certificate this node serves,
/// else `unknown`.
fn status_of(
    published: &Published,
    served: &std::collections::HashSet<Vec<u8>>,
    serial: &[u8],
) -> Status {
    let serial = strip(serial);
    match published.statuses.get(&serial) {
        Some(status) => *status,
        None if served.contains(&serial) => Status::Good,
        None => Status::Unknown,
    }
}

impl Revocation {
    /// Staples a fresh OCSP answer to every domain whose server certificate the local CA
    /// issued (called every minute; answers are good for ten).
    pub(crate) fn staple(&self, gateway: &portcullis_gateway::Gateway) {
        let signer = self.signer.load();
        let Ok(responder) = Responder::new(&self.ca, &signer.0, OCSP_VALIDITY_SECS) else {
            return;
        };
        let mut served = std::collections::HashSet::new();
        let mut stapled = Vec::new();
        for (host, leaf) in gateway.served_certificates() {
            let Ok(cert) = portcullis_pki::Certificate::from_der(leaf.to_vec()) else {
                continue;
            };
            if !cert.is_signed_by(self.ca.certificate()) {
                continue;
            }
            let Ok(asked) = responder.asked_for(&cert) else {
                continue;
            };
            served.insert(strip(&asked.serial));
            stapled.push((host, leaf, asked));
        }
        self.served.store(Arc::new(served));
        let published = self.published.load();
        let served = self.served.load();
        for (host, leaf, asked) in stapled {
            let status = status_of(&published, &served, &asked.serial);
            match responder.answer(&[(&asked, status)], None, now()) {
                Ok(der) => gateway.staple(&host, &leaf, der),
                Err(e) => {
                    tracing::warn!(target: "portcullis::revocation", error = %e, domain = %host, "cannot staple an OCSP answer")
                }
            }
        }
    }
}

fn ocsp_error(status: ErrorStatus) -> Response<Full<Bytes>> {
    binary(
        Bytes::from(portcullis_pki::ocsp::error_response(status)),
        "application/ocsp-response",
    )
}

fn binary(body: Bytes, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{text}\n"))));
    *resp.status_mut() = status;
    resp
}

fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
