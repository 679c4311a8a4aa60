//! SCEP enrollment (RFC 8894), the node's side: what a `builtin:scep` mapping's
//! `PKIOperation` asks, answered with the registry and the local CA.
//!
//! - `PKCSReq`: the CSR's challenge password is a one-time enrollment code
//!   (`provisioning-template codes`); the certificate is issued, registered ACTIVE and attached
//!   to a thing by the code's template, exactly as an EST enrollment with a code. The key never
//!   leaves the device.
//! - `RenewalReq`: signed with the device's current certificate (registered ACTIVE, issued by
//!   the local CA, not expired): a new certificate for the same subject, as EST `simplereenroll`.
//! - `CertPoll`, or the same request sent again: the certificate already issued for the
//!   transaction, to the key that asked only (kept 7 days, on every node).
//! - `GetCert` and `GetCRL` are refused (`badRequest`).
//!
//! The registration authority (two certificates from the local CA, each with its own RSA key)
//! is made once: in the data directory (`scep/ra.pem`, `scep/ra-encryption.key`,
//! `scep/ra-signing.key`, 0600) on a single node, sealed in the registry under the cluster key
//! in a cluster; made again when it stops serving the local CA.

use anyhow::{Context, Result};
use base64::Engine as _;
use std::sync::Arc;

use portcullis_gateway::fleet::{
    FleetAnswer, FleetCall, FleetError, FleetProvisioning, FleetRequest,
};
use portcullis_pki::scep::{self, FailInfo, MessageType, Outcome, Ra, Request};
use portcullis_pki::{CaIssuer, Certificate, PrivateKey};
use portcullis_registry::{CertId, RegistryError, Store};
use serde_json::json;

use crate::cluster::Cluster;
use crate::data_dir::DataDir;
use crate::fleet::Fleet;
use crate::output::Outputs;

/// Fleet provisioning with SCEP: SCEP's calls answered here, the others by the fleet.
#[derive(Debug, Clone)]
pub(crate) struct WithScep {
    fleet: Fleet,
    ra: Arc<Ra>,
}

impl WithScep {
    pub(crate) fn new(fleet: Fleet, ra: Ra) -> WithScep {
        WithScep {
            fleet,
            ra: Arc::new(ra),
        }
    }
}

