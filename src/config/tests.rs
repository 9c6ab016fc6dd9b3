//! Configuration tests: every error names its field and value.

use super::file::FileConfig;
use super::validate::build;
use super::*;
use std::path::Path;

use crate::balancer::chash::HashOn;

fn cli() -> Cli {
    Cli {
        registry: Some("file:///dev/null".into()),
        ..Cli::default()
    }
}

fn load_toml(text: &str) -> Result<Config, ConfigErrors> {
    let file: FileConfig = toml::from_str(text).map_err(|e| ConfigErrors(vec![e.to_string()]))?;
    let mut errs = Vec::new();
    let c = build(&cli(), &file, &mut errs);
    if errs.is_empty() {
        Ok(c)
    } else {
        Err(ConfigErrors(errs))
    }
}

fn err_of(text: &str) -> String {
    load_toml(text).unwrap_err().to_string()
}

#[test]
fn defaults() {
    let c = load_toml("").unwrap();
    assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
    assert_eq!(c.dynamic.default_settings.balancer.name(), "roundrobin");
    assert_eq!(c.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
}

#[test]
fn env_overrides_file() {
    let file: FileConfig = toml::from_str("[agent]\nlisten = \"127.0.0.1:1\"\n").unwrap();
    let mut c = cli();
    c.listen = Some("127.0.0.1:2".into());
    let mut errs = Vec::new();
    assert_eq!(build(&c, &file, &mut errs).listen.port(), 2);
    assert_eq!(build(&cli(), &file, &mut errs).listen.port(), 1);
    assert!(errs.is_empty());
}

#[test]
fn bad_env_values_are_named() {
    let mut c = cli();
    c.listen = Some("localhost".into());
    c.balancer = Some("fastest".into());
    c.log_format = Some("xml".into());
    c.registry = Some("gopher://x".into());
    let mut errs = Vec::new();
    build(&c, &FileConfig::default(), &mut errs);
    let all = errs.join("\n");
    assert!(all.contains("EDGE_AGENT_LISTEN=\"localhost\""), "{all}");
    assert!(all.contains("EDGE_AGENT_BALANCER=\"fastest\""), "{all}");
    assert!(all.contains("EDGE_AGENT_LOG_FORMAT=\"xml\""), "{all}");
    assert!(
        all.contains("EDGE_AGENT_REGISTRY") && all.contains("gopher"),
        "{all}"
    );
}

#[test]
fn bad_address_in_nodes() {
    let e = err_of("[[upstream]]\nid = \"a\"\nnodes = [{ addr = \"nowhere\" }]\n");
    assert!(e.contains("upstream[0].nodes[0].addr = \"nowhere\""), "{e}");
}

#[test]
fn unknown_balancer() {
    let e = err_of("[[upstream]]\nid = \"a\"\nbalancer = \"random-ish\"\n");
    assert!(e.contains("upstream[0].balancer=\"random-ish\""), "{e}");
}

#[test]
fn negative_and_zero_timeouts() {
    let e = err_of("[[upstream]]\nid = \"a\"\nconnect_timeout = \"-1s\"\n");
    assert!(e.contains("upstream[0].connect_timeout=\"-1s\""), "{e}");
    let e = err_of("[[upstream]]\nid = \"a\"\nread_timeout = \"0s\"\n");
    assert!(e.contains("upstream[0].read_timeout=\"0s\""), "{e}");
    // A negative number is refused by the parser, with the line.
    let e = err_of("[[upstream]]\nid = \"a\"\nretries = -1\n");
    assert!(e.contains("line 3"), "{e}");
}

#[test]
fn health_and_hash_fields_are_validated_by_name() {
    let e = err_of(
        "[[upstream]]\nid = \"a\"\nbalancer = \"roundrobin\"\nhash_on = \"header:\"\n\
         [upstream.checks.passive]\nmax_ejection_percent = 150\nconsecutive_failures = 0\n\
         [upstream.checks.active]\ntype = \"udp\"\ninterval = \"soon\"\n",
    );
    for needle in [
        "upstream[0].hash_on = \"header:\"",
        "upstream[0].checks.passive.max_ejection_percent = 150",
        "upstream[0].checks.passive.consecutive_failures = 0",
        "upstream[0].checks.active.type = \"udp\"",
        "upstream[0].checks.active.interval=\"soon\"",
    ] {
        assert!(e.contains(needle), "missing {needle:?} in {e}");
    }
    let c = load_toml(
        "[[upstream]]\nid = \"a\"\nbalancer = \"chash\"\nhash_on = \"cookie:sid\"\nslow_start = \"30s\"\n\
         [upstream.checks.active]\npath = \"/health\"\ninterval = \"1s\"\n",
    )
    .unwrap();
    let s = &c.dynamic.upstreams[0].settings;
    let chash = s
        .balancer
        .settings()
        .as_any()
        .downcast_ref::<crate::balancer::chash::ChashSettings>()
        .expect("chash settings");
    assert_eq!(chash.hash_on, HashOn::Cookie("sid".into()));
    assert_eq!(s.slow_start, Some(Duration::from_secs(30)));
    assert_eq!(
        s.active.as_ref().unwrap().http_path.as_deref(),
        Some("/health")
    );
    assert!(s.passive.enabled);
}

#[test]
fn duplicate_upstream_id() {
    let e = err_of("[[upstream]]\nid = \"a\"\n[[upstream]]\nid = \"a\"\n");
    assert!(e.contains("upstream[1].id = \"a\": duplicate"), "{e}");
}

#[test]
fn route_to_missing_upstream() {
    let e = err_of("[[route]]\nhost = \"x\"\nupstream = \"ghost\"\n");
    assert!(e.contains("route[0].upstream = \"ghost\""), "{e}");
}

#[test]
fn unknown_field_is_refused_with_line() {
    let e = err_of("[agent]\nlisten = \"127.0.0.1:1\"\nlisen = \"x\"\n");
    assert!(e.contains("lisen") && e.contains("line 3"), "{e}");
}

#[test]
fn every_error_is_reported_at_once() {
    let e = load_toml(
        "[[upstream]]\nid = \"a\"\nbalancer = \"x\"\nconnect_timeout = \"soon\"\n[[route]]\nupstream = \"b\"\n",
    )
    .unwrap_err();
    assert_eq!(e.0.len(), 4, "{e}");
}

#[test]
fn full_example_config_loads() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/edge-agent.toml");
    let file = read_file(Path::new(path)).unwrap();
    let mut errs = Vec::new();
    let c = build(&cli(), &file, &mut errs);
    assert!(errs.is_empty(), "{errs:?}");
    assert!(!c.dynamic.upstreams.is_empty());
    assert!(!c.dynamic.routes.is_empty());
}

