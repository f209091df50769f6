"""The supervisor: keeps every managed run going until it ends, across as many attempts as it takes.

One function, three kinds of trigger (docs/architecture.md, "Managed runs"):
- EC2 instance state changes: an attempt's instance stopped or went away -> classify, then
  relaunch or end the run;
- spot interruption warnings: remembered on the attempt (AWS reclaimed it, not the trainer);
- a one-minute schedule: reconcile every active run, because AWS delivers events best effort.
Every decision is a conditional write on the run record (records.py): handling the same event
twice, or an event and the reconcile at once, never launches a second instance for one attempt.

Classification (as SkyPilot's managed jobs): reclaimed by AWS -> relaunch, not an error; trainer
failed or stalled -> relaunch only while `max_restarts_on_errors` allows; succeeded, idle, deadline
or a requested stop -> the run ends. The pool (type + zone) just reclaimed cools down before it is
offered again. Launches are one EC2 Fleet request of type `instant` over every type x subnet, with
the run id and attempt number as the ClientToken and as tags (a retried request adopts the
instance tagged with that attempt instead of starting a second one).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

try:  # the Lambda package is this folder; the CLI imports it as part of training_infra
    import blocks
    import capacity
    import ledger
    import replacement
    from prices import PRICE_LIST_REGION, Prices, cap_message, under_cap
    from records import (
        Attempt,
        AttemptEnd,
        MonthlyLedger,
        Run,
        RunSpec,
        RunState,
        RunStore,
        StaleRecord,
        iso,
        parse_iso,
        utc_now,
    )
    from run_requests import run_template_problem
    from sweeps import GROUP_PREFIX, group_key, step_groups
except ImportError:  # pragma: no cover - exercised by the CLI and the tests
    from training_infra.supervisor.runtime import blocks, capacity, ledger, replacement
    from training_infra.supervisor.runtime.prices import PRICE_LIST_REGION, Prices, cap_message, under_cap
    from training_infra.supervisor.runtime.records import (
        Attempt,
        AttemptEnd,
        MonthlyLedger,
        Run,
        RunSpec,
        RunState,
        RunStore,
        StaleRecord,
        iso,
        parse_iso,
        utc_now,
    )
    from training_infra.supervisor.runtime.run_requests import run_template_problem
    from training_infra.supervisor.runtime.sweeps import GROUP_PREFIX, group_key, step_groups

log = logging.getLogger()
log.setLevel(logging.INFO)

STATE_CHANGE = "EC2 Instance State-change Notification"
SPOT_WARNING = "EC2 Spot Instance Interruption Warning"
REBALANCE = "EC2 Instance Rebalance Recommendation"
SCHEDULED = "Scheduled Event"
# Instance states in which the attempt is over (stopped ones still bill their volume: terminated).
ENDED_STATES = ("shutting-down", "terminated")
STOPPED_STATES = ("stopping", "stopped")
# Fleet error codes that mean "no capacity here", as opposed to a request that can never work.
CAPACITY_ERRORS = (
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
    "UnfulfillableCapacity",
    "InsufficientFreeAddressesInSubnet",
    "VcpuLimitExceeded",
)
# Answers that may pass by themselves: the next reconcile asks again.
TRANSIENT_ERRORS = (
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
)
# A run's agent outcome -> how the attempt ended.
AGENT_OUTCOMES = {
    "succeeded": AttemptEnd.SUCCEEDED,
    "failed": AttemptEnd.FAILED,
    "stalled": AttemptEnd.STALLED,
    "idle": AttemptEnd.IDLE,
    "deadline": AttemptEnd.DEADLINE,
    "interrupted": AttemptEnd.RECLAIMED,
    "stopped": AttemptEnd.STOPPED,
    "budget": AttemptEnd.STOPPED,
}
# An attempt's end that ends its run, and the state the run ends in.
_RUN_ENDS = {
    AttemptEnd.SUCCEEDED: RunState.SUCCEEDED,
    AttemptEnd.IDLE: RunState.IDLE,
    AttemptEnd.DEADLINE: RunState.DEADLINE,
    AttemptEnd.STOPPED: RunState.STOPPED,
}
# What one GetMetricStatistics call may return (CloudWatch API reference).
MAX_METRIC_POINTS = 1440
# A stop request's reason -> the state the run ends in.
STOP_STATES = {"user": RunState.STOPPED, "budget": RunState.BUDGET, "capacity-block": RunState.DEADLINE}
# A new instance may be unknown to DescribeInstances for a moment (eventual consistency): not "gone".
JUST_LAUNCHED_SECONDS = 300
# A month reservation with no run record this long after it was made belongs to a launch that died between.
ORPHAN_RESERVATION = timedelta(minutes=15)


class LaunchRefused(RuntimeError):
    """EC2 refused the run's launch request itself (not capacity): asking again cannot help."""


class SupervisorError(RuntimeError):
    """Some runs were not reconciled; raised after the others were, so the errors alarm fires."""


