//! What a request handler knows about its connection:
//! shared by the HTTP/1.1 fast path (`fast`) and the hyper path (`service`).

use std::net::SocketAddr;
use std::sync::Arc;

use portcullis_mqtt::broker::Broker;

use crate::State;
use crate::http::decide::{self, Admitted, Refusal};
use crate::http::identity::IdentityBlock;
use crate::http::proxy::{Forwarding, TunnelSlot, UpstreamClient};
use crate::verdict::ClientVerdict;

/// What a request handler knows about its connection.
pub(crate) struct ConnectionContext {
    pub(crate) state: Arc<State>,
    pub(crate) domain: usize,
    pub(crate) via_default: bool,
    pub(crate) peer: SocketAddr,
    pub(crate) verdict: ClientVerdict,
    /// The identity headers every request of this connection carries upstream: built after the
    /// handshake, given back while the connection idles (the fast path's idle release), built
    /// again for the next request.
    pub(crate) identity: arc_swap::ArcSwapOption<IdentityBlock>,
    /// The forwarding header values of this connection.
    pub(crate) forwarding: Forwarding,
    pub(crate) client: Arc<UpstreamClient>,
    /// The MQTT broker, for HTTPS publish.
    pub(crate) broker: Arc<Broker>,
    /// A WebSocket tunnel the last request opened, for the connection's task to run.
    pub(crate) tunnel: TunnelSlot,
}

impl ConnectionContext {
    /// This connection's identity headers (built again if an idle period released them).
    pub(crate) fn identity_headers(&self) -> Arc<IdentityBlock> {
        if let Some(block) = self.identity.load_full() {
            return block;
        }
        let block = Arc::new(identity_block(&self.state, self.domain, &self.verdict));
        self.identity.store(Some(block.clone()));
        block
    }

    /// Gives the identity headers back while the connection idles (2 KiB or so each).
    pub(crate) fn release_identity(&self) {
        self.identity.store(None);
    }

    /// What [`decide::admit`] needs of this connection.
    pub(crate) fn decision_context(&self) -> decide::Context<'_> {
        decide::Context {
            state: &self.state,
            domain: self.domain,
            via_default: self.via_default,
            sni: self.forwarding.sni(),
            verdict: &self.verdict,
            peer: self.peer.ip(),
        }
    }
}

/// Routes and authorizes a request of `ctx`'s connection: [`decide::admit`].
pub(crate) fn admit(
    ctx: &ConnectionContext,
    method: &str,
    path: &str,
    query: Option<&str>,
    host: &str,
    websocket: bool,
    grpc: bool,
) -> Result<Admitted, (Refusal, Option<usize>)> {
    decide::admit(
        &ctx.decision_context(),
        &decide::Asked {
            method,
            path,
            query,
            host,
            websocket,
            grpc,
        },
    )
}

/// The identity headers a connection's requests carry: none when the domain's mutual TLS is off.
pub(crate) fn identity_block(
    state: &State,
    domain: usize,
    verdict: &ClientVerdict,
) -> IdentityBlock {
    if state.domains[domain].config.mtls.mode == crate::config::MtlsMode::Off {
        IdentityBlock::default()
    } else {
        state.identity.block(verdict)
    }
}
