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
import re
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

# The run's states. Active ones are kept in the sparse "Active" index the reconcile reads.
ACTIVE_STATES = ("launching", "running", "recovering", "stopping")
# "interrupted": a run from before managed runs (imported from its status.json) that spot ended.
# "invalid": a record that failed validation on read (not written by the supervisor, or corrupted): never acted on.
FINAL_STATES = (
    "succeeded", "failed", "stopped", "deadline", "budget", "idle", "stalled", "interrupted", "invalid",
)  # fmt: skip
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


class InvalidRecord(ValueError):
    """A record that is not what the supervisor writes; the message names the first field that is wrong."""


_RUN_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")
_TEMPLATE_ID = re.compile(r"^lt-[0-9a-f]{8,17}$")
_SUBNET_ID = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9-]+$")
_MONTH = re.compile(r"^#month-\d{4}-\d{2}$")


def _need(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise InvalidRecord(f"{field_name}: got {value!r}; allowed: {allowed}")


def _number(field_name: str, value: Any, lo: float, hi: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
    _need(ok, field_name, value, f"a number from {lo:g} to {hi:g}")
    return float(value)


def _optional_number(field_name: str, value: Any, lo: float, hi: float) -> float | None:
    return None if value is None else _number(field_name, value, lo, hi)


@dataclass(frozen=True)
class RunSpec:
    """What a run may do, as the supervisor accepted it: one definition for the CLI, the supervisor and the
    ledger. `from_dict` refuses anything it would not have written (docs/architecture.md, "Trust boundaries")."""

    instance_types: tuple[str, ...]
    subnet_ids: tuple[str, ...]
    market: str
    max_runtime_hours: float
    launch_template_id: str
    launch_template_version: str = "1"
    owns_launch_template: bool = True
    max_restarts_on_errors: int = 0
    checkpoint_sync_seconds: int = 300
    stall_seconds: int = 0
    image_tag: str = ""
    command: str = ""
    instance_tags: dict[str, str] = field(default_factory=dict)
    list_prices: dict[str, float] = field(default_factory=dict)
    volume_gb: int = 0
    max_price_usd: float | None = None
    max_cost_usd: float | None = None
    budget_month: str = ""
    reserved_usd: float = 0.0
    spent_before_usd: float = 0.0

    @classmethod
    def from_dict(cls, spec: Any) -> RunSpec:
        _need(isinstance(spec, dict), "spec", type(spec).__name__, "a map")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(spec) - known)
        _need(not unknown, "spec", unknown, f"only {', '.join(sorted(known))}")
        types = spec.get("instance_types")
        _need(
            isinstance(types, list) and 0 < len(types) <= 20 and all(isinstance(t, str) and _INSTANCE_TYPE.match(t)
                                                                     for t in types),
            "spec.instance_types", types, "1 to 20 instance types",
        )  # fmt: skip
        subnets = spec.get("subnet_ids")
        _need(
            isinstance(subnets, list) and 0 < len(subnets) <= 16
            and all(isinstance(s, str) and _SUBNET_ID.match(s) for s in subnets),
            "spec.subnet_ids", subnets, "1 to 16 subnet ids",
        )  # fmt: skip
        _need(spec.get("market") in MARKETS, "spec.market", spec.get("market"), ", ".join(MARKETS))
        template = spec.get("launch_template_id")
        _need(isinstance(template, str) and bool(_TEMPLATE_ID.match(template)), "spec.launch_template_id", template,
              "a launch template id")  # fmt: skip
        _need(str(spec.get("launch_template_version", "1")) == "1", "spec.launch_template_version",
              spec.get("launch_template_version"), "1 (the run's own template has one version)")  # fmt: skip
        restarts = spec.get("max_restarts_on_errors", 0)
        _need(isinstance(restarts, int) and not isinstance(restarts, bool) and 0 <= restarts <= MAX_RESTARTS,
              "spec.max_restarts_on_errors", restarts, f"a whole number from 0 to {MAX_RESTARTS}")  # fmt: skip
        tags = spec.get("instance_tags", {})
        _need(isinstance(tags, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()),
              "spec.instance_tags", tags, "a map of strings")  # fmt: skip
        prices = spec.get("list_prices", {})
        _need(isinstance(prices, dict) and all(isinstance(v, (int, float)) and v >= 0 for v in prices.values()),
              "spec.list_prices", prices, "a map of type -> USD per hour")  # fmt: skip
        month = spec.get("budget_month", "")
        _need(month == "" or (isinstance(month, str) and bool(_MONTH.match(month))), "spec.budget_month", month,
              "#month-YYYY-MM")  # fmt: skip
        for name in ("image_tag", "command"):
            _need(isinstance(spec.get(name, ""), str), f"spec.{name}", spec.get(name), "text")
        _need(isinstance(spec.get("owns_launch_template", True), bool), "spec.owns_launch_template",
              spec.get("owns_launch_template"), "true or false")  # fmt: skip
        return cls(
            instance_types=tuple(types),
            subnet_ids=tuple(subnets),
            market=spec["market"],
            max_runtime_hours=_number("spec.max_runtime_hours", spec.get("max_runtime_hours"), 0.001, 168),
            launch_template_id=template,
            launch_template_version="1",
            owns_launch_template=spec.get("owns_launch_template", True),
            max_restarts_on_errors=restarts,
            checkpoint_sync_seconds=int(_number("spec.checkpoint_sync_seconds",
                                                spec.get("checkpoint_sync_seconds", 300), 1, 86400)),
            stall_seconds=int(_number("spec.stall_seconds", spec.get("stall_seconds", 0), 0, 86400)),
            image_tag=spec.get("image_tag", ""),
            command=spec.get("command", ""),
            instance_tags=dict(tags),
            list_prices={k: float(v) for k, v in prices.items()},
            volume_gb=int(_number("spec.volume_gb", spec.get("volume_gb", 0), 0, 65536)),
            max_price_usd=_optional_number("spec.max_price_usd", spec.get("max_price_usd"), 0.0001, 1000),
            max_cost_usd=_optional_number("spec.max_cost_usd", spec.get("max_cost_usd"), 0.0001, 1_000_000),
            budget_month=month,
            reserved_usd=_number("spec.reserved_usd", spec.get("reserved_usd", 0), 0, 1_000_000),
            spent_before_usd=_number("spec.spent_before_usd", spec.get("spent_before_usd", 0), 0, 10_000_000),
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The record's `spec` map; unset optional limits are left out, as readers expect."""
        values = asdict(self)
        values["instance_types"], values["subnet_ids"] = list(self.instance_types), list(self.subnet_ids)
        for optional in ("max_price_usd", "max_cost_usd"):
            if values[optional] is None:
                del values[optional]
        if not self.budget_month:
            for name in ("budget_month", "reserved_usd"):
                del values[name]
        return values


@dataclass(frozen=True)
class Attempt:
    """One instance working on a run, as the record keeps it; `from_dict` checks the fields anything acts on."""

    n: int
    claimed_at: str = ""
    instance_id: str = ""
    instance_type: str = ""
    zone: str = ""
    subnet_id: str = ""
    market: str = ""
    started_at: str = ""
    ended_at: str = ""
    end_reason: str = ""

    @classmethod
    def from_dict(cls, attempt: Any, position: int) -> Attempt:
        _need(isinstance(attempt, dict), f"attempts[{position}]", type(attempt).__name__, "a map")
        n = attempt.get("n")
        _need(n == position + 1, f"attempts[{position}].n", n, str(position + 1))
        instance = attempt.get("instance_id") or ""
        _need(instance == "" or (isinstance(instance, str) and bool(_INSTANCE_ID.match(instance))),
              f"attempts[{position}].instance_id", instance, "an instance id")  # fmt: skip
        _need(attempt.get("market", "") in ("", "spot", "on-demand"), f"attempts[{position}].market",
              attempt.get("market"), "spot or on-demand")  # fmt: skip
        text = {name: attempt.get(name) or "" for name in ("claimed_at", "instance_type", "zone", "subnet_id",
                                                            "started_at", "ended_at", "end_reason")}  # fmt: skip
        for name, value in text.items():
            _need(isinstance(value, str), f"attempts[{position}].{name}", value, "text")
        return cls(n=n, instance_id=instance, market=attempt.get("market", ""), **text)


MAX_RESTARTS = 100


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

    def validated(self) -> tuple[RunSpec, list[Attempt]]:
        """The typed spec and attempts, or InvalidRecord: what every decision reads first."""
        _need(isinstance(self.run_id, str) and bool(_RUN_ID.match(self.run_id)), "run_id", self.run_id,
              "a run id (lowercase letters, digits, -)")  # fmt: skip
        _need(self.state in ACTIVE_STATES + FINAL_STATES, "state", self.state, "a run state")
        _need(parse_iso(self.deadline_at) is not None, "deadline_at", self.deadline_at, "an ISO 8601 time")
        _need(isinstance(self.attempts, list) and len(self.attempts) <= 10_000, "attempts", type(self.attempts),
              "a list")  # fmt: skip
        _need(isinstance(self.errors_used, int) and 0 <= self.errors_used <= MAX_RESTARTS, "errors_used",
              self.errors_used, f"0 to {MAX_RESTARTS}")  # fmt: skip
        _need(isinstance(self.cooldown, dict), "cooldown", type(self.cooldown), "a map")
        spec = RunSpec.from_dict(self.spec)
        return spec, [Attempt.from_dict(a, i) for i, a in enumerate(self.attempts)]


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

    def reserve(self, month: str, run_id: str, amount: float, why: str, at: str = "") -> None:
        """Take `amount` for `run_id`, or raise OverLimit; a no-op without a limit. `at` (when) lets the sweep free
        a reservation whose launch died before its record was written."""
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
            reserved_at = {**values.get("reserved_at", {}), run_id: at or iso(utc_now())}
            if self._put(month, values, reservations=reservations, reserved_at=reserved_at):
                return
        raise StaleRecord(f"the {month} ledger kept changing; try again")

    def settle(self, month: str, run_id: str, spent_usd: float | None) -> None:
        """The run ended: its reservation goes, what it spent stays (None: the whole reservation counts as
        spent, for a record that cannot be trusted to say). Idempotent per run."""
        for _ in range(10):
            values = self.read(month)
            reservations = dict(values["reservations"])
            if run_id not in reservations:
                return
            held = reservations.pop(run_id)
            reserved_at = {k: v for k, v in values.get("reserved_at", {}).items() if k != run_id}
            used = float(held) if spent_usd is None else float(spent_usd or 0)
            spent = round(float(values["spent_usd"]) + used, 4)
            if self._put(month, values, reservations=reservations, reserved_at=reserved_at, spent_usd=spent):
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
