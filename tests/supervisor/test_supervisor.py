"""The supervisor's decisions against moto, with the exact event shapes EventBridge delivers.

moto runs no Lambda and delivers no events, so each test calls the real handler logic in-process;
per-pool capacity errors, which moto's fleets never return, are injected in the response shape
CreateFleet documents (`Errors` with `LaunchTemplateAndOverrides`, `Lifecycle`, `ErrorCode`).
"""

from __future__ import annotations

import dataclasses

import pytest
from botocore.exceptions import ClientError

from tests.supervisor.conftest import agent_metric, event, start
from training_infra.supervisor.runtime.records import (
    Attempt,
    AttemptEnd,
    MonthlyLedger,
    RunState,
    RunStore,
    StaleRecord,
    parse_iso,
)
from training_infra.supervisor.runtime.supervisor import (
    REBALANCE,
    SCHEDULED,
    SPOT_WARNING,
    STATE_CHANGE,
    SupervisorError,
)


def reclaim(account, instance_id):
    """AWS's two-minute warning, then the instance goes away."""
    account.supervisor().handle(event(SPOT_WARNING, instance_id, **{"instance-action": "terminate"}))
    account.end_instance(instance_id)
    return account.supervisor().handle(event(STATE_CHANGE, instance_id, state="terminated"))


class FleetWithErrors:
    """The account's EC2 client, but CreateFleet answers with per-pool errors for some markets."""

    def __init__(self, ec2, failing_markets: set[str], code: str = "InsufficientInstanceCapacity") -> None:
        self._ec2, self.failing, self.code, self.requests = ec2, failing_markets, code, []

    def __getattr__(self, name):
        return getattr(self._ec2, name)

    def create_fleet(self, **request):
        self.requests.append(request)
        market = request["TargetCapacitySpecification"]["DefaultTargetCapacityType"]
        if market not in self.failing:
            return self._ec2.create_fleet(**request)
        template = request["LaunchTemplateConfigs"][0]
        errors = [
            {
                "LaunchTemplateAndOverrides": {
                    "LaunchTemplateSpecification": template["LaunchTemplateSpecification"],
                    "Overrides": override,
                },
                "Lifecycle": market,
                "ErrorCode": self.code,
                "ErrorMessage": (
                    f"We currently do not have sufficient {override['InstanceType']} capacity "
                    "in the Availability Zone you requested."
                ),
            }
            for override in template["Overrides"]
        ]
        return {"FleetId": "fleet-0123", "Errors": errors, "Instances": []}


# --- launching ------------------------------------------------------------------------------------


def test_first_launch_asks_one_instant_fleet_for_every_type_in_every_zone(account):
    fleet = FleetWithErrors(account.ec2, failing_markets=set())
    account.new_run()
    account.supervisor(ec2=fleet).reconcile("bert")
    (request,) = fleet.requests
    assert request["Type"] == "instant"
    assert request["TargetCapacitySpecification"] == {"TotalTargetCapacity": 1, "DefaultTargetCapacityType": "spot"}
    assert request["SpotOptions"] == {"AllocationStrategy": "price-capacity-optimized"}
    overrides = {(o["InstanceType"], o["SubnetId"]) for o in request["LaunchTemplateConfigs"][0]["Overrides"]}
    assert overrides == {(t, s) for t in ("g5.xlarge", "g6.xlarge") for s in account.subnets.values()}
    run = account.run()
    assert run.state == "launching" and run.attempts[0].instance_id


def test_every_attempt_carries_the_runs_one_deadline_and_its_number_as_tags(account):
    run = start(account)
    (instance,) = account.instances_of("bert")
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["training-infra:managed"] == "true"
    assert tags["training-infra:attempt"] == "1"
    assert tags["training-infra:deadline"] == run.deadline_at
    reclaim(account, instance["InstanceId"])
    second = account.run().attempts[1]
    tags = {
        t["Key"]: t["Value"]
        for t in account.ec2.describe_instances(InstanceIds=[second.instance_id])["Reservations"][0]["Instances"][0][
            "Tags"
        ]
    }
    assert tags["training-infra:attempt"] == "2"
    assert tags["training-infra:deadline"] == run.deadline_at, "one absolute deadline across attempts"


