//! A connection's byte stream: bytes already read put back in front ([`Prefixed`]), reads
//! that flush what TLS answers, and a lingering shutdown so that no reset destroys the last
//! words sent (a refused handshake's alert, an HTTP/2 GOAWAY).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// How long, and how much, a client is read after the gateway's last words (a refused
/// handshake's alert, an HTTP/2 GOAWAY) before the socket closes, so that no reset destroys them.
pub(crate) const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);
pub(crate) const LINGER_BYTES: usize = 64 * 1024;

/// A stream that first yields bytes already read from it.
pub(crate) struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
    /// Shut down by shutting the write side, then reading and discarding what the client still
    /// sends (bounded in time and bytes), so that no reset destroys what was sent last.
    linger: bool,
    draining: Option<Box<Draining>>,
}

/// A lingering shutdown in progress: its deadline (the shutdown included), whether the write
/// side is shut, and how much was read since.
struct Draining {
    until: Pin<Box<tokio::time::Sleep>>,
    shut: bool,
    read: usize,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed {
            prefix,
            inner,
            linger: false,
            draining: None,
        }
    }

    /// Makes shutdown linger (nginx's lingering close): the write side is shut, then what the
    /// client still sends is read and discarded, for at most `LINGER_TIME` and `LINGER_BYTES`,
    /// so that no reset destroys what was sent last (a refused handshake's alert, an HTTP/2
    /// GOAWAY). Only for streams nothing is tunnelled through: what is read is discarded.
    pub(crate) fn linger_on_shutdown(&mut self) {
        self.linger = true;
    }

    /// Puts `prefix` before what is still to be read (it must be empty).
    pub(crate) fn set_prefix(&mut self, prefix: Bytes) {
        debug_assert!(self.prefix.is_empty());
        self.prefix = prefix;
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        // What TLS answered while reading (the no_renegotiation warning to a TLS 1.2
        // renegotiation attempt, a key update) goes out now, not with the next response, which
        // may never come: the read can stay pending while the client waits for that answer.
        // With nothing queued this costs no system call; a write error shows on the next write.
        let _ = Pin::new(&mut self.inner).poll_flush(cx);
        read
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.linger {
            return Pin::new(&mut this.inner).poll_shutdown(cx);
        }
        // The deadline bounds the whole close, a client that reads nothing included.
        let draining = this.draining.get_or_insert_with(|| {
            Box::new(Draining {
                until: Box::pin(tokio::time::sleep(LINGER_TIME)),
                shut: false,
                read: 0,
            })
        });
        if std::future::Future::poll(draining.until.as_mut(), cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        if !draining.shut {
            std::task::ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            draining.shut = true;
        }
        let mut scratch = [0u8; 2048];
        loop {
            if draining.read >= LINGER_BYTES {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => draining.read += buf.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Closes a refused connection so that its alert reaches the client: a lingering shutdown (see
/// [`Prefixed::linger_on_shutdown`]). Closing with unread data would make the kernel answer with
/// a reset, and a client that has not read the alert yet loses it.
pub(crate) async fn linger(io: TcpStream) {
    let mut io = Prefixed::new(Bytes::new(), io);
    io.linger_on_shutdown();
    let _ = io.shutdown().await;
}
