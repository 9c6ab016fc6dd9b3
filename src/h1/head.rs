//! Request and response heads as offsets into the read buffer, and the framing decided from
//! them (RFC 9112 §6).
//!
//! `httparse` (with its default configuration, as hyper's server uses it) tokenises the head:
//! it refuses obs-fold (§5.2), a space before the colon (§5.1), bare CR, control bytes in a
//! value, more than one space between request-line parts (§3), and versions other than 1.0 and
//! 1.1; it accepts a bare LF as a line end (§2.2 allows it) and skips empty lines before the
//! request line (§2.2). What follows is ours, in the order hyper and `check_request_head` apply
//! it today, so each refusal has today's status:
//!
//! 1. a head over [`MAX_HEAD`](super::MAX_HEAD) or with more than
//!    [`MAX_HEADERS`](super::MAX_HEADERS) lines → 431;
//! 2. a target that is not a URI (the bytes `http::Uri` refuses; a fragment is cut off, §3.2)
//!    → 400;
//! 3. a `Content-Length` that is not digits or does not fit in 64 bits, or differs from
//!    another one (§6.3 rule 5) → 400; `Transfer-Encoding` in an HTTP/1.0 request (§6.1) or
//!    whose last line does not end in `chunked` (§6.3 rule 4) → 400;
//! 4. a header line over [`Limits::max_header_line`] → 431;
//! 5. an HTTP/1.1 request without `Host`, or two `Host` lines (§3.2) → 400;
//! 6. codings other than one final `chunked` over all `Transfer-Encoding` lines: `chunked`
//!    twice or not last → 400, another coding → 501 (only `chunked` is forwarded);
//! 7. a `Content-Length` of 2^63 or more → 400, over [`Limits::max_body`] → 413.
//!
//! `Content-Length` beside `Transfer-Encoding` is not refused: chunked wins, the length is not
//! forwarded, and the connection closes after the answer (§6.1, §6.3 rule 3), as today.
//!
//! Where we are stricter than today (on purpose; `tests/h1_agrees.rs` allows exactly these):
//! - hyper stops reading `Content-Length` once it has seen `Transfer-Encoding`, so a bad or
//!   differing length after it passed, and drops one before it unchecked against 2^63; we
//!   check every length (a 400 either way is safe);
//! - a length of 2^64 - 2 or 2^64 - 1 is a 431 from hyper (its length type reserves those two
//!   values), any other length past 2^63 a 400; ours are all 400;
//! - hyper's server parses a head again only once an empty line has arrived, so a head that
//!   is malformed (or has too many lines) past its first 8 KiB read is found only when it
//!   ends, or answered 431 at 64 KiB, or closed without an answer at the header timeout; we
//!   refuse it as soon as the bytes show it, with its own status;
//! - hyper reads `Connection` tokens only from values that are visible ASCII; we read them
//!   from any value, so `close` next to an obs-text token still closes (not a refusal).
use std::mem::MaybeUninit;

use crate::error::{FramingError, SHOWN_VALUE};

use super::{list, Error, Limits, Span, MAX_CONTENT_LENGTH, MAX_HEAD, MAX_HEADERS};

/// The outcome of a parse that did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// The head is whole and `n` bytes long (its final empty line included).
    Complete(usize),
    /// More bytes are needed.
    Partial,
}

/// The HTTP version of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How a request's body is framed (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (no `Content-Length`, no `Transfer-Encoding`, rule 6).
    None,
    /// `Content-Length` bytes (rule 5); `Length(0)` is a body-less request too.
    Length(u64),
    /// `Transfer-Encoding: chunked` (rule 4).
    Chunked,
}

/// How a response's body is framed (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    /// None: the answer to HEAD, a 1xx, 204 or 304 (rules 1 and 2).
    None,
    /// `Content-Length` bytes (rule 5).
    Length(u64),
    /// Chunked (rule 4).
    Chunked,
    /// Until the upstream closes (rules 4 and 8): the connection cannot be reused.
    UntilClose,
}

/// The headers the framing and the proxy care about, found once while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Other,
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    ProxyConnection,
    ProxyAuthenticate,
    ProxyAuthorization,
    Te,
    Trailer,
    Upgrade,
    Expect,
    XForwardedFor,
    XForwardedProto,
    XRequestId,
}

impl Kind {
    /// The `http` name of a header of this kind, when `http` has a constant for it: the
    /// constant is taken instead of parsing the name again (~140 instructions a name;
    /// callgrind, #15).
    pub fn header_name(self) -> Option<http::HeaderName> {
        use http::header;
        Some(match self {
            Kind::Host => header::HOST,
            Kind::ContentLength => header::CONTENT_LENGTH,
            Kind::TransferEncoding => header::TRANSFER_ENCODING,
            Kind::Connection => header::CONNECTION,
            Kind::ProxyAuthenticate => header::PROXY_AUTHENTICATE,
            Kind::ProxyAuthorization => header::PROXY_AUTHORIZATION,
            Kind::Te => header::TE,
            Kind::Trailer => header::TRAILER,
            Kind::Upgrade => header::UPGRADE,
            Kind::Expect => header::EXPECT,
            _ => return None,
        })
    }

