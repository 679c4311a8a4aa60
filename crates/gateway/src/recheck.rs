//! Open connections checked again: a connection admitted under one state generation and registry
//! snapshot stays open only while the current ones would still admit it.
//!
//! Every open HTTP connection (HTTP/1.1, HTTP/2, WebSocket tunnels) is listed in `Live` with
//! its [`Admission`]; on every registry snapshot (a verified certificate's status) and every
//! reload (a truststore, CRL or domain change) one pass asks the current state what it would
//! decide for each connection's domain and verified chain, and closes those it refuses. Nothing
//! is done per request. MQTT sessions ask the same on the same change notifications. The
//! chain's verification is cached per domain and generation, so ten thousand connections of one
//! certificate cost one verification per reload.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::State;
use crate::config::{Domain, MtlsMode};
use crate::verdict::ClientVerdict;
use crate::verify::DomainVerifier;

/// Why an open connection is closed: a stable code (a rejection reason's, or `domain-removed`,
/// `domain-changed`, `mtls-changed`) and a sentence for the log.
#[derive(Debug, Clone)]
pub(crate) struct Closed {
    pub(crate) code: &'static str,
    pub(crate) explanation: String,
}

/// What an open connection was admitted under.
pub(crate) struct Admission {
    states: Arc<ArcSwap<State>>,
    generation: u64,
    sni: Option<String>,
    /// The domain as configured when the connection was made.
    domain: Arc<Domain>,
    /// Its verifier (registry mode and snapshot) in that generation.
    verifier: Arc<DomainVerifier>,
    verdict: ClientVerdict,
}

impl Admission {
    /// A connection admitted under `state` to the domain `domain` chose by `sni`, with `verdict`.
    pub(crate) fn new(
        states: Arc<ArcSwap<State>>,
        state: &State,
        domain: usize,
        sni: Option<&str>,
        verdict: &ClientVerdict,
    ) -> Admission {
        let d = &state.domains[domain];
        Admission {
            states,
            generation: state.generation,
            sni: sni.map(str::to_string),
            domain: d.config.clone(),
            verifier: d.tls.verifier.clone(),
            verdict: verdict.clone(),
        }
    }

    /// Why the current state and registry snapshot would no longer admit this connection, if
    /// they would not.
    pub(crate) fn refusal(&self) -> Option<Closed> {
        let chain = match &self.verdict {
            ClientVerdict::Valid(chain) => Some(chain),
            _ => None,
        };
        // A certificate in its grace period: closed once the registry no longer gives it one
        // (revoked, deactivated, renewed and retired) or the grace has run out.
        if let Some(leaf) = self.verdict.renew_only() {
            let until = self.verifier.registry_snapshot().grace_until(leaf);
            if until.is_none_or(|u| u <= crate::authorize::now()) {
                return Some(Closed {
                    code: "grace-ended",
                    explanation: format!(
                        "certificate {} may no longer renew: its grace period ended or the registry changed it",
                        leaf.info().id
                    ),
                });
            }
        }
        let current = self.states.load();
        if current.generation == self.generation {
            // Within a generation only the registry changes.
            let chain = chain?;
            return self
                .verifier
                .live_refusal(chain)
                .map(|(reason, explanation)| Closed {
                    code: reason.code(),
                    explanation,
                });
        }
        let Some((domain, _)) = current.select(self.sni.as_deref()) else {
            return Some(Closed {
                code: "domain-removed",
                explanation: format!(
                    "domain '{}' was removed and no domain takes its connections",
                    self.domain.hostname
                ),
            });
        };
        if domain.config.hostname != self.domain.hostname {
            return Some(Closed {
                code: "domain-changed",
                explanation: format!(
                    "the connection's server name now belongs to domain '{}'",
                    domain.config.hostname
                ),
            });
        }
        let mode = self.domain.mtls.mode;
        if domain.config.mtls.mode != mode {
            return Some(Closed {
                code: "mtls-changed",
                explanation: format!(
                    "domain '{}' changed its mutual TLS mode; reconnect",
                    self.domain.hostname
                ),
            });
        }
        // An open connection routes on the generation it was made in: when this domain's
        // mappings or access settings changed, it must reconnect to be decided by the new ones.
        if !domain.config.routes_like(&self.domain) {
            return Some(Closed {
                code: "domain-changed",
                explanation: format!(
                    "domain '{}' changed its mappings or access settings; reconnect",
                    self.domain.hostname
                ),
            });
        }
        let chain = chain?;
        if mode == MtlsMode::Off {
            return None;
        }
        domain
            .tls
            .verifier
            .recheck(chain)
            .map(|(reason, explanation)| Closed {
                code: reason.code(),
                explanation,
            })
    }
}