def test_instance_running_moves_the_run_to_running(account):
    run = start(account)
    account.supervisor().handle(event(STATE_CHANGE, run.attempts[0].instance_id, state="running"))
    assert account.run().state == "running"


# --- classification --------------------------------------------------------------------------------


def test_reclaimed_attempt_is_relaunched_on_another_pool_without_spending_the_error_budget(account):
    first = start(account).attempts[0]
    account.clock.advance(minutes=30)
    reclaim(account, first.instance_id)
    run = account.run()
    assert [a.end_reason for a in run.attempts] == ["reclaimed", None]
    assert run.errors_used == 0
    second = run.attempts[1]
    assert (second.instance_type, second.zone) != (first.instance_type, first.zone)
    assert run.state == "running", "started on the spot notice: already running when the old box ends"
    assert any("relaunched as attempt 2" in n and "spot interruption notice" in n for n in account.notices())


class Vanished:
    """The account's EC2 client, but some instances are unknown to DescribeInstances (gone, or not listed yet)."""

    def __init__(self, ec2, missing: set[str]) -> None:
        self._ec2, self.missing = ec2, missing

    def __getattr__(self, name):
        return getattr(self._ec2, name)

    def describe_instances(self, **kwargs):
        if set(kwargs.get("InstanceIds", [])) & self.missing:
            raise ClientError(
                {"Error": {"Code": "InvalidInstanceID.NotFound", "Message": "not found"}}, "DescribeInstances"
            )
        return self._ec2.describe_instances(**kwargs)


def test_an_instance_that_vanished_without_a_status_counts_as_reclaimed(account):
    first = start(account).attempts[0]
    account.end_instance(first.instance_id)
    account.clock.advance(minutes=10)
    account.supervisor(ec2=Vanished(account.ec2, {first.instance_id})).handle(event(SCHEDULED))
    run = account.run()
    assert run.attempts[0].end_reason == "reclaimed"
    assert len(run.attempts) == 2 and run.errors_used == 0


def test_an_instance_just_launched_and_not_listed_yet_is_not_taken_for_gone(account):
    """EC2 lists a new instance with a delay: right after the launch, NotFound means 'not yet', not 'reclaimed'."""
    first = start(account).attempts[0]
    account.supervisor(ec2=Vanished(account.ec2, {first.instance_id})).handle(event(SCHEDULED))
    run = account.run()
    assert len(run.attempts) == 1 and not run.attempts[0].ended_at
    assert len(account.instances_of("bert")) == 1


def test_an_instance_shut_down_from_inside_without_a_status_is_an_error_not_a_reclaim(account):
    """No status.json and a Client.* reason (a failed boot, a manual terminate): relaunching it forever burns money."""
    first = start(account).attempts[0]
    account.end_instance(first.instance_id)  # moto: Client.UserInitiatedShutdown
    account.supervisor().handle(event(STATE_CHANGE, first.instance_id, state="terminated"))
    run = account.run()
    assert run.state == "failed" and run.attempts[0].end_reason == "failed"
    assert "Client.UserInitiatedShutdown" in run.attempts[0].message


def test_trainer_failure_without_restarts_left_fails_the_run_and_launches_nothing(account):
    first = start(account).attempts[0]
    account.agent_wrote("bert", 1, "failed", exit_code=3)
    account.end_instance(first.instance_id)
    account.supervisor().handle(event(STATE_CHANGE, first.instance_id, state="terminated"))
    run = account.run()
    assert run.state == "failed"
    assert run.attempts[0].message == "trainer failed with exit 3"
    assert len(account.instances_of("bert")) == 1
    assert any("gave up: failed" in n and "no restarts on errors left (0 of 0 used)" in n for n in account.notices())


