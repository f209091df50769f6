"""`training-infra stop`: end a run for good."""

from __future__ import annotations

from training_infra.cli.aws import Aws
from training_infra.cli.errors import err_console, reported_errors
from training_infra.cli.options import Region, RunArg, check_run_id
from training_infra.cli.render import stdout


@reported_errors
def stop(run: RunArg, region: Region = None) -> None:
    """End a run for good: no relaunch; its instance stops the trainer gracefully first.

    A managed run's instance is told to stop (checkpoint flushed, outputs and logs uploaded,
    status written, power-off) and is terminated by the supervisor if it has not gone after
    ten minutes. Only instances tagged `training-infra:managed=true` are ever terminated.
    """
    from training_infra.cli import launching
    from training_infra.cli.source import RunSource

    run = check_run_id(run)
    aws = Aws(region)
    out = stdout()
    RunSource(aws).require(run)  # unknown run -> clear error before asking anyone
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
