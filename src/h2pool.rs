//! HTTP/2 upstream connections: a few multiplexed connections per endpoint, on hyper's HTTP/2
//! client, and the upstream protocol setting ([`UpstreamProtocol`]).
//!
//! An endpoint's HTTP/2 connections are kept in a short list (at most [`MAX_H2_CONNECTIONS`]).
//! A request takes a stream on the first open connection with room: fewer streams open than
//! the peer's `SETTINGS_MAX_CONCURRENT_STREAMS` (read from its first SETTINGS frame by
//! [`SettingsSniffer`], since hyper does not expose it; [`DEFAULT_MAX_STREAMS`] when the peer
//! sets no limit). When every connection is full another one is dialled; past the cap, the least
//! loaded one takes the stream (h2 then queues it until a stream closes). The stream is counted
//! until the response body is done ([`Stream`], held by the response body), so `connections`
//! and `streams` in `/upstreams` are exact; the endpoint's in-flight count (least_conn, ewma)
//! counts requests, that is streams, as for HTTP/1.
//!
//! GOAWAY: a connection that gave a request back unsent, or whose stream was refused, is marked
//! draining and takes no new streams; its open streams finish (hyper keeps the connection until
//! they do). A request the peer did not process, by the spec's guarantee (RST_STREAM
//! `REFUSED_STREAM`, or a graceful GOAWAY whose last-stream-id is below the stream's), comes
//! back as [`Sent::No`], so the proxy retries it on another connection or endpoint, whatever its
//! method (`retry.rs`).
//!
//! Layer 2, after `pool.rs` (whose request body type it shares) and `dial.rs` (which connects,
//! plain or TLS).
use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme, Uri};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, ReadBuf};

use crate::dial;
use crate::error::{ProxyError, Sent};
use crate::grpc;
use crate::io::write_through;
use crate::pool::{no_request, Drain, ReqBody};
use crate::tls::{ClientTls, ALPN_H2, ALPN_HTTP1};

/// Streams per connection when the peer sets no `SETTINGS_MAX_CONCURRENT_STREAMS` (RFC 9113
/// §6.5.2 recommends at least 100; it is also what most servers announce).
pub const DEFAULT_MAX_STREAMS: u32 = 100;
/// Most HTTP/2 connections kept to one endpoint.
pub const MAX_H2_CONNECTIONS: usize = 8;
/// Ping an idle upstream HTTP/2 connection this often, so a dead peer is noticed...
pub const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...and drop it when the ping is not answered within this.
pub const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the agent speaks to an upstream's endpoints (`protocol` in `[[upstream]]`, or the
/// registry's `protocol` metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (the default).
    Http1,
    /// HTTP/2 in clear text, prior knowledge.
    H2c,
    /// HTTP/2 over TLS (needs the upstream's TLS).
    H2,
    /// With TLS: what ALPN settles on (`h2` or `http/1.1`). In clear text: gRPC calls go
    /// HTTP/2 (h2c, since gRPC needs it), everything else HTTP/1.1.
    Auto,
}

/// The values `protocol` takes, for error messages.
pub const PROTOCOL_VALUES: &str = "\"http1\", \"h2c\", \"h2\" or \"auto\"";
/// The metadata key (every registry) read for an endpoint's protocol.
pub const PROTOCOL_KEY: &str = "protocol";

impl UpstreamProtocol {
    /// The config value: `http1`, `h2c`, `h2` or `auto`.
    pub fn parse(v: &str) -> Option<Self> {
        match v.trim() {
            "http1" => Some(UpstreamProtocol::Http1),
            "h2c" => Some(UpstreamProtocol::H2c),
            "h2" => Some(UpstreamProtocol::H2),
            "auto" => Some(UpstreamProtocol::Auto),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::H2 => "h2",
            UpstreamProtocol::Auto => "auto",
        }
    }

    /// What a registry says, from an instance's metadata: key [`PROTOCOL_KEY`] (Consul
    /// `Service.Meta`, Nacos instance metadata, Eureka metadata, the file registry's
    /// `metadata`), or for Consul a tag `protocol=<value>` (the adapter joins tags into the
    /// `tags` key). Values: the config's four, and the names registries use for them: `http`,
    /// `http/1.1` → http1; `http2`, `grpc` → h2c (Consul's service-defaults protocols, clear
    /// text); `https` is not a protocol here (TLS is `tls`). Case does not matter; anything else
    /// is ignored (the endpoint is then HTTP/1.1).
    pub fn from_metadata(meta: &BTreeMap<String, String>) -> Option<Self> {
        let tag = || {
            meta.get("tags")?
                .split(',')
                .find_map(|t| t.trim().strip_prefix("protocol="))
                .map(str::to_string)
        };
        let v = meta.get(PROTOCOL_KEY).cloned().or_else(tag)?;
        match v.trim().to_ascii_lowercase().as_str() {
            "http" | "http/1.1" => Some(UpstreamProtocol::Http1),
            "http2" | "grpc" => Some(UpstreamProtocol::H2c),
            other => UpstreamProtocol::parse(other),
        }
    }

