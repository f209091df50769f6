"""EventBridge as the local AWS plays it, without a sandbox: which EC2 states are announced on the way between
two looks, the exact event shape, which events the deployed patterns let through, and the retries."""

from __future__ import annotations

import json
import logging

import pytest

from training_infra.local.events import (
    SCHEDULED,
    SPOT_WARNING,
    STATE_CHANGE,
    DeliveryRule,
    EventDelivery,
    ec2_event,
    states_between,
)
from training_infra.supervisor.construct import WATCHED_STATES

STATE_RULE = DeliveryRule(
    name="InstanceStateEvents",
    arn="arn:aws:events:us-east-1:123456789012:rule/state",
    pattern=json.dumps(
        {"source": ["aws.ec2"], "detail-type": [STATE_CHANGE], "detail": {"state": list(WATCHED_STATES)}}
    ),
    retry_attempts=2,
)
RECONCILE = DeliveryRule(
    name="Reconcile", arn="arn:aws:events:us-east-1:123456789012:rule/reconcile", schedule="rate(1 minute)"
)


@pytest.mark.parametrize(
    ("seen", "now", "announced"),
    [
        (None, "running", ["pending", "running"]),
        (None, "terminated", ["pending", "shutting-down", "terminated"]),
        ("pending", "terminated", ["shutting-down", "terminated"]),
        ("running", "terminated", ["shutting-down", "terminated"]),
        ("running", "stopped", ["stopping", "stopped"]),
        ("stopped", "running", ["pending", "running"]),
        ("stopped", "terminated", ["shutting-down", "terminated"]),
        ("running", "running", []),
    ],
)
def test_every_state_ec2_passes_through_between_two_looks_is_announced_in_order(seen, now, announced):
    assert states_between(seen, now) == announced


def test_a_state_ec2_does_not_have_is_refused_with_the_value():
    with pytest.raises(ValueError, match="state='rebooting' is not an EC2 instance state"):
        states_between("running", "rebooting")


def test_the_state_change_event_has_the_shape_the_ec2_user_guide_documents():
    event = ec2_event(STATE_CHANGE, "i-0abc", region="eu-west-1", account="111122223333", state="running")
    assert set(event) == {"version", "id", "detail-type", "source", "account", "time", "region", "resources", "detail"}
    assert event["source"] == "aws.ec2" and event["version"] == "0"
    assert event["resources"] == ["arn:aws:ec2:eu-west-1:111122223333:instance/i-0abc"]
    assert event["detail"] == {"instance-id": "i-0abc", "state": "running"}
    assert event["time"].endswith("Z") and len(event["time"]) == len("2021-11-11T21:29:54Z")


def recorder(fail_times: int = 0):
    calls: list[dict] = []

    def handler(event):
        calls.append(event)
        if len(calls) <= fail_times:
            raise RuntimeError(f"throttled {len(calls)}")
        return {"ok": len(calls)}

    return calls, handler


def test_only_the_states_the_deployed_pattern_matches_reach_the_handler_in_order():
    calls, handler = recorder()
    delivery = EventDelivery(rules=[STATE_RULE, RECONCILE], handler=handler, say=lambda line: None)

    delivery.state_changes("i-1", None, "running")
    delivery.state_changes("i-1", "running", "stopped")
    delivery.state_changes("i-1", "stopped", "terminated")

    assert [c["detail"]["state"] for c in calls] == [
        "running", "stopping", "stopped", "shutting-down", "terminated"
    ]  # fmt: skip
    assert [d.event["detail"]["state"] for d in delivery.delivered if d.rule is None] == ["pending"]


def test_a_spot_warning_matches_no_state_rule_and_a_scheduled_event_names_its_rule():
    calls, handler = recorder()
    delivery = EventDelivery(rules=[STATE_RULE, RECONCILE], handler=handler, say=lambda line: None)

    skipped = delivery.deliver(ec2_event(SPOT_WARNING, "i-1", **{"instance-action": "terminate"}))
    [scheduled] = delivery.scheduled()

    assert skipped.rule is None
    assert scheduled.rule == "Reconcile"
    assert [c["detail-type"] for c in calls] == [SCHEDULED]
    assert calls[0]["resources"] == [RECONCILE.arn] and calls[0]["source"] == "aws.events"


def test_a_failed_delivery_is_retried_as_the_target_says_then_succeeds():
    calls, handler = recorder(fail_times=2)
    lines: list[str] = []
    delivery = EventDelivery(rules=[STATE_RULE], handler=handler, say=lines.append, retry_seconds=0)

    [pending, running] = delivery.state_changes("i-1", None, "running")

    assert running.ok and running.tries == 3 and running.result == {"ok": 3}
    assert len(calls) == 3 and all(c["id"] == calls[0]["id"] for c in calls), "the same event each try"
    assert lines == ['supervisor <- EC2 Instance State-change Notification i-1 running: {"ok": 3}']


def test_a_delivery_that_fails_every_retry_is_dropped_with_one_line_and_the_traceback_logged(caplog):
    calls, handler = recorder(fail_times=99)
    lines: list[str] = []
    delivery = EventDelivery(rules=[STATE_RULE], handler=handler, say=lines.append, retry_seconds=0)

    with caplog.at_level(logging.ERROR, logger="training_infra.local"):
        dropped = delivery.deliver(ec2_event(STATE_CHANGE, "i-1", state="terminated"))

    assert not dropped.ok and dropped.tries == 3 and len(calls) == 3
    assert lines == [
        "supervisor <- EC2 Instance State-change Notification i-1 terminated: failed 3 times, dropped "
        "(as EventBridge after its retries): RuntimeError: throttled 3"
    ]
    assert len([r for r in caplog.records if r.exc_info]) == 3, "each try's traceback goes to the log"


def test_a_raising_handler_is_retried_as_the_functions_async_invoke_config_says_not_the_targets_retry_policy():
    """EventBridge hands Lambda the event asynchronously: a raising handler is retried by Lambda
    (EventInvokeConfig), even for the reconcile rule whose target's RetryPolicy is 0."""
    from training_infra.local.events import async_retry_attempts

    function = {"Type": "AWS::Lambda::Function", "Properties": {"Handler": "supervisor.handler"}}
    properties = {"FunctionName": {"Ref": "Fn"}, "MaximumRetryAttempts": 1, "Qualifier": "$LATEST"}
    config = {"Type": "AWS::Lambda::EventInvokeConfig", "Properties": properties}
    assert async_retry_attempts({"Fn": function, "Cfg": config}, {"Fn"}) == 1
    assert async_retry_attempts({"Fn": function}, {"Fn"}) == 2, "Lambda's default without a config"
    assert async_retry_attempts({"Fn": function, "Cfg": config}, {"Other"}) == 2, "another function's config"
