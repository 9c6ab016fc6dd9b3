//! Smooth weighted round robin (nginx's algorithm): weights 5, 1, 1 give a a b a c a a, spreading
//! the light endpoints out instead of sending bursts.
//!
//! nginx keeps per-endpoint `current_weight` counters and updates them under a lock on every
//! pick. Here the whole smooth sequence is computed once, off the request path, when the
//! upstream snapshot is built; a pick is one relaxed atomic increment and an index. The sequence
//! is the reduced weights' sum long (weights divided by their gcd; scaled down when the sum
//! would pass [`MAX_SCHEDULE`]). Endpoints that are unavailable at pick time are skipped by
//! walking on in the sequence, which keeps the others' relative shares.
use std::sync::atomic::{AtomicUsize, Ordering};

use std::sync::Arc;

use super::{Balancer, Kind, Options, PickContext, Settings, Tried};
use crate::endpoint::Endpoint;

/// Longest precomputed sequence. Larger weight sums are scaled down to fit (each weight stays
/// at least 1).
pub const MAX_SCHEDULE: u64 = 1 << 14;

pub struct RoundRobin {
    schedule: Box<[u32]>,
    next: AtomicUsize,
}

/// `balancer = "roundrobin"`: no options.
pub const KIND: Kind = Kind {
    name: "roundrobin",
    options: &[],
    settings: |_: &Options| Ok(Arc::new(RoundRobinSettings)),
};

/// Round robin has no settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundRobinSettings;

impl Settings for RoundRobinSettings {
    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Balancer> {
        build(endpoints)
    }
}

pub fn build(endpoints: &[Endpoint]) -> Box<dyn Balancer> {
    let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
    Box::new(RoundRobin {
        schedule: schedule(&weights).into_boxed_slice(),
        next: AtomicUsize::new(0),
    })
}

/// The smooth weighted sequence of indices for `weights` (zero weights never appear).
pub fn schedule(weights: &[u32]) -> Vec<u32> {
    let live: Vec<(u32, u64)> = weights
        .iter()
        .enumerate()
        .filter(|(_, w)| **w > 0)
        .map(|(i, w)| (i as u32, u64::from(*w)))
        .collect();
    if live.is_empty() {
        return Vec::new();
    }
    if live.iter().all(|(_, w)| *w == live[0].1) {
        return live.iter().map(|(i, _)| *i).collect();
    }
    let g = live.iter().fold(0, |g, (_, w)| gcd(g, *w));
    let mut reduced: Vec<(u32, i64)> = live.iter().map(|(i, w)| (*i, (*w / g) as i64)).collect();
    let sum: u64 = reduced.iter().map(|(_, w)| *w as u64).sum();
    if sum > MAX_SCHEDULE {
        for (_, w) in &mut reduced {
            *w = ((*w as u64 * MAX_SCHEDULE / sum).max(1)) as i64;
        }
    }
    smooth(&reduced)
}