@dataclass(frozen=True)
class SupervisorConfig:
    table: str
    outputs_bucket: str
    topic_arn: str = ""
    managed_tag: str = "training-infra:managed"
    run_id_tag: str = "training-infra:run-id"
    attempt_tag: str = "training-infra:attempt"
    deadline_tag: str = "training-infra:deadline"
    max_runtime_tag: str = "training-infra:max-runtime-hours"
    stop_tag: str = "training-infra:stop"
    runs_prefix: str = "runs/"
    # A reclaimed pool is offered again only after this long (another type or zone first).
    cooldown_seconds: int = 1800
    # Boot, image pull and checkpoint restore: a relaunch with less time left than this plus one
    # checkpoint interval cannot get anything done, so the run ends as `deadline` instead.
    boot_seconds: int = 600
    # After a stop request the agent has the trainer's grace period plus the upload; then we terminate.
    stop_timeout_seconds: int = 600
    # The cloud-side layer for a box too hung to end itself: EC2 status checks impaired this long,
    # or no GPU metric from the agent (it publishes one every few seconds) this long once booted.
    impaired_seconds: int = 180
    silent_seconds: int = 1800
    boot_grace_seconds: int = 1200
    stall_margin_seconds: int = 300  # beyond a run's stall_seconds before the supervisor acts on a silent Progress
    metric_namespace: str = "TrainingInfra"
    # The account's dollar limit per calendar month (UTC) for all runs; 0: none (config.monthly_limit_usd).
    monthly_limit_usd: float = 0.0
    # The deployed stack's limits (docs/architecture.md, "Trust boundaries"): what a run may be, whoever asks.
    # The stack's launch template: every run template is made from its default version.
    launch_template_id: str = ""
    subnet_ids: str = ""  # comma-separated: the stack's subnets
    security_group_id: str = ""
    instance_profile_arn: str = ""  # the only profile an instance the supervisor ends may carry
    allowed_instance_types: str = ""  # comma-separated types or families ("g5.*")
    max_runtime_hours: float = 12.0  # the stack's max_runtime_hours: no run's deadline lies further out
    run_template_prefix: str = "training-infra-run-"
    created_by_tag: str = "training-infra:created-by"  # value "supervisor": on every template it makes
    # The AMI the deploy put in the stack template: its default version must still name it (a version someone
    # added and made default does not choose the image of every run).
    image_id: str = ""
    # Comma-separated role names: a run template's CreatedBy must be one of them (the functions'). Empty on the
    # local AWS, whose CreatedBy is always the account root.
    template_creators: str = ""
    # Gangs (spec.nodes > 1, gang.py): the tags the agent reads, how long a lost non-host's replacement may take
    # to run before the whole gang relaunches (config gang_replace_timeout_minutes), the placement strategy ("":
    # none, for the local AWS, which has no placement groups).
    node_tag: str = "training-infra:node"
    nodes_tag: str = "training-infra:nodes"
    rendezvous_tag: str = "training-infra:rendezvous"
    gang_replace_seconds: int = 600
    placement_strategy: str = "cluster"
    max_nodes: int = 8  # config max_nodes: the largest gang a run may be

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SupervisorConfig:
        fields = {name.upper(): name for name in cls.__dataclass_fields__}
        values: dict[str, Any] = {}
        for key, name in fields.items():
            if key in env:
                default = cls.__dataclass_fields__[name].default
                kind = type(default) if isinstance(default, (int, float)) else str
                values[name] = kind(env[key] or 0) if kind is not str else env[key]
        return cls(**values)

    @property
    def stack_subnets(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.subnet_ids.split(",") if s.strip())

    def type_allowed(self, instance_type: str) -> bool:
        patterns = [p.strip() for p in self.allowed_instance_types.split(",") if p.strip()]
        family = instance_type.split(".", 1)[0]
        return any(p == instance_type or (p.endswith(".*") and p[:-2] == family) for p in patterns)

    def limit_problems(self, spec: RunSpec, deadline_at: str, now: datetime) -> list[str]:
        """What in a run's spec passes the deployed stack's limits: empty when none does.

        Checked on every read of an active run and on every launch request, so a record written
        around the supervisor (docs/architecture.md, "Trust boundaries") never launches anything.
        """
        problems = []
        refused = [t for t in spec.instance_types if not self.type_allowed(t)]
        if refused:
            problems.append(
                f"instance types {', '.join(refused)}: allowed: {self.allowed_instance_types or 'none configured'} "
                "(setting allowed_instance_types)"
            )
        outside = [s for s in spec.subnet_ids if s not in self.stack_subnets]
        if outside:
            problems.append(f"subnets {', '.join(outside)}: allowed: the stack's {', '.join(self.stack_subnets)}")
        if spec.max_runtime_hours > self.max_runtime_hours + 1e-9:
            problems.append(
                f"max runtime {spec.max_runtime_hours:g} h: allowed: at most the stack's max_runtime_hours "
                f"{self.max_runtime_hours:g}"
            )
        deadline = parse_iso(deadline_at)
        if deadline is None or deadline > now + timedelta(hours=self.max_runtime_hours, minutes=5):
            problems.append(f"deadline {deadline_at}: allowed: at most {self.max_runtime_hours:g} h from now")
        if not spec.owns_launch_template or not spec.launch_template_id:
            problems.append("launch template: allowed: the run's own, made by the supervisor")
        if spec.nodes > self.max_nodes:
            problems.append(f"nodes {spec.nodes}: allowed: 1 to the stack's max_nodes {self.max_nodes}")
        if self.monthly_limit_usd and not spec.budget_month:
            problems.append(f"no month reservation: allowed: a reservation against monthly_limit_usd "
                            f"{self.monthly_limit_usd:g}")  # fmt: skip
        return problems

    @property
    def grace_hours(self) -> float:
        """A graceful stop's longest time: what a dollar limit keeps in hand."""
        return self.stop_timeout_seconds / 3600


@dataclass
class Clients:
    """Low-level AWS clients (boto3 or botocore); the tests pass moto-backed ones."""

    ec2: Any
    dynamodb: Any
    s3: Any
    sns: Any | None = None
    cloudwatch: Any | None = None  # the cloud-side health check; None (the CLI's first launch) skips it
    # The Price List API (us-east-1): a client or a function making one; None: list prices from the built-in table.
    pricing: Any | None = None


# ------------------------------------------------------------------------------------ launching


def pools(spec: RunSpec, subnet_zones: Mapping[str, str]) -> list[tuple[str, str]]:
    """Every (instance type, subnet) the run may use."""
    return [(t, subnet) for t in spec.instance_types for subnet in spec.subnet_ids if subnet in subnet_zones]


def pool_key(instance_type: str, zone: str) -> str:
    return f"{instance_type}@{zone}"


def _subnet_zones(clients: Clients, subnet_ids: list[str]) -> dict[str, str]:
    subnets = clients.ec2.describe_subnets(SubnetIds=subnet_ids)["Subnets"]
    return {subnet["SubnetId"]: subnet["AvailabilityZone"] for subnet in subnets}


def _fleet_request(
    run: Run,
    attempt: int,
    market: str,
    overrides: list[dict[str, str]],
    cfg: SupervisorConfig,
    now: datetime | None = None,
) -> dict[str, Any]:
    spec = run.spec
    # The run's tags as `launch` built them (training_infra.naming.run_tags, the one place), this
    # attempt's number on top; managed and run id always, since the supervisor finds instances by them.
    tags = {
        **spec.instance_tags,
        cfg.managed_tag: "true",
        cfg.run_id_tag: run.run_id,
        cfg.attempt_tag: str(attempt),
        # An earlier box may still be saving (a spot notice's end is ahead): its agent waits for it (replacement.py).
        **(replacement.replaces_tags(run, now) if now is not None else {}),
    }
    request: dict[str, Any] = {
        # One token per claim of an attempt: a retried request for the same claim cannot start a
        # second instance, while the next try after a capacity failure is a new request.
        "ClientToken": _client_token(run.run_id, attempt, market, run.current.claimed_at if run.current else ""),
        "Type": "instant",
        "TargetCapacitySpecification": {"TotalTargetCapacity": 1, "DefaultTargetCapacityType": market},
        "LaunchTemplateConfigs": [
            {
                "LaunchTemplateSpecification": {
                    "LaunchTemplateId": spec.launch_template_id,
                    "Version": spec.launch_template_version,
                },
                "Overrides": overrides,
            }
        ],
        # An instant fleet tags only instances (and itself); volumes get the run template's tags.
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": [{"Key": key, "Value": value} for key, value in tags.items()]}
        ],
    }
    if market == "spot":
        request["SpotOptions"] = {"AllocationStrategy": "price-capacity-optimized"}
    else:
        request["OnDemandOptions"] = {"AllocationStrategy": "lowest-price"}
    cap = spec.max_price_usd
    if cap:  # the fleet's own cap on top of the pools offered: EC2 holds to it if a price moved since
        request["SpotOptions" if market == "spot" else "OnDemandOptions"]["MaxTotalPrice"] = f"{cap:g}"
    if market == blocks.BLOCK_MARKET:  # the run template targets the block (blocks.py); the fleet says capacity-block
        return blocks.fleet_request(request)
    return request


def _client_token(run_id: str, attempt: int, market: str, claimed_at: str) -> str:
    digest = hashlib.sha256(f"{run_id}/{attempt}/{market}/{claimed_at}".encode()).hexdigest()
    return f"ti-{digest[:48]}"  # EC2 allows 64 characters; a run id alone may have 63


def _markets(spec: RunSpec) -> list[str]:
    return {"spot": ["spot"], "on-demand": ["on-demand"], "spot-then-on-demand": ["spot", "on-demand"],
            blocks.BLOCK_MARKET: [blocks.BLOCK_MARKET]}[spec.market]  # fmt: skip


