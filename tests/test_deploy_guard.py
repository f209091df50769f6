"""The deploy guard on the local AWS: the real stacks deployed by `make deploy`, then redeploys and
destroys that would hurt.

One deployment for the module (GitHub roles, alert e-mail, an instance for run guard-run-1), then,
in this order: the same settings (nothing to say); `make deploy` with the settings forgotten
(refused, nothing deployed); a new run id while guard-run-1 runs (refused, naming the run); a
change that reaches the running instance (refused, naming the setting); `make destroy` while
guard-run-1 runs and a managed run is recovering in the run table (refused, naming both); the
instance ended (a new run id deploys; destroy is still refused by the record alone); the record
ended (destroy passes); `make deploy ALLOW_DESTRUCTIVE=1` (deploys, roles gone); `make destroy
ALLOW_DESTRUCTIVE=1` with a run launching (the compute stack goes). The tests share the deployment
and change it, so they run in file order (pytest's default; xdist's loadscope keeps a module together).
The run records are written by the supervisor's own `RunStore`, as the supervisor writes them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import LOCAL_AWS_CONFIGURATIONS
from training_infra import deploy_guard, naming
from training_infra.local.emulator import Emulator
from training_infra.local.instance import aws_client
from training_infra.supervisor.runtime.records import Run, RunSpec, RunState, RunStore, iso, utc_now

ROOT = Path(__file__).resolve().parents[1]
CDK = ROOT / "node_modules" / ".bin" / "cdk"
# What moto needs to deploy (docs/architecture.md, "The local AWS emulator").
LOCAL_DEPLOY_FLAGS = "--method=direct --no-previous-parameters --no-notices"
# tests/conftest.py's `guarded` configuration as a user passes it: flags on the make command line.
DEPLOYED_FLAGS = " ".join(f"-c {key}={value}" for key, value in LOCAL_AWS_CONFIGURATIONS["guarded"].items())
# The same minus the ones a user passed as flags last time (github_repo, alert_email).
FORGOTTEN_FLAGS = "-c create_instance=true -c image_id=ami-12c6146b -c run_id=guard-run-1"


@dataclass
class LocalAws:
    emulator: Emulator
    env: dict[str, str]
    instance_id: str

    def client(self, service: str):
        return aws_client(service, self.emulator.env)

    def guard(self, *args: str | Path, region: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**self.env, **({"AWS_REGION": region, "AWS_DEFAULT_REGION": region} if region else {})}
        return subprocess.run(
            [sys.executable, "-m", "training_infra.deploy_guard", *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def make_deploy(self, cdk_out: Path, flags: str, *extra: str) -> subprocess.CompletedProcess[str]:
        command = [
            "make",
            "-C",
            str(ROOT),
            "deploy",
            f"CDK_OUT={cdk_out}",
            f"CDK_FLAGS={flags} {LOCAL_DEPLOY_FLAGS}",
            "REQUIRE_APPROVAL=never",
            *extra,
        ]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=600)

    def make_destroy(self, assembly: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        """`make destroy` as a script runs it (`--force`: no question), on the deployed settings' assembly
        (`--app`: the session's synth, not another one)."""
        flags = f"--app {assembly} --force --no-notices"
        command = ["make", "-C", str(ROOT), "destroy", f"CDK_FLAGS={flags}", *extra]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=600)

    def stack_status(self, stack: str) -> str:
        stacks = self.client("cloudformation").describe_stacks()["Stacks"]
        return next((s["StackStatus"] for s in stacks if s["StackName"] == stack), "DELETE_COMPLETE")

    def runs(self) -> RunStore:
        """The run table through the supervisor's own record code."""
        stack = self.client("cloudformation").describe_stacks(StackName=naming.STORAGE_STACK)["Stacks"][0]
        table = next(o["OutputValue"] for o in stack["Outputs"] if o["OutputKey"] == naming.OUTPUT_RUN_TABLE)
        return RunStore(self.client("dynamodb"), table)

    def template(self, stack: str) -> dict:
        return self.client("cloudformation").get_template(StackName=stack)["TemplateBody"]

    def resources_of_type(self, stack: str, kind: str) -> set[str]:
        return {key for key, value in self.template(stack)["Resources"].items() if value["Type"] == kind}


