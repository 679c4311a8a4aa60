//! Open connections checked again: a connection admitted under one state generation and registry
//! snapshot stays open only while the current ones would still admit it.
//!
//! Every open connection (HTTP/1.1, HTTP/2, WebSocket tunnels, MQTT sessions) waits on
//! [`Admission::until_refused`] beside its protocol. It wakes on every registry snapshot (a
//! verified certificate's status) and every reload (a truststore, CRL or domain change) and asks
//! the current state what it would decide for the connection's domain and verified chain. The
//! chain's verification is cached per domain and generation, so ten thousand connections of one
//! certificate cost one verification per reload.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::State;
use crate::config::MtlsMode;
use crate::verify::ClientVerdict;

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
    hostname: String,
    mode: MtlsMode,
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
        let config = &state.domains[domain].config;
        Admission {
            states,
            generation: state.generation,
            sni: sni.map(str::to_string),
            hostname: config.hostname.to_string(),
            mode: config.mtls.mode,
            verdict: verdict.clone(),
        }
    }

    /// Why the current state and registry snapshot would no longer admit this connection, if
    /// they would not.
    pub(crate) fn refusal(&self) -> Option<Closed> {
        let current = self.states.load();
        let Some((domain, _)) = current.select(self.sni.as_deref()) else {
            return Some(Closed {
                code: "domain-removed",
                explanation: format!(
                    "domain '{}' was removed and no domain takes its connections",
                    self.hostname
                ),
            });
        };
        if domain.config.hostname.to_string() != self.hostname {
            return Some(Closed {
                code: "domain-changed",
                explanation: format!(
                    "the connection's server name now belongs to domain '{}'",
                    domain.config.hostname
                ),
            });
        }
        let verifier = &domain.tls.verifier;
        let chain = match &self.verdict {
            ClientVerdict::Valid(chain) => Some(chain),
            _ => None,
        };
        if current.generation == self.generation {
            // Only the registry can have changed.
            let leaf = chain.and_then(|c| c.first())?;
            if !verifier.uses_registry() {
                return None;
            }
            return verifier
                .registry_refusal(leaf)
                .map(|(reason, explanation)| Closed {
                    code: reason.code(),
                    explanation,
                });
        }
        if domain.config.mtls.mode != self.mode {
            return Some(Closed {
                code: "mtls-changed",
                explanation: format!(
                    "domain '{}' changed its mutual TLS mode; reconnect",
                    self.hostname
                ),
            });
        }
        let chain = chain?;
        if self.mode == MtlsMode::Off {
            return None;
        }
        verifier.recheck(chain).map(|(reason, explanation)| Closed {
            code: reason.code(),
            explanation,
        })
    }

    /// Resolves when the connection must close: checked now, then on every registry snapshot
    /// (for a verified certificate) and every reload.
    pub(crate) async fn until_refused(
        self,
        mut registry: watch::Receiver<u64>,
        mut reloads: watch::Receiver<u64>,
    ) -> Closed {
        let verified = matches!(self.verdict, ClientVerdict::Valid(_));
        loop {
            // Checked after subscribing, so a change made during the handshake is not missed.
            if let Some(closed) = self.refusal() {
                return closed;
            }
            tokio::select! {
                changed = registry.changed(), if verified => {
                    if changed.is_err() {
                        return std::future::pending().await;
                    }
                }
                changed = reloads.changed() => {
                    if changed.is_err() {
                        return std::future::pending().await;
                    }
                }
            }
        }
    }
}
