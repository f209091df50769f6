"""The run record: one DynamoDB item per run, changed only by conditional writes on its version.

A run is what the user asked for; an attempt is one instance working on it. Every decider (the
CLI's first launch, EventBridge events, the one-minute reconcile) reads the item, decides, and
writes it back only if nobody wrote in between (`version` unchanged). The loser re-reads and
decides again, so two deciders never both launch (docs/architecture.md, "Managed runs").

Stdlib and boto3 only: this folder is the supervisor's whole Lambda package, and the CLI imports
it too (the first launch is the same code).
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

# The run's states. Active ones are kept in the sparse "Active" index the reconcile reads.
ACTIVE_STATES = ("launching", "running", "recovering", "stopping")
# "interrupted": a run from before managed runs (imported from its status.json) that spot ended.
FINAL_STATES = ("succeeded", "failed", "stopped", "deadline", "budget", "idle", "stalled", "interrupted")
MARKETS = ("spot", "on-demand", "spot-then-on-demand")
# Index names the construct creates (training_infra/supervisor/construct.py).
ACTIVE_INDEX = "Active"
CREATED_INDEX = "ByCreated"
RUN_KIND = "run"
# One bookkeeping item (not a run: run ids cannot start with "#"): the ids under runs/ in the outputs
# bucket already recorded or imported, so `status` reads only status files it has not seen.
META_KIND = "meta"
SEEN_ITEM = "#seen-in-bucket"
SEEN_SHARDS = 16

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


class StaleRecord(RuntimeError):
    """Someone else changed the run since it was read: re-read and decide again."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    except (ValueError, OverflowError):
        return None


@dataclass
class Run:
    """The record as Python values; `attempts` are plain dicts (see `Attempt` keys in supervisor.py)."""

    run_id: str
    spec: dict[str, Any]
    deadline_at: str
    created_at: str
    state: str = "launching"
    version: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)
    errors_used: int = 0
    cooldown: dict[str, str] = field(default_factory=dict)  # "type@zone" -> until (ISO)
    stop_requested_at: str = ""
    stop_reason: str = ""  # user | budget (a stall is an error with restarts, never a requested stop)
    message: str = ""
    ended_at: str = ""
    spent_usd: float = 0.0  # every attempt so far, kept by the supervisor for the dollar limits

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def current(self) -> dict[str, Any] | None:
        """The attempt still open (launched or being launched), if any."""
        if self.attempts and not self.attempts[-1].get("ended_at"):
            return self.attempts[-1]
        return None

    def summary(self) -> dict[str, Any]:
        """What `cost` lists for a finished run, kept beside the attempts so a period's runs are read
        without them (a projection): the attempts' recorded prices added up. `complete` only when the
        run has ended and every attempt that had an instance was priced."""
        launched = [a for a in self.attempts if a.get("instance_id")]

        def total(key: str) -> float | None:
            values = [float(a[key]) for a in launched if a.get(key) is not None]
            return round(sum(values), 6) if values else None

        seconds = 0.0
        for attempt in launched:
            start, end = parse_iso(attempt.get("started_at")), parse_iso(attempt.get("ended_at"))
            seconds += (end - start).total_seconds() if start and end and end > start else 0.0
        last = launched[-1] if launched else {}
        return {
            "complete": not self.active and all(a.get("priced") for a in launched),
            "tries": len(launched),
            "first_started_at": (launched[0].get("started_at") or "") if launched else "",
            "seconds": seconds,
            "cost_usd": total("cost_usd"),
            "on_demand_usd": total("on_demand_usd"),
            "price_source": last.get("price_source") or "",
            "instance_type": last.get("instance_type") or "",
            "market": last.get("market") or "",
        }

    def to_item(self) -> dict[str, Any]:
        item = {
            "run_id": self.run_id,
            "kind": RUN_KIND,
            "created_at": self.created_at,
            "state": self.state,
            "version": self.version,
            "spec": self.spec,
            "deadline_at": self.deadline_at,
            "attempts": self.attempts,
            "errors_used": self.errors_used,
            "cooldown": self.cooldown,
            "stop_requested_at": self.stop_requested_at,
            "stop_reason": self.stop_reason,
            "message": self.message,
            "ended_at": self.ended_at,
            "spent_usd": self.spent_usd,
            "summary": self.summary(),
        }
        if self.active:
            item["active"] = "1"  # sparse index: only active runs are in it
        return {key: _serializer.serialize(_to_dynamo(value)) for key, value in item.items()}

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> Run:
        values = {key: _from_dynamo(_deserializer.deserialize(value)) for key, value in item.items()}
        names = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in values.items() if key in names})

    def copy(self) -> Run:
        return copy.deepcopy(self)


