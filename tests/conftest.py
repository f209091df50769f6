"""Shared fixtures: one synth per configuration for the whole session."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# jsii and the CDK CLI need the pinned Node 24 from the venv, even when pytest is run by hand.
os.environ["PATH"] = os.pathsep.join(
    [
        str(VENV_BIN),
        str(ROOT / ".venv" / "nodejs" / "bin"),
        str(ROOT / "node_modules" / ".bin"),
        os.environ.get("PATH", ""),
    ]
)
os.environ.setdefault("JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION", "1")
os.environ.setdefault("CDK_DISABLE_CLI_TELEMETRY", "true")

CDK_JSON_CONTEXT = json.loads((ROOT / "cdk.json").read_text())["context"]
AMI = "ami-0123456789abcdef0"

# The configurations that matter; each is synthesized at most once per test session.
CONFIGURATIONS: dict[str, dict[str, str]] = {
    "defaults": {},
    "full": {
        "github_repo": "acme/trainer",
        "github_branch": "release",
        "alert_email": "ml-team@example.com",
        "create_instance": "true",
        "image_id": AMI,
        "run_id": "bert-lr3e4",
        "availability_zones": "us-east-1a,us-east-1b,us-east-1c",
        # Guard-rail values other than the defaults, so tests see each setting arrive.
        "monthly_budget_usd": "250",
        "monthly_limit_usd": "200",
        "max_runtime_hours": "3.5",
        "log_retention_days": "14",
        "reserve_lambda_concurrency": "false",
        "checkpoint_retention_days": "7",
        # The opt-in trainer role (issue 15, item 1).
        "trainer_s3_access": "true",
        # Data larger than the disk: Mountpoint at /data (issue 29).
        "data_access": "mount",
    },
    "on_demand": {"use_spot": "false", "auto_shutdown": "false", "create_instance": "true", "image_id": AMI},
    "existing_vpc": {
        "vpc_id": "vpc-0123456789abcdef0",
        "subnet_ids": "subnet-0123456789abcdef0,subnet-0fedcba9876543210",
        "create_instance": "true",
    },
    "private": {"private_networking": "true", "spot_max_price": "0.5", "create_instance": "true", "image_id": AMI},
    "existing_oidc": {
        "github_repo": "acme/trainer",
        "existing_oidc_provider_arn": "arn:aws:iam::123456789012:oidc-provider/token.actions.githubusercontent.com",
    },
}
# Deployed to the local AWS by tests/test_deploy_guard.py (moto knows this AMI id), then the same with
# a new run id; the gates above need not see them again.
LOCAL_AWS_CONFIGURATIONS: dict[str, dict[str, str]] = {
    # tests/test_redeploy_keeps_instance.py: a run's start, then a newer AMI and other settings, then a new run id.
    "redeploy_run_start": {"create_instance": "true", "run_id": "keep-me", "image_id": "ami-0123456789abcdef0"},
    "redeploy_changed": {
        "create_instance": "true",
        "run_id": "keep-me",
        "image_id": "ami-0fedcba987654321f",
        "idle_minutes": "45",
        "max_runtime_hours": "20",
        "instance_type": "g6.xlarge",
        "training_command": "python train.py --epochs 3",
        "volume_size_gb": "200",
    },
    "redeploy_new_run": {"create_instance": "true", "run_id": "next-run", "image_id": "ami-0123456789abcdef0"},
    "guarded": {
        "github_repo": "acme/trainer",
        "alert_email": "ml-team@example.com",
        "create_instance": "true",
        "image_id": "ami-12c6146b",
        "run_id": "guard-run-1",
    },
    "guarded_new_run": {
        "github_repo": "acme/trainer",
        "alert_email": "ml-team@example.com",
        "create_instance": "true",
        "image_id": "ami-12c6146b",
        "run_id": "guard-run-2",
    },
}


class StackView:
    """One synthesized stack: its template as JSON and as `Template`, plus the constructs that made it."""

    def __init__(self, stack, template_json: dict) -> None:
        from aws_cdk.assertions import Template

        self.stack = stack
        self.json = template_json
        self.template = Template.from_json(template_json)

    def construct(self, path: str):
        """`view.construct("Safety/Reaper")` -> the construct at that path below the stack."""
        node = self.stack
        for part in path.split("/"):
            node = node.node.find_child(part)
        return node

    def logical_id(self, construct) -> str:
        """The logical id of a construct's CloudFormation resource (never a hashed name in a test)."""
        from aws_cdk import CfnElement, Stack

        resource = construct if isinstance(construct, CfnElement) else construct.node.default_child
        while not isinstance(resource, CfnElement):
            resource = resource.node.default_child
        return Stack.of(resource).resolve(resource.logical_id)

    def ref(self, construct) -> dict:
        return {"Ref": self.logical_id(construct)}

    def resources(self, resource_type: str) -> dict[str, dict]:
        return {key: value for key, value in self.json["Resources"].items() if value["Type"] == resource_type}

    def one(self, resource_type: str, **match) -> tuple[str, dict]:
        found = [
            (key, value)
            for key, value in self.resources(resource_type).items()
            if all(value["Properties"].get(k) == v for k, v in match.items())
        ]
        assert len(found) == 1, f"expected one {resource_type} with {match}, found {len(found)}"
        return found[0]

    def statements(self, resource_type: str, document_key: str) -> list[dict]:
        return [
            s
            for resource in self.resources(resource_type).values()
            for s in resource["Properties"][document_key]["Statement"]
        ]

    def role_statements(self, role) -> list[dict]:
        """Every statement of the inline policies attached to `role`."""
        ref = self.ref(role)
        return [
            statement
            for policy in self.resources("AWS::IAM::Policy").values()
            if ref in policy["Properties"]["Roles"]
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]
        ]


