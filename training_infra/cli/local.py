"""`training-infra local ...`: the local AWS to work in (training_infra/local/sandbox.py).

`up` runs in the foreground (what `make local` runs); the other verbs find it through its folder:
`state.json` (where the emulator is, its pid, ready or not) and `control/` (requests it answers).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from training_infra.cli.errors import CliError, UsageError, reported_errors

local_app = typer.Typer(
    name="local",
    help=(
        "A local AWS to work in: `local up` (what `make local` runs) keeps a moto server, the deployed "
        "stacks, the supervisor and every launched instance running here; then, in another shell, "
        '`eval "$(training-infra local env)"` and every verb works against it. `local down` stops it.'
    ),
    no_args_is_help=True,
)

Dir = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="The sandbox's folder (default: $TRAINING_INFRA_LOCAL, else .local/sandbox in the checkout).",
        show_default=False,
    ),
]


def _folder(given: Path | None) -> Path:
    from training_infra.local.sandbox import DEFAULT_DIR, DIR_VARIABLE

    if given is not None:
        return given.resolve()
    return Path(os.environ.get(DIR_VARIABLE) or DEFAULT_DIR)


def _sandbox_error(error: Exception) -> CliError:
    return CliError(str(error))


@local_app.command()
@reported_errors
def up(
    schedule: Annotated[
        str,
        typer.Option("--schedule", metavar="SECONDS", help="Run the supervisor's reconcile every SECONDS (AWS: 60)."),
    ] = "60",
    runtime: Annotated[
        str,
        typer.Option(
            "--runtime",
            metavar="process|docker",
            help="process: instances run the trainer command directly; docker: the production container path "
            "on podman (root), the example image built and pushed to the emulator's ECR.",
        ),
    ] = "process",
    folder: Dir = None,
) -> None:
    """Start the local AWS and keep it running until Ctrl-C or `local down` (what `make local` runs)."""
    from training_infra.local.containers import unavailable_reason
    from training_infra.local.sandbox import Sandbox, SandboxError

    try:
        seconds = float(schedule)
    except ValueError:
        seconds = -1.0
    if not 1 <= seconds <= 3600:
        raise UsageError(f"option '--schedule': got '{schedule}'; allowed: seconds from 1 to 3600 (AWS: 60)")
    if runtime not in ("process", "docker"):
        raise UsageError(f"option '--runtime': got '{runtime}'; allowed: process, docker")
    if runtime == "docker" and (reason := unavailable_reason()):
        raise CliError(f"--runtime docker is not available here: {reason}")
    sandbox = Sandbox(folder=_folder(folder), runtime=runtime, schedule_seconds=seconds)
    try:
        code = sandbox.run()
    except SandboxError as error:
        raise _sandbox_error(error) from None
    raise typer.Exit(code)


@local_app.command()
@reported_errors
def env(folder: Dir = None) -> None:
    """Print the exports that point this shell at the running local AWS: `eval "$(training-infra local env)"`."""
    from training_infra.local.sandbox import DIR_VARIABLE, SandboxError, running_state

    where = _folder(folder)
    try:
        state = running_state(where)
    except SandboxError as error:
        raise _sandbox_error(error) from None
    lines = [f"export {name}={shlex.quote(value)}" for name, value in sorted(state.env.items())]
    lines.append(f"export {DIR_VARIABLE}={shlex.quote(str(where))}")
    sys.stdout.write("\n".join(lines) + "\n")
    if sys.stdout.isatty():
        sys.stderr.write('# these are the exports; to apply them: eval "$(training-infra local env)"\n')


@local_app.command()
@reported_errors
def interrupt(
    run: Annotated[str, typer.Argument(metavar="RUN", help="The run whose live instance gets the notice.")],
    node: Annotated[
        str | None,
        typer.Option("--node", metavar="K", help="A multi-node run: only node K's instance (default: all)."),
    ] = None,
    folder: Dir = None,
) -> None:
    """Send a spot interruption notice to RUN's live instance, as AWS does two minutes before reclaiming it."""
    from training_infra.cli.options import check_run_id, node_index
    from training_infra.local.sandbox import SandboxError, ask

    run = check_run_id(run)
    which = {} if node is None else {"node": node_index(node)}
    try:
        answer = ask(_folder(folder), {"verb": "interrupt", "run": run, **which})
    except SandboxError as error:
        raise _sandbox_error(error) from None
    if not answer.get("ok"):
        raise CliError(answer.get("message", "refused"))
    sys.stdout.write(answer["message"] + "\n")


@local_app.command()
@reported_errors
def down(folder: Dir = None) -> None:
    """Stop the local AWS: instances (their agents upload logs first), containers, the emulator; remove its folder."""
    from training_infra.local.sandbox import SandboxError, stop_running

    where = _folder(folder)
    cleaned: list[str] = []
    try:
        state = stop_running(where, say=cleaned.append)
    except SandboxError as error:
        raise _sandbox_error(error) from None
    if state is None:
        for line in cleaned:
            sys.stdout.write(line + "\n")
        sys.stdout.write(
            f"no local AWS was running in {where}; " + ("cleaned up\n" if cleaned else "nothing to stop\n")
        )
        return
    sys.stdout.write(f"local AWS (pid {state.pid}) stopped; {where} removed\n")
    if os.environ.get("AWS_ENDPOINT_URL") == state.endpoint:
        sys.stdout.write("this shell still points at it: unset AWS_ENDPOINT_URL TRAINING_INFRA_LOCAL\n")
