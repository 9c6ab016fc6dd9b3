//! Validation of the subset, zone, header-match and split keys (#14): an upstream's `subset`,
//! `fallback`, `zone_aware`, `zone_min_share`; a route's `headers`, `subset_from_header` and
//! `split`. Every problem names the field and the value.
use std::collections::BTreeMap;
use std::sync::Arc;

use super::file::{RouteFile, UpstreamFile};
use crate::route::HeaderRule;
use crate::subset::{Fallback, Selector, SubsetSettings};
use crate::upstream::UpstreamConfig;
use crate::zone::{ZoneMode, ZoneSettings, DEFAULT_ZONE_MIN_SHARE};

/// A TOML value as the string subsets compare (strings as they are; integers, floats and
/// booleans as written), or `None` for a table, an array or a date.
fn as_string(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn selector(field: &str, raw: &BTreeMap<String, toml::Value>, errs: &mut Vec<String>) -> Selector {
    if raw.is_empty() {
        errs.push(format!(
            "{field} = {{}}: empty; name at least one metadata key, or remove it"
        ));
    }
    let mut out = BTreeMap::new();
    for (k, v) in raw {
        if k.trim().is_empty() {
            errs.push(format!("{field}: an empty metadata key"));
            continue;
        }
        match as_string(v) {
            Some(s) => {
                out.insert(k.clone(), s);
            }
            None => errs.push(format!(
                "{field}.{k} = {v}: expected a string, number or boolean"
            )),
        }
    }
    Selector(out)
}

/// The subset and zone settings of the upstream at `at`; `zone` is the agent's zone.
pub(super) fn upstream(
    at: &str,
    u: &UpstreamFile,
    zone: Option<&str>,
    errs: &mut Vec<String>,
) -> SubsetSettings {
    let chosen = match &u.subset {
        Some(raw) => selector(&format!("{at}.subset"), raw, errs),
        None => Selector::default(),
    };
    let fallback = match &u.fallback {
        None => Fallback::None,
        Some(toml::Value::String(s)) if s == "none" => Fallback::None,
        Some(toml::Value::String(s)) if s == "any" => Fallback::Any,
        Some(toml::Value::Table(t)) => {
            let raw: BTreeMap<String, toml::Value> =
                t.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            Fallback::Subset(selector(&format!("{at}.fallback"), &raw, errs))
        }
        Some(other) => {
            errs.push(format!(
                "{at}.fallback = {other}: expected \"none\", \"any\" or a subset table such as {{ version = \"v1\" }}"
            ));
            Fallback::None
        }
    };
    let mode = match u.zone_aware.as_deref().map(str::trim) {
        None => ZoneMode::Off,
        Some(m) => ZoneMode::parse(m).unwrap_or_else(|| {
            errs.push(format!(
                "{at}.zone_aware = {m:?}: expected \"off\", \"prefer\" or \"strict\""
            ));
            ZoneMode::Off
        }),
    };
    if mode != ZoneMode::Off && zone.is_none() {
        errs.push(format!(
            "{at}.zone_aware = {:?}: this host has no zone; set EDGE_AGENT_ZONE (or [agent] zone)",
            mode.name()
        ));
    }
    let min_share = match u.zone_min_share {
        Some(p) if p > 100 => {
            errs.push(format!("{at}.zone_min_share = {p}: a percentage, 0 to 100"));
            DEFAULT_ZONE_MIN_SHARE
        }
        Some(p) => p,
        None => DEFAULT_ZONE_MIN_SHARE,
    };
    SubsetSettings {
        selector: chosen,
        fallback,
        zone: ZoneSettings {
            mode,
            local: zone.map(Arc::from),
            min_share,
        },
    }
}

/// What a route has besides host and path: `(upstream, headers, subset_from_header, split)`.
pub(super) type RouteExtras = (
    String,
    Vec<(String, String)>,
    Option<HeaderRule>,
    Vec<(String, u32)>,
);

fn header_name(field: &str, name: &str, errs: &mut Vec<String>) -> String {
    let lower = name.trim().to_ascii_lowercase();
    if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
        errs.push(format!("{field} = {name:?}: not a valid header name"));
    }
    lower
}

pub(super) fn route(
    at: &str,
    r: &RouteFile,
    ups: &[UpstreamConfig],
    errs: &mut Vec<String>,
) -> RouteExtras {
    let known = |id: &str| ups.iter().any(|u| u.id == id);
    let upstream = match (&r.upstream, &r.split) {
        (Some(u), None) => {
            if !known(u) {
                errs.push(format!("{at}.upstream = {u:?}: no upstream with that id"));
            }
            u.clone()
        }
        (None, Some(_)) => String::new(),
        (Some(_), Some(_)) => {
            errs.push(format!("{at}: give either upstream or split, not both"));
            String::new()
        }
        (None, None) => {
            errs.push(format!("{at}: give upstream or split"));
            String::new()
        }
    };
    let mut split = Vec::new();
    if let Some(list) = &r.split {
        if list.is_empty() {
            errs.push(format!("{at}.split = []: name at least one upstream"));
        }
        for (j, s) in list.iter().enumerate() {
            if !known(&s.upstream) {
                errs.push(format!(
                    "{at}.split[{j}].upstream = {:?}: no upstream with that id",
                    s.upstream
                ));
            }
            split.push((s.upstream.clone(), s.weight));
        }
        if !list.is_empty() && list.iter().all(|s| s.weight == 0) {
            let ws: Vec<String> = list.iter().map(|s| s.weight.to_string()).collect();
            errs.push(format!(
                "{at}.split: weights sum to 0 ({}); give at least one a weight",
                ws.join(" + ")
            ));
        }
    }
    let mut headers = Vec::new();
    for (name, value) in r.headers.iter().flatten() {
        let n = header_name(&format!("{at}.headers"), name, errs);
        headers.push((n, value.clone()));
    }
    let rule = r.subset_from_header.as_ref().map(|h| {
        let header = match h.header.as_deref() {
            Some(n) if !n.trim().is_empty() => {
                header_name(&format!("{at}.subset_from_header.header"), n, errs)
            }
            _ => {
                errs.push(format!(
                    "{at}.subset_from_header: no header (e.g. {{ header = \"x-version\", key = \"version\" }})"
                ));
                String::new()
            }
        };
        let key = match h.key.as_deref().map(str::trim) {
            Some(k) if !k.is_empty() => k.to_string(),
            _ => {
                errs.push(format!(
                    "{at}.subset_from_header = {{ header = {:?} }}: no key (the metadata key the header's value selects, e.g. key = \"version\")",
                    h.header.as_deref().unwrap_or_default()
                ));
                String::new()
            }
        };
        HeaderRule { header, key }
    });
    (upstream, headers, rule, split)
}
