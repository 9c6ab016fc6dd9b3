//! Load balancers.
//!
//! A balancer is built off the request path from an upstream's endpoint list (it is part of the
//! routing table and is rebuilt with it) and answers one question on the request path: which
//! endpoint to try next, skipping those already tried. [`Candidates`] turns that into an
//! iterator, so retries and "skip the one that just failed" compose without special cases.
//!
//! Each balancer owns its settings (Pingora's `BackendSelection::Config`): a file defines a
//! [`Settings`] type and a [`Kind`] that builds it from the upstream's [`Options`], and a
//! [`Spec`] (the kind with its settings) is what an upstream's settings hold. Adding a balancer:
//! one file and one line in [`REGISTRY`]. Options a balancer does not read (`hash_on` for
//! anything but `chash`) are refused when the configuration is validated.
//!
//! Upstreams hold a `Box<dyn Balancer>`: one indirect call per pick, a few nanoseconds, bought for
//! a plugin boundary that stays this simple.
use std::any::Any;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Uri};

use crate::endpoint::Endpoint;
use crate::rng::mix64;
pub use crate::rng::Rng;

pub mod chash;
#[cfg(test)]
mod custom_example;
pub mod ewma;
pub mod least_conn;
pub mod roundrobin;

/// Picks endpoints for one upstream.
pub trait Balancer: Send + Sync {
    /// The index (into `endpoints`) of the next endpoint to try: a usable one not in `tried`.
    /// `None` when there is none left.
    fn next(&self, endpoints: &[Endpoint], ctx: &PickContext, tried: &Tried) -> Option<usize>;
}

/// A balancer's own settings, built when the configuration is validated. Equality comes with
/// `PartialEq` (through [`DynEq`]), so a reload that changes them is seen.
pub trait Settings: DynEq + std::fmt::Debug + Send + Sync + 'static {
    /// Builds the balancer for an endpoint list (off the request path).
    fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Balancer>;

    /// For a balancer that hashes a request key: the key's hash, `Some(None)` when the request
    /// lacks it. `None` (the default): the balancer takes no key.
    fn key(&self, _headers: &HeaderMap, _uri: &Uri, _ip: IpAddr) -> Option<Option<u64>> {
        None
    }
}

/// Equality across settings types (false for another type); implemented for every
/// `PartialEq` type.
pub trait DynEq {
    fn same(&self, other: &dyn Any) -> bool;
    fn as_any(&self) -> &dyn Any;
}

impl<T: PartialEq + 'static> DynEq for T {
    fn same(&self, other: &dyn Any) -> bool {
        other.downcast_ref::<T>() == Some(self)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The upstream options a balancer may read, as the configuration gives them.
#[derive(Debug, Clone, Default)]
pub struct Options<'a> {
    /// `hash_on` (read by `chash` only).
    pub hash_on: Option<&'a str>,
    /// The upstream's EWMA decay (`ewma_decay`; every upstream keeps the estimate, the `ewma`
    /// balancer reads it).
    pub ewma_decay: Duration,
}

impl Options<'_> {
    /// The balancer-only options that are set, by their configuration names.
    fn given(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.hash_on.is_some() {
            v.push("hash_on");
        }
        v
    }
}

/// One balancer: its configuration name, the balancer-only options it reads, and how its
/// settings are built from them.
pub struct Kind {
    pub name: &'static str,
    pub options: &'static [&'static str],
    pub settings: fn(&Options) -> Result<Arc<dyn Settings>, String>,
}

/// Every balancer.
pub const REGISTRY: &[Kind] = &[
    roundrobin::KIND,
    chash::KIND,
    ewma::KIND,
    least_conn::KIND,
    #[cfg(test)]
    custom_example::KIND,
];

/// The kind of a configuration name.
pub fn kind(name: &str) -> Option<&'static Kind> {
    REGISTRY.iter().find(|k| k.name == name)
}

/// Names of all balancers, for error messages and help.
pub fn names() -> Vec<&'static str> {
    REGISTRY.iter().map(|k| k.name).collect()
}

