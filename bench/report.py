"""Turns bench/run.sh's raw results into markdown tables (stdout)."""
import json
import os
import statistics
import sys

out, crit, load_cpu, proxy_cpu, dur, rounds, conns, clk = sys.argv[1:9]
clk = int(clk)

LABEL = {
    "direct": f"backend directly (nginx, CPU {load_cpu})",
    "nginx": "nginx proxy, 1 worker, upstream keepalive",
    "haproxy": "HAProxy, nbthread 1, http-reuse always",
    "agent1": "edge-agent, TOKIO_WORKER_THREADS=1",
    "agent2": "edge-agent, default threads (unpinned)",
    "agent1log": "edge-agent, TOKIO_WORKER_THREADS=1, access log JSON to stdout",
}
ORDER = ["direct", "nginx", "haproxy", "agent1", "agent2", "agent1log"]


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def read_tsv(name):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def loads(xs):
    """The load averages seen at the start of a target's rounds, as min–max."""
    if not xs:
        return "–"
    return f"{min(xs):.2f}" if min(xs) == max(xs) else f"{min(xs):.2f}–{max(xs):.2f}"


def ok(flag):
    return "met" if flag else "**missed**"


print(f"### Proxy throughput (wrk -t1 -c{conns} -d{dur}s --latency, keep-alive; median of {rounds} interleaved rounds)\n")
print(f"Proxy under test on CPU {proxy_cpu}; wrk and the backend on CPU {load_cpu} (taskset).\n")
wrk = read_tsv("wrk.tsv")
by = {}
for row in wrk:
    name, _round, rps, p50, p99, reqs, ticks, errs = row[:8]
    d = by.setdefault(name, {"rps": [], "p50": [], "p99": [], "cpu": [], "busy": [], "errs": 0, "load": []})
    if len(row) > 8:
        d["load"].append(float(row[8]))
    d["rps"].append(float(rps))
    d["p50"].append(float(p50))
    d["p99"].append(float(p99))
    if int(reqs) > 0:
        d["cpu"].append(int(ticks) / clk * 1e6 / int(reqs))
    d["busy"].append(int(ticks) / clk / float(dur) * 100)
    d["errs"] += int(errs)
