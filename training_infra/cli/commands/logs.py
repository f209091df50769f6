"""`training-infra logs`: the run's training log from CloudWatch Logs."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import botocore.exceptions
import typer

from training_infra import naming
from training_infra.cli import runs
from training_infra.cli.aws import Aws
from training_infra.cli.errors import CliError, err_console, reported_errors
from training_infra.cli.options import Region, RunArg, check_run_id
from training_infra.cli.safe_text import remote_text
from training_infra.cli.source import RunSource

LOG_POLL_SECONDS = 2.0


@reported_errors
def logs(
    run: RunArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until the run ends (Ctrl-C to stop).")
    ] = False,
    region: Region = None,
) -> None:
    """Print the run's training log from CloudWatch Logs (one stream per run)."""
    run = check_run_id(run)
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
        still_going = RunSource(aws).still_going(run)
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
