//! The HTTP/1.1 fast path: the common request (origin-form target, one Host, no body or a small
//! one with Content-Length, admitted to a plain-HTTP mapping) is proxied by this module without
//! hyper. The request head is parsed in place, the upstream head is written as bytes (inbound
//! identity and hop-by-hop headers dropped, the connection's identity block and forwarding headers
//! added), and the upstream connection comes from a pool owned by the mapping and is used from the
//! client connection's own task: one parse and one write each way, no header maps, no task hop.
//!
//! Anything else — upgrades, `Expect`, chunked or large request bodies, HTTP/1.0, odd targets or
//! headers, refusals (404, 421, 403 …), `https://` upstreams — hands the connection, with the bytes
//! already read, to the hyper path for the rest of its life, so each of those behaviours has one
//! implementation.
//!
//! Responses are relayed as they arrive: Content-Length and chunked bodies byte for byte (the
//! chunk framing is scanned to find the end), bodies delimited by the upstream closing are
//! re-framed as chunked so the client connection stays usable.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::{Mapping, ResponseHeaders};
use crate::http::access_log::AccessLog;
use crate::http::context::{ConnectionContext, admit};
use crate::http::decide::normalize_host;
use crate::http::inbound::HOP_BY_HOP;
use crate::http::respond::error_parts;
use crate::limit_reached;

/// Header lines per message at most (hyper's default too); more goes to the hyper path.
const MAX_HEADERS: usize = 100;
/// Request bodies up to this size are read whole and sent with the head; larger ones are
/// streamed by the hyper path.
const MAX_BUFFERED_BODY: u64 = 64 * 1024;
/// How long an idle upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// Idle upstream connections kept per mapping at most.
const POOL_MAX_IDLE: usize = 512;
/// How long a connection waits for its next request before giving its buffers back.
const IDLE_RELEASE: Duration = Duration::from_secs(1);
/// Trailer bytes of a chunked response at most.
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Idle keep-alive connections to one plain-HTTP upstream, most recently used last.
pub(crate) struct Pool {
    host: String,
    port: u16,
    /// The upstream's authority, for the Host header.
    authority: String,
    /// The upstream URL's path, without a trailing slash: prefixed to every forwarded path.
    base: String,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({})", self.authority)
    }
}

impl Pool {
    /// A pool for a plain-HTTP mapping; `None` for `https://` upstreams (the hyper path's).
    pub(crate) fn for_mapping(m: &Mapping) -> Option<Pool> {
        if m.upstream_tls.is_some()
            || m.upstream.scheme_str() != Some("http")
            || m.upstream_protocol.is_h2()
        {
            return None;
        }
        let authority = m.upstream.authority()?;
        Some(Pool {
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_string(),
            base: m.upstream.path().trim_end_matches('/').to_string(),
            idle: Mutex::new(Vec::new()),
        })
    }

    fn take(&self) -> Option<TcpStream> {
        let mut idle = self.idle.lock().ok()?;
        let (stream, at) = idle.pop()?;
        if at.elapsed() < POOL_IDLE {
            return Some(stream);
        }
        // The newest one expired, so did every older one.
        idle.clear();
        None
    }

    fn put(&self, stream: TcpStream) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let now = Instant::now();
        let expired = idle
            .iter()
            .take_while(|(_, at)| now.duration_since(*at) >= POOL_IDLE)
            .count();
        idle.drain(..expired);
        if idle.len() < POOL_MAX_IDLE {
            idle.push((stream, now));
        }
    }

    async fn connect(&self, timeout: Duration) -> io::Result<TcpStream> {
        let stream =
            tokio::time::timeout(timeout, TcpStream::connect((self.host.as_str(), self.port)))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// How a fast-path connection ended.
pub(crate) enum Outcome {
    /// Closed (by either side, a timeout, or shutdown).
    Closed,
    /// A request this path does not serve: the hyper path takes the connection, starting with
    /// these bytes.
    Fallback(Bytes),
}

/// What one admitted request needs once its head has been consumed.
struct Plan {
    head_len: usize,
    body_len: usize,
    mapping: usize,
    client_close: bool,
    is_head: bool,
    idempotent: bool,
    /// Method and path, kept only when access logging is on.
    logged: Option<(hyper::Method, String)>,
}

/// How an upstream response body ends.
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunked),
    /// Until the upstream closes; re-framed as chunked for the client.
    Close,
}

/// What the upstream answered, its head already rewritten for the client into `out`.
struct Answer {
    status: u16,
    framing: Framing,
    reusable: bool,
}

