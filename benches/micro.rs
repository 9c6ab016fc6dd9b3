//! Micro-benchmarks of the agent's hot and warm paths (`make bench` runs them; see
//! BENCHMARKS.md): balancer pick cost by size, consistent-hash lookup, metrics recording per
//! request, the snapshot build-and-swap that follows a one-endpoint registry change, and the
//! pick through subsets and zones (#14) beside the bare pick, interleaved; and an HTTP/1.1
//! request head parsed and written back for the upstream (#15): `h1/ours` through
//! `edge_agent::h1`, `h1/headermap` the same work the way hyper does it (httparse into an
//! `http::HeaderMap`, the proxy's header changes, the map serialised back).
//!
//! Measurement is kept short (`sample_size(20)`, 2 s) so the whole `make bench` stays within
//! its time budget; the figures are medians, good to a few percent on a quiet machine.
use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use discovery::{Event, Instance, Update};
use edge_agent::balancer::chash::{self, HashOn};
use edge_agent::balancer::{Candidates, Options, PickContext, Rng, Spec};
use edge_agent::cache::Cache;
use edge_agent::endpoint::Endpoint;
use edge_agent::metrics::UpstreamMetrics;
use edge_agent::state::{SourceStatus, State};
use edge_agent::subset::{Selector, SubsetSettings, Subsets};
use edge_agent::table::Dynamic;
use edge_agent::zone::{ZoneMode, ZoneSettings, DEFAULT_ZONE_MIN_SHARE};

const SIZES: [usize; 3] = [3, 100, 1_000];
const BALANCERS: [&str; 4] = ["roundrobin", "chash", "ewma", "least_conn"];

fn endpoints(n: usize) -> Vec<Endpoint> {
    (0..n)
        .map(|i| {
            let inst = Instance::new(format!("10.0.{}.{}", i / 250, i % 250 + 1), 8080);
            Endpoint::from_instance(&inst, "file", Default::default()).expect("valid address")
        })
        .collect()
}

fn spec(name: &str) -> Spec {
    let options = Options {
        hash_on: (name == "chash").then_some("header:x-user"),
        ewma_decay: edge_agent::load::DEFAULT_DECAY,
    };
    Spec::new(name, &options).expect("registered balancer")
}

static RNG: Rng = Rng::new(1);

fn ctx() -> PickContext<'static> {
    PickContext {
        key: None,
        now_ms: edge_agent::clock::now_ms(),
        panic: false,
        slow_start: None,
        rng: &RNG,
    }
}

/// A different key on every call, so chash does not hit one cached slot.
fn next_key(counter: &AtomicU64) -> u64 {
    let k = counter.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    k ^ (k >> 29)
}

/// One pick: the first candidate of a request (what the proxy does before the first try).
fn picks(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for name in BALANCERS {
        let spec = spec(name);
        for n in SIZES {
            let eps = endpoints(n);
            let b = spec.build(&eps);
            let base = ctx();
            let counter = AtomicU64::new(1);
            g.bench_with_input(BenchmarkId::new(name, n), &n, |bench, _| {
                bench.iter(|| {
                    let mut cx = base;
                    if name == "chash" {
                        cx.key = Some(next_key(&counter));
                    }
                    let mut cands = Candidates::new(b.as_ref(), &eps, cx);
                    black_box(cands.next())
                })
            });
        }
    }
    g.finish();
}

/// chash end to end on the request path: hash the header value, then look up the table.
fn chash_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("chash_lookup");
    let on = HashOn::Header(http::HeaderName::from_static("x-user"));
    let uri: http::Uri = "/api/items?id=7".parse().expect("static uri");
    let ip = IpAddr::from([127, 0, 0, 1]);
    let mut headers = http::HeaderMap::new();
    for n in [100, 1_000] {
        let eps = endpoints(n);
        let b = spec("chash").build(&eps);
        let base = ctx();
        let mut user = 0u32;
        g.bench_with_input(BenchmarkId::new("header_key+pick", n), &n, |bench, _| {
            bench.iter(|| {
                user = user.wrapping_add(1);
                headers.insert(
                    "x-user",
                    http::HeaderValue::from(user % 100_000 + 1_000_000),
                );
                let mut cx = base;
                cx.key = chash::request_key(&on, &headers, &uri, ip);
                let mut cands = Candidates::new(b.as_ref(), &eps, cx);
                black_box(cands.next())
            })
        });
    }
    g.finish();
}

/// What the proxy records per finished request (histogram + status counter), with the real
/// Prometheus recorder installed.
fn metrics_record(c: &mut Criterion) {
    let _handle = edge_agent::metrics::install();
    let m = UpstreamMetrics::new("bench");
    let mut g = c.benchmark_group("metrics");
    g.bench_function("request_200", |bench| {
        bench.iter(|| {
            m.request(
                black_box(edge_agent::metrics::Protocol::Http1),
                black_box(200),
                black_box(Duration::from_micros(850)),
            )
        })
    });
    g.bench_function("request_503", |bench| {
        bench.iter(|| {
            m.request(
                black_box(edge_agent::metrics::Protocol::Http1),
                black_box(503),
                black_box(Duration::from_micros(850)),
            )
        })
    });
    g.finish();
}

