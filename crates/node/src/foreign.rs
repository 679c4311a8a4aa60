//! Other CAs' revocation, fetched in the background: CRLs from the distribution points of the
//! certificates the gateway verifies, and OCSP answers from their responders, published to the
//! data path as one in-memory snapshot.
//!
//! The data path asks (a CRL or an OCSP status it does not have, or has past its date); this
//! worker fetches, verifies (a CRL signed by the chain's CA; an OCSP answer signed by the CA or
//! its delegated responder, about that very certificate, current), keeps, and fetches again
//! before it runs out: CRLs at the domain's refresh period and before nextUpdate, OCSP answers
//! at half their validity, failures again with backoff. CRLs are kept in the registry, so every
//! node of a cluster shares them (a node adopts a fresher CRL another fetched instead of
//! fetching it again) and a restarted node has them at once. Fetches run concurrently, a
//! bounded number at a time, each with a deadline: a responder that hangs delays nothing but
//! its own answer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use portcullis_gateway::ForeignHandle;
use portcullis_gateway::foreign::{
    DpCrl, FetchRequest, ForeignSnapshot, OcspCached, SourceFailure,
};
use portcullis_pki::Certificate;
use portcullis_pki::crl::Crl;
use portcullis_pki::ocsp::Status;
use portcullis_registry::Store;
use tokio::sync::mpsc;

/// Fetches under way at once.
const CONCURRENT: usize = 32;
/// A CRL fetch's deadline (connect, send, read all of it).
const CRL_DEADLINE: Duration = Duration::from_secs(15);
/// An OCSP request's deadline.
const OCSP_DEADLINE: Duration = Duration::from_secs(5);
/// The largest OCSP answer read.
const MAX_OCSP_BYTES: usize = 64 * 1024;
/// The longest wait after failures (doubling from one second).
const MAX_BACKOFF: i64 = 300;
/// An OCSP status is kept fresh this long after the data path last asked for it.
const OCSP_KEEP: i64 = 24 * 3600;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One CRL distribution point followed.
struct CrlSource {
    issuer: Certificate,
    refresh: i64,
    /// When to fetch next (seconds since the epoch).
    due: i64,
    failures: u32,
    busy: bool,
}

/// One certificate whose OCSP status is followed.
struct OcspSource {
    url: String,
    leaf: Certificate,
    issuer: Certificate,
    due: i64,
    failures: u32,
    busy: bool,
    asked_at: i64,
    refresh: i64,
}

/// What a fetch came back with.
enum Done {
    Crl {
        url: String,
        outcome: Result<(Crl, i64), String>,
    },
    Ocsp {
        id: String,
        outcome: Result<OcspCached, String>,
    },
}

/// Runs the worker: takes the data path's requests, fetches, publishes.
pub(crate) async fn run(store: Store, handle: ForeignHandle) {
    let Some(mut requests) = handle.requests() else {
        return;
    };
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(Duration::from_secs(3)));
    let client: HttpClient = Client::builder(hyper_util::rt::TokioExecutor::new())
        // No idle connections kept: fetches are rare, and a single-threaded responder (`openssl
        // ocsp`) serves nobody else while a client holds a connection open.
        .pool_max_idle_per_host(0)
        .build(http);
    let mut w = Worker {
        store,
        handle,
        client,
        crls: HashMap::new(),
        ocsp: HashMap::new(),
        permits: Arc::new(tokio::sync::Semaphore::new(CONCURRENT)),
    };
    let (done_tx, mut done) = mpsc::channel::<Done>(CONCURRENT * 4);
    w.load().await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some(request) = request else { return };
                w.asked(request);
                w.dispatch(&done_tx).await;
            }
            Some(d) = done.recv() => {
                // Publish once per batch of completions: the maps are copied once per batch,
                // not once per answer.
                let mut next = (*w.handle.load()).clone();
                w.finished(&mut next, d).await;
                while let Ok(d) = done.try_recv() {
                    w.finished(&mut next, d).await;
                }
                w.handle.store(next);
                w.dispatch(&done_tx).await;
            }
            _ = tick.tick() => {
                w.expire();
                w.dispatch(&done_tx).await;
                w.gauges();
            }
        }
    }
}

