//! Fleet provisioning by claim, the node's side: answers what devices ask over IoT Core's MQTT
//! API ([`portcullis_gateway::fleet`]) with the registry and the local CA.
//!
//! - `CreateKeysAndCertificate`: a P-256 key and a client certificate made here; the key is
//!   answered once and kept nowhere.
//! - `CreateCertificateFromCsr`: the device's CSR signed (its key never leaves the device);
//!   weak keys, bad self-signatures and subjects policies would misread are refused.
//! - Both register the certificate PENDING_ACTIVATION with a single-use ownership token (one
//!   hour); a certificate whose token expires unspent is deleted by [`sweep`].
//! - `RegisterThing`: the template (enabled, and one the claim may use) plans the thing from
//!   the new certificate and the parameters; the registry spends the token and makes
//!   everything in one transaction; the answer waits until this node enforces it.
//!
//! Every outcome is in the audit log (actor `fleet:<client id>`).

use std::sync::Arc;
use std::time::Duration;

use portcullis_gateway::fleet::{
    FleetAnswer, FleetCall, FleetError, FleetProvisioning, FleetRequest,
};
use portcullis_pki::{CaIssuer, IssueRequest, KeyType, PrivateKey, Profile, SubjectName};
use portcullis_registry::{CertId, RegistryError, Store};
use serde_json::json;

/// The node's fleet provisioning.
#[derive(Debug, Clone)]
pub(crate) struct Fleet {
    pub(crate) store: Store,
    pub(crate) issuer: Arc<CaIssuer>,
    sync: Arc<crate::sync::SyncStatus>,
    token: Arc<crate::token::TokenSigner>,
}

/// How long `RegisterThing` waits for this node to enforce the registration before answering
/// (a device connects with its new certificate right after `accepted`).
const ENFORCED_WITHIN: Duration = Duration::from_secs(3);

impl Fleet {
    pub(crate) fn new(
        store: Store,
        issuer: Arc<CaIssuer>,
        sync: Arc<crate::sync::SyncStatus>,
        token: Arc<crate::token::TokenSigner>,
    ) -> Fleet {
        Fleet {
            store,
            issuer,
            sync,
            token,
        }
    }

