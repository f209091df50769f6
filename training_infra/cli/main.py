"""The `training-infra` command: every step of a training run in one verb.

Each verb reads the deployed stacks' outputs itself, so nobody copies ARNs or bucket names by
hand. Region and credentials come the standard boto3 way; AWS_ENDPOINT_URL points every verb at
the local AWS.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import botocore.exceptions
import typer
from typer import _click as click  # typer's own copy of click: its exceptions are what parsing raises
from typer.core import TyperGroup

from training_infra import naming
from training_infra.cli import capacity, launching, preflight, runs
from training_infra.cli.aws import OUTPUT_STACKS, SNAKE_TO_KEY, Aws, NotDeployedError, output_key_for
from training_infra.cli.errors import CliError, UsageError, err_console, report_error, reported_errors
from training_infra.cli.render import Column, Listing, output_format, print_json
from training_infra.cli.safe_text import remote_text
from training_infra.supervisor.runtime.records import Run as Record
from training_infra.supervisor.runtime.records import RunState

if TYPE_CHECKING:
    from rich.console import Console


def stdout() -> Console:
    """A console for this invocation: terminal width and COLUMNS are read when a verb runs.

    rich (like boto3's transfer manager) is imported by the verbs that use it, not at start-up.
    Soft wrap: a line longer than the screen is left for the terminal to fold, never broken by
    us mid-word (an S3 URL stays one line for copy and grep).
    """
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _one_line(error: click.exceptions.UsageError) -> str:
    """click's usage errors (unknown option, missing argument, a value of the wrong type) as one line."""
    if (
        isinstance(error, click.exceptions.BadParameter)
        and not isinstance(error, click.exceptions.MissingParameter)
        and error.param is not None
    ):
        param = error.param
        if param.param_type_name == "option":
            where = f"option '{max(param.opts, key=len)}'"
        else:
            where = f"argument '{param.human_readable_name}'"
        message = f"{where}: {error.message}"
    else:
        message = error.format_message()
    command = error.ctx.command_path if error.ctx is not None else "training-infra"
    return " ".join(f"{message} (see `{command} --help`)".split())


class _OneLineUsageErrors(TyperGroup):
    """Usage errors as the one `error: ...` line every other error is, exit 2 (not a boxed panel)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as error:
            error.show()
            sys.exit(error.exit_code)
        except click.exceptions.UsageError as error:
            report_error(_one_line(error))
            sys.exit(error.exit_code)
        except click.exceptions.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except typer.Abort:
            err_console().print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    name="training-infra",
    help=(
        "Run GPU training on the stacks deployed by `make deploy`.\n\n"
        "A typical run: `training-infra upload ./data`, `training-infra launch`, "
        "`training-infra logs RUN -f`, `training-infra fetch RUN`. "
        "`training-infra status` and `training-infra cost` show what is running and what it cost.\n\n"
        "Region and credentials are read the standard AWS way (AWS_PROFILE, AWS_REGION, ~/.aws, SSO); "
        "AWS_ENDPOINT_URL points every verb at another endpoint such as the local AWS emulator. "
        "Exit codes: 0 success, 1 AWS or runtime error, 2 usage error."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("training-infra")
        except PackageNotFoundError:
            number = "unknown (not installed; run `make setup`)"
        sys.stdout.write(f"training-infra {number}\n")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_version)
    ] = False,
) -> None:
    """Options before the verb."""


Region = Annotated[
    str | None,
    typer.Option(
        "--region",
        help="AWS region of the stacks (default: AWS_DEFAULT_REGION, your profile's region, else AWS_REGION).",
        show_default=False,
    ),
]
Output = Annotated[
    str,
    typer.Option(
        "--output",
        "-o",
        metavar="table|json",
        help="table (for people; one block per run when the screen is narrow) or json (for scripts).",
    ),
]
# The older spelling of `--output json`, kept for scripts written against it.
JsonFlag = Annotated[bool, typer.Option("--json", hidden=True)]
RunArg = Annotated[
    str,
    typer.Argument(metavar="RUN", help="Run id, as printed by `launch` and listed by `status`.", show_default=False),
]
SESSION_MANAGER_PLUGIN_URL = (
    "https://docs.aws.amazon.com/systems-manager/latest/userguide/session-manager-working-with-install-plugin.html"
)
LOG_POLL_SECONDS = 2.0


def _check_run_id(run_id: str) -> str:
    """Run ids are tag values and S3 folder names: reject anything else before calling AWS."""
    value = launching.check("run_id", "RUN", run_id, kind="argument")
    if not value:
        raise UsageError("argument 'RUN': got ''; allowed: a run id such as 20261128-160000-ab12")
    return value


def _whole_number(option: str, value: str) -> int:
    """Counts are parsed here, so a bad one is the same one-line error as every other option."""
    if not value.strip().isdigit() or int(value) < 1:
        raise UsageError(f"option '{option}': got {value!r}; allowed: a whole number of at least 1")
    return int(value)


# ---- formatting ---------------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes = int(seconds // 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    return f"{hours}h {minutes:02d}m"


def fmt_usd(value: float | None) -> str:
    if value is None:
        return "-"
    if 0 < value < 0.01:
        return "<$0.01"
    return f"${value:,.2f}"


def fmt_time(moment: datetime | None) -> str:
    return runs.iso_z(moment) if moment else "-"


# ---- outputs -------------------------------------------------------------------------------


@app.command()
@reported_errors
def outputs(
    name: Annotated[
        str | None,
        typer.Argument(
            metavar="NAME",
            help="One output, printed raw like `terraform output -raw`: " + ", ".join(SNAKE_TO_KEY) + ".",
            show_default=False,
        ),
    ] = None,
    output: Output = "table",
    region: Region = None,
) -> None:
    """Print the deployed stacks' outputs under the seed's snake_case names.

    Without NAME: every output of every deployed stack as `name = value`. With NAME: the bare
    value, for scripts: `aws s3 ls s3://$(training-infra outputs training_bucket)/data/`.
    `--output json`: one JSON object of name -> value (with NAME too).
    """
    fmt = output_format(output)
    key = output_key_for(name) if name is not None else None
    aws = Aws(region)
    if key is not None:
        value = aws.output(key)
        if fmt == "json":
            print_json({naming.snake_case(key): value})
        else:
            sys.stdout.write(value + "\n")
        return
    missing, found = [], {}
    for stack in naming.ALL_STACKS:
        try:
            stack_outputs = aws.stack_outputs(stack)
        except NotDeployedError:
            missing.append(stack)
            continue
        for output_key in OUTPUT_STACKS:
            if OUTPUT_STACKS[output_key] == stack and output_key in stack_outputs:
                found[naming.snake_case(output_key)] = stack_outputs[output_key]
    if fmt == "json" and len(missing) < len(naming.ALL_STACKS):
        print_json(found)
    else:
        # One plain line each, never wrapped: ARNs and bucket names stay whole for copy and grep.
        for output_name, value in found.items():
            sys.stdout.write(f"{output_name} = {value}\n")
    if len(missing) == len(naming.ALL_STACKS):
        raise CliError(f"no training-infra stack is deployed in {aws.region_name}: run `make deploy`")
    for stack in missing:
        err_console().print(f"note: stack {stack} is not deployed in {aws.region_name}: run `make deploy`")


# ---- upload --------------------------------------------------------------------------------


@app.command()
@reported_errors
def upload(
    path: Annotated[
        Path, typer.Argument(help="A dataset directory (or one file) on this machine.", show_default=False)
    ],
    region: Region = None,
) -> None:
    """Sync a local dataset to the data bucket's `data/` prefix (what the instance mounts at /data).

    Multipart and parallel; files already in the bucket with the same content are skipped, so
    running it again after changing a few files uploads only those.
    """
    from training_infra.cli import transfer

    aws = Aws(region)
    if not path.exists():
        raise UsageError(f"argument 'PATH': got {str(path)!r}; allowed: an existing file or directory")
    bucket = aws.output(naming.OUTPUT_TRAINING_BUCKET)
    result = transfer.upload(aws, path, bucket, naming.DATA_PREFIX, err_console())
    stdout().print(
        f"uploaded {result.transferred} file(s), {result.bytes:,} bytes; skipped {result.skipped} unchanged "
        f"-> s3://{bucket}/{naming.DATA_PREFIX}",
        markup=False,
    )


# ---- launch --------------------------------------------------------------------------------


@app.command()
@reported_errors
def launch(
    instance_type: Annotated[
        str | None,
        typer.Option(
            "--instance-type",
            "-t",
            help="One EC2 type, e.g. g5.xlarge (same as --instance-types with one).",
            show_default=False,
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
        ),
    ] = None,
    spot: Annotated[
        bool | None,
        typer.Option("--spot/--on-demand", help="Short for --market spot / --market on-demand.", show_default=False),
    ] = None,
    max_restarts_on_errors: Annotated[
        str | None,
        typer.Option(
            "--max-restarts-on-errors",
            metavar="N",
            help="Relaunch after a trainer failure or stall at most N times (default 0). Spot reclaims never count.",
            show_default=False,
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
        ),
    ] = None,
    image_tag: Annotated[
        str | None,
        typer.Option(
            "--image-tag", help="Training image tag in the ECR repository (default: the stack's).", show_default=False
        ),
    ] = None,
    command: Annotated[
        str | None,
        typer.Option(
            "--command",
            help="Training command run in the container (default: the stack's, else the image's CMD).",
            show_default=False,
        ),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env",
            "-e",
            help=(
                "KEY=VALUE for the trainer's environment; repeat for more. Not for secrets: the value is "
                "readable in the instance's user data (use --secret)."
            ),
            show_default=False,
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
        ),
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id",
            help=(
                "Name of the run (lowercase letters, digits, '-'; max 63); a new one per run. "
                "Default: the UTC time and 4 random hex digits, e.g. 20261128-160000-ab12."
            ),
            show_default=False,
        ),
    ] = None,
    subnet_id: Annotated[
        str | None,
        typer.Option(
            "--subnet-id",
            help="Only this subnet (default: every subnet the compute stack publishes).",
            show_default=False,
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
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the finished run --run-id from its checkpoints (new attempts)."),
    ] = False,
    allow_empty_data: Annotated[
        bool, typer.Option("--allow-empty-data", help="Launch although the data prefix has no objects.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Run the preflight checks, print what would be launched, create nothing."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the run id.")] = False,
    region: Region = None,
) -> None:
    """Start a managed training run in seconds; the supervisor keeps it going until it ends.

    Attempt 1 starts now, on the cheapest type and zone with capacity. When AWS reclaims a spot
    attempt, the supervisor relaunches on other capacity and the agent resumes from the newest
    checkpoint, all within the run's one deadline. `stop` ends the run for good. First a preflight
    refuses what cannot work (image not in ECR, no data, no quota, nothing under --max-price, ...)
    before anything is created; --dry-run stops after it.
    """
    request = launching.validate(
        launching.LaunchRequest(
            instance_type=instance_type, instance_types=instance_types, market=market, spot=spot,
            max_restarts_on_errors=max_restarts_on_errors, max_runtime_hours=max_runtime_hours,
            stall_minutes=stall_minutes, image_tag=image_tag,
            command=command, env=list(env or []), secret_refs=list(secret or []), run_id=run_id, subnet_id=subnet_id,
            max_price=max_price, resume=resume, allow_empty_data=allow_empty_data, dry_run=dry_run,
            max_cost_usd=max_cost_usd,
        )
    )  # fmt: skip
    started = launching.launch(Aws(region), request)
    if dry_run:
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
    if attempt and attempt.instance_id:
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


# ---- status --------------------------------------------------------------------------------


def _run_rows(aws: Aws, found: list[runs.Run]) -> list[dict[str, Any]]:
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


@app.command()
@reported_errors
def status(
    run: Annotated[str | None, typer.Argument(metavar="RUN", help="Only this run.", show_default=False)] = None,
    limit: Annotated[
        str, typer.Option("--limit", "-n", metavar="N", help="Show at most this many runs, newest first.")
    ] = "20",
    output: Output = "table",
    as_json: JsonFlag = False,
    region: Region = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="With RUN: why it waits (pools tried, EC2's answers, cooldowns).")
    ] = False,
) -> None:
    """Show runs: instance, type, market, state, uptime, deadline, cost so far, outcome.

    The newest runs come from the run table (one query, however many runs the team has made);
    EC2 and prices are asked only for the runs shown that are still going. Runs known only from
    their status.json (made before the run table) are recorded in it the first time they are seen.
    """
    fmt = output_format(output, as_json=as_json)
    count = _whole_number("--limit", limit)
    if run is not None:
        run = _check_run_id(run)
    aws = Aws(region)
    store = _run_store(aws)
    if store is None:  # a deployment from before the run table: status files and tags only
        found = runs.require_runs(aws, run) if run else runs.collect_runs(aws)
        rows = _run_rows(aws, found[:count])
    elif run is not None:
        record = store.get(run)
        rows = _managed_rows(aws, [record]) if record else _run_rows(aws, runs.require_runs(aws, run))
        if record is not None:
            rows[0]["progress"] = _progress(aws, record)
            if verbose:
                rows[0]["waiting"] = capacity.waiting(record, runs.utcnow())
        if record is not None and fmt != "json":
            _show_managed_run(rows[0])
            for line in capacity.waiting_lines(rows[0].get("waiting")):
                stdout().print(remote_text(line), markup=False)  # pool names and EC2's words come from the record
            return
    else:
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
        unrecorded = _unrecorded_live_runs(store, records, live) + recorded.unrecorded
        rows = _managed_rows(aws, records) + _run_rows(aws, unrecorded)
        rows.sort(key=lambda row: row["launched_at"] or "", reverse=True)
        rows = rows[:count]
    if fmt == "json":
        print_json(rows)
        return
    if not rows:
        stdout().print(f"no runs yet in {aws.region_name}: start one with `training-infra launch`", markup=False)
        return
    listing = Listing(
        title=f"training runs ({aws.region_name})",
        columns=[
            Column(name, right=name in ("uptime", "cost", "tries"))
            for name in ("run", "instance", "type", "market", "state", "tries", "uptime", "deadline", "cost", "outcome")
        ],
        caption="tries: attempts of a managed run; cost: spot history (else list price) + volume",
    )
    for row in rows:
        outcome = row["outcome"] or ""
        if row["exit_code"] not in (None, "") and outcome:
            outcome += f" (exit {row['exit_code']})"
        listing.rows.append([
            row["run_id"], row["instance_id"] or "-", row["instance_type"] or "-", row["market"] or "-", row["state"],
            str(row.get("tries") or "-"), fmt_duration(row["uptime_seconds"]), row["deadline"] or "-",
            fmt_usd(row["cost_usd"]), outcome or "-",
        ])  # fmt: skip
    listing.print(stdout())


def _run_store(aws: Aws):
    """The run table of managed runs; None for a deployment from before it existed."""
    table = aws.stack_outputs(naming.STORAGE_STACK).get(naming.OUTPUT_RUN_TABLE)
    if not table:
        return None
    from training_infra.supervisor.runtime.records import RunStore

    return RunStore(aws.client("dynamodb"), table)


def _unrecorded_live_runs(store: Any, records: list[Any], instances: list[dict[str, Any]]) -> list[runs.Run]:
    """Live managed instances without a run record (the stack's own instance, an older CLI's launch)."""
    shown = {record.run_id for record in records}
    live = [runs.run_from_instance(i) for i in instances]
    candidates = sorted({r.run_id for r in live if r.run_id and r.run_id not in shown})
    recorded = store.existing(candidates) if candidates else set()
    return [r for r in live if r.run_id and r.run_id not in shown and r.run_id not in recorded]


def _managed_rows(aws: Aws, records: list[Record]) -> list[dict[str, Any]]:
    """Rows for recorded runs. Ended attempts carry their price; EC2 and the spot price history are
    asked only for the attempts still open: one DescribeInstances for all of them, one price
    history per type and zone."""
    from training_infra.supervisor.runtime import ledger

    now = runs.utcnow()
    ids = sorted({a.instance_id for r in records for a in r.launched if not a.ended_at})
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
    return [_managed_row(record, instances, spot, now) for record in records]


def _managed_row(record: Record, instances: dict[str, runs.Run], spot: Any, now: datetime) -> dict[str, Any]:
    """A managed run as a `status` row: its current (or last) attempt, and uptime and cost over every attempt."""
    from training_infra.supervisor.runtime import ledger

    attempts = []
    for attempt in record.attempts:
        instance = instances.get(attempt.instance_id)
        if instance is not None and instance.launched_at and not attempt.ended_at:
            attempt = replace(attempt, started_at=runs.iso_z(instance.launched_at))  # EC2 bills from its launch time
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
        # A resumed run's limit counts from its resume (spent_before_usd), as the supervisor's does.
        "left_usd": max(0.0, spec.max_cost_usd - ((total("cost_usd") or 0) - spec.spent_before_usd))
        if spec.max_cost_usd
        else None,
        "managed": {
            "spec": spec.to_dict(),
            "errors_used": record.errors_used,
            "stop_requested_at": record.stop_requested_at or None,
            "ended_at": record.ended_at or None,
        },
        "attempts": attempts,
    }


def _progress(aws: Aws, record: Record) -> dict[str, Any] | None:
    """The last attempt's progress.json (the agent uploads it once a minute with progress), or None."""
    if not record.launched:
        return None
    key = f"{naming.RUNS_PREFIX}{record.run_id}/attempts/{record.launched[-1].n}/progress.json"
    try:
        body = aws.client("s3").get_object(Bucket=aws.output(naming.OUTPUT_OUTPUTS_BUCKET), Key=key)["Body"].read()
        progress = json.loads(body)
    except botocore.exceptions.ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    except ValueError:
        return None
    return progress if isinstance(progress, dict) else None


def _progress_words(progress: dict[str, Any] | None) -> str:
    """`step 1200, 3.1 steps/s, last progress 40 s ago`, or why there is none."""
    if not progress:
        return "none reported yet this attempt (a trainer that never writes HEARTBEAT_FILE is judged by idle GPU only)"
    parts = []
    step = progress.get("step")
    if isinstance(step, (int, float)):
        parts.append(f"step {int(step)}" if float(step).is_integer() else f"step {step}")
    if isinstance(progress.get("steps_per_second"), (int, float)):
        parts.append(f"{progress['steps_per_second']:.3g} steps/s")
    changed = runs.parse_time(progress.get("changed_at"))
    if changed is not None:
        ago = max(0.0, (runs.utcnow() - changed).total_seconds())
        parts.append(f"last progress {fmt_duration(ago) if ago >= 120 else f'{ago:.0f} s'} ago")
    return ", ".join(parts) or "beats without a step"


def _show_managed_run(row: dict[str, Any]) -> None:
    out = stdout()
    spec = row["managed"]["spec"]
    # Short lines: readable at 80 columns and piped; a long message stays one line for grep.
    for line in (
        f"run {row['run_id']}: {row['state']}",
        f"  {row['message']}",
        f"  deadline {row['deadline']}",
        f"  market {spec.get('market')}; types {', '.join(spec.get('instance_types', []))}",
        f"  restarts on errors: {row['managed']['errors_used']} of {spec.get('max_restarts_on_errors', 0)} used",
        f"  uptime {fmt_duration(row['uptime_seconds'])}; cost {fmt_usd(row['cost_usd'])}"
        + (f" of {fmt_usd(row['max_cost_usd'])} ({fmt_usd(row['left_usd'])} left)" if row["max_cost_usd"] else ""),
        f"  progress: {_progress_words(row.get('progress'))}",
    ):
        out.print(remote_text(line), markup=False)  # the message and spec come from the run record
    listing = Listing(
        title=f"attempts of {row['run_id']}",
        columns=[
            Column(name, right=name in ("#", "uptime", "cost"))
            for name in (
                "#",
                "instance",
                "type",
                "zone",
                "market",
                "state",
                "start",
                "end",
                "uptime",
                "cost",
                "why it ended",
            )
        ],
        caption="cost: spot history (else list price) + volume",
    )
    for a in row["attempts"]:
        why = a["end_reason"] or ("-" if a["instance_id"] else "launching")
        if a["end_reason"] == "capacity" and a["tries"] > 1:
            why += f" ({a['tries']} tries)"
        if a["message"] and a["end_reason"] not in (None, "succeeded"):
            why += f": {a['message']}"
        listing.rows.append([
            str(a["attempt"]), a["instance_id"] or "-", a["instance_type"] or "-", a["zone"] or "-", a["market"] or "-",
            a["instance_state"] or "-", _hhmm(a["started_at"]), _hhmm(a["ended_at"]), fmt_duration(a["uptime_seconds"]),
            fmt_usd(a["cost_usd"]), why,
        ])  # fmt: skip
    listing.print(out)


def _hhmm(moment: str | None) -> str:
    """A start or end as `MM-DD HH:MM` (UTC): short enough for the attempts table; JSON has the full time."""
    parsed = runs.parse_time(moment)
    return parsed.strftime("%m-%d %H:%M") if parsed else "-"


# ---- logs ----------------------------------------------------------------------------------


@app.command()
@reported_errors
def logs(
    run: RunArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until the run ends (Ctrl-C to stop).")
    ] = False,
    region: Region = None,
) -> None:
    """Print the run's training log from CloudWatch Logs (one stream per run)."""
    run = _check_run_id(run)
    aws = Aws(region)
    group = aws.output(naming.OUTPUT_LOG_GROUP_NAME)
    client = aws.client("logs")
    token: str | None = None
    announced = False
    while True:
        kwargs: dict[str, Any] = {"logGroupName": group, "logStreamName": run, "startFromHead": True}
        if token:
            kwargs["nextToken"] = token
        try:
            page = client.get_log_events(**kwargs)
        except botocore.exceptions.ClientError as error:
            if error.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise
            live = [r for r in runs.require_runs(aws, run) if r.live]  # unknown run: a clear error
            if not (follow and live):
                raise CliError(
                    f"no log lines for run {run} yet (stream {run} in {group}): "
                    "the agent starts logging once the instance has booted"
                ) from None
            if not announced:
                err_console().print(f"waiting for run {run} to start logging ...")
                announced = True
            time.sleep(LOG_POLL_SECONDS)
            continue
        for event in page.get("events", []):
            sys.stdout.write(remote_text(event.get("message", "").rstrip("\n")) + "\n")
        sys.stdout.flush()
        new_token = page.get("nextForwardToken")
        if new_token != token:
            token = new_token
            if page.get("events"):
                continue  # drain everything already there before deciding to wait
        if not follow:
            return
        store = _run_store(aws)
        record = store.get(run) if store is not None else None
        still_going = record.active if record is not None else any(r.live for r in runs.collect_runs(aws, run))
        if not still_going:  # a managed run goes on between attempts and while it waits for capacity
            # One last read after the end, for lines flushed on the way down.
            last = (
                client.get_log_events(logGroupName=group, logStreamName=run, startFromHead=True, nextToken=token)
                if token
                else {"events": []}
            )
            for event in last.get("events", []):
                sys.stdout.write(remote_text(event.get("message", "").rstrip("\n")) + "\n")
            return
        time.sleep(LOG_POLL_SECONDS)


