//! The local copy of a Eureka server's registry, deltas applied to it, Eureka's reconciliation
//! hash, and one fetch round that keeps the copy in step with the server.
use std::collections::BTreeMap;

use super::wire::{Action, Answer, Entry};
use super::{EurekaDiscovery, Server};
use crate::http::Failure;
use crate::{ErrorKind, Instance, Sink};

/// The local copy of the server's registry: app (as Eureka spells it) → instance id → entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Registry {
    apps: BTreeMap<String, BTreeMap<String, Entry>>,
}

impl Registry {
    /// The registry a full fetch describes (actions ignored).
    pub fn from_full(answer: &Answer) -> Registry {
        let mut reg = Registry::default();
        for item in &answer.items {
            reg.apps
                .entry(item.app.clone())
                .or_default()
                .insert(item.id.clone(), item.entry.clone());
        }
        reg
    }

    /// Applies a delta: ADDED and MODIFIED replace or add, DELETED removes. Returns messages
    /// for entries with an unknown action (ignored, as the Java client does).
    pub fn apply_delta(&mut self, delta: &Answer) -> Vec<String> {
        let mut ignored = Vec::new();
        for item in &delta.items {
            match &item.action {
                Action::Added | Action::Modified => {
                    self.apps
                        .entry(item.app.clone())
                        .or_default()
                        .insert(item.id.clone(), item.entry.clone());
                }
                Action::Deleted => {
                    if let Some(app) = self.apps.get_mut(&item.app) {
                        app.remove(&item.id);
                        if app.is_empty() {
                            self.apps.remove(&item.app);
                        }
                    }
                }
                Action::Other(a) => ignored.push(format!(
                    "app {} instance {:?}: actionType {a:?} unknown; ignored",
                    item.app, item.id
                )),
            }
        }
        ignored
    }

    /// Puts one app as a direct read found it in place of what the copy had of it.
    pub fn replace_app(&mut self, answer: &Answer) {
        let mut fresh: BTreeMap<String, BTreeMap<String, Entry>> = BTreeMap::new();
        for item in &answer.items {
            fresh
                .entry(item.app.clone())
                .or_default()
                .insert(item.id.clone(), item.entry.clone());
        }
        self.apps.extend(fresh);
    }

    /// Eureka's reconciliation hash: `STATUS_count_` for every status present, sorted by name.
    pub fn hashcode(&self) -> String {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for entry in self.apps.values().flat_map(BTreeMap::values) {
            *counts.entry(entry.status.as_str()).or_default() += 1;
        }
        counts.iter().map(|(s, n)| format!("{s}_{n}_")).collect()
    }

    /// Number of instance entries (parsed or not).
    pub fn len(&self) -> usize {
        self.apps.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    /// Every app, lower-cased, with the instances that parsed. Apps with none are left out.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<Instance>> {
        let mut out: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        for (app, entries) in &self.apps {
            let instances: Vec<Instance> = entries
                .values()
                .filter_map(|e| e.instance.clone())
                .collect();
            if !instances.is_empty() {
                out.entry(app.to_lowercase()).or_default().extend(instances);
            }
        }
        for set in out.values_mut() {
            set.sort();
        }
        out
    }
}

/// What one successful round did, for the log.
pub(super) enum Round {
    Full { reason: &'static str, bytes: usize },
    Delta { changes: usize, bytes: usize },
}

impl EurekaDiscovery {
    async fn full(&self, server: &Server, sink: &Sink) -> Result<(Registry, usize), Failure> {
        let (answer, bytes) = self.fetch_answer(server, "/apps", sink).await?;
        Ok((Registry::from_full(&answer), bytes))
    }

    /// One round: a full fetch when there is no local copy, else a delta (and a full fetch
    /// when the hash disagrees).
    pub(super) async fn round(
        &self,
        server: &Server,
        local: &mut Option<Registry>,
        sink: &Sink,
    ) -> Result<Round, Failure> {
        let Some(reg) = local.as_mut() else {
            let (reg, bytes) = self.full(server, sink).await?;
            *local = Some(reg);
            return Ok(Round::Full {
                reason: "start",
                bytes,
            });
        };
        let (delta, bytes) = self.fetch_answer(server, "/apps/delta", sink).await?;
        let mut next = reg.clone();
        for p in next.apply_delta(&delta) {
            sink.error(ErrorKind::Parse, format!("eureka {}: {p}", server.display))
                .await;
        }
        let ours = next.hashcode();
        if delta.hashcode.as_deref() == Some(ours.as_str()) {
            *reg = next;
            return Ok(Round::Delta {
                changes: delta.items.len(),
                bytes,
            });
        }
        tracing::info!(
            server = %server.display,
            local = %ours,
            remote = delta.hashcode.as_deref().unwrap_or("<none>"),
            "eureka delta hash mismatch: full fetch"
        );
        *local = None;
        let (reg, full_bytes) = self.full(server, sink).await?;
        *local = Some(reg);
        Ok(Round::Full {
            reason: "hash mismatch",
            bytes: bytes + full_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::parse_answer;
    use super::super::wire::tests::{apps, inst};
    use super::*;

    #[test]
    fn deltas_apply_and_the_hash_reconciles() {
        let full = apps(
            "UP_2_",
            "HELLO",
            vec![inst("a", "UP", 1, "ADDED"), inst("b", "UP", 2, "ADDED")],
        );
        let mut reg = Registry::from_full(&parse_answer(&full).unwrap());
        let delta = serde_json::json!({"applications": {"apps__hashcode": "OUT_OF_SERVICE_1_UP_2_", "application": [
            {"name": "HELLO", "instance": [inst("a", "OUT_OF_SERVICE", 1, "MODIFIED"), inst("b", "UP", 2, "DELETED")]},
            {"name": "OTHER", "instance": inst("c", "UP", 3, "ADDED")},
            {"name": "HELLO", "instance": [inst("d", "UP", 4, "ADDED")]}
        ]}});
        let delta = parse_answer(&delta).unwrap();
        assert!(reg.apply_delta(&delta).is_empty());
        assert_eq!(reg.hashcode(), "OUT_OF_SERVICE_1_UP_2_");
        assert_eq!(delta.hashcode.as_deref(), Some(reg.hashcode().as_str()));
        let snap = reg.snapshot();
        let ids: Vec<(&str, bool)> = snap["hello"]
            .iter()
            .map(|i| (i.id.as_str(), i.healthy))
            .collect();
        assert_eq!(ids, vec![("a", false), ("d", true)]);
        assert_eq!(snap["other"][0].port, 3);
        // Deleting the last instance of an app drops the app; deleting the unknown is a no-op.
        let del = parse_answer(&apps(
            "X",
            "OTHER",
            vec![
                inst("c", "UP", 3, "DELETED"),
                inst("zz", "UP", 3, "DELETED"),
            ],
        ))
        .unwrap();
        reg.apply_delta(&del);
        assert!(!reg.snapshot().contains_key("other"));
        // A delta that cannot explain the server's hash: mismatch.
        assert_ne!(del.hashcode.as_deref(), Some(reg.hashcode().as_str()));
        // An unknown action is reported and ignored.
        let odd = parse_answer(&apps("", "HELLO", vec![inst("a", "UP", 1, "RENAMED")])).unwrap();
        assert_eq!(reg.apply_delta(&odd).len(), 1);
    }
}
