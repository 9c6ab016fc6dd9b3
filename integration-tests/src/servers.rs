//! Real registry servers for the tests: installed by `integration-tests/servers/<name>/install.sh`
//! (built once per machine into `~/.cache/edge-agent/`) and started by its `start.sh`, which
//! `exec`s the server so the child's PID is the server's. A server that cannot be installed or
//! does not become ready fails the test with its output: nothing is skipped.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::workspace_root;

/// The folder holding a server's scripts.
pub fn server_dir(name: &str) -> PathBuf {
    workspace_root()
        .join("integration-tests/servers")
        .join(name)
}

/// Runs `<name>/install.sh` and returns the path it prints (the binary or jar). Panics with the
/// script's output when it fails.
pub fn install(name: &str) -> PathBuf {
    let script = server_dir(name).join("install.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}\n{stderr}",
        script.display(),
        out.status
    );
    let path = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let path = PathBuf::from(path);
    assert!(
        path.exists(),
        "{} printed {:?}, which does not exist:\n{stderr}",
        script.display(),
        path
    );
    path
}

/// A server process started by `<name>/start.sh`; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct ServerProcess {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts `<name>/start.sh` with `env`, its output to a log file, working directory a fresh
    /// temporary directory (no stray `.env` files).
    pub fn start(name: &str, env: &[(&str, String)]) -> ServerProcess {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(format!("{name}.log"));
        let script = server_dir(name).join("start.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
        ServerProcess {
            name: name.to_string(),
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    /// A scratch directory that lives as long as the server (for data dirs).
    pub fn scratch(&self) -> PathBuf {
        self._dir.path().to_path_buf()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `url` until it answers 2xx (and `accept` agrees with the body), or panics with the
    /// server's log after `timeout`, or at once if the server exits.
    pub async fn wait_ready(
        &mut self,
        url: &str,
        timeout: Duration,
        accept: impl Fn(&str) -> bool,
    ) {
        let client = crate::client();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = client
                .get(url)
                .header("accept", "application/json")
                .timeout(Duration::from_secs(2))
                .send()
                .await
            {
                if r.status().is_success() && accept(&r.text().await.unwrap_or_default()) {
                    return;
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "{} exited ({status}) before it was ready; log:\n{}",
                        self.name,
                        self.log_text()
                    );
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "{} not ready at {url} within {timeout:?}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops the server and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.name, self.log_text());
        }
        self.stop();
    }
}
