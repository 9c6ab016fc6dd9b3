//! Flags and environment variables (each variable is also a flag; clap reads both).
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::balancer;

/// The `--help` text after the flags: every variable with its default.
fn env_help() -> String {
    format!(
        "\
Environment (each also a flag; flags and variables override the config file):
  EDGE_AGENT_LISTEN          proxy address                     [default: 127.0.0.1:15001]
  EDGE_AGENT_ADMIN_LISTEN    admin API and /metrics address    [default: 127.0.0.1:15000]
  EDGE_AGENT_REGISTRY        comma-separated registry URLs ({kinds}) [default: file://config/services.toml if it exists]
  EDGE_AGENT_CONFIG          optional TOML file (upstreams, routes, [agent] settings)
  EDGE_AGENT_BALANCER        default balancer: {balancers} [default: roundrobin]
  EDGE_AGENT_DOMAIN_SUFFIX   suffix ignored in Host headers, e.g. .svc.local
  EDGE_AGENT_ZONE            this host's zone, for zone_aware upstreams [default: unset]
  EDGE_AGENT_SHUTDOWN_GRACE  drain time after SIGTERM          [default: 10s]
  EDGE_AGENT_STATE_DIR       directory for the saved view      [default: /var/lib/edge-agent as root, else ~/.local/state/edge-agent]
  EDGE_AGENT_ADMIN_TOKEN     bearer token required by the admin API (except /healthz) [default: none]
  EDGE_AGENT_REMOVAL_GUARD   hold updates that remove most of a service: on/off [default: on]
  EDGE_AGENT_RESYNC_INTERVAL read every watched service again this often, correcting what a lost notification left (off to disable) [default: 5m]
  EDGE_AGENT_LOG_FORMAT      text or json                      [default: text]
  EDGE_AGENT_ACCESS_LOG      off, stdout or a file path (reopened on SIGUSR1) [default: off]
  EDGE_AGENT_ACCESS_LOG_FORMAT json or text (nginx combined + upstream fields) [default: json]
  EDGE_AGENT_ACCESS_LOG_QUERY on: keep the query string in the logged path [default: off]
  EDGE_AGENT_REQUEST_ID      on: add x-request-id to requests without one [default: off]
  RUST_LOG                   log filter, e.g. info,edge_agent=debug [default: info]
  TOKIO_WORKER_THREADS       proxy worker threads; 1 runs everything on one thread [default: one per CPU]",
        balancers = balancer::names().join(", "),
        kinds = discovery::kinds().join(", "),
    )
}

#[derive(Debug, Parser, Clone, Default)]
#[command(
    name = "edge-agent",
    version,
    about = "Per-host service-discovery edge agent: routes local calls to healthy instances.",
    after_help = env_help()
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Proxy listen address [default: 127.0.0.1:15001]
    #[arg(long, env = "EDGE_AGENT_LISTEN", global = true)]
    pub listen: Option<String>,
    /// Admin API listen address [default: 127.0.0.1:15000]
    #[arg(long, env = "EDGE_AGENT_ADMIN_LISTEN", global = true)]
    pub admin_listen: Option<String>,
    /// Comma-separated registry URLs [default: file://config/services.toml if it exists]
    #[arg(long, env = "EDGE_AGENT_REGISTRY", global = true)]
    pub registry: Option<String>,
    /// Optional TOML config file
    #[arg(long, env = "EDGE_AGENT_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Default balancer [default: roundrobin]
    #[arg(long, env = "EDGE_AGENT_BALANCER", global = true)]
    pub balancer: Option<String>,
    /// Domain suffix stripped from Host headers before lookup
    #[arg(long, env = "EDGE_AGENT_DOMAIN_SUFFIX", global = true)]
    pub domain_suffix: Option<String>,
    /// This host's zone, for upstreams with zone_aware [default: unset]
    #[arg(long, env = "EDGE_AGENT_ZONE", global = true)]
    pub zone: Option<String>,
    /// Drain time after SIGTERM [default: 10s]
    #[arg(long, env = "EDGE_AGENT_SHUTDOWN_GRACE", global = true)]
    pub shutdown_grace: Option<String>,
    /// Read every watched service again this often; off to disable [default: 5m]
    #[arg(long, env = "EDGE_AGENT_RESYNC_INTERVAL", global = true)]
    pub resync_interval: Option<String>,
    /// Directory for state snapshots
    #[arg(long, env = "EDGE_AGENT_STATE_DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// Bearer token for the admin API
    #[arg(
        long,
        env = "EDGE_AGENT_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub admin_token: Option<String>,
    /// Mass-deregistration guard: on or off [default: on]
    #[arg(long, env = "EDGE_AGENT_REMOVAL_GUARD", global = true)]
    pub removal_guard: Option<String>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "EDGE_AGENT_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,
    /// Access log: off, stdout or a file path [default: off]
    #[arg(long, env = "EDGE_AGENT_ACCESS_LOG", global = true)]
    pub access_log: Option<String>,
    /// Access-log format: json or text [default: json]
    #[arg(long, env = "EDGE_AGENT_ACCESS_LOG_FORMAT", global = true)]
    pub access_log_format: Option<String>,
    /// Keep the query string in the access log's path: on or off [default: off]
    #[arg(long, env = "EDGE_AGENT_ACCESS_LOG_QUERY", global = true)]
    pub access_log_query: Option<String>,
    /// Add x-request-id to requests that have none: on or off [default: off]
    #[arg(long, env = "EDGE_AGENT_REQUEST_ID", global = true)]
    pub request_id: Option<String>,
}

#[derive(Debug, Subcommand, Clone)]
pub enum Command {
    /// Run the agent (the default)
    Run,
    /// Validate the environment and config file, print every error, exit 0 when valid
    CheckConfig,
    /// Print a running agent's sources, upstreams and endpoints (from its admin API); exit 0
    /// when ready with an available endpoint in every upstream, 1 when not, 3 when the admin
    /// API cannot be read
    Status {
        /// Print the raw /upstreams document
        #[arg(long)]
        json: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Defect 14 of #12: the help named one of the four balancers.
    #[test]
    fn help_names_every_balancer_and_registry_kind() {
        let help = env_help();
        for name in balancer::names() {
            assert!(help.contains(name), "{name} missing from {help}");
        }
        for kind in discovery::kinds() {
            assert!(help.contains(kind), "{kind} missing from {help}");
        }
    }
}
