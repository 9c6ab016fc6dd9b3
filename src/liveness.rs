//! Liveness of each discovery source (#17): a hung registry is seen within seconds, whatever
//! its watches' `wait`.
//!
//! A Consul blocking query (default `wait=5m`) or a push stream returns only on change, so a
//! registry that stops answering (SIGSTOP, a hung JVM) looks exactly like a quiet one: no
//! error, no `last_error`, staleness growing as it does when nothing changes. Beside its
//! watches every source that has one runs a cheap call ([`Discovery::liveness`]: Consul
//! `GET /v1/status/leader`, Eureka and Nacos a request any server answers at once) every
//! [`LIVENESS_INTERVAL`], bounded by `discovery::LIVENESS_TIMEOUT`. A failure is a discovery
//! error like any other (counted by kind, `last_error` set, through the cache task), and
//! `edge_agent_discovery_source_up{source}` says at a glance whether every source of a kind
//! answers (1) or not (0). The last good view is untouched either way.
//!
//! Layer 6 (a task beside the cache): it knows sources and metrics, nothing of the table.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use discovery::{Discovery, ErrorKind, Event, Sink};
use tokio::sync::mpsc;

use crate::metrics as m;

/// How often each source's liveness call runs.
pub const LIVENESS_INTERVAL: Duration = Duration::from_secs(5);
/// Slack over the adapters' own timeout, in case one does not bound its call.
const GUARD: Duration = Duration::from_millis(500);

/// Runs the liveness calls of `sources` forever (returns at once when none has one).
pub async fn run(sources: Vec<Arc<dyn Discovery>>, tx: mpsc::Sender<(usize, Event)>) {
    if !sources.iter().any(|s| s.clone().liveness().is_some()) {
        return;
    }
    let mut tick = tokio::time::interval(LIVENESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_up: Vec<Option<bool>> = vec![None; sources.len()];
    loop {
        tick.tick().await;
        let mut calls = tokio::task::JoinSet::new();
        for (i, src) in sources.iter().enumerate() {
            if let Some(call) = src.clone().liveness() {
                calls.spawn(async move {
                    let limit = discovery::LIVENESS_TIMEOUT + GUARD;
                    let r = match tokio::time::timeout(limit, call).await {
                        Ok(r) => r,
                        Err(_) => Err((
                            ErrorKind::Timeout,
                            format!("liveness: no answer in {limit:?}"),
                        )),
                    };
                    (i, r)
                });
            }
        }
        let mut by_kind: BTreeMap<&'static str, bool> = BTreeMap::new();
        while let Some(done) = calls.join_next().await {
            let Ok((i, result)) = done else { continue };
            let src = &sources[i];
            let up = result.is_ok();
            *by_kind.entry(src.kind()).or_insert(true) &= up;
            match result {
                Ok(()) => {
                    if was_up[i] == Some(false) {
                        tracing::info!(source = src.kind(), url = %src.describe(), "registry answers again");
                    }
                }
                Err((kind, message)) => {
                    if was_up[i] != Some(false) {
                        tracing::warn!(source = src.kind(), url = %src.describe(), error = %message, "registry does not answer its liveness call");
                    }
                    if !Sink::new(i, tx.clone())
                        .send(Event::Error { kind, message })
                        .await
                    {
                        return;
                    }
                }
            }
            was_up[i] = Some(up);
        }
        for (kind, up) in by_kind {
            metrics::gauge!(m::DISCOVERY_SOURCE_UP, "source" => kind).set(if up {
                1.0
            } else {
                0.0
            });
        }
    }
}