    /// The ALPN list to offer over TLS for this protocol.
    pub fn alpn(self) -> Vec<Vec<u8>> {
        match self {
            UpstreamProtocol::Http1 => vec![ALPN_HTTP1.to_vec()],
            UpstreamProtocol::H2 | UpstreamProtocol::H2c => vec![ALPN_H2.to_vec()],
            UpstreamProtocol::Auto => vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()],
        }
    }
}

type H2Send = SendRequest<ReqBody>;

struct H2Conn {
    send: H2Send,
    streams: AtomicU32,
    /// The peer's `SETTINGS_MAX_CONCURRENT_STREAMS` (or [`DEFAULT_MAX_STREAMS`]).
    max: Arc<AtomicU32>,
    /// Takes no new streams (GOAWAY, or it gave a request back).
    draining: AtomicBool,
}

impl H2Conn {
    fn usable(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && !self.send.is_closed()
    }
}

/// One stream on an endpoint's HTTP/2 connection, counted until dropped.
pub struct Stream(Arc<H2Conn>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stream {
    fn open(conn: &Arc<H2Conn>) -> Stream {
        conn.streams.fetch_add(1, Ordering::Relaxed);
        Stream(conn.clone())
    }
}

/// What dialling for HTTP/2 found: an HTTP/2 connection, or (ALPN said `http/1.1`, for
/// `auto`) that the endpoint speaks HTTP/1.1 only.
pub enum Negotiated {
    H2(Response<Incoming>, Stream),
    /// Not sent: the request is still the caller's.
    Http1,
}

/// One endpoint's HTTP/2 connections.
#[derive(Default)]
pub struct H2Pool {
    conns: Mutex<Vec<Arc<H2Conn>>>,
    /// `auto` over TLS: ALPN chose HTTP/1.1 for this endpoint.
    pub alpn_http1: AtomicBool,
    /// The endpoint's drain (its state's, shared with its HTTP/1 pool).
    drain: Arc<Drain>,
}

impl std::fmt::Debug for H2Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Pool")
            .field("connections", &self.connections())
            .field("streams", &self.streams())
            .finish()
    }
}