    /// The kind of a header named `name` (any case).
    pub fn of(name: &[u8]) -> Kind {
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        // By length first: most names are compared with nothing.
        match name.len() {
            2 if is(b"te") => Kind::Te,
            4 if is(b"host") => Kind::Host,
            6 if is(b"expect") => Kind::Expect,
            7 if is(b"trailer") => Kind::Trailer,
            7 if is(b"upgrade") => Kind::Upgrade,
            10 if is(b"connection") => Kind::Connection,
            10 if is(b"keep-alive") => Kind::KeepAlive,
            12 if is(b"x-request-id") => Kind::XRequestId,
            14 if is(b"content-length") => Kind::ContentLength,
            15 if is(b"x-forwarded-for") => Kind::XForwardedFor,
            16 if is(b"proxy-connection") => Kind::ProxyConnection,
            17 if is(b"transfer-encoding") => Kind::TransferEncoding,
            17 if is(b"x-forwarded-proto") => Kind::XForwardedProto,
            18 if is(b"proxy-authenticate") => Kind::ProxyAuthenticate,
            19 if is(b"proxy-authorization") => Kind::ProxyAuthorization,
            _ => Kind::Other,
        }
    }

    /// Hop-by-hop (RFC 9110 §7.6.1, and what `proxy.rs` drops today): never forwarded as
    /// received. `Upgrade` is put back for a tunnel, `Transfer-Encoding` is rewritten from the
    /// framing.
    pub fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            Kind::Connection
                | Kind::KeepAlive
                | Kind::ProxyConnection
                | Kind::ProxyAuthenticate
                | Kind::ProxyAuthorization
                | Kind::Te
                | Kind::Trailer
                | Kind::Upgrade
                | Kind::TransferEncoding
        )
    }
}

/// One header line: where its name and value are, and what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub name: Span,
    /// The value without surrounding whitespace (as `httparse` gives it).
    pub value: Span,
    pub kind: Kind,
    /// Where the whole line ends, its line end included (the line starts at `name.start`).
    pub line_end: u32,
    /// The line ends in CRLF (not a bare LF): it can be forwarded as it is.
    pub crlf: bool,
}

/// The header lines of a head and what their `Connection` lines say, shared by requests and
/// responses. Reused from one parse to the next, so a connection allocates once.
#[derive(Debug, Clone, Default)]
struct Fields {
    headers: Vec<Header>,
    /// The tokens of `Connection` that name other headers (not `close`, `keep-alive` or
    /// `upgrade`).
    named: Vec<Span>,
    close: bool,
    keep_alive: bool,
    upgrade_token: bool,
}

impl Fields {
    fn clear(&mut self) {
        self.headers.clear();
        self.named.clear();
        self.close = false;
        self.keep_alive = false;
        self.upgrade_token = false;
    }

    /// Records the headers `httparse` found in `buf`, reading `Connection` lines as it goes.
    /// `len` is the head's length, its final empty line included.
    fn record(&mut self, buf: &[u8], parsed: &[httparse::Header<'_>], len: usize) {
        for h in parsed {
            let name = Span::within(buf, h.name.as_bytes());
            let value = Span::within(buf, h.value);
            let kind = Kind::of(h.name.as_bytes());
            if kind == Kind::Connection {
                self.connection(buf, value);
            }
            self.headers.push(Header {
                name,
                value,
                kind,
                line_end: 0,
                crlf: false,
            });
        }
        // Lines follow each other (no obs-fold): one ends where the next starts, the last
        // where the final empty line starts.
        let last_end = len - if buf[..len].ends_with(b"\r\n") { 2 } else { 1 };
        let mut next_start = last_end as u32;
        for h in self.headers.iter_mut().rev() {
            let end = next_start as usize;
            h.line_end = next_start;
            h.crlf = end >= 2 && &buf[end - 2..end] == b"\r\n";
            next_start = h.name.start;
        }
    }

    /// The tokens of one `Connection` value (RFC 9110 §7.6.1).
    fn connection(&mut self, buf: &[u8], value: Span) {
        for token in list(value.of(buf)) {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if token.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade_token = true;
            } else if !token.is_empty() {
                self.named.push(Span::within(buf, token));
            }
        }
    }

    /// Whether `Connection` names the header `name`: it is hop-by-hop for this hop.
    fn named_in_connection(&self, buf: &[u8], name: &[u8]) -> bool {
        self.named
            .iter()
            .any(|t| t.of(buf).eq_ignore_ascii_case(name))
    }

    fn all(&self, kind: Kind) -> impl DoubleEndedIterator<Item = &Header> {
        self.headers.iter().filter(move |h| h.kind == kind)
    }
}

