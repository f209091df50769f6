"""Capacity Blocks: a run launched into a block the user bought (`launch --capacity-reservation cr-...`).

What is played and why: moto has no Capacity Reservations at all (no DescribeCapacityReservations) and its
CreateFleet starts nothing for `DefaultTargetCapacityType=capacity-block`. So DescribeCapacityReservations is
answered by a botocore Stubber in the documented shape (EC2 API reference, CapacityReservation), and the fleet
request is recorded as sent and placed as EC2 would place it: moto's own RunInstances from the request's launch
template, in the request's subnet, with its tags, answered in CreateFleet's documented `instant` shape. Everything
else (the stack template, the run template the request function makes, the run table, the reconcile) is moto's.
"""

from __future__ import annotations

import base64
import dataclasses
from datetime import timedelta

import botocore.session
import pytest
from botocore.stub import Stubber

from training_infra.supervisor.runtime import blocks
from training_infra.supervisor.runtime.records import InvalidRecord, RunSpec, parse_iso
from training_infra.supervisor.runtime.run_requests import handle_request

from .conftest import REGION, START

BLOCK = "cr-0123456789abcdef0"
FLOOR = timedelta(minutes=15)  # boot 10 min + one 300 s checkpoint interval


def _block(**changes) -> blocks.Block:
    values = {
        "reservation_id": BLOCK, "instance_type": "p5.48xlarge", "zone": "us-east-1a", "state": "active",
        "kind": "capacity-block", "total": 1, "available": 1, "start": START - timedelta(hours=1),
        "end": START + timedelta(hours=24), "managed": True,
    }  # fmt: skip
    return blocks.Block(**{**values, **changes})


# ---- pure rules: no AWS -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["cr-0123456789abcdef0", "cr-01234567"])
def test_a_capacity_reservation_id_of_8_or_17_hex_digits_is_accepted(value):
    assert blocks.reservation_id(value) == value


def test_a_block_without_the_managed_tag_is_refused_in_one_line():
    found = blocks.problem(_block(managed=False), ["p5.48xlarge"], 1, START, FLOOR, 600)
    assert found == (
        f"capacity reservation {BLOCK}: has no tag training-infra:managed=true; allowed: a block bought with "
        "`training-infra capacity buy` (it tags the block), or one bought before or another way once its buyer ran "
        f"`aws ec2 create-tags --resources {BLOCK} --tags Key=training-infra:managed,Value=true` (its fee is then "
        "not in the month's ledger)"
    )
    tagged = blocks.Block.from_answer({"Tags": [{"Key": "training-infra:managed", "Value": "true"}]})
    assert tagged.managed and not blocks.Block.from_answer({"Tags": [{"Key": "other", "Value": "true"}]}).managed


@pytest.mark.parametrize("value", ["", "cr-123", "cr-0123456789ABCDEF0", "sir-0123456789abcdef0", 17, None,
                                   "cr-0123456789abcdef0 --market spot"])  # fmt: skip
def test_a_malformed_capacity_reservation_id_is_refused_in_one_line_naming_the_option_and_value(value):
    with pytest.raises(blocks.BlockRefused) as refused:
        blocks.reservation_id(value)
    message = str(refused.value)
    assert message.startswith("option '--capacity-reservation': got ") and repr(value) in message
    assert "allowed: a Capacity Block reservation id such as cr-" in message and "\n" not in message


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"instance_type": "p4d.24xlarge"}, "holds p4d.24xlarge; allowed: a block of the run's instance types"),
        ({"state": "expired"}, "is expired; allowed: an active or scheduled Capacity Block"),
        ({"state": "cancelled"}, "is cancelled"),
        ({"kind": "default"}, "is a default reservation; allowed: a Capacity Block"),
        ({"total": 1}, "holds 1 instance(s); the run needs 2"),
        ({"zone": "us-east-1c"}, "is in us-east-1c; allowed: a zone of the stack's subnets"),
        ({"end": START + timedelta(minutes=50)}, "less than boot + one checkpoint interval (15 min)"),
    ],
)
def test_a_block_that_cannot_hold_the_run_is_named_with_why_in_one_line(changes, words):
    nodes = 2 if "total" in changes else 1
    problem = blocks.problem(_block(**changes), ["p5.48xlarge"], nodes, START, FLOOR, 600, ["us-east-1a", "us-east-1b"])
    assert problem.startswith(f"capacity reservation {BLOCK}: ") and words in problem and "\n" not in problem