struct Worker {
    store: Store,
    handle: ForeignHandle,
    client: HttpClient,
    crls: HashMap<String, CrlSource>,
    ocsp: HashMap<String, OcspSource>,
    permits: Arc<tokio::sync::Semaphore>,
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl Worker {
    /// The CRLs the registry holds (fetched by this node before, or another): verified again
    /// and published, then followed.
    async fn load(&mut self) {
        let rows = match self.store.fetched_crls().await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!("cannot read the fetched CRLs from the registry: {e}");
                return;
            }
        };
        let mut next = (*self.handle.load()).clone();
        let mut crls = (*next.crls).clone();
        let mut failures = (*next.failures).clone();
        let t = now();
        for row in rows {
            let Ok(issuer) = Certificate::from_der(row.issuer_der.clone()) else {
                continue;
            };
            let mut due = t;
            if let Some(der) = &row.crl_der
                && let Ok(crl) = Crl::from_der(der.clone())
                && crl.verify_issued_by(&issuer).is_ok()
            {
                let fetched_at = row.fetched_at.unwrap_or(0);
                due = schedule(&crl, fetched_at, 3600).max(t);
                crls.insert(row.url.clone(), Arc::new(dp_crl(&crl, &issuer, fetched_at)));
            }
            if let (Some(error), Some(at)) = (&row.error, row.failed_at) {
                failures.insert(
                    row.url.clone(),
                    SourceFailure {
                        error: error.clone(),
                        at,
                    },
                );
            }
            self.crls.insert(
                row.url,
                CrlSource {
                    issuer,
                    refresh: 3600,
                    due,
                    failures: 0,
                    busy: false,
                },
            );
        }
        next.crls = Arc::new(crls);
        next.failures = Arc::new(failures);
        self.handle.store(next);
    }

    /// A request from the data path: follow the source (due now unless it is being fetched
    /// or was just fetched).
    fn asked(&mut self, request: FetchRequest) {
        let t = now();
        match request {
            FetchRequest::Crl {
                url,
                issuer,
                refresh,
            } => {
                let refresh = i64::try_from(refresh.as_secs()).unwrap_or(3600).max(1);
                let issuer = *issuer;
                let source = self.crls.entry(url).or_insert_with(|| CrlSource {
                    issuer: issuer.clone(),
                    refresh,
                    due: t,
                    failures: 0,
                    busy: false,
                });
                if source.refresh > refresh {
                    source.refresh = refresh;
                    source.due = source.due.min(t + refresh);
                }
                // Asked because it is missing or past nextUpdate: fetch now, unless a failure
                // put the next try later.
                if source.failures == 0 {
                    source.due = source.due.min(t);
                }
                if source.issuer.spki_der() != issuer.spki_der() {
                    source.issuer = issuer;
                    source.due = t;
                }
            }
            FetchRequest::Ocsp {
                url,
                leaf,
                issuer,
                refresh,
            } => {
                let refresh = i64::try_from(refresh.as_secs()).unwrap_or(3600).max(1);
                let id = leaf.info().id.clone();
                let source = self.ocsp.entry(id).or_insert_with(|| OcspSource {
                    url,
                    leaf: *leaf,
                    issuer: *issuer,
                    due: t,
                    failures: 0,
                    busy: false,
                    asked_at: t,
                    refresh,
                });
                source.asked_at = t;
                source.refresh = source.refresh.min(refresh);
                if source.failures == 0 {
                    source.due = source.due.min(t);
                }
            }
        }
    }

    /// Starts the fetches that are due, as many as the permits allow.
    async fn dispatch(&mut self, done: &mpsc::Sender<Done>) {
        let t = now();
        let snapshot = self.handle.load();
        for (url, source) in self.crls.iter_mut() {
            if source.busy || source.due > t {
                continue;
            }
            // What this node has: a CRL another node stored since is adopted, not fetched.
            let known = snapshot
                .crls
                .get(url)
                .map(|c| (c.fetched_at, source.refresh));
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                return;
            };
            source.busy = true;
            let (client, store, url, issuer, done) = (
                self.client.clone(),
                self.store.clone(),
                url.clone(),
                source.issuer.clone(),
                done.clone(),
            );
            tokio::spawn(async move {
                let outcome = fetch_crl(&client, &store, &url, &issuer, known).await;
                drop(permit);
                let _ = done.send(Done::Crl { url, outcome }).await;
            });
        }
        for (id, source) in self.ocsp.iter_mut() {
            if source.busy || source.due > t {
                continue;
            }
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                return;
            };
            source.busy = true;
            let (client, id, url, leaf, issuer, done) = (
                self.client.clone(),
                id.clone(),
                source.url.clone(),
                source.leaf.clone(),
                source.issuer.clone(),
                done.clone(),
            );
            tokio::spawn(async move {
                let outcome = fetch_ocsp(&client, &url, &leaf, &issuer).await;
                drop(permit);
                let _ = done.send(Done::Ocsp { id, outcome }).await;
            });
        }
    }

    /// A fetch came back: publish what it learned, schedule the next one.
    async fn finished(&mut self, next: &mut ForeignSnapshot, done: Done) {
        let t = now();
        match done {
            Done::Crl { url, outcome } => {
                let Some(source) = self.crls.get_mut(&url) else {
                    return;
                };
                source.busy = false;
                match outcome {
                    Ok((crl, fetched_at)) => {
                        source.failures = 0;
                        source.due = schedule(&crl, fetched_at, source.refresh).max(t + 1);
                        let fresh = dp_crl(&crl, &source.issuer, fetched_at);
                        let before = next.crls.get(&url).cloned();
                        let learned = fresh
                            .revoked
                            .keys()
                            .filter(|s| before.as_ref().is_none_or(|b| !b.revoked.contains_key(*s)))
                            .count();
                        if learned > 0 && before.is_some() {
                            metrics::counter!("portcullis_revocations_learned_total", "source" => "crl")
                                .increment(learned as u64);
                        }
                        tracing::info!(
                            target: "portcullis::revocation",
                            url = %url,
                            revoked = fresh.revoked.len(),
                            crl_number = %fresh.number.as_deref().unwrap_or(""),
                            "CRL fetched"
                        );
                        Arc::make_mut(&mut next.crls).insert(url.clone(), Arc::new(fresh));
                        Arc::make_mut(&mut next.failures).remove(&url);
                    }
                    Err(error) => {
                        source.failures += 1;
                        source.due = t + backoff(source.failures, source.refresh);
                        tracing::warn!(
                            target: "portcullis::revocation",
                            url = %url,
                            "fetching the CRL failed: {error}"
                        );
                        if let Err(e) = self
                            .store
                            .fetched_crl_failed(&url, source.issuer.der(), &error, t)
                            .await
                        {
                            tracing::warn!("cannot record the CRL failure in the registry: {e}");
                        }
                        Arc::make_mut(&mut next.failures)
                            .insert(url.clone(), SourceFailure { error, at: t });
                    }
                }
            }
            Done::Ocsp { id, outcome } => {
                let Some(source) = self.ocsp.get_mut(&id) else {
                    return;
                };
                source.busy = false;
                let key = format!("ocsp:{id}");
                match outcome {
                    Ok(cached) => {
                        source.failures = 0;
                        let valid = cached.valid_until();
                        source.due = (cached.fetched_at + (valid - cached.fetched_at) / 2)
                            .min(cached.fetched_at + source.refresh)
                            .max(t + 1);
                        let status = match cached.answer.status {
                            Status::Good => "good",
                            Status::Revoked { .. } => "revoked",
                            Status::Unknown => "unknown",
                        };
                        metrics::counter!("portcullis_ocsp_fetched_answers_total", "status" => status)
                            .increment(1);
                        let was_revoked = next
                            .ocsp
                            .get(&id)
                            .is_some_and(|c| matches!(c.answer.status, Status::Revoked { .. }));
                        if status == "revoked" && !was_revoked {
                            metrics::counter!("portcullis_revocations_learned_total", "source" => "ocsp")
                                .increment(1);
                            tracing::info!(
                                target: "portcullis::revocation",
                                url = %cached.url,
                                certificate = %id,
                                "the OCSP responder answers revoked"
                            );
                        }
                        Arc::make_mut(&mut next.ocsp).insert(id.clone(), Arc::new(cached));
                        Arc::make_mut(&mut next.failures).remove(&key);
                    }
                    Err(error) => {
                        source.failures += 1;
                        source.due = t + backoff(source.failures, source.refresh);
                        tracing::warn!(
                            target: "portcullis::revocation",
                            url = %source.url,
                            certificate = %id,
                            "asking the OCSP responder failed: {error}"
                        );
                        Arc::make_mut(&mut next.failures)
                            .insert(key, SourceFailure { error, at: t });
                    }
                }
            }
        }
    }

    /// OCSP statuses nobody asked about for a day are dropped once their answer runs out.
    fn expire(&mut self) {
        let t = now();
        let snapshot = self.handle.load();
        let stale: Vec<String> = self
            .ocsp
            .iter()
            .filter(|(id, s)| {
                !s.busy
                    && t - s.asked_at > OCSP_KEEP
                    && snapshot.ocsp.get(*id).is_none_or(|c| c.valid_until() <= t)
            })
            .map(|(id, _)| id.clone())
            .collect();
        if stale.is_empty() {
            return;
        }
        let mut next = (*snapshot).clone();
        for id in stale {
            self.ocsp.remove(&id);
            Arc::make_mut(&mut next.ocsp).remove(&id);
            Arc::make_mut(&mut next.failures).remove(&format!("ocsp:{id}"));
        }
        self.handle.store(next);
    }

    /// The age of each CRL, for the metrics endpoint.
    fn gauges(&self) {
        let snapshot = self.handle.load();
        let t = now();
        for (url, crl) in snapshot.crls.iter() {
            metrics::gauge!("portcullis_revocation_source_age_seconds", "kind" => "crl", "url" => url.clone())
                .set((t - crl.fetched_at) as f64);
        }
        metrics::gauge!("portcullis_revocation_ocsp_cached").set(snapshot.ocsp.len() as f64);
    }
}

