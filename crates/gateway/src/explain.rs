//! `portcullis explain`: the decision the gateway would take for a certificate on a domain,
//! step by step (domain, chain, registry, mapping), without sending or changing anything.

use std::sync::Arc;

use arc_swap::ArcSwap;
use portcullis_pki::Certificate;
use serde_json::{Value, json};

use crate::State;
use crate::config::RegistryMode;
use crate::config::{Authorization, MtlsMode, OnFailure};
use crate::http::decide::Refusal;
use crate::registry_view::{RegisteredStatus, RegistryDecision};
use crate::verdict::{ClientVerdict, Rejection};
use crate::verify::CertificateTrace;
use portcullis_pki::verify::Verdict;

/// Explains decisions on the gateway's current state.
#[derive(Debug, Clone)]
pub struct Explainer {
    state: Arc<ArcSwap<State>>,
}

impl Explainer {
    pub(crate) fn new(state: Arc<ArcSwap<State>>) -> Explainer {
        Explainer { state }
    }

    /// The trace for `chain` (leaf first) presented to `domain` (the SNI) with a request
    /// `method path`, under the domain's verification profile or `profile`; an error when no
    /// domain would take the connection.
    #[allow(clippy::too_many_arguments)]
    pub fn explain(
        &self,
        domain: &str,
        host: Option<&str>,
        source_ip: Option<std::net::IpAddr>,
        method: &str,
        target: &str,
        chain: &[Certificate],
        profile: Option<portcullis_pki::VerifyProfile>,
    ) -> Result<Value, String> {
        let state = self.state.load();
        let sni = domain.to_ascii_lowercase();
        let Some((d, via_default)) = state.select(Some(&sni)) else {
            return Err(format!(
                "no domain matches '{domain}' and there is no default endpoint: the handshake is refused (unknown-sni)"
            ));
        };
        let domain_index = state
            .domains
            .iter()
            .position(|x| std::ptr::eq(x, d))
            .unwrap_or_default();
        let verifier = &d.tls.verifier;
        let (mode, on_failure) = verifier.mode();
        let Some(certificate) = verifier.trace(chain, profile) else {
            return Err("explain needs a certificate".to_string());
        };
        let mut trace = certificate_json(&chain[0], &certificate);
        let refusal = certificate.refusal().map(|(reason, _)| reason);
        let certificate_ok = refusal.is_none();
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let host = crate::http::decide::normalize_host(host.unwrap_or(&sni));
        let route = crate::http::route::route(&d.config.mappings, path);
        let mapping = route.as_ref().map(|(m, rest)| {
            json!({
                "base_path": m.base_path,
                "upstream": m.upstream.to_string(),
                "upstream_path": rest,
                "requires_client_certificate": mode == MtlsMode::Required
                    || (mode == MtlsMode::Optional && m.require_client_cert),
                "authorization": if m.authorization == Authorization::Policy { "policy" } else { "none" },
            })
        });
        // The verdict the connection would carry, as the handshake would leave it.
        // A domain that does not ask for certificates never sees one: no identity, whatever
        // chain explain was given.
        let verdict = match refusal {
            _ if mode == MtlsMode::Off => ClientVerdict::None,
            None => ClientVerdict::Valid(Arc::new(chain.to_vec())),
            Some(reason) => ClientVerdict::Rejected {
                leaf: chain.first().cloned().map(Box::new),
                reason,
                explanation: String::new(),
            },
        };
        let (decision, outcome, summary) = if mode == MtlsMode::Required
            && !certificate_ok
            && on_failure == OnFailure::Tls
        {
            // A certificate was presented (explain always has one): with "aws" its refusal is
            // a 403.
            (
                "deny",
                json!({"tls_alert": true}),
                format!(
                    "refused in the TLS handshake: {}",
                    refusal.map_or("rejected", Rejection::code)
                ),
            )
        } else {
            let context = crate::http::decide::Context {
                state: &state,
                domain: domain_index,
                via_default,
                sni: (!via_default).then_some(sni.as_str()),
                verdict: &verdict,
                peer: source_ip.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1])),
            };
            let asked = crate::http::decide::Asked {
                method,
                path,
                query,
                host: &host,
                websocket: false,
                grpc: false,
            };
            // The policy trace, for the reader; the decision is admit's.
            if let Some((m, _)) = &route
                && m.authorization == Authorization::Policy
                && let Ok(decoded) = crate::authorize::policy_path(path)
            {
                let leaf = if certificate_ok && mode != MtlsMode::Off {
                    chain.first()
                } else {
                    None
                };
                let hostname = d.config.hostname.to_string();
                let route_host = if via_default {
                    hostname.clone()
                } else {
                    host.clone()
                };
                trace["policy"] = verifier.registry_snapshot().policies().explain(
                    leaf,
                    &hostname,
                    &format!("http:{method}"),
                    &format!("route:{route_host}{decoded}"),
                );
            }
            match crate::http::decide::admit(&context, &asked) {
                Ok(admitted) => {
                    let m = &d.config.mappings[admitted.index];
                    let policy = if m.authorization == Authorization::Policy {
                        format!(
                            " ({})",
                            trace["policy"]["reason"].as_str().unwrap_or_default()
                        )
                    } else {
                        String::new()
                    };
                    (
                        "allow",
                        json!({"forwarded_to": format!("{}{}", m.upstream.to_string().trim_end_matches('/'), admitted.rest)}),
                        format!("allowed: forwarded to mapping '{}'{policy}", m.base_path),
                    )
                }
                Err((refusal, index)) => {
                    let (status, code) = refusal.answer(&verdict);
                    let mapping_name = index
                        .map(|i| d.config.mappings[i].base_path.clone())
                        .unwrap_or_default();
                    let summary = match &refusal {
                        Refusal::Misdirected => format!(
                            "421: the Host '{host}' names another domain than the one this connection was made for"
                        ),
                        Refusal::HttpsPublish => format!(
                            "{path} is an HTTPS publish to MQTT subscribers, decided by mqtt:Publish policies"
                        ),
                        Refusal::AmbiguousPath(why) => format!("400 ambiguous-path: {why}"),
                        Refusal::NoRoute => format!("no mapping matches {path}: 404 no-route"),
                        Refusal::NeedsCertificate => format!(
                            "403: mapping '{mapping_name}' needs a valid client certificate ({code})"
                        ),
                        Refusal::NoHost => "400: policy-authorized routes need a Host".to_string(),
                        Refusal::PolicyDenied(reason) => format!("403 policy-denied: {reason}"),
                        Refusal::UpgradeNotAllowed => {
                            "400: this mapping does not tunnel WebSocket connections".to_string()
                        }
                        Refusal::Builtin(crate::config::Builtin::Provisioning) => format!(
                            "{path} is fleet provisioning over HTTPS (builtin:provisioning), decided by mqtt:Publish policies on its $aws topic"
                        ),
                        Refusal::Builtin(crate::config::Builtin::Token) => format!(
                            "{path} is the certificate-to-token exchange (builtin:token)"
                        ),
                        Refusal::Builtin(crate::config::Builtin::Scep) => format!(
                            "{path} is SCEP enrollment (builtin:scep): a one-time challenge password enrolls, the current certificate renews"
                        ),
                        Refusal::Builtin(crate::config::Builtin::Est) => format!(
                            "{path} is EST enrollment (builtin:est): claim certificates enroll, registered certificates re-enroll"
                        ),
                        Refusal::ClaimCertificate => "403 claim-certificate: a claim certificate may only provision a device (MQTT $aws/certificates and $aws/provisioning-templates)".to_string(),
                    };
                    let decision = if matches!(refusal, Refusal::HttpsPublish) {
                        "https-publish"
                    } else if matches!(refusal, Refusal::Builtin(_)) {
                        "builtin"
                    } else {
                        "deny"
                    };
                    (
                        decision,
                        json!({"http_status": status.as_u16(), "code": code}),
                        summary,
                    )
                }
            }
        };
        trace["domain"] = json!({
            "hostname": d.config.hostname.to_string(),
            "matched_by": if via_default { "default-endpoint" } else { "sni" },
            "mtls_mode": format!("{mode:?}").to_ascii_lowercase(),
            "on_failure": format!("{on_failure:?}").to_ascii_lowercase(),
        });
        trace["request"] = json!({"method": method, "path": target, "host": host});
        trace["mapping"] = mapping.unwrap_or(Value::Null);
        trace["decision"] = json!(decision);
        trace["outcome"] = outcome;
        trace["summary"] = json!(summary);
        Ok(trace)
    }
}

