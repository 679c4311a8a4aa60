//! Revocation learned from other CAs, as the data path sees it: CRLs the node fetched from the
//! distribution points of presented certificates, and OCSP answers it asked their responders
//! for, in an in-memory snapshot the node replaces as fetches complete.
//!
//! Invariants: the handshake only reads the snapshot; what is missing or due is asked of the
//! node through a bounded queue ([`ForeignView::ask`], never blocking, each source at most
//! once per [`ASK_EVERY`]); a responder that hangs stalls nobody's handshake. A connection
//! admitted while an answer was pending is checked again when the answer arrives (the
//! snapshot's replacement ticks the same change notification as the registry's).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis_pki::Certificate;
use portcullis_pki::ocsp::{Answer, Status};
use tokio::sync::mpsc;

/// How a domain uses OCSP for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OcspMode {
    /// Not asked.
    #[default]
    Off,
    /// A certificate whose status is not known yet (or whose responder fails) is admitted;
    /// a `revoked` answer closes its connections within a second.
    Soft,
    /// A certificate's status must be known and `good`: the first connection of a certificate
    /// never seen is refused (asking to retry), or waits up to the domain's bound.
    Hard,
}

/// A domain's use of other CAs' revocation sources (`mtls.revocation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignPolicy {
    /// Fetch and check the CRLs named by the chain's CRL distribution points.
    pub crl_dp: bool,
    /// OCSP for the leaf, from its AIA's responder.
    pub ocsp: OcspMode,
    /// How long the first connection of a certificate whose revocation status is not known yet
    /// waits for it (the handshake completes, nothing is served until then); zero: refused at
    /// once, asking to retry.
    pub wait: Duration,
    /// Fetch each CRL, and ask each OCSP status, again at least this often (and before its
    /// nextUpdate).
    pub refresh: Duration,
}

impl Default for ForeignPolicy {
    fn default() -> Self {
        ForeignPolicy {
            crl_dp: false,
            ocsp: OcspMode::Off,
            wait: Duration::ZERO,
            refresh: Duration::from_secs(3600),
        }
    }
}

impl ForeignPolicy {
    /// Whether anything is checked.
    pub fn is_on(&self) -> bool {
        self.crl_dp || self.ocsp != OcspMode::Off
    }
}

/// A CRL fetched from a distribution point and verified against the CA that issued it.
#[derive(Debug, Clone)]
pub struct DpCrl {
    /// SHA-256 of the issuing CA's subject public key info: the CRL counts only for chains
    /// whose issuer has that key.
    pub issuer_key: [u8; 32],
    /// Revoked serials (colon hex, as certificates print them) → (revocation time RFC 3339,
    /// reason).
    pub revoked: HashMap<String, (String, Option<String>)>,
    /// nextUpdate (seconds since the epoch).
    pub next_update: Option<i64>,
    /// When this node (or another) fetched it.
    pub fetched_at: i64,
    /// Its CRL number.
    pub number: Option<String>,
}

/// An OCSP answer about one certificate, from its responder.
#[derive(Debug, Clone)]
pub struct OcspCached {
    /// The responder.
    pub url: String,
    /// What it answered.
    pub answer: Answer,
    /// When.
    pub fetched_at: i64,
}

impl OcspCached {
    /// Until when the answer may be used: its nextUpdate, or an hour after thisUpdate when
    /// the responder gives none.
    pub fn valid_until(&self) -> i64 {
        self.answer
            .next_update
            .unwrap_or(self.answer.this_update + 3600)
    }
}

/// A source's last failure.
#[derive(Debug, Clone)]
pub struct SourceFailure {
    /// Why (one line).
    pub error: String,
    /// When (seconds since the epoch).
    pub at: i64,
}

/// What the node knows from other CAs' revocation sources.
#[derive(Debug, Clone, Default)]
pub struct ForeignSnapshot {
    /// Distribution point URL → its last good CRL.
    pub crls: Arc<HashMap<String, Arc<DpCrl>>>,
    /// Certificate id → the last good OCSP answer about it.
    pub ocsp: Arc<HashMap<String, Arc<OcspCached>>>,
    /// Distribution point URL, or `ocsp:` + certificate id → the last attempt's failure (gone
    /// once one succeeds).
    pub failures: Arc<HashMap<String, SourceFailure>>,
}

