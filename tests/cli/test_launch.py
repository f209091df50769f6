"""`launch`: one RunInstances from the launch template, the same agent and tags as the stack's instance."""

from __future__ import annotations

import base64
import re
import shlex
from datetime import UTC, datetime, timedelta

import pytest

from training_infra import naming, pricing
from training_infra.compute.user_data import OVERRIDES_MARKER


def _user_data(stacks, instance_id: str) -> str:
    attribute = stacks.client("ec2").describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(attribute["UserData"]["Value"]).decode()


def _exports(script: str) -> dict[str, str]:
    """What bash would see before the agent starts: later exports win, as in the real script."""
    values = {}
    lexer = shlex.shlex(script.split("base64 -d")[0], posix=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    words = list(lexer)
    for previous, word in zip(words, words[1:], strict=False):
        if previous == "export" and word.startswith("TI_"):
            name, _, value = word.partition("=")
            values[name] = value
    return values


def _template_data(stacks) -> dict:
    return stacks.client("ec2").describe_launch_template_versions(
        LaunchTemplateId=stacks.outputs[naming.OUTPUT_LAUNCH_TEMPLATE_ID], Versions=["$Default"]
    )["LaunchTemplateVersions"][0]["LaunchTemplateData"]


def _template_user_data(stacks) -> str:
    return base64.b64decode(_template_data(stacks)["UserData"]).decode()


def _added_lines(stacks, script: str) -> str:
    """The lines `launch` put between the stack's exports and the overrides marker."""
    head = _template_user_data(stacks).split(OVERRIDES_MARKER)[0]
    assert script.startswith(head)
    return script[len(head) :].split(OVERRIDES_MARKER)[0].strip()


def _tags(resource) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def test_launch_starts_a_spot_run_from_the_template_with_run_overrides_and_managed_tags(stacks):
    before = datetime.now(UTC).replace(microsecond=0)
    result = stacks.cli(
        "launch", "--run-id", "launch-spot-1", "--image-tag", "v2", "--command", "python train.py --lr 3e-4",
        "--env", "EPOCHS=3", "--env", "WANDB_MODE=offline", "--max-runtime-hours", "2",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    [instance] = stacks.run_instances("launch-spot-1")
    tags = _tags(instance)
    assert tags[naming.TAG_MANAGED] == "true"
    assert tags[naming.TAG_RUN_ID] == "launch-spot-1"
    assert tags[naming.TAG_MAX_RUNTIME_HOURS] == "2"
    assert tags["Name"] == "training-infra-launch-spot-1"
    assert tags["project"] == "training-infra", "the template's own tags are kept"
    deadline = datetime.strptime(tags[naming.TAG_DEADLINE], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before + timedelta(hours=2) <= deadline <= datetime.now(UTC) + timedelta(hours=2)
    # Launched through the template reference, as spot, in the stack's VPC.
    assert tags["aws:ec2launchtemplate:id"] == stacks.outputs[naming.OUTPUT_LAUNCH_TEMPLATE_ID]
    assert instance["InstanceLifecycle"] == "spot"
    assert instance["InstanceType"] == _template_data(stacks)["InstanceType"]
    subnet = stacks.client("ec2").describe_subnets(SubnetIds=[instance["SubnetId"]])["Subnets"][0]
    group = stacks.client("ec2").describe_security_groups(GroupIds=[instance["SecurityGroups"][0]["GroupId"]])["SecurityGroups"][0]
    assert subnet["VpcId"] == group["VpcId"]
    # The same agent, with this run's settings after the stack's.
    script = _user_data(stacks, instance["InstanceId"])
    template_script = _template_user_data(stacks)
    head, tail = template_script.split(OVERRIDES_MARKER)
    assert script.startswith(head) and script.endswith(OVERRIDES_MARKER + tail)
    exports = _exports(script)
    assert exports["TI_RUN_ID"] == "launch-spot-1"
    assert exports["TI_IMAGE_TAG"] == "v2"
    assert exports["TI_TRAINING_COMMAND"] == "python train.py --lr 3e-4"
    assert exports["TI_MAX_RUNTIME_SECONDS"] == "7200"
    assert exports["TI_EXTRA_ENV"].splitlines() == ["STACK_LEVEL=1", "EPOCHS=3", "WANDB_MODE=offline"]
    assert "TI_MARKET" not in _added_lines(stacks, script), "the market is not overridden when not asked"
    # What it tells the user.
    assert "launched run launch-spot-1" in result.stdout
    for verb in ("status", "logs", "fetch", "stop", "connect"):
        assert f"training-infra {verb} launch-spot-1" in result.stdout


def test_launch_sets_only_the_overrides_the_user_gave_plus_the_run_id(stacks):
    result = stacks.cli("launch", "--run-id", "launch-minimal")

    assert result.exit_code == 0, result.output
    [instance] = stacks.run_instances("launch-minimal")
    script = _user_data(stacks, instance["InstanceId"])
    assert _added_lines(stacks, script) == "export TI_RUN_ID=launch-minimal"
    assert _tags(instance)[naming.TAG_MAX_RUNTIME_HOURS] == "12", "deadline from the stack's max runtime"


def test_launch_on_demand_against_a_spot_template_uses_the_templates_data_without_its_spot_options(stacks):
    result = stacks.cli("launch", "--run-id", "launch-od", "--on-demand", "--instance-type", "g6.xlarge")

    assert result.exit_code == 0, result.output
    [instance] = stacks.run_instances("launch-od")
    ec2 = stacks.client("ec2")
    assert instance.get("InstanceLifecycle") != "spot"
    assert "aws:ec2launchtemplate:id" not in _tags(instance), "a spot template cannot launch on-demand"
    assert instance["ImageId"] == _template_data(stacks)["ImageId"]
    assert instance["InstanceType"] == "g6.xlarge"
    shutdown = ec2.describe_instance_attribute(InstanceId=instance["InstanceId"], Attribute="instanceInitiatedShutdownBehavior")
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    template_group = _template_data(stacks)["SecurityGroupIds"]
    assert [g["GroupId"] for g in instance["SecurityGroups"]] == template_group
    exports = _exports(_user_data(stacks, instance["InstanceId"]))
    assert exports["TI_MARKET"] == "on-demand"
    assert float(exports["TI_HOURLY_PRICE_USD"]) == pricing.on_demand_price("g6.xlarge")
    assert _tags(instance)[naming.TAG_MANAGED] == "true"


def test_launch_tags_the_volume_too_so_the_reaper_and_cost_reports_see_it(stacks):
    result = stacks.cli("launch", "--run-id", "launch-volume")

    assert result.exit_code == 0, result.output
    [instance] = stacks.run_instances("launch-volume")
    volume_ids = [m["Ebs"]["VolumeId"] for m in instance["BlockDeviceMappings"]]
    volumes = stacks.client("ec2").describe_volumes(VolumeIds=volume_ids)["Volumes"]
    assert volumes
    for volume in volumes:
        assert _tags(volume)[naming.TAG_RUN_ID] == "launch-volume"
        assert _tags(volume)[naming.TAG_MANAGED] == "true"


def test_launch_generates_a_sortable_run_id_when_none_is_given(stacks):
    before = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    result = stacks.cli("launch", "--quiet")

    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip()
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{4}", run_id)
    assert run_id[:15] >= before
    assert len(stacks.run_instances(run_id)) == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--run-id", "My Run"), "option '--run-id': got 'My Run'; allowed: empty or lowercase letters"),
        (("--run-id", "a" * 64), "option '--run-id'"),
        (("--instance-type", "g5.huge"), "option '--instance-type': got 'g5.huge'; allowed: an EC2 instance type"),
        (("--instance-type", "x1e.xlarge"), "option '--instance-type': got 'x1e.xlarge'; allowed: a type in one of the families"),
        (("--max-runtime-hours", "0"), "option '--max-runtime-hours': got '0'; allowed: a number greater than 0"),
        (("--max-runtime-hours", "abc"), "option '--max-runtime-hours': got 'abc'; allowed: a number greater than 0 up to 168"),
        (("--image-tag", "bad tag"), "option '--image-tag': got 'bad tag'"),
        (("--env", "NOEQUALS"), "option '--env': got 'NOEQUALS'; allowed: KEY=VALUE"),
        (("--env", "1BAD=x"), "option '--env': got '1BAD=x'"),
        (("--subnet-id", "vpc-123"), "option '--subnet-id': got 'vpc-123'"),
    ],
)
def test_launch_rejects_bad_options_in_one_line_before_calling_aws(stacks, args, fragment):
    assert fragment in stacks.usage_error("launch", *args)


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        ("InsufficientInstanceCapacity", ["another zone", "another type", "--on-demand"]),
        ("MaxSpotInstanceCountExceeded", ["spot instance limit", "--on-demand", "Service Quotas"]),
        ("VcpuLimitExceeded", ["vCPU quota", "Service Quotas", "smaller type"]),
    ],
)
def test_launch_explains_capacity_and_quota_errors_with_what_to_try(stacks, ec2_faults, code, advice):
    ec2_faults.error_code = code
    result = stacks.cli("launch", "--run-id", f"cap-{code.lower()}", env={"AWS_ENDPOINT_URL_EC2": ec2_faults.url})

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.count("\n") == 1
    for words in advice:
        assert words in result.stderr
    assert not stacks.run_instances(f"cap-{code.lower()}")


