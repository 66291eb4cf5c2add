# Every target does its own set-up: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH_CPU_VERSION := 2.13.0
DEMO_OUT ?= runs/demo

.PHONY: venv demo lint test test-fast gpu-check clean

venv: $(VENV)/.stamp

# torch first: without a GPU, pin the CPU build so pip does not resolve the multi-GB CUDA wheel.
$(VENV)/.stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
	    $(PIP) install --quiet "torch>=2.13" && $(PIP) install --quiet -e ".[dev,gpu]"; \
	else \
	    $(PIP) install --quiet "torch==$(TORCH_CPU_VERSION)" && $(PIP) install --quiet -e ".[dev]"; \
	fi
	touch $@

demo: venv
	$(VENV)/bin/meshweave run --nproc 4 --config configs/tiny.toml --out $(DEMO_OUT) \
	    --parallel.tp=2 --parallel.dp_shard=2 --checkpoint.resume=none
	$(VENV)/bin/meshweave plot $(DEMO_OUT)
	@echo "demo done: metrics in $(DEMO_OUT)/metrics.jsonl, plots in $(DEMO_OUT)/plots/, checkpoints in $(DEMO_OUT)/checkpoints/"

# ruff (lint + format check) and mypy; CI runs it before the tests.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: venv
	$(PY) -m pytest -q -rs --durations=15

# The in-process specifications only: no test that starts a process.
test-fast: venv
	$(PY) -m pytest -q -m "not procs"

# The GPU path in one command (tests/gpu, NCCL parity, MFU); on a machine without CUDA: one line, exit 0.
gpu-check: venv
	$(PY) -m bench.gpu_check

clean:
	rm -rf $(VENV) runs .pytest_cache
