//! Forwarding a request to its upstream and streaming the answer back.
//!
//! Bodies are streamed both ways, never buffered. Hop-by-hop headers are removed in both
//! directions; `X-Forwarded-For/-Proto/-Host` and `Forwarded` are added.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::GatewayError;
use crate::config::{UpstreamProtocol, UpstreamTls};
use crate::http::coalesce::Coalescing;
use crate::http::h2up::{self, H2Client, TrailerScreen};
use crate::http::identity::IdentityBlock;
use crate::http::inbound::{HOP_BY_HOP, METHOD_OVERRIDES, WebSocket, websocket_accept};
use crate::http::respond::{Body, error_response};

/// A pooled client: the shared HTTP/1.1 one for `http://` upstreams, or one per mapping that
/// needs its own (an `https://` upstream's CA and client certificate, or HTTP/2: one
/// multiplexed connection per upstream).
pub(crate) type UpstreamClient = Client<Coalescing<HttpsConnector<HttpConnector>>, Incoming>;

/// A mapping's own client: HTTP/1.1 (an `https://` upstream's CA and client certificate), or
/// HTTP/2 (`h2c`, `h2`: one multiplexed connection per upstream).
#[derive(Debug)]
pub(crate) enum MappingClient {
    Http1(Box<UpstreamClient>),
    H2(H2Client),
}

/// The client a request goes through.
#[derive(Clone, Copy)]
pub(crate) enum Upstream<'a> {
    Http1(&'a UpstreamClient),
    H2(&'a H2Client),
}

impl MappingClient {
    pub(crate) fn upstream(&self) -> Upstream<'_> {
        match self {
            MappingClient::Http1(c) => Upstream::Http1(c),
            MappingClient::H2(c) => Upstream::H2(c),
        }
    }
}

/// Builds a mapping's client. Without TLS settings it speaks plain HTTP only; with `protocol`
/// HTTP/2 it speaks only that (`h2c`: prior knowledge; `h2`: ALPN `h2` only).
pub(crate) fn mapping_client(
    connect_timeout: Duration,
    tls: Option<&UpstreamTls>,
    protocol: UpstreamProtocol,
    retry_refused: bool,
) -> Result<MappingClient, GatewayError> {
    if protocol.is_h2() {
        let config = match protocol {
            UpstreamProtocol::H2 => Some(tls_config(tls)?),
            _ => None,
        };
        return Ok(MappingClient::H2(H2Client::new(
            connect_timeout,
            config,
            retry_refused,
        )));
    }
    client(connect_timeout, tls).map(|c| MappingClient::Http1(Box::new(c)))
}

/// The TLS settings for an `https://` upstream: its CA, and the gateway's client certificate
/// if it wants one.
fn tls_config(tls: Option<&UpstreamTls>) -> Result<rustls::ClientConfig, GatewayError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| GatewayError::Tls(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    let config = match tls {
        None => builder.with_root_certificates(roots).with_no_client_auth(),
        Some(tls) => {
            for root in &tls.roots {
                roots
                    .add(root.clone())
                    .map_err(|e| GatewayError::Tls(format!("upstream CA certificate: {e}")))?;
            }
            let builder = builder.with_root_certificates(roots);
            match &tls.client_certificate {
                None => builder.with_no_client_auth(),
                Some(cert) => builder
                    .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
                    .map_err(|e| {
                        GatewayError::Tls(format!("upstream client certificate and key: {e}"))
                    })?,
            }
        }
    };
    Ok(config)
}

/// Builds an HTTP/1.1 upstream client (plain HTTP, or `https://` with `tls`).
pub(crate) fn client(
    connect_timeout: Duration,
    tls: Option<&UpstreamTls>,
) -> Result<UpstreamClient, GatewayError> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(tls)?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let mut builder = Client::builder(hyper_util::rt::TokioExecutor::new());
    builder.pool_idle_timeout(Duration::from_secs(60));
    // One request at a time on an HTTP/1.1 connection: nothing to gather (`coalesce`).
    Ok(builder.build(Coalescing::new(connector, false)))
}

/// The forwarding header values of one client connection, computed once: the client address,
/// and the host values for the connection's own server name (what nearly every request uses).
pub(crate) struct Forwarding {
    peer: SocketAddr,
    xff: Option<HeaderValue>,
    for_value: String,
    host: Option<(String, HeaderValue, HeaderValue)>,
}

impl Forwarding {
    pub(crate) fn new(peer: SocketAddr, host: Option<&str>) -> Forwarding {
        let ip = peer.ip().to_string();
        let for_value = if peer.is_ipv6() {
            format!("\"[{ip}]\"")
        } else {
            ip.clone()
        };
        let mut f = Forwarding {
            peer,
            xff: HeaderValue::from_str(&ip).ok(),
            for_value,
            host: None,
        };
        f.host = host.and_then(|h| {
            let (a, b) = f.host_values(h)?;
            Some((h.to_string(), a, b))
        });
        f
    }

