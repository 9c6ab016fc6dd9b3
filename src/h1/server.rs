//! The agent's own HTTP/1.1 server connection, for the requests that make up nearly all of a
//! proxy's work (#15 step 3): a head with no body, no `Upgrade` and no `Expect`, that the
//! parser in `head.rs` accepts.
//!
//! hyper's server connection runs a dispatcher between the socket and the service: a head is
//! parsed into a `Request`, the service future is moved into the dispatcher, and the response
//! head is encoded from its `HeaderMap` while the body is polled through hyper's body channel.
//! Here one loop does the same work in line: it reads into a buffer it keeps, parses the head
//! in place ([`RequestHead`]), builds the `Request` from slices of that buffer (header values
//! share it), awaits the handler in place, and writes the answer's head and its first body
//! bytes in one write.
//!
//! Everything else is handed to hyper, with the bytes already read ([`Served::Handoff`]): a
//! request with a body (`Content-Length` > 0 or chunked), an `Upgrade` (WebSocket, h2c), an
//! `Expect: 100-continue`, and any head the parser refuses. hyper then serves the rest of the
//! connection as it always has, so every refusal (status, connection closed or not) is exactly
//! hyper's and `framing::check_request_head`'s; `tests/h1_agrees.rs` checks that this parser
//! never accepts what they refuse.
//!
//! Kept from hyper's server: a head must arrive within the header timeout, counted from the
//! moment the connection waits for it (so an idle keep-alive connection is closed after it too,
//! as hyper does); pipelined requests are answered in order from the bytes already read; a
//! body-less request's client is not read while its answer is awaited; `Date` is added; the
//! answer is framed by its `Content-Length`, else by its body's exact size, else chunked
//! (HTTP/1.1) or by closing (HTTP/1.0); HEAD, 1xx, 204 and 304 answers carry no body; an
//! HTTP/1.0 client asking for keep-alive is told `connection: keep-alive`, a connection that
//! will close says `connection: close`. A body that fails or ends short of its length closes
//! the connection (the client sees a cut answer, never a wrong one). Response trailers are not
//! written (HTTP/1 clients of the agent do not ask for them).
//!
//! Generic over the socket and the handler, so this leaf knows nothing of routing.
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::{pin, Pin};
use std::task::{ready, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, DATE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body::{Body as HttpBody, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

use crate::error::BoxError;

use super::client::push_hex;
use super::head::{BodyFraming, Parse, RequestHead, Version};
use super::Limits;

/// Read buffer growth: reserved when less than [`READ_SPARE`] is free.
const READ_CHUNK: usize = 8 * 1024;
const READ_SPARE: usize = 1024;
/// A connection that has waited this long for its next request gives its buffers back
/// ([`Options::idle_shrink`]'s default).
pub const IDLE_SHRINK: Duration = Duration::from_secs(1);
/// Body bytes copied next to the head (or a chunk's size line) rather than written apart.
const COPY_MAX: usize = 16 * 1024;

/// How a connection ended.
pub enum Served<I> {
    /// Closed: the client went, asked for it, timed out, the answer could not be framed for
    /// another request, or the stop signal came.
    Closed,
    /// A request this loop does not serve: the socket and every byte read from it and not yet
    /// served (that request's head first), for hyper to serve from there.
    Handoff(I, BytesMut),
}

/// Settings of a server connection.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// A request head must be whole this long after the connection starts waiting for it.
    pub header_timeout: Duration,
    /// After this long waiting for a request, the connection's buffers are freed (an idle
    /// keep-alive connection then costs its task and socket only).
    pub idle_shrink: Duration,
    pub limits: Limits,
}

/// How the answer's body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

/// Serves requests on `io` until it closes, `stop` completes (an answer in progress is
/// finished first, and says `connection: close`), or a request comes that hyper must serve.
/// `read` holds bytes already read from `io` (the first request's, read by the h2c sniff).
pub async fn serve<I, H, Fut, B, S>(
    mut io: I,
    mut read: BytesMut,
    options: &Options,
    mut handle: H,
    stop: S,
) -> io::Result<Served<I>>
where
    I: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<()>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    S: Future<Output = ()>,
{
    let mut stop = pin!(stop);
    let mut stopped = false;
    let mut head = RequestHead::default();
    let mut out = Vec::with_capacity(1024);
    // One timer for the connection, moved only when it fires early (a clock read per head,
    // not a timer-wheel insertion).
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    // The buffers are held: they are given back after `idle_shrink` with nothing to read.
    let mut held = true;
    loop {
        let idle_since = Instant::now();
        let deadline = idle_since + options.header_timeout;
        let shrink_at = idle_since + options.idle_shrink;
        let len = loop {
            if !read.is_empty() {
                match head.parse(&read, &options.limits) {
                    Ok(Parse::Complete(n)) => break n,
                    Ok(Parse::Partial) => {}
                    Err(_) => return Ok(Served::Handoff(io, read)),
                }
            }
            let got = poll_fn(|cx| {
                if read.is_empty() && !stopped && stop.as_mut().poll(cx).is_ready() {
                    stopped = true;
                }
                if stopped && read.is_empty() {
                    return Poll::Ready(Wait::Stop);
                }
                if read.capacity() - read.len() < READ_SPARE {
                    read.reserve(READ_CHUNK);
                }
                match tokio_util::io::poll_read_buf(Pin::new(&mut io), cx, &mut read) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Wait::Eof),
                    Poll::Ready(Ok(_)) => {
                        held = true;
                        return Poll::Ready(Wait::Read);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Wait::Failed(e)),
                    Poll::Pending => {}
                }
                // What the timer waits for: the buffers' release while they are held and
                // empty, else the header timeout.
                let next =
                    |held: bool, empty: bool| if held && empty { shrink_at } else { deadline };
                loop {
                    let idle = held && read.is_empty();
                    let first = next(held, read.is_empty());
                    let sleep = timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(first.into())));
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Poll::Ready(Wait::TimedOut);
                    }
                    if idle && now >= shrink_at {
                        // Idle: an idle connection holds no buffer (what nginx does too).
                        read = BytesMut::new();
                        out = Vec::new();
                        head.release();
                        held = false;
                    }
                    sleep.as_mut().reset(next(held, read.is_empty()).into());
                }
            })
            .await;
            match got {
                Wait::Read => {}
                Wait::Eof | Wait::Stop | Wait::TimedOut => return Ok(Served::Closed),
                Wait::Failed(e) => return Err(e),
            }
        };
        let ours = matches!(head.body, BodyFraming::None | BodyFraming::Length(0))
            && !head.upgrade
            && !head.expect_continue;
        if !ours {
            return Ok(Served::Handoff(io, read));
        }
        let bytes = read.split_to(len).freeze();
        let Some(req) = request(&head, &bytes) else {
            // A name or value `http` refuses though `httparse` took it: hyper decides.
            let mut all = BytesMut::with_capacity(bytes.len() + read.len());
            all.extend_from_slice(&bytes);
            all.extend_from_slice(&read);
            return Ok(Served::Handoff(io, all));
        };
        let keep_alive = head.keep_alive;
        let v10 = head.version == Version::Http10;
        let to_head = req.method() == Method::HEAD;
        drop(bytes);
        // One request's work, boxed: the handler's state (~7 KB) and the answer's (its body,
        // ~300 bytes) live only while a request is in flight, not in every idle connection's
        // task (one allocation a request; #15).
        let (keep, ended) = Box::pin(async {
            let resp = handle(req).await;
            if !stopped {
                stopped = poll_fn(|cx| Poll::Ready(stop.as_mut().poll(cx).is_ready())).await;
            }
            let (parts, body) = resp.into_parts();
            let mut keep = keep_alive && !stopped;
            out.clear();
            let framing = encode_head(&mut out, &parts, body.size_hint(), to_head, v10, &mut keep);
            drop(parts);
            let ended = write_answer(&mut io, &mut out, body, framing).await?;
            io::Result::Ok((keep, ended))
        })
        .await?;
        if !(keep && ended) {
            let _ = poll_fn(|cx| Pin::new(&mut io).poll_shutdown(cx)).await;
            return Ok(Served::Closed);
        }
    }
}

