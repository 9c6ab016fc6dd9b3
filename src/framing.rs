//! HTTP/1.1 request framing at the edge: what the agent refuses before routing, and how a
//! client's broken body is told apart from an upstream failure.
//!
//! The agent's own HTTP/1.1 server (`h1/server.rs`) serves only heads its parser accepts and
//! hands any other to hyper's server, so every refusal below is still made here and by hyper.
//!
//! hyper's server already refuses a good share of bad framing while it parses the head (with
//! 400, or 431 past `max_buf_size`): differing `Content-Length` values, a length that is not
//! digits or does not fit in `u64` - 2, `Transfer-Encoding` on HTTP/1.0, and a last
//! `Transfer-Encoding` line whose last coding is not `chunked` (`xchunked`,
//! `chunked, identity`). [`check_request_head`] adds what it lets through (RFC 9112 §3.2, §6):
//! - a header line (name and value) over [`Limits::max_header_line`] → 431;
//! - an HTTP/1.1 request without `Host`, or any request with more than one `Host` → 400;
//! - codings other than a single final `chunked` across all `Transfer-Encoding` lines (hyper
//!   reads only the last line, so `x` then `chunked` passed, with `x` dropped): `chunked` twice
//!   or not last → 400, any other coding → 501, since only `chunked` is forwarded;
//! - a `Content-Length` of 2^63 or more (not a length) → 400, over [`Limits::max_body`] → 413;
//! - `Content-Length` beside `Transfer-Encoding` → 400. hyper's HTTP/1 server removes the length
//!   before the request is handed over (it then frames by chunked and closes the connection
//!   after the answer, which RFC 9112 §6.1 allows), so this check only fires for requests that
//!   reach the handler some other way.
//!
//! A malformed chunked body is only found while it is streamed upstream, and hyper's client then
//! fails the whole exchange as if the upstream had. [`ClientBody`] wraps the client's body and
//! keeps the error of the client's own stream, so the proxy answers 400 and does not count the
//! failure against the endpoint.
//!
//! This file depends on `http`, `http-body` and hyper's body type (for [`ClientBody`] and
//! [`InBody`]) and `crate::error` only.
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use http::header::{self, GetAll, HeaderValue};
use http::{Request, Version};
use http_body::{Body, Frame, SizeHint};

use crate::error::{FramingError, SHOWN_VALUE};

/// Longest header line accepted, name and value together (16 KiB; nginx's
/// `large_client_header_buffers` default is 8 KiB, HAProxy's `tune.bufsize` 16 KiB for the
/// whole head). The whole head is capped at 64 KiB by hyper
/// (`server::MAX_HEADER_BYTES`).
pub const DEFAULT_MAX_HEADER_LINE: usize = 16 * 1024;
/// Largest request body accepted, by `Content-Length`: no limit by default.
pub const DEFAULT_MAX_BODY: Option<u64> = None;
/// The largest `Content-Length` that is a length: 2^63 - 1 (what a signed 64-bit length holds,
/// and so what most upstreams can take).
pub const MAX_CONTENT_LENGTH: u64 = i64::MAX as u64;

/// Limits on a request's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest header line, name and value together, in bytes.
    pub max_header_line: usize,
    /// Largest body by `Content-Length`, in bytes; `None` for no limit beyond
    /// [`MAX_CONTENT_LENGTH`].
    pub max_body: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_line: DEFAULT_MAX_HEADER_LINE,
            max_body: DEFAULT_MAX_BODY,
        }
    }
}

