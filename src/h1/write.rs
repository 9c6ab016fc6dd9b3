//! The upstream request head, written from a parsed [`RequestHead`] and the client's bytes into
//! a reused buffer: what `proxy.rs` (`prepare_request_headers`, `tunnel::Upgrade::restore`, the
//! `Host` fallback, `x-request-id`) and hyper's client do today, without a `HeaderMap`.
//!
//! - The request line: the client's method, the target (or the rewritten one the caller
//!   gives, e.g. with a route's prefix stripped), and always `HTTP/1.1`, as today.
//! - Every header line, name and value byte for byte, in the client's order, except the
//!   hop-by-hop ones (RFC 9110 §7.6.1): `Connection`, `Keep-Alive`, `Proxy-Connection`,
//!   `Proxy-Authenticate`, `Proxy-Authorization`, `TE`, `Trailer`, `Upgrade`, and every header
//!   `Connection` names. A tunnel keeps the first `Upgrade` line and gets
//!   `Connection: upgrade`.
//! - The framing (RFC 9112 §6): a chunked body gets one `Transfer-Encoding: chunked` (the codings
//!   were checked to be just that); a length is forwarded once, and not at all beside chunked.
//! - `X-Forwarded-For`: the client's address appended to the last line (today the first line's
//!   value plus the address replaced every line, so later lines were lost: RFC 9110 §5.3 makes
//!   the lines one list, and this keeps all of it); a new line when there is none.
//!   `X-Forwarded-Proto` when absent; `Host` when absent (HTTP/1.0 may send none); and
//!   `X-Request-Id` when asked for and absent.
//!
//! A header line that is forwarded unchanged and ends in CRLF is copied whole, whitespace and
//! all, and neighbouring such lines in one copy; a line ending in a bare LF is written as
//! `name: value` CRLF, so a bare LF is never passed on (RFC 9112 §2.2 lets a recipient accept
//! one, not a sender send one).
use super::head::{BodyFraming, Kind, RequestHead};

/// What the proxy adds to a request it forwards.
#[derive(Debug, Clone, Copy)]
pub struct Added<'a> {
    /// The target to send instead of the client's (already a valid origin form).
    pub target: Option<&'a [u8]>,
    /// Keep the upgrade (the request is tunnelled: `RequestHead::is_tunnel_upgrade`).
    pub tunnel: bool,
    /// The client's address, as text, for `X-Forwarded-For`.
    pub client_ip: &'a [u8],
    /// `X-Forwarded-Proto` when the request has none (`http` on the plain listener).
    pub proto: &'a [u8],
    /// `Host` when the request has none (the request's authority, or the endpoint's).
    pub host: &'a [u8],
    /// `X-Request-Id` when the request has none.
    pub request_id: Option<&'a [u8]>,
}

