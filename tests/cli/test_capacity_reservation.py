"""`launch --capacity-reservation ID` on the CLI's side: the flag's one-line checks, the spec key, and the preflight
that describes the block and refuses in one line what cannot hold the run.

The local AWS (moto) has no Capacity Reservations: DescribeCapacityReservations is answered by a botocore Stubber in
the documented shape (EC2 API reference, CapacityReservation), which also checks the request against the API model.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import botocore.session
import pytest
from botocore.stub import Stubber

from training_infra import naming
from training_infra.cli import launching, preflight, spec_cli
from training_infra.cli.errors import UsageError
from training_infra.spec import SpecError, json_schema, validate
from training_infra.supervisor.runtime.records import RESERVATION_ID

BLOCK = "cr-0123456789abcdef0"


def _ec2(reservation: dict | None) -> tuple[object, Stubber]:
    client = botocore.session.get_session().create_client(
        "ec2",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # noqa: S106
    )
    stub = Stubber(client)
    if reservation is None:
        stub.add_client_error("describe_capacity_reservations", "InvalidCapacityReservationId.NotFound", "nope", 400)
    else:
        stub.add_response("describe_capacity_reservations", {"CapacityReservations": [reservation]},
                          {"CapacityReservationIds": [BLOCK]})  # fmt: skip
    stub.activate()
    return client, stub


def _reservation(**changes) -> dict:
    now = datetime.now(UTC).replace(microsecond=0)
    return {
        "CapacityReservationId": BLOCK, "InstanceType": "p5.48xlarge", "AvailabilityZone": "us-east-1b",
        "TotalInstanceCount": 1, "AvailableInstanceCount": 1, "State": "active", "StartDate": now - timedelta(hours=1),
        "EndDate": now + timedelta(hours=6), "ReservationType": "capacity-block", "InstanceMatchCriteria": "targeted",
        "Tags": [{"Key": "training-infra:managed", "Value": "true"}],  # `capacity buy` tags what it buys
        **changes,
    }  # fmt: skip


def _report(hours: float = 12) -> preflight.Report:
    deadline = (datetime.now(UTC) + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")
    plan = preflight.Plan(
        run_id="r", image_tag="latest", instance_types=["p5.48xlarge", "g5.xlarge"], market="capacity-block",
        subnets=["subnet-a", "subnet-b"], deadline=deadline, template_id="lt-0123456789abcdef0",
        run_tags={naming.TAG_MANAGED: "true", naming.TAG_RUN_ID: "r"}, capacity_reservation=BLOCK,
        floor_seconds=900,
    )  # fmt: skip
    report = preflight.Report(plan)
    report.zones = {"subnet-a": "us-east-1a", "subnet-b": "us-east-1b"}
    report.offered = [(t, z) for t in plan.instance_types for z in ("us-east-1a", "us-east-1b")]
    return report


def test_the_preflight_narrows_the_run_to_the_blocks_type_and_zone_and_says_the_deadline_is_clipped():
    ec2, stub = _ec2(_reservation())
    report = _report(hours=12)

    preflight.check_block(report, ec2)

    stub.assert_no_pending_responses()
    assert report.failures == [] and report.block.reservation_id == BLOCK
    assert report.plan.instance_types == ["p5.48xlarge"] and report.plan.subnets == ["subnet-b"]
    assert report.offered == [("p5.48xlarge", "us-east-1b")]
    [note] = report.notes
    assert note.startswith(f"deadline clipped to {report.plan.deadline}: capacity block {BLOCK} ends ")
    assert "EC2 ends its instances 30 min before" in note
    assert ("capacity block", f"{report.block.words()}: prepaid, no price per hour") in report.lines


def test_a_deadline_before_the_blocks_end_is_kept_and_nothing_is_said_of_clipping():
    ec2, _stub = _ec2(_reservation())
    report = _report(hours=2)
    before = report.plan.deadline

    preflight.check_block(report, ec2)

    assert report.failures == [] and report.plan.deadline == before and report.notes == []


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"InstanceType": "p4d.24xlarge"}, "holds p4d.24xlarge; allowed: a block of the run's instance types"),
        ({"State": "expired"}, "is expired; allowed: an active or scheduled Capacity Block"),
        ({"ReservationType": "default"}, "is a default reservation; allowed: a Capacity Block"),
        ({"AvailabilityZone": "us-east-1f"}, "is in us-east-1f; allowed: a zone of the stack's subnets"),
        (None, "EC2 says InvalidCapacityReservationId.NotFound"),
    ],
)
def test_the_preflight_refuses_a_block_that_cannot_hold_the_run_in_one_line(changes, words):
    ec2, _stub = _ec2(None if changes is None else _reservation(**changes))
    report = _report()

    preflight.check_block(report, ec2)

    [failure] = report.failures
    assert failure.startswith(f"capacity reservation {BLOCK}: ") and words in failure and "\n" not in failure
    assert report.block is None


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"capacity_reservation": "cr-12"}, "option '--capacity-reservation': got 'cr-12'; allowed: a Capacity Block"),
        ({"capacity_reservation": BLOCK, "market": "spot"}, "options '--capacity-reservation' and '--market'"),
        ({"capacity_reservation": BLOCK, "spot": False}, "options '--capacity-reservation' and '--spot/--on-demand'"),
        ({"capacity_reservation": BLOCK, "max_price": "2"}, "options '--capacity-reservation' and '--max-price'"),
    ],
)
def test_a_bad_capacity_reservation_flag_is_one_usage_line_before_any_aws_call(fields, words):
    with pytest.raises(UsageError) as refused:
        launching.validate(launching.LaunchRequest(**fields))
    assert words in str(refused.value) and "\n" not in str(refused.value)


def test_a_capacity_reservation_makes_the_runs_market_capacity_block():
    request = launching.validate(launching.LaunchRequest(capacity_reservation=BLOCK))
    assert launching._market(request, {"InstanceMarketOptions": {"MarketType": "spot"}}) == "capacity-block"


def test_the_spec_key_resources_capacity_reservation_becomes_the_flag_and_back():
    spec = validate({"resources": {"instance_types": ["p5.48xlarge"], "capacity_reservation": BLOCK}})
    request = spec_cli.request_from_spec(spec, launching.LaunchRequest())
    assert request.capacity_reservation == BLOCK
    assert spec_cli.flags_as_spec(request)["resources"]["capacity_reservation"] == BLOCK
    assert spec_cli.FLAG_OF["resources.capacity_reservation"] == "--capacity-reservation"


def test_the_spec_key_refuses_a_malformed_id_naming_the_key_and_the_schema_says_the_same_pattern():
    with pytest.raises(SpecError) as refused:
        validate({"resources": {"capacity_reservation": "cr-XYZ"}})
    assert "resources.capacity_reservation" in str(refused.value) and "cr-XYZ" in str(refused.value)
    schema = json_schema()
    resources = schema["$defs"]["Resources"]["properties"]["capacity_reservation"]
    patterns = [alt.get("pattern") for alt in resources.get("anyOf", [resources])]
    assert RESERVATION_ID.pattern in patterns


def test_the_spec_kept_for_a_block_run_names_no_market_so_launch_like_it_is_accepted():
    """The stack's market is a default of every other run; beside a block it would make `--like RUN` refuse."""
    defaults = spec_cli.stack_defaults(["g5.xlarge"], "capacity-block", {}, 12)
    flags = launching.validate(launching.LaunchRequest(capacity_reservation=BLOCK, instance_type="p5.48xlarge"))
    spec, _sources = spec_cli.resolved([(spec_cli.FLAG, spec_cli.flags_as_spec(flags))], defaults, "r")
    kept = spec.to_data()
    assert "market" not in kept["resources"] and kept["resources"]["capacity_reservation"] == BLOCK
    again = spec_cli.request_from_spec(validate(kept), launching.LaunchRequest())
    assert again.capacity_reservation == BLOCK and again.market is None
    assert "market" in spec_cli.stack_defaults(["g5.xlarge"], "spot", {}, 12)["resources"]


