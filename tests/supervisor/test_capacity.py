"""Spot placement scores: asked once per configuration, cached in the run table, low zones left out of spot fleets.

moto has no GetSpotPlacementScores: its answers come from a botocore Stubber fed the documented response
shape (EC2 API reference, GetSpotPlacementScores: SpotPlacementScores[].Region/AvailabilityZoneId/Score),
which also checks each request against the API model. Everything else (subnets, the run table, the fleet)
is moto's.
"""

from __future__ import annotations

from datetime import timedelta

import boto3
import botocore.session
import pytest
from botocore.stub import Stubber

from training_infra.supervisor.runtime import capacity
from training_infra.supervisor.runtime.capacity import PlacementScores, Scores, cache_key, preferred_pools
from training_infra.supervisor.runtime.supervisor import SPOT_WARNING

from .conftest import REGION, START, event
from .test_supervisor import FleetWithErrors

TYPES = ["g6.xlarge", "g5.xlarge", "g4dn.xlarge"]


def _zone_ids(account) -> dict[str, str]:
    """zone name -> zone id, as moto's subnets say."""
    found = account.ec2.describe_subnets(SubnetIds=list(account.subnets.values()))["Subnets"]
    return {s["AvailabilityZone"]: s["AvailabilityZoneId"] for s in found}


class ScoringEc2:
    """The account's moto EC2, but GetSpotPlacementScores answered by a Stubber in the documented shape."""

    def __init__(self, ec2, fleet=None) -> None:
        self._ec2, self._fleet = ec2, fleet
        self.stubbed = botocore.session.get_session().create_client("ec2", region_name=REGION)
        self.stubber = Stubber(self.stubbed)
        self.stubber.activate()

    def __getattr__(self, name):
        return getattr(self._fleet or self._ec2, name)

    def get_spot_placement_scores(self, **request):
        return self.stubbed.get_spot_placement_scores(**request)

    def answer(self, scores_by_zone_id: dict[str, int], types=TYPES, capacity_: int = 1) -> None:
        self.stubber.add_response(
            "get_spot_placement_scores",
            {
                "SpotPlacementScores": [
                    {"Region": REGION, "AvailabilityZoneId": zone_id, "Score": score}
                    for zone_id, score in scores_by_zone_id.items()
                ]
            },
            {
                "InstanceTypes": sorted(types),
                "TargetCapacity": capacity_,
                "TargetCapacityUnitType": "units",
                "SingleAvailabilityZone": True,
                "RegionNames": [REGION],
            },
        )


def _scores(account, ec2: ScoringEc2, *, write: bool = True, at=START, types=TYPES) -> Scores:
    return PlacementScores(ec2, account.dynamodb, account.table, write=write).get(
        types, 1, at, list(account.subnets.values())
    )


def test_zone_scores_are_asked_per_zone_for_the_sorted_types_and_named_by_the_runs_zones(account):
    ec2 = ScoringEc2(account.ec2)
    ids = _zone_ids(account)
    ec2.answer({ids["us-east-1a"]: 9, ids["us-east-1b"]: 2, "use1-az99": 7})
    scores = _scores(account, ec2)
    ec2.stubber.assert_no_pending_responses()
    assert scores.zones == {"us-east-1a": 9, "us-east-1b": 2}, "zone ids mapped through the run's subnets"
    assert scores.types == tuple(sorted(TYPES)) and not scores.cached and scores.usable


def test_a_second_ask_within_fifteen_minutes_reads_the_run_table_and_not_ec2(account):
    ec2 = ScoringEc2(account.ec2)
    ids = _zone_ids(account)
    ec2.answer({ids["us-east-1a"]: 8, ids["us-east-1b"]: 3})
    _scores(account, ec2)
    again = _scores(account, ec2, at=START + timedelta(minutes=14), types=list(reversed(TYPES)))
    assert again.cached and again.zones == {"us-east-1a": 8, "us-east-1b": 3}, "same configuration, any order"
    ec2.answer({ids["us-east-1a"]: 2, ids["us-east-1b"]: 9})
    later = _scores(account, ec2, at=START + timedelta(minutes=15))
    assert not later.cached and later.zones == {"us-east-1a": 2, "us-east-1b": 9}, "asked again once stale"
    ec2.stubber.assert_no_pending_responses()