enum Wait {
    Read,
    Eof,
    Stop,
    TimedOut,
    Failed(io::Error),
}

/// The `Request` of a parsed head whose bytes are `bytes`: header values are slices of them.
/// `None` when `http` refuses a part `httparse` took.
fn request(head: &RequestHead, bytes: &Bytes) -> Option<Request<()>> {
    let method = Method::from_bytes(head.method.of(bytes)).ok()?;
    let uri = Uri::from_maybe_shared(bytes.slice(head.target.range())).ok()?;
    // Room for what the proxy adds (`X-Forwarded-For`, `X-Forwarded-Proto`, `X-Request-Id`,
    // `Host`): a `HeaderMap` that grows rehashes (two growths were ~800 instructions a
    // request; callgrind, #15).
    let mut headers = HeaderMap::with_capacity(head.headers().len() + 4);
    for h in head.headers() {
        let name = match h.kind.header_name() {
            Some(name) => name,
            None => HeaderName::from_bytes(h.name.of(bytes)).ok()?,
        };
        let value = HeaderValue::from_maybe_shared(bytes.slice(h.value.range())).ok()?;
        headers.append(name, value);
    }
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = match head.version {
        Version::Http10 => http::Version::HTTP_10,
        Version::Http11 => http::Version::HTTP_11,
    };
    *req.headers_mut() = headers;
    Some(req)
}

