# Two commands for a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed before the package so pip never resolves a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/deepmetric train

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

# The loss, miner and evaluation benchmarks at the sizes the docs quote (long-running;
# each script's docstring says what it measures and how to run one case).
bench: $(STAMP)
	$(PY) benchmarks/bench_issue2_pair_triplet_miners.py --sizes 1024 4096
	$(PY) benchmarks/bench_structured.py --sizes 1024 4096
	$(PY) benchmarks/bench_proxy.py --sizes 1024 4096
	$(PY) benchmarks/bench_label_layouts.py --sizes 4096
	$(PY) benchmarks/bench_distributed.py --batch 1024 --worlds 1 2 4
	$(PY) benchmarks/bench_metrics.py --sizes 10000