enum HeadError {
    /// The connection failed or closed before any byte of a response.
    Lost(io::Error),
    Timeout,
    Malformed(&'static str),
}

/// Serves HTTP/1.1 requests on `io` until the connection ends or a request needs the hyper path.
pub(crate) async fn serve<S>(
    io: &mut S,
    ctx: &Arc<ConnectionContext>,
    mut shutdown: watch::Receiver<bool>,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let state = &ctx.state;
    let domain = &state.domains[ctx.domain];
    let limits = &state.limits;
    // Buffers grow on first use and are reused request after request; a connection idle for
    // IDLE_RELEASE gives them back, so idle keep-alive connections stay small.
    let mut buf = BytesMut::new();
    let mut ubuf = BytesMut::new();
    let mut head: Vec<u8> = Vec::new();
    let mut fwd: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    let timer = tokio::time::sleep(limits.request_header_timeout);
    tokio::pin!(timer);
    let release = tokio::time::sleep(IDLE_RELEASE);
    tokio::pin!(release);
    loop {
        // A whole request head, within the request header timeout (idle keep-alive included).
        let now = tokio::time::Instant::now();
        timer.as_mut().reset(now + limits.request_header_timeout);
        let mut holding = ubuf.capacity() + out.capacity() > 0;
        if holding {
            release.as_mut().reset(now + IDLE_RELEASE);
        }
        let plan = loop {
            if !buf.is_empty() {
                match plan_request(&buf, ctx, &mut head, &mut fwd) {
                    Parsed::Ready(plan) => break plan,
                    Parsed::Partial if buf.len() < limits.max_header_bytes => {}
                    Parsed::Partial | Parsed::Other => return Outcome::Fallback(buf.freeze()),
                    Parsed::AmbiguousLength => {
                        tracing::info!(target: "portcullis::connection", peer = %ctx.peer, domain = %domain.config.hostname, result = "refused", reason = "ambiguous-length", "request with both Content-Length and Transfer-Encoding refused");
                        error_answer(
                            &mut out,
                            StatusCode::BAD_REQUEST,
                            "ambiguous-length",
                            "the request has both Content-Length and Transfer-Encoding; send only one",
                            true,
                            false,
                            &domain.config.response_headers,
                        );
                        let _ = io.write_all(&out).await;
                        let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
                        return Outcome::Closed;
                    }
                }
            }
            // Nothing held (new, or released while idle): the next head is awaited with no
            // buffer at all (see `read_more`), so ten thousand idle connections hold none.
            // 2 KiB first (most heads are far smaller), doubling for larger ones.
            if buf.capacity() > 0 && buf.capacity() - buf.len() < 512 {
                buf.reserve(buf.capacity().clamp(2048, 8 * 1024));
            }
            let idle = buf.is_empty();
            tokio::select! {
                read = read_more(io, &mut buf) => match read {
                    Ok(0) | Err(_) => return Outcome::Closed,
                    Ok(_) => {}
                },
                _ = timer.as_mut() => {
                    // A partial head that did not finish in time (slow clients); an idle
                    // keep-alive connection ending is not a limit reached.
                    if !idle {
                        limit_reached("request_header_timeout");
                    }
                    return Outcome::Closed;
                }
                _ = release.as_mut(), if idle && holding => {
                    buf = BytesMut::new();
                    ubuf = BytesMut::new();
                    head = Vec::new();
                    fwd = Vec::new();
                    out = Vec::new();
                    holding = false;
                    ctx.release_identity();
                }
                _ = shutdown.changed(), if idle => return Outcome::Closed,
            }
        };
        // The request's own work runs in a future of its own, boxed: the connection's future
        // then keeps only what an idle connection needs between requests, not room for the
        // upstream exchange and relay.
        let stopping = *shutdown.borrow();
        let served = Box::pin(serve_admitted(
            io,
            ctx,
            plan,
            Buffers {
                buf: &mut buf,
                head: &mut head,
                ubuf: &mut ubuf,
                out: &mut out,
            },
            stopping,
        ))
        .await;
        if let Served::Closed = served {
            return Outcome::Closed;
        }
    }
}

/// The buffers a connection reuses request after request.
struct Buffers<'a> {
    buf: &'a mut BytesMut,
    head: &'a mut Vec<u8>,
    ubuf: &'a mut BytesMut,
    out: &'a mut Vec<u8>,
}

/// Whether the connection goes on after a request.
enum Served {
    Next,
    Closed,
}

