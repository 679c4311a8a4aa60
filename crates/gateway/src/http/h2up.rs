//! HTTP/2 upstreams (`upstream_protocol = "h2c" | "h2"`), spoken with the h2 crate from the
//! request's own future.
//!
//! hyper's pooled client handed every request to the upstream connection's task through a
//! channel, spawned a task per request for its answer (and another for a request body still
//! arriving), and took its answer back through a one-shot channel. Here the request's stream is
//! opened on the shared connection by the inbound stream's own future, which also relays the
//! request body (flow-controlled: the next piece is read from the client only once the upstream
//! has room for it) and the answer (its data released to the upstream only as the client's
//! side takes it). The connection's own task only drives the connection: framing, pings and
//! closing an idle one. One connection per upstream, multiplexed, as hyper's pool kept; another
//! once it has as many streams open as the upstream allows.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::{Request, Response, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::coalesce::Coalesce;
use crate::http::respond::Body;

/// HTTP/2 flow-control window per upstream stream: what the gateway may hold of one response a
/// client has not read yet.
const STREAM_WINDOW: u32 = 512 * 1024;

/// HTTP/2 flow-control window per upstream connection, shared by the streams of every client:
/// out of reach (1 GiB, as Go's transport), so that only each stream's window holds an upstream
/// back. (Regression: at 16 MiB, one client that stopped reading 17 streams of large answers
/// held the whole connection's window, and every other client's calls to that upstream waited.)
/// What the gateway holds for clients that do not read is bounded per stream, as an HTTP/1.1
/// upstream's socket buffers bound it per connection: at most [`STREAM_WINDOW`] for each of a
/// client connection's streams.
const CONNECTION_WINDOW: u32 = 1024 * 1024 * 1024;

/// How much framing overhead of small DATA frames held unread h2 allows on an upstream
/// connection before it closes it (ENHANCE_YOUR_CALM).
const DATA_FRAME_BUDGET: usize = 8 * 1024 * 1024;

/// The largest header block (or trailers) taken from an upstream.
const MAX_HEADER_LIST: u32 = 64 * 1024;

/// What a stream may queue to an upstream beyond its window (h2's send buffer).
const SEND_BUFFER: usize = 400 * 1024;

/// A ping to an upstream connection this often; no answer within [`PING_TIMEOUT`] closes it.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection with no stream for this long is closed.
const IDLE: Duration = Duration::from_secs(60);

/// How often a connection's task looks whether it is idle.
const IDLE_CHECK: Duration = Duration::from_secs(10);

/// The most of a request's body kept, until the answer's head comes, to send it again should
/// the upstream refuse the stream unprocessed (larger bodies are not sent again).
const REPLAY_LIMIT: usize = 64 * 1024;

/// What keeping one piece of a body costs, counted towards [`REPLAY_LIMIT`] besides its bytes.
const PIECE_COST: usize = 64;

/// The fields a client's request trailers may not carry to the upstream, as its header fields
/// may not: the identity and forwarding headers (in any spelling), and what HTTP/2 forbids.
#[derive(Clone, Copy)]
pub(crate) struct TrailerScreen<'a> {
    pub(crate) state: &'a Arc<crate::State>,
    pub(crate) underscores: bool,
    /// A policy-authorized mapping: no method-override field either.
    pub(crate) policy: bool,
}

impl TrailerScreen<'_> {
    pub(crate) fn owned(&self) -> OwnedTrailerScreen {
        OwnedTrailerScreen {
            state: self.state.clone(),
            underscores: self.underscores,
            policy: self.policy,
        }
    }
}

/// A [`TrailerScreen`] a request body's own task keeps.
pub(crate) struct OwnedTrailerScreen {
    state: Arc<crate::State>,
    underscores: bool,
    policy: bool,
}

impl OwnedTrailerScreen {
    /// Removes from `trailers` what may not go to the upstream.
    pub(crate) fn apply(&self, trailers: &mut hyper::HeaderMap) {
        crate::http::inbound::strip_trailers(
            &self.state.identity,
            self.underscores,
            self.policy,
            trailers,
        );
    }
}

