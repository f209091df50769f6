"""Sweeps: a group of managed runs whose parameters Optuna chooses, with one concurrency cap and one dollar limit.

A group is one item in the run table (`#group-<name>`), beside its members (ordinary managed runs,
`<name>-t<trial>`, with `group` and `trial` in their records) and its Optuna study (journal.py). The
supervisor steps every active group after its runs, each minute (docs/architecture.md, "Sweeps"):

- a member whose run ended tells Optuna its trial's result: succeeded -> COMPLETE with the objective
  from its last status.json; stopped for pruning -> PRUNED; failed after its own restarts, or ended
  any other way -> FAIL. A member reclaimed by AWS is relaunched by the supervisor as the same run:
  the same trial, parameters and checkpoints; it is never asked again;
- a running member's intermediate values (the agent's progress.json `metrics`) go to `trial.report`,
  and the pruner's `should_prune` stops it gracefully;
- as slots free, `study.ask()` gives the next trial, launched as a member through the same request
  path as `training-infra launch` (run_requests.Launcher), its parameters as TI_PARAM_<NAME> and
  TI_PARAMS (JSON) in the trainer's environment;
- the group's dollar limit: spent + one graceful stop of every running member past it stops the group.

Only one stepper works on a group at a time (a lease on the group item, taken with a conditional write),
and a trial Optuna created whose member was never recorded (a step that died between) is launched
with the trial's own parameters on the next step, never asked again.

Optuna is imported only when a group is stepped; the group model and request checks are stdlib.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

try:  # the Lambda package is this folder; the CLI imports it as part of training_infra
    from records import (
        ACTIVE_INDEX,
        MonthlyLedger,
        OverLimit,
        Run,
        RunState,
        StaleRecord,
        _from_dynamo,
        _to_dynamo,
        iso,
        parse_iso,
    )
    from run_requests import Launcher, LaunchRequest, Refused
except ImportError:  # pragma: no cover - exercised by the CLI and the tests
    from training_infra.supervisor.runtime.records import (
        ACTIVE_INDEX,
        MonthlyLedger,
        OverLimit,
        Run,
        RunState,
        StaleRecord,
        _from_dynamo,
        _to_dynamo,
        iso,
        parse_iso,
    )
    from training_infra.supervisor.runtime.run_requests import Launcher, LaunchRequest, Refused

log = logging.getLogger()

GROUP_PREFIX = "#group-"
GROUP_KIND = "group"
ACTIVE_GROUP = "group"  # the `active` value of unfinished groups in the Active index (runs use "1")
_GROUP_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}$")  # room for "-t<trial>" in a 63-character run id
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")
PARAM_KINDS = ("float", "log-float", "int", "categorical")
DIRECTIONS = ("minimize", "maximize")
PRUNERS = ("median",)
MAX_TRIALS = 1_000  # the group item keeps every trial: 1,000 stay well inside DynamoDB's 400 KB (bench_sweep.py)
MAX_PARALLEL = 100
# The group item holds every trial, inside DynamoDB's 400 KB item limit: a trial takes about this much plus its
# parameters (name and value); a sweep whose trials could pass GROUP_ITEM_BYTES is refused when it is created.
TRIAL_BYTES, PARAM_BYTES, GROUP_ITEM_BYTES = 200, 24, 350_000
KEEP_MESSAGES = 100  # finished trials' messages kept for the newest this many (each member's run keeps its own)
LAUNCHES_PER_STEP = 8  # each member's launch is a few AWS calls: a wide group ramps up over a few minutes
MESSAGE_CHARS = 200  # a trial's message, kept short for the same reason
FAILURES_IN_ROW = 3  # this many trials failed one after another, none complete between: the group ends (broken setup)
LEASE_SECONDS = 55  # the supervisor's timeout (50 s) and a margin: a stepper that died frees its group by then
_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


def group_key(name: str) -> str:
    return f"{GROUP_PREFIX}{name}"


def member_id(group: str, trial: int) -> str:
    return f"{group}-t{trial}"


def param_env(name: str) -> str:
    return f"TI_PARAM_{name.upper()}"


class GroupState(StrEnum):
    RUNNING = "running"
    STOPPING = "stopping"
    COMPLETED = "completed"  # every trial asked and told
    BUDGET = "budget"  # the group's dollar limit ended it
    STOPPED = "stopped"  # `sweep stop`

    @property
    def active(self) -> bool:
        return self in (GroupState.RUNNING, GroupState.STOPPING)


class TrialState(StrEnum):
    """A trial as the group keeps it; the last four are what Optuna was told (COMPLETE, PRUNED, FAIL, FAIL)."""

    RUNNING = "running"
    PRUNING = "pruning"  # the pruner said stop: its member is stopping gracefully
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"
    STOPPED = "stopped"  # the group stopped it (budget or `sweep stop`)

    @property
    def open(self) -> bool:
        return self in (TrialState.RUNNING, TrialState.PRUNING)


# ------------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class Param:
    """One dimension of the search space."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high))
        if self.kind == "categorical":
            return CategoricalDistribution(list(self.choices))
        return FloatDistribution(float(self.low), float(self.high), log=self.kind == "log-float")

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"type": self.kind, "choices": list(self.choices)}
        return {"type": self.kind, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str = "minimize"


@dataclass(frozen=True)
class Pruning:
    kind: str = "median"
    startup_trials: int = 5  # no pruning until this many trials completed
    warmup_steps: int = 0  # nor before this step within a trial

    def pruner(self) -> Any:
        from optuna.pruners import MedianPruner

        return MedianPruner(n_startup_trials=self.startup_trials, n_warmup_steps=self.warmup_steps)


@dataclass(frozen=True)
class SweepSpec:
    """What `sweep -f sweep.yaml` asks for, as the request function accepted it."""

    template: dict[str, Any]  # the launch request's fields every member starts from (no run id)
    space: tuple[Param, ...]
    objective: Objective
    trials: int
    parallel: int
    max_cost_usd: float
    pruning: Pruning | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "template": self.template,
            "space": {p.name: p.to_dict() for p in self.space},
            "objective": dataclasses.asdict(self.objective),
            "trials": self.trials,
            "parallel": self.parallel,
            "max_cost_usd": self.max_cost_usd,
            "pruning": dataclasses.asdict(self.pruning) if self.pruning else None,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SweepSpec:
        """The spec, or SweepRefused with one line per mistake (all of them at once)."""
        problems: list[str] = []

        def need(ok: bool, where: str, value: Any, allowed: str) -> bool:
            if not ok:
                problems.append(f"{where}: got {value!r}; allowed: {allowed}")
            return ok

        known = {"template", "space", "objective", "trials", "parallel", "max_cost_usd", "pruning", "seed"}
        for key in sorted(set(values) - known):
            near = _nearest(key, known)
            problems.append(f"{key}: unknown key; allowed: {', '.join(sorted(known))}" + (
                f" (did you mean {near}?)" if near else ""))  # fmt: skip
        template = values.get("template")
        need(isinstance(template, dict) and bool(template), "template", template, "a run spec (a map of launch keys)")
        space_in = values.get("space")
        params: list[Param] = []
        if need(isinstance(space_in, dict) and 0 < len(space_in) <= 32, "space", space_in,
                "a map of 1 to 32 parameters"):  # fmt: skip
            envs: set[str] = set()
            for name, dim in space_in.items():
                where = f"space.{name}"
                if not need(isinstance(name, str) and bool(_PARAM_NAME.match(name)), where, name,
                            "a name of letters, digits and _ (at most 40)"):  # fmt: skip
                    continue
                need(param_env(name) not in envs, where, name, "names that differ in more than case")
                envs.add(param_env(name))
                param = _param(name, dim, need)
                if param is not None:
                    params.append(param)
        objective_in = values.get("objective")
        objective = Objective(metric="")
        if need(isinstance(objective_in, dict), "objective", objective_in, "a map with metric and direction"):
            metric = objective_in.get("metric")
            direction = objective_in.get("direction", "minimize")
            need(isinstance(metric, str) and 0 < len(metric) <= 64, "objective.metric", metric,
                 "the name of a number in the heartbeat's metrics (at most 64 characters)")  # fmt: skip
            need(direction in DIRECTIONS, "objective.direction", direction, ", ".join(DIRECTIONS))
            for key in sorted(set(objective_in) - {"metric", "direction"}, key=str):
                problems.append(_unknown(f"objective.{key}", key, {"metric", "direction"}))
            objective = Objective(metric=str(metric), direction=str(direction))
        trials = values.get("trials")
        need(_whole(trials, 1, MAX_TRIALS), "trials", trials, f"a whole number from 1 to {MAX_TRIALS}")
        parallel = values.get("parallel", 1)
        need(_whole(parallel, 1, MAX_PARALLEL), "parallel", parallel, f"a whole number from 1 to {MAX_PARALLEL}")
        cost = values.get("max_cost_usd")
        need(isinstance(cost, (int, float)) and not isinstance(cost, bool) and 0 < cost <= 1_000_000,
             "max_cost_usd", cost, "the group's dollar limit, more than 0 up to 1000000")  # fmt: skip
        seed = values.get("seed", 0)
        need(_whole(seed, 0, 2**31 - 1), "seed", seed, "a whole number from 0")
        pruning = _pruning(values.get("pruning"), need, problems)
        if params and _whole(trials, 1, MAX_TRIALS):
            each = TRIAL_BYTES + sum(len(p.name) + PARAM_BYTES + max((len(str(c)) for c in p.choices), default=0)
                                     for p in params)  # fmt: skip
            need(trials * each <= GROUP_ITEM_BYTES, "trials", trials,
                 f"at most {GROUP_ITEM_BYTES // each} for this space (the group item keeps every trial's "
                 "parameters within DynamoDB's 400 KB)")  # fmt: skip
        if problems:
            raise SweepRefused(problems)
        return cls(
            template=dict(template), space=tuple(params), objective=objective, trials=int(trials),
            parallel=int(parallel), max_cost_usd=float(cost), pruning=pruning, seed=int(seed),
        )  # fmt: skip


class SweepRefused(ValueError):
    """A sweep request with mistakes: one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _whole(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _nearest(word: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, sorted(known), n=1)
    return close[0] if close else ""


def _hint(key: Any, known: set[str]) -> str:
    near = _nearest(str(key), known)
    return f" (did you mean {near}?)" if near else ""


def _unknown(where: str, key: Any, known: set[str]) -> str:
    return f"{where}: unknown key; allowed: {', '.join(sorted(known))}{_hint(key, known)}"


def _param(name: str, dim: Any, need: Any) -> Param | None:
    where = f"space.{name}"
    if not need(isinstance(dim, dict), where, dim, "a map with type and low/high or choices"):
        return None
    kind = dim.get("type")
    if not need(kind in PARAM_KINDS, f"{where}.type", kind, ", ".join(PARAM_KINDS)):
        return None
    if kind == "categorical":
        choices = dim.get("choices")
        ok = isinstance(choices, list) and 0 < len(choices) <= 100 and len(set(map(json.dumps, choices))) == len(
            choices) and all(isinstance(c, (str, int, float, bool)) for c in choices)  # fmt: skip
        need(ok, f"{where}.choices", choices, "1 to 100 distinct text, number or true/false values")
        for key in sorted(set(dim) - {"type", "choices"}, key=str):
            need(False, f"{where}.{key}", dim[key], "only type and choices for a categorical" + _hint(key, {"choices"}))
        return Param(name, kind, choices=tuple(choices)) if ok else None
    low, high = dim.get("low"), dim.get("high")
    number = int if kind == "int" else (int, float)
    ok_low = need(isinstance(low, number) and not isinstance(low, bool), f"{where}.low", low,
                  "a whole number" if kind == "int" else "a number")  # fmt: skip
    ok_high = need(isinstance(high, number) and not isinstance(high, bool), f"{where}.high", high,
                   "a whole number" if kind == "int" else "a number")  # fmt: skip
    for key in sorted(set(dim) - {"type", "low", "high"}, key=str):
        need(False, f"{where}.{key}", dim[key], "only type, low and high" + _hint(key, {"type", "low", "high"}))
    if not (ok_low and ok_high):
        return None
    if not need(low < high, f"{where}.high", high, f"more than low ({low})"):
        return None
    if kind == "log-float" and not need(low > 0, f"{where}.low", low, "more than 0 (a log scale)"):
        return None
    return Param(name, kind, low=low, high=high)


def _pruning(value: Any, need: Any, problems: list[str]) -> Pruning | None:
    if value in (None, False):
        return None
    if not need(isinstance(value, dict), "pruning", value, "a map with kind (median), startup_trials, warmup_steps"):
        return None
    kind = value.get("kind", "median")
    need(kind in PRUNERS, "pruning.kind", kind, ", ".join(PRUNERS))
    startup, warmup = value.get("startup_trials", 5), value.get("warmup_steps", 0)
    need(_whole(startup, 0, MAX_TRIALS), "pruning.startup_trials", startup, "a whole number from 0")
    need(_whole(warmup, 0, 10**12), "pruning.warmup_steps", warmup, "a whole number from 0")
    for key in sorted(set(value) - {"kind", "startup_trials", "warmup_steps"}, key=str):
        problems.append(_unknown(f"pruning.{key}", key, {"kind", "startup_trials", "warmup_steps"}))
    return Pruning(kind=str(kind), startup_trials=startup, warmup_steps=warmup) if not problems else None


@dataclass
class Trial:
    """One member of the group: Optuna's trial number, its run, what it was given and how it is doing."""

    number: int
    run_id: str
    params: dict[str, Any]
    state: TrialState = TrialState.RUNNING
    value: float | None = None  # the objective Optuna was told
    step: int | None = None  # the last intermediate step reported to Optuna
    attempts: int = 0
    cost_usd: float = 0.0
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Trial:
        known = {f.name for f in dataclasses.fields(cls)}
        trial = cls(**{k: v for k, v in values.items() if k in known})
        trial.state = TrialState(trial.state)
        return trial


@dataclass
class Group:
    """The group's item: its spec, its trials and its money."""

    name: str
    spec: SweepSpec
    created_at: str
    state: GroupState = GroupState.RUNNING
    version: int = 0
    trials: list[Trial] = field(default_factory=list)
    budget_month: str = ""  # the month ledger's reservation for the whole group, if the stack has a limit
    spent_usd: float = 0.0
    stop_requested_at: str = ""
    stop_reason: str = ""  # user | budget | refused | failures
    failures_in_row: int = 0  # trials failed since the last one that completed or was pruned
    message: str = ""
    ended_at: str = ""
    lease_until: str = ""
    best: dict[str, Any] = field(default_factory=dict)  # {number, value, params}

    @property
    def active(self) -> bool:
        return self.state.active

    @property
    def running(self) -> list[Trial]:
        return [t for t in self.trials if t.state.open]

    def _kept(self, trial: Trial, index: int) -> dict[str, Any]:
        """A trial as the item keeps it: an old finished trial's message is left to its member's run record."""
        values = trial.to_dict()
        if not trial.state.open and index < len(self.trials) - KEEP_MESSAGES:
            values.pop("message", None)
        return values

    def to_item(self) -> dict[str, Any]:
        item = {
            "run_id": group_key(self.name), "kind": GROUP_KIND, "name": self.name, "created_at": self.created_at,
            "state": self.state, "version": self.version, "spec": self.spec.to_dict(),
            "trials": [self._kept(t, i) for i, t in enumerate(self.trials)], "budget_month": self.budget_month,
            "spent_usd": self.spent_usd, "stop_requested_at": self.stop_requested_at,
            "stop_reason": self.stop_reason, "message": self.message, "ended_at": self.ended_at,
            "lease_until": self.lease_until, "best": self.best, "failures_in_row": self.failures_in_row,
        }  # fmt: skip
        if self.active:
            item["active"] = ACTIVE_GROUP
        return {key: _serializer.serialize(_to_dynamo(value)) for key, value in item.items()}

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> Group:
        values = {key: _from_dynamo(_deserializer.deserialize(value)) for key, value in item.items()}
        return cls(
            name=values["name"], spec=SweepSpec.from_dict(values["spec"]), created_at=values["created_at"],
            state=GroupState(values["state"]), version=int(values["version"]),
            trials=[Trial.from_dict(t) for t in values.get("trials", [])],
            budget_month=values.get("budget_month", ""), spent_usd=float(values.get("spent_usd", 0)),
            stop_requested_at=values.get("stop_requested_at", ""), stop_reason=values.get("stop_reason", ""),
            message=values.get("message", ""), ended_at=values.get("ended_at", ""),
            lease_until=values.get("lease_until", ""), best=values.get("best") or {},
            failures_in_row=int(values.get("failures_in_row", 0)),
        )  # fmt: skip


class GroupStore:
    """Reads and conditional writes of group items (the same version rule as run records)."""

    def __init__(self, dynamodb: Any, table: str) -> None:
        self._db, self.table = dynamodb, table

    def get(self, name: str) -> Group | None:
        item = self._db.get_item(TableName=self.table, Key={"run_id": {"S": group_key(name)}}, ConsistentRead=True)
        return Group.from_item(item["Item"]) if "Item" in item else None

    def create(self, group: Group) -> Group:
        group.version = 1
        try:
            self._db.put_item(TableName=self.table, Item=group.to_item(),
                              ConditionExpression="attribute_not_exists(run_id)")  # fmt: skip
        except ClientError as error:
            if error.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise StaleRecord(f"group {group.name} already exists") from None
            raise
        return group

    def save(self, group: Group) -> Group:
        expected = group.version
        group.version = expected + 1
        try:
            self._db.put_item(
                TableName=self.table, Item=group.to_item(), ConditionExpression="version = :expected",
                ExpressionAttributeValues={":expected": {"N": str(expected)}},
            )  # fmt: skip
        except ClientError as error:
            group.version = expected
            if error.response["Error"]["Code"] == "ConditionalCheckFailedException":
                raise StaleRecord(f"group {group.name} changed since version {expected}") from None
            raise
        return group

    def active(self) -> Iterator[Group]:
        kwargs: dict[str, Any] = {
            "TableName": self.table, "IndexName": ACTIVE_INDEX, "KeyConditionExpression": "active = :group",
            "ExpressionAttributeValues": {":group": {"S": ACTIVE_GROUP}},
        }  # fmt: skip
        while True:
            page = self._db.query(**kwargs)
            for item in page.get("Items", []):
                yield Group.from_item(item)
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


# ------------------------------------------------------------------------------------------ requests


def create_group(supervisor: Any, event: Mapping[str, Any]) -> dict[str, Any]:
    """The `sweep` request: check everything, reserve the group's limit in the month, record it, take the first step."""
    name = event.get("group")
    spec, problems = check_request(supervisor.cfg, event)
    if problems:
        raise Refused("\n".join(problems), usage=True)
    store = GroupStore(supervisor.clients.dynamodb, supervisor.cfg.table)
    if store.get(name) is not None:
        raise Refused(f"group {name} already exists: choose another name", usage=True)
    now = supervisor.now()
    month = ""
    if supervisor.cfg.monthly_limit_usd:
        month = MonthlyLedger.key(now)
        try:
            supervisor.month_ledger().reserve(month, group_key(name), spec.max_cost_usd,
                                              "the group's max_cost_usd", at=iso(now))  # fmt: skip
        except OverLimit as refused:
            raise Refused(f"sweep refused: {refused}; set a lower max_cost_usd or raise monthly_limit_usd") from None
        except StaleRecord:
            raise Refused(f"group {name} is being created by someone else right now") from None
    group = Group(name=name, spec=spec, created_at=iso(now), budget_month=month, message="created")
    try:
        store.create(group)
    except StaleRecord:
        if month:
            supervisor.month_ledger().settle(month, group_key(name), 0.0)
        raise Refused(f"group {name} already exists: choose another name", usage=True) from None
    result = GroupStep(supervisor).step(name)
    return {"ok": True, "group": name, **result}


def check_request(cfg: Any, event: Mapping[str, Any]) -> tuple[SweepSpec | None, list[str]]:
    """(the spec, []) or (None, one line per mistake): pure, against the stack's limits in `cfg`."""
    name = event.get("group")
    problems = [line for line in [name_problem(name)] if line]
    try:
        spec = SweepSpec.from_dict(event.get("sweep") if isinstance(event.get("sweep"), dict) else {})
    except SweepRefused as refused:
        return None, [*problems, *refused.problems]
    if not problems:
        problems.extend(_template_problems(spec, name, cfg))
    return (None if problems else spec), problems


def name_problem(name: Any) -> str:
    if isinstance(name, str) and _GROUP_NAME.match(name):
        return ""
    return f"group: got {name!r}; allowed: lowercase letters, digits and '-', at most 48"


def stop_group(supervisor: Any, event: Mapping[str, Any]) -> dict[str, Any]:
    """The `sweep_stop` request: no more trials; every running member stops gracefully."""
    name = event.get("group")
    if not isinstance(name, str) or not _GROUP_NAME.match(name):
        raise Refused(f"argument 'GROUP': got {name!r}; allowed: a group name", usage=True)
    group = GroupStep(supervisor).request_stop(name, "user")
    if group is None:
        raise Refused(f"group {name}: no such group", usage=True)
    return {"ok": True, "group": name, "state": group.state, "running": [t.run_id for t in group.running]}


def _template_problems(spec: SweepSpec, name: str, cfg: Any) -> list[str]:
    """The template checked as a member's launch request would be, before anything is made (each member's launch
    is checked again in full)."""
    problems = []
    types = spec.template.get("instance_types")
    if not types:  # `sweep -f` fills the stack's instance_types, as `launch` does; the request itself must name them
        problems.append(f"template.instance_types: got {types!r}; allowed: one or more instance types (the CLI fills "
                        "the stack's instance_types)")  # fmt: skip
    refused = [t for t in types if isinstance(t, str) and not cfg.type_allowed(t)] if isinstance(types, list) else []
    if refused:
        problems.append(f"template.instance_types: got {', '.join(refused)}; allowed: {cfg.allowed_instance_types} "
                        "(setting allowed_instance_types)")  # fmt: skip
    hours = spec.template.get("max_runtime_hours")
    if isinstance(hours, (int, float)) and hours > cfg.max_runtime_hours:
        problems.append(f"template.max_runtime_hours: got {hours:g}; allowed: at most the stack's max_runtime_hours "
                        f"{cfg.max_runtime_hours:g}")  # fmt: skip
    env = spec.template.get("env") or []
    if isinstance(env, list) and any(isinstance(e, str) and e.startswith(("TI_PARAM", "TI_TRIAL", "TI_GROUP"))
                                     for e in env):  # fmt: skip
        problems.append("template.env: got TI_PARAM*/TI_TRIAL/TI_GROUP; allowed: other names (the sweep sets those)")
    nodes = spec.template.get("nodes", 1)
    if nodes != 1:  # the group's money (limit, room for a member, the month) counts one instance per member
        problems.append(f"template.nodes: got {nodes!r}; allowed: 1 (multi-node sweeps are not supported yet)")
    for key in ("run_id", "resume", "action"):
        if key in spec.template:
            problems.append(f"template.{key}: got {spec.template[key]!r}; allowed: nothing (the sweep sets it)")
    try:
        LaunchRequest.from_event({**spec.template, "run_id": member_id(name, spec.trials - 1)})
    except Refused as refused:
        problems.append(f"template: {refused}")
    return problems


# ------------------------------------------------------------------------------------------ the step


def step_groups(supervisor: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Every active group, each in isolation (the reconcile's hook): (results, failures)."""
    results, failures = [], []
    stepper = GroupStep(supervisor)
    for group in list(stepper.store.active()):
        try:
            results.append(stepper.step(group.name))
        except Exception as error:  # noqa: BLE001 - reported by the caller so the errors alarm fires
            log.exception("step of group %s failed", group.name)
            failures.append(f"group {group.name}: {error}")
    return results, failures


_STUDIES: dict[tuple[str, str], Any] = {}  # (table, group) -> study, kept while the Lambda is warm


class GroupStep:
    def __init__(self, supervisor: Any) -> None:
        self.sup = supervisor
        self.cfg = supervisor.cfg
        self.store = GroupStore(supervisor.clients.dynamodb, supervisor.cfg.table)

    # --- entry points ------------------------------------------------------------------------

    def request_stop(self, name: str, reason: str) -> Group | None:
        for _ in range(5):
            group = self.store.get(name)
            if group is None or not group.active or group.stop_requested_at:
                return group
            group.state, group.stop_requested_at, group.stop_reason = GroupState.STOPPING, iso(self.sup.now()), reason
            group.message = f"stop requested ({reason})"
            try:
                self.store.save(group)
            except StaleRecord:
                continue
            self._stop_members(group, reason)
            return group
        raise RuntimeError(f"group {name} kept changing; try again")

    def step(self, name: str) -> dict[str, Any]:
        """One decision round for the group, under its lease."""
        group = self.store.get(name)
        if group is None:
            return {"group": name, "ignored": "no such group"}
        if not group.active:
            return {"group": name, "state": group.state}
        now = self.sup.now()
        lease = parse_iso(group.lease_until)
        if lease is not None and lease > now:
            return {"group": name, "skipped": f"another step holds it until {group.lease_until}"}
        group.lease_until = iso(now + timedelta(seconds=LEASE_SECONDS))
        try:
            self.store.save(group)
        except StaleRecord:
            return {"group": name, "skipped": "another step took it"}
        try:
            result = self._step(group)
        finally:
            group.lease_until = ""
            self._save_merged(group)
        return result

    def _save_merged(self, group: Group) -> None:
        """Write the step's group; a stop requested meanwhile (the only other writer under the lease) is kept."""
        for _ in range(5):
            try:
                self.store.save(group)
                return
            except StaleRecord:
                theirs = self.store.get(group.name)
                if theirs is None:
                    return
                if theirs.stop_requested_at and not group.stop_requested_at and group.active:
                    group.state, group.stop_requested_at = GroupState.STOPPING, theirs.stop_requested_at
                    group.stop_reason, group.message = theirs.stop_reason, theirs.message
                group.version = theirs.version
        raise StaleRecord(f"group {group.name} kept changing; the next step writes it")

    # --- the decisions ------------------------------------------------------------------------

    def study(self, group: Group) -> Any:
        import optuna

        try:
            from journal import DynamoJournalBackend
        except ImportError:  # pragma: no cover - exercised by the CLI and the tests
            from training_infra.supervisor.runtime.journal import DynamoJournalBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        key = (self.cfg.table, group.name)
        storage = _STUDIES.get(key)
        if storage is None or getattr(storage, "_ti_db", None) is not self.sup.clients.dynamodb:
            storage = optuna.storages.JournalStorage(
                DynamoJournalBackend(self.sup.clients.dynamodb, self.cfg.table, group.name)
            )
            storage._ti_db = self.sup.clients.dynamodb
            _STUDIES[key] = storage
        spec = group.spec
        # A new sampler each step: seeded by the group and how many trials exist, so two steps never draw the same.
        seed = int(hashlib.sha256(f"{group.name}/{spec.seed}/{len(group.trials)}".encode()).hexdigest()[:8], 16)
        sampler = optuna.samplers.TPESampler(seed=seed)
        pruner = spec.pruning.pruner() if spec.pruning else optuna.pruners.NopPruner()
        try:
            return optuna.load_study(study_name=group.name, storage=storage, sampler=sampler, pruner=pruner)
        except KeyError:
            return optuna.create_study(study_name=group.name, storage=storage, sampler=sampler, pruner=pruner,
                                       direction=spec.objective.direction)  # fmt: skip

    def _step(self, group: Group) -> dict[str, Any]:
        study = self.study(group)
        if group.state == GroupState.STOPPING:  # again each step: a member that missed the stop gets it now
            self._stop_members(group, group.stop_reason or "user")
        told: list[int] = []
        # One BatchGetItem per 100 members, and their progress.json read at once: a step's time is not 100 round trips.
        runs = {run.run_id: run for run in self.sup.store.get_many([t.run_id for t in group.running])}
        progress = self._progress_of([runs[t.run_id] for t in group.running if t.run_id in runs])
        for trial in group.running:
            if self._follow(group, study, trial, runs.get(trial.run_id), progress.get(trial.run_id)):
                told.append(trial.number)
                self._count_failure(group, trial)
        self._count_money(group)
        self._keep_within_limit(group)
        launched: list[str] = []
        if group.state == GroupState.RUNNING:
            # Trials Optuna holds as running that the group never recorded (a step died between ask and record).
            with contextlib.suppress(_TryLater):  # a passing AWS error: the rest waits for the next step
                self._launch_more(group, study, launched)
        self._best(group, study)
        for trial in group.trials:
            trial.message = trial.message[:MESSAGE_CHARS]
        if not group.running and (group.state == GroupState.STOPPING or len(group.trials) >= group.spec.trials
                                  or self._no_room(group)):  # fmt: skip
            self._end(group)
        return {"group": group.name, "state": group.state, "message": group.message, "running": len(group.running),
                "told": told,
                "launched": [x for x in launched if x], "best": group.best}  # fmt: skip

    def _launch_more(self, group: Group, study: Any, launched: list[str]) -> None:
        """Trials Optuna holds as running that the group never recorded, then new ones as slots and money allow."""
        from optuna.trial import TrialState as OptunaState

        known = {t.number for t in group.trials}
        for frozen in study.get_trials(deepcopy=False, states=(OptunaState.RUNNING,)):
            if frozen.number not in known and group.state == GroupState.RUNNING:
                launched.append(self._start(group, study, frozen.number, dict(frozen.params)))
        while (group.state == GroupState.RUNNING and len(group.running) < group.spec.parallel
               and len(group.trials) < group.spec.trials and len(launched) < LAUNCHES_PER_STEP):  # fmt: skip
            why = self._no_room(group)
            if why:
                group.message = why
                break
            fixed = {p.name: p.distribution() for p in group.spec.space}
            asked = study.ask(fixed_distributions=fixed)
            launched.append(self._start(group, study, asked.number, dict(asked.params)))

    def _progress_of(self, runs: list[Run]) -> dict[str, dict[str, Any] | None]:
        """Each active member's progress.json of its open attempt, read by a few threads (boto3 clients allow it)."""
        from concurrent.futures import ThreadPoolExecutor

        keys = {
            run.run_id: f"runs/{run.run_id}/attempts/{run.current.n}/progress.json"
            for run in runs
            if run.active and run.current is not None and run.current.instance_id
        }
        if not keys:
            return {}
        with ThreadPoolExecutor(max_workers=min(16, len(keys))) as pool:
            found = dict(zip(keys, pool.map(self._json, keys.values()), strict=True))
        return found

    def _follow(self, group: Group, study: Any, trial: Trial, run: Run | None, progress: dict[str, Any] | None) -> bool:
        """Report a running member's new values; tell Optuna when it ended. True when told."""
        from optuna.trial import TrialState as OptunaState

        if run is None:
            return False
        trial.attempts = len(run.launched)
        trial.cost_usd = round(run.spent_usd, 4)
        metric = group.spec.objective.metric
        if run.active:
            if trial.state != TrialState.RUNNING or run.current is None or not run.current.instance_id:
                return False
            value, step = _metric(progress, metric)
            if value is None or step is None or (trial.step is not None and step <= trial.step):
                return False
            optuna_trial = _trial(study, trial.number)
            optuna_trial.report(value, step)
            trial.step = step
            if group.spec.pruning and optuna_trial.should_prune():
                trial.state = TrialState.PRUNING
                trial.message = f"pruned at step {step} ({metric} {value:g})"
                self.sup.request_stop(run.run_id, "pruned")
            return False
        # The member ended: its own restarts, relaunches after AWS reclaimed it and graceful stops are all behind it.
        last = run.launched[-1] if run.launched else None
        status = self._json(f"runs/{run.run_id}/attempts/{last.n}/status.json") if last else None
        value, _ = _metric((status or {}).get("progress"), metric)
        if trial.state == TrialState.PRUNING or run.stop_reason == "pruned":
            _tell(study, trial.number, state=OptunaState.PRUNED)
            trial.state = TrialState.PRUNED
        elif run.state == RunState.SUCCEEDED and value is not None:
            _tell(study, trial.number, value)
            trial.state, trial.value, trial.message = TrialState.COMPLETE, value, f"{metric} {value:g}"
        elif run.state == RunState.SUCCEEDED:
            _tell(study, trial.number, state=OptunaState.FAIL)
            trial.state = TrialState.FAILED
            trial.message = f"succeeded without '{metric}' in its last heartbeat's metrics"
        elif run.stop_reason in ("user", "budget") or run.state == RunState.BUDGET:
            _tell(study, trial.number, state=OptunaState.FAIL)
            trial.state, trial.message = TrialState.STOPPED, f"stopped ({run.stop_reason or run.state}): {run.message}"
        else:
            _tell(study, trial.number, state=OptunaState.FAIL)
            trial.state, trial.message = TrialState.FAILED, f"{run.state}: {run.message}"
        return True

    def _count_failure(self, group: Group, trial: Trial) -> None:
        """FAILURES_IN_ROW failed trials with none complete or pruned between: the setup is broken (an image that
        crashes, a metric never written), so the group asks no more trials and ends with that reason."""
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            group.failures_in_row = 0
            return
        if trial.state != TrialState.FAILED:
            return
        group.failures_in_row += 1
        if group.failures_in_row >= FAILURES_IN_ROW and group.state == GroupState.RUNNING:
            group.state, group.stop_requested_at = GroupState.STOPPING, iso(self.sup.now())
            group.stop_reason = "failures"
            group.message = (f"{group.failures_in_row} trials failed in a row, none succeeded between (the last, "
                             f"trial {trial.number}: {trial.message}); no new trials")[:1000]  # fmt: skip
            self._stop_members(group, "user")

    def _count_money(self, group: Group) -> None:
        group.spent_usd = round(sum(t.cost_usd for t in group.trials), 4)

    def _hourly(self, run: Run | None) -> float:
        if run is None:
            return 0.0
        prices = list(run.spec.list_prices.values()) or [0.0]
        return min(max(prices), run.spec.max_price_usd or max(prices))

    def _keep_within_limit(self, group: Group) -> None:
        """Spent + one graceful stop of each running member at its dearest price reaching the limit stops the group."""
        if group.state != GroupState.RUNNING or not group.running:
            return
        runs = {run.run_id: run for run in self.sup.store.get_many([t.run_id for t in group.running])}
        hourly = sum(self._hourly(runs.get(t.run_id)) for t in group.running)
        if group.spent_usd + hourly * self.cfg.grace_hours < group.spec.max_cost_usd:
            return
        group.state, group.stop_requested_at, group.stop_reason = GroupState.STOPPING, iso(self.sup.now()), "budget"
        group.message = (
            f"spent ${group.spent_usd:,.2f} of its ${group.spec.max_cost_usd:,.2f} limit with "
            f"{len(group.running)} member(s) running: stopping them gracefully; no new trials"
        )
        self._stop_members(group, "budget")

    def _no_room(self, group: Group) -> str:
        """Why another member may not start for money, or "": one useful attempt (boot, a checkpoint interval and a
        graceful stop) of the template's dearest type must fit in what is left after the running members' grace."""
        prices = self._template_prices(group)
        useful = (self.cfg.boot_seconds + 300 + self.cfg.stop_timeout_seconds) / 3600
        running = len(group.running) * max(prices) * self.cfg.grace_hours
        left = group.spec.max_cost_usd - group.spent_usd - running
        if left < max(prices) * useful:
            return (f"${group.spec.max_cost_usd - group.spent_usd:,.2f} of the group's ${group.spec.max_cost_usd:,.2f}"
                    f" left: too little for another member")  # fmt: skip
        return ""

    def _template_prices(self, group: Group) -> list[float]:
        cap = group.spec.template.get("max_price_usd")
        known = [self._list_price(t) for t in group.spec.template.get("instance_types", [])]
        prices = [p for p in known if p is not None] or [float(cap or 0.0)]
        return [min(p, cap) if cap else p for p in prices]

    def _list_price(self, instance_type: str) -> float | None:
        try:
            from prices import Prices
        except ImportError:  # pragma: no cover
            from training_infra.supervisor.runtime.prices import Prices
        prices = self.sup.prices or Prices(ec2=self.sup.clients.ec2, region=self.sup.clients.ec2.meta.region_name,
                                           pricing=self.sup.clients.pricing)  # fmt: skip
        self.sup.prices = prices
        try:
            return prices.on_demand(instance_type).usd
        except Exception:  # noqa: BLE001 - no price: the member's own launch check refuses it with words
            return None

    def _start(self, group: Group, study: Any, number: int, params: dict[str, Any]) -> str:
        """Launch trial `number` as a member (or adopt its run, if a step that died had launched it)."""
        from optuna.trial import TrialState as OptunaState

        run_id = member_id(group.name, number)
        trial = Trial(number=number, run_id=run_id, params=params)
        group.trials.append(trial)
        existing = self.sup.store.get(run_id)
        if existing is not None:
            if existing.group == group.name and existing.trial == number:
                return run_id  # launched by a step that died before recording it: the same trial, adopted
            # A run of that name not launched for this trial (someone's own `launch --run-id lr-t3`): never taken
            # over, its spend and outcome are not the trial's.
            _tell(study, number, state=OptunaState.FAIL)
            owner = f"group {existing.group!r} trial {existing.trial}" if existing.group else "no group"
            trial.state = TrialState.FAILED
            trial.message = f"run {run_id} already exists and is not this trial's ({owner}): trial not launched"
            log.warning("group %s: %s", group.name, trial.message)
            return ""
        template = group.spec.template
        env = [*(template.get("env") or []), f"TI_GROUP={group.name}", f"TI_TRIAL={number}",
               f"TI_PARAMS={json.dumps(params, sort_keys=True, separators=(',', ':'))}",
               *(f"{param_env(k)}={_env_value(v)}" for k, v in sorted(params.items()))]  # fmt: skip
        left = group.spec.max_cost_usd - group.spent_usd
        own = template.get("max_cost_usd")
        event = {**template, "run_id": run_id, "env": env, "max_cost_usd": round(min(own or left, left), 2)}
        event["spec_yaml"] = member_spec(event)
        try:
            request = dataclasses.replace(LaunchRequest.from_event(event), group=group.name, trial=number,
                                          budget_month=group.budget_month)  # fmt: skip
            answer = Launcher(self.sup).launch(request)
        except (ClientError, StaleRecord) as error:
            # Throttling, a record changed meanwhile: not the trial's fault. It is left unrecorded, so the next step
            # launches it again with its own parameters (the "never recorded" path), and the group goes on.
            group.trials.remove(trial)
            group.message = f"trial {number} not launched yet (the next step retries): {error}"[:1000]
            log.warning("group %s trial %s not launched yet: %s", group.name, number, error)
            raise _TryLater from None
        except Refused as refused:
            _tell(study, number, state=OptunaState.FAIL)
            trial.state, trial.message = TrialState.FAILED, f"launch refused: {refused}"
            log.warning("group %s trial %s not launched: %s", group.name, number, refused)
            self._count_failure(group, trial)
            if refused.usage:  # the template itself is wrong: it refuses every member, no trials burnt on it
                group.state, group.stop_requested_at, group.stop_reason = (
                    GroupState.STOPPING,
                    iso(self.sup.now()),
                    "refused",
                )
                group.message = f"trial {number} not launched: {refused}"[:1000]
            return ""
        trial.attempts = 1 if answer.get("instance_id") else 0
        return run_id

    def _stop_members(self, group: Group, reason: str) -> None:
        for trial in group.running:
            try:
                self.sup.request_stop(trial.run_id, reason)
            except (KeyError, StaleRecord, RuntimeError) as error:
                log.warning("member %s not stopped yet (the next step retries): %s", trial.run_id, error)

    def _best(self, group: Group, study: Any) -> None:
        try:
            best = study.best_trial
        except ValueError:  # nothing complete yet
            return
        group.best = {"number": best.number, "value": best.value, "params": dict(best.params),
                      "run_id": member_id(group.name, best.number)}  # fmt: skip

    def _end(self, group: Group) -> None:
        if group.stop_reason == "budget" or (group.state == GroupState.RUNNING and self._no_room(group)
                                             and len(group.trials) < group.spec.trials):  # fmt: skip
            state = GroupState.BUDGET
        elif group.stop_reason in ("user", "refused", "failures"):
            state = GroupState.STOPPED
        else:
            state = GroupState.COMPLETED
        done = sum(1 for t in group.trials if t.state == TrialState.COMPLETE)
        best = f"; best trial {group.best['number']} {group.spec.objective.metric} {group.best['value']:g}" if (
            group.best) else ""  # fmt: skip
        why = f"{group.message}; " if group.stop_reason in ("refused", "failures") else ""  # the reason stays said
        group.state, group.ended_at = state, iso(self.sup.now())
        group.message = (f"{state}: {why}{len(group.trials)} trial(s), {done} complete, ${group.spent_usd:,.2f} spent"
                         f"{best}")[:1000]  # fmt: skip
        if group.budget_month:
            try:
                self.sup.month_ledger().settle(group.budget_month, group_key(group.name), group.spent_usd)
            except (ClientError, StaleRecord) as error:
                log.warning("month ledger not settled for group %s: %s", group.name, error)
        self.sup._notify(_AsRun(group.name), f"(group) {group.message}")

    def _json(self, key: str) -> dict[str, Any] | None:
        try:
            body = self.sup.clients.s3.get_object(Bucket=self.cfg.outputs_bucket, Key=key)["Body"].read()
        except ClientError as error:
            if error.response["Error"]["Code"] in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        try:
            value = json.loads(body)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


class _TryLater(Exception):
    """A member's launch failed for a passing reason (throttling, a changed record): the next step goes on."""


@dataclass(frozen=True)
class _AsRun:
    """What the supervisor's notice needs of a run: its id (here the group's name)."""

    run_id: str


def _tell(study: Any, number: int, value: float | None = None, state: Any = None) -> None:
    """Tell Optuna once: a trial a previous step already told (its group item not written since) is left as it is."""
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    if study._storage.get_trial(trial_id).state.is_finished():
        return
    if state is None:
        study.tell(number, value)
    else:
        study.tell(number, state=state)


def _trial(study: Any, number: int) -> Any:
    import optuna

    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    return optuna.trial.Trial(study, trial_id)


def _metric(progress: Any, metric: str) -> tuple[float | None, int | None]:
    """(the objective's value, the step) in a progress record, or None for what it lacks."""
    if not isinstance(progress, dict):
        return None, None
    metrics = progress.get("metrics")
    value = metrics.get(metric) if isinstance(metrics, dict) else None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    step = progress.get("step")
    whole = int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step) else None
    return (float(value) if ok else None), whole


def member_spec(event: Mapping[str, Any]) -> str:
    """A member's run spec (the `launch -f` layout) as it was launched: the template with the trial's parameters
    in its env, so `launch --like <member>` reruns the trial. JSON, which is YAML: this package has no YAML writer."""
    resources: dict[str, Any] = {"instance_types": list(event.get("instance_types") or [])}
    limits: dict[str, Any] = {}
    spec: dict[str, Any] = {"resources": resources, "limits": limits}
    for field_name, (part, key) in {
        "market": (resources, "market"), "max_price_usd": (resources, "max_price"), "image_tag": (spec, "image"),
        "command": (spec, "command"), "max_runtime_hours": (limits, "max_runtime_hours"),
        "max_cost_usd": (limits, "max_cost_usd"), "max_restarts_on_errors": (limits, "max_restarts_on_errors"),
    }.items():  # fmt: skip
        if event.get(field_name) is not None:
            part[key] = event[field_name]
    if event.get("subnet_ids"):
        resources["subnet_id"] = event["subnet_ids"][0]
    if event.get("stall_seconds") is not None:
        limits["stall_minutes"] = int(event["stall_seconds"]) // 60
    for key, lines in (("env", event.get("env")), ("secrets", event.get("secrets"))):
        pairs = dict(line.split("=", 1) for line in lines or [] if "=" in line)
        if pairs:
            spec[key] = pairs
    return json.dumps(spec, indent=2, sort_keys=True) + "\n"


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)