def test_trainer_failure_with_restarts_left_relaunches_and_counts_it(account):
    first = start(account, max_restarts_on_errors=1).attempts[0]
    account.agent_wrote("bert", 1, "failed", exit_code=1)
    account.end_instance(first.instance_id)
    account.supervisor().reconcile("bert")
    run = account.run()
    assert run.errors_used == 1 and len(run.attempts) == 2 and run.state == "recovering"
    account.agent_wrote("bert", 2, "failed", exit_code=1)
    account.end_instance(run.attempts[1].instance_id)
    account.supervisor().reconcile("bert")
    assert account.run().state == "failed", "the second failure has no restart left"


def test_stalled_attempt_is_an_error(account):
    first = start(account).attempts[0]
    account.agent_wrote("bert", 1, "stalled")
    account.end_instance(first.instance_id)
    account.supervisor().reconcile("bert")
    assert account.run().state == "stalled"


@pytest.mark.parametrize("outcome", ["succeeded", "idle", "deadline"])
def test_succeeded_idle_and_deadline_end_the_run_and_delete_its_launch_template(account, outcome):
    first = start(account).attempts[0]
    account.agent_wrote("bert", 1, outcome, exit_code=0 if outcome == "succeeded" else None)
    account.end_instance(first.instance_id)
    account.supervisor().reconcile("bert")
    run = account.run()
    assert run.state == outcome and not run.active
    templates = account.ec2.describe_launch_templates()["LaunchTemplates"]
    assert account.template_id not in {t["LaunchTemplateId"] for t in templates}
    assert len(account.instances_of("bert")) == 1


def test_no_relaunch_when_the_time_left_is_too_short_to_be_useful(account):
    first = start(account, max_runtime_hours=1).attempts[0]
    account.clock.advance(minutes=50)  # 10 min left < boot (10 min) + one checkpoint interval (5 min)
    reclaim(account, first.instance_id)
    run = account.run()
    assert run.state == "deadline" and len(run.attempts) == 1
    assert "too little for another attempt" in run.message


def test_a_stopped_instance_is_terminated_so_its_volume_stops_billing(account):
    first = start(account).attempts[0]
    account.ec2.stop_instances(InstanceIds=[first.instance_id])
    account.agent_wrote("bert", 1, "succeeded", exit_code=0)
    account.supervisor().reconcile("bert")
    (instance,) = account.instances_of("bert")
    assert instance["State"]["Name"] in ("shutting-down", "terminated")
    assert account.run().state == "succeeded"


# --- pools ----------------------------------------------------------------------------------------


def test_reclaimed_pool_cools_down_then_is_offered_again(account):
    fleet = FleetWithErrors(account.ec2, failing_markets=set())
    account.new_run(instance_types=["g5.xlarge"])
    supervisor = account.supervisor(ec2=fleet)
    supervisor.reconcile("bert")
    first = account.run().attempts[0]
    supervisor.handle(event(SPOT_WARNING, first.instance_id, **{"instance-action": "terminate"}))
    account.end_instance(first.instance_id)
    supervisor.reconcile("bert")
    reclaimed_subnet = account.subnets[first.zone]
    offered = {o["SubnetId"] for o in fleet.requests[-1]["LaunchTemplateConfigs"][0]["Overrides"]}
    assert reclaimed_subnet not in offered, "the pool just reclaimed is not offered to attempt 2"
    second = account.run().attempts[1]
    account.clock.advance(minutes=31)
    supervisor.handle(event(SPOT_WARNING, second.instance_id, **{"instance-action": "terminate"}))
    account.end_instance(second.instance_id)
    supervisor.reconcile("bert")
    offered = {o["SubnetId"] for o in fleet.requests[-1]["LaunchTemplateConfigs"][0]["Overrides"]}
    assert reclaimed_subnet in offered, "after its cooldown the first pool is offered again"


