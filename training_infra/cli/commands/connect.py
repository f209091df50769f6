"""`training-infra connect`: a shell on the run's instance through SSM Session Manager."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

import typer

from training_infra.cli.aws import Aws
from training_infra.cli.errors import CliError, err_console, reported_errors
from training_infra.cli.options import Region, RunArg, check_run_id

if TYPE_CHECKING:
    from training_infra.cli import runs

SESSION_MANAGER_PLUGIN_URL = (
    "https://docs.aws.amazon.com/systems-manager/latest/userguide/session-manager-working-with-install-plugin.html"
)


def _live_instance(aws: Aws, run: str) -> runs.Run:
    from training_infra.cli import runs

    found = runs.require_runs(aws, run)
    live = [r for r in found if r.state == "running"]
    if not live:
        states = ", ".join(sorted({r.state for r in found}))
        raise CliError(f"run {run} has no running instance ({states}): `training-infra status {run}`")
    return live[0]


@reported_errors
def connect(run: RunArg, region: Region = None) -> None:
    """Open a shell on the run's instance through SSM Session Manager (no SSH, no open port).

    Needs the AWS CLI and the Session Manager plugin; without the plugin, prints the exact
    command to run once it is installed.
    """
    run = check_run_id(run)
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
