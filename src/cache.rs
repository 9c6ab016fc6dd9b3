//! The instance cache: the last good instance set per (source, service), and the task that
//! turns discovery events and config reloads into new routing tables (`table.rs` builds them).
//!
//! One task owns all mutable state, so nothing here is shared with the request path except the
//! routing table it publishes through [`State`] and a few atomics for the admin API. An event
//! that changes nothing (a poll that returns the same set, a blocking query that woke without a
//! change) rebuilds nothing; a change rebuilds only the upstreams that use the changed service.
//! Registry errors never drop a set; suspicious removals are held (`guard.rs`); the view is
//! saved to disk (`state_file.rs`) and served from there after a restart.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use discovery::{Discovery, Event, Instance, LivenessError, Update};
use tokio::sync::mpsc;

use crate::clock;
use crate::guard::Held;
use crate::metrics as m;
use crate::state::{SourceStatus, State};
use crate::state_file;
use crate::table::{Dirty, Dynamic, Services, TableBuilder};

/// How often the staleness gauges are refreshed.
pub const STALENESS_TICK: Duration = Duration::from_secs(1);
/// How often on-demand sources are told which services are still in use.
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(10);
/// How often every service is read again from its source and compared with what the watch
/// pushed (`EDGE_AGENT_RESYNC_INTERVAL`); each agent jitters it by up to ±10 %.
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(300);
/// Reads that confirm (or refute) an update the removal guard holds, and the time between
/// them: a blocking query or a push does not repeat an unchanged answer, so the guard asks.
pub const CONFIRM_READS: u32 = 3;
pub const CONFIRM_READ_GAP: Duration = Duration::from_secs(1);
/// Resync reads in flight at once, so a host watching thousands of services does not open
/// thousands of registry calls at the same moment.
pub const RESYNC_CONCURRENCY: usize = 8;

/// Why a source was read directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadWhy {
    /// To confirm an update the removal guard holds.
    Confirm,
    /// The periodic resync.
    Resync,
}

/// A direct read's answer, back in the cache task.
struct ReadDone {
    source: usize,
    service: String,
    why: ReadWhy,
    /// What the watch had said of the service when the read was asked ([`Cache::version`]):
    /// an answer the watch has overtaken since is dropped.
    version: (u64, u64),
    result: Result<Option<Vec<Instance>>, LivenessError>,
}

/// Input to the cache task besides discovery events.
pub enum Control {
    /// A validated new dynamic configuration.
    Reload(Box<Dynamic>),
}

/// The instance cache.
pub struct Cache {
    state: Arc<State>,
    tables: TableBuilder,
    /// service → source index → last good instances.
    services: Services,
    /// Suspicious updates held by the mass-deregistration guard, by (source, service).
    held: HashMap<(usize, String), Held>,
    /// Where the last good view is saved, and whether it changed since the last write.
    state_dir: Option<PathBuf>,
    unsaved: bool,
    /// The sources, for direct reads ([`Discovery::read`]); by index.
    sources: Vec<Arc<dyn Discovery>>,
    /// Watch answers seen per (source, service), and per source for whole snapshots: a
    /// direct read asked before the latest of them is stale. A catalog (names only) counts
    /// for the services it drops.
    versions: HashMap<(usize, String), u64>,
    epochs: HashMap<usize, u64>,
    /// Holds that have confirming reads asked or under way.
    confirming: HashSet<(usize, String)>,
    reads_tx: mpsc::UnboundedSender<ReadDone>,
    reads_rx: Option<mpsc::UnboundedReceiver<ReadDone>>,
    resync_interval: Option<Duration>,
}

impl Cache {
    pub fn new(state: Arc<State>, dynamic: Dynamic) -> Self {
        let (reads_tx, reads_rx) = mpsc::unbounded_channel();
        let mut cache = Cache {
            tables: TableBuilder::new(state.clone(), dynamic),
            state,
            services: HashMap::new(),
            held: HashMap::new(),
            state_dir: None,
            unsaved: false,
            sources: Vec::new(),
            versions: HashMap::new(),
            epochs: HashMap::new(),
            confirming: HashSet::new(),
            reads_tx,
            reads_rx: Some(reads_rx),
            resync_interval: None,
        };
        cache.rebuild(None);
        cache
    }