/// The HTTP/2 client of one mapping: a connection per upstream authority, more while one has
/// as many streams open as the upstream allows.
pub(crate) struct H2Client {
    /// `h2`: TLS with ALPN `h2`; `h2c`: none (prior knowledge).
    tls: Option<tokio_rustls::TlsConnector>,
    connect_timeout: Duration,
    /// The connection to each upstream authority in use.
    conns: Conns,
    /// Held while connecting, so that concurrent requests share one new connection; the
    /// last attempt that failed (when, and why), which those that waited for it share rather
    /// than each wait for a connection of their own (an upstream that does not answer would
    /// hold the last of a hundred waiting requests for a hundred connect timeouts).
    connecting: tokio::sync::Mutex<Option<(tokio::time::Instant, String)>>,
    /// `retry_refused`: a stream refused unprocessed is sent once more. Off, no request's head
    /// or body is kept for it (a copy of every head cost 7–10 % of the requests a core proxies).
    retry: bool,
}

type Conns = Arc<Mutex<Vec<(String, Conn)>>>;

#[derive(Clone)]
struct Conn {
    send: h2::client::SendRequest<Bytes>,
    /// Set once no new exchange may start on it (closed, or closing once idle).
    closed: Arc<AtomicBool>,
    activity: Arc<Activity>,
}

/// A connection's exchanges under way, and when the last one ended.
struct Activity {
    streams: AtomicUsize,
    /// Exchanges under way (streams opened and not yet done with).
    exchanges: AtomicUsize,
    since: std::time::Instant,
    /// Milliseconds from `since` to the end of the last exchange.
    last_ms: AtomicU64,
}

impl Activity {
    fn idle_for(&self) -> Option<Duration> {
        if self.streams.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(self.since.elapsed().saturating_sub(last))
    }
}

/// An exchange under way on a connection (which is not idle meanwhile).
struct Streaming(Arc<Activity>, bool);

impl Streaming {
    fn on(conn: &Conn) -> Streaming {
        conn.activity.streams.fetch_add(1, Ordering::AcqRel);
        conn.activity.exchanges.fetch_add(1, Ordering::AcqRel);
        Streaming(conn.activity.clone(), true)
    }

