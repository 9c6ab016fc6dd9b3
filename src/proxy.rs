//! The reverse proxy: route, pick, forward, stream back.
//!
//! The request path loads the routing table once (an `ArcSwap` load: no lock), resolves the
//! upstream, and walks the balancer's candidates. Bodies are streamed both ways, never buffered ahead (a request body up to `retry_buffer` is copied as it is sent, `replay.rs`)
//! (but for a small error answer that is about to be retried, below). Only endpoints that
//! discovery produced are ever dialled: the Host header and an absolute URI only *name* a
//! service, they are never a destination.
//!
//! Retries follow `retry.rs`. A request that never reached the wire (refused connection, a
//! pooled connection the peer had closed) comes back from the connection pool (`pool.rs`) and
//! is resent as is; to retry after a response, the request head is cloned before a try that may
//! not be the last (a few reference-count bumps: header values share the request's read
//! buffer). An error answer that will be retried is read first when its length is known and at
//! most [`RETRY_BODY_LIMIT`], so its connection goes back to the pool and its endpoint's
//! in-flight count ends before the next try; it is kept, whole, for the client in case no
//! other try answers.
//!
//! Every try reports through an [`Attempt`] (`endpoint.rs`): latency into the endpoint's EWMA,
//! success or failure into passive health. The proxy never writes that state itself.
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Empty, Full};

use crate::access_log::{self, AccessLog, Logged, Tried, X_REQUEST_ID};
use crate::balancer::PickContext;
use crate::breaker::{Limit, Slot};
use crate::clock;
use crate::endpoint::{Attempt, Deferred, Endpoint, InFlight};
use crate::error::{BoxError, FramingError, ProxyError, Sent};
use crate::framing::{self, BodyFault, ClientBody, InBody, Limits};
use crate::grpc;
use crate::h2pool::{Negotiated, Stream, UpstreamProtocol};
use crate::health::Outcome;
use crate::metrics as m;
use crate::pool::{self, ReqBody};
use crate::replay::ReplayBody;
use crate::retry::{self, RETRY_BODY_LIMIT};
use crate::route::{NoRoute, RequestFacts, Resolved, SubsetHeader};
use crate::state::State;
use crate::tls::ClientTls;
use crate::tunnel::{self, Tunnels, Upgrade};
use crate::upstream::Upstream;

/// A routed request: its upstream, the path prefix to strip, the route's header subset rule.
type Routed = (Arc<Upstream>, usize, Option<Arc<SubsetHeader>>);

/// Response body sent to the client.
pub type RespBody = Either<UpstreamBody, Full<Bytes>>;
/// The response body as it leaves the proxy: counted for the access log (`access_log.rs`).
pub type ClientResponse = Response<Logged<RespBody>>;
/// How long a request for a service not yet watched waits for an on-demand source's first
/// answer.
pub const DEMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// The proxy service shared by every connection.
pub struct Proxy {
    state: Arc<State>,
    /// Open Upgrade tunnels (`tunnel.rs`), for the drain.
    tunnels: Arc<Tunnels>,
    limits: Limits,
    access_log: AccessLog,
    /// `EDGE_AGENT_REQUEST_ID=on`: requests without `x-request-id` get one, drawn from `ids`.
    request_id: bool,
    ids: crate::rng::Rng,
}

/// Per-connection facts the handler needs.
#[derive(Clone)]
pub struct Peer {
    pub ip: IpAddr,
    /// The client IP, formatted once per connection for `X-Forwarded-For`.
    pub ip_header: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        let ip = addr.ip();
        Peer {
            ip,
            ip_header: HeaderValue::try_from(ip.to_string()).expect("an IP is a valid header"),
        }
    }
}

impl Proxy {
    pub fn new(state: Arc<State>) -> Arc<Self> {
        Self::with_access_log(state, AccessLog::off(), false)
    }

    /// A proxy that writes `access_log` and, with `request_id`, adds `x-request-id`.
    pub fn with_access_log(
        state: Arc<State>,
        access_log: AccessLog,
        request_id: bool,
    ) -> Arc<Self> {
        Arc::new(Proxy {
            state,
            tunnels: Arc::default(),
            limits: Limits::default(),
            access_log,
            request_id,
            ids: crate::rng::Rng::from_entropy(),
        })
    }

    /// The open Upgrade tunnels.
    pub fn tunnels(&self) -> &Arc<Tunnels> {
        &self.tunnels
    }

    /// Handles one request. Never fails: errors become responses. Its access-log line (when
    /// there is a log) is sent when the response body ends.
    pub async fn handle(
        &self,
        mut req: Request<InBody>,
        peer: &Peer,
    ) -> Result<ClientResponse, Infallible> {
        let start = Instant::now();
        if self.request_id && !req.headers().contains_key(&X_REQUEST_ID) {
            let id = access_log::new_request_id(self.ids.next_u64(), self.ids.next_u64());
            req.headers_mut().insert(&X_REQUEST_ID, id);
        }
        let pending = self.access_log.begin(&req, peer.ip, start);
        let mut tried = Tried::new(pending.is_some());
        let resp = self.respond(req, peer, start, &mut tried).await;
        Ok(Logged::wrap(resp, pending, tried))
    }

