//! Proxy errors, classified by origin so the status code and the retry decision follow from the
//! type: client mistakes are 4xx and never retried; upstream failures are 502/504 and retried
//! where that is safe; internal errors are 500.
use http::{Method, StatusCode};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client sent something we cannot forward.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The upstream has no endpoint that may take traffic.
    #[error("no available endpoint")]
    NoEndpoint,
    /// The endpoint could not be connected to; nothing was sent.
    #[error("connect failed: {0}")]
    Connect(String),
    /// The endpoint took longer than `read_timeout` to answer.
    #[error("upstream timed out")]
    Timeout,
    /// The connection failed after the request may have been sent.
    #[error("upstream failed: {0}")]
    Upstream(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoEndpoint => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether another endpoint may be tried.
    pub fn retryable(&self, method: &Method) -> bool {
        match self {
            ProxyError::Connect(_) => true,
            ProxyError::Upstream(_) => crate::proxy::idempotent(method),
            _ => false,
        }
    }

    /// The `kind` label of `edge_agent_upstream_errors_total`, for upstream-caused errors.
    pub fn upstream_kind(&self) -> Option<&'static str> {
        match self {
            ProxyError::Connect(_) => Some("connect"),
            ProxyError::Timeout => Some("timeout"),
            ProxyError::Upstream(_) => Some("reset"),
            ProxyError::NoEndpoint => Some("no_endpoint"),
            _ => None,
        }
    }

    /// The response body: short, and naming the upstream, never an internal address.
    pub fn body(&self, upstream: &str) -> String {
        match self {
            ProxyError::NoEndpoint => {
                format!("edge-agent: no available endpoint for upstream {upstream:?}\n")
            }
            ProxyError::Connect(_) => {
                format!("edge-agent: could not connect to upstream {upstream:?}\n")
            }
            ProxyError::Timeout => format!("edge-agent: upstream {upstream:?} timed out\n"),
            ProxyError::Upstream(_) => format!("edge-agent: upstream {upstream:?} failed\n"),
            ProxyError::BadRequest(why) => format!("edge-agent: bad request: {why}\n"),
            ProxyError::Internal(_) => "edge-agent: internal error\n".to_string(),
        }
    }
}

/// An error and its sources, `: `-separated.
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

    #[test]
    fn status_follows_type() {
        assert_eq!(ProxyError::NoEndpoint.status(), 503);
        assert_eq!(ProxyError::Connect("x".into()).status(), 502);
        assert_eq!(ProxyError::Timeout.status(), 504);
        assert!(ProxyError::Connect("x".into()).retryable(&Method::POST));
        assert!(!ProxyError::Upstream("x".into()).retryable(&Method::POST));
        assert!(ProxyError::Upstream("x".into()).retryable(&Method::GET));
        assert!(!ProxyError::Timeout.retryable(&Method::GET));
    }
}