impl H2Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<H2Conn>>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A pool under `drain`.
    pub fn with_drain(drain: Arc<Drain>) -> Self {
        H2Pool {
            drain,
            ..Default::default()
        }
    }

    /// A drain began: no connection takes a new stream, and those without one close now (the
    /// others when their last stream ends, or when the drain runs out of time).
    pub fn close_idle(&self) {
        let mut conns = self.lock();
        for c in conns.iter() {
            c.draining.store(true, Ordering::Relaxed);
        }
        conns.retain(|c| c.streams.load(Ordering::Relaxed) > 0);
    }

    /// Open HTTP/2 connections (draining ones included until they close).
    pub fn connections(&self) -> usize {
        self.lock().iter().filter(|c| !c.send.is_closed()).count()
    }

    /// Streams open on them.
    pub fn streams(&self) -> usize {
        self.lock()
            .iter()
            .map(|c| c.streams.load(Ordering::Relaxed) as usize)
            .sum()
    }

    /// A stream on a connection with room, or on the least loaded one when there are
    /// [`MAX_H2_CONNECTIONS`] already; `None`: dial a new connection.
    fn checkout(&self) -> Option<(H2Send, Stream)> {
        let mut conns = self.lock();
        conns.retain(|c| !c.send.is_closed() || c.streams.load(Ordering::Relaxed) > 0);
        let usable = || conns.iter().filter(|c| c.usable());
        let room = usable().find(|c| {
            c.send.is_ready() && c.streams.load(Ordering::Relaxed) < c.max.load(Ordering::Relaxed)
        });
        let pick = match room {
            Some(c) => c,
            None if usable().count() >= MAX_H2_CONNECTIONS => {
                usable().min_by_key(|c| c.streams.load(Ordering::Relaxed))?
            }
            None => return None,
        };
        Some((pick.send.clone(), Stream::open(pick)))
    }

    /// Sends `req` on a stream of one of the endpoint's HTTP/2 connections, dialling one when
    /// none has room. With `auto` over TLS (`alpn_fallback`), a handshake whose ALPN is not
    /// `h2` answers [`Negotiated::Http1`] and the endpoint is remembered as HTTP/1.1.
    pub async fn send(
        &self,
        authority: &Authority,
        tls: Option<&ClientTls>,
        req: &mut Option<Request<ReqBody>>,
        connect_timeout: Duration,
        alpn_fallback: bool,
    ) -> Result<Negotiated, ProxyError> {
        // `req` as in `ConnPool::send`: taken when handed to a connection. A connection that
        // gives the request back is skipped; bounded so a peer that refuses everything cannot
        // loop us.
        for _ in 0..=MAX_H2_CONNECTIONS {
            let (mut send, stream) = match self.checkout() {
                Some(s) => s,
                // Boxed, as in `pool.rs`: only a request that dials carries the dial's state.
                None => match Box::pin(self.connect(authority, tls, connect_timeout)).await? {
                    Some(s) => s,
                    None if alpn_fallback => {
                        self.alpn_http1.store(true, Ordering::Relaxed);
                        return Ok(Negotiated::Http1);
                    }
                    None => {
                        return Err(ProxyError::Connect {
                            authority: authority.to_string(),
                            source: "the endpoint did not agree to HTTP/2 (ALPN)".into(),
                        })
                    }
                },
            };
            let Some(r) = req.take() else {
                return Err(no_request(authority));
            };
            match send
                .try_send_request(absolute(r, authority, tls.is_some()))
                .await
            {
                Ok(resp) => return Ok(Negotiated::H2(resp, stream)),
                Err(mut e) => match e.take_message() {
                    Some(r) => {
                        stream.0.draining.store(true, Ordering::Relaxed);
                        *req = Some(r);
                    }
                    None => {
                        let source = e.into_error();
                        let sent = if unprocessed(&source) {
                            stream.0.draining.store(true, Ordering::Relaxed);
                            Sent::No
                        } else {
                            Sent::Maybe
                        };
                        return Err(ProxyError::Upstream {
                            sent,
                            source: source.into(),
                        });
                    }
                },
            }
        }
        Err(ProxyError::Connect {
            authority: authority.to_string(),
            source: "every HTTP/2 connection gave the request back".into(),
        })
    }

    /// Dials a new HTTP/2 connection and opens a stream on it; `None` when TLS's ALPN chose
    /// something other than `h2`.
    async fn connect(
        &self,
        authority: &Authority,
        tls: Option<&ClientTls>,
        timeout: Duration,
    ) -> Result<Option<(H2Send, Stream)>, ProxyError> {
        let dialed = dial::dial(authority, tls, timeout).await?;
        if tls.is_some() && dialed.alpn != dial::Alpn::H2 {
            return Ok(None);
        }
        let max = Arc::new(AtomicU32::new(DEFAULT_MAX_STREAMS));
        let io = SettingsSniffer::new(dialed.io, max.clone());
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
        let handshake = builder.handshake(TokioIo::new(io));
        let (send, conn) = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                return Err(ProxyError::Connect {
                    authority: authority.to_string(),
                    source: e.into(),
                })
            }
            Err(_) => {
                return Err(ProxyError::Connect {
                    authority: authority.to_string(),
                    source: format!("no HTTP/2 handshake within {timeout:?}").into(),
                })
            }
        };
        // Aborted by the drain when its time is up (`Drain::spawn`).
        let conn = async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        };
        self.drain.spawn(conn, ());
        let conn = Arc::new(H2Conn {
            send: send.clone(),
            streams: AtomicU32::new(0),
            max,
            draining: AtomicBool::new(false),
        });
        let stream = Stream::open(&conn);
        self.lock().push(conn);
        Ok(Some((send, stream)))
    }
}

/// HTTP/2 requests carry scheme and authority as pseudo-headers: the URI is made absolute from
/// the `Host` the request carries (the client's authority) or the endpoint's, and `Host` is
/// dropped. A gRPC call gets `te: trailers` back (removed as hop-by-hop; gRPC servers may
/// require it).
fn absolute(mut req: Request<ReqBody>, endpoint: &Authority, tls: bool) -> Request<ReqBody> {
    let authority = req
        .headers_mut()
        .remove(header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .or_else(|| req.uri().authority().cloned())
        .unwrap_or_else(|| endpoint.clone());
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = http::Version::HTTP_2;
    if grpc::is_grpc(req.headers()) {
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    req
}

/// Whether the peer said it did not process the stream (RFC 9113 §8.7): RST_STREAM
/// `REFUSED_STREAM`, or a graceful (NO_ERROR) GOAWAY whose last-stream-id is below the stream.
fn unprocessed(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2e) = err.downcast_ref::<h2::Error>() {
            return h2e.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2e.is_go_away()
                    && h2e.is_remote()
                    && h2e.reason() == Some(h2::Reason::NO_ERROR));
        }
        cur = err.source();
    }
    false
}