/// Writes the upstream request head for `head` (parsed from `buf`) into `out`, replacing what
/// was there.
pub fn write_request(out: &mut Vec<u8>, head: &RequestHead, buf: &[u8], add: &Added<'_>) {
    out.clear();
    out.reserve(head.len + 128);
    out.extend_from_slice(head.method.of(buf));
    out.push(b' ');
    out.extend_from_slice(add.target.unwrap_or_else(|| head.target.of(buf)));
    out.extend_from_slice(b" HTTP/1.1\r\n");

    let named = head.connection_names_headers();
    let dropped = |name: &[u8]| named && head.named_in_connection(buf, name);
    let chunked = head.body == BodyFraming::Chunked;
    let headers = head.headers();
    // The last forwarded X-Forwarded-For line gets the address.
    let last_xff = headers
        .iter()
        .rposition(|h| h.kind == Kind::XForwardedFor && !dropped(h.name.of(buf)));
    let (mut host, mut proto, mut id, mut length, mut upgrade) =
        (false, false, false, false, false);
    // Lines forwarded as they are, not yet copied: a run of neighbours is one copy.
    let mut run = 0..0;
    for (i, h) in headers.iter().enumerate() {
        match h.kind {
            Kind::Upgrade if add.tunnel && !upgrade => upgrade = true,
            Kind::ContentLength if chunked || length => continue,
            Kind::ContentLength => length = true,
            k if k.is_hop_by_hop() => continue,
            _ => {}
        }
        let name = h.name.of(buf);
        // A name `Connection` lists is not forwarded, whatever it is (as today), but for the
        // framing, which is ours to keep (hyper's client wrote the length back today).
        if !matches!(h.kind, Kind::Upgrade | Kind::ContentLength) && dropped(name) {
            continue;
        }
        match h.kind {
            Kind::Host => host = true,
            Kind::XForwardedProto => proto = true,
            Kind::XRequestId => id = true,
            _ => {}
        }
        let line = h.name.start as usize..h.line_end as usize;
        if h.crlf && Some(i) != last_xff {
            if run.end == line.start && !run.is_empty() {
                run.end = line.end;
            } else {
                out.extend_from_slice(&buf[std::mem::replace(&mut run, line)]);
            }
            continue;
        }
        out.extend_from_slice(&buf[std::mem::replace(&mut run, 0..0)]);
        let value = h.value.of(buf);
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        if Some(i) == last_xff {
            if !value.is_empty() {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(add.client_ip);
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&buf[run]);
    if upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    let mut line = |name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    if last_xff.is_none() {
        line(b"x-forwarded-for", add.client_ip);
    }
    if !proto {
        line(b"x-forwarded-proto", add.proto);
    }
    if !host {
        line(b"host", add.host);
    }
    if let Some(rid) = add.request_id.filter(|_| !id) {
        line(b"x-request-id", rid);
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::super::{Limits, Parse};
    use super::*;

    const ADD: Added<'static> = Added {
        target: None,
        tunnel: false,
        client_ip: b"127.0.0.1",
        proto: b"http",
        host: b"10.0.0.2:8080",
        request_id: None,
    };

    fn written(req: &[u8], add: &Added<'_>) -> String {
        let mut head = RequestHead::default();
        let n = head.parse(req, &Limits::default()).unwrap();
        assert!(matches!(n, Parse::Complete(_)));
        let mut out = b"stale".to_vec();
        write_request(&mut out, &head, req, add);
        // What is written is itself a head that parses, with the same framing.
        let mut again = RequestHead::default();
        assert_eq!(
            again.parse(&out, &Limits::default()),
            Ok(Parse::Complete(out.len()))
        );
        assert_eq!(again.body, head.body);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn unchanged_headers_pass_as_sent_and_forwarding_headers_are_added() {
        let req = b"GET /a?b HTTP/1.1\r\nHost: svc\r\nUser-Agent: curl/8.5\r\nAccept: */*\r\nX-Mixed-CASE:  v  \r\n\r\n";
        assert_eq!(
            written(req, &ADD),
            "GET /a?b HTTP/1.1\r\nHost: svc\r\nUser-Agent: curl/8.5\r\nAccept: */*\r\nX-Mixed-CASE:  v  \r\n\
             x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n\r\n"
        );
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        // What proxy.rs's `hop_by_hop_and_forwarded_headers` test holds, and the rest of the list.
        let req = b"POST / HTTP/1.1\r\nHost: svc\r\nConnection: close, x-private\r\nX-Private: 1\r\n\
                    Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nX-Forwarded-For: 10.0.0.1\r\n\
                    X-Kept: yes\r\nProxy-Connection: x\r\nProxy-Authorization: a\r\nProxy-Authenticate: b\r\n\
                    TE: trailers\r\nTrailer: x\r\nUpgrade: websocket\r\n\r\n";
        assert_eq!(
            written(req, &ADD),
            "POST / HTTP/1.1\r\nHost: svc\r\nX-Forwarded-For: 10.0.0.1, 127.0.0.1\r\nX-Kept: yes\r\n\
             transfer-encoding: chunked\r\nx-forwarded-proto: http\r\n\r\n"
        );
    }

    #[test]
    fn lengths_once_and_never_beside_chunked() {
        let req = b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n";
        let out = written(req, &ADD);
        assert_eq!(out.matches("ontent-").count(), 1, "{out}");
        let req = b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n";
        let out = written(req, &ADD);
        assert!(!out.contains("Content-Length"), "{out}");
        assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
    }

    #[test]
    fn a_tunnel_keeps_its_upgrade() {
        let req = b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n";
        let mut head = RequestHead::default();
        head.parse(req, &Limits::default()).unwrap();
        assert!(head.is_tunnel_upgrade(req));
        let tunnel = Added {
            tunnel: true,
            ..ADD
        };
        assert_eq!(
            written(req, &tunnel),
            "GET /ws HTTP/1.1\r\nHost: svc\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\
             connection: upgrade\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n\r\n"
        );
    }

    #[test]
    fn rewritten_target_host_fallback_and_request_id() {
        let req = b"get /svc/x http/1.0\r\nX-Forwarded-Proto: https\r\nX-Forwarded-For: a\r\nX-Forwarded-For: b\r\n\n";
        // httparse wants the version in capitals; hyper too.
        assert!(RequestHead::default()
            .parse(req, &Limits::default())
            .is_err());
        let req = b"get /svc/x HTTP/1.0\nX-Forwarded-Proto: https\nX-Forwarded-For: a\nX-Forwarded-For:\n\n";
        let add = Added {
            target: Some(b"/x"),
            request_id: Some(b"abc"),
            ..ADD
        };
        assert_eq!(
            written(req, &add),
            "get /x HTTP/1.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-For: a\r\nX-Forwarded-For: 127.0.0.1\r\n\
             host: 10.0.0.2:8080\r\nx-request-id: abc\r\n\r\n"
        );
        let with_id = b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: mine\r\n\r\n";
        let out = written(with_id, &add);
        assert!(
            out.contains("X-Request-Id: mine\r\n") && !out.contains("abc"),
            "{out}"
        );
    }

    #[test]
    fn names_listed_in_connection_go_whatever_they_are() {
        // As remove_hop_by_hop does today: a listed Host or X-Forwarded-For is removed, and
        // the fallbacks take their place.
        let req = b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: host, x-forwarded-for, keep-alive\r\nX-Forwarded-For: spoof\r\n\r\n";
        assert_eq!(
            written(req, &ADD),
            "GET / HTTP/1.1\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\nhost: 10.0.0.2:8080\r\n\r\n"
        );
        // But not the framing.
        let req = b"POST / HTTP/1.1\r\nHost: svc\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\n";
        assert!(written(req, &ADD).contains("Content-Length: 2\r\n"));
    }
}
