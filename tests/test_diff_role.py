"""The pull-request diff needs nothing but the diff role's own CloudFormation reads (issue 15, item 2).

On the local AWS (moto server): the real `cdk bootstrap` and `cdk deploy` of every stack, then the
exact `cdk diff` command of .github/workflows/cdk-diff.yml, run by the real CDK CLI with the
temporary credentials of a role that holds only the deployed diff role's actions, while moto
enforces IAM for every request (its `reset-auth` switch: from then on, unsigned or unknown
credentials and actions outside the caller's policies are refused).

What moto checks and what it does not: it evaluates the *actions* of the caller's policies (and,
for sts:AssumeRole, the target role); it compares CloudFormation calls against `Resource: "*"`
only, so the role under test carries the deployed diff role's actions on `*`. That the deployed
role limits them to this project's stacks is a template assertion (tests/test_registry.py). A
control run without cloudformation:GetTemplate fails, so the enforcement is real.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import urllib.request

import pytest

from tests.conftest import AMI, ROOT
from training_infra import naming
from training_infra.local.emulator import Emulator
from training_infra.local.instance import aws_client

CDK = ROOT / "node_modules" / ".bin" / "cdk"
WORKFLOW = ROOT / ".github" / "workflows" / "cdk-diff.yml"
REPOSITORY = "acme/trainer"
# moto cannot resolve the Deep Learning AMI's SSM parameter: deploy and diff pin the same AMI.
LOCAL_ONLY = ["-c", f"image_id={AMI}"]


def workflow_diff_command() -> list[str]:
    """The cdk diff command line of the workflow's diff step, as GitHub would run it for REPOSITORY."""
    [line] = [
        line.strip()
        for line in WORKFLOW.read_text().splitlines()
        if line.strip().startswith("node_modules/.bin/cdk diff")
    ]
    line = line.replace("${{ github.repository }}", REPOSITORY)
    line = re.sub(r"\s*>\s*diff\.txt\s*2>&1\s*$", "", line)
    return shlex.split(line)


def _statement_actions(document: dict) -> list[str]:
    return sorted(
        {a for s in document["Statement"] for a in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]])}
    )


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Every stack deployed with the GitHub roles; the emulator still accepts any credentials."""
    workdir = tmp_path_factory.mktemp("diff-role")
    with Emulator(workdir / "emulator") as emulator:
        env = {**os.environ, **emulator.env, "CDK_DISABLE_VERSION_CHECK": "true", "CDK_DISABLE_CLI_TELEMETRY": "true"}

        def cdk(args: list[str], credentials: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*args, "--no-notices", *LOCAL_ONLY],
                cwd=ROOT,
                env={**env, **(credentials or {})},
                capture_output=True,
                text=True,
                timeout=600,
            )

        for step in (
            [str(CDK), "bootstrap", f"aws://123456789012/{emulator.region}"],
            [str(CDK), "deploy", "--all", "--method=direct", "--no-previous-parameters", "--require-approval", "never",
             "--output", str(workdir / "cdk.out"), "-c", f"github_repo={REPOSITORY}"],
        ):  # fmt: skip
            result = cdk(step)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        yield emulator, cdk


def _credentials_with_only(emulator: Emulator, name: str, actions: list[str]) -> dict[str, str]:
    """Temporary credentials of a new role allowed exactly `actions` (moto checks actions, on Resource "*")."""
    iam = aws_client("iam", emulator.env)
    trust = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
    }
    role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    iam.put_role_policy(RoleName=name, PolicyName="only", PolicyDocument=json.dumps(policy))
    credentials = aws_client("sts", emulator.env).assume_role(RoleArn=role["Arn"], RoleSessionName="pull-request")[
        "Credentials"
    ]
    return {
        "AWS_ACCESS_KEY_ID": credentials["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": credentials["SecretAccessKey"],
        "AWS_SESSION_TOKEN": credentials["SessionToken"],
    }


def _enforce_iam(emulator: Emulator) -> None:
    """From now on moto authenticates and authorizes every request (0 unauthenticated actions left)."""
    request = urllib.request.Request(
        f"{emulator.endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )  # noqa: S310 - loopback
    with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - loopback
        pass


@pytest.fixture(scope="module")
def diff_runs(deployed):
    emulator, cdk = deployed
    iam = aws_client("iam", emulator.env)
    [diff_role] = [r["RoleName"] for r in iam.list_roles()["Roles"] if "GithubDiffRole" in r["RoleName"]]
    documents = [
        iam.get_role_policy(RoleName=diff_role, PolicyName=n)["PolicyDocument"]
        for n in iam.list_role_policies(RoleName=diff_role)["PolicyNames"]
    ]
    actions = sorted({a for d in documents for a in _statement_actions(d)})
    as_diff_role = _credentials_with_only(emulator, "as-diff-role", actions)
    without_templates = _credentials_with_only(
        emulator, "diff-role-without-gettemplate", [a for a in actions if a != "cloudformation:GetTemplate"]
    )
    _enforce_iam(emulator)
    command = workflow_diff_command()
    command[0] = str(ROOT / command[0])
    return {
        "actions": actions,
        "diff": cdk(command, as_diff_role),
        "control": cdk(command, without_templates),
        "unknown_credentials": cdk(command),  # moto's fake keys: refused once IAM is enforced
    }


def test_workflow_diffs_without_a_change_set_and_holds_no_write_flag():
    command = workflow_diff_command()
    assert command[:2] == ["node_modules/.bin/cdk", "diff"]
    assert "--no-change-set" in command  # a change set would need CloudFormation writes
    assert "--all" not in command  # cdk diff compares every stack; this CLI rejects --all for diff


def test_deployed_diff_role_holds_only_cloudformation_reads(diff_runs):
    assert diff_runs["actions"] == [
        "cloudformation:DescribeStacks",
        "cloudformation:GetTemplate",
        "cloudformation:ListStackResources",
    ]


def test_workflow_diff_succeeds_with_only_the_diff_roles_permissions_and_reads_every_deployed_template(diff_runs):
    result = diff_runs["diff"]
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for stack in naming.ALL_STACKS:
        assert re.search(rf"Stack {stack} .*\n(.*\n)?There were no differences", output), (
            f"{stack} not compared:\n{output[-4000:]}"
        )
    assert "Number of stacks with differences: 0" in output
    assert "was not assumed" in output  # the CLI tried the bootstrap lookup role and was refused


def test_iam_is_really_enforced_the_same_diff_fails_without_get_template_or_with_unknown_keys(diff_runs):
    for name, refusal in (
        ("control", "is not authorized to perform: cloudformation:GetTemplate"),
        ("unknown_credentials", "The security token included in the request is invalid"),
    ):
        result = diff_runs[name]
        output = result.stdout + result.stderr
        assert result.returncode != 0 and refusal in output, f"{name}:\n{output[-3000:]}"