/// When to fetch a CRL again: at the refresh period, and before its nextUpdate (a tenth of
/// its remaining life ahead, at least a minute when it has that long).
fn schedule(crl: &Crl, fetched_at: i64, refresh: i64) -> i64 {
    let mut due = fetched_at + refresh;
    if let Some(next) = crl.next_update_unix() {
        let life = (next - fetched_at).max(0);
        let margin = (life / 10).max(60.min(life / 2));
        due = due.min(next - margin);
    }
    due
}

fn backoff(failures: u32, refresh: i64) -> i64 {
    let step = 1i64 << failures.saturating_sub(1).min(16);
    step.min(MAX_BACKOFF).min(refresh.max(1))
}

/// The data path's form of a verified CRL.
fn dp_crl(crl: &Crl, issuer: &Certificate, fetched_at: i64) -> DpCrl {
    DpCrl {
        issuer_key: portcullis_pki::cert::sha256(&issuer.spki_der()),
        revoked: crl
            .info()
            .revoked
            .iter()
            .map(|r| {
                (
                    r.serial.clone(),
                    (r.revoked_at.clone(), r.reason.as_deref().map(rfc5280_name)),
                )
            })
            .collect(),
        next_update: crl.next_update_unix(),
        fetched_at,
        number: crl.info().crl_number.clone(),
    }
}