def test_capacity_errors_in_every_pool_keep_the_run_waiting_and_retrying(account):
    fleet = FleetWithErrors(account.ec2, failing_markets={"spot"})
    account.new_run()
    supervisor = account.supervisor(ec2=fleet)
    supervisor.reconcile("bert")
    account.clock.advance(minutes=1)
    supervisor.handle(event(SCHEDULED))
    run = account.run()
    assert run.active and run.state == "launching"
    (row,) = run.attempts
    assert row.end_reason == "capacity" and row.tries == 2
    assert "InsufficientInstanceCapacity in 4 pool(s)" in row.message
    assert len([n for n in account.notices() if "waiting for capacity" in n]) == 1, "one notice per streak"
    fleet.failing = set()
    account.clock.advance(minutes=1)
    supervisor.handle(event(SCHEDULED))
    run = account.run()
    assert run.attempts[-1].instance_id and run.attempts[-1].n == 2
    assert len({r["ClientToken"] for r in fleet.requests}) == 3, "each try is a new request, not a replay"


def test_spot_then_on_demand_falls_back_when_no_pool_has_spot_capacity(account):
    fleet = FleetWithErrors(account.ec2, failing_markets={"spot"})
    account.new_run(market="spot-then-on-demand")
    account.supervisor(ec2=fleet).reconcile("bert")
    markets = [r["TargetCapacitySpecification"]["DefaultTargetCapacityType"] for r in fleet.requests]
    assert markets == ["spot", "on-demand"]
    attempt = account.run().attempts[0]
    assert attempt.market == "on-demand" and attempt.instance_id


def test_on_demand_market_never_asks_for_spot(account):
    fleet = FleetWithErrors(account.ec2, failing_markets={"on-demand"})
    account.new_run(market="on-demand")
    account.supervisor(ec2=fleet).reconcile("bert")
    assert [r["TargetCapacitySpecification"]["DefaultTargetCapacityType"] for r in fleet.requests] == ["on-demand"]
    assert account.run().attempts[0].end_reason == "capacity"


# --- races and repeats -----------------------------------------------------------------------------


def test_the_same_event_twice_launches_one_instance(account):
    first = start(account).attempts[0]
    account.supervisor().handle(event(SPOT_WARNING, first.instance_id, **{"instance-action": "terminate"}))
    account.end_instance(first.instance_id)
    terminated = event(STATE_CHANGE, first.instance_id, state="terminated")
    account.supervisor().handle(terminated)
    account.supervisor().handle(terminated)
    assert len(account.instances_of("bert")) == 2
    assert len(account.run().attempts) == 2


def test_an_event_and_the_reconcile_at_once_launch_one_instance(account):
    """Decider A reads the run; decider B (the reconcile) relaunches; A's write then loses and A re-decides."""
    first = start(account).attempts[0]
    account.supervisor().handle(event(SPOT_WARNING, first.instance_id, **{"instance-action": "terminate"}))
    account.end_instance(first.instance_id)
    other = account.supervisor()

    class Interleaved(RunStore):
        raced = False

        def save(self, run):
            if not Interleaved.raced:
                Interleaved.raced = True
                other.handle(event(SCHEDULED))  # B runs to completion between A's read and A's write
            return super().save(run)

    decider = account.supervisor()
    decider.store = Interleaved(account.dynamodb, account.table)
    decider.handle(event(STATE_CHANGE, first.instance_id, state="terminated"))
    assert len(account.instances_of("bert")) == 2, "one instance for attempt 1, one for attempt 2"
    assert [a.n for a in account.run().attempts] == [1, 2]


def test_a_launch_that_died_before_recording_is_adopted_not_repeated(account):
    account.new_run()
    supervisor = account.supervisor()

    def crash_after_fleet(run):
        if run.current and run.current.instance_id:
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "PutItem")
        return RunStore.save(supervisor.store, run)

    supervisor.store.save = crash_after_fleet
    with pytest.raises(ClientError):
        supervisor.reconcile("bert")
    account.supervisor().reconcile("bert")
    (instance,) = account.instances_of("bert")
    assert account.run().attempts[0].instance_id == instance["InstanceId"]