    /// Another part of the same exchange (a request body going up on its own task).
    fn again(&self) -> Streaming {
        self.0.streams.fetch_add(1, Ordering::AcqRel);
        Streaming(self.0.clone(), false)
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let now = u64::try_from(self.0.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.store(now, Ordering::Relaxed);
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
        if self.1 {
            self.0.exchanges.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl std::fmt::Debug for H2Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Client")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// Why an attempt at an exchange got no answer.
enum Attempt {
    /// The upstream could not be reached, or broke the exchange.
    Failed(String),
    /// The upstream refused the stream without processing it: it may be sent again.
    Unprocessed(String),
}

/// Why an exchange got no answer.
pub(crate) enum Failure {
    /// The answer's head did not come in time.
    Timeout,
    /// The upstream could not be reached, or broke the exchange.
    Failed(String),
}

impl H2Client {
    pub(crate) fn new(
        connect_timeout: Duration,
        tls: Option<rustls::ClientConfig>,
        retry: bool,
    ) -> H2Client {
        H2Client {
            tls: tls.map(|mut config| {
                config.alpn_protocols = vec![b"h2".to_vec()];
                tokio_rustls::TlsConnector::from(Arc::new(config))
            }),
            connect_timeout,
            conns: Arc::new(Mutex::new(Vec::new())),
            connecting: tokio::sync::Mutex::new(None),
            retry,
        }
    }

    /// Sends `req` (its URI absolute) and returns the answer's head once it came within
    /// `timeout`, its body streamed from the upstream while the request's body still goes to
    /// it.
    pub(crate) async fn exchange(
        &self,
        req: Request<Incoming>,
        timeout: Duration,
        screen: TrailerScreen<'_>,
    ) -> Result<Response<Body>, Failure> {
        let (parts, body) = req.into_parts();
        let end = body.is_end_stream();
        let exchange = async {
            let mut body = Some(body);
            let mut replay: Option<Pipe> = None;
            let mut parts = parts;
            let attempts = if self.retry { 2 } else { 1 };
            for attempt in 0..attempts {
                // Sent again at most once, on a new stream: its head kept for it.
                let head = if attempt == 0 && attempts == 1 {
                    std::mem::replace(&mut parts, Request::new(()).into_parts().0)
                } else if attempt == 0 {
                    let mut again = Request::new(());
                    *again.method_mut() = parts.method.clone();
                    *again.uri_mut() = parts.uri.clone();
                    *again.version_mut() = parts.version;
                    *again.headers_mut() = parts.headers.clone();
                    std::mem::replace(&mut parts, again.into_parts().0)
                } else {
                    std::mem::replace(&mut parts, Request::new(()).into_parts().0)
                };
                let head = Request::from_parts(head, ());
                let last = attempt + 1 == attempts;
                match self
                    .attempt(head, end, &mut body, &mut replay, &screen, last)
                    .await
                {
                    Ok(answer) => return Ok(answer),
                    Err(Attempt::Failed(e)) => return Err(Failure::Failed(e)),
                    Err(Attempt::Unprocessed(e)) => {
                        if last || (body.is_none() && replay.is_none()) {
                            return Err(Failure::Failed(e));
                        }
                        tracing::debug!(error = %e, "an HTTP/2 upstream refused a stream unprocessed; sending it again");
                    }
                }
            }
            Err(Failure::Failed(
                "the upstream refused the request twice".to_string(),
            ))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Timeout),
        }
    }

    /// One attempt at an exchange: `body` (the client's, untouched yet) or `replay` (what a
    /// refused attempt sent, and the rest of the client's body) goes up. Refused unprocessed,
    /// the request's body is left in `replay` if it can be sent again.
    async fn attempt(
        &self,
        head: Request<()>,
        end: bool,
        body: &mut Option<Incoming>,
        replay: &mut Option<Pipe>,
        screen: &TrailerScreen<'_>,
        last: bool,
    ) -> Result<Response<Body>, Attempt> {
        let (mut send, streaming) = self.ready(head.uri()).await.map_err(Attempt::Failed)?;
        // Refused before it was sent (the connection going away or gone): nothing reached the
        // upstream. A request h2 finds malformed would fail again: not sent twice.
        let (mut answer, stream) = send.send_request(head, end).map_err(|e| {
            let message = format!("HTTP/2: {e}");
            if e.is_go_away() || e.is_io() {
                Attempt::Unprocessed(message)
            } else {
                Attempt::Failed(message)
            }
        })?;
        let mut pipe = if end {
            None
        } else if let Some(old) = replay.take() {
            old.renew(stream)
        } else {
            body.take()
                .map(|body| Pipe::new(body, stream, screen.owned(), !last))
        };
        // The request's body goes up while the answer's head is awaited (and after, from
        // the answer's body).
        let mut piped = false;
        let head = std::future::poll_fn(|cx| {
            if !piped
                && let Some(p) = &mut pipe
                && Pin::new(p).poll(cx).is_ready()
            {
                piped = true;
            }
            Pin::new(&mut answer).poll(cx)
        })
        .await;
        let head = match head {
            Ok(head) => head,
            Err(e) => {
                let message = format!("HTTP/2: {e}");
                // RFC 9113 §8.7: a stream reset with REFUSED_STREAM, or above a GOAWAY's last
                // stream, was not processed, whatever its method. h2 (0.4) gives the GOAWAY's
                // error only to the streams above its last stream; those at or below it, which
                // the upstream may have processed, end with the connection as a broken pipe.
                let unprocessed = e.is_remote()
                    && ((e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM))
                        || e.is_go_away());
                if !unprocessed {
                    return Err(Attempt::Failed(message));
                }
                *replay = pipe.filter(|p| p.record.is_some());
                return Err(Attempt::Unprocessed(message));
            }
        };
        // Still going up (a streaming call, or an upload the upstream answers early): on a
        // task of its own, so that it keeps going while the client does not take the answer
        // (a client that reads only once it sent everything would wait for an upload the
        // gateway no longer read).
        // It ends with the answer: a client gone (its stream reset, its connection closed
        // or cut by the gateway) drops the answer, and the upload is reset even while it
        // waits for the upstream's window.
        let (gone, answer_gone) = tokio::sync::oneshot::channel();
        if let Some(mut pipe) = pipe.filter(|_| !piped) {
            // Answered: never sent again.
            pipe.record = None;
            pipe.answer_gone = Some((answer_gone, streaming.again()));
            tokio::spawn(pipe);
        }
        let (parts, recv) = head.into_parts();
        let body = Answer {
            recv,
            trailers: false,
            _streaming: streaming,
            _gone: gone,
        };
        Ok(Response::from_parts(parts, Body::new(body)))
    }

    /// The upstream's connection, ready for a new stream (a new one if there is none or it
    /// closed).
    async fn ready(
        &self,
        uri: &Uri,
    ) -> Result<(h2::client::SendRequest<Bytes>, Streaming), String> {
        let key = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        for _ in 0..2 {
            let conn = match self.live(key) {
                Some(conn) => conn,
                None => self.connection(uri, key).await?,
            };
            let streaming = Streaming::on(&conn);
            match conn.send.clone().ready().await {
                Ok(send) => return Ok((send, streaming)),
                // Closed since it was last used: once more on a new one.
                Err(_) => {
                    conn.closed.store(true, Ordering::Release);
                }
            }
        }
        Err("the upstream closed its HTTP/2 connection".to_string())
    }

    /// A connection to `key` open and with room for another stream: below the streams the
    /// upstream allows at once (SETTINGS_MAX_CONCURRENT_STREAMS). Beyond them h2 would queue
    /// new streams behind the open ones, so that streams held open (a client that does not
    /// read their answers, long calls) would hold up every client's calls: a connection more is
    /// opened instead, as Go's HTTP/2 transport does.
    fn live(&self, key: &str) -> Option<Conn> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns
            .iter()
            .find(|(k, c)| {
                k == key
                    && !c.closed.load(Ordering::Acquire)
                    && c.activity.exchanges.load(Ordering::Acquire)
                        < c.send.current_max_send_streams()
            })
            .map(|(_, c)| c.clone())
    }

    async fn connection(&self, uri: &Uri, key: &str) -> Result<Conn, String> {
        let waited_from = tokio::time::Instant::now();
        let mut last_failure = self.connecting.lock().await;
        if let Some(conn) = self.live(key) {
            return Ok(conn);
        }
        // A connection attempt failed while this one waited: its outcome is this one's too.
        if let Some((at, why)) = &*last_failure
            && *at >= waited_from
        {
            return Err(why.clone());
        }
        let conn = match tokio::time::timeout(self.connect_timeout, self.connect(uri)).await {
            Ok(conn) => conn,
            Err(_) => Err("connecting to the upstream timed out".to_string()),
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(why) => {
                *last_failure = Some((tokio::time::Instant::now(), why.clone()));
                return Err(why);
            }
        };
        let (conn, driven, pings) = conn;
        tokio::spawn(drive(
            driven,
            pings,
            conn.activity.clone(),
            conn.closed.clone(),
            Arc::downgrade(&self.conns),
        ));
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|(_, c)| !c.closed.load(Ordering::Acquire));
        conns.push((key.to_string(), conn.clone()));
        Ok(conn)
    }

