#!/usr/bin/env python3
"""Fleet simulation (issue #8, section 4): N edge-agent processes watching one real registry.

    python3 bench/fleet.py run --registry consul --agents 50 --agent-bin PATH --out fleet.jsonl
    python3 bench/fleet.py report fleet.jsonl          # markdown tables of every run in the file

`bench/fleet.sh` (run by `make bench`) calls both. Python standard library only, so `make bench`
compiles nothing for it. One run:

1. Starts the registry with `integration-tests/servers/<name>/start.sh` (the server installed by
   its `install.sh`), a counting TCP proxy in front of it (HTTP/1: request lines `GET /`; Nacos
   gRPC: HTTP/2 frames, a call = one HEADERS frame from the client), and two HTTP backends.
   Registers instance `fleet-a` of service `fleet`.
2. Baseline: the registry's CPU with no agent, over `--baseline-secs`.
3. Starts N agents (the release binary; each its own ports on 127.0.0.1, state dir, log;
   `EDGE_AGENT_REMOVAL_GUARD=off`, `RUST_LOG=warn,edge_agent::cache=debug`), waits for `/ready`,
   sends one request through each (`Host: fleet`; in Consul's zero-config mode this starts the
   watch) and waits for each to log `upstream applied service=fleet endpoints=1`.
4. Idle window (`--idle-secs`): requests, connections and bytes through the proxy, the registry's
   CPU seconds per second (utime+stime from /proc/<pid>/stat) and RSS, the agents' CPU and RSS.
5. `--changes` times: register `fleet-b`, then deregister it. Each agent logs (debug, src/cache.rs)
   `upstream applied service=fleet endpoints=<n>` with a microsecond timestamp when its routing
   table takes the change; lag = that timestamp - the moment the registry acknowledged the write
   (same clock). The driver only reads the agents' log files (every 50 ms), so measuring adds no
   load to the agents or the registry. A lag below zero (the agent applied it before the write's
   HTTP answer reached us) counts as 0.

Every process it starts runs under `setpriv --pdeathsig KILL` (when available) and is stopped on
exit, SIGINT or SIGTERM; it binds 127.0.0.1 only; every wait has a deadline.
"""
import argparse
import asyncio
import datetime
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ROOT / "integration-tests" / "servers"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVICE = "fleet"
T0 = time.monotonic()
NOFILE = 1024  # the file limit, raised to the hard limit in main()
APPLIED = re.compile(rb"^(\S+)\s+DEBUG .*upstream applied service=" + SERVICE.encode() + rb" endpoints=(\d+)")


def log(msg):
    print(f"[fleet {time.monotonic() - T0:5.0f}s] {msg}", file=sys.stderr, flush=True)


class Failure(Exception):
    pass


# --- processes ------------------------------------------------------------------------------
STARTED = []  # Popen objects, stopped in reverse order on exit
PDEATHSIG = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def spawn(cmd, env, log_path, cwd):
    out = open(log_path, "wb")
    p = subprocess.Popen(PDEATHSIG + cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                         stdout=out, stderr=subprocess.STDOUT)
    out.close()
    STARTED.append(p)
    return p


def stop_all():
    for p in STARTED:
        if p.poll() is None:
            try:
                p.terminate()
            except OSError:
                pass
    deadline = time.monotonic() + 10
    for p in reversed(STARTED):
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    STARTED.clear()


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def port_pair():
    """A free port P with P + 1000 free too (the Nacos SDK's gRPC port is HTTP + 1000)."""
    for _ in range(50):
        p = free_ports(1)[0]
        if p > 64535:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p + 1000))
            return p
        except OSError:
            continue
        finally:
            s.close()
    raise Failure("no free port P with P+1000 free after 50 tries")


def http(method, url, body=None, headers=None, timeout=10):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def poll(what, timeout, f, every=0.05):
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = f()
        except OSError:
            v = None
        if v:
            return v
        if time.monotonic() > deadline:
            raise Failure(f"timed out after {timeout} s waiting for: {what}")
        time.sleep(every)


