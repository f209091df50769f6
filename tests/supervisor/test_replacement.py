"""A replacement on the spot notice: the next attempt starts while the warned box saves (moto: the supervisor's
decisions, EventBridge's exact warning event handed to its handler)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.supervisor.conftest import START, event, start
from tests.supervisor.test_supervisor import FleetWithErrors
from training_infra.local.events import ec2_event
from training_infra.supervisor.runtime.replacement import REPLACES_TAG, UNTIL_TAG
from training_infra.supervisor.runtime.supervisor import SPOT_WARNING, STATE_CHANGE

from .conftest import REGION


def _warn(account, instance_id: str, ec2=None, action: str = "terminate") -> dict:
    action = {"instance-action": action}
    warning = ec2_event(SPOT_WARNING, instance_id, region=REGION, time=account.clock(), **action)
    return account.supervisor(ec2=ec2).handle(warning)


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


# --- the old box still saves: any later attempt waits for it (issue 28's review, finding 1) ---------------------


def test_a_replacement_that_found_no_capacity_leaves_the_next_try_waiting_for_the_old_box(account):
    first = start(account).attempts[0]
    account.clock.advance(minutes=30)  # warned 08:30: the old box saves until 08:32, gone by 08:32:30
    no_capacity = FleetWithErrors(account.ec2, failing_markets={"spot"})
    _warn(account, first.instance_id, ec2=no_capacity)
    assert account.run().attempts[1].end_reason == "capacity", "the replacement on the notice found no capacity"
    account.clock.advance(minutes=1)  # 08:31: the next try launches while attempt 1 still saves
    account.supervisor().reconcile("bert")
    launched = account.run().current
    assert launched is not None and launched.instance_id
    tags = _tags(account, launched.instance_id)
    assert tags.get(REPLACES_TAG) == "1", "its agent must wait for attempt 1's final checkpoint"
    assert tags.get(UNTIL_TAG) == "2026-11-29T08:32:30Z"
    assert launched.replaces == 1, "the record says which attempt it waits for"


def test_a_replacement_that_died_early_leaves_the_next_attempt_waiting_for_the_old_box(account):
    first = start(account, max_restarts_on_errors=2).attempts[0]
    account.clock.advance(minutes=30)
    _warn(account, first.instance_id)
    replacement = account.run().attempts[1]
    account.clock.advance(seconds=40)  # 08:30:40: the replacement's box is gone (no status.json), attempt 1 saves
    account.end_instance(replacement.instance_id)
    account.supervisor().handle(event(STATE_CHANGE, replacement.instance_id, state="terminated"))
    run = account.run()
    third = run.attempts[2]
    assert third.instance_id and run.attempts[1].ended_at, "attempt 2 ended, attempt 3 launched at 08:30:40"
    tags = _tags(account, third.instance_id)
    assert tags.get(REPLACES_TAG) == "1" and tags.get(UNTIL_TAG) == "2026-11-29T08:32:30Z"


def test_an_attempt_launched_after_the_old_box_must_be_gone_waits_for_nothing(account):
    first = start(account).attempts[0]
    account.clock.advance(minutes=30)
    no_capacity = FleetWithErrors(account.ec2, failing_markets={"spot"})
    _warn(account, first.instance_id, ec2=no_capacity)
    account.clock.advance(minutes=2, seconds=31)  # 08:32:31: past the notice's end and EC2's shutdown margin
    account.supervisor().reconcile("bert")
    launched = account.run().current
    assert launched is not None and launched.instance_id
    tags = _tags(account, launched.instance_id)
    assert REPLACES_TAG not in tags and UNTIL_TAG not in tags and launched.replaces == 0


@pytest.mark.parametrize("action", ["stop", "hibernate"])
def test_a_stop_or_hibernate_notice_starts_no_second_trainer_and_the_stopped_box_is_ended_then_replaced(
    account, action
):
    first = start(account).attempts[0]
    account.clock.advance(minutes=30)
    answer = _warn(account, first.instance_id, action=action)
    run = account.run()
    assert "replaces" not in answer and len(run.attempts) == 1 and run.current is not None
    assert run.current.reclaim_warned_at, "the notice is noted: the attempt's end counts as AWS's, not an error"
    account.ec2.stop_instances(InstanceIds=[first.instance_id])  # EC2 stops it at the notice's end
    account.clock.advance(minutes=3)
    account.supervisor().reconcile("bert")
    run = account.run()
    assert _described(account, first.instance_id)["State"]["Name"] in ("shutting-down", "terminated")
    assert run.attempts[0].end_reason == "reclaimed" and len(run.attempts) == 2 and run.current.instance_id
    assert run.attempts[0].ended_at == "2026-11-29T08:33:00Z", "ended when seen stopped, not at the notice"


def test_a_replaced_box_ec2_has_not_taken_by_its_notice_end_and_margin_is_terminated(account):
    first = start(account).attempts[0]
    account.clock.advance(minutes=30)
    _warn(account, first.instance_id)  # the notice ends 08:32; EC2 has it down by 08:32:30
    account.clock.advance(minutes=2, seconds=20)  # 08:32:20: inside the margin, left alone
    account.supervisor().reconcile("bert")
    assert _described(account, first.instance_id)["State"]["Name"] == "running"
    account.clock.advance(seconds=40)  # 08:33:00: EC2 has not taken it; the handover no longer waits for it
    account.supervisor().reconcile("bert")
    run = account.run()
    assert _described(account, first.instance_id)["State"]["Name"] in ("shutting-down", "terminated")
    assert run.attempts[0].terminated_at == "2026-11-29T08:33:00Z"
    assert _described(account, run.attempts[1].instance_id)["State"]["Name"] == "running", "the replacement runs on"


def test_a_second_notice_inside_the_window_makes_the_next_attempt_wait_for_both_earlier_boxes(account):
    first = start(account).attempts[0]
    account.clock.advance(minutes=30)
    _warn(account, first.instance_id)  # 08:30:00: attempt 1 saves until 08:32:00 (+30 s)
    second = account.run().attempts[1]
    account.clock.advance(seconds=30)
    _warn(account, second.instance_id)  # 08:30:30: attempt 2, still in its handover wait, warned too
    third = account.run().attempts[2]
    assert third.instance_id
    tags = _tags(account, third.instance_id)
    assert tags[REPLACES_TAG] == "1,2", "attempt 1 may still write the checkpoint: its agent waits for both"
    assert tags[UNTIL_TAG] == "2026-11-29T08:33:00Z", "until the latest notice's end plus EC2's shutdown margin"
    assert third.replaces == 2


class ShuttingDown:
    """The account's EC2 client, but the boxes named are still `shutting-down` (moto ends a terminate at once; on
    AWS the OS shutdown runs the agent's SIGTERM finalize, its final checkpoint sync, in that state)."""

    def __init__(self, ec2, instance_ids: set[str]) -> None:
        self._ec2, self.ids = ec2, instance_ids

    def __getattr__(self, name):
        return getattr(self._ec2, name)

    def describe_instances(self, **request):
        answer = self._ec2.describe_instances(**request)
        for reservation in answer["Reservations"]:
            for instance in reservation["Instances"]:
                if instance["InstanceId"] in self.ids and instance["State"]["Name"] == "terminated":
                    instance["State"] = {"Code": 32, "Name": "shutting-down"}
        return answer


