"""`launch -f run.yaml`, `launch --like RUN` and `schema`: runs described in a file (docs/cli.md, "Run specs").

The layers, weakest first: the stack's defaults, the file (or the run copied with --like), the flags. The flags
are checked as always (launching.validate) and turned into the spec's keys; the file is checked by the model
(training_infra/spec.py), every mistake at once; what is launched is the spec of file and flags, checked once
more as the flags are. The resolved spec, with the stack's defaults, goes to the supervisor, which keeps it in
the run's record and at runs/<id>/spec.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training_infra.cli import launching
from training_infra.cli.errors import CliError, UsageError, err_console

FLAG = "flag"
STACK = "stack default"
GENERATED = "generated"
# Where each key comes from on the command line, for `--dry-run`'s "where each value came from".
FLAG_OF = {
    "run_id": "--run-id",
    "resources.instance_types": "--instance-types",
    "resources.market": "--market",
    "resources.max_price": "--max-price",
    "resources.subnet_id": "--subnet-id",
    "resources.capacity_reservation": "--capacity-reservation",
    "resources.nodes": "--nodes",
    "resources.nccl_efa_check": "--no-nccl-efa-check",
    "image": "--image-tag",
    "command": "--command",
    "env": "--env",
    "secrets": "--secret",
    "limits.max_runtime_hours": "--max-runtime-hours",
    "limits.max_cost_usd": "--max-cost-usd",
    "limits.stall_minutes": "--stall-minutes",
    "limits.max_restarts_on_errors": "--max-restarts-on-errors",
    "data.allow_empty": "--allow-empty-data",
}


def _named(path: str, source: str) -> str:
    if source != FLAG:
        return source
    flag = FLAG_OF.get(path) or FLAG_OF.get(path.split(".", 1)[0], "")
    return f"flag {flag}".strip()


def flags_as_spec(request: launching.LaunchRequest) -> dict[str, Any]:
    """The options given on the command line (already validated), as the spec's keys; unset ones left out."""
    from training_infra.spec import merge

    data: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        if value is None:
            return
        *parents, last = path.split(".")
        nested: dict[str, Any] = {last: value}
        for parent in reversed(parents):
            nested = {parent: nested}
        data.update(merge(data, nested))

    types = request.instance_types or request.instance_type
    put("run_id", request.run_id)
    put("resources.instance_types", types.split(",") if types else None)
    spot = None if request.spot is None else ("spot" if request.spot else "on-demand")
    put("resources.market", request.market or spot)
    put("resources.max_price", request.max_price)
    put("resources.subnet_id", request.subnet_id)
    put("resources.capacity_reservation", request.capacity_reservation)
    put("resources.nodes", int(request.nodes) if request.nodes is not None else None)
    put("resources.nccl_efa_check", request.nccl_efa_check)
    put("image", request.image_tag)
    put("command", request.command)
    if request.env:
        put("env", dict(item.split("=", 1) for item in request.env))
    if request.secret_refs:
        put("secrets", dict(item.split("=", 1) for item in request.secret_refs))
    put("limits.max_runtime_hours", request.max_runtime_hours)
    put("limits.max_cost_usd", request.max_cost_usd)
    put("limits.stall_minutes", request.stall_minutes)
    restarts = request.max_restarts_on_errors
    put("limits.max_restarts_on_errors", int(restarts) if restarts is not None else None)
    put("data.allow_empty", True if request.allow_empty_data else None)
    put("data.access", request.data_access)
    return data


def request_from_spec(spec: Any, flags: launching.LaunchRequest) -> launching.LaunchRequest:
    """The launch request of a spec (training_infra.spec.LaunchSpec), checked as the flags are; the flags'
    actions (--resume, --dry-run) kept."""
    resources, limits = spec.resources, spec.limits
    request = launching.LaunchRequest(
        instance_types=",".join(resources.instance_types) if resources.instance_types else None,
        market=resources.market,
        max_restarts_on_errors=None if limits.max_restarts_on_errors is None else str(limits.max_restarts_on_errors),
        max_runtime_hours=limits.max_runtime_hours,
        stall_minutes=limits.stall_minutes,
        image_tag=spec.image,
        command=spec.command,
        env=[f"{key}={value}" for key, value in spec.env.items()],
        secret_refs=[f"{name}={ref}" for name, ref in spec.secrets.items()],
        run_id=spec.run_id,
        subnet_id=resources.subnet_id,
        capacity_reservation=resources.capacity_reservation,
        nodes=resources.nodes if resources.nodes != 1 else None,
        max_price=resources.max_price,
        max_cost_usd=limits.max_cost_usd,
        allow_empty_data=spec.data.allow_empty,
        resume=flags.resume,
        dry_run=flags.dry_run,
        data_access=spec.data.access,
        nccl_efa_check=resources.nccl_efa_check,
    )
    return launching.validate(request)


