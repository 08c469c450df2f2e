# Serving benchmark (bench/README.md). Included from the root Makefile.
BENCH_ARGS ?=

GPU_OUT ?= /tmp/llamaherd-gpu

.PHONY: profile bench-deps bench-llama-server bench-prefix bench-gpu bench-gpu-prepare bench-gpu-rehearsal

# matplotlib draws the plots; it belongs in pyproject's `bench` extra.
bench-deps: setup
	@$(PY) -c "import matplotlib" 2>/dev/null || $(VENV)/bin/pip install -q "matplotlib>=3.8,<4"

bench: bench-deps ## full serving benchmark: llamaherd vs llama-server vs one-at-a-time (~10 min)
	$(PY) bench/run.py $(BENCH_ARGS)

bench-quick: bench-deps ## short serving benchmark (~1-2 min), results in bench/results/quick/
	$(PY) bench/run.py --quick $(BENCH_ARGS)

bench-llama-server: ## build llama-server and llama-batched-bench from the pinned vendored llama.cpp
	bash bench/build_llama_server.sh

bench-prefix: bench-deps ## prefix-cache benchmark: repeated, shared-prefix and multi-turn traffic vs llama-server (~25 min)
	$(PY) bench/prefix_bench.py $(BENCH_ARGS)

bench-gpu-prepare: setup ## fill .gpu-carry/ for bench-gpu on a GPU machine without network (bench/README.md)
	bash bench/gpu_prepare.sh

bench-gpu: ## GPU benchmark, under 8 min on one GPU: checks, llamaherd vs llama-server, the seed's workload -> $(GPU_OUT)
	bash bench/gpu.sh $(GPU_OUT)

bench-gpu-rehearsal: bench-gpu-prepare ## bench-gpu on this machine without a GPU (every path but CUDA) -> $(GPU_OUT)
	LLAMAHERD_GPU_REHEARSAL=1 bash bench/gpu.sh $(GPU_OUT)

PROFILE_ARGS ?=
profile: bench-deps ## where the time per generated token goes (engine, loop, gateway, GIL) -> bench/results/profile/ (~1 min)
	$(PY) bench/token_profile.py $(PROFILE_ARGS)