def test_the_cache_item_is_keyed_by_types_capacity_and_region_and_stays_out_of_the_run_indexes(account):
    ec2 = ScoringEc2(account.ec2)
    ids = _zone_ids(account)
    ec2.answer({ids["us-east-1a"]: 8})
    _scores(account, ec2)
    key = cache_key(TYPES, 1, REGION)
    assert key != cache_key(TYPES, 2, REGION) != cache_key(TYPES, 1, "us-west-2") != cache_key(TYPES[:2], 1, REGION)
    item = account.dynamodb.get_item(TableName=account.table, Key={"run_id": {"S": key}})["Item"]
    assert item["kind"]["S"] == "meta" and "active" not in item and "created_at" not in item
    assert account.supervisor().store.newest(10) == [] and list(account.supervisor().store.active()) == []


def test_the_cli_reader_asks_ec2_on_a_miss_but_never_writes_the_run_table(account):
    ec2 = ScoringEc2(account.ec2)
    ec2.answer({_zone_ids(account)["us-east-1a"]: 8})
    _scores(account, ec2, write=False)
    key = cache_key(TYPES, 1, REGION)
    assert "Item" not in account.dynamodb.get_item(TableName=account.table, Key={"run_id": {"S": key}})


def test_a_refused_score_request_means_no_scores_and_every_pool_offered(account):
    ec2 = ScoringEc2(account.ec2)
    ec2.stubber.add_client_error("get_spot_placement_scores", "UnauthorizedOperation", http_status_code=403)
    scores = _scores(account, ec2)
    assert scores.missing == "UnauthorizedOperation" and not scores.usable
    pools = [(t, s) for t in TYPES for s in account.subnets.values()]
    assert preferred_pools(pools, {s: z for z, s in account.subnets.items()}, scores) == (pools, [])
    assert capacity.describe(scores, ["us-east-1a"]) == "skipped: not available here (UnauthorizedOperation)"


ZONES = {"subnet-a": "us-east-1a", "subnet-b": "us-east-1b", "subnet-c": "us-east-1c"}
POOLS = [(t, s) for t in TYPES for s in ZONES]


@pytest.mark.parametrize(
    ("zones", "left_out"),
    [
        ({"us-east-1a": 9, "us-east-1b": 3, "us-east-1c": 1}, ["us-east-1b", "us-east-1c"]),
        ({"us-east-1a": 4, "us-east-1b": 3}, ["us-east-1b"]),  # us-east-1c not scored: kept
        ({"us-east-1a": 3, "us-east-1b": 2, "us-east-1c": 1}, []),  # every zone low: ranking says nothing
        ({"us-east-1a": 10, "us-east-1b": 10, "us-east-1c": 7}, []),
    ],
)
def test_zones_scoring_three_or_less_are_left_out_only_while_another_zone_scores_higher(zones, left_out):
    scores = Scores(tuple(sorted(TYPES)), 1, REGION, zones)
    kept, low = preferred_pools(POOLS, ZONES, scores)
    assert low == left_out
    assert kept == [(t, s) for t, s in POOLS if ZONES[s] not in left_out]


def test_scores_for_fewer_than_three_types_never_leave_a_zone_out_and_say_why():
    scores = Scores(("g5.xlarge",), 1, REGION, {"us-east-1a": 9, "us-east-1b": 1})
    assert preferred_pools(POOLS, ZONES, scores) == (POOLS, [])
    assert "always low" in scores.caveat()


def test_a_spot_launch_leaves_low_scoring_zones_out_of_the_fleet(account):
    fleet = FleetWithErrors(account.ec2, failing_markets=set())
    ec2 = ScoringEc2(account.ec2, fleet)
    ids = _zone_ids(account)
    ec2.answer({ids["us-east-1a"]: 2, ids["us-east-1b"]: 8})
    account.new_run(instance_types=TYPES)
    account.supervisor(ec2=ec2).reconcile("bert")
    (request,) = fleet.requests
    offered = {(o["InstanceType"], o["SubnetId"]) for o in request["LaunchTemplateConfigs"][0]["Overrides"]}
    assert offered == {(t, account.subnets["us-east-1b"]) for t in TYPES}
    assert request["SpotOptions"]["AllocationStrategy"] == "price-capacity-optimized", "EC2 still weighs price"
    assert account.run().attempts[0].zone == "us-east-1b"


