//! When a request is tried again, and how many retries an upstream may spend.
//!
//! A request without a body is retried on another endpoint, up to the upstream's `retries` and
//! within `retry_timeout`, when the connection could not be made or the request never reached
//! the wire (any method), and, for idempotent methods, when the connection failed after the
//! request may have been sent or the answer was one of [`RETRY_STATUSES`]. A request with a
//! body is never retried (its body is streamed and cannot be replayed). A [`RetryBudget`] per
//! upstream (20% of requests plus a small reserve) stops retry storms.
use std::sync::atomic::{AtomicI64, Ordering};

use http::Method;

use crate::error::ProxyError;

/// Statuses after which an idempotent, body-less request is tried on another endpoint. 500 is
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
