//! A hand-written fake registry for fault tests: one hyper server on 127.0.0.1 that speaks just
//! enough Eureka (`/eureka/apps`, `/eureka/apps/delta`) and Consul (`/v1/catalog/services`,
//! `/v1/health/service/<svc>` with `X-Consul-Index` blocking queries) to serve a set of
//! backends, and that can be switched into faults real servers do not produce on demand.
//!
//! It is used *in addition to* the real servers (`servers.rs`), never instead of them: it checks
//! what the agent does with bad answers, not that the adapters speak the real protocols.
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Longest time a `Hang` answer is held (it is released earlier when the fault changes).
pub const HANG_MAX: Duration = Duration::from_secs(20);
/// Longest time a Consul blocking query is held when nothing changed (a real server holds it
/// for `wait`; short here so a test never waits on the fake).
pub const BLOCK_MAX: Duration = Duration::from_millis(250);
/// The Consul index the fake starts from.
pub const START_INDEX: u64 = 100;

/// How the fake answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Every backend, well-formed.
    Healthy,
    /// `200` with a body that is not JSON.
    Garbage,
    /// `200` with the healthy body cut in half.
    Truncated,
    /// `500` with a text body.
    Status500,
    /// The request is read and never answered (until the fault changes or [`HANG_MAX`]).
    Hang,
    /// A valid answer with no instances (Consul: the catalog forgets the services too).
    Empty,
    /// Consul: the healthy body, with an `X-Consul-Index` lower than the previous answer's.
    /// Eureka answers as `Healthy`.
    IndexBackwards,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::Healthy => "Healthy",
            Fault::Garbage => "Garbage",
            Fault::Truncated => "Truncated",
            Fault::Status500 => "Status500",
            Fault::Hang => "Hang",
            Fault::Empty => "Empty",
            Fault::IndexBackwards => "IndexBackwards",
        }
    }
}

/// What the fake has answered, by endpoint kind and fault (for tests to check a fault was
/// actually seen by the agent, and that it came back afterwards).
#[derive(Debug, Default, Clone)]
pub struct Served {
    /// (kind, fault) → count; kinds: `eureka-apps`, `eureka-delta`, `consul-catalog`,
    /// `consul-health`.
    pub counts: HashMap<(&'static str, Fault), u64>,
}

impl Served {
    pub fn get(&self, kind: &str, fault: Fault) -> u64 {
        self.counts
            .iter()
            .filter(|((k, f), _)| *k == kind && *f == fault)
            .map(|(_, n)| *n)
            .sum()
    }
}

struct State {
    services: Vec<(String, Vec<SocketAddr>)>,
    index: u64,
    backwards: u64,
    served: Served,
}

/// The fake registry server; stops when dropped.
pub struct FakeRegistry {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    fault: watch::Sender<Fault>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeRegistry {
    /// Starts serving `services` (name → instance addresses), healthy.
    pub async fn start(services: &[(&str, &[SocketAddr])]) -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            services: services
                .iter()
                .map(|(n, a)| (n.to_string(), a.to_vec()))
                .collect(),
            index: START_INDEX,
            backwards: START_INDEX,
            served: Served::default(),
        }));
        let (fault, fault_rx) = watch::channel(Fault::Healthy);
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (st, rx) = (st.clone(), fault_rx.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (st, rx) = (st.clone(), rx.clone());
                        async move { answer(req, st, rx).await }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                // Reap finished connections so the set stays small.
                while conns.try_join_next().is_some() {}
            }
        });
        FakeRegistry {
            addr,
            state,
            fault,
            task,
        }
    }

    /// `eureka://…/eureka?…` with the given query.
    pub fn eureka_url(&self, query: &str) -> String {
        format!("eureka://{}/eureka?{query}", self.addr)
    }

    /// `consul://…?…` with the given query.
    pub fn consul_url(&self, query: &str) -> String {
        format!("consul://{}?{query}", self.addr)
    }

    /// Switches the fault; the Consul index moves so blocked queries see a change.
    pub fn set_fault(&self, f: Fault) {
        {
            let mut s = self.state.lock().unwrap();
            s.index += 1;
            s.backwards = s.index;
        }
        self.fault.send_replace(f);
    }

    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    pub fn served(&self) -> Served {
        self.state.lock().unwrap().served.clone()
    }

    /// Stops accepting and drops every open connection (the registry is down).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Resp = Response<Full<Bytes>>;

fn resp(status: u16, index: Option<u64>, body: String) -> Resp {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if let Some(i) = index {
        b = b.header("x-consul-index", i.to_string());
    }
    b.body(Full::new(Bytes::from(body))).unwrap()
}

/// Parses a Consul `wait` value (`250ms`, `1s`, `2m`), capped at [`BLOCK_MAX`].
fn block_for(query: &str) -> Duration {
    let wait = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("wait="))
        .and_then(|w| {
            if let Some(ms) = w.strip_suffix("ms") {
                ms.parse().ok().map(Duration::from_millis)
            } else if let Some(s) = w.strip_suffix('s') {
                s.parse().ok().map(Duration::from_secs)
            } else if let Some(m) = w.strip_suffix('m') {
                m.parse::<u64>().ok().map(|m| Duration::from_secs(m * 60))
            } else {
                None
            }
        })
        .unwrap_or(BLOCK_MAX);
    wait.min(BLOCK_MAX)
}

fn query_index(query: &str) -> Option<u64> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("index="))
        .and_then(|i| i.parse().ok())
}

