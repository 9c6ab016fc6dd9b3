//! Load: per-endpoint peak-EWMA of response latency (Finagle's and Linkerd's design), fed by
//! every try (`endpoint::Attempt`) and read by the `ewma` balancer and the admin API.
//!
//! An observation above the current estimate replaces it at once (the peak: a slowing endpoint
//! is noticed on the first slow answer); one below it is blended in with weight
//! `1 - exp(-Δt / decay)`, Δt being the time since the last update, so the estimate sinks toward
//! what the endpoint now answers in, over about `decay` (`ewma_decay`, [`DEFAULT_DECAY`] by
//! default). While nothing is observed the estimate read by [`PeakEwma::value_ns`] also decays
//! toward zero with the same time constant, so an endpoint avoided for being slow is tried
//! again after a while and can prove it recovered. A failure counts as at least
//! [`FAILURE_PENALTY`] (1 s), so an endpoint that fails fast does not look fast.
//!
//! The state is two atomics (f64 bits and a timestamp), updated with plain loads and stores:
//! two updates racing on one endpoint may lose one observation, or pair one's value with the
//! other's timestamp. The estimate is a heuristic that the next observation corrects, so this
//! is cheaper than a lock or a compare-and-swap loop and good enough.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How fast old latency observations fade (`ewma_decay`).
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

/// The least latency a failed attempt counts as. A connection refused in 100 µs must not make
/// an endpoint look like the fastest in the upstream.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Per-endpoint peak-EWMA of response latency, lock-free. Times are milliseconds on the
/// process clock ([`crate::clock::now_ms`]) so tests can pass their own.
#[derive(Debug, Default)]
pub struct PeakEwma {
    /// f64 bits of the estimate at `at_ms`, nanoseconds; 0 = no observation yet.
    value: AtomicU64,
    /// When `value` was last updated.
    at_ms: AtomicU64,
}

/// `exp(-elapsed / decay)`: the weight the old estimate keeps after `elapsed_ms`.
fn keep(elapsed_ms: u64, decay: Duration) -> f64 {
    let tau = decay.as_secs_f64() * 1e3;
    if tau <= 0.0 {
        return 0.0;
    }
    (-(elapsed_ms as f64) / tau).exp()
}

impl PeakEwma {
    /// Records one observed latency (time to response headers).
    pub fn observe(&self, rtt: Duration, now_ms: u64, decay: Duration) {
        // At least 1 ns, so an observation is never mistaken for "none".
        let rtt = (rtt.as_nanos() as f64).max(1.0);
        let old = f64::from_bits(self.value.load(Ordering::Relaxed));
        let at = self.at_ms.load(Ordering::Relaxed);
        let w = keep(now_ms.saturating_sub(at), decay);
        let next = if old <= 0.0 || rtt >= old * w {
            // First observation, or a peak over the (idle-decayed) estimate: jump to it.
            rtt
        } else {
            old * w + rtt * (1.0 - w)
        };
        self.value.store(next.to_bits(), Ordering::Relaxed);
        self.at_ms.store(now_ms.max(at), Ordering::Relaxed);
    }

    /// Records a failure that came back after `rtt`: observed as at least [`FAILURE_PENALTY`].
    pub fn failure(&self, rtt: Duration, now_ms: u64, decay: Duration) {
        self.observe(rtt.max(FAILURE_PENALTY), now_ms, decay);
    }

    /// The current estimate in nanoseconds, decayed toward zero for the time since the last
    /// observation (0 when nothing was observed).
    pub fn value_ns(&self, now_ms: u64, decay: Duration) -> f64 {
        let v = f64::from_bits(self.value.load(Ordering::Relaxed));
        if v <= 0.0 {
            return 0.0;
        }
        let at = self.at_ms.load(Ordering::Relaxed);
        v * keep(now_ms.saturating_sub(at), decay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DECAY: Duration = Duration::from_secs(10);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn peak_jumps_then_decays_toward_observations() {
        let e = PeakEwma::default();
        assert_eq!(e.value_ns(0, DECAY), 0.0);
        e.observe(10 * MS, 1_000, DECAY);
        assert_eq!(e.value_ns(1_000, DECAY), 10e6);
        // A peak replaces the estimate at once.
        e.observe(100 * MS, 1_001, DECAY);
        assert_eq!(e.value_ns(1_001, DECAY), 100e6);
        // Lower observations pull it down gradually: after one decay time of 10 ms answers,
        // about 63% of the way.
        for t in 0..1_000 {
            e.observe(10 * MS, 1_011 + t * 10, DECAY);
        }
        let v = e.value_ns(11_001, DECAY) / 1e6;
        assert!((v - (10.0 + 90.0 * (-1.0f64).exp())).abs() < 1.0, "{v}");
        // Five more decay times: within 0.25% of the observations.
        for t in 0..5_000 {
            e.observe(10 * MS, 11_011 + t * 10, DECAY);
        }
        let v = e.value_ns(61_001, DECAY) / 1e6;
        assert!((v - (10.0 + 90.0 * (-6.0f64).exp())).abs() < 0.05, "{v}");
    }

    #[test]
    fn idle_estimate_decays_toward_zero() {
        let e = PeakEwma::default();
        e.observe(Duration::from_millis(80), 0, DECAY);
        let v = e.value_ns(10_000, DECAY) / 1e6;
        assert!((v - 80.0 * (-1.0f64).exp()).abs() < 0.01, "{v}");
        // An observation after a long idle spell above the decayed estimate is a new peak.
        e.observe(Duration::from_millis(40), 20_000, DECAY);
        assert_eq!(e.value_ns(20_000, DECAY), 40e6);
    }

    #[test]
    fn fast_failures_count_as_the_penalty() {
        let e = PeakEwma::default();
        e.observe(MS, 0, DECAY);
        e.failure(Duration::from_micros(50), 1, DECAY);
        assert_eq!(e.value_ns(1, DECAY), FAILURE_PENALTY.as_nanos() as f64);
        let slow = PeakEwma::default();
        slow.failure(Duration::from_secs(3), 0, DECAY);
        assert_eq!(slow.value_ns(0, DECAY), 3e9);
    }
}
