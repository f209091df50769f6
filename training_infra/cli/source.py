"""Where the verbs read runs: the run table, or, for a deployment from before it, status files and tags.

Every fallback for stacks deployed before the run table existed lives here, behind `RunSource`,
so the verbs ask one object for a run's record, its rows and its costs and never branch on
the deployment's age themselves.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import botocore.exceptions

from training_infra import naming
from training_infra.cli import runs
from training_infra.cli.aws import Aws
from training_infra.cli.errors import CliError
from training_infra.cli.render import fmt_time
from training_infra.supervisor.runtime.records import RunState

if TYPE_CHECKING:
    from training_infra.supervisor.runtime.records import Run as Record
    from training_infra.supervisor.runtime.records import RunStore


def run_store(aws: Aws) -> RunStore | None:
    """The run table of managed runs; None for a deployment from before it existed."""
    table = aws.stack_outputs(naming.STORAGE_STACK).get(naming.OUTPUT_RUN_TABLE)
    if not table:
        return None
    from training_infra.supervisor.runtime.records import RunStore

    return RunStore(aws.client("dynamodb"), table)


class RunSource:
    """One deployment's runs, read from the run table when it has one, else from status files and tags."""

    def __init__(self, aws: Aws) -> None:
        self.aws = aws
        self.store = run_store(aws)

    def record(self, run: str) -> Record | None:
        """The run's record; None for a run made outside the table (or a deployment without one)."""
        return self.store.get(run) if self.store is not None else None

    def still_going(self, run: str) -> bool:
        """A managed run goes on between attempts and while it waits for capacity; a tagged one while it runs."""
        record = self.record(run)
        return record.active if record is not None else any(r.live for r in runs.collect_runs(self.aws, run))

    def require(self, run: str) -> None:
        """Raise the clear 'unknown run' error when neither the table nor EC2 knows the run."""
        if self.record(run) is None and not runs.instances_for(self.aws, run, managed_only=False):
            runs.require_runs(self.aws, run)

    # ---- status ----

    def run_rows(self, run: str, count: int) -> tuple[list[dict[str, Any]], Record | None]:
        """One run's `status` rows (at most `count`), and its record when it is a managed run."""
        aws, store = self.aws, self.store
        if store is None:  # a deployment from before the run table: status files and tags only
            return run_rows(aws, runs.require_runs(aws, run)[:count]), None
        record = store.get(run)
        rows = managed_rows(aws, [record]) if record else run_rows(aws, runs.require_runs(aws, run))
        if record is not None:
            rows[0]["progress"] = progress(aws, record)
            rows[0]["cold_start"] = attempt_json(aws, record, "cold_start.json")
        return rows, record

    def newest_rows(self, count: int) -> list[dict[str, Any]]:
        """The newest `count` runs as `status` rows, newest first."""
        aws, store = self.aws, self.store
        if store is None:  # a deployment from before the run table: status files and tags only
            return run_rows(aws, runs.collect_runs(aws)[:count])
        for service in ("s3", "ec2"):  # clients are thread-safe, their creation is not: made here, used below
            aws.client(service)
        aws.output(naming.OUTPUT_OUTPUTS_BUCKET)
        # Independent reads at once: runs made outside the table, the newest records, live instances.
        recorded, records, live = runs.concurrently(
            lambda read: read(),
            [
                lambda: runs.record_bucket_runs(aws, store),
                lambda: store.newest(count),
                lambda: runs.instances_for(aws, states=runs.LIVE_STATES),
            ],
        )
        if recorded.added:
            records = store.newest(count)  # the runs just recorded may be among the newest
        unrecorded = unrecorded_live_runs(store, records, live) + recorded.unrecorded
        rows = managed_rows(aws, records) + run_rows(aws, unrecorded)
        rows.sort(key=lambda row: row["launched_at"] or "", reverse=True)
        return rows[:count]

    # ---- cost ----

    def cost_rows(
        self, run: str | None, start: datetime, now: datetime
    ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        """Rows of the runs that cost something since `start` (or only `run`), and each one's attempts."""
        aws, store = self.aws, self.store
        attempts: dict[str, list[dict[str, Any]]] = {}
        if store is None:  # a deployment from before the run table: status files and tags only
            found = runs.require_runs(aws, run) if run else runs.collect_runs(aws)
            rows = [r for r in run_rows(aws, found) if (runs.parse_time(r["launched_at"]) or now) >= start]
            return rows, attempts
        unrecorded: list[runs.Run] = []
        summarized: list[dict[str, Any]] = []
        if run is not None:
            records = [self.record_of(run)]
        else:
            recorded = runs.record_bucket_runs(aws, store)
            unrecorded = recorded.unrecorded
            records, summarized = period_runs(store, start)
        rows, attempts = costs_within(managed_rows(aws, records), start, now)
        rows += summarized
        rows += [r for r in run_rows(aws, unrecorded) if (runs.parse_time(r["launched_at"]) or now) >= start]
        rows.sort(key=lambda row: row["launched_at"] or "", reverse=True)
        return rows, attempts

    def record_of(self, run: str) -> Record:
        """The run's record; a run known only from its status.json is recorded now (or only read, without write
        access)."""
        aws, store = self.aws, self.store
        record = store.get(run)
        if record is not None:
            return record
        status = runs.read_status(aws, aws.output(naming.OUTPUT_OUTPUTS_BUCKET), run)
        if status is None:
            raise CliError(f"unknown run {run!r} in {aws.region_name} (see `training-infra status`)")
        record = runs.record_from_status({**status, "run_id": run}, aws.client("ec2"), runs.utcnow())
        from training_infra.supervisor.runtime.records import StaleRecord

        # No write access, or recorded meanwhile: the figures shown are the same either way.
        with contextlib.suppress(StaleRecord, botocore.exceptions.ClientError):
            store.create(record)
        return record


def run_rows(aws: Aws, found: list[runs.Run]) -> list[dict[str, Any]]:
    """Rows for runs known from tags and status files (no record)."""
    now = runs.utcnow()
    book = runs.PriceBook(aws)
    rows = []
    for run in found:
        cost = book.cost(run, now)
        window = run.interval(now)
        rows.append(
            {
                "run_id": run.run_id,
                "instance_id": run.instance_id or None,
                "instance_type": run.instance_type or None,
                "market": run.market or None,
                "state": run.state,
                "uptime_seconds": (window[1] - window[0]).total_seconds() if window else None,
                "deadline": fmt_time(run.deadline) if run.deadline else None,
                "cost_usd": cost.usd,
                "on_demand_usd": cost.on_demand_usd,
                "price_source": cost.source,
                "launched_at": fmt_time(run.launched_at) if run.launched_at else None,
                "outcome": run.outcome or None,
                "exit_code": run.status.get("exit_code") if run.status else None,
                "message": run.status.get("message") if run.status else None,
            }
        )
    return rows


def unrecorded_live_runs(store: Any, records: list[Any], instances: list[dict[str, Any]]) -> list[runs.Run]:
    """Live managed instances without a run record (the stack's own instance, an older CLI's launch)."""
    shown = {record.run_id for record in records}
    live = [runs.run_from_instance(i) for i in instances]
    candidates = sorted({r.run_id for r in live if r.run_id and r.run_id not in shown})
    recorded = store.existing(candidates) if candidates else set()
    return [r for r in live if r.run_id and r.run_id not in shown and r.run_id not in recorded]


def managed_rows(aws: Aws, records: list[Record]) -> list[dict[str, Any]]:
    """Rows for recorded runs. Ended attempts carry their price; EC2 and the spot price history are
    asked only for the attempts still open: one DescribeInstances for all of them, one price
    history per type and zone."""
    from training_infra.supervisor.runtime import ledger

    now = runs.utcnow()
    ids = sorted(
        {a.instance_id for r in records for a in r.launched if not a.ended_at}
        | {m.instance_id for r in records for a in r.launched if not a.ended_at for m in a.members if m.live}
    )
    instances: dict[str, runs.Run] = {}
    if ids:
        instances = {i["InstanceId"]: runs.run_from_instance(i) for i in runs.instances_by_id(aws, ids)}
    unpriced = [a for r in records for a in r.launched if not a.priced]
    starts = [w[0] for a in unpriced if (w := ledger.attempt_window(a, now))]
    spot = ledger.SpotHistory(aws.client("ec2"), min(starts), now) if starts else None
    if spot is not None:
        try:
            spot.prefetch((a.instance_type, a.zone) for a in unpriced if a.market == "spot")
        except botocore.exceptions.ClientError:
            spot = None  # no ec2:DescribeSpotPriceHistory: list prices below
    return [managed_row(record, instances, spot, now) for record in records]


def managed_row(record: Record, instances: dict[str, runs.Run], spot: Any, now: datetime) -> dict[str, Any]:
    """A managed run as a `status` row: its current (or last) attempt, and uptime and cost over every attempt."""
    from training_infra.supervisor.runtime import ledger

    attempts = []
    for attempt in record.attempts:
        instance = instances.get(attempt.instance_id)
        if instance is not None and instance.launched_at and not attempt.ended_at:
            attempt = replace(attempt, started_at=runs.iso_z(instance.launched_at))  # EC2 bills from its launch time
        if attempt.members:  # a gang: every node, priced as the supervisor prices it
            from training_infra.supervisor.runtime import gang

            cost = gang.members_cost(attempt, record.spec, now, spot)
        else:
            cost = ledger.recorded_or_priced(attempt, record.spec, now, spot)
        window = ledger.attempt_window(attempt, now)
        attempts.append(
            {
                "attempt": attempt.n,
                "instance_id": attempt.instance_id,
                "instance_type": attempt.instance_type,
                "zone": attempt.zone,
                "market": attempt.market,
                "instance_state": instance.state if instance else ("ended" if attempt.ended_at else None),
                "started_at": attempt.started_at or attempt.claimed_at,
                "ended_at": attempt.ended_at,
                "end_reason": attempt.end_reason,
                "exit_code": attempt.exit_code,
                "message": attempt.message,
                "tries": attempt.tries,
                "uptime_seconds": (window[1] - window[0]).total_seconds() if window else None,
                "cost_usd": cost.usd,
                "on_demand_usd": cost.on_demand_usd,
                "hourly_usd": cost.hourly_usd,
                "price_source": cost.source,
                **({"nodes": _node_rows(attempt, instances)} if attempt.members else {}),
            }
        )
    launched = [a for a in attempts if a["instance_id"]]
    last = launched[-1] if launched else {}

    def total(key: str) -> float | None:
        values = [a[key] for a in launched if a[key] is not None]
        return sum(values) if values else None

    spec, state = record.spec, record.state
    if (
        state in (RunState.LAUNCHING, RunState.RECOVERING)
        and last.get("instance_state") == "running"
        and not last.get("ended_at")
    ):
        state = RunState.RUNNING  # the supervisor records it at its next look; EC2 already says so
    return {
        "run_id": record.run_id,
        "instance_id": last.get("instance_id") if record.active else None,
        "instance_type": last.get("instance_type"),
        "market": last.get("market"),
        "state": state,
        "tries": len(launched),
        "uptime_seconds": total("uptime_seconds"),
        "deadline": fmt_time(runs.parse_time(record.deadline_at)) if record.deadline_at else None,
        "cost_usd": total("cost_usd"),
        "on_demand_usd": total("on_demand_usd"),
        "price_source": last.get("price_source"),
        "launched_at": record.created_at,
        "outcome": None if record.active else record.state,
        "exit_code": last.get("exit_code"),
        "message": record.message,
        "max_cost_usd": spec.max_cost_usd,
        # A resumed run's limit counts from its resume, as the supervisor's does.
        "left_usd": ledger.left_under_limit(spec, total("cost_usd") or 0) if spec.max_cost_usd else None,
        "managed": {
            "spec": spec.to_dict(),
            "errors_used": record.errors_used,
            "data_access": _data_access(record.spec_yaml),
            "stop_requested_at": record.stop_requested_at or None,
            "ended_at": record.ended_at or None,
        },
        "attempts": attempts,
    }


def _data_access(spec_yaml: str) -> str | None:
    """The kept spec's `data.access` (sync|mount); None: the stack's (not set, or no spec kept)."""
    from training_infra.spec import SpecError, read_yaml

    try:
        data, _lines = read_yaml(spec_yaml or "{}")
    except SpecError:
        return None
    section = data.get("data") if isinstance(data, dict) else None
    access = section.get("access") if isinstance(section, dict) else None
    return access if access in ("sync", "mount") else None


def _node_rows(attempt: Any, instances: dict[str, runs.Run]) -> list[dict[str, Any]]:
    """A gang attempt's members, node by node (replaced ones too): rank, instance, type, zone, address, state."""
    rows = []
    for member in sorted(attempt.members, key=lambda m: (m.node, m.started_at)):
        instance = instances.get(member.instance_id) if member.live else None
        rows.append({
            "node": member.node, "instance_id": member.instance_id, "instance_type": member.instance_type,
            "zone": member.zone, "private_ip": member.private_ip,
            "state": instance.state if instance is not None else str(member.state),
            "started_at": member.started_at, "ended_at": member.ended_at,
            "end_reason": member.end_reason, "message": member.message,
        })  # fmt: skip
    return rows


def progress(aws: Aws, record: Record) -> dict[str, Any] | None:
    """The last attempt's progress.json (the agent uploads it once a minute with progress), or None."""
    return attempt_json(aws, record, "progress.json")


def attempt_json(aws: Aws, record: Record, name: str) -> dict[str, Any] | None:
    """A JSON object the agent uploads under the last attempt (progress.json, cold_start.json), or None."""
    if not record.launched:
        return None
    key = f"{naming.RUNS_PREFIX}{record.run_id}/attempts/{record.launched[-1].n}/{name}"
    try:
        body = aws.client("s3").get_object(Bucket=aws.output(naming.OUTPUT_OUTPUTS_BUCKET), Key=key)["Body"].read()
        found = json.loads(body)
    except botocore.exceptions.ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def period_runs(store: Any, start: datetime) -> tuple[list[Any], list[dict[str, Any]]]:
    """The runs that may have cost something since `start`: finished ones wholly inside the period as
    rows from their summaries (no attempts read); whole records only for the rest (still going,
    straddling the start, or recorded before summaries existed)."""
    since = runs.iso_z(start)
    # A run's attempts all end by its deadline, at most the longest runtime after it was made.
    earliest = runs.iso_z(start - timedelta(hours=naming.MAX_RUNTIME_HOURS_LIMIT + 1))
    rows, detailed = [], []
    for found in store.summaries_since(earliest):
        summary = found.get("summary") or {}
        if summary.get("complete") and found.get("ended_at") and found["ended_at"] < since:
            continue  # ended before the period
        if not summary.get("complete") or (summary.get("first_started_at") or found["created_at"]) < since:
            detailed.append(found["run_id"])
            continue
        if summary.get("tries"):
            rows.append(
                {
                    "run_id": found["run_id"],
                    "instance_type": summary.get("instance_type") or None,
                    "market": summary.get("market") or None,
                    "state": found.get("state"),
                    "tries": summary["tries"],
                    "uptime_seconds": summary.get("seconds"),
                    "cost_usd": summary.get("cost_usd"),
                    "on_demand_usd": summary.get("on_demand_usd"),
                    "price_source": summary.get("price_source") or None,
                    "launched_at": found["created_at"],
                }
            )
    return store.get_many(detailed) if detailed else [], rows


def costs_within(
    rows: list[dict[str, Any]], start: datetime, now: datetime
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Each run's hours and cost inside [start, now]: an attempt that straddles `start` counts pro rata."""
    from training_infra.supervisor.runtime import ledger

    kept, per_run = [], {}
    for row in rows:
        parts = []
        for attempt in row["attempts"]:
            began = runs.parse_time(attempt["started_at"]) if attempt["instance_id"] else None
            if began is None or attempt["uptime_seconds"] is None:
                continue
            inside = ledger.share_inside(began, attempt["uptime_seconds"], start, now)
            if inside is None:
                continue
            seconds, share = inside

            def part(value: float | None, share: float = share) -> float | None:
                return value * share if value is not None else None

            parts.append(
                {
                    **attempt,
                    "uptime_seconds": seconds,
                    "cost_usd": part(attempt["cost_usd"]),
                    "on_demand_usd": part(attempt["on_demand_usd"]),
                }
            )
        if not parts:
            continue

        def total(key: str, parts: list[dict[str, Any]] = parts) -> float | None:
            values = [p[key] for p in parts if p[key] is not None]
            return sum(values) if values else None

        kept.append(
            {
                "run_id": row["run_id"],
                "instance_type": row["instance_type"],
                "market": row["market"],
                "state": row["state"],
                "tries": len(parts),
                "uptime_seconds": total("uptime_seconds"),
                "cost_usd": total("cost_usd"),
                "on_demand_usd": total("on_demand_usd"),
                "price_source": parts[-1]["price_source"],
                "launched_at": row["launched_at"],
            }
        )
        per_run[row["run_id"]] = parts
    return kept, per_run
