"""A redeploy never replaces a running training instance (create_instance=true, the seed's path).

Template level: the instance resource names only its run's launch template at version 1 and a
subnet, so a newer AMI or any other setting changes the templates around it, never the instance;
a new run id is a new instance. On the local AWS: the real `cdk deploy` twice, with another pinned
AMI and other settings the second time, leaves the same instance running. (moto never replaces an
instance on update whatever the template says, so the template tests are the proof of "no
replacement"; the local deploy proves the frozen instance deploys and boots version 1's AMI.)
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import CDK_JSON_CONTEXT, LOCAL_AWS_CONFIGURATIONS, ROOT
from training_infra import naming
from training_infra.local.emulator import Emulator
from training_infra.local.instance import aws_client

CDK = ROOT / "node_modules" / ".bin" / "cdk"
AMI_AT_RUN_START = "ami-0123456789abcdef0"
NEWER_AMI = "ami-0fedcba987654321f"
# The settings of each deploy, declared once in tests/conftest.py (the session synth uses them too).
RUN = LOCAL_AWS_CONFIGURATIONS["redeploy_run_start"]
# A newer AMI and most settings that reach the launch template, all changed at once.
CHANGED = LOCAL_AWS_CONFIGURATIONS["redeploy_changed"]
assert RUN["image_id"] == AMI_AT_RUN_START and CHANGED["image_id"] == NEWER_AMI
assert set(CHANGED) <= set(CDK_JSON_CONTEXT) | {"image_id"}


def _instances(synthesized) -> dict[str, dict]:
    return synthesized.resources(naming.COMPUTE_STACK, "AWS::EC2::Instance")


@pytest.fixture(scope="module")
def templates(synth):
    """The shared session synth of the three configurations tests/conftest.py declares for this module."""
    return {name: synth(f"redeploy_{name}") for name in ("run_start", "changed", "new_run")}


def test_newer_ami_and_other_settings_leave_the_instance_resource_identical(templates):
    assert _instances(templates["run_start"]) == _instances(templates["changed"])
    (instance,) = _instances(templates["run_start"]).values()
    spec = instance["Properties"]["LaunchTemplate"]
    assert spec["Version"] == "1", "the instance names the version its run started with, not the latest"
    assert set(instance["Properties"]) == {"LaunchTemplate", "Monitoring", "SubnetId"}, "nothing that follows a setting"


def test_the_changes_land_in_the_launch_templates_for_the_next_run(templates):
    def images(synthesized) -> set[str]:
        return {
            t["Properties"]["LaunchTemplateData"]["ImageId"]
            for t in synthesized.resources(naming.COMPUTE_STACK, "AWS::EC2::LaunchTemplate").values()
        }

    assert images(templates["run_start"]) == {AMI_AT_RUN_START}
    assert images(templates["changed"]) == {NEWER_AMI}, (
        "launch follows the newest AMI; the run's template gets a new version"
    )


def test_a_new_run_id_is_a_new_instance(templates):
    assert set(_instances(templates["run_start"])).isdisjoint(_instances(templates["new_run"]))


@pytest.fixture(scope="module")
def deployed_twice(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("redeploy")
    with Emulator(workdir / "emulator") as emulator:
        env = {**os.environ, **emulator.env, "CDK_DISABLE_VERSION_CHECK": "true", "CDK_DISABLE_CLI_TELEMETRY": "true"}

        def cdk(*args: str, settings: dict[str, str] | None = None) -> None:
            context = [arg for key, value in (settings or {}).items() for arg in ("-c", f"{key}={value}")]
            result = subprocess.run(
                [str(CDK), *args, "--no-notices", *context],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

        def deploy(settings: dict[str, str]) -> str:
            cdk(
                "deploy", naming.COMPUTE_STACK, "--method=direct", "--no-previous-parameters",
                "--require-approval", "never", "--output", str(workdir / "cdk.out"), settings=settings,
            )  # fmt: skip
            stack = aws_client("cloudformation", emulator.env).describe_stacks(StackName=naming.COMPUTE_STACK)[
                "Stacks"
            ][0]
            return {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}[naming.OUTPUT_INSTANCE_ID]

        cdk("bootstrap", f"aws://123456789012/{emulator.region}", "--output", str(workdir / "cdk.out"))
        first = deploy(RUN)
        second = deploy(CHANGED)
        ec2 = aws_client("ec2", emulator.env)
        (instance,) = [i for r in ec2.describe_instances(InstanceIds=[second])["Reservations"] for i in r["Instances"]]
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        versions = ec2.describe_launch_template_versions(LaunchTemplateId=tags["aws:ec2launchtemplate:id"])[
            "LaunchTemplateVersions"
        ]
        yield {"first": first, "second": second, "instance": instance, "tags": tags, "versions": versions}


def test_redeploy_on_the_local_aws_keeps_the_same_instance_running(deployed_twice):
    assert deployed_twice["first"] == deployed_twice["second"]
    assert deployed_twice["instance"]["State"]["Name"] == "running"


def test_the_seed_instance_runs_in_the_market_its_template_says(deployed_twice):
    """Issue 14: the emulator's create_instance instance reported on-demand while its status.json said spot."""
    assert deployed_twice["instance"]["InstanceLifecycle"] == "spot"


def test_the_instance_booted_its_runs_first_template_version_while_the_template_moved_on(deployed_twice):
    instance, versions = deployed_twice["instance"], deployed_twice["versions"]
    by_number = {v["VersionNumber"]: v["LaunchTemplateData"] for v in versions}
    assert deployed_twice["tags"]["aws:ec2launchtemplate:version"] == "1"
    assert instance["ImageId"] == AMI_AT_RUN_START == by_number[1]["ImageId"]
    assert by_number[max(by_number)]["ImageId"] == NEWER_AMI
    assert deployed_twice["tags"][naming.TAG_RUN_ID] == "keep-me"
    assert json.dumps(by_number[1]).count("keep-me") >= 1, "the run id is baked into version 1's user data and tags"