    async fn respond(
        &self,
        req: Request<InBody>,
        peer: &Peer,
        start: Instant,
        tried: &mut Tried,
    ) -> Response<RespBody> {
        let protocol = client_protocol(&req);
        if let Err(e) = framing::check_request_head(&req, &self.limits) {
            tracing::debug!(error = %e, "request refused");
            let e = ProxyError::from(e);
            m::unrouted(protocol, e.status().as_u16());
            return refusal(&e, "", protocol);
        }
        if req.method() == http::Method::CONNECT {
            // The agent is no forward proxy: a tunnel goes only to a discovered endpoint.
            m::unrouted(protocol, 405);
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "edge-agent: CONNECT is not supported\n".into(),
            );
        }
        let (upstream, strip, subset_header) = match self.route(&req, peer).await {
            Ok(r) => r,
            Err(body) => {
                m::unrouted(protocol, 404);
                if protocol == m::Protocol::Grpc {
                    return grpc_error(grpc::UNIMPLEMENTED, &body);
                }
                return text(StatusCode::NOT_FOUND, body);
            }
        };
        tried.routed(&upstream.id);
        upstream.runtime.requests.fetch_add(1, Ordering::Relaxed);
        let max_requests = upstream.settings().breakers.max_requests;
        // The response is looked at where it lies and moved once, at the end: each move of it
        // (`Result::map`, a `(resp, status)` tuple) is a ~400-byte copy (callgrind, #13).
        let resp = match upstream.runtime.requests_in_flight.enter(max_requests) {
            None => Err(ProxyError::Overflow(Limit::Requests)),
            Some(slot) => {
                let mut resp = self
                    .forward(&upstream, req, strip, peer, tried, subset_header.as_deref())
                    .await;
                // The place is held until the client has the whole body.
                if let Ok(r) = &mut resp {
                    if let Either::Left(body) = r.body_mut() {
                        body.slot = Some(slot);
                    }
                }
                resp
            }
        };
        let status = match &resp {
            Ok(r) => r.status().as_u16(),
            Err(e) => {
                match e {
                    ProxyError::NoEndpoint | ProxyError::Unavailable(_) => {
                        upstream.runtime.metrics.upstream_error("no_endpoint")
                    }
                    ProxyError::Overflow(limit) => upstream.runtime.metrics.overflow(limit.name()),
                    _ => {}
                }
                tracing::debug!(upstream = %upstream.id, error = %crate::error::chain(e), "request failed");
                // A gRPC-shaped error is an HTTP 200; the metric keeps the HTTP status it
                // stands for.
                e.status().as_u16()
            }
        };
        let took = start.elapsed();
        upstream.runtime.metrics.request(protocol, status, took);
        upstream.runtime.stats.record(status, took);
        match resp {
            Ok(r) => r,
            Err(e) => refusal(&e, &upstream.id, protocol),
        }
    }

    /// The upstream for a request and the path prefix to strip, or the 404 body. A zero-config
    /// miss asks on-demand sources to watch the name and waits (up to [`DEMAND_TIMEOUT`]) for
    /// their first answer.
    async fn route(&self, req: &Request<InBody>, peer: &Peer) -> Result<Routed, String> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        let path = req.uri().path();
        let facts = Some(RequestFacts {
            headers: req.headers(),
            uri: req.uri(),
            client_ip: peer.ip,
        });
        let routed = |r: Resolved| (r.upstream.clone(), r.strip, r.subset_header.cloned());
        let missing = {
            let table = self.state.table.load();
            match table.resolve_request(host, path, facts) {
                Ok(r) => return Ok(routed(r)),
                Err(NoRoute::Service(name))
                    if table.routes.is_empty() && !self.state.on_demand.is_empty() =>
                {
                    name.to_ascii_lowercase()
                }
                Err(no) => return Err(no.to_string()),
            }
        };
        let mut version = self.state.version.subscribe();
        if self.state.demand(&missing) {
            let deadline = tokio::time::sleep(DEMAND_TIMEOUT);
            tokio::pin!(deadline);
            loop {
                if let Ok(r) = self.state.table.load().resolve_request(host, path, facts) {
                    return Ok(routed(r));
                }
                tokio::select! {
                    changed = version.changed() => if changed.is_err() { break },
                    _ = &mut deadline => break,
                }
                // Still missing: a source may have answered that the name does not exist.
                if self
                    .state
                    .table
                    .load()
                    .resolve_request(host, path, facts)
                    .is_err()
                    && !self.state.demand(&missing)
                {
                    break;
                }
            }
        }
        Err(NoRoute::Service(&missing).to_string())
    }

    async fn forward(
        &self,
        upstream: &Arc<Upstream>,
        req: Request<InBody>,
        strip: usize,
        peer: &Peer,
        tried: &mut Tried,
        subset_header: Option<&SubsetHeader>,
    ) -> Result<Response<RespBody>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        let settings = upstream.settings();
        let runtime = &upstream.runtime;
        // The clock is read once for the first try: its deadline, the pick's `now_ms` and the
        // try's start (a read is ~90 instructions; callgrind, #13).
        let now = Instant::now();
        let deadline = now + settings.retry_timeout;
        let key = settings.balancer.key(&parts.headers, &parts.uri, peer.ip);
        if key == Some(None) {
            runtime.metrics.chash_fallback();
        }
        let ctx = || PickContext {
            key: key.flatten(),
            now_ms: clock::ms_at(now),
            panic: runtime.panic.load(Ordering::Relaxed),
            slow_start: settings.slow_start,
            rng: &runtime.rng,
        };
        // A header-driven subset: the header's value, when the request has one.
        let by_header = subset_header.and_then(|h| {
            let v = parts.headers.get(&h.header)?.to_str().ok()?;
            Some((&*h.key, v))
        });
        // Walked where it lies (a borrow, not a move of the iterator out of the `Result`).
        let mut picks = upstream.picks(by_header, ctx);
        let candidates = picks
            .as_mut()
            .map_err(|e| ProxyError::Unavailable(std::mem::take(&mut e.0)))?;
        let path_and_query = rewrite_path(&parts.uri, strip)?;
        let mut upgrade = Upgrade::take(&mut parts);
        prepare_request_headers(&mut parts.headers, peer);
        if let Some(u) = &upgrade {
            u.restore(&mut parts.headers);
        }
        runtime.retry_budget.deposit();
        // A body-less request, or one whose body fits the upstream's `retry_buffer`, may be
        // tried again; a larger body streams once (`replay.rs`).
        let has_body = !body.is_end_stream();
        let limit = settings.retry_buffer;
        let buffered =
            has_body && limit > 0 && body.size_hint().upper().is_none_or(|n| n <= limit as u64);
        let max_tries = if !has_body || buffered {
            1 + settings.retries
        } else {
            1
        };
        // Only a body that streams is watched for its own framing faults: a body-less request
        // (the common case) allocates nothing for it.
        let (mut body, body_fault, mut leftover) = if !has_body {
            (None, None, None)
        } else {
            let (body, fault) = ClientBody::new(body);
            if buffered {
                let (body, back) = ReplayBody::new(body, limit);
                (Some(Box::new(body)), Some(fault), Some(back))
            } else {
                (
                    Some(Box::new(ReplayBody::streaming(body))),
                    Some(fault),
                    None,
                )
            }
        };
        // A gRPC call's own deadline bounds every try (`grpc-timeout`).
        let grpc = grpc::is_call(&parts.method, &parts.headers);
        let deadline = match grpc.then(|| grpc::timeout(&parts.headers)).flatten() {
            Some(t) => deadline.min(now + t),
            None => deadline,
        };
        let feedback = upstream.feedback();
        let mut last = ProxyError::NoEndpoint;
        let mut last_response = None;
        // The place of the retry in flight (`max_retries`), held until the next try or the end.
        let mut _retry_slot: Option<Slot> = None;
        let mut to_send: Option<Request<ReqBody>> = None;
        for (attempt, ep) in (1..=max_tries).zip(candidates) {
            if attempt > 1 {
                if !runtime.retry_budget.withdraw() {
                    runtime.metrics.retry_budget_exhausted();
                    break;
                }
                _retry_slot = None;
                match runtime
                    .retries_in_flight
                    .enter(settings.breakers.max_retries)
                {
                    Some(slot) => _retry_slot = Some(slot),
                    None => {
                        runtime.metrics.overflow(Limit::Retries.name());
                        return match last_response {
                            Some(mut resp) => {
                                mark_overflow(&mut resp, Limit::Retries);
                                Ok(resp)
                            }
                            None => Err(ProxyError::Overflow(Limit::Retries)),
                        };
                    }
                }
                runtime.metrics.retry();
            }
            if has_body && body.is_none() {
                // The last try's body, given back by hyper when it dropped it; none when it
                // outgrew the buffer.
                let Some(back) = leftover.take() else { break };
                let wait = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(wait, back).await {
                    Ok(Ok(left)) => {
                        let (b, back) = left.replay(limit);
                        body = Some(Box::new(b));
                        leftover = Some(back);
                    }
                    _ => break,
                }
            }
            let now = if attempt == 1 { now } else { Instant::now() };
            let remaining = deadline.saturating_duration_since(now);
            if remaining.is_zero() {
                last = ProxyError::Timeout;
                break;
            }
            let last_try = attempt == max_tries;
            // Built in `to_send` and lent to `send`, which takes it when a connection does.
            let out = to_send.insert(Request::new(match body.take() {
                Some(b) => Either::Left(b),
                None => Either::Right(Empty::new()),
            }));
            *out.method_mut() = parts.method.clone();
            *out.uri_mut() = Uri::from(path_and_query.clone());
            // Moved, not cloned: `send` gives the head back for the next try (`keep_head`).
            *out.headers_mut() = std::mem::take(&mut parts.headers);
            let added_host = !out.headers().contains_key(header::HOST);
            if added_host {
                // HTTP/2 names the service in `:authority`; HTTP/1.0 may name none.
                let host = match parts.uri.authority() {
                    Some(a) => authority_header(a),
                    None => authority_header(&ep.authority),
                };
                out.headers_mut().insert(header::HOST, host);
            }
            let try_ = Attempt::start(ep, &feedback, now);
            tried.start(attempt, &ep.authority);
            let timeout = remaining.min(settings.read_timeout);
            let admission = pool::Admission {
                max_connections: settings.breakers.max_connections,
                max_pending: settings.breakers.max_pending,
                pending: Some(&runtime.pending),
            };
            let result = send(
                ep,
                settings.protocol,
                upstream.tls_for(ep),
                &mut to_send,
                settings.connect_timeout,
                timeout,
                admission,
                upgrade.is_some(),
                !last_try,
            )
            .await;
            // The head comes back for the next try (a `Host` added for this endpoint goes);
            // what the send left of the body is dropped now: a replayable body comes back
            // through `leftover` only once it is dropped.
            if let Some(left) = to_send.take().filter(|_| !last_try) {
                parts.headers = left.into_parts().0.headers;
                if added_host {
                    parts.headers.remove(header::HOST);
                }
            }
            match result {
                Ok((resp, conn)) => {
                    tried.answered();
                    let status = resp.status().as_u16();
                    let outcome = if let Some(d) = retry::backoff(
                        status,
                        resp.headers(),
                        settings.max_retry_after,
                        std::time::SystemTime::now,
                    ) {
                        Outcome::Backoff(d)
                    } else if settings.passive.failed_status(status) {
                        if matches!(status, 502..=504) {
                            Outcome::GatewayFailure
                        } else {
                            Outcome::Failure
                        }
                    } else if grpc
                        && grpc::status(resp.headers())
                            .is_some_and(|c| settings.passive.failed_grpc_status(c))
                    {
                        // A trailers-only gRPC answer carries its status in the head.
                        Outcome::Failure
                    } else {
                        Outcome::Success
                    };
                    // Only hyper's connections (dialled for an upgrade) hand over a socket.
                    let resp = match (status, upgrade.take(), resp.into_parts()) {
                        (101, Some(u), (parts, pool::Body::Hyper(body))) => {
                            // The connection is the tunnel's now; the tunnel holds the count.
                            drop(conn);
                            if tried.on {
                                tried.tunnel = Some(Arc::default());
                            }
                            let mut parts = u.join(
                                Response::from_parts(parts, body),
                                try_.finish(outcome),
                                &self.tunnels,
                                &upstream.id,
                                tried.tunnel.clone(),
                            );
                            remove_hop_by_hop_but_upgrade(&mut parts.headers);
                            return Ok(Response::from_parts(
                                parts,
                                Either::Right(Full::new(Bytes::new())),
                            ));
                        }
                        (_, u, (parts, body)) => {
                            upgrade = u;
                            Response::from_parts(parts, body)
                        }
                    };
                    // A gRPC call that began well gets its status in the trailers, after the
                    // messages: the body records the try when they come (`GrpcOutcome`).
                    let resp =
                        if grpc && outcome == Outcome::Success && !resp.body().is_end_stream() {
                            let (in_flight, deferred) = try_.defer();
                            let pending = GrpcOutcome {
                                deferred,
                                upstream: Arc::clone(upstream),
                            };
                            into_client_response(resp, conn, in_flight, Some(pending))
                        } else {
                            into_client_response(resp, conn, try_.finish(outcome), None)
                        };
                    // A server error on an idempotent request is worth another endpoint.
                    if !last_try && retry::retry_status(status, &parts.method) {
                        tracing::debug!(upstream = %upstream.id, endpoint = %ep.authority, status, attempt, "retrying after gateway error");
                        match settled(resp, deadline).await {
                            Ok(resp) => last_response = Some(resp),
                            Err(e) => {
                                last_response = None;
                                last = e;
                            }
                        }
                        continue;
                    }
                    return Ok(resp);
                }
                Err(e) => {
                    if let Some(e) = body_fault.as_ref().and_then(client_fault) {
                        // The client's body broke, not the endpoint: nothing is recorded
                        // against it (the dropped attempt only releases its count).
                        drop(try_);
                        return Err(e);
                    }
                    if let ProxyError::Overflow(_) = e {
                        // A circuit breaker, not the endpoint: nothing recorded, no retry.
                        drop(try_);
                        return Err(e);
                    }
                    drop(try_.finish(Outcome::GatewayFailure));
                    if let Some(kind) = e.upstream_kind() {
                        runtime.metrics.upstream_error(kind);
                    }
                    tracing::debug!(upstream = %upstream.id, endpoint = %ep.authority, error = %crate::error::chain(&e), attempt, "upstream attempt failed");
                    let retry = retry::may_retry(&e, &parts.method);
                    last = e;
                    if !retry {
                        break;
                    }
                }
            }
        }
        match last_response {
            Some(resp) => Ok(resp),
            None => Err(last),
        }
    }
}