    async fn answer(&self, request: FleetRequest) -> FleetAnswer {
        let actor = format!("fleet:{}", request.client_id);

        let started = std::time::Instant::now();
        let Some(caller_cert) = request.caller.clone() else {
            // No certificate: only an EST enrollment with a one-time code.
            let answer = match &request.call {
                FleetCall::EstEnroll {
                    csr,
                    template,
                    code: Some(code),
                    server_keygen,
                } => {
                    self.enroll_with_code(csr, template.as_deref(), code, *server_keygen, &actor)
                        .await
                }
                _ => Err(FleetError {
                    status: 401,
                    code: "Unauthorized",
                    message: "a client certificate is needed".into(),
                }),
            };
            return self
                .finish(
                    "est-simpleenroll-code",
                    "enrollment-code",
                    &request,
                    &actor,
                    started,
                    answer,
                )
                .await;
        };
        let caller = CertId::of_der(caller_cert.der());
        // An expired certificate only renews, within its template's grace period (the gateway
        // admits it for that alone; checked again here).
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if caller_cert.info().not_after_unix() <= now {
            let renewing = matches!(request.call, FleetCall::Reenroll { .. });
            let in_grace = renewing
                && self
                    .store
                    .renewal_terms(&caller)
                    .await
                    .is_ok_and(|t| t.grace_until > now);
            if !in_grace {
                let refused = Err(forbidden(format!(
                    "certificate {caller} expired{}",
                    if renewing {
                        " and has no grace period left (its template's renewal.grace_days)"
                    } else {
                        ": an expired certificate may only renew, within its grace period"
                    }
                )));
                return self
                    .finish(
                        "expired",
                        caller.as_str(),
                        &request,
                        &actor,
                        started,
                        refused,
                    )
                    .await;
            }
        }
        // Whatever the domain's registry mode: only ACTIVE certificates (or claims) are served.
        let state = match request.call {
            FleetCall::CaCertificates
            | FleetCall::Jwks
            | FleetCall::ScepCaCertificates
            | FleetCall::ScepOperation { .. } => Caller::Refused(String::new()),
            _ => match self.caller_state(&caller_cert).await {
                Ok(state) => state,
                Err(e) => return Err(e),
            },
        };
        let (call, answer) = match request.call.clone() {
            FleetCall::CreateKeysAndCertificate => (
                "create-keys-and-certificate",
                match &state {
                    Caller::Refused(why) => Err(forbidden(why.clone())),
                    _ => self.create(caller.as_str(), None, false, &actor).await,
                },
            ),
            FleetCall::CreateCertificateFromCsr { csr } => (
                "create-certificate-from-csr",
                match &state {
                    Caller::Refused(why) => Err(forbidden(why.clone())),
                    _ => {
                        self.create(caller.as_str(), Some(&csr), false, &actor)
                            .await
                    }
                },
            ),
            FleetCall::RegisterThing {
                template,
                token,
                parameters,
            } => (
                "register-thing",
                self.register(
                    &state,
                    caller.as_str(),
                    &template,
                    &token,
                    &parameters,
                    &actor,
                )
                .await,
            ),
            FleetCall::CaCertificates => ("est-cacerts", Ok(self.ca_certificates())),
            FleetCall::Jwks => ("jwks", Ok(self.token.jwks())),
            FleetCall::Token {
                audience,
                lifetime_secs,
                issuer,
            } => (
                "token",
                self.issue_token(&state, &caller_cert, &audience, lifetime_secs, &issuer)
                    .await,
            ),
            FleetCall::EstEnroll {
                csr,
                template,
                server_keygen,
                ..
            } => (
                if server_keygen {
                    "est-serverkeygen"
                } else {
                    "est-simpleenroll"
                },
                self.est_enroll(
                    &state,
                    &caller_cert,
                    &csr,
                    template.as_deref(),
                    server_keygen,
                    &actor,
                )
                .await,
            ),
            FleetCall::Reenroll { csr } => (
                "renew",
                self.est_reenroll(&state, &caller_cert, &csr, &actor).await,
            ),
            FleetCall::ScepCaCertificates | FleetCall::ScepOperation { .. } => {
                return Err(internal("SCEP calls reach the fleet only through WithScep"));
            }
        };
        self.finish(call, caller.as_str(), &request, &actor, started, answer)
            .await
    }

    /// Counts, logs and (for a refusal) audits an answer.
    async fn finish(
        &self,
        call: &'static str,
        caller: &str,
        request: &FleetRequest,
        actor: &str,
        started: std::time::Instant,
        answer: FleetAnswer,
    ) -> FleetAnswer {
        let result = match &answer {
            Ok(_) => "accepted",
            Err(_) => "rejected",
        };
        metrics::counter!("portcullis_fleet_requests_total", "call" => call, "result" => result)
            .increment(1);
        metrics::histogram!("portcullis_fleet_request_seconds", "call" => call)
            .record(started.elapsed().as_secs_f64());
        match &answer {
            Ok(_) => {
                tracing::info!(target: "portcullis::fleet", call, client_id = %request.client_id, "fleet provisioning accepted")
            }
            Err(e) => {
                tracing::info!(target: "portcullis::fleet", call, client_id = %request.client_id, code = e.code, reason = %e.message, "fleet provisioning rejected");
                if let Err(failed) = self
                    .store
                    .record_fleet_refusal(caller, call, e.code, &e.message, actor)
                    .await
                {
                    tracing::warn!(target: "portcullis::fleet", error = %failed, "cannot record a fleet provisioning refusal");
                }
            }
        }
        answer
    }

