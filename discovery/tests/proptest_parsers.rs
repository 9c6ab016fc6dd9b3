//! Property tests for the parsers that take registry input: the file registry's TOML
//! (`discovery::file::parse`) and registry URLs (`discovery::from_url`). Issue #5.
//!
//! Each property runs 256 cases, so the file stays well under a few seconds in CI. The
//! libFuzzer targets under `fuzz/` (`make fuzz`) push the same parsers much harder.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use discovery::{file, Instance, DEFAULT_WEIGHT};
use proptest::prelude::*;

const CASES: u32 = 256;
/// Fewer cases for the properties whose inputs are large (files of several services) or
/// expensive to accept (registry clients with TLS), to stay within a few seconds in debug.
const HEAVY_CASES: u32 = 64;

/// A TOML basic string for `s`, valid as a value and as a key.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Any TOML value, including the wrong types for every field of the file registry.
fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<String>().prop_map(|s| quote(&s)),
        "[0-9a-f:.\\[\\]]{0,24}".prop_map(|s| quote(&s)),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<f64>().prop_map(|f| toml::Value::Float(f).to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec(("[a-z]{1,8}", inner), 0..4).prop_map(|kv| {
                let body: Vec<String> = kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", body.join(", "))
            }),
        ]
    })
}

/// A key the file registry knows (or almost knows) for an instance table.
fn instance_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("addr".to_string()),
        Just("id".to_string()),
        Just("weight".to_string()),
        Just("healthy".to_string()),
        Just("zone".to_string()),
        Just("metadata".to_string()),
        "[a-z]{1,6}",
    ]
}

/// Files shaped like a services file, with values of any type in every place.
fn wrong_file() -> impl Strategy<Value = String> {
    let instance = prop::collection::vec((instance_key(), toml_value()), 0..6).prop_map(|kv| {
        let body: Vec<String> = kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        format!("{{ {} }}", body.join(", "))
    });
    let instances = prop::collection::vec(prop_oneof![instance, toml_value()], 0..5);
    let service = (
        prop_oneof![
            toml_value(),
            "[a-zA-Z0-9_.\\- ]{0,10}".prop_map(|s| quote(&s))
        ],
        instances,
        proptest::option::of((instance_key(), toml_value())),
    )
        .prop_map(|(name, insts, extra)| {
            let mut s = format!("[[service]]\nname = {name}\ninstances = [\n");
            for i in insts {
                s.push_str(&format!("  {i},\n"));
            }
            s.push_str("]\n");
            if let Some((k, v)) = extra {
                s.push_str(&format!("{k} = {v}\n"));
            }
            s
        });
    prop::collection::vec(service, 0..4).prop_map(|v| v.concat())
}

/// One generated instance: what goes into the file, and what `parse` must make of it.
#[derive(Debug, Clone)]
struct GenInstance {
    addr: SocketAddr,
    id: Option<String>,
    weight: Option<u32>,
    healthy: Option<bool>,
    zone: Option<String>,
    metadata: BTreeMap<String, String>,
}

impl GenInstance {
    fn render(&self) -> String {
        let mut fields = vec![format!("addr = {}", quote(&self.addr.to_string()))];
        if let Some(id) = &self.id {
            fields.push(format!("id = {}", quote(id)));
        }
        if let Some(w) = self.weight {
            fields.push(format!("weight = {w}"));
        }
        if let Some(h) = self.healthy {
            fields.push(format!("healthy = {h}"));
        }
        if let Some(z) = &self.zone {
            fields.push(format!("zone = {}", quote(z)));
        }
        if !self.metadata.is_empty() {
            let kv: Vec<String> = self
                .metadata
                .iter()
                .map(|(k, v)| format!("{} = {}", quote(k), quote(v)))
                .collect();
            fields.push(format!("metadata = {{ {} }}", kv.join(", ")));
        }
        format!("{{ {} }}", fields.join(", "))
    }

    fn expected(&self) -> Instance {
        let mut inst = Instance::new(self.addr.ip().to_string(), self.addr.port());
        if let Some(id) = &self.id {
            inst.id = id.clone();
        }
        inst.weight = self.weight.unwrap_or(DEFAULT_WEIGHT);
        inst.healthy = self.healthy.unwrap_or(true);
        // A blank zone (empty or only whitespace) names no zone (the file registry's rule, as
        // for the other sources).
        inst.zone = self.zone.clone().filter(|z| !z.trim().is_empty());
        inst.metadata = self.metadata.clone();
        inst
    }
}

