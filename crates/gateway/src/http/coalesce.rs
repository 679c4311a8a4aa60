//! Writes to a multiplexed HTTP/2 upstream connection, gathered over a turn of the runtime.
//!
//! Many clients' streams share one upstream HTTP/2 connection. Each request reaches that
//! connection's task on its own (Tokio runs a task woken by the one running next), so the
//! task wrote, and the upstream was woken, once per request or request body: a gRPC unary
//! run made 0.6 upstream writes per call where HAProxy makes 0.27 syscalls of any kind.
//! [`Coalesce`] keeps what the connection writes and, the first time it is asked to flush,
//! puts the flush off by one turn: the task wakes itself and is polled again after the tasks
//! already waiting to run (the other clients' connections), whose requests then go out in the
//! same write. A quiet connection writes on its next poll, at once.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};

/// What is gathered at most before it is written without waiting (and the size from which one
/// write goes straight through): beyond a few frames, waiting gains nothing.
const HOLD: usize = 64 * 1024;

/// What is held when a flush is asked for, below which the flush waits a turn.
const WAIT_BELOW: usize = 16 * 1024;

/// A connection whose writes wait for the end of the runtime's turn (see the module).
pub(crate) struct Coalesce<T> {
    inner: T,
    held: Vec<u8>,
    /// The flush of what is held was put off once already: the next one writes.
    deferred: bool,
    /// Off: every write goes straight through (an HTTP/1.1 connection carries one request at
    /// a time: nothing would join it).
    gather: bool,
}

impl<T> Coalesce<T> {
    pub(crate) fn new(inner: T, gather: bool) -> Coalesce<T> {
        Coalesce {
            inner,
            held: Vec::new(),
            deferred: false,
            gather,
        }
    }
}

/// A connector whose connections are [`Coalesce`]d (gathering or not).
#[derive(Clone)]
pub(crate) struct Coalescing<C> {
    inner: C,
    gather: bool,
}

impl<C> Coalescing<C> {
    pub(crate) fn new(inner: C, gather: bool) -> Coalescing<C> {
        Coalescing { inner, gather }
    }
}

impl<C> tower_service::Service<hyper::Uri> for Coalescing<C>
where
    C: tower_service::Service<hyper::Uri>,
    C::Future: Send + 'static,
{
    type Response = Coalesce<C::Response>;
    type Error = C::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Coalesce<C::Response>, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let gather = self.gather;
        Box::pin(async move { Ok(Coalesce::new(connecting.await?, gather)) })
    }
}

impl<T: Write + Unpin> Coalesce<T> {
    /// Writes out what is held.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut written = 0;
        let result = loop {
            if written == self.held.len() {
                break Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.inner).poll_write(cx, &self.held[written..]) {
                Poll::Ready(Ok(0)) => break Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            }
        };
        self.held.drain(..written);
        if self.held.is_empty() && self.held.capacity() > HOLD {
            self.held = Vec::new();
        }
        result
    }

    /// Makes room for `len` more bytes: true if they should rather be written directly.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.held.len() + len <= HOLD {
            return Poll::Ready(Ok(false));
        }
        ready!(self.poll_drain(cx))?;
        Poll::Ready(Ok(len > HOLD))
    }
}

impl<T: Write + Unpin> Write for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.gather || ready!(this.poll_room(cx, buf.len()))? {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.gather {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        let len = bufs.iter().map(|b| b.len()).sum();
        if ready!(this.poll_room(cx, len))? {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.held.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        // Gathering copies what it is given anyway: h2 then copies DATA frames up to 1 KiB into
        // its own buffer too, rather than handing over each one above 256 bytes with a flush
        // of its own.
        !self.gather && self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.held.is_empty() {
            // A few frames' worth goes at once: waiting would only add a turn per large frame
            // (an upload's DATA frames each ask for a flush).
            if !this.deferred && this.held.len() < WAIT_BELOW {
                // Tokio polls a task that woke itself after the tasks already waiting to run.
                this.deferred = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(this.poll_drain(cx))?;
        }
        this.deferred = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: Read + Unpin> Read for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: Connection> Connection for Coalesce<T> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A connection that records each write it is given.
    #[derive(Default, Clone)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn writes_wait_one_turn_then_go_together_and_large_ones_go_straight() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let rec = Recorder::default();
        let mut c = Coalesce::new(rec.clone(), true);
        let mut c = Pin::new(&mut c);
        assert!(matches!(
            c.as_mut().poll_write(&mut cx, b"one"),
            Poll::Ready(Ok(3))
        ));
        assert!(c.as_mut().poll_flush(&mut cx).is_pending(), "put off once");
        assert!(matches!(
            c.as_mut().poll_write_vectored(
                &mut cx,
                &[io::IoSlice::new(b"two"), io::IoSlice::new(b"three")]
            ),
            Poll::Ready(Ok(8))
        ));
        assert!(rec.0.lock().unwrap().is_empty(), "nothing written yet");
        assert!(matches!(
            c.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(*rec.0.lock().unwrap(), vec![b"onetwothree".to_vec()]);
        // Nothing held: a flush does not wait.
        assert!(matches!(
            c.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        // More than HOLD: what is held goes first, then the large write as it is.
        let _ = c.as_mut().poll_write(&mut cx, b"x");
        let big = vec![7u8; HOLD + 1];
        assert!(
            matches!(c.as_mut().poll_write(&mut cx, &big), Poll::Ready(Ok(n)) if n == big.len())
        );
        let writes = rec.0.lock().unwrap();
        assert_eq!(writes.len(), 3);
        assert_eq!(writes[1], b"x");
        assert_eq!(writes[2].len(), HOLD + 1);
    }
}