/// A CRL reason as RFC 5280 names it (`KeyCompromise` → `keyCompromise`).
fn rfc5280_name(reason: &str) -> String {
    let mut chars = reason.chars();
    match chars.next() {
        Some(first) => first.to_ascii_lowercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

/// Fetches the CRL at `url` (or adopts a fresher one another node stored), verifies it
/// against `issuer`, and keeps it in the registry; the CRL and when it was fetched.
async fn fetch_crl(
    client: &HttpClient,
    store: &Store,
    url: &str,
    issuer: &Certificate,
    known: Option<(i64, i64)>,
) -> Result<(Crl, i64), String> {
    let t = now();
    // Another node may have fetched it since this one did, recently enough (within half the
    // refresh period, at most 30 s).
    let (mine, refresh) = known.unwrap_or((0, 3600));
    if let Ok(Some(row)) = store.fetched_crl(url).await
        && let (Some(der), Some(at)) = (row.crl_der, row.fetched_at)
        && at > mine
        && t - at < (refresh / 2).min(30)
        && let Ok(crl) = Crl::from_der(der)
        && crl.verify_issued_by(issuer).is_ok()
        && crl.next_update_unix().is_none_or(|n| n > t)
    {
        metrics::counter!("portcullis_revocation_fetches_total", "kind" => "crl", "url" => url.to_string(), "result" => "shared").increment(1);
        return Ok((crl, at));
    }
    let result = async {
        let body = get(
            client,
            url,
            CRL_DEADLINE,
            portcullis_registry::MAX_FETCHED_CRL_BYTES,
            None,
        )
        .await?;
        let crl = Crl::all_from_pem_or_der(&body)
            .map_err(|e| format!("the answer is not a CRL ({e})"))?
            .into_iter()
            .next()
            .ok_or("the answer holds no CRL")?;
        crl.verify_issued_by(issuer).map_err(|e| e.to_string())?;
        if let Some(next) = crl.next_update_unix()
            && next <= t
        {
            return Err(format!(
                "the CRL served is past its nextUpdate ({})",
                crl.info().next_update.as_deref().unwrap_or("?")
            ));
        }
        store
            .put_fetched_crl(url, issuer.der(), crl.der(), crl.next_update_unix(), t)
            .await
            .map_err(|e| format!("cannot keep it in the registry: {e}"))?;
        Ok((crl, t))
    }
    .await;
    let label = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!("portcullis_revocation_fetches_total", "kind" => "crl", "url" => url.to_string(), "result" => label).increment(1);
    result
}

/// Asks the OCSP responder at `url` about `leaf` and checks its answer.
async fn fetch_ocsp(
    client: &HttpClient,
    url: &str,
    leaf: &Certificate,
    issuer: &Certificate,
) -> Result<OcspCached, String> {
    let result = async {
        let request = portcullis_pki::ocsp::request_for(leaf, issuer).map_err(|e| e.to_string())?;
        let body = get(client, url, OCSP_DEADLINE, MAX_OCSP_BYTES, Some(request)).await?;
        let t = now();
        let answer = portcullis_pki::ocsp::read_response(&body, leaf, issuer, t)
            .map_err(|e| e.to_string())?;
        Ok(OcspCached {
            url: url.to_string(),
            answer,
            fetched_at: t,
        })
    }
    .await;
    let label = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!("portcullis_revocation_fetches_total", "kind" => "ocsp", "url" => url.to_string(), "result" => label).increment(1);
    result
}

/// GETs `url` (or POSTs an OCSP request to it), within `deadline`, reading at most `limit`
/// bytes of a 200 answer.
async fn get(
    client: &HttpClient,
    url: &str,
    deadline: Duration,
    limit: usize,
    ocsp: Option<Vec<u8>>,
) -> Result<Vec<u8>, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("a bad URL ({e})"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// sources are fetched (CRLs and OCSP answers are signed)".into());
    }
    let request = match ocsp {
        Some(body) => hyper::Request::post(uri)
            .header("content-type", "application/ocsp-request")
            .header("accept", "application/ocsp-response")
            .body(Full::new(Bytes::from(body))),
        None => hyper::Request::get(uri).body(Full::new(Bytes::new())),
    }
    .map_err(|e| format!("cannot build the request: {e}"))?;
    let attempt = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| portcullis_registry::webhooks::one_line_error(&e))?;
        let status = response.status();
        if status != hyper::StatusCode::OK {
            return Err(format!("HTTP {status}"));
        }
        let body = http_body_util::Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok(body.to_vec())
    };
    match tokio::time::timeout(deadline, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} s", deadline.as_secs())),
    }
}