def test_a_box_the_supervisor_terminated_is_replaced_only_once_ec2_reports_it_terminated(account):
    from tests.supervisor.conftest import agent_metric
    from training_infra.supervisor.runtime.supervisor import SCHEDULED

    first = start(account, stall_seconds=600, max_restarts_on_errors=1).attempts[0]
    account.clock.advance(minutes=30)
    agent_metric(account, "Progress", ("RunId", "bert"), 16)
    shutting = ShuttingDown(account.ec2, set())
    account.supervisor(ec2=shutting).handle(event(SCHEDULED))  # 08:30: stalled, terminated by the supervisor
    shutting.ids.add(first.instance_id)
    assert account.run().attempts[0].unhealthy and len(account.run().attempts) == 1
    for _ in range(3):  # its agent's SIGTERM finalize may sync the final checkpoint for minutes: no second trainer
        account.clock.advance(minutes=1)
        account.supervisor(ec2=shutting).handle(event(STATE_CHANGE, first.instance_id, state="shutting-down"))
        account.supervisor(ec2=shutting).handle(event(SCHEDULED))
        assert len(account.run().attempts) == 1, "no relaunch while the old box is shutting down"
    account.supervisor().handle(event(STATE_CHANGE, first.instance_id, state="terminated"))  # EC2 powered it off
    run = account.run()
    old, new = run.attempts
    assert old.end_reason == "stalled" and new.instance_id, "relaunched once terminated"
    assert REPLACES_TAG not in _tags(account, new.instance_id), "a powered-off box writes nothing: no wait"


