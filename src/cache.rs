//! The instance cache: the last good instance set per (source, service), and the task that
//! turns discovery events and config reloads into new routing-table snapshots.
//!
//! One task owns all mutable state, so nothing here is shared with the request path except the
//! [`Table`] it publishes through an `ArcSwap` and a few atomics for the admin API. An event
//! that changes nothing (a poll that returns the same set, a blocking query that woke without a
//! change) rebuilds nothing; a change rebuilds only the upstreams that use the changed service,
//! and hands every endpoint that stayed its old [`EndpointState`].
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use discovery::Discovery;
use discovery::{Event, Instance, Update};
use tokio::sync::{mpsc, watch};

use crate::balancer;
use crate::config::{Dynamic, UpstreamConfig, UpstreamSettings};
use crate::guard::Held;
use crate::health::{self, Health};
use crate::metrics::{self as m, UpstreamMetrics};
use crate::proxy;
use crate::snapshot;
use crate::upstream::{
    count_states, Endpoint, EndpointState, Route, Table, Upstream, UpstreamRuntime,
};

/// How often the staleness gauges are refreshed.
pub const STALENESS_TICK: Duration = Duration::from_secs(1);
/// How often on-demand sources are told which services are still in use.
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(10);

/// What the admin API and the proxy share with the cache task.
pub struct Shared {
    pub table: ArcSwap<Table>,
    pub sources: Vec<SourceStatus>,
    /// Sources that watch services only when asked (`Discovery::on_demand`).
    pub on_demand: Vec<Arc<dyn Discovery>>,
    /// Bumped after every table swap; a request waiting for an on-demand watch listens to it.
    pub version: watch::Sender<u64>,
    ready: AtomicBool,
    pub started: SystemTime,
}

impl Shared {
    pub fn new(sources: Vec<SourceStatus>) -> Arc<Self> {
        Self::with_on_demand(sources, Vec::new())
    }

    pub fn with_on_demand(
        sources: Vec<SourceStatus>,
        on_demand: Vec<Arc<dyn Discovery>>,
    ) -> Arc<Self> {
        let ready = sources.is_empty();
        Arc::new(Shared {
            table: ArcSwap::from_pointee(Table::default()),
            sources,
            on_demand,
            version: watch::channel(0).0,
            ready: AtomicBool::new(ready),
            started: SystemTime::now(),
        })
    }

    /// Asks every on-demand source to watch `service`; true when one may have it.
    pub fn demand(&self, service: &str) -> bool {
        self.on_demand
            .iter()
            .fold(false, |any, s| s.watch(service) | any)
    }

