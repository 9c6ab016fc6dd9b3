# edge-agent — `make run` (agent + demo backends on the default file registry), `make test`,
# `make bench`, `make lint`.
SHELL := bash
CARGO ?= cargo
DEMO_ADDRS ?= 127.0.0.1:18081 127.0.0.1:18082

.PHONY: run build test lint bench fuzz clean

build:
	$(CARGO) build --workspace --bins --examples

# The agent on config/services.toml with two demo backends behind it. Ctrl-C stops both. The
# binaries built here are run as they are (`cargo run --bin` alone would build the dependencies
# again with other features), and the agent starts once both backends accept connections.
run:
	$(CARGO) build --bin edge-agent --example demo_backend
	@bin="$${CARGO_TARGET_DIR:-target}/debug"; \
	"$$bin/examples/demo_backend" $(DEMO_ADDRS) & backend=$$!; \
	trap 'kill $$backend 2>/dev/null' EXIT INT TERM; \
	for addr in $(DEMO_ADDRS); do \
	  for i in $$(seq 100); do (exec 3<>/dev/tcp/$${addr%:*}/$${addr##*:}) 2>/dev/null && break; sleep 0.1; done; \
	done; \
	echo "edge-agent: proxy on 127.0.0.1:15001, admin on 127.0.0.1:15000"; \
	echo "try:  curl -H 'Host: hello' http://127.0.0.1:15001/   and   curl http://127.0.0.1:15000/upstreams"; \
	"$$bin/edge-agent"

# Every test: unit tests, and integration tests that start real backends and registries on
# loopback (registry servers are built once per machine into ~/.cache/edge-agent).
test: build
	$(CARGO) test --workspace

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Proxy side by side (nginx, HAProxy, edge-agent on loopback: HTTP/1.1 with wrk, HTTP/2 with
# h2load, gRPC unary with ghz, the access log's cost), criterion micro-benchmarks, memory at
# scale, and the fleet simulation (N agents against each installed registry server,
# bench/fleet.sh); prints markdown tables (see BENCHMARKS.md). `BENCH_ONLY=h2 make bench` runs
# one section (http1, accesslog, h2, grpc, scale, micro, fleet; comma-separated for several).
# Not part of `make test`.
bench:
	bash bench/run.sh

# libFuzzer targets in fuzz/ (config file, file registry, registry URLs, Eureka/Consul/Nacos
# answers), FUZZ_SECONDS (default 60) each; prints executions and findings. Not part of CI.
fuzz:
	bash fuzz/run.sh

clean:
	$(CARGO) clean
