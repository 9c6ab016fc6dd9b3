//! Subsets and zone groups of an upstream, computed when the routing table is built.
//!
//! An upstream may select a subset of its service's endpoints by metadata (`subset = { version
//! = "v2" }`: every listed key must match, values compared as strings), and routes may pick a
//! subset per request from a header (`subset_from_header`). None of that is decided per
//! request: when an upstream is built, every subset it can be asked for becomes a [`Target`], a
//! precomputed balancer over the matching endpoints (for a header rule, one per value of the
//! key that the endpoints carry). A request only looks its target up (a binary search of the
//! header value among the few values the endpoints carry, no allocation) and walks the target's candidates.
//!
//! Endpoints in targets are clones of the upstream's endpoints: the same `Arc`ed state, so one
//! endpoint in two subsets (or two upstreams) is one endpoint with one health, EWMA, in-flight
//! count and pool, and a metadata change that moves it between subsets keeps all of it
//! (`table.rs` carries state over by identity before the targets are built).
//!
//! `fallback` decides what happens when the subset has no endpoint a balancer may pick (or a
//! header names a value no endpoint has), after Envoy's fallback policies: `none` (503 naming
//! the subset), `any` (every endpoint of the upstream) or another subset. Retries stay in the
//! target the first pick came from.
//!
//! Zones: with `zone_aware` on, each target is also split by zone into groups, the local one
//! first. A request draws which group to start in from the target's zone shares (`zone.rs`),
//! then (`prefer`) goes on to the rest of the target, skipping the endpoints it already
//! tried; `strict` stays in the local group. The shares depend on availability, which changes
//! without a rebuild (ejections, active checks): they are kept in atomics that
//! [`Subsets::refresh`] recomputes when the table is built and on every health sweep
//! (`checks.rs`, every 200 ms, which already walks every endpoint). A request reads them with
//! relaxed loads; between sweeps they may lag an ejection by up to one sweep.
//!
//! Layer 4, beside the balancers: it builds balancers over endpoint lists and reads the zone
//! arithmetic; `upstream.rs` holds the result.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::balancer::{Balancer, Candidates, PickContext, Spec};
use crate::endpoint::Endpoint;
use crate::metrics::UpstreamMetrics;
use crate::rng::mix64;
use crate::zone::{self, Capacity, ZoneMode, ZoneSettings};

/// A subset: every key must be in the endpoint's metadata with the same value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(pub BTreeMap<String, String>);

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, ep: &Endpoint) -> bool {
        self.0
            .iter()
            .all(|(k, v)| ep.metadata.get(k).is_some_and(|m| m == v))
    }

    /// `k1=v1,k2=v2`, for messages and the admin API.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.join(",")
    }

    fn with(&self, key: &str, value: &str) -> Selector {
        let mut s = self.clone();
        s.0.insert(key.to_string(), value.to_string());
        s
    }
}

/// What a request gets when its subset has no available endpoint (`fallback`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Fallback {
    /// 503 naming the subset (Envoy's NO_FALLBACK; the default).
    #[default]
    None,
    /// Every endpoint of the upstream (ANY_ENDPOINT).
    Any,
    /// Another subset (DEFAULT_SUBSET).
    Subset(Selector),
}

impl Fallback {
    pub fn describe(&self) -> String {
        match self {
            Fallback::None => "none".into(),
            Fallback::Any => "any".into(),
            Fallback::Subset(s) => s.describe(),
        }
    }
}

/// An upstream's subset and zone settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubsetSettings {
    /// `subset`; empty: every endpoint.
    pub selector: Selector,
    pub fallback: Fallback,
    pub zone: ZoneSettings,
}

/// Endpoints with their balancer, and where each sits in the list it was taken from.
pub struct Group {
    pub endpoints: Box<[Endpoint]>,
    pub balancer: Box<dyn Balancer>,
    /// `parent[i]`: the index of `endpoints[i]` in the target's full list.
    parent: Box<[u32]>,
}