/// A parsed request head: offsets into the buffer it was parsed from, and its framing.
#[derive(Debug, Clone)]
pub struct RequestHead {
    /// The head's length, its final empty line included; the body starts there.
    pub len: usize,
    pub method: Span,
    /// The request target, without a fragment.
    pub target: Span,
    pub version: Version,
    pub body: BodyFraming,
    /// Whether the connection may carry another request after this one's answer.
    pub keep_alive: bool,
    /// An `Upgrade` header on an HTTP/1.1 request.
    pub upgrade: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// The `Host` value, when there is one (there is at most one).
    pub host: Option<Span>,
    fields: Fields,
}

impl Default for RequestHead {
    fn default() -> Self {
        RequestHead {
            len: 0,
            method: Span::default(),
            target: Span::default(),
            version: Version::Http11,
            body: BodyFraming::None,
            keep_alive: false,
            upgrade: false,
            expect_continue: false,
            host: None,
            fields: Fields {
                headers: Vec::with_capacity(32),
                ..Fields::default()
            },
        }
    }
}

impl RequestHead {
    /// Parses the request head at the start of `buf` into `self` (reusing its storage). On
    /// `Partial` or an error, `self` holds nothing worth reading.
    pub fn parse(&mut self, buf: &[u8], limits: &Limits) -> Result<Parse, Error> {
        self.fields.clear();
        // Nothing past the limit is looked at: a head that has not ended by then is too large,
        // whatever follows.
        let buf = &buf[..buf.len().min(MAX_HEAD)];
        let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(Error::TooLarge("the head is over 64 KiB"))
            }
            Ok(httparse::Status::Partial) => return Ok(Parse::Partial),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Error::TooLarge("more than 100 header lines"))
            }
            Err(e) => return Err(Error::Malformed(malformed(e))),
        };
        if len > MAX_HEAD {
            return Err(Error::TooLarge("the head is over 64 KiB"));
        }
        let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version)
        else {
            return Err(Error::Malformed("incomplete request line"));
        };
        self.len = len;
        self.method = Span::within(buf, method.as_bytes());
        self.target = check_target(buf, target.as_bytes())?;
        self.version = if version == 1 {
            Version::Http11
        } else {
            Version::Http10
        };
        self.fields.record(buf, req.headers, len);
        self.frame(buf, limits)?;
        Ok(Parse::Complete(len))
    }

    /// Steps 3 to 7 of the module doc, and the facts.
    fn frame(&mut self, buf: &[u8], limits: &Limits) -> Result<(), Error> {
        let v11 = self.version == Version::Http11;
        let mut length = None;
        let mut te = false;
        let mut too_long = None;
        let (mut hosts, mut host) = (0, None);
        let (mut upgrade, mut expect) = (false, false);
        for h in &self.fields.headers {
            let value = h.value.of(buf);
            match h.kind {
                Kind::ContentLength => {
                    let n = parse_length(value)
                        .ok_or_else(|| FramingError::InvalidContentLength(cut(value)))?;
                    if length.is_some_and(|prev| prev != n) {
                        let all = joined(buf, self.fields.all(Kind::ContentLength));
                        return Err(FramingError::InvalidContentLength(all).into());
                    }
                    length = Some(n);
                }
                Kind::TransferEncoding if !v11 => {
                    return Err(Error::Malformed("Transfer-Encoding in an HTTP/1.0 request"))
                }
                Kind::TransferEncoding => te = true,
                Kind::Host => {
                    hosts += 1;
                    host = host.or(Some(h.value));
                }
                Kind::Upgrade => upgrade = v11,
                Kind::Expect => expect = value.eq_ignore_ascii_case(b"100-continue"),
                _ => {}
            }
            if too_long.is_none() && h.name.len() + h.value.len() > limits.max_header_line {
                too_long = Some(FramingError::HeaderLineTooLong {
                    name: String::from_utf8_lossy(h.name.of(buf)).into_owned(),
                    len: h.name.len() + h.value.len(),
                    max: limits.max_header_line,
                });
            }
        }
        if te {
            // hyper reads the last line only, as text: its last coding must be chunked.
            let last = self.fields.all(Kind::TransferEncoding).next_back();
            let last = last.map_or(&b""[..], |h| h.value.of(buf));
            let text = last
                .iter()
                .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b));
            if !text || !list(last).next_back().is_some_and(is_chunked) {
                let all = joined(buf, self.fields.all(Kind::TransferEncoding));
                return Err(FramingError::InvalidTransferEncoding(all).into());
            }
        }
        if let Some(e) = too_long {
            return Err(e.into());
        }
        match hosts {
            0 if v11 => return Err(FramingError::MissingHost.into()),
            0 | 1 => {}
            _ => {
                let all = self.fields.all(Kind::Host).map(|h| cut(h.value.of(buf)));
                return Err(FramingError::DuplicateHost(all.collect()).into());
            }
        }
        if te {
            self.check_codings(buf)?;
        }
        if let Some(len) = length.filter(|&n| n > MAX_CONTENT_LENGTH) {
            return Err(FramingError::InvalidContentLength(len.to_string()).into());
        }
        if let Some((len, max)) = length.zip(limits.max_body).filter(|(l, m)| !te && l > m) {
            return Err(FramingError::BodyTooLarge { len, max }.into());
        }
        self.body = match (te, length) {
            (true, _) => BodyFraming::Chunked,
            (false, Some(n)) => BodyFraming::Length(n),
            (false, None) => BodyFraming::None,
        };
        let f = &self.fields;
        // §9.3: HTTP/1.1 persists unless closed, HTTP/1.0 only when asked; a length beside
        // chunked closes after the answer (§6.1).
        self.keep_alive = !f.close && (v11 || f.keep_alive) && !(te && length.is_some());
        self.upgrade = upgrade;
        self.expect_continue = expect;
        self.host = host;
        Ok(())
    }

    /// Step 6: the codings of every `Transfer-Encoding` line, in order, are one final
    /// `chunked` (RFC 9112 §6.1, §7).
    fn check_codings(&self, buf: &[u8]) -> Result<(), FramingError> {
        let codings = || {
            self.fields
                .all(Kind::TransferEncoding)
                .flat_map(|h| list(h.value.of(buf)))
                // Empty list elements mean nothing (RFC 9110 §5.6.1).
                .filter(|c| !c.is_empty())
        };
        let all = || joined(buf, self.fields.all(Kind::TransferEncoding));
        if codings().filter(|c| is_chunked(c)).count() != 1
            || !codings().next_back().is_some_and(is_chunked)
        {
            return Err(FramingError::InvalidTransferEncoding(all()));
        }
        match codings().find(|c| !is_chunked(c)) {
            Some(unknown) => Err(FramingError::UnknownCoding {
                coding: cut(unknown),
                value: all(),
            }),
            None => Ok(()),
        }
    }

    /// Every header line, in the order received.
    pub fn headers(&self) -> &[Header] {
        &self.fields.headers
    }

    /// Gives back the storage kept from one parse to the next (an idle connection's); the
    /// next parse allocates it again.
    pub fn release(&mut self) {
        self.fields.headers = Vec::new();
        self.fields.named = Vec::new();
    }

    /// Whether `Connection` names the header `name` (so it is not forwarded).
    pub fn named_in_connection(&self, buf: &[u8], name: &[u8]) -> bool {
        !self.fields.named.is_empty() && self.fields.named_in_connection(buf, name)
    }

    /// Whether any `Connection` token names a header.
    pub fn connection_names_headers(&self) -> bool {
        !self.fields.named.is_empty()
    }

    /// A WebSocket-style upgrade the proxy tunnels (what `tunnel::is_upgrade` says today):
    /// HTTP/1.1, `Upgrade` present and not naming `h2c`, `Connection` naming `upgrade`.
    pub fn is_tunnel_upgrade(&self, buf: &[u8]) -> bool {
        self.upgrade
            && self.fields.upgrade_token
            && self
                .fields
                .all(Kind::Upgrade)
                .next()
                .is_some_and(|h| !list(h.value.of(buf)).any(|p| p.eq_ignore_ascii_case(b"h2c")))
    }
}