    async fn connect(&self, uri: &Uri) -> Result<(Conn, Driven, Option<h2::PingPong>), String> {
        let host = uri.host().unwrap_or_default();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = uri
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(tcp).await,
            Some(tls) => {
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| format!("upstream name {host}: {e}"))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS with {host}:{port}: {e}"))?;
                if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(format!(
                        "{host}:{port} did not agree to HTTP/2 (ALPN h2) over TLS"
                    ));
                }
                handshake(stream).await
            }
        }
    }
}

/// A connection's own half, for its task to drive.
type Driven = Pin<Box<dyn Future<Output = Result<(), h2::Error>> + Send>>;

/// HTTP/2's handshake on `io`.
async fn handshake<T>(io: T) -> Result<(Conn, Driven, Option<h2::PingPong>), String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Its writes gathered over a turn of the runtime (`coalesce`): the requests of many
    // clients' streams go out together.
    let io = TokioIo::new(Coalesce::new(TokioIo::new(io), true));
    let (send, mut connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // h2's allowance for the framing of small DATA frames held unread: by default half the
        // connection's window; kept at what it was with a 16 MiB window.
        .data_frame_budget(DATA_FRAME_BUDGET)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(SEND_BUFFER)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let conn = Conn {
        send,
        closed: Arc::new(AtomicBool::new(false)),
        activity: Arc::new(Activity {
            streams: AtomicUsize::new(0),
            exchanges: AtomicUsize::new(0),
            since: std::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }),
    };
    let pings = connection.ping_pong();
    Ok((conn, Box::pin(connection), pings))
}