    /// True once every source has answered at least once.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// What the admin API shows of one source.
pub struct SourceStatus {
    pub kind: &'static str,
    /// The source's URL with secrets removed.
    pub describe: String,
    answered: AtomicBool,
    last_ok_ms: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl SourceStatus {
    pub fn new(kind: &'static str, describe: String) -> Self {
        SourceStatus {
            kind,
            describe,
            answered: AtomicBool::new(false),
            last_ok_ms: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    pub fn answered(&self) -> bool {
        self.answered.load(Ordering::Acquire)
    }

    /// Seconds since the source last answered (since start when it never has).
    pub fn staleness(&self, started: SystemTime) -> f64 {
        let last = match self.last_ok_ms.load(Ordering::Acquire) {
            0 => started,
            ms => UNIX_EPOCH + Duration::from_millis(ms),
        };
        SystemTime::now()
            .duration_since(last)
            .unwrap_or_default()
            .as_secs_f64()
    }

    fn set_last_ok_ms(&self, ms: u64) {
        self.last_ok_ms.store(ms, Ordering::Release);
    }

    fn ok(&self) {
        self.last_ok_ms
            .store(unix_ms(SystemTime::now()), Ordering::Release);
        self.answered.store(true, Ordering::Release);
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Input to the cache task besides discovery events.
pub enum Control {
    /// A validated new dynamic configuration.
    Reload(Box<Dynamic>),
}

/// The cache and snapshot builder.
pub struct Cache {
    shared: Arc<Shared>,
    dynamic: Dynamic,
    /// service → source index → last good instances.
    services: HashMap<String, BTreeMap<usize, Vec<Instance>>>,
    runtimes: HashMap<String, Arc<UpstreamRuntime>>,
    /// Suspicious updates held by the mass-deregistration guard, by (source, service).
    held: HashMap<(usize, String), Held>,
    /// Where the last good view is saved, and whether it changed since the last write.
    state_dir: Option<PathBuf>,
    snapshot_dirty: bool,
}

/// The services an event changed.
pub type Dirty = HashSet<String>;

impl Cache {
    pub fn new(shared: Arc<Shared>, dynamic: Dynamic) -> Self {
        let mut cache = Cache {
            shared,
            dynamic,
            services: HashMap::new(),
            runtimes: HashMap::new(),
            held: HashMap::new(),
            state_dir: None,
            snapshot_dirty: false,
        };
        cache.rebuild(None);
        cache
    }

    /// Saves the last good view in `dir` from now on, and first serves what is saved there
    /// (see `snapshot.rs`).
    pub fn with_state_dir(mut self, dir: PathBuf) -> Self {
        match snapshot::load(&dir) {
            Ok(Some(snap)) => {
                let mut loaded = 0;
                for (idx, status) in self.shared.sources.iter().enumerate() {
                    let Some(services) = snap.sources.get(&status.describe) else {
                        continue;
                    };
                    for (svc, set) in services {
                        loaded += set.len();
                        self.services
                            .entry(svc.clone())
                            .or_default()
                            .insert(idx, set.clone());
                    }
                    status.set_last_ok_ms(snap.written_ms);
                }
                let age = snapshot::now_ms().saturating_sub(snap.written_ms) / 1000;
                tracing::info!(dir = %dir.display(), endpoints = loaded, age_seconds = age, "serving the saved view until registries answer");
                self.rebuild(None);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("ignoring the saved view: {e}"),
        }
        self.state_dir = Some(dir);
        self
    }

    fn write_snapshot(&mut self) {
        let Some(dir) = &self.state_dir else { return };
        if !self.snapshot_dirty {
            return;
        }
        let mut sources: BTreeMap<String, BTreeMap<String, Vec<Instance>>> = BTreeMap::new();
        for (svc, by_source) in &self.services {
            for (idx, set) in by_source {
                if let Some(status) = self.shared.sources.get(*idx) {
                    sources
                        .entry(status.describe.clone())
                        .or_default()
                        .insert(svc.clone(), set.clone());
                }
            }
        }
        let snap = snapshot::Snapshot {
            version: snapshot::VERSION,
            written_ms: snapshot::now_ms(),
            sources,
        };
        match snapshot::write(dir, &snap) {
            Ok(()) => self.snapshot_dirty = false,
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot save the view"),
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Runs until both channels close.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<(usize, Event)>,
        mut control: mpsc::Receiver<Control>,
    ) {
        let mut tick = tokio::time::interval(STALENESS_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut touch = tokio::time::interval(TOUCH_INTERVAL);
        touch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut used: HashMap<Arc<str>, u64> = HashMap::new();
        let mut save = tokio::time::interval(snapshot::WRITE_INTERVAL);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some((source, ev)) => {
                        let dirty = self.apply(source, ev);
                        if !dirty.is_empty() {
                            self.rebuild(Some(&dirty));
                            self.snapshot_dirty = true;
                        }
                        self.update_ready();
                    }
                    None => return,
                },
                Some(c) = control.recv() => match c {
                    Control::Reload(d) => self.reload(*d),
                },
                _ = tick.tick() => {
                    self.publish_staleness();
                    let dirty = self.release_held(health::now_ms());
                    if !dirty.is_empty() {
                        self.rebuild(Some(&dirty));
                        self.snapshot_dirty = true;
                    }
                }
                _ = save.tick(), if self.snapshot_dirty => self.write_snapshot(),
                _ = touch.tick(), if !self.shared.on_demand.is_empty() => self.touch(&mut used),
            }
        }
    }

    /// Ready once every source has answered, checked after the answer's table is published so
    /// `/ready` never runs ahead of the routing table.
    fn update_ready(&self) {
        if !self.shared.ready() && self.shared.sources.iter().all(SourceStatus::answered) {
            self.shared.ready.store(true, Ordering::Release);
            tracing::info!("every discovery source has answered: ready");
        }
    }

    /// Keeps on-demand watches alive for services named in config and for those that served
    /// requests since the last touch; the others idle out in their source.
    fn touch(&self, used: &mut HashMap<Arc<str>, u64>) {
        for u in &self.dynamic.upstreams {
            if let Some(svc) = &u.service {
                self.shared.demand(svc);
            }
        }
        let table = self.shared.table.load();
        for up in table.upstreams.values() {
            let n = up.runtime.requests.load(Ordering::Relaxed);
            if used.insert(up.id.clone(), n) != Some(n) {
                if let Some(svc) = &up.service {
                    self.shared.demand(svc);
                }
            }
        }
        used.retain(|id, _| table.upstreams.contains_key(id));
    }

    fn publish_staleness(&self) {
        for s in &self.shared.sources {
            metrics::gauge!(m::DISCOVERY_STALENESS, "source" => s.kind)
                .set(s.staleness(self.shared.started));
        }
    }

    /// Applies one event; returns the services whose instance sets changed.
    pub fn apply(&mut self, source: usize, ev: Event) -> Dirty {
        let shared = self.shared.clone();
        let Some(status) = shared.sources.get(source) else {
            return Dirty::new();
        };
        let kind = status.kind;
        let mut dirty = Dirty::new();
        match ev {
            Event::Error { kind: ek, message } => {
                metrics::counter!(m::DISCOVERY_ERRORS, "source" => kind, "kind" => ek.as_str())
                    .increment(1);
                *status.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
                return dirty;
            }
            Event::Snapshot(all) => {
                for svc in self.reported_by(source) {
                    if !all.contains_key(&svc) {
                        self.set(source, svc, None, &mut dirty);
                    }
                }
                for (svc, instances) in all {
                    self.set(source, svc, Some(instances), &mut dirty);
                }
            }
            Event::Service { service, update } => {
                let update = match self.apply_delta(source, &service, update, &mut dirty) {
                    None => return self.applied(status, kind, dirty),
                    Some(u) => u,
                };
                let current = self
                    .services
                    .get(&service)
                    .and_then(|m| m.get(&source))
                    .cloned();
                let next = match update {
                    Update::Reset(set) => Some(set),
                    Update::NotFound => None,
                    Update::Add(add) => {
                        let mut set = current.unwrap_or_default();
                        for inst in add {
                            set.retain(|i| i.id != inst.id);
                            set.push(inst);
                        }
                        Some(set)
                    }
                    Update::Remove(ids) => current.map(|mut set| {
                        set.retain(|i| !ids.contains(&i.id));
                        set
                    }),
                };
                self.set(source, service, next, &mut dirty);
            }
            Event::Catalog(names) => {
                let names: HashSet<String> = names.into_iter().collect();
                for svc in self.reported_by(source) {
                    if !names.contains(&svc) {
                        self.set(source, svc, None, &mut dirty);
                    }
                }
            }
        }
        self.services.retain(|_, set| !set.is_empty());
        self.applied(status, kind, dirty)
    }

    fn applied(&self, status: &SourceStatus, kind: &'static str, dirty: Dirty) -> Dirty {
        metrics::counter!(m::DISCOVERY_UPDATES, "source" => kind).increment(1);
        status.ok();
        dirty
    }

    /// Applies an `Add` or `Remove` to the source's set in place, when that is the whole story:
    /// a set exists, no update of it is held, and the guard has no reason to look (an `Add`
    /// removes no id; a `Remove` leaves enough). The set stays sorted, so nothing is cloned,
    /// re-sorted or compared whole: a one-instance change in a 10,000-instance service costs a
    /// binary search and a move, not a copy of the service. `Some(update)` hands anything else
    /// back to the general path.
    fn apply_delta(
        &mut self,
        source: usize,
        service: &str,
        update: Update,
        dirty: &mut Dirty,
    ) -> Option<Update> {
        if !matches!(update, Update::Add(_) | Update::Remove(_))
            || self.held.keys().any(|(s, n)| *s == source && n == service)
        {
            return Some(update);
        }
        let Some(set) = self
            .services
            .get_mut(service)
            .and_then(|m| m.get_mut(&source))
        else {
            return Some(update);
        };
        let same_id = |set: &[Instance], id: &str| {
            let start = set.partition_point(|i| i.id.as_str() < id);
            start..start + set[start..].partition_point(|i| i.id == id)
        };
        let mut changed = false;
        match update {
            Update::Add(add) => {
                for inst in add {
                    let range = same_id(set, &inst.id);
                    if range.len() == 1 && set[range.start] == inst {
                        continue;
                    }
                    changed = true;
                    if range.len() == 1 {
                        set[range.start] = inst;
                    } else {
                        set.splice(range, std::iter::once(inst));
                    }
                }
            }
            Update::Remove(mut ids) => {
                ids.sort_unstable();
                ids.dedup();
                let removed: usize = ids.iter().map(|id| same_id(set, id).len()).sum();
                let left = set.len() - removed;
                if removed > 0 && self.dynamic.guard.holds(service, set.len(), removed, left) {
                    return Some(Update::Remove(ids));
                }
                for id in &ids {
                    let range = same_id(set, id);
                    if !range.is_empty() {
                        changed = true;
                        set.drain(range);
                    }
                }
            }
            _ => unreachable!("only Add and Remove reach here"),
        }
        if changed {
            dirty.insert(service.to_string());
        }
        None
    }

    /// Services `source` currently has instances for.
    fn reported_by(&self, source: usize) -> Vec<String> {
        self.services
            .iter()
            .filter(|(_, by)| by.contains_key(&source))
            .map(|(svc, _)| svc.clone())
            .collect()
    }

    /// Replaces what `source` says of `service` (`None`: nothing), unless the mass-deregistration
    /// guard holds the change (see `guard.rs`).
    fn set(
        &mut self,
        source: usize,
        service: String,
        instances: Option<Vec<Instance>>,
        dirty: &mut Dirty,
    ) {
        let instances = instances.map(|mut set| {
            set.sort();
            set
        });
        let key = (source, service);
        let current = self.services.get(&key.1).and_then(|m| m.get(&source));
        if current == instances.as_ref() || (current.is_none() && instances.is_none()) {
            self.held.remove(&key);
            return;
        }
        let guard = &self.dynamic.guard;
        if guard.suspicious(&key.1, current.map_or(&[][..], |c| c), instances.as_deref()) {
            let now = health::now_ms();
            let held = self.held.entry(key.clone()).or_insert_with(|| Held {
                next: instances.clone(),
                since_ms: now,
                answers: 0,
            });
            if held.next == instances {
                held.answers += 1;
            } else {
                *held = Held {
                    next: instances.clone(),
                    since_ms: now,
                    answers: 1,
                };
            }
            if !held.confirmed(guard, now) {
                if held.answers == 1 {
                    let kind = self.shared.sources.get(source).map_or("", |s| s.kind);
                    metrics::counter!(m::DISCOVERY_HELD, "source" => kind).increment(1);
                    tracing::warn!(
                        source = kind,
                        service = %key.1,
                        endpoints = current.map_or(0, Vec::len),
                        after = instances.as_ref().map_or(0, Vec::len),
                        "holding an update that removes most of a service; the last good set keeps serving until it is confirmed"
                    );
                }
                return;
            }
            tracing::info!(service = %key.1, "held update confirmed: applying");
        }
        self.held.remove(&key);
        let (_, service) = key;
        let entry = self.services.entry(service.clone()).or_default();
        match instances {
            Some(set) => {
                entry.insert(source, set);
            }
            None => {
                entry.remove(&source);
            }
        }
        dirty.insert(service);
    }

    /// Applies held updates whose confirmation window has passed.
    pub fn release_held(&mut self, now_ms: u64) -> Dirty {
        let guard = self.dynamic.guard.clone();
        let due: Vec<(usize, String)> = self
            .held
            .iter()
            .filter(|(_, h)| h.confirmed(&guard, now_ms))
            .map(|(k, _)| k.clone())
            .collect();
        let mut dirty = Dirty::new();
        for key in due {
            if let Some(h) = self.held.remove(&key) {
                tracing::info!(service = %key.1, "held update confirmed by its window: applying");
                let entry = self.services.entry(key.1.clone()).or_default();
                match h.next {
                    Some(set) => entry.insert(key.0, set),
                    None => entry.remove(&key.0),
                };
                dirty.insert(key.1);
            }
        }
        self.services.retain(|_, set| !set.is_empty());
        dirty
    }

    fn reload(&mut self, dynamic: Dynamic) {
        if dynamic == self.dynamic {
            tracing::info!("configuration reloaded: no change");
            return;
        }
        self.dynamic = dynamic;
        self.rebuild(None);
        tracing::info!("configuration reloaded");
    }

    /// Rebuilds the upstreams using `dirty` services (all upstreams when `None`) and publishes
    /// a new table.
    pub fn rebuild(&mut self, dirty: Option<&Dirty>) {
        let old = self.shared.table.load_full();
        let mut upstreams = match dirty {
            Some(_) => old.upstreams.clone(),
            None => HashMap::with_capacity(old.upstreams.len()),
        };
        let wants = |svc: &Option<String>| match (dirty, svc) {
            (None, _) => true,
            (Some(d), Some(s)) => d.contains(s),
            (Some(_), None) => false,
        };
        let configured: Vec<UpstreamConfig> = self.dynamic.upstreams.clone();
        let configured_ids: HashSet<&str> = configured.iter().map(|u| u.id.as_str()).collect();
        for u in &configured {
            if wants(&u.service) {
                let up = self.build(
                    &old,
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
            let settings = UpstreamSettings::with_balancer(&self.dynamic.default_balancer);
            let names: Vec<String> = match dirty {
                Some(d) => d.iter().cloned().collect(),
                None => self.services.keys().cloned().collect(),
            };
            for svc in names {
                if configured_ids.contains(svc.as_str()) {
                    continue;
                }
                if self.services.contains_key(&svc) {
                    let up = self.build(&old, &svc, Some(&svc), None, &[], &settings);
                    upstreams.insert(up.id.clone(), Arc::new(up));
                } else if upstreams.remove(svc.as_str()).is_some() {
                    self.forget(&svc);
                    tracing::info!(service = %svc, "service gone from every source");
                }
            }
        }
        if dirty.is_none() {
            let live: HashSet<String> = upstreams.keys().map(|k| k.to_string()).collect();
            let gone: Vec<String> = self
                .runtimes
                .keys()
                .filter(|k| !live.contains(*k))
                .cloned()
                .collect();
            for id in gone {
                self.forget(&id);
            }
        }
        let routes = self
            .dynamic
            .routes
            .iter()
            .map(|r| Route {
                host: r.host.as_deref().map(Into::into),
                path_prefix: r.path_prefix.as_deref().map(Into::into),
                strip_prefix: r.strip_prefix,
                upstream: r.upstream.as_str().into(),
            })
            .collect();
        let table = Arc::new(Table {
            upstreams,
            routes,
            domain_suffix: self.dynamic.domain_suffix.as_deref().map(Into::into),
        });
        self.shared.table.store(table.clone());
        self.shared.version.send_modify(|v| *v += 1);
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

    fn forget(&mut self, id: &str) {
        self.runtimes.remove(id);
        for state in ["healthy", "unhealthy"] {
            metrics::gauge!(m::ENDPOINTS, "upstream" => id.to_string(), "state" => state).set(0.0);
        }
    }

    fn build(
        &mut self,
        old: &Table,
        id: &str,
        service: Option<&str>,
        source: Option<&str>,
        nodes: &[(std::net::SocketAddr, u32)],
        settings: &UpstreamSettings,
    ) -> Upstream {
        let runtime = match self.runtimes.get(id) {
            Some(rt) if rt.settings == *settings => rt.clone(),
            _ => {
                let rt = Arc::new(UpstreamRuntime {
                    settings: settings.clone(),
                    metrics: UpstreamMetrics::new(id),
                    panic: Default::default(),
                    requests: Default::default(),
                    retry_tokens: proxy::RETRY_BUDGET_RESERVE.into(),
                });
                self.runtimes.insert(id.to_string(), rt.clone());
                rt
            }
        };
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
            for (idx, set) in self.services.get(svc).into_iter().flatten() {
                let kind = self.shared.sources[*idx].kind;
                if source.is_some_and(|s| s != kind) {
                    continue;
                }
                found.extend(set.iter().map(|i| (kind, i)));
            }
        }
        let endpoints = carry_over(
            old.upstreams.get(id).map(|u| &u.endpoints[..]),
            &found,
            settings,
        );
        let (healthy, unhealthy) = count_states(&endpoints);
        metrics::gauge!(m::ENDPOINTS, "upstream" => id.to_string(), "state" => "healthy")
            .set(healthy as f64);
        metrics::gauge!(m::ENDPOINTS, "upstream" => id.to_string(), "state" => "unhealthy")
            .set(unhealthy as f64);
        let factory =
            balancer::factory(&settings.balancer).unwrap_or(crate::balancer::roundrobin::build);
        let balancer = factory(&endpoints, settings);
        Upstream {
            id: id.into(),
            service: service.map(Into::into),
            runtime,
            endpoints: endpoints.into_boxed_slice(),
            balancer,
            updated_at: SystemTime::now(),
        }
    }
}

/// The endpoints for `found`, carrying over from the upstream's previous endpoints (`old`) the
/// state of every endpoint still there (health, EWMA, in-flight, pooled connections), keyed by
/// (instance id, address). Newcomers get fresh state; after the first set they slow-start. An
/// endpoint reported twice (two sources) is kept once, the first.
///
/// The common update (a weight, health or zone change, same endpoints in the same order) takes
/// a path without hashing or allocation for unchanged endpoints: they are the old `Endpoint`s,
/// cloned (reference counts). A one-endpoint change in a 10,000-endpoint service spent 25 ms in
/// allocating keys and endpoints before (#8).
fn carry_over(
    old: Option<&[Endpoint]>,
    found: &[(&'static str, &Instance)],
    settings: &UpstreamSettings,
) -> Vec<Endpoint> {
    let old = old.unwrap_or_default();
    // Endpoints in an upstream's first set start at full weight; later joiners slow-start.
    let joined = if old.is_empty() { 0 } else { health::now_ms() };
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
                    Endpoint::from_instance(inst, kind, ep.state.clone())
                }
            })
            .collect();
    }
    let by_key: HashMap<(&str, &str), &Endpoint> = old
        .iter()
        .map(|ep| ((&*ep.id, ep.authority.as_str()), ep))
        .collect();
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
        endpoints.push(Endpoint::from_instance(inst, kind, state));
    }
    endpoints
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
        carry_over(old, &found, &UpstreamSettings::with_balancer("roundrobin"))
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

    fn cache() -> Cache {
        let shared = Shared::new(vec![SourceStatus::new("file", "file://x".into())]);
        Cache::new(
            shared,
            Dynamic {
                default_balancer: "roundrobin".into(),
                domain_suffix: None,
                upstreams: vec![],
                routes: vec![],
                guard: crate::guard::GuardConfig {
                    enabled: false,
                    ..Default::default()
                },
            },
        )
    }

    fn snapshot(services: &[(&str, &[u16])]) -> Event {
        Event::Snapshot(
            services
                .iter()
                .map(|(s, ports)| (s.to_string(), ports.iter().map(|p| inst(*p)).collect()))
                .collect(),
        )
    }

    fn step(c: &mut Cache, ev: Event) -> Dirty {
        let d = c.apply(0, ev);
        if !d.is_empty() {
            c.rebuild(Some(&d));
        }
        c.update_ready();
        d
    }

    #[test]
    fn same_answer_changes_nothing_and_keeps_the_snapshot() {
        let mut c = cache();
        assert!(!c.shared.ready());
        step(&mut c, snapshot(&[("a", &[1, 2])]));
        assert!(c.shared.ready());
        let before = c.shared.table.load_full();
        assert!(step(&mut c, snapshot(&[("a", &[2, 1])])).is_empty());
        assert!(Arc::ptr_eq(&before, &c.shared.table.load_full()));
    }

    #[test]
    fn one_addition_keeps_the_other_endpoints_state() {
        let mut c = cache();
        let ports: Vec<u16> = (1..=20).collect();
        step(&mut c, snapshot(&[("a", &ports), ("b", &[99])]));
        let t1 = c.shared.table.load_full();
        let b1 = t1.upstreams["b"].clone();
        let states1: Vec<_> = t1.upstreams["a"]
            .endpoints
            .iter()
            .map(|e| e.state.clone())
            .collect();
        let mut more = ports.clone();
        more.push(21);
        step(&mut c, snapshot(&[("a", &more), ("b", &[99])]));
        let t2 = c.shared.table.load_full();
        let a2 = &t2.upstreams["a"];
        assert_eq!(a2.endpoints.len(), 21);
        let kept = a2
            .endpoints
            .iter()
            .filter(|e| states1.iter().any(|s| Arc::ptr_eq(s, &e.state)))
            .count();
        assert_eq!(kept, 20, "the 20 old endpoints keep their state");
        assert!(
            Arc::ptr_eq(&b1, &t2.upstreams["b"]),
            "an unrelated upstream is not rebuilt"
        );
        assert!(
            Arc::ptr_eq(&t1.upstreams["a"].runtime, &a2.runtime),
            "runtime (metrics, retry budget) kept"
        );
    }

    #[test]
    fn removed_service_goes_and_deltas_apply() {
        let mut c = cache();
        step(&mut c, snapshot(&[("a", &[1]), ("b", &[2])]));
        step(&mut c, snapshot(&[("a", &[1])]));
        assert!(!c.shared.table.load().upstreams.contains_key("b"));
        step(
            &mut c,
            Event::Service {
                service: "a".into(),
                update: Update::Add(vec![inst(3)]),
            },
        );
        assert_eq!(c.shared.table.load().upstreams["a"].endpoints.len(), 2);
        step(
            &mut c,
            Event::Service {
                service: "a".into(),
                update: Update::Remove(vec!["127.0.0.1:1".into()]),
            },
        );
        let t = c.shared.table.load();
        assert_eq!(t.upstreams["a"].endpoints.len(), 1);
        assert_eq!(t.upstreams["a"].endpoints[0].authority.port_u16(), Some(3));
    }

    /// Deltas applied in place give the same sets as the general path's rule (an `Add`
    /// replaces every instance of its id, a `Remove` drops every instance of each id, the set
    /// kept sorted), over 3,000 random deltas on ids from a small pool, with duplicate ids,
    /// repeated adds and removals of absent ids; and the table follows.
    #[test]
    fn deltas_in_place_match_the_general_rule() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let mut c = cache();
        step(&mut c, snapshot(&[("a", &[1, 2, 3])]));
        let mut model: Vec<Instance> = [1, 2, 3].into_iter().map(inst).collect();
        model.sort();
        for n in 0..3_000 {
            let update = if rng.random_bool(0.6) {
                let k = rng.random_range(1..=3);
                let add: Vec<Instance> = (0..k)
                    .map(|_| {
                        let mut i = inst(rng.random_range(1..=12));
                        i.weight = rng.random_range(0..=3);
                        i
                    })
                    .collect();
                for i in &add {
                    model.retain(|m| m.id != i.id);
                    model.push(i.clone());
                }
                Update::Add(add)
            } else {
                let k = rng.random_range(1..=3);
                let ids: Vec<String> = (0..k).map(|_| inst(rng.random_range(1..=12)).id).collect();
                model.retain(|m| !ids.contains(&m.id));
                Update::Remove(ids)
            };
            model.sort();
            step(
                &mut c,
                Event::Service {
                    service: "a".into(),
                    update,
                },
            );
            let got = c.services.get("a").and_then(|m| m.get(&0));
            assert_eq!(got.map_or(&[][..], |v| v), &model[..], "after delta {n}");
            let table = c.shared.table.load();
            let live = table.upstreams.get("a").map_or(0, |u| u.endpoints.len());
            assert_eq!(live, model.len(), "after delta {n}: the table follows");
        }
    }

    #[test]
    fn a_delta_that_removes_most_of_a_service_is_held_like_a_full_answer() {
        let mut c = guarded();
        step(&mut c, snapshot(&[("a", &[1, 2, 3, 4])]));
        let remove = |ids: &[u16]| Event::Service {
            service: "a".into(),
            update: Update::Remove(ids.iter().map(|p| inst(*p).id).collect()),
        };
        // Half goes at once (the guard's limit is more than half).
        assert!(!step(&mut c, remove(&[1, 2])).is_empty());
        assert_eq!(c.shared.table.load().upstreams["a"].endpoints.len(), 2);
        // Removing the rest is held, as a full answer without them would be.
        assert!(step(&mut c, remove(&[3, 4])).is_empty());
        assert_eq!(c.shared.table.load().upstreams["a"].endpoints.len(), 2);
        assert!(!c.held.is_empty());
    }

    fn guarded() -> Cache {
        let mut c = cache();
        c.dynamic.guard = crate::guard::GuardConfig {
            confirm_answers: 3,
            confirm_window: Duration::from_secs(30),
            ..Default::default()
        };
        c
    }

    #[test]
    fn the_guard_holds_mass_removal_until_three_identical_answers() {
        let mut c = guarded();
        step(&mut c, snapshot(&[("a", &[1, 2, 3, 4])]));
        // Removing half applies at once.
        assert!(!step(&mut c, snapshot(&[("a", &[1, 2])])).is_empty());
        // Removing the rest, or the whole service, is held…
        for _ in 0..2 {
            assert!(step(&mut c, snapshot(&[])).is_empty());
            assert_eq!(c.shared.table.load().upstreams["a"].endpoints.len(), 2);
        }
        // …until the third identical answer.
        assert!(!step(&mut c, snapshot(&[])).is_empty());
        assert!(!c.shared.table.load().upstreams.contains_key("a"));
    }

    #[test]
    fn the_guard_releases_by_window_and_a_sane_answer_replaces_a_held_one() {
        let mut c = guarded();
        step(&mut c, snapshot(&[("a", &[1, 2, 3]), ("b", &[1, 2, 3])]));
        assert!(step(&mut c, snapshot(&[("a", &[1]), ("b", &[1])])).is_empty());
        // A sane answer for b replaces its held one.
        assert!(!step(&mut c, snapshot(&[("a", &[1]), ("b", &[1, 2])])).is_empty());
        assert_eq!(c.shared.table.load().upstreams["b"].endpoints.len(), 2);
        assert_eq!(
            c.shared.table.load().upstreams["a"].endpoints.len(),
            3,
            "a still held"
        );
        let now = health::now_ms();
        assert!(c.release_held(now + 29_000).is_empty());
        let d = c.release_held(now + 31_000);
        c.rebuild(Some(&d));
        assert_eq!(c.shared.table.load().upstreams["a"].endpoints.len(), 1);
    }

    #[test]
    fn opted_out_services_are_never_held() {
        let mut c = guarded();
        c.dynamic.guard.opt_out = vec!["a".into()];
        step(&mut c, snapshot(&[("a", &[1, 2, 3])]));
        assert!(!step(&mut c, snapshot(&[])).is_empty());
        assert!(!c.shared.table.load().upstreams.contains_key("a"));
    }

    #[test]
    fn errors_keep_the_last_good_view() {
        let mut c = cache();
        step(&mut c, snapshot(&[("a", &[1])]));
        let d = step(
            &mut c,
            Event::Error {
                kind: discovery::ErrorKind::Parse,
                message: "garbage".into(),
            },
        );
        assert!(d.is_empty());
        assert_eq!(c.shared.table.load().upstreams["a"].endpoints.len(), 1);
        assert_eq!(
            c.shared.sources[0].last_error.lock().unwrap().as_deref(),
            Some("garbage")
        );
    }
}