def _adopt(clients: Clients, run: Run, attempt: int, cfg: SupervisorConfig) -> dict[str, Any] | None:
    """An instance a previous (crashed or raced) launch of this attempt already started, if any."""
    reservations = clients.ec2.describe_instances(
        Filters=[
            {"Name": f"tag:{cfg.run_id_tag}", "Values": [run.run_id]},
            {"Name": f"tag:{cfg.attempt_tag}", "Values": [str(attempt)]},
            {
                "Name": "instance-state-name",
                "Values": ["pending", "running", "stopping", "stopped", "shutting-down", "terminated"],
            },
        ]
    )["Reservations"]
    instances = [instance for reservation in reservations for instance in reservation["Instances"]]
    ours = [instance for instance in instances if is_ours(cfg, instance, run.run_id, attempt)]
    return ours[0] if ours else None


def is_ours(cfg: SupervisorConfig, instance: Mapping[str, Any] | None, run_id: str, attempt: int | None = None) -> bool:
    """Only an instance with the project's instance profile, the managed tag and this run's (and attempt's) tags is
    ever adopted, tagged or terminated: a record cannot point the supervisor at anything else."""
    if not instance:
        return False
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    profile = instance.get("IamInstanceProfile", {}).get("Arn", "")
    return (
        bool(cfg.instance_profile_arn)
        and profile == cfg.instance_profile_arn
        and tags.get(cfg.managed_tag) == "true"
        and tags.get(cfg.run_id_tag) == run_id
        and (attempt is None or tags.get(cfg.attempt_tag) == str(attempt))
    )


def launch(clients: Clients, run: Run, cfg: SupervisorConfig, now: datetime, prices: Prices | None = None) -> Attempt:
    """Start the open attempt's instance: adopt one already started for it, else one fleet per market.

    Returns the attempt (updated in place): `instance_id` set, or `end_reason` "capacity" with the
    per-pool errors when no pool had capacity (the next reconcile tries again). With a price cap
    (`max_price_usd`), only pools priced at or under it are offered; when none is, the first launch
    is refused and a relaunch waits as for capacity (prices move).
    """
    if run.spec.nodes > 1:
        return _gang().launch_gang(clients, run, cfg, now, prices)
    attempt = run.current
    assert attempt is not None and not attempt.instance_id, "launch needs an open attempt without an instance"
    existing = _adopt(clients, run, attempt.n, cfg)
    if existing is not None:
        _adopted(attempt, existing, now)
        return attempt
    zones = _subnet_zones(clients, list(run.spec.subnet_ids))
    cooled = {key for key, until in run.cooldown.items() if (parse_iso(until) or now) > now}
    every = pools(run.spec, zones)
    preferred = [(t, s) for t, s in every if pool_key(t, zones[s]) not in cooled] or every
    errors: list[dict[str, str]] = []
    cap = run.spec.max_price_usd
    priced_out: list[tuple[tuple[str, str], float, str]] = []
    for market in _markets(run.spec):
        offered = preferred
        if cap:
            prices = prices or Prices(ec2=clients.ec2, region=clients.ec2.meta.region_name, pricing=clients.pricing)
            offered, cheapest = _under_cap(prices, market, preferred, zones, cap)
            if not offered:
                if cheapest is not None:
                    priced_out.append((*cheapest, market))
                continue
        if market == "spot":  # zones EC2 scores unlikely to have spot capacity are left out (capacity.py)
            offered, left_out = _scored(clients, cfg, run, offered, zones, now)
            errors.extend(left_out)
        overrides = [
            {"InstanceType": t, "SubnetId": s, **({"MaxPrice": f"{cap:g}"} if cap and market == "spot" else {})}
            for t, s in offered
        ]
        try:
            response = clients.ec2.create_fleet(**_fleet_request(run, attempt.n, market, overrides, cfg, now))
        except ClientError as error:
            code, message = error.response["Error"]["Code"], error.response["Error"].get("Message", "")
            if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
                # One line, without AWS's long encoded message; the budget action is the likely cause here.
                raise LaunchRefused(
                    f"EC2 refused the launch: {code} (not allowed to launch; past the monthly budget, AWS Budgets "
                    "attaches DenyLaunchesPastBudget to the supervisor's role: see docs/architecture.md)"
                ) from None
            if code not in CAPACITY_ERRORS and code not in TRANSIENT_ERRORS:
                raise LaunchRefused(f"EC2 refused the launch: {code}: {message}") from None
            errors.append({"market": market, "code": code, "message": message})
            continue
        for launched in response.get("Instances", []):
            for instance_id in launched.get("InstanceIds", []):
                chosen = launched["LaunchTemplateAndOverrides"]["Overrides"]
                subnet = chosen.get("SubnetId", "")
                _record_instance(attempt, instance_id, launched.get("InstanceType") or chosen.get("InstanceType"),
                                 zones.get(subnet), subnet, market if market == blocks.BLOCK_MARKET
                                 else launched.get("Lifecycle", market), now)  # fmt: skip
                return attempt
        pool_errors = response.get("Errors", [])
        refused = [
            e
            for e in pool_errors
            if e.get("ErrorCode") not in CAPACITY_ERRORS and e.get("ErrorCode") not in TRANSIENT_ERRORS
        ]
        if refused and len(refused) == len(pool_errors):
            first = refused[0]
            raise LaunchRefused(
                f"EC2 refused the launch in every pool: {first.get('ErrorCode')}: {first.get('ErrorMessage', '')}"
            )
        errors.extend(
            {
                "market": market,
                "code": e.get("ErrorCode", ""),
                "message": e.get("ErrorMessage", ""),
                "pool": _override_name(e, zones),
            }
            for e in pool_errors
        )
    if priced_out and all(e["code"] == capacity.LEFT_OUT for e in errors):
        message = cap_message(cap, min(priced_out, key=lambda item: item[1]))
        if not run.launched:
            raise LaunchRefused(f"{message}: raise --max-price or add cheaper --instance-types")
        attempt.errors = []
        attempt.end(AttemptEnd.CAPACITY, f"{message} (prices move)", iso(now))
        return attempt
    attempt.errors = errors[-12:]
    attempt.end(AttemptEnd.CAPACITY, _capacity_message(errors), iso(now))
    return attempt


def _gang() -> Any:
    """gang.py, imported when a gang needs it (it imports this module)."""
    try:  # the package's first, as gang._sup does, so both name the same modules
        from training_infra.supervisor.runtime import gang
    except ImportError:  # pragma: no cover - the Lambda package
        import gang
    return gang


def _under_cap(
    prices: Prices, market: str, pools_: list[tuple[str, str]], zones: Mapping[str, str], cap: float
) -> tuple[list[tuple[str, str]], tuple[tuple[str, str], float] | None]:
    """(type, subnet) pools whose price now is at or under the cap; the cheapest (type, zone) and its price."""
    try:
        priced = prices.pool_prices(market, [(t, zones[s]) for t, s in pools_])
    except (ClientError, BotoCoreError) as error:  # offer them all: the fleet's MaxTotalPrice still holds the cap
        log.warning("prices not read (%s): every pool offered under the fleet's own price cap", error)
        return pools_, None
    if prices.used_built_in:
        log.info("list price from the built-in table (%s)", prices.fallback_reason or "no Price List answer")
    fitting, cheapest = under_cap(priced, cap)
    allowed = set(fitting)
    return [(t, s) for t, s in pools_ if (t, zones[s]) in allowed], cheapest