/// A parsed response head.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub version: Version,
    pub body: ResponseBody,
    /// Whether the upstream connection may be used again after this body.
    pub keep_alive: bool,
    fields: Fields,
}

impl Default for ResponseHead {
    fn default() -> Self {
        ResponseHead {
            len: 0,
            status: 0,
            version: Version::Http11,
            body: ResponseBody::None,
            keep_alive: false,
            fields: Fields {
                headers: Vec::with_capacity(16),
                ..Fields::default()
            },
        }
    }
}

impl ResponseHead {
    /// Parses the response head at the start of `buf`, the answer to a request that was HEAD
    /// when `to_head` (RFC 9112 §6.3 rule 1). A 1xx other than 101 is a whole head with no body
    /// after which the real answer follows ([`ResponseHead::is_interim`]).
    pub fn parse(&mut self, buf: &[u8], to_head: bool) -> Result<Parse, Error> {
        self.fields.clear();
        let buf = &buf[..buf.len().min(MAX_HEAD)];
        let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(Error::BadResponse("the head is over 64 KiB"))
            }
            Ok(httparse::Status::Partial) => return Ok(Parse::Partial),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Error::BadResponse("more than 100 header lines"))
            }
            Err(e) => return Err(Error::BadResponse(malformed(e))),
        };
        if len > MAX_HEAD {
            return Err(Error::BadResponse("the head is over 64 KiB"));
        }
        let (Some(code), Some(version)) = (res.code, res.version) else {
            return Err(Error::BadResponse("incomplete status line"));
        };
        if !(100..=999).contains(&code) {
            return Err(Error::BadResponse("invalid status code"));
        }
        self.len = len;
        self.status = code;
        self.version = if version == 1 {
            Version::Http11
        } else {
            Version::Http10
        };
        self.fields.record(buf, res.headers, len);
        self.frame(buf, to_head)?;
        Ok(Parse::Complete(len))
    }

    fn frame(&mut self, buf: &[u8], to_head: bool) -> Result<(), Error> {
        let mut length = None;
        let mut last_te = None;
        for h in &self.fields.headers {
            match h.kind {
                Kind::ContentLength => {
                    // §6.3 rule 5: a length that is not one is unrecoverable.
                    let n = parse_length(h.value.of(buf))
                        .filter(|&n| n <= MAX_CONTENT_LENGTH)
                        .ok_or(Error::BadResponse("invalid Content-Length"))?;
                    if length.is_some_and(|prev| prev != n) {
                        return Err(Error::BadResponse("differing Content-Length values"));
                    }
                    length = Some(n);
                }
                Kind::TransferEncoding => last_te = Some(h.value),
                _ => {}
            }
        }
        let f = &self.fields;
        let v11 = self.version == Version::Http11;
        let mut keep_alive = !f.close && (v11 || f.keep_alive);
        let status = self.status;
        self.body = if to_head || (100..200).contains(&status) || status == 204 || status == 304 {
            ResponseBody::None
        } else if let Some(te) = last_te {
            // §6.1: both, or Transfer-Encoding from HTTP/1.0, is faulty framing: close after.
            if length.is_some() || !v11 {
                keep_alive = false;
            }
            if list(te.of(buf)).next_back().is_some_and(is_chunked) {
                ResponseBody::Chunked
            } else {
                ResponseBody::UntilClose
            }
        } else if let Some(n) = length {
            ResponseBody::Length(n)
        } else {
            ResponseBody::UntilClose
        };
        if self.body == ResponseBody::UntilClose || status == 101 {
            keep_alive = false;
        }
        self.keep_alive = keep_alive;
        Ok(())
    }

    /// A 1xx answer other than 101: the final answer follows it on the same connection.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }

    pub fn headers(&self) -> &[Header] {
        &self.fields.headers
    }

    /// Whether `Connection` names the header `name`.
    pub fn named_in_connection(&self, buf: &[u8], name: &[u8]) -> bool {
        !self.fields.named.is_empty() && self.fields.named_in_connection(buf, name)
    }
}