@pytest.fixture(scope="module")
def local_aws(tmp_path_factory):
    """The `guarded` settings deployed by `make deploy` (real CDK CLI; the guard finds no stack yet)
    into a moto server."""
    with Emulator(tmp_path_factory.mktemp("moto-guard")) as emulator:
        env = {**os.environ, **emulator.env, "CDK_DISABLE_VERSION_CHECK": "true", "CDK_DISABLE_CLI_TELEMETRY": "true"}
        bootstrap_out = str(tmp_path_factory.mktemp("bootstrap") / "cdk.out")  # never the shared ./cdk.out
        bootstrap = [
            str(CDK),
            "bootstrap",
            f"aws://123456789012/{emulator.region}",
            "--no-notices",
            "--output",
            bootstrap_out,
        ]
        done = subprocess.run(bootstrap, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        local = LocalAws(emulator=emulator, env=env, instance_id="")
        done = local.make_deploy(tmp_path_factory.mktemp("first-deploy") / "cdk.out", DEPLOYED_FLAGS)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "deploy guard" not in done.stderr, "nothing was deployed before: nothing to guard"
        stack = local.client("cloudformation").describe_stacks(StackName=naming.COMPUTE_STACK)["Stacks"][0]
        local.instance_id = next(
            o["OutputValue"] for o in stack["Outputs"] if o["OutputKey"] == naming.OUTPUT_INSTANCE_ID
        )
        yield local


def _refusals(result: subprocess.CompletedProcess[str], guard: str = "deploy guard") -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(f"error: {guard}: ")]


RUN_SPEC = RunSpec(
    instance_types=("g5.xlarge",),
    subnet_ids=("subnet-0123456789abcdef0",),
    market="spot",
    max_runtime_hours=4,
    launch_template_id="lt-0123456789abcdef0",
)


def _managed_run(run_id: str, state: str) -> Run:
    """A managed run's record as `launch` and the supervisor write it."""
    now = utc_now()
    return Run(
        run_id=run_id,
        spec=RUN_SPEC,
        deadline_at=iso(now + timedelta(hours=4)),
        created_at=iso(now),
        state=RunState(state),
    )


def test_redeploying_the_deployed_settings_passes_silently(local_aws, synth):
    result = local_aws.guard(synth("guarded").outdir)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_make_deploy_with_settings_forgotten_stops_before_deleting_github_roles_and_alert_subscription(
    local_aws, tmp_path
):
    """Issue 14: step 1 passed github_repo and alert_email as flags, step 4 did not."""
    registry_before = local_aws.template(naming.REGISTRY_STACK)
    safety_before = local_aws.template(naming.SAFETY_STACK)

    result = local_aws.make_deploy(tmp_path / "cdk.out", FORGOTTEN_FLAGS)

    assert result.returncode != 0
    refusals = _refusals(result)
    assert [
        line for line in refusals if "GitHub role RegistryGithubPushRole" in line and "trusted by acme/trainer" in line
    ]
    assert [line for line in refusals if "GitHub role RegistryGithubDiffRole" in line]
    assert [line for line in refusals if "GitHub OIDC provider" in line]
    assert [
        line
        for line in refusals
        if "alert e-mail subscription of ml-team@example.com" in line and '"alert_email": "ml-team@example.com"' in line
    ]
    assert refusals[-1].endswith("accept with `make deploy ALLOW_DESTRUCTIVE=1`")
    assert "Traceback" not in result.stderr
    # cdk deploy never ran: the stacks hold exactly what they held.
    assert "deploying..." not in result.stdout + result.stderr
    assert local_aws.template(naming.REGISTRY_STACK) == registry_before
    assert local_aws.template(naming.SAFETY_STACK) == safety_before


