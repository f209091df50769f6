"""The `training-infra` command: every step of a training run in one verb.

Each verb reads the deployed stacks' outputs itself, so nobody copies ARNs or bucket names by
hand. Region and credentials come the standard boto3 way; AWS_ENDPOINT_URL points every verb at
the local AWS.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import botocore.exceptions
import typer

from training_infra import naming
from training_infra.cli import launching, runs
from training_infra.cli.aws import OUTPUT_STACKS, SNAKE_TO_KEY, Aws, output_key_for
from training_infra.cli.errors import CliError, UsageError, err_console, reported_errors

if TYPE_CHECKING:
    from rich.console import Console


def stdout() -> Console:
    """A console for this invocation: terminal width and COLUMNS are read when a verb runs.

    rich (like boto3's transfer manager) is imported by the verbs that use it, not at start-up.
    """
    from rich.console import Console

    return Console(highlight=False)


app = typer.Typer(
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

Region = Annotated[
    str | None,
    typer.Option("--region", help="AWS region of the stacks (default: AWS_DEFAULT_REGION, your profile's region, else AWS_REGION).", show_default=False),
]
RunArg = Annotated[str, typer.Argument(metavar="RUN", help="Run id, as printed by `launch` and listed by `status`.", show_default=False)]
SESSION_MANAGER_PLUGIN_URL = "https://docs.aws.amazon.com/systems-manager/latest/userguide/session-manager-working-with-install-plugin.html"
LOG_POLL_SECONDS = 2.0


def _check_run_id(run_id: str) -> str:
    """Run ids are tag values and S3 folder names: reject anything else before calling AWS."""
    value = launching.check("run_id", "RUN", run_id, kind="argument")
    if not value:
        raise UsageError("argument 'RUN': got ''; allowed: a run id such as 20261128-160000-ab12")
    return value


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
    region: Region = None,
) -> None:
    """Print the deployed stacks' outputs under the seed's snake_case names.

    Without NAME: every output of every deployed stack as `name = value`. With NAME: the bare
    value, for scripts: `aws s3 ls s3://$(training-infra outputs training_bucket)/data/`.
    """
    aws = Aws(region)
    if name is not None:
        key = output_key_for(name)
        value = aws.output(key)
        sys.stdout.write(value + "\n")
        return
    missing, shown = [], 0
    for stack in naming.ALL_STACKS:
        try:
            stack_outputs = aws.stack_outputs(stack)
        except CliError:
            missing.append(stack)
            continue
        for key in OUTPUT_STACKS:
            if OUTPUT_STACKS[key] == stack and key in stack_outputs:
                sys.stdout.write(f"{naming.snake_case(key)} = {stack_outputs[key]}\n")
                shown += 1
    if len(missing) == len(naming.ALL_STACKS):
        raise CliError(f"no training-infra stack is deployed in {aws.region_name}: run `make deploy`")
    for stack in missing:
        err_console().print(f"note: stack {stack} is not deployed in {aws.region_name}: run `make deploy`")


# ---- upload --------------------------------------------------------------------------------


@app.command()
@reported_errors
def upload(
    path: Annotated[Path, typer.Argument(help="A dataset directory (or one file) on this machine.", show_default=False)],
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
        f"-> s3://{bucket}/{naming.DATA_PREFIX}"
    )


# ---- launch --------------------------------------------------------------------------------


@app.command()
@reported_errors
def launch(
    instance_type: Annotated[str | None, typer.Option("--instance-type", "-t", help="EC2 type, e.g. g5.xlarge (default: the stack's).", show_default=False)] = None,
    spot: Annotated[bool | None, typer.Option("--spot/--on-demand", help="Market (default: the stack's use_spot).", show_default=False)] = None,
    max_runtime_hours: Annotated[float | None, typer.Option("--max-runtime-hours", help="Hard limit; the instance ends itself and the reaper ends it after this (default: the stack's).", show_default=False)] = None,
    image_tag: Annotated[str | None, typer.Option("--image-tag", help="Training image tag in the ECR repository (default: the stack's).", show_default=False)] = None,
    command: Annotated[str | None, typer.Option("--command", help="Training command run in the container (default: the stack's, else the image's CMD).", show_default=False)] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE for the trainer's environment; repeat for more.", show_default=False)] = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="Name of the run (lowercase letters, digits, '-'; max 63). Reuse one to resume from its checkpoints. Default: the UTC time and 4 random hex digits, e.g. 20261128-160000-ab12.", show_default=False)] = None,
    subnet_id: Annotated[str | None, typer.Option("--subnet-id", help="Launch in this subnet (default: the template's network, else one subnet per zone of its VPC, tried in turn).", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the run id.")] = False,
    region: Region = None,
) -> None:
    """Start a training run in seconds from the compute stack's launch template.

    The instance boots the same agent, with the same tags, as `cdk deploy -c create_instance=true`;
    the options override the stack's settings for this run only. It is tagged as managed with its
    deadline, so the reaper ends it even if it hangs.
    """
    request = launching.validate(
        launching.LaunchRequest(
            instance_type=instance_type, spot=spot, max_runtime_hours=max_runtime_hours, image_tag=image_tag,
            command=command, env=list(env or []), run_id=run_id, subnet_id=subnet_id,
        )
    )  # fmt: skip
    started = time.monotonic()
    launched = launching.launch(Aws(region), request)
    if quiet:
        sys.stdout.write(launched.run_id + "\n")
        return
    rid = launched.run_id
    out = stdout()
    out.print(
        f"launched run [bold]{rid}[/] on {launched.instance_id} ({launched.instance_type}, {launched.market}"
        f"{', ' + launched.availability_zone if launched.availability_zone else ''}) in {time.monotonic() - started:.1f} s; "
        f"deadline {launched.deadline}"
    )
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
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Show at most this many runs, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    region: Region = None,
) -> None:
    """Show runs: instance, type, market, state, uptime, deadline, cost so far, outcome.

    Runs are found by their `training-infra:run-id` tag and, once finished, by the agent's
    status.json in the outputs bucket. Cost uses the spot price history in effect while the run
    was up, else the on-demand list price.
    """
    if run is not None:
        run = _check_run_id(run)
    aws = Aws(region)
    found = runs.require_runs(aws, run) if run else runs.collect_runs(aws)
    rows = _run_rows(aws, found[:limit])
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not rows:
        stdout().print(f"no runs yet in {aws.region_name}: start one with `training-infra launch`")
        return
    from rich.table import Table

    table = Table(title=f"training runs ({aws.region_name})", caption="cost: spot price history where available, else on-demand list price")
    for column in ("run", "instance", "type", "market", "state", "uptime", "deadline", "cost", "outcome"):
        table.add_column(column, justify="right" if column in ("uptime", "cost") else "left", no_wrap=column in ("run", "instance"), overflow="fold")
    for row in rows:
        outcome = row["outcome"] or ""
        if row["exit_code"] not in (None, "") and outcome:
            outcome += f" (exit {row['exit_code']})"
        table.add_row(
            row["run_id"], row["instance_id"] or "-", row["instance_type"] or "-", row["market"] or "-", row["state"],
            fmt_duration(row["uptime_seconds"]), row["deadline"] or "-", fmt_usd(row["cost_usd"]), outcome or "-",
        )  # fmt: skip
    stdout().print(table)


# ---- logs ----------------------------------------------------------------------------------


@app.command()
@reported_errors
def logs(
    run: RunArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until the run ends (Ctrl-C to stop).")] = False,
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
                raise CliError(f"no log lines for run {run} yet (stream {run} in {group}): the agent starts logging once the instance has booted") from None
            if not announced:
                err_console().print(f"waiting for run {run} to start logging ...")
                announced = True
            time.sleep(LOG_POLL_SECONDS)
            continue
        for event in page.get("events", []):
            sys.stdout.write(event.get("message", "").rstrip("\n") + "\n")
        sys.stdout.flush()
        new_token = page.get("nextForwardToken")
        if new_token != token:
            token = new_token
            if page.get("events"):
                continue  # drain everything already there before deciding to wait
        if not follow:
            return
        if not any(r.live for r in runs.collect_runs(aws, run)):
            # One last read after the end, for lines flushed on the way down.
            last = client.get_log_events(logGroupName=group, logStreamName=run, startFromHead=True, nextToken=token) if token else {"events": []}
            for event in last.get("events", []):
                sys.stdout.write(event.get("message", "").rstrip("\n") + "\n")
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
        raise CliError(f"{missing} is not installed: install it ({SESSION_MANAGER_PLUGIN_URL}), then run the command above")
    err_console().print(f"connecting to {instance.instance_id} (run {run}); type `exit` to leave")
    raise typer.Exit(subprocess.call(command))


# ---- fetch ---------------------------------------------------------------------------------


@app.command()
@reported_errors
def fetch(
    run: Annotated[str, typer.Argument(metavar="RUN|latest", help="Run id, or `latest` for the most recent finished run.", show_default=False)],
    dest: Annotated[Path | None, typer.Argument(metavar="DEST", help="Local folder (default: ./runs/<run>).", show_default=False)] = None,
    region: Region = None,
) -> None:
    """Download a run's results: outputs/, logs/ and status.json, with a progress bar."""
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
    stdout().print(f"fetched {result.transferred} file(s), {result.bytes:,} bytes from s3://{bucket}/{prefix} -> {target}")


# ---- stop ----------------------------------------------------------------------------------


@app.command()
@reported_errors
def stop(run: RunArg, region: Region = None) -> None:
    """End a run now. The agent uploads outputs, logs and status.json on its way down.

    Only instances tagged `training-infra:managed=true` are terminated.
    """
    run = _check_run_id(run)
    aws = Aws(region)
    instances = [runs.run_from_instance(i) for i in runs.instances_for(aws, run, managed_only=False)]
    if not instances:
        runs.require_runs(aws, run)  # unknown run -> clear error; a finished one falls through
        stdout().print(f"run {run} has already ended; nothing to stop")
        return
    unmanaged = [r.instance_id for r in instances if not r.managed]
    if unmanaged:
        raise CliError(f"refusing to terminate {', '.join(unmanaged)}: tagged {naming.TAG_RUN_ID}={run} but not {naming.TAG_MANAGED}=true")
    live = [r.instance_id for r in instances if r.live]
    if not live:
        stdout().print(f"run {run} has already ended ({', '.join(sorted({r.state for r in instances}))}); nothing to stop")
        return
    aws.client("ec2").terminate_instances(InstanceIds=live)
    out = stdout()
    out.print(f"stopping run {run}: terminating {', '.join(live)}; outputs and logs are uploaded on the way down")
    out.print(f"  training-infra status {run}", markup=False)


# ---- cost ----------------------------------------------------------------------------------


@app.command()
@reported_errors
def cost(
    days: Annotated[int, typer.Option("--days", "-d", min=1, help="Runs launched in the last N days.")] = 30,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    region: Region = None,
) -> None:
    """Cost per run and in total, and the saving against on-demand prices.

    Spot runs are priced from the spot price history in effect while they were up; on-demand
    runs (and spot runs without price history) at the on-demand list price.
    """
    aws = Aws(region)
    now = runs.utcnow()
    rows = _run_rows(aws, runs.within_days(runs.collect_runs(aws), days, now))
    total = sum(r["cost_usd"] or 0 for r in rows)
    on_demand = sum(r["on_demand_usd"] if r["on_demand_usd"] is not None else (r["cost_usd"] or 0) for r in rows)
    saving = on_demand - total
    if as_json:
        summary = {"days": days, "runs": rows, "total_usd": total, "on_demand_usd": on_demand, "saving_usd": saving}
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    if not rows:
        stdout().print(f"no runs in the last {days} days in {aws.region_name}")
        return
    from rich.table import Table

    table = Table(title=f"cost of runs in the last {days} days ({aws.region_name})")
    for column in ("run", "type", "market", "hours", "cost", "on-demand", "price from"):
        table.add_column(column, justify="right" if column in ("hours", "cost", "on-demand") else "left", no_wrap=column == "run", overflow="fold")
    for row in rows:
        hours = row["uptime_seconds"] / 3600 if row["uptime_seconds"] is not None else None
        table.add_row(
            row["run_id"], row["instance_type"] or "-", row["market"] or "-", f"{hours:.2f}" if hours is not None else "-",
            fmt_usd(row["cost_usd"]), fmt_usd(row["on_demand_usd"]), row["price_source"],
        )  # fmt: skip
    table.add_section()
    table.add_row("total", "", "", "", fmt_usd(total), fmt_usd(on_demand), "")
    out = stdout()
    out.print(table)
    percent = f" ({saving / on_demand:.0%})" if on_demand > 0 else ""
    out.print(f"saving vs on-demand: {fmt_usd(saving)}{percent}")


def main() -> None:
    """Console-script entry point (`training-infra`)."""
    app(prog_name="training-infra")


if __name__ == "__main__":
    main()