class TemplateUnreadableFor:
    """EC2 that fails reading one launch template's versions (a throttled or broken call for that run only)."""

    def __init__(self, ec2, template_id: str) -> None:
        self._ec2, self._template_id = ec2, template_id

    def describe_launch_template_versions(self, **kwargs):
        if kwargs.get("LaunchTemplateId") == self._template_id:
            raise ClientError(
                {"Error": {"Code": "InternalError", "Message": "injected"}}, "DescribeLaunchTemplateVersions"
            )
        return self._ec2.describe_launch_template_versions(**kwargs)

    def __getattr__(self, name):
        return getattr(self._ec2, name)


def test_a_failed_reconcile_of_one_run_lets_the_others_proceed_and_then_raises(account):
    account.new_run("bert")
    account.new_run("gpt")
    ec2 = TemplateUnreadableFor(account.ec2, account.templates["gpt"])
    with pytest.raises(SupervisorError, match="gpt"):
        account.supervisor(ec2).handle(event(SCHEDULED))
    assert account.run("bert").attempts[0].instance_id


def test_a_stale_write_is_refused(account):
    account.new_run()
    store = RunStore(account.dynamodb, account.table)
    one, two = store.get("bert"), store.get("bert")
    store.save(one)
    with pytest.raises(StaleRecord):
        store.save(two)


# --- stop -----------------------------------------------------------------------------------------


def test_stop_tags_the_instance_then_terminates_after_the_grace_and_never_relaunches(account):
    first = start(account).attempts[0]
    supervisor = account.supervisor()
    supervisor.request_stop("bert")
    tags = {t["Key"]: t["Value"] for t in account.instances_of("bert")[0]["Tags"]}
    assert tags["training-infra:stop"] == "user", "the agent sees the stop request through IMDS tags"
    account.clock.advance(minutes=11)
    supervisor.reconcile("bert")
    assert account.instances_of("bert")[0]["State"]["Name"] in ("shutting-down", "terminated")
    supervisor.handle(event(STATE_CHANGE, first.instance_id, state="terminated"))
    run = account.run()
    assert run.state == "stopped" and len(run.attempts) == 1


def test_stop_during_recovery_ends_the_run_without_a_launch(account):
    fleet = FleetWithErrors(account.ec2, failing_markets={"spot"})
    account.new_run()
    supervisor = account.supervisor(ec2=fleet)
    supervisor.reconcile("bert")
    supervisor.request_stop("bert")
    fleet.failing = set()
    supervisor.handle(event(SCHEDULED))
    assert account.run().state == "stopped"
    assert account.instances_of("bert") == []


def test_events_for_unmanaged_instances_and_rebalances_change_nothing(account):
    other = account.ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    assert "ignored" in account.supervisor().handle(event(STATE_CHANGE, other, state="terminated"))
    run = start(account)
    account.supervisor().handle(event(REBALANCE, run.attempts[0].instance_id))
    after = account.run()
    assert after.attempts[0].rebalance_at and len(after.attempts) == 1


def test_a_launch_ec2_refuses_outright_fails_the_run_instead_of_retrying_forever(account):
    class Refusing(FleetWithErrors):
        def create_fleet(self, **request):
            raise ClientError(
                {"Error": {"Code": "InvalidParameterValue", "Message": "The AMI is not available"}}, "CreateFleet"
            )

    account.new_run()
    account.supervisor(ec2=Refusing(account.ec2, set())).reconcile("bert")
    run = account.run()
    assert run.state == "failed" and "InvalidParameterValue: The AMI is not available" in run.message
    assert run.attempts[0].end_reason == "launch-refused"


def test_throttling_is_waited_out_like_capacity(account):
    fleet = FleetWithErrors(account.ec2, failing_markets={"spot"}, code="RequestLimitExceeded")
    account.new_run()
    account.supervisor(ec2=fleet).reconcile("bert")
    assert account.run().active and account.run().attempts[0].end_reason == "capacity"


# --- the cloud-side health layer (issue 15): a box too hung to end itself -------------------------


