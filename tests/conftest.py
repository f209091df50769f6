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
    [str(VENV_BIN), str(ROOT / ".venv" / "nodejs" / "bin"), str(ROOT / "node_modules" / ".bin"), os.environ.get("PATH", "")]
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
    },
    "on_demand": {"use_spot": "false", "auto_shutdown": "false", "create_instance": "true", "image_id": AMI},
    "existing_vpc": {"vpc_id": "vpc-0123456789abcdef0", "subnet_ids": "subnet-0123456789abcdef0,subnet-0fedcba9876543210", "create_instance": "true"},
    "private": {"private_networking": "true", "spot_max_price": "0.5", "create_instance": "true", "image_id": AMI},
    "existing_oidc": {
        "github_repo": "acme/trainer",
        "existing_oidc_provider_arn": "arn:aws:iam::123456789012:oidc-provider/token.actions.githubusercontent.com",
    },
}
# Deployed to the local AWS by tests/test_deploy_guard.py (moto knows this AMI id), then the same with
# a new run id; the gates above need not see them again.
LOCAL_AWS_CONFIGURATIONS: dict[str, dict[str, str]] = {
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


@dataclass
class Synth:
    outdir: Path
    templates: dict[str, dict]

    def template(self, stack_name: str):
        from aws_cdk.assertions import Template

        return Template.from_json(self.templates[stack_name])

    def resources(self, stack_name: str, resource_type: str) -> dict[str, dict]:
        resources = self.templates[stack_name]["Resources"]
        return {key: value for key, value in resources.items() if value["Type"] == resource_type}


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """`synth("full")` -> the synthesized templates of that configuration (cached per session)."""
    from training_infra.config import parse_settings
    from training_infra.stacks import build_app, new_app

    cache: dict[str, Synth] = {}

    def get(name: str) -> Synth:
        if name not in cache:
            outdir = tmp_path_factory.mktemp(f"cdk-{name}")
            app = new_app(outdir=str(outdir), context={**CDK_JSON_CONTEXT, **{**CONFIGURATIONS, **LOCAL_AWS_CONFIGURATIONS}[name]})
            build_app(parse_settings(app.node.get_all_context()), app=app)
            app.synth()
            templates = {path.name.removesuffix(".template.json"): json.loads(path.read_text()) for path in outdir.glob("*.template.json")}
            cache[name] = Synth(outdir=outdir, templates=templates)
        return cache[name]

    return get