/// Checks the request target (RFC 9112 §3.2) as hyper's `http::Uri` does and returns its
/// span without a fragment. The origin form (`/path?query`, nearly every request) is checked
/// here without allocating; the other forms go through `http::Uri`.
fn check_target(buf: &[u8], target: &[u8]) -> Result<Span, Error> {
    let bad = Error::Malformed("invalid request target");
    if target.first() != Some(&b'/') {
        return match http::Uri::try_from(target) {
            Ok(_) => Ok(Span::within(buf, target)),
            Err(_) => Err(bad),
        };
    }
    // `http`'s path and query byte classes (WHATWG URL path and query states): visible
    // ASCII, but in a path not `<`, `>` or a backtick, in a query not `"`, `<` or `>`; bytes
    // of 0x80 and up only as UTF-8. One pass, up to a fragment.
    let (mut end, mut query, mut high) = (target.len(), false, false);
    for (i, &b) in target.iter().enumerate() {
        match b {
            b'#' => {
                end = i;
                break;
            }
            0x80.. => high = true,
            b'?' => query = true,
            b'<' | b'>' => return Err(bad),
            b'`' if !query => return Err(bad),
            b'"' if query => return Err(bad),
            b'!'..=b'~' => {}
            _ => return Err(bad),
        }
    }
    let kept = &target[..end];
    if high && std::str::from_utf8(kept).is_err() {
        return Err(bad);
    }
    Ok(Span::within(buf, kept))
}

fn is_chunked(coding: &[u8]) -> bool {
    coding.eq_ignore_ascii_case(b"chunked")
}

/// A `Content-Length` value as a number: digits only, no sign, no list (RFC 9110 §8.6).
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// What `httparse` refused, in words.
fn malformed(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name (obs-fold, or space before the colon)",
        httparse::Error::HeaderValue => "invalid byte in a header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid method or request target",
        httparse::Error::Version => "not HTTP/1.0 or HTTP/1.1",
        httparse::Error::TooManyHeaders => "too many header lines",
    }
}

/// A client-sent value as an error shows it: lossy UTF-8, cut to [`SHOWN_VALUE`] bytes.
fn cut(v: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(&v[..v.len().min(SHOWN_VALUE)]).into_owned();
    if v.len() > SHOWN_VALUE {
        s.push('…');
    }
    s
}

