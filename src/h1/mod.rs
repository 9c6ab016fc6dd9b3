//! HTTP/1.1 heads parsed in place, and the agent's own HTTP/1 client and server (#15). The
//! client ([`client`]) carries every HTTP/1 request to an upstream but `Upgrade` ones; the
//! server ([`server`]) serves every body-less request of a client connection, and hands the
//! connection to hyper's server from its first request with a body, an `Upgrade`, an `Expect`
//! or a head the parser refuses.
//!
//! Pingora's way: `httparse` tokenises a head into slices of the read buffer, and we keep only
//! [`Span`]s (offsets) of the method, target and each header, so a parse allocates nothing per
//! header. While the headers are walked, the facts the proxy needs are computed once: the body's
//! framing, keep-alive, `Upgrade`, `Host`, and which headers `Connection` names. The upstream
//! request is then written from the client's own bytes ([`write`]), and a chunked body is
//! checked as it passes ([`chunked`]) rather than decoded and re-encoded.
//!
//! - [`head`]: request and response heads, and every refusal the agent makes today (hyper's
//!   server plus `framing::check_request_head`), with the same status codes;
//! - [`chunked`]: an incremental chunked-body checker that says which bytes are data;
//! - [`write`]: the upstream request head, hop-by-hop headers dropped, forwarding headers added;
//! - [`client`]: one upstream connection driven by the request's own task: the request written,
//!   the answer's head parsed with [`ResponseHead`], its body read and checked as it passes;
//! - [`server`]: one client connection's loop: a head read and parsed with [`RequestHead`], the
//!   handler awaited in place, the answer framed and written, idle buffers given back.
//!
//! A leaf: this folder imports only `crate::error` (for [`FramingError`] and `BoxError`, so
//! refusals read the same as today's); the client and the server are generic over their
//! socket (and the server over its handler), so they know nothing of dialling, TLS or routing.
use std::fmt;
use std::ops::Range;

use http::StatusCode;

use crate::error::FramingError;

pub mod chunked;
pub mod client;
pub mod head;
pub mod server;
pub mod write;

pub use head::{
    BodyFraming, Header, Kind, Parse, RequestHead, ResponseBody, ResponseHead, Version,
};

/// Longest request head accepted, request line and headers (64 KiB, what the listener gives
/// hyper as `max_buf_size` and `max_header_size`: `server::MAX_HEADER_BYTES`).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header lines in one head (`server::MAX_HEADERS`); one more is a 431.
pub const MAX_HEADERS: usize = 100;
/// Longest header line, name and value together (`framing::DEFAULT_MAX_HEADER_LINE`).
pub const DEFAULT_MAX_HEADER_LINE: usize = 16 * 1024;
/// The largest `Content-Length` that is a length, 2^63 - 1 (`framing::MAX_CONTENT_LENGTH`).
pub const MAX_CONTENT_LENGTH: u64 = i64::MAX as u64;

/// Limits on a request's framing (the same as `framing::Limits`, which this leaf cannot name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest header line, name and value together, in bytes.
    pub max_header_line: usize,
    /// Largest body by `Content-Length`; `None` for no limit beyond [`MAX_CONTENT_LENGTH`].
    pub max_body: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_line: DEFAULT_MAX_HEADER_LINE,
            max_body: None,
        }
    }
}

/// Bytes `start..end` of the buffer a head was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    /// The span of `part`, a slice of `buf` (what `httparse` hands back).
    fn within(buf: &[u8], part: &[u8]) -> Span {
        let start = part.as_ptr() as usize - buf.as_ptr() as usize;
        debug_assert!(start + part.len() <= buf.len());
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    /// The bytes of `buf` this span covers.
    pub fn of<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.range()]
    }

    pub fn range(&self) -> Range<usize> {
        self.start as usize..self.end as usize
    }

    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// Why a head was refused: the status to answer and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The head is not HTTP/1.x (`httparse` refused it, or the target is not a URI): 400.
    Malformed(&'static str),
    /// The head is over [`MAX_HEAD`] or has more than [`MAX_HEADERS`] lines: 431.
    TooLarge(&'static str),
    /// Framing the agent refuses, named as `framing.rs` names it: 400, 413, 431 or 501.
    Framing(FramingError),
    /// An upstream's response head that cannot be read or framed: 502.
    BadResponse(&'static str),
}

impl Error {
    /// The status to answer with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Malformed(_) => StatusCode::BAD_REQUEST,
            Error::TooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Error::Framing(e) => e.status(),
            Error::BadResponse(_) => StatusCode::BAD_GATEWAY,
        }
    }
}

impl From<FramingError> for Error {
    fn from(e: FramingError) -> Self {
        Error::Framing(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Malformed(why) => write!(f, "bad request: {why}"),
            Error::TooLarge(why) => write!(f, "request header fields too large: {why}"),
            Error::Framing(e) => e.fmt(f),
            Error::BadResponse(why) => write!(f, "bad upstream response: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// `v` split at commas, each element without its surrounding spaces and tabs (RFC 9110 §5.6.1
/// lists; empty elements are kept, callers skip them where they mean nothing).
fn list(v: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(trim)
}

/// `v` without leading and trailing spaces and tabs (OWS, RFC 9110 §5.6.3).
fn trim(v: &[u8]) -> &[u8] {
    let is_ws = |b: &u8| *b == b' ' || *b == b'\t';
    let start = v.iter().position(|b| !is_ws(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !is_ws(b)).map_or(start, |i| i + 1);
    &v[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_spans() {
        let items: Vec<&[u8]> = list(b" a ,\tb,, c").collect();
        assert_eq!(items, [&b"a"[..], b"b", b"", b"c"]);
        assert_eq!(trim(b"  "), b"");
        let buf = b"hello world";
        let s = Span::within(buf, &buf[6..]);
        assert_eq!(
            (s.of(buf), s.len(), s.is_empty()),
            (&b"world"[..], 5, false)
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(Error::Malformed("x").status(), 400);
        assert_eq!(Error::TooLarge("x").status(), 431);
        assert_eq!(Error::BadResponse("x").status(), 502);
        assert_eq!(Error::from(FramingError::MissingHost).status(), 400);
        assert_eq!(Error::Malformed("x").to_string(), "bad request: x");
    }
}