/// Why a balancer choice was refused; the config names the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("unknown balancer {name:?} (known: {known})")]
    Unknown { name: String, known: String },
    #[error("{option} is read only by {readers}, not by balancer {balancer:?}")]
    NotRead {
        option: &'static str,
        balancer: &'static str,
        readers: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A balancer with its settings: what an upstream's settings hold.
#[derive(Debug, Clone)]
pub struct Spec {
    kind: &'static Kind,
    settings: Arc<dyn Settings>,
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl PartialEq for Spec {
    fn eq(&self, other: &Spec) -> bool {
        self.kind.name == other.kind.name && self.settings.same(other.settings.as_any())
    }
}

impl Eq for Spec {}

impl Spec {
    /// The balancer `name` with its settings from `options`.
    pub fn new(name: &str, options: &Options) -> Result<Spec, SpecError> {
        let kind = kind(name).ok_or_else(|| SpecError::Unknown {
            name: name.to_string(),
            known: names().join(", "),
        })?;
        if let Some(option) = options
            .given()
            .into_iter()
            .find(|o| !kind.options.contains(o))
        {
            let readers: Vec<&str> = REGISTRY
                .iter()
                .filter(|k| k.options.contains(&option))
                .map(|k| k.name)
                .collect();
            return Err(SpecError::NotRead {
                option,
                balancer: kind.name,
                readers: readers.join(", "),
            });
        }
        let settings = (kind.settings)(options).map_err(SpecError::Invalid)?;
        Ok(Spec { kind, settings })
    }

    /// The balancer `name` with default settings.
    pub fn named(name: &str) -> Result<Spec, SpecError> {
        Spec::new(
            name,
            &Options {
                ewma_decay: crate::load::DEFAULT_DECAY,
                ..Default::default()
            },
        )
    }

    /// Round robin, the default.
    pub fn round_robin() -> Spec {
        Spec::named(roundrobin::KIND.name).expect("round robin takes no options")
    }

    pub fn name(&self) -> &'static str {
        self.kind.name
    }

    pub fn settings(&self) -> &dyn Settings {
        self.settings.as_ref()
    }

    /// Builds the balancer for an endpoint list.
    pub fn build(&self, endpoints: &[Endpoint]) -> Box<dyn Balancer> {
        self.settings.build(endpoints)
    }

    /// See [`Settings::key`].
    pub fn key(&self, headers: &HeaderMap, uri: &Uri, ip: IpAddr) -> Option<Option<u64>> {
        self.settings.key(headers, uri, ip)
    }
}

/// What a balancer may know of the request. `Copy`, and borrowing only the upstream's RNG, so
/// a candidate iterator does not borrow the request the proxy is about to send.
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    /// Hash of the request's balancing key, when the upstream hashes on one and the request has
    /// it.
    pub key: Option<u64>,
    /// Process-clock milliseconds ([`crate::clock::now_ms`]) when the pick started.
    pub now_ms: u64,
    /// Panic mode: the agent's own health verdicts are ignored (too few endpoints are healthy).
    pub panic: bool,
    /// The upstream's slow-start window.
    pub slow_start: Option<Duration>,
    /// Draws for slow-start admission (the upstream's; seeded in tests).
    pub rng: &'a Rng,
}

impl PickContext<'_> {
    /// Whether `ep` may be picked for this request ([`Endpoint::usable`]).
    #[inline]
    pub fn usable(&self, ep: &Endpoint) -> bool {
        ep.usable(self.panic, self.now_ms, self.slow_start, self.rng)
    }
}

/// Indices already tried for one request. Holds a few inline; retries are few.
#[derive(Debug, Default, Clone)]
pub struct Tried {
    inline: [u32; 4],
    len: usize,
    more: Vec<u32>,
}

impl Tried {
    pub fn contains(&self, i: usize) -> bool {
        let i = i as u32;
        self.inline[..self.len.min(4)].contains(&i) || self.more.contains(&i)
    }

    pub fn insert(&mut self, i: usize) {
        if self.contains(i) {
            return;
        }
        if self.len < self.inline.len() {
            self.inline[self.len] = i as u32;
            self.len += 1;
        } else {
            self.more.push(i as u32);
        }
    }

    pub fn len(&self) -> usize {
        self.len + self.more.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The indices tried, in the order they were first inserted.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.inline[..self.len.min(4)]
            .iter()
            .chain(&self.more)
            .map(|&i| i as usize)
    }
}

/// The endpoints to try for one request, in order, each at most once.
pub struct Candidates<'a> {
    balancer: &'a dyn Balancer,
    endpoints: &'a [Endpoint],
    ctx: PickContext<'a>,
    tried: Tried,
}

