//! The file registry: a TOML file listing services and their instances, watched for changes.
//!
//! ```toml
//! [[service]]
//! name = "hello"
//! instances = [
//!   { addr = "127.0.0.1:8081", weight = 3, zone = "a", metadata = { version = "2" } },
//!   { addr = "127.0.0.1:8082" },
//! ]
//! ```
//!
//! The file's directory is watched (editors replace files by rename, so watching the file itself
//! misses changes); every event re-reads the file after a short debounce, and a slow poll backs
//! the watcher up on file systems where notifications are lost. Each read that parses yields one
//! [`Event::Snapshot`], which the agent diffs against what it has.
//!
//! Mapping: identity `id`, else `addr`; `weight` (default [`DEFAULT_WEIGHT`]); `healthy`
//! (default true); `zone` as the instance's zone (an empty one counts as none); `metadata` as
//! given, the keys subsets select on (`subset = { version = "2" }`); no keys are added.
//!
//! Bad input: a file that cannot be read or is not valid TOML (or has an unknown field, or the
//! same service twice) is refused whole with an error naming the line and field, and the last
//! good view stays. A single bad *instance* (an address that does not parse, say) is skipped with
//! an error naming the service, the instance and the field, and the rest of the service stays
//! routable: one malformed entry never takes a service down.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::{BoxFuture, Discovery, ErrorKind, Event, Instance, Sink, SourceError, DEFAULT_WEIGHT};

/// Quiet time after a change notification before the file is re-read, so an editor's
/// truncate-then-write is read once, whole.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// Re-read interval when no notification arrives (lost events, network file systems).
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// A source reading services from one TOML file.
#[derive(Debug)]
pub struct FileDiscovery {
    path: PathBuf,
}

impl FileDiscovery {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileDiscovery { path: path.into() }
    }

    /// From `file:///abs/path.toml` or `file://relative/path.toml`.
    pub fn from_url(url: &str) -> Result<Self, SourceError> {
        let path = url.strip_prefix("file://").unwrap_or(url);
        if path.is_empty() {
            return Err(SourceError::Invalid {
                url: url.to_string(),
                reason: "no file path after file://".into(),
            });
        }
        Ok(FileDiscovery::new(path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    service: Vec<RawService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    #[serde(default)]
    instances: Vec<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    addr: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    healthy: Option<bool>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// The result of parsing a file: the services, and the entries that were skipped.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    pub services: BTreeMap<String, Vec<Instance>>,
    /// One message per skipped instance, naming service, position, field and value.
    pub skipped: Vec<String>,
}

/// Parses a services file. `Err` (with line and column) when the file as a whole is invalid.
pub fn parse(text: &str) -> Result<Parsed, String> {
    let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut parsed = Parsed::default();
    for svc in raw.service {
        let name = svc.name.trim().to_string();
        if name.is_empty() || !name.chars().all(valid_name_char) {
            return Err(format!(
                "service name {:?}: use letters, digits, '-', '_' and '.'",
                svc.name
            ));
        }
        if parsed.services.contains_key(&name) {
            return Err(format!("service {name:?} is listed twice"));
        }
        let mut instances = Vec::with_capacity(svc.instances.len());
        for (i, value) in svc.instances.into_iter().enumerate() {
            match instance(value) {
                Ok(inst) => instances.push(inst),
                Err(e) => parsed
                    .skipped
                    .push(format!("service {name:?} instance #{}: {e}", i + 1)),
            }
        }
        instances.sort();
        instances.dedup_by(|a, b| a.id == b.id);
        parsed.services.insert(name, instances);
    }
    Ok(parsed)
}

fn valid_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn instance(value: toml::Value) -> Result<Instance, String> {
    let raw = RawInstance::deserialize(value).map_err(|e| e.to_string().trim().to_string())?;
    let addr: SocketAddr = raw
        .addr
        .parse()
        .map_err(|_| format!("addr = {:?}: expected ip:port", raw.addr))?;
    if addr.port() == 0 {
        return Err(format!("addr = {:?}: port 0", raw.addr));
    }
    let host = addr.ip().to_string();
    let mut inst = Instance::new(host, addr.port());
    if let Some(id) = raw.id {
        inst.id = id;
    }
    inst.weight = raw.weight.unwrap_or(DEFAULT_WEIGHT);
    inst.healthy = raw.healthy.unwrap_or(true);
    inst.zone = raw.zone.filter(|z| !z.trim().is_empty());
    inst.metadata = raw.metadata;
    // Always passes after the `ip:port` parse above; kept so every adapter admits instances
    // through the same check.
    crate::check_instance(&inst).map_err(|e| e.to_string())?;
    Ok(inst)
}

impl FileDiscovery {
    /// Reads and parses the file once, reporting problems to the sink. `Some` on success.
    async fn load(&self, sink: &Sink) -> Option<BTreeMap<String, Vec<Instance>>> {
        let text = match tokio::fs::read_to_string(&self.path).await {
            Ok(t) => t,
            Err(e) => {
                sink.error(
                    ErrorKind::Io,
                    format!("file registry {}: {e}", self.path.display()),
                )
                .await;
                return None;
            }
        };
        match parse(&text) {
            Ok(parsed) => {
                for msg in parsed.skipped {
                    sink.error(
                        ErrorKind::Parse,
                        format!("file registry {}: skipped {msg}", self.path.display()),
                    )
                    .await;
                }
                Some(parsed.services)
            }
            Err(e) => {
                sink.error(
                    ErrorKind::Parse,
                    format!(
                        "file registry {}: {e}; keeping the last good view",
                        self.path.display()
                    ),
                )
                .await;
                None
            }
        }
    }

    fn watch_dir(&self, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
        let name = self.path.file_name()?.to_owned();
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                if is_change(&ev.kind) && ev.paths.iter().any(|p| p.file_name() == Some(&name)) {
                    let _ = tx.try_send(());
                }
            }
        })
        .map_err(|e| tracing::warn!(error = %e, "file watcher unavailable; polling only"))
        .ok()?;
        if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; polling only");
            return None;
        }
        Some(watcher)
    }
}

