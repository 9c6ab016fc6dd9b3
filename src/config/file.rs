//! The optional TOML file (`EDGE_AGENT_CONFIG`), as written: every field optional, unknown
//! fields refused with their line. `validate.rs` turns it into the owning layers' types.
use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub agent: AgentFile,
    #[serde(default)]
    pub upstream: Vec<UpstreamFile>,
    #[serde(default)]
    pub route: Vec<RouteFile>,
    #[serde(default)]
    pub guard: GuardFile,
}

/// `[guard]`: the mass-deregistration guard (see `guard.rs`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardFile {
    pub enabled: Option<bool>,
    pub max_removal_percent: Option<u32>,
    pub confirm_window: Option<String>,
    pub confirm_answers: Option<u32>,
    #[serde(default)]
    pub opt_out: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub registry: Option<StringOrList>,
    pub balancer: Option<String>,
    pub domain_suffix: Option<String>,
    pub shutdown_grace: Option<String>,
    /// This host's zone (`EDGE_AGENT_ZONE` wins).
    pub zone: Option<String>,
    /// How often watched services are read again (`EDGE_AGENT_RESYNC_INTERVAL` wins).
    pub resync_interval: Option<String>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub id: String,
    pub service: Option<String>,
    pub source: Option<String>,
    #[serde(default)]
    pub nodes: Vec<NodeFile>,
    pub balancer: Option<String>,
    pub connect_timeout: Option<String>,
    pub read_timeout: Option<String>,
    pub retries: Option<u32>,
    /// Overall time budget for all tries of one request.
    pub retry_timeout: Option<String>,
    /// `chash` key: `header:<name>`, `cookie:<name>`, `arg:<name>`, `ip` or `path`.
    pub hash_on: Option<String>,
    /// `ewma` decay time.
    pub ewma_decay: Option<String>,
    /// Ramp new endpoints' share up over this window.
    pub slow_start: Option<String>,
    /// Cap on the back-off a `Retry-After` asks for.
    pub max_retry_after: Option<String>,
    /// How long a removed endpoint's requests and tunnels may finish.
    pub drain_timeout: Option<String>,
    /// Circuit breakers (`breaker.rs`): connections per endpoint, requests waiting for a
    /// connection, requests in flight, retries in flight.
    pub max_connections: Option<i64>,
    pub max_pending: Option<i64>,
    pub max_requests: Option<i64>,
    pub max_retries: Option<i64>,
    pub checks: Option<ChecksFile>,
    /// `http1`, `h2c`, `h2` or `auto` (default: the registry's `protocol` metadata, else http1).
    pub protocol: Option<String>,
    /// Largest request body (bytes) kept so the request can be retried (default 65536).
    pub retry_buffer: Option<u64>,
    /// `subset = { version = "v2" }`: only endpoints whose metadata has every pair.
    pub subset: Option<BTreeMap<String, toml::Value>>,
    /// `"none"`, `"any"` or a subset table.
    pub fallback: Option<toml::Value>,
    /// `"off"`, `"prefer"`, `"strict"`.
    pub zone_aware: Option<String>,
    /// Percentage of the local zone's expected share (default 70).
    pub zone_min_share: Option<u32>,
    /// Dial the endpoints with TLS (unset: as the registry says per instance).
    pub tls: Option<bool>,
    /// SNI and the name the certificate must carry (default: the service name, else the id).
    pub tls_server_name: Option<String>,
    /// PEM file of the CA certificates to trust (default: the webpki-roots set).
    pub tls_ca_file: Option<String>,
    /// PEM client certificate chain for mTLS (with `tls_key_file`).
    pub tls_cert_file: Option<String>,
    /// PEM private key of the client certificate.
    pub tls_key_file: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct ChecksFile {
    pub passive: Option<PassiveFile>,
    pub active: Option<ActiveFile>,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct PassiveFile {
    pub enabled: Option<bool>,
    pub consecutive_failures: Option<u32>,
    /// Statuses counted as failures (default: every 5xx).
    pub failure_statuses: Option<Vec<u16>>,
    /// `grpc-status` codes counted as failures (default: [14], UNAVAILABLE).
    pub failure_grpc_statuses: Option<Vec<u16>>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_time: Option<String>,
    pub max_ejection_percent: Option<u32>,
    pub panic_threshold: Option<u32>,
    /// Consecutive 502/503/504 and connect errors that eject (off unless set).
    pub consecutive_gateway_failures: Option<u32>,
    /// How often the success-rate and failure-percentage detectors run.
    pub interval: Option<String>,
    pub success_rate: Option<SuccessRateFile>,
    pub failure_percentage: Option<FailurePercentageFile>,
}

/// `[upstream.checks.passive.success_rate]`: on by default.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct SuccessRateFile {
    pub enabled: Option<bool>,
    pub minimum_hosts: Option<u32>,
    pub request_volume: Option<u32>,
    pub stdev_factor: Option<f64>,
}

/// `[upstream.checks.passive.failure_percentage]`: on when the table is given.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct FailurePercentageFile {
    pub enabled: Option<bool>,
    pub threshold: Option<u32>,
    pub minimum_hosts: Option<u32>,
    pub request_volume: Option<u32>,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct ActiveFile {
    /// `http` (default) or `tcp`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub expected_statuses: Option<Vec<u16>>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
    pub initially_unhealthy: Option<bool>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub addr: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    /// Strip the matched prefix before forwarding (default: true).
    pub strip_prefix: Option<bool>,
    pub upstream: Option<String>,
    /// `headers = { "x-canary" = "true" }`: every header must have exactly this value.
    pub headers: Option<BTreeMap<String, String>>,
    pub subset_from_header: Option<HeaderRuleFile>,
    /// `split = [{ upstream = "a", weight = 90 }, …]`, instead of `upstream`.
    pub split: Option<Vec<SplitFile>>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct HeaderRuleFile {
    pub header: Option<String>,
    pub key: Option<String>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SplitFile {
    pub upstream: String,
    pub weight: u32,
}

/// Reads and parses the TOML file; the error names the file and the line.
pub fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("EDGE_AGENT_CONFIG={}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("EDGE_AGENT_CONFIG={}: {e}", path.display()))
}
