# The README's two commands:  `make demo`  and  `make test`  (each sets the project up first).
# TORCH_SPEC: on a CUDA server install your CUDA build first (or set TORCH_SPEC); an existing torch in
# the venv is kept. The default pin takes the CPU wheel on machines without one (no multi-GB CUDA pull).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.medseg-installed

.PHONY: setup setup-system demo lint test test-slow test-gpu benchmarks bench-nnunet-env clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# System packages some tests need, from Debian: Orthanc and its DICOMweb plugin (the PACS tests, tests/pacs) and
# Chromium (the MLflow UI browser test, tests/test_mlflow_ui.py). Installed only when missing and we are root
# with apt-get; otherwise this says what is missing and those tests skip. A temporary policy-rc.d (exit 101)
# keeps the package's post-install from starting a system Orthanc (which would fail in a container without
# systemd); the tests start their own Orthanc on free local ports.
SYSTEM_PACKAGES := orthanc orthanc-dicomweb chromium
ORTHANC_PLUGIN := /usr/share/orthanc/plugins/libOrthancDicomWeb.so
HAVE_SYSTEM_PACKAGES = { command -v Orthanc || [ -x /usr/sbin/Orthanc ]; } >/dev/null 2>&1 && [ -e $(ORTHANC_PLUGIN) ] \
  && command -v chromium >/dev/null 2>&1
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES)

setup-system:
	@if $(HAVE_SYSTEM_PACKAGES); then \
	  echo "setup-system: Orthanc, its DICOMweb plugin and Chromium are installed"; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "setup-system: Orthanc, $(ORTHANC_PLUGIN) or chromium missing; the PACS / browser tests will skip" \
	    "(as root on Debian: apt-get install $(SYSTEM_PACKAGES))"; \
	else \
	  echo "setup-system: installing $(SYSTEM_PACKAGES)"; \
	  created=; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && created=1; \
	  fi; \
	  trap '[ -z "$$created" ] || rm -f /usr/sbin/policy-rc.d' EXIT; \
	  apt-cache show $(SYSTEM_PACKAGES) >/dev/null 2>&1 || apt-get update -q >/dev/null || exit 1; \
	  $(APT_INSTALL) >/dev/null || { apt-get update -q >/dev/null && $(APT_INSTALL) >/dev/null; } || exit 1; \
	  if [ -d /run/systemd/system ]; then systemctl disable --now orthanc >/dev/null 2>&1 || true; fi; \
	  $(HAVE_SYSTEM_PACKAGES) || { echo "setup-system: installed, but Orthanc, $(ORTHANC_PLUGIN) or chromium is missing"; exit 1; }; \
	  echo "setup-system: installed $$(/usr/sbin/Orthanc --version | head -n 1)"; \
	fi

demo: setup
	$(VENV)/bin/medseg demo --workdir demo_run

lint: setup  # checked style: lint of the package, tests and benchmarks; formatting and types of the package (also part of `make test`)
	$(VENV)/bin/ruff check medseg tests benchmarks
	$(VENV)/bin/ruff format --check medseg
	$(VENV)/bin/mypy

# Two workers (pytest-xdist), one test file each at a time (--dist loadfile: a module's shared fixture, such as a
# tiny training, runs once): the suite waits on subprocesses and servers as much as it computes, so 2 workers on
# 2 cores took 944 s against 1510 s for one. PYTEST_WORKERS=0 runs it in one process. The 25 slowest tests are
# listed at the end (where to look when the suite grows).
PYTEST_WORKERS ?= 2
test: setup-system lint
	$(PY) -m pytest -q --durations=25 $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

test-slow: setup
	$(PY) -m pytest -q -m slow

test-gpu: setup  # on a CUDA server: AMP training, GPU inference vs CPU, NCCL torchrun
	$(PY) -m pytest -q -m gpu tests/test_gpu.py

# nnU-Net v2's predictor, the second reference of benchmarks/inference.py, in its own venv: nnunetv2 pulls a
# torchvision that does not import beside the CPU torch wheel, so it stays out of the project's venv.
NNUNET_VENV ?= .venv-nnunet
bench-nnunet-env:
	test -x $(NNUNET_VENV)/bin/python || $(PYTHON) -m venv $(NNUNET_VENV)
	$(NNUNET_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(NNUNET_VENV)/bin/python -m pip install -q nnunetv2==2.8.1 "$(TORCH_SPEC)"

clean:
	rm -rf demo_run .pytest_cache
