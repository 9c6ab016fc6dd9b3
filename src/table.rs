//! Building the routing table: from the configuration a reload may change ([`Dynamic`]) and
//! the instance cache's last good sets, one [`Upstream`] per configured upstream (and, with no
//! routes configured, per discovered service), published whole through [`State::publish`].
//!
//! A rebuild touches only the upstreams that use a changed service, and hands every endpoint
//! that stayed its old state ([`carry_over`]). What an upstream keeps across tables (its
//! [`UpstreamRuntime`]: metrics, retry budget, panic flag) is replaced only when its settings
//! change, and then carries the panic flag over, so the sweeper still sees panic mode end.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use discovery::Instance;

use crate::clock;
use crate::endpoint::{count_states, Endpoint, EndpointState};
use crate::guard::GuardConfig;
use crate::health::Health;
use crate::metrics as m;
use crate::route::{Route, RouteConfig, RoutingTable};
use crate::state::State;
use crate::subset::Subsets;
use crate::upstream::{Upstream, UpstreamConfig, UpstreamRuntime, UpstreamSettings};

/// Settings a reload can change without a restart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dynamic {
    /// The settings of zero-config upstreams (the default balancer and nothing else set).
    pub default_settings: UpstreamSettings,
    pub domain_suffix: Option<String>,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    pub guard: GuardConfig,
}

/// The last good instances: service → source index → set (sorted).
pub type Services = HashMap<String, BTreeMap<usize, Vec<Instance>>>;

/// The services an event changed.
pub type Dirty = HashSet<String>;

/// Builds and publishes routing tables; keeps each upstream's runtime.
pub struct TableBuilder {
    state: Arc<State>,
    pub dynamic: Dynamic,
    runtimes: HashMap<String, Arc<UpstreamRuntime>>,
}

impl TableBuilder {
    pub fn new(state: Arc<State>, dynamic: Dynamic) -> Self {
        TableBuilder {
            state,
            dynamic,
            runtimes: HashMap::new(),
        }
    }

    /// Rebuilds the upstreams using `dirty` services (all upstreams when `None`) from
    /// `services` and publishes a new table.
    pub fn rebuild(&mut self, services: &Services, dirty: Option<&Dirty>) {
        let old = self.state.table.load_full();
        let mut upstreams = match dirty {
            Some(_) => old.upstreams.clone(),
            None => HashMap::with_capacity(old.upstreams.len()),
        };
        let wants = |svc: &Option<String>| match (dirty, svc) {
            (None, _) => true,
            (Some(d), Some(s)) => d.contains(s),
            (Some(_), None) => false,
        };
        let configured = std::mem::take(&mut self.dynamic.upstreams);
        let configured_ids: HashSet<&str> = configured.iter().map(|u| u.id.as_str()).collect();
        for u in &configured {
            if wants(&u.service) {
                let up = self.build(
                    services,
                    &old,
                    &upstreams,
                    &u.id,
                    u.service.as_deref(),
                    u.source.as_deref(),
                    &u.nodes,
                    &u.settings,
                );
                upstreams.insert(up.id.clone(), Arc::new(up));
            }
        }
        if self.dynamic.routes.is_empty() {
            let settings = self.dynamic.default_settings.clone();
            let names: Vec<String> = match dirty {
                Some(d) => d.iter().cloned().collect(),
                None => services.keys().cloned().collect(),
            };
            for svc in names {
                if configured_ids.contains(svc.as_str()) {
                    continue;
                }
                if services.contains_key(&svc) {
                    let up = self.build(
                        services,
                        &old,
                        &upstreams,
                        &svc,
                        Some(&svc),
                        None,
                        &[],
                        &settings,
                    );
                    upstreams.insert(up.id.clone(), Arc::new(up));
                } else if upstreams.remove(svc.as_str()).is_some() {
                    self.forget(&svc);
                    tracing::info!(service = %svc, "service gone from every source");
                }
            }
        }
        drop(configured_ids);
        self.dynamic.upstreams = configured;
        if dirty.is_none() {
            let gone: Vec<String> = self
                .runtimes
                .keys()
                .filter(|k| !upstreams.contains_key(k.as_str()))
                .cloned()
                .collect();
            for id in gone {
                self.forget(&id);
            }
        }
        let table = Arc::new(RoutingTable {
            upstreams,
            routes: self.dynamic.routes.iter().map(Route::from).collect(),
            domain_suffix: self.dynamic.domain_suffix.as_deref().map(Into::into),
        });
        self.state.publish(table.clone());
        drain_changed(&old, &table);
        // When each change took effect (zero-config upstreams are named by their service; the
        // fleet benchmark, bench/fleet.sh, reads these timestamps).
        for svc in dirty.into_iter().flatten() {
            let endpoints = table
                .upstreams
                .get(svc.as_str())
                .map_or(0, |u| u.endpoints.len());
            tracing::debug!(service = %svc, endpoints, "upstream applied");
        }
    }

