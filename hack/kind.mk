# The local kind cluster and the end-to-end tests (included by Makefile). See docs/e2e.md.
.PHONY: kind-image kind-up kind-down e2e demo

kind-image: binaries ## build the kind node image here, no registry (cached by version and inputs)
	bash hack/kind/node-image.sh

kind-up: binaries ## create the kind cluster "llamaherd" and load the images; last line: kubeconfig
	bash hack/kind/cluster.sh up

kind-down: ## delete the kind cluster and its docker network
	bash hack/kind/cluster.sh down

e2e: setup binaries ## run the e2e suite on the kind cluster (creates it if needed)
	set -o pipefail; kubeconfig=$$(bash hack/kind/cluster.sh up | tail -n 1) \
	&& LLAMAHERD_E2E_KUBECONFIG=$$kubeconfig $(PY) -m pytest e2e -v $(PYTEST_ARGS)

demo: build-all ## the main job: kind cluster, chart, an autoscaled service under load (ends by itself)
	set -o pipefail; kubeconfig=$$(bash hack/kind/cluster.sh up | tail -n 1) \
	&& LLAMAHERD_E2E_KUBECONFIG=$$kubeconfig $(PY) -m e2e.demo