/// Reads the peer's first SETTINGS frame as it passes (the server's connection preface, RFC
/// 9113 §3.4) for `SETTINGS_MAX_CONCURRENT_STREAMS`; then only passes bytes through.
pub struct SettingsSniffer<I> {
    inner: I,
    max: Arc<AtomicU32>,
    state: Sniff,
}

enum Sniff {
    /// Frame header bytes seen so far.
    Header([u8; 9], usize),
    /// Inside the SETTINGS payload: bytes left, the current 6-byte entry.
    Payload(usize, [u8; 6], usize),
    Done,
}

impl<I> SettingsSniffer<I> {
    pub fn new(inner: I, max: Arc<AtomicU32>) -> Self {
        SettingsSniffer {
            inner,
            max,
            state: Sniff::Header([0; 9], 0),
        }
    }

    #[cfg(test)]
    fn observe(&mut self, bytes: &[u8]) {
        observe(&mut self.state, &self.max, bytes);
    }
}

fn observe(state: &mut Sniff, max: &AtomicU32, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        match state {
            Sniff::Done => return,
            Sniff::Header(h, n) => {
                h[*n] = bytes[0];
                *n += 1;
                bytes = &bytes[1..];
                if *n == 9 {
                    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    // The first frame must be a SETTINGS without ACK; anything else and
                    // there is nothing to learn.
                    *state = if h[3] == 4 && h[4] & 1 == 0 && len > 0 {
                        Sniff::Payload(len, [0; 6], 0)
                    } else {
                        Sniff::Done
                    };
                }
            }
            Sniff::Payload(left, e, n) => {
                e[*n] = bytes[0];
                *n += 1;
                *left -= 1;
                bytes = &bytes[1..];
                if *n == 6 {
                    if u16::from_be_bytes([e[0], e[1]]) == 3 {
                        let v = u32::from_be_bytes([e[2], e[3], e[4], e[5]]);
                        max.store(v.max(1), Ordering::Relaxed);
                    }
                    *n = 0;
                }
                if *left == 0 {
                    *state = Sniff::Done;
                }
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for SettingsSniffer<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !matches!(this.state, Sniff::Done) {
            observe(&mut this.state, &this.max, &buf.filled()[before..]);
        }
        r
    }
}

write_through!(SettingsSniffer);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peers_max_concurrent_streams_is_read_from_its_first_settings() {
        let max = Arc::new(AtomicU32::new(DEFAULT_MAX_STREAMS));
        let mut s = SettingsSniffer::new((), max.clone());
        // SETTINGS, 12 bytes: HEADER_TABLE_SIZE=4096, MAX_CONCURRENT_STREAMS=7; fed in pieces.
        let frame = [
            0u8, 0, 12, 4, 0, 0, 0, 0, 0, 0, 1, 0, 0, 16, 0, 0, 3, 0, 0, 0, 7,
        ];
        for chunk in frame.chunks(4) {
            s.observe(chunk);
        }
        assert_eq!(max.load(Ordering::Relaxed), 7);
        // A later SETTINGS is not read (it would need the whole frame stream followed).
        s.observe(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 9]);
        assert_eq!(max.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn protocol_values_and_registry_metadata() {
        assert_eq!(UpstreamProtocol::parse("h2c"), Some(UpstreamProtocol::H2c));
        assert_eq!(UpstreamProtocol::parse("HTTP2"), None);
        let meta = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert_eq!(
            UpstreamProtocol::from_metadata(&meta("protocol", "grpc")),
            Some(UpstreamProtocol::H2c)
        );
        assert_eq!(
            UpstreamProtocol::from_metadata(&meta("protocol", "H2")),
            Some(UpstreamProtocol::H2)
        );
        assert_eq!(
            UpstreamProtocol::from_metadata(&meta("tags", "v1, protocol=h2c")),
            Some(UpstreamProtocol::H2c)
        );
        assert_eq!(
            UpstreamProtocol::from_metadata(&meta("protocol", "quic")),
            None
        );
        assert_eq!(UpstreamProtocol::from_metadata(&BTreeMap::new()), None);
    }
}
