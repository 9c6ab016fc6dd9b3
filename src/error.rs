//! Proxy errors, classified by origin so the status code and the retry decision follow from the
//! type: client mistakes are 4xx and never retried; upstream failures are 502/504 and retried
//! where that is safe (`retry.rs` decides). Each keeps its cause as a `#[source]`.
use http::StatusCode;

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
        source: hyper::Error,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoEndpoint => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
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
            ProxyError::NoEndpoint => Some("no_endpoint"),
            ProxyError::BadRequest(_) => None,
        }
    }

    /// The response body: short, and naming the upstream, never an internal address.
    pub fn body(&self, upstream: &str) -> String {
        match self {
            ProxyError::NoEndpoint => {
                format!("edge-agent: no available endpoint for upstream {upstream:?}\n")
            }
            ProxyError::Connect { .. } | ProxyError::Upstream { sent: Sent::No, .. } => {
                format!("edge-agent: could not connect to upstream {upstream:?}\n")
            }
            ProxyError::Timeout => format!("edge-agent: upstream {upstream:?} timed out\n"),
            ProxyError::Upstream { .. } => format!("edge-agent: upstream {upstream:?} failed\n"),
            ProxyError::BadRequest(why) => format!("edge-agent: bad request: {why}\n"),
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
    }
}
