# llamaherd: the commands a person (and CI) runs. See README.md.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
MODEL ?= models/demo.gguf
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: help setup build-all system-deps binaries model run test test-unit fuzz lint simulate clean

help:
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:[^#]*## /\t/' | expand -t 20

setup: ## create .venv and install llamaherd (builds llama-cpp-python once, cached)
	bash hack/setup.sh

system-deps: ## install the Debian packages the tests use (prometheus)
	bash hack/system-deps.sh

model: setup ## generate the demo GGUF model (random weights, llama architecture)
	@test -f $(MODEL) || $(PY) -m llamaherd_server.ggufgen --preset demo --out $(MODEL)

run: model ## run the server on the demo model at http://127.0.0.1:$(PORT)
	$(PY) -m llamaherd_server --model $(MODEL) --host 127.0.0.1 --port $(PORT)

# Setup first (it compiles llama.cpp, once: the server image installs that wheel), then the Go
# binaries (CPU-bound) and the images (mostly downloads: debootstrap, apt, pip) side by side, their
# progress lines interleaved ([binaries], [images]); the kind node image needs the binaries.
build-all: setup ## everything test and demo build: .venv, binaries and images side by side, kind node image
	$(MAKE) --no-print-directory -j2 binaries images
	$(MAKE) --no-print-directory kind-image

test: system-deps build-all ## set up everything, run every test (e2e on kind last)
	set -o pipefail; kubeconfig=$$(bash hack/kind/cluster.sh up | tail -n 1) \
	&& LLAMAHERD_E2E_KUBECONFIG=$$kubeconfig $(PY) -m pytest tests e2e $(PYTEST_ARGS)

test-unit: setup ## only the tests that need no cluster, Prometheus or Docker images
	$(PY) -m pytest -m "not cluster and not prometheus and not images and not e2e and not tools" $(PYTEST_ARGS)

FUZZ_EXAMPLES ?= 600
fuzz: setup ## a longer run of the API fuzz tests (LLAMAHERD_FUZZ_EXAMPLES per strategy; CI runs 40)
	LLAMAHERD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/server/test_fuzz.py \
		$(wildcard tests/integration/test_gateway_fuzz.py) -p no:cacheprovider $(PYTEST_ARGS)

lint: setup ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy server/llamaherd_server operator/llamaherd_operator gateway/llamaherd_gateway

simulate: setup ## replay arrival traces through the autoscaling policy (simulator/results)
	for trace in spike ramp diurnal oscillating; do $(PY) -m simulator.fleet --trace $$trace; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Control-plane and tool binaries (kube-apiserver, etcd, helm, kind, ...): see hack/cluster.mk.
-include hack/cluster.mk
# The Helm chart, manifests/install.yaml and the monitoring files generated from it.
-include hack/chart.mk
# Container images (dockerd, a debootstrap base, the CPU variants of both images).
-include hack/images.mk
-include bench/bench.mk
# The kind cluster (node image built here), the e2e suite and the demo.
-include hack/kind.mk