def test_a_new_run_id_while_the_run_is_running_is_refused_naming_the_run_and_the_way_out(local_aws, synth):
    result = local_aws.guard(synth("guarded_new_run").outdir)

    assert result.returncode == 3
    [finding, last] = _refusals(result)
    assert f"the run guard-run-1 is still running on {local_aws.instance_id}" in finding
    assert "run_id is now guard-run-2" in finding
    assert "`training-infra stop guard-run-1`" in finding
    assert "nothing was deployed" in last


def test_any_change_to_the_running_instance_is_refused_naming_the_setting(local_aws, synth, tmp_path):
    """What a synth with another instance_type for the same run id would give the instance.

    Written into a copy of the deployed assembly, so the guard is proven whatever the compute
    construct keeps out of the instance: anything that still reaches it must be refused.
    """
    assembly = tmp_path / "cdk.out"
    shutil.copytree(synth("guarded").outdir, assembly)
    template_file = assembly / f"{naming.COMPUTE_STACK}.template.json"
    template = json.loads(template_file.read_text())
    [instance] = [r for r in template["Resources"].values() if r["Type"] == "AWS::EC2::Instance"]
    instance["Properties"]["InstanceType"] = "g5.48xlarge"
    template_file.write_text(json.dumps(template))

    result = local_aws.guard(assembly)

    assert result.returncode == 3
    [finding, _] = _refusals(result)
    assert f"the run guard-run-1 is still running on {local_aws.instance_id}" in finding
    assert "because of instance_type (InstanceType)" in finding


def test_report_only_prints_the_findings_and_exits_0_for_make_diff(local_aws, synth):
    result = local_aws.guard(synth("guarded_new_run").outdir, "--report-only")

    assert result.returncode == 0
    assert "deploy guard: TrainingInfra-Compute: the run guard-run-1 is still running" in result.stderr
    assert "`make deploy` would stop here" in result.stderr


def test_a_stack_pinned_to_a_region_is_read_in_that_region_not_the_default_one(local_aws, synth, tmp_path):
    """An app that pins its environment (`env=Environment(region=...)`) names the region in the manifest."""
    assembly = tmp_path / "cdk.out"
    shutil.copytree(synth("guarded_new_run").outdir, assembly)
    manifest = json.loads((assembly / "manifest.json").read_text())
    for artifact in manifest["artifacts"].values():
        if artifact.get("type") == "aws:cloudformation:stack":
            artifact["environment"] = f"aws://123456789012/{local_aws.emulator.region}"
    (assembly / "manifest.json").write_text(json.dumps(manifest))

    result = local_aws.guard(assembly, region="eu-west-3")

    assert result.returncode == 3
    assert "the run guard-run-1 is still running" in result.stderr


def test_make_destroy_while_runs_are_active_stops_naming_each_run_and_destroys_nothing(local_aws, synth):
    """guard-run-1's instance (the stack's own) is running; table-run-1 is between attempts (recovering,
    no instance now): only the run table knows it."""
    local_aws.runs().create(_managed_run("table-run-1", "recovering"))
    compute_before = local_aws.stack_status(naming.COMPUTE_STACK)

    result = local_aws.make_destroy(synth("guarded").outdir)

    assert result.returncode != 0
    [instance_run, table_run, last] = _refusals(result, "destroy guard")
    assert instance_run.startswith(
        f"error: destroy guard: {naming.COMPUTE_STACK}: the run guard-run-1 is still active "
        f"(instance {local_aws.instance_id} running) and destroying the compute stack would terminate its instance "
        f"{local_aws.instance_id}; stop it (`training-infra stop guard-run-1`)"
    )
    assert table_run.startswith(
        f"error: destroy guard: {naming.COMPUTE_STACK}: the run table-run-1 is still active (run table: recovering)"
    )
    assert "would take its supervisor, launch templates and instance role from under it" in table_run
    assert "stop it (`training-infra stop table-run-1`)" in table_run
    assert last == (
        "error: destroy guard: nothing was destroyed; stop the runs above and let them end, "
        "or accept with `make destroy ALLOW_DESTRUCTIVE=1`"
    )
    assert "Traceback" not in result.stderr
    assert local_aws.stack_status(naming.COMPUTE_STACK) == compute_before