def from_layers(layers: list[tuple[str, dict[str, Any]]], flags: launching.LaunchRequest) -> launching.LaunchRequest:
    """The request of file (or --like) and flags: flags override the file."""
    from training_infra.spec import SpecError, resolve

    try:
        spec, _sources = resolve([*layers, (FLAG, flags_as_spec(flags))])
    except SpecError as error:
        raise UsageError(str(error)) from None
    request = request_from_spec(spec, flags)
    request.spec_layers = [*layers, (FLAG, flags_as_spec(flags))]
    return request


def file_layer(path: Path) -> tuple[str, dict[str, Any]]:
    """The file's keys, every mistake at once (exit 2, nothing launched)."""
    from training_infra.spec import SpecError, load

    try:
        return str(path), load(path).to_data()
    except SpecError as error:
        raise UsageError(str(error)) from None


def like_layer(aws: Any, run_id: str) -> tuple[str, dict[str, Any]]:
    """The spec a run was launched with, from its record (run id left out: the copy is a new run)."""
    from training_infra import naming
    from training_infra.spec import SpecError, read_yaml, validate
    from training_infra.supervisor.runtime.records import RunStore

    record = RunStore(aws.client("dynamodb"), aws.output(naming.OUTPUT_RUN_TABLE)).get(run_id)
    if record is None:
        raise CliError(f"option '--like': no run {run_id} in the run table (see `training-infra status`)")
    source = f"run {run_id}"
    if record.spec_yaml:
        try:
            data = validate(read_yaml(record.spec_yaml, source=source)[0], source=source).to_data()
        except SpecError as error:
            raise CliError(f"option '--like': the spec kept with run {run_id} is no longer valid: {error}") from None
    else:  # a run launched before specs were kept: what its record says (no env, no secrets)
        data = _spec_of_record(record.spec)
    data.pop("run_id", None)
    env = data.get("env") or {}
    membership = sorted(set(env) & SWEEP_MEMBERSHIP_ENV)
    if membership:  # a sweep member's copy is a run of its own: its trial's parameters stay, its group does not
        data["env"] = {k: v for k, v in env.items() if k not in SWEEP_MEMBERSHIP_ENV}
        err_console().print(f"note: --like {run_id}: {', '.join(membership)} left out (the copy is not a trial "
                            "of the sweep); its parameters TI_PARAMS/TI_PARAM_* kept", markup=False)  # fmt: skip
    return source, data


SWEEP_MEMBERSHIP_ENV = frozenset({"TI_GROUP", "TI_TRIAL"})


def kept_data_access(aws: Any, run_id: str) -> str | None:
    """`data.access` of the spec kept with the run; None: not set there (the stack's), or no such run
    (the supervisor says so when it refuses the resume)."""
    from training_infra import naming
    from training_infra.spec import SpecError, read_yaml, validate
    from training_infra.supervisor.runtime.records import RunStore

    record = RunStore(aws.client("dynamodb"), aws.output(naming.OUTPUT_RUN_TABLE)).get(run_id)
    if record is None or not record.spec_yaml:
        return None
    try:
        return validate(read_yaml(record.spec_yaml, source=f"run {run_id}")[0]).data.access
    except SpecError:
        return None


