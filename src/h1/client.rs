//! An HTTP/1.1 client connection of the agent's own, in place of hyper's (#15 step 2).
//!
//! hyper's client runs each upstream connection as a task of its own and hands every request
//! to it through a channel; the request's task then waits on a oneshot for the answer. In the
//! bench profile that task, its dispatch and hyper's response parse into a `HeaderMap` were 40 %
//! of the agent's instructions per request. Here the request's own task drives the connection:
//! [`send`] writes the head (and the body, while it waits for the answer), parses the answer's
//! head in place ([`ResponseHead`]), and the response [`Body`] reads the rest from the same
//! socket and hands the connection back when it ends ([`Body::reusable`]). Nothing is spawned,
//! nothing crosses a channel, and the buffers live with the connection.
//!
//! What it keeps of hyper's client: the response framing of RFC 9112 §6.3 (`head.rs`), 1xx
//! answers skipped before the final one, a chunked body checked as it passes (`chunked.rs`), a
//! request body written while the answer is awaited (an early answer is read, not deadlocked),
//! and a connection used again only when both bodies ended cleanly, the answer allowed it and
//! nothing unasked was sent after it. What it leaves to hyper: `Upgrade` (the pool dials a
//! hyper connection for those, `pool.rs`), and chunked trailers (dropped; HTTP/1 trailers carry
//! nothing the agent or its clients read).
//!
//! Generic over the socket, so this leaf knows nothing of dialling or TLS.
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use atomic_waker::AtomicWaker;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::BoxError;

use super::chunked::Decoder;
use super::head::{Kind, Parse, ResponseBody, ResponseHead, Version};

/// Read buffer growth: reserved when less than [`READ_SPARE`] is free.
const READ_CHUNK: usize = 8 * 1024;
const READ_SPARE: usize = 1024;

/// Closes a connection from outside (an endpoint's drain ran out of time): every read or write
/// of the connection that waits sees it and fails.
#[derive(Debug, Default)]
pub struct Kill {
    fired: AtomicBool,
    waker: AtomicWaker,
}

impl Kill {
    pub fn new() -> Arc<Kill> {
        Arc::default()
    }

    pub fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.waker.wake();
    }

    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

/// One connection to an upstream: its socket, its buffers, and the caller's `tag` (what the
/// pool keeps with it: its TLS setup, its place under `max_connections`).
pub struct Conn<T, X> {
    io: T,
    read: BytesMut,
    out: Vec<u8>,
    /// Bytes of `out` written so far.
    out_pos: usize,
    head: ResponseHead,
    kill: Option<Arc<Kill>>,
    pub tag: X,
}

/// A failed exchange: why, and whether any byte of the request went out (if none, it may be
/// sent anywhere, whatever its method).
#[derive(Debug)]
pub struct Failure {
    pub written: bool,
    pub source: BoxError,
}

impl<T: AsyncRead + AsyncWrite + Unpin, X> Conn<T, X> {
    pub fn new(io: T, kill: Option<Arc<Kill>>, tag: X) -> Box<Self> {
        Box::new(Conn {
            io,
            read: BytesMut::new(),
            out: Vec::new(),
            out_pos: 0,
            head: ResponseHead::default(),
            kill,
            tag,
        })
    }