impl FleetProvisioning for WithScep {
    fn call(
        &self,
        request: FleetRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = FleetAnswer> + Send>> {
        let this = self.clone();
        Box::pin(async move {
            // SCEP authenticates by what the message carries, not by the connection.
            match &request.call {
                FleetCall::ScepCaCertificates => Ok(ca_certificates(&this.ra, &this.fleet.issuer)),
                FleetCall::ScepOperation { message } => {
                    let actor = format!("fleet:{}", request.client_id);
                    operation(&this.fleet, this.ra.clone(), message.clone(), &actor).await
                }
                _ => this.fleet.call(request).await,
            }
        })
    }
}

/// The RA's parts among the cluster's shared keys.
const CLUSTER_RA_ENCRYPTION: &str = "scep-ra-encryption";
const CLUSTER_RA_SIGNING: &str = "scep-ra-signing";

/// The SCEP registration authority for `ca`: the data dir's or the cluster's, made (or renewed)
/// when there is none that serves `ca`.
pub(crate) async fn load_ra(
    store: &Store,
    cluster: Option<&Cluster>,
    data: &DataDir,
    ca: &CaIssuer,
) -> Result<Ra> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let Some(cluster) = cluster else {
        let cert_path = data.root.join("scep/ra.pem");
        let key_paths = [
            data.root.join("scep/ra-encryption.key"),
            data.root.join("scep/ra-signing.key"),
        ];
        let read = || -> Result<Ra> {
            let certs = Certificate::all_from_pem_or_der(&std::fs::read(&cert_path)?)?;
            let [encryption, signing] = &key_paths;
            Ok(Ra::new(
                certs,
                PrivateKey::from_pem_or_der(&std::fs::read(encryption)?)?,
                PrivateKey::from_pem_or_der(&std::fs::read(signing)?)?,
            )?)
        };
        if cert_path.exists() {
            match read() {
                Ok(ra) if ra.serves(ca.certificate(), now) => return Ok(ra),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the SCEP RA in {} cannot be read: making a new one", cert_path.display())
                }
            }
        }
        let ra = Ra::issue(ca).context("making the SCEP RA")?;
        let (encryption, signing) = ra.keys();
        let mut out = Outputs::default();
        out.public(&cert_path, pem_of(ra.certificates()));
        out.secret(&key_paths[0], encryption.to_pem());
        out.secret(&key_paths[1], signing.to_pem());
        out.write(true)?;
        return Ok(ra);
    };
    // In a cluster: the RA's certificates and its two keys sealed, one shared entry each.
    let open = |name: &str, (pem, sealed): (String, String)| -> Result<(Certificate, PrivateKey)> {
        let (cert, _) = Certificate::first_and_rest(pem.as_bytes())?;
        let key = PrivateKey::from_pem_or_der(
            &cluster.key.open(&sealed, &format!("cluster-ca:{name}"))?,
        )?;
        Ok((cert, key))
    };
    let recorded = |name: &'static str| async move { store.cluster_ca(name).await };
    let parts = (
        recorded(CLUSTER_RA_ENCRYPTION).await?,
        recorded(CLUSTER_RA_SIGNING).await?,
    );
    if let (Some(e), Some(s)) = &parts {
        let (e_cert, e_key) = open(CLUSTER_RA_ENCRYPTION, e.clone())?;
        let (s_cert, s_key) = open(CLUSTER_RA_SIGNING, s.clone())?;
        let ra = Ra::new(vec![e_cert, s_cert], e_key, s_key).context("the cluster's SCEP RA")?;
        if ra.serves(ca.certificate(), now) {
            return Ok(ra);
        }
    }
    // None yet, or no longer serving the local CA: made here; the first node to record (or
    // replace) each part wins, and every node reads what was recorded.
    let fresh = Ra::issue(ca).context("making the SCEP RA")?;
    let (encryption, signing) = fresh.keys();
    for (name, cert, key, old) in [
        (
            CLUSTER_RA_ENCRYPTION,
            &fresh.certificates()[0],
            encryption,
            &parts.0,
        ),
        (
            CLUSTER_RA_SIGNING,
            &fresh.certificates()[1],
            signing,
            &parts.1,
        ),
    ] {
        let sealed = cluster
            .key
            .seal(key.pkcs8_der(), &format!("cluster-ca:{name}"))?;
        match old {
            None => store.init_cluster_ca(name, &cert.to_pem(), &sealed).await?,
            Some((old_pem, _)) => {
                store
                    .replace_cluster_ca(name, old_pem, &cert.to_pem(), &sealed)
                    .await?
            }
        };
    }
    let e = open(
        CLUSTER_RA_ENCRYPTION,
        recorded(CLUSTER_RA_ENCRYPTION)
            .await?
            .context("the SCEP RA was not recorded")?,
    )?;
    let s = open(
        CLUSTER_RA_SIGNING,
        recorded(CLUSTER_RA_SIGNING)
            .await?
            .context("the SCEP RA was not recorded")?,
    )?;
    Ra::new(vec![e.0, s.0], e.1, s.1).context("the cluster's SCEP RA")
}

fn pem_of(certs: &[Certificate]) -> String {
    certs.iter().map(Certificate::to_pem).collect()
}

/// GetCACert: the RA's certificates, then the CA's chain.
fn ca_certificates(ra: &Ra, ca: &CaIssuer) -> serde_json::Value {
    let pems: Vec<String> = ra
        .certificates()
        .iter()
        .chain(ca.chain().iter())
        .map(Certificate::to_pem)
        .collect();
    json!({ "certificatesPem": pems })
}

