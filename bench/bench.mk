# Serving benchmark (bench/README.md). Included from the root Makefile.
BENCH_ARGS ?=

bench: setup ## full serving benchmark: llamaherd vs llama-server vs one-at-a-time (~10 min)
	$(PY) bench/run.py $(BENCH_ARGS)

bench-quick: setup ## short serving benchmark (~2 min), results in bench/results/quick/
	$(PY) bench/run.py --quick $(BENCH_ARGS)

bench-llama-server: ## build llama-server and llama-batched-bench from the pinned vendored llama.cpp
	bash bench/build_llama_server.sh