/// Something the data path needs fetched.
#[derive(Debug, Clone)]
pub enum FetchRequest {
    /// The CRL at a distribution point, issued by `issuer`.
    Crl {
        /// The URL.
        url: String,
        /// The CA that signs it (the next certificate of the verified chain).
        issuer: Box<Certificate>,
        /// The domain's refresh period.
        refresh: Duration,
    },
    /// The OCSP status of `leaf`, issued by `issuer`, from the responder at `url`.
    Ocsp {
        /// The responder.
        url: String,
        /// The certificate.
        leaf: Box<Certificate>,
        /// Its issuer.
        issuer: Box<Certificate>,
        /// The domain's refresh period (answers are asked again at least this often, and at
        /// half their validity).
        refresh: Duration,
    },
}

impl FetchRequest {
    fn key(&self) -> String {
        match self {
            FetchRequest::Crl { url, .. } => url.clone(),
            FetchRequest::Ocsp { leaf, .. } => format!("ocsp:{}", leaf.info().id),
        }
    }
}

/// Requests queued before the queue refuses (the node drains it continuously).
const QUEUE: usize = 10_000;

/// A source is asked for at most once in this period (a reconnect storm of one certificate
/// is one request).
pub const ASK_EVERY: Duration = Duration::from_secs(2);

/// The snapshot and the queue to the node.
#[derive(Debug)]
pub(crate) struct ForeignView {
    pub(crate) snapshot: arc_swap::ArcSwap<ForeignSnapshot>,
    requests: mpsc::Sender<FetchRequest>,
    receiver: Mutex<Option<mpsc::Receiver<FetchRequest>>>,
    asked: Mutex<HashMap<String, Instant>>,
}

/// Why the foreign sources refuse a chain (the gateway's `revoked`, `crl-expired` and
/// `revocation-unknown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A CRL lists it, or its OCSP responder answers revoked.
    Revoked,
    /// The CRL covering it is past nextUpdate and cannot be fetched again.
    CrlExpired,
    /// Its status is not known (never fetched, unfetchable, responder failing or answering
    /// unknown under `ocsp = "hard"`).
    Unknown,
}

/// The outcome of checking a verified chain against the foreign sources.
#[derive(Debug)]
pub(crate) enum ForeignCheck {
    /// Nothing refuses it.
    Admit,
    /// Refused, and why.
    Refuse(Refusal, String),
    /// Its status is not known yet (being fetched): the policy says to wait.
    Wait(String),
}

impl ForeignView {
    pub(crate) fn new() -> ForeignView {
        let (requests, receiver) = mpsc::channel(QUEUE);
        ForeignView {
            snapshot: arc_swap::ArcSwap::from_pointee(ForeignSnapshot::default()),
            requests,
            receiver: Mutex::new(Some(receiver)),
            asked: Mutex::new(HashMap::new()),
        }
    }

    /// The receiving end, the first time only.
    pub(crate) fn take(&self) -> Option<mpsc::Receiver<FetchRequest>> {
        self.receiver.lock().ok()?.take()
    }

