# Container images: included by the root Makefile (`-include hack/images.mk`). See docs/images.md.
.PHONY: images image-base image-server image-server-cuda image-operator images-check-cuda test-images test-image-cuda

images: ## build llamaherd-server:cpu and llamaherd-operator:dev (starts dockerd, makes the base image)
	bash hack/images.sh all

image-base: ## only the local Debian base image llamaherd-base:bookworm (debootstrap, cached)
	bash hack/images.sh base

image-server: ## only llamaherd-server:cpu
	bash hack/images.sh server

image-server-cuda: ## llamaherd-server:cuda (CUDA 13 from PyPI; cold: ~1.5 h on 2 cores, then cached)
	bash hack/images.sh server-cuda

image-operator: ## only llamaherd-operator:dev
	bash hack/images.sh operator

images-check-cuda: ## build only the CUDA toolchain stage of Dockerfile.server (no kernels)
	bash hack/images.sh check-cuda

test-images: setup images ## build the images and run their tests
	$(PY) -m pytest tests/images $(PYTEST_ARGS)

test-image-cuda: setup image-server-cuda ## build the CUDA server image, then run its tests (no GPU needed)
	$(PY) -m pytest tests/images/test_cuda_image.py $(PYTEST_ARGS)
