//! gRPC over the proxy: telling a gRPC call from other HTTP, its deadline (`grpc-timeout`), its
//! status (`grpc-status` in headers or trailers), and the agent's own errors in gRPC's shape.
//!
//! gRPC clients do not read HTTP status bodies: an error the agent makes itself for a gRPC call
//! is an HTTP 200 "trailers-only" answer carrying `grpc-status` and `grpc-message`
//! ([`UNAVAILABLE`] for no endpoint or a failed connection, [`DEADLINE_EXCEEDED`] for a
//! timeout, per the gRPC HTTP/2 protocol spec and its status-code mapping).
//!
//! A leaf (layer 1): it depends on `http` only.
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};

pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// `grpc-status` OK.
pub const OK: u16 = 0;
/// `grpc-status` DEADLINE_EXCEEDED.
pub const DEADLINE_EXCEEDED: u16 = 4;
/// `grpc-status` UNIMPLEMENTED (what HTTP 404 maps to).
pub const UNIMPLEMENTED: u16 = 12;
/// `grpc-status` UNAVAILABLE.
pub const UNAVAILABLE: u16 = 14;
/// The `grpc-status` codes counted as an endpoint failure (passive health, EWMA) unless the
/// upstream names its own (`checks.passive.failure_grpc_statuses`): UNAVAILABLE only, since
/// the others are answers of a working server.
pub const DEFAULT_FAILURE_GRPC_STATUSES: [u16; 1] = [UNAVAILABLE];
/// Highest `grpc-status` code (UNAUTHENTICATED).
pub const MAX_STATUS: u16 = 16;

/// Whether a request is a gRPC call: a `POST` (every gRPC call is one) that [`is_grpc`]. The
/// method is looked at first, so the common request (a `GET`) costs no header lookup.
#[inline]
pub fn is_call(method: &http::Method, headers: &HeaderMap) -> bool {
    method == http::Method::POST && is_grpc(headers)
}

/// Whether a message is gRPC: `content-type: application/grpc` or `application/grpc+…`
/// (`application/grpc-web` is not gRPC over HTTP/2 and is left alone).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(v.get(16), None | Some(b'+') | Some(b';'))
    })
}

/// The call's deadline from `grpc-timeout` (`1*8DIGIT` and a unit of `H M S m u n`), or `None`
/// when it is absent or malformed (a malformed one is ignored, as gRPC servers do).
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(&GRPC_TIMEOUT)?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The `grpc-status` in a header block (response headers of a trailers-only answer, or
/// trailers), if there is a valid one.
pub fn status(headers: &HeaderMap) -> Option<u16> {
    let v = headers.get(&GRPC_STATUS)?.to_str().ok()?;
    v.trim().parse().ok().filter(|&c| c <= MAX_STATUS)
}

/// The headers of the agent's own gRPC error: `content-type`, `grpc-status`, and
/// `grpc-message` (percent-encoded as the spec asks, so any text is a valid value).
pub fn error_headers(code: u16, message: &str) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(3);
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert(&GRPC_STATUS, HeaderValue::from(code));
    let mut enc = String::with_capacity(message.len());
    for b in message.trim_end().bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            enc.push(b as char);
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    if let Ok(v) = HeaderValue::try_from(enc) {
        h.insert(&GRPC_MESSAGE, v);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(HeaderName::try_from(*k).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn what_is_grpc() {
        assert!(is_grpc(&headers(&[("content-type", "application/grpc")])));
        assert!(is_grpc(&headers(&[(
            "content-type",
            "application/grpc+proto"
        )])));
        assert!(is_grpc(&headers(&[("content-type", "Application/GRPC")])));
        assert!(!is_grpc(&headers(&[(
            "content-type",
            "application/grpc-web"
        )])));
        assert!(!is_grpc(&headers(&[("content-type", "application/json")])));
        assert!(!is_grpc(&HeaderMap::new()));
        let grpc = headers(&[("content-type", "application/grpc")]);
        assert!(is_call(&http::Method::POST, &grpc));
        assert!(!is_call(&http::Method::GET, &grpc));
    }

    #[test]
    fn grpc_timeout_units_and_bad_values() {
        let t = |v: &str| timeout(&headers(&[("grpc-timeout", v)]));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("3S"), Some(Duration::from_secs(3)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("7u"), Some(Duration::from_micros(7)));
        assert_eq!(t("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S", "1 S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn status_and_error_shape() {
        assert_eq!(status(&headers(&[("grpc-status", "14")])), Some(14));
        assert_eq!(status(&headers(&[("grpc-status", "99")])), None);
        assert_eq!(status(&headers(&[("grpc-status", "x")])), None);
        let h = error_headers(UNAVAILABLE, "no endpoint for \"pay\" 100%\n");
        assert_eq!(h["grpc-status"], "14");
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["grpc-message"], "no endpoint for \"pay\" 100%25");
    }
}