/// PKIOperation: the `CertRep` for `message` (`{"pkiMessage": base64}`); a message that cannot
/// be answered at all (not a SCEP request) is a 400.
async fn operation(fleet: &Fleet, ra: Arc<Ra>, message: Vec<u8>, actor: &str) -> FleetAnswer {
    // RSA and CMS work off the async workers.
    let reading = ra.clone();
    let request = tokio::task::spawn_blocking(move || scep::read_request(&message, &reading))
        .await
        .map_err(crate::fleet::internal)?
        .map_err(|e| {
            FleetError::invalid("InvalidRequest", format!("{e}; send a SCEP pkiMessage"))
        })?;
    let call = match request.message_type {
        MessageType::PkcsReq => "scep-pkcsreq",
        MessageType::RenewalReq => "scep-renewalreq",
        MessageType::CertPoll => "scep-certpoll",
        MessageType::GetCert => "scep-getcert",
        MessageType::GetCrl => "scep-getcrl",
    };
    let started = std::time::Instant::now();
    let outcome = decide(fleet, &request, actor).await;
    let result = match &outcome {
        Ok(_) => "accepted",
        Err(_) => "rejected",
    };
    metrics::counter!("portcullis_fleet_requests_total", "call" => call, "result" => result)
        .increment(1);
    metrics::histogram!("portcullis_fleet_request_seconds", "call" => call)
        .record(started.elapsed().as_secs_f64());
    let outcome = match outcome {
        Ok(certs) => {
            tracing::info!(target: "portcullis::fleet", call, transaction = %request.transaction_id, "SCEP request answered with a certificate");
            Outcome::Issued(certs)
        }
        Err((fail, reason)) => {
            tracing::info!(target: "portcullis::fleet", call, transaction = %request.transaction_id, fail_info = fail.name(), %reason, "SCEP request refused");
            // A message whose signature did not verify names no one: not audited (anyone can
            // put anyone's certificate in one).
            let verified = !matches!(request.content, Err(FailInfo::BadMessageCheck));
            let who = format!("scep:{}", key_hash(&request.signer));
            if verified
                && let Err(e) = fleet
                    .store
                    .record_fleet_refusal(&who, call, fail.name(), &reason, actor)
                    .await
            {
                tracing::warn!(target: "portcullis::fleet", error = %e, "cannot record a SCEP refusal");
            }
            Outcome::Failure(fail)
        }
    };
    let der = tokio::task::spawn_blocking(move || scep::reply(&request, &outcome, &ra))
        .await
        .map_err(crate::fleet::internal)?
        .map_err(crate::fleet::internal)?;
    Ok(json!({
        "pkiMessage": base64::engine::general_purpose::STANDARD.encode(der),
    }))
}

type Decision = std::result::Result<Vec<Certificate>, (FailInfo, String)>;

async fn decide(fleet: &Fleet, request: &Request, actor: &str) -> Decision {
    let content = match &request.content {
        Ok(c) => c,
        Err(FailInfo::BadAlg) => {
            return Err((
                FailInfo::BadAlg,
                "the content is encrypted with an algorithm other than AES-CBC".into(),
            ));
        }
        Err(fail) => {
            return Err((
                *fail,
                "the signature, the digest or the encryption (to the RA's certificate) does not check"
                    .into(),
            ));
        }
    };
    let signer_key = key_hash(&request.signer);
    // The same transaction again, or a poll: what was issued for it, to the same key only.
    if let Some(issued) = issued_for(fleet, request, &signer_key).await? {
        return Ok(issued);
    }
    let csr = match request.message_type {
        MessageType::PkcsReq | MessageType::RenewalReq => {
            portcullis_pki::pem::encode("CERTIFICATE REQUEST", content)
        }
        MessageType::CertPoll => {
            return Err((
                FailInfo::BadCertId,
                "no certificate was issued for this transaction to this key".into(),
            ));
        }
        MessageType::GetCert | MessageType::GetCrl => {
            return Err((
                FailInfo::BadRequest,
                format!(
                    "{} is not offered; certificates come back in the enrollment's answer",
                    request.message_type.name()
                ),
            ));
        }
    };
    if !request.can_receive() {
        return Err((
            FailInfo::BadAlg,
            "the request is signed with a key that is not RSA: SCEP answers are encrypted to it"
                .into(),
        ));
    }
    let answer = match request.message_type {
        MessageType::PkcsReq => {
            // The request is signed by the key it asks a certificate for (a self-signed
            // certificate over it): no one re-sends another device's CSR.
            if !scep::csr_key_is(content, &request.signer) {
                return Err((
                    FailInfo::BadRequest,
                    "the CSR's key must be the key that signed the request (a self-signed certificate over it)".into(),
                ));
            }
            let Some(code) = scep::challenge_password(content) else {
                return Err((
                    FailInfo::BadRequest,
                    "the CSR has no challenge password: put a one-time enrollment code there (provisioning-template codes)".into(),
                ));
            };
            fleet
                .enroll_with_code(&csr, None, &code, false, actor)
                .await
        }
        _ => renew(fleet, request, &csr, actor).await,
    };
    let answer = answer.map_err(|e| (FailInfo::BadRequest, e.message))?;
    let pem = answer["certificatesPem"][0].as_str().unwrap_or_default();
    let cert = Certificate::all_from_pem_or_der(pem.as_bytes())
        .ok()
        .and_then(|c| c.into_iter().next())
        .ok_or_else(|| {
            (
                FailInfo::BadRequest,
                "no certificate was issued".to_string(),
            )
        })?;
    let id = CertId::of_der(cert.der());
    if let Err(e) = fleet
        .store
        .record_scep_transaction(&request.transaction_id, &signer_key, &id)
        .await
    {
        tracing::warn!(target: "portcullis::fleet", error = %e, "cannot record a SCEP transaction");
    }
    Ok(with_chain(fleet, cert))
}

