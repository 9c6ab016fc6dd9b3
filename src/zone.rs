//! Zone-aware routing: the settings (`zone_aware`, `zone_min_share`, the local zone from
//! `EDGE_AGENT_ZONE`) and the share arithmetic, after Envoy's zone-aware routing.
//!
//! Envoy compares, per zone, the share of the *calling* fleet in the zone with the share of the
//! upstream's healthy hosts in it. The agent does not know the calling fleet; it takes a zone's
//! *expected* share — its share of the upstream's capacity (endpoint weights) when every
//! endpoint is up — as the share of traffic that starts there. Then, with `e` the local zone's
//! expected share and `a` its *available* share (weights of the endpoints that may take traffic
//! now, over all such weights):
//!
//! - `a ≥ zone_min_share × e`: everything goes to the local zone;
//! - otherwise the local zone gets `a / e` of the requests (each of its endpoints then carries
//!   what an endpoint carries on average, so the few left are not overloaded), and the rest
//!   spills to the other zones in proportion to their *residual* capacity, `max(0, a_z − e_z)`
//!   (what they have beyond their own zone's traffic). When no zone has a residual (rounding),
//!   the spill follows available capacity.
//!
//! A local zone with no endpoints at all, or an upstream with nothing available, routes by
//! available capacity (the plain balancer over every zone).
//!
//! This module is pure arithmetic (layer 4, beside the balancers, importing nothing of the
//! crate); `subset.rs` applies it to endpoint groups and keeps the result in atomics that the
//! health sweeper refreshes (see there).
use std::sync::Arc;

/// Default `zone_min_share`: the local zone keeps all traffic while its available share is at
/// least this percentage of its expected share (Envoy uses 100; 70 tolerates losing under a
/// third of a zone before traffic leaves it).
pub const DEFAULT_ZONE_MIN_SHARE: u32 = 70;

/// `zone_aware`: whether an upstream prefers the agent's zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZoneMode {
    /// Zones are ignored (the default).
    #[default]
    Off,
    /// The local zone first, spilling over as the module doc says.
    Prefer,
    /// Only the local zone; 503 when it has no available endpoint.
    Strict,
}

impl ZoneMode {
    pub fn name(self) -> &'static str {
        match self {
            ZoneMode::Off => "off",
            ZoneMode::Prefer => "prefer",
            ZoneMode::Strict => "strict",
        }
    }

    pub fn parse(s: &str) -> Option<ZoneMode> {
        match s {
            "off" => Some(ZoneMode::Off),
            "prefer" => Some(ZoneMode::Prefer),
            "strict" => Some(ZoneMode::Strict),
            _ => None,
        }
    }
}

/// An upstream's zone settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneSettings {
    pub mode: ZoneMode,
    /// The agent's zone (`EDGE_AGENT_ZONE` / `[agent] zone`); `None` turns zone routing off.
    pub local: Option<Arc<str>>,
    /// `zone_min_share`, a percentage of the local zone's expected share.
    pub min_share: u32,
}

impl Default for ZoneSettings {
    fn default() -> Self {
        ZoneSettings {
            mode: ZoneMode::Off,
            local: None,
            min_share: DEFAULT_ZONE_MIN_SHARE,
        }
    }
}

impl ZoneSettings {
    /// The local zone, when zone routing is on.
    pub fn active(&self) -> Option<&Arc<str>> {
        match self.mode {
            ZoneMode::Off => None,
            _ => self.local.as_ref(),
        }
    }
}

/// One zone's capacity: the weight of all its endpoints, and of those available now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    pub expected: u64,
    pub available: u64,
}

