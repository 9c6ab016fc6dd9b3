//! Peak-EWMA latency tracking and the `ewma` balancer. (Skeleton: the balancer is being
//! written; `PeakEwma` is the per-endpoint state the proxy feeds.)
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Per-endpoint peak-EWMA of response latency, lock-free. Times are milliseconds on the
/// process clock ([`crate::health::now_ms`]) so tests can pass their own.
#[derive(Debug, Default)]
pub struct PeakEwma {
    /// f64 bits of the current estimate, nanoseconds; 0 = no observation yet.
    value: AtomicU64,
    /// When `value` was last updated.
    at_ms: AtomicU64,
}

impl PeakEwma {
    /// Records one observed latency (time to response headers).
    pub fn observe(&self, rtt: Duration, now_ms: u64, _decay: Duration) {
        self.value
            .store((rtt.as_nanos() as f64).to_bits(), Ordering::Relaxed);
        self.at_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Records a failure that came back after `rtt` (fast failures are penalised).
    pub fn failure(&self, rtt: Duration, now_ms: u64, decay: Duration) {
        self.observe(rtt, now_ms, decay);
    }

    /// The current estimate in nanoseconds (0 when nothing was observed).
    pub fn value_ns(&self, _now_ms: u64, _decay: Duration) -> f64 {
        f64::from_bits(self.value.load(Ordering::Relaxed))
    }
}