def test_a_block_that_starts_after_the_runs_deadline_is_refused_since_the_run_would_only_wait():
    late = _block(state="scheduled", start=START + timedelta(hours=30), end=START + timedelta(hours=54))
    problem = blocks.problem(late, ["p5.48xlarge"], 1, START, FLOOR, 600, ["us-east-1a"], START + timedelta(hours=12))
    assert "starts 2026-11-30T14:00Z, too late for the run's deadline 2026-11-29T20:00Z" in problem
    soon = _block(state="scheduled", start=START + timedelta(hours=2), end=START + timedelta(hours=26))
    assert (
        blocks.problem(soon, ["p5.48xlarge"], 1, START, FLOOR, 600, ["us-east-1a"], START + timedelta(hours=12)) == ""
    )


def test_an_active_or_scheduled_block_of_the_runs_type_in_its_zones_holds_it():
    for state in ("active", "scheduled"):
        assert blocks.problem(_block(state=state), ["p5.48xlarge"], 1, START, FLOOR, 600, ["us-east-1a"]) == ""


def test_the_deadline_is_clipped_to_one_graceful_stop_before_ec2_begins_ending_the_blocks_instances():
    block = _block(end=START + timedelta(hours=5))
    clipped = blocks.clip(START + timedelta(hours=12), block, 600)
    assert clipped == START + timedelta(hours=5) - timedelta(minutes=30) - timedelta(seconds=600)
    assert blocks.clip(START + timedelta(hours=2), block, 600) == START + timedelta(hours=2), "earlier stays"


def test_a_runs_template_for_a_block_says_capacity_block_and_targets_only_that_reservation():
    data = blocks.template_data({"ImageId": "ami-1", "CapacityReservationSpecification": {"x": 1}}, BLOCK)
    assert data["InstanceMarketOptions"] == {"MarketType": "capacity-block"}
    assert data["CapacityReservationSpecification"] == {"CapacityReservationTarget": {"CapacityReservationId": BLOCK}}
    assert data["ImageId"] == "ami-1"


def test_a_spec_in_a_block_round_trips_and_one_without_it_is_stored_as_before():
    base = {"instance_types": ["p5.48xlarge"], "subnet_ids": ["subnet-01234567"], "max_runtime_hours": 2,
            "launch_template_id": "lt-0123456789abcdef0"}  # fmt: skip
    spec = RunSpec.from_dict({**base, "market": "capacity-block", "capacity_reservation_id": BLOCK})
    assert RunSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["capacity_reservation_id"] == BLOCK
    assert "capacity_reservation_id" not in RunSpec.from_dict({**base, "market": "spot"}).to_dict()


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"market": "capacity-block"}, "spec.market: got 'capacity-block'"),
        ({"market": "spot", "capacity_reservation_id": BLOCK}, "allowed: capacity-block with a capacity reservation"),
        ({"market": "capacity-block", "capacity_reservation_id": "cr-nope"}, "spec.capacity_reservation_id"),
    ],
)
def test_a_record_with_a_block_market_and_no_block_or_the_reverse_is_invalid(fields, words):
    base = {"instance_types": ["p5.48xlarge"], "subnet_ids": ["subnet-01234567"], "max_runtime_hours": 2,
            "launch_template_id": "lt-0123456789abcdef0"}  # fmt: skip
    with pytest.raises(InvalidRecord, match=words):
        RunSpec.from_dict({**base, **fields})


# ---- the request function and the supervisor's launch: moto, with the two answers it cannot give -------------