impl Group {
    fn new(spec: &Spec, endpoints: Vec<Endpoint>, parent: Vec<u32>) -> Group {
        Group {
            balancer: spec.build(&endpoints),
            endpoints: endpoints.into_boxed_slice(),
            parent: parent.into_boxed_slice(),
        }
    }
}

/// A target split by zone: group 0 is the local zone (maybe empty), then one per other zone
/// (endpoints without a zone form one), with the request shares as cumulative thresholds.
pub struct ZoneSplit {
    pub mode: ZoneMode,
    pub local: Arc<str>,
    pub min_share: u32,
    pub groups: Box<[(Option<Arc<str>>, Group)]>,
    /// Cumulative shares of [`SHARE_SCALE`], one per group.
    cumulative: Box<[AtomicU32]>,
}

/// The fixed-point scale of zone shares (24 bits of a draw).
pub const SHARE_SCALE: u32 = 1 << 24;

impl ZoneSplit {
    fn new(spec: &Spec, endpoints: &[Endpoint], local: &Arc<str>, z: &ZoneSettings) -> Self {
        let mut by_zone: BTreeMap<Option<&str>, (Vec<Endpoint>, Vec<u32>)> = BTreeMap::new();
        by_zone.insert(Some(local), Default::default());
        for (i, ep) in endpoints.iter().enumerate() {
            let (eps, idx) = by_zone.entry(ep.zone.as_deref()).or_default();
            eps.push(ep.clone());
            idx.push(i as u32);
        }
        let (eps, idx) = by_zone.remove(&Some(&**local)).unwrap_or_default();
        let mut groups = vec![(Some(local.clone()), Group::new(spec, eps, idx))];
        for (zone, (eps, idx)) in by_zone {
            groups.push((zone.map(Into::into), Group::new(spec, eps, idx)));
        }
        let cumulative = groups.iter().map(|_| AtomicU32::new(SHARE_SCALE)).collect();
        let split = ZoneSplit {
            mode: z.mode,
            local: local.clone(),
            min_share: z.min_share,
            groups: groups.into_boxed_slice(),
            cumulative,
        };
        split.refresh();
        split
    }

    /// Recomputes the shares from the endpoints' availability now.
    pub fn refresh(&self) {
        let caps: Vec<Capacity> = self
            .groups
            .iter()
            .map(|(_, g)| capacity(&g.endpoints))
            .collect();
        let shares = zone::shares(caps[0], &caps[1..], self.min_share);
        let mut sum = 0.0;
        for (c, s) in self.cumulative.iter().zip(&shares) {
            sum += s;
            let v = (sum * f64::from(SHARE_SCALE))
                .round()
                .min(f64::from(SHARE_SCALE));
            c.store(v as u32, Ordering::Relaxed);
        }
    }

    /// The shares now, one per group (for the admin API and tests).
    pub fn shares(&self) -> Vec<f64> {
        let mut prev = 0u32;
        self.cumulative
            .iter()
            .map(|c| {
                let v = c.load(Ordering::Relaxed).max(prev);
                let s = f64::from(v - prev) / f64::from(SHARE_SCALE);
                prev = v;
                s
            })
            .collect()
    }

    /// The group a request starts in: a draw (from the request's hash key when it has one, so
    /// a user stays in one zone) against the cumulative shares.
    fn choose(&self, ctx: &PickContext) -> usize {
        let draw = match ctx.key {
            Some(k) => mix64(k ^ 0x7a6f_6e65),
            None => ctx.rng.next_u64(),
        };
        let x = (draw >> 40) as u32;
        self.cumulative
            .iter()
            .position(|c| x < c.load(Ordering::Relaxed))
            .unwrap_or(self.groups.len() - 1)
    }
}