/// Drives a connection until it ends or fails a ping. Idle for [`IDLE`], it is taken out of
/// use (no new exchange starts on it) and driven on until h2 closes it with a GOAWAY, once no
/// handle to it is left: an exchange that took it just before still completes.
async fn drive(
    mut connection: Driven,
    mut pings: Option<h2::PingPong>,
    activity: Arc<Activity>,
    closed: Arc<AtomicBool>,
    conns: Weak<Mutex<Vec<(String, Conn)>>>,
) {
    let mut check = tokio::time::interval(IDLE_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    let mut last_ping = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = &mut connection => break,
            _ = check.tick(), if !closed.load(Ordering::Acquire) => {
                if activity.idle_for().is_some_and(|idle| idle >= IDLE) {
                    closed.store(true, Ordering::Release);
                    if let Some(conns) = conns.upgrade() {
                        let mut conns = conns.lock().unwrap_or_else(|e| e.into_inner());
                        conns.retain(|(_, c)| !Arc::ptr_eq(&c.closed, &closed));
                    }
                    continue;
                }
                // Pings only while exchanges are under way (gRPC servers answer pings on an
                // idle connection with a GOAWAY past a few).
                if activity.idle_for().is_some() || last_ping.elapsed() < KEEP_ALIVE {
                    continue;
                }
                last_ping = tokio::time::Instant::now();
                let Some(pings) = pings.as_mut() else { continue };
                let pong = tokio::time::timeout(PING_TIMEOUT, pings.ping(h2::Ping::opaque()));
                tokio::select! {
                    _ = &mut connection => break,
                    answered = pong => if !matches!(answered, Ok(Ok(_))) {
                        tracing::warn!("an HTTP/2 upstream did not answer a ping in time; closing its connection");
                        break;
                    },
                }
            }
        }
    }
    closed.store(true, Ordering::Release);
    if let Some(conns) = conns.upgrade() {
        let mut conns = conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|(_, c)| !Arc::ptr_eq(&c.closed, &closed));
    }
}

/// A request's body on its way to the upstream, as hyper's own pipe does it: a piece is read
/// from the client, then sent once the upstream's window has room (h2 buffers what goes beyond
/// it), so that at most one piece a stream is held. No capacity is claimed before a piece is in
/// hand (a claim would pin part of the connection's window for a body that may never come).
struct Pipe {
    body: Incoming,
    send: h2::SendStream<Bytes>,
    /// Read, waiting for room: the piece and whether it ends the body.
    held: Option<(Bytes, bool)>,
    /// What the trailers may not carry.
    screen: OwnedTrailerScreen,
    /// On its own task: fires once the answer is dropped; and the exchange it is part of.
    answer_gone: Option<(tokio::sync::oneshot::Receiver<()>, Streaming)>,
    /// What was sent, kept (up to [`REPLAY_LIMIT`]) to be sent again on a new stream should
    /// the upstream refuse this one unprocessed; `None` once that can no longer be.
    record: Option<Box<Record>>,
    /// Sent on this stream before anything more is read from the client (a refused stream's).
    replaying: Option<Box<Replaying>>,
}

