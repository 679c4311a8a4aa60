//! Flood protection for inbound HTTP/2: frames that cost the server work without carrying a
//! request are counted per connection, and a connection that sends them faster than any client
//! needs is closed.
//!
//! The h2 crate bounds some abuse itself (CONTINUATION floods by the header list size, streams
//! reset before they are accepted, small DATA frames, and memory, since it answers a PING or
//! SETTINGS only once the previous answer is written). What it does not bound is CPU: a client
//! that reads its answers may send PINGs, SETTINGS or PRIORITY frames at line rate, or open
//! streams and reset them once accepted (the "rapid reset" of CVE-2023-44487), each reset
//! costing a request's routing and an upstream exchange begun. [`FloodGuard`] reads the frame
//! headers as the bytes pass (the payloads are skipped, never copied) and keeps a token bucket
//! per kind; an empty bucket ends the connection with the reason. Streams the server resets
//! itself (a client's protocol error on each) count against the client's reset budget too.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 3.4), skipped before the first frame.
const PREFACE_LEN: usize = 24;

/// Frame kinds with a budget: (frame type, name, burst, refill per second).
const BUDGETS: [(u8, &str, f64, f64); 4] = [
    // Browsers cancel streams when a page is left; a flood cancels thousands a second.
    (0x3, "rst-stream", 200.0, 50.0),
    (0x2, "priority", 200.0, 50.0),
    (0x4, "settings", 20.0, 2.0),
    (0x6, "ping", 30.0, 5.0),
];

/// Frames of types HTTP/2 does not define are ignored by the peer (RFC 9113 5.5); a few are
/// extensions, a flood is abuse.
const UNKNOWN: (&str, f64, f64) = ("unknown-frame", 100.0, 20.0);

/// Why a guard closed its connection, for the connection's log line.
pub(crate) type Tripped = Arc<OnceLock<&'static str>>;

/// An HTTP/2 server's inbound stream, with frame budgets.
pub(crate) struct FloodGuard<S> {
    inner: S,
    inbound: Frames,
    /// The server's own frames: a stream the server resets (a client's protocol error on it)
    /// costs the same as one the client resets, and counts against the same budget.
    outbound: Frames,
    buckets: [Bucket; 5],
    tripped: Tripped,
}

/// Where a byte stream is in its frame sequence.
struct Frames {
    preface: usize,
    header: [u8; 9],
    have: usize,
    skip: usize,
}

impl Frames {
    fn new(preface: usize) -> Frames {
        Frames {
            preface,
            header: [0; 9],
            have: 0,
            skip: 0,
        }
    }

