"""IAM enforced by the local AWS: the pull-request diff needs nothing but the diff role's own CloudFormation
reads (issue 15, item 2), and a CLI user needs nothing but the stack's TrainingUserPolicy (issue 23).

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

The user policy the same way: a role with the deployed TrainingUserPolicy's actions runs the real CLI's
launch, status, stop, fetch and cost; the supervisor's handler runs in process as the local AWS plays
Lambda, with the credentials of a role holding the deployed request function's role's actions (the Lambda service
gives a function its role's). The same user is refused PutItem, CreateLaunchTemplate, RunInstances and
CreateFleet. That the policy's resources are this stack's is a template assertion
(tests/supervisor/test_supervisor_construct.py), as is its lambda:InvokeFunction, which no local Lambda runs.
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


def _actions_of(iam, role_name: str) -> list[str]:
    """Every action the role's inline and attached policies name."""
    documents = [
        iam.get_role_policy(RoleName=role_name, PolicyName=n)["PolicyDocument"]
        for n in iam.list_role_policies(RoleName=role_name)["PolicyNames"]
    ]
    for attached in iam.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]:
        version = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]["DefaultVersionId"]
        documents.append(
            iam.get_policy_version(PolicyArn=attached["PolicyArn"], VersionId=version)["PolicyVersion"]["Document"]
        )
    return sorted({a for d in documents for a in _statement_actions(d)})


def _user_policy_actions(iam) -> list[str]:
    [policy] = [p for p in iam.list_policies(Scope="Local")["Policies"] if "TrainingUserPolicy" in p["PolicyName"]]
    document = iam.get_policy_version(PolicyArn=policy["Arn"], VersionId=policy["DefaultVersionId"])["PolicyVersion"]
    return _statement_actions(document["Document"])


def _push_stand_in_image(emulator: Emulator) -> None:
    """What the image workflow would have pushed: the launch preflight looks the tag up in ECR."""
    ecr = aws_client("ecr", emulator.env)
    [repository] = [
        r for r in ecr.describe_repositories()["repositories"] if not r["repositoryName"].startswith("cdk-")
    ]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {}, "layers": []}  # fmt: skip
    ecr.put_image(repositoryName=repository["repositoryName"], imageManifest=json.dumps(manifest), imageTag="latest")


@pytest.fixture(scope="module")
def principals(deployed):
    """Every principal the module's tests use, made while the emulator still accepts anything; then IAM is on."""
    emulator, _ = deployed
    iam = aws_client("iam", emulator.env)
    roles = [r["RoleName"] for r in iam.list_roles()["Roles"]]
    [diff_role] = [r for r in roles if "GithubDiffRole" in r]
    [supervisor_role] = [r for r in roles if "SupervisorRequests" in r and "Role" in r]
    actions = _actions_of(iam, diff_role)
    user_actions = _user_policy_actions(iam)
    made = {
        "diff_actions": actions,
        "as_diff_role": _credentials_with_only(emulator, "as-diff-role", actions),
        "without_templates": _credentials_with_only(
            emulator, "diff-role-without-gettemplate", [a for a in actions if a != "cloudformation:GetTemplate"]
        ),
        "user_actions": user_actions,
        "as_user": _credentials_with_only(emulator, "as-training-user", user_actions),
        "as_supervisor": _credentials_with_only(emulator, "as-supervisor", _actions_of(iam, supervisor_role)),
    }
    _push_stand_in_image(emulator)
    _finished_run(emulator, "ended-earlier")
    _enforce_iam(emulator)
    return made


def _finished_run(emulator: Emulator, run_id: str) -> None:
    """What an agent left in runs/<id>/ (the user may read it, never write it)."""
    s3 = aws_client("s3", emulator.env)
    [bucket] = [b["Name"] for b in s3.list_buckets()["Buckets"] if "outputsbucket" in b["Name"].lower()]
    status = {"run_id": run_id, "outcome": "succeeded", "exit_code": 0, "started_at": "2026-12-01T10:00:00Z",
              "ended_at": "2026-12-01T11:00:00Z", "instance_type": "g5.xlarge", "market": "spot"}  # fmt: skip
    s3.put_object(Bucket=bucket, Key=f"{naming.RUNS_PREFIX}{run_id}/status.json", Body=json.dumps(status).encode())
    s3.put_object(Bucket=bucket, Key=f"{naming.RUNS_PREFIX}{run_id}/outputs/model.bin", Body=b"weights")


