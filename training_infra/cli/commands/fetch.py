"""`training-infra fetch`: a run's outputs, logs and status.json to this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from training_infra import naming
from training_infra.cli.aws import Aws
from training_infra.cli.errors import CliError, UsageError, err_console, reported_errors
from training_infra.cli.options import Region, check_run_id
from training_infra.cli.render import stdout
from training_infra.cli.safe_text import remote_text


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
    """Download a run's results: outputs/, logs/ and status.json (a progress bar on a terminal); a multi-node run's
    every node (attempts/<n>/nodes/<k>/).

    The files come whatever the outcome; a note on stderr says when the run failed or is still running.
    """
    from training_infra.cli import runs, transfer

    run = run if run == "latest" else check_run_id(run)
    if dest is not None and dest.exists() and not dest.is_dir():
        raise UsageError(f"argument 'DEST': got {str(dest)!r}; allowed: a folder (new or existing), not a file")
    aws = Aws(region)
    bucket = aws.output(naming.OUTPUT_OUTPUTS_BUCKET)
    prefix = naming.LATEST_PREFIX if run == "latest" else f"{naming.RUNS_PREFIX}{run}/"
    target = dest or Path("runs") / run
    objects = transfer.remote_objects(aws, bucket, prefix)
    # The spec the supervisor keeps at launch (runs/<id>/spec.yaml) is no result of the run.
    if not set(objects) - {f"{prefix}spec.yaml"}:
        if run == "latest":
            raise CliError(
                f"no run has succeeded yet (s3://{bucket}/{prefix} holds the newest succeeded run's files): "
                "fetch a run by its id, `training-infra status` lists them"
            )
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
    from training_infra.cli import runs
    from training_infra.cli.source import RunSource
    from training_infra.supervisor.runtime.records import RunState

    record = RunSource(aws).record(run)
    if record is not None and record.active:
        # A managed run's status.json is its latest attempt's: the run itself may go on.
        current = record.current
        if current and current.instance_id:
            where = f"run {run} (attempt {current.n}) is still running on {current.instance_id}"
        else:
            where = f"run {run} is still {record.state}"
        return f"{where}: these are only the files uploaded so far; fetch again after it ends"
    if record is not None and record.state != RunState.SUCCEEDED:
        attempt = target / "attempts" / str(record.attempts[-1].n if record.attempts else 1)
        # A gang's nodes each upload under nodes/<k>/ (every node's logs come with the run's prefix).
        logs = attempt / "nodes" if record.spec.nodes > 1 else attempt / "logs"
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