/// nginx's smooth weighted sequence for `(index, weight)` pairs, one full cycle.
///
/// nginx adds every weight to its endpoint's counter at each step and picks the largest (the
/// first on ties), then subtracts the total from it: O(n) per step. After `k` steps endpoint
/// `i`'s counter is `k·wᵢ − total·pᵢ` (`pᵢ` = its picks so far), so among endpoints of equal
/// weight the leader is the one picked least (the lowest index on ties), and those take turns in
/// index order. Keeping one queue per distinct weight makes a step O(distinct weights) and gives
/// exactly nginx's sequence: a 10,000-endpoint upstream with two weights costs ~2·10⁴ steps, not
/// 10⁸.
fn smooth(reduced: &[(u32, i64)]) -> Vec<u32> {
    use std::collections::{BTreeMap, VecDeque};
    let total: i64 = reduced.iter().map(|(_, w)| *w).sum();
    // weight → positions (into `reduced`) ordered by (picks, position).
    let mut classes: BTreeMap<i64, VecDeque<usize>> = BTreeMap::new();
    for (pos, (_, w)) in reduced.iter().enumerate() {
        classes.entry(*w).or_default().push_back(pos);
    }
    let mut classes: Vec<(i64, VecDeque<usize>)> = classes.into_iter().collect();
    let mut picks = vec![0i64; reduced.len()];
    let mut out = Vec::with_capacity(total as usize);
    for step in 1..=total {
        let mut best: Option<(i64, usize, usize)> = None; // (counter, position, class)
        for (c, (w, queue)) in classes.iter().enumerate() {
            let pos = queue[0];
            let counter = step * w - total * picks[pos];
            let better = match best {
                None => true,
                Some((bc, bpos, _)) => counter > bc || (counter == bc && pos < bpos),
            };
            if better {
                best = Some((counter, pos, c));
            }
        }
        let (_, pos, c) = best.expect("at least one class");
        picks[pos] += 1;
        let queue = &mut classes[c].1;
        queue.rotate_left(1);
        out.push(reduced[pos].0);
    }
    out
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Balancer for RoundRobin {
    fn next(&self, endpoints: &[Endpoint], ctx: &PickContext, tried: &Tried) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let pos = start % len;
        let ok = |i: usize| !tried.contains(i) && endpoints.get(i).is_some_and(|e| ctx.usable(e));
        let first = self.schedule[pos] as usize;
        if ok(first) || len == 1 {
            return ok(first).then_some(first);
        }
        // Walk on from a slot whose endpoint is out, starting at an offset that changes every
        // cycle, so the slot's share spreads over the others by weight instead of all going to
        // its successor in the sequence.
        let offset = 1 + (start / len) % (len - 1);
        (0..len)
            .map(|step| self.schedule[(pos + offset + step) % len] as usize)
            .find(|&i| ok(i))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ctx, endpoints};
    use super::*;

    fn picks(weights: &[u32], n: usize) -> Vec<usize> {
        let eps = endpoints(weights);
        let b = build(&eps);
        (0..n)
            .map(|_| b.next(&eps, &ctx(), &Tried::default()).unwrap())
            .collect()
    }

    #[test]
    fn nginx_sequence_for_5_1_1() {
        // nginx's documented example: a a b a c a a.
        assert_eq!(picks(&[5, 1, 1], 7), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    /// nginx's algorithm as written, to check the fast one against.
    fn naive(reduced: &[(u32, i64)]) -> Vec<u32> {
        let total: i64 = reduced.iter().map(|(_, w)| *w).sum();
        let mut current = vec![0i64; reduced.len()];
        let mut out = Vec::new();
        for _ in 0..total {
            let mut best = 0;
            for (k, (_, w)) in reduced.iter().enumerate() {
                current[k] += w;
                if current[k] > current[best] {
                    best = k;
                }
            }
            current[best] -= total;
            out.push(reduced[best].0);
        }
        out
    }

    #[test]
    fn fast_sequence_is_nginx_sequence() {
        let mut seed = 0x9e37_79b9_u64;
        for n in 1..40u32 {
            for _ in 0..5 {
                let reduced: Vec<(u32, i64)> = (0..n)
                    .map(|i| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        (i, 1 + (seed % 4) as i64 * (1 + (seed % 3) as i64))
                    })
                    .collect();
                assert_eq!(smooth(&reduced), naive(&reduced), "{reduced:?}");
            }
        }
    }

    #[test]
    fn equal_weights_rotate() {
        assert_eq!(picks(&[2, 2, 2], 6), vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn distribution_follows_weights() {
        let n = 60_000;
        let p = picks(&[1, 2, 3], n);
        let share = |i| p.iter().filter(|&&x| x == i).count() as f64 / n as f64;
        assert!((share(0) - 1.0 / 6.0).abs() < 0.001, "{}", share(0));
        assert!((share(1) - 2.0 / 6.0).abs() < 0.001, "{}", share(1));
        assert!((share(2) - 3.0 / 6.0).abs() < 0.001, "{}", share(2));
    }

    #[test]
    fn zero_weight_gets_nothing() {
        let p = picks(&[0, 1, 0, 1], 100);
        assert!(p.iter().all(|&i| i == 1 || i == 3));
        let eps = endpoints(&[0, 0]);
        let b = build(&eps);
        assert_eq!(b.next(&eps, &ctx(), &Tried::default()), None);
    }

    #[test]
    fn huge_weights_are_scaled_not_refused() {
        let s = schedule(&[1_000_000, 3_000_000, 7]);
        assert!(s.len() as u64 <= MAX_SCHEDULE + 3);
        assert!(s.contains(&2), "tiny weight still appears");
        let c0 = s.iter().filter(|&&i| i == 0).count() as f64;
        let c1 = s.iter().filter(|&&i| i == 1).count() as f64;
        assert!((c1 / c0 - 3.0).abs() < 0.01, "{}", c1 / c0);
    }

    #[test]
    fn an_unavailable_endpoints_share_spreads_over_the_others() {
        let mut eps = endpoints(&[1, 1, 1, 1]);
        eps[2].healthy = false;
        let b = build(&eps);
        let mut counts = [0usize; 4];
        for _ in 0..3000 {
            counts[b.next(&eps, &ctx(), &Tried::default()).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0);
        for c in [counts[0], counts[1], counts[3]] {
            assert!((950..=1050).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn unavailable_and_tried_are_skipped() {
        let mut eps = endpoints(&[1, 1, 1]);
        eps[1].healthy = false;
        let b = build(&eps);
        let mut tried = Tried::default();
        for _ in 0..10 {
            assert_ne!(b.next(&eps, &ctx(), &tried), Some(1));
        }
        tried.insert(0);
        tried.insert(2);
        assert_eq!(b.next(&eps, &ctx(), &tried), None);
    }
}