def test_once_the_run_has_ended_a_new_run_id_deploys(local_aws, synth):
    local_aws.client("ec2").terminate_instances(InstanceIds=[local_aws.instance_id])  # the agent powered off

    result = local_aws.guard(synth("guarded_new_run").outdir)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_no_deployed_stack_means_nothing_to_guard(local_aws, synth):
    result = local_aws.guard(synth("guarded_new_run").outdir, region="eu-west-3")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_destroy_is_refused_by_an_active_run_table_record_alone(local_aws):
    """guard-run-1's instance has ended; table-run-1 is still recovering."""
    result = local_aws.guard("--destroy")

    assert result.returncode == 3
    [finding, _] = _refusals(result, "destroy guard")
    assert "the run table-run-1 is still active (run table: recovering)" in finding
    assert "guard-run-1" not in result.stderr


def test_once_every_managed_run_has_ended_destroy_passes_silently(local_aws):
    runs = local_aws.runs()
    run = runs.get("table-run-1")
    run.state, run.ended_at = RunState.STOPPED, iso(utc_now())
    runs.save(run)

    result = local_aws.guard("--destroy")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_destroy_is_refused_while_a_gangs_security_group_the_supervisor_made_is_left(local_aws):
    """Its sweep goes with the compute stack: a group left in the VPC would fail the destroy half-way."""
    ec2 = local_aws.client("ec2")
    vpc = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    tags = [{"Key": naming.TAG_CREATED_BY, "Value": "supervisor"}, {"Key": naming.TAG_RUN_ID, "Value": "gang-1"},
            {"Key": naming.TAG_ATTEMPT, "Value": "2"}]  # fmt: skip
    group = ec2.create_security_group(
        GroupName="training-infra-run-gang-1-2", Description="gang", VpcId=vpc,
        TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}],
    )["GroupId"]  # fmt: skip
    try:
        refused = local_aws.guard("--destroy")
    finally:
        ec2.delete_security_group(GroupId=group)

    assert refused.returncode == 3
    [finding, _] = _refusals(refused, "destroy guard")
    assert f"security group {group} of run gang-1 attempt 2, made by the supervisor for a multi-node run" in finding
    assert f"`aws ec2 delete-security-group --group-id {group}`" in finding
    assert local_aws.guard("--destroy").returncode == 0, "once it is gone, destroy passes"


def test_make_deploy_allow_destructive_deploys_and_the_github_roles_go(local_aws, tmp_path):
    """Last: it changes the deployment. alert_email stays, so only the registry changes."""
    assert local_aws.resources_of_type(naming.REGISTRY_STACK, "AWS::IAM::Role")

    result = local_aws.make_deploy(
        tmp_path / "cdk.out", f"{FORGOTTEN_FLAGS} -c alert_email=ml-team@example.com", "ALLOW_DESTRUCTIVE=1"
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "deploy guard: accepted by ALLOW_DESTRUCTIVE=1: TrainingInfra-Registry: would delete the GitHub role"
        in result.stderr
    )
    assert not local_aws.resources_of_type(naming.REGISTRY_STACK, "AWS::IAM::Role")
    assert local_aws.resources_of_type(naming.SAFETY_STACK, "AWS::SNS::Subscription"), "the e-mail subscription stays"


