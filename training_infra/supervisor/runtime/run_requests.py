"""Launch, resume and stop as requests to the supervisor: the one trust boundary (docs/architecture.md,
"Trust boundaries").

A user may invoke the supervisor; nothing else they hold can write a run record, make a launch
template or start an instance. So every request is checked here against the deployed stack's limits
(its environment, never the caller's word): allowed instance types, the stack's subnets, the runtime
against the stack's max_runtime_hours and the boot + checkpoint floor, the restart cap, the market, the
dollar limits against the month's ledger. Then the supervisor reserves the money, makes the run's
launch template from the stack template's *default* version (never `$Latest`: a version someone added
is not what was deployed), writes the record and starts attempt 1, and answers with the run id and
the attempt. The CLI's preflight runs before, client side, for its quick answers; nothing it says is
trusted here.

Stdlib and boto3 only: this folder is the Lambda package (the CLI imports it for the local AWS, which
runs no Lambda: the same handler, in process).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

try:  # the Lambda package is this folder; the CLI imports it as part of training_infra
    import blocks
    import ledger
    import specs
    from prices import Prices
    from records import (
        MARKETS,
        MAX_NODES,
        MAX_RESTARTS,
        Attempt,
        MonthlyLedger,
        OverLimit,
        Run,
        RunSpec,
        RunState,
        StaleRecord,
        iso,
    )
except ImportError:  # pragma: no cover - exercised by the CLI and the tests
    from training_infra.supervisor.runtime import blocks, ledger, specs
    from training_infra.supervisor.runtime.prices import Prices
    from training_infra.supervisor.runtime.records import (
        MARKETS,
        MAX_NODES,
        MAX_RESTARTS,
        Attempt,
        MonthlyLedger,
        OverLimit,
        Run,
        RunSpec,
        RunState,
        StaleRecord,
        iso,
    )

log = logging.getLogger()

OVERRIDES_MARKER = "#@run-overrides"  # the same marker compute/user_data.py renders
USER_DATA_LIMIT_BYTES = 16 * 1024
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RUN_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_SECRET_REF = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*=(ssm:/training-infra/[A-Za-z0-9_.\-/]{1,1000}"
    r"|arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[A-Za-z0-9/_+=.@-]{1,512})$"
)
RESERVED_RUN_IDS = ("latest", "default")
# LaunchTemplateData keys a run's template copies from the stack template's default version (no type, no
# market, no placement: the fleet chooses).
RUN_TEMPLATE_KEYS = (
    "ImageId", "KeyName", "SecurityGroupIds", "SecurityGroups", "IamInstanceProfile", "BlockDeviceMappings",
    "NetworkInterfaces", "MetadataOptions", "InstanceInitiatedShutdownBehavior", "Monitoring", "EbsOptimized",
    "CreditSpecification", "CpuOptions", "HibernationOptions", "DisableApiTermination", "DisableApiStop",
    "PrivateDnsNameOptions", "MaintenanceOptions", "EnclaveOptions", "CapacityReservationSpecification",
    "LicenseSpecifications", "KernelId", "RamdiskId",
)  # fmt: skip


class Refused(Exception):
    """A request the stack's limits do not allow; `usage` when the caller's input is wrong (the CLI exits 2)."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def insert_overrides(user_data: str, overrides: Mapping[str, object]) -> str:
    """Per-run exports after the stack's, before the bootstrap: the twin of compute/user_data.py's
    `with_run_overrides` (a test holds them equal), here because the Lambda package is this folder."""
    line = f"\n{OVERRIDES_MARKER}\n"
    position = user_data.rfind(line)
    if position < 0:
        raise Refused("the stack template's user data was not rendered by training-infra (no run-overrides marker)")
    exports = []
    for name, value in overrides.items():
        if not _ENV_NAME.match(name):
            raise Refused(f"environment variable name {name!r} is not valid")
        value = ("true" if value else "false") if isinstance(value, bool) else value
        exports.append(f"export {name}={shlex.quote(str(value))}")
    rendered = user_data[: position + 1] + "".join(f"{export}\n" for export in exports) + user_data[position + 1 :]
    if len(rendered.encode()) > USER_DATA_LIMIT_BYTES:
        raise Refused(f"user data is {len(rendered.encode())} bytes; EC2 allows {USER_DATA_LIMIT_BYTES}", usage=True)
    return rendered


# The exports a run's template may add to the stack's user data (all built by Launcher.overrides from checked
# fields); TI_RUN_SEAL seals the record's limits into the template (run_seal).
SEAL_EXPORT = "TI_RUN_SEAL"
RUN_OVERRIDES = frozenset({
    "TI_RUN_ID", "TI_DEADLINE_AT", "TI_MARKET", "TI_HOURLY_PRICE_USD", "TI_IMAGE_TAG", "TI_TRAINING_COMMAND",
    "TI_MAX_RUNTIME_SECONDS", "TI_STALL_SECONDS", "TI_EXTRA_ENV", "TI_SECRETS", "TI_DATA_ACCESS", SEAL_EXPORT,
    "TI_GANG_REPLACE_SECONDS", "TI_NCCL_EFA_CHECK",
})  # fmt: skip
DATA_ACCESS = ("sync", "mount")  # the agent's TI_DATA_ACCESS (ti_agent/settings.py CHOICES)


