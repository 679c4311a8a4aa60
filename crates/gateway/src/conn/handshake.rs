//! ClientHello → domain by SNI → handshake (under the handshake limit and timeout), each
//! failure logged and counted, the verifier's record picked up.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rustls::server::Acceptor;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::LazyConfigAcceptor;

use crate::stream::{LINGER_TIME, linger};
use crate::verdict::ClientVerdict;
use crate::verify::{CONNECTION_VERDICT, HandshakeRecord};
use crate::{State, limit_reached};

/// A completed handshake: the stream, the domain chosen, and the verifier's record.
pub(super) struct Handshaken {
    /// Boxed: the connection's future and the protocol's future each hold it, and rustls'
    /// connection state is over a kilobyte that would otherwise be reserved twice.
    pub(super) tls: Box<tokio_rustls::server::TlsStream<TcpStream>>,
    pub(super) started: Instant,
    pub(super) domain_index: usize,
    pub(super) via_default: bool,
    pub(super) hostname: String,
    pub(super) sni: Option<String>,
    pub(super) record: Option<HandshakeRecord>,
}

/// ClientHello → domain by SNI → handshake, each failure logged. A future of its own (boxed by
/// the caller): its state is large and is not needed once the connection is established.
pub(super) async fn handshake(
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
    // An ACME CA validating a TLS-ALPN-01 challenge offers only `acme-tls/1` (RFC 8737 3):
    // answered with the challenge certificate, whatever the domain requires of clients.
    if let Some(name) = sni.as_deref()
        && offers_only_acme_tls(&hello)
        && let Some(config) = state.acme.tls_alpn(name)
    {
        // The handshake slot is held for the handshake, as any other's.
        answer_acme_challenge(hello, config, peer, name, deadline, handshake_permit).await;
        return None;
    }
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
        tls: Box::new(tls),
        started,
        domain_index,
        via_default,
        hostname,
        sni,
    })
}

/// Whether the ClientHello offers exactly one ALPN protocol, `acme-tls/1`.
fn offers_only_acme_tls(hello: &tokio_rustls::StartHandshake<TcpStream>) -> bool {
    let Some(mut offered) = hello.client_hello().alpn() else {
        return false;
    };
    offered.next() == Some(crate::acme::ACME_TLS_ALPN) && offered.next().is_none()
}

/// Completes a TLS-ALPN-01 handshake with the challenge certificate, then closes: the CA only
/// looks at the certificate.
async fn answer_acme_challenge(
    hello: tokio_rustls::StartHandshake<TcpStream>,
    config: Arc<rustls::ServerConfig>,
    peer: SocketAddr,
    name: &str,
    deadline: tokio::time::Instant,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let done = tokio::time::timeout_at(deadline, hello.into_stream(config)).await;
    drop(permit);
    match done {
        Ok(Ok(mut tls)) => {
            count_handshake(name, "ok", "acme-tls-alpn-01");
            tracing::info!(target: "portcullis::connection", peer = %peer, domain = %name, result = "acme-challenge", "answered an ACME TLS-ALPN-01 challenge");
            let _ = tokio::time::timeout(LINGER_TIME, tls.shutdown()).await;
            let (io, _) = tls.into_inner();
            linger(io).await;
        }
        Ok(Err(e)) => {
            count_handshake(name, "failed", "acme-tls-alpn-01");
            tracing::info!(target: "portcullis::connection", peer = %peer, domain = %name, result = "failed", reason = "acme-tls-alpn-01", error = %e, "ACME TLS-ALPN-01 handshake failed");
        }
        Err(_) => {
            limit_reached("handshake_timeout");
            count_handshake(name, "failed", "handshake-timeout");
        }
    }
}

pub(super) fn count_handshake(domain: &str, result: &'static str, reason: &str) {
    metrics::counter!(
        "portcullis_handshakes_total",
        "domain" => domain.to_string(),
        "result" => result,
        "reason" => reason.to_string()
    )
    .increment(1);
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
