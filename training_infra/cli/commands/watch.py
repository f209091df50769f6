"""`training-infra watch`: a run's step, metrics, speed, GPU and spend over time, in the terminal or as a PNG."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from training_infra.cli.aws import Aws
from training_infra.cli.errors import UsageError, reported_errors
from training_infra.cli.options import Region, RunArg, check_run_id, whole_number

MIN_EVERY = 10  # each refresh reads DynamoDB, EC2 and S3; the history itself changes every few minutes


@reported_errors
def watch(
    run: RunArg,
    once: Annotated[bool, typer.Option("--once", help="Draw the view once and exit (for a pipe or a script).")] = False,
    png: Annotated[
        Path | None,
        typer.Option(
            "--png", metavar="FILE", help="Write the same view as a PNG picture and exit.", show_default=False
        ),
    ] = None,
    every: Annotated[
        str,
        typer.Option(
            "--every",
            metavar="SECONDS",
            help=f"Seconds between refreshes while the run goes on (at least {MIN_EVERY}).",
        ),
    ] = "30",
    region: Region = None,
) -> None:
    """Watch a run: step, the heartbeat's metrics, steps/s, GPU use and dollars against its limit.

    Redrawn until the run ends (Ctrl-C to leave). Each attempt's start and each spot reclaim are
    marked on the time axis. The history is what the agent appends to each attempt's
    `logs/metrics.jsonl` (synced with the logs, every few minutes), so the newest minutes may
    not be there yet.
    """
    from training_infra.cli import watching

    run = check_run_id(run)
    seconds = whole_number("--every", every)
    if seconds < MIN_EVERY:
        raise UsageError(
            f"option '--every': got {every!r}; allowed: at least {MIN_EVERY} seconds "
            "(each refresh reads the run table, EC2 and S3)"
        )
    aws = Aws(region)
    while True:
        view = watching.load(aws, run)
        if png is not None:
            watching.write_png(view, png)
            sys.stdout.write(f"wrote {png} ({png.stat().st_size:,} bytes): {view.summary()}\n")
            return
        width = min(shutil.get_terminal_size((80, 24)).columns, 120)
        text = watching.draw_text(view, width=width)
        if once or not view.active:
            sys.stdout.write(text)
            return
        # Redrawn in place on a terminal; piped (a log file), each view follows the last.
        sys.stdout.write(("\x1b[H\x1b[2J" if sys.stdout.isatty() else "") + text)
        sys.stdout.flush()
        time.sleep(seconds)