# ---- connect -------------------------------------------------------------------------------


def _live_instance(aws: Aws, run: str) -> runs.Run:
    found = runs.require_runs(aws, run)
    live = [r for r in found if r.state == "running"]
    if not live:
        states = ", ".join(sorted({r.state for r in found}))
        raise CliError(f"run {run} has no running instance ({states}): `training-infra status {run}`")
    return live[0]


@app.command()
@reported_errors
def connect(run: RunArg, region: Region = None) -> None:
    """Open a shell on the run's instance through SSM Session Manager (no SSH, no open port).

    Needs the AWS CLI and the Session Manager plugin; without the plugin, prints the exact
    command to run once it is installed.
    """
    run = _check_run_id(run)
    aws = Aws(region)
    instance = _live_instance(aws, run)
    command = ["aws", "ssm", "start-session", "--target", instance.instance_id, "--region", aws.region_name]
    if shutil.which("session-manager-plugin") is None or shutil.which("aws") is None:
        missing = "the Session Manager plugin" if shutil.which("session-manager-plugin") is None else "the AWS CLI"
        sys.stdout.write(shlex.join(command) + "\n")
        raise CliError(
            f"{missing} is not installed: install it ({SESSION_MANAGER_PLUGIN_URL}), then run the command above"
        )
    err_console().print(f"connecting to {instance.instance_id} (run {run}); type `exit` to leave")
    raise typer.Exit(subprocess.call(command))