def test_launch_tries_each_zone_before_reporting_no_spot_capacity(stacks, ec2_faults):
    result = stacks.cli("launch", "--run-id", "cap-zones", env={"AWS_ENDPOINT_URL_EC2": ec2_faults.url})

    assert result.exit_code == 1
    assert len(ec2_faults.run_instances_calls) == 2, "one attempt per zone of the stack's VPC"
    subnets = {re.search(r"SubnetId=(subnet-[0-9a-f]+)", call)[1] for call in ec2_faults.run_instances_calls}
    assert len(subnets) == 2
    assert f"{stacks.region}a" in result.stderr and f"{stacks.region}b" in result.stderr


def test_launch_into_an_explicit_subnet(stacks):
    subnet = stacks.client("ec2").describe_subnets(Filters=[{"Name": "availability-zone", "Values": [f"{stacks.region}b"]}])["Subnets"]
    subnet_id = next(s["SubnetId"] for s in subnet if s["CidrBlock"].startswith("10.20."))
    result = stacks.cli("launch", "--run-id", "launch-subnet", "--subnet-id", subnet_id)

    assert result.exit_code == 0, result.output
    [instance] = stacks.run_instances("launch-subnet")
    assert instance["SubnetId"] == subnet_id


def test_launch_places_the_run_in_the_subnets_the_compute_stack_publishes(deployed):
    # Only zone b is published; without the output, launch would pick zone a of the template's VPC first.
    published = deployed("eu-north-1", published_zones="b")
    zone_b_subnet = published.outputs[naming.OUTPUT_SUBNET_IDS]

    result = published.cli("launch", "--run-id", "published-subnet")

    assert result.exit_code == 0, result.output
    [instance] = published.run_instances("published-subnet")
    assert instance["SubnetId"] == zone_b_subnet
    assert instance["Placement"]["AvailabilityZone"] == "eu-north-1b"
    assert published.cli("outputs", "subnet_ids").stdout == zone_b_subnet + "\n"