/// The share of requests each zone gets: `[local, others…]`, summing to 1 (see the module doc).
/// `min_share` is a percentage.
pub fn shares(local: Capacity, others: &[Capacity], min_share: u32) -> Vec<f64> {
    let mut out = vec![0.0; 1 + others.len()];
    let all_expected: u64 = local.expected + others.iter().map(|c| c.expected).sum::<u64>();
    let all_available: u64 = local.available + others.iter().map(|c| c.available).sum::<u64>();
    if all_available == 0 || all_expected == 0 {
        out[0] = 1.0;
        return out;
    }
    let by_available = |out: &mut Vec<f64>| {
        out[0] = local.available as f64 / all_available as f64;
        for (o, c) in out[1..].iter_mut().zip(others) {
            *o = c.available as f64 / all_available as f64;
        }
    };
    if local.expected == 0 {
        by_available(&mut out);
        return out;
    }
    let e = local.expected as f64 / all_expected as f64;
    let a = local.available as f64 / all_available as f64;
    if a * 100.0 >= e * f64::from(min_share) {
        out[0] = 1.0;
        return out;
    }
    let direct = a / e;
    out[0] = direct;
    let residual: Vec<f64> = others
        .iter()
        .map(|c| {
            let az = c.available as f64 / all_available as f64;
            let ez = c.expected as f64 / all_expected as f64;
            (az - ez).max(0.0)
        })
        .collect();
    let sum: f64 = residual.iter().sum();
    if sum <= f64::EPSILON {
        by_available(&mut out);
        return out;
    }
    for (o, r) in out[1..].iter_mut().zip(&residual) {
        *o = (1.0 - direct) * r / sum;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(expected: u64, available: u64) -> Capacity {
        Capacity {
            expected,
            available,
        }
    }

    fn close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-9, "got {got:?}, want {want:?}");
        }
        assert!((got.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{got:?}");
    }

    #[test]
    fn a_healthy_local_zone_takes_everything() {
        close(
            &shares(cap(3, 3), &[cap(3, 3), cap(3, 3)], 70),
            &[1.0, 0.0, 0.0],
        );
        // One of three local endpoints out: 2/8 available vs 3/9 expected = 75 % ≥ 70 %.
        close(
            &shares(cap(3, 2), &[cap(3, 3), cap(3, 3)], 70),
            &[1.0, 0.0, 0.0],
        );
        // The same at Envoy's threshold (100 %) spills.
        let s = shares(cap(3, 2), &[cap(3, 3), cap(3, 3)], 100);
        assert!((s[0] - 0.75).abs() < 1e-9, "{s:?}");
    }

    /// 3 zones × 3 endpoints, 2 of 3 local ones down: the local one gets (1/7)/(1/3) = 3/7, and
    /// the two other zones split the rest by residual capacity (equal here): 2/7 each. Every
    /// endpoint left then carries 1/7 of the fleet's traffic.
    #[test]
    fn two_of_three_local_down_spills_by_the_formula() {
        close(
            &shares(cap(3, 1), &[cap(3, 3), cap(3, 3)], 70),
            &[3.0 / 7.0, 2.0 / 7.0, 2.0 / 7.0],
        );
    }

    #[test]
    fn weights_count_not_endpoints_and_spill_follows_residuals() {
        // Local: weights 10+10+10, 10 left; zone b: weights 30, all up; zone c: 30, 10 left.
        // expected 30/90 each; available 10/50, 30/50, 10/50.
        // e = 1/3, a = 1/5 → direct 0.6; residual b = 0.6 − 1/3, c = max(0, 0.2 − 1/3) = 0.
        close(
            &shares(cap(30, 10), &[cap(30, 30), cap(30, 10)], 70),
            &[0.6, 0.4, 0.0],
        );
        // A heavy local endpoint ejected counts by its weight: 1+1+8, the 8 out.
        let s = shares(cap(10, 2), &[cap(10, 10)], 70);
        // e = 1/2, a = 2/12 → direct 1/3, the rest to b.
        close(&s, &[1.0 / 3.0, 2.0 / 3.0]);
    }

    #[test]
    fn edge_cases() {
        // The local zone gone entirely: all spills, to the zones with residual capacity (c is
        // short of its own share).
        close(
            &shares(cap(3, 0), &[cap(3, 3), cap(3, 1)], 70),
            &[0.0, 1.0, 0.0],
        );
        // No local endpoints at all: by available capacity.
        close(
            &shares(cap(0, 0), &[cap(2, 2), cap(2, 2)], 70),
            &[0.0, 0.5, 0.5],
        );
        // Nothing available anywhere: "local" (the later stages find what they can).
        close(&shares(cap(3, 0), &[cap(3, 0)], 70), &[1.0, 0.0]);
        // Only a local zone.
        close(&shares(cap(3, 1), &[], 70), &[1.0]);
        // zone_min_share 0: never spill while anything local is up.
        close(&shares(cap(3, 1), &[cap(3, 3)], 0), &[1.0, 0.0]);
    }
}
