//! HTTP/2 on the proxy port: which protocol a new connection speaks, the HTTP/2 server's limits
//! against hostile clients, and a per-connection guard against rapid reset.
//!
//! Detection reads the first bytes of a connection: the HTTP/2 connection preface
//! (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, RFC 9113 §3.4, "prior knowledge") means HTTP/2, anything
//! else HTTP/1.1, decided as soon as a byte differs. The bytes read are replayed to the chosen
//! server through [`Prefixed`]. An HTTP/1.1 connection may still turn HTTP/2 by `Upgrade: h2c`
//! on its first request (RFC 7540 §3.2): `h2c.rs`, which the listener runs next.
//!
//! Limits (hyper's HTTP/2 server on the `h2` crate): concurrent streams per connection
//! [`MAX_CONCURRENT_STREAMS`]; header list [`MAX_HEADER_LIST_SIZE`]; streams reset by the client
//! before they were served [`MAX_PENDING_ACCEPT_RESET_STREAMS`] and streams the server had to
//! reset [`MAX_LOCAL_ERROR_RESET_STREAMS`] (CVE-2023-44487: past either, `h2` sends GOAWAY
//! `ENHANCE_YOUR_CALM` and closes); a SETTINGS flood is held back by `h2` itself (one remote
//! SETTINGS is processed at a time and its ACK written before more frames are read), and a
//! peer that stops reading is cut off by the keep-alive ping ([`KEEP_ALIVE_INTERVAL`],
//! [`KEEP_ALIVE_TIMEOUT`]). Rapid reset of streams the agent *had* started serving (a fast
//! server accepts them before the reset arrives) is capped by [`ResetGuard`]: more than
//! [`MAX_CANCELLED_PER_SEC`] requests cancelled by the client in one second close the
//! connection. Each limit acts on one connection only.
//!
//! A leaf (layer 1): it depends on `tokio` and `std` only.
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::sync::Notify;

use crate::io::write_through;

/// The HTTP/2 client connection preface.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Streams one client connection may have open at once (nginx's
/// `http2_max_concurrent_streams` is 128, Go's 250).
pub const MAX_CONCURRENT_STREAMS: u32 = 128;
/// Largest header list (decoded, RFC 9113 §6.5.2) a client may send: the HTTP/1.1 head limit.
pub const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Streams a client may reset before the server accepted them, at once (`h2`'s default, 20).
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams the server may reset for the client's protocol errors before the connection is
/// closed (`h2`'s default, 1024).
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// Requests a client may cancel (RST_STREAM while the agent serves them) in one second on one
/// connection before it is closed.
pub const MAX_CANCELLED_PER_SEC: u32 = 200;
/// Idle HTTP/2 connections are pinged this often...
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...and closed when a ping is not answered within this.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The protocol a connection opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
}

/// Reads from `io` until the first bytes tell HTTP/2's preface from anything else; returns the
/// protocol and the IO with what was read put back. EOF before a decision is HTTP/1 (hyper then
/// sees the short read and closes).
pub async fn detect<I: AsyncRead + Unpin>(mut io: I) -> io::Result<(Detected, Prefixed<I>)> {
    let mut buf = [0u8; PREFACE.len()];
    let mut n = 0;
    while n < PREFACE.len() {
        let got = io.read(&mut buf[n..]).await?;
        if got == 0 {
            break;
        }
        n += got;
        if buf[..n] != PREFACE[..n] {
            break;
        }
    }
    let proto = if buf[..n] == PREFACE[..] {
        Detected::Http2
    } else {
        Detected::Http1
    };
    Ok((
        proto,
        Prefixed {
            prefix: buf,
            pos: 0,
            len: n,
            inner: io,
        },
    ))
}

/// An IO whose first reads return bytes already read from it.
pub struct Prefixed<I> {
    prefix: [u8; PREFACE.len()],
    pos: usize,
    len: usize,
    inner: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.len {
            let n = (self.len - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

write_through!(Prefixed);

impl<I> Prefixed<I> {
    /// The bytes not yet read back, and the IO under them.
    pub fn into_parts(self) -> (Vec<u8>, I) {
        (self.prefix[self.pos..self.len].to_vec(), self.inner)
    }
}

/// Counts one connection's requests cancelled by the client, per second; past
/// [`MAX_CANCELLED_PER_SEC`] it fires [`ResetGuard::tripped`] and the connection is closed.
pub struct ResetGuard {
    epoch: Instant,
    /// The second (since `epoch`) being counted.
    second: AtomicU64,
    count: AtomicU32,
    trip: Notify,
}

impl Default for ResetGuard {
    fn default() -> Self {
        ResetGuard {
            epoch: Instant::now(),
            second: AtomicU64::new(0),
            count: AtomicU32::new(0),
            trip: Notify::new(),
        }
    }
}

impl ResetGuard {
    /// Records one cancelled request.
    pub fn cancelled(&self) {
        let now = self.epoch.elapsed().as_secs();
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) + 1 > MAX_CANCELLED_PER_SEC {
            self.trip.notify_one();
        }
    }

    /// Resolves when the connection has cancelled too many requests.
    pub fn tripped(&self) -> impl Future<Output = ()> + '_ {
        self.trip.notified()
    }

    /// A guard for one request: dropped before [`Served::done`], it counts as cancelled.
    pub fn serving(self: &Arc<Self>) -> Served {
        Served {
            guard: Some(self.clone()),
        }
    }
}

/// One request being served; see [`ResetGuard::serving`].
pub struct Served {
    guard: Option<Arc<ResetGuard>>,
}

impl Served {
    /// The request was answered.
    pub fn done(mut self) {
        self.guard = None;
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(g) = self.guard.take() {
            g.cancelled();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_preface_is_http2_and_is_replayed() {
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00");
        let (p, mut io) = detect(&input[..]).await.unwrap();
        assert_eq!(p, Detected::Http2);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, input);
    }

    #[tokio::test]
    async fn anything_else_is_http1_decided_at_the_first_differing_byte() {
        let input = b"POST / HTTP/1.1\r\nHost: a\r\n\r\n";
        let (p, mut io) = detect(&input[..]).await.unwrap();
        assert_eq!(p, Detected::Http1);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, input);
        // A head as long as the preface is not taken for it.
        let (p, _) = detect(&b"GET /abcdefghijklmnopqrstuvwxyz HTTP/1.1\r\n"[..])
            .await
            .unwrap();
        assert_eq!(p, Detected::Http1);
        // "PRI " then something else: still HTTP/1 (hyper refuses it as a bad request).
        let (p, _) = detect(&b"PRI * HTTP/1.1\r\n"[..]).await.unwrap();
        assert_eq!(p, Detected::Http1);
        let (p, _) = detect(&b"PR"[..]).await.unwrap();
        assert_eq!(p, Detected::Http1);
    }

    #[tokio::test]
    async fn too_many_cancels_in_a_second_trip_the_guard() {
        let g = Arc::new(ResetGuard::default());
        for _ in 0..MAX_CANCELLED_PER_SEC {
            drop(g.serving());
        }
        g.serving().done();
        let tripped = g.tripped();
        tokio::pin!(tripped);
        assert!(
            futures_poll(tripped.as_mut()).is_pending(),
            "at the limit: not tripped"
        );
        drop(g.serving());
        tokio::time::timeout(Duration::from_secs(1), tripped)
            .await
            .expect("one over the limit trips it");
    }

    fn futures_poll<F: Future>(f: Pin<&mut F>) -> Poll<F::Output> {
        let waker = std::task::Waker::noop();
        f.poll(&mut Context::from_waker(waker))
    }
}
