# stackml — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
SYSTEM_PYTHON ?= $(shell command -v python3.11 || command -v python3)
PYTEST_ARGS ?=
# Horizon's virtualenv (the dashboard plugin's tests) is built once here, beside the devcloud's
DEVCLOUD_VENVS ?= $(or $(STACKML_DEVCLOUD_VENVS),/var/cache/stackml/devcloud-venvs)

.PHONY: help venv deps demo demo-loop up test test-unit test-integration test-e2e test-dashboard lint format typecheck bench clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	@bash scripts/system-deps.sh
	@test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed ## Create the virtualenv and install stackml with its dev tools

deps: venv ## Install system packages (openssh-server, python3-venv) and the Python ones
	@bash scripts/system-deps.sh

demo: deps ## Train the example model end to end on the local default and print where it went
	$(VENV)/bin/stackml demo

demo-loop: deps ## The closed loop on the local default: feedback -> dataset -> scheduled retraining -> gate -> promotion
	$(VENV)/bin/stackml demo --loop

up: deps ## Run the local platform (API + worker + beat) in the foreground
	$(VENV)/bin/stackml up

test: deps ## Run the whole test-suite: chaos beside unit, then cloud beside integration+e2e
	PY=$(PY) bash scripts/test-all.sh $(PYTEST_ARGS)

test-unit: venv ## Run the unit tests only
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: deps ## Run the integration tests (PostgreSQL, Redis, Celery, sshd)
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: deps ## Run the end-to-end tests (API + worker + sandboxes + TensorFlow)
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

test-dashboard: venv ## Run the Horizon plugin's unit tests (dashboard/) in Horizon's own virtualenv
	@hv="$$($(PY) -m devcloud.venvs horizon $(DEVCLOUD_VENVS))" && cd dashboard && \
	  PYTHONPATH="$(CURDIR):$(CURDIR)/dashboard" "$$hv/bin/python" manage.py test stackml_dashboard

lint: venv ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv ## Format the code with ruff
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: venv ## mypy
	$(VENV)/bin/mypy

bench: deps ## Run the benchmarks (ratios against baselines measured in the same run)
	$(PY) bench/run.py

clean: ## Remove the virtualenv and caches (not the data directory)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