    /// Asks the node to fetch, unless the same source was asked for within [`ASK_EVERY`];
    /// never blocks (a full queue drops the request: the next handshake asks again).
    fn ask(&self, request: FetchRequest) {
        let key = request.key();
        let now = Instant::now();
        {
            let Ok(mut asked) = self.asked.lock() else {
                return;
            };
            if asked
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < ASK_EVERY)
            {
                return;
            }
            if asked.len() > 100_000 {
                asked.retain(|_, t| now.duration_since(*t) < ASK_EVERY);
            }
            asked.insert(key, now);
        }
        let _ = self.requests.try_send(request);
    }

    /// Checks a verified `chain` (leaf first, anchor last) against the foreign sources the
    /// `policy` names, at `now`. With `ask`, what is missing or due is requested from the node.
    /// `allow_stale`: the domain's stale-CRL policy (a CRL past nextUpdate, or one that cannot
    /// be fetched, then refuses nothing).
    pub(crate) fn check(
        &self,
        policy: &ForeignPolicy,
        chain: &[Certificate],
        allow_stale: bool,
        ask: bool,
        now: i64,
    ) -> ForeignCheck {
        if !policy.is_on() {
            return ForeignCheck::Admit;
        }
        let snapshot = self.snapshot.load();
        let mut wait = None;
        for (i, pair) in chain.windows(2).enumerate() {
            let (cert, issuer) = (&pair[0], &pair[1]);
            if policy.crl_dp {
                match self.check_crl(policy, &snapshot, cert, issuer, allow_stale, ask, now) {
                    ForeignCheck::Admit => {}
                    ForeignCheck::Wait(why) => wait = wait.or(Some(why)),
                    refused => return refused,
                }
            }
            if i == 0 && policy.ocsp != OcspMode::Off {
                match self.check_ocsp(policy, &snapshot, cert, issuer, ask, now) {
                    ForeignCheck::Admit => {}
                    ForeignCheck::Wait(why) => wait = wait.or(Some(why)),
                    refused => return refused,
                }
            }
        }
        match wait {
            Some(why) if policy.wait.is_zero() => {
                ForeignCheck::Refuse(Refusal::Unknown, format!("{why}; retry in a moment"))
            }
            Some(why) => ForeignCheck::Wait(why),
            None => ForeignCheck::Admit,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_crl(
        &self,
        policy: &ForeignPolicy,
        snapshot: &ForeignSnapshot,
        cert: &Certificate,
        issuer: &Certificate,
        allow_stale: bool,
        ask: bool,
        now: i64,
    ) -> ForeignCheck {
        let urls: Vec<&String> = cert
            .info()
            .crl_distribution_points
            .iter()
            .filter(|u| u.starts_with("http://"))
            .collect();
        if urls.is_empty() {
            return ForeignCheck::Admit;
        }
        let issuer_key = portcullis_pki::cert::sha256(&issuer.spki_der());
        let found = urls.iter().find_map(|u| {
            snapshot
                .crls
                .get(u.as_str())
                .filter(|c| c.issuer_key == issuer_key)
                .map(|c| (u, c))
        });
        let subject = &cert.info().subject;
        let Some((url, crl)) = found else {
            if ask {
                for u in &urls {
                    self.ask(FetchRequest::Crl {
                        url: (*u).clone(),
                        issuer: Box::new(issuer.clone()),
                        refresh: policy.refresh,
                    });
                }
            }
            if allow_stale {
                return ForeignCheck::Admit;
            }
            let url = urls[0];
            return match snapshot.failures.get(url.as_str()) {
                Some(f) => ForeignCheck::Refuse(
                    Refusal::Unknown,
                    format!(
                        "the CRL of '{subject}' cannot be fetched from {url}: {} (mtls.stale_crl = \"allow\" admits it meanwhile)",
                        f.error
                    ),
                ),
                None => ForeignCheck::Wait(format!(
                    "the CRL of '{subject}' is being fetched from {url}"
                )),
            };
        };
        if let Some((at, reason)) = crl.revoked.get(&cert.info().serial) {
            return ForeignCheck::Refuse(
                Refusal::Revoked,
                format!(
                    "'{subject}' (serial {}) is revoked{} since {at}, in the CRL from {url} (fetched {} s ago)",
                    cert.info().serial,
                    reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default(),
                    (now - crl.fetched_at).max(0)
                ),
            );
        }
        if let Some(next) = crl.next_update
            && next <= now
        {
            if ask {
                self.ask(FetchRequest::Crl {
                    url: url.to_string(),
                    issuer: Box::new(issuer.clone()),
                    refresh: policy.refresh,
                });
            }
            if !allow_stale {
                let failed = snapshot
                    .failures
                    .get(url.as_str())
                    .map(|f| format!("; the last fetch failed: {}", f.error))
                    .unwrap_or_default();
                return ForeignCheck::Refuse(
                    Refusal::CrlExpired,
                    format!(
                        "the CRL from {url} covering '{subject}' is past its nextUpdate ({}){failed}",
                        rfc3339(next)
                    ),
                );
            }
        }
        ForeignCheck::Admit
    }

    fn check_ocsp(
        &self,
        policy: &ForeignPolicy,
        snapshot: &ForeignSnapshot,
        leaf: &Certificate,
        issuer: &Certificate,
        ask: bool,
        now: i64,
    ) -> ForeignCheck {
        let Some(url) = leaf
            .info()
            .authority_info_access
            .iter()
            .find_map(|a| a.strip_prefix("ocsp:"))
            .filter(|u| u.starts_with("http://"))
        else {
            return ForeignCheck::Admit;
        };
        let id = &leaf.info().id;
        let subject = &leaf.info().subject;
        let hard = policy.ocsp == OcspMode::Hard;
        match snapshot.ocsp.get(id) {
            Some(cached) if cached.valid_until() > now => match cached.answer.status {
                Status::Good => ForeignCheck::Admit,
                Status::Revoked { at, reason } => ForeignCheck::Refuse(
                    Refusal::Revoked,
                    format!(
                        "the OCSP responder {} answers that '{subject}' is revoked{} since {} (answered {} s ago)",
                        cached.url,
                        reason
                            .and_then(portcullis_pki::crl::reason_name)
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default(),
                        rfc3339(at),
                        (now - cached.fetched_at).max(0)
                    ),
                ),
                Status::Unknown if hard => ForeignCheck::Refuse(
                    Refusal::Unknown,
                    format!(
                        "the OCSP responder {} does not know '{subject}' (answers unknown)",
                        cached.url
                    ),
                ),
                Status::Unknown => ForeignCheck::Admit,
            },
            _ => {
                if ask {
                    self.ask(FetchRequest::Ocsp {
                        url: url.to_string(),
                        leaf: Box::new(leaf.clone()),
                        issuer: Box::new(issuer.clone()),
                        refresh: policy.refresh,
                    });
                }
                if !hard {
                    return ForeignCheck::Admit;
                }
                match snapshot.failures.get(&format!("ocsp:{id}")) {
                    Some(f) => ForeignCheck::Refuse(
                        Refusal::Unknown,
                        format!(
                            "the OCSP status of '{subject}' cannot be had from {url}: {}",
                            f.error
                        ),
                    ),
                    None => ForeignCheck::Wait(format!(
                        "the OCSP status of '{subject}' is being asked of {url}"
                    )),
                }
            }
        }
    }

    /// Where the revocation status of `chain` comes from, for `explain`: each foreign source
    /// consulted, with its age.
    pub(crate) fn sources(
        &self,
        policy: &ForeignPolicy,
        chain: &[Certificate],
        now: i64,
    ) -> Vec<serde_json::Value> {
        let snapshot = self.snapshot.load();
        let mut out = Vec::new();
        for (i, pair) in chain.windows(2).enumerate() {
            let cert = &pair[0];
            if policy.crl_dp {
                for url in cert
                    .info()
                    .crl_distribution_points
                    .iter()
                    .filter(|u| u.starts_with("http://"))
                {
                    let crl = snapshot.crls.get(url);
                    out.push(serde_json::json!({
                        "certificate": cert.info().subject,
                        "source": "crl",
                        "url": url,
                        "fetched": crl.is_some(),
                        "age_seconds": crl.map(|c| (now - c.fetched_at).max(0)),
                        "next_update": crl.and_then(|c| c.next_update).map(rfc3339),
                        "crl_number": crl.and_then(|c| c.number.clone()),
                        "last_error": snapshot.failures.get(url).map(|f| f.error.clone()),
                    }));
                }
            }
            if i == 0
                && policy.ocsp != OcspMode::Off
                && let Some(url) = cert
                    .info()
                    .authority_info_access
                    .iter()
                    .find_map(|a| a.strip_prefix("ocsp:"))
            {
                let cached = snapshot.ocsp.get(&cert.info().id);
                out.push(serde_json::json!({
                    "certificate": cert.info().subject,
                    "source": "ocsp",
                    "url": url,
                    "mode": if policy.ocsp == OcspMode::Hard { "hard" } else { "soft" },
                    "answer": cached.map(|c| match c.answer.status {
                        Status::Good => "good",
                        Status::Revoked { .. } => "revoked",
                        Status::Unknown => "unknown",
                    }),
                    "age_seconds": cached.map(|c| (now - c.fetched_at).max(0)),
                    "valid_until": cached.map(|c| rfc3339(c.valid_until())),
                    "last_error": snapshot.failures.get(&format!("ocsp:{}", cert.info().id)).map(|f| f.error.clone()),
                }));
            }
        }
        out
    }
}

fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}