# ---- fetch ---------------------------------------------------------------------------------


@app.command()
@reported_errors
def fetch(
    run: Annotated[
        str,
        typer.Argument(
            metavar="RUN|latest", help="Run id, or `latest` for the most recent finished run.", show_default=False
        ),
    ],
    dest: Annotated[
        Path | None, typer.Argument(metavar="DEST", help="Local folder (default: ./runs/<run>).", show_default=False)
    ] = None,
    region: Region = None,
) -> None:
    """Download a run's results: outputs/, logs/ and status.json (a progress bar on a terminal).

    The files come whatever the outcome; a note on stderr says when the run failed or is still running.
    """
    from training_infra.cli import transfer

    run = run if run == "latest" else _check_run_id(run)
    aws = Aws(region)
    bucket = aws.output(naming.OUTPUT_OUTPUTS_BUCKET)
    prefix = naming.LATEST_PREFIX if run == "latest" else f"{naming.RUNS_PREFIX}{run}/"
    target = dest or Path("runs") / run
    objects = transfer.remote_objects(aws, bucket, prefix)
    if not objects:
        if run == "latest":
            raise CliError(f"no finished run yet: s3://{bucket}/{prefix} is empty")
        found = runs.require_runs(aws, run)
        raise CliError(f"run {run} has no results yet ({found[0].state}): the agent uploads them when the run ends")
    result = transfer.download(aws, bucket, prefix, objects, target, err_console())
    stdout().print(
        f"fetched {result.transferred} file(s), {result.bytes:,} bytes from s3://{bucket}/{prefix} -> {target}",
        markup=False,
    )
    if run != "latest":
        note = _fetch_note(aws, run, target)
        if note:
            err_console().print(f"note: {remote_text(note)}", markup=False)  # the note quotes status.json