def test_an_on_demand_launch_never_asks_for_scores(account):
    fleet = FleetWithErrors(account.ec2, failing_markets=set())
    ec2 = ScoringEc2(account.ec2, fleet)  # no answer queued: a score request would fail the Stubber
    account.new_run(instance_types=TYPES, market="on-demand")
    account.supervisor(ec2=ec2).reconcile("bert")
    (request,) = fleet.requests
    assert len(request["LaunchTemplateConfigs"][0]["Overrides"]) == len(TYPES) * 2


def test_without_placement_scores_in_the_emulator_a_spot_launch_offers_every_pool(account):
    """moto itself (no Stubber): the unanswered request is 'no scores', never a failed launch."""
    fleet = FleetWithErrors(boto3.client("ec2", region_name=REGION), failing_markets=set())
    account.new_run(instance_types=TYPES)
    account.supervisor(ec2=fleet).reconcile("bert")
    (request,) = fleet.requests
    assert len(request["LaunchTemplateConfigs"][0]["Overrides"]) == len(TYPES) * 2


# --- status RUN -v: why a run waits, from the record the supervisor wrote ------------------------------------


def test_a_waiting_run_says_each_pool_tried_ec2s_answer_its_cooldowns_and_the_next_try(account):
    from training_infra.cli.capacity import waiting, waiting_lines

    fleet = FleetWithErrors(account.ec2, failing_markets=set())
    account.new_run(instance_types=["g5.xlarge"])
    supervisor = account.supervisor(ec2=fleet)
    supervisor.reconcile("bert")
    first = account.run().attempts[0]
    assert waiting(account.run(), account.clock()) is None, "a run with an instance is not waiting"
    fleet.failing, fleet.code = {"spot"}, "MaxSpotInstanceCountExceeded"
    supervisor.handle(event(SPOT_WARNING, first.instance_id, **{"instance-action": "terminate"}))
    account.end_instance(first.instance_id)
    supervisor.reconcile("bert")  # replaced on the notice and again now: the other zone answers max spot count
    account.clock.advance(seconds=20)
    found = waiting(account.run(), account.clock())

    other = "us-east-1b" if first.zone == "us-east-1a" else "us-east-1a"
    assert found["pools"] == [{
        "pool": f"g5.xlarge@{other}", "market": "spot", "code": "MaxSpotInstanceCountExceeded",
        "answer": "max spot count: the account's spot vCPU quota is used up",
        "message": "We currently do not have sufficient g5.xlarge capacity in the Availability Zone you requested.",
    }]  # fmt: skip
    until = START + timedelta(minutes=30)
    assert found["cooldown"] == {f"g5.xlarge@{first.zone}": until.strftime("%Y-%m-%dT%H:%M:%SZ")}
    assert found["next_try_at"] == (START + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = waiting_lines(found)
    assert lines[0] == "why it waits:" and "2 tries without an instance" in lines[1]
    assert f"    g5.xlarge@{other} (spot): max spot count: the account's spot vCPU quota is used up " \
           "[MaxSpotInstanceCountExceeded]" in lines  # fmt: skip
    assert any(line.startswith(f"  cooldown: g5.xlarge@{first.zone} until ") for line in lines)
    assert lines[-1].startswith("  next try: ")


def test_a_zone_left_out_for_its_score_is_listed_as_such_and_not_counted_as_a_capacity_error(account):
    from training_infra.cli.capacity import waiting

    fleet = FleetWithErrors(account.ec2, failing_markets={"spot"}, code="InsufficientInstanceCapacity")
    ec2 = ScoringEc2(account.ec2, fleet)
    ids = _zone_ids(account)
    ec2.answer({ids["us-east-1a"]: 1, ids["us-east-1b"]: 9})
    account.new_run(instance_types=TYPES)
    account.supervisor(ec2=ec2).reconcile("bert")
    run = account.run()
    assert run.message == "no capacity: InsufficientInstanceCapacity in 3 pool(s)", "the three us-east-1b pools"
    answers = {(p["pool"], p["answer"]) for p in waiting(run, account.clock())["pools"]}
    assert ("*@us-east-1a", "not offered: spot placement score too low") in answers
    assert ("g5.xlarge@us-east-1b", "insufficient capacity") in answers


# --- Capacity Blocks: the block-ending warning ------------------------------------------------------------------

BLOCK = "cr-0123456789abcdef0"
# The event as EventBridge delivers it (EC2 User Guide, "Monitor Capacity Blocks using EventBridge").
BLOCK_ENDING = {
    "version": "0",
    "id": "7bf73129-1428-4cd3-a780-95db273d1602",
    "detail-type": "Capacity Block Reservation Expiration Warning",
    "source": "aws.ec2",
    "account": "123456789012",
    "time": "2026-11-29T08:20:00Z",
    "region": REGION,
    "resources": [f"arn:aws:ec2:{REGION}:123456789012:capacity-reservation/{BLOCK}"],
    "detail": {"capacity-reservation-id": BLOCK, "end-date": "2026-11-29T09:00:00Z"},
}


class BlockEc2:
    """moto's EC2, but "which instances are in capacity reservation X" (moto has no Capacity Blocks) answered by a
    Stubber with moto's own description of the instances said to be in it."""

    def __init__(self, ec2, in_block: list[str]) -> None:
        self._ec2 = ec2
        self.stubbed = botocore.session.get_session().create_client("ec2", region_name=REGION)
        self.stubber = Stubber(self.stubbed)
        described = ec2.describe_instances(InstanceIds=in_block)["Reservations"] if in_block else []
        self.stubber.add_response(
            "describe_instances",
            {"Reservations": described},
            {"Filters": [
                {"Name": "capacity-reservation-id", "Values": [BLOCK]},
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
                {"Name": "tag:training-infra:managed", "Values": ["true"]},
            ]},
        )  # fmt: skip
        self.stubber.activate()

    def __getattr__(self, name):
        return getattr(self._ec2, name)

    def get_paginator(self, name):
        return self.stubbed.get_paginator(name) if name == "describe_instances" else self._ec2.get_paginator(name)


@pytest.mark.parametrize(
    "detail_type",
    # The User Guide's example (docs.aws.amazon.com, "Monitor Capacity Blocks using EventBridge") and the name other
    # versions of that page give: the rule matches both (test_supervisor_construct.py).
    ["Capacity Block Expiration Warning", "Capacity Block Reservation Expiration Warning"],
)
def test_the_block_ending_warning_stops_its_runs_gracefully_and_they_end_deadline_without_a_relaunch(
    account, detail_type
):
    from .conftest import start

    first = start(account).attempts[0]
    ec2 = BlockEc2(account.ec2, [first.instance_id])
    answer = account.supervisor(ec2=ec2).handle({**BLOCK_ENDING, "detail-type": detail_type})
    ec2.stubber.assert_no_pending_responses()
    assert answer == {"capacity_reservation": BLOCK, "ends_at": "2026-11-29T09:00:00Z", "stopping": ["bert"]}
    run = account.run()
    assert run.state == "stopping" and run.stop_reason == "capacity-block"
    tags = {t["Key"]: t["Value"] for t in account.instances_of("bert")[0]["Tags"]}
    assert tags["training-infra:stop"] == "capacity-block", "the agent checkpoints and stops on the stop tag"
    account.agent_wrote("bert", 1, "stopped")
    account.end_instance(first.instance_id)
    account.supervisor().reconcile("bert")
    run = account.run()
    assert run.state == "deadline" and len(run.attempts) == 1, "the block is over: no relaunch"


def test_the_block_ending_warning_leaves_runs_outside_the_block_alone(account):
    from .conftest import start

    start(account)
    ec2 = BlockEc2(account.ec2, [])
    assert account.supervisor(ec2=ec2).handle(BLOCK_ENDING)["stopping"] == []
    assert account.run().state == "launching" and not account.run().stop_requested_at
    bad = {**BLOCK_ENDING, "detail": {"capacity-reservation-id": "sir-123"}}
    assert "ignored" in account.supervisor().handle(bad)


def test_a_pool_the_supervisor_left_out_for_its_score_reads_as_such_in_status_v():
    """The CLI names the supervisor's LEFT_OUT code without importing the supervisor at start-up."""
    from training_infra.cli import capacity as cli_capacity
    from training_infra.supervisor.runtime.capacity import LEFT_OUT

    assert cli_capacity.answer_words(LEFT_OUT) == "not offered: spot placement score too low"