class ImpairedStatus:
    """The account's EC2 client, but DescribeInstanceStatus says the checks fail (moto always says ok)."""

    def __init__(self, ec2) -> None:
        self._ec2 = ec2

    def __getattr__(self, name):
        return getattr(self._ec2, name)

    def describe_instance_status(self, InstanceIds):  # noqa: N803 - boto3's parameter name
        impaired = {"Status": "impaired", "Details": [{"Name": "reachability", "Status": "failed"}]}
        return {
            "InstanceStatuses": [
                {"InstanceId": i, "SystemStatus": {"Status": "ok"}, "InstanceStatus": impaired} for i in InstanceIds
            ]
        }


def test_failed_status_checks_for_three_minutes_end_the_attempt_and_the_run_relaunches_without_an_error(account):
    first = start(account).attempts[0]
    sick = account.supervisor(ec2=ImpairedStatus(account.ec2))
    sick.handle(event(SCHEDULED))
    assert account.run().attempts[0].impaired_since, "first seen, not yet acted on"
    assert account.instances_of("bert")[0]["State"]["Name"] == "running"
    account.clock.advance(minutes=4)
    sick.handle(event(SCHEDULED))
    assert account.ec2.describe_instances(InstanceIds=[first.instance_id])["Reservations"][0]["Instances"][0]["State"][
        "Name"
    ] in (
        "shutting-down",
        "terminated",
    )
    account.supervisor().handle(event(STATE_CHANGE, first.instance_id, state="terminated"))
    run = account.run()
    assert run.attempts[0].end_reason == "reclaimed" and "status checks impaired" in run.attempts[0].message
    assert run.errors_used == 0 and len(run.attempts) == 2
    assert any("is hung" in n for n in account.notices())


def _gpu_metric(account, instance_id: str, minutes_ago: float) -> None:
    agent_metric(account, "GPUUtilization", ("InstanceId", instance_id), minutes_ago, value=97.0)


def test_an_agent_that_went_silent_for_thirty_minutes_gets_its_box_terminated(account):
    first = start(account).attempts[0]
    account.clock.advance(minutes=70)
    _gpu_metric(account, first.instance_id, minutes_ago=45)  # heard once, then nothing for 45 min
    account.supervisor().handle(event(SCHEDULED))
    attempt = account.run().attempts[0]
    assert "GPU metric stopped" in attempt.unhealthy
    assert account.instances_of("bert")[0]["State"]["Name"] in ("shutting-down", "terminated")


def test_an_agent_still_publishing_or_never_heard_from_is_left_alone(account):
    first = start(account).attempts[0]
    account.clock.advance(minutes=70)
    _gpu_metric(account, first.instance_id, minutes_ago=2)
    account.supervisor().handle(event(SCHEDULED))
    assert not account.run().attempts[0].unhealthy
    # A CPU-only dry run publishes no GPU metric at all: silence without a first word is not a hang.
    account.new_run("cpu", instance_types=["c6i.xlarge"])
    account.supervisor().reconcile("cpu")
    account.clock.advance(minutes=70)
    account.supervisor().handle(event(SCHEDULED))
    assert not account.run("cpu").attempts[0].unhealthy


def test_stop_while_a_relaunch_was_starting_its_instance_stops_that_instance_too(account):
    """The fleet started attempt 2's instance, then `stop` won the record before the launch was written."""
    first = start(account).attempts[0]
    supervisor = account.supervisor()
    supervisor.handle(event(SPOT_WARNING, first.instance_id, **{"instance-action": "terminate"}))
    account.end_instance(first.instance_id)
    stopper = account.supervisor()

    class StopWinsTheRace(RunStore):
        def save(self, run):
            if run.current and run.current.instance_id and run.current.n == 2 and not run.stop_requested_at:
                stopper.request_stop("bert")  # lands between the fleet request and the record
            return super().save(run)

    supervisor.store = StopWinsTheRace(account.dynamodb, account.table)
    supervisor.reconcile("bert")
    account.supervisor().reconcile("bert")
    [second] = [i for i in account.instances_of("bert") if i["InstanceId"] != first.instance_id]
    tags = {t["Key"]: t["Value"] for t in second["Tags"]}
    assert tags.get("training-infra:stop") == "user", "the instance the stop raced with is told to stop"
    run = account.run()
    assert run.attempts[1].instance_id == second["InstanceId"] and run.state == "stopping"