# --- counting proxy -------------------------------------------------------------------------
class CountingProxy:
    """A loopback TCP proxy that counts connections, bytes each way, and requests: HTTP/1 request
    lines (`GET /`) or, for HTTP/2 (gRPC), HEADERS frames from the client (one per call or stream)
    and DATA frames each way."""

    def __init__(self, target, h2=False):
        self.target, self.h2 = target, h2
        self.conns = self.requests = self.bytes_up = self.bytes_down = 0
        self.data_up = self.data_down = 0
        self.port = None
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, daemon=True).start()
        if not self._ready.wait(10):
            raise Failure("counting proxy did not start")

    def snapshot(self):
        return {k: getattr(self, k) for k in ("conns", "requests", "bytes_up", "bytes_down", "data_up", "data_down")}

    def _run(self):
        asyncio.set_event_loop(self._loop)

        async def main():
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            async with server:
                await server.serve_forever()

        self._loop.run_until_complete(main())

    async def _handle(self, down_r, down_w):
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            down_w.close()
            return
        self.conns += 1
        await asyncio.gather(self._pipe(down_r, up_w, True), self._pipe(up_r, down_w, False))

    async def _pipe(self, r, w, upward):
        carry = b""
        buf = bytearray()
        preface = upward
        try:
            while True:
                chunk = await r.read(65536)
                if not chunk:
                    break
                if upward:
                    self.bytes_up += len(chunk)
                else:
                    self.bytes_down += len(chunk)
                if self.h2:
                    buf += chunk
                    if preface and len(buf) >= 24:
                        if buf.startswith(b"PRI * HTTP/2.0"):
                            del buf[:24]
                        preface = False
                    while not preface and len(buf) >= 9:
                        n = int.from_bytes(buf[0:3], "big")
                        if len(buf) < 9 + n:
                            break
                        kind = buf[3]
                        if kind == 0:
                            if upward:
                                self.data_up += 1
                            else:
                                self.data_down += 1
                        elif kind == 1 and upward:
                            self.requests += 1
                        del buf[:9 + n]
                elif upward:
                    text = carry + chunk
                    self.requests += text.count(b"GET /")
                    carry = text[-4:]
                w.write(chunk)
                await w.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            try:
                w.close()
            except OSError:
                pass


# --- backends -------------------------------------------------------------------------------
def backend(name):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = name.encode()
            self.send_response(200)
            self.send_header("x-backend", name)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv.server_address[1]


