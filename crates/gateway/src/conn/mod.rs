//! A connection's life after accept: handshake, then MQTT, or HTTP/1.1 (fast path first, then
//! hyper) or HTTP/2, listed in [`live::Live`] and closed when no longer admitted.

mod accept;
mod handshake;
pub mod live;

pub(crate) use accept::{Accepting, Gates, accept_loop};

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::HandshakeKind;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};

use crate::config::Protocols;
use crate::conn::live::{Live, log_closed};
use crate::http::context::ConnectionContext;
use crate::http::proxy::{Forwarding, TunnelSlot, UpstreamClient};
use crate::http::service::request;
use crate::recheck::{Admission, Closed};
use crate::registry_view::RegistryReason;
use crate::verdict::{ClientVerdict, Rejection};
use crate::{State, limit_reached};
use handshake::{Handshaken, count_handshake, handshake};
use portcullis_mqtt::broker::Broker;

/// HTTP/2 streams a client may have open at once (nginx's default is 128); more are refused
/// with REFUSED_STREAM.
const MAX_CONCURRENT_STREAMS: u32 = 100;

/// HTTP/2 streams a client may reset before the server accepted them, at once; beyond, the
/// connection ends with ENHANCE_YOUR_CALM (the h2 crate's rapid-reset check).
const MAX_PENDING_ACCEPT_RESETS: usize = 20;

/// How long a connection waits for its certificate's just-in-time provisioning.
const PROVISIONING_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a just-provisioned connection waits for the registry snapshot to include its
/// certificate.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(3);

/// What a listener serves after the handshake.
pub(crate) struct Endpoint {
    protocols: Protocols,
    broker: Arc<Broker>,
    live: Arc<Live>,
    /// The live state: what an open connection is checked against.
    states: Arc<ArcSwap<State>>,
}

/// One accepted connection, to its end: the handshake (boxed), a resumed session verified
/// again, JITP awaited, then MQTT, or HTTP (the fast path first for HTTP/1.1), listed in
/// [`Live`] and closed when no longer admitted, an operator closes it, or on shutdown.
pub(crate) async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    client: Arc<UpstreamClient>,
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
    let (mut verdict, provisioning) = match record {
        Some(r) => (r.verdict, r.provisioning),
        // A resumed session restores the client chain without running the verifier: verify it
        // again against this generation's truststore, CRLs and registry snapshot.
        None => match conn.peer_certificates() {
            Some([leaf, rest @ ..]) => domain.tls.verifier.verify_chain(leaf, rest),
            _ => (ClientVerdict::None, None),
        },
    };
    let alpn = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    // Built only when the line is logged, in a block of its own: the connection's future does
    // not keep these for its whole life.
    if tracing::enabled!(target: "portcullis::connection", tracing::Level::INFO) {
        let version = conn
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default();
        let cipher = conn
            .negotiated_cipher_suite()
            .map(|c| format!("{:?}", c.suite()))
            .unwrap_or_default();
        let kx_group = conn
            .negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()))
            .unwrap_or_default();
        let leaf = verdict.leaf().map(|c| c.info());
        tracing::info!(
            target: "portcullis::connection",
            peer = %peer,
            domain = %hostname,
            sni = sni.as_deref().unwrap_or(""),
            result = "ok",
            verify = %verdict.status(),
            tls_version = %version,
            cipher = %cipher,
            kx_group = %kx_group,
            alpn = %alpn,
            resumed,
            handshake_ms = started.elapsed().as_secs_f64() * 1000.0,
            client_subject = leaf.as_ref().map(|l| l.subject.as_str()).unwrap_or(""),
            client_issuer = leaf.as_ref().map(|l| l.issuer.as_str()).unwrap_or(""),
            client_serial = leaf.as_ref().map(|l| l.serial.as_str()).unwrap_or(""),
            "TLS handshake completed"
        );
    }
    // Just-in-time provisioning: the first connection is served once the registry recorded the
    // certificate and its thing (or closed, saying why).
    if let Some(pending) = provisioning {
        let provisioned = pending.provisioning;
        let outcome = match tokio::time::timeout(PROVISIONING_TIMEOUT, pending.rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(refused))) => Err(refused),
            Ok(Err(_)) => Err((
                RegistryReason::ProvisioningFailed.into(),
                "just-in-time provisioning failed: the registry dropped the request".to_string(),
            )),
            Err(_) => Err((
                RegistryReason::ProvisioningFailed.into(),
                format!(
                    "just-in-time provisioning failed: the registry did not answer within {} s",
                    PROVISIONING_TIMEOUT.as_secs()
                ),
            )),
        };
        match outcome {
            Ok(()) => {}
            // A revocation status that refuses the certificate, on a domain that answers
            // refusals over HTTP: every request gets the 403 with the reason.
            Err((reason, explanation))
                if domain.tls.verifier.mode().1 != crate::config::OnFailure::Tls
                    && reason != Rejection::Registry(RegistryReason::ProvisioningFailed) =>
            {
                verdict = ClientVerdict::Rejected {
                    leaf: verdict.leaf().map(|l| Box::new(l.clone())),
                    reason,
                    explanation,
                };
            }
            Err((reason, explanation)) => {
                log_closed(
                    peer,
                    &hostname,
                    &Closed {
                        code: reason.code(),
                        explanation,
                    },
                );
                return;
            }
        }
        // The registry recorded the certificate (and its thing); this node's snapshot follows
        // within a poll. Wait for it, briefly, so that policies naming the new thing (MQTT's
        // thing client id, `${iot:Connection.Thing.ThingName}`-style variables) apply from the
        // first request or CONNECT.
        if provisioned
            && let ClientVerdict::Valid(chain) = &verdict
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
    let identity = crate::http::context::identity_block(&state, domain_index, &verdict);
    let ctx = Arc::new(ConnectionContext {
        state: state.clone(),
        domain: domain_index,
        via_default,
        peer,
        identity: arc_swap::ArcSwapOption::from_pointee(identity),
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
    let mut io = crate::stream::Prefixed::new(Bytes::new(), tls);
    if alpn == "h2" {
        // HTTP/2 closes with a GOAWAY (a flood's ENHANCE_YOUR_CALM, a shutdown's NO_ERROR) that
        // a reset must not destroy: its shutdown lingers as a refused handshake's does.
        io.linger_on_shutdown();
    }
    let prefix = if alpn == "h2" {
        Bytes::new()
    } else {
        let mut served = Box::pin(crate::http::fast::serve(
            &mut io,
            &fast_ctx,
            shutdown.clone(),
        ));
        tokio::select! {
            outcome = served.as_mut() => match outcome {
                crate::http::fast::Outcome::Closed => return,
                crate::http::fast::Outcome::Fallback(prefix) => prefix,
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
        ($conn:ident $(. $inner:ident ())?) => {{
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
                    $conn.as_mut() $(.$inner())? .graceful_shutdown();
                    let _ = $conn.await;
                    true
                }
            }
        }};
    }
    if alpn == "h2" {
        let flood = crate::http::h2guard::Tripped::default();
        let io = TokioIo::new(crate::http::h2guard::FloodGuard::new(io, flood.clone()));
        // Its streams run on this task (see `http::streams`), not a task each.
        let (exec, streams) = crate::http::streams::streams();
        let conn = hyper::server::conn::http2::Builder::new(exec)
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
            .keep_alive_interval(Duration::from_secs(60))
            .keep_alive_timeout(Duration::from_secs(20))
            .serve_connection(io, service);
        let conn = crate::http::streams::WithStreams::new(conn, streams);
        drive!(conn.conn());
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
