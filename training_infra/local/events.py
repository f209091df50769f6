"""EventBridge's part of the local AWS: the events AWS sends about EC2 instances, delivered to the
supervisor's real handler as the deployed rules would, because the local AWS sends none.

Shapes as the EC2 user guide documents them ("State change events for Amazon EC2 instances", "Spot
Instance interruption notices"): the envelope (`version`, `id`, `detail-type`, `source`, `account`,
`time`, `region`, `resources`) around a `detail` of `instance-id` plus `state` (state change) or
`instance-action` (spot warning); the scheduled rule's event names the rule in `resources`.

Which events reach the handler is what the deployed rules say: `rules_from_stack` reads each rule
that targets the supervisor's function from the emulator (its pattern, its schedule, its target's
retry policy), and `EventDelivery` delivers an event only when a rule's pattern matches it (moto's
own EventBridge pattern matcher, which its put_events uses). EC2 announces every state an instance
passes through (`states_between`), so an instance that went from running to terminated between two
looks still yields `shutting-down` then `terminated`, in order, each if a rule matches it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

STATE_CHANGE = "EC2 Instance State-change Notification"
SPOT_WARNING = "EC2 Spot Instance Interruption Warning"
REBALANCE = "EC2 Instance Rebalance Recommendation"
SCHEDULED = "Scheduled Event"
SUPERVISOR_HANDLER = "supervisor.handler"  # the Lambda handler the supervisor construct deploys

# EC2's instance lifecycle (EC2 user guide, "Amazon EC2 instance state changes"): the states that may follow
# each one. Terminate from pending, running, stopping or stopped passes through shutting-down.
NEXT_STATES: dict[str, tuple[str, ...]] = {
    "pending": ("running", "shutting-down"),
    "running": ("stopping", "shutting-down"),
    "stopping": ("stopped", "shutting-down"),
    "stopped": ("pending", "shutting-down"),
    "shutting-down": ("terminated",),
    "terminated": (),
}

log = logging.getLogger("training_infra.local")


def states_between(seen: str | None, now: str) -> list[str]:
    """The states EC2 announces on the way from `seen` (excluded; None: just launched, so `pending` is
    announced too) to `now` (included), by the shortest path of the lifecycle: running -> terminated is
    [shutting-down, terminated]; pending -> stopped is [running, stopping, stopped]."""
    if now not in NEXT_STATES:
        raise ValueError(f"state={now!r} is not an EC2 instance state: {', '.join(NEXT_STATES)}")
    if seen is None:
        return ["pending", *states_between("pending", now)] if now != "pending" else ["pending"]
    if seen == now:
        return []
    paths: deque[list[str]] = deque([[seen]])
    visited = {seen}
    while paths:
        path = paths.popleft()
        for following in NEXT_STATES[path[-1]]:
            if following == now:
                return [*path[1:], following]
            if following not in visited:
                visited.add(following)
                paths.append([*path, following])
    return [now]  # no way there (terminated -> running): only what is seen now


def ec2_event(detail_type: str, instance_id: str = "", *, region: str = "us-east-1", account: str = "123456789012",
              time: datetime | None = None, rule_arn: str = "", **detail: Any) -> dict[str, Any]:  # fmt: skip
    """`ec2_event(STATE_CHANGE, "i-0abc", state="terminated")`; `ec2_event(SCHEDULED, rule_arn=...)` for the
    one-minute rule."""
    when = (time or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    scheduled = detail_type == SCHEDULED
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": detail_type,
        "source": "aws.events" if scheduled else "aws.ec2",
        "account": account,
        "time": when,
        "region": region,
        "resources": (
            [rule_arn or f"arn:aws:events:{region}:{account}:rule/reconcile"]
            if scheduled
            else [f"arn:aws:ec2:{region}:{account}:instance/{instance_id}"]
        ),
        "detail": {} if scheduled else {"instance-id": instance_id, **detail},
    }


@dataclass(frozen=True)
class DeliveryRule:
    """One deployed EventBridge rule that targets the supervisor: a pattern, or a schedule."""

    name: str
    arn: str
    pattern: str = ""  # the EventPattern as deployed (JSON); "" for a scheduled rule
    schedule: str = ""  # e.g. "rate(1 minute)"
    # How often AWS tries again when the handler raises: EventBridge invokes Lambda asynchronously, so that is
    # the function's own asynchronous retries (EventInvokeConfig.MaximumRetryAttempts, 2 when unset), not the
    # target's RetryPolicy, which covers only failures to hand the event to Lambda (none happen in process).
    retry_attempts: int = 2

    def matches(self, event: dict[str, Any]) -> bool:
        if not self.pattern:
            return event.get("detail-type") == SCHEDULED and self.arn in event.get("resources", [])
        from moto.events.models import EventPattern  # EventBridge's matching as the emulator does it

        return EventPattern.load(self.pattern).matches_event(event)


def rules_from_stack(cloudformation: Any, events: Any, stack: str) -> list[DeliveryRule]:
    """The rules of `stack` whose target is the supervisor's function: their names from the stack's resources,
    their patterns and schedules as the emulator holds them, the function's asynchronous retries from the template."""
    body = cloudformation.get_template(StackName=stack)["TemplateBody"]
    template = json.loads(body) if isinstance(body, str) else body
    resources = template.get("Resources", {})
    functions = {
        logical
        for logical, resource in resources.items()
        if resource.get("Type") == "AWS::Lambda::Function"
        and resource.get("Properties", {}).get("Handler") == SUPERVISOR_HANDLER
    }
    physical = {
        r["LogicalResourceId"]: r.get("PhysicalResourceId", "")
        for page in cloudformation.get_paginator("list_stack_resources").paginate(StackName=stack)
        for r in page["StackResourceSummaries"]
    }
    retries = async_retry_attempts(resources, functions)
    rules = []
    for logical, resource in resources.items():
        if resource.get("Type") != "AWS::Events::Rule":
            continue
        targets = [
            t for t in resource.get("Properties", {}).get("Targets", []) if _target_function(t.get("Arn")) in functions
        ]
        if not targets or not physical.get(logical):
            continue
        deployed = events.describe_rule(Name=_rule_name(physical[logical]))
        rules.append(
            DeliveryRule(
                name=deployed["Name"],
                arn=deployed["Arn"],
                pattern=deployed.get("EventPattern", ""),
                schedule=deployed.get("ScheduleExpression", ""),
                retry_attempts=retries,
            )
        )
    return rules


