//! Proxy errors, classified by origin so the status code and the retry decision follow from the
//! type: client mistakes are 4xx (501 for a transfer coding the agent does not implement) and
//! never retried nor held against an endpoint; upstream failures are 502/504 and retried where
//! that is safe (`retry.rs` decides). Each keeps its cause as a `#[source]`.
use http::StatusCode;

use crate::breaker::Limit;

/// A boxed error cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Whether a failed exchange's request may have reached the upstream (Pingora's `RetryType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Never written to the wire: the connection gave the request back untouched (a fresh
    /// connection closed before it was used). Safe to send anywhere, whatever the method.
    No,
    /// Written, in whole or in part: only an idempotent request may be sent again.
    Maybe,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client sent something we cannot forward.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The upstream has no endpoint that may take traffic.
    #[error("no available endpoint")]
    NoEndpoint,
    /// The request's subset or zone has no available endpoint and its fallback gives none; the
    /// text names it (`subset version=v2`, `zone a`).
    #[error("no available endpoint in {0}")]
    Unavailable(String),
    /// The endpoint could not be connected to; nothing was sent.
    #[error("connect to {authority} failed")]
    Connect {
        authority: String,
        #[source]
        source: BoxError,
    },
    /// The endpoint took longer than `read_timeout` to answer.
    #[error("upstream timed out")]
    Timeout,
    /// The exchange failed on an open connection.
    #[error("upstream exchange failed")]
    Upstream {
        sent: Sent,
        #[source]
        source: BoxError,
    },
    /// The client's request is framed in a way the agent refuses (a client error: never
    /// retried, never held against an endpoint; the connection is closed after the answer).
    #[error(transparent)]
    Framing(#[from] FramingError),
    /// One of the upstream's circuit breakers is full (`breaker.rs`): answered at once.
    #[error("over the upstream's max_{} limit", .0.name())]
    Overflow(Limit),
}

/// Why a request's framing was refused (see `framing.rs`). Each names the header and the value
/// at fault; values are cut to [`SHOWN_VALUE`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// An HTTP/1.1 request without `Host` (RFC 9112 §3.2).
    #[error("bad request: an HTTP/1.1 request needs a Host header")]
    MissingHost,
    /// More than one `Host` line (RFC 9112 §3.2).
    #[error("bad request: {} Host headers ({})", .0.len(), .0.join(", "))]
    DuplicateHost(Vec<String>),
    /// One header line (name and value) longer than the limit.
    #[error("request header fields too large: header {name} is {len} bytes (name and value), at most {max}")]
    HeaderLineTooLong {
        name: String,
        len: usize,
        max: usize,
    },
    /// A `Content-Length` that is not a length (not digits, or 2^63 and over).
    #[error("bad request: Content-Length {0:?} is not a valid length")]
    InvalidContentLength(String),
    /// A `Content-Length` over the configured maximum body size.
    #[error("payload too large: Content-Length {len} is over the limit of {max} bytes")]
    BodyTooLarge { len: u64, max: u64 },
    /// Both `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.1).
    #[error("bad request: Content-Length {content_length:?} with Transfer-Encoding {transfer_encoding:?}")]
    LengthWithTransferEncoding {
        content_length: String,
        transfer_encoding: String,
    },
    /// A `Transfer-Encoding` whose `chunked` is missing, repeated, or not the last coding.
    #[error("bad request: Transfer-Encoding {0:?} is not a single final chunked")]
    InvalidTransferEncoding(String),
    /// A transfer coding the agent does not implement (only `chunked` is forwarded).
    #[error("not implemented: transfer coding {coding:?} in Transfer-Encoding {value:?}")]
    UnknownCoding { coding: String, value: String },
    /// The client's request body broke its own framing (a malformed chunk, say) while it was
    /// being forwarded.
    #[error("bad request: malformed request body: {0}")]
    MalformedBody(String),
}

/// How much of a client-sent value an error repeats.
pub const SHOWN_VALUE: usize = 64;

impl FramingError {
    pub fn status(&self) -> StatusCode {
        match self {
            FramingError::HeaderLineTooLong { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            FramingError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            FramingError::UnknownCoding { .. } => StatusCode::NOT_IMPLEMENTED,
            FramingError::MissingHost
            | FramingError::DuplicateHost(_)
            | FramingError::InvalidContentLength(_)
            | FramingError::LengthWithTransferEncoding { .. }
            | FramingError::InvalidTransferEncoding(_)
            | FramingError::MalformedBody(_) => StatusCode::BAD_REQUEST,
        }
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoEndpoint | ProxyError::Overflow(_) | ProxyError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Framing(e) => e.status(),
        }
    }

    /// Whether nothing of the request reached the upstream.
    pub fn unsent(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. } | ProxyError::Upstream { sent: Sent::No, .. }
        )
    }

    /// The `kind` label of `edge_agent_upstream_errors_total`, for upstream-caused errors.
    pub fn upstream_kind(&self) -> Option<&'static str> {
        match self {
            ProxyError::Connect { .. } | ProxyError::Upstream { sent: Sent::No, .. } => {
                Some("connect")
            }
            ProxyError::Timeout => Some("timeout"),
            ProxyError::Upstream { .. } => Some("reset"),
            ProxyError::NoEndpoint | ProxyError::Unavailable(_) => Some("no_endpoint"),
            ProxyError::BadRequest(_) | ProxyError::Framing(_) | ProxyError::Overflow(_) => None,
        }
    }

    /// The response body: short, and naming the upstream, never an internal address.
    pub fn body(&self, upstream: &str) -> String {
        match self {
            ProxyError::NoEndpoint => {
                format!("edge-agent: no available endpoint for upstream {upstream:?}\n")
            }
            ProxyError::Unavailable(what) => {
                format!("edge-agent: no available endpoint in {what} of upstream {upstream:?}\n")
            }
            ProxyError::Connect { .. } | ProxyError::Upstream { sent: Sent::No, .. } => {
                format!("edge-agent: could not connect to upstream {upstream:?}\n")
            }
            ProxyError::Timeout => format!("edge-agent: upstream {upstream:?} timed out\n"),
            ProxyError::Upstream { .. } => format!("edge-agent: upstream {upstream:?} failed\n"),
            ProxyError::BadRequest(why) => format!("edge-agent: bad request: {why}\n"),
            ProxyError::Framing(e) => format!("edge-agent: {e}\n"),
            ProxyError::Overflow(limit) => format!(
                "edge-agent: upstream {upstream:?} is over its max_{} limit\n",
                limit.name()
            ),
        }
    }
}

/// An error and its sources, `: `-separated, for log lines.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect() -> ProxyError {
        ProxyError::Connect {
            authority: "127.0.0.1:1".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into(),
        }
    }

    #[test]
    fn status_follows_type_and_the_cause_is_kept() {
        assert_eq!(ProxyError::NoEndpoint.status(), 503);
        assert_eq!(connect().status(), 502);
        assert_eq!(ProxyError::Timeout.status(), 504);
        assert!(connect().unsent());
        assert!(!ProxyError::Timeout.unsent());
        let line = chain(&connect());
        assert!(
            line.starts_with("connect to 127.0.0.1:1 failed: "),
            "{line}"
        );
        assert!(line.contains("refused"), "{line}");
        let framing = ProxyError::from(FramingError::MalformedBody("x".into()));
        assert_eq!(framing.status(), 400);
        assert!(!framing.unsent());
        assert_eq!(framing.upstream_kind(), None);
    }
}