/// Sends `req` to `ep` on its pool, waiting at most `timeout` for the response head: the
/// HTTP/1 pool or the HTTP/2 one (`h2pool.rs`), as the upstream's `protocol` (else the
/// registry's) says. With `keep_head`, the request's head is left in `req` for another try:
/// the HTTP/1 pool writes it from where it lies; hyper's paths (HTTP/2, `Upgrade`) take the
/// request whole, so they are given a copy and the head stays.
#[allow(clippy::too_many_arguments)]
async fn send(
    ep: &Endpoint,
    protocol: Option<UpstreamProtocol>,
    tls: Option<&ClientTls>,
    req: &mut Option<Request<ReqBody>>,
    connect_timeout: Duration,
    timeout: Duration,
    admission: pool::Admission<'_>,
    upgrade: bool,
    keep_head: bool,
) -> Result<(Response<pool::Body>, Option<Held>), ProxyError> {
    let protocol = protocol.or(ep.protocol).unwrap_or(UpstreamProtocol::Http1);
    let h2 = match protocol {
        UpstreamProtocol::Http1 => false,
        UpstreamProtocol::H2c | UpstreamProtocol::H2 => true,
        UpstreamProtocol::Auto => match tls {
            Some(_) => !ep.state.h2.alpn_http1.load(Ordering::Relaxed),
            None => req
                .as_ref()
                .is_some_and(|r| grpc::is_call(r.method(), r.headers())),
        },
    };
    // hyper's paths take the request whole: they get a copy of it, and the head stays.
    let kept = match req.as_mut() {
        Some(r) if keep_head && (h2 || upgrade) => {
            let mut copy =
                Request::new(std::mem::replace(r.body_mut(), Either::Right(Empty::new())));
            *copy.method_mut() = r.method().clone();
            *copy.uri_mut() = r.uri().clone();
            *copy.version_mut() = r.version();
            *copy.headers_mut() = r.headers().clone();
            req.replace(copy)
        }
        _ => None,
    };
    let result = {
        // Pinned where it is built: `timeout` then holds a pointer, not a copy of the whole send
        // (~1 KB moved twice a request; callgrind, #13).
        tokio::pin! {
            let sent = async {
                if h2 {
                    let tls = if protocol == UpstreamProtocol::H2c {
                        None
                    } else {
                        tls
                    };
                    let auto = protocol == UpstreamProtocol::Auto;
                    match ep
                        .state
                        .h2
                        .send(&ep.authority, tls, req, connect_timeout, auto)
                        .await?
                    {
                        Negotiated::H2(resp, stream) => {
                            return Ok((resp.map(pool::Body::Hyper), Some(Held::H2(stream))))
                        }
                        Negotiated::Http1 => {}
                    }
                }
                let (resp, conn) = ep
                    .state
                    .pool
                    .send(&ep.authority, tls, req, connect_timeout, admission, upgrade)
                    .await?;
                Ok((resp, conn.map(Held::H1)))
            };
        }
        match tokio::time::timeout(timeout, sent).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::Timeout),
        }
    };
    if kept.is_some() {
        *req = kept;
    }
    result
}