    /// An upstream left the table: its runtime goes, and its gauges read zero (a panic flag
    /// left at 1 would say so for good).
    fn forget(&mut self, id: &str) {
        if let Some(rt) = self.runtimes.remove(id) {
            if rt.panic.load(Ordering::Relaxed) {
                tracing::info!(upstream = %id, "panic mode over: the upstream is gone");
            }
        }
        for state in ["healthy", "unhealthy"] {
            metrics::gauge!(m::ENDPOINTS, "upstream" => id.to_string(), "state" => state).set(0.0);
        }
        metrics::gauge!(m::UPSTREAM_PANIC, "upstream" => id.to_string()).set(0.0);
    }

    /// The runtime for upstream `id` with `settings`: the current one while its settings are
    /// the same, else a new one that carries the panic flag over (the sweeper then sees, and
    /// logs, panic mode ending under the new settings).
    fn runtime(&mut self, id: &str, settings: &UpstreamSettings) -> Arc<UpstreamRuntime> {
        match self.runtimes.get(id) {
            Some(rt) if rt.settings == *settings => rt.clone(),
            old => {
                let rt = UpstreamRuntime::new(id, settings.clone());
                if let Some(old) = old {
                    rt.panic
                        .store(old.panic.load(Ordering::Relaxed), Ordering::Relaxed);
                }
                let rt = Arc::new(rt);
                self.runtimes.insert(id.to_string(), rt.clone());
                rt
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        services: &Services,
        old: &RoutingTable,
        built: &HashMap<Arc<str>, Arc<Upstream>>,
        id: &str,
        service: Option<&str>,
        source: Option<&str>,
        nodes: &[(SocketAddr, u32)],
        settings: &UpstreamSettings,
    ) -> Upstream {
        let runtime = self.runtime(id, settings);
        // Borrowed, not cloned: a change in a 10,000-instance service rebuilds it all (#8).
        let statics: Vec<Instance> = match service {
            Some(_) => Vec::new(),
            None => nodes
                .iter()
                .map(|(addr, weight)| {
                    let mut inst = Instance::new(addr.ip().to_string(), addr.port());
                    inst.weight = *weight;
                    inst
                })
                .collect(),
        };
        let mut found: Vec<(&'static str, &Instance)> =
            statics.iter().map(|i| ("static", i)).collect();
        if let Some(svc) = service {
            for (idx, set) in services.get(svc).into_iter().flatten() {
                let kind = self.state.sources[*idx].kind;
                if source.is_some_and(|s| s != kind) {
                    continue;
                }
                found.extend(set.iter().map(|i| (kind, i)));
            }
        }
        let previous = old.upstreams.get(id);
        // An endpoint another upstream of the same service has is the same endpoint: one state
        // (health, EWMA, in-flight, pool) however many upstreams and subsets it is in.
        let siblings: Vec<&Upstream> = match service {
            Some(svc) => built
                .values()
                .chain(old.upstreams.values())
                .filter(|u| &*u.id != id && u.service.as_deref() == Some(svc))
                .map(|u| &**u)
                .collect(),
            None => Vec::new(),
        };
        let endpoints = carry_over(
            previous.map(|u| &u.endpoints[..]),
            &found,
            settings,
            &siblings,
        );
        let (available, unavailable) = count_states(&endpoints);
        metrics::gauge!(m::ENDPOINTS, "upstream" => id.to_string(), "state" => "healthy")
            .set(available as f64);
        metrics::gauge!(m::ENDPOINTS, "upstream" => id.to_string(), "state" => "unhealthy")
            .set(unavailable as f64);
        let updated_at = match previous {
            Some(p) if same_endpoints(&p.endpoints, &endpoints) => p.updated_at,
            _ => SystemTime::now(),
        };
        let balancer = settings.balancer.build(&endpoints);
        // The keys routes to this upstream pick subsets by (`subset_from_header`).
        let header_keys: Vec<&str> = self
            .dynamic
            .routes
            .iter()
            .filter(|r| r.targets().any(|t| t == id))
            .filter_map(|r| r.subset_from_header.as_ref().map(|h| h.key.as_str()))
            .collect();
        let subsets = Subsets::build(
            &settings.balancer,
            &endpoints,
            &settings.subset,
            &header_keys,
        );
        Upstream {
            id: id.into(),
            service: service.map(Into::into),
            runtime,
            endpoints: endpoints.into_boxed_slice(),
            balancer,
            subsets,
            updated_at,
        }
    }
}

/// Whether two endpoint lists are the same endpoints (same state) with the same attributes.
fn same_endpoints(a: &[Endpoint], b: &[Endpoint]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            Arc::ptr_eq(&x.state, &y.state)
                && x.weight == y.weight
                && x.healthy == y.healthy
                && x.zone == y.zone
                && x.metadata == y.metadata
                && x.source == y.source
        })
}

/// The endpoints for `found`, carrying over from the upstream's previous endpoints (`old`) the
/// state of every endpoint still there (health, EWMA, in-flight, pooled connections), keyed by
/// (instance id, address). Newcomers get fresh state; after the first set they slow-start. An
/// endpoint reported twice (two sources) is kept once, the first. An endpoint new to this
/// upstream that another upstream of the same service (a `sibling`: another subset of it, say)
/// already has takes that one's state, so it stays one endpoint (#14).
///
/// The common update (a weight, health or zone change, same endpoints in the same order) takes
/// a path without hashing or allocation for unchanged endpoints: they are the old `Endpoint`s,
/// cloned (reference counts). A one-endpoint change in a 10,000-endpoint service spent 25 ms in
/// allocating keys and endpoints before (#8).
fn carry_over(
    old: Option<&[Endpoint]>,
    found: &[(&'static str, &Instance)],
    settings: &UpstreamSettings,
    siblings: &[&Upstream],
) -> Vec<Endpoint> {
    let old = old.unwrap_or_default();
    // Endpoints in an upstream's first set start at full weight; later joiners slow-start.
    let joined = if old.is_empty() { 0 } else { clock::now_ms() };
    let initially_unhealthy = settings
        .active
        .as_ref()
        .is_some_and(|a| a.initially_unhealthy);
    let fresh = || Arc::new(EndpointState::new(Health::new(initially_unhealthy, joined)));
    let in_order =
        old.len() == found.len() && old.iter().zip(found).all(|(ep, (_, inst))| ep.is(inst));
    if in_order {
        return old
            .iter()
            .zip(found)
            .map(|(ep, (kind, inst))| {
                // Identity was checked just above.
                if ep.has_attributes_of(inst, kind) {
                    ep.clone()
                } else {
                    ep.with_attributes_of(inst, kind)
                }
            })
            .collect();
    }
    let mut by_key: HashMap<(&str, &str), &Endpoint> = HashMap::new();
    // Siblings first, so this upstream's own previous endpoints win.
    for ep in siblings.iter().flat_map(|u| u.endpoints.iter()).chain(old) {
        by_key.insert((&*ep.id, ep.authority.as_str()), ep);
    }
    let mut seen: HashSet<(&str, String)> = HashSet::with_capacity(found.len());
    let mut endpoints = Vec::with_capacity(found.len());
    for (kind, inst) in found {
        let authority = inst.authority();
        let state = match by_key.get(&(inst.id.as_str(), authority.as_str())) {
            Some(ep) => ep.state.clone(),
            None => fresh(),
        };
        if !seen.insert((inst.id.as_str(), authority)) {
            continue; // the same endpoint from two sources: keep the first
        }
        match Endpoint::from_instance(inst, kind, state) {
            Ok(ep) => endpoints.push(ep),
            // Adapters refuse these where instances enter; this is the last line.
            Err(e) => tracing::warn!(source = *kind, error = %e, "instance skipped"),
        }
    }
    endpoints
}

/// Starts the drain of every endpoint the new table no longer sends requests to, because its
/// registry removed it or says it is unhealthy, and ends it for those that serve again
/// (`pool::Drain`). Only upstreams the rebuild replaced are looked at. An endpoint another
/// upstream still routes to (one state in two upstreams of a service) is not drained.
fn drain_changed(old: &RoutingTable, new: &RoutingTable) {
    let changed = |a: &HashMap<Arc<str>, Arc<Upstream>>, b: &HashMap<Arc<str>, Arc<Upstream>>| {
        a.iter()
            .filter(|(id, u)| b.get(*id).is_none_or(|v| !Arc::ptr_eq(u, v)))
            .map(|(_, u)| u.clone())
            .collect::<Vec<_>>()
    };
    let (gone, came) = (
        changed(&old.upstreams, &new.upstreams),
        changed(&new.upstreams, &old.upstreams),
    );
    if gone.is_empty() && came.is_empty() {
        return;
    }
    let key = |e: &Endpoint| Arc::as_ptr(&e.state);
    // Endpoints the replaced upstreams route to now (registry-healthy), and those they keep
    // but the registry says are unhealthy or draining.
    let mut serving: HashSet<*const EndpointState> = HashSet::new();
    let mut unhealthy: Vec<(&Endpoint, std::time::Duration)> = Vec::new();
    for u in &came {
        for e in u.endpoints.iter() {
            if e.healthy {
                serving.insert(key(e));
            } else {
                unhealthy.push((e, u.settings().drain_timeout));
            }
        }
    }
    for u in &came {
        for e in u.endpoints.iter().filter(|e| e.healthy) {
            e.state.drain.end();
        }
    }
    for (e, timeout) in unhealthy {
        if !serving.contains(&key(e)) {
            e.state.begin_drain(timeout);
        }
    }
    // Still routed to: by the replacing upstreams, or by an upstream of the same service the
    // rebuild kept as it was (one state in two upstreams of a service).
    let services: HashSet<&str> = gone.iter().filter_map(|u| u.service.as_deref()).collect();
    let kept: HashSet<*const EndpointState> = came
        .iter()
        .chain(
            new.upstreams
                .values()
                .filter(|u| u.service.as_deref().is_some_and(|s| services.contains(s))),
        )
        .flat_map(|u| u.endpoints.iter().map(key))
        .collect();
    for u in &gone {
        for e in u.endpoints.iter() {
            if !kept.contains(&key(e)) {
                tracing::debug!(upstream = %u.id, endpoint = %e.authority, "endpoint removed: draining");
                e.state.begin_drain(u.settings().drain_timeout);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carried(
        old: Option<&[Endpoint]>,
        found: &[Instance],
        kinds: &[&'static str],
    ) -> Vec<Endpoint> {
        let found: Vec<(&'static str, &Instance)> = found
            .iter()
            .enumerate()
            .map(|(i, x)| (kinds[i.min(kinds.len() - 1)], x))
            .collect();
        carry_over(old, &found, &UpstreamSettings::default(), &[])
    }

    #[test]
    fn an_in_order_change_keeps_every_endpoint_and_rebuilds_only_the_changed_one() {
        let mut insts: Vec<Instance> = (1..=100).map(inst).collect();
        let first = carried(None, &insts, &["file"]);
        assert!(
            first.iter().all(|e| e.state.health.joined_ms == 0),
            "first set: no slow start"
        );
        insts[40].weight = 7;
        let second = carried(Some(&first), &insts, &["file"]);
        assert_eq!(second.len(), 100);
        for (a, b) in first.iter().zip(&second) {
            assert!(
                Arc::ptr_eq(&a.state, &b.state),
                "state carried for {}",
                a.authority
            );
        }
        assert_eq!(second[40].weight, 7);
        assert!(
            Arc::ptr_eq(&first[39].id, &second[39].id),
            "unchanged: the old endpoint itself"
        );
        assert!(
            !Arc::ptr_eq(&first[40].id, &second[40].id),
            "changed: rebuilt"
        );
    }

    #[test]
    fn reordered_added_and_removed_endpoints_keep_state_by_identity() {
        let insts: Vec<Instance> = (1..=5).map(inst).collect();
        let first = carried(None, &insts, &["file"]);
        // 3 gone, order reversed, 6 new.
        let next: Vec<Instance> = [6, 5, 4, 2, 1].into_iter().map(inst).collect();
        let second = carried(Some(&first), &next, &["file"]);
        assert_eq!(second.len(), 5);
        for ep in &second[1..] {
            let old = first.iter().find(|o| o.authority == ep.authority).unwrap();
            assert!(
                Arc::ptr_eq(&old.state, &ep.state),
                "{} keeps its state",
                ep.authority
            );
        }
        assert!(first
            .iter()
            .all(|o| !Arc::ptr_eq(&o.state, &second[0].state)));
        assert_ne!(
            second[0].state.health.joined_ms, 0,
            "a later joiner slow-starts"
        );
        // Same address, another instance id: another endpoint, fresh state.
        let mut renamed = inst(1);
        renamed.id = "other".into();
        let third = carried(Some(&second), &[renamed], &["file"]);
        assert!(!Arc::ptr_eq(&third[0].state, &second[4].state));
    }

    #[test]
    fn an_endpoint_from_two_sources_is_kept_once_the_first() {
        let insts = [inst(1), inst(2), inst(1)];
        let eps = carried(None, &insts, &["file", "file", "consul"]);
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].source, "file");
    }

    fn inst(port: u16) -> Instance {
        Instance::new("127.0.0.1", port)
    }

    /// Defect 1 of #12: an instance whose address is not a host:port became the endpoint
    /// `invalid.invalid:1` with fresh state on every rebuild. It is skipped; the rest serve.
    #[test]
    fn an_instance_with_a_bad_address_is_skipped_and_the_rest_keep_their_state() {
        let mut bad = inst(7);
        bad.addr = "foo bar".into();
        let insts = [inst(1), bad.clone(), inst(2)];
        let first = carried(None, &insts, &["consul"]);
        assert_eq!(first.len(), 2);
        assert!(first.iter().all(|e| e.authority.host() == "127.0.0.1"));
        let second = carried(Some(&first), &insts, &["consul"]);
        for (a, b) in first.iter().zip(&second) {
            assert!(Arc::ptr_eq(&a.state, &b.state));
        }
    }

    /// #14: re-tagging an instance moves it between subsets and keeps its state; the subset's
    /// target shares the upstream's endpoint state.
    #[test]
    fn a_metadata_change_moves_an_endpoint_between_subsets_with_its_state() {
        use crate::balancer::testing;
        use crate::state::SourceStatus;
        use crate::subset::Selector;
        let state = State::new(vec![SourceStatus::new("file", "file://x".into())]);
        let mut settings = UpstreamSettings::default();
        settings.subset.selector = Selector([("version".into(), "v2".into())].into());
        let dynamic = Dynamic {
            upstreams: vec![UpstreamConfig {
                id: "u".into(),
                service: Some("svc".into()),
                source: None,
                nodes: vec![],
                settings,
            }],
            ..Default::default()
        };
        let mut b = TableBuilder::new(state.clone(), dynamic);
        let tagged = |v2: &[u16]| -> Services {
            let set = (1..=3)
                .map(|p| {
                    let mut i = inst(p);
                    let v = if v2.contains(&p) { "v2" } else { "v1" };
                    i.metadata.insert("version".into(), v.into());
                    i
                })
                .collect();
            [("svc".to_string(), [(0usize, set)].into())].into()
        };
        let picked = |state: &State| {
            let t = state.table.load();
            let up = &t.upstreams["u"];
            let mut v: Vec<u16> = up
                .picks(None, testing::ctx)
                .unwrap()
                .map(|e| e.authority.port_u16().unwrap())
                .collect();
            v.sort();
            (v, up.endpoints[0].state.clone())
        };
        b.rebuild(&tagged(&[2]), None);
        let (first, state1) = picked(&state);
        assert_eq!(first, vec![2]);
        crate::health::passive::record(
            &state1.health,
            &Default::default(),
            crate::health::Outcome::Failure,
            clock::now_ms(),
            || (0, 3),
        );
        b.rebuild(&tagged(&[1, 2]), None);
        let (second, state1_after) = picked(&state);
        assert_eq!(second, vec![1, 2], "endpoint 1 moved into the subset");
        assert!(Arc::ptr_eq(&state1, &state1_after), "with its state");
        assert_eq!(state1_after.health.consecutive_failures(), 1);
    }

    /// #14: two upstreams on one service (two subsets, say) share each endpoint's state.
    #[test]
    fn two_upstreams_on_one_service_share_endpoint_state() {
        use crate::state::SourceStatus;
        let state = State::new(vec![SourceStatus::new("file", "file://x".into())]);
        let up = |id: &str| UpstreamConfig {
            id: id.into(),
            service: Some("svc".into()),
            source: None,
            nodes: vec![],
            settings: UpstreamSettings::default(),
        };
        let dynamic = Dynamic {
            upstreams: vec![up("a"), up("b")],
            ..Default::default()
        };
        let mut b = TableBuilder::new(state.clone(), dynamic);
        let services: Services = [(
            "svc".to_string(),
            [(0usize, (1..=3).map(inst).collect())].into(),
        )]
        .into();
        b.rebuild(&services, None);
        let t = state.table.load();
        for (x, y) in t.upstreams["a"]
            .endpoints
            .iter()
            .zip(t.upstreams["b"].endpoints.iter())
        {
            assert!(Arc::ptr_eq(&x.state, &y.state), "{}", x.authority);
        }
    }
}