/// The certificate's part of the trace: the certificate, the chain's result under the profile,
/// and the registry's view.
fn certificate_json(leaf: &Certificate, trace: &CertificateTrace) -> Value {
    let info = leaf.info();
    let certificate = json!({
        "id": info.id, "subject": info.subject, "issuer": info.issuer,
        "serial": info.serial, "not_after": info.not_after,
    });
    let chain = match &trace.chain {
        Verdict::Valid { chain } => json!({
            "result": "valid",
            "path": chain.iter().map(|c| c.info().subject.clone()).collect::<Vec<_>>(),
        }),
        Verdict::Rejected {
            reason,
            explanation,
        } => json!({"result": "rejected", "reason": reason.code(), "explanation": explanation}),
    };
    let mode = match trace.mode {
        RegistryMode::Off => "off",
        RegistryMode::Revocation => "revocation",
        RegistryMode::Registered => "registered",
    };
    let status = trace.status.map(|s| match s {
        RegisteredStatus::Active | RegisteredStatus::ActiveWithGrace(_) => "ACTIVE",
        RegisteredStatus::Inactive => "INACTIVE",
        RegisteredStatus::PendingActivation => "PENDING_ACTIVATION",
        RegisteredStatus::Revoked => "REVOKED",
    });
    let jit = trace.jit.as_ref().map(|a| {
        json!({"ca": a.ca.info().subject, "ca_id": a.ca_id,
               "kind": if a.provisioner.is_some() { "JITP" } else { "JITR" }})
    });
    let registry = match &trace.registry {
        None => json!({"mode": mode, "status": status, "decision": "not-reached"}),
        Some(RegistryDecision::Admit) => {
            json!({"mode": mode, "status": status, "decision": "admit"})
        }
        Some(RegistryDecision::Provision { thing, .. }) => json!({
            "mode": mode, "status": status, "decision": "provision-just-in-time",
            "thing": thing, "just_in_time": jit,
            "explanation": format!("unregistered, from an auto-registering CA with a provisioning template: the first connection registers it ACTIVE as thing '{thing}' and is served"),
        }),
        Some(RegistryDecision::Refuse(reason, explanation)) => json!({
            "mode": mode, "status": status,
            "decision": if jit.is_some() && status.is_none() { "refuse-and-register-just-in-time" } else { "refuse" },
            "reason": reason.code(), "explanation": explanation, "just_in_time": jit,
        }),
    };
    let mut out = json!({"certificate": certificate, "profile": trace.profile.name(), "chain": chain, "registry": registry});
    if let Some(f) = &trace.foreign {
        out["revocation"] = json!({
            "decision": if f.refusal.is_some() { "refuse" } else if f.waiting.is_some() { "unknown-yet" } else { "admit" },
            "reason": f.refusal.as_ref().map(|(r, _)| r.code()),
            "explanation": f.refusal.as_ref().map(|(_, e)| e.clone()).or_else(|| f.waiting.clone()),
            "sources": f.sources,
        });
    }
    out
}
