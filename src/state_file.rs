//! The state file: the disk copy of the last good view, so a restarted agent serves at once instead of
//! answering 503 until every registry has answered (and keeps serving while a registry is
//! down at start).
//!
//! The cache task writes `snapshot.json` in `EDGE_AGENT_STATE_DIR` at most every
//! [`WRITE_INTERVAL`] after a change, atomically (a temporary file in the same directory, then
//! rename). At start the agent loads it before any source runs: each source's services are
//! matched by the source's URL (secrets removed), so a snapshot of another registry is never
//! served. Loaded services count as stale: the source is not "answered" (`/ready` stays 503) and
//! its staleness counts from when the snapshot was written. The source's first real answer
//! replaces them. A missing snapshot is normal; a corrupt or unreadable one is logged and
//! ignored, never fatal.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use discovery::Instance;
use serde::{Deserialize, Serialize};

/// Least time between two snapshot writes.
pub const WRITE_INTERVAL: Duration = Duration::from_secs(2);
/// File name inside the state directory (kept from before the type was called a saved view:
/// existing state directories keep working).
pub const FILE_NAME: &str = "snapshot.json";
/// Format version; a snapshot of another version is ignored.
pub const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SavedView {
    pub version: u32,
    /// Unix milliseconds when written.
    pub written_ms: u64,
    /// Source URL (as `Discovery::describe` gives it) → service → instances.
    pub sources: BTreeMap<String, BTreeMap<String, Vec<Instance>>>,
}

/// The state directory when `EDGE_AGENT_STATE_DIR` is unset: `/var/lib/edge-agent` for root,
/// else `$XDG_STATE_HOME/edge-agent` or `~/.local/state/edge-agent` (the same rule the Nacos
/// adapter uses for its SDK cache: `discovery::state_dir`).
pub fn default_dir() -> Option<PathBuf> {
    discovery::state_dir(|k| std::env::var(k).ok())
}

/// Reads the snapshot in `dir`. `Ok(None)` when there is none; `Err` (a message) when it is
/// unreadable or corrupt.
pub fn load(dir: &Path) -> Result<Option<SavedView>, String> {
    let path = dir.join(FILE_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let snap: SavedView =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if snap.version != VERSION {
        return Err(format!(
            "{}: version {} (expected {VERSION})",
            path.display(),
            snap.version
        ));
    }
    Ok(Some(snap))
}

/// Writes `snap` to `dir` atomically (temp file + rename), creating the directory.
pub fn write(dir: &Path, snap: &SavedView) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let body = serde_json::to_vec(snap).map_err(std::io::Error::other)?;
    let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, dir.join(FILE_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), Ok(None));
        let mut services = BTreeMap::new();
        services.insert("a".to_string(), vec![Instance::new("127.0.0.1", 1)]);
        let snap = SavedView {
            version: VERSION,
            written_ms: 5,
            sources: [("file://x".to_string(), services)].into(),
        };
        write(dir.path(), &snap).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(snap));
        std::fs::write(dir.path().join(FILE_NAME), "{ not json").unwrap();
        assert!(load(dir.path()).unwrap_err().contains(FILE_NAME));
    }
}
