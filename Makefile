# The README's two commands:  `make demo`  and  `make test`  (each sets the project up first).
# TORCH_SPEC: on a CUDA server install your CUDA build first (or set TORCH_SPEC); an existing torch in
# the venv is kept. The default pin takes the CPU wheel on machines without one (no multi-GB CUDA pull).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medseg-installed

.PHONY: setup demo lint test test-slow test-gpu benchmarks clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/medseg demo --workdir demo_run

lint: setup  # checked style: lint, formatting and types of the package (also part of `make test`)
	$(VENV)/bin/ruff check medseg
	$(VENV)/bin/ruff format --check medseg
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

test-gpu: setup  # on a CUDA server: AMP training, GPU inference vs CPU, NCCL torchrun
	$(PY) -m pytest -q -m gpu tests/test_gpu.py

clean:
	rm -rf demo_run .pytest_cache