/// Checks a request's head before it is routed; see the module doc for what is refused.
pub fn check_request_head<B>(req: &Request<B>, limits: &Limits) -> Result<(), FramingError> {
    let headers = req.headers();
    // One pass: the line limit, and which framing headers are there at all (standard names
    // compare as enum tags); only a request that has one looks it up by name afterwards.
    let (mut hosts, mut te, mut cl) = (0u32, false, false);
    for (name, value) in headers {
        let len = name.as_str().len() + value.len();
        if len > limits.max_header_line {
            return Err(FramingError::HeaderLineTooLong {
                name: name.to_string(),
                len,
                max: limits.max_header_line,
            });
        }
        if name == header::HOST {
            hosts += 1;
        } else if name == header::TRANSFER_ENCODING {
            te = true;
        } else if name == header::CONTENT_LENGTH {
            cl = true;
        }
    }
    match hosts {
        0 if req.version() == Version::HTTP_11 => return Err(FramingError::MissingHost),
        0 | 1 => {}
        _ => {
            let all = headers.get_all(header::HOST).iter().map(shown).collect();
            return Err(FramingError::DuplicateHost(all));
        }
    }
    if te {
        if let Some(cl) = headers.get(header::CONTENT_LENGTH) {
            return Err(FramingError::LengthWithTransferEncoding {
                content_length: shown(cl),
                transfer_encoding: joined(headers.get_all(header::TRANSFER_ENCODING).iter()),
            });
        }
        return check_codings(&headers.get_all(header::TRANSFER_ENCODING));
    }
    if !cl {
        return Ok(());
    }
    for cl in headers.get_all(header::CONTENT_LENGTH) {
        let len = parse_length(cl.as_bytes())
            .filter(|&n| n <= MAX_CONTENT_LENGTH)
            .ok_or_else(|| FramingError::InvalidContentLength(shown(cl)))?;
        if let Some(max) = limits.max_body.filter(|&max| len > max) {
            return Err(FramingError::BodyTooLarge { len, max });
        }
    }
    Ok(())
}

/// The codings of every `Transfer-Encoding` line, in order, must be one final `chunked`.
fn check_codings(lines: &GetAll<'_, HeaderValue>) -> Result<(), FramingError> {
    let codings = || {
        lines
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(|c| c.trim_ascii())
            // Empty list elements are allowed and mean nothing (RFC 9110 §5.6.1).
            .filter(|c| !c.is_empty())
    };
    let is_chunked = |c: &[u8]| c.eq_ignore_ascii_case(b"chunked");
    let chunked = codings().filter(|c| is_chunked(c)).count();
    if chunked != 1 || !codings().next_back().is_some_and(is_chunked) {
        return Err(FramingError::InvalidTransferEncoding(joined(lines.iter())));
    }
    match codings().find(|c| !is_chunked(c)) {
        Some(unknown) => Err(FramingError::UnknownCoding {
            coding: cut(unknown),
            value: joined(lines.iter()),
        }),
        None => Ok(()),
    }
}

/// A `Content-Length` value as a number: digits only, no sign, no list.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// A client-sent value as an error shows it: lossy UTF-8, cut to [`SHOWN_VALUE`] bytes.
fn shown(v: &HeaderValue) -> String {
    cut(v.as_bytes())
}

fn cut(v: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(&v[..v.len().min(SHOWN_VALUE)]).into_owned();
    if v.len() > SHOWN_VALUE {
        s.push('…');
    }
    s
}

/// Several lines of one header, shown as one value (`, `-joined, as RFC 9110 §5.3 allows).
fn joined<'a>(lines: impl Iterator<Item = &'a HeaderValue>) -> String {
    let all: Vec<u8> = lines.fold(Vec::new(), |mut all, v| {
        if !all.is_empty() {
            all.extend_from_slice(b", ");
        }
        all.extend_from_slice(v.as_bytes());
        all
    });
    cut(&all)
}

/// A client's request body as the listener hands it over: hyper's (a request with a body, or
/// any request of an HTTP/2 or handed-off connection), or none (a body-less request the
/// agent's own HTTP/1 server read, `h1/server.rs`).
#[derive(Debug)]
pub enum InBody {
    Hyper(hyper::body::Incoming),
    Empty,
}