fn capacity(endpoints: &[Endpoint]) -> Capacity {
    let mut c = Capacity::default();
    for ep in endpoints.iter().filter(|e| e.weight > 0) {
        c.expected += u64::from(ep.weight);
        if ep.available() {
            c.available += u64::from(ep.weight);
        }
    }
    c
}

/// One subset an upstream may be asked for: its balancer, and its zone split when zones are on.
pub struct Target {
    /// The selector, as text (`version=v2`).
    pub what: Box<str>,
    pub group: Group,
    pub zones: Option<ZoneSplit>,
}

impl Target {
    fn new(spec: &Spec, all: &[Endpoint], selector: &Selector, z: &ZoneSettings) -> Target {
        let (eps, idx): (Vec<Endpoint>, Vec<u32>) = all
            .iter()
            .enumerate()
            .filter(|(_, e)| selector.matches(e))
            .map(|(i, e)| (e.clone(), i as u32))
            .unzip();
        let zones = z.active().map(|local| ZoneSplit::new(spec, &eps, local, z));
        Target {
            what: selector.describe().into(),
            group: Group::new(spec, eps, idx),
            zones,
        }
    }

    #[inline]
    fn picks<'a>(&'a self, ctx: PickContext<'a>) -> Walk<'a> {
        let all = (&*self.group.endpoints, self.group.balancer.as_ref());
        Walk::over(all, &self.zones, ctx)
    }

    /// The local zone, when the target never leaves it (`strict`).
    fn strict_zone(&self) -> Option<&str> {
        self.zones
            .as_ref()
            .filter(|z| z.mode == ZoneMode::Strict)
            .map(|z| &*z.local)
    }
}

/// The endpoints to try for one request, in order, each at most once: the chosen zone group's
/// candidates first (when zones are on), then (unless `strict`) the rest of the target's.
///
/// Two shapes, so that an upstream without subsets or zones (most of them) walks exactly what
/// the bare pick walks: `Plain` is one [`Candidates`] over the upstream's own list; `Walk`
/// carries the first candidate found while looking for one (a subset may have none) and the
/// zone state. Both are built where the caller holds them and walked in place.
pub enum Picks<'a> {
    Plain(Candidates<'a>),
    Walk(Walk<'a>),
}

/// A subset's or a zone group's candidates (see [`Picks`]).
pub struct Walk<'a> {
    /// The list being walked: the chosen zone group's, or the whole target's.
    now: Candidates<'a>,
    /// `prefer`: the target's whole list, walked after the zone group; set up only if the
    /// group runs out, which the first try almost never does.
    then: Option<Rest<'a>>,
    pending: Option<&'a Endpoint>,
    /// The request starts outside the local zone.
    spilled: bool,
    strict: Option<&'a str>,
}

/// The target's whole list, and where each endpoint of the zone group sits in it.
struct Rest<'a> {
    endpoints: &'a [Endpoint],
    balancer: &'a dyn Balancer,
    parent: &'a [u32],
}

impl<'a> Picks<'a> {
    /// The candidates of one list, no zones: what the bare pick walks.
    #[inline]
    fn plain(
        (endpoints, balancer): (&'a [Endpoint], &'a dyn Balancer),
        ctx: PickContext<'a>,
    ) -> Self {
        Picks::Plain(Candidates::new(balancer, endpoints, ctx))
    }
}

