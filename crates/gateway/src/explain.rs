//! `portcullis explain`: the decision the gateway would take for a certificate on a domain,
//! step by step (domain, chain, registry, mapping), without sending or changing anything.

use std::sync::Arc;

use arc_swap::ArcSwap;
use portcullis_pki::Certificate;
use serde_json::{Value, json};

use crate::State;
use crate::config::{Authorization, MtlsMode, OnFailure};

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
    pub fn explain(
        &self,
        domain: &str,
        method: &str,
        path: &str,
        chain: &[Certificate],
        profile: Option<portcullis_pki::VerifyProfile>,
    ) -> Result<Value, String> {
        let state = self.state.load();
        let Some((d, via_default)) = state.select(Some(domain)) else {
            return Err(format!(
                "no domain matches '{domain}' and there is no default endpoint: the handshake is refused (unknown-sni)"
            ));
        };
        let verifier = &d.tls.verifier;
        let (mode, on_failure) = verifier.mode();
        let mut trace = verifier.explain(chain, profile);
        let chain_ok = trace["chain"]["result"] == "valid";
        let registry_ok = matches!(
            trace["registry"]["decision"].as_str(),
            Some("admit" | "provision-just-in-time")
        );
        let certificate_ok = chain_ok && registry_ok;
        let reason = if !chain_ok {
            trace["chain"]["reason"].clone()
        } else {
            trace["registry"]["reason"].clone()
        };
        let route = crate::route::route(&d.config.mappings, path);
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
        let (decision, outcome, summary) = match (mode, certificate_ok, route) {
            // A certificate was presented (explain always has one): with "aws" its refusal is a 403.
            (MtlsMode::Required, false, _) if on_failure == OnFailure::Tls => (
                "deny",
                json!({"tls_alert": true}),
                format!(
                    "refused in the TLS handshake: {}",
                    reason.as_str().unwrap_or("rejected")
                ),
            ),
            (_, _, None) => (
                "deny",
                json!({"http_status": 404, "code": "no-route"}),
                format!("no mapping matches {path}: 404 no-route"),
            ),
            (mode, ok, Some((m, _)))
                if !ok
                    && (mode == MtlsMode::Required
                        || (mode == MtlsMode::Optional && m.require_client_cert)) =>
            {
                (
                    "deny",
                    json!({"http_status": 403, "code": reason}),
                    format!(
                        "403: mapping '{}' needs a valid client certificate ({})",
                        m.base_path,
                        reason.as_str().unwrap_or("rejected")
                    ),
                )
            }
            (_, ok, Some((m, rest))) => {
                let forwarded = (
                    "allow",
                    json!({"forwarded_to": format!("{}{}", m.upstream.to_string().trim_end_matches('/'), rest)}),
                    format!("allowed: forwarded to mapping '{}'", m.base_path),
                );
                if m.authorization != Authorization::Policy {
                    forwarded
                } else {
                    match crate::authorize::policy_path(path) {
                        Err(why) => (
                            "deny",
                            json!({"http_status": 400, "code": "ambiguous-path"}),
                            format!(
                                "400: the path holds {why}, which policy-authorized routes refuse"
                            ),
                        ),
                        Ok(decoded) => {
                            let leaf = if ok { chain.first() } else { None };
                            let hostname = d.config.hostname.to_string();
                            // As the data path does: the Host (= SNI) on a wildcard domain,
                            // the configured name otherwise.
                            let host = if !via_default && hostname.starts_with("*.") {
                                domain.to_ascii_lowercase()
                            } else {
                                hostname.clone()
                            };
                            let policy = verifier.registry_snapshot().policies().explain(
                                leaf,
                                &hostname,
                                &format!("http:{method}"),
                                &format!("route:{host}{decoded}"),
                            );
                            let allowed = policy["decision"] == "allow";
                            let reason = policy["reason"].as_str().unwrap_or_default().to_string();
                            trace["policy"] = policy;
                            if allowed {
                                (
                                    forwarded.0,
                                    forwarded.1,
                                    format!("{} ({reason})", forwarded.2),
                                )
                            } else {
                                (
                                    "deny",
                                    json!({"http_status": 403, "code": "policy-denied"}),
                                    format!("403 policy-denied: {reason}"),
                                )
                            }
                        }
                    }
                }
            }
        };
        trace["domain"] = json!({
            "hostname": d.config.hostname.to_string(),
            "matched_by": if via_default { "default-endpoint" } else { "sni" },
            "mtls_mode": format!("{mode:?}").to_ascii_lowercase(),
            "on_failure": format!("{on_failure:?}").to_ascii_lowercase(),
        });
        trace["request"] = json!({"method": method, "path": path});
        trace["mapping"] = mapping.unwrap_or(Value::Null);
        trace["decision"] = json!(decision);
        trace["outcome"] = outcome;
        trace["summary"] = json!(summary);
        Ok(trace)
    }
}
