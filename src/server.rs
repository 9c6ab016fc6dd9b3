//! Listeners: accept loops for the proxy and the admin API, with limits against slow or greedy
//! clients and a graceful drain on shutdown.
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use bytes::BytesMut;
use http::Request;

use crate::admin::Admin;
use crate::framing::InBody;
use crate::h1::{self, server::Served};
use crate::h2c::{self, Sniffed};
use crate::h2server::{self, Detected, ResetGuard};
use crate::proxy::{Peer, Proxy};

/// A client has this long to send a request's headers (slowloris guard).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers) accepted; over it hyper answers 431. Set as
/// both hyper's `max_buf_size` and `max_header_size`: the buffer alone does not hold it, since
/// one read may fill the buffer's whole spare capacity, which can be past `max_buf_size`, and a
/// head that arrives whole in it is parsed without the size being looked at (hyper 1.x). Header
/// lines are capped on their own by `framing::DEFAULT_MAX_HEADER_LINE`.
pub const MAX_HEADER_BYTES: usize = h2c::MAX_HEAD;
/// Most request headers accepted.
pub const MAX_HEADERS: usize = h2c::MAX_HEADERS;

fn builder() -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    b
}

/// The HTTP/2 server, with the limits of `h2server.rs`.
fn h2_builder() -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(h2server::MAX_CONCURRENT_STREAMS)
        .max_header_list_size(h2server::MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(h2server::MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(h2server::MAX_LOCAL_ERROR_RESET_STREAMS)
        .keep_alive_interval(h2server::KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(h2server::KEEP_ALIVE_TIMEOUT);
    b
}

/// Pause after a failed accept (EMFILE and the like), so a listener that keeps failing does
/// not spin a core.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Accepts one connection; on an error, logs it, backs off [`ACCEPT_BACKOFF`] and says `None`.
async fn accept(listener: &TcpListener, which: &'static str) -> Option<(TcpStream, SocketAddr)> {
    match listener.accept().await {
        Ok(x) => Some(x),
        Err(e) => {
            tracing::warn!(listener = which, error = %e, "accept failed");
            tokio::time::sleep(ACCEPT_BACKOFF).await;
            None
        }
    }
}

/// Serves the proxy until `shutdown` turns true, then drains open connections for up to
/// `grace`. Returns the number of connections still open when the grace ran out (0 when all
/// finished).
pub async fn serve_proxy(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) -> usize {
    let graceful = GracefulShutdown::new();
    let open = Arc::new(AtomicUsize::new(0));
    // HTTP/1 connections serve upgrades, which hyper-util's graceful watcher cannot hold: they
    // are drained by hand (`http1_drained`), counted here.
    let http1_open = Arc::new(OpenCount::default());
    let tunnels = proxy.tunnels().clone();
    loop {
        tokio::select! {
            accepted = accept(&listener, "proxy") => {
                let Some((stream, remote)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let peer = Peer::new(remote);
                let proxy = proxy.clone();
                let watcher = graceful.watcher();
                let (stop, http1_open) = (shutdown.clone(), http1_open.clone());
                let conn = async move {
                    // The preface (or its absence), and an HTTP/1.1 connection's first head
                    // (`Upgrade: h2c`, `h2c.rs`), must come as quickly as a request head.
                    let opened = async {
                        let (proto, io) = h2server::detect(stream).await?;
                        std::io::Result::Ok(match proto {
                            Detected::Http2 => Opened::Http2(io),
                            Detected::Http1 => h2c::sniff(io).await?.into(),
                        })
                    };
                    let Ok(Ok(opened)) = tokio::time::timeout(HEADER_READ_TIMEOUT, opened).await
                    else {
                        return Ok(());
                    };
                    match opened {
                        Opened::Http1(io) => {
                            let _counted = http1_open.enter();
                            serve_h1(io, proxy, peer, stop).await
                        }
                        Opened::Http2(io) => Box::pin(serve_h2(io, proxy, peer, watcher, remote)).await,
                        Opened::Upgraded(io) => Box::pin(serve_h2(io, proxy, peer, watcher, remote)).await,
                    }
                };
                spawn_conn(conn, remote, Some(open.clone()));
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    tracing::info!(grace = ?grace, connections = open.load(Ordering::Relaxed), "draining in-flight requests");
    let drained = async {
        graceful.shutdown().await;
        http1_open.all_closed().await;
        if tunnels.open() > 0 {
            tracing::info!(tunnels = tunnels.open(), "waiting for open tunnels");
        }
        tunnels.all_closed().await;
    };
    match tokio::time::timeout(grace, drained).await {
        Ok(()) => 0,
        Err(_) => {
            let cut = tunnels.open();
            if cut > 0 {
                tracing::warn!(tunnels = cut, "grace period over: closing open tunnels");
            }
            tunnels.close_all();
            let left = open.load(Ordering::Relaxed) + cut;
            tracing::warn!(
                connections = left,
                "grace period over with requests still in flight"
            );
            left
        }
    }
}

/// Polls `conn` until it ends (`Some`), or until `stop` turns true (`None`, `conn` not done).
///
/// The stop signal is polled once, which leaves this task's waker with it, and after that only
/// when it has changed (a version compare): polled on every wake-up of the connection's task, as
/// a `select!` branch, it cost ~280 instructions a request (callgrind, #15).
async fn until_stopped<C: Future>(
    mut conn: std::pin::Pin<&mut C>,
    stop: watch::Receiver<bool>,
) -> Option<C::Output> {
    let stopping = stop_signal(stop);
    tokio::pin!(stopping);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        if stopping.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Serves one HTTP/1.1 connection: the agent's own server (`h1/server.rs`) while requests are
/// body-less, hyper's from the first request that is not (with the bytes already read), to the
/// end of the connection.
async fn serve_h1(
    io: h2c::Replay<h2server::Prefixed<TcpStream>>,
    proxy: Arc<Proxy>,
    peer: Peer,
    stop: watch::Receiver<bool>,
) -> Result<(), hyper::Error> {
    let (sniffed, prefixed) = io.into_parts();
    let (prefix, stream) = prefixed.into_parts();
    let mut read = BytesMut::with_capacity(READ_BUFFER.max(sniffed.len() + prefix.len()));
    read.extend_from_slice(&sniffed);
    read.extend_from_slice(&prefix);
    drop(sniffed);
    let options = h1::server::Options {
        header_timeout: HEADER_READ_TIMEOUT,
        idle_shrink: h1::server::IDLE_SHRINK,
        limits: h1::Limits::default(),
    };
    let handle = |req: Request<()>| {
        let (parts, ()) = req.into_parts();
        let proxy = &proxy;
        let peer = &peer;
        async move {
            match proxy
                .handle(Request::from_parts(parts, InBody::Empty), peer)
                .await
            {
                Ok(resp) => resp,
                Err(never) => match never {},
            }
        }
    };
    let served = h1::server::serve(stream, read, &options, handle, stop_signal(stop.clone())).await;
    let (stream, read) = match served {
        Ok(Served::Closed) => return Ok(()),
        Ok(Served::Handoff(stream, read)) => (stream, read),
        Err(e) => {
            tracing::debug!(error = %e, "client connection failed");
            return Ok(());
        }
    };
    // Boxed: hyper's connection state is not carried by every connection's task, only by the
    // few handed to it (the memory of an idle connection, #15).
    Box::pin(serve_hyper_h1(
        h2c::Replay::new(read.to_vec(), stream),
        proxy,
        peer,
        stop,
    ))
    .await
}

/// The rest of an HTTP/1.1 connection on hyper's server.
async fn serve_hyper_h1(
    io: h2c::Replay<TcpStream>,
    proxy: Arc<Proxy>,
    peer: Peer,
    stop: watch::Receiver<bool>,
) -> Result<(), hyper::Error> {
    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
        let proxy = proxy.clone();
        let peer = peer.clone();
        async move { proxy.handle(req.map(InBody::Hyper), &peer).await }
    });
    let conn = builder()
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    match until_stopped(conn.as_mut(), stop).await {
        Some(r) => r,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// The first read buffer of an HTTP/1.1 connection.
const READ_BUFFER: usize = 4096;

/// Completes once `stop` turns true. Polled on every wake-up of a connection's task, it looks
/// at the signal only once it has changed (a version compare; see [`until_stopped`]).
fn stop_signal(mut stop: watch::Receiver<bool>) -> impl Future<Output = ()> {
    let mut probe = stop.clone();
    let mut stopping = Box::pin(async move { drop(stop.wait_for(|s| *s).await) });
    let mut armed = false;
    std::future::poll_fn(move |cx| {
        if !armed || probe.has_changed().unwrap_or(true) {
            armed = true;
            drop(probe.borrow_and_update());
            if stopping.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    })
}

/// A proxy connection once its protocol is known.
enum Opened<I> {
    Http1(h2c::Replay<h2server::Prefixed<I>>),
    /// HTTP/2 by prior knowledge.
    Http2(h2server::Prefixed<I>),
    /// HTTP/2 after `Upgrade: h2c` (the `101` is written).
    Upgraded(h2c::Upgraded<h2server::Prefixed<I>>),
}

impl<I> From<Sniffed<h2server::Prefixed<I>>> for Opened<I> {
    fn from(s: Sniffed<h2server::Prefixed<I>>) -> Self {
        match s {
            Sniffed::Http1(io) => Opened::Http1(io),
            Sniffed::Upgraded(io) => Opened::Upgraded(io),
        }
    }
}

/// Serves one HTTP/2 connection with the limits of `h2server.rs`, until it ends, the drain
/// ends it, or its client cancels too many requests.
async fn serve_h2<I>(
    io: I,
    proxy: Arc<Proxy>,
    peer: Peer,
    watcher: Watcher,
    remote: SocketAddr,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let guard = Arc::new(ResetGuard::default());
    let g = guard.clone();
    let svc = service_fn(move |req| {
        let proxy = proxy.clone();
        let peer = peer.clone();
        let served = g.serving();
        async move {
            let resp = proxy.handle(req.map(InBody::Hyper), &peer).await;
            served.done();
            resp
        }
    });
    let conn = watcher.watch(h2_builder().serve_connection(TokioIo::new(io), svc));
    tokio::select! {
        r = conn => r,
        _ = guard.tripped() => {
            tracing::warn!(%remote, max = h2server::MAX_CANCELLED_PER_SEC, "HTTP/2 client cancelled too many requests in a second: connection closed");
            Ok(())
        }
    }
}

/// A count of open connections that can be waited on to reach zero.
#[derive(Default)]
struct OpenCount {
    open: AtomicUsize,
    changed: tokio::sync::Notify,
}

/// One connection in an [`OpenCount`], until dropped.
struct Counted<'a>(&'a OpenCount);

impl OpenCount {
    fn enter(&self) -> Counted<'_> {
        self.open.fetch_add(1, Ordering::AcqRel);
        Counted(self)
    }

    async fn all_closed(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            changed.await;
        }
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// Runs one connection on its own task; `open` counts it while it runs.
fn spawn_conn<F, E>(conn: F, remote: SocketAddr, open: Option<Arc<AtomicUsize>>)
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    if let Some(o) = &open {
        o.fetch_add(1, Ordering::Relaxed);
    }
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%remote, error = %e, "connection ended with an error");
        }
        if let Some(o) = open {
            o.fetch_sub(1, Ordering::Relaxed);
        }
    });
}

/// Serves the admin API until `shutdown` turns true.
pub async fn serve_admin(
    listener: TcpListener,
    admin: Arc<Admin>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = accept(&listener, "admin") => {
                let Some((stream, remote)) = accepted else { continue };
                let admin = admin.clone();
                let svc = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { admin.handle(req).await }
                });
                spawn_conn(builder().serve_connection(TokioIo::new(stream), svc), remote, None);
            }
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::state::State;
    use crate::table::Dynamic;
    use crate::upstream::{UpstreamConfig, UpstreamSettings};
    use tokio::io::AsyncWriteExt;

    /// The stop signal is seen though it is polled only once before it changes; a connection
    /// that ends first gives its output.
    #[tokio::test]
    async fn until_stopped_sees_the_stop_and_the_end() {
        let (tx, rx) = watch::channel(false);
        let waiting = tokio::spawn(async move {
            let conn = std::future::pending::<()>();
            tokio::pin!(conn);
            until_stopped(conn, rx).await.is_none()
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "nothing stopped it yet");
        tx.send(true).unwrap();
        let stopped = tokio::time::timeout(Duration::from_secs(10), waiting).await;
        assert!(stopped.expect("the stop was missed").unwrap());
        let done = std::future::ready(7);
        tokio::pin!(done);
        assert_eq!(until_stopped(done, watch::channel(false).1).await, Some(7));
    }

    /// Defect 6 of #12: `serve_proxy` said it returned the connections still open and returned
    /// 0 or 1. Two requests held by a backend that never answers: it returns 2.
    #[tokio::test]
    async fn serve_proxy_returns_the_connections_left_open() {
        let hang = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hang_addr = hang.local_addr().unwrap();
        let reached = Arc::new(AtomicUsize::new(0));
        let r = reached.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = hang.accept().await {
                r.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        let state = State::new(vec![]);
        let _cache = Cache::new(
            state.clone(),
            Dynamic {
                upstreams: vec![UpstreamConfig {
                    id: "h".into(),
                    service: None,
                    source: None,
                    nodes: vec![(hang_addr, 1)],
                    settings: UpstreamSettings::default(),
                }],
                ..Default::default()
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let serving = tokio::spawn(serve_proxy(
            listener,
            Proxy::new(state),
            rx,
            Duration::from_millis(300),
        ));
        let mut clients = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                .await
                .unwrap();
            clients.push(c);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while reached.load(Ordering::SeqCst) < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the requests never reached the backend"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tx.send(true).unwrap();
        assert_eq!(serving.await.unwrap(), 2);
    }
}