def _fetch_note(aws: Aws, run: str, target: Path) -> str:
    """What the user must know about the files just fetched: the run failed, or has not ended."""
    store = _run_store(aws)
    record = store.get(run) if store is not None else None
    if record is not None and record.active:
        # A managed run's status.json is its latest attempt's: the run itself may go on.
        current = record.current
        if current and current.instance_id:
            where = f"run {run} (attempt {current.n}) is still running on {current.instance_id}"
        else:
            where = f"run {run} is still {record.state}"
        return f"{where}: these are only the files uploaded so far; fetch again after it ends"
    if record is not None and record.state != RunState.SUCCEEDED:
        logs = target / "attempts" / str(record.attempts[-1].n if record.attempts else 1) / "logs"
        return f"run {run} ended {record.state}: {record.message}; these are the files it left, see {logs}"
    status = runs.read_status_file(target / runs.STATUS_FILE)
    if status is not None:
        outcome = status.get("outcome", "unknown")
        if outcome == "succeeded":
            return ""
        code = status.get("exit_code")
        detail = f" (exit {code})" if code not in (None, "") else ""
        message = f": {status['message']}" if status.get("message") else ""
        return f"run {run} ended {outcome}{detail}{message}; these are the files it left, see {target / 'logs'}"
    live = [r for r in runs.collect_runs(aws, run) if r.live]
    if live:
        return (
            f"run {run} is still {live[0].state} on {live[0].instance_id}: "
            "these are only the files uploaded so far; fetch again after it ends"
        )
    return f"run {run} has no status.json: it ended without the agent's last upload; see {target / 'logs'}"


