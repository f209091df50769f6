"""`training-infra sweep -f sweep.yaml`, `sweep stop GROUP` and `status --group GROUP`: a group of managed runs
whose parameters Optuna chooses, kept going by the supervisor (docs/cli.md, "Sweeps").

The file is checked here first (one line per mistake, all at once) and again by the request function, which
alone creates the group; nothing runs on this machine afterwards, so closing the laptop changes nothing.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from training_infra.cli.errors import CliError, UsageError, err_console, reported_errors
from training_infra.cli.options import Region
from training_infra.cli.render import Column, Listing, fmt_usd, print_json, stdout

if TYPE_CHECKING:
    from training_infra.cli.aws import Aws

sweep_app = typer.Typer(
    name="sweep",
    help="Search a trainer's parameters with Optuna: a group of managed runs with one concurrency cap and one "
    "dollar limit (`sweep -f sweep.yaml`, `sweep stop GROUP`, `status --group GROUP`).",
    no_args_is_help=False,
)

# The run-spec keys a sweep's template may hold (the layout of `launch -f`), and the launch request field of each.
_TEMPLATE_KEYS = {
    ("resources", "instance_types"): "instance_types",
    ("resources", "market"): "market",
    ("resources", "max_price"): "max_price_usd",
    ("image",): "image_tag",
    ("command",): "command",
    ("limits", "max_runtime_hours"): "max_runtime_hours",
    ("limits", "max_cost_usd"): "max_cost_usd",
    ("limits", "max_restarts_on_errors"): "max_restarts_on_errors",
}
_SWEEP_KEYS = {"group", "template", "space", "objective", "trials", "parallel", "max_cost_usd", "pruning", "seed"}


def read_sweep_file(path: Path) -> tuple[str, dict[str, Any]]:
    """(group name, the request's `sweep` map) from the YAML file, or UsageError with one line per mistake. The
    template is a run spec, checked by the same model as `launch -f` (training_infra/spec.py)."""
    from training_infra import spec as run_spec
    from training_infra.supervisor.runtime.sweeps import SweepRefused, SweepSpec, name_problem

    try:
        data, key_lines = run_spec.read_yaml(run_spec.read_text(path), source=str(path))
    except run_spec.SpecError as error:
        raise UsageError("\n".join(error.lines)) from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: got {type(data).__name__}; allowed: a map of {', '.join(sorted(_SWEEP_KEYS))}")
    problems = []
    for key in sorted(set(data) - _SWEEP_KEYS, key=str):
        near = difflib.get_close_matches(str(key), sorted(_SWEEP_KEYS), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        problems.append(f"{path}:{key_lines.get((key,), 1)}: {key}: unknown key; allowed: "
                        f"{', '.join(sorted(_SWEEP_KEYS))}{hint}")  # fmt: skip
    group = data.get("group")
    template_lines = {k[1:]: v for k, v in key_lines.items() if k[:1] == ("template",)}
    template, template_problems = template_event(data.get("template"), path, template_lines)
    problems.extend(template_problems)
    sweep = {k: v for k, v in data.items() if k in _SWEEP_KEYS - {"group"}}
    sweep["template"] = template
    # The file's own shape here (pure, no AWS); the stack's limits are the request function's to check.
    problems.extend(f"{path}: {line}" for line in [name_problem(group)] if line)
    try:
        SweepSpec.from_dict(sweep)
    except SweepRefused as refused:
        problems.extend(f"{path}: {line}" for line in refused.problems if not line.startswith("template:"))
    if problems:
        raise UsageError("\n".join(problems))
    return str(group), sweep


def template_event(template: Any, path: Path, lines: dict[tuple[Any, ...], int]) -> tuple[dict[str, Any], list[str]]:
    """The template (a run spec, the `launch -f` layout) checked by its model, as the launch request's fields; and
    one line per mistake, with the file's line and the key path under `template.`."""
    from training_infra import spec as run_spec

    if not isinstance(template, dict):
        return {}, [f"{path}: template: got {template!r}; allowed: a run spec (resources, image, command, env ...)"]
    problems = []
    try:
        model = run_spec.validate(template, source=str(path), lines=lines)
    except run_spec.SpecError as error:  # "<file>:<line>: <key path>: ..." -> the path under template.
        return {}, [re.sub(rf"^({re.escape(str(path))}(?::\d+)?): ", r"\1: template.", line) for line in error.lines]
    values = model.to_data()
    for key in ("run_id", "group"):
        if key in values:
            problems.append(f"{path}:{lines.get((key,), 1)}: template.{key}: got {values[key]!r}; allowed: nothing "
                            "(the sweep sets it for each member)")  # fmt: skip
    nodes = values.get("resources", {}).get("nodes", 1)
    if nodes != 1:
        problems.append(f"{path}:{lines.get(('resources', 'nodes'), 1)}: template.resources.nodes: got {nodes!r}; "
                        "allowed: 1 (a sweep's members are single-node)")  # fmt: skip
    event: dict[str, Any] = {}
    for key_path, field in _TEMPLATE_KEYS.items():
        value: Any = values
        for part in key_path:
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            event[field] = value
    subnet = values.get("resources", {}).get("subnet_id")
    if subnet:
        event["subnet_ids"] = [subnet]
    stall = values.get("limits", {}).get("stall_minutes")
    if stall is not None:
        event["stall_seconds"] = int(stall * 60)
    event["env"] = [f"{k}={v}" for k, v in values.get("env", {}).items()]
    event["secrets"] = [f"{k}={v}" for k, v in values.get("secrets", {}).items()]
    event.setdefault("market", "spot")
    if values.get("data", {}).get("allow_empty"):
        event["allow_empty_data"] = True  # for the preflight only: sweep() takes it out of the request
    return event, problems


@sweep_app.callback(invoke_without_command=True)
@reported_errors
def sweep(
    ctx: typer.Context,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            metavar="SWEEP.yaml",
            help="The sweep: group, template, space, objective, "
            "trials, parallel, max_cost_usd, pruning (docs/cli.md, 'Sweeps').",
            show_default=False,
        ),
    ] = None,
    region: Region = None,
) -> None:
    """Start a sweep: the supervisor asks Optuna for each trial as slots free and launches it as a managed run."""
    if ctx.invoked_subcommand is not None:
        return
    if file is None:
        raise UsageError("option '--file': missing; allowed: a sweep file (see `training-infra sweep --help`)")
    from training_infra.cli import launching
    from training_infra.cli.aws import Aws

    group, body = read_sweep_file(file)
    aws = Aws(region)
    allow_empty = bool(body["template"].pop("allow_empty_data", False))
    preflight_template(aws, group, body["template"], allow_empty_data=allow_empty)
    answer, notes = launching.call_supervisor(aws, {"action": "sweep", "group": group, "sweep": body})
    for note in notes:
        err_console().print(f"note: {note}", markup=False)
    state = answer.get("state", "running")
    if state != "running":  # the first launch was refused (the template): the group ended before any member ran
        why = answer.get("message") or "no member launched"
        raise CliError(f"sweep {group}: {why}" if why.startswith(f"{state}:") else f"sweep {group}: {state}: {why}")
    out = stdout()
    launched = ", ".join(answer.get("launched") or []) or "none yet"
    out.print(f"sweep {group}: {body['trials']} trial(s), {body.get('parallel', 1)} at once, "
              f"${float(body['max_cost_usd']):,.2f} limit; launched {launched}", markup=False)  # fmt: skip
    out.print(f"  training-infra status --group {group}", markup=False)
    out.print(f"  training-infra sweep stop {group}", markup=False)