    /// Calls `frame(type, flags)` for every frame header completed in `bytes`, the next bytes of
    /// the stream; stops at the first error.
    fn scan(
        &mut self,
        bytes: &[u8],
        mut frame: impl FnMut(u8, u8) -> Result<(), &'static str>,
    ) -> Result<(), &'static str> {
        let mut i = 0;
        while i < bytes.len() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len() - i);
                self.preface -= n;
                i += n;
            } else if self.skip > 0 {
                let n = self.skip.min(bytes.len() - i);
                self.skip -= n;
                i += n;
            } else {
                let n = (9 - self.have).min(bytes.len() - i);
                self.header[self.have..self.have + n].copy_from_slice(&bytes[i..i + n]);
                self.have += n;
                i += n;
                if self.have == 9 {
                    self.have = 0;
                    let h = self.header;
                    self.skip =
                        usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    frame(h[3], h[4])?;
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    burst: f64,
    rate: f64,
    last: Instant,
}

impl Bucket {
    fn new(burst: f64, rate: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            burst,
            rate,
            last: now,
        }
    }

    /// Takes one token; false when there is none.
    fn take(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

impl<S> FloodGuard<S> {
    /// Guards `inner`, whose first bytes are the client preface; `tripped` receives the reason
    /// when the guard closes the connection.
    pub(crate) fn new(inner: S, tripped: Tripped) -> FloodGuard<S> {
        let now = Instant::now();
        let mut buckets = [Bucket::new(UNKNOWN.1, UNKNOWN.2, now); 5];
        for (i, (_, _, burst, rate)) in BUDGETS.iter().enumerate() {
            buckets[i] = Bucket::new(*burst, *rate, now);
        }
        FloodGuard {
            inner,
            inbound: Frames::new(PREFACE_LEN),
            outbound: Frames::new(0),
            buckets,
            tripped,
        }
    }

    /// Reads the frame headers in `bytes`, the next bytes from the client; the budget a frame
    /// exceeded, if any.
    fn scan(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        let FloodGuard {
            inbound, buckets, ..
        } = self;
        inbound.scan(bytes, |kind, flags| count(buckets, kind, flags))
    }

    /// Reads the frame headers in `bytes`, the next bytes to the client: its streams the server
    /// resets count against the reset budget.
    fn scan_outbound(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        let FloodGuard {
            outbound, buckets, ..
        } = self;
        outbound.scan(bytes, |kind, _| {
            if kind == 0x3 && !buckets[0].take(Instant::now()) {
                return Err("rst-stream");
            }
            Ok(())
        })
    }
}

impl<S> FloodGuard<S> {
    fn trip(&self, why: &'static str) -> io::Error {
        let _ = self.tripped.set(why);
        io::Error::other(format!("HTTP/2 {why} flood"))
    }
}

/// Counts a client frame against its budget; the budget's name when it is exhausted.
fn count(buckets: &mut [Bucket; 5], kind: u8, flags: u8) -> Result<(), &'static str> {
    // An acknowledgement answers the server; only requests to the server cost it work.
    if matches!(kind, 0x4 | 0x6) && flags & 0x1 != 0 {
        return Ok(());
    }
    let (slot, name) = match BUDGETS.iter().position(|(k, ..)| *k == kind) {
        Some(i) => (i, BUDGETS[i].1),
        None if kind > 0x9 => (4, UNKNOWN.0),
        None => return Ok(()),
    };
    if buckets[slot].take(Instant::now()) {
        Ok(())
    } else {
        Err(name)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FloodGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(why) = self.tripped.get() {
            return Poll::Ready(Err(io::Error::other(format!("HTTP/2 {why} flood"))));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            let this = &mut *self;
            if let Err(why) = this.scan(&buf.filled()[before..]) {
                return Poll::Ready(Err(this.trip(why)));
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FloodGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            let this = &mut *self;
            if let Err(why) = this.scan_outbound(&buf[..*n]) {
                return Poll::Ready(Err(this.trip(why)));
            }
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            let this = &mut *self;
            let mut left = *n;
            for slice in bufs {
                if left == 0 {
                    break;
                }
                let take = left.min(slice.len());
                left -= take;
                if let Err(why) = this.scan_outbound(&slice[..take]) {
                    return Poll::Ready(Err(this.trip(why)));
                }
            }
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        f.extend_from_slice(payload);
        f
    }

    fn guard() -> FloodGuard<()> {
        FloodGuard::new((), Tripped::default())
    }

    #[test]
    fn frames_are_counted_across_any_split() {
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for _ in 0..25 {
            stream.extend(frame(0x6, 0, &[0; 8]));
            stream.extend(frame(0x0, 0, &[7; 100]));
        }
        for step in [1, 5, 9, 17, 1000] {
            let mut g = guard();
            let outcome = stream.chunks(step).try_for_each(|c| g.scan(c));
            assert_eq!(
                outcome,
                Ok(()),
                "25 pings are within the burst (step {step})"
            );
            let more: Vec<u8> = (0..10).flat_map(|_| frame(0x6, 0, &[0; 8])).collect();
            assert_eq!(g.scan(&more), Err("ping"), "step {step}");
        }
    }

    #[test]
    fn acknowledgements_and_request_frames_are_free() {
        let mut g = guard();
        g.inbound.preface = 0;
        for _ in 0..10_000 {
            g.scan(&frame(0x6, 0x1, &[0; 8])).unwrap();
            g.scan(&frame(0x4, 0x1, &[])).unwrap();
            g.scan(&frame(0x1, 0x5, &[0x82])).unwrap();
            g.scan(&frame(0x0, 0x1, b"x")).unwrap();
            g.scan(&frame(0x8, 0, &[0, 0, 1, 0])).unwrap();
        }
        let resets: Vec<u8> = (0..201)
            .flat_map(|_| frame(0x3, 0, &[0, 0, 0, 8]))
            .collect();
        assert_eq!(g.scan(&resets), Err("rst-stream"));
        let mut g = guard();
        g.inbound.preface = 0;
        let unknown: Vec<u8> = (0..101).flat_map(|_| frame(0xfa, 0, &[])).collect();
        assert_eq!(g.scan(&unknown), Err("unknown-frame"));
    }

    #[test]
    fn streams_the_server_resets_count_as_resets() {
        let mut g = guard();
        let settings = frame(0x4, 0, &[]);
        let resets: Vec<u8> = (0..150)
            .flat_map(|_| frame(0x3, 0, &[0, 0, 0, 1]))
            .collect();
        g.scan_outbound(&settings).unwrap();
        // Split anywhere, as writes are.
        for piece in resets.chunks(7) {
            g.scan_outbound(piece).unwrap();
        }
        let more: Vec<u8> = (0..60).flat_map(|_| frame(0x3, 0, &[0, 0, 0, 8])).collect();
        g.inbound.preface = 0;
        assert_eq!(g.scan(&more), Err("rst-stream"));
    }
}