    fn host_values(&self, host: &str) -> Option<(HeaderValue, HeaderValue)> {
        Some((
            HeaderValue::from_str(host).ok()?,
            HeaderValue::from_str(&format!(
                "for={};proto=https;host=\"{host}\"",
                self.for_value
            ))
            .ok()?,
        ))
    }
}

impl Forwarding {
    /// The SNI the connection was made for.
    pub(crate) fn sni(&self) -> Option<&str> {
        self.host.as_ref().map(|(sni, _, _)| sni.as_str())
    }

    /// The forwarding headers as HTTP/1.1 lines, as `add_forwarding` sets them: the client
    /// address appended to the first inbound `X-Forwarded-For`, the others replaced.
    pub(crate) fn write_h1(&self, host: &str, prior_xff: Option<&[u8]>, out: &mut Vec<u8>) {
        if let Some(ip) = &self.xff {
            out.extend_from_slice(b"x-forwarded-for: ");
            if let Some(prior) = prior_xff.map(<[u8]>::trim_ascii).filter(|p| !p.is_empty()) {
                out.extend_from_slice(prior);
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(ip.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"x-forwarded-proto: https\r\nx-forwarded-host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\nforwarded: for=");
        out.extend_from_slice(self.for_value.as_bytes());
        out.extend_from_slice(b";proto=https;host=\"");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\"\r\n");
    }
}

/// Where the request came from, for the forwarding headers.
pub(crate) struct Origin<'a> {
    pub(crate) forwarding: &'a Forwarding,
    pub(crate) host: &'a str,
}

/// What [`forward`] adds to a request besides the path: where it came from, the identity headers,
/// whether policies decided it, and the WebSocket upgrade it asked for.
pub(crate) struct Outgoing<'a> {
    pub(crate) origin: Origin<'a>,
    pub(crate) identity: &'a IdentityBlock,
    /// A policy-authorized mapping: method-override headers are dropped, since policies decided
    /// on the request's own method.
    pub(crate) policy: bool,
    pub(crate) websocket: Option<WebSocket>,
    /// Where an accepted upgrade leaves its tunnel, for the connection's task to run.
    pub(crate) tunnel: &'a TunnelSlot,
    /// The protocol spoken to the upstream.
    pub(crate) protocol: UpstreamProtocol,
    /// What a request's trailers may not carry.
    pub(crate) screen: TrailerScreen<'a>,
}

/// A WebSocket tunnel, run by the connection's own task so that it keeps its connection slot and
/// its live entry, and is closed by revocation, an operator or shutdown like any connection.
pub(crate) type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where [`forward`] leaves an accepted tunnel.
pub(crate) type TunnelSlot = std::sync::Mutex<Option<Tunnel>>;