# ---- end to end on the local AWS: the CLI, the preflight and the supervisor's request function in process ---------
# The loopback EC2 proxy (tests/cli/conftest.py) answers DescribeCapacityReservations in its documented XML (moto has
# none) and CreateFleet with capacity errors (moto's starts nothing for capacity-block); the rest is moto's.


def _block_xml(region: str, instance_type: str = "g5.xlarge", hours_left: float = 1.5) -> dict[str, str]:
    now = datetime.now(UTC).replace(microsecond=0)
    return {
        "capacityReservationId": BLOCK, "instanceType": instance_type, "availabilityZone": f"{region}b",
        "totalInstanceCount": "1", "availableInstanceCount": "1", "state": "active",
        "startDate": (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "endDate": (now + timedelta(hours=hours_left)).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "reservationType": "capacity-block", "instanceMatchCriteria": "targeted",
        "tagSet": "<item><key>training-infra:managed</key><value>true</value></item>",  # `capacity buy` tagged it
    }  # fmt: skip


def test_launch_into_a_block_asks_a_capacity_block_fleet_in_its_zone_and_says_the_deadline_is_clipped(
    stacks, ec2_faults
):
    from training_infra.supervisor.runtime.records import RunStore

    ec2_faults.capacity_reservations = [_block_xml(stacks.region)]
    result = stacks.cli("launch", "--run-id", "in-block", "--capacity-reservation", BLOCK, "--instance-type",
                        "g5.xlarge", env={"AWS_ENDPOINT_URL_EC2": ec2_faults.url})  # fmt: skip
    try:
        assert result.exit_code == 0, result.output
        [note] = [line for line in result.stderr.splitlines() if line.startswith("note: deadline clipped to ")]
        assert f"capacity block {BLOCK} ends " in note
        record = RunStore(stacks.client("dynamodb"), stacks.outputs[naming.OUTPUT_RUN_TABLE]).get("in-block")
        assert record.spec.market == "capacity-block" and record.spec.capacity_reservation_id == BLOCK
        said = datetime.fromisoformat(note.split()[4].rstrip(":").replace("Z", "+00:00"))
        assert said == datetime.fromisoformat(record.deadline_at.replace("Z", "+00:00")), (note, record.deadline_at)
        end = datetime.fromisoformat(ec2_faults.capacity_reservations[0]["endDate"].replace("Z", "+00:00"))
        assert said == end - timedelta(minutes=30) - timedelta(seconds=600), "one graceful stop before EC2 ends it"
        assert f"until {record.deadline_at}" in result.stdout, "the waiting line names the clipped deadline"
        [fleet] = ec2_faults.fleet_calls
        assert "TargetCapacitySpecification.DefaultTargetCapacityType=capacity-block" in fleet
        assert "SpotOptions" not in fleet and "OnDemandOptions" not in fleet
        zone_b = stacks.client("ec2").describe_subnets(SubnetIds=list(record.spec.subnet_ids))["Subnets"]
        assert {s["AvailabilityZone"] for s in zone_b} == {f"{stacks.region}b"}, "only the block's zone"
    finally:
        stacks.cli("stop", "in-block")


def test_launch_into_a_block_of_another_type_is_refused_in_one_line_and_creates_nothing(stacks, ec2_faults):
    ec2_faults.capacity_reservations = [_block_xml(stacks.region, instance_type="g6.xlarge")]
    result = stacks.cli("launch", "--run-id", "wrong-block", "--capacity-reservation", BLOCK, "--instance-type",
                        "g5.xlarge", env={"AWS_ENDPOINT_URL_EC2": ec2_faults.url})  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [
        f"error: capacity reservation {BLOCK}: holds g6.xlarge; allowed: a block of the run's instance types "
        "g5.xlarge (pass --instance-type g6.xlarge)"
    ]
    assert ec2_faults.fleet_calls == []
    templates = stacks.client("ec2").describe_launch_templates(
        Filters=[{"Name": "launch-template-name", "Values": ["training-infra-run-wrong-block"]}]
    )["LaunchTemplates"]
    assert templates == [] and stacks.run_instances("wrong-block") == []
