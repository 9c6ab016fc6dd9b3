//! Upstream connections: one HTTP/1 keep-alive pool per endpoint, on the agent's own HTTP/1
//! client (`h1/client.rs`; hyper's for `Upgrade` requests, whose connection becomes a tunnel).
//!
//! The pool lives in the endpoint's state (`endpoint::EndpointState`), so it is handed
//! from snapshot to snapshot with the endpoint and closed when the endpoint leaves. A checkout
//! is an uncontended lock and a pop (newest first, so the warmest connection is reused and the
//! oldest ones age out); a connection goes back when its response body has been read to the end
//! (see `proxy::UpstreamBody`), with no task spawned per request. hyper-util's pooled client,
//! used before, keyed one shared pool by authority and spawned a task per request to return the
//! connection; the bench profile showed that cost (issue #8, BENCHMARKS.md).
//!
//! A request is never lost to a stale keep-alive connection: an idle connection is looked at
//! (a read that must not wait) when it is taken, and one the upstream closed meanwhile is
//! dropped for the next pooled one or a fresh one, without counting against the endpoint.
//!
//! Circuit breakers (`breaker.rs`): every open connection holds a place in the pool's
//! [`Gate`] for its life, up to the upstream's `max_connections`. At the limit a request waits
//! for a connection to come back (or close), at most `connect_timeout`, and only if fewer than
//! `max_pending` requests of its upstream wait already; otherwise it is refused at once
//! ([`ProxyError::Overflow`]).
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{Either, Empty};
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::breaker::{Gate, Limit, Slot};
use crate::dial;
use crate::error::{BoxError, ProxyError, Sent};
use crate::h1::client::{self, Kill};
use crate::replay::ReplayBody;
use crate::tls::ClientTls;

/// An endpoint's drain (#17): the registry removed it, or marks it unhealthy or draining
/// (Eureka `OUT_OF_SERVICE`/`DOWN`, Consul maintenance, Nacos `enabled=false`). No new request
/// is sent to it (the table no longer routes there), requests in flight and open tunnels
/// finish, idle connections close at once, a connection that finishes its exchange is closed
/// rather than pooled, and after the upstream's `drain_timeout` whatever is left (busy HTTP/1
/// and HTTP/2 connections, tunnels) is closed. One drain per endpoint state, shared by its
/// HTTP/1 and HTTP/2 pools and its tunnels.
#[derive(Debug)]
pub struct Drain {
    draining: AtomicBool,
    /// Bumped by every start and end, so a timer of an earlier drain never closes a later one.
    generation: AtomicU64,
    /// `true`: close now (the drain's time is up).
    close: watch::Sender<bool>,
    /// The tasks of the endpoint's upstream connections (HTTP/1 and HTTP/2), aborted when the
    /// drain's time is up. Kept here rather than as a drain future inside each connection's
    /// task: such a future is polled on every wake-up of the task, several times per request
    /// (~600 instructions a request, callgrind, #15); a list costs only a dial.
    tasks: Mutex<Vec<AbortHandle>>,
    /// The kill switches of the endpoint's own HTTP/1 connections (`h1::client::Kill`), fired
    /// when the drain's time is up: a connection has no task to abort, the request's task
    /// drives it.
    kills: Mutex<Vec<Arc<Kill>>>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            draining: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            close: watch::channel(false).0,
            tasks: Mutex::default(),
            kills: Mutex::default(),
        }
    }
}

