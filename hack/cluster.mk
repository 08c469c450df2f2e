# Control-plane and tool binaries, and a local control plane on loopback (included by Makefile).
# Binaries are built from Go modules into ${LLAMAHERD_CACHE:-~/.cache/llamaherd}/bin/ (versions in
# hack/versions.env); tests/harness/README.md explains the harness behind cluster-up.
CLUSTER_PY = $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)

.PHONY: binaries cluster-up cluster-down

binaries: ## build kube-apiserver, etcd, kubectl, helm, kind, ... from Go modules (cached)
	bash hack/build-binaries.sh

cluster-up: binaries ## start a control plane on 127.0.0.1 (background); last line: kubeconfig
	@$(CLUSTER_PY) -m tests.harness.controlplane up

cluster-down: ## stop the control plane that cluster-up started
	@$(CLUSTER_PY) -m tests.harness.controlplane down
