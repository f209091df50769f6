"""The run record: one DynamoDB item per run, changed only by conditional writes on its version.

A run is what the user asked for; an attempt is one instance working on it. Every decider (the
CLI's first launch, EventBridge events, the one-minute reconcile) reads the item, decides, and
writes it back only if nobody wrote in between (`version` unchanged). The loser re-reads and
decides again, so two deciders never both launch (docs/architecture.md, "Managed runs").

The item is parsed into typed values (`Run`, `RunSpec`, `Attempt`, `RunState`, `AttemptEnd`) once, in
`Run.from_item`, and serialised once, in `Run.to_item`, in the format the table has always held; no
caller indexes a record with strings.

Stdlib and boto3 only: this folder is the supervisor's whole Lambda package, and the CLI imports
it too (the first launch is the same code).
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from types import NoneType, UnionType
from typing import Any, get_args, get_type_hints

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError


class RunState(StrEnum):
    """A run's state; the active ones are kept in the sparse "Active" index the reconcile reads."""

    LAUNCHING = "launching"
    RUNNING = "running"
    RECOVERING = "recovering"
    STOPPING = "stopping"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    DEADLINE = "deadline"
    BUDGET = "budget"
    IDLE = "idle"
    STALLED = "stalled"
    INTERRUPTED = "interrupted"  # a run from before managed runs (imported from its status.json) that spot ended
    INVALID = "invalid"  # failed validation on read (not written by the supervisor, or corrupted): never acted on

    @property
    def active(self) -> bool:
        return self in ACTIVE_STATES


ACTIVE_STATES = frozenset({RunState.LAUNCHING, RunState.RUNNING, RunState.RECOVERING, RunState.STOPPING})


