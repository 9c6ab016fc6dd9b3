//! Per-upstream request statistics for the status page and `edge-agent status`: requests per
//! second over the last five minutes (the sparkline), and the last minute's request rate,
//! error rate (share of 5xx answers) and p50/p99 latency (time to the response head, as
//! `edge_agent_request_duration_seconds`).
//!
//! The request path does one relaxed `fetch_add` on a latency bucket (two for a 5xx): no lock,
//! no allocation. A ticker ([`run`], once per [`TICK`]) turns the cumulative counters into a
//! ring buffer behind a mutex that only it and the admin API touch.
//!
//! Memory per upstream: [`BUCKETS`] × 8 B of counters (416 B), 300 per-second request counts
//! and 60 per-second error counts as `u32` (1,440 B), and [`SNAPSHOTS`] histogram snapshots of
//! [`BUCKETS`] × `u32` (2,704 B): about 4.5 KiB.
//!
//! It sits in layer 1 (beside `metrics`): atomics and arithmetic, nothing of upstreams.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// How often the ticker samples the counters.
pub const TICK: Duration = Duration::from_secs(1);
/// Seconds of per-second request counts kept (the sparkline: five minutes).
pub const HISTORY: usize = 300;
/// The window of the rates and percentiles, in ticks (one minute).
pub const WINDOW: usize = 60;
/// Seconds per point of the sparkline series in `/upstreams` (60 points over five minutes).
pub const SERIES_STEP: usize = 5;
/// Latency buckets: two per power of two of microseconds, from 1 µs to 2^26 µs (67 s); slower
/// answers land in the last one.
pub const BUCKETS: usize = 52;
/// Histogram snapshots kept, one every [`SERIES_STEP`] ticks: a minute and one more.
pub const SNAPSHOTS: usize = WINDOW / SERIES_STEP + 1;

/// The bucket of a latency of `us` microseconds: octave `o` (`2^o ≤ us < 2^(o+1)`) split in
/// two halves.
pub fn bucket(us: u64) -> usize {
    if us < 2 {
        return 0;
    }
    let o = 63 - us.leading_zeros() as usize;
    let half = ((us >> (o - 1)) & 1) as usize;
    (o * 2 + half).min(BUCKETS - 1)
}

/// The latencies (µs) of bucket `i`: `[low, high)`.
fn bounds(i: usize) -> (f64, f64) {
    let (o, half) = (i / 2, i % 2);
    if o == 0 {
        return (0.0, 2.0);
    }
    let step = (1u64 << (o - 1)) as f64;
    let low = (1u64 << o) as f64 + half as f64 * step;
    (low, low + step)
}

/// One upstream's counters and their history.
pub struct Stats {
    latency: [AtomicU64; BUCKETS],
    errors: AtomicU64,
    ring: Mutex<Ring>,
}

struct Ring {
    last_total: u64,
    last_errors: u64,
    /// Requests per tick, `HISTORY` ticks, the newest at `pos - 1`.
    per_tick: [u32; HISTORY],
    errors: [u32; WINDOW],
    /// Ticks sampled so far (the windows are shorter until it reaches them).
    ticks: u64,
    /// Cumulative bucket counts (wrapping `u32`), one every `SERIES_STEP` ticks.
    snapshots: [[u32; BUCKETS]; SNAPSHOTS],
    snapshots_taken: u64,
}

/// What `/upstreams` shows of an upstream's traffic.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Requests per second over the last minute (or since start, when shorter).
    pub rps_1m: f64,
    /// Share of 5xx answers over the last minute; `None` without requests.
    pub error_rate_1m: Option<f64>,
    /// Latency percentiles over the last minute, in ms; `None` without requests.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Requests per second, one point per `SERIES_STEP` seconds over the last five minutes,
    /// oldest first (fewer points in the first five minutes).
    pub rps_series: Vec<f64>,
    /// Seconds per point of `rps_series`.
    pub series_step_s: usize,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: AtomicU64::new(0),
            ring: Mutex::new(Ring {
                last_total: 0,
                last_errors: 0,
                per_tick: [0; HISTORY],
                errors: [0; WINDOW],
                ticks: 0,
                snapshots: [[0; BUCKETS]; SNAPSHOTS],
                snapshots_taken: 0,
            }),
        }
    }
}