    /// `CreateKeysAndCertificate` (`csr: None`) or `CreateCertificateFromCsr`.
    /// `CreateKeysAndCertificate` (`csr: None`) or `CreateCertificateFromCsr`, for `caller` (the
    /// asking certificate's id, or the enrollment code's mark).
    /// With `server_keygen`, the key is made here for the CSR's subject (EST `serverkeygen`).
    async fn create(
        &self,
        caller: &str,
        csr: Option<&str>,
        server_keygen: bool,
        actor: &str,
    ) -> FleetAnswer {
        let mut request = IssueRequest::new(Profile::Client, SubjectName::cn("device"));
        request.days = 365;
        let (cert, key) = match csr {
            Some(csr) if server_keygen => {
                let key = PrivateKey::generate(KeyType::EcP256).map_err(internal)?;
                let cert = portcullis_pki::issue::issue_for_subject_of(
                    csr.as_bytes(),
                    &request,
                    &key,
                    &self.issuer,
                )
                .map_err(|e| {
                    FleetError::invalid("InvalidCsr", format!("the CSR cannot be used: {e}"))
                })?;
                if let Some((attribute, c)) = cert.subject_separator() {
                    return Err(FleetError::invalid(
                        "InvalidCsr",
                        format!(
                            "the CSR's subject {attribute} holds {c:?}, which policies read as a separator or wildcard; choose another value"
                        ),
                    ));
                }
                (cert, Some(key))
            }
            Some(csr) => {
                let cert = portcullis_pki::issue::sign_csr(csr.as_bytes(), &request, &self.issuer)
                    .map_err(|e| {
                        FleetError::invalid("InvalidCsr", format!("the CSR cannot be signed: {e}"))
                    })?;
                if let Some((attribute, c)) = cert.subject_separator() {
                    return Err(FleetError::invalid(
                        "InvalidCsr",
                        format!(
                            "the CSR's subject {attribute} holds {c:?}, which policies read as a separator or wildcard; choose another value"
                        ),
                    ));
                }
                (cert, None)
            }
            None => {
                let key = PrivateKey::generate(KeyType::EcP256).map_err(internal)?;
                let name = format!("device-{}", random_hex(8).map_err(internal)?);
                request.subject = SubjectName::cn(name);
                let cert = portcullis_pki::issue::issue(&request, &key, Some(&self.issuer))
                    .map_err(internal)?;
                (cert, Some(key))
            }
        };
        let (record, token) = self
            .store
            .register_fleet_certificate(&cert, caller, actor)
            .await
            .map_err(|e| match e {
                RegistryError::Invalid(why) => FleetError::invalid("InvalidCsr", why),
                other => internal(other),
            })?;
        let mut answer = json!({
            "certificateId": record.id,
            "certificatePem": cert.to_pem(),
            "certificateOwnershipToken": token,
        });
        if let Some(key) = key {
            answer["privateKey"] = json!(key.to_pem());
        }
        Ok(answer)
    }

    /// `RegisterThing`.
    async fn register(
        &self,
        state: &Caller,
        caller: &str,
        template: &str,
        token: &str,
        parameters: &std::collections::BTreeMap<String, String>,
        actor: &str,
    ) -> FleetAnswer {
        let not_found = || FleetError {
            status: 404,
            code: "ResourceNotFound",
            message: format!("there is no enabled provisioning template '{template}'"),
        };
        let record = match self.store.fleet_template(template).await {
            Ok(r) if r.enabled => r,
            Ok(_) | Err(RegistryError::NotFound(_)) => return Err(not_found()),
            Err(e) => return Err(internal(e)),
        };
        // The built-in claim policy already limits the topic; this holds if it is ever bypassed.
        match state {
            Caller::Claim(allowed) if !allowed.iter().any(|t| t == template) => {
                return Err(forbidden(format!(
                    "this claim certificate may not use template '{template}'"
                )));
            }
            Caller::Refused(why) => return Err(forbidden(why.clone())),
            _ => {}
        }
        let invalid_token = || {
            FleetError::invalid(
                "InvalidCertificateOwnershipToken",
                "the certificate ownership token is unknown, spent or expired (tokens are single use, for one hour): ask for a new certificate",
            )
        };
        let certificate = match self.store.ownership_token(token).await {
            Ok(Some(id)) => id,
            Ok(None) => return Err(invalid_token()),
            Err(e) => return Err(internal(e)),
        };
        let stored = self
            .store
            .certificate(&certificate)
            .await
            .map_err(internal)?;
        let cert = portcullis_pki::Certificate::first_and_rest(stored.pem.as_bytes())
            .map(|(c, _)| c)
            .map_err(internal)?;
        let mut parameters = parameters.clone();
        if let Some(hook) = &record.template.pre_provisioning_hook {
            let overrides = self
                .pre_provisioning(hook, template, &parameters, &stored, caller)
                .await?;
            parameters.extend(overrides);
        }
        let mut plan = record
            .template
            .plan(&cert, &parameters)
            .map_err(|why| FleetError::invalid("InvalidParameters", why))?;
        plan.template = Some(template.to_string());
        match self
            .store
            .register_fleet_thing(token, &certificate, &plan, actor)
            .await
        {
            Ok(_) => {
                // Answered once this node admits the new certificate: the device connects
                // with it next (other nodes follow within a second).
                if let Ok(seq) = self.store.change_marker().await
                    && !self.sync.enforced(seq, ENFORCED_WITHIN).await
                {
                    tracing::warn!(target: "portcullis::fleet", seq, "a registered device's certificate is not enforced here yet");
                }
                Ok(json!({
                    "thingName": plan.thing_name,
                    "deviceConfiguration": plan.device_configuration,
                }))
            }
            Err(RegistryError::Conflict(why)) if why.contains("ownership token") => {
                Err(invalid_token())
            }
            Err(RegistryError::Conflict(why) | RegistryError::Invalid(why)) => {
                Err(FleetError::invalid("InvalidParameters", why))
            }
            Err(e) => Err(internal(e)),
        }
    }
}