class AttemptEnd(StrEnum):
    """How an attempt ended; INTERRUPTED and BUDGET only on runs imported from a status.json (the agent's words)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STALLED = "stalled"
    IDLE = "idle"
    DEADLINE = "deadline"
    RECLAIMED = "reclaimed"
    STOPPED = "stopped"
    CAPACITY = "capacity"
    LAUNCH_REFUSED = "launch-refused"
    INTERRUPTED = "interrupted"
    BUDGET = "budget"


MARKETS = ("spot", "on-demand", "spot-then-on-demand")
# A Capacity Block the user bought (issue 28): the run's market only with its reservation id, never asked alone.
BLOCK_MARKET = "capacity-block"
RESERVATION_ID = re.compile(r"^cr-[0-9a-f]{8}(?:[0-9a-f]{9})?$")
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
    ledger. `from_dict` refuses anything it would not have written (docs/architecture.md, "Trust boundaries"),
    but for a run imported from its status.json, which names no subnets, template or runtime (never active)."""

    instance_types: tuple[str, ...] = ()
    subnet_ids: tuple[str, ...] = ()
    market: str = "spot"
    max_runtime_hours: float = 0.0
    launch_template_id: str = ""
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
    # The stack template's version the run's template was made from (0: a record from before it was kept).
    # Versions never change, so a later deploy (a new default version) leaves the run's proof intact.
    stack_template_version: int = 0
    imported_from: str = ""  # the file a run from before the run table was recorded from
    # Instances started all-or-nothing as one gang (issue 25, gang.py); 1: a single-node run, stored without it.
    nodes: int = 1
    # The Capacity Block the run launches into (market capacity-block); "": none, stored without it.
    capacity_reservation_id: str = ""

    @classmethod
    def from_dict(cls, spec: Any) -> RunSpec:
        _need(isinstance(spec, dict), "spec", type(spec).__name__, "a map")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(spec) - known)
        _need(not unknown, "spec", unknown, f"only {', '.join(sorted(known))}")
        imported = spec.get("imported_from", "")
        _need(isinstance(imported, str), "spec.imported_from", imported, "text")
        least = 0 if imported else 1  # instance types and subnets
        types = spec.get("instance_types", [])
        _need(
            isinstance(types, list) and least <= len(types) <= 20 and all(isinstance(t, str) and _INSTANCE_TYPE.match(t)
                                                                           for t in types),
            "spec.instance_types", types, "1 to 20 instance types",
        )  # fmt: skip
        subnets = spec.get("subnet_ids", [])
        _need(
            isinstance(subnets, list) and least <= len(subnets) <= 16
            and all(isinstance(s, str) and _SUBNET_ID.match(s) for s in subnets),
            "spec.subnet_ids", subnets, "1 to 16 subnet ids",
        )  # fmt: skip
        market = spec.get("market", "")
        block = spec.get("capacity_reservation_id", "")
        _need(block == "" or (isinstance(block, str) and bool(RESERVATION_ID.match(block))),
              "spec.capacity_reservation_id", block, "a capacity reservation id cr-...")  # fmt: skip
        _need(market in MARKETS or (imported and market == "") or (market == BLOCK_MARKET and bool(block)),
              "spec.market", market, f"{', '.join(MARKETS)}; {BLOCK_MARKET} with a reservation id")  # fmt: skip
        _need(not block or market == BLOCK_MARKET, "spec.market", market, f"{BLOCK_MARKET} with a capacity "
              "reservation id")  # fmt: skip
        template = spec.get("launch_template_id", "")
        _need(isinstance(template, str) and (bool(_TEMPLATE_ID.match(template)) or (imported and not template)),
              "spec.launch_template_id", template, "a launch template id")  # fmt: skip
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
        nodes = spec.get("nodes", 1)
        _need(isinstance(nodes, int) and not isinstance(nodes, bool) and 1 <= nodes <= MAX_NODES, "spec.nodes", nodes,
              f"a whole number from 1 to {MAX_NODES}")  # fmt: skip
        return cls(
            instance_types=tuple(types),
            subnet_ids=tuple(subnets),
            market=market,
            max_runtime_hours=_number("spec.max_runtime_hours", spec.get("max_runtime_hours", 0 if imported else None),
                                      0 if imported else 0.001, 168),
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
            stack_template_version=int(
                _number("spec.stack_template_version", spec.get("stack_template_version", 0), 0, 10_000_000)
            ),
            imported_from=imported,
            nodes=nodes,
            capacity_reservation_id=block,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The record's `spec` map, as written since runs were first recorded: unset optional limits left out."""
        values = asdict(self)
        values["instance_types"], values["subnet_ids"] = list(self.instance_types), list(self.subnet_ids)
        if self.imported_from:
            return {name: values[name] for name in ("imported_from", "market", "instance_types", "list_prices")}
        del values["imported_from"]
        for optional in ("max_price_usd", "max_cost_usd"):
            if values[optional] is None:
                del values[optional]
        if not self.budget_month:
            for name in ("budget_month", "reserved_usd"):
                del values[name]
        if not self.stack_template_version:
            del values["stack_template_version"]
        if self.nodes == 1:  # single-node records stay as they always were
            del values["nodes"]
        if not self.capacity_reservation_id:
            del values["capacity_reservation_id"]
        return values


class MemberState(StrEnum):
    """A gang member's place in its attempt (gang.py)."""

    RUNNING = "running"  # started (pending or running on EC2) and still a member
    LOST = "lost"  # ended while its attempt goes on: a replacement for its node is wanted
    REPLACED = "replaced"  # lost, and a replacement took its node
    ENDED = "ended"  # ended with its attempt


@dataclass
class Member:
    """One instance of a gang attempt: node `node` (0 is the rendezvous host)."""

    node: int
    instance_id: str = ""
    instance_type: str = ""
    zone: str = ""
    subnet_id: str = ""
    private_ip: str = ""
    market: str = ""
    state: MemberState = MemberState.RUNNING
    started_at: str = ""
    ended_at: str = ""
    end_reason: AttemptEnd | None = None
    message: str = ""
    reclaim_warned_at: str = ""
    impaired_since: str = ""  # EC2 status checks first seen impaired
    price_usd: float | None = None  # the agent's hourly estimate (the node's status.json)
    priced: bool = False
    cost_usd: float | None = None
    on_demand_usd: float | None = None
    hourly_usd: float | None = None
    price_source: str = ""

    @classmethod
    def from_dict(cls, member: Any, where: str) -> Member:
        _need(isinstance(member, dict), where, type(member).__name__, "a map")
        typed, problems = _typed(cls, member, where)
        if problems:
            raise InvalidRecord(problems[0])
        node = typed.get("node")
        _need(isinstance(node, int) and 0 <= node < MAX_NODES, f"{where}.node", member.get("node"),
              f"0 to {MAX_NODES - 1}")  # fmt: skip
        instance = typed.get("instance_id", "")
        _need(bool(_INSTANCE_ID.match(instance)), f"{where}.instance_id", instance, "an instance id")
        _need(typed.get("market", "") in ("", "spot", "on-demand", BLOCK_MARKET), f"{where}.market",
              typed.get("market"), f"spot, on-demand or {BLOCK_MARKET}")  # fmt: skip
        return cls(**typed)

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name in ("node", "instance_id", "state") or getattr(self, f.name) != _default(f)
        }

    @property
    def live(self) -> bool:
        return self.state == MemberState.RUNNING


