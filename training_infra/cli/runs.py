"""Runs as the user sees them: managed instances (by tag) joined with the agent's status.json.

Terminated instances stay visible for about an hour on AWS; after that a run is known only from
`runs/<run-id>/status.json` in the outputs bucket, so both sources are read and joined. Costs use
the spot price history actually in effect while the run was up (time-weighted), else the
on-demand list price.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.exceptions

from training_infra import naming, pricing
from training_infra.cli.aws import Aws
from training_infra.cli.errors import CliError
from training_infra.supervisor.runtime.ledger import time_weighted_cost

STATUS_FILE = "status.json"
LIVE_STATES = ("pending", "running", "shutting-down", "stopping")
# "User initiated (2026-11-29 01:02:03 GMT)"; the local emulator writes "UTC" for the same instant.
_REASON_TIME = re.compile(r"\((\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) (?:GMT|UTC)\)")


def utcnow() -> datetime:
    """The clock every uptime and cost is measured against (one place, so tests can pin it)."""
    return datetime.now(UTC)


def new_run_id(now: datetime | None = None) -> str:
    """`<yyyymmdd-hhmmss>-<4 hex>`: sortable by start time, unique enough for one team."""
    return f"{(now or utcnow()):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def parse_time(value: Any) -> datetime | None:
    """ISO-8601 (with Z or an offset) or a datetime -> aware UTC datetime; None when absent or garbled."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def iso_z(moment: datetime) -> str:
    """The deadline tag format: 2026-11-28T18:00:00Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Run:
    """One attempt of a run: an instance, a status.json, or both joined."""

    run_id: str
    instance_id: str = ""
    instance_type: str = ""
    market: str = ""  # spot | on-demand
    state: str = ""  # EC2 state, or "finished" when only status.json is left
    availability_zone: str = ""
    launched_at: datetime | None = None
    ended_at: datetime | None = None
    deadline: datetime | None = None
    managed: bool = False
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def outcome(self) -> str:
        return str(self.status.get("outcome", "")) if self.status else ""

    def interval(self, now: datetime) -> tuple[datetime, datetime] | None:
        """When the run was billed: launch to end (or now while it is up)."""
        start = self.launched_at or parse_time(self.status.get("started_at"))
        end = now if self.live else (parse_time(self.status.get("ended_at")) or self.ended_at)
        if start is None or end is None:
            return None
        return start, max(start, end)


def run_from_instance(instance: dict[str, Any]) -> Run:
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    state = instance.get("State", {}).get("Name", "")
    ended = None
    if state not in LIVE_STATES:
        match = _REASON_TIME.search(instance.get("StateTransitionReason", ""))
        ended = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC) if match else None
    return Run(
        run_id=tags.get(naming.TAG_RUN_ID, ""),
        instance_id=instance["InstanceId"],
        instance_type=instance.get("InstanceType", ""),
        market="spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand",
        state=state,
        availability_zone=instance.get("Placement", {}).get("AvailabilityZone", ""),
        launched_at=parse_time(instance.get("LaunchTime")),
        ended_at=ended,
        deadline=parse_time(tags.get(naming.TAG_DEADLINE)),
        managed=tags.get(naming.TAG_MANAGED) == "true",
    )


def run_from_status(status: dict[str, Any]) -> Run:
    return Run(
        run_id=str(status.get("run_id", "")),
        instance_id=str(status.get("instance_id", "")),
        instance_type=str(status.get("instance_type", "")),
        market=str(status.get("market", "")),
        state="finished",
        availability_zone=str(status.get("availability_zone", "")),
        launched_at=parse_time(status.get("started_at")),
        ended_at=parse_time(status.get("ended_at")),
        managed=True,
        status=status,
    )


def instances_for(
    aws: Aws, run_id: str | None = None, *, managed_only: bool = True, states: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Instances tagged with the run id (or every managed one), in `states` if given, newest first."""
    filters = [{"Name": "tag:" + naming.TAG_RUN_ID, "Values": [run_id]}] if run_id else []
    if managed_only:
        filters.append({"Name": "tag:" + naming.TAG_MANAGED, "Values": ["true"]})
    if states:
        filters.append({"Name": "instance-state-name", "Values": list(states)})
    return _described(aws, filters)