def preflight_template(aws: Aws, group: str, template: dict[str, Any], *, allow_empty_data: bool = False) -> None:
    """`launch`'s preflight on the template as trial 0's launch (image in ECR, data present, quota, prices, money),
    refusing in one line as `launch` does; and the stack's instance types filled in when it names none."""
    from training_infra.cli import launching
    from training_infra.supervisor.runtime.sweeps import member_id

    types = template.get("instance_types")
    restarts = template.get("max_restarts_on_errors")
    subnets = template.get("subnet_ids") or [None]
    request = launching.LaunchRequest(
        instance_types=",".join(types) if types else None, market=template.get("market"),
        max_restarts_on_errors=None if restarts is None else str(restarts),
        max_runtime_hours=template.get("max_runtime_hours"), image_tag=template.get("image_tag"),
        command=template.get("command"), run_id=member_id(group, 0), subnet_id=subnets[0],
        max_price=template.get("max_price_usd"), max_cost_usd=template.get("max_cost_usd"), dry_run=True,
        allow_empty_data=allow_empty_data,
        stall_minutes=None if template.get("stall_seconds") is None else int(template["stall_seconds"]) // 60,
    )  # fmt: skip
    checked = launching.launch(aws, request).preflight
    if not types:
        template["instance_types"] = list(checked.plan.instance_types)


