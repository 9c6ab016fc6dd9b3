# edge-agent — `make run` (agent + demo backends on the default file registry), `make test`,
# `make bench`, `make lint`.
CARGO ?= cargo
DEMO_ADDRS ?= 127.0.0.1:18081 127.0.0.1:18082

.PHONY: run build test lint bench fuzz clean

build:
	$(CARGO) build --workspace --bins --examples

# The agent on config/services.toml with two demo backends behind it. Ctrl-C stops both.
run:
	$(CARGO) build --bin edge-agent --example demo_backend
	@$(CARGO) run -q --example demo_backend -- $(DEMO_ADDRS) & backend=$$!; \
	trap 'kill $$backend 2>/dev/null' EXIT INT TERM; \
	echo "edge-agent: proxy on 127.0.0.1:15001, admin on 127.0.0.1:15000"; \
	echo "try:  curl -H 'Host: hello' http://127.0.0.1:15001/   and   curl http://127.0.0.1:15000/upstreams"; \
	$(CARGO) run -q --bin edge-agent

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