/// Reads more of a request head into `buf`. A connection holding no buffer (new, or released
/// while idle) waits for its first byte with none, then takes one.
async fn read_more<S>(io: &mut S, buf: &mut BytesMut) -> io::Result<usize>
where
    S: AsyncRead + Unpin,
{
    if buf.capacity() > 0 {
        return io.read_buf(buf).await;
    }
    let mut first = [0u8; 1];
    if io.read(&mut first).await? == 0 {
        return Ok(0);
    }
    // Then what arrived with it (TLS holds the rest of the record), without waiting: a head is
    // judged on all of it (an MQTT CONNECT by its first bytes, not its first byte).
    buf.resize(2048, 0);
    buf[0] = first[0];
    let more = {
        let mut rest = tokio::io::ReadBuf::new(&mut buf[1..]);
        std::future::poll_fn(
            |cx| match std::pin::Pin::new(&mut *io).poll_read(cx, &mut rest) {
                std::task::Poll::Ready(Ok(())) => std::task::Poll::Ready(rest.filled().len()),
                // Nothing more yet, or an error the next read meets again.
                _ => std::task::Poll::Ready(0),
            },
        )
        .await
    };
    buf.truncate(1 + more);
    Ok(1 + more)
}

/// One admitted request whose head is in `buf`: its small body read, exchanged with the
/// upstream, the answer relayed, logged and counted.
async fn serve_admitted<S>(
    io: &mut S,
    ctx: &Arc<ConnectionContext>,
    plan: Plan,
    Buffers {
        buf,
        head,
        ubuf,
        out,
    }: Buffers<'_>,
    stopping: bool,
) -> Served
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let state = &ctx.state;
    let domain = &state.domains[ctx.domain];
    let limits = &state.limits;
    let started = Instant::now();
    buf.advance(plan.head_len);
    // A small body, read whole and sent with the head.
    while buf.len() < plan.body_len {
        buf.reserve(plan.body_len - buf.len());
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return Served::Closed,
            Ok(_) => {}
        }
    }
    head.extend_from_slice(&buf[..plan.body_len]);
    buf.advance(plan.body_len);

    let Some(pool) = domain.pools.get(plan.mapping).and_then(Option::as_ref) else {
        return Served::Closed;
    };
    let closing = plan.client_close || stopping;
    out.clear();
    ubuf.clear();
    let answering = Answering {
        plan: &plan,
        closing,
        extra: &domain.config.response_headers,
    };
    let exchanged = exchange(pool, head, ubuf, out, &answering, limits).await;
    let mapping_name = domain.config.mappings[plan.mapping].base_path.as_str();
    let (up, answer) = match exchanged {
        Ok(ok) => ok,
        Err(e) => {
            let (status, code, message) = match e {
                HeadError::Timeout => (
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream-timeout",
                    "the upstream service did not answer in time",
                ),
                HeadError::Lost(e) => {
                    tracing::warn!(upstream = %pool.authority, error = %e, "upstream request failed");
                    (
                        StatusCode::BAD_GATEWAY,
                        "upstream-unavailable",
                        "the upstream service could not be reached",
                    )
                }
                HeadError::Malformed(why) => {
                    tracing::warn!(upstream = %pool.authority, error = why, "upstream answered with a malformed response");
                    (
                        StatusCode::BAD_GATEWAY,
                        "upstream-unavailable",
                        "the upstream service could not be reached",
                    )
                }
            };
            let body_len = error_answer(
                out,
                status,
                code,
                message,
                closing,
                plan.is_head,
                &domain.config.response_headers,
            );
            domain
                .request_metrics(mapping_name, status.as_u16())
                .record(started.elapsed().as_secs_f64());
            let sent = io.write_all(out).await.and(io.flush().await);
            log(
                ctx,
                &plan,
                mapping_name,
                status.as_u16(),
                (started, Instant::now()),
                (body_len as u64, sent.is_ok()),
            );
            if sent.is_err() {
                return Served::Closed;
            }
            if closing {
                let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
                return Served::Closed;
            }
            return Served::Next;
        }
    };
    let headers_at = Instant::now();
    domain
        .request_metrics(mapping_name, answer.status)
        .record(started.elapsed().as_secs_f64());
    let relayed = relay(io, up, ubuf, out, answer, pool).await;
    log(
        ctx,
        &plan,
        mapping_name,
        relayed.status,
        (started, headers_at),
        (relayed.bytes, relayed.complete),
    );
    if !relayed.complete || !relayed.client_ok || relayed.close_client {
        return Served::Closed;
    }
    if closing {
        // Said `connection: close`: end the TLS session cleanly.
        let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
        return Served::Closed;
    }
    Served::Next
}

