//! Configuration: environment variables (and the same as flags, `env.rs`), an optional TOML
//! file (`file.rs`), and validation (`validate.rs`).
//!
//! Config parses into the types the layers below own (`UpstreamSettings` in `upstream.rs`, the
//! balancer's `Spec`, `PassiveHealth`/`ActiveHealth` in `health/`, `GuardConfig`, `RouteConfig`,
//! the table's `Dynamic`) and owns none of them but [`Config`] itself.
//!
//! Precedence: flag / environment variable, then the file's `[agent]` table, then the defaults
//! named below. Everything is validated when the configuration is built, and every problem is
//! reported at once, each naming the variable or field and the value, so `edge-agent
//! check-config` can print them all. A configuration that fails validation is refused at start-up
//! and, on reload, leaves the old one serving.
//!
//! ```toml
//! [agent]
//! listen = "127.0.0.1:15001"
//! registry = ["file://config/services.toml"]
//! balancer = "roundrobin"
//! domain_suffix = ".svc.local"
//!
//! [[upstream]]
//! id = "api"
//! service = "hello"            # discovery service name (default: the id)
//! source = "file"              # only instances from this kind of registry (default: all)
//! balancer = "roundrobin"
//! connect_timeout = "1s"
//! read_timeout = "30s"
//! retries = 1
//!
//! [[upstream]]
//! id = "legacy"
//! nodes = [{ addr = "127.0.0.1:9000", weight = 1 }]   # static nodes, no discovery
//!
//! [[route]]
//! host = "api.local"
//! path_prefix = "/api/"
//! upstream = "api"
//! ```
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod env;
mod file;
mod subsets;
mod validate;

pub use env::{Cli, Command};
pub use file::{read_file, FileConfig};

use crate::table::Dynamic;

/// Default proxy listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15001";
/// Default admin API listen address (loopback: the admin API is not for other hosts).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:15000";
/// The file registry used when `EDGE_AGENT_REGISTRY` is unset and this file exists.
pub const DEFAULT_REGISTRY_FILE: &str = "config/services.toml";
/// Default balancer for upstreams that name none.
pub const DEFAULT_BALANCER: &str = "roundrobin";
/// How long in-flight requests may finish after SIGTERM before the agent exits.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub registries: Vec<String>,
    pub config_file: Option<PathBuf>,
    pub shutdown_grace: Duration,
    pub state_dir: Option<PathBuf>,
    pub admin_token: Option<String>,
    pub log_json: bool,
    /// `EDGE_AGENT_ACCESS_LOG*` (restart to change).
    pub access_log: crate::access_log::Settings,
    /// `EDGE_AGENT_REQUEST_ID=on`: add `x-request-id` to requests without one.
    pub request_id: bool,
    /// `EDGE_AGENT_RESYNC_INTERVAL`: how often every watched service is read again from its
    /// source (`cache.rs`); `None`: off.
    pub resync_interval: Option<Duration>,
    /// The part that a reload may change.
    pub dynamic: Dynamic,
}

/// Settings a reload can change without a restart.

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigErrors(pub Vec<String>);

impl Config {
    /// Builds and validates the configuration from flags/env and the optional file.
    pub fn load(cli: &Cli) -> Result<Config, ConfigErrors> {
        let mut errs = Vec::new();
        let file = match &cli.config {
            Some(path) => match read_file(path) {
                Ok(f) => f,
                Err(e) => {
                    errs.push(e);
                    FileConfig::default()
                }
            },
            None => FileConfig::default(),
        };
        let cfg = validate::build(cli, &file, &mut errs);
        if errs.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(errs))
        }
    }
}

#[cfg(test)]
mod tests;