def test_a_budget_stop_ends_the_run_budget_not_stopped(account):
    account.new_run("budget-run")
    supervisor = account.supervisor()
    supervisor.reconcile("budget-run")
    supervisor.request_stop("budget-run", reason="budget")
    instance = account.run("budget-run").attempts[0].instance_id
    account.agent_wrote("budget-run", 1, "budget")
    account.end_instance(instance)
    supervisor.reconcile("budget-run")
    assert account.run("budget-run").state == "budget"


# --- what an attempt cost ----------------------------------------------------------------------


def test_an_ended_attempt_is_priced_once_from_the_spot_history_and_keeps_its_figure(account):
    first = start(account).attempts[0]
    account.clock.advance(hours=2)
    account.agent_wrote("bert", 1, "succeeded", exit_code=0)
    account.end_instance(first.instance_id)
    account.supervisor().handle(event(SCHEDULED))

    ended = account.run().attempts[0]
    history = account.ec2.describe_spot_price_history(InstanceTypes=[first.instance_type], AvailabilityZone=first.zone)[
        "SpotPriceHistory"
    ]
    hours = (parse_iso(ended.ended_at) - parse_iso(ended.started_at)).total_seconds() / 3600
    assert ended.priced is True and ended.price_source == "spot history"
    assert ended.cost_usd == pytest.approx(float(history[0]["SpotPrice"]) * hours)


# --- dollar limits ---------------------------------------------------------------------------------

ONE_DOLLAR_AN_HOUR = {"market": "on-demand", "list_prices": {"g5.xlarge": 1.0, "g6.xlarge": 1.0}, "volume_gb": 0}


def test_a_run_about_to_pass_its_limit_is_stopped_gracefully_and_ends_budget_without_a_relaunch(account):
    """$1 limit at $1/hour: a graceful stop (10 min, $0.17) must still fit, so the stop comes at 50 min."""
    first = start(account, max_cost_usd=1.0, **ONE_DOLLAR_AN_HOUR).attempts[0]
    tags = lambda: {t["Key"]: t["Value"] for t in account.instances_of("bert")[0]["Tags"]}  # noqa: E731
    account.clock.advance(minutes=40)
    account.supervisor().handle(event(SCHEDULED))
    assert account.run().state == "running" and "training-infra:stop" not in tags()
    assert account.run().spent_usd == pytest.approx(40 / 60, abs=0.01)

    account.clock.advance(minutes=10)
    account.supervisor().handle(event(SCHEDULED))

    run = account.run()
    assert (run.state, run.stop_reason) == ("stopping", "budget")
    assert tags()["training-infra:stop"] == "budget", "the agent's graceful stop: checkpoint, outputs, logs"
    assert any("spent $0.83 of its $1.00 limit" in n and "stopping gracefully" in n for n in account.notices())
    account.agent_wrote("bert", 1, "budget")
    account.end_instance(first.instance_id)
    account.supervisor().handle(event(STATE_CHANGE, first.instance_id, state="terminated"))
    run = account.run()
    assert run.state == "budget" and len(run.attempts) == 1, "never relaunched past its limit"
    assert run.spent_usd == pytest.approx(50 / 60, abs=0.01)


def test_a_relaunch_that_could_not_stop_within_the_limit_ends_the_run_as_budget(account):
    first = start(account, max_cost_usd=1.0, **ONE_DOLLAR_AN_HOUR).attempts[0]
    account.clock.advance(minutes=45)  # $0.75 spent; boot, 5 min of work and a graceful stop: 25 min, $0.42
    reclaim(account, first.instance_id)  # before the per-minute check stopped it

    run = account.run()
    assert run.state == "budget" and len(run.attempts) == 1
    assert run.attempts[0].end_reason == "reclaimed"
    assert "spent $0.75 of its $1.00 limit: another attempt (boot, one checkpoint interval" in run.message