@sweep_app.command("stop")
@reported_errors
def stop(
    group: Annotated[str, typer.Argument(metavar="GROUP", help="The sweep's group name.", show_default=False)],
    region: Region = None,
) -> None:
    """End a sweep: no new trials; every running member stops gracefully (checkpoint, outputs, logs)."""
    from training_infra.cli import launching
    from training_infra.cli.aws import Aws

    aws = Aws(region)
    answer, notes = launching.call_supervisor(aws, {"action": "sweep_stop", "group": group})
    for note in notes:
        err_console().print(f"note: {note}", markup=False)
    running = answer.get("running") or []
    stdout().print(f"sweep {group}: {answer['state']}; stopping {', '.join(running) or 'no running member'}",
                   markup=False)  # fmt: skip


def show_group(aws: Aws, name: str, fmt: str) -> None:
    """`status --group G`: each trial's parameters, state, attempts, objective and cost, and the best so far."""
    from training_infra import naming
    from training_infra.supervisor.runtime.sweeps import GroupStore

    group = GroupStore(aws.client("dynamodb"), aws.output(naming.OUTPUT_RUN_TABLE)).get(name)
    if group is None:
        raise UsageError(f"argument '--group': got {name!r}; allowed: a sweep's group name (no such group)")
    metric = group.spec.objective.metric
    if fmt == "json":
        print_json({"group": name, "state": group.state, "message": group.message, "spent_usd": group.spent_usd,
                    "max_cost_usd": group.spec.max_cost_usd, "best": group.best,
                    "trials": [t.to_dict() for t in group.trials]})  # fmt: skip
        return
    out = stdout()
    money = f"{fmt_usd(group.spent_usd)} of {fmt_usd(group.spec.max_cost_usd)}"
    out.print(f"sweep {name}: {group.state}, {len(group.trials)} of {group.spec.trials} trial(s), "
              f"{len(group.running)} running ({group.spec.parallel} at once), {money}; "
              f"{group.spec.objective.direction} {metric}", markup=False)  # fmt: skip
    if group.message:
        out.print(f"  {group.message}", markup=False)
    listing = Listing(
        title=f"trials of {name}",
        columns=[
            Column(c, right=c in ("trial", "tries", metric, "cost"))
            for c in ("trial", "run", "state", "tries", metric, "cost", "params")
        ],  # fmt: skip
    )
    for trial in group.trials:
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(trial.params.items()))
        value = "-" if trial.value is None else f"{trial.value:g}"
        listing.rows.append([str(trial.number), trial.run_id, str(trial.state), str(trial.attempts or "-"), value,
                             fmt_usd(trial.cost_usd), params])  # fmt: skip
    listing.print(out)
    if group.best:
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(group.best["params"].items()))
        out.print(f"best so far: trial {group.best['number']} ({group.best['run_id']}) {metric} "
                  f"{group.best['value']:g}: {params}", markup=False)  # fmt: skip


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