def _spec_of_record(spec: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "resources": {"instance_types": list(spec.instance_types), "market": spec.market},
        "limits": {"max_runtime_hours": spec.max_runtime_hours, "max_restarts_on_errors": spec.max_restarts_on_errors},
    }
    if spec.max_price_usd is not None:
        data["resources"]["max_price"] = spec.max_price_usd
    if spec.capacity_reservation_id:  # a block's market is implied by it, never a key of its own
        data["resources"]["capacity_reservation"] = spec.capacity_reservation_id
        del data["resources"]["market"]
    if spec.max_cost_usd is not None:
        data["limits"]["max_cost_usd"] = spec.max_cost_usd
    data["limits"]["stall_minutes"] = spec.stall_seconds // 60
    if spec.image_tag:
        data["image"] = spec.image_tag
    if spec.command:
        data["command"] = spec.command
    return data


def request_for(
    aws: Any, flags: launching.LaunchRequest, *, file: Path | None = None, like: str | None = None
) -> launching.LaunchRequest:
    """What `launch` asks for: the flags alone, or the file (or the run copied with --like) with the flags over it.
    Its spec_layers say where each value came from."""
    if file is not None and like is not None:
        raise UsageError("options '--file' and '--like': give one (flags change either)")
    if file is None and like is None:
        if flags.resume and flags.run_id and flags.data_access is None:
            flags.data_access = kept_data_access(aws, flags.run_id)  # the run goes on as it saw its data
        flags.spec_layers = [(FLAG, flags_as_spec(flags))]
        return flags
    layer = file_layer(file) if file is not None else like_layer(aws, like or "")
    return from_layers([layer], flags)


def stack_defaults(
    instance_types: list[str], market: str, exports: dict[str, str], stack_hours: float
) -> dict[str, Any]:
    """What the stack gives a run that sets nothing, as the spec's keys (from what `launch` read of it)."""
    stall = exports.get("TI_STALL_SECONDS", "")
    limits: dict[str, Any] = {"max_runtime_hours": stack_hours, "max_restarts_on_errors": 0}
    if stall.isdigit():
        limits["stall_minutes"] = int(stall) // 60
    data: dict[str, Any] = {
        # A Capacity Block is its own market, implied by resources.capacity_reservation: no stack market beside it.
        "resources": {"instance_types": instance_types, **({} if market == "capacity-block" else {"market": market})},
        "image": exports.get("TI_IMAGE_TAG") or "latest",
        "limits": limits,
    }
    if exports.get("TI_TRAINING_COMMAND"):
        data["command"] = exports["TI_TRAINING_COMMAND"]
    if exports.get("TI_DATA_ACCESS"):
        data["data"] = {"access": exports["TI_DATA_ACCESS"]}
    return data


def resolved(layers: list[tuple[str, dict[str, Any]]], defaults: dict[str, Any], run_id: str) -> tuple[Any, dict]:
    """The spec launched (the stack's defaults, then file, then flags) and where each value came from."""
    from training_infra.spec import resolve

    given = any("run_id" in layer for _name, layer in layers)
    spec, sources = resolve([(STACK, defaults), *layers, *([] if given else [(GENERATED, {"run_id": run_id})])])
    return spec, {path: _named(path, source) for path, source in sources.items()}


def commented_yaml(data: dict[str, Any], sources: dict[str, str], indent: int = 0, prefix: str = "") -> list[str]:
    """The spec as YAML, each value followed by where it came from: a file one can save and launch."""
    import yaml

    def scalar(value: Any) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        return text.removesuffix("\n...").removesuffix("...").strip()

    lines = []
    pad = "  " * indent
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            lines.append(f"{pad}{key}:")
            lines += commented_yaml(value, sources, indent + 1, path)
        else:
            source = sources.get(path, "")
            lines.append(f"{pad}{key}: {scalar(value)}" + (f"  # {source}" if source else ""))
    return lines


def dry_run_lines(spec: Any, sources: dict[str, str], layers: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """The resolved spec as `launch --dry-run` prints it: valid YAML, each value with its source."""
    given = [name for name, _layer in layers if name != FLAG]
    order = ", ".join([*given, "flags over it" if given else "flags", "the stack's defaults for the rest"])
    return [f"# the resolved spec ({order})", *commented_yaml(spec.to_data(), sources)]


def schema_text() -> str:
    from training_infra.spec import json_schema

    return json.dumps(json_schema(), indent=2)
