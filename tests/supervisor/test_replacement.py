"""A replacement on the spot notice: the next attempt starts while the warned box saves (moto: the supervisor's
decisions, EventBridge's exact warning event handed to its handler)."""

from __future__ import annotations

from datetime import timedelta

from tests.supervisor.conftest import START, event, start
from training_infra.local.events import ec2_event
from training_infra.supervisor.runtime.replacement import REPLACES_TAG, UNTIL_TAG
from training_infra.supervisor.runtime.supervisor import SPOT_WARNING, STATE_CHANGE

from .conftest import REGION


def _warn(account, instance_id: str) -> dict:
    action = {"instance-action": "terminate"}
    warning = ec2_event(SPOT_WARNING, instance_id, region=REGION, time=account.clock(), **action)
    return account.supervisor().handle(warning)


def _described(account, instance_id: str) -> dict:
    return account.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def _tags(account, instance_id: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in _described(account, instance_id)["Tags"]}


def test_the_spot_notice_starts_the_next_attempt_at_once_on_another_pool_while_the_old_box_runs(account):
    first = start(account).attempts[0]
    account.supervisor().handle(event(STATE_CHANGE, first.instance_id, state="running"))
    account.clock.advance(minutes=30)
    answer = _warn(account, first.instance_id)

    run = account.run()
    old, new = run.attempts
    assert answer["replaces"] == 1 and answer["launched"] == new.instance_id
    assert _described(account, first.instance_id)["State"]["Name"] == "running", "the old box is left to save"
    assert old.end_reason == "reclaimed" and old.ended_at == "2026-11-29T08:32:00Z", "the notice's end"
    assert (new.instance_type, new.zone) != (old.instance_type, old.zone), "the warned pool cools down"
    tags = _tags(account, new.instance_id)
    assert new.replaces == 1 and tags[REPLACES_TAG] == "1", "its agent waits for attempt 1"
    assert tags[UNTIL_TAG] == "2026-11-29T08:32:30Z", "at most until the old box's end plus EC2's shutdown margin"
    assert run.errors_used == 0


def test_the_overlap_of_the_two_boxes_is_in_the_runs_cost(account):
    first = start(account).attempts[0]
    account.clock.advance(minutes=30)
    _warn(account, first.instance_id)
    old, new = account.run().attempts
    assert old.priced and old.cost_usd is not None, "priced at once, up to the notice's end"
    run_seconds = (timedelta(minutes=32)).total_seconds()
    assert old.hourly_usd and abs(old.cost_usd - old.hourly_usd * run_seconds / 3600) < 1e-6, (
        "32 minutes: the 30 it trained plus the two-minute overlap with attempt 2"
    )


def test_the_same_warning_twice_or_the_old_box_ending_starts_one_replacement(account):
    first = start(account).attempts[0]
    _warn(account, first.instance_id)
    _warn(account, first.instance_id)
    account.end_instance(first.instance_id)
    account.supervisor().handle(event(STATE_CHANGE, first.instance_id, state="terminated"))
    account.clock.advance(minutes=1)
    account.supervisor().reconcile_all()
    assert len(account.run().attempts) == 2 and len(account.instances_of("bert")) == 2


def test_no_replacement_for_an_on_demand_attempt_or_a_run_being_stopped(account):
    first = start(account, market="on-demand").attempts[0]
    assert "replaces" not in _warn(account, first.instance_id)
    assert len(account.run().attempts) == 1

    account.new_run("ernie")
    account.supervisor().reconcile("ernie")
    account.supervisor().request_stop("ernie")
    warned = account.run("ernie").attempts[0]
    assert "replaces" not in _warn(account, warned.instance_id)
    assert len(account.run("ernie").attempts) == 1


def test_a_replacement_the_deadline_has_no_room_for_ends_the_run_deadline(account):
    first = start(account, max_runtime_hours=1).attempts[0]
    account.clock.now = START + timedelta(minutes=55)
    _warn(account, first.instance_id)
    run = account.run()
    assert run.state == "deadline" and len(run.attempts) == 1