/// Several lines of one header as one value, `, `-joined (RFC 9110 §5.3), then cut.
fn joined<'a>(buf: &[u8], lines: impl Iterator<Item = &'a Header>) -> String {
    let mut all = Vec::new();
    for h in lines {
        if !all.is_empty() {
            all.extend_from_slice(b", ");
        }
        all.extend_from_slice(h.value.of(buf));
    }
    cut(&all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<RequestHead, Error> {
        let mut h = RequestHead::default();
        match h.parse(bytes, &Limits::default())? {
            Parse::Complete(n) => {
                assert_eq!(n, h.len);
                Ok(h)
            }
            Parse::Partial => panic!(
                "partial: {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ),
        }
    }

    /// The status a request with these header lines gets (200 when accepted).
    fn status_of(lines: &str) -> u16 {
        let req = format!("POST / HTTP/1.1\r\n{}\r\n", ended(lines));
        parse(req.as_bytes()).map_or_else(|e| e.status().as_u16(), |_| 200)
    }

    /// Header lines with their last line ended.
    fn ended(lines: &str) -> String {
        match lines.ends_with("\r\n") {
            true => lines.to_string(),
            false => format!("{lines}\r\n"),
        }
    }

    fn framing(lines: &str) -> BodyFraming {
        let req = format!("POST / HTTP/1.1\r\nHost: svc\r\n{}\r\n", ended(lines));
        parse(req.as_bytes()).unwrap().body
    }

    #[test]
    fn a_plain_request() {
        let buf = b"GET /a/b?c=d#frag HTTP/1.1\r\nHost: svc\r\nUser-Agent:  curl/8 \r\n\r\nrest";
        let h = parse(buf).unwrap();
        assert_eq!(h.method.of(buf), b"GET");
        assert_eq!(h.target.of(buf), b"/a/b?c=d", "the fragment is cut off");
        assert_eq!(h.version, Version::Http11);
        assert_eq!(h.len, buf.len() - 4);
        assert_eq!(h.body, BodyFraming::None);
        assert!(h.keep_alive);
        assert_eq!(h.host.unwrap().of(buf), b"svc");
        let names: Vec<_> = h.headers().iter().map(|x| x.name.of(buf)).collect();
        assert_eq!(names, [&b"Host"[..], b"User-Agent"]);
        assert_eq!(h.headers()[1].value.of(buf), b"curl/8");
        assert_eq!(h.headers()[0].kind, Kind::Host);
    }

    #[test]
    fn partial_heads_ask_for_more_and_a_huge_one_is_431() {
        let full = b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n";
        let mut h = RequestHead::default();
        for n in 0..full.len() {
            assert_eq!(h.parse(&full[..n], &Limits::default()), Ok(Parse::Partial));
        }
        let mut big = b"GET / HTTP/1.1\r\nHost: svc\r\n".to_vec();
        for i in 0..9 {
            big.extend_from_slice(format!("X-{i}: {}\r\n", "a".repeat(8 * 1024)).as_bytes());
        }
        let e = h.parse(&big, &Limits::default()).unwrap_err();
        assert_eq!(e.status(), 431, "partial and over 64 KiB");
        big.extend_from_slice(b"\r\n");
        assert_eq!(h.parse(&big, &Limits::default()).unwrap_err().status(), 431);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(status_of(&format!("Host: svc\r\n{many}")), 431);
        let fits: String = (1..MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(status_of(&format!("Host: svc\r\n{fits}")), 200);
    }

    #[test]
    fn line_shapes_httparse_refuses_are_400() {
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\n folded\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\n\tfolded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : svc\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: svc\rX: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: s\x01vc\r\n\r\n",
            b"GET  / HTTP/1.1\r\nHost: svc\r\n\r\n",
            b"GET / HTTP/1.2\r\nHost: svc\r\n\r\n",
            b"GET / HTTP/2.0\r\nHost: svc\r\n\r\n",
            b"G(T / HTTP/1.1\r\nHost: svc\r\n\r\n",
            b"GET / HTTP/1.1\r\nX(: 1\r\nHost: svc\r\n\r\n",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.status(), 400, "{:?}: {e}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn bare_lf_line_ends_and_leading_empty_lines_are_read() {
        let buf = b"\r\n\nGET / HTTP/1.1\nHost: svc\nX-A: 1 \r\n\n";
        let h = parse(buf).unwrap();
        assert_eq!(h.method.of(buf), b"GET");
        assert_eq!(h.len, buf.len());
        let lines: Vec<_> = h
            .headers()
            .iter()
            .map(|x| (&buf[x.name.start as usize..x.line_end as usize], x.crlf))
            .collect();
        assert_eq!(
            lines,
            [(&b"Host: svc\n"[..], false), (b"X-A: 1 \r\n", true)]
        );
        let buf = b"GET / HTTP/1.1\r\nHost: svc\n\r\n";
        let h = parse(buf).unwrap();
        assert_eq!(
            (h.headers()[0].line_end as usize, h.headers()[0].crlf),
            (buf.len() - 2, false)
        );
    }

    #[test]
    fn targets_that_are_not_uris_are_400() {
        let target = |t: &[u8]| {
            let mut req = b"GET ".to_vec();
            req.extend_from_slice(t);
            req.extend_from_slice(b" HTTP/1.1\r\nHost: svc\r\n\r\n");
            parse(&req).map(|h| h.target.of(&req).to_vec())
        };
        for good in [
            &b"/"[..],
            b"*",
            b"/a{\"json\"}",
            b"/?q=`x`",
            b"http://svc/x",
            b"svc:80",
            "/é".as_bytes(),
        ] {
            assert_eq!(target(good), Ok(good.to_vec()), "{good:?}");
        }
        for bad in [&b"/<"[..], b"/`", b"/?a=\"", b"/?<", b"/\xff", b"x y"] {
            assert!(target(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn lengths() {
        assert_eq!(framing("Content-Length: 5"), BodyFraming::Length(5));
        assert_eq!(
            framing("Content-Length: 5\r\nContent-Length: 5"),
            BodyFraming::Length(5)
        );
        assert_eq!(framing("Content-Length: 0"), BodyFraming::Length(0));
        assert_eq!(framing("X: 1"), BodyFraming::None);
        let cl = |v: &str| status_of(&format!("Host: svc\r\nContent-Length: {v}"));
        assert_eq!(cl("9223372036854775807"), 200);
        for bad in [
            "9223372036854775808",
            "18446744073709551613",
            "18446744073709551616",
            "+5",
            "-5",
            "5, 5",
            "0x5",
            "",
            "5 5",
        ] {
            assert_eq!(cl(bad), 400, "{bad:?}");
        }
        assert_eq!(
            status_of("Host: svc\r\nContent-Length: 5\r\nContent-Length: 6"),
            400
        );
        let req = b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 9223372036854775808\r\n\r\n";
        let e = parse(req).unwrap_err();
        assert!(e.to_string().contains("9223372036854775808"), "{e}");
    }

    #[test]
    fn a_length_over_the_limit_is_413() {
        let limits = Limits {
            max_body: Some(10),
            ..Limits::default()
        };
        let mut h = RequestHead::default();
        let req = |n: u32| format!("POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: {n}\r\n\r\n");
        assert!(h.parse(req(10).as_bytes(), &limits).is_ok());
        let e = h.parse(req(11).as_bytes(), &limits).unwrap_err();
        assert_eq!(
            e,
            Error::Framing(FramingError::BodyTooLarge { len: 11, max: 10 })
        );
        assert_eq!(e.status(), 413);
    }

    #[test]
    fn transfer_codings() {
        let te = |lines: &[&str]| {
            let lines: String = lines
                .iter()
                .map(|v| format!("Transfer-Encoding: {v}\r\n"))
                .collect();
            status_of(&format!("Host: svc\r\n{lines}"))
        };
        assert_eq!(te(&["chunked"]), 200);
        assert_eq!(te(&["ChUnKeD"]), 200);
        assert_eq!(te(&[" , chunked"]), 200);
        assert_eq!(te(&["x", "chunked"]), 501);
        assert_eq!(te(&["gzip, chunked"]), 501);
        assert_eq!(te(&["chunked", "chunked"]), 400);
        assert_eq!(te(&["chunked, chunked"]), 400);
        assert_eq!(te(&["xchunked"]), 400);
        assert_eq!(te(&["chunked, identity"]), 400);
        assert_eq!(te(&["chunked", "x"]), 400);
        assert_eq!(te(&["chunked, "]), 400);
        assert_eq!(te(&["gzip"]), 400);
        assert_eq!(te(&[""]), 400);
        // Not text on the last line: hyper refuses it before the codings are read.
        assert_eq!(te(&["\u{e9}, chunked"]), 400);
        assert_eq!(te(&["\u{e9}", "chunked"]), 501);
        assert_eq!(framing("Transfer-Encoding: chunked"), BodyFraming::Chunked);
        let e = parse(b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "not implemented: transfer coding \"x\" in Transfer-Encoding \"x, chunked\""
        );
        // HTTP/1.0 has no transfer codings.
        let e = parse(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err();
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn a_length_beside_chunked_is_dropped_and_the_connection_closes() {
        let buf = b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n";
        let h = parse(buf).unwrap();
        assert_eq!(h.body, BodyFraming::Chunked);
        assert!(!h.keep_alive);
        // Either order; and every length must still be one (stricter than hyper, which stops
        // reading lengths after Transfer-Encoding).
        let after = "Transfer-Encoding: chunked\r\nContent-Length: 4";
        assert_eq!(framing(after), BodyFraming::Chunked);
        assert_eq!(
            status_of("Host: svc\r\nTransfer-Encoding: chunked\r\nContent-Length: x"),
            400
        );
        assert_eq!(
            status_of(
                "Host: svc\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nContent-Length: 6"
            ),
            400
        );
        // Content-Length with a non-chunked coding: 400 (the coding).
        assert_eq!(
            status_of("Host: svc\r\nTransfer-Encoding: gzip\r\nContent-Length: 5"),
            400
        );
    }

    #[test]
    fn host_once_in_http_1_1() {
        assert_eq!(status_of("X: 1"), 400);
        let e = parse(b"GET / HTTP/1.1\r\nHost: svc\r\nHost: other\r\n\r\n").unwrap_err();
        assert_eq!(e.to_string(), "bad request: 2 Host headers (svc, other)");
        assert_eq!(status_of("Host: svc\r\nHost: svc"), 400);
        let h = parse(b"GET /svc/x HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!((h.host, h.version), (None, Version::Http10));
        assert!(parse(b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n").is_err());
    }

    #[test]
    fn a_header_line_over_the_limit_is_431_after_hypers_400s() {
        let max = DEFAULT_MAX_HEADER_LINE;
        let fits = "a".repeat(max - "X-Big".len());
        assert_eq!(status_of(&format!("Host: svc\r\nX-Big: {fits}")), 200);
        let e = parse(format!("GET / HTTP/1.1\r\nHost: svc\r\nX-Big: {fits}a\r\n\r\n").as_bytes())
            .unwrap_err();
        assert_eq!(
            e,
            Error::Framing(FramingError::HeaderLineTooLong {
                name: "X-Big".into(),
                len: max + 1,
                max
            })
        );
        assert_eq!(e.status(), 431);
        // A refusal hyper makes itself comes first, as today.
        let both = format!("Host: svc\r\nX-Big: {fits}a\r\nContent-Length: x");
        assert_eq!(status_of(&both), 400);
        // And ours in check_request_head's order: the long line before the missing Host.
        assert_eq!(status_of(&format!("X-Big: {fits}a")), 431);
    }

    use super::super::DEFAULT_MAX_HEADER_LINE;

    #[test]
    fn keep_alive_and_upgrade() {
        let ka = |req: &str| parse(req.as_bytes()).unwrap().keep_alive;
        assert!(ka("GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        ));
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: x, Close\r\n\r\n"
        ));
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n"
        ));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(!ka(
            "GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"
        ));
        let buf = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, x-a\r\nUpgrade: websocket\r\nExpect: 100-continue\r\n\r\n";
        let h = parse(buf).unwrap();
        assert!(h.upgrade && h.is_tunnel_upgrade(buf) && h.expect_continue);
        assert!(h.named_in_connection(buf, b"X-A"));
        assert!(!h.named_in_connection(buf, b"upgrade"));
        let h2c = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n";
        assert!(!parse(h2c).unwrap().is_tunnel_upgrade(h2c));
        let no_token = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n";
        let h = parse(no_token).unwrap();
        assert!(h.upgrade && !h.is_tunnel_upgrade(no_token));
        let v10 = b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
        assert!(!parse(v10).unwrap().upgrade);
    }

    #[test]
    fn a_head_is_reused() {
        let mut h = RequestHead::default();
        let a = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x\r\nContent-Length: 3\r\n\r\n";
        let b = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n";
        h.parse(a, &Limits::default()).unwrap();
        assert_eq!(h.body, BodyFraming::Length(3));
        h.parse(b, &Limits::default()).unwrap();
        assert_eq!((h.body, h.headers().len()), (BodyFraming::None, 1));
        assert!(!h.connection_names_headers());
    }

    fn response(bytes: &[u8], to_head: bool) -> Result<ResponseHead, Error> {
        let mut r = ResponseHead::default();
        match r.parse(bytes, to_head)? {
            Parse::Complete(_) => Ok(r),
            Parse::Partial => panic!("partial"),
        }
    }

    #[test]
    fn response_framing() {
        let body = |head: &str, to_head: bool| {
            let r = response(head.as_bytes(), to_head).unwrap();
            (r.body, r.keep_alive)
        };
        use ResponseBody::*;
        assert_eq!(
            body("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", false),
            (Length(2), true)
        );
        assert_eq!(
            body("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", true),
            (None, true)
        );
        for s in ["100 Continue", "204 No Content", "304 Not Modified"] {
            let head = format!("HTTP/1.1 {s}\r\nContent-Length: 2\r\n\r\n");
            assert_eq!(body(&head, false).0, None, "{s}");
        }
        assert!(response(b"HTTP/1.1 103 Early Hints\r\n\r\n", false)
            .unwrap()
            .is_interim());
        let up = response(
            b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(!up.is_interim() && !up.keep_alive);
        assert_eq!(
            body(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            ),
            (Chunked, true)
        );
        assert_eq!(
            body(
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            ),
            (Chunked, false)
        );
        assert_eq!(
            body("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false),
            (UntilClose, false)
        );
        assert_eq!(body("HTTP/1.1 200 OK\r\n\r\n", false), (UntilClose, false));
        assert_eq!(
            body("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false),
            (Length(1), false)
        );
        assert_eq!(
            body(
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
                false
            ),
            (Length(1), true)
        );
        assert_eq!(
            body(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                false
            ),
            (Length(1), false)
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: 1\r\n y\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
        ] {
            let e = response(bad, false).unwrap_err();
            assert_eq!(e.status(), 502, "{:?}", String::from_utf8_lossy(bad));
        }
        let mut r = ResponseHead::default();
        assert_eq!(r.parse(b"HTTP/1.1 200 OK\r\nX:", false), Ok(Parse::Partial));
    }
}