    /// Whether an idle connection can no longer carry a request: the upstream closed it (or
    /// sent something nobody asked for), or it was killed. Looks without waiting: a read that
    /// would wait means the connection is alive.
    pub fn is_closed(&mut self) -> bool {
        if self.kill.as_ref().is_some_and(|k| k.is_fired()) {
            return true;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        !Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    }

    /// A wait is about to be returned: leave the waker with the kill switch, and fail if it
    /// has fired.
    fn killed(&self, cx: &Context<'_>) -> bool {
        match &self.kill {
            Some(k) => {
                k.waker.register(cx.waker());
                k.is_fired()
            }
            None => false,
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, BoxError>> {
        if self.read.capacity() - self.read.len() < READ_SPARE {
            self.read.reserve(READ_CHUNK);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read) {
            Poll::Ready(r) => Poll::Ready(r.map_err(Into::into)),
            Poll::Pending if self.killed(cx) => Poll::Ready(Err(killed())),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Writes what is in `out`; `written` is set once a byte has gone out.
    fn poll_write_out(
        &mut self,
        cx: &mut Context<'_>,
        written: &mut bool,
    ) -> Poll<Result<(), BoxError>> {
        while self.out_pos < self.out.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_pos..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err("the upstream stopped reading the request".into()))
                }
                Poll::Ready(Ok(n)) => {
                    self.out_pos += n;
                    *written = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending if self.killed(cx) => return Poll::Ready(Err(killed())),
                Poll::Pending => return Poll::Pending,
            }
        }
        match Pin::new(&mut self.io).poll_flush(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            Poll::Pending if self.killed(cx) => return Poll::Ready(Err(killed())),
            Poll::Pending => return Poll::Pending,
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads until a final answer's head is whole (1xx answers before it are skipped); its
    /// length.
    fn poll_head(&mut self, cx: &mut Context<'_>, to_head: bool) -> Poll<Result<usize, BoxError>> {
        loop {
            if !self.read.is_empty() {
                match self.head.parse(&self.read, to_head) {
                    Ok(Parse::Complete(n)) if self.head.is_interim() => {
                        self.read.advance(n);
                        continue;
                    }
                    Ok(Parse::Complete(n)) => return Poll::Ready(Ok(n)),
                    Ok(Parse::Partial) => {}
                    Err(e) => return Poll::Ready(Err(e.into())),
                }
            }
            if ready!(self.poll_fill(cx))? == 0 {
                let why = if self.read.is_empty() {
                    "the upstream closed the connection before answering"
                } else {
                    "the upstream closed the connection in the middle of the response head"
                };
                return Poll::Ready(Err(why.into()));
            }
        }
    }
}

fn killed() -> BoxError {
    "the connection was closed: its endpoint's drain ran out of time".into()
}

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `Content-Length`: this many bytes still to send.
    Length(u64),
    Chunked,
}

/// A request body still being sent.
struct Outgoing<B> {
    body: B,
    framing: Framing,
    done: bool,
    written: bool,
    /// Writing to the connection failed (not the body: the client's).
    io_failed: bool,
}

/// Sends what is left of the request body; ready when it is all written.
fn poll_send_body<T, X, B>(
    conn: &mut Conn<T, X>,
    out: &mut Outgoing<B>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), BoxError>>
where
    T: AsyncRead + AsyncWrite + Unpin,
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    loop {
        if !conn.out.is_empty() {
            if let Err(e) = ready!(conn.poll_write_out(cx, &mut out.written)) {
                out.io_failed = true;
                return Poll::Ready(Err(e));
            }
        }
        if out.done {
            return Poll::Ready(Ok(()));
        }
        match ready!(Pin::new(&mut out.body).poll_frame(cx)) {
            Some(Ok(frame)) => {
                // Trailers of a request are not forwarded (see the module's note).
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                match &mut out.framing {
                    Framing::Length(left) => {
                        if data.len() as u64 > *left {
                            return Poll::Ready(Err(
                                "the request body is longer than its Content-Length".into(),
                            ));
                        }
                        *left -= data.len() as u64;
                    }
                    Framing::Chunked => {
                        push_hex(&mut conn.out, data.len());
                        conn.out.extend_from_slice(b"\r\n");
                    }
                }
                conn.out.extend_from_slice(&data);
                if out.framing == Framing::Chunked {
                    conn.out.extend_from_slice(b"\r\n");
                }
            }
            Some(Err(e)) => return Poll::Ready(Err(e.into())),
            None => {
                match out.framing {
                    Framing::Chunked => conn.out.extend_from_slice(b"0\r\n\r\n"),
                    Framing::Length(0) => {}
                    Framing::Length(_) => {
                        return Poll::Ready(Err(
                            "the request body is shorter than its Content-Length".into(),
                        ))
                    }
                }
                out.done = true;
            }
        }
    }
}

/// Appends `n` in hex (a chunk-size line).
pub(super) fn push_hex(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Writes the request line and headers into `out`; the body's framing when it has one: its
/// `Content-Length` as given, else chunked (hyper's server has checked the client's framing,
/// and `Transfer-Encoding`, hop-by-hop, was removed).
fn encode_head<Y>(out: &mut Vec<u8>, head: &Request<Y>, has_body: bool) -> Option<Framing> {
    out.extend_from_slice(head.method().as_str().as_bytes());
    out.push(b' ');
    let target = head.uri().path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut length = None;
    for (name, value) in head.headers() {
        if name == CONTENT_LENGTH {
            match std::str::from_utf8(value.as_bytes())
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                // One length (hyper's server refused differing ones); a body-less request
                // keeps its `Content-Length: 0`.
                Some(n) if length.is_none() => length = Some(n),
                _ => continue,
            }
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let framing = match (has_body, length) {
        (false, _) => None,
        (true, Some(n)) => Some(Framing::Length(n)),
        (true, None) => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Some(Framing::Chunked)
        }
    };
    out.extend_from_slice(b"\r\n");
    framing
}

/// Sends `req` on `conn` and waits for the final answer's head. The response's body owns the
/// connection; see [`Body::reusable`].
///
/// The request's head is read from `head` (its body is not looked at) and written before this
/// returns its future, so the caller keeps the head: a try that may be retried lends it rather
/// than cloning it first (#15).
pub fn send<T, X, B, Y>(
    mut conn: Box<Conn<T, X>>,
    head: &Request<Y>,
    body: B,
) -> impl std::future::Future<Output = Result<Response<Body<T, X, B>>, Failure>>
where
    T: AsyncRead + AsyncWrite + Unpin,
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let to_head = head.method() == Method::HEAD;
    conn.out.clear();
    conn.out_pos = 0;
    conn.read.clear();
    let has_body = !body.is_end_stream();
    let framing = encode_head(&mut conn.out, head, has_body);
    exchange(conn, body, framing, to_head)
}

async fn exchange<T, X, B>(
    mut conn: Box<Conn<T, X>>,
    body: B,
    framing: Option<Framing>,
    to_head: bool,
) -> Result<Response<Body<T, X, B>>, Failure>
where
    T: AsyncRead + AsyncWrite + Unpin,
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut outgoing = framing.map(|framing| Outgoing {
        body,
        framing,
        done: false,
        written: false,
        io_failed: false,
    });
    let mut written = false;
    // The request could not be written whole, but an answer came: it is read, and the
    // connection closed after it (an upstream refusing a body, 413, may close before reading
    // it).
    let mut cut = false;
    let head = poll_fn(|cx| {
        // The head and the body go out while the answer is awaited: an upstream may answer
        // before it has read the whole body.
        let sending = match &mut outgoing {
            Some(o) if !o.done => {
                let r = poll_send_body(&mut conn, o, cx);
                written |= o.written;
                r
            }
            Some(_) => Poll::Ready(Ok(())),
            None if !conn.out.is_empty() => conn.poll_write_out(cx, &mut written),
            None => Poll::Ready(Ok(())),
        };
        if let Poll::Ready(Err(e)) = sending {
            let io = outgoing.as_ref().is_none_or(|o| o.io_failed);
            if let (true, Poll::Ready(Ok(n))) = (io, conn.poll_head(cx, to_head)) {
                cut = true;
                return Poll::Ready(Ok(n));
            }
            return Poll::Ready(Err(e));
        }
        conn.poll_head(cx, to_head)
    })
    .await;
    let fail = |source: BoxError| Failure { written, source };
    let n = head.map_err(fail)?;
    let head_bytes = conn.read.split_to(n).freeze();
    let h = &conn.head;
    if h.status == 101 {
        return Err(fail(
            "101 Switching Protocols to a request that asked for no upgrade".into(),
        ));
    }
    let status = StatusCode::from_u16(h.status).map_err(|e| fail(e.into()))?;
    // A `Content-Length` beside `Transfer-Encoding` is wrong (RFC 9112 §6.3): not passed on.
    let te = !matches!(h.body, ResponseBody::Length(_))
        && h.headers().iter().any(|f| f.kind == Kind::TransferEncoding);
    let mut headers = HeaderMap::with_capacity(h.headers().len());
    for f in h.headers() {
        // Hop-by-hop headers are this hop's: not passed on (`proxy.rs` strips them from
        // hyper's answers; here they are never made).
        if f.kind.is_hop_by_hop() || (te && f.kind == Kind::ContentLength) {
            continue;
        }
        let name = f.name.of(&head_bytes);
        if h.named_in_connection(&head_bytes, name) {
            continue;
        }
        let value = head_bytes.slice(f.value.range());
        let name = match f.kind.header_name() {
            Some(known) => Ok(known),
            None => HeaderName::from_bytes(name),
        };
        match (name, HeaderValue::from_maybe_shared(value)) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => return Err(fail("a response header that is not one".into())),
        }
    }
    let left = match h.body {
        ResponseBody::None | ResponseBody::Length(0) => Left::Done,
        ResponseBody::Length(n) => Left::Length(n),
        ResponseBody::Chunked => Left::Chunked(Decoder::new()),
        ResponseBody::UntilClose => Left::UntilClose,
    };
    let keep_alive = h.keep_alive && !cut;
    if cut {
        outgoing = None;
    }
    let version = match h.version {
        Version::Http10 => http::Version::HTTP_10,
        Version::Http11 => http::Version::HTTP_11,
    };
    let mut resp = Response::new(Body {
        conn: Some(conn),
        left,
        keep_alive,
        outgoing,
    });
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = headers;
    Ok(resp)
}