impl<'a> Walk<'a> {
    #[inline]
    fn over(
        (endpoints, balancer): (&'a [Endpoint], &'a dyn Balancer),
        zones: &'a Option<ZoneSplit>,
        ctx: PickContext<'a>,
    ) -> Walk<'a> {
        match zones {
            None => Walk {
                now: Candidates::new(balancer, endpoints, ctx),
                then: None,
                pending: None,
                spilled: false,
                strict: None,
            },
            Some(z) => {
                let strict = z.mode == ZoneMode::Strict;
                let k = if strict { 0 } else { z.choose(&ctx) };
                let g = &z.groups[k].1;
                Walk {
                    now: Candidates::new(g.balancer.as_ref(), &g.endpoints, ctx),
                    then: (!strict).then_some(Rest {
                        endpoints,
                        balancer,
                        parent: &g.parent,
                    }),
                    pending: None,
                    spilled: k != 0,
                    strict: strict.then_some(&*z.local),
                }
            }
        }
    }

    /// The first candidate, kept for `next`: `None` when there is none.
    #[inline]
    fn peek(&mut self) -> Option<&'a Endpoint> {
        if self.pending.is_none() {
            self.pending = self.next();
        }
        self.pending
    }

    /// The whole target's candidates after the zone group, less what the group yielded.
    #[cold]
    fn rest(&mut self) -> Option<Candidates<'a>> {
        let then = self.then.take()?;
        let mut rest = Candidates::new(then.balancer, then.endpoints, self.now.context());
        for i in self.now.tried().iter() {
            if let Some(&p) = then.parent.get(i) {
                rest.mark_tried(p as usize);
            }
        }
        Some(rest)
    }
}

impl<'a> Iterator for Walk<'a> {
    type Item = &'a Endpoint;

    #[inline]
    fn next(&mut self) -> Option<&'a Endpoint> {
        if let Some(ep) = self.pending.take() {
            return Some(ep);
        }
        loop {
            if let Some(ep) = self.now.next() {
                return Some(ep);
            }
            // The zone group ran out: go on over the whole target, skipping what it yielded.
            self.now = self.rest()?;
        }
    }
}

impl<'a> Iterator for Picks<'a> {
    type Item = &'a Endpoint;

    #[inline]
    fn next(&mut self) -> Option<&'a Endpoint> {
        match self {
            Picks::Plain(c) => c.next(),
            Picks::Walk(w) => w.next(),
        }
    }
}

/// Why a request found no endpoint in its subset or zone; the text names it (`version=v2`,
/// `zone a`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

/// The targets of one upstream.
pub struct Subsets {
    pub settings: SubsetSettings,
    /// The zone split of every endpoint (zones on, no subset).
    all_zones: Option<ZoneSplit>,
    /// The upstream's subset (when it has one).
    primary: Option<Target>,
    /// `fallback = { … }`.
    fallback: Option<Target>,
    /// Per header-rule key: a target per value the endpoints carry.
    by_header: Box<[(Box<str>, ByValue)]>,
    /// No subset, no zones and no header rule: every request walks the upstream's own list.
    plain: bool,
}

/// A header rule's targets, by the value of its key, sorted by value: a binary search of a few
/// short strings is cheaper per request than hashing the value.
type ByValue = Box<[(Box<str>, Target)]>;

impl Subsets {
    /// The targets over `all` (the upstream's endpoints) for `settings`, with a target per
    /// value of each key in `header_keys` (the keys routes to this upstream pick by).
    pub fn build(
        spec: &Spec,
        all: &[Endpoint],
        settings: &SubsetSettings,
        header_keys: &[&str],
    ) -> Subsets {
        let z = &settings.zone;
        let sel = &settings.selector;
        let primary = (!sel.is_empty()).then(|| Target::new(spec, all, sel, z));
        let all_zones = z.active().map(|local| ZoneSplit::new(spec, all, local, z));
        let fallback = match &settings.fallback {
            Fallback::Subset(s) => Some(Target::new(spec, all, s, z)),
            _ => None,
        };
        let mut by_header = Vec::new();
        let keys: BTreeSet<&str> = header_keys.iter().copied().collect();
        for key in keys {
            let values: BTreeSet<&str> = all
                .iter()
                .filter_map(|e| e.metadata.get(key).map(String::as_str))
                .collect();
            // In the set's order: sorted, as the lookup's binary search needs.
            let targets = values
                .into_iter()
                .map(|v| (v.into(), Target::new(spec, all, &sel.with(key, v), z)))
                .collect();
            by_header.push((key.into(), targets));
        }
        Subsets {
            settings: settings.clone(),
            plain: primary.is_none() && all_zones.is_none() && by_header.is_empty(),
            all_zones,
            primary,
            fallback,
            by_header: by_header.into_boxed_slice(),
        }
    }