impl Fleet {
    /// Asks the template's pre-provisioning hook (a webhook, signed as deliveries are):
    /// `{"allowProvisioning": true, "parameterOverrides": {…}}` lets the device register with
    /// those parameters changed; anything else — a denial, a failure, no answer within 5 s —
    /// refuses it (fail closed).
    async fn pre_provisioning(
        &self,
        hook: &str,
        template: &str,
        parameters: &std::collections::BTreeMap<String, String>,
        certificate: &portcullis_registry::CertRecord,
        caller: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, FleetError> {
        let denied = |why: String| FleetError {
            status: 403,
            code: "Forbidden",
            message: format!("the pre-provisioning hook refused: {why}"),
        };
        let subscribed = self
            .store
            .webhook(hook)
            .await
            .map_err(|e| denied(e.to_string()))?
            .events
            .iter()
            .any(|e| e == PRE_PROVISION);
        if !subscribed {
            return Err(denied(format!(
                "webhook '{hook}' is not subscribed to {PRE_PROVISION}"
            )));
        }
        let (url, secret, ca) = self
            .store
            .webhook_target(hook)
            .await
            .map_err(|e| denied(e.to_string()))?;
        let body = json!({
            "event": PRE_PROVISION,
            "templateName": template,
            "parameters": parameters,
            "certificateId": certificate.id,
            "certificatePem": certificate.pem,
            "claimCertificateId": caller,
        });
        let answer = portcullis_registry::webhooks::call_hook(
            &url,
            &secret,
            &ca,
            PRE_PROVISION,
            &body,
            HOOK_TIMEOUT,
        )
        .await
        .map_err(denied)?;
        if answer["allowProvisioning"] != true {
            return Err(denied("allowProvisioning is not true".into()));
        }
        let mut overrides = std::collections::BTreeMap::new();
        if let Some(map) = answer["parameterOverrides"].as_object() {
            for (k, v) in map {
                let Some(v) = v.as_str() else {
                    return Err(denied(format!("parameter override '{k}' is not a string")));
                };
                overrides.insert(k.clone(), v.to_string());
            }
        }
        Ok(overrides)
    }
}

/// The event a pre-provisioning hook's webhook subscribes to.
const PRE_PROVISION: &str = "provisioning.pre_provision";

/// Who asks, as the registry sees it.
pub(crate) enum Caller {
    /// A claim certificate, with the templates it may use.
    Claim(Vec<String>),
    /// A registered ACTIVE device certificate.
    Device(Box<portcullis_registry::CertRecord>),
    /// Neither: why.
    Refused(String),
}

fn forbidden(message: impl Into<String>) -> FleetError {
    FleetError {
        status: 403,
        code: "Forbidden",
        message: message.into(),
    }
}

/// How long a pre-provisioning hook has to answer (IoT Core gives its Lambda 5 s).
const HOOK_TIMEOUT: Duration = Duration::from_secs(5);

impl Fleet {
    /// A short-lived JWT for `caller` (any admitted certificate but a claim): bound to the
    /// certificate, naming its thing and the thing's attributes.
    async fn issue_token(
        &self,
        state: &Caller,
        caller: &portcullis_pki::Certificate,
        audience: &str,
        lifetime_secs: u64,
        issuer: &str,
    ) -> FleetAnswer {
        let things = match state {
            Caller::Device(record) => record.things.clone(),
            Caller::Claim(_) => {
                return Err(forbidden(
                    "a claim certificate gets no token: it may only provision a device",
                ));
            }
            Caller::Refused(why) => {
                return Err(forbidden(format!(
                    "{why}: only a registered ACTIVE certificate gets a token"
                )));
            }
        };
        let id = CertId::of_der(caller.der());
        let attributes = match things.first() {
            Some(t) => self
                .store
                .thing(t)
                .await
                .map(|t| t.attributes)
                .unwrap_or_default(),
            None => Default::default(),
        };
        let subject = things
            .first()
            .cloned()
            .unwrap_or_else(|| format!("cert:{id}"));
        let claims = json!({
            "iss": issuer,
            "sub": subject,
            "aud": audience,
            "cnf": {"x5t#S256": crate::token::thumbprint(caller.der())},
            "cert_id": id,
            "cert_subject": caller.info().subject,
            "thing": things.first(),
            "attributes": attributes,
        });
        let token = self.token.sign(claims, lifetime_secs).map_err(internal)?;
        Ok(json!({
            "token": token,
            "token_type": "Bearer",
            "expires_in": lifetime_secs.min(crate::token::MAX_LIFETIME_SECS),
        }))
    }