@dataclass
class Attempt:
    """One instance working on a run (or the claim of one, before it starts)."""

    n: int
    why: str = ""
    claimed_at: str = ""
    instance_id: str = ""
    instance_type: str = ""
    zone: str = ""
    subnet_id: str = ""
    market: str = ""  # spot | on-demand, once an instance started
    started_at: str = ""
    ended_at: str = ""
    end_reason: AttemptEnd | None = None
    message: str = ""
    errors: list[dict[str, str]] = field(default_factory=list)  # per-pool capacity errors of the last try
    tries: int = 1  # capacity failures in a row kept as one attempt
    replaces: int = 0  # started on attempt n's spot notice, while n saved (replacement.py)
    exit_code: int | None = None
    price_usd: float | None = None  # the agent's hourly estimate (status.json)
    reclaim_warned_at: str = ""
    rebalance_at: str = ""
    impaired_since: str = ""  # EC2 status checks first seen impaired
    unhealthy: str = ""  # why the supervisor ended a hung box
    stop_tagged_at: str = ""
    terminated_at: str = ""
    # The price, recorded once the attempt ended (ledger.record_price): `status` and `cost` read it from here.
    priced: bool = False
    cost_usd: float | None = None
    on_demand_usd: float | None = None
    hourly_usd: float | None = None
    price_source: str = ""
    # A gang (spec.nodes > 1, gang.py): every instance, replacements included; `instance_id` is node 0's.
    members: list[Member] = field(default_factory=list)
    placement_group: str = ""
    security_group: str = ""  # the attempt's gang group (its members reach each other; gang.py)
    launch_template_version: str = ""  # the run template's version the gang used ("": the spec's)
    replace_since: str = ""  # a non-host member lost at; cleared once its replacement runs
    gang_ending: AttemptEnd | None = None  # the whole gang is being stopped, and why
    gang_ending_words: str = ""

    @classmethod
    def from_dict(cls, attempt: Any, position: int) -> Attempt:
        where = f"attempts[{position}]"
        _need(isinstance(attempt, dict), where, type(attempt).__name__, "a map")
        typed, problems = _typed(cls, attempt, where)
        if problems:
            raise InvalidRecord(problems[0])
        members = typed.pop("members", [])
        _need(len(members) <= 4 * MAX_NODES, f"{where}.members", len(members), f"at most {4 * MAX_NODES}")
        typed["members"] = [Member.from_dict(m, f"{where}.members[{i}]") for i, m in enumerate(members)]
        _need(typed.get("n") == position + 1, f"{where}.n", attempt.get("n"), str(position + 1))
        instance = typed.get("instance_id", "")
        _need(instance == "" or bool(_INSTANCE_ID.match(instance)), f"{where}.instance_id", instance,
              "an instance id")  # fmt: skip
        _need(typed.get("market", "") in ("", "spot", "on-demand", BLOCK_MARKET), f"{where}.market",
              typed.get("market"), f"spot, on-demand or {BLOCK_MARKET}")  # fmt: skip
        return cls(**typed)

    def to_dict(self) -> dict[str, Any]:
        """The keys set, as the record has always kept them (a fresh claim is n, why and claimed_at)."""
        values = {
            f.name: getattr(self, f.name) for f in fields(self) if f.name == "n" or getattr(self, f.name) != _default(f)
        }
        if self.members:
            values["members"] = [member.to_dict() for member in self.members]
        return values

    def members_of(self, node: int) -> list[Member]:
        return [member for member in self.members if member.node == node]

    def live_member(self, node: int) -> Member | None:
        return next((m for m in self.members if m.node == node and m.live), None)

    def end(self, reason: AttemptEnd, message: str, at: str) -> None:
        self.ended_at, self.end_reason, self.message = at, reason, message