# ---- stop ----------------------------------------------------------------------------------


@app.command()
@reported_errors
def stop(run: RunArg, region: Region = None) -> None:
    """End a run for good: no relaunch; its instance stops the trainer gracefully first.

    A managed run's instance is told to stop (checkpoint flushed, outputs and logs uploaded,
    status written, power-off) and is terminated by the supervisor if it has not gone after
    ten minutes. Only instances tagged `training-infra:managed=true` are ever terminated.
    """
    run = _check_run_id(run)
    aws = Aws(region)
    store = _run_store(aws)
    record = store.get(run) if store is not None else None
    out = stdout()
    if record is None and not runs.instances_for(aws, run, managed_only=False):
        runs.require_runs(aws, run)  # unknown run -> clear error before asking anyone
    answer, notes = launching.call_supervisor(aws, {"action": "stop", "run_id": run})
    for note in notes:
        err_console().print(f"note: {note}", markup=False)
    result = answer["result"]
    if result == "ended":
        out.print(f"run {run} has already ended ({answer['state']}); nothing to stop", markup=False)
        return
    if result == "stopping":
        out.print(f"run {run} is already stopping (asked at {answer['since']})", markup=False)
        return
    if result == "stop-requested":
        where = f" on {answer['instance_id']}" if answer.get("instance_id") else ""
        out.print(
            f"stopping run {run}{where}: no more attempts; "
            "the trainer gets its grace period, then outputs and logs are uploaded",
            markup=False,
        )
        out.print(f"  training-infra status {run}", markup=False)
        return
    live, stopped = answer["live"], answer["stopped"]
    if not live and not stopped:
        states = ", ".join(s for s in answer["states"] if s)
        out.print(f"run {run} has already ended{f' ({states})' if states else ''}; nothing to stop", markup=False)
        return
    if live:
        out.print(f"stopping run {run}: terminating {', '.join(live)}; outputs and logs are uploaded on the way down")
    if stopped:
        out.print(f"run {run}: terminating stopped {', '.join(stopped)} (its volume bills while it is stopped)")
    out.print(f"  training-infra status {run}", markup=False)