/// The access-log line of a fast-path request (when access logging is on): `times` is
/// (started, response head sent), `sent` is (body bytes, complete).
fn log(
    ctx: &Arc<ConnectionContext>,
    plan: &Plan,
    mapping: &str,
    status: u16,
    (started, headers_at): (Instant, Instant),
    (bytes, complete): (u64, bool),
) {
    if let Some((method, path)) = &plan.logged {
        AccessLog {
            ctx: ctx.clone(),
            mapping: mapping.to_string(),
            method: method.clone(),
            path: path.clone(),
            status,
            denied: None,
            headers_ms: headers_at.duration_since(started).as_secs_f64() * 1000.0,
            started,
        }
        .emit(bytes, complete);
    }
}

enum Parsed {
    Ready(Plan),
    Partial,
    /// Not for this path.
    Other,
    /// Both Content-Length and Transfer-Encoding: refused with 400 and the connection closed
    /// (RFC 9112 6.1). On a connection already handed to hyper, hyper frames such a request by
    /// Transfer-Encoding and closes the connection after it, the other course 6.1 allows.
    AmbiguousLength,
}

/// Writes the gateway's own error answer into `out` (replacing what it held); returns the body
/// length.
fn error_answer(
    out: &mut Vec<u8>,
    status: StatusCode,
    code: &str,
    message: &str,
    closing: bool,
    head_only: bool,
    extra: &ResponseHeaders,
) -> usize {
    let (content_type, body) = error_parts(status, code, message, None);
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(extra.block());
    date_header(out);
    out.extend_from_slice(b"content-type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"\r\ncache-control: no-store\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    if closing {
        out.extend_from_slice(b"\r\nconnection: close");
    }
    out.extend_from_slice(b"\r\n\r\n");
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    body.len()
}

/// Parses the request head at the start of `buf` and, when this path serves it, writes the
/// upstream request head into `head`.
fn plan_request(
    buf: &[u8],
    ctx: &ConnectionContext,
    head: &mut Vec<u8>,
    fwd: &mut Vec<u8>,
) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Other;
    };
    if method == "CONNECT" || !target.starts_with('/') || !target.bytes().all(plain_target_byte) {
        return Parsed::Other;
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let identity = &ctx.state.identity;
    let underscores = ctx.state.domains[ctx.domain].config.underscores_in_headers;
    let mut method_override = false;
    let mut host: Option<&[u8]> = None;
    let mut hosts = 0;
    let mut body_len: Option<u64> = None;
    let mut client_close = false;
    let mut prior_xff: Option<&[u8]> = None;
    let (mut te, mut cl, mut other) = (false, false, false);
    fwd.clear();
    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value;
        match classify(name) {
            Class::Host => {
                hosts += 1;
                host = Some(value);
            }
            Class::ContentLength => {
                cl = true;
                if body_len.is_some() {
                    other = true;
                    continue;
                }
                match parse_length(value) {
                    Some(n) => body_len = Some(n),
                    None => other = true,
                }
                copy_header(fwd, name, value);
            }
            Class::Connection => {
                for token in value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        client_close = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                        // A header named by Connection must go too: the hyper path does that.
                        return Parsed::Other;
                    }
                }
            }
            Class::Refer => {
                te |= name.eq_ignore_ascii_case("transfer-encoding");
                other = true;
            }
            Class::Drop => {}
            Class::ForwardedFor => {
                if prior_xff.is_none() {
                    prior_xff = Some(value);
                }
            }
            Class::Other => {
                if !crate::http::inbound::dropped(identity, underscores, name) {
                    method_override |= crate::http::inbound::METHOD_OVERRIDES
                        .iter()
                        .any(|m| m.eq_ignore_ascii_case(name));
                    copy_header(fwd, name, value);
                }
            }
        }
    }
    if te && cl {
        return Parsed::AmbiguousLength;
    }
    if other {
        return Parsed::Other;
    }
    let body_len = body_len.unwrap_or(0);
    if hosts != 1 || body_len > MAX_BUFFERED_BODY {
        return Parsed::Other;
    }
    let Some(host) = host.and_then(host_of) else {
        return Parsed::Other;
    };
    let Ok(admitted) = admit(ctx, method, path, query, &host, false, false) else {
        return Parsed::Other;
    };
    let domain = &ctx.state.domains[ctx.domain];
    if method_override
        && domain.config.mappings[admitted.index].authorization
            == crate::config::Authorization::Policy
    {
        // The hyper path drops method overrides on policy mappings.
        return Parsed::Other;
    }
    let Some(pool) = domain.pools.get(admitted.index).and_then(Option::as_ref) else {
        return Parsed::Other;
    };
    head.clear();
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(pool.base.as_bytes());
    head.extend_from_slice(admitted.rest.as_bytes());
    if let Some(q) = query {
        head.push(b'?');
        head.extend_from_slice(q.as_bytes());
    }
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    head.extend_from_slice(pool.authority.as_bytes());
    head.extend_from_slice(b"\r\n");
    head.extend_from_slice(fwd);
    head.extend_from_slice(ctx.identity_headers().lines());
    ctx.forwarding
        .write_h1(&admitted.forwarded_host(&host, domain), prior_xff, head);
    head.extend_from_slice(b"\r\n");
    let logged = tracing::enabled!(target: "portcullis::access", tracing::Level::INFO)
        .then(|| {
            hyper::Method::from_bytes(method.as_bytes())
                .ok()
                .map(|m| (m, path.to_string()))
        })
        .flatten();
    Parsed::Ready(Plan {
        head_len,
        body_len: body_len as usize,
        mapping: admitted.index,
        client_close,
        is_head: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        logged,
    })
}

