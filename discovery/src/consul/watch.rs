//! The watch tasks: one blocking health query per watched service, the catalog query, and the
//! run loop that starts, stops and gates them.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::task::{AbortHandle, JoinSet};

use super::api::{next_index, parse_catalog, parse_health, Answer};
use super::*;
use crate::http::Failure;
use crate::{ErrorKind, Event, Update};

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(BACKOFF_MIN)
        .with_max_delay(BACKOFF_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The run loop's view of one watched name.
struct Watch {
    /// Generation of the cache entry (0 for `service=` names, which never idle out).
    generation: u64,
    task: Option<Running>,
}

/// A running health watch: its task, and the gate its answers pass through.
///
/// The run loop stops a watch (its service left the catalog, or it idled out) and then reports
/// the service gone. Aborting alone cannot order the two: a task on another worker thread may be
/// in the middle of sending its last answer, which would land after `NotFound` and bring the
/// service back with whatever that answer held (seen: an empty set that answered 503 instead of
/// 404, for good). The task sends while holding the gate, and the run loop closes the gate
/// before it aborts, so nothing from a stopped watch follows the stop.
struct Running {
    abort: AbortHandle,
    gate: Gate,
}

impl Running {
    /// Closes the gate (waiting out a send in progress) and aborts the task.
    async fn stop(&self) {
        self.gate.close().await;
        self.abort.abort();
    }
}

/// Lets a watch's answers through until closed; see [`Running`].
#[derive(Clone)]
struct Gate(Arc<tokio::sync::Mutex<bool>>);

impl Gate {
    fn new() -> Gate {
        Gate(Arc::new(tokio::sync::Mutex::new(true)))
    }

    /// Sends `event` unless the gate is closed; `false` when closed or the agent is gone.
    async fn send(&self, sink: &Sink, event: Event) -> bool {
        let open = self.0.lock().await;
        *open && sink.send(event).await
    }

    /// Closes the gate; returns once a send in progress has finished.
    async fn close(&self) {
        *self.0.lock().await = false;
    }
}

impl ConsulDiscovery {
    /// Watches one service's passing instances until aborted or the sink closes.
    async fn watch_service(self: Arc<Self>, name: String, sink: Sink, gate: Gate) {
        /// Counts the watch in `watching` for as long as it runs (abort included).
        struct Counted<'a>(&'a AtomicUsize);
        impl Drop for Counted<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.watching.fetch_add(1, Ordering::Relaxed);
        let _counted = Counted(&self.watching);
        let mut index = 0u64;
        let mut delays = backoff();
        let mut failing = false;
        loop {
            let started = Instant::now();
            match self
                .get(&["v1", "health", "service", &name], index, true)
                .await
            {
                Ok(answer) => {
                    delays = backoff();
                    if failing {
                        tracing::info!(service = %name, "consul health watch answering again");
                        failing = false;
                    }
                    let next = next_index(index, answer.index);
                    match parse_health(&answer.body) {
                        Ok((instances, problems)) => {
                            tracing::debug!(service = %name, index = next, instances = instances.len(), "consul health answer");
                            let ev = Event::Service {
                                service: name.clone(),
                                update: Update::Reset(instances),
                            };
                            if !gate.send(&sink, ev).await {
                                return;
                            }
                            for p in problems {
                                sink.error(ErrorKind::Parse, format!("consul service {name}: {p}"))
                                    .await;
                            }
                            if let Some(note) = answer.acl {
                                sink.error(
                                    ErrorKind::Auth,
                                    format!("consul service {name}: {note}"),
                                )
                                .await;
                            }
                        }
                        Err(e) => {
                            // A well-formed HTTP answer with the wrong shape: keep the last set,
                            // start over from 0 after a back-off.
                            sink.error(ErrorKind::Parse, format!("consul service {name}: {e}"))
                                .await;
                            index = 0;
                            tokio::time::sleep(delays.next().unwrap_or(BACKOFF_MAX)).await;
                            continue;
                        }
                    }
                    if next == index && started.elapsed() < MIN_UNCHANGED_INTERVAL {
                        tokio::time::sleep(MIN_UNCHANGED_INTERVAL - started.elapsed()).await;
                    }
                    index = next;
                }
                Err(f) => {
                    failing = true;
                    index = 0;
                    if !sink.error(f.kind, f.message).await {
                        return;
                    }
                    tokio::time::sleep(delays.next().unwrap_or(BACKOFF_MAX)).await;
                }
            }
            if sink.tx.is_closed() {
                return;
            }
        }
    }

    /// One catalog call from `index`, after `delay`.
    async fn catalog_call(self: Arc<Self>, index: u64, delay: Duration) -> Result<Answer, Failure> {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.get(&["v1", "catalog", "services"], index, false).await
    }

    fn start_task(self: &Arc<Self>, tasks: &mut JoinSet<()>, name: &str, sink: &Sink) -> Running {
        tracing::info!(service = %name, "consul: watching service");
        let gate = Gate::new();
        let abort = tasks.spawn(self.clone().watch_service(
            name.to_string(),
            sink.clone(),
            gate.clone(),
        ));
        Running { abort, gate }
    }

    pub(super) async fn run_loop(self: Arc<Self>, sink: Sink) {
        let Some(mut cmds) = self.cmd_rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            sink.error(ErrorKind::Io, "consul source is already running")
                .await;
            return;
        };
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut watches: HashMap<String, Watch> = HashMap::new();
        for name in &self.pinned {
            let task = Some(self.start_task(&mut tasks, name, &sink));
            watches.insert(
                name.clone(),
                Watch {
                    generation: 0,
                    task,
                },
            );
        }
        let mut tick = tokio::time::interval(HOUSEKEEPING_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut index = 0u64;
        let mut delays = backoff();
        let mut call_started = Instant::now();
        let mut call = Box::pin(self.clone().catalog_call(0, Duration::ZERO));
        loop {
            tokio::select! {
                res = &mut call => {
                    let mut delay = Duration::ZERO;
                    let parsed = res.and_then(|a| {
                        parse_catalog(&a.body)
                            .map(|names| (names, a.index, a.acl))
                            .map_err(|e| Failure { kind: ErrorKind::Parse, message: format!("consul catalog: {e}") })
                    });
                    match parsed {
                        Ok((names, got, acl)) => {
                            delays = backoff();
                            let next = next_index(index, got);
                            tracing::debug!(index = next, services = names.len(), "consul catalog answer");
                            let set: HashSet<String> = names.iter().cloned().collect();
                            *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = Some(set.clone());
                            if !sink.send(Event::Catalog(names)).await {
                                break;
                            }
                            if let Some(note) = acl {
                                sink.error(ErrorKind::Auth, format!("consul catalog: {note}")).await;
                            }
                            // Start waiting watches whose service appeared; pause those whose
                            // service left.
                            for (name, w) in watches.iter_mut() {
                                match (set.contains(name), &w.task) {
                                    (true, None) => w.task = Some(self.start_task(&mut tasks, name, &sink)),
                                    (false, Some(t)) => {
                                        t.stop().await;
                                        w.task = None;
                                        tracing::info!(service = %name, "consul: service left the catalog");
                                        sink.send(Event::Service { service: name.clone(), update: Update::NotFound }).await;
                                    }
                                    _ => {}
                                }
                            }
                            if next == index && call_started.elapsed() < MIN_UNCHANGED_INTERVAL {
                                delay = MIN_UNCHANGED_INTERVAL - call_started.elapsed();
                            }
                            index = next;
                        }
                        Err(f) => {
                            index = 0;
                            if !sink.error(f.kind, f.message).await {
                                break;
                            }
                            delay = delays.next().unwrap_or(BACKOFF_MAX);
                        }
                    }
                    call_started = Instant::now() + delay;
                    call = Box::pin(self.clone().catalog_call(index, delay));
                }
                Some(cmd) = cmds.recv() => match cmd {
                    Cmd::Want { name, generation } => {
                        let present = self.catalog_contains(&name).unwrap_or(true);
                        let w = watches.entry(name.clone()).or_insert(Watch { generation, task: None });
                        if w.generation != 0 {
                            w.generation = generation;
                        }
                        if w.task.is_none() && present {
                            w.task = Some(self.start_task(&mut tasks, &name, &sink));
                        }
                    }
                    Cmd::Idle { name, generation } => {
                        if let Some(w) = watches.get(&name) {
                            if w.generation == generation && generation != 0 {
                                let had_task = w.task.is_some();
                                if let Some(t) = &w.task {
                                    t.stop().await;
                                }
                                watches.remove(&name);
                                if had_task {
                                    tracing::info!(service = %name, ttl = ?self.idle_ttl, "consul: watch idle, stopped");
                                    if !sink.send(Event::Service { service: name, update: Update::NotFound }).await {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = tick.tick() => {
                    self.wanted.run_pending_tasks();
                    if sink.tx.is_closed() {
                        break;
                    }
                }
            }
        }
        tasks.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    use tokio::sync::mpsc;

    use super::*;
    use crate::consul::url::tests::src;
    use crate::{Instance, Sink};

    fn answer(service: &str, n: usize) -> Event {
        let instances = (0..n)
            .map(|i| Instance::new("127.0.0.1", 9000 + i as u16))
            .collect();
        Event::Service {
            service: service.to_string(),
            update: Update::Reset(instances),
        }
    }

    /// The stop of a watch orders against its answers: an answer being sent when the watch is
    /// stopped arrives before the stop's `NotFound`, and nothing the watch sends afterwards
    /// arrives at all (CI once saw an empty answer land after `NotFound`: 503 for good where
    /// the service had gone and 404 was due).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_watch_sends_nothing_after_the_stop() {
        fn label(ev: Event) -> String {
            match ev {
                Event::Catalog(_) => "catalog".to_string(),
                Event::Service {
                    update: Update::Reset(v),
                    ..
                } => format!("reset {}", v.len()),
                Event::Service {
                    update: Update::NotFound,
                    ..
                } => "not found".to_string(),
                _ => "other".to_string(),
            }
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let sink = Sink::new(0, tx);
        // A full channel, so the watch's first send blocks while it holds the gate.
        assert!(sink.send(Event::Catalog(vec![])).await);
        let gate = Gate::new();
        let (go, next_answer) = tokio::sync::oneshot::channel::<()>();
        let (watch_gate, watch_sink) = (gate.clone(), sink.clone());
        let watch = tokio::spawn(async move {
            let first = watch_gate.send(&watch_sink, answer("web", 0)).await;
            next_answer.await.unwrap();
            let second = watch_gate.send(&watch_sink, answer("web", 1)).await;
            (first, second)
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while gate.0.try_lock().is_ok() {
            assert!(Instant::now() < deadline, "the watch never took the gate");
            tokio::task::yield_now().await;
        }
        let mut closing = tokio::spawn(async move { gate.close().await });
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut closing)
                .await
                .is_err(),
            "close waits for the send in progress"
        );
        let mut recv = async || {
            let (_, ev) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("an event within 5 s")
                .expect("channel open");
            label(ev)
        };
        assert_eq!(recv().await, "catalog");
        assert_eq!(recv().await, "reset 0");
        tokio::time::timeout(Duration::from_secs(5), closing)
            .await
            .expect("close returns once the send is done")
            .unwrap();
        let gone = Event::Service {
            service: "web".into(),
            update: Update::NotFound,
        };
        assert!(sink.send(gone).await);
        go.send(()).unwrap();
        assert_eq!(
            watch.await.unwrap(),
            (true, false),
            "the later answer is refused"
        );
        assert_eq!(recv().await, "not found");
        drop(sink);
        assert!(rx.recv().await.is_none(), "nothing after the stop");
    }

    /// One request the scripted server saw: path and query.
    type Seen = Arc<Mutex<Vec<String>>>;

    /// What the scripted server answers: status, index, body; `None` holds the request open.
    type Script = Arc<dyn Fn(&str, &str) -> Option<(u16, u64, String)> + Send + Sync>;

    /// A minimal HTTP/1.1 server on loopback answering from `script`, recording requests.
    async fn scripted(script: Script) -> (u16, Seen) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Seen = Arc::default();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (script, seen) = (script.clone(), seen2.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end);
                        let target = head.split(' ').nth(1).unwrap_or("").to_string();
                        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                        seen.lock().unwrap().push(target.clone());
                        let Some((status, index, body)) = script(path, query) else {
                            std::future::pending::<()>().await;
                            return;
                        };
                        let resp = format!(
                            "HTTP/1.1 {status} X\r\nX-Consul-Index: {index}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if conn.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, seen)
    }

    fn entry(port: u16) -> String {
        format!(
            r#"{{"Node":{{"Node":"n","Address":"127.0.0.1"}},"Service":{{"ID":"web-{port}","Service":"web","Port":{port}}}}}"#
        )
    }

    async fn next_event(rx: &mut mpsc::Receiver<(usize, Event)>) -> Event {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event within 10 s")
            .expect("sink open")
            .1
    }

    /// The next event about `service`, skipping catalog events.
    async fn next_for(rx: &mut mpsc::Receiver<(usize, Event)>, service: &str) -> Event {
        loop {
            match next_event(rx).await {
                Event::Catalog(_) => continue,
                Event::Service { service: s, .. } if s != service => continue,
                ev => return ev,
            }
        }
    }

    fn ports(ev: &Event) -> Vec<u16> {
        match ev {
            Event::Service {
                update: Update::Reset(set),
                ..
            } => set.iter().map(|i| i.port).collect(),
            other => panic!("expected a reset, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn blocking_query_index_rules_and_errors() {
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let script: Script = Arc::new(move |path, query| {
            if path == "/v1/catalog/services" {
                return (!query.contains("index=")).then(|| (200, 10, r#"{"web":[]}"#.into()));
            }
            let n = c.fetch_add(1, Ordering::SeqCst);
            match n {
                0 => Some((200, 5, format!("[{}]", entry(1)))),
                1 => Some((500, 0, "boom".into())),
                2 => Some((200, 7, format!("[{},{}]", entry(1), entry(2)))),
                3 => Some((200, 3, format!("[{}]", entry(2)))),
                4 => Some((200, 4, "not json".into())),
                5 => Some((200, 0, format!("[{}]", entry(1)))),
                6 => Some((200, 9, format!("[{}]", entry(1)))),
                _ => None,
            }
        });
        let (port, seen) = scripted(script).await;
        let src = Arc::new(src(&format!("consul://127.0.0.1:{port}?wait=2s&tag=t1"), &[]).unwrap());
        let (tx, mut rx) = mpsc::channel(64);
        assert!(src.watch("Web"));
        tokio::spawn(src.clone().run(Sink::new(0, tx)));
        assert_eq!(ports(&next_for(&mut rx, "web").await), vec![1]);
        assert!(matches!(
            next_for(&mut rx, "web").await,
            Event::Error {
                kind: ErrorKind::Status,
                ..
            }
        ));
        assert_eq!(ports(&next_for(&mut rx, "web").await), vec![1, 2]);
        assert_eq!(ports(&next_for(&mut rx, "web").await), vec![2]);
        assert!(matches!(
            next_for(&mut rx, "web").await,
            Event::Error {
                kind: ErrorKind::Parse,
                ..
            }
        ));
        assert_eq!(ports(&next_for(&mut rx, "web").await), vec![1]);
        assert_eq!(ports(&next_for(&mut rx, "web").await), vec![1]);
        // Unknown names are refused once the catalog is known.
        assert!(!src.watch("nope"));
        let health: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.starts_with("/v1/health/service/web"))
            .cloned()
            .collect();
        let index_of = |t: &String| {
            t.split(['?', '&'])
                .find_map(|kv| kv.strip_prefix("index="))
                .map(String::from)
        };
        let indexes: Vec<Option<String>> = health.iter().take(7).map(index_of).collect();
        let want: Vec<Option<String>> = [None, Some("5"), None, Some("7"), None, None, Some("1")]
            .iter()
            .map(|o| o.map(String::from))
            .collect();
        // Error → 0; backwards (7 → 3) → 0; 0 → 1.
        assert_eq!(indexes, want, "{health:#?}");
        assert!(
            health[1].contains("passing=true")
                && health[1].contains("tag=t1")
                && health[1].contains("wait=2000ms"),
            "{}",
            health[1]
        );
    }

    /// With `server=` listed, a server that refuses connections is an error naming the next
    /// one, and every call moves on to it; the liveness check answers while any server does.
    #[tokio::test]
    async fn a_failed_server_moves_calls_to_the_next() {
        let script: Script = Arc::new(|path, query| match path {
            "/v1/catalog/services" if !query.contains("index=") => {
                Some((200, 10, r#"{"web":[]}"#.into()))
            }
            "/v1/health/service/web" if !query.contains("index=") => {
                Some((200, 5, format!("[{}]", entry(7))))
            }
            "/v1/status/leader" => Some((200, 1, r#""127.0.0.1:8300""#.into())),
            _ => None,
        });
        let (live, _) = scripted(script).await;
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("consul://127.0.0.1:{dead}?server=127.0.0.1:{live}&wait=2s");
        let src = Arc::new(src(&url, &[]).unwrap());
        assert_eq!(src.base(), format!("http://127.0.0.1:{dead}"));
        let (tx, mut rx) = mpsc::channel(64);
        assert!(src.watch("web"));
        tokio::spawn(src.clone().run(Sink::new(0, tx)));
        let mut errors = Vec::new();
        let set = loop {
            match next_event(&mut rx).await {
                Event::Error { kind, message } => errors.push((kind, message)),
                ev @ Event::Service { .. } => break ev,
                Event::Catalog(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(ports(&set), vec![7]);
        assert_eq!(src.base(), format!("http://127.0.0.1:{live}"));
        let next = format!("trying 127.0.0.1:{live} next");
        assert!(
            !errors.is_empty()
                && errors
                    .iter()
                    .all(|(k, m)| *k == ErrorKind::Connect && m.contains(&next)),
            "{errors:?}"
        );
        assert!(src.clone().liveness().unwrap().await.is_ok());
    }

    #[tokio::test]
    async fn on_demand_watches_start_idle_out_and_wait_for_the_catalog() {
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = released.clone();
        let script: Script = Arc::new(move |path, query| match path {
            "/v1/catalog/services" if !query.contains("index=") => {
                Some((200, 10, r#"{"web":[]}"#.into()))
            }
            "/v1/catalog/services" if query.contains("index=10") && r.load(Ordering::SeqCst) => {
                Some((200, 11, r#"{"web":[],"later":[]}"#.into()))
            }
            "/v1/catalog/services" if query.contains("index=10") => {
                Some((200, 10, r#"{"web":[]}"#.into()))
            }
            "/v1/health/service/web" if !query.contains("index=") => {
                Some((200, 5, format!("[{}]", entry(1))))
            }
            "/v1/health/service/later" if !query.contains("index=") => {
                Some((200, 5, format!("[{}]", entry(3))))
            }
            _ => None,
        });
        let (port, seen) = scripted(script).await;
        let src = Arc::new(src(&format!("consul://127.0.0.1:{port}?idle_ttl=1s"), &[]).unwrap());
        assert!(src.on_demand());
        let (tx, mut rx) = mpsc::channel(64);
        tokio::spawn(src.clone().run(Sink::new(0, tx)));
        assert_eq!(
            next_event(&mut rx).await,
            Event::Catalog(vec!["web".into()])
        );
        assert!(src.watch("web"));
        assert_eq!(ports(&next_for(&mut rx, "web").await), vec![1]);
        // Absent: refused, remembered, started once the catalog lists it. Until then the
        // catalog query returns unchanged at once, which the spin guard paces.
        assert!(!src.watch("later"));
        released.store(true, Ordering::SeqCst);
        assert_eq!(ports(&next_for(&mut rx, "later").await), vec![3]);
        // Not touched again: both idle out and are reported gone.
        let mut gone = Vec::new();
        while gone.len() < 2 {
            if let Event::Service {
                service,
                update: Update::NotFound,
            } = next_event(&mut rx).await
            {
                gone.push(service);
            }
        }
        gone.sort();
        assert_eq!(gone, vec!["later", "web"]);
        let n = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.starts_with("/v1/health/service/web"))
            .count();
        assert_eq!(
            n,
            2,
            "one fetch, one blocking query: {:?}",
            seen.lock().unwrap()
        );
    }
}