def test_a_box_shutting_down_whose_agent_already_wrote_its_status_is_replaced_at_once(account):
    """status.json is the agent's last write (after the final sync and the outputs): nothing to wait for then, and a
    box stuck shutting down for hours does not hold the run."""
    from training_infra.supervisor.runtime.supervisor import SCHEDULED

    first = start(account, max_restarts_on_errors=1).attempts[0]
    account.clock.advance(minutes=30)
    account.agent_wrote("bert", 1, "failed", exit_code=1)
    account.end_instance(first.instance_id)  # its agent powered off; EC2 still says shutting-down below
    shutting = ShuttingDown(account.ec2, {first.instance_id})
    account.supervisor(ec2=shutting).handle(event(STATE_CHANGE, first.instance_id, state="shutting-down"))
    account.supervisor(ec2=shutting).handle(event(SCHEDULED))
    old, new = account.run().attempts
    assert old.end_reason == "failed" and new.instance_id, "relaunched while EC2 still shows it shutting down"
    assert REPLACES_TAG not in _tags(account, new.instance_id), "its agent has finished writing: no wait"


def test_a_box_that_outlived_its_notice_is_priced_up_to_when_it_was_terminated(account):
    first = start(account).attempts[0]
    account.clock.advance(minutes=30)
    _warn(account, first.instance_id)
    priced = account.run().attempts[0]
    assert abs(priced.cost_usd / priced.hourly_usd * 60 - 32) < 1e-6, "32 minutes: up to the notice's end"
    account.clock.advance(minutes=3)  # 08:33:00: EC2 has not taken it; the reconcile terminates it now
    account.supervisor().reconcile("bert")
    old = account.run().attempts[0]
    assert old.terminated_at == "2026-11-29T08:33:00Z" and old.ended_at == "2026-11-29T08:32:00Z"
    assert abs(old.cost_usd / old.hourly_usd * 60 - 33) < 1e-6, "33 minutes: it ran a minute past its notice"


class CallFails:
    """The account's EC2 client, but one call (`describe_instances`, `terminate_instances`) on the boxes named
    answers a 5xx."""

    def __init__(self, ec2, call: str, instance_ids: set[str]) -> None:
        self._ec2, self.call, self.ids = ec2, call, instance_ids

    def __getattr__(self, name):
        real = getattr(self._ec2, name)
        if name != self.call:
            return real

        def failing(**request):
            from botocore.exceptions import ClientError

            if set(request.get("InstanceIds", [])) & self.ids:
                raise ClientError({"Error": {"Code": "InternalError", "Message": "try again"}}, name)
            return real(**request)

        return failing


@pytest.mark.parametrize("call", ["describe_instances", "terminate_instances"])
def test_a_failed_look_or_terminate_of_a_box_that_outlived_its_notice_fails_not_the_runs_reconcile(account, call):
    first = start(account).attempts[0]
    account.clock.advance(minutes=30)
    _warn(account, first.instance_id)
    account.clock.advance(minutes=3)
    answer = account.supervisor(ec2=CallFails(account.ec2, call, {first.instance_id})).reconcile("bert")
    assert answer["state"] == "running" and not account.run().attempts[0].terminated_at, "the run went on"
    account.clock.advance(minutes=1)
    account.supervisor().reconcile("bert")  # the next minute tries again
    assert account.run().attempts[0].terminated_at == "2026-11-29T08:34:00Z"


class StateAs(ShuttingDown):
    """The account's EC2 client, but the boxes named show the given state whatever moto holds."""

    def __init__(self, ec2, states: dict[str, str]) -> None:
        super().__init__(ec2, set(states))
        self.states = states

    def describe_instances(self, **request):
        answer = self._ec2.describe_instances(**request)
        for reservation in answer["Reservations"]:
            for instance in reservation["Instances"]:
                if instance["InstanceId"] in self.states:
                    instance["State"] = {"Code": 64, "Name": self.states[instance["InstanceId"]]}
        return answer


def test_a_box_seen_stopping_is_terminated_and_replaced_only_once_ec2_reports_it_terminated(account):
    first = start(account, max_restarts_on_errors=1).attempts[0]
    account.clock.advance(minutes=30)
    account.supervisor(ec2=StateAs(account.ec2, {first.instance_id: "stopping"})).reconcile("bert")
    assert _described(account, first.instance_id)["State"]["Name"] in ("shutting-down", "terminated"), "terminated"
    assert len(account.run().attempts) == 1, "still powered while stopping: its agent may sync; no second trainer"
    account.clock.advance(minutes=1)
    account.supervisor().reconcile("bert")  # EC2 reports it terminated
    assert len(account.run().attempts) == 2 and account.run().attempts[1].instance_id
