//! Accepting connections: ClientHello → domain by SNI → handshake → HTTP/1.1 or HTTP/2 → route
//! → authorize → proxy, with a connection-log line per handshake and an access-log line per
//! request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::HandshakeKind;
use rustls::server::Acceptor;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_rustls::LazyConfigAcceptor;

use crate::access_log::AccessLog;
use crate::config::{Authorization, Limits, MtlsMode, Protocols};
use crate::context::{ConnectionContext, LINGER_TIME, admit, limit_reached};
use crate::decide::{Refusal, normalize_host};
use crate::identity::IdentityBlock;
use crate::proxy::{Forwarding, Origin, Outgoing, TunnelSlot, UpstreamClient, forward};
use crate::recheck::{Admission, Closed};
use crate::respond::{Body, error_response, escape};
use crate::verify::{CONNECTION_VERDICT, ClientVerdict, HandshakeRecord};
use crate::{DomainState, State};
use portcullis_mqtt::broker::Broker;
use portcullis_pki::RejectReason;

/// HTTP/2 streams a client may have open at once (nginx's default is 128); more are refused
/// with REFUSED_STREAM.
const MAX_CONCURRENT_STREAMS: u32 = 100;

/// HTTP/2 streams a client may reset before the server accepted them, at once; beyond, the
/// connection ends with ENHANCE_YOUR_CALM (the h2 crate's rapid-reset check).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;

/// How long shutdown waits for open connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection waits for its certificate's just-in-time provisioning.
const PROVISIONING_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a just-provisioned connection waits for the registry snapshot to include its
/// certificate.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(3);

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
    fn describe(&self, id: u64) -> serde_json::Value {
        let ctx = &self.ctx;
        let leaf = ctx.verdict.leaf();
        serde_json::json!({
            "id": id,
            "peer": ctx.peer.to_string(),
            "domain": ctx.state.domains[ctx.domain].config.hostname.to_string(),
            "protocol": match (self.h2, self.tunnel) {
                (true, _) => "h2",
                (false, true) => "websocket",
                (false, false) => "http/1.1",
            },
            "verify": ctx.verdict.status().to_string(),
            "client_subject": leaf.map(|c| c.info().subject.clone()).unwrap_or_default(),
            "client_fingerprint": leaf.map(|c| c.info().id.clone()).unwrap_or_default(),
            "since": self.since,
        })
    }
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