impl Body for InBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.get_mut() {
            InBody::Hyper(b) => Pin::new(b).poll_frame(cx),
            InBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            InBody::Hyper(b) => b.is_end_stream(),
            InBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            InBody::Hyper(b) => b.size_hint(),
            InBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// The client's request body, as sent upstream: frames pass through unchanged, and an error of
/// the client's own stream (a malformed chunk, a reset) is kept in a [`BodyFault`] the proxy
/// can read once the upstream exchange has failed.
pub struct ClientBody<B> {
    inner: B,
    fault: BodyFault,
}

/// The error, if any, that the client's body stream ended with. Cheap to clone; every clone
/// sees the same error.
#[derive(Debug, Clone, Default)]
pub struct BodyFault(Arc<OnceLock<String>>);

impl BodyFault {
    /// The client body's error, described with its causes, once there was one.
    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

impl<B> ClientBody<B> {
    /// Wraps `inner`; the [`BodyFault`] reports how it failed.
    pub fn new(inner: B) -> (Self, BodyFault) {
        let fault = BodyFault::default();
        (
            ClientBody {
                inner,
                fault: fault.clone(),
            },
            fault,
        )
    }
}

impl<B> Body for ClientBody<B>
where
    B: Body + Unpin,
    B::Error: std::error::Error,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(e))) = &polled {
            let _ = self.fault.0.set(crate::error::chain(e));
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    /// A request with `headers` (`name: value` lines, in order) and version `v`.
    fn req(v: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().version(v).uri("/");
        for (n, val) in headers {
            b = b.header(*n, *val);
        }
        b.body(()).unwrap()
    }

    fn check(headers: &[(&str, &str)]) -> Result<(), FramingError> {
        check_request_head(&req(Version::HTTP_11, headers), &Limits::default())
    }

    fn status(headers: &[(&str, &str)]) -> u16 {
        check(headers).err().map_or(200, |e| e.status().as_u16())
    }

    #[test]
    fn a_plain_request_passes() {
        assert_eq!(check(&[("host", "svc")]), Ok(()));
        assert_eq!(check(&[("host", "svc"), ("content-length", "5")]), Ok(()));
        assert_eq!(
            check(&[("host", "svc"), ("transfer-encoding", "Chunked")]),
            Ok(())
        );
        // Empty list elements mean nothing.
        assert_eq!(
            check(&[("host", "svc"), ("transfer-encoding", " , chunked")]),
            Ok(())
        );
    }

    #[test]
    fn host_must_be_there_once_in_http_1_1() {
        assert_eq!(check(&[]), Err(FramingError::MissingHost));
        let e = check(&[("host", "svc"), ("host", "other")]).unwrap_err();
        assert_eq!(
            e,
            FramingError::DuplicateHost(vec!["svc".into(), "other".into()])
        );
        assert_eq!(e.to_string(), "bad request: 2 Host headers (svc, other)");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        // HTTP/1.0 may leave it out, but not send two.
        let limits = Limits::default();
        assert_eq!(
            check_request_head(&req(Version::HTTP_10, &[]), &limits),
            Ok(())
        );
        let two = req(Version::HTTP_10, &[("host", "a"), ("host", "a")]);
        assert!(check_request_head(&two, &limits).is_err());
    }

    #[test]
    fn transfer_codings_other_than_one_final_chunked_are_refused() {
        let te = |v: &[&str]| {
            let mut h = vec![("host", "svc")];
            h.extend(v.iter().map(|v| ("transfer-encoding", *v)));
            status(&h)
        };
        assert_eq!(te(&["x", "chunked"]), 501);
        assert_eq!(te(&["gzip, chunked"]), 501);
        assert_eq!(te(&["chunked", "chunked"]), 400);
        assert_eq!(te(&["chunked, chunked"]), 400);
        assert_eq!(te(&["xchunked"]), 400);
        assert_eq!(te(&["chunked, identity"]), 400);
        assert_eq!(te(&["chunked", "x"]), 400);
        assert_eq!(te(&["gzip"]), 400);
        assert_eq!(te(&[""]), 400);
        let e = check(&[
            ("host", "svc"),
            ("transfer-encoding", "x"),
            ("transfer-encoding", "chunked"),
        ])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "not implemented: transfer coding \"x\" in Transfer-Encoding \"x, chunked\""
        );
    }

    #[test]
    fn length_beside_transfer_encoding_is_refused() {
        let e = check(&[
            ("host", "svc"),
            ("content-length", "5"),
            ("transfer-encoding", "chunked"),
        ])
        .unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(e.to_string().contains("Content-Length \"5\""), "{e}");
        assert!(
            e.to_string().contains("Transfer-Encoding \"chunked\""),
            "{e}"
        );
    }

    #[test]
    fn a_length_must_be_a_length_and_within_the_limit() {
        let cl = |v: &str| status(&[("host", "svc"), ("content-length", v)]);
        assert_eq!(cl("9223372036854775807"), 200);
        assert_eq!(cl("9223372036854775808"), 400);
        assert_eq!(cl("18446744073709551616"), 400);
        assert_eq!(cl("+5"), 400);
        assert_eq!(cl("5, 5"), 400);
        assert_eq!(cl(""), 400);
        let e = check(&[("host", "svc"), ("content-length", "9223372036854775808")]).unwrap_err();
        assert!(e.to_string().contains("9223372036854775808"), "{e}");

        let limits = Limits {
            max_body: Some(10),
            ..Limits::default()
        };
        let r = |v: &str| req(Version::HTTP_11, &[("host", "svc"), ("content-length", v)]);
        assert_eq!(check_request_head(&r("10"), &limits), Ok(()));
        let e = check_request_head(&r("11"), &limits).unwrap_err();
        assert_eq!(e, FramingError::BodyTooLarge { len: 11, max: 10 });
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn a_header_line_over_the_limit_is_431() {
        let limits = Limits::default();
        let name = "x-big";
        let fits = "a".repeat(limits.max_header_line - name.len());
        assert_eq!(check(&[("host", "svc"), (name, &fits)]), Ok(()));
        let over = format!("{fits}a");
        let e = check(&[("host", "svc"), (name, &over)]).unwrap_err();
        assert_eq!(
            e,
            FramingError::HeaderLineTooLong {
                name: name.into(),
                len: DEFAULT_MAX_HEADER_LINE + 1,
                max: DEFAULT_MAX_HEADER_LINE
            }
        );
        assert_eq!(e.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        // The value is not repeated whole.
        assert!(e.to_string().len() < 200, "{e}");
    }

    #[test]
    fn shown_values_are_cut() {
        let long = "h".repeat(1000);
        let e = check(&[("host", &long), ("host", "b")]).unwrap_err();
        assert!(e.to_string().len() < 2 * SHOWN_VALUE + 40, "{e}");
    }

    /// A body that yields `frames`, then ends.
    struct Frames(std::collections::VecDeque<Result<Frame<bytes::Bytes>, std::io::Error>>);

    impl Body for Frames {
        type Data = bytes::Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<bytes::Bytes>, std::io::Error>>> {
            Poll::Ready(self.0.pop_front())
        }
    }

    #[tokio::test]
    async fn a_client_body_keeps_its_own_error() {
        use http_body_util::BodyExt;
        let frames = Frames(
            [
                Ok(Frame::data(bytes::Bytes::from_static(b"ok"))),
                Err(std::io::Error::other("invalid chunk size")),
            ]
            .into(),
        );
        let (body, fault) = ClientBody::new(frames);
        assert_eq!(fault.get(), None);
        let err = body.collect().await.unwrap_err();
        assert_eq!(err.to_string(), "invalid chunk size");
        assert_eq!(fault.get(), Some("invalid chunk size"));
    }

    #[tokio::test]
    async fn a_client_body_that_ends_well_has_no_fault() {
        use http_body_util::BodyExt;
        let (body, fault) = ClientBody::new(http_body_util::Full::new(bytes::Bytes::from("x")));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "x");
        assert_eq!(fault.get(), None);
    }
}