/// Sends the request to the upstream (a pooled connection, or a new one) and reads the answer's
/// head. A pooled connection that turns out closed is replaced by a new one for idempotent
/// requests; a non-idempotent request goes only on a pooled connection that still looks open.
async fn exchange(
    pool: &Pool,
    head: &[u8],
    ubuf: &mut BytesMut,
    out: &mut Vec<u8>,
    answering: &Answering<'_>,
    limits: &crate::config::Limits,
) -> Result<(TcpStream, Answer), HeadError> {
    let plan = answering.plan;
    let mut fresh_only = false;
    loop {
        let pooled = if fresh_only { None } else { pool.take() };
        let reused = pooled.is_some();
        let mut up = match pooled {
            Some(s) => s,
            None => pool
                .connect(limits.upstream_connect_timeout)
                .await
                .map_err(HeadError::Lost)?,
        };
        if reused && !looks_open(&up) {
            continue;
        }
        let deadline = tokio::time::Instant::now() + limits.upstream_response_timeout;
        let result = match tokio::time::timeout_at(deadline, up.write_all(head)).await {
            Ok(Ok(())) => read_answer(&mut up, ubuf, out, answering, deadline, limits).await,
            Ok(Err(e)) => Err(HeadError::Lost(e)),
            Err(_) => Err(HeadError::Timeout),
        };
        match result {
            Ok(answer) => return Ok((up, answer)),
            Err(HeadError::Lost(_)) if reused && plan.idempotent => {
                // The upstream closed the pooled connection before answering: once more on a
                // new one.
                fresh_only = true;
                ubuf.clear();
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether a pooled connection has not been closed by the upstream. Costs no system call unless
/// the reactor saw the socket become readable while it was idle.
fn looks_open(up: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(up.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Reads the response head (skipping interim 1xx answers) and writes the client's version of it
/// into `out`.
async fn read_answer(
    up: &mut TcpStream,
    ubuf: &mut BytesMut,
    out: &mut Vec<u8>,
    answering: &Answering<'_>,
    deadline: tokio::time::Instant,
    limits: &crate::config::Limits,
) -> Result<Answer, HeadError> {
    let mut got_any = false;
    loop {
        if !ubuf.is_empty() {
            match parse_answer(ubuf, out, answering)? {
                Some((n, None)) => {
                    // 1xx interim answer: not forwarded (the request carried no Expect).
                    ubuf.advance(n);
                    continue;
                }
                Some((n, Some(answer))) => {
                    ubuf.advance(n);
                    return Ok(answer);
                }
                None if ubuf.len() >= limits.max_header_bytes => {
                    return Err(HeadError::Malformed("response head too large"));
                }
                None => {}
            }
        }
        // 4 KiB first (most answers fit), doubling for larger heads; a body that needs more
        // reads gets 16 KiB (`relay`). Small buffers keep what a burst of requests holds until
        // the idle release small.
        if ubuf.capacity() - ubuf.len() < 1024 {
            ubuf.reserve(ubuf.capacity().clamp(4096, 16 * 1024));
        }
        match tokio::time::timeout_at(deadline, up.read_buf(ubuf)).await {
            Err(_) => return Err(HeadError::Timeout),
            Ok(Ok(0)) if !got_any => {
                return Err(HeadError::Lost(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection without answering",
                )));
            }
            Ok(Ok(0)) => {
                return Err(HeadError::Malformed(
                    "connection closed inside the response head",
                ));
            }
            Ok(Err(e)) if !got_any => return Err(HeadError::Lost(e)),
            Ok(Err(_)) => {
                return Err(HeadError::Malformed(
                    "connection failed inside the response head",
                ));
            }
            Ok(Ok(_)) => got_any = true,
        }
    }
}

/// Parses a response head; `Some((len, None))` for an interim 1xx answer.
fn parse_answer(
    ubuf: &[u8],
    out: &mut Vec<u8>,
    answering: &Answering<'_>,
) -> Result<Option<(usize, Option<Answer>)>, HeadError> {
    let Answering {
        plan,
        closing,
        extra,
    } = *answering;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(ubuf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(HeadError::Malformed("unparsable response head")),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(HeadError::Malformed("unparsable response head"));
    };
    if status == 101 {
        return Err(HeadError::Malformed("101 without an upgrade request"));
    }
    if (100..200).contains(&status) {
        return Ok(Some((n, None)));
    }
    // First pass: framing, and what Connection names.
    let mut length: Option<u64> = None;
    let mut lengths_ok = true;
    let mut chunked: Option<bool> = None;
    let mut reusable = version == 1;
    let mut named: Vec<&[u8]> = Vec::new();
    for h in resp.headers.iter() {
        match classify(h.name) {
            Class::ContentLength => match parse_length(h.value) {
                Some(v) if length.is_none_or(|l| l == v) => length = Some(v),
                _ => lengths_ok = false,
            },
            Class::Connection => {
                for token in h.value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        reusable = false;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
                        named.push(token);
                    }
                }
            }
            Class::Refer if h.name.eq_ignore_ascii_case("transfer-encoding") => {
                let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            }
            _ => {}
        }
    }
    let no_body = plan.is_head || status == 204 || status == 304;
    let framing = if no_body {
        Framing::Empty
    } else {
        match chunked {
            Some(true) => {
                // Transfer-Encoding overrides Content-Length; such a connection is not reused.
                if length.is_some() {
                    reusable = false;
                }
                Framing::Chunked(Chunked::default())
            }
            Some(false) => {
                return Err(HeadError::Malformed(
                    "transfer coding other than chunked last",
                ));
            }
            None if !lengths_ok => return Err(HeadError::Malformed("invalid Content-Length")),
            None => match length {
                Some(n) => Framing::Length(n),
                None => {
                    reusable = false;
                    Framing::Close
                }
            },
        }
    };
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    let reason = resp.reason.unwrap_or("");
    if reason.is_empty() {
        let canonical = StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        out.extend_from_slice(canonical.as_bytes());
    } else {
        out.extend_from_slice(reason.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    let relay_chunked = matches!(framing, Framing::Chunked(_));
    let mut dated = false;
    for h in resp.headers.iter() {
        let name = h.name;
        let is = |s: &str| name.eq_ignore_ascii_case(s);
        // Transfer-Encoding stays when the chunked bytes are relayed as they are.
        let hop = (HOP_BY_HOP.iter().any(|n| is(n.as_str()))
            && !(relay_chunked && is("transfer-encoding")))
            || (is("content-length") && relay_chunked)
            || named
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
            || extra.sets(name);
        if !hop {
            dated |= is("date");
            copy_header(out, name, h.value);
        }
    }
    out.extend_from_slice(extra.block());
    // An origin server with a clock sends Date (RFC 9110 §6.6.1); a proxy adds one when it did
    // not, as the HTTP/2 path does.
    if !dated {
        date_header(out);
    }
    if matches!(framing, Framing::Close) {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if closing {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some((
        n,
        Some(Answer {
            status,
            framing,
            reusable,
        }),
    )))
}

/// What a response head is written for: the request's plan, whether the connection closes after
/// it, and the domain's response headers.
#[derive(Clone, Copy)]
struct Answering<'a> {
    plan: &'a Plan,
    closing: bool,
    extra: &'a ResponseHeaders,
}

/// Appends `date: <IMF-fixdate>\r\n`, formatted once a second per thread.
fn date_header(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(i64, [u8; 29])> = const { std::cell::RefCell::new((i64::MIN, [0; 29])) };
    }
    let now = time::OffsetDateTime::now_utc();
    let second = now.unix_timestamp();
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != second {
            cached.1 = imf_fixdate(now);
            cached.0 = second;
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&cached.1);
        out.extend_from_slice(b"\r\n");
    });
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110 §5.6.7).
fn imf_fixdate(t: time::OffsetDateTime) -> [u8; 29] {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let text = format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[usize::from(t.weekday().number_days_from_monday())],
        t.day(),
        MONTHS[usize::from(u8::from(t.month()) - 1)],
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let mut out = [b' '; 29];
    let n = text.len().min(29);
    out[..n].copy_from_slice(&text.as_bytes()[..n]);
    out
}

struct Relayed {
    status: u16,
    /// Body bytes sent to the client.
    bytes: u64,
    /// Whether the whole response was relayed.
    complete: bool,
    /// Whether the client connection can still be written.
    client_ok: bool,
    /// Whether the client connection must close after this response.
    close_client: bool,
}

/// Writes the response head in `out` and relays the body; puts the upstream connection back in
/// the pool when the response ended cleanly.
async fn relay<S>(
    io: &mut S,
    mut up: TcpStream,
    ubuf: &mut BytesMut,
    out: &mut Vec<u8>,
    answer: Answer,
    pool: &Pool,
) -> Relayed
where
    S: AsyncWrite + Unpin,
{
    let mut r = Relayed {
        status: answer.status,
        bytes: 0,
        complete: false,
        client_ok: true,
        close_client: false,
    };
    let mut framing = answer.framing;
    // The head goes out with the first body bytes: one TLS record, one write.
    let mut first = true;
    loop {
        let (take, data, done) = match &mut framing {
            Framing::Empty => (0, 0, true),
            Framing::Length(left) => {
                let take = (*left).min(ubuf.len() as u64) as usize;
                *left -= take as u64;
                (take, take as u64, *left == 0)
            }
            Framing::Chunked(scan) => match scan.scan(ubuf) {
                Ok(take) => (take, scan.data_taken(), scan.done()),
                Err(why) => {
                    tracing::warn!(upstream = %pool.authority, error = why, "upstream sent a malformed chunked body");
                    r.client_ok = false;
                    return r;
                }
            },
            Framing::Close => (ubuf.len(), ubuf.len() as u64, false),
        };
        if matches!(framing, Framing::Close) {
            if take > 0 {
                out.extend_from_slice(format!("{take:x}\r\n").as_bytes());
                out.extend_from_slice(&ubuf[..take]);
                out.extend_from_slice(b"\r\n");
            }
        } else {
            out.extend_from_slice(&ubuf[..take]);
        }
        ubuf.advance(take);
        r.bytes += data;
        if !out.is_empty() || first {
            first = false;
            if io.write_all(out).await.is_err() {
                r.client_ok = false;
                return r;
            }
            out.clear();
        }
        if done {
            break;
        }
        ubuf.clear();
        if ubuf.capacity() < 16 * 1024 {
            ubuf.reserve(16 * 1024);
        }
        match up.read_buf(ubuf).await {
            Ok(0) if matches!(framing, Framing::Close) => {
                // The end of a close-delimited body: the last chunk.
                if io.write_all(b"0\r\n\r\n").await.is_err() {
                    r.client_ok = false;
                    return r;
                }
                r.complete = true;
                let _ = io.flush().await;
                return r;
            }
            Ok(0) | Err(_) => {
                // The upstream broke off inside the body: the client cannot get the rest.
                r.close_client = true;
                return r;
            }
            Ok(_) => {}
        }
    }
    if io.flush().await.is_err() {
        r.client_ok = false;
        return r;
    }
    r.complete = true;
    if answer.reusable && ubuf.is_empty() {
        pool.put(up);
    }
    r
}

/// Finds where a chunked body ends without changing a byte of it (RFC 9112 section 7.1).
#[derive(Default)]
struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
    line: usize,
    /// Data bytes seen in the last `scan`.
    taken: u64,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum ChunkState {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunked {
    /// How many bytes of `input` belong to the body; stops at its end.
    fn scan(&mut self, input: &[u8]) -> Result<usize, &'static str> {
        use ChunkState::*;
        self.taken = 0;
        let mut i = 0;
        while i < input.len() && self.state != Done {
            if self.state == Data {
                let take = self.size.min((input.len() - i) as u64);
                self.size -= take;
                self.taken += take;
                i += take as usize;
                if self.size == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = match (self.state, b) {
                (Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    if self.digits >= 15 {
                        return Err("chunk size too large");
                    }
                    self.digits += 1;
                    let v = (b as char).to_digit(16).unwrap_or(0) as u64;
                    self.size = self.size * 16 + v;
                    Size
                }
                (Size, b';' | b' ' | b'\t') if self.digits > 0 => {
                    self.line = 0;
                    Extension
                }
                (Size, b'\r') if self.digits > 0 => SizeLf,
                (Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return Err("bare LF in a chunk extension"),
                (Extension, _) => {
                    self.line += 1;
                    if self.line > 4096 {
                        return Err("chunk extension too long");
                    }
                    Extension
                }
                (SizeLf, b'\n') => {
                    self.digits = 0;
                    if self.size == 0 {
                        self.line = 0;
                        TrailerStart
                    } else {
                        Data
                    }
                }
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Size,
                (TrailerStart, b'\r') => EndLf,
                (TrailerStart | Trailer, b'\n') => return Err("bare LF in a trailer"),
                (TrailerStart | Trailer, _) => {
                    self.line += 1;
                    if self.line > MAX_TRAILER_BYTES {
                        return Err("trailers too large");
                    }
                    if b == b'\r' { TrailerLf } else { Trailer }
                }
                (TrailerLf, b'\n') => TrailerStart,
                (EndLf, b'\n') => Done,
                _ => return Err("malformed chunk framing"),
            };
        }
        Ok(i)
    }

    fn data_taken(&self) -> u64 {
        self.taken
    }

    fn done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

/// What a header means to the fast path.
enum Class {
    Host,
    ContentLength,
    Connection,
    /// Needs the hyper path (requests): Transfer-Encoding, Upgrade, Expect.
    Refer,
    /// Hop-by-hop or replaced by the gateway: never forwarded.
    Drop,
    ForwardedFor,
    Other,
}

fn classify(name: &str) -> Class {
    let is = |s: &str| name.eq_ignore_ascii_case(s);
    match name.len() {
        2 if is("te") => Class::Drop,
        4 if is("host") => Class::Host,
        6 if is("expect") => Class::Refer,
        7 if is("upgrade") => Class::Refer,
        7 if is("trailer") => Class::Drop,
        9 if is("forwarded") => Class::Drop,
        10 if is("connection") => Class::Connection,
        10 if is("keep-alive") => Class::Drop,
        14 if is("content-length") => Class::ContentLength,
        14 if is("http2-settings") => Class::Drop,
        15 if is("x-forwarded-for") => Class::ForwardedFor,
        16 if is("proxy-connection") || is("x-forwarded-host") => Class::Drop,
        17 if is("transfer-encoding") => Class::Refer,
        17 if is("x-forwarded-proto") => Class::Drop,
        19 if is("proxy-authorization") => Class::Drop,
        _ => Class::Other,
    }
}

fn copy_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A Content-Length value: digits only, at most 18 of them.
fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Origin-form target bytes this path forwards as they are: RFC 3986 unreserved, sub-delims,
/// `:@/?%`. Anything else is the hyper path's to judge.
fn plain_target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// The host of a Host header value with only hostname or IP characters (anything else is the
/// hyper path's to judge): lower-case, port removed.
fn host_of(value: &[u8]) -> Option<String> {
    let value = value.trim_ascii();
    if !crate::http::inbound::valid_host(value) {
        return None;
    }
    Some(normalize_host(std::str::from_utf8(value).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(input: &[u8], step: usize) -> Result<(usize, u64, bool), &'static str> {
        let mut c = Chunked::default();
        let (mut used, mut data) = (0, 0);
        for piece in input.chunks(step) {
            let n = c.scan(piece)?;
            used += n;
            data += c.data_taken();
            if c.done() {
                break;
            }
        }
        Ok((used, data, c.done()))
    }

    #[test]
    fn chunked_bodies_end_where_the_framing_says_in_any_split() {
        let body =
            b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        for step in 1..body.len() {
            assert_eq!(scan_all(body, step), Ok((end, 31, true)), "step {step}");
        }
        assert_eq!(scan_all(b"0\r\n\r\n", 2), Ok((5, 0, true)));
        assert_eq!(scan_all(b"5\r\nhel", 100), Ok((6, 3, false)));
    }

    #[test]
    fn malformed_chunk_framing_is_refused() {
        for bad in [
            &b"\r\n"[..],
            b"x\r\n",
            b"5\r\nhelloXX",
            b"5\nhello\r\n",
            b"fffffffffffffffff\r\n",
            b"0\r\nbad\n\r\n",
        ] {
            assert!(
                scan_all(bad, 100).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn hosts_and_lengths_are_read_strictly() {
        assert_eq!(host_of(b"A.Test:8443").as_deref(), Some("a.test"));
        assert_eq!(host_of(b"[::1]:443").as_deref(), Some("::1"));
        assert_eq!(host_of(b"a.test\"x").as_deref(), None);
        assert_eq!(host_of(b"").as_deref(), None);
        assert_eq!(parse_length(b" 12 "), Some(12));
        assert_eq!(parse_length(b"1,1"), None);
        assert_eq!(parse_length(b"-1"), None);
        assert_eq!(parse_length(b"+1"), None);
    }
}