fn new_cache() -> Cache {
    let state = State::new(vec![SourceStatus::new("file", "file://bench".into())]);
    Cache::new(state, Dynamic::default())
}

fn inst(svc: usize, i: usize) -> Instance {
    Instance::new(
        format!("10.{}.{}.{}", svc / 250, svc % 250, i % 250 + 1),
        8000 + (i / 250) as u16,
    )
}

/// A one-endpoint change in one service of a table holding `services × per_service`
/// endpoints: the event applied to the cache, the changed upstream rebuilt (endpoint states
/// carried over, balancer built) and the new table stored. The change flips one instance's
/// weight (an `Update::Add` of the same id), so the mass-removal guard never holds it back.
fn snapshot_swap(c: &mut Criterion) {
    let _handle = edge_agent::metrics::install();
    let mut g = c.benchmark_group("snapshot_one_endpoint_change");
    for (services, per_service) in [(1_000usize, 1usize), (1_000, 10), (1, 10_000)] {
        let mut cache = new_cache();
        let all: BTreeMap<String, Vec<Instance>> = (0..services)
            .map(|s| {
                let set = (0..per_service).map(|i| inst(s, i)).collect();
                (format!("svc-{s}"), set)
            })
            .collect();
        let dirty = cache.apply(0, Event::Snapshot(all));
        cache.rebuild(Some(&dirty));
        let target = format!("svc-{}", services / 2);
        let mut changed = inst(services / 2, 0);
        let label = format!(
            "{}_endpoints/{services}x{per_service}",
            services * per_service
        );
        g.bench_function(BenchmarkId::new("apply+rebuild", label), |bench| {
            bench.iter(|| {
                changed.weight = if changed.weight == 1 { 2 } else { 1 };
                let dirty = cache.apply(
                    0,
                    Event::Service {
                        service: target.clone(),
                        update: Update::Add(vec![changed.clone()]),
                    },
                );
                assert_eq!(dirty.len(), 1, "the change reached the table");
                cache.rebuild(Some(&dirty));
                black_box(dirty.len())
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

/// 1,000 endpoints in zones `a`, `b`, `c` (by index mod 3), half of them `version = v1`, half
/// `v2` (by index mod 2), so every subset and zone group is spread over the whole list.
fn labelled(n: usize) -> Vec<Endpoint> {
    (0..n)
        .map(|i| {
            let mut inst = Instance::new(format!("10.0.{}.{}", i / 250, i % 250 + 1), 8080);
            inst.zone = Some(["a", "b", "c"][i % 3].to_string());
            let version = if i % 2 == 0 { "v1" } else { "v2" };
            inst.metadata.insert("version".into(), version.into());
            Endpoint::from_instance(&inst, "file", Default::default()).expect("valid address")
        })
        .collect()
}

/// The pick through an upstream's [`Subsets`] (what the proxy does since #14) beside the bare
/// pick (a balancer's `Candidates` over the whole list, the proxy before #14), at 1,000
/// endpoints, for every balancer. The cases of one balancer run one after another (bare,
/// none, subset, header, zone, bare again), so a change in the machine's load shows as a
/// difference between the two bare runs. `none`: no subset, no zones (the default upstream);
/// `subset`: `subset = { version = "v2" }` (500 endpoints); `header`: `subset_from_header` with
/// `x-version: v2`; `zone`: `zone_aware = "prefer"`, local zone `a` healthy (333 endpoints).
fn subset_picks(c: &mut Criterion) {
    let _handle = edge_agent::metrics::install();
    let metrics = UpstreamMetrics::new("bench");
    let n = 1_000;
    let eps = labelled(n);
    let v2 = Selector([("version".to_string(), "v2".to_string())].into());
    let zoned = ZoneSettings {
        mode: ZoneMode::Prefer,
        local: Some("a".into()),
        min_share: DEFAULT_ZONE_MIN_SHARE,
    };
    let mut g = c.benchmark_group("subset_pick");
    for name in BALANCERS {
        let spec = spec(name);
        let b = spec.build(&eps);
        let none = Subsets::build(&spec, &eps, &SubsetSettings::default(), &[]);
        let subset = SubsetSettings {
            selector: v2.clone(),
            ..Default::default()
        };
        let subset = Subsets::build(&spec, &eps, &subset, &[]);
        let header = Subsets::build(&spec, &eps, &SubsetSettings::default(), &["version"]);
        let zone = SubsetSettings {
            zone: zoned.clone(),
            ..Default::default()
        };
        let zone = Subsets::build(&spec, &eps, &zone, &[]);
        let base = ctx();
        let counter = AtomicU64::new(1);
        let cx = || {
            let mut cx = base;
            if name == "chash" {
                cx.key = Some(next_key(&counter));
            }
            cx
        };
        let bare = |g: &mut criterion::BenchmarkGroup<_>, label: &str| {
            g.bench_function(BenchmarkId::new(name, label), |bench| {
                bench.iter(|| {
                    let mut cands = Candidates::new(b.as_ref(), &eps, cx());
                    black_box(cands.next())
                })
            });
        };
        bare(&mut g, "bare");
        for (label, s, h) in [
            ("none", &none, None),
            ("subset", &subset, None),
            ("header", &header, Some(("version", "v2"))),
            ("zone", &zone, None),
        ] {
            // Opaque to the optimiser, as a header read from a request is, but not stored and
            // reloaded on every iteration (the bare pick has no such per-iteration input).
            let h = black_box(h);
            g.bench_function(BenchmarkId::new(name, label), |bench| {
                bench.iter(|| {
                    // Walked where it was returned, as the proxy does (no move of the iterator).
                    let mut picks = s.picks((&eps, b.as_ref()), h, cx, &metrics);
                    black_box(picks.as_mut().ok().and_then(|p| p.next()))
                })
            });
        }
        bare(&mut g, "bare_again");
    }
    g.finish();
}

/// A browser-like request head of 387 bytes (Firefox's headers for a plain GET).
const BROWSER_HEAD: &[u8] = b"GET /svc/api/v1/items?id=42&sort=desc HTTP/1.1\r\n\
Host: svc\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Connection: keep-alive\r\n\
Cookie: session=3f2a9c1e7b; theme=dark\r\n\
Upgrade-Insecure-Requests: 1\r\n\
\r\n";

/// Parse a request head and write the upstream one (#15 step 1): ours, and the `HeaderMap`
/// round trip it replaces. Both reuse their output buffer, as a connection would.
fn h1_head(c: &mut Criterion) {
    use edge_agent::h1::write::{write_request, Added};
    use edge_agent::h1::{Limits, RequestHead};
    let mut g = c.benchmark_group("h1_head");
    let add = Added {
        target: None,
        tunnel: false,
        client_ip: b"127.0.0.1",
        proto: b"http",
        host: b"10.0.0.2:8080",
        request_id: None,
    };
    let limits = Limits::default();
    let mut head = RequestHead::default();
    let mut out = Vec::with_capacity(1024);
    g.bench_function("ours", |bench| {
        bench.iter(|| {
            let buf = black_box(BROWSER_HEAD);
            head.parse(buf, &limits).expect("a valid head");
            write_request(&mut out, &head, buf, &add);
            black_box(out.len())
        })
    });
    // The stand-in for hyper's server and client: the read buffer is shared (`Bytes`, as hyper
    // freezes its buffer), each value a slice of it, each name a `HeaderName`; then what
    // `prepare_request_headers` does, then the client's serialisation.
    let shared = bytes::Bytes::from_static(BROWSER_HEAD);
    let ip = http::HeaderValue::from_static("127.0.0.1");
    g.bench_function("headermap", |bench| {
        bench.iter(|| {
            let buf = black_box(&shared);
            let mut slots = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); 100];
            let mut req = httparse::Request::new(&mut []);
            httparse::ParserConfig::default()
                .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
                .expect("a valid head");
            let method =
                http::Method::from_bytes(req.method.expect("method").as_bytes()).expect("a method");
            let uri =
                http::Uri::from_maybe_shared(buf.slice_ref(req.path.expect("path").as_bytes()))
                    .expect("a uri");
            let mut headers = http::HeaderMap::with_capacity(req.headers.len());
            for h in req.headers.iter() {
                let name = http::HeaderName::from_bytes(h.name.as_bytes()).expect("a name");
                let value =
                    http::HeaderValue::from_maybe_shared(buf.slice_ref(h.value)).expect("a value");
                headers.append(name, value);
            }
            for hop in [
                http::header::CONNECTION,
                http::HeaderName::from_static("keep-alive"),
                http::header::TE,
                http::header::TRAILER,
                http::header::UPGRADE,
                http::header::TRANSFER_ENCODING,
            ] {
                headers.remove(hop);
            }
            headers.insert("x-forwarded-for", ip.clone());
            headers.insert("x-forwarded-proto", http::HeaderValue::from_static("http"));
            out.clear();
            out.extend_from_slice(method.as_str().as_bytes());
            out.push(b' ');
            out.extend_from_slice(uri.path_and_query().expect("a path").as_str().as_bytes());
            out.extend_from_slice(b" HTTP/1.1\r\n");
            for (name, value) in &headers {
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group! {
    name = micro;
    config = config();
    targets = picks, chash_lookup, metrics_record, snapshot_swap, subset_picks, h1_head
}
criterion_main!(micro);