def instances_by_id(aws: Aws, instance_ids: Sequence[str]) -> list[dict[str, Any]]:
    """These instances, in one call; an id EC2 no longer knows is left out, not an error."""
    return _described(aws, [{"Name": "instance-id", "Values": list(instance_ids)}])


def _described(aws: Aws, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    paginator = aws.client("ec2").get_paginator("describe_instances")
    found = [i for page in paginator.paginate(Filters=filters) for r in page["Reservations"] for i in r["Instances"]]
    return sorted(found, key=lambda i: i.get("LaunchTime") or datetime.min.replace(tzinfo=UTC), reverse=True)


def read_status(aws: Aws, bucket: str, run_id: str) -> dict[str, Any] | None:
    """The agent's status.json for a run, or None while the run has not finished."""
    try:
        answer = aws.client("s3").get_object(Bucket=bucket, Key=f"{naming.RUNS_PREFIX}{run_id}/{STATUS_FILE}")
        body = answer["Body"].read()
    except botocore.exceptions.ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    try:
        status = json.loads(body)
    except ValueError:
        status = None
    if isinstance(status, dict):
        return status
    # Garbled: at least when it was written (the run's end), so it sorts where it belongs.
    written = answer.get("LastModified")
    return {
        "run_id": run_id,
        "outcome": "unreadable status.json",
        "message": "its status.json is not a JSON object",
        **({"ended_at": iso_z(written), "started_at": iso_z(written)} if isinstance(written, datetime) else {}),
    }


def read_status_file(path: Path) -> dict[str, Any] | None:
    """A status.json on this machine (as `fetch` wrote it), or None when absent or unreadable."""
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def run_ids_in_bucket(aws: Aws, bucket: str) -> list[str]:
    """Run ids with a folder under runs/ (runs/latest/ is a copy, not a run)."""
    paginator = aws.client("s3").get_paginator("list_objects_v2")
    ids = []
    for page in paginator.paginate(Bucket=bucket, Prefix=naming.RUNS_PREFIX, Delimiter="/"):
        for prefix in page.get("CommonPrefixes", []):
            run_id = prefix["Prefix"][len(naming.RUNS_PREFIX) :].rstrip("/")
            if run_id and f"{naming.RUNS_PREFIX}{run_id}/" != naming.LATEST_PREFIX:
                ids.append(run_id)
    return ids


def collect_runs(aws: Aws, run_id: str | None = None) -> list[Run]:
    """Every attempt known from instances and status files, newest first."""
    bucket = aws.output(naming.OUTPUT_OUTPUTS_BUCKET)
    runs = [run_from_instance(i) for i in instances_for(aws, run_id)]
    ids = [run_id] if run_id else sorted(set(run_ids_in_bucket(aws, bucket)))
    for rid in ids:
        status = read_status(aws, bucket, rid)
        if status is None:
            continue
        status.setdefault("run_id", rid)
        match = next((r for r in runs if r.run_id == rid and r.instance_id == status.get("instance_id")), None)
        if match is None:
            # An instance launched by this CLI whose status names another id (the local agent, an
            # older attempt): attach to the newest instance of the run only when it has ended.
            match = next((r for r in runs if r.run_id == rid and not r.live and not r.status), None)
        if match is not None:
            match.status = status
        else:
            runs.append(run_from_status(status))
    return sorted(runs, key=lambda r: r.launched_at or datetime.min.replace(tzinfo=UTC), reverse=True)


def require_runs(aws: Aws, run_id: str) -> list[Run]:
    runs = collect_runs(aws, run_id)
    if not runs:
        raise CliError(
            f"unknown run {run_id!r} in {aws.region_name}: no instance tagged {naming.TAG_RUN_ID}={run_id} "
            "and no status.json (see `training-infra status`)"
        )
    return runs


# ---- prices and costs ----------------------------------------------------------------------


@dataclass
class Cost:
    hours: float
    usd: float | None
    on_demand_usd: float | None
    source: str  # where the price came from: spot history | on-demand list | agent estimate | unknown


class PriceBook:
    """Prices for runs, fetching each spot history window once."""

    def __init__(self, aws: Aws) -> None:
        self.aws = aws

    def spot_history(
        self, instance_type: str, zone: str, start: datetime, end: datetime
    ) -> list[tuple[datetime, float]]:
        paginator = self.aws.client("ec2").get_paginator("describe_spot_price_history")
        # Entries from before `start` tell which price was in effect when the run began.
        pages = paginator.paginate(
            InstanceTypes=[instance_type],
            ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
            StartTime=start - timedelta(days=1),
            EndTime=end,
            **({"AvailabilityZone": zone} if zone else {}),
        )
        entries = [
            e for page in pages for e in page.get("SpotPriceHistory", []) if e.get("InstanceType") == instance_type
        ]
        in_zone = [e for e in entries if e.get("AvailabilityZone") == zone] if zone else []
        chosen = in_zone or entries
        return [(parse_time(e["Timestamp"]) or start, float(e["SpotPrice"])) for e in chosen]

    def cost(self, run: Run, now: datetime) -> Cost:
        window = run.interval(now)
        if window is None:
            return Cost(0.0, None, None, "unknown")
        start, end = window
        hours = (end - start).total_seconds() / 3600
        list_price = pricing.on_demand_price(run.instance_type)
        agent_price = _float(run.status.get("hourly_price_usd"))
        on_demand_rate = list_price if list_price is not None else agent_price
        on_demand = on_demand_rate * hours if on_demand_rate is not None else None
        if run.market == "spot" and run.instance_type:
            try:
                spot = time_weighted_cost(
                    self.spot_history(run.instance_type, run.availability_zone, start, end), start, end
                )
            except botocore.exceptions.ClientError:
                spot = None  # no ec2:DescribeSpotPriceHistory: fall back to the list price below
            if spot is not None:
                return Cost(hours, spot, on_demand, "spot history")
        if on_demand is not None:
            return Cost(hours, on_demand, on_demand, "on-demand list")
        return Cost(hours, None, None, "unknown")


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def within_days(runs: Iterable[Run], days: float, now: datetime) -> list[Run]:
    cutoff = now - timedelta(days=days)
    return [r for r in runs if (r.launched_at or now) >= cutoff]


# ---- runs known only from status.json: recorded in the run table once --------------------------

# The agent's outcome -> the state a recorded run ends in.
_OUTCOME_STATES = {
    "succeeded": "succeeded",
    "failed": "failed",
    "stalled": "stalled",
    "idle": "idle",
    "deadline": "deadline",
    "interrupted": "interrupted",
    "stopped": "stopped",
    "budget": "budget",
}


def concurrently(work: Any, items: Sequence[Any], workers: int = 16) -> list[Any]:
    """`work(item)` for each item, several at once (botocore clients are thread-safe), in order."""
    if len(items) < 2:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(work, items))