impl<'a> Candidates<'a> {
    pub fn new(
        balancer: &'a dyn Balancer,
        endpoints: &'a [Endpoint],
        ctx: PickContext<'a>,
    ) -> Self {
        Candidates {
            balancer,
            endpoints,
            ctx,
            tried: Tried::default(),
        }
    }

    /// The next candidate with its index in the endpoint list.
    pub fn next_indexed(&mut self) -> Option<(usize, &'a Endpoint)> {
        let i = self.balancer.next(self.endpoints, &self.ctx, &self.tried)?;
        self.tried.insert(i);
        self.endpoints.get(i).map(|e| (i, e))
    }

    /// Marks index `i` as tried (another list yielded the same endpoint). Not `skip`, which
    /// would read as `Iterator::skip`.
    pub fn mark_tried(&mut self, i: usize) {
        self.tried.insert(i);
    }

    /// The indices yielded (or skipped) so far.
    pub fn tried(&self) -> &Tried {
        &self.tried
    }

    /// The request's pick context.
    pub fn context(&self) -> PickContext<'a> {
        self.ctx
    }
}

impl<'a> Iterator for Candidates<'a> {
    type Item = &'a Endpoint;

    fn next(&mut self) -> Option<&'a Endpoint> {
        self.next_indexed().map(|(_, e)| e)
    }
}

/// Random draws [`two_choices`] makes before it falls back to a scan.
pub const SAMPLE_DRAWS: usize = 8;