fn gen_instance() -> impl Strategy<Value = GenInstance> {
    let ip = prop_oneof![
        any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        any::<[u8; 16]>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        // Few distinct addresses, so duplicates (deduplicated by id) are common.
        (1u8..4).prop_map(|n| IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))),
    ];
    let port = prop_oneof![1u16..=65535, 8080u16..8083];
    (
        ip,
        port,
        proptest::option::of(any::<String>()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<String>()),
        prop::collection::btree_map(any::<String>(), any::<String>(), 0..3),
    )
        .prop_map(
            |(ip, port, id, weight, healthy, zone, metadata)| GenInstance {
                addr: SocketAddr::new(ip, port),
                id,
                weight,
                healthy,
                zone,
                metadata,
            },
        )
}

fn gen_services() -> impl Strategy<Value = BTreeMap<String, Vec<GenInstance>>> {
    prop::collection::btree_map(
        "[a-zA-Z0-9_.-]{1,20}",
        prop::collection::vec(gen_instance(), 0..5),
        0..4,
    )
}

fn render(services: &BTreeMap<String, Vec<GenInstance>>) -> String {
    let mut out = String::new();
    for (name, insts) in services {
        out.push_str(&format!(
            "[[service]]\nname = {}\ninstances = [\n",
            quote(name)
        ));
        for i in insts {
            out.push_str(&format!("  {},\n", i.render()));
        }
        out.push_str("]\n\n");
    }
    out
}

/// Registry URL shapes: every scheme the agent knows, plus some it does not.
fn url_like() -> impl Strategy<Value = String> {
    let scheme = prop_oneof![
        Just("file"),
        Just("consul"),
        Just("consul+https"),
        Just("eureka"),
        Just("eureka+https"),
        Just("nacos"),
        Just("http"),
        Just(""),
    ];
    let host = prop_oneof![
        Just("127.0.0.1".to_string()),
        Just("[::1]".to_string()),
        Just("user:p%41ss@h".to_string()),
        "[a-z0-9.:\\[\\]@%-]{0,20}",
    ];
    let port = proptest::option::of(prop_oneof![
        any::<u32>().prop_map(|p| p.to_string()),
        "[0-9a-z]{0,6}"
    ]);
    let path = "(/[a-zA-Z0-9%._~-]{0,10}){0,3}";
    let key = prop_oneof![
        Just("dc"),
        Just("tag"),
        Just("near"),
        Just("wait"),
        Just("idle_ttl"),
        Just("service"),
        Just("server"),
        Just("interval"),
        Just("timeout"),
        Just("namespace"),
        Just("group"),
        Just("clusters"),
        Just("x"),
    ];
    let value = prop_oneof![
        any::<String>(),
        "[0-9]{0,20}(ms|s|m|h|d|)",
        "[a-z0-9:/@%.,-]{0,20}",
    ];
    let query = prop::collection::vec((key, value), 0..5);
    (scheme, host, port, path, query).prop_map(|(scheme, host, port, path, query)| {
        let mut u = format!("{scheme}://{host}");
        if let Some(p) = port {
            u.push(':');
            u.push_str(&p);
        }
        u.push_str(&path);
        for (i, (k, v)) in query.iter().enumerate() {
            u.push(if i == 0 { '?' } else { '&' });
            u.push_str(&format!("{k}={v}"));
        }
        u
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(CASES)
    })]

    /// Arbitrary text: `parse` answers `Ok` or `Err`, never panics.
    #[test]
    fn file_parse_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = file::parse(&text);
    }

    /// Arbitrary text as a registry URL: `Ok` or `Err`, never a panic.
    #[test]
    fn from_url_never_panics_on_arbitrary_text(url in any::<String>()) {
        let _ = discovery::from_url(&url);
    }

}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(HEAVY_CASES)
    })]

    /// Files shaped like a services file with values of the wrong type anywhere: no panic, and
    /// an `Ok` never holds an instance with port 0 or an empty service name.
    #[test]
    fn file_parse_never_panics_on_wrong_toml(text in wrong_file()) {
        if let Ok(parsed) = file::parse(&text) {
            for (name, insts) in &parsed.services {
                prop_assert!(!name.is_empty());
                prop_assert!(insts.iter().all(|i| i.port != 0), "{text}");
            }
        }
    }

    /// Valid generated services, rendered to TOML and parsed, come back as generated (sorted,
    /// one instance per id, defaults applied) with nothing skipped.
    #[test]
    fn file_parse_round_trips_valid_services(services in gen_services()) {
        let text = render(&services);
        let parsed = file::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        let expected: BTreeMap<String, Vec<Instance>> = services
            .iter()
            .map(|(name, insts)| {
                let mut v: Vec<Instance> = insts.iter().map(GenInstance::expected).collect();
                v.sort();
                v.dedup_by(|a, b| a.id == b.id);
                (name.clone(), v)
            })
            .collect();
        prop_assert_eq!(parsed.services, expected);
    }

    /// URL-shaped text for every scheme (odd hosts, ports, paths, query values): never a panic.
    #[test]
    fn from_url_never_panics_on_url_shaped_text(url in url_like()) {
        let _ = discovery::from_url(&url);
    }
}