# --- registries -----------------------------------------------------------------------------
def install(name):
    out = subprocess.run(["bash", str(SERVERS / name / "install.sh")], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not lines or not Path(lines[-1]).exists():
        raise Failure(f"{name}/install.sh failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return lines[-1].strip()


class Registry:
    name = ""
    proc = None
    poll_interval = None  # for a polling adapter: its interval, s

    def __init__(self, work):
        self.work = work

    def start_script(self, env, ready_url, accept, timeout, args=()):
        d = self.work / self.name
        d.mkdir()
        full = dict(os.environ, **env)
        self.log_path = d / "server.log"
        self.proc = spawn(["bash", str(SERVERS / self.name / "start.sh"), *args], full, self.log_path, d)

        def ready():
            if self.proc.poll() is not None:
                raise Failure(f"{self.name} exited ({self.proc.returncode}); log:\n{self.log_tail()}")
            try:
                status, body = http("GET", ready_url, headers={"accept": "application/json"}, timeout=2)
            except (OSError, urllib.error.URLError):
                return False
            return 200 <= status < 300 and accept(body.decode(errors="replace"))

        try:
            poll(f"{self.name} ready at {ready_url}", timeout, ready, every=0.2)
        except Failure as e:
            raise Failure(f"{e}; log:\n{self.log_tail()}") from None

    def log_tail(self):
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


class Consul(Registry):
    name = "consul"
    change_timeout = 30

    def start(self):
        self.port = free_ports(1)[0]
        self.start_script({"CONSUL_BIN": install("consul"), "CONSUL_HTTP_PORT": str(self.port)},
                          f"http://127.0.0.1:{self.port}/v1/status/leader",
                          lambda b: b.strip().strip('"') != "", 60,
                          # Consul accepts at most `http_max_conns_per_client` (default 200)
                          # concurrent HTTP connections per source IP, and every agent here comes
                          # from 127.0.0.1 (one connection per blocking query): raised, as N hosts
                          # would come from N addresses.
                          # (Consul refuses to start unless its file limit covers the value.)
                          ["-hcl", f"limits {{ http_max_conns_per_client = {max(200, min(16384, NOFILE - 1000))} }}"])
        self.proxies = {"http": CountingProxy(self.port)}

    def agent_url(self, agent_dir):
        return f"consul://127.0.0.1:{self.proxies['http'].port}"

    def _put(self, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        status, text = http("PUT", f"http://127.0.0.1:{self.port}{path}", data, {"content-type": "application/json"})
        if status != 200:
            raise Failure(f"consul PUT {path}: {status} {text[:200]!r}")

    def register(self, iid, port):
        self._put("/v1/agent/service/register", {
            "ID": iid, "Name": SERVICE, "Address": "127.0.0.1", "Port": port,
            "Check": {"TTL": "30m", "Status": "passing"}})

    def deregister(self, iid, port):
        self._put(f"/v1/agent/service/deregister/{iid}")


class Eureka(Registry):
    name = "eureka"
    interval = 5.0  # the adapter's default

    @property
    def change_timeout(self):
        return 3 * self.interval + 30

    @property
    def poll_interval(self):
        return self.interval

    def start(self):
        self.port = free_ports(1)[0]
        self.start_script({"EUREKA_PORT": str(self.port), "EUREKA_JAR": install("eureka"),
                           "EUREKA_PARENT_PID": str(os.getpid())},
                          f"http://127.0.0.1:{self.port}/eureka/apps", lambda b: "applications" in b, 240)
        self.proxies = {"http": CountingProxy(self.port)}

    def agent_url(self, agent_dir):
        return f"eureka://127.0.0.1:{self.proxies['http'].port}/eureka"

    def register(self, iid, port):
        body = {"instance": {
            "instanceId": iid, "hostName": "127.0.0.1", "app": SERVICE.upper(), "ipAddr": "127.0.0.1",
            "vipAddress": SERVICE, "status": "UP", "port": {"$": port, "@enabled": "true"},
            "securePort": {"$": 443, "@enabled": "false"},
            "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
            "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 3600}}}
        status, text = http("POST", f"http://127.0.0.1:{self.port}/eureka/apps/{SERVICE.upper()}",
                            json.dumps(body).encode(), {"content-type": "application/json"})
        if status != 204:
            raise Failure(f"eureka register {iid}: {status} {text[:200]!r}")

    def deregister(self, iid, port):
        status, text = http("DELETE", f"http://127.0.0.1:{self.port}/eureka/apps/{SERVICE.upper()}/{iid}")
        if status != 200:
            raise Failure(f"eureka cancel {iid}: {status} {text[:200]!r}")


class Nacos(Registry):
    name = "nacos"
    change_timeout = 60

    def start(self):
        self.port = port_pair()
        data = self.work / "nacos-data"
        self.start_script({"RNACOS_BIN": install("nacos"), "NACOS_HTTP_PORT": str(self.port),
                           "NACOS_GRPC_PORT": str(self.port + 1000), "NACOS_DATA_DIR": str(data),
                           "RUST_LOG": "warn"},
                          f"http://127.0.0.1:{self.port}/health", lambda b: True, 60)
        self.proxies = {"http": CountingProxy(self.port), "grpc": CountingProxy(self.port + 1000, h2=True)}

    def agent_url(self, agent_dir):
        return (f"nacos://127.0.0.1:{self.proxies['http'].port}?grpc_port={self.proxies['grpc'].port}"
                f"&cache_dir={agent_dir / 'nacos-cache'}")

    def _instance(self, method, port):
        q = urllib.parse.urlencode({"serviceName": SERVICE, "ip": "127.0.0.1", "port": port, "ephemeral": "false"})
        url = f"http://127.0.0.1:{self.port}/nacos/v1/ns/instance?{q}"
        # rnacos may refuse a write for a moment after start (raft); retried as the tests do.
        poll(f"nacos {method} instance :{port}", 30,
             lambda: (lambda r: 200 <= r[0] < 300 and b"ok" in r[1])(http(method, url)), every=0.1)

    def register(self, iid, port):
        self._instance("POST", port)

    def deregister(self, iid, port):
        self._instance("DELETE", port)


REGISTRIES = {"consul": Consul, "eureka": Eureka, "nacos": Nacos}


# --- agents ---------------------------------------------------------------------------------
class Agent:
    def __init__(self, i, binary, registry_url_for, work, listen, admin):
        self.i, self.listen, self.admin = i, listen, admin
        self.dir = work / f"agent-{i:04d}"
        self.dir.mkdir()
        self.log_path = self.dir / "agent.log"
        self.pos = 0
        self.partial = b""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        env.update({
            "EDGE_AGENT_LISTEN": f"127.0.0.1:{listen}",
            "EDGE_AGENT_ADMIN_LISTEN": f"127.0.0.1:{admin}",
            "EDGE_AGENT_STATE_DIR": str(self.dir / "state"),
            "EDGE_AGENT_REGISTRY": registry_url_for(self.dir),
            "EDGE_AGENT_REMOVAL_GUARD": "off",
            "EDGE_AGENT_LOG_FORMAT": "text",
            "RUST_LOG": "warn,edge_agent::cache=debug",
            "NO_COLOR": "1",
        })
        self.proc = spawn([binary], env, self.log_path, self.dir)

    def applied(self):
        """New `upstream applied` lines since the last call: [(unix time, endpoints)]."""
        with open(self.log_path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        out = []
        for line in lines:
            m = APPLIED.match(line)
            if m:
                # tracing's RFC 3339 UTC time, e.g. 2026-11-26T17:04:24.303960Z
                ts = datetime.datetime.fromisoformat(m.group(1).decode().replace("Z", "+00:00")).timestamp()
                out.append((ts, int(m.group(2))))
        return out

    def skip_log(self):
        self.applied()

    def log_tail(self):
        try:
            return self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            return ""


def wait_applied(agents, endpoints, timeout, since):
    """Reads the agents' logs until each has applied a set of `endpoints`; returns lags in ms."""
    pending = {a.i: a for a in agents}
    lags = {}
    deadline = time.monotonic() + timeout
    while pending:
        for i, a in list(pending.items()):
            for ts, n in a.applied():
                if n == endpoints:
                    lags[i] = max(0.0, (ts - since) * 1000)
                    del pending[i]
                    break
            if a.proc.poll() is not None:
                raise Failure(f"agent {i} exited ({a.proc.returncode}); log:\n{a.log_tail()}")
        if not pending:
            break
        if time.monotonic() > deadline:
            a = next(iter(pending.values()))
            raise Failure(f"{len(pending)} of {len(agents)} agents did not apply endpoints={endpoints} "
                          f"within {timeout} s (e.g. agent {a.i}; log:\n{a.log_tail()})")
        time.sleep(0.05)
    return [lags[a.i] for a in agents]


def pct(values, p):
    s = sorted(values)
    if not s:
        return 0.0
    return s[min(len(s) - 1, max(0, round((len(s) - 1) * p)))]


def window(registry, agents, secs):
    """Counters over an idle window of `secs` seconds."""
    pid = registry.proc.pid
    before = {k: p.snapshot() for k, p in registry.proxies.items()}
    cpu0 = cpu_seconds(pid)
    acpu0 = sum(cpu_seconds(a.proc.pid) for a in agents)
    t = time.monotonic()
    end = t + secs
    while time.monotonic() < end:
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))
        if registry.proc.poll() is not None:
            raise Failure(f"{registry.name} exited during the idle window; log:\n{registry.log_tail()}")
    elapsed = time.monotonic() - t
    out = {"secs": round(elapsed, 2),
           "registry_cpu": (cpu_seconds(pid) - cpu0) / elapsed,
           "registry_rss_mib": rss_mib(pid),
           "agents_cpu": (sum(cpu_seconds(a.proc.pid) for a in agents) - acpu0) / elapsed}
    for k, p in registry.proxies.items():
        after = p.snapshot()
        out[k] = {f: (after[f] - before[k][f]) for f in after}
        out[k]["conns_total"] = after["conns"]
    return out


def run(args):
    binary = args.agent_bin
    if not (binary and os.access(binary, os.X_OK)):
        raise Failure(f"--agent-bin {binary!r} is not an executable (build: cargo build --release --bin edge-agent)")
    work = Path(tempfile.mkdtemp(prefix=f"edge-agent-fleet-{args.registry}."))
    try:
        return measure(args, binary, work)
    finally:
        stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")


def measure(args, binary, work):
    n = args.agents
    reg = REGISTRIES[args.registry](work)
    if args.registry == "eureka" and args.eureka_interval:
        reg.interval = args.eureka_interval
    ba, bb = backend("a"), backend("b")
    log(f"{reg.name}: starting the server")
    t = time.monotonic()
    reg.start()
    start_secs = time.monotonic() - t
    log(f"{reg.name}: ready in {start_secs:.1f} s (pid {reg.proc.pid})")
    reg.register("fleet-a", ba)
    log(f"{reg.name}: baseline without agents, {args.baseline_secs} s")
    baseline = window(reg, [], args.baseline_secs)

    ports = free_ports(2 * n)
    url_for = reg.agent_url
    if reg.name == "eureka" and args.eureka_interval:
        url_for = lambda d: f"{reg.agent_url(d)}?interval={args.eureka_interval}s"  # noqa: E731
    log(f"starting {n} agents ({binary})")
    t = time.monotonic()
    agents = []
    for i in range(n):
        agents.append(Agent(i, binary, url_for, work, ports[2 * i], ports[2 * i + 1]))
        if reg.poll_interval:
            # Independent hosts poll at independent phases: spread the starts over one interval.
            time.sleep(reg.poll_interval / n)
    for a in agents:
        def ready(a=a):
            if a.proc.poll() is not None:
                raise Failure(f"agent {a.i} exited ({a.proc.returncode}); log:\n{a.log_tail()}")
            try:
                return http("GET", f"http://127.0.0.1:{a.admin}/ready", timeout=2)[0] == 200
            except (OSError, urllib.error.URLError):
                return False
        poll(f"agent {a.i} /ready", 60, ready)
    ready_secs = time.monotonic() - t
    for a in agents:
        def first(a=a):
            try:
                status, body = http("GET", f"http://127.0.0.1:{a.listen}/", headers={"host": SERVICE}, timeout=10)
            except (OSError, urllib.error.URLError):
                return False
            return status == 200 and body == b"a"
        poll(f"agent {a.i} routes {SERVICE} to backend a", 30, first, every=0.1)
    try:
        wait_applied(agents, 1, args.first_timeout, 0)
    except Failure as e:
        raise Failure(f"{e}\n(the agent binary must log `upstream applied` at debug level, src/cache.rs: "
                      "build it from this tree)") from None
    log(f"{n} agents ready in {ready_secs:.1f} s, each routing {SERVICE}; settling {args.settle_secs} s")
    time.sleep(args.settle_secs)  # a measurement gap: start-up fetches finish before the window
    log(f"idle window, {args.idle_secs} s")
    idle = window(reg, agents, args.idle_secs)
    agent_rss = sorted(rss_mib(a.proc.pid) for a in agents)

    log(f"{args.changes} registrations and deregistrations of fleet-b")
    proxies0 = {k: p.snapshot() for k, p in reg.proxies.items()}
    cpu0 = cpu_seconds(reg.proc.pid)
    acpu0 = sum(cpu_seconds(a.proc.pid) for a in agents)
    t_changes = time.monotonic()
    up, down = [], []
    for c in range(args.changes):
        if reg.poll_interval:
            # Each change at another phase of the poll interval (golden-ratio sequence), so the
            # figures are not locked to "just after a fetch" (the previous change's convergence).
            time.sleep(((c + 1) * 0.618034) % 1 * reg.poll_interval)
        for a in agents:
            a.skip_log()
        reg.register("fleet-b", bb)
        up.append(wait_applied(agents, 2, reg.change_timeout, time.time()))
        for a in agents:
            a.skip_log()
        reg.deregister("fleet-b", bb)
        down.append(wait_applied(agents, 1, reg.change_timeout, time.time()))
        log(f"change {c + 1}/{args.changes}: register -> all {n} in {max(up[-1]):.0f} ms, "
            f"deregister -> all {n} in {max(down[-1]):.0f} ms")
    changes_secs = time.monotonic() - t_changes
    change_load = {"registry_cpu_s": cpu_seconds(reg.proc.pid) - cpu0, "secs": round(changes_secs, 2),
                   "agents_cpu_s": sum(cpu_seconds(a.proc.pid) for a in agents) - acpu0}
    for k, p in reg.proxies.items():
        after = p.snapshot()
        change_load[k] = {f: after[f] - proxies0[k][f] for f in after}

    def stats(rounds):
        flat = [x for r in rounds for x in r]
        alln = [max(r) for r in rounds]
        return {"p50": pct(flat, 0.5), "p99": pct(flat, 0.99), "max": max(flat),
                "all_median": pct(alln, 0.5), "all_max": max(alln), "samples": len(flat)}

    result = {
        "registry": reg.name, "agents": n, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(), "server_start_secs": round(start_secs, 1), "agents_ready_secs": round(ready_secs, 1),
        "idle_secs": args.idle_secs, "changes": args.changes, "agent_url": url_for(Path("<dir>")),
        "baseline": baseline, "idle": idle,
        "agent_rss_mib": {"sum": sum(agent_rss), "median": pct(agent_rss, 0.5), "max": agent_rss[-1]},
        "change_load": change_load,
        "register": stats(up), "deregister": stats(down),
    }
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    log(f"{reg.name}: done")
    return result


# --- report ---------------------------------------------------------------------------------
def fmt(x, d=1):
    if x is None:
        return "–"
    return f"{x:,.{d}f}"


def per_change(r):
    """(requests, pushes, registry CPU ms) per change, beyond what the idle window's rates
    predict for the time the changes took (a polling fleet's requests are not caused by changes)."""
    cl, i, k = r["change_load"], r["idle"], 2 * r["changes"]
    key = "grpc" if "grpc" in cl else "http"
    extra = lambda f: max(0.0, cl[key][f] - i[key][f] / i["secs"] * cl["secs"]) / k  # noqa: E731
    cpu = max(0.0, cl["registry_cpu_s"] - i["registry_cpu"] * cl["secs"]) * 1000 / k
    acpu = max(0.0, cl.get("agents_cpu_s", 0.0) - i["agents_cpu"] * cl["secs"]) * 1000 / k
    return extra("requests"), (extra("data_down") if key == "grpc" else None), cpu, acpu


def report(path):
    runs = [json.loads(line) for line in open(path) if line.strip()]
    if not runs:
        print("_no fleet runs recorded_")
        return
    print("#### Fleet simulation: idle load (measured)\n")
    print("N agents watch one service each (zero-config: Consul watches on demand, plus the catalog); "
          "registry traffic through a counting proxy, CPU from /proc. Baseline = the registry with no agent.\n")
    print("| registry | agents | window s | requests/s (all agents) | per agent | bytes/s in+out | connections opened (whole run) | "
          "registry CPU % (baseline → with agents) | registry RSS MiB | agents CPU % (sum) | agent RSS MiB median (sum) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |")
    for r in runs:
        i, b = r["idle"], r["baseline"]
        key = "grpc" if "grpc" in i else "http"
        p = i[key]
        req = p["requests"] / i["secs"]
        unit = " gRPC calls" if key == "grpc" else ""
        print(f"| {r['registry']} | {r['agents']} | {i['secs']:.0f} | {fmt(req, 2)}{unit} | {fmt(req / r['agents'], 3)} | "
              f"{fmt((p['bytes_up'] + p['bytes_down']) / i['secs'], 0)} | {p['conns_total']} | "
              f"{fmt(b['registry_cpu'] * 100)} → {fmt(i['registry_cpu'] * 100)} | {fmt(i['registry_rss_mib'])} | "
              f"{fmt(i['agents_cpu'] * 100, 2)} | {fmt(r['agent_rss_mib']['median'])} ({fmt(r['agent_rss_mib']['sum'], 0)}) |")
    print("\n#### Fleet simulation: propagation to all N agents (measured)\n")
    print("Lag = an agent's `upstream applied` log timestamp − the registry's acknowledgement of the write; "
          "per-agent percentiles over all agents × changes; 'all N' = the slowest agent of one change.\n")
    print("| registry | agents | change | changes | per agent p50 ms | p99 ms | max ms | all N: median ms | all N: worst ms | "
          "registry requests per change, above idle | pushes per change | registry CPU ms per change, above idle | "
          "agents' CPU ms per change (sum), above idle |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        per, push, cpu, acpu = per_change(r)
        for kind in ("register", "deregister"):
            s = r[kind]
            print(f"| {r['registry']} | {r['agents']} | {kind} | {r['changes']} | {fmt(s['p50'])} | {fmt(s['p99'])} | "
                  f"{fmt(s['max'])} | {fmt(s['all_median'])} | {fmt(s['all_max'])} | {fmt(per, 1)} | {fmt(push, 1)} | "
                  f"{fmt(cpu, 1)} | {fmt(acpu, 1)} |")
    print("\n#### Fleet simulation: linear extrapolation (not measured)\n")
    print("Per-agent figures from the runs above × hosts (one watched service per host). "
          "Registry CPU: (with agents − baseline) ÷ N × hosts, idle; a change costs 'requests (pushes) per change above idle' ÷ N × hosts.\n")
    print("| registry | from N | idle requests/s at 1,000 | at 10,000 | idle registry CPU % at 1,000 | at 10,000 | "
          "requests (Nacos: pushes) per change at 1,000 | at 10,000 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        i, b, cl, n = r["idle"], r["baseline"], r["change_load"], r["agents"]
        key = "grpc" if "grpc" in i else "http"
        req = i[key]["requests"] / i["secs"] / n
        cpu = max(0.0, i["registry_cpu"] - b["registry_cpu"]) / n
        per = (per_change(r)[1] if key == "grpc" else per_change(r)[0]) / n
        idle1k, idle10k = fmt(req * 1000, 1), fmt(req * 10000, 0)
        if r["registry"] == "consul" and i[key]["requests"] == 0:
            # Too rare to see in a short window: each of the 2 blocking queries per host (catalog +
            # the service) returns once per wait (5 m) + Consul's jitter (up to wait/16).
            model = 2 / (300 * (1 + 1 / 32))
            idle1k, idle10k = f"0 measured; ≈{model * 1000:.1f} by model", f"≈{model * 10000:.0f} by model"
        ch1k, ch10k = fmt(per * 1000, 0), fmt(per * 10000, 0)
        if r["registry"] == "eureka":
            ch1k = ch10k = "none: polling (the idle rate)"
        print(f"| {r['registry']} | {n} | {idle1k} | {idle10k} | {fmt(cpu * 1000 * 100, 0)} | "
              f"{fmt(cpu * 10000 * 100, 0)} | {ch1k} | {ch10k} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure one registry")
    r.add_argument("--registry", choices=sorted(REGISTRIES), required=True)
    r.add_argument("--agents", type=int, default=50)
    r.add_argument("--agent-bin", default=os.environ.get("EDGE_AGENT_BIN"))
    r.add_argument("--idle-secs", type=float, default=20)
    r.add_argument("--baseline-secs", type=float, default=5)
    r.add_argument("--settle-secs", type=float, default=3)
    r.add_argument("--changes", type=int, default=5)
    r.add_argument("--first-timeout", type=float, default=30, help=argparse.SUPPRESS)
    r.add_argument("--eureka-interval", type=float, default=None, help="agents' fetch interval, s (default: the adapter's, 5 s)")
    r.add_argument("--out", help="append the result (one JSON line) to this file")
    r.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    p = sub.add_parser("report", help="markdown tables of the runs in a JSON-lines file")
    p.add_argument("file")
    args = ap.parse_args()
    if args.cmd == "report":
        report(args.file)
        return 0
    if not 1 <= args.agents <= 1000:
        ap.error("--agents must be 1..1000")
    if not (0 < args.idle_secs <= 600 and 0 <= args.baseline_secs <= 600 and 1 <= args.changes <= 100):
        ap.error("--idle-secs 0..600, --baseline-secs 0..600, --changes 1..100")

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    global NOFILE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers
    NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if NOFILE == resource.RLIM_INFINITY:
        NOFILE = 1 << 20
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        res = run(args)
    except Failure as e:
        log(f"{args.registry}: FAILED: {e}")
        return 1
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