def test_make_destroy_allow_destructive_destroys_the_compute_stack_although_a_run_is_launching(local_aws, synth):
    """Last of the local AWS tests: the compute stack goes; data and the run table stay."""
    local_aws.runs().create(_managed_run("table-run-2", "launching"))

    result = local_aws.make_destroy(synth("guarded").outdir, "ALLOW_DESTRUCTIVE=1")

    assert (
        f"destroy guard: accepted by ALLOW_DESTRUCTIVE=1: {naming.COMPUTE_STACK}: the run table-run-2 is still active "
        "(run table: launching)"
    ) in result.stderr
    # cdk destroy ran; against moto it may exit 1 after the stack is gone ("vpc has dependencies", see the README).
    assert local_aws.stack_status(naming.COMPUTE_STACK) == "DELETE_COMPLETE", result.stderr[-3000:]
    assert local_aws.stack_status(naming.STORAGE_STACK) != "DELETE_COMPLETE"


def test_make_destroy_with_any_allow_destructive_but_1_is_one_line_and_runs_nothing():
    result = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "destroy", "ALLOW_DESTRUCTIVE=yes"], capture_output=True, text=True, timeout=300
    )

    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == "error: ALLOW_DESTRUCTIVE: got 'yes'; allowed: 1 (or leave it unset)"
    assert "guard" not in result.stderr and "Traceback" not in result.stderr


def test_the_destroy_guard_takes_no_cloud_assembly_and_the_deploy_guard_needs_one(tmp_path, capsys):
    assert deploy_guard.main(["--destroy", str(tmp_path)]) == 2
    assert deploy_guard.main([]) == 2
    [destroy_error, deploy_error] = capsys.readouterr().err.splitlines()
    assert destroy_error == f"error: argument 'cdk_out': got '{tmp_path}'; allowed: none with --destroy"
    assert deploy_error.startswith("error: argument 'cdk_out': got nothing; allowed: a cloud assembly")


def test_a_changed_alert_email_replaces_the_subscription_without_a_finding(synth):
    """A new address is a new subscription (a new logical id): that is a change the user asked for."""
    deployed = synth("guarded").templates[naming.SAFETY_STACK]
    changed = json.loads(json.dumps(deployed))
    [(logical_id, subscription)] = [
        (k, v) for k, v in changed["Resources"].items() if v["Type"] == "AWS::SNS::Subscription"
    ]
    del changed["Resources"][logical_id]
    changed["Resources"]["AlertsTopicOncallExampleCom"] = {
        **subscription,
        "Properties": {**subscription["Properties"], "Endpoint": "oncall@example.com"},
    }

    assert deploy_guard.protected_removals(naming.SAFETY_STACK, deployed, changed) == []
    del changed["Resources"]["AlertsTopicOncallExampleCom"]
    [finding] = deploy_guard.protected_removals(naming.SAFETY_STACK, deployed, changed)
    assert "would delete the alert e-mail subscription of ml-team@example.com" in finding.message


def _backstop(template: dict) -> dict[str, str]:
    """Type -> logical id of the hard limit's backstop in a compute template."""
    resources = template["Resources"]
    [action_id] = [k for k, v in resources.items() if v["Type"] == "AWS::Budgets::BudgetsAction"]
    definition = resources[action_id]["Properties"]["Definition"]["IamActionDefinition"]
    return {
        "action": action_id,
        "policy": definition["PolicyArn"]["Ref"],
        "role": resources[action_id]["Properties"]["ExecutionRoleArn"]["Fn::GetAtt"][0],
    }


def test_a_deploy_without_monthly_limit_usd_stops_before_deleting_the_budgets_action_and_its_deny_policy(synth):
    """`full` deployed with monthly_limit_usd=200, then a deploy that forgot it (the defaults): passing
    the budget would no longer stop the supervisor's launches. One line names all three and the fix."""
    deployed = synth("full").templates[naming.COMPUTE_STACK]
    backstop = _backstop(deployed)
    assert "DenyLaunchesPastBudget" in backstop["policy"]

    [finding] = deploy_guard.protected_removals(
        naming.COMPUTE_STACK, deployed, synth("defaults").templates[naming.COMPUTE_STACK]
    )

    assert finding.message == (
        f"would delete the Budgets action {backstop['action']}, the policy {backstop['policy']} and the Budgets "
        f"action's role {backstop['role']}, which stop the supervisor's launches once the monthly budget is passed: "
        'this deploy has no monthly_limit_usd; set "monthly_limit_usd": "200" in cdk.json\'s context'
    )