MAX_RESTARTS = 100
MAX_NODES = 64  # a record's ceiling; the stack's own (config max_nodes) is at most this


@dataclass
class Run:
    """The record as typed values: parsed once when the store reads it, serialised once when it writes it."""

    run_id: str
    spec: RunSpec
    deadline_at: str
    created_at: str
    state: RunState = RunState.LAUNCHING
    version: int = 0
    attempts: list[Attempt] = field(default_factory=list)
    errors_used: int = 0
    cooldown: dict[str, str] = field(default_factory=dict)  # "type@zone" -> until (ISO)
    stop_requested_at: str = ""
    stop_reason: str = ""  # user | budget (a stall is an error with restarts, never a requested stop)
    message: str = ""
    ended_at: str = ""
    spent_usd: float = 0.0  # every attempt so far, kept by the supervisor for the dollar limits
    spec_yaml: str = ""  # the run spec file as the user asked (specs.py); "" for runs launched before it was kept
    # A sweep's member (sweeps.py): its group and Optuna trial number; "" and None for a run of its own.
    group: str = ""
    trial: int | None = None
    # Why the stored item failed validation on read, or "". Such a run is never acted on: its values stay as
    # stored (`stored`) and are written back so, but for the state, message and end the supervisor gives it.
    problem: str = field(default="", compare=False)
    stored: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def active(self) -> bool:
        return self.state.active

    @property
    def current(self) -> Attempt | None:
        """The attempt still open (launched or being launched), if any."""
        if self.attempts and not self.attempts[-1].ended_at:
            return self.attempts[-1]
        return None

    @property
    def launched(self) -> list[Attempt]:
        """The attempts that had an instance."""
        return [a for a in self.attempts if a.instance_id]

    def summary(self) -> dict[str, Any]:
        """What `cost` lists for a finished run, kept beside the attempts so a period's runs are read
        without them (a projection): the attempts' recorded prices added up. `complete` only when the
        run has ended and every attempt that had an instance was priced."""
        launched = self.launched

        def total(values: list[float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return round(sum(known), 6) if known else None

        seconds = 0.0
        for attempt in launched:
            start, end = parse_iso(attempt.started_at), parse_iso(attempt.ended_at)
            seconds += (end - start).total_seconds() if start and end and end > start else 0.0
        last = launched[-1] if launched else Attempt(n=0)
        return {
            "complete": not self.active and all(a.priced for a in launched),
            "tries": len(launched),
            "first_started_at": launched[0].started_at if launched else "",
            "seconds": seconds,
            "cost_usd": total([a.cost_usd for a in launched]),
            "on_demand_usd": total([a.on_demand_usd for a in launched]),
            "price_source": last.price_source,
            "instance_type": last.instance_type,
            "market": last.market,
        }

    def to_item(self) -> dict[str, Any]:
        item = {
            "run_id": self.run_id,
            "kind": RUN_KIND,
            "created_at": self.created_at,
            "state": self.state,
            "version": self.version,
            "spec": self.spec.to_dict(),
            "deadline_at": self.deadline_at,
            "attempts": [attempt.to_dict() for attempt in self.attempts],
            "errors_used": self.errors_used,
            "cooldown": self.cooldown,
            "stop_requested_at": self.stop_requested_at,
            "stop_reason": self.stop_reason,
            "message": self.message,
            "ended_at": self.ended_at,
            "spent_usd": self.spent_usd,
            "summary": self.summary(),
        }
        if self.spec_yaml:
            item["spec_yaml"] = self.spec_yaml
        if self.group:
            item["group"], item["trial"] = self.group, self.trial
        if self.problem:  # as it was read, so nothing it said is lost
            changed = ("state", "version", "message", "ended_at")
            item = {**{k: v for k, v in self.stored.items() if k != "active"}, **{k: item[k] for k in changed}}
        if self.active:
            item["active"] = "1"  # sparse index: only active runs are in it
        return {key: _serializer.serialize(_to_dynamo(value)) for key, value in item.items()}

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> Run:
        """The typed run; an item that fails validation reads too, with `problem` saying why (never raises)."""
        values = {key: _from_dynamo(_deserializer.deserialize(value)) for key, value in item.items()}
        typed, problems = _typed(cls, values, "record", skip=("spec", "attempts", "problem", "stored"))
        run = cls(**{"run_id": "", "deadline_at": "", "created_at": "", **typed, "spec": RunSpec()})
        if "state" not in typed:  # unknown: never treated as active
            run.state = RunState.INVALID
            problems.append(f"state: got {values.get('state')!r}; allowed: a run state")
        if not _RUN_ID.match(run.run_id):
            problems.append(f"run_id: got {values.get('run_id')!r}; allowed: a run id (lowercase letters, digits, -)")
        if not 0 <= run.errors_used <= MAX_RESTARTS:
            problems.append(f"errors_used: got {run.errors_used!r}; allowed: 0 to {MAX_RESTARTS}")
        try:
            run.spec = RunSpec.from_dict(values.get("spec"))
            attempts = values.get("attempts", [])
            _need(isinstance(attempts, list) and len(attempts) <= 10_000, "attempts", type(attempts).__name__,
                  "a list of at most 10,000")  # fmt: skip
            run.attempts = [Attempt.from_dict(a, i) for i, a in enumerate(attempts)]
        except InvalidRecord as error:
            problems.append(str(error))
        if problems:
            run.problem, run.stored = problems[0], values
        return run


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _default(spec: Any) -> Any:
    return spec.default_factory() if callable(spec.default_factory) else spec.default


def _typed(cls: type, values: dict[str, Any], where: str, skip: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """The values of `cls`'s fields found in `values`, each of its annotated type (an absent or null one keeps
    its default), and what did not fit."""
    typed: dict[str, Any] = {}
    problems: list[str] = []
    for name, hint in _hints(cls).items():
        value = values.get(name)
        if name in skip or value is None:
            continue
        kind = next(k for k in (get_args(hint) if isinstance(hint, UnionType) else (hint,)) if k is not NoneType)
        kind = getattr(kind, "__origin__", kind)  # list[...] -> list
        if issubclass(kind, StrEnum):
            if value == "":
                continue
            if value in kind._value2member_map_:
                typed[name] = kind(value)
                continue
        elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            typed[name] = float(value)
            continue
        elif isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            typed[name] = value
            continue
        allowed = ", ".join(kind) if issubclass(kind, StrEnum) else kind.__name__
        problems.append(f"{where}.{name}: got {value!r}; allowed: {allowed}")
    return typed, problems


def _to_dynamo(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str(value)  # an enum member as its value
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
