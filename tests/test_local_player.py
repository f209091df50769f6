"""EC2's and EventBridge's parts of the local AWS, without a deploy: the InstancePlayer against one moto server
(the project's, with its shims) playing instances an instant CreateFleet made, as the supervisor makes them;
events delivered to a recording handler through the pattern the supervisor construct deploys."""

from __future__ import annotations

import base64
import json
import time
import urllib.request

import pytest

from training_infra import naming
from training_infra.local.emulator import Emulator
from training_infra.local.events import STATE_CHANGE, DeliveryRule, EventDelivery
from training_infra.local.instance import aws_client
from training_infra.local.sandbox import InstancePlayer
from training_infra.supervisor.construct import WATCHED_STATES

# The user data: what the instance reads from its IMDS, then it works until its OS shutdown (SIGTERM).
USER_DATA = """#!/bin/bash
python3 - <<'PY'
import os, urllib.request
imds = os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"]
token = urllib.request.urlopen(urllib.request.Request(
    imds + "/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})).read()
ip = urllib.request.urlopen(urllib.request.Request(
    imds + "/latest/meta-data/local-ipv4", headers={"X-aws-ec2-metadata-token": token.decode()})).read()
open(os.path.join(os.environ["HOME"], "local-ipv4"), "wb").write(ip)
PY
trap 'echo uploaded > "$HOME/final-upload"; exit 0' TERM
while true; do sleep 0.2; done
"""


def state_rule() -> DeliveryRule:
    """The InstanceStateEvents rule as training_infra/supervisor/construct.py declares it."""
    pattern = {
        "source": ["aws.ec2"],
        "detail-type": [STATE_CHANGE],
        "detail": {"state": list(WATCHED_STATES)},
    }
    return DeliveryRule(name="InstanceStateEvents", arn="arn:rule/state", pattern=json.dumps(pattern), retry_attempts=2)


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    with Emulator(tmp_path_factory.mktemp("moto-player"), address_block="127.77") as emulator:
        yield emulator


@pytest.fixture(scope="module")
def template(aws):
    ec2 = aws_client("ec2", aws.env)
    created = ec2.create_launch_template(
        LaunchTemplateName="player-test",
        LaunchTemplateData={
            "ImageId": "ami-12c6146b",
            "InstanceType": "g5.xlarge",
            "UserData": base64.b64encode(USER_DATA.encode()).decode(),
        },
    )
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    return created["LaunchTemplate"]["LaunchTemplateId"], subnet


def fleet(aws, template, *, run: str, capacity: int = 1, market: str = "spot", token: str = "") -> list[str]:
    template_id, subnet = template
    tags = {naming.TAG_MANAGED: "true", naming.TAG_RUN_ID: run, naming.TAG_ATTEMPT: "1"}
    response = aws_client("ec2", aws.env).create_fleet(
        ClientToken=token or f"{run}-{time.monotonic()}",
        Type="instant",
        TargetCapacitySpecification={"TotalTargetCapacity": capacity, "DefaultTargetCapacityType": market},
        LaunchTemplateConfigs=[
            {
                "LaunchTemplateSpecification": {"LaunchTemplateId": template_id, "Version": "$Latest"},
                "Overrides": [{"InstanceType": "g5.xlarge", "SubnetId": subnet}],
            }
        ],
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )
    return [i for launched in response["Instances"] for i in launched["InstanceIds"]]


@pytest.fixture
def player(aws, tmp_path):
    handled: list[dict] = []
    lines: list[str] = []
    delivery = EventDelivery(rules=[state_rule()], handler=handled.append, say=lines.append, retry_seconds=0)
    played = InstancePlayer(aws_env=aws.env, folder=tmp_path / "instances", events=delivery, say=lines.append)
    played.handled, played.lines = handled, lines  # type: ignore[attr-defined]
    yield played
    played.stop_all()


def states_of(handled: list[dict], instance_id: str) -> list[str]:
    return [e["detail"]["state"] for e in handled if e["detail"].get("instance-id") == instance_id]