def _scored(
    clients: Clients,
    cfg: SupervisorConfig,
    run: Run,
    offered: list[tuple[str, str]],
    zones: Mapping[str, str],
    now: datetime,
) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """The spot pools to offer, and a note per zone left out (kept with the attempt's errors for `status -v`)."""
    scores = capacity.PlacementScores(clients.ec2, clients.dynamodb, cfg.table).get(
        run.spec.instance_types, run.spec.nodes, now, run.spec.subnet_ids
    )
    kept, low = capacity.preferred_pools(offered, zones, scores)
    notes = [
        {"market": "spot", "code": capacity.LEFT_OUT, "pool": pool_key("*", zone),
         "message": f"left out: spot placement score {scores.of(zone)} of 10"}
        for zone in low
    ]  # fmt: skip
    return kept, notes


def _override_name(error: Mapping[str, Any], zones: Mapping[str, str]) -> str:
    overrides = error.get("LaunchTemplateAndOverrides", {}).get("Overrides", {})
    return pool_key(overrides.get("InstanceType", "?"), zones.get(overrides.get("SubnetId", ""), "?"))


def _capacity_message(errors: list[dict[str, str]]) -> str:
    errors = [e for e in errors if e["code"] != capacity.LEFT_OUT]
    if not errors:
        return "no capacity in any pool"
    codes = sorted({e["code"] for e in errors})
    return f"no capacity: {', '.join(codes)} in {len(errors)} pool(s)"


def _record_instance(
    attempt: Attempt,
    instance_id: str | None,
    instance_type: str | None,
    zone: str | None,
    subnet: str | None,
    market: str,
    now: datetime,
) -> None:
    attempt.instance_id, attempt.instance_type, attempt.zone = instance_id or "", instance_type or "", zone or ""
    attempt.subnet_id, attempt.market, attempt.started_at = subnet or "", market, iso(now)


def _adopted(attempt: Attempt, instance: Mapping[str, Any], now: datetime) -> None:
    """The attempt takes an instance a previous launch of it started."""
    _record_instance(attempt, instance.get("InstanceId"), instance.get("InstanceType"),
                     instance.get("Placement", {}).get("AvailabilityZone"), instance.get("SubnetId"),
                     "spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand", now)  # fmt: skip


# -------------------------------------------------------------------------------- classifying


def _instance(clients: Clients, instance_id: str) -> dict[str, Any] | None:
    try:
        reservations = clients.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    except ClientError as error:
        if error.response["Error"]["Code"] == "InvalidInstanceID.NotFound":
            return None
        raise
    instances = [instance for reservation in reservations for instance in reservation["Instances"]]
    return instances[0] if instances else None


def attempt_status_key(cfg: SupervisorConfig, run_id: str, attempt: int) -> str:
    return f"{cfg.runs_prefix}{run_id}/attempts/{attempt}/status.json"


def _attempt_status(clients: Clients, cfg: SupervisorConfig, run: Run, attempt: Attempt) -> dict[str, Any] | None:
    try:
        key = attempt_status_key(cfg, run.run_id, attempt.n)
        body = clients.s3.get_object(Bucket=cfg.outputs_bucket, Key=key)["Body"].read()
    except ClientError as error:
        if error.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    try:
        status = json.loads(body)
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


def classify(
    instance: Mapping[str, Any] | None, status: Mapping[str, Any] | None, attempt: Attempt
) -> tuple[AttemptEnd, str]:
    """How an attempt ended: (reason, words for people)."""
    if attempt.unhealthy and (not status or status.get("outcome") == "interrupted"):
        # The supervisor ended a hung box (its agent may still have caught the SIGTERM and said "interrupted"):
        # failed status checks are AWS's hardware; a silent agent or no progress is a stall, an error.
        reason = AttemptEnd.RECLAIMED if "status checks" in attempt.unhealthy else AttemptEnd.STALLED
        return reason, f"the supervisor ended it: {attempt.unhealthy}"
    if status and status.get("outcome") in AGENT_OUTCOMES:
        reason = AGENT_OUTCOMES[status["outcome"]]
        if reason == AttemptEnd.FAILED and status.get("exit_code") is not None:
            return reason, f"trainer failed with exit {status['exit_code']}"
        return reason, str(status.get("message") or reason)
    state_reason = (instance or {}).get("StateReason", {}).get("Code", "")
    if attempt.reclaim_warned_at or state_reason.startswith("Server.SpotInstance"):
        return AttemptEnd.RECLAIMED, "spot reclaimed by AWS"
    if instance is None:
        return AttemptEnd.RECLAIMED, "instance vanished without a status.json"
    if state_reason.startswith("Client."):
        # Shut down or terminated from inside or by a person, with no status: the run's own doing, an error.
        return AttemptEnd.FAILED, f"instance ended without a status.json ({state_reason})"
    return AttemptEnd.RECLAIMED, f"instance ended without a status.json ({state_reason or 'no reason given'})"


# ---------------------------------------------------------------------------------- deciding


