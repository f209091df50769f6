"""`training-infra logs`: the run's training log from CloudWatch Logs."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from training_infra import naming
from training_infra.cli.aws import Aws
from training_infra.cli.errors import CliError, UsageError, err_console, reported_errors
from training_infra.cli.options import Region, RunArg, check_run_id, node_index
from training_infra.cli.safe_text import remote_text

LOG_POLL_SECONDS = 2.0


def node_stream(run: str, node: str | None) -> str:
    """The log stream of a gang's node K (the agent's contract): node 0 keeps the run's own stream."""
    if node is None:
        return run
    index = node_index(node)
    return run if index == 0 else f"{run}/node-{index}"


@reported_errors
def logs(
    run: RunArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until the run ends (Ctrl-C to stop).")
    ] = False,
    node: Annotated[
        str | None,
        typer.Option(
            "--node",
            metavar="K",
            help="A multi-node run's node K (default 0, the rendezvous host).",
            show_default=False,
        ),
    ] = None,
    region: Region = None,
) -> None:
    """Print the run's training log from CloudWatch Logs (one stream per run; node K of a gang: <run>/node-K)."""
    import botocore.exceptions

    from training_infra.cli import runs
    from training_infra.cli.source import RunSource

    run = check_run_id(run)
    stream = node_stream(run, node)
    aws = Aws(region)
    if node is not None and int(node) > 0:
        record = RunSource(aws).record(run)
        if record is not None and int(node) >= record.spec.nodes:
            raise UsageError(f"option '--node': got {node!r}; allowed: 0 to {record.spec.nodes - 1} (run {run} has "
                             f"{record.spec.nodes} node(s))")  # fmt: skip
    group = aws.output(naming.OUTPUT_LOG_GROUP_NAME)
    client = aws.client("logs")
    token: str | None = None
    announced = False
    printed = 0
    while True:
        kwargs: dict[str, Any] = {"logGroupName": group, "logStreamName": stream, "startFromHead": True}
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
                    f"no log lines for run {run} yet (stream {stream} in {group}): "
                    "the agent starts logging once the instance has booted"
                ) from None
            if not announced:
                err_console().print(f"waiting for run {run} to start logging ...")
                announced = True
            time.sleep(LOG_POLL_SECONDS)
            continue
        for event in page.get("events", []):
            sys.stdout.write(remote_text(event.get("message", "").rstrip("\n")) + "\n")
            printed += 1
        sys.stdout.flush()
        new_token = page.get("nextForwardToken")
        if new_token != token:
            token = new_token
            if page.get("events") or not follow:
                continue  # drain everything already there (an empty page is not the end) before deciding
        if not follow:
            if not printed:  # the stream exists, the agent has not written to it yet
                raise CliError(
                    f"no log lines for run {run} yet (stream {run} in {group} is empty): "
                    "the agent starts logging once the instance has booted; `logs -f` waits for them"
                )
            return
        still_going = RunSource(aws).still_going(run)
        if not still_going:  # a managed run goes on between attempts and while it waits for capacity
            # One last read after the end, for lines flushed on the way down.
            last = (
                client.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True, nextToken=token)
                if token
                else {"events": []}
            )
            for event in last.get("events", []):
                sys.stdout.write(remote_text(event.get("message", "").rstrip("\n")) + "\n")
            return
        time.sleep(LOG_POLL_SECONDS)