def wait_for(predicate, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_one_fleet_of_two_plays_two_instances_each_with_its_own_address_and_imds(aws, template, player):
    ids = fleet(aws, template, run="two-nodes", capacity=2)
    assert len(ids) == 2
    player.tick()

    described = {
        i["InstanceId"]: i["PrivateIpAddress"]
        for r in aws_client("ec2", aws.env).describe_instances(InstanceIds=ids)["Reservations"]
        for i in r["Instances"]
    }
    boxes = {i: player.instances[i].box for i in ids}
    for instance_id, box in boxes.items():
        wait_for((box.root / "local-ipv4").exists)
        assert box.address == described[instance_id], "IMDS local-ipv4 is DescribeInstances' PrivateIpAddress"
        assert (box.root / "local-ipv4").read_text() == box.address
        assert box.imds.url.startswith(f"http://{box.address}:"), "its IMDS listens on its own address"
    assert len(set(described.values())) == 2 and all(a.startswith("127.77.") for a in described.values())
    assert [states_of(player.handled, i) for i in ids] == [["running"], ["running"]]


def test_a_terminated_instance_announces_shutting_down_then_terminated_only_after_its_agent_exited(
    aws, template, player
):
    [instance_id] = fleet(aws, template, run="terminated")
    player.tick()
    box = player.instances[instance_id].box
    wait_for((box.root / "local-ipv4").exists)

    aws_client("ec2", aws.env).terminate_instances(InstanceIds=[instance_id])
    player.tick()  # EC2 ended it: the agent gets its SIGTERM, nothing announced yet
    assert player.shutting_down()
    wait_for(lambda: not player.instances[instance_id].agent_running)
    player.tick()

    assert (box.root / "final-upload").read_text() == "uploaded\n"
    assert states_of(player.handled, instance_id) == ["running", "shutting-down", "terminated"]
    assert not player.shutting_down()


def test_pending_to_terminated_between_two_ticks_still_announces_its_states_in_order(aws, template, player):
    [instance_id] = fleet(aws, template, run="never-seen-running")
    aws_client("ec2", aws.env).terminate_instances(InstanceIds=[instance_id])
    player.tick()

    assert states_of(player.handled, instance_id) == ["shutting-down", "terminated"]
    assert player.instances[instance_id].box is None, "an instance already ended is not played"


def test_a_stopped_instance_announces_stopping_then_stopped(aws, template, player):
    [instance_id] = fleet(aws, template, run="stopped", market="on-demand")
    player.tick()
    aws_client("ec2", aws.env).stop_instances(InstanceIds=[instance_id])
    wait_for(lambda: (player.tick(), player.instances[instance_id].done)[1])

    assert states_of(player.handled, instance_id) == ["running", "stopping", "stopped"]


def test_local_interrupt_of_an_on_demand_instance_is_refused_in_one_line(aws, template, player):
    [instance_id] = fleet(aws, template, run="on-demand-run", market="on-demand")
    player.tick()

    answer = player.interrupt("on-demand-run")

    assert answer == {
        "ok": False,
        "message": f"{instance_id} (run on-demand-run, attempt 1) is an on-demand instance: AWS sends spot "
        "interruption notices only to spot instances; `local interrupt` takes a run on spot",
    }
    assert player.instances[instance_id].reclaim_at is None, "nothing was sent"


def test_local_interrupt_of_a_spot_instance_reaches_its_imds(aws, template, player):
    [instance_id] = fleet(aws, template, run="spot-run")
    player.tick()
    box = player.instances[instance_id].box

    answer = player.interrupt("spot-run")

    assert answer["ok"] and f"spot interruption notice sent to {instance_id}" in answer["message"]
    token = urllib.request.urlopen(  # noqa: S310 - the instance's loopback IMDS
        urllib.request.Request(
            f"{box.imds.url}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "9"}
        )
    ).read()
    notice = urllib.request.urlopen(  # noqa: S310
        urllib.request.Request(
            f"{box.imds.url}/latest/meta-data/spot/instance-action",
            headers={"X-aws-ec2-metadata-token": token.decode()},
        )
    ).read()
    assert json.loads(notice)["action"] == "terminate"


def test_create_fleet_with_a_client_token_already_used_returns_the_first_fleet_and_starts_nothing_more(aws, template):
    first = fleet(aws, template, run="token", capacity=2, token="claim-of-attempt-1")
    again = fleet(aws, template, run="token", capacity=2, token="claim-of-attempt-1")
    other = fleet(aws, template, run="token", capacity=1, token="claim-of-attempt-2")

    assert again == first and len(first) == 2
    assert len(other) == 1 and other[0] not in first
    running = aws_client("ec2", aws.env).describe_instances(
        Filters=[{"Name": f"tag:{naming.TAG_RUN_ID}", "Values": ["token"]}]
    )["Reservations"]
    assert sorted(i["InstanceId"] for r in running for i in r["Instances"]) == sorted(first + other)


def test_local_interrupt_of_one_gang_node_reaches_only_that_nodes_instance(aws, template, player):
    ids = fleet(aws, template, run="gang-run", capacity=2)
    ec2 = aws_client("ec2", aws.env)
    for node, instance_id in enumerate(ids):  # what the supervisor tags once the fleet returned
        ec2.create_tags(Resources=[instance_id], Tags=[{"Key": naming.TAG_NODE, "Value": str(node)}])
    player.tick()

    answer = player.interrupt("gang-run", node=1)

    assert answer["ok"] and ids[1] in answer["message"] and ids[0] not in answer["message"]
    assert player.instances[ids[1]].reclaim_at is not None and player.instances[ids[0]].reclaim_at is None
    refused = player.interrupt("gang-run", node=2)
    assert not refused["ok"] and refused["message"].startswith("run gang-run has no live node 2 here (live: ")
