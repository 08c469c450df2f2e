# Container images: included by the root Makefile (`-include hack/images.mk`). See docs/images.md.
.PHONY: images image-base image-server image-operator images-check-cuda test-images

images: ## build llamaherd-server:cpu and llamaherd-operator:dev (starts dockerd, makes the base image)
	bash hack/images.sh all

image-base: ## only the local Debian base image llamaherd-base:bookworm (debootstrap, cached)
	bash hack/images.sh base

image-server: ## only llamaherd-server:cpu
	bash hack/images.sh server

image-operator: ## only llamaherd-operator:dev
	bash hack/images.sh operator

images-check-cuda: ## parse the CUDA variant of Dockerfile.server with BuildKit
	bash hack/images.sh check-cuda

test-images: setup images ## build the images and run their tests
	$(PY) -m pytest tests/images $(PYTEST_ARGS)