/// RenewalReq: the signer is the certificate being renewed.
async fn renew(fleet: &Fleet, request: &Request, csr: &str, actor: &str) -> FleetAnswer {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let info = request.signer.info();
    let refused = |message: String| FleetError {
        status: 403,
        code: "Forbidden",
        message,
    };
    if info.not_before_unix() > now {
        return Err(refused(
            "the certificate signing the renewal is not valid yet".into(),
        ));
    }
    if info.not_after_unix() < now {
        // Expired: renewal only, within its template's grace period.
        let id = CertId::of_der(request.signer.der());
        let grace_until = match fleet.store.renewal_terms(&id).await {
            Ok(terms) => terms.grace_until,
            Err(_) => info.not_after_unix(),
        };
        if grace_until <= now {
            return Err(refused(format!(
                "certificate {id} expired and has no grace period left (its template's renewal.grace_days)"
            )));
        }
    }
    let state = fleet.caller_state(&request.signer).await?;
    fleet
        .est_reenroll(&state, &request.signer, csr, actor)
        .await
}

/// The certificate already issued for this transaction to this key, with its chain.
async fn issued_for(
    fleet: &Fleet,
    request: &Request,
    signer_key: &str,
) -> std::result::Result<Option<Vec<Certificate>>, (FailInfo, String)> {
    let unavailable = |e: RegistryError| {
        tracing::warn!(target: "portcullis::fleet", error = %e, "reading a SCEP transaction");
        (
            FailInfo::BadRequest,
            "the registry could not be read; try again".to_string(),
        )
    };
    let Some(id) = fleet
        .store
        .scep_transaction(&request.transaction_id, signer_key)
        .await
        .map_err(unavailable)?
    else {
        return Ok(None);
    };
    let record = fleet.store.certificate(&id).await.map_err(unavailable)?;
    if record.status != portcullis_registry::CertStatus::Active {
        return Err((
            FailInfo::BadRequest,
            format!(
                "the certificate issued for this transaction is {}",
                record.status.as_str()
            ),
        ));
    }
    let cert = Certificate::all_from_pem_or_der(record.pem.as_bytes())
        .ok()
        .and_then(|c| c.into_iter().next())
        .ok_or_else(|| (FailInfo::BadRequest, "unreadable certificate".to_string()))?;
    Ok(Some(with_chain(fleet, cert)))
}

fn with_chain(fleet: &Fleet, cert: Certificate) -> Vec<Certificate> {
    std::iter::once(cert).chain(fleet.issuer.chain()).collect()
}

/// The SHA-256 of the signer's public key (hex): whose transaction it is.
fn key_hash(signer: &Certificate) -> String {
    portcullis_pki::cert::hex(&portcullis_pki::cert::sha256(&signer.spki_der()), "")
}