# ---- cost ----------------------------------------------------------------------------------


@app.command()
@reported_errors
def cost(
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            metavar="DATE",
            help="Start of the period: YYYY-MM-DD or YYYY-MM (UTC). Default: the 1st of this month.",
            show_default=False,
        ),
    ] = None,
    days: Annotated[
        str | None,
        typer.Option("--days", "-d", metavar="N", help="The last N days instead of --since.", show_default=False),
    ] = None,
    run: Annotated[
        str | None, typer.Option("--run", metavar="RUN", help="Only this run, per attempt.", show_default=False)
    ] = None,
    output: Output = "table",
    as_json: JsonFlag = False,
    region: Region = None,
) -> None:
    """Cost per run in a period, in total, and the saving against on-demand prices.

    Read from what the run table records per attempt (the supervisor prices each attempt when it
    ends); only attempts still going are priced now, with one spot price history per type and
    zone. An attempt that began before the period counts for the hours inside it.
    """
    fmt = output_format(output, as_json=as_json)
    now = runs.utcnow()
    # One run: its whole life unless a period is given.
    whole_run = run is not None and since is None and days is None
    start, period = (datetime(1970, 1, 1, tzinfo=UTC), "over its whole run") if whole_run else _period(since, days, now)
    if run is not None:
        run = launching.check("run_id", "--run", run)
        if not run:
            raise UsageError("option '--run': got ''; allowed: a run id such as 20261128-160000-ab12")
    aws = Aws(region)
    store = _run_store(aws)
    attempts: dict[str, list[dict[str, Any]]] = {}
    if store is None:  # a deployment from before the run table: status files and tags only
        found = runs.require_runs(aws, run) if run else runs.collect_runs(aws)
        rows = [r for r in _run_rows(aws, found) if (runs.parse_time(r["launched_at"]) or now) >= start]
    else:
        unrecorded: list[runs.Run] = []
        summarized: list[dict[str, Any]] = []
        if run is not None:
            records = [_record_of(aws, store, run)]
        else:
            recorded = runs.record_bucket_runs(aws, store)
            unrecorded = recorded.unrecorded
            records, summarized = _period_runs(store, start)
        rows, attempts = _costs_within(_managed_rows(aws, records), start, now)
        rows += summarized
        rows += [r for r in _run_rows(aws, unrecorded) if (runs.parse_time(r["launched_at"]) or now) >= start]
        rows.sort(key=lambda row: row["launched_at"] or "", reverse=True)
    total = sum(r["cost_usd"] or 0 for r in rows)
    on_demand = sum(r["on_demand_usd"] if r["on_demand_usd"] is not None else (r["cost_usd"] or 0) for r in rows)
    saving = on_demand - total
    if fmt == "json":
        print_json(
            {
                "since": runs.iso_z(start),
                "until": runs.iso_z(now),
                "runs": [{**row, "attempts": attempts.get(row["run_id"], [])} for row in rows],
                "total_usd": total,
                "on_demand_usd": on_demand,
                "saving_usd": saving,
            }
        )
        return
    if not rows:
        stdout().print(f"no runs {period} in {aws.region_name}", markup=False)
        return
    out = stdout()
    if run is not None and attempts.get(run):
        _cost_attempts_listing(run, period, attempts[run]).print(out)
    else:
        listing = Listing(
            title=f"cost of runs {period} ({aws.region_name})",
            columns=[
                Column(name, right=name in ("tries", "hours", "cost", "on-demand"))
                for name in ("run", "type", "market", "tries", "hours", "cost", "on-demand", "price from")
            ],
            footer=["total", "", "", "", "", fmt_usd(total), fmt_usd(on_demand), ""],
        )
        for row in rows:
            hours = row["uptime_seconds"] / 3600 if row["uptime_seconds"] is not None else None
            listing.rows.append([
                row["run_id"], row["instance_type"] or "-", row["market"] or "-", str(row.get("tries") or "-"),
                f"{hours:.2f}" if hours is not None else "-",
                fmt_usd(row["cost_usd"]), fmt_usd(row["on_demand_usd"]), row["price_source"] or "-",
            ])  # fmt: skip
        listing.print(out)
    percent = f" ({saving / on_demand:.0%})" if on_demand > 0 else ""
    out.print(f"saving vs on-demand: {fmt_usd(saving)}{percent}", markup=False)