/// A refused stream's body, sent again: its pieces, then its trailers.
struct Replaying {
    pieces: std::collections::VecDeque<(Bytes, bool)>,
    trailers: Option<hyper::HeaderMap>,
}

/// What a [`Pipe`] sent.
#[derive(Default)]
struct Record {
    sent: Vec<(Bytes, bool)>,
    trailers: Option<hyper::HeaderMap>,
    bytes: usize,
}

impl Pipe {
    fn new(
        body: Incoming,
        send: h2::SendStream<Bytes>,
        screen: OwnedTrailerScreen,
        record: bool,
    ) -> Pipe {
        Pipe {
            body,
            send,
            held: None,
            screen,
            answer_gone: None,
            record: record.then(Box::default),
            replaying: None,
        }
    }

    /// The same body on `send`, a new stream: what this one sent (and held) first, then the
    /// rest of the client's. `None` if it did not keep all it sent.
    fn renew(self, send: h2::SendStream<Bytes>) -> Option<Pipe> {
        let record = self.record?;
        let Record { sent, trailers, .. } = *record;
        let mut pieces: std::collections::VecDeque<_> = sent.into();
        pieces.extend(self.held);
        Some(Pipe {
            body: self.body,
            send,
            held: None,
            screen: self.screen,
            answer_gone: None,
            record: None,
            replaying: Some(Box::new(Replaying { pieces, trailers })),
        })
    }

    /// Sends `data` (kept for a new stream while that may still be).
    fn send_data(&mut self, data: Bytes, last: bool) -> Result<(), h2::Error> {
        if let Some(record) = &mut self.record {
            // Each piece counts its keeping too: a body of a million one-byte pieces is not
            // kept a piece at a time.
            record.bytes += data.len() + PIECE_COST;
            if record.bytes > REPLAY_LIMIT {
                self.record = None;
            } else {
                record.sent.push((data.clone(), last));
            }
        }
        self.send.send_data(data, last)
    }

    /// Sends the trailers (kept as [`Pipe::send_data`] keeps data).
    fn send_trailers(&mut self, trailers: hyper::HeaderMap) -> Result<(), h2::Error> {
        if let Some(record) = &mut self.record {
            record.trailers = Some(trailers.clone());
        }
        self.send.send_trailers(trailers)
    }

    /// Gives up: the upstream's stream is reset rather than left waiting for its end.
    fn abandon(&mut self) -> Poll<()> {
        // Never sent again: what it sent may be a body cut short (the client's failed).
        self.record = None;
        self.send.send_reset(h2::Reason::CANCEL);
        Poll::Ready(())
    }
}

impl Future for Pipe {
    /// Done: sent whole, or given up (the upstream reset the stream, or the client's body
    /// failed: the upstream's stream is then reset).
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if let Some((gone, _)) = &mut this.answer_gone
            && Pin::new(gone).poll(cx).is_ready()
        {
            return this.abandon();
        }
        loop {
            // Woken, too, should the upstream reset the stream meanwhile.
            if this.send.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            if let Some((data, last)) = this.held.take() {
                while this.send.capacity() == 0 {
                    match this.send.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(0))) => {}
                        Poll::Ready(Some(Ok(_))) => break,
                        Poll::Ready(None | Some(Err(_))) => return this.abandon(),
                        Poll::Pending => {
                            this.held = Some((data, last));
                            return Poll::Pending;
                        }
                    }
                }
                if this.send_data(data, last).is_err() {
                    return this.abandon();
                }
                if last {
                    return Poll::Ready(());
                }
                continue;
            }
            // A refused stream's body first, as it was sent.
            if let Some((data, last)) = this.replaying.as_mut().and_then(|r| r.pieces.pop_front()) {
                if data.is_empty() {
                    if this.send_data(data, last).is_err() {
                        return this.abandon();
                    }
                    if last {
                        return Poll::Ready(());
                    }
                } else {
                    this.send.reserve_capacity(1);
                    this.held = Some((data, last));
                }
                continue;
            }
            if let Some(trailers) = this.replaying.as_mut().and_then(|r| r.trailers.take()) {
                this.send.reserve_capacity(0);
                if this.send_trailers(trailers).is_err() {
                    return this.abandon();
                }
                return Poll::Ready(());
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    if this.send_data(Bytes::new(), true).is_err() {
                        return this.abandon();
                    }
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Err(_))) => return this.abandon(),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let last = this.body.is_end_stream();
                        if data.is_empty() {
                            // Needs no room (an explicit end, say).
                            if this.send_data(data, last).is_err() {
                                return this.abandon();
                            }
                            if last {
                                return Poll::Ready(());
                            }
                            continue;
                        }
                        this.send.reserve_capacity(1);
                        this.held = Some((data, last));
                    }
                    Err(frame) => {
                        let Ok(mut trailers) = frame.into_trailers() else {
                            continue;
                        };
                        // As the request's header fields: no identity or forwarding field, and
                        // nothing HTTP/2 forbids (h2 would refuse the trailers).
                        this.screen.apply(&mut trailers);
                        this.send.reserve_capacity(0);
                        if this.send_trailers(trailers).is_err() {
                            return this.abandon();
                        }
                        return Poll::Ready(());
                    }
                },
            }
        }
    }
}