@pytest.fixture(scope="module")
def diff_runs(deployed, principals):
    emulator, cdk = deployed
    command = workflow_diff_command()
    command[0] = str(ROOT / command[0])
    return {
        "actions": principals["diff_actions"],
        "diff": cdk(command, principals["as_diff_role"]),
        "control": cdk(command, principals["without_templates"]),
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


# --- the training user (issue 23) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def as_user(deployed, principals, tmp_path_factory):
    """Run the real CLI in process as the training user; the supervisor plays its Lambda with its role's keys."""
    from typer.testing import CliRunner

    from training_infra.cli.main import app

    emulator, _ = deployed
    home = tmp_path_factory.mktemp("user-home")
    supervisor = principals["as_supervisor"]
    env = {
        **emulator.env, **principals["as_user"], "COLUMNS": "200", "XDG_CACHE_HOME": str(home / "cache"),
        "AWS_CONFIG_FILE": str(home / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"),
        "TI_SUPERVISOR_ACCESS_KEY_ID": supervisor["AWS_ACCESS_KEY_ID"],
        "TI_SUPERVISOR_SECRET_ACCESS_KEY": supervisor["AWS_SECRET_ACCESS_KEY"],
        "TI_SUPERVISOR_SESSION_TOKEN": supervisor["AWS_SESSION_TOKEN"],
    }  # fmt: skip

    def cli(*args: str):
        return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)

    return cli


def test_the_user_policy_holds_no_write_of_runs_templates_or_instances(principals):
    actions = set(principals["user_actions"])
    assert "lambda:InvokeFunction" in actions and "dynamodb:GetItem" in actions
    assert not actions & {"dynamodb:PutItem", "dynamodb:UpdateItem", "ec2:CreateLaunchTemplate", "ec2:CreateFleet",
                          "ec2:RunInstances", "iam:PassRole", "ec2:TerminateInstances", "ec2:CreateTags"}  # fmt: skip


def test_a_user_with_only_the_training_user_policy_can_launch_see_stop_fetch_and_cost(as_user, tmp_path):
    launched = as_user("launch", "--run-id", "as-user", "--max-runtime-hours", "1", "--allow-empty-data")
    assert launched.exit_code == 0, launched.output
    assert "launched run as-user: attempt 1 on i-" in launched.stdout
    assert "the local AWS runs no Lambda" in launched.stderr

    status = as_user("status", "as-user", "-o", "json")
    assert status.exit_code == 0, status.output
    stopped = as_user("stop", "as-user")
    assert stopped.exit_code == 0 and "stopping run as-user" in stopped.stdout, stopped.output
    fetched = as_user("fetch", "ended-earlier", str(tmp_path / "fetched"))
    assert fetched.exit_code == 0, fetched.output
    assert (tmp_path / "fetched" / "outputs" / "model.bin").read_bytes() == b"weights"
    cost = as_user("cost", "-o", "json")
    assert cost.exit_code == 0 and "as-user" in cost.stdout, cost.output


def test_the_same_user_cannot_write_the_run_table_make_a_template_or_start_an_instance(deployed, principals):
    import boto3
    from botocore.exceptions import ClientError

    emulator, _ = deployed
    user = principals["as_user"]
    session = boto3.session.Session(
        aws_access_key_id=user["AWS_ACCESS_KEY_ID"], aws_secret_access_key=user["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=user["AWS_SESSION_TOKEN"], region_name=emulator.region,
    )  # fmt: skip
    ec2 = session.client("ec2", endpoint_url=emulator.endpoint)
    dynamodb = session.client("dynamodb", endpoint_url=emulator.endpoint)
    outputs = session.client("cloudformation", endpoint_url=emulator.endpoint).describe_stacks(
        StackName=naming.STORAGE_STACK
    )["Stacks"][0]["Outputs"]
    [table] = [o["OutputValue"] for o in outputs if o["OutputKey"] == naming.OUTPUT_RUN_TABLE]
    attempts = {
        "dynamodb:PutItem": lambda: dynamodb.put_item(TableName=table, Item={"run_id": {"S": "forged"}}),
        "ec2:CreateLaunchTemplate": lambda: ec2.create_launch_template(
            LaunchTemplateName="mine", LaunchTemplateData={"ImageId": AMI}
        ),
        "ec2:RunInstances": lambda: ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1),
        "ec2:CreateFleet": lambda: ec2.create_fleet(
            Type="instant",
            TargetCapacitySpecification={"TotalTargetCapacity": 1},
            LaunchTemplateConfigs=[
                {"LaunchTemplateSpecification": {"LaunchTemplateId": "lt-0123456789abcdef0", "Version": "1"}}
            ],
        ),  # fmt: skip
    }
    for action, attempt in attempts.items():
        with pytest.raises(ClientError) as refused:
            attempt()
        # moto answers JSON services (DynamoDB) in its XML error shape: botocore then reports the HTTP status.
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403, action
        assert f"not authorized to perform: {action}" in str(refused.value), action
