//! `Upgrade: h2c` on the proxy port (RFC 7540 §3.2): an HTTP/1.1 connection whose first request
//! asks to switch to HTTP/2 in clear text is answered `101 Switching Protocols`, and from then
//! on speaks HTTP/2, the request itself being stream 1.
//!
//! hyper has no server side for this, so it is done before hyper sees the connection: [`sniff`]
//! reads the first request head (the listener's header timeout and [`MAX_HEAD`] bound it) and,
//! only when it is an upgrade this module can carry, writes the `101` and hands back an
//! [`Upgraded`] IO for the HTTP/2 server; anything else is handed back as it was read
//! ([`Replay`]) for the HTTP/1.1 server, byte for byte, so every HTTP/1.1 rule (framing, limits,
//! timeouts) applies to it as before. A head without `h2c` in it is not even parsed.
//!
//! The upgrade is taken only when it is unambiguous, else the request is served as plain
//! HTTP/1.1 (the RFC lets a server ignore `Upgrade`): HTTP/1.1, origin-form target, not
//! `CONNECT`, exactly one `Host`, `Upgrade` naming `h2c` and `Connection` naming both `upgrade`
//! and `http2-settings`, exactly one well-formed `HTTP2-Settings` (base64url of whole settings
//! with valid values), no request body (no `Transfer-Encoding`, no `Content-Length` but `0`),
//! nothing sent after the head (a client may not pipeline past an upgrade), and a header block
//! that fits one frame.
//!
//! After the `101`, the client sends the HTTP/2 preface and its SETTINGS (which carry what
//! `HTTP2-Settings` did). [`Upgraded`] passes them to the HTTP/2 server unchanged and then,
//! before any other byte of the client's, a HEADERS frame for stream 1 (END_STREAM: the request
//! had no body, so the stream is half-closed from the client) holding the request as HTTP/2
//! fields: `:method`, `:scheme` `http`, `:authority` from `Host`, `:path`, then the headers,
//! names lower-cased, connection-specific ones (and those `Connection` names) left out. The
//! block is HPACK *literals without indexing*, so the server's decoder table is the same as if
//! the frame had never been there. The server answers stream 1 like any other; the client
//! numbers its own streams from 3. If the preface or the first frame is not what HTTP/2 says,
//! nothing is injected and the HTTP/2 server refuses the connection as it would any broken one.
//!
//! A leaf (layer 1): `std`, `tokio`, `http`, `httparse`, `base64`, and the preface from
//! `h2server.rs`.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::h2server::PREFACE;
use crate::io::write_through;

/// Longest first request head read before deciding (the HTTP/1.1 server's own head limit: a
/// longer one is handed on as read, and refused there with 431).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most headers in an upgrade request (the HTTP/1.1 server's limit; more is plain HTTP/1.1,
/// refused there).
pub const MAX_HEADERS: usize = 100;
/// Largest HEADERS frame payload injected: HTTP/2's default `SETTINGS_MAX_FRAME_SIZE`, which
/// the agent's server keeps. A larger request is served as HTTP/1.1.
pub const MAX_BLOCK: usize = 16_384;
/// The answer to an upgrade.
pub const SWITCHING: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";

/// What the first request of an HTTP/1.1 connection came to.
pub enum Sniffed<I> {
    /// Serve it as HTTP/1.1: the IO with what was read put back.
    Http1(Replay<I>),
    /// The `101` is written: serve HTTP/2 on this IO, the request being stream 1.
    Upgraded(Upgraded<I>),
}