/// The upstream's answer as the body of the client's response.
struct Answer {
    recv: h2::RecvStream,
    /// Its data ended: trailers next.
    trailers: bool,
    _streaming: Streaming,
    /// Dropped with the answer: the request body's task then stops.
    _gone: tokio::sync::oneshot::Sender<()>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl hyper::body::Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if !this.trailers {
            match this.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    // Taken by the client's side: the upstream may send as much again.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(None) => this.trailers = true,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::H2Client;
    use std::time::Duration;

    /// Regression (review, 2026-12-04): connections were made one at a time, so when an
    /// upstream stopped answering (its SYNs dropped) the requests waiting to connect each waited
    /// a whole connect timeout after the one before: the tenth waited ten. Those that waited for
    /// an attempt that failed now share its failure.
    #[tokio::test]
    async fn requests_waiting_for_a_failed_connection_share_its_failure() {
        // A listener whose backlog is full: the kernel drops further SYNs, as a blackholed
        // upstream does.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let address = listener.local_addr().unwrap();
        let mut held = Vec::new();
        loop {
            match tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(address),
            )
            .await
            {
                Ok(Ok(stream)) => held.push(stream),
                // This kernel refuses at once rather than drop (tcp_abort_on_overflow, or a
                // sandbox's network stack): no blackhole to test against.
                Ok(Err(e)) => {
                    eprintln!("SKIP: a full backlog refuses connections here ({e})");
                    return;
                }
                Err(_) => break,
            }
            if held.len() >= 64 {
                eprintln!("SKIP: the listener's backlog never filled");
                return;
            }
        }
        let timeout = Duration::from_millis(500);
        let client = std::sync::Arc::new(H2Client::new(timeout, None, false));
        let uri: hyper::Uri = format!("http://{address}/").parse().unwrap();
        let started = tokio::time::Instant::now();
        let waiting: Vec<_> = (0..8)
            .map(|_| {
                let (client, uri) = (client.clone(), uri.clone());
                tokio::spawn(async move {
                    let key = uri.authority().unwrap().to_string();
                    client.connection(&uri, &key).await.err()
                })
            })
            .collect();
        for w in waiting {
            let error = w.await.unwrap();
            assert_eq!(
                error.as_deref(),
                Some("connecting to the upstream timed out")
            );
        }
        // One timeout (and scheduling), not eight.
        assert!(
            started.elapsed() < timeout * 3,
            "waited {:?}",
            started.elapsed()
        );
        // A request that comes after that failure tries again itself (and waits its own
        // timeout), rather than inherit an old failure.
        let again = tokio::time::Instant::now();
        let key = uri.authority().unwrap().to_string();
        assert_eq!(
            client.connection(&uri, &key).await.err().as_deref(),
            Some("connecting to the upstream timed out")
        );
        assert!(again.elapsed() >= timeout, "{:?}", again.elapsed());
        drop(listener);
    }
}