def _to_dynamo(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return Decimal(str(value))
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return {key: _to_dynamo(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_dynamo(v) for v in value]
    raise TypeError(f"cannot store {type(value).__name__} in a run record")


def _from_dynamo(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {key: _from_dynamo(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_from_dynamo(v) for v in value]
    return value


class RunStore:
    """Reads and conditional writes of run records."""

    def __init__(self, dynamodb: Any, table: str) -> None:
        self._db = dynamodb
        self.table = table

    def get(self, run_id: str) -> Run | None:
        item = self._db.get_item(TableName=self.table, Key={"run_id": {"S": run_id}}, ConsistentRead=True).get("Item")
        return Run.from_item(item) if item else None

    def create(self, run: Run) -> Run:
        """Store a new run; refuses an id that exists (a finished run is resumed, never overwritten)."""
        run.version = 1
        try:
            self._db.put_item(
                TableName=self.table, Item=run.to_item(), ConditionExpression="attribute_not_exists(run_id)"
            )
        except ClientError as error:
            if error.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise StaleRecord(f"run {run.run_id} already exists") from None
            raise
        return run

    def save(self, run: Run) -> Run:
        """Write `run` if its stored version is still the one it was read at; bump the version."""
        expected = run.version
        run.version = expected + 1
        try:
            self._db.put_item(
                TableName=self.table,
                Item=run.to_item(),
                ConditionExpression="version = :expected",
                ExpressionAttributeValues={":expected": {"N": str(expected)}},
            )
        except ClientError as error:
            run.version = expected
            if error.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise StaleRecord(f"run {run.run_id} changed since version {expected}") from None
            raise
        return run

    def active(self) -> Iterator[Run]:
        """Every run that is not finished (the sparse index holds only those)."""
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "IndexName": ACTIVE_INDEX,
            "KeyConditionExpression": "active = :one",
            "ExpressionAttributeValues": {":one": {"S": "1"}},
        }
        while True:
            page = self._db.query(**kwargs)
            for item in page.get("Items", []):
                yield Run.from_item(item)
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def newest(self, limit: int) -> list[Run]:
        """The newest runs first, at most `limit`: one query, whatever the table holds."""
        page = self._db.query(
            TableName=self.table,
            IndexName=CREATED_INDEX,
            KeyConditionExpression="kind = :run",
            ExpressionAttributeValues={":run": {"S": RUN_KIND}},
            ScanIndexForward=False,
            Limit=limit,
        )
        return [Run.from_item(item) for item in page.get("Items", [])]

    def summaries_since(self, since: str) -> Iterator[dict[str, Any]]:
        """Run id, creation, state and `summary` of the runs created at or after `since` (ISO), newest
        first: one paginated query on the time index that leaves the attempts behind."""
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "IndexName": CREATED_INDEX,
            "KeyConditionExpression": "kind = :run AND created_at >= :since",
            "ExpressionAttributeValues": {":run": {"S": RUN_KIND}, ":since": {"S": since}},
            "ProjectionExpression": "run_id, created_at, ended_at, #state, summary",
            "ExpressionAttributeNames": {"#state": "state"},
            "ScanIndexForward": False,
        }
        while True:
            page = self._db.query(**kwargs)
            for item in page.get("Items", []):
                yield {key: _from_dynamo(_deserializer.deserialize(value)) for key, value in item.items()}
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def get_many(self, run_ids: list[str]) -> list[Run]:
        """Whole records, 100 a call (BatchGetItem), in no particular order."""
        found: list[Run] = []
        for start in range(0, len(run_ids), 100):
            keys = [{"run_id": {"S": run_id}} for run_id in run_ids[start : start + 100]]
            request = {self.table: {"Keys": keys, "ConsistentRead": True}}
            while request:
                answer = self._db.batch_get_item(RequestItems=request)
                found.extend(Run.from_item(item) for item in answer.get("Responses", {}).get(self.table, []))
                request = answer.get("UnprocessedKeys") or {}
        return found

    def existing(self, run_ids: list[str]) -> set[str]:
        """Which of these ids have a record (BatchGetItem, 100 keys a call, keys only)."""
        found: set[str] = set()
        for start in range(0, len(run_ids), 100):
            keys = [{"run_id": {"S": run_id}} for run_id in run_ids[start : start + 100]]
            request = {self.table: {"Keys": keys, "ProjectionExpression": "run_id"}}
            while request:
                answer = self._db.batch_get_item(RequestItems=request)
                found.update(item["run_id"]["S"] for item in answer.get("Responses", {}).get(self.table, []))
                request = answer.get("UnprocessedKeys") or {}
        return found

    def seen_in_bucket(self) -> set[str]:
        """Run ids under runs/ in the outputs bucket already accounted for (recorded or imported).

        Kept in SEEN_SHARDS items (one BatchGetItem reads them all): DynamoDB's 400 KB per item
        would stop one item at about 15,000 ids; sixteen hold a quarter of a million.
        """
        keys = [{"run_id": {"S": f"{SEEN_ITEM}-{shard:x}"}} for shard in range(SEEN_SHARDS)]
        seen: set[str] = set()
        request = {self.table: {"Keys": keys, "ConsistentRead": True}}
        while request:
            answer = self._db.batch_get_item(RequestItems=request)
            for item in answer.get("Responses", {}).get(self.table, []):
                seen.update(item.get("seen", {}).get("SS", []))
            request = answer.get("UnprocessedKeys") or {}
        return seen

    def mark_seen(self, run_ids: set[str]) -> None:
        """Add to the accounted-for ids: an atomic ADD per shard, so two CLIs at once lose nothing."""
        shards: dict[int, list[str]] = {}
        for run_id in run_ids:
            shards.setdefault(seen_shard(run_id), []).append(run_id)
        for shard, ids in sorted(shards.items()):
            self._db.update_item(
                TableName=self.table,
                Key={"run_id": {"S": f"{SEEN_ITEM}-{shard:x}"}},
                UpdateExpression="ADD seen :ids SET kind = :meta",
                ExpressionAttributeValues={":ids": {"SS": sorted(ids)}, ":meta": {"S": META_KIND}},
            )


def seen_shard(run_id: str) -> int:
    return zlib.crc32(run_id.encode()) % SEEN_SHARDS


class OverLimit(RuntimeError):
    """The monthly limit cannot take this run's reservation; the message says what was spent and what is left."""


class MonthlyLedger:
    """The account's monthly dollar limit, kept in one item per month of the run table.

    A launch reserves the most its run can cost (its `--max-cost-usd`, else its list price for its
    whole runtime); the run's end turns the reservation into what it spent. Every change is a put
    conditional on the item's version, so two launches reading the same remainder cannot both
    take it: the second re-reads and is refused (docs/architecture.md, "Dollar limits").
    """

    def __init__(self, dynamodb: Any, table: str, limit_usd: float) -> None:
        self._db, self.table, self.limit_usd = dynamodb, table, float(limit_usd or 0)

    @staticmethod
    def key(moment: datetime) -> str:
        return f"#month-{moment:%Y-%m}"

    def read(self, month: str) -> dict[str, Any]:
        item = self._db.get_item(TableName=self.table, Key={"run_id": {"S": month}}, ConsistentRead=True).get("Item")
        values = {k: _from_dynamo(_deserializer.deserialize(v)) for k, v in (item or {}).items()}
        values.setdefault("version", 0)
        values.setdefault("spent_usd", 0)
        values.setdefault("reservations", {})
        return values

    def left(self, month: str) -> tuple[float, float, float]:
        """(spent by finished runs, reserved by active ones, left) this month."""
        values = self.read(month)
        reserved = sum(float(v) for v in values["reservations"].values())
        return float(values["spent_usd"]), reserved, self.limit_usd - float(values["spent_usd"]) - reserved

    def reserve(self, month: str, run_id: str, amount: float, why: str) -> None:
        """Take `amount` for `run_id`, or raise OverLimit; a no-op without a limit."""
        if self.limit_usd <= 0:
            return
        for _ in range(10):
            values = self.read(month)
            reservations = dict(values["reservations"])
            if run_id in reservations:  # another launch of the same id holds it: never take or free its dollars
                raise StaleRecord(f"run {run_id} is being launched by someone else")
            spent = float(values["spent_usd"])
            reserved = sum(float(v) for v in reservations.values())
            left = self.limit_usd - spent - reserved
            if amount > left + 1e-9:
                raise OverLimit(
                    f"monthly_limit_usd {self.limit_usd:g}: spent ${spent:,.2f} and reserved ${reserved:,.2f} by "
                    f"active runs this month, ${max(0.0, left):,.2f} left; this run may cost up to "
                    f"${amount:,.2f} ({why})"
                )
            reservations[run_id] = round(amount, 4)
            if self._put(month, values, reservations=reservations):
                return
        raise StaleRecord(f"the {month} ledger kept changing; try again")

    def settle(self, month: str, run_id: str, spent_usd: float) -> None:
        """The run ended: its reservation goes, what it spent stays. Idempotent per run."""
        for _ in range(10):
            values = self.read(month)
            reservations = dict(values["reservations"])
            if run_id not in reservations:
                return
            del reservations[run_id]
            spent = round(float(values["spent_usd"]) + float(spent_usd or 0), 4)
            if self._put(month, values, reservations=reservations, spent_usd=spent):
                return
        raise StaleRecord(f"the {month} ledger kept changing")

    def _put(self, month: str, values: dict[str, Any], **changes: Any) -> bool:
        expected = int(values["version"])
        item = {**values, **changes, "run_id": month, "kind": META_KIND, "version": expected + 1}
        condition = "attribute_not_exists(run_id)" if expected == 0 else "version = :expected"
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "Item": {k: _serializer.serialize(_to_dynamo(v)) for k, v in item.items()},
            "ConditionExpression": condition,
        }
        if expected:
            kwargs["ExpressionAttributeValues"] = {":expected": {"N": str(expected)}}
        try:
            self._db.put_item(**kwargs)
        except ClientError as error:
            if error.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise
        return True