/// Writes the status line and headers into `out`, and says how the body follows; `keep` is
/// cleared when the connection cannot carry another request after it.
fn encode_head(
    out: &mut Vec<u8>,
    parts: &http::response::Parts,
    hint: SizeHint,
    to_head: bool,
    v10: bool,
    keep: &mut bool,
) -> Framing {
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let no_body = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut length = None;
    let mut date = false;
    for (name, value) in &parts.headers {
        match *name {
            // This hop's own: written from the framing below.
            http::header::CONNECTION | http::header::TRANSFER_ENCODING => continue,
            _ if name.as_str() == "keep-alive" => continue,
            CONTENT_LENGTH => {
                if no_body && status != StatusCode::NOT_MODIFIED {
                    continue;
                }
                length = std::str::from_utf8(value.as_bytes())
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
            }
            DATE => date = true,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !date {
        out.extend_from_slice(b"date: ");
        push_date(out);
        out.extend_from_slice(b"\r\n");
    }
    let framing = if no_body {
        Framing::None
    } else if let Some(n) = length {
        if to_head {
            Framing::None
        } else {
            Framing::Length(n)
        }
    } else if let Some(n) = hint.exact() {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa(n, &mut [0; 20]));
        out.extend_from_slice(b"\r\n");
        if to_head {
            Framing::None
        } else {
            Framing::Length(n)
        }
    } else if to_head {
        Framing::None
    } else if v10 {
        *keep = false;
        Framing::Close
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if !*keep {
        if !v10 {
            out.extend_from_slice(b"connection: close\r\n");
        }
    } else if v10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// `n` in decimal, in `buf`.
fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

thread_local! {
    /// The `Date` value of the current second, made once per second per thread.
    static DATE_CACHE: std::cell::RefCell<(u64, [u8; 29])> = const { std::cell::RefCell::new((u64::MAX, [0; 29])) };
}

/// Appends the current time as an HTTP date (RFC 9110 §5.6.7).
fn push_date(out: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE_CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                c.1.copy_from_slice(text.as_bytes());
                c.0 = secs;
            } else {
                out.extend_from_slice(text.as_bytes());
                return;
            }
        }
        out.extend_from_slice(&c.1);
    });
}

