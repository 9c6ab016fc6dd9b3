//! Outlier detection over an interval (Envoy's success-rate and failure-percentage detectors),
//! beside the consecutive-failure counters of `passive.rs`.
//!
//! Every finished try adds to its endpoint's window (requests, failures; two relaxed atomic
//! adds in [`super::passive::record`]). Every `interval` the sweeper (`checks.rs`) takes each
//! endpoint's window of an upstream ([`super::Health::take_window`]) and asks [`evaluate`]
//! which endpoints are outliers:
//!
//! - **success rate**: among endpoints with at least `request_volume` requests in the window,
//!   if there are at least `minimum_hosts` of them, an endpoint whose success rate is below
//!   `mean - stdev_factor × stdev` of those rates is an outlier;
//! - **failure percentage**: an endpoint with at least `request_volume` requests whose failure
//!   share is at least `threshold` percent is an outlier, when at least `minimum_hosts` endpoints
//!   have the volume.
//!
//! Ejection itself (time, doubling, `max_ejection_percent`) is [`super::passive::eject`]'s, the
//! same as for consecutive failures. Endpoints already ejected are left out of the statistics.

/// How often the interval detectors run.
pub const DEFAULT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Success rate: endpoints with enough volume needed for the statistics to mean anything.
pub const DEFAULT_SR_MINIMUM_HOSTS: u32 = 5;
/// Success rate: requests in the interval for an endpoint to count.
pub const DEFAULT_SR_REQUEST_VOLUME: u32 = 100;
/// Success rate: how many standard deviations below the mean is an outlier (Envoy's 1900/1000).
pub const DEFAULT_SR_STDEV_FACTOR: f64 = 1.9;
/// Failure percentage: the failure share (percent) that ejects.
pub const DEFAULT_FP_THRESHOLD: u32 = 85;
/// Failure percentage: endpoints with enough volume needed.
pub const DEFAULT_FP_MINIMUM_HOSTS: u32 = 5;
/// Failure percentage: requests in the interval for an endpoint to count.
pub const DEFAULT_FP_REQUEST_VOLUME: u32 = 50;

/// `[upstream.checks.passive.success_rate]` (on by default, as in Envoy).
#[derive(Debug, Clone, PartialEq)]
pub struct SuccessRate {
    pub minimum_hosts: u32,
    pub request_volume: u32,
    pub stdev_factor: f64,
}

impl Default for SuccessRate {
    fn default() -> Self {
        SuccessRate {
            minimum_hosts: DEFAULT_SR_MINIMUM_HOSTS,
            request_volume: DEFAULT_SR_REQUEST_VOLUME,
            stdev_factor: DEFAULT_SR_STDEV_FACTOR,
        }
    }
}

/// `[upstream.checks.passive.failure_percentage]` (off unless configured, as in Envoy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailurePercentage {
    pub threshold: u32,
    pub minimum_hosts: u32,
    pub request_volume: u32,
}

impl Default for FailurePercentage {
    fn default() -> Self {
        FailurePercentage {
            threshold: DEFAULT_FP_THRESHOLD,
            minimum_hosts: DEFAULT_FP_MINIMUM_HOSTS,
            request_volume: DEFAULT_FP_REQUEST_VOLUME,
        }
    }
}

/// One endpoint's tries in the last interval; `None` for an endpoint left out (ejected).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    pub requests: u32,
    pub failures: u32,
}

impl Sample {
    fn success_rate(&self) -> f64 {
        100.0 * f64::from(self.requests - self.failures.min(self.requests))
            / f64::from(self.requests)
    }
}

/// Why an endpoint is an outlier, with the numbers for the log line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Finding {
    /// Its success rate (percent) fell below `threshold` = `mean - stdev_factor × stdev`.
    SuccessRate {
        rate: f64,
        mean: f64,
        stdev: f64,
        threshold: f64,
    },
    /// Its failure share (percent) reached `threshold`.
    FailurePercentage { percent: f64, threshold: u32 },
}