fn eureka_instance(app: &str, i: usize, a: &SocketAddr, action: Option<&str>) -> String {
    let action = action
        .map(|a| format!(",\"actionType\":\"{a}\""))
        .unwrap_or_default();
    format!(
        "{{\"instanceId\":\"{app}-{i}\",\"hostName\":\"{ip}\",\"app\":\"{app}\",\
         \"ipAddr\":\"{ip}\",\"status\":\"UP\",\"port\":{{\"$\":{port},\"@enabled\":\"true\"}},\
         \"securePort\":{{\"$\":443,\"@enabled\":\"false\"}},\"metadata\":{{\"weight\":\"1\"}}{action}}}",
        ip = a.ip(),
        port = a.port()
    )
}

/// A Eureka `/apps` answer (`delta`: an empty delta carrying the same hash).
fn eureka_body(services: &[(String, Vec<SocketAddr>)], delta: bool) -> String {
    let n: usize = services.iter().map(|(_, a)| a.len()).sum();
    let hash = if n == 0 {
        String::new()
    } else {
        format!("UP_{n}_")
    };
    let apps: Vec<String> = if delta {
        Vec::new()
    } else {
        services
            .iter()
            .filter(|(_, a)| !a.is_empty())
            .map(|(name, addrs)| {
                let app = name.to_ascii_uppercase();
                let inst: Vec<String> = addrs
                    .iter()
                    .enumerate()
                    .map(|(i, a)| eureka_instance(&app, i, a, None))
                    .collect();
                format!("{{\"name\":\"{app}\",\"instance\":[{}]}}", inst.join(","))
            })
            .collect()
    };
    format!(
        "{{\"applications\":{{\"versions__delta\":\"1\",\"apps__hashcode\":\"{hash}\",\
         \"application\":[{}]}}}}",
        apps.join(",")
    )
}

fn consul_catalog(services: &[(String, Vec<SocketAddr>)]) -> String {
    let mut names = vec!["\"consul\":[]".to_string()];
    names.extend(
        services
            .iter()
            .filter(|(_, a)| !a.is_empty())
            .map(|(n, _)| format!("\"{n}\":[]")),
    );
    format!("{{{}}}", names.join(","))
}

fn consul_health(name: &str, addrs: &[SocketAddr]) -> String {
    let entries: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            format!(
                "{{\"Node\":{{\"Node\":\"node{i}\",\"Address\":\"{ip}\"}},\
                 \"Service\":{{\"ID\":\"{name}-{i}\",\"Service\":\"{name}\",\"Tags\":[],\
                 \"Address\":\"{ip}\",\"Port\":{port},\"Meta\":{{}},\
                 \"Weights\":{{\"Passing\":1,\"Warning\":1}}}},\"Checks\":[]}}",
                ip = a.ip(),
                port = a.port()
            )
        })
        .collect();
    format!("[{}]", entries.join(","))
}

async fn answer(
    req: Request<Incoming>,
    st: Arc<Mutex<State>>,
    mut rx: watch::Receiver<Fault>,
) -> Result<Resp, Infallible> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let kind: &'static str = match path.as_str() {
        "/eureka/apps" | "/eureka/apps/" => "eureka-apps",
        "/eureka/apps/delta" => "eureka-delta",
        "/v1/catalog/services" => "consul-catalog",
        p if p.starts_with("/v1/health/service/") => "consul-health",
        _ => return Ok(resp(404, None, "not found".into())),
    };
    let consul = kind.starts_with("consul");
    // Consul blocking query: when the caller already has the current index, hold the answer
    // a little (or until the fault changes).
    if consul {
        let current = st.lock().unwrap().index;
        if query_index(&query).is_some_and(|i| i >= current) {
            let _ = tokio::time::timeout(block_for(&query), rx.changed()).await;
        }
    }
    let fault = *rx.borrow_and_update();
    {
        let mut s = st.lock().unwrap();
        *s.served.counts.entry((kind, fault)).or_insert(0) += 1;
    }
    if fault == Fault::Hang {
        // Read, never answered while the fault lasts; then the connection is dropped.
        let _ = tokio::time::timeout(HANG_MAX, async {
            while *rx.borrow_and_update() == Fault::Hang {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        return Ok(resp(503, None, "hang released".into()));
    }
    let (services, index) = {
        let mut s = st.lock().unwrap();
        let index = if fault == Fault::IndexBackwards {
            s.backwards = s.backwards.saturating_sub(7).max(1);
            s.backwards
        } else {
            s.index
        };
        let services = if fault == Fault::Empty {
            s.services
                .iter()
                .map(|(n, _)| (n.clone(), Vec::new()))
                .collect()
        } else {
            s.services.clone()
        };
        (services, index)
    };
    let idx = consul.then_some(index);
    let healthy = match kind {
        "eureka-apps" => eureka_body(&services, false),
        "eureka-delta" => eureka_body(&services, true),
        "consul-catalog" => consul_catalog(&services),
        _ => {
            let name = path.trim_start_matches("/v1/health/service/");
            match services.iter().find(|(n, _)| n == name) {
                Some((n, a)) => consul_health(n, a),
                None => "[]".into(),
            }
        }
    };
    Ok(match fault {
        Fault::Garbage => resp(200, idx, "{\"applications\": <html>oops</html".into()),
        Fault::Truncated => {
            let cut = healthy.len() / 2;
            resp(200, idx, healthy[..cut].to_string())
        }
        Fault::Status500 => resp(500, idx, "internal error".into()),
        _ => resp(200, idx, healthy),
    })
}