/// Defect 7 of #12: `hash_on` was accepted for any balancer; round robin then hashed every
/// request and counted `edge_agent_chash_fallback_total`. It is refused, naming the field, the
/// value and the balancer.
#[test]
fn hash_on_is_refused_for_a_balancer_that_does_not_hash() {
    for b in ["roundrobin", "ewma", "least_conn"] {
        let e = err_of(&format!(
            "[[upstream]]\nid = \"a\"\nbalancer = \"{b}\"\nhash_on = \"header:x-user\"\n"
        ));
        assert!(
            e.contains("upstream[0].hash_on = \"header:x-user\": read only by balancer chash")
                && e.contains(&format!("not by \"{b}\"")),
            "{e}"
        );
    }
    // The default balancer (round robin) too.
    let e = err_of("[[upstream]]\nid = \"a\"\nhash_on = \"ip\"\n");
    assert!(e.contains("upstream[0].hash_on = \"ip\""), "{e}");
    assert!(load_toml("[[upstream]]\nid = \"a\"\nbalancer = \"chash\"\n").is_ok());
}

#[test]
fn circuit_breaker_limits_are_read_and_zero_or_negative_refused() {
    let c = load_toml(
        "[[upstream]]\nid = \"a\"\nmax_requests = 10\nmax_retries = 1\nmax_connections = 5\nmax_pending = 7\n",
    )
    .unwrap();
    let b = c.dynamic.upstreams[0].settings.breakers;
    assert_eq!(
        (
            b.max_requests,
            b.max_retries,
            b.max_connections,
            b.max_pending
        ),
        (10, 1, 5, 7)
    );
    let d = load_toml("[[upstream]]\nid = \"a\"\n")
        .unwrap()
        .dynamic
        .upstreams[0]
        .settings
        .breakers;
    assert_eq!(d, crate::breaker::CircuitBreakers::default());
    for (key, v) in [
        ("max_requests", "0"),
        ("max_retries", "-1"),
        ("max_connections", "0"),
        ("max_pending", "99999999999"),
    ] {
        let e = err_of(&format!("[[upstream]]\nid = \"a\"\n{key} = {v}\n"));
        assert!(
            e.contains(&format!("upstream[0].{key} = {v}: must be")),
            "{e}"
        );
    }
}