    /// Whether `ep` is in the upstream's subset (every endpoint is when it has none).
    pub fn contains(&self, ep: &Endpoint) -> bool {
        self.settings.selector.matches(ep)
    }

    /// The zone shares of the upstream's default target: `(zone, share)` per group.
    pub fn zone_shares(&self) -> Vec<(Option<Arc<str>>, f64)> {
        let split = match &self.primary {
            Some(t) => t.zones.as_ref(),
            None => self.all_zones.as_ref(),
        };
        split
            .map(|z| {
                z.groups
                    .iter()
                    .map(|(n, _)| n.clone())
                    .zip(z.shares())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Recomputes every zone split's shares (see the module doc).
    pub fn refresh(&self) {
        let targets = self.primary.iter().chain(&self.fallback).chain(
            self.by_header
                .iter()
                .flat_map(|(_, m)| m.iter().map(|(_, t)| t)),
        );
        for z in targets
            .filter_map(|t| t.zones.as_ref())
            .chain(&self.all_zones)
        {
            z.refresh();
        }
    }

    /// The candidates for one request. `header` is `(key, value)` when the request's route
    /// picks a subset by a header the request has. Falls back (counted on
    /// `edge_agent_subset_fallback_total`) when the subset has no candidate or the value is
    /// unknown; counts a start outside the local zone on `edge_agent_zone_spill_total`.
    ///
    /// Inlined down to one test: an upstream without subsets, zones or header rules (most of
    /// them) builds the bare pick's iterator where the caller holds it and pays what the bare
    /// pick pays; the rest is in [`Subsets::picks_by_subset`], whose arguments are passed as
    /// separate pointers so the caller does not spill them before the test (`BENCHMARKS.md`,
    /// #14).
    ///
    /// `ctx` makes the request's context, called once: made where the iterator is built, it
    /// is written there, not made in the caller and copied in.
    #[inline]
    pub fn picks<'a>(
        &'a self,
        all: (&'a [Endpoint], &'a dyn Balancer),
        header: Option<(&str, &str)>,
        ctx: impl FnOnce() -> PickContext<'a>,
        metrics: &UpstreamMetrics,
    ) -> Result<Picks<'a>, Unavailable> {
        // `plain` means no route to this upstream picks by a header, so `header` is `None`
        // here (the table builds both from the same routes).
        if self.plain {
            return Ok(Picks::Plain(Candidates::new(all.1, all.0, ctx())));
        }
        let (key, value) = header.unzip();
        self.picks_by_subset(all.0, all.1, key, value, ctx(), metrics)
    }

    /// [`Subsets::picks`] for an upstream with a subset, zones or a header rule. Its
    /// arguments are single pointers, not the `all` and `header` pairs: with the pairs, LLVM
    /// copied both (four words) to the stack before the `plain` test, and the plain pick paid
    /// for that. Inlined, measured a little faster than out of line for every case.
    #[inline]
    fn picks_by_subset<'a>(
        &'a self,
        endpoints: &'a [Endpoint],
        balancer: &'a dyn Balancer,
        key: Option<&str>,
        value: Option<&str>,
        ctx: PickContext<'a>,
        metrics: &UpstreamMetrics,
    ) -> Result<Picks<'a>, Unavailable> {
        let (all, header) = ((endpoints, balancer), key.zip(value));
        let target = match header {
            None => match &self.primary {
                Some(t) => Some(t),
                None => return self.all(all, ctx, metrics),
            },
            Some((key, value)) => self.by_value(key, value),
        };
        if let Some(t) = target {
            let mut p = t.picks(ctx);
            if p.peek().is_some() {
                if p.spilled {
                    metrics.zone_spill();
                }
                return Ok(Picks::Walk(p));
            }
        }
        self.fall_back(all, header, target, ctx, metrics)
    }

    /// The target of a header rule's `value` for `key`: `None` when no endpoint carries it.
    #[inline]
    fn by_value(&self, key: &str, value: &str) -> Option<&Target> {
        let (_, m) = self.by_header.iter().find(|(k, _)| &**k == key)?;
        let i = m.binary_search_by(|(v, _)| (**v).cmp(value)).ok()?;
        Some(&m[i].1)
    }

    /// The asked-for subset has no candidate (`target` is its target, `None` for a header
    /// value no endpoint carries): `fallback` decides.
    #[cold]
    #[inline(never)]
    fn fall_back<'a>(
        &'a self,
        all: (&'a [Endpoint], &'a dyn Balancer),
        header: Option<(&str, &str)>,
        target: Option<&'a Target>,
        ctx: PickContext<'a>,
        metrics: &UpstreamMetrics,
    ) -> Result<Picks<'a>, Unavailable> {
        let missing = match (target, header) {
            (Some(t), _) => {
                if let Some(zone) = t.strict_zone() {
                    if self.settings.fallback == Fallback::None {
                        return Err(Unavailable(format!("subset {} in zone {zone}", t.what)));
                    }
                }
                t.what.to_string()
            }
            (None, Some((key, value))) => self.settings.selector.with(key, value).describe(),
            // Not reached (`picks` serves this case itself), but harmless: every endpoint.
            (None, None) => return self.all(all, ctx, metrics),
        };
        metrics.subset_fallback();
        match &self.settings.fallback {
            Fallback::None => Err(Unavailable(format!("subset {missing}"))),
            Fallback::Any => self.all(all, ctx, metrics),
            Fallback::Subset(_) => {
                let t = self.fallback.as_ref().expect("built with the settings");
                let mut p = t.picks(ctx);
                match (p.peek(), p.strict) {
                    (None, Some(zone)) => Err(Unavailable(format!(
                        "subset {missing} (or its fallback {}) in zone {zone}",
                        t.what
                    ))),
                    _ => {
                        if p.spilled {
                            metrics.zone_spill();
                        }
                        Ok(Picks::Walk(p))
                    }
                }
            }
        }
    }

    #[inline]
    fn all<'a>(
        &'a self,
        all: (&'a [Endpoint], &'a dyn Balancer),
        ctx: PickContext<'a>,
        metrics: &UpstreamMetrics,
    ) -> Result<Picks<'a>, Unavailable> {
        if self.all_zones.is_none() {
            return Ok(Picks::plain(all, ctx));
        }
        let mut p = Walk::over(all, &self.all_zones, ctx);
        if let Some(zone) = p.strict {
            if p.peek().is_none() {
                return Err(Unavailable(format!("zone {zone}")));
            }
        }
        if p.spilled {
            metrics.zone_spill();
        }
        Ok(Picks::Walk(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::testing;
    use discovery::Instance;

    fn eps(spec: &[(&str, &[(&str, &str)])]) -> Vec<Endpoint> {
        spec.iter()
            .enumerate()
            .map(|(i, (zone, meta))| {
                let mut inst = Instance::new("127.0.0.1", 20_000 + i as u16);
                if !zone.is_empty() {
                    inst.zone = Some(zone.to_string());
                }
                for (k, v) in meta.iter() {
                    inst.metadata.insert(k.to_string(), v.to_string());
                }
                Endpoint::from_instance(&inst, "file", Default::default()).unwrap()
            })
            .collect()
    }

    fn sel(pairs: &[(&str, &str)]) -> Selector {
        Selector(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn ports<'a>(p: impl Iterator<Item = &'a Endpoint>) -> Vec<u16> {
        let mut v: Vec<u16> = p.map(|e| e.authority.port_u16().unwrap()).collect();
        v.sort();
        v
    }

    #[test]
    fn the_matcher_needs_every_key_with_the_same_string() {
        let e = eps(&[("", &[("version", "v2"), ("tag:canary", "true")])]);
        assert!(sel(&[]).matches(&e[0]), "an empty subset is everything");
        assert!(sel(&[("version", "v2")]).matches(&e[0]));
        assert!(sel(&[("version", "v2"), ("tag:canary", "true")]).matches(&e[0]));
        assert!(!sel(&[("version", "v1")]).matches(&e[0]));
        assert!(
            !sel(&[("version", "v2"), ("x", "")]).matches(&e[0]),
            "absent ≠ empty"
        );
        assert!(!sel(&[("Version", "v2")]).matches(&e[0]), "keys are exact");
        assert_eq!(
            sel(&[("version", "v2"), ("a", "b")]).describe(),
            "a=b,version=v2"
        );
    }

    fn settings(selector: Selector, fallback: Fallback) -> SubsetSettings {
        SubsetSettings {
            selector,
            fallback,
            zone: ZoneSettings::default(),
        }
    }

    #[test]
    fn a_subset_gets_only_its_endpoints_and_fallback_decides_when_it_is_empty() {
        let spec = Spec::round_robin();
        let mut all = eps(&[
            ("", &[("version", "v1")]),
            ("", &[("version", "v2")]),
            ("", &[("version", "v2")]),
        ]);
        let b = spec.build(&all);
        let m = UpstreamMetrics::new("subset-test");
        let s = Subsets::build(
            &spec,
            &all,
            &settings(sel(&[("version", "v2")]), Fallback::None),
            &[],
        );
        let got = ports(s.picks((&all, b.as_ref()), None, testing::ctx, &m).unwrap());
        assert_eq!(got, vec![20_001, 20_002]);
        // One endpoint in the subset, one state: the target holds the upstream's own.
        assert!(Arc::ptr_eq(
            &s.primary.as_ref().unwrap().group.endpoints[0].state,
            &all[1].state
        ));

        for e in &mut all[1..] {
            e.healthy = false;
        }
        let b = spec.build(&all);
        for (fallback, want) in [
            (Fallback::Any, Ok(vec![20_000])),
            (
                Fallback::Subset(sel(&[("version", "v1")])),
                Ok(vec![20_000]),
            ),
            (Fallback::None, Err(Unavailable("subset version=v2".into()))),
        ] {
            let s = Subsets::build(
                &spec,
                &all,
                &settings(sel(&[("version", "v2")]), fallback.clone()),
                &[],
            );
            let got = s
                .picks((&all, b.as_ref()), None, testing::ctx, &m)
                .map(ports);
            assert_eq!(got, want, "{fallback:?}");
        }
    }

    #[test]
    fn a_header_value_picks_its_subset_and_an_unknown_one_follows_fallback() {
        let spec = Spec::round_robin();
        let all = eps(&[
            ("", &[("version", "v1")]),
            ("", &[("version", "v2")]),
            ("", &[]),
        ]);
        let b = spec.build(&all);
        let m = UpstreamMetrics::new("subset-test");
        let s = Subsets::build(
            &spec,
            &all,
            &settings(sel(&[]), Fallback::None),
            &["version"],
        );
        let pick = |h| s.picks((&all, b.as_ref()), h, testing::ctx, &m).map(ports);
        assert_eq!(pick(Some(("version", "v2"))), Ok(vec![20_001]));
        assert_eq!(pick(Some(("version", "v1"))), Ok(vec![20_000]));
        assert_eq!(
            pick(None),
            Ok(vec![20_000, 20_001, 20_002]),
            "no header: the default"
        );
        assert_eq!(
            pick(Some(("version", "v9"))),
            Err(Unavailable("subset version=v9".into()))
        );
        let s = Subsets::build(
            &spec,
            &all,
            &settings(sel(&[]), Fallback::Any),
            &["version"],
        );
        let got = s
            .picks(
                (&all, b.as_ref()),
                Some(("version", "v9")),
                testing::ctx,
                &m,
            )
            .map(ports);
        assert_eq!(got, Ok(vec![20_000, 20_001, 20_002]));
    }

    fn zoned(mode: ZoneMode) -> SubsetSettings {
        SubsetSettings {
            zone: ZoneSettings {
                mode,
                local: Some("a".into()),
                min_share: zone::DEFAULT_ZONE_MIN_SHARE,
            },
            ..Default::default()
        }
    }

    fn nine() -> Vec<Endpoint> {
        eps(&[
            ("a", &[]),
            ("a", &[]),
            ("a", &[]),
            ("b", &[]),
            ("b", &[]),
            ("b", &[]),
            ("c", &[]),
            ("c", &[]),
            ("c", &[]),
        ])
    }

    /// Zones through the groups: all local while the local zone is whole; 2 of 3 local ejected
    /// → after a refresh the first picks follow 3/7, 2/7, 2/7; every pick list still reaches
    /// every usable endpoint once (prefer), or stays local (strict).
    #[test]
    fn zone_groups_start_local_and_spill_by_the_shares() {
        let spec = Spec::round_robin();
        let all = nine();
        let b = spec.build(&all);
        let m = UpstreamMetrics::new("zone-test");
        let s = Subsets::build(&spec, &all, &zoned(ZoneMode::Prefer), &[]);
        let firsts = |n: usize| {
            let mut by = [0usize; 3];
            for _ in 0..n {
                let mut p = s.picks((&all, b.as_ref()), None, testing::ctx, &m).unwrap();
                let e = p.next().unwrap();
                by[(e.authority.port_u16().unwrap() - 20_000) as usize / 3] += 1;
            }
            by
        };
        assert_eq!(firsts(1_000), [1_000, 0, 0]);
        let p = s.picks((&all, b.as_ref()), None, testing::ctx, &m).unwrap();
        assert_eq!(
            ports(p).len(),
            9,
            "prefer goes on to every zone, each endpoint once"
        );
        // Eject two local endpoints (by the agent's health), then sweep.
        for e in &all[..2] {
            for _ in 0..5 {
                crate::health::passive::record(
                    &e.state.health,
                    &Default::default(),
                    crate::health::Outcome::Failure,
                    crate::clock::now_ms(),
                    || (0, 9),
                );
            }
            assert!(e.state.health.ejected());
        }
        s.refresh();
        let shares: Vec<f64> = s.zone_shares().into_iter().map(|(_, x)| x).collect();
        for (got, want) in shares.iter().zip([3.0 / 7.0, 2.0 / 7.0, 2.0 / 7.0]) {
            assert!((got - want).abs() < 1e-6, "{shares:?}");
        }
        let by = firsts(14_000);
        for (got, want) in by.iter().zip([6_000.0, 4_000.0, 4_000.0]) {
            assert!((*got as f64 - want).abs() < 400.0, "{by:?}");
        }
        // Strict: only the local endpoint left; none → the error names the zone.
        let s = Subsets::build(&spec, &all, &zoned(ZoneMode::Strict), &[]);
        let p = s.picks((&all, b.as_ref()), None, testing::ctx, &m).unwrap();
        assert_eq!(ports(p), vec![20_002]);
        let mut gone = all.clone();
        for e in &mut gone[..3] {
            e.healthy = false;
        }
        let b = spec.build(&gone);
        let s = Subsets::build(&spec, &gone, &zoned(ZoneMode::Strict), &[]);
        assert_eq!(
            s.picks((&gone, b.as_ref()), None, testing::ctx, &m).err(),
            Some(Unavailable("zone a".into()))
        );
    }
}
