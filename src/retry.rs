//! When a request is tried again, and how many retries an upstream may spend.
//!
//! A request without a body is retried on another endpoint, up to the upstream's `retries` and
//! within `retry_timeout`, when the connection could not be made or the request never reached
//! the wire (any method), and, for idempotent methods, when the connection failed after the
//! request may have been sent or the answer was one of [`RETRY_STATUSES`]. A request with a
//! body is retried the same way when its body fits the upstream's `retry_buffer` (it is kept
//! as it is sent, `replay.rs`); a larger one is streamed once and never retried. A [`RetryBudget`] per
//! upstream (20% of requests plus a small reserve) stops retry storms.
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method};

use crate::error::ProxyError;

/// Statuses after which an idempotent request (body-less, or its body kept) is tried on another endpoint. 500 is
/// included so a broken instance costs no client-visible error while passive health ejects it.
pub const RETRY_STATUSES: [u16; 4] = [500, 502, 503, 504];

/// Each request adds this many hundredths of a retry to its upstream's budget: retries may be
/// at most 20% of requests (plus the reserve), so a failing upstream cannot triple its load.
pub const RETRY_BUDGET_RATIO: i64 = 20;
/// The budget a new upstream starts with, in hundredths of a retry (10 retries).
pub const RETRY_BUDGET_RESERVE: i64 = 1_000;
/// Most the budget can hold (100 retries), so a long quiet spell does not bank a storm.
pub const RETRY_BUDGET_MAX: i64 = 10_000;
/// Largest body of a retryable error answer that is read (and its connection kept) before the
/// next try; a larger one is given to the client as it is, without a retry.
pub const RETRY_BODY_LIMIT: usize = 64 * 1024;

/// Longest back-off a `Retry-After` may ask for (`max_retry_after`).
pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Back-off after a 429 that gives no (readable) `Retry-After`.
pub const DEFAULT_RATE_LIMIT_BACKOFF: Duration = Duration::from_secs(1);

/// How long an endpoint asked not to be sent new requests: a 429 (with its `Retry-After`, else
/// [`DEFAULT_RATE_LIMIT_BACKOFF`]) or a 503 with a `Retry-After`; `None` for anything else.
/// `Retry-After` is delay-seconds or an HTTP date (RFC 9110 §10.2.3); the result is capped at
/// `max`. A 503 whose `Retry-After` cannot be read is an ordinary 503. `now` is asked only
/// for an HTTP date.
#[inline]
pub fn backoff(
    status: u16,
    headers: &HeaderMap,
    max: Duration,
    now: impl FnOnce() -> SystemTime,
) -> Option<Duration> {
    if status != 429 && status != 503 {
        return None;
    }
    let asked = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after(v.trim(), now));
    match (status, asked) {
        (_, Some(d)) => Some(d.min(max)),
        (429, None) => Some(DEFAULT_RATE_LIMIT_BACKOFF.min(max)),
        _ => None,
    }
}

/// A `Retry-After` value: seconds, or an HTTP date (a date in the past is no delay).
fn retry_after(v: &str, now: impl FnOnce() -> SystemTime) -> Option<Duration> {
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now()).unwrap_or(Duration::ZERO))
}

/// Methods safe to retry after the request may have reached the upstream.
pub fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether another endpoint may be tried after `e`.
pub fn may_retry(e: &ProxyError, method: &Method) -> bool {
    match e {
        _ if e.unsent() => true,
        ProxyError::Upstream { .. } => idempotent(method),
        _ => false,
    }
}

/// Whether an answer with `status` to `method` is worth another endpoint.
pub fn retry_status(status: u16, method: &Method) -> bool {
    RETRY_STATUSES.contains(&status) && idempotent(method)
}

/// An upstream's retry budget, in hundredths of a retry.
#[derive(Debug)]
pub struct RetryBudget(AtomicI64);

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget(AtomicI64::new(RETRY_BUDGET_RESERVE))
    }
}

impl RetryBudget {
    /// One request's share of a retry.
    pub fn deposit(&self) {
        if self.0.load(Ordering::Relaxed) < RETRY_BUDGET_MAX {
            self.0.fetch_add(RETRY_BUDGET_RATIO, Ordering::Relaxed);
        }
    }

    /// Takes one retry; false when the budget is spent.
    pub fn withdraw(&self) -> bool {
        if self.0.fetch_sub(100, Ordering::Relaxed) >= 100 {
            true
        } else {
            self.0.fetch_add(100, Ordering::Relaxed);
            false
        }
    }

    /// What is left, in hundredths of a retry.
    pub fn left(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_retry_after(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, v.parse().unwrap());
        h
    }

    #[test]
    fn a_429_or_a_503_with_retry_after_backs_off_for_the_time_asked_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let max = DEFAULT_MAX_RETRY_AFTER;
        let none = HeaderMap::new();
        assert_eq!(
            backoff(429, &with_retry_after("2"), max, || now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            backoff(503, &with_retry_after("7"), max, || now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            backoff(429, &none, max, || now),
            Some(DEFAULT_RATE_LIMIT_BACKOFF)
        );
        assert_eq!(
            backoff(429, &with_retry_after("soon"), max, || now),
            Some(DEFAULT_RATE_LIMIT_BACKOFF)
        );
        // A 503 without a readable Retry-After is an ordinary failure.
        assert_eq!(backoff(503, &none, max, || now), None);
        assert_eq!(backoff(503, &with_retry_after("-1"), max, || now), None);
        assert_eq!(backoff(200, &with_retry_after("5"), max, || now), None);
        assert_eq!(backoff(502, &with_retry_after("5"), max, || now), None);
        // Capped.
        assert_eq!(
            backoff(429, &with_retry_after("3600"), max, || now),
            Some(max)
        );
        // An HTTP date, 30 s ahead; one in the past is no delay.
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            backoff(429, &with_retry_after(&date), max, || now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(
            backoff(503, &with_retry_after(&past), max, || now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn the_reserve_allows_ten_retries_then_one_per_five_requests() {
        let b = RetryBudget::default();
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10);
        for _ in 0..50 {
            b.deposit();
        }
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10);
        assert!(b.left() >= 0, "never overdrawn");
    }

    #[test]
    fn a_quiet_spell_does_not_bank_a_storm() {
        let b = RetryBudget::default();
        for _ in 0..100_000 {
            b.deposit();
        }
        let n = (0..1000).filter(|_| b.withdraw()).count();
        assert_eq!(n as i64, RETRY_BUDGET_MAX / 100);
    }

    #[test]
    fn what_is_retried() {
        let connect = ProxyError::Connect {
            authority: "a:1".into(),
            source: "refused".into(),
        };
        assert!(may_retry(&connect, &Method::POST));
        assert!(!may_retry(&ProxyError::Timeout, &Method::GET));
        assert!(!may_retry(&ProxyError::NoEndpoint, &Method::GET));
        assert!(retry_status(503, &Method::GET));
        assert!(!retry_status(503, &Method::POST));
        assert!(!retry_status(501, &Method::GET));
    }
}