    /// The local CA's chain (what devices' certificates chain to).
    fn ca_certificates(&self) -> serde_json::Value {
        let pems: Vec<String> = self.issuer.chain().iter().map(|c| c.to_pem()).collect();
        json!({ "certificatesPem": pems })
    }

    /// What the registry says the caller is, whatever the domain's registry mode: a claim (its
    /// templates: marked itself, or issued by an ACTIVE claim CA), an ACTIVE device certificate,
    /// or refused (registered but not ACTIVE, or unknown).
    pub(crate) async fn caller_state(
        &self,
        caller: &portcullis_pki::Certificate,
    ) -> Result<Caller, FleetError> {
        let id = CertId::of_der(caller.der());
        let registered = match self.store.certificate(&id).await {
            Ok(r) => Some(r),
            Err(RegistryError::NotFound(_)) => None,
            Err(e) => return Err(internal(e)),
        };
        if let Some(r) = &registered
            && r.status != portcullis_registry::CertStatus::Active
        {
            return Ok(Caller::Refused(format!(
                "certificate {id} is {}",
                r.status.as_str()
            )));
        }
        if let Some(templates) = registered.as_ref().and_then(|r| r.claim_templates.clone()) {
            return Ok(Caller::Claim(templates));
        }
        let cas = self.store.list_cas().await.map_err(internal)?;
        let by_ca = cas
            .into_iter()
            .filter(|ca| ca.status == portcullis_registry::CaStatus::Active)
            .find_map(|ca| {
                let templates = ca.claim_templates?;
                let (cert, _) =
                    portcullis_pki::Certificate::first_and_rest(ca.pem.as_bytes()).ok()?;
                caller.is_signed_by(&cert).then_some(templates)
            });
        Ok(match (by_ca, registered) {
            (Some(templates), _) => Caller::Claim(templates),
            (None, Some(record)) => Caller::Device(Box::new(record)),
            (None, None) => Caller::Refused(format!("certificate {id} is not registered")),
        })
    }

    /// EST `simpleenroll` by a device with no certificate yet, authenticated by a one-time
    /// enrollment code: the code is spent, and given back if the template refuses.
    pub(crate) async fn enroll_with_code(
        &self,
        csr: &str,
        label: Option<&str>,
        code: &str,
        server_keygen: bool,
        actor: &str,
    ) -> FleetAnswer {
        let unauthorized = || FleetError {
            status: 401,
            code: "Unauthorized",
            message: "the enrollment code is unknown, spent or expired".into(),
        };
        let (template, expires_at) = match self.store.spend_enrollment_code(code).await {
            Ok(Some(spent)) => spent,
            Ok(None) => return Err(unauthorized()),
            Err(e) => return Err(internal(e)),
        };
        let kept = template.clone();
        let refused = |e: FleetError| {
            let kept = kept.clone();
            async move {
                let _ = self
                    .store
                    .restore_enrollment_code(code, &kept, expires_at)
                    .await;
                e
            }
        };
        if let Some(label) = label
            && label != template
        {
            let e = forbidden(format!(
                "this enrollment code is for template '{template}', not '{label}'"
            ));
            return Err(refused(e).await);
        }
        let mark = format!("enrollment-code:{template}");
        let created = match self.create(&mark, Some(csr), server_keygen, actor).await {
            Ok(c) => c,
            Err(e) => return Err(refused(e).await),
        };
        let (Some(id), Some(token), Some(pem)) = (
            created["certificateId"].as_str(),
            created["certificateOwnershipToken"].as_str(),
            created["certificatePem"].as_str(),
        ) else {
            return Err(refused(internal("the new certificate's answer is incomplete")).await);
        };
        let state = Caller::Claim(vec![template.clone()]);
        if let Err(e) = self
            .register(&state, &mark, &template, token, &Default::default(), actor)
            .await
        {
            if let Ok(id) = id.parse::<CertId>() {
                let _ = self.store.delete_certificate(&id, actor).await;
            }
            return Err(refused(e).await);
        }
        Ok(enrolled(pem, &created))
    }