def _period_runs(store: Any, start: datetime) -> tuple[list[Any], list[dict[str, Any]]]:
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


def _record_of(aws: Aws, store: Any, run: str) -> Any:
    """The run's record; a run known only from its status.json is recorded now (or just read, without write access)."""
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


def _period(since: str | None, days: str | None, now: datetime) -> tuple[datetime, str]:
    """The period's start and its words: --since DATE, --days N, or this month."""
    if since is not None and days is not None:
        raise UsageError("options '--since' and '--days': got both; allowed: one of them")
    if days is not None:
        count = _whole_number("--days", days)
        return now - timedelta(days=count), f"in the last {count} days"
    if since is None:
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return start, f"since {start:%Y-%m-%d}"
    for pattern in ("%Y-%m-%d", "%Y-%m"):
        try:
            start = datetime.strptime(since, pattern).replace(tzinfo=UTC)
        except ValueError:
            continue
        if start > now:
            raise UsageError(f"option '--since': got {since!r}; allowed: a date not in the future")
        return start, f"since {start:%Y-%m-%d}"
    raise UsageError(f"option '--since': got {since!r}; allowed: a date as YYYY-MM-DD or YYYY-MM")


def _costs_within(
    rows: list[dict[str, Any]], start: datetime, now: datetime
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Each run's hours and cost inside [start, now]: an attempt that straddles `start` counts pro rata."""
    kept, per_run = [], {}
    for row in rows:
        parts = []
        for attempt in row["attempts"]:
            began = runs.parse_time(attempt["started_at"]) if attempt["instance_id"] else None
            if began is None or attempt["uptime_seconds"] is None:
                continue
            ended = began + timedelta(seconds=attempt["uptime_seconds"])
            inside = (min(ended, now) - max(began, start)).total_seconds()
            if inside <= 0 and ended > began:
                continue
            share = 1.0 if ended <= began else min(1.0, inside / (ended - began).total_seconds())

            def part(value: float | None, share: float = share) -> float | None:
                return value * share if value is not None else None

            parts.append(
                {
                    **attempt,
                    "uptime_seconds": max(0.0, inside) if ended > began else 0.0,
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


def _cost_attempts_listing(run: str, period: str, attempts: list[dict[str, Any]]) -> Listing:
    listing = Listing(
        title=f"cost of run {run} {period}",
        columns=[
            Column(name, right=name in ("#", "hours", "$/hour", "cost", "on-demand"))
            for name in ("#", "type", "zone", "market", "hours", "$/hour", "cost", "on-demand", "price from")
        ],
        footer=[
            "total",
            "",
            "",
            "",
            "",
            "",
            fmt_usd(sum(a["cost_usd"] or 0 for a in attempts)),
            fmt_usd(sum(a["on_demand_usd"] or 0 for a in attempts)),
            "",
        ],  # fmt: skip
    )
    for a in attempts:
        listing.rows.append([
            str(a["attempt"]), a["instance_type"] or "-", a["zone"] or "-", a["market"] or "-",
            f"{a['uptime_seconds'] / 3600:.2f}", f"{a['hourly_usd']:.4f}" if a["hourly_usd"] else "-",
            fmt_usd(a["cost_usd"]), fmt_usd(a["on_demand_usd"]), a["price_source"],
        ])  # fmt: skip
    return listing


# ---- local -----------------------------------------------------------------------------------

from training_infra.cli.local import local_app  # noqa: E402 - the verbs above come first in --help

app.add_typer(local_app)
app.add_typer(capacity.capacity_app)


def main() -> None:
    """Console-script entry point (`training-infra`)."""
    app(prog_name="training-infra")


if __name__ == "__main__":
    main()