/// Writes the head in `out` and the body framed as `framing`. `Ok(true)` when the body ended
/// as framed (the connection may carry another request), `Ok(false)` when it failed or did
/// not match its length (the connection must close); an error when the client's socket
/// failed.
async fn write_answer<I, B>(
    io: &mut I,
    out: &mut Vec<u8>,
    mut body: B,
    framing: Framing,
) -> io::Result<bool>
where
    I: AsyncWrite + Unpin,
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    // Written after `out` (a body frame too large to copy).
    let mut big: Option<Bytes> = None;
    let mut pos = 0;
    // The body ended (true: as framed) or failed (false); `None` while it streams.
    let mut ended: Option<bool> = if framing == Framing::None {
        Some(true)
    } else {
        None
    };
    poll_fn(|cx| loop {
        // Take frames while there is room: the head and small frames leave in one write.
        let mut body_pending = false;
        while ended.is_none() && big.is_none() && out.len() < COPY_MAX {
            match Pin::new(&mut body).poll_frame(cx) {
                Poll::Pending => {
                    body_pending = true;
                    break;
                }
                Poll::Ready(None) => {
                    ended = Some(match framing {
                        Framing::Length(_) => left == 0,
                        Framing::Chunked => {
                            out.extend_from_slice(b"0\r\n\r\n");
                            true
                        }
                        _ => true,
                    });
                }
                Poll::Ready(Some(Err(e))) => {
                    let e: BoxError = e.into();
                    tracing::debug!(error = %e, "the answer's body failed: closing the client connection");
                    ended = Some(false);
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(mut data) = frame.into_data() else {
                        continue; // trailers: not written
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if let Framing::Length(_) = framing {
                        if data.len() as u64 > left {
                            // More than its length said: what fits goes, then the connection
                            // closes.
                            data.truncate(left as usize);
                            ended = Some(false);
                        }
                        left -= data.len() as u64;
                    }
                    if framing == Framing::Chunked {
                        push_hex(out, data.len());
                        out.extend_from_slice(b"\r\n");
                    }
                    if data.len() <= COPY_MAX - out.len().min(COPY_MAX) {
                        out.extend_from_slice(&data);
                        if framing == Framing::Chunked {
                            out.extend_from_slice(b"\r\n");
                        }
                    } else {
                        big = Some(data);
                    }
                }
            }
        }
        // Write what is gathered.
        if pos < out.len() || big.as_ref().is_some_and(|b| !b.is_empty()) {
            let n = match &big {
                Some(b) if pos < out.len() => {
                    let bufs = [IoSlice::new(&out[pos..]), IoSlice::new(b)];
                    ready!(Pin::new(&mut *io).poll_write_vectored(cx, &bufs))?
                }
                Some(b) => ready!(Pin::new(&mut *io).poll_write(cx, b))?,
                None => ready!(Pin::new(&mut *io).poll_write(cx, &out[pos..]))?,
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let from_out = n.min(out.len() - pos);
            pos += from_out;
            if let Some(b) = &mut big {
                b.advance(n - from_out);
            }
            if pos == out.len() {
                out.clear();
                pos = 0;
                if let Some(b) = &big {
                    if b.is_empty() {
                        big = None;
                        if framing == Framing::Chunked {
                            out.extend_from_slice(b"\r\n");
                        }
                    }
                }
            }
            continue;
        }
        if let Some(done) = ended {
            ready!(Pin::new(&mut *io).poll_flush(cx))?;
            return Poll::Ready(Ok(done));
        }
        if body_pending {
            ready!(Pin::new(&mut *io).poll_flush(cx))?;
            return Poll::Pending;
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Empty, Full};
    use std::task::Context;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn options() -> Options {
        Options {
            header_timeout: Duration::from_secs(10),
            idle_shrink: IDLE_SHRINK,
            limits: Limits::default(),
        }
    }

    /// Serves `input` (the client's bytes, then its write side closed) with `handle`; what the
    /// client read, and how the connection ended.
    async fn run<H, Fut, B>(input: &[u8], handle: H) -> (String, &'static str)
    where
        H: FnMut(Request<()>) -> Fut,
        Fut: Future<Output = Response<B>>,
        B: HttpBody<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let served = serve(
            server,
            BytesMut::new(),
            &options(),
            handle,
            std::future::pending::<()>(),
        )
        .await
        .unwrap();
        let how = match served {
            Served::Closed => "closed",
            Served::Handoff(..) => "handoff",
        };
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        (String::from_utf8_lossy(&got).into_owned(), how)
    }

    fn ok(body: &'static str) -> Response<Full<Bytes>> {
        Response::new(Full::new(Bytes::from_static(body.as_bytes())))
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_with_lengths() {
        let mut n = 0;
        let (got, how) = run(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
            |req| {
                n += 1;
                let path = req.uri().path().to_string();
                async move { Response::new(Full::new(Bytes::from(path))) }
            },
        )
        .await;
        assert_eq!(n, 2);
        assert_eq!(how, "closed");
        let a = got.find("\r\n\r\n/a").expect(&got);
        let b = got.find("\r\n\r\n/b").expect(&got);
        assert!(a < b, "{got}");
        assert_eq!(got.matches("content-length: 2\r\n").count(), 2, "{got}");
        assert_eq!(got.matches("date: ").count(), 2, "{got}");
    }

    #[tokio::test]
    async fn a_request_with_a_body_or_an_upgrade_goes_to_hyper_with_its_bytes() {
        for input in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ] {
            let (client, server) = tokio::io::duplex(1 << 16);
            let mut client = client;
            client.write_all(input).await.unwrap();
            let served = serve(
                server,
                BytesMut::new(),
                &options(),
                |_| async { ok("no") },
                std::future::pending::<()>(),
            )
            .await
            .unwrap();
            match served {
                Served::Handoff(_, bytes) => assert_eq!(&bytes[..], input),
                Served::Closed => panic!("not handed off: {}", String::from_utf8_lossy(input)),
            }
        }
    }

    #[tokio::test]
    async fn framing_follows_the_answer_and_the_client() {
        // Unknown length: chunked for HTTP/1.1.
        let (got, _) = run(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            |_| async {
                Response::new(frames(vec![
                    Bytes::from_static(b"abc"),
                    Bytes::from_static(b"de"),
                ]))
            },
        )
        .await;
        assert!(got.contains("transfer-encoding: chunked\r\n"), "{got}");
        assert!(got.contains("connection: close\r\n"), "{got}");
        assert!(
            got.ends_with("\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
            "{got}"
        );
        // HTTP/1.0, unknown length: until close.
        let (got, _) = run(
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            |_| async { Response::new(frames(vec![Bytes::from_static(b"abc")])) },
        )
        .await;
        assert!(!got.contains("chunked"), "{got}");
        assert!(got.ends_with("\r\n\r\nabc"), "{got}");
        // HTTP/1.0 keep-alive with a length: said so.
        let (got, _) = run(
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            |_| async { ok("abc") },
        )
        .await;
        assert!(got.contains("connection: keep-alive\r\n"), "{got}");
        // HEAD: the length, no body; 204: neither.
        let (got, _) = run(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", |_| async {
            ok("abc")
        })
        .await;
        assert!(
            got.contains("content-length: 3\r\n") && got.ends_with("\r\n\r\n"),
            "{got}"
        );
        let (got, _) = run(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", |_| async {
            let mut r = Response::new(Empty::<Bytes>::new());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        })
        .await;
        assert!(got.starts_with("HTTP/1.1 204 No Content\r\n"), "{got}");
        assert!(
            !got.contains("content-length") && got.ends_with("\r\n\r\n"),
            "{got}"
        );
    }

    #[tokio::test]
    async fn a_body_longer_than_its_length_is_cut_and_the_connection_closed() {
        let mut n = 0;
        let (got, how) = run(
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
            |_| {
                n += 1;
                async {
                    let mut r = ok("toolong");
                    r.headers_mut()
                        .insert(CONTENT_LENGTH, HeaderValue::from_static("3"));
                    r
                }
            },
        )
        .await;
        assert_eq!((n, how), (1, "closed"));
        assert!(got.ends_with("\r\n\r\ntoo"), "{got}");
    }

    #[tokio::test]
    async fn a_large_body_is_written_whole() {
        let big = Bytes::from(vec![b'z'; 200_000]);
        let sent = big.clone();
        let (got, _) = run(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            move |_| {
                let b = sent.clone();
                async move { Response::new(frames(vec![b.clone(), b])) }
            },
        )
        .await;
        let body = &got[got.find("\r\n\r\n").unwrap() + 4..];
        assert_eq!(
            body.len(),
            400_000 + "30d40\r\n\r\n".len() * 2 + 5,
            "{}",
            &got[..200]
        );
        assert_eq!(body.matches('z').count(), big.len() * 2);
    }

    #[tokio::test]
    async fn a_connection_idle_past_its_shrink_serves_the_next_request() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let options = Options {
            idle_shrink: Duration::from_millis(20),
            ..options()
        };
        let serving = tokio::spawn(async move {
            serve(
                server,
                BytesMut::new(),
                &options,
                |req| {
                    let path = req.uri().path().to_string();
                    async move { Response::new(Full::new(Bytes::from(path))) }
                },
                std::future::pending::<()>(),
            )
            .await
            .map(|s| matches!(s, Served::Closed))
        });
        let mut got = Vec::new();
        for path in ["/one", "/two"] {
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            client.write_all(req.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut answer = Vec::new();
            while !answer.ends_with(path.as_bytes()) {
                assert!(Instant::now() < deadline, "no answer to {path}");
                let n = client.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before answering {path}");
                answer.extend_from_slice(&buf[..n]);
            }
            got.push(String::from_utf8(answer).unwrap());
            // Idle well past the shrink (the buffers are freed), then the next request.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        client.shutdown().await.unwrap();
        assert!(serving.await.unwrap().unwrap());
        assert!(got[1].starts_with("HTTP/1.1 200 OK\r\n"), "{}", got[1]);
    }

    #[tokio::test]
    async fn an_unfinished_head_is_closed_at_the_header_timeout() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let options = Options {
            header_timeout: Duration::from_millis(200),
            ..options()
        };
        let started = Instant::now();
        let served = tokio::time::timeout(
            Duration::from_secs(10),
            serve(
                server,
                BytesMut::new(),
                &options,
                |_| async { ok("no") },
                std::future::pending::<()>(),
            ),
        )
        .await
        .expect("closed at the header timeout, not left open")
        .unwrap();
        assert!(matches!(served, Served::Closed));
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn the_stop_signal_closes_an_idle_connection_and_ends_an_answer_with_close() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut tx = Some(tx);
        let stop = async move { drop(rx.await) };
        let served = tokio::time::timeout(
            Duration::from_secs(10),
            serve(
                server,
                BytesMut::new(),
                &options(),
                |_| {
                    // The signal comes while the answer is being made.
                    drop(tx.take());
                    async { ok("abc") }
                },
                stop,
            ),
        )
        .await
        .expect("the stop signal ended the connection")
        .unwrap();
        assert!(matches!(served, Served::Closed));
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.contains("connection: close\r\n") && got.ends_with("abc"),
            "{got}"
        );
    }

    /// A body of these frames, each ready when polled, its length not told.
    struct Frames(std::collections::VecDeque<Bytes>);

    impl HttpBody for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
        }
    }

    fn frames(v: Vec<Bytes>) -> Frames {
        Frames(v.into())
    }
}