    /// EST `simpleenroll`: a claim certificate enrolls a device under the template named as the
    /// EST label — the CSR signed, registered and provisioned at once (nothing is left behind
    /// when the template refuses).
    async fn est_enroll(
        &self,
        state: &Caller,
        caller: &portcullis_pki::Certificate,
        csr: &str,
        template: Option<&str>,
        server_keygen: bool,
        actor: &str,
    ) -> FleetAnswer {
        let Caller::Claim(allowed) = state else {
            return Err(forbidden(
                "simpleenroll takes an ACTIVE claim (bootstrap) certificate; a registered device renews with simplereenroll",
            ));
        };
        let Some(template) = template else {
            return Err(FleetError::invalid(
                "InvalidParameters",
                "name the provisioning template as the EST label: /.well-known/est/TEMPLATE/simpleenroll",
            ));
        };
        if !allowed.iter().any(|t| t == template) {
            return Err(FleetError {
                status: 403,
                code: "Forbidden",
                message: format!("this claim certificate may not use template '{template}'"),
            });
        }
        let caller_id = CertId::of_der(caller.der());
        let created = self
            .create(caller_id.as_str(), Some(csr), server_keygen, actor)
            .await?;
        let (Some(id), Some(token), Some(pem)) = (
            created["certificateId"].as_str(),
            created["certificateOwnershipToken"].as_str(),
            created["certificatePem"].as_str(),
        ) else {
            return Err(internal("the new certificate's answer is incomplete"));
        };
        let registered = self
            .register(
                state,
                caller_id.as_str(),
                template,
                token,
                &Default::default(),
                actor,
            )
            .await;
        if let Err(e) = registered {
            // Not the device's: gone at once, not left for the sweep.
            if let Ok(id) = id.parse::<CertId>() {
                let _ = self.store.delete_certificate(&id, actor).await;
            }
            return Err(e);
        }
        Ok(enrolled(pem, &created))
    }