    /// Reads `sources` (by index, as events name them) directly: to confirm held updates at
    /// once, and every `resync` (jittered; `None`: never) to correct what a lost notification
    /// left stale.
    pub fn with_sources(
        mut self,
        sources: Vec<Arc<dyn Discovery>>,
        resync: Option<Duration>,
    ) -> Self {
        self.sources = sources;
        self.resync_interval = resync.map(|d| {
            let jitter = rand::random_range(0.9..1.1);
            d.mul_f64(jitter)
        });
        self
    }

    /// Saves the last good view in `dir` from now on, and first serves what is saved there
    /// (see `state_file.rs`).
    pub fn with_state_dir(mut self, dir: PathBuf) -> Self {
        match state_file::load(&dir) {
            Ok(Some(snap)) => {
                let mut loaded = 0;
                for (idx, status) in self.state.sources.iter().enumerate() {
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
                let age = clock::unix_now_ms().saturating_sub(snap.written_ms) / 1000;
                tracing::info!(dir = %dir.display(), endpoints = loaded, age_seconds = age, "serving the saved view until registries answer");
                self.rebuild(None);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("ignoring the saved view: {e}"),
        }
        self.state_dir = Some(dir);
        self
    }

    fn save(&mut self) {
        let Some(dir) = &self.state_dir else { return };
        if !self.unsaved {
            return;
        }
        let mut sources: BTreeMap<String, BTreeMap<String, Vec<Instance>>> = BTreeMap::new();
        for (svc, by_source) in &self.services {
            for (idx, set) in by_source {
                if let Some(status) = self.state.sources.get(*idx) {
                    sources
                        .entry(status.describe.clone())
                        .or_default()
                        .insert(svc.clone(), set.clone());
                }
            }
        }
        let saved = state_file::SavedView {
            version: state_file::VERSION,
            written_ms: clock::unix_now_ms(),
            sources,
        };
        match state_file::write(dir, &saved) {
            Ok(()) => self.unsaved = false,
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot save the view"),
        }
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
        let mut save = tokio::time::interval(state_file::WRITE_INTERVAL);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let resync_every = self.resync_interval.unwrap_or(Duration::from_secs(3600));
        let mut resync =
            tokio::time::interval_at(tokio::time::Instant::now() + resync_every, resync_every);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reads = self.reads_rx.take().expect("the cache runs once");
        let resync_slots = Arc::new(tokio::sync::Semaphore::new(RESYNC_CONCURRENCY));
        loop {
            tokio::select! {
                Some(done) = reads.recv() => {
                    let dirty = self.read_done(done);
                    if !dirty.is_empty() {
                        self.rebuild(Some(&dirty));
                        self.unsaved = true;
                    }
                    self.publish_held();
                    self.ask_confirmations();
                }
                _ = resync.tick(), if self.resync_interval.is_some() => self.resync(&resync_slots),
                ev = events.recv() => match ev {
                    Some((source, ev)) => {
                        let gone = matches!(&ev, Event::Service { update: Update::NotFound, .. });
                        let dirty = self.apply(source, ev);
                        if !dirty.is_empty() {
                            self.rebuild(Some(&dirty));
                            self.unsaved = true;
                        } else if gone {
                            self.state.wake();
                        }
                        self.publish_held();
                        self.ask_confirmations();
                        self.update_ready();
                    }
                    None => return,
                },
                Some(c) = control.recv() => match c {
                    Control::Reload(d) => self.reload(*d),
                },
                _ = tick.tick() => {
                    self.publish_staleness();
                    let dirty = self.release_held(clock::now_ms());
                    if !dirty.is_empty() {
                        self.rebuild(Some(&dirty));
                        self.unsaved = true;
                    }
                    self.publish_held();
                }
                _ = save.tick(), if self.unsaved => self.save(),
                _ = touch.tick(), if !self.state.on_demand.is_empty() => self.touch(&mut used),
            }
        }
    }

    /// Ready once every source has answered, checked after the answer's table is published so
    /// `/ready` never runs ahead of the routing table.
    fn update_ready(&self) {
        if self.state.update_ready() {
            tracing::info!("every discovery source has answered: ready");
        }
    }

    /// Keeps on-demand watches alive for services named in config and for those that served
    /// requests since the last touch; the others idle out in their source.
    fn touch(&self, used: &mut HashMap<Arc<str>, u64>) {
        for u in &self.tables.dynamic.upstreams {
            if let Some(svc) = &u.service {
                self.state.demand(svc);
            }
        }
        let table = self.state.table.load();
        for up in table.upstreams.values() {
            let n = up.runtime.requests.load(Ordering::Relaxed);
            if used.insert(up.id.clone(), n) != Some(n) {
                if let Some(svc) = &up.service {
                    self.state.demand(svc);
                }
            }
        }
        used.retain(|id, _| table.upstreams.contains_key(id));
    }

    fn publish_staleness(&self) {
        for s in &self.state.sources {
            metrics::gauge!(m::DISCOVERY_STALENESS, "source" => s.kind)
                .set(s.staleness(self.state.started));
        }
    }

    /// Applies one event; returns the services whose instance sets changed.
    pub fn apply(&mut self, source: usize, ev: Event) -> Dirty {
        let state = self.state.clone();
        let Some(status) = state.sources.get(source) else {
            return Dirty::new();
        };
        let kind = status.kind;
        let mut dirty = Dirty::new();
        match ev {
            Event::Error { kind: ek, message } => {
                metrics::counter!(m::DISCOVERY_ERRORS, "source" => kind, "kind" => ek.as_str())
                    .increment(1);
                status.set_error(message);
                return dirty;
            }
            Event::Snapshot(all) => {
                *self.epochs.entry(source).or_default() += 1;
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
                *self.versions.entry((source, service.clone())).or_default() += 1;
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
                // A name list says nothing of the instances of the services it names: only a
                // service it drops makes a direct read of that service stale. (Counting it for
                // every service dropped the reads that confirm a held removal whenever the
                // catalog answered just after the removal, as Consul's does.)
                let names: HashSet<String> = names.into_iter().collect();
                for svc in self.reported_by(source) {
                    if !names.contains(&svc) {
                        *self.versions.entry((source, svc.clone())).or_default() += 1;
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
                if removed > 0
                    && self
                        .tables
                        .dynamic
                        .guard
                        .holds(service, set.len(), removed, left)
                {
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
        let guard = &self.tables.dynamic.guard;
        if guard.suspicious(&key.1, current.map_or(&[][..], |c| c), instances.as_deref()) {
            let now = clock::now_ms();
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
                    let kind = self.state.sources.get(source).map_or("", |s| s.kind);
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

    /// What the watch of `source` has said of `service` so far (see [`ReadDone::version`]).
    fn version(&self, source: usize, service: &str) -> (u64, u64) {
        (
            self.epochs.get(&source).copied().unwrap_or(0),
            self.versions
                .get(&(source, service.to_string()))
                .copied()
                .unwrap_or(0),
        )
    }

    /// Starts a direct read of `service` from `source`, when the source has one; its answer
    /// comes back to the cache task as a [`ReadDone`] after `delay`.
    fn ask(
        &self,
        source: usize,
        service: &str,
        why: ReadWhy,
        delay: Duration,
        slots: Option<Arc<tokio::sync::Semaphore>>,
    ) -> bool {
        let Some(src) = self.sources.get(source) else {
            return false;
        };
        let Some(read) = src.clone().read(service) else {
            return false;
        };
        let (tx, version, service) = (
            self.reads_tx.clone(),
            self.version(source, service),
            service.to_string(),
        );
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let _slot = match &slots {
                Some(s) => s.clone().acquire_owned().await.ok(),
                None => None,
            };
            let result = read.await;
            let _ = tx.send(ReadDone {
                source,
                service,
                why,
                version,
                result,
            });
        });
        true
    }

    /// Asks the sources of newly held updates to confirm them: [`CONFIRM_READS`] reads,
    /// [`CONFIRM_READ_GAP`] apart, each counting as one more answer (`guard.rs`). A source
    /// without direct reads waits for `confirm_window` as before.
    fn ask_confirmations(&mut self) {
        let new: Vec<(usize, String)> = self
            .held
            .keys()
            .filter(|k| !self.confirming.contains(*k))
            .cloned()
            .collect();
        for key in new {
            let mut asked = false;
            for n in 1..=CONFIRM_READS {
                asked |= self.ask(key.0, &key.1, ReadWhy::Confirm, CONFIRM_READ_GAP * n, None);
            }
            if asked {
                tracing::info!(service = %key.1, reads = CONFIRM_READS, "asking the registry to confirm a held update");
            }
            self.confirming.insert(key);
        }
        let held = &self.held;
        self.confirming.retain(|k| held.contains_key(k));
    }

    /// Reads every service each source has back from it (the resync timer).
    fn resync(&mut self, slots: &Arc<tokio::sync::Semaphore>) {
        let mut asked = 0;
        for (service, by_source) in &self.services {
            for &source in by_source.keys() {
                if !self.held.contains_key(&(source, service.clone()))
                    && self.ask(
                        source,
                        service,
                        ReadWhy::Resync,
                        Duration::ZERO,
                        Some(slots.clone()),
                    )
                {
                    asked += 1;
                }
            }
        }
        tracing::debug!(
            services = asked,
            "resync: reading every watched service again"
        );
    }

    /// A direct read answered: a resync that differs from the pushed view corrects it (logged
    /// and counted); a confirming read counts as one more answer for a held update. Answers
    /// the watch has overtaken since they were asked are dropped.
    fn read_done(&mut self, done: ReadDone) -> Dirty {
        let mut dirty = Dirty::new();
        let kind = self.state.sources.get(done.source).map_or("", |s| s.kind);
        let instances = match done.result {
            Ok(i) => i,
            Err((ek, message)) => {
                tracing::debug!(source = kind, service = %done.service, error = %message, kind = %ek, "direct read failed");
                return dirty;
            }
        };
        if done.version != self.version(done.source, &done.service) {
            tracing::debug!(source = kind, service = %done.service, "direct read overtaken by the watch: dropped");
            // A confirming read is asked again: the hold would otherwise wait for its whole
            // window because the watch happened to answer while the reads were out.
            if done.why == ReadWhy::Confirm
                && self.held.contains_key(&(done.source, done.service.clone()))
            {
                self.ask(
                    done.source,
                    &done.service,
                    ReadWhy::Confirm,
                    CONFIRM_READ_GAP,
                    None,
                );
            }
            return dirty;
        }
        let key = (done.source, done.service);
        match done.why {
            ReadWhy::Confirm => {
                if !self.held.contains_key(&key) {
                    return dirty;
                }
            }
            ReadWhy::Resync => {
                let mut sorted = instances.clone();
                if let Some(s) = sorted.as_mut() {
                    s.sort();
                }
                let current = self.services.get(&key.1).and_then(|m| m.get(&key.0));
                if current == sorted.as_ref() || self.held.contains_key(&key) {
                    return dirty;
                }
                metrics::counter!(m::RESYNC_CORRECTIONS, "source" => kind).increment(1);
                tracing::warn!(
                    source = kind,
                    service = %key.1,
                    pushed = current.map_or(0, Vec::len),
                    read = sorted.as_ref().map_or(0, Vec::len),
                    "resync: the registry differs from what its watch pushed; correcting"
                );
            }
        }
        self.set(key.0, key.1, instances, &mut dirty);
        self.services.retain(|_, set| !set.is_empty());
        dirty
    }

    /// Shows what the guard holds now in `State::held` for the admin API (nothing is stored
    /// when nothing is held and nothing was).
    fn publish_held(&self) {
        if self.held.is_empty() && self.state.held.load().is_empty() {
            return;
        }
        let guard = &self.tables.dynamic.guard;
        let mut views: crate::state::HeldByService = HashMap::new();
        for ((source, service), h) in &self.held {
            let current = self
                .services
                .get(service)
                .and_then(|m| m.get(source))
                .map_or(&[][..], Vec::as_slice);
            views
                .entry(service.clone())
                .or_default()
                .add(h, guard, current);
        }
        if **self.state.held.load() != views {
            self.state.held.store(Arc::new(views));
        }
    }

    /// Applies held updates whose confirmation window has passed.
    pub fn release_held(&mut self, now_ms: u64) -> Dirty {
        let guard = self.tables.dynamic.guard.clone();
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

    pub fn reload(&mut self, dynamic: Dynamic) {
        if dynamic == self.tables.dynamic {
            tracing::info!("configuration reloaded: no change");
            return;
        }
        self.tables.dynamic = dynamic;
        self.rebuild(None);
        tracing::info!("configuration reloaded");
    }

    /// Rebuilds the upstreams using `dirty` services (all when `None`) and publishes the table.
    pub fn rebuild(&mut self, dirty: Option<&Dirty>) {
        self.tables.rebuild(&self.services, dirty);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(port: u16) -> Instance {
        Instance::new("127.0.0.1", port)
    }

    fn cache() -> Cache {
        let state = State::new(vec![SourceStatus::new("file", "file://x".into())]);
        Cache::new(
            state,
            Dynamic {
                guard: crate::guard::GuardConfig {
                    enabled: false,
                    ..Default::default()
                },
                ..Default::default()
            },
        )
    }

    fn full_answer(services: &[(&str, &[u16])]) -> Event {
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
    fn a_catalog_answer_makes_stale_only_the_reads_of_services_it_drops() {
        let mut c = cache();
        for svc in ["a", "b"] {
            step(
                &mut c,
                Event::Service {
                    service: svc.into(),
                    update: Update::Reset(vec![inst(1)]),
                },
            );
        }
        let (a, b) = (c.version(0, "a"), c.version(0, "b"));
        // Consul's catalog answers right after a removal: a read asked to confirm it must
        // still count.
        step(&mut c, Event::Catalog(vec!["a".into(), "b".into()]));
        assert_eq!((c.version(0, "a"), c.version(0, "b")), (a, b));
        step(&mut c, Event::Catalog(vec!["a".into()]));
        assert_eq!(c.version(0, "a"), a);
        assert_ne!(c.version(0, "b"), b, "a read of a dropped service is stale");
        step(&mut c, full_answer(&[("a", &[1])]));
        assert_ne!(c.version(0, "a"), a, "a snapshot overtakes every read");
    }

    #[test]
    fn same_answer_changes_nothing_and_keeps_the_snapshot() {
        let mut c = cache();
        assert!(!c.state.ready());
        step(&mut c, full_answer(&[("a", &[1, 2])]));
        assert!(c.state.ready());
        let before = c.state.table.load_full();
        assert!(step(&mut c, full_answer(&[("a", &[2, 1])])).is_empty());
        assert!(Arc::ptr_eq(&before, &c.state.table.load_full()));
    }

    #[test]
    fn one_addition_keeps_the_other_endpoints_state() {
        let mut c = cache();
        let ports: Vec<u16> = (1..=20).collect();
        step(&mut c, full_answer(&[("a", &ports), ("b", &[99])]));
        let t1 = c.state.table.load_full();
        let b1 = t1.upstreams["b"].clone();
        let states1: Vec<_> = t1.upstreams["a"]
            .endpoints
            .iter()
            .map(|e| e.state.clone())
            .collect();
        let mut more = ports.clone();
        more.push(21);
        step(&mut c, full_answer(&[("a", &more), ("b", &[99])]));
        let t2 = c.state.table.load_full();
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
        step(&mut c, full_answer(&[("a", &[1]), ("b", &[2])]));
        step(&mut c, full_answer(&[("a", &[1])]));
        assert!(!c.state.table.load().upstreams.contains_key("b"));
        step(
            &mut c,
            Event::Service {
                service: "a".into(),
                update: Update::Add(vec![inst(3)]),
            },
        );
        assert_eq!(c.state.table.load().upstreams["a"].endpoints.len(), 2);
        step(
            &mut c,
            Event::Service {
                service: "a".into(),
                update: Update::Remove(vec!["127.0.0.1:1".into()]),
            },
        );
        let t = c.state.table.load();
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
        step(&mut c, full_answer(&[("a", &[1, 2, 3])]));
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
            let table = c.state.table.load();
            let live = table.upstreams.get("a").map_or(0, |u| u.endpoints.len());
            assert_eq!(live, model.len(), "after delta {n}: the table follows");
        }
    }

    #[test]
    fn a_delta_that_removes_most_of_a_service_is_held_like_a_full_answer() {
        let mut c = guarded();
        step(&mut c, full_answer(&[("a", &[1, 2, 3, 4])]));
        let remove = |ids: &[u16]| Event::Service {
            service: "a".into(),
            update: Update::Remove(ids.iter().map(|p| inst(*p).id).collect()),
        };
        // Half goes at once (the guard's limit is more than half).
        assert!(!step(&mut c, remove(&[1, 2])).is_empty());
        assert_eq!(c.state.table.load().upstreams["a"].endpoints.len(), 2);
        // Removing the rest is held, as a full answer without them would be.
        assert!(step(&mut c, remove(&[3, 4])).is_empty());
        assert_eq!(c.state.table.load().upstreams["a"].endpoints.len(), 2);
        assert!(!c.held.is_empty());
    }

    fn guarded() -> Cache {
        let mut c = cache();
        c.tables.dynamic.guard = crate::guard::GuardConfig {
            confirm_answers: 3,
            confirm_window: Duration::from_secs(30),
            ..Default::default()
        };
        c
    }

    #[test]
    fn the_guard_holds_mass_removal_until_three_identical_answers() {
        let mut c = guarded();
        step(&mut c, full_answer(&[("a", &[1, 2, 3, 4])]));
        // Removing half applies at once.
        assert!(!step(&mut c, full_answer(&[("a", &[1, 2])])).is_empty());
        // Removing the rest, or the whole service, is held…
        for _ in 0..2 {
            assert!(step(&mut c, full_answer(&[])).is_empty());
            assert_eq!(c.state.table.load().upstreams["a"].endpoints.len(), 2);
        }
        // …until the third identical answer.
        assert!(!step(&mut c, full_answer(&[])).is_empty());
        assert!(!c.state.table.load().upstreams.contains_key("a"));
    }

    #[test]
    fn the_guard_releases_by_window_and_a_sane_answer_replaces_a_held_one() {
        let mut c = guarded();
        step(&mut c, full_answer(&[("a", &[1, 2, 3]), ("b", &[1, 2, 3])]));
        assert!(step(&mut c, full_answer(&[("a", &[1]), ("b", &[1])])).is_empty());
        // A sane answer for b replaces its held one.
        assert!(!step(&mut c, full_answer(&[("a", &[1]), ("b", &[1, 2])])).is_empty());
        assert_eq!(c.state.table.load().upstreams["b"].endpoints.len(), 2);
        assert_eq!(
            c.state.table.load().upstreams["a"].endpoints.len(),
            3,
            "a still held"
        );
        let now = clock::now_ms();
        assert!(c.release_held(now + 29_000).is_empty());
        let d = c.release_held(now + 31_000);
        c.rebuild(Some(&d));
        assert_eq!(c.state.table.load().upstreams["a"].endpoints.len(), 1);
    }

    #[test]
    fn opted_out_services_are_never_held() {
        let mut c = guarded();
        c.tables.dynamic.guard.opt_out = vec!["a".into()];
        step(&mut c, full_answer(&[("a", &[1, 2, 3])]));
        assert!(!step(&mut c, full_answer(&[])).is_empty());
        assert!(!c.state.table.load().upstreams.contains_key("a"));
    }

    #[test]
    fn errors_keep_the_last_good_view() {
        let mut c = cache();
        step(&mut c, full_answer(&[("a", &[1])]));
        let d = step(
            &mut c,
            Event::Error {
                kind: discovery::ErrorKind::Parse,
                message: "garbage".into(),
            },
        );
        assert!(d.is_empty());
        assert_eq!(c.state.table.load().upstreams["a"].endpoints.len(), 1);
        assert_eq!(
            c.state.sources[0].last_error.lock().unwrap().as_deref(),
            Some("garbage")
        );
    }
}