@dataclass
class Synth:
    outdir: Path
    app: object
    settings: object
    templates: dict[str, dict]

    def stack(self, stack_name: str) -> StackView:
        return StackView(self.app.node.find_child(stack_name), self.templates[stack_name])

    def template(self, stack_name: str):
        return self.stack(stack_name).template

    def resources(self, stack_name: str, resource_type: str) -> dict[str, dict]:
        return self.stack(stack_name).resources(resource_type)


def synthesize(outdir: Path, overrides: dict[str, str]) -> Synth:
    """The whole app as users get it (cdk.json context + overrides), with cdk-nag: a finding raises."""
    from training_infra.config import parse_settings
    from training_infra.stacks import build_app, new_app

    app = new_app(outdir=str(outdir), context={**CDK_JSON_CONTEXT, **overrides})
    settings = parse_settings(app.node.get_all_context())
    build_app(settings, app=app)
    app.synth()
    templates = {
        path.name.removesuffix(".template.json"): json.loads(path.read_text())
        for path in outdir.glob("*.template.json")
    }
    return Synth(outdir=outdir, app=app, settings=settings, templates=templates)


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """`synth("full")` -> the synthesized app of that configuration (cached per session)."""
    cache: dict[str, Synth] = {}

    def get(name: str) -> Synth:
        if name not in cache:
            cache[name] = synthesize(
                tmp_path_factory.mktemp(f"cdk-{name}"), {**CONFIGURATIONS, **LOCAL_AWS_CONFIGURATIONS}[name]
            )
        return cache[name]

    return get


# ---------------------------------------------------------------------------------------------- xdist order
# `make test` runs `-n 2 --dist loadscope`: each scope (a module) goes whole to one worker, in this order.
# xdist's own order (most tests first) started long end-to-end modules last (the last run ended on one worker
# alone with the gang test). These start first, longest first (per-module figures of a measured run); every
# other scope follows in collection order and fills in beside them.
LONGEST_FIRST: tuple[str, ...] = (
    "tests/agent/test_agent_progress.py",
    "tests/agent/test_agent_scenarios.py",
    "tests/agent/test_agent_security.py",
    "tests/agent/test_agent_container.py",
    "tests/test_local_demo.py",
    "tests/test_local_gang.py",
    "tests/test_bench_smoke.py::test_bench_script_runs_to_the_end_at_its_smallest_size[scripts/bench_gang_agent.py]",
    "tests/agent/test_agent_managed.py",
    "tests/test_bench_smoke.py::test_bench_script_runs_to_the_end_at_its_smallest_size[scripts/bench_agent.py]",
    "tests/agent/test_agent_coldstart.py",
    "tests/agent/test_agent_gang.py",
    "tests/test_gates.py",
    "tests/test_bench_smoke.py::test_bench_script_runs_to_the_end_at_its_smallest_size[scripts/bench_coldstart.py]",
    "tests/agent/test_agent_params.py",
    "tests/test_deploy_guard.py",
    "tests/test_bench_smoke.py::test_bench_script_runs_to_the_end_at_its_smallest_size[scripts/bench_status_cost.py]",
    "tests/test_bench_smoke.py::test_bench_script_runs_to_the_end_at_its_smallest_size[scripts/bench_local.py]",
    "tests/test_diff_role.py",
    "tests/test_bench_smoke.py::test_bench_script_runs_to_the_end_at_its_smallest_size[scripts/bench_launch.py]",
)
# Scopes of their own: tests without a shared module fixture, too long to run one after another on one worker.
ONE_SCOPE_PER_TEST: tuple[str, ...] = ("tests/test_bench_smoke.py::",)


def xdist_scope(nodeid: str) -> str:
    """What one worker runs together: the module (class), or the test itself for ONE_SCOPE_PER_TEST."""
    return nodeid if nodeid.startswith(ONE_SCOPE_PER_TEST) else nodeid.rsplit("::", 1)[0]


def _rank(nodeid: str) -> int:
    return next((n for n, prefix in enumerate(LONGEST_FIRST) if nodeid.startswith(prefix)), len(LONGEST_FIRST))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest scopes first (stable: a module's tests keep their order and stay together)."""
    items.sort(key=lambda item: _rank(item.nodeid))


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """loadscope with our scopes and the collection's order (xdist would re-sort it by test count)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LongestFirst(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    config.option.loadscopereorder = False
    return LongestFirst(config, log)