def test_spot_against_an_on_demand_template_keeps_the_template_and_asks_for_one_time_spot(deployed):
    on_demand_stacks = deployed("ca-central-1", use_spot=False)

    spot = on_demand_stacks.cli("launch", "--run-id", "od-template-spot", "--spot")
    default = on_demand_stacks.cli("launch", "--run-id", "od-template-default")

    assert spot.exit_code == 0 and default.exit_code == 0, spot.output + default.output
    [spot_instance] = on_demand_stacks.run_instances("od-template-spot")
    [default_instance] = on_demand_stacks.run_instances("od-template-default")
    template_id = on_demand_stacks.outputs[naming.OUTPUT_LAUNCH_TEMPLATE_ID]
    assert spot_instance["InstanceLifecycle"] == "spot"
    assert _tags(spot_instance)["aws:ec2launchtemplate:id"] == template_id
    assert _exports(_user_data(on_demand_stacks, spot_instance["InstanceId"]))["TI_MARKET"] == "spot"
    assert default_instance.get("InstanceLifecycle") != "spot", "the stack's market unless told otherwise"
    assert _tags(default_instance)["aws:ec2launchtemplate:id"] == template_id


def test_launch_accepts_the_longest_run_id_within_ec2s_64_character_client_token(stacks, ec2_faults):
    run_id = "r" * 63

    result = stacks.cli("launch", "--run-id", run_id, env={"AWS_ENDPOINT_URL_EC2": ec2_faults.url})

    token = re.search(r"ClientToken=([^&]+)", ec2_faults.run_instances_calls[0])[1]
    assert len(token) <= 64, "EC2 rejects longer client tokens"
    assert token.startswith("r" * 55)
    assert "no spare spot capacity" in result.stderr


def test_launch_uses_the_newest_template_version_even_when_the_default_stays_1(deployed):
    """Issue 14: the local AWS keeps the default version at 1 after a deploy updates the template
    (AWS moves it), so `launch` used a stale training_command. It now launches `$Latest` by number."""
    deployment = deployed("ca-central-1")
    ec2 = deployment.client("ec2")
    template_id = deployment.outputs[naming.OUTPUT_LAUNCH_TEMPLATE_ID]
    [first] = ec2.describe_launch_template_versions(LaunchTemplateId=template_id, Versions=["$Latest"])["LaunchTemplateVersions"]
    updated = base64.b64decode(first["LaunchTemplateData"]["UserData"]).decode().replace(
        "export TI_TRAINING_COMMAND='python train.py'", "export TI_TRAINING_COMMAND='python train_v2.py'"
    )
    assert "train_v2.py" in updated
    new_version = ec2.create_launch_template_version(
        LaunchTemplateId=template_id, SourceVersion=str(first["VersionNumber"]),
        LaunchTemplateData={"UserData": base64.b64encode(updated.encode()).decode()},
    )["LaunchTemplateVersion"]["VersionNumber"]  # fmt: skip
    assert ec2.describe_launch_templates(LaunchTemplateIds=[template_id])["LaunchTemplates"][0]["DefaultVersionNumber"] == first["VersionNumber"]

    result = deployment.cli("launch", "--run-id", "launch-latest-version")

    assert result.exit_code == 0, result.output
    [instance] = deployment.run_instances("launch-latest-version")
    assert _exports(_user_data(deployment, instance["InstanceId"]))["TI_TRAINING_COMMAND"] == "python train_v2.py"
    assert _tags(instance).get("aws:ec2launchtemplate:version") in (None, str(new_version))