def run_seal(spec: RunSpec, deadline_at: str) -> str:
    """The record's limits as the supervisor wrote them, hashed into its run template's user data (version 1,
    which nobody can change): a record whose limits say otherwise was written around the supervisor."""

    def number(value: float | None) -> float | None:
        return None if value is None else float(value)

    sealed = {
        "instance_types": list(spec.instance_types), "subnet_ids": list(spec.subnet_ids), "market": spec.market,
        "max_restarts_on_errors": int(spec.max_restarts_on_errors),
        "max_runtime_hours": number(spec.max_runtime_hours), "max_price_usd": number(spec.max_price_usd),
        "max_cost_usd": number(spec.max_cost_usd), "budget_month": spec.budget_month,
        "reserved_usd": number(spec.reserved_usd), "spent_before_usd": number(spec.spent_before_usd),
        "deadline_at": deadline_at,
    }  # fmt: skip
    if spec.stack_template_version:  # which stack version the run's template is compared with
        sealed["stack_template_version"] = spec.stack_template_version
    if spec.nodes > 1:  # a gang's size is a limit too (its cost is N instances); single-node seals stay as they were
        sealed["nodes"] = spec.nodes
    return hashlib.sha256(json.dumps(sealed, sort_keys=True).encode()).hexdigest()


def _run_data(data: Mapping[str, Any]) -> dict[str, Any]:
    """The launch-template data a run's template copies from the stack's (MetadataOptions without its State)."""
    copied = {key: data[key] for key in RUN_TEMPLATE_KEYS if key in data}
    if "MetadataOptions" in copied:
        copied["MetadataOptions"] = {k: v for k, v in copied["MetadataOptions"].items() if k != "State"}
    return copied


def stack_template_problem(cfg: Any, data: Mapping[str, Any], *, current: bool = True) -> str:
    """Why the stack template's default version is not what the stack deployed, or "": its image is the one the
    deploy passed the function (IMAGE_ID), its profile and security group the stack's, its user data rendered by
    training-infra. Anyone with CreateLaunchTemplateVersion + ModifyLaunchTemplate could change the default.
    `current=False`: an older version a run was launched from, whose image was checked at that launch (a later
    deploy may resolve a newer AMI)."""
    image = data.get("ImageId", "")
    if current and cfg.image_id and image != cfg.image_id:
        return f"the stack template's default version names image {image!r}, not the deployed {cfg.image_id}"
    profile = data.get("IamInstanceProfile", {}).get("Arn", "")
    if cfg.instance_profile_arn and profile != cfg.instance_profile_arn:
        return f"the stack template's default version names instance profile {profile!r}, not the project's"
    groups = data.get("SecurityGroupIds") or []
    if data.get("NetworkInterfaces") or (cfg.security_group_id and groups != [cfg.security_group_id]):
        return f"the stack template's default version names another network ({groups}), not the stack's group"
    user_data = base64.b64decode(data.get("UserData") or "").decode(errors="replace")
    if f"\n{OVERRIDES_MARKER}\n" not in user_data:
        return "the stack template's default version has user data not rendered by training-infra"
    return ""


def run_template_problem(cfg: Any, stack_data: Mapping[str, Any], template: Mapping[str, Any],
                         data: Mapping[str, Any], run: Run) -> str:  # fmt: skip
    """Why `template` (version 1 `data`) is not the launch template the supervisor made for this record, or "".

    The one check both the request function and the supervisor rely on (docs/architecture.md, "Trust
    boundaries"): its name and created-by tag; its creator (CreatedBy) when the stack names the functions'
    roles; the stack template's default version, key for key, with only this run's overrides added to the user
    data; and the seal of the record's limits (run_seal). Name and tags alone can be copied by anyone who may
    create and tag templates; the content cannot differ from the stack's."""
    tags = {t["Key"]: t["Value"] for t in template.get("Tags", [])}
    name = template.get("LaunchTemplateName", "")
    template_id = template.get("LaunchTemplateId", run.spec.launch_template_id)
    if (name != f"{cfg.run_template_prefix}{run.run_id}" or tags.get(cfg.created_by_tag) != "supervisor"
            or tags.get(cfg.run_id_tag) != run.run_id):  # fmt: skip
        return f"launch template {template_id} was not made by the supervisor for run {run.run_id}"
    creators = [c for c in cfg.template_creators.split(",") if c]
    created_by = template.get("CreatedBy", "")
    if creators and not any(f":assumed-role/{role}/" in created_by or created_by.endswith(f":role/{role}")
                            for role in creators):  # fmt: skip
        return f"launch template {template_id} was created by {created_by or 'nobody known'}, not the supervisor"
    problem = stack_template_problem(cfg, stack_data, current=not run.spec.stack_template_version)
    if problem:
        return problem
    expected, actual = _run_data(stack_data), _run_data(data)
    allowed = {"UserData", "TagSpecifications"}
    block = run.spec.capacity_reservation_id
    if block:  # the one market a run's template may add: the block its record names (blocks.py)
        expected = blocks.template_data(expected, block)
        actual = {**actual, **{k: data[k] for k in ("InstanceMarketOptions",) if k in data}}
        allowed.add("InstanceMarketOptions")
    extra = sorted(set(data) - set(RUN_TEMPLATE_KEYS) - allowed)
    differ = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k)) + extra
    if differ:
        return (f"launch template {template_id} differs from the stack template's default version in "
                f"{', '.join(differ)}")  # fmt: skip
    base = base64.b64decode(stack_data["UserData"]).decode()
    mine = base64.b64decode(data.get("UserData") or "").decode(errors="replace")
    exports = _overrides_in(base, mine)
    if exports is None or not set(exports) <= RUN_OVERRIDES:
        return f"launch template {template_id} has user data other than the stack's plus a run's overrides"
    if exports.get("TI_RUN_ID") != run.run_id:
        return f"launch template {template_id} was made for run {exports.get('TI_RUN_ID')!r}, not {run.run_id}"
    if exports.get(SEAL_EXPORT) != run_seal(run.spec, run.deadline_at):
        return (f"the record's limits (types, subnets, market, restarts, runtime, deadline, dollars) are not "
                f"those launch template {template_id} was made with")  # fmt: skip
    return ""


