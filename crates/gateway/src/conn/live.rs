//! Open HTTP connections after their handshake: listed for the admin API (which can close
//! them), and checked again on every registry change and reload, which close those no longer
//! admitted.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::http::context::ConnectionContext;
use crate::recheck::{Admission, Closed};

/// An open HTTP connection, as the admin API lists it.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// Its id (to close it).
    pub id: u64,
    /// The client's address.
    pub peer: SocketAddr,
    /// The domain it was made for.
    pub domain: String,
    /// `http/1.1`, `h2` or `websocket`.
    pub protocol: &'static str,
    /// The verdict on its certificate (`SUCCESS`, `NONE`, `FAILED:<reason>`).
    pub verify: String,
    /// The client certificate's subject, if any.
    pub client_subject: String,
    /// The client certificate's id, if any.
    pub client_fingerprint: String,
    /// When it was established (seconds since the epoch).
    pub since: i64,
}

/// Open HTTP connections (after their handshake), for the admin API to list and close. MQTT
/// connections are the broker's sessions.
#[derive(Default)]
pub struct Live {
    next: std::sync::atomic::AtomicU64,
    open: Mutex<std::collections::HashMap<u64, LiveEntry>>,
}

/// One open connection: its context (the listing is built from it when asked, so an idle
/// connection holds no copy of its details), protocol and start, and how to close it.
struct LiveEntry {
    ctx: Arc<ConnectionContext>,
    h2: bool,
    /// Upgraded to a WebSocket tunnel.
    tunnel: bool,
    since: i64,
    /// What it was admitted under, checked again on every registry change and reload.
    admission: Admission,
    close: Arc<tokio::sync::Notify>,
    /// Why it is being closed.
    why: Arc<std::sync::OnceLock<Closed>>,
}

impl LiveEntry {
    fn describe(&self, id: u64) -> ConnectionInfo {
        let ctx = &self.ctx;
        let leaf = ctx.verdict.leaf();
        ConnectionInfo {
            id,
            peer: ctx.peer,
            domain: ctx.state.domains[ctx.domain].config.hostname.to_string(),
            protocol: match (self.h2, self.tunnel) {
                (true, _) => "h2",
                (false, true) => "websocket",
                (false, false) => "http/1.1",
            },
            verify: ctx.verdict.status(),
            client_subject: leaf.map(|c| c.info().subject.clone()).unwrap_or_default(),
            client_fingerprint: leaf.map(|c| c.info().id.clone()).unwrap_or_default(),
            since: self.since,
        }
    }
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

impl Live {
    pub(crate) fn register(
        self: &Arc<Self>,
        ctx: Arc<ConnectionContext>,
        h2: bool,
        admission: Admission,
    ) -> LiveGuard {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let close = Arc::new(tokio::sync::Notify::new());
        let why = Arc::new(std::sync::OnceLock::new());
        let entry = LiveEntry {
            ctx,
            h2,
            tunnel: false,
            since: time::OffsetDateTime::now_utc().unix_timestamp(),
            admission,
            close: close.clone(),
            why: why.clone(),
        };
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, entry);
        }
        LiveGuard {
            live: self.clone(),
            id,
            close,
            why,
        }
    }

    /// How many HTTP connections are open.
    pub fn count(&self) -> usize {
        self.open.lock().map_or(0, |open| open.len())
    }

    /// The open HTTP connections, oldest first.
    pub fn list(&self) -> Vec<ConnectionInfo> {
        let Ok(open) = self.open.lock() else {
            return Vec::new();
        };
        let mut ids: Vec<&u64> = open.keys().collect();
        ids.sort();
        ids.into_iter().map(|id| open[id].describe(*id)).collect()
    }

    /// Closes connection `id` (in-flight requests are cut); whether it was open.
    pub fn close(&self, id: u64) -> bool {
        let Ok(open) = self.open.lock() else {
            return false;
        };
        match open.get(&id) {
            Some(entry) => {
                entry.shut(Closed {
                    code: "operator",
                    explanation: "an operator closed the connection".into(),
                });
                true
            }
            None => false,
        }
    }

    /// Checks every open connection against the current state and registry snapshot, and
    /// closes those they no longer admit: one pass on each change, nothing per request.
    pub(crate) fn recheck(&self) -> usize {
        let Ok(open) = self.open.lock() else {
            return 0;
        };
        let mut closed = 0;
        for entry in open.values() {
            if entry.why.get().is_none()
                && let Some(why) = entry.admission.refusal()
            {
                entry.shut(why);
                closed += 1;
            }
        }
        closed
    }
}

impl LiveEntry {
    fn shut(&self, why: Closed) {
        let _ = self.why.set(why);
        // A permit is kept if the connection is not waiting right now.
        self.close.notify_one();
    }
}

/// Removes a connection from [`Live`] when it ends.
pub(crate) struct LiveGuard {
    live: Arc<Live>,
    id: u64,
    pub(crate) close: Arc<tokio::sync::Notify>,
    why: Arc<std::sync::OnceLock<Closed>>,
}

impl LiveGuard {
    /// Checks this connection now; whether it is to be closed.
    pub(crate) fn recheck_now(&self) -> bool {
        let refusal = self
            .live
            .open
            .lock()
            .ok()
            .and_then(|open| open.get(&self.id).and_then(|e| e.admission.refusal()));
        match refusal {
            Some(why) => {
                let _ = self.why.set(why);
                true
            }
            None => false,
        }
    }

    /// Logs why the connection is being closed.
    pub(crate) fn log_close(&self, peer: SocketAddr, domain: &str) {
        match self.why.get() {
            Some(why) => log_closed(peer, domain, why),
            None => log_closed(
                peer,
                domain,
                &Closed {
                    code: "operator",
                    explanation: "an operator closed the connection".into(),
                },
            ),
        }
    }

    /// The connection became a WebSocket tunnel.
    pub(crate) fn tunnelled(&self) {
        if let Ok(mut open) = self.live.open.lock()
            && let Some(entry) = open.get_mut(&self.id)
        {
            entry.tunnel = true;
        }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if let Ok(mut open) = self.live.open.lock() {
            open.remove(&self.id);
        }
    }
}

/// A connection closed because the registry or the configuration no longer admits it, or by an
/// operator.
pub(crate) fn log_closed(peer: SocketAddr, domain: &str, closed: &Closed) {
    metrics::counter!("portcullis_connections_closed_total", "domain" => domain.to_string(), "reason" => closed.code)
        .increment(1);
    tracing::info!(
        target: "portcullis::connection",
        peer = %peer,
        domain,
        result = "closed",
        reason = closed.code,
        explanation = %closed.explanation,
        "{}",
        if closed.code == "operator" {
            "connection closed by an operator"
        } else {
            "connection closed: its certificate or domain is no longer admitted"
        }
    );
}