def test_a_finished_runs_month_reservation_becomes_what_it_spent(account):
    account.cfg = dataclasses.replace(account.cfg, monthly_limit_usd=50)
    month = MonthlyLedger.key(account.clock())
    supervisor = account.supervisor()
    supervisor.month_ledger().reserve(month, "bert", 12.0, "g5.xlarge for 12 h")
    first = start(account, budget_month=month, reserved_usd=12.0, **ONE_DOLLAR_AN_HOUR).attempts[0]
    assert supervisor.month_ledger().left(month) == (0.0, 12.0, 38.0)

    account.clock.advance(hours=2)
    account.agent_wrote("bert", 1, "succeeded", exit_code=0)
    account.end_instance(first.instance_id)
    account.supervisor().handle(event(SCHEDULED))

    assert account.run().state == "succeeded"
    assert supervisor.month_ledger().left(month) == (pytest.approx(2.0), 0.0, pytest.approx(48.0))


def test_a_month_reservation_left_by_a_failed_settle_is_swept_at_the_next_reconcile(account):
    account.cfg = dataclasses.replace(account.cfg, monthly_limit_usd=50)
    month = MonthlyLedger.key(account.clock())
    ledger = account.supervisor().month_ledger()
    ledger.reserve(month, "bert", 12.0, "test")
    run = account.new_run(budget_month=month, reserved_usd=12.0, **ONE_DOLLAR_AN_HOUR)
    run = account.run()
    run.state, run.spent_usd = RunState.FAILED, 3.0  # ended, but the settle never happened
    account.supervisor().store.save(run)

    account.supervisor().handle(event(SCHEDULED))

    assert ledger.left(month) == (3.0, 0.0, 47.0)


def test_a_resumed_runs_limit_and_month_count_only_what_it_spends_after_the_resume(account):
    """`launch --resume` records what the run had spent (settled in its month when it first ended)."""
    account.cfg = dataclasses.replace(account.cfg, monthly_limit_usd=50)
    month = MonthlyLedger.key(account.clock())
    supervisor = account.supervisor()
    supervisor.month_ledger().reserve(month, "bert", 2.0, "test")
    account.new_run(max_cost_usd=2.0, spent_before_usd=5.0, budget_month=month, **ONE_DOLLAR_AN_HOUR)
    run = account.run()
    earlier = Attempt(
        n=1,
        instance_id="i-0000000000000aaaa",
        started_at="2026-11-20T08:00:00Z",
        ended_at="2026-11-20T13:00:00Z",
        end_reason=AttemptEnd.SUCCEEDED,
        priced=True,
        cost_usd=5.0,
    )
    run.attempts, run.spent_usd = [earlier], 5.0
    account.supervisor().store.save(run)
    account.supervisor().reconcile("bert")
    first = account.run().attempts[1]
    account.clock.advance(minutes=30)
    account.supervisor().handle(event(SCHEDULED))
    assert account.run().state == "running", "$0.50 of this launch's $2, not the $5 spent before"

    account.agent_wrote("bert", 2, "succeeded", exit_code=0)
    account.end_instance(first.instance_id)
    account.supervisor().handle(event(SCHEDULED))

    assert supervisor.month_ledger().left(month) == (pytest.approx(0.5), 0.0, pytest.approx(49.5))


def test_a_box_the_supervisor_ended_for_no_progress_counts_as_stalled_even_if_its_agent_said_interrupted():
    """The agent may catch the supervisor's SIGTERM and write `interrupted`: that must not read as a spot reclaim."""
    from training_infra.supervisor.runtime.supervisor import classify

    attempt = Attempt(n=1, unhealthy="no training progress for 25+ min (stall_minutes + margin)")
    reason, words = classify({"State": {"Name": "terminated"}}, {"outcome": "interrupted"}, attempt)

    assert reason == "stalled" and words.startswith("the supervisor ended it: no training progress")
    assert classify(None, {"outcome": "succeeded"}, attempt)[0] == "succeeded", "an outcome of its own stands"