/// Reads the first request head from `io` and upgrades the connection to HTTP/2 when the
/// request asks for `h2c` in a way this module carries (see the module doc); otherwise gives
/// the IO back with the bytes read replayed. EOF or [`MAX_HEAD`] before the head ends: as read.
pub async fn sniff<I: AsyncRead + AsyncWrite + Unpin>(mut io: I) -> io::Result<Sniffed<I>> {
    let mut buf = Vec::with_capacity(4096);
    let end = loop {
        let searched = buf.len().saturating_sub(3);
        if buf.len() >= MAX_HEAD {
            break None;
        }
        let n = io.read_buf(&mut buf).await?;
        if n == 0 {
            break None;
        }
        if let Some(i) = find(&buf[searched..], b"\r\n\r\n") {
            break Some(searched + i + 4);
        }
        if buf.len() == buf.capacity() && buf.len() < MAX_HEAD {
            buf.reserve(buf.len().min(MAX_HEAD - buf.len()));
        }
    };
    let frame = match end {
        // Nothing may follow the head of an upgrade request: no body, no pipelined request.
        Some(end) if end == buf.len() && contains_h2c(&buf) => upgrade_frame(&buf),
        _ => None,
    };
    match frame {
        Some(frame) => {
            io.write_all(SWITCHING).await?;
            io.flush().await?;
            Ok(Sniffed::Upgraded(Upgraded {
                inner: io,
                phase: Phase::Preface(0),
                frame,
            }))
        }
        None => Ok(Sniffed::Http1(Replay {
            buf,
            pos: 0,
            inner: io,
        })),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains_h2c(head: &[u8]) -> bool {
    head.windows(3).any(|w| w.eq_ignore_ascii_case(b"h2c"))
}

/// Whether a comma-separated header value names `token` (any case).
fn names(value: &[u8], token: &str) -> bool {
    std::str::from_utf8(value)
        .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Headers that mean something for one HTTP/1.1 connection only and are malformed in HTTP/2
/// (RFC 9113 §8.2.2), or that become pseudo-headers.
const NOT_CARRIED: [&str; 7] = [
    "connection",
    "upgrade",
    "http2-settings",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "host",
];

/// The HEADERS frame (stream 1, END_STREAM | END_HEADERS) carrying the upgrade request in
/// `head`, or `None` when it is not an upgrade this module takes (the module doc lists why).
pub fn upgrade_frame(head: &[u8]) -> Option<Vec<u8>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        _ => return None,
    }
    let (method, path) = (req.method?, req.path?);
    if req.version != Some(1) || method == "CONNECT" || !path.starts_with('/') {
        return None;
    }
    let (mut host, mut settings) = (None, None);
    let (mut upgrade_h2c, mut conn_upgrade, mut conn_settings) = (false, false, false);
    for h in req.headers.iter() {
        let n = h.name;
        if n.eq_ignore_ascii_case("host") {
            if host.replace(h.value).is_some() {
                return None;
            }
        } else if n.eq_ignore_ascii_case("http2-settings") {
            if settings.replace(h.value).is_some() {
                return None;
            }
        } else if n.eq_ignore_ascii_case("upgrade") {
            upgrade_h2c |= names(h.value, "h2c");
        } else if n.eq_ignore_ascii_case("connection") {
            conn_upgrade |= names(h.value, "upgrade");
            conn_settings |= names(h.value, "http2-settings");
        } else if n.eq_ignore_ascii_case("transfer-encoding")
            || (n.eq_ignore_ascii_case("content-length") && trim(h.value) != b"0")
        {
            // A body: not an upgrade this module takes.
            return None;
        }
    }
    let host = trim(host?);
    if !(upgrade_h2c && conn_upgrade && conn_settings) {
        return None;
    }
    // What the HTTP/2 server would refuse as a malformed stream is left to the HTTP/1.1
    // server, which answers it 400.
    if http::uri::Authority::try_from(host).is_err()
        || http::uri::PathAndQuery::try_from(path).is_err()
    {
        return None;
    }
    if !valid_settings(trim(settings?)) {
        return None;
    }
    // Headers `Connection` names are this connection's only.
    let named_by_connection = |name: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .any(|h| names(h.value, name))
    };
    let mut block = Vec::with_capacity(head.len());
    literal(&mut block, b":method", method.as_bytes());
    literal(&mut block, b":scheme", b"http");
    literal(&mut block, b":authority", host);
    literal(&mut block, b":path", path.as_bytes());
    let mut lower = Vec::new();
    for h in req.headers.iter() {
        if NOT_CARRIED.iter().any(|n| h.name.eq_ignore_ascii_case(n)) || named_by_connection(h.name)
        {
            continue;
        }
        let value = trim(h.value);
        if h.name.eq_ignore_ascii_case("te") && !value.eq_ignore_ascii_case(b"trailers") {
            continue;
        }
        lower.clear();
        lower.extend(h.name.bytes().map(|b| b.to_ascii_lowercase()));
        literal(&mut block, &lower, value);
    }
    if block.len() > MAX_BLOCK {
        return None;
    }
    let len = block.len() as u32;
    let mut frame = Vec::with_capacity(9 + block.len());
    frame.extend_from_slice(&len.to_be_bytes()[1..]);
    frame.push(0x1); // HEADERS
    frame.push(0x1 | 0x4); // END_STREAM | END_HEADERS
    frame.extend_from_slice(&1u32.to_be_bytes()); // stream 1
    frame.extend_from_slice(&block);
    Some(frame)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = v.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(s), Some(e)) => &v[s..=e],
        _ => &[],
    }
}