/// Sends `req` to `upstream` with `path` (prefix already stripped) and returns its answer.
pub(crate) async fn forward(
    client: Upstream<'_>,
    mut req: Request<Incoming>,
    upstream: &Uri,
    path: &str,
    out: Outgoing<'_>,
    timeout: Duration,
) -> Response<Body> {
    let base = upstream.path().trim_end_matches('/');
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let target = format!(
        "{}://{}{}{}{}",
        upstream.scheme_str().unwrap_or("http"),
        upstream.authority().map(|a| a.as_str()).unwrap_or_default(),
        base,
        path,
        query
    );
    let Ok(uri) = target.parse::<Uri>() else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad-path",
            "the request path cannot be forwarded",
            None,
        );
    };
    *req.uri_mut() = uri;
    let h2 = out.protocol.is_h2();
    // `te: trailers` is the one TE an HTTP/2 request may carry, and gRPC servers want it.
    let te_trailers = h2
        && req
            .headers()
            .get_all(header::TE)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
    *req.version_mut() = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    // A WebSocket upgrade keeps its Upgrade header; the client side of the tunnel is taken here,
    // before the request moves on.
    let client_side = out.websocket.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let headers = req.headers_mut();
    remove_hop_by_hop(headers);
    if out.websocket.is_some() {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    if out.policy {
        for name in METHOD_OVERRIDES {
            headers.remove(name);
        }
    }
    // After the hop-by-hop removal: nothing the client names in Connection removes them.
    out.identity.insert_into(headers);
    add_forwarding(headers, &out.origin);
    if h2 {
        // HTTP/2 names the upstream in `:authority`, from the URI.
        headers.remove(header::HOST);
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    } else if let Some(authority) = upstream.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, v);
    }
    let client = match client {
        Upstream::Http1(client) => client,
        Upstream::H2(client) => {
            return match client.exchange(req, timeout, out.screen).await {
                Ok(resp) => {
                    let (mut parts, body) = resp.into_parts();
                    remove_hop_by_hop(&mut parts.headers);
                    Response::from_parts(parts, body)
                }
                Err(h2up::Failure::Failed(e)) => {
                    tracing::warn!(upstream = %upstream, error = %e, "upstream request failed");
                    upstream_unavailable()
                }
                Err(h2up::Failure::Timeout) => upstream_timeout(),
            };
        }
    };
    match tokio::time::timeout(timeout, client.request(req)).await {
        Ok(Ok(mut resp)) => {
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                let accepted = match (&out.websocket, client_side) {
                    (Some(ws), Some(client_side)) if switched_to_websocket(resp.headers(), ws) => {
                        Some(client_side)
                    }
                    _ => None,
                };
                let Some(client_side) = accepted else {
                    tracing::warn!(upstream = %upstream, "upstream switched protocols without a valid WebSocket handshake");
                    return error_response(
                        StatusCode::BAD_GATEWAY,
                        "upstream-bad-upgrade",
                        "the upstream service switched protocols without completing a WebSocket handshake",
                        None,
                    );
                };
                let upstream_side = hyper::upgrade::on(&mut resp);
                if let Ok(mut slot) = out.tunnel.lock() {
                    *slot = Some(Box::pin(tunnel(client_side, upstream_side)));
                }
                let (mut parts, body) = resp.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts
                    .headers
                    .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                return Response::from_parts(
                    parts,
                    BoxBody::new(body.map_err(|e| Box::new(e) as _)),
                );
            }
            let (mut parts, body) = resp.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, BoxBody::new(body.map_err(|e| Box::new(e) as _)))
        }
        Ok(Err(e)) => {
            tracing::warn!(upstream = %upstream, error = %e, "upstream request failed");
            upstream_unavailable()
        }
        Err(_) => upstream_timeout(),
    }
}

fn upstream_unavailable() -> Response<Body> {
    error_response(
        StatusCode::BAD_GATEWAY,
        "upstream-unavailable",
        "the upstream service could not be reached",
        None,
    )
}

fn upstream_timeout() -> Response<Body> {
    error_response(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream-timeout",
        "the upstream service did not answer in time",
        None,
    )
}

/// Whether an upstream's 101 completes the WebSocket handshake the client asked for: it
/// switched to `websocket` and answered the client's key (RFC 6455 4.2.2). Anything else would
/// make the tunnel carry what no one checked.
fn switched_to_websocket(headers: &HeaderMap, ws: &WebSocket) -> bool {
    let upgraded = headers
        .get(header::UPGRADE)
        .is_some_and(|u| u.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"));
    let answered = headers.get("sec-websocket-accept").is_some_and(|a| {
        a.as_bytes().trim_ascii() == websocket_accept(ws.key.as_bytes()).as_bytes()
    });
    upgraded && answered
}

/// Copies bytes both ways between the client and the upstream once both sides have switched.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (Ok(client), Ok(upstream)) = (client.await, upstream.await) else {
        return;
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// RFC 9110 7.6.1: hop-by-hop headers, and every header the Connection header names.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there is none: one pass over the names present instead of a lookup per listed name.
    // (Connection is itself listed, so headers it names are found below whenever it is present.)
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    // What Connection names besides the hop-by-hop headers removed below anyway (an upstream's
    // answers say `Connection: keep-alive` every time: no name is parsed for that).
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| {
            !HOP_BY_HOP
                .iter()
                .any(|h| h.as_str().eq_ignore_ascii_case(n))
        })
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

fn add_forwarding(headers: &mut HeaderMap, origin: &Origin<'_>) {
    let f = origin.forwarding;
    // Replaced, never kept: should a value below fail to build, the client's own stays out.
    headers.remove(&X_FORWARDED_PROTO);
    headers.remove(&X_FORWARDED_HOST);
    headers.remove(header::FORWARDED);
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => HeaderValue::from_str(&format!("{prior}, {}", f.peer.ip())).ok(),
        None => f.xff.clone(),
    };
    match xff {
        Some(v) => {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
        None => {
            headers.remove(&X_FORWARDED_FOR);
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
    let host_values = match &f.host {
        Some((host, a, b)) if host == origin.host => Some((a.clone(), b.clone())),
        _ => f.host_values(origin.host),
    };
    if let Some((host, forwarded)) = host_values {
        headers.insert(X_FORWARDED_HOST.clone(), host);
        headers.insert(header::FORWARDED, forwarded);
    }
}