class BlockAccountEc2:
    """moto's EC2, but DescribeCapacityReservations answered by a Stubber, and CreateFleet recorded and placed as
    EC2 places a capacity-block fleet (moto's own CreateFleet starts nothing for that market)."""

    def __init__(self, ec2, reservation: dict | None) -> None:
        self._ec2 = ec2
        self.fleets: list[dict] = []
        self.stubbed = botocore.session.get_session().create_client("ec2", region_name=REGION)
        self.stubber = Stubber(self.stubbed)
        if reservation is None:
            self.stubber.add_client_error(
                "describe_capacity_reservations", "InvalidCapacityReservationId.NotFound", "not found", 400,
                expected_params={"CapacityReservationIds": [BLOCK]},
            )  # fmt: skip
        else:
            self.stubber.add_response(
                "describe_capacity_reservations", {"CapacityReservations": [reservation]},
                {"CapacityReservationIds": [reservation["CapacityReservationId"]]},
            )  # fmt: skip
        self.stubber.activate()

    def __getattr__(self, name):
        return getattr(self._ec2, name)

    def describe_capacity_reservations(self, **request):
        return self.stubbed.describe_capacity_reservations(**request)

    def create_fleet(self, **request):
        self.fleets.append(request)
        config = request["LaunchTemplateConfigs"][0]
        override = config["Overrides"][0]
        tags = request["TagSpecifications"][0]["Tags"]
        started = self._ec2.run_instances(
            MinCount=1, MaxCount=1, LaunchTemplate=config["LaunchTemplateSpecification"],
            InstanceType=override["InstanceType"], SubnetId=override["SubnetId"],
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
        )["Instances"][0]  # fmt: skip
        return {
            "FleetId": "fleet-0123456789abcdef0",
            "Errors": [],
            "Instances": [{
                "LaunchTemplateAndOverrides": {"LaunchTemplateSpecification": config["LaunchTemplateSpecification"],
                                               "Overrides": override},
                "Lifecycle": "on-demand", "InstanceIds": [started["InstanceId"]],
                "InstanceType": override["InstanceType"],
            }],
        }  # fmt: skip


def _reservation(account, **changes) -> dict:
    """DescribeCapacityReservations' CapacityReservation, as EC2 answers for a bought block."""
    return {
        "CapacityReservationId": BLOCK, "InstanceType": "p5.48xlarge", "InstancePlatform": "Linux/UNIX",
        "AvailabilityZone": "us-east-1b", "Tenancy": "default", "TotalInstanceCount": 1, "AvailableInstanceCount": 1,
        "State": "active", "StartDate": START - timedelta(hours=1), "EndDate": START + timedelta(hours=6),
        "EndDateType": "limited", "InstanceMatchCriteria": "targeted", "ReservationType": "capacity-block",
        "Tags": [{"Key": "training-infra:managed", "Value": "true"}],  # `capacity buy` tags what it buys
        **changes,
    }  # fmt: skip


def _block_request(account, ec2, **fields) -> dict:
    account.cfg = dataclasses.replace(account.cfg, allowed_instance_types="g5.*,p5.*")
    event = {"action": "launch", "run_id": "inblock", "instance_types": ["p5.48xlarge"], "market": "capacity-block",
             "max_runtime_hours": 12, "capacity_reservation_id": BLOCK, **fields}  # fmt: skip
    return handle_request(account.supervisor(ec2=ec2), event)