impl Stats {
    /// Records one answered request (the request path).
    pub fn record(&self, status: u16, elapsed: Duration) {
        let us = elapsed.as_micros().min(u64::MAX as u128) as u64;
        self.latency[bucket(us)].fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes one sample (the ticker, every [`TICK`]).
    pub fn tick(&self) {
        let counts: [u64; BUCKETS] =
            std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed));
        let total: u64 = counts.iter().sum();
        let errors = self.errors.load(Ordering::Relaxed);
        let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let t = r.ticks as usize;
        r.per_tick[t % HISTORY] = total.wrapping_sub(r.last_total).min(u32::MAX as u64) as u32;
        r.errors[t % WINDOW] = errors.wrapping_sub(r.last_errors).min(u32::MAX as u64) as u32;
        r.last_total = total;
        r.last_errors = errors;
        if t.is_multiple_of(SERIES_STEP) {
            let s = r.snapshots_taken as usize % SNAPSHOTS;
            r.snapshots[s] = std::array::from_fn(|i| counts[i] as u32);
            r.snapshots_taken += 1;
        }
        r.ticks += 1;
    }

    pub fn summary(&self) -> Summary {
        let counts: [u32; BUCKETS] =
            std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed) as u32);
        let r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let ticks = r.ticks as usize;
        let window = ticks.min(WINDOW);
        let recent = |ring: &[u32], n: usize| -> u64 {
            (1..=n)
                .map(|k| u64::from(ring[(ticks - k) % ring.len()]))
                .sum()
        };
        let requests = recent(&r.per_tick, window);
        let errors = recent(&r.errors, window);
        // The oldest snapshot in the window: the histogram since then is counts − it.
        let histogram: Option<[u32; BUCKETS]> = (r.snapshots_taken > 0).then(|| {
            let taken = r.snapshots_taken as usize;
            let oldest = if taken >= SNAPSHOTS {
                taken % SNAPSHOTS
            } else {
                0
            };
            let base = &r.snapshots[oldest];
            std::array::from_fn(|i| counts[i].wrapping_sub(base[i]))
        });
        let points = ticks.min(HISTORY) / SERIES_STEP;
        let rps_series = (0..points)
            .rev()
            .map(|p| {
                let newest = p * SERIES_STEP; // ticks back from the newest
                (newest + 1..=newest + SERIES_STEP)
                    .map(|k| f64::from(r.per_tick[(ticks - k) % HISTORY]))
                    .sum::<f64>()
                    / SERIES_STEP as f64
            })
            .collect();
        let pct = |q: f64| histogram.as_ref().and_then(|h| percentile(h, q));
        Summary {
            rps_1m: if window == 0 {
                0.0
            } else {
                round3(requests as f64 / window as f64)
            },
            error_rate_1m: (requests > 0).then(|| round3(errors as f64 / requests as f64)),
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            rps_series,
            series_step_s: SERIES_STEP,
        }
    }
}

/// The `q` quantile of a bucket histogram in ms, interpolated within its bucket.
fn percentile(h: &[u32; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = h.iter().map(|&c| u64::from(c)).sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0.0;
    for (i, &c) in h.iter().enumerate() {
        let c = f64::from(c);
        if c > 0.0 && seen + c >= rank {
            let (low, high) = bounds(i);
            let us = low + (high - low) * ((rank - seen) / c).clamp(0.0, 1.0);
            return Some(round3(us / 1000.0));
        }
        seen += c;
    }
    None
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Samples every upstream's [`Stats`] once per [`TICK`], for ever. `each` calls its argument
/// on every live upstream's stats.
pub async fn run<F>(each: F)
where
    F: Fn(&mut dyn FnMut(&Stats)),
{
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        each(&mut |s: &Stats| s.tick());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_hold_their_values() {
        for us in [0u64, 1, 2, 3, 5, 7, 100, 1_000, 12_345, 999_999, 60_000_000] {
            let (low, high) = bounds(bucket(us));
            assert!(
                low <= us as f64 && (us as f64) < high,
                "{us}: [{low}, {high})"
            );
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        let mut prev = 0;
        for us in 1..100_000u64 {
            let b = bucket(us);
            assert!(b >= prev);
            prev = b;
        }
    }

    #[test]
    fn rates_errors_percentiles_and_the_series() {
        let s = Stats::default();
        assert_eq!(s.summary().p50_ms, None);
        // Ten seconds: 100 requests a second, 1 ms each, and one 5xx of 100 ms per second.
        for _ in 0..10 {
            for _ in 0..99 {
                s.record(200, Duration::from_millis(1));
            }
            s.record(503, Duration::from_millis(100));
            s.tick();
        }
        let sum = s.summary();
        assert_eq!(sum.rps_1m, 100.0);
        assert_eq!(sum.error_rate_1m, Some(0.01));
        let p50 = sum.p50_ms.unwrap();
        assert!((0.75..1.3).contains(&p50), "{sum:?}");
        let p99 = sum.p99_ms.unwrap();
        assert!((0.75..1.3).contains(&p99), "{sum:?}");
        assert_eq!(sum.rps_series, vec![100.0, 100.0]);
        // Then seven quiet minutes: the window forgets them, the series is five minutes long.
        for _ in 0..420 {
            s.tick();
        }
        let sum = s.summary();
        assert_eq!(sum.rps_1m, 0.0);
        assert_eq!(sum.error_rate_1m, None);
        assert_eq!(sum.p50_ms, None);
        assert_eq!(sum.rps_series.len(), HISTORY / SERIES_STEP);
        assert!(sum.rps_series.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn the_p99_sees_a_slow_tail() {
        let s = Stats::default();
        s.tick();
        for i in 0..1000 {
            let ms = if i % 50 == 0 { 200 } else { 2 };
            s.record(200, Duration::from_millis(ms));
        }
        s.tick();
        let sum = s.summary();
        let (p50, p99) = (sum.p50_ms.unwrap(), sum.p99_ms.unwrap());
        assert!((1.5..3.0).contains(&p50), "{sum:?}");
        assert!((150.0..270.0).contains(&p99), "{sum:?}");
    }
}