/// What a response body holds of its connection beside the body itself: a hyper HTTP/1
/// connection dialled for an upgrade (closed with the body unless it became a tunnel), or a
/// stream of an HTTP/2 connection (counted until then). The pool's own connections are in
/// the body (`pool::Body::Own`) and go back to the pool when it ends.
pub enum Held {
    H1(pool::Conn),
    H2(Stream),
}

/// The upstream's response as the client gets it: hop-by-hop headers removed, the body holding
/// the endpoint's in-flight count and its connection.
fn into_client_response(
    resp: Response<pool::Body>,
    conn: Option<Held>,
    in_flight: InFlight,
    grpc: Option<GrpcOutcome>,
) -> Response<RespBody> {
    let (mut parts, body) = resp.into_parts();
    let found = scan_names(&parts.headers);
    if found & TRANSFER_ENCODING_BIT != 0 {
        // The body was framed by Transfer-Encoding; a Content-Length beside it is wrong
        // (RFC 9112 §6.3) and the client's framing is hyper's to choose.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(&mut parts.headers, found);
    Response::from_parts(
        parts,
        Either::Left(UpstreamBody {
            inner: body,
            _held: conn,
            in_flight,
            slot: None,
            grpc,
        }),
    )
}

/// An error answer about to be retried, read to its end when that is cheap (a known length of
/// at most [`RETRY_BODY_LIMIT`], within the request's deadline), so its connection returns to
/// the pool and its in-flight count ends now rather than after the next try. Any other answer
/// is kept as it is (its connection is then closed if it is not the one the client gets).
async fn settled(
    resp: Response<RespBody>,
    deadline: Instant,
) -> Result<Response<RespBody>, ProxyError> {
    let small = resp
        .body()
        .size_hint()
        .upper()
        .is_some_and(|n| n <= RETRY_BODY_LIMIT as u64);
    if !small {
        return Ok(resp);
    }
    let (parts, body) = resp.into_parts();
    let body = match body {
        Either::Left(upstream) => upstream,
        other => return Ok(Response::from_parts(parts, other)),
    };
    let read = tokio::time::timeout_at(deadline.into(), body.collect()).await;
    match read {
        Ok(Ok(collected)) => Ok(Response::from_parts(
            parts,
            Either::Right(Full::new(collected.to_bytes())),
        )),
        Ok(Err(source)) => Err(ProxyError::Upstream {
            sent: Sent::Maybe,
            source,
        }),
        Err(_) => Err(ProxyError::Timeout),
    }
}

/// The upstream's response body; holds the endpoint's in-flight count until the body is done
/// or dropped, and gives the connection back to the endpoint's pool if the body was read to
/// the end (a body dropped half-read leaves the connection unusable: it is closed).
pub struct UpstreamBody {
    inner: pool::Body,
    /// Held until the body is dropped: an HTTP/2 stream, or hyper's connection of an upgrade.
    _held: Option<Held>,
    in_flight: InFlight,
    /// The request's place under the upstream's `max_requests`.
    slot: Option<Slot>,
    /// A gRPC call whose try is recorded when its trailers come.
    grpc: Option<GrpcOutcome>,
}

/// The try of a gRPC call that answered with messages, waiting for its `grpc-status` in the
/// trailers to be recorded (a status the upstream's `failure_grpc_statuses` names is a failure,
/// as in a trailers-only answer). The body looks at each frame only to find the trailers: no
/// lock, no allocation, nothing buffered. A body that breaks is a failure; one that ends without
/// trailers, a success (the endpoint answered); one dropped unfinished records nothing.
struct GrpcOutcome {
    deferred: Deferred,
    upstream: Arc<Upstream>,
}

impl GrpcOutcome {
    fn record(self, in_flight: &InFlight, trailers: Option<&HeaderMap>, broken: bool) {
        let passive = &self.upstream.settings().passive;
        let failed = broken
            || trailers
                .and_then(grpc::status)
                .is_some_and(|c| passive.failed_grpc_status(c));
        let outcome = if failed {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        self.deferred
            .finish(in_flight, outcome, &self.upstream.feedback());
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            if let Some(g) = self.grpc.take() {
                g.record(&self.in_flight, None, false);
            }
            if let Some(conn) = self.inner.reusable() {
                self.in_flight.state().pool.put(conn);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if this.grpc.is_some() {
            let (trailers, broken) = match &polled {
                Poll::Ready(Some(Ok(frame))) => match frame.trailers_ref() {
                    Some(t) => (Some(t), false),
                    None => return polled,
                },
                Poll::Ready(Some(Err(_))) => (None, true),
                Poll::Ready(None) => (None, false),
                Poll::Pending => return polled,
            };
            if let Some(g) = this.grpc.take() {
                g.record(&this.in_flight, trailers, broken);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A `Host` header for a request that came without one: the HTTP/2 `:authority`, or the
/// endpoint (HTTP/1.0).
fn authority_header(a: &http::uri::Authority) -> HeaderValue {
    HeaderValue::from_str(a.as_str()).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// The path (and query) to send: the request's, less `strip` leading bytes of the path.
fn rewrite_path(uri: &Uri, strip: usize) -> Result<PathAndQuery, ProxyError> {
    let pq = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if strip == 0 {
        return Ok(pq);
    }
    let rest = &uri.path()[strip.min(uri.path().len())..];
    let mut s = String::with_capacity(rest.len() + pq.query().map_or(0, |q| q.len() + 2));
    if !rest.starts_with('/') {
        s.push('/');
    }
    s.push_str(rest);
    if let Some(q) = pq.query() {
        s.push('?');
        s.push_str(q);
    }
    PathAndQuery::try_from(s).map_err(|_| ProxyError::BadRequest("invalid path"))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) that a proxy must not forward.
const HOP_BY_HOP_NAMES: usize = 8;
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_NAMES] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// As [`remove_hop_by_hop`], keeping `Connection: upgrade` and `Upgrade` (a `101` answer).
fn remove_hop_by_hop_but_upgrade(headers: &mut HeaderMap) {
    let (c, u) = (
        headers.remove(header::CONNECTION),
        headers.remove(header::UPGRADE),
    );
    remove_hop_by_hop(headers);
    if let (Some(c), Some(u)) = (c, u) {
        headers.insert(header::CONNECTION, c);
        headers.insert(header::UPGRADE, u);
    }
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let found = scan_names(headers);
    strip_hop_by_hop(headers, found);
}

/// Bits of [`scan_names`] past the [`HOP_BY_HOP`] names.
const TRANSFER_ENCODING_BIT: u16 = 1 << HOP_BY_HOP_NAMES;
const X_FORWARDED_FOR_BIT: u16 = TRANSFER_ENCODING_BIT << 1;
const X_FORWARDED_PROTO_BIT: u16 = TRANSFER_ENCODING_BIT << 2;
/// A `Connection` value names a header to remove (a token other than `keep-alive`/`close`).
const CONNECTION_NAMES_BIT: u16 = TRANSFER_ENCODING_BIT << 3;
const HOP_BY_HOP_BITS: u16 = (TRANSFER_ENCODING_BIT << 1) - 1;

/// One pass over the headers finds what is there: bit `i` for `HOP_BY_HOP[i]`, then
/// `Transfer-Encoding`, `X-Forwarded-For`, `X-Forwarded-Proto`, and whether a `Connection`
/// value names a header. A lookup per name (a hash each) cost more than the rest of the
/// header handling together (callgrind, #8, #13).
fn scan_names(headers: &HeaderMap) -> u16 {
    let mut found = 0u16;
    for (name, value) in headers {
        let bit = name_bit(name);
        found |= bit;
        if bit == 1 && !names_only_keep_alive(value) {
            found |= CONNECTION_NAMES_BIT;
        }
    }
    found
}

/// [`scan_names`]'s bit for one name: the name's length first (most names have none of the
/// lengths below), then one compare; comparing with each of eleven `HeaderName`s, or a string
/// `match` (an arm after another), cost ~80 instructions a header (callgrind, #13). The order
/// is [`HOP_BY_HOP`]'s (a test checks it).
fn name_bit(name: &HeaderName) -> u16 {
    let s = name.as_str();
    let is = |bit: u16, text: &str| if s == text { bit } else { 0 };
    match s.len() {
        2 => is(1 << 5, "te"),
        7 => is(1 << 6, "trailer") | is(1 << 7, "upgrade"),
        10 => is(1, "connection") | is(1 << 1, "keep-alive"),
        15 => is(X_FORWARDED_FOR_BIT, "x-forwarded-for"),
        16 => is(1 << 2, "proxy-connection"),
        // hyper frames bodies itself.
        17 => {
            is(TRANSFER_ENCODING_BIT, "transfer-encoding")
                | is(X_FORWARDED_PROTO_BIT, "x-forwarded-proto")
        }
        18 => is(1 << 3, "proxy-authenticate"),
        19 => is(1 << 4, "proxy-authorization"),
        _ => 0,
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap, found: u16) {
    let present = found & HOP_BY_HOP_BITS;
    if present == 0 {
        return;
    }
    // Headers named in Connection (bit 0: HOP_BY_HOP[0]) are hop-by-hop too (`keep-alive`
    // and `close` name none beyond the list).
    // `Connection: keep-alive` (most responses) names nothing to remove: the scan's byte
    // check says so without the iterator chain below (~450 instructions a response, #15).
    if found & CONNECTION_NAMES_BIT != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
            .filter_map(|t| HeaderName::try_from(t).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for (i, h) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(h);
        }
    }
    if present & TRANSFER_ENCODING_BIT != 0 {
        headers.remove(header::TRANSFER_ENCODING);
    }
}

/// Whether every token of a `Connection` value is `keep-alive` or `close` (which name no
/// header).
fn names_only_keep_alive(value: &HeaderValue) -> bool {
    value.as_bytes().split(|&b| b == b',').all(|t| {
        let t = t.trim_ascii();
        t.is_empty() || t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close")
    })
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

fn prepare_request_headers(headers: &mut HeaderMap, peer: &Peer) {
    let found = scan_names(headers);
    strip_hop_by_hop(headers, found);
    // Looked up only when the scan saw it (it may have gone since: `Connection` can name it).
    match (found & X_FORWARDED_FOR_BIT != 0)
        .then(|| headers.get(&X_FORWARDED_FOR))
        .flatten()
    {
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + peer.ip_header.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(peer.ip_header.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                headers.insert(&X_FORWARDED_FOR, v);
            }
        }
        None => {
            headers.insert(&X_FORWARDED_FOR, peer.ip_header.clone());
        }
    }
    if found & X_FORWARDED_PROTO_BIT == 0 || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
}

/// The error response for `e`; a refused framing also closes the connection, since the
/// client's idea of where the next request starts cannot be trusted. A gRPC call's upstream
/// errors are gRPC-shaped (`grpc.rs`).
fn refusal(e: &ProxyError, upstream: &str, protocol: m::Protocol) -> Response<RespBody> {
    if protocol == m::Protocol::Grpc {
        let code = match e {
            ProxyError::Timeout => Some(grpc::DEADLINE_EXCEEDED),
            ProxyError::NoEndpoint | ProxyError::Connect { .. } | ProxyError::Upstream { .. } => {
                Some(grpc::UNAVAILABLE)
            }
            _ => None,
        };
        if let Some(code) = code {
            return grpc_error(code, &e.body(upstream));
        }
        if let ProxyError::Overflow(limit) = e {
            let mut resp = grpc_error(grpc::UNAVAILABLE, &e.body(upstream));
            mark_overflow(&mut resp, *limit);
            return resp;
        }
    }
    let mut resp = text(e.status(), e.body(upstream));
    match e {
        ProxyError::Framing(_) => {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        ProxyError::Overflow(limit) => mark_overflow(&mut resp, *limit),
        _ => {}
    }
    resp
}

/// A gRPC trailers-only error answer: HTTP 200, no body, `grpc-status` and `grpc-message`.
fn grpc_error(code: u16, message: &str) -> Response<RespBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
    *resp.headers_mut() = grpc::error_headers(code, message);
    resp
}

/// The client side's protocol, for the `protocol` metric label.
fn client_protocol<B>(req: &Request<B>) -> m::Protocol {
    if tunnel::is_upgrade(req.version(), req.headers()) {
        m::Protocol::Websocket
    } else if grpc::is_call(req.method(), req.headers()) {
        m::Protocol::Grpc
    } else if req.version() == http::Version::HTTP_2 {
        m::Protocol::H2
    } else {
        m::Protocol::Http1
    }
}

/// Names the circuit breaker a response ran into: `x-edge-agent-overflow: <limit>`.
fn mark_overflow(resp: &mut Response<RespBody>, limit: Limit) {
    resp.headers_mut().insert(
        HeaderName::from_static("x-edge-agent-overflow"),
        HeaderValue::from_static(limit.name()),
    );
}

/// The client error behind a failed exchange, when the client's body stream failed.
fn client_fault(fault: &BodyFault) -> Option<ProxyError> {
    let why = fault.get()?;
    Some(FramingError::MalformedBody(why.to_string()).into())
}

/// A short plain-text response.
pub fn text(status: StatusCode, body: String) -> Response<RespBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_prefix_and_keeps_query() {
        let uri: Uri = "/hello/a/b?x=1".parse().unwrap();
        assert_eq!(rewrite_path(&uri, 6).unwrap().as_str(), "/a/b?x=1");
        let uri: Uri = "/hello?x=1".parse().unwrap();
        assert_eq!(rewrite_path(&uri, 6).unwrap().as_str(), "/?x=1");
        let uri: Uri = "/hello/".parse().unwrap();
        assert_eq!(rewrite_path(&uri, 6).unwrap().as_str(), "/");
        let uri: Uri = "/x".parse().unwrap();
        assert_eq!(rewrite_path(&uri, 0).unwrap().as_str(), "/x");
    }

    #[test]
    fn forwarded_headers_named_in_connection_are_replaced_not_kept() {
        let peer = Peer::new("127.0.0.1:5".parse().unwrap());
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-forwarded-for, x-forwarded-proto"),
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        prepare_request_headers(&mut h, &peer);
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        prepare_request_headers(&mut h, &peer);
        assert_eq!(h["x-forwarded-proto"], "https", "a client's own is kept");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    }

    #[test]
    fn hop_by_hop_and_forwarded_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        prepare_request_headers(&mut h, &Peer::new("127.0.0.1:5".parse().unwrap()));
        assert!(h.get("x-private").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn name_bits_follow_the_hop_by_hop_list() {
        for (i, h) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(name_bit(h), 1 << i, "{h}");
        }
        assert_eq!(name_bit(&header::TRANSFER_ENCODING), TRANSFER_ENCODING_BIT);
        assert_eq!(name_bit(&X_FORWARDED_FOR), X_FORWARDED_FOR_BIT);
        assert_eq!(name_bit(&X_FORWARDED_PROTO), X_FORWARDED_PROTO_BIT);
        assert_eq!(name_bit(&header::CONTENT_LENGTH), 0);
    }

    /// `Connection: keep-alive` alone names nothing; a name on any other `Connection` line, or
    /// after `keep-alive` on the same one, is still removed.
    #[test]
    fn connection_keep_alive_and_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static(" Keep-Alive ,"),
        );
        h.insert("x-a", HeaderValue::from_static("1"));
        assert_eq!(scan_names(&h) & CONNECTION_NAMES_BIT, 0);
        remove_hop_by_hop(&mut h);
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h["x-a"], "1");
        for lines in [&["keep-alive, x-a"][..], &["keep-alive", "x-a"]] {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append(header::CONNECTION, HeaderValue::from_static(l));
            }
            h.insert("x-a", HeaderValue::from_static("1"));
            h.insert("x-b", HeaderValue::from_static("2"));
            assert_ne!(scan_names(&h) & CONNECTION_NAMES_BIT, 0, "{lines:?}");
            remove_hop_by_hop(&mut h);
            assert!(h.get("x-a").is_none(), "{lines:?}");
            assert_eq!(h["x-b"], "2");
        }
    }
}