/// #14: subsets, fallback, zones, header matches, header subsets and splits parse into the
/// layers' types.
#[test]
fn subsets_zones_and_splits_parse() {
    use crate::subset::{Fallback, Selector};
    use crate::zone::ZoneMode;
    let mut c = cli();
    c.zone = Some("eu-1a".into());
    let file: FileConfig = toml::from_str(
        r#"
[[upstream]]
id = "pay-v2"
service = "pay"
subset = { version = "v2", build = 7 }
fallback = { version = "v1" }
zone_aware = "prefer"
zone_min_share = 50

[[upstream]]
id = "pay-v1"
service = "pay"
fallback = "any"

[[route]]
host = "pay"
headers = { "X-Canary" = "true" }
split = [{ upstream = "pay-v1", weight = 90 }, { upstream = "pay-v2", weight = 10 }]

[[route]]
host = "pay"
upstream = "pay-v1"
subset_from_header = { header = "X-Version", key = "version" }
"#,
    )
    .unwrap();
    let mut errs = Vec::new();
    let cfg = build(&c, &file, &mut errs);
    assert!(errs.is_empty(), "{errs:?}");
    let s = &cfg.dynamic.upstreams[0].settings.subset;
    assert_eq!(
        s.selector,
        Selector(
            [("version", "v2"), ("build", "7")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into()
        )
    );
    assert_eq!(s.fallback.describe(), "version=v1");
    assert_eq!(s.zone.mode, ZoneMode::Prefer);
    assert_eq!(s.zone.local.as_deref(), Some("eu-1a"));
    assert_eq!(s.zone.min_share, 50);
    let any = &cfg.dynamic.upstreams[1].settings.subset;
    assert_eq!(any.fallback, Fallback::Any);
    assert_eq!(any.zone.mode, ZoneMode::Off);
    assert_eq!(any.zone.min_share, crate::zone::DEFAULT_ZONE_MIN_SHARE);
    let r = &cfg.dynamic.routes;
    assert_eq!(r[0].headers, vec![("x-canary".into(), "true".into())]);
    assert_eq!(
        r[0].split,
        vec![("pay-v1".into(), 90), ("pay-v2".into(), 10)]
    );
    assert!(r[0].upstream.is_empty());
    let rule = r[1].subset_from_header.as_ref().unwrap();
    assert_eq!(
        (rule.header.as_str(), rule.key.as_str()),
        ("x-version", "version")
    );
    // [agent] zone, when EDGE_AGENT_ZONE is unset.
    let cfg =
        load_toml("[agent]\nzone = \"b\"\n[[upstream]]\nid = \"a\"\nzone_aware = \"strict\"\n")
            .unwrap();
    assert_eq!(
        cfg.dynamic.upstreams[0]
            .settings
            .subset
            .zone
            .local
            .as_deref(),
        Some("b")
    );
}

/// #14 bad input: each refused naming the field and the value.
#[test]
fn bad_subsets_zones_and_splits_are_named() {
    let e = err_of(
        r#"
[[upstream]]
id = "a"
subset = {}
fallback = "sometimes"
zone_aware = "strict"
zone_min_share = 170

[[upstream]]
id = "b"
zone_aware = "nearby"
subset = { version = ["v1"] }

[[route]]
host = "x"
split = [{ upstream = "a", weight = 0 }, { upstream = "nope", weight = 0 }]

[[route]]
host = "y"
upstream = "a"
split = [{ upstream = "b", weight = 1 }]

[[route]]
host = "z"
upstream = "ghost"
subset_from_header = { header = "x-version" }

[[route]]
host = "w"
upstream = "a"
headers = { "bad header" = "1" }
subset_from_header = { key = "version" }
"#,
    );
    for needle in [
        "upstream[0].subset = {}: empty",
        "upstream[0].fallback = \"sometimes\": expected \"none\", \"any\" or a subset table",
        "upstream[0].zone_aware = \"strict\": this host has no zone; set EDGE_AGENT_ZONE",
        "upstream[0].zone_min_share = 170",
        "upstream[1].zone_aware = \"nearby\"",
        "upstream[1].subset.version = [\"v1\"]: expected a string, number or boolean",
        "route[0].split[1].upstream = \"nope\": no upstream with that id",
        "route[0].split: weights sum to 0 (0 + 0)",
        "route[1]: give either upstream or split, not both",
        "route[2].upstream = \"ghost\": no upstream with that id",
        "route[2].subset_from_header = { header = \"x-version\" }: no key",
        "route[3].headers = \"bad header\": not a valid header name",
        "route[3].subset_from_header: no header",
    ] {
        assert!(e.contains(needle), "missing {needle:?} in {e}");
    }
    let e = err_of("[[upstream]]\nid = \"a\"\n[[route]]\nhost = \"x\"\n");
    assert!(e.contains("route[0]: give upstream or split"), "{e}");
}

#[test]
fn outlier_detectors_are_read_and_bad_values_refused() {
    let c = load_toml(
        "[[upstream]]\nid = \"a\"\n[upstream.checks.passive]\ninterval = \"2s\"\nconsecutive_gateway_failures = 3\n[upstream.checks.passive.success_rate]\nstdev_factor = 1.5\nrequest_volume = 20\n[upstream.checks.passive.failure_percentage]\nthreshold = 40\n",
    )
    .unwrap();
    let p = &c.dynamic.upstreams[0].settings.passive;
    assert_eq!(p.interval, std::time::Duration::from_secs(2));
    assert_eq!(p.consecutive_gateway_failures, Some(3));
    let sr = p.success_rate.as_ref().unwrap();
    assert_eq!(
        (sr.stdev_factor, sr.request_volume, sr.minimum_hosts),
        (1.5, 20, 5)
    );
    assert_eq!(p.failure_percentage.as_ref().unwrap().threshold, 40);
    // Defaults: success rate on, failure percentage and gateway failures off.
    let d = load_toml("[[upstream]]\nid = \"a\"\n")
        .unwrap()
        .dynamic
        .upstreams[0]
        .settings
        .passive
        .clone();
    assert!(
        d.success_rate.is_some()
            && d.failure_percentage.is_none()
            && d.consecutive_gateway_failures.is_none()
    );
    let off = load_toml(
        "[[upstream]]\nid = \"a\"\n[upstream.checks.passive.success_rate]\nenabled = false\n",
    )
    .unwrap();
    assert!(off.dynamic.upstreams[0]
        .settings
        .passive
        .success_rate
        .is_none());
    for (table, line, want) in [
        (
            "success_rate",
            "stdev_factor = 0.0",
            "success_rate.stdev_factor = 0: must be greater than 0",
        ),
        (
            "success_rate",
            "stdev_factor = -1.0",
            "success_rate.stdev_factor = -1: must be greater than 0",
        ),
        (
            "success_rate",
            "minimum_hosts = 0",
            "success_rate.minimum_hosts = 0: must be at least 1",
        ),
        (
            "failure_percentage",
            "threshold = 101",
            "failure_percentage.threshold = 101: a percentage",
        ),
        (
            "failure_percentage",
            "request_volume = 0",
            "failure_percentage.request_volume = 0: must be at least 1",
        ),
    ] {
        let e = err_of(&format!(
            "[[upstream]]\nid = \"a\"\n[upstream.checks.passive.{table}]\n{line}\n"
        ));
        assert!(
            e.contains(&format!("upstream[0].checks.passive.{want}")),
            "{e}"
        );
    }
    let e = err_of(
        "[[upstream]]\nid = \"a\"\n[upstream.checks.passive]\nconsecutive_gateway_failures = 0\n",
    );
    assert!(
        e.contains("upstream[0].checks.passive.consecutive_gateway_failures = 0"),
        "{e}"
    );
}