/// Whether a notification may mean new contents. Opening and reading the file are not changes:
/// counting them made every read trigger the next one (a re-read loop at the debounce rate).
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

impl Discovery for FileDiscovery {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn describe(&self) -> String {
        format!("file://{}", self.path.display())
    }

    fn run(self: Arc<Self>, sink: Sink) -> BoxFuture {
        Box::pin(async move {
            let (tx, mut rx) = mpsc::channel(1);
            let _watcher = self.watch_dir(tx);
            loop {
                // Every good read is sent, changed or not: the agent diffs it (cheaply) and the
                // answer keeps the source's staleness honest.
                if let Some(services) = self.load(&sink).await {
                    if !sink.send(Event::Snapshot(services)).await {
                        return;
                    }
                }
                // Wait for a notification (then let the writer finish) or the poll interval.
                if let Ok(Some(())) = tokio::time::timeout(POLL_INTERVAL, rx.recv()).await {
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                }
                if sink.tx.is_closed() {
                    return;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_instances_with_defaults() {
        let p = parse(
            r#"
[[service]]
name = "hello"
instances = [
  { addr = "127.0.0.1:8081", weight = 3, zone = "a", metadata = { v = "2" } },
  { addr = "[::1]:8082" },
]
"#,
        )
        .unwrap();
        let hello = &p.services["hello"];
        assert_eq!(hello.len(), 2);
        assert_eq!(hello[0].authority(), "127.0.0.1:8081");
        assert_eq!(hello[0].weight, 3);
        assert_eq!(hello[0].zone.as_deref(), Some("a"));
        assert_eq!(hello[0].metadata["v"], "2");
        assert_eq!(hello[1].authority(), "[::1]:8082");
        assert_eq!(hello[1].weight, 1);
        assert!(hello[1].healthy);
        assert!(p.skipped.is_empty());
    }

    #[test]
    fn a_bad_instance_is_skipped_and_named_the_rest_stay() {
        let p = parse(
            r#"
[[service]]
name = "hello"
instances = [{ addr = "127.0.0.1:8081" }, { addr = "not-an-address" }, { addr = "127.0.0.1:1", weight = -2 }]
"#,
        )
        .unwrap();
        assert_eq!(p.services["hello"].len(), 1);
        assert_eq!(p.skipped.len(), 2, "{:?}", p.skipped);
        assert!(p.skipped[0].contains("instance #2"), "{:?}", p.skipped);
        assert!(p.skipped[0].contains("not-an-address"), "{:?}", p.skipped);
        assert!(p.skipped[1].contains("instance #3"), "{:?}", p.skipped);
    }

    #[test]
    fn garbage_is_refused_with_a_line_number() {
        let err = parse("[[service]]\nname = \"a\"\ninstances = [ {addr = }\n").unwrap_err();
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn unknown_field_and_duplicates_are_refused_by_name() {
        let err = parse("[[service]]\nname = \"a\"\nweight = 3\n").unwrap_err();
        assert!(err.contains("weight"), "{err}");
        let err = parse("[[service]]\nname = \"a\"\n[[service]]\nname = \"a\"\n").unwrap_err();
        assert!(err.contains("twice"), "{err}");
        let err = parse("[[service]]\nname = \"a b\"\n").unwrap_err();
        assert!(err.contains("\"a b\""), "{err}");
    }

    /// A file registry of one service `a` on port 1000, watched by a running source.
    struct Watched {
        _dir: tempfile::TempDir,
        path: PathBuf,
        rx: mpsc::Receiver<(usize, Event)>,
        task: tokio::task::JoinHandle<()>,
    }

    fn watch_one_service() -> Watched {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("services.toml");
        std::fs::write(
            &path,
            "[[service]]\nname = \"a\"\ninstances = [{ addr = \"127.0.0.1:1000\" }]\n",
        )
        .unwrap();
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(Arc::new(FileDiscovery::new(&path)).run(Sink::new(0, tx)));
        Watched {
            _dir: dir,
            path,
            rx,
            task,
        }
    }

    #[tokio::test]
    async fn an_edit_is_picked_up_and_garbage_keeps_nothing_new() {
        let Watched {
            _dir,
            path,
            mut rx,
            task,
        } = watch_one_service();
        let first = next_snapshot(&mut rx).await;
        assert_eq!(first["a"][0].port, 1000);

        std::fs::write(&path, "[[service]]\nname = \"a\"\ninstances = [{ addr = ").unwrap();
        // The garbage yields an error event, never a snapshot of anything new.
        loop {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Some((_, Event::Error { kind, .. }))) => {
                    assert_eq!(kind, ErrorKind::Parse);
                    break;
                }
                Ok(Some((_, Event::Snapshot(s)))) => assert_eq!(s, first),
                other => panic!("expected a parse error, got {other:?}"),
            }
        }
        std::fs::write(
            &path,
            "[[service]]\nname = \"a\"\ninstances = [{ addr = \"127.0.0.1:2000\" }]\n",
        )
        .unwrap();
        let second = next_snapshot(&mut rx).await;
        assert_eq!(second["a"][0].port, 2000);
        task.abort();
    }

    #[test]
    fn reads_are_not_changes() {
        use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Any)));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
    }

    /// The source's own reads must not wake it: an unchanged file is read once per poll
    /// interval, not in a loop.
    #[tokio::test]
    async fn an_unchanged_file_is_not_reread_in_a_loop() {
        let Watched {
            _dir, mut rx, task, ..
        } = watch_one_service();
        next_snapshot(&mut rx).await;
        // Measurement window: a looping source answers every DEBOUNCE (50 ms), so 1 s would
        // hold ~20 answers; a quiet one holds none (POLL_INTERVAL is 5 s).
        let window = tokio::time::Instant::now() + Duration::from_secs(1);
        let mut answers = 0;
        while let Ok(Some(_)) = tokio::time::timeout_at(window, rx.recv()).await {
            answers += 1;
        }
        assert!(
            answers <= 1,
            "{answers} answers in 1 s for an unchanged file"
        );
        task.abort();
    }

    async fn next_snapshot(
        rx: &mut mpsc::Receiver<(usize, Event)>,
    ) -> BTreeMap<String, Vec<Instance>> {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Some((_, Event::Snapshot(s)))) => return s,
                Ok(Some(_)) => continue,
                other => panic!("no snapshot within 10 s: {other:?}"),
            }
        }
    }
}
