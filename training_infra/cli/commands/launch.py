"""`training-infra launch`: a managed run, after a preflight that refuses what cannot work."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from training_infra.cli.aws import Aws
from training_infra.cli.errors import CliError, UsageError, err_console, reported_errors
from training_infra.cli.options import Region
from training_infra.cli.render import stdout
from training_infra.cli.safe_text import remote_text

RESOURCES, LIMITS, IMAGE, SECRETS, RUN = "Resources", "Limits", "Image and command", "Secrets", "The run"


@reported_errors
def launch(
    instance_type: Annotated[
        str | None,
        typer.Option(
            "--instance-type",
            "-t",
            metavar="TYPE",
            help="One EC2 type, e.g. g5.xlarge (same as --instance-types with one).",
            show_default=False,
            rich_help_panel=RESOURCES,
        ),
    ] = None,
    instance_types: Annotated[
        str | None,
        typer.Option(
            "--instance-types",
            metavar="TYPES",
            help=(
                "Types each attempt may take, comma-separated, e.g. g5.xlarge,g6.xlarge: "
                "EC2 picks the cheapest with capacity in any zone (default: the stack's instance_types)."
            ),
            show_default=False,
            rich_help_panel=RESOURCES,
        ),
    ] = None,
    market: Annotated[
        str | None,
        typer.Option(
            "--market",
            metavar="MARKET",
            help=(
                "spot, on-demand, or spot-then-on-demand (on-demand only when no zone has spot capacity). "
                "Default: the stack's use_spot."
            ),
            show_default=False,
            rich_help_panel=RESOURCES,
        ),
    ] = None,
    spot: Annotated[
        bool,
        typer.Option("--spot", help="Short for --market spot.", rich_help_panel=RESOURCES),
    ] = False,
    on_demand: Annotated[
        bool,
        typer.Option("--on-demand", help="Short for --market on-demand.", rich_help_panel=RESOURCES),
    ] = False,
    max_restarts_on_errors: Annotated[
        str | None,
        typer.Option(
            "--max-restarts-on-errors",
            metavar="N",
            help="Relaunch after a trainer failure or stall at most N times (default 0). Spot reclaims never count.",
            show_default=False,
            rich_help_panel=LIMITS,
        ),
    ] = None,
    max_runtime_hours: Annotated[
        str | None,
        typer.Option(
            "--max-runtime-hours",
            metavar="HOURS",
            help=(
                "One deadline for the whole run, counted from now across every attempt: "
                "more than 0, at most 168 (default: the stack's)."
            ),
            show_default=False,
            rich_help_panel=LIMITS,
        ),
    ] = None,
    stall_minutes: Annotated[
        str | None,
        typer.Option(
            "--stall-minutes",
            metavar="MINUTES",
            help=(
                "No progress in HEARTBEAT_FILE for this long ends the attempt as stalled (diagnostics first); "
                "0 turns it off (default: the stack's, 20)."
            ),
            show_default=False,
            rich_help_panel=LIMITS,
        ),
    ] = None,
    image_tag: Annotated[
        str | None,
        typer.Option(
            "--image-tag",
            metavar="TAG",
            help="Training image tag in the ECR repository (default: the stack's).",
            show_default=False,
            rich_help_panel=IMAGE,
        ),
    ] = None,
    command: Annotated[
        str | None,
        typer.Option(
            "--command",
            metavar="COMMAND",
            help="Training command run in the container (default: the stack's, else the image's CMD).",
            show_default=False,
            rich_help_panel=IMAGE,
        ),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env",
            "-e",
            metavar="KEY=VALUE",
            help=(
                "KEY=VALUE for the trainer's environment; repeat for more. Not for secrets: the value is "
                "readable in the instance's user data (use --secret)."
            ),
            show_default=False,
            rich_help_panel=IMAGE,
        ),
    ] = None,
    secret: Annotated[
        list[str] | None,
        typer.Option(
            "--secret",
            metavar="NAME=REF",
            help=(
                "A secret for the trainer's environment, read on the instance at start: "
                "NAME=ssm:/training-infra/PATH (SecureString) or NAME=arn:aws:secretsmanager:... (tagged "
                "training-infra:managed=true); repeat for more. Never in user data, logs or status.json; --env "
                "is not for secrets."
            ),
            show_default=False,
            rich_help_panel=SECRETS,
        ),
    ] = None,
    max_cost_usd: Annotated[
        str | None,
        typer.Option(
            "--max-cost-usd",
            metavar="USD",
            help=(
                "Most the run may cost across every attempt (instance and volume): it is stopped gracefully "
                "before it passes this, ends as budget and is never relaunched past it."
            ),
            show_default=False,
            rich_help_panel=LIMITS,
        ),
    ] = None,
    data_access: Annotated[
        str | None,
        typer.Option(
            "--data-access",
            metavar="sync|mount",
            help=(
                "How the run sees the data bucket's data/ at /data: sync copies it to the volume first; mount serves "
                "it read-only through Mountpoint for Amazon S3 (data larger than the disk). Default: the stack's."
            ),
            show_default=False,
            rich_help_panel=IMAGE,
        ),
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id",
            metavar="RUN",
            help=(
                "Name of the run (lowercase letters, digits, '-'; max 63); a new one per run. "
                "Default: the UTC time and 4 random hex digits, e.g. 20261128-160000-ab12."
            ),
            show_default=False,
            rich_help_panel=RUN,
        ),
    ] = None,
    subnet_id: Annotated[
        str | None,
        typer.Option(
            "--subnet-id",
            metavar="SUBNET",
            help="Only this subnet (default: every subnet the compute stack publishes).",
            show_default=False,
            rich_help_panel=RESOURCES,
        ),
    ] = None,
    capacity_reservation: Annotated[
        str | None,
        typer.Option(
            "--capacity-reservation",
            metavar="ID",
            help=(
                "Run in this Capacity Block you bought (cr-...): market capacity-block, prepaid, its type and zone; "
                "the deadline is clipped to the block's end."
            ),
            show_default=False,
            rich_help_panel=RESOURCES,
        ),
    ] = None,
    max_price: Annotated[
        str | None,
        typer.Option(
            "--max-price",
            metavar="USD",
            help=(
                "Never pay more than this per hour (spot or on-demand), e.g. 0.60: pools priced above it are not "
                "offered, and the fleet's own price caps are set."
            ),
            show_default=False,
            rich_help_panel=LIMITS,
        ),
    ] = None,
    nodes: Annotated[
        str | None,
        typer.Option(
            "--nodes",
            metavar="N",
            help=(
                "A multi-node run: N instances of one type in one subnet and placement group, started all or "
                "none, node 0 the torchrun rendezvous host (at most the stack's max_nodes; default 1)."
            ),
            show_default=False,
            rich_help_panel=RESOURCES,
        ),
    ] = None,
    no_nccl_efa_check: Annotated[
        bool,
        typer.Option(
            "--no-nccl-efa-check",
            help=(
                "A multi-node run on EFA types: do not fail the attempt when NCCL's init log shows TCP sockets instead "
                "of EFA (the check is on by default; spec key resources.nccl_efa_check)."
            ),
            rich_help_panel=RESOURCES,
        ),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the finished run --run-id from its checkpoints (new attempts).",
            rich_help_panel=RUN,
        ),
    ] = False,
    allow_empty_data: Annotated[
        bool,
        typer.Option("--allow-empty-data", help="Launch although the data prefix has no objects.", rich_help_panel=RUN),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Run the preflight checks, print what would be launched, create nothing.",
            rich_help_panel=RUN,
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the run id.", rich_help_panel=RUN)] = False,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            metavar="SPEC",
            help="A run spec (YAML, `training-infra schema`); flags override it.",
            show_default=False,
            dir_okay=False,
            rich_help_panel=RUN,
        ),
    ] = None,
    like: Annotated[
        str | None,
        typer.Option(
            "--like",
            metavar="RUN",
            help="A copy of RUN's spec; flags change it.",
            show_default=False,
            rich_help_panel=RUN,
        ),
    ] = None,
    region: Region = None,
) -> None:
    """Start a managed training run in seconds; the supervisor keeps it going until it ends.

    Attempt 1 starts now, on the cheapest type and zone with capacity. When AWS reclaims a spot
    attempt, the supervisor relaunches on other capacity and the agent resumes from the newest
    checkpoint, all within the run's one deadline. `stop` ends the run for good. First a preflight
    refuses what cannot work (image not in ECR, no data, no quota, nothing under --max-price, ...)
    before anything is created; --dry-run stops after it.
    """
    from training_infra.cli import launching, preflight, spec_cli

    if spot and on_demand:
        raise UsageError("options '--spot' and '--on-demand': got both; allowed: one of them")
    market_flag = True if spot else False if on_demand else None
    request = launching.validate(
        launching.LaunchRequest(
            instance_type=instance_type, instance_types=instance_types, market=market, spot=market_flag,
            max_restarts_on_errors=max_restarts_on_errors, max_runtime_hours=max_runtime_hours,
            stall_minutes=stall_minutes, image_tag=image_tag,
            command=command, env=list(env or []), secret_refs=list(secret or []), run_id=run_id, subnet_id=subnet_id,
            max_price=max_price, resume=resume, allow_empty_data=allow_empty_data, dry_run=dry_run,
            max_cost_usd=max_cost_usd, nodes=nodes, data_access=data_access,
            capacity_reservation=capacity_reservation, nccl_efa_check=False if no_nccl_efa_check else None,
        )
    )  # fmt: skip
    if like is not None:  # a run id is checked before any AWS call, as every verb's RUN is
        like = launching.check("run_id", "--like", like)
    aws = Aws(region)
    request = spec_cli.request_for(aws, request, file=file, like=like)  # run specs: cli/spec_cli.py
    started = launching.launch(aws, request)
    if dry_run:
        if file is not None or like is not None:  # the resolved spec, then the preflight
            for line in [*spec_cli.dry_run_lines(started.spec, started.sources, request.spec_layers), ""]:
                stdout().print(line, markup=False)
        for line in preflight.dry_run_lines(started.preflight):
            stdout().print(line, markup=False)
        return
    for note in [*started.preflight.notes, *started.notes]:  # once each, on stderr: -q stays clean
        err_console().print(f"note: {note}", markup=False)
    managed = started.run
    if quiet:
        sys.stdout.write(managed.run_id + "\n")
        return
    rid = managed.run_id
    out = stdout()
    attempt = managed.current
    if attempt and attempt.members:
        out.print(
            f"launched run {rid}: attempt {attempt.n}, {len(attempt.members)} nodes on {attempt.instance_type} "
            f"({attempt.market}, {attempt.zone}), node 0 {attempt.instance_id} in {started.elapsed_seconds:.1f} s; "
            f"managed until {managed.deadline_at}",
            markup=False,
        )
    elif attempt and attempt.instance_id:
        out.print(
            f"launched run {rid}: attempt {attempt.n} on {attempt.instance_id} ({attempt.instance_type}, "
            f"{attempt.market}, {attempt.zone}) in {started.elapsed_seconds:.1f} s; "
            f"managed until {managed.deadline_at}",
            markup=False,
        )
    elif managed.active:
        out.print(
            f"run {rid} is waiting for capacity ({remote_text(managed.message)}); "
            f"the supervisor retries every minute until {managed.deadline_at}",
            markup=False,
        )
    else:
        raise CliError(f"run {rid} could not start: {remote_text(managed.message)}")
    out.print("next:", markup=False)
    for line in (f"status {rid}", f"logs {rid} -f", f"connect {rid}", f"fetch {rid}", f"stop {rid}"):
        out.print(f"  training-infra {line}", markup=False)
