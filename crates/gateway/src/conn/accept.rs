//! Accept loops: one per listener, bound, changed and stopped by reloads, each connection on
//! its own task under the process-wide connection limit.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::{Endpoint, connection};
use crate::config::{Limits, Protocols};
use crate::conn::live::Live;
use crate::http::proxy::UpstreamClient;
use crate::{State, limit_reached};
use portcullis_mqtt::broker::Broker;

/// How long shutdown waits for open connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The process-wide gates: open connections and handshakes in progress, and the list of open
/// HTTP connections.
pub(crate) struct Gates {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    pub(crate) live: Arc<Live>,
}

impl Gates {
    pub(crate) fn new(limits: &Limits) -> Gates {
        Gates {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(limits.max_handshakes)),
            live: Arc::default(),
        }
    }
}

/// What a reload can change of a running listener: what it speaks (for the next connection),
/// and whether it still accepts.
pub(crate) struct Accepting {
    pub(crate) protocols: watch::Receiver<Protocols>,
    pub(crate) stop: watch::Receiver<bool>,
}

/// Accepts connections until shutdown, then waits for open ones to finish. Stopped by a reload
/// (its `[[listener]]` removed), it closes the listening socket and lets its connections run
/// until they end or shutdown.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    accepting: Accepting,
    state: Arc<ArcSwap<State>>,
    client: Arc<UpstreamClient>,
    gates: Arc<Gates>,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Accepting {
        protocols: speaks,
        mut stop,
    } = accepting;
    let mut connections = JoinSet::new();
    loop {
        // At the connection limit, stop accepting: clients wait in the kernel's backlog. The
        // slot is taken after the accept: a listener waiting for clients must not hold one (with
        // several listeners, each would keep a slot idle).
        if gates.connections.available_permits() == 0 {
            limit_reached("max_connections");
        }
        tokio::select! {
            permit = gates.connections.acquire() => match permit {
                Ok(p) => drop(p),
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
            _ = stop.changed() => break,
        }
        tokio::select! {
            accepted = listener.accept() => {
                // Normally free at once; another listener may have taken the last slot since.
                let permit = tokio::select! {
                    permit = gates.connections.clone().acquire_owned() => match permit {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = shutdown.changed() => break,
                };
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: say so and back off instead of
                        // spinning on a listener that cannot accept.
                        tracing::error!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let protocols = *speaks.borrow();
                // Each connection keeps the state generation it started with.
                let snapshot = state.load_full();
                let on = Endpoint {
                    protocols,
                    broker: broker.clone(),
                    live: gates.live.clone(),
                    states: state.clone(),
                };
                // Boxed here, not inside the task's block: the task then holds only the box and
                // the slot, not a second copy of what the connection's future starts with.
                let serving = Box::pin(connection(
                    stream,
                    peer,
                    snapshot,
                    client.clone(),
                    gates.handshakes.clone(),
                    shutdown.clone(),
                    on,
                ));
                connections.spawn(async move {
                    metrics::gauge!("portcullis_active_connections").increment(1.0);
                    serving.await;
                    metrics::gauge!("portcullis_active_connections").decrement(1.0);
                    drop(permit);
                });
            }
            _ = shutdown.changed() => break,
            _ = stop.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    if !*shutdown.borrow() {
        // Removed by a reload: the connections go on until they end, or until shutdown.
        loop {
            tokio::select! {
                next = connections.join_next() => if next.is_none() {
                    return;
                },
                _ = shutdown.changed() => break,
            }
        }
    }
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}