if by:
    print("| target | req/s (median) | req/s (min–max) | p50 µs | p99 µs | CPU µs/request | CPU busy % | errors | load avg (1 min) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in ORDER:
        if name not in by:
            continue
        d = by[name]
        cpu = f"{med(d['cpu']):.1f}" if d["cpu"] else "–"
        print(
            f"| {LABEL[name]} | {med(d['rps']):,.0f} | {min(d['rps']):,.0f}–{max(d['rps']):,.0f} "
            f"| {med(d['p50']):.0f} | {med(d['p99']):.0f} | {cpu} | {med(d['busy']):.0f} | {d['errs']} | {loads(d['load'])} |"
        )
    print("\nCPU µs/request: utime+stime of the serving process(es) (nginx: master + worker; the "
          "'directly' row is the backend's own cost) over the round ÷ requests. CPU busy %: the same "
          "time ÷ the run's length, where 100 is one core. A pinned proxy well under ~95% busy was "
          "not the bottleneck of its run (wrk and the backend share the other core), so its req/s "
          "says less about the proxy than its CPU per request does.\n")
    if all(k in by for k in ("agent1", "agent1log")) and not all(k in by for k in ("nginx", "haproxy")):
        # BENCH_ONLY=accesslog: the access-log row alone.
        ca, cl = med(by["agent1"]["cpu"]), med(by["agent1log"]["cpu"])
        print("| ratio | value | target |")
        print("| --- | ---: | --- |")
        print(f"| access log (stdout JSON) on / off, requests per proxy CPU-second | {ca / cl:.2f} | ≥ 0.90: {ok(ca / cl >= 0.90)} |")
        print()
    if all(k in by for k in ("nginx", "haproxy", "agent1")):
        a, n, h = med(by["agent1"]["rps"]), med(by["nginx"]["rps"]), med(by["haproxy"]["rps"])
        print("| ratio | value | target |")
        print("| --- | ---: | --- |")
        print(f"| edge-agent (1 worker) / nginx, req/s | {a / n:.2f} | ≥ 1.2: {ok(a / n >= 1.2)} |")
        print(f"| edge-agent (1 worker) / HAProxy, req/s | {a / h:.2f} | ≥ 1.0: {ok(a / h >= 1.0)} |")
        if "agent2" in by:
            a2 = med(by["agent2"]["rps"])
            print(f"| edge-agent (default threads) / nginx, req/s | {a2 / n:.2f} | – |")
        ca, cn, ch = med(by["agent1"]["cpu"]), med(by["nginx"]["cpu"]), med(by["haproxy"]["cpu"])
        print(f"| edge-agent / nginx, CPU per request | {ca / cn:.2f} | – |")
        print(f"| edge-agent / HAProxy, CPU per request | {ca / ch:.2f} | – |")
        if by.get("agent1log", {}).get("cpu"):
            # Requests per proxy CPU-second, logging on / off = CPU per request off / on.
            cl = med(by["agent1log"]["cpu"])
            print(f"| access log (stdout JSON) on / off, requests per proxy CPU-second | {ca / cl:.2f} | ≥ 0.90: {ok(ca / cl >= 0.90)} |")
            lines_path = os.path.join(out, "access-log-lines")
            if os.path.exists(lines_path):
                with open(lines_path) as f:
                    written = f.read().strip() or "?"
                measured = sum(int(r[5]) for r in wrk if r[0] == "agent1log")
                print(f"| access-log lines written (measured requests {measured:,} + 2 s warm-up) | {written} | all: none dropped |")
        print()

H2_LABEL = {
    "direct": f"backend directly (nginx h2c origin, CPU {load_cpu})",
    "nginx": "nginx 1.22, 1 worker: listen http2, grpc_pass (h2c) upstream",
    "haproxy": "HAProxy 2.6, nbthread 1: bind proto h2, server proto h2",
    "agent1": "edge-agent, TOKIO_WORKER_THREADS=1, upstream protocol = \"h2c\"",
}
h2 = read_tsv("h2.tsv")
if h2:
    h2c = os.environ.get("BENCH_H2_CONNS", "4")
    h2m = os.environ.get("BENCH_H2_STREAMS", "25")
    print(f"### HTTP/2 (h2load -c{h2c} -m{h2m} -D{dur}, h2c prior knowledge on both sides; median of {rounds} interleaved rounds)\n")
    print(f"{int(h2c) * int(h2m)} concurrent streams over {h2c} connections, 99-byte responses. Proxy under test on CPU {proxy_cpu}; "
          f"h2load and the backend (nginx, `listen ... http2`, 1 worker) on CPU {load_cpu}.\n")
    hb = {}
    for name, _round, rps, okn, bad, mean, ticks, bticks, load in h2:
        d = hb.setdefault(name, {"rps": [], "per_cpu": [], "busy": [], "bbusy": [], "mean": [], "bad": 0, "load": []})
        d["rps"].append(float(rps))
        d["mean"].append(float(mean))
        if int(ticks) > 0:
            d["per_cpu"].append(int(okn) / (int(ticks) / clk))
        d["busy"].append(int(ticks) / clk / float(dur) * 100)
        d["bbusy"].append(int(bticks) / clk / float(dur) * 100)
        d["bad"] += int(bad)
        d["load"].append(float(load))
    print("| target | req/s (median) | req/s (min–max) | requests per proxy CPU-second | proxy CPU busy % | backend CPU busy % | mean request time µs | failed or non-2xx | load avg (1 min) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in ["direct", "nginx", "haproxy", "agent1"]:
        if name not in hb:
            continue
        d = hb[name]
        per = "–" if name == "direct" else f"{med(d['per_cpu']):,.0f}"
        busy = "–" if name == "direct" else f"{med(d['busy']):.0f}"
        print(f"| {H2_LABEL[name]} | {med(d['rps']):,.0f} | {min(d['rps']):,.0f}–{max(d['rps']):,.0f} | {per} | {busy} "
              f"| {med(d['bbusy']):.0f} | {med(d['mean']):.0f} | {d['bad']} | {loads(d['load'])} |")
    print("\nRequests per proxy CPU-second: requests answered 2xx in the round ÷ utime+stime of the proxy's "
          "process(es) over the round (nginx: master + worker). 'direct' is the backend alone (its CPU is the "
          "backend column).\n")
    if all(k in hb for k in ("nginx", "haproxy", "agent1")):
        a, n, h = (med(hb[k]["rps"]) for k in ("agent1", "nginx", "haproxy"))
        ca, cn, ch = (med(hb[k]["per_cpu"]) for k in ("agent1", "nginx", "haproxy"))
        print("| h2 ratio | value | target |")
        print("| --- | ---: | --- |")
        print(f"| edge-agent / nginx, requests per proxy CPU-second | {ca / cn:.2f} | ≥ 1.0: {ok(ca / cn >= 1.0)} |")
        print(f"| edge-agent / HAProxy, requests per proxy CPU-second | {ca / ch:.2f} | – |")
        print(f"| edge-agent / nginx, req/s | {a / n:.2f} | – |")
        print(f"| edge-agent / HAProxy, req/s | {a / h:.2f} | – |")
        print()

grpc = read_tsv("grpc.tsv")
if grpc:
    gc = os.environ.get("BENCH_GRPC_CONCURRENCY", "100")
    gn = os.environ.get("BENCH_GRPC_CONNS", "4")
    print(f"### gRPC unary (ghz -c{gc} --connections {gn} -z{dur}s, --cpus 1; median of {rounds} interleaved rounds)\n")
    print(f"`edge.test.Echo/Unary` (integration-tests/servers/grpc/echo.proto) on grpc-echo (bench/grpc, grpc-go), "
          f"ghz and grpc-echo on CPU {load_cpu}, the agent on CPU {proxy_cpu}.\n")
    gb = {}
    for name, _round, rps, okn, bad, p50, p99, ticks, bticks, load in grpc:
        d = gb.setdefault(name, {"rps": [], "per_cpu": [], "busy": [], "bbusy": [], "p50": [], "p99": [], "bad": 0, "load": []})
        d["rps"].append(float(rps))
        d["p50"].append(float(p50))
        d["p99"].append(float(p99))
        if int(ticks) > 0 and name != "direct":
            d["per_cpu"].append(float(okn) / (int(ticks) / clk))
        d["busy"].append(int(ticks) / clk / float(dur) * 100)
        d["bbusy"].append(int(bticks) / clk / float(dur) * 100)
        d["bad"] += int(float(bad))
        d["load"].append(float(load))
    label = {"direct": "grpc-echo directly", "agent1": "through edge-agent (TOKIO_WORKER_THREADS=1, protocol = \"h2c\")"}
    print("| target | calls/s (median) | calls/s (min–max) | calls per proxy CPU-second | proxy CPU busy % | backend CPU busy % | p50 µs | p99 µs | non-OK | load avg (1 min) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in ["direct", "agent1"]:
        if name not in gb:
            continue
        d = gb[name]
        per = "–" if name == "direct" else f"{med(d['per_cpu']):,.0f}"
        busy = "–" if name == "direct" else f"{med(d['busy']):.0f}"
        print(f"| {label[name]} | {med(d['rps']):,.0f} | {min(d['rps']):,.0f}–{max(d['rps']):,.0f} | {per} | {busy} "
              f"| {med(d['bbusy']):.0f} | {med(d['p50']):.0f} | {med(d['p99']):.0f} | {d['bad']} | {loads(d['load'])} |")
    if "direct" in gb and "agent1" in gb:
        r = med(gb["agent1"]["rps"]) / med(gb["direct"]["rps"])
        print(f"\nThrough the agent / direct, calls/s: **{r:.2f}**.\n")

fixed = read_tsv("fixed.tsv")
rate = open(os.path.join(out, "rate")).read().strip() if os.path.exists(os.path.join(out, "rate")) else "?"
if fixed:
    print(f"### Added latency at a fixed rate ({rate} req/s = 50% of nginx's max; median of {rounds} rounds)\n")
    print(f"Open-loop client (`benches/loadgen.rs fixed`): {conns} keep-alive connections, each on its own "
          f"schedule, latency from the intended send time (coordinated-omission free), {dur} s per run, on CPU {load_cpu}.\n")
    fb = {}
    for name, _round, line in fixed:
        kv = dict(p.split("=", 1) for p in line.split() if "=" in p)
        d = fb.setdefault(name, {k: [] for k in ("rate", "p50_us", "p99_us", "p999_us", "errors")})
        for k in d:
            if k in kv:
                d[k].append(float(kv[k]))
    base = fb.get("direct")
    print("| target | achieved req/s | p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in ORDER:
        if name not in fb:
            continue
        d = fb[name]
        add50 = med(d["p50_us"]) - med(base["p50_us"]) if base and name != "direct" else 0
        add99 = med(d["p99_us"]) - med(base["p99_us"]) if base and name != "direct" else 0
        print(
            f"| {LABEL[name]} | {med(d['rate']):,.0f} | {med(d['p50_us']):.0f} | {med(d['p99_us']):.0f} "
            f"| {med(d['p999_us']):.0f} | {'–' if name == 'direct' else f'{add50:+.0f}'} "
            f"| {'–' if name == 'direct' else f'{add99:+.0f}'} | {sum(d['errors']):.0f} |"
        )
    # For bench/plot.gp: short name, max req/s (median), added p99 at the fixed rate (ms).
    short = {"nginx": "nginx", "haproxy": "HAProxy", "agent1": "edge-agent\\n1 worker",
             "agent2": "edge-agent\\ndefault"}
    with open(os.path.join(out, "plot.tsv"), "w") as f:
        for name in ORDER:
            if name == "direct" or name not in fb or name not in by or not base:
                continue
            add99 = med(fb[name]["p99_us"]) - med(base["p99_us"])
            f.write(f'"{short[name]}"\t{med(by[name]["rps"]):.0f}\t{add99 / 1000:.3f}\n')
    if base and "agent1" in fb and "nginx" in fb:
        a99 = med(fb["agent1"]["p99_us"]) - med(base["p99_us"])
        n99 = med(fb["nginx"]["p99_us"]) - med(base["p99_us"])
        print(f"\nAdded p99, edge-agent (1 worker) vs nginx: {a99:+.0f} µs vs {n99:+.0f} µs "
              f"(target ≤ nginx's: {ok(a99 <= n99)}).\n")
    # Per round: the target is met in every round, not only in the median.
    per_round = {}
    for name, rnd, line in fixed:
        kv = dict(p.split("=", 1) for p in line.split() if "=" in p)
        if "p99_us" in kv:
            per_round.setdefault(rnd, {})[name] = float(kv["p99_us"])
    if per_round and all("direct" in r for r in per_round.values()):
        names = [n for n in ORDER if n != "direct" and any(n in r for r in per_round.values())]
        print("Added p99 per round (µs over direct in the same round):\n")
        print("| round | " + " | ".join(LABEL[n] for n in names) + " | edge-agent ≤ nginx |")
        print("| --- | " + " | ".join("---:" for _ in names) + " | --- |")
        for rnd in sorted(per_round, key=lambda r: int(r) if r.isdigit() else 0):
            r = per_round[rnd]
            cells = [f"{r[n] - r['direct']:+.0f}" if n in r else "–" for n in names]
            verdict = ok(r["agent1"] <= r["nginx"]) if "agent1" in r and "nginx" in r else "–"
            print(f"| {rnd} | " + " | ".join(cells) + f" | {verdict} |")
        print()
    # Per-second timelines (LOADGEN_TIMELINE): the worst second of each run, so a stall is placed.
    worst = []
    for name, rnd, _line in fixed:
        path = os.path.join(out, f"timeline-{name}-{rnd}.tsv")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            rows_t = [l.split("\t") for l in f.read().splitlines()[1:] if l.strip()]
        if not rows_t:
            continue
        w = max(rows_t, key=lambda r: int(r[4]))
        p99s = sorted(int(r[4]) for r in rows_t)
        worst.append((name, rnd, w[0], int(w[4]), int(w[5]), p99s[len(p99s) // 2], sum(int(r[2]) for r in rows_t)))
    if worst:
        print("Per-second timeline (`timeline-NAME-ROUND.tsv`): the worst second of each run\n")
        print("| target | round | worst second | its p99 µs | its max µs | median second's p99 µs | errors |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, rnd, sec, p99, mx, medp99, errs in sorted(worst, key=lambda w: (ORDER.index(w[0]) if w[0] in ORDER else 99, w[1])):
            print(f"| {LABEL.get(name, name)} | {rnd} | {sec} | {p99} | {mx} | {medp99} | {errs} |")
        print()

rss = read_tsv("rss.tsv")
after = read_tsv("rss-after-load.tsv")
if rss:
    print("### Memory (VmRSS)\n")
    print("| edge-agent | RSS MiB |")
    print("| --- | ---: |")
    for what, kb in rss:
        print(f"| {what} | {int(kb) / 1024:.1f} |")
    for name, kb in after:
        print(f"| after the load rounds: {LABEL.get(name, name)} | {int(kb) / 1024:.1f} |")
    idle = int(rss[0][1]) / 1024
    print(f"\nIdle RSS {idle:.1f} MiB (target < 15 MB: {ok(idle * 1.048576 < 15)}).\n")

conns_rss = read_tsv("rss-conns.tsv")
if conns_rss:
    table = {}
    for n, name, kb, *_held in conns_rss:
        table.setdefault(int(n), {})[name] = int(kb)
    print("### RSS with idle client connections (keep-alive, one request answered on each)\n")
    print("| idle client connections | edge-agent (default threads) MiB | nginx (1 worker: master + worker) MiB | edge-agent ≤ nginx |")
    print("| ---: | ---: | ---: | --- |")
    for n in sorted(table):
        a, g = table[n].get("agent1"), table[n].get("nginx")
        fa = f"{a / 1024:.1f}" if a is not None else "–"
        fg = f"{g / 1024:.1f}" if g is not None else "–"
        verdict = ok(a <= g) if a is not None and g is not None else "–"
        print(f"| {n:,} | {fa} | {fg} | {verdict} |")
    print()

# criterion: <crit>/<group>/<function>[/<param>]/new/{benchmark,estimates}.json
rows = []
if os.path.isdir(crit):
    for dirpath, _dirs, files in os.walk(crit):
        if os.path.basename(dirpath) == "new" and "estimates.json" in files and "benchmark.json" in files:
            with open(os.path.join(dirpath, "benchmark.json")) as f:
                b = json.load(f)
            with open(os.path.join(dirpath, "estimates.json")) as f:
                e = json.load(f)
            rows.append((b["full_id"], e["median"]["point_estimate"]))
if rows:
    print("### Micro-benchmarks (criterion, median per iteration)\n")
    print("| benchmark | median | target |")
    print("| --- | ---: | --- |")

    def fmt(ns):
        if ns >= 1e6:
            return f"{ns / 1e6:.2f} ms"
        if ns >= 1e3:
            return f"{ns / 1e3:.2f} µs"
        return f"{ns:.1f} ns"

    def key(r):
        parts = r[0].split("/")
        nums = [int(p.split("_")[0]) if p.split("_")[0].isdigit() else 0 for p in parts]
        return (parts[0], parts[1], nums)

    for full_id, ns in sorted(rows, key=key):
        target = ""
        if full_id.startswith("pick/") and full_id.endswith("/1000"):
            target = f"< 100 ns: {ok(ns < 100)}"
        if full_id.startswith("snapshot_one_endpoint_change/") and "/10000_endpoints" in full_id:
            target = f"< 1 ms: {ok(ns < 1e6)}"
        print(f"| {full_id} | {fmt(ns)} | {target} |")
    print()

perf = os.path.join(out, "perf-top.txt")
if os.path.exists(perf) and os.path.getsize(perf) > 0:
    print("### perf: top frames of edge-agent (1 worker) under wrk (self time)\n")
    print("```")
    print(open(perf).read().rstrip())
    print("```")