def record_from_status(status: dict[str, Any], ec2: Any, now: datetime) -> Any:
    """A run from before the run table (or the stack's own instance) as a finished record of one attempt."""
    from training_infra.supervisor.runtime import ledger
    from training_infra.supervisor.runtime.records import Attempt, AttemptEnd, RunSpec, RunState
    from training_infra.supervisor.runtime.records import Run as Record

    run = run_from_status(status)
    started = iso_z(run.launched_at) if run.launched_at else ""
    ended = iso_z(run.ended_at) if run.ended_at else started
    list_price = pricing.on_demand_price(run.instance_type)
    market = run.market if run.market in ("spot", "on-demand") else ""
    spec = RunSpec(
        imported_from=STATUS_FILE,
        market=market,
        instance_types=(run.instance_type,) if run.instance_type else (),
        list_prices={run.instance_type: list_price} if list_price is not None else {},
    )
    outcome = str(status.get("outcome") or "")
    state = RunState(_OUTCOME_STATES.get(outcome, "failed"))
    exit_code = status.get("exit_code")
    attempt = Attempt(
        n=1,
        instance_id=run.instance_id,
        instance_type=run.instance_type,
        zone=run.availability_zone,
        market=market,
        started_at=started,
        ended_at=ended,
        end_reason=AttemptEnd(state) if outcome else None,
        exit_code=exit_code if isinstance(exit_code, int) and not isinstance(exit_code, bool) else None,
        message=str(status.get("message") or ""),
        price_usd=ledger.number(status.get("hourly_price_usd")),
    )
    window = ledger.attempt_window(attempt, now)
    spot = ledger.SpotHistory(ec2, *window) if window and run.market == "spot" else None
    try:
        cost = ledger.price_attempt(attempt, spec, now, spot)
    except botocore.exceptions.ClientError:
        cost = ledger.price_attempt(attempt, spec, now, None)
    if not run.ended_at:  # no end recorded: its hours, and so its cost, are unknown
        cost = ledger.AttemptCost(0.0, None, None, cost.hourly_usd, "unknown")
    ledger.record_price(attempt, cost)
    return Record(
        run_id=run.run_id,
        spec=spec,
        deadline_at="",
        created_at=started or iso_z(now),
        state=state,
        attempts=[attempt],
        message=str(status.get("message") or outcome),
        ended_at=ended,
    )