/// What is left of a response body.
#[derive(Debug)]
enum Left {
    Done,
    Length(u64),
    Chunked(Decoder),
    UntilClose,
}

/// A response body read from its connection, which it holds until the body ends (and after,
/// until [`Body::reusable`] takes it back or the body is dropped, which closes it).
pub struct Body<T, X, B> {
    conn: Option<Box<Conn<T, X>>>,
    left: Left,
    keep_alive: bool,
    /// The request body, while it is still being sent.
    outgoing: Option<Outgoing<B>>,
}

impl<T, X, B> std::fmt::Debug for Body<T, X, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("left", &self.left)
            .field("keep_alive", &self.keep_alive)
            .finish_non_exhaustive()
    }
}

impl<T, X, B> Body<T, X, B> {
    /// The connection, if the exchange ended so that it can carry another: the whole answer
    /// read, the whole request sent, the upstream allows it and sent nothing more.
    pub fn reusable(&mut self) -> Option<Box<Conn<T, X>>> {
        let ended = matches!(self.left, Left::Done | Left::Length(0));
        let sent = self.outgoing.as_ref().is_none_or(|o| o.done);
        if !(ended && sent && self.keep_alive) {
            return None;
        }
        let conn = self.conn.take()?;
        (conn.read.is_empty() && conn.out.is_empty()).then_some(conn)
    }