    /// EST `simplereenroll`: a registered ACTIVE certificate gets a new one for the same
    /// subject (RFC 7030 §4.2.2: subject and SANs identical), attached to the same things with
    /// the same certificate policies; the current one stays ACTIVE (its replacement overlaps).
    pub(crate) async fn est_reenroll(
        &self,
        state: &Caller,
        caller: &portcullis_pki::Certificate,
        csr: &str,
        actor: &str,
    ) -> FleetAnswer {
        let id = CertId::of_der(caller.der());
        match state {
            Caller::Device(_) => {}
            Caller::Claim(_) => {
                return Err(forbidden(
                    "a claim certificate does not renew: devices get their own by provisioning",
                ));
            }
            Caller::Refused(why) => {
                return Err(forbidden(format!(
                    "{why}: only a registered ACTIVE device certificate renews"
                )));
            }
        }
        // Renewed by the CA that issued it: a partner CA's certificate renewed by the local CA
        // would gain whatever is attached to the local CA.
        if !caller.is_signed_by(self.issuer.certificate()) {
            return Err(forbidden(format!(
                "certificate {id} was not issued by this node's local CA; renew it with the CA that issued it"
            )));
        }
        let mut request = IssueRequest::new(Profile::Client, SubjectName::cn("device"));
        request.days = 365;
        let cert = portcullis_pki::issue::sign_csr(csr.as_bytes(), &request, &self.issuer)
            .map_err(|e| {
                FleetError::invalid("InvalidCsr", format!("the CSR cannot be signed: {e}"))
            })?;
        let (new, old) = (cert.info(), caller.info());
        if new.subject != old.subject || new.subject_alt_names != old.subject_alt_names {
            return Err(FleetError::invalid(
                "InvalidCsr",
                format!(
                    "the CSR's subject and alternative names must be those of the certificate being renewed ('{}')",
                    old.subject
                ),
            ));
        }
        let record = self
            .store
            .register_renewal(&cert, &id, actor, true)
            .await
            .map_err(|e| match e {
                RegistryError::Invalid(why) | RegistryError::Conflict(why) => {
                    FleetError::invalid("InvalidCsr", why)
                }
                other => internal(other),
            })?;
        if let Ok(seq) = self.store.change_marker().await {
            let _ = self.sync.enforced(seq, ENFORCED_WITHIN).await;
        }
        tracing::info!(target: "portcullis::fleet", renewed = %id, certificate = %record.id, "certificate renewed");
        Ok(json!({
            "certificateId": record.id,
            "certificatePem": cert.to_pem(),
            "certificatesPem": [cert.to_pem()],
        }))
    }
}

impl FleetProvisioning for Fleet {
    fn call(
        &self,
        request: FleetRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = FleetAnswer> + Send>> {
        let fleet = self.clone();
        Box::pin(async move { fleet.answer(request).await })
    }
}

/// An EST enrollment's answer: the certificate, and the key when it was made here
/// (`serverkeygen`).
fn enrolled(pem: &str, created: &serde_json::Value) -> serde_json::Value {
    let mut answer = json!({ "certificatesPem": [pem] });
    if let Some(key) = created.get("privateKey") {
        answer["privateKey"] = key.clone();
    }
    answer
}

/// Ours, not the device's: logged in full, answered without internals.
pub(crate) fn internal(e: impl std::fmt::Display) -> FleetError {
    tracing::warn!(target: "portcullis::fleet", error = %e, "fleet provisioning failed");
    FleetError {
        status: 500,
        code: "InternalFailure",
        message: "the registry could not complete the request; try again".into(),
    }
}

fn random_hex(bytes: usize) -> Result<String, portcullis_pki::PkiError> {
    let random = portcullis_pki::issue::random_serial()?;
    Ok(portcullis_pki::cert::hex(
        &random[random.len().saturating_sub(bytes)..],
        "",
    ))
}

/// Every minute: deletes the certificates made for devices that never registered them (their
/// ownership token expired unspent), and sets the renewal gauges
/// (`portcullis_certificates_renewal{state="due"|"in_grace"|"overdue"}`,
/// `portcullis_certificates_renewed`), and ends overlaps that ran out (a renewed certificate
/// retired by time) and forgets old SCEP transactions.
pub(crate) async fn sweep(store: Store) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    loop {
        every.tick().await;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match store.renewal_counts(now).await {
            Ok(c) => {
                metrics::gauge!("portcullis_certificates_renewal", "state" => "due")
                    .set(c.due as f64);
                metrics::gauge!("portcullis_certificates_renewal", "state" => "overdue")
                    .set(c.overdue as f64);
                metrics::gauge!("portcullis_certificates_renewal", "state" => "in_grace")
                    .set(c.in_grace as f64);
                metrics::gauge!("portcullis_certificates_renewed").set(c.renewed as f64);
            }
            Err(e) => tracing::debug!(error = %e, "counting certificates due for renewal"),
        }
        match store.end_overlaps(now, "fleet:sweeper").await {
            Ok(retired) => {
                for (old, new) in &retired {
                    tracing::info!(target: "portcullis::registry", certificate = %old, renewed_by = %new, "a renewed certificate retired (INACTIVE): its overlap ended");
                }
            }
            Err(e) => tracing::debug!(error = %e, "ending renewal overlaps"),
        }
        if let Err(e) = store.prune_scep_transactions().await {
            tracing::debug!(error = %e, "forgetting old SCEP transactions");
        }
        match store
            .sweep_unclaimed_certificates(now, "fleet:sweeper")
            .await
        {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(target: "portcullis::fleet", deleted = n, "deleted certificates whose ownership token expired unspent")
            }
            Err(e) => tracing::debug!(error = %e, "sweeping unclaimed fleet certificates"),
        }
    }
}