/// `HTTP2-Settings`: base64url (padding tolerated) of a SETTINGS payload, whole 6-byte
/// settings, the values of the known ones in range (RFC 9113 §6.5.2).
fn valid_settings(value: &[u8]) -> bool {
    const URL_SAFE_ANY_PAD: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let Ok(payload) = URL_SAFE_ANY_PAD.decode(value) else {
        return false;
    };
    payload.len() % 6 == 0
        && payload.chunks_exact(6).all(|s| {
            let id = u16::from_be_bytes([s[0], s[1]]);
            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match id {
                0x2 => v <= 1,                             // ENABLE_PUSH
                0x4 => v <= 0x7fff_ffff,                   // INITIAL_WINDOW_SIZE
                0x5 => (16_384..=16_777_215).contains(&v), // MAX_FRAME_SIZE
                _ => true,
            }
        })
}

/// One HPACK "literal header field without indexing, new name" (RFC 7541 §6.2.2), strings
/// not Huffman-coded.
fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    string(out, name);
    string(out, value);
}

/// An HPACK string literal: H = 0 and the length as a 7-bit-prefix integer (RFC 7541 §5.1,
/// §5.2), then the octets.
fn string(out: &mut Vec<u8>, s: &[u8]) {
    let mut n = s.len();
    if n < 0x7f {
        out.push(n as u8);
    } else {
        out.push(0x7f);
        n -= 0x7f;
        while n >= 0x80 {
            out.push((n % 0x80) as u8 | 0x80);
            n /= 0x80;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
}

/// An IO whose first reads return the bytes [`sniff`] read (the buffer is freed once they
/// are).
pub struct Replay<I> {
    buf: Vec<u8>,
    pos: usize,
    inner: I,
}

impl<I> Replay<I> {
    /// An IO whose first reads return `buf`.
    pub fn new(buf: Vec<u8>, inner: I) -> Self {
        Replay { buf, pos: 0, inner }
    }

    /// The bytes not yet read back, and the IO under them.
    pub fn into_parts(mut self) -> (Vec<u8>, I) {
        self.buf.drain(..self.pos);
        (self.buf, self.inner)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Replay<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.buf.len() {
            let n = (this.buf.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.buf[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.buf.len() {
                this.buf = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

/// Where an [`Upgraded`] connection's client stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// In the preface; this many bytes of it seen.
    Preface(usize),
    /// In the first frame's header: its bytes so far, and how many.
    SettingsHead([u8; 9], usize),
    /// In the first SETTINGS frame's payload: this many bytes left.
    SettingsBody(usize),
    /// Giving the HTTP/2 server the stream 1 HEADERS frame: this many bytes of it given.
    Inject(usize),
    /// The client's bytes, as they come.
    Through,
}

/// The IO of an upgraded connection: the client's bytes, with the HEADERS frame of stream 1
/// given to the HTTP/2 server right after the client's first SETTINGS frame.
pub struct Upgraded<I> {
    inner: I,
    phase: Phase,
    frame: Vec<u8>,
}

/// Most bytes read at once before the injection (preface, frame header, SETTINGS payload are
/// read piecewise, so no client byte is handed on before the injected frame that should
/// follow it).
const STEP: usize = 64;

impl<I: AsyncRead + Unpin> AsyncRead for Upgraded<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if buf.remaining() == 0 {
            // Nothing can be given; reading the client into no room would look like its EOF.
            return Poll::Ready(Ok(()));
        }
        let want = match this.phase {
            Phase::Through => return Pin::new(&mut this.inner).poll_read(cx, buf),
            Phase::Inject(pos) => {
                let n = (this.frame.len() - pos).min(buf.remaining());
                buf.put_slice(&this.frame[pos..pos + n]);
                if pos + n == this.frame.len() {
                    this.phase = Phase::Through;
                    this.frame = Vec::new();
                } else {
                    this.phase = Phase::Inject(pos + n);
                }
                return Poll::Ready(Ok(()));
            }
            Phase::Preface(seen) => PREFACE.len() - seen,
            Phase::SettingsHead(_, seen) => 9 - seen,
            Phase::SettingsBody(left) => left,
        };
        let mut tmp = [0u8; STEP];
        let k = want.min(STEP).min(buf.remaining());
        let mut rb = ReadBuf::new(&mut tmp[..k]);
        match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let got = rb.filled();
        if got.is_empty() {
            // EOF: nothing to inject into.
            this.phase = Phase::Through;
            return Poll::Ready(Ok(()));
        }
        buf.put_slice(got);
        this.phase = advance(this.phase, got);
        Poll::Ready(Ok(()))
    }
}

/// The phase after the client's `got` bytes, read in `phase` (never more than it wants).
fn advance(phase: Phase, got: &[u8]) -> Phase {
    match phase {
        Phase::Preface(seen) => {
            if got != &PREFACE[seen..seen + got.len()] {
                // Not HTTP/2: the server refuses it; nothing to add.
                return Phase::Through;
            }
            match seen + got.len() {
                n if n == PREFACE.len() => Phase::SettingsHead([0; 9], 0),
                n => Phase::Preface(n),
            }
        }
        Phase::SettingsHead(mut head, seen) => {
            head[seen..seen + got.len()].copy_from_slice(got);
            let seen = seen + got.len();
            if seen < 9 {
                return Phase::SettingsHead(head, seen);
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            // SETTINGS, not an ACK, on stream 0: anything else is the server's to refuse.
            if head[3] != 0x4 || head[4] & 0x1 != 0 || stream != 0 {
                return Phase::Through;
            }
            if len == 0 {
                Phase::Inject(0)
            } else {
                Phase::SettingsBody(len)
            }
        }
        Phase::SettingsBody(left) => match left - got.len() {
            0 => Phase::Inject(0),
            left => Phase::SettingsBody(left),
        },
        other => other,
    }
}

write_through!(Replay);
write_through!(Upgraded);

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: &str = "AAMAAABkAAQCAAAAAAIAAAAA";

    fn head(extra: &str) -> String {
        format!(
            "GET /x?y=1 HTTP/1.1\r\nHost: web\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: {SETTINGS}\r\n{extra}\r\n"
        )
    }

    /// The (name, value) literals of an injected frame's block (the format `literal` writes).
    fn fields(frame: &[u8]) -> Vec<(String, String)> {
        fn string(b: &[u8]) -> (String, &[u8]) {
            let (mut n, mut i) = (usize::from(b[0] & 0x7f), 1);
            if n == 0x7f {
                let mut shift = 0;
                loop {
                    n += usize::from(b[i] & 0x7f) << shift;
                    shift += 7;
                    i += 1;
                    if b[i - 1] & 0x80 == 0 {
                        break;
                    }
                }
            }
            let s = String::from_utf8(b[i..i + n].to_vec()).unwrap();
            (s, &b[i + n..])
        }
        let mut out = Vec::new();
        let mut b = &frame[9..];
        while !b.is_empty() {
            assert_eq!(b[0], 0x00, "a literal without indexing, new name");
            let (name, rest) = string(&b[1..]);
            let (value, rest) = string(rest);
            out.push((name, value));
            b = rest;
        }
        out
    }

    #[test]
    fn an_upgrade_request_becomes_stream_1_headers() {
        let long = "v".repeat(300);
        let frame = upgrade_frame(
            head(&format!(
                "X-Long: {long}\r\nTE: trailers\r\nKeep-Alive: 5\r\nAccept: */*\r\n"
            ))
            .as_bytes(),
        )
        .unwrap();
        let len = u32::from_be_bytes([0, frame[0], frame[1], frame[2]]) as usize;
        assert_eq!(len, frame.len() - 9);
        assert_eq!(
            &frame[3..9],
            &[0x1, 0x5, 0, 0, 0, 1],
            "HEADERS, END_STREAM|END_HEADERS, stream 1"
        );
        let f = fields(&frame);
        let want = [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "web"),
            (":path", "/x?y=1"),
            ("x-long", long.as_str()),
            ("te", "trailers"),
            ("accept", "*/*"),
        ];
        let f: Vec<(&str, &str)> = f.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        assert_eq!(f, want);
        // A length past the 7-bit prefix: 0x7f, then 300 - 127 = 173 in 7-bit groups.
        let mut s = Vec::new();
        string(&mut s, long.as_bytes());
        assert_eq!(&s[..3], &[0x7f, 0xad, 0x01]);
    }

    #[test]
    fn headers_connection_names_and_other_te_values_are_not_carried() {
        let h = "GET / HTTP/1.1\r\nHost: web\r\nConnection: Upgrade, HTTP2-Settings, X-Hop\r\n\
                 Upgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\nX-Hop: 1\r\nTE: gzip\r\nX-Kept: 2\r\n\r\n";
        let f = fields(&upgrade_frame(h.as_bytes()).unwrap());
        let names: Vec<&str> = f.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [":method", ":scheme", ":authority", ":path", "x-kept"]
        );
    }

    #[test]
    fn upgrades_not_taken() {
        let no = |h: &str| assert!(upgrade_frame(h.as_bytes()).is_none(), "{h:?}");
        no(&head("Content-Length: 5\r\n"));
        no(&head("Transfer-Encoding: chunked\r\n"));
        no(&head("Host: other\r\n"));
        no(&head(&format!("HTTP2-Settings: {SETTINGS}\r\n")));
        no(&head(&format!("X: {}\r\n", "y".repeat(MAX_BLOCK))));
        no(&head("").replace("HTTP/1.1", "HTTP/1.0"));
        no(&head("").replace("GET /x?y=1", "CONNECT web:80"));
        no(&head("").replace("GET /x?y=1", "GET http://web/x"));
        no(&head("").replace("Host: web\r\n", ""));
        no(&head("").replace("Upgrade: h2c", "Upgrade: websocket"));
        no(&head("").replace("Upgrade, HTTP2-Settings", "Upgrade"));
        no(&head("").replace("Upgrade, HTTP2-Settings", "HTTP2-Settings"));
        for bad in ["!!!", "AAMAAA", "AAIAAAAC", "AAQAgAAAAA", "AAUAAAAB"] {
            no(&head("").replace(SETTINGS, bad));
        }
        assert!(upgrade_frame(head("Content-Length: 0\r\n").as_bytes()).is_some());
        // One setting, and none, are well-formed (whole settings never need base64 padding).
        for ok in ["AAMAAABk", ""] {
            let h = head("").replace(SETTINGS, ok);
            assert!(upgrade_frame(h.as_bytes()).is_some(), "{ok:?}");
        }
    }

    fn client_start(settings_len: usize) -> Vec<u8> {
        let mut v = PREFACE.to_vec();
        v.extend_from_slice(&[0, 0, settings_len as u8, 0x4, 0, 0, 0, 0, 0]);
        v.extend(std::iter::repeat_n(7u8, settings_len));
        v
    }

    async fn through_upgraded(input: &[u8], frame: &[u8]) -> Vec<u8> {
        let mut up = Upgraded {
            inner: input,
            phase: Phase::Preface(0),
            frame: frame.to_vec(),
        };
        let mut out = Vec::new();
        up.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_frame_is_injected_right_after_the_clients_first_settings() {
        let frame = upgrade_frame(head("").as_bytes()).unwrap();
        let window_update = [0, 0, 4, 0x8, 0, 0, 0, 0, 0, 0, 1, 0, 0];
        for settings_len in [0, 12, 150] {
            let mut input = client_start(settings_len);
            let cut = input.len();
            input.extend_from_slice(&window_update);
            let out = through_upgraded(&input, &frame).await;
            let mut want = input[..cut].to_vec();
            want.extend_from_slice(&frame);
            want.extend_from_slice(&window_update);
            assert_eq!(out, want, "SETTINGS of {settings_len} bytes");
        }
        // Not a preface, or a first frame that is not SETTINGS: passed on as it is.
        let bad = b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\nmore".to_vec();
        assert_eq!(through_upgraded(&bad, &frame).await, bad);
        let mut ping_first = PREFACE.to_vec();
        ping_first.extend_from_slice(&[0, 0, 8, 0x6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(through_upgraded(&ping_first, &frame).await, ping_first);
    }

    #[tokio::test]
    async fn sniff_upgrades_or_replays() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(head("").as_bytes()).await.unwrap();
        let Sniffed::Upgraded(_up) = sniff(server).await.unwrap() else {
            panic!("not upgraded");
        };
        let mut answer = vec![0u8; SWITCHING.len()];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, SWITCHING);

        let plain = b"GET / HTTP/1.1\r\nHost: web\r\n\r\nGET /2 HTTP/1.1\r\n";
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(plain).await.unwrap();
        drop(client);
        let Sniffed::Http1(mut io) = sniff(server).await.unwrap() else {
            panic!("upgraded a plain request");
        };
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, plain);
    }
}