impl Drain {
    /// Starts draining; the drain's generation when it was not draining yet (to give
    /// [`Drain::expire`] when its time is up), else `None`.
    pub fn begin(&self) -> Option<u64> {
        if self.draining.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(self.generation.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// The endpoint serves again (back in the table, registry-healthy again).
    pub fn end(&self) {
        if self.draining.swap(false, Ordering::AcqRel) {
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.close.send_replace(false);
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The drain of `generation` ran out of time: close what is left, unless it ended since.
    pub fn expire(&self, generation: u64) -> bool {
        if self.is_draining() && self.generation.load(Ordering::Acquire) == generation {
            self.close.send_replace(true);
            self.abort_tasks();
            return true;
        }
        false
    }

    /// Runs `conn`, an upstream connection's I/O, on a task of its own that the drain aborts
    /// when its time is up (at once if it is up already). `closing` is dropped when the task
    /// ends either way.
    pub fn spawn<F, G>(&self, conn: F, closing: G)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
        G: Send + 'static,
    {
        let task = tokio::spawn(async move {
            let _closing = closing;
            conn.await;
        });
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
        drop(tasks);
        if *self.close.borrow() {
            self.abort_tasks();
        }
    }

    /// Keeps `kill`, an own connection's switch, to fire when the drain's time is up (at once
    /// if it is up already).
    pub fn watch(&self, kill: &Arc<Kill>) {
        let mut kills = self.kills.lock().unwrap_or_else(PoisonError::into_inner);
        kills.retain(|k| Arc::strong_count(k) > 1);
        kills.push(Arc::clone(kill));
        drop(kills);
        if *self.close.borrow() {
            self.abort_tasks();
        }
    }

    fn abort_tasks(&self) {
        let kills = std::mem::take(&mut *self.kills.lock().unwrap_or_else(PoisonError::into_inner));
        for k in kills.iter().filter(|k| Arc::strong_count(k) > 1) {
            k.fire();
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        let busy = tasks.iter().filter(|t| !t.is_finished()).count();
        if busy > 0 {
            tracing::debug!(
                connections = busy,
                "upstream connections closed: their endpoint's drain ran out of time"
            );
        }
        for t in tasks {
            t.abort();
        }
    }

    /// Resolves when the drain closes what is left (at once when it has).
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.close.subscribe();
        async move {
            // An error: the drain is gone with its endpoint; nothing will close.
            if rx.wait_for(|c| *c).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Request body sent upstream: the client's (watched for its own framing faults), or empty for
/// a replayed body-less request or a probe. The client's is boxed: a request's futures carry
/// `Request<ReqBody>` through several layers (proxy, pool, hyper's dispatch), and inline it
/// would add ~220 bytes to each of them, copied whenever they move, for every request, with a
/// body or not (#15).
pub type ReqBody = Either<Box<ReplayBody>, Empty<Bytes>>;

/// Idle connections older than this are closed when the pool is next used.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per endpoint; beyond that the oldest is closed.
pub const POOL_MAX_IDLE: usize = 256;

/// What the pool keeps with each of its own connections: the TLS setup it was dialled with
/// (`ClientTls::id`, 0 for clear text: a checkout for another setup, TLS switched on or a new
/// CA after a reload, never reuses it) and its place under `max_connections`, given back when
/// the connection closes.
pub struct Tag {
    tls: u64,
    _released: Released,
}

/// One of the pool's HTTP/1 connections.
pub type Own = Box<client::Conn<dial::Io, Tag>>;

/// A hyper HTTP/1 connection, dialled for an `Upgrade` request only (its `101` hands the
/// socket to the tunnel); never pooled.
#[derive(Debug)]
pub struct Conn {
    _send: SendRequest<ReqBody>,
}

/// An upstream's response body: from one of the pool's own connections (which it gives back
/// when it ends: [`Body::reusable`]), or from hyper (HTTP/2, `Upgrade`).
#[derive(Debug)]
pub enum Body {
    Own(client::Body<dial::Io, Tag, ReqBody>),
    Hyper(Incoming),
}

impl Body {
    /// The connection, when the exchange ended so that it can carry another.
    pub fn reusable(&mut self) -> Option<Own> {
        match self {
            Body::Own(b) => b.reusable(),
            Body::Hyper(_) => None,
        }
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Own(b) => Pin::new(b).poll_frame(cx),
            Body::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Own(b) => b.is_end_stream(),
            Body::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Own(b) => b.size_hint(),
            Body::Hyper(b) => b.size_hint(),
        }
    }
}

/// Idle keep-alive connections to one endpoint.
#[derive(Default)]
pub struct ConnPool {
    idle: Mutex<VecDeque<Idle>>,
    /// Connections open now, idle or busy (`max_connections`).
    open: Gate,
    /// Woken when a connection comes back or closes, for requests waiting at the limit.
    freed: Arc<tokio::sync::Notify>,
    /// The endpoint's drain (its state's, shared with its HTTP/2 pool).
    drain: Arc<Drain>,
}

/// The limits a request is sent under: its upstream's `max_connections` (per endpoint) and
/// `max_pending`, with the upstream's count of requests waiting (`None`: no count kept).
#[derive(Debug, Clone, Copy)]
pub struct Admission<'a> {
    pub max_connections: u32,
    pub max_pending: u32,
    pub pending: Option<&'a Gate>,
}

impl Admission<'static> {
    /// No limits: health probes, tests.
    pub const UNLIMITED: Admission<'static> = Admission {
        max_connections: u32::MAX,
        max_pending: u32::MAX,
        pending: None,
    };
}

struct Idle {
    conn: Own,
    since: Instant,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("idle", &self.idle_count())
            .field("open", &self.open.taken())
            .finish()
    }
}

impl ConnPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A pool under `drain`.
    pub fn with_drain(drain: Arc<Drain>) -> Self {
        ConnPool {
            drain,
            ..Default::default()
        }
    }

    /// Closes every idle connection (a drain began).
    pub fn close_idle(&self) {
        let idle = std::mem::take(&mut *self.lock());
        drop(idle);
    }

    /// Idle connections held now.
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    /// Connections open now, idle or busy.
    pub fn open_count(&self) -> u32 {
        self.open.taken()
    }

    /// The newest idle connection for the TLS setup `tls` that is still open, if any; closed
    /// ones are dropped on the way (and their places under `max_connections` given back).
    fn take(&self, tls: u64) -> Option<Own> {
        let mut idle = self.lock();
        while let Some(mut c) = idle.pop_back() {
            if c.conn.tag.tls == tls && !c.conn.is_closed() {
                return Some(c.conn);
            }
        }
        None
    }

    /// Returns a connection whose exchange is finished.
    pub fn put(&self, conn: Own) {
        // Draining: dropped, so it closes now its exchange is over.
        if self.drain.is_draining() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lock();
        while idle
            .front()
            .is_some_and(|c| now.duration_since(c.since) > POOL_IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() >= POOL_MAX_IDLE {
            idle.pop_front();
        }
        idle.push_back(Idle { conn, since: now });
        drop(idle);
        self.freed.notify_one();
    }

    /// Sends `req` on a pooled connection, or on a new one to `authority` (over TLS with
    /// `tls`), and waits for the answer's head. The response's body holds the connection and
    /// gives it back ([`Body::reusable`], [`ConnPool::put`]) once it is read to its end. An
    /// `upgrade` request goes on a new hyper connection of its own (its `101` makes it a
    /// tunnel), returned beside the response.
    ///
    /// Errors: [`ProxyError::Connect`] when the endpoint could not be reached,
    /// [`ProxyError::Upstream`] when the exchange failed on a connection; its [`Sent`] says
    /// whether the request may have been written.
    ///
    /// `req` is the caller's. On the pool's own connections its body is taken and its head
    /// left there (written from where it lies), so a caller that retries has it back without
    /// a clone; an `Upgrade` (hyper's connection) takes it whole. Unsent on an error, it is
    /// left there too (the caller drops it). Not moved down by value: each async level would
    /// hold its own copy (232 bytes) in its state and copy it in (#13).
    pub async fn send(
        &self,
        authority: &Authority,
        tls: Option<&ClientTls>,
        req: &mut Option<Request<ReqBody>>,
        connect_timeout: Duration,
        admission: Admission<'_>,
        upgrade: bool,
    ) -> Result<(Response<Body>, Option<Conn>), ProxyError> {
        let key = tls.map_or(0, ClientTls::id);
        let mut waited: Option<(Option<Slot>, tokio::time::Instant)> = None;
        let slot = loop {
            if !upgrade {
                if let Some(conn) = self.take(key) {
                    let Some(r) = req.as_mut() else {
                        return Err(no_request(authority));
                    };
                    return exchange(conn, r).await;
                }
            }
            if let Some(slot) = self.open.enter(admission.max_connections) {
                break slot;
            }
            // At max_connections: wait for one to come back or close, as one of at most
            // max_pending, for at most connect_timeout in all.
            let until = match &waited {
                Some((_, until)) => *until,
                None => {
                    let p = match admission.pending {
                        Some(g) => match g.enter(admission.max_pending) {
                            Some(p) => Some(p),
                            None => return Err(ProxyError::Overflow(Limit::Pending)),
                        },
                        None => None,
                    };
                    let until = tokio::time::Instant::now() + connect_timeout;
                    waited = Some((p, until));
                    until
                }
            };
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            // Look again now that a wake-up cannot be missed.
            if (!upgrade && self.lock().iter().any(|c| c.conn.tag.tls == key))
                || self.open.taken() < admission.max_connections
            {
                continue;
            }
            if tokio::time::timeout_at(until, freed).await.is_err() {
                return Err(ProxyError::Overflow(Limit::Connections));
            }
        };
        drop(waited);
        let released = Released {
            slot: Some(slot),
            freed: self.freed.clone(),
        };
        if upgrade {
            return Box::pin(self.send_upgrade(authority, tls, req, connect_timeout, released))
                .await;
        }
        // Boxed: a dial (TCP, TLS handshake) is ~1.8 KB of state that every request's future
        // would otherwise carry, and copy each time it is moved, for the few that dial (#15).
        let dialed = Box::pin(dial::dial(authority, tls, connect_timeout))
            .await
            // The place is given back (`released` dropped): a waiter may take it.
            ?;
        let kill = Kill::new();
        self.drain.watch(&kill);
        let conn = client::Conn::new(
            dialed.io,
            Some(kill),
            Tag {
                tls: key,
                _released: released,
            },
        );
        let Some(req) = req.as_mut() else {
            return Err(no_request(authority));
        };
        exchange(conn, req).await
    }

    /// An `Upgrade` request on a new hyper connection (see [`ConnPool::send`]).
    async fn send_upgrade(
        &self,
        authority: &Authority,
        tls: Option<&ClientTls>,
        req: &mut Option<Request<ReqBody>>,
        connect_timeout: Duration,
        released: Released,
    ) -> Result<(Response<Body>, Option<Conn>), ProxyError> {
        let mut send = connect(authority, tls, connect_timeout, released, &self.drain).await?;
        let Some(req) = req.take() else {
            return Err(no_request(authority));
        };
        match send.try_send_request(req).await {
            Ok(resp) => Ok((resp.map(Body::Hyper), Some(Conn { _send: send }))),
            Err(e) => {
                let sent = if e.message().is_some() {
                    Sent::No
                } else {
                    Sent::Maybe
                };
                Err(ProxyError::Upstream {
                    sent,
                    source: e.into_error().into(),
                })
            }
        }
    }
}

/// One exchange on one of the pool's connections. The body is taken from `req`; its head is
/// left there (written from where it lies), so a caller that may retry has it back.
async fn exchange(
    conn: Own,
    req: &mut Request<ReqBody>,
) -> Result<(Response<Body>, Option<Conn>), ProxyError> {
    let body = std::mem::replace(req.body_mut(), Either::Right(Empty::new()));
    match client::send(conn, req, body).await {
        Ok(resp) => Ok((resp.map(Body::Own), None)),
        Err(f) => Err(ProxyError::Upstream {
            sent: if f.written { Sent::Maybe } else { Sent::No },
            source: f.source,
        }),
    }
}

/// A send asked with no request: a caller's bug, answered as an error, never a panic (a panic
/// aborts the process).
pub fn no_request(authority: &Authority) -> ProxyError {
    ProxyError::Connect {
        authority: authority.to_string(),
        source: "internal error: no request to send".into(),
    }
}

/// Dials `authority` (through `dial.rs`: TCP, and TLS when the upstream has it) and starts a
/// hyper HTTP/1 connection on it; the connection's I/O runs in a task of its own until the
/// peer closes it, every handle to it is dropped, or `closed` (the endpoint's drain ran out of
/// time). `released` is the connection's place under `max_connections`, given back (and
/// waiters woken) when it closes.
async fn connect(
    authority: &Authority,
    tls: Option<&ClientTls>,
    timeout: Duration,
    released: Released,
    drain: &Drain,
) -> Result<SendRequest<ReqBody>, ProxyError> {
    let dialed = dial::dial(authority, tls, timeout).await?;
    let (send, io) = http1::Builder::new()
        .handshake(TokioIo::new(dialed.io))
        .await
        .map_err(|e| ProxyError::Connect {
            authority: authority.to_string(),
            source: e.into(),
        })?;
    let conn = async move {
        // With upgrades: a `101` hands the connection to its tunnel (`tunnel.rs`).
        if let Err(e) = io.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    };
    drain.spawn(conn, released);
    Ok(send)
}

/// A closed connection's place under `max_connections`, given back (and a waiter woken) when
/// its task ends or is aborted.
struct Released {
    slot: Option<Slot>,
    freed: Arc<tokio::sync::Notify>,
}

impl Drop for Released {
    fn drop(&mut self) {
        // The place first, then the wake-up: the waiter must find it free.
        drop(self.slot.take());
        self.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        f.poll(&mut cx).is_pending()
    }

    /// The drain aborts its connections' tasks when its time is up, and one spawned after that
    /// at once; until then they run.
    #[tokio::test]
    async fn a_drain_aborts_its_connections_when_its_time_is_up() {
        let ended = |rx: tokio::sync::oneshot::Receiver<()>| async {
            tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .expect("the task was never aborted")
                .is_err()
        };
        let d = Drain::default();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        d.spawn(std::future::pending(), tx);
        let generation = d.begin().unwrap();
        tokio::task::yield_now().await;
        assert_eq!(
            rx.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty),
            "draining, not yet timed out: the connection runs"
        );
        assert!(d.expire(generation));
        assert!(ended(rx).await, "aborted: its closing value was dropped");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        d.spawn(std::future::pending(), tx);
        assert!(ended(rx).await, "spawned after the drain closed");
    }

    #[tokio::test]
    async fn a_drain_closes_only_its_own_generation() {
        let d = Drain::default();
        let first = d.begin().expect("a new drain");
        assert!(d.begin().is_none(), "already draining");
        // It ends (the endpoint serves again) and a new drain begins: the first timer is void.
        d.end();
        let second = d.begin().unwrap();
        assert!(!d.expire(first));
        let closed = d.closed();
        tokio::pin!(closed);
        assert!(pending(closed.as_mut()));
        assert!(d.expire(second));
        closed.await;
        // Serving again reopens: a new connection is not closed at once.
        d.end();
        let again = d.closed();
        tokio::pin!(again);
        assert!(pending(again.as_mut()));
        assert!(!d.is_draining());
    }
    use bytes::Bytes;
    use http_body_util::{BodyExt, Either, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// `GET /` through `pool`, clear text, no limits.
    async fn send_get(
        pool: &ConnPool,
        authority: &Authority,
    ) -> Result<Response<Body>, ProxyError> {
        let timeout = Duration::from_secs(1);
        let (resp, _) = pool
            .send(
                authority,
                None,
                &mut Some(get(authority)),
                timeout,
                Admission::UNLIMITED,
                false,
            )
            .await?;
        Ok(resp)
    }

    /// Reads `resp`'s body and gives its connection back to `pool`.
    async fn finish(pool: &ConnPool, resp: Response<Body>) -> Bytes {
        let mut body = resp.into_body();
        let data = (&mut body).collect().await.unwrap().to_bytes();
        pool.put(body.reusable().expect("a reusable connection"));
        data
    }

    fn get(authority: &Authority) -> Request<ReqBody> {
        let mut req = Request::new(Either::Right(Empty::<Bytes>::new()));
        *req.uri_mut() = "/".parse().unwrap();
        req.headers_mut()
            .insert(http::header::HOST, authority.as_str().parse().unwrap());
        req
    }

    /// A server that answers `per_conn` requests on each connection and then closes it, and
    /// counts connections.
    async fn server(per_conn: usize) -> (Authority, tokio::sync::mpsc::UnboundedReceiver<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = l.local_addr().unwrap().to_string().parse().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tx.send(()).unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for _ in 0..per_conn {
                        let mut got = Vec::new();
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            let n = s.read(&mut buf).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            got.extend_from_slice(&buf[..n]);
                        }
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                });
            }
        });
        (authority, rx)
    }

    #[tokio::test]
    async fn a_finished_connection_is_reused() {
        let (authority, mut conns) = server(100).await;
        let pool = ConnPool::default();
        for _ in 0..5 {
            let resp = send_get(&pool, &authority).await.unwrap();
            assert_eq!(finish(&pool, resp).await, "ok");
        }
        assert_eq!(pool.idle_count(), 1);
        let mut n = 0;
        while conns.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 1, "five requests, one connection");
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_not_a_failure() {
        // One request per connection: every pooled connection is closed by the server after
        // its answer, so each later request finds a dead one first.
        let (authority, _conns) = server(1).await;
        let pool = ConnPool::default();
        for i in 0..5 {
            let resp = send_get(&pool, &authority)
                .await
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(finish(&pool, resp).await, "ok");
            // Wait (bounded) until the server's close can be seen, so the next request meets
            // a dead pooled connection.
            let deadline = Instant::now() + Duration::from_secs(5);
            while pool.lock().back_mut().is_some_and(|c| !c.conn.is_closed()) {
                assert!(
                    Instant::now() < deadline,
                    "the server's close was never seen"
                );
                tokio::task::yield_now().await;
            }
        }
    }

    #[tokio::test]
    async fn refused_is_a_connect_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let authority: Authority = format!("127.0.0.1:{port}").parse().unwrap();
        let err = send_get(&ConnPool::default(), &authority)
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::Connect { .. }), "{err}");
    }
}
