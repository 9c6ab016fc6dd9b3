//! edge-agent: a per-host service-discovery edge agent.
//!
//! ```text
//! registries ─► discovery adapters ─► cache (cache.rs) ─► Table snapshot (upstream.rs, ArcSwap)
//!                                                              │
//! request ─► server.rs ─► proxy.rs: route ─► balancer pick ─► endpoint's connection pool ─► response
//! ```
//!
//! Data moves one way: sources push into the cache task, which publishes immutable snapshots;
//! the request path only reads them.
#![forbid(unsafe_code)]

pub mod admin;
pub mod balancer;
pub mod cache;
pub mod config;
pub mod error;
pub mod framing;
pub mod guard;
pub mod health;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod snapshot;
pub mod upstream;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::cache::{Cache, Shared, SourceStatus};
use crate::config::{Cli, Config};

/// Capacity of the discovery event channel; adapters wait when the cache falls behind.
pub const EVENT_QUEUE: usize = 1024;

/// Runs the agent until SIGTERM or SIGINT, then drains. The listeners are bound before this
/// returns control to the runtime, so a bind error is reported naming the variable.
pub async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    let prometheus = metrics::install();
    let mut sources = Vec::with_capacity(config.registries.len());
    let mut statuses = Vec::with_capacity(config.registries.len());
    for url in &config.registries {
        let src = discovery::from_url(url)?;
        statuses.push(SourceStatus::new(src.kind(), src.describe()));
        sources.push(src);
    }
    if sources.is_empty() {
        tracing::warn!(
            "no registry configured and {} does not exist: only static upstreams are served",
            config::DEFAULT_REGISTRY_FILE
        );
    }
    let on_demand = sources.iter().filter(|s| s.on_demand()).cloned().collect();
    let shared = Shared::with_on_demand(statuses, on_demand);
    let mut cache = Cache::new(shared.clone(), config.dynamic.clone());
    match config.state_dir.clone().or_else(snapshot::default_dir) {
        Some(dir) => cache = cache.with_state_dir(dir),
        None => tracing::warn!("no state directory: the view is not saved across restarts"),
    }

    let proxy_listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("EDGE_AGENT_LISTEN={}: cannot listen", config.listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| {
            format!(
                "EDGE_AGENT_ADMIN_LISTEN={}: cannot listen",
                config.admin_listen
            )
        })?;

    let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
    let (control_tx, control_rx) = mpsc::channel(8);
    for (i, src) in sources.iter().enumerate() {
        tracing::info!(source = src.kind(), url = %src.describe(), "starting discovery");
        tokio::spawn(src.clone().run(discovery::Sink::new(i, event_tx.clone())));
    }
    drop(event_tx);
    // Services named in the configuration are watched from the start.
    for u in &config.dynamic.upstreams {
        if let Some(svc) = &u.service {
            shared.demand(svc);
        }
    }
    tokio::spawn(cache.run(event_rx, control_rx));
    tokio::spawn(health::sweep_loop(shared.clone()));
    tokio::spawn(health::probe_loop(shared.clone()));
    tokio::spawn(reload::run(cli, config.clone(), control_tx));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let admin = admin::Admin::new(shared.clone(), prometheus, config.admin_token.clone());
    tokio::spawn(server::serve_admin(
        admin_listener,
        admin,
        shutdown_rx.clone(),
    ));
    tracing::info!(
        listen = %config.listen,
        admin = %config.admin_listen,
        registries = config.registries.len(),
        "edge-agent started"
    );
    let proxy = proxy::Proxy::new(shared);
    let serving = tokio::spawn(server::serve_proxy(
        proxy_listener,
        proxy,
        shutdown_rx,
        config.shutdown_grace,
    ));
    wait_for_shutdown_signal().await;
    tracing::info!("shutdown signal received: no longer accepting connections");
    let _ = shutdown_tx.send(true);
    let _left = serving.await;
    tracing::info!("edge-agent stopped");
    Ok(())
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Initializes logging: text by default, JSON with `EDGE_AGENT_LOG_FORMAT=json`, filter from
/// `RUST_LOG` (default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
