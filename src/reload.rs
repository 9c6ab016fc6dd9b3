//! Configuration reload on SIGHUP and when the `EDGE_AGENT_CONFIG` file changes.
//!
//! The new configuration is loaded and validated whole (with the same flags and environment the
//! agent started with) before it is handed to the cache; an invalid one is logged with every
//! error and counted in `edge_agent_config_reloads_total{result="error"}`, and the old one keeps
//! serving. Listen addresses, registries and the admin token need a restart; a reload that
//! changes them says so in the log and applies the rest.
use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::cache::Control;
use crate::config::{Cli, Config};
use crate::metrics as m;

/// Quiet time after a file notification before the config is re-read.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

pub async fn run(cli: Cli, mut current: Config, control: mpsc::Sender<Control>) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let _watcher = cli.config.clone().and_then(|p| watch(p, tx.clone()));
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; reload on file change only");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = hup.recv() => tracing::info!("SIGHUP: reloading configuration"),
            Some(()) = rx.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
                tracing::info!("configuration file changed: reloading");
            }
        }
        match Config::load(&cli) {
            Ok(next) => {
                if (
                    &next.listen,
                    &next.admin_listen,
                    &next.registries,
                    &next.admin_token,
                ) != (
                    &current.listen,
                    &current.admin_listen,
                    &current.registries,
                    &current.admin_token,
                ) {
                    tracing::warn!(
                        "listen addresses, registries and the admin token change only on restart"
                    );
                }
                metrics::counter!(m::CONFIG_RELOADS, "result" => "ok").increment(1);
                if control
                    .send(Control::Reload(Box::new(next.dynamic.clone())))
                    .await
                    .is_err()
                {
                    return;
                }
                current = next;
            }
            Err(e) => {
                metrics::counter!(m::CONFIG_RELOADS, "result" => "error").increment(1);
                tracing::error!("reload refused, the previous configuration keeps serving: {e}");
            }
        }
    }
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
