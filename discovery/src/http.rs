//! What the HTTP-polling adapters (Consul, Eureka) share: classifying a failed call.
use std::error::Error as _;

use crate::ErrorKind;

/// A failed registry call, classified for `edge_agent_discovery_errors_total`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    /// A call (`what`: how to name it in the message; never a URL with credentials) that got no
    /// usable answer: timeout, unreadable body, or no connection.
    pub fn request(what: &str, e: reqwest::Error) -> Self {
        let kind = if e.is_timeout() {
            ErrorKind::Timeout
        } else if e.is_decode() || e.is_body() {
            ErrorKind::Parse
        } else {
            ErrorKind::Connect
        };
        Failure {
            kind,
            message: format!("{what}: {}", chain(&e.without_url())),
        }
    }

    /// A non-2xx answer: `auth` for 401 and 403, else `status`, with the start of the body.
    pub async fn status(what: &str, resp: reqwest::Response) -> Self {
        let status = resp.status();
        let kind = match status.as_u16() {
            401 | 403 => ErrorKind::Auth,
            _ => ErrorKind::Status,
        };
        let body = resp.text().await.unwrap_or_default();
        let body: String = body.chars().take(200).collect();
        Failure {
            kind,
            message: format!("{what}: status {status}: {}", body.trim()),
        }
    }
}

/// Flattens an error and its sources into one line.
pub(crate) fn chain(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}