impl Live {
    fn register(
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

    /// The open HTTP connections, oldest first.
    pub fn list(&self) -> Vec<serde_json::Value> {
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
struct LiveGuard {
    live: Arc<Live>,
    id: u64,
    close: Arc<tokio::sync::Notify>,
    why: Arc<std::sync::OnceLock<Closed>>,
}

impl LiveGuard {
    /// Checks this connection now; whether it is to be closed.
    fn recheck_now(&self) -> bool {
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
    fn log_close(&self, peer: SocketAddr, domain: &str) {
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
    fn tunnelled(&self) {
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
    client: UpstreamClient,
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
                let handshakes = gates.handshakes.clone();
                let shutdown = shutdown.clone();
                let client = client.clone();
                let broker = broker.clone();
                let live = gates.live.clone();
                let states = state.clone();
                connections.spawn(async move {
                    metrics::gauge!("portcullis_active_connections").increment(1.0);
                    let on = Endpoint { protocols, broker, live, states };
                    connection(stream, peer, snapshot, client, handshakes, shutdown, on).await;
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

/// What a listener serves after the handshake.
struct Endpoint {
    protocols: Protocols,
    broker: Arc<Broker>,
    live: Arc<Live>,
    /// The live state: what an open connection is checked against.
    states: Arc<ArcSwap<State>>,
}

/// A completed handshake: the stream, the domain chosen, and the verifier's record.
struct Handshaken {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    started: Instant,
    domain_index: usize,
    via_default: bool,
    hostname: String,
    sni: Option<String>,
    record: Option<HandshakeRecord>,
}

/// ClientHello → domain by SNI → handshake, each failure logged. A future of its own (boxed by
/// the caller): its state is large and is not needed once the connection is established.
async fn handshake(
    stream: TcpStream,
    peer: SocketAddr,
    state: &State,
    handshakes: Arc<Semaphore>,
) -> Option<Handshaken> {
    let started = Instant::now();
    let limits = &state.limits;
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    // The whole handshake, waiting for a slot included, fits in the handshake timeout.
    if handshakes.available_permits() == 0 {
        limit_reached("max_handshakes");
    }
    let Ok(Ok(handshake_permit)) =
        tokio::time::timeout_at(deadline, handshakes.acquire_owned()).await
    else {
        count_handshake("", "failed", "handshake-limit");
        tracing::info!(target: "portcullis::connection", peer = %peer, result = "failed", reason = "handshake-limit", "too many handshakes in progress");
        return None;
    };
    let accept = LazyConfigAcceptor::new(Acceptor::default(), stream);
    let hello = match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => {
            count_handshake("", "failed", "bad-client-hello");
            tracing::info!(target: "portcullis::connection", peer = %peer, result = "failed", reason = "bad-client-hello", error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            limit_reached("handshake_timeout");
            count_handshake("", "failed", "handshake-timeout");
            tracing::info!(target: "portcullis::connection", peer = %peer, result = "failed", reason = "handshake-timeout", "TLS handshake timed out");
            return None;
        }
    };
    // An absolute name (`a.test.`) is the same name, for SNI as for Host.
    let sni = hello
        .client_hello()
        .server_name()
        .map(|name| name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase());
    let Some((domain, via_default)) = state.select(sni.as_deref()) else {
        count_handshake("", "refused", "unknown-sni");
        let explanation = match &sni {
            Some(name) => format!(
                "no domain is named '{name}' and the default endpoint is off (default_endpoint = false)"
            ),
            None => "the client sent no server name (SNI) and the default endpoint is off (default_endpoint = false)".to_string(),
        };
        tracing::info!(target: "portcullis::connection", peer = %peer, sni = sni.as_deref().unwrap_or(""), result = "refused", reason = "unknown-sni", explanation = %explanation, "no domain for this SNI and no default endpoint");
        drop(handshake_permit);
        let mut io = hello.io;
        // A fatal unrecognized_name alert (RFC 6066 3), in a plaintext record: no keys yet.
        let _ = tokio::time::timeout(
            LINGER_TIME,
            io.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70]),
        )
        .await;
        linger(io).await;
        return None;
    };
    let domain_index = state
        .domains
        .iter()
        .position(|d| std::ptr::eq(d, domain))
        .unwrap_or_default();
    let hostname = domain.config.hostname.to_string();
    // What the client offered, for the log line when no protocol is in common.
    let offered: Vec<String> = hello
        .client_hello()
        .alpn()
        .map(|protocols| {
            protocols
                .map(|p| String::from_utf8_lossy(p).escape_debug().to_string())
                .collect()
        })
        .unwrap_or_default();
    let slot = Arc::new(Mutex::new(None));
    let handshake = CONNECTION_VERDICT.scope(
        slot.clone(),
        tokio::time::timeout_at(
            deadline,
            hello.into_stream(domain.tls.config.clone()).into_fallible(),
        ),
    );
    let recorded =
        |slot: &Arc<Mutex<Option<HandshakeRecord>>>| slot.lock().ok().and_then(|mut s| s.take());
    let tls = match handshake.await {
        Ok(Ok(tls)) => tls,
        Ok(Err((e, io))) => {
            let verdict = recorded(&slot).map(|r| r.verdict);
            let failed = Failed {
                verdict: verdict.as_ref(),
                error: &e,
                offered: &offered,
                speaks: &domain.tls.config.alpn_protocols,
            };
            log_failed_handshake(peer, &hostname, sni.as_deref(), &failed, started);
            // The alert is written; the client may still be sending (its request follows its
            // Finished in TLS 1.3), and closing on unread data would reset the connection and
            // destroy the alert before the client reads it.
            drop(handshake_permit);
            linger(io).await;
            return None;
        }
        Err(_) => {
            limit_reached("handshake_timeout");
            let timeout = std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out");
            let failed = Failed {
                verdict: None,
                error: &timeout,
                offered: &offered,
                speaks: &[],
            };
            log_failed_handshake(peer, &hostname, sni.as_deref(), &failed, started);
            return None;
        }
    };
    drop(handshake_permit);
    Some(Handshaken {
        record: recorded(&slot),
        tls,
        started,
        domain_index,
        via_default,
        hostname,
        sni,
    })
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    client: UpstreamClient,
    handshakes: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    endpoint: Endpoint,
) {
    let Some(Handshaken {
        tls,
        started,
        domain_index,
        via_default,
        hostname,
        sni,
        record,
    }) = Box::pin(handshake(stream, peer, &state, handshakes)).await
    else {
        return;
    };
    let domain = &state.domains[domain_index];
    let limits = &state.limits;
    let (_, conn) = tls.get_ref();
    let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
    let (verdict, provisioning) = match record {
        Some(r) => (r.verdict, r.provisioning),
        // A resumed session restores the client chain without running the verifier: verify it
        // again against this generation's truststore, CRLs and registry snapshot.
        None => match conn.peer_certificates() {
            Some([leaf, rest @ ..]) => domain.tls.verifier.verify_chain(leaf, rest),
            _ => (ClientVerdict::None, None),
        },
    };
    let version = conn
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_default();
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|c| format!("{:?}", c.suite()))
        .unwrap_or_default();
    let alpn = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let leaf = verdict.leaf().map(|c| c.info().clone());
    tracing::info!(
        target: "portcullis::connection",
        peer = %peer,
        domain = %hostname,
        sni = sni.as_deref().unwrap_or(""),
        result = "ok",
        verify = %verdict.status(),
        tls_version = %version,
        cipher = %cipher,
        alpn = %alpn,
        resumed,
        handshake_ms = started.elapsed().as_secs_f64() * 1000.0,
        client_subject = leaf.as_ref().map(|l| l.subject.as_str()).unwrap_or(""),
        client_issuer = leaf.as_ref().map(|l| l.issuer.as_str()).unwrap_or(""),
        client_serial = leaf.as_ref().map(|l| l.serial.as_str()).unwrap_or(""),
        "TLS handshake completed"
    );
    // Just-in-time provisioning: the first connection is served once the registry recorded the
    // certificate and its thing (or closed, saying why).
    if let Some(pending) = provisioning {
        let outcome = match tokio::time::timeout(PROVISIONING_TIMEOUT, pending).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(why))) => Err(why),
            Ok(Err(_)) => Err("the registry dropped the request".to_string()),
            Err(_) => Err(format!(
                "the registry did not answer within {} s",
                PROVISIONING_TIMEOUT.as_secs()
            )),
        };
        if let Err(why) = outcome {
            log_closed(
                peer,
                &hostname,
                &Closed {
                    code: RejectReason::ProvisioningFailed.code(),
                    explanation: format!("just-in-time provisioning failed: {why}"),
                },
            );
            return;
        }
        // The registry recorded the certificate (and its thing); this node's snapshot follows
        // within a poll. Wait for it, briefly, so that policies naming the new thing (MQTT's
        // thing client id, `${iot:Connection.Thing.ThingName}`-style variables) apply from the
        // first request or CONNECT.
        if let ClientVerdict::Valid(chain) = &verdict
            && let Some(leaf) = chain.first()
        {
            let verifier = &domain.tls.verifier;
            let mut changes = verifier.registry_changes();
            let _ = tokio::time::timeout(SNAPSHOT_WAIT, async {
                while !verifier.is_registered(leaf) {
                    if changes.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
        }
    }
    count_handshake(&hostname, "ok", "");
    metrics::histogram!("portcullis_handshake_duration_seconds", "domain" => hostname.clone())
        .record(started.elapsed().as_secs_f64());
    if let ClientVerdict::Valid(chain) = &verdict
        && let Some(leaf) = chain.first()
    {
        domain.tls.verifier.saw(leaf, &hostname);
    }
    // MQTT or HTTP: by listener, then by ALPN.
    let mqtt = match endpoint.protocols {
        Protocols::Mqtt => true,
        Protocols::Both => alpn == "mqtt" || alpn == "x-amzn-mqtt-ca",
        Protocols::Http => false,
    };
    let admission = Admission::new(
        endpoint.states.clone(),
        &state,
        domain_index,
        sni.as_deref(),
        &verdict,
    );
    if mqtt {
        let conn = crate::mqtt::Conn {
            peer,
            domain: domain.config.clone(),
            verifier: domain.tls.verifier.clone(),
            verdict,
            broker: endpoint.broker.clone(),
            shutdown,
            admission,
        };
        // Boxed, like each protocol's future below: a connection's future is as large as its
        // largest branch, and only one of them ever runs.
        let session = Box::pin(crate::mqtt::serve(tls, conn));
        session.await;
        return;
    }
    if alpn == "mqtt" || alpn == "x-amzn-mqtt-ca" {
        tracing::info!(target: "portcullis::connection", peer = %peer, domain = %hostname, result = "closed", reason = "mqtt-on-http-listener", "MQTT (ALPN {alpn}) on a listener that speaks only HTTP");
        return;
    }
    let identity = if domain.config.mtls.mode == MtlsMode::Off {
        IdentityBlock::default()
    } else {
        state.identity.block(&verdict)
    };
    let ctx = Arc::new(ConnectionContext {
        state: state.clone(),
        domain: domain_index,
        via_default,
        peer,
        identity,
        forwarding: Forwarding::new(peer, sni.as_deref()),
        verdict,
        client,
        broker: endpoint.broker,
        tunnel: TunnelSlot::default(),
    });
    // The fast path's handle, and the one that takes a WebSocket tunnel once hyper is done.
    let fast_ctx = ctx.clone();
    // Listed for the admin API, which can close it, and for the rechecks that close it when the
    // registry, a new truststore or a new CRL stops admitting it (keep-alive, HTTP/2 and
    // WebSocket tunnels alike). Checked once now, after listing, so that a change made during
    // the handshake is not missed.
    let live = endpoint.live.register(ctx.clone(), alpn == "h2", admission);
    let signal = live.close.clone();
    let closing = signal.notified();
    tokio::pin!(closing);
    if live.recheck_now() {
        live.log_close(peer, &hostname);
        return;
    }
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        async move {
            let domain = ctx.state.domains[ctx.domain].config.clone();
            let mut response = request(req, ctx).await;
            domain.response_headers.apply(response.headers_mut());
            Ok::<_, Infallible>(response)
        }
    });
    // HTTP/1.1 starts on the fast path; a request it does not serve hands the connection, with
    // the bytes read so far, to hyper.
    // Read through `Prefixed` from the start: it flushes what TLS answers while reading.
    let mut io = crate::fast::Prefixed::new(Bytes::new(), tls);
    if alpn == "h2" {
        // HTTP/2 closes with a GOAWAY (a flood's ENHANCE_YOUR_CALM, a shutdown's NO_ERROR) that
        // a reset must not destroy: its shutdown lingers as a refused handshake's does.
        io.linger_on_shutdown();
    }
    let prefix = if alpn == "h2" {
        Bytes::new()
    } else {
        let mut served = Box::pin(crate::fast::serve(&mut io, &fast_ctx, shutdown.clone()));
        tokio::select! {
            outcome = served.as_mut() => match outcome {
                crate::fast::Outcome::Closed => return,
                crate::fast::Outcome::Fallback(prefix) => prefix,
            },
            _ = &mut closing => {
                live.log_close(peer, &hostname);
                return;
            }
        }
    };
    // An MQTT CONNECT where HTTP was expected: the client did not offer ALPN `mqtt` (port 443
    // clients must; MQTT-only listeners need none). Say so rather than answer it with HTTP.
    if is_mqtt_connect(&prefix) {
        let explanation = match endpoint.protocols {
            Protocols::Both => {
                "the client sent an MQTT CONNECT without offering ALPN 'mqtt' (or \
                 'x-amzn-mqtt-ca'), so this HTTP-and-MQTT listener served HTTP; configure the \
                 client to offer ALPN 'mqtt' (AWS SDKs: port 443 does), or connect to a listener \
                 with protocols = [\"mqtt\"] (port 8883), which needs no ALPN"
            }
            _ => {
                "the client sent an MQTT CONNECT to a listener that speaks only HTTP; connect to \
                 a listener with \"mqtt\" in its protocols"
            }
        };
        log_closed(
            peer,
            &hostname,
            &Closed {
                code: "mqtt-without-alpn",
                explanation: explanation.to_string(),
            },
        );
        return;
    }
    // ALPN already chose the protocol, so the matching hyper connection serves it directly (no
    // preface sniffing, which would wait for a first byte without any timeout).
    io.set_prefix(prefix);
    // Serves a connection until it ends, it is closed (no longer admitted, or by an operator),
    // or shutdown (finish in-flight requests, then close). The HTTP/1.1 and HTTP/2 connection
    // types share no trait for `graceful_shutdown`, hence a macro. It says whether the
    // connection ended by itself (an upgrade may then have left a tunnel to run).
    macro_rules! drive {
        ($conn:ident) => {{
            let mut $conn = Box::pin($conn);
            tokio::select! {
                done = $conn.as_mut() => {
                    if let Err(e) = done {
                        if e.is_timeout() {
                            limit_reached("request_header_timeout");
                        } else if e.is_parse_too_large() {
                            limit_reached("max_header_bytes");
                        }
                    }
                    true
                }
                _ = &mut closing => {
                    live.log_close(peer, &hostname);
                    false
                }
                _ = shutdown.changed() => {
                    $conn.as_mut().graceful_shutdown();
                    let _ = $conn.await;
                    true
                }
            }
        }};
    }
    if alpn == "h2" {
        let flood = crate::h2guard::Tripped::default();
        let io = TokioIo::new(crate::h2guard::FloodGuard::new(io, flood.clone()));
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
            .keep_alive_interval(Duration::from_secs(60))
            .keep_alive_timeout(Duration::from_secs(20))
            .serve_connection(io, service);
        drive!(conn);
        if let Some(why) = flood.get() {
            limit_reached("h2_flood");
            log_closed(
                peer,
                &hostname,
                &Closed {
                    code: "h2-flood",
                    explanation: format!(
                        "the client sent {why} frames faster than any client needs"
                    ),
                },
            );
        }
    } else {
        let io = TokioIo::new(io);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.request_header_timeout)
            .max_buf_size(limits.max_header_bytes)
            .serve_connection(io, service)
            .with_upgrades();
        if !drive!(conn) {
            return;
        }
        // A WebSocket upgrade: the tunnel runs here, holding this connection's slot and live
        // entry, and ends like the connection would (revocation, an operator, shutdown).
        let tunnel = fast_ctx.tunnel.lock().ok().and_then(|mut t| t.take());
        if let Some(tunnel) = tunnel {
            live.tunnelled();
            tokio::select! {
                _ = tunnel => {}
                _ = &mut closing => live.log_close(peer, &hostname),
                _ = shutdown.wait_for(|stopping| *stopping) => {
                    tracing::info!(target: "portcullis::connection", peer = %peer, domain = %hostname, result = "closed", reason = "shutdown", "WebSocket tunnel closed: the gateway is stopping");
                }
            }
        }
    }
}

/// Closes a refused connection so that its alert reaches the client: a lingering shutdown (see
/// [`crate::fast::Prefixed::linger_on_shutdown`]). Closing with unread data would make the
/// kernel answer with a reset, and a client that has not read the alert yet loses it.
async fn linger(io: TcpStream) {
    let mut io = crate::fast::Prefixed::new(Bytes::new(), io);
    io.linger_on_shutdown();
    let _ = io.shutdown().await;
}

/// A connection closed because the registry or the configuration no longer admits it, or by an
/// operator.
fn log_closed(peer: SocketAddr, domain: &str, closed: &Closed) {
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

fn count_handshake(domain: &str, result: &'static str, reason: &str) {
    metrics::counter!(
        "portcullis_handshakes_total",
        "domain" => domain.to_string(),
        "result" => result,
        "reason" => reason.to_string()
    )
    .increment(1);
}

/// Whether `bytes` start an MQTT CONNECT packet: type 1, a remaining length, then the protocol
/// name `MQTT` (3.1.1 and 5) or `MQIsdp` (3.1).
fn is_mqtt_connect(bytes: &[u8]) -> bool {
    if bytes.first() != Some(&0x10) {
        return false;
    }
    // The remaining length: 1 to 4 bytes, the high bit continuing.
    let Some(len_bytes) = bytes[1..]
        .iter()
        .take(4)
        .position(|b| b & 0x80 == 0)
        .map(|i| i + 1)
    else {
        return false;
    };
    let rest = &bytes[1 + len_bytes..];
    rest.starts_with(b"\x00\x04MQTT") || rest.starts_with(b"\x00\x06MQIsdp")
}

/// Why a handshake failed, as the connection log line tells it.
struct Failed<'a> {
    verdict: Option<&'a ClientVerdict>,
    error: &'a std::io::Error,
    /// The ALPN protocols the client offered.
    offered: &'a [String],
    /// The ALPN protocols the domain speaks.
    speaks: &'a [Vec<u8>],
}

fn log_failed_handshake(
    peer: SocketAddr,
    domain: &str,
    sni: Option<&str>,
    failed: &Failed<'_>,
    started: Instant,
) {
    let tls_error = failed
        .error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    let error = &failed.error.to_string();
    let no_alpn;
    let verdict = failed.verdict;
    let (reason, explanation) = match (verdict, tls_error) {
        (
            Some(ClientVerdict::Rejected {
                reason,
                explanation,
                ..
            }),
            _,
        ) => (reason.code(), explanation.as_str()),
        (_, Some(rustls::Error::NoCertificatesPresented)) => {
            ("no-certificate", "the client sent no certificate")
        }
        (_, Some(rustls::Error::NoApplicationProtocol)) => {
            let speaks: Vec<String> = failed
                .speaks
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            no_alpn = format!(
                "the client offered only ALPN protocols this domain does not speak (offered: \
                 {}; spoken here: {}); offer one of those, or none",
                failed.offered.join(", "),
                speaks.join(", ")
            );
            ("unknown-alpn", no_alpn.as_str())
        }
        _ => ("handshake-error", error.as_str()),
    };
    let leaf = verdict
        .and_then(ClientVerdict::leaf)
        .map(|c| c.info().clone());
    count_handshake(domain, "failed", reason);
    tracing::info!(
        target: "portcullis::connection",
        peer = %peer,
        domain,
        sni = sni.unwrap_or(""),
        result = "failed",
        reason,
        explanation,
        handshake_ms = started.elapsed().as_secs_f64() * 1000.0,
        client_subject = leaf.as_ref().map(|l| l.subject.as_str()).unwrap_or(""),
        client_issuer = leaf.as_ref().map(|l| l.issuer.as_str()).unwrap_or(""),
        client_serial = leaf.as_ref().map(|l| l.serial.as_str()).unwrap_or(""),
        "TLS handshake failed"
    );
}

async fn request(mut req: Request<Incoming>, ctx: Arc<ConnectionContext>) -> Response<Body> {
    let started = Instant::now();
    let domain: &DomainState = &ctx.state.domains[ctx.domain];
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let screened = crate::inbound::screen(
        &mut req,
        &ctx.state.identity,
        domain.config.underscores_in_headers,
    );
    let websocket = match screened {
        Ok(websocket) => websocket,
        Err(refused) => {
            tracing::info!(target: "portcullis::connection", peer = %ctx.peer, domain = %domain.config.hostname, result = "refused", reason = refused.code, "{}", refused.message);
            let mut response = error_response(refused.status, refused.code, &refused.message, None);
            // The request's framing or target is in doubt: nothing more is read from this
            // connection (HTTP/2 closes only the stream).
            if req.version() < hyper::Version::HTTP_2 {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return finish(
                &ctx,
                started,
                String::new(),
                method,
                path,
                Some(refused.code.to_string()),
                response,
            );
        }
    };
    let host = request_host(&req);
    let mapping_name = |index: Option<usize>| {
        index
            .and_then(|i| domain.config.mappings.get(i))
            .map(|m| m.base_path.clone())
            .unwrap_or_default()
    };
    let mut denied: Option<String> = None;
    let admitted = admit(
        &ctx,
        method.as_str(),
        &path,
        req.uri().query(),
        &host,
        websocket.is_some(),
    );
    let (mapping_name, response) = match admitted {
        Ok(admitted) => {
            let mapping = &domain.config.mappings[admitted.index];
            let forwarded_host = admitted.forwarded_host(&host, domain);
            let out = Outgoing {
                origin: Origin {
                    forwarding: &ctx.forwarding,
                    host: &forwarded_host,
                },
                identity: &ctx.identity,
                policy: mapping.authorization == Authorization::Policy,
                websocket,
                tunnel: &ctx.tunnel,
            };
            let timeout = ctx.state.limits.upstream_response_timeout;
            let client = domain
                .upstream_clients
                .get(admitted.index)
                .and_then(Option::as_ref)
                .unwrap_or(&ctx.client);
            (
                mapping.base_path.clone(),
                forward(client, req, &mapping.upstream, &admitted.rest, out, timeout).await,
            )
        }
        Err((refusal, index)) => {
            let name = mapping_name(index);
            let response = match refusal {
                Refusal::Misdirected => error_response(
                    StatusCode::MISDIRECTED_REQUEST,
                    "misdirected-request",
                    "the Host header does not match the domain this connection was made for",
                    None,
                ),
                // HTTPS publish to MQTT subscribers, like IoT Core's HTTPS endpoint.
                Refusal::HttpsPublish => {
                    let leaf = match &ctx.verdict {
                        ClientVerdict::Valid(chain) => chain.first(),
                        _ => None,
                    };
                    let response = match leaf {
                        None => forbidden(&req, &ctx.verdict, advice_of(&ctx)),
                        Some(leaf) => {
                            crate::mqtt::https_publish(
                                req,
                                leaf,
                                &domain.tls.verifier,
                                &domain.config,
                                &ctx.broker,
                                ctx.peer,
                            )
                            .await
                        }
                    };
                    return finish(
                        &ctx,
                        started,
                        "/topics".into(),
                        method,
                        path,
                        None,
                        response,
                    );
                }
                Refusal::AmbiguousPath(why) => {
                    denied = Some("ambiguous-path".to_string());
                    error_response(StatusCode::BAD_REQUEST, "ambiguous-path", &why, None)
                }
                Refusal::NoRoute => error_response(
                    StatusCode::NOT_FOUND,
                    "no-route",
                    "no mapping matches this path",
                    None,
                ),
                Refusal::NeedsCertificate => forbidden(&req, &ctx.verdict, advice_of(&ctx)),
                Refusal::NoHost => {
                    denied = Some("no-host".to_string());
                    error_response(
                        StatusCode::BAD_REQUEST,
                        "no-host",
                        "policy-authorized routes need a Host header",
                        None,
                    )
                }
                Refusal::UpgradeNotAllowed => {
                    denied = Some("upgrade-refused".to_string());
                    error_response(
                        StatusCode::BAD_REQUEST,
                        "upgrade-refused",
                        "this mapping does not tunnel WebSocket connections",
                        None,
                    )
                }
                Refusal::PolicyDenied(reason) => {
                    let page = forbidden_page(
                        &req,
                        "policy-denied",
                        &format!("Access denied: {reason}."),
                        ctx.verdict.leaf(),
                        advice_of(&ctx),
                    );
                    denied = Some(reason);
                    page
                }
            };
            (name, response)
        }
    };
    finish(&ctx, started, mapping_name, method, path, denied, response)
}

/// Records a request's metrics and arranges its access-log line (written when the body has been
/// sent or abandoned, with its size).
fn finish(
    ctx: &Arc<ConnectionContext>,
    started: Instant,
    mapping: String,
    method: hyper::Method,
    path: String,
    denied: Option<String>,
    response: Response<Body>,
) -> Response<Body> {
    ctx.state.domains[ctx.domain]
        .request_metrics(&mapping, response.status().as_u16())
        .record(started.elapsed().as_secs_f64());
    if !tracing::enabled!(target: "portcullis::access", tracing::Level::INFO) {
        return response;
    }
    let log = AccessLog {
        ctx: ctx.clone(),
        mapping,
        method,
        path,
        status: response.status().as_u16(),
        denied,
        headers_ms: started.elapsed().as_secs_f64() * 1000.0,
        started,
    };
    response.map(|body| {
        BoxBody::new(LoggedBody {
            inner: body,
            bytes: 0,
            log: Some(log),
        })
    })
}

/// A response body that counts what it sends and writes the access line at its end.
struct LoggedBody {
    inner: Body,
    bytes: u64,
    log: Option<AccessLog>,
}

impl hyper::body::Body for LoggedBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => {
                if let Some(log) = this.log.take() {
                    log.emit(this.bytes, true);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            let complete = hyper::body::Body::is_end_stream(&self.inner);
            log.emit(self.bytes, complete);
        }
    }
}

/// The Host of a request: HTTP/2's :authority or the Host header, lower-case, without port.
fn request_host(req: &Request<Incoming>) -> String {
    req.uri()
        .authority()
        .map(|a| a.host())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .map(normalize_host)
        .unwrap_or_default()
}

/// 403 with the reason: JSON for programs, a readable page for browsers.
fn forbidden(
    req: &Request<Incoming>,
    verdict: &ClientVerdict,
    advice: Option<&str>,
) -> Response<Body> {
    let (code, message) = match verdict {
        ClientVerdict::None => (
            "no-certificate",
            "This service requires a client certificate, and none was presented.".to_string(),
        ),
        ClientVerdict::Rejected {
            reason,
            explanation,
            ..
        } => (
            reason.code(),
            format!("The client certificate was rejected: {explanation}."),
        ),
        ClientVerdict::Valid(_) => ("forbidden", "Access denied.".to_string()),
    };
    forbidden_page(req, code, &message, verdict.leaf(), advice)
}

/// The domain's failure-page advice.
fn advice_of(ctx: &ConnectionContext) -> Option<&str> {
    ctx.state.domains[ctx.domain]
        .config
        .mtls
        .failure_advice
        .as_deref()
}

/// 403 with `code` and `message`: JSON for programs, a readable page (with the certificate
/// presented, if any) for browsers.
fn forbidden_page(
    req: &Request<Incoming>,
    code: &str,
    message: &str,
    leaf: Option<&portcullis_pki::Certificate>,
    advice: Option<&str>,
) -> Response<Body> {
    let wants_html = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if !wants_html {
        let mut resp = error_response(StatusCode::FORBIDDEN, code, message, None);
        if let Ok(v) = HeaderValue::from_str(code) {
            resp.headers_mut().insert("x-portcullis-reason", v);
        }
        return resp;
    }
    let info = leaf.map(portcullis_pki::Certificate::info);
    let presented = info.map(|i| crate::respond::Presented {
        subject: &i.subject,
        issuer: &i.issuer,
        not_after: &i.not_after,
        expired: i.not_after_unix() < time::OffsetDateTime::now_utc().unix_timestamp(),
    });
    let advice = match advice {
        // The domain's own words: plain text, escaped, one paragraph per blank-line block.
        Some(text) => {
            let paragraphs: String = text
                .split("\n\n")
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| format!("<p>{}</p>", escape(p)))
                .collect();
            format!("<h2>What to do</h2>{paragraphs}")
        }
        None => "<h2>What to do</h2><p>Use a device with a certificate issued for this service, or ask your administrator for one. \
                 If your browser asked you to choose a certificate, restart it and choose again.</p>"
            .to_string(),
    };
    let page = crate::respond::failure_page(
        StatusCode::FORBIDDEN,
        code,
        message,
        presented.as_ref(),
        &advice,
    );
    let mut resp = Response::new(crate::respond::full(page));
    *resp.status_mut() = StatusCode::FORBIDDEN;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    if let Ok(v) = HeaderValue::from_str(code) {
        headers.insert("x-portcullis-reason", v);
    }
    resp
}