def test_a_launch_into_a_block_makes_a_capacity_block_template_and_fleet_in_its_zone_and_clips_the_deadline(account):
    ec2 = BlockAccountEc2(account.ec2, _reservation(account))

    answer = _block_request(account, ec2)

    ec2.stubber.assert_no_pending_responses()
    assert answer["ok"] and answer["attempt"] == 1 and answer["instance_id"], answer
    assert answer["deadline_clipped_to_block"] == BLOCK
    [fleet] = ec2.fleets
    assert fleet["Type"] == "instant"
    target = fleet["TargetCapacitySpecification"]
    assert target == {"TotalTargetCapacity": 1, "DefaultTargetCapacityType": "capacity-block"}
    assert "SpotOptions" not in fleet and "OnDemandOptions" not in fleet, "EC2 refuses CapacityReservationOptions here"
    overrides = fleet["LaunchTemplateConfigs"][0]["Overrides"]
    assert overrides == [{"InstanceType": "p5.48xlarge", "SubnetId": account.subnets["us-east-1b"]}], "its zone only"
    run = account.run("inblock")
    assert run.spec.market == "capacity-block" and run.spec.capacity_reservation_id == BLOCK
    assert run.current.market == "capacity-block" and run.current.zone == "us-east-1b"
    end = START + timedelta(hours=6)
    grace = timedelta(seconds=account.cfg.stop_timeout_seconds)
    assert parse_iso(run.deadline_at) == end - timedelta(minutes=30) - grace, "one graceful stop before EC2 ends it"
    assert run.spec.list_prices == {"p5.48xlarge": 0.0}, "prepaid: no price per hour beyond the volume"
    data = account.ec2.describe_launch_template_versions(LaunchTemplateId=run.spec.launch_template_id)[
        "LaunchTemplateVersions"
    ][0]["LaunchTemplateData"]
    assert data["InstanceMarketOptions"]["MarketType"] == "capacity-block"
    assert data["CapacityReservationSpecification"]["CapacityReservationTarget"]["CapacityReservationId"] == BLOCK
    user_data = base64.b64decode(data["UserData"]).decode()
    assert f"export TI_MAX_RUNTIME_SECONDS={round(5.5 * 3600 - account.cfg.stop_timeout_seconds)}" in user_data
    assert "export TI_HOURLY_PRICE_USD=0" in user_data


@pytest.mark.parametrize(
    ("reservation", "words"),
    [
        ({"InstanceType": "p4d.24xlarge"}, "holds p4d.24xlarge"),
        ({"State": "expired"}, "is expired"),
        ({"ReservationType": "default"}, "is a default reservation"),
        (None, "EC2 says InvalidCapacityReservationId.NotFound"),
    ],
)
def test_the_request_function_refuses_a_block_that_cannot_hold_the_run_and_creates_nothing(account, reservation, words):
    ec2 = BlockAccountEc2(account.ec2, None if reservation is None else _reservation(account, **reservation))

    answer = _block_request(account, ec2)

    assert answer["ok"] is False and words in answer["error"] and "\n" not in answer["error"]
    assert account.run("inblock") is None and ec2.fleets == []
    names = {t["LaunchTemplateName"] for t in account.ec2.describe_launch_templates()["LaunchTemplates"]}
    assert not any(name.endswith("inblock") for name in names)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"market": "spot"}, "option '--market': got 'spot' with --capacity-reservation"),
        ({"capacity_reservation_id": "cr-nope"}, "option '--capacity-reservation': got 'cr-nope'"),
        ({"max_price_usd": 10}, "option '--max-price': got 10 with --capacity-reservation"),
        ({"capacity_reservation_id": None}, "option '--market': got 'capacity-block'"),
    ],
)
def test_the_request_function_checks_the_block_id_and_market_on_its_side_whatever_the_cli_sent(account, fields, words):
    ec2 = BlockAccountEc2(account.ec2, _reservation(account))

    answer = _block_request(account, ec2, **fields)

    assert answer["ok"] is False and answer["usage"] is True and words in answer["error"], answer
    assert account.run("inblock") is None and ec2.fleets == []


def test_an_attempt_in_a_block_costs_only_its_volume_the_block_being_prepaid():
    from training_infra.supervisor.runtime import ledger
    from training_infra.supervisor.runtime.records import Attempt

    spec = RunSpec.from_dict({"instance_types": ["p5.48xlarge"], "subnet_ids": ["subnet-01234567"],
                              "max_runtime_hours": 2, "launch_template_id": "lt-0123456789abcdef0",
                              "market": "capacity-block", "capacity_reservation_id": BLOCK, "volume_gb": 100,
                              "list_prices": {"p5.48xlarge": 0.0}})  # fmt: skip
    attempt = Attempt(n=1, instance_id="i-0123456789abcdef0", instance_type="p5.48xlarge", market="capacity-block",
                      started_at="2026-11-29T08:00:00Z")  # fmt: skip
    cost = ledger.price_attempt(attempt, spec, START + timedelta(hours=2), None)
    assert cost.source == "capacity block (prepaid)" and cost.hourly_usd == 0.0
    assert cost.usd == pytest.approx(ledger.volume_usd_per_hour(100) * 2), "the volume, not p5's $98/hour"