@dataclass
class Recorded:
    added: int = 0  # runs recorded in the table by this call
    unrecorded: list[Run] = field(default_factory=list)  # read from S3 but not recordable (no write access)


def record_bucket_runs(aws: Aws, store: Any) -> Recorded:
    """Record the runs under runs/ that the table does not know yet.

    Listing runs/ is one request per thousand runs; only ids not seen before are looked up, and
    only those without a record have their status.json read (at once, not one after another). A
    run still going (no status.json yet, an instance live) is left for a later call: `status`
    shows it from EC2. Recording needs dynamodb:PutItem and UpdateItem; a user without them (or a
    table that refuses) still sees those runs: they are returned, read from S3, for this call.
    """
    from training_infra import config
    from training_infra.supervisor.runtime.records import StaleRecord

    def is_run_id(name: str) -> bool:
        try:
            return bool(config.parse_setting("run_id", name))
        except config.ConfigError:
            return False  # not a folder `launch` could have made (and never one of the table's own items)

    bucket = aws.output(naming.OUTPUT_OUTPUTS_BUCKET)
    unseen = sorted({i for i in run_ids_in_bucket(aws, bucket) if is_run_id(i)} - store.seen_in_bucket())
    if not unseen:
        return Recorded()
    recorded = store.existing(unseen)
    missing = [run_id for run_id in unseen if run_id not in recorded]
    statuses = concurrently(lambda run_id: read_status(aws, bucket, run_id), missing)
    now, ec2 = utcnow(), aws.client("ec2")
    found = [(run_id, {**status, "run_id": run_id}) for run_id, status in zip(missing, statuses, strict=True) if status]
    without_status = [run_id for run_id, status in zip(missing, statuses, strict=True) if not status]
    if without_status:  # still going (an instance is live), or died before it could write one: never look again
        live = {r.run_id for r in map(run_from_instance, instances_for(aws, states=LIVE_STATES))}
        without_status = [run_id for run_id in without_status if run_id not in live]

    def add(item: tuple[str, dict[str, Any]]) -> None:
        with contextlib.suppress(StaleRecord):  # another `status` recorded it first
            store.create(record_from_status(item[1], ec2, now))

    try:
        concurrently(add, found)
        store.mark_seen(recorded | {run_id for run_id, _ in found} | set(without_status))
    except botocore.exceptions.ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        denied = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403  # TrainingUserPolicy reads
        if not denied and code not in ("AccessDeniedException", "AccessDenied", "ValidationException",
                                       "UnauthorizedOperation"):  # fmt: skip
            raise
        return Recorded(0, [run_from_status(status) for _, status in found])  # shown from S3 this time
    return Recorded(len(found))
