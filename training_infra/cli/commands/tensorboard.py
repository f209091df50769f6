"""`training-infra tensorboard`: the run's TensorBoard logs synced down, TensorBoard started on loopback."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from training_infra import naming
from training_infra.cli.aws import Aws
from training_infra.cli.errors import CliError, UsageError, err_console, reported_errors
from training_infra.cli.options import Region, RunArg, check_run_id
from training_infra.cli.render import stdout


@reported_errors
def tensorboard(
    run: RunArg,
    folder: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            metavar="FOLDER",
            help="Where to sync the logs (default: ./runs/RUN/tensorboard).",
            show_default=False,
        ),
    ] = None,
    port: Annotated[str, typer.Option("--port", metavar="PORT", help="TensorBoard's port on 127.0.0.1.")] = "6006",
    region: Region = None,
) -> None:
    """Sync what the run's trainer wrote to $TENSORBOARD_DIR, then serve it with TensorBoard on this machine.

    The agent syncs the trainer's $TENSORBOARD_DIR to `runs/RUN/tensorboard/` with the logs; run
    this again to see newer points. TensorBoard listens on 127.0.0.1 only (Ctrl-C stops it). It is
    an optional extra: `pip install 'training-infra[tensorboard]'`.
    """
    from training_infra.cli import runs, transfer

    run = check_run_id(run)
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"option '--port': got {port!r}; allowed: a port number from 1 to 65535")
    if importlib.util.find_spec("tensorboard") is None:
        raise CliError("tensorboard is not installed: pip install 'training-infra[tensorboard]' (an optional extra)")
    aws = Aws(region)
    bucket = aws.output(naming.OUTPUT_OUTPUTS_BUCKET)
    prefix = f"{naming.RUNS_PREFIX}{run}/tensorboard/"
    objects = transfer.remote_objects(aws, bucket, prefix)
    if not objects:
        runs.require_runs(aws, run)  # unknown run: the usual one line
        raise CliError(
            f"run {run} has no TensorBoard logs (s3://{bucket}/{prefix} is empty): its trainer writes them to "
            "$TENSORBOARD_DIR, which the agent syncs with the logs"
        )
    target = folder or Path("runs") / run / "tensorboard"
    result = transfer.download(aws, bucket, prefix, objects, target, err_console())
    out = stdout()
    out.print(f"synced {result.transferred} file(s), {result.bytes:,} bytes -> {target}", markup=False)
    out.print(f"TensorBoard at http://127.0.0.1:{port}/ (Ctrl-C to stop)", markup=False)
    sys.stdout.flush()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(target), "--host", "127.0.0.1"]
    raise typer.Exit(subprocess.call([*command, "--port", port]))