/// The outliers among `samples` (indexes into it); an endpoint found by both detectors is
/// named once, by success rate.
pub fn evaluate(
    samples: &[Option<Sample>],
    success_rate: Option<&SuccessRate>,
    failure_percentage: Option<&FailurePercentage>,
) -> Vec<(usize, Finding)> {
    let mut out = Vec::new();
    if let Some(sr) = success_rate {
        let rates: Vec<(usize, f64)> = samples
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let s = (*s)?;
                (s.requests >= sr.request_volume.max(1)).then(|| (i, s.success_rate()))
            })
            .collect();
        if !rates.is_empty() && rates.len() >= sr.minimum_hosts as usize {
            let n = rates.len() as f64;
            let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / n;
            let var = rates.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
            let stdev = var.sqrt();
            let threshold = mean - sr.stdev_factor * stdev;
            for &(i, rate) in &rates {
                if rate < threshold {
                    out.push((
                        i,
                        Finding::SuccessRate {
                            rate,
                            mean,
                            stdev,
                            threshold,
                        },
                    ));
                }
            }
        }
    }
    if let Some(fp) = failure_percentage {
        let eligible: Vec<(usize, Sample)> = samples
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let s = (*s)?;
                (s.requests >= fp.request_volume.max(1)).then_some((i, s))
            })
            .collect();
        if !eligible.is_empty() && eligible.len() >= fp.minimum_hosts as usize {
            for (i, s) in eligible {
                let percent = 100.0 - s.success_rate();
                if percent >= f64::from(fp.threshold) && !out.iter().any(|(j, _)| *j == i) {
                    out.push((
                        i,
                        Finding::FailurePercentage {
                            percent,
                            threshold: fp.threshold,
                        },
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(requests: u32, failures: u32) -> Option<Sample> {
        Some(Sample { requests, failures })
    }

    #[test]
    fn success_rate_finds_the_endpoint_far_below_the_mean() {
        // Four at 100 %, one at 70 %: mean 94, stdev 12, threshold 94 - 1.9 × 12 = 71.2.
        let samples = [s(200, 0), s(200, 0), s(200, 0), s(200, 0), s(200, 60)];
        let found = evaluate(&samples, Some(&SuccessRate::default()), None);
        assert_eq!(found.len(), 1, "{found:?}");
        let (
            i,
            Finding::SuccessRate {
                rate,
                mean,
                stdev,
                threshold,
            },
        ) = found[0]
        else {
            panic!("{found:?}")
        };
        assert_eq!(i, 4);
        assert!((rate - 70.0).abs() < 1e-9);
        assert!((mean - 94.0).abs() < 1e-9);
        assert!((stdev - 12.0).abs() < 1e-9);
        assert!((threshold - 71.2).abs() < 1e-9);
    }

    #[test]
    fn success_rate_needs_volume_and_enough_hosts() {
        let sr = SuccessRate::default();
        // The bad one has too little volume to count.
        let low = [s(200, 0), s(200, 0), s(200, 0), s(200, 0), s(50, 40)];
        assert!(evaluate(&low, Some(&sr), None).is_empty());
        // Four hosts with volume: under minimum_hosts = 5.
        let few = [s(200, 0), s(200, 0), s(200, 0), s(200, 60), None];
        assert!(evaluate(&few, Some(&sr), None).is_empty());
        // Equal rates: no outlier, even when all fail.
        let even = [s(200, 200); 5];
        assert!(evaluate(&even, Some(&sr), None).is_empty());
    }

    #[test]
    fn failure_percentage_uses_a_fixed_threshold() {
        let fp = FailurePercentage {
            threshold: 25,
            ..Default::default()
        };
        let samples = [
            s(100, 0),
            s(100, 5),
            s(100, 30),
            s(100, 24),
            s(100, 25),
            s(10, 10),
        ];
        let found: Vec<usize> = evaluate(&samples, None, Some(&fp))
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            found,
            vec![2, 4],
            "30 % and 25 % reach 25 %; 10/10 lacks volume"
        );
        // Too few hosts with volume.
        let few = [s(100, 90), s(100, 0), s(100, 0), s(100, 0), s(1, 0)];
        assert!(evaluate(&few, None, Some(&fp)).is_empty());
    }
}
