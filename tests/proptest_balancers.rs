//! Property tests for the balancers (issue #5): every balancer in
//! `edge_agent::balancer::REGISTRY`, over arbitrary weight vectors and registry health, hands
//! out each usable endpoint exactly once per request and nothing else; smooth round robin's
//! schedule gives every endpoint its weight's share over whole cycles.
//!
//! 64 cases per property (each case checks every balancer over up to 49 endpoints) keeps the
//! file within a few seconds in CI.
use std::collections::BTreeMap;

use discovery::Instance;
use edge_agent::balancer::{roundrobin, Candidates, Options, PickContext, Rng, Spec, REGISTRY};
use edge_agent::endpoint::Endpoint;
use proptest::prelude::*;

const CASES: u32 = 64;

/// Endpoints on distinct loopback ports with the given weights and registry health.
fn endpoints(spec: &[(u32, bool)]) -> Vec<Endpoint> {
    spec.iter()
        .enumerate()
        .map(|(i, (w, healthy))| {
            let mut inst = Instance::new("127.0.0.1", 10_000 + i as u16);
            inst.weight = *w;
            inst.healthy = *healthy;
            Endpoint::from_instance(&inst, "file", Default::default()).unwrap()
        })
        .collect()
}

static RNG: Rng = Rng::new(1);

fn ctx(key: Option<u64>) -> PickContext<'static> {
    PickContext {
        key,
        now_ms: 0,
        panic: false,
        slow_start: None,
        rng: &RNG,
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(CASES)
    })]

    /// For every balancer, weights in 0..=100 and any registry health: one request's candidates
    /// never repeat an endpoint, never include a weight-0 or unhealthy one, include at least one
    /// when any is usable, and in fact include every usable one (retries can reach them all).
    #[test]
    fn candidates_yield_each_usable_endpoint_once(
        spec in prop::collection::vec((0u32..=100, prop::bool::weighted(0.8)), 1..50),
        keys in prop::collection::vec(proptest::option::of(any::<u64>()), 1..3),
    ) {
        let eps = endpoints(&spec);
        let usable: Vec<usize> = (0..eps.len())
            .filter(|&i| spec[i].0 > 0 && spec[i].1)
            .collect();
        for kind in REGISTRY {
            let name = kind.name;
            // `hash_on = "ip"` for the balancers that read it.
            let hash_on = kind.options.contains(&"hash_on").then_some("ip");
            let options = Options { hash_on, ewma_decay: edge_agent::load::DEFAULT_DECAY };
            let b = Spec::new(name, &options).unwrap().build(&eps);
            for &key in &keys {
                // Several requests on the same balancer, so stateful ones (round robin's
                // cursor) are checked from different positions.
                for _ in 0..2 {
                    let seen: Vec<usize> = Candidates::new(b.as_ref(), &eps, ctx(key))
                        .map(|e| eps.iter().position(|x| x.id == e.id).unwrap())
                        .take(eps.len() + 1)
                        .collect();
                    let mut sorted = seen.clone();
                    sorted.sort_unstable();
                    sorted.dedup();
                    prop_assert_eq!(sorted.len(), seen.len(), "{} key {:?}: repeated {:?}", name, key, seen);
                    for &i in &seen {
                        prop_assert!(spec[i].0 > 0, "{} key {:?}: weight-0 endpoint {} picked", name, key, i);
                        prop_assert!(spec[i].1, "{} key {:?}: unhealthy endpoint {} picked", name, key, i);
                    }
                    if !usable.is_empty() {
                        prop_assert!(!seen.is_empty(), "{} key {:?}: nothing picked", name, key);
                    }
                    prop_assert_eq!(&sorted, &usable, "{} key {:?}", name, key);
                }
            }
        }
    }

    /// Smooth weighted round robin: over one whole schedule (the reduced weights' sum long),
    /// each endpoint appears exactly weight / gcd times and weight-0 endpoints never appear.
    #[test]
    fn roundrobin_schedule_share_equals_weights(
        weights in prop::collection::vec(0u32..=100, 1..50),
    ) {
        let schedule = roundrobin::schedule(&weights);
        let g = weights.iter().fold(0, |g, w| gcd(g, *w));
        let mut counts: BTreeMap<usize, u32> = BTreeMap::new();
        for &i in &schedule {
            *counts.entry(i as usize).or_default() += 1;
        }
        for (i, &w) in weights.iter().enumerate() {
            let want = if w == 0 { 0 } else { w / g };
            prop_assert_eq!(counts.get(&i).copied().unwrap_or(0), want, "endpoint {} weights {:?}", i, weights);
        }
    }

    /// The round robin balancer itself, all endpoints usable: over k whole cycles, first picks
    /// land on each endpoint k × weight / gcd times.
    #[test]
    fn roundrobin_picks_share_equals_weights_over_whole_cycles(
        weights in prop::collection::vec(0u32..=100, 1..50),
        cycles in 1usize..3,
    ) {
        let spec: Vec<(u32, bool)> = weights.iter().map(|w| (*w, true)).collect();
        let eps = endpoints(&spec);
        let b = roundrobin::build(&eps);
        let period = roundrobin::schedule(&weights).len();
        let mut counts = vec![0usize; eps.len()];
        for _ in 0..period * cycles {
            let first = Candidates::new(b.as_ref(), &eps, ctx(None)).next();
            let first = first.map(|e| usize::from(e.authority.port_u16().unwrap() - 10_000));
            match first {
                Some(i) => counts[i] += 1,
                None => prop_assert!(weights.iter().all(|w| *w == 0)),
            }
        }
        let g = weights.iter().fold(0, |g, w| gcd(g, *w));
        for (i, &w) in weights.iter().enumerate() {
            let want = if w == 0 { 0 } else { cycles * (w / g) as usize };
            prop_assert_eq!(counts[i], want, "endpoint {} weights {:?}", i, weights);
        }
    }
}
