//! Configuration reload on SIGHUP and when the `EDGE_AGENT_CONFIG` file changes.
//!
//! The new configuration is loaded and validated whole (with the same flags and environment the
//! agent started with) before it is handed to the cache; an invalid one is logged with every
//! error and counted in `edge_agent_config_reloads_total{result="error"}`, and the old one keeps
//! serving. Listen addresses, registries, the admin token and the access-log settings need a restart; a reload that
//! changes them says so in the log and applies the rest.
use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::access_log::AccessLog;
use crate::cache::Control;
use crate::config::{Cli, Config};
use crate::metrics as m;

/// Quiet time after a file notification before the config is re-read.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// Runs until the cache task is gone. `running` is the configuration the agent started with:
/// what needs a restart (listen addresses, registries, the admin token) is compared with it,
/// not with the last reload, since a reload never applies those.
pub async fn run(cli: Cli, running: Config, control: mpsc::Sender<Control>) {
    let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; reload on file change only");
            None
        }
    };
    reload_loop(cli, running, control, hup).await
}

/// Reloads on SIGHUP (when `hup` is there) and on changes of the config file (when there is
/// one); without either, returns at once.
async fn reload_loop(
    cli: Cli,
    running: Config,
    control: mpsc::Sender<Control>,
    mut hup: Option<tokio::signal::unix::Signal>,
) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let watcher = cli.config.clone().and_then(|p| watch(p, tx.clone()));
    drop(tx);
    if hup.is_none() && watcher.is_none() {
        return;
    }
    loop {
        tokio::select! {
            _ = hangup(&mut hup) => tracing::info!("SIGHUP: reloading configuration"),
            Some(()) = rx.recv(), if watcher.is_some() => {
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
                tracing::info!("configuration file changed: reloading");
            }
        }
        match Config::load(&cli) {
            Ok(next) => {
                let restart = needs_restart(&running, &next);
                if !restart.is_empty() {
                    tracing::warn!(
                        changed = %restart.join(", "),
                        "listen addresses, registries and the admin token change only on restart; the rest applies now"
                    );
                }
                metrics::counter!(m::CONFIG_RELOADS, "result" => "ok").increment(1);
                if control
                    .send(Control::Reload(Box::new(next.dynamic)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                metrics::counter!(m::CONFIG_RELOADS, "result" => "error").increment(1);
                tracing::error!("reload refused, the previous configuration keeps serving: {e}");
            }
        }
    }
}

/// Reopens the access-log file on every SIGUSR1 (logrotate's `postrotate`). The handler is
/// installed even when there is no access log, so a stray SIGUSR1 does not kill the agent
/// (its default action).
pub async fn reopen_on_usr1(log: AccessLog) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = match signal(SignalKind::user_defined1()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGUSR1 handler: the access log is not reopened");
            return;
        }
    };
    while usr1.recv().await.is_some() {
        tracing::info!("SIGUSR1: reopening the access log");
        log.reopen();
    }
}

/// The next SIGHUP, or never when there is no handler.
async fn hangup(hup: &mut Option<tokio::signal::unix::Signal>) {
    match hup {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// What `next` changes that only a restart applies, by variable name.
pub fn needs_restart(running: &Config, next: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    if next.listen != running.listen {
        v.push("EDGE_AGENT_LISTEN");
    }
    if next.admin_listen != running.admin_listen {
        v.push("EDGE_AGENT_ADMIN_LISTEN");
    }
    if next.registries != running.registries {
        v.push("EDGE_AGENT_REGISTRY");
    }
    if next.admin_token != running.admin_token {
        v.push("EDGE_AGENT_ADMIN_TOKEN");
    }
    if next.access_log != running.access_log {
        v.push("EDGE_AGENT_ACCESS_LOG");
    }
    if next.request_id != running.request_id {
        v.push("EDGE_AGENT_REQUEST_ID");
    }
    v
}

fn watch(path: PathBuf, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let name = path.file_name()?.to_owned();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if (ev.kind.is_modify() || ev.kind.is_create())
                && ev.paths.iter().any(|p| p.file_name() == Some(&name))
            {
                let _ = tx.try_send(());
            }
        }
    })
    .ok()?;
    w.watch(&dir, RecursiveMode::NonRecursive).ok()?;
    Some(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listen: &str) -> Config {
        let cli = Cli {
            registry: Some("file:///dev/null".into()),
            listen: Some(listen.into()),
            ..Cli::default()
        };
        Config::load(&cli).unwrap()
    }

    /// Defect 4 of #12: the warning compared with the last *loaded* config. A reload that
    /// changes the listen address, then one that keeps the change, must warn both times: the
    /// agent still listens on the address it started with.
    #[test]
    fn restart_only_changes_are_compared_with_the_running_config() {
        let running = config("127.0.0.1:15001");
        let first = config("127.0.0.1:15999");
        let second = config("127.0.0.1:15999");
        assert_eq!(needs_restart(&running, &first), vec!["EDGE_AGENT_LISTEN"]);
        assert_eq!(needs_restart(&running, &second), vec!["EDGE_AGENT_LISTEN"]);
        assert!(needs_restart(&running, &config("127.0.0.1:15001")).is_empty());
    }

    /// Defect 3 of #12: without a SIGHUP handler the loop returned, dropping the file watcher,
    /// while the log said "reload on file change only". A file change still reloads.
    #[tokio::test]
    async fn without_a_sighup_handler_a_file_change_still_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge-agent.toml");
        std::fs::write(&path, "[agent]\ndomain_suffix = \".one\"\n").unwrap();
        let cli = Cli {
            registry: Some("file:///dev/null".into()),
            config: Some(path.clone()),
            ..Cli::default()
        };
        let running = Config::load(&cli).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let task = tokio::spawn(reload_loop(cli, running, tx, None));
        // The watcher is set up before the first poll of the task; write until a reload comes
        // (bounded), since a write racing the watch's start may go unseen.
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            let mut n = 0;
            loop {
                n += 1;
                std::fs::write(&path, format!("[agent]\ndomain_suffix = \".two{n}\"\n")).unwrap();
                match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
                    Ok(Some(Control::Reload(d))) => return d,
                    Ok(None) => panic!("the reload loop returned"),
                    Err(_) => continue,
                }
            }
        })
        .await
        .expect("a file change reloads within 10 s");
        assert!(got.domain_suffix.as_deref().unwrap().starts_with(".two"));
        task.abort();
    }
}