    /// The body broke: its connection is not used again.
    fn fail(&mut self, e: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        self.left = Left::Done;
        Poll::Ready(Some(Err(e)))
    }
}

impl<T, X, B> HttpBody for Body<T, X, B>
where
    T: AsyncRead + AsyncWrite + Unpin,
    X: Unpin,
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(o) = this.outgoing.as_mut().filter(|o| !o.done) {
            if let Poll::Ready(Err(e)) = poll_send_body(conn, o, cx) {
                return this.fail(e);
            }
        }
        loop {
            match &mut this.left {
                Left::Done => return Poll::Ready(None),
                Left::Length(0) => {
                    this.left = Left::Done;
                    return Poll::Ready(None);
                }
                Left::Length(left) => {
                    if !conn.read.is_empty() {
                        let n = (*left).min(conn.read.len() as u64) as usize;
                        *left -= n as u64;
                        if *left == 0 {
                            this.left = Left::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(conn.read.split_to(n).freeze()))));
                    }
                }
                Left::Chunked(decoder) => {
                    while !conn.read.is_empty() {
                        let step = match decoder.decode(&conn.read) {
                            Ok(step) => step,
                            Err(e) => {
                                let e = format!("a malformed chunked response body: {e}");
                                return this.fail(e.into());
                            }
                        };
                        let mut taken = conn.read.split_to(step.consumed);
                        if let Some(r) = step.data {
                            taken.advance(r.start);
                            taken.truncate(r.end - r.start);
                            return Poll::Ready(Some(Ok(Frame::data(taken.freeze()))));
                        }
                        if step.done {
                            this.left = Left::Done;
                            return Poll::Ready(None);
                        }
                    }
                }
                Left::UntilClose => {
                    if !conn.read.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(conn.read.split().freeze()))));
                    }
                }
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(this.left, Left::UntilClose) => {
                    this.left = Left::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this
                        .fail("the upstream closed the connection before the body's end".into())
                }
                Ok(_) => {}
                Err(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.left, Left::Done | Left::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Left::Done => SizeHint::with_exact(0),
            Left::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    type TestConn = Box<Conn<DuplexStream, ()>>;

    /// [`send`] with a whole request.
    fn send_req<B>(
        conn: TestConn,
        req: Request<B>,
    ) -> impl std::future::Future<Output = Result<Response<Body<DuplexStream, (), B>>, Failure>>
    where
        B: HttpBody<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        send(conn, &Request::from_parts(parts, ()), body)
    }

    fn pair() -> (TestConn, DuplexStream) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        (Conn::new(a, None, ()), b)
    }

    fn get(path: &str) -> Request<Empty<Bytes>> {
        let mut r = Request::new(Empty::new());
        *r.uri_mut() = path.parse().unwrap();
        r.headers_mut().insert("host", "svc".parse().unwrap());
        r
    }

    /// Reads from the peer until what it read holds `until`.
    async fn read_request(peer: &mut DuplexStream, until: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(until.len()).any(|w| w == until) {
            let n = peer.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn a_get_and_its_length_framed_answer_leave_the_connection_reusable() {
        let (conn, mut peer) = pair();
        let server = tokio::spawn(async move {
            let got = read_request(&mut peer, b"\r\n\r\n").await;
            peer.write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, x-hop\r\nx-hop: a\r\nx-kept: b\r\n\r\nhello")
                .await
                .unwrap();
            (got, peer)
        });
        let resp = send_req(conn, get("/a?b=1")).await.unwrap();
        let (got, _peer) = server.await.unwrap();
        assert_eq!(got, b"GET /a?b=1 HTTP/1.1\r\nhost: svc\r\n\r\n");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers().get("x-kept").unwrap(), "b");
        assert!(resp.headers().get("x-hop").is_none(), "named in Connection");
        assert!(resp.headers().get("connection").is_none());
        assert_eq!(resp.headers().get("content-length").unwrap(), "5");
        let mut body = resp.into_body();
        assert_eq!(body.size_hint().exact(), Some(5));
        let data = (&mut body).collect().await.unwrap().to_bytes();
        assert_eq!(data, "hello");
        assert!(body.reusable().is_some());
    }

    #[tokio::test]
    async fn a_chunked_post_and_a_chunked_answer() {
        let (conn, mut peer) = pair();
        let server = tokio::spawn(async move {
            let got = read_request(&mut peer, b"0\r\n\r\n").await;
            peer.write_all(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nt: v\r\n\r\n")
                .await
                .unwrap();
            (got, peer)
        });
        let mut req = Request::new(Two(0));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = "/up".parse().unwrap();
        let resp = send_req(conn, req).await.unwrap();
        let (got, _peer) = server.await.unwrap();
        assert_eq!(
            got,
            b"POST /up HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n4\r\nping\r\n11\r\n0123456789abcdefg\r\n0\r\n\r\n"
        );
        assert_eq!(resp.status(), 201);
        assert!(resp.headers().get("content-length").is_none());
        assert!(resp.headers().get("transfer-encoding").is_none());
        let mut body = resp.into_body();
        assert_eq!(body.size_hint().exact(), None);
        let data = (&mut body).collect().await.unwrap().to_bytes();
        assert_eq!(data, "abcde");
        assert!(
            body.reusable().is_none(),
            "a Content-Length beside chunked is faulty framing: closed after"
        );
    }

    /// A body of two data frames and no length.
    struct Two(u8);

    impl HttpBody for Two {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0 += 1;
            Poll::Ready(match self.0 {
                1 => Some(Ok(Frame::data(Bytes::from_static(b"ping")))),
                2 => Some(Ok(Frame::data(Bytes::from_static(b"0123456789abcdefg")))),
                _ => None,
            })
        }
    }

    #[tokio::test]
    async fn a_length_body_and_an_answer_that_closes() {
        let (conn, mut peer) = pair();
        let server = tokio::spawn(async move {
            let got = read_request(&mut peer, b"data").await;
            peer.write_all(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
                .await
                .unwrap();
            drop(peer);
            got
        });
        let mut req = Request::new(Full::new(Bytes::from_static(b"data")));
        *req.method_mut() = Method::PUT;
        req.headers_mut()
            .insert("content-length", "4".parse().unwrap());
        let resp = send_req(conn, req).await.unwrap();
        let got = server.await.unwrap();
        assert_eq!(got, b"PUT / HTTP/1.1\r\ncontent-length: 4\r\n\r\ndata");
        assert_eq!(resp.version(), http::Version::HTTP_10);
        let mut body = resp.into_body();
        let data = (&mut body).collect().await.unwrap().to_bytes();
        assert_eq!(data, "until close");
        assert!(body.reusable().is_none(), "framed by the close");
    }

    #[tokio::test]
    async fn an_early_answer_to_a_body_the_upstream_will_not_read_is_passed_on() {
        let (a, mut peer) = tokio::io::duplex(1024);
        let conn: TestConn = Conn::new(a, None, ());
        tokio::spawn(async move {
            read_request(&mut peer, b"\r\n\r\n").await;
            peer.write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
        });
        let mut req = Request::new(Full::new(Bytes::from(vec![b'x'; 100_000])));
        *req.method_mut() = Method::POST;
        req.headers_mut()
            .insert("content-length", "100000".parse().unwrap());
        let resp = send_req(conn, req)
            .await
            .expect("the answer, not the write error");
        assert_eq!(resp.status(), 413);
        assert!(resp.into_body().reusable().is_none(), "the body was cut");
    }

    #[tokio::test]
    async fn an_answer_cut_short_is_an_error_and_the_connection_is_not_reused() {
        let (conn, mut peer) = pair();
        tokio::spawn(async move {
            read_request(&mut peer, b"\r\n\r\n").await;
            peer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
                .await
                .unwrap();
        });
        let resp = send_req(conn, get("/")).await.unwrap();
        let mut body = resp.into_body();
        let err = (&mut body).collect().await.unwrap_err();
        assert!(err.to_string().contains("before the body's end"), "{err}");
        assert!(body.reusable().is_none());
    }

    #[tokio::test]
    async fn no_answer_is_a_failure_after_writing_and_bad_heads_are_refused() {
        let (conn, mut peer) = pair();
        tokio::spawn(async move {
            read_request(&mut peer, b"\r\n\r\n").await;
        });
        let f = send_req(conn, get("/")).await.unwrap_err();
        assert!(f.written, "the request went out");
        assert!(
            f.source.to_string().contains("before answering"),
            "{}",
            f.source
        );

        let (conn, mut peer) = pair();
        tokio::spawn(async move {
            read_request(&mut peer, b"\r\n\r\n").await;
            let _ = peer
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
                .await;
        });
        let f = send_req(conn, get("/")).await.unwrap_err();
        assert!(
            f.source.to_string().contains("Content-Length"),
            "{}",
            f.source
        );
    }

    #[tokio::test]
    async fn an_idle_connection_closed_by_the_upstream_or_killed_is_seen_as_closed() {
        let (mut conn, peer) = pair();
        assert!(!conn.is_closed());
        drop(peer);
        assert!(conn.is_closed());
        let kill = Kill::new();
        let (a, _peer) = tokio::io::duplex(1024);
        let mut conn: TestConn = Conn::new(a, Some(kill.clone()), ());
        assert!(!conn.is_closed());
        kill.fire();
        assert!(conn.is_closed());
    }

    #[tokio::test]
    async fn a_kill_ends_a_wait_for_the_answer() {
        let kill = Kill::new();
        let (a, _peer) = tokio::io::duplex(1024);
        let conn: TestConn = Conn::new(a, Some(kill.clone()), ());
        let sent = tokio::spawn(send_req(conn, get("/")));
        tokio::task::yield_now().await;
        kill.fire();
        let f = tokio::time::timeout(std::time::Duration::from_secs(10), sent)
            .await
            .expect("the kill never ended the wait")
            .unwrap()
            .unwrap_err();
        assert!(f.source.to_string().contains("drain"), "{}", f.source);
    }

    #[test]
    fn hex_sizes() {
        let mut v = Vec::new();
        push_hex(&mut v, 0);
        push_hex(&mut v, 0x1a2b);
        assert_eq!(v, b"01a2b");
    }
}