def async_retry_attempts(resources: dict[str, Any], functions: set[str]) -> int:
    """The supervisor function's EventInvokeConfig.MaximumRetryAttempts; Lambda's default, 2, without one."""
    for resource in resources.values():
        props = resource.get("Properties", {})
        name = props.get("FunctionName")
        if (
            resource.get("Type") == "AWS::Lambda::EventInvokeConfig"
            and isinstance(name, dict)
            and name.get("Ref") in functions
        ):
            return int(props.get("MaximumRetryAttempts", 2))
    return 2


def _target_function(arn: Any) -> str:
    if isinstance(arn, dict) and "Fn::GetAtt" in arn:
        return arn["Fn::GetAtt"][0]
    return ""


def _rule_name(physical_id: str) -> str:
    """CloudFormation's physical id of a rule is its name, or `<bus>|<name>` on a custom bus."""
    return physical_id.rsplit("|", 1)[-1].rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Delivery:
    """What happened to one event: which rule took it (None: no rule matched), how many tries, the result."""

    event: dict[str, Any]
    rule: str | None
    tries: int = 0
    result: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.rule is not None and not self.error


class EventDelivery:
    """The supervisor's real handler gets each event a deployed rule matches, in this process, as its Lambda
    would. A handler that raises is tried again as the function's asynchronous invoke config says (AWS: up to
    MaximumRetryAttempts more, 2 by default), then dropped with one line (the traceback goes to the sandbox's log)."""

    def __init__(
        self,
        *,
        rules: Sequence[DeliveryRule],
        handler: Callable[[dict[str, Any]], Any],
        say: Callable[[str], None],
        region: str = "us-east-1",
        account: str = "123456789012",
        retry_seconds: float = 1.0,
    ) -> None:
        self.rules = list(rules)
        self.handler = handler
        self.say = say
        self.region = region
        self.account = account
        self.retry_seconds = retry_seconds
        self.delivered: list[Delivery] = []
        self._last_reconcile = ""

    @property
    def schedules(self) -> list[DeliveryRule]:
        return [rule for rule in self.rules if rule.schedule]

    def state_changes(self, instance_id: str, seen: str | None, now: str) -> list[Delivery]:
        """Every state EC2 announces from `seen` to `now`, in order; each delivered if a rule matches it."""
        return [
            self.deliver(ec2_event(STATE_CHANGE, instance_id, region=self.region, account=self.account, state=state))
            for state in states_between(seen, now)
        ]

    def scheduled(self) -> list[Delivery]:
        return [
            self.deliver(ec2_event(SCHEDULED, region=self.region, account=self.account, rule_arn=rule.arn))
            for rule in self.schedules
        ]

    def deliver(self, event: dict[str, Any]) -> Delivery:
        rule = next((r for r in self.rules if r.matches(event)), None)
        if rule is None:
            delivery = Delivery(event, None)
            self.delivered.append(delivery)
            return delivery
        what = _describe(event)
        tries, error = 0, ""
        for tries in range(1, rule.retry_attempts + 2):
            try:
                result = self.handler(event)
            except Exception as failure:  # noqa: BLE001 - one event's failure must not end the sandbox
                error = f"{type(failure).__name__}: {failure}"
                log.exception("supervisor failed on %s (try %d of %d)", what, tries, rule.retry_attempts + 1)
                if tries <= rule.retry_attempts:
                    time.sleep(self.retry_seconds * tries)
                continue
            delivery = Delivery(event, rule.name, tries, result)
            self.delivered.append(delivery)
            self._report(event, what, result)
            return delivery
        delivery = Delivery(event, rule.name, tries, error=error)
        self.delivered.append(delivery)
        self.say(f"supervisor <- {what}: failed {tries} times, dropped (as EventBridge after its retries): {error}")
        return delivery

    def _report(self, event: dict[str, Any], what: str, result: Any) -> None:
        text = json.dumps(result, default=str)
        if event["detail-type"] == SCHEDULED:  # a line only when the reconcile found something new
            if text == self._last_reconcile:
                return
            self._last_reconcile = text
        self.say(f"supervisor <- {what}: {text}")


def _describe(event: dict[str, Any]) -> str:
    what = event["detail-type"]
    detail = event.get("detail") or {}
    if detail:
        what += f" {detail.get('instance-id')}" + (f" {detail['state']}" if "state" in detail else "")
    return what