@pytest.mark.parametrize("part", ["policy", "action", "role"])
def test_deleting_any_part_of_the_budget_backstop_alone_is_a_finding_naming_that_part(synth, part):
    deployed = synth("full").templates[naming.COMPUTE_STACK]
    backstop = _backstop(deployed)
    changed = json.loads(json.dumps(deployed))
    assert deploy_guard.protected_removals(naming.COMPUTE_STACK, deployed, changed) == []

    del changed["Resources"][backstop[part]]
    [finding] = deploy_guard.protected_removals(naming.COMPUTE_STACK, deployed, changed)

    label = {"action": "the Budgets action", "policy": "the policy", "role": "the Budgets action's role"}[part]
    assert finding.message.startswith(f"would delete {label} {backstop[part]}, which stop the supervisor's launches")
    assert [name for name in backstop.values() if name in finding.message] == [backstop[part]]


def test_a_cdk_out_without_a_manifest_is_a_one_line_usage_error(tmp_path, capsys):
    assert deploy_guard.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument 'cdk_out': got ") and err.count("\n") == 1


def test_unreachable_aws_is_one_line_and_exit_1(tmp_path, synth, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")

    assert deploy_guard.main([str(synth("guarded").outdir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: deploy guard cannot read the deployed stacks: cannot reach AWS at http://127.0.0.1:9")
    assert err.count("\n") == 1

    assert deploy_guard.main(["--destroy"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: destroy guard cannot read the active runs: cannot reach AWS at http://127.0.0.1:9")
    assert err.count("\n") == 1


# ---- why an instance would change, on small hand-made templates -----------------------------


def _compute(instance_props: dict, template_data: dict, parameters: dict | None = None) -> dict:
    return {
        "Parameters": parameters or {},
        "Resources": {
            "Template": {"Type": "AWS::EC2::LaunchTemplate", "Properties": {"LaunchTemplateData": template_data}},
            "Instance": {"Type": "AWS::EC2::Instance", "Properties": instance_props},
        },
    }


LIVE = {"Instance": ("i-0123456789abcdef0", "running")}
FOLLOWS_LATEST = {
    "LaunchTemplate": {
        "LaunchTemplateId": {"Ref": "Template"},
        "Version": {"Fn::GetAtt": ["Template", "LatestVersionNumber"]},
    }
}
PINNED_VERSION = {"LaunchTemplate": {"LaunchTemplateId": {"Ref": "Template"}, "Version": "1"}}


def test_a_setting_in_the_instances_user_data_is_named_with_its_old_and_new_value():
    old = _compute({"UserData": {"Fn::Base64": "#!/bin/bash\nexport TI_IDLE_SECONDS=1800\n"}}, {})
    new = _compute({"UserData": {"Fn::Base64": "#!/bin/bash\nexport TI_IDLE_SECONDS=2700\n"}}, {})

    [finding] = deploy_guard.instance_changes("Compute", old, new, LIVE)

    assert "because of idle_minutes (TI_IDLE_SECONDS: 1800 -> 2700)" in finding.message


def test_an_instance_that_follows_the_templates_latest_version_changes_with_the_template():
    """`Version: !GetAtt Template.LatestVersionNumber`: any launch template change reaches the instance."""
    old = _compute(FOLLOWS_LATEST, {"BlockDeviceMappings": [{"Ebs": {"VolumeSize": 150}}]})
    new = _compute(FOLLOWS_LATEST, {"BlockDeviceMappings": [{"Ebs": {"VolumeSize": 200}}]})

    [finding] = deploy_guard.instance_changes("Compute", old, new, LIVE)

    assert "volume_size_gb (BlockDeviceMappings) via Template" in finding.message


def test_an_instance_pinned_to_a_template_version_does_not_change_with_the_template():
    old = _compute(PINNED_VERSION, {"BlockDeviceMappings": [{"Ebs": {"VolumeSize": 150}}]})
    new = _compute(PINNED_VERSION, {"BlockDeviceMappings": [{"Ebs": {"VolumeSize": 200}}]})

    assert deploy_guard.instance_changes("Compute", old, new, LIVE) == []


def test_an_ami_parameter_that_now_resolves_to_a_newer_ami_is_named():
    """Issue 16: AWS publishes a new DLAMI; the next deploy would replace the instance."""
    parameters = {
        "Ami": {"Type": "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>", "Default": "/aws/service/deeplearning/ami"}
    }
    template = _compute({"ImageId": {"Ref": "Ami"}}, {}, parameters)
    moved = {"Ami": ("ami-0aaaaaaaaaaaaaaaa", "ami-0bbbbbbbbbbbbbbbb")}

    [finding] = deploy_guard.instance_changes("Compute", template, template, LIVE, moved)

    assert (
        "ami-0aaaaaaaaaaaaaaaa -> ami-0bbbbbbbbbbbbbbbb; pin image_id to keep ami-0aaaaaaaaaaaaaaaa" in finding.message
    )
    assert (
        deploy_guard.instance_changes("Compute", template, template, LIVE, {"Ami": ("ami-0aaaaaaaaaaaaaaaa",) * 2})
        == []
    )


def test_an_instance_ec2_no_longer_knows_may_change():
    old = _compute({"InstanceType": "g5.xlarge"}, {})
    new = _compute({"InstanceType": "g5.2xlarge"}, {})

    assert deploy_guard.instance_changes("Compute", old, new, {}) == []


def test_replacing_the_instance_of_a_run_that_ended_would_start_a_new_billed_one_and_is_refused():
    """An ended run's instance resource that changes is replaced: CloudFormation launches a new GPU box."""
    old = _compute({"InstanceType": "g5.xlarge"}, {})
    new = _compute({"InstanceType": "g5.2xlarge"}, {})

    [finding] = deploy_guard.instance_changes(
        "Compute", old, new, {"Instance": ("i-0123456789abcdef0", "terminated", "bert")}
    )

    assert finding.message.startswith(
        "this deploy would start a new instance for run bert, whose instance i-0123456789abcdef0 has ended"
    )
    assert "set a new run_id" in finding.message and deploy_guard.ALLOW_VARIABLE in finding.message


def test_a_changed_subnet_replaces_the_instance_in_it_and_is_named():
    """availability_zones moves the subnet to another zone: CloudFormation replaces it and the instance."""

    def network(zone: str) -> dict:
        template = _compute({**PINNED_VERSION, "SubnetId": {"Ref": "Subnet"}}, {})
        template["Resources"]["Subnet"] = {
            "Type": "AWS::EC2::Subnet",
            "Properties": {"AvailabilityZone": zone, "CidrBlock": "10.42.0.0/20"},
        }
        return template

    [finding] = deploy_guard.instance_changes("Compute", network("us-east-1a"), network("us-east-1b"), LIVE)

    assert (
        "because of the network (AvailabilityZone of Subnet; availability_zones, vpc_id or subnet_ids)"
        in finding.message
    )


def test_the_run_id_comes_from_the_runs_launch_template_when_the_instance_has_no_tags():
    template_data = {
        "TagSpecifications": [{"ResourceType": "instance", "Tags": [{"Key": naming.TAG_RUN_ID, "Value": "bert"}]}]
    }
    old = _compute({**PINNED_VERSION, "InstanceType": "g5.xlarge"}, template_data)
    new = _compute({**PINNED_VERSION, "InstanceType": "g5.2xlarge"}, template_data)

    [finding] = deploy_guard.instance_changes("Compute", old, new, LIVE)

    assert finding.message.startswith("the run bert is still running on i-0123456789abcdef0")