def _overrides_in(base: str, mine: str) -> dict[str, str] | None:
    """The exports `insert_overrides` put into `base` to make `mine`, or None when `mine` is anything else."""
    position = base.rfind(f"\n{OVERRIDES_MARKER}\n")
    head, tail = base[: position + 1], base[position + 1 :]
    if position < 0 or not mine.startswith(head) or not mine.endswith(tail) or len(mine) < len(head) + len(tail):
        return None
    lexer = shlex.shlex(mine[len(head) : len(mine) - len(tail)], posix=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    try:
        words = list(lexer)
    except ValueError:
        return None
    if len(words) % 2 or any(w != "export" for w in words[::2]):
        return None
    exports = dict(word.partition("=")[::2] for word in words[1::2])
    try:
        return exports if insert_overrides(base, exports) == mine else None
    except Refused:
        return None


def template_exports(user_data: str) -> dict[str, str]:
    """The `export TI_...=` values the stack baked into the user data (before the overrides marker), read as
    bash would (shell quoting, multi-line values such as TI_EXTRA_ENV)."""
    lexer = shlex.shlex(user_data.rsplit(f"\n{OVERRIDES_MARKER}\n", 1)[0], posix=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    values: dict[str, str] = {}
    try:
        words = list(lexer)
    except ValueError:
        return values  # not quoted as render_user_data quotes: use the defaults
    for previous, word in zip(words, words[1:], strict=False):
        name, sep, value = word.partition("=")
        if previous == "export" and sep and name.startswith("TI_"):
            values[name] = value
    return values


def _text(event: Mapping[str, Any], name: str, default: str | None = None) -> str | None:
    value = event.get(name, default)
    if value is not None and not isinstance(value, str):
        raise Refused(f"request field '{name}': got {value!r}; allowed: text", usage=True)
    return value


def _strings(event: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = event.get(name) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Refused(f"request field '{name}': got {value!r}; allowed: a list of text", usage=True)
    return tuple(value)


def _number(event: Mapping[str, Any], name: str, option: str, lo: float, hi: float) -> float | None:
    value = event.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value <= hi:
        raise Refused(f"option '{option}': got {value!r}; allowed: a number greater than {lo:g} up to {hi:g}",
                      usage=True)  # fmt: skip
    return float(value)


@dataclass(frozen=True)
class LaunchRequest:
    """What a caller asks for; every field is checked here again, whatever the CLI checked."""

    run_id: str
    resume: bool
    instance_types: tuple[str, ...]
    subnet_ids: tuple[str, ...]
    market: str
    max_restarts_on_errors: int
    max_runtime_hours: float | None
    stall_seconds: int | None
    image_tag: str | None
    command: str | None
    env: tuple[str, ...]
    secrets: tuple[str, ...]
    max_price_usd: float | None
    max_cost_usd: float | None
    nodes: int = 1
    spec_yaml: str = ""  # the run spec as asked (specs.py): kept with the run, never trusted
    data_access: str | None = None  # sync | mount (issue 29); None: the stack's
    capacity_reservation_id: str = ""  # a Capacity Block the user bought (blocks.py); market capacity-block
    nccl_efa_check: bool = True  # False: a gang's agents skip the NCCL-uses-EFA check (launch --no-nccl-efa-check)
    # Set only by a sweep's step (sweeps.py), never from a caller's event: the member's group and trial, and the
    # month its group reserved for all its members (so a member reserves nothing of its own).
    group: str = ""
    trial: int | None = None
    budget_month: str = ""

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> LaunchRequest:
        run_id = _text(event, "run_id") or ""
        if not _RUN_ID.match(run_id) or run_id in RESERVED_RUN_IDS:
            raise Refused(f"option '--run-id': got {run_id!r}; allowed: lowercase letters, digits and '-', at most "
                          "63, not latest or default", usage=True)  # fmt: skip
        market = _text(event, "market") or ""
        block = _block(event)
        if market not in MARKETS and not (block and market == blocks.BLOCK_MARKET):
            raise Refused(f"option '--market': got {market!r}; allowed: {', '.join(MARKETS)} ({blocks.BLOCK_MARKET} "
                          "only with --capacity-reservation)", usage=True)  # fmt: skip
        if block and market != blocks.BLOCK_MARKET:
            raise Refused(f"option '--market': got {market!r} with --capacity-reservation {block}; allowed: "
                          f"{blocks.BLOCK_MARKET} (a block is neither spot nor on-demand)", usage=True)  # fmt: skip
        if block and event.get("max_price_usd") is not None:
            raise Refused(f"option '--max-price': got {event.get('max_price_usd')!r} with --capacity-reservation "
                          f"{block}; allowed: none (a block is prepaid)", usage=True)  # fmt: skip
        restarts = event.get("max_restarts_on_errors", 0)
        if isinstance(restarts, bool) or not isinstance(restarts, int) or not 0 <= restarts <= MAX_RESTARTS:
            raise Refused(f"option '--max-restarts-on-errors': got {restarts!r}; allowed: a whole number from 0 to "
                          f"{MAX_RESTARTS}", usage=True)  # fmt: skip
        stall = event.get("stall_seconds")
        if stall is not None and (isinstance(stall, bool) or not isinstance(stall, int) or not 0 <= stall <= 86400):
            raise Refused(f"option '--stall-minutes': got {stall!r}; allowed: 0 to 1440 minutes", usage=True)
        env = _strings(event, "env")
        for item in env:
            key, sep, value = item.partition("=")
            if not sep or not _ENV_KEY.match(key) or "\n" in value:
                raise Refused(f"option '--env': got {item!r}; allowed: KEY=VALUE with a one-line VALUE", usage=True)
        refs = _strings(event, "secrets")
        for item in refs:
            name = item.partition("=")[0]
            if not _SECRET_REF.match(item) or name.startswith(("AWS_", "TI_")):
                raise Refused(f"option '--secret': got {item!r}; allowed: NAME=ssm:/training-infra/PATH or "
                              "NAME=arn:aws:secretsmanager:...", usage=True)  # fmt: skip
        data_access = _text(event, "data_access")
        if data_access is not None and data_access not in DATA_ACCESS:
            raise Refused(f"option '--data-access': got {data_access!r}; allowed: {', '.join(DATA_ACCESS)}", usage=True)
        nccl_efa_check = event.get("nccl_efa_check", True)
        if not isinstance(nccl_efa_check, bool):
            raise Refused(f"option '--no-nccl-efa-check': got {nccl_efa_check!r}; allowed: true or false", usage=True)
        return cls(
            run_id=run_id,
            resume=bool(event.get("resume", False)),
            instance_types=_strings(event, "instance_types"),
            subnet_ids=_strings(event, "subnet_ids"),
            market=market,
            max_restarts_on_errors=restarts,
            max_runtime_hours=_number(event, "max_runtime_hours", "--max-runtime-hours", 0, 168),
            stall_seconds=stall,
            image_tag=_text(event, "image_tag"),
            command=_text(event, "command"),
            env=env,
            secrets=refs,
            max_price_usd=_number(event, "max_price_usd", "--max-price", 0, 1000),
            max_cost_usd=_number(event, "max_cost_usd", "--max-cost-usd", 0, 1_000_000),
            nodes=_nodes(event),
            spec_yaml=_spec_text(event),
            data_access=data_access,
            capacity_reservation_id=block,
            nccl_efa_check=nccl_efa_check,
        )


def _block(event: Mapping[str, Any]) -> str:
    """`--capacity-reservation`: the id's shape here; what EC2 says of it, in `Launcher.block`."""
    value = event.get("capacity_reservation_id")
    if value in (None, ""):
        return ""
    try:
        return blocks.reservation_id(value)
    except blocks.BlockRefused as refused:
        raise Refused(str(refused), usage=True) from None


def _nodes(event: Mapping[str, Any]) -> int:
    """`--nodes`: a gang's size; the stack's max_nodes is checked with its other limits (limit_problems)."""
    nodes = event.get("nodes", 1)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
        raise Refused(f"option '--nodes': got {nodes!r}; allowed: a whole number from 1 to the stack's max_nodes",
                      usage=True)  # fmt: skip
    return nodes


def _spec_text(event: Mapping[str, Any]) -> str:
    try:
        return specs.spec_text(event)
    except specs.SpecRefused as refused:
        raise Refused(str(refused), usage=True) from None


@dataclass(frozen=True)
class Money:
    """A run's dollar limits (docs/architecture.md, "Dollar limits"): its own, and what the month must hold."""

    max_cost_usd: float | None
    reserve_usd: float
    why: str
    hourly_usd: float  # the dearest allowed type's list price (or the cap) plus the volume: the agent's estimate


def plan_money(
    cfg: Any, types: tuple[str, ...], list_prices: dict[str, float], volume_gb: int, hours: float,
    max_price: float | None, max_cost: float | None, nodes: int = 1,
) -> Money:  # fmt: skip
    """The run's limit must leave room for one graceful stop; the month's limit needs a price to reserve with."""
    volume_hourly = ledger.volume_usd_per_hour(volume_gb)
    unpriced = [t for t in types if t not in list_prices]
    if unpriced and max_price is not None:
        list_prices = {**list_prices, **{t: max_price for t in unpriced}}  # the cap bounds them
    elif unpriced and (max_cost is not None or cfg.monthly_limit_usd):
        what = "option '--max-cost-usd'" if max_cost is not None else "setting 'monthly_limit_usd'"
        raise Refused(
            f"{what}: no price is known for {', '.join(unpriced)} (AWS Price List or the built-in table), so its "
            "spend cannot be tracked; allowed: types with a known price, or --max-price to bound them"
        )
    dearest = max(list_prices, key=list_prices.__getitem__) if list_prices else ""
    compute = list_prices[dearest] if dearest else 0.0
    if max_price is not None and dearest:
        compute = min(compute, max_price)  # no attempt may run dearer than the cap
    hourly = (compute + volume_hourly) * nodes  # a gang: every member, the whole time
    grace = hourly * cfg.grace_hours
    if max_cost is not None and dearest and max_cost <= grace:
        raise Refused(
            f"option '--max-cost-usd': got {max_cost:g}; allowed: more than one graceful stop's cost, ${grace:.2f} "
            f"({dearest} at ${hourly:.3f}/hour for {cfg.stop_timeout_seconds / 60:g} min)",
            usage=True,
        )
    if not cfg.monthly_limit_usd:
        return Money(max_cost, 0.0, "", hourly)
    worst = hourly * hours
    if max_cost is None and not dearest:
        raise Refused(
            f"monthly_limit_usd is set and no list price is known for {', '.join(types)}: "
            "pass --max-cost-usd so the launch can reserve what the run may cost"
        )
    if max_cost is not None and (not dearest or max_cost < worst):
        return Money(max_cost, max_cost, f"its --max-cost-usd {max_cost:g}", hourly)
    return Money(max_cost, worst, f"{dearest} at ${hourly:.3f}/hour for {hours:g} h", hourly)


def handle_request(supervisor: Any, event: Mapping[str, Any]) -> dict[str, Any]:
    """`{"action": "launch" | "stop", ...}` -> the answer; a refusal is `{"ok": false, "error": ..., "usage": ...}`."""
    action = event.get("action")
    try:
        if action == "launch":
            return Launcher(supervisor).launch(LaunchRequest.from_event(event))
        if action == "stop":
            run_id = _text(event, "run_id") or ""
            if not _RUN_ID.match(run_id):
                raise Refused(f"argument 'RUN': got {run_id!r}; allowed: a run id", usage=True)
            return stop(supervisor, run_id)
        if action in ("sweep", "sweep_stop"):  # a group of runs searched by Optuna (sweeps.py)
            try:
                from sweeps import create_group, stop_group
            except ImportError:  # pragma: no cover - exercised by the CLI and the tests
                from training_infra.supervisor.runtime.sweeps import create_group, stop_group
            return (create_group if action == "sweep" else stop_group)(supervisor, event)
        raise Refused(f"request action: got {action!r}; allowed: launch, stop, sweep, sweep_stop", usage=True)
    except Refused as refused:
        log.info("request refused: %s", refused)
        return {"ok": False, "error": str(refused), "usage": refused.usage}


class Launcher:
    """One launch request, step by step; every step that can fail undoes the ones before it."""

    def __init__(self, supervisor: Any) -> None:
        self.sup = supervisor
        self.cfg = supervisor.cfg
        self.ec2 = supervisor.clients.ec2

    def stack_template(self) -> tuple[dict[str, Any], int]:
        """The stack template's default version (what the last deploy made: CloudFormation sets it) and its number."""
        versions = self.ec2.describe_launch_template_versions(
            LaunchTemplateId=self.cfg.launch_template_id, Versions=["$Default"]
        ).get("LaunchTemplateVersions")
        if not versions or not versions[0].get("LaunchTemplateData", {}).get("UserData"):
            raise Refused(f"launch template {self.cfg.launch_template_id} has no default version with user data: "
                          "redeploy the compute stack (`make deploy`)")  # fmt: skip
        problem = stack_template_problem(self.cfg, versions[0]["LaunchTemplateData"])
        if problem:
            raise Refused(f"launch refused: {problem}: redeploy the compute stack (`make deploy`)")
        return versions[0]["LaunchTemplateData"], int(versions[0].get("VersionNumber") or 0)

    def launch(self, request: LaunchRequest) -> dict[str, Any]:
        cfg, now = self.cfg, self.sup.now()
        data, stack_version = self.stack_template()
        base = base64.b64decode(data["UserData"]).decode()
        exports = template_exports(base)
        checkpoint = int(exports.get("TI_CHECKPOINT_SYNC_SECONDS", "300") or 300)
        hours = request.max_runtime_hours
        if hours is None:
            seconds = exports.get("TI_MAX_RUNTIME_SECONDS", "")
            hours = int(seconds) / 3600 if seconds.isdigit() else cfg.max_runtime_hours
        floor = (cfg.boot_seconds + checkpoint) / 3600
        if not floor <= hours <= cfg.max_runtime_hours + 1e-9:
            raise Refused(
                f"option '--max-runtime-hours': got {hours:g}; allowed: from {floor:g} (boot {cfg.boot_seconds // 60} "
                f"min + one checkpoint interval {checkpoint}s) up to the stack's max_runtime_hours "
                f"{cfg.max_runtime_hours:g}",
                usage=True,
            )
        subnets = request.subnet_ids or cfg.stack_subnets
        clipped = False
        if request.capacity_reservation_id:
            request, subnets, hours, clipped = self.block(request, tuple(subnets), hours, floor, now)
        spec = RunSpec(
            instance_types=request.instance_types, subnet_ids=tuple(subnets), market=request.market,
            max_runtime_hours=hours, launch_template_id="lt-00000000",
            max_restarts_on_errors=request.max_restarts_on_errors, nodes=request.nodes,
            capacity_reservation_id=request.capacity_reservation_id,
        )  # fmt: skip
        deadline = iso(now + timedelta(hours=hours))
        try:  # the same checks every read of the record makes, on the spec as it will be written
            RunSpec.from_dict(spec.to_dict())
        except ValueError as error:
            raise Refused(f"request refused: {error}", usage=True) from None
        problems = cfg.limit_problems(spec, deadline, now)
        problems = [p for p in problems if not p.startswith(("launch template", "no month reservation"))]
        if problems:
            raise Refused("request refused by the stack's limits: " + "; ".join(problems), usage=True)
        resumed = self.check_run_id(request)
        prices = self.sup.prices or Prices(ec2=self.ec2, region=self.ec2.meta.region_name,
                                           pricing=self.sup.clients.pricing)  # fmt: skip
        list_prices = self.list_prices(prices, request.instance_types)
        if request.capacity_reservation_id:  # prepaid: no price per hour beyond the volume (blocks.py)
            list_prices = dict.fromkeys(request.instance_types, 0.0)
        volume_gb = sum(int(m.get("Ebs", {}).get("VolumeSize") or 0) for m in data.get("BlockDeviceMappings", []))
        money = plan_money(cfg, request.instance_types, list_prices, volume_gb, hours, request.max_price_usd,
                           request.max_cost_usd, request.nodes)  # fmt: skip
        run_id = request.run_id
        tags = run_tags(cfg, run_id, hours, deadline)
        month = request.budget_month if request.group else self.reserve(run_id, money, now)
        template_id = ""
        try:
            stall = request.stall_seconds if request.stall_seconds is not None else int(
                exports.get("TI_STALL_SECONDS") or 0)  # fmt: skip
            spec = RunSpec(
                instance_types=request.instance_types, subnet_ids=tuple(subnets), market=request.market,
                max_runtime_hours=hours, launch_template_id="lt-00000000",
                max_restarts_on_errors=request.max_restarts_on_errors, checkpoint_sync_seconds=checkpoint,
                stall_seconds=stall, image_tag=request.image_tag or exports.get("TI_IMAGE_TAG", ""),
                command=request.command if request.command is not None else exports.get("TI_TRAINING_COMMAND", ""),
                instance_tags=tags, list_prices=list_prices, volume_gb=volume_gb, max_price_usd=request.max_price_usd,
                max_cost_usd=money.max_cost_usd, budget_month=month,
                reserved_usd=round(money.reserve_usd, 4) if month and not request.group else 0.0,
                spent_before_usd=round(float(resumed.spent_usd or 0), 4) if resumed else 0.0,
                stack_template_version=stack_version, nodes=request.nodes,
                capacity_reservation_id=request.capacity_reservation_id,
            )  # fmt: skip
            overrides = self.overrides(request, run_id, exports, deadline, hours, list_prices)
            if clipped:  # the agent's own clock ends the run by the block's deadline too
                overrides["TI_MAX_RUNTIME_SECONDS"] = str(round(hours * 3600))
            user_data = insert_overrides(base, {**overrides, SEAL_EXPORT: run_seal(spec, deadline)})
            template_id = self.run_template(run_id, data, user_data, tags, block=request.capacity_reservation_id)
            spec = dataclasses.replace(spec, launch_template_id=template_id)
            self.record(run_id, spec, deadline, now, resumed, request, spec_yaml=request.spec_yaml)
        except BaseException:
            if template_id:
                self._delete(template_id)
            if month and not request.group:
                self.sup.month_ledger().settle(month, run_id, 0.0)
            raise
        specs.keep(self.sup.clients.s3, cfg.outputs_bucket, cfg.runs_prefix, run_id, request.spec_yaml)
        try:
            self.sup.reconcile(run_id)
        except Exception:
            self.abandon(run_id)  # nothing left for the supervisor to start a minute later behind the user's back
            raise
        run = self.sup.store.get(run_id)
        attempt = run.attempts[-1] if run.attempts else Attempt(n=0)
        return {
            "ok": True, "run_id": run_id, "attempt": attempt.n, "instance_id": attempt.instance_id,
            "state": run.state, "message": run.message, "deadline_at": run.deadline_at,
            **({"deadline_clipped_to_block": request.capacity_reservation_id} if clipped else {}),
        }  # fmt: skip

    def block(
        self, request: LaunchRequest, subnets: tuple[str, ...], hours: float, floor: float, now: Any
    ) -> tuple[LaunchRequest, tuple[str, ...], float, bool]:
        """The block as EC2 describes it, checked here whatever the preflight said: the request narrowed to its
        type and to the subnets in its zone, the hours clipped to one graceful stop before EC2 ends its instances."""
        block_id = request.capacity_reservation_id
        try:
            block = blocks.describe(self.ec2, block_id)
        except blocks.BlockRefused as refused:
            raise Refused(str(refused)) from None
        zones = {s["SubnetId"]: s["AvailabilityZone"]
                 for s in self.ec2.describe_subnets(SubnetIds=list(subnets))["Subnets"]}  # fmt: skip
        problem = blocks.problem(block, request.instance_types, request.nodes, now, timedelta(hours=floor),
                                 self.cfg.stop_timeout_seconds, sorted(set(zones.values())),
                                 now + timedelta(hours=hours))  # fmt: skip
        if problem:
            raise Refused(problem, usage=True)
        if request.nodes > 1:
            raise Refused(f"option '--capacity-reservation': got {block_id} with --nodes {request.nodes}; allowed: a "
                          "single-node run (gangs in a block are not built yet)", usage=True)  # fmt: skip
        until = block.usable_until(self.cfg.stop_timeout_seconds)
        left = (until - now).total_seconds() / 3600 if until else hours
        clipped = left < hours
        narrowed = dataclasses.replace(request, instance_types=(block.instance_type,))
        return narrowed, tuple(s for s in subnets if zones.get(s) == block.zone), min(hours, left), clipped

    def check_run_id(self, request: LaunchRequest) -> Run | None:
        """A new id whose instance (if any) has ended; with `resume`, a finished run (or one known only from S3)."""
        record = self.sup.store.get(request.run_id)
        if record is not None and record.problem and request.resume:  # its values cannot be trusted to go on from
            raise Refused(f"run {request.run_id} has a malformed record ({record.problem}): choose another --run-id")
        if record is not None and record.active:
            raise Refused(f"run {request.run_id} is still {record.state}: nothing to resume (`training-infra stop` "
                          "ends it)" if request.resume else f"run {request.run_id} already exists: choose another "
                          "--run-id")  # fmt: skip
        if record is None or record.state == RunState.INVALID:
            # No record (a run from before the run table, the create_instance box) or one the supervisor does not
            # act on: an instance of it still alive is not adopted, new run or resume.
            live = [i["InstanceId"] for i in live_instances(self.sup, request.run_id)]
            if live:
                raise Refused(f"run {request.run_id} is still running on {', '.join(live)}: nothing to "
                              f"{'resume' if request.resume else 'launch'} under this id "
                              f"(`training-infra stop {request.run_id}` ends it)")  # fmt: skip
        if not request.resume:
            if record is not None:
                raise Refused(f"run {request.run_id} ended {record.state}: pass --resume to continue it, or choose "
                              "another --run-id")  # fmt: skip
            return None
        return record

    def list_prices(self, prices: Prices, types: tuple[str, ...]) -> dict[str, float]:
        found = {}
        for instance_type in types:
            try:
                quote = prices.on_demand(instance_type)
            except (ClientError, BotoCoreError) as error:
                log.warning("no list price for %s: %s", instance_type, error)
                continue
            if quote.usd is not None:
                found[instance_type] = quote.usd
        return found

    def overrides(
        self, request: LaunchRequest, run_id: str, exports: dict[str, str], deadline: str, hours: float,
        list_prices: dict[str, float],
    ) -> dict[str, str]:  # fmt: skip
        """Only these names, built here from checked fields: a caller cannot set TI_IMAGE_URI, a bucket or a flag."""
        spot = request.market in ("spot", "spot-then-on-demand")  # a block's instance is on-demand to the agent
        values = {"TI_RUN_ID": run_id, "TI_DEADLINE_AT": deadline, "TI_MARKET": "spot" if spot else "on-demand"}
        hourly = max(list_prices.values()) if list_prices else None
        if request.max_price_usd is not None:
            hourly = min(hourly, request.max_price_usd) if hourly is not None else request.max_price_usd
        values["TI_HOURLY_PRICE_USD"] = f"{hourly:g}" if hourly else "0"
        if request.image_tag is not None:
            values["TI_IMAGE_TAG"] = request.image_tag
        if request.command is not None:
            values["TI_TRAINING_COMMAND"] = request.command
        if request.max_runtime_hours is not None:
            values["TI_MAX_RUNTIME_SECONDS"] = str(round(hours * 3600))
        if request.stall_seconds is not None:
            values["TI_STALL_SECONDS"] = str(request.stall_seconds)
        if request.env:  # the stack's extra env first, so a KEY given now wins in the trainer
            lines = [line for line in exports.get("TI_EXTRA_ENV", "").splitlines() if line.strip()]
            values["TI_EXTRA_ENV"] = "\n".join([*lines, *request.env])
        if request.secrets:
            values["TI_SECRETS"] = "\n".join(request.secrets)  # references only: the agent fetches the values
        if request.data_access is not None:
            values["TI_DATA_ACCESS"] = request.data_access
        if request.nodes > 1:  # the survivors' rendezvous outwaits this stack's wait for a replacement (gang.py)
            values["TI_GANG_REPLACE_SECONDS"] = str(self.cfg.gang_replace_seconds)
            if not request.nccl_efa_check:
                values["TI_NCCL_EFA_CHECK"] = "false"
        return values

    def reserve(self, run_id: str, money: Money, now: Any) -> str:
        if money.reserve_usd <= 0:
            return ""
        month = MonthlyLedger.key(now)
        try:
            self.sup.month_ledger().reserve(month, run_id, money.reserve_usd, money.why, at=iso(now))
        except StaleRecord:
            raise Refused(
                f"run {run_id} is being launched by someone else right now: choose another --run-id"
            ) from None
        except OverLimit as refused:
            raise Refused(f"launch refused: {refused}; set a lower --max-cost-usd or --max-runtime-hours, or raise "
                          "monthly_limit_usd") from None  # fmt: skip
        return month

    def run_template(
        self, run_id: str, data: dict[str, Any], user_data: str, tags: dict[str, str], *, block: str = ""
    ) -> str:
        """The run's own launch template: the stack template's data, this run's user data and tags, no market (but
        capacity-block, targeted at the run's `block`); named with the run-template prefix and tagged
        created-by=supervisor (what IAM and the deleter check)."""
        run_data = blocks.template_data(_run_data(data), block) if block else _run_data(data)
        run_data["UserData"] = base64.b64encode(user_data.encode()).decode()
        for resource in ("instance", "volume"):
            inherited = {
                t["Key"]: t["Value"]
                for spec in data.get("TagSpecifications", [])
                if spec.get("ResourceType") == resource
                for t in spec.get("Tags", [])
                if not t["Key"].startswith("aws:")
            }
            run_data.setdefault("TagSpecifications", []).append(
                {"ResourceType": resource, "Tags": [{"Key": k, "Value": v} for k, v in {**inherited, **tags}.items()]}
            )
        template_tags = {**tags, self.cfg.created_by_tag: "supervisor"}
        try:
            created = self.ec2.create_launch_template(
                LaunchTemplateName=f"{self.cfg.run_template_prefix}{run_id}",
                LaunchTemplateData=run_data,
                TagSpecifications=[{"ResourceType": "launch-template",
                                    "Tags": [{"Key": k, "Value": v} for k, v in template_tags.items()]}],
                ClientToken=f"{run_id[:50]}-{secrets.token_hex(4)}",
            )  # fmt: skip
        except ClientError as error:
            if "AlreadyExists" in error.response.get("Error", {}).get("Code", ""):
                raise Refused(f"run {run_id} already exists: choose another --run-id") from None
            raise
        return created["LaunchTemplate"]["LaunchTemplateId"]

    def record(
        self,
        run_id: str,
        spec: RunSpec,
        deadline: str,
        now: Any,
        resumed: Run | None,
        request: LaunchRequest,
        *,
        spec_yaml: str = "",
    ) -> None:
        try:
            if resumed is not None:
                resumed.spec_yaml = spec_yaml or resumed.spec_yaml
                # The finished run goes on: its attempts stay (the next is numbered after them).
                resumed.spec, resumed.deadline_at, resumed.state = spec, deadline, RunState.LAUNCHING
                resumed.message, resumed.ended_at, resumed.errors_used, resumed.cooldown = "resumed", "", 0, {}
                resumed.stop_requested_at = resumed.stop_reason = ""
                self.sup.store.save(resumed)
            else:
                self.sup.store.create(Run(run_id=run_id, spec=spec, created_at=iso(now), deadline_at=deadline,
                                          spec_yaml=spec_yaml, group=request.group, trial=request.trial))  # fmt: skip
        except StaleRecord:
            raise Refused(
                f"run {run_id} changed while it was being launched: see `training-infra status {run_id}`"
                if resumed is not None
                else f"run {run_id} already exists: choose another --run-id"
            ) from None

    def abandon(self, run_id: str) -> None:
        record = self.sup.store.get(run_id)
        if record is None or not record.active or (record.current and record.current.instance_id):
            return  # an instance started: the supervisor keeps the run (and its reservation)
        record.state, record.message = RunState.FAILED, "launch failed before any instance started"
        try:
            self.sup.store.save(record)
        except (StaleRecord, ClientError, BotoCoreError):
            return
        self.sup.settle_month(record)
        self.sup._release_launch_template(record)

    def _delete(self, template_id: str) -> None:
        try:
            self.ec2.delete_launch_template(LaunchTemplateId=template_id)
        except ClientError as error:
            log.warning("could not delete launch template %s: %s", template_id, error)


def run_tags(cfg: Any, run_id: str, hours: float, deadline: str) -> dict[str, str]:
    """naming.run_tags, with the names the construct passes as environment, plus Name."""
    return {
        cfg.managed_tag: "true",
        cfg.run_id_tag: run_id,
        cfg.max_runtime_tag: f"{hours:g}",
        cfg.deadline_tag: deadline,
        "Name": f"training-infra-{run_id}",
    }


def stop(supervisor: Any, run_id: str) -> dict[str, Any]:
    """A managed run: the graceful stop. A run the supervisor does not act on (no record, or an invalid one, such as
    an in-flight run whose old record fails the new limits after an upgrade): terminate its instances, only those
    with the project's instance profile and the managed tag."""
    record = supervisor.store.get(run_id)
    if record is not None and record.active:
        problem = supervisor.invalid_because(record)
        if problem:  # checked as every read is: a record written around the supervisor is never acted on
            record = supervisor.invalidate(record, problem)
    if record is not None and record.state != RunState.INVALID:
        if not record.active:
            return {"ok": True, "run_id": run_id, "result": "ended", "state": record.state}
        if record.stop_requested_at:
            return {"ok": True, "run_id": run_id, "result": "stopping", "since": record.stop_requested_at}
        record = supervisor.request_stop(run_id)
        return {"ok": True, "run_id": run_id, "result": "stop-requested",
                "instance_id": record.current.instance_id if record.current else ""}  # fmt: skip
    live, stopped, states = end_instances_of(supervisor, run_id)
    return {"ok": True, "run_id": run_id, "result": "terminated", "live": live, "stopped": stopped,
            "states": states, **({"state": record.state} if record is not None else {})}  # fmt: skip


def live_instances(supervisor: Any, run_id: str) -> list[dict[str, Any]]:
    """Instances tagged with the run id that have not ended (stopped ones still bill their volume)."""
    reservations = supervisor.clients.ec2.describe_instances(
        Filters=[
            {"Name": f"tag:{supervisor.cfg.run_id_tag}", "Values": [run_id]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
        ]
    )["Reservations"]
    return [i for r in reservations for i in r["Instances"]]


def end_instances_of(supervisor: Any, run_id: str) -> tuple[list[str], list[str], list[str]]:
    """Terminate the run's instances: all of them ours() (the project's profile, managed, this run id), or none."""
    endable = live_instances(supervisor, run_id)
    refused = [i["InstanceId"] for i in endable if not supervisor.ours(i, run_id)]
    if refused:
        raise Refused(f"refusing to terminate {', '.join(refused)}: tagged {supervisor.cfg.run_id_tag}={run_id} but "
                      f"not {supervisor.cfg.managed_tag}=true with the project's instance profile")  # fmt: skip
    live = [i["InstanceId"] for i in endable if i["State"]["Name"] != "stopped"]
    stopped = [i["InstanceId"] for i in endable if i["State"]["Name"] == "stopped"]
    if live or stopped:
        supervisor.clients.ec2.terminate_instances(InstanceIds=live + stopped)
    return live, stopped, sorted({i.get("State", {}).get("Name", "") for i in endable})


def handler(event: Mapping[str, Any], _context: Any = None) -> dict[str, Any]:
    """The request function's entry point: users may invoke this function, never the event-driven one."""
    try:
        from supervisor import Supervisor, SupervisorConfig, _lambda_clients
    except ImportError:  # pragma: no cover - exercised by the CLI and the tests
        from training_infra.supervisor.runtime.supervisor import Supervisor, SupervisorConfig, _lambda_clients

    answer = handle_request(Supervisor(_lambda_clients(), SupervisorConfig.from_env(os.environ)), event)
    log.info(json.dumps(answer, default=str))
    return answer
