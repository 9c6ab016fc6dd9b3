//! edge-agent: a per-host service-discovery edge agent.
//!
//! ```text
//! registries ─► discovery adapters ─► cache.rs ─► table.rs builds a RoutingTable ─► state.rs (ArcSwap)
//!                                                                                     │
//! request ─► server.rs ─► proxy.rs: route.rs ─► balancer pick ─► endpoint's pool ─► response
//!                                   feedback through endpoint::Attempt ─► load.rs, health/
//! ```
//!
//! Layers, bottom to top; a file imports only from layers below it or from earlier files of its
//! own layer, so no two units import each other (`tests/layers.rs` fails on a cycle):
//!
//! ```text
//! 1  io  clock  rng  breaker  error  framing  h1/{head,chunked,write,client}  metrics  access_log  stats  guard
//!    state_file  tls  h2server  grpc  replay   leaves
//! 2  load  dial  pool  h2pool  health/{passive,active}   per-endpoint measures and connections
//! 3  endpoint                                         Endpoint, EndpointState, Attempt
//! 4  balancer/{roundrobin,chash,ewma,least_conn}      Spec, Kind, REGISTRY, Candidates
//!    zone  subset                                     zone shares; subsets, zone groups, Picks
//! 5  retry  tunnel  upstream  route                    an upstream and its settings; routing
//! 6  state  table  cache  liveness  checks  proxy  admin        shared state; tasks; the request path
//! 7  config/{env,file,validate}                       parses into the types above
//! 8  server  reload  status  lib                              listeners, reloads, start-up
//! ```
//!
//! Data moves one way: sources push into the cache task, which publishes immutable routing
//! tables; the request path only reads them.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod balancer;
pub mod breaker;
pub mod cache;
pub mod checks;
pub mod clock;
pub mod config;
pub mod dial;
pub mod endpoint;
pub mod error;
pub mod framing;
pub mod grpc;
pub mod guard;
pub mod h1;
pub mod h2c;
pub mod h2pool;
pub mod h2server;
pub mod health;
mod io;
pub mod liveness;
pub mod load;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod replay;
pub mod retry;
pub mod rng;
pub mod route;
pub mod server;
pub mod state;
pub mod state_file;
pub mod stats;
pub mod status;
pub mod subset;
pub mod table;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod zone;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::cache::Cache;
use crate::config::{Cli, Config};
use crate::state::{SourceStatus, State};

/// Capacity of the discovery event channel; adapters wait when the cache falls behind.
pub const EVENT_QUEUE: usize = 1024;
/// How long the agent waits at exit for the access-log writer to take the queued lines.
pub const ACCESS_LOG_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs the agent until SIGTERM or SIGINT, then drains. The listeners are bound before this
/// returns control to the runtime, so a bind error is reported naming the variable.
pub async fn run(cli: Cli, config: Config) -> anyhow::Result<()> {
    let prometheus = metrics::install();
    let access_log = access_log::AccessLog::start(&config.access_log)?;
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
    let state = State::with_on_demand(statuses, on_demand);
    let mut cache = Cache::new(state.clone(), config.dynamic.clone())
        .with_sources(sources.clone(), config.resync_interval);
    match config.state_dir.clone().or_else(state_file::default_dir) {
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
    tokio::spawn(liveness::run(sources.clone(), event_tx.clone()));
    drop(event_tx);
    // Services named in the configuration are watched from the start.
    for u in &config.dynamic.upstreams {
        if let Some(svc) = &u.service {
            state.demand(svc);
        }
    }
    tokio::spawn(cache.run(event_rx, control_rx));
    tokio::spawn(checks::sweep_loop(state.clone()));
    tokio::spawn(checks::probe_loop(state.clone()));
    let sampled = state.clone();
    tokio::spawn(stats::run(move |f| {
        for u in sampled.table.load().upstreams.values() {
            f(&u.runtime.stats);
        }
    }));
    tokio::spawn(reload::run(cli, config.clone(), control_tx));
    tokio::spawn(reload::reopen_on_usr1(access_log.clone()));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let admin = admin::Admin::new(state.clone(), prometheus, config.admin_token.clone());
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
    let proxy = proxy::Proxy::with_access_log(state, access_log.clone(), config.request_id);
    let serving = tokio::spawn(server::serve_proxy(
        proxy_listener,
        proxy,
        shutdown_rx,
        config.shutdown_grace,
    ));
    wait_for_shutdown_signal().await;
    tracing::info!("shutdown signal received: no longer accepting connections");
    let _ = shutdown_tx.send(true);
    let left = serving.await.unwrap_or(0);
    access_log.drain(ACCESS_LOG_DRAIN).await;
    tracing::info!(connections_cut = left, "edge-agent stopped");
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