/// Power of two choices: two distinct indices in `0..n` for which `eligible` holds, drawn
/// uniformly, first draw first (so "keep the first on a tie" is a fair coin). The second is
/// `None` when only one index is eligible; `None` overall when none is. Costs O(1) while most
/// endpoints are eligible; after [`SAMPLE_DRAWS`] misses (most endpoints down or tried) it
/// scans from a random start, which is O(n) and slightly less uniform, but only then.
pub fn two_choices(
    n: usize,
    rng: &Rng,
    eligible: impl Fn(usize) -> bool,
) -> Option<(usize, Option<usize>)> {
    if n == 0 {
        return None;
    }
    let mut first = None;
    // Two draws per random word (its high and low halves, each mapped to `0..n` by
    // multiply-shift): one atomic step per pair instead of one per draw (#8: the pick cost).
    for _ in 0..SAMPLE_DRAWS / 2 {
        let r = rng.next_u64();
        for half in [r >> 32, r & 0xffff_ffff] {
            let i = ((half * n as u64) >> 32) as usize;
            match first {
                None if eligible(i) => first = Some(i),
                Some(f) if i != f && eligible(i) => return Some((f, Some(i))),
                _ => {}
            }
        }
    }
    let start = rng.below(n);
    for step in 0..n {
        let i = (start + step) % n;
        if first == Some(i) || !eligible(i) {
            continue;
        }
        match first {
            None => first = Some(i),
            Some(f) => return Some((f, Some(i))),
        }
    }
    first.map(|f| (f, None))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for balancer tests.
    use super::*;

    pub fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let mut inst = discovery::Instance::new("127.0.0.1", 10_000 + i as u16);
                inst.weight = *w;
                Endpoint::from_instance(&inst, "file", Default::default()).unwrap()
            })
            .collect()
    }

    static RNG: Rng = Rng::new(0x7465_7374);

    pub fn ctx<'a>() -> PickContext<'a> {
        PickContext {
            key: None,
            now_ms: 0,
            panic: false,
            slow_start: None,
            rng: &RNG,
        }
    }

    /// The default settings of a registered balancer, with `hash_on = "ip"` where it is read.
    pub fn spec(kind: &Kind) -> Spec {
        let hash_on = kind.options.contains(&"hash_on").then_some("ip");
        Spec::new(
            kind.name,
            &Options {
                hash_on,
                ewma_decay: crate::load::DEFAULT_DECAY,
            },
        )
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tried_spills_past_inline() {
        let mut t = Tried::default();
        for i in 0..10 {
            t.insert(i);
            t.insert(i);
        }
        assert_eq!(t.len(), 10);
        assert!((0..10).all(|i| t.contains(i)));
        assert!(!t.contains(10));
    }

    #[test]
    fn candidates_never_repeat_and_end() {
        let eps = testing::endpoints(&[5, 1, 1]);
        let b = Spec::round_robin().build(&eps);
        let seen: Vec<u16> = Candidates::new(b.as_ref(), &eps, testing::ctx())
            .map(|e| e.authority.port_u16().unwrap())
            .collect();
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(seen.len(), 3);
        assert_eq!(sorted.len(), 3);
    }

    /// Every registered balancer, with and without a hash key, with one endpoint down and one
    /// of weight 0: each usable endpoint comes exactly once, then the iterator ends.
    #[test]
    fn every_balancer_yields_each_usable_endpoint_once() {
        let mut eps = testing::endpoints(&[1, 2, 3, 0, 1, 1, 5]);
        eps[4].healthy = false;
        for kind in REGISTRY {
            let name = kind.name;
            let b = testing::spec(kind).build(&eps);
            for key in [None, Some(1), Some(u64::MAX), Some(0x1234_5678)] {
                for _ in 0..20 {
                    let ctx = PickContext {
                        key,
                        ..testing::ctx()
                    };
                    let mut seen: Vec<usize> = Candidates::new(b.as_ref(), &eps, ctx)
                        .map(|e| eps.iter().position(|x| x.id == e.id).unwrap())
                        .collect();
                    seen.sort();
                    assert_eq!(seen, vec![0, 1, 2, 5, 6], "{name} key {key:?}");
                }
            }
        }
    }

    #[test]
    fn every_balancer_handles_empty_and_all_down() {
        let mut down = testing::endpoints(&[1, 1]);
        for e in &mut down {
            e.healthy = false;
        }
        for kind in REGISTRY {
            let name = kind.name;
            for eps in [Vec::new(), down.clone()] {
                let b = testing::spec(kind).build(&eps);
                for key in [None, Some(7)] {
                    let ctx = PickContext {
                        key,
                        ..testing::ctx()
                    };
                    assert_eq!(b.next(&eps, &ctx, &Tried::default()), None, "{name}");
                }
            }
        }
    }

    #[test]
    fn two_choices_are_distinct_uniform_and_fall_back_to_a_scan() {
        let rng = Rng::new(1);
        let mut firsts = [0usize; 4];
        let mut pairs = [[0usize; 4]; 4];
        for _ in 0..40_000 {
            let (a, b) = two_choices(4, &rng, |_| true).unwrap();
            let b = b.unwrap();
            assert_ne!(a, b);
            firsts[a] += 1;
            pairs[a][b] += 1;
        }
        assert!(firsts
            .iter()
            .all(|&c| (c as f64 / 40_000.0 - 0.25).abs() < 0.01));
        assert!(pairs.iter().flatten().filter(|&&c| c > 0).count() == 12);
        // One eligible among many: found by the scan.
        for _ in 0..100 {
            assert_eq!(two_choices(1_000, &rng, |i| i == 777), Some((777, None)));
        }
        assert_eq!(two_choices(1_000, &rng, |_| false), None);
        assert_eq!(two_choices(0, &rng, |_| true), None);
        // Same seed, same sequence.
        let (x, y) = (Rng::new(5), Rng::new(5));
        assert!((0..100).all(|_| x.next_u64() == y.next_u64()));
    }

    /// Defect 7 of #12: `hash_on` was accepted for any balancer, and round robin then hashed
    /// every request. Only a balancer that reads an option may be given it.
    #[test]
    fn an_option_the_balancer_does_not_read_is_refused() {
        let opts = Options {
            hash_on: Some("header:x-user"),
            ewma_decay: crate::load::DEFAULT_DECAY,
        };
        for name in ["roundrobin", "ewma", "least_conn"] {
            let err = Spec::new(name, &opts).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("hash_on is read only by chash, not by balancer {name:?}")
            );
        }
        let chash = Spec::new("chash", &opts).unwrap();
        assert_eq!(chash.name(), "chash");
        assert_ne!(chash, Spec::named("chash").unwrap(), "hash_on differs");
        assert_eq!(Spec::named("chash").unwrap(), Spec::named("chash").unwrap());
        assert!(Spec::round_robin()
            .key(
                &HeaderMap::new(),
                &Uri::from_static("/"),
                [127, 0, 0, 1].into()
            )
            .is_none());
        assert!(matches!(
            Spec::named("random"),
            Err(SpecError::Unknown { .. })
        ));
    }
}