class Supervisor:
    def __init__(
        self,
        clients: Clients,
        cfg: SupervisorConfig,
        *,
        now: Callable[[], datetime] = utc_now,
        prices: Prices | None = None,
    ) -> None:
        self.clients = clients
        self.cfg = cfg
        self.store = RunStore(clients.dynamodb, cfg.table)
        self.now = now
        self.prices = prices
        # Run templates (version 1 is immutable) and the stack template's default, read once per warm Lambda.
        self._templates: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._stack_data: dict[str, dict[str, Any]] = {}  # stack template version -> its data

    # --- entry points ---------------------------------------------------------------------

    def handle(self, event: Mapping[str, Any]) -> dict[str, Any]:
        kind = event.get("detail-type", "")
        detail = event.get("detail", {}) or {}
        if kind == SCHEDULED:
            return self.reconcile_all()
        if kind in capacity.BLOCK_EXPIRING:
            return capacity.block_expiring(self, event)
        instance_id = detail.get("instance-id", "")
        if kind not in (STATE_CHANGE, SPOT_WARNING, REBALANCE) or not instance_id:
            return {"ignored": kind or "unknown event"}
        run_id, attempt = self._run_of(instance_id)
        if not run_id:
            return {"ignored": f"{instance_id} is not a managed run's instance"}
        if kind == SPOT_WARNING:
            warned = event.get("time") or iso(self.now())
            marked = self._mark(run_id, attempt, "reclaim_warned_at", warned, instance_id)
            action = str(detail.get("instance-action") or "terminate")
            return replacement.on_notice(self, run_id, attempt, warned, action) or marked
        if kind == REBALANCE:
            return self._mark(run_id, attempt, "rebalance_at", event.get("time") or iso(self.now()))
        return self.reconcile(run_id)

    def reconcile_all(self) -> dict[str, Any]:
        """Every active run in isolation: one run's failure is recorded, the rest still get their turn."""
        results, failures = [], []
        active = list(self.store.active())
        if self.cfg.monthly_limit_usd:
            self._sweep_reservations({run.run_id for run in active})
        for run in active:
            try:
                results.append(self.reconcile(run.run_id))
            except Exception as error:  # noqa: BLE001 - reported below so the errors alarm fires
                log.exception("reconcile of %s failed", run.run_id)
                failures.append(f"{run.run_id}: {error}")
        try:  # gang security groups no open attempt needs (gang.py); a failure here ends no run
            _gang().sweep_security_groups(self)
        except ClientError as error:
            log.warning("gang security groups not swept (the next minute retries): %s", error)
        groups, group_failures = step_groups(self)  # sweeps, after their members (sweeps.py)
        results.extend(groups)
        failures.extend(group_failures)
        if failures:
            raise SupervisorError(
                f"{len(failures)} run(s) not reconciled (the next minute retries): {'; '.join(failures)}"
            )
        return {"reconciled": results}

    def _sweep_reservations(self, active: set[str]) -> None:
        """Settle reservations of runs that ended while their settle failed (this month's and last month's), and
        free those whose launch died before its record was written (no record 15 minutes after the reservation)."""
        now = self.now()
        for month in {MonthlyLedger.key(now), MonthlyLedger.key(now.replace(day=1) - timedelta(days=1))}:
            values = self.month_ledger().read(month)
            for run_id in values["reservations"]:
                if run_id.startswith(GROUP_PREFIX):  # a sweep's, settled by its group's step when the group ends
                    continue
                run = self.store.get(run_id) if run_id not in active else None
                if run is not None and not run.active:
                    self.settle_month(run, month)
                reserved = parse_iso(values.get("reserved_at", {}).get(run_id)) or now - ORPHAN_RESERVATION
                if run is None and run_id not in active and now - reserved >= ORPHAN_RESERVATION:
                    log.info("freeing the %s reservation of %s: no run record since %s", month, run_id, iso(reserved))
                    self.month_ledger().settle(month, run_id, 0.0)

    def reconcile(self, run_id: str) -> dict[str, Any]:
        """Bring one run one step closer to where it should be; safe to call at any time, any number of times."""
        for _ in range(5):
            run = self.store.get(run_id)
            if run is None:
                return {"run_id": run_id, "ignored": "no such run"}
            if not run.active:
                return {"run_id": run_id, "state": run.state}
            problem = self.invalid_because(run)
            try:
                if problem:
                    return self._invalidate(run, problem)
                return self._step(run)
            except StaleRecord:
                log.info("run %s changed under us; deciding again", run_id)
        raise RuntimeError(f"run {run_id} kept changing; the next reconcile finishes it")

    def invalid_because(self, run: Run) -> str:
        """Why an active record must not be acted on, or "": every read of a run checks it before deciding."""
        if run.problem:
            return f"malformed record: {run.problem}"
        problems = self.cfg.limit_problems(run.spec, run.deadline_at, self.now())
        if self.cfg.monthly_limit_usd and run.spec.budget_month:
            held = (
                self.month_ledger()
                .read(run.spec.budget_month)["reservations"]
                .get(
                    group_key(run.group) if run.group else run.run_id  # a sweep member draws on its group's
                )
            )
            if held is None:  # its amount is sealed into the run's template with the rest of the limits
                problems.append(f"no month reservation: the {run.spec.budget_month} ledger holds nothing for it")
        if not problems:  # the record's limits are those sealed into the template the supervisor made for it
            problems = [p for p in [self._template_problem(run)] if p]
        return "; ".join(problems)

    def invalidate(self, run: Run, problem: str) -> Run:
        """Mark a record `invalid` (see _invalidate) and return it as stored."""
        self._invalidate(run, problem)
        return run

    def _invalidate(self, run: Run, problem: str) -> dict[str, Any]:
        """A record the supervisor would never have written: marked `invalid`, with a notice, and left alone
        (nothing launched, terminated or deleted on its word)."""
        run.state, run.ended_at = RunState.INVALID, iso(self.now())
        run.message = f"not acted on: {problem}"[:1000]
        self.store.save(run)
        self._notify(
            run,
            f"record refused ({problem}): marked invalid; nothing launched, stopped or deleted for it "
            f"(`training-infra stop {run.run_id}` ends its instances, if any)",
        )
        return {"run_id": run.run_id, "state": run.state, "message": run.message}

    def request_stop(self, run_id: str, reason: str = "user") -> Run:
        """Ask a run to end gracefully: no relaunch; its instance gets the stop tag, then a terminate
        after the grace."""
        for _ in range(5):
            run = self.store.get(run_id)
            if run is None:
                raise KeyError(run_id)
            if not run.active or run.stop_requested_at:
                return run
            run.stop_requested_at, run.stop_reason = iso(self.now()), reason
            run.state = RunState.STOPPING
            try:
                self.store.save(run)
            except StaleRecord:
                continue
            self._tag_stop(run)
            return run
        raise RuntimeError(f"run {run_id} kept changing; try again")

    # --- the decisions ----------------------------------------------------------------------

    def _step(self, run: Run) -> dict[str, Any]:
        now = self.now()
        if run.spec.nodes <= 1 and replacement.end_outlivers(self, run, now):  # a replaced box EC2 did not take
            self.store.save(run)
        attempt = run.current
        if run.stop_requested_at and attempt is not None and not attempt.instance_id:
            # A launch may have started an instance for this claim before the stop: find it, then stop it.
            started = _adopt(self.clients, run, attempt.n, self.cfg)
            if started is not None:
                _adopted(attempt, started, now)
                self.store.save(run)
                return self._step(run)
        if run.stop_requested_at and (attempt is None or not attempt.instance_id):
            # Stopped while waiting for capacity (or between attempts): nothing runs, nothing to launch.
            if attempt is not None:
                attempt.end(AttemptEnd.STOPPED, "stop requested before an instance started", iso(now))
            return self._finish(
                run, STOP_STATES.get(run.stop_reason, RunState.STOPPED), "stopped on request before an instance started"
            )
        if attempt is None:
            return self._next_attempt(run, why="first launch" if not run.attempts else run.message)
        if not attempt.instance_id:
            return self._launch_open_attempt(run)
        if run.spec.nodes > 1:
            return _gang().GangWatcher(self).step(run, attempt, now)
        instance = _instance(self.clients, attempt.instance_id)
        state = (instance or {}).get("State", {}).get("Name", "gone")
        launched = parse_iso(attempt.started_at) or now
        if instance is None and (now - launched).total_seconds() < JUST_LAUNCHED_SECONDS:
            return {
                "run_id": run.run_id,
                "state": run.state,
                "instance": attempt.instance_id,
                "note": "not listed yet",
            }
        if state in ("pending", "running"):
            return self._watch(run, attempt, now)
        # Its agent's status.json is the last thing it writes (after the final checkpoint sync and the outputs): once
        # it is there nothing of that box writes a checkpoint again, whatever state EC2 still shows.
        status = _attempt_status(self.clients, self.cfg, run, attempt)
        if state == "shutting-down" and status is None:
            # Its agent, on the OS shutdown's SIGTERM, may still stop the trainer and sync the final checkpoint until
            # EC2 powers the box off: the next attempt starts once EC2 says `terminated`, never beside a writer.
            return {"run_id": run.run_id, "state": run.state, "instance": attempt.instance_id,
                    "note": "shutting down: the next attempt starts once EC2 reports it terminated"}  # fmt: skip
        if state in STOPPED_STATES:
            # auto_shutdown=false or a manual stop: the volume still bills. The attempt is over.
            self._terminate(run, attempt, instance)
            if state == "stopping" and status is None:  # still powered: its agent may sync; wait for `terminated`
                note = "stopping: terminated; the next attempt starts once EC2 reports it terminated"
                return {"run_id": run.run_id, "state": run.state, "instance": attempt.instance_id, "note": note}
        reason, words = classify(instance, status, attempt)
        ended = parse_iso((status or {}).get("ended_at")) or now
        attempt.end(reason, words, iso(ended))
        if status:
            exit_code, price = status.get("exit_code"), ledger.number(status.get("hourly_price_usd"))
            attempt.exit_code = exit_code if isinstance(exit_code, int) and not isinstance(exit_code, bool) else None
            attempt.price_usd = price
        self._price(run, attempt, now)
        if reason == AttemptEnd.RECLAIMED and attempt.zone:
            run.cooldown[pool_key(attempt.instance_type, attempt.zone)] = iso(
                now + timedelta(seconds=self.cfg.cooldown_seconds)
            )
        return self._after(run, reason, words, now)

    def _after(self, run: Run, reason: AttemptEnd, words: str, now: datetime) -> dict[str, Any]:
        if run.stop_requested_at:
            return self._finish(
                run,
                STOP_STATES.get(run.stop_reason, RunState.STOPPED),
                f"stopped on request ({run.stop_reason}); last attempt: {words}",
            )
        if reason in _RUN_ENDS:
            return self._finish(run, _RUN_ENDS[reason], words)
        if reason in (AttemptEnd.FAILED, AttemptEnd.STALLED):
            allowed = run.spec.max_restarts_on_errors
            if run.errors_used >= allowed:
                final = RunState.STALLED if reason == AttemptEnd.STALLED else RunState.FAILED
                return self._finish(
                    run, final, f"{words}; no restarts on errors left ({run.errors_used} of {allowed} used)"
                )
            run.errors_used += 1
            return self._next_attempt(run, why=f"{words} (restart {run.errors_used} of {allowed})")
        return self._next_attempt(run, why=words)

    def _next_attempt(self, run: Run, *, why: str, replaces: int = 0) -> dict[str, Any]:
        now = self.now()
        deadline = parse_iso(run.deadline_at) or now
        needed = self.cfg.boot_seconds + run.spec.checkpoint_sync_seconds
        if run.attempts and (deadline - now).total_seconds() < needed:
            return self._finish(
                run,
                RunState.DEADLINE,
                f"{why}; {max(0, int((deadline - now).total_seconds() / 60))} min left before the deadline "
                "is too little for another attempt",
            )
        over = self._over_budget(run, now) if run.attempts else ""
        if over:
            return self._finish(run, RunState.BUDGET, f"{why}; {over}")
        n = len(run.attempts) + 1
        run.attempts.append(Attempt(n=n, why=why, claimed_at=iso(now), replaces=replaces))
        # Launching until an instance ever started; recovering after that.
        run.state = RunState.RECOVERING if run.launched else RunState.LAUNCHING
        run.message = why
        self.store.save(run)  # the claim: only one decider gets past this for attempt n
        return self._launch_open_attempt(run, relaunch=n > 1, why=why)

    def _template_problem(self, run: Run) -> str:
        """Why the run's template may not be launched, or "" (run_requests.run_template_problem: the one check)."""
        template_id = run.spec.launch_template_id
        if template_id not in self._templates:
            template = self.template_made_for(template_id, run.run_id)
            if template is None:
                return f"launch template {template_id} was not made by the supervisor for run {run.run_id}"
            versions = self.clients.ec2.describe_launch_template_versions(LaunchTemplateId=template_id, Versions=["1"])[
                "LaunchTemplateVersions"
            ]
            self._templates[template_id] = (template, versions[0]["LaunchTemplateData"] if versions else {})
        # The stack template's version the run was made from (immutable: a later deploy's new default version
        # leaves runs in flight valid), or the default for a record from before the version was kept.
        version = str(run.spec.stack_template_version or "$Default")
        if version not in self._stack_data:
            versions = self.clients.ec2.describe_launch_template_versions(
                LaunchTemplateId=self.cfg.launch_template_id, Versions=[version]
            )["LaunchTemplateVersions"]
            self._stack_data[version] = versions[0]["LaunchTemplateData"] if versions else {}
        template, data = self._templates[template_id]
        return run_template_problem(self.cfg, self._stack_data[version], template, data, run)

    def _launch_open_attempt(self, run: Run, *, relaunch: bool = False, why: str = "") -> dict[str, Any]:
        try:
            problem = self._template_problem(run)
            if problem:
                raise LaunchRefused(f"refused: {problem}")
            attempt = launch(self.clients, run, self.cfg, self.now(), self.prices)
        except LaunchRefused as refused:
            run.attempts[-1].end(AttemptEnd.LAUNCH_REFUSED, str(refused), iso(self.now()))
            return self._finish(run, RunState.FAILED, str(refused))
        if attempt.instance_id:
            run.message = f"attempt {attempt.n} on {attempt.instance_type} in {attempt.zone} ({attempt.market})"
            self.store.save(run)
            if relaunch:
                self._notify(
                    run,
                    f"relaunched as attempt {attempt.n} on {attempt.instance_type} in {attempt.zone} "
                    f"({attempt.market}): {why}",
                )
            return {"run_id": run.run_id, "launched": attempt.instance_id, "attempt": attempt.n}
        # No capacity anywhere: record it and stay recovering; the next reconcile tries again.
        streak = len(run.attempts) >= 2 and run.attempts[-2].end_reason == AttemptEnd.CAPACITY
        run.message = attempt.message
        if streak:  # one row per streak of capacity failures, with a count
            previous = run.attempts[-2]
            previous.ended_at, previous.errors, previous.message = attempt.ended_at, attempt.errors, attempt.message
            previous.tries += 1
            run.attempts.pop()
        self.store.save(run)
        if not streak:
            self._notify(run, f"waiting for capacity: {attempt.message}; retrying every minute until the deadline")
        return {"run_id": run.run_id, "capacity": attempt.message}

    def _watch(self, run: Run, attempt: Attempt, now: datetime) -> dict[str, Any]:
        changed = False
        if run.state in (RunState.LAUNCHING, RunState.RECOVERING):
            run.state, changed = RunState.RUNNING, True
        if run.stop_requested_at:
            if not attempt.stop_tagged_at:
                self._tag_stop(run)
                attempt.stop_tagged_at, changed = iso(now), True
            requested = parse_iso(run.stop_requested_at) or now
            if (now - requested).total_seconds() > self.cfg.stop_timeout_seconds:
                self._terminate(run, attempt)
                attempt.terminated_at, changed = iso(now), True
        if not run.stop_requested_at and run.spec.max_cost_usd:
            changed = self._keep_within_limit(run, attempt, now) or changed
        if not run.stop_requested_at and not attempt.unhealthy:
            before = attempt.impaired_since
            unhealthy = self._unhealthy(attempt, now) or self._progress_stalled(run, attempt, now)
            changed = changed or attempt.impaired_since != before
            if unhealthy:
                attempt.unhealthy, changed = unhealthy, True
                self._terminate(run, attempt)
                self._notify(run, f"attempt {attempt.n} on {attempt.instance_id} is hung ({unhealthy}): terminated")
        if changed:
            self.store.save(run)
        return {"run_id": run.run_id, "state": run.state, "instance": attempt.instance_id}

    def _keep_within_limit(self, run: Run, attempt: Attempt, now: datetime) -> bool:
        """Track the run's spend; stop it gracefully when spent + one grace period would pass its limit.

        Returns whether the record changed (its spend moved by a cent or more, or the stop began).
        """
        limit = run.spec.max_cost_usd
        total, hourly = self._spend(run, attempt, now)
        changed = abs(total - run.spent_usd) >= 0.01
        if changed:
            run.spent_usd = round(total, 4)
        spent = ledger.spent_under_limit(run.spec, total)
        if spent + hourly * self.cfg.grace_hours < limit:
            return changed
        run.spent_usd = round(total, 4)
        run.stop_requested_at, run.stop_reason, run.state = iso(now), "budget", RunState.STOPPING
        attempt.stop_tagged_at = iso(now)
        self._tag_stop(run)
        self._notify(
            run,
            f"spent ${spent:,.2f} of its ${limit:,.2f} limit (${hourly:,.2f}/hour, one grace period "
            f"${hourly * self.cfg.grace_hours:,.2f}): stopping gracefully; no relaunch",
        )
        return True

    def _spend(self, run: Run, open_attempt: Attempt | None, now: datetime) -> tuple[float, float]:
        """(USD spent by every attempt so far, the open attempt's USD per hour now)."""
        spent = sum(a.cost_usd or 0.0 for a in run.attempts if a.priced)
        if open_attempt is not None and open_attempt.members:  # a gang: the sum of its members
            cost, hourly = _gang().open_gang_cost(self, run, open_attempt, now)
            return spent + cost, hourly
        if open_attempt is None or ledger.attempt_window(open_attempt, now) is None:
            return spent, 0.0
        window = ledger.attempt_window(open_attempt, now)
        try:
            cost = ledger.price_attempt(
                open_attempt, run.spec, now, ledger.RecentSpotHistory(self.clients.ec2, *window)
            )
        except ClientError as error:
            log.warning("no spot price history for %s: %s", run.run_id, error)
            cost = ledger.price_attempt(open_attempt, run.spec, now, None)
        hourly = (cost.hourly_usd or 0.0) + ledger.volume_usd_per_hour(run.spec.volume_gb)
        return spent + (cost.usd or 0.0), hourly

    def _over_budget(self, run: Run, now: datetime) -> str:
        """Why another attempt may not start (its run's limit, or the month's), or ""."""
        limit = run.spec.max_cost_usd or 0.0
        total, _ = self._spend(run, None, now)
        run.spent_usd = round(total, 4)
        spent = ledger.spent_under_limit(run.spec, total)
        prices = list(run.spec.list_prices.values()) or [0.0]
        # As with the deadline: an attempt must boot, work one checkpoint interval and still stop gracefully.
        useful = self.cfg.boot_seconds + run.spec.checkpoint_sync_seconds + self.cfg.stop_timeout_seconds
        dearest = min(max(prices), run.spec.max_price_usd or max(prices))  # --max-price caps it
        least = (dearest + ledger.volume_usd_per_hour(run.spec.volume_gb)) * useful / 3600 * run.spec.nodes
        if limit and spent + least >= limit:
            return (
                f"spent ${spent:,.2f} of its ${limit:,.2f} limit: another attempt (boot, one checkpoint "
                f"interval and a graceful stop, ${least:,.2f}) would pass it"
            )
        month = run.spec.budget_month
        if self.cfg.monthly_limit_usd and month:
            finished, reserved, left = self.month_ledger().left(month)
            if left < 0:
                return (
                    f"the month is over monthly_limit_usd {self.cfg.monthly_limit_usd:g} "
                    f"(spent ${finished:,.2f}, reserved ${reserved:,.2f})"
                )
        return ""

    def month_ledger(self) -> MonthlyLedger:
        return MonthlyLedger(self.clients.dynamodb, self.cfg.table, self.cfg.monthly_limit_usd)

    def settle_month(self, run: Run, month: str = "") -> None:
        """A finished run's month reservation becomes what it spent (the sweep in reconcile_all retries, naming the
        month: a malformed record's spec is not read)."""
        month = month or run.spec.budget_month
        if not month:
            return
        # An invalid record's spend is not believed: its whole reservation stays spent.
        spent = (
            None
            if run.problem or run.state == RunState.INVALID
            else max(0.0, run.spent_usd - run.spec.spent_before_usd)
        )
        try:
            self.month_ledger().settle(month, run.run_id, spent)
        except (ClientError, StaleRecord) as error:
            log.warning("month ledger not settled for %s (the next reconcile retries): %s", run.run_id, error)

    def _unhealthy(self, attempt: Attempt, now: datetime) -> str:
        """Why a running attempt's box is hung, or "": status checks impaired, or the agent's GPU metric silent.

        The cloud-side layer every managed run gets (issue 15): the agent ends an idle run itself,
        but a box too hung to act needs someone outside it. Keeps `impaired_since` on the attempt.
        """
        statuses = self.clients.ec2.describe_instance_status(InstanceIds=[attempt.instance_id])
        checks = (statuses.get("InstanceStatuses") or [{}])[0]
        impaired = [
            name
            for name, key in (("system", "SystemStatus"), ("instance", "InstanceStatus"))
            if checks.get(key, {}).get("Status") == "impaired"
        ]
        if not impaired:
            attempt.impaired_since = ""
        else:
            since = parse_iso(attempt.impaired_since)
            if since is None:
                attempt.impaired_since = iso(now)
            elif (now - since).total_seconds() >= self.cfg.impaired_seconds:
                return f"EC2 {' and '.join(impaired)} status checks impaired since {attempt.impaired_since}"
        launched = parse_iso(attempt.started_at) or now
        if self.clients.cloudwatch is None or (now - launched).total_seconds() < self.cfg.boot_grace_seconds:
            return ""
        # Silence only means "hung" after the agent was heard: a CPU-only dry run never publishes the metric.
        silent = timedelta(seconds=self.cfg.silent_seconds)
        if self._heard_then_silent("GPUUtilization", ("InstanceId", attempt.instance_id), launched, silent, now):
            minutes = self.cfg.silent_seconds // 60
            return f"its agent's GPU metric stopped {minutes}+ min ago (a box too hung to end itself)"
        return ""

    def _heard_then_silent(
        self, metric: str, dimension: tuple[str, str], launched: datetime, silent: timedelta, now: datetime
    ) -> bool:
        """The agent put `metric` this attempt, and nothing for `silent` since: a box that stopped
        acting. Never heard is not silence (a CPU-only box, a trainer that never beats)."""
        assert self.clients.cloudwatch is not None
        start = max(launched, now - 3 * silent)
        points = self.clients.cloudwatch.get_metric_statistics(
            Namespace=self.cfg.metric_namespace,
            MetricName=metric,
            Dimensions=[{"Name": dimension[0], "Value": dimension[1]}],
            StartTime=start,
            EndTime=now,
            Period=metric_period(now - start),
            Statistics=["SampleCount"],
        ).get("Datapoints", [])
        heard = [parse_iso(p["Timestamp"]) if isinstance(p["Timestamp"], str) else p["Timestamp"] for p in points]
        return bool(heard) and max(heard) < now - silent

    def _price(self, run: Run, attempt: Attempt, now: datetime) -> None:
        """Price an ended attempt once and keep the figure on it (`status` and `cost` read it from there)."""
        if attempt.members:  # a gang: the sum of its members
            _gang().price_gang(self, run, attempt, now)
            return
        window = ledger.attempt_window(attempt, now)
        if window is None:
            return
        spot = ledger.SpotHistory(self.clients.ec2, *window)
        try:
            cost = ledger.price_attempt(attempt, run.spec, now, spot)
        except ClientError as error:  # no price history: the list price or the agent's estimate will do
            log.warning("no spot price history for attempt %s of %s: %s", attempt.n, run.run_id, error)
            cost = ledger.price_attempt(attempt, run.spec, now, None)
        ledger.record_price(attempt, cost)

    def _progress_stalled(self, run: Run, attempt: Attempt, now: datetime) -> str:
        """Why the attempt counts as stalled from outside, or "": the agent's `Progress` metric (put in
        each minute the trainer made progress) was heard this attempt, then nothing for the run's
        stall_seconds + a margin (issue 12's backstop for a box too hung to end its own stall).
        """
        stall = run.spec.stall_seconds
        if not stall or self.clients.cloudwatch is None:
            return ""
        launched = parse_iso(attempt.started_at) or now
        quiet = timedelta(seconds=stall + self.cfg.stall_margin_seconds)
        if self._heard_then_silent("Progress", ("RunId", run.run_id), launched, quiet, now):
            return f"no training progress for {int(quiet.total_seconds()) // 60}+ min (stall_minutes + margin)"
        return ""

    def _finish(self, run: Run, state: RunState, words: str) -> dict[str, Any]:
        assert not state.active, state
        run.state, run.message, run.ended_at = state, words, iso(self.now())
        run.spent_usd = round(self._spend(run, None, self.now())[0], 4)
        self.store.save(run)
        self.settle_month(run)
        self._release_launch_template(run)
        if run.spec.nodes > 1:
            _gang().release_placement_groups(self.clients, self.cfg, run)
        verb = (
            "finished"
            if state == RunState.SUCCEEDED
            else "gave up"
            if state in (RunState.FAILED, RunState.STALLED, RunState.DEADLINE)
            else "ended"
        )
        self._notify(run, f"{verb}: {state} after {len(run.launched)} attempt(s); {words}")
        return {"run_id": run.run_id, "state": state, "message": words}

    # --- side effects ----------------------------------------------------------------------

    def _run_of(self, instance_id: str) -> tuple[str, int]:
        instance = _instance(self.clients, instance_id)
        tags = {t["Key"]: t["Value"] for t in (instance or {}).get("Tags", [])}
        if tags.get(self.cfg.managed_tag) != "true":
            return "", 0
        try:
            return tags.get(self.cfg.run_id_tag, ""), int(tags.get(self.cfg.attempt_tag, "0"))
        except ValueError:
            return tags.get(self.cfg.run_id_tag, ""), 0

    def _mark(self, run_id: str, attempt_number: int, key: str, when: str, instance_id: str = "") -> dict[str, Any]:
        for _ in range(5):
            run = self.store.get(run_id)
            if run is None:
                return {"ignored": f"no run {run_id}"}
            matching = [a for a in run.attempts if a.n == attempt_number]
            if matching and matching[0].members:  # a gang: the warning is about one member
                if not _gang().mark_member(matching[0], instance_id, key, when):
                    return {"run_id": run_id, "noted": key, "already": True}
            elif not matching or getattr(matching[0], key):
                return {"run_id": run_id, "noted": key, "already": True}
            else:
                setattr(matching[0], key, when)
            try:
                self.store.save(run)
                return {"run_id": run_id, "noted": key}
            except StaleRecord:
                continue
        raise RuntimeError(f"run {run_id} kept changing")

    def _tag_stop(self, run: Run) -> None:
        attempt = run.current
        if attempt and attempt.members:
            _gang().tag_stop(self, run, attempt, run.stop_reason or "user")
            return
        if attempt and attempt.instance_id:
            if not self.ours(_instance(self.clients, attempt.instance_id), run.run_id, attempt.n):
                log.warning("not tagging %s for a stop: not run %s's attempt %s with the project's profile",
                            attempt.instance_id, run.run_id, attempt.n)  # fmt: skip
                return
            try:
                self.clients.ec2.create_tags(
                    Resources=[attempt.instance_id],
                    Tags=[{"Key": self.cfg.stop_tag, "Value": run.stop_reason or "user"}],
                )
            except ClientError as error:
                log.warning("could not tag %s for a graceful stop: %s", attempt.instance_id, error)

    def ours(self, instance: Mapping[str, Any] | None, run_id: str, attempt: int | None = None) -> bool:
        return is_ours(self.cfg, instance, run_id, attempt)

    def _terminate(self, run: Run, attempt: Attempt, instance: Mapping[str, Any] | None = None) -> bool:
        instance = instance if instance is not None else _instance(self.clients, attempt.instance_id)
        if not self.ours(instance, run.run_id, attempt.n):
            log.warning(
                "not terminating %s for run %s: not an instance of this run's attempt %s with the project's profile",
                attempt.instance_id, run.run_id, attempt.n,
            )  # fmt: skip
            return False
        self.clients.ec2.terminate_instances(InstanceIds=[attempt.instance_id])
        return True

    def template_made_for(self, template_id: str, run_id: str) -> dict[str, Any] | None:
        """The launch template if the supervisor made it for this run (its name and created-by tag), else None."""
        try:
            found = self.clients.ec2.describe_launch_templates(LaunchTemplateIds=[template_id])["LaunchTemplates"]
        except ClientError as error:
            log.warning("launch template %s not readable: %s", template_id, error)
            return None
        template = found[0] if found else {}
        tags = {t["Key"]: t["Value"] for t in template.get("Tags", [])}
        if (
            template.get("LaunchTemplateName") == f"{self.cfg.run_template_prefix}{run_id}"
            and tags.get(self.cfg.created_by_tag) == "supervisor"
            and tags.get(self.cfg.run_id_tag) == run_id
        ):
            return template
        return None

    def _release_launch_template(self, run: Run) -> None:
        """The run's own launch template is deleted once no attempt can need it; only one the supervisor made."""
        template_id = run.spec.launch_template_id
        if not run.spec.owns_launch_template or not template_id:
            return
        if self.template_made_for(template_id, run.run_id) is None:
            log.warning("not deleting launch template %s: not made by the supervisor for run %s", template_id,
                        run.run_id)  # fmt: skip
            return
        try:
            self.clients.ec2.delete_launch_template(LaunchTemplateId=template_id)
        except ClientError as error:
            log.warning("could not delete launch template %s: %s", template_id, error)

    def _notify(self, run: Run, text: str) -> None:
        message = f"training-infra run {run.run_id} {text}"
        log.info(message)
        if self.clients.sns is None or not self.cfg.topic_arn:
            return
        try:
            self.clients.sns.publish(
                TopicArn=self.cfg.topic_arn, Subject=f"training-infra: run {run.run_id}"[:100], Message=message
            )
        except ClientError as error:  # a lost notice must not undo a decision already written
            log.warning("notice not sent: %s", error)


def metric_period(window: timedelta) -> int:
    """The finest period (a multiple of 60 s) at which `window` stays within the 1,440 data points one
    GetMetricStatistics call may return (more is refused: InvalidParameterCombination)."""
    minutes = math.ceil(window.total_seconds() / 60)
    return 60 * max(1, math.ceil(minutes / MAX_METRIC_POINTS))


@functools.cache
def _lambda_clients() -> Clients:
    """Made once per Lambda container and reused while it is warm (and with them the price caches)."""
    import boto3

    return Clients(
        ec2=boto3.client("ec2"),
        dynamodb=boto3.client("dynamodb"),
        s3=boto3.client("s3"),
        sns=boto3.client("sns"),
        cloudwatch=boto3.client("cloudwatch"),
        pricing=lambda: boto3.client("pricing", region_name=PRICE_LIST_REGION),  # made only for a price not cached
    )


def handler(event: Mapping[str, Any], _context: Any = None) -> dict[str, Any]:
    result = Supervisor(_lambda_clients(), SupervisorConfig.from_env(os.environ)).handle(event)
    log.info(json.dumps(result, default=str))
    return result
